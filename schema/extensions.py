"""Schema extensions: error coding and masking, and the per-request limits.

``ErrorCoding`` gives every error a stable ``extensions.code``: an ``AtriumError`` keeps its own;
parse and validation errors get GRAPHQL_PARSE_FAILED / GRAPHQL_VALIDATION_FAILED; a value that does
not fit its type, as a literal or as a variable, gets BAD_USER_INPUT naming the field
(``schema.values``); an outage of a service the field needed (``models.outages``) gets
SERVICE_UNAVAILABLE; anything else becomes INTERNAL with no message, traceback or
SQL from the original (``AtriumSchema.process_errors`` logs that one with the request id).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from graphql import DocumentNode, GraphQLError
from graphql.validation import ValuesOfCorrectTypeRule
from strawberry.extensions import AddValidationRules, ParserCache, SchemaExtension
from strawberry.types.execution import ExecutionContext
from strawberry.types.graphql import OperationType

from core.errors import AtriumError, ErrorCode, ServiceUnavailable
from core.limits import LIMIT_RULES
from core.telemetry import name_operation
from models.outages import is_outage
from schema.values import CodedValues, field_of_variable

log = logging.getLogger("core.errors")


class CodedParserCache(ParserCache):
    """ParserCache that leaves syntax errors to Strawberry's own parse step.

    The stock cache parses inside the extension hook, where a syntax error escapes the operation
    uncoded; here a failed parse leaves no document, so Strawberry parses again inside its error
    handling and ``ErrorCoding`` codes the error GRAPHQL_PARSE_FAILED.
    """

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        try:
            context.graphql_document = self.cached_parse_document(context.query, **context.parse_options)
        except GraphQLError:
            context.graphql_document = None
        yield


class CodedValueChecks(SchemaExtension):
    """Value literals are checked by ``schema.values.CodedValues`` instead of graphql-core's own rule
    (the same check, answering BAD_USER_INPUT naming the field)."""

    def on_operation(self) -> Iterator[None]:
        context = self.execution_context
        context.validation_rules = tuple(CodedValues if rule is ValuesOfCorrectTypeRule else rule
                                         for rule in context.validation_rules)
        yield


class StaticLimits(AddValidationRules):
    """Depth and alias limits with rule classes shared by every request."""

    def __init__(self) -> None:
        super().__init__(list(LIMIT_RULES))


def is_unexpected(error: GraphQLError) -> bool:
    """True for errors raised by code, other than ``AtriumError`` and GraphQL's own."""
    original = error.original_error
    return original is not None and not isinstance(original, AtriumError | GraphQLError)


def request_id_of(execution_context: ExecutionContext | None) -> str | None:
    context = getattr(execution_context, "context", None)
    return getattr(context, "request_id", None)


def log_unexpected(errors: list[GraphQLError], execution_context: ExecutionContext | None) -> None:
    """Log each unexpected error with its traceback; an outage gets one line (it is not a fault of ours)."""
    for error in errors:
        if is_unexpected(error):
            request_id = request_id_of(execution_context)
            if is_outage(error.original_error):  # type: ignore[arg-type]
                log.warning("service unavailable in %s (request %s): %s", error.path, request_id,
                            error.original_error, extra={"request_id": request_id})
                continue
            log.error("unexpected error in %s (request %s)", error.path, request_id,
                      exc_info=error.original_error, extra={"request_id": request_id})


def coded(error: GraphQLError, request_id: str | None, document: DocumentNode | None = None) -> GraphQLError:
    """``error`` with its ``extensions.code`` (module docstring); ``document``: the operation's, to name the
    field a bad variable value is used for."""
    original = error.original_error
    if isinstance(original, AtriumError):
        return error
    if original is not None and is_outage(original):  # e.g. Redis, for a field that needs it
        unavailable = ServiceUnavailable()
        return GraphQLError(unavailable.message, nodes=error.nodes, positions=error.positions, path=error.path,
                            original_error=unavailable, extensions=unavailable.extensions)
    if is_unexpected(error):
        extensions: dict[str, Any] = {"code": ErrorCode.INTERNAL.value}
        if request_id:
            extensions["requestId"] = request_id
        return GraphQLError("Internal server error", nodes=error.nodes, positions=error.positions,
                            path=error.path, extensions=extensions)
    if error.extensions and "code" in error.extensions:
        return error
    if error.message.startswith("Syntax Error"):
        code = ErrorCode.GRAPHQL_PARSE_FAILED
    elif (bad_value := field_of_variable(error, document)) is not None:
        return bad_value
    else:
        code = ErrorCode.GRAPHQL_VALIDATION_FAILED
    return GraphQLError(error.message, nodes=error.nodes, positions=error.positions, path=error.path,
                        extensions={**(error.extensions or {}), "code": code.value})


def code_of(error: GraphQLError) -> str | None:
    code = (error.extensions or {}).get("code")
    return code if isinstance(code, str) else None


class OperationMetrics(SchemaExtension):
    """Count executed operations by type, and errors by code, on the context's ``metrics`` recorder.

    An operation counts once it executes (it parsed and validated); errors count for every query,
    mutation or rejected document, coded as the client sees them (this is listed before
    ``ErrorCoding``, so it runs after it). A subscription counts once per execution (equal
    subscriptions share one) and the errors of its events are not counted here. The operation is
    also named to the request's log record and span (``core.telemetry.name_operation``).
    """

    def on_execute(self) -> Iterator[None]:
        ec = self.execution_context
        recorder = getattr(ec.context, "metrics", None)
        if recorder is not None:
            recorder.record_operation(ec.operation_type.value)
        name_operation(ec.operation_type.value, ec.operation_name)
        yield

    def on_operation(self) -> Iterator[None]:
        yield
        recorder = getattr(self.execution_context.context, "metrics", None)
        errors = getattr(self.execution_context.result, "errors", None)
        if recorder is None or not errors:
            return
        try:
            if self.execution_context.operation_type is OperationType.SUBSCRIPTION:
                return
        except RuntimeError:  # unparsable, or no operation of that name
            pass
        recorder.record_errors([code_of(e) or "UNKNOWN" for e in errors])


class ErrorCoding(SchemaExtension):
    """Give every error a code and mask the unexpected ones (see module docstring)."""

    def on_operation(self) -> Iterator[None]:
        yield
        result = self.execution_context.result
        errors = getattr(result, "errors", None)
        if errors:
            request_id = request_id_of(self.execution_context)
            document = self.execution_context.graphql_document
            result.errors = [coded(e, request_id, document) for e in errors]  # type: ignore[union-attr]
