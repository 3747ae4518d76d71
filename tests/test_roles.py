"""Every role rule, as a table: who may read, write, delete, read the audit log and manage members.

Each test builds its own tenant (one user per role) and seeds it as the owner through the API, then
acts as one role. A refused mutation must answer FORBIDDEN and leave every row of the tenant
(audit log included) exactly as it was; an allowed one must write its audit row as the caller.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from atrium.ops.admin import add_user
from atrium.schema import build_schema
from core.ids import to_global_id
from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql

TENANT_TABLES = ("memberships", "companies", "contacts", "pipelines", "stages", "deals", "activities",
                 "audit_events")


# --- helpers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Seed:
    """A tenant with one of everything, created by its owner; global IDs."""

    world: TenantWorld
    pipeline: str
    stage: str
    other_stage: str
    empty_stage: str
    empty_pipeline: str
    company: str
    contact: str
    deal: str
    activity: str
    product: str
    unused_product: str
    line_item: str

    def user(self, role: Role) -> str:
        return to_global_id("User", self.world.users[role])


async def ok(client: httpx.AsyncClient, token: str, query: str, variables: dict[str, Any] | None = None) -> Any:
    return data_or_fail(await gql(client, query, variables, token=token))


async def seed(client: httpx.AsyncClient, world: TenantWorld) -> Seed:
    owner = world.token(Role.OWNER)
    pipeline = (await ok(client, owner, """
        mutation { createPipeline(input: {name: "Sales", stages: [
            {name: "Lead", probability: "0.1"}, {name: "Won", probability: "0.9"},
            {name: "Spare", probability: "0.5"}]}) { id stages { id } } }"""))["createPipeline"]
    empty = (await ok(client, owner, """
        mutation { createPipeline(input: {name: "Empty", stages: [{name: "Only", probability: "0.2"}]}) { id } }"""
                      ))["createPipeline"]
    company = (await ok(client, owner, 'mutation { createCompany(input: {name: "Acme", domain: "acme.test"}) { id } }'
                        ))["createCompany"]["id"]
    contact = (await ok(client, owner, """
        mutation($c: ID!) { createContact(input: {firstName: "Ada", lastName: "Lovelace", companyId: $c}) { id } }""",
                        {"c": company}))["createContact"]["id"]
    stages = [s["id"] for s in pipeline["stages"]]
    deal = (await ok(client, owner, """
        mutation($s: ID!, $c: ID!, $p: ID!) { createDeal(input: {title: "Big deal", amount: "1000.00", currency: "EUR",
            stageId: $s, companyId: $c, contactId: $p}) { id } }""",
                     {"s": stages[0], "c": company, "p": contact}))["createDeal"]["id"]
    activity = (await ok(client, owner, """
        mutation($d: ID!) { createActivity(input: {kind: NOTE, subject: "Kick-off", dealId: $d}) { id } }""",
                         {"d": deal}))["createActivity"]["id"]
    products: list[str] = [
        (await ok(client, owner, """mutation($sku: String!) { createProduct(input: {name: "Widget", sku: $sku,
            unitPrice: "5.00", currency: "EUR"}) { id } }""", {"sku": sku}))["createProduct"]["id"]
        for sku in ("W-1", "W-2")]
    product, unused_product = products
    line_item = (await ok(client, owner, """
        mutation($d: ID!, $p: ID!) { createDealLineItem(input: {dealId: $d, productId: $p, quantity: 1}) { id } }""",
                          {"d": deal, "p": product}))["createDealLineItem"]["id"]
    return Seed(world=world, pipeline=pipeline["id"], stage=stages[0], other_stage=stages[1], empty_stage=stages[2],
                empty_pipeline=empty["id"], company=company, contact=contact, deal=deal, activity=activity,
                product=product, unused_product=unused_product, line_item=line_item)


async def tenant_rows(engine: AsyncEngine, world: TenantWorld) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tenant (and its users, by email domain), read over the admin connection."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with engine.connect() as conn:
        for table in TENANT_TABLES:
            result = await conn.execute(text(f"SELECT * FROM {table} WHERE tenant_id = :t ORDER BY id"),
                                        {"t": world.id})
            rows[table] = [tuple(r) for r in result]
        result = await conn.execute(text("SELECT * FROM users WHERE email LIKE :p ORDER BY id"),
                                    {"p": f"%@{world.slug}.example"})
        rows["users"] = [tuple(r) for r in result]
    return rows


async def audit_actors(engine: AsyncEngine, world: TenantWorld) -> dict[uuid.UUID, uuid.UUID | None]:
    async with engine.connect() as conn:
        result = await conn.execute(text("SELECT id, actor_id FROM audit_events WHERE tenant_id = :t"),
                                    {"t": world.id})
        return {r.id: r.actor_id for r in result}


def allowed(role: Role, minimum: Role) -> bool:
    return role.rank >= minimum.rank


# --- the table of mutations ----------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    field: str
    document: str
    variables: Callable[[Seed], dict[str, Any]]
    minimum: Role
    prepare: Callable[[httpx.AsyncClient, Seed], Awaitable[dict[str, Any]]] | None = None
    """Makes what the rule acts on (as the owner, before the rows are compared) and returns variables."""


async def a_team(client: httpx.AsyncClient, s: Seed) -> dict[str, Any]:
    """A team made by the owner (what updateTeam and deleteTeam act on)."""
    made = await ok(client, s.world.token(Role.OWNER), 'mutation { createTeam(input: {name: "Made"}) { id } }')
    return {"t": made["createTeam"]["id"]}


TRASHABLE: dict[str, tuple[str, Callable[[Seed], dict[str, Any]]]] = {
    "Company": ('mutation { createCompany(input: {name: "Gone"}) { id } }', lambda s: {}),
    "Contact": ('mutation { createContact(input: {firstName: "Gone", lastName: "Away"}) { id } }', lambda s: {}),
    "Deal": ("""mutation($s: ID!) { createDeal(input: {title: "Gone", amount: "1.00", currency: "EUR", stageId: $s})
                { id } }""", lambda s: {"s": s.stage}),
    "Activity": ('mutation($d: ID!) { createActivity(input: {kind: NOTE, subject: "Gone", dealId: $d}) { id } }',
                 lambda s: {"d": s.deal}),
    "DealLineItem": ("""mutation($d: ID!, $p: ID!) { createDealLineItem(input: {dealId: $d, productId: $p,
                        quantity: 1}) { id } }""", lambda s: {"d": s.deal, "p": s.product}),
}


def in_trash(type_name: str) -> Callable[[httpx.AsyncClient, Seed], Awaitable[dict[str, Any]]]:
    """A record of ``type_name`` created and deleted into the trash by the owner: ``{"id": ...}``."""
    create, variables = TRASHABLE[type_name]

    async def prepare(client: httpx.AsyncClient, s: Seed) -> dict[str, Any]:
        owner = s.world.token(Role.OWNER)
        created = await ok(client, owner, create, variables(s))
        (record,) = created.values()
        await ok(client, owner, f"mutation($id: ID!) {{ delete{type_name}(id: $id) {{ deletedId }} }}",
                 {"id": record["id"]})
        return {"id": record["id"]}

    return prepare


async def field_rule(client: httpx.AsyncClient, s: Seed, record_type: str, name: str) -> dict[str, Any]:
    """A field rule set by the owner (what ``removeFieldRule`` then lifts)."""
    await ok(client, s.world.token(Role.OWNER), """mutation($t: String!, $f: String!) {
        setFieldRule(recordType: $t, field: $f, hiddenFrom: [VIEWER]) { id } }""", {"t": record_type, "f": name})
    return {}


def custom_field(deleted: bool = False) -> Callable[[httpx.AsyncClient, Seed], Awaitable[dict[str, Any]]]:
    """A custom field defined by the owner (deleted too, with ``deleted``): ``{"id": ...}``."""

    async def prepare(client: httpx.AsyncClient, s: Seed) -> dict[str, Any]:
        owner = s.world.token(Role.OWNER)
        made = await ok(client, owner, 'mutation { createCustomFieldDefinition(input: {recordType: DEAL, key: "f", '
                                       'label: "F", type: TEXT}) { id } }')
        key = made["createCustomFieldDefinition"]["id"]
        if deleted:
            await ok(client, owner, "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }", {"id": key})
        return {"id": key}

    return prepare


def restore_rule(type_name: str, minimum: Role) -> Rule:
    return Rule(f"restore{type_name}", f"mutation($id: ID!) {{ restore{type_name}(id: $id) {{ id }} }}",
                lambda s: {}, minimum, in_trash(type_name))


RULES = [
    Rule("createPipeline", """mutation($i: PipelineInput!) { createPipeline(input: $i) { id } }""",
         lambda s: {"i": {"name": "New", "stages": [{"name": "S1", "probability": "0.3"}]}}, Role.MEMBER),
    Rule("updatePipeline", """mutation($id: ID!) { updatePipeline(id: $id, input: {name: "Renamed"}) { id } }""",
         lambda s: {"id": s.pipeline}, Role.MEMBER),
    Rule("createStage", """mutation($p: ID!) { createStage(pipelineId: $p, input: {name: "Extra", probability: "0.4"})
            { id } }""", lambda s: {"p": s.pipeline}, Role.MEMBER),
    Rule("updateStage", """mutation($id: ID!) { updateStage(id: $id, input: {name: "Renamed"}) { id } }""",
         lambda s: {"id": s.stage}, Role.MEMBER),
    Rule("createCompany", """mutation { createCompany(input: {name: "Globex"}) { id } }""",
         lambda s: {}, Role.MEMBER),
    Rule("updateCompany", """mutation($id: ID!) { updateCompany(id: $id, input: {name: "Acme Ltd"}) { id } }""",
         lambda s: {"id": s.company}, Role.MEMBER),
    Rule("createContact", """mutation { createContact(input: {firstName: "Alan", lastName: "Turing"}) { id } }""",
         lambda s: {}, Role.MEMBER),
    Rule("updateContact", """mutation($id: ID!) { updateContact(id: $id, input: {title: "CTO"}) { id } }""",
         lambda s: {"id": s.contact}, Role.MEMBER),
    Rule("createDeal", """mutation($s: ID!) { createDeal(input: {title: "Small deal", amount: "10", currency: "EUR",
            stageId: $s}) { id } }""", lambda s: {"s": s.stage}, Role.MEMBER),
    Rule("updateDeal", """mutation($id: ID!) { updateDeal(id: $id, input: {title: "Bigger deal"}) { id } }""",
         lambda s: {"id": s.deal}, Role.MEMBER),
    Rule("moveDeal", """mutation($id: ID!, $s: ID!) { moveDeal(id: $id, stageId: $s) { id } }""",
         lambda s: {"id": s.deal, "s": s.other_stage}, Role.MEMBER),
    Rule("createActivity", """mutation($d: ID!) { createActivity(input: {kind: CALL, subject: "Call", dealId: $d})
            { id } }""", lambda s: {"d": s.deal}, Role.MEMBER),
    Rule("createNote", """mutation($d: ID!) { createNote(input: {dealId: $d}) { id } }""",
         lambda s: {"d": s.deal}, Role.MEMBER),
    Rule("updateActivity", """mutation($id: ID!) { updateActivity(id: $id, input: {subject: "Changed"}) { id } }""",
         lambda s: {"id": s.activity}, Role.MEMBER),
    Rule("createProduct", """mutation { createProduct(input: {name: "Seat", sku: "SEAT", unitPrice: "10",
            currency: "EUR"}) { id } }""", lambda s: {}, Role.MEMBER),
    Rule("updateProduct", """mutation($id: ID!) { updateProduct(id: $id, input: {name: "Renamed"}) { id } }""",
         lambda s: {"id": s.product}, Role.MEMBER),
    Rule("createDealLineItem", """mutation($d: ID!, $p: ID!) { createDealLineItem(input: {dealId: $d, productId: $p,
            quantity: 2}) { id } }""", lambda s: {"d": s.deal, "p": s.product}, Role.MEMBER),
    Rule("updateDealLineItem", """mutation($id: ID!) { updateDealLineItem(id: $id, input: {quantity: 3}) { id } }""",
         lambda s: {"id": s.line_item}, Role.MEMBER),
    Rule("deleteDealLineItem", """mutation($id: ID!) { deleteDealLineItem(id: $id) { deletedId } }""",
         lambda s: {"id": s.line_item}, Role.MEMBER),
    Rule("deleteProduct", """mutation($id: ID!) { deleteProduct(id: $id) { deletedId } }""",
         lambda s: {"id": s.unused_product}, Role.ADMIN),
    Rule("deleteDeal", """mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }""",
         lambda s: {"id": s.deal}, Role.ADMIN),
    Rule("deleteCompany", """mutation($id: ID!) { deleteCompany(id: $id) { deletedId } }""",
         lambda s: {"id": s.company}, Role.ADMIN),
    Rule("deleteContact", """mutation($id: ID!) { deleteContact(id: $id) { deletedId } }""",
         lambda s: {"id": s.contact}, Role.ADMIN),
    Rule("deleteActivity", """mutation($id: ID!) { deleteActivity(id: $id) { deletedId } }""",
         lambda s: {"id": s.activity}, Role.ADMIN),
    Rule("deleteStage", """mutation($id: ID!) { deleteStage(id: $id) { deletedId } }""",
         lambda s: {"id": s.empty_stage}, Role.ADMIN),
    Rule("deletePipeline", """mutation($id: ID!) { deletePipeline(id: $id) { deletedId } }""",
         lambda s: {"id": s.empty_pipeline}, Role.ADMIN),
    restore_rule("Deal", Role.ADMIN), restore_rule("Company", Role.ADMIN), restore_rule("Contact", Role.ADMIN),
    restore_rule("Activity", Role.ADMIN), restore_rule("DealLineItem", Role.MEMBER),
    Rule("createCustomFieldDefinition", """mutation { createCustomFieldDefinition(input: {recordType: COMPANY,
            key: "tier", label: "Tier", type: TEXT}) { id } }""", lambda s: {}, Role.ADMIN),
    Rule("updateCustomFieldDefinition", """mutation($id: ID!) { updateCustomFieldDefinition(id: $id, input: {
            label: "Renamed"}) { id } }""", lambda s: {}, Role.ADMIN, custom_field()),
    Rule("deleteCustomFieldDefinition", "mutation($id: ID!) { deleteCustomFieldDefinition(id: $id) { id } }",
         lambda s: {}, Role.ADMIN, custom_field()),
    Rule("purgeCustomFieldDefinition", "mutation($id: ID!) { purgeCustomFieldDefinition(id: $id) { purgedId } }",
         lambda s: {}, Role.ADMIN, custom_field(deleted=True)),
    Rule("purgeTrash", "mutation($id: ID!) { purgeTrash(id: $id) { purged } }", lambda s: {}, Role.ADMIN,
         in_trash("Company")),
    Rule("setTrashRetention", "mutation { setTrashRetention(days: 7) { trashRetentionDays } }", lambda s: {},
         Role.OWNER),
    Rule("addMember", """mutation($e: String!) { addMember(input: {email: $e, name: "Newcomer", role: VIEWER})
            { id } }""",
         lambda s: {"e": f"newcomer@{s.world.slug}.example"}, Role.ADMIN),
    Rule("updateMemberRole", """mutation($u: ID!) { updateMemberRole(userId: $u, role: MEMBER) { id role } }""",
         lambda s: {"u": s.user(Role.VIEWER)}, Role.ADMIN),
    Rule("removeMember", """mutation($u: ID!) { removeMember(userId: $u) { deletedId } }""",
         lambda s: {"u": s.user(Role.VIEWER)}, Role.ADMIN),
    Rule("exportTenant", """mutation { exportTenant { id status } }""", lambda s: {}, Role.OWNER),
    Rule("startImport", """mutation { startImport(type: COMPANIES, csv: "name\\nImported\\n") { id } }""",
         lambda s: {}, Role.MEMBER),
    Rule("eraseContact", """mutation($id: ID!) { eraseContact(id: $id) { contactId } }""",
         lambda s: {"id": s.contact}, Role.OWNER),
    Rule("setRetentionPolicy", """mutation { setRetentionPolicy(target: "activities", keepDays: 365) { keepDays } }""",
         lambda s: {}, Role.OWNER),
    Rule("setFieldRule", """mutation { setFieldRule(recordType: "Deal", field: "amount", hiddenFrom: [VIEWER])
            { id } }""", lambda s: {}, Role.ADMIN),
    Rule("removeFieldRule", """mutation { removeFieldRule(recordType: "Contact", field: "phone") }""",
         lambda s: {}, Role.ADMIN, lambda client, s: field_rule(client, s, "Contact", "phone")),
    Rule("createTeam", """mutation($u: ID!) { createTeam(input: {name: "Sellers", memberIds: [$u]}) { id } }""",
         lambda s: {"u": s.user(Role.MEMBER)}, Role.ADMIN),
    Rule("updateTeam", """mutation($t: ID!) { updateTeam(id: $t, input: {name: "Renamed"}) { id } }""",
         lambda s: {}, Role.ADMIN, prepare=lambda client, s: a_team(client, s)),
    Rule("deleteTeam", """mutation($t: ID!) { deleteTeam(id: $t) { deletedId } }""",
         lambda s: {}, Role.ADMIN, prepare=lambda client, s: a_team(client, s)),
    Rule("setRecordVisibility", """mutation { setRecordVisibility(recordType: DEAL, audience: TEAM) { audience } }""",
         lambda s: {}, Role.ADMIN),
]



# Batch mutations need exactly the permission of their single mutation: each rule below sends a list
# of one record and takes its single mutation's minimum role.
BATCH_CREATES: dict[str, tuple[str, Callable[[Seed], dict[str, Any]]]] = {
    "Pipeline": ("Pipelines", lambda s: {"name": "New", "stages": [{"name": "S1", "probability": "0.3"}]}),
    "Stage": ("Stages", lambda s: {"name": "Extra", "probability": "0.4"}),
    "Company": ("Companies", lambda s: {"name": "Globex"}),
    "Contact": ("Contacts", lambda s: {"firstName": "Alan", "lastName": "Turing"}),
    "Deal": ("Deals", lambda s: {"title": "Small deal", "amount": "10", "currency": "EUR", "stageId": s.stage}),
    "Activity": ("Activities", lambda s: {"kind": "CALL", "subject": "Call", "dealId": s.deal}),
    "Product": ("Products", lambda s: {"name": "Seat", "sku": "SEAT", "unitPrice": "10", "currency": "EUR"}),
    "DealLineItem": ("DealLineItems", lambda s: {"dealId": s.deal, "productId": s.product, "quantity": 2}),
}
BATCH_UPDATES: dict[str, tuple[Callable[[Seed], str], dict[str, Any]]] = {
    "Pipeline": (lambda s: s.pipeline, {"name": "Renamed"}), "Stage": (lambda s: s.stage, {"name": "Renamed"}),
    "Company": (lambda s: s.company, {"name": "Acme Ltd"}), "Contact": (lambda s: s.contact, {"title": "CTO"}),
    "Deal": (lambda s: s.deal, {"title": "Bigger deal"}), "Activity": (lambda s: s.activity, {"subject": "Changed"}),
    "Product": (lambda s: s.product, {"name": "Renamed"}), "DealLineItem": (lambda s: s.line_item, {"quantity": 3}),
}
BATCH_DELETES: dict[str, Callable[[Seed], str]] = {
    "Pipeline": lambda s: s.empty_pipeline, "Stage": lambda s: s.empty_stage, "Company": lambda s: s.company,
    "Contact": lambda s: s.contact, "Deal": lambda s: s.deal, "Activity": lambda s: s.activity,
    "Product": lambda s: s.unused_product, "DealLineItem": lambda s: s.line_item,
}
NO_UPSERT = {"Stage"}
"""Stages are created under a pipeline argument. (Notes are created by ``resolvers/notes.py``: no batches.)"""


Variables = Callable[[Seed], dict[str, Any]]


def batch_rules() -> list[Rule]:
    single = {r.field: r.minimum for r in RULES}
    rules = []

    def created(given: Variables, parent: bool) -> Variables:
        return lambda s: {"i": [given(s)], **({"p": s.pipeline} if parent else {})}

    def upserted(given: Variables) -> Variables:  # an upsert takes no nested children
        return lambda s: {"i": [{**{k: v for k, v in given(s).items() if k != "stages"}, "externalId": "ext-1"}]}

    def updated(target: Callable[[Seed], str], patch: dict[str, Any]) -> Variables:
        return lambda s: {"i": [{"id": target(s), **patch}]}

    def deleted(target: Callable[[Seed], str]) -> Variables:
        return lambda s: {"i": [{"id": target(s)}]}

    for name, (plural, given) in BATCH_CREATES.items():
        parent = name == "Stage"
        rules.append(Rule(
            f"create{plural}", f"mutation($i: [{name}Input!]!{', $p: ID!' if parent else ''}) "
            f"{{ create{plural}({'pipelineId: $p, ' if parent else ''}input: $i) {{ id }} }}",
            created(given, parent), single[f"create{name}"]))
        if name not in NO_UPSERT:
            rules.append(Rule(
                f"upsert{plural}", f"mutation($i: [{name}Upsert!]!) {{ upsert{plural}(input: $i) {{ created }} }}",
                upserted(given), single[f"create{name}"]))
    for name, (target, patch) in BATCH_UPDATES.items():
        plural = BATCH_CREATES[name][0]
        rules.append(Rule(f"update{plural}", f"mutation($i: [{name}Update!]!) {{ update{plural}(input: $i) {{ id }} }}",
                          updated(target, patch), single[f"update{name}"]))
    for name, target in BATCH_DELETES.items():
        plural = BATCH_CREATES[name][0]
        rules.append(Rule(f"delete{plural}", f"mutation($i: [DeleteInput!]!) {{ delete{plural}(input: $i) "
                                             "{ deletedIds } }", deleted(target), single[f"delete{name}"]))
    return rules


RULES += batch_rules()

def test_rules_cover_every_mutation_but_login() -> None:
    """The table names every mutation of the schema (login is anonymous and tested in test_auth)."""
    mutation = build_schema()._schema.mutation_type
    assert mutation is not None
    # The partner mutations need keys and manifests set up first: their role table is in tests/test_api_keys.py.
    partner = {"createApiKey", "revokeApiKey", "pushPersistedDocuments", "removePersistedDocuments"}
    # Note edits need a CRDT update and presence writes no audit row: tests/test_notes.py, test_presence.py.
    live = {"applyNoteUpdate", "setPresence"}
    # Webhook endpoints need a receiver: their role table is in tests/test_webhooks.py.
    webhooks = {"createWebhookEndpoint", "updateWebhookEndpoint", "rotateWebhookEndpointSecret",
                "deleteWebhookEndpoint", "replayWebhookDelivery"}
    assert set(mutation.fields) - {"login"} - partner - live - webhooks == {r.field for r in RULES}


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
@pytest.mark.parametrize("rule", RULES, ids=[r.field for r in RULES])
async def test_mutation_rule(client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine,
                             rule: Rule, role: Role) -> None:
    world = await make_tenant("roles")
    s = await seed(client, world)
    variables = await rule.prepare(client, s) if rule.prepare else rule.variables(s)
    before = await tenant_rows(admin_engine, world)
    actors_before = await audit_actors(admin_engine, world)

    body = await gql(client, rule.document, variables, token=world.token(role))

    assert body["_status"] == 200
    if allowed(role, rule.minimum):
        data = data_or_fail(body)
        assert data[rule.field] is not None
        new_audit = {k: v for k, v in (await audit_actors(admin_engine, world)).items() if k not in actors_before}
        assert new_audit, f"{rule.field} by {role.value} wrote no audit row"
        assert set(new_audit.values()) == {world.users[role]}
    else:
        assert codes(body) == ["FORBIDDEN"], body
        assert body.get("data") is None
        assert role.value in body["errors"][0]["message"]
        assert await tenant_rows(admin_engine, world) == before, f"refused {rule.field} still changed rows"


# --- reads ---------------------------------------------------------------------------------------

READ_ALL = """{
  me { id role }
  tenant { slug }
  members { id }
  deals { totalCount nodes { id title company { id } } }
  companies { totalCount nodes { id } }
  contacts { totalCount nodes { id } }
  activities { totalCount nodes { id } }
  pipelines { id stages { id } }
}"""


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
async def test_every_role_can_read(client: httpx.AsyncClient, make_tenant: Any, role: Role) -> None:
    world = await make_tenant("read")
    s = await seed(client, world)
    data = await ok(client, world.token(role), READ_ALL)
    assert data["me"] == {"id": s.user(role), "role": role.name}
    assert data["tenant"]["slug"] == world.slug
    assert len(data["members"]) == len(Role)
    assert data["deals"]["totalCount"] == 1
    assert data["deals"]["nodes"] == [{"id": s.deal, "title": "Big deal", "company": {"id": s.company}}]
    assert data["companies"]["totalCount"] == 1
    assert data["contacts"]["totalCount"] == 1
    assert data["activities"]["totalCount"] == 1
    assert {p["id"] for p in data["pipelines"]} == {s.pipeline, s.empty_pipeline}
    single = await ok(client, world.token(role), "query($d: ID!) { deal(id: $d) { id } node(id: $d) { id } }",
                      {"d": s.deal})
    assert single == {"deal": {"id": s.deal}, "node": {"id": s.deal}}


AUDIT = "{ auditEvents(first: 50) { totalCount nodes { action entityType actor { id } } } }"


@pytest.mark.parametrize(("role", "may"), [(Role.VIEWER, False), (Role.MEMBER, False), (Role.ADMIN, True),
                                           (Role.OWNER, True)], ids=[r.value for r in Role])
async def test_audit_events_need_admin(client: httpx.AsyncClient, make_tenant: Any, role: Role, may: bool) -> None:
    world = await make_tenant("audit")
    s = await seed(client, world)
    body = await gql(client, AUDIT, token=world.token(role))
    if may:
        events = data_or_fail(body)["auditEvents"]
        # One row per created record (2 pipelines, their 4 stages, a company, a contact, a deal, an activity,
        # 2 products and a line item) and the deal's amount, which its line item set.
        assert events["totalCount"] == 14
        assert sorted((n["entityType"], n["action"]) for n in events["nodes"]) == sorted(
            [(t, "create") for t in ["Pipeline"] * 2 + ["Stage"] * 4 + ["Company", "Contact", "Deal", "Activity"]
             + ["Product"] * 2 + ["DealLineItem"]] + [("Deal", "update")])
        assert {n["actor"]["id"] for n in events["nodes"]} == {s.user(Role.OWNER)}
    else:
        assert codes(body) == ["FORBIDDEN"], body
        assert body.get("data") is None


# --- member management ---------------------------------------------------------------------------

ADD = "mutation($e: String!, $r: Role!) { addMember(input: {email: $e, name: \"New person\", role: $r}) { id role } }"
SET_ROLE = "mutation($u: ID!, $r: Role!) { updateMemberRole(userId: $u, role: $r) { id role } }"
REMOVE = "mutation($u: ID!) { removeMember(userId: $u) { deletedId } }"
MEMBERS = "{ members { id role } }"


async def roles_of(client: httpx.AsyncClient, world: TenantWorld) -> dict[str, str]:
    data = await ok(client, world.token(Role.OWNER), MEMBERS)
    return {m["id"]: m["role"] for m in data["members"]}


def uid(world: TenantWorld, role: Role) -> str:
    return to_global_id("User", world.users[role])


@pytest.mark.parametrize("caller", list(Role), ids=[r.value for r in Role])
@pytest.mark.parametrize("granted", list(Role), ids=[f"grant-{r.value}" for r in Role])
async def test_add_member_grants_up_to_own_rank(client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine,
                                               caller: Role, granted: Role) -> None:
    """Managing users needs admin; nobody grants a role above their own (so only owners grant owner)."""
    world = await make_tenant("add")
    before = await tenant_rows(admin_engine, world)
    email = f"new-{granted.value}@{world.slug}.example"
    body = await gql(client, ADD, {"e": email, "r": granted.name}, token=world.token(caller))
    if caller.rank >= Role.ADMIN.rank and granted.rank <= caller.rank:
        added = data_or_fail(body)["addMember"]
        assert added["role"] == granted.name
        assert (await roles_of(client, world))[added["id"]] == granted.name
    else:
        assert codes(body) == ["FORBIDDEN"], body
        assert await tenant_rows(admin_engine, world) == before


@pytest.mark.parametrize("caller", [Role.ADMIN, Role.OWNER], ids=["admin", "owner"])
@pytest.mark.parametrize(("target", "new_role"), [
    (Role.VIEWER, Role.MEMBER), (Role.VIEWER, Role.ADMIN), (Role.MEMBER, Role.VIEWER), (Role.ADMIN, Role.MEMBER),
    (Role.VIEWER, Role.OWNER), (Role.ADMIN, Role.OWNER), (Role.OWNER, Role.ADMIN), (Role.OWNER, Role.VIEWER),
], ids=lambda r: r.value)
async def test_update_member_role(client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine,
                                  caller: Role, target: Role, new_role: Role) -> None:
    """Admins change roles up to admin; only owners touch the owner role (granting or taking it away)."""
    world = await make_tenant("setrole")
    # A second owner, so that demoting the fixture's owner is not refused as "last owner".
    await add_user(admin_engine, world.id, f"owner2@{world.slug}.example", "Second owner", Role.OWNER)
    before = await tenant_rows(admin_engine, world)
    body = await gql(client, SET_ROLE, {"u": uid(world, target), "r": new_role.name}, token=world.token(caller))
    if caller == Role.OWNER or Role.OWNER not in (target, new_role):
        assert data_or_fail(body)["updateMemberRole"] == {"id": uid(world, target), "role": new_role.name}
        assert (await roles_of(client, world))[uid(world, target)] == new_role.name
    else:
        assert codes(body) == ["FORBIDDEN"], body
        assert await tenant_rows(admin_engine, world) == before


@pytest.mark.parametrize("caller", [Role.ADMIN, Role.OWNER], ids=["admin", "owner"])
@pytest.mark.parametrize("target", [Role.VIEWER, Role.MEMBER, Role.ADMIN, Role.OWNER], ids=lambda r: r.value)
async def test_remove_member(client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine,
                             caller: Role, target: Role) -> None:
    world = await make_tenant("remove")
    await add_user(admin_engine, world.id, f"owner2@{world.slug}.example", "Second owner", Role.OWNER)
    target_id = uid(world, target)
    if target == caller:  # removing someone else of the same rank, not oneself
        target_id = to_global_id("User", await add_user(admin_engine, world.id, f"peer@{world.slug}.example",
                                                        "Peer", target))
    before = await tenant_rows(admin_engine, world)
    body = await gql(client, REMOVE, {"u": target_id}, token=world.token(caller))
    if target != Role.OWNER or caller == Role.OWNER:
        assert data_or_fail(body)["removeMember"] == {"deletedId": target_id}
        assert target_id not in await roles_of(client, world)
    else:
        assert codes(body) == ["FORBIDDEN"], body
        assert await tenant_rows(admin_engine, world) == before


@pytest.mark.parametrize("caller", [Role.VIEWER, Role.MEMBER], ids=["viewer", "member"])
@pytest.mark.parametrize(("document", "variables"), [
    (ADD, lambda w: {"e": f"x@{w.slug}.example", "r": "VIEWER"}),
    (SET_ROLE, lambda w: {"u": uid(w, Role.VIEWER), "r": "MEMBER"}),
    (REMOVE, lambda w: {"u": uid(w, Role.VIEWER)}),
], ids=["addMember", "updateMemberRole", "removeMember"])
async def test_member_management_needs_admin(client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine,
                                             caller: Role, document: str,
                                             variables: Callable[[TenantWorld], dict[str, Any]]) -> None:
    world = await make_tenant("nomanage")
    before = await tenant_rows(admin_engine, world)
    body = await gql(client, document, variables(world), token=world.token(caller))
    assert codes(body) == ["FORBIDDEN"], body
    assert await tenant_rows(admin_engine, world) == before


async def test_owner_grants_owner_and_then_steps_down(client: httpx.AsyncClient, make_tenant: Any) -> None:
    world = await make_tenant("handover")
    owner = world.token(Role.OWNER)
    promoted = await ok(client, owner, SET_ROLE, {"u": uid(world, Role.ADMIN), "r": "OWNER"})
    assert promoted["updateMemberRole"]["role"] == "OWNER"
    # Two owners now: the original one may step down to admin.
    stepped = await ok(client, owner, SET_ROLE, {"u": uid(world, Role.OWNER), "r": "ADMIN"})
    assert stepped["updateMemberRole"]["role"] == "ADMIN"
    roles = await roles_of(client, world)
    assert [i for i, r in roles.items() if r == "OWNER"] == [uid(world, Role.ADMIN)]


@pytest.mark.parametrize(("document", "variables"), [
    (SET_ROLE, {"r": "ADMIN"}), (SET_ROLE, {"r": "VIEWER"}), (REMOVE, {}),
], ids=["demote-to-admin", "demote-to-viewer", "remove"])
async def test_last_owner_cannot_leave(client: httpx.AsyncClient, make_tenant: Any, admin_engine: AsyncEngine,
                                       document: str, variables: dict[str, Any]) -> None:
    world = await make_tenant("lastowner")
    before = await tenant_rows(admin_engine, world)
    body = await gql(client, document, {"u": uid(world, Role.OWNER), **variables}, token=world.token(Role.OWNER))
    assert codes(body) == ["BAD_USER_INPUT"], body
    assert await tenant_rows(admin_engine, world) == before
    assert (await roles_of(client, world))[uid(world, Role.OWNER)] == "OWNER"


async def test_owner_role_kept_when_set_to_owner_again(client: httpx.AsyncClient, make_tenant: Any) -> None:
    """Re-granting OWNER to the only owner is not a demotion and must not be refused."""
    world = await make_tenant("sameowner")
    data = await ok(client, world.token(Role.OWNER), SET_ROLE, {"u": uid(world, Role.OWNER), "r": "OWNER"})
    assert data["updateMemberRole"]["role"] == "OWNER"
