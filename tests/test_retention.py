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
from models.tables import ACTIVITIES, AUDIT_CHAIN_HEADS, AUDIT_EVENTS, WEBHOOK_DELIVERIES, WEBHOOK_ENDPOINTS, Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
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
    assert [(a.target, a.removed) for a in applied] == [("audit_events", before)]
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
    assert [(a.target, a.removed) for a in first] == [("activities", 0)]
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
    (later,) = await apply_retention(databases, dt.datetime.now(dt.UTC) + dt.timedelta(days=8), tenant_id=world.id)
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
    assert [p["target"] for p in listed] == list(RETENTION) and all(p["keepDays"] is None for p in listed)
    assert data_or_fail(await gql(client, SET, {"t": "activities", "d": 90}, token=world.token()))[
        "setRetentionPolicy"] == {"target": "activities", "keepDays": 90}
    listed = data_or_fail(await gql(client, POLICIES, token=world.token()))["retentionPolicies"]
    assert {p["target"]: p["keepDays"] for p in listed}["activities"] == 90
    assert data_or_fail(await gql(client, SET, {"t": "activities", "d": None}, token=world.token()))[
        "setRetentionPolicy"]["keepDays"] is None
    for variables, field in (({"t": "deals", "d": 1}, "target"), ({"t": "activities", "d": -1}, "keepDays"),
                             ({"t": "activities", "d": 10**6}, "keepDays")):
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
