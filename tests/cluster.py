"""A PostgreSQL cluster of a test's own, to stop, restart or configure at will (never the shared server).

``PostgresCluster.create(root)`` runs the system's ``initdb`` (Debian: /usr/lib/postgresql/N/bin)
into ``root`` and picks a free port; the test is skipped, saying why, where there is no initdb or
(as root) no ``postgres`` account to run it as. It listens on 127.0.0.1 only, with ``fsync=off``:
the tests kill PostgreSQL's processes, never the machine, so what a commit wrote to the kernel
survives (commits stay synchronous: an acknowledged commit has reached the kernel).
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from atrium.ops.embedded_pg import _find_system_bindir
from tests.live import free_port

START_TIMEOUT = 60.0


def service_user() -> pwd.struct_passwd | None:
    """postgres will not run as root: as root, run it as the ``postgres`` system user (else skip)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root without a 'postgres' user to run a throwaway PostgreSQL as")


def run_as(user: pwd.struct_passwd | None, *command: str | Path) -> None:
    """Run ``command`` (as ``user`` when given), raising with its output when it fails."""
    done = subprocess.run([str(c) for c in command], capture_output=True, cwd="/", check=False,
                          user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                          extra_groups=[] if user else None)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(str(command[0])).name} failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).decode(errors='replace')[-2000:]}")


@dataclass
class PostgresCluster:
    """One throwaway cluster (module docstring): ``start``, ``stop(mode)``, ``accepting()``."""

    bindir: Path
    root: Path
    port: int
    user: pwd.struct_passwd | None
    settings: str = ""
    """More ``-c name=value`` server options."""

    @classmethod
    def create(cls, root: Path, *, hba: str | None = None, settings: str = "") -> PostgresCluster:
        """``initdb`` into ``root``/data (trust authentication, or ``hba`` as pg_hba.conf)."""
        bindir = _find_system_bindir()
        if bindir is None:
            pytest.skip("no initdb/pg_ctl on this machine (Debian: apt-get install postgresql)")
        user = service_user()
        if user:
            os.chown(root, user.pw_uid, user.pw_gid)
        cluster = cls(bindir, root, free_port(), user, settings)
        run_as(user, bindir / "initdb", "-D", cluster.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
               "--no-instructions", "--no-sync")
        if hba is not None:
            (cluster.data / "pg_hba.conf").write_text(hba)
        return cluster

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "log"

    def url(self, *, database: str = "postgres", user: str = "postgres", host: str = "127.0.0.1",
            **params: str | Path) -> str:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"postgresql://{user}@{host}:{self.port}/{database}" + (f"?{query}" if query else "")

    def _pg_ctl(self, *args: str) -> list[str | Path]:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   f"-c fsync=off {self.settings}")
        return [self.bindir / "pg_ctl", "-D", self.data, "-l", self.log, "-o", options, *args]

    def start_blocking(self) -> None:
        """Start it and return once it accepts connections (for fixtures outside an event loop)."""
        run_as(self.user, *self._pg_ctl("-w", "-t", str(int(START_TIMEOUT)), "start"))

    def stop_blocking(self, mode: str = "immediate") -> None:
        run_as(self.user, *self._pg_ctl("-m", mode, "-w", "stop"))

    async def start(self) -> None:
        """Launch the postmaster and return at once (``accepting()`` tells when it serves)."""
        await asyncio.to_thread(run_as, self.user, *self._pg_ctl("-W", "start"))

    async def stop(self, mode: str = "fast") -> None:
        """Stop it (``fast``: sessions are terminated and it shuts down cleanly; ``immediate``: every
        process quits at once, as in a crash, and the next start recovers from the WAL); returns
        once it is down."""
        await asyncio.to_thread(run_as, self.user, *self._pg_ctl("-m", mode, "-w", "-t", "60", "stop"))

    async def accepting(self) -> float:
        """Wait until a connection succeeds and a statement runs; returns the ``time.monotonic()`` at
        which that attempt began (so no later than the moment the server began to accept)."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            attempt = time.monotonic()
            try:
                conn = await asyncpg.connect(self.url(), timeout=1.0)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not accept connections within {START_TIMEOUT:g} s: "
                                       f"{self.log.read_text()[-2000:] if self.log.exists() else ''}") from None
                await asyncio.sleep(0.005)
                continue
            try:
                await conn.execute("SELECT 1")
                return attempt
            finally:
                await conn.close()

    def remove(self) -> None:
        """Stop it if it runs, and delete its files."""
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop_blocking("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def running_cluster(prefix: str) -> Iterator[PostgresCluster]:
    """A throwaway cluster in a temporary directory, started, then removed (files and all)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        server = PostgresCluster.create(Path(tmp))
        server.start_blocking()
        try:
            yield server
        finally:
            server.remove()
