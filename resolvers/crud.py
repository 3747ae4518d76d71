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

Beside each single mutation, the batch ones (``Root.batch``; ``resolvers.batch`` says what they
guarantee): ``createDeals(input: [DealInput!]!): [Deal!]!``, ``updateDeals(input: [DealUpdate!]!):
[Deal!]!`` (``DealUpdate``: ``id``, ``expectedVersion`` and the patch's fields), ``deleteDeals(input:
[DeleteInput!]!): BatchDeletePayload!`` and, for records with an ``externalId``, ``upsertDeals(input:
[DealUpsert!]!): [DealUpserted!]!`` (``DealUpsert``: the create input with ``externalId`` required and
every optional field left unchanged when not given). ``<plural>Aggregate`` is ``resolvers.aggregates``'.

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
from core.ids import decode_id, to_global_id
from core.limits import MAX_BATCH
from records.custom import SORT_LABEL, CustomFieldValueInput, check_key, member
from records.declare import Children, Create, Direction, Listing, Record, SortKey, camel, ordering, snake
from resolvers import batch
from resolvers.aggregates import aggregate_field
from resolvers.paging import paginate
from resolvers.writes import Change, change
from schema import enums as _enums  # noqa: F401 - registers the enums inputs refer to
from schema.crm import BatchDeletePayload, DeleteInput, DeletePayload
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
    if record.custom_fields:
        fields["custom_fields"] = (list[CustomFieldValueInput] | None, strawberry.field(
            default=None, description=CUSTOM_INPUT))
    return _input(f"{record.name}Input", fields, record.description("input"))


CUSTOM_INPUT = ("Values of the workspace's custom fields (`customFieldDefinitions`); defaults fill those left out, "
                "required ones must be given.")
CUSTOM_PATCH = "Custom field values to set (a value with no member clears its field); others stay as they are."


def custom_patch(record: Record) -> dict[str, tuple[Any, Any]]:
    """The ``customFields`` field of a patch-like input, for records with custom fields."""
    if not record.custom_fields:
        return {}
    return {"custom_fields": (list[CustomFieldValueInput] | None, strawberry.field(
        default=UNSET, description=CUSTOM_PATCH))}


@cache
def patch_type(record: Record) -> type:
    """``<Name>Patch``: the fields that may change, each optional."""
    fields = {f.column: (f.rule.annotation | None, UNSET) for f in record.fields if f.update}
    return _input(f"{record.name}Patch", {**fields, **custom_patch(record)})


@cache
def update_item_type(record: Record) -> type:
    """``<Name>Update``: one record of a batch update, its ``id``, ``expectedVersion`` and the patch."""
    fields: dict[str, tuple[Any, Any]] = {
        "id": (strawberry.ID, inspect.Parameter.empty), "expected_version": (int | None, None),
        **{f.column: (f.rule.annotation | None, UNSET) for f in record.fields if f.update}, **custom_patch(record)}
    return _input(f"{record.name}Update", fields, f"One {record.label} of `update{title(record)}`.")


@cache
def upsert_type(record: Record) -> type:
    """``<Name>Upsert``: the create input (no nested children) with ``externalId`` required; optional
    fields not given keep their value on an existing record (their default on a new one)."""
    fields: dict[str, tuple[Any, Any]] = {"external_id": (str, inspect.Parameter.empty)}
    for f in record.fields:
        if f.column == batch.EXTERNAL_ID or f.create is Create.NEVER:
            continue
        required = f.create is Create.REQUIRED
        fields[f.column] = (f.rule.annotation if required else f.rule.annotation | None,
                            inspect.Parameter.empty if required else UNSET)
    fields.update(custom_patch(record))
    return _input(f"{record.name}Upsert", fields,
                  f"One {record.label} of `upsert{title(record)}`: created, or updated when the workspace has a "
                  f"{record.label} with its `externalId`.")


@cache
def upserted_type(record: Record) -> type:
    """``<Name>Upserted``: a record an upsert wrote and whether it created it."""
    namespace = {"__annotations__": {"record": object_type(record), "created": bool}}
    return strawberry.type(type(f"{record.name}Upserted", (), namespace),
                           description="`created`: the record is new; otherwise it was updated.")


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
    fields: dict[str, tuple[Any, Any]] = {
        "field": (field_enum, default), "direction": (Direction, record.default_direction)}
    if record.custom_fields:
        fields["custom"] = (str | None, strawberry.field(default=None, description=(
            "Order by this custom field's key instead of `field` (records without a value first), then by id.")))
    order = _input(f"{record.name}Order", fields)
    return field_enum, order


def sort_key_of(record: Record, order: Any, keys: dict[str, SortKey], tenant_id: Any) -> SortKey:
    """The sort key an ``orderBy`` asks for (a declared ordering, or a custom field's)."""
    custom = getattr(order, "custom", None)
    if custom is not None:
        return record.custom_sort_key(check_key("orderBy.custom", custom), tenant_id)
    return keys[order.field.name]


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
        filters = vars(filter) if filter else None
        custom = getattr(order, "custom", None)
        record.refuse_hidden(session.hidden(record.name), session.principal.role.value, filters=filters,
                             sort=order.field.name if custom is None else None, custom_sort=custom)
        key = sort_key_of(record, order, keys, session.tenant_id)
        query = record.listing_query(session.tenant_id, filters, session.hidden)
        if key.label == SORT_LABEL:
            query = query.add_columns(key.expression.label(SORT_LABEL))
        page = await paginate(
            session.db, query, record.table.c.id, key, kind.from_row,
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
    if record.aggregation is not None:
        namespace[f"{record.plural}_aggregate"] = aggregate_field(record, filter_type(record))
    return strawberry.type(type(f"{record.name}Query", (), namespace))


# ---- mutations ------------------------------------------------------------------------------------

def title(record: Record) -> str:
    """The record's plural as in root field names (``deal_line_items`` -> ``DealLineItems``)."""
    return "".join(part.title() for part in record.plural.split("_"))


Nested = list[tuple[Children, list[dict[str, Any]]]]


def refuse_hidden_input(info: Info, record: Record, given: dict[str, Any], *, patch: bool = False) -> None:
    """FORBIDDEN naming the first input field that writes a field hidden from the caller's role
    (``auth.fields``): a create's given values (null is not given), a patch's every field given, and
    every custom field the input's ``customFields`` names (a value with no member clears it: writing)."""
    session = info.context.session
    written = [column for column, value in given.items() if record.has(column) and value is not UNSET
               and (patch or value is not None)]
    custom = given.get("custom_fields")
    keys = [member(item, "key") for item in custom] if isinstance(custom, list) else []
    record.refuse_hidden(session.hidden(record.name), session.principal.role.value, columns=written,
                         custom_keys=keys)


def create_values(record: Record, given: Any, info: Info) -> tuple[dict[str, Any], Nested]:
    """The validated values of one create input, and of its nested children."""
    refuse_hidden_input(info, record, vars(given))
    values = record.create_values(vars(given))
    children: Nested = []
    for spec in record.children:
        if not spec.nested:
            continue
        items = getattr(given, spec.name)
        if len(items) > spec.maximum:
            raise BadUserInput(spec.name, f"at most {spec.maximum} {spec.name}")
        children.append((spec, [spec.relation.owner.create_values(vars(item), prefix=f"{spec.name}.{i}.")
                                for i, item in enumerate(items)]))
    return values, children


async def create_children(w: Change, parent: Any, children: Nested) -> None:
    for spec, items in children:
        for i, item in enumerate(items):
            await w.create(spec.relation.owner, {**item, spec.relation.key: parent.id}, prefix=f"{spec.name}.{i}.")


async def parent_key(w: Change, record: Record, arguments: dict[str, Any]) -> tuple[str, Any] | None:
    """For a record with ``Root.parent``: its key column and the parent's key (locked; NOT_FOUND naming it)."""
    if record.root.parent is None:
        return None
    parent = record.relation(record.root.parent)
    key = decode_id(arguments[parent.key], parent.target().name, field=camel(parent.key))
    await w.require(parent.target(), key, field=camel(parent.key), lock=True)
    return parent.key, key


def parent_parameters(record: Record) -> list[tuple[str, Any, Any]]:
    if record.root.parent is None:
        return []
    return [(record.relation(record.root.parent).key, strawberry.ID, inspect.Parameter.empty)]


def create_field(record: Record) -> Any:
    """``create<Name>(input:)`` (and the parent's id first, for a record with ``Root.parent``)."""
    kind = object_type(record)

    async def create(info: Info, input: Any, **arguments: Any) -> Any:
        values, children = create_values(record, input, info)
        async with change(info) as w:
            if (parent := await parent_key(w, record, arguments)) is not None:
                values[parent[0]] = parent[1]
            row = await w.create(record, values)
            await create_children(w, row, children)
        return kind.from_row(row)

    parameters = [*parent_parameters(record), ("input", input_type(record), inspect.Parameter.empty)]
    return strawberry.mutation(resolver=_resolver(create, parameters, kind),
                               **requires(record.access.create, record.description("create")))


def update_field(record: Record) -> Any:
    """``update<Name>(id:, input:, expectedVersion:)``."""
    kind = object_type(record)

    async def update(info: Info, id: strawberry.ID, input: Any, expected_version: int | None = None) -> Any:
        key = decode_id(id, record.name)
        refuse_hidden_input(info, record, vars(input), patch=True)
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


# ---- batch mutations (resolvers.batch) ----------------------------------------------------------

BATCH = (f"At most {MAX_BATCH}, all or none: an error names the record as `input.<index>.<field>` "
         "(and `extensions.index`).")


def create_many_field(record: Record) -> Any:
    """``create<Plural>(input: [<Name>Input!]!)`` (the parent's id first, for ``Root.parent``)."""
    kind = object_type(record)

    async def create_many(info: Info, input: list[Any], **arguments: Any) -> list[Any]:
        batch.bounded(input)
        values: list[dict[str, Any]] = []
        children: list[Nested] = []
        for i, given in enumerate(input):
            with batch.item(i):
                one, nested = create_values(record, given, info)
            values.append(one)
            children.append(nested)
        async with change(info) as w:
            if (parent := await parent_key(w, record, arguments)) is not None:
                for one in values:
                    one[parent[0]] = parent[1]
            rows = await batch.create_many(w, record, values)
            for i, (row, nested) in enumerate(zip(rows, children, strict=True)):
                with batch.item(i):
                    await create_children(w, row, nested)
        return [kind.from_row(row) for row in rows]

    parameters = [*parent_parameters(record), ("input", list[input_type(record)],  # type: ignore[misc]
                                               inspect.Parameter.empty)]
    return strawberry.mutation(resolver=_resolver(create_many, parameters, list[kind]),  # type: ignore[valid-type]
                               **requires(record.access.create, f"Create {record.plural_label}. {BATCH}"))


def update_many_field(record: Record) -> Any:
    """``update<Plural>(input: [<Name>Update!]!)``."""
    kind = object_type(record)

    async def update_many(info: Info, input: list[Any]) -> list[Any]:
        batch.bounded(input)
        changes: list[tuple[Any, dict[str, Any], int | None]] = []
        for i, given in enumerate(input):
            with batch.item(i):
                refuse_hidden_input(info, record, vars(given), patch=True)
                changes.append((decode_id(given.id, record.name), record.patch_values(vars(given)),
                                given.expected_version))
        async with change(info) as w:
            rows = await batch.update_many(w, record, changes)
        return [kind.from_row(row) for row in rows]

    parameters = [("input", list[update_item_type(record)], inspect.Parameter.empty)]  # type: ignore[misc]
    return strawberry.mutation(resolver=_resolver(update_many, parameters, list[kind]),  # type: ignore[valid-type]
                               **requires(record.access.update, f"Update {record.plural_label}. {BATCH}"))


def delete_many_field(record: Record) -> Any:
    """``delete<Plural>(input: [DeleteInput!]!)``: each as ``delete<Name>`` (dependents as declared)."""

    async def delete_many(info: Info, input: list[DeleteInput]) -> BatchDeletePayload:
        batch.bounded(input)
        targets: list[tuple[Any, int | None]] = []
        for i, given in enumerate(input):
            with batch.item(i):
                targets.append((decode_id(given.id, record.name), given.expected_version))
        async with change(info) as w:
            rows = await batch.delete_many(w, record, targets)
        return BatchDeletePayload(deleted_ids=[strawberry.ID(to_global_id(record.name, row.id)) for row in rows])

    parameters = [("input", list[DeleteInput], inspect.Parameter.empty)]
    return strawberry.mutation(resolver=_resolver(delete_many, parameters, BatchDeletePayload),
                               **requires(record.access.delete, f"Delete {record.plural_label}. {BATCH}"))


def upsert_many_field(record: Record) -> Any:
    """``upsert<Plural>(input: [<Name>Upsert!]!)``: by ``externalId``, created or updated."""
    kind = object_type(record)
    payload = upserted_type(record)
    defaults = {f.column: f.default for f in record.fields if f.create is Create.OPTIONAL and f.default is not None}

    async def upsert_many(info: Info, input: list[Any]) -> list[Any]:
        batch.bounded(input)
        items: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for i, given in enumerate(input):
            with batch.item(i):
                stated = {k: v for k, v in vars(given).items() if v is not UNSET}
                refuse_hidden_input(info, record, stated, patch=True)
                values = record.create_values({**defaults, **stated})
                if values.get(batch.EXTERNAL_ID) is None:
                    raise BadUserInput(camel(batch.EXTERNAL_ID), "must not be empty")
                items.append((values, record.patch_values(stated)))
        async with change(info) as w:
            written = await batch.upsert_many(w, record, items)
        return [payload(record=kind.from_row(row), created=created) for row, created in written]

    parameters = [("input", list[upsert_type(record)], inspect.Parameter.empty)]  # type: ignore[misc]
    return strawberry.mutation(resolver=_resolver(upsert_many, parameters, list[payload]),  # type: ignore[valid-type]
                               **requires(record.access.update,
                                          f"Create or update {record.plural_label} by `externalId`. {BATCH}"))


def batch_fields(record: Record) -> dict[str, Any]:
    """The record's batch mutations by Python name (module docstring), as its ``Root`` allows."""
    root = record.root
    if not root.batch:
        return {}
    fields: dict[str, Any] = {}
    if root.create:
        fields[f"create_{record.plural}"] = create_many_field(record)
    if root.update:
        fields[f"update_{record.plural}"] = update_many_field(record)
    if root.delete:
        fields[f"delete_{record.plural}"] = delete_many_field(record)
    # An upsert creates and updates: derived where one permission allows both.
    if (root.create and root.update and root.parent is None and record.has(batch.EXTERNAL_ID)
            and record.access.create is record.access.update):
        fields[f"upsert_{record.plural}"] = upsert_many_field(record)
    return fields


def batch_mutations(record: Record) -> type:
    """A Strawberry type holding only the record's batch mutations (for records whose single
    mutations are placed by hand, like deals')."""
    return strawberry.type(type(f"{record.name}BatchMutation", (), {"__annotations__": {}, **batch_fields(record)}))


def mutations(record: Record) -> type:
    """A Strawberry type holding the record's derived mutations (create, update, delete, restore for a
    trashable record, then the batches)."""
    namespace: dict[str, Any] = {"__annotations__": {}}
    if record.root.create:
        namespace[f"create_{snake(record.name)}"] = create_field(record)
    if record.root.update:
        namespace[f"update_{snake(record.name)}"] = update_field(record)
    if record.root.delete:
        namespace[f"delete_{snake(record.name)}"] = delete_field(record)
        if record.trash:
            namespace[f"restore_{snake(record.name)}"] = restore_field(record)
    namespace.update(batch_fields(record))
    return strawberry.type(type(f"{record.name}Mutation", (), namespace))
