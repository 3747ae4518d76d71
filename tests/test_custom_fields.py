"""Custom fields per tenant (records.custom, docs/custom-fields.md): definitions, typed values on every
write path, typed reads, filters, orderings with cursors, audit, events, purge and isolation.

Everything goes through the API against the real PostgreSQL; the module runs as the suite does, with
plans on (and with ``ATRIUM_PLANS=off`` through the executor alone); tests/test_plans.py compares both
paths on custom fields.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_pipeline

DEFINE = """mutation($i: CustomFieldDefinitionInput!) { createCustomFieldDefinition(input: $i) {
  id key label type required options position version default { __typename ... on SelectValue { option }
  ... on NumberValue { number } ... on TextValue { text } } } }"""
VALUES = """customFields { __typename key label type ... on TextValue { text } ... on NumberValue { number }
  ... on MoneyValue { amount currency } ... on DateValue { date } ... on BooleanValue { boolean }
  ... on SelectValue { option } ... on MultiSelectValue { options } ... on UserValue { userId user { name } } }"""
CREATE_DEAL = "mutation($i: DealInput!) { createDeal(input: $i) { id version " + VALUES + " } }"
UPDATE_DEAL = ("mutation($id: ID!, $i: DealPatch!) { updateDeal(id: $id, input: $i) { id version "
               + VALUES + " } }")

FIELDS: list[dict[str, Any]] = [
    {"key": "tier", "label": "Tier", "type": "SINGLE_SELECT", "options": ["gold", "silver", "bronze"],
     "default": {"option": "bronze"}},
    {"key": "score", "label": "Score", "type": "NUMBER"},
    {"key": "budget", "label": "Budget", "type": "MONEY"},
    {"key": "renewal", "label": "Renewal", "type": "DATE"},
    {"key": "signed", "label": "Signed", "type": "BOOLEAN"},
    {"key": "tags", "label": "Tags", "type": "MULTI_SELECT", "options": ["a", "b", "c"]},
    {"key": "champion", "label": "Champion", "type": "USER"},
    {"key": "site", "label": "Site", "type": "URL"},
    {"key": "mail", "label": "Mail", "type": "EMAIL"},
    {"key": "notes", "label": "Notes", "type": "LONG_TEXT"},
    {"key": "region", "label": "Region", "type": "TEXT", "required": True},
]


async def api(client: httpx.AsyncClient, token: str, document: str, **variables: Any) -> dict[str, Any]:
    return data_or_fail(await gql(client, document, variables, token=token))


async def define(client: httpx.AsyncClient, token: str, record_type: str = "DEAL",
                 fields: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out = []
    for spec in fields if fields is not None else FIELDS:
        out.append((await api(client, token, DEFINE, i={"recordType": record_type, **spec}))[
            "createCustomFieldDefinition"])
    return out


async def stage_of(client: httpx.AsyncClient, token: str) -> str:
    pipeline = await create_pipeline(client, token)
    stage: str = pipeline["stages"][0]["id"]
    return stage


def deal_input(stage: str, *custom: dict[str, Any], title: str = "Deal") -> dict[str, Any]:
    return {"title": title, "amount": "10.00", "currency": "USD", "stageId": stage,
            "customFields": [{"key": "region", "text": "EMEA"}, *custom]}


def by_key(values: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["key"]: v for v in values}


async def test_definitions_values_and_typed_reads(client: httpx.AsyncClient, make_tenant: Any) -> None:
    world: TenantWorld = await make_tenant("cf")
    token = world.token(Role.ADMIN)
    defined = await define(client, token)
    assert [d["position"] for d in defined] == list(range(len(FIELDS)))
    assert defined[0]["default"] == {"__typename": "SelectValue", "option": "bronze"}
    listed = await api(client, token, "{ customFieldDefinitions(type: DEAL) { key label type required } }")
    assert [d["key"] for d in listed["customFieldDefinitions"]] == [f["key"] for f in FIELDS]
    stage = await stage_of(client, token)
    from core.ids import to_global_id
    champion = to_global_id("User", world.users[Role.MEMBER])
    made = (await api(client, token, CREATE_DEAL, i=deal_input(
        stage, {"key": "score", "number": "12.50"}, {"key": "budget", "money": {"amount": "99.9", "currency": "eur"}},
        {"key": "renewal", "date": "2027-03-01"}, {"key": "signed", "boolean": True},
        {"key": "tags", "options": ["c", "a"]}, {"key": "champion", "userId": champion},
        {"key": "site", "text": "https://example.com/x"}, {"key": "mail", "text": "a@b.example"},
        {"key": "notes", "text": "line\nbreak ✓"})))["createDeal"]
    values = by_key(made["customFields"])
    assert [v["key"] for v in made["customFields"]] == [f["key"] for f in FIELDS]
    assert values["tier"] == {"__typename": "SelectValue", "key": "tier", "label": "Tier", "type": "SINGLE_SELECT",
                              "option": "bronze"}  # the default
    assert values["score"]["number"] == "12.50"
    assert values["budget"]["amount"] == "99.90" and values["budget"]["currency"] == "EUR"
    assert values["renewal"]["date"] == "2027-03-01"
    assert values["signed"]["boolean"] is True
    assert values["tags"]["options"] == ["c", "a"]
    assert values["champion"]["userId"] == champion and values["champion"]["user"]["name"].startswith("Member")
    assert values["notes"]["text"] == "line\nbreak ✓"
    # one field by key; the label is renamed and no query breaks
    await api(client, token, """mutation($id: ID!) { updateCustomFieldDefinition(id: $id, input: {label: "Level"})
        { label version } }""", id=defined[0]["id"])
    one = await api(client, token, """query($id: ID!) { deal(id: $id) { customField(key: "tier") { label
        ... on SelectValue { option } } missing: customField(key: "nope") { key } } }""", id=made["id"])
    assert one["deal"] == {"customField": {"label": "Level", "option": "bronze"}, "missing": None}
    # a patch changes the fields it names and clears those given no member
    patched = (await api(client, token, UPDATE_DEAL, id=made["id"], i={"customFields": [
        {"key": "score", "number": "-3"}, {"key": "tags"}]}))["updateDeal"]
    after = by_key(patched["customFields"])
    assert after["score"]["number"] == "-3" and after["tags"]["options"] is None
    assert after["budget"]["amount"] == "99.90" and patched["version"] == made["version"] + 1


BAD: list[tuple[dict[str, Any], str, str]] = [
    ({"key": "score", "text": "x"}, "customFields.score", "give `number` only"),
    ({"key": "score", "number": "1.1234567"}, "customFields.score", "decimal places"),
    ({"key": "tier", "option": "platinum"}, "customFields.tier", "one of the options"),
    ({"key": "tags", "options": ["a", "a"]}, "customFields.tags", "repeat"),
    ({"key": "tags", "options": ["z"]}, "customFields.tags", "not one of the options"),
    ({"key": "site", "text": "ftp://x"}, "customFields.site", "URL"),
    ({"key": "mail", "text": "nope"}, "customFields.mail", "email"),
    ({"key": "budget", "money": {"amount": "1", "currency": "XXQ"}}, "customFields.budget.currency", "ISO 4217"),
    ({"key": "budget", "money": {"amount": "-1", "currency": "USD"}}, "customFields.budget.amount", "negative"),
    ({"key": "unknown", "text": "x"}, "customFields.unknown", "not a custom field"),
    ({"key": "Bad Key", "text": "x"}, "customFields.1.key", "lower-case"),
    ({"key": "site", "text": "x", "number": "1"}, "customFields.site", "give `text` only"),
    ({"key": "notes", "text": "nul\x00"}, "customFields.notes", "NUL"),
]


async def test_bad_values_are_refused_naming_the_custom_field(client: httpx.AsyncClient, make_tenant: Any) -> None:
    world = await make_tenant("cfbad")
    token = world.token(Role.ADMIN)
    await define(client, token)
    stage = await stage_of(client, token)
    for value, field, words in BAD:
        body = await gql(client, CREATE_DEAL, {"i": deal_input(stage, value)}, token=token)
        assert codes(body) == ["BAD_USER_INPUT"], (value, body)
        error = body["errors"][0]
        assert error["extensions"]["field"] == field and words in error["message"], (value, error)
    # required: missing on create, cleared on update
    body = await gql(client, CREATE_DEAL, {"i": {**deal_input(stage), "customFields": []}}, token=token)
    assert body["errors"][0]["extensions"]["field"] == "customFields.region", body
    made = (await api(client, token, CREATE_DEAL, i=deal_input(stage)))["createDeal"]
    body = await gql(client, UPDATE_DEAL, {"id": made["id"], "i": {"customFields": [{"key": "region"}]}}, token=token)
    assert body["errors"][0]["extensions"]["field"] == "customFields.region", body
    # a USER value must be a member of the workspace
    from core.ids import to_global_id
    other = await make_tenant("cfother")
    body = await gql(client, CREATE_DEAL, {"i": deal_input(stage, {"key": "champion", "userId": to_global_id(
        "User", other.users[Role.OWNER])})}, token=token)
    assert codes(body) == ["NOT_FOUND"] and body["errors"][0]["extensions"]["field"] == "customFields.champion"
    # batch: the error names the index; nothing is written
    body = await gql(client, "mutation($i: [DealInput!]!) { createDeals(input: $i) { id } }", {"i": [
        deal_input(stage, title="batch ok"), deal_input(stage, {"key": "score", "text": "x"}, title="batch bad")]},
        token=token)
    assert body["errors"][0]["extensions"]["field"] == "input.1.customFields.score", body
    count = await api(client, token, '{ deals(filter: {search: "batch"}) { totalCount } }')
    assert count["deals"]["totalCount"] == 0
    # definitions: bad keys, options where none belong, defaults that do not fit, duplicates
    for spec, field in (({"key": "1x", "label": "x", "type": "TEXT"}, "key"),
                        ({"key": "x", "label": "x", "type": "TEXT", "options": ["a"]}, "options"),
                        ({"key": "x", "label": "x", "type": "SINGLE_SELECT"}, "options"),
                        ({"key": "x", "label": "x", "type": "NUMBER", "default": {"text": "a"}}, "default"),
                        ({"key": "x", "label": " ", "type": "TEXT"}, "label"),
                        ({"key": "tier", "label": "again", "type": "TEXT"}, "key")):
        body = await gql(client, DEFINE, {"i": {"recordType": "DEAL", **spec}}, token=token)
        assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == field, (spec, body)
    # members may not define fields
    body = await gql(client, DEFINE, {"i": {"recordType": "DEAL", "key": "m", "label": "m", "type": "TEXT"}},
                     token=world.token(Role.MEMBER))
    assert codes(body) == ["FORBIDDEN"]


async def test_batch_and_upsert_validate_and_apply_defaults(client: httpx.AsyncClient, make_tenant: Any) -> None:
    world = await make_tenant("cfbatch")
    token = world.token(Role.ADMIN)
    await define(client, token, "COMPANY", [
        {"key": "size", "label": "Size", "type": "NUMBER", "default": {"number": "1"}},
        {"key": "kind", "label": "Kind", "type": "TEXT"}])
    made = (await api(client, token, """mutation($i: [CompanyInput!]!) { createCompanies(input: $i) { id
        customFields { key ... on NumberValue { number } ... on TextValue { text } } } }""", i=[
        {"name": "A"}, {"name": "B", "customFields": [{"key": "size", "number": "7"}, {"key": "kind", "text": "x"}]}]))
    first, second = made["createCompanies"]
    assert [v.get("number") for v in first["customFields"]] == ["1", None]
    assert by_key(second["customFields"])["kind"]["text"] == "x"
    upserted = (await api(client, token, """mutation($i: [CompanyUpsert!]!) { upsertCompanies(input: $i) { created
        record { customFields { key ... on NumberValue { number } ... on TextValue { text } } } } }""", i=[
        {"externalId": "e1", "name": "E1", "customFields": [{"key": "kind", "text": "new"}]}]))["upsertCompanies"]
    assert upserted[0]["created"] and by_key(upserted[0]["record"]["customFields"])["size"]["number"] == "1"
    again = (await api(client, token, """mutation($i: [CompanyUpsert!]!) { upsertCompanies(input: $i) { created
        record { customFields { key ... on NumberValue { number } ... on TextValue { text } } } } }""", i=[
        {"externalId": "e1", "name": "E1", "customFields": [{"key": "size", "number": "3"}]}]))["upsertCompanies"]
    values = by_key(again[0]["record"]["customFields"])
    assert not again[0]["created"] and values["size"]["number"] == "3" and values["kind"]["text"] == "new"
    body = await gql(client, """mutation($i: [CompanyUpdate!]!) { updateCompanies(input: $i) { id } }""", {"i": [
        {"id": first["id"], "customFields": [{"key": "size", "text": "x"}]}]}, token=token)
    assert body["errors"][0]["extensions"]["field"] == "input.0.customFields.size", body


async def test_audit_events_and_webhook_payloads_carry_custom_fields(client: httpx.AsyncClient, make_tenant: Any,
                                                                     admin_engine: AsyncEngine) -> None:
    world = await make_tenant("cfaudit")
    token = world.token(Role.OWNER)
    await define(client, token, "CONTACT", [{"key": "vip", "label": "VIP", "type": "BOOLEAN"}])
    made = (await api(client, token, """mutation { createContact(input: {firstName: "A", lastName: "B",
        customFields: [{key: "vip", boolean: false}]}) { id } }"""))["createContact"]
    await api(client, token, """mutation($id: ID!) { updateContact(id: $id, input: {customFields: [{key: "vip",
        boolean: true}]}) { id } }""", id=made["id"])
    events = await api(client, token, "{ auditEvents(first: 10) { nodes { action entityType diff } } }")
    update = next(e for e in events["auditEvents"]["nodes"] if e["entityType"] == "Contact" and e["action"] == "update")
    assert update["diff"] == {"before": {"custom_fields": {"vip": False}}, "after": {"custom_fields": {"vip": True}}}
    definition = next(e for e in events["auditEvents"]["nodes"] if e["entityType"] == "CustomFieldDefinition")
    assert definition["action"] == "create" and definition["diff"]["after"]["key"] == "vip"
    async with admin_engine.connect() as conn:
        bodies = [row[0] for row in await conn.execute(text(
            "SELECT body FROM webhook_deliveries WHERE tenant_id = :t"), {"t": world.id})]
    assert bodies == []  # no endpoint registered: the payload shape is covered in tests/test_webhooks.py


@pytest.mark.parametrize("role", [Role.VIEWER])
async def test_definitions_are_read_only_to_viewers(client: httpx.AsyncClient, make_tenant: Any, role: Role) -> None:
    world = await make_tenant("cfview")
    listed = await api(client, world.token(role), "{ customFieldDefinitions(type: COMPANY) { key } }")
    assert listed == {"customFieldDefinitions": []}
