"""Overload benchmark: one tenant floods one Atrium process; another tenant's latency is measured.

Seeds two tenants (``flood`` and ``calm``, D deals each) into a database of its own
(``overload_bench``, vacuumed and analyzed once seeded), starts one Atrium process under uvicorn
(production settings, rate limits off so that admission alone stands between the flood and the
process, ``--http atrium.http.deadline:HttpProtocol`` as deployed) on 127.0.0.1, and runs, in order:

1. ``calm`` alone: its dashboard query (first 20 deals with company, contact, owner, stage and 3
   activities) sent at a fixed rate (open loop, so that a slow answer does not hide the next
   request's wait): p50/p99 unloaded.
2. Two identical bursts: ``--flood`` clients of ``flood`` sending the same query in a closed loop
   from a process of their own, while ``calm`` is measured as in 1. Each flood client either sleeps
   what ``Retry-After`` says after a 503, times 1 to 2 at random (``--flood-retry after``, what a
   well-behaved client does: retry libraries add jitter so that refused clients do not return together) or
   sends its next request at once (``immediate``, a hostile one). Printed: calm's p50/p99, the flood's
   answers by status with the latency of each, and the server's RSS before, between and after.
   With each burst, the CPU each party used (percent of one core: the server, the flood's
   generator, this process measuring ``calm``, and the whole machine's busy share of its cores):
   on a small machine the generator competes with the server for the same cores.
   ``--flood-driver wrk`` drives the same flood (same clients, same request, same retry behaviour)
   from wrk (``bench/overload_flood.lua``) instead of Python, for a fraction of the CPU; it reports
   the flood's answers by status and their latency as a whole (wrk does not split it by status).
3. ``--websockets`` idle graphql-transport-ws connections (initialised, then silent) opened and
   closed, twice: RSS while open, and after they closed *and the server trimmed its memory* (the
   bench waits for the trimmer's log line, ``atrium.observability.memory``, rather than a fixed time).
4. The same number of WebSockets that never send ``connection_init``, twice: how long the server let
   them live (``ATRIUM_WS_INIT_TIMEOUT``, then 4408) and RSS after the trim.
5. ``--slowloris`` connections dribbling header bytes: how long the server lets them live.

Not a test: numbers only. Bounded in count and time; everything on 127.0.0.1. The server's own log
lines go to a file (its path is printed).

    python -m bench.overload --flood 200 --seconds 15 --flood-retry after [--flood-driver wrk]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url
from websockets.asyncio.client import ClientConnection, connect

from atrium.ops.bootstrap import resolve_database
from atrium.ops.demo import DemoTenant, demo_password_hash, seed_tenant
from auth.tokens import issue_token
from bench.dashboard import SECRET, free_port
from bench.databases import fresh_database, settled_database
from core.pgurl import libpq_url
from core.settings import Settings
from models.tables import Role

DATABASE = "overload_bench"
ROOT = Path(__file__).resolve().parent.parent
QUERY = """query Dashboard { deals(first: 20) { totalCount edges { node {
  id title amount currency status expectedCloseDate company { id name } contact { id name email }
  owner { id name } stage { id name probability } activities(first: 3) { kind subject occurredAt } } } } }"""


# ---- a small HTTP/1.1 client: keep-alive, one request at a time (cheap, so the flood is strong) ----


@dataclass
class Answer:
    status: int
    seconds: float
    retry_after: float = 0.0


class Connection:
    """One kept-alive HTTP/1.1 connection to the server."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        body = json.dumps({"query": QUERY}).encode()
        self.request = (b"POST /graphql HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                        b"authorization: Bearer " + token.encode() + b"\r\ncontent-length: "
                        + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self) -> Answer:
        """Send the request; a kept-alive connection the server closed meanwhile (its keep-alive timeout)
        is replaced and the request sent once more, as HTTP clients do."""
        reused = self.writer is not None
        answer = await self._send()
        if answer.status == 0 and reused:
            answer = await self._send()
        return answer

    async def _send(self) -> Answer:
        started = time.perf_counter()
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            self.writer.write(self.request)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            headers = dict(line.split(b": ", 1) for line in lines[1:] if b": " in line)
            headers = {k.lower(): v for k, v in headers.items()}
            await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
            if headers.get(b"connection") == b"close":
                self.close()
            return Answer(status, time.perf_counter() - started, float(headers.get(b"retry-after", b"0")))
        except (OSError, asyncio.IncompleteReadError, ValueError):
            self.close()
            return Answer(0, time.perf_counter() - started)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def describe(values: list[float]) -> str:
    return f"n={len(values)} p50={percentile(values, 0.5):.1f}ms p99={percentile(values, 0.99):.1f}ms"


# ---- CPU: who used the machine's cores during a phase ----

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICKS, sum(values) / TICKS


class CpuMeter:
    """CPU used by each named process between ``start`` and ``stop``, as percent of one core; the
    machine's busy share of all its cores."""

    def __init__(self) -> None:
        self._pids: dict[str, int] = {}
        self._started: dict[str, float] = {}
        self._machine = (0.0, 0.0)
        self._at = 0.0
        self.used: dict[str, float] = {}

    def watch(self, name: str, pid: int) -> None:
        self._pids[name] = pid
        self._started[name] = cpu_seconds(pid)

    def start(self) -> None:
        self._machine, self._at = machine_busy(), time.perf_counter()
        for name, pid in self._pids.items():
            self._started[name] = cpu_seconds(pid)

    def sample(self, name: str) -> None:
        """Read ``name`` now (a process about to exit); one already gone is not counted."""
        seconds = cpu_seconds(self._pids[name])
        if seconds > 0:
            self.used[name] = seconds - self._started[name]

    def stop(self) -> str:
        elapsed = time.perf_counter() - self._at
        for name in self._pids:
            if name not in self.used:
                self.sample(name)
        gone = [name for name in self._pids if name not in self.used]
        busy, total = machine_busy()
        share = (busy - self._machine[0]) / max(1e-9, total - self._machine[1])
        parts = [f"{name}={100 * seconds / elapsed:.0f}%" for name, seconds in self.used.items()]
        parts += [f"{name}=(exited before it was read)" for name in gone]
        return f"cpu (% of one core): {' '.join(parts)}; machine busy {share:.0%} of {os.cpu_count()} cores"


# ---- the measured tenant: open loop at a fixed rate ----


async def measure(port: int, token: str, rate: float, seconds: float) -> list[Answer]:
    answers: list[Answer] = []
    idle: list[Connection] = []

    async def one() -> None:
        conn = idle.pop() if idle else Connection(port, token)
        answers.append(await conn.send())
        idle.append(conn)

    tasks = []
    started = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    await asyncio.gather(*tasks)
    for conn in idle:
        conn.close()
    return answers


# ---- the flood: its own process, so that its work does not delay the measurement's clock ----


def flood_process(port: int, token: str, clients: int, seconds: float, retry: str,
                  out: Any) -> None:
    async def run() -> list[tuple[int, float]]:
        deadline = time.perf_counter() + seconds
        results: list[tuple[int, float]] = []

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            conn = Connection(port, token)
            while time.perf_counter() < deadline:
                answer = await conn.send()
                results.append((answer.status, answer.seconds))
                if answer.status == 503 and retry == "after":  # with jitter, as retry libraries do
                    pause = answer.retry_after * (1 + rng.random())
                    await asyncio.sleep(min(pause, max(0.0, deadline - time.perf_counter())))
                elif answer.status == 0:
                    await asyncio.sleep(0.05)  # refused connection: do not spin
            conn.close()

        await asyncio.gather(*(client(i) for i in range(clients)))
        return results

    out.put(asyncio.run(run()))


@dataclass
class Burst:
    calm: list[Answer]
    flood: list[tuple[int, float]] = field(default_factory=list)
    wrk: dict[str, str] = field(default_factory=dict)
    """wrk's RESULT line (``--flood-driver wrk``): requests, p50_ms, p99_ms, statuses."""
    cpu: str = ""


async def burst(port: int, calm: str, flood: str, args: argparse.Namespace, server_pid: int) -> Burst:
    meter = CpuMeter()
    meter.watch("server", server_pid)
    meter.watch("calm-client", os.getpid())
    if args.flood_driver == "wrk":
        return await wrk_burst(port, calm, flood, args, meter)
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=flood_process,
                              args=(port, flood, args.flood, args.seconds, args.flood_retry, out))
    process.start()
    assert process.pid is not None
    meter.watch("flood-generator", process.pid)
    await asyncio.sleep(1.0)  # let the flood build up before measuring
    meter.start()
    measured = await measure(port, calm, args.rate, args.seconds - 1.5)
    meter.sample("flood-generator")
    cpu = meter.stop()
    results = await asyncio.to_thread(out.get, True, args.seconds + 60)
    await asyncio.to_thread(process.join, 30)
    return Burst(measured, results, cpu=cpu)


async def wrk_burst(port: int, calm: str, flood: str, args: argparse.Namespace, meter: CpuMeter) -> Burst:
    """The flood from wrk (``bench/overload_flood.lua``): ``--flood`` connections, two threads."""
    env = {**os.environ, "FLOOD_TOKEN": flood, "FLOOD_BODY": json.dumps({"query": QUERY}),
           "FLOOD_RETRY": args.flood_retry}
    process = await asyncio.create_subprocess_exec(
        "wrk", "-c", str(args.flood), "-t", "2", "-d", f"{args.seconds:.0f}s", "--timeout", "30s",
        "-s", str(ROOT / "bench" / "overload_flood.lua"), f"http://127.0.0.1:{port}/graphql",
        env=env, stdout=asyncio.subprocess.PIPE)
    meter.watch("flood-generator", process.pid)
    await asyncio.sleep(1.0)
    meter.start()
    measured = await measure(port, calm, args.rate, args.seconds - 1.5)
    meter.sample("flood-generator")
    cpu = meter.stop()
    output, _ = await process.communicate()
    line = next((x for x in output.decode().splitlines() if x.startswith("RESULT ")), "RESULT")
    return Burst(measured, wrk=dict(item.split("=", 1) for item in line.split()[1:]), cpu=cpu)


def report_burst(name: str, result: Burst, seconds: float) -> None:
    calm_ok = [a.seconds for a in result.calm if a.status == 200]
    calm_other = Counter(a.status for a in result.calm if a.status != 200)
    print(f"{name}: calm {describe(calm_ok)}" + (f" not-200={dict(calm_other)}" if calm_other else ""))
    if result.wrk:
        statuses = Counter({int(k): int(v) for k, v in (p.split(":") for p in result.wrk["statuses"].split(",") if p)})
        total = max(1, sum(statuses.values()))
        print(f"{name}: flood (wrk) answers={total} ({total / seconds:.0f}/s) "
              f"by status={dict(sorted(statuses.items()))} "
              f"503-rate={statuses[503] / total:.1%} all answers p50={result.wrk['p50_ms']}ms "
              f"p99={result.wrk['p99_ms']}ms socket errors={result.wrk['socket_errors']}")
    else:
        statuses = Counter(status for status, _ in result.flood)
        total = max(1, len(result.flood))
        print(f"{name}: flood answers={len(result.flood)} ({len(result.flood) / seconds:.0f}/s) "
              f"by status={dict(sorted(statuses.items()))} 503-rate={statuses[503] / total:.1%}")
        for status in sorted(statuses):
            print(f"{name}:   flood {status}: {describe([s for st, s in result.flood if st == status])}")
    print(f"{name}: {result.cpu}")


# ---- idle WebSockets and slowloris ----


class ServerLog:
    """The server's log file, read for the memory trimmer's lines (``atrium.observability.memory``)."""

    TRIMMED = re.compile(r"memory trimmed after the load fell")

    def __init__(self, path: Path) -> None:
        self.path = path

    def trims(self) -> int:
        return len(self.TRIMMED.findall(self.path.read_text(errors="replace")))

    async def trimmed_after(self, seen: int, limit: float = 60.0) -> bool:
        """Wait until the server logged a trim beyond the first ``seen`` ones (False after ``limit`` s)."""
        deadline = time.perf_counter() + limit
        while time.perf_counter() < deadline:
            if self.trims() > seen:
                return True
            await asyncio.sleep(0.2)
        return False


async def open_websockets(port: int, count: int, token: str | None) -> list[ClientConnection]:
    """``count`` graphql-transport-ws connections, initialised with ``token`` (or never: None)."""
    sockets: list[ClientConnection] = []
    opening = asyncio.Semaphore(50)

    async def one() -> None:
        async with opening:
            ws = await connect(f"ws://127.0.0.1:{port}/graphql", subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                               ping_interval=None, max_queue=4, open_timeout=60)
            if token is not None:
                await ws.send(json.dumps({"type": "connection_init",
                                          "payload": {"authorization": f"Bearer {token}"}}))
                assert json.loads(await ws.recv())["type"] == "connection_ack"
            sockets.append(ws)

    await asyncio.gather(*(one() for _ in range(count)))
    return sockets


async def websockets_held(port: int, token: str | None, count: int, rss: int, log: ServerLog) -> str:
    """Open ``count`` idle WebSockets, initialised (``token``) or not; the initialised ones are closed
    by the client, the others by the server (their ``connection_init`` never came): RSS while open,
    how long the uninitialised lived, RSS once the server trimmed after they closed."""
    before, trims = mb(rss), log.trims()
    started = time.perf_counter()
    sockets = await open_websockets(port, count, token)
    await asyncio.sleep(1.0)
    held = mb(rss)
    lived = ""
    if token is not None:
        await asyncio.gather(*(ws.close() for ws in sockets))
    else:
        await asyncio.gather(*(ws.wait_closed() for ws in sockets))
        codes = Counter(ws.close_code for ws in sockets)
        lived = (f" closed by the server after {time.perf_counter() - started:.1f}s (from the first opening) "
                 f"with codes {dict(codes)};")
    trimmed = await log.trimmed_after(trims)
    after = mb(rss)
    return (f"open={held:.1f}MB ({(held - before) * 1000 / count:.0f} kB each);{lived} after close "
            f"{'and trim' if trimmed else '(no trim logged within 60 s)'}={after:.1f}MB")


async def slowloris(port: int, count: int, limit: float) -> list[float]:
    """Seconds each connection dribbling one header byte a second lived (capped at ``limit``)."""

    async def one() -> float:
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            while time.perf_counter() - started < limit:
                writer.write(b"x")
                await writer.drain()
                try:
                    if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                        break
                except TimeoutError:
                    continue
                break  # the server answered (408) and closes
            return time.perf_counter() - started
        except OSError:
            return time.perf_counter() - started
        finally:
            writer.close()

    return list(await asyncio.gather(*(one() for _ in range(count))))


def mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MB (``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise RuntimeError(f"no VmRSS for process {pid}")


# ---- setup ----


async def prepare(deals: int) -> tuple[str, list[DemoTenant]]:
    settings = await resolve_database(Settings.from_env())
    url = await fresh_database(settings, DATABASE)
    password_hash = await demo_password_hash()
    tenants = [await seed_tenant(url, slug, slug.title(), deals=deals, seed=i, password_hash=password_hash)
               for i, slug in enumerate(("flood", "calm"))]
    await settled_database(url)
    return url, tenants


async def drop(url: str) -> None:
    admin = await asyncpg.connect(libpq_url(make_url(url).set(database="postgres").render_as_string(False)))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
    finally:
        await admin.close()


async def main_async(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.websockets + 1024)), hard))
    url, (flood_tenant, calm_tenant) = await prepare(args.deals)
    settings = Settings(env="production", database_url=url, jwt_secret=SECRET)
    flood, calm = (issue_token(settings, user_id=t.owner.user_id, tenant_id=t.tenant_id, role=Role.OWNER,
                               ttl_seconds=3600) for t in (flood_tenant, calm_tenant))
    port = free_port()
    log = ServerLog(Path(tempfile.gettempdir()) / f"atrium-overload-{port}.log")
    env = {**os.environ, "DATABASE_URL": url, "ATRIUM_JWT_SECRET": SECRET, "ATRIUM_ENV": "production",
           "ATRIUM_RATE_LIMITS": "off", **dict(pair.split("=", 1) for pair in args.env)}
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "warning", "--no-access-log",
         "--http", "atrium.http.deadline:HttpProtocol"], env=env, cwd=ROOT,
        stdout=log.path.open("wb"), stderr=subprocess.STDOUT)
    print(f"server log: {log.path}")
    try:
        async with httpx.AsyncClient() as probe:
            for _ in range(400):
                try:
                    if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        rss = server.pid
        await measure(port, flood, 50, 2.0)  # warm-up: plans compiled, pool opened
        await measure(port, calm, 50, 2.0)
        await asyncio.sleep(1.0)
        baseline = mb(rss)
        print(f"settings: flood={args.flood} clients flood-retry={args.flood_retry} calm rate={args.rate}/s "
              f"seconds={args.seconds} deals/tenant={args.deals} env={args.env or 'defaults'}")
        unloaded = await measure(port, calm, args.rate, args.seconds)
        print(f"unloaded: calm {describe([a.seconds for a in unloaded if a.status == 200])}")
        print(f"rss: baseline={baseline:.1f}MB")
        if args.flood_driver == "wrk" and shutil.which("wrk") is None:
            raise SystemExit("--flood-driver wrk: wrk is not installed")
        for n in range(1, args.bursts + 1):  # each compared with the unloaded phase just before it (the machine drifts)
            result = await burst(port, calm, flood, args, server.pid)
            report_burst(f"burst {n}", result, args.seconds)
            await asyncio.sleep(3.0)
            after = mb(rss)
            print(f"rss: after burst {n}={after:.1f}MB ({(after - baseline) / baseline:+.1%} of baseline)")
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                before_q = percentile([a.seconds for a in unloaded if a.status == 200], q)
                during = percentile([a.seconds for a in result.calm if a.status == 200], q)
                print(f"burst {n}: calm {name} {during:.1f}ms = {during / before_q:.2f}x unloaded {name} "
                      f"{before_q:.1f}ms")
            if n < args.bursts:
                unloaded = await measure(port, calm, args.rate, args.seconds)
                print(f"unloaded again: calm {describe([a.seconds for a in unloaded if a.status == 200])}")
        if args.websockets:
            before = mb(rss)
            print(f"websockets: rss before={before:.1f}MB")
            for kind, token in (("initialised", calm), ("never initialised", None)):
                for n in (1, 2):
                    line = await websockets_held(port, token, args.websockets, rss, log)
                    after = mb(rss)
                    print(f"websockets: {args.websockets} idle {kind}, burst {n}: {line} "
                          f"({(after - before) / before:+.1%} of before)")
        if args.slowloris:
            lived = await slowloris(port, args.slowloris, 60.0)
            print(f"slowloris: {args.slowloris} connections dribbling headers lived "
                  f"min={min(lived):.1f}s max={max(lived):.1f}s")
    finally:
        server.terminate()
        server.wait(timeout=20)
        await drop(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deals", type=int, default=200, help="deals per tenant")
    parser.add_argument("--flood", type=int, default=200, help="flooding clients (one tenant)")
    parser.add_argument("--flood-retry", choices=("after", "immediate"), default="after",
                        help="after a 503: sleep Retry-After (after) or send again at once (immediate)")
    parser.add_argument("--flood-driver", choices=("python", "wrk"), default="python",
                        help="what sends the flood: Python clients in a process of their own, or wrk")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s of the measured tenant")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--bursts", type=int, default=2,
                        help="flood bursts (0: only the WebSocket and slowloris phases)")
    parser.add_argument("--websockets", type=int, default=2000)
    parser.add_argument("--slowloris", type=int, default=10)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server environment (ATRIUM_MAX_IN_FLIGHT=8, ...)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
