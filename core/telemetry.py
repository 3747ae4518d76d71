"""What the logs and the trace of the current request know, for code at any layer to tell them.

``RequestRecord`` is what every log line of a request says about it (``atrium.observability.logs``
sets one per request and formats it); the endpoint fills in the tenant and the executor or the fast
path the operation. The trace side: the current span's W3C headers (for outgoing requests such as
webhook deliveries) and its annotations.

Only the OpenTelemetry *API* is used here: when tracing is off (``atrium.observability.tracing``
installs nothing), the current span is the API's invalid, non-recording span, ``trace_headers()`` is
empty and ``annotate`` does nothing beyond one context lookup.

Attribute names Atrium adds beside the semantic conventions' (``graphql.operation.name``,
``graphql.operation.type``) are the constants below. No attribute ever holds a variable's value or
a document's text: operations are named by their name, type and document id.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

OPERATION_NAME = "graphql.operation.name"
OPERATION_TYPE = "graphql.operation.type"
OPERATION_COST = "atrium.operation.cost"
"""The operation's cost as charged to the rate limits (``schema.cost``)."""
DOCUMENT_ID = "atrium.document.id"
"""A persisted document's id as the request named it, else ``sha256:`` and the hex digest of the text."""
TENANT_ID = "atrium.tenant.id"
"""The caller's tenant (left out when ``ATRIUM_TRACE_TENANT=off``)."""
ANSWERED_BY = "atrium.answered_by"
"""``plan`` (one statement), ``cache`` (a cached answer) or ``executor`` (graphql-core and the loaders)."""
FAST_PATH = "atrium.fast_path"
"""True when the operation was answered without Strawberry's pipeline (``planner.execution.answer_prepared``)."""
ANSWER_CACHE = "atrium.answer_cache"
"""``hit``, ``miss`` or ``uncacheable`` when the answer cache was consulted."""

_W3C = TraceContextTextMapPropagator()


@dataclass
class RequestRecord:
    """What the log lines of one request (or WebSocket connection) say about it."""

    request_id: str
    tenant_id: str | None = None
    operation: str | None = None
    """The name of the GraphQL operation last run (None for an operation without a name)."""


_REQUEST: ContextVar[RequestRecord | None] = ContextVar("atrium_request", default=None)


def current_request() -> RequestRecord | None:
    """The record of the request being served (None outside requests)."""
    return _REQUEST.get()


def begin_request(record: RequestRecord) -> Token[RequestRecord | None]:
    """Make ``record`` the current request's (until ``end_request`` with the token returned)."""
    return _REQUEST.set(record)


def end_request(token: Token[RequestRecord | None]) -> None:
    _REQUEST.reset(token)


def identify(tenant_id: str, *, trace: bool) -> None:
    """The request's log lines (and, when ``trace``, its current span) name its tenant from now on."""
    if (record := _REQUEST.get()) is not None:
        record.tenant_id = tenant_id
    if trace:
        annotate(TENANT_ID, tenant_id)


def trace_headers() -> dict[str, str]:
    """The W3C Trace Context headers (``traceparent``, and ``tracestate`` when there is one) of the
    current span, for an outgoing request (webhook deliveries) to continue the trace; empty when no
    span is being recorded (tracing off, or outside any traced work)."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        _W3C.inject(carrier)
    return carrier


def traceparent() -> str | None:
    """The current span's ``traceparent`` header value (``00-<trace id>-<span id>-<flags>``), or None."""
    return trace_headers().get("traceparent")


def recording() -> bool:
    """Whether the current span is being recorded (worth computing an attribute for)."""
    return trace.get_current_span().is_recording()


def annotate(name: str, value: AttributeValue) -> None:
    """Set an attribute on the current span when one is being recorded (else nothing)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(name, value)


def name_operation(operation_type: str, operation_name: str | None) -> None:
    """A GraphQL operation is about to run: the request's record names it, and the current span is
    named after it (``query Dashboard``, as the semantic conventions spell it) with its type and name."""
    if (record := _REQUEST.get()) is not None:
        record.operation = operation_name
    span = trace.get_current_span()
    if span.is_recording():
        span.update_name(f"{operation_type} {operation_name}" if operation_name else operation_type)
        span.set_attribute(OPERATION_TYPE, operation_type)
        if operation_name:
            span.set_attribute(OPERATION_NAME, operation_name)
