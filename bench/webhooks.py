"""Webhook throughput: deliveries per second from the outbox to a receiver on this machine.

Creates a database of its own, a tenant and one endpoint pointing at a receiver on 127.0.0.1 (a
uvicorn process of its own that answers 204 to everything and counts). Fills the outbox through the
API's write path (``createPipeline`` with 50 stages writes 51 deliveries in its transaction), then
starts the dispatchers (one in this process, or ``--workers N`` ``atrium worker`` processes) and
times from their start until the last delivery is recorded as delivered. Each delivery is a signed
POST, its address checked, its outcome recorded. Not a test: numbers only.

    python -m bench.webhooks --deliveries 5100 --concurrency 16
    python -m bench.webhooks --deliveries 5100 --concurrency 16 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from atrium.app import create_app
from atrium.ops.admin import add_user, create_tenant
from atrium.ops.bootstrap import resolve_database
from auth.tokens import issue_token
from bench.databases import fresh_database
from core.clock import SYSTEM_CLOCK
from core.pgurl import libpq_url
from core.settings import Settings
from models.db import Databases, create_engine
from models.tables import Role
from webhooks.dispatcher import Dispatcher

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-secret-not-for-production-use-0123456789"
KEY = base64.b64encode(secrets.token_bytes(32)).decode()
NAME = "webhooks_bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def receiver_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers 204 to every request, after reading its body."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def start_receiver(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.webhooks:receiver_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning", "--no-access-log", "--lifespan", "off"], cwd=ROOT)


async def database(settings: Settings) -> str:
    url = await fresh_database(settings, NAME)
    return url


async def fill(settings: Settings, url: str, receiver: str, deliveries: int) -> float:
    """Register the endpoint and make changes until the outbox holds ``deliveries``; seconds taken."""
    engine = create_engine(settings.admin_url)
    try:
        tenant = await create_tenant(engine, "bench-hooks", "Bench hooks")
        user = await add_user(engine, tenant, "owner@bench-hooks.example", "Owner", Role.OWNER)
    finally:
        await engine.dispose()
    token = issue_token(settings, user_id=user, tenant_id=tenant, role=Role.OWNER)
    app = create_app(settings)
    started = time.perf_counter()
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench",
            headers={"authorization": f"Bearer {token}"}) as client:
        created = await client.post("/graphql", json={"query": """mutation($u: String!) {
            createWebhookEndpoint(input: {url: $u, eventTypes: ["pipeline.created", "stage.created"]}) { secret } }""",
            "variables": {"u": receiver}})
        assert "errors" not in created.json(), created.text
        stages = [{"name": f"S{i}", "probability": "0.5"} for i in range(50)]
        for i in range(max(1, deliveries // 51)):
            answer = await client.post("/graphql", json={
                "query": "mutation($i: PipelineInput!) { createPipeline(input: $i) { id } }",
                "variables": {"i": {"name": f"P{i}", "stages": stages}}})
            assert "errors" not in answer.json(), answer.text
    return time.perf_counter() - started


async def delivered(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        row = await conn.fetchrow("SELECT count(*) FILTER (WHERE status = 'delivered') AS done, count(*) AS total "
                                  "FROM webhook_deliveries")
    finally:
        await conn.close()
    assert row is not None
    return int(row["done"]), int(row["total"])


async def main_async(args: argparse.Namespace) -> None:
    base = await resolve_database(Settings.from_env())
    url = await database(base)
    settings = dataclasses.replace(
        Settings(env="production", database_url=url, jwt_secret=SECRET, rate_limits=False, webhook_key=KEY,
                 webhook_dispatcher=False, webhook_allowed_networks=("127.0.0.1/32",),
                 webhook_concurrency=args.concurrency, pool_size=10))
    port = free_port()
    receiver = start_receiver(port)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        async with httpx.AsyncClient() as probe:
            for _ in range(200):
                try:
                    await probe.get(f"http://127.0.0.1:{port}/")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        filled_in = await fill(settings, url, f"http://127.0.0.1:{port}/hook", args.deliveries)
        _, total = await delivered(url)
        sys.stderr.write(f"outbox filled with {total} deliveries in {filled_in:.1f}s\n")
        started = time.perf_counter()
        dispatcher: Dispatcher | None = None
        databases: Databases | None = None
        if args.workers:
            env = {**os.environ, "DATABASE_URL": url, "ATRIUM_JWT_SECRET": SECRET, "ATRIUM_ENV": "production",
                   "ATRIUM_WEBHOOK_KEY": KEY, "ATRIUM_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32",
                   "ATRIUM_WEBHOOK_CONCURRENCY": str(args.concurrency)}
            workers = [subprocess.Popen([sys.executable, "-m", "atrium", "worker"], cwd=ROOT, env=env,  # noqa: ASYNC220
                                        stdout=subprocess.DEVNULL) for _ in range(args.workers)]
        else:
            databases = Databases(settings.app_url, pool_size=10)
            dispatcher = Dispatcher(databases, settings, SYSTEM_CLOCK)
            await dispatcher.start()
        done = 0
        while done < total:
            await asyncio.sleep(0.05)
            done, _ = await delivered(url)
        elapsed = time.perf_counter() - started
        if dispatcher is not None and databases is not None:
            await dispatcher.close()
            await databases.dispose()
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)
        receiver.terminate()
        receiver.wait(timeout=10)
    where = f"{args.workers} atrium worker processes" if args.workers else "1 in-process dispatcher"
    print(f"deliveries={total} dispatchers='{where}' concurrency={args.concurrency} seconds={elapsed:.2f}")
    print(f"deliveries_per_second={total / elapsed:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=5100)
    parser.add_argument("--concurrency", type=int, default=16, help="deliveries each dispatcher sends at once")
    parser.add_argument("--workers", type=int, default=0,
                        help="atrium worker processes (default: one dispatcher in this process)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
