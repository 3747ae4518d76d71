"""The broker interface and the in-process backend.

Writers call ``publish`` after their transaction commits; subscribers hold a bounded queue per
subscription (``subscribe``), so a slow consumer cannot grow memory: when its queue is full it
receives ``OVERFLOW`` as its last item and must resynchronise.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, Protocol

from subscriptions.events import ChangeEvent

OVERFLOW: Final = object()
"""Put in a subscriber's queue (replacing its backlog) when it fell too far behind."""


class Broker(Protocol):
    async def publish(self, event: ChangeEvent) -> None:
        """Deliver ``event`` to every subscriber of its channels (never raises for delivery)."""
        ...

    def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[object]]:
        """An async context manager yielding the queue of a new subscription to ``channel``."""
        ...


class LocalFanout:
    """Fan-out to this process's subscribers with bounded queues (shared by every backend)."""

    def __init__(self, maxsize: int = 256) -> None:
        self._maxsize = maxsize
        self._subscribers: dict[str, set[asyncio.Queue[object]]] = {}

    def deliver(self, channel: str, item: object) -> None:
        for queue in tuple(self._subscribers.get(channel, ())):
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(OVERFLOW)

    def add(self, channel: str) -> tuple[asyncio.Queue[object], bool]:
        """A new queue on ``channel``, and whether it is the channel's first local subscriber."""
        queue: asyncio.Queue[object] = asyncio.Queue(self._maxsize)
        subscribers = self._subscribers.setdefault(channel, set())
        subscribers.add(queue)
        return queue, len(subscribers) == 1

    def remove(self, channel: str, queue: asyncio.Queue[object]) -> bool:
        """Drop ``queue``; True when ``channel`` has no local subscriber left."""
        subscribers = self._subscribers.get(channel)
        if subscribers is None:
            return False
        subscribers.discard(queue)
        if subscribers:
            return False
        del self._subscribers[channel]
        return True

    def count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())


class MemoryBroker:
    """Single-process broker: events reach subscribers of this process only."""

    def __init__(self, maxsize: int = 256) -> None:
        self.fanout = LocalFanout(maxsize)

    async def publish(self, event: ChangeEvent) -> None:
        for channel in event.channels():
            self.fanout.deliver(channel, event)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[object]]:
        queue, _ = self.fanout.add(channel)
        try:
            yield queue
        finally:
            self.fanout.remove(channel, queue)
