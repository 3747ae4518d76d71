"""Governance of a tenant on a dedicated database: retention (its policies and its trash) is applied
in its own database, once; an export whose process died there is found and failed; an export and
``atrium tenant delete`` leave no row of it in its database or in the shared registry."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette

from atrium.ops.admin import add_user, create_tenant, rows_of_tenant
from core.clock import ManualClock
from core.settings import Settings
from models.audit_chain import verify_chain
from models.db import Databases
from models.leases import ABANDONED, JobLeases
from models.retention import apply_retention
from models.tables import ACTIVITIES, COMPANIES, EXPORT_JOBS, Isolation, Role
from tests.cli import atrium, environment
from tests.conftest import TenantWorld, data_or_fail, gql, scratch_database
from tests.governance import fill, finished_export
from tests.test_tenant_delete import uuid_anywhere


@pytest.fixture
async def dedicated(server_url: str, admin_engine: AsyncEngine,
                    settings: Settings) -> AsyncIterator[tuple[TenantWorld, AsyncEngine]]:
    """A tenant with a database of its own (one user per role) and an admin engine on that database."""
    async with scratch_database(server_url, "atrium_dedgov", registry=admin_engine) as url:
        slug = f"own-{uuid.uuid4().hex[:8]}"
        tenant_id = await create_tenant(admin_engine, slug, f"Tenant {slug}", isolation=Isolation.DEDICATED,
                                        database_url=url)
        home = create_async_engine(url)
        world = TenantWorld(slug=slug, id=tenant_id, settings=settings)
        for role in Role:
            world.users[role] = await add_user(home, tenant_id, f"{role.value}@{slug}.example",
                                               f"{role.value.title()} of {slug}", role)
        try:
            yield world, home
        finally:
            await home.dispose()


async def count(engine: AsyncEngine, table: Table, tenant: TenantWorld) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table).where(
            table.c.tenant_id == tenant.id))).scalar_one())


async def test_retention_and_the_trash_apply_in_the_dedicated_database_once(
    client: httpx.AsyncClient, dedicated: tuple[TenantWorld, AsyncEngine], admin_engine: AsyncEngine,
    databases: Databases,
) -> None:
    world, home = dedicated
    await fill(client, world)
    company = data_or_fail(await gql(client, 'mutation { createCompany(input: {name: "Gone"}) { id } }',
                                     token=world.token()))["createCompany"]["id"]
    data_or_fail(await gql(client, "mutation($id: ID!) { deleteCompany(id: $id) { deletedId } }", {"id": company},
                           token=world.token()))
    data_or_fail(await gql(client, 'mutation { setRetentionPolicy(target: "activities", keepDays: 30) { keepDays } }',
                           token=world.token()))
    assert await count(home, ACTIVITIES, world) == 2 and await count(admin_engine, ACTIVITIES, world) == 0

    # The shared registry lists the tenant's trash too; it is applied in its home, and once.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
    applied = await apply_retention(databases, later, tenant_id=world.id)
    assert sorted((a.target, a.removed) for a in applied) == [("activities", 2), ("trash", 1)]
    assert await count(home, ACTIVITIES, world) == 0
    async with home.connect() as conn:
        names = (await conn.execute(select(COMPANIES.c.name).where(COMPANIES.c.tenant_id == world.id))).scalars()
        assert "Gone" not in set(names)
    async with home.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            assert (await verify_chain(conn, world.id)).ok
    left = {name: n for name, n in (await rows_of_tenant(admin_engine, world.id)).items() if n}
    assert left == {"tenants": 1}  # the shared database holds only the registry's row


async def test_an_abandoned_export_on_a_dedicated_database_is_failed(
    dedicated: tuple[TenantWorld, AsyncEngine], databases: Databases,
) -> None:
    world, home = dedicated
    job, clock = uuid.uuid4(), ManualClock()
    async with home.begin() as conn:
        await conn.execute(EXPORT_JOBS.insert().values(
            tenant_id=world.id, id=job, status="running", lease_owner=uuid.uuid4(),
            lease_expires_at=dt.datetime.fromtimestamp(clock.time() - 1, dt.UTC)))
    reaped = await JobLeases(databases, clock, 30).reap()
    assert [(r.tenant_id, r.job_id) for r in reaped if r.tenant_id == world.id] == [(world.id, job)]
    async with home.connect() as conn:
        row = (await conn.execute(select(EXPORT_JOBS).where(EXPORT_JOBS.c.id == job))).one()
    assert (row.status, row.error) == ("failed", ABANDONED)


async def test_a_dedicated_tenant_is_exported_then_deleted_everywhere(
    client: httpx.AsyncClient, app: Starlette, dedicated: tuple[TenantWorld, AsyncEngine],
    admin_engine: AsyncEngine, settings: Settings,
) -> None:
    world, home = dedicated
    await fill(client, world)
    job = await finished_export(client, app, world)
    assert job["status"] == "DONE" and job["rowsTotal"] > 0
    assert await count(home, EXPORT_JOBS, world) == 1 and await count(admin_engine, EXPORT_JOBS, world) == 0

    ran = await atrium("tenant", "delete", world.slug, "--yes",
                       env=environment(DATABASE_URL=str(settings.database_url)))
    assert ran.status == 0, ran.stderr
    assert f"deleted tenant {world.slug}" in ran.stdout
    for engine in (home, admin_engine):
        assert not any((await rows_of_tenant(engine, world.id)).values())
        assert await uuid_anywhere(engine, world) == {}
