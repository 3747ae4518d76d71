"""Custom field values in plans: ``customFields`` and ``customField(key:)`` answered in SQL.

The values are read as the resolvers read them (``schema.custom_fields``): the tenant's live
definitions of the record type, in form order, each with the record's stored value (or null) as
an object of its value type. One correlated subquery over ``custom_field_definitions`` per field;
each definition's object is built by the branch of its type (``CASE``), with the selection the
query makes on that type (fragments, aliases and ``__typename`` as graphql-core collects them), and
a USER value's ``user`` through the member lookup, as any to-one relation.

Field rules (``auth.fields``): a plan reading the value of a custom field hidden from the caller
(``customField(key:)`` of a hidden key, or a value's own fields in ``customFields`` while any key of
the record type is hidden) is not run for that caller: the executor answers, null with FORBIDDEN
(``schema.custom_fields.withheld``), as for a hidden standard field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphql import FieldNode, GraphQLField, GraphQLInterfaceType, GraphQLObjectType, get_named_type
from graphql.execution.collect_fields import FieldDetails, collect_subfields
from graphql.execution.values import get_argument_values
from sqlalchemy import ColumnElement, Text, bindparam, case, cast, func, literal_column, select
from sqlalchemy.dialects.postgresql import JSONB, UUID, aggregate_order_by
from sqlalchemy.sql import type_coerce

from core.errors import AtriumError
from planner import formats
from records.crm import USER
from records.custom import DEFINITIONS, CustomFieldType, check_key, hidden_key, hidden_keys
from records.declare import Record
from schema.custom_fields import COMMON, VALUE_TYPES

if TYPE_CHECKING:
    from planner.plan import Binding, ObjectPlan, PlanContext, Planner

EMPTY: ColumnElement[Any] = literal_column("'[]'::json")
Part = Callable[[Any, Any, Any], ColumnElement[Any]]
"""A piece of a value's object: (definitions row, the record's custom values, binding) -> SQL."""


def _member(name: str) -> Part | None:
    """The SQL of a value type's own field ``name`` (as the type's Python resolver formats it)."""
    def text_of(d: Any, values: Any, b: Any) -> ColumnElement[Any]:
        text: ColumnElement[Any] = values.op("->>")(d.c.key)
        return text

    def json_of(d: Any, values: Any, b: Any) -> ColumnElement[Any]:
        return type_coerce(values.op("->")(d.c.key), JSONB)

    def money(part: str) -> Part:
        def sql(d: Any, values: Any, b: Any) -> ColumnElement[Any]:
            return type_coerce(values.op("->")(d.c.key), JSONB).op("->>")(formats.text(part))
        return sql

    def user_id(d: Any, values: Any, b: Any) -> ColumnElement[Any]:
        return formats.gid("User", values.op("->>")(d.c.key))

    parts: dict[str, Part] = {
        "key": lambda d, values, b: d.c.key, "label": lambda d, values, b: d.c.label,
        "type": lambda d, values, b: func.upper(d.c.type),
        "text": text_of, "number": text_of, "date": text_of, "option": text_of,
        "boolean": json_of, "options": json_of, "amount": money("amount"), "currency": money("currency"),
        "userId": user_id,
    }
    return parts.get(name)


@dataclass
class UserPart:
    """``UserValue.user``: the member the value names, as a to-one relation reads it."""

    target: ObjectPlan

    def __call__(self, d: Any, values: Any, b: Binding) -> ColumnElement[Any]:
        other = USER.query.subquery()
        user_id = cast(values.op("->>")(d.c.key), UUID(as_uuid=True))
        return (select(self.target.json(other, b)).select_from(other).where(other.c.id == user_id)
                .correlate_except(other).scalar_subquery())


@dataclass
class CustomPlan:
    """``customFields`` (a list) or ``customField(key:)`` (one, by a bound key) of ``record``."""

    record: Record
    branches: list[tuple[str, tuple[CustomFieldType, ...], list[tuple[str, Any]]]]
    """Per value type: its GraphQL name, the custom field types it holds, and its selection."""
    field_def: GraphQLField
    node: FieldNode
    param: str
    reads_values: bool
    """The selection reads a value's own fields (not only the definition's key, label and type)."""

    @classmethod
    def build(cls, planner: Planner, record: Record, graphql_field: GraphQLField, group: list[FieldDetails],
              ctx: PlanContext) -> CustomPlan:
        from planner.plan import NotPlannable

        interface = get_named_type(graphql_field.type)
        assert isinstance(interface, GraphQLInterfaceType)
        branches = []
        reads_values = False
        for type_name in dict.fromkeys(cls.__name__ for cls in VALUE_TYPES.values()):
            kind = planner.schema.get_type(type_name)
            assert isinstance(kind, GraphQLObjectType)
            grouped = collect_subfields(planner.schema, ctx.fragments, ctx.variables, ctx.operation, kind, group)
            if grouped.new_defer_usages:
                raise NotPlannable("@defer")
            pieces: list[tuple[str, Any]] = []
            for key, fields in grouped.grouped_field_set.items():
                name = fields[0].node.name.value
                reads_values = reads_values or name not in ("__typename", *COMMON)
                if name == "__typename":
                    pieces.append((key, formats.text(type_name)))
                elif name == "user":
                    named = get_named_type(kind.fields[name].type)
                    assert isinstance(named, GraphQLObjectType)
                    pieces.append((key, UserPart(planner.object(USER, named, fields, ctx))))
                elif (part := _member(name)) is not None:
                    pieces.append((key, part))
                else:
                    raise NotPlannable(name)
            held = tuple(t for t, value_type in VALUE_TYPES.items() if value_type.__name__ == type_name)
            branches.append((type_name, held, pieces))
        return cls(record, branches, graphql_field, group[0].node, ctx.names("custom_key"), reads_values)

    def bind(self, b: Binding) -> None:
        from planner.plan import Fallback

        for _, _, pieces in self.branches:
            for _, piece in pieces:
                if isinstance(piece, UserPart):
                    piece.target.bind(b)
        hidden = b.hidden(self.record.name)
        if not self._is_single():
            if self.reads_values and hidden_keys(hidden):
                raise Fallback  # some values are withheld: the executor's answer
            return
        key = get_argument_values(self.field_def, self.node, b.variables).get("key")
        try:
            b.params[self.param] = check_key("key", key)
        except AtriumError:
            raise Fallback from None
        if hidden_key(key, hidden):
            raise Fallback

    def _is_single(self) -> bool:
        return not _is_list(self.field_def)

    def sql(self, source: Any, b: Binding) -> ColumnElement[Any]:
        d = DEFINITIONS.alias("cfd")
        values = source.c.custom_fields
        whens = []
        for _, held, pieces in self.branches:
            pairs: list[ColumnElement[Any]] = []
            for key, piece in pieces:
                pairs += [formats.text(key), piece if isinstance(piece, ColumnElement) else piece(d, values, b)]
            whens.append((d.c.type.in_([formats.text(t.value) for t in held]), func.json_build_object(*pairs)))
        item = case(*whens)
        where = [d.c.tenant_id == source.c.tenant_id, d.c.record_type == self.record.name, d.c.deleted_at.is_(None)]
        if self._is_single():
            return (select(item).select_from(d).where(*where, d.c.key == bindparam(self.param, type_=Text()))
                    .correlate_except(d).scalar_subquery())
        return (select(func.coalesce(func.json_agg(aggregate_order_by(item, d.c.position, d.c.key)),
                                     EMPTY))
                .select_from(d).where(*where).correlate_except(d).scalar_subquery())


def _is_list(field: GraphQLField) -> bool:
    from graphql import GraphQLList, GraphQLNonNull

    kind = field.type
    if isinstance(kind, GraphQLNonNull):
        kind = kind.of_type
    return isinstance(kind, GraphQLList)
