"""Aggregate types, derived from a record's ``Aggregation`` (``records.declare``).

For deals: ``DealGroupBy`` (one value per declared ``Group``: ``STAGE``, ``OWNER``, ``CLOSE_MONTH``...),
``DealGroup`` (``count``; one key field per group, null unless grouped by it: a to-one relation's
key as the related record, ``stage: Stage``, any other as its value, ``status: DealStatus``,
``closeMonth: Date``; one field per ``Measure``: money as ``[MoneyAggregate!]!``, one entry per
currency, a plain number as ``NumberAggregate``) and ``DealAggregate`` (``groupCount`` and
``groups``). Related records are read through the session's loaders, like every relation.

A record with custom fields (``Record.custom_fields``) also has, on its group type,
``customField(key:)`` (the group's value of a custom field it is grouped by, ``groupByCustom``: the
same typed ``CustomFieldValue`` its records show; null for a key not grouped by) and
``customMeasure(key:)`` (a ``CustomFieldAggregate`` of a field in ``measureCustom``; null otherwise).
"""

from __future__ import annotations

import datetime as dt
import enum
from decimal import Decimal
from functools import cache
from typing import Any

import strawberry

from auth.session import Info
from records.custom import CustomFieldType, check_key
from records.declare import Group, Record
from schema import enums as _enums  # noqa: F401 - registers the model enums as GraphQL enums
from schema.custom_fields import CustomFieldValue
from schema.objects import RecordObject, load


@strawberry.type(description="An amount in one currency over a group's records: never summed across currencies. "
                             "`avg` is rounded to the cent.")
class MoneyAggregate:
    currency: str
    count: int
    sum: Decimal
    avg: Decimal
    min: Decimal
    max: Decimal


@strawberry.type(description="A number over a group's records (`count`: those with a value; the rest are null "
                             "when none has one). `avg` is rounded to 4 decimal places.")
class NumberAggregate:
    count: int
    sum: Decimal | None
    avg: Decimal | None
    min: Decimal | None
    max: Decimal | None


@strawberry.type(description="A NUMBER or MONEY custom field over a group's records (`measureCustom`): `number` "
                             "for a NUMBER field, `money` (one entry per currency, never summed across currencies) "
                             "for a MONEY field; the other is null.")
class CustomFieldAggregate:
    key: str
    label: str
    type: CustomFieldType
    number: NumberAggregate | None = None
    money: list[MoneyAggregate] | None = None


class GroupObject:
    """Base of the derived group types: the relation keys of the group stay in ``keys``; its values of the
    custom fields grouped by in ``custom`` and the custom measures in ``measured`` (by key)."""

    keys: dict[str, Any]
    custom: dict[str, CustomFieldValue]
    measured: dict[str, CustomFieldAggregate]


def custom_key_field() -> Any:
    """``customField(key: String!): CustomFieldValue`` of a group type."""

    def resolve(self: GroupObject, key: str) -> CustomFieldValue | None:
        return self.custom.get(check_key("key", key))

    return strawberry.field(resolver=resolve, description="The group's value of custom field `key` when grouped by it "
                                                          "(`groupByCustom`; a value whose member is null: the "
                                                          "records without one); null for a key not grouped by.")


def custom_measure_field() -> Any:
    """``customMeasure(key: String!): CustomFieldAggregate`` of a group type."""

    def resolve(self: GroupObject, key: str) -> CustomFieldAggregate | None:
        return self.measured.get(check_key("key", key))

    return strawberry.field(resolver=resolve, description="Numeric custom field `key` over the group's records when "
                                                          "measured (`measureCustom`); null otherwise.")


def key_field(record: Record, group: Group) -> tuple[str, Any, Any]:
    """The group's key field of ``record``'s group type: Python name, annotation, Strawberry field."""
    relation = record.relation_by_key(group.column)
    if relation is not None:
        target = relation.target()
        name = relation.name

        async def resolve(self: GroupObject, info: Info) -> Any:
            return await load(info, target, self.keys.get(name))

        return name, RecordObject.type_of(target) | None, strawberry.field(resolver=resolve)
    annotation: Any
    if group.month:
        annotation = dt.date
    elif record.has(group.column):
        annotation = record.field(group.column).rule.annotation
    else:
        annotation = str
    return group.field_name, annotation | None, None


@cache
def group_by_enum(record: Record) -> type[enum.Enum]:
    """``<Name>GroupBy``: one value per declared ``Group``."""
    assert record.aggregation is not None
    make_enum: Any = enum.Enum
    return strawberry.enum(make_enum(f"{record.name}GroupBy", {g.name: g.name for g in record.aggregation.groups}))  # type: ignore[no-any-return]


@cache
def group_type(record: Record) -> type:
    """``<Name>Group`` (module docstring)."""
    assert record.aggregation is not None
    annotations: dict[str, Any] = {"count": int}
    namespace: dict[str, Any] = {"__annotations__": annotations}
    for group in record.aggregation.groups:
        name, annotation, field = key_field(record, group)
        annotations[name] = annotation
        namespace[name] = field if field is not None else strawberry.field(
            default=None, description=f"The group's value when grouped by {group.name}.")
    for measure in record.aggregation.measures:
        annotations[measure.column] = list[MoneyAggregate] if measure.currency else NumberAggregate
    if record.custom_fields:
        namespace["custom_field"] = custom_key_field()
        namespace["custom_measure"] = custom_measure_field()
    annotations["keys"] = strawberry.Private[dict[str, Any]]
    annotations["custom"] = strawberry.Private[dict[str, CustomFieldValue]]
    annotations["measured"] = strawberry.Private[dict[str, CustomFieldAggregate]]
    return strawberry.type(type(f"{record.name}Group", (GroupObject,), namespace),
                           description=f"{record.plural_label.capitalize()} sharing the values of the fields grouped "
                                       "by (a key field not grouped by is null).")


@cache
def aggregate_type(record: Record) -> type:
    """``<Name>Aggregate``: the groups (largest first) and how many there are in all."""
    namespace = {"__annotations__": {
        "group_count": int, "groups": list[group_type(record)]},  # type: ignore[misc]
        "group_count": strawberry.field(description="Groups in all (`groups` holds at most `first`).")}
    return strawberry.type(type(f"{record.name}Aggregate", (), namespace))


def build_group(record: Record, values: dict[str, Any], keys: dict[str, Any],
                custom: dict[str, CustomFieldValue] | None = None,
                measured: dict[str, CustomFieldAggregate] | None = None) -> Any:
    """A group object of ``record`` from its field values (every key field not given is null)."""
    cls = group_type(record)
    obj: Any = object.__new__(cls)
    assert record.aggregation is not None
    for group in record.aggregation.groups:
        if record.relation_by_key(group.column) is None:
            obj.__dict__[group.field_name] = None
    obj.__dict__.update(values)
    obj.keys = keys
    obj.custom = custom or {}
    obj.measured = measured or {}
    return obj
