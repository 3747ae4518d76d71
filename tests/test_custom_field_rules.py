"""Field rules on custom fields (docs/field-rules.md, "Custom fields"): ``setFieldRule(field: "custom.<key>")``.

Every test runs against the real PostgreSQL, with plans on and off (``planned``/``executed`` apps);
each path is checked as the role the custom field is hidden from (null + FORBIDDEN, or FORBIDDEN
naming the field) and as a role it is not hidden from (the value), so removing the rule, or the
check of one path (read, filter, ordering, aggregate, audit, change event, write), fails a test.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from core.clock import ManualClock
from core.settings import Settings
from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_pipeline
from tests.field_rules import REMOVE, SET
from tests.live import live, serve_in_process

MakeTenant = Callable[..., Awaitable[TenantWorld]]
DEFINE = """mutation($i: CustomFieldDefinitionInput!) { createCustomFieldDefinition(input: $i) { id key } }"""
VALUES = ("customFields { key label type ... on SelectValue { option } ... on NumberValue { number } "
          "... on MoneyValue { amount currency } }")
TIER_VALUES = ["gold", "silver", "bronze"]
LIVE_PORT = 18530
"""The in-process server of the subscription test (this branch's port range)."""


@dataclass
class World:
    tenant: TenantWorld
    stage: str
    deal: str
    company: str
    definitions: dict[str, str]

    def token(self, role: Role) -> str:
        return self.tenant.token(role)


async def seeded(client: httpx.AsyncClient, make_tenant: MakeTenant, *, hide_tier_from: tuple[Role, ...] = ()
                 ) -> World:
    """A tenant with deal fields ``tier`` (select, default bronze), ``score`` (number) and ``budget``
    (money), one deal holding all three in a company; ``tier`` hidden from ``hide_tier_from``."""
    tenant = await make_tenant("cfrules")
    owner, admin = tenant.token(Role.OWNER), tenant.token(Role.ADMIN)
    definitions: dict[str, str] = {}
    specs: tuple[dict[str, Any], ...] = (
        {"key": "tier", "label": "Tier", "type": "SINGLE_SELECT", "options": TIER_VALUES,
         "default": {"option": "bronze"}},
        {"key": "score", "label": "Score", "type": "NUMBER"},
        {"key": "budget", "label": "Budget", "type": "MONEY"})
    for spec in specs:
        made = data_or_fail(await gql(client, DEFINE, {"i": {"recordType": "DEAL", **spec}}, token=admin))
        definitions[spec["key"]] = made["createCustomFieldDefinition"]["id"]
    stage = (await create_pipeline(client, owner))["stages"][0]["id"]
    company = data_or_fail(await gql(client, 'mutation { createCompany(input: {name: "Acme"}) { id } }',
                                     token=owner))["createCompany"]["id"]
    deal = data_or_fail(await gql(client, "mutation($i: DealInput!) { createDeal(input: $i) { id } }", {"i": {
        "title": "Big", "amount": "10.00", "currency": "USD", "stageId": stage, "companyId": company,
        "customFields": [{"key": "tier", "option": "gold"}, {"key": "score", "number": "7.5"},
                         {"key": "budget", "money": {"amount": "12", "currency": "EUR"}}]}}, token=owner))
    world = World(tenant, stage, deal["createDeal"]["id"], company, definitions)
    if hide_tier_from:
        await hide(client, world, "Deal", "custom.tier", *hide_tier_from)
    return world


async def hide(client: httpx.AsyncClient, world: World, record_type: str, field: str, *roles: Role) -> None:
    data_or_fail(await gql(client, SET, {"t": record_type, "f": field, "r": [r.name for r in roles]},
                           token=world.token(Role.ADMIN)))


def forbidden(body: dict[str, Any]) -> list[tuple[tuple[Any, ...], str | None]]:
    """``(path, extensions.field)`` of each FORBIDDEN error."""
    return [(tuple(e.get("path") or ()), e["extensions"].get("field")) for e in body.get("errors") or []
            if e["extensions"]["code"] == "FORBIDDEN"]


def by_key(values: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["key"]: v for v in values}


# ---- managing rules -------------------------------------------------------------------------------

async def test_a_rule_names_a_custom_field_by_its_key_checked_against_the_definitions(
        api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await seeded(api, make_tenant)
    admin = world.token(Role.ADMIN)
    made = data_or_fail(await gql(api, SET, {"t": "Deal", "f": "custom.tier", "r": ["MEMBER"]}, token=admin))
    assert made["setFieldRule"] == {"recordType": "Deal", "field": "custom.tier", "hiddenFrom": ["MEMBER"]}
    listed = data_or_fail(await gql(api, '{ fieldRules(recordType: "Deal") { field hiddenFrom } }',
                                    token=world.token(Role.VIEWER)))["fieldRules"]
    assert listed == [{"field": "custom.tier", "hiddenFrom": ["MEMBER"]}]
    other = await make_tenant("cfother")  # no custom fields: its "tier" is nobody's
    for variables, token in (({"t": "Deal", "f": "custom.nope", "r": ["VIEWER"]}, admin),
                             ({"t": "Deal", "f": "custom.Tier", "r": ["VIEWER"]}, admin),
                             ({"t": "Deal", "f": "custom.", "r": ["VIEWER"]}, admin),
                             ({"t": "Deal", "f": "tier", "r": ["VIEWER"]}, admin),  # a custom field needs its prefix
                             ({"t": "Company", "f": "custom.tier", "r": ["VIEWER"]}, admin),  # a deal's field
                             ({"t": "Product", "f": "custom.tier", "r": ["VIEWER"]}, admin),  # no custom fields
                             ({"t": "Deal", "f": "custom.tier", "r": ["VIEWER"]}, other.token(Role.ADMIN))):
        body = await gql(api, SET, variables, token=token)
        assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "field", variables
    body = await gql(api, SET, {"t": "Deal", "f": "custom.nope", "r": ["VIEWER"]}, token=admin)
    assert "'nope' is not a custom field of deals" in body["errors"][0]["message"]
    assert codes(await gql(api, SET, {"t": "Deal", "f": "custom.score", "r": ["VIEWER"]},
                           token=world.token(Role.MEMBER))) == ["FORBIDDEN"]

    # A custom field's rule outlives the field: deleted or purged, its values stay hidden (in the
    # records' audit history too) and a later field of the key is hidden alike, until it is lifted.
    data_or_fail(await gql(api, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }",
                           {"id": world.definitions["tier"]}, token=admin))
    body = await gql(api, SET, {"t": "Deal", "f": "custom.tier", "r": ["VIEWER"]}, token=admin)
    assert codes(body) == ["BAD_USER_INPUT"], body  # no new rule of a deleted field
    data_or_fail(await gql(api, "mutation($id: ID!) { purgeCustomFieldDefinition(id: $id) { recordsCleared } }",
                           {"id": world.definitions["tier"]}, token=admin))
    rules = data_or_fail(await gql(api, "{ fieldRules { field hiddenFrom } }", token=admin))["fieldRules"]
    assert rules == [{"field": "custom.tier", "hiddenFrom": ["MEMBER"]}]
    data_or_fail(await gql(api, DEFINE, {"i": {"recordType": "DEAL", "key": "tier", "label": "T", "type": "TEXT"}},
                           token=admin))
    tier = '{ deals { nodes { customField(key: "tier") { key } } } }'
    assert codes(await gql(api, tier, token=world.token(Role.MEMBER))) == ["FORBIDDEN"]
    assert data_or_fail(await gql(api, REMOVE, {"t": "Deal", "f": "custom.tier"}, token=admin)) == {
        "removeFieldRule": True}
    assert data_or_fail(await gql(api, tier, token=world.token(Role.MEMBER)))["deals"]["nodes"] == [
        {"customField": {"key": "tier"}}]
    # Lifting: a rule of any field of the key (no definition left needed), or false; never an unknown key.
    assert data_or_fail(await gql(api, REMOVE, {"t": "Deal", "f": "custom.tier"}, token=admin)) == {
        "removeFieldRule": False}
    body = await gql(api, REMOVE, {"t": "Deal", "f": "custom.nope"}, token=admin)
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "field"
    audit = data_or_fail(await gql(api, "{ auditEvents(first: 20) { nodes { action entityType diff } } }",
                                   token=world.token(Role.OWNER)))["auditEvents"]["nodes"]
    rule_changes = [(e["action"], (e["diff"]["before"] or e["diff"]["after"])["field"])
                    for e in audit if e["entityType"] == "FieldRule"]
    assert rule_changes == [("delete", "custom.tier"), ("create", "custom.tier")]


# ---- reads ----------------------------------------------------------------------------------------

READ = ("query($id: ID!, $c: ID!) { deals { nodes { title " + VALUES + " tier: customField(key: \"tier\") { key "
        "... on SelectValue { option } } score: customField(key: \"score\") { ... on NumberValue { number } } } } "
        "deal(id: $id) { customField(key: \"tier\") { label } } node(id: $id) { ... on Deal { " + VALUES + " } } "
        "company(id: $c) { deals { customFields { key ... on SelectValue { option } } } } }")


async def test_a_hidden_custom_field_reads_null_with_forbidden_at_its_path(api: httpx.AsyncClient,
                                                                           make_tenant: MakeTenant) -> None:
    world = await seeded(api, make_tenant, hide_tier_from=(Role.MEMBER,))
    variables = {"id": world.deal, "c": world.company}
    body = await gql(api, READ, variables, token=world.token(Role.MEMBER))
    data = body["data"]
    node = data["deals"]["nodes"][0]
    # The entry stays (the definition is public); its value is null, FORBIDDEN; the other fields are intact.
    assert node["customFields"] == [
        {"key": "tier", "label": "Tier", "type": "SINGLE_SELECT", "option": None},
        {"key": "score", "label": "Score", "type": "NUMBER", "number": "7.5"},
        {"key": "budget", "label": "Budget", "type": "MONEY", "amount": "12.00", "currency": "EUR"}]
    assert node["tier"] is None and node["score"] == {"number": "7.5"} and node["title"] == "Big"
    assert data["deal"] == {"customField": None}
    assert by_key(data["node"]["customFields"])["tier"]["option"] is None
    assert data["company"]["deals"][0]["customFields"][0] == {"key": "tier", "option": None}
    assert sorted(forbidden(body)) == sorted([
        (("deals", "nodes", 0, "customFields", 0, "option"), "custom.tier"),
        (("deals", "nodes", 0, "tier"), "custom.tier"),
        (("deal", "customField"), "custom.tier"),
        (("node", "customFields", 0, "option"), "custom.tier"),
        (("company", "deals", 0, "customFields", 0, "option"), "custom.tier")])
    assert len(body["errors"]) == 5
    assert body["errors"][0]["message"].endswith("Deal.custom.tier is hidden from your role (member)")
    for role in (Role.VIEWER, Role.ADMIN, Role.OWNER):  # hidden from members only
        seen = data_or_fail(await gql(api, READ, variables, token=world.token(role)))
        assert seen["deals"]["nodes"][0]["tier"] == {"key": "tier", "option": "gold"}, role
        assert seen["deal"] == {"customField": {"label": "Tier"}}, role
        assert by_key(seen["node"]["customFields"])["tier"]["option"] == "gold", role


async def test_the_default_of_a_hidden_custom_field_is_withheld_in_its_definition(api: httpx.AsyncClient,
                                                                                 make_tenant: MakeTenant) -> None:
    """A definition's default is a value of its field: the role the field is hidden from reads it as a
    record's value (null, FORBIDDEN naming ``custom.<key>``), the rest of the definition intact."""
    world = await seeded(api, make_tenant, hide_tier_from=(Role.MEMBER,))
    query = "{ customFieldDefinitions(type: DEAL) { key label default { key ... on SelectValue { option } } } }"
    body = await gql(api, query, token=world.token(Role.MEMBER))
    shown = by_key(body["data"]["customFieldDefinitions"])
    assert shown["tier"] == {"key": "tier", "label": "Tier", "default": {"key": "tier", "option": None}}
    assert shown["score"]["default"] is None
    tier = list(shown).index("tier")
    assert forbidden(body) == [(("customFieldDefinitions", tier, "default", "option"), "custom.tier")]
    for role in (Role.VIEWER, Role.ADMIN):
        seen = by_key(data_or_fail(await gql(api, query, token=world.token(role)))["customFieldDefinitions"])
        assert seen["tier"]["default"] == {"key": "tier", "option": "bronze"}, role


async def test_every_value_type_is_withheld_and_a_mutations_payload_too(api: httpx.AsyncClient,
                                                                        make_tenant: MakeTenant) -> None:
    world = await seeded(api, make_tenant)
    await hide(api, world, "Deal", "custom.budget", Role.VIEWER, Role.MEMBER)
    body = await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {title: "Renamed", customFields: '
                          '[{key: "score", number: "8"}]}) { title customFields { __typename key '
                          "... on MoneyValue { amount currency } ... on NumberValue { number } } } }",
                     {"id": world.deal}, token=world.token(Role.MEMBER))
    payload = body["data"]["updateDeal"]
    assert payload["title"] == "Renamed"
    assert by_key(payload["customFields"])["budget"] == {"__typename": "MoneyValue", "key": "budget",
                                                         "amount": None, "currency": None}
    assert by_key(payload["customFields"])["score"]["number"] == "8"
    assert sorted(forbidden(body)) == [(("updateDeal", "customFields", 2, "amount"), "custom.budget"),
                                       (("updateDeal", "customFields", 2, "currency"), "custom.budget")]
    # Every value type's own fields are withheld alike (USER values' `user` too, through `userId`).
    from core.errors import HiddenField
    from records.crm import DEAL
    from records.custom import Definition
    from schema.custom_fields import COMMON, VALUE_TYPES, withheld

    for kind, cls in VALUE_TYPES.items():
        definition = Definition(uuid.uuid4(), "Deal", "k", "K", kind, False, (), None, 0)
        value = withheld(definition, DEAL, "viewer")
        assert isinstance(value, cls) and (value.key, value.label, value.type) == ("k", "K", kind)
        own = [f.python_name for f in cls.__strawberry_definition__.fields  # type: ignore[attr-defined]
               if f.python_name not in COMMON and f.base_resolver is None]
        assert own, kind
        for name in own:
            with pytest.raises(HiddenField, match=r"custom\.k: Deal\.custom\.k is hidden from your role \(viewer\)"):
                getattr(value, name)


async def test_reading_only_the_definitions_of_hidden_fields_stays_planned(apps: dict[str, Starlette],
                                                                          make_tenant: MakeTenant) -> None:
    """A plan reading no hidden value still answers (and is cached); one reading a hidden value is
    the executor's (``Atrium-Cache: uncacheable``), and answers null + FORBIDDEN."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=apps["plans-on"]),
                                 base_url="http://custom-rules.test") as client:
        world = await seeded(client, make_tenant, hide_tier_from=(Role.MEMBER,))
        headers = {"authorization": f"Bearer {world.token(Role.MEMBER)}", "Atrium-Cache": "on"}

        async def ask(query: str) -> tuple[str, dict[str, Any]]:
            answer = await client.post("/graphql", json={"query": query}, headers=headers)
            return answer.headers["atrium-cache"], answer.json()

        cache, body = await ask("{ deals { nodes { customFields { key label type } } } }")
        assert cache == "miss" and not body.get("errors")
        assert len(body["data"]["deals"]["nodes"][0]["customFields"]) == 3
        cache, body = await ask('{ deals { nodes { customField(key: "score") { ... on NumberValue { number } } } } }')
        assert cache == "miss" and body["data"]["deals"]["nodes"] == [{"customField": {"number": "7.5"}}]
        cache, body = await ask("{ deals { nodes { customFields { key ... on SelectValue { option } } } } }")
        assert cache == "uncacheable" and codes(body) == ["FORBIDDEN"]
        # A value's own fields are read (another type's): the executor answers, with nothing to withhold.
        cache, body = await ask("{ deals { nodes { customFields { key ... on NumberValue { number } } } } }")
        assert cache == "uncacheable" and not body.get("errors")
        cache, body = await ask('{ deals { nodes { customField(key: "tier") { key } } } }')
        assert cache == "uncacheable" and codes(body) == ["FORBIDDEN"]
        cache, body = await ask("{ companies { nodes { customFields { key ... on TextValue { text } } } } }")
        assert cache == "miss" and not body.get("errors")  # another record type's custom fields: none hidden


# ---- filters, orderings, aggregates, exports ------------------------------------------------------

async def test_filtering_sorting_and_aggregating_by_a_hidden_custom_field_are_forbidden(
        api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await seeded(api, make_tenant, hide_tier_from=(Role.MEMBER,))
    member, owner = world.token(Role.MEMBER), world.token(Role.OWNER)
    cases = [
        ('{ deals(filter: {custom: [{key: "tier", text: "gold"}]}) { totalCount } }', "filter.custom.0"),
        ('{ deals(filter: {custom: [{key: "tier", op: IN, values: ["gold", "silver"]}]}) { totalCount } }',
         "filter.custom.0"),
        ('{ deals(filter: {custom: [{key: "score", op: GT, number: "1"}, {key: "tier", op: CONTAINS, text: "o"}]}) '
         "{ totalCount } }", "filter.custom.1"),
        ('{ deals(orderBy: {custom: "tier"}) { edges { cursor node { id } } } }', "orderBy.custom"),
        ('{ deals(orderBy: {custom: "tier", direction: DESC}) { totalCount } }', "orderBy.custom"),
        ('{ dealsAggregate(filter: {custom: [{key: "tier", text: "gold"}]}) { groups { count } } }',
         "filter.custom.0"),
    ]
    for query, field in cases:
        body = await gql(api, query, token=member)
        root = query.split("(")[0].strip("{ ")
        assert body["data"] is None and forbidden(body) == [((root,), field)], (query, body)
        assert data_or_fail(await gql(api, query, token=owner)), query
    # The same conditions on fields that are not hidden are answered, and the owner's match.
    shown = data_or_fail(await gql(api, '{ deals(filter: {custom: [{key: "score", number: "7.5"}]}, orderBy: '
                                        '{custom: "score"}) { totalCount } dealsAggregate(filter: {custom: [{key: '
                                        '"budget", op: GTE, number: "10"}]}) { groups { count } } }', token=member))
    assert shown == {"deals": {"totalCount": 1}, "dealsAggregate": {"groups": [{"count": 1}]}}
    assert data_or_fail(await gql(api, '{ deals(filter: {custom: [{key: "tier", text: "gold"}]}) { totalCount } }',
                                  token=owner))["deals"]["totalCount"] == 1


def test_readable_says_which_custom_fields_a_caller_may_read() -> None:
    """The one answer for exports (and every other reader) of which custom fields a caller may read."""
    from records.custom import CustomFieldType, Definition, hidden_key, hidden_keys, readable, rule_name

    definitions = [Definition(uuid.uuid4(), "Deal", key, key.title(), CustomFieldType.TEXT, False, (), None, i)
                   for i, key in enumerate(("tier", "amount", "score"))]
    hidden = frozenset({"amount", rule_name("tier")})  # the standard `amount` and the custom `tier`
    assert [d.key for d in readable(definitions, hidden)] == ["amount", "score"]  # a custom `amount` is its own
    assert [d.key for d in readable(definitions, frozenset())] == ["tier", "amount", "score"]
    assert hidden_keys(hidden) == {"tier"} and hidden_key("tier", hidden) and not hidden_key("amount", hidden)


# ---- writes ---------------------------------------------------------------------------------------

async def test_writing_a_hidden_custom_field_is_forbidden_and_writes_nothing(api: httpx.AsyncClient,
                                                                              make_tenant: MakeTenant) -> None:
    world = await seeded(api, make_tenant, hide_tier_from=(Role.MEMBER,))
    member, owner = world.token(Role.MEMBER), world.token(Role.OWNER)

    def deal(**custom: Any) -> str:
        fields = ", ".join(f'{{key: "{k}"{", option: " + repr(v).replace(chr(39), chr(34)) if v else ""}}}'
                           for k, v in custom.items())
        return f'{{title: "X", amount: "1", currency: "USD", stageId: $s, customFields: [{fields}]}}'

    attempts = [
        ("mutation($s: ID!) { createDeal(input: " + deal(tier="gold") + ") { id } }", {"s": world.stage},
         "customFields.tier"),
        ('mutation($id: ID!) { updateDeal(id: $id, input: {title: "Y", customFields: [{key: "score", number: "1"}, '
         '{key: "tier", option: "silver"}]}) { id } }', {"id": world.deal}, "customFields.tier"),
        ('mutation($id: ID!) { updateDeal(id: $id, input: {customFields: [{key: "tier"}]}) { id } }',
         {"id": world.deal}, "customFields.tier"),  # clearing is writing
        ("mutation($s: ID!) { createDeals(input: [" + deal() + ", " + deal(tier="silver") + "]) { id } }",
         {"s": world.stage}, "input.1.customFields.tier"),
        ('mutation($id: ID!) { updateDeals(input: [{id: $id, title: "Z"}, {id: $id, customFields: [{key: "tier", '
         'option: "silver"}]}]) { id } }', {"id": world.deal}, "input.1.customFields.tier"),
        ('mutation($s: ID!) { upsertDeals(input: [{externalId: "e1", title: "U", amount: "1", currency: "USD", '
         'stageId: $s, customFields: [{key: "tier", option: "silver"}]}]) { created } }', {"s": world.stage},
         "input.0.customFields.tier"),
    ]
    count = "{ deals { totalCount } }"
    before = data_or_fail(await gql(api, count, token=owner))
    for document, variables, field in attempts:
        body = await gql(api, document, variables, token=member)
        index = {"index": int(field.split(".")[1])} if field.startswith("input.") else {}
        assert body["data"] is None and [e["extensions"] for e in body["errors"]] == [
            {"code": "FORBIDDEN", "field": field, **index}], (document, body)
    assert data_or_fail(await gql(api, count, token=owner)) == before
    current = data_or_fail(await gql(api, "query($id: ID!) { deal(id: $id) { title version " + VALUES + " } }",
                                     {"id": world.deal}, token=owner))["deal"]
    assert current["title"] == "Big" and current["version"] == 1
    assert by_key(current["customFields"])["tier"]["option"] == "gold"
    assert by_key(current["customFields"])["score"]["number"] == "7.5"
    # What the member may write still works (a new deal gets the hidden field's default); the admin writes it.
    made = data_or_fail(await gql(api, "mutation($s: ID!) { createDeal(input: " + deal() + ") { id } }",
                                  {"s": world.stage}, token=member))["createDeal"]
    default = data_or_fail(await gql(api, 'query($id: ID!) { deal(id: $id) { customField(key: "tier") { '
                                          "... on SelectValue { option } } } }", {"id": made["id"]}, token=owner))
    assert default["deal"]["customField"] == {"option": "bronze"}
    data_or_fail(await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {customFields: [{key: "score", '
                                'number: "2"}]}) { id } }', {"id": world.deal}, token=member))
    data_or_fail(await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {customFields: [{key: "tier", '
                                'option: "silver"}]}) { id } }', {"id": world.deal}, token=world.token(Role.ADMIN)))


async def test_a_version_conflict_does_not_tell_the_hidden_custom_value(api: httpx.AsyncClient,
                                                                        make_tenant: MakeTenant) -> None:
    world = await seeded(api, make_tenant, hide_tier_from=(Role.MEMBER,))
    stale = 'mutation($id: ID!) { updateDeal(id: $id, input: {title: "T"}, expectedVersion: 7) { id } }'
    member = (await gql(api, stale, {"id": world.deal}, token=world.token(Role.MEMBER)))["errors"][0]
    admin = (await gql(api, stale, {"id": world.deal}, token=world.token(Role.ADMIN)))["errors"][0]
    assert member["extensions"]["code"] == admin["extensions"]["code"] == "VERSION_CONFLICT"
    assert set(member["extensions"]["current"]["customFields"]) == {"score", "budget"}
    assert member["extensions"]["current"]["title"] == "Big"
    assert admin["extensions"]["current"]["customFields"]["tier"] == "gold"


# ---- audit ----------------------------------------------------------------------------------------

async def test_audit_reads_redact_hidden_custom_values(api: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await seeded(api, make_tenant)
    owner = world.token(Role.OWNER)
    data_or_fail(await gql(api, 'mutation($id: ID!) { updateDeal(id: $id, input: {customFields: [{key: "tier", '
                                'option: "silver"}, {key: "score", number: "9"}]}) { id } }',
                           {"id": world.deal}, token=owner))
    await hide(api, world, "Deal", "custom.tier", Role.ADMIN)
    query = "query($id: ID!) { auditEvents(entityId: $id) { nodes { action diff } } }"
    admin = data_or_fail(await gql(api, query, {"id": world.deal}, token=world.token(Role.ADMIN)))
    update = next(e["diff"] for e in admin["auditEvents"]["nodes"] if e["action"] == "update")
    create = next(e["diff"] for e in admin["auditEvents"]["nodes"] if e["action"] == "create")
    assert update["before"]["custom_fields"]["tier"] is None and update["after"]["custom_fields"]["tier"] is None
    assert update["after"]["custom_fields"]["score"] == "9" and update["hidden"] == ["custom.tier"]
    assert create["after"]["custom_fields"]["tier"] is None and create["hidden"] == ["custom.tier"]
    assert create["after"]["title"] == "Big"
    full = data_or_fail(await gql(api, query, {"id": world.deal}, token=owner))
    owner_update = next(e["diff"] for e in full["auditEvents"]["nodes"] if e["action"] == "update")
    assert owner_update["before"]["custom_fields"]["tier"] == "gold"
    assert owner_update["after"]["custom_fields"]["tier"] == "silver" and "hidden" not in owner_update
    # A purge's audit rows (before/after of the values it removed) are redacted alike.
    await hide(api, world, "Deal", "custom.score", Role.ADMIN)
    admin_token = world.token(Role.ADMIN)
    for mutation in ("deleteCustomFieldDefinition", "purgeCustomFieldDefinition"):
        data_or_fail(await gql(api, f"mutation($id: ID!) {{ {mutation}(id: $id) {{ __typename }} }}",
                               {"id": world.definitions["tier"]}, token=admin_token))
    purged = data_or_fail(await gql(api, query, {"id": world.deal}, token=admin_token))["auditEvents"]["nodes"][0]
    assert purged["action"] == "update" and purged["diff"]["before"] == {"custom_fields": {"tier": None}}
    assert purged["diff"]["hidden"] == ["custom.tier"]


# ---- change events --------------------------------------------------------------------------------

async def test_change_events_do_not_tell_a_hidden_custom_field(settings: Settings, redis_url: str,
                                                               make_tenant: MakeTenant) -> None:
    """Through Redis (the event's custom keys travel in its wire form): a change of a hidden custom
    field alone names no changed field for the role it is hidden from, and the record in the event
    reads it null with FORBIDDEN; a role it is not hidden from is told and sees the value."""
    subscription = """subscription($id: ID!) { recordChanged(id: $id) { __typename
        ... on RecordChange { changedFields record { ... on Deal { title customFields { key
        ... on SelectValue { option } ... on NumberValue { number } } } } } ... on Resync { reason } } }"""
    live_settings = replace(settings, redis_url=redis_url, redis_prefix="atrium-cfrules:")
    async with serve_in_process(live_settings, ManualClock(), port=LIVE_PORT) as server, \
            server.client() as client:
        world = await seeded(client, make_tenant, hide_tier_from=(Role.MEMBER,))
        owner = world.token(Role.OWNER)
        async with live(server.ws_url, world.token(Role.MEMBER)) as member, \
                live(server.ws_url, world.token(Role.VIEWER)) as viewer:
            hidden_op = await member.live(subscription, {"id": world.deal})
            seen_op = await viewer.live(subscription, {"id": world.deal})
            update = "mutation($id: ID!, $i: DealPatch!) { updateDeal(id: $id, input: $i) { id } }"
            data_or_fail(await gql(client, update, {"id": world.deal, "i": {"customFields": [
                {"key": "tier", "option": "silver"}]}}, token=owner))
            message = await member.message(hidden_op)
            change = message["payload"]["data"]["recordChanged"]
            assert change["changedFields"] == []
            assert change["record"]["customFields"][0] == {"key": "tier", "option": None}
            assert [(e["path"], e["extensions"]["code"]) for e in message["payload"]["errors"]] == [
                (["recordChanged", "record", "customFields", 0, "option"], "FORBIDDEN")]
            other = (await viewer.data(seen_op))["recordChanged"]
            assert other["changedFields"] == ["customFields"]
            assert other["record"]["customFields"][0] == {"key": "tier", "option": "silver"}
            # A change of a field the member sees is named, the hidden one still withheld.
            data_or_fail(await gql(client, update, {"id": world.deal, "i": {"title": "New", "customFields": [
                {"key": "tier", "option": "gold"}, {"key": "score", "number": "1"}]}}, token=owner))
            change = (await member.message(hidden_op))["payload"]["data"]["recordChanged"]
            assert sorted(change["changedFields"]) == ["customFields", "title"]
            assert change["record"]["customFields"][1] == {"key": "score", "number": "1"}
            assert (await viewer.data(seen_op))["recordChanged"]["record"]["customFields"][0]["option"] == "gold"
