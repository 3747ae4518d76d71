"""A database host that silently drops packets is an outage within a bound, not a 60 s hang.

A firewall that drops packets (no RST) or a server that accepts the TCP connection and never
answers the startup message leaves ``asyncpg.connect`` waiting for its default of 60 s, and every
request that needs a new connection with it. ``ATRIUM_DB_CONNECT_TIMEOUT`` bounds opening a
connection and ``ATRIUM_DB_POOL_TIMEOUT`` waiting for a busy pool: past either, the request is
answered 503 SERVICE_UNAVAILABLE with ``Retry-After`` like any outage. The silent hosts here are
listeners of the test's own on 127.0.0.1; the bounds are short so that the tests end soon, but
nothing is timed: each test waits for its answer (bounded by ``WAIT``, which is far below 60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest
from sqlalchemy import text

from atrium.app import create_app
from core.pgurl import PgUrl
from core.settings import SettingError, Settings, app_role_url
from models.db import Databases, create_engine
from tests.conftest import TenantWorld, codes
from tests.live import WAIT

READ = "{ companies(first: 1) { totalCount } }"


@dataclasses.dataclass
class SilentHost:
    """A TCP port on 127.0.0.1 where PostgreSQL should be, which never says a word."""

    port: int
    accepted: asyncio.Event


@contextlib.asynccontextmanager
async def accepts_and_says_nothing() -> AsyncIterator[SilentHost]:
    """Accepts connections, reads what comes (the startup message) and never answers."""
    accepted = asyncio.Event()
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        held.append(writer)
        await reader.read()  # until the client gives up

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield SilentHost(server.sockets[0].getsockname()[1], accepted)
    finally:
        server.close()
        for writer in held:
            writer.close()


@contextlib.contextmanager
def drops_connection_attempts() -> Iterator[SilentHost]:
    """A listening socket that never accepts, its backlog already full: Linux then drops new SYNs
    without an answer (``tcp_abort_on_overflow`` is 0 by default), as a firewall that drops packets."""
    listener = socket.socket()
    filler = socket.socket()
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filler.connect(("127.0.0.1", port))  # the one place of the backlog
        yield SilentHost(port, asyncio.Event())
    finally:
        filler.close()
        listener.close()


def pointed_at(settings: Settings, port: int) -> Settings:
    url = PgUrl.parse(settings.admin_url)
    silent = dataclasses.replace(url, hosts=f"127.0.0.1:{port}")
    return dataclasses.replace(settings, app_database_url=app_role_url(silent.sqlalchemy()),
                               db_connect_timeout_seconds=0.3)


async def ask(settings: Settings, world: TenantWorld) -> httpx.Response:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        async with asyncio.timeout(WAIT):
            return await client.post("/graphql", json={"query": READ},
                                     headers={"authorization": f"Bearer {world.token()}", "x-request-id": "silent-1"})


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert codes(response.json()) == ["SERVICE_UNAVAILABLE"]
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-request-id"] == "silent-1"


async def test_a_host_that_never_answers_the_startup_message_is_a_503(settings: Settings, make_tenant) -> None:  # type: ignore[no-untyped-def]
    world = await make_tenant("silent")
    async with accepts_and_says_nothing() as host:
        response = await ask(pointed_at(settings, host.port), world)
        assert host.accepted.is_set()  # it was the startup that went unanswered
    assert_unavailable(response)


async def test_a_host_that_drops_connection_attempts_is_a_503(settings: Settings, make_tenant) -> None:  # type: ignore[no-untyped-def]
    world = await make_tenant("dropped")
    with drops_connection_attempts() as host:
        response = await ask(pointed_at(settings, host.port), world)
    assert_unavailable(response)


async def test_a_pool_busy_past_its_timeout_is_a_503(settings: Settings, make_tenant) -> None:  # type: ignore[no-untyped-def]
    world = await make_tenant("busypool")
    narrow = dataclasses.replace(settings, pool_size=1, db_pool_timeout_seconds=0.3)
    app = create_app(narrow)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        databases: Databases = app.state.runtime.databases
        auth = {"authorization": f"Bearer {world.token()}", "x-request-id": "silent-1"}
        assert (await client.post("/graphql", json={"query": READ}, headers=auth)).status_code == 200
        async with databases.default.connect(), databases.default.connect():  # the pool and its overflow
            async with asyncio.timeout(WAIT):
                response = await client.post("/graphql", json={"query": READ}, headers=auth)
            assert_unavailable(response)
        assert (await client.post("/graphql", json={"query": READ}, headers=auth)).status_code == 200


async def test_a_url_connect_timeout_is_honoured_not_sent_to_the_server(settings: Settings) -> None:
    url = PgUrl.parse(settings.admin_url)
    assert dataclasses.replace(url, query=(("connect_timeout", "2"),)).connect_timeout() == 2.0
    assert dataclasses.replace(url, query=(("connect_timeout", "0"),)).connect_timeout() is None  # libpq: no bound
    engine = create_engine(dataclasses.replace(url, query=(("connect_timeout", "2"),)).sqlalchemy())
    try:  # asyncpg would send an unknown parameter as a server setting, which PostgreSQL refuses
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()
    with pytest.raises(asyncpg.PostgresError):  # what the URL would do if handed to asyncpg as written
        await asyncpg.connect(dataclasses.replace(url, query=(("connect_timeout", "2"),)).dsn())


def test_the_timeouts_are_settings() -> None:
    base = {"ATRIUM_JWT_SECRET": "s" * 40}
    defaults = Settings.from_env(base)
    assert (defaults.db_connect_timeout_seconds, defaults.db_pool_timeout_seconds) == (5.0, 5.0)
    tuned = Settings.from_env({**base, "ATRIUM_DB_CONNECT_TIMEOUT": "1.5", "ATRIUM_DB_POOL_TIMEOUT": "2"})
    assert (tuned.db_connect_timeout_seconds, tuned.db_pool_timeout_seconds) == (1.5, 2.0)
    with pytest.raises(SettingError, match="ATRIUM_DB_CONNECT_TIMEOUT must be a number of seconds"):
        Settings.from_env({**base, "ATRIUM_DB_CONNECT_TIMEOUT": "abc"})
