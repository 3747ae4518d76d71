"""Test world: a throwaway database per run on real PostgreSQL, the Redis of the run, an app, tenant factory.

PostgreSQL: DATABASE_URL when set, otherwise the embedded server (pgserver) in a temporary dir.
The database is created, migrated, and dropped at the end; nothing depends on earlier runs.
Redis: REDIS_URL, else redis://127.0.0.1:6379/0; a test that needs it asks for the ``redis_url``
fixture and is skipped, saying so, when nothing answers there.

Every fixture is shared from here: those defined below, and those of the plugin modules listed in
``pytest_plugins`` (the live-update kit, the browser, the field-rule apps). Test modules import helpers, never fixtures.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette

from atrium.app import create_app
from atrium.ops.admin import add_user, create_tenant
from atrium.ops.embedded_pg import start_embedded_postgres, stop_embedded_postgres
from auth.tokens import issue_token
from core.pgurl import async_url, libpq_url
from core.settings import Settings, switch
from models.db import Databases
from models.migrations import migrate
from models.tables import Role

pytest_plugins = ["tests.live", "tests.browser", "tests.field_rules"]

TEST_SECRET = "test-secret-" + secrets.token_hex(16)
TEST_WEBHOOK_KEY = base64.b64encode(secrets.token_bytes(32)).decode()
"""The key sealing webhook signing secrets in this run (``ATRIUM_WEBHOOK_KEY`` of its worker processes)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--settings-users", action="store_true",
                     help="run only the tests that build on the `settings` fixture, where ATRIUM_PLANS is read "
                          "(.ci/run's second pass, plans off: the other tests start processes or check files of "
                          "their own and run once)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--settings-users"):
        users = {item for item in items if "settings" in getattr(item, "fixturenames", ())}
        config.hook.pytest_deselected(items=[item for item in items if item not in users])
        items[:] = [item for item in items if item in users]


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """Admin URL of a PostgreSQL server (database part ignored)."""
    if url := os.environ.get("DATABASE_URL"):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="atrium-pg-") as tmp:
        data = Path(tmp) / "pg"
        url = start_embedded_postgres(data)
        try:
            yield url
        finally:
            stop_embedded_postgres(data)


@asynccontextmanager
async def scratch_database(server_url: str, prefix: str, *, migrated: bool = True,
                           registry: AsyncEngine | None = None) -> AsyncIterator[str]:
    """A new database on the test server (migrated unless told otherwise); dropped on exit. Yields its URL.

    ``registry``: the tenant registry dedicated tenants homed in this database were entered in; on exit
    they are deleted from it with the database, so later jobs over every home (retention, export
    leases) do not look for a database that is gone."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(libpq_url(server_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = async_url(make_url(server_url).set(database=name).render_as_string(hide_password=False))
    try:
        if migrated:
            await migrate(url)
        yield url
    finally:
        if registry is not None:
            async with registry.begin() as conn:
                await conn.execute(text("DELETE FROM tenants WHERE database_url LIKE :home"),
                                   {"home": f"%/{name}%"})
        admin = await asyncpg.connect(libpq_url(server_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(scope="session")
async def database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh, migrated database for this test run; dropped afterwards."""
    async with scratch_database(server_url, "atrium_test") as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The Redis of the test run; a test asking for it is skipped when nothing answers there."""
    url = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    client = Redis.from_url(url, socket_connect_timeout=1.0)
    try:
        client.ping()
    except (RedisError, OSError) as exc:
        pytest.skip(f"this test needs a real Redis at {url} and none answers there ({exc}): "
                    "start redis-server or set REDIS_URL")
    finally:
        client.close()
    return url


@pytest.fixture(scope="session")
def settings(database_url: str) -> Settings:
    # Functional tests run unmetered (their broad queries would exhaust a plan); tests/test_limits.py
    # builds apps with rate limits on.
    # ATRIUM_PLANS=off runs the whole suite through the executor alone (.ci/run does both).
    # Webhooks: endpoints may point at 127.0.0.1 (the tests' receivers); no dispatcher runs in the
    # shared app (tests/test_webhooks.py starts its own, on a database of its own). Functional tests
    # also send bursts of one tenant's requests at once: admission bounds are wide here, and
    # tests/test_overload.py builds apps with narrow ones.
    return Settings(env="test", database_url=database_url, jwt_secret=TEST_SECRET, data_dir=Path(tempfile.gettempdir()),
                    rate_limits=False, plans=switch(os.environ, "ATRIUM_PLANS", default=True),
                    webhook_key=TEST_WEBHOOK_KEY, webhook_dispatcher=False,
                    webhook_allowed_networks=("127.0.0.1/32",),
                    max_in_flight=1024, tenant_in_flight=1024, busy_tenant_in_flight=1024, admission_queue=1024,
                    tenant_queue=1024)


@pytest.fixture(scope="session")
async def admin_engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="session")
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def databases(settings: Settings) -> AsyncIterator[Databases]:
    """The server's database access (role ``atrium_app``) with one pooled connection, so it is reused."""
    dbs = Databases(settings.app_url, pool_size=1)
    try:
        yield dbs
    finally:
        await dbs.dispose()


@pytest.fixture(scope="session")
async def app_without_rls(settings: Settings) -> AsyncIterator[Starlette]:
    """The app connecting as the superuser: RLS never applies, only the app's own tenant filters do."""
    application = create_app(dataclasses.replace(settings, app_database_url=settings.database_url))
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture(params=["app-and-rls", "app-filters-only"])
async def either_client(request: pytest.FixtureRequest, app: Starlette,
                        app_without_rls: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the deployed app, then of the app with RLS out of the way: isolation holds both ways."""
    target = app if request.param == "app-and-rls" else app_without_rls
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=target), base_url="http://atrium.test") as c:
        yield c


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as c:
        yield c


@dataclass
class TenantWorld:
    """A tenant made for one test, with one user per role and a GraphQL helper."""

    slug: str
    id: uuid.UUID
    settings: Settings
    users: dict[Role, uuid.UUID] = field(default_factory=dict)

    def token(self, role: Role = Role.OWNER, **kw: Any) -> str:
        return issue_token(self.settings, user_id=self.users[role], tenant_id=self.id, role=role, **kw)


async def make_tenant_world(admin_engine: AsyncEngine, settings: Settings, prefix: str = "t") -> TenantWorld:
    """A new tenant with one user per role (what ``make_tenant`` makes; for fixtures of a wider scope)."""
    slug = f"{prefix}-{uuid.uuid4().hex[:10]}"
    tenant_id = await create_tenant(admin_engine, slug, f"Tenant {slug}")
    world = TenantWorld(slug=slug, id=tenant_id, settings=settings)
    for role in Role:
        world.users[role] = await add_user(admin_engine, tenant_id, f"{role.value}@{slug}.example",
                                           f"{role.value.title()} of {slug}", role)
    return world


@pytest.fixture
def make_tenant(admin_engine: AsyncEngine, settings: Settings):  # type: ignore[no-untyped-def]
    async def make(prefix: str = "t") -> TenantWorld:
        return await make_tenant_world(admin_engine, settings, prefix)

    return make


async def gql(client: httpx.AsyncClient, query: str, variables: dict[str, Any] | None = None, *,
              token: str | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """POST a GraphQL request and return the decoded body (any HTTP status)."""
    h = dict(headers or {})
    if token is not None:
        h["authorization"] = f"Bearer {token}"
    response = await client.post("/graphql", json={"query": query, "variables": variables or {}}, headers=h)
    body: dict[str, Any] = response.json()
    body["_status"] = response.status_code
    return body


def codes(body: dict[str, Any]) -> list[str]:
    return [e.get("extensions", {}).get("code") for e in body.get("errors") or []]


def data_or_fail(body: dict[str, Any]) -> dict[str, Any]:
    assert not body.get("errors"), body.get("errors")
    data: dict[str, Any] = body["data"]
    return data


