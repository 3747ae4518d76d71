"""The executor batches nested relations: the number of SQL statements of a page does not grow with its size.

These tests describe the executor's loaders, so they run on an app with plans off (with plans, a
query of record fields is one statement whatever its shape: tests/test_plans.py). Statements are
counted on the wire (``tests.wire.WireCounter``, between the app and PostgreSQL): every statement
the server sends, ``BEGIN`` and ``COMMIT`` included, whichever layer sends it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from core.settings import Settings
from models.tables import DEALS, Role
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.crm import create_company, create_contact, create_pipeline, gid
from tests.wire import WireCounter, wired_app

MakeTenant = Callable[..., Awaitable[TenantWorld]]


@pytest.fixture(scope="module")
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    """The executor's app: plans off, so every field resolves through the loaders; its connections
    go through a wire proxy that records every statement (``app.state.wire``)."""
    async with wired_app(settings, plans=False) as application:
        yield application


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as c:
        yield c

DASHBOARD = """
query Dashboard($n: Int!) {
  deals(first: $n) {
    edges {
      node {
        id title amount currency status
        company { name }
        contact { firstName email }
        owner { name }
        stage { name probability }
        activities(first: 3) { kind subject occurredAt }
      }
    }
  }
}"""

COMPANIES_PAGE = """
query Companies($n: Int!) {
  companies(first: $n) {
    edges {
      node {
        id name
        contacts(first: 5) { id firstName company { id name } }
        deals(first: 5) { id title }
      }
    }
  }
}"""

DEAL = "mutation($input: DealInput!) { createDeal(input: $input) { id } }"
ACTIVITY = "mutation($input: ActivityInput!) { createActivity(input: $input) { id } }"
MAX_STATEMENTS = 10
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


@contextmanager
def counting(app: Starlette) -> Iterator[list[str]]:
    """The statements the app sends on the wire while the block runs."""
    wire: WireCounter = app.state.wire
    with wire.recording() as statements:
        yield statements


async def measure(client: httpx.AsyncClient, app: Starlette, token: str, query: str,
                  variables: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    with counting(app) as statements:
        body = await gql(client, query, variables, token=token)
    return data_or_fail(body), statements


async def seed(client: httpx.AsyncClient, tenant: TenantWorld, deals: int) -> None:
    """``deals`` deals, each with its own company, contact (of that company) and 4 activities.

    Owners alternate between two members; stages between two stages.
    """
    token = tenant.token(Role.OWNER)
    pipeline = await create_pipeline(client, token, name="Board", stages=("Lead", "Won"))
    stages = [s["id"] for s in pipeline["stages"]]
    owners = [gid("User", tenant.users[Role.OWNER]), gid("User", tenant.users[Role.MEMBER])]
    base = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)

    async def one(i: int) -> None:
        company = await create_company(client, token, name=f"Company {i:03d}", domain=f"c{i}.example")
        contact = await create_contact(client, token, first_name=f"First{i}", last_name=f"Last{i:03d}",
                                       email=f"p{i}@c{i}.example", company_id=company["id"])
        deal = data_or_fail(await gql(client, DEAL, {"input": {
            "title": f"Deal {i:03d}", "amount": f"{100 + i}.50", "currency": "USD", "stageId": stages[i % 2],
            "companyId": company["id"], "contactId": contact["id"], "ownerId": owners[i % 2]}}, token=token))
        for k in range(4):
            data_or_fail(await gql(client, ACTIVITY, {"input": {
                "kind": "CALL", "subject": f"Call {i}-{k}", "dealId": deal["createDeal"]["id"],
                "occurredAt": (base + dt.timedelta(days=k, minutes=i)).isoformat()}}, token=token))

    for start in range(0, deals, 10):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 10, deals))))


async def test_dashboard_statement_count_does_not_depend_on_page_size(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("dl")
    await seed(client, tenant, 50)
    token = tenant.token(Role.VIEWER)
    await measure(client, app, token, DASHBOARD, {"n": 1})  # warm up: the tenant's engine route is cached

    small, small_statements = await measure(client, app, token, DASHBOARD, {"n": 5})
    large, large_statements = await measure(client, app, token, DASHBOARD, {"n": 50})

    assert len(small["deals"]["edges"]) == 5
    assert len(large["deals"]["edges"]) == 50
    for edge in large["deals"]["edges"]:
        node = edge["node"]
        number = node["title"].removeprefix("Deal ")
        assert node["company"] == {"name": f"Company {number}"}
        assert node["contact"]["email"] == f"p{int(number)}@c{int(number)}.example"
        assert node["owner"]["name"] and node["stage"]["name"] in ("Lead", "Won")
        subjects = [a["subject"] for a in node["activities"]]
        assert subjects == [f"Call {int(number)}-{k}" for k in (3, 2, 1)]  # latest 3, newest first
    assert len(small_statements) == len(large_statements), (small_statements, large_statements)
    assert len(large_statements) <= MAX_STATEMENTS, large_statements


async def test_company_contacts_and_contact_company_are_batched(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("dl")
    await seed(client, tenant, 30)
    token = tenant.token(Role.VIEWER)
    await measure(client, app, token, COMPANIES_PAGE, {"n": 1})

    small, small_statements = await measure(client, app, token, COMPANIES_PAGE, {"n": 3})
    large, large_statements = await measure(client, app, token, COMPANIES_PAGE, {"n": 30})

    assert len(small["companies"]["edges"]) == 3
    assert len(large["companies"]["edges"]) == 30
    for edge in large["companies"]["edges"]:
        node = edge["node"]
        assert len(node["contacts"]) == 1
        assert node["contacts"][0]["company"] == {"id": node["id"], "name": node["name"]}
        assert len(node["deals"]) == 1
    assert len(small_statements) == len(large_statements), (small_statements, large_statements)
    assert len(large_statements) <= MAX_STATEMENTS, large_statements


async def test_contacts_page_batches_company(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("dl")
    await seed(client, tenant, 20)
    token = tenant.token(Role.VIEWER)
    query = "query($n: Int!) { contacts(first: $n) { edges { node { lastName company { name contacts { id } } } } } }"
    await measure(client, app, token, query, {"n": 1})

    _, small_statements = await measure(client, app, token, query, {"n": 2})
    large, large_statements = await measure(client, app, token, query, {"n": 20})

    assert [e["node"]["company"]["name"] for e in large["contacts"]["edges"]] == [
        f"Company {i:03d}" for i in range(20)]
    assert len(small_statements) == len(large_statements), (small_statements, large_statements)


ALIASED = """
query($n: Int!) {
  a: deals(first: $n, orderBy: {field: AMOUNT, direction: ASC}) {
    edges { node { title company { name } owner { name } stage { name } activities(first: 3) { subject } } }
  }
  b: deals(first: $n, orderBy: {field: AMOUNT, direction: DESC}) {
    edges { node { title company { name } owner { name } stage { name } activities(first: 3) { subject } } }
  }
}"""
SINGLE = """
query($n: Int!) {
  a: deals(first: $n, orderBy: {field: AMOUNT, direction: ASC}) {
    edges { node { title company { name } owner { name } stage { name } activities(first: 3) { subject } } }
  }
}"""


async def test_aliased_root_fields_share_loaders_for_the_same_rows(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    """Both aliases list all 10 deals: the second one's relations come from the first's batches."""
    tenant = await make_tenant("dl")
    await seed(client, tenant, 10)
    token = tenant.token(Role.VIEWER)
    await measure(client, app, token, SINGLE, {"n": 1})

    _, single = await measure(client, app, token, SINGLE, {"n": 10})
    both, aliased = await measure(client, app, token, ALIASED, {"n": 10})

    titles_a = [e["node"]["title"] for e in both["a"]["edges"]]
    titles_b = [e["node"]["title"] for e in both["b"]["edges"]]
    assert titles_a == list(reversed(titles_b)) and len(titles_a) == 10
    assert len(aliased) == len(single) + 1, (single, aliased)  # only the second page query is extra


async def test_aliased_root_fields_over_disjoint_deals_batch_per_field(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    """Two aliases over disjoint deals: each relation costs at most one batch per alias, whatever the page size.

    (The aliases' relations are not merged into one batch: the second page is still being read when the
    first one's loaders dispatch. The count grows with root fields, never with rows.)
    """
    tenant = await make_tenant("dl")
    await seed(client, tenant, 20)
    token = tenant.token(Role.VIEWER)
    await measure(client, app, token, SINGLE, {"n": 1})

    _, single = await measure(client, app, token, SINGLE, {"n": 5})
    small, aliased_small = await measure(client, app, token, ALIASED, {"n": 5})
    large, aliased_large = await measure(client, app, token, ALIASED, {"n": 10})

    titles = {e["node"]["title"] for e in small["a"]["edges"]} | {e["node"]["title"] for e in small["b"]["edges"]}
    assert len(titles) == 10
    large_titles = {e["node"]["title"] for alias in ("a", "b") for e in large[alias]["edges"]}
    assert len(large_titles) == 20
    assert len(aliased_small) == len(aliased_large), (aliased_small, aliased_large)
    assert len(aliased_small) <= 2 * len(single) - 3, (single, aliased_small)  # BEGIN, enter, COMMIT: once


async def test_readme_dashboard_query_costs_what_readme_says(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    query = re.search(r"try the dashboard query:\n\n```graphql\n(.*?)```", README, re.S)
    claim = re.search(r"the dashboard above costs (\d+)\s+SQL statements", README)
    assert query and claim, "README's dashboard query or its statement count moved"
    tenant = await make_tenant("readme")
    await seed(client, tenant, 25)
    async with admin_engine.begin() as conn:  # into the query's amountMin filter
        await conn.execute(update(DEALS).where(DEALS.c.tenant_id == tenant.id).values(amount=DEALS.c.amount + 10000))
    token = tenant.token(Role.VIEWER)
    # Warm up: the tenant's engine route is cached, asyncpg has introspected the query's types.
    await measure(client, app, token, query.group(1), {})
    data, statements = await measure(client, app, token, query.group(1), {})
    assert data["deals"]["totalCount"] == 25 and len(data["deals"]["edges"]) == 20
    assert all(e["node"]["company"] and len(e["node"]["activities"]) == 3 for e in data["deals"]["edges"])
    assert len(statements) == int(claim.group(1)), statements


PAGE_WITH_FRAGMENTS = """
query($skipOwner: Boolean!) {
  deals(first: 6) {
    edges {
      node {
        ...Card
        latest: activities(first: 1) { subject }
        recent: activities(first: 3) { subject }
        owner @skip(if: $skipOwner) { name }
      }
    }
  }
}
fragment Card on Deal { title company { name } ... on Deal { stage { name } } }"""


async def test_relations_selected_on_a_page_are_loaded_together(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    """Through fragments and aliases with their own limits; a skipped relation is not loaded."""
    tenant = await make_tenant("prefetch")
    await seed(client, tenant, 6)
    token = tenant.token(Role.VIEWER)
    await measure(client, app, token, DASHBOARD, {"n": 1})  # warm up: the tenant's engine route is cached
    with_owner, statements_with_owner = await measure(client, app, token, PAGE_WITH_FRAGMENTS, {"skipOwner": False})
    data, statements = await measure(client, app, token, PAGE_WITH_FRAGMENTS, {"skipOwner": True})
    # BEGIN, tenant and membership, page, companies, stages, activities(1), activities(3) [, owners], COMMIT
    assert len(statements) == 8 and len(statements_with_owner) == 9, statements_with_owner
    for edge in data["deals"]["edges"]:
        node = edge["node"]
        number = int(node["title"].removeprefix("Deal "))
        assert node["company"] == {"name": f"Company {number:03d}"}
        assert node["stage"]["name"] in ("Lead", "Won")
        assert [a["subject"] for a in node["recent"]] == [f"Call {number}-{k}" for k in (3, 2, 1)]
        assert node["latest"] == node["recent"][:1]
        assert "owner" not in node
    assert all(edge["node"]["owner"]["name"] for edge in with_owner["deals"]["edges"])


BOARD = """
query Board($id: ID!, $n: Int!) {
  pipeline(id: $id) {
    stages {
      id
      deals(first: $n) { title stage { id } company { name } owner { name } activities(first: 2) { subject } }
    }
  }
}"""


async def test_a_board_of_stage_lists_costs_the_same_whatever_their_length(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    """The live dashboard's snapshot: each stage's list loads its deals' relations ahead, in shared batches."""
    tenant = await make_tenant("board")
    await seed(client, tenant, 20)
    token = tenant.token(Role.VIEWER)
    pipelines = data_or_fail(await gql(client, "{ pipelines { id } }", token=token))["pipelines"]
    variables = {"id": pipelines[0]["id"]}
    small, small_statements = await measure(client, app, token, BOARD, {**variables, "n": 2})
    large, large_statements = await measure(client, app, token, BOARD, {**variables, "n": 10})
    # BEGIN, tenant and membership, pipeline, stages, deals of the stages, stages, companies, owners,
    # activities, COMMIT
    assert len(small_statements) == len(large_statements) == 10, large_statements
    for stage in large["pipeline"]["stages"]:
        assert len(stage["deals"]) == 10
        for deal in stage["deals"]:
            number = int(deal["title"].removeprefix("Deal "))
            assert deal["stage"] == {"id": stage["id"]} and deal["company"] == {"name": f"Company {number:03d}"}
            assert [a["subject"] for a in deal["activities"]] == [f"Call {number}-{k}" for k in (3, 2)]
            assert deal["owner"]["name"]
    assert [len(s["deals"]) for s in small["pipeline"]["stages"]] == [2, 2]


async def test_loads_left_queued_by_an_error_take_no_connection(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    """An error at a non-null position cancels its siblings while their loads are still queued; those
    loads run after the request has closed its scope and must not begin a transaction again (that
    connection would never go back to the pool)."""
    tenant = await make_tenant("queued")
    await seed(client, tenant, 3)
    token = tenant.token(Role.OWNER)
    companies = data_or_fail(await gql(client, "{ companies { nodes { id } } }", token=token))["companies"]["nodes"]
    databases = app.state.runtime.databases
    for company in companies:
        body = await gql(client, """query($id: ID!) { node(id: $id) { ... on Company {
            contacts(first: 2) { id } deals(first: 3) { title } activities(first: -1) { id } } } }""",
                         {"id": company["id"]}, token=token)
        assert body["data"] == {"node": None} and body["errors"][0]["path"] == ["node", "activities"]
        for _ in range(10):  # let the queued batches run
            await asyncio.sleep(0)
        assert databases.pool_usage()[0] == 0


async def test_a_statement_whose_field_is_cancelled_runs_to_its_end(
        client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant) -> None:
    """When an error nulls the whole data, graphql-core cancels the other root fields; one whose
    statement is on the wire must not leave the connection mid-statement (the request's close would
    fail with "another operation is in progress" or a pending rollback)."""
    tenant = await make_tenant("cancelled")
    await seed(client, tenant, 3)
    for _ in range(5):
        body = await gql(client, "{ auditEvents(first: 3) { nodes { action } } deals(first: 1) { nodes { id } } }",
                         token=tenant.token(Role.VIEWER))
        assert body["data"] is None, body
        assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]
        assert app.state.runtime.databases.pool_usage()[0] == 0
