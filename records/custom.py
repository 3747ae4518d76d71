"""Custom fields: what a tenant defines on a record type, how values are checked, stored, filtered and sorted.

A record type opts in with ``Record(..., custom_fields=True)`` (its table has the ``custom_fields``
JSONB column, ``models.tables.ExactJSONB``); everything else follows from that flag: the
``customFields`` list in its create, patch, batch and upsert inputs, the ``custom`` list in its
filter, the ``custom`` key of its ordering, and the ``customFields`` / ``customField(key:)`` fields
of its object type (``schema.custom_fields``).

Definitions are data (``custom_field_definitions``): one tenant's are invisible to another. A
definition's ``key`` is fixed once created (queries name it); its ``label`` may change at any time.

Stored values, by type (JSON in the record's ``custom_fields`` object, under the key):

====================================  ==========================================================
TEXT, LONG_TEXT, URL, EMAIL           a string                       (input member ``text``)
NUMBER                                a JSON number, exact           (``number``)
MONEY                                 ``{"amount": n, "currency": "USD"}`` (``money``)
DATE                                  ``"YYYY-MM-DD"``               (``date``)
BOOLEAN                               true / false                   (``boolean``)
SINGLE_SELECT                         one of the options             (``option``)
MULTI_SELECT                          a list of options              (``options``)
USER                                  the member's user id (uuid text) (``userId``)
====================================  ==========================================================

Filters and orderings need no definition at request time: they are SQL over the JSON value (an
equality, one-of or multi-select contains is a containment test, ``@>``, which the GIN index of the
column answers), and each condition also asks that the tenant has a live definition of that key and
of a type the condition fits, so a filter on a deleted definition, or with a value of another type,
matches nothing.

Aggregates group by custom fields of the ``GROUPABLE`` types and measure those of the ``MEASURABLE``
ones (``CustomGroup``, ``CustomMeasure``: the same interface as a declaration's ``Group`` and
``Measure``, over the JSON value instead of a column). Their statement reads the definitions it
names itself (``described``) and counts nothing unless each has a live definition of a fitting type
(``CustomGroup.live``), so an aggregate stays one statement and a deleted definition's values are
never grouped or measured; ``check_described`` then answers BAD_USER_INPUT naming the key.

This module holds no database access: only data, rules and SQL expressions.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import operator
import re
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import strawberry
from sqlalchemy import (
    JSON,
    ColumnElement,
    Numeric,
    String,
    TypeDecorator,
    and_,
    bindparam,
    case,
    cast,
    exists,
    func,
    literal_column,
    or_,
    select,
)
from sqlalchemy import Text as SQLText
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.sql import type_coerce

from core.errors import BadUserInput
from core.ids import decode_id
from models.loaders import TENANT
from models.tables import CUSTOM_FIELD_DEFINITIONS, ExactJSONB, exact_dumps
from records.rules import Currency, Email, Money, Text

if TYPE_CHECKING:
    from records.declare import FilterField, Record, SortKey

KEY = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
URL = re.compile(r"^https?://[^\s/$.?#][^\s]*$", re.IGNORECASE)
MAX_NUMBER = Decimal("1e15")
NUMBER_PLACES = 6
MAX_OPTIONS = 100
MAX_DEFINITIONS = 50
"""Live custom fields per record type and workspace (what the cost of a ``customFields`` list counts)."""
MAX_FILTERS = 10
MAX_IN = 50
DEFINITIONS = CUSTOM_FIELD_DEFINITIONS


@strawberry.enum(description="The type of a custom field's values.")
class CustomFieldType(enum.Enum):
    TEXT = "text"
    LONG_TEXT = "long_text"
    NUMBER = "number"
    MONEY = "money"
    DATE = "date"
    BOOLEAN = "boolean"
    SINGLE_SELECT = "single_select"
    MULTI_SELECT = "multi_select"
    USER = "user"
    URL = "url"
    EMAIL = "email"


TEXTUAL = (CustomFieldType.TEXT, CustomFieldType.LONG_TEXT, CustomFieldType.URL, CustomFieldType.EMAIL)

MEMBER: dict[CustomFieldType, str] = {
    **{t: "text" for t in TEXTUAL},
    CustomFieldType.NUMBER: "number", CustomFieldType.MONEY: "money", CustomFieldType.DATE: "date",
    CustomFieldType.BOOLEAN: "boolean", CustomFieldType.SINGLE_SELECT: "option",
    CustomFieldType.MULTI_SELECT: "options", CustomFieldType.USER: "user_id",
}
"""The input member carrying a value of each type (its GraphQL name is the member's camel case)."""
MEMBERS = ("text", "number", "money", "date", "boolean", "option", "options", "user_id")


@strawberry.input(description="An amount in a currency (ISO 4217).")
class MoneyInput:
    amount: Decimal
    currency: str


@strawberry.input(description="A custom field value: the one member its type takes (`text` for TEXT, LONG_TEXT, "
                              "URL and EMAIL; `number`; `money`; `date`; `boolean`; `option` for SINGLE_SELECT; "
                              "`options` for MULTI_SELECT; `userId` for USER). No member: no value.")
class CustomValueInput:
    text: str | None = None
    number: Decimal | None = None
    money: MoneyInput | None = None
    date: dt.date | None = None
    boolean: bool | None = None
    option: str | None = None
    options: list[str] | None = None
    user_id: strawberry.ID | None = None


@strawberry.input(description="The value of one custom field of a record: its `key` and the member its type takes "
                              "(see `CustomValueInput`). No member clears the field.")
class CustomFieldValueInput(CustomValueInput):
    key: str


@strawberry.enum(description="How a custom field filter compares.")
class CustomFieldOp(enum.Enum):
    EQ = "eq"
    IN = "in"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    CONTAINS = "contains"


@strawberry.input(description="A condition on one custom field. EQ: `text` (also a SINGLE_SELECT option), "
                              "`number`, `date`, `boolean` or `userId`; with `currency` a MONEY amount in that "
                              "currency. IN: `values` (texts or options) or `userIds`. GT, GTE, LT, LTE: `number` "
                              "(NUMBER, or a MONEY amount) or `date`. CONTAINS: `text`, a case-insensitive "
                              "substring of a text, or an option a MULTI_SELECT holds. A key without a live "
                              "definition, or a value of another type, matches no record.")
class CustomFieldFilter:
    key: str
    op: CustomFieldOp = CustomFieldOp.EQ
    text: str | None = None
    number: Decimal | None = None
    currency: str | None = None
    date: dt.date | None = None
    boolean: bool | None = None
    user_id: strawberry.ID | None = None
    values: list[str] | None = None
    user_ids: list[strawberry.ID] | None = None


def member(given: Any, name: str) -> Any:
    """A member of an input value, whether an input object (resolvers) or a dict (the planner)."""
    if isinstance(given, Mapping):
        head, *rest = name.split("_")
        return given.get(head + "".join(p.title() for p in rest))
    return getattr(given, name, None)


# ---- field rules (``auth.fields``) ------------------------------------------------------------

RULE_PREFIX = "custom."
"""A field rule names a custom field as ``custom.<key>`` (a standard field by its API name, which
never holds a dot): so a custom key that spells a standard field's name (``amount``) is its own.
A CSV column names it the same way (``resolvers.csv_custom``)."""


def rule_name(key: str) -> str:
    """The ``field`` of a field rule hiding custom field ``key`` (``custom.tier``)."""
    return RULE_PREFIX + key


def custom_key(field: str) -> str | None:
    """The custom field key a rule's ``field`` names (``custom.tier`` -> ``tier``); None for a standard field."""
    return field[len(RULE_PREFIX):] if field.startswith(RULE_PREFIX) else None


def hidden_key(key: Any, hidden: Collection[str]) -> bool:
    """Whether custom field ``key`` is among the fields ``hidden`` from the caller (``HiddenOf``'s answer)."""
    return isinstance(key, str) and RULE_PREFIX + key in hidden


def hidden_keys(hidden: Collection[str]) -> frozenset[str]:
    """The custom field keys among the fields ``hidden`` from the caller."""
    return frozenset(key for name in hidden if (key := custom_key(name)) is not None)


def readable(definitions: Sequence[Definition], hidden: Collection[str]) -> list[Definition]:
    """The definitions whose values a caller may read, in their order: those no field rule hides from
    them (``hidden``: the caller's hidden fields of the record type, ``Session.hidden``). What a reader
    that lists the fields asks (an export's custom columns); readers of stored values ask ``hidden_key``
    of each key (change events, audit reads, a version conflict's ``current``): the same test."""
    if not hidden:
        return list(definitions)
    return [d for d in definitions if RULE_PREFIX + d.key not in hidden]


def check_key(field: str, key: Any) -> str:
    if not isinstance(key, str) or not KEY.match(key):
        raise BadUserInput(field, "must be a key of lower-case letters, digits and '_', starting with a letter "
                                  "(at most 40)")
    return key


# ---- definitions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Definition:
    """One live custom field definition (a row of ``custom_field_definitions``)."""

    id: uuid.UUID
    record_type: str
    key: str
    label: str
    type: CustomFieldType
    required: bool
    options: tuple[str, ...]
    default: Any
    position: int

    @classmethod
    def from_row(cls, row: Any) -> Definition:
        return cls(row.id, row.record_type, row.key, row.label, CustomFieldType(row.type), row.required,
                   tuple(row.options), row.default_value, row.position)


def definitions_query(record_name: str) -> Any:
    """The tenant's live definitions of a record type, in form order (``tenant_id`` bound by the caller)."""
    d = DEFINITIONS
    return (select(d).where(d.c.tenant_id == bindparam("tenant_id"), d.c.record_type == record_name,
                            d.c.deleted_at.is_(None)).order_by(d.c.position, d.c.key))


@dataclass(frozen=True)
class DefinitionsOf:
    """The loader lookup (``models.loaders.ListLookup``) of a record type's live definitions, keyed by tenant."""

    record_name: str

    @property
    def query(self) -> Any:
        d = DEFINITIONS
        return select(d).where(d.c.tenant_id == TENANT, d.c.record_type == self.record_name, d.c.deleted_at.is_(None))

    @property
    def key(self) -> ColumnElement[Any]:
        return DEFINITIONS.c.tenant_id

    @property
    def order_by(self) -> tuple[ColumnElement[Any], ...]:
        return (DEFINITIONS.c.position, DEFINITIONS.c.key)


class _ByName(dict[str, DefinitionsOf]):
    def __missing__(self, name: str) -> DefinitionsOf:
        made = self[name] = DefinitionsOf(name)
        return made


DEFINITIONS_OF: dict[str, DefinitionsOf] = _ByName()
"""One lookup per record type (loaders cache by the lookup's identity)."""


# ---- values -------------------------------------------------------------------------------------

LONG_TEXT = Text(20_000)
SHORT_TEXT = Text(1_000)
EMAIL = Email()
MONEY = Money()
CURRENCY = Currency()


def stored(definition: Definition, field: str, given: Any) -> Any:
    """The stored JSON value of ``given`` (a ``CustomFieldValueInput`` or its dict) for ``definition``;
    None when no member is given (the field is cleared). USER values are uuids still to be checked
    against the tenant's members (``user_ids``)."""
    present = [name for name in MEMBERS if member(given, name) is not None]
    if not present:
        return None
    wanted = MEMBER[definition.type]
    if present != [wanted]:
        camel_name = "userId" if wanted == "user_id" else wanted
        raise BadUserInput(field, f"is a {definition.type.name} field: give `{camel_name}` only")
    value = member(given, wanted)
    kind = definition.type
    if kind in TEXTUAL:
        text = (LONG_TEXT if kind is CustomFieldType.LONG_TEXT else SHORT_TEXT)(field, value)
        if kind is CustomFieldType.EMAIL:
            text = EMAIL(field, text)
        if kind is CustomFieldType.URL and text is not None and (len(text) > 2000 or not URL.match(text)):
            raise BadUserInput(field, "must be an http(s) URL")
        return text
    if kind is CustomFieldType.NUMBER:
        return number(field, value)
    if kind is CustomFieldType.MONEY:
        amount, currency = member(value, "amount"), member(value, "currency")
        return {"amount": MONEY(f"{field}.amount", amount), "currency": CURRENCY(f"{field}.currency", currency)}
    if kind is CustomFieldType.DATE:
        return value.isoformat()
    if kind is CustomFieldType.BOOLEAN:
        return bool(value)
    if kind is CustomFieldType.SINGLE_SELECT:
        if value not in definition.options:
            raise BadUserInput(field, f"must be one of the options: {', '.join(definition.options)}")
        return value
    if kind is CustomFieldType.MULTI_SELECT:
        unknown = [v for v in value if v not in definition.options]
        if unknown:
            raise BadUserInput(field, f"{unknown[0]!r} is not one of the options: {', '.join(definition.options)}")
        if len(set(value)) != len(value):
            raise BadUserInput(field, "must not repeat an option")
        return list(value)
    return str(decode_id(value, "User", field=field))


def number(field: str, value: Decimal) -> Decimal:
    if not value.is_finite() or abs(value) >= MAX_NUMBER:
        raise BadUserInput(field, f"must be a number between -{MAX_NUMBER:f} and {MAX_NUMBER:f}")
    if value != value.quantize(Decimal(1).scaleb(-NUMBER_PLACES)):
        raise BadUserInput(field, f"must have at most {NUMBER_PLACES} decimal places")
    return value


@dataclass
class Pending:
    """The ``customFields`` of one create or patch input, checked for shape but not yet against the
    tenant's definitions (the write path does that, ``resolve``): key -> the input value."""

    given: dict[str, Any]
    prefix: str = ""

    @classmethod
    def of(cls, items: Sequence[Any] | None, prefix: str = "") -> Pending:
        given: dict[str, Any] = {}
        for i, item in enumerate(items or ()):
            key = check_key(f"{prefix}customFields.{i}.key", member(item, "key"))
            if key in given:
                raise BadUserInput(f"{prefix}customFields.{key}", "is given twice")
            given[key] = item
        return cls(given, prefix)


def resolve(definitions: Sequence[Definition], pending: Pending | None, current: Mapping[str, Any] | None,
            plural_label: str) -> dict[str, Any]:
    """A record's custom field values after a write: ``current`` (None on create: defaults apply) with
    ``pending`` applied, checked against the tenant's live ``definitions``. BAD_USER_INPUT naming
    ``customFields.<key>`` for an unknown key, a value that breaks its type, or a required field
    left empty. Values of definitions that were deleted are kept as they are (hidden, until purged)."""
    by_key = {d.key: d for d in definitions}
    prefix = pending.prefix if pending else ""
    out = dict(current or {})
    for key, given in (pending.given if pending else {}).items():
        definition = by_key.get(key)
        field = f"{prefix}customFields.{key}"
        if definition is None:
            raise BadUserInput(field, f"is not a custom field of {plural_label}")
        value = stored(definition, field, given)
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    for definition in definitions:
        if current is None and definition.key not in out and definition.default is not None:
            out[definition.key] = definition.default
        given_now = pending is not None and definition.key in pending.given
        if definition.required and definition.key not in out and (current is None or given_now):
            raise BadUserInput(f"{prefix}customFields.{definition.key}", "is required")
    return out


def changed_keys(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The keys whose stored values differ between two ``custom_fields`` objects (None: none held)."""
    old, new = before or {}, after or {}
    return tuple(sorted(k for k in {*old, *new} if old.get(k) != new.get(k)))


def user_ids(definitions: Sequence[Definition], values: Mapping[str, Any]) -> dict[str, uuid.UUID]:
    """The USER values among ``values`` (key -> user id), for the write path's membership check."""
    return {d.key: uuid.UUID(values[d.key]) for d in definitions
            if d.type is CustomFieldType.USER and isinstance(values.get(d.key), str)}


# ---- filters ------------------------------------------------------------------------------------

TYPES_OF: dict[str, tuple[CustomFieldType, ...]] = {
    "text": (*TEXTUAL, CustomFieldType.SINGLE_SELECT),
    "number": (CustomFieldType.NUMBER,),
    "money": (CustomFieldType.MONEY,),
    "date": (CustomFieldType.DATE,),
    "boolean": (CustomFieldType.BOOLEAN,),
    "user_id": (CustomFieldType.USER,),
    "values": (*TEXTUAL, CustomFieldType.SINGLE_SELECT),
    "user_ids": (CustomFieldType.USER,),
    "contains": TEXTUAL,
    "options": (CustomFieldType.MULTI_SELECT,),
}
RANGES = {CustomFieldOp.GT: "gt", CustomFieldOp.GTE: "gte", CustomFieldOp.LT: "lt", CustomFieldOp.LTE: "lte"}
FILTER_MEMBERS = ("text", "number", "date", "boolean", "user_id", "values", "user_ids")


def _p(i: int, name: str) -> str:
    return f"filter_custom_{i}_{name}"


def _one_filter(i: int, given: Any, field: str) -> dict[str, Any]:
    """The parameters of filter ``i`` (its shape is in their names: ``where`` reads it back)."""
    from records.declare import like_pattern

    key = check_key(f"{field}.key", member(given, "key"))
    op = member(given, "op") or CustomFieldOp.EQ
    if not isinstance(op, CustomFieldOp):
        op = CustomFieldOp(op) if op in {o.value for o in CustomFieldOp} else CustomFieldOp[str(op)]
    present = [m for m in FILTER_MEMBERS if member(given, m) is not None]
    currency = member(given, "currency")
    out: dict[str, Any] = {_p(i, "key"): key}
    allowed = {CustomFieldOp.EQ: ("text", "number", "date", "boolean", "user_id"),
               CustomFieldOp.IN: ("values", "user_ids"), CustomFieldOp.CONTAINS: ("text",)}.get(op, ("number", "date"))
    if len(present) != 1 or present[0] not in allowed:
        raise BadUserInput(field, f"{op.name} takes exactly one of: "
                                  + ", ".join(f"`{_camel(m)}`" for m in allowed))
    name = present[0]
    value = member(given, name)
    if currency is not None and name != "number":
        raise BadUserInput(f"{field}.currency", "goes with `number` (a MONEY amount)")
    if currency is not None:
        out[_p(i, "currency")] = CURRENCY(f"{field}.currency", currency)
    if name == "number":
        value = number(f"{field}.number", value)
    elif name == "date":
        value = value.isoformat()
    elif name == "text":
        value = SHORT_TEXT(f"{field}.text", value)
    elif name == "user_id":
        value = str(decode_id(value, "User", field=f"{field}.userId"))
    elif name in ("values", "user_ids"):
        if not 1 <= len(value) <= MAX_IN:
            raise BadUserInput(f"{field}.{_camel(name)}", f"must hold 1 to {MAX_IN} values")
        if name == "user_ids":
            value = [str(decode_id(v, "User", field=f"{field}.userIds.{n}")) for n, v in enumerate(value)]
        else:
            value = [SHORT_TEXT(f"{field}.values.{n}", v) for n, v in enumerate(value)]
    # JSON values travel as JSON text (``JSONText``), whichever path runs the statement.
    if op is CustomFieldOp.EQ:
        out[_p(i, f"eq_{name}")] = exact_dumps(value)
        if name == "number":
            out[_p(i, "eq_money")] = exact_dumps({"amount": value, **({"currency": out[_p(i, "currency")]}
                                                                       if currency else {})})
    elif op is CustomFieldOp.IN:
        for n, v in enumerate(value):
            out[_p(i, f"in{n}_{name}")] = exact_dumps(v)
    elif op is CustomFieldOp.CONTAINS:
        out[_p(i, "contains_text")] = like_pattern(value)
        out[_p(i, "contains_options")] = exact_dumps([value])
    else:
        out[_p(i, f"{RANGES[op]}_{name}")] = exact_dumps(value)
    return out


def _camel(name: str) -> str:
    return {"user_id": "userId", "user_ids": "userIds"}.get(name, name)


def _live(record_name: str, tenant: Any, key: Any, types: Collection[CustomFieldType]) -> ColumnElement[bool]:
    """The tenant has a live definition ``key`` of one of ``types`` on the record type (``tenant``: a
    value or a parameter, not the row's column: the test runs once per statement, not once per row)."""
    d = DEFINITIONS
    return exists(select(d.c.id).where(d.c.tenant_id == tenant, d.c.record_type == record_name,
                                       d.c.key == key, d.c.deleted_at.is_(None),
                                       d.c.type.in_([constant(t.value) for t in types])))


def constant(value: str) -> ColumnElement[Any]:
    """A fixed text of this module's own (a type's stored name) written into the SQL, not bound: plans
    compile their statements once, and an expanding IN list of parameters would not."""
    return literal_column("'" + value.replace("'", "''") + "'", String())


def _doc(name: str, key: Any) -> ColumnElement[Any]:
    """``jsonb_build_object(key, <param name>)``: what a containment test looks for."""
    return func.jsonb_build_object(key, bindparam(name, type_=JSONText))


@dataclass(frozen=True, eq=False)
class CustomFilter:
    """``custom: [CustomFieldFilter!]``: every condition holds (AND), each on one custom field."""

    def fields(self, record: Record) -> list[FilterField]:
        from records.declare import FilterField, list_of

        return [FilterField("custom", list_of(CustomFieldFilter),
                            "Conditions on custom fields, all of which hold (see `CustomFieldFilter`).")]

    def bind(self, record: Record, values: Mapping[str, Any]) -> dict[str, Any]:
        given = values.get("custom")
        if not given:
            return {}
        if len(given) > MAX_FILTERS:
            raise BadUserInput("filter.custom", f"at most {MAX_FILTERS} conditions")
        out: dict[str, Any] = {}
        for i, item in enumerate(given):
            out.update(_one_filter(i, item, f"filter.custom.{i}"))
        return out

    def where(self, record: Record, source: Any, bound: Collection[str], prefix: str = "", *,
              tenant: Any = None) -> list[ColumnElement[bool]]:
        """The conditions (``tenant``: the statement's tenant, a value or a parameter)."""
        conditions: list[ColumnElement[bool]] = []
        i = 0
        while _p(i, "key") in bound:
            conditions.append(self._condition(record, source, tenant, i, bound, prefix))
            i += 1
        return conditions

    @staticmethod
    def _condition(record: Record, source: Any, tenant: Any, i: int, bound: Collection[str],
                   prefix: str) -> ColumnElement[bool]:
        key = bindparam(prefix + _p(i, "key"), type_=String())
        values = source.c.custom_fields
        names = [n[len(_p(i, "")):] for n in bound if n.startswith(_p(i, "")) and n != _p(i, "key")]
        currency = _p(i, "currency") in bound
        names = [n for n in names if n != "currency"]

        def param(name: str) -> str:
            return prefix + _p(i, name)

        if "contains_text" in names:
            pattern = bindparam(param("contains_text"), type_=String())
            text_match = and_(values[key].astext.ilike(pattern, escape="\\"),
                              _live(record.name, tenant, key, TYPES_OF["contains"]))
            option_match = and_(values.contains(func.jsonb_build_object(
                key, bindparam(param("contains_options"), type_=JSONText))),
                _live(record.name, tenant, key, TYPES_OF["options"]))
            return or_(option_match, text_match)
        if any(n.startswith("in") and not n.startswith("in_") for n in names):
            member_name = names[0].split("_", 1)[1]
            return and_(or_(*(values.contains(_doc(param(n), key)) for n in sorted(names))),
                        _live(record.name, tenant, key, TYPES_OF[member_name]))
        op, member_name = names[0].split("_", 1) if len(names) == 1 else ("eq", "number")
        if op == "eq":
            if member_name == "number":
                plain = and_(values.contains(_doc(param("eq_number"), key)),
                             _live(record.name, tenant, key, TYPES_OF["number"]))
                money = and_(values.contains(_doc(param("eq_money"), key)),
                             _live(record.name, tenant, key, TYPES_OF["money"]))
                return money if currency else or_(plain, money)
            return and_(values.contains(_doc(param(f"eq_{member_name}"), key)),
                        _live(record.name, tenant, key, TYPES_OF[member_name]))
        value = bindparam(param(f"{op}_{member_name}"), type_=JSONText)
        compare = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}[op]
        element = type_coerce(values[key], JSONB)
        if member_name == "date":
            return and_(func.jsonb_typeof(element) == "string", compare(element, value),
                        _live(record.name, tenant, key, TYPES_OF["date"]))
        plain = and_(func.jsonb_typeof(element) == "number", compare(element, value),
                     _live(record.name, tenant, key, TYPES_OF["number"]))
        amount = type_coerce(element["amount"], JSONB)
        in_currency = [element["currency"].astext == bindparam(param("currency"), type_=String())] if currency else []
        money = and_(func.jsonb_typeof(element) == "object", compare(amount, value), *in_currency,
                     _live(record.name, tenant, key, TYPES_OF["money"]))
        return money if currency else or_(plain, money)


# ---- orderings ----------------------------------------------------------------------------------

class JSONText(TypeDecorator[str]):
    """A jsonb value kept as its JSON text on both sides: bound from JSON text (filter values, cursor
    values: the planner passes parameters to the driver as they are, so they are text already), read
    as its text (a custom sort value, which cursors hold)."""

    impl = JSONB
    cache_ok = True

    def bind_processor(self, dialect: Any) -> Any:
        return None

    def column_expression(self, column: Any) -> Any:
        return type_coerce(cast(column, SQLText), self)

    def process_result_value(self, value: Any, dialect: Any) -> Any:
        return value


def parse_json_text(text: str) -> str:
    """A custom sort value of a cursor: JSON of what custom fields store (ValueError otherwise)."""

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    def check(value: Any) -> None:
        if isinstance(value, Decimal):
            if not value.is_finite() or abs(value) >= MAX_NUMBER * 100:
                raise ValueError(value)
        elif isinstance(value, list):
            for item in value:
                check(item)
        elif isinstance(value, dict):
            for item in value.values():
                check(item)
        elif isinstance(value, str):
            if "\x00" in value:
                raise ValueError("NUL")
        elif value is not None and not isinstance(value, bool):
            raise ValueError(value)

    check(json.loads(text, parse_float=Decimal, parse_int=Decimal, parse_constant=refuse))
    return text


SORT_LABEL = "sort_custom"


def sort_key(record: Record, key: str, tenant: Any) -> SortKey:
    """Order by custom field ``key``: by its JSON value (numbers numerically, dates and texts as text,
    false before true; records without a value, or whose definition is deleted, first), then id.
    ``tenant``: the statement's tenant (a value or a parameter)."""
    from records.declare import SortKey

    table = record.table
    d = DEFINITIONS
    live = exists(select(d.c.id).where(d.c.tenant_id == tenant, d.c.record_type == record.name,
                                       d.c.key == key, d.c.deleted_at.is_(None)))
    guarded = func.coalesce(case((live, type_coerce(table.c.custom_fields[key], JSONB))),
                            literal_column("'null'::jsonb"))
    return SortKey(f"custom:{key}", type_coerce(guarded, JSONText), SORT_LABEL, parse_json_text)


# ---- aggregates ---------------------------------------------------------------------------------

GROUPABLE = (CustomFieldType.SINGLE_SELECT, CustomFieldType.BOOLEAN, CustomFieldType.USER)
"""The types an aggregate may group by (``groupByCustom``): one value per record, from a short list
(options, true/false, the members); texts, numbers and dates would make a group of nearly every record."""
MEASURABLE = (CustomFieldType.NUMBER, CustomFieldType.MONEY)
"""The types an aggregate may measure (``measureCustom``): count, sum, avg, min, max; money per currency."""
MAX_GROUP_KEYS = 5
MAX_MEASURE_KEYS = 10


def asked_keys(argument: str, given: Sequence[str] | None, maximum: int) -> list[str]:
    """The custom field keys of an aggregate's ``argument`` (``groupByCustom``, ``measureCustom``), each
    once, in the order given; BAD_USER_INPUT naming ``<argument>.<index>`` for a malformed key, or
    ``argument`` for too many."""
    keys = list(dict.fromkeys(check_key(f"{argument}.{i}", key) for i, key in enumerate(given or ())))
    if len(keys) > maximum:
        raise BadUserInput(argument, f"at most {maximum} custom fields")
    return keys


def _value(source: Any, key: Any) -> ColumnElement[Any]:
    return type_coerce(source.c.custom_fields[key], JSONB)


@dataclass(frozen=True)
class CustomGroup:
    """Group by custom field ``key``: its stored JSON value (an option, true/false, a user id; SQL null
    for the records without one). ``index``: its place among the statement's groups, naming its
    parameter."""

    key: str
    index: int

    @property
    def parameter(self) -> Any:
        return bindparam(f"group_custom_{self.index}", self.key, type_=String())

    def expression(self, source: Any) -> ColumnElement[Any]:
        return type_coerce(source.c.custom_fields[self.parameter], ExactJSONB())

    def live(self, record_name: str, tenant: Any) -> ColumnElement[bool]:
        """The tenant has a live definition of the key, of a ``GROUPABLE`` type."""
        return _live(record_name, tenant, self.parameter, GROUPABLE)


@dataclass(frozen=True)
class CustomMeasure:
    """Measure custom field ``key`` (NUMBER or MONEY). The statement does not know which before it
    runs, so it measures both ways: the plain number (``plain``: the values without a currency) and
    the money per currency (``money``: those with one); the definition's type picks one."""

    key: str
    index: int
    plain = True
    money = True

    @property
    def name(self) -> str:
        return self.key

    @property
    def parameter(self) -> Any:
        return bindparam(f"measure_custom_{self.index}", self.key, type_=String())

    def value(self, source: Any) -> ColumnElement[Any]:
        """The number (NUMBER) or the amount (MONEY), as numeric; null without a value."""
        element = _value(source, self.parameter)
        return case({"number": cast(source.c.custom_fields[self.parameter].astext, Numeric()),
                     "object": cast(element["amount"].astext, Numeric())}, value=func.jsonb_typeof(element))

    def currency_of(self, source: Any) -> ColumnElement[Any]:
        """The currency of a MONEY value (null for a number, or without a value)."""
        currency: ColumnElement[Any] = _value(source, self.parameter)["currency"].astext
        return currency

    def live(self, record_name: str, tenant: Any) -> ColumnElement[bool]:
        """The tenant has a live definition of the key, of a ``MEASURABLE`` type."""
        return _live(record_name, tenant, self.parameter, MEASURABLE)


@dataclass(frozen=True)
class Described:
    """A live definition as an aggregate's statement reads it (``described``)."""

    key: str
    label: str
    type: CustomFieldType


def described(record_name: str, tenant: Any, parameters: Sequence[Any]) -> ColumnElement[Any]:
    """The tenant's live definitions of the keys in ``parameters``: a JSON list of key, label and
    type (a scalar subquery: the statement reads it once)."""
    d = DEFINITIONS
    item = func.json_build_object("key", d.c.key, "label", d.c.label, "type", d.c.type)
    return (select(func.json_agg(item, type_=JSON()))
            .where(d.c.tenant_id == tenant, d.c.record_type == record_name, d.c.deleted_at.is_(None),
                   d.c.key.in_(list(parameters)))
            .scalar_subquery())


def read_described(value: Any) -> dict[str, Described]:
    """What ``described`` returned, by key."""
    return {item["key"]: Described(item["key"], item["label"], CustomFieldType(item["type"])) for item in value or ()}


def check_described(found: Mapping[str, Described], groups: Sequence[str], measures: Sequence[str],
                    plural_label: str) -> None:
    """BAD_USER_INPUT naming ``groupByCustom.<key>`` or ``measureCustom.<key>`` for a key the tenant has no
    live definition of (another tenant's, a deleted one's), or one of a type that cannot be grouped
    (``GROUPABLE``) or measured (``MEASURABLE``)."""
    for argument, keys, types, verb in (("groupByCustom", groups, GROUPABLE, "group by"),
                                        ("measureCustom", measures, MEASURABLE, "measure")):
        for key in keys:
            definition = found.get(key)
            if definition is None:
                raise BadUserInput(f"{argument}.{key}", f"is not a custom field of {plural_label}")
            if definition.type not in types:
                raise BadUserInput(f"{argument}.{key}", f"is a {definition.type.name} field: aggregates {verb} "
                                                        f"{either(types)} fields")


def either(types: Sequence[CustomFieldType]) -> str:
    """``SINGLE_SELECT, BOOLEAN or USER``."""
    names = [t.name for t in types]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
