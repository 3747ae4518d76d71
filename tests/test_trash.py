"""The trash: a deleted company, contact, deal, activity or line item is hidden from every read,
comes back with its links when restored, and is removed for good by a purge after the workspace's
retention; all audited and published.

The read-path tests run four ways (the ``client`` fixture): through plans and through the executor,
each against the app as deployed (its filters and row-level security) and against an app connecting
as the superuser (RLS out of the way: the application's filters alone must hold). The backstop test
does the converse: statements without the application's filter, under RLS alone.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import httpx
import pytest
from sqlalchemy import Table, func, insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.app import create_app
from core.clock import ManualClock
from core.settings import Settings
from models.db import Databases, TenantScope
from models.loaders import Loaders
from models.tables import ACTIVITIES, AUDIT_EVENTS, COMPANIES, CONTACTS, DEAL_LINE_ITEMS, DEALS, NOTES, Role
from records.declare import Field, OnDelete, Record, ToOne
from records.rules import Text
from resolvers.live import change_fields
from resolvers.trash import purge_trash
from schema.live import TrashAction
from subscriptions.events import ChangeEvent, ChangeKind, type_channel
from tests.cli import atrium, environment
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import Crm, create_activity, create_company, create_contact, create_deal, gid, seed_crm, uuid_of

MakeTenant = Callable[..., Awaitable[TenantWorld]]
DAY = 86_400.0


@pytest.fixture(scope="module")
async def apps(settings: Settings) -> AsyncIterator[dict[str, Starlette]]:
    """The app with plans and without, each as deployed and as the superuser (no RLS)."""
    made = {f"{rls}-{plans}": create_app(replace(settings, plans=plans == "plans", pool_size=1,
                                                 app_database_url=settings.app_database_url if rls == "rls"
                                                 else settings.database_url))
            for rls in ("rls", "filters-only") for plans in ("plans", "executor")}
    async with AsyncExitStack() as stack:
        for application in made.values():
            await stack.enter_async_context(application.router.lifespan_context(application))
        yield made


@pytest.fixture(params=["rls-plans", "rls-executor", "filters-only-plans", "filters-only-executor"])
async def client(request: pytest.FixtureRequest, apps: dict[str, Starlette]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[request.param]),
                                 base_url="http://atrium.test") as c:
        yield c


@pytest.fixture
async def one_client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app as deployed, for tests whose subject is not a read path."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as c:
        yield c


async def ok(client: httpx.AsyncClient, token: str, query: str, **variables: Any) -> dict[str, Any]:
    return data_or_fail(await gql(client, query, variables, token=token))


async def db_row(engine: AsyncEngine, table: Table, tenant: TenantWorld, key: uuid.UUID) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(table).where(table.c.tenant_id == tenant.id, table.c.id == key))).first()


async def actions(engine: AsyncEngine, tenant: TenantWorld, key: uuid.UUID) -> list[str]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(AUDIT_EVENTS.c.action).where(
            AUDIT_EVENTS.c.tenant_id == tenant.id, AUDIT_EVENTS.c.entity_id == key)
            .order_by(AUDIT_EVENTS.c.occurred_at, AUDIT_EVENTS.c.id))).all()
    return [r.action for r in rows]


async def delete(client: httpx.AsyncClient, token: str, type_name: str, id: str) -> None:
    await ok(client, token, f"mutation($id: ID!) {{ delete{type_name}(id: $id) {{ deletedId }} }}", id=id)


async def restore(client: httpx.AsyncClient, token: str, type_name: str, id: str) -> dict[str, Any]:
    return await gql(client, f"mutation($id: ID!) {{ restore{type_name}(id: $id) {{ id version }} }}", {"id": id},
                     token=token)


async def line_item(client: httpx.AsyncClient, token: str, deal: str, price: str = "10.00") -> dict[str, Any]:
    product = (await ok(client, token, """mutation($i: ProductInput!) { createProduct(input: $i) { id } }""",
                        i={"name": "Widget", "sku": f"W-{uuid.uuid4().hex[:8]}", "unitPrice": price,
                           "currency": "USD"}))["createProduct"]
    made: dict[str, Any] = (await ok(client, token, """mutation($d: ID!, $p: ID!) { createDealLineItem(input: {
        dealId: $d, productId: $p, quantity: 1}) { id } }""", d=deal, p=product["id"]))["createDealLineItem"]
    return made


EVERY_READ = """query($deal: ID!, $company: ID!, $contact: ID!, $activity: ID!, $pipeline: ID!, $line: ID!,
                      $tag: String!) {
  deals { totalCount nodes { id } }
  found: deals(filter: {search: $tag}) { totalCount nodes { id } }
  byCompany: deals(filter: {companyId: $company}) { totalCount }
  deal(id: $deal) { id }
  node(id: $deal) { id }
  company(id: $company) { deals { id } activities { id } contacts { id } }
  contact(id: $contact) { deals { id } }
  activity: node(id: $activity) { ... on Activity { deal { id } company { id } } }
  activities { totalCount nodes { id deal { id } } }
  pipelineSummary(pipelineId: $pipeline) { count total }
  dealLineItems { totalCount }
  dealLineItem(id: $line) { id }
  pipeline(id: $pipeline) { stages { deals { id } } }
}"""


def every_read(crm: Crm, line: dict[str, Any]) -> dict[str, Any]:
    return {"deal": crm.deal["id"], "company": crm.company["id"], "contact": crm.contact["id"],
            "activity": crm.activity["id"], "pipeline": crm.pipeline["id"], "line": line["id"], "tag": crm.tag}


async def test_every_read_path_hides_a_trashed_deal(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                    admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("trash")
    token = tenant.token(Role.ADMIN)
    crm = await seed_crm(client, token)
    line = await line_item(client, token, crm.deal["id"])
    note = (await ok(client, token, "mutation($d: ID!) { createNote(input: {dealId: $d}) { id } }",
                     d=crm.deal["id"]))["createNote"]
    variables = every_read(crm, line)
    seen = await ok(client, token, EVERY_READ, **variables)
    deal = crm.deal["id"]
    assert seen["deals"] == {"totalCount": 1, "nodes": [{"id": deal}]} and seen["found"]["totalCount"] == 1
    assert seen["deal"] == {"id": deal} and seen["node"] == {"id": deal} and seen["company"]["deals"] == [{"id": deal}]
    assert seen["activity"]["deal"] == {"id": deal} and seen["pipelineSummary"][0]["count"] == 1
    assert seen["dealLineItems"]["totalCount"] == 1 and seen["dealLineItem"] == {"id": line["id"]}

    await delete(client, token, "Deal", deal)

    gone = await ok(client, token, EVERY_READ, **variables)
    assert gone["deals"] == {"totalCount": 0, "nodes": []} and gone["found"] == {"totalCount": 0, "nodes": []}
    assert gone["byCompany"] == {"totalCount": 0}
    assert gone["deal"] is None and gone["node"] is None and gone["dealLineItem"] is None
    assert gone["company"] == {"deals": [], "activities": [{"id": crm.activity["id"]}],
                               "contacts": [{"id": crm.contact["id"]}]}
    assert gone["contact"] == {"deals": []}
    # The activity is also about the contact and the company: it stays, its link to the deal reads null.
    assert gone["activity"] == {"deal": None, "company": {"id": crm.company["id"]}}
    assert gone["activities"] == {"totalCount": 1, "nodes": [{"id": crm.activity["id"], "deal": None}]}
    assert gone["pipelineSummary"] == [] and gone["dealLineItems"] == {"totalCount": 0}
    assert gone["pipeline"] == {"stages": [{"deals": []}, {"deals": []}, {"deals": []}]}
    assert (await ok(client, token, "query($r: ID!) { notes(recordId: $r) { id } }", r=deal)) == {"notes": []}
    assert (await ok(client, token, "query($n: ID!) { note(id: $n) { id } }", n=note["id"]))["note"] is None
    # The database keeps it all, linked: the deal and what went with it are one batch.
    for table, key in ((DEALS, deal), (DEAL_LINE_ITEMS, line["id"]), (NOTES, note["id"])):
        row = await db_row(admin_engine, table, tenant, uuid_of(key))
        assert row.deleted_at is not None and row.trash_batch == uuid_of(deal), table.name
    assert (await db_row(admin_engine, ACTIVITIES, tenant, uuid_of(crm.activity["id"]))).deal_id == uuid_of(deal)

    # By id it is NOT_FOUND, as another tenant's would be: to change, to delete, or to point at.
    for document, field in (("mutation($id: ID!) { updateDeal(id: $id, input: {title: \"x\"}) { id } }", "id"),
                            ("mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }", "id"),
                            ("mutation($id: ID!, $s: ID!) { moveDeal(id: $id, stageId: $s) { id } }", "id"),
                            ("mutation($id: ID!) { createActivity(input: {kind: NOTE, subject: \"s\", dealId: $id}) "
                             "{ id } }", "dealId")):
        body = await gql(client, document, {"id": deal, "s": crm.pipeline["stages"][1]["id"]}, token=token)
        assert codes(body) == ["NOT_FOUND"] and body["errors"][0]["extensions"].get("field", "id") == field, body


async def test_a_trashed_company_takes_what_cannot_be_without_it_and_comes_back_with_its_links(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    """CASCADE dependents (notes) and SET_NULL ones left with no link (an activity about the company
    alone) go along; SET_NULL ones with another link stay, linked in the database, reading null."""
    tenant = await make_tenant("trash")
    token = tenant.token(Role.ADMIN)
    crm = await seed_crm(client, token)
    alone = await create_activity(client, token, subject="About the company alone", company_id=crm.company["id"])
    note = (await ok(client, token, "mutation($c: ID!) { createNote(input: {companyId: $c}) { id } }",
                     c=crm.company["id"]))["createNote"]
    company = crm.company["id"]
    read = """query($c: ID!, $p: ID!, $d: ID!, $a: ID!, $n: ID!) { company(id: $c) { name activities { id } }
        contact(id: $p) { company { id } version } deal(id: $d) { company { id } version }
        alone: node(id: $a) { id } note(id: $n) { id } companies { totalCount }
        linkedDeals: deals(filter: {companyId: $c}) { totalCount }
        linked: contacts(filter: {companyId: $c}) { totalCount }
        linkedActivities: activities(filter: {companyId: $c}) { totalCount }
        searched: contacts(filter: {search: "Company"}) { totalCount } }"""
    ids = {"c": company, "p": crm.contact["id"], "d": crm.deal["id"], "a": alone["id"], "n": note["id"]}
    before = await ok(client, token, read, **ids)

    await delete(client, token, "Company", company)
    hidden = await ok(client, token, read, **ids)
    assert hidden["company"] is None and hidden["alone"] is None and hidden["note"] is None
    assert hidden["companies"] == {"totalCount": 0}
    assert before["linkedDeals"] == before["linked"] == {"totalCount": 1}
    assert before["linkedActivities"] == {"totalCount": 2}
    # Nothing is linked to a company in the trash: filters by it find nothing, as its links read null.
    assert hidden["linkedDeals"] == hidden["linked"] == hidden["linkedActivities"] == {"totalCount": 0}
    assert hidden["contact"] == {"company": None, "version": 1} and hidden["deal"] == {"company": None, "version": 1}
    deal_search = await ok(client, token, "query($t: String!) { deals(filter: {search: $t}) { totalCount } }",
                           t=f"Company {crm.tag}")
    assert deal_search["deals"]["totalCount"] == 0  # a deal is not found by its trashed company's name
    for table, key in ((ACTIVITIES, alone["id"]), (NOTES, note["id"])):
        assert (await db_row(admin_engine, table, tenant, uuid_of(key))).trash_batch == uuid_of(company)
    assert (await db_row(admin_engine, ACTIVITIES, tenant, uuid_of(crm.activity["id"]))).deleted_at is None

    # What went along cannot be restored on its own: the company brings it back.
    body = await restore(client, token, "Activity", alone["id"])
    assert codes(body) == ["BAD_USER_INPUT"] and company in body["errors"][0]["message"]
    restored = data_or_fail(await restore(client, token, "Company", company))["restoreCompany"]
    assert restored["id"] == company
    after = await ok(client, token, read, **ids)
    assert after["company"]["name"] == before["company"]["name"]
    assert sorted(a["id"] for a in after["company"]["activities"]) == sorted(
        a["id"] for a in before["company"]["activities"])
    assert after == {**before, "company": after["company"]}
    assert after["contact"]["version"] == 1  # its link was kept, never written
    assert await actions(admin_engine, tenant, uuid_of(company)) == ["create", "trash", "restore"]
    assert await actions(admin_engine, tenant, uuid_of(alone["id"])) == ["create", "trash", "restore"]
    # Not in the trash (any more): NOT_FOUND.
    assert codes(await restore(client, token, "Company", company)) == ["NOT_FOUND"]


async def test_restore_refuses_a_record_whose_parent_is_in_the_trash(
        client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("trash")
    token = tenant.token(Role.ADMIN)
    crm = await seed_crm(client, token)
    deal = crm.deal["id"]
    first, second = await line_item(client, token, deal, "10.00"), await line_item(client, token, deal, "2.50")
    amount = "query($d: ID!) { deal(id: $d) { amount lineItems { id } } }"
    assert (await ok(client, token, amount, d=deal))["deal"]["amount"] == "12.50"

    # A line item trashed on its own leaves the deal's total (a rollup over what is not in the trash).
    await delete(client, token, "DealLineItem", first["id"])
    assert (await ok(client, token, amount, d=deal))["deal"] == {"amount": "2.50", "lineItems": [{"id": second["id"]}]}
    data_or_fail(await restore(client, token, "DealLineItem", first["id"]))
    assert (await ok(client, token, amount, d=deal))["deal"]["amount"] == "12.50"

    await delete(client, token, "DealLineItem", first["id"])
    await delete(client, token, "Deal", deal)
    body = await restore(client, token, "DealLineItem", first["id"])
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "dealId"
    # The deal comes back with the line item that went with it; the one trashed before stays there.
    data_or_fail(await restore(client, token, "Deal", deal))
    assert (await ok(client, token, amount, d=deal))["deal"] == {"amount": "2.50", "lineItems": [{"id": second["id"]}]}
    data_or_fail(await restore(client, token, "DealLineItem", first["id"]))
    assert (await ok(client, token, amount, d=deal))["deal"]["amount"] == "12.50"

    # An activity whose every link is in the trash waits for one of them.
    lone = await create_activity(client, token, subject="Deal only", deal_id=deal)
    await delete(client, token, "Activity", lone["id"])
    await delete(client, token, "Deal", deal)
    body = await restore(client, token, "Activity", lone["id"])
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "dealId"


async def test_restrict_counts_the_trash(one_client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """A stage or pipeline whose deals are all in the trash still cannot go: BAD_USER_INPUT saying so."""
    tenant = await make_tenant("trash")
    token = tenant.token(Role.ADMIN)
    crm = await seed_crm(one_client, token)
    await delete(one_client, token, "Deal", crm.deal["id"])
    for document, id in (("mutation($id: ID!) { deleteStage(id: $id) { deletedId } }", crm.stage["id"]),
                         ("mutation($id: ID!) { deletePipeline(id: $id) { deletedId } }", crm.pipeline["id"])):
        body = await gql(one_client, document, {"id": id}, token=token)
        assert codes(body) == ["BAD_USER_INPUT"], body
        assert "trash" in body["errors"][0]["message"]
    kept = await ok(one_client, token, "query($id: ID!) { pipeline(id: $id) { id } }", id=crm.pipeline["id"])
    assert kept["pipeline"] == {"id": crm.pipeline["id"]}


TRASH = """query($type: TrashType!, $after: String) { trash(type: $type, first: 1, after: $after) {
    totalCount edges { cursor node { deletedAt purgeAfter deletedBy { id } record { id ... on Deal { title } } } }
    pageInfo { hasNextPage endCursor } } }"""


async def test_the_trash_lists_what_was_deleted_by_whom_for_admins(
        one_client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("trash")
    admin = tenant.token(Role.ADMIN)
    crm = await seed_crm(one_client, admin)
    other = await create_deal(one_client, admin, crm.stage["id"], title="Second")
    await delete(one_client, admin, "Deal", crm.deal["id"])
    await delete(one_client, tenant.token(Role.OWNER), "Deal", other["id"])

    page = (await ok(one_client, admin, TRASH, type="DEAL"))["trash"]
    assert page["totalCount"] == 2 and page["pageInfo"]["hasNextPage"]
    (newest,) = page["edges"]
    assert newest["node"]["record"] == {"id": other["id"], "title": "Second"}
    assert newest["node"]["deletedBy"] == {"id": gid("User", tenant.users[Role.OWNER])}
    deleted_at = dt.datetime.fromisoformat(newest["node"]["deletedAt"])
    assert dt.datetime.fromisoformat(newest["node"]["purgeAfter"]) == deleted_at + dt.timedelta(days=30)
    rest = (await ok(one_client, admin, TRASH, type="DEAL", after=page["pageInfo"]["endCursor"]))["trash"]
    assert [e["node"]["record"]["id"] for e in rest["edges"]] == [crm.deal["id"]]
    assert not rest["pageInfo"]["hasNextPage"]
    assert rest["edges"][0]["node"]["deletedBy"] == {"id": gid("User", tenant.users[Role.ADMIN])}
    # The activity on the deal stays (it is about the contact too); what went along is not listed.
    assert (await ok(one_client, admin, TRASH, type="ACTIVITY"))["trash"]["totalCount"] == 0
    for role in (Role.MEMBER, Role.VIEWER):
        assert codes(await gql(one_client, TRASH, {"type": "DEAL"}, token=tenant.token(role))) == ["FORBIDDEN"]


async def test_trash_and_restore_are_published(app: Starlette, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("trash")
    token = tenant.token(Role.ADMIN)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        company = await create_company(client, token, name="Published")
        alone = await create_activity(client, token, subject="Alone", company_id=company["id"])
        async with app.state.runtime.broker.subscribe(type_channel(tenant.id, "Activity")) as queue:
            await delete(client, token, "Company", company["id"])
            trashed = await queue.get()
            data_or_fail(await restore(client, token, "Company", company["id"]))
            restored = await queue.get()
    assert isinstance(trashed, ChangeEvent) and isinstance(restored, ChangeEvent)
    assert (trashed.kind, trashed.entity_id, trashed.detail) == (ChangeKind.DELETED, uuid_of(alone["id"]),
                                                                 {"trash": "trashed"})
    assert (restored.kind, restored.entity_id, restored.detail) == (ChangeKind.CREATED, uuid_of(alone["id"]),
                                                                    {"trash": "restored"})
    assert restored.version == trashed.version + 1
    assert change_fields(trashed)["trash"] is TrashAction.TRASHED
    assert change_fields(restored)["trash"] is TrashAction.RESTORED


@pytest.fixture(scope="module")
async def clocked(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, ManualClock]]:
    clock = ManualClock()
    application = create_app(replace(settings, pool_size=1), clock=clock)
    async with application.router.lifespan_context(application), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="http://atrium.test") as c:
        yield c, clock


async def test_a_purge_removes_what_is_past_retention_for_good(
        clocked: tuple[httpx.AsyncClient, ManualClock], make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    client, clock = clocked
    tenant = await make_tenant("purge")
    month = int(30 * DAY)  # the tokens outlive the days the clock is moved on
    admin, owner = tenant.token(Role.ADMIN, ttl_seconds=month), tenant.token(Role.OWNER, ttl_seconds=month)
    crm = await seed_crm(client, admin)
    line = await line_item(client, admin, crm.deal["id"])
    later = await create_contact(client, admin, last_name="Later")
    purge = "mutation { purgeTrash { purged kept } }"
    await delete(client, admin, "Deal", crm.deal["id"])
    row = await db_row(admin_engine, DEALS, tenant, uuid_of(crm.deal["id"]))
    assert row.deleted_at == dt.datetime.fromtimestamp(clock.time(), dt.UTC)  # the app's clock
    clock.advance(6 * DAY)
    await delete(client, admin, "Contact", later["id"])

    assert (await ok(client, admin, purge))["purgeTrash"] == {"purged": 0, "kept": 0}
    assert codes(await gql(client, "mutation { setTrashRetention(days: 5) { id } }", token=admin)) == ["FORBIDDEN"]
    assert codes(await gql(client, "mutation { setTrashRetention(days: 0) { id } }", token=owner)) == [
        "BAD_USER_INPUT"]
    assert (await ok(client, owner, "mutation { setTrashRetention(days: 5) { trashRetentionDays } }")) == {
        "setTrashRetention": {"trashRetentionDays": 5}}
    assert (await ok(client, admin, purge))["purgeTrash"] == {"purged": 2, "kept": 0}  # the deal and its line item

    assert await db_row(admin_engine, DEALS, tenant, uuid_of(crm.deal["id"])) is None
    assert await db_row(admin_engine, DEAL_LINE_ITEMS, tenant, uuid_of(line["id"])) is None
    assert (await db_row(admin_engine, CONTACTS, tenant, uuid_of(later["id"]))).deleted_at is not None
    # (the deal's amount followed its line item: an update)
    assert await actions(admin_engine, tenant, uuid_of(crm.deal["id"])) == ["create", "update", "trash", "purge"]
    assert await actions(admin_engine, tenant, uuid_of(line["id"])) == ["create", "trash", "purge"]
    # The activity that stayed loses its link to the purged deal for real, as a changed record.
    activity = await db_row(admin_engine, ACTIVITIES, tenant, uuid_of(crm.activity["id"]))
    assert activity.deal_id is None and activity.version == 2
    assert codes(await restore(client, admin, "Deal", crm.deal["id"])) == ["NOT_FOUND"]

    # The scheduler's function: past a retention of its own, or each tenant's.
    moment = dt.datetime.fromtimestamp(clock.time(), dt.UTC)
    assert await purge_trash(admin_engine, dt.timedelta(days=1), tenant_id=tenant.id, now=moment) == {tenant.id: 0}
    purged = await purge_trash(admin_engine, tenant_id=tenant.id, now=moment + dt.timedelta(days=5, seconds=1))
    assert purged == {tenant.id: 1}
    assert await db_row(admin_engine, CONTACTS, tenant, uuid_of(later["id"])) is None
    async with admin_engine.connect() as conn:
        actor = (await conn.execute(select(AUDIT_EVENTS.c.actor_id).where(
            AUDIT_EVENTS.c.entity_id == uuid_of(later["id"]), AUDIT_EVENTS.c.action == "purge"))).scalar_one()
    assert actor is None  # the system's own work


async def test_a_unique_value_in_the_trash_stays_taken_until_purged(one_client: httpx.AsyncClient,
                                                                    make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("trash-unique")
    admin = tenant.token(Role.ADMIN)
    create = 'mutation($e: String) { createCompany(input: {name: "Held", externalId: $e}) { id externalId } }'
    held = (await ok(one_client, admin, create, e="crm-42"))["createCompany"]
    await delete(one_client, admin, "Company", held["id"])
    refused = await gql(one_client, create, {"e": "crm-42"}, token=admin)
    assert codes(refused) == ["BAD_USER_INPUT"] and refused["errors"][0]["extensions"]["field"] == "externalId"
    batch = await gql(one_client, "mutation { createCompanies(input: [{name: \"B\", externalId: \"crm-42\"}]) "
                                  "{ id } }", token=admin)
    assert codes(batch) == ["BAD_USER_INPUT"], batch
    assert (await restore(one_client, admin, "Company", held["id"])).get("errors") is None  # nothing took it
    await delete(one_client, admin, "Company", held["id"])
    await ok(one_client, admin, "mutation($id: ID!) { purgeTrash(id: $id) { purged } }", id=held["id"])
    assert (await ok(one_client, admin, create, e="crm-42"))["createCompany"]["externalId"] == "crm-42"


async def test_purge_of_one_record_now(one_client: httpx.AsyncClient, make_tenant: MakeTenant,
                                       admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("purge")
    admin = tenant.token(Role.ADMIN)
    crm = await seed_crm(one_client, admin)
    purge = "mutation($id: ID!) { purgeTrash(id: $id) { purged } }"
    assert codes(await gql(one_client, purge, {"id": crm.contact["id"]}, token=admin)) == ["NOT_FOUND"]  # not trashed
    assert codes(await gql(one_client, purge, {"id": crm.stage["id"]}, token=admin)) == ["BAD_USER_INPUT"]
    await delete(one_client, admin, "Contact", crm.contact["id"])
    assert codes(await gql(one_client, purge, {"id": crm.contact["id"]}, token=tenant.token(Role.MEMBER))) == [
        "FORBIDDEN"]
    assert (await ok(one_client, admin, purge, id=crm.contact["id"]))["purgeTrash"] == {"purged": 1}
    assert await db_row(admin_engine, CONTACTS, tenant, uuid_of(crm.contact["id"])) is None
    deal = await db_row(admin_engine, DEALS, tenant, uuid_of(crm.deal["id"]))
    assert deal.contact_id is None and deal.deleted_at is None


async def test_the_cli_purges_a_tenant(make_tenant: MakeTenant, one_client: httpx.AsyncClient,
                                       settings: Settings, admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("purgecli")
    token = tenant.token(Role.ADMIN)
    company = await create_company(one_client, token, name="Old")
    await delete(one_client, token, "Company", company["id"])
    env = environment(DATABASE_URL=str(settings.database_url))
    kept = await atrium("trash", "purge", "--tenant", tenant.slug, env=env)
    assert (kept.status, kept.stdout) == (0, f"{tenant.slug}: purged 0 records\n"), kept
    ran = await atrium("trash", "purge", "--tenant", tenant.slug, "--older-than-days", "0", env=env)
    assert (ran.status, ran.stdout) == (0, f"{tenant.slug}: purged 1 records\n"), ran
    assert await db_row(admin_engine, COMPANIES, tenant, uuid_of(company["id"])) is None
    unknown = await atrium("trash", "purge", "--tenant", "no-such-tenant", env=env)
    assert unknown.status == 2 and "no tenant 'no-such-tenant'" in unknown.stderr


async def test_another_tenant_cannot_trash_restore_see_or_purge(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    a, b = await make_tenant("trash"), await make_tenant("trash")
    crm = await seed_crm(client, a.token(Role.ADMIN))
    intruder = b.token(Role.OWNER)
    deal = crm.deal["id"]
    body = await gql(client, "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }", {"id": deal}, token=intruder)
    assert codes(body) == ["NOT_FOUND"]
    assert (await db_row(admin_engine, DEALS, a, uuid_of(deal))).deleted_at is None
    await delete(client, a.token(Role.ADMIN), "Deal", deal)
    assert codes(await restore(client, intruder, "Deal", deal)) == ["NOT_FOUND"]
    assert codes(await gql(client, "mutation($id: ID!) { purgeTrash(id: $id) { purged } }", {"id": deal},
                           token=intruder)) == ["NOT_FOUND"]
    assert (await ok(client, intruder, "mutation { purgeTrash { purged } }"))["purgeTrash"] == {"purged": 0}
    assert (await ok(client, intruder, TRASH, type="DEAL"))["trash"]["totalCount"] == 0
    assert (await ok(client, a.token(Role.ADMIN), TRASH, type="DEAL"))["trash"]["totalCount"] == 1
    assert (await db_row(admin_engine, DEALS, a, uuid_of(deal))).deleted_at is not None


async def test_rls_hides_the_trash_from_statements_without_the_applications_filter(
        one_client: httpx.AsyncClient, make_tenant: MakeTenant, databases: Databases) -> None:
    """As the app role, with no tenant or trash condition in the statement: PostgreSQL alone hides
    trashed rows, shows them only to a transaction that asks (and then only its tenant's), and will
    not let a statement move a row in or out of the trash without asking."""
    a, b = await make_tenant("trash"), await make_tenant("trash")
    crm_a, crm_b = await seed_crm(one_client, a.token(Role.ADMIN)), await seed_crm(one_client, b.token(Role.ADMIN))
    for world, crm in ((a, crm_a), (b, crm_b)):
        await delete(one_client, world.token(Role.ADMIN), "Company", crm.company["id"])
    trashed, live = uuid_of(crm_a.company["id"]), await create_company(one_client, a.token(Role.ADMIN), name="Live")
    scope = TenantScope(databases, a.id)
    try:
        assert {r.id for r in await scope.fetch(select(COMPANIES))} == {uuid_of(live["id"])}
        assert (await scope.fetch(select(func.count()).select_from(COMPANIES)))[0][0] == 1
        shown = {r.id for r in await scope.fetch_trash(select(COMPANIES))}
        assert shown == {trashed, uuid_of(live["id"])}  # its own trash only, never B's
        assert {r.id for r in await scope.fetch(select(COMPANIES))} == {uuid_of(live["id"])}  # and only then

        class Unfiltered:
            query = select(COMPANIES)
            key = COMPANIES.c.id

        assert await Loaders(scope).one(Unfiltered()).load(trashed) is None

        async with scope.write() as conn:
            untrash = await conn.execute(update(COMPANIES).where(COMPANIES.c.id == trashed)
                                         .values(deleted_at=None, trash_batch=None).returning(COMPANIES.c.id))
            assert untrash.all() == []
        with pytest.raises(DBAPIError, match="row-level security"):
            async with scope.write() as conn:
                await conn.execute(update(COMPANIES).where(COMPANIES.c.id == uuid_of(live["id"]))
                                   .values(deleted_at=func.now(), trash_batch=COMPANIES.c.id))
        with pytest.raises(DBAPIError, match="row-level security"):
            async with scope.write() as conn:
                await conn.execute(insert(COMPANIES).values(tenant_id=a.id, id=uuid.uuid4(), name="Hidden",
                                                            deleted_at=func.now(), trash_batch=uuid.uuid4()))
        async with scope.write() as conn:
            setting = await conn.execute(text("SELECT current_setting('atrium.trash', true)"))
            assert setting.scalar() in (None, "", "off")
    finally:
        await scope.close()


def test_a_trashable_records_cascade_dependents_must_be_trashable() -> None:
    from records.crm import check_trash

    parent = Record("Parent", COMPANIES, "parents", trash=True)
    child = Record("Child", CONTACTS, "children", relations=(ToOne("parent", "company_id", lambda: parent,
                                                                   OnDelete.CASCADE),))
    with pytest.raises(TypeError, match="Child must be too"):
        check_trash((parent, child))
    check_trash((parent, replace_trash(child)))
    # A unique field is allowed: its value stays taken while its record is in the trash (tested below).
    check_trash((Record("Sku", COMPANIES, "skus", fields=(Field("name", Text(10), unique=True),), trash=True),))


def replace_trash(record: Record) -> Record:
    return Record(record.name, record.table, record.plural, relations=tuple(
        ToOne(r.name, r.key, r.target, r.on_delete) for r in record.relations), trash=True)


async def test_a_member_who_leaves_is_unlinked_from_the_trash_too(
        one_client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    """Removing a member unlinks their deals, those in the trash as well (or the membership could not go)."""
    tenant = await make_tenant("trash")
    admin = tenant.token(Role.ADMIN)
    crm = await seed_crm(one_client, tenant.token(Role.MEMBER))  # the member owns the deal
    await delete(one_client, admin, "Deal", crm.deal["id"])
    await ok(one_client, admin, "mutation($u: ID!) { removeMember(userId: $u) { deletedId } }",
             u=gid("User", tenant.users[Role.MEMBER]))
    row = await db_row(admin_engine, DEALS, tenant, uuid_of(crm.deal["id"]))
    assert row.owner_id is None and row.deleted_at is not None
    restored = data_or_fail(await gql(one_client, "mutation($id: ID!) { restoreDeal(id: $id) { owner { id } } }",
                                      {"id": crm.deal["id"]}, token=admin))
    assert restored == {"restoreDeal": {"owner": None}}
