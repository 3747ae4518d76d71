"""API value formats written in SQL, so PostgreSQL returns what the executor would have serialised.

Each function here mirrors one Python formatter, character for character (the differential test,
tests/test_plans.py, holds them equal):

- ``gid``: ``core.ids.to_global_id`` (base64url of ``Type:uuid``, no padding);
- ``instant``: Strawberry's ``DateTime`` (``datetime.isoformat()`` of an aware UTC value: microseconds
  only when there are some, ``+00:00``);
- ``day``: ``Date`` (``date.isoformat()``); ``decimal``: ``Decimal`` (``str(value)``, which for
  PostgreSQL ``numeric`` is its text form); enum values: their GraphQL names;
- ``cursor``: ``resolvers.paging.encode_cursor``.
"""

from __future__ import annotations

import enum
import json
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Text, case, cast, func, literal_column

from records.declare import SortKey


def text(value: str) -> ColumnElement[str]:
    """A constant string in the SQL text (never user input: type names, keys, format patterns)."""
    return literal_column("'" + value.replace("'", "''") + "'", Text)


def base64url(value: ColumnElement[Any]) -> ColumnElement[str]:
    """Unpadded base64url of a text's UTF-8 bytes (``encode`` wraps lines: the newlines go too)."""
    encoded = func.encode(func.convert_to(value, text("UTF8")), text("base64"))
    return func.translate(func.rtrim(encoded, text("=")), literal_column("'+/' || chr(10)"), text("-_"))


def gid(type_name: str, key: ColumnElement[Any]) -> ColumnElement[str]:
    return base64url(text(f"{type_name}:") + cast(key, Text))


def instant(value: ColumnElement[Any]) -> ColumnElement[str]:
    utc = func.timezone(text("UTC"), value)
    fraction = case((func.mod(cast(func.extract("microseconds", value), BigInteger), 1_000_000) == 0, text("")),
                    else_=func.to_char(utc, text(".US")))
    return func.to_char(utc, text('YYYY-MM-DD"T"HH24:MI:SS')) + fraction + text("+00:00")


def day(value: ColumnElement[Any]) -> ColumnElement[str]:
    """``YYYY-MM-DD``; an infinite date is what asyncpg makes of it (``date.max``)."""
    return case((value.is_(None), None), (func.isfinite(value), func.to_char(value, text("YYYY-MM-DD"))),
                else_=text("9999-12-31"))


def decimal(value: ColumnElement[Any]) -> ColumnElement[str]:
    return cast(value, Text)


def enum_name(value: ColumnElement[Any], members: type[enum.Enum]) -> ColumnElement[str]:
    """The GraphQL name of a stored enum value (``open`` -> ``OPEN``)."""
    if all(member.name == str(member.value).upper() for member in members):
        return func.upper(value)
    return case(*((value == text(str(m.value)), text(m.name)) for m in members), else_=None)


def sort_text(key: SortKey, value: ColumnElement[Any]) -> ColumnElement[str]:
    """A sort value as ``resolvers.paging.cursor_text`` writes it."""
    kind = key.expression.type.__class__.__name__.lower()
    if "datetime" in kind or "timestamp" in kind:
        return instant(value)
    if kind == "date":
        return day(value)
    return cast(value, Text)


def cursor(key: SortKey, value: ColumnElement[Any], row_id: ColumnElement[Any]) -> ColumnElement[str]:
    """``base64url('["<ordering>","<sort value>","<id>"]')``, JSON as ``json.dumps`` writes it compactly."""
    parts = (text("[" + json.dumps(key.name, ensure_ascii=False) + ",")
             + cast(func.to_json(sort_text(key, value)), Text) + text(",")
             + cast(func.to_json(cast(row_id, Text)), Text) + text("]"))
    return base64url(parts)
