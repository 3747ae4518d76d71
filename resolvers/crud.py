"""The CRUD root fields of every declared record, and their input types, derived from the declaration.

For a record ``Deal`` (``records.crm.DEAL``) with the default ``Root``:

- ``deals(filter: DealFilter, orderBy: DealOrder, first, after, last, before): DealConnection!``
  (or, for ``Listing.LIST``, ``pipelines: [Pipeline!]!`` in the default order), and ``deal(id:)``;
- ``createDeal(input: DealInput!)``, ``updateDeal(id:, input: DealPatch!, expectedVersion:)`` and
  ``deleteDeal(id:, expectedVersion:): DeletePayload!``; for a trashable record (``Record.trash``)
  the delete moves it to the trash and ``restoreDeal(id:): Deal!`` brings it back.

``DealInput`` holds the fields created with the record (and nested children), ``DealPatch`` those
that may change (each optional; null clears a nullable one), ``DealFilter`` the declared filters,
``DealOrder`` its orderings. Every field requires the permission the declaration gives its operation,
and says so in the SDL. Values go through the fields' rules (``Record.create_values`` /
``patch_values``), then the write path (``resolvers.writes``), which checks references, record
checks and dependents.

``queries(record)`` and ``mutations(record)`` are Strawberry types holding a record's derived root
fields, to compose into the root types; records with fields of their own (``resolvers/deals.py``)
take the single fields (``list_field``, ``get_field``...) instead, to place them in order.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from functools import cache
from typing import Any

import strawberry
from sqlalchemy import select
from strawberry.types.unset import UNSET

from auth.roles import requires
from auth.session import Info
from core.errors import BadUserInput
from core.ids import decode_id
from records.declare import Create, Direction, Listing, Record, camel, ordering, snake
from resolvers.paging import paginate
from resolvers.writes import change
from schema import enums as _enums  # noqa: F401 - registers the enums inputs refer to
from schema.crm import DeletePayload
from schema.objects import RecordObject, planned, prefetch
from schema.pagination import Connection

KEYWORD = inspect.Parameter.KEYWORD_ONLY


def _input(name: str, fields: dict[str, tuple[Any, Any]], description: str | None = None) -> type:
    """A Strawberry input type from ``python name -> (annotation, strawberry field or default)``."""
    namespace: dict[str, Any] = {"__annotations__": {k: v[0] for k, v in fields.items()}}
    namespace.update({k: v[1] for k, v in fields.items() if v[1] is not inspect.Parameter.empty})
    return strawberry.input(type(name, (), namespace), description=description)


@cache
def input_type(record: Record) -> type:
    """``<Name>Input``: the fields set on create, in declaration order, then nested children."""
    fields: dict[str, tuple[Any, Any]] = {}
    for f in record.fields:
        annotation = f.rule.annotation
        if f.create is Create.REQUIRED:
            fields[f.column] = (annotation, strawberry.field(description=f.description)
                                if f.description else inspect.Parameter.empty)
        elif f.create is Create.OPTIONAL:
            nullable = f.default is None
            fields[f.column] = (annotation | None if nullable else annotation,
                                strawberry.field(default=f.default, description=f.description))
    for spec in record.children:
        if spec.nested:
            fields[spec.name] = (list[input_type(spec.relation.owner)],  # type: ignore[misc]
                                 strawberry.field(default_factory=list))
    return _input(f"{record.name}Input", fields, record.description("input"))


@cache
def patch_type(record: Record) -> type:
    """``<Name>Patch``: the fields that may change, each optional."""
    fields = {f.column: (f.rule.annotation | None, UNSET) for f in record.fields if f.update}
    return _input(f"{record.name}Patch", fields)


@cache
def filter_type(record: Record) -> type | None:
    """``<Name>Filter``: the declared filters' fields (None when it has none)."""
    fields = {f.python_name: (f.annotation | None, strawberry.field(default=None, description=f.description))
              for f in record.filter_fields()}
    return _input(f"{record.name}Filter", fields) if fields else None


@cache
def order_types(record: Record) -> tuple[type[enum.Enum], type]:
    """``<Name>OrderField`` (one value per declared ``Sort``) and ``<Name>Order``."""
    make_enum: Any = enum.Enum
    field_enum: type[enum.Enum] = strawberry.enum(make_enum(f"{record.name}OrderField",
                                                            {s.name: s.column for s in record.sorts}))
    default = field_enum[record.default_sort or record.sorts[0].name]
    order = _input(f"{record.name}Order", {
        "field": (field_enum, default), "direction": (Direction, record.default_direction)})
    return field_enum, order


def _resolver(body: Callable[..., Any], parameters: list[tuple[str, Any, Any]], returns: Any) -> Callable[..., Any]:
    """``body`` with the signature Strawberry reads: ``info`` then keyword ``parameters``."""
    signature = inspect.Signature([
        inspect.Parameter("info", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Info),
        *(inspect.Parameter(name, KEYWORD, annotation=annotation, default=default)
          for name, annotation, default in parameters),
    ], return_annotation=returns)
    body.__signature__ = signature  # type: ignore[attr-defined]
    return body


def object_type(record: Record) -> type[RecordObject]:
    return RecordObject.type_of(record)


# ---- queries --------------------------------------------------------------------------------------

def list_field(record: Record) -> Any:
    """``<plural>``: the record's connection (``Listing.CONNECTION``) or plain list (``Listing.LIST``)."""
    kind = object_type(record)
    permission = requires(record.access.read, record.description("list"))
    if record.root.listing is Listing.LIST:
        order = ordering(record.table, (*(s.column for s in record.sorts if s.name == record.default_sort), "id"))

        async def listed(info: Info) -> list[Any]:
            session = info.context.session
            t = record.table
            rows = await session.db.fetch(select(t).where(t.c.tenant_id == session.tenant_id)
                                          .order_by(*order).limit(record.root.limit))
            objects = [kind.from_row(row) for row in rows]
            await prefetch(info, objects, ())
            return objects

        planned(listed, "list", record, record.access.read)
        return strawberry.field(resolver=_resolver(listed, [], list[kind]), **permission)  # type: ignore[valid-type]

    filter_input = filter_type(record)
    _, order_input = order_types(record)
    keys = record.sort_keys()

    async def connection(info: Info, filter: Any = None, order_by: Any = None, first: int | None = None,
                         after: str | None = None, last: int | None = None, before: str | None = None) -> Any:
        session = info.context.session
        order = order_by or order_input()
        page = await paginate(
            session.db, record.listing_query(session.tenant_id, vars(filter) if filter else None),
            record.table.c.id, keys[order.field.name], kind.from_row,
            descending=order.direction is Direction.DESC, first=first, after=after, last=last, before=before,
            max_page=info.context.settings.max_page_size)
        await prefetch(info, [edge.node for edge in page.edges], ("edges", "node"))
        return page

    planned(connection, "connection", record, record.access.read)
    parameters: list[tuple[str, Any, Any]] = []
    if filter_input is not None:
        parameters.append(("filter", filter_input | None, None))
    parameters += [("order_by", order_input | None, None), ("first", int | None, None), ("after", str | None, None),
                   ("last", int | None, None), ("before", str | None, None)]
    return strawberry.field(resolver=_resolver(connection, parameters, Connection[kind]),  # type: ignore[valid-type]
                            **permission)


def get_field(record: Record) -> Any:
    """``<singular>(id:)``: one record, null when the tenant has none with that id."""
    kind = object_type(record)

    async def get(info: Info, id: strawberry.ID) -> Any:
        row = await info.context.session.loaders.one(record).load(decode_id(id, record.name))
        return kind.from_row(row) if row is not None else None

    planned(get, "get", record, record.access.read)
    return strawberry.field(resolver=_resolver(get, [("id", strawberry.ID, inspect.Parameter.empty)], kind | None),
                            **requires(record.access.read, record.description("get")))


def queries(record: Record) -> type:
    """A Strawberry type holding the record's derived query fields (list, then get)."""
    namespace: dict[str, Any] = {"__annotations__": {}}
    if record.root.listing is not Listing.NONE:
        namespace[record.plural] = list_field(record)
    if record.root.get:
        namespace[record.singular] = get_field(record)
    return strawberry.type(type(f"{record.name}Query", (), namespace))


# ---- mutations ------------------------------------------------------------------------------------

def create_field(record: Record) -> Any:
    """``create<Name>(input:)`` (and the parent's id first, for a record with ``Root.parent``)."""
    kind = object_type(record)
    parent = record.relation(record.root.parent) if record.root.parent else None
    nested = [spec for spec in record.children if spec.nested]

    async def create(info: Info, input: Any, **arguments: Any) -> Any:
        values = record.create_values(vars(input))
        children: list[tuple[Any, list[dict[str, Any]]]] = []
        for spec in nested:
            given = getattr(input, spec.name)
            if len(given) > spec.maximum:
                raise BadUserInput(spec.name, f"at most {spec.maximum} {spec.name}")
            children.append((spec, [spec.relation.owner.create_values(vars(item), prefix=f"{spec.name}.{i}.")
                                    for i, item in enumerate(given)]))
        async with change(info) as w:
            if parent is not None:
                key = decode_id(arguments[parent.key], parent.target().name, field=camel(parent.key))
                await w.require(parent.target(), key, field=camel(parent.key), lock=True)
                values[parent.key] = key
            row = await w.create(record, values)
            for spec, items in children:
                for i, item in enumerate(items):
                    await w.create(spec.relation.owner, {**item, spec.relation.key: row.id},
                                   prefix=f"{spec.name}.{i}.")
        return kind.from_row(row)

    parameters: list[tuple[str, Any, Any]] = []
    if parent is not None:
        parameters.append((parent.key, strawberry.ID, inspect.Parameter.empty))
    parameters.append(("input", input_type(record), inspect.Parameter.empty))
    return strawberry.mutation(resolver=_resolver(create, parameters, kind),
                               **requires(record.access.create, record.description("create")))


def update_field(record: Record) -> Any:
    """``update<Name>(id:, input:, expectedVersion:)``."""
    kind = object_type(record)

    async def update(info: Info, id: strawberry.ID, input: Any, expected_version: int | None = None) -> Any:
        key = decode_id(id, record.name)
        changes = record.patch_values(vars(input))
        async with change(info) as w:
            row = await w.update(record, key, changes, expected_version)
        return kind.from_row(row)

    parameters = [("id", strawberry.ID, inspect.Parameter.empty),
                  ("input", patch_type(record), inspect.Parameter.empty), ("expected_version", int | None, None)]
    return strawberry.mutation(resolver=_resolver(update, parameters, kind),
                               **requires(record.access.update, record.description("update")))


def delete_field(record: Record) -> Any:
    """``delete<Name>(id:, expectedVersion:)``: what points at the record is handled as declared; a
    trashable record goes to the trash (``restore<Name>`` brings it back)."""
    description = record.description("delete")
    if description is None and record.trash:
        description = (f"Moves the {record.label} to the trash (with what cannot be without it); "
                       f"`restore{record.name}` brings it back.")

    async def remove(info: Info, id: strawberry.ID, expected_version: int | None = None) -> DeletePayload:
        key = decode_id(id, record.name)
        async with change(info) as w:
            await w.delete(record, key, expected_version)
        return DeletePayload(deleted_id=id)

    parameters = [("id", strawberry.ID, inspect.Parameter.empty), ("expected_version", int | None, None)]
    return strawberry.mutation(resolver=_resolver(remove, parameters, DeletePayload),
                               **requires(record.access.delete, description))


def restore_field(record: Record) -> Any:
    """``restore<Name>(id:)``: a trashed record back with everything that went with it, links as they
    were (who may delete it may restore it)."""
    kind = object_type(record)
    description = record.description("restore") or (
        f"Brings the {record.label} back from the trash with what went there with it.")

    async def restore(info: Info, id: strawberry.ID) -> Any:
        key = decode_id(id, record.name)
        async with change(info) as w:
            row = await w.restore(record, key)
        return kind.from_row(row)

    return strawberry.mutation(resolver=_resolver(restore, [("id", strawberry.ID, inspect.Parameter.empty)], kind),
                               **requires(record.access.delete, description))


def mutations(record: Record) -> type:
    """A Strawberry type holding the record's derived mutations (create, update, delete, and restore
    for a trashable record)."""
    namespace: dict[str, Any] = {"__annotations__": {}}
    if record.root.create:
        namespace[f"create_{snake(record.name)}"] = create_field(record)
    if record.root.update:
        namespace[f"update_{snake(record.name)}"] = update_field(record)
    if record.root.delete:
        namespace[f"delete_{snake(record.name)}"] = delete_field(record)
        if record.trash:
            namespace[f"restore_{snake(record.name)}"] = restore_field(record)
    return strawberry.type(type(f"{record.name}Mutation", (), namespace))
