"""CSV imports through the API: ``startImport``, ``importJob``, ``importJobProgress`` (``resolvers.csv_import``).

A file reaches the API either as the ``csv`` text of ``startImport`` (bounded by the request body
limit, 1 MiB: small files and scripts) or as the body of ``POST /imports`` (``atrium.http.csv``, up
to ``csv_import.MAX_FILE_BYTES``, authenticated like ``/graphql``). Both call ``submit``: the file is
checked whole (coded errors before any job exists), stored with its job in one transaction, and
the job starts in the background once that commits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import strawberry
from sqlalchemy import select

from auth.roles import Permission, allows, requires
from auth.session import Info, Session, event_session
from core.errors import Forbidden, NotFound
from core.ids import decode_id
from core.tasks import BackgroundTasks
from models.db import Databases
from models.tables import IMPORT_ERRORS, IMPORT_JOBS
from records.custom import Definition, definitions_query
from records.declare import Record
from resolvers.csv_import import ENDED, check_file, create_job, record_for, run_import
from resolvers.writes import Change
from schema.imports import JOB_TYPE, ImportColumn, ImportJob, ImportRowError, ImportType
from subscriptions.broker import GAP, OVERFLOW, Broker
from subscriptions.events import DELIVERY, Delivery, record_channel

MAX_REPORT = 1000


async def submit(session: Session, databases: Databases, broker: Broker, tasks: BackgroundTasks | None,
                 request_id: str, record: Record, content: bytes, mapping: Mapping[str, str | None] | None, *,
                 dry_run: bool) -> Any:
    """Check ``content``, store it with a new job, start the job after the commit; the job's row."""
    principal = session.principal
    if not allows(principal.role, record.access.create):
        raise Forbidden(f"Importing {record.plural_label} requires `{record.access.create.value}`")
    definitions = await definitions_for(session, record)
    checked = await asyncio.to_thread(check_file, record, content, mapping, definitions)  # a large file takes a while
    checked.plan.refuse_hidden(session.hidden(record.name), principal.role.value)
    async with session.db.write() as conn:
        row = await create_job(conn, principal.tenant_id, principal.user_id, record, content, checked,
                               dry_run=dry_run)
        await Change(conn, principal, request_id).audit(JOB_TYPE, "import", row.id, {
            "type": record.plural, "rows": checked.total, "bytes": len(content), "dryRun": dry_run,
            "mapping": checked.plan.mapping()})
    if tasks is None:
        raise RuntimeError("imports need the app's background tasks")
    tenant_id, job_id = principal.tenant_id, row.id

    async def work() -> None:
        await run_import(databases, broker, tenant_id, job_id)

    async def start() -> None:
        tasks.spawn(work(), name=f"import {job_id}")

    await session.db.after_commit(start)
    return row


async def definitions_for(session: Session, record: Record) -> list[Definition]:
    """The tenant's live custom fields of ``record`` (what a mapping's ``custom.<key>`` may name)."""
    if not record.custom_fields:
        return []
    rows = await session.db.fetch(definitions_query(record.name), {"tenant_id": session.tenant_id})
    return [Definition.from_row(row) for row in rows]


async def job_row(info: Info, id: str, field: str = "id") -> Any:
    session = info.context.session
    key = decode_id(id, JOB_TYPE, field=field)
    rows = await session.db.fetch(select(IMPORT_JOBS).where(IMPORT_JOBS.c.tenant_id == session.tenant_id,
                                                            IMPORT_JOBS.c.id == key))
    if not rows:
        raise NotFound("import job", key, field=field)
    return rows[0]


@strawberry.type
class ImportQuery:
    @strawberry.field(**requires(Permission.READ, "A CSV import: its state and progress."))
    async def import_job(self, info: Info, id: strawberry.ID) -> ImportJob:
        return ImportJob.from_row(await job_row(info, id))

    @strawberry.field(**requires(Permission.READ, "The rows a CSV import refused, in row order: up to `first` "
                                                  f"(at most {MAX_REPORT}) after row `afterRow`."))
    async def import_errors(self, info: Info, id: strawberry.ID, first: int = 100,
                            after_row: int = 0) -> list[ImportRowError]:
        job = await job_row(info, id)
        e = IMPORT_ERRORS
        rows = await info.context.session.db.fetch(
            select(e).where(e.c.tenant_id == job.tenant_id, e.c.job_id == job.id, e.c.row_number > after_row)
            .order_by(e.c.row_number, e.c.id).limit(max(0, min(first, MAX_REPORT))))
        return [ImportRowError.from_row(r) for r in rows]


@strawberry.type
class ImportMutation:
    @strawberry.mutation(**requires(Permission.WRITE,
                                    "Import records from CSV text (UTF-8, a header row) in the background: follow "
                                    "it with importJob(id) or importJobProgress(id). Columns go to the field of "
                                    "their name unless `mapping` says otherwise; rows matching a record by email "
                                    "(contacts), domain (companies) or externalId update it. For files above the "
                                    "request size limit, POST the file to /imports (docs/import.md)."))
    async def start_import(self, info: Info, type: ImportType, csv: str,  # type: ignore[valid-type]
                           mapping: list[ImportColumn] | None = None, dry_run: bool = False) -> ImportJob:
        context = info.context
        record = record_for(type.value)  # type: ignore[attr-defined]
        columns = {m.column: m.field for m in mapping} if mapping else None
        row = await submit(context.session, context.databases, context.broker, context.tasks, context.request_id,
                           record, csv.encode(), columns, dry_run=dry_run)
        return ImportJob.from_row(row)


@strawberry.type
class ImportSubscription:
    @strawberry.subscription(**requires(Permission.READ, "A CSV import's state: now, then after each chunk of "
                                                         "rows, until it is DONE or FAILED."),
                             metadata={DELIVERY: Delivery.PRIVATE_STATE})
    async def import_job_progress(self, info: Info, id: strawberry.ID) -> AsyncGenerator[ImportJob]:
        context = info.context
        key: uuid.UUID = (await job_row(info, id)).id
        async with context.broker.subscribe(record_channel(context.session.tenant_id, key)) as queue:
            while True:
                async with event_session(context):
                    job = ImportJob.from_row(await job_row(info, id))
                    yield job
                if job.state.value in ENDED:
                    return
                item = await queue.get()
                while not queue.empty() and item not in (GAP, OVERFLOW):
                    item = queue.get_nowait()
