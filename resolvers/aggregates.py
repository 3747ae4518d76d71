"""``<plural>Aggregate(filter:, groupBy:, first:)``: counts and measures per group, in one SQL statement.

Derived from the record's ``Aggregation`` (``records.crm``): ``dealsAggregate(filter: DealFilter,
groupBy: [DealGroupBy!]! = [], groupByCustom: [String!]! = [], measureCustom: [String!]! = [],
first: Int = 100): DealAggregate!``. The records counted are exactly those the record's list would
return for the same ``filter`` (``Record.filtered``: the same filters, the same explicit tenant
filter, the same record visibility, in the request's tenant transaction under RLS). Without
``groupBy`` there is one group: the totals. ``groupByCustom`` and ``measureCustom`` (records with
``custom_fields`` only) name custom fields by key: grouped by their value (``records.custom.
GROUPABLE`` types) and measured (``MEASURABLE``) like a declared ``Group`` and ``Measure``.

The statement computes, per filtered row, the group keys, each money measure's currency and each
measure's value; groups those rows by the keys and the currencies (one count, sum, minimum and
maximum per measure); turns each such group into one row per measure (a lateral ``VALUES`` list:
the measure, its currency, its count, sum, minimum, maximum) and groups them by the keys, the
measure and the currency; and groups those by the keys alone, folding each measure's plain count,
sum, minimum and maximum, and each currency's count, sum, average, minimum and maximum into arrays
(ordered by currency): so an amount is never summed across currencies, declared or custom, and the
group's ``count`` is every record of it. Groups come largest first (then by
their keys), at most ``first`` (1 to ``MAX_GROUPS``); ``groupCount`` says how many there are in all.
With custom keys the same statement also reads their live definitions (``records.custom.described``)
and counts nothing unless every key has one of a fitting type; the answer is BAD_USER_INPUT naming
the key then (another tenant's key, a deleted definition's, a text field...).

Field rules: a filter, group or measure reading a field hidden from the caller's role is FORBIDDEN
(``refuse_hidden``), a custom field named ``custom.<key>`` (``records.custom.rule_name``).

Cost: ``first`` sizes ``groups`` in the cost estimate like a page (``schema.cost``); ``customField``
and ``customMeasure`` are object fields of each group.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import strawberry
from sqlalchemy import (
    ColumnElement,
    Integer,
    Numeric,
    String,
    func,
    literal,
    literal_column,
    null,
    select,
    true,
    values,
)
from sqlalchemy import column as sql_column
from sqlalchemy.dialects.postgresql import aggregate_order_by

from auth.roles import requires
from auth.session import Info
from core.errors import BadUserInput, HiddenField
from core.limits import DEFAULT_GROUPS, MAX_GROUPS
from records.custom import (
    GROUPABLE,
    MAX_GROUP_KEYS,
    MAX_MEASURE_KEYS,
    MEASURABLE,
    CustomFieldType,
    CustomGroup,
    CustomMeasure,
    Described,
    asked_keys,
    check_described,
    described,
    either,
    read_described,
)
from records.declare import Aggregation, Group, HiddenOf, Measure, Record, camel, nothing_hidden
from records.rules import Choice
from schema.aggregates import (
    CustomFieldAggregate,
    MoneyAggregate,
    NumberAggregate,
    aggregate_type,
    build_group,
    group_by_enum,
)
from schema.custom_fields import CustomFieldValue, typed
from schema.objects import selected_under

CENT = Decimal("0.01")
NUMBER_PLACES = Decimal("0.0001")
MONEY_PARTS = ("c", "n", "s", "a", "lo", "hi")
"""The per-currency arrays of a money measure (currency, count, sum, average, minimum, maximum)."""

AnyGroup = Group | CustomGroup
AnyMeasure = Measure | CustomMeasure


def statement(record: Record, aggregation: Aggregation, tenant_id: Any, bound: dict[str, Any],
              chosen: Sequence[AnyGroup], first: int, hidden: HiddenOf = nothing_hidden,
              custom_measures: Sequence[CustomMeasure] = ()) -> Any:
    """The one SELECT of an aggregate (module docstring); the filters' parameters are ``bound``.
    ``chosen``: the groups (declared and custom); the measures are the declared ones, then
    ``custom_measures``. With custom keys its first column, ``described``, holds their definitions
    and a row of nulls stands for no group at all."""
    measures: list[AnyMeasure] = [*aggregation.measures, *custom_measures]
    customs = [g for g in chosen if isinstance(g, CustomGroup)] + list(custom_measures)
    query = record.filtered(tenant_id, bound, hidden=hidden)
    rows = query.where(*(c.live(record.name, tenant_id) for c in customs)).subquery("r")
    # Each money measure's currency: one column per currency column (declared measures share theirs)
    # or custom field (its own); a plain number has none.
    slots: dict[Any, int] = {}
    currencies: list[ColumnElement[Any]] = []
    slot_of: list[int | None] = []
    for measure in measures:
        slot = measure.currency if isinstance(measure, Measure) else measure
        if not measure.money:
            slot_of.append(None)
            continue
        if slot not in slots:
            slots[slot] = len(currencies)
            currencies.append(measure.currency_of(rows).label(f"c{len(currencies)}"))
        slot_of.append(slots[slot])
    # The values each record contributes, computed once per row; OFFSET 0 keeps PostgreSQL from
    # folding this into the grouping (it would carry the whole JSONB through a sort and guess the
    # groups too many to hash).
    narrow = select(*(group.expression(rows).label(f"k{i}") for i, group in enumerate(chosen)), *currencies,
                    *(m.value(rows).label(f"v{j}") for j, m in enumerate(measures))).offset(0).subquery("x")
    keys = [narrow.c[f"k{i}"] for i in range(len(chosen))]
    by_currency = [narrow.c[f"c{s}"] for s in range(len(currencies))]
    first_level: list[ColumnElement[Any]] = [*keys, *by_currency, func.count().label("n")]
    for j in range(len(measures)):
        v = narrow.c[f"v{j}"]
        first_level += [func.count(v).label(f"nv{j}"), func.sum(v).label(f"s{j}"), func.min(v).label(f"lo{j}"),
                        func.max(v).label(f"hi{j}")]
    grouped = select(*first_level).group_by(*keys, *by_currency).subquery("g1")
    if measures:
        # One row per group, measure and currency: the first level's rows are few, each gives one
        # row per measure (a lateral VALUES list), grouped again without the other measures' currencies.
        long = values(*(sql_column(name, kind) for name, kind in (
            ("j", Integer), ("c", String), ("n", Numeric), ("nv", Numeric), ("s", Numeric), ("lo", Numeric),
            ("hi", Numeric))), name="m").data([
                (j, grouped.c[f"c{slot}"] if slot is not None else null(), grouped.c.n, grouped.c[f"nv{j}"],
                 grouped.c[f"s{j}"], grouped.c[f"lo{j}"], grouped.c[f"hi{j}"]) for j, slot in enumerate(slot_of)
            ]).lateral()
        level_keys = [grouped.c[f"k{i}"] for i in range(len(chosen))]
        inner = (select(*level_keys, long.c.j, long.c.c, func.sum(long.c.n).label("n"),
                        func.sum(long.c.nv).label("nv"), func.sum(long.c.s).label("s"),
                        func.min(long.c.lo).label("lo"), func.max(long.c.hi).label("hi"))
                 .select_from(grouped.join(long, true())).group_by(*level_keys, long.c.j, long.c.c).subquery("g"))
        records: ColumnElement[Any] = func.sum(inner.c.n).filter(inner.c.j == literal(0))
    else:
        inner = grouped
        records = func.sum(inner.c.n)
    outer_keys = [inner.c[f"k{i}"] for i in range(len(chosen))]
    columns: list[ColumnElement[Any]] = [*outer_keys, records.label("records"), func.count().over().label("groups")]
    for j, measure in enumerate(measures):
        of_measure = inner.c.j == literal(j)
        if measure.plain:
            plain = (of_measure, inner.c.c.is_(None))
            columns += [func.sum(inner.c.nv).filter(*plain).label(f"n{j}"),
                        func.sum(inner.c.s).filter(*plain).label(f"s{j}"),
                        func.min(inner.c.lo).filter(*plain).label(f"lo{j}"),
                        func.max(inner.c.hi).filter(*plain).label(f"hi{j}")]
        if measure.money:
            money = (of_measure, inner.c.c.is_not(None))
            average = func.round(inner.c.s / func.nullif(inner.c.nv, 0), 2)
            parts = {"c": inner.c.c, "n": inner.c.nv, "s": inner.c.s, "a": average, "lo": inner.c.lo, "hi": inner.c.hi}
            columns += [func.array_agg(aggregate_order_by(parts[part], inner.c.c)).filter(*money).label(f"m{part}{j}")
                        for part in MONEY_PARTS]
    aggregate = (select(*columns).group_by(*outer_keys)
                 .order_by(literal_column("records").desc(), *outer_keys).limit(first))
    if not customs:
        return aggregate
    definitions = described(record.name, tenant_id, [c.parameter for c in customs]).label("described")
    found = select(definitions).subquery("d")
    groups = aggregate.subquery("a")
    return (select(found.c.described, *(c for c in groups.c))
            .select_from(found.outerjoin(groups, true()))
            .order_by(groups.c.records.desc(), *(groups.c[f"k{i}"] for i in range(len(chosen)))))


def number_aggregate(m: Any, j: int) -> NumberAggregate:
    count, total = int(m[f"n{j}"] or 0), m[f"s{j}"]
    average = (Decimal(total) / count).quantize(NUMBER_PLACES) if count else None
    return NumberAggregate(count=count, sum=Decimal(total) if total is not None else None, avg=average,
                           min=Decimal(m[f"lo{j}"]) if m[f"lo{j}"] is not None else None,
                           max=Decimal(m[f"hi{j}"]) if m[f"hi{j}"] is not None else None)


def money_aggregates(m: Any, j: int) -> list[MoneyAggregate]:
    parts = [m[f"m{part}{j}"] or [] for part in MONEY_PARTS]
    return [MoneyAggregate(currency=c, count=int(n), sum=Decimal(s), avg=Decimal(a), min=Decimal(lo), max=Decimal(hi))
            for c, n, s, a, lo, hi in zip(*parts, strict=True)]


def measures_of(aggregation: Aggregation, row: Any) -> dict[str, Any]:
    """The declared measure fields of one result row."""
    m = row._mapping
    return {measure.column: money_aggregates(m, j) if measure.money else number_aggregate(m, j)
            for j, measure in enumerate(aggregation.measures)}


def custom_measures_of(aggregation: Aggregation, custom_measures: Sequence[CustomMeasure],
                       found: dict[str, Described], row: Any) -> dict[str, CustomFieldAggregate]:
    """The custom measures of one result row (after the declared ones), by key."""
    m = row._mapping
    out: dict[str, CustomFieldAggregate] = {}
    for j, measure in enumerate(custom_measures, start=len(aggregation.measures)):
        definition = found[measure.key]
        is_money = definition.type is CustomFieldType.MONEY
        out[measure.key] = CustomFieldAggregate(
            key=definition.key, label=definition.label, type=definition.type,
            number=None if is_money else number_aggregate(m, j), money=money_aggregates(m, j) if is_money else None)
    return out


def key_value(record: Record, group: Group, value: Any) -> Any:
    """A group's key as its field shows it: a ``Choice`` column's value as its enum member."""
    rule = record.field(group.column).rule if record.has(group.column) and not group.month else None
    return rule.annotation(value) if isinstance(rule, Choice) and value is not None else value


def refuse_hidden(info: Info, record: Record, aggregation: Aggregation, chosen: Sequence[AnyGroup],
                  filters: dict[str, Any] | None, custom_measures: Sequence[CustomMeasure] = ()) -> None:
    """FORBIDDEN naming the first filter, group (``groupBy``, ``groupByCustom.<key>``), selected measure
    (``groups.<measure>``) or custom measure (``measureCustom.<key>``) that reads a field hidden from the
    caller's role (``auth.fields``; a custom field as ``custom.<key>``, ``records.custom.rule_name``)."""
    session = info.context.session
    hidden, role = session.hidden(record.name), session.principal.role.value
    if not hidden:
        return
    record.refuse_hidden(hidden, role, filters=filters)
    for group in chosen:
        if isinstance(group, CustomGroup):
            record.refuse_hidden_custom(hidden, role, group.key, f"groupByCustom.{group.key}")
        elif camel(group.column) in hidden:
            raise HiddenField("groupBy", record.name, camel(group.column), role)
    selected = {field.name for field in selected_under(info, ("groups",))}
    for measure in aggregation.measures:
        if measure.name in selected and measure.name in hidden:
            raise HiddenField(f"groups.{measure.name}", record.name, measure.name, role)
    for custom in custom_measures:
        record.refuse_hidden_custom(hidden, role, custom.key, f"measureCustom.{custom.key}")


def custom_groups(chosen: Sequence[Group], keys: Sequence[str]) -> list[CustomGroup]:
    """The ``groupByCustom`` keys as groups after the declared ones (their place names their parameter)."""
    return [CustomGroup(key, len(chosen) + i) for i, key in enumerate(keys)]


def aggregate_field(record: Record, filter_input: type | None) -> Any:
    """``<plural>Aggregate`` (module docstring); ``filter_input``: the record's filter type."""
    aggregation = record.aggregation
    assert aggregation is not None
    result = aggregate_type(record)
    by = {group.name: group for group in aggregation.groups}
    group_enum = group_by_enum(record)

    async def aggregate(info: Info, filter: Any = None, group_by: list[Any] | None = None,
                        group_by_custom: list[str] | None = None, measure_custom: list[str] | None = None,
                        first: int = DEFAULT_GROUPS) -> Any:
        if not 1 <= first <= MAX_GROUPS:
            raise BadUserInput("first", f"must be between 1 and {MAX_GROUPS}")
        declared = [by[value.value] for value in dict.fromkeys(group_by or [])]
        chosen: list[AnyGroup] = [*declared, *custom_groups(
            declared, asked_keys("groupByCustom", group_by_custom, MAX_GROUP_KEYS))]
        custom_measures = [CustomMeasure(key, j) for j, key in enumerate(
            asked_keys("measureCustom", measure_custom, MAX_MEASURE_KEYS))]
        session = info.context.session
        filters = vars(filter) if filter else None
        refuse_hidden(info, record, aggregation, chosen, filters, custom_measures)
        bound = record.bind_filters(filters)
        rows = await session.db.fetch(statement(record, aggregation, session.tenant_id, bound, chosen, first,
                                                session.hidden, custom_measures), bound)
        found: dict[str, Described] = {}
        if len(chosen) > len(declared) or custom_measures:
            found = read_described(rows[0].described)
            check_described(found, [g.key for g in chosen if isinstance(g, CustomGroup)],
                            [m.key for m in custom_measures], record.plural_label)
            rows = [row for row in rows if row.groups is not None]  # the row of nulls: no group at all
        groups = []
        for row in rows:
            values: dict[str, Any] = {"count": int(row.records or 0), **measures_of(aggregation, row)}
            keys: dict[str, Any] = {}
            custom: dict[str, CustomFieldValue] = {}
            for i, group in enumerate(chosen):
                value = row._mapping[f"k{i}"]
                if isinstance(group, CustomGroup):
                    custom[group.key] = typed(found[group.key], value)
                elif (relation := record.relation_by_key(group.column)) is not None:
                    keys[relation.name] = value
                else:
                    values[group.field_name] = key_value(record, group, value)
            groups.append(build_group(record, values, keys, custom,
                                      custom_measures_of(aggregation, custom_measures, found, row)))
        return result(group_count=rows[0].groups if rows else 0, groups=groups)

    parameters: list[tuple[str, Any, Any]] = []
    if filter_input is not None:
        parameters.append(("filter", filter_input | None, None))
    parameters.append(("group_by", list[group_enum], ()))  # type: ignore[valid-type]
    if record.custom_fields:
        parameters += [("group_by_custom", list[str], ()), ("measure_custom", list[str], ())]
    parameters.append(("first", int, DEFAULT_GROUPS))
    signature = inspect.Signature([
        inspect.Parameter("info", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Info),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
          for name, annotation, default in parameters)], return_annotation=result)
    aggregate.__signature__ = signature  # type: ignore[attr-defined]
    measured = "".join(f", {m.name}" for m in aggregation.measures)
    custom = " and of the custom fields in `groupByCustom`" if record.custom_fields else ""
    measure_custom = (f" `groupByCustom` takes the keys of {either(GROUPABLE)} fields (up to {MAX_GROUP_KEYS}), "
                      f"`measureCustom` those of {either(MEASURABLE)} fields to measure per group (up to "
                      f"{MAX_MEASURE_KEYS}; money per currency)." if record.custom_fields else "")
    return strawberry.field(resolver=aggregate, **requires(
        record.access.read, f"Count{measured} of the {record.plural_label} matching `filter`, per group of the "
        f"fields in `groupBy`{custom} (largest groups first, at most `first`, up to {MAX_GROUPS}); money per "
        f"currency.{measure_custom}"))

