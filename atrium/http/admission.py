"""Admission: a bound on the GraphQL requests one process runs at once, shared fairly between tenants.

Without it every request that arrives starts at once, and under a flood they all slow down
together: latency grows without limit (p99 of 20 s at 200 clients) while nobody is refused. Here a
request takes a *place* before it opens its session (its database connection) and gives it back
when its response is sent:

- At most ``max_in_flight`` places are taken in the process, and at most ``tenant_in_flight`` by one
  tenant: a tenant's flood can take only its share, and the rest stays free for the others.
- While the process is *busy* (``Busy``: its CPU use over the last half second was at least
  ``BUSY_CPU`` of one core, or its event loop ran every timer of that half second ``LoopLag.TARGET``
  late or more, or the machine's cores were busy ``MACHINE_BUSY`` of that half second, until they
  fall below ``MACHINE_CALM``: the CPU is the bottleneck, the process's own or the machine's, a
  database on the same host included) and another tenant was admitted within the last ``ACTIVE_FOR``
  seconds (or holds or wants a place), a tenant that *floods* (it had a request refused because its
  share and its line were full, within that second) may hold ``busy_tenant_in_flight`` places
  instead (1 by default); the others keep their whole share, so a quiet tenant's few concurrent
  requests never wait behind its own. Free places alone do not keep latency down: one process runs
  its requests on one event loop, and once that loop is the bottleneck every request running beside
  another tenant's stretches that tenant's latency by its own CPU time. A flood holding five places
  made a quiet tenant's requests 2-3 times slower while every place was still free for it; held to
  one place, the flood is served as fast as the CPU allows, the quiet tenant's requests share the
  loop with one of its requests at most, and the flood's excess waits in its line or is refused. The
  same holds when the host's cores are the bottleneck while this process is not: a database beside
  it, busy with the flood's queries, makes every other tenant's queries wait for a core. A process
  waiting on a database elsewhere (CPU idle, the loop on time) keeps the full shares, since there
  more requests in flight do add throughput.
- A request that finds no place for itself may wait, in its tenant's line, if fewer than
  ``admission_queue`` requests wait in all and fewer than ``tenant_queue`` of its tenant. A free place
  goes to the lines in turn (round robin over the tenants that wait and are under their share), so
  one tenant's long line never delays another tenant's next request by more than one turn.
- Everything else is refused at once, as is a request that waited ``admission_wait_seconds``
  without a place: ``Overloaded`` (SERVICE_UNAVAILABLE), answered 503 with ``Retry-After``. Nothing
  of it ran, so any request, mutations included, may simply be sent again.

The process is *saturated* (``/readyz`` answers 503) while every place is taken and the queue is
full, and for ``SATURATED_FOR`` seconds after it last refused a request for want of room in the
process (not for a tenant being over its own share: other tenants are still served then). A load
balancer then sends new work elsewhere while the process catches up.

Keys: the tenant of the verified credential; unauthenticated requests (``login``) by client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from auth.principal import Principal
from core.clock import Clock
from core.errors import Overloaded
from core.settings import Settings

SATURATED_FOR = 1.0
"""Seconds ``saturated`` stays true after a refusal for want of room in the process."""
ACTIVE_FOR = 1.0
"""Seconds a tenant counts as being served after its last admission (for the busy share)."""
BUSY_CPU = 0.8
"""The process is busy when it used at least this share of one core over the last window."""


class LoopLag:
    """How late the event loop runs a timer set every ``TICK`` seconds: late by ``TARGET`` or more at
    every tick of the last ``WINDOW`` (a standing queue, as CoDel calls it, not a burst) means the loop
    has more ready work than it can run, whether for its own requests or because the machine's other
    processes take the cores it would run on (which the process's own CPU use does not show)."""

    TICK = 0.025
    WINDOW = 0.5
    TARGET = 0.005

    def __init__(self) -> None:
        self._late: deque[float] = deque(maxlen=round(self.WINDOW / self.TICK))
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        if self._handle is None:
            self._next(asyncio.get_running_loop())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._late.clear()

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        self._due = loop.time() + self.TICK
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._late.append(loop.time() - self._due)
        self._next(loop)

    def __call__(self) -> bool:
        late = self._late
        return len(late) == late.maxlen and min(late) >= self.TARGET


class Busy:
    """Whether the process is busy (module docstring): ``CpuProbe`` (the process's CPU),
    ``LoopLag`` or the machine's CPU (``machine_cpu``) says so. ``start`` and ``close`` run with the
    app (the lag needs a running loop; without it only the CPU counts)."""

    def __init__(self) -> None:
        self.cpu = CpuProbe()
        self.lag = LoopLag()
        self.machine = CpuProbe(cpu=machine_cpu, threshold=MACHINE_BUSY, release=MACHINE_CALM) \
            if machine_cpu() is not None else None

    def start(self) -> None:
        self.lag.start()

    def close(self) -> None:
        self.lag.close()

    def __call__(self) -> bool:
        return self.cpu() or self.lag() or (self.machine is not None and self.machine())


class CpuProbe:
    """Whether this process used at least ``threshold`` (``BUSY_CPU``) of a core over its last
    ``WINDOW`` seconds of real time (``time.process_time``: every thread of the process), or
    whatever ``cpu`` counts (``machine_cpu``); once busy, it stays busy until the use falls below
    ``release`` (the threshold by default). Checked on each admission; it reads the CPU time at
    most once per ``WINDOW / 4``, so it costs nothing measurable."""

    WINDOW = 0.5

    def __init__(self, cpu: Callable[[], float | None] = time.process_time,
                 wall: Callable[[], float] = time.perf_counter, *, threshold: float = BUSY_CPU,
                 release: float | None = None) -> None:
        self._cpu, self._wall = cpu, wall
        self._threshold, self._release = threshold, release if release is not None else threshold
        self._samples: deque[tuple[float, float]] = deque([(wall(), cpu() or 0.0)])
        self._busy = False

    def __call__(self) -> bool:
        now = self._wall()
        if now - self._samples[-1][0] >= self.WINDOW / 4:
            self._samples.append((now, self._cpu() or 0.0))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW:
                self._samples.popleft()
            (then, cpu_then), (_, cpu_now) = self._samples[0], self._samples[-1]
            used = (cpu_now - cpu_then) / (now - then)
            self._busy = used >= (self._release if self._busy else self._threshold)
        return self._busy


MACHINE_BUSY = 0.75
"""The machine is busy when its cores were busy at least this share of the time over
``CpuProbe.WINDOW`` (on average over the cores): the database or other processes of the host take
the CPU this process's requests wait for, which neither its own CPU time nor its loop shows (a
flood holding five places on a two-core host running PostgreSQL kept it 83 % busy and the quiet
tenant's p99 at 2.7 times its unloaded value; held to one place, 58 % and 1.5-1.9 times)."""
MACHINE_CALM = 0.5
"""Once busy, the machine counts as busy until its cores are busy less than this share: holding a
flood to one place lowers the load, which must not give it its five places back at once."""


def machine_cpu(stat: str = "/proc/stat") -> float | None:
    """The seconds every core of the machine was busy (not idle nor waiting for I/O) since boot,
    divided by the number of cores; None where the kernel does not tell (not Linux). A read of
    procfs, answered from the kernel's counters."""
    try:
        with open(stat, "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK") / (os.cpu_count() or 1)


@dataclass(frozen=True)
class Limits:
    """The bounds of one process (``Settings``: ``ATRIUM_MAX_IN_FLIGHT`` and the others)."""

    max_in_flight: int
    tenant_in_flight: int
    busy_tenant_in_flight: int
    queue: int
    tenant_queue: int
    wait_seconds: float
    retry_after: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        tenant_in_flight = min(settings.tenant_in_flight, settings.max_in_flight)
        return cls(max_in_flight=settings.max_in_flight, tenant_in_flight=tenant_in_flight,
                   busy_tenant_in_flight=min(settings.busy_tenant_in_flight, tenant_in_flight),
                   queue=settings.admission_queue, tenant_queue=min(settings.tenant_queue, settings.admission_queue),
                   wait_seconds=settings.admission_wait_seconds, retry_after=settings.retry_after_seconds)


@dataclass
class Line:
    """One tenant's requests: how many run, and those waiting for a place (oldest first)."""

    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class Admission:
    """Places for requests in this process (module docstring). Not thread-safe: one event loop."""

    def __init__(self, limits: Limits, clock: Clock, busy: Callable[[], bool] | None = None) -> None:
        """``busy``: whether the CPU is the bottleneck now (``Busy`` by default, started by ``start``)."""
        self.limits = limits
        self._clock = clock
        self._busy = busy if busy is not None else Busy()
        self._served: OrderedDict[Hashable, float] = OrderedDict()
        """Tenants admitted within the last ``ACTIVE_FOR`` seconds, oldest admission first."""
        self._pressed: OrderedDict[Hashable, float] = OrderedDict()
        """Tenants refused for a full line within the last ``ACTIVE_FOR`` seconds (flooding)."""
        self._lines: dict[Hashable, Line] = {}
        self._turns: OrderedDict[Hashable, None] = OrderedDict()
        """Tenants with someone waiting, in the order their lines get the next free place."""
        self.in_flight = 0
        self.waiting = 0
        self.refused = 0
        """Requests refused so far (for want of room in the process or in their tenant's share)."""
        self._refused_at = -float("inf")
        self._watchers: list[tuple[Callable[[Admission], bool], asyncio.Future[None]]] = []

    def start(self) -> None:
        """Start watching the event loop (``Busy``); the app's lifespan calls it."""
        if isinstance(self._busy, Busy):
            self._busy.start()

    def close(self) -> None:
        if isinstance(self._busy, Busy):
            self._busy.close()

    @property
    def saturated(self) -> bool:
        """Every place taken and the queue full, or a refusal for want of room less than
        ``SATURATED_FOR`` seconds ago."""
        full = self.in_flight >= self.limits.max_in_flight and self.waiting >= self.limits.queue
        return full or self._clock.time() - self._refused_at < SATURATED_FOR

    def share(self, key: Hashable) -> int:
        """How many places ``key`` may hold now: ``busy_tenant_in_flight`` while it floods (a request
        refused for its full line within ``ACTIVE_FOR``), the process is busy and another tenant is being
        served; else ``tenant_in_flight``."""
        limits = self.limits
        if limits.busy_tenant_in_flight >= limits.tenant_in_flight or not self._recent(self._pressed, key):
            return limits.tenant_in_flight
        return limits.busy_tenant_in_flight if self._others_served(key) and self._busy() else limits.tenant_in_flight

    def _recent(self, seen: OrderedDict[Hashable, float], key: Hashable) -> bool:
        """Whether ``key`` is in ``seen`` within ``ACTIVE_FOR`` (older entries are dropped)."""
        horizon = self._clock.time() - ACTIVE_FOR
        while seen and next(iter(seen.values())) <= horizon:
            seen.popitem(last=False)
        return key in seen

    def _others_served(self, key: Hashable) -> bool:
        """Whether a tenant other than ``key`` holds or wants a place, or was admitted within ``ACTIVE_FOR``."""
        mine = self._recent(self._served, key)
        return len(self._served) - mine > 0 or len(self._lines) - (key in self._lines) > 0

    @staticmethod
    def _mark(seen: OrderedDict[Hashable, float], key: Hashable, now: float) -> None:
        seen[key] = now
        seen.move_to_end(key)

    def running(self, key: Hashable) -> int:
        """Requests of ``key`` that hold a place."""
        line = self._lines.get(key)
        return line.running if line else 0

    @contextlib.asynccontextmanager
    async def place(self, key: Hashable) -> AsyncIterator[None]:
        """Hold a place for ``key``'s request while the block runs; ``Overloaded`` when none is to be
        had now (or within the wait). Cancelling a waiting request gives up its turn."""
        await self._take(key)
        try:
            yield
        finally:
            self._give_back(key)

    async def until(self, predicate: Callable[[Admission], bool]) -> None:
        """Return once ``predicate(self)`` holds (it is checked after every change): for tests and
        tools that must know requests are running or waiting, without sleeping."""
        if predicate(self):
            return
        watcher = (predicate, asyncio.get_running_loop().create_future())
        self._watchers.append(watcher)
        try:
            await watcher[1]
        finally:
            self._watchers.remove(watcher)

    async def _take(self, key: Hashable) -> None:
        limits = self.limits
        if self._turns:  # shares may have grown since the last place was given back (the CPU idle again)
            self._dispatch()
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = Line()
        if self.in_flight < limits.max_in_flight and line.running < self.share(key) and not line.waiting:
            self._grant(key, line)
            self._notify()
            return
        if len(line.waiting) >= limits.tenant_queue:  # its share and its line full: it floods
            self._mark(self._pressed, key, self._clock.time())
        if self.waiting >= limits.queue or len(line.waiting) >= limits.tenant_queue:
            self._refuse(key, line, process_full=self.in_flight >= limits.max_in_flight
                         and self.waiting >= limits.queue)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        line.waiting.append(granted)
        self.waiting += 1
        self._turns[key] = None
        timer = asyncio.ensure_future(self._clock.sleep_until(self._clock.time() + limits.wait_seconds))
        self._notify()
        try:
            await asyncio.wait((granted, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._withdraw(key, line, granted)
            raise
        finally:
            timer.cancel()
        if not granted.done():
            self._withdraw(key, line, granted)
            self._refuse(key, line, process_full=self.in_flight >= limits.max_in_flight)

    def _grant(self, key: Hashable, line: Line) -> None:
        line.running += 1
        self.in_flight += 1
        self._mark(self._served, key, self._clock.time())

    def _withdraw(self, key: Hashable, line: Line, granted: asyncio.Future[None]) -> None:
        """``granted`` stops waiting: out of its line if still in it, its place given back if it had one."""
        if granted.done() and not granted.cancelled():
            self._give_back(key)
            return
        granted.cancel()
        with contextlib.suppress(ValueError):
            line.waiting.remove(granted)
            self.waiting -= 1
        if not line.waiting:
            self._turns.pop(key, None)
        self._forget(key, line)
        self._notify()

    def _refuse(self, key: Hashable, line: Line, *, process_full: bool) -> None:
        self.refused += 1
        if process_full:
            self._refused_at = self._clock.time()
        self._forget(key, line)
        raise Overloaded(self.limits.retry_after)

    def _give_back(self, key: Hashable) -> None:
        line = self._lines[key]
        line.running -= 1
        self.in_flight -= 1
        self._dispatch()
        self._forget(key, line)
        self._notify()

    def _dispatch(self) -> None:
        """Give free places to the waiting lines in turn (each line under its share gets one per turn)."""
        limits = self.limits
        while self.in_flight < limits.max_in_flight and self._turns:
            for key in self._turns:
                line = self._lines[key]
                if line.running < self.share(key):
                    break
            else:
                return  # every waiting tenant is at its share
            granted = line.waiting.popleft()
            self.waiting -= 1
            self._grant(key, line)
            granted.set_result(None)
            if line.waiting:
                self._turns.move_to_end(key)
            else:
                del self._turns[key]

    def _forget(self, key: Hashable, line: Line) -> None:
        if line.running == 0 and not line.waiting:
            self._lines.pop(key, None)

    def _notify(self) -> None:
        for predicate, done in self._watchers:
            if not done.done() and predicate(self):
                done.set_result(None)


def admission_key(principal: Principal | None, conn: HTTPConnection) -> Hashable:
    """Whose share a request takes: its tenant's, or (no credential) its client address's."""
    if principal is not None:
        return principal.tenant_id
    return ("address", conn.client.host if conn.client else None)

