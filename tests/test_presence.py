"""Presence: the registries (in-process and Redis) and the ``presence`` subscription across processes.

A subscription joins its user as VIEWING; ``setPresence`` switches them to EDITING; leaving the
subscription or the connection removes them; and a process that dies without leaving is forgotten
once its entries expire (the next process to read the record, its heartbeat included, prunes them
and tells the subscribers). Expiry is driven by a ``ManualClock``: nothing waits for real seconds.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from core.clock import ManualClock
from models.tables import Role
from subscriptions.broker import Broker, MemoryBroker, RedisBroker
from subscriptions.events import PresenceChanged, presence_channel
from subscriptions.presence import PresenceState
from tests.conftest import TenantWorld, codes, gql
from tests.crm import gid, seed_crm, uuid_of
from tests.live import WAIT, AtriumProcess, live

MakeTenant = Callable[..., Awaitable[TenantWorld]]
PRESENCE = """
subscription($r: ID!) { presence(recordId: $r) { recordId users { state since user { id name } } } }"""
SET = "mutation($r: ID!, $s: PresenceState!) { setPresence(recordId: $r, state: $s) { users { state } } }"
CRASHED_TTL = 10.0
"""Presence TTL of the crashed process, on its ManualClock. Measured on the real clock it outlasts the
test, so that process A (the real clock) never prunes the entry first; and the ManualClock moved just
past it is still before the expiry of the entries A keeps refreshing (a 30 s TTL, refreshed every 10 s)."""


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    b: Broker
    if request.param == "memory":
        b = MemoryBroker()
    else:
        b = RedisBroker(request.getfixturevalue("redis_url"), prefix=f"test-{uuid.uuid4().hex[:8]}:")
    await b.start()
    try:
        yield b
    finally:
        await b.close()


async def test_join_state_and_leave(broker: Broker) -> None:
    tenant, record = uuid.uuid4(), uuid.uuid4()
    alice, bob = uuid.uuid4(), uuid.uuid4()
    presence = broker.presence
    async with broker.subscribe(presence_channel(tenant, record)) as changes:
        one = await presence.join(tenant, record, alice)
        assert await asyncio.wait_for(changes.get(), WAIT) == PresenceChanged(tenant, record)
        tab1 = await presence.join(tenant, record, bob)
        tab2 = await presence.join(tenant, record, bob)  # a second tab: still one entry
        assert [(e.user_id, e.state) for e in await presence.members(tenant, record)] == [
            (alice, PresenceState.VIEWING), (bob, PresenceState.VIEWING)]
        assert await presence.set_state(tenant, record, bob, PresenceState.EDITING)
        assert not await presence.set_state(tenant, record, uuid.uuid4(), PresenceState.EDITING)
        assert not await presence.set_state(uuid.uuid4(), record, bob, PresenceState.EDITING)  # other tenant
        await presence.leave(tenant, record, tab1)
        assert [(e.user_id, e.state) for e in await presence.members(tenant, record)] == [
            (alice, PresenceState.VIEWING), (bob, PresenceState.EDITING)]
        await presence.leave(tenant, record, tab2)
        await presence.leave(tenant, record, tab2)  # idempotent
        assert [e.user_id for e in await presence.members(tenant, record)] == [alice]
        await presence.join(tenant, record, bob)  # back: VIEWING again
        states = {e.user_id: e.state for e in await presence.members(tenant, record)}
        assert states == {alice: PresenceState.VIEWING, bob: PresenceState.VIEWING}
        await presence.leave(tenant, record, one)
        assert [e.user_id for e in await presence.members(tenant, record)] == [bob]
        assert await presence.members(uuid.uuid4(), record) == []


async def test_expired_entries_are_pruned_and_announced(redis_url: str) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    broker = RedisBroker(redis_url, prefix=prefix)
    await broker.start()
    client = Redis.from_url(redis_url, decode_responses=True)
    tenant, record, alice, ghost = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    try:
        async with broker.subscribe(presence_channel(tenant, record)) as changes:
            await broker.presence.join(tenant, record, alice)
            await asyncio.wait_for(changes.get(), WAIT)
            # What a crashed process leaves behind: a session nobody refreshes any more.
            past = time.time() - 60
            await client.hset(prefix + presence_channel(tenant, record),
                              mapping={"s:ghost": f"{ghost} {past} {past}", f"u:{ghost}": "EDITING"})
            assert [e.user_id for e in await broker.presence.members(tenant, record)] == [alice]
            assert await asyncio.wait_for(changes.get(), WAIT) == PresenceChanged(tenant, record)
            fields = await client.hkeys(prefix + presence_channel(tenant, record))
            assert not any(str(ghost) in f or f == "s:ghost" for f in fields)
    finally:
        await client.aclose()
        await broker.close()


def users(data: dict[str, Any]) -> list[tuple[str, str]]:
    return [(u["user"]["id"], u["state"]) for u in data["presence"]["users"]]


async def test_presence_across_processes(servers: tuple[AtriumProcess, AtriumProcess], redis_url: str,
                                         make_tenant: MakeTenant) -> None:
    a, b = servers
    tenant = await make_tenant("presence")
    alice, bob, carol = (gid("User", tenant.users[r]) for r in (Role.OWNER, Role.MEMBER, Role.ADMIN))
    async with b.client() as client:
        crm = await seed_crm(client, tenant.token())
        deal = crm.deal["id"]
        async with live(a.ws_url, tenant.token(Role.OWNER)) as on_a:
            watch = await on_a.subscribe(PRESENCE, {"r": deal})
            assert users(await on_a.data(watch)) == [(alice, "VIEWING")]

            async with live(b.ws_url, tenant.token(Role.MEMBER)) as on_b:
                bobs = await on_b.subscribe(PRESENCE, {"r": deal})
                assert users(await on_a.data(watch)) == [(alice, "VIEWING"), (bob, "VIEWING")]
                assert users(await on_b.data(bobs)) == [(alice, "VIEWING"), (bob, "VIEWING")]

                await gql(client, SET, {"r": deal, "s": "EDITING"}, token=tenant.token(Role.MEMBER))
                assert users(await on_a.data(watch)) == [(alice, "VIEWING"), (bob, "EDITING")]
                # Only someone present may set a state; a viewer may not claim to edit.
                body = await gql(client, SET, {"r": deal, "s": "VIEWING"}, token=tenant.token(Role.ADMIN))
                assert codes(body) == ["BAD_USER_INPUT"]
                body = await gql(client, SET, {"r": deal, "s": "EDITING"}, token=tenant.token(Role.VIEWER))
                assert codes(body) == ["FORBIDDEN"]
            # Bob's connection closed: he is gone.
            assert users(await on_a.data(watch)) == [(alice, "VIEWING")]

            # A process that dies without leaving: its entry expires, and the next process to read the
            # record prunes it and tells A. The crashed process and that reader (a process of the same
            # deployment: same Redis, same prefix) share a ManualClock, which alone decides the expiry.
            clock = ManualClock()
            crashed = RedisBroker(redis_url, prefix="atrium:", presence_ttl=CRASHED_TTL, clock=clock)  # no heartbeat
            reader = RedisBroker(redis_url, prefix="atrium:", clock=clock)
            redis = Redis.from_url(redis_url, decode_responses=True)
            key = "atrium:" + presence_channel(tenant.id, uuid_of(deal))
            try:
                await crashed.presence.join(tenant.id, uuid_of(deal), tenant.users[Role.ADMIN])
                assert users(await on_a.data(watch)) == [(alice, "VIEWING"), (carol, "VIEWING")]
                # Until the TTL has passed, reading the record keeps the entry.
                clock.advance(CRASHED_TTL - 1)
                assert [e.user_id for e in await reader.presence.members(tenant.id, uuid_of(deal))] == [
                    tenant.users[Role.OWNER], tenant.users[Role.ADMIN]]
                assert str(tenant.users[Role.ADMIN]) in str(await redis.hgetall(key))
                # Past it, the read prunes the entry and publishes PresenceChanged, which A's subscribers get.
                clock.advance(2)
                assert [e.user_id for e in await reader.presence.members(tenant.id, uuid_of(deal))] == [
                    tenant.users[Role.OWNER]]
                assert str(tenant.users[Role.ADMIN]) not in str(await redis.hgetall(key))
                assert users(await on_a.data(watch)) == [(alice, "VIEWING")]
            finally:
                await redis.aclose()
                await reader.close()
                await crashed.close()
