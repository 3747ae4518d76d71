"""Aggregates (``dealsAggregate`` and the other records'): counts and money per currency per group,
checked against the same sums computed in Python over the seeded deals; group keys as records and
values; the list filters; another tenant's rows never counted (with the app's filters and with RLS
alone); one SQL statement; cost bounded by ``first``."""

from __future__ import annotations

import datetime as dt
import random
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from core.settings import Settings
from models.db import Databases
from models.tables import Role
from records.crm import DEAL
from resolvers.aggregates import statement
from tests.conftest import TenantWorld, codes, data_or_fail, gql, make_tenant_world
from tests.crm import create_company, create_contact, create_pipeline, gid
from tests.wire import wired_app

MakeTenant = Callable[..., Awaitable[TenantWorld]]

AGGREGATE = """
query($filter: DealFilter, $by: [DealGroupBy!]!, $first: Int! = 100) {
  dealsAggregate(filter: $filter, groupBy: $by, first: $first) {
    groupCount
    groups {
      count status currency closeMonth
      stage { id name } owner { id } company { id name } pipeline { id }
      amount { currency count sum avg min max }
    }
  }
}"""
KEYS = {"STAGE": "stage", "OWNER": "owner", "COMPANY": "company", "STATUS": "status", "CURRENCY": "currency",
        "CLOSE_MONTH": "closeMonth", "PIPELINE": "pipeline"}


@dataclass(frozen=True)
class Seeded:
    world: TenantWorld
    deals: list[dict[str, Any]]
    """Every deal as created: ``stage``, ``owner``, ``company``, ``status``, ``currency``,
    ``closeMonth``, ``pipeline`` (global ids and API values) and ``amount`` (Decimal)."""
    stages: list[str]
    companies: list[str]


async def seed(client: httpx.AsyncClient, world: TenantWorld, n: int = 60, rng_seed: int = 1) -> Seeded:
    """``n`` deals spread over 2 pipelines' stages, 3 owners, 2 companies (or none), 3 currencies,
    3 statuses and a few close months (or none), written with the batch mutations."""
    rng = random.Random(rng_seed)
    token = world.token()
    pipelines = [await create_pipeline(client, token, name=f"P{i}", stages=("Lead", "Won")) for i in range(2)]
    stages = [(p["id"], s["id"]) for p in pipelines for s in p["stages"]]
    companies = [(await create_company(client, token))["id"] for _ in range(2)]
    owners = [gid("User", world.users[role]) for role in (Role.OWNER, Role.ADMIN, Role.MEMBER)]
    deals = []
    for _ in range(n):
        pipeline, stage = rng.choice(stages)
        month = rng.choice([None, dt.date(2031, 1, 1), dt.date(2031, 2, 1), dt.date(2031, 7, 1)])
        deals.append({
            "pipeline": pipeline, "stage": stage, "owner": rng.choice(owners),
            "company": rng.choice([*companies, None]), "currency": rng.choice(["USD", "EUR", "JPY"]),
            "amount": Decimal(rng.randrange(0, 1_000_000)) / 100,
            "closeMonth": month, "day": rng.randrange(1, 28), "status": rng.choice(["OPEN", "WON", "LOST"])})
    made = data_or_fail(await gql(client, "mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }", {
        "input": [{"title": f"Deal {i}", "amount": str(d["amount"]), "currency": d["currency"], "stageId": d["stage"],
                   "companyId": d["company"], "ownerId": d["owner"],
                   "expectedCloseDate": d["closeMonth"].replace(day=d["day"]).isoformat() if d["closeMonth"]
                   else None} for i, d in enumerate(deals)]}, token=token))["createDeals"]
    data_or_fail(await gql(client, "mutation($input: [DealUpdate!]!) { updateDeals(input: $input) { id } }", {
        "input": [{"id": m["id"], "status": d["status"]} for m, d in zip(made, deals, strict=True)
                  if d["status"] != "OPEN"]}, token=token))
    for m, d in zip(made, deals, strict=True):
        d["id"] = m["id"]
    return Seeded(world, deals, [s for _, s in stages], companies)


def expected(deals: Iterable[dict[str, Any]], by: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The groups computed in Python: key -> count and per-currency money."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for d in deals:
        groups[tuple(d[KEYS[b]] for b in by)].append(d)
    out = {}
    for key, members in groups.items():
        money: dict[str, list[Decimal]] = defaultdict(list)
        for d in members:
            money[d["currency"]].append(d["amount"])
        out[key] = {"count": len(members), "amount": [
            {"currency": c, "count": len(v), "sum": sum(v), "min": min(v), "max": max(v),
             "avg": sum(v) / len(v)}
            for c, v in sorted(money.items())]}
    return out


def answered(body: dict[str, Any], by: list[str]) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The API's groups keyed like ``expected`` (records by id, months as dates)."""
    groups = data_or_fail(body)["dealsAggregate"]["groups"]
    out = {}
    for g in groups:
        key = []
        for b in by:
            value = g[KEYS[b]]
            if isinstance(value, dict):
                value = value["id"]
            elif b == "CLOSE_MONTH" and value is not None:
                value = dt.date.fromisoformat(value)
            key.append(value)
        for b, field in KEYS.items():
            if b not in by:
                assert g[field] is None, (b, g)
        assert tuple(key) not in out, "each group once"
        out[tuple(key)] = {"count": g["count"], "amount": [
            {k: (v if k in ("currency", "count") else Decimal(v)) for k, v in m.items()} for m in g["amount"]]}
    return out


def assert_same(got: dict[tuple[Any, ...], dict[str, Any]], want: dict[tuple[Any, ...], dict[str, Any]]) -> None:
    assert got.keys() == want.keys()
    for key, group in want.items():
        assert got[key]["count"] == group["count"], key
        for g, w in zip(got[key]["amount"], group["amount"], strict=True):
            assert (g["currency"], g["count"], g["sum"], g["min"], g["max"]) == \
                   (w["currency"], w["count"], w["sum"], w["min"], w["max"]), key
            assert abs(g["avg"] - w["avg"]) <= Decimal("0.005"), (key, g["avg"], w["avg"])


@pytest.fixture(scope="module")
async def two(app: Starlette, admin_engine: AsyncEngine, settings: Settings) -> tuple[Seeded, Seeded]:
    """Tenant A and tenant B, both seeded (B's deals differ: another seed); read-only for the tests."""
    a, b = await make_tenant_world(admin_engine, settings, "agga"), await make_tenant_world(admin_engine, settings,
                                                                                             "aggb")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        return await seed(client, a, 60, 1), await seed(client, b, 40, 2)


@pytest.mark.parametrize("by", [
    [], ["STAGE"], ["OWNER"], ["COMPANY"], ["STATUS"], ["CURRENCY"], ["CLOSE_MONTH"], ["PIPELINE"],
    ["STAGE", "CURRENCY"], ["OWNER", "STATUS", "CLOSE_MONTH"], ["COMPANY", "OWNER", "STAGE", "STATUS"],
])
async def test_groups_match_python_over_the_same_deals(either_client: httpx.AsyncClient,
                                                       two: tuple[Seeded, Seeded], by: list[str]) -> None:
    a, b = two
    for side in (a, b):
        body = await gql(either_client, AGGREGATE, {"by": by}, token=side.world.token(Role.VIEWER))
        want = expected(side.deals, by)
        assert_same(answered(body, by), want)
        assert data_or_fail(body)["dealsAggregate"]["groupCount"] == len(want)


async def test_money_is_never_summed_across_currencies(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("aggc")
    token = world.token()
    stage = (await create_pipeline(client, token))["stages"][0]["id"]
    data_or_fail(await gql(client, "mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }", {"input": [
        {"title": "a", "amount": "10.00", "currency": "USD", "stageId": stage},
        {"title": "b", "amount": "20.00", "currency": "USD", "stageId": stage},
        {"title": "c", "amount": "1000.00", "currency": "JPY", "stageId": stage}]}, token=token))
    groups = data_or_fail(await gql(client, AGGREGATE, {"by": ["STAGE"]}, token=token))["dealsAggregate"]["groups"]
    assert len(groups) == 1 and groups[0]["count"] == 3 and groups[0]["stage"]["id"] == stage
    assert groups[0]["amount"] == [
        {"currency": "JPY", "count": 1, "sum": "1000.00", "avg": "1000.00", "min": "1000.00", "max": "1000.00"},
        {"currency": "USD", "count": 2, "sum": "30.00", "avg": "15.00", "min": "10.00", "max": "20.00"}]


@pytest.mark.parametrize("name", ["status and amount", "stage", "company and close dates", "search"])
async def test_filters_are_the_lists_filters(either_client: httpx.AsyncClient, two: tuple[Seeded, Seeded],
                                             name: str) -> None:
    a, _ = two
    filters: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = {
        "status and amount": ({"status": ["OPEN", "WON"], "amountMin": "2000", "amountMax": "8000.50"},
                              lambda d: d["status"] != "LOST" and Decimal(2000) <= d["amount"] <= Decimal("8000.50")),
        "stage": ({"stageId": a.stages[1]}, lambda d: d["stage"] == a.stages[1]),
        "company and close dates": (
            {"companyId": a.companies[0], "closeDateFrom": "2031-01-01", "closeDateTo": "2031-02-28"},
            lambda d: d["company"] == a.companies[0] and d["closeMonth"] in (dt.date(2031, 1, 1), dt.date(2031, 2, 1))),
        "search": ({"search": "Deal 1"}, lambda d: a.deals.index(d) == 1 or str(a.deals.index(d)).startswith("1")),
    }
    given, keep = filters[name]
    body = await gql(either_client, AGGREGATE, {"by": ["OWNER", "CURRENCY"], "filter": given},
                     token=a.world.token())
    chosen = [d for d in a.deals if keep(d)]
    assert chosen, "the filter must select something for the test to mean anything"
    assert_same(answered(body, ["OWNER", "CURRENCY"]), expected(chosen, ["OWNER", "CURRENCY"]))
    listed = data_or_fail(await gql(either_client, "query($f: DealFilter) { deals(filter: $f) { totalCount } }",
                                    {"f": given}, token=a.world.token()))["deals"]["totalCount"]
    assert listed == len(chosen)


async def test_another_tenants_rows_are_never_counted(either_client: httpx.AsyncClient,
                                                      two: tuple[Seeded, Seeded]) -> None:
    a, b = two
    body = await gql(either_client, AGGREGATE, {"by": [], "filter": {"stageId": b.stages[0]}}, token=a.world.token())
    assert data_or_fail(body)["dealsAggregate"]["groups"] == [
        {"count": 0, "status": None, "currency": None, "closeMonth": None, "stage": None, "owner": None,
         "company": None, "pipeline": None, "amount": []}]
    body = await gql(either_client, AGGREGATE, {"by": ["COMPANY"], "filter": {"companyId": b.companies[0]}},
                     token=a.world.token())
    assert data_or_fail(body)["dealsAggregate"] == {"groupCount": 0, "groups": []}
    totals = data_or_fail(await gql(either_client, AGGREGATE, {"by": []}, token=a.world.token()))
    assert totals["dealsAggregate"]["groups"][0]["count"] == len(a.deals)


async def test_largest_groups_first_at_most_first(client: httpx.AsyncClient, two: tuple[Seeded, Seeded]) -> None:
    a, _ = two
    by = ["OWNER", "STAGE"]
    body = await gql(client, AGGREGATE, {"by": by, "first": 3}, token=a.world.token())
    result = data_or_fail(body)["dealsAggregate"]
    want = expected(a.deals, by)
    assert result["groupCount"] == len(want) > 3 and len(result["groups"]) == 3
    counts = [g["count"] for g in result["groups"]]
    assert counts == sorted(counts, reverse=True) == sorted((g["count"] for g in want.values()), reverse=True)[:3]
    for first in (0, 1001):
        bad = await gql(client, AGGREGATE, {"by": by, "first": first}, token=a.world.token())
        assert codes(bad) == ["BAD_USER_INPUT"] and bad["errors"][0]["extensions"]["field"] == "first"


async def test_bad_filters_are_refused_like_the_lists(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("aggf")
    body = await gql(client, AGGREGATE, {"by": [], "filter": {"amountMin": "5", "amountMax": "1"}},
                     token=world.token())
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "filter.amountMin"
    assert codes(await gql(client, AGGREGATE, {"by": []})) == ["UNAUTHENTICATED"]


async def test_aggregates_cost_by_first(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("aggk")
    heavy = "{ dealsAggregate(first: 1000) { groups { stage { deals(first: 50) { id } } } } }"
    body = await gql(client, heavy, token=world.token())
    assert codes(body) == ["QUERY_TOO_COMPLEX"] and body["errors"][0]["extensions"]["cost"] > 50_000
    light = "{ dealsAggregate(first: 10) { groups { stage { deals(first: 50) { id } } } } }"
    assert data_or_fail(await gql(client, light, token=world.token()))["dealsAggregate"]["groups"] == [
        {"stage": None}]


async def test_other_records_aggregate_as_declared(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("aggo")
    token = world.token()
    companies = [await create_company(client, token) for _ in range(2)]
    for i in range(5):
        await create_contact(client, token, company_id=companies[i % 2]["id"] if i < 4 else None)
    body = data_or_fail(await gql(client, """
        { contactsAggregate(groupBy: [COMPANY]) { groupCount groups { count company { id } createdMonth } }
          companiesAggregate(groupBy: [CREATED_MONTH]) { groups { count createdMonth } } }""", token=token))
    contacts = {(g["company"] or {}).get("id"): g["count"] for g in body["contactsAggregate"]["groups"]}
    assert contacts == {companies[0]["id"]: 2, companies[1]["id"]: 2, None: 1}
    month = dt.datetime.now(dt.UTC).date().replace(day=1).isoformat()
    assert body["companiesAggregate"]["groups"] == [{"count": 2, "createdMonth": month}]
    products = data_or_fail(await gql(client, "mutation($input: [ProductInput!]!) { createProducts(input: $input) "
                                              "{ id } }", {"input": [
        {"name": f"P{i}", "sku": f"SKU-{uuid.uuid4().hex[:6]}", "unitPrice": price, "currency": currency}
        for i, (price, currency) in enumerate([("1.00", "USD"), ("3.00", "USD"), ("5.00", "EUR")])]},
        token=token))["createProducts"]
    assert len(products) == 3
    body = data_or_fail(await gql(client, """
        { productsAggregate(groupBy: [ACTIVE]) { groups { count active unitPrice { currency sum avg } } } }""",
        token=token))
    assert body["productsAggregate"]["groups"] == [{"count": 3, "active": True, "unitPrice": [
        {"currency": "EUR", "sum": "5.00", "avg": "5.00"}, {"currency": "USD", "sum": "4.00", "avg": "2.00"}]}]


async def test_one_statement_per_aggregate(settings: Settings, make_tenant: MakeTenant) -> None:
    """The aggregate is one SELECT; related records in the groups come through the loaders (one
    statement per relation, whatever the number of groups)."""
    async with wired_app(settings) as application:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application),
                                     base_url="http://atrium.test") as client:
            world = await make_tenant("aggw")
            await seed(client, world, 30)
            wire = application.state.wire
            plain_query = "{ dealsAggregate(groupBy: [STATUS, CURRENCY]) { groups { count amount { sum } } } }"
            related_query = ("{ dealsAggregate(groupBy: [STAGE, OWNER]) "
                             "{ groups { count stage { name } owner { name } } } }")
            for query in (plain_query, related_query):  # the driver learns the result types once per connection
                data_or_fail(await gql(client, query, token=world.token()))
            with wire.recording() as plain:
                data_or_fail(await gql(client, plain_query, token=world.token()))
            with wire.recording() as related:
                data_or_fail(await gql(client, related_query, token=world.token()))
    work = [s for s in plain if "GROUP BY" in s]
    assert len(work) == 1 and "tenant_id" in work[0], plain
    others = [s for s in plain if s not in work and not s.startswith(("BEGIN", "COMMIT"))]
    assert len(others) == 1 and "atrium_enter" in others[0], plain
    assert len([s for s in related if "GROUP BY" in s]) == 1
    assert len([s for s in related if s.startswith("SELECT") and "GROUP BY" not in s
                and "atrium_enter" not in s]) == 2, related


async def test_rls_alone_keeps_an_aggregate_in_the_transactions_tenant(
        two: tuple[Seeded, Seeded], settings: Settings) -> None:
    """The aggregate's statement with its explicit tenant filter naming A, run in B's tenant
    transaction as the server's role: RLS alone leaves nothing of A's to count."""
    a, b = two
    aggregation = DEAL.aggregation
    assert aggregation is not None
    stage = next(g for g in aggregation.groups if g.name == "STAGE")
    databases = Databases(settings.app_url, pool_size=1)
    try:
        for tenant, seen in ((a, len(a.deals)), (b, 0)):
            async with databases.tenant_transaction(tenant.world.id) as conn:
                rows = (await conn.execute(statement(DEAL, aggregation, a.world.id, {}, [], 100))).all()
            assert [int(r.records or 0) for r in rows] == [seen]
            async with databases.tenant_transaction(tenant.world.id) as conn:
                rows = (await conn.execute(statement(DEAL, aggregation, a.world.id, {}, [stage], 100))).all()
            assert sum(int(r.records) for r in rows) == seen
    finally:
        await databases.dispose()
