"""Input values: the API's scalars, and how a bad value is answered.

Each scalar the API takes as input (``Decimal``, ``Date``, ``DateTime``, ``Base64``) has one parse
function, used for a variable's JSON value and, through ``value_from_ast_untyped``, for a literal
in the document alike: ``update: 1`` and ``{"update": 1}`` meet the same check and the same
message. The SDL is Strawberry's (same names and descriptions); only the parsing is Atrium's.
``JSON`` stays Strawberry's (any value, read the same way from a literal or a variable): its bounds
are those of the request's JSON (``core.jsontext``) and of the document's parser.

A value that does not fit its type, wherever it is, is answered BAD_USER_INPUT naming where it
is, in the words of the records' rules (``records.rules``): the argument, then the input fields
and list positions inside it (``filter.amountMin``, ``stages.2.probability``), the fields of a
mutation's ``input`` argument named without it (``amount``, as the rules name them). A literal
is checked while the document is validated (``CodedValues`` replaces graphql-core's rule for
value literals); a variable's value when the operation starts, and it is named after the place
the variable is used (``field_of_variable``), so the literal and the variable name the same field.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import re
from collections.abc import Callable
from typing import Any

import dateutil.parser
from graphql import (
    ArgumentNode,
    DocumentNode,
    GraphQLError,
    ListValueNode,
    ObjectValueNode,
    ValueNode,
    VariableDefinitionNode,
    VariableNode,
    value_from_ast_untyped,
)
from graphql.language import SKIP, Node, Visitor, visit
from graphql.utilities.validate_input_value import validate_input_literal
from graphql.validation import ValuesOfCorrectTypeRule
from graphql.validation.validation_context import ValidationContext
from strawberry.scalars import Base64
from strawberry.types.scalar import ScalarDefinition

from core.errors import ErrorCode

MAX_DECIMAL_LENGTH = 100
MAX_DATE_LENGTH = 64


def _text(value: object, expected: str, max_length: int) -> str:
    if not isinstance(value, str):
        raise GraphQLError(f"must be a string: {expected}")
    if len(value) > max_length:
        raise GraphQLError(f"must be {expected} of at most {max_length} characters")
    return value


def parse_decimal(value: object) -> decimal.Decimal:
    """A finite decimal, from a string or a JSON number (``"12.50"``, ``12.5``, ``12``)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise GraphQLError("must be a decimal number such as \"12.50\"")
    text = _text(str(value), "a decimal number", MAX_DECIMAL_LENGTH)
    try:
        number = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        raise GraphQLError("must be a decimal number such as \"12.50\"") from None
    if not number.is_finite():
        raise GraphQLError("must be a finite decimal number")
    return number


def parse_date(value: object) -> dt.date:
    """An ISO 8601 calendar date (``2030-01-31``)."""
    text = _text(value, "an ISO 8601 date such as 2030-01-31", MAX_DATE_LENGTH)
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise GraphQLError("must be an ISO 8601 date such as 2030-01-31") from None


def parse_datetime(value: object) -> dt.datetime:
    """An ISO 8601 date and time (the rules ask for the offset: ``records.rules.Instant``)."""
    text = _text(value, "an ISO 8601 date and time such as 2030-01-31T09:30:00Z", MAX_DATE_LENGTH)
    try:
        parsed: dt.datetime = dateutil.parser.isoparse(text)
    except (ValueError, OverflowError):
        raise GraphQLError("must be an ISO 8601 date and time such as 2030-01-31T09:30:00Z") from None
    return parsed


def parse_base64(value: object) -> bytes:
    """Bytes in standard base64 (RFC 4648, section 4), padding included."""
    text = _text(value, "base64 (RFC 4648)", 1 << 22)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise GraphQLError("must be base64 (RFC 4648, standard alphabet, padded)") from None


def _definition(name: str, description: str, specified_by_url: str | None, origin: Any,
                serialize: Callable[[Any], Any], parse: Callable[[object], Any]) -> ScalarDefinition:
    def parse_literal(node: ValueNode, variables: dict[str, Any] | None = None) -> Any:
        return parse(value_from_ast_untyped(node, variables))

    return ScalarDefinition(name=name, description=description, specified_by_url=specified_by_url,
                            serialize=serialize, parse_value=parse, parse_literal=parse_literal, origin=origin)


def _isoformat(value: dt.date) -> str:
    return value.isoformat()


SCALARS: dict[object, ScalarDefinition] = {
    decimal.Decimal: _definition("Decimal", "Decimal (fixed-point)", None, decimal.Decimal, str, parse_decimal),
    dt.date: _definition("Date", "Date (isoformat)", None, dt.date, _isoformat, parse_date),
    dt.datetime: _definition("DateTime", "Date with time (isoformat)", None, dt.datetime, _isoformat,
                             parse_datetime),
    Base64: _definition("Base64", "Represents binary data as Base64-encoded strings, using the standard alphabet.",
                        "https://datatracker.ietf.org/doc/html/rfc4648.html#section-4", None,
                        lambda v: base64.b64encode(v).decode(), parse_base64),
}
"""``strawberry.Schema(scalar_overrides=SCALARS)``: the scalars by the Python type they stand for."""


# ---- naming the offending field ------------------------------------------------------------------

def field_name(path: list[str | int]) -> str:
    """The field a path from an argument names: ``["filter", "amountMin"]`` -> ``filter.amountMin``;
    a mutation's ``input`` argument is left out (``["input", "stages", 2]`` -> ``stages.2``), except
    where it is a batch's list of records: ``["input", 3, "amount"]`` -> ``input.3.amount``."""
    if len(path) > 1 and path[0] == "input" and not isinstance(path[1], int):
        path = path[1:]
    return ".".join(str(part) for part in path)


BATCH_ITEM = re.compile(r"^input\.(\d+)(?:\.|$)")


def bad_value(field: str, detail: str, nodes: Any = None) -> GraphQLError:
    """The error answering a bad input value at ``field`` (with the record's ``index`` inside a batch,
    as the batch mutations' own errors have it)."""
    extensions: dict[str, Any] = {"code": ErrorCode.BAD_USER_INPUT.value, "field": field}
    if (item := BATCH_ITEM.match(field)) is not None:
        extensions["index"] = int(item[1])
    return GraphQLError(f"{field}: {detail}", nodes, extensions=extensions)


def detail_of(error: GraphQLError) -> str:
    """What is wrong, without the position graphql-core puts in front."""
    original = error.original_error
    return original.message if isinstance(original, GraphQLError) else error.message


class CodedValues(ValuesOfCorrectTypeRule):
    """graphql-core's rule for value literals, answering BAD_USER_INPUT naming the field."""

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)
        self._at: str = ""

    def enter_argument(self, node: ArgumentNode, *_args: Any) -> None:
        self._at = node.name.value

    def enter_variable_definition(self, node: VariableDefinitionNode, *_args: Any) -> None:
        self._at = node.variable.name.value  # its default value

    def is_valid_value_node(self, node: ValueNode, input_type: Any) -> Any:
        if input_type:
            def on_error(error: GraphQLError, path: list[str | int]) -> None:
                self.report_error(bad_value(field_name([self._at, *path]), detail_of(error), error.nodes or [node]))

            validate_input_literal(node, input_type, on_error, None, None, self.context.hide_suggestions)
        return SKIP


class _UsageFinder(Visitor):
    """Where a variable is first used: the argument and the input fields and positions down to it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.path: list[str | int] | None = None

    def enter_argument(self, node: ArgumentNode, *_args: Any) -> Any:
        if self.path is None:
            found = _find(node.value, self.name, [node.name.value])
            if found is not None:
                self.path = found
        return False  # the value was searched; do not descend


def _find(node: Node, name: str, path: list[str | int]) -> list[str | int] | None:
    if isinstance(node, VariableNode):
        return path if node.name.value == name else None
    if isinstance(node, ObjectValueNode):
        for field in node.fields:
            if (found := _find(field.value, name, [*path, field.name.value])) is not None:
                return found
    if isinstance(node, ListValueNode):
        for i, item in enumerate(node.values):
            if (found := _find(item, name, [*path, i])) is not None:
                return found
    return None


VARIABLE_ERROR = re.compile(r"^Variable '\$(?P<name>\w+)' has invalid value(?: at (?P<path>(?:\.\w+|\[\d+\])+))?: ")
PATH_PART = re.compile(r"\.(\w+)|\[(\d+)\]")


def field_of_variable(error: GraphQLError, document: DocumentNode | None) -> GraphQLError | None:
    """A variable's coercion error (graphql-core's ``Variable '$x' has invalid value...``) as the
    same error its value as a literal gets, named after where the variable is used; None for an
    error that is not about a variable's value."""
    match = VARIABLE_ERROR.match(error.message)
    if match is None:
        return None
    name = match["name"]
    inner: list[str | int] = [int(i) if i else f for f, i in PATH_PART.findall(match["path"] or "")]
    usage: list[str | int] = [name]
    if document is not None:
        finder = _UsageFinder(name)
        visit(document, finder)
        usage = finder.path or usage
    return bad_value(field_name([*usage, *inner]), detail_of(error), error.nodes)
