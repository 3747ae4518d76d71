"""Outages answer in GraphQL (issue 10, point 1), against a PostgreSQL cluster of the tests' own.

While PostgreSQL is down, restarting, or drops a connection under a statement, every request that
needs it is answered 503 SERVICE_UNAVAILABLE in JSON with ``Retry-After`` and its request id: the
membership check before execution, a planned read, a resolver, a write, an API key, a login; over
WebSocket, an error message with the code (and ``connection_init`` closes with 1013). Connections
the server ended are discarded, never reused: the first request after PostgreSQL accepts
connections again is served. A Redis outage fails only what needs Redis.

The apps run in this process (``httpx.ASGITransport`` re-raises whatever escapes an app, so a
failure that would reach Starlette's text/plain 500 fails the test), with production settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import struct
import termios
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import text
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from atrium.app import create_app
from core.clock import ManualClock
from core.errors import ServiceUnavailable
from core.settings import Settings, app_role_url
from models.db import Databases, TenantScope
from tests.cluster import PostgresCluster, running_cluster
from tests.live import Live, RedisServer, serve_in_process
from tests.outages import World, assert_unavailable, outage_world

pytestmark = pytest.mark.faults

WAIT = 15.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with running_cluster("atrium-outages-") as server:
        yield server


@pytest.fixture(scope="module")
async def world(cluster: PostgresCluster) -> World:
    return await outage_world(cluster)


@pytest.fixture
async def postgres(world: World) -> AsyncIterator[PostgresCluster]:
    """The cluster, running when the test starts and again when it ends (whatever the test did)."""
    await world.cluster.accepting()
    try:
        yield world.cluster
    finally:
        if not (world.cluster.data / "postmaster.pid").exists():
            await world.cluster.start()
        await world.cluster.accepting()


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    app = create_app(settings)
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client):
        yield app, client


async def post(client: httpx.AsyncClient, query: str, variables: dict[str, Any] | None = None, *,
               token: str | None = None, **headers: str) -> tuple[httpx.Response, str]:
    """POST ``query`` with a fresh ``X-Request-ID``; the response and that id."""
    request_id = uuid.uuid4().hex
    sent = {"x-request-id": request_id, **{k.replace("_", "-"): v for k, v in headers.items()}}
    if token is not None:
        sent["authorization"] = f"Bearer {token}"
    response = await client.post("/graphql", json={"query": query, "variables": variables or {}}, headers=sent)
    return response, request_id


def served(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200 and "errors" not in response.json(), response.text
    data: dict[str, Any] = response.json()["data"]
    return data


READ = "{ companies(first: 3) { totalCount edges { node { name } } } me { name } }"
CREATE = "mutation($name: String!) { createCompany(input: {name: $name}) { id name } }"


async def warm(client: httpx.AsyncClient, world: World) -> None:
    """Concurrent requests, so that the pool keeps several idle connections (which a restart ends)."""
    for response, _ in await asyncio.gather(*(post(client, READ, token=world.token) for _ in range(6))):
        served(response)


def outage_requests(world: World) -> dict[str, dict[str, Any]]:
    """One of each way into the database, as keyword arguments of ``client.request``."""
    apq = "{ companies(first: 1) { totalCount } }"
    digest = hashlib.sha256(apq.encode()).hexdigest()
    bearer = {"authorization": f"Bearer {world.token}"}
    return {
        "membership check, query": {"method": "POST", "json": {"query": READ}, "headers": bearer},
        "membership check, mutation": {"method": "POST", "json": {"query": CREATE, "variables": {"name": "x"}},
                                       "headers": bearer},
        "keyed mutation": {"method": "POST", "json": {"query": CREATE, "variables": {"name": "k"}},
                           "headers": {**bearer, "idempotency-key": uuid.uuid4().hex}},
        "GET query": {"method": "GET", "params": {"query": READ}, "headers": bearer},
        "graphql-response+json": {"method": "POST", "json": {"query": READ},
                                  "headers": {**bearer, "accept": "application/graphql-response+json"}},
        "API key": {"method": "POST", "json": {"query": READ}, "headers": {"x-api-key": world.api_key}},
        "login": {"method": "POST", "json": {"query": 'mutation { login(email: "owner@faults.example", '
                                                      'password: "pw-faults", tenant: "faults") { token } }'}},
        "APQ lookup": {"method": "POST", "json": {"extensions": {"persistedQuery": {"version": 1,
                                                                                  "sha256Hash": digest}}}},
    }


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_while_postgres_is_down_every_request_is_a_graphql_503(
        world: World, postgres: PostgresCluster, mode: str) -> None:
    async with serving(world.settings(plans=True)) as (_, planned), \
            serving(world.settings(plans=False)) as (_, executed):
        for client in (planned, executed):
            await warm(client, world)
        await postgres.stop(mode)
        for client in (planned, executed):
            for name, request in outage_requests(world).items():
                request_id = uuid.uuid4().hex
                request = {**request, "headers": {**request.get("headers", {}), "x-request-id": request_id}}
                response = await client.request(url="/graphql", **request)
                try:
                    assert_unavailable(response, request_id)
                except AssertionError as failed:
                    raise AssertionError(f"{name}: {failed}") from None
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"] == "down"
        await postgres.start()
        await postgres.accepting()
        # The pools still hold the connections the server ended: none of them is used again.
        for client in (planned, executed):
            for _ in range(3):
                served((await post(client, READ, token=world.token))[0])
            assert (await client.get("/readyz")).status_code == 200


# ---- a connection lost under a statement -------------------------------------------------------

@contextlib.asynccontextmanager
async def blocked(world: World, statement: str) -> AsyncIterator[None]:
    """An admin transaction holding ``statement``'s lock until the block ends."""
    conn = await asyncpg.connect(world.admin_url)
    try:
        async with conn.transaction():
            await conn.execute(statement)
            yield
    finally:
        await conn.close()


async def kill_the_waiting_backend(world: World, request: asyncio.Task[Any]) -> None:
    """Terminate the application's backend once ``request`` waits for a lock (what a crash or a failover
    does to a connection). Watched from a connection of its own: inside a transaction, PostgreSQL
    shows the same snapshot of ``pg_stat_activity`` every time."""
    watcher = await asyncpg.connect(world.admin_url)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert not request.done(), request.result()
            pids = await watcher.fetch("SELECT pid FROM pg_stat_activity WHERE usename = 'atrium_app' "
                                       "AND wait_event_type = 'Lock'")
            if pids:
                await watcher.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
                return
            assert time.monotonic() < deadline, "the request never waited for the lock"
            await asyncio.sleep(0.01)
    finally:
        await watcher.close()


@pytest.mark.parametrize("plans", [True, False], ids=["planned", "executor"])
async def test_a_read_whose_connection_is_lost_is_a_503(world: World, postgres: PostgresCluster, plans: bool,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    async with serving(world.settings(plans=plans)) as (app, client):
        served((await post(client, READ, token=world.token))[0])
        async with blocked(world, "LOCK TABLE companies IN ACCESS EXCLUSIVE MODE"):
            request = asyncio.create_task(post(client, READ, token=world.token))
            await kill_the_waiting_backend(world, request)
            response, request_id = await request
        body = assert_unavailable(response, request_id)
        if not plans:
            assert body["errors"][0]["path"] == ["companies"]
        served((await post(client, READ, token=world.token))[0])
        assert app.state.runtime.databases.pool_usage()[0] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_a_write_whose_connection_is_lost_is_a_503_and_leaves_nothing(
        world: World, postgres: PostgresCluster, caplog: pytest.LogCaptureFixture) -> None:
    name = f"lost-{uuid.uuid4().hex[:8]}"
    async with serving(world.settings()) as (app, client):
        async with blocked(world, "LOCK TABLE companies IN EXCLUSIVE MODE"):
            request = asyncio.create_task(post(client, CREATE, {"name": name}, token=world.token))
            await kill_the_waiting_backend(world, request)
            response, request_id = await request
        body = assert_unavailable(response, request_id)
        assert body["data"] is None and body["errors"][0]["path"] == ["createCompany"]
        assert app.state.runtime.databases.pool_usage()[0] == 0
    assert await count(world, "companies", name) == 0
    assert await count(world, "audit_events", name) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


COUNTS = {
    "companies": "SELECT count(*) FROM companies WHERE tenant_id = $1 AND name = $2",
    "audit_events": "SELECT count(*) FROM audit_events WHERE tenant_id = $1 AND strpos(diff::text, $2) > 0",
}


async def count(world: World, table: str, name: str) -> int:
    """Rows of ``table`` (``COUNTS``) of the world's tenant that name ``name``."""
    conn = await asyncpg.connect(world.admin_url)
    try:
        return int(await conn.fetchval(COUNTS[table], world.tenant_id, name))
    finally:
        await conn.close()


async def test_a_keyed_mutation_cut_off_by_an_outage_runs_on_retry(
        world: World, postgres: PostgresCluster) -> None:
    """Its held transaction (the change and the answer kept for retries) is rolled back whole, so the
    retry with the same key runs rather than replaying an outage answer."""
    name, key = f"keyed-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    async with serving(world.settings()) as (_, client):
        async with blocked(world, "LOCK TABLE companies IN EXCLUSIVE MODE"):
            request = asyncio.create_task(post(client, CREATE, {"name": name}, token=world.token,
                                               idempotency_key=key))
            await kill_the_waiting_backend(world, request)
            response, request_id = await request
        assert_unavailable(response, request_id)
        retried, _ = await post(client, CREATE, {"name": name}, token=world.token, idempotency_key=key)
        assert served(retried)["createCompany"]["name"] == name
        assert "idempotent-replayed" not in retried.headers
        again, _ = await post(client, CREATE, {"name": name}, token=world.token, idempotency_key=key)
        assert again.headers.get("idempotent-replayed") == "true" and again.json() == retried.json()
    assert await count(world, "companies", name) == 1


# ---- the server ends a connection: asyncpg's "another operation is in progress" ------------------

@dataclass
class Pipe:
    client_port: int
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    server_ended: asyncio.Event = field(default_factory=asyncio.Event)


class HoldingProxy:
    """TCP between the application and PostgreSQL that passes on everything, except that when the
    server ends a connection, the client's side stays open (its end held back, as a network may):
    what is otherwise a few event-loop turns, between asyncpg reading the server's farewell
    (``terminating connection due to administrator command``) and reading the socket's end, lasts
    until the client sends again, which then ends it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.pipes: list[Pipe] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.holding = False
        """Whether a connection the server ends is held open on the client's side (``server_ends`` sets it)."""

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        pipe = Pipe(client_writer.get_extra_info("peername")[1], client_writer, upstream_writer)
        self.pipes.append(pipe)

        async def down() -> None:
            while data := await upstream_reader.read(65536):
                client_writer.write(data)
                await client_writer.drain()
            pipe.server_ended.set()
            if not self.holding:
                client_writer.close()

        async def up() -> None:
            while data := await client_reader.read(65536):
                if pipe.server_ended.is_set():
                    break  # the server is gone: so is the connection, now
                upstream_writer.write(data)
                await upstream_writer.drain()
            upstream_writer.close()

        try:
            await asyncio.gather(down(), up())
        except OSError:
            pass
        finally:
            client_writer.close()
            upstream_writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        self.holding = False
        for pipe in self.pipes:
            pipe.client.close()
            pipe.upstream.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()


def unread(local_port: int) -> int:
    """Bytes waiting unread in this process's TCP socket bound to 127.0.0.1:``local_port``."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as sock:
                if sock.type == socket.SOCK_STREAM and sock.getsockname()[:2] == ("127.0.0.1", local_port):
                    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0])
    raise LookupError(local_port)


async def server_ends(world: World, proxy: HoldingProxy, pid: int) -> None:
    """Terminate backend ``pid`` and wait until its client has read the server's farewell (and not the end)."""
    proxy.holding = True
    admin = await asyncpg.connect(world.admin_url)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()
    deadline = time.monotonic() + WAIT
    while not any(p.server_ended.is_set() and unread(p.client_port) == 0 for p in proxy.pipes):
        assert time.monotonic() < deadline, "the server's farewell was not read"
        await asyncio.sleep(0.001)


@pytest.fixture
async def proxied(world: World, postgres: PostgresCluster) -> AsyncIterator[tuple[HoldingProxy, Databases]]:
    proxy = HoldingProxy(postgres.port)
    port = await proxy.start()
    databases = Databases(app_role_url(world.admin_url.replace(f":{postgres.port}/", f":{port}/")), pool_size=1)
    try:
        yield proxy, databases
    finally:
        await proxy.close()
        await databases.dispose()


async def backend_pid(scope: TenantScope) -> int:
    [(pid,)] = await scope.fetch(text("SELECT pg_backend_pid()"))
    return int(pid)


async def test_a_connection_the_server_ended_between_two_statements_is_not_used_again(
        world: World, proxied: tuple[HoldingProxy, Databases]) -> None:
    """The server ends the request's connection between its statements. asyncpg has read the farewell
    but not yet the socket's end, and refuses the next statement with "cannot switch to state 12;
    another operation (2) is in progress" (what was seen on ``deals.totalCount`` under a restart):
    that is the end of the request's transaction, answered SERVICE_UNAVAILABLE, and the connection
    goes; nothing ever ran two statements at once."""
    proxy, databases = proxied
    scope = TenantScope(databases, world.tenant_id)
    await scope.enter(world.owner_id)
    pid = await backend_pid(scope)
    await server_ends(world, proxy, pid)
    with pytest.raises(ServiceUnavailable) as raised:
        await scope.fetch(text("SELECT count(*) FROM companies"))
    assert "another operation (2) is in progress" in str(raised.value.__cause__)
    with pytest.raises(ServiceUnavailable):  # the request's transaction is over: no second one begins
        await scope.fetch(text("SELECT 1"))
    await scope.close()
    again = TenantScope(databases, world.tenant_id)  # the pool's one connection: a new one
    try:
        assert (await again.enter(world.owner_id)).role == "owner"
        assert await backend_pid(again) != pid
    finally:
        await again.close()
    assert databases.pool_usage()[0] == 0


async def test_a_pooled_connection_the_server_ended_is_replaced_before_use(
        world: World, proxied: tuple[HoldingProxy, Databases]) -> None:
    """The same farewell read while the connection idles in the pool: the next request begins on a
    fresh connection and is served (no outage answer after the server is back)."""
    proxy, databases = proxied
    first = TenantScope(databases, world.tenant_id)
    await first.enter(world.owner_id)
    pid = await backend_pid(first)
    await first.close()
    await server_ends(world, proxy, pid)
    scope = TenantScope(databases, world.tenant_id)
    try:
        assert (await scope.enter(world.owner_id)).role == "owner"
        assert await backend_pid(scope) != pid
    finally:
        await scope.close()
    assert databases.pool_usage()[0] == 0


# ---- WebSocket ----------------------------------------------------------------------------------

async def test_websocket_operations_answer_an_outage_with_its_code(world: World, postgres: PostgresCluster) -> None:
    async with serve_in_process(world.settings(env="test"), ManualClock()) as server:
        async with httpx.AsyncClient(base_url=server.url) as client:
            created = served((await post(client, CREATE, {"name": "present"}, token=world.token))[0])
        live = await Live.connect(server.ws_url, world.token)
        try:
            await postgres.stop("fast")
            query = await live.subscribe(READ)
            message = await live.message(query)
            # Refused before it runs (an ``error`` message, as admission refuses: the outage is known)
            # or run and answered with the outage (``next`` with errors, then ``complete``): coded alike.
            assert message["type"] in ("error", "next"), message
            errors = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
            assert {e["extensions"]["code"] for e in errors} == {"SERVICE_UNAVAILABLE"}
            if message["type"] == "next":
                assert (await live.message(query))["type"] == "complete"
            presence = await live.subscribe("subscription($id: ID!) { presence(recordId: $id) { recordId } }",
                                            {"id": created["createCompany"]["id"]})
            message = await live.message(presence)
            assert message["type"] in ("error", "next"), message
            payload = message["payload"] if message["type"] == "error" else message["payload"]["errors"]
            assert {e["extensions"]["code"] for e in payload} == {"SERVICE_UNAVAILABLE"}, message
            assert not any(leak in json.dumps(message).lower() for leak in ("asyncpg", "connection refused"))
        finally:
            await live.close()
        # A new connection cannot have its credential checked: closed with 1013 Try Again Later.
        async with connect(server.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            init = {"type": "connection_init", "payload": {"authorization": f"Bearer {world.token}"}}
            await ws.send(json.dumps(init))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT)
            assert ws.close_code == 1013 and ws.close_reason == "SERVICE_UNAVAILABLE"


# ---- Redis --------------------------------------------------------------------------------------

async def test_while_redis_is_down_only_what_needs_it_is_a_503(world: World, postgres: PostgresCluster) -> None:
    redis = RedisServer()
    await redis.start()
    try:
        settings = world.settings(redis_url=redis.url, redis_prefix=f"atrium-outages-{uuid.uuid4().hex[:6]}:")
        async with serving(settings) as (_, client):
            company = served((await post(client, CREATE, {"name": "redis"}, token=world.token))[0])["createCompany"]
            presence = 'mutation($id: ID!) { setPresence(recordId: $id, state: VIEWING) { recordId } }'
            redis.stop()
            served((await post(client, READ, token=world.token))[0])  # reads need only PostgreSQL
            served((await post(client, CREATE, {"name": "no-redis"}, token=world.token))[0])  # its event is lost
            response, request_id = await post(client, presence, {"id": company["id"]}, token=world.token)
            assert_unavailable(response, request_id)
            await redis.start()
            response, _ = await post(client, presence, {"id": company["id"]}, token=world.token)
            assert response.status_code == 200  # BAD_USER_INPUT (not present on the record): Redis answered
            assert [e["extensions"]["code"] for e in response.json()["errors"]] == ["BAD_USER_INPUT"]
    finally:
        redis.stop()

