"""``atrium tenant delete SLUG``: only after an export, only when confirmed; afterwards no table of the
database (found in the catalog, not listed by hand) holds the tenant's id, and other tenants keep
everything."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import httpx
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.ops.admin import rows_of_tenant
from core.settings import Settings
from models.tables import TENANT_TABLES, USERS
from tests.cli import COMMAND_TIMEOUT, ROOT, Ran, atrium, environment, one_line
from tests.conftest import TenantWorld
from tests.governance import fill, finished_export

MakeTenant = Callable[..., Awaitable[TenantWorld]]


def env_for(settings: Settings) -> dict[str, str]:
    return environment(DATABASE_URL=str(settings.database_url))


async def atrium_typing(answer: str, *argv: str, env: dict[str, str]) -> Ran:
    """``atrium <argv>`` with ``answer`` typed on its standard input."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "atrium", *argv, cwd=ROOT, env=env, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(process.communicate(answer.encode()), COMMAND_TIMEOUT)
    assert process.returncode is not None
    return Ran(process.returncode, stdout.decode(), stderr.decode())


async def uuid_anywhere(engine: AsyncEngine, tenant: TenantWorld) -> dict[str, int]:
    """Rows of any table whose text (every column) contains the tenant's id."""
    found = {}
    async with engine.connect() as conn:
        names = (await conn.execute(text("SELECT c.relname FROM pg_class c JOIN pg_namespace n "
                                         "ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
                                         "AND c.relkind = 'r'"))).scalars().all()
        for name in names:
            n = (await conn.execute(text(f'SELECT count(*) FROM "{name}" t WHERE t::text LIKE :id'),
                                    {"id": f"%{tenant.id}%"})).scalar_one()
            if n:
                found[name] = n
    return found


async def test_delete_needs_an_export_and_a_confirmation_then_removes_every_row(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
    settings: Settings,
) -> None:
    world, other = await make_tenant("gone"), await make_tenant("kept")
    await fill(client, world)
    await fill(client, other)
    env = env_for(settings)

    refused = await atrium("tenant", "delete", world.slug, "--yes", env=env)
    assert refused.status == 2 and "has no finished export" in one_line(refused)

    await finished_export(client, app, world)
    unconfirmed = await atrium("tenant", "delete", world.slug, env=env)  # standard input is empty
    assert unconfirmed.status == 2 and "not confirmed; nothing was deleted" in unconfirmed.stderr
    wrong = await atrium_typing(other.slug + "\n", "tenant", "delete", world.slug, env=env)
    assert wrong.status == 2
    assert (await rows_of_tenant(admin_engine, world.id))["companies"] == 1

    before = await rows_of_tenant(admin_engine, other.id)
    deleted = await atrium_typing(world.slug + "\n", "tenant", "delete", world.slug, env=env)
    assert deleted.status == 0, deleted.stderr
    assert f"deleted tenant {world.slug}" in deleted.stdout

    # Every table with a tenant_id column (the catalog's list covers every tenant table), and the rest.
    left = await rows_of_tenant(admin_engine, world.id)
    assert set(left) >= {t.name for t in TENANT_TABLES} | {"tenants", "data_versions", "audit_chain_heads"}
    assert not any(left.values()), left
    assert await uuid_anywhere(admin_engine, world) == {}
    async with admin_engine.connect() as conn:  # its members belonged to no other tenant: they are gone
        members = (await conn.execute(select(func.count()).select_from(USERS).where(
            USERS.c.email.like(f"%@{world.slug}.example")))).scalar_one()
    assert members == 0
    assert await rows_of_tenant(admin_engine, other.id) == before


async def test_delete_yes_skips_the_prompt(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
    settings: Settings,
) -> None:
    world = await make_tenant("gone-yes")
    await fill(client, world)
    await finished_export(client, app, world)
    ran = await atrium("tenant", "delete", world.slug, "--yes", env=env_for(settings))
    assert ran.status == 0, ran.stderr
    assert not any((await rows_of_tenant(admin_engine, world.id)).values())
    missing = await atrium("tenant", "delete", world.slug, "--yes", env=env_for(settings))
    assert missing.status == 2 and f"no tenant {world.slug!r}" in one_line(missing)
