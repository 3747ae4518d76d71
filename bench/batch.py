"""Batch write benchmark: 500 deals per request over HTTP, created, updated, upserted and deleted.

Seeds one demo tenant (a pipeline, companies, contacts) into a database of its own, starts Atrium
under uvicorn in a subprocess (as the non-owner application role, RLS on, rate limits off), then
sends ``createDeals`` with ``--size`` deals (each with a stage, company, contact, owner and external
id) ``--rounds`` times, and the same for ``updateDeals``, ``upsertDeals`` (all updates) and
``deleteDeals`` of the created deals. Prints the wall time per request as the client sees it
(median, min and max over the rounds) and the records written per second. Not a test: numbers only.

    python -m bench.batch --size 500 --rounds 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from atrium.ops.bootstrap import resolve_database
from atrium.ops.demo import demo_password_hash, seed_tenant
from auth.tokens import issue_token
from bench.dashboard import SECRET, free_port
from bench.databases import fresh_database
from core.ids import to_global_id
from core.settings import Settings
from models.tables import Role

ROOT = Path(__file__).resolve().parent.parent
CREATE = "mutation($input: [DealInput!]!) { createDeals(input: $input) { id version } }"
UPDATE = "mutation($input: [DealUpdate!]!) { updateDeals(input: $input) { id version } }"
UPSERT = "mutation($input: [DealUpsert!]!) { upsertDeals(input: $input) { created record { id } } }"
DELETE = "mutation($input: [DeleteInput!]!) { deleteDeals(input: $input) { deletedIds } }"
REFERENCES = """
{ pipelines { stages { id } }
  companies(first: 50) { edges { node { id } } }
  contacts(first: 50) { edges { node { id } } } }"""


async def prepare() -> tuple[str, Any]:
    settings = await resolve_database(Settings.from_env())
    url = await fresh_database(settings, "batch_bench")
    tenant = await seed_tenant(url, "bench-batch", "Bench batch", deals=20, seed=1,
                               password_hash=await demo_password_hash())
    return url, tenant


async def timed(client: httpx.AsyncClient, token: str, document: str, items: list[dict[str, Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    response = await client.post("/graphql", json={"query": document, "variables": {"input": items}},
                                 headers={"authorization": f"Bearer {token}"})
    elapsed = time.perf_counter() - started
    body = response.json()
    if response.status_code != 200 or body.get("errors"):
        raise SystemExit(f"request failed: {response.status_code} {str(body)[:500]}")
    return elapsed, body["data"]


def summary(name: str, times: list[float], size: int) -> str:
    median = statistics.median(times)
    return (f"{name:<12} {size} records: median {median * 1000:7.1f} ms  min {min(times) * 1000:7.1f} ms  "
            f"max {max(times) * 1000:7.1f} ms  ({size / median:,.0f} records/s)")


async def run(port: int, token: str, owner: str, size: int, rounds: int) -> list[str]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        refs = (await timed(client, token, REFERENCES, []))[1]
        stages = [s["id"] for p in refs["pipelines"] for s in p["stages"]]
        companies = [e["node"]["id"] for e in refs["companies"]["edges"]]
        contacts = [e["node"]["id"] for e in refs["contacts"]["edges"]]

        def deal(i: int, key: str) -> dict[str, Any]:
            return {"title": f"Bench deal {key}", "amount": f"{1000 + i}.50", "currency": "USD" if i % 3 else "EUR",
                    "stageId": stages[i % len(stages)], "companyId": companies[i % len(companies)],
                    "contactId": contacts[i % len(contacts)], "ownerId": owner, "externalId": key,
                    "expectedCloseDate": f"2031-{1 + i % 12:02d}-15"}

        results: dict[str, list[float]] = {"createDeals": [], "updateDeals": [], "upsertDeals": [], "deleteDeals": []}
        for round_ in range(rounds + 1):  # round 0 warms caches and is not counted
            keys = [f"ext-{uuid.uuid4().hex}" for _ in range(size)]
            items = [deal(i, k) for i, k in enumerate(keys)]
            elapsed, created = await timed(client, token, CREATE, items)
            ids = [d["id"] for d in created["createDeals"]]
            timings = [elapsed]
            for document, batch in (
                    (UPDATE, [{"id": i, "amount": "1.00", "expectedVersion": 1} for i in ids]),
                    (UPSERT, [{**item, "title": "upserted"} for item in items]),
                    (DELETE, [{"id": i} for i in ids])):
                timings.append((await timed(client, token, document, batch))[0])
            if round_:
                for name, elapsed in zip(results, timings, strict=True):
                    results[name].append(elapsed)
    return [summary(name, times, size) for name, times in results.items()]


async def main_async(args: argparse.Namespace) -> None:
    url, tenant = await prepare()
    settings = Settings(env="production", database_url=url, jwt_secret=SECRET, rate_limits=False)
    token = issue_token(settings, user_id=tenant.owner.user_id, tenant_id=tenant.tenant_id, role=Role.OWNER,
                        ttl_seconds=3600)
    port = free_port()
    env = {**os.environ, "DATABASE_URL": url, "ATRIUM_JWT_SECRET": SECRET, "ATRIUM_ENV": "production",
           "ATRIUM_RATE_LIMITS": "off"}
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [sys.executable, "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--port", str(port),
         "--log-level", "warning", "--no-access-log"], env=env, cwd=ROOT)
    try:
        async with httpx.AsyncClient() as probe:
            for _ in range(200):
                try:
                    if (await probe.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        lines = await run(port, token, to_global_id("User", tenant.owner.user_id), args.size, args.rounds)
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"batch size={args.size} rounds={args.rounds} (1 uvicorn worker, HTTP, RLS on; each deal with stage, "
          f"company, contact, owner, external id)")
    for line in lines:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
