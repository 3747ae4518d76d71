"""Optimistic concurrency: ``expectedVersion`` lets exactly one of several racing writers win.

Requests race for real: ``asyncio.gather`` over one ASGI client interleaves them on the event loop,
and each runs its own database transaction (the row lock serialises them in PostgreSQL).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from models.tables import ACTIVITIES, AUDIT_EVENTS, COMPANIES, CONTACTS, DEALS, PIPELINES, STAGES, Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_company, create_deal, create_pipeline, uuid_of

MakeTenant = Callable[..., Awaitable[TenantWorld]]

UPDATE_DEAL = """mutation($id: ID!, $input: DealPatch!, $v: Int) {
  updateDeal(id: $id, input: $input, expectedVersion: $v) { id title amount version stage { id } } }"""
MOVE_DEAL = """mutation($id: ID!, $s: ID!, $v: Int) {
  moveDeal(id: $id, stageId: $s, expectedVersion: $v) { id version stage { id } pipeline { id } } }"""
DELETE_DEAL = "mutation($id: ID!, $v: Int) { deleteDeal(id: $id, expectedVersion: $v) { deletedId } }"
READ_DEAL = "query($id: ID!) { deal(id: $id) { id title amount version stage { id } } }"


async def snapshot(engine: AsyncEngine, tenant: TenantWorld) -> dict[str, list[tuple[Any, ...]]]:
    out: dict[str, list[tuple[Any, ...]]] = {}
    async with engine.connect() as conn:
        for table in (COMPANIES, CONTACTS, PIPELINES, STAGES, DEALS, ACTIVITIES, AUDIT_EVENTS):
            rows = (await conn.execute(select(table).where(table.c.tenant_id == tenant.id))).all()
            out[table.name] = sorted((tuple(r) for r in rows), key=repr)
    return out


async def deal_audits(engine: AsyncEngine, tenant: TenantWorld, deal_id: str) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(select(AUDIT_EVENTS).where(
            AUDIT_EVENTS.c.tenant_id == tenant.id, AUDIT_EVENTS.c.entity_id == uuid_of(deal_id))
            .order_by(AUDIT_EVENTS.c.occurred_at))).all())


def conflict(body: dict[str, Any]) -> dict[str, Any]:
    """The extensions of a VERSION_CONFLICT answer (asserting that it is one)."""
    assert body["_status"] == 200
    assert codes(body) == ["VERSION_CONFLICT"], body.get("errors")
    assert body["data"] is None
    extensions: dict[str, Any] = body["errors"][0]["extensions"]
    assert extensions["field"] == "expectedVersion"
    return extensions


async def test_two_concurrent_updates_with_the_same_version_one_wins(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("race")
    token = tenant.token(Role.MEMBER)
    pipeline = await create_pipeline(client, token, stages=("Lead",))
    deal = await create_deal(client, token, pipeline["stages"][0]["id"], title="Original", amount="10.00")
    assert deal["version"] == 1

    bodies = await asyncio.gather(*(
        gql(client, UPDATE_DEAL, {"id": deal["id"], "input": {"title": title, "amount": amount}, "v": 1}, token=token)
        for title, amount in (("From Alice", "11.00"), ("From Bob", "22.00"))))

    winners = [b for b in bodies if not b.get("errors")]
    losers = [b for b in bodies if b.get("errors")]
    assert len(winners) == 1 and len(losers) == 1, bodies
    won = winners[0]["data"]["updateDeal"]
    assert won["version"] == 2
    extensions = conflict(losers[0])
    assert extensions["currentVersion"] == 2
    current = extensions["current"]
    assert current["version"] == 2
    assert (current["title"], current["amount"]) == (won["title"], won["amount"])
    assert current["id"] == deal["id"]  # the public shape: GraphQL names, global IDs

    stored = data_or_fail(await gql(client, READ_DEAL, {"id": deal["id"]}, token=token))["deal"]
    assert (stored["title"], stored["amount"], stored["version"]) == (won["title"], won["amount"], 2)
    audits = await deal_audits(admin_engine, tenant, deal["id"])
    assert [a.action for a in audits] == ["create", "update"]
    assert audits[-1].diff["after"] == {"title": won["title"], "amount": won["amount"]}


async def test_stale_expected_version_changes_nothing(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                      admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("race")
    token = tenant.token(Role.ADMIN)
    pipeline = await create_pipeline(client, token, stages=("Lead", "Won"))
    lead, won = (s["id"] for s in pipeline["stages"])
    deal = await create_deal(client, token, lead, title="Deal")
    data_or_fail(await gql(client, UPDATE_DEAL, {"id": deal["id"], "input": {"title": "Deal v2"}, "v": 1}, token=token))
    before = await snapshot(admin_engine, tenant)

    for stale in (1, 3, 0, -1):
        body = await gql(client, UPDATE_DEAL, {"id": deal["id"], "input": {"title": "Stale"}, "v": stale}, token=token)
        extensions = conflict(body)
        assert extensions["currentVersion"] == 2
        assert extensions["current"]["title"] == "Deal v2"
        assert conflict(await gql(client, MOVE_DEAL, {"id": deal["id"], "s": won, "v": stale},
                                  token=token))["currentVersion"] == 2
        assert conflict(await gql(client, DELETE_DEAL, {"id": deal["id"], "v": stale},
                                  token=token))["currentVersion"] == 2
    # A no-op patch with a stale version is a conflict too, not a silent success.
    conflict(await gql(client, UPDATE_DEAL, {"id": deal["id"], "input": {"title": "Deal v2"}, "v": 1}, token=token))

    assert await snapshot(admin_engine, tenant) == before
    stored = data_or_fail(await gql(client, READ_DEAL, {"id": deal["id"]}, token=token))["deal"]
    assert (stored["title"], stored["version"], stored["stage"]["id"]) == ("Deal v2", 2, lead)

    # The current version still works.
    moved = data_or_fail(await gql(client, MOVE_DEAL, {"id": deal["id"], "s": won, "v": 2}, token=token))["moveDeal"]
    assert (moved["version"], moved["stage"]["id"]) == (3, won)
    deleted = data_or_fail(await gql(client, DELETE_DEAL, {"id": deal["id"], "v": 3}, token=token))
    assert deleted["deleteDeal"]["deletedId"] == deal["id"]


async def test_stale_version_on_other_records(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                              admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("race")
    token = tenant.token(Role.ADMIN)
    company = await create_company(client, token, name="Acme")
    pipeline = await create_pipeline(client, token, stages=("Lead",))
    before = await snapshot(admin_engine, tenant)
    for query, variables in (
        ("mutation($id: ID!) { updateCompany(id: $id, input: {name: \"X\"}, expectedVersion: 2) { id } }",
         {"id": company["id"]}),
        ("mutation($id: ID!) { deleteCompany(id: $id, expectedVersion: 7) { deletedId } }", {"id": company["id"]}),
        ("mutation($id: ID!) { updatePipeline(id: $id, input: {name: \"X\"}, expectedVersion: 2) { id } }",
         {"id": pipeline["id"]}),
        ("mutation($id: ID!) { updateStage(id: $id, input: {name: \"X\"}, expectedVersion: 2) { id } }",
         {"id": pipeline["stages"][0]["id"]}),
        ("mutation($id: ID!) { deleteStage(id: $id, expectedVersion: 2) { deletedId } }",
         {"id": pipeline["stages"][0]["id"]}),
    ):
        assert conflict(await gql(client, query, variables, token=token))["currentVersion"] == 1
    assert await snapshot(admin_engine, tenant) == before


async def test_ten_concurrent_moves_with_the_same_version_one_wins(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    tenant = await make_tenant("race")
    token = tenant.token(Role.MEMBER)
    pipeline = await create_pipeline(client, token, stages=tuple(f"S{i}" for i in range(11)))
    stages = [s["id"] for s in pipeline["stages"]]
    deal = await create_deal(client, token, stages[0], title="Contended")

    targets = stages[1:]
    bodies = await asyncio.gather(*(
        gql(client, MOVE_DEAL, {"id": deal["id"], "s": target, "v": 1}, token=token) for target in targets))

    winners = [(target, b) for target, b in zip(targets, bodies, strict=True) if not b.get("errors")]
    assert len(winners) == 1, [codes(b) for b in bodies]
    target, body = winners[0]
    assert body["data"]["moveDeal"]["version"] == 2 and body["data"]["moveDeal"]["stage"]["id"] == target
    losers = [b for b in bodies if b.get("errors")]
    assert len(losers) == 9
    for loser in losers:
        extensions = conflict(loser)
        assert extensions["currentVersion"] == 2
        assert extensions["current"]["stageId"] == target

    stored = data_or_fail(await gql(client, READ_DEAL, {"id": deal["id"]}, token=token))["deal"]
    assert (stored["version"], stored["stage"]["id"]) == (2, target)
    audits = await deal_audits(admin_engine, tenant, deal["id"])
    assert [a.action for a in audits] == ["create", "update"]


async def test_concurrent_updates_without_version_all_apply_in_turn(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    """Without expectedVersion nobody conflicts: the row lock serialises them and each bumps the version."""
    tenant = await make_tenant("race")
    token = tenant.token(Role.MEMBER)
    pipeline = await create_pipeline(client, token, stages=("Lead",))
    deal = await create_deal(client, token, pipeline["stages"][0]["id"], title="Busy")
    titles = [f"Edit {uuid.uuid4().hex[:6]}" for _ in range(8)]

    bodies = await asyncio.gather(*(
        gql(client, UPDATE_DEAL, {"id": deal["id"], "input": {"title": title}}, token=token) for title in titles))

    versions = sorted(data_or_fail(b)["updateDeal"]["version"] for b in bodies)
    assert versions == list(range(2, 10))
    stored = data_or_fail(await gql(client, READ_DEAL, {"id": deal["id"]}, token=token))["deal"]
    assert stored["version"] == 9
    last = next(b for b in bodies if b["data"]["updateDeal"]["version"] == 9)
    assert stored["title"] == last["data"]["updateDeal"]["title"]
    audits = await deal_audits(admin_engine, tenant, deal["id"])
    assert len(audits) == 9
    # Each audit row's "before" is the previous row's "after": no lost update.
    for previous, following in itertools.pairwise(audits[1:]):
        assert following.diff["before"]["title"] == previous.diff["after"]["title"]
