"""Alembic environment: migrates the connection it is given, or DATABASE_URL (as the table owner)."""

from __future__ import annotations

import asyncio
import os

from sqlalchemy import Connection
from sqlmodel import SQLModel

import models.tables  # noqa: F401 - registers every table on SQLModel.metadata
from alembic import context
from models.db import create_engine

config = context.config
target_metadata = SQLModel.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_from_url(url: str) -> None:
    engine = create_engine(url)
    async with engine.connect() as conn:
        await conn.run_sync(_run)
        await conn.commit()
    await engine.dispose()


def main() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if context.is_offline_mode():
        context.configure(url=os.environ["DATABASE_URL"], target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit("alembic needs DATABASE_URL (the table owner's URL); "
                         "`atrium migrate` can use the embedded PostgreSQL")
    asyncio.run(_run_from_url(url))


main()
