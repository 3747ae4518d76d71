"""Custom fields as clients read them: typed values (``CustomFieldValue`` and its types) and definitions.

A record type declared with ``custom_fields=True`` gets two fields on its object type:
``customFields`` (every live definition of the type, in form order, each with the record's value or
null) and ``customField(key:)`` (one, or null when the workspace has no live definition of that
key). Each value is an object of the type's own GraphQL type (``NumberValue.number`` is a
``Decimal``, ``DateValue.date`` a ``Date``...), so clients parse no JSON. The planner answers both
in SQL (``planner.custom``); the resolvers here read the tenant's definitions once per request
through the session's loaders.

Field rules (``auth.fields``, docs/field-rules.md): a custom field a rule hides from the caller's
role (``custom.<key>``) reads as a hidden standard field does, null with FORBIDDEN at its path:
``customField(key:)`` is null with one FORBIDDEN error; in ``customFields`` its entry stays (its
``key``, ``label`` and ``type`` are the definition, which every member reads) and each of the value's
own fields (``option``, ``amount``...) is null with one FORBIDDEN error at its path (``withheld``).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import TYPE_CHECKING, Annotated, Any

import strawberry

from auth.session import Info
from core.errors import HiddenField
from core.ids import decode_id, to_global_id
from records.crm import RECORDS, USER
from records.custom import (
    DEFINITIONS_OF,
    CustomFieldType,
    Definition,
    Described,
    check_key,
    hidden_key,
    rule_name,
)
from records.declare import Record
from schema.objects import load

if TYPE_CHECKING:
    from schema.crm import User

CUSTOM = "atrium.custom"
"""Field metadata key: the record whose custom fields the field reads (``customFields`` or
``customField``), for the planner."""

_make_enum: Any = enum.Enum
CustomFieldRecordType: type[enum.Enum] = strawberry.enum(
    _make_enum("CustomFieldRecordType", {record.singular.upper(): record.name
                                         for record in RECORDS if record.custom_fields}),
    description="The record types a workspace may define custom fields on.")


@strawberry.interface(description="The value of one custom field on one record (null members: no value).")
class CustomFieldValue:
    key: str = strawberry.field(description="The definition's key (what inputs, filters and orderings name).")
    label: str
    type: CustomFieldType


@strawberry.type(description="A TEXT, LONG_TEXT, URL or EMAIL custom field's value.")
class TextValue(CustomFieldValue):
    text: str | None


@strawberry.type(description="A NUMBER custom field's value.")
class NumberValue(CustomFieldValue):
    number: Decimal | None


@strawberry.type(description="A MONEY custom field's value: an amount in a currency.")
class MoneyValue(CustomFieldValue):
    amount: Decimal | None
    currency: str | None


@strawberry.type(description="A DATE custom field's value.")
class DateValue(CustomFieldValue):
    date: dt.date | None


@strawberry.type(description="A BOOLEAN custom field's value.")
class BooleanValue(CustomFieldValue):
    boolean: bool | None


@strawberry.type(description="A SINGLE_SELECT custom field's value: one of its options.")
class SelectValue(CustomFieldValue):
    option: str | None


@strawberry.type(description="A MULTI_SELECT custom field's value: some of its options, in the order given.")
class MultiSelectValue(CustomFieldValue):
    options: list[str] | None


@strawberry.type(description="A USER custom field's value: a member of the workspace.")
class UserValue(CustomFieldValue):
    user_id: strawberry.ID | None

    @strawberry.field(description="The member (null once they have left the workspace).")
    async def user(self, info: Info) -> Annotated[User, strawberry.lazy("schema.crm")] | None:
        if self.user_id is None:
            return None
        return await load(info, USER, decode_id(self.user_id, "User"))  # type: ignore[no-any-return]


VALUE_TYPES: dict[CustomFieldType, type[CustomFieldValue]] = {
    CustomFieldType.TEXT: TextValue, CustomFieldType.LONG_TEXT: TextValue, CustomFieldType.URL: TextValue,
    CustomFieldType.EMAIL: TextValue, CustomFieldType.NUMBER: NumberValue, CustomFieldType.MONEY: MoneyValue,
    CustomFieldType.DATE: DateValue, CustomFieldType.BOOLEAN: BooleanValue,
    CustomFieldType.SINGLE_SELECT: SelectValue, CustomFieldType.MULTI_SELECT: MultiSelectValue,
    CustomFieldType.USER: UserValue,
}
"""The GraphQL type of each custom field type's values (the planner reads it too)."""


def typed(definition: Definition | Described, raw: Any) -> CustomFieldValue:
    """The typed value of a stored JSON value (``records.custom``) under ``definition`` (a record's
    field, or an aggregate's group key)."""
    common: dict[str, Any] = {"key": definition.key, "label": definition.label, "type": definition.type}
    kind = definition.type
    cls = VALUE_TYPES[kind]
    if cls is TextValue:
        return TextValue(**common, text=raw)
    if cls is NumberValue:
        return NumberValue(**common, number=None if raw is None else Decimal(raw))
    if cls is MoneyValue:
        money: Mapping[str, Any] = raw or {}
        amount = money.get("amount")
        return MoneyValue(**common, amount=None if amount is None else Decimal(amount), currency=money.get("currency"))
    if cls is DateValue:
        return DateValue(**common, date=None if raw is None else dt.date.fromisoformat(raw))
    if cls is BooleanValue:
        return BooleanValue(**common, boolean=raw)
    if cls is SelectValue:
        return SelectValue(**common, option=raw)
    if cls is MultiSelectValue:
        return MultiSelectValue(**common, options=raw)
    return UserValue(**common, user_id=None if raw is None else strawberry.ID(to_global_id("User", uuid.UUID(raw))))


COMMON = ("key", "label", "type")
"""The fields every value has (the definition's); the others are the value's own."""


def _withheld_type(cls: type[CustomFieldValue]) -> type[CustomFieldValue]:
    """``cls`` whose own value fields raise the FORBIDDEN of the field rule the object carries: a
    subclass, so the object still is (and reads as) a ``cls``, and its plain fields stay plain
    attributes for every value that is not hidden."""
    own = [f.python_name for f in cls.__strawberry_definition__.fields  # type: ignore[attr-defined]
           if f.python_name not in COMMON and f.base_resolver is None]

    def refused(self: Any) -> Any:
        field, record_type, role = self.__dict__["refusal"]
        raise HiddenField(field, record_type, field, role)

    return type(f"Withheld{cls.__name__}", (cls,), {name: property(refused) for name in own})


WITHHELD: dict[type[CustomFieldValue], type[CustomFieldValue]] = {
    cls: _withheld_type(cls) for cls in dict.fromkeys(VALUE_TYPES.values())}


def withheld(definition: Definition, record: Record, role: str) -> CustomFieldValue:
    """The value of a custom field hidden from the caller's ``role`` (module docstring): its key,
    label and type, and every field of the value itself null with FORBIDDEN naming ``custom.<key>``."""
    value = object.__new__(WITHHELD[VALUE_TYPES[definition.type]])
    value.__dict__.update(key=definition.key, label=definition.label, type=definition.type,
                          refusal=(rule_name(definition.key), record.name, role))
    return value


async def definitions(info: Info, record: Record) -> list[Definition]:
    """The tenant's live definitions of ``record``, once per request (the session's loaders)."""
    session = info.context.session
    rows = await session.loaders.many(DEFINITIONS_OF[record.name], 1000).load(session.tenant_id)
    return [Definition.from_row(row) for row in rows]


def custom_fields(record: Record) -> Any:
    """``customFields: [CustomFieldValue!]!`` of ``record``'s object type."""

    async def resolve(self: Any, info: Info) -> list[CustomFieldValue]:
        values = self.row.custom_fields
        session = info.context.session
        hidden = session.hidden(record.name)
        return [withheld(d, record, session.principal.role.value) if hidden_key(d.key, hidden)
                else typed(d, values.get(d.key)) for d in await definitions(info, record)]

    return strawberry.field(resolver=_typed(resolve, list[CustomFieldValue]), metadata={CUSTOM: record},
                            description="The workspace's custom fields of this record type, in form order, with "
                                        "this record's values (a value hidden from your role by a field rule: "
                                        "its own fields null, FORBIDDEN).")


def custom_field(record: Record) -> Any:
    """``customField(key: String!): CustomFieldValue`` of ``record``'s object type."""

    async def resolve(self: Any, info: Info, key: str) -> CustomFieldValue | None:
        check_key("key", key)
        found = next((d for d in await definitions(info, record) if d.key == key), None)
        if found is None:
            return None
        session = info.context.session
        if hidden_key(key, session.hidden(record.name)):
            raise HiddenField(rule_name(key), record.name, rule_name(key), session.principal.role.value)
        return typed(found, self.row.custom_fields.get(key))

    return strawberry.field(resolver=_typed(resolve, CustomFieldValue | None), metadata={CUSTOM: record},
                            description="One custom field by key; null when the workspace has none of that key "
                                        "(null, FORBIDDEN, when a field rule hides it from your role).")


def _typed(resolve: Callable[..., Any], returns: Any) -> Callable[..., Any]:
    resolve.__annotations__["return"] = returns
    return resolve


@strawberry.type(description="A custom field a workspace defines on a record type (docs/custom-fields.md).")
class CustomFieldDefinition:
    id: strawberry.ID
    record_type: CustomFieldRecordType  # type: ignore[valid-type]
    key: str = strawberry.field(description="Fixed once created: inputs, filters and orderings name it.")
    label: str = strawberry.field(description="What forms show; renaming it breaks no query.")
    type: CustomFieldType
    required: bool
    options: list[str] = strawberry.field(description="The choices of a SINGLE_SELECT or MULTI_SELECT field.")
    default: CustomFieldValue | None = strawberry.field(description="Given to records created without a value.")
    position: int = strawberry.field(description="Form order (then key).")
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> CustomFieldDefinition:
        definition = Definition.from_row(row)
        return cls(id=strawberry.ID(to_global_id("CustomFieldDefinition", row.id)),
                   record_type=CustomFieldRecordType(row.record_type), key=row.key, label=row.label,
                   type=definition.type, required=row.required, options=list(row.options),
                   default=None if row.default_value is None else typed(definition, row.default_value),
                   position=row.position, version=row.version, created_at=row.created_at, updated_at=row.updated_at)


CUSTOM_VALUE_TYPES = [TextValue, NumberValue, MoneyValue, DateValue, BooleanValue, SelectValue, MultiSelectValue,
                      UserValue]
