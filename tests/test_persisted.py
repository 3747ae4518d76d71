"""Trusted documents: both manifest formats pushed (API and CLI), validated, called by id and by hash.

A persisted-only key runs its client's documents and nothing else; removing a document is its own
operation; documents belong to their tenant.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.settings import Settings
from models.tables import PERSISTED_DOCUMENTS, Role
from tests.cli import run_cli
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.partners import REMOVE, bearer, new_key, push, sha256

MakeTenant = Callable[..., Awaitable[TenantWorld]]
GRAPHQL_RESPONSE = "application/graphql-response+json"

# WIRE.md: Apollo's manifest example, verbatim.
APOLLO_MANIFEST = {"format": "apollo-persisted-query-manifest", "version": 1,
                   "operations": [{"id": "dc67510fb4289672bea757e862d6b00e83db5d3cbbcfb15260601b6f29bb2b8f",
                                   "body": "query UniversalQuery { __typename }", "name": "UniversalQuery",
                                   "type": "query"}]}
UNIVERSAL = APOLLO_MANIFEST["operations"][0]["id"]  # type: ignore[index]
TENANT_QUERY = "query TenantSlug { tenant { slug } }"
ADD_COMPANY = "mutation AddCompany($name: String!) { createCompany(input: {name: $name}) { name } }"
CODEGEN_MAP = {sha256(TENANT_QUERY): TENANT_QUERY, sha256(ADD_COMPANY): ADD_COMPANY}


async def call(client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str],
               *, accept: str | None = None) -> httpx.Response:
    return await client.post("/graphql", json=body, headers={**headers, **({"accept": accept} if accept else {})})


def by_hash(hash_: str, **extra: Any) -> dict[str, Any]:
    return {"extensions": {"persistedQuery": {"version": 1, "sha256Hash": hash_}}, **extra}


async def test_apollo_manifest_pushed_and_called_by_document_id_and_hash(client: httpx.AsyncClient,
                                                                         make_tenant: MakeTenant) -> None:
    world = await make_tenant("apollomf")
    pushed = data_or_fail(await push(client, world, "ios", APOLLO_MANIFEST))["pushPersistedDocuments"]
    assert pushed["added"] == [{"id": pushed["added"][0]["id"], "documentId": UNIVERSAL, "sha256": UNIVERSAL,
                                "name": "UniversalQuery", "operationType": "query"}]
    auth = bearer(world.token(Role.VIEWER))
    expected = {"data": {"__typename": "Query"}}
    for body in ({"documentId": f"sha256:{UNIVERSAL}"}, {"documentId": UNIVERSAL}, by_hash(UNIVERSAL)):
        answer = await call(client, body, auth)
        assert (answer.status_code, answer.json()) == (200, expected), (body, answer.text)
    by_get = await client.get(f"/graphql?documentId=sha256:{UNIVERSAL}", headers=auth)
    assert (by_get.status_code, by_get.json()) == (200, expected)
    # Pushing the same manifest again adds nothing.
    again = data_or_fail(await push(client, world, "ios", APOLLO_MANIFEST))["pushPersistedDocuments"]
    assert again["added"] == [] and again["unchangedCount"] == 1


async def test_codegen_map_pushed_and_called_by_document_id_and_hash(client: httpx.AsyncClient,
                                                                     make_tenant: MakeTenant) -> None:
    world = await make_tenant("codegen")
    pushed = data_or_fail(await push(client, world, "web", CODEGEN_MAP))["pushPersistedDocuments"]
    assert {(d["name"], d["operationType"]) for d in pushed["added"]} == {("TenantSlug", "query"),
                                                                          ("AddCompany", "mutation")}
    auth = bearer(world.token(Role.MEMBER))
    tenant_hash, add_hash = sha256(TENANT_QUERY), sha256(ADD_COMPANY)
    expected = {"data": {"tenant": {"slug": world.slug}}}
    # The Guild's convention ({"documentId": "<hash>"}), the prefixed id, and the APQ form.
    for body in ({"documentId": tenant_hash}, {"documentId": f"sha256:{tenant_hash}"}, by_hash(tenant_hash)):
        assert (await call(client, body, auth)).json() == expected, body
    url = "/graphql?" + urllib.parse.urlencode({"documentId": tenant_hash, "operationName": "TenantSlug"})
    assert (await client.get(url, headers=auth)).json() == expected
    created = await call(client, {"documentId": add_hash, "variables": {"name": "By id"}}, auth)
    assert created.json() == {"data": {"createCompany": {"name": "By id"}}}
    # A persisted mutation is still a mutation: not by GET.
    refused = await client.get(f"/graphql?documentId={add_hash}&variables=" + urllib.parse.quote('{"name":"x"}'),
                               headers=auth)
    assert refused.status_code == 405 and refused.headers["allow"] == "POST"


async def test_invalid_document_is_refused_at_push_with_line_and_column(client: httpx.AsyncClient,
                                                                        make_tenant: MakeTenant,
                                                                        admin_engine: AsyncEngine) -> None:
    world = await make_tenant("invalidmf")
    manifest = {
        "ok": TENANT_QUERY,
        "bad-field": "query Broken {\n  deals {\n    nope\n  }\n}",
        "bad-syntax": "query Oops { tenant { slug }",
        "two-ops": "query A { __typename }\nquery B { __typename }",
    }
    body = await push(client, world, "web", manifest)
    assert codes(body) == ["BAD_USER_INPUT"], body
    extensions = body["errors"][0]["extensions"]
    assert extensions["field"] == "manifest"
    problems = {p["documentId"]: p for p in extensions["problems"]}
    assert set(problems) == {"bad-field", "bad-syntax", "two-ops"}
    assert (problems["bad-field"]["line"], problems["bad-field"]["column"]) == (3, 5)
    assert "nope" in problems["bad-field"]["message"]
    assert problems["bad-syntax"]["line"] == 1 and problems["bad-syntax"]["column"] == 29
    assert (problems["two-ops"]["line"], problems["two-ops"]["column"]) == (2, 1)
    assert "line 3, column 5" in body["errors"][0]["message"]
    async with admin_engine.connect() as conn:
        stored = (await conn.execute(select(PERSISTED_DOCUMENTS.c.id).where(
            PERSISTED_DOCUMENTS.c.tenant_id == world.id))).all()
    assert stored == [], "a refused push stored documents"
    # Declared name and type must match the document.
    wrong = {"format": "apollo-persisted-query-manifest", "version": 1,
             "operations": [{"id": "x", "body": TENANT_QUERY, "name": "Other", "type": "mutation"}]}
    messages = [p["message"] for p in (await push(client, world, "web", wrong))["errors"][0]["extensions"]["problems"]]
    assert len(messages) == 2 and "Other" in messages[0] and "mutation" in messages[1]


async def test_pushing_never_removes_and_ids_never_change_meaning(client: httpx.AsyncClient,
                                                                  make_tenant: MakeTenant) -> None:
    world = await make_tenant("explicit")
    auth = bearer(world.token(Role.VIEWER))
    assert not (await push(client, world, "web", {"one": TENANT_QUERY, "two": "query Two { __typename }"})
                ).get("errors")
    assert not (await push(client, world, "web", {"three": "query Three { __typename }"})).get("errors")
    for document_id in ("one", "two", "three"):
        assert not (await call(client, {"documentId": document_id}, auth)).json().get("errors"), document_id
    changed = await push(client, world, "web", {"one": "query Changed { __typename }"})
    assert codes(changed) == ["BAD_USER_INPUT"] and "remove it first" in changed["errors"][0]["message"]

    removed = data_or_fail(await gql(client, REMOVE, {"client": "web", "ids": ["one", "nope"]},
                                     token=world.token(Role.ADMIN)))["removePersistedDocuments"]
    assert removed == {"removedIds": ["one"], "missingIds": ["nope"]}
    gone = await call(client, {"documentId": "one"}, auth)
    assert (gone.status_code, codes(gone.json())) == (200, ["PERSISTED_QUERY_NOT_FOUND"])
    gone = await call(client, {"documentId": "one"}, auth, accept=GRAPHQL_RESPONSE)
    assert (gone.status_code, codes(gone.json())) == (404, ["PERSISTED_QUERY_NOT_FOUND"])
    assert "data" not in gone.json()
    assert not (await call(client, {"documentId": "two"}, auth)).json().get("errors")


async def test_persisted_only_key_runs_its_clients_documents_and_nothing_else(client: httpx.AsyncClient,
                                                                              make_tenant: MakeTenant) -> None:
    world = await make_tenant("ponly")
    assert not (await push(client, world, "partner", CODEGEN_MAP)).get("errors")
    assert not (await push(client, world, "other", {"other-op": "query OtherOp { __typename }"})).get("errors")
    key = bearer((await new_key(client, world, role="MEMBER", persistedOnly=True, client="partner"))["secret"])

    assert (await call(client, {"documentId": sha256(TENANT_QUERY)}, key)).json() == {
        "data": {"tenant": {"slug": world.slug}}}
    assert not (await call(client, by_hash(sha256(TENANT_QUERY)), key)).json().get("errors")

    free_form = await call(client, {"query": TENANT_QUERY}, key)
    assert (free_form.status_code, codes(free_form.json())) == (200, ["PERSISTED_QUERY_REQUIRED"])
    free_form = await call(client, {"query": TENANT_QUERY}, key, accept=GRAPHQL_RESPONSE)
    assert (free_form.status_code, codes(free_form.json())) == (403, ["PERSISTED_QUERY_REQUIRED"])
    registering = await call(client, by_hash(sha256("{ __typename }"), query="{ __typename }"), key)
    assert codes(registering.json()) == ["PERSISTED_QUERY_REQUIRED"]
    # Another client's document, and a document a member put in the APQ cache, are unknown to it.
    assert codes((await call(client, {"documentId": "other-op"}, key)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    apq = "query CachedByMember { __typename }"
    member = bearer(world.token(Role.MEMBER))
    assert not (await call(client, by_hash(sha256(apq), query=apq), member)).json().get("errors")
    assert not (await call(client, by_hash(sha256(apq)), member)).json().get("errors")
    assert codes((await call(client, by_hash(sha256(apq)), key)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    assert codes((await call(client, {"documentId": f"sha256:{sha256(apq)}"}, key)).json()) == [
        "PERSISTED_QUERY_NOT_FOUND"]
    # A key bound to a client may push for that client only.
    admin_key = bearer((await new_key(client, world, role="ADMIN", client="partner"))["secret"])
    assert not (await gql(client, "mutation($m: JSON!) { pushPersistedDocuments(client: \"partner\", manifest: $m) "
                                  "{ unchangedCount } }", {"m": CODEGEN_MAP}, headers=admin_key)).get("errors")
    body = await gql(client, "mutation($m: JSON!) { pushPersistedDocuments(client: \"other\", manifest: $m) "
                             "{ unchangedCount } }", {"m": CODEGEN_MAP}, headers=admin_key)
    assert codes(body) == ["FORBIDDEN"]


async def test_documents_belong_to_their_tenant(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    a, b = await make_tenant("mfa"), await make_tenant("mfb")
    assert not (await push(client, a, "web", {"a-only": TENANT_QUERY})).get("errors")
    answer = await call(client, {"documentId": "a-only"}, bearer(b.token(Role.OWNER)))
    assert codes(answer.json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    listed = data_or_fail(await gql(client, "{ persistedDocuments { documentId } }", token=b.token(Role.ADMIN)))
    assert listed == {"persistedDocuments": []}
    # Anonymous callers have no tenant, hence no trusted documents.
    assert codes((await call(client, {"documentId": "a-only"}, {})).json()) == ["PERSISTED_QUERY_NOT_FOUND"]



async def test_remembered_lookups_follow_every_change_to_the_documents(client: httpx.AsyncClient,
                                                                       make_tenant: MakeTenant) -> None:
    """Lookups are remembered per process until the tenant's documents change: a document pushed
    after a miss is found at once, a removed one is gone at once, another tenant's never appears."""
    world, other = await make_tenant("mflook"), await make_tenant("mflookb")
    auth = bearer(world.token(Role.VIEWER))
    for _ in range(2):
        assert codes((await call(client, {"documentId": "later"}, auth)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    assert not (await push(client, other, "web", {"later": TENANT_QUERY})).get("errors")
    assert codes((await call(client, {"documentId": "later"}, auth)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    assert not (await push(client, world, "web", {"later": TENANT_QUERY})).get("errors")
    for _ in range(2):
        found = await call(client, {"documentId": "later"}, auth)
        assert found.json() == {"data": {"tenant": {"slug": world.slug}}}, found.text
    data_or_fail(await gql(client, REMOVE, {"client": "web", "ids": ["later"]}, token=world.token(Role.ADMIN)))
    assert codes((await call(client, {"documentId": "later"}, auth)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]

# ---- the CLI --------------------------------------------------------------------------------------

async def test_cli_pushes_both_formats_lists_and_removes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str], settings: Settings,
                                                         client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("mfcli")
    apollo, codegen, broken = tmp_path / "apollo.json", tmp_path / "persisted-documents.json", tmp_path / "bad.json"
    apollo.write_text(json.dumps(APOLLO_MANIFEST))
    codegen.write_text(json.dumps(CODEGEN_MAP))
    broken.write_text(json.dumps({"fine": "query Fine { __typename }", "broken": "query Broken {\n  nope\n}"}))

    assert await run_cli(monkeypatch, settings, "persisted", "push", str(apollo), "--client", "ios",
                         "--tenant", world.slug) == 0
    assert "1 documents added" in capsys.readouterr().out
    assert await run_cli(monkeypatch, settings, "persisted", "push", str(codegen), "--client", "web",
                         "--tenant", world.slug) == 0
    assert await run_cli(monkeypatch, settings, "persisted", "push", str(broken), "--client", "web",
                         "--tenant", world.slug) == 2
    err = capsys.readouterr().err
    assert "nothing stored" in err and "broken (line 2, column 3)" in err

    assert await run_cli(monkeypatch, settings, "persisted", "list", "--tenant", world.slug) == 0
    listing = capsys.readouterr().out
    assert "UniversalQuery" in listing and "TenantSlug" in listing and "Fine" not in listing

    auth = bearer(world.token(Role.VIEWER))
    assert not (await call(client, {"documentId": UNIVERSAL}, auth)).json().get("errors")
    assert await run_cli(monkeypatch, settings, "persisted", "remove", UNIVERSAL, "--client", "ios",
                         "--tenant", world.slug) == 0
    assert codes((await call(client, {"documentId": UNIVERSAL}, auth)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    assert not (await call(client, {"documentId": sha256(TENANT_QUERY)}, auth)).json().get("errors")


async def test_http_event_streams_are_not_served(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """Atrium serves no HTTP stream protocol (SSE, multipart): an event stream is never an acceptable
    answer, so no credential, persisted-only ones included, can reach a path around the HTTP rules."""
    world = await make_tenant("stream")
    key = bearer((await new_key(client, world, role="MEMBER", persistedOnly=True))["secret"])
    for credential in (key, bearer(world.token(Role.MEMBER))):
        for accept in ("text/event-stream", "multipart/mixed;subscriptionSpec=1.0"):
            answer = await call(client, {"query": TENANT_QUERY}, {**credential, "accept": accept})
            assert answer.status_code == 406 and "data" not in answer.text
