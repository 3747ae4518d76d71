"""Smoke test for atrium.ops.embedded_pg with each available backend."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg
import pytest

from atrium.ops.embedded_pg import (
    _find_system_bindir,
    start_embedded_postgres,
    stop_embedded_postgres,
)


async def _exercise(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("select 1") == 1
        assert await conn.fetchval(
            "select rolsuper from pg_roles where rolname = current_user"
        )
        await conn.execute("CREATE ROLE app_user LOGIN")
        await conn.execute("CREATE DATABASE app_db OWNER app_user")
    finally:
        await conn.close()
    # Same URL, different user and database: trust auth over the socket.
    user_url = url.replace(
        "postgresql://postgres@/postgres", "postgresql://app_user@/app_db"
    )
    conn = await asyncpg.connect(user_url)
    try:
        assert await conn.fetchval("select current_user") == "app_user"
        assert not await conn.fetchval(
            "select rolsuper from pg_roles where rolname = current_user"
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("backend", ["pgserver", "system"])
def test_start_connect_stop(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend == "system":
        if _find_system_bindir() is None:
            pytest.skip("no system initdb/pg_ctl")
        monkeypatch.setitem(
            sys.modules, "pgserver", None
        )  # makes `import pgserver` fail
    else:
        pytest.importorskip("pgserver")
    data_dir = tmp_path / "pg"
    url = start_embedded_postgres(data_dir)
    try:
        assert url == f"postgresql://postgres@/postgres?host={data_dir}"
        assert start_embedded_postgres(data_dir) == url  # idempotent
        asyncio.run(_exercise(url))
    finally:
        stop_embedded_postgres(data_dir)
    assert not (data_dir / "postmaster.pid").exists()
    stop_embedded_postgres(data_dir)  # no-op when stopped
