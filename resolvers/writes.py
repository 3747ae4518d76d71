"""The one write path: permission, references, expectedVersion, audit row, events after commit.

A mutation states its change inside ``async with change(info, Permission.WRITE) as w:``::

    async with change(info, Permission.WRITE) as w:
        stage = await w.require(STAGE, stage_id, field="stageId")
        row = await w.insert(DEAL, {**values, "pipeline_id": stage.pipeline_id})
    return Deal.from_row(row)

Everything inside the block is one tenant transaction: the rows, their audit_events rows and the
version checks commit together or not at all. Change events are published only after the commit.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import strawberry
from sqlalchemy import ColumnElement, Row, Table, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.context import Context, Principal
from auth.roles import Permission, allows
from core.errors import BadUserInput, Forbidden, NotFound, VersionConflict
from core.ids import to_global_id
from models.tables import AUDIT_EVENTS, MEMBERSHIPS, USERS
from subscriptions.events import ChangeEvent, ChangeKind


@dataclass(frozen=True)
class Entity:
    """A writable record type: its GraphQL name, its table and the event routing keys of a row."""

    name: str
    table: Table
    scope: Callable[[Mapping[str, Any]], dict[str, str]] = field(default=lambda row: {})


def jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return value


def snapshot(row: Mapping[str, Any], columns: Any = None) -> dict[str, Any]:
    keys = columns if columns is not None else [k for k in row if k != "tenant_id"]
    return {k: jsonable(row[k]) for k in keys}


REFERENCE_TYPES = {"company_id": "Company", "contact_id": "Contact", "deal_id": "Deal", "stage_id": "Stage",
                   "pipeline_id": "Pipeline", "owner_id": "User", "actor_id": "User", "user_id": "User"}


def public_record(entity: Entity, row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as a client sees it: GraphQL field names and global IDs (``stage_id`` -> ``stageId``)."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        if column == "tenant_id":
            continue
        type_name = entity.name if column == "id" else REFERENCE_TYPES.get(column)
        out[strawberry_name(column)] = (to_global_id(type_name, value) if type_name and value is not None
                                        else jsonable(value))
    return out


class Change:
    """The statements of one mutation, inside its tenant transaction."""

    def __init__(self, conn: AsyncConnection, principal: Principal, request_id: str) -> None:
        self.conn = conn
        self.principal = principal
        self.request_id = request_id
        self.events: list[ChangeEvent] = []

    @property
    def tenant_id(self) -> uuid.UUID:
        return self.principal.tenant_id

    async def require(self, entity: Entity, id: uuid.UUID, *, field: str = "id", lock: bool = False) -> Row[Any]:
        """The row ``id`` of ``entity`` in this tenant; NOT_FOUND naming ``field`` otherwise."""
        t = entity.table
        query = select(t).where(t.c.tenant_id == self.tenant_id, t.c.id == id)
        if lock:
            query = query.with_for_update()
        row = (await self.conn.execute(query)).first()
        if row is None:
            raise NotFound(entity.name.lower(), id, field=field)
        return row

    async def require_member(self, user_id: uuid.UUID, *, field: str) -> Row[Any]:
        """The user ``user_id`` if they belong to this tenant; NOT_FOUND naming ``field`` otherwise."""
        row = (await self.conn.execute(
            select(USERS.c.id, MEMBERSHIPS.c.role).join(MEMBERSHIPS, MEMBERSHIPS.c.user_id == USERS.c.id)
            .where(MEMBERSHIPS.c.tenant_id == self.tenant_id, USERS.c.id == user_id)
        )).first()
        if row is None:
            raise NotFound("user", user_id, field=field)
        return row

    async def insert(self, entity: Entity, values: Mapping[str, Any]) -> Row[Any]:
        t = entity.table
        row = (await self.conn.execute(
            insert(t).values(tenant_id=self.tenant_id, id=uuid.uuid4(), **values).returning(t)
        )).one()
        await self._audit(entity, "create", row.id, {"after": snapshot(row._mapping)})
        self._event(entity, ChangeKind.CREATED, row, tuple(values))
        return row

    async def update(self, entity: Entity, id: uuid.UUID, changes: Mapping[str, Any],
                     expected_version: int | None, *, detail: Mapping[str, Any] | None = None) -> Row[Any]:
        """Apply ``changes`` to row ``id``; a stale ``expected_version`` raises VERSION_CONFLICT.

        A change that alters nothing writes nothing and keeps the version. ``detail`` (JSON data)
        replaces the before/after snapshot in the audit row and travels with the change event, for
        columns too large to snapshot on every change (a note's CRDT document: the update instead).
        """
        t = entity.table
        before = await self.require(entity, id, lock=True)
        self.check_version(entity, before, expected_version)
        changed = {k: v for k, v in changes.items() if before._mapping[k] != v}
        if not changed:
            return before
        row = (await self.conn.execute(
            update(t).where(t.c.tenant_id == self.tenant_id, t.c.id == id)
            .values(**changed, version=t.c.version + 1, updated_at=func.now()).returning(t)
        )).one()
        await self._audit(entity, "update", id, dict(detail) if detail is not None else {
            "before": snapshot(before._mapping, changed), "after": snapshot(row._mapping, changed)})
        self._event(entity, ChangeKind.UPDATED, row, tuple(changed), detail=detail,
                    previous_scope=entity.scope(before._mapping))
        return row

    async def delete(self, entity: Entity, id: uuid.UUID, expected_version: int | None) -> Row[Any]:
        t = entity.table
        before = await self.require(entity, id, lock=True)
        self.check_version(entity, before, expected_version)
        try:
            async with self.conn.begin_nested():
                await self.conn.execute(delete(t).where(t.c.tenant_id == self.tenant_id, t.c.id == id))
        except IntegrityError:
            raise BadUserInput("id", f"this {entity.name.lower()} is still in use; move or delete what "
                                     "refers to it first") from None
        await self._audit(entity, "delete", id, {"before": snapshot(before._mapping)})
        self._event(entity, ChangeKind.DELETED, before, (), version=before.version + 1)
        return before

    async def update_where(self, entity: Entity, where: ColumnElement[bool], changes: Mapping[str, Any], *,
                           before: Mapping[str, Any]) -> int:
        """Apply ``changes`` to every row of ``entity`` matching ``where`` (in this tenant): versioned,
        audited and published like ``update``, in one statement plus one audit insert. ``where`` must
        pin the changed columns' old values, given as ``before`` for the audit rows."""
        t = entity.table
        rows = (await self.conn.execute(
            update(t).where(t.c.tenant_id == self.tenant_id, where)
            .values(**changes, version=t.c.version + 1, updated_at=func.now()).returning(t)
        )).all()
        diff = {"before": {k: jsonable(v) for k, v in before.items()},
                "after": {k: jsonable(v) for k, v in changes.items()}}
        await self._audit_many(entity, "update", [(row.id, diff) for row in rows])
        for row in rows:
            self._event(entity, ChangeKind.UPDATED, row, tuple(changes))
        return len(rows)

    async def delete_where(self, entity: Entity, where: ColumnElement[bool]) -> int:
        """Delete every row of ``entity`` matching ``where`` (in this tenant), audited and published."""
        t = entity.table
        rows = (await self.conn.execute(
            delete(t).where(t.c.tenant_id == self.tenant_id, where).returning(t))).all()
        await self._audit_many(entity, "delete", [(row.id, {"before": snapshot(row._mapping)}) for row in rows])
        for row in rows:
            self._event(entity, ChangeKind.DELETED, row, (), version=row.version + 1)
        return len(rows)

    async def _audit_many(self, entity: Entity, action: str, entries: list[tuple[uuid.UUID, dict[str, Any]]]) -> None:
        if entries:
            await self.conn.execute(insert(AUDIT_EVENTS), [
                {"tenant_id": self.tenant_id, "id": uuid.uuid4(), "actor_id": self.principal.user_id,
                 "action": action, "entity_type": entity.name, "entity_id": entity_id, "diff": diff,
                 "request_id": self.request_id}
                for entity_id, diff in entries])

    @staticmethod
    def check_version(entity: Entity, row: Row[Any], expected_version: int | None) -> None:
        if expected_version is not None and row.version != expected_version:
            raise VersionConflict(entity.name.lower(), row.version, public_record(entity, row._mapping))

    async def _audit(self, entity: Entity, action: str, entity_id: uuid.UUID, diff: dict[str, Any]) -> None:
        await self.conn.execute(insert(AUDIT_EVENTS).values(
            tenant_id=self.tenant_id, id=uuid.uuid4(), actor_id=self.principal.user_id, action=action,
            entity_type=entity.name, entity_id=entity_id, diff=diff, request_id=self.request_id,
        ))

    def _event(self, entity: Entity, kind: ChangeKind, row: Row[Any], fields: tuple[str, ...],
               version: int | None = None, detail: Mapping[str, Any] | None = None,
               previous_scope: dict[str, str] | None = None) -> None:
        scope = entity.scope(row._mapping)
        self.events.append(ChangeEvent(
            tenant_id=self.tenant_id, entity_type=entity.name, entity_id=row.id, kind=kind,
            fields=tuple(strawberry_name(f) for f in fields), actor_id=self.principal.user_id,
            version=version if version is not None else row.version, occurred_at=dt.datetime.now(dt.UTC),
            scope=scope, previous_scope=previous_scope if previous_scope and previous_scope != scope else {},
            detail=dict(detail or {}),
        ))


def strawberry_name(column: str) -> str:
    """The GraphQL field name of a column (``stage_id`` -> ``stageId``)."""
    head, *rest = column.split("_")
    return head + "".join(part.title() for part in rest)


def authorize(context: Context, permission: Permission) -> Principal:
    principal = context.require()[0]
    if not allows(principal.role, permission):
        raise Forbidden(f"Your role ({principal.role.value}) does not have {permission.value}")
    return principal


@asynccontextmanager
async def change(info: strawberry.Info[Context, None], permission: Permission) -> AsyncIterator[Change]:
    """One mutation's transaction; publishes its events (stamped with the commit time) after it commits."""
    context = info.context
    principal = authorize(context, permission)
    _, db, _ = context.require()
    async with db.write() as conn:
        w = Change(conn, principal, context.request_id)
        yield w
    committed_at = dt.datetime.now(dt.UTC)
    for event in w.events:
        await context.broker.publish(dataclasses.replace(event, committed_at=committed_at))
