"""Bad input values fail closed: the same BAD_USER_INPUT, naming the same field, as a literal and as a
variable, on the plan path and through the executor; hostile JSON is a 400 BAD_REQUEST (and closes a
WebSocket as a malformed message, 4400).

Each case is one value at one place of one operation, sent once written into the document and once
as a variable: the answers must carry the same code, field and message (``schema.values``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from atrium.app import create_app
from core.settings import Settings
from models.tables import Role
from tests.conftest import codes, gql, make_tenant_world
from tests.crm import seed_crm
from tests.live import InProcessAtrium


@dataclass(frozen=True)
class Case:
    """``operation`` with ``$v`` (of ``type``) at the place under test; ``field``: what the error names."""

    operation: str
    type: str
    value: Any
    field: str
    same_message: bool = True
    """graphql-core words its own scalars' (ID, Int) and enums' messages apart for literals and variables."""


CASES: dict[str, Case] = {
    "base64-number": Case('mutation($v: Base64!) { applyNoteUpdate(noteId: "{note}", update: $v) { id } }',
                          "Base64!", 1, "update"),
    "base64-not-base64": Case('mutation($v: Base64!) { applyNoteUpdate(noteId: "{note}", update: $v) { id } }',
                              "Base64!", "abc", "update"),
    "base64-bad-alphabet": Case('mutation($v: Base64!) { applyNoteUpdate(noteId: "{note}", update: $v) { id } }',
                                "Base64!", "a*b=", "update"),
    "decimal-nan-in-input": Case('mutation($v: Decimal!) { createDeal(input: {title: "T", amount: $v, currency: "USD",'
                                 ' stageId: "{stage}"}) { id } }', "Decimal!", "NaN", "amount"),
    "decimal-infinity-filter": Case("query($v: Decimal) { deals(filter: {amountMin: $v}) { totalCount } }",
                                    "Decimal", "Infinity", "filter.amountMin"),
    "decimal-nan-filter": Case("query($v: Decimal) { deals(filter: {amountMax: $v}) { totalCount } }",
                               "Decimal", "NaN", "filter.amountMax"),
    "decimal-overflow-filter": Case("query($v: Decimal) { deals(filter: {amountMin: $v}) { totalCount } }",
                                    "Decimal", "1e309", "filter.amountMin"),
    "decimal-negative-filter": Case("query($v: Decimal) { deals(filter: {amountMin: $v}) { totalCount } }",
                                    "Decimal", "-1", "filter.amountMin"),
    "decimal-cents-filter": Case("query($v: Decimal) { deals(filter: {amountMin: $v}) { totalCount } }",
                                 "Decimal", "1.005", "filter.amountMin"),
    "decimal-boolean": Case("query($v: Decimal) { deals(filter: {amountMin: $v}) { totalCount } }",
                            "Decimal", True, "filter.amountMin"),
    "decimal-too-long": Case("query($v: Decimal) { deals(filter: {amountMin: $v}) { totalCount } }",
                             "Decimal", "1" * 500, "filter.amountMin"),
    "probability-nan": Case('mutation($v: Decimal!) { updateStage(id: "{stage}", input: {probability: $v}) { id } }',
                            "Decimal!", "NaN", "probability"),
    "date-not-a-date": Case("query($v: Date) { deals(filter: {closeDateFrom: $v}) { totalCount } }",
                            "Date", "soon", "filter.closeDateFrom"),
    "date-number": Case("query($v: Date) { deals(filter: {closeDateTo: $v}) { totalCount } }",
                        "Date", 20300101, "filter.closeDateTo"),
    "datetime-garbage": Case('mutation($v: DateTime) { updateActivity(id: "{activity}", input: {occurredAt: $v})'
                             ' { id } }', "DateTime", "yesterday", "occurredAt"),
    "datetime-out-of-range": Case('mutation($v: DateTime) { updateActivity(id: "{activity}", input: {occurredAt: $v})'
                                  ' { id } }', "DateTime", "0001-01-01T00:00:00+05:00", "occurredAt"),
    "api-key-expiry-out-of-range": Case('mutation($v: DateTime) { createApiKey(input: {name: "k", role: VIEWER, '
                                        'expiresAt: $v}) { secret } }', "DateTime", "9999-12-31T23:59:59-12:00",
                                        "input.expiresAt"),
    "api-key-name-nul": Case("mutation($v: String!) { createApiKey(input: {name: $v, role: VIEWER}) { secret } }",
                             "String!", "a\u0000b", "input.name"),
    "id-not-an-id": Case("query($v: ID!) { deal(id: $v) { id } }", "ID!", "nope", "id"),
    "id-wrong-type": Case("query($v: ID!) { deal(id: $v) { id } }", "ID!", True, "id", same_message=False),
    "cursor": Case("query($v: String) { deals(first: 2, after: $v) { totalCount } }", "String", "zzz", "after"),
    "int-overflow": Case("query($v: Int) { deals(first: $v) { totalCount } }", "Int", 2**40, "first",
                         same_message=False),
    "enum-unknown": Case("query($v: [DealStatus!]) { deals(filter: {status: $v}) { totalCount } }",
                         "[DealStatus!]", ["SOLD"], "filter.status.0", same_message=False),
    "nested-list-item": Case('mutation($v: Decimal!) { createPipeline(input: {name: "P", stages: '
                             '[{name: "A", probability: "0.5"}, {name: "B", probability: $v}]}) { id } }',
                             "Decimal!", "2", "stages.1.probability"),
    "json-manifest": Case('mutation($v: JSON!) { pushPersistedDocuments(client: "c", manifest: $v) { __typename } }',
                          "JSON!", [1, 2], "manifest"),
}


def literal(value: Any) -> str:
    """``value`` written as a GraphQL literal (enum values bare)."""
    if isinstance(value, list):
        return "[" + ", ".join(v if isinstance(v, str) and v.isupper() else literal(v) for v in value) + "]"
    return json.dumps(value)


@pytest.fixture(scope="module")
async def executor_app(settings: Settings) -> AsyncIterator[Starlette]:
    app = create_app(replace(settings, plans=False))
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture(params=["plans", "executor"])
async def any_client(request: pytest.FixtureRequest, app: Starlette,
                     executor_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    chosen = app if request.param == "plans" else executor_app
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=chosen), base_url="http://atrium.test") as c:
        yield c


@pytest.fixture(scope="module")
async def places(app: Starlette, admin_engine: AsyncEngine, settings: Settings) -> dict[str, str]:
    """A seeded tenant's owner token and the ids the cases use."""
    tenant = await make_tenant_world(admin_engine, settings, "values")
    token = tenant.token(Role.OWNER)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        crm = await seed_crm(client, token)
        note = await gql(client, "mutation($d: ID!) { createNote(input: {dealId: $d}) { id } }",
                         {"d": crm.deal["id"]}, token=token)
    return {"token": token, "note": note["data"]["createNote"]["id"], "stage": crm.stage["id"],
            "activity": crm.activity["id"]}


def fill(operation: str, places: dict[str, str]) -> str:
    for name, value in places.items():
        operation = operation.replace("{" + name + "}", value)
    return operation


@pytest.mark.parametrize("case", list(CASES))
async def test_a_bad_value_is_the_same_error_as_literal_and_as_variable(
        any_client: httpx.AsyncClient, places: dict[str, str], case: str) -> None:
    spec = CASES[case]
    operation = fill(spec.operation, places)
    as_variable = await gql(any_client, operation, {"v": spec.value}, token=places["token"])
    inline = operation.replace(f"($v: {spec.type})", "").replace("$v", literal(spec.value))
    as_literal = await gql(any_client, inline, token=places["token"])

    for body in (as_variable, as_literal):
        assert body["_status"] == 200, body
        assert codes(body) == ["BAD_USER_INPUT"], body
        assert body["errors"][0]["extensions"]["field"] == spec.field, body
        assert body.get("data") is None or all(v is None for v in body["data"].values()), body
    if spec.same_message:
        assert as_variable["errors"][0]["message"] == as_literal["errors"][0]["message"]
    assert as_variable["errors"][0]["message"].startswith(f"{spec.field}: ")
    assert as_literal["errors"][0]["message"].startswith(f"{spec.field}: ")


async def test_a_bad_literal_is_a_400_under_graphql_response_json(client: httpx.AsyncClient,
                                                                  places: dict[str, str]) -> None:
    response = await client.post("/graphql", json={"query": '{ deals(filter: {amountMin: "NaN"}) { totalCount } }'},
                                 headers={"authorization": f"Bearer {places['token']}",
                                          "accept": "application/graphql-response+json"})
    assert response.status_code == 400
    assert codes(response.json()) == ["BAD_USER_INPUT"]


async def test_a_bad_filter_leaves_the_request_whole(any_client: httpx.AsyncClient, places: dict[str, str],
                                                     app: Starlette, executor_app: Starlette) -> None:
    """A refused filter before another root field that reads: one coded error, no connection left out,
    and the next request is served."""
    body = await gql(any_client, '{ deals(filter: {amountMin: "1e309"}) { totalCount } me { name } }',
                     token=places["token"])
    assert codes(body) == ["BAD_USER_INPUT"]
    assert body["errors"][0]["extensions"]["field"] == "filter.amountMin"
    assert body["data"] is None  # deals is non-null
    assert (await gql(any_client, "{ me { name } }", token=places["token"]))["data"]["me"]["name"]
    for each in (app, executor_app):
        assert each.state.runtime.databases.pool_usage()[0] == 0


# ---- hostile JSON ---------------------------------------------------------------------------------

def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("depth", [65, 5_000, 100_000])
@pytest.mark.parametrize("where", ["body", "variables", "extensions"])
async def test_deeply_nested_json_is_a_400(client: httpx.AsyncClient, places: dict[str, str], where: str,
                                           depth: int) -> None:
    body = {"body": deep(depth),
            "variables": '{"query": "{ me { name } }", "variables": {"v": ' + deep(depth) + "}}",
            "extensions": '{"query": "{ me { name } }", "extensions": {"v": ' + deep(depth) + "}}"}[where]
    response = await client.post("/graphql", content=body, headers={
        "content-type": "application/json", "authorization": f"Bearer {places['token']}"})
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert codes(response.json()) == ["BAD_REQUEST"]
    assert "nest more than 64 deep" in response.json()["errors"][0]["message"]


@pytest.mark.parametrize("name", ["variables", "extensions"])
async def test_deeply_nested_url_parameters_are_a_400(client: httpx.AsyncClient, places: dict[str, str],
                                                      name: str) -> None:
    response = await client.get("/graphql", params={"query": "{ me { name } }", name: '{"v": ' + deep(5_000) + "}"},
                                headers={"authorization": f"Bearer {places['token']}"})
    assert response.status_code == 400
    assert codes(response.json()) == ["BAD_REQUEST"]


async def test_json_nested_up_to_the_limit_is_read(client: httpx.AsyncClient, places: dict[str, str]) -> None:
    variables = '{"v": ' + deep(62) + "}"  # 64 deep with the body and the variables
    response = await client.post("/graphql", content='{"query": "{ me { name } }", "variables": ' + variables + "}",
                                 headers={"content-type": "application/json",
                                          "authorization": f"Bearer {places['token']}"})
    assert response.status_code == 200, response.text
    assert response.json()["data"]["me"]["name"]


@pytest.mark.parametrize("text", [
    '{"query": "{ me { name } }", "variables": {"v": NaN}}',
    '{"query": "{ me { name } }", "variables": {"v": -Infinity}}',
    '{"query": "{ deals(filter: {search: $s}) { totalCount } }", "variables": {"s": "\\ud800"}}',
    '{"query": "{ me { name } }"',
    '{"query": "{ me { name } }"} trailing',
])
async def test_unreadable_json_is_a_400(client: httpx.AsyncClient, places: dict[str, str], text: str) -> None:
    response = await client.post("/graphql", content=text, headers={
        "content-type": "application/json", "authorization": f"Bearer {places['token']}"})
    assert response.status_code == 400, response.text
    assert codes(response.json()) == ["BAD_REQUEST"]


PUSH = 'mutation($m: JSON!) { pushPersistedDocuments(client: "web", manifest: $m) { __typename } }'


@pytest.mark.parametrize("body", [
    {"documentId": "a\u0000b"},
    {"documentId": "x" * 500},
    {"documentId": "sha256:" + "0" * 64},
    {"query": "{ me { name } }", "operationName": "a\u0000"},
    {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": "a\u0000"}}},
    {"extensions": {"persistedQuery": {"version": "1", "sha256Hash": 5}}},
    {"extensions": {"persistedQuery": [1]}},
    {"query": PUSH, "variables": {"m": {"doc-1": "query A { __typename } # \u0000"}}},
    {"query": PUSH, "variables": {"m": {"format": "apollo-persisted-query-manifest", "version": 1, "operations": [
        {"id": "doc-2", "body": "query A { __typename }", "name": "A\u0000", "type": "query"}]}}},
    {"query": '{ deals(filter: {search: "' + "[" * 3_000 + '"}) { totalCount } }'},
    {"query": "{ deals(filter: {search: " + "[" * 3_000 + "]" * 3_000 + "}) { totalCount } }"},
], ids=lambda body: json.dumps(body)[:40])
async def test_hostile_request_parameters_are_answered_with_a_code(client: httpx.AsyncClient, app: Starlette,
                                                                   places: dict[str, str], body: Any) -> None:
    response = await client.post("/graphql", json=body, headers={"authorization": f"Bearer {places['token']}"})
    assert response.status_code < 500, response.text
    assert codes(response.json()) and "INTERNAL" not in codes(response.json()), response.text
    assert app.state.runtime.databases.pool_usage()[0] == 0


@pytest.mark.parametrize("message", [
    '{"type": "connection_init", "payload": {"a": ' + deep(5_000) + "}}",
    '{"type": "connection_init", "payload": {"a": NaN}}',
])
async def test_a_hostile_websocket_message_closes_the_socket_as_malformed(clocked_server: InProcessAtrium,
                                                                          message: str) -> None:
    async with connect(clocked_server.ws_url, subprotocols=[Subprotocol("graphql-transport-ws")]) as ws:
        await ws.send(message)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 15)
    assert ws.close_code == 4400
