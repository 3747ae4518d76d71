"""CRM records through the API: create, read, update, delete, relations, summary, and their audit trail.

Every mutation must write exactly one ``audit_events`` row per changed record, in the same
transaction as the change (the audit row's ``xmin`` is the transaction id that wrote the record),
carrying the caller, the action, the entity, a diff and the request id the
client sent as ``X-Request-ID``. A change that alters nothing writes nothing and keeps the version.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
from sqlalchemy import Table, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from models.tables import ACTIVITIES, AUDIT_EVENTS, COMPANIES, CONTACTS, DEALS, PIPELINES, STAGES, Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_activity, create_company, create_contact, gid, uuid_of

MakeTenant = Callable[..., Awaitable[TenantWorld]]

COMPANY_FIELDS = "id name domain version createdAt updatedAt"
CONTACT_FIELDS = "id firstName lastName name email phone title version company { id name }"
DEAL_FIELDS = """
id title amount currency status expectedCloseDate version createdAt updatedAt
stage { id name } pipeline { id name } company { id name } contact { id name } owner { id name role }
"""
STAGE_FIELDS = "id name position probability version pipeline { id }"
PIPELINE_FIELDS = f"id name version stages {{ {STAGE_FIELDS} }}"
ACTIVITY_FIELDS = """
id kind subject body occurredAt dueDate done version deal { id } contact { id } company { id } actor { id }
"""


def request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


class Api:
    """One tenant's client: every call sends a fresh X-Request-ID and remembers it."""

    def __init__(self, client: httpx.AsyncClient, tenant: TenantWorld, role: Role = Role.ADMIN) -> None:
        self.client = client
        self.tenant = tenant
        self.role = role
        self.last_request_id = ""

    @property
    def token(self) -> str:
        return self.tenant.token(self.role)

    @property
    def user_id(self) -> uuid.UUID:
        return self.tenant.users[self.role]

    async def raw(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        self.last_request_id = request_id()
        body = await gql(self.client, query, variables, token=self.token,
                         headers={"x-request-id": self.last_request_id})
        assert body["_status"] == 200, body
        return body

    async def ok(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        return data_or_fail(await self.raw(query, variables))


async def audit_rows(engine: AsyncEngine, tenant: TenantWorld, entity_id: uuid.UUID | None = None) -> list[Any]:
    """The tenant's audit rows (of one entity when given), oldest first."""
    query = select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == tenant.id)
    if entity_id is not None:
        query = query.where(AUDIT_EVENTS.c.entity_id == entity_id)
    async with engine.connect() as conn:
        return list((await conn.execute(query.order_by(AUDIT_EVENTS.c.occurred_at, AUDIT_EVENTS.c.id))).all())


async def db_row(engine: AsyncEngine, table: Table, tenant: TenantWorld, id_: uuid.UUID) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(table).where(table.c.tenant_id == tenant.id, table.c.id == id_))).first()


async def writer(engine: AsyncEngine, table: Table, id_: uuid.UUID) -> str:
    """The id of the transaction that wrote the current version of row ``id_`` (its ``xmin``)."""
    async with engine.connect() as conn:
        return str((await conn.execute(text(f"SELECT xmin::text FROM {table.name} WHERE id = :id"),
                                       {"id": id_})).scalar_one())


async def assert_same_transaction(engine: AsyncEngine, table: Table, id_: uuid.UUID, audit: Any) -> None:
    """The audit row was written by the transaction that wrote the record's current version."""
    assert await writer(engine, AUDIT_EVENTS, audit.id) == await writer(engine, table, id_)


def assert_audit(row: Any, api: Api, action: str, entity_type: str, entity_id: uuid.UUID) -> None:
    assert (row.action, row.entity_type, row.entity_id) == (action, entity_type, entity_id)
    assert row.actor_id == api.user_id
    assert row.request_id == api.last_request_id


async def new_pipeline(api: Api, stages: list[tuple[str, str]], name: str = "Sales") -> dict[str, Any]:
    data = await api.ok(f"mutation($input: PipelineInput!) {{ createPipeline(input: $input) {{ {PIPELINE_FIELDS} }} }}",
                        {"input": {"name": name, "stages": [{"name": n, "probability": p} for n, p in stages]}})
    pipeline: dict[str, Any] = data["createPipeline"]
    return pipeline


async def new_deal(api: Api, stage_id: str, **fields: Any) -> dict[str, Any]:
    values = {"title": "Deal", "amount": "100", "currency": "USD", "stageId": stage_id, **fields}
    data = await api.ok(f"mutation($input: DealInput!) {{ createDeal(input: $input) {{ {DEAL_FIELDS} }} }}",
                        {"input": values})
    deal: dict[str, Any] = data["createDeal"]
    return deal


async def new_activity(api: Api, **fields: Any) -> dict[str, Any]:
    values = {"kind": "NOTE", "subject": "Note", **fields}
    data = await api.ok(f"mutation($input: ActivityInput!) {{ createActivity(input: $input) {{ {ACTIVITY_FIELDS} }} }}",
                        {"input": values})
    activity: dict[str, Any] = data["createActivity"]
    return activity


# ---- companies -----------------------------------------------------------------------------------

UPDATE_COMPANY = f"""
mutation($id: ID!, $input: CompanyPatch!, $v: Int) {{
  updateCompany(id: $id, input: $input, expectedVersion: $v) {{ {COMPANY_FIELDS} }}
}}"""


async def test_company_lifecycle_is_audited(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                            admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    member, admin = Api(client, tenant, Role.MEMBER), Api(client, tenant, Role.ADMIN)

    created = (await member.ok(
        f"mutation($input: CompanyInput!) {{ createCompany(input: $input) {{ {COMPANY_FIELDS} }} }}",
        {"input": {"name": "  Acme  ", "domain": "ACME.example"}}))["createCompany"]
    assert (created["name"], created["domain"], created["version"]) == ("Acme", "acme.example", 1)
    key = uuid_of(created["id"])
    [audit] = await audit_rows(admin_engine, tenant, key)
    assert_audit(audit, member, "create", "Company", key)
    assert audit.diff["after"]["name"] == "Acme" and audit.diff["after"]["domain"] == "acme.example"
    assert set(audit.diff) == {"after"}
    await assert_same_transaction(admin_engine, COMPANIES, key, audit)

    read = (await member.ok(f"query($id: ID!) {{ company(id: $id) {{ {COMPANY_FIELDS} }} }}",
                            {"id": created["id"]}))["company"]
    assert read == created

    renamed = (await member.ok(UPDATE_COMPANY, {"id": created["id"], "input": {"name": "Acme Corp"}}))["updateCompany"]
    assert (renamed["name"], renamed["domain"], renamed["version"]) == ("Acme Corp", "acme.example", 2)
    assert dt.datetime.fromisoformat(renamed["updatedAt"]) > dt.datetime.fromisoformat(created["updatedAt"])
    assert renamed["createdAt"] == created["createdAt"]
    audits = await audit_rows(admin_engine, tenant, key)
    assert len(audits) == 2
    assert_audit(audits[1], member, "update", "Company", key)
    assert audits[1].diff == {"before": {"name": "Acme"}, "after": {"name": "Acme Corp"}}
    await assert_same_transaction(admin_engine, COMPANIES, key, audits[1])

    # Only the field that changes is in the diff.
    patch = {"name": "Acme Corp", "domain": "acme.test"}
    moved = (await member.ok(UPDATE_COMPANY, {"id": created["id"], "input": patch}))["updateCompany"]
    assert moved["version"] == 3
    audits = await audit_rows(admin_engine, tenant, key)
    assert audits[-1].diff == {"before": {"domain": "acme.example"}, "after": {"domain": "acme.test"}}

    # A patch equal to the record (after normalisation) writes nothing and keeps the version.
    patch = {"name": " Acme Corp ", "domain": "ACME.test"}
    same = (await member.ok(UPDATE_COMPANY, {"id": created["id"], "input": patch, "v": 3}))["updateCompany"]
    assert same == moved
    assert len(await audit_rows(admin_engine, tenant, key)) == 3

    deleted = (await admin.ok("mutation($id: ID!, $v: Int) { deleteCompany(id: $id, expectedVersion: $v) { "
                              "deletedId } }", {"id": created["id"], "v": 3}))["deleteCompany"]
    assert deleted == {"deletedId": created["id"]}
    assert (await member.ok("query($id: ID!) { company(id: $id) { id } }", {"id": created["id"]}))["company"] is None
    trashed = await db_row(admin_engine, COMPANIES, tenant, key)  # in the trash (tests/test_trash.py)
    assert trashed.deleted_at is not None and trashed.deleted_by == admin.user_id and trashed.version == 4
    audits = await audit_rows(admin_engine, tenant, key)
    assert len(audits) == 4
    assert_audit(audits[-1], admin, "trash", "Company", key)
    assert audits[-1].diff == {"after": {"deleted_at": trashed.deleted_at.isoformat(),
                                         "deleted_by": str(admin.user_id), "trash_batch": str(key)}}

    history = (await admin.ok("""query($id: ID!) { auditEvents(entityId: $id) { totalCount edges { node {
        action entityType entityId requestId diff actor { id } } } } }""", {"id": created["id"]}))["auditEvents"]
    nodes = [e["node"] for e in history["edges"]]
    assert history["totalCount"] == 4
    assert [n["action"] for n in nodes] == ["trash", "update", "update", "create"]
    assert [n["requestId"] for n in nodes] == [a.request_id for a in reversed(audits)]
    assert {n["entityId"] for n in nodes} == {created["id"]} and {n["entityType"] for n in nodes} == {"Company"}
    assert [n["actor"]["id"] for n in nodes] == [gid("User", admin.user_id)] + [gid("User", member.user_id)] * 3
    assert nodes[2]["diff"] == {"before": {"name": "Acme"}, "after": {"name": "Acme Corp"}}


async def test_audit_events_of_one_record_exclude_others(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.OWNER)
    first = await create_company(client, api.token, name="First")
    second = await create_company(client, api.token, name="Second")
    await api.ok(UPDATE_COMPANY, {"id": second["id"], "input": {"name": "Second!"}})
    events = (await api.ok("query($id: ID!) { auditEvents(entityId: $id) { nodes { action entityId } } }",
                           {"id": first["id"]}))["auditEvents"]["nodes"]
    assert events == [{"action": "create", "entityId": first["id"]}]
    all_events = (await api.ok("{ auditEvents { nodes { action entityId } } }"))["auditEvents"]["nodes"]
    assert all_events == [{"action": "update", "entityId": second["id"]},
                          {"action": "create", "entityId": second["id"]},
                          {"action": "create", "entityId": first["id"]}]


# ---- contacts ------------------------------------------------------------------------------------

async def test_contact_lifecycle_and_company_link(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                  admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.ADMIN)
    company = await create_company(client, api.token, name="Navy")
    create = f"mutation($input: ContactInput!) {{ createContact(input: $input) {{ {CONTACT_FIELDS} }} }}"
    contact = (await api.ok(create,
                            {"input": {"firstName": " Grace ", "lastName": "Hopper", "email": "grace@navy.example",
                                       "phone": "+1 555 0100", "title": "Rear Admiral", "companyId": company["id"]}}
                            ))["createContact"]
    assert contact == {"id": contact["id"], "firstName": "Grace", "lastName": "Hopper", "name": "Grace Hopper",
                       "email": "grace@navy.example", "phone": "+1 555 0100", "title": "Rear Admiral", "version": 1,
                       "company": {"id": company["id"], "name": "Navy"}}
    key = uuid_of(contact["id"])
    [audit] = await audit_rows(admin_engine, tenant, key)
    assert_audit(audit, api, "create", "Contact", key)
    assert audit.diff["after"]["company_id"] == str(uuid_of(company["id"]))

    listed = (await api.ok("query($id: ID!) { company(id: $id) { contacts { id name } } }", {"id": company["id"]}))
    assert listed["company"]["contacts"] == [{"id": contact["id"], "name": "Grace Hopper"}]

    update = f"""mutation($id: ID!, $input: ContactPatch!) {{
        updateContact(id: $id, input: $input) {{ {CONTACT_FIELDS} }} }}"""
    changed = (await api.ok(update, {"id": contact["id"], "input": {"email": "ghopper@navy.example", "phone": None}}
                            ))["updateContact"]
    assert (changed["email"], changed["phone"], changed["version"]) == ("ghopper@navy.example", None, 2)
    assert (await audit_rows(admin_engine, tenant, key))[-1].diff == {
        "before": {"email": "grace@navy.example", "phone": "+1 555 0100"},
        "after": {"email": "ghopper@navy.example", "phone": None}}

    unlinked = (await api.ok(update, {"id": contact["id"], "input": {"companyId": None}}))["updateContact"]
    assert unlinked["company"] is None and unlinked["version"] == 3
    audits = await audit_rows(admin_engine, tenant, key)
    assert_audit(audits[-1], api, "update", "Contact", key)
    assert audits[-1].diff == {"before": {"company_id": str(uuid_of(company["id"]))}, "after": {"company_id": None}}
    listed = await api.ok("query($id: ID!) { company(id: $id) { contacts { id } } }", {"id": company["id"]})
    assert listed["company"]["contacts"] == []

    patch = {"companyId": None, "firstName": "Grace"}
    noop = (await api.ok(update, {"id": contact["id"], "input": patch}))["updateContact"]
    assert noop["version"] == 3
    assert len(await audit_rows(admin_engine, tenant, key)) == 3

    await api.ok("mutation($id: ID!) { deleteContact(id: $id) { deletedId } }", {"id": contact["id"]})
    audits = await audit_rows(admin_engine, tenant, key)
    assert len(audits) == 4
    assert_audit(audits[-1], api, "trash", "Contact", key)
    assert (await api.ok("query($id: ID!) { contact(id: $id) { id } }", {"id": contact["id"]}))["contact"] is None


# ---- pipelines and stages ------------------------------------------------------------------------

async def test_pipeline_and_stage_lifecycle(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                            admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.ADMIN)
    pipeline = await new_pipeline(api, [("Lead", "0.1"), ("Proposal", "0.5"), ("Won", "1")])
    assert pipeline["version"] == 1
    assert [(s["name"], s["position"], Decimal(s["probability"]), s["version"]) for s in pipeline["stages"]] == [
        ("Lead", 0, Decimal("0.1"), 1), ("Proposal", 1, Decimal("0.5"), 1), ("Won", 2, Decimal("1"), 1)]
    assert {s["pipeline"]["id"] for s in pipeline["stages"]} == {pipeline["id"]}

    # One audit row per created record, all in the pipeline's transaction.
    audits = await audit_rows(admin_engine, tenant)
    assert sorted((a.entity_type, a.action) for a in audits) == [("Pipeline", "create")] + [("Stage", "create")] * 3
    assert {a.request_id for a in audits} == {api.last_request_id}
    for audit in audits:
        await assert_same_transaction(admin_engine, PIPELINES, uuid_of(pipeline["id"]), audit)
    assert {a.entity_id for a in audits} == {uuid_of(pipeline["id"])} | {uuid_of(s["id"]) for s in pipeline["stages"]}

    lead, proposal, won = pipeline["stages"]
    update_stage = f"""mutation($id: ID!, $input: StagePatch!, $v: Int) {{
        updateStage(id: $id, input: $input, expectedVersion: $v) {{ {STAGE_FIELDS} }} }}"""
    moved = (await api.ok(update_stage, {"id": won["id"], "input": {"position": 10}, "v": 1}))["updateStage"]
    assert (moved["position"], moved["version"]) == (10, 2)
    lost = (await api.ok(f"""mutation($p: ID!, $input: StageInput!) {{
        createStage(pipelineId: $p, input: $input) {{ {STAGE_FIELDS} }} }}""",
                         {"p": pipeline["id"], "input": {"name": "Lost", "probability": "0"}}))["createStage"]
    assert (lost["position"], lost["version"], lost["pipeline"]["id"]) == (11, 1, pipeline["id"])
    [lost_audit] = await audit_rows(admin_engine, tenant, uuid_of(lost["id"]))
    assert_audit(lost_audit, api, "create", "Stage", uuid_of(lost["id"]))

    renamed = (await api.ok(update_stage, {"id": lead["id"], "input": {"name": "Inbound", "probability": "0.15",
                                                                       "position": 20}}))["updateStage"]
    assert (renamed["name"], Decimal(renamed["probability"]), renamed["position"], renamed["version"]) == (
        "Inbound", Decimal("0.15"), 20, 2)
    lead_audits = await audit_rows(admin_engine, tenant, uuid_of(lead["id"]))
    assert lead_audits[-1].diff == {"before": {"name": "Lead", "probability": "0.1000", "position": 0},
                                    "after": {"name": "Inbound", "probability": "0.1500", "position": 20}}

    noop = (await api.ok(update_stage, {"id": lead["id"], "input": {"probability": "0.150"}}))["updateStage"]
    assert noop["version"] == 2 and len(await audit_rows(admin_engine, tenant, uuid_of(lead["id"]))) == 2

    read = (await api.ok(f"query($id: ID!) {{ pipeline(id: $id) {{ {PIPELINE_FIELDS} }} }}", {"id": pipeline["id"]}))
    assert [s["name"] for s in read["pipeline"]["stages"]] == ["Proposal", "Won", "Lost", "Inbound"]

    updated = (await api.ok("""mutation($id: ID!) { updatePipeline(id: $id, input: {name: "Enterprise"},
        expectedVersion: 1) { name version } }""", {"id": pipeline["id"]}))["updatePipeline"]
    assert updated == {"name": "Enterprise", "version": 2}
    assert (await audit_rows(admin_engine, tenant, uuid_of(pipeline["id"])))[-1].diff == {
        "before": {"name": "Sales"}, "after": {"name": "Enterprise"}}
    names = (await api.ok("{ pipelines { name } }"))["pipelines"]
    assert names == [{"name": "Enterprise"}]

    await api.ok("mutation($id: ID!) { deleteStage(id: $id, expectedVersion: 1) { deletedId } }",
                 {"id": proposal["id"]})
    assert (await api.ok("query($id: ID!) { node(id: $id) { id } }", {"id": proposal["id"]}))["node"] is None
    stage_audits = await audit_rows(admin_engine, tenant, uuid_of(proposal["id"]))
    assert [a.action for a in stage_audits] == ["create", "delete"]
    read = (await api.ok("query($id: ID!) { pipeline(id: $id) { stages { name } } }", {"id": pipeline["id"]}))
    assert [s["name"] for s in read["pipeline"]["stages"]] == ["Won", "Lost", "Inbound"]

    await api.ok("mutation($id: ID!) { deletePipeline(id: $id) { deletedId } }", {"id": pipeline["id"]})
    assert (await api.ok("query($id: ID!) { pipeline(id: $id) { id } }", {"id": pipeline["id"]}))["pipeline"] is None
    assert (await api.ok("{ pipelines { id } }"))["pipelines"] == []
    for stage in (won, lost, lead):
        assert await db_row(admin_engine, STAGES, tenant, uuid_of(stage["id"])) is None
    assert (await audit_rows(admin_engine, tenant, uuid_of(pipeline["id"])))[-1].action == "delete"


async def test_stage_or_pipeline_with_deals_cannot_be_deleted(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                              admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.OWNER)
    pipeline = await new_pipeline(api, [("Lead", "0.1"), ("Won", "1")])
    stage = pipeline["stages"][0]
    await new_deal(api, stage["id"])
    before = await audit_rows(admin_engine, tenant)

    body = await api.raw("mutation($id: ID!) { deleteStage(id: $id) { deletedId } }", {"id": stage["id"]})
    assert codes(body) == ["BAD_USER_INPUT"]
    assert body["errors"][0]["extensions"]["field"] == "id"
    body = await api.raw("mutation($id: ID!) { deletePipeline(id: $id) { deletedId } }", {"id": pipeline["id"]})
    assert codes(body) == ["BAD_USER_INPUT"]

    assert (await db_row(admin_engine, STAGES, tenant, uuid_of(stage["id"]))).version == 1
    assert await db_row(admin_engine, PIPELINES, tenant, uuid_of(pipeline["id"])) is not None
    assert await audit_rows(admin_engine, tenant) == before
    read = await api.ok("query($id: ID!) { pipeline(id: $id) { stages { name deals { title } } } }",
                        {"id": pipeline["id"]})
    assert read["pipeline"]["stages"] == [{"name": "Lead", "deals": [{"title": "Deal"}]}, {"name": "Won", "deals": []}]


# ---- deals ---------------------------------------------------------------------------------------

async def test_deal_lifecycle_and_relations(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                            admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.ADMIN)
    pipeline = await new_pipeline(api, [("Lead", "0.25"), ("Won", "1")], name="Sales")
    lead = pipeline["stages"][0]
    company = await create_company(client, api.token, name="Acme")
    contact = await create_contact(client, api.token, first_name="Grace", last_name="Hopper",
                                   email="grace@acme.example", company_id=company["id"])
    owner_id = gid("User", tenant.users[Role.MEMBER])

    deal = await new_deal(api, lead["id"], title="  Big one ", amount="1234.5", currency="eur",
                          companyId=company["id"], contactId=contact["id"], ownerId=owner_id,
                          expectedCloseDate="2030-06-30")
    assert {k: deal[k] for k in ("title", "amount", "currency", "status", "expectedCloseDate", "version")} == {
        "title": "Big one", "amount": "1234.50", "currency": "EUR", "status": "OPEN",
        "expectedCloseDate": "2030-06-30", "version": 1}
    assert deal["stage"] == {"id": lead["id"], "name": "Lead"}
    assert deal["pipeline"] == {"id": pipeline["id"], "name": "Sales"}
    assert deal["company"] == {"id": company["id"], "name": "Acme"}
    assert deal["contact"] == {"id": contact["id"], "name": "Grace Hopper"}
    assert deal["owner"] == {"id": owner_id, "name": f"Member of {tenant.slug}", "role": "MEMBER"}
    key = uuid_of(deal["id"])
    [audit] = await audit_rows(admin_engine, tenant, key)
    assert_audit(audit, api, "create", "Deal", key)
    assert audit.diff["after"]["amount"] == "1234.50" and audit.diff["after"]["currency"] == "EUR"
    assert audit.diff["after"]["owner_id"] == str(tenant.users[Role.MEMBER])

    # Without ownerId the caller owns the deal.
    mine = await new_deal(api, lead["id"], title="Small one")
    assert mine["owner"]["id"] == gid("User", api.user_id)
    assert (mine["company"], mine["contact"], mine["expectedCloseDate"]) == (None, None, None)

    # Activities, created out of order: deal.activities(first: 3) is the latest three, newest first.
    for day in (3, 1, 4, 2):
        await new_activity(api, kind="CALL", subject=f"Call {day}", dealId=deal["id"],
                           occurredAt=f"2025-01-0{day}T10:00:00+02:00")
    read = (await api.ok(f"""query($id: ID!) {{ deal(id: $id) {{ {DEAL_FIELDS}
        activities(first: 3) {{ subject occurredAt }} }} }}""", {"id": deal["id"]}))["deal"]
    assert [a["subject"] for a in read.pop("activities")] == ["Call 4", "Call 3", "Call 2"]
    assert read == deal

    nested = await api.ok("""query($c: ID!, $k: ID!, $s: ID!) {
        company(id: $c) { deals { id } contacts { id company { id } } }
        contact(id: $k) { company { id } deals { id } }
        stage: node(id: $s) { ... on Stage { deals { id } pipeline { id } } } }""",
                          {"c": company["id"], "k": contact["id"], "s": lead["id"]})
    assert nested["company"] == {"deals": [{"id": deal["id"]}],
                                 "contacts": [{"id": contact["id"], "company": {"id": company["id"]}}]}
    assert nested["contact"] == {"company": {"id": company["id"]}, "deals": [{"id": deal["id"]}]}
    assert nested["stage"] == {"deals": [{"id": mine["id"]}, {"id": deal["id"]}], "pipeline": {"id": pipeline["id"]}}

    update = f"""mutation($id: ID!, $input: DealPatch!, $v: Int) {{
        updateDeal(id: $id, input: $input, expectedVersion: $v) {{ {DEAL_FIELDS} }} }}"""
    updated = (await api.ok(update, {"id": deal["id"], "v": 1, "input": {
        "title": "Bigger one", "amount": "99.99", "expectedCloseDate": None, "status": "WON", "currency": "EUR"}}
                            ))["updateDeal"]
    assert {k: updated[k] for k in ("title", "amount", "currency", "status", "expectedCloseDate", "version")} == {
        "title": "Bigger one", "amount": "99.99", "currency": "EUR", "status": "WON", "expectedCloseDate": None,
        "version": 2}
    audits = await audit_rows(admin_engine, tenant, key)
    assert len(audits) == 2
    assert_audit(audits[1], api, "update", "Deal", key)
    assert audits[1].diff == {
        "before": {"title": "Big one", "amount": "1234.50", "expected_close_date": "2030-06-30", "status": "open"},
        "after": {"title": "Bigger one", "amount": "99.99", "expected_close_date": None, "status": "won"}}
    await assert_same_transaction(admin_engine, DEALS, key, audits[1])

    relinked = (await api.ok(update, {"id": deal["id"], "input": {"companyId": None, "contactId": None,
                                                                  "ownerId": None}}))["updateDeal"]
    assert (relinked["company"], relinked["contact"], relinked["owner"], relinked["version"]) == (None, None, None, 3)

    noop = (await api.ok(update, {"id": deal["id"], "v": 3, "input": {
        "title": " Bigger one ", "amount": "99.990", "currency": "eur", "status": "WON", "companyId": None}}
                         ))["updateDeal"]
    assert noop["version"] == 3 and noop["updatedAt"] == relinked["updatedAt"]
    assert len(await audit_rows(admin_engine, tenant, key)) == 3

    await api.ok("mutation($id: ID!) { deleteDeal(id: $id, expectedVersion: 3) { deletedId } }", {"id": deal["id"]})
    audits = await audit_rows(admin_engine, tenant, key)
    assert_audit(audits[-1], api, "trash", "Deal", key)
    assert audits[-1].diff["after"]["trash_batch"] == str(key)
    assert (await api.ok("query($id: ID!) { deal(id: $id) { id } }", {"id": deal["id"]}))["deal"] is None
    remaining = await api.ok("query($d: ID!) { activities(filter: {dealId: $d}) { totalCount } }", {"d": deal["id"]})
    assert remaining["activities"]["totalCount"] == 0


async def test_move_deal_changes_stage_and_pipeline(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                    admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.MEMBER)
    sales = await new_pipeline(api, [("Lead", "0.1"), ("Won", "1")], name="Sales")
    renewals = await new_pipeline(api, [("Due", "0.5"), ("Renewed", "1")], name="Renewals")
    deal = await new_deal(api, sales["stages"][0]["id"])
    move = f"""mutation($id: ID!, $s: ID!, $v: Int) {{
        moveDeal(id: $id, stageId: $s, expectedVersion: $v) {{ {DEAL_FIELDS} }} }}"""

    within = (await api.ok(move, {"id": deal["id"], "s": sales["stages"][1]["id"], "v": 1}))["moveDeal"]
    assert (within["stage"]["name"], within["pipeline"]["name"], within["version"]) == ("Won", "Sales", 2)

    across = (await api.ok(move, {"id": deal["id"], "s": renewals["stages"][0]["id"], "v": 2}))["moveDeal"]
    assert across["stage"] == {"id": renewals["stages"][0]["id"], "name": "Due"}
    assert across["pipeline"] == {"id": renewals["id"], "name": "Renewals"}
    assert across["version"] == 3
    key = uuid_of(deal["id"])
    audits = await audit_rows(admin_engine, tenant, key)
    assert len(audits) == 3
    assert_audit(audits[-1], api, "update", "Deal", key)
    assert audits[-1].diff == {
        "before": {"stage_id": str(uuid_of(sales["stages"][1]["id"])), "pipeline_id": str(uuid_of(sales["id"]))},
        "after": {"stage_id": str(uuid_of(renewals["stages"][0]["id"])), "pipeline_id": str(uuid_of(renewals["id"]))}}

    boards = await api.ok("""query($a: ID!, $b: ID!) {
        a: pipelineSummary(pipelineId: $a) { count } b: pipelineSummary(pipelineId: $b) { stage { name } count } }""",
                          {"a": sales["id"], "b": renewals["id"]})
    assert boards == {"a": [], "b": [{"stage": {"name": "Due"}, "count": 1}]}
    filtered = await api.ok("query($p: ID!) { deals(filter: {pipelineId: $p}) { totalCount } }", {"p": renewals["id"]})
    assert filtered["deals"]["totalCount"] == 1

    same = (await api.ok(move, {"id": deal["id"], "s": renewals["stages"][0]["id"], "v": 3}))["moveDeal"]
    assert same["version"] == 3 and same["updatedAt"] == across["updatedAt"]
    assert len(await audit_rows(admin_engine, tenant, key)) == 3


async def test_pipeline_summary_totals_per_stage_and_currency(client: httpx.AsyncClient,
                                                              make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.MEMBER)
    board = await new_pipeline(api, [("Lead", "0.25"), ("Proposal", "0.6"), ("Empty", "0.9")], name="Board")
    other = await new_pipeline(api, [("Elsewhere", "0.5")], name="Other")
    lead, proposal, _ = (s["id"] for s in board["stages"])
    for stage, amount, currency in ((lead, "100.10", "USD"), (lead, "200.25", "USD"), (lead, "50", "EUR"),
                                    (proposal, "999.99", "USD"), (proposal, "0.01", "USD"),
                                    (other["stages"][0]["id"], "7777", "USD")):
        await new_deal(api, stage, amount=amount, currency=currency)
    # Inserted last: the summary is ordered by stage position and currency, not by insertion.
    await new_deal(api, lead, amount="0.12", currency="CHF")

    summary = (await api.ok("""query($p: ID!) { pipelineSummary(pipelineId: $p) {
        stage { name position } currency count total weightedTotal } }""", {"p": board["id"]}))["pipelineSummary"]
    assert summary == [
        {"stage": {"name": "Lead", "position": 0}, "currency": "CHF", "count": 1, "total": "0.12",
         "weightedTotal": "0.03"},
        {"stage": {"name": "Lead", "position": 0}, "currency": "EUR", "count": 1, "total": "50.00",
         "weightedTotal": "12.50"},
        {"stage": {"name": "Lead", "position": 0}, "currency": "USD", "count": 2, "total": "300.35",
         "weightedTotal": "75.09"},  # 300.35 x 0.25 = 75.0875
        {"stage": {"name": "Proposal", "position": 1}, "currency": "USD", "count": 2, "total": "1000.00",
         "weightedTotal": "600.00"},
    ]

    body = await api.raw("query($p: ID!) { pipelineSummary(pipelineId: $p) { count } }",
                         {"p": gid("Pipeline", uuid.uuid4())})
    assert codes(body) == ["NOT_FOUND"]


# ---- deleting a company --------------------------------------------------------------------------

async def test_deleting_a_company_unlinks_its_deals_and_contacts(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                                 admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.OWNER)
    pipeline = await new_pipeline(api, [("Lead", "0.1")])
    company = await create_company(client, api.token, name="Doomed")
    keeper = await create_company(client, api.token, name="Keeper")
    contact = await create_contact(client, api.token, last_name="Linked", company_id=company["id"])
    other = await create_contact(client, api.token, last_name="Other", company_id=keeper["id"])
    deal = await new_deal(api, pipeline["stages"][0]["id"], companyId=company["id"], contactId=contact["id"])
    note = await create_activity(client, api.token, subject="About the company", company_id=company["id"])
    on_deal = await create_activity(client, api.token, subject="About the deal", deal_id=deal["id"])

    await api.ok("mutation($id: ID!) { deleteCompany(id: $id) { deletedId } }", {"id": company["id"]})

    read = await api.ok("""query($d: ID!, $c: ID!, $o: ID!) {
        deal(id: $d) { title company { id } contact { id company { id } } activities { subject } }
        contact(id: $c) { lastName company { id } }
        other: contact(id: $o) { company { name } } }""", {"d": deal["id"], "c": contact["id"], "o": other["id"]})
    assert read["deal"] == {"title": "Deal", "company": None, "contact": {"id": contact["id"], "company": None},
                            "activities": [{"subject": "About the deal"}]}
    assert read["contact"] == {"lastName": "Linked", "company": None}
    assert read["other"] == {"company": {"name": "Keeper"}}
    # The activity about the company alone went to the trash with it; the one about the deal stays.
    alone = await db_row(admin_engine, ACTIVITIES, tenant, uuid_of(note["id"]))
    assert alone.deleted_at is not None and alone.trash_batch == uuid_of(company["id"])
    assert (await db_row(admin_engine, ACTIVITIES, tenant, uuid_of(on_deal["id"]))).deleted_at is None
    companies = await api.ok("{ companies { nodes { name } totalCount } }")
    assert companies["companies"] == {"nodes": [{"name": "Keeper"}], "totalCount": 1}


async def test_purging_a_company_audits_and_versions_the_records_it_unlinks(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    """In the trash the company's deal and contact keep their link (it reads as null); once it is
    purged they lose it for good as changed records: one audit row each, version + 1."""
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.OWNER)
    pipeline = await new_pipeline(api, [("Lead", "0.1")])
    company = await create_company(client, api.token, name="Doomed")
    contact = await create_contact(client, api.token, last_name="Linked", company_id=company["id"])
    deal = await new_deal(api, pipeline["stages"][0]["id"], companyId=company["id"])

    await api.ok("mutation($id: ID!) { deleteCompany(id: $id) { deletedId } }", {"id": company["id"]})
    for table, record in ((DEALS, deal), (CONTACTS, contact)):
        row = await db_row(admin_engine, table, tenant, uuid_of(record["id"]))
        assert row.company_id == uuid_of(company["id"]) and row.version == 1
    await api.ok("mutation($id: ID!) { purgeTrash(id: $id) { purged } }", {"id": company["id"]})

    company_key = str(uuid_of(company["id"]))
    for table, record in ((DEALS, deal), (CONTACTS, contact)):
        key = uuid_of(record["id"])
        row = await db_row(admin_engine, table, tenant, key)
        assert row.company_id is None
        audits = await audit_rows(admin_engine, tenant, key)
        assert [a.action for a in audits] == ["create", "update"], f"{table.name}: no audit row for the unlink"
        assert audits[-1].diff == {"before": {"company_id": company_key}, "after": {"company_id": None}}
        assert audits[-1].request_id == api.last_request_id
        assert row.version == 2


# ---- activities ----------------------------------------------------------------------------------

async def test_activity_lifecycle(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                  admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.ADMIN)
    company = await create_company(client, api.token, name="Acme")
    contact = await create_contact(client, api.token, last_name="Hopper", company_id=company["id"])
    task = await new_activity(api, kind="TASK", subject=" Send offer ", body="Draft attached",
                              contactId=contact["id"], companyId=company["id"], dueDate="2030-01-15",
                              occurredAt="2025-03-01T09:30:00-05:00")
    assert {k: task[k] for k in ("kind", "subject", "body", "dueDate", "done", "version")} == {
        "kind": "TASK", "subject": "Send offer", "body": "Draft attached", "dueDate": "2030-01-15", "done": False,
        "version": 1}
    assert dt.datetime.fromisoformat(task["occurredAt"]) == dt.datetime(2025, 3, 1, 14, 30, tzinfo=dt.UTC)
    assert (task["deal"], task["contact"], task["company"]) == (None, {"id": contact["id"]}, {"id": company["id"]})
    assert task["actor"] == {"id": gid("User", api.user_id)}
    key = uuid_of(task["id"])
    [audit] = await audit_rows(admin_engine, tenant, key)
    assert_audit(audit, api, "create", "Activity", key)

    # Without occurredAt the activity happens now.
    before = dt.datetime.now(dt.UTC)
    note = await new_activity(api, subject="Met at the fair", contactId=contact["id"])
    assert before - dt.timedelta(seconds=5) <= dt.datetime.fromisoformat(note["occurredAt"]) <= (
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=5))

    lists = await api.ok("""query($c: ID!, $k: ID!) {
        company(id: $c) { activities { subject } } contact(id: $k) { activities(first: 1) { subject } } }""",
                         {"c": company["id"], "k": contact["id"]})
    assert lists == {"company": {"activities": [{"subject": "Send offer"}]},
                     "contact": {"activities": [{"subject": "Met at the fair"}]}}

    update = f"""mutation($id: ID!, $input: ActivityPatch!, $v: Int) {{
        updateActivity(id: $id, input: $input, expectedVersion: $v) {{ {ACTIVITY_FIELDS} }} }}"""
    done = (await api.ok(update, {"id": task["id"], "v": 1, "input": {"done": True, "dueDate": "2030-02-01",
                                                                      "body": None}}))["updateActivity"]
    assert (done["done"], done["dueDate"], done["body"], done["version"]) == (True, "2030-02-01", None, 2)
    audits = await audit_rows(admin_engine, tenant, key)
    assert audits[-1].diff == {"before": {"done": False, "due_date": "2030-01-15", "body": "Draft attached"},
                               "after": {"done": True, "due_date": "2030-02-01", "body": None}}
    noop = (await api.ok(update, {"id": task["id"], "input": {"occurredAt": "2025-03-01T14:30:00+00:00",
                                                              "done": True}}))["updateActivity"]
    assert noop["version"] == 2 and len(await audit_rows(admin_engine, tenant, key)) == 2

    await api.ok("mutation($id: ID!) { deleteActivity(id: $id, expectedVersion: 2) { deletedId } }", {"id": task["id"]})
    assert (await api.ok("query($id: ID!) { node(id: $id) { id } }", {"id": task["id"]}))["node"] is None
    assert [a.action for a in await audit_rows(admin_engine, tenant, key)] == ["create", "update", "trash"]


async def test_failed_mutation_writes_no_audit_row(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                   admin_engine: AsyncEngine) -> None:
    """A reference to a record of nowhere fails inside the transaction: neither row nor audit row remains."""
    tenant = await make_tenant("crm")
    api = Api(client, tenant, Role.MEMBER)
    pipeline = await new_pipeline(api, [("Lead", "0.1")])
    before = await audit_rows(admin_engine, tenant)
    body = await api.raw("mutation($input: DealInput!) { createDeal(input: $input) { id } }", {"input": {
        "title": "Orphan", "amount": "1", "currency": "USD", "stageId": pipeline["stages"][0]["id"],
        "companyId": gid("Company", uuid.uuid4())}})
    assert codes(body) == ["NOT_FOUND"] and body["errors"][0]["extensions"]["field"] == "companyId"
    assert await audit_rows(admin_engine, tenant) == before
    assert (await api.ok("{ deals { totalCount } }"))["deals"]["totalCount"] == 0
