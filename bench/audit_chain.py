"""What the audit hash chain costs concurrent writes.

Seeds tenants into a database of its own, then runs write transactions shaped like a mutation's
(``set_config`` of the tenant, an INSERT of a company, its audit row, ``--extra`` more statements
while the transaction is open, COMMIT) from ``--clients`` connections as the application role,
for ``--seconds`` each round. Each round runs with the chain trigger on and off (disabled by the
table owner), with every client writing to one tenant (they serialise on its chain head) and with
each client on its own tenant. Prints transactions per second and p50/p99 latency.

    .venv/bin/python -m bench.audit_chain --clients 1,8,32 --seconds 5 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import asyncpg
from sqlalchemy.engine import make_url

from atrium.ops.bootstrap import resolve_database
from core.pgurl import libpq_url, with_user
from core.settings import Settings
from models.migrations import migrate

APP_ROLE = "atrium_app"
DIFF = '{"after": {"name": "Bench"}}'
INSERT = ("INSERT INTO audit_events (tenant_id, id, action, entity_type, entity_id, diff) "
          f"VALUES ($1, $2, 'create', 'Company', $3, '{DIFF}')")
INSERT_UNCHAINED = ("INSERT INTO audit_events (tenant_id, id, action, entity_type, entity_id, diff, seq, "
                    f"diff_sha256, prev_hash, hash) VALUES ($1, $2, 'create', 'Company', $3, '{DIFF}', $4, $5, $5, $5)")


async def writer(dsn: str, tenants: list[uuid.UUID], deadline: float, extra: int, chain: bool,
                 latencies: list[float]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        n = 0
        while time.perf_counter() < deadline:
            tenant = tenants[n % len(tenants)]
            n += 1
            started = time.perf_counter()
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.tenant_id', $1, true)", str(tenant))
                company = uuid.uuid4()
                await conn.execute("INSERT INTO companies (tenant_id, id, name) VALUES ($1, $2, 'Bench')",
                                   tenant, company)
                if chain:
                    await conn.execute(INSERT, tenant, uuid.uuid4(), company)
                else:  # the trigger is off: the chain columns (NOT NULL) get placeholders
                    await conn.execute(INSERT_UNCHAINED, tenant, uuid.uuid4(), company,
                                       uuid.uuid4().int >> 65, bytes(32))
                for _ in range(extra):
                    await conn.execute("SELECT 1")
            latencies.append(time.perf_counter() - started)
    finally:
        await conn.close()


async def round_(app_dsn: str, tenants: list[uuid.UUID], clients: int, shared: bool, seconds: float,
                 extra: int, chain: bool) -> tuple[float, float, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(writer(app_dsn, tenants[:1] if shared else [tenants[i]], deadline, extra, chain, latencies)
                           for i in range(clients)))
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return len(latencies) / seconds, statistics.median(ordered) * 1000, p99 * 1000


async def main(args: argparse.Namespace) -> None:
    settings = await resolve_database(Settings.from_env())
    assert settings.database_url
    server = settings.database_url
    name = f"audit_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(libpq_url(server))
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = make_url(settings.admin_url).set(database=name).render_as_string(hide_password=False)
    try:
        await migrate(url)
        owner = await asyncpg.connect(libpq_url(url))
        clients = [int(c) for c in args.clients.split(",")]
        tenants = [uuid.uuid4() for _ in range(max(clients))]
        for i, tenant in enumerate(tenants):
            await owner.execute("INSERT INTO tenants (id, slug, name) VALUES ($1, $2, 'Bench')", tenant, f"bench-{i}")
        app_dsn = libpq_url(with_user(url, APP_ROLE))
        print(f"medians of {args.repeat} rounds of {args.seconds:g} s, chain on and off interleaved")
        print(f"{'clients':>7} {'tenants':>8} {'chain':>5} {'tx/s':>8} {'p50 ms':>7} {'p99 ms':>7}")
        for count in clients:
            for shared in (True, False):
                results: dict[bool, list[tuple[float, float, float]]] = {True: [], False: []}
                for _ in range(args.repeat):
                    for chain in (True, False):
                        state = "ENABLE" if chain else "DISABLE"
                        await owner.execute(f"ALTER TABLE audit_events {state} TRIGGER audit_events_chain")
                        results[chain].append(
                            await round_(app_dsn, tenants, count, shared, args.seconds, args.extra, chain))
                for chain in (True, False):
                    rate, p50, p99 = (statistics.median(r[i] for r in results[chain]) for i in range(3))
                    print(f"{count:>7} {'one' if shared else 'own':>8} {'on' if chain else 'off':>5} "
                          f"{rate:>8.0f} {p50:>7.2f} {p99:>7.2f}", flush=True)
        await owner.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_chain")
        await owner.close()
    finally:
        admin = await asyncpg.connect(libpq_url(server))
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="per round")
    parser.add_argument("--extra", type=int, default=2, help="statements after the audit row, before COMMIT")
    parser.add_argument("--repeat", type=int, default=3, help="rounds per configuration (medians are printed)")
    asyncio.run(main(parser.parse_args()))
