"""Administration over the admin (table owner) connection: tenants and users.

These run outside any tenant (the CLI, tests' factories, demo seeding); the server itself never
uses the admin URL for requests.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Row, column, delete, func, select, text
from sqlalchemy import table as sa_table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from auth.passwords import hash_password_async
from core.pgurl import PgUrl, with_user
from core.settings import app_role_url
from models.db import create_engine
from models.tables import EXPORT_JOBS, MEMBERSHIPS, TENANTS, USERS, Isolation, Plan, Role

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




TENANT_COLUMN_TABLES = text("""
    SELECT c.relname FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attname = 'tenant_id' AND NOT a.attisdropped
    ORDER BY c.relname""")
FOREIGN_KEYS = text("""
    SELECT child.relname AS child, parent.relname AS parent FROM pg_constraint k
    JOIN pg_class child ON child.oid = k.conrelid JOIN pg_class parent ON parent.oid = k.confrelid
    JOIN pg_namespace n ON n.oid = child.relnamespace
    WHERE k.contype = 'f' AND n.nspname = 'public' AND child.oid <> parent.oid""")


async def tenant_tables(conn: AsyncConnection) -> list[str]:
    """Every table with a ``tenant_id`` column, from the catalog, each before the tables it references."""
    names = list((await conn.execute(TENANT_COLUMN_TABLES)).scalars())
    parents: dict[str, set[str]] = {name: set() for name in names}
    for fk in (await conn.execute(FOREIGN_KEYS)).all():
        if fk.child in parents and fk.parent in parents:
            parents[fk.child].add(fk.parent)
    referenced_by = {name: {c for c, ps in parents.items() if name in ps} for name in names}
    ordered: list[str] = []
    while referenced_by:
        free = sorted(name for name, children in referenced_by.items() if not children)
        if not free:
            raise RuntimeError(f"foreign keys form a cycle among {sorted(referenced_by)}")
        for name in free:
            ordered.append(name)
            del referenced_by[name]
            for children in referenced_by.values():
                children.discard(name)
    return ordered


async def has_export(engine: AsyncEngine, tenant_id: uuid.UUID) -> bool:
    """Whether the tenant has a finished export (downloaded or waiting to be)."""
    async with engine.connect() as conn:
        return bool((await conn.execute(select(func.count()).where(
            EXPORT_JOBS.c.tenant_id == tenant_id, EXPORT_JOBS.c.status.in_(("done", "downloaded"))))).scalar_one())


async def delete_tenant(registry: AsyncEngine, home: AsyncEngine, tenant_id: uuid.UUID) -> dict[str, int]:
    """Delete every row of ``tenant_id`` from every table that has a ``tenant_id`` column (found in the
    catalog, so a table added later is covered), children first, then the tenant itself (in its home
    database and the registry) and the users who were its members and belong to no other tenant.
    One transaction per database. Returns the rows deleted per table."""
    deleted: dict[str, int] = {}
    async with home.begin() as conn:
        names = await tenant_tables(conn)
        members = list((await conn.execute(select(MEMBERSHIPS.c.user_id).where(
            MEMBERSHIPS.c.tenant_id == tenant_id))).scalars())
        for name in names:
            rows = sa_table(name, column("tenant_id"))
            deleted[name] = (await conn.execute(delete(rows).where(rows.c.tenant_id == tenant_id))).rowcount
        deleted["tenants"] = (await conn.execute(delete(TENANTS).where(TENANTS.c.id == tenant_id))).rowcount
        for name in names:  # what triggers wrote while the tenant still existed (data versions)
            rows = sa_table(name, column("tenant_id"))
            deleted[name] += (await conn.execute(delete(rows).where(rows.c.tenant_id == tenant_id))).rowcount
        if members:
            deleted["users"] = (await conn.execute(delete(USERS).where(
                USERS.c.id.in_(members),
                ~select(MEMBERSHIPS.c.id).where(MEMBERSHIPS.c.user_id == USERS.c.id).exists()))).rowcount
    if registry is not home:
        async with registry.begin() as conn:
            await conn.execute(delete(TENANTS).where(TENANTS.c.id == tenant_id))
    return deleted


async def rows_of_tenant(engine: AsyncEngine, tenant_id: uuid.UUID) -> dict[str, int]:
    """How many rows each table with a ``tenant_id`` column (and ``tenants``) holds of ``tenant_id``."""
    async with engine.connect() as conn:
        counts = {}
        for name in await tenant_tables(conn):
            rows = sa_table(name, column("tenant_id"))
            counts[name] = (await conn.execute(select(func.count()).select_from(rows)
                                               .where(rows.c.tenant_id == tenant_id))).scalar_one()
        counts["tenants"] = (await conn.execute(select(func.count()).select_from(TENANTS)
                                                .where(TENANTS.c.id == tenant_id))).scalar_one()
    return counts
