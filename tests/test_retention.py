"""Retention: per tenant policies (a registry of targets), applied by the server's schedule and by
``atrium retention run``; trimming the audit log keeps its chain verifiable from a recorded anchor."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable

import httpx
import pytest
from sqlalchemy import Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from atrium.app import create_app
from atrium.cli.main import cmd_retention, parser
from core.clock import ManualClock
from core.settings import Settings
from models.audit_chain import Verification, verify_chain
from models.db import Databases
from models.retention import RETENTION, apply_retention
from models.tables import (
    ACTIVITIES,
    AUDIT_CHAIN_HEADS,
    AUDIT_EVENTS,
    COMPANIES,
    CONTACTS,
    WEBHOOK_DELIVERIES,
    WEBHOOK_ENDPOINTS,
    Role,
)
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import uuid_of
from tests.governance import fill

MakeTenant = Callable[..., Awaitable[TenantWorld]]
SET = """mutation($t: String!, $d: Int) { setRetentionPolicy(target: $t, keepDays: $d) { target keepDays } }"""
POLICIES = "{ retentionPolicies { target description keepDays } }"


async def count(engine: AsyncEngine, table: Table, tenant: TenantWorld) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table).where(
            table.c.tenant_id == tenant.id))).scalar_one())


async def chain(engine: AsyncEngine, tenant: TenantWorld) -> Verification:
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            return await verify_chain(conn, tenant.id)


async def test_trimming_the_audit_log_keeps_its_chain_verifiable(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    world, other = await make_tenant("keep"), await make_tenant("keep-other")
    await fill(client, world)
    await fill(client, other)
    data_or_fail(await gql(client, SET, {"t": "audit_events", "d": 0}, token=world.token()))
    before, others = await count(admin_engine, AUDIT_EVENTS, world), await count(admin_engine, AUDIT_EVENTS, other)

    applied = await apply_retention(databases, dt.datetime.now(dt.UTC), tenant_id=world.id)
    assert [(a.target, a.removed) for a in applied] == [("audit_events", before)]  # no trash: not due
    found = await chain(admin_engine, world)
    assert found.ok and found.anchor_seq == before and found.checked == 1, found.broken
    async with admin_engine.connect() as conn:
        (event,) = (await conn.execute(select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == world.id))).all()
        head = (await conn.execute(select(AUDIT_CHAIN_HEADS).where(AUDIT_CHAIN_HEADS.c.tenant_id == world.id))).one()
    assert event.action == "retention" and event.seq == before + 1
    assert event.diff == {"throughSeq": before, "anchorHash": head.anchor_hash.hex(), "deleted": before, "keepDays": 0}
    assert await count(admin_engine, AUDIT_EVENTS, other) == others

    # The log goes on from the anchor, and verifies; applying again removes what has aged since.
    await fill(client, world)
    assert (await chain(admin_engine, world)).ok
    await apply_retention(databases, dt.datetime.now(dt.UTC), tenant_id=world.id)
    again = await chain(admin_engine, world)
    assert again.ok and again.anchor_seq > before and again.checked == 1


async def test_activities_older_than_the_policy_go(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    world, other = await make_tenant("acts"), await make_tenant("acts-other")
    await fill(client, world)
    await fill(client, other)
    data_or_fail(await gql(client, SET, {"t": "activities", "d": 30}, token=world.token()))
    first = await apply_retention(databases, dt.datetime.now(dt.UTC), tenant_id=world.id)
    assert [(a.target, a.removed) for a in first] == [("activities", 0)]  # nothing in the trash: not due
    assert await count(admin_engine, ACTIVITIES, world) == 2  # none is 30 days old
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=31)
    (applied,) = await apply_retention(databases, later, tenant_id=world.id)
    assert (applied.target, applied.removed) == ("activities", 2)
    assert await count(admin_engine, ACTIVITIES, world) == 0 and await count(admin_engine, ACTIVITIES, other) == 2
    async with admin_engine.connect() as conn:
        event = (await conn.execute(select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == world.id,
                                                               AUDIT_EVENTS.c.action == "retention"))).one()
    assert event.entity_type == "Activity" and event.diff["removed"] == 2
    assert (await chain(admin_engine, world)).ok


async def test_webhook_deliveries_that_were_settled_go_and_pending_ones_stay(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, databases: Databases,
) -> None:
    world, other = await make_tenant("hooks-kept"), await make_tenant("hooks-kept-other")
    async with admin_engine.begin() as conn:
        for tenant in (world, other):
            endpoint = uuid.uuid4()
            await conn.execute(WEBHOOK_ENDPOINTS.insert().values(
                tenant_id=tenant.id, id=endpoint, url="https://hooks.example/in", event_types=["deal.created"],
                secret=b"sealed"))
            await conn.execute(WEBHOOK_DELIVERIES.insert(), [
                {"tenant_id": tenant.id, "id": uuid.uuid4(), "endpoint_id": endpoint, "message_id": uuid.uuid4(),
                 "event_type": "deal.created", "ordering_key": uuid.uuid4(), "body": "{}", "status": status}
                for status in ("delivered", "failed", "pending")])
    data_or_fail(await gql(client, SET, {"t": "webhook_deliveries", "d": 7}, token=world.token()))
    (now,) = await apply_retention(databases, dt.datetime.now(dt.UTC), tenant_id=world.id)
    assert (now.target, now.removed) == ("webhook_deliveries", 0)
    (later,) = await apply_retention(databases, dt.datetime.now(dt.UTC) + dt.timedelta(days=8),
                                     tenant_id=world.id)
    assert (later.target, later.removed) == ("webhook_deliveries", 2)
    async with admin_engine.connect() as conn:
        left = (await conn.execute(select(WEBHOOK_DELIVERIES.c.status).where(
            WEBHOOK_DELIVERIES.c.tenant_id == world.id))).scalars().all()
    assert left == ["pending"] and await count(admin_engine, WEBHOOK_DELIVERIES, other) == 3
    assert (await chain(admin_engine, world)).ok


async def test_policies_are_the_owners_and_name_registered_targets(
    client: httpx.AsyncClient, make_tenant: MakeTenant,
) -> None:
    world = await make_tenant("policy")
    listed = data_or_fail(await gql(client, POLICIES, token=world.token(Role.ADMIN)))["retentionPolicies"]
    assert [p["target"] for p in listed] == list(RETENTION)
    # The trash always has a retention (the tenant's own setting, 30 days by default); others none.
    assert {p["target"]: p["keepDays"] for p in listed} == {name: 30 if name == "trash" else None
                                                            for name in RETENTION}
    assert data_or_fail(await gql(client, SET, {"t": "activities", "d": 90}, token=world.token()))[
        "setRetentionPolicy"] == {"target": "activities", "keepDays": 90}
    listed = data_or_fail(await gql(client, POLICIES, token=world.token()))["retentionPolicies"]
    assert {p["target"]: p["keepDays"] for p in listed}["activities"] == 90
    assert data_or_fail(await gql(client, SET, {"t": "activities", "d": None}, token=world.token()))[
        "setRetentionPolicy"]["keepDays"] is None
    for variables, field in (({"t": "deals", "d": 1}, "target"), ({"t": "activities", "d": -1}, "keepDays"),
                             ({"t": "activities", "d": 10**6}, "keepDays"), ({"t": "trash", "d": None}, "keepDays"),
                             ({"t": "trash", "d": 0}, "keepDays"), ({"t": "trash", "d": 3651}, "keepDays")):
        body = await gql(client, SET, variables, token=world.token())
        assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == field
    assert codes(await gql(client, SET, {"t": "activities", "d": 1}, token=world.token(Role.ADMIN))) == ["FORBIDDEN"]
    assert codes(await gql(client, POLICIES, token=world.token(Role.MEMBER))) == ["FORBIDDEN"]


async def test_the_server_applies_policies_on_its_schedule(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings,
) -> None:
    world = await make_tenant("sched")
    await fill(client, world)
    data_or_fail(await gql(client, SET, {"t": "audit_events", "d": 0}, token=world.token()))
    clock = ManualClock()
    app = create_app(dataclasses.replace(settings, retention_interval_seconds=600), clock=clock)
    async with app.router.lifespan_context(app):
        rounds = app.state.runtime.retention_rounds
        clock.advance(599)
        assert rounds.empty()
        clock.advance(1)
        assert await asyncio.wait_for(rounds.get(), 60) == 1
    found = await chain(admin_engine, world)
    assert found.ok and found.anchor_seq > 0 and found.checked == 1


async def test_the_command_applies_policies_now(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    world = await make_tenant("cmd")
    await fill(client, world)
    data_or_fail(await gql(client, SET, {"t": "audit_events", "d": 0}, token=world.token()))
    removed = await count(admin_engine, AUDIT_EVENTS, world)
    monkeypatch.setenv("DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("ATRIUM_JWT_SECRET", settings.jwt_secret)
    args: argparse.Namespace = parser().parse_args(["retention", "run", "--tenant", world.slug])
    assert await cmd_retention(args) == 0
    assert f"{world.id} audit_events: kept 0 days, removed {removed}" in capsys.readouterr().out
    assert (await chain(admin_engine, world)).ok


DAY = 86_400.0


async def test_the_schedule_empties_each_tenants_trash_past_its_own_retention(
    make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings,
) -> None:
    """The trash is a retention target like the others: the server's round purges, as of its clock,
    what each tenant has kept in the trash longer than its trash retention (30 days by default, 5
    for the tenant that chose so through setRetentionPolicy), audited as a system purge; a contact
    that loses its company for good is an update, delivered to webhooks like any."""
    clock = ManualClock()
    app = create_app(dataclasses.replace(settings, retention_interval_seconds=int(31 * DAY), pool_size=2),
                     clock=clock)
    usual, brief = await make_tenant("trash-usual"), await make_tenant("trash-brief")
    endpoint = uuid.uuid4()
    async with admin_engine.begin() as conn:
        await conn.execute(WEBHOOK_ENDPOINTS.insert().values(
            tenant_id=brief.id, id=endpoint, url="https://hooks.example/in", event_types=["contact.updated"],
            secret=b"sealed"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        token = {t.id: t.token(ttl_seconds=int(40 * DAY)) for t in (usual, brief)}
        assert data_or_fail(await gql(client, SET, {"t": "trash", "d": 5}, token=token[brief.id]))[
            "setRetentionPolicy"] == {"target": "trash", "keepDays": 5}
        assert data_or_fail(await gql(client, "{ tenant { trashRetentionDays } }", token=token[brief.id])) == {
            "tenant": {"trashRetentionDays": 5}}

        async def trashed(tenant: TenantWorld, name: str) -> uuid.UUID:
            made = data_or_fail(await gql(client, 'mutation($n: String!) { createCompany(input: {name: $n}) { id } }',
                                          {"n": name}, token=token[tenant.id]))["createCompany"]["id"]
            data_or_fail(await gql(client, "mutation($id: ID!) { deleteCompany(id: $id) { deletedId } }",
                                   {"id": made}, token=token[tenant.id]))
            return uuid_of(made)

        old = await trashed(usual, "Trashed on day 0")
        clock.advance(25 * DAY)
        recent = await trashed(usual, "Trashed on day 25")
        kept_contact = data_or_fail(await gql(client, "mutation { createCompany(input: {name: \"Acme\"}) { id } }",
                                              token=token[brief.id]))["createCompany"]["id"]
        contact = data_or_fail(await gql(
            client, 'mutation($c: ID!) { createContact(input: {firstName: "Ada", lastName: "Lovelace", '
                    'companyId: $c}) { id } }', {"c": kept_contact}, token=token[brief.id]))["createContact"]["id"]
        data_or_fail(await gql(client, "mutation($id: ID!) { deleteCompany(id: $id) { deletedId } }",
                               {"id": kept_contact}, token=token[brief.id]))
        rounds = app.state.runtime.retention_rounds
        clock.advance(6 * DAY - 1)
        assert rounds.empty()
        clock.advance(1)  # day 31: the first round
        assert await asyncio.wait_for(rounds.get(), 60) == 1

    async def left(tenant: TenantWorld) -> set[uuid.UUID]:
        async with admin_engine.connect() as conn:
            return set((await conn.execute(select(COMPANIES.c.id).where(COMPANIES.c.tenant_id == tenant.id)))
                       .scalars())

    # 31 days in the trash > 30; 6 days < 30 stays; 6 days > 5 goes.
    assert await left(usual) == {recent} and old not in await left(usual)
    assert await left(brief) == set()
    async with admin_engine.connect() as conn:
        purges = (await conn.execute(select(AUDIT_EVENTS.c.entity_id, AUDIT_EVENTS.c.actor_id).where(
            AUDIT_EVENTS.c.tenant_id.in_((usual.id, brief.id)), AUDIT_EVENTS.c.action == "purge"))).all()
        person = (await conn.execute(select(CONTACTS).where(CONTACTS.c.tenant_id == brief.id))).one()
        sent = (await conn.execute(select(WEBHOOK_DELIVERIES.c.event_type, WEBHOOK_DELIVERIES.c.body).where(
            WEBHOOK_DELIVERIES.c.tenant_id == brief.id))).all()
    assert sorted(str(p.entity_id) for p in purges) == sorted([str(old), str(uuid_of(kept_contact))])
    assert all(p.actor_id is None for p in purges)  # the system's own work
    assert person.id == uuid_of(contact) and person.company_id is None and person.version == 2
    assert [s.event_type for s in sent] == ["contact.updated"] and '"companyId":null' in sent[0].body.replace(" ", "")
    for tenant in (usual, brief):
        assert (await chain(admin_engine, tenant)).ok
