"""Atrium against the PostGraphile peer in one sitting: same machine, PostgreSQL, data shape and load generator.

    python -m bench.compare                                    # every case, 1 and 2 processes, 8 and 32 connections
    python -m bench.compare --cases dashboard --processes 1 --connections 8 --runs 1 --duration 3

1. Data: Atrium's ``atrium_bench_50x1000`` (``bench.dashboard``'s seeding, reused when it is there), the
   peer's ``peerbench`` (its ``setup-db.sh`` when missing or not 50 x 1,000) and, for ``tenants``,
   ``atrium_bench_<T>x<D>``; prints the shape of each.
2. Statements on the wire: a private Atrium and a private peer, each connected to PostgreSQL through the
   peer's counting proxy (``sql-count-proxy.mjs``), answer a sample of each case's requests; statements
   per request count every simple query and every extended-protocol Execute, BEGIN and COMMIT included.
   These two servers also supply the deal ids and cursors of the requests files (``bench.requests``).
3. Load: per process count, Atrium under uvicorn on :8841 and the peer on :5678; per case and connection
   count both are warmed up, then wrk runs alternate (Atrium, peer, Atrium, peer, ...). Each run records
   the CPU of the server (utime+stime of its process and descendants, from /proc), of PostgreSQL (the
   backends connected to that server's database only), of wrk and of the rest of the machine, and two
   noise gauges taken just before it: ``busy_before`` (machine CPU while the servers idle) and
   ``calib_ms`` (a fixed awk loop, ~70 ms on a quiet machine here).
4. Tables of medians per case, processes and connections; ``tenants`` (Atrium only) separately.

Every server started here is stopped on the way out; traffic goes to 127.0.0.1 only; wrk runs are at
most 30 s each. Benchmarks print numbers; they are not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

from bench.dashboard import SECRET, free_port, prepare
from bench.requests import (
    ATRIUM,
    ATRIUM_DB,
    PEER_DB,
    PEER_DIR,
    SERVER,
    Line,
    atrium_owners,
    build,
    dashboard_lines,
    peer_dialect,
    registrations,
    warm_up_lines,
    window,
    write_file,
)

ROOT = Path(__file__).resolve().parent.parent
WRK_LUA = Path(__file__).with_name("wrk.lua")
CASES = ("dashboard", "readme", "deal", "mix", "tenants")
ATRIUM_PORT = 8841
PEER_PORT = 5678
MAX_SECONDS = 30
TCK = os.sysconf("SC_CLK_TCK")
FEW_TENANTS = 10
CASE_NOTES = {
    "dashboard": "the peer's dashboard selection on both",
    "readme": "Atrium's README dashboard (bench.dashboard.DASHBOARD: more fields, edges and pageInfo) "
              "against the peer's dashboard",
    "deal": "one deal by id, the 10 largest deals of every tenant",
    "mix": "90 % reads (dashboards, deal pages, deal-list pages by cursor), 10 % deal title updates; "
           "Atrium's reads are persisted documents with Atrium-Cache: on",
}


@dataclass(frozen=True)
class Options:
    cases: tuple[str, ...]
    processes: tuple[int, ...]
    connections: tuple[int, ...]
    runs: int
    duration: int
    warmup: int
    pause: float
    timeout: int
    redis_url: str | None
    server: str
    peer_dir: Path
    tenants: int
    tenant_deals: int
    sql_requests: int

    @property
    def peer_cases(self) -> tuple[str, ...]:
        return tuple(c for c in self.cases if c != "tenants")


# --------------------------------------------------------------------------------------------------
# CPU accounting from /proc


@dataclass(frozen=True)
class Proc:
    ppid: int
    ticks: int
    """utime + stime, in clock ticks."""
    comm: str


@dataclass(frozen=True)
class Snapshot:
    procs: dict[int, Proc]
    machine: int
    """Busy ticks of all CPUs (user, nice, system, irq, softirq, steal)."""
    children_cpu: float
    """CPU seconds of the waited-for children of this process (wrk)."""


def proc_table() -> dict[int, Proc]:
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        close = stat.rindex(")")
        fields = stat[close + 2:].split()  # from field 3 (state): ppid is field 4, utime 14, stime 15
        comm = stat[stat.index("(") + 1:close]
        table[int(entry.name)] = Proc(int(fields[1]), int(fields[11]) + int(fields[12]), comm)
    return table


def machine_ticks() -> int:
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return user + nice + system + irq + softirq + steal


def snapshot() -> Snapshot:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Snapshot(proc_table(), machine_ticks(), usage.ru_utime + usage.ru_stime)


def family(procs: dict[int, Proc], root: int) -> set[int]:
    """``root`` and all of its descendants (uvicorn or node:cluster workers)."""
    members = {root}
    while new := {pid for pid, p in procs.items() if p.ppid in members} - members:
        members |= new
    return members


def backends(procs: dict[int, Proc], database: str) -> set[int]:
    """PostgreSQL backends connected to ``database`` (process title ``postgres: [cluster:] user db ...``)."""
    found = set()
    for pid, p in procs.items():
        if p.comm != "postgres":
            continue
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").split()
        except OSError:
            continue
        rest = title[1:] if title[:1] == ["postgres:"] else []
        if rest and rest[0].endswith(":"):
            rest = rest[1:]
        if len(rest) > 1 and rest[1] == database:
            found.add(pid)
    return found


def spent(before: Snapshot, after: Snapshot, pids: set[int]) -> int:
    """Ticks the processes ``pids`` (alive at ``after``) used between the snapshots."""
    return sum(after.procs[p].ticks - (before.procs[p].ticks if p in before.procs else 0)
               for p in pids if p in after.procs)


def top_others(before: Snapshot, after: Snapshot, ours: set[int], seconds: float) -> str:
    """The three busiest processes that are not ours (e.g. someone's test run), in % of one core."""
    deltas = sorted(((after.procs[p].ticks - (before.procs[p].ticks if p in before.procs else 0), after.procs[p].comm)
                     for p in after.procs if p not in ours), reverse=True)[:3]
    shown = [f"{comm}:{100 * d / TCK / seconds:.0f}%" for d, comm in deltas if 100 * d / TCK / seconds >= 1]
    return ",".join(shown) or "none"


def gauges(pause: float) -> tuple[float, float]:
    """(machine CPU busy in % of one core over ``pause`` s, before a run; ms of a fixed awk loop)."""
    m0 = machine_ticks()
    time.sleep(pause)
    busy = 100 * (machine_ticks() - m0) / TCK / pause
    t0 = time.perf_counter()
    subprocess.run(["awk", "BEGIN { for (i = 0; i < 2000000; i++) s += i * i; print s }"],
                   stdout=subprocess.DEVNULL, check=True)
    return busy, (time.perf_counter() - t0) * 1000


# --------------------------------------------------------------------------------------------------
# wrk runs


@dataclass(frozen=True)
class Target:
    """A server under load, the process whose CPU is its own, and the database whose backends serve it."""

    name: str
    url: str
    pid: int
    database: str


@dataclass(frozen=True)
class Run:
    rps: float
    p50: float
    p99: float
    bad: int
    """Non-200 answers, answers with errors, and socket errors (timeouts included)."""
    server_ms: float
    pg_ms: float


@dataclass(frozen=True)
class Summary:
    """Medians of a configuration's runs (``bad``: the total)."""

    rps: float
    p50: float
    p99: float
    bad: int
    server_ms: float
    pg_ms: float

    @classmethod
    def of(cls, runs: Sequence[Run]) -> Summary:
        def median(values: Sequence[float]) -> float:
            return float(statistics.median(values))

        return cls(median([r.rps for r in runs]), median([r.p50 for r in runs]), median([r.p99 for r in runs]),
                   sum(r.bad for r in runs), median([r.server_ms for r in runs]), median([r.pg_ms for r in runs]))


def wrk(url: str, requests_file: Path, connections: int, seconds: int, timeout: int) -> dict[str, float]:
    """One wrk run over ``requests_file`` (bench/wrk.lua); its RESULT line as numbers."""
    env = {**os.environ, "BENCH_REQUESTS_FILE": str(requests_file), "BENCH_PATH": "/graphql",
           "BENCH_NONCE": str(time.time_ns())}
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", f"{timeout}s", "--latency",
         "-s", str(WRK_LUA), url],
        env=env, capture_output=True, text=True, timeout=seconds + 60, check=True)
    for line in out.stdout.splitlines():
        if line.startswith("BAD_SAMPLE"):
            print(f"    {line}", file=sys.stderr)
        if line.startswith("RESULT "):
            return {key: float(value) for key, value in (kv.split("=") for kv in line.split()[1:])}
    raise RuntimeError(f"wrk printed no RESULT line:\n{out.stdout}\n{out.stderr}")


def warm_up(target: Target, requests_file: Path, connections: int, opts: Options) -> None:
    if opts.warmup > 0:
        result = wrk(target.url, requests_file, connections, opts.warmup, opts.timeout)
        if result["bad"]:
            raise RuntimeError(f"{target.name}: {result['bad']:.0f} bad responses during the warm-up")


def measure(target: Target, requests_file: Path, connections: int, opts: Options, label: str) -> Run:
    """One measured wrk run with its CPU accounting; prints its line."""
    busy_before, calib_ms = gauges(opts.pause)
    load1 = os.getloadavg()[0]
    before = snapshot()
    result = wrk(target.url, requests_file, connections, opts.duration, opts.timeout)
    after = snapshot()
    server_pids, pg_pids = family(after.procs, target.pid), backends(after.procs, target.database)
    server, pg = spent(before, after, server_pids), spent(before, after, pg_pids)
    wrk_ticks = (after.children_cpu - before.children_cpu) * TCK
    other = max(0.0, after.machine - before.machine - server - pg - wrk_ticks)
    seconds, n = result["duration_s"], max(1.0, result["requests"])

    def pct(ticks: float) -> str:
        return f"{100 * ticks / TCK / seconds:.0f}%"

    run = Run(result["rps"], result["p50_ms"], result["p99_ms"], int(result["bad"] + result["socket_errors"]),
              1000 * server / TCK / n, 1000 * pg / TCK / n)
    print(f"  {target.name:<7} {label}: {run.rps:7.1f} req/s  p50 {run.p50:7.1f} ms  p99 {run.p99:7.1f} ms  "
          f"bad {run.bad}  CPU ms/req server {run.server_ms:.2f} pg {run.pg_ms:.2f}  "
          f"CPU server {pct(server)} pg {pct(pg)} wrk {pct(wrk_ticks)} other {pct(other)}  "
          f"busy_before {busy_before:.0f}% calib_ms {calib_ms:.0f} load1 {load1:.2f} "
          f"top_other {top_others(before, after, server_pids | pg_pids | {os.getpid()}, seconds)}", flush=True)
    return run


def alternate(sides: Sequence[tuple[Target, Path]], connections: int, opts: Options, label: str) -> list[list[Run]]:
    """Warm every side up, then ``opts.runs`` rounds of one run per side in turn; the runs per side."""
    for target, requests_file in sides:
        warm_up(target, requests_file, connections, opts)
    runs: list[list[Run]] = [[] for _ in sides]
    for i in range(opts.runs):
        for side, (target, requests_file) in zip(runs, sides, strict=True):
            side.append(measure(target, requests_file, connections, opts, f"{label} run {i + 1}"))
    return runs


# --------------------------------------------------------------------------------------------------
# Servers


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def answers(url: str, body: dict[str, object] | None = None, headers: dict[str, str] | None = None) -> bool:
    try:
        r = httpx.post(url, json=body, headers=headers, timeout=2) if body is not None else httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate ``proc`` (and, if it does not go, kill its process group: it was started in a session of its own)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def spawn(what: str, cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path,
          ready: Callable[[], bool]) -> Iterator[int]:
    """Start ``cmd``, wait until ``ready()``, yield its pid; always stop it afterwards."""
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(f"{what} did not start:\n{tail}")
            time.sleep(0.2)
        yield proc.pid
    finally:
        stop(proc)


def atrium_env(opts: Options, *, database_url: str | None = None, app_url: str | None = None) -> dict[str, str]:
    """Atrium's environment: production, rate limits off, the bench secret; Redis only when asked for."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "ATRIUM_APP_DATABASE_URL", "REDIS_URL")}
    env |= {"ATRIUM_JWT_SECRET": SECRET, "ATRIUM_ENV": "production", "ATRIUM_RATE_LIMITS": "off"}
    if database_url:
        env["DATABASE_URL"] = database_url
    if app_url:
        env["ATRIUM_APP_DATABASE_URL"] = app_url
    if opts.redis_url:
        env["REDIS_URL"] = opts.redis_url
    return env


def atrium(env: dict[str, str], port: int, workers: int, logs: Path) -> AbstractContextManager[int]:
    """Atrium under uvicorn with ``workers`` processes on ``port`` (the command of the README)."""
    cmd = [sys.executable, "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--host", "127.0.0.1",
           "--port", str(port), "--workers", str(workers), "--log-level", "warning", "--no-access-log"]
    return spawn(f"Atrium on :{port}", cmd, cwd=ROOT, env=env, log=logs / f"atrium-{port}.log",
                 ready=lambda: answers(f"http://127.0.0.1:{port}/healthz"))


def peer_env() -> dict[str, str]:
    """The caller's environment without PEER_* settings: the peer as its README describes it."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PEER_")}


def node(opts: Options) -> str:
    return str(opts.peer_dir / "node_modules" / ".bin" / "node")


def peer_answers(port: int) -> bool:
    return answers(f"http://127.0.0.1:{port}/graphql", {"query": "{__typename}"},
                   {"x-tenant-id": "00000000-0000-0000-0000-000000000000"})


@contextmanager
def peer(opts: Options, workers: int) -> Iterator[int]:
    """The peer on :5678 by its own script (``PEER_WORKERS=N ./run-postgraphile.sh --background``)."""
    env = peer_env() | {"PEER_WORKERS": str(workers)}
    try:
        subprocess.run(["./run-postgraphile.sh", "--background"], cwd=opts.peer_dir, env=env, check=True)
        yield int((opts.peer_dir / "postgraphile.pid").read_text())
    finally:
        subprocess.run(["./run-postgraphile.sh", "--stop"], cwd=opts.peer_dir, env=env, check=False)


def private_peer(opts: Options, database_url: str, port: int, logs: Path) -> AbstractContextManager[int]:
    """A peer process of our own (not the pid-file one) on ``port``, connected to ``database_url``."""
    env = peer_env() | {"NODE_ENV": "production", "GRAPHILE_ENV": "production", "PEER_DATABASE_URL": database_url,
                        "PEER_PORT": str(port), "PEER_WORKERS": "1"}
    return spawn(f"private peer on :{port}", [node(opts), "server.mjs"], cwd=opts.peer_dir, env=env,
                 log=logs / f"peer-{port}.log", ready=lambda: peer_answers(port))


@contextmanager
def counting_proxy(opts: Options, logs: Path) -> Iterator[tuple[int, str]]:
    """The peer's statement-counting PostgreSQL proxy; yields (its port, its control URL)."""
    listen, control = free_port(), free_port()
    upstream = opts.server.rsplit("@", 1)[-1]
    cmd = [node(opts), str(opts.peer_dir / "sql-count-proxy.mjs"), "--listen", str(listen), "--control",
           str(control), "--upstream", upstream]
    with spawn("counting proxy", cmd, cwd=opts.peer_dir, env=peer_env(), log=logs / f"proxy-{listen}.log",
               ready=lambda: answers(f"http://127.0.0.1:{control}/stats")):
        yield listen, f"http://127.0.0.1:{control}"


# --------------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class Shape:
    """Row counts of a benchmark database."""

    tenants: int
    users: int
    companies: int
    contacts: int
    stages: int
    deals: int
    deals_with_contact: int
    activities: int
    activities_with_body: int

    def line(self, name: str) -> str:
        t, d, a = max(1, self.tenants), max(1, self.deals), max(1, self.activities)
        return (f"  {name:<24} {self.tenants:>7} {self.deals / t:>8.0f} {self.activities / d:>9.2f} "
                f"{self.users / t:>7.1f} {self.companies / t:>9.1f} {self.contacts / t:>8.1f} {self.stages / t:>6.1f} "
                f"{100 * self.deals_with_contact / d:>7.0f}% {100 * self.activities_with_body / a:>7.0f}%")


SHAPE_HEADER = (f"  {'database':<24} {'tenants':>7} {'deals/t':>8} {'acts/deal':>9} {'users/t':>7} {'companies':>9} "
                f"{'contacts':>8} {'stages':>6} {'contact':>8} {'body':>8}")
ATRIUM_SHAPE = """SELECT (SELECT count(*) FROM tenants), (SELECT count(*) FROM memberships),
  (SELECT count(*) FROM companies), (SELECT count(*) FROM contacts), (SELECT count(*) FROM stages),
  (SELECT count(*) FROM deals), (SELECT count(*) FROM deals WHERE contact_id IS NOT NULL),
  (SELECT count(*) FROM activities WHERE deal_id IS NOT NULL),
  (SELECT count(*) FROM activities WHERE deal_id IS NOT NULL AND body IS NOT NULL)"""
PEER_SHAPE = """SELECT (SELECT count(*) FROM crm.tenants), (SELECT count(*) FROM crm.users),
  (SELECT count(*) FROM crm.companies), (SELECT count(*) FROM crm.contacts), (SELECT count(*) FROM crm.stages),
  (SELECT count(*) FROM crm.deals), (SELECT count(*) FROM crm.deals WHERE contact_id IS NOT NULL),
  (SELECT count(*) FROM crm.activities), (SELECT count(*) FROM crm.activities WHERE body <> '')"""


async def shape_of(url: str, sql: str) -> Shape | None:
    """The shape of the database at ``url``; None when it or its tables do not exist."""
    try:
        conn = await asyncpg.connect(url)
    except asyncpg.InvalidCatalogNameError:
        return None
    try:
        row = await conn.fetchrow(sql)
    except asyncpg.UndefinedTableError:
        return None
    finally:
        await conn.close()
    return Shape(*(int(v) for v in row.values()))


def atrium_database(opts: Options, tenants: int, deals: int) -> str:
    """``atrium_bench_<tenants>x<deals>``, migrated and seeded by ``bench.dashboard`` unless already seeded."""
    os.environ["DATABASE_URL"] = f"{opts.server}/postgres"  # where bench.dashboard.prepare creates it
    url, _ = asyncio.run(prepare(argparse.Namespace(tenants=tenants, deals=deals, reuse=True)))
    return f"{opts.server}/{url.rsplit('/', 1)[-1]}"


def peer_database(opts: Options) -> str:
    """``peerbench``; (re)seeded by the peer's ``setup-db.sh`` unless it holds 50 tenants x 1,000 deals."""
    url = f"{opts.server}/{PEER_DB}"
    shape = asyncio.run(shape_of(url, PEER_SHAPE))
    if shape is None or (shape.tenants, shape.deals) != (50, 50_000):
        print(f"seeding {PEER_DB} with the peer's ./setup-db.sh", flush=True)
        subprocess.run(["./setup-db.sh"], cwd=opts.peer_dir, env=peer_env(), check=True, stdout=subprocess.DEVNULL)
    return url


@dataclass
class Data:
    """The databases' URLs (None: not needed by the chosen cases) and their shapes by name."""

    atrium: str | None = None
    peer: str | None = None
    many: str | None = None
    """The ``tenants`` case's database."""
    shapes: dict[str, Shape] = field(default_factory=dict)


def prepare_data(opts: Options) -> Data:
    data = Data()
    if opts.peer_cases:
        data.atrium, data.peer = atrium_database(opts, 50, 1000), peer_database(opts)
    if "tenants" in opts.cases:
        print(f"atrium_bench_{opts.tenants}x{opts.tenant_deals}: reused, or seeded now "
              f"(10,000 x 20 took 4 minutes on this machine)", flush=True)
        data.many = atrium_database(opts, opts.tenants, opts.tenant_deals)
    for url, sql in ((data.atrium, ATRIUM_SHAPE), (data.peer, PEER_SHAPE), (data.many, ATRIUM_SHAPE)):
        if url and (shape := asyncio.run(shape_of(url, sql))) is not None:
            data.shapes[url.rsplit("/", 1)[-1]] = shape
    print("data shapes (per tenant unless noted; contact: deals with a contact; body: activities with a body)")
    print(SHAPE_HEADER)
    for name, shape in data.shapes.items():
        print(shape.line(name))
    return data


# --------------------------------------------------------------------------------------------------
# Requests files and statements on the wire


@dataclass(frozen=True)
class Pair:
    """One case's requests for both servers."""

    atrium: list[Line]
    peer: list[Line]
    atrium_file: Path
    peer_file: Path


@dataclass(frozen=True)
class Statements:
    per_request: float
    by_kind: dict[str, float]
    """Statements per request of each kind of request (dashboard, deal, list, update)."""
    texts: list[tuple[float, str]]
    """(executions per request, statement text), most frequent first."""


def send(client: httpx.Client, url: str, lines: Sequence[Line]) -> list[httpx.Response]:
    """POST ``lines`` one after the other; raises unless every answer is a 200 without errors."""
    responses = []
    for line in lines:
        r = client.post(url, content=line.unique_body(),
                        headers={"content-type": "application/json", **dict(line.headers)})
        if r.status_code != 200 or "errors" in r.json():
            raise RuntimeError(f"{line.kind} request to {url} failed: {r.status_code} {r.text[:300]}")
        responses.append(r)
    return responses


def register(url: str, lines: Sequence[Line]) -> None:
    """Register the persisted documents of ``lines`` (APQ: hash and text) on the server at ``url``."""
    with httpx.Client(timeout=60) as client:
        send(client, url, registrations(lines))


def count_statements(url: str, control: str, lines: Sequence[Line], sample: int) -> Statements:
    """Statements per request on the wire for the first ``sample`` lines, once each of their tenants is warm.

    The warm-up sends other requests of the same tenants (``warm_up_lines``), so the counts do not
    depend on which case ran first; the counted reads are first-time requests (cache misses). The
    proxy's running total is read after every request, which gives the counts per kind of request.
    """
    with httpx.Client(timeout=60) as client:
        send(client, url, warm_up_lines(lines, sample))
        client.post(f"{control}/reset")
        by_kind: dict[str, list[int]] = {}
        total = 0
        for line in window(lines, 0, sample):
            send(client, url, [line])
            stats = client.get(f"{control}/stats").json()
            by_kind.setdefault(line.kind, []).append(stats["statements"] - total)
            total = stats["statements"]
    n = sum(len(counts) for counts in by_kind.values())
    return Statements(total / n, {kind: statistics.fmean(counts) for kind, counts in by_kind.items()},
                      [(t["calls"] / n, " ".join(t["text"].split())) for t in stats["byText"]])


def print_statements(case: str, name: str, s: Statements) -> None:
    kinds = ", ".join(f"{kind} {n:.2f}" for kind, n in s.by_kind.items()) if len(s.by_kind) > 1 else ""
    print(f"  {case:<9} {name:<6} {s.per_request:5.2f} statements/request{f' ({kinds})' if kinds else ''}")
    for calls, text in s.texts[:8]:
        print(f"      {calls:5.2f} x {text[:110]}{'...' if len(text) > 110 else ''}")


def prepare_requests(opts: Options, data: Data, work: Path) -> tuple[dict[str, Pair], dict[str, tuple[float, float]]]:
    """Build every case's requests files and count their statements, on private servers behind counting proxies."""
    assert data.atrium is not None and data.peer is not None
    peer_users = round(data.shapes[ATRIUM_DB].users / max(1, data.shapes[ATRIUM_DB].tenants))
    pairs: dict[str, Pair] = {}
    counts: dict[str, tuple[float, float]] = {}
    with ExitStack() as stack:
        atrium_proxy, atrium_control = stack.enter_context(counting_proxy(opts, work))
        peer_proxy, peer_control = stack.enter_context(counting_proxy(opts, work))
        atrium_port, peer_port = free_port(), free_port()
        app_url = f"postgresql://atrium_app@127.0.0.1:{atrium_proxy}/{ATRIUM_DB}"
        stack.enter_context(atrium(atrium_env(opts, app_url=app_url), atrium_port, 1, work))
        stack.enter_context(private_peer(opts, f"postgres://peer_crm_app@127.0.0.1:{peer_proxy}/{PEER_DB}",
                                         peer_port, work))
        atrium_url, peer_url = f"http://127.0.0.1:{atrium_port}/graphql", f"http://127.0.0.1:{peer_port}/graphql"
        print(f"statements on the wire (counting proxy; {opts.sql_requests} requests per case, "
              "BEGIN and COMMIT included)", flush=True)
        for case in opts.peer_cases:
            a = asyncio.run(build(case, ATRIUM, atrium_url, data.atrium))
            p = asyncio.run(build(case, peer_dialect(opts.peer_dir), peer_url, data.peer, users=peer_users))
            pairs[case] = Pair(a, p, work / f"{case}-atrium.tsv", work / f"{case}-peer.tsv")
            write_file(pairs[case].atrium_file, a)
            write_file(pairs[case].peer_file, p)
            register(atrium_url, a)
            sa = count_statements(atrium_url, atrium_control, a, opts.sql_requests)
            sp = count_statements(peer_url, peer_control, p, opts.sql_requests)
            print_statements(case, "atrium", sa)
            print_statements(case, "peer", sp)
            counts[case] = (sa.per_request, sp.per_request)
    return pairs, counts


def cache_tally(url: str, lines: Sequence[Line], sample: int) -> str:
    """Atrium-Cache response headers of the persisted reads among ``sample`` mix lines, sent one by one."""
    chosen = window(lines, 0, sample)
    with httpx.Client(timeout=60) as client:
        responses = send(client, url, chosen)
    tally = Counter((line.kind, r.headers.get("atrium-cache", "absent"))
                    for line, r in zip(chosen, responses, strict=True) if line.document is not None)
    kinds = sorted({kind for kind, _ in tally})
    return "; ".join(f"{kind} " + " ".join(f"{value}={n}" for (k, value), n in sorted(tally.items()) if k == kind)
                     for kind in kinds)


# --------------------------------------------------------------------------------------------------
# The comparisons


@dataclass(frozen=True)
class Row:
    case: str
    processes: int
    connections: int
    atrium: Summary
    other: Summary
    """The peer's figures, or (``tenants``) Atrium's over the few tenants."""


def compare_servers(opts: Options, data: Data, pairs: dict[str, Pair], work: Path) -> list[Row]:
    """Atrium and the peer, alternately, per process count, case and connection count."""
    rows = []
    atrium_url, peer_url = f"http://127.0.0.1:{ATRIUM_PORT}/graphql", f"http://127.0.0.1:{PEER_PORT}/graphql"
    for n in opts.processes:
        print(f"\n== {n} process(es): Atrium on :{ATRIUM_PORT}, peer on :{PEER_PORT}", flush=True)
        with atrium(atrium_env(opts, database_url=data.atrium), ATRIUM_PORT, n, work) as atrium_pid, \
                peer(opts, n) as peer_pid:
            a = Target("atrium", atrium_url, atrium_pid, ATRIUM_DB)
            p = Target("peer", peer_url, peer_pid, PEER_DB)
            for case, pair in pairs.items():
                register(atrium_url, pair.atrium)
                for c in opts.connections:
                    ra, rp = alternate([(a, pair.atrium_file), (p, pair.peer_file)], c, opts, f"{case} p={n} c={c}")
                    rows.append(Row(case, n, c, Summary.of(ra), Summary.of(rp)))
                if case == "mix":
                    sample = 10 * opts.sql_requests
                    print(f"  Atrium-Cache over {sample} mix requests: {cache_tally(atrium_url, pair.atrium, sample)}")
    return rows


def compare_tenants(opts: Options, data: Data, work: Path) -> list[Row]:
    """Atrium's dashboard over the first 10 tenants and over all of them, alternately, on one server."""
    assert data.many is not None
    tenants = asyncio.run(atrium_owners(data.many))
    few, many = work / "tenants-few.tsv", work / "tenants-many.tsv"
    write_file(few, dashboard_lines(tenants[:FEW_TENANTS], ATRIUM.dashboard))
    write_file(many, dashboard_lines(tenants, ATRIUM.dashboard))
    database = data.many.rsplit("/", 1)[-1]
    url = f"http://127.0.0.1:{ATRIUM_PORT}/graphql"
    rows = []
    for n in opts.processes:
        print(f"\n== tenants, {n} process(es): Atrium on :{ATRIUM_PORT} over {database}", flush=True)
        with atrium(atrium_env(opts, database_url=data.many), ATRIUM_PORT, n, work) as pid:
            sides = [(Target(f"t={len(tenants)}", url, pid, database), many),
                     (Target(f"t={FEW_TENANTS}", url, pid, database), few)]
            for c in opts.connections:
                r_many, r_few = alternate(sides, c, opts, f"tenants p={n} c={c}")
                rows.append(Row("tenants", n, c, Summary.of(r_many), Summary.of(r_few)))
    return rows


# --------------------------------------------------------------------------------------------------
# Output


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def print_table(rows: Sequence[Row], statements: dict[str, tuple[float, float]]) -> None:
    print("\nAtrium vs PostGraphile (medians; CPU and statements per request; bad = failed requests, all runs)")
    print(f"{'case':<10}{'proc':>5}{'conn':>5} | {'Atrium r/s':>10}{'p50':>8}{'p99':>8} | {'peer r/s':>9}{'p50':>8}"
          f"{'p99':>8} | {'ratio':>5} | {'server ms A/P':>13} | {'PG ms A/P':>11} | {'SQL A/P':>9} | bad A/P")
    for r in rows:
        sa, sp = statements.get(r.case, (0.0, 0.0))
        print(f"{r.case:<10}{r.processes:>5}{r.connections:>5} | {r.atrium.rps:>10.1f}{r.atrium.p50:>8.1f}"
              f"{r.atrium.p99:>8.1f} | {r.other.rps:>9.1f}{r.other.p50:>8.1f}{r.other.p99:>8.1f} | "
              f"{ratio(r.atrium.rps, r.other.rps):>5} | {r.atrium.server_ms:>6.2f}/{r.other.server_ms:<6.2f} | "
              f"{r.atrium.pg_ms:>5.2f}/{r.other.pg_ms:<5.2f} | {sa:>4.1f}/{sp:<4.1f} | {r.atrium.bad}/{r.other.bad}")
    print("latency in ms; ratio = Atrium req/s / peer req/s")
    for case in dict.fromkeys(r.case for r in rows):
        print(f"  {case}: {CASE_NOTES[case]}")


def print_tenants(rows: Sequence[Row], opts: Options) -> None:
    print(f"\ntenants: Atrium's dashboard (the peer's selection, first 50 of {opts.tenant_deals} deals) over "
          f"{opts.tenants} tenants vs over {FEW_TENANTS}, one server (medians)")
    print(f"{'proc':>4}{'conn':>5} | {'many r/s':>9}{'p50':>8}{'p99':>8} | {'few r/s':>8}{'p50':>8}{'p99':>8} | "
          f"p99 many/few | bad many/few")
    for r in rows:
        print(f"{r.processes:>4}{r.connections:>5} | {r.atrium.rps:>9.1f}{r.atrium.p50:>8.1f}{r.atrium.p99:>8.1f} | "
              f"{r.other.rps:>8.1f}{r.other.p50:>8.1f}{r.other.p99:>8.1f} | {ratio(r.atrium.p99, r.other.p99):>12} | "
              f"{r.atrium.bad}/{r.other.bad}")


def describe(opts: Options) -> str:
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return (f"bench.compare {time.strftime('%Y-%m-%d %H:%M')} commit {commit}, {os.cpu_count()} cores; "
            f"cases {','.join(opts.cases)}; processes {opts.processes}; connections {opts.connections}; "
            f"{opts.runs} runs x {opts.duration} s after {opts.warmup} s warm-up; wrk -t1 --timeout {opts.timeout}s; "
            f"redis {opts.redis_url or 'off'}")


# --------------------------------------------------------------------------------------------------
# Command line


def parse_options(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--processes", nargs="+", type=int, default=[1, 2], help="server processes (both servers)")
    parser.add_argument("--connections", nargs="+", type=int, default=[8, 32], help="wrk connections")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per server and configuration")
    parser.add_argument("--duration", type=int, default=10, help=f"seconds per run (at most {MAX_SECONDS})")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of warm-up per server and configuration")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds of idle sampling before each run")
    parser.add_argument("--timeout", type=int, default=10, help="wrk --timeout in seconds")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="Atrium's REDIS_URL (default: none)")
    parser.add_argument("--server", default=SERVER, help="PostgreSQL server URL, as a superuser, without database")
    parser.add_argument("--peer-dir", type=Path, default=PEER_DIR)
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants of the tenants case")
    parser.add_argument("--tenant-deals", type=int, default=20, help="deals per tenant of the tenants case")
    parser.add_argument("--sql-requests", type=int, default=40, help="requests per case for the statement counts")
    args = parser.parse_args(argv)
    for name in ("duration", "warmup"):
        if getattr(args, name) > MAX_SECONDS:
            print(f"--{name} capped at {MAX_SECONDS} s (shared machine)", file=sys.stderr)
            setattr(args, name, MAX_SECONDS)
    if min(args.processes + args.connections) < 1 or args.runs < 1 or args.duration < 1:
        parser.error("processes, connections, runs and duration must be at least 1")
    return Options(tuple(dict.fromkeys(args.cases)), tuple(args.processes), tuple(args.connections), args.runs,
                   args.duration, args.warmup, args.pause, args.timeout, args.redis_url, args.server.rstrip("/"),
                   args.peer_dir.resolve(), args.tenants, args.tenant_deals, args.sql_requests)


def preflight(opts: Options) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    if opts.peer_cases and not (opts.peer_dir / "node_modules" / "postgraphile").is_dir():
        sys.exit(f"the peer is not installed: cd {opts.peer_dir} && npm ci")
    for port in (ATRIUM_PORT, PEER_PORT):
        if listening(port):
            sys.exit(f"127.0.0.1:{port} is already in use; stop that server first "
                     f"(the peer: {opts.peer_dir}/run-postgraphile.sh --stop)")


def main() -> None:
    opts = parse_options()
    preflight(opts)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop the servers
    print(describe(opts), flush=True)
    data = prepare_data(opts)
    rows: list[Row] = []
    tenant_rows: list[Row] = []
    statements: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="atrium-compare-") as tmp:
        work = Path(tmp)
        if opts.peer_cases:
            pairs, statements = prepare_requests(opts, data, work)
            rows = compare_servers(opts, data, pairs, work)
        if "tenants" in opts.cases:
            tenant_rows = compare_tenants(opts, data, work)
    if rows:
        print_table(rows, statements)
    if tenant_rows:
        print_tenants(tenant_rows, opts)


if __name__ == "__main__":
    main()
