"""Plans: the record fields of a query compiled once into one SQL statement that returns their JSON.

A ``Plan`` is built once per validated document, operation and value of the variables its
``@skip``/``@include`` directives read (``planner.cache``). It walks the operation's root fields with
graphql-core's own field collection (aliases, fragments, directives, field merging as the executor
sees them). A root field is *planned* when its resolver says what it answers (``schema.objects.
planned``: a record's connection, list or single record, or ``node``) and every field of its
selection is table data: a column of the record (formatted in SQL as the API formats it,
``planner.formats``), a declared to-one relation or child list (``schema.objects.to_one`` and
``children``), a computed field with SQL of its own (``schema.objects.SQL``) or ``__typename``.
Other root fields run through the executor as before; their answers are merged in place.

At request time (``Plan.bind``) each planned root field reads its arguments exactly as the
executor would (graphql-core's ``get_argument_values``), validates them with the declarations'
own rules (filters, sizes, cursors, ids) and the caller's permission, and contributes parameter
values and a *shape* (which optional filters and cursors are present). Anything the executor would
answer with an error (a bad argument, a missing permission) makes the whole operation go to the
executor instead (``Fallback``), so errors are always the executor's own. The SQL of a shape is
compiled once (SQLAlchemy, asyncpg's dialect) and cached; every value is a bind parameter.

The statement selects one JSON value per planned root field, built by PostgreSQL
(``json_build_object``/``json_agg`` over correlated subqueries): nothing of it is decoded in
Python. It runs in the request's tenant transaction as the application role, with the explicit
tenant filter on every table as well as RLS.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    FieldNode,
    GraphQLEnumType,
    GraphQLField,
    GraphQLNamedType,
    GraphQLObjectType,
    GraphQLSchema,
    OperationDefinitionNode,
    get_named_type,
)
from graphql.execution.collect_fields import FieldDetails, FragmentDetails, collect_fields, collect_subfields
from graphql.execution.values import VariableValues, get_argument_values
from sqlalchemy import ColumnElement, Select, Table, Text, bindparam, cast, func, literal_column, select, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.sql import visitors
from sqlalchemy.sql.elements import ClauseElement

from auth.principal import Principal
from auth.roles import allows
from core.errors import AtriumError
from core.ids import decode_id, parse_global_id
from models.loaders import TENANT
from planner import formats
from planner.custom import CustomPlan
from records.crm import BY_NAME
from records.custom import check_key
from records.declare import (
    Children,
    Direction,
    HiddenOf,
    Listing,
    Record,
    Search,
    SortKey,
    ToOne,
    camel,
    nothing_hidden,
    param,
)
from resolvers.paging import DEFAULT_PAGE, decode_cursor
from schema.custom_fields import CUSTOM
from schema.objects import GUARDED, SQL, Planned, RecordObject, enum_of, relation_of

DIALECT: Any = postgresql.asyncpg.dialect()  # type: ignore[no-untyped-call]
MAX_KEYS = 50
"""``json_build_object`` takes at most 100 arguments: a selection of more keys runs through the executor."""
EMPTY: ColumnElement[Any] = literal_column("'[]'::json")


class NotPlannable(Exception):
    """At plan time: this root field runs through the executor."""


class Fallback(Exception):
    """At request time: this operation runs through the executor (which reports what is wrong)."""


@dataclass
class Binding:
    """One request's values for a plan: parameters by name, and the shape of each node."""

    variables: VariableValues
    principal: Principal
    max_page: int
    hidden: HiddenOf = nothing_hidden
    """The caller's hidden fields (``auth.fields``): a plan reading one is not run (``Fallback``)."""
    params: dict[str, Any] = field(default_factory=dict)
    shape: dict[int, Hashable] = field(default_factory=dict)


class Names:
    """Unique names for the bind parameters and CTEs of one plan."""

    def __init__(self) -> None:
        self._next = itertools.count()

    def __call__(self, stem: str) -> str:
        return f"p{next(self._next)}_{stem}"


# ---- object selections ----------------------------------------------------------------------------

Column = Callable[[Any], ColumnElement[Any]]
"""A field's SQL over a source (a FROM clause with the record's columns)."""


@dataclass
class ObjectPlan:
    """The JSON object of one record for a selection: ``(response key, field plan)`` in order."""

    record: Record
    fields: list[tuple[str, Any]]

    def json(self, source: Any, b: Binding) -> ColumnElement[Any]:
        pairs: list[ColumnElement[Any]] = []
        for key, plan in self.fields:
            pairs += [formats.text(key), plan.sql(source, b)]
        return func.json_build_object(*pairs)

    def bind(self, b: Binding) -> None:
        for _, plan in self.fields:
            plan.bind(b)


@dataclass
class Leaf:
    column: Column

    def sql(self, source: Any, b: Binding) -> ColumnElement[Any]:
        return self.column(source)

    def bind(self, b: Binding) -> None:
        pass


@dataclass
class ToOnePlan:
    relation: ToOne
    target: ObjectPlan

    def sql(self, source: Any, b: Binding) -> ColumnElement[Any]:
        record = self.relation.target()
        other = record.query.subquery()
        return (select(self.target.json(other, b)).select_from(other)
                .where(other.c[record.key.name] == source.c[self.relation.key]).correlate_except(other)
                .scalar_subquery())

    def bind(self, b: Binding) -> None:
        self.target.bind(b)


@dataclass
class ChildrenPlan:
    spec: Children
    item: ObjectPlan
    field_def: GraphQLField
    node: FieldNode
    limit: str
    """The parameter holding ``first``."""
    id: int

    def bind(self, b: Binding) -> None:
        if self.spec.first_argument:
            first = get_argument_values(self.field_def, self.node, b.variables).get("first", self.spec.first)
            if not isinstance(first, int) or not 0 <= first <= self.spec.maximum:
                raise Fallback
        else:
            first = self.spec.maximum
        b.params[self.limit] = first
        self.item.bind(b)

    def sql(self, source: Any, b: Binding) -> ColumnElement[Any]:
        child = self.spec.relation.owner
        rows = child.query.subquery()
        order = [(rows.c[s.lstrip("-")], s.startswith("-")) for s in self.spec.order]
        labels = [f"o{i}" for i in range(len(order))]
        columns = (c.label(n) for (c, _), n in zip(order, labels, strict=True))
        # Correlated to the parent's row (an outer query level, so no LATERAL is needed).
        inner = (select(self.item.json(rows, b).label("j"), *columns)
                 .select_from(rows).where(rows.c[self.spec.relation.key] == source.c.id).correlate_except(rows)
                 .order_by(*(c.desc() if desc else c.asc() for c, desc in order))
                 .limit(bindparam(self.limit)).subquery())
        ordered = [inner.c[n].desc() if desc else inner.c[n].asc() for (_, desc), n in zip(order, labels, strict=True)]
        return select(func.coalesce(func.json_agg(aggregate_order_by(inner.c.j, *ordered)), EMPTY)) \
            .select_from(inner).scalar_subquery()


@dataclass
class GuardedLeaf:
    """A restrictable field's column: not planned for a caller it is hidden from (the executor then
    answers null with FORBIDDEN at its path)."""

    record: Record
    name: str
    column: Column

    def sql(self, source: Any, b: Binding) -> ColumnElement[Any]:
        return self.column(source)

    def bind(self, b: Binding) -> None:
        if self.name in b.hidden(self.record.name):
            raise Fallback


def constant(value: str) -> Column:
    def column(source: Any) -> ColumnElement[Any]:
        return formats.text(value)
    return column


def global_id(type_name: str) -> Column:
    def column(source: Any) -> ColumnElement[Any]:
        return formats.gid(type_name, source.c.id)
    return column


class Planner:
    """Builds the plans of one schema (the graphql-core schema and its Strawberry root types)."""

    def __init__(self, schema: GraphQLSchema, roots: dict[str, Any], name_converter: Any) -> None:
        self.schema = schema
        self.roots = roots  # GraphQL root type name -> Strawberry root type
        self.names = name_converter

    # -- objects ------------------------------------------------------------------------------------

    def object(self, record: Record, kind: GraphQLObjectType, details: list[FieldDetails],
               ctx: PlanContext) -> ObjectPlan:
        cls = RecordObject.type_named(kind.name)
        if cls is None or cls.record is not record:
            raise NotPlannable(kind.name)
        strawberry_fields = {self.names.get_graphql_name(f): f for f in cls.__strawberry_definition__.fields}  # type: ignore[attr-defined]
        grouped = collect_subfields(self.schema, ctx.fragments, ctx.variables, ctx.operation, kind, details)
        if grouped.new_defer_usages or len(grouped.grouped_field_set) > MAX_KEYS:
            raise NotPlannable("@defer or too many fields")
        fields: list[tuple[str, Any]] = []
        for key, group in grouped.grouped_field_set.items():
            name = group[0].node.name.value
            if name == "__typename":
                fields.append((key, Leaf(constant(kind.name))))
                continue
            graphql_field = kind.fields[name]
            sfield = strawberry_fields.get(name)
            if sfield is None:
                raise NotPlannable(name)
            fields.append((key, self.field(record, graphql_field, sfield, group, ctx)))
        return ObjectPlan(record, fields)

    def field(self, record: Record, graphql_field: GraphQLField, sfield: Any, group: list[FieldDetails],
              ctx: PlanContext) -> Any:
        relation = relation_of(sfield)
        if relation is not None:
            named = get_named_type(graphql_field.type)
            assert isinstance(named, GraphQLObjectType)
            if relation.to_one is not None:
                return ToOnePlan(relation.to_one, self.object(relation.to_one.target(), named, group, ctx))
            spec = relation.children
            assert spec is not None
            return ChildrenPlan(spec, self.object(spec.relation.owner, named, group, ctx), graphql_field,
                                group[0].node, ctx.names("first"), next(ctx.ids))
        if (column := sfield.metadata.get(GUARDED)) is not None:
            return GuardedLeaf(record, camel(column), self.leaf(sfield, graphql_field))
        custom = sfield.metadata.get(CUSTOM)
        if custom is not None:
            return CustomPlan.build(self, custom, graphql_field, group, ctx)
        if sfield.base_resolver is not None:
            computed = sfield.metadata.get(SQL)
            if computed is None:
                raise NotPlannable(sfield.python_name)
            return Leaf(computed)
        if sfield.python_name == "id":
            return Leaf(global_id(record.name))
        return Leaf(self.leaf(sfield, graphql_field))

    @staticmethod
    def leaf(sfield: Any, graphql_field: GraphQLField) -> Column:
        column: str = sfield.python_name
        named: GraphQLNamedType = get_named_type(graphql_field.type)
        if isinstance(named, GraphQLEnumType):
            members = enum_of(sfield)
            if members is None:
                raise NotPlannable(named.name)
            return lambda s: formats.enum_name(s.c[column], members)
        format_of: dict[str, Callable[[ColumnElement[Any]], ColumnElement[Any]]] = {
            "DateTime": formats.instant, "Date": formats.day, "Decimal": formats.decimal,
        }
        if named.name in format_of:
            return lambda s: format_of[named.name](s.c[column])
        if named.name in ("String", "Int", "Boolean", "ID", "Float"):
            return lambda s: s.c[column]
        raise NotPlannable(named.name)

    # -- operations ---------------------------------------------------------------------------------

    def plan(self, operation: OperationDefinitionNode, fragments: dict[str, FragmentDetails],
             variables: VariableValues) -> Plan:
        root_type = self.schema.query_type
        assert root_type is not None
        ctx = PlanContext(fragments, variables, operation, Names(), itertools.count())
        grouped = collect_fields(self.schema, fragments, variables, root_type, operation)
        strawberry_fields = {self.names.get_graphql_name(f): f
                             for f in self.roots[root_type.name].__strawberry_definition__.fields}
        roots: list[RootPlan | str] = []
        for key, group in grouped.grouped_field_set.items():
            name = group[0].node.name.value
            sfield = strawberry_fields.get(name)
            spec: Planned | None = getattr(getattr(sfield, "base_resolver", None), "wrapped_func", None) and \
                getattr(sfield.base_resolver.wrapped_func, "planned", None)  # type: ignore[union-attr]
            try:
                if spec is None or grouped.new_defer_usages:
                    raise NotPlannable(name)
                roots.append(self.root(key, spec, root_type.fields[name], group, ctx))
            except NotPlannable:
                roots.append(key)
        return Plan(roots, [[d.node for d in g] for g in grouped.grouped_field_set.values()],
                    list(grouped.grouped_field_set))

    def root(self, key: str, spec: Planned, graphql_field: GraphQLField, group: list[FieldDetails],
             ctx: PlanContext) -> RootPlan:
        node = group[0].node
        named = get_named_type(graphql_field.type)
        assert isinstance(named, GraphQLObjectType) or spec.kind == "node"
        record = spec.record
        if spec.kind == "get":
            assert record is not None and isinstance(named, GraphQLObjectType)
            return GetPlan(key, spec, graphql_field, node, ctx.names("id"), self.object(record, named, group, ctx))
        if spec.kind == "list":
            assert record is not None and isinstance(named, GraphQLObjectType)
            return ListPlan(key, spec, graphql_field, node, self.object(record, named, group, ctx))
        if spec.kind == "node":
            return NodePlan(key, spec, graphql_field, node, ctx.names("id"), self, group, ctx)
        assert record is not None and isinstance(named, GraphQLObjectType)
        return ConnectionPlan.build(self, key, spec, graphql_field, node, named, group, ctx)


@dataclass
class PlanContext:
    fragments: dict[str, FragmentDetails]
    variables: VariableValues
    operation: OperationDefinitionNode
    names: Names
    ids: Any


# ---- root fields ----------------------------------------------------------------------------------

@dataclass
class RootPlan:
    key: str
    spec: Planned
    field_def: GraphQLField
    node: FieldNode

    def permitted(self, b: Binding) -> None:
        if not allows(b.principal.role, self.spec.permission):
            raise Fallback

    def arguments(self, b: Binding) -> dict[str, Any]:
        return get_argument_values(self.field_def, self.node, b.variables)

    def bind(self, b: Binding) -> None:
        raise NotImplementedError

    def sql(self, b: Binding) -> ColumnElement[Any]:
        raise NotImplementedError


@dataclass
class GetPlan(RootPlan):
    param: str
    item: ObjectPlan

    def bind(self, b: Binding) -> None:
        self.permitted(b)
        record = self.spec.record
        assert record is not None
        try:
            b.params[self.param] = decode_id(self.arguments(b)["id"], record.name)
        except AtriumError:
            raise Fallback from None
        self.item.bind(b)

    def sql(self, b: Binding) -> ColumnElement[Any]:
        record = self.spec.record
        assert record is not None
        rows = record.query.subquery()
        return select(self.item.json(rows, b)).select_from(rows).where(
            rows.c[record.key.name] == bindparam(self.param, type_=rows.c[record.key.name].type)).scalar_subquery()


@dataclass
class ListPlan(RootPlan):
    item: ObjectPlan

    def bind(self, b: Binding) -> None:
        self.permitted(b)
        self.item.bind(b)

    def sql(self, b: Binding) -> ColumnElement[Any]:
        record = self.spec.record
        assert record is not None and record.root.listing is Listing.LIST
        rows = record.query.subquery()
        columns = [*(s.column for s in record.sorts if s.name == record.default_sort), "id"]
        inner = (select(self.item.json(rows, b).label("j"), *(rows.c[c].label(f"o{i}") for i, c in enumerate(columns)))
                 .select_from(rows).order_by(*(rows.c[c] for c in columns)).limit(record.root.limit).subquery())
        return select(func.coalesce(func.json_agg(aggregate_order_by(
            inner.c.j, *(inner.c[f"o{i}"] for i in range(len(columns))))), EMPTY)).select_from(inner).scalar_subquery()


class NodePlan(RootPlan):
    """``node(id:)``: the object plan of the id's type, made when a type is first asked for."""

    def __init__(self, key: str, spec: Planned, field_def: GraphQLField, node: FieldNode, param: str,
                 planner: Planner, group: list[FieldDetails], ctx: PlanContext) -> None:
        super().__init__(key, spec, field_def, node)
        self.param = param
        self.planner = planner
        self.group = group
        self.ctx = ctx
        self.items: dict[str, ObjectPlan | None] = {}
        self.id = next(ctx.ids)

    def item(self, type_name: str) -> ObjectPlan | None:
        if type_name not in self.items:
            kind = self.planner.schema.get_type(type_name)
            record = BY_NAME.get(type_name)
            try:
                if not isinstance(kind, GraphQLObjectType) or record is None:
                    raise NotPlannable(type_name)
                self.items[type_name] = self.planner.object(record, kind, self.group, self.ctx)
            except NotPlannable:
                self.items[type_name] = None
        return self.items[type_name]

    def bind(self, b: Binding) -> None:
        self.permitted(b)
        try:
            type_name, key = parse_global_id(self.arguments(b)["id"])
        except AtriumError:
            raise Fallback from None
        item = self.item(type_name) if RecordObject.type_named(type_name) is not None else None
        if item is None:
            raise Fallback
        b.params[self.param] = key
        b.shape[self.id] = type_name
        item.bind(b)

    def sql(self, b: Binding) -> ColumnElement[Any]:
        type_name = b.shape[self.id]
        assert isinstance(type_name, str)
        item = self.items[type_name]
        assert item is not None
        record = item.record
        rows = record.query.subquery()
        return select(item.json(rows, b)).select_from(rows).where(
            rows.c[record.key.name] == bindparam(self.param, type_=rows.c[record.key.name].type)).scalar_subquery()


class ConnectionPlan(RootPlan):
    """``<plural>(filter:, orderBy:, first:, after:, last:, before:)`` with keyset cursors: one CTE of
    the page (in the order the rows are scanned, with their row numbers), read by every part of the
    selection."""

    def __init__(self, key: str, spec: Planned, field_def: GraphQLField, node: FieldNode, names: Names,
                 node_id: int) -> None:
        super().__init__(key, spec, field_def, node)
        record = spec.record
        assert record is not None
        self.record = record
        self.keys = record.sort_keys()
        self.id = node_id
        self.prefix = names("")
        self.limit = names("limit")
        self.size = names("size")
        self.cursor_value = names("cursor_value")
        self.cursor_id = names("cursor_id")
        self.page_name = names("page")
        self.parts: list[tuple[str, Any]] = []
        self.filter_names = {camel(f.python_name): f.python_name for f in record.filter_fields()}

    @classmethod
    def build(cls, planner: Planner, key: str, spec: Planned, field_def: GraphQLField, node: FieldNode,
              kind: GraphQLObjectType, group: list[FieldDetails], ctx: PlanContext) -> ConnectionPlan:
        plan = cls(key, spec, field_def, node, ctx.names, next(ctx.ids))
        grouped = collect_subfields(planner.schema, ctx.fragments, ctx.variables, ctx.operation, kind, group)
        if grouped.new_defer_usages:
            raise NotPlannable("@defer")
        for part_key, part in grouped.grouped_field_set.items():
            name = part[0].node.name.value
            if name == "__typename":
                plan.parts.append((part_key, ("typename", kind.name)))
            elif name == "totalCount":
                plan.parts.append((part_key, ("count", None)))
            elif name in ("edges", "nodes", "pageInfo"):
                sub = get_named_type(kind.fields[name].type)
                assert isinstance(sub, GraphQLObjectType)
                if name == "nodes":
                    plan.parts.append((part_key, ("nodes", planner.object(plan.record, sub, part, ctx))))
                    continue
                inner = collect_subfields(planner.schema, ctx.fragments, ctx.variables, ctx.operation, sub, part)
                if inner.new_defer_usages:
                    raise NotPlannable("@defer")
                pieces: list[tuple[str, Any]] = []
                for inner_key, inner_part in inner.grouped_field_set.items():
                    inner_name = inner_part[0].node.name.value
                    if inner_name == "node":
                        node_type = get_named_type(sub.fields["node"].type)
                        assert isinstance(node_type, GraphQLObjectType)
                        pieces.append((inner_key, ("node", planner.object(plan.record, node_type, inner_part, ctx))))
                    else:
                        pieces.append((inner_key, (inner_name, sub.name)))
                plan.parts.append((part_key, (name, pieces)))
            else:
                raise NotPlannable(name)
        return plan

    def bind(self, b: Binding) -> None:
        self.permitted(b)
        args = self.arguments(b)
        first, last, after, before = (args.get(n) for n in ("first", "last", "after", "before"))
        if first is not None and last is not None:
            raise Fallback
        for given_size in (first, last):
            if given_size is not None and not 0 <= given_size <= b.max_page:
                raise Fallback
        order = args.get("order_by") or args.get("orderBy") or {}
        sort = order.get("field")
        sort_name: str | None = sort.name if isinstance(sort, enum.Enum) else self.record.default_sort
        if order.get("custom") is not None:
            try:
                sort_name = CUSTOM_SORT + check_key("orderBy.custom", order["custom"])
            except AtriumError:
                raise Fallback from None
        direction = order.get("direction") or self.record.default_direction
        if not isinstance(direction, Direction) or sort_name is None or (
                sort_name not in self.keys and not custom_sort(sort_name)):
            raise Fallback
        key = self.sort_key_named(sort_name)
        backward = last is not None
        size: int = last if last is not None else (first if first is not None else DEFAULT_PAGE)
        given = args.get("filter") or {}
        filters = {self.filter_names.get(k, k): v for k, v in given.items()}
        hidden = b.hidden(self.record.name)
        try:
            self.record.refuse_hidden(hidden, b.principal.role.value, filters=filters,
                                      sort=None if custom_sort(sort_name) else sort_name,
                                      custom_sort=sort_name.removeprefix(CUSTOM_SORT) if custom_sort(sort_name)
                                      else None)
            bound = self.record.bind_filters(filters)
            cursors = {}
            for name, cursor in (("after", after), ("before", before)):
                if cursor is not None:
                    cursors[name] = decode_cursor(key, cursor, name)
        except AtriumError:
            raise Fallback from None
        if len(cursors) > 1:
            raise Fallback  # both bounds: the executor's answer, not planned
        if any(isinstance(f, Search) and f.skips(self.record, b.hidden) for f in self.record.filters) \
                and param("search") in bound:
            raise Fallback  # a search that leaves out hidden columns: the executor's
        for name, value in bound.items():
            b.params[self.prefix + name] = value
        b.params[self.limit] = size + 1
        b.params[self.size] = size
        for value, row_id in cursors.values():
            b.params[self.cursor_value], b.params[self.cursor_id] = value, row_id
        b.shape[self.id] = (frozenset(bound), sort_name, direction is Direction.DESC, backward,
                            next(iter(cursors), None))
        for _, (kind, payload) in self.parts:
            if kind == "nodes":
                payload.bind(b)
            elif kind == "edges":
                for _, (inner_kind, inner) in payload:
                    if inner_kind == "node":
                        inner.bind(b)

    def sql(self, b: Binding) -> ColumnElement[Any]:
        shape = b.shape[self.id]
        assert isinstance(shape, tuple)
        bound, sort_name, descending, backward, cursor = shape
        key: SortKey = self.sort_key_named(sort_name)
        record = self.record
        table = record.table
        tenant = bindparam(TENANT.key, type_=table.c.tenant_id.type)
        query: Select[Any] = record.filtered(tenant, bound, self.prefix)
        if custom_sort(sort_name):
            query = query.add_columns(key.expression.label(key.label))
        expression, ids = key.expression, table.c.id
        if cursor is not None:
            point = tuple_(bindparam(self.cursor_value, type_=expression.type),
                           bindparam(self.cursor_id, type_=ids.type))
            later = (cursor == "after") != descending
            sort = tuple_(expression, ids)
            query = query.where(sort > point if later else sort < point)
        ascending = descending == backward
        scan = (expression.asc(), ids.asc()) if ascending else (expression.desc(), ids.desc())
        # The page first (ORDER BY ... LIMIT: a top-N sort, or an index read that stops early), then
        # its rows numbered: numbering every matching row before the limit sorted them all (a
        # custom field's ordering of 100,000 deals, where no index gives the order).
        first = query.order_by(*scan).limit(bindparam(self.limit)).subquery(f"{self.page_name}_rows")
        value = first.c[key.label]
        numbered = (value.asc(), first.c.id.asc()) if ascending else (value.desc(), first.c.id.desc())
        page = select(first, func.row_number().over(order_by=numbered).label("rn")).cte(self.page_name)
        size: Any = bindparam(self.size)
        output_order = page.c.rn.desc() if backward else page.c.rn.asc()
        within = page.c.rn <= size
        more = select(func.coalesce(func.max(page.c.rn), 0) > size).scalar_subquery()
        pairs: list[ColumnElement[Any]] = []
        for part_key, (kind, payload) in self.parts:
            pairs.append(formats.text(part_key))
            if kind == "typename":
                pairs.append(formats.text(payload))
            elif kind == "count":
                counted = record.filtered(tenant, bound, self.prefix).subquery()
                pairs.append(select(func.count()).select_from(counted).scalar_subquery())
            elif kind == "nodes":
                pairs.append(self._aggregate(payload.json(page, b), page, output_order, within))
            elif kind == "edges":
                edge: list[ColumnElement[Any]] = []
                for inner_key, (inner_kind, inner) in payload:
                    edge.append(formats.text(inner_key))
                    if inner_kind == "node":
                        edge.append(inner.json(page, b))
                    elif inner_kind == "cursor":
                        edge.append(formats.cursor(key, page.c[key.label], page.c.id))
                    else:
                        edge.append(formats.text(inner))  # __typename
                pairs.append(self._aggregate(func.json_build_object(*edge), page, output_order, within))
            else:  # pageInfo
                info: list[ColumnElement[Any]] = []
                for inner_key, (inner_kind, type_name) in payload:
                    info.append(formats.text(inner_key))
                    if inner_kind == "hasNextPage":
                        info.append(more if not backward else literal_column("true" if cursor == "before" else "false"))
                    elif inner_kind == "hasPreviousPage":
                        info.append(more if backward else literal_column("true" if cursor == "after" else "false"))
                    elif inner_kind in ("startCursor", "endCursor"):
                        first_out = (inner_kind == "startCursor") != backward
                        info.append(select(formats.cursor(key, page.c[key.label], page.c.id)).where(within)
                                    .order_by(page.c.rn.asc() if first_out else page.c.rn.desc()).limit(1)
                                    .scalar_subquery())
                    else:
                        info.append(formats.text(type_name))  # __typename
                pairs.append(func.json_build_object(*info))
        return select(func.json_build_object(*pairs)).scalar_subquery()

    def sort_key_named(self, sort_name: str) -> SortKey:
        """A declared ordering's sort key, or a custom field's (``custom:<key>``)."""
        if custom_sort(sort_name):
            tenant = bindparam(TENANT.key, type_=self.record.table.c.tenant_id.type)
            return self.record.custom_sort_key(sort_name.removeprefix(CUSTOM_SORT), tenant)
        return self.keys[sort_name]

    @staticmethod
    def _aggregate(item: ColumnElement[Any], page: Any, order: Any, within: Any) -> ColumnElement[Any]:
        return select(func.coalesce(func.json_agg(aggregate_order_by(item, order)).filter(within), EMPTY)) \
            .select_from(page).scalar_subquery()


CUSTOM_SORT = "custom:"


def custom_sort(sort_name: str) -> bool:
    return sort_name.startswith(CUSTOM_SORT)


# ---- the plan of an operation ---------------------------------------------------------------------

READS_THROUGH_POLICY = {"users": ("memberships",), "deals": ("record_visibility", "team_members"),
                        "deal_line_items": ("deals", "record_visibility"), "notes": ("deals", "record_visibility")}
"""Tables whose row-level security policy reads another table: a user is visible while a membership
of the tenant names them (migration 0001), a deal while its type's audience and its owner's teams
allow (migration 0016; tests/test_rls.py checks this against the catalog)."""


@dataclass
class Compiled:
    sql: str
    names: tuple[str, ...]
    constants: dict[str, Any]
    """Values of the statement's own bind parameters (literals of computed fields)."""
    tables: tuple[str, ...]
    """Every table the statement reads, directly or through a policy (what its answer depends on)."""


class Plan:
    """The plans of one operation's root fields (a ``str``: the response key of a field the executor answers)."""

    def __init__(self, roots: list[RootPlan | str], nodes: list[list[FieldNode]], keys: list[str]) -> None:
        self.roots = roots
        self.planned = [r for r in roots if isinstance(r, RootPlan)]
        self.fallback_keys = {r for r in roots if isinstance(r, str)}
        self.all_nodes = nodes
        self.keys = keys
        self._compiled: dict[Hashable, Compiled] = {}

    def bind(self, variables: VariableValues, principal: Principal, max_page: int,
             hidden: HiddenOf = nothing_hidden) -> Binding:
        b = Binding(variables, principal, max_page, hidden)
        b.params[TENANT.key] = principal.tenant_id
        b.params.update(principal.view.params())  # the caller's record-level view (``Record.visible``)
        for root in self.planned:
            root.bind(b)
        return b

    def compiled(self, b: Binding) -> Compiled:
        shape = tuple(sorted(b.shape.items()))
        found = self._compiled.get(shape)
        if found is None:
            # As text: the driver connection may decode json (SQLAlchemy installs a codec); text it passes on.
            statement = select(*(cast(root.sql(b), Text).label(f"r{i}") for i, root in enumerate(self.planned)))
            compiled = statement.compile(dialect=DIALECT)
            found = Compiled(compiled.string, tuple(compiled.positiontup or ()),
                             {k: v for k, v in compiled.params.items() if v is not None}, tables_of(statement))
            if len(self._compiled) < 64:
                self._compiled[shape] = found
        return found

    def arguments(self, compiled: Compiled, b: Binding) -> list[Any]:
        params, constants = b.params, compiled.constants
        return [params[name] if name in params else constants[name] for name in compiled.names]



def tables_of(statement: ClauseElement) -> tuple[str, ...]:
    """The tables ``statement`` reads (in any subquery, CTE or alias), and those their policies read."""
    direct = {element.name for element in visitors.iterate(statement) if isinstance(element, Table)}
    return tuple(sorted(direct.union(*(READS_THROUGH_POLICY.get(name, ()) for name in direct))))
