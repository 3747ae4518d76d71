"""Starting fails clearly: a bad setting, an unreachable or missing database, a port in use are one
line naming what is wrong and a non-zero exit, printed before anything else; ``atrium serve``
stops the embedded PostgreSQL it started, and ``atrium db stop`` stops one left running.

Each case runs the real command (``python -m atrium``) in a process of its own.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from atrium.ops.embedded_pg import _find_system_bindir, embedded_running, start_embedded_postgres
from core.pgurl import PgUrl
from tests.cli import atrium, environment, one_line, python_module
from tests.live import ROOT, free_port


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("ATRIUM_TOKEN_TTL", "abc", "ATRIUM_TOKEN_TTL must be a whole number of seconds, at least 1, not 'abc'"),
    ("ATRIUM_DB_POOL_SIZE", "-3", "ATRIUM_DB_POOL_SIZE must be a whole number of connections, at least 1"),
    ("ATRIUM_PLANS", "maybe", "ATRIUM_PLANS must be on or off, not 'maybe'"),
    ("ATRIUM_ENV", "prod", "ATRIUM_ENV must be development, test or production, not 'prod'"),
    ("DATABASE_URL", "mysql://db/crm", "DATABASE_URL: expected a PostgreSQL URL"),
    ("REDIS_URL", "localhost:6379", "REDIS_URL must be a URL such as redis://localhost:6379/0"),
    ("ATRIUM_RATE_LIMITS", "free=lots", "ATRIUM_RATE_LIMITS: cannot read 'free=lots'"),
    ("ATRIUM_WEBHOOK_KEY", "c2hvcnQ=", "ATRIUM_WEBHOOK_KEY must be keys of 32 bytes in base64"),
    ("ATRIUM_WEBHOOK_ALLOWED_NETWORKS", "10.0.0.0/8,intranet",
     "ATRIUM_WEBHOOK_ALLOWED_NETWORKS must be IP networks separated by commas (such as 127.0.0.1/32), not 'intranet'"),
])
async def test_a_bad_setting_names_the_variable(variable: str, value: str, expected: str) -> None:
    ran = await atrium("tenant", "list", env=environment(**{variable: value}))
    assert ran.status == 2
    assert expected in one_line(ran)


async def test_serve_names_a_bad_setting_before_anything_else() -> None:
    ran = await atrium("serve", "--port", str(free_port()), env=environment(ATRIUM_TOKEN_TTL="abc"))
    assert ran.status == 2
    assert one_line(ran) == "atrium: ATRIUM_TOKEN_TTL must be a whole number of seconds, at least 1, not 'abc'"


async def test_uvicorn_started_directly_names_a_bad_setting(database_url: str) -> None:
    ran = await python_module("uvicorn", "--factory", "atrium.asgi:create_from_env", "--port", str(free_port()),
                              env=environment(DATABASE_URL=database_url, ATRIUM_TOKEN_TTL="abc"))
    assert ran.status == 2
    assert one_line(ran) == "atrium: ATRIUM_TOKEN_TTL must be a whole number of seconds, at least 1, not 'abc'"


async def test_the_served_app_is_built_on_a_settled_heap(database_url: str) -> None:
    """What uvicorn's factory builds is frozen out of the collector's sight (``settle_the_heap``):
    full collections under load then walk only what requests allocate."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import gc; from atrium.asgi import create_from_env; before = gc.get_freeze_count(); "
        "create_from_env(); print(before, gc.get_freeze_count())",
        cwd=ROOT, env=environment(DATABASE_URL=database_url), stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    before, frozen = map(int, out.split())
    assert process.returncode == 0 and before == 0 and frozen > 100_000


async def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    port = free_port()
    ran = await atrium("tenant", "list", env=environment(
        DATABASE_URL=f"postgresql://someone:s3cret-pw@127.0.0.1:{port}/crm"))
    assert ran.status == 1
    line = one_line(ran)
    assert line == (f"atrium: cannot connect to PostgreSQL at 127.0.0.1:{port} database 'crm' as 'someone': "
                    "connection refused (is PostgreSQL running and listening there?)")
    assert "s3cret-pw" not in ran.stderr


async def test_an_unknown_host_is_one_line() -> None:
    ran = await atrium("migrate", env=environment(DATABASE_URL="postgresql://u:pw@no-such-host.invalid/crm"))
    assert ran.status == 1
    assert "no-such-host.invalid:5432 database 'crm'" in one_line(ran)
    assert "unknown host" in one_line(ran)


async def test_a_missing_database_is_one_line(server_url: str) -> None:
    name = f"missing_{uuid.uuid4().hex[:8]}"
    url = PgUrl.parse(server_url).with_database(name).dsn()
    ran = await atrium("tenant", "list", env=environment(DATABASE_URL=url))
    assert ran.status == 1
    line = one_line(ran)
    assert f"database {name!r}" in line and f'database "{name}" does not exist' in line


async def test_a_port_in_use_is_reported_before_anything_else(database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = await atrium("serve", "--port", str(port), env=environment(DATABASE_URL=database_url))
    assert ran.status == 1
    assert one_line(ran) == (f"atrium: port {port} on 127.0.0.1 is already in use: stop what holds it or choose "
                             "another with --port")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    if _find_system_bindir() is None:
        try:
            import pgserver  # noqa: F401
        except ImportError:
            pytest.skip("no embedded PostgreSQL (pgserver or the system's initdb/pg_ctl) on this machine")
    with tempfile.TemporaryDirectory(prefix="atrium-serve-") as tmp:
        yield Path(tmp)


async def test_stopping_serve_stops_the_embedded_postgres_it_started(data_dir: Path) -> None:
    port = free_port()
    env = environment(ATRIUM_DATA_DIR=str(data_dir))
    log = data_dir / "serve.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "atrium", "serve", "--no-demo", "--port", str(port), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=output)
        try:
            deadline = time.monotonic() + 120
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2.0) as client:
                while True:
                    assert process.returncode is None, log.read_text()
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, log.read_text()
                    await asyncio.sleep(0.2)
            assert embedded_running(data_dir / "pg")
            process.send_signal(signal.SIGINT)  # Ctrl+C
            assert await asyncio.wait_for(process.wait(), 60) == 0, log.read_text()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert not embedded_running(data_dir / "pg"), log.read_text()
    assert "stopped the embedded PostgreSQL" in log.read_text()


async def test_db_stop_stops_one_left_running(data_dir: Path) -> None:
    await asyncio.to_thread(start_embedded_postgres, data_dir / "pg")
    env = environment(ATRIUM_DATA_DIR=str(data_dir))
    ran = await atrium("db", "stop", env=env)
    assert ran.status == 0 and "stopped the embedded PostgreSQL" in ran.stdout, ran
    assert not embedded_running(data_dir / "pg")
    again = await atrium("db", "stop", env=env)
    assert again.status == 0 and "no embedded PostgreSQL is running" in again.stdout
