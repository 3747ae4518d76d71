"""Bulk CSV import: a file becomes records of one declared type, in a background job that survives restarts.

What is imported is derived from the declarations (``records.crm``): any record the API creates
without a parent argument (``Record.importable``) can be imported, each CSV column going to a field
named as the API names it (``amount``, ``stageId``; the column name ``stage_id`` works too), or to
one of the tenant's live custom fields of the record as ``custom.<key>``. A mapping target is
resolved by ``target`` alone: through the declaration, or through the tenant's definitions (read
when the job is accepted and again when it runs). A cell goes through the same parse function as a
GraphQL value of its type (``schema.values.SCALARS``) and then the field's rule, so a CSV cell and
a GraphQL argument meet the same checks and the same messages; a custom field's cell becomes the
``CustomFieldValueInput`` a GraphQL write would send (``resolvers.csv_custom``), which the write
path checks (``Change.custom_values``) row by row. An empty cell is a value not given.

Rows are deduplicated by the record's ``import_by`` column (contacts by email, case-insensitively;
companies by domain; anything with an ``external_id`` by it): a row matching a record of the tenant
(not in the trash) updates it with the cells given, any other row creates one. Repeats of a key in
one file apply in file order (the later row updates what the earlier one created).

Writes go through the one write path, set-based (an audit row and a change event per record):
creates through ``resolvers.batch.create_many``, updates of matched records through
``resolvers.batch.update_rows`` (``Change.update``'s rules); each chunk of rows
is one transaction (``resolvers.writes.work_change``: webhook deliveries in the outbox, events
published after the commit) that also records the chunk's row errors and advances the job's
checkpoint (``processed``). A resumed job starts after the last committed chunk, so nothing is
written twice. A row that fails is reported (row number, column, field, code, message) and the
others go on: cells are read per row first (``read_rows``, while the chunk before is written);
then the write path checks the chunk's rows itself and hands back each one it refuses
(``create_many`` and ``update_rows`` with ``refused``: references once per chunk and relation),
and a row it still refuses when writing (a unique value taken meanwhile) is taken out and the rest
of the chunk written again. Events are published in commit order in the background (``InOrder``).
A dry run does everything inside a savepoint it rolls back.

A job runs in the process holding its session-level advisory lock (``run_import``): the one that
accepted it, or after a restart or a crash (the lock goes with the connection) whichever server's
resumer (``resume_due``) claims it first.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import enum
import io
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from graphql import GraphQLError
from sqlalchemy import Row, any_, bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.fields import rules_on
from auth.principal import Principal
from auth.roles import allows
from core.errors import AtriumError, BadUserInput, ErrorCode, Forbidden, HiddenField
from core.ids import decode_id
from models.db import ENTER_MEMBER, Databases, custom_plans, each_key, entered_view
from models.outages import is_outage
from models.tables import IMPORT_ERRORS, IMPORT_FILES, IMPORT_JOBS, Role
from records.crm import RECORDS
from records.custom import CustomFieldType, Definition, Pending, custom_key, definitions_query, rule_name
from records.declare import Create, Record
from records.declare import Field as RecordField
from records.rules import Email
from resolvers.batch import Refused, create_many, lock_keys, update_rows
from resolvers.csv_custom import FALSE, TRUE, cell_input, field_name
from resolvers.writes import Change, InOrder, work_change
from schema.imports import JOB_TYPE
from schema.values import SCALARS
from subscriptions.broker import Broker
from subscriptions.events import ChangeEvent, ChangeKind

log = logging.getLogger("atrium.imports")

IMPORTABLE: dict[str, Record] = {record.plural: record for record in RECORDS if record.importable}
"""Every record type a CSV import can create, by its plural (``deals``, ``deal_line_items``)."""
MAX_FILE_BYTES = 64 << 20
"""The largest CSV an import takes (the upload endpoint reads at most this much)."""
CHUNK = 1000
"""Rows per transaction (and per checkpoint)."""
READ_SLICE = 25
"""Rows ``read_rows`` reads before giving the other tasks a turn."""
ENDED = ("done", "failed")
MISSING = object()


class BadCsv(BadUserInput):
    """A file or mapping an import cannot start from: BAD_USER_INPUT naming ``field``, with a stable
    ``extensions.reason`` (``NOT_UTF8``, ``MISSING_HEADER``, ``DUPLICATE_HEADER``, ``MALFORMED``,
    ``TOO_LARGE``, ``UNKNOWN_TYPE``, ``UNKNOWN_COLUMN``, ``UNKNOWN_FIELD``, ``DUPLICATE_TARGET``)."""

    def __init__(self, field: str, reason: str, message: str) -> None:
        super().__init__(field, message)
        self.extra["reason"] = reason


def record_for(type_name: str) -> Record:
    """The importable record named by its plural; UNKNOWN_TYPE otherwise."""
    record = IMPORTABLE.get(type_name)
    if record is None:
        raise BadCsv("type", "UNKNOWN_TYPE", f"must be one of {', '.join(IMPORTABLE)}")
    return record


# ---- cells and targets ------------------------------------------------------------------------------

def parse_cell(annotation: Any, name: str, text: str) -> Any:
    """A cell's text as the GraphQL input value of ``annotation`` (the field's rule checks it next)."""
    scalar = SCALARS.get(annotation)
    if scalar is not None:
        parse = scalar.parse_value
        assert parse is not None
        try:
            return parse(text.strip())
        except GraphQLError as error:
            raise BadUserInput(name, error.message) from None
    if annotation is int:
        try:
            return int(text.strip())
        except ValueError:
            raise BadUserInput(name, "must be a whole number") from None
    if annotation is bool:
        word = text.strip().lower()
        if word in TRUE or word in FALSE:
            return word in TRUE
        raise BadUserInput(name, "must be true or false")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        word = text.strip()
        for member in annotation:
            if word.upper() == member.name or word == member.value:
                return member
        raise BadUserInput(name, f"must be one of {', '.join(m.name for m in annotation)}")
    return text


@dataclass(frozen=True)
class Target:
    """Where a CSV column goes: one declared field, or one of the tenant's custom fields (``target``
    resolves names to targets)."""

    name: str
    """As a mapping names it: the field as the API names it (``stageId``), or ``custom.<key>``."""
    field: RecordField | None = None
    definition: Definition | None = None
    """The custom field's live definition (``field`` is None then)."""

    @property
    def column(self) -> str | None:
        """The declared field's column (None for a custom field)."""
        return self.field.column if self.field is not None else None

    @property
    def reported(self) -> str:
        """What errors about the column name: the field (``stageId``, ``customFields.tier``)."""
        return field_name(self.definition.key) if self.definition is not None else self.name

    def value(self, text: str) -> Any:
        """The value of a non-empty cell: a declared field's column value (parsed as the field's
        GraphQL type, then its rule), or a custom field's input (``resolvers.csv_custom``), which the
        write path checks against the definition as it checks a GraphQL write's."""
        if self.definition is not None:
            return cell_input(self.definition, text)
        assert self.field is not None
        return self.field.rule(self.name, parse_cell(self.field.rule.annotation, self.name, text))


def writable(field: RecordField) -> bool:
    return field.create is not Create.NEVER or field.update


def target(record: Record, name: str, header: str, definitions: Sequence[Definition] = ()) -> Target:
    """The target a mapping names: a declared field the API writes, by its API name or its column
    name, or ``custom.<key>`` for one of the tenant's live custom fields of the record
    (``definitions``); UNKNOWN_FIELD otherwise. The one place mapping targets are resolved."""
    wanted = name.strip()
    if (key := custom_key(wanted)) is not None:
        found = next((d for d in definitions if d.key == key), None) if record.custom_fields else None
        if found is None:
            keys = ", ".join(rule_name(d.key) for d in definitions) if record.custom_fields else ""
            raise BadCsv(f"mapping.{header}", "UNKNOWN_FIELD",
                         f"{wanted!r} is not a custom field of {record.plural_label}"
                         + (f"; one of {keys}" if keys else " (the workspace defines none)"))
        return Target(rule_name(key), definition=found)
    for f in record.fields:
        if writable(f) and wanted in (f.name, f.column):
            return Target(f.name, f)
    names = ", ".join([*(f.name for f in record.fields if writable(f)),
                       *(rule_name(d.key) for d in definitions if record.custom_fields)])
    raise BadCsv(f"mapping.{header}", "UNKNOWN_FIELD", f"{wanted!r} is not a field of {record.plural_label}; "
                                                      f"one of {names}")


@dataclass(frozen=True)
class Plan:
    """How one file's columns map to one record's fields."""

    record: Record
    header: tuple[str, ...]
    columns: tuple[tuple[int, str, Target], ...]
    """(position in the row, CSV header, target) of every mapped column."""

    @property
    def key(self) -> str | None:
        """The dedupe column, when a CSV column maps to it."""
        key = self.record.import_by
        return key if any(t.column == key for _, _, t in self.columns) else None

    def header_of(self, field: str | None) -> str | None:
        """The CSV column of the field an error names (``customFields.budget.amount``: ``budget``'s)."""
        if field is None:
            return None
        return next((h for _, h, t in self.columns if field == t.reported or field.startswith(t.reported + ".")),
                    None)

    def mapping(self) -> dict[str, str | None]:
        """Every column of the file and its target, None for one left out: what the job stores and
        runs by (a column left out by the caller's mapping stays out even where its header names a
        field, as it would when it was accepted)."""
        mapped = {h: t.name for _, h, t in self.columns}
        return {h: mapped.get(h) for h in self.header}

    def refuse_hidden(self, hidden: Collection[str], role: str) -> None:
        """FORBIDDEN naming ``mapping.<column>`` for the first column whose field (declared or custom)
        a field rule hides from the importing member's role: an import writes what it maps, and a
        role may not write what it may not read (``Record.refuse_hidden``, as for a GraphQL write)."""
        for _, header, t in self.columns:
            try:
                self.record.refuse_hidden(hidden, role, columns=[t.column] if t.column is not None else (),
                                          custom_keys=[t.definition.key] if t.definition is not None else ())
            except HiddenField:
                raise HiddenField(f"mapping.{header}", self.record.name, t.name, role) from None


def plan_for(record: Record, header: Sequence[str], mapping: Mapping[str, str | None] | None,
             definitions: Sequence[Definition] = ()) -> Plan:
    """The plan of a file with ``header``: each column mapped as ``mapping`` says (header -> field;
    an empty target leaves the column out), the others to the field of their own name when there
    is one (left out otherwise; ``custom.<key>`` is the name of a custom field of ``definitions``,
    the tenant's live ones). Coded BAD_USER_INPUT for a mapping naming a column the file does not
    have, a target that is no field, or two columns for one field."""
    given = dict(mapping or {})
    for name in given:
        if name not in header:
            raise BadCsv(f"mapping.{name}", "UNKNOWN_COLUMN", f"the file has no column {name!r}")
    columns: list[tuple[int, str, Target]] = []
    for position, name in enumerate(header):
        if name in given:
            wanted = given[name]
            if not wanted:
                continue
            columns.append((position, name, target(record, wanted, name, definitions)))
            continue
        try:
            columns.append((position, name, target(record, name, name, definitions)))
        except BadCsv:
            continue  # a column of no field of its own name is left out unless mapped
    used: dict[str, str] = {}
    for _, name, t in columns:
        if t.name in used:
            raise BadCsv(f"mapping.{name}", "DUPLICATE_TARGET", f"{t.name} is also the target of {used[t.name]!r}")
        used[t.name] = name
    return Plan(record, tuple(header), tuple(columns))


# ---- the file ---------------------------------------------------------------------------------------

def decoded(content: bytes) -> str:
    if len(content) > MAX_FILE_BYTES:
        raise BadCsv("file", "TOO_LARGE", f"must be at most {MAX_FILE_BYTES} bytes")
    try:
        return content.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadCsv("file", "NOT_UTF8", f"is not UTF-8 text (byte {error.start} is not)") from None


def rows_of(content: bytes) -> tuple[list[str], Iterator[tuple[int, list[str]]]]:
    """The header and the data rows (row number from 1, blank lines skipped) of a CSV file."""
    reader = csv.reader(io.StringIO(decoded(content), newline=""), strict=True)
    try:
        header = next(reader, None)
    except csv.Error as error:
        raise BadCsv("file", "MALFORMED", f"line {reader.line_num}: {error}") from None
    if header is None or not any(h.strip() for h in header):
        raise BadCsv("file", "MISSING_HEADER", "must start with a header row naming the columns")
    header = [h.strip() for h in header]
    if "" in header:
        raise BadCsv("file", "MISSING_HEADER", f"column {header.index('') + 1} of the header row has no name")
    if any("\x00" in h for h in header):  # the job stores the header's names (its mapping) as JSON text
        raise BadCsv("file", "MALFORMED", "the header row holds a NUL character")
    if len(set(header)) != len(header):
        repeated = next(h for h in header if header.count(h) > 1)
        raise BadCsv("file", "DUPLICATE_HEADER", f"the header names column {repeated!r} twice")

    def data() -> Iterator[tuple[int, list[str]]]:
        number = 0
        try:
            for row in reader:
                if not row or not any(cell.strip() for cell in row):
                    continue
                number += 1
                yield number, row
        except csv.Error as error:
            raise BadCsv("file", "MALFORMED", f"line {reader.line_num}: {error}") from None

    return header, data()


@dataclass(frozen=True)
class Checked:
    """A file accepted for import: its plan and its number of data rows."""

    plan: Plan
    total: int


def check_file(record: Record, content: bytes, mapping: Mapping[str, str | None] | None,
               definitions: Sequence[Definition] = ()) -> Checked:
    """Read the whole file once (coded errors for anything that stops it), count its rows;
    ``definitions``: the tenant's live custom fields of the record (what ``custom.<key>`` names)."""
    header, data = rows_of(content)
    plan = plan_for(record, header, mapping, definitions)
    total = sum(1 for _ in data)
    return Checked(plan, total)


# ---- one chunk ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RowError:
    row: int
    column: str | None
    field: str | None
    code: str
    message: str


@dataclass
class Outcome:
    created: int = 0
    updated: int = 0
    errors: list[RowError] = field(default_factory=list)


@dataclass
class Parsed:
    row: int
    values: dict[str, Any]
    """Column -> value of the declared fields given."""
    custom: dict[str, Any]
    """Key -> input (``CustomFieldValueInput`` as a dict) of the custom fields given."""


def named_users(definitions: Sequence[Definition], inputs: Iterable[Mapping[str, Any]]) -> set[uuid.UUID]:
    """The members the USER custom values of ``inputs`` name (those that are user IDs at all)."""
    users = [d.key for d in definitions if d.type is CustomFieldType.USER]
    out: set[uuid.UUID] = set()
    for given in inputs:
        for key in users:
            text = given.get(key, {}).get("userId")
            if text is not None:
                with suppress(AtriumError):
                    out.add(decode_id(text, "User"))
    return out


def key_of(record: Record, column: str, value: Any) -> Any:
    """A dedupe key as compared: e-mail addresses case-insensitively."""
    return value.lower() if isinstance(value, str) and isinstance(record.field(column).rule, Email) else value


def row_error(plan: Plan, row: int, error: AtriumError, index: int | None = None) -> RowError:
    """``error`` as row ``row``'s entry in the report, its field without a batch's ``input.<index>.``."""
    name = error.field
    if name is not None and index is not None and name.startswith(f"input.{index}."):
        name = name[len(f"input.{index}."):]
    return RowError(row, plan.header_of(name), name, error.code.value, error.message)


@dataclass
class Read:
    """A chunk's rows read (``read_rows``): those whose every cell was read, the others' errors."""

    done: int
    """The number of the chunk's last row (its checkpoint once written)."""
    parsed: list[Parsed]
    errors: list[RowError]


async def read_rows(plan: Plan, rows: Sequence[tuple[int, list[str]]]) -> Read:
    """Each row's cells read into values (``Target.value``: the API's parsing and the field's rule),
    ``READ_SLICE`` rows at a time: between two slices other tasks run, so that ``_run`` reads the
    next chunk while PostgreSQL writes the current one, and no statement's answer waits behind more
    than one slice."""
    parsed: list[Parsed] = []
    errors: list[RowError] = []
    width = len(plan.header)
    # A cell's value depends on its text alone, and a column often repeats its texts (a stage,
    # a currency, an owner): each distinct text of a column is read once per chunk.
    seen: list[dict[str, Any]] = [{} for _ in plan.columns]
    for start in range(0, len(rows), READ_SLICE):
        if start:
            await asyncio.sleep(0)  # a turn for the other tasks (the docstring), not a wait
        for number, cells in rows[start:start + READ_SLICE]:
            if len(cells) > width:
                errors.append(RowError(number, None, None, ErrorCode.BAD_USER_INPUT.value,
                                       f"the row has {len(cells)} cells, the header {width}"))
                continue
            values: dict[str, Any] = {}
            custom: dict[str, Any] = {}
            good = True
            for (position, _, t), known in zip(plan.columns, seen, strict=True):
                cell = cells[position] if position < len(cells) else ""
                value = known.get(cell, MISSING)
                if value is MISSING:
                    if not cell.strip():
                        continue
                    try:
                        value = known[cell] = t.value(cell)
                    except AtriumError as error:
                        errors.append(row_error(plan, number, error))
                        good = False
                        continue
                if t.definition is not None:
                    custom[t.definition.key] = value
                else:
                    values[t.column] = value  # type: ignore[index]
            if good:
                parsed.append(Parsed(number, values, custom))
    return Read(rows[-1][0] if rows else 0, parsed, errors)


class Chunk:
    """Importing one chunk of rows inside one ``Change`` (module docstring)."""

    def __init__(self, w: Change, plan: Plan) -> None:
        self.w, self.plan, self.record = w, plan, plan.record
        self.outcome = Outcome()
        self.creating = [(f, f.column, f.create is Create.REQUIRED, f.default) for f in plan.record.fields
                         if f.create is not Create.NEVER]
        """The fields a create sets: (field, column, required, default), read once per chunk."""

    def fail(self, row: int, error: AtriumError, index: int | None = None) -> None:
        self.outcome.errors.append(row_error(self.plan, row, error, index))

    async def run(self, read: Read) -> Outcome:
        self.outcome.errors.extend(read.errors)
        key = self.plan.key
        rounds: list[list[Parsed]] = []
        seen: dict[Any, int] = {}
        for p in read.parsed:
            k = key_of(self.record, key, p.values.get(key)) if key is not None else None
            n = seen.get(k, 0) if k is not None else 0
            if k is not None:
                seen[k] = n + 1
            if n == len(rounds):
                rounds.append([])
            rounds[n].append(p)
        for group in rounds:
            await self.write(group, key)
        self.outcome.errors.sort(key=lambda e: e.row)
        return self.outcome

    async def existing(self, group: list[Parsed], key: str | None) -> dict[Any, Row[Any]]:
        """The tenant's records (outside the trash) matching the group's keys, locked; the oldest per
        key. A key with an index (an external id, a domain) is looked up key by key in it
        (``each_key``); e-mail addresses compare case-insensitively, through ``lower()``, which no
        index answers under row-level security (it is not leakproof), so the workspace's contacts
        are read once against the hashed list of addresses (``custom_plans``)."""
        if key is None:
            return {}
        wanted = list({key_of(self.record, key, p.values[key]) for p in group if p.values.get(key) is not None})
        if not wanted:
            return {}
        t = self.record.table
        await lock_keys(self.w, f"{self.record.name}:{key}", [str(k) for k in wanted])
        mine = select(t).where(t.c.tenant_id == self.w.tenant_id, *self.record.visible(t)).with_for_update()
        plans: AbstractAsyncContextManager[Any]
        if isinstance(self.record.field(key).rule, Email):
            lowered = func.lower(t.c[key], type_=t.c[key].type)
            matching = mine.where(lowered == any_(bindparam("keys", type_=ARRAY(t.c[key].type))))
            plans = custom_plans(self.w.conn)
        else:
            matching = each_key(mine, t.c[key], "keys")
            plans = nullcontext()
        oldest = (matching.selected_columns.created_at, matching.selected_columns.id)
        async with plans:
            rows = (await self.w.conn.execute(matching.order_by(*oldest), {"keys": sorted(wanted)})).all()
        found: dict[Any, Row[Any]] = {}
        for row in rows:
            found.setdefault(key_of(self.record, key, row._mapping[key]), row)
        return found

    async def write(self, group: list[Parsed], key: str | None) -> None:
        record = self.record
        found = await self.existing(group, key)
        creates: list[tuple[Parsed, dict[str, Any]]] = []
        updates: list[tuple[Parsed, Row[Any], dict[str, Any]]] = []
        for p in group:
            current = found.get(key_of(record, key, p.values.get(key))) if key is not None else None
            try:
                if current is None:
                    creates.append((p, self.create_values(p)))
                else:
                    updates.append((p, current, self.patch_values(p, current)))
            except AtriumError as error:
                self.fail(p.row, error)
        await self.create(creates)
        await self.update(updates)

    def create_values(self, p: Parsed) -> dict[str, Any]:
        """The values a create of ``p`` starts from (required fields given, defaults): the write
        path checks them (``create_many``)."""
        values: dict[str, Any] = {}
        for f, column, required, default in self.creating:
            value = p.values.get(column)
            if value is None:
                if required:
                    raise BadUserInput(f.name, f"is required to create a {self.record.label}")
                value = default
            values[column] = value
        if self.record.custom_fields:
            values["custom_fields"] = Pending(dict(p.custom))
        return values

    def patch_values(self, p: Parsed, current: Row[Any]) -> dict[str, Any]:
        patch: dict[str, Any] = {}
        for column, value in p.values.items():
            f = self.record.field(column)
            if f.update:
                patch[column] = value
            elif value != current._mapping[column]:
                raise BadUserInput(f.name, f"cannot be changed once the {self.record.label} exists")
        if p.custom:
            patch["custom_fields"] = Pending(dict(p.custom))
        return patch

    async def create(self, creates: list[tuple[Parsed, dict[str, Any]]]) -> None:
        """``create_many`` of the creates (``written``): each one it refuses (its checks: the custom
        fields against the tenant's definitions, the rules, the references, unique values) is its
        row's error, and the others are created. The members named by USER custom fields are
        looked up first, in one statement."""
        w = self.w
        if not creates:
            return
        if self.record.custom_fields and await w.definitions(self.record):
            await w.members(named_users(await w.definitions(self.record), (p.custom for p, _ in creates)))
        self.outcome.created += await self.written(creates, lambda items, refused: create_many(
            w, self.record, [dict(values) for _, values in items], refused=refused))

    async def update(self, updates: list[tuple[Parsed, Row[Any], dict[str, Any]]]) -> None:
        """The matched records' patches through ``Change.update``'s rules, set-based (``update_rows``,
        ``written``: each one it refuses is its row's error; a record with rollups one by one). A
        matched row that changes nothing counts as updated."""
        record, w = self.record, self.w
        if record.sequential:
            for p, current, patch in updates:
                self.outcome.updated += await self.written([(p, current, patch)], lambda items, _: w.update(
                    record, items[0][1].id, dict(items[0][2]), None))
            return
        self.outcome.updated += await self.written(updates, lambda items, refused: update_rows(
            w, record, [(current, dict(patch), None) for _, current, patch in items], refused=refused))

    async def written(self, items: list[Any], write: Callable[[list[Any], Refused], Awaitable[Any]]) -> int:
        """``write(items, refused)`` in a savepoint. An item it hands to ``refused`` (its position and
        error) is that row's error; an item it raises about (the batch error's ``index``: a unique
        value taken meanwhile) too, and the rest are written again without it. Items are tuples,
        ``Parsed`` first. Returns how many were written."""
        w = self.w
        while items:
            mark = len(w.events)
            refusals: list[tuple[int, AtriumError]] = []
            try:
                async with w.conn.begin_nested():
                    await write(items, partial(_collect, refusals))
            except AtriumError as error:
                del w.events[mark:], w.rows[mark:]
                index = error.extra.get("index")
                if not isinstance(index, int):
                    for item in items:
                        self.fail(item[0].row, error)
                    return 0
                self.fail(items[index][0].row, error, index)
                items = items[:index] + items[index + 1:]
                continue
            for position, refusal in refusals:
                self.fail(items[position][0].row, refusal)
            return len(items) - len(refusals)
        return 0


def _collect(into: list[tuple[int, AtriumError]], position: int, error: AtriumError) -> None:
    into.append((position, error))


async def import_chunk(w: Change, plan: Plan, read: Read, *, dry_run: bool = False) -> Outcome:
    """Import the rows ``read`` through ``w`` (module docstring); a dry run writes nothing of them."""
    chunk = Chunk(w, plan)
    if not dry_run:
        return await chunk.run(read)
    savepoint = await w.conn.begin_nested()
    try:
        return await chunk.run(read)
    finally:
        await savepoint.rollback()
        w.events.clear()
        w.rows.clear()


# ---- jobs ---------------------------------------------------------------------------------------------

async def live_definitions(conn: AsyncConnection, tenant_id: uuid.UUID, record: Record) -> list[Definition]:
    """The tenant's live custom fields of ``record`` (what a mapping's ``custom.<key>`` may name), in
    form order, read in ``conn``'s tenant transaction."""
    if not record.custom_fields:
        return []
    rows = (await conn.execute(definitions_query(record.name), {"tenant_id": tenant_id})).all()
    return [Definition.from_row(row) for row in rows]


J = IMPORT_JOBS


async def create_job(conn: AsyncConnection, tenant_id: uuid.UUID, user_id: uuid.UUID | None, record: Record,
                     content: bytes, checked: Checked, *, dry_run: bool) -> Row[Any]:
    """The job row and its stored file (inside the caller's tenant transaction)."""
    job_id = uuid.uuid4()
    row = (await conn.execute(insert(J).values(
        tenant_id=tenant_id, id=job_id, requested_by=user_id, record_type=record.plural,
        mapping=checked.plan.mapping(), dry_run=dry_run, total=checked.total, file_bytes=len(content),
    ).returning(J))).one()
    assert isinstance(row, Row)
    await conn.execute(insert(IMPORT_FILES).values(tenant_id=tenant_id, id=uuid.uuid4(), job_id=job_id,
                                                   content=content))
    return row


def progress_event(tenant_id: uuid.UUID, job_id: uuid.UUID, processed: int) -> ChangeEvent:
    """What ``importJobProgress`` subscribers wake up on (the job's own record channel)."""
    now = dt.datetime.now(dt.UTC)
    return ChangeEvent(tenant_id=tenant_id, entity_type=JOB_TYPE, entity_id=job_id, kind=ChangeKind.UPDATED,
                       fields=("processed",), actor_id=None, version=processed, occurred_at=now, committed_at=now)


LOCK = text("SELECT pg_try_advisory_lock(hashtextextended(:name, 0))")
UNLOCK = text("SELECT pg_advisory_unlock(hashtextextended(:name, 0))")
DUE = text("SELECT tenant_id, id FROM atrium_import_jobs_due()")


Progress = Callable[[int, int], None]


async def run_import(databases: Databases, broker: Broker, tenant_id: uuid.UUID, job_id: uuid.UUID, *,
                     progress: Progress | None = None) -> bool:
    """Run (or resume) job ``job_id`` to its end, if no other process is running it: False when
    another one holds it. ``progress(processed, total)`` is called after each committed chunk."""
    engine = await databases.engine_for(tenant_id)
    name = f"atrium-import:{job_id}"
    async with engine.connect() as holder:
        claimed = (await holder.execute(LOCK, {"name": name})).scalar_one()
        await holder.commit()
        if not claimed:
            return False
        publishing = InOrder(broker)
        try:
            await _run(databases, publishing, tenant_id, job_id, progress)
        finally:
            await publishing.drain()
            await holder.execute(UNLOCK, {"name": name})
            await holder.commit()
    return True


class Superseded(Exception):
    """The job's checkpoint is not where this process left it (another one ran it meanwhile)."""


async def _run(databases: Databases, publishing: InOrder, tenant_id: uuid.UUID, job_id: uuid.UUID,
               progress: Progress | None) -> None:
    async with databases.tenant_transaction(tenant_id) as conn:
        job = (await conn.execute(select(J).where(J.c.tenant_id == tenant_id, J.c.id == job_id))).first()
        if job is None or job.state in ENDED:
            return
        content = (await conn.execute(select(IMPORT_FILES.c.content).where(
            IMPORT_FILES.c.tenant_id == tenant_id, IMPORT_FILES.c.job_id == job_id))).scalar_one()
        # As the member who started it: their role and their view of the records (record-level
        # visibility), read as a request reads them; the chunks then see what that member sees.
        entered = None if job.requested_by is None else (await conn.execute(
            ENTER_MEMBER, {"tenant_id": tenant_id, "member": job.requested_by})).first()
        role = entered.role if entered is not None else None
        importing = IMPORTABLE.get(job.record_type)
        definitions = await live_definitions(conn, tenant_id, importing) if importing is not None else []
        rules = await rules_on(conn, tenant_id)
        await conn.execute(update(J).where(J.c.tenant_id == tenant_id, J.c.id == job_id).values(
            state="running", started_at=func.coalesce(J.c.started_at, func.now()), updated_at=func.now()))
    try:
        if role is None or job.requested_by is None:
            raise BadUserInput("requestedBy", "the member who started this import is no longer a member")
        record = record_for(job.record_type)
        if not allows(Role(role), record.access.create):
            raise Forbidden(f"the member who started this import may no longer create {record.plural_label}")
        assert entered is not None
        principal = Principal(tenant_id=tenant_id, user_id=job.requested_by, role=Role(role),
                              expires_at=float("inf"), view=entered_view(job.requested_by, entered._mapping))
        header, data = rows_of(bytes(content))
        plan = plan_for(record, header, job.mapping, definitions)  # a custom field deleted since: FAILED
        plan.refuse_hidden(rules.hidden(Role(role), record.name), role)  # hidden from the member since: FAILED
        processed = job.processed
        chunks = chunked(data, processed)
        # Each chunk's rows are read (``read_rows``) while the chunk before is being written.
        reading = _reading(plan, chunks)
        try:
            while reading is not None:
                read = await reading
                reading = _reading(plan, chunks)
                processed = await _chunk(databases, publishing, principal, job_id, plan, read, processed,
                                         job.dry_run)
                if progress is not None:
                    progress(processed, job.total)
        finally:
            if reading is not None:
                reading.cancel()
        await _end(databases, publishing, tenant_id, job_id, state="done")
    except Superseded:
        log.warning("import %s of tenant %s: its checkpoint moved on elsewhere; leaving it", job_id, tenant_id)
    except Exception as error:
        if is_outage(error):
            # The database (or Redis) went away: the job stays RUNNING at its checkpoint, and a
            # resumer takes it up again once this process's lock on it is gone.
            log.warning("import %s of tenant %s interrupted by an outage", job_id, tenant_id)
            raise
        if isinstance(error, AtriumError):
            await _end(databases, publishing, tenant_id, job_id, state="failed", error=error.message)
            return
        log.exception("import %s of tenant %s failed", job_id, tenant_id)
        await _end(databases, publishing, tenant_id, job_id, state="failed",
                   error="the import stopped on an internal error; the rows before it were imported")
        raise


def chunked(data: Iterator[tuple[int, list[str]]], processed: int) -> Iterator[list[tuple[int, list[str]]]]:
    """The rows after the checkpoint ``processed``, ``CHUNK`` at a time."""
    pending: list[tuple[int, list[str]]] = []
    for number, row in data:
        if number <= processed:
            continue
        pending.append((number, row))
        if len(pending) == CHUNK:
            yield pending
            pending = []
    if pending:
        yield pending


def _reading(plan: Plan, chunks: Iterator[list[tuple[int, list[str]]]]) -> asyncio.Task[Read] | None:
    """The next chunk's rows being read, in a task of its own; None after the last chunk."""
    rows = next(chunks, None)
    return None if rows is None else asyncio.create_task(read_rows(plan, rows))


async def _chunk(databases: Databases, publishing: InOrder, principal: Principal, job_id: uuid.UUID, plan: Plan,
                 read: Read, processed: int, dry_run: bool) -> int:
    """One chunk, its errors and the checkpoint in one transaction; the new checkpoint. Its events
    and then its progress event are published in the background, in order (``InOrder``), while
    the next chunk is written."""
    tenant_id = principal.tenant_id
    done = read.done
    async with work_change(databases, publishing, principal, f"import:{job_id}") as w:
        outcome = await import_chunk(w, plan, read, dry_run=dry_run)
        if outcome.errors:
            await w.conn.execute(insert(IMPORT_ERRORS), [
                {"tenant_id": tenant_id, "id": uuid.uuid4(), "job_id": job_id, "row_number": e.row,
                 "column_name": e.column, "field": e.field, "code": e.code, "message": e.message}
                for e in outcome.errors])
        advanced = (await w.conn.execute(update(J).where(
            J.c.tenant_id == tenant_id, J.c.id == job_id, J.c.processed == processed, J.c.state == "running")
            .values(processed=done, created_count=J.c.created_count + outcome.created,
                    updated_count=J.c.updated_count + outcome.updated,
                    error_count=J.c.error_count + len({e.row for e in outcome.errors}), updated_at=func.now())
            .returning(J.c.id))).first()
        if advanced is None:
            raise Superseded(f"import {job_id} moved on elsewhere")  # rolls the chunk back
    publishing.submit([progress_event(tenant_id, job_id, done)])
    return done


async def _end(databases: Databases, publishing: InOrder, tenant_id: uuid.UUID, job_id: uuid.UUID, *, state: str,
               error: str | None = None) -> None:
    async with databases.tenant_transaction(tenant_id) as conn:
        await conn.execute(update(J).where(J.c.tenant_id == tenant_id, J.c.id == job_id).values(
            state=state, error=error, finished_at=func.now(), updated_at=func.now()))
        await conn.execute(IMPORT_FILES.delete().where(IMPORT_FILES.c.tenant_id == tenant_id,
                                                       IMPORT_FILES.c.job_id == job_id))
    publishing.submit([progress_event(tenant_id, job_id, -1)])
    await publishing.drain()


async def due(databases: Databases) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """Every (tenant, job) not yet ended, on the shared database."""
    async with databases.default.connect() as conn:
        rows = (await conn.execute(DUE)).all()
        await conn.commit()
    return [(row.tenant_id, row.id) for row in rows]
