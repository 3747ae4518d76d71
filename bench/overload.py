"""Overload benchmark: one tenant floods one Atrium process; another tenant's latency is measured.

Seeds two tenants (``flood`` and ``calm``, D deals each) into a database of its own
(``overload_bench``), starts one Atrium process under uvicorn (production settings, rate limits
off so that admission alone stands between the flood and the process, ``--http
atrium.http.deadline:HttpProtocol`` as deployed) on 127.0.0.1, and runs, in order:

1. ``calm`` alone: its dashboard query (first 20 deals with company, contact, owner, stage and 3
   activities) sent at a fixed rate (open loop, so that a slow answer does not hide the next
   request's wait): p50/p99 unloaded.
2. Two identical bursts: ``--flood`` clients of ``flood`` sending the same query in a closed loop
   from a process of their own, while ``calm`` is measured as in 1. Each flood client either sleeps
   what ``Retry-After`` says after a 503, times 1 to 2 at random (``--flood-retry after``, what a
   well-behaved client does: retry libraries add jitter so that refused clients do not return together) or
   sends its next request at once (``immediate``, a hostile one). Printed: calm's p50/p99, the flood's
   answers by status with the latency of each, and the server's RSS before, between and after.
3. ``--websockets`` idle graphql-transport-ws connections (initialised, then silent) opened and
   closed: RSS while open and after.
4. ``--slowloris`` connections dribbling header bytes: how long the server lets them live.

Not a test: numbers only. Bounded in count and time; everything on 127.0.0.1.

    python -m bench.overload --flood 200 --seconds 15 --flood-retry after
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
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
from core.pgurl import libpq_url
from core.settings import Settings
from models.migrations import migrate
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


async def burst(port: int, calm: str, flood: str, args: argparse.Namespace) -> Burst:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=flood_process,
                              args=(port, flood, args.flood, args.seconds, args.flood_retry, out))
    process.start()
    await asyncio.sleep(1.0)  # let the flood build up before measuring
    measured = await measure(port, calm, args.rate, args.seconds - 1.5)
    results = await asyncio.to_thread(out.get, True, args.seconds + 60)
    await asyncio.to_thread(process.join, 30)
    return Burst(measured, results)


def report_burst(name: str, result: Burst, seconds: float) -> None:
    calm_ok = [a.seconds for a in result.calm if a.status == 200]
    calm_other = Counter(a.status for a in result.calm if a.status != 200)
    statuses = Counter(status for status, _ in result.flood)
    total = max(1, len(result.flood))
    print(f"{name}: calm {describe(calm_ok)}" + (f" not-200={dict(calm_other)}" if calm_other else ""))
    print(f"{name}: flood answers={len(result.flood)} ({len(result.flood) / seconds:.0f}/s) "
          f"by status={dict(sorted(statuses.items()))} 503-rate={statuses[503] / total:.1%}")
    for status in sorted(statuses):
        print(f"{name}:   flood {status}: {describe([s for st, s in result.flood if st == status])}")


# ---- idle WebSockets and slowloris ----


async def websockets_held(port: int, token: str, count: int, rss: int) -> tuple[float, float]:
    """RSS (MB) with ``count`` idle initialised WebSockets open, and after they all closed."""
    sockets: list[ClientConnection] = []
    opening = asyncio.Semaphore(50)

    async def one() -> None:
        async with opening:
            ws = await connect(f"ws://127.0.0.1:{port}/graphql", subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                               ping_interval=None, max_queue=4)
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            sockets.append(ws)

    await asyncio.gather(*(one() for _ in range(count)))
    await asyncio.sleep(1.0)
    held = mb(rss)
    await asyncio.gather(*(ws.close() for ws in sockets))
    await asyncio.sleep(3.0)
    return held, mb(rss)


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
    assert settings.database_url
    admin = await asyncpg.connect(libpq_url(settings.database_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{DATABASE}"')
    finally:
        await admin.close()
    url = make_url(settings.admin_url).set(database=DATABASE).render_as_string(hide_password=False)
    await migrate(url)
    password_hash = await demo_password_hash()
    tenants = [await seed_tenant(url, slug, slug.title(), deals=deals, seed=i, password_hash=password_hash)
               for i, slug in enumerate(("flood", "calm"))]
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
    env = {**os.environ, "DATABASE_URL": url, "ATRIUM_JWT_SECRET": SECRET, "ATRIUM_ENV": "production",
           "ATRIUM_RATE_LIMITS": "off", **dict(pair.split("=", 1) for pair in args.env)}
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--port", str(port),
         "--host", "127.0.0.1", "--log-level", "warning", "--no-access-log",
         "--http", "atrium.http.deadline:HttpProtocol"], env=env, cwd=ROOT)
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
        for n in (1, 2):  # each burst compared with the unloaded phase just before it (the machine drifts)
            result = await burst(port, calm, flood, args)
            report_burst(f"burst {n}", result, args.seconds)
            await asyncio.sleep(3.0)
            after = mb(rss)
            print(f"rss: after burst {n}={after:.1f}MB ({(after - baseline) / baseline:+.1%} of baseline)")
            for q, name in ((0.5, "p50"), (0.99, "p99")):
                before_q = percentile([a.seconds for a in unloaded if a.status == 200], q)
                during = percentile([a.seconds for a in result.calm if a.status == 200], q)
                print(f"burst {n}: calm {name} {during:.1f}ms = {during / before_q:.2f}x unloaded {name} "
                      f"{before_q:.1f}ms")
            if n == 1:
                unloaded = await measure(port, calm, args.rate, args.seconds)
                print(f"unloaded again: calm {describe([a.seconds for a in unloaded if a.status == 200])}")
        if args.websockets:
            before = mb(rss)
            held, after = await websockets_held(port, calm, args.websockets, rss)
            print(f"websockets: {args.websockets} idle: rss before={before:.1f}MB open={held:.1f}MB "
                  f"({(held - before) * 1000 / args.websockets:.0f} kB each) after close={after:.1f}MB "
                  f"({(after - before) / before:+.1%})")
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
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s of the measured tenant")
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each phase")
    parser.add_argument("--websockets", type=int, default=2000)
    parser.add_argument("--slowloris", type=int, default=10)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra server environment (ATRIUM_MAX_IN_FLIGHT=8, ...)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
