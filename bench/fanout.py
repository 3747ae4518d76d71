"""Fan-out benchmark: N open subscriptions over two Atrium processes, latency from commit to receipt.

Makes a database of its own (migrated, one tenant, one pipeline, one deal; dropped at the end), starts two Atrium
processes (uvicorn, one worker each) sharing it and Redis, and opens N ``dealBoard`` subscriptions,
half on each process, from client subprocesses (``--client-processes``), one WebSocket connection
per ``--per-connection`` subscriptions. Once every subscription is live it moves the deal ``--writes``
times, alternately through each process, and prints:

- delivered events (of N x writes expected) and latency from the write's commit (the event's
  ``timestamp``) to its receipt by the client: p50, p99, max;
- server memory per open subscription: the servers' RSS after opening them minus before, / N;
- server CPU seconds spent during the writes, per delivered event.

By default all subscriptions share one document and variables, so each process executes each event
once (delivery by groups); ``--distinct`` gives every subscription its own document (one execution
per subscriber and event) for comparison. Requires DATABASE_URL (an admin URL) and REDIS_URL.

    python -m bench.fanout --subscribers 1000
    python -m bench.fanout --subscribers 10000 --client-processes 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import ClientConnection, connect

from atrium.ops.admin import add_user, create_tenant
from auth.tokens import issue_token
from core.pgurl import async_url, libpq_url
from core.settings import Settings
from models.migrations import migrate
from models.tables import Role

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-not-for-production-use-0123456789"
DATABASE = "atrium_bench_fanout"
BOARD = """subscription %s($p: ID!) {
  dealBoard(pipelineId: $p) { __typename ... on DealChange { version timestamp record { id stage { id } } } }
}"""
PIPELINE = """mutation { createPipeline(input: {name: "Bench", stages: [{name: "A", probability: "0.2"},
  {name: "B", probability: "0.8"}]}) { id stages { id } } }"""
DEAL = """mutation($s: ID!) { createDeal(input: {title: "Bench deal", amount: "100", currency: "EUR", stageId: $s})
  { id } }"""
MOVE = "mutation($id: ID!, $s: ID!) { moveDeal(id: $id, stageId: $s) { version } }"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stat(pid: int) -> tuple[int, float]:
    """(RSS bytes, user+system CPU seconds) of a process."""
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


# ---- client subprocess ----------------------------------------------------------------------------

async def child(args: argparse.Namespace) -> None:
    """Open this process's subscriptions, say READY, record receipts until told STOP, print results."""
    urls: list[str] = args.urls.split(",")
    latencies: list[float] = []
    counts: list[int] = [0] * args.count
    complete = 0
    all_complete = asyncio.Event()
    semaphore = asyncio.Semaphore(64)  # connection attempts in flight

    async def session(index: int, subs: range) -> ClientConnection:
        async with semaphore:
            ws = await connect(urls[index % len(urls)], subprotocols=["graphql-transport-ws"],  # type: ignore[list-item]
                               max_size=None, open_timeout=60, ping_interval=None,
                               compression=None if args.no_deflate else "deflate")
            await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {args.token}"}}))
            assert json.loads(await ws.recv())["type"] == "connection_ack"
            for sub in subs:
                name = f"Board{args.offset + sub}" if args.distinct else "Board"
                await ws.send(json.dumps({"id": str(sub), "type": "subscribe", "payload": {
                    "query": BOARD % name, "variables": {"p": args.pipeline}}}))
            live = 0
            while live < len(subs):  # every stream starts with a Resync once it is live
                message = json.loads(await ws.recv())
                assert message["type"] == "next", message
                live += 1
            return ws

    async def read(ws: ClientConnection) -> None:
        nonlocal complete
        async for raw in ws:
            received = time.time()
            message = json.loads(raw)
            if message.get("type") != "next":
                continue
            event = message["payload"]["data"]["dealBoard"]
            if event.get("__typename") == "DealChange":
                latencies.append(received - dt.datetime.fromisoformat(event["timestamp"]).timestamp())
                sub = int(message["id"])
                counts[sub] += 1
                if counts[sub] == args.writes:
                    complete += 1
                    if complete == args.count:
                        all_complete.set()

    groups = [range(start, min(start + args.per_connection, args.count))
              for start in range(0, args.count, args.per_connection)]
    connections = await asyncio.gather(*(session(i + args.offset, subs) for i, subs in enumerate(groups)))
    readers = [asyncio.create_task(read(ws)) for ws in connections]
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # STOP
    with contextlib.suppress(TimeoutError):  # what has not arrived a minute after the last write is lost
        await asyncio.wait_for(all_complete.wait(), 60)
    for task in readers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
    sys.stdout.write(json.dumps({"delivered": sum(counts), "latencies": latencies}) + "\n")
    sys.stdout.flush()


# ---- coordinator ----------------------------------------------------------------------------------

async def prepare(server_url: str) -> tuple[str, str]:
    """A fresh migrated database with one tenant and its owner: (database URL, owner token)."""
    name = DATABASE
    admin = await asyncpg.connect(libpq_url(server_url))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = async_url(make_url(server_url).set(database=name).render_as_string(hide_password=False))
    await migrate(url)
    engine = create_async_engine(url)
    try:
        tenant = await create_tenant(engine, "bench-fanout", "Bench fan-out")
        user = await add_user(engine, tenant, "owner@bench.example", "Bench Owner", Role.OWNER)
    finally:
        await engine.dispose()
    token = issue_token(Settings(jwt_secret=SECRET), user_id=user, tenant_id=tenant, role=Role.OWNER,
                        ttl_seconds=24 * 3600)
    return url, token


async def start_server(url: str, redis_url: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "REDIS_URL": redis_url, "ATRIUM_JWT_SECRET": SECRET,
           "ATRIUM_ENV": "production", "ATRIUM_RATE_LIMITS": "off", "ATRIUM_DB_POOL_SIZE": "20"}
    process = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--backlog", "16384"], env=env, cwd=ROOT)
    async with httpx.AsyncClient() as probe:
        for _ in range(600):
            try:
                if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                    return process, port
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise RuntimeError("Atrium did not start")


async def coordinator(args: argparse.Namespace) -> None:
    redis_url = os.environ.get("REDIS_URL")
    server_url = os.environ.get("DATABASE_URL")
    if not redis_url or not server_url:
        raise SystemExit("set DATABASE_URL (admin URL of a PostgreSQL server) and REDIS_URL")
    url, token = await prepare(server_url)
    servers = [await start_server(url, redis_url) for _ in range(2)]
    children: list[asyncio.subprocess.Process] = []
    try:
        ports = [port for _, port in servers]
        http = [httpx.AsyncClient(base_url=f"http://127.0.0.1:{p}", timeout=30,
                                  headers={"authorization": f"Bearer {token}"}) for p in ports]
        created = (await http[0].post("/graphql", json={"query": PIPELINE})).json()["data"]["createPipeline"]
        pipeline, stages = created["id"], [s["id"] for s in created["stages"]]
        deal = (await http[0].post("/graphql", json={"query": DEAL, "variables": {"s": stages[0]}})
                ).json()["data"]["createDeal"]["id"]

        before = [proc_stat(p.pid) for p, _ in servers]
        ws_urls = ",".join(f"ws://127.0.0.1:{p}/graphql" for p in ports)
        share, extra = divmod(args.subscribers, args.client_processes)
        offset = 0
        opened = time.perf_counter()
        for i in range(args.client_processes):
            count = share + (1 if i < extra else 0)
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.fanout", "--child", "--urls", ws_urls, "--token", token,
                "--pipeline", pipeline, "--count", str(count), "--offset", str(offset),
                "--per-connection", str(args.per_connection), "--writes", str(args.writes),
                *(["--distinct"] if args.distinct else []), *(["--no-deflate"] if args.no_deflate else []),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT, limit=1 << 28))
            offset += count
        for c in children:
            assert c.stdout is not None
            line = await c.stdout.readline()
            if line.strip() != b"READY":
                raise RuntimeError(f"client failed: {line!r}")
        opened = time.perf_counter() - opened
        after_open = [proc_stat(p.pid) for p, _ in servers]

        write_latencies: list[float] = []
        for n in range(args.writes):
            t0 = time.perf_counter()
            body = (await http[n % 2].post("/graphql", json={"query": MOVE, "variables": {
                "id": deal, "s": stages[(n + 1) % 2]}})).json()
            write_latencies.append(time.perf_counter() - t0)
            assert not body.get("errors"), body
            await asyncio.sleep(args.interval)
        for c in children:
            assert c.stdin is not None
            c.stdin.write(b"STOP\n")
            await c.stdin.drain()
        results = []
        for c in children:
            assert c.stdout is not None
            results.append(json.loads(await c.stdout.readline()))
        after_writes = [proc_stat(p.pid) for p, _ in servers]
        for client in http:
            await client.aclose()
    finally:
        for c in children:
            if c.returncode is None:
                c.kill()
            await c.wait()
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=20)
        admin = await asyncpg.connect(libpq_url(server_url))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        finally:
            await admin.close()

    delivered = sum(r["delivered"] for r in results)
    latencies = sorted(x for r in results for x in r["latencies"])
    def q(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    rss = sum(a[0] - b[0] for a, b in zip(after_open, before, strict=True))
    cpu = sum(w[1] - a[1] for w, a in zip(after_writes, after_open, strict=True))
    print(f"subscribers={args.subscribers} per_connection={args.per_connection} processes=2 "
          f"clients={args.client_processes} writes={args.writes} interval={args.interval}s "
          f"groups={'per-subscriber' if args.distinct else 'shared'} deflate={not args.no_deflate}")
    print(f"opened in {opened:.1f}s; delivered={delivered}/{args.subscribers * args.writes}")
    print(f"latency commit->receipt ms: p50={q(0.50):.1f} p99={q(0.99):.1f} max={latencies[-1] * 1000:.1f} "
          f"mean={statistics.fmean(latencies) * 1000:.1f}" if latencies else "no deliveries")
    print(f"server RSS per open subscription: {rss / args.subscribers / 1024:.1f} KiB "
          f"(total +{rss / 2**20:.1f} MiB over {[round(b[0] / 2**20) for b in before]} MiB)")
    print(f"server CPU during writes: {cpu:.2f}s = {cpu / max(delivered, 1) * 1e6:.0f} us per delivered event; "
          f"mutation p50={statistics.median(write_latencies) * 1000:.1f}ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--writes", type=int, default=50)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between writes")
    parser.add_argument("--per-connection", type=int, default=1, help="subscriptions per WebSocket connection")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--distinct", action="store_true", help="one document per subscription (no sharing)")
    parser.add_argument("--no-deflate", action="store_true", help="clients do not offer permessage-deflate")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--urls", "--token", "--pipeline"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(child(args) if args.child else coordinator(args))


if __name__ == "__main__":
    main()
