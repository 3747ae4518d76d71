"""The one write path: references, record checks, expectedVersion, dependents, audit rows, events.

A mutation states its change inside ``async with change(info) as w:``::

    async with change(info) as w:
        row = await w.update(DEAL, deal_id, {"stage_id": stage_id}, expected_version)
    return Deal.from_row(row)

What a declaration (``records``) says is applied here for every record type alike: fallbacks of
fields left out on create, existence in the tenant of every record a key names (NOT_FOUND naming
the field), the conditions it must meet and the columns copied from it, unique fields, record-level
checks over the whole resulting row, rollups into a parent (recomputed through this same path), and
on delete the effect on every record pointing at the deleted one (refused, cascaded or unlinked).

Everything inside the block is one tenant transaction: the rows, their audit_events rows and the
version checks commit together or not at all. Change events are published only after the commit.
The permission was checked once, by the mutation field's own permission (``auth.roles``), before
the resolver ran.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from sqlalchemy import ColumnElement, Row, Select, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.principal import Principal
from auth.session import Info, Session
from core.errors import BadUserInput, NotFound, VersionConflict
from core.ids import to_global_id
from models.tables import AUDIT_EVENTS
from records.crm import dependents, rollups_into
from records.declare import AtLeastOne, ExactlyOne, OnDelete, Record, camel
from subscriptions.events import ChangeEvent, ChangeKind
from webhooks.outbox import enqueue


def jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def snapshot(row: Mapping[Any, Any], columns: Any = None) -> dict[str, Any]:
    keys = columns if columns is not None else [k for k in row if k != "tenant_id"]
    return {k: jsonable(row[k]) for k in keys}


def public_record(record: Record, row: Mapping[Any, Any]) -> dict[str, Any]:
    """A row as a client sees it: GraphQL field names and global IDs (``stage_id`` -> ``stageId``)."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        if column == "tenant_id":
            continue
        relation = record.relation_by_key(column)
        type_name = record.name if column == "id" else relation.target().name if relation else None
        out[camel(column)] = (to_global_id(type_name, value) if type_name and value is not None
                              else jsonable(value))
    return out


class Change:
    """The statements of one mutation, inside its tenant transaction."""

    def __init__(self, conn: AsyncConnection, principal: Principal, request_id: str) -> None:
        self.conn = conn
        self.principal = principal
        self.request_id = request_id
        self.events: list[ChangeEvent] = []
        self.rows: list[Mapping[Any, Any]] = []
        """Each event's row (after the change; as it was, for a delete): what webhooks send."""

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.principal.tenant_id

    @property
    def user_id(self) -> uuid.UUID:
        return self.principal.user_id

    async def scalar(self, statement: Select[Any]) -> Any:
        return (await self.conn.execute(statement)).scalar()

    async def require(self, record: Record, id: uuid.UUID, *, field: str = "id", lock: bool = False) -> Row[Any]:
        """The record ``id`` in this tenant; NOT_FOUND naming ``field`` otherwise."""
        query = record.query.where(record.key == id)
        if lock:
            query = query.with_for_update()
        row: Row[Any] | None = (await self.conn.execute(query, {"tenant_id": self.tenant_id})).first()
        if row is None:
            raise NotFound(record.label, id, field=field)
        return row

    # ---- whole records (what the declaration says) ---------------------------------------------

    async def create(self, record: Record, values: dict[str, Any], *, prefix: str = "") -> Row[Any]:
        """Insert a record from validated ``values`` (``Record.create_values``): checks, fallbacks of
        fields left out, references (NOT_FOUND naming the field, with ``prefix``), then the row."""
        record.check(values)
        await self._references(record, values, prefix)
        for f in record.fields:
            if f.fallback is not None and values.get(f.column) is None:
                values[f.column] = await f.fallback(self, values)
        await self._unique(record, values, None, prefix)
        for column in [c for c, v in values.items() if v is None]:
            if not record.nullable(column):  # left to the column's default (e.g. occurred_at = now())
                del values[column]
        row = await self.insert(record, values)
        await self._roll_up(record, row._mapping)
        return row

    async def update(self, record: Record, id: uuid.UUID, changes: dict[str, Any],
                     expected_version: int | None, *, detail: Mapping[str, Any] | None = None,
                     rolled_up: bool = False) -> Row[Any]:
        """Apply ``changes`` to record ``id``; a stale ``expected_version`` raises VERSION_CONFLICT.

        A change that alters nothing writes nothing and keeps the version. ``detail`` (JSON data)
        replaces the before/after snapshot in the audit row and travels with the change event, for
        columns too large to snapshot on every change (a note's CRDT document: the update instead).
        ``rolled_up``: the change is a rollup's own recomputation (``Rollup``), not a client's.
        """
        t = record.table
        before = await self.require(record, id, lock=True)
        self.check_version(record, before, expected_version)
        await self._references(record, changes, "")
        if record.checks:
            record.check({**before._mapping, **changes})
        changed = {k: v for k, v in changes.items() if before._mapping[k] != v}
        if not changed:
            return before
        if not rolled_up:
            await self._derived_columns(record, id, changed)
        await self._unique(record, changed, id, "")
        row: Row[Any] = (await self.conn.execute(
            update(t).where(t.c.tenant_id == self.tenant_id, t.c.id == id)
            .values(**changed, version=t.c.version + 1, updated_at=func.now()).returning(t)
        )).one()
        await self._audit(record, "update", id, dict(detail) if detail is not None else {
            "before": snapshot(before._mapping, changed), "after": snapshot(row._mapping, changed)})
        self._event(record, ChangeKind.UPDATED, row, tuple(changed), detail=detail,
                    previous_scope=scope_of(record, before._mapping))
        await self._roll_up(record, row._mapping)
        return row

    async def delete(self, record: Record, id: uuid.UUID, expected_version: int | None) -> Row[Any]:
        """Delete record ``id`` and apply its dependents' ``OnDelete`` rules first (all audited)."""
        t = record.table
        before = await self.require(record, id, lock=True)
        self.check_version(record, before, expected_version)
        await self.release(record, id)
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(delete(t).where(t.c.tenant_id == self.tenant_id, t.c.id == id))
        except IntegrityError:
            raise BadUserInput("id", f"this {record.label} is still in use; move or delete what "
                                     "refers to it first") from None
        await self._audit(record, "delete", id, {"before": snapshot(before._mapping)})
        self._event(record, ChangeKind.DELETED, before, (), version=before.version + 1)
        await self._roll_up(record, before._mapping)
        return before

    async def release(self, target: Record, id: uuid.UUID) -> None:
        """What deleting ``target`` ``id`` does to the records pointing at it: RESTRICT refuses while
        there are any; CASCADE deletes them; SET_NULL unlinks them, deleting those it would leave
        without any link their ``AtLeastOne``/``ExactlyOne`` check asks for."""
        relations = dependents(target)
        for relation in relations:
            if relation.on_delete is OnDelete.RESTRICT:
                t = relation.owner.table
                if await self.scalar(select(t.c.id).where(t.c.tenant_id == self.tenant_id,
                                                          t.c[relation.key] == id).limit(1)) is not None:
                    raise BadUserInput("id", f"this {target.label} still has "
                                             f"{relation.owner.plural_label}; move or delete them first")
        for relation in relations:
            owner, column = relation.owner, relation.owner.table.c[relation.key]
            if relation.on_delete is OnDelete.CASCADE:
                await self.delete_where(owner, column == id)
            elif relation.on_delete is OnDelete.SET_NULL:
                links = [c for check in owner.checks if isinstance(check, AtLeastOne | ExactlyOne)
                         for c in check.columns if relation.key in check.columns]
                if links:
                    alone = func.num_nonnulls(*(owner.table.c[c] for c in dict.fromkeys(links))) == 1
                    await self.delete_where(owner, (column == id) & alone)
                await self.update_where(owner, column == id, {relation.key: None}, before={relation.key: id})

    async def _references(self, record: Record, values: dict[str, Any], prefix: str) -> None:
        rolled = {rollup.via for rollup in record.rollups}
        for relation in record.relations:
            target_id = values.get(relation.key)
            if not isinstance(target_id, uuid.UUID):
                continue
            field = prefix + camel(relation.key)
            # A parent whose column rolls up this record's is locked first: concurrent changes of its
            # children then recompute it one after another, each seeing the others' rows.
            row = await self.require(relation.target(), target_id, field=field, lock=relation.name in rolled)
            if relation.requires is not None:
                column, value, message = relation.requires
                if row._mapping[column] != value:
                    raise BadUserInput(field, message)
            for column in relation.copies:
                values[column] = row._mapping[column]

    async def _unique(self, record: Record, values: Mapping[str, Any], id: uuid.UUID | None, prefix: str) -> None:
        t = record.table
        for f in record.fields:
            if not f.unique or values.get(f.column) is None:
                continue
            query = select(t.c.id).where(t.c.tenant_id == self.tenant_id, t.c[f.column] == values[f.column])
            if id is not None:
                query = query.where(t.c.id != id)
            if await self.scalar(query.limit(1)) is not None:
                raise BadUserInput(prefix + f.name, f"is already used by another {record.label}")

    async def _derived_columns(self, record: Record, id: uuid.UUID, changed: Mapping[str, Any]) -> None:
        """Refuse a direct change of a column that children roll up (or lock) while there are children."""
        for child, rollup in rollups_into(record):
            touched = [c for c in (rollup.column, *rollup.locks) if c in changed]
            if not touched:
                continue
            t = child.table
            key = t.c[child.relation(rollup.via).key]
            if await self.scalar(select(t.c.id).where(t.c.tenant_id == self.tenant_id, key == id).limit(1)):
                raise BadUserInput(camel(touched[0]), f"is derived from the {record.label}'s "
                                                      f"{child.plural_label}; change those instead")

    async def _roll_up(self, record: Record, row: Mapping[Any, Any]) -> None:
        """Recompute the parents ``record``'s rollups feed (``Rollup``) after a change of ``row``."""
        for rollup in record.rollups:
            relation = record.relation(rollup.via)
            parent_id = row[relation.key]
            if parent_id is None:
                continue
            t = record.table
            total = await self.scalar(select(func.sum(t.c[rollup.total])).where(
                t.c.tenant_id == self.tenant_id, t.c[relation.key] == parent_id))
            if total is not None:
                await self.update(relation.target(), parent_id, {rollup.column: total}, None, rolled_up=True)

    # ---- rows -----------------------------------------------------------------------------------

    async def insert(self, record: Record, values: Mapping[str, Any]) -> Row[Any]:
        """Insert one row as given (no declaration rules: ``create`` applies those), audited."""
        t = record.table
        row: Row[Any] = (await self.conn.execute(
            insert(t).values(tenant_id=self.tenant_id, id=uuid.uuid4(), **values).returning(t)
        )).one()
        await self._audit(record, "create", row.id, {"after": snapshot(row._mapping)})
        self._event(record, ChangeKind.CREATED, row, tuple(values))
        return row

    async def insert_many(self, record: Record, rows: list[dict[str, Any]]) -> list[Row[Any]]:
        """Insert rows as given, like ``insert`` each (audit row and change event per row), set-based:
        one INSERT per set of columns given (rows leaving a column to its default form their own),
        one audit insert. Returns the rows in the order given."""
        t = record.table
        ids = [uuid.uuid4() for _ in rows]
        shapes: dict[tuple[str, ...], list[int]] = {}
        for i, values in enumerate(rows):
            shapes.setdefault(tuple(sorted(values)), []).append(i)
        inserted: dict[int, Row[Any]] = {}
        for positions in shapes.values():
            returned = (await self.conn.execute(
                insert(t).returning(t, sort_by_parameter_order=True),
                [{"tenant_id": self.tenant_id, "id": ids[i], **rows[i]} for i in positions])).all()
            inserted.update(zip(positions, returned, strict=True))
        out = [inserted[i] for i in range(len(rows))]
        await self._audit_many(record, "create", [(row.id, {"after": snapshot(row._mapping)}) for row in out])
        for row, values in zip(out, rows, strict=True):
            self._event(record, ChangeKind.CREATED, row, tuple(values))
        return out

    async def update_where(self, record: Record, where: ColumnElement[bool], changes: Mapping[str, Any], *,
                           before: Mapping[str, Any]) -> int:
        """Apply ``changes`` to every row of ``record`` matching ``where`` (in this tenant): versioned,
        audited and published like ``update``, in one statement plus one audit insert. ``where`` must
        pin the changed columns' old values, given as ``before`` for the audit rows."""
        t = record.table
        rows = (await self.conn.execute(
            update(t).where(t.c.tenant_id == self.tenant_id, where)
            .values(**changes, version=t.c.version + 1, updated_at=func.now()).returning(t)
        )).all()
        diff = {"before": {k: jsonable(v) for k, v in before.items()},
                "after": {k: jsonable(v) for k, v in changes.items()}}
        await self._audit_many(record, "update", [(row.id, diff) for row in rows])
        for row in rows:
            self._event(record, ChangeKind.UPDATED, row, tuple(changes))
        return len(rows)

    async def delete_where(self, record: Record, where: ColumnElement[bool]) -> int:
        """Delete every row of ``record`` matching ``where`` (in this tenant), audited and published."""
        t = record.table
        rows = (await self.conn.execute(
            delete(t).where(t.c.tenant_id == self.tenant_id, where).returning(t))).all()
        await self._audit_many(record, "delete", [(row.id, {"before": snapshot(row._mapping)}) for row in rows])
        for row in rows:
            self._event(record, ChangeKind.DELETED, row, (), version=row.version + 1)
        return len(rows)

    async def audit(self, entity_type: str, action: str, entity_id: uuid.UUID, diff: dict[str, Any], *,
                    id: uuid.UUID | None = None) -> None:
        """The audit row of a change to something that is not a declared record (API keys, documents);
        ``id``: the event's own id when the caller must know it (an erasure's markers name it)."""
        await self.conn.execute(insert(AUDIT_EVENTS).values(
            tenant_id=self.tenant_id, id=id or uuid.uuid4(), actor_id=self.user_id, action=action,
            entity_type=entity_type, entity_id=entity_id, diff=diff, request_id=self.request_id,
        ))

    async def _audit(self, record: Record, action: str, entity_id: uuid.UUID, diff: dict[str, Any]) -> None:
        await self.audit(record.name, action, entity_id, diff)

    async def _audit_many(self, record: Record, action: str, entries: list[tuple[uuid.UUID, dict[str, Any]]]) -> None:
        if entries:
            # With RETURNING, SQLAlchemy sends the rows as multi-row INSERTs (up to 1,000 rows each)
            # instead of one statement per row.
            await self.conn.execute(insert(AUDIT_EVENTS).returning(AUDIT_EVENTS.c.id), [
                {"tenant_id": self.tenant_id, "id": uuid.uuid4(), "actor_id": self.user_id,
                 "action": action, "entity_type": record.name, "entity_id": entity_id, "diff": diff,
                 "request_id": self.request_id}
                for entity_id, diff in entries])

    @staticmethod
    def check_version(record: Record, row: Row[Any], expected_version: int | None) -> None:
        if expected_version is not None and row.version != expected_version:
            raise VersionConflict(record.label, row.version, public_record(record, row._mapping))

    def _event(self, record: Record, kind: ChangeKind, row: Row[Any], fields: tuple[str, ...],
               version: int | None = None, detail: Mapping[str, Any] | None = None,
               previous_scope: dict[str, str] | None = None) -> None:
        scope = scope_of(record, row._mapping)
        self.rows.append(row._mapping)
        self.events.append(ChangeEvent(
            tenant_id=self.tenant_id, entity_type=record.name, entity_id=row.id, kind=kind,
            fields=tuple(camel(f) for f in fields), actor_id=self.user_id,
            version=version if version is not None else row.version, occurred_at=dt.datetime.now(dt.UTC),
            scope=scope, previous_scope=previous_scope if previous_scope and previous_scope != scope else {},
            detail=dict(detail or {}),
        ))


def scope_of(record: Record, row: Mapping[Any, Any]) -> dict[str, str]:
    """The change-event routing keys of a row (``Record.routing``)."""
    return {key: str(row[column]) for key, column in record.routing.items()}


@asynccontextmanager
async def change(info: Info) -> AsyncIterator[Change]:
    """One mutation's transaction; publishes its events (stamped with the commit time) after it commits
    (after the request's, when the request is one transaction: ``TenantScope.hold``)."""
    context = info.context
    session: Session = context.session
    async with session.db.write() as conn:
        w = Change(conn, session.principal, context.request_id)
        yield w
        # Webhook deliveries join the outbox in the change's own transaction (webhooks.outbox).
        await enqueue(conn, w.tenant_id, zip(w.events, w.rows, strict=True), public_record)

    async def publish() -> None:
        committed_at = dt.datetime.now(dt.UTC)
        for event in w.events:
            await context.broker.publish(dataclasses.replace(event, committed_at=committed_at))

    await session.db.after_commit(publish)
