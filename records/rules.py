"""Validation rules of record fields: each turns an input value into a column value or raises.

A rule is called as ``rule(field, value)`` with the GraphQL name of the field (``"amount"``,
``"filter.amountMin"``, ``"stages.2.name"``) and raises ``BadUserInput`` naming it. The same rule
checks a field on create, on update and in filters (``records.declare``), so "a deal's amount is a
non-negative decimal with at most two places" is written here once. ``annotation`` is the Python
type of the field's GraphQL input value.

``None`` reaches a rule only where the column may be NULL: "must not be null" for a NOT NULL
column is the declaration's, not the rule's.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import strawberry

from core.errors import BadUserInput
from core.ids import decode_id
from records.currencies import ISO_4217

LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL = re.compile(rf"^[^@\s]{{1,64}}@{LABEL}(?:\.{LABEL})+$")
DOMAIN = re.compile(rf"^(?=.{{1,253}}$){LABEL}(?:\.{LABEL})+$")
MAX_AMOUNT = Decimal("9999999999999999.99")
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Text:
    """Stripped text of at most ``max_length`` characters, without NUL; blank is empty."""

    max_length: int
    required: bool = True
    """Blank text is refused ("must not be empty"); otherwise it becomes NULL."""
    pattern: re.Pattern[str] | None = None
    expected: str = ""
    """What ``pattern`` asks for, in the error message."""
    annotation: Any = str

    def __call__(self, field: str, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if "\x00" in value:
            raise BadUserInput(field, "must not contain NUL characters")
        if not value:
            if self.required:
                raise BadUserInput(field, "must not be empty")
            return None
        if len(value) > self.max_length:
            raise BadUserInput(field, f"must be at most {self.max_length} characters")
        if self.pattern is not None and not self.pattern.match(value):
            raise BadUserInput(field, f"must be {self.expected}")
        return value


@dataclass(frozen=True)
class Email:
    annotation: Any = str

    def __call__(self, field: str, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if "\x00" in value or len(value) > 320 or not EMAIL.match(value):
            raise BadUserInput(field, "must be an email address")
        return value


@dataclass(frozen=True)
class Domain:
    annotation: Any = str

    def __call__(self, field: str, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().lower()
        if not DOMAIN.match(value):
            raise BadUserInput(field, "must be a domain name such as example.com")
        return value


@dataclass(frozen=True)
class Money:
    """A non-negative amount with at most two decimal places (the currency is another field)."""

    annotation: Any = Decimal

    def __call__(self, field: str, value: Decimal) -> Decimal:
        if not value.is_finite():
            raise BadUserInput(field, "must be a number")
        if value < 0:
            raise BadUserInput(field, "must not be negative")
        if value > MAX_AMOUNT:
            raise BadUserInput(field, f"must be at most {MAX_AMOUNT}")
        if value != value.quantize(CENT):
            raise BadUserInput(field, "must have at most 2 decimal places")
        return value.quantize(CENT)


@dataclass(frozen=True)
class Currency:
    """An ISO 4217 code, any case in, upper case out."""

    annotation: Any = str

    def __call__(self, field: str, value: str) -> str:
        code = value.strip().upper()
        if code not in ISO_4217:
            raise BadUserInput(field, "must be an ISO 4217 currency code such as USD")
        return code


@dataclass(frozen=True)
class Fraction:
    """A decimal in ``[low, high]`` with at most ``places`` decimal places (probabilities, percentages)."""

    low: Decimal = Decimal(0)
    high: Decimal = Decimal(1)
    places: int = 4
    annotation: Any = Decimal

    def __call__(self, field: str, value: Decimal) -> Decimal:
        if not value.is_finite() or not self.low <= value <= self.high:
            raise BadUserInput(field, f"must be between {self.low} and {self.high}")
        if value != value.quantize(Decimal(1).scaleb(-self.places)):
            raise BadUserInput(field, f"must have at most {self.places} decimal places")
        return value


@dataclass(frozen=True)
class Whole:
    """An integer of at least ``minimum`` (and at most ``maximum``)."""

    minimum: int = 0
    maximum: int = 2**31 - 1
    annotation: Any = int

    def __call__(self, field: str, value: int) -> int:
        if value < self.minimum:
            raise BadUserInput(field, "must not be negative" if self.minimum == 0
                               else f"must be at least {self.minimum}")
        if value > self.maximum:
            raise BadUserInput(field, f"must be at most {self.maximum}")
        return value


@dataclass(frozen=True)
class Ref:
    """The global ID of a record of type ``type_name`` (that it exists in the tenant is checked on write)."""

    type_name: str
    annotation: Any = strawberry.ID

    def __call__(self, field: str, value: str) -> uuid.UUID:
        return decode_id(value, self.type_name, field=field)


@dataclass(frozen=True)
class Choice:
    """One value of an enum; stored as the member's value."""

    annotation: type[enum.Enum]

    def __call__(self, field: str, value: enum.Enum | str) -> str:
        return str(self.annotation(value).value)


@dataclass(frozen=True)
class Day:
    annotation: Any = dt.date

    def __call__(self, field: str, value: dt.date) -> dt.date:
        return value


@dataclass(frozen=True)
class Instant:
    """A point in time with an explicit offset, stored in UTC."""

    annotation: Any = dt.datetime

    def __call__(self, field: str, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise BadUserInput(field, "must include a time zone offset")
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            raise BadUserInput(field, "must be between the years 1 and 9999 in UTC") from None


@dataclass(frozen=True)
class Flag:
    annotation: Any = bool

    def __call__(self, field: str, value: bool) -> bool:
        return value


@dataclass(frozen=True)
class Opaque:
    """A value the API never takes as input (binary state and the like): stored as it is."""

    annotation: Any = str

    def __call__(self, field: str, value: Any) -> Any:
        return value


Rule = Text | Email | Domain | Money | Currency | Fraction | Whole | Ref | Choice | Day | Instant | Flag | Opaque
