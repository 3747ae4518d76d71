"""Hybrid isolation: a tenant marked dedicated lives in its own database, served by the same app."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from atrium.ops.admin import add_user, create_tenant, tenant_database
from auth.tokens import issue_token
from core.settings import Settings
from models.db import Databases
from models.tables import Isolation, Role
from tests.conftest import TenantWorld, data_or_fail, gql, scratch_database


@pytest.fixture
async def dedicated_url(server_url: str, admin_engine: AsyncEngine) -> AsyncIterator[str]:
    async with scratch_database(server_url, "atrium_ded", registry=admin_engine) as url:
        yield url


async def count(url: str, sql: str, **params: object) -> int:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        value = (await conn.execute(text(sql), params)).scalar_one()
    await engine.dispose()
    return int(value)


async def test_dedicated_tenant_is_routed_to_its_own_database(
    client: httpx.AsyncClient, admin_engine: AsyncEngine, settings: Settings, dedicated_url: str,
    make_tenant: Callable[..., Awaitable[Any]],
) -> None:
    slug = f"big-{uuid.uuid4().hex[:8]}"
    tenant_id = await create_tenant(admin_engine, slug, "Big Co", isolation=Isolation.DEDICATED,
                                    database_url=dedicated_url)
    home = await tenant_database(admin_engine, settings.database_url or "", tenant_id)
    try:
        owner = await add_user(home, tenant_id, f"owner@{slug}.example", "Big Owner", Role.OWNER)
    finally:
        await home.dispose()
    token = issue_token(settings, user_id=owner, tenant_id=tenant_id, role=Role.OWNER)

    created = data_or_fail(await gql(client, 'mutation { createCompany(input: {name: "Dedicated Inc"}) { id } }',
                                      token=token))
    assert created["createCompany"]["id"]
    assert await count(dedicated_url, "SELECT count(*) FROM companies WHERE tenant_id = :t", t=tenant_id) == 1
    assert await count(admin_engine.url.render_as_string(hide_password=False),
                       "SELECT count(*) FROM companies WHERE tenant_id = :t", t=tenant_id) == 0
    assert await count(dedicated_url, "SELECT count(*) FROM audit_events WHERE tenant_id = :t", t=tenant_id) == 1

    listed = data_or_fail(await gql(client, "{ me { name } companies { edges { node { name } } } }", token=token))
    assert listed["me"]["name"] == "Big Owner"
    assert [e["node"]["name"] for e in listed["companies"]["edges"]] == ["Dedicated Inc"]

    # A shared tenant served by the same process sees none of it.
    shared: TenantWorld = await make_tenant()
    other = data_or_fail(await gql(client, "{ companies { totalCount } }", token=shared.token()))
    assert other["companies"]["totalCount"] == 0
    # The registry stores the application role's URL, never the admin credentials.
    assert await count(admin_engine.url.render_as_string(hide_password=False),
                       "SELECT count(*) FROM tenants WHERE id = :t AND database_url LIKE '%atrium_app%'",
                       t=tenant_id) == 1


async def test_concurrent_first_requests_share_one_route_lookup(settings: Settings, make_tenant) -> None:  # type: ignore[no-untyped-def]
    tenant: TenantWorld = await make_tenant("route")
    other: TenantWorld = await make_tenant("route")
    databases = Databases(settings.app_url)
    lookups: list[str] = []

    def on_execute(conn: object, cursor: object, statement: str, *_: object) -> None:
        if "isolation" in statement:
            lookups.append(statement)

    event.listen(databases.default.sync_engine, "before_cursor_execute", on_execute)
    try:
        engines = await asyncio.gather(*(databases.engine_for(t.id) for t in [tenant] * 5 + [other] * 3))
        assert all(e is databases.default for e in engines)
        assert len(lookups) == 2, "one lookup per tenant, however many requests wait for it"
        await databases.engine_for(tenant.id)
        assert len(lookups) == 2, "then cached"
    finally:
        await databases.dispose()
