"""Admission: a bound on the GraphQL requests one process runs at once, shared fairly between tenants.

Without it every request that arrives starts at once, and under a flood they all slow down
together: latency grows without limit (p99 of 20 s at 200 clients) while nobody is refused. Here a
request takes a *place* before it opens its session (its database connection) and gives it back
when its response is sent:

- At most ``max_in_flight`` places are taken in the process, and at most ``tenant_in_flight`` by one
  tenant: a tenant's flood can take only its share, and the rest stays free for the others.
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


@dataclass(frozen=True)
class Limits:
    """The bounds of one process (``Settings``: ``ATRIUM_MAX_IN_FLIGHT`` and the others)."""

    max_in_flight: int
    tenant_in_flight: int
    queue: int
    tenant_queue: int
    wait_seconds: float
    retry_after: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(max_in_flight=settings.max_in_flight,
                   tenant_in_flight=min(settings.tenant_in_flight, settings.max_in_flight),
                   queue=settings.admission_queue, tenant_queue=min(settings.tenant_queue, settings.admission_queue),
                   wait_seconds=settings.admission_wait_seconds, retry_after=settings.retry_after_seconds)


@dataclass
class Line:
    """One tenant's requests: how many run, and those waiting for a place (oldest first)."""

    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class Admission:
    """Places for requests in this process (module docstring). Not thread-safe: one event loop."""

    def __init__(self, limits: Limits, clock: Clock) -> None:
        self.limits = limits
        self._clock = clock
        self._lines: dict[Hashable, Line] = {}
        self._turns: OrderedDict[Hashable, None] = OrderedDict()
        """Tenants with someone waiting, in the order their lines get the next free place."""
        self.in_flight = 0
        self.waiting = 0
        self.refused = 0
        """Requests refused so far (for want of room in the process or in their tenant's share)."""
        self._refused_at = -float("inf")
        self._watchers: list[tuple[Callable[[Admission], bool], asyncio.Future[None]]] = []

    @property
    def saturated(self) -> bool:
        """Every place taken and the queue full, or a refusal for want of room less than
        ``SATURATED_FOR`` seconds ago."""
        full = self.in_flight >= self.limits.max_in_flight and self.waiting >= self.limits.queue
        return full or self._clock.time() - self._refused_at < SATURATED_FOR

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
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = Line()
        if self.in_flight < limits.max_in_flight and line.running < limits.tenant_in_flight and not line.waiting:
            self._grant(line)
            self._notify()
            return
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

    def _grant(self, line: Line) -> None:
        line.running += 1
        self.in_flight += 1

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
                if line.running < limits.tenant_in_flight:
                    break
            else:
                return  # every waiting tenant is at its share
            granted = line.waiting.popleft()
            self.waiting -= 1
            self._grant(line)
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

