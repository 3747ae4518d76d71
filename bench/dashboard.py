"""Dashboard benchmark: N concurrent clients over HTTP against a seeded multi-tenant database.

Seeds T tenants x D deals (companies, contacts, 3-5 activities per deal) into a database of its own,
starts Atrium under uvicorn in a subprocess (as the non-owner application role, RLS on), then runs
the dashboard query (first 50 deals with company, contact, owner, stage and latest 3 activities)
from C concurrent clients, each request for a random tenant. Prints requests/s, p50/p99 latency and
SQL statements per request (counted in-process on the same query), and the server's CPU time per
request (its process's user + system time over the measurement). Not a test: numbers only.

    python -m bench.dashboard --tenants 50 --deals 1000 --clients 8 --seconds 20

``--tracing on`` serves with traces exported over OTLP/HTTP (``OTEL_EXPORTER_OTLP_ENDPOINT``) to a
receiver this script runs on 127.0.0.1, which counts the spans it is sent; ``--tracing both``
alternates servers without and with tracing for ``--rounds`` rounds and prints the medians of each.
The standard ``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` reach the server (sampling).
``--access-log on`` turns on the server's access log (off by default here, as in earlier runs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import asyncpg
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from atrium.app import create_app
from atrium.ops.bootstrap import resolve_database
from atrium.ops.demo import DEMO_PASSWORD, DemoTenant, DemoUser, demo_password_hash, seed_tenant
from auth.tokens import issue_token
from core.pgurl import libpq_url
from core.settings import Settings
from models.migrations import migrate
from models.tables import Role

DASHBOARD = """
query Dashboard($first: Int!) {
  deals(first: $first) {
    edges { node {
      id title amount currency status expectedCloseDate
      company { id name }
      contact { id firstName lastName email }
      owner { id name }
      stage { id name probability }
      activities(first: 3) { id kind subject occurredAt }
    } }
    pageInfo { hasNextPage endCursor }
  }
}
"""
ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-not-for-production-use-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def prepare(args: argparse.Namespace) -> tuple[str, list[DemoTenant]]:
    settings = await resolve_database(Settings.from_env())
    assert settings.database_url
    server = settings.database_url
    name = f"atrium_bench_{args.tenants}x{args.deals}"
    admin = await asyncpg.connect(libpq_url(server))
    try:
        if not args.reuse:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = make_url(settings.admin_url).set(database=name).render_as_string(hide_password=False)
    await migrate(url)
    if args.reuse and len(seeded := await seeded_tenants(url, args.deals)) == args.tenants:
        sys.stderr.write(f"reusing {name}\n")
        return url, seeded
    started = time.perf_counter()
    password_hash = await demo_password_hash()
    parallel = asyncio.Semaphore(4)

    async def seed(i: int) -> DemoTenant:
        async with parallel:
            return await seed_tenant(url, f"bench-{i:05d}", f"Bench {i}", deals=args.deals, seed=i,
                                     password_hash=password_hash)

    tenants = list(await asyncio.gather(*(seed(i) for i in range(args.tenants))))
    sys.stderr.write(f"seeded {args.tenants} tenants x {args.deals} deals in {time.perf_counter() - started:.1f}s\n")
    return url, tenants


async def seeded_tenants(url: str, deals: int) -> list[DemoTenant]:
    """The bench tenants already in the database at ``url``, with their owners, in seeding order."""
    conn = await asyncpg.connect(libpq_url(url))
    try:
        rows = await conn.fetch(
            "SELECT t.slug, t.name, t.id, u.id AS user_id, u.email FROM tenants t"
            " JOIN memberships m ON m.tenant_id = t.id AND m.role = 'owner' JOIN users u ON u.id = m.user_id"
            " WHERE t.slug LIKE 'bench-%' ORDER BY t.slug")
    finally:
        await conn.close()
    return [DemoTenant(slug=r["slug"], name=r["name"], tenant_id=r["id"], deals=deals,
                       users=(DemoUser(email=r["email"], password=DEMO_PASSWORD, role="owner", user_id=r["user_id"]),))
            for r in rows]


def tokens_for(settings: Settings, tenants: list[DemoTenant]) -> list[str]:
    return [issue_token(settings, user_id=t.owner.user_id, tenant_id=t.tenant_id, role=Role.OWNER,
                        ttl_seconds=3600) for t in tenants]


async def statements_per_request(settings: Settings, token: str, first: int) -> int:
    app = create_app(settings)
    count = 0

    def on_execute(*_: object) -> None:
        nonlocal count
        count += 1

    async with app.router.lifespan_context(app):
        engine = app.state.runtime.databases.default.sync_engine
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client:
            await client.post("/graphql", json={"query": DASHBOARD, "variables": {"first": first}},
                              headers={"authorization": f"Bearer {token}"})  # warm the route cache
            event.listen(engine, "before_cursor_execute", on_execute)
            try:
                r = await client.post("/graphql", json={"query": DASHBOARD, "variables": {"first": first}},
                                      headers={"authorization": f"Bearer {token}"})
            finally:
                event.remove(engine, "before_cursor_execute", on_execute)
            assert not r.json().get("errors"), r.text
    return count


async def load(port: int, tokens: list[str], clients: int, seconds: float, first: int) -> list[float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    errors = 0

    async def worker(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            while time.perf_counter() < deadline:
                token = rng.choice(tokens)
                t0 = time.perf_counter()
                r = await client.post("/graphql", json={"query": DASHBOARD, "variables": {"first": first}},
                                      headers={"authorization": f"Bearer {token}"})
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or r.json().get("errors"):
                    errors += 1

    await asyncio.gather(*(worker(i) for i in range(clients)))
    if errors:
        sys.stderr.write(f"{errors} requests failed\n")
    return latencies


@dataclass
class SpanSink:
    """An OTLP/HTTP receiver that counts the spans it is sent (and answers 200)."""

    port: int = 0
    spans: int = 0
    exports: int = 0


@contextmanager
def span_sink() -> Iterator[SpanSink]:
    sink = SpanSink()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = ExportTraceServiceRequest()
            request.ParseFromString(self.rfile.read(int(self.headers.get("content-length", "0"))))
            with lock:
                sink.exports += 1
                sink.spans += sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    sink.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield sink
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    tracing: bool
    latencies: list[float]
    seconds: float
    cpu: float
    spans: int

    def p(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    @property
    def cpu_ms(self) -> float:
        """Server CPU per request, in milliseconds."""
        return self.cpu / max(1, len(self.latencies)) * 1000


async def serve_and_load(args: argparse.Namespace, url: str, tokens: list[str], tracing: bool) -> Run:
    port = free_port()
    # Rate limits off: this measures raw throughput, not the plans' budgets.
    env = {**os.environ, "DATABASE_URL": url, "ATRIUM_JWT_SECRET": SECRET, "ATRIUM_ENV": "production",
           "ATRIUM_RATE_LIMITS": "off", "ATRIUM_ACCESS_LOG": args.access_log}
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        env.pop(name, None)
    with span_sink() as sink:
        if tracing:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://127.0.0.1:{sink.port}"
        server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
            [sys.executable, "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--host", "127.0.0.1",
             "--port", str(port), "--workers", str(args.workers), "--log-level", "warning", "--no-access-log"],
            env=env, cwd=ROOT,
        )
        try:
            async with httpx.AsyncClient() as probe:
                for _ in range(200):
                    try:
                        if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
            await load(port, tokens, 2, 2.0, args.first)  # warm-up
            cpu_before, started = cpu_seconds(server.pid), time.perf_counter()
            latencies = await load(port, tokens, args.clients, args.seconds, args.first)
            elapsed, cpu = time.perf_counter() - started, cpu_seconds(server.pid) - cpu_before
        finally:
            server.terminate()
            server.wait(timeout=10)  # its lifespan flushes the last spans before it exits
        return Run(tracing, latencies, elapsed, cpu, sink.spans)


def describe(run: Run) -> str:
    traced = f" spans_exported={run.spans}" if run.tracing else ""
    return (f"tracing={'on' if run.tracing else 'off'} requests={len(run.latencies)} rps={run.rps:.1f} "
            f"p50={run.p(0.50):.1f}ms p99={run.p(0.99):.1f}ms mean={statistics.fmean(run.latencies) * 1000:.1f}ms "
            f"server_cpu_per_request={run.cpu_ms:.2f}ms{traced}")


async def main_async(args: argparse.Namespace) -> None:
    url, tenants = await prepare(args)
    settings = Settings(env="production", database_url=url, jwt_secret=SECRET, pool_size=10, rate_limits=False)
    tokens = tokens_for(settings, tenants[:args.active] if args.active else tenants)
    statements = await statements_per_request(settings, tokens[0], args.first)
    modes = {"off": [False], "on": [True], "both": [False, True] * args.rounds}[args.tracing]
    print(f"tenants={args.tenants} active={len(tokens)} deals/tenant={args.deals} page={args.first} "
          f"clients={args.clients} "
          f"workers={args.workers} seconds={args.seconds}")
    runs = []
    for tracing in modes:
        runs.append(await serve_and_load(args, url, tokens, tracing))
        print(describe(runs[-1]), flush=True)
    if args.tracing == "both":
        for tracing in (False, True):
            mine = [r for r in runs if r.tracing is tracing]
            print(f"median tracing={'on' if tracing else 'off'}: rps={statistics.median(r.rps for r in mine):.1f} "
                  f"p50={statistics.median(r.p(0.5) for r in mine):.1f}ms "
                  f"p99={statistics.median(r.p(0.99) for r in mine):.1f}ms "
                  f"server_cpu_per_request={statistics.median(r.cpu_ms for r in mine):.2f}ms")
    print(f"sql_statements_per_request={statements}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--deals", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--first", type=int, default=50)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--active", type=int, default=0,
                        help="draw requests from the first N tenants only (default: all of them)")
    parser.add_argument("--reuse", action="store_true", help="keep an already seeded benchmark database")
    parser.add_argument("--tracing", choices=("off", "on", "both"), default="off",
                        help="serve with traces exported over OTLP to a local receiver (both: alternate)")
    parser.add_argument("--rounds", type=int, default=3, help="with --tracing both: runs of each")
    parser.add_argument("--access-log", choices=("on", "off"), default="off",
                        help="the server's access log (one JSON line per request on its stderr)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
