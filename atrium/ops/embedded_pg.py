"""Embedded PostgreSQL for development and tests.

A private cluster lives in ``data_dir`` (that directory *is* PGDATA) and listens
only on a unix socket, in ``data_dir`` when the path is short enough, else in a
per-cluster dir under the temp dir; there is no TCP. Authentication is ``trust``,
so any role, superuser or not, can connect through the socket without a password.
The server outlives the Python process; stopping it is the caller's job
(:func:`stop_embedded_postgres`).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import os
import pwd
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import quote

SUPERUSER = "postgres"
INSTALL_HINT = (
    "No embedded PostgreSQL available: install Atrium's `embedded` extra "
    "(`pip install 'atrium-crm[embedded]'`, which is pgserver: wheels for "
    "CPython 3.11/3.12; ./dev installs it), or install Debian's `postgresql` package "
    "(`apt-get install postgresql`, which provides /usr/lib/postgresql/<version>/bin), "
    "or set DATABASE_URL to an existing server."
)
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, including the NUL


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or reuse) a private cluster in ``data_dir``; return a superuser URL.

    The URL is ``postgresql://postgres@/postgres?host=<socket dir>`` (plus ``&port=N``
    only if the server is not on 5432). It works with asyncpg, SQLAlchemy's
    ``postgresql+asyncpg://`` and psql; swap the user to connect as another role.
    Idempotent across processes: a running server for ``data_dir`` is reused.
    Blocking (initdb takes about a second); call it from a thread in async code.
    Raises RuntimeError (message :data:`INSTALL_HINT`) if no PostgreSQL is available,
    and subprocess.CalledProcessError if initdb/pg_ctl fail.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        # pgserver's import makes platformdirs warn when XDG_RUNTIME_DIR is unset.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver.postgres_server import get_server
    except (ImportError, OSError):
        bindir = _find_system_bindir()
        if bindir is None:
            raise RuntimeError(INSTALL_HINT) from None
        _start_with_system_postgres(bindir, data_dir)
    else:
        # cleanup_mode=None: never stop the server at exit. pgserver also caches the
        # handle per process and registers an atexit hook; drop both, so a later call
        # after stop_embedded_postgres() really restarts the server.
        server = get_server(data_dir, cleanup_mode=None)
        atexit.unregister(server._cleanup)
        type(server)._instances.pop(server.pgdata, None)
        server.global_process_id_list.get_and_remove(os.getpid())
    return _url_when_ready(data_dir)


def embedded_running(data_dir: Path) -> bool:
    """Whether a server for ``data_dir`` is running (whoever started it)."""
    return _postmaster_lines(Path(data_dir).expanduser().resolve()) is not None


def stop_embedded_postgres(data_dir: Path) -> None:
    """Stop (fast shutdown, waiting) the server for ``data_dir``; no-op if not running.

    Works for clusters started by either backend: pg_ctl is taken from the directory of
    the postgres binary recorded in ``postmaster.opts``. Data is never deleted.
    """
    data_dir = Path(data_dir).expanduser().resolve()
    if _postmaster_lines(data_dir) is None:
        return
    postgres_bin = Path(shlex.split((data_dir / "postmaster.opts").read_text())[0])
    _run(
        [postgres_bin.with_name("pg_ctl"), "-D", data_dir, "-m", "fast", "-w", "stop"],
        _user_owning(data_dir),
    )


def _url_when_ready(data_dir: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while (lines := _postmaster_lines(data_dir)) is None or lines[7].strip() != "ready":
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"PostgreSQL in {data_dir} is not ready; see {data_dir / 'log'}"
            )
        time.sleep(0.1)
    port, socket_dir = int(lines[3]), lines[4].strip()
    query = f"host={quote(socket_dir, safe='/')}" + (
        f"&port={port}" if port != 5432 else ""
    )
    return f"postgresql://{SUPERUSER}@/{SUPERUSER}?{query}"


def _postmaster_lines(data_dir: Path) -> list[str] | None:
    """postmaster.pid lines if its postmaster is alive (and the file complete)."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
        os.kill(int(lines[0]), 0)
    except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
        return None
    except PermissionError:  # alive, but owned by another user
        pass
    return lines if len(lines) >= 8 else None


def _find_system_bindir() -> Path | None:
    found = shutil.which("initdb")
    versioned = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for bindir in ([Path(found).resolve().parent] if found else []) + versioned:
        if all((bindir / exe).is_file() for exe in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def _service_user() -> pwd.struct_passwd | None:
    """The account to run PostgreSQL as, or None to run as ourselves.

    postgres refuses to run as root. Debian's postgresql package (the one the fallback
    needs) always creates the ``postgres`` system user, so prefer it; else ``nobody``,
    which exists on every Debian system (no home dir needed by initdb/postgres). We
    switch with subprocess's user=/group= (setuid in the child), not su/runuser,
    because those accounts have no login shell.
    """
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(
        "running as root but neither a 'postgres' nor a 'nobody' user exists"
    )


def _user_owning(data_dir: Path) -> pwd.struct_passwd | None:
    uid = data_dir.stat().st_uid
    return pwd.getpwuid(uid) if os.geteuid() == 0 and uid != 0 else None


def _run(cmd: list[str | Path], user: pwd.struct_passwd | None) -> None:
    """Run cmd (as ``user`` if given). Output goes to a temp file, not a pipe: the
    postmaster forked by ``pg_ctl start`` would inherit a pipe and block reading it."""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd="/",
            text=True,
            check=False,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
        if proc.returncode:
            out.seek(0)
            raise subprocess.CalledProcessError(proc.returncode, proc.args, out.read())


def _start_with_system_postgres(bindir: Path, data_dir: Path) -> None:
    user = _service_user()
    key = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"atrium-pg-{key}.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        socket_dir = data_dir
        if len(str(data_dir / ".s.PGSQL.5432")) > _MAX_SOCKET_PATH:
            socket_dir = Path(tempfile.gettempdir()) / f"atrium-pg-{key}"
            # Not only at initdb time: the temp dir may be wiped on reboot.
            socket_dir.mkdir(mode=0o755, exist_ok=True)
            if user:
                os.chown(socket_dir, user.pw_uid, user.pw_gid)
        if not (data_dir / "PG_VERSION").exists():
            data_dir.mkdir(mode=0o700, exist_ok=True)  # initdb needs it empty
            if user:
                os.chown(data_dir, user.pw_uid, user.pw_gid)
                for parent in data_dir.parents:  # let the service user reach data_dir
                    if not parent.stat().st_mode & stat.S_IXOTH:
                        parent.chmod(parent.stat().st_mode | stat.S_IXOTH)
            init: list[str | Path] = ["-U", SUPERUSER, "--auth=trust", "-E", "UTF8"]
            _run([bindir / "initdb", "-D", data_dir, *init, "--no-instructions"], user)
        if _postmaster_lines(data_dir) is None:
            opts = f"-h '' -p 5432 -k {shlex.quote(str(socket_dir))}"
            start: list[str | Path] = [
                "-l",
                data_dir / "log",
                "-w",
                "-t",
                "60",
                "-o",
                opts,
            ]
            _run([bindir / "pg_ctl", "-D", data_dir, *start, "start"], user)
