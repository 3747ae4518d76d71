"""The broker interface and its two backends: in-process (``MemoryBroker``) and Redis (``RedisBroker``).

Writers call ``publish`` after their transaction commits. A subscriber holds one bounded queue per
subscription (``subscribe``), filled with ``put_nowait`` only, so a slow consumer can neither stall
the others nor grow memory: when its queue is full the backlog is replaced by ``OVERFLOW``, on
which the subscriber must stop. After the Redis connection was lost and re-established, every
subscriber of every channel receives ``GAP`` once the channel is subscribed again: events published
meanwhile are lost (Redis pub/sub is at-most-once) and the subscriber must refetch.

Queue items are therefore: an ``Event`` (``subscriptions.events``), ``GAP`` or ``OVERFLOW``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Final, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import RedisError

from core.clock import SYSTEM_CLOCK, Clock
from subscriptions.events import Event, decode_event, encode_event
from subscriptions.presence import MemoryPresence, Presence, RedisPresence

log = logging.getLogger("atrium.broker")

PIPELINE_EVENTS = 500
"""Events sent to Redis per round trip by ``publish_many``."""
PUBLISH_ALL = """
for i = 1, #ARGV, 2 do
    redis.call('PUBLISH', ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""
"""Publishes each (channel, message) pair of its arguments, in order: one command and one reply for
a batch of events, where a pipeline of PUBLISH commands has a reply per channel for the client to
read (three per record: a bulk change of 1,000 records spent more time reading replies than
anything else it did in Python)."""


class Marker:
    """A sentinel queue item (``GAP``, ``OVERFLOW``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


OVERFLOW: Final = Marker("OVERFLOW")
"""Replaces a subscriber's backlog when it fell too far behind; the subscriber must stop there."""
GAP: Final = Marker("GAP")
"""Put in every subscriber's queue after the broker lost and regained its Redis subscription."""


@dataclass
class BrokerStats:
    """Counters for logs and metrics (per process)."""

    published: int = 0
    publish_failures: int = 0
    received: int = 0
    reconnects: int = 0
    overflows: int = 0


class Broker(Protocol):
    presence: Presence
    stats: BrokerStats

    async def start(self) -> None:
        """Start background work (the Redis reader); returns without waiting for Redis."""
        ...

    async def close(self) -> None:
        """Stop background work and release connections."""
        ...

    async def publish(self, event: Event) -> None:
        """Deliver ``event`` to every subscriber of its channels; never raises for delivery."""
        ...

    async def publish_many(self, events: Sequence[Event]) -> None:
        """``publish`` each of ``events``, in order, in as few round trips as the backend allows (one
        Redis pipeline: a bulk change of thousands of records); never raises for delivery."""
        ...

    def subscribe(self, channel: str) -> AbstractAsyncContextManager[asyncio.Queue[object]]:
        """An async context manager yielding the queue of a new subscription to ``channel``.

        The queue is live when the context is entered: every event published afterwards arrives.
        """
        ...


class LocalFanout:
    """Fan-out to this process's subscribers with bounded queues (shared by every backend)."""

    def __init__(self, maxsize: int = 256, stats: BrokerStats | None = None) -> None:
        self._maxsize = maxsize
        self._subscribers: dict[str, set[asyncio.Queue[object]]] = {}
        self._stats = stats or BrokerStats()

    def deliver(self, channel: str, item: object) -> None:
        for queue in tuple(self._subscribers.get(channel, ())):
            self._put(queue, item)

    def _put(self, queue: asyncio.Queue[object], item: object) -> None:
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(OVERFLOW)
            self._stats.overflows += 1

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

    def channels(self) -> list[str]:
        """Channels with at least one local subscriber."""
        return list(self._subscribers)

    def count(self) -> int:
        return sum(len(s) for s in self._subscribers.values())


class MemoryBroker:
    """Single-process broker: events reach subscribers of this process only."""

    def __init__(self, maxsize: int = 256, clock: Clock = SYSTEM_CLOCK) -> None:
        self.stats = BrokerStats()
        self.fanout = LocalFanout(maxsize, self.stats)
        self.presence: Presence = MemoryPresence(self.publish, clock)

    async def start(self) -> None:
        await self.presence.start()

    async def close(self) -> None:
        await self.presence.close()

    async def publish(self, event: Event) -> None:
        self.stats.published += 1
        for channel in event.channels():
            self.fanout.deliver(channel, event)

    async def publish_many(self, events: Sequence[Event]) -> None:
        for event in events:
            await self.publish(event)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[object]]:
        queue, _ = self.fanout.add(channel)
        try:
            yield queue
        finally:
            self.fanout.remove(channel, queue)


class RedisBroker:
    """Fan-out across processes through Redis pub/sub.

    One PubSub connection and one reader task per process; a channel is SUBSCRIBEd on Redis while
    it has at least one local subscriber (reference-counted through ``LocalFanout``), and each
    message is decoded once and then fanned out locally.

    Failure model: ``publish`` logs and counts a failure (``stats.publish_failures``) and returns,
    so a committed mutation never fails because Redis is away. The reader reconnects with capped
    exponential backoff (``backoff_min`` doubling up to ``backoff_max`` seconds), re-subscribes every
    channel, and puts ``GAP`` in each subscriber's queue once its channel's SUBSCRIBE is confirmed.
    ``subscribe`` returns only once Redis confirmed the channel's subscription (so it waits while
    Redis is down).
    """

    def __init__(self, url: str, *, prefix: str = "", maxsize: int = 256, presence_ttl: float = 30.0,
                 backoff_min: float = 0.1, backoff_max: float = 5.0, clock: Clock = SYSTEM_CLOCK) -> None:
        self.stats = BrokerStats()
        self._prefix = prefix  # of every Redis channel and key (``Settings.redis_prefix``)
        self.fanout = LocalFanout(maxsize, self.stats)
        # Commands (publish, presence): few quick retries, short timeouts, so a Redis outage costs a
        # mutation milliseconds, not seconds.
        self._client: Redis = Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=1.0, socket_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1),
        )
        # The subscription connection: no retries of its own; the reader owns reconnection and GAPs.
        self._sub_client: Redis = Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=1.0, socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._publish_all = self._client.register_script(PUBLISH_ALL)
        self.presence: Presence = RedisPresence(self._client, self.publish, presence_ttl, prefix=prefix, clock=clock)
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._lock = asyncio.Lock()  # orders SUBSCRIBE/UNSUBSCRIBE with the bookkeeping and reconnects
        self._pubsub: PubSub | None = None
        self._confirmed: dict[str, asyncio.Event] = {}
        self._gap_pending: set[str] = set()
        self._reader: asyncio.Task[None] | None = None

    @property
    def commands(self) -> Redis:
        """The client of publishes and presence (what tracing instruments; the subscription
        connection is the reader's own)."""
        return self._client

    async def start(self) -> None:
        if self._reader is None:
            self._reader = asyncio.create_task(self._run(), name="atrium-redis-broker")
        await self.presence.start()

    async def close(self) -> None:
        await self.presence.close()
        task, self._reader = self._reader, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._drop_connection()
        await self._client.aclose()
        await self._sub_client.aclose()

    async def publish(self, event: Event) -> None:
        await self.publish_many((event,))

    async def publish_many(self, events: Sequence[Event]) -> None:
        for start in range(0, len(events), PIPELINE_EVENTS):
            batch = events[start:start + PIPELINE_EVENTS]
            pairs: list[str] = []
            for event in batch:
                data = encode_event(event)
                for channel in event.channels():
                    pairs += (self._prefix + channel, data)
            try:
                await self._publish_all(args=pairs)
            except (RedisError, OSError) as exc:
                self.stats.publish_failures += len(batch)
                log.warning("publish to Redis failed (%d so far): %s", self.stats.publish_failures, exc)
            else:
                self.stats.published += len(batch)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[asyncio.Queue[object]]:
        async with self._lock:
            queue, first = self.fanout.add(channel)
            if first:
                confirmed = self._confirmed[channel] = asyncio.Event()
                if self._pubsub is not None:
                    try:
                        await self._pubsub.subscribe(self._prefix + channel)
                    except (RedisError, OSError) as exc:  # the reader reconnects and re-subscribes
                        log.warning("SUBSCRIBE %s failed: %s", channel, exc)
            else:
                confirmed = self._confirmed[channel]
        try:
            await confirmed.wait()
            yield queue
        finally:
            async with self._lock:
                if self.fanout.remove(channel, queue):
                    self._confirmed.pop(channel, None)
                    self._gap_pending.discard(channel)
                    if self._pubsub is not None:
                        try:
                            await self._pubsub.unsubscribe(self._prefix + channel)
                        except (RedisError, OSError) as exc:
                            log.warning("UNSUBSCRIBE %s failed: %s", channel, exc)

    async def _run(self) -> None:
        delay = self._backoff_min
        connected_before = False
        while True:
            try:
                pubsub = await self._connect(resubscribe=connected_before)
                if connected_before:
                    self.stats.reconnects += 1
                    log.info("Redis subscription connection re-established")
                connected_before = True
                delay = self._backoff_min
                await self._read(pubsub)
            except (RedisError, OSError) as exc:
                log.warning("Redis subscription connection lost: %s (retrying in %.1fs)", exc, delay)
            await self._drop_connection()
            await asyncio.sleep(delay)  # capped exponential backoff between reconnection attempts
            delay = min(delay * 2, self._backoff_max)

    async def _connect(self, *, resubscribe: bool) -> PubSub:
        async with self._lock:
            pubsub = self._sub_client.pubsub()
            try:
                await pubsub.connect()  # type: ignore[no-untyped-call]
                channels = self.fanout.channels()
                if resubscribe:
                    self._gap_pending = set(channels)
                if channels:
                    await pubsub.subscribe(*(self._prefix + c for c in channels))
            except BaseException:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                raise
            self._pubsub = pubsub
            return pubsub

    async def _drop_connection(self) -> None:
        async with self._lock:
            pubsub, self._pubsub = self._pubsub, None
            for confirmed in self._confirmed.values():
                confirmed.clear()
        if pubsub is not None:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _read(self, pubsub: PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind, channel = message["type"], str(message["channel"]).removeprefix(self._prefix)
            if kind == "message":
                self.stats.received += 1
                try:
                    event = decode_event(message["data"])
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("ignoring undecodable message on %s: %s", channel, exc)
                    continue
                self.fanout.deliver(channel, event)
            elif kind == "subscribe":
                if (confirmed := self._confirmed.get(channel)) is not None:
                    confirmed.set()
                if channel in self._gap_pending:
                    self._gap_pending.discard(channel)
                    self.fanout.deliver(channel, GAP)


def create_broker(redis_url: str | None, *, prefix: str = "", maxsize: int = 256,
                  presence_ttl: float = 30.0, clock: Clock = SYSTEM_CLOCK) -> Broker:
    """``RedisBroker`` when a Redis URL is configured, else ``MemoryBroker`` (single process)."""
    if redis_url:
        return RedisBroker(redis_url, prefix=prefix, maxsize=maxsize, presence_ttl=presence_ttl, clock=clock)
    return MemoryBroker(maxsize, clock)
