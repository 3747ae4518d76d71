"""``atrium import FILE --tenant SLUG --type deals [--map COLUMN=FIELD ...] [--dry-run] [--as EMAIL]``.

Creates the job as an API upload would (the same checks, coded errors; audited as the member it runs
as: ``--as``, else the tenant's first owner) and runs it in this process with a progress bar, as
the application role under row-level security. Stopped midway (Ctrl-C, a kill), the job stays
RUNNING and any server resumes it where it stopped (docs/import.md). Exit status 0 when the job is
DONE (row errors are listed), 1 when it FAILED, 2 for a file or mapping it cannot start from.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from atrium.observability.memory import settle_the_heap
from atrium.ops.admin import tenant_id_by_slug
from core.console import out
from core.errors import AtriumError
from core.settings import Settings
from models.db import Databases, create_engine
from models.tables import IMPORT_ERRORS, IMPORT_JOBS, MEMBERSHIPS, USERS, Role
from resolvers.csv_import import IMPORTABLE, check_file, create_job, live_definitions, record_for, run_import
from resolvers.writes import Change
from schema.imports import JOB_TYPE
from subscriptions.broker import create_broker

SHOWN_ERRORS = 20


def add_parser(sub: Any) -> None:
    i = sub.add_parser("import", help="import records from a CSV file (docs/import.md)")
    i.add_argument("file", type=Path)
    i.add_argument("--tenant", required=True, help="the tenant's slug")
    i.add_argument("--type", required=True, choices=sorted(IMPORTABLE), help="the record type")
    i.add_argument("--map", action="append", default=[], metavar="COLUMN=FIELD",
                   help="the field a column goes to (repeatable; COLUMN= leaves it out)")
    i.add_argument("--dry-run", action="store_true", help="validate every row, write none")
    i.add_argument("--as", dest="member", metavar="EMAIL", help="the member the import acts as (default: an owner)")


def mapping_of(items: list[str]) -> dict[str, str | None] | None:
    out_: dict[str, str | None] = {}
    for item in items:
        column, sep, field = item.partition("=")
        if not sep:
            raise ValueError(f"--map {item!r}: expected COLUMN=FIELD")
        out_[column.strip()] = field.strip() or None
    return out_ or None


async def _member(databases: Databases, tenant_id: uuid.UUID, email: str | None) -> tuple[uuid.UUID, Role]:
    async with databases.tenant_transaction(tenant_id) as conn:
        query = (select(MEMBERSHIPS.c.user_id, MEMBERSHIPS.c.role).join(USERS, USERS.c.id == MEMBERSHIPS.c.user_id)
                 .where(MEMBERSHIPS.c.tenant_id == tenant_id))
        if email is None:
            query = query.where(MEMBERSHIPS.c.role == Role.OWNER.value).order_by(MEMBERSHIPS.c.created_at)
        else:
            query = query.where(func.lower(USERS.c.email) == email.lower())
        row = (await conn.execute(query.limit(1))).first()
    if row is None:
        raise ValueError(f"{email} is not a member of this tenant" if email else "the tenant has no owner")
    return row.user_id, Role(row.role)


async def run(args: argparse.Namespace, settings: Settings) -> int:
    from atrium.cli.main import ProgressBar
    from auth.principal import Principal

    record = record_for(args.type)
    content = args.file.read_bytes()
    mapping = mapping_of(args.map)
    registry = create_engine(settings.admin_url)
    try:
        tenant_id = await tenant_id_by_slug(registry, args.tenant)
    finally:
        await registry.dispose()
    databases = Databases(settings.app_url, pool_size=2)
    broker = create_broker(settings.redis_url, prefix=settings.redis_prefix)
    await broker.start()
    try:
        user_id, role = await _member(databases, tenant_id, args.member)
        async with databases.tenant_transaction(tenant_id) as conn:
            definitions = await live_definitions(conn, tenant_id, record)
        try:
            checked = check_file(record, content, mapping, definitions)
        except AtriumError as error:
            sys.stderr.write(f"atrium: {error.message} ({error.extra.get('reason', error.code.value)})\n")
            return 2
        principal = Principal(tenant_id=tenant_id, user_id=user_id, role=role, expires_at=float("inf"))
        async with databases.tenant_transaction(tenant_id) as conn:
            job = await create_job(conn, tenant_id, user_id, record, content, checked, dry_run=args.dry_run)
            await Change(conn, principal, f"cli-import:{job.id}").audit(JOB_TYPE, "import", job.id, {
                "type": record.plural, "rows": checked.total, "bytes": len(content), "dryRun": args.dry_run,
                "mapping": checked.plan.mapping()})
        out(f"import {job.id}: {checked.total} rows of {record.plural}"
            f"{' (dry run)' if args.dry_run else ''}, columns {checked.plan.mapping()}")
        bar = ProgressBar(record.plural, checked.total)
        settle_the_heap()  # as a server does once it is built
        await run_import(databases, broker, tenant_id, job.id, progress=bar.advance)
        async with databases.tenant_transaction(tenant_id) as conn:
            done = (await conn.execute(select(IMPORT_JOBS).where(IMPORT_JOBS.c.tenant_id == tenant_id,
                                                                 IMPORT_JOBS.c.id == job.id))).one()
            errors = (await conn.execute(select(IMPORT_ERRORS).where(
                IMPORT_ERRORS.c.tenant_id == tenant_id, IMPORT_ERRORS.c.job_id == job.id)
                .order_by(IMPORT_ERRORS.c.row_number).limit(SHOWN_ERRORS))).all()
    finally:
        await broker.close()
        await databases.dispose()
    for e in errors:
        where = f" column {e.column_name!r}" if e.column_name else ""
        sys.stderr.write(f"row {e.row_number}{where}: {e.code} {e.message}\n")
    if done.error_count > len(errors):
        sys.stderr.write(f"... {done.error_count - len(errors)} more rows refused (importErrors lists them all)\n")
    out(f"import {job.id} {done.state}: {done.created_count} created, {done.updated_count} updated, "
        f"{done.error_count} rows refused{'; nothing written (dry run)' if done.dry_run else ''}")
    if done.error:
        sys.stderr.write(f"atrium: {done.error}\n")
    return 0 if done.state == "done" else 1
