"""The tamper-evident audit log: each tenant's events form a hash chain that verification recomputes.

Tampering is done as the database owner (the admin connection, which bypasses row-level security
and may disable triggers): editing, deleting, inserting and reordering events, redacting without
an erasure, moving the anchor. ``atrium audit verify`` and the ``auditChain`` query report the first
broken link each time, naming the event and why.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from atrium.cli.main import cmd_audit, parser
from core.settings import Settings
from models.audit_chain import GENESIS, diff_digest, link_hash, redaction_marker, verify_chain
from models.db import Databases
from models.migrations import migrate
from models.tables import AUDIT_CHAIN_HEADS, AUDIT_EVENTS, Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql, scratch_database
from tests.crm import create_company

MakeTenant = Callable[..., Awaitable[TenantWorld]]

CHAIN = """{ auditChain { ok checked firstSeq lastSeq headSeq headHash anchorSeq broken { seq eventId reason } } }"""
RENAME = "mutation($id: ID!, $n: String!) { updateCompany(id: $id, input: {name: $n}) { id version } }"


async def chained_tenant(make_tenant: MakeTenant, client: httpx.AsyncClient, events: int = 5) -> TenantWorld:
    """A tenant with ``events`` audit events (a company created, then renamed)."""
    tenant = await make_tenant("chain")
    token = tenant.token(Role.OWNER)
    company = await create_company(client, token, name="Chained 0")
    for n in range(1, events):
        data_or_fail(await gql(client, RENAME, {"id": company["id"], "n": f"Chained {n}"}, token=token))
    return tenant


async def verify(engine: AsyncEngine, tenant: TenantWorld) -> Any:
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="REPEATABLE READ")
        async with conn.begin():
            return await verify_chain(conn, tenant.id)


async def event(conn: AsyncConnection, tenant: TenantWorld, seq: int) -> Any:
    return (await conn.execute(select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == tenant.id,
                                                          AUDIT_EVENTS.c.seq == seq))).one()


def where(tenant: TenantWorld, seq: int) -> Any:
    return (AUDIT_EVENTS.c.tenant_id == tenant.id) & (AUDIT_EVENTS.c.seq == seq)


async def renumber_from(conn: AsyncConnection, tenant: TenantWorld, seq: int, by: int) -> None:
    """Shift every event from ``seq`` on by ``by`` (in two steps: the unique index checks each row)."""
    mine = AUDIT_EVENTS.c.tenant_id == tenant.id
    await conn.execute(update(AUDIT_EVENTS).where(mine, AUDIT_EVENTS.c.seq >= seq).values(seq=-AUDIT_EVENTS.c.seq))
    await conn.execute(update(AUDIT_EVENTS).where(mine, AUDIT_EVENTS.c.seq < 0).values(seq=-AUDIT_EVENTS.c.seq + by))


# ---- each tampering, and what verification says ---------------------------------------------------

async def edit_diff(conn: AsyncConnection, t: TenantWorld) -> None:
    await conn.execute(update(AUDIT_EVENTS).where(where(t, 3)).values(diff={"after": {"name": "Forged"}}))


async def edit_action(conn: AsyncConnection, t: TenantWorld) -> None:
    await conn.execute(update(AUDIT_EVENTS).where(where(t, 3)).values(action="delete"))


async def backdate(conn: AsyncConnection, t: TenantWorld) -> None:
    await conn.execute(text("UPDATE audit_events SET occurred_at = occurred_at - interval '1 day' "
                            "WHERE tenant_id = :t AND seq = 3"), {"t": t.id})


async def rewrite_and_rehash(conn: AsyncConnection, t: TenantWorld) -> None:
    """Edit event 3 and recompute its own digest and hash, as someone who knows the algorithm would."""
    row = await event(conn, t, 3)
    forged = {**row._mapping, "action": "delete"}
    forged["hash"] = link_hash(row.prev_hash, forged)
    await conn.execute(update(AUDIT_EVENTS).where(where(t, 3)).values(action="delete", hash=forged["hash"]))


async def delete_middle(conn: AsyncConnection, t: TenantWorld) -> None:
    await conn.execute(AUDIT_EVENTS.delete().where(where(t, 3)))


async def delete_last(conn: AsyncConnection, t: TenantWorld) -> None:
    await conn.execute(AUDIT_EVENTS.delete().where(where(t, 5)))


async def delete_all(conn: AsyncConnection, t: TenantWorld) -> None:
    await conn.execute(AUDIT_EVENTS.delete().where(AUDIT_EVENTS.c.tenant_id == t.id))


async def insert_middle(conn: AsyncConnection, t: TenantWorld) -> None:
    """A forged event slipped in as number 3, correctly linked to event 2 and hashed; later ones renumbered."""
    before = await event(conn, t, 2)
    await renumber_from(conn, t, 3, 1)
    await conn.execute(text("SET LOCAL session_replication_role = replica"))  # no trigger: the forger's own values
    forged = {**before._mapping, "id": uuid.uuid4(), "seq": 3, "action": "delete", "prev_hash": before.hash,
              "diff": {"before": {"name": "Forged"}}}
    forged["diff_sha256"] = diff_digest(forged["salt"], '{"before": {"name": "Forged"}}')
    forged["hash"] = link_hash(before.hash, forged)
    await conn.execute(insert(AUDIT_EVENTS).values(forged))


async def append_without_trigger(conn: AsyncConnection, t: TenantWorld) -> None:
    last = await event(conn, t, 5)
    await conn.execute(text("SET LOCAL session_replication_role = replica"))
    await conn.execute(insert(AUDIT_EVENTS).values({**last._mapping, "id": uuid.uuid4(), "seq": 6,
                                                    "prev_hash": last.hash, "hash": bytes(32)}))


async def swap(conn: AsyncConnection, t: TenantWorld) -> None:
    """Events 2 and 3 change places."""
    mine = AUDIT_EVENTS.c.tenant_id == t.id
    await conn.execute(update(AUDIT_EVENTS).where(mine, AUDIT_EVENTS.c.seq == 2).values(seq=-2))
    await conn.execute(update(AUDIT_EVENTS).where(mine, AUDIT_EVENTS.c.seq == 3).values(seq=2))
    await conn.execute(update(AUDIT_EVENTS).where(mine, AUDIT_EVENTS.c.seq == -2).values(seq=3))


async def redact_without_erasure(conn: AsyncConnection, t: TenantWorld) -> None:
    await conn.execute(update(AUDIT_EVENTS).where(where(t, 3)).values(salt=None, diff=redaction_marker(uuid.uuid4())))


async def cut_prefix_by_hand(conn: AsyncConnection, t: TenantWorld) -> None:
    """Events 1-2 deleted and the anchor moved past them, without a chained retention event."""
    second = await event(conn, t, 2)
    await conn.execute(AUDIT_EVENTS.delete().where(AUDIT_EVENTS.c.tenant_id == t.id, AUDIT_EVENTS.c.seq <= 2))
    await conn.execute(update(AUDIT_CHAIN_HEADS).where(AUDIT_CHAIN_HEADS.c.tenant_id == t.id)
                       .values(anchor_seq=2, anchor_hash=second.hash))


TAMPERING: list[tuple[Callable[[AsyncConnection, TenantWorld], Awaitable[None]], int | None, str]] = [
    (edit_diff, 3, "its diff was changed"),
    (edit_action, 3, "its content was changed"),
    (backdate, 3, "its content was changed"),
    (rewrite_and_rehash, 4, "does not link to the event before it"),
    (delete_middle, 4, "event 3 before it is missing"),
    (delete_last, None, "event 5 is missing at the end"),
    (delete_all, None, "events 1..5 are missing at the end"),
    (insert_middle, 4, "does not link to the event before it"),
    (append_without_trigger, 6, "its content was changed"),
    (swap, 2, "does not link to the event before it"),
    (redact_without_erasure, 3, "no chained erasure lists it"),
    (cut_prefix_by_hand, None, "no chained retention event records the anchor"),
]


@pytest.mark.parametrize(("tamper", "seq", "reason"), TAMPERING, ids=[t[0].__name__ for t in TAMPERING])
async def test_verification_finds_each_tampering_as_the_database_owner(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    tamper: Callable[[AsyncConnection, TenantWorld], Awaitable[None]], seq: int | None, reason: str,
) -> None:
    tenant = await chained_tenant(make_tenant, client)
    bystander = await chained_tenant(make_tenant, client, events=2)
    intact = await verify(admin_engine, tenant)
    assert intact.ok and (intact.first_seq, intact.last_seq, intact.head_seq) == (1, 5, 5), intact.broken

    async with admin_engine.begin() as conn:
        await tamper(conn, tenant)

    found = await verify(admin_engine, tenant)
    assert found.broken is not None, tamper.__name__
    assert found.broken.seq == seq and reason in found.broken.reason, found.broken
    if seq is not None:
        async with admin_engine.connect() as conn:
            assert found.broken.event_id in set((await conn.execute(select(AUDIT_EVENTS.c.id).where(
                AUDIT_EVENTS.c.tenant_id == tenant.id, AUDIT_EVENTS.c.seq == seq))).scalars())

    # The admin query says the same (as the application role, under RLS) ...
    body = data_or_fail(await gql(client, CHAIN, token=tenant.token(Role.ADMIN)))["auditChain"]
    assert body["ok"] is False and body["broken"]["seq"] == seq and reason in body["broken"]["reason"]
    # ... and so does the command, with a non-zero status; the other tenant's chain is untouched.
    assert await audit_verify(monkeypatch, settings, tenant.slug) == 1
    assert f"BROKEN at {found.broken.describe()}" in capsys.readouterr().err
    assert (await verify(admin_engine, bystander)).ok


async def audit_verify(monkeypatch: pytest.MonkeyPatch, settings: Settings, slug: str) -> int:
    """``atrium audit verify --tenant SLUG`` run in the test's event loop against the test database."""
    monkeypatch.setenv("DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("ATRIUM_JWT_SECRET", settings.jwt_secret)
    args: argparse.Namespace = parser().parse_args(["audit", "verify", "--tenant", slug])
    return await cmd_audit(args)


async def test_an_intact_chain_verifies_through_the_command_and_the_query(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    tenant = await chained_tenant(make_tenant, client, events=4)
    assert await audit_verify(monkeypatch, settings, tenant.slug) == 0
    async with admin_engine.connect() as conn:
        head = (await conn.execute(select(AUDIT_CHAIN_HEADS).where(AUDIT_CHAIN_HEADS.c.tenant_id == tenant.id))).one()
        rows = (await conn.execute(select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == tenant.id)
                                   .order_by(AUDIT_EVENTS.c.seq))).all()
    line = capsys.readouterr().out
    assert f"intact: 4 events checked (events 1..4, anchor 0); head 4 sha256 {head.hash.hex()}" in line
    # Each event links to the one before, starting from 32 zero bytes; the head is the last event.
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert rows[0].prev_hash == GENESIS and all(b.prev_hash == a.hash for a, b in itertools.pairwise(rows))
    assert head.hash == rows[-1].hash and head.seq == 4

    body = data_or_fail(await gql(client, CHAIN, token=tenant.token(Role.ADMIN)))["auditChain"]
    assert body == {"ok": True, "checked": 4, "firstSeq": 1, "lastSeq": 4, "headSeq": 4,
                    "headHash": head.hash.hex(), "anchorSeq": 0, "broken": None}


@pytest.mark.parametrize(("role", "may"), [(Role.VIEWER, False), (Role.MEMBER, False), (Role.ADMIN, True),
                                           (Role.OWNER, True)])
async def test_verifying_is_for_admins_and_sees_only_the_own_chain(
    client: httpx.AsyncClient, make_tenant: MakeTenant, role: Role, may: bool,
) -> None:
    mine = await chained_tenant(make_tenant, client, events=2)
    await chained_tenant(make_tenant, client, events=3)  # another tenant's events are not in mine's chain
    body = await gql(client, CHAIN, token=mine.token(role))
    if not may:
        assert codes(body) == ["FORBIDDEN"]
        return
    assert data_or_fail(body)["auditChain"]["checked"] == 2


async def test_concurrent_writes_of_one_tenant_form_one_unbroken_chain(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    tenant = await make_tenant("conc")
    token = tenant.token(Role.MEMBER)
    await asyncio.gather(*(create_company(client, token, name=f"Concurrent {n}") for n in range(24)))
    found = await verify(admin_engine, tenant)
    assert found.ok, found.broken
    assert (found.checked, found.first_seq, found.last_seq, found.head_seq) == (24, 1, 24, 24)


class Rollback(Exception):
    """Ends a tenant transaction with a rollback."""


async def test_a_rolled_back_change_leaves_no_link(
    client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine, settings: Settings,
) -> None:
    tenant = await chained_tenant(make_tenant, client, events=2)
    databases = Databases(settings.app_url, pool_size=1)

    def an_event() -> Any:
        return insert(AUDIT_EVENTS).values(tenant_id=tenant.id, id=uuid.uuid4(), action="create",
                                           entity_type="Company", entity_id=uuid.uuid4(), diff={})

    try:
        with pytest.raises(Rollback):
            async with databases.tenant_transaction(tenant.id) as conn:
                await conn.execute(an_event())
                await conn.execute(an_event())
                raise Rollback
        async with databases.tenant_transaction(tenant.id) as conn:
            await conn.execute(an_event())
    finally:
        await databases.dispose()
    found = await verify(admin_engine, tenant)
    assert found.ok and (found.last_seq, found.head_seq) == (3, 3), found.broken


async def test_the_chain_columns_a_writer_sends_are_overwritten(
    make_tenant: MakeTenant, settings: Settings, admin_engine: AsyncEngine,
) -> None:
    tenant = await make_tenant("forge")
    databases = Databases(settings.app_url, pool_size=1)
    try:
        async with databases.tenant_transaction(tenant.id) as conn:
            await conn.execute(insert(AUDIT_EVENTS).values(
                tenant_id=tenant.id, id=uuid.uuid4(), action="create", entity_type="Company", entity_id=uuid.uuid4(),
                diff={}, seq=99, prev_hash=b"x" * 32, hash=b"y" * 32, salt=None, diff_sha256=b"z" * 32))
        # The application role reads its own head and nothing else, and cannot move it.
        with pytest.raises(DBAPIError, match="permission denied"):
            async with databases.tenant_transaction(tenant.id) as conn:
                await conn.execute(update(AUDIT_CHAIN_HEADS).values(seq=0))
        async with databases.tenant_transaction(tenant.id) as conn:
            heads = (await conn.execute(select(AUDIT_CHAIN_HEADS.c.tenant_id))).scalars().all()
        assert heads == [tenant.id]
    finally:
        await databases.dispose()
    found = await verify(admin_engine, tenant)
    assert found.ok and found.last_seq == 1


async def test_bulk_audit_rows_are_chained_in_one_call_and_only_in_the_tenant(
    make_tenant: MakeTenant, settings: Settings, admin_engine: AsyncEngine,
) -> None:
    """``atrium_audit_append`` (a batch's or an import's audit rows): chained exactly as the trigger
    chains single rows, interleaved with them; its tenant is the transaction's; the linking function
    it shares with the trigger cannot be called to move the head without a row."""
    tenant, other = await make_tenant("bulk"), await make_tenant("bulk-other")
    databases = Databases(settings.app_url, pool_size=1)
    statement = text("SELECT atrium_audit_append(NULL, 'r', CAST(:ids AS uuid[]), CAST(:actions AS text[]), "
                     "CAST(:types AS text[]), CAST(:entities AS uuid[]), CAST(:diffs AS jsonb))")
    try:
        for n in (3, 1, 2):
            async with databases.tenant_transaction(tenant.id) as conn:
                await conn.execute(statement, {
                    "ids": [str(uuid.uuid4()) for _ in range(n)], "actions": ["create"] * n,
                    "types": ["Company"] * n, "entities": [str(uuid.uuid4()) for _ in range(n)],
                    "diffs": json.dumps([{"after": {"name": f"Bulk {i}"}} for i in range(n)])})
                await conn.execute(insert(AUDIT_EVENTS).values(  # a single row between two bulk ones
                    tenant_id=tenant.id, id=uuid.uuid4(), action="update", entity_type="Company",
                    entity_id=uuid.uuid4(), diff={"after": {"name": "Single"}}))
        with pytest.raises(DBAPIError, match="links rows being inserted"):
            async with databases.tenant_transaction(tenant.id) as conn:
                await conn.execute(text("SELECT atrium_audit_link(e) FROM audit_events e LIMIT 1"))
    finally:
        await databases.dispose()
    found = await verify(admin_engine, tenant)
    assert found.ok and (found.last_seq, found.head_seq, found.checked) == (9, 9, 9), found.broken
    assert (await verify(admin_engine, other)).checked == 0


async def test_the_migration_chains_the_events_written_before_it(server_url: str) -> None:
    async with scratch_database(server_url, "atrium_chainmig", migrated=False) as url:
        await migrate(url, "0007_idempotency_keys")
        from models.db import create_engine

        engine = create_engine(url)
        try:
            tenant_ids = [uuid.uuid4(), uuid.uuid4()]
            async with engine.begin() as conn:
                for n, tenant_id in enumerate(tenant_ids):
                    await conn.execute(text("INSERT INTO tenants (id, slug, name) VALUES (:id, :slug, 'Old')"),
                                       {"id": tenant_id, "slug": f"old-{n}"})
                    for minute in (3, 1, 2):  # inserted out of time order: chained by time
                        await conn.execute(text(
                            "INSERT INTO audit_events "
                            "(tenant_id, id, occurred_at, action, entity_type, entity_id, diff) "
                            "VALUES (:t, :id, timestamptz '2026-01-01 00:00Z' + make_interval(mins => :m), "
                            "'create', 'Company', :e, CAST(:diff AS jsonb))"),
                            {"t": tenant_id, "id": uuid.uuid4(), "m": minute, "e": uuid.uuid4(),
                             "diff": f'{{"after": {{"minute": {minute}}}}}'})
            await migrate(url)
            async with engine.connect() as conn:
                for tenant_id in tenant_ids:
                    await conn.execution_options(isolation_level="REPEATABLE READ")
                    async with conn.begin():
                        found = await verify_chain(conn, tenant_id)
                        minutes = (await conn.execute(text(
                            "SELECT (diff->'after'->>'minute')::int FROM audit_events WHERE tenant_id = :t "
                            "ORDER BY seq"), {"t": tenant_id})).scalars().all()
                    assert found.ok and found.head_seq == 3, found.broken
                    assert minutes == [1, 2, 3]
                # New events continue the migrated chain.
                async with conn.begin():
                    await conn.execute(text(
                        "INSERT INTO audit_events (tenant_id, id, action, entity_type, entity_id, diff) "
                        "VALUES (:t, :id, 'create', 'Company', :id, '{}')"), {"t": tenant_ids[0], "id": uuid.uuid4()})
                await conn.execution_options(isolation_level="REPEATABLE READ")
                async with conn.begin():
                    found = await verify_chain(conn, tenant_ids[0])
                assert found.ok and found.last_seq == 4
        finally:
            await engine.dispose()
