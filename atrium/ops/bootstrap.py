"""Find the PostgreSQL Atrium uses: DATABASE_URL, or an embedded server started on demand."""

from __future__ import annotations

import asyncio
import dataclasses

import asyncpg
from sqlalchemy.engine import make_url

from atrium.ops.embedded_pg import start_embedded_postgres
from core.settings import Settings

EMBEDDED_DB = "atrium"


def libpq_url(url: str) -> str:
    """A SQLAlchemy URL as asyncpg/libpq accept it (no ``+driver``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def ensure_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url`` unless it exists; return its URL."""
    conn = await asyncpg.connect(libpq_url(server_url))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, never user input
    finally:
        await conn.close()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


async def resolve_database(settings: Settings) -> Settings:
    """``settings`` with ``database_url`` set, starting the embedded PostgreSQL when there is none."""
    if settings.database_url:
        return settings
    server = await asyncio.to_thread(start_embedded_postgres, settings.data_dir.resolve() / "pg")
    url = await ensure_database(server, EMBEDDED_DB)
    return dataclasses.replace(settings, database_url=url)
