"""Batch writes (``createDeals``, ``updateDeals``, ``deleteDeals``, ``upsertDeals``, and every other
record type's): all or nothing, errors naming the record's index and field, at most 500 records, an
audit row and a change event per record, upserts by a tenant-unique external id, and isolation (with
the application's filters and with RLS alone)."""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
from graphql import OperationDefinitionNode, parse
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.schema import schema
from auth.principal import Principal
from core.errors import NotFound
from core.limits import MAX_BATCH
from core.settings import Settings
from models.db import Databases
from models.tables import ACTIVITIES, AUDIT_EVENTS, COMPANIES, DEALS, STAGES, Role
from records.crm import DEAL
from resolvers import batch
from resolvers.writes import Change
from schema.cost import operation_cost
from subscriptions.events import ChangeEvent, ChangeKind, type_channel
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_activity, create_company, create_deal, create_pipeline, gid, uuid_of
from tests.live import AtriumProcess, live
from tests.wire import wired_app

MakeTenant = Callable[..., Awaitable[TenantWorld]]

CREATE = """
mutation($input: [DealInput!]!) {
  createDeals(input: $input) { id title amount currency version externalId stage { id } owner { id } }
}"""
UPDATE = "mutation($input: [DealUpdate!]!) { updateDeals(input: $input) { id title amount version } }"
DELETE = "mutation($input: [DeleteInput!]!) { deleteDeals(input: $input) { deletedIds } }"
UPSERT = """
mutation($input: [DealUpsert!]!) {
  upsertDeals(input: $input) { created record { id title amount externalId version company { id } } }
}"""


def deal_inputs(stage_id: str, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"title": f"Batch deal {i}", "amount": f"{100 + i}.00", "currency": "EUR", "stageId": stage_id, **extra}
            for i in range(n)]


async def stage_of(client: httpx.AsyncClient, token: str) -> str:
    pipeline = await create_pipeline(client, token)
    stage: str = pipeline["stages"][0]["id"]
    return stage


async def deal_count(admin_engine: AsyncEngine, tenant_id: uuid.UUID) -> int:
    """The tenant's deals not in the trash."""
    async with admin_engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(DEALS).where(
            DEALS.c.tenant_id == tenant_id, DEALS.c.deleted_at.is_(None)))).scalar_one())


async def audit_rows(admin_engine: AsyncEngine, tenant_id: uuid.UUID, action: str) -> list[Any]:
    async with admin_engine.connect() as conn:
        return list((await conn.execute(select(AUDIT_EVENTS).where(
            AUDIT_EVENTS.c.tenant_id == tenant_id, AUDIT_EVENTS.c.entity_type == "Deal",
            AUDIT_EVENTS.c.action == action))).all())


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    """The one error of a failed batch (no data)."""
    assert body.get("data") is None and len(body["errors"]) == 1, body
    ext: dict[str, Any] = body["errors"][0]["extensions"]
    return ext


# ---- creates --------------------------------------------------------------------------------------

async def test_created_deals_come_back_in_order_each_audited_and_published(
        app: Starlette, client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bcre")
    token = world.token(Role.MEMBER)
    stage = await stage_of(client, token)
    inputs = deal_inputs(stage, 5, ownerId=gid("User", world.users[Role.ADMIN]))
    inputs[2]["externalId"] = "crm-2"
    async with app.state.runtime.broker.subscribe(type_channel(world.id, "Deal")) as queue:
        created = data_or_fail(await gql(client, CREATE, {"input": inputs}, token=token))["createDeals"]
        events = [await asyncio.wait_for(queue.get(), 5) for _ in created]
    assert [d["title"] for d in created] == [f"Batch deal {i}" for i in range(5)]
    assert [d["amount"] for d in created] == [f"{100 + i}.00" for i in range(5)]
    assert all(d["stage"]["id"] == stage and d["version"] == 1 for d in created)
    assert all(d["owner"]["id"] == gid("User", world.users[Role.ADMIN]) for d in created)
    assert [d["externalId"] for d in created] == [None, None, "crm-2", None, None]
    ids = [uuid_of(d["id"]) for d in created]
    assert len(set(ids)) == 5
    audited = await audit_rows(admin_engine, world.id, "create")
    assert sorted(row.entity_id for row in audited) == sorted(ids)
    assert all(row.actor_id == world.users[Role.MEMBER] for row in audited)
    by_id = {row.entity_id: row.diff["after"] for row in audited}
    assert by_id[ids[3]]["title"] == "Batch deal 3" and by_id[ids[3]]["amount"] == "103.00"
    assert all(isinstance(e, ChangeEvent) and e.kind is ChangeKind.CREATED and e.committed_at for e in events)
    assert [e.entity_id for e in events] == ids


async def test_owner_defaults_to_the_caller_per_record(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("bown")
    token = world.token(Role.MEMBER)
    inputs = deal_inputs(await stage_of(client, token), 2)
    inputs[1]["ownerId"] = gid("User", world.users[Role.OWNER])
    created = data_or_fail(await gql(client, CREATE, {"input": inputs}, token=token))["createDeals"]
    assert [d["owner"]["id"] for d in created] == [gid("User", world.users[Role.MEMBER]),
                                                   gid("User", world.users[Role.OWNER])]


@pytest.mark.parametrize(("bad", "field", "code"), [
    ({"amount": "-5"}, "amount", "BAD_USER_INPUT"),
    ({"amount": "1.234"}, "amount", "BAD_USER_INPUT"),
    ({"amount": "not a number"}, "amount", "BAD_USER_INPUT"),
    ({"currency": "EURO"}, "currency", "BAD_USER_INPUT"),
    ({"title": "   "}, "title", "BAD_USER_INPUT"),
    ({"stageId": gid("Stage", uuid.uuid4())}, "stageId", "NOT_FOUND"),
    ({"companyId": gid("Company", uuid.uuid4())}, "companyId", "NOT_FOUND"),
    ({"ownerId": gid("User", uuid.uuid4())}, "ownerId", "NOT_FOUND"),
    ({"contactId": "garbage"}, "contactId", "BAD_USER_INPUT"),
    ({"externalId": "dup"}, "externalId", "BAD_USER_INPUT"),
])
async def test_one_bad_record_fails_the_batch_naming_its_index_and_field(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine,
        bad: dict[str, Any], field: str, code: str) -> None:
    world = await make_tenant("bbad")
    token = world.token()
    inputs = deal_inputs(await stage_of(client, token), 5)
    inputs[1]["externalId"] = "dup"  # the duplicate case repeats it at index 3
    inputs[3].update(bad)
    body = await gql(client, CREATE, {"input": inputs}, token=token)
    assert codes(body) == [code], body
    assert error_of(body)["field"] == f"input.3.{field}" and error_of(body)["index"] == 3
    assert body["errors"][0]["message"].startswith("input.3")
    assert await deal_count(admin_engine, world.id) == 0
    assert await audit_rows(admin_engine, world.id, "create") == []


async def test_record_checks_name_the_index(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                            admin_engine: AsyncEngine) -> None:
    """Activities: the record-level check (a deal, contact or company) fails the fourth record only."""
    world = await make_tenant("bchk")
    token = world.token()
    company = await create_company(client, token)
    activities = [{"kind": "NOTE", "subject": f"Note {i}", "companyId": company["id"]} for i in range(4)]
    activities[3].pop("companyId")
    body = await gql(client, "mutation($input: [ActivityInput!]!) { createActivities(input: $input) { id } }",
                     {"input": activities}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and error_of(body)["field"] == "input.3.dealId"
    activities[3]["companyId"] = company["id"]
    made = data_or_fail(await gql(client, "mutation($input: [ActivityInput!]!) { createActivities(input: $input) "
                                          "{ subject company { id } } }", {"input": activities}, token=token))
    assert [a["subject"] for a in made["createActivities"]] == [f"Note {i}" for i in range(4)]


async def test_at_most_500_records_per_batch(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                             admin_engine: AsyncEngine) -> None:
    world = await make_tenant("blim")
    token = world.token()
    stage = await stage_of(client, token)
    body = await gql(client, CREATE, {"input": deal_inputs(stage, MAX_BATCH + 1)}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and error_of(body)["field"] == "input"
    assert await deal_count(admin_engine, world.id) == 0
    made = data_or_fail(await gql(client, "mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }",
                                  {"input": deal_inputs(stage, MAX_BATCH)}, token=token))
    assert len(made["createDeals"]) == MAX_BATCH == await deal_count(admin_engine, world.id)
    assert len(await audit_rows(admin_engine, world.id, "create")) == MAX_BATCH


async def test_batches_need_the_single_writes_permission(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                         admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bperm")
    stage = await stage_of(client, world.token())
    deal = await create_deal(client, world.token(), stage)
    viewer = world.token(Role.VIEWER)
    assert codes(await gql(client, CREATE, {"input": deal_inputs(stage, 1)}, token=viewer)) == ["FORBIDDEN"]
    member = world.token(Role.MEMBER)
    assert codes(await gql(client, DELETE, {"input": [{"id": deal["id"]}]}, token=member)) == ["FORBIDDEN"]
    assert await deal_count(admin_engine, world.id) == 1


async def test_sequential_records_are_created_one_after_the_other(client: httpx.AsyncClient,
                                                                   make_tenant: MakeTenant) -> None:
    """Stages take the position after the last one: in a batch, each after the one before it."""
    world = await make_tenant("bseq")
    token = world.token()
    pipeline = await create_pipeline(client, token, stages=("Lead",))
    made = data_or_fail(await gql(client, """
        mutation($p: ID!, $input: [StageInput!]!) { createStages(pipelineId: $p, input: $input) { name position } }""",
        {"p": pipeline["id"], "input": [{"name": n, "probability": "0.5"} for n in ("A", "B", "C")]}, token=token))
    assert [(s["name"], s["position"]) for s in made["createStages"]] == [("A", 1), ("B", 2), ("C", 3)]
    pipelines = data_or_fail(await gql(client, """
        mutation($input: [PipelineInput!]!) { createPipelines(input: $input) { name stages { name position } } }""",
        {"input": [{"name": f"P{i}", "stages": [{"name": "x", "probability": "0.1"},
                                                {"name": "y", "probability": "0.2"}]} for i in range(2)]},
        token=token))["createPipelines"]
    assert [[(s["name"], s["position"]) for s in p["stages"]] for p in pipelines] == [[("x", 0), ("y", 1)]] * 2


# ---- updates and deletes --------------------------------------------------------------------------

async def test_updates_apply_each_record_or_none(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                 admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bupd")
    token = world.token()
    created = data_or_fail(await gql(client, CREATE, {"input": deal_inputs(await stage_of(client, token), 3)},
                                     token=token))["createDeals"]
    stale = [{"id": d["id"], "amount": "999.00", "expectedVersion": 1} for d in created]
    stale[2]["expectedVersion"] = 7
    body = await gql(client, UPDATE, {"input": stale}, token=token)
    assert codes(body) == ["VERSION_CONFLICT"]
    ext = error_of(body)
    assert ext["field"] == "input.2.expectedVersion" and ext["index"] == 2 and ext["currentVersion"] == 1
    bad = [{"id": d["id"], "title": "Renamed"} for d in created]
    bad[1]["amount"] = "-1"
    assert error_of(await gql(client, UPDATE, {"input": bad}, token=token))["field"] == "input.1.amount"
    twice = [{"id": created[0]["id"], "title": "a"}, {"id": created[0]["id"], "title": "b"}]
    assert error_of(await gql(client, UPDATE, {"input": twice}, token=token))["field"] == "input.1.id"
    async with admin_engine.connect() as conn:
        rows = (await conn.execute(select(DEALS.c.amount, DEALS.c.title, DEALS.c.version)
                                   .where(DEALS.c.tenant_id == world.id))).all()
    assert all(r.version == 1 and r.amount != Decimal("999.00") and r.title != "Renamed" for r in rows)
    stale[2]["expectedVersion"] = 1
    updated = data_or_fail(await gql(client, UPDATE, {"input": stale}, token=token))["updateDeals"]
    assert [(d["id"], d["amount"], d["version"]) for d in updated] == [(d["id"], "999.00", 2) for d in created]
    audited = await audit_rows(admin_engine, world.id, "update")
    assert sorted(r.entity_id for r in audited) == sorted(uuid_of(d["id"]) for d in created)
    assert all(r.diff == {"before": {"amount": str(Decimal(r.diff["before"]["amount"]))},
                          "after": {"amount": "999.00"}} for r in audited)


async def test_deletes_remove_each_record_or_none(app: Starlette, client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                  admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bdel")
    token = world.token()
    created = data_or_fail(await gql(client, CREATE, {"input": deal_inputs(await stage_of(client, token), 3)},
                                     token=token))["createDeals"]
    missing = [{"id": created[0]["id"]}, {"id": gid("Deal", uuid.uuid4())}, {"id": created[1]["id"]}]
    body = await gql(client, DELETE, {"input": missing}, token=token)
    assert codes(body) == ["NOT_FOUND"] and error_of(body)["field"] == "input.1.id"
    assert await deal_count(admin_engine, world.id) == 3
    targets = [{"id": d["id"], "expectedVersion": 1} for d in created[:2]]
    async with app.state.runtime.broker.subscribe(type_channel(world.id, "Deal")) as queue:
        deleted = data_or_fail(await gql(client, DELETE, {"input": targets}, token=token))["deleteDeals"]
        events = [await asyncio.wait_for(queue.get(), 5) for _ in targets]
    assert deleted == {"deletedIds": [d["id"] for d in created[:2]]}
    assert await deal_count(admin_engine, world.id) == 1  # the other two are in the trash
    assert [(e.kind, e.entity_id) for e in events] == [(ChangeKind.DELETED, uuid_of(d["id"])) for d in created[:2]]
    assert len(await audit_rows(admin_engine, world.id, "trash")) == 2


async def test_deleting_companies_in_a_batch_trashes_them_and_their_deals_read_none(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bdep")
    token = world.token()
    stage = await stage_of(client, token)
    companies = [await create_company(client, token) for _ in range(2)]
    deal = await create_deal(client, token, stage, company_id=companies[1]["id"])
    data_or_fail(await gql(client, "mutation($input: [DeleteInput!]!) { deleteCompanies(input: $input) "
                                   "{ deletedIds } }", {"input": [{"id": c["id"]} for c in companies]}, token=token))
    read = data_or_fail(await gql(client, "query($id: ID!) { deal(id: $id) { company { id } } }",
                                  {"id": deal["id"]}, token=token))
    assert read == {"deal": {"company": None}}
    async with admin_engine.connect() as conn:  # the link is kept for a restore (docs/trash.md)
        assert (await conn.execute(select(DEALS.c.company_id).where(DEALS.c.id == uuid_of(deal["id"])))).scalar() \
            == uuid_of(companies[1]["id"])
        assert (await conn.execute(select(func.count()).select_from(COMPANIES).where(
            COMPANIES.c.tenant_id == world.id, COMPANIES.c.deleted_at.is_(None)))).scalar() == 0


async def test_each_deleted_record_is_a_trash_batch_of_its_own(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                                admin_engine: AsyncEngine) -> None:
    """Set-based, the batch still trashes each record with what goes with it as if deleted alone:
    restoring one brings back its own activity and leaves the other's in the trash."""
    world = await make_tenant("bown")
    token = world.token()
    stage = await stage_of(client, token)
    deals = [await create_deal(client, token, stage) for _ in range(2)]
    activities = [await create_activity(client, token, deal_id=d["id"]) for d in deals]
    data_or_fail(await gql(client, DELETE, {"input": [{"id": d["id"]} for d in deals]}, token=token))
    async with admin_engine.connect() as conn:
        batches = dict((await conn.execute(select(ACTIVITIES.c.id, ACTIVITIES.c.trash_batch).where(
            ACTIVITIES.c.tenant_id == world.id))).all())
    assert batches == {uuid_of(a["id"]): uuid_of(d["id"]) for a, d in zip(activities, deals, strict=True)}
    data_or_fail(await gql(client, "mutation($id: ID!) { restoreDeal(id: $id) { id } }", {"id": deals[0]["id"]},
                           token=token))
    read = data_or_fail(await gql(client, "{ activities(first: 10) { nodes { id } } }", token=token))
    assert [a["id"] for a in read["activities"]["nodes"]] == [activities[0]["id"]]
    assert await deal_count(admin_engine, world.id) == 1


async def test_a_batch_delete_refused_by_a_dependent_names_its_index(client: httpx.AsyncClient,
                                                                    make_tenant: MakeTenant) -> None:
    """A product a line item uses cannot go to the trash (RESTRICT): the batch names that product's
    index, and the product before it stays where it was."""
    world = await make_tenant("bres")
    token = world.token(Role.ADMIN)
    products = [data_or_fail(await gql(client, "mutation($i: ProductInput!) { createProduct(input: $i) { id } }",
                                       {"i": {"name": f"P{i}", "sku": f"SKU-{i}", "unitPrice": "5.00",
                                              "currency": "USD"}}, token=token))["createProduct"] for i in range(2)]
    deal = await create_deal(client, token, await stage_of(client, token))
    data_or_fail(await gql(client, "mutation($i: DealLineItemInput!) { createDealLineItem(input: $i) { id } }",
                           {"i": {"dealId": deal["id"], "productId": products[1]["id"], "quantity": 1}}, token=token))
    body = await gql(client, "mutation($input: [DeleteInput!]!) { deleteProducts(input: $input) { deletedIds } }",
                     {"input": [{"id": p["id"]} for p in products]}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and error_of(body)["field"] == "input.1.id", body
    assert "still has deal line items" in body["errors"][0]["message"]
    read = data_or_fail(await gql(client, "{ products(first: 10) { nodes { id } } }", token=token))
    assert sorted(p["id"] for p in read["products"]["nodes"]) == sorted(p["id"] for p in products)


async def test_batch_updates_check_derived_and_unique_fields_naming_the_index(
        client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    """Set-based updates refuse what one update would: a deal's amount while its line items make it,
    a unique value another record holds (before the batch) or given twice in it."""
    world = await make_tenant("bder")
    token = world.token(Role.ADMIN)
    stage = await stage_of(client, token)
    deals = [await create_deal(client, token, stage) for _ in range(3)]
    product = data_or_fail(await gql(client, "mutation($i: ProductInput!) { createProduct(input: $i) { id } }",
                                     {"i": {"name": "P", "sku": "SKU-A", "unitPrice": "5.00", "currency": "USD"}},
                                     token=token))["createProduct"]
    data_or_fail(await gql(client, "mutation($i: DealLineItemInput!) { createDealLineItem(input: $i) { id } }",
                           {"i": {"dealId": deals[2]["id"], "productId": product["id"], "quantity": 1}}, token=token))
    patch = [{"id": deals[0]["id"], "title": "a"}, {"id": deals[1]["id"], "amount": "1.00"},
             {"id": deals[2]["id"], "amount": "2.00"}]
    body = await gql(client, UPDATE, {"input": patch}, token=token)
    assert error_of(body)["field"] == "input.2.amount" and "derived" in body["errors"][0]["message"], body
    unchanged = data_or_fail(await gql(client, UPDATE, {"input": patch[:2]}, token=token))["updateDeals"]
    assert [d["amount"] for d in unchanged] == ["100.00", "1.00"] and unchanged[0]["version"] == 2

    products = [data_or_fail(await gql(client, "mutation($i: ProductInput!) { createProduct(input: $i) { id } }",
                                       {"i": {"name": f"Q{i}", "sku": f"SKU-Q{i}", "unitPrice": "1.00",
                                              "currency": "USD"}}, token=token))["createProduct"] for i in range(2)]
    update_products = "mutation($input: [ProductUpdate!]!) { updateProducts(input: $input) { sku } }"
    taken = await gql(client, update_products, {"input": [{"id": products[0]["id"], "name": "x"},
                                                          {"id": products[1]["id"], "sku": "SKU-A"}]}, token=token)
    assert error_of(taken)["field"] == "input.1.sku" and "already used" in taken["errors"][0]["message"], taken
    twice = await gql(client, update_products, {"input": [{"id": p["id"], "sku": "SKU-NEW"} for p in products]},
                      token=token)
    assert error_of(twice)["field"] == "input.1.sku", twice


# ---- upserts --------------------------------------------------------------------------------------

async def test_upsert_creates_then_updates_by_external_id(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                          admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bups")
    token = world.token()
    stage = await stage_of(client, token)
    company = await create_company(client, token)
    first = data_or_fail(await gql(client, UPSERT, {"input": [
        {"externalId": "sf-1", "title": "One", "amount": "10.00", "currency": "USD", "stageId": stage,
         "companyId": company["id"]},
        {"externalId": "sf-2", "title": "Two", "amount": "20.00", "currency": "USD", "stageId": stage},
    ]}, token=token))["upsertDeals"]
    assert [u["created"] for u in first] == [True, True]
    second = data_or_fail(await gql(client, UPSERT, {"input": [
        {"externalId": "sf-3", "title": "Three", "amount": "30.00", "currency": "USD", "stageId": stage},
        {"externalId": "sf-1", "title": "One again", "amount": "11.00", "currency": "USD", "stageId": stage},
    ]}, token=token))["upsertDeals"]
    assert [u["created"] for u in second] == [True, False]
    again = second[1]["record"]
    assert again["id"] == first[0]["record"]["id"] and again["version"] == 2
    assert (again["title"], again["amount"], again["externalId"]) == ("One again", "11.00", "sf-1")
    assert again["company"] == {"id": company["id"]}, "a field not given keeps its value"
    assert await deal_count(admin_engine, world.id) == 3
    assert len(await audit_rows(admin_engine, world.id, "update")) == 1
    unchanged = data_or_fail(await gql(client, UPSERT, {"input": [
        {"externalId": "sf-2", "title": "Two", "amount": "20.00", "currency": "USD", "stageId": stage}]},
        token=token))["upsertDeals"]
    assert unchanged[0]["created"] is False and unchanged[0]["record"]["version"] == 1


async def test_upsert_refuses_repeats_and_fixed_fields(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                       admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bupr")
    token = world.token()
    pipeline = await create_pipeline(client, token)
    stage, other = pipeline["stages"][0]["id"], pipeline["stages"][1]["id"]
    one = {"externalId": "x", "title": "X", "amount": "1.00", "currency": "USD", "stageId": stage}
    body = await gql(client, UPSERT, {"input": [one, {**one, "title": "again"}]}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and error_of(body)["field"] == "input.1.externalId"
    assert await deal_count(admin_engine, world.id) == 0
    data_or_fail(await gql(client, UPSERT, {"input": [one]}, token=token))
    body = await gql(client, UPSERT, {"input": [{**one, "externalId": "y"}, {**one, "stageId": other}]}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and error_of(body)["field"] == "input.1.stageId"
    assert await deal_count(admin_engine, world.id) == 1, "the new record of the failed batch is not kept"
    body = await gql(client, UPSERT, {"input": [{**one, "externalId": "  "}]}, token=token)
    assert codes(body) == ["BAD_USER_INPUT"] and error_of(body)["field"] == "input.0.externalId"


async def test_external_ids_are_unique_per_tenant_only(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                       admin_engine: AsyncEngine) -> None:
    a, b = await make_tenant("bexa"), await make_tenant("bexb")
    stage_a, stage_b = await stage_of(client, a.token()), await stage_of(client, b.token())
    made_a = data_or_fail(await gql(client, CREATE, {"input": deal_inputs(stage_a, 1, externalId="shared")},
                                    token=a.token()))["createDeals"][0]
    single = await gql(client, "mutation($i: DealInput!) { createDeal(input: $i) { id } }",
                       {"i": {**deal_inputs(stage_a, 1)[0], "externalId": "shared"}}, token=a.token())
    assert codes(single) == ["BAD_USER_INPUT"] and single["errors"][0]["extensions"]["field"] == "externalId"
    again = await gql(client, CREATE, {"input": deal_inputs(stage_a, 2, externalId="shared")}, token=a.token())
    assert error_of(again)["field"] == "input.1.externalId"
    upserted = data_or_fail(await gql(client, UPSERT, {"input": [
        {"externalId": "shared", "title": "B's own", "amount": "5.00", "currency": "USD", "stageId": stage_b}]},
        token=b.token()))["upsertDeals"][0]
    assert upserted["created"] is True and upserted["record"]["id"] != made_a["id"]
    async with admin_engine.connect() as conn:
        row = (await conn.execute(select(DEALS).where(DEALS.c.id == uuid_of(made_a["id"])))).one()
    assert (row.title, row.version, row.tenant_id) == ("Batch deal 0", 1, a.id)
    assert await deal_count(admin_engine, b.id) == 1


async def test_upserts_are_derived_for_every_record_with_an_external_id(client: httpx.AsyncClient,
                                                                        make_tenant: MakeTenant) -> None:
    world = await make_tenant("bupc")
    token = world.token()
    document = ("mutation($input: [CompanyUpsert!]!) { upsertCompanies(input: $input) "
                "{ created record { name domain externalId } } }")
    first = data_or_fail(await gql(client, document, {"input": [
        {"externalId": "hs-1", "name": "Acme", "domain": "acme.example"}]}, token=token))["upsertCompanies"]
    second = data_or_fail(await gql(client, document, {"input": [
        {"externalId": "hs-1", "name": "Acme Inc"}]}, token=token))["upsertCompanies"]
    assert first[0]["created"] and not second[0]["created"]
    assert second[0]["record"] == {"name": "Acme Inc", "domain": "acme.example", "externalId": "hs-1"}


# ---- isolation ------------------------------------------------------------------------------------

async def test_batches_cannot_touch_other_tenants_records(either_client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                          admin_engine: AsyncEngine) -> None:
    client = either_client
    a, b = await make_tenant("bisa"), await make_tenant("bisb")
    stage_a, stage_b = await stage_of(client, a.token()), await stage_of(client, b.token())
    theirs = await create_deal(client, a.token(), stage_a, title="A's deal")
    ours = await create_deal(client, b.token(), stage_b, title="B's deal")
    token = b.token()
    body = await gql(client, UPDATE, {"input": [{"id": ours["id"], "title": "changed"},
                                                {"id": theirs["id"], "title": "stolen"}]}, token=token)
    assert codes(body) == ["NOT_FOUND"] and error_of(body)["field"] == "input.1.id" and "A's deal" not in str(body)
    body = await gql(client, DELETE, {"input": [{"id": ours["id"]}, {"id": theirs["id"]}]}, token=token)
    assert codes(body) == ["NOT_FOUND"] and error_of(body)["field"] == "input.1.id"
    body = await gql(client, CREATE, {"input": [*deal_inputs(stage_b, 1), *deal_inputs(stage_a, 1)]}, token=token)
    assert codes(body) == ["NOT_FOUND"] and error_of(body)["field"] == "input.1.stageId"
    async with admin_engine.connect() as conn:
        rows = {r.id: (r.title, r.version) for r in (await conn.execute(
            select(DEALS.c.id, DEALS.c.title, DEALS.c.version).where(DEALS.c.tenant_id.in_([a.id, b.id])))).all()}
    assert rows == {uuid_of(theirs["id"]): ("A's deal", 1), uuid_of(ours["id"]): ("B's deal", 1)}
    assert await audit_rows(admin_engine, b.id, "update") == await audit_rows(admin_engine, b.id, "delete") == []


async def test_rls_alone_keeps_batch_statements_in_the_transactions_tenant(
        client: httpx.AsyncClient, make_tenant: MakeTenant, settings: Settings, admin_engine: AsyncEngine) -> None:
    """The batch statements as the server runs them, in B's tenant transaction but with every explicit
    tenant filter naming A (a filter gone wrong): RLS alone hides A's rows and refuses rows for A."""
    a, b = await make_tenant("brla"), await make_tenant("brlb")
    stage_a = await stage_of(client, a.token())
    theirs = await create_deal(client, a.token(), stage_a)
    async with admin_engine.connect() as conn:
        pipeline_a = (await conn.execute(select(STAGES.c.pipeline_id)
                                         .where(STAGES.c.id == uuid_of(stage_a)))).scalar_one()
    forged = Principal(tenant_id=a.id, user_id=a.users[Role.OWNER], role=Role.OWNER, expires_at=0)
    values = {"title": "x", "amount": Decimal(1), "currency": "USD", "stage_id": uuid_of(stage_a)}
    databases = Databases(settings.app_url, pool_size=1)
    try:
        for attempt in ("update", "delete", "reference", "insert"):
            with pytest.raises(Exception) as raised:  # NotFound, or the policy's refusal
                async with databases.tenant_transaction(b.id) as conn:
                    w = Change(conn, forged, "rls-test")
                    if attempt == "update":
                        await batch.update_many(w, DEAL, [(uuid_of(theirs["id"]), {"title": "y"}, None)])
                    elif attempt == "delete":
                        await batch.delete_many(w, DEAL, [(uuid_of(theirs["id"]), None)])
                    elif attempt == "reference":
                        await batch.create_many(w, DEAL, [dict(values)])
                    else:
                        await w.insert_many(DEAL, [{**values, "pipeline_id": pipeline_a}])
            if attempt == "insert":
                assert "row-level security" in str(raised.value), raised.value
            else:
                assert isinstance(raised.value, NotFound), raised.value
    finally:
        await databases.dispose()
    async with admin_engine.connect() as conn:
        rows = (await conn.execute(select(DEALS.c.id, DEALS.c.title, DEALS.c.version)
                                   .where(DEALS.c.tenant_id == a.id))).all()
    assert [(r.id, r.version) for r in rows] == [(uuid_of(theirs["id"]), 1)]
    assert await deal_count(admin_engine, b.id) == 0


# ---- statements -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def wired(settings: Settings) -> AsyncIterator[Starlette]:
    async with wired_app(settings) as application:
        yield application


async def test_a_batch_of_creates_costs_the_same_statements_whatever_its_size(
        wired: Starlette, make_tenant: MakeTenant) -> None:
    """Set-based: references, unique fields, the rows and their audit rows are one statement each
    for the whole batch; 5 deals and 200 deals send the same statements."""
    world = await make_tenant("bwire")
    token = world.token()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wired), base_url="http://atrium.test") as client:
        stage = await stage_of(client, token)
        company = await create_company(client, token)
        sent: list[list[str]] = []
        for n in (5, 5, 200):  # the first also looks up the array types the set-based insert sends (asyncpg)
            with wired.state.wire.recording() as statements:
                data_or_fail(await gql(client, CREATE, {"input": deal_inputs(
                    stage, n, companyId=company["id"], ownerId=gid("User", world.users[Role.ADMIN]))},
                    token=token))
            sent.append(statements)
    _, small, large = sent
    assert len(small) == len(large), collections.Counter(s[:60] for s in large)
    assert sum("INSERT INTO deals" in s for s in large) == 1, large
    assert sum("atrium_audit_append" in s for s in large) == 1, large  # the audit rows, chained in one call
    assert sum("FROM webhook_endpoints" in s for s in large) == 1, large  # the outbox: one look-up per change
    assert sum("FROM custom_field_definitions" in s for s in large) == 1, large  # custom fields: one look-up
    assert len(large) <= 19, "\n".join(s[:70] for s in large)


async def test_batch_updates_and_deletes_cost_the_same_statements_whatever_their_size(
        wired: Starlette, make_tenant: MakeTenant) -> None:
    """Set-based too: the rows locked in one statement, the changes written in one UPDATE per set of
    columns changed, trashed in one, with one audit call each; 5 deals and 200 send the same."""
    world = await make_tenant("bwup")
    token = world.token()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=wired), base_url="http://atrium.test") as client:
        stage = await stage_of(client, token)
        company = await create_company(client, token)
        sent: list[tuple[list[str], list[str]]] = []
        for n in (5, 5, 200):
            created = data_or_fail(await gql(client, CREATE, {"input": deal_inputs(stage, n)}, token=token))
            ids = [d["id"] for d in created["createDeals"]]
            with wired.state.wire.recording() as updates:
                data_or_fail(await gql(client, UPDATE, {"input": [
                    {"id": i, "amount": "5.00", "companyId": company["id"], "expectedVersion": 1} for i in ids]},
                    token=token))
            with wired.state.wire.recording() as deletes:
                data_or_fail(await gql(client, DELETE, {"input": [{"id": i} for i in ids]}, token=token))
            sent.append((updates, deletes))
    (_, _), (small_updates, small_deletes), (large_updates, large_deletes) = sent
    for small, large in ((small_updates, large_updates), (small_deletes, large_deletes)):
        assert len(small) == len(large), collections.Counter(s[:60] for s in large)
        assert sum("atrium_audit_append" in s for s in large) == 1, large
    assert sum(s.startswith("UPDATE deals") for s in large_updates) == 1, large_updates
    assert sum(s.startswith("UPDATE deals") for s in large_deletes) == 1, large_deletes
    assert len(large_updates) <= 13 and len(large_deletes) <= 16, ("\n".join(s[:90] for s in large_updates),
                                                                  "\n".join(s[:90] for s in large_deletes))


# ---- cost -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("document", "variables", "cost"), [
    ("mutation($input: [DealInput!]!) { createDeals(input: $input) { id } }", {"input": [{}] * 7}, 7),
    ("mutation($input: [DealInput!]!) { createDeals(input: $input) { id stage { name } } }", {"input": [{}] * 7}, 14),
    ("mutation { deleteDeals(input: [{id: \"a\"}, {id: \"b\"}, {id: \"c\"}]) { deletedIds } }", {}, 3),
    ("mutation($input: [DealUpsert!]!) { upsertDeals(input: $input) { record { id } } }", {"input": [{}] * 4}, 8),
    ("mutation($input: DealInput!) { createDeal(input: $input) { id stage { name } } }", {"input": {}}, 2),
])
def test_a_batch_costs_its_records_times_one(document: str, variables: dict[str, Any], cost: int) -> None:
    parsed = parse(document)
    operation = next(d for d in parsed.definitions if isinstance(d, OperationDefinitionNode))
    assert operation_cost(schema._schema, parsed, operation, variables) == cost


async def test_a_batch_too_costly_to_answer_is_refused_before_it_writes(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("bcost")
    token = world.token()
    heavy = "mutation($input: [DealInput!]!) { createDeals(input: $input) { stage { deals(first: 100) { id } } } }"
    body = await gql(client, heavy, {"input": deal_inputs(await stage_of(client, token), MAX_BATCH)}, token=token)
    assert codes(body) == ["QUERY_TOO_COMPLEX"] and body["errors"][0]["extensions"]["cost"] == MAX_BATCH * 102
    assert await deal_count(admin_engine, world.id) == 0


# ---- subscriptions --------------------------------------------------------------------------------

BOARD = """
subscription($p: ID!) {
  dealBoard(pipelineId: $p) {
    __typename ... on Resync { reason } ... on DealChange { kind recordId version record { id title } }
  }
}"""


async def test_board_subscribers_get_one_event_per_record_across_processes(
        servers: tuple[AtriumProcess, AtriumProcess], make_tenant: MakeTenant) -> None:
    """A batch written through process B reaches a board subscriber on process A (through Redis) as
    one change per record, in input order, after the commit."""
    a, b = servers
    world = await make_tenant("blive")
    token = world.token(Role.MEMBER)
    async with b.client() as client:
        pipeline = await create_pipeline(client, token)
        stage = pipeline["stages"][0]["id"]
        async with live(a.ws_url, token) as subscriber:
            board = await subscriber.live(BOARD, {"p": pipeline["id"]})
            made = data_or_fail(await gql(client, CREATE, {"input": deal_inputs(stage, 4)}, token=token))["createDeals"]
            created = [(await subscriber.data(board))["dealBoard"] for _ in made]
            data_or_fail(await gql(client, UPDATE, {"input": [{"id": d["id"], "title": f"T{i}"}
                                                              for i, d in enumerate(made)]}, token=token))
            updated = [(await subscriber.data(board))["dealBoard"] for _ in made]
    assert [(c["kind"], c["recordId"], c["version"]) for c in created] == [("CREATED", d["id"], 1) for d in made]
    assert [(u["kind"], u["recordId"], u["record"]["title"]) for u in updated] == [
        ("UPDATED", d["id"], f"T{i}") for i, d in enumerate(made)]
