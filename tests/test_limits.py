"""Limits: operation cost from document and variables, the cost ceiling, and rate limits charged by cost.

Rate limits run against Redis (atomic Lua token buckets) and against the in-process store, in apps of
their own with small plans; the refill is set so slow that no token comes back during a test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from graphql import OperationDefinitionNode, parse
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.routing import WebSocketRoute

from atrium.schema import schema
from core.limits import LIMIT_RULES
from core.settings import PlanLimits, Settings
from models.tables import TENANTS, Role
from schema.cost import DEFAULT_PAGE, MAX_COST, UNBOUNDED_LIST, operation_cost
from schema.extensions import StaticLimits
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.live import error_codes, live, start_atrium
from tests.partners import bearer, new_key, plans, running, sha256

MakeTenant = Callable[..., Awaitable[TenantWorld]]
SLOW = 1e-6
"""Refill per second: effectively none within a test."""
CHEAP = "{ tenant { id } }"  # cost 1
EXPENSIVE = "{ deals(first: 50) { nodes { company { name } contact { email } } } }"  # 1 + 50 x 3 = 151


def cost(document: str, variables: dict[str, Any] | None = None, operation_name: str | None = None) -> int:
    parsed = parse(document)
    operations = [d for d in parsed.definitions if isinstance(d, OperationDefinitionNode)]
    operation = next(o for o in operations if operation_name is None or (o.name and o.name.value == operation_name))
    return operation_cost(schema._schema, parsed, operation, variables)


# ---- the cost model -------------------------------------------------------------------------------

@pytest.mark.parametrize(("document", "variables", "expected"), [
    ("{ __typename }", None, 1),
    ("{ me { id email } }", None, 1),
    (CHEAP, None, 1),
    (EXPENSIVE, None, 151),
    ("{ deals { totalCount } }", None, 1),
    ("{ deals { edges { node { id } } } }", None, 1 + DEFAULT_PAGE * 2),
    ("{ deals(last: 7) { nodes { id } pageInfo { hasNextPage } } }", None, 1 + 7 + 1),
    ("query($n: Int) { deals(first: $n) { nodes { id } } }", {"n": 30}, 31),
    ("query($n: Int = 12) { deals(first: $n) { nodes { id } } }", None, 13),
    ("query($n: Int) { deals(first: $n) { nodes { id } } }", {"n": "lots"}, 1 + DEFAULT_PAGE),
    ("{ deals(first: 10) { nodes { activities(first: 4) { id } } } }", None, 1 + 10 * (1 + 4)),
    ("{ deals(first: 10) { nodes { activities { id } } } }", None, 1 + 10 * (1 + 10)),  # schema default 10
    ("{ pipelines { stages { id } } }", None, UNBOUNDED_LIST * (1 + UNBOUNDED_LIST)),
    ("{ companies(first: 2) { nodes { contacts(first: 3) { deals(first: 4) { id } } } } }", None,
     1 + 2 * (1 + 3 * (1 + 4))),
    ("fragment F on Deal { company { name } } { deals(first: 10) { nodes { ...F } } }", None, 1 + 10 * 2),
    ("{ deals(first: 10) { nodes { ... on Deal { company { name } } } } }", None, 1 + 10 * 2),
    ("query($s: Boolean!) { tenant { id } deals(first: 9) @skip(if: $s) { nodes { id } } }", {"s": True}, 1),
    ("query($s: Boolean!) { tenant { id } deals(first: 9) @include(if: $s) { nodes { id } } }", {"s": True}, 11),
    ("{ node(id: \"x\") { ... on Deal { company { name } } ... on Company { contacts(first: 5) { id } } } }", None,
     1 + 1 + 5),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_operation_cost(document: str, variables: dict[str, Any] | None, expected: int) -> None:
    assert cost(document, variables) == expected


def test_cost_survives_invalid_documents() -> None:
    assert cost("{ nope { deeper } deals(first: 3) { nodes { ...Missing } } }") == 1 + (1 + 3)  # unknown: 1
    assert cost("fragment A on Deal { ...B } fragment B on Deal { ...A company { id } } "
                "{ deals(first: 2) { nodes { ...A } } }") == 1 + 2 * 2


def test_limit_rules_are_built_once() -> None:
    """Per-request rule classes would defeat the validation cache (STRAWBERRY.md section 5)."""
    assert StaticLimits().validation_rules == StaticLimits().validation_rules == list(LIMIT_RULES)


async def test_operation_above_the_ceiling_is_refused_before_running(client: httpx.AsyncClient,
                                                                     make_tenant: MakeTenant) -> None:
    world = await make_tenant("ceiling")
    huge = ("query($n: Int) { deals(first: $n) { nodes { company { contacts(first: 50) { deals(first: 50) { id } } }"
            " } } }")
    variables = {"n": 100}
    expected = cost(huge, variables)
    assert expected > MAX_COST
    for accept, status in (("application/json", 200), ("application/graphql-response+json", 400)):
        response = await client.post("/graphql", json={"query": huge, "variables": variables},
                                     headers={**bearer(world.token(Role.VIEWER)), "accept": accept})
        assert response.status_code == status
        body = response.json()
        assert "data" not in body
        assert body["errors"][0]["extensions"] == {"code": "QUERY_TOO_COMPLEX", "cost": expected,
                                                   "maximumCost": MAX_COST}
    # Several operations and no operationName: refused rather than running the first.
    both = 'mutation A { createCompany(input: {name: "A"}) { id } } mutation B { createCompany(input: {name: "B"}) ' \
           '{ id } }'
    refused = await gql(client, both, token=world.token(Role.OWNER))
    assert "operation name" in refused["errors"][0]["message"]
    assert data_or_fail(await gql(client, "{ companies { totalCount } }", token=world.token(Role.OWNER))) == {
        "companies": {"totalCount": 0}}


async def test_depth_alias_and_token_limits_hold(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("shape")
    token = world.token(Role.VIEWER)
    deep = "{ deals { nodes { " + "company { deals { " * 6 + "id" + " } }" * 6 + " } } }"
    assert "depth" in (await gql(client, deep, token=token))["errors"][0]["message"]
    aliases = "{ " + " ".join(f"a{i}: __typename" for i in range(40)) + " }"
    assert "aliases" in (await gql(client, aliases, token=token))["errors"][0]["message"]
    tokens = "{ " + "__typename " * 6000 + "}"
    assert codes(await gql(client, tokens, token=token)) == ["GRAPHQL_PARSE_FAILED"]


async def test_production_hides_introspection_and_suggestions(settings: Settings, make_tenant: MakeTenant) -> None:
    world = await make_tenant("prod")
    async with running(settings, redis=None, env="production") as (_, prod):
        body = await gql(prod, "{ __schema { types { name } } }", token=world.token(Role.OWNER))
        assert body["errors"] and "introspection" in body["errors"][0]["message"].lower()
        body = await gql(prod, "{ dealz { totalCount } }", token=world.token(Role.OWNER))
        assert body["errors"] and "Did you mean" not in body["errors"][0]["message"]


# ---- rate limits ----------------------------------------------------------------------------------

@pytest.fixture(params=["redis", "memory"])
def store(request: pytest.FixtureRequest) -> str | None:
    """Where the buckets live: the Redis of the run (its URL), or the in-process store (None)."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("redis_url")
    return url


def metered(settings: Settings, store: str | None, capacity: int, **key: Any) -> Any:
    return running(settings, redis=store, rate_limits=True, plan_limits=plans(capacity, SLOW, **key))


def remaining(response: httpx.Response) -> int:
    return int(response.headers["ratelimit-remaining"])


async def test_a_planned_query_answered_again_is_charged_its_cost_every_time(
        settings: Settings, store: str | None, make_tenant: MakeTenant) -> None:
    """Once its plan has answered it, a query is answered without Strawberry's pipeline: the cost is
    still charged on every request, and a refusal is answered as the pipeline answers it."""
    query = "query($n: Int!) { deals(first: $n) { nodes { id } } }"
    each = cost(query, {"n": 4})  # 1 + 4
    world = await make_tenant("prepared")
    async with metered(settings, store, 3 * each + 2) as (app, client):
        auth = bearer(world.token(Role.VIEWER))
        left = []
        for _ in range(3):
            response = await client.post("/graphql", json={"query": query, "variables": {"n": 4}}, headers=auth)
            assert response.status_code == 200 and "errors" not in response.json()
            left.append(remaining(response))
        # The WebSocket route is the view itself (the HTTP one wraps it in atrium.http.failures).
        view: Any = next(r for r in app.routes if isinstance(r, WebSocketRoute) and r.path == "/graphql").endpoint
        assert not settings.plans or view.schema.plans.prepared(query, None) is not None  # the fast path was taken
        assert left == [2 * each + 2, each + 2, 2]
        refused = await client.post("/graphql", json={"query": query, "variables": {"n": 4}}, headers=auth)
        assert refused.status_code == 429 and codes(refused.json()) == ["RATE_LIMITED"]
        assert "data" not in refused.json() and refused.headers["retry-after"]
        cheaper = await client.post("/graphql", json={"query": query, "variables": {"n": 1}}, headers=auth)
        assert cheaper.status_code == 200 and remaining(cheaper) == 0


async def test_one_hundred_concurrent_requests_against_fifty_admit_fifty(
        settings: Settings, store: str | None, make_tenant: MakeTenant) -> None:
    world = await make_tenant("burst")
    async with metered(settings, store, 50) as (_, client):
        auth = bearer(world.token(Role.VIEWER))
        responses = await asyncio.gather(*(client.post("/graphql", json={"query": CHEAP}, headers=auth)
                                           for _ in range(100)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 50 + [429] * 50
    for response in responses:
        assert response.headers["ratelimit-limit"] == "50"
        if response.status_code == 429:
            body = response.json()
            assert codes(body) == ["RATE_LIMITED"] and "data" not in body
            retry = body["errors"][0]["extensions"]["retryAfter"]
            assert retry >= 1 and response.headers["retry-after"] == str(retry)
            assert remaining(response) == 0
        else:
            assert response.json()["data"]["tenant"]["id"]


async def test_an_expensive_query_spends_more_than_a_cheap_one(settings: Settings, store: str | None,
                                                               make_tenant: MakeTenant) -> None:
    world = await make_tenant("spend")
    async with metered(settings, store, 10_000) as (_, client):
        auth = bearer(world.token(Role.VIEWER))
        first = await client.post("/graphql", json={"query": CHEAP}, headers=auth)
        cheap = await client.post("/graphql", json={"query": CHEAP}, headers=auth)
        expensive = await client.post("/graphql", json={"query": EXPENSIVE}, headers=auth)
    assert remaining(first) == 10_000 - 1
    assert remaining(first) - remaining(cheap) == cost(CHEAP) == 1
    assert remaining(cheap) - remaining(expensive) == cost(EXPENSIVE) == 151
    assert int(expensive.headers["ratelimit-reset"]) > int(cheap.headers["ratelimit-reset"])


async def test_limits_of_one_tenant_do_not_touch_another(settings: Settings, store: str | None,
                                                         make_tenant: MakeTenant) -> None:
    a, b = await make_tenant("limit-a"), await make_tenant("limit-b")
    async with metered(settings, store, 5) as (_, client):
        for _ in range(5):
            assert (await client.post("/graphql", json={"query": CHEAP}, headers=bearer(a.token()))).status_code == 200
        assert (await client.post("/graphql", json={"query": CHEAP}, headers=bearer(a.token()))).status_code == 429
        other = await client.post("/graphql", json={"query": CHEAP}, headers=bearer(b.token()))
        assert other.status_code == 200 and remaining(other) == 4


async def test_each_key_has_its_own_bucket_inside_its_tenants(settings: Settings, store: str | None,
                                                              client: httpx.AsyncClient,
                                                              make_tenant: MakeTenant) -> None:
    world = await make_tenant("keybucket")
    first = bearer((await new_key(client, world))["secret"])
    second = bearer((await new_key(client, world))["secret"])
    async with metered(settings, store, 100, key_capacity=3) as (_, metered_client):
        for _ in range(3):
            answer = await metered_client.post("/graphql", json={"query": CHEAP}, headers=first)
            assert answer.status_code == 200
        assert remaining(answer) == 0 and answer.headers["ratelimit-limit"] == "3"
        assert (await metered_client.post("/graphql", json={"query": CHEAP}, headers=first)).status_code == 429
        assert (await metered_client.post("/graphql", json={"query": CHEAP}, headers=second)).status_code == 200
        member = await metered_client.post("/graphql", json={"query": CHEAP}, headers=bearer(world.token()))
        assert member.status_code == 200
        assert (member.headers["ratelimit-limit"], remaining(member)) == ("100", 100 - 3 - 1 - 1)
        # A single operation costing more than the key's bucket holds can never run: too complex, not limited.
        body = (await metered_client.post("/graphql", json={"query": EXPENSIVE}, headers=second)).json()
        assert body["errors"][0]["extensions"] == {"code": "QUERY_TOO_COMPLEX", "cost": 151, "maximumCost": 3}


async def test_rate_limit_headers_are_on_every_response(settings: Settings, redis_url: str,
                                                        make_tenant: MakeTenant) -> None:
    world = await make_tenant("headers")
    auth = bearer(world.token(Role.VIEWER))
    async with metered(settings, redis_url, 20) as (_, client):
        answers = [
            await client.post("/graphql", json={"query": CHEAP}, headers=auth),
            await client.post("/graphql", json={"query": "{ nope }"}, headers=auth),
            await client.post("/graphql", content=b"{not json", headers={**auth, "content-type": "application/json"}),
            await client.get("/graphql?query=" + "mutation%20%7B%20__typename%20%7D", headers=auth),
            await client.post("/graphql", json={"query": "{ __typename }"}),
        ]
    assert [a.status_code for a in answers] == [200, 200, 400, 405, 200]
    for answer in answers:
        assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(answer.headers), answer.headers
    # Only executed operations are charged.
    assert [remaining(a) for a in answers[:4]] == [19, 19, 19, 19]


async def test_anonymous_callers_are_limited_per_address(settings: Settings, store: str | None) -> None:
    async with metered(settings, store, 3) as (_, client):
        statuses = [(await client.post("/graphql", json={"query": "{ __typename }"})).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


@pytest.fixture
async def unmetered_headers(client: httpx.AsyncClient) -> AsyncIterator[httpx.Response]:
    yield await client.post("/graphql", json={"query": "{ __typename }"})


async def test_rate_limits_can_be_turned_off(unmetered_headers: httpx.Response) -> None:
    """The shared test app runs with ``rate_limits=False`` (ATRIUM_RATE_LIMITS=off): no headers, no charges."""
    assert "ratelimit-limit" not in unmetered_headers.headers


async def test_limits_and_apq_fail_open_when_redis_is_down(settings: Settings, make_tenant: MakeTenant) -> None:
    """Nothing listens on port 1: operations run uncharged and without headers; APQ degrades to misses."""
    world = await make_tenant("redisdown")
    auth = bearer(world.token(Role.VIEWER))
    async with running(settings, redis=None, redis_url="redis://127.0.0.1:1/0", rate_limits=True) as (_, client):
        answer = await client.post("/graphql", json={"query": CHEAP}, headers=auth)
        assert answer.status_code == 200 and answer.json()["data"]["tenant"]["id"]
        assert "ratelimit-limit" not in answer.headers
        apq = {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": sha256(CHEAP)}}}
        assert codes((await client.post("/graphql", json=apq, headers=auth)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]
        registered = await client.post("/graphql", json={**apq, "query": CHEAP}, headers=auth)
        assert registered.json()["data"]["tenant"]["id"]


async def test_a_plan_change_applies_from_the_next_request(settings: Settings, make_tenant: MakeTenant,
                                                            admin_engine: AsyncEngine) -> None:
    world = await make_tenant("upgrade")
    limits = (PlanLimits("free", 5, SLOW, 5, SLOW), PlanLimits("pro", 500, SLOW, 500, SLOW),
              PlanLimits("enterprise", 5000, SLOW, 5000, SLOW), PlanLimits("anonymous", 5, SLOW, 5, SLOW))
    async with running(settings, redis=None, rate_limits=True, plan_limits=limits) as (_, client):
        auth = bearer(world.token(Role.VIEWER))
        async with admin_engine.begin() as conn:
            await conn.execute(update(TENANTS).where(TENANTS.c.id == world.id).values(plan="free"))
        free = await client.post("/graphql", json={"query": CHEAP}, headers=auth)
        async with admin_engine.begin() as conn:
            await conn.execute(update(TENANTS).where(TENANTS.c.id == world.id).values(plan="enterprise"))
        upgraded = await client.post("/graphql", json={"query": CHEAP}, headers=auth)
    assert free.headers["ratelimit-limit"] == "5"
    assert upgraded.headers["ratelimit-limit"] == "5000"


async def test_websocket_operations_spend_the_same_buckets(database_url: str, make_tenant: MakeTenant) -> None:
    """Queries over the socket are charged like HTTP ones: a WebSocket is no way around the limits."""
    world = await make_tenant("wslimit")
    token = world.token(Role.VIEWER)
    server = await start_atrium(database_url, None, {"ATRIUM_RATE_LIMITS": "free=3/0.000001"})
    try:
        async with live(server.ws_url, token) as sub:
            answers = [await sub.message(await sub.subscribe(CHEAP)) for _ in range(4)]
        async with server.client() as client:
            over_http = await client.post("/graphql", json={"query": CHEAP}, headers=bearer(token))
    finally:
        server.stop()
    assert [a["type"] for a in answers[:3]] == ["next"] * 3
    assert all(not a["payload"].get("errors") for a in answers[:3])
    assert answers[3]["type"] == "next" and error_codes(answers[3]) == ["RATE_LIMITED"], answers[3]
    assert answers[3]["payload"]["errors"][0]["extensions"]["retryAfter"] >= 1
    assert over_http.status_code == 429, "HTTP and the socket share the tenant's bucket"
