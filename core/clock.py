"""Time, injectable: the server reads the wall clock and waits for deadlines only through a ``Clock``.

``SYSTEM_CLOCK`` is the real one. Tests pass a ``ManualClock`` to ``create_app`` and move time
forward themselves, so token expiry and presence timeouts are tested without waiting real seconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (UTC)."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Return once ``time()`` has reached ``deadline`` (at once if it has)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    async def sleep_until(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))


SYSTEM_CLOCK = SystemClock()


def next_round(deadline: float, interval: float, now: float) -> float:
    """The first of ``deadline + interval``, ``deadline + 2 * interval``, … that is still ahead of
    ``now``: when a periodic job fell behind (the process was suspended, the clock moved on by days),
    it runs once and keeps its rhythm rather than running once for every round it missed."""
    missed = max(0, math.floor((now - deadline) / interval))
    following = deadline + (missed + 1) * interval
    return following if following > now else following + interval


class ManualClock:
    """A clock that moves only when ``advance`` is called; sleepers wake when their deadline passes."""

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._order), waiter))
        await waiter

    def advance(self, seconds: float) -> None:
        """Move time forward and wake every sleeper whose deadline is now reached."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, waiter = heapq.heappop(self._sleepers)
            if not waiter.done():
                waiter.set_result(None)
