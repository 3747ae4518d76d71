"""Record-level visibility benchmark: the dashboard query as callers of three scopes, in process.

Seeds one demo tenant with ``--deals`` deals into a database of its own, puts the member in a team
with a third of the tenant's other users, and runs the dashboard query (``bench.dashboard``: 50 deals
with company, contact, owner, stage and latest activities) ``--requests`` times in a row for each
case: the default audience (WORKSPACE) as the member, then a TEAM audience as the member (RLS
policy and application filter both restricting) and as the admin (who sees all). The app runs in
this process over ``httpx.ASGITransport`` (no listening socket), as the non-owner application role,
plans on or off (``--plans``). Prints median and p90 latency per request and the deals returned.
Not a test: numbers only.

    python -m bench.visibility --deals 2000 --requests 300
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from atrium.app import create_app
from atrium.ops.bootstrap import resolve_database
from atrium.ops.demo import demo_password_hash, seed_tenant
from auth.tokens import issue_token
from bench.dashboard import DASHBOARD, SECRET
from bench.databases import fresh_database
from core.ids import to_global_id
from core.settings import Settings
from models.tables import Role


async def prepare(deals: int) -> tuple[Settings, Any]:
    settings = await resolve_database(Settings.from_env())
    url = await fresh_database(settings, "visibility_bench")
    tenant = await seed_tenant(url, "bench-visibility", "Bench visibility", deals=deals, seed=1,
                               password_hash=await demo_password_hash())
    return settings.with_database(url), tenant


async def run(client: httpx.AsyncClient, token: str, requests: int) -> tuple[float, float, int]:
    body = {"query": DASHBOARD, "variables": {"first": 50}}
    headers = {"authorization": f"Bearer {token}"}
    seen = 0
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = await client.post("/graphql", json=body, headers=headers)
        times.append(time.perf_counter() - started)
        payload = response.json()
        assert not payload.get("errors"), payload
        seen = len(payload["data"]["deals"]["edges"])
    times.sort()
    return statistics.median(times) * 1000, times[int(len(times) * 0.9)] * 1000, seen


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deals", type=int, default=2000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--plans", choices=("on", "off"), default="on")
    args = parser.parse_args()
    settings, tenant = await prepare(args.deals)
    settings = dataclasses.replace(settings, jwt_secret=SECRET, plans=args.plans == "on", rate_limits=False)
    users = {user.role: user.user_id for user in tenant.users}
    member, admin = users["member"], users["admin"]
    others = [user.user_id for user in tenant.users if user.user_id not in (member, admin)]
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://bench.test") as client:
        def token(user: Any, role: Role) -> str:
            return issue_token(settings, user_id=user, tenant_id=tenant.tenant_id, role=role)

        owner = token(users["owner"], Role.OWNER)
        team = [to_global_id("User", u) for u in [member, *others[: len(others) // 3]]]
        made = await client.post("/graphql", headers={"authorization": f"Bearer {owner}"}, json={
            "query": "mutation($m: [ID!]!) { createTeam(input: {name: \"Bench\", memberIds: $m}) { id } }",
            "variables": {"m": team}})
        assert not made.json().get("errors"), made.json()
        print(f"{args.deals} deals, {len(tenant.users)} members, team of {len(team)}, plans {args.plans}")
        print(f"{'case':<34} {'p50 ms':>8} {'p90 ms':>8} {'deals':>6}")
        cases = (("WORKSPACE audience, member", "WORKSPACE", member, Role.MEMBER),
                 ("TEAM audience, member", "TEAM", member, Role.MEMBER),
                 ("TEAM audience, admin (sees all)", "TEAM", admin, Role.ADMIN))
        for label, audience, user, role in cases:
            response = await client.post("/graphql", headers={"authorization": f"Bearer {owner}"}, json={
                "query": f"mutation {{ setRecordVisibility(recordType: DEAL, audience: {audience}) {{ audience }} }}"})
            assert not response.json().get("errors"), response.json()
            caller = token(user, role)
            await run(client, caller, 20)  # warm: plans, prepared statements
            p50, p90, seen = await run(client, caller, args.requests)
            print(f"{label:<34} {p50:8.2f} {p90:8.2f} {seen:6d}")
    engine = create_async_engine(settings.admin_url)
    async with engine.connect() as conn:
        visible = (await conn.execute(text("SELECT count(*) FROM deals WHERE owner_id = ANY(:u)"),
                                      {"u": [member, *others[: len(others) // 3]]})).scalar_one()
    await engine.dispose()
    print(f"deals owned by the team: {visible}")


if __name__ == "__main__":
    asyncio.run(main())
