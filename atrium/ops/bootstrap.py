"""Find the PostgreSQL Atrium uses, DATABASE_URL or an embedded server started on demand, and make
sure it answers before anything else happens.

A database that cannot be reached (nothing listening, unknown host, TLS or authentication refused,
a missing database) is reported as one ``DatabaseUnreachable`` line naming the host, port and
database (never the password) and the cause; the CLI prints it and exits non-zero.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import subprocess

import asyncpg

from atrium.ops.embedded_pg import start_embedded_postgres
from core.pgurl import PgUrl, libpq_url
from core.settings import Settings

EMBEDDED_DB = "atrium"
CONNECT_TIMEOUT = 10.0


class DatabaseUnreachable(Exception):
    """PostgreSQL cannot be used: the message says where (no password) and why, in one line."""


def cause_of(exc: BaseException) -> str:
    """Why a connection failed, in a few words (asyncpg's and the OS's own, which hold no password)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is PostgreSQL running and listening there?)"
    if isinstance(exc, socket.gaierror):
        return f"unknown host ({exc.strerror})"
    if isinstance(exc, TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    if isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError):
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return text
    return type(exc).__name__


async def check_database(url: str) -> None:
    """Connect to ``url`` once; ``DatabaseUnreachable`` when that fails."""
    try:
        conn = await asyncpg.connect(libpq_url(url), timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnreachable(f"cannot connect to PostgreSQL at {PgUrl.parse(url).describe()}: "
                                  f"{cause_of(exc)}") from None
    await conn.close()


async def ensure_database(server_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``server_url`` unless it exists; return its URL."""
    conn = await asyncpg.connect(libpq_url(server_url))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, never user input
    finally:
        await conn.close()
    return PgUrl.parse(server_url).with_database(name).dsn()


async def resolve_database(settings: Settings) -> Settings:
    """``settings`` with ``database_url`` set, starting the embedded PostgreSQL when there is none;
    the database answers (``DatabaseUnreachable`` otherwise)."""
    if not settings.database_url:
        try:
            server = await asyncio.to_thread(start_embedded_postgres, settings.data_dir.resolve() / "pg")
        except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
            detail = exc.output.strip().splitlines()[-1] if isinstance(exc, subprocess.CalledProcessError) \
                and exc.output else str(exc)
            raise DatabaseUnreachable(f"cannot start the embedded PostgreSQL in {settings.data_dir / 'pg'}: "
                                      f"{detail}") from None
        settings = dataclasses.replace(settings, database_url=await ensure_database(server, EMBEDDED_DB))
    assert settings.database_url is not None
    await check_database(settings.database_url)
    return settings
