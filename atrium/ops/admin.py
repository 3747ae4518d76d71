"""Administration over the admin (table owner) connection: tenants and users.

These run outside any tenant (the CLI, tests' factories, demo seeding); the server itself never
uses the admin URL for requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from auth.passwords import hash_password_async
from core.pgurl import PgUrl, with_user
from core.settings import app_role_url
from models.db import create_engine
from models.tables import TENANTS, Isolation, Plan, Role

UPSERT_USER = text(
    "INSERT INTO users (id, email, name, password_hash) VALUES (:id, :email, :name, :password_hash) "
    "ON CONFLICT ((lower(email))) DO UPDATE SET name = EXCLUDED.name, "
    "password_hash = coalesce(EXCLUDED.password_hash, users.password_hash) RETURNING id"
)


async def create_tenant(engine: AsyncEngine, slug: str, name: str, *, plan: Plan = Plan.FREE,
                        isolation: Isolation = Isolation.SHARED, database_url: str | None = None) -> uuid.UUID:
    """Create a tenant; raises ``ValueError`` when the slug is taken.

    A dedicated tenant needs ``database_url``: the admin URL of its own, already migrated database.
    The tenant row is written there too (its foreign keys need it), and the registry keeps the URL
    with the user switched to the application role, which is what the server connects with.
    """
    if (isolation == Isolation.DEDICATED) != (database_url is not None):
        raise ValueError("a dedicated tenant needs --database-url, and only a dedicated one")
    tenant_id = uuid.uuid4()
    values = {"id": tenant_id, "slug": slug, "name": name, "plan": plan.value, "isolation": isolation.value}
    async with engine.begin() as conn:
        exists = (await conn.execute(select(TENANTS.c.id).where(TENANTS.c.slug == slug))).first()
        if exists is not None:
            raise ValueError(f"tenant {slug!r} already exists")
        route = app_role_url(database_url) if database_url else None
        await conn.execute(TENANTS.insert().values(**values, database_url=route))
        if database_url is not None:
            dedicated = create_engine(database_url)
            try:
                async with dedicated.begin() as own:
                    await own.execute(TENANTS.insert().values(**values, database_url=route))
            finally:
                await dedicated.dispose()
    return tenant_id


async def tenant_database(engine: AsyncEngine, admin_url: str, tenant_id: uuid.UUID) -> AsyncEngine:
    """An admin engine on the database holding ``tenant_id``'s rows (the caller disposes it);
    ``engine`` is one on ``admin_url``, the shared database.

    For a dedicated tenant: its registered URL with the admin credentials of ``admin_url``.
    """
    async with engine.connect() as conn:
        route = (await conn.execute(select(TENANTS.c.database_url).where(TENANTS.c.id == tenant_id))).scalar()
    if route is None:
        return create_engine(admin_url)
    admin = PgUrl.parse(admin_url)
    return create_engine(with_user(route, admin.user or "", admin.password))


async def list_tenants(engine: AsyncEngine) -> Sequence[Row[Any]]:
    async with engine.connect() as conn:
        return (await conn.execute(
            text("SELECT t.slug, t.name, t.plan, t.isolation, t.id, count(m.id) AS members FROM tenants t "
                 "LEFT JOIN memberships m ON m.tenant_id = t.id GROUP BY t.id ORDER BY t.slug"))).all()


async def tenant_id_by_slug(engine: AsyncEngine, slug: str) -> uuid.UUID:
    async with engine.connect() as conn:
        found = (await conn.execute(select(TENANTS.c.id).where(TENANTS.c.slug == slug))).scalar_one_or_none()
    if found is None:
        raise ValueError(f"no tenant {slug!r}")
    return found  # type: ignore[no-any-return]


async def add_user(engine: AsyncEngine, tenant_id: uuid.UUID, email: str, name: str, role: Role,
                   password: str | None = None) -> uuid.UUID:
    """Create the user (or update their name and password) and give them ``role`` in the tenant."""
    password_hash = await hash_password_async(password) if password else None
    async with engine.begin() as conn:
        user_id = (await conn.execute(UPSERT_USER, {"id": uuid.uuid4(), "email": email, "name": name,
                                                    "password_hash": password_hash})).scalar_one()
        await conn.execute(text(
            "INSERT INTO memberships (tenant_id, id, user_id, role) VALUES (:t, :id, :u, :r) "
            "ON CONFLICT (tenant_id, user_id) DO UPDATE SET role = EXCLUDED.role, version = memberships.version + 1"
        ), {"t": tenant_id, "id": uuid.uuid4(), "u": user_id, "r": role.value})
    return user_id  # type: ignore[no-any-return]


