"""Batch writes: many records of one type in one mutation, all or nothing, through the one write path.

The batch mutations (``createDeals``, ``updateDeals``, ``deleteDeals``, ``upsertDeals``, and the
same for every declared record: ``resolvers.crud``) call these inside one ``change(info)`` block.
What they guarantee:

- **Bounded**: at most ``core.limits.MAX_BATCH`` records (BAD_USER_INPUT on ``input`` otherwise).
- **All or nothing**: one transaction; the first record that fails fails the mutation, and nothing
  of it is written (rows, audit rows, events: events are published only after the commit).
- **Errors name the record**: a record's error is the one its single mutation would raise, about
  ``input.<index>.<field>`` (``input.3.amount``, ``input.3.id``) with ``extensions.index``
  (``AtriumError.within``); the input's own type errors are named the same way (``schema.values``).
- **Per record audit and events**: every record gets its own audit row and change event, written by
  ``Change`` (``insert_many``, ``create``, ``update``, ``delete``) exactly as for single writes, so
  whatever the write path does per record applies to batches as well.
- **Set-based creates**: unless the record is ``sequential`` (rollups, or a fallback that depends on
  the rows before it), creates check each record in Python as ``Change.create`` does, but look up
  each relation's references in one statement for the whole batch, each unique field in one
  statement, and insert the rows in one INSERT with one audit insert. Sequential records are created
  one at a time through ``Change.create``.
- **Set-based updates and deletes** lock their rows first in one statement (in key order, so two
  batches touching the same records wait for each other instead of deadlocking; an id the caller
  cannot see is NOT_FOUND naming its index). Updates then check each record in Python as
  ``Change.update`` does and do the rest for the batch (``Change.write_updates``,
  ``Change.derived_conflict``, one statement per relation and unique field); deletes move the
  rows to the trash together (``Change.trash_rows``), each a trash batch of its own. Sequential
  records, and deletes of records without a trash, go through ``Change.update`` /
  ``Change.delete`` per record.
- **External ids**: a batch that sets ``externalId`` values first takes a transaction-scoped
  advisory lock on each (tenant, type, external id), so concurrent batches with the same external
  id run one after the other and the second sees the first's rows. ``upsert_many`` finds records by
  external id in the tenant: those found are updated with the fields given, the others created.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Row, Select, Text, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY

from core.errors import AtriumError, BadUserInput, NotFound
from core.limits import MAX_BATCH
from models.db import each_key, every_holder_seen
from records.declare import Create, Record, ToOne, camel
from resolvers.writes import Change, StillInUse

EXTERNAL_ID = "external_id"


def bounded(items: Sequence[Any]) -> None:
    """BAD_USER_INPUT on ``input`` when a batch holds more than ``MAX_BATCH`` records."""
    if len(items) > MAX_BATCH:
        raise BadUserInput("input", f"at most {MAX_BATCH} records per request (got {len(items)})")


def at(index: int, error: AtriumError) -> AtriumError:
    """``error`` about the record at ``index`` of the batch's ``input``."""
    return error.within(f"input.{index}.", index=index)


@contextmanager
def item(index: int) -> Iterator[None]:
    """Errors raised inside are about the record at ``index`` (``at``)."""
    try:
        yield
    except AtriumError as error:
        raise at(index, error) from None


Refused = Callable[[int, AtriumError], None]
"""Where a batch's item that fails a check goes, for a caller that takes what passes (an import
chunk): the item's position and its own error (not yet ``at`` the position)."""


class Refusals:
    """What a batch's checks do with an item that fails one: raise about its index (``at``: the
    batch fails, all or nothing), or, given ``refused``, hand it over and leave it out (``out``:
    the positions refused so far, which the later checks skip)."""

    def __init__(self, refused: Refused | None = None) -> None:
        self.refused = refused
        self.out: set[int] = set()

    def __call__(self, position: int, error: AtriumError) -> None:
        if self.refused is None:
            raise at(position, error) from None
        self.refused(position, error)
        self.out.add(position)

    def kept(self, where: list[int], items: list[dict[str, Any]]) -> tuple[list[int], list[dict[str, Any]]]:
        """The positions and items not refused."""
        if not self.out:
            return where, items
        pairs = [(p, v) for p, v in zip(where, items, strict=True) if p not in self.out]
        return [p for p, _ in pairs], [v for _, v in pairs]


def distinct(keys: Sequence[Any], field: str, positions: Sequence[int] | None = None,
             refuse: Refusals | None = None) -> None:
    """Each key (not None) at most once in the batch; BAD_USER_INPUT naming the repeat otherwise
    (``refuse``: what happens to it, default raising ``at`` its index)."""
    refuse = refuse or Refusals()
    where = positions or range(len(keys))
    seen: dict[Any, int] = {}
    for position, key in zip(where, keys, strict=True):
        if key is None or position in refuse.out:
            continue
        if key in seen:
            refuse(position, BadUserInput(field, f"is also given at input.{seen[key]}"))
            continue
        seen[key] = position


# ---- creates --------------------------------------------------------------------------------------

async def create_many(w: Change, record: Record, items: list[dict[str, Any]],
                      positions: Sequence[int] | None = None, *, refused: Refused | None = None) -> list[Row[Any]]:
    """Create a record from each of ``items`` (validated values, ``Record.create_values``), as
    ``Change.create`` would one after the other; ``positions``: each item's index in the input
    (default: its own). The first item that fails a check fails the batch, unless ``refused`` is
    given (an import chunk): then each item that fails one is handed to it and the others are
    created (set-based records; a sequential record's checks run in ``Change.create``, and raise).
    Returns the rows created, in the order of ``items``."""
    where = list(positions) if positions is not None else list(range(len(items)))
    refuse = Refusals(refused)
    if record.has(EXTERNAL_ID):
        distinct([v.get(EXTERNAL_ID) for v in items], camel(EXTERNAL_ID), where, refuse)
        where, items = refuse.kept(where, items)
        await lock_external_ids(w, record, [v.get(EXTERNAL_ID) for v in items])
    if record.sequential:
        rows = []
        for position, values in zip(where, items, strict=True):
            with item(position):
                rows.append(await w.create(record, values))
        return rows
    # An import chunk's batch holds a thousand items: a failing item is named (``at``) by a handler
    # of each loop's own (free until it raises) rather than by a context entered per item.
    for position, values in zip(where, items, strict=True):
        try:
            await w.custom_values(record, values, None)
            record.check(values)
        except AtriumError as error:
            refuse(position, error)
    where, items = refuse.kept(where, items)
    await _references(w, record, items, where, refuse)
    where, items = refuse.kept(where, items)
    fallbacks = [(f.column, f.fallback) for f in record.fields if f.fallback is not None]
    for position, values in zip(where, items, strict=True):
        try:
            for column, fallback in fallbacks:
                if values.get(column) is None:
                    values[column] = await fallback(w, values)
            w.check_owner(record, values, "")
        except AtriumError as error:
            refuse(position, error)
    where, items = refuse.kept(where, items)
    await _unique(w, record, items, where, refuse)
    where, items = refuse.kept(where, items)
    defaulted = {c.name for c in record.table.c if not c.nullable}
    for values in items:
        for column in [c for c, v in values.items() if v is None and c in defaulted]:
            del values[column]  # left to the column's default, as Change.create does
    return await w.insert_many(record, items) if items else []


def referenced(relation: ToOne) -> Select[Any]:
    """The records of the tenant (outside the trash, visible to the caller) that ``relation`` may
    point at, by key (the array parameter ``keys``, one index probe each: ``each_key``), with only
    what a reference check reads: the key, the column of ``requires`` and those it ``copies``."""
    target = relation.target()
    query = target.query
    names = dict.fromkeys([target.key.key, *(relation.requires[:1] if relation.requires else ()), *relation.copies])
    return each_key(query.with_only_columns(*(query.selected_columns[n] for n in names)), target.key, "keys")


async def _references(w: Change, record: Record, items: list[dict[str, Any]], where: Sequence[int],
                      refuse: Refusals | None = None) -> None:
    """``Change.create``'s reference checks for every item, one statement per relation; an item
    refused (``refuse``, default raising ``at`` its index) by one relation is not checked again."""
    refuse = refuse or Refusals()
    for relation in record.relations:
        wanted = {v[relation.key] for v in items if isinstance(v.get(relation.key), uuid.UUID)}
        if not wanted:
            continue
        target = relation.target()
        query = referenced(relation)
        found = {row._mapping[target.key.key]: row for row in (await w.conn.execute(
            query, {"tenant_id": w.tenant_id, "keys": list(wanted)})).all()}
        field = camel(relation.key)
        for position, values in zip(where, items, strict=True):
            key = values.get(relation.key)
            if not isinstance(key, uuid.UUID) or position in refuse.out:
                continue
            row = found.get(key)
            if row is None:
                refuse(position, NotFound(target.label, key, field=field))
                continue
            if relation.requires is not None:
                column, value, message = relation.requires
                if row._mapping[column] != value:
                    refuse(position, BadUserInput(field, message))
                    continue
            for column in relation.copies:
                values[column] = row._mapping[column]


async def _unique(w: Change, record: Record, items: list[dict[str, Any]], where: Sequence[int],
                  refuse: Refusals | None = None) -> None:
    """Unique fields: not repeated in the batch, not used by a record of the tenant (one statement
    each); an item refused (``refuse``, default raising ``at`` its index) is not checked again."""
    refuse = refuse or Refusals()
    t = record.table
    for f in record.fields:
        if not f.unique:
            continue
        given = [v.get(f.column) for v in items]
        distinct(given, f.name, where, refuse)
        wanted = [g for p, g in zip(where, given, strict=True) if g is not None and p not in refuse.out]
        if not wanted:
            continue
        column = t.c[f.column]
        async with every_holder_seen(w.conn, record):  # in the trash or hidden, a value stays taken
            taken = set((await w.conn.execute(
                each_key(select(column).where(t.c.tenant_id == w.tenant_id), column, "values"),
                {"values": wanted})).scalars())
        for position, value in zip(where, given, strict=True):
            if value in taken and position not in refuse.out:
                refuse(position, BadUserInput(f.name, f"is already used by another {record.label}"))


async def lock_external_ids(w: Change, record: Record, keys: Sequence[str | None]) -> None:
    """Transaction-scoped advisory locks on the tenant's ``record`` external ids ``keys``, taken in
    one statement, in one order (module docstring)."""
    await lock_keys(w, record.name, keys)


async def lock_keys(w: Change, space: str, keys: Sequence[str | None]) -> None:
    """Transaction-scoped advisory locks on the tenant's ``keys`` of ``space`` (a record's external
    ids; the e-mail addresses a contact import dedupes by), in one statement, in one order."""
    wanted = sorted({f"{w.tenant_id}:{space}:{k}" for k in keys if k is not None})
    if not wanted:
        return
    names = select(func.unnest(bindparam("keys", type_=ARRAY(Text()))).label("k")).subquery()
    ordered = select(names.c.k).order_by(names.c.k).subquery()
    await w.conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(ordered.c.k, 0))),
                         {"keys": wanted})


# ---- updates and deletes --------------------------------------------------------------------------

async def locked(w: Change, record: Record, keys: Sequence[uuid.UUID]) -> dict[uuid.UUID, Row[Any]]:
    """The rows of ``keys`` (each at most once) as the caller sees them, locked in key order, in one
    statement; NOT_FOUND (``id``) naming the first index whose record the caller cannot see (another
    tenant's, in the trash, or hidden from them). By key."""
    distinct(keys, "id")
    query = each_key(record.query.with_for_update(), record.key, "keys")
    found = {row.id: row for row in (await w.conn.execute(
        query, {"tenant_id": w.tenant_id, "keys": sorted(set(keys))})).all()}
    for position, key in enumerate(keys):
        if key not in found:
            raise at(position, NotFound(record.label, key))
    return found


async def update_many(w: Change, record: Record,
                      changes: Sequence[tuple[uuid.UUID, dict[str, Any], int | None]]) -> list[Row[Any]]:
    """Apply each ``(id, changes, expected_version)`` as ``Change.update`` does (module docstring)."""
    before = await locked(w, record, [key for key, _, _ in changes])
    if record.has(EXTERNAL_ID):
        await lock_external_ids(w, record, [c.get(EXTERNAL_ID) for _, c, _ in changes])
    if record.sequential:
        rows = []
        for position, (key, values, expected_version) in enumerate(changes):
            with item(position):
                rows.append(await w.update(record, key, values, expected_version))
        return rows
    return await update_rows(w, record, [(before[key], values, version) for key, values, version in changes])


async def update_rows(w: Change, record: Record, changes: Sequence[tuple[Row[Any], dict[str, Any], int | None]],
                      positions: Sequence[int] | None = None, *, refused: Refused | None = None) -> list[Row[Any]]:
    """``Change.update``'s rules for each ``(locked row, changes, expected_version)``, set-based: each
    record's own checks in Python, then one statement per relation for the references, one per
    rollup and per unique field, and ``Change.write_updates``. A unique value counts as taken while
    any other record holds it before the batch (a batch cannot swap two records' values). The first
    change that fails a check fails the batch, unless ``refused`` is given (as for ``create_many``):
    then each one that fails is handed to it and the others are written. Returns the rows after (the
    row as it was, for a change that alters nothing) of the changes written, in order."""
    where = list(positions) if positions is not None else list(range(len(changes)))
    refuse = Refusals(refused)
    out = refuse.out
    for position, (before, values, expected_version) in zip(where, changes, strict=True):
        try:
            w.check_version(record, before, expected_version)
            await w.custom_values(record, values, before._mapping)
        except AtriumError as error:
            refuse(position, error)
    await _references(w, record, [values for _, values, _ in changes], where, refuse)  # skips those refused
    altered: list[tuple[int, Row[Any], dict[str, Any]]] = []
    for position, (before, values, _) in zip(where, changes, strict=True):
        if position in out:
            continue
        try:
            if changed := w.changed(record, before, values):
                altered.append((position, before, changed))
        except AtriumError as error:
            refuse(position, error)
    while conflict := await w.derived_conflict(record, [(before.id, changed) for _, before, changed in altered]):
        refuse(altered[conflict[0]][0], conflict[1])
        del altered[conflict[0]]
    await _unique(w, record, [changed for _, _, changed in altered], [position for position, _, _ in altered], refuse)
    written = await w.write_updates(record, [(before, changed) for p, before, changed in altered if p not in out])
    after = {row.id: row for row in written}
    return [after.get(before.id, before) for p, (before, _, _) in zip(where, changes, strict=True) if p not in out]


async def delete_many(w: Change, record: Record, targets: Sequence[tuple[uuid.UUID, int | None]]) -> list[Row[Any]]:
    """Delete each ``(id, expected_version)`` as ``Change.delete`` does (module docstring): records
    with a trash go there set-based (``Change.trash_rows``), others one after the other."""
    keys = [key for key, _ in targets]
    before = await locked(w, record, keys)
    if not record.trash:
        rows = []
        for position, (key, expected_version) in enumerate(targets):
            with item(position):
                rows.append(await w.delete(record, key, expected_version))
        return rows
    for position, (key, expected_version) in enumerate(targets):
        with item(position):
            w.check_version(record, before[key], expected_version)
    rows = [before[key] for key in keys]
    try:
        await w.trash_rows(record, rows)
    except StillInUse as error:
        index = {key: position for position, key in enumerate(keys)}
        raise at(min(index[root] for root in error.roots), error) from None
    return rows


# ---- upserts --------------------------------------------------------------------------------------

async def upsert_many(w: Change, record: Record,
                      items: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> list[tuple[Row[Any], bool]]:
    """For each ``(create values, patch values)``: update the tenant's record with the item's external
    id with the patch, or create one from the create values when the tenant has none. Fields that
    cannot change (``Field.update`` false) must equal the existing record's. Returns each row and
    whether it was created, in input order."""
    keys = [values[EXTERNAL_ID] for values, _ in items]
    distinct(keys, camel(EXTERNAL_ID))
    await lock_external_ids(w, record, keys)
    t = record.table
    found = each_key(select(t).where(t.c.tenant_id == w.tenant_id).with_for_update(), t.c.external_id, "keys")
    existing = {row.external_id: row for row in (await w.conn.execute(found, {"keys": sorted(keys)})).all()}
    fixed = [f for f in record.fields if not f.update and f.create is not Create.NEVER]
    out: dict[int, tuple[Row[Any], bool]] = {}
    creates = [position for position, key in enumerate(keys) if key not in existing]
    created = await create_many(w, record, [items[p][0] for p in creates], creates)
    out.update((p, (row, True)) for p, row in zip(creates, created, strict=True))
    updates = [position for position, key in enumerate(keys) if key in existing]
    for position in updates:
        values, current = items[position][0], existing[keys[position]]
        with item(position):
            for f in fixed:
                if values.get(f.column) is not None and values[f.column] != current._mapping[f.column]:
                    raise BadUserInput(f.name, f"cannot be changed once the {record.label} exists")
    if record.sequential:
        for position in updates:
            with item(position):
                out[position] = (await w.update(record, existing[keys[position]].id, items[position][1], None), False)
    elif updates:
        # Found by external id among all the tenant's rows; changed only if the caller sees them.
        ids = [existing[keys[position]].id for position in updates]
        seen = {row.id: row for row in (await w.conn.execute(
            each_key(record.query, record.key, "keys"), {"tenant_id": w.tenant_id, "keys": ids})).all()}
        for position, key in zip(updates, ids, strict=True):
            if key not in seen:
                raise at(position, NotFound(record.label, key))
        rows = await update_rows(w, record, [(seen[key], items[position][1], None)
                                              for position, key in zip(updates, ids, strict=True)], updates)
        out.update((position, (row, False)) for position, row in zip(updates, rows, strict=True))
    return [out[p] for p in range(len(items))]
