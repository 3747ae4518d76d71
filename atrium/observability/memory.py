"""Handing freed memory back to the system once load has dropped.

When thousands of WebSockets close, what they held is not freed at once: each closed asyncio
transport sits in a reference cycle (it refers to itself through its bound read callback) that keeps
the protocol and its ASGI state until the collector's next full pass, which a large heap makes rare.
Once collected, Python frees every object they held, yet the process keeps its resident memory:

- glibc's ``malloc`` (objects over 512 bytes, buffers) keeps freed chunks for later and returns
  the top of its heap only; ``malloc_trim(0)`` gives back every free page.
- Python's small-object allocator (pymalloc) frees a 1 MiB arena only once all of its 64 pools are
  empty, and a burst's arenas never all empty again: a few objects allocated during the burst live
  on in most of them (a cached header, a timer, a database connection the pool opened). Measured
  after 2,000 idle WebSockets closed (``bench.overload``): the live objects were as many bytes as
  before the burst, but spread over 123 arenas instead of 70, with 2,875 empty pools (47 MB)
  resident. ``track_arenas`` (at start) and ``purge_pools`` (``atrium.observability._pools``, a
  small C extension) give back all but the first page of every empty pool, and the pages past
  the last live block of the others. An arena with half its pools or more free is parked: it
  leaves pymalloc's list of arenas with free pools (as when pymalloc takes its last one), its free
  pools leave its books and go entirely, first pages too; pymalloc brings it back when one of its
  pools in use empties, and unmaps it once all have.

``MemoryTrimmer`` runs a full collection, the pool purge, then ``malloc_trim`` (in a thread: it
walks the heap for a few milliseconds), when the load it watches (open WebSockets, requests in
flight and waiting) has fallen by ``drop`` or more since its peak and then held still for one check
(so a wave of closes is trimmed once, after it); a process under steady load never trims.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import sys
import time
from collections.abc import Callable

from core.clock import Clock

try:
    from atrium.observability import _pools
except ImportError:  # not built (a source tree without a compiler): only glibc's memory is trimmed
    _pools = None  # type: ignore[assignment]

log = logging.getLogger("atrium.memory")


def settle_the_heap() -> None:
    """Move everything built so far (modules, the schema, the app) out of the garbage collector's
    sight: a full collection then walks only what requests allocate, not the hundreds of thousands of
    objects that live as long as the process. Under load a full collection otherwise paused the
    event loop for tens of milliseconds at a time, which was most of a quiet tenant's p99 while
    another flooded (``bench.overload``: 100 ms without, 13-16 ms with); an import of 100,000 deals
    spent a tenth of its time in them (``bench.import_csv``). A server does it once it is built
    (``atrium.asgi``), ``atrium import`` before it runs the job. Objects frozen here are still
    freed by reference counting; only cycles among them would stay, and these live for good."""
    gc.collect()
    gc.freeze()

CHECK_EVERY = 2.0
"""Seconds between two looks at the load."""
DROP = 32
"""How far the load must fall from its peak for a trim."""


def malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


def pools_built() -> bool:
    """Whether the ``_pools`` extension was compiled (``pip install`` with a C compiler)."""
    return _pools is not None


def track_arenas() -> bool:
    """Have pymalloc's arenas mapped through ``atrium.observability._pools`` from now on, so that
    ``purge_pools`` can give back their empty pools; True if they are (CPython 3.10 to 3.13 with
    pymalloc, where the extension was built). Arenas mapped before stay untracked: call it once the
    process is built (``atrium.asgi``), when what lives for good is already allocated."""
    if _pools is None or not (3, 10) <= sys.version_info[:2] <= (3, 13):
        return False
    return _pools.install() > 0


def purge_pools() -> int:
    """Give back the pages of tracked arenas' empty pools (all but each pool's first, which holds its
    header; all of them in an arena half empty or more, which is parked) and, in pools in use, the
    pages past their last live block; the bytes given back. Runs
    with the GIL held (as pymalloc does): about 0.2 ms per arena, the event loop waiting."""
    if _pools is None:
        return 0
    _, _, _, given = _pools.purge()
    return given


class MemoryTrimmer:
    """Trims the heap after the load (``load()``) fell by ``drop`` from its peak; checks every ``every``
    seconds on ``clock``. ``trim`` is what trims (glibc's by default; nothing to do without one)."""

    def __init__(self, load: Callable[[], float], clock: Clock, *, every: float = CHECK_EVERY, drop: int = DROP,
                 trim: Callable[[], object] | None = None, purge: Callable[[], int] = purge_pools) -> None:
        self._load = load
        self._clock = clock
        self._every = every
        self._drop = drop
        self._trim = trim if trim is not None else malloc_trim()
        self._purge = purge
        self._peak = 0.0
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None
        self.trims = 0

    def start(self) -> None:
        if self._trim is not None and self._task is None:
            self._task = asyncio.create_task(self._run(), name="atrium-memory-trim")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> bool:
        """Trim now if the load fell far enough from its peak and is as it was at the last check; True
        when it trimmed."""
        load, last = self._load(), self._last
        self._last = load
        self._peak = max(self._peak, load)
        if self._trim is None or self._peak - load < self._drop or load != last:
            return False
        self._peak = load
        started = time.perf_counter()
        # Closed connections wait in reference cycles (asyncio's transports refer to themselves through
        # their bound callbacks) until a full collection, holding their protocol and ASGI state: a
        # collection first frees them, so that there is something to give back.
        collected = gc.collect()
        given = self._purge()  # here, not in the thread: pymalloc's pools are only touched under the GIL
        await asyncio.to_thread(self._trim)
        self.trims += 1
        log.info("memory trimmed after the load fell to %s: %d objects collected, %.1f MB of Python's free "
                 "pages given back, %.0f ms", load, collected, given / 1e6, (time.perf_counter() - started) * 1000)
        return True

    async def _run(self) -> None:
        while True:
            await self._clock.sleep_until(self._clock.time() + self._every)
            try:
                await self.check()
            except Exception:  # never let trimming end the task or the process
                log.exception("malloc_trim failed")
