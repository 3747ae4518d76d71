"""Custom fields in CSV files: the column of a custom field and the text of its values, both ways.

A custom field is the column ``custom.<key>`` (``records.custom.rule_name``: named as a field rule
names it); an import maps a column to it by that name (``custom.tier``), and an export writes
that header, so an export imports back as it is.
A cell holds the value as text:

=============================  ===================================================  =================
type                           text                                                 example
=============================  ===================================================  =================
TEXT, LONG_TEXT, URL, EMAIL    the text                                             ``ACME Ltd``
NUMBER                         a decimal                                            ``12.5``
MONEY                          the amount, a space, the ISO 4217 currency           ``1200.50 USD``
DATE                           ISO 8601                                             ``2030-01-31``
BOOLEAN                        ``true`` / ``false`` (also ``yes``/``no``, ``1``/``0``)  ``true``
SINGLE_SELECT                  the option                                           ``gold``
MULTI_SELECT                   the options, separated by ``;``, in order            ``a;b``
USER                           the member's global ID (as ``userId`` is)            ``VXNlcjo…``
=============================  ===================================================  =================

A MULTI_SELECT cell is itself read and written by Python's ``csv`` module with ``;`` as the
delimiter: an option holding ``;`` or ``"`` is quoted (``a;"b;c"``), and spaces after a ``;`` are
ignored on import. An empty cell is no value.

Reading a cell (``cell_input``) only turns its text into the input member the GraphQL writes take
(``CustomFieldValueInput``: ``number``, ``money: {amount, currency}``, ``options``...); every check of
the value against its definition is then the write path's own (``records.custom.resolve`` through
``Change.custom_values``), with the same messages, naming ``customFields.<key>``.
"""

from __future__ import annotations

import csv
import io
import uuid
from decimal import Decimal
from typing import Any

from graphql import GraphQLError

from core.errors import BadUserInput
from core.ids import to_global_id
from records.custom import CustomFieldType, Definition
from schema.values import parse_date, parse_decimal


class Options(csv.Dialect):
    """The ``csv`` dialect of a MULTI_SELECT cell's options."""

    delimiter = ";"
    quotechar = '"'
    doublequote = True
    skipinitialspace = True
    lineterminator = ""
    quoting = csv.QUOTE_MINIMAL
    strict = True


TRUE = frozenset({"true", "t", "yes", "y", "1"})
FALSE = frozenset({"false", "f", "no", "n", "0"})


def field_name(key: str) -> str:
    """What errors about custom field ``key`` name (as the GraphQL writes do)."""
    return f"customFields.{key}"


def _scalar(parse: Any, field: str, text: str) -> Any:
    try:
        return parse(text)
    except GraphQLError as error:
        raise BadUserInput(field, error.message) from None


def cell_input(definition: Definition, text: str) -> dict[str, Any]:
    """The ``CustomFieldValueInput`` (as a dict) a non-empty cell stands for; BAD_USER_INPUT naming
    ``customFields.<key>`` when the text is not of the shape of the field's type (the write path
    checks the value itself)."""
    field = field_name(definition.key)
    kind = definition.type
    word = text.strip()
    if kind is CustomFieldType.NUMBER:
        return {"key": definition.key, "number": _scalar(parse_decimal, field, word)}
    if kind is CustomFieldType.MONEY:
        parts = word.split()
        if len(parts) != 2:
            raise BadUserInput(field, "must be an amount and a currency, such as `1200.50 USD`")
        return {"key": definition.key,
                "money": {"amount": _scalar(parse_decimal, f"{field}.amount", parts[0]), "currency": parts[1]}}
    if kind is CustomFieldType.DATE:
        return {"key": definition.key, "date": _scalar(parse_date, field, word)}
    if kind is CustomFieldType.BOOLEAN:
        if word.lower() not in TRUE | FALSE:
            raise BadUserInput(field, "must be true or false")
        return {"key": definition.key, "boolean": word.lower() in TRUE}
    if kind is CustomFieldType.SINGLE_SELECT:
        return {"key": definition.key, "option": word}
    if kind is CustomFieldType.MULTI_SELECT:
        try:
            options = next(csv.reader([word], Options))
        except csv.Error as error:
            raise BadUserInput(field, f"must be options separated by ';' ({error})") from None
        return {"key": definition.key, "options": [o.strip() for o in options if o.strip()]}
    if kind is CustomFieldType.USER:
        return {"key": definition.key, "userId": word}
    return {"key": definition.key, "text": text}


def cell_text(definition: Definition, value: Any) -> str:
    """The text of a stored value (``records.custom``) in a CSV cell; empty for no value."""
    if value is None:
        return ""
    kind = definition.type
    if kind is CustomFieldType.NUMBER:
        return format(Decimal(value), "f")
    if kind is CustomFieldType.MONEY:
        return f"{format(Decimal(value['amount']), 'f')} {value['currency']}"
    if kind is CustomFieldType.BOOLEAN:
        return "true" if value else "false"
    if kind is CustomFieldType.MULTI_SELECT:
        return _joined([str(option) for option in value])
    if kind is CustomFieldType.USER:
        return to_global_id("User", uuid.UUID(str(value)))
    return str(value)


def _joined(options: list[str]) -> str:
    line = io.StringIO()
    csv.writer(line, Options).writerow(options)
    return line.getvalue()
