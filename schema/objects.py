"""Object types of declared records: built from rows, relations read through the session's loaders.

A record's object type is written by hand (it is the API) as ``class Deal(RecordObject, record=DEAL)``
with its scalar fields as plain attributes named after their columns; its relation fields come from
the declaration: ``company: Company | None = to_one(DEAL, "company")`` and
``activities: list[Activity] = children(DEAL, "activities")``. So ``Deal.company`` is declared once,
in ``records.crm``, and every reader (the field, prefetching, node lookup, the write path) uses that.

``from_row`` is derived per type: every plain field is copied from the row's column of its name,
``id`` becomes the global ID, and the row stays on the object (``row``) for the relation fields.

Prefetching: ``prefetch(info, objects, path)`` loads, for a page or list of objects, every relation
the query selects on them (through fragments and aliases, honouring ``@skip``/``@include``) with the
same batched loader statements the fields would have run, and hands the results to the objects. The
relation fields then answer synchronously, which saves graphql-core a coroutine per field and a task
per list item (the 50-deal dashboard serves about 1.4x the requests).
"""

from __future__ import annotations

import asyncio
import enum
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import strawberry
from strawberry.types.nodes import SelectedField, Selection

from auth.roles import Permission
from auth.session import Info
from core.errors import BadUserInput, HiddenField
from core.ids import to_global_id
from records.declare import Children, Record, ToOne, camel

T = TypeVar("T", bound="RecordObject")

MISSING = object()
SQL = "atrium.sql"
"""Field metadata key: how to compute a computed field in SQL, ``(source) -> column expression``
(the planner pushes such a field down; without it the field runs its resolver)."""
GUARDED = "atrium.guarded"
"""Field metadata key of a restrictable field (``guarded``): its column (the planner reads it as a
column, and falls back to the executor when the caller may not see it)."""


@dataclass(frozen=True)
class Planned:
    """What a root field's resolver answers, for the planner (``planner``): ``kind`` is
    ``connection``, ``list`` or ``get`` of ``record``, or ``node`` (any record by global ID)."""

    kind: str
    record: Record | None
    permission: Permission


def planned(resolver: Callable[..., Any], kind: str, record: Record | None, permission: Permission) -> None:
    """Mark ``resolver`` as answering ``kind`` (it must behave exactly as the plan does)."""
    resolver.planned = Planned(kind, record, permission)  # type: ignore[attr-defined]


@strawberry.interface(description="An object with a globally unique, opaque ID.")
class Node:
    id: strawberry.ID
    row: strawberry.Private[Any]
    """The database row the object was built from (relations read their keys from it)."""


class RecordObject:
    """Base of the object type of a declared record (module docstring)."""

    record: ClassVar[Record]
    _types: ClassVar[dict[str, type[RecordObject]]] = {}
    _build: ClassVar[Callable[[Any], Any] | None]

    def __init_subclass__(cls, record: Record | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if record is not None:
            cls.record = record
            cls._build = None
            RecordObject._types[record.name] = cls

    @classmethod
    def from_row(cls: type[T], row: Any) -> T:
        build = cls.__dict__.get("_build")
        if build is None:
            build = cls._build = _builder(cls)
        return build(row)  # type: ignore[no-any-return]

    @staticmethod
    def type_of(record: Record) -> type[RecordObject]:
        """The object type of ``record``."""
        return RecordObject._types[record.name]

    @staticmethod
    def type_named(name: str) -> type[RecordObject] | None:
        """The object type of the record called ``name`` (a global ID's type), if it has one."""
        return RecordObject._types.get(name)


def _builder(cls: type[RecordObject]) -> Callable[[Any], Any]:
    definition = cls.__strawberry_definition__  # type: ignore[attr-defined]
    name = cls.record.name
    plain: list[tuple[str, Callable[[Any], Any] | None]] = []
    for f in definition.fields:
        if f.base_resolver is not None or f.python_name in ("id", "row"):
            continue
        plain.append((f.python_name, enum_of(f)))

    def build(row: Any) -> Any:
        obj = object.__new__(cls)
        fields = obj.__dict__
        fields["id"] = to_global_id(name, row.id)
        fields["row"] = row
        for attr, convert in plain:
            value = getattr(row, attr)
            fields[attr] = convert(value) if convert is not None and value is not None else value
        return obj

    return build


def enum_of(field: Any) -> type[enum.Enum] | None:
    """The Python enum a Strawberry field's values belong to, if they are enum values."""
    kind = field.type_annotation.resolve() if field.type_annotation else None
    return next((t for t in _unwrap(kind) if isinstance(t, type) and issubclass(t, enum.Enum)), None)


def _unwrap(kind: Any) -> Iterator[Any]:
    yield kind
    if (wrapped := getattr(kind, "wrapped_cls", None)) is not None:  # an enum's definition
        yield wrapped
    of_type = getattr(kind, "of_type", None)
    if of_type is not None:
        yield from _unwrap(of_type)


async def load(info: Info, record: Record, key: uuid.UUID | None) -> Any:
    """The object of ``record`` ``key`` through the session's loaders; None without a key or a row."""
    if key is None:
        return None
    row = await info.context.session.loaders.one(record).load(key)
    return RecordObject.type_of(record).from_row(row) if row is not None else None


# ---- restrictable fields (auth.fields) -------------------------------------------------------------

def guarded(record: Record, column: str, description: str | None = None) -> Any:
    """The field of ``record``'s restrictable ``column`` (declared ``Field(..., restrictable=True)``;
    nullable in the object type): its value, or null with FORBIDDEN naming it when a field rule of
    the tenant hides it from the caller's role."""
    spec = record.field(column)
    if not spec.restrictable:
        raise TypeError(f"{record.name}.{column} is not declared restrictable")
    name, kind = spec.name, record.name

    def resolve(self: Node, info: Info) -> Any:
        session = info.context.session
        if name in session.hidden(kind):
            raise HiddenField(name, kind, name, session.principal.role.value)
        return getattr(self.row, column)

    return strawberry.field(resolver=resolve, description=description, metadata={GUARDED: column})


# ---- relation fields ------------------------------------------------------------------------------

class Relation:
    """A relation field of an object type: to one record, or a list of children."""

    def __init__(self, record: Record, name: str) -> None:
        self.record = record
        self.name = name
        self.to_one: ToOne | None = next((r for r in record.relations if r.name == name), None)
        self.children: Children | None = None if self.to_one else record.child_list(name)

    def first_of(self, arguments: dict[str, Any]) -> int | None:
        """The ``first`` a selection asks for (None when outside the allowed range)."""
        spec = self.children
        assert spec is not None
        if not spec.first_argument:
            return spec.maximum
        first = as_int(arguments.get("first", spec.first))
        return first if first is not None and 0 <= first <= spec.maximum else None

    async def load_one(self, info: Info, key: uuid.UUID) -> Any:
        relation = self.to_one
        assert relation is not None
        return await load(info, relation.target(), key)

    async def load_children(self, info: Info, parent: uuid.UUID, first: int, *, nested: bool) -> list[Any]:
        spec = self.children
        assert spec is not None
        rows = await info.context.session.loaders.many(spec, first).load(parent)
        build = RecordObject.type_of(spec.relation.owner).from_row
        objects = [build(row) for row in rows]
        if nested:
            await prefetch(info, objects, ())
        return objects


def to_one(record: Record, name: str) -> Any:
    """The field of ``record``'s to-one relation ``name`` (nullable or not as the field's type says)."""
    relation = Relation(record, name)
    spec = relation.to_one
    assert spec is not None
    key = spec.key

    def resolve(self: Node, info: Info) -> Any:
        prefetched = self.__dict__.get("prefetched")
        if prefetched is not None and (value := prefetched.get(name, MISSING)) is not MISSING:
            return value
        target_id = getattr(self.row, key)
        if target_id is None:
            return None
        return relation.load_one(info, target_id)

    return strawberry.field(resolver=_marked(relation, resolve), description=spec.description)


def children(record: Record, name: str) -> Any:
    """The list field of ``record``'s children ``name`` (``first`` as declared, bounds checked)."""
    relation = Relation(record, name)
    spec = relation.children
    assert spec is not None

    def listed(self: Node, info: Info, first: int) -> Any:
        prefetched = self.__dict__.get("prefetched")
        if prefetched is not None and (value := prefetched.get((name, first), MISSING)) is not MISSING:
            return value
        if not 0 <= first <= spec.maximum:
            raise BadUserInput("first", f"must be between 0 and {spec.maximum}")
        return relation.load_children(info, self.row.id, first, nested=True)

    if spec.first_argument:
        default = spec.first

        def resolve(self: Node, info: Info, first: int = default) -> Any:
            return listed(self, info, first)
    else:
        def resolve(self: Node, info: Info) -> Any:  # type: ignore[misc]
            return listed(self, info, spec.maximum)

    return strawberry.field(resolver=_marked(relation, resolve), description=spec.description)


def _marked(relation: Relation, resolve: Callable[..., Any]) -> Callable[..., Any]:
    """``resolve`` carrying its relation (Strawberry calls it as the field's resolver)."""
    resolve.relation = relation  # type: ignore[attr-defined]
    return resolve


# ---- prefetching ----------------------------------------------------------------------------------

def included(field: SelectedField) -> bool:
    directives = field.directives
    return not directives.get("skip", {}).get("if", False) and directives.get("include", {}).get("if", True)


def fields_of(selections: Iterable[Selection]) -> Iterator[SelectedField]:
    """The fields of one selection set, fragments flattened, skipped ones left out."""
    for selection in selections:
        if isinstance(selection, SelectedField):
            if included(selection):
                yield selection
        else:
            yield from fields_of(selection.selections)


def selected_under(info: Info, path: Sequence[str]) -> list[SelectedField]:
    """Fields selected under ``path`` (``("edges", "node")`` for a connection, ``()`` for a list)
    of the field being resolved."""
    fields = [field for root in info.selected_fields for field in fields_of(root.selections)]
    for name in path:
        fields = [field for parent in fields if parent.name == name for field in fields_of(parent.selections)]
    return fields


def as_int(value: object) -> int | None:
    """An Int argument as Strawberry's selection reports it: a variable's value is an int, a literal
    is the text of its token."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def relation_of(field: Any) -> Relation | None:
    resolver = getattr(field, "base_resolver", None)
    return getattr(resolver.wrapped_func, "relation", None) if resolver is not None else None


async def prefetch(info: Info, objects: Sequence[Any], path: Sequence[str]) -> None:
    """Load the relations selected on ``objects`` (all of one type, found at ``path`` under the field
    being resolved) and hand them to the objects (module docstring). Lists of several parents
    resolved together share the loaders' batches, so a board of five stages costs one statement per
    relation, not five."""
    if not objects:
        return
    wanted = plan(relations_of(type(objects[0])), selected_under(info, path))
    if wanted:
        await asyncio.gather(*(_attach(info, objects, key, relation, first)
                               for key, (relation, first) in wanted.items()))


def plan(relations: dict[str, Relation], selected: Iterable[SelectedField]) -> dict[Any, tuple[Relation, int | None]]:
    """What to load ahead for ``selected`` fields: to-one relations by field name, child lists by
    ``(name, first)``; a ``first`` outside its bounds is left to the field, which reports it."""
    wanted: dict[Any, tuple[Relation, int | None]] = {}
    for field in selected:
        relation = relations.get(field.name)
        if relation is None:
            continue
        if relation.to_one is not None:
            wanted[field.name] = (relation, None)
        elif (first := relation.first_of(field.arguments)) is not None:
            wanted[(field.name, first)] = (relation, first)
    return wanted


def relations_of(cls: type) -> dict[str, Relation]:
    """GraphQL field name -> relation, for the relation fields of an object type."""
    found: dict[str, Relation] | None = cls.__dict__.get("_relation_fields")
    if found is None:
        definition = cls.__strawberry_definition__  # type: ignore[attr-defined]
        found = {f.graphql_name or camel(f.python_name): relation for f in definition.fields
                 if (relation := relation_of(f)) is not None}
        cls._relation_fields = found  # type: ignore[attr-defined]
    return found


async def _attach(info: Info, objects: Sequence[Any], key: Any, relation: Relation, first: int | None) -> None:
    loaders = info.context.session.loaders
    if relation.to_one is not None:
        spec = relation.to_one
        target = spec.target()
        keys = list({k for obj in objects if (k := getattr(obj.row, spec.key)) is not None})
        rows = await loaders.one(target).load_many(keys)
        build = RecordObject.type_of(target).from_row
        built = {k: build(row) if row is not None else None for k, row in zip(keys, rows, strict=True)}
        for obj in objects:
            k = getattr(obj.row, spec.key)
            obj.__dict__.setdefault("prefetched", {})[key] = built.get(k) if k is not None else None
        return
    children_spec = relation.children
    assert children_spec is not None and first is not None
    lists = await loaders.many(children_spec, first).load_many([obj.row.id for obj in objects])
    make = RecordObject.type_of(children_spec.relation.owner).from_row
    for obj, children_rows in zip(objects, lists, strict=True):
        obj.__dict__.setdefault("prefetched", {})[key] = [make(row) for row in children_rows]
