"""Custom fields per tenant (records.custom, docs/custom-fields.md): definitions, typed values on every
write path, typed reads, filters, orderings with cursors, audit, events, purge and isolation.

Everything goes through the API against the real PostgreSQL; the module runs as the suite does, with
plans on (and with ``ATRIUM_PLANS=off`` through the executor alone); tests/test_plans.py compares both
paths on custom fields.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_pipeline, uuid_of

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
    # the options may change, as long as the default stays one of them; versions are checked
    body = await gql(client, """mutation($id: ID!) { updateCustomFieldDefinition(id: $id, input: {options: ["gold"]})
        { id } }""", {"id": defined[0]["id"]}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "default", body
    body = await gql(client, """mutation($id: ID!) { updateCustomFieldDefinition(id: $id, input: {required: true},
        expectedVersion: 1) { id } }""", {"id": defined[0]["id"]}, token=token)
    assert codes(body) == ["VERSION_CONFLICT"], body
    changed = await api(client, token, """mutation($id: ID!) { updateCustomFieldDefinition(id: $id, input: {
        options: ["gold", "bronze", "platinum"], position: 20}, expectedVersion: 2) { options position version } }""",
                        id=defined[0]["id"])
    assert changed["updateCustomFieldDefinition"] == {"options": ["gold", "bronze", "platinum"], "position": 20,
                                                      "version": 3}
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
    vip, _ = await define(client, token, "CONTACT", [{"key": "vip", "label": "VIP", "type": "BOOLEAN"},
                                                    {"key": "rank", "label": "Rank", "type": "NUMBER"}])
    await api(client, token, """mutation { createWebhookEndpoint(input: {url: "http://127.0.0.1:9/cf",
        eventTypes: ["contact.updated"]}) { endpoint { id } } }""")
    made = (await api(client, token, """mutation { createContact(input: {firstName: "A", lastName: "B",
        customFields: [{key: "vip", boolean: false}, {key: "rank", number: "1.50"}]}) { id } }"""))["createContact"]
    await api(client, token, """mutation($id: ID!) { updateContact(id: $id, input: {customFields: [{key: "vip",
        boolean: true}]}) { id } }""", id=made["id"])
    events = await api(client, token, "{ auditEvents(first: 10) { nodes { action entityType diff } } }")
    update = next(e for e in events["auditEvents"]["nodes"] if e["entityType"] == "Contact" and e["action"] == "update")
    assert update["diff"] == {"before": {"custom_fields": {"vip": False, "rank": "1.50"}},
                              "after": {"custom_fields": {"vip": True, "rank": "1.50"}}}
    definition = next(e for e in events["auditEvents"]["nodes"] if e["entityType"] == "CustomFieldDefinition")
    assert definition["action"] == "create" and definition["diff"]["after"]["key"] == "rank"
    # the webhook payload carries the values (numbers as exact text) and which fields changed; once a
    # definition is deleted, its values are left out
    await api(client, token, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }", id=vip["id"])
    await api(client, token, """mutation($id: ID!) { updateContact(id: $id, input: {customFields: [{key: "rank",
        number: "2"}]}) { id } }""", id=made["id"])
    async with admin_engine.connect() as conn:
        bodies = [json.loads(row[0]) for row in await conn.execute(text(
            "SELECT body FROM webhook_deliveries WHERE tenant_id = :t ORDER BY seq"), {"t": world.id})]
    assert [b["data"]["record"]["customFields"] for b in bodies] == [{"vip": True, "rank": "1.50"}, {"rank": "2"}]
    assert all("customFields" in b["data"]["changedFields"] for b in bodies), bodies


@pytest.mark.parametrize("role", [Role.VIEWER])
async def test_definitions_are_read_only_to_viewers(client: httpx.AsyncClient, make_tenant: Any, role: Role) -> None:
    world = await make_tenant("cfview")
    listed = await api(client, world.token(role), "{ customFieldDefinitions(type: COMPANY) { key } }")
    assert listed == {"customFieldDefinitions": []}


# ---- filters and orderings -------------------------------------------------------------------------

SORTABLE: list[dict[str, Any]] = [
    {"key": "tier", "label": "Tier", "type": "SINGLE_SELECT", "options": ["gold", "silver"]},
    {"key": "score", "label": "Score", "type": "NUMBER"},
    {"key": "budget", "label": "Budget", "type": "MONEY"},
    {"key": "renewal", "label": "Renewal", "type": "DATE"},
    {"key": "signed", "label": "Signed", "type": "BOOLEAN"},
    {"key": "tags", "label": "Tags", "type": "MULTI_SELECT", "options": ["a", "b"]},
    {"key": "notes", "label": "Notes", "type": "TEXT"},
    {"key": "champion", "label": "Champion", "type": "USER"},
]
ROWS = [  # title, score, tier, budget (amount, currency), renewal, signed, tags, notes
    ("d0", "10", "gold", ("5", "USD"), "2027-01-01", True, ["a"], "Alpha beta"),
    ("d1", "2", "silver", ("50", "EUR"), "2027-06-30", False, ["a", "b"], "gamma"),
    ("d2", "10.0", "gold", ("500", "EUR"), None, None, [], None),
    ("d3", None, None, None, "2026-12-31", True, ["b"], "ALPHA"),
    ("d4", "-1.5", "silver", ("5.5", "USD"), "2027-01-02", None, None, "100% _sure_"),
]


async def seed_sortable(client: httpx.AsyncClient, token: str, world: TenantWorld) -> dict[str, str]:
    from core.ids import to_global_id

    await define(client, token, "DEAL", SORTABLE)
    stage = await stage_of(client, token)
    ids = {}
    for n, (title, score, tier, budget, renewal, signed, tags, notes) in enumerate(ROWS):
        values: list[dict[str, Any]] = []
        if score is not None:
            values.append({"key": "score", "number": score})
        if tier is not None:
            values.append({"key": "tier", "option": tier})
        if budget is not None:
            values.append({"key": "budget", "money": {"amount": budget[0], "currency": budget[1]}})
        if renewal is not None:
            values.append({"key": "renewal", "date": renewal})
        if signed is not None:
            values.append({"key": "signed", "boolean": signed})
        if tags is not None:
            values.append({"key": "tags", "options": tags})
        if notes is not None:
            values.append({"key": "notes", "text": notes})
        if n < 2:
            champion = world.users[[Role.ADMIN, Role.MEMBER][n]]
            values.append({"key": "champion", "userId": to_global_id("User", champion)})
        made = (await api(client, token, CREATE_DEAL, i={"title": title, "amount": "1", "currency": "USD",
                                                          "stageId": stage, "customFields": values}))["createDeal"]
        ids[title] = made["id"]
    return ids


FILTERS: list[tuple[str, list[str]]] = [
    ('{key: "tier", text: "gold"}', ["d0", "d2"]),
    ('{key: "score", number: "10"}', ["d0", "d2"]),  # 10 and 10.0 are one number
    ('{key: "score", op: GT, number: "2"}', ["d0", "d2"]),
    ('{key: "score", op: GTE, number: "2"}', ["d0", "d1", "d2"]),
    ('{key: "score", op: LT, number: "2"}', ["d4"]),
    ('{key: "score", op: LTE, number: "-1.5"}', ["d4"]),
    ('{key: "budget", number: "5"}', ["d0"]),
    ('{key: "budget", op: GTE, number: "50", currency: "EUR"}', ["d1", "d2"]),
    ('{key: "budget", op: LT, number: "10", currency: "EUR"}', []),
    ('{key: "budget", op: LT, number: "10"}', ["d0", "d4"]),
    ('{key: "renewal", op: GT, date: "2027-01-01"}', ["d1", "d4"]),
    ('{key: "renewal", date: "2026-12-31"}', ["d3"]),
    ('{key: "signed", boolean: true}', ["d0", "d3"]),
    ('{key: "signed", boolean: false}', ["d1"]),
    ('{key: "tags", op: CONTAINS, text: "b"}', ["d1", "d3"]),
    ('{key: "notes", op: CONTAINS, text: "alpha"}', ["d0", "d3"]),
    ('{key: "notes", op: CONTAINS, text: "%"}', ["d4"]),  # wildcards are literal
    ('{key: "notes", op: CONTAINS, text: "_s"}', ["d4"]),
    ('{key: "tier", op: IN, values: ["silver", "nope"]}', ["d1", "d4"]),
    ('{key: "notes", text: "gamma"}', ["d1"]),
    ('{key: "score", text: "10"}', []),  # a text value never matches a NUMBER field
    ('{key: "nothing", text: "x"}', []),  # nor any value a key without definition
    ('{key: "score", op: GT, number: "0"}, {key: "tier", text: "gold"}, {key: "signed", boolean: true}', ["d0"]),
]


async def test_filters_on_custom_fields(client: httpx.AsyncClient, make_tenant: Any) -> None:
    from core.ids import to_global_id

    world = await make_tenant("cffilter")
    token = world.token(Role.ADMIN)
    await seed_sortable(client, token, world)
    for condition, expected in FILTERS:
        found = await api(client, token, f"{{ deals(filter: {{custom: [{condition}]}}, orderBy: {{field: TITLE, "
                                         "direction: ASC}) { totalCount nodes { title } } }")
        titles = [n["title"] for n in found["deals"]["nodes"]]
        assert titles == expected and found["deals"]["totalCount"] == len(expected), (condition, titles)
    # aggregates filter the same way
    grouped = await api(client, token, '{ dealsAggregate(filter: {custom: [{key: "tier", text: "gold"}]}) '
                                       "{ groups { count } } }")
    assert grouped["dealsAggregate"]["groups"] == [{"count": 2}]
    member = to_global_id("User", world.users[Role.MEMBER])
    found = await api(client, token, "query($u: ID!, $l: [ID!]) { a: deals(filter: {custom: [{key: \"champion\", "
                                     "userId: $u}]}) { nodes { title } } b: deals(filter: {custom: [{key: "
                                     "\"champion\", op: IN, userIds: $l}]}) { nodes { title } } }",
                      u=member, l=[member, to_global_id("User", world.users[Role.ADMIN])])
    assert [n["title"] for n in found["a"]["nodes"]] == ["d1"] and len(found["b"]["nodes"]) == 2
    for condition, field in (('{key: "score", op: GT}', "filter.custom.0"),
                             ('{key: "score", op: GT, text: "1"}', "filter.custom.0"),
                             ('{key: "score", op: IN, number: "1"}', "filter.custom.0"),
                             ('{key: "Bad"}', "filter.custom.0.key"),
                             ('{key: "score", number: "1e20"}', "filter.custom.0.number"),
                             ('{key: "tier", text: "gold", currency: "USD"}', "filter.custom.0.currency"),
                             ('{key: "tier", op: IN, values: []}', "filter.custom.0.values")):
        body = await gql(client, f"{{ deals(filter: {{custom: [{condition}]}}) {{ totalCount }} }}", token=token)
        assert codes(body) == ["BAD_USER_INPUT"], (condition, body)
        assert body["errors"][0]["extensions"]["field"] == field, (condition, body)


ORDERS: list[tuple[str, str, list[str]]] = [
    ("score", "ASC", ["d3", "d4", "d1", "d0", "d2"]),  # no value first; 10 and 10.0 tie (then by id)
    ("score", "DESC", ["d2", "d0", "d1", "d4", "d3"]),
    ("renewal", "ASC", ["d2", "d3", "d0", "d4", "d1"]),
    ("signed", "ASC", ["d2", "d4", "d1", "d0", "d3"]),
    ("tier", "DESC", ["d1", "d4", "d0", "d2", "d3"]),
]


async def test_orderings_by_custom_fields_page_with_cursors(client: httpx.AsyncClient, make_tenant: Any) -> None:
    world = await make_tenant("cfsort")
    token = world.token(Role.ADMIN)
    ids = await seed_sortable(client, token, world)
    by_id = {v: k for k, v in ids.items()}
    for key, direction, expected in ORDERS:
        whole = await api(client, token, f'{{ deals(orderBy: {{custom: "{key}", direction: {direction}}}) '
                                         "{ nodes { id } } }")
        order = [by_id[n["id"]] for n in whole["deals"]["nodes"]]
        if key in ("score",) and direction == "ASC":
            assert order[:3] == expected[:3] and set(order[3:]) == {"d0", "d2"}, order
        elif key == "score":
            assert set(order[:2]) == {"d0", "d2"} and order[2:] == expected[2:], order
        elif key in ("signed", "tier", "renewal"):
            assert _tied_equal(order, expected, key), (key, direction, order)
        # pages of two, forward and backward, give the same order as the whole list
        for forward in (True, False):
            seen: list[str] = []
            cursor = None
            while True:
                size, bound = ("first", "after") if forward else ("last", "before")
                query = (f'query($c: String) {{ deals({size}: 2, {bound}: $c, orderBy: {{custom: "{key}", '
                         f"direction: {direction}}}) {{ edges {{ cursor node {{ id }} }} pageInfo {{ hasNextPage "
                         "hasPreviousPage startCursor endCursor } } }")
                page = (await api(client, token, query, c=cursor))["deals"]
                names = [by_id[e["node"]["id"]] for e in page["edges"]]
                seen = seen + names if forward else names + seen
                if not page["pageInfo"]["hasNextPage" if forward else "hasPreviousPage"]:
                    break
                cursor = page["pageInfo"]["endCursor" if forward else "startCursor"]
            assert seen == order, (key, direction, forward, seen, order)
    # a cursor of one ordering is refused by another; keys are checked
    first = (await api(client, token, '{ deals(first: 1, orderBy: {custom: "score"}) { pageInfo { endCursor } } }'))
    body = await gql(client, 'query($c: String) { deals(after: $c, orderBy: {custom: "tier"}) { totalCount } }',
                     {"c": first["deals"]["pageInfo"]["endCursor"]}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "after"
    import base64

    for value in ("NaN", "1e999999", '"\\u0000"', "{"):
        raw = json.dumps(["custom:score", value, str(uuid_of(ids["d0"]))], separators=(",", ":"))
        forged = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
        body = await gql(client, 'query($c: String) { deals(after: $c, orderBy: {custom: "score"}) { totalCount } }',
                         {"c": forged}, token=token)
        assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "after", (value, body)
    body = await gql(client, '{ deals(orderBy: {custom: "Bad Key"}) { totalCount } }', token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "orderBy.custom"


def _tied_equal(order: list[str], expected: list[str], key: str) -> bool:
    """``order`` equals ``expected`` up to the order among records with equal values of ``key``."""
    values = {row[0]: row for row in ROWS}
    column = {"renewal": 4, "signed": 5, "tier": 2}[key]
    return [values[t][column] for t in order] == [values[t][column] for t in expected]


# ---- deleting and purging definitions; isolation -----------------------------------------------------

async def test_deleting_a_definition_hides_its_values_and_a_purge_removes_them(
        client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("cfpurge")
    token = world.token(Role.ADMIN)
    tier, = await define(client, token, "DEAL", [{"key": "tier", "label": "Tier", "type": "TEXT"}])
    stage = await stage_of(client, token)
    made = (await api(client, token, CREATE_DEAL, i={"title": "T", "amount": "1", "currency": "USD", "stageId": stage,
                                                      "customFields": [{"key": "tier", "text": "gold"}]}))["createDeal"]
    trashed = (await api(client, token, CREATE_DEAL, i={
        "title": "Trashed", "amount": "1", "currency": "USD", "stageId": stage,
        "customFields": [{"key": "tier", "text": "x"}]}))["createDeal"]
    await api(client, token, "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }", id=trashed["id"])
    await api(client, token, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }", id=tier["id"])
    read = await api(client, token, """query($id: ID!) { deal(id: $id) { customFields { key } customField(key: "tier")
        { key } } deals(filter: {custom: [{key: "tier", text: "gold"}]}) { totalCount } }""", id=made["id"])
    assert read == {"deal": {"customFields": [], "customField": None}, "deals": {"totalCount": 0}}
    body = await gql(client, CREATE_DEAL, {"i": {"title": "U", "amount": "1", "currency": "USD", "stageId": stage,
                                                 "customFields": [{"key": "tier", "text": "gold"}]}}, token=token)
    assert body["errors"][0]["extensions"]["field"] == "customFields.tier"
    body = await gql(client, DEFINE, {"i": {"recordType": "DEAL", "key": "tier", "label": "T", "type": "TEXT"}},
                     token=token)
    assert "purge it first" in body["errors"][0]["message"]
    deleted = await api(client, token, "{ customFieldDefinitions(type: DEAL, deleted: true) { id key } }")
    assert [d["key"] for d in deleted["customFieldDefinitions"]] == ["tier"]
    body = await gql(client, "mutation($id: ID!) { purgeCustomFieldDefinition(id: $id) { recordsCleared } }",
                     {"id": tier["id"]}, token=world.token(Role.MEMBER))
    assert codes(body) == ["FORBIDDEN"]
    purged = await api(client, token, "mutation($id: ID!) { purgeCustomFieldDefinition(id: $id) { purgedId "
                                      "recordsCleared } }", id=tier["id"])
    assert purged["purgeCustomFieldDefinition"] == {"purgedId": tier["id"], "recordsCleared": 2}
    async with admin_engine.connect() as conn:
        left = (await conn.execute(text("SELECT count(*) FROM deals WHERE tenant_id = :t AND custom_fields ? 'tier'"),
                                   {"t": world.id})).scalar_one()
    assert left == 0
    audit = await api(client, token, "{ auditEvents(first: 20) { nodes { action entityType diff } } }")
    actions = [(e["entityType"], e["action"]) for e in audit["auditEvents"]["nodes"]]
    assert ("CustomFieldDefinition", "purge") in actions and ("CustomFieldDefinition", "delete") in actions
    cleared = [e["diff"] for e in audit["auditEvents"]["nodes"]
               if e["entityType"] == "Deal" and e["action"] == "update"]
    assert {"before": {"custom_fields": {"tier": "gold"}}, "after": {"custom_fields": {}}} in cleared
    await define(client, token, "DEAL", [{"key": "tier", "label": "Tier again", "type": "NUMBER"}])  # the key is free


async def test_tenants_see_only_their_own_custom_fields(either_client: httpx.AsyncClient, make_tenant: Any) -> None:
    client = either_client
    a, b = await make_tenant("cfa"), await make_tenant("cfb")
    ta, tb = a.token(Role.ADMIN), b.token(Role.ADMIN)
    secret, = await define(client, ta, "DEAL", [{"key": "secret", "label": "Secret", "type": "TEXT"}])
    stage_a, stage_b = await stage_of(client, ta), await stage_of(client, tb)
    await api(client, ta, CREATE_DEAL, i={"title": "A", "amount": "1", "currency": "USD", "stageId": stage_a,
                                          "customFields": [{"key": "secret", "text": "s3cret"}]})
    assert (await api(client, tb, "{ customFieldDefinitions(type: DEAL) { key } }")) == {"customFieldDefinitions": []}
    body = await gql(client, CREATE_DEAL, {"i": {"title": "B", "amount": "1", "currency": "USD", "stageId": stage_b,
                                                 "customFields": [{"key": "secret", "text": "x"}]}}, token=tb)
    assert body["errors"][0]["extensions"]["field"] == "customFields.secret"  # not B's field
    await define(client, tb, "DEAL", [{"key": "secret", "label": "B's own", "type": "NUMBER"}])  # the same key, B's
    made = (await api(client, tb, CREATE_DEAL, i={"title": "B", "amount": "1", "currency": "USD", "stageId": stage_b,
                                                  "customFields": [{"key": "secret", "number": "1"}]}))["createDeal"]
    assert [v["label"] for v in made["customFields"]] == ["B's own"]
    found = await api(client, tb, """{ deals(filter: {custom: [{key: "secret", op: CONTAINS, text: "s3"}]}) {
        totalCount } all: deals(orderBy: {custom: "secret"}) { nodes { title } } }""")
    assert found == {"deals": {"totalCount": 0}, "all": {"nodes": [{"title": "B"}]}}
    for mutation in ("updateCustomFieldDefinition(id: $id, input: {label: \"x\"}) { id }",
                     "deleteCustomFieldDefinition(id: $id) { id }"):
        body = await gql(client, f"mutation($id: ID!) {{ {mutation} }}", {"id": secret["id"]}, token=tb)
        assert codes(body) == ["NOT_FOUND"], body


async def test_cost_counts_custom_fields(client: httpx.AsyncClient, make_tenant: Any) -> None:
    from graphql import parse

    from atrium.schema import schema
    from records.custom import MAX_DEFINITIONS
    from schema.cost import operation_cost

    document = parse("{ deals(first: 10) { nodes { customFields { key ... on UserValue { user { name } } } "
                     "customField(key: \"x\") { key } } } }")
    operation = document.definitions[0]
    # 1 (connection) + 10 x (1 + MAX_DEFINITIONS x (1 + 1 user) + 1 customField)
    assert operation_cost(schema._schema, document, operation) == 1 + 10 * (1 + MAX_DEFINITIONS * 2 + 1)  # type: ignore[arg-type]
    world = await make_tenant("cfmax")
    token = world.token(Role.ADMIN)
    await define(client, token, "COMPANY", [{"key": f"f{i}", "label": "F", "type": "TEXT"}
                                            for i in range(MAX_DEFINITIONS)])
    body = await gql(client, DEFINE, {"i": {"recordType": "COMPANY", "key": "one_more", "label": "F", "type": "TEXT"}},
                     token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "recordType"


async def test_an_equality_filter_is_answered_by_the_gin_index_under_rls(
        client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine) -> None:
    """The statement the resolvers run for `filter: {custom: [{key, text}]}`, as the application role with
    RLS on, is answered through the column's GIN index (``jsonb_contains`` is leakproof: migration
    0017), not by reading the tenant's rows (bench/custom_fields.py shows it at 100,000 deals)."""
    from sqlalchemy import func, select
    from sqlalchemy.dialects import postgresql

    from models.visibility import View, viewing
    from records.crm import DEAL

    world = await make_tenant("cfgin")
    token = world.token(Role.ADMIN)
    await define(client, token, "DEAL", [{"key": "tier", "label": "Tier", "type": "TEXT"}])
    stage = await stage_of(client, token)
    async with admin_engine.begin() as conn:  # 2,000 deals, 1 in 100 of each tier
        await conn.execute(text("""
            INSERT INTO deals (tenant_id, id, title, amount, currency, pipeline_id, stage_id, custom_fields)
            SELECT s.tenant_id, gen_random_uuid(), 'gin ' || n, 1, 'USD', s.pipeline_id, s.id,
                   jsonb_build_object('tier', 't' || (n % 100))
            FROM stages s, generate_series(1, 2000) AS n WHERE s.tenant_id = :t AND s.id = :s"""),
            {"t": world.id, "s": uuid_of(stage)})
        await conn.execute(text("ANALYZE deals"))
    listing = DEAL.listing_query(world.id, {"custom": [{"key": "tier", "text": "t7"}]})
    compiled = select(func.count()).select_from(listing.subquery()).compile(
        dialect=postgresql.asyncpg.dialect())  # type: ignore[no-untyped-call]
    with viewing(View(user_id=world.users[Role.ADMIN], sees_all=True)):  # as a request binds its view
        args = [compiled.params[p] for p in compiled.positiontup or ()]
    async with admin_engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        async with raw.transaction():
            await raw.execute("SET LOCAL ROLE atrium_app")
            await raw.execute("SELECT set_config('app.tenant_id', $1, true)", str(world.id))
            plan = "\n".join(r[0] for r in await raw.fetch("EXPLAIN " + compiled.string, *args))
    assert "Bitmap Index Scan on deals_custom_fields_idx" in plan, plan
