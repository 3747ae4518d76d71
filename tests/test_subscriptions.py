"""Subscriptions end to end: two Atrium processes (A and B) sharing one database and one Redis.

A change made through B reaches subscribers on A; a tenant never receives another tenant's events
nor may subscribe to its ids; WebSocket credentials are checked at connection_init (4403) and on
expiry (4401, against an in-process server whose clock the test moves); pipeline totals are
coalesced; a slow consumer is cut off alone; a Redis restart costs subscribers a GAP, never a
failed query or mutation. Every wait is on a message, with a timeout; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import random
import socket
import string
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from pycrdt import Doc, Text
from websockets.asyncio.client import connect

from models.tables import Role
from resolvers.live import SUMMARY_WINDOW
from tests.conftest import TenantWorld, gql
from tests.crm import create_activity, create_deal, create_pipeline, gid, seed_crm
from tests.live import (
    WAIT,
    AtriumProcess,
    InProcessAtrium,
    Live,
    RedisServer,
    close_code,
    error_codes,
    graphql,
    live,
    start_atrium,
    token_expiry,
)

MakeTenant = Callable[..., Awaitable[TenantWorld]]
Servers = tuple[AtriumProcess, AtriumProcess]

RECORD = """
subscription($id: ID!) {
  recordChanged(id: $id) {
    __typename
    ... on Resync { reason }
    ... on RecordChange {
      kind recordId recordType changedFields version timestamp actor { id }
      record { id ... on Deal { title stage { id } } }
    }
  }
}"""
BOARD = """
subscription($p: ID!) {
  dealBoard(pipelineId: $p) {
    __typename
    ... on Resync { reason }
    ... on DealChange { kind recordId changedFields version record { id title stage { id } } }
  }
}"""
FEED = """
subscription {
  activityFeed {
    __typename
    ... on Resync { reason }
    ... on ActivityChange { kind recordId record { id subject } }
  }
}"""
SUMMARY = "subscription($p: ID!) { pipelineSummary(pipelineId: $p) { totals { stage { id } currency count total } } }"
NOTE_UPDATES = """
subscription($n: ID!) {
  noteUpdates(noteId: $n) { __typename ... on Resync { reason } ... on NoteUpdate { update } }
}"""
MOVE = "mutation($id: ID!, $stageId: ID!) { moveDeal(id: $id, stageId: $stageId) { id version } }"
RENAME = "mutation($id: ID!, $title: String!) { updateDeal(id: $id, input: {title: $title}) { id version } }"
DELETE = "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }"
CREATE_NOTE = "mutation($d: ID!) { createNote(input: {dealId: $d}) { id } }"
APPLY = "mutation($n: ID!, $u: Base64!) { applyNoteUpdate(noteId: $n, update: $u) { version } }"


def field(data: dict[str, Any]) -> dict[str, Any]:
    """The one root field of a subscription result."""
    [value] = data.values()
    return value  # type: ignore[no-any-return]


async def test_change_made_through_b_reaches_subscribers_on_a(servers: Servers, make_tenant: MakeTenant) -> None:
    a, b = servers
    tenant = await make_tenant("live")
    token = tenant.token(Role.MEMBER)
    async with b.client() as client:
        crm = await seed_crm(client, token)
        deal, target = crm.deal["id"], crm.pipeline["stages"][1]["id"]
        async with live(a.ws_url, token) as one, live(a.ws_url, tenant.token(Role.VIEWER)) as two:
            record = await one.live(RECORD, {"id": deal})
            board = await one.live(BOARD, {"p": crm.pipeline["id"]})
            same = await two.live(RECORD, {"id": deal})  # another role: its own execution
            again = await one.live(RECORD, {"id": deal})  # joins the running execution of `record`
            before = time.time()
            moved = (await graphql(client, token, MOVE, id=deal, stageId=target))["moveDeal"]

            change = field(await one.data(record))
            assert change["__typename"] == "RecordChange"
            assert change["kind"] == "UPDATED" and change["recordId"] == deal and change["recordType"] == "Deal"
            assert change["changedFields"] == ["stageId"] and change["version"] == moved["version"] == 2
            assert change["actor"] == {"id": gid("User", tenant.users[Role.MEMBER])}
            assert change["record"] == {"id": deal, "title": crm.deal["title"], "stage": {"id": target}}
            assert abs(dt.datetime.fromisoformat(change["timestamp"]).timestamp() - before) < 30
            assert field(await two.data(same)) == change
            assert field(await one.data(again)) == change
            on_board = field(await one.data(board))
            assert on_board["kind"] == "UPDATED" and on_board["record"]["stage"] == {"id": target}


async def test_boards_see_deals_move_between_pipelines_and_go(servers: Servers, make_tenant: MakeTenant) -> None:
    a, b = servers
    tenant = await make_tenant("board")
    token = tenant.token()
    async with b.client() as client:
        crm = await seed_crm(client, token)
        other = await create_pipeline(client, token, name="Other")
        deal = crm.deal["id"]
        async with live(a.ws_url, token) as sub:
            old_board = await sub.live(BOARD, {"p": crm.pipeline["id"]})
            new_board = await sub.live(BOARD, {"p": other["id"]})
            await graphql(client, token, MOVE, id=deal, stageId=other["stages"][0]["id"])
            left, arrived = field(await sub.data(old_board)), field(await sub.data(new_board))
            assert left == arrived
            assert left["record"]["stage"] == {"id": other["stages"][0]["id"]}
            assert set(left["changedFields"]) == {"stageId", "pipelineId"}
            created = await create_deal(client, token, other["stages"][1]["id"])
            assert field(await sub.data(new_board))["kind"] == "CREATED"
            await graphql(client, token, DELETE, id=created["id"])
            gone = field(await sub.data(new_board))
            assert gone["kind"] == "DELETED" and gone["recordId"] == created["id"] and gone["record"] is None
            assert sub.queues[old_board].empty()


async def test_tenants_see_only_their_own_events(servers: Servers, make_tenant: MakeTenant) -> None:
    a, b = servers
    alpha, bravo = await make_tenant("alpha"), await make_tenant("bravo")
    async with b.client() as client:
        crm_a = await seed_crm(client, alpha.token())
        crm_b = await seed_crm(client, bravo.token())
        note_a = (await graphql(client, alpha.token(), CREATE_NOTE, d=crm_a.deal["id"]))["createNote"]["id"]
        async with live(a.ws_url, bravo.token()) as sub:
            feed = await sub.live(FEED)
            # Subscribing to alpha's records and pipeline by id: NOT_FOUND, exactly as a query.
            for query, variables in ((RECORD, {"id": crm_a.deal["id"]}), (RECORD, {"id": crm_a.company["id"]}),
                                     (BOARD, {"p": crm_a.pipeline["id"]}), (SUMMARY, {"p": crm_a.pipeline["id"]}),
                                     (NOTE_UPDATES, {"n": note_a}),
                                     ("subscription($r: ID!) { presence(recordId: $r) { users { state } } }",
                                      {"r": crm_a.deal["id"]})):
                op = await sub.subscribe(query, variables)
                assert error_codes(await sub.message(op)) == ["NOT_FOUND"], query
            # Alpha's activity first, then bravo's: bravo's feed gets bravo's only.
            await create_activity(client, alpha.token(), deal_id=crm_a.deal["id"], subject="alpha's")
            mine = await create_activity(client, bravo.token(), deal_id=crm_b.deal["id"], subject="bravo's")
            event = field(await sub.data(feed))
            assert event == {"__typename": "ActivityChange", "kind": "CREATED", "recordId": mine["id"],
                             "record": {"id": mine["id"], "subject": "bravo's"}}


async def test_websocket_credentials(servers: Servers, make_tenant: MakeTenant) -> None:
    a, _ = servers
    tenant = await make_tenant("wsauth")
    # Rejected at connection_init, before any operation: 4403 (Strawberry's ConnectionRejectionError).
    assert await close_code(a.ws_url, {}) == 4403
    assert await close_code(a.ws_url, {"authorization": "Bearer not-a-token"}) == 4403
    assert await close_code(a.ws_url, {"authorization": "Basic dXNlcjpwdw=="}) == 4403
    assert await close_code(a.ws_url, {"authorization": f"Bearer {tenant.token(ttl_seconds=-5)}"}) == 4403
    # Subscribing before the connection is acknowledged: 4401.
    early = {"id": "1", "type": "subscribe", "payload": {"query": "subscription { activityFeed { __typename } }"}}
    assert await close_code(a.ws_url, None, first=early) == 4401


async def test_token_expiry_closes_with_4401(clocked_server: InProcessAtrium, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("expiry")
    token = tenant.token(ttl_seconds=600)
    clock = clocked_server.clock
    session = await Live.connect(clocked_server.ws_url, token)
    try:
        await session.live(FEED)
        # A second before the token's expiry the connection still serves operations...
        clock.advance(token_expiry(token) - clock.time() - 1)
        op = await session.subscribe("{ me { id } }")
        assert await session.data(op) == {"me": {"id": gid("User", tenant.users[Role.OWNER])}}
        assert not session.closed.is_set()
        # ... and once its expiry has passed the server closes it: 4401, the client re-authenticates.
        clock.advance(2)
        await asyncio.wait_for(session.closed.wait(), WAIT)
        assert session.ws.close_code == 4401
    finally:
        await session.close()


async def test_queries_and_mutations_run_over_the_websocket(servers: Servers, make_tenant: MakeTenant) -> None:
    a, _ = servers
    tenant = await make_tenant("wsops")
    async with live(a.ws_url, tenant.token()) as sub:
        op = await sub.subscribe("{ me { id } }")
        assert await sub.data(op) == {"me": {"id": gid("User", tenant.users[Role.OWNER])}}
        assert (await sub.message(op))["type"] == "complete"
        op = await sub.subscribe('mutation { createCompany(input: {name: "Over WS"}) { name } }')
        assert await sub.data(op) == {"createCompany": {"name": "Over WS"}}


async def test_pipeline_summary_is_coalesced(servers: Servers, make_tenant: MakeTenant) -> None:
    """A burst of changes is summed up at most once per ``SUMMARY_WINDOW``, and every result is a whole,
    true state: no assumption on how many results a given machine produces."""
    a, b = servers
    tenant = await make_tenant("summary")
    token = tenant.token()
    async with b.client() as client:
        pipeline = await create_pipeline(client, token, stages=("Open", "Closing"))
        first, second = (s["id"] for s in pipeline["stages"])
        deals = [await create_deal(client, token, first, amount="10.00") for _ in range(20)]
        async with live(a.ws_url, token) as sub:
            op = await sub.subscribe(SUMMARY, {"p": pipeline["id"]})
            initial = field(await sub.data(op))["totals"]
            assert initial == [{"stage": {"id": first}, "currency": "USD", "count": 20, "total": "200.00"}]
            started = time.monotonic()
            await asyncio.gather(*(graphql(client, token, MOVE, id=d["id"], stageId=second) for d in deals))
            final = [{"stage": {"id": second}, "currency": "USD", "count": 20, "total": "200.00"}]
            results = [field(await sub.data(op))["totals"]]
            while results[-1] != final:  # the last result reflects every move
                results.append(field(await sub.data(op))["totals"])
            elapsed = time.monotonic() - started

            # Every result is a full state: all 20 deals, 10.00 each, in the pipeline's stages, and each
            # one at least as far along as the one before it (moves only go from Open to Closing).
            closing = []
            for totals in results:
                assert {t["stage"]["id"] for t in totals} <= {first, second}, totals
                assert sum(t["count"] for t in totals) == len(deals), totals
                assert all(t["currency"] == "USD" and Decimal(t["total"]) == 10 * t["count"] for t in totals)
                closing.append(sum(t["count"] for t in totals if t["stage"]["id"] == second))
            assert closing == sorted(closing), closing
            # Coalescing: a recomputation waits a whole window after the change that woke it, and the
            # next one waits for a change after that, so the results since the burst began span at least
            # as many windows (less 5 ms of timer granularity each), however slow the machine. One more may
            # come at once: an OVERFLOW (more changes queued during a recomputation than the subscriber
            # queue holds: 16, LIVE_ENV) is recomputed without waiting. So 20 changes arriving within a
            # window or two give a result or three, not 20; only a burst spread over more windows may give
            # more results, and that is allowed.
            assert len(results) <= elapsed / (SUMMARY_WINDOW - 0.005) + 1, (len(results), elapsed)
            queried = await graphql(client, token, "query($p: ID!) { pipelineSummary(pipelineId: $p) "
                                                   "{ stage { id } currency count total } }", p=pipeline["id"])
            assert queried["pipelineSummary"] == final


def slow_socket() -> socket.socket:
    """A client socket with a tiny receive buffer, so that not reading soon stalls the sender."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def test_slow_consumer_is_cut_off_while_others_keep_receiving(servers: Servers,
                                                                   make_tenant: MakeTenant) -> None:
    a, b = servers
    tenant = await make_tenant("slow")
    token = tenant.token()
    rng = random.Random(7)
    # ~670 KB per event: a few fill the kernel's socket buffers (loopback autotunes them to ~4 MB),
    # 16 more the subscriber's queue (tests.live.LIVE_ENV); the rest overflow it.
    updates = 40
    async with b.client() as client:
        crm = await seed_crm(client, token)
        note = (await graphql(client, token, CREATE_NOTE, d=crm.deal["id"]))["createNote"]["id"]
        sock = slow_socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", a.port))
        async with (connect(a.ws_url, sock=sock, subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                            compression=None, max_queue=1, max_size=None) as slow,
                    live(a.ws_url, token, max_size=None) as fast):
            await slow.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            assert json.loads(await slow.recv())["type"] == "connection_ack"
            await slow.send(json.dumps({"id": "s", "type": "subscribe",
                                        "payload": {"query": NOTE_UPDATES, "variables": {"n": note}}}))
            assert "Resync" in await slow.recv()  # live; from now on `slow` reads nothing
            op = await fast.live(NOTE_UPDATES, {"n": note})

            doc: Doc[Any] = Doc()
            body = doc.get("body", type=Text)
            for _ in range(updates):
                state = doc.get_state()
                del body[0:len(body)]
                body += "".join(rng.choices(string.ascii_letters, k=500_000))
                update = doc.get_update(state)
                await graphql(client, token, APPLY, n=note, u=base64.b64encode(update).decode())
                assert field(await fast.data(op))["__typename"] == "NoteUpdate"  # the fast one keeps up

            # The slow one, reading again, finds what fit in its buffers, then its end.
            received, last = 0, None
            while True:
                message = json.loads(await asyncio.wait_for(slow.recv(), WAIT))
                if message["type"] != "next":
                    last = message
                    break
                received += 1
            assert last is not None and last["type"] == "error"
            assert error_codes(last) == ["SUBSCRIBER_TOO_SLOW"]
            assert received < updates, received

            # ... while the fast one goes on receiving.
            state = doc.get_state()
            body += "!"
            await graphql(client, token, APPLY, n=note, u=base64.b64encode(doc.get_update(state)).decode())
            assert field(await fast.data(op))["__typename"] == "NoteUpdate"


async def test_redis_restart_mid_stream(own_redis: RedisServer, database_url: str, make_tenant: MakeTenant) -> None:
    a = await start_atrium(database_url, own_redis.url)
    b = await start_atrium(database_url, own_redis.url)
    try:
        tenant = await make_tenant("restart")
        token = tenant.token()
        async with a.client() as client_a, b.client() as client_b:
            crm = await seed_crm(client_b, token)
            deal = crm.deal["id"]
            async with live(a.ws_url, token) as sub:
                op = await sub.live(RECORD, {"id": deal})
                await graphql(client_b, token, RENAME, id=deal, title="before")
                assert field(await sub.data(op))["version"] == 2

                own_redis.stop()
                # Queries and mutations keep working without Redis (the event is lost, not the write).
                renamed = await graphql(client_b, token, RENAME, id=deal, title="during")
                assert renamed["updateDeal"]["version"] == 3
                read = await graphql(client_a, token, "query($id: ID!) { deal(id: $id) { title } }", id=deal)
                assert read == {"deal": {"title": "during"}}

                await own_redis.start()
                gap = field(await sub.data(op))
                assert gap == {"__typename": "Resync", "reason": "GAP"}
                await graphql(client_b, token, RENAME, id=deal, title="after")
                after = field(await sub.data(op))
                assert after["version"] == 4 and after["record"]["title"] == "after"
        assert "publish to Redis failed" in b.log.read_text()
    finally:
        a.stop()
        b.stop()


async def test_viewers_may_subscribe(servers: Servers, make_tenant: MakeTenant) -> None:
    a, b = servers
    tenant = await make_tenant("viewer")
    async with b.client() as client:
        crm = await seed_crm(client, tenant.token())
        async with live(a.ws_url, tenant.token(Role.VIEWER)) as sub:
            op = await sub.live(RECORD, {"id": crm.company["id"]})
            body = await gql(client, 'mutation($id: ID!) { updateCompany(id: $id, input: {name: "Renamed"}) '
                                     "{ name } }", {"id": crm.company["id"]}, token=tenant.token())
            assert body["data"]["updateCompany"]["name"] == "Renamed"
            change = field(await sub.data(op))
            assert change["changedFields"] == ["name"] and change["record"] == {"id": crm.company["id"]}
