"""The vocabulary of record declarations: one ``Record`` says everything Atrium knows of a record type.

A declaration (``records/crm.py``) names the table and, for every field the API reads or writes,
its validation rule (``records.rules``) and whether it is set on create or update; the to-one
relations (``ToOne``: the key column, the target, what a delete of the target does to this record)
and child lists (``Children``); the filters, orderings and search of its connection; record-level
checks; the permission of each operation (``Access``); the routing keys of its change events; and
which root fields the API derives for it (``Root``).

Everything else is derived from it, nowhere written again: the input, patch, filter and order
types and the CRUD fields (``resolvers/crud.py``), loaders and node lookup (``models.loaders``,
``schema/objects.py``), reference checks and the effects of a delete on dependents
(``resolvers/writes.py``), prefetching of relations, and sort keys and cursors (``resolvers/paging.py``).

This module holds no database access and no GraphQL types: only data and pure functions.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    Date,
    DateTime,
    Integer,
    Numeric,
    Select,
    String,
    Table,
    all_,
    and_,
    any_,
    bindparam,
    cast,
    exists,
    func,
    literal,
    null,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from strawberry.types.unset import UNSET

from auth.roles import Permission
from core.errors import BadUserInput, HiddenField
from models.loaders import TENANT
from models.visibility import PEERS, RESTRICTED
from records.custom import CustomFilter, Pending, hidden_key, member, rule_name, sort_key
from records.rules import Choice, Rule, Text


@cache
def snake(name: str) -> str:
    """``DealLineItem`` -> ``deal_line_item``."""
    return "".join(f"_{c.lower()}" if c.isupper() and i else c.lower() for i, c in enumerate(name))


@cache
def camel(column: str) -> str:
    """The GraphQL name of a column (``stage_id`` -> ``stageId``)."""
    head, *rest = column.split("_")
    return head + "".join(part.title() for part in rest)


class Create(enum.Enum):
    REQUIRED = "required"
    """In the create input, non-null."""
    OPTIONAL = "optional"
    """In the create input, nullable (``Field.default`` when left out)."""
    NEVER = "never"
    """Not an input on create: derived (``ToOne.copies``) or set by ``Field.fallback``."""


class Writer(Protocol):
    """What a field's fallback may use of the write in progress (``resolvers.writes.Change``)."""

    @property
    def tenant_id(self) -> uuid.UUID: ...

    @property
    def user_id(self) -> uuid.UUID: ...

    async def scalar(self, statement: Select[Any]) -> Any: ...


Fallback = Callable[[Writer, Mapping[str, Any]], Awaitable[Any]]
"""Computes a field's value on create when the input gives none (gets the other values)."""


@dataclass(frozen=True, eq=False)
class Field:
    """One column as the API writes it."""

    column: str
    rule: Rule
    create: Create = Create.OPTIONAL
    update: bool = True
    """In the patch type (every patch field is optional; null clears a nullable column)."""
    default: Any = None
    """The create input's default for an OPTIONAL field (shown in the SDL)."""
    description: str | None = None
    fallback: Fallback | None = None
    unique: bool = False
    """No two records of the tenant share a value (BAD_USER_INPUT naming the field otherwise)."""
    sequential: bool = False
    """Its fallback depends on the records created before it (a stage's position after the last
    one): a batch create of this record type inserts its records one at a time."""
    restrictable: bool = False
    """A tenant may hide it from roles (``auth.fields``): its object field is nullable and guarded
    (``schema.objects.guarded``), and no default ordering may use it (``records.crm`` checks)."""

    @property
    def name(self) -> str:
        return camel(self.column)


class OnDelete(enum.Enum):
    """What deleting the target of a ``ToOne`` does to the records that point at it (through the
    write path, so each gets its version, audit row and change event)."""

    RESTRICT = "restrict"
    """The delete is refused while such records exist."""
    CASCADE = "cascade"
    """They are deleted too."""
    SET_NULL = "set null"
    """They are unlinked; one left with none of the links an ``AtLeastOne`` needs is deleted."""


@dataclass(eq=False)
class ToOne:
    """A record's reference to one record of ``target``, through the column ``key``."""

    name: str
    key: str
    target: Callable[[], Record]
    on_delete: OnDelete = OnDelete.RESTRICT
    copies: tuple[str, ...] = ()
    """Columns copied from the target's row whenever ``key`` is set (a deal's ``pipeline_id``
    follows its stage)."""
    requires: tuple[str, Any, str] | None = None
    """``(column, value, message)``: the target may be referenced only while its ``column`` holds
    ``value`` (an inactive product cannot be added to a deal); BAD_USER_INPUT ``message`` otherwise."""
    description: str | None = None
    owner: Record = field(init=False, repr=False)
    """The record holding the key (set by ``Record``)."""


class Direction(enum.Enum):
    ASC = "asc"
    DESC = "desc"


def ordering(table: Table, spec: Sequence[str]) -> tuple[ColumnElement[Any], ...]:
    """SQL ordering of ``("-occurred_at", "-id")``-style columns (``-``: descending)."""
    return tuple(table.c[s[1:]].desc() if s.startswith("-") else table.c[s].asc() for s in spec)


@dataclass(eq=False)
class Children:
    """A list of the records whose ``via`` relation points at this one (a field with ``first``)."""

    name: str
    via: Callable[[], ToOne]
    order: tuple[str, ...]
    first: int = 20
    """Default of the field's ``first`` argument."""
    maximum: int = 50
    """Largest ``first`` (and, for nested creates, the most children one create may hold)."""
    nested: bool = False
    """Created together with the parent, from a list in the parent's create input."""
    description: str | None = None
    first_argument: bool = True
    """The field takes ``first`` (a list without it, like a pipeline's stages, returns up to ``maximum``)."""

    @property
    def relation(self) -> ToOne:
        return self.via()

    @property
    def query(self) -> Select[Any]:
        return self.relation.owner.query

    @property
    def key(self) -> ColumnElement[Any]:
        return self.relation.owner.table.c[self.relation.key]

    @property
    def order_by(self) -> tuple[ColumnElement[Any], ...]:
        return ordering(self.relation.owner.table, self.order)


HiddenOf = Callable[[str], Collection[str]]
"""The caller's hidden fields of a record type (``auth.session.Session.hidden``): API names."""


def nothing_hidden(record_type: str) -> Collection[str]:
    return ()


# ---- filters --------------------------------------------------------------------------------------

def list_of(annotation: Any) -> Any:
    """``list[annotation]`` for an annotation known only at run time."""
    return list[annotation]


@dataclass(frozen=True)
class FilterField:
    """One field of a filter input: its GraphQL name, Python annotation and description."""

    python_name: str
    annotation: Any
    description: str | None = None


def param(name: str) -> str:
    """The bind parameter carrying filter field ``name`` (``filter_amount_min``)."""
    return f"filter_{name}"


@dataclass(frozen=True, eq=False)
class Equals:
    """``<name>: T``: the column equals the value (checked by the field's rule)."""

    column: str
    name: str | None = None

    def fields(self, record: Record) -> list[FilterField]:
        return [FilterField(self.name or self.column, record.field(self.column).rule.annotation)]

    def bind(self, record: Record, values: Mapping[str, Any]) -> dict[str, Any]:
        name = self.name or self.column
        value = values.get(name)
        if value is None:
            return {}
        return {param(name): record.field(self.column).rule(f"filter.{camel(name)}", value)}

    def where(self, record: Record, source: Any, bound: Collection[str],
              prefix: str = "") -> list[ColumnElement[bool]]:
        name = param(self.name or self.column)
        if name not in bound:
            return []
        column = source.c[self.column]
        conditions = [column == bindparam(prefix + name, type_=column.type)]
        relation = record.relation_by_key(self.column)
        if relation is not None and relation.target().trash:
            # A record in the trash does not exist: nothing is linked to it (its links read null).
            target = relation.target()
            other = target.table.alias()
            conditions.append(exists(select(other.c.id).where(
                other.c.tenant_id == source.c.tenant_id, other.c.id == column, *target.visible(other))))
        return conditions


@dataclass(frozen=True, eq=False)
class AnyOf:
    """``<name>: [T!]``: the column equals one of the values."""

    column: str

    def fields(self, record: Record) -> list[FilterField]:
        return [FilterField(self.column, list_of(record.field(self.column).rule.annotation))]

    def bind(self, record: Record, values: Mapping[str, Any]) -> dict[str, Any]:
        chosen = values.get(self.column)
        if not chosen:
            return {}
        rule = record.field(self.column).rule
        name = f"filter.{camel(self.column)}"
        return {param(self.column): [rule(name, v) for v in chosen]}

    def where(self, record: Record, source: Any, bound: Collection[str],
              prefix: str = "") -> list[ColumnElement[bool]]:
        name = param(self.column)
        column = source.c[self.column]
        return [column == any_(bindparam(prefix + name, type_=ARRAY(column.type)))] if name in bound else []


@dataclass(frozen=True, eq=False)
class Range:
    """``<low>: T`` and ``<high>: T``, both inclusive; ``low`` may not exceed ``high``."""

    column: str
    low: str
    high: str

    def fields(self, record: Record) -> list[FilterField]:
        annotation = record.field(self.column).rule.annotation
        return [FilterField(self.low, annotation), FilterField(self.high, annotation)]

    def bind(self, record: Record, values: Mapping[str, Any]) -> dict[str, Any]:
        rule = record.field(self.column).rule
        out: dict[str, Any] = {}
        for name in (self.low, self.high):
            if (value := values.get(name)) is not None:
                out[param(name)] = rule(f"filter.{camel(name)}", value)
        low, high = out.get(param(self.low)), out.get(param(self.high))
        if low is not None and high is not None and low > high:
            raise BadUserInput(f"filter.{camel(self.low)}", f"must not exceed {camel(self.high)}")
        return out

    def where(self, record: Record, source: Any, bound: Collection[str],
              prefix: str = "") -> list[ColumnElement[bool]]:
        column = source.c[self.column]
        out: list[ColumnElement[bool]] = []
        if param(self.low) in bound:
            out.append(column >= bindparam(prefix + param(self.low), type_=column.type))
        if param(self.high) in bound:
            out.append(column <= bindparam(prefix + param(self.high), type_=column.type))
        return out


@dataclass(frozen=True, eq=False)
class Below:
    """``<name>: T``: the column is strictly less than the value."""

    column: str
    name: str

    def fields(self, record: Record) -> list[FilterField]:
        return [FilterField(self.name, record.field(self.column).rule.annotation)]

    def bind(self, record: Record, values: Mapping[str, Any]) -> dict[str, Any]:
        value = values.get(self.name)
        if value is None:
            return {}
        return {param(self.name): record.field(self.column).rule(f"filter.{camel(self.name)}", value)}

    def where(self, record: Record, source: Any, bound: Collection[str],
              prefix: str = "") -> list[ColumnElement[bool]]:
        column = source.c[self.column]
        name = param(self.name)
        return [column < bindparam(prefix + name, type_=column.type)] if name in bound else []


SEARCH_TERM = Text(100)


def like_pattern(term: str) -> str:
    """A case-insensitive substring pattern for ``ILIKE ... ESCAPE '\\'``, wildcards in ``term`` escaped."""
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


@dataclass(frozen=True, eq=False)
class Search:
    """``search: String``: a case-insensitive substring of any of ``columns``, or of the columns of
    records reached through to-one relations (``related``: relation name -> its columns)."""

    columns: tuple[str, ...]
    related: tuple[tuple[str, tuple[str, ...]], ...] = ()
    description: str | None = None

    def fields(self, record: Record) -> list[FilterField]:
        return [FilterField("search", str, self.description)]

    def bind(self, record: Record, values: Mapping[str, Any]) -> dict[str, Any]:
        raw = values.get("search")
        if raw is None or not raw.strip():
            return {}
        term = SEARCH_TERM("filter.search", raw)
        assert term is not None
        return {param("search"): like_pattern(term)}

    def where(self, record: Record, source: Any, bound: Collection[str],
              prefix: str = "", hidden: HiddenOf = nothing_hidden) -> list[ColumnElement[bool]]:
        """Columns hidden from the caller (``hidden``) are not searched: a match never tells their values."""
        if param("search") not in bound:
            return []
        pattern = bindparam(prefix + param("search"), type_=String())
        own = self.searched(record, hidden)
        matches: list[ColumnElement[bool]] = [source.c[c].ilike(pattern, escape="\\") for c in own]
        for name, columns in self.related:
            relation = record.relation(name)
            target = relation.target()
            other = target.table.alias()
            theirs = [c for c in columns if camel(c) not in hidden(target.name)]
            if not theirs:
                continue
            matches.append(exists(select(other.c.id).where(
                other.c.tenant_id == source.c.tenant_id, other.c.id == source.c[relation.key], *target.visible(other),
                or_(*(other.c[c].ilike(pattern, escape="\\") for c in theirs)))))
        return [or_(*matches)] if matches else [literal(False)]

    def searched(self, record: Record, hidden: HiddenOf) -> list[str]:
        """The record's own columns searched for a caller who cannot see ``hidden``."""
        return [c for c in self.columns if camel(c) not in hidden(record.name)]

    def skips(self, record: Record, hidden: HiddenOf) -> bool:
        """Whether some searched column (own or related) is hidden from the caller."""
        if len(self.searched(record, hidden)) < len(self.columns):
            return True
        return any(camel(c) in hidden(record.relation(name).target().name)
                   for name, columns in self.related for c in columns)


Filter = Equals | AnyOf | Range | Below | Search | CustomFilter

def filter_columns(f: Filter) -> list[tuple[str, str]]:
    """``(filter field, column)`` of each field a (non-search) filter compares with a column."""
    if isinstance(f, Equals):
        return [(f.name or f.column, f.column)]
    if isinstance(f, AnyOf):
        return [(f.column, f.column)]
    if isinstance(f, Range):
        return [(f.low, f.column), (f.high, f.column)]
    if isinstance(f, Below):
        return [(f.name, f.column)]
    return []


# ---- orderings ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SortKey:
    """A sortable expression and how its cursor value round-trips through a string."""

    name: str
    """The ordering's name inside cursors (a cursor of another ordering is refused)."""
    expression: ColumnElement[Any]
    label: str
    """The result column holding the sort value in the connection's query."""
    parse: Callable[[str], Any]

    def value(self, row: Any) -> Any:
        return row._mapping[self.label]


def parse_decimal(text: str) -> Decimal:
    value = Decimal(text)
    if not value.is_finite() or abs(value) >= Decimal("1e18"):
        raise ValueError(text)
    return value


def parse_for(expression: ColumnElement[Any]) -> Callable[[str], Any]:
    """How a cursor's text becomes a value of ``expression``'s SQL type."""
    kind = expression.type
    if isinstance(kind, DateTime):
        return dt.datetime.fromisoformat
    if isinstance(kind, Date):
        return dt.date.fromisoformat
    if isinstance(kind, Numeric):
        return parse_decimal
    if isinstance(kind, Integer):
        return int
    return str


@dataclass(frozen=True, eq=False)
class Sort:
    """One value of the record's ``<Type>OrderField`` enum."""

    name: str
    column: str
    cursor: str | None = None
    """The ordering's name in cursors (default: the column's GraphQL name)."""
    expression: Callable[[Table], ColumnElement[Any]] | None = None
    """Sort by this instead of the bare column (e.g. missing close dates last)."""

    def key(self, table: Table) -> SortKey:
        expression = self.expression(table) if self.expression else table.c[self.column]
        label = self.column if self.expression is None else f"sort_{self.column}"
        return SortKey(self.cursor or camel(self.column), expression, label, parse_for(expression))


# ---- record-level checks --------------------------------------------------------------------------

@dataclass(frozen=True)
class AtLeastOne:
    """At least one of ``columns`` is set (an activity is about a deal, a contact or a company)."""

    columns: tuple[str, ...]
    field: str
    message: str

    def __call__(self, row: Mapping[str, Any]) -> None:
        if all(row.get(c) is None for c in self.columns):
            raise BadUserInput(self.field, self.message)


@dataclass(frozen=True)
class ExactlyOne:
    """Exactly one of ``columns`` is set (a note belongs to one deal, contact or company)."""

    columns: tuple[str, ...]
    field: str
    message: str

    def __call__(self, row: Mapping[str, Any]) -> None:
        if sum(row.get(c) is not None for c in self.columns) != 1:
            raise BadUserInput(self.field, self.message)


@dataclass(frozen=True)
class OnlyWhen:
    """``column`` may be set only while ``when`` holds one of ``values`` (only tasks have due dates)."""

    column: str
    when: str
    values: tuple[str, ...]
    message: str

    def __call__(self, row: Mapping[str, Any]) -> None:
        if row.get(self.column) is not None and row.get(self.when) not in self.values:
            raise BadUserInput(camel(self.column), self.message)


Check = AtLeastOne | ExactlyOne | OnlyWhen


@dataclass(frozen=True)
class Rollup:
    """While a record has children through ``via`` (this record's to-one relation), the parent's
    ``column`` is the sum of the children's ``total``: recomputed, through the write path, whenever
    a child is created, changed or deleted. Meanwhile the parent's ``column`` and ``locks`` cannot be
    set directly. With no children left, the parent keeps its last value and may be set again."""

    via: str
    column: str
    total: str
    locks: tuple[str, ...] = ()


# ---- access and root fields -----------------------------------------------------------------------

@dataclass(frozen=True)
class Access:
    """The permission each operation on the record needs (shown in the SDL next to each field)."""

    read: Permission = Permission.READ
    create: Permission = Permission.WRITE
    update: Permission = Permission.WRITE
    delete: Permission = Permission.DELETE


class Listing(enum.Enum):
    NONE = "none"
    CONNECTION = "connection"
    """``<plural>(filter, orderBy, first, after, last, before)``: a keyset-paged connection."""
    LIST = "list"
    """``<plural>``: every record (up to ``Root.limit``) in the default order."""


@dataclass(frozen=True)
class Root:
    """Which root fields the API derives for the record, and their descriptions."""

    listing: Listing = Listing.CONNECTION
    get: bool = True
    create: bool = True
    update: bool = True
    delete: bool = True
    parent: str | None = None
    """A to-one relation the create mutation takes as an argument of its own (``createStage(pipelineId:)``)
    instead of inside its input."""
    limit: int = 500
    batch: bool = True
    """Batch mutations beside each single one: ``create<Plural>``, ``update<Plural>``,
    ``delete<Plural>``, and ``upsert<Plural>`` when the record has an ``external_id`` field
    (``resolvers.batch``)."""
    descriptions: Mapping[str, str] = field(default_factory=dict)
    """By operation: ``list``, ``get``, ``create``, ``update``, ``delete``, ``restore`` (trashable
    records), ``input``."""


NO_ROOT = Root(listing=Listing.NONE, get=False, create=False, update=False, delete=False)


class Operation(enum.Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@dataclass(frozen=True)
class Transition:
    """An update that changes ``column`` is also the event ``<record>.<name>`` (a deal ``moved``
    when its stage changes): what webhooks offer besides ``created``/``updated``/``deleted``."""

    name: str
    column: str
    description: str


# ---- aggregations ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    """One value of the record's ``<Name>GroupBy`` enum: group by ``column`` (by its calendar month,
    the first day of it in UTC, with ``month``). A key column of a to-one relation shows as the related
    record in each group (``stage``); any other as its value (``status``, ``closeMonth``)."""

    name: str
    column: str
    month: bool = False

    @property
    def field_name(self) -> str:
        """The Python name of the group's key field (``close_month``; a relation's name for a key)."""
        return self.name.lower()

    def expression(self, source: Any) -> ColumnElement[Any]:
        column = source.c[self.column]
        if not self.month:
            return column  # type: ignore[no-any-return]
        if isinstance(column.type, DateTime):
            column = func.timezone("UTC", column)
        return cast(func.date_trunc("month", column), Date)


@dataclass(frozen=True)
class Measure:
    """A numeric column aggregated per group (count, sum, avg, min, max). With ``currency`` (the
    column holding its currency) it is money: aggregated per currency, never across currencies."""

    column: str
    currency: str | None = None

    @property
    def name(self) -> str:
        return camel(self.column)

    @property
    def plain(self) -> bool:
        """Aggregated as one number (``NumberAggregate``)."""
        return self.currency is None

    @property
    def money(self) -> bool:
        """Aggregated per currency (``[MoneyAggregate!]!``)."""
        return self.currency is not None

    def value(self, source: Any) -> ColumnElement[Any]:
        return source.c[self.column]  # type: ignore[no-any-return]

    def currency_of(self, source: Any) -> ColumnElement[Any]:
        """The currency of each value (SQL null for a plain number)."""
        return source.c[self.currency] if self.currency else null()


@dataclass(frozen=True)
class Aggregation:
    """What ``<plural>Aggregate(filter:, groupBy:, first:)`` may group by and what it aggregates.

    Groups and measures are columns (or expressions of the record's row); a record with
    ``custom_fields`` may also be grouped and measured by the tenant's custom fields
    (``records.custom.CustomGroup`` and ``CustomMeasure``: the same interface over the JSON value).
    Record visibility applies through the same ``Record.filtered`` every list uses."""

    groups: tuple[Group, ...]
    measures: tuple[Measure, ...] = ()


@dataclass(eq=False)
class Record:
    """A record type (module docstring)."""

    name: str
    """Its GraphQL type name: also the prefix of its global IDs, its audit ``entity_type`` and its
    change events' ``recordType``."""
    table: Table
    plural: str
    fields: tuple[Field, ...] = ()
    relations: tuple[ToOne, ...] = ()
    children: tuple[Children, ...] = ()
    filters: tuple[Filter, ...] = ()
    sorts: tuple[Sort, ...] = ()
    default_sort: str | None = None
    default_direction: Direction = Direction.ASC
    checks: tuple[Check, ...] = ()
    rollups: tuple[Rollup, ...] = ()
    access: Access = Access()
    root: Root = Root()
    routing: Mapping[str, str] = field(default_factory=dict)
    """Change-event routing keys -> the column holding each (``{"pipeline": "pipeline_id"}``)."""
    lookup: Select[Any] | None = None
    """Rows of the tenant (default: the table filtered on the tenant); a user is a joined row."""
    lookup_key: ColumnElement[Any] | None = None
    transitions: tuple[Transition, ...] = ()
    by_hand: frozenset[Operation] = frozenset()
    """Operations hand-written mutations perform on the record through the write path, beyond its
    derived root fields (members are added, changed and removed by ``resolvers.viewer``)."""
    aggregation: Aggregation | None = None
    """Groupable and aggregatable fields; None: the record has no aggregate root field."""
    import_key: str | None = None
    """The column a CSV import finds existing records by (``resolvers.imports``): a row whose value
    matches a record of the tenant updates it, any other row creates one. Default: ``external_id``
    when the record has that field (``import_by``)."""
    trash: bool = False
    """Deleting the record moves it to the trash (its table has ``deleted_at``, ``deleted_by`` and
    ``trash_batch``): hidden from every read (through ``query``, ``filtered`` and ``visible``),
    restored by ``restore<Name>``, removed for good by a purge after the tenant's retention. Every
    record a trashable record's delete cascades to must be trashable too (``records.crm`` checks)."""
    owner: str | None = None
    """The column naming the member who owns a record: a tenant may then restrict who sees records of
    this type to their owner, the owner's teams and those teams' managers (``docs/visibility.md``),
    in every query of the record (``visible``) and in row-level security (migration 0016)."""
    custom_fields: bool = False
    """Tenants define custom fields on the record (``records.custom``): its table has the
    ``custom_fields`` JSONB column; its inputs, filter, ordering and object type take them."""

    def __post_init__(self) -> None:
        for relation in self.relations:
            relation.owner = self
        if self.custom_fields:
            self.filters = (*self.filters, CustomFilter())
        self._fields = {f.column: f for f in self.fields}
        self._relations = {r.name: r for r in self.relations}

    def visible(self, source: Any) -> list[ColumnElement[bool]]:
        """The conditions that leave out the record's rows in the trash and those the caller may not
        see (``scoped``), over ``source`` (the table or an alias of it): every query of the record's
        rows says them (row-level security says them too, as a backstop)."""
        return ([source.c.deleted_at.is_(None)] if self.trash else []) + self.scoped(source)

    def scoped(self, source: Any) -> list[ColumnElement[bool]]:
        """The conditions that leave out the rows the caller may not see: for an ``owner``, the
        record's type is not restricted for them or its owner is one of their peers; for each
        relation in ``followed``, the record it belongs to is one they see (a line item goes with its
        deal). The values are the running statement's view (``models.visibility``)."""
        out: list[ColumnElement[bool]] = []
        if self.owner is not None:
            out.append(or_(unrestricted(self), source.c[self.owner] == any_(PEERS)))
        for relation in self.followed:
            target = relation.target()
            other = target.table.alias()
            key = source.c[relation.key]
            out.append(or_(key.is_(None), and_(*(unrestricted(r) for r in target.owners)), exists(
                select(other.c.id).where(other.c.tenant_id == source.c.tenant_id, other.c.id == key,
                                         *target.scoped(other)))))
        return out

    @property
    def owned(self) -> bool:
        """Whether a tenant may restrict who sees the record's rows (it has an ``owner``)."""
        return self.owner is not None

    @property
    def followed(self) -> tuple[ToOne, ...]:
        """The relations whose target's visibility the record shares: those it is deleted with
        (``CASCADE``) to a record whose visibility may be restricted (a deal's line items and notes)."""
        return tuple(r for r in self.relations if r.on_delete is OnDelete.CASCADE and r.target().owners)

    @property
    def owners(self) -> tuple[Record, ...]:
        """The owned record types whose audience decides who sees this record (itself, when owned)."""
        found = [self] if self.owned else []
        for relation in self.followed:
            found += [r for r in relation.target().owners if r not in found]
        return tuple(found)

    # models.loaders.Lookup
    @property
    def query(self) -> Select[Any]:
        """The tenant's rows of the record that are not in the trash (``TENANT`` bound by the caller)."""
        if self.lookup is not None:
            return self.lookup
        return select(self.table).where(self.table.c.tenant_id == TENANT, *self.visible(self.table))

    @property
    def key(self) -> ColumnElement[Any]:
        return self.lookup_key if self.lookup_key is not None else self.table.c.id

    @property
    def singular(self) -> str:
        """The Python name of the record's single-record root field (``deal``, ``deal_line_item``)."""
        return snake(self.name)

    @property
    def label(self) -> str:
        """The record type in words, for messages (``deal line item``)."""
        return snake(self.name).replace("_", " ")

    @property
    def plural_label(self) -> str:
        return self.plural.replace("_", " ")

    def field(self, column: str) -> Field:
        return self._fields[column]

    def relation(self, name: str) -> ToOne:
        return self._relations[name]

    def relation_by_key(self, column: str) -> ToOne | None:
        return next((r for r in self.relations if r.key == column), None)

    def child_list(self, name: str) -> Children:
        return next(c for c in self.children if c.name == name)

    def description(self, operation: str) -> str | None:
        return self.root.descriptions.get(operation)

    def nullable(self, column: str) -> bool:
        return bool(self.table.c[column].nullable)

    def has(self, column: str) -> bool:
        """Whether the API writes ``column`` (a declared ``Field``)."""
        return column in self._fields

    @property
    def import_by(self) -> str | None:
        """The column CSV imports dedupe by (``import_key``, else ``external_id`` when declared)."""
        if self.import_key is not None:
            return self.import_key
        return "external_id" if self.has("external_id") else None

    @property
    def importable(self) -> bool:
        """Whether CSV imports create it: the API creates it, with no parent argument of its own."""
        return self.root.create and self.root.parent is None and bool(self.fields)

    @property
    def sequential(self) -> bool:
        """Batch creates insert this record's rows one at a time (``resolvers.batch``): it has rollups
        (each row recomputes its parent) or a sequential fallback (each needs the rows before it)."""
        return bool(self.rollups) or any(f.sequential for f in self.fields)

    # ---- inputs -> column values (validated; references are checked by the write path) ----------

    def create_values(self, given: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Column values of a create input (``given``: python field name -> value), rules applied."""
        out: dict[str, Any] = {}
        for f in self.fields:
            if f.create is Create.NEVER:
                continue
            value = given.get(f.column)
            out[f.column] = None if value is None else f.rule(prefix + f.name, value)
        if self.custom_fields:
            custom = given.get("custom_fields")
            out["custom_fields"] = Pending.of(None if custom is UNSET else custom, prefix)
        return out

    def patch_values(self, given: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        """Column values of a patch: only the fields given (not UNSET); null only where allowed."""
        out: dict[str, Any] = {}
        for f in self.fields:
            if not f.update or (value := given.get(f.column, UNSET)) is UNSET:
                continue
            if value is None:
                if not self.nullable(f.column):
                    raise BadUserInput(prefix + f.name, "must not be null")
                out[f.column] = None
            else:
                out[f.column] = f.rule(prefix + f.name, value)
        if self.custom_fields and (custom := given.get("custom_fields", UNSET)) is not UNSET and custom is not None:
            out["custom_fields"] = Pending.of(custom, prefix)
        return out

    def check(self, row: Mapping[str, Any]) -> None:
        """Every record-level check over a whole row (a new one, or the current one with a patch)."""
        for check in self.checks:
            check(row)

    # ---- connections --------------------------------------------------------------------------------

    def sort_keys(self) -> dict[str, SortKey]:
        return {s.name: s.key(self.table) for s in self.sorts}

    def custom_sort_key(self, key: str, tenant: Any) -> SortKey:
        """The ordering by custom field ``key`` in ``tenant``'s statement (``records.custom.sort_key``)."""
        return sort_key(self, key, tenant)

    def bind_filters(self, filters: Mapping[str, Any] | None) -> dict[str, Any]:
        """The validated parameters of a filter input (filter field -> value); BAD_USER_INPUT naming
        the field when a value breaks its rule."""
        bound: dict[str, Any] = {}
        for f in self.filters if filters else ():
            bound.update(f.bind(self, filters or {}))
        return bound

    def filtered(self, tenant: Any, bound: Collection[str], prefix: str = "",
                 hidden: HiddenOf = nothing_hidden) -> Select[Any]:
        """The tenant's records (not in the trash) matching the filters whose parameters are in ``bound`` (AND of all),
        with the computed sort values as extra columns. ``tenant``: a value or a bind parameter;
        ``prefix`` is put before every filter parameter's name; a search leaves out the ``hidden`` columns."""
        extra = [s.expression(self.table).label(f"sort_{s.column}") for s in self.sorts if s.expression]
        query = select(self.table, *extra).where(self.table.c.tenant_id == tenant, *self.visible(self.table))
        for f in self.filters:
            if isinstance(f, Search):
                query = query.where(*f.where(self, self.table, bound, prefix, hidden))
            elif isinstance(f, CustomFilter):
                query = query.where(*f.where(self, self.table, bound, prefix, tenant=tenant))
            else:
                query = query.where(*f.where(self, self.table, bound, prefix))
        return query

    def listing_query(self, tenant_id: uuid.UUID, filters: Mapping[str, Any] | None,
                      hidden: HiddenOf = nothing_hidden) -> Select[Any]:
        """``filtered`` with the values of ``filters`` bound (what the resolvers run)."""
        bound = self.bind_filters(filters)
        query = self.filtered(tenant_id, bound, hidden=hidden)
        return query.params(bound) if bound else query

    # ---- field rules (``auth.fields``) -----------------------------------------------------------

    def restrictable(self) -> dict[str, Field]:
        """The fields a tenant may hide, by their API names (what a field rule names)."""
        return {f.name: f for f in self.fields if f.restrictable}

    def refuse_hidden(self, hidden: Collection[str], role: str, *, filters: Mapping[str, Any] | None = None,
                      sort: str | None = None, custom_sort: str | None = None, columns: Collection[str] = (),
                      custom_keys: Collection[str] = (), prefix: str = "") -> None:
        """FORBIDDEN naming the first filter field given (``filters``: python name -> value, None or
        empty ones left out; a ``custom`` condition by its index), ordering (``sort``: a ``Sort`` name;
        ``custom_sort``: a custom field's key), written column (``columns``, named with ``prefix``) or
        written custom field (``custom_keys``, named ``<prefix>customFields.<key>``) that reads a field
        in ``hidden`` (API names; a custom field as ``custom.<key>``, ``records.custom.rule_name``)."""
        if not hidden:
            return
        for f in self.filters if filters else ():
            if isinstance(f, CustomFilter):
                for i, condition in enumerate((filters or {}).get("custom") or ()):
                    self.refuse_hidden_custom(hidden, role, member(condition, "key"), f"filter.custom.{i}")
                continue
            for name, column in filter_columns(f):
                given = (filters or {}).get(name)
                if camel(column) in hidden and given is not None and given != []:
                    raise HiddenField(f"filter.{camel(name)}", self.name, camel(column), role)
        if sort is not None:
            column = next(s.column for s in self.sorts if s.name == sort)
            if camel(column) in hidden:
                raise HiddenField("orderBy.field", self.name, camel(column), role)
        if custom_sort is not None:
            self.refuse_hidden_custom(hidden, role, custom_sort, "orderBy.custom")
        for column in columns:
            if camel(column) in hidden:
                raise HiddenField(prefix + camel(column), self.name, camel(column), role)
        for key in custom_keys:
            self.refuse_hidden_custom(hidden, role, key, f"{prefix}customFields.{key}")

    def refuse_hidden_custom(self, hidden: Collection[str], role: str, key: Any, field: str) -> None:
        """FORBIDDEN naming ``field`` when custom field ``key`` of the record is in ``hidden``: what a
        filter, an ordering, an input (and a group or measure over a custom field) that reads a custom
        field asks."""
        if hidden_key(key, hidden):
            raise HiddenField(field, self.name, rule_name(key), role)

    def filter_fields(self) -> list[FilterField]:
        return [ff for f in self.filters for ff in f.fields(self)]


def unrestricted(record: Record) -> ColumnElement[bool]:
    """The owned ``record``'s type is not restricted for the running statement's viewer."""
    return literal(record.name, String()) != all_(RESTRICTED)


def choice_of(record: Record, column: str) -> type[enum.Enum]:
    """The enum of a ``Choice`` field."""
    rule = record.field(column).rule
    assert isinstance(rule, Choice)
    return rule.annotation
