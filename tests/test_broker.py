"""The broker, in process: the same tests against MemoryBroker and RedisBroker (real Redis).

Covers delivery on tenant-prefixed channels, one Redis subscription per channel whatever the number
of local subscribers, bounded queues (a slow subscriber gets OVERFLOW, a fast one everything),
publishing while Redis is away (no exception, counted), and reconnection after a Redis restart
(every subscriber gets GAP, then events flow again).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from resolvers.writes import InOrder
from subscriptions.broker import GAP, OVERFLOW, Broker, MemoryBroker, RedisBroker
from subscriptions.events import (
    ChangeEvent,
    ChangeKind,
    PresenceChanged,
    decode_event,
    encode_event,
    record_channel,
    scope_channel,
    type_channel,
)
from tests.live import WAIT, RedisServer, free_port


def event(tenant: uuid.UUID, *, entity: str = "Deal", record: uuid.UUID | None = None, version: int = 1,
          pipeline: uuid.UUID | None = None) -> ChangeEvent:
    return ChangeEvent(tenant_id=tenant, entity_type=entity, entity_id=record or uuid.uuid4(),
                       kind=ChangeKind.UPDATED, fields=("title",), actor_id=uuid.uuid4(), version=version,
                       occurred_at=dt.datetime.now(dt.UTC),
                       scope={"pipeline": str(pipeline)} if pipeline else {})


@contextlib.asynccontextmanager
async def started(request: pytest.FixtureRequest, maxsize: int) -> AsyncIterator[Broker]:
    """The broker ``request.param`` names, its subscriber queues holding ``maxsize`` items."""
    b: Broker
    if request.param == "memory":
        b = MemoryBroker(maxsize=maxsize)
    else:
        url: str = request.getfixturevalue("redis_url")
        b = RedisBroker(url, prefix=f"test-{uuid.uuid4().hex[:8]}:", maxsize=maxsize)
    await b.start()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    async with started(request, 8) as b:
        yield b


async def get(queue: asyncio.Queue[object]) -> object:
    return await asyncio.wait_for(queue.get(), WAIT)


def test_codec_round_trip() -> None:
    tenant = uuid.uuid4()
    change = event(tenant, pipeline=uuid.uuid4())
    change = ChangeEvent(**{**change.__dict__, "previous_scope": {"pipeline": str(uuid.uuid4())},
                            "detail": {"update": "AAA=", "origin": "x"}, "committed_at": dt.datetime.now(dt.UTC)})
    assert decode_event(encode_event(change)) == change
    presence = PresenceChanged(tenant, uuid.uuid4())
    assert decode_event(encode_event(presence)) == presence
    # A deal that moved between pipelines reaches the boards of both.
    assert scope_channel(tenant, "pipeline", change.previous_scope["pipeline"]) in change.channels()
    assert all(c.startswith(f"t:{tenant}:") for c in change.channels())


async def test_events_reach_their_channels_only(broker: Broker) -> None:
    tenant, other, record, pipeline = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    async with (broker.subscribe(record_channel(tenant, record)) as by_record,
                broker.subscribe(type_channel(tenant, "Deal")) as by_type,
                broker.subscribe(scope_channel(tenant, "pipeline", str(pipeline))) as by_pipeline,
                broker.subscribe(record_channel(other, record)) as other_tenant):
        first = event(tenant, record=record, pipeline=pipeline)
        await broker.publish(first)
        assert await get(by_record) == first
        assert await get(by_type) == first
        assert await get(by_pipeline) == first
        # The other tenant's subscriber of the same record id gets nothing: its own next event
        # arrives first, and nothing came before it.
        mine = event(other, record=record)
        await broker.publish(mine)
        assert await get(other_tenant) == mine
        assert other_tenant.empty()


async def test_publish_many_delivers_each_event_in_order(broker: Broker) -> None:
    """A bulk change's events (an import chunk) go out together and arrive one by one, in order."""
    tenant = uuid.uuid4()
    async with broker.subscribe(type_channel(tenant, "Deal")) as by_type:
        events = [event(tenant, record=uuid.uuid4()) for _ in range(5)]
        await broker.publish_many(events)
        assert [await get(by_type) for _ in events] == events
        assert broker.stats.published == 5


async def test_one_backend_subscription_per_channel(broker: Broker, request: pytest.FixtureRequest) -> None:
    tenant, record = uuid.uuid4(), uuid.uuid4()
    channel = record_channel(tenant, record)
    async with broker.subscribe(channel) as one, broker.subscribe(channel) as two:
        if isinstance(broker, RedisBroker):
            client = Redis.from_url(request.getfixturevalue("redis_url"), decode_responses=True)
            try:
                [(_, count)] = await client.pubsub_numsub(broker._prefix + channel)
                assert count == 1
            finally:
                await client.aclose()
        change = event(tenant, record=record)
        await broker.publish(change)
        assert await get(one) == change
        assert await get(two) == change
    if isinstance(broker, RedisBroker):
        assert broker.fanout.count() == 0


async def test_slow_subscriber_overflows_alone(broker: Broker) -> None:
    tenant, record = uuid.uuid4(), uuid.uuid4()
    channel = record_channel(tenant, record)
    received: list[object] = []
    async with broker.subscribe(channel) as slow, broker.subscribe(channel) as fast:
        for version in range(1, 21):  # 20 events, queues hold 8
            await broker.publish(event(tenant, record=record, version=version))
            while len(received) < version:  # the fast one keeps up
                received.append(await get(fast))
        assert [e.version for e in received if isinstance(e, ChangeEvent)] == list(range(1, 21))
        items = [slow.get_nowait() for _ in range(slow.qsize())]
        assert items[0] is OVERFLOW  # its backlog was replaced: it must stop and resynchronise
    assert broker.stats.overflows >= 1


async def test_publish_without_redis_does_not_raise() -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    await broker.start()
    try:
        await broker.publish(event(uuid.uuid4()))
        assert broker.stats.publish_failures == 1
    finally:
        await broker.close()


async def test_redis_restart_gives_gap_then_events_again(own_redis: RedisServer) -> None:
    broker = RedisBroker(own_redis.url, backoff_max=0.5)
    await broker.start()
    tenant, record = uuid.uuid4(), uuid.uuid4()
    try:
        async with broker.subscribe(record_channel(tenant, record)) as queue:
            before = event(tenant, record=record, version=1)
            await broker.publish(before)
            assert await get(queue) == before
            own_redis.stop()
            await broker.publish(event(tenant, record=record, version=2))  # lost, but no exception
            assert broker.stats.publish_failures == 1
            await own_redis.start()
            assert await get(queue) is GAP
            after = event(tenant, record=record, version=3)
            await broker.publish(after)
            assert await get(queue) == after
            assert broker.stats.reconnects >= 1
    finally:
        await broker.close()


@pytest.fixture(params=["memory", "redis"])
async def roomy_broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """A broker whose subscriber queues hold a whole test's events."""
    async with started(request, 100) as b:
        yield b


async def test_changes_submitted_in_order_are_published_in_order_without_waiting(roomy_broker: Broker) -> None:
    """``InOrder`` (an import's chunks): each change's events go out after the previous change's,
    slice by slice, while the submitter goes on; each stamped with the time its change was submitted
    (committed); ``drain`` returns once all are out."""
    broker = roomy_broker
    tenant = uuid.uuid4()
    changes = [[event(tenant, version=10 * c + i) for i in range(size)] for c, size in enumerate((25, 1, 12))]
    expected = [e.version for change in changes for e in change]
    seen: list[ChangeEvent] = []
    async with broker.subscribe(type_channel(tenant, "Deal")) as queue:
        async def collect() -> None:
            while len(seen) < len(expected):
                item = await get(queue)
                assert isinstance(item, ChangeEvent), item
                seen.append(item)

        collecting = asyncio.create_task(collect())
        publishing = InOrder(broker)
        stamps = []
        for change in changes:
            before = dt.datetime.now(dt.UTC)
            publishing.submit(change)  # returns at once: nothing is published before the next await
            stamps.append((before, dt.datetime.now(dt.UTC)))
        assert seen == []
        await publishing.drain()
        await asyncio.wait_for(collecting, WAIT)
    assert [e.version for e in seen] == expected
    offsets = [0, 25, 26, 38]
    for (before, after), start, end in zip(stamps, offsets, offsets[1:], strict=False):
        assert all(e.committed_at is not None and before <= e.committed_at <= after for e in seen[start:end])
