"""The database a benchmark runs against: made afresh beside ``settings``' and migrated."""

from __future__ import annotations

import asyncpg
from sqlalchemy.engine import make_url

from core.pgurl import libpq_url
from core.settings import Settings
from models.migrations import migrate


async def fresh_database(settings: Settings, name: str) -> str:
    """Drop and create database ``name`` on ``settings``' server, migrate it; its admin URL."""
    assert settings.database_url
    admin = await asyncpg.connect(libpq_url(settings.database_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(settings.admin_url).set(database=name).render_as_string(hide_password=False)
    await migrate(url)
    return url


async def settled_database(url: str) -> None:
    """``VACUUM (ANALYZE)`` the database at ``url`` once it is seeded: every table has statistics and a
    visibility map before anything is measured, as in a database that has run for a while, rather than
    autovacuum's first pass over the new rows landing in the middle of a measurement (it starts within
    ``autovacuum_naptime``, a minute, of the seeding)."""
    conn = await asyncpg.connect(libpq_url(url))
    try:
        await conn.execute("VACUUM (ANALYZE)")
    finally:
        await conn.close()
