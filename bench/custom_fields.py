"""Custom field filter benchmark: one custom field of 100,000 deals, filtered, ranged and sorted.

Seeds one demo tenant into a database of its own (``custom_fields_bench``), defines three custom
fields on its deals through the API (``tier``: a SINGLE_SELECT of 50 options, ``score``: NUMBER,
``renewal``: DATE), writes ``--deals`` deals holding values of them (one SQL statement, as the table
owner), analyzes the table, then asks the API (in process, as the application role with RLS on;
plans on, then off) for:

- ``eq``: the first page and ``totalCount`` of the deals with one tier (1 in 50: ~2,000 deals):
  a containment test the GIN index (``deals_custom_fields_idx``, ``jsonb_path_ops``) answers;
- ``in``: the deals with one of two tiers;
- ``range``: the deals with a score of at least 99.5 (a range is not a containment: the tenant's
  rows are scanned);
- ``sort``: the first page of all deals by score;
- ``agg-stage``: ``dealsAggregate(groupBy: [STAGE])`` with the amounts (the declared groups and
  measures, for comparison), and ``agg-tier``: ``dealsAggregate(groupByCustom: ["tier"],
  measureCustom: ["score"])``, all deals grouped by a custom field and measured by another (one
  statement reading the tenant's rows).

Prints the median, min and max wall time per request of ``--rounds`` rounds (after one warm-up
round), and the EXPLAIN ANALYZE of each filter's page statement as the resolvers write it. Not a
test: numbers only.

    python -m bench.custom_fields --deals 100000 --rounds 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import replace
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import create_async_engine

from atrium.app import create_app
from atrium.ops.bootstrap import resolve_database
from atrium.ops.demo import demo_password_hash, seed_tenant
from auth.tokens import issue_token
from bench.dashboard import SECRET
from bench.databases import fresh_database
from core.pgurl import libpq_url
from core.settings import Settings
from models.tables import DEALS, Role
from records.crm import DEAL

DEFINE = "mutation($i: CustomFieldDefinitionInput!) { createCustomFieldDefinition(input: $i) { id } }"
TIERS = [f"t{i:02d}" for i in range(50)]
FILTERS: dict[str, dict[str, Any]] = {
    "eq": {"custom": [{"key": "tier", "text": "t07"}]},
    "in": {"custom": [{"key": "tier", "op": "IN", "values": ["t07", "t13"]}]},
    "range": {"custom": [{"key": "score", "op": "GTE", "number": "99.5"}]},
}
PAGE = """query($f: DealFilter, $o: DealOrder) { deals(first: 20, filter: $f, orderBy: $o) { totalCount
  nodes { id title customField(key: "tier") { ... on SelectValue { option } } } } }"""
AGGREGATES = {
    "agg-stage": "{ dealsAggregate(groupBy: [STAGE]) { groupCount groups { count amount { sum avg } } } }",
    "agg-tier": """{ dealsAggregate(groupByCustom: ["tier"], measureCustom: ["score"]) { groupCount groups { count
      customField(key: "tier") { ... on SelectValue { option } }
      customMeasure(key: "score") { number { sum avg } } } } }""",
}
"""Aggregates of all deals: ``groupCount`` is printed as what they match."""
SEED = """
INSERT INTO deals (tenant_id, id, title, amount, currency, pipeline_id, stage_id, status, custom_fields)
SELECT $1, gen_random_uuid(), 'Bench deal ' || n, (n % 1000) + 0.5, 'USD', $2, $3, 'open',
       jsonb_build_object('tier', 't' || lpad((n % 50)::text, 2, '0'), 'score', round((n % 1000) / 10.0, 1),
                          'renewal', to_char(date '2027-01-01' + (n % 365), 'YYYY-MM-DD'))
FROM generate_series(1, $4) AS n
"""


async def prepare(deals: int) -> tuple[str, Any]:
    settings = await resolve_database(Settings.from_env())
    url = await fresh_database(settings, "custom_fields_bench")
    tenant = await seed_tenant(url, "bench-custom", "Bench custom fields", deals=20, seed=1,
                               password_hash=await demo_password_hash())
    return url, tenant


async def seed_values(url: str, tenant_id: Any, deals: int) -> float:
    conn = await asyncpg.connect(libpq_url(url))
    try:
        stage = await conn.fetchrow("SELECT pipeline_id, id FROM stages WHERE tenant_id = $1 LIMIT 1", tenant_id)
        started = time.perf_counter()
        await conn.execute(SEED, tenant_id, stage["pipeline_id"], stage["id"], deals)
        await conn.execute("ANALYZE deals")
        return time.perf_counter() - started
    finally:
        await conn.close()


async def explain(url: str, tenant_id: Any, filters: dict[str, Any]) -> str:
    """EXPLAIN ANALYZE of the filter's first page as the resolvers query it (application role, RLS on)."""
    # As the API hands them over: a Decimal where the schema says Decimal.
    filters = {"custom": [{k: Decimal(v) if k == "number" else v for k, v in f.items()} for f in filters["custom"]]}
    listing = DEAL.listing_query(tenant_id, filters)
    statements = {"page": listing.order_by(DEALS.c.created_at.desc(), DEALS.c.id.desc()).limit(21),
                  "totalCount": select(func.count()).select_from(listing.subquery())}
    engine = create_async_engine(url)
    out = []
    try:
        async with engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            for name, statement in statements.items():
                compiled = statement.compile(dialect=postgresql.asyncpg.dialect())  # type: ignore[no-untyped-call]
                args = [compiled.params[p] for p in compiled.positiontup or ()]
                async with raw.transaction():
                    await raw.execute("SET LOCAL ROLE atrium_app")
                    await raw.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant_id))
                    rows = await raw.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + compiled.string, *args)
                out.append(f"  {name}:\n" + "\n".join(f"    {row[0]}" for row in rows))
        return "\n".join(out)
    finally:
        await engine.dispose()


async def timed(client: httpx.AsyncClient, token: str, variables: dict[str, Any],
                query: str = PAGE) -> tuple[float, Any]:
    started = time.perf_counter()
    response = await client.post("/graphql", json={"query": query, "variables": variables},
                                 headers={"authorization": f"Bearer {token}"})
    elapsed = time.perf_counter() - started
    body = response.json()
    if response.status_code != 200 or body.get("errors"):
        raise SystemExit(f"request failed: {response.status_code} {str(body)[:500]}")
    return elapsed, body["data"]


async def measure(settings: Settings, token: str, rounds: int) -> list[str]:
    cases: dict[str, tuple[str, dict[str, Any]]] = {name: (PAGE, {"f": f}) for name, f in FILTERS.items()}
    cases["sort"] = (PAGE, {"o": {"custom": "score", "direction": "DESC"}})
    cases.update({name: (query, {}) for name, query in AGGREGATES.items()})
    lines = []
    for plans in (True, False):
        app = create_app(replace(settings, plans=plans))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://bench.test", timeout=120) as client:
            for name, (query, variables) in cases.items():
                times = []
                total = 0
                for round_ in range(rounds + 1):
                    elapsed, data = await timed(client, token, variables, query)
                    total = data["deals"]["totalCount"] if "deals" in data else data["dealsAggregate"]["groupCount"]
                    if round_:
                        times.append(elapsed)
                median = statistics.median(times)
                lines.append(f"plans {'on ' if plans else 'off'} {name:<9} {total:>7,} matching: median "
                             f"{median * 1000:7.1f} ms  min {min(times) * 1000:7.1f} ms  "
                             f"max {max(times) * 1000:7.1f} ms")
    return lines


async def main_async(args: argparse.Namespace) -> None:
    url, tenant = await prepare(args.deals)
    settings = replace(Settings.from_env(), database_url=url, jwt_secret=SECRET, rate_limits=False)
    token = issue_token(settings, user_id=tenant.owner.user_id, tenant_id=tenant.tenant_id, role=Role.OWNER,
                        ttl_seconds=3600)
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench.test") as client:
        for spec in ({"key": "tier", "label": "Tier", "type": "SINGLE_SELECT", "options": TIERS},
                     {"key": "score", "label": "Score", "type": "NUMBER"},
                     {"key": "renewal", "label": "Renewal", "type": "DATE"}):
            response = await client.post("/graphql", json={"query": DEFINE, "variables": {
                "i": {"recordType": "DEAL", **spec}}}, headers={"authorization": f"Bearer {token}"})
            if response.json().get("errors"):
                raise SystemExit(str(response.json()))
    seeded = await seed_values(url, tenant.tenant_id, args.deals)
    print(f"custom fields: {args.deals:,} deals with tier/score/renewal values written and analyzed in "
          f"{seeded:.1f} s (one tenant; in-process app, application role, RLS on)")
    for line in await measure(settings, token, args.rounds):
        print(line)
    for name, filters in FILTERS.items():
        print(f"\nEXPLAIN ANALYZE, {name}: {filters['custom']}")
        print(await explain(url, tenant.tenant_id, filters))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deals", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
