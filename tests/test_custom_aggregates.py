"""Aggregates over custom fields (docs/aggregates.md, "Custom fields"): ``groupByCustom`` (single select,
boolean and user fields) and ``measureCustom`` (number; money per currency), checked against the same
groups computed in Python over the seeded records; the list filters (custom ones too) narrow them;
record visibility and field rules apply; bad, deleted and another workspace's keys are BAD_USER_INPUT
naming the key; another workspace's records are never counted (with the app's filters alone and with
RLS alone); still one statement; cost counts the custom fields of every group.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.ops.admin import add_user
from auth.tokens import issue_token
from core.settings import Settings
from models.db import Databases
from models.tables import Role
from records.crm import DEAL
from records.custom import CustomGroup, CustomMeasure
from resolvers.aggregates import statement
from tests.conftest import TenantWorld, codes, data_or_fail, gql, make_tenant_world
from tests.crm import create_company, create_pipeline, gid
from tests.field_rules import SET
from tests.wire import wired_app

MakeTenant = Callable[..., Awaitable[TenantWorld]]

DEFINE = """mutation($i: CustomFieldDefinitionInput!) { createCustomFieldDefinition(input: $i) { id key } }"""
DEAL_FIELDS: list[dict[str, Any]] = [
    {"key": "tier", "label": "Tier", "type": "SINGLE_SELECT", "options": ["gold", "silver", "bronze"]},
    {"key": "signed", "label": "Signed", "type": "BOOLEAN"},
    {"key": "champion", "label": "Champion", "type": "USER"},
    {"key": "score", "label": "Score", "type": "NUMBER"},
    {"key": "budget", "label": "Budget", "type": "MONEY"},
    {"key": "notes", "label": "Notes", "type": "TEXT"},
    {"key": "tags", "label": "Tags", "type": "MULTI_SELECT", "options": ["a", "b"]},
    {"key": "gone", "label": "Gone", "type": "SINGLE_SELECT", "options": ["x", "y"]},
]
"""Tenant A's custom fields of deals (``gone`` is deleted once the deals hold values of it)."""
OTHER_FIELDS: list[dict[str, Any]] = [
    {"key": "tier", "label": "Level", "type": "SINGLE_SELECT", "options": ["gold", "platinum"]},
    {"key": "score", "label": "Points", "type": "NUMBER"},
    {"key": "elsewhere", "label": "Elsewhere", "type": "SINGLE_SELECT", "options": ["here"]},
]
"""Tenant B's: the same keys as A's (other options), and one A does not have."""
GROUPED = ("tier", "signed", "champion")
MEASURED = ("score", "budget")
VALUE = ("{ __typename key label type ... on SelectValue { option } ... on BooleanValue { boolean } "
         "... on UserValue { userId } }")
MEASURE = ("{ key label type number { count sum avg min max } money { currency count sum avg min max } }")


def aggregate_query(root: str = "dealsAggregate", grouped: Iterable[str] = GROUPED,
                    measured: Iterable[str] = MEASURED, extra: str = "count currency stage { id } "
                    "amount { currency count sum avg min max }") -> str:
    """A query of ``root`` with ``$by``, ``$custom``, ``$measures`` and ``$filter`` selecting the values
    of ``grouped`` and the measures of ``measured`` under their keys as aliases."""
    filter_type = {"dealsAggregate": "DealFilter", "companiesAggregate": "CompanyFilter",
                   "contactsAggregate": "ContactFilter"}[root]
    group_by = {"dealsAggregate": "DealGroupBy", "companiesAggregate": "CompanyGroupBy",
                "contactsAggregate": "ContactGroupBy"}[root]
    values = " ".join(f'{k}: customField(key: "{k}") {VALUE}' for k in grouped)
    measures = " ".join(f'm_{k}: customMeasure(key: "{k}") {MEASURE}' for k in measured)
    return (f"query($filter: {filter_type}, $by: [{group_by}!]! = [], $custom: [String!]! = [], "
            f"$measures: [String!]! = [], $first: Int! = 100) {{ {root}(filter: $filter, groupBy: $by, "
            f"groupByCustom: $custom, measureCustom: $measures, first: $first) {{ groupCount groups {{ {extra} "
            f"{values} {measures} }} }} }}")


@dataclass(frozen=True)
class Seeded:
    world: TenantWorld
    deals: list[dict[str, Any]]
    """Every deal as created: ``stage``, ``currency``, ``amount`` (Decimal) and the custom values by key
    (``tier`` option, ``signed`` bool, ``champion`` user global id, ``score`` Decimal, ``budget``
    (amount, currency)); a key without a value is missing."""
    stages: list[str]


async def define(client: httpx.AsyncClient, token: str, record_type: str,
                 fields: list[dict[str, Any]]) -> dict[str, str]:
    out = {}
    for spec in fields:
        made = data_or_fail(await gql(client, DEFINE, {"i": {"recordType": record_type, **spec}}, token=token))
        out[spec["key"]] = made["createCustomFieldDefinition"]["id"]
    return out


def custom_input(d: dict[str, Any]) -> list[dict[str, Any]]:
    """A deal's ``customFields`` input from its seeded values."""
    members = {"tier": "option", "signed": "boolean", "champion": "userId", "gone": "option", "notes": "text"}
    out = [{"key": k, members[k]: d[k]} for k in members if k in d]
    if "score" in d:
        out.append({"key": "score", "number": str(d["score"])})
    if "budget" in d:
        out.append({"key": "budget", "money": {"amount": str(d["budget"][0]), "currency": d["budget"][1]}})
    return out


async def seed_a(client: httpx.AsyncClient, world: TenantWorld, n: int = 70) -> Seeded:
    rng = random.Random(11)
    token = world.token()
    await define(client, token, "DEAL", DEAL_FIELDS)
    pipeline = await create_pipeline(client, token, stages=("Lead", "Won"))
    stages = [s["id"] for s in pipeline["stages"]]
    champions = [gid("User", world.users[role]) for role in (Role.ADMIN, Role.MEMBER)]
    deals: list[dict[str, Any]] = []
    for _ in range(n):
        d: dict[str, Any] = {"stage": rng.choice(stages), "currency": rng.choice(["USD", "EUR"]),
                             "amount": Decimal(rng.randrange(0, 100_000)) / 100, "notes": "n", "gone": "x"}
        if rng.random() < 0.8:
            d["tier"] = rng.choice(["gold", "silver", "bronze"])
        if rng.random() < 0.7:
            d["signed"] = rng.random() < 0.5
        if rng.random() < 0.6:
            d["champion"] = rng.choice(champions)
        if rng.random() < 0.75:
            d["score"] = Decimal(rng.randrange(-5_000, 20_000)) / 1000
        if rng.random() < 0.7:
            d["budget"] = (Decimal(rng.randrange(0, 500_000)) / 100, rng.choice(["USD", "EUR", "JPY"]))
        deals.append(d)
    made = data_or_fail(await gql(client, "mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }", {
        "input": [{"title": f"Deal {i}", "amount": str(d["amount"]), "currency": d["currency"], "stageId": d["stage"],
                   "customFields": custom_input(d)} for i, d in enumerate(deals)]}, token=token))["createDeals"]
    for m, d in zip(made, deals, strict=True):
        d["id"] = m["id"]
    return Seeded(world, deals, stages)


async def seed_b(client: httpx.AsyncClient, world: TenantWorld, n: int = 25) -> Seeded:
    rng = random.Random(12)
    token = world.token()
    await define(client, token, "DEAL", OTHER_FIELDS)
    stage = (await create_pipeline(client, token))["stages"][0]["id"]
    deals: list[dict[str, Any]] = []
    for _ in range(n):
        d: dict[str, Any] = {"stage": stage, "currency": "USD", "amount": Decimal(rng.randrange(0, 10_000)) / 100,
                             "tier": rng.choice(["gold", "platinum"]), "score": Decimal(rng.randrange(0, 100))}
        deals.append(d)
    data_or_fail(await gql(client, "mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }", {
        "input": [{"title": f"B {i}", "amount": str(d["amount"]), "currency": "USD", "stageId": stage,
                   "customFields": [{"key": "tier", "option": d["tier"]}, {"key": "score", "number": str(d["score"])},
                                    {"key": "elsewhere", "option": "here"}]}
                  for i, d in enumerate(deals)]}, token=token))
    return Seeded(world, deals, [stage])


@pytest.fixture(scope="module")
async def two(app: Starlette, admin_engine: AsyncEngine, settings: Settings) -> tuple[Seeded, Seeded]:
    """Tenant A and tenant B, seeded; A's ``gone`` definition deleted. Read-only for the tests."""
    a_world = await make_tenant_world(admin_engine, settings, "cagga")
    b_world = await make_tenant_world(admin_engine, settings, "caggb")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        a, b = await seed_a(client, a_world), await seed_b(client, b_world)
        listed = data_or_fail(await gql(client, "{ customFieldDefinitions(type: DEAL) { id key } }",
                                        token=a_world.token()))["customFieldDefinitions"]
        gone = next(d["id"] for d in listed if d["key"] == "gone")
        data_or_fail(await gql(client, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }",
                               {"id": gone}, token=a_world.token(Role.ADMIN)))
    return a, b


# ---- what Python says ------------------------------------------------------------------------------

STANDARD = {"STAGE": "stage", "CURRENCY": "currency"}


def number(values: list[Decimal]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "sum": None, "avg": None, "min": None, "max": None}
    return {"count": len(values), "sum": sum(values), "avg": sum(values) / len(values), "min": min(values),
            "max": max(values)}


def money(pairs: Iterable[tuple[Decimal, str]]) -> list[dict[str, Any]]:
    by: dict[str, list[Decimal]] = defaultdict(list)
    for amount, currency in pairs:
        by[currency].append(amount)
    return [{"currency": c, "count": len(v), "sum": sum(v), "avg": sum(v) / len(v), "min": min(v), "max": max(v)}
            for c, v in sorted(by.items())]


def expected(deals: Iterable[dict[str, Any]], by: list[str], custom: list[str]) -> dict[tuple[Any, ...], Any]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for d in deals:
        groups[tuple(d[STANDARD[b]] for b in by) + tuple(d.get(k) for k in custom)].append(d)
    return {key: {"count": len(members),
                  "amount": money((d["amount"], d["currency"]) for d in members),
                  "score": number([d["score"] for d in members if "score" in d]),
                  "budget": money(d["budget"] for d in members if "budget" in d)}
            for key, members in groups.items()}


def value_of(key: str, shown: dict[str, Any]) -> Any:
    """A group's custom key value as ``expected`` keys it (after checking its typed shape)."""
    kind = {"tier": ("SelectValue", "SINGLE_SELECT", "option"), "signed": ("BooleanValue", "BOOLEAN", "boolean"),
            "champion": ("UserValue", "USER", "userId")}[key]
    assert (shown["__typename"], shown["type"], shown["key"]) == (kind[0], kind[1], key), shown
    return shown[kind[2]]


def answered(body: dict[str, Any], by: list[str], custom: list[str],
             root: str = "dealsAggregate") -> dict[tuple[Any, ...], Any]:
    out = {}
    for g in data_or_fail(body)[root]["groups"]:
        key = [(g[STANDARD[b]]["id"] if b == "STAGE" else g[STANDARD[b]]) for b in by]
        key += [value_of(k, g[k]) for k in custom]
        for k in GROUPED:
            if k not in custom:
                assert g[k] is None, (k, g)  # a key not grouped by is null
        score, budget = g["m_score"], g["m_budget"]
        assert (score["key"], score["label"], score["type"], score["money"]) == ("score", "Score", "NUMBER", None)
        assert (budget["key"], budget["type"], budget["number"]) == ("budget", "MONEY", None)
        assert tuple(key) not in out, "each group once"
        out[tuple(key)] = {"count": g["count"], "amount": g["amount"], "score": score["number"],
                           "budget": budget["money"]}
    return out


def dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def assert_same(got: dict[tuple[Any, ...], Any], want: dict[tuple[Any, ...], Any]) -> None:
    assert got.keys() == want.keys()
    for key, w in want.items():
        g = got[key]
        assert g["count"] == w["count"], key
        for name in ("amount", "budget"):
            assert [m["currency"] for m in g[name]] == [m["currency"] for m in w[name]], (key, name)
            for gm, wm in zip(g[name], w[name], strict=True):
                assert (gm["count"], dec(gm["sum"]), dec(gm["min"]), dec(gm["max"])) == \
                       (wm["count"], wm["sum"], wm["min"], wm["max"]), (key, name)
                assert abs(Decimal(gm["avg"]) - wm["avg"]) <= Decimal("0.005"), (key, name)
        gs, ws = g["score"], w["score"]
        assert (gs["count"], dec(gs["sum"]), dec(gs["min"]), dec(gs["max"])) == \
               (ws["count"], ws["sum"], ws["min"], ws["max"]), key
        assert (gs["avg"] is None) == (ws["avg"] is None) and (
            ws["avg"] is None or abs(Decimal(gs["avg"]) - ws["avg"]) <= Decimal("0.0001")), key


# ---- grouping and measures -------------------------------------------------------------------------

@pytest.mark.parametrize(("by", "custom"), [
    ([], []), ([], ["tier"]), ([], ["signed"]), ([], ["champion"]), (["CURRENCY"], ["tier"]),
    (["STAGE"], ["tier", "signed", "champion"]), ([], ["champion", "tier"]),
])
async def test_groups_and_measures_match_python(either_client: httpx.AsyncClient, two: tuple[Seeded, Seeded],
                                                by: list[str], custom: list[str]) -> None:
    a, _ = two
    body = await gql(either_client, aggregate_query(),
                     {"by": by, "custom": custom, "measures": list(MEASURED)}, token=a.world.token(Role.VIEWER))
    want = expected(a.deals, by, custom)
    assert_same(answered(body, by, custom), want)
    assert data_or_fail(body)["dealsAggregate"]["groupCount"] == len(want)
    if custom:
        assert len(want) > 2, "the seed must spread the deals over groups for the test to mean anything"


async def test_money_fields_are_measured_per_currency(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("caggm")
    token = world.token()
    await define(client, token, "DEAL", [{"key": "budget", "label": "Budget", "type": "MONEY"},
                                         {"key": "score", "label": "Score", "type": "NUMBER"}])
    stage = (await create_pipeline(client, token))["stages"][0]["id"]
    budgets = [("10.00", "USD"), ("20.05", "USD"), ("1000", "JPY"), None]
    data_or_fail(await gql(client, "mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }", {"input": [
        {"title": f"d{i}", "amount": "1.00", "currency": "EUR", "stageId": stage,
         "customFields": [{"key": "budget", "money": {"amount": b[0], "currency": b[1]}}] if b else []}
        for i, b in enumerate(budgets)]}, token=token))
    query = """{ dealsAggregate(measureCustom: ["budget", "score", "budget"]) { groups { count
                 amount { currency sum }
                 budget: customMeasure(key: "budget") { key label type number { count } money {
                   currency count sum avg min max } }
                 score: customMeasure(key: "score") { type number { count sum avg min max } money { currency } }
                 none: customMeasure(key: "nope") { key } } } }"""
    groups = data_or_fail(await gql(client, query, token=token))["dealsAggregate"]["groups"]
    assert groups == [{
        "count": 4, "amount": [{"currency": "EUR", "sum": "4.00"}],
        "budget": {"key": "budget", "label": "Budget", "type": "MONEY", "number": None, "money": [
            {"currency": "JPY", "count": 1, "sum": "1000.00", "avg": "1000.00", "min": "1000.00", "max": "1000.00"},
            {"currency": "USD", "count": 2, "sum": "30.05", "avg": "15.03", "min": "10.00", "max": "20.05"}]},
        "score": {"type": "NUMBER", "number": {"count": 0, "sum": None, "avg": None, "min": None, "max": None},
                  "money": None},
        "none": None}]


async def test_companies_and_contacts_group_and_measure_their_custom_fields(
        either_client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("caggo")
    token = world.token()
    await define(client=either_client, token=token, record_type="COMPANY", fields=[
        {"key": "segment", "label": "Segment", "type": "SINGLE_SELECT", "options": ["smb", "enterprise"]},
        {"key": "employees", "label": "Employees", "type": "NUMBER"}])
    await define(either_client, token, "CONTACT", [{"key": "vip", "label": "VIP", "type": "BOOLEAN"},
                                                   {"key": "ltv", "label": "LTV", "type": "MONEY"}])
    companies = [("smb", "10"), ("smb", "30"), ("enterprise", "5000"), (None, None)]
    for segment, employees in companies:
        made = await create_company(either_client, token)
        values = ([{"key": "segment", "option": segment}] if segment else []) + (
            [{"key": "employees", "number": employees}] if employees else [])
        data_or_fail(await gql(either_client, "mutation($id: ID!, $c: [CustomFieldValueInput!]!) { updateCompany("
                                              "id: $id, input: {customFields: $c}) { id } }",
                               {"id": made["id"], "c": values}, token=token))
    contacts = [(True, ("100", "USD")), (True, ("50", "EUR")), (False, ("7", "USD")), (True, None)]
    for vip, ltv in contacts:
        given: list[dict[str, Any]] = [{"key": "vip", "boolean": vip}] + (
            [{"key": "ltv", "money": {"amount": ltv[0], "currency": ltv[1]}}] if ltv else [])
        data_or_fail(await gql(either_client, "mutation($i: ContactInput!) { createContact(input: $i) { id } }", {
            "i": {"firstName": "A", "lastName": "B", "customFields": given}}, token=token))
    body = data_or_fail(await gql(either_client, """{
        companiesAggregate(groupByCustom: ["segment"], measureCustom: ["employees"]) { groups { count
          customField(key: "segment") { ... on SelectValue { option } }
          customMeasure(key: "employees") { number { count sum avg min max } } } }
        contactsAggregate(groupByCustom: ["vip"], measureCustom: ["ltv"]) { groups { count
          customField(key: "vip") { ... on BooleanValue { boolean } }
          customMeasure(key: "ltv") { money { currency count sum } } } } }""", token=token))
    assert body["companiesAggregate"]["groups"] == [
        {"count": 2, "customField": {"option": "smb"},
         "customMeasure": {"number": {"count": 2, "sum": "40", "avg": "20.0000", "min": "10", "max": "30"}}},
        {"count": 1, "customField": {"option": "enterprise"},
         "customMeasure": {"number": {"count": 1, "sum": "5000", "avg": "5000.0000", "min": "5000", "max": "5000"}}},
        {"count": 1, "customField": {"option": None},
         "customMeasure": {"number": {"count": 0, "sum": None, "avg": None, "min": None, "max": None}}}]
    assert body["contactsAggregate"]["groups"] == [
        {"count": 3, "customField": {"boolean": True}, "customMeasure": {"money": [
            {"currency": "EUR", "count": 1, "sum": "50.00"}, {"currency": "USD", "count": 1, "sum": "100.00"}]}},
        {"count": 1, "customField": {"boolean": False}, "customMeasure": {"money": [
            {"currency": "USD", "count": 1, "sum": "7.00"}]}}]


async def test_user_groups_show_the_member(client: httpx.AsyncClient, two: tuple[Seeded, Seeded]) -> None:
    a, _ = two
    body = data_or_fail(await gql(client, """{ dealsAggregate(groupByCustom: ["champion"]) { groups { count
        customField(key: "champion") { label ... on UserValue { userId user { id name } } } } } }""",
                                  token=a.world.token()))
    groups = body["dealsAggregate"]["groups"]
    named = {g["customField"]["userId"]: g["customField"]["user"] for g in groups}
    admin = gid("User", a.world.users[Role.ADMIN])
    assert named[admin] == {"id": admin, "name": f"Admin of {a.world.slug}"}
    assert named[None] is None and {g["customField"]["label"] for g in groups} == {"Champion"}


# ---- the filters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["custom option", "custom range and money", "status and stage"])
async def test_filters_narrow_the_groups(either_client: httpx.AsyncClient, two: tuple[Seeded, Seeded],
                                         name: str) -> None:
    """The list's filters, custom ones included, select what is grouped: each case selects fewer deals
    than there are, so the test fails if the aggregate dropped the filter."""
    a, _ = two
    filters: dict[str, tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = {
        "custom option": ({"custom": [{"key": "tier", "text": "gold"}]}, lambda d: d.get("tier") == "gold"),
        "custom range and money": (
            {"custom": [{"key": "score", "op": "GTE", "number": "2"},
                        {"key": "budget", "op": "LT", "number": "2500", "currency": "USD"}]},
            lambda d: "score" in d and d["score"] >= 2 and "budget" in d and d["budget"][1] == "USD"
            and d["budget"][0] < 2500),
        "status and stage": ({"stageId": a.stages[0], "status": ["OPEN"]}, lambda d: d["stage"] == a.stages[0]),
    }
    given, keep = filters[name]
    chosen = [d for d in a.deals if keep(d)]
    assert 0 < len(chosen) < len(a.deals), "the filter must select some deals, not all"
    custom = ["signed", "champion"]
    body = await gql(either_client, aggregate_query(),
                     {"filter": given, "custom": custom, "measures": list(MEASURED)}, token=a.world.token())
    assert_same(answered(body, [], custom), expected(chosen, [], custom))
    listed = data_or_fail(await gql(either_client, "query($f: DealFilter) { deals(filter: $f) { totalCount } }",
                                    {"f": given}, token=a.world.token()))["deals"]["totalCount"]
    assert listed == len(chosen)


# ---- keys: unknown, deleted, of a type that does not fit, another workspace's ---------------------

@pytest.mark.parametrize(("custom", "measures", "field", "message"), [
    (["nope"], [], "groupByCustom.nope", "not a custom field of deals"),
    (["gone"], [], "groupByCustom.gone", "not a custom field of deals"),  # deleted: its values are hidden
    (["elsewhere"], [], "groupByCustom.elsewhere", "not a custom field of deals"),  # tenant B's
    (["notes"], [], "groupByCustom.notes", "is a TEXT field"),
    (["score"], [], "groupByCustom.score", "is a NUMBER field"),
    (["tags"], [], "groupByCustom.tags", "is a MULTI_SELECT field"),
    (["tier", "Not a key"], [], "groupByCustom.1", "must be a key"),
    (["tier", "signed", "champion", "a", "b", "c"], [], "groupByCustom", "at most 5"),
    ([], ["tier"], "measureCustom.tier", "is a SINGLE_SELECT field"),
    ([], ["score", "gone"], "measureCustom.gone", "not a custom field of deals"),
    ([], ["elsewhere"], "measureCustom.elsewhere", "not a custom field of deals"),
    (["tier"], ["x\u0000"], "measureCustom.0", "must be a key"),
])
async def test_bad_keys_are_refused_naming_the_key(either_client: httpx.AsyncClient, two: tuple[Seeded, Seeded],
                                                   custom: list[str], measures: list[str], field: str,
                                                   message: str) -> None:
    a, _ = two
    body = await gql(either_client, aggregate_query(grouped=(), measured=()),
                     {"custom": custom, "measures": measures}, token=a.world.token())
    assert codes(body) == ["BAD_USER_INPUT"], body
    error = body["errors"][0]
    assert error["extensions"]["field"] == field and message in error["message"], error
    assert body["data"] is None


async def test_a_key_is_the_workspaces_own(either_client: httpx.AsyncClient, two: tuple[Seeded, Seeded]) -> None:
    """Both workspaces define ``tier`` and ``score``: each counts and measures its own deals only, under
    its own label and options; B's ``elsewhere`` is unknown to A (above), A's ``signed`` to B."""
    a, b = two
    for side, label in ((a, "Tier"), (b, "Level")):
        body = await gql(either_client, aggregate_query(grouped=("tier",), measured=("score",), extra="count"),
                         {"custom": ["tier"], "measures": ["score"]}, token=side.world.token())
        groups = data_or_fail(body)["dealsAggregate"]["groups"]
        got = {g["tier"]["option"]: (g["count"], dec(g["m_score"]["number"]["sum"])) for g in groups}
        want = {key[0]: (w["count"], w["score"]["sum"]) for key, w in expected(side.deals, [], ["tier"]).items()}
        assert got == want and {g["tier"]["label"] for g in groups} == {label}
    refused = await gql(either_client, aggregate_query(grouped=(), measured=()), {"custom": ["signed"]},
                        token=b.world.token())
    assert codes(refused) == ["BAD_USER_INPUT"]
    assert refused["errors"][0]["extensions"]["field"] == "groupByCustom.signed"


async def test_records_without_custom_fields_have_no_custom_arguments(client: httpx.AsyncClient,
                                                                      two: tuple[Seeded, Seeded]) -> None:
    a, _ = two
    body = await gql(client, '{ activitiesAggregate(groupByCustom: ["tier"]) { groupCount } }', token=a.world.token())
    assert codes(body) == ["GRAPHQL_VALIDATION_FAILED"], body


async def test_rls_alone_keeps_a_custom_aggregate_in_the_transactions_tenant(
        two: tuple[Seeded, Seeded], settings: Settings) -> None:
    """The statement naming A (its explicit tenant filters), run in B's tenant transaction as the
    server's role: RLS alone leaves nothing of A's to count, nor A's definitions (the row of nulls)."""
    a, b = two
    aggregation = DEAL.aggregation
    assert aggregation is not None
    databases = Databases(settings.app_url, pool_size=1)
    try:
        for tenant, seen in ((a, len(a.deals)), (b, 0)):
            async with databases.tenant_transaction(tenant.world.id) as conn:
                rows = (await conn.execute(statement(DEAL, aggregation, a.world.id, {}, [CustomGroup("tier", 0)], 100,
                                                     custom_measures=[CustomMeasure("score", 0)]))).all()
            assert sum(int(r.records or 0) for r in rows) == seen, tenant.world.slug
            assert bool(rows[0].described) == bool(seen)
    finally:
        await databases.dispose()


# ---- visibility and field rules ---------------------------------------------------------------------

async def test_a_viewer_who_sees_fewer_deals_gets_smaller_groups(
        either_client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    """Deals seen by their owner's team only (docs/visibility.md): ``mate`` and MEMBER are team East;
    ``outsider`` is in no team. Each sees the groups and sums of the deals they see."""
    world = await make_tenant("caggv")
    owner = world.token()
    people = {name: await add_user(admin_engine, world.id, f"{name}@{world.slug}.example", name.title(), Role.MEMBER)
              for name in ("mate", "outsider")}
    await define(either_client, owner, "DEAL", DEAL_FIELDS[:1] + DEAL_FIELDS[3:5])
    stage = (await create_pipeline(either_client, owner))["stages"][0]["id"]
    deals = [("mate", "gold", "5", ("10.00", "USD")), ("mate", "silver", "1", ("3.00", "EUR")),
             ("outsider", "gold", "7", ("20.00", "USD")), ("outsider", "gold", "2", None)]
    data_or_fail(await gql(either_client, "mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }", {
        "input": [{"title": f"d{i}", "amount": "1.00", "currency": "USD", "stageId": stage,
                   "ownerId": gid("User", people[who]),
                   "customFields": [{"key": "tier", "option": tier}, {"key": "score", "number": score}] + (
                       [{"key": "budget", "money": {"amount": budget[0], "currency": budget[1]}}] if budget else [])}
                  for i, (who, tier, score, budget) in enumerate(deals)]}, token=owner))
    data_or_fail(await gql(either_client, "mutation($i: TeamInput!) { createTeam(input: $i) { id } }", {"i": {
        "name": "East", "memberIds": [gid("User", world.users[Role.MEMBER]), gid("User", people["mate"])]}},
        token=owner))
    data_or_fail(await gql(either_client, "mutation { setRecordVisibility(recordType: DEAL, audience: TEAM) { "
                                          "audience } }", token=owner))
    query = """{ dealsAggregate(groupByCustom: ["tier"], measureCustom: ["score", "budget"]) { groupCount groups {
        count customField(key: "tier") { ... on SelectValue { option } }
        score: customMeasure(key: "score") { number { sum } } budget: customMeasure(key: "budget") {
        money { currency sum } } } } }"""
    tokens = {"owner": owner, "member": world.token(Role.MEMBER),
              "outsider": issue_token(world.settings, user_id=people["outsider"], tenant_id=world.id,
                                      role=Role.MEMBER),
              "viewer": world.token(Role.VIEWER)}
    want = {
        "owner": {"gold": (3, "14", [("USD", "30.00")]), "silver": (1, "1", [("EUR", "3.00")])},
        "member": {"gold": (1, "5", [("USD", "10.00")]), "silver": (1, "1", [("EUR", "3.00")])},
        "outsider": {"gold": (2, "9", [("USD", "20.00")])},
        "viewer": {},
    }
    for who, groups in want.items():
        answer = data_or_fail(await gql(either_client, query, token=tokens[who]))["dealsAggregate"]
        got = {g["customField"]["option"]: (g["count"], g["score"]["number"]["sum"],
                                            [(m["currency"], m["sum"]) for m in g["budget"]["money"]])
               for g in answer["groups"]}
        assert got == groups and answer["groupCount"] == len(groups), who


async def test_a_field_hidden_from_a_role_cannot_be_grouped_or_measured(
        client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """A field rule on a custom field (``custom.<key>``) refuses grouping and measuring by it for the
    roles it hides it from, FORBIDDEN naming the argument and key; other keys, and other roles, are
    answered."""
    world = await make_tenant("caggr")
    owner = world.token()
    await define(client, owner, "DEAL", DEAL_FIELDS[:2] + DEAL_FIELDS[3:4])
    stage = (await create_pipeline(client, owner))["stages"][0]["id"]
    data_or_fail(await gql(client, "mutation($i: DealInput!) { createDeal(input: $i) { id } }", {"i": {
        "title": "d", "amount": "1.00", "currency": "USD", "stageId": stage, "customFields": [
            {"key": "tier", "option": "gold"}, {"key": "signed", "boolean": True}, {"key": "score", "number": "4"}]}},
        token=owner))
    for name in ("custom.tier", "custom.score"):
        data_or_fail(await gql(client, SET, {"t": "Deal", "f": name, "r": ["VIEWER"]}, token=owner))
    group = '{ dealsAggregate(groupByCustom: ["signed", "tier"]) { groups { count } } }'
    measure = '{ dealsAggregate(groupByCustom: ["signed"], measureCustom: ["score"]) { groups { count } } }'
    for query, field in ((group, "groupByCustom.tier"), (measure, "measureCustom.score")):
        body = await gql(client, query, token=world.token(Role.VIEWER))
        assert codes(body) == ["FORBIDDEN"] and body["errors"][0]["extensions"]["field"] == field, body
        assert "Deal.custom." in body["errors"][0]["message"]
        assert data_or_fail(await gql(client, query, token=world.token(Role.MEMBER)))["dealsAggregate"]["groups"] == [
            {"count": 1}]
    allowed = '{ dealsAggregate(groupByCustom: ["signed"]) { groups { count customField(key: "signed") { key } } } }'
    assert data_or_fail(await gql(client, allowed, token=world.token(Role.VIEWER)))["dealsAggregate"]["groups"] == [
        {"count": 1, "customField": {"key": "signed"}}]


# ---- one statement; cost ----------------------------------------------------------------------------

async def test_still_one_statement(settings: Settings, two: tuple[Seeded, Seeded]) -> None:
    """Custom groups and measures, their definitions and the check of the keys are the aggregate's one
    statement; a USER key's members come through the loaders (one statement, whatever the groups)."""
    a, _ = two
    plain = ('{ dealsAggregate(groupBy: [CURRENCY], groupByCustom: ["tier", "signed"], measureCustom: ["score", '
             '"budget"]) { groups { count customField(key: "tier") { label } customMeasure(key: "budget") { money { '
             'sum } } } } }')
    users = '{ dealsAggregate(groupByCustom: ["champion"]) { groups { customField(key: "champion") { ' \
            '... on UserValue { user { name } } } } } }'
    async with wired_app(settings) as application:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application),
                                     base_url="http://atrium.test") as client:
            for query in (plain, users):  # the driver learns the result types once per connection
                data_or_fail(await gql(client, query, token=a.world.token()))
            recorded = []
            for query in (plain, users):
                with application.state.wire.recording() as statements:
                    data_or_fail(await gql(client, query, token=a.world.token()))
                recorded.append([s for s in statements if not s.startswith(("BEGIN", "COMMIT"))])
    grouped, named = recorded
    assert len(grouped) == 2 and "atrium_enter" in grouped[0] and "GROUP BY" in grouped[1], grouped
    assert "custom_field_definitions" in grouped[1] and "tenant_id" in grouped[1]
    assert len(named) == 3 and "GROUP BY" in named[1] and "users" in named[2], named


async def test_custom_fields_of_groups_count_in_the_cost(client: httpx.AsyncClient,
                                                         two: tuple[Seeded, Seeded]) -> None:
    a, _ = two
    measures = " ".join(f'm{i}: customMeasure(key: "budget") {{ money {{ sum }} }}' for i in range(5))
    heavy = f'{{ dealsAggregate(first: 1000, measureCustom: ["budget"]) {{ groups {{ {measures} }} }} }}'
    body = await gql(client, heavy, token=a.world.token())
    assert codes(body) == ["QUERY_TOO_COMPLEX"] and body["errors"][0]["extensions"]["cost"] > 50_000, body
    light = heavy.replace("first: 1000", "first: 10")
    groups = data_or_fail(await gql(client, light, token=a.world.token()))["dealsAggregate"]["groups"]
    assert groups and groups[0]["m0"]["money"]
