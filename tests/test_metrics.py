"""``/metrics``: what operators scrape moves with real traffic, names no tenant, and is closed in production.

Counters are compared before and after the test's own requests (the app is shared by the session).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from atrium.app import create_app
from core.settings import Settings
from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_pipeline
from tests.live import AtriumProcess, graphql, live

MakeTenant = Callable[..., Awaitable[TenantWorld]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
BOARD = "subscription($p: ID!) { dealBoard(pipelineId: $p) { __typename ... on Resync { reason } } }"
DEAL = "mutation($input: DealInput!) { createDeal(input: $input) { id } }"


async def scrape(client: httpx.AsyncClient, **headers: str) -> tuple[str, Samples]:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_requests_operations_and_errors_are_counted(client: httpx.AsyncClient,
                                                          make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("metrics")
    token = tenant.token(Role.MEMBER)
    _, before = await scrape(client)

    data_or_fail(await gql(client, "{ me { id } }", token=token))
    assert codes(await gql(client, '{ deal(id: "not-an-id") { id } }', token=token)) == ["BAD_USER_INPUT"]
    assert codes(await gql(client, "{ noSuchField }", token=token)) == ["GRAPHQL_VALIDATION_FAILED"]
    await create_pipeline(client, token)
    assert (await gql(client, "{ me { id } }", token="not-a-token"))["_status"] == 401

    text, after = await scrape(client)
    assert delta(before, after, "atrium_graphql_operations_total", type="query") == 2  # the invalid one never ran
    assert delta(before, after, "atrium_graphql_operations_total", type="mutation") == 1
    assert delta(before, after, "atrium_graphql_errors_total", code="BAD_USER_INPUT") == 1
    assert delta(before, after, "atrium_graphql_errors_total", code="GRAPHQL_VALIDATION_FAILED") == 1
    assert delta(before, after, "atrium_http_requests_total", route="graphql", status="200") == 4
    assert delta(before, after, "atrium_http_requests_total", route="graphql", status="401") == 1
    assert delta(before, after, "atrium_http_request_duration_seconds_count", route="graphql") == 5
    assert delta(before, after, "atrium_http_requests_total", route="metrics", status="200") == 1
    assert delta(before, after, "atrium_broker_events_published_total") >= 1  # the pipeline and its stages
    assert value(after, "atrium_db_pool_size") >= 1
    for secret in (tenant.slug, str(tenant.id), token):
        assert secret not in text, "metrics never name a tenant or carry a credential"


async def test_production_serves_metrics_only_with_a_token(settings: Settings) -> None:
    closed = create_app(dataclasses.replace(settings, env="production", metrics_token=None))
    guarded = create_app(dataclasses.replace(settings, env="production", metrics_token="scrape-secret"))
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=closed), base_url="http://a") as a,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=guarded), base_url="http://b") as b):
        assert (await a.get("/metrics", headers={"authorization": "Bearer scrape-secret"})).status_code == 404
        assert (await b.get("/metrics")).status_code == 401
        assert (await b.get("/metrics", headers={"authorization": "Bearer wrong"})).status_code == 401
        text, _ = await scrape(b, authorization="Bearer scrape-secret")
        assert "atrium_http_requests_total" in text


async def test_live_updates_are_measured_per_process(servers: tuple[AtriumProcess, AtriumProcess],
                                                     make_tenant: MakeTenant) -> None:
    a, b = servers
    tenant = await make_tenant("metricslive")
    token = tenant.token()
    async with a.client() as client_a, b.client() as client_b:
        pipeline = await create_pipeline(client_b, token)
        _, before = await scrape(client_a)
        async with live(a.ws_url, token) as sub:
            board = await sub.live(BOARD, {"p": pipeline["id"]})
            await graphql(client_b, token, DEAL, input={"title": "Measured", "amount": "10", "currency": "EUR",
                                                        "stageId": pipeline["stages"][0]["id"]})
            assert (await sub.data(board))["dealBoard"]["__typename"] == "DealChange"
            _, during = await scrape(client_a)
    assert value(during, "atrium_websocket_connections") >= 1
    assert value(during, "atrium_subscriptions") >= 1 and value(during, "atrium_subscription_groups") >= 1
    assert delta(before, during, "atrium_graphql_operations_total", type="subscription") == 1
    assert delta(before, during, "atrium_broker_events_received_total") >= 1  # from process B, through Redis
    assert delta(before, during, "atrium_subscription_results_total") >= 2  # the Resync, then the change
