"""Tenant export (``exportTenant``, ``exportJob``) and retention policies (``setRetentionPolicy``).

What an export holds is derived, not listed: every table of ``TENANT_TABLES`` (but those in
``NOT_EXPORTED``, each with its reason), without the columns of ``SECRET_COLUMNS``, plus every
declared record whose rows live outside the tenant tables (the members: ``USER``, users joined with
their memberships, so e-mail, name and role and never a password hash), plus the columns of
``DERIVED`` (a note's plain text beside its CRDT state). A new tenant table is exported, or named
in ``NOT_EXPORTED``; ``tests/test_export.py`` holds the two together.

The job runs in the background of the process that accepted the mutation (``core.tasks``), which
holds a lease on it while it lives (``models.leases``: a job whose process died is failed, with an
error its owner sees, by the next process to look). It reads
the whole tenant in one REPEATABLE READ transaction (one snapshot, rows streamed through server-side
cursors in batches), writes ``<type>.jsonl`` and ``<type>.csv`` per source and a ``manifest.json``
into a zip produced in chunks (``models.archive``), and stores each chunk and its progress in short
transactions of their own, so ``exportJob`` shows progress while it runs. Memory stays at a batch of
rows and a chunk, whatever the tenant's size.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import logging
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import strawberry
from sqlalchemy import Select, delete, func, insert, select, update

from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput, NotFound
from core.ids import decode_id
from models.archive import ArchiveWriter, sign_download
from models.audit_chain import verify_chain
from models.db import Databases
from models.loaders import TENANT
from models.retention import RETENTION
from models.tables import (
    API_KEYS,
    AUDIT_EVENTS,
    EXPORT_CHUNKS,
    EXPORT_JOBS,
    IDEMPOTENCY_KEYS,
    IMPORT_FILES,
    NOTES,
    RETENTION_POLICIES,
    TENANT_TABLES,
    TENANTS,
)
from records.crm import RECORDS
from resolvers.writes import change, jsonable
from schema.governance import ExportJob, RetentionPolicy
from subscriptions.notes import text_of

log = logging.getLogger("atrium.exports")

FORMAT = "atrium-export-v1"
BATCH = 500

NOT_EXPORTED = {
    IDEMPOTENCY_KEYS.name: "stored answers of retried mutations, kept for a day: copies of what the archive holds",
    EXPORT_JOBS.name: "the exports themselves",
    EXPORT_CHUNKS.name: "the exports' archives",
    IMPORT_FILES.name: "uploaded CSV files, kept only while their import runs: their rows are the records it wrote",
}
SECRET_COLUMNS = {API_KEYS.name: ("secret_sha256",)}
"""Columns never exported: credentials (an API key's hash; users' password hashes are never selected)."""
DERIVED: Mapping[str, Mapping[str, Callable[[Mapping[str, Any]], Any]]] = {
    NOTES.name: {"text": lambda row: text_of(bytes(row["state"]))},
}
"""Columns computed for the archive beside the stored ones: a note's text (its CRDT state is kept too)."""


@dataclass(frozen=True)
class Source:
    """One type of the archive: ``<name>.jsonl`` and ``<name>.csv``."""

    name: str
    query: Select[Any]
    derived: Mapping[str, Callable[[Mapping[str, Any]], Any]] = field(default_factory=dict)


def export_sources() -> list[Source]:
    """What an export holds (module docstring), in a stable order; queries bind ``tenant_id``."""
    sources: list[Source] = []
    for table in TENANT_TABLES:
        if table.name in NOT_EXPORTED:
            continue
        hidden = {"tenant_id", *SECRET_COLUMNS.get(table.name, ())}
        order = [table.c.seq] if table is AUDIT_EVENTS else list(table.primary_key.columns)
        sources.append(Source(table.name, select(*(c for c in table.c if c.name not in hidden))
                              .where(table.c.tenant_id == TENANT).order_by(*order),
                              DERIVED.get(table.name, {})))
    tenant_tables = {t.name for t in TENANT_TABLES}
    for record in RECORDS:
        if record.table.name not in tenant_tables:
            sources.append(Source(record.plural, record.query.order_by(record.key)))
    return sources


def _csv_value(value: Any) -> str:
    value = jsonable(value)
    if value is None:
        return ""
    if isinstance(value, dict | list | bool):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


async def _set(databases: Databases, tenant_id: uuid.UUID, job_id: uuid.UUID, **values: Any) -> None:
    async with databases.tenant_transaction(tenant_id) as conn:
        await conn.execute(update(EXPORT_JOBS).where(EXPORT_JOBS.c.tenant_id == tenant_id, EXPORT_JOBS.c.id == job_id)
                           .values(**values, updated_at=func.now()))


class _Store:
    """Stores an archive's chunks in order, with the job's progress, each batch in its own transaction."""

    def __init__(self, databases: Databases, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
        self.databases, self.tenant_id, self.job_id = databases, tenant_id, job_id
        self.next = 0

    async def put(self, chunks: list[bytes], rows_done: int) -> None:
        async with self.databases.tenant_transaction(self.tenant_id) as conn:
            if chunks:
                await conn.execute(insert(EXPORT_CHUNKS), [
                    {"tenant_id": self.tenant_id, "id": uuid.uuid4(), "job_id": self.job_id, "n": self.next + i,
                     "data": chunk} for i, chunk in enumerate(chunks)])
            await conn.execute(update(EXPORT_JOBS).where(EXPORT_JOBS.c.tenant_id == self.tenant_id,
                                                         EXPORT_JOBS.c.id == self.job_id)
                               .values(rows_done=rows_done, updated_at=func.now()))
        self.next += len(chunks)


async def run_export(databases: Databases, tenant_id: uuid.UUID, job_id: uuid.UUID, *, keep_seconds: int) -> None:
    """Build export ``job_id``'s archive (module docstring); the job ends DONE or FAILED (its chunks gone)."""
    params = {"tenant_id": tenant_id}
    try:
        await _set(databases, tenant_id, job_id, status="running", started_at=func.now())
        store = _Store(databases, tenant_id, job_id)
        archive = ArchiveWriter()
        async with databases.tenant_transaction(tenant_id, isolation="REPEATABLE READ") as reader:
            sources = export_sources()
            counts: dict[str, int] = {}
            for source in sources:
                counts[source.name] = int((await reader.execute(
                    select(func.count()).select_from(source.query.order_by(None).subquery()), params)).scalar_one())
            await _set(databases, tenant_id, job_id, rows_total=sum(counts.values()))
            done = 0
            for source in sources:
                for kind in ("jsonl", "csv"):
                    with archive.entry(f"{source.name}.{kind}") as entry:
                        result = await reader.stream(source.query.execution_options(yield_per=BATCH), params)
                        header = False
                        async for batch in result.partitions(BATCH):
                            rows = [{**row._mapping, **{k: f(row._mapping) for k, f in source.derived.items()}}
                                    for row in batch]
                            if kind == "jsonl":
                                entry.write("".join(json.dumps({k: jsonable(v) for k, v in r.items()},
                                                               ensure_ascii=False) + "\n" for r in rows).encode())
                                done += len(rows)
                            else:
                                text = io.StringIO()
                                writer = csv.writer(text)
                                if not header:
                                    writer.writerow(list(rows[0]))
                                    header = True
                                writer.writerows([_csv_value(v) for v in r.values()] for r in rows)
                                entry.write(text.getvalue().encode())
                            if chunks := archive.take():
                                await store.put(chunks, done)
                        if kind == "csv" and not header:
                            entry.write((",".join(result.keys()) + "\n").encode())
            tenant = (await reader.execute(select(TENANTS.c.id, TENANTS.c.slug, TENANTS.c.name)
                                           .where(TENANTS.c.id == tenant_id))).one()
            chain = await verify_chain(reader, tenant_id)
            manifest = {
                "format": FORMAT, "tenant": {"id": str(tenant.id), "slug": tenant.slug, "name": tenant.name},
                "exportedAt": dt.datetime.now(dt.UTC).isoformat(), "job": str(job_id),
                "files": {s.name: {"rows": counts[s.name], "jsonl": f"{s.name}.jsonl", "csv": f"{s.name}.csv"}
                          for s in sources},
                "auditChain": {"verified": chain.ok, "headSeq": chain.head_seq, "headHash": chain.head_hash.hex(),
                               "anchorSeq": chain.anchor_seq},
            }
            with archive.entry("manifest.json") as entry:
                entry.write(json.dumps(manifest, indent=2).encode())
        await store.put(archive.close(), done)
        await _set(databases, tenant_id, job_id, status="done", rows_done=done, finished_at=func.now(),
                   expires_at=func.now() + dt.timedelta(seconds=keep_seconds), archive_bytes=archive.size,
                   sha256=archive.sha256)
    except BaseException as exc:
        # Cancelled (the process is stopping) or failed: what was stored goes, the job says why.
        if isinstance(exc, asyncio.CancelledError):
            log.warning("export %s of tenant %s interrupted (the process is stopping)", job_id, tenant_id)
        else:
            log.exception("export %s of tenant %s failed", job_id, tenant_id)
        async with databases.tenant_transaction(tenant_id) as conn:
            await conn.execute(delete(EXPORT_CHUNKS).where(EXPORT_CHUNKS.c.tenant_id == tenant_id,
                                                           EXPORT_CHUNKS.c.job_id == job_id))
            await conn.execute(update(EXPORT_JOBS).where(EXPORT_JOBS.c.tenant_id == tenant_id,
                                                         EXPORT_JOBS.c.id == job_id)
                               .values(status="failed", error="the export did not complete; start another",
                                       updated_at=func.now()))
        raise


def download_url(info: Info, row: Any) -> str | None:
    """A fresh signed link for ``row``'s archive while it can be downloaded, else None."""
    context = info.context
    now = int(context.clock.time())
    if row.status != "done" or row.downloaded_at is not None or row.expires_at is None \
            or row.expires_at.timestamp() <= now:
        return None
    expires = min(now + context.settings.export_link_ttl_seconds, int(row.expires_at.timestamp()))
    query = sign_download(context.settings.download_secret, row.tenant_id, row.id, expires)
    base = str(context.request.base_url).rstrip("/") if context.request is not None else ""
    return f"{base}/exports/{row.id}?{query}"


@strawberry.type
class ExportQuery:
    @strawberry.field(**requires(Permission.MANAGE_TENANT, "An export of this workspace: its progress, then its "
                                                           "download link."))
    async def export_job(self, info: Info, id: strawberry.ID) -> ExportJob:
        session = info.context.session
        key = decode_id(id, "ExportJob")
        rows = await session.db.fetch(select(EXPORT_JOBS).where(EXPORT_JOBS.c.tenant_id == session.tenant_id,
                                                                EXPORT_JOBS.c.id == key))
        if not rows:
            raise NotFound("export job", key)
        return ExportJob.from_row(rows[0], download_url(info, rows[0]))

    @strawberry.field(**requires(Permission.READ_AUDIT, "Every retention target and how long this workspace "
                                                        "keeps its rows."))
    async def retention_policies(self, info: Info) -> list[RetentionPolicy]:
        session = info.context.session
        rows = await session.db.fetch(select(RETENTION_POLICIES).where(
            RETENTION_POLICIES.c.tenant_id == session.tenant_id))
        days = {row.target: row.keep_days for row in rows}
        settings = [t for t in RETENTION.values() if t.setting is not None]
        if settings:
            (tenant,) = await session.db.fetch(select(*(t.setting for t in settings if t.setting is not None))
                                               .where(TENANTS.c.id == session.tenant_id))
            days.update({t.name: value for t, value in zip(settings, tenant, strict=True)})
        return [RetentionPolicy(target=t.name, description=t.description, keep_days=days.get(t.name))
                for t in RETENTION.values()]


@strawberry.type
class ExportMutation:
    @strawberry.mutation(**requires(Permission.MANAGE_TENANT,
                                    "Export all of this workspace's data as one zip, in the background: follow it "
                                    "with exportJob(id), then download it once through its downloadUrl."))
    async def export_tenant(self, info: Info) -> ExportJob:
        context = info.context
        session = context.session
        job_id = uuid.uuid4()
        jobs = EXPORT_JOBS
        tasks, leases, databases = context.tasks, context.leases, context.databases
        if tasks is None or leases is None:
            raise RuntimeError("exports need the app's background tasks and leases")
        async with change(info) as w:
            # One export of a workspace at a time: while one is under way (its lease held by a live
            # process), asking again answers that one; one whose process died no longer counts.
            await w.conn.execute(select(func.pg_advisory_xact_lock(func.hashtext(f"export:{session.tenant_id}"))))
            running = (await w.conn.execute(select(jobs).where(
                jobs.c.tenant_id == session.tenant_id, jobs.c.status.in_(("pending", "running")),
                jobs.c.lease_expires_at > leases.now()).order_by(jobs.c.created_at.desc()).limit(1))).first()
            if running is not None:
                return ExportJob.from_row(running, None)
            row = (await w.conn.execute(insert(jobs).values(
                tenant_id=session.tenant_id, id=job_id, requested_by=session.user_id, lease_owner=leases.owner,
                lease_expires_at=leases.expiry()).returning(jobs))).one()
            await w.audit("ExportJob", "export", job_id, {})
        keep = context.settings.export_keep_seconds

        async def leased() -> None:
            try:
                await run_export(databases, session.tenant_id, job_id, keep_seconds=keep)
            finally:
                leases.release(session.tenant_id, job_id)

        async def start() -> None:
            leases.hold(session.tenant_id, job_id)
            tasks.spawn(leased(), name=f"export {job_id}")

        await session.db.after_commit(start)
        return ExportJob.from_row(row, None)

    @strawberry.mutation(**requires(Permission.MANAGE_TENANT,
                                    "Keep `target`'s rows for `keepDays` days (null: for ever); the retention job "
                                    "applies it (docs/export.md#retention)."))
    async def set_retention_policy(self, info: Info, target: str, keep_days: int | None = None) -> RetentionPolicy:
        if target not in RETENTION:
            raise BadUserInput("target", f"must be one of {', '.join(RETENTION)}")
        kept = RETENTION[target]
        low, high = kept.days
        if keep_days is not None and not low <= keep_days <= high:
            raise BadUserInput("keepDays", f"must be between {low} and {high}")
        if keep_days is None and kept.setting is not None:
            raise BadUserInput("keepDays", f"must be set: {target} always has a retention")
        session = info.context.session
        t = RETENTION_POLICIES
        if kept.setting is not None:
            setting = kept.setting
            async with change(info) as w:
                before = (await w.conn.execute(select(setting).where(TENANTS.c.id == session.tenant_id)
                                               .with_for_update())).scalar()
                await w.conn.execute(update(TENANTS).where(TENANTS.c.id == session.tenant_id)
                                     .values({setting.name: keep_days}))
                if before != keep_days:
                    await w.audit("Tenant", "update", session.tenant_id, {"before": {setting.name: before},
                                                                          "after": {setting.name: keep_days}})
            return RetentionPolicy(target=target, description=kept.description, keep_days=keep_days)
        async with change(info) as w:
            before = (await w.conn.execute(select(t.c.keep_days).where(
                t.c.tenant_id == session.tenant_id, t.c.target == target).with_for_update())).scalar()
            if keep_days is None:
                await w.conn.execute(delete(t).where(t.c.tenant_id == session.tenant_id, t.c.target == target))
            elif before is None:
                await w.conn.execute(insert(t).values(tenant_id=session.tenant_id, id=uuid.uuid4(), target=target,
                                                      keep_days=keep_days))
            else:
                await w.conn.execute(update(t).where(t.c.tenant_id == session.tenant_id, t.c.target == target)
                                     .values(keep_days=keep_days, version=t.c.version + 1, updated_at=func.now()))
            if before != keep_days:
                await w.audit("RetentionPolicy", "update", session.tenant_id,
                              {"target": target, "before": {"keepDays": before}, "after": {"keepDays": keep_days}})
        return RetentionPolicy(target=target, description=RETENTION[target].description, keep_days=keep_days)

