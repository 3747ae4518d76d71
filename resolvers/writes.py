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

import asyncio
import base64
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Row,
    Select,
    String,
    Uuid,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.principal import Principal
from auth.session import Info, Session
from core.errors import AtriumError, BadUserInput, NotFound, VersionConflict
from core.ids import new_uuids, to_global_id
from models.db import Databases, each_key, every_holder_seen, showing_trash
from models.tables import AUDIT_EVENTS, MEMBERSHIPS
from records.crm import BY_NAME, RECORDS, dependents, rollups_into
from records.custom import Definition, Pending, changed_keys, definitions_query, hidden_key, resolve, user_ids
from records.declare import AtLeastOne, ExactlyOne, HiddenOf, OnDelete, Record, camel, nothing_hidden
from subscriptions.broker import Broker
from subscriptions.events import ChangeEvent, ChangeKind, Event
from webhooks.outbox import enqueue

log = logging.getLogger("atrium.writes")


def jsonable(value: Any) -> Any:
    """``value`` as JSON data: uuids, decimals and dates as text, bytes as base64."""
    kind = type(value)
    convert = _BY_TYPE.get(kind)  # by exact type: a row's values, thousands at a time
    if convert is None:
        convert = _BY_TYPE[kind] = _converter(kind)
    return convert(value)


def _converter(kind: type) -> Callable[[Any], Any]:
    """How ``jsonable`` converts a value of ``kind`` (a subclass as its base: the driver's own uuid
    type, an enum of text); decided once per type."""
    if issubclass(kind, uuid.UUID | Decimal):
        return str
    if issubclass(kind, dt.date):  # datetimes too
        return _isoformat
    if issubclass(kind, bytes):
        return _base64
    if issubclass(kind, dict):  # custom field values (``records.custom``)
        return _object
    if issubclass(kind, list):
        return _array
    return _same


def _isoformat(value: dt.date) -> str:
    return value.isoformat()


def _base64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _object(value: dict[Any, Any]) -> dict[Any, Any]:
    return {k: jsonable(v) for k, v in value.items()}


def _array(value: list[Any]) -> list[Any]:
    return [jsonable(v) for v in value]


def _same(value: Any) -> Any:
    return value


_BY_TYPE: dict[type, Callable[[Any], Any]] = {
    str: _same, int: _same, bool: _same, float: _same, type(None): _same,
    uuid.UUID: str, Decimal: str, dt.date: dt.date.isoformat, dt.datetime: dt.datetime.isoformat,
}
"""``jsonable``'s conversion of each type met so far (a handful: the column types)."""


def snapshot(row: Mapping[Any, Any], columns: Any = None) -> dict[str, Any]:
    keys = columns if columns is not None else [k for k in row if k != "tenant_id"]
    return {k: jsonable(row[k]) for k in keys}


def snapshots(rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    """``snapshot`` of each of ``rows`` (one statement's, so of one shape), read by position: a
    bulk change's thousand audit rows."""
    if not rows:
        return []
    fields = rows[0]._fields
    kept = [(i, k) for i, k in enumerate(fields) if k != "tenant_id"]
    convert = _BY_TYPE.get
    return [{k: (convert(type(row[i])) or jsonable)(row[i]) for i, k in kept} for row in rows]


def public_record(record: Record, row: Mapping[Any, Any], hidden: Collection[str] = (), *,
                  live: Collection[str] | None = None) -> dict[str, Any]:
    """A row as a client sees it: GraphQL field names and global IDs (``stage_id`` -> ``stageId``),
    without the fields ``hidden`` from the client's role (``auth.fields``); ``customFields`` as stored
    (key -> JSON value), only those of ``live`` keys when it is given (the values of a deleted
    definition are hidden), without the custom fields ``hidden`` from the role (``custom.<key>``)."""
    out: dict[str, Any] = {}
    for column, value in row.items():
        if column == "tenant_id" or camel(column) in hidden:
            continue
        if column == "custom_fields":
            out[camel(column)] = {k: jsonable(v) for k, v in value.items()
                                  if (live is None or k in live) and not hidden_key(k, hidden)}
            continue
        relation = record.relation_by_key(column)
        type_name = record.name if column == "id" else relation.target().name if relation else None
        out[camel(column)] = (to_global_id(type_name, value) if type_name and value is not None
                              else jsonable(value))
    return out


class Change:
    """The statements of one mutation, inside its tenant transaction."""

    def __init__(self, conn: AsyncConnection, principal: Principal, request_id: str, *,
                 now: dt.datetime | None = None, system: bool = False, hidden: HiddenOf = nothing_hidden) -> None:
        self.conn = conn
        self.principal = principal
        self.hidden = hidden
        """The caller's hidden fields (``auth.fields``): a version conflict's ``current`` leaves them out."""
        self.request_id = request_id
        self.events: list[ChangeEvent] = []
        self.rows: list[Mapping[Any, Any]] = []
        """Each event's row (after the change; as it was, for a delete): what webhooks send."""
        self.now = now or dt.datetime.now(dt.UTC)
        """The change's time as the app's clock tells it (a record's ``deleted_at``)."""
        self.actor_id: uuid.UUID | None = None if system else principal.user_id
        """Who the audit rows and events name: None for the system's own work (a scheduled purge)."""
        self._definitions: dict[str, list[Definition]] = {}
        self._membership: dict[uuid.UUID, bool] = {}

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

    # ---- custom fields (``records.custom``) ------------------------------------------------------

    async def definitions(self, record: Record) -> list[Definition]:
        """The tenant's live custom field definitions of ``record`` (read once per change)."""
        found = self._definitions.get(record.name)
        if found is None:
            rows = (await self.conn.execute(definitions_query(record.name), {"tenant_id": self.tenant_id})).all()
            found = self._definitions[record.name] = [Definition.from_row(row) for row in rows]
        return found

    async def custom_values(self, record: Record, values: dict[str, Any], current: Mapping[Any, Any] | None) -> None:
        """Replace the ``Pending`` custom fields of ``values`` by the record's resulting values, checked
        against the tenant's definitions (``records.custom.resolve``); USER values must name members."""
        pending = values.get("custom_fields")
        if not record.custom_fields or (current is not None and not isinstance(pending, Pending)):
            return
        definitions = await self.definitions(record)
        resolved = resolve(definitions, pending if isinstance(pending, Pending) else None,
                           None if current is None else current["custom_fields"], record.plural_label)
        users = user_ids(definitions, resolved)
        if users:
            found = await self.members(users.values())
            prefix = pending.prefix if isinstance(pending, Pending) else ""
            for key, user_id in users.items():
                if user_id not in found:
                    raise NotFound("user", user_id, field=f"{prefix}customFields.{key}")
        values["custom_fields"] = resolved

    async def members(self, user_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
        """Those of ``user_ids`` who are members of the tenant; each user is looked up once per
        change (a bulk change asks for all of its users first, in one statement)."""
        unknown = [u for u in set(user_ids) if u not in self._membership]
        if unknown:
            m = MEMBERSHIPS
            found = {row.user_id for row in (await self.conn.execute(select(m.c.user_id).where(
                m.c.tenant_id == self.tenant_id, m.c.user_id.in_(unknown)))).all()}
            self._membership.update((u, u in found) for u in unknown)
        return {u for u in user_ids if self._membership[u]}

    # ---- whole records (what the declaration says) ---------------------------------------------

    async def create(self, record: Record, values: dict[str, Any], *, prefix: str = "") -> Row[Any]:
        """Insert a record from validated ``values`` (``Record.create_values``): checks, fallbacks of
        fields left out, references (NOT_FOUND naming the field, with ``prefix``), then the row."""
        await self.custom_values(record, values, None)
        record.check(values)
        await self._references(record, values, prefix)
        for f in record.fields:
            if f.fallback is not None and values.get(f.column) is None:
                values[f.column] = await f.fallback(self, values)
        self.check_owner(record, values, prefix)
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
        before = await self.require(record, id, lock=True)
        self.check_version(record, before, expected_version)
        await self.custom_values(record, changes, before._mapping)
        await self._references(record, changes, "")
        changed = self.changed(record, before, changes)
        if not changed:
            return before
        if not rolled_up and (conflict := await self.derived_conflict(record, [(id, changed)])):
            raise conflict[1]
        await self._unique(record, changed, id, "")
        row = (await self.write_updates(record, [(before, changed)], detail=detail))[0]
        await self._roll_up(record, row._mapping)
        return row

    def changed(self, record: Record, before: Row[Any], changes: Mapping[str, Any]) -> dict[str, Any]:
        """What ``changes`` (validated, references resolved) alter of the row ``before``, once the
        record's checks hold over the resulting row and the owner rule holds for a new owner."""
        if record.checks:
            record.check({**before._mapping, **changes})
        changed = {k: v for k, v in changes.items() if before._mapping[k] != v}
        if changed:
            self.check_owner(record, changed, "")
        return changed

    async def write_updates(self, record: Record, changes: Sequence[tuple[Row[Any], Mapping[str, Any]]], *,
                            detail: Mapping[str, Any] | None = None) -> list[Row[Any]]:
        """Write each ``(before, changed)`` (checked by ``update``'s rules, not empty): the version
        bumped, an audit row with the before/after of what changed (or ``detail``) and a change event
        each. Set-based: one UPDATE per set of columns changed (``FROM unnest(…)``, each column one
        array, when it is more than one record) and one audit call. Returns the rows after, in order."""
        t = record.table
        shapes: dict[tuple[str, ...], list[int]] = {}
        for i, (_, changed) in enumerate(changes):
            shapes.setdefault(tuple(sorted(changed)), []).append(i)
        after: dict[uuid.UUID, Row[Any]] = {}
        for shape, positions in shapes.items():
            if len(positions) == 1:
                before, changed = changes[positions[0]]
                statement = update(t).where(t.c.tenant_id == self.tenant_id, t.c.id == before.id).values(**changed)
            else:
                given = select(
                    func.unnest(bindparam("many_id", [changes[i][0].id for i in positions],
                                          type_=ARRAY(t.c.id.type))).label("id"),
                    *(func.unnest(bindparam(f"many_{c}", [changes[i][1][c] for i in positions],
                                            type_=ARRAY(t.c[c].type))).label(c) for c in shape)).subquery("given")
                statement = update(t).where(t.c.tenant_id == self.tenant_id, t.c.id == given.c.id) \
                    .values({c: given.c[c] for c in shape})
            returned = (await self.conn.execute(
                statement.values(version=t.c.version + 1, updated_at=func.now()).returning(t))).all()
            after.update((row.id, row) for row in returned)
        rows = [after[before.id] for before, _ in changes]
        await self._audit_many(record, "update", [
            (before.id, dict(detail) if detail is not None else {
                "before": snapshot(before._mapping, changed), "after": snapshot(row._mapping, changed)})
            for (before, changed), row in zip(changes, rows, strict=True)])
        for (before, changed), row in zip(changes, rows, strict=True):
            self._event(record, ChangeKind.UPDATED, row, tuple(changed), detail=detail,
                        previous_scope=scope_of(record, before._mapping),
                        custom_keys=changed_keys(before._mapping["custom_fields"], row._mapping["custom_fields"])
                        if "custom_fields" in changed else ())
        return rows

    async def delete(self, record: Record, id: uuid.UUID, expected_version: int | None) -> Row[Any]:
        """Delete record ``id``: a trashable record goes to the trash (``trash``); any other is removed
        for good, its dependents' ``OnDelete`` rules applied first (all audited)."""
        if record.trash:
            return await self.trash(record, id, expected_version)
        before = await self.require(record, id, lock=True)
        self.check_version(record, before, expected_version)
        await self._remove(record, before, "delete")
        return before

    async def _remove(self, record: Record, before: Row[Any], action: str) -> None:
        """Remove the row ``before`` for good after ``release``; audited as ``action``."""
        t = record.table
        try:
            async with self.conn.begin_nested():
                await self.release(record, before.id, action)
                await self.conn.execute(delete(t).where(t.c.tenant_id == self.tenant_id, t.c.id == before.id))
        except IntegrityError:
            raise BadUserInput("id", f"this {record.label} is still in use; move or delete what "
                                     "refers to it first") from None
        await self._audit(record, action, before.id, {"before": snapshot(before._mapping)})
        if not in_trash(record, before._mapping):
            self._event(record, ChangeKind.DELETED, before, (), version=before.version + 1)
        await self._roll_up(record, before._mapping)

    async def release(self, target: Record, id: uuid.UUID, action: str = "delete") -> None:
        """What removing ``target`` ``id`` for good does to the records pointing at it: RESTRICT refuses
        while there are any (in the trash too: say so); CASCADE removes them (audited as ``action``);
        SET_NULL unlinks them, in the trash too, removing those it would leave without any link their
        ``AtLeastOne``/``ExactlyOne`` check asks for."""
        relations = dependents(target)
        async with showing_trash(self.conn):
            for relation in relations:
                if relation.on_delete is OnDelete.RESTRICT:
                    owner = relation.owner
                    t = owner.table
                    pointing = select(t.c.id).where(t.c.tenant_id == self.tenant_id, t.c[relation.key] == id).limit(1)
                    if await self.scalar(pointing.where(*owner.visible(t))) is not None:
                        raise BadUserInput("id", f"this {target.label} still has "
                                                 f"{owner.plural_label}; move or delete them first")
                    if await self.scalar(pointing) is not None:
                        raise BadUserInput("id", f"this {target.label} still has {owner.plural_label} in the "
                                                 "trash; restore and move them, or purge them, first")
            for relation in relations:
                owner, column = relation.owner, relation.owner.table.c[relation.key]
                if relation.on_delete is OnDelete.CASCADE:
                    await self.delete_where(owner, column == id, action=action)
                elif relation.on_delete is OnDelete.SET_NULL:
                    links = link_columns(owner, relation.key)
                    if links:
                        alone = func.num_nonnulls(*(owner.table.c[c] for c in links)) == 1
                        await self.delete_where(owner, (column == id) & alone, action=action)
                    await self.update_where(owner, column == id, {relation.key: None}, before={relation.key: id})

    # ---- the trash (``Record.trash``) -------------------------------------------------------------

    async def trash(self, record: Record, id: uuid.UUID, expected_version: int | None) -> Row[Any]:
        """Move record ``id`` to the trash with what goes with it (``trash_rows``); a stale
        ``expected_version`` raises VERSION_CONFLICT. Returns the row as it was before."""
        before = await self.require(record, id, lock=True)
        self.check_version(record, before, expected_version)
        await self.trash_rows(record, [before])
        return before

    async def trash_rows(self, record: Record, befores: Sequence[Row[Any]]) -> None:
        """Move the rows ``befores`` of ``record`` (locked, outside the trash) to the trash, each as a
        batch of its own named by its id, with what goes with each (``_trash_where``): set-based, the
        same statements for one row or five hundred; events in the order given. ``StillInUse`` when
        a RESTRICT dependent refuses it, naming the rows it was refused for."""
        t = record.table
        order = {row.id: i for i, row in enumerate(befores)}
        async with showing_trash(self.conn):
            await self._trash_where(record, t.c.id.in_(list(order)), t.c.id, order)

    async def _trash_where(self, record: Record, where: ColumnElement[bool], batch: ColumnElement[Any],
                           order: Mapping[uuid.UUID, int] | None = None) -> list[Row[Any]]:
        """Move the rows of ``record`` matching ``where`` (not yet in the trash) to the trash in the
        batch ``batch`` says (per row: its own id for the rows trashed, the batch of the row it goes
        with for what goes along), then what depends on them: RESTRICT dependents outside the trash
        refuse it; CASCADE dependents go along; SET_NULL dependents stay, linked (their link reads
        null while the target is in the trash), except those left with no link to a record outside
        the trash that their ``AtLeastOne``/``ExactlyOne`` check asks for, which go along. Audited as
        ``trash``, published as DELETED (``trash: TRASHED``; in ``order`` of id when given); rollups
        into parents outside the trash recomputed."""
        t = record.table
        rows = list((await self.conn.execute(
            update(t).where(t.c.tenant_id == self.tenant_id, t.c.deleted_at.is_(None), where)
            .values(deleted_at=self.now, deleted_by=self.actor_id, trash_batch=batch, version=t.c.version + 1,
                    updated_at=func.now()).returning(t))).all())
        if not rows:
            return rows
        if order is not None:
            rows.sort(key=lambda row: order[row.id])
        ids = [row.id for row in rows]
        for relation in dependents(record):
            owner = relation.owner
            column = owner.table.c[relation.key]
            along = batch_of(record, owner, relation.key)
            if relation.on_delete is OnDelete.RESTRICT:
                holding = select(column).distinct().where(owner.table.c.tenant_id == self.tenant_id, column.in_(ids),
                                                          *owner.visible(owner.table))
                blocked = set((await self.conn.execute(holding)).scalars())
                if blocked:
                    raise StillInUse(f"this {record.label} still has {owner.plural_label}; move or delete them first",
                                     [row.trash_batch for row in rows if row.id in blocked])
            elif relation.on_delete is OnDelete.CASCADE:
                await self._trash_where(owner, column.in_(ids), along)
            elif links := link_columns(owner, relation.key):
                others = [live_link(owner, c) for c in links if c != relation.key]
                await self._trash_where(owner, column.in_(ids) & ~or_(*others) if others else column.in_(ids), along)
        await self._audit_many(record, "trash", [(row.id, {"after": trash_state(row._mapping)}) for row in rows])
        for row in rows:
            self._event(record, ChangeKind.DELETED, row, (), detail={"trash": "trashed"})
            await self._roll_up(record, row._mapping)
        return rows

    async def trashed(self, record: Record, id: uuid.UUID, *, lock: bool = False) -> Row[Any]:
        """The row of ``record`` ``id`` in the trash (inside ``showing_trash``); NOT_FOUND otherwise."""
        t = record.table
        query = select(t).where(t.c.tenant_id == self.tenant_id, t.c.id == id, t.c.deleted_at.is_not(None),
                                *record.scoped(t))
        row: Row[Any] | None = (await self.conn.execute(query.with_for_update() if lock else query)).first()
        if row is None:
            raise NotFound(record.label, id)
        return row

    async def _batch_root(self, record: Record, row: Row[Any]) -> None:
        """Refuse to act on a row that went to the trash with another record (naming that record)."""
        if row.trash_batch == row.id:
            return
        for other in TRASHABLE:
            t = other.table
            if await self.scalar(select(t.c.id).where(t.c.tenant_id == self.tenant_id, t.c.id == row.trash_batch)):
                raise BadUserInput("id", f"this {record.label} went to the trash with a {other.label} "
                                         f"({to_global_id(other.name, row.trash_batch)}); restore that instead")
        raise BadUserInput("id", f"this {record.label} went to the trash with another record; restore that instead")

    async def restore(self, record: Record, id: uuid.UUID) -> Row[Any]:
        """Bring record ``id`` back from the trash with everything that went with it (its batch), links
        as they were: NOT_FOUND unless it is in the trash; BAD_USER_INPUT when it went with another
        record (restore that one), or when a record it cannot be without is itself in the trash.
        Audited as ``restore``, published as CREATED (``trash: RESTORED``). Returns the restored row."""
        restored: list[tuple[Record, Row[Any]]] = []
        async with showing_trash(self.conn):
            row = await self.trashed(record, id, lock=True)
            await self._batch_root(record, row)
            await self._restorable(record, row)
            for member in TRASHABLE:
                t = member.table
                rows = (await self.conn.execute(
                    update(t).where(t.c.tenant_id == self.tenant_id, t.c.trash_batch == id, t.c.deleted_at.is_not(None))
                    .values(deleted_at=None, deleted_by=None, trash_batch=None, version=t.c.version + 1,
                            updated_at=func.now()).returning(t))).all()
                # A batch went to the trash in one change: its rows share the root's trash columns.
                await self._audit_many(member, "restore", [(r.id, {"before": trash_state(row._mapping)}) for r in rows])
                restored += [(member, r) for r in rows]
        for member, r in restored:
            self._event(member, ChangeKind.CREATED, r, (), detail={"trash": "restored"})
            await self._roll_up(member, r._mapping)
        return next(r for member, r in restored if member is record and r.id == id)

    async def _restorable(self, record: Record, row: Row[Any]) -> None:
        """Refuse to restore a record whose CASCADE parent is in the trash, or whose every link an
        ``AtLeastOne``/``ExactlyOne`` check asks for points into the trash (or nowhere)."""
        out: set[str] = set()
        for relation in record.relations:
            target = relation.target()
            key = row._mapping[relation.key]
            if key is None or not target.trash:
                continue
            t = target.table
            if await self.scalar(select(t.c.id).where(t.c.tenant_id == self.tenant_id, t.c.id == key,
                                                      t.c.deleted_at.is_(None))) is None:
                if relation.on_delete is OnDelete.CASCADE:
                    raise BadUserInput(camel(relation.key), f"its {target.label} is in the trash: restore that first")
                out.add(relation.key)
        for check in record.checks:
            if isinstance(check, AtLeastOne | ExactlyOne) and all(
                    row._mapping[c] is None or c in out for c in check.columns):
                raise BadUserInput(check.field, f"every record this {record.label} belongs to is in the trash: "
                                                "restore one of them first")

    async def purge(self, record: Record, id: uuid.UUID) -> int:
        """Remove record ``id`` (in the trash, not as part of another's batch) and the rest of its
        batch for good, as a delete would (``release``); audited as ``purge``. Returns the number of
        rows removed. BAD_USER_INPUT when something outside the batch still needs it (RESTRICT)."""
        async with showing_trash(self.conn):
            row = await self.trashed(record, id, lock=True)
            await self._batch_root(record, row)
            batch = 0
            for member in TRASHABLE:
                t = member.table
                batch += await self.scalar(select(func.count()).select_from(t).where(
                    t.c.tenant_id == self.tenant_id, t.c.trash_batch == id))
            await self._remove(record, row, "purge")
            for member in TRASHABLE:  # what its removal did not take with it (linked elsewhere too)
                t = member.table
                for rest in (await self.conn.execute(select(t).where(
                        t.c.tenant_id == self.tenant_id, t.c.trash_batch == id))).all():
                    await self._remove(member, rest, "purge")
        return batch

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

    def check_owner(self, record: Record, values: Mapping[str, Any], prefix: str) -> None:
        """A record of a type restricted for the caller (``Record.owner``) may be given only to an owner
        whose records the caller sees (themselves or a member of their teams): BAD_USER_INPUT naming
        the owner field otherwise, so nobody hands a record out of their own sight."""
        if record.owner is None or record.owner not in values:
            return
        owner = values[record.owner]
        if not self.principal.view.sees(record.name, owner):
            raise BadUserInput(prefix + camel(record.owner), f"must be you or a member of your teams: the workspace "
                                                              f"shows {record.plural_label} to their owner's teams")

    async def _unique(self, record: Record, values: Mapping[str, Any], id: uuid.UUID | None, prefix: str) -> None:
        t = record.table
        for f in record.fields:
            if not f.unique or values.get(f.column) is None:
                continue
            query = select(t.c.id).where(t.c.tenant_id == self.tenant_id, t.c[f.column] == values[f.column])
            if id is not None:
                query = query.where(t.c.id != id)
            # A value held by a record in the trash stays taken until it is purged (docs/trash.md).
            async with every_holder_seen(self.conn, record):  # hidden ones' values too
                taken = await self.scalar(query.limit(1))
            if taken is not None:
                raise BadUserInput(prefix + f.name, f"is already used by another {record.label}")

    async def derived_conflict(self, record: Record, changes: Sequence[tuple[uuid.UUID, Mapping[str, Any]]]
                               ) -> tuple[int, AtriumError] | None:
        """A direct change of a column that children roll up (or lock) while the record has children is
        refused: the first of ``changes`` (``(id, changed)``) that makes one, by its position, and the
        error; None when none does. One statement per rollup into ``record`` that a change touches."""
        for child, rollup in rollups_into(record):
            touching: dict[uuid.UUID, tuple[int, str]] = {}
            for position, (id, changed) in enumerate(changes):
                touched = [c for c in (rollup.column, *rollup.locks) if c in changed]
                if touched:
                    touching.setdefault(id, (position, touched[0]))
            if not touching:
                continue
            t = child.table
            key = t.c[child.relation(rollup.via).key]
            having = each_key(select(key).where(t.c.tenant_id == self.tenant_id, *child.visible(t)).limit(1),
                              key, "keys")
            parents = set((await self.conn.execute(having, {"keys": list(touching)})).scalars())
            if parents:
                position, column = min(touching[p] for p in parents)
                return position, BadUserInput(camel(column), f"is derived from the {record.label}'s "
                                                             f"{child.plural_label}; change those instead")
        return None

    async def _roll_up(self, record: Record, row: Mapping[Any, Any]) -> None:
        """Recompute the parents ``record``'s rollups feed (``Rollup``) after a change of ``row``."""
        for rollup in record.rollups:
            relation = record.relation(rollup.via)
            parent_id = row[relation.key]
            parent = relation.target()
            if parent_id is None or (await self.conn.execute(
                    parent.query.where(parent.key == parent_id), {"tenant_id": self.tenant_id})).first() is None:
                continue  # no parent outside the trash to keep up to date
            t = record.table
            total = await self.scalar(select(func.sum(t.c[rollup.total])).where(
                t.c.tenant_id == self.tenant_id, t.c[relation.key] == parent_id, *record.visible(t)))
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
        self._event(record, ChangeKind.CREATED, row, tuple(values), custom_keys=created_keys(record, row))
        return row

    async def insert_many(self, record: Record, rows: list[dict[str, Any]]) -> list[Row[Any]]:
        """Insert rows as given, like ``insert`` each (audit row and change event per row), set-based:
        one ``INSERT … SELECT unnest(…)`` per set of columns given (rows leaving a column to its
        default form their own; each column travels as one array), one audit call. Returns the rows
        in the order given."""
        t = record.table
        ids = new_uuids(len(rows))
        shapes: dict[tuple[str, ...], list[int]] = {}
        for i, values in enumerate(rows):
            shapes.setdefault(tuple(sorted(values)), []).append(i)
        inserted: dict[uuid.UUID, Row[Any]] = {}
        for shape, positions in shapes.items():
            columns = ("tenant_id", "id", *shape)
            arrays = {"tenant_id": [self.tenant_id] * len(positions), "id": [ids[i] for i in positions],
                      **{c: [rows[i][c] for i in positions] for c in shape}}
            source = select(*(func.unnest(bindparam(f"many_{c}", arrays[c], type_=ARRAY(t.c[c].type))).label(c)
                              for c in columns))
            returned = (await self.conn.execute(insert(t).from_select(columns, source).returning(t))).all()
            inserted.update((row.id, row) for row in returned)
        out = [inserted[key] for key in ids]
        await self._audit_many(record, "create", [(row.id, {"after": after})
                                                  for row, after in zip(out, snapshots(out), strict=True)])
        for row, values in zip(out, rows, strict=True):
            self._event(record, ChangeKind.CREATED, row, tuple(values), custom_keys=created_keys(record, row))
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
            if not in_trash(record, row._mapping):
                self._event(record, ChangeKind.UPDATED, row, tuple(changes))
        return len(rows)

    async def delete_where(self, record: Record, where: ColumnElement[bool], *, action: str = "delete") -> int:
        """Delete every row of ``record`` matching ``where`` (in this tenant) for good, audited as
        ``action`` and published (rows in the trash were published when they went there)."""
        t = record.table
        rows = (await self.conn.execute(
            delete(t).where(t.c.tenant_id == self.tenant_id, where).returning(t))).all()
        await self._audit_many(record, action, [(row.id, {"before": snapshot(row._mapping)}) for row in rows])
        for row in rows:
            if not in_trash(record, row._mapping):
                self._event(record, ChangeKind.DELETED, row, (), version=row.version + 1)
        return len(rows)

    async def audit(self, entity_type: str, action: str, entity_id: uuid.UUID, diff: dict[str, Any], *,
                    id: uuid.UUID | None = None) -> None:
        """The audit row of a change to something that is not a declared record (API keys, documents);
        ``id``: the event's own id when the caller must know it (an erasure's markers name it)."""
        await self.conn.execute(insert(AUDIT_EVENTS).values(
            tenant_id=self.tenant_id, id=id or uuid.uuid4(), actor_id=self.actor_id, action=action,
            entity_type=entity_type, entity_id=entity_id, diff=diff, request_id=self.request_id,
        ))

    async def _audit(self, record: Record, action: str, entity_id: uuid.UUID, diff: dict[str, Any]) -> None:
        await self.audit(record.name, action, entity_id, diff)

    async def audit_records(self, record: Record, action: str,
                            entries: list[tuple[uuid.UUID, dict[str, Any]]]) -> None:
        """The audit rows of changes to many records of ``record`` made by one statement of the
        caller's (a custom field's purge), in one insert."""
        await self._audit_many(record, action, entries)

    async def _audit_many(self, record: Record, action: str, entries: list[tuple[uuid.UUID, dict[str, Any]]]) -> None:
        """The audit rows of many records in one statement, chained by ``atrium_audit_append``
        (migration 0018: the hash chain links them one after another as the per-row trigger would)."""
        if len(entries) == 1:
            await self._audit(record, action, *entries[0])
        elif entries:
            await self.conn.execute(AUDIT_APPEND, {
                "actor": self.actor_id, "request": self.request_id, "ids": new_uuids(len(entries)),
                "actions": [action] * len(entries), "types": [record.name] * len(entries),
                "entities": [entity_id for entity_id, _ in entries], "diffs": [diff for _, diff in entries]})

    def check_version(self, record: Record, row: Row[Any], expected_version: int | None) -> None:
        if expected_version is not None and row.version != expected_version:
            raise VersionConflict(record.label, row.version,
                                  public_record(record, row._mapping, self.hidden(record.name)))

    def _event(self, record: Record, kind: ChangeKind, row: Row[Any], fields: tuple[str, ...],
               version: int | None = None, detail: Mapping[str, Any] | None = None,
               previous_scope: dict[str, str] | None = None, custom_keys: tuple[str, ...] = ()) -> None:
        scope = scope_of(record, row._mapping)
        self.rows.append(row._mapping)
        self.events.append(ChangeEvent(
            tenant_id=self.tenant_id, entity_type=record.name, entity_id=row.id, kind=kind,
            fields=tuple(camel(f) for f in fields), actor_id=self.actor_id,
            version=version if version is not None else row.version, occurred_at=dt.datetime.now(dt.UTC),
            scope=scope, previous_scope=previous_scope if previous_scope and previous_scope != scope else {},
            detail=dict(detail or {}), owner_id=row._mapping[record.owner] if record.owner else None,
            custom_keys=custom_keys,
        ))


AUDIT_APPEND = text("SELECT atrium_audit_append(:actor, :request, :ids, :actions, :types, :entities, :diffs)") \
    .bindparams(bindparam("actor", type_=Uuid()), bindparam("request", type_=String()),
                bindparam("ids", type_=ARRAY(Uuid())), bindparam("actions", type_=ARRAY(String())),
                bindparam("types", type_=ARRAY(String())), bindparam("entities", type_=ARRAY(Uuid())),
                bindparam("diffs", type_=JSONB()))
"""Chains and inserts many audit rows of the transaction's tenant at once (``Change._audit_many``)."""

TRASHABLE: tuple[Record, ...] = tuple(record for record in RECORDS if record.trash)


def created_keys(record: Record, row: Row[Any]) -> tuple[str, ...]:
    """The custom fields a new record holds values of (its change event's ``custom_keys``)."""
    held = row._mapping["custom_fields"] if record.custom_fields else None
    return changed_keys(None, held) if held else ()


def in_trash(record: Record, row: Mapping[Any, Any]) -> bool:
    return record.trash and row["deleted_at"] is not None


def trash_state(row: Mapping[Any, Any]) -> dict[str, Any]:
    """A trashed row's trash columns, for audit rows."""
    return snapshot(row, ("deleted_at", "deleted_by", "trash_batch"))


def link_columns(owner: Record, key: str) -> list[str]:
    """The columns of ``owner``'s ``AtLeastOne``/``ExactlyOne`` checks that include ``key`` (in order,
    once each): the links of which it must keep one."""
    return list(dict.fromkeys(c for check in owner.checks if isinstance(check, AtLeastOne | ExactlyOne)
                              for c in check.columns if key in check.columns))


def live_link(owner: Record, column: str) -> ColumnElement[bool]:
    """``owner``'s ``column`` points at a record outside the trash."""
    relation = owner.relation_by_key(column)
    assert relation is not None
    target = relation.target()
    if not target.trash:
        return owner.table.c[column].is_not(None)
    other = target.table.alias()
    return exists(select(other.c.id).where(other.c.tenant_id == owner.table.c.tenant_id,
                                           other.c.id == owner.table.c[column], other.c.deleted_at.is_(None)))


def batch_of(parent: Record, owner: Record, key: str) -> ColumnElement[Any]:
    """The trash batch of the row of ``parent`` that ``owner``'s ``key`` points at: the batch a
    dependent that goes to the trash with that row joins (``Change._trash_where``)."""
    p = parent.table.alias("parent")
    return select(p.c.trash_batch).where(p.c.tenant_id == owner.table.c.tenant_id,
                                         p.c.id == owner.table.c[key]).scalar_subquery()


class StillInUse(BadUserInput):
    """A record cannot go to the trash while a record that RESTRICTs it is outside the trash; ``roots``:
    the records whose trashing it would have been part of (a batch names the first one's index)."""

    def __init__(self, message: str, roots: Sequence[uuid.UUID]) -> None:
        super().__init__("id", message)
        self.roots = list(roots)


def scope_of(record: Record, row: Mapping[Any, Any]) -> dict[str, str]:
    """The change-event routing keys of a row (``Record.routing``)."""
    return {key: str(row[column]) for key, column in record.routing.items()}


PUBLISH_SLICE = 10
"""Events ``InOrder`` encodes and sends at a time."""


class InOrder:
    """Committed changes' events published one change after another without the writer waiting
    for them: each change's events (stamped with the time it committed) go out once the previous
    change's have, in a task chained to the one before, while the writer goes on with its next
    transaction. An import encodes and sends one chunk's events while PostgreSQL works on the next
    chunk. ``drain`` waits until everything submitted is out."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._last: asyncio.Task[None] | None = None

    def submit(self, events: Sequence[Event]) -> None:
        """Publish ``events`` (of a change that has just committed) after everything submitted before."""
        if events:
            self._last = asyncio.create_task(self._publish(self._last, list(events), dt.datetime.now(dt.UTC)))

    async def _publish(self, previous: asyncio.Task[None] | None, events: list[Event],
                       committed_at: dt.datetime) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # its failure (logged there) does not hold these back
        try:
            # A slice at a time: encoding one is a short stretch of CPU between two Redis round
            # trips, so the writer's next statements are not held up behind a whole change's.
            for start in range(0, len(events), PUBLISH_SLICE):
                await self.broker.publish_many([e.committed(committed_at) if isinstance(e, ChangeEvent) else e
                                                for e in events[start:start + PUBLISH_SLICE]])
        except Exception:
            log.exception("publishing %d committed events failed", len(events))

    async def drain(self) -> None:
        """Wait until every event submitted so far is published (or its publishing failed)."""
        if self._last is not None:
            await asyncio.wait([self._last])


@asynccontextmanager
async def work_change(databases: Databases, publishing: InOrder, principal: Principal, request_id: str, *,
                      now: dt.datetime | None = None) -> AsyncIterator[Change]:
    """``change`` for work outside a request (an import job's chunk, ``resolvers.imports``): one
    tenant transaction of ``principal``'s tenant, its webhook deliveries in the outbox, its events
    published after the commit, in commit order (``publishing``). It sees what ``principal`` sees
    (``principal.view``)."""
    async with databases.tenant_transaction(principal.tenant_id, view=principal.view) as conn:
        w = Change(conn, principal, request_id, now=now)
        yield w
        await deliveries(w)
    publishing.submit(w.events)


async def deliveries(w: Change) -> None:
    """The change's webhook deliveries, put in the outbox in its own transaction (webhooks.outbox),
    with only the custom fields the workspace has now (a deleted field's values stay hidden)."""
    live = {record.name: {d.key for d in await w.definitions(record)}
            for record in {BY_NAME[e.entity_type] for e in w.events} if record.custom_fields}

    def render(record: Record, row: Mapping[Any, Any]) -> dict[str, Any]:
        return public_record(record, row, live=live.get(record.name))

    await enqueue(w.conn, w.tenant_id, zip(w.events, w.rows, strict=True), render)


async def publish_committed(broker: Broker, events: list[ChangeEvent]) -> None:
    """Publish a committed change's events, stamped with the commit time."""
    if not events:
        return
    committed_at = dt.datetime.now(dt.UTC)
    await broker.publish_many([event.committed(committed_at) for event in events])


@asynccontextmanager
async def change(info: Info) -> AsyncIterator[Change]:
    """One mutation's transaction; publishes its events (stamped with the commit time) after it commits
    (after the request's, when the request is one transaction: ``TenantScope.hold``)."""
    context = info.context
    session: Session = context.session
    async with session.db.write() as conn:
        w = Change(conn, session.principal, context.request_id,
                   now=dt.datetime.fromtimestamp(context.clock.time(), dt.UTC), hidden=session.hidden)
        yield w
        await deliveries(w)

    async def publish() -> None:
        await publish_committed(context.broker, w.events)

    await session.db.after_commit(publish)
