"""Plans answer exactly as the executor does: a differential test over generated and chosen queries.

Two apps share one seeded tenant: one answers through plans (``planner``), the other with plans off
(the Strawberry executor and the loaders alone). Every query is sent to both and the answers are
compared as JSON values with their key order: data, errors with messages, paths and locations,
null propagation, aliases, fragments, ``@skip``/``@include``, abstract types.

- ``test_generated_queries_answer_alike``: at least 2,000 valid queries generated from the real
  schema by hypothesis-graphql, spread over every root query field, with arguments drawn from the
  tenant's real ids and cursors, plausible sizes and filter values (and some that are not);
- ``test_chosen_queries_answer_alike``: queries written to reach every record relation and every
  connection feature, and errors at nested nullable and non-null positions;
- the plan path is really taken (its statement count, a single SELECT) and a planner fault never
  becomes an answer (nothing is logged by ``atrium.planner``);
- every planned request is sent twice: the second time an operation its plan answered wholly takes
  the fast path (``planner.execution.answer_prepared``) and must answer the same.

The data is made to find formatting differences: non-ASCII, quotes, backslashes, tabs and newlines
in text, timestamps with and without microseconds, equal sort values (ties), missing relations,
empty lists, every enum value.

Record-level visibility (docs/visibility.md) is on: deals are shown to their owners' teams only, and
they are owned by the OWNER, the MEMBER (in a team with the ADMIN) and the VIEWER (in none). So the
OWNER sees every deal, the MEMBER and the VIEWER each see theirs alone, in lists, counts, nested
lists, search, ``node`` and ``deal``: queries are compared as each of those roles.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import hypothesis.strategies as st
import hypothesis_graphql
import pytest
from graphql import ArgumentNode, IntValueNode, StringValueNode, Visitor, parse, print_ast, visit
from hypothesis import HealthCheck, given, settings
from hypothesis_graphql import nodes
from starlette.applications import Starlette

from atrium.app import create_app
from atrium.schema import schema
from core.ids import to_global_id
from core.settings import Settings
from models.tables import Role
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.wire import WireCounter, wired_app

MakeTenant = Callable[..., Awaitable[TenantWorld]]
ROOT_QUERIES = list(schema._schema.query_type.fields) if schema._schema.query_type else []
EXAMPLES_PER_FIELD = 90
ODD_TEXT = ('Zoë "the" O\'Brien \\ back\tslash', "Ünïcödé — ✓ 😀", "line\nbreak", "  padded  ", "<b>&amp;</b>")


@dataclass
class World:
    """A seeded tenant: its token, and pools of real ids and cursors for generated arguments."""

    tenant: TenantWorld
    token: str
    ids: list[str] = field(default_factory=list)
    cursors: list[str] = field(default_factory=list)
    definitions: dict[str, str] = field(default_factory=dict)


async def api(client: httpx.AsyncClient, token: str, document: str, **variables: Any) -> dict[str, Any]:
    return data_or_fail(await gql(client, document, variables, token=token))


async def seed(client: httpx.AsyncClient, tenant: TenantWorld) -> World:
    token = tenant.token(Role.OWNER)
    world = World(tenant, token)
    pipeline = (await api(client, token, """mutation($i: PipelineInput!) { createPipeline(input: $i) {
        id stages { id } } }""", i={"name": "Sales ✓", "stages": [
        {"name": "Lead", "probability": "0.1"}, {"name": "Won \"big\"", "probability": "1"},
        {"name": "Lost", "probability": "0"}]}))["createPipeline"]
    empty = (await api(client, token, 'mutation { createPipeline(input: {name: "Empty"}) { id } }'))["createPipeline"]
    stages = [s["id"] for s in pipeline["stages"]]
    world.ids += [pipeline["id"], empty["id"], *stages]
    await seed_custom_fields(client, token, world)
    companies = []
    for i, name in enumerate(ODD_TEXT):
        made = (await api(client, token, "mutation($i: CompanyInput!) { createCompany(input: $i) { id } }",
                          i={"name": name, "domain": f"c{i}.example" if i % 2 else None,
                             "customFields": [{"key": "segment", "text": ODD_TEXT[(i + 1) % len(ODD_TEXT)]}]
                             if i % 2 else []}))["createCompany"]
        companies.append(made["id"])
    contacts = []
    for i, name in enumerate(ODD_TEXT):
        made = (await api(client, token, "mutation($i: ContactInput!) { createContact(input: $i) { id } }", i={
            "firstName": name, "lastName": "Same" if i < 3 else f"L{i}", "email": f"p{i}@x.example" if i % 2 else None,
            "companyId": companies[i % 3] if i < 4 else None}))["createContact"]
        contacts.append(made["id"])
    products = []
    for i in range(3):
        made = (await api(client, token, "mutation($i: ProductInput!) { createProduct(input: $i) { id } }", i={
            "name": f"Product {ODD_TEXT[i]}", "sku": f"SKU-{i}", "unitPrice": ["10.00", "0.50", "1234.5"][i],
            "currency": "USD", "active": i != 2}))["createProduct"]
        products.append(made["id"])
    deals = []
    owners = [to_global_id("User", tenant.users[role]) for role in (Role.OWNER, Role.MEMBER, Role.VIEWER)]
    for i in range(14):
        made = (await api(client, token, "mutation($i: DealInput!) { createDeal(input: $i) { id } }", i={
            "customFields": deal_custom_values(i, world),
            "title": f"{ODD_TEXT[i % len(ODD_TEXT)]} #{i}",
            "amount": ["100.00", "100.00", "0", "99999.99", "5.5"][i % 5],
            "currency": ["USD", "EUR", "GBP"][i % 3], "stageId": stages[i % 3],
            "companyId": companies[i % 4] if i % 3 else None, "contactId": contacts[i % 5] if i % 2 else None,
            "ownerId": owners[i % 3], "expectedCloseDate": f"2027-0{1 + i % 9}-1{i % 10}" if i % 4 else None,
        }))["createDeal"]
        deals.append(made["id"])
        if i % 3 == 2:
            await api(client, token, "mutation($id: ID!, $i: DealPatch!) { updateDeal(id: $id, input: $i) { id } }",
                      id=made["id"], i={"status": ["WON", "LOST"][i % 2]})
    for i, deal in enumerate(deals[:6]):
        for n in range(i % 4):
            kind = ["NOTE", "CALL", "EMAIL", "MEETING", "TASK"][(i + n) % 5]
            await api(client, token, "mutation($i: ActivityInput!) { createActivity(input: $i) { id } }", i={
                "kind": kind, "subject": ODD_TEXT[(i + n) % len(ODD_TEXT)], "body": None if n % 2 else "body\ttext",
                "dealId": deal, "contactId": contacts[n] if n else None,
                "occurredAt": f"2025-01-0{1 + n}T10:00:00Z" if n % 2 else "2025-01-01T10:00:00.123456+02:00",
                "dueDate": "2030-01-01" if kind == "TASK" else None, "done": n == 2})
    await api(client, token, "mutation($i: ActivityInput!) { createActivity(input: $i) { id } }",
              i={"kind": "CALL", "subject": "company only", "companyId": companies[0]})
    for i, deal in enumerate(deals[:3]):
        await api(client, token, "mutation($i: DealLineItemInput!) { createDealLineItem(input: $i) { id } }", i={
            "dealId": deal, "productId": products[i % 2], "quantity": 1 + i, "discountPercent": "12.5" if i else None,
            "unitPrice": ["3.33", "7.10"][i - 1] if i else None})
    await api(client, token, "mutation($i: NoteInput!) { createNote(input: $i) { id } }", i={"dealId": deals[0]})
    await api(client, token, "mutation($i: TeamInput!) { createTeam(input: $i) { id } }", i={
        "name": "Plans team", "memberIds": [owners[1], to_global_id("User", tenant.users[Role.ADMIN])]})
    await api(client, token, "mutation { setRecordVisibility(recordType: DEAL, audience: TEAM) { audience } }")
    # Records in the trash (tests/test_trash.py), their ids kept in the pools: a company its contacts and
    # deals still point at, a deal with an activity and a line item that go with it, a contact.
    for mutation, key in (("deleteCompany", companies[1]), ("deleteDeal", deals[1]), ("deleteContact", contacts[2])):
        await api(client, token, f"mutation($id: ID!) {{ {mutation}(id: $id) {{ deletedId }} }}", id=key)
    await api(client, token, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }",
              id=world.definitions["gone"])
    world.ids += companies + contacts + products + deals
    listing = await api(client, token, """{ deals(first: 100) { edges { cursor node { activities { id }
        lineItems { id } } } } companies(orderBy: {field: CREATED_AT}) { edges { cursor } }
        a: deals(orderBy: {field: EXPECTED_CLOSE_DATE}) { edges { cursor } }
        b: deals(orderBy: {field: AMOUNT}) { edges { cursor } } activities { edges { cursor node { id } } }
        c: deals(orderBy: {custom: "score"}) { edges { cursor } } d: deals(orderBy: {custom: "renewal"}) {
        edges { cursor } } }""")
    for name in ("deals", "companies", "a", "b", "activities", "c", "d"):
        world.cursors += [e["cursor"] for e in listing[name]["edges"]]
    for edge in listing["deals"]["edges"]:
        world.ids += [a["id"] for a in edge["node"]["activities"]] + [li["id"] for li in edge["node"]["lineItems"]]
    world.ids += [e["node"]["id"] for e in listing["activities"]["edges"]]
    world.ids.append(f"{uuid.uuid4().hex}")  # not an id at all
    # Field rules (docs/field-rules.md): every query below runs as the owner, who sees everything, and as
    # a viewer, from whom these are hidden: both paths must answer alike (null + FORBIDDEN where a
    # hidden field is read, FORBIDDEN where one is filtered, sorted or measured by, searches without it;
    # custom fields' values withheld, their definitions read).
    for record_type, name in HIDDEN_FROM_VIEWERS:
        await api(client, tenant.token(Role.ADMIN), """mutation($t: String!, $f: String!) {
            setFieldRule(recordType: $t, field: $f, hiddenFrom: [VIEWER]) { id } }""", t=record_type, f=name)
    return world


HIDDEN_FROM_VIEWERS = (("Deal", "amount"), ("Contact", "email"), ("Product", "unitPrice"), ("Activity", "body"),
                       ("Deal", "custom.score"), ("Company", "custom.segment"))
"""Custom fields too (``custom.<key>``): their values withheld, filters and orderings by them refused."""
CUSTOM_DEALS: list[dict[str, Any]] = [
    {"key": "tier", "label": "Tier ✓ \"q\"", "type": "SINGLE_SELECT", "options": ["gold", "silver", "bronze"]},
    {"key": "score", "label": "Score", "type": "NUMBER"},
    {"key": "budget", "label": "Budget", "type": "MONEY"},
    {"key": "renewal", "label": "Renewal", "type": "DATE"},
    {"key": "signed", "label": "Signed", "type": "BOOLEAN", "default": {"boolean": False}},
    {"key": "tags", "label": "Tags", "type": "MULTI_SELECT", "options": ["a", "b", "Ü"]},
    {"key": "champion", "label": "Champion", "type": "USER"},
    {"key": "notes", "label": "Notes", "type": "LONG_TEXT"},
    {"key": "gone", "label": "Gone", "type": "TEXT"},
]
"""Custom fields of the seeded deals (``gone`` is deleted after the deals are made: its values are hidden)."""


async def seed_custom_fields(client: httpx.AsyncClient, token: str, world: World) -> None:
    define = "mutation($i: CustomFieldDefinitionInput!) { createCustomFieldDefinition(input: $i) { id key } }"
    for spec in CUSTOM_DEALS:
        made = (await api(client, token, define, i={"recordType": "DEAL", **spec}))["createCustomFieldDefinition"]
        world.definitions[made["key"]] = made["id"]
    await api(client, token, define, i={"recordType": "COMPANY", "key": "segment", "label": "Segment", "type": "TEXT",
                                        "position": 3})
    await api(client, token, define, i={"recordType": "CONTACT", "key": "vip", "label": "VIP", "type": "BOOLEAN"})


def deal_custom_values(i: int, world: World) -> list[dict[str, Any]]:
    """Values for deal ``i``: every type, ties, missing values, odd text and numbers of various scales."""
    from core.ids import to_global_id

    members = list(world.tenant.users.values())
    values: list[dict[str, Any]] = []
    if i % 4:
        values.append({"key": "tier", "option": ["gold", "silver", "bronze"][i % 3]})
    if i % 3:
        values.append({"key": "score", "number": ["1", "12.50", "-3", "0.000001", "12.5"][i % 5]})
    if i % 2:
        money = {"amount": ["5", "99.90"][i % 4 // 2], "currency": ["USD", "EUR"][i % 2]}
        values.append({"key": "budget", "money": money})
    if i % 5:
        values.append({"key": "renewal", "date": f"2027-0{1 + i % 3}-1{i % 2}"})
    if i % 3 == 1:
        values.append({"key": "signed", "boolean": True})
    values.append({"key": "tags", "options": [["a"], ["b", "a"], [], ["Ü"]][i % 4]})
    if i % 4 == 1:
        values.append({"key": "champion", "userId": to_global_id("User", members[i % len(members)])})
    if i % 3 == 2:
        values.append({"key": "notes", "text": ODD_TEXT[i % len(ODD_TEXT)]})
    values.append({"key": "gone", "text": f"hidden {i}"})
    return values


@pytest.fixture(scope="module")
async def apps(settings: Settings) -> AsyncIterator[tuple[Starlette, Starlette]]:
    planned, executed = create_app(replace(settings, plans=True)), create_app(replace(settings, plans=False))
    async with planned.router.lifespan_context(planned), executed.router.lifespan_context(executed):
        yield planned, executed


@pytest.fixture(scope="module")
async def clients(apps: tuple[Starlette, Starlette]) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    planned, executed = apps
    async with (httpx.AsyncClient(transport=httpx.ASGITransport(app=planned), base_url="http://p.test") as a,
                httpx.AsyncClient(transport=httpx.ASGITransport(app=executed), base_url="http://e.test") as b):
        yield a, b


@pytest.fixture(scope="module")
async def world(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], admin_engine: Any,
                settings: Settings) -> World:
    from atrium.ops.admin import add_user, create_tenant

    slug = f"plans-{uuid.uuid4().hex[:8]}"
    tenant_id = await create_tenant(admin_engine, slug, "Plans")
    tenant = TenantWorld(slug=slug, id=tenant_id, settings=settings)
    for role in Role:
        tenant.users[role] = await add_user(admin_engine, tenant_id, f"{role.value}@{slug}.example",
                                            f"{role.value.title()} {ODD_TEXT[0]}", role)
    return await seed(clients[1], tenant)


async def both(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], token: str, query: str,
               variables: dict[str, Any] | None = None) -> tuple[str, str]:
    body = {"query": query, "variables": variables or {}}
    headers = {"authorization": f"Bearer {token}"}
    planned = await clients[0].post("/graphql", json=body, headers=headers)
    # Again: an operation its plan answered wholly is now answered without Strawberry's pipeline.
    again = await clients[0].post("/graphql", json=body, headers=headers)
    executed = await clients[1].post("/graphql", json=body, headers=headers)
    assert planned.status_code == again.status_code == executed.status_code, query
    assert again.json() == planned.json(), f"answered differently the second time:\n{query}"
    # JSON values with their key order (the planned text differs in whitespace only).
    return json.dumps(planned.json()), json.dumps(executed.json())


def same(planned: str, executed: str, query: str, variables: Any = None) -> None:
    """Equal answers, or a failure naming the query and where the answers first differ."""
    if planned == executed:
        return
    at = next((i for i, (a, b) in enumerate(zip(planned, executed, strict=False)) if a != b),
              min(len(planned), len(executed)))
    pytest.fail(f"answers differ for\n{query}\nvariables: {variables}"
                f"\nplanned:  ...{planned[max(0, at - 200):at + 200]}"
                f"\nexecuted: ...{executed[max(0, at - 200):at + 200]}")


@contextmanager
def no_planner_faults(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    with caplog.at_level(logging.ERROR, logger="atrium.planner"):
        yield
    faults = [r for r in caplog.records if r.name == "atrium.planner"]
    assert not faults, faults[0].getMessage()


# ---- generated queries ----------------------------------------------------------------------------

class Plausible(Visitor):
    """Make generated arguments mostly meaningful: sizes in range (now and then not), real cursors
    and ids, one paging direction at a time."""

    def __init__(self, rng: random.Random, world: World) -> None:
        super().__init__()
        self.rng = rng
        self.world = world

    def leave_argument(self, node: ArgumentNode, *_: Any) -> ArgumentNode | None:
        name = node.name.value
        if name in ("first", "last") and isinstance(node.value, IntValueNode):
            value = self.rng.choice([0, 1, 2, 3, 5, 20, 50, 100, 101, -1]) if self.rng.random() < 0.95 \
                else int(node.value.value)
            return ArgumentNode(name=node.name, value=IntValueNode(value=str(value)))
        if name in ("after", "before") and isinstance(node.value, StringValueNode):
            cursor = self.rng.choice(self.world.cursors) if self.rng.random() < 0.8 else node.value.value
            return ArgumentNode(name=node.name, value=StringValueNode(value=cursor))
        return None

    def leave_field(self, node: Any, *_: Any) -> Any:
        names = {a.name.value for a in node.arguments or ()}
        if {"first", "last"} <= names and self.rng.random() < 0.8:  # mostly one direction
            drop = self.rng.choice([("last", "before"), ("first", "after")])
            return node.__class__(**{**{k: getattr(node, k) for k in node.keys},
                                     "arguments": tuple(a for a in node.arguments if a.name.value not in drop)})
        return None


def scalars(world: World) -> dict[str, st.SearchStrategy[Any]]:
    return {
        "ID": st.sampled_from(world.ids).map(nodes.String),
        "Decimal": st.sampled_from(["0", "5.5", "100", "100.00", "99999.99", "-1", "1.005", "NaN"]).map(nodes.String),
        "Date": st.sampled_from(["2027-01-11", "2027-05-15", "2030-01-01", "1999-12-31"]).map(nodes.String),
        "DateTime": st.sampled_from(["2025-01-01T10:00:00+00:00", "2025-01-01T10:00:00"]).map(nodes.String),
        "JSON": st.just(nodes.String("{}")),
        "Base64": st.just(nodes.String("AAA=")),
    }


def generated(root: str, world: World) -> list[str]:
    """Up to ``EXAMPLES_PER_FIELD`` distinct generated queries on root field ``root`` (hypothesis stops
    sooner where the field has fewer shapes, as ``me`` does)."""
    strategy = hypothesis_graphql.queries(schema.as_str(), fields=[root], custom_scalars=scalars(world),
                                          allow_x00=False)
    queries: dict[str, None] = {}

    @settings(max_examples=EXAMPLES_PER_FIELD, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy, st.randoms(use_true_random=False))
    def generate(query: object, rng: random.Random) -> None:
        queries[print_ast(visit(parse(str(query)), Plausible(rng, world)))] = None

    generate()
    return list(queries)


async def test_generated_queries_answer_alike(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], world: World,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """At least 2,000 distinct generated queries over every root query field, as the owner and a
    viewer in turn (each field's queries reach both: field rules hide fields from viewers, and
    visibility restricts what a viewer sees; the chosen queries run as every role)."""
    queries = [query for root in ROOT_QUERIES for query in generated(root, world)]
    assert len(queries) >= 2_000, len(queries)
    reached = {name for query in queries for name in ROOT_QUERIES if query.lstrip("{ \n").startswith(name)}
    assert reached == set(ROOT_QUERIES)
    with no_planner_faults(caplog):
        for i, query in enumerate(queries):
            role = (Role.OWNER, Role.VIEWER)[i % 2]
            planned, executed = await both(clients, world.tenant.token(role), query)
            same(planned, executed, query)


# ---- chosen queries -------------------------------------------------------------------------------

RECORD = """
fragment D on Deal { __typename id title amount currency status expectedCloseDate version createdAt updatedAt
  stage { id name position probability version pipeline { id name stages { id name } } }
  pipeline { __typename name } company { id name domain version contacts(first: 2) { name company { id } } }
  contact { name firstName lastName email phone title deals(first: 1) { id } activities { kind } }
  owner { id email name role } activities(first: 5) { id kind subject body occurredAt dueDate done version createdAt
    deal { id } contact { id } company { id } actor { name role } }
  lineItems { id quantity unitPrice discountPercent currency lineTotal deal { amount } product { sku active } } }
"""
CUSTOM = """
fragment C on Deal { customFields { __typename key label type ... on TextValue { text } ... on NumberValue { number }
  ... on MoneyValue { amount currency } ... on DateValue { date } ... on BooleanValue { boolean }
  ... on SelectValue { option } ... on MultiSelectValue { options } ... on UserValue { userId user { id name } } }
  tier: customField(key: "tier") { label ... on SelectValue { option } } }
"""
CHOSEN: list[tuple[str, dict[str, Any]]] = [
    (RECORD + "{ deals(first: 50) { totalCount edges { cursor node { ...D } } pageInfo { hasNextPage hasPreviousPage "
     "startCursor endCursor } } }", {}),
    (RECORD + "query($n: Int!) { x: deals(first: $n, orderBy: {field: AMOUNT, direction: ASC}) { nodes { ...D } }"
     " y: deals(last: $n, orderBy: {field: TITLE}) { edges { cursor } nodes { id } pageInfo { hasNextPage "
     "hasPreviousPage startCursor endCursor __typename } __typename } }", {"n": 4}),
    ("query($s: Boolean!, $i: Boolean!) { deals(first: 3) { nodes { id title @skip(if: $s) amount @include(if: $i) "
     "... on Deal @skip(if: $i) { currency } company @include(if: $s) { name } } } }", {"s": True, "i": False}),
    ("query($s: Boolean!, $i: Boolean!) { deals(first: 3) { nodes { id title @skip(if: $s) amount @include(if: $i) "
     "... on Deal @skip(if: $i) { currency } company @include(if: $s) { name } } } }", {"s": False, "i": True}),
    ("{ companies { totalCount nodes { name domain contacts { firstName } deals { title } activities { subject } } } "
     "contacts(orderBy: {field: LAST_NAME, direction: DESC}) { nodes { name company { name } } } }", {}),
    ("{ pipelines { name stages { name deals(first: 3) { title stage { name } } } } }", {}),
    ("{ activities(filter: {kind: [TASK, CALL]}) { nodes { kind dueDate done } } }", {}),
    ("{ products(filter: {active: true}, orderBy: {field: UNIT_PRICE, direction: DESC}) { nodes { sku unitPrice } } "
     "dealLineItems { totalCount nodes { lineTotal product { name } deal { title } } } }", {}),
    ("{ deals(filter: {search: \"zoë\"}) { nodes { title } } a: deals(filter: {search: \"\\\\\"}) { totalCount } "
     "b: deals(filter: {amountMin: \"100\", amountMax: \"100.00\", status: [OPEN]}) { totalCount nodes { amount } } }",
     {}),
    # mixing planned and executed root fields, and abstract types
    ("{ me { id name } deals(first: 2) { nodes { id } } tenant { slug } members { name } }", {}),
    ("query($id: ID!) { node(id: $id) { __typename id ... on Deal { title company { name } } ... on Company { name } "
     "... on Contact { name } } }", {}),
    # errors: nested non-null list, nullable root, bad arguments, bad ids
    ("{ deals(first: 2) { edges { node { id activities(first: 51) { id } } } } }", {}),
    ("query($id: ID!) { deal(id: $id) { id activities(first: 99) { id } } companies { totalCount } }", {}),
    ("{ node(id: \"garbage\") { id } deals(first: 1) { totalCount } }", {}),
    ("{ deals(first: 1, last: 1) { totalCount } }", {}),
    ("{ deals(after: \"garbage\") { totalCount } }", {}),
    ("{ deals(filter: {amountMin: \"5\", amountMax: \"1\"}) { totalCount } }", {}),
    ("{ deals(filter: {amountMin: \"1e309\"}) { totalCount } }", {}),
    ("query($id: ID!) { deal(id: $id) { id } company(id: $id) { id } }", {}),
    ("{ auditEvents(first: 3) { nodes { action } } deals(first: 1) { nodes { id } } }", {}),
    # field rules (HIDDEN_FROM_VIEWERS): hidden fields read, filtered, sorted, searched and measured
    ("{ a: deals(filter: {search: \"x.example\"}) { totalCount nodes { title amount contact { email } } } "
     "b: contacts(filter: {search: \"p1@\"}) { totalCount } c: products { nodes { sku unitPrice } } }", {}),
    ("{ deals(orderBy: {field: AMOUNT}) { totalCount } }", {}),
    ("{ products(orderBy: {field: UNIT_PRICE}) { nodes { sku } } }", {}),
    ("{ dealsAggregate(groupBy: [CURRENCY]) { groups { count currency amount { sum } } } }", {}),
    ("{ dealsAggregate(groupBy: [CURRENCY]) { groups { count currency } } deals { nodes { title currency } } }", {}),
    ("query($id: ID!) { node(id: $id) { ... on Deal { amount activities { body } } ... on Activity { body } "
     "... on Contact { email deals(first: 2) { amount } } } }", {}),
    # custom fields: every value type, one by key (also unknown, deleted and malformed keys), filters, orderings
    (CUSTOM + "{ deals(first: 50) { nodes { id ...C } } companies { nodes { customFields { key label "
     "... on TextValue { t: text } } x: customField(key: \"segment\") { __typename } } } "
     "contacts { nodes { customFields { __typename ... on BooleanValue { boolean } } } } }", {}),
    ("query($k: String!) { deals(first: 20) { nodes { one: customField(key: $k) { key type ... on NumberValue { "
     "number } ... on SelectValue { option } } } } }", {"k": "score"}),
    ("query($k: String!) { deals(first: 20) { nodes { one: customField(key: $k) { key } } } }", {"k": "gone"}),
    ("query($k: String!) { deals(first: 20) { nodes { one: customField(key: $k) { key } } } }", {"k": "Not a key"}),
    ("query($id: ID!) { node(id: $id) { ... on Deal { customFields { key ... on UserValue { userId user { name } } } } "
     "... on Company { customField(key: \"segment\") { label } } } }", {}),
    ("{ deals(filter: {custom: [{key: \"tier\", text: \"gold\"}]}) { totalCount nodes { title } } "
     "a: deals(filter: {custom: [{key: \"score\", op: GTE, number: \"1\"}, "
     "{key: \"score\", op: LT, number: \"12.5\"}]}) { totalCount } "
     "b: deals(filter: {custom: [{key: \"score\", number: \"12.50\"}]}) { totalCount } "
     "c: deals(filter: {custom: [{key: \"tags\", op: CONTAINS, text: \"a\"}]}) { totalCount } "
     "d: deals(filter: {custom: [{key: \"notes\", op: CONTAINS, text: \"ZOË\"}]}) { totalCount } "
     "e: deals(filter: {custom: [{key: \"tier\", op: IN, values: [\"gold\", \"bronze\"]}]}) { totalCount } "
     "f: deals(filter: {custom: [{key: \"renewal\", op: GT, date: \"2027-02-01\"}]}) { totalCount } "
     "g: deals(filter: {custom: [{key: \"budget\", op: GTE, number: \"10\", currency: \"EUR\"}]}) { totalCount } "
     "h: deals(filter: {custom: [{key: \"signed\", boolean: false}]}) { totalCount } "
     "i: deals(filter: {custom: [{key: \"gone\", text: \"hidden 1\"}]}) { totalCount } "
     "j: deals(filter: {custom: [{key: \"score\", text: \"1\"}]}) { totalCount } }", {}),
    ("{ deals(filter: {custom: [{key: \"score\", op: GT}]}) { totalCount } }", {}),
    ("{ deals(filter: {custom: [{key: \"score\", op: IN, number: \"1\"}]}) { totalCount } }", {}),
    ("{ deals(orderBy: {custom: \"Bad\"}) { totalCount } }", {}),
    # custom field rules (score and segment hidden from viewers): definitions read, values withheld
    ("{ deals(first: 5) { nodes { customFields { __typename key label type } } } companies { nodes { "
     "customFields { key } } } }", {}),
    ("{ deals(first: 5) { nodes { score: customField(key: \"score\") { key } tier: customField(key: \"tier\") { "
     "... on SelectValue { option } } } } }", {}),
    ("{ deals(orderBy: {custom: \"score\"}) { totalCount } a: deals(filter: {custom: [{key: \"tier\", "
     "text: \"gold\"}, {key: \"score\", op: GT, number: \"0\"}]}) { totalCount } }", {}),
    ("{ dealsAggregate(filter: {custom: [{key: \"score\", op: GT, number: \"0\"}]}) { groups { count } } }", {}),
    # aggregates over custom fields (executed; planned lists beside them; measuring score is FORBIDDEN for viewers)
    ("{ dealsAggregate(groupBy: [CURRENCY], groupByCustom: [\"tier\", \"signed\", \"champion\"], "
     "measureCustom: [\"score\", \"budget\"]) { groupCount groups { count currency "
     "customField(key: \"tier\") { label ... on SelectValue { option } } "
     "c: customField(key: \"champion\") { ... on UserValue { user { name } } } "
     "customMeasure(key: \"budget\") { money { currency sum avg } } s: customMeasure(key: \"score\") { "
     "number { count sum avg min max } } } } deals(first: 3) { nodes { title customField(key: \"tier\") { key } } } }",
     {}),
    ("{ dealsAggregate(groupByCustom: [\"tier\", \"champion\"], measureCustom: [\"budget\"]) { groups { count "
     "customField(key: \"champion\") { ... on UserValue { userId } } customMeasure(key: \"budget\") { money { "
     "sum } } } } deals(first: 2) { nodes { title } } }", {}),
    ("{ dealsAggregate(groupByCustom: [\"gone\"]) { groupCount } deals(first: 1) { totalCount } }", {}),
    ("{ deals(first: 30, orderBy: {custom: \"score\", direction: DESC}) { edges { cursor node { title "
     "customField(key: \"score\") { ... on NumberValue { number } } } } pageInfo { endCursor } } "
     "a: deals(orderBy: {custom: \"gone\"}) { edges { cursor } } }", {}),
]


@pytest.mark.parametrize("case", range(len(CHOSEN)))
async def test_chosen_queries_answer_alike(clients: tuple[httpx.AsyncClient, httpx.AsyncClient], world: World,
                                           case: int, caplog: pytest.LogCaptureFixture) -> None:
    query, variables = CHOSEN[case]
    ids = [i for i in world.ids if len(i) < 60]
    with no_planner_faults(caplog):
        for role in (Role.OWNER, Role.MEMBER, Role.VIEWER):
            for record_id in ([None] if "$id" not in query else ids[:: max(1, len(ids) // 12)]):
                given = {**variables, **({"id": record_id} if record_id else {})}
                planned, executed = await both(clients, world.tenant.token(role), query, given)
                same(planned, executed, query, given)


async def test_pages_of_a_connection_walk_alike(clients: tuple[httpx.AsyncClient, httpx.AsyncClient],
                                                world: World) -> None:
    """Cursors of either path page the other: forward and backward through every ordering."""
    orderings = [f"field: {name}" for name in ("CREATED_AT", "UPDATED_AT", "AMOUNT", "TITLE", "EXPECTED_CLOSE_DATE")]
    orderings += [f'custom: "{key}"' for key in ("score", "renewal", "tier", "budget", "signed", "tags", "gone")]
    for ordering in orderings:
        for direction in ("ASC", "DESC"):
            for forward in (True, False):
                cursor: str | None = None
                while True:
                    size, bound = ("first", "after") if forward else ("last", "before")
                    query = (f"query($c: String) {{ deals({size}: 3, {bound}: $c, orderBy: {{{ordering}, "
                             f"direction: {direction}}}) {{ edges {{ cursor node {{ id }} }} pageInfo {{ hasNextPage "
                             "hasPreviousPage startCursor endCursor } } }")
                    planned, executed = await both(clients, world.token, query, {"c": cursor})
                    same(planned, executed, query, {"c": cursor})
                    page = json.loads(planned)["data"]["deals"]
                    more = page["pageInfo"]["hasNextPage" if forward else "hasPreviousPage"]
                    if not more:
                        break
                    cursor = page["pageInfo"]["endCursor" if forward else "startCursor"]


async def test_a_planned_dashboard_is_four_statements_on_the_wire(settings: Settings, world: World) -> None:
    """The plan path is taken and lean: BEGIN, the statement that sets the tenant and checks the
    membership, the one plan statement, COMMIT, whatever the page size (counted on the wire)."""
    async with wired_app(settings, plans=True) as app, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://p.test") as client:
        wire: WireCounter = app.state.wire
        counts = []
        for size in (1, 5, 50):
            dashboard = RECORD + f"{{ deals(first: {size}) {{ totalCount edges {{ cursor node {{ ...D }} }} }} }}"
            body = await gql(client, dashboard, token=world.token)  # warm: types, route, prepared statements
            assert not body.get("errors"), body
            with wire.recording() as statements:
                body = await gql(client, dashboard, token=world.token)
            assert len(body["data"]["deals"]["edges"]) == min(size, 13)  # 14, one in the trash
            assert statements[0] == "BEGIN;" and "atrium_enter" in statements[1], statements
            assert "json_build_object" in statements[2] and statements[2].endswith("AS r0"), statements
            assert statements[3] == "COMMIT;", statements
            counts.append(len(statements))
        assert counts == [4, 4, 4], counts


async def test_custom_fields_filters_and_orderings_are_planned(settings: Settings, world: World) -> None:
    """Custom field values, filters and orderings take the plan path: one statement on the wire."""
    query = CUSTOM + ('{ deals(first: 5, filter: {custom: [{key: "score", op: GT, number: "0"}]}, '
                      'orderBy: {custom: "renewal"}) { totalCount edges { cursor node { ...C } } } }')
    async with wired_app(settings, plans=True) as app, httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://p.test") as client:
        wire: WireCounter = app.state.wire
        body = await gql(client, query, token=world.token)
        assert not body.get("errors"), body
        with wire.recording() as statements:
            body = await gql(client, query, token=world.token)
        assert body["data"]["deals"]["edges"] and body["data"]["deals"]["edges"][0]["node"]["customFields"]
        assert len(statements) == 4 and "json_build_object" in statements[2], statements


def test_every_root_field_of_records_is_planned() -> None:
    """Every root query field answering records (a record, a list or connection of them, or ``node``)
    is marked for the planner where the planner looks (a marker on the wrong object plans nothing)."""
    from graphql import get_named_type
    from strawberry.types.base import get_object_definition

    from atrium.schema import Query
    from records.crm import BY_NAME

    query_type = schema._schema.query_type
    assert query_type is not None
    definition = get_object_definition(Query)
    assert definition is not None
    converter = schema.config.name_converter
    marked = {converter.get_graphql_name(f) for f in definition.fields
              if getattr(getattr(f.base_resolver, "wrapped_func", None), "planned", None) is not None}
    records = {name for name in BY_NAME if name != "Membership"}
    answering = set()
    for name, graphql_field in query_type.fields.items():
        named = get_named_type(graphql_field.type).name  # a record, a list of them, or <Record>Connection
        if named == "Node" or named.removesuffix("Connection") in records:
            answering.add(name)
    assert "node" in answering and "deals" in answering and "deal" in answering
    # Answered by resolvers of their own: the caller, the member list (users through memberships),
    # notes (their text is computed from the CRDT state in Python) and teams (the admin's short list,
    # like members; a team's record-level view is not a deal's).
    assert answering - {"me", "members", "notes", "teams"} == marked, answering ^ marked
