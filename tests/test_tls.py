"""PostgreSQL and Redis over TLS, reached through URLs as managed providers hand them out.

The test makes its own certificates (openssl: a CA, a server certificate for ``localhost`` and
127.0.0.1, a client certificate for the role ``certuser``, and a second CA nobody uses) and its
own servers, never the shared ones: a PostgreSQL cluster (``initdb`` into a temporary directory,
a free port, ``ssl=on``) whose ``pg_hba.conf`` refuses every connection that is not TLS, and a
``redis-server`` listening with ``--tls-port`` only. Debian's redis-server is built with TLS; the
Redis test is skipped, saying so, where it is not.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from atrium.app import create_app
from atrium.ops.admin import add_user, create_tenant
from auth.tokens import issue_token
from core.pgurl import PgUrl
from core.settings import Settings
from models.db import create_engine
from models.migrations import migrate
from models.tables import Role
from tests.cli import atrium, environment, one_line
from tests.cluster import PostgresCluster
from tests.conftest import TEST_SECRET, codes
from tests.live import free_port

WAIT = 30.0


@dataclass(frozen=True)
class Certificates:
    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def make_certificates(directory: Path) -> Certificates:
    """A CA, a server certificate it signs (localhost, 127.0.0.1), a client one (CN=certuser), another CA."""
    for name in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=Atrium test {name}",
                "-keyout", directory / f"{name}.key", "-out", directory / f"{name}.pem")
    for name, subject, extensions in (
            ("server", "/CN=localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            ("client", "/CN=certuser", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", directory / f"{name}.key",
                "-out", directory / f"{name}.csr")
        (directory / f"{name}.ext").write_text(extensions + "\n")
        openssl("x509", "-req", "-in", directory / f"{name}.csr", "-CA", directory / "ca.pem", "-CAkey",
                directory / "ca.key", "-CAcreateserial", "-days", "2", "-extfile", directory / f"{name}.ext",
                "-out", directory / f"{name}.pem")
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return Certificates(directory, directory / "ca.pem", directory / "server.pem", directory / "server.key",
                        directory / "client.pem", directory / "client.key", directory / "other-ca.pem")


@pytest.fixture(scope="module")
def certificates() -> Iterator[Certificates]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (the TLS tests make their certificates with it)")
    with tempfile.TemporaryDirectory(prefix="atrium-tls-") as tmp:
        yield make_certificates(Path(tmp))


HBA = """\
local   all  all                  trust
hostssl all  certuser 127.0.0.1/32 cert
hostssl all  pwuser   127.0.0.1/32 scram-sha-256
hostssl all  all      127.0.0.1/32 trust
host    all  all      0.0.0.0/0    reject
host    all  all      ::/0         reject
"""


@dataclass(frozen=True)
class TlsPostgres:
    port: int
    certificates: Certificates

    def url(self, *, host: str = "127.0.0.1", user: str = "postgres", database: str = "postgres",
            **params: str | Path) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{user}@{host}:{self.port}/{database}" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def tls_postgres(certificates: Certificates) -> Iterator[TlsPostgres]:
    with tempfile.TemporaryDirectory(prefix="atrium-tls-pg-") as tmp:
        root = Path(tmp)
        keys = root / "keys"
        keys.mkdir()
        for source in (certificates.server_cert, certificates.server_key, certificates.ca):
            shutil.copy(source, keys / source.name)
        cluster = PostgresCluster.create(root, hba=HBA, settings=(
            f"-c ssl=on -c ssl_cert_file={keys / 'server.pem'} -c ssl_key_file={keys / 'server.key'} "
            f"-c ssl_ca_file={keys / 'ca.pem'}"))
        if cluster.user:
            for path in (keys, *keys.iterdir()):
                os.chown(path, cluster.user.pw_uid, cluster.user.pw_gid)
        (keys / "server.key").chmod(0o600)
        cluster.start_blocking()
        try:
            yield TlsPostgres(cluster.port, certificates)
        finally:
            cluster.stop_blocking("immediate")


@pytest.fixture(scope="module")
async def tls_database(tls_postgres: TlsPostgres) -> str:
    """A migrated database on the TLS server, reached with ``sslmode=require``; its admin URL."""
    conn = await asyncpg.connect(tls_postgres.url(sslmode="require"))
    try:
        await conn.execute("CREATE DATABASE atrium")
        await conn.execute("CREATE ROLE certuser LOGIN")
        await conn.execute("CREATE ROLE pwuser LOGIN PASSWORD 'the-right-one'")
    finally:
        await conn.close()
    url = tls_postgres.url(database="atrium", sslmode="require", application_name="atrium-tls-test")
    await migrate(url)
    return url


async def whoami(url: str) -> tuple[str, bool]:
    """(current_user, whether the connection is TLS) over ``url``, through Atrium's engine factory."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            row = (await conn.exec_driver_sql(
                "SELECT current_user AS name, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")).one()
    finally:
        await engine.dispose()
    return str(row.name), bool(row.ssl)


async def test_plain_connections_are_refused(tls_postgres: TlsPostgres) -> None:
    """The server really insists on TLS: what passes below passes over TLS."""
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(tls_postgres.url(sslmode="disable"))


async def test_the_app_serves_over_sslmode_require(tls_database: str) -> None:
    settings = Settings(env="test", database_url=tls_database, jwt_secret=TEST_SECRET,
                        data_dir=Path(tempfile.gettempdir()), rate_limits=False)
    admin = create_engine(settings.admin_url)
    try:
        tenant_id = await create_tenant(admin, "tls", "Over TLS")
        user_id = await add_user(admin, tenant_id, "owner@tls.example", "Owner", Role.OWNER)
    finally:
        await admin.dispose()
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        token = issue_token(settings, user_id=user_id, tenant_id=tenant_id, role=Role.OWNER)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as c:
            body = (await c.post("/graphql", json={"query": "{ me { name } tenant { slug } }"},
                                 headers={"authorization": f"Bearer {token}"})).json()
        assert body == {"data": {"me": {"name": "Owner"}, "tenant": {"slug": "tls"}}}
        async with app.state.runtime.databases.default.connect() as conn:
            row = (await conn.exec_driver_sql(
                "SELECT current_user, ssl, application_name FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) "
                "WHERE pid = pg_backend_pid()")).one()
    assert tuple(row) == ("atrium_app", True, "atrium-tls-test")  # the app role's URL kept the parameters


async def test_verify_full_checks_the_certificate_and_the_host(tls_postgres: TlsPostgres) -> None:
    certs = tls_postgres.certificates
    for host in ("localhost", "127.0.0.1"):
        assert await whoami(tls_postgres.url(host=host, sslmode="verify-full", sslrootcert=certs.ca)) == \
            ("postgres", True)
    with pytest.raises(ssl.SSLCertVerificationError):
        await whoami(tls_postgres.url(host="localhost", sslmode="verify-full", sslrootcert=certs.other_ca))


async def test_client_certificates(tls_database: str, tls_postgres: TlsPostgres) -> None:
    certs = tls_postgres.certificates
    url = tls_postgres.url(host="localhost", user="certuser", database="atrium", sslmode="verify-full",
                           sslrootcert=certs.ca, sslcert=certs.client_cert, sslkey=certs.client_key)
    assert await whoami(url) == ("certuser", True)


async def test_several_hosts_are_tried_in_order(tls_postgres: TlsPostgres) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()},127.0.0.1:{tls_postgres.port}/postgres?sslmode=require"
    assert PgUrl.parse(url).endpoints()[1] == ("127.0.0.1", tls_postgres.port)
    assert await whoami(url) == ("postgres", True)


# ---- Redis ------------------------------------------------------------------------------------------

@pytest.fixture
async def tls_redis(certificates: Certificates) -> AsyncIterator[str]:
    """A private redis-server speaking TLS only; yields its ``rediss://`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    command = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--tls-cert-file", str(certificates.server_cert), "--tls-key-file",
               str(certificates.server_key), "--tls-ca-cert-file", str(certificates.ca), "--tls-auth-clients", "no"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    url = f"rediss://localhost:{port}/0?ssl_ca_certs={certificates.ca}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if process.poll() is not None:
                output = process.stdout.read().decode() if process.stdout else ""
                if "TLS" in output or "tls" in output:
                    pytest.skip(f"this redis-server has no TLS support: {output.strip()[-300:]}")
                raise RuntimeError(f"redis-server with TLS did not start: {output[-1000:]}")
            client = Redis.from_url(url, socket_connect_timeout=1.0)
            try:
                if await client.ping():
                    break
            except (RedisError, OSError):
                if time.monotonic() > deadline:
                    raise
            finally:
                await client.aclose()
            await asyncio.sleep(0.05)
        yield url
    finally:
        process.kill()
        process.wait()


async def test_redis_over_tls(tls_redis: str, settings: Settings) -> None:
    """Rate-limit buckets and the broker live in a Redis reached with ``rediss://``."""
    prefix = "atrium-tls-test:"
    app = create_app(dataclasses.replace(settings, redis_url=tls_redis, redis_prefix=prefix, rate_limits=True))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as c:
            answer = await c.post("/graphql", json={"query": "{ __typename }"})
        assert answer.status_code == 200 and not codes(answer.json())
    client = Redis.from_url(tls_redis)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    finally:
        await client.aclose()
    assert keys, "nothing was written to the TLS Redis"


async def test_a_wrong_password_is_one_line_without_it(tls_database: str, tls_postgres: TlsPostgres) -> None:
    url = tls_postgres.url(user="pwuser:a-wrong-one", database="atrium", sslmode="require")
    ran = await atrium("tenant", "list", env=environment(DATABASE_URL=url))
    assert ran.status == 1
    assert one_line(ran) == (f"atrium: cannot connect to PostgreSQL at 127.0.0.1:{tls_postgres.port} database "
                             "'atrium' as 'pwuser': password authentication failed for user \"pwuser\"")
    assert "a-wrong-one" not in ran.stderr


async def test_a_refused_certificate_is_one_line(tls_postgres: TlsPostgres) -> None:
    url = tls_postgres.url(host="localhost", sslmode="verify-full", sslrootcert=tls_postgres.certificates.other_ca)
    ran = await atrium("tenant", "list", env=environment(DATABASE_URL=url))
    assert ran.status == 1
    assert "TLS certificate not accepted (self-signed certificate in certificate chain)" in one_line(ran)
