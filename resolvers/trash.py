"""The trash: ``trash(type:)`` lists it, ``purgeTrash`` empties what is past retention (or one record
now), ``setTrashRetention`` sets the workspace's retention. The same purge runs without a request as
the ``trash`` retention target (``models.retention``: the server's scheduled retention job and
``atrium retention run``, each tenant past its own ``trash_retention_days``) and as ``purge_trash``
(``atrium trash purge``, which may choose another retention).

What a delete moves to the trash, what a restore brings back and what a purge removes is the write
path's (``resolvers.writes.Change.trash`` / ``restore`` / ``purge``); which records are trashable is
their declarations' (``Record.trash``). The trash is read with the database's backstop lifted for
that one statement only (``TenantScope.fetch_trash``), and the statement names the trashed rows it
wants itself.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import strawberry
from sqlalchemy import Executable, Row, Select, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from auth.principal import Principal
from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput, NotFound
from core.ids import parse_global_id
from models.db import TenantScope, set_view, showing_trash
from models.retention import RETENTION, retention_target
from models.tables import TENANTS, Role
from models.visibility import SYSTEM, viewing
from records.crm import BY_NAME
from records.declare import Record, SortKey, parse_for, snake
from resolvers.paging import paginate
from resolvers.writes import TRASHABLE, Change, change, public_record
from schema.crm import Tenant
from schema.objects import RecordObject
from schema.pagination import Connection
from schema.trash import PurgePayload, TrashedRecord
from webhooks.outbox import enqueue

RESTORABLE: tuple[Record, ...] = tuple(record for record in TRASHABLE if record.root.delete)
"""Trashable records a client deletes itself (others only go along with them)."""

_make_enum: Any = enum.Enum
TrashType: type[enum.Enum] = strawberry.enum(
    _make_enum("TrashType", {snake(record.name).upper(): record.name for record in RESTORABLE}),
    description="The record types that go to the trash when deleted.")



@dataclass(frozen=True)
class TrashReader:
    """A request's reads that see the trash (``resolvers.paging.Reader``)."""

    db: TenantScope

    async def fetch(self, statement: Executable, params: dict[str, Any] | None = None) -> Sequence[Row[Any]]:
        return await self.db.fetch_trash(statement, params)


def roots(record: Record, tenant_id: uuid.UUID) -> Select[Any]:
    """The tenant's records of ``record`` in the trash that were deleted on their own (those the caller
    may see: ``Record.scoped``)."""
    t = record.table
    return select(t).where(t.c.tenant_id == tenant_id, t.c.deleted_at.is_not(None), t.c.trash_batch == t.c.id,
                           *record.scoped(t))


async def retention(conn: AsyncConnection, tenant_id: uuid.UUID) -> dt.timedelta:
    days = (await conn.execute(select(TENANTS.c.trash_retention_days).where(TENANTS.c.id == tenant_id))).scalar()
    if days is None:
        raise NotFound("tenant", tenant_id)
    return dt.timedelta(days=days)


async def purge_expired(w: Change, older_than: dt.timedelta | None = None, *,
                        cutoff: dt.datetime | None = None) -> PurgePayload:
    """Remove for good every record that went to ``w``'s tenant's trash before ``cutoff`` (default:
    ``older_than`` before now, else the tenant's retention before now), with its batch, oldest first.
    A record something outside the trash still needs (RESTRICT) is kept, and so is nothing else of
    its batch; the rest goes."""
    if cutoff is None:
        cutoff = w.now - (older_than if older_than is not None else await retention(w.conn, w.tenant_id))
    purged = kept = 0
    async with showing_trash(w.conn):
        due = [(record, row) for record in TRASHABLE
               for row in (await w.conn.execute(roots(record, w.tenant_id).where(record.table.c.deleted_at < cutoff)
                                                .order_by(record.table.c.deleted_at, record.table.c.id))).all()]
        for record, row in sorted(due, key=lambda item: item[1].deleted_at):
            published = len(w.events)
            try:
                async with w.conn.begin_nested():
                    purged += await w.purge(record, row.id)
            except NotFound:
                pass  # already removed with an earlier one (a line item with its deal)
            except BadUserInput:
                del w.events[published:]
                kept += 1
    return PurgePayload(purged=purged, kept=kept)


async def system_purge(conn: AsyncConnection, tenant_id: uuid.UUID, now: dt.datetime, *,
                       older_than: dt.timedelta | None = None, cutoff: dt.datetime | None = None) -> PurgePayload:
    """``purge_expired`` as the system's own work in the tenant transaction ``conn``: audited as
    ``purge`` with no actor, its webhook deliveries (records that lose a link) written to the outbox
    in the same transaction, as the write path does for a request."""
    w = Change(conn, Principal(tenant_id, uuid.UUID(int=0), Role.OWNER, 0), "trash-purge", now=now, system=True)
    payload = await purge_expired(w, older_than, cutoff=cutoff)
    await enqueue(conn, tenant_id, zip(w.events, w.rows, strict=True), public_record)
    return payload


@retention_target("trash", "records in the trash longer than the workspace's trash retention (30 days unless "
                           "set otherwise; also setTrashRetention), each removed for good with its batch and "
                           "audited as a purge", setting=TENANTS.c.trash_retention_days, days=(1, 3650))
async def _trash(conn: AsyncConnection, tenant_id: uuid.UUID, cutoff: dt.datetime) -> int:
    return (await system_purge(conn, tenant_id, dt.datetime.now(dt.UTC), cutoff=cutoff)).purged


async def purge_trash(engine: AsyncEngine, older_than: dt.timedelta | None = None, *,
                      tenant_id: uuid.UUID | None = None, now: dt.datetime | None = None) -> dict[uuid.UUID, int]:
    """Purge the trash of ``tenant_id`` (or of every tenant in ``engine``'s database, which then must
    be able to read every tenant: the admin URL) for a scheduler or the CLI: what has been there
    longer than ``older_than`` (default: each tenant's own retention) is removed for good
    (``system_purge``). One transaction per tenant. Returns the records purged per tenant."""
    moment = now or dt.datetime.now(dt.UTC)
    if tenant_id is None:
        async with engine.connect() as conn:
            tenants = [row.id for row in (await conn.execute(select(TENANTS.c.id).order_by(TENANTS.c.id))).all()]
    else:
        tenants = [tenant_id]
    out: dict[uuid.UUID, int] = {}
    for tenant in tenants:
        async with engine.connect() as conn, conn.begin():
            await set_view(conn, tenant, SYSTEM)  # the system's work: every record, whoever may see it
            with viewing(SYSTEM):
                out[tenant] = (await system_purge(conn, tenant, moment, older_than=older_than)).purged
    return out


@strawberry.type
class TrashQuery:
    @strawberry.field(**requires(Permission.TRASH, "Records of one type in the trash, most recently deleted first."))
    async def trash(self, info: Info, type: TrashType, first: int | None = None,  # type: ignore[valid-type]
                    after: str | None = None) -> Connection[TrashedRecord]:
        session = info.context.session
        record = BY_NAME[type.value]  # type: ignore[attr-defined]
        t = record.table
        (days,), = await session.db.fetch(select(TENANTS.c.trash_retention_days)
                                          .where(TENANTS.c.id == session.tenant_id))
        keep = dt.timedelta(days=days)
        kind = RecordObject.type_of(record)

        def build(row: Row[Any]) -> TrashedRecord:
            return TrashedRecord(record=kind.from_row(row), deleted_at=row.deleted_at,  # type: ignore[arg-type]
                                 purge_after=row.deleted_at + keep, deleted_by_id=row.deleted_by)

        key = SortKey("deletedAt", t.c.deleted_at, "deleted_at", parse_for(t.c.deleted_at))
        return await paginate(TrashReader(session.db), roots(record, session.tenant_id), t.c.id, key, build,
                              descending=True, first=first, after=after, last=None, before=None,
                              max_page=info.context.settings.max_page_size)


@strawberry.type
class TrashMutation:
    @strawberry.mutation(**requires(Permission.TRASH, "Remove for good what has been in the trash longer than the "
                                                      "workspace's retention; with `id`, that record now (one "
                                                      "deleted on its own, with what went with it)."))
    async def purge_trash(self, info: Info, id: strawberry.ID | None = None) -> PurgePayload:
        async with change(info) as w:
            if id is None:
                return await purge_expired(w)
            type_name, key = parse_global_id(id)
            record = BY_NAME.get(type_name)
            if record is None or record not in TRASHABLE:
                raise BadUserInput("id", f"objects of type {type_name} do not go to the trash")
            return PurgePayload(purged=await w.purge(record, key), kept=0)

    @strawberry.mutation(**requires(Permission.MANAGE_TENANT, "Set how many days deleted records stay in the trash."))
    async def set_trash_retention(self, info: Info, days: int) -> Tenant:
        low, high = RETENTION["trash"].days
        if not low <= days <= high:
            raise BadUserInput("days", f"must be between {low} and {high}")
        async with change(info) as w:
            before = await retention(w.conn, w.tenant_id)
            row = (await w.conn.execute(update(TENANTS).where(TENANTS.c.id == w.tenant_id)
                                        .values(trash_retention_days=days).returning(TENANTS))).one()
            await w.audit("Tenant", "update", w.tenant_id, {"before": {"trash_retention_days": before.days},
                                                             "after": {"trash_retention_days": days}})
        return Tenant.from_row(row)

