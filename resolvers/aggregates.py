"""``<plural>Aggregate(filter:, groupBy:, first:)``: counts and measures per group, in one SQL statement.

Derived from the record's ``Aggregation`` (``records.crm``): ``dealsAggregate(filter: DealFilter,
groupBy: [DealGroupBy!]! = [], first: Int = 100): DealAggregate!``. The records counted are exactly
those the record's list would return for the same ``filter`` (``Record.filtered``: the same filters,
the same explicit tenant filter, in the request's tenant transaction under RLS). Without ``groupBy``
there is one group: the totals.

The statement groups the filtered rows by the chosen keys and the money measures' currency, then
groups those by the keys alone, folding each currency's count, sum, average, minimum and maximum
into arrays (ordered by currency): so an amount is never summed across currencies, and the group's
``count`` is every record of it. Groups come largest first (then by their keys), at most ``first``
(1 to ``MAX_GROUPS``); ``groupCount`` says how many there are in all.

Cost: ``first`` sizes ``groups`` in the cost estimate like a page (``schema.cost``).
"""

from __future__ import annotations

import inspect
from decimal import Decimal
from typing import Any

import strawberry
from sqlalchemy import ColumnElement, func, literal_column, select
from sqlalchemy.dialects.postgresql import aggregate_order_by

from auth.roles import requires
from auth.session import Info
from core.errors import BadUserInput, HiddenField
from core.limits import DEFAULT_GROUPS, MAX_GROUPS
from records.declare import Aggregation, Group, HiddenOf, Record, camel, nothing_hidden
from records.rules import Choice
from schema.aggregates import MoneyAggregate, NumberAggregate, aggregate_type, build_group, group_by_enum
from schema.objects import selected_under

CENT = Decimal("0.01")
NUMBER_PLACES = Decimal("0.0001")


def statement(record: Record, aggregation: Aggregation, tenant_id: Any, bound: dict[str, Any],
              chosen: list[Group], first: int, hidden: HiddenOf = nothing_hidden) -> Any:
    """The one SELECT of an aggregate (module docstring); its parameters are ``bound``."""
    rows = record.filtered(tenant_id, bound, hidden=hidden).subquery("r")
    keys = [group.expression(rows).label(f"k{i}") for i, group in enumerate(chosen)]
    currencies = list(dict.fromkeys(m.currency for m in aggregation.measures if m.currency))
    assert len(currencies) <= 1, "money measures of one record share one currency column"
    currency = [rows.c[currencies[0]].label("c")] if currencies else []
    inner_columns: list[ColumnElement[Any]] = [*keys, *currency, func.count().label("n")]
    for j, measure in enumerate(aggregation.measures):
        column = rows.c[measure.column]
        inner_columns += [func.count(column).label(f"n{j}"), func.sum(column).label(f"s{j}"),
                          func.min(column).label(f"lo{j}"), func.max(column).label(f"hi{j}")]
        if measure.currency:
            inner_columns.append(func.round(func.avg(column), 2).label(f"a{j}"))
    inner = select(*inner_columns).group_by(*keys, *currency).subquery("g")
    outer_keys = [inner.c[f"k{i}"] for i in range(len(chosen))]
    columns: list[ColumnElement[Any]] = [*outer_keys, func.sum(inner.c.n).label("records"),
                                         func.count().over().label("groups")]
    for j, measure in enumerate(aggregation.measures):
        if measure.currency:
            by_currency = inner.c.c
            columns += [func.array_agg(aggregate_order_by(inner.c[f"{part}{j}"] if part else by_currency,
                                                          by_currency)).label(f"{part or 'c'}{j}")
                        for part in ("", "n", "s", "a", "lo", "hi")]
        else:
            columns += [func.sum(inner.c[f"n{j}"]).label(f"n{j}"), func.sum(inner.c[f"s{j}"]).label(f"s{j}"),
                        func.min(inner.c[f"lo{j}"]).label(f"lo{j}"), func.max(inner.c[f"hi{j}"]).label(f"hi{j}")]
    return (select(*columns).group_by(*outer_keys)
            .order_by(literal_column("records").desc(), *outer_keys).limit(first))


def measures_of(aggregation: Aggregation, row: Any) -> dict[str, Any]:
    """The measure fields of one result row."""
    out: dict[str, Any] = {}
    for j, measure in enumerate(aggregation.measures):
        m = row._mapping
        if measure.currency:
            parts = [m[f"{p}{j}"] or [] for p in ("c", "n", "s", "a", "lo", "hi")]
            out[measure.column] = [
                MoneyAggregate(currency=c, count=int(n), sum=s, avg=a, min=lo, max=hi)
                for c, n, s, a, lo, hi in zip(*parts, strict=True)]
        else:
            count, total = int(m[f"n{j}"] or 0), m[f"s{j}"]
            average = (Decimal(total) / count).quantize(NUMBER_PLACES) if count else None
            out[measure.column] = NumberAggregate(
                count=count, sum=Decimal(total) if total is not None else None, avg=average,
                min=Decimal(m[f"lo{j}"]) if m[f"lo{j}"] is not None else None,
                max=Decimal(m[f"hi{j}"]) if m[f"hi{j}"] is not None else None)
    return out


def key_value(record: Record, group: Group, value: Any) -> Any:
    """A group's key as its field shows it: a ``Choice`` column's value as its enum member."""
    rule = record.field(group.column).rule if record.has(group.column) and not group.month else None
    return rule.annotation(value) if isinstance(rule, Choice) and value is not None else value


def refuse_hidden(info: Info, record: Record, aggregation: Aggregation, chosen: list[Group],
                  filters: dict[str, Any] | None) -> None:
    """FORBIDDEN naming the first filter, group (``groupBy``) or selected measure (``groups.<measure>``)
    that reads a field hidden from the caller's role (``auth.fields``)."""
    session = info.context.session
    hidden, role = session.hidden(record.name), session.principal.role.value
    if not hidden:
        return
    record.refuse_hidden(hidden, role, filters=filters)
    for group in chosen:
        if camel(group.column) in hidden:
            raise HiddenField("groupBy", record.name, camel(group.column), role)
    selected = {field.name for field in selected_under(info, ("groups",))}
    for measure in aggregation.measures:
        if measure.name in selected and measure.name in hidden:
            raise HiddenField(f"groups.{measure.name}", record.name, measure.name, role)


def aggregate_field(record: Record, filter_input: type | None) -> Any:
    """``<plural>Aggregate`` (module docstring); ``filter_input``: the record's filter type."""
    aggregation = record.aggregation
    assert aggregation is not None
    result = aggregate_type(record)
    by = {group.name: group for group in aggregation.groups}
    group_enum = group_by_enum(record)

    async def aggregate(info: Info, filter: Any = None, group_by: list[Any] | None = None,
                        first: int = DEFAULT_GROUPS) -> Any:
        if not 1 <= first <= MAX_GROUPS:
            raise BadUserInput("first", f"must be between 1 and {MAX_GROUPS}")
        chosen = [by[value.value] for value in dict.fromkeys(group_by or [])]
        session = info.context.session
        filters = vars(filter) if filter else None
        refuse_hidden(info, record, aggregation, chosen, filters)
        bound = record.bind_filters(filters)
        rows = await session.db.fetch(statement(record, aggregation, session.tenant_id, bound, chosen, first,
                                                session.hidden), bound)
        groups = []
        for row in rows:
            values: dict[str, Any] = {"count": int(row.records or 0), **measures_of(aggregation, row)}
            keys: dict[str, Any] = {}
            for i, group in enumerate(chosen):
                value = row._mapping[f"k{i}"]
                relation = record.relation_by_key(group.column)
                if relation is not None:
                    keys[relation.name] = value
                else:
                    values[group.field_name] = key_value(record, group, value)
            groups.append(build_group(record, values, keys))
        return result(group_count=rows[0].groups if rows else 0, groups=groups)

    parameters: list[tuple[str, Any, Any]] = []
    if filter_input is not None:
        parameters.append(("filter", filter_input | None, None))
    parameters += [("group_by", list[group_enum], ()), ("first", int, DEFAULT_GROUPS)]  # type: ignore[valid-type]
    signature = inspect.Signature([
        inspect.Parameter("info", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Info),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
          for name, annotation, default in parameters)], return_annotation=result)
    aggregate.__signature__ = signature  # type: ignore[attr-defined]
    measured = "".join(f", {m.name}" for m in aggregation.measures)
    return strawberry.field(resolver=aggregate, **requires(
        record.access.read, f"Count{measured} of the {record.plural_label} matching `filter`, per group of the "
        f"fields in `groupBy` (largest groups first, at most `first`, up to {MAX_GROUPS}); money per currency."))
