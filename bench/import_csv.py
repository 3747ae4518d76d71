"""CSV import benchmark: ``--rows`` deals (100,000 by default) from one CSV file, as one import job.

Seeds one demo tenant (a pipeline, companies, contacts) into a database of its own, writes a CSV of
``--rows`` deals (title, amount, currency, stage, company, contact, owner, close date and a unique
external id each), then runs the job as a server does (``resolvers.csv_import.run_import``: the
application role under row-level security, chunks of ``CHUNK`` rows through the one write path,
an audit row, a change event and the webhook outbox per record; events published to Redis when
``REDIS_URL`` is set). Prints the rows per second of the job (file check and job creation
excluded, timed separately), then checks what it wrote: every row once, the audit chain intact.
``--type contacts`` (first and last name, a unique e-mail address, a company) and ``--type
companies`` (name, a unique domain) measure the other two dedupe keys; ``--again`` imports the same
file a second time, every row then updating the record the first run created. Not a test: numbers
only.

    python -m bench.import_csv --rows 100000
    python -m bench.import_csv --rows 100000 --type contacts --again
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import time
import uuid

from sqlalchemy import func, select

from atrium.observability.memory import settle_the_heap
from atrium.ops.bootstrap import resolve_database
from atrium.ops.demo import DemoTenant, seed_tenant
from auth.principal import Principal
from bench.databases import fresh_database
from core.ids import to_global_id
from core.settings import Settings
from models.audit_chain import verify_chain
from models.db import Databases
from models.tables import AUDIT_EVENTS, COMPANIES, CONTACTS, DEALS, STAGES, Role
from resolvers.csv_import import CHUNK, check_file, create_job, record_for, run_import
from subscriptions.broker import Broker, create_broker


async def prepare(settings: Settings) -> tuple[str, DemoTenant]:
    url = await fresh_database(settings, "import_csv_bench")
    tenant = await seed_tenant(url, "bench-import", "Bench import", deals=20, seed=1)
    return url, tenant


async def the_file(databases: Databases, tenant: DemoTenant, rows: int, kind: str) -> bytes:
    async with databases.tenant_transaction(tenant.tenant_id) as conn:
        stages = list((await conn.execute(select(STAGES.c.id))).scalars())
        companies = list((await conn.execute(select(COMPANIES.c.id).limit(200))).scalars())
        contacts = list((await conn.execute(select(CONTACTS.c.id).limit(200))).scalars())
    owner = to_global_id("User", tenant.owner.user_id)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(HEADERS[kind])
    for i in range(rows):
        key = f"bench-{uuid.uuid4().hex}"
        if kind == "contacts":
            writer.writerow([f"Ada {i}", "Lovelace", f"{key}@Example.com",
                             to_global_id("Company", companies[i % len(companies)])])
        elif kind == "companies":
            writer.writerow([f"Company {i}", f"{key}.example"])
        else:
            writer.writerow([f"Imported deal {i}", f"{1000 + i % 5000}.50", "USD" if i % 3 else "EUR",
                             to_global_id("Stage", stages[i % len(stages)]),
                             to_global_id("Company", companies[i % len(companies)]),
                             to_global_id("Contact", contacts[i % len(contacts)]), owner,
                             f"2031-{1 + i % 12:02d}-15", key])
    return out.getvalue().encode()


HEADERS = {
    "deals": ["Title", "Amount", "Currency", "Stage", "Company", "Contact", "Owner", "Close date", "Key"],
    "contacts": ["First name", "Last name", "E-mail", "Company"],
    "companies": ["Name", "Domain"],
}
MAPPINGS: dict[str, dict[str, str | None]] = {
    "deals": {"Title": "title", "Amount": "amount", "Currency": "currency", "Stage": "stageId",
              "Company": "companyId", "Contact": "contactId", "Owner": "ownerId", "Close date": "expectedCloseDate",
              "Key": "externalId"},
    "contacts": {"First name": "firstName", "Last name": "lastName", "E-mail": "email", "Company": "companyId"},
    "companies": {"Name": "name", "Domain": "domain"},
}
KEYS = {"deals": DEALS.c.external_id, "contacts": CONTACTS.c.email, "companies": COMPANIES.c.domain}
"""The column each file's unique keys are in (all start with ``bench-``)."""


async def run_job(databases: Databases, broker: Broker, tenant: DemoTenant, kind: str, content: bytes,
                  dry_run: bool) -> tuple[float, float, float, uuid.UUID]:
    """Check and store the file, then run its job: the seconds of each, the CPU seconds this process
    spent on the job (Python, the driver, the Redis client; PostgreSQL's are the rest), the job's id."""
    record = record_for(kind)
    started = time.perf_counter()
    checked = check_file(record, content, MAPPINGS[kind])
    principal = Principal(tenant_id=tenant.tenant_id, user_id=tenant.owner.user_id, role=Role.OWNER,
                          expires_at=float("inf"))
    async with databases.tenant_transaction(tenant.tenant_id) as conn:
        job = await create_job(conn, principal.tenant_id, principal.user_id, record, content, checked,
                               dry_run=dry_run)
    submitted = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    assert await run_import(databases, broker, tenant.tenant_id, job.id)
    return submitted, time.perf_counter() - started, time.process_time() - cpu, job.id


async def main_async(args: argparse.Namespace) -> None:
    base = await resolve_database(Settings.from_env())
    url, tenant = await prepare(base)
    settings = Settings(database_url=url, redis_url=base.redis_url)
    databases = Databases(settings.app_url, pool_size=4)
    broker = create_broker(settings.redis_url, prefix="bench-import:")
    await broker.start()
    kind = args.type
    key = KEYS[kind]
    try:
        content = await the_file(databases, tenant, args.rows, kind)
        settle_the_heap()  # as a server does once it is built (atrium.asgi), and `atrium import`
        runs = [await run_job(databases, broker, tenant, kind, content, args.dry_run)
                for _ in range(2 if args.again else 1)]
        async with databases.tenant_transaction(tenant.tenant_id) as conn:
            imported = (await conn.execute(select(func.count()).select_from(key.table).where(
                key.like("bench-%")))).scalar_one()
            audited = [(await conn.execute(select(func.count()).select_from(AUDIT_EVENTS).where(
                AUDIT_EVENTS.c.request_id == f"import:{job}"))).scalar_one() for _, _, _, job in runs]
        async with databases.tenant_transaction(tenant.tenant_id, isolation="REPEATABLE READ") as conn:
            chain = await verify_chain(conn, tenant.tenant_id)
    finally:
        await broker.close()
        await databases.dispose()
    print(f"import {args.rows} {kind}{' (dry run)' if args.dry_run else ''}, {len(content) / 1e6:.1f} MB, chunks of "
          f"{CHUNK}, RLS on, events to {'Redis' if settings.redis_url else 'the in-process broker'}")
    for n, (submitted, elapsed, cpu, _) in enumerate(runs):
        print(f"check and store the file: {submitted:.2f} s")
        print(f"{'job' if n == 0 else 'again, every row an update'}: {elapsed:.2f} s = "
              f"{args.rows / elapsed:,.0f} rows/s (this process's CPU {cpu:.2f} s: {100 * cpu / elapsed:.0f}%)")
    print(f"written: {imported} {kind}, {' + '.join(str(a) for a in audited)} audit rows; audit chain "
          f"{'intact' if chain.ok else 'BROKEN'} ({chain.checked} events)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--type", choices=sorted(HEADERS), default="deals")
    parser.add_argument("--again", action="store_true", help="import the file a second time (updates)")
    parser.add_argument("--dry-run", action="store_true")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
