"""atrium.ops.demo against a throwaway database on the test PostgreSQL server (conftest's ``scratch_database``)."""

from __future__ import annotations

import asyncpg
import pytest

from atrium.ops.demo import DEMO_PASSWORD, DemoTenant, seed_demo, seed_tenant
from auth.passwords import verify_password
from core.pgurl import libpq_url
from tests.conftest import scratch_database

DEALS = 200

# (child table, column, parent table): joined on the id alone, the tenants must still agree.
REFERENCES = (
    ("contacts", "company_id", "companies"),
    ("stages", "pipeline_id", "pipelines"),
    ("deals", "pipeline_id", "pipelines"),
    ("deals", "stage_id", "stages"),
    ("deals", "company_id", "companies"),
    ("deals", "contact_id", "contacts"),
    ("activities", "deal_id", "deals"),
    ("activities", "contact_id", "contacts"),
    ("activities", "company_id", "companies"),
)
TENANT_TABLES = ("memberships", "companies", "contacts", "pipelines", "stages", "deals", "activities")


async def _snapshot(conn: asyncpg.Connection, tenant: DemoTenant) -> list[tuple[object, ...]]:
    """The tenant's deals without timestamps or tenant id: what must be identical for a given seed."""
    rows = await conn.fetch(
        "SELECT d.id, d.title, d.amount, d.currency, d.status, s.name AS stage, c.name AS company "
        "FROM deals d JOIN stages s ON s.tenant_id = d.tenant_id AND s.id = d.stage_id "
        "LEFT JOIN companies c ON c.tenant_id = d.tenant_id AND c.id = d.company_id "
        "WHERE d.tenant_id = $1 ORDER BY d.id",
        tenant.tenant_id,
    )
    return [tuple(row) for row in rows]


async def _check_tenant(conn: asyncpg.Connection, tenant: DemoTenant) -> None:
    tid = tenant.tenant_id
    count = await conn.fetchval("SELECT count(*) FROM deals WHERE tenant_id = $1", tid)
    assert count == DEALS == tenant.deals
    assert await conn.fetchval("SELECT count(*) FROM companies WHERE tenant_id = $1", tid) == DEALS // 4
    contacts = await conn.fetchval("SELECT count(*) FROM contacts WHERE tenant_id = $1", tid)
    assert DEALS // 4 <= contacts <= 3 * DEALS // 4
    assert await conn.fetchval("SELECT count(*) FROM pipelines WHERE tenant_id = $1", tid) == 2
    assert await conn.fetch(
        "SELECT p.name, array_agg(s.name || ':' || s.probability ORDER BY s.position) AS stages "
        "FROM pipelines p JOIN stages s ON s.tenant_id = p.tenant_id AND s.pipeline_id = p.id "
        "WHERE p.tenant_id = $1 GROUP BY p.name ORDER BY p.name",
        tid,
    ) == [
        ("Renewals", ["Upcoming:0.6000", "Renewed:1.0000", "Churned:0.0000"]),
        ("Sales", ["Lead:0.1000", "Qualified:0.2500", "Proposal:0.5000", "Negotiation:0.7500",
                   "Closed Won:1.0000", "Closed Lost:0.0000"]),
    ]

    # Every deal has 3-5 activities, none before the deal was created.
    per_deal = await conn.fetch(
        "SELECT d.id, count(a.id) AS n, bool_and(a.occurred_at >= d.created_at) AS ordered "
        "FROM deals d LEFT JOIN activities a ON a.tenant_id = d.tenant_id AND a.deal_id = d.id "
        "WHERE d.tenant_id = $1 GROUP BY d.id",
        tid,
    )
    assert len(per_deal) == DEALS
    assert all(3 <= row["n"] <= 5 and row["ordered"] for row in per_deal)

    # Stage within the deal's pipeline; status follows the stage.
    mismatched = await conn.fetchval(
        "SELECT count(*) FROM deals d JOIN stages s ON s.id = d.stage_id AND s.tenant_id = d.tenant_id "
        "WHERE d.tenant_id = $1 AND (s.pipeline_id <> d.pipeline_id OR d.status <> CASE s.name "
        "WHEN 'Closed Won' THEN 'won' WHEN 'Renewed' THEN 'won' "
        "WHEN 'Closed Lost' THEN 'lost' WHEN 'Churned' THEN 'lost' ELSE 'open' END)",
        tid,
    )
    assert mismatched == 0
    statuses = {r["status"] for r in await conn.fetch("SELECT DISTINCT status FROM deals WHERE tenant_id = $1", tid)}
    assert statuses == {"open", "won", "lost"}

    # Amounts, currencies and dates within the documented ranges.
    bounds = await conn.fetchrow(
        "SELECT min(amount) AS lo, max(amount) AS hi, "
        "min(expected_close_date - current_date) AS close_lo, max(expected_close_date - current_date) AS close_hi, "
        "min(created_at) > now() - interval '366 days' AS recent, bool_and(scale(amount) = 2) AS cents "
        "FROM deals WHERE tenant_id = $1",
        tid,
    )
    assert 500 <= bounds["lo"] <= bounds["hi"] <= 250_000 and bounds["cents"]
    assert -181 <= bounds["close_lo"] <= bounds["close_hi"] <= 181 and bounds["recent"]
    currencies = await conn.fetch("SELECT DISTINCT currency FROM deals WHERE tenant_id = $1", tid)
    assert {r["currency"] for r in currencies} <= {"USD", "EUR", "GBP"}

    # Owners and actors are members who may write (never the viewer).
    viewer_refs = await conn.fetchval(
        "SELECT count(*) FROM memberships m WHERE m.tenant_id = $1 AND m.role = 'viewer' AND ("
        "EXISTS (SELECT 1 FROM deals d WHERE d.tenant_id = m.tenant_id AND d.owner_id = m.user_id) OR "
        "EXISTS (SELECT 1 FROM activities a WHERE a.tenant_id = m.tenant_id AND a.actor_id = m.user_id))",
        tid,
    )
    assert viewer_refs == 0
    tasks = await conn.fetchrow(
        "SELECT count(*) AS n, count(due_date) AS due FROM activities WHERE tenant_id = $1 AND kind = 'task'", tid
    )
    assert tasks["n"] > 0 and tasks["due"] == tasks["n"]

    # Demo users: one membership each with the advertised role.
    roles = await conn.fetch(
        "SELECT u.email, m.role FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.tenant_id = $1", tid
    )
    assert sorted((r["email"], r["role"]) for r in roles) == sorted((u.email, u.role) for u in tenant.users)
    assert tenant.owner.email == f"owner@{tenant.slug}.example"
    assert {u.role for u in tenant.users} == {"owner", "admin", "member", "viewer"}


async def _check_isolation(conn: asyncpg.Connection) -> None:
    for child, column, parent in REFERENCES:
        crossing = await conn.fetchval(
            f"SELECT count(*) FROM {child} x JOIN {parent} p ON p.id = x.{column} WHERE p.tenant_id <> x.tenant_id"
        )
        assert crossing == 0, f"{child}.{column} points into another tenant's {parent}"
    for child, column in (("deals", "owner_id"), ("activities", "actor_id")):
        outsiders = await conn.fetchval(
            f"SELECT count(*) FROM {child} x WHERE x.{column} IS NOT NULL AND NOT EXISTS ("
            f"SELECT 1 FROM memberships m WHERE m.tenant_id = x.tenant_id AND m.user_id = x.{column})"
        )
        assert outsiders == 0, f"{child}.{column} is not a member of the row's tenant"


async def test_seed_demo_tenants_consistent_isolated_and_repeatable(server_url: str) -> None:
    async with scratch_database(server_url, "atrium_demo") as url:  # migrated and empty
        dsn = libpq_url(url)
        steps: dict[str, list[int]] = {"acme": [], "globex": []}
        first = [
            await seed_tenant(url, slug, name, deals=DEALS, progress=steps[slug].append)
            for slug, name in (("acme", "Acme Corporation"), ("globex", "Globex Corporation"))
        ]
        for slug_steps in steps.values():
            assert sum(slug_steps) == DEALS and all(0 < step <= 1_000 for step in slug_steps)

        conn = await asyncpg.connect(dsn)
        try:
            for tenant in first:
                await _check_tenant(conn, tenant)
            await _check_isolation(conn)
            before = {t.slug: await _snapshot(conn, t) for t in first}
            users_before = await conn.fetchval("SELECT count(*) FROM users")
            owner_hash = await conn.fetchval(
                "SELECT password_hash FROM users WHERE lower(email) = $1", first[0].owner.email
            )
            assert verify_password(owner_hash, DEMO_PASSWORD)

            # Seeding again replaces the tenants: same counts, same content, no duplicate users.
            reports: list[tuple[int, int]] = []
            again = await seed_demo(
                url, slugs=("acme", "globex"), deals=DEALS, progress=lambda done, total: reports.append((done, total))
            )
            assert [t.slug for t in again] == ["acme", "globex"]
            assert reports[0] == (0, 2 * DEALS) and reports[-1] == (2 * DEALS, 2 * DEALS)
            assert [d for d, _ in reports] == sorted(d for d, _ in reports)
            for old, new in zip(first, again, strict=True):
                assert new.tenant_id != old.tenant_id
                assert [u.user_id for u in new.users] == [u.user_id for u in old.users]
                await _check_tenant(conn, new)
                assert await _snapshot(conn, new) == before[new.slug]
                for table in TENANT_TABLES:
                    leftovers = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE tenant_id = $1", old.tenant_id)
                    assert leftovers == 0, table
            await _check_isolation(conn)
            assert await conn.fetchval("SELECT count(*) FROM tenants") == 2
            assert await conn.fetchval("SELECT count(*) FROM users") == users_before
        finally:
            await conn.close()


async def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="deals"):
        await seed_tenant("postgresql+asyncpg://nobody@127.0.0.1:1/none", "x", "X", deals=-1)
    with pytest.raises(ValueError, match="plan"):
        await seed_tenant("postgresql+asyncpg://nobody@127.0.0.1:1/none", "x", "X", deals=1, plan="gold")
