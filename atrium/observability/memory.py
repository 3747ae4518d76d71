"""Handing freed memory back to the system once load has dropped.

When thousands of WebSockets close, what they held is not freed at once: each closed asyncio
transport sits in a reference cycle (it refers to itself through its bound read callback) that keeps
the protocol and its ASGI state until the collector's next full pass, which a large heap makes rare.
Once collected, Python frees every object they held (``tracemalloc`` finds nothing of them left),
yet the process keeps its resident memory: glibc's ``malloc`` keeps freed chunks for later, and
returns the top of its heap only. ``malloc_trim(0)`` gives back every free page.

``MemoryTrimmer`` runs a full collection, then ``malloc_trim`` (in a thread: it walks the heap for a
few milliseconds), when the load it watches (open WebSockets, requests in flight and waiting) has
fallen by ``drop`` or more since its peak and then held still for one check (so a wave of closes is
trimmed once, after it); a process under steady load never trims.

Memory that Python's own small-object allocator keeps (a 1 MiB arena stays while one object in it
lives) is not glibc's to give back; ``PYTHONMALLOC=malloc`` puts those objects under glibc too
(README, "Overload").
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

from core.clock import Clock

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


class MemoryTrimmer:
    """Trims the heap after the load (``load()``) fell by ``drop`` from its peak; checks every ``every``
    seconds on ``clock``. ``trim`` is what trims (glibc's by default; nothing to do without one)."""

    def __init__(self, load: Callable[[], float], clock: Clock, *, every: float = CHECK_EVERY, drop: int = DROP,
                 trim: Callable[[], object] | None = None) -> None:
        self._load = load
        self._clock = clock
        self._every = every
        self._drop = drop
        self._trim = trim if trim is not None else malloc_trim()
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
        await asyncio.to_thread(self._trim)
        self.trims += 1
        log.info("memory trimmed after the load fell to %s: %d objects collected, %.0f ms",
                 load, collected, (time.perf_counter() - started) * 1000)
        return True

    async def _run(self) -> None:
        while True:
            await self._clock.sleep_until(self._clock.time() + self._every)
            try:
                await self.check()
            except Exception:  # never let trimming end the task or the process
                log.exception("malloc_trim failed")
