"""GraphQL over HTTP: media types, status codes, GET for queries only, malformed requests, batching.

Each rule of the specification (graphql/graphql-over-http, GraphQLOverHTTP.md) that Strawberry's own view
does not follow is checked here against the real endpoint.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from core.settings import Settings
from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.partners import bearer, running

MakeTenant = Callable[..., Awaitable[TenantWorld]]
GRJ = "application/graphql-response+json"
JSON = "application/json"


@pytest.fixture
async def auth(make_tenant: MakeTenant) -> dict[str, str]:
    world = await make_tenant("http")
    return bearer(world.token(Role.OWNER))


async def post(client: httpx.AsyncClient, body: Any, auth: dict[str, str], accept: str | None = None,
               **headers: str) -> httpx.Response:
    return await client.post("/graphql", json=body, headers={**auth, **({"accept": accept} if accept else {}),
                                                             **headers})


def media(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0]


# ---- media types ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("accept", "expected"), [
    (None, JSON),
    ("*/*", JSON),
    ("application/json", JSON),
    ("application/*", JSON),
    (GRJ, GRJ),
    (f"{GRJ}, {JSON};q=0.9", GRJ),
    (f"{GRJ};q=0.5, {JSON}", JSON),
    (f"{JSON}, {GRJ}", GRJ),
    (f"text/html, {GRJ};charset=utf-8", GRJ),
])
async def test_response_media_type_follows_accept(client: httpx.AsyncClient, auth: dict[str, str],
                                                  accept: str | None, expected: str) -> None:
    response = await post(client, {"query": "{ __typename }"}, auth, accept)
    assert response.status_code == 200
    assert media(response) == expected
    if expected == GRJ:
        assert response.headers["content-type"] == f"{GRJ}; charset=utf-8"
    assert response.json() == {"data": {"__typename": "Query"}}


async def test_nothing_acceptable_is_406(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    for accept in ("text/plain", "application/xml, text/csv", f"{GRJ};q=0"):
        response = await post(client, {"query": "{ __typename }"}, auth, accept)
        assert response.status_code == 406, accept


# ---- status codes by media type -------------------------------------------------------------------

@pytest.mark.parametrize(("body", "code"), [
    ({"query": "{ deals { totalCount }"}, "GRAPHQL_PARSE_FAILED"),
    ({"query": "{ deals { nope } }"}, "GRAPHQL_VALIDATION_FAILED"),
    ({"query": "query($n: Int!) { deals(first: $n) { totalCount } }", "variables": {}}, "BAD_USER_INPUT"),
    ({"query": "query($n: Int) { deals(first: $n) { totalCount } }", "variables": {"n": "ten"}}, "BAD_USER_INPUT"),
    ({"query": "query A { __typename } query B { __typename }"}, "GRAPHQL_VALIDATION_FAILED"),
    ({"query": "query A { __typename }", "operationName": "B"}, "GRAPHQL_VALIDATION_FAILED"),
], ids=["parse", "validation", "missing-variable", "bad-variable", "no-operation-name", "unknown-operation"])
async def test_request_errors_are_200_as_json_and_400_as_graphql_response(
        client: httpx.AsyncClient, auth: dict[str, str], body: dict[str, Any], code: str) -> None:
    for accept, status in ((JSON, 200), (GRJ, 400)):
        response = await post(client, body, auth, accept)
        assert response.status_code == status, (accept, response.text)
        payload = response.json()
        assert codes(payload) == [code], payload
        assert "data" not in payload, "a request error has no data entry"


async def test_field_errors_are_200_with_data_in_both_media_types(client: httpx.AsyncClient,
                                                                  auth: dict[str, str]) -> None:
    query = 'query { tenant { slug } deal(id: "bm90LWFuLWlk") { id } }'
    for accept in (JSON, GRJ):
        response = await post(client, {"query": query}, auth, accept)
        assert response.status_code == 200
        payload = response.json()
        assert "data" in payload and payload["errors"][0]["path"] == ["deal"]


async def test_unauthenticated_field_error_has_data_null(client: httpx.AsyncClient) -> None:
    response = await client.post("/graphql", json={"query": "{ me { id } }"}, headers={"accept": GRJ})
    assert response.status_code == 200
    assert response.json()["data"] is None and codes(response.json()) == ["UNAUTHENTICATED"]


# ---- malformed requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"NONSENSE", b'{"query":', b"[]", b'"just a string"', b"42",
    b'{"qeury": "{__typename}"}',
    b'{"query": 7}',
    b'{"query": "query Q($i: Int!) { __typename }", "variables": [7]}',
    b'{"query": "{ __typename }", "variables": "{}"}',
    b'{"query": "{ __typename }", "operationName": 3}',
    b'{"query": "{ __typename }", "extensions": [1]}',
    b'{"query": "{ __typename }", "documentId": "x"}',
    b'{"documentId": 12}',
    b'\xff\xfe',
], ids=["nonsense", "truncated", "empty-batch", "string", "number", "typo", "query-number", "variables-list",
        "variables-string", "operation-name-number", "extensions-list", "query-and-document-id", "document-id-number",
        "not-utf8"])
async def test_malformed_posts_are_400(client: httpx.AsyncClient, auth: dict[str, str], raw: bytes) -> None:
    for accept in (JSON, GRJ):
        response = await client.post("/graphql", content=raw,
                                     headers={**auth, "content-type": "application/json", "accept": accept})
        assert response.status_code == 400, (raw, response.text)
        assert codes(response.json()) == ["BAD_REQUEST"]


@pytest.mark.parametrize("query", [
    "", "query=%7B__typename%7D&variables=%5B1%5D", "query=%7B__typename%7D&variables=nope",
    "query=%7B__typename%7D&extensions=%5B%5D",
], ids=["nothing", "variables-list", "variables-not-json", "extensions-list"])
async def test_malformed_gets_are_400(client: httpx.AsyncClient, auth: dict[str, str], query: str) -> None:
    response = await client.get(f"/graphql?{query}", headers={**auth, "accept": JSON})
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=latin-1"])
async def test_post_needs_a_json_body(client: httpx.AsyncClient, auth: dict[str, str],
                                      content_type: str | None) -> None:
    headers = {**auth, **({"content-type": content_type} if content_type else {})}
    response = await client.post("/graphql", content=b'{"query": "{ __typename }"}', headers=headers)
    assert response.status_code == 415


async def test_json_body_with_utf8_charset_is_accepted(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.post("/graphql", content=b'{"query": "{ __typename }"}',
                                 headers={**auth, "content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200


# ---- GET ------------------------------------------------------------------------------------------

def url(**params: Any) -> str:
    return "/graphql?" + urllib.parse.urlencode(
        {k: json.dumps(v) if isinstance(v, dict) else v for k, v in params.items()})


async def test_get_runs_queries(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await client.get(url(query="query($n: Int) { deals(first: $n) { totalCount } }", variables={"n": 1},
                                    operationName=""), headers=auth)
    assert response.status_code == 200 and response.json() == {"data": {"deals": {"totalCount": 0}}}
    assert "Authorization" in response.headers["vary"]


async def test_mutation_by_get_is_405_and_does_not_run(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    for accept in (JSON, GRJ):
        response = await client.get(url(query='mutation { createCompany(input: {name: "Sneaky"}) { id } }'),
                                    headers={**auth, "accept": accept})
        assert response.status_code == 405 and response.headers["allow"] == "POST"
    # Also when the mutation is the operation picked by name.
    document = 'query Q { __typename } mutation M { createCompany(input: {name: "Sneaky"}) { id } }'
    response = await client.get(url(query=document, operationName="M"), headers=auth)
    assert response.status_code == 405
    assert data_or_fail(await gql(client, "{ companies { totalCount } }", headers=auth)) == {
        "companies": {"totalCount": 0}}


async def test_other_methods_are_405(client: httpx.AsyncClient) -> None:
    for method in ("PUT", "DELETE", "PATCH"):
        response = await client.request(method, "/graphql", json={"query": "{ __typename }"})
        assert response.status_code == 405 and "POST" in response.headers["allow"]


async def test_graphiql_only_for_a_browser_get_without_a_document(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers={"accept": "text/html,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for params in ("?documentId=abc", "?extensions=%7B%7D", "?query=%7B__typename%7D"):
        response = await client.get(f"/graphql{params}", headers={"accept": "text/html,*/*;q=0.8"})
        assert not response.headers["content-type"].startswith("text/html"), params


async def test_subscriptions_are_not_served_over_http(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await post(client, {"query": "subscription { __typename }"}, auth)
    assert response.status_code == 400


# ---- operations and batching ----------------------------------------------------------------------

async def test_several_operations_need_an_operation_name(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    document = ('mutation First { createCompany(input: {name: "First"}) { name } } '
                'mutation Second { createCompany(input: {name: "Second"}) { name } }')
    refused = await post(client, {"query": document}, auth)
    assert codes(refused.json()) == ["GRAPHQL_VALIDATION_FAILED"]
    chosen = await post(client, {"query": document, "operationName": "Second"}, auth)
    assert chosen.json() == {"data": {"createCompany": {"name": "Second"}}}
    names = data_or_fail(await gql(client, "{ companies { nodes { name } } }", headers=auth))
    assert names == {"companies": {"nodes": [{"name": "Second"}]}}


async def test_batching_is_off_by_default(client: httpx.AsyncClient, auth: dict[str, str]) -> None:
    response = await post(client, [{"query": "{ __typename }"}, {"query": "{ tenant { slug } }"}], auth)
    assert response.status_code == 400
    assert "Batching is not enabled" in response.json()["errors"][0]["message"]


async def test_batching_when_enabled(settings: Settings, make_tenant: MakeTenant) -> None:
    world = await make_tenant("batch")
    async with running(settings, redis=None, batching=True, max_batch=3) as (_, client):
        headers = bearer(world.token(Role.OWNER))
        response = await client.post("/graphql", json=[{"query": "{ __typename }"}, {"query": "{ tenant { slug } }"},
                                                       {"query": "{ nope }"}], headers=headers)
        assert response.status_code == 200
        first, second, third = response.json()
        assert first == {"data": {"__typename": "Query"}}
        assert second == {"data": {"tenant": {"slug": world.slug}}}
        assert codes(third) == ["GRAPHQL_VALIDATION_FAILED"]
        too_many = await client.post("/graphql", json=[{"query": "{ __typename }"}] * 4, headers=headers)
        assert too_many.status_code == 400
