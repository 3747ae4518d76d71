"""Tenant isolation through the API: tenant B (as its OWNER, the strongest role) never reaches tenant A.

Every test makes two tenants with one of each record (``tests.crm.seed_crm``, names carrying a tag
unique to the tenant) and checks, for A's records by their global IDs, that B can neither read,
change, move, delete nor reference them, that B's lists, filters and searches never contain them,
and that nothing B tries leaves a trace in A's rows or an audit row. Each check that expects
nothing also shows that A itself does see the record, so none can pass vacuously.

Every test runs twice (the ``client`` fixture below): against the app as deployed (its own
filters and row-level security) and against an app whose database user is the superuser, for whom
RLS does not apply, so the application's filters alone must hold. ``test_rls.py`` does the
converse: RLS alone, with the application's filters taken away.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.ops.admin import add_user
from models.tables import (
    ACTIVITIES,
    AUDIT_EVENTS,
    COMPANIES,
    CONTACTS,
    DEALS,
    MEMBERSHIPS,
    PIPELINES,
    STAGES,
    Role,
)
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import Crm, create_company, create_contact, create_deal, gid, seed_crm, uuid_of

MakeTenant = Callable[..., Awaitable[TenantWorld]]


@pytest.fixture(params=["app-and-rls", "app-filters-only"])
async def client(request: pytest.FixtureRequest, app: Starlette,
                 app_without_rls: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the deployed app, then of the app with RLS out of the way (see the module docstring)."""
    target = app if request.param == "app-and-rls" else app_without_rls
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=target), base_url="http://atrium.test") as c:
        yield c


@dataclass(frozen=True)
class Side:
    """A tenant with its seeded records and its OWNER's token."""

    world: TenantWorld
    crm: Crm

    @property
    def token(self) -> str:
        return self.world.token(Role.OWNER)

    @property
    def owner_gid(self) -> str:
        return gid("User", self.world.users[Role.OWNER])


async def two_tenants(make_tenant: MakeTenant, client: httpx.AsyncClient) -> tuple[Side, Side]:
    """Tenants A and B, each seeded with one of every record."""
    a, b = await make_tenant("iso-a"), await make_tenant("iso-b")
    crm_a = await seed_crm(client, a.token(Role.OWNER), f"alpha{uuid.uuid4().hex[:8]}")
    crm_b = await seed_crm(client, b.token(Role.OWNER), f"bravo{uuid.uuid4().hex[:8]}")
    return Side(a, crm_a), Side(b, crm_b)


def record_id(crm: Crm, entity: str) -> str:
    """The global ID of ``crm``'s record of ``entity`` (``deal``, ``stage``, ...)."""
    record: dict[str, Any] = crm.stage if entity == "stage" else getattr(crm, entity)
    value: str = record["id"]
    return value


TABLES: dict[str, Table] = {
    "deal": DEALS, "company": COMPANIES, "contact": CONTACTS, "activity": ACTIVITIES, "stage": STAGES,
    "pipeline": PIPELINES,
}


async def db_row(admin_engine: AsyncEngine, table: Table, key: uuid.UUID) -> dict[str, Any] | None:
    """The row ``key`` of ``table`` as the table owner sees it (no RLS), or None."""
    async with admin_engine.connect() as conn:
        row = (await conn.execute(select(table).where(table.c.id == key))).first()
    return dict(row._mapping) if row is not None else None


async def audit_count(admin_engine: AsyncEngine, *, tenant_id: uuid.UUID | None = None,
                      entity_id: uuid.UUID | None = None) -> int:
    query = select(func.count()).select_from(AUDIT_EVENTS)
    if tenant_id is not None:
        query = query.where(AUDIT_EVENTS.c.tenant_id == tenant_id)
    if entity_id is not None:
        query = query.where(AUDIT_EVENTS.c.entity_id == entity_id)
    async with admin_engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


def assert_not_found(body: dict[str, Any], field: str, *secrets: str) -> None:
    """One NOT_FOUND error naming ``field``, no data, and none of ``secrets`` anywhere in the body."""
    assert codes(body) == ["NOT_FOUND"], body
    assert body["errors"][0]["extensions"].get("field") == field, body["errors"]
    assert body["data"] is None, body["data"]
    text = json.dumps(body)
    for secret in secrets:
        assert secret not in text, f"{secret!r} leaked in {text}"


# ---- reading by global ID ------------------------------------------------------------------------

READ_BY_ID = """
query($deal: ID!, $company: ID!, $contact: ID!, $pipeline: ID!, $stage: ID!, $activity: ID!, $user: ID!) {
  deal(id: $deal) { id title }
  company(id: $company) { id name }
  contact(id: $contact) { id email }
  pipeline(id: $pipeline) { id name }
  dealNode: node(id: $deal) { id }
  companyNode: node(id: $company) { id }
  contactNode: node(id: $contact) { id }
  pipelineNode: node(id: $pipeline) { id }
  stageNode: node(id: $stage) { id }
  activityNode: node(id: $activity) { id }
  userNode: node(id: $user) { id }
}"""


def read_vars(side: Side) -> dict[str, str]:
    crm = side.crm
    return {"deal": crm.deal["id"], "company": crm.company["id"], "contact": crm.contact["id"],
            "pipeline": crm.pipeline["id"], "stage": crm.stage["id"], "activity": crm.activity["id"],
            "user": side.owner_gid}


async def test_other_tenants_records_read_by_id_are_null(make_tenant: MakeTenant, client: httpx.AsyncClient) -> None:
    a, b = await two_tenants(make_tenant, client)
    own = data_or_fail(await gql(client, READ_BY_ID, read_vars(a), token=a.token))
    assert all(value is not None for value in own.values()), own

    for role in Role:
        body = await gql(client, READ_BY_ID, read_vars(a), token=b.world.token(role))
        assert data_or_fail(body) == dict.fromkeys(own), (role, body)
        assert a.crm.tag not in json.dumps(body)


# ---- updating --------------------------------------------------------------------------------------

UPDATES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deal": ("updateDeal", "DealPatch", {"title": "taken over", "amount": "1.00", "status": "LOST"}),
    "company": ("updateCompany", "CompanyPatch", {"name": "taken over", "domain": "evil.example"}),
    "contact": ("updateContact", "ContactPatch", {"lastName": "taken over", "email": "x@evil.example"}),
    "activity": ("updateActivity", "ActivityPatch", {"subject": "taken over", "done": True}),
    "stage": ("updateStage", "StagePatch", {"name": "taken over", "probability": "0.01", "position": 9}),
    "pipeline": ("updatePipeline", "PipelinePatch", {"name": "taken over"}),
}


@pytest.mark.parametrize("entity", list(UPDATES))
@pytest.mark.parametrize("expected_version", [None, 1, 99])
async def test_updating_other_tenants_record_is_not_found_and_changes_nothing(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, entity: str,
    expected_version: int | None,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    mutation, patch, values = UPDATES[entity]
    target = record_id(a.crm, entity)
    key = uuid_of(target)
    before = await db_row(admin_engine, TABLES[entity], key)
    assert before is not None and before["tenant_id"] == a.world.id
    audits_b = await audit_count(admin_engine, tenant_id=b.world.id)
    audits_target = await audit_count(admin_engine, entity_id=key)

    body = await gql(client, f"mutation($id: ID!, $input: {patch}!, $v: Int) "
                             f"{{ {mutation}(id: $id, input: $input, expectedVersion: $v) {{ id }} }}",
                     {"id": target, "input": values, "v": expected_version}, token=b.token)

    # NOT_FOUND, never VERSION_CONFLICT (which would confirm the record and carry its current state).
    assert_not_found(body, "id", a.crm.tag)
    assert await db_row(admin_engine, TABLES[entity], key) == before
    assert await audit_count(admin_engine, tenant_id=b.world.id) == audits_b
    assert await audit_count(admin_engine, entity_id=key) == audits_target
    # A still sees its record as it was.
    node = data_or_fail(await gql(client, "query($id: ID!) { node(id: $id) { id } }", {"id": target},
                                  token=a.token))["node"]
    assert node == {"id": target}


# ---- moving deals ------------------------------------------------------------------------------------

MOVE = "mutation($id: ID!, $stage: ID!) { moveDeal(id: $id, stageId: $stage) { id stage { id } } }"


async def test_moving_other_tenants_deal_is_not_found(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    own_stage_b = b.crm.pipeline["stages"][1]["id"]
    deal_a = await db_row(admin_engine, DEALS, uuid_of(a.crm.deal["id"]))
    audits_b = await audit_count(admin_engine, tenant_id=b.world.id)

    body = await gql(client, MOVE, {"id": a.crm.deal["id"], "stage": own_stage_b}, token=b.token)

    assert_not_found(body, "id", a.crm.tag)
    assert await db_row(admin_engine, DEALS, uuid_of(a.crm.deal["id"])) == deal_a
    assert await audit_count(admin_engine, tenant_id=b.world.id) == audits_b


async def test_moving_own_deal_into_other_tenants_stage_is_not_found(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    deal_b = await db_row(admin_engine, DEALS, uuid_of(b.crm.deal["id"]))
    audits_b = await audit_count(admin_engine, tenant_id=b.world.id)

    for stage in a.crm.pipeline["stages"]:
        body = await gql(client, MOVE, {"id": b.crm.deal["id"], "stage": stage["id"]}, token=b.token)
        assert_not_found(body, "stageId", a.crm.tag)

    assert await db_row(admin_engine, DEALS, uuid_of(b.crm.deal["id"])) == deal_b
    assert await audit_count(admin_engine, tenant_id=b.world.id) == audits_b
    # The same move within B works, so the refusal above was about the tenant, not the move.
    moved = data_or_fail(await gql(client, MOVE, {"id": b.crm.deal["id"], "stage": b.crm.pipeline["stages"][2]["id"]},
                                   token=b.token))["moveDeal"]
    assert moved["stage"]["id"] == b.crm.pipeline["stages"][2]["id"]


# ---- deleting ------------------------------------------------------------------------------------

DELETES = {"deal": "deleteDeal", "company": "deleteCompany", "contact": "deleteContact",
           "activity": "deleteActivity", "stage": "deleteStage", "pipeline": "deletePipeline"}


@pytest.mark.parametrize("entity", list(DELETES))
@pytest.mark.parametrize("expected_version", [None, 1])
async def test_deleting_other_tenants_record_is_not_found_and_keeps_it(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine, entity: str,
    expected_version: int | None,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    target = record_id(a.crm, entity)
    key = uuid_of(target)
    before = await db_row(admin_engine, TABLES[entity], key)
    assert before is not None
    audits_b = await audit_count(admin_engine, tenant_id=b.world.id)

    body = await gql(client, f"mutation($id: ID!, $v: Int) {{ {DELETES[entity]}(id: $id, expectedVersion: $v) "
                             f"{{ deletedId }} }}", {"id": target, "v": expected_version}, token=b.token)

    assert_not_found(body, "id", a.crm.tag)
    assert await db_row(admin_engine, TABLES[entity], key) == before
    assert await audit_count(admin_engine, tenant_id=b.world.id) == audits_b
    assert data_or_fail(await gql(client, "query($id: ID!) { node(id: $id) { id } }", {"id": target},
                                  token=a.token))["node"] == {"id": target}


# ---- members ---------------------------------------------------------------------------------------

async def test_managing_other_tenants_member_is_not_found(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    async with admin_engine.connect() as conn:
        memberships = (await conn.execute(select(MEMBERSHIPS).where(MEMBERSHIPS.c.tenant_id == a.world.id)
                                          .order_by(MEMBERSHIPS.c.id))).all()
    for role in Role:
        user = gid("User", a.world.users[role])
        body = await gql(client, "mutation($u: ID!) { updateMemberRole(userId: $u, role: VIEWER) { id role } }",
                         {"u": user}, token=b.token)
        assert_not_found(body, "userId", a.world.slug)
        body = await gql(client, "mutation($u: ID!) { removeMember(userId: $u) { deletedId } }", {"u": user},
                         token=b.token)
        assert_not_found(body, "userId", a.world.slug)
    async with admin_engine.connect() as conn:
        after = (await conn.execute(select(MEMBERSHIPS).where(MEMBERSHIPS.c.tenant_id == a.world.id)
                                    .order_by(MEMBERSHIPS.c.id))).all()
    assert after == memberships


async def test_members_and_me_show_only_own_tenant(make_tenant: MakeTenant, client: httpx.AsyncClient) -> None:
    a, b = await two_tenants(make_tenant, client)
    body = data_or_fail(await gql(client, "{ members { id email } me { email } tenant { id slug } }", token=b.token))
    assert {m["id"] for m in body["members"]} == {gid("User", u) for u in b.world.users.values()}
    assert all(b.world.slug in m["email"] for m in body["members"])
    assert body["me"]["email"] == f"owner@{b.world.slug}.example"
    assert body["tenant"] == {"id": gid("Tenant", b.world.id), "slug": b.world.slug}
    assert a.world.slug not in json.dumps(body)


# ---- referencing other tenants' records in own writes -------------------------------------------------

CREATE_DEAL = "mutation($input: DealInput!) { createDeal(input: $input) { id } }"


async def test_creating_deal_with_other_tenants_references_is_not_found(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    valid = {"title": "Cross", "amount": "10.00", "currency": "USD", "stageId": b.crm.stage["id"],
             "companyId": b.crm.company["id"], "contactId": b.crm.contact["id"], "ownerId": b.owner_gid}
    foreign = {"stageId": a.crm.stage["id"], "companyId": a.crm.company["id"], "contactId": a.crm.contact["id"],
               "ownerId": a.owner_gid}
    deals_before = await _count(admin_engine, DEALS)
    audits_b = await audit_count(admin_engine, tenant_id=b.world.id)

    for field, value in foreign.items():
        body = await gql(client, CREATE_DEAL, {"input": {**valid, field: value}}, token=b.token)
        assert_not_found(body, field, a.crm.tag)
    # Every member of A is unknown to B, whatever their role.
    for user in a.world.users.values():
        body = await gql(client, CREATE_DEAL, {"input": {**valid, "ownerId": gid("User", user)}}, token=b.token)
        assert_not_found(body, "ownerId", a.world.slug)

    assert await _count(admin_engine, DEALS) == deals_before
    assert await audit_count(admin_engine, tenant_id=b.world.id) == audits_b
    # The valid input itself is accepted: each refusal above was about the one foreign reference.
    data_or_fail(await gql(client, CREATE_DEAL, {"input": valid}, token=b.token))


async def test_linking_own_records_to_other_tenants_records_is_not_found(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    deal_b = await db_row(admin_engine, DEALS, uuid_of(b.crm.deal["id"]))
    contact_b = await db_row(admin_engine, CONTACTS, uuid_of(b.crm.contact["id"]))
    counts = {t.name: await _count(admin_engine, t) for t in (CONTACTS, ACTIVITIES, STAGES, AUDIT_EVENTS)}

    attempts: list[tuple[str, dict[str, Any], str]] = [
        ("mutation($id: ID!, $input: DealPatch!) { updateDeal(id: $id, input: $input) { id } }",
         {"id": b.crm.deal["id"], "input": {"companyId": a.crm.company["id"]}}, "companyId"),
        ("mutation($id: ID!, $input: DealPatch!) { updateDeal(id: $id, input: $input) { id } }",
         {"id": b.crm.deal["id"], "input": {"contactId": a.crm.contact["id"]}}, "contactId"),
        ("mutation($id: ID!, $input: DealPatch!) { updateDeal(id: $id, input: $input) { id } }",
         {"id": b.crm.deal["id"], "input": {"ownerId": a.owner_gid}}, "ownerId"),
        ("mutation($id: ID!, $input: ContactPatch!) { updateContact(id: $id, input: $input) { id } }",
         {"id": b.crm.contact["id"], "input": {"companyId": a.crm.company["id"]}}, "companyId"),
        ("mutation($input: ContactInput!) { createContact(input: $input) { id } }",
         {"input": {"firstName": "X", "lastName": "Y", "companyId": a.crm.company["id"]}}, "companyId"),
        ("mutation($input: ActivityInput!) { createActivity(input: $input) { id } }",
         {"input": {"kind": "NOTE", "subject": "x", "dealId": a.crm.deal["id"]}}, "dealId"),
        ("mutation($input: ActivityInput!) { createActivity(input: $input) { id } }",
         {"input": {"kind": "NOTE", "subject": "x", "contactId": a.crm.contact["id"]}}, "contactId"),
        ("mutation($input: ActivityInput!) { createActivity(input: $input) { id } }",
         {"input": {"kind": "NOTE", "subject": "x", "companyId": a.crm.company["id"]}}, "companyId"),
        ("mutation($input: ActivityInput!) { createActivity(input: $input) { id } }",
         {"input": {"kind": "NOTE", "subject": "x", "dealId": b.crm.deal["id"], "companyId": a.crm.company["id"]}},
         "companyId"),
        ("mutation($p: ID!) { createStage(pipelineId: $p, input: {name: \"x\", probability: \"0.1\"}) { id } }",
         {"p": a.crm.pipeline["id"]}, "pipelineId"),
    ]
    for document, variables, field in attempts:
        assert_not_found(await gql(client, document, variables, token=b.token), field, a.crm.tag)

    assert await db_row(admin_engine, DEALS, uuid_of(b.crm.deal["id"])) == deal_b
    assert await db_row(admin_engine, CONTACTS, uuid_of(b.crm.contact["id"])) == contact_b
    assert {t.name: await _count(admin_engine, t) for t in (CONTACTS, ACTIVITIES, STAGES, AUDIT_EVENTS)} == counts


async def _count(admin_engine: AsyncEngine, table: Table) -> int:
    async with admin_engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


# ---- lists, nested fields, filters, search --------------------------------------------------------

LISTS = """
{
  deals(first: 100) {
    totalCount
    nodes {
      id title
      stage { id name deals { id } pipeline { id } }
      pipeline { id name stages { id } }
      company { id name contacts { id } deals { id } activities { id } }
      contact { id email company { id } deals { id } activities { id } }
      owner { id email }
      activities { id subject deal { id } contact { id } company { id } actor { id } }
    }
  }
  companies(first: 100) { totalCount nodes { id name } }
  contacts(first: 100) { totalCount nodes { id lastName email } }
  activities(first: 100) { totalCount nodes { id subject } }
  pipelines { id name stages { id name deals { id title } } }
}"""


def collect_ids(value: Any) -> set[str]:
    """Every ``id`` anywhere in a response."""
    found: set[str] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "id" and isinstance(v, str):
                found.add(v)
            else:
                found |= collect_ids(v)
    elif isinstance(value, list):
        for item in value:
            found |= collect_ids(item)
    return found


def crm_ids(side: Side) -> set[str]:
    crm = side.crm
    return ({crm.pipeline["id"], crm.company["id"], crm.contact["id"], crm.deal["id"], crm.activity["id"]}
            | {s["id"] for s in crm.pipeline["stages"]} | {gid("User", u) for u in side.world.users.values()})


async def test_lists_and_nested_fields_hold_only_own_rows(make_tenant: MakeTenant, client: httpx.AsyncClient) -> None:
    a, b = await two_tenants(make_tenant, client)
    for me, other in ((b, a), (a, b)):
        body = data_or_fail(await gql(client, LISTS, token=me.token))
        for connection in ("deals", "companies", "contacts", "activities"):
            assert body[connection]["totalCount"] == 1, (connection, body[connection])
        assert len(body["pipelines"]) == 1
        ids = collect_ids(body)
        assert ids <= crm_ids(me), ids - crm_ids(me)
        assert not ids & crm_ids(other)
        text = json.dumps(body)
        assert me.crm.tag in text and other.crm.tag not in text


async def test_pipeline_summary_of_other_tenants_pipeline_is_not_found(
    make_tenant: MakeTenant, client: httpx.AsyncClient,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    query = "query($p: ID!) { pipelineSummary(pipelineId: $p) { stage { id name } currency count total } }"
    own = data_or_fail(await gql(client, query, {"p": a.crm.pipeline["id"]}, token=a.token))["pipelineSummary"]
    assert own == [{"stage": {"id": a.crm.stage["id"], "name": a.crm.stage["name"]}, "currency": "USD",
                    "count": 1, "total": "1234.50"}]
    for role in Role:
        body = await gql(client, query, {"p": a.crm.pipeline["id"]}, token=b.world.token(role))
        assert_not_found(body, "pipelineId", a.crm.tag)


FILTERS = """
query($deal: DealFilter!, $contact: ContactFilter!, $activity: ActivityFilter!, $entity: ID!) {
  deals(filter: $deal) { totalCount nodes { id } }
  contacts(filter: $contact) { totalCount nodes { id } }
  activities(filter: $activity) { totalCount nodes { id } }
  auditEvents(entityId: $entity) { totalCount nodes { id } }
}"""

def filter_vars(target: Side, deal_filter: str, activity_filter: str) -> dict[str, Any]:
    crm = target.crm
    deal_values = {"pipelineId": crm.pipeline["id"], "stageId": crm.stage["id"], "companyId": crm.company["id"],
                   "contactId": crm.contact["id"], "ownerId": target.owner_gid}
    activity_values = {"dealId": crm.deal["id"], "contactId": crm.contact["id"], "companyId": crm.company["id"]}
    return {"deal": {deal_filter: deal_values[deal_filter]}, "contact": {"companyId": crm.company["id"]},
            "activity": {activity_filter: activity_values[activity_filter]}, "entity": crm.deal["id"]}


@pytest.mark.parametrize(("deal_filter", "activity_filter"), [
    ("pipelineId", "dealId"), ("stageId", "contactId"), ("companyId", "companyId"), ("contactId", "dealId"),
    ("ownerId", "contactId"),
])
async def test_filtering_by_other_tenants_ids_matches_nothing(
    make_tenant: MakeTenant, client: httpx.AsyncClient, deal_filter: str, activity_filter: str,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    variables = filter_vars(a, deal_filter, activity_filter)
    own = data_or_fail(await gql(client, FILTERS, variables, token=a.token))
    assert [own[k]["totalCount"] for k in ("deals", "contacts", "activities", "auditEvents")] == [1, 1, 1, 1], own

    body = data_or_fail(await gql(client, FILTERS, variables, token=b.token))
    assert body == {k: {"totalCount": 0, "nodes": []} for k in ("deals", "contacts", "activities", "auditEvents")}


SEARCH = """
query($term: String!) {
  deals(filter: {search: $term}) { totalCount nodes { id title } }
  companies(filter: {search: $term}) { totalCount nodes { id name } }
  contacts(filter: {search: $term}) { totalCount nodes { id email } }
}"""


async def test_searching_for_other_tenants_names_finds_nothing(
    make_tenant: MakeTenant, client: httpx.AsyncClient,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    terms = [a.crm.tag, a.crm.company["name"], a.crm.contact["email"], a.crm.contact["lastName"],
             a.crm.deal["title"], f"{a.crm.tag}.example"]
    for term in terms:
        own = data_or_fail(await gql(client, SEARCH, {"term": term}, token=a.token))
        assert own["deals"]["totalCount"] >= 1, (term, own)
        body = data_or_fail(await gql(client, SEARCH, {"term": term}, token=b.token))
        assert body == {k: {"totalCount": 0, "nodes": []} for k in ("deals", "companies", "contacts")}, term
    # Wildcards in the term do not widen it across tenants either.
    body = data_or_fail(await gql(client, SEARCH, {"term": "%"}, token=b.token))
    assert a.crm.tag not in json.dumps(body)


async def test_audit_events_show_only_own_tenant(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    query = "{ auditEvents(first: 100) { totalCount nodes { entityId entityType diff actor { id } } } }"
    for role in (Role.ADMIN, Role.OWNER):
        body = data_or_fail(await gql(client, query, token=b.world.token(role)))["auditEvents"]
        assert body["totalCount"] == await audit_count(admin_engine, tenant_id=b.world.id)
        assert body["totalCount"] == len(body["nodes"]) > 0
        assert {n["entityId"] for n in body["nodes"]} <= crm_ids(b)
        assert {n["actor"]["id"] for n in body["nodes"]} == {b.owner_gid}
        text = json.dumps(body)
        assert b.crm.tag in text and a.crm.tag not in text
    # Narrowed to one of A's records, B's log is empty.
    body = data_or_fail(await gql(client, "query($e: ID!) { auditEvents(entityId: $e) { totalCount } }",
                                  {"e": a.crm.deal["id"]}, token=b.token))
    assert body["auditEvents"]["totalCount"] == 0


# ---- concurrency ---------------------------------------------------------------------------------

DASHBOARD = """
query($otherDeal: ID!, $otherCompany: ID!, $otherContact: ID!, $ownDeal: ID!) {
  tenant { slug }
  me { email }
  members { email }
  deals(first: 50) {
    totalCount
    nodes {
      title
      company { name contacts { email } }
      contact { email company { name } }
      owner { email }
      stage { name pipeline { name } }
      activities(first: 3) { subject actor { email } }
    }
  }
  companies(first: 50) { nodes { name deals { title } activities { subject } } }
  pipelines { name stages { name deals { title } } }
  foreignDeal: deal(id: $otherDeal) { title }
  foreignCompany: company(id: $otherCompany) { name }
  foreignContact: node(id: $otherContact) { id }
  ownDeal: node(id: $ownDeal) { ... on Deal { title company { name } } }
}"""


async def test_concurrent_requests_of_two_tenants_never_share_results(
    make_tenant: MakeTenant, client: httpx.AsyncClient,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    # More records per tenant, each with a distinct company, so every batch has several keys.
    for side in (a, b):
        for i in range(5):
            company = await create_company(client, side.token, name=f"Co{i} {side.crm.tag}")
            contact = await create_contact(client, side.token, last_name=f"C{i} {side.crm.tag}",
                                           email=f"c{i}@{side.crm.tag}.example", company_id=company["id"])
            await create_deal(client, side.token, side.crm.pipeline["stages"][i % 3]["id"], company_id=company["id"],
                              contact_id=contact["id"], title=f"D{i} {side.crm.tag}")

    def request(me: Side, other: Side) -> Awaitable[dict[str, Any]]:
        return gql(client, DASHBOARD, {"otherDeal": other.crm.deal["id"], "otherCompany": other.crm.company["id"],
                                       "otherContact": other.crm.contact["id"], "ownDeal": me.crm.deal["id"]},
                   token=me.token)

    sides = [(a, b) if i % 2 == 0 else (b, a) for i in range(40)]
    bodies = await asyncio.gather(*(request(me, other) for me, other in sides))

    for (me, other), body in zip(sides, bodies, strict=True):
        data = data_or_fail(body)
        assert data["tenant"]["slug"] == me.world.slug
        assert data["deals"]["totalCount"] == 6
        assert data["foreignDeal"] is None and data["foreignCompany"] is None and data["foreignContact"] is None
        assert data["ownDeal"] == {"title": me.crm.deal["title"], "company": {"name": me.crm.company["name"]}}
        text = json.dumps(data)
        assert other.crm.tag not in text and other.world.slug not in text
        assert text.count(me.crm.tag) > 30


# ---- identity: the tenant comes from the credential only ---------------------------------------------

WHO = "{ tenant { id slug } deals { nodes { id } } members { id } }"


async def test_tenant_hints_in_headers_or_variables_are_ignored(
    make_tenant: MakeTenant, client: httpx.AsyncClient,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    hints = {"x-tenant-id": str(a.world.id), "x-tenant": a.world.slug, "x-atrium-tenant": str(a.world.id),
             "tenant": str(a.world.id)}
    hints_in_body = {"tenantId": gid("Tenant", a.world.id), "tenant_id": str(a.world.id), "tenant": a.world.slug}
    response = await client.post("/graphql", json={"query": WHO, "variables": hints_in_body,
                                                   "extensions": hints_in_body},
                                 headers={**hints, "authorization": f"Bearer {b.token}"})
    body = data_or_fail(response.json())
    assert body["tenant"] == {"id": gid("Tenant", b.world.id), "slug": b.world.slug}
    assert {n["id"] for n in body["deals"]["nodes"]} == {b.crm.deal["id"]}
    assert {m["id"] for m in body["members"]} == {gid("User", u) for u in b.world.users.values()}

    anonymous = await gql(client, WHO, hints_in_body, headers=hints)
    assert codes(anonymous) == ["UNAUTHENTICATED"] * len(anonymous["errors"]) and anonymous["errors"]
    assert a.crm.tag not in json.dumps(anonymous)


async def test_a_user_in_two_tenants_sees_each_only_through_its_token(
    make_tenant: MakeTenant, client: httpx.AsyncClient, admin_engine: AsyncEngine,
) -> None:
    a, b = await two_tenants(make_tenant, client)
    password = "correct horse battery staple"
    email = f"shared-{uuid.uuid4().hex[:8]}@example.com"
    user = await add_user(admin_engine, a.world.id, email, "Shared", Role.OWNER, password=password)
    assert await add_user(admin_engine, b.world.id, email, "Shared", Role.VIEWER, password=password) == user

    login = ("mutation($e: String!, $p: String!, $t: String!) "
             "{ login(email: $e, password: $p, tenant: $t) { token user { role } tenant { slug } } }")
    for me, other, role in ((a, b, "OWNER"), (b, a, "VIEWER")):
        payload = data_or_fail(await gql(client, login, {"e": email, "p": password, "t": me.world.slug}))["login"]
        assert payload["tenant"] == {"slug": me.world.slug} and payload["user"] == {"role": role}
        body = data_or_fail(await gql(client, LISTS, token=payload["token"]))
        assert collect_ids(body) <= crm_ids(me)
        assert other.crm.tag not in json.dumps(body)
        read = data_or_fail(await gql(client, READ_BY_ID, read_vars(other), token=payload["token"]))
        assert set(read.values()) == {None}

    # A user of B only cannot log in to A, whatever password they have.
    outsider = f"outsider-{uuid.uuid4().hex[:8]}@example.com"
    await add_user(admin_engine, b.world.id, outsider, "Outsider", Role.OWNER, password=password)
    body = await gql(client, login, {"e": outsider, "p": password, "t": a.world.slug})
    assert codes(body) == ["UNAUTHENTICATED"]


async def test_token_of_a_non_member_reads_nothing_of_the_tenant(
    make_tenant: MakeTenant, client: httpx.AsyncClient,
) -> None:
    """A validly signed token naming a tenant its user does not belong to (e.g. a member removed
    since the token was issued) must not read that tenant's data."""
    _, b = await two_tenants(make_tenant, client)
    member = b.world.token(Role.MEMBER)
    assert data_or_fail(await gql(client, "{ deals { totalCount } }", token=member))["deals"]["totalCount"] == 1

    removed = await gql(client, "mutation($u: ID!) { removeMember(userId: $u) { deletedId } }",
                        {"u": gid("User", b.world.users[Role.MEMBER])}, token=b.token)
    data_or_fail(removed)

    body = await gql(client, "{ deals { nodes { id title } } companies { nodes { name } } }", token=member)
    assert b.crm.tag not in json.dumps(body), f"a removed member still reads the workspace: {body}"
    assert codes(body) and set(codes(body)) == {"UNAUTHENTICATED"}, body
