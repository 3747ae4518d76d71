"""Migrations: upgrade, downgrade and upgrade again on a scratch database; models match them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import models.tables  # noqa: F401 - registers every table on SQLModel.metadata
from models.migrations import migrate
from tests.conftest import scratch_database


@pytest.fixture
async def scratch_url(server_url: str) -> AsyncIterator[str]:
    async with scratch_database(server_url, "atrium_mig", migrated=False) as url:
        yield url


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))).all()
    await engine.dispose()
    return {r.tablename for r in rows}


async def test_upgrade_downgrade_upgrade(scratch_url: str) -> None:
    await migrate(scratch_url)
    assert {"tenants", "users", "deals", "activities", "audit_events"} <= await _tables(scratch_url)
    await migrate(scratch_url, "base", downgrade=True)
    assert await _tables(scratch_url) == {"alembic_version"}
    await migrate(scratch_url)
    assert "deals" in await _tables(scratch_url)


async def test_models_match_the_migrations(database_url: str) -> None:
    """The SQLModel tables and the frozen DDL describe the same columns and types."""

    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        changes = compare_metadata(context, SQLModel.metadata)
        # Indexes, constraints and server defaults live in the DDL only; columns and types must agree.
        return [c for c in changes if isinstance(c, tuple) and c[0] in ("add_column", "remove_column", "add_table",
                                                                         "remove_table")] + [
            c for c in changes if isinstance(c, list) and c and c[0][0] in ("modify_type", "modify_nullable")]

    engine = create_async_engine(database_url)
    async with engine.connect() as conn:
        changes = await conn.run_sync(diff)
    await engine.dispose()
    assert changes == []
