"""CSV export of any filtered list: the rows of a record's connection, streamed (``GET /csv/<plural>``).

The filter is the connection's own (``<Type>Filter``, the same field names and the same checks:
``Record.bind_filters``), given as JSON; the rows are the connection's query (``Record.filtered``:
the tenant's rows outside the trash) in the record's default order, read in the tenant's
transaction (row-level security applies as a backstop) through a server-side cursor, ``BATCH``
rows at a time, so memory stays constant whatever the list's size. The columns are derived from
the declaration: ``id``, every declared field (references as global IDs, as the API shows them),
the workspace's live custom fields the caller may read (``custom.<key>``, values as text:
``resolvers.csv_custom``; chosen by ``records.custom.readable``), ``createdAt`` and ``updatedAt``;
the CSV is written by Python's ``csv`` module.
"""

from __future__ import annotations

import csv
import dataclasses
import enum
import io
import json
import types
import uuid
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from typing import Any, Union, get_args, get_origin, get_type_hints

from graphql import GraphQLError
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import BadUserInput
from models.db import Databases
from models.visibility import View
from records.crm import RECORDS
from records.custom import Definition, definitions_query, readable, rule_name
from records.declare import Direction, HiddenOf, Record, camel
from resolvers.csv_custom import cell_text
from resolvers.writes import public_record
from schema.values import SCALARS

EXPORTABLE: dict[str, Record] = {record.plural: record for record in RECORDS
                                 if record.root.listing.value == "connection"}
"""Every record with a connection field, by its plural (what ``/csv/<plural>`` takes)."""
BATCH = 500
MAX_FILTER = 10_000
"""Characters of the ``filter`` JSON."""


def record_for(plural: str) -> Record:
    record = EXPORTABLE.get(plural)
    if record is None:
        raise BadUserInput("type", f"must be one of {', '.join(EXPORTABLE)}")
    return record


def input_value(annotation: Any, name: str, value: Any) -> Any:
    """A JSON value as the GraphQL input value of ``annotation`` (what Strawberry would hand a
    resolver): scalars, enums, lists and input objects (``filter.custom``'s conditions)."""
    if value is None:
        return None
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is list:
        if not isinstance(value, list):
            raise BadUserInput(name, "must be a list")
        (item,) = get_args(annotation)
        return [input_value(item, f"{name}.{i}", v) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return input_object(annotation, name, value)
    scalar = SCALARS.get(annotation)
    if scalar is not None and scalar.parse_value is not None:
        try:
            return scalar.parse_value(value)
        except GraphQLError as error:
            raise BadUserInput(name, error.message) from None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        for member in annotation:
            if value == member.name:
                return member
        raise BadUserInput(name, f"must be one of {', '.join(m.name for m in annotation)}")
    expected = {int: int, bool: bool}.get(annotation, str)
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise BadUserInput(name, f"must be a {'number' if expected is int else expected.__name__}")
    return value


def input_object(annotation: type, name: str, value: Any) -> Any:
    """A JSON object as the input object ``annotation`` (a Strawberry input: a dataclass whose fields
    the API names in camel case); BAD_USER_INPUT naming an unknown or missing member."""
    if not isinstance(value, dict):
        raise BadUserInput(name, "must be a JSON object")
    types_of = get_type_hints(annotation)
    fields = {camel(f.name): f for f in dataclasses.fields(annotation)}
    given: dict[str, Any] = {}
    for key, member_value in value.items():
        f = fields.get(key)
        if f is None:
            raise BadUserInput(f"{name}.{key}", f"is not a member; one of {', '.join(fields)}")
        given[f.name] = input_value(types_of[f.name], f"{name}.{key}", member_value)
    for key, f in fields.items():
        if f.name not in given and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BadUserInput(f"{name}.{key}", "is required")
    return annotation(**given)


def filter_of(record: Record, text: str | None) -> dict[str, Any]:
    """The connection filter given as JSON (GraphQL names), as the resolvers get it (Python names)."""
    if not text:
        return {}
    if len(text) > MAX_FILTER:
        raise BadUserInput("filter", f"must be at most {MAX_FILTER} characters")
    try:
        given = json.loads(text)
    except ValueError:
        raise BadUserInput("filter", "must be a JSON object") from None
    if not isinstance(given, dict):
        raise BadUserInput("filter", "must be a JSON object")
    fields = {camel(f.python_name): f for f in record.filter_fields()}
    out: dict[str, Any] = {}
    for name, value in given.items():
        f = fields.get(name)
        if f is None:
            raise BadUserInput(f"filter.{name}", f"is not a filter of {record.plural_label}; "
                                                 f"one of {', '.join(fields)}")
        out[f.python_name] = input_value(f.annotation, f"filter.{name}", value)
    record.bind_filters(out)  # every value checked by its rule before anything is sent
    return out


def columns_of(record: Record, hidden: Collection[str] = ()) -> list[str]:
    """The CSV's columns of declared fields: ``id``, every declared field but those ``hidden`` from
    the caller's role (field rules: a hidden field's column is left out, header included), the
    timestamps. Custom fields come before the timestamps (``header``)."""
    return ["id", *(f.column for f in record.fields if camel(f.column) not in hidden), "created_at", "updated_at"]


def header(record: Record, hidden: Collection[str], custom: Sequence[Definition]) -> list[str]:
    """The header row: the API's names of ``columns_of``, with ``custom.<key>`` for each custom field
    of ``custom`` (in form order) before ``createdAt`` and ``updatedAt``."""
    names = [camel(c) for c in columns_of(record, hidden)]
    return [*names[:-2], *(rule_name(d.key) for d in custom), *names[-2:]]


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def custom_columns(conn: AsyncConnection, tenant_id: uuid.UUID, record: Record,
                         hidden: Collection[str]) -> list[Definition]:
    """The custom fields the export shows: the workspace's live ones (as the export's transaction
    sees them) that the caller may read (``records.custom.readable``), in form order."""
    if not record.custom_fields:
        return []
    rows = (await conn.execute(definitions_query(record.name), {"tenant_id": tenant_id})).all()
    return readable([Definition.from_row(row) for row in rows], hidden)


async def csv_rows(databases: Databases, tenant_id: uuid.UUID, record: Record, filters: Mapping[str, Any], *,
                   view: View, hidden: HiddenOf) -> AsyncIterator[bytes]:
    """The CSV text of the filtered list as ``view`` may see it (record-level visibility, in the
    application's filter and in row-level security) without the fields ``hidden`` from the caller's
    role, header first, ``BATCH`` rows per piece. The caller has refused filters on hidden fields."""
    columns = columns_of(record, hidden(record.name))
    query = record.listing_query(tenant_id, filters, hidden)
    sort = {s.name: s for s in record.sorts}.get(record.default_sort or "")
    t = record.table
    if sort is not None:
        key = sort.key(t).expression
        descending = record.default_direction is Direction.DESC
        query = query.order_by(key.desc() if descending else key.asc(), t.c.id.desc() if descending else t.c.id)
    else:
        query = query.order_by(t.c.id)
    async with databases.tenant_transaction(tenant_id, view=view) as conn:
        custom = await custom_columns(conn, tenant_id, record, hidden(record.name))
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(header(record, hidden(record.name), custom))
        yield out.getvalue().encode()
        result = await conn.stream(query.execution_options(yield_per=BATCH))
        async for batch in result.partitions(BATCH):
            out = io.StringIO()
            writer = csv.writer(out)
            for row in batch:
                shown = public_record(record, {c: row._mapping[c] for c in columns})
                cells = [cell(shown[camel(c)]) for c in columns]
                if custom:
                    values = row._mapping["custom_fields"]
                    cells[-2:-2] = [cell_text(d, values.get(d.key)) for d in custom]
                writer.writerow(cells)
            yield out.getvalue().encode()
