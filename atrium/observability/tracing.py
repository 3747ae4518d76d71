"""OpenTelemetry traces of one app: what is traced, how it is exported, and what it costs when off.

Spans (each a child of the one before it in the list when they nest):

- one per HTTP request (``POST /graphql``), from the official ASGI instrumentation, continuing the
  caller's W3C ``traceparent`` (the propagators of ``OTEL_PROPAGATORS``, Trace Context and Baggage
  by default); ``/healthz``, ``/readyz`` and ``/metrics`` are not traced (probes and scrapes).
  WebSocket connections get no span of their own (one would last as long as the socket), and what
  runs on one outside a subscription execution (the connection's membership check, a query sent
  over it) is not traced;
- one per GraphQL operation over HTTP, the fast path (``planner.execution.answer_prepared``)
  included, named as the semantic conventions name it (``query Dashboard``), with
  ``graphql.operation.type``/``name``, ``atrium.operation.cost``, ``atrium.document.id`` and
  ``atrium.answered_by`` (``core.telemetry``);
- one per SQL statement, from the official asyncpg instrumentation (every statement reaches the
  driver, SQLAlchemy's as prepared statements, the plans' and ``BEGIN``/``COMMIT`` directly): the
  statement's text with its ``$n`` placeholders, never its parameters;
- one per Redis command (the official redis instrumentation: the command name and ``?`` for each
  argument) and one per broker publish (``TracedBroker``);
- one per subscription execution: each event a subscription group executes and delivers
  (``Tracing.event_span``).

Every span of a request and of a subscription carries ``atrium.tenant.id`` unless
``Settings.trace_tenant`` is off. No span holds a variable's value or a document's text.

Export: over OTLP/HTTP (protobuf) in batches, to ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``/v1/traces``
appended) or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, configured by the standard variables, which the
SDK reads itself (``core.settings.Settings.tracing`` says which turn tracing on). The service is
named ``atrium`` unless ``OTEL_SERVICE_NAME``/``OTEL_RESOURCE_ATTRIBUTES`` name it.

Off (the default): ``tracing_for`` returns None, nothing is installed, no middleware wraps the app
and no span is ever started; what remains is ``core.telemetry.annotate`` looking up the current
span a few times per operation.

The asyncpg instrumentation patches the driver for the whole process, once, the first time an app
with tracing is built; its spans are routed to the app that serves the request (``_CURRENT``, set by
that app's middleware), so apps of one process (tests) never see each other's spans, and an app
without tracing in a process where another has it starts none.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.redis import RedisInstrumentor
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Tracer
from opentelemetry.util.types import Attributes
from redis.asyncio import Redis
from starlette.types import ASGIApp, Receive, Scope, Send

from atrium.observability.metrics import route_of
from core.settings import Settings
from core.telemetry import DOCUMENT_ID, TENANT_ID
from subscriptions.broker import RedisBroker

if TYPE_CHECKING:
    import uuid

    from subscriptions.broker import Broker, BrokerStats
    from subscriptions.events import Event
    from subscriptions.presence import Presence

SCOPE = "atrium"
UNTRACED_PATHS = r"/(healthz|readyz|metrics)$"


@dataclass
class Tracing:
    """The traces of one app (module docstring): its provider and Atrium's own tracer."""

    provider: TracerProvider
    tenant: bool = True
    """Whether spans carry the tenant id (``Settings.trace_tenant``)."""
    owned: bool = True
    """The provider was built here (from the environment): ``close`` shuts it down, flushing spans."""
    tracer: Tracer = field(init=False)
    _tracers: dict[tuple[str, str | None, str | None], Tracer] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self.tracer = self.provider.get_tracer(SCOPE)

    def tracer_for(self, name: str, version: str | None, schema_url: str | None) -> Tracer:
        """This app's tracer for an instrumentation library (what ``_RoutedTracer`` delegates to)."""
        key = (name, version, schema_url)
        tracer = self._tracers.get(key)
        if tracer is None:
            tracer = self._tracers[key] = self.provider.get_tracer(name, version, schema_url)
        return tracer

    def tenant_attributes(self, tenant_id: uuid.UUID | None) -> dict[str, str]:
        return {TENANT_ID: str(tenant_id)} if self.tenant and tenant_id is not None else {}

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """``app`` with a span per HTTP request (and this app's spans routed to it)."""
        return TraceRequests(app, self)

    def instrument_redis(self, *clients: Redis | None) -> None:
        """A span per command of each of ``clients`` (the official instrumentation, per client)."""
        for client in clients:
            if client is not None:
                RedisInstrumentor.instrument_client(client, tracer_provider=self.provider)

    @contextlib.contextmanager
    def operation_span(self, tenant_id: uuid.UUID | None, query: str, document_id: str | None) -> Iterator[Span]:
        """The span of one GraphQL operation over HTTP, current while the block runs; named ``graphql``
        until the operation is known (``core.telemetry.name_operation``)."""
        attributes = self.tenant_attributes(tenant_id)
        attributes[DOCUMENT_ID] = document_id or f"sha256:{hashlib.sha256(query.encode()).hexdigest()}"
        with self.tracer.start_as_current_span("graphql", kind=SpanKind.INTERNAL, attributes=attributes) as span:
            yield span

    @contextlib.contextmanager
    def event_span(self, tenant_id: uuid.UUID, operation_name: str | None) -> Iterator[None]:
        """The span of one subscription execution (one event of a group, executed and queued to its
        members), current while the block runs.

        The block runs inside a subscription's generator, which another task may close: the span is
        made current by setting the context, and the context before it is set back (not detached
        by token, which only the context that attached may do).
        """
        name = f"subscription {operation_name}" if operation_name else "subscription"
        attributes: dict[str, Any] = {"graphql.operation.type": "subscription", **self.tenant_attributes(tenant_id)}
        if operation_name:
            attributes["graphql.operation.name"] = operation_name
        outer, routed = otel_context.get_current(), _CURRENT.get()
        span = self.tracer.start_span(name, kind=SpanKind.CONSUMER, attributes=attributes)
        otel_context.attach(trace.set_span_in_context(span))
        _CURRENT.set(self)
        try:
            yield
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit | asyncio.CancelledError):
                span.record_exception(exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            span.end()
            otel_context.attach(outer)
            _CURRENT.set(routed)

    async def close(self) -> None:
        """Flush and stop exporting (the provider's shutdown blocks: it runs in a thread)."""
        if self.owned:
            await asyncio.to_thread(self.provider.shutdown)


def tracing_for(settings: Settings, provider: TracerProvider | None = None) -> Tracing | None:
    """The traces ``settings`` ask for: exported over OTLP when ``Settings.tracing`` is on, or into
    ``provider`` when one is given (tests hand one with an in-memory exporter); None otherwise."""
    owned = provider is None
    if provider is None:
        if not settings.tracing:
            return None
        resource = Resource.create()  # reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "atrium"}))
        provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER and the span limits
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # the OTEL_EXPORTER_OTLP_* variables
    _instrument_driver()
    return Tracing(provider, tenant=settings.trace_tenant, owned=owned)


_CURRENT: ContextVar[Tracing | None] = ContextVar("atrium_tracing", default=None)
"""The app whose request or subscription is running: where instrumentation spans go."""


class _RoutedTracer(Tracer):
    """A tracer of a process-wide instrumentation that starts its spans in the current app's
    provider (``_CURRENT``), or none when the current work belongs to no traced app."""

    def __init__(self, name: str, version: str | None, schema_url: str | None) -> None:
        self._key = (name, version, schema_url)

    def start_span(self, name: str, context: otel_context.Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Attributes = None, links: Any = None, start_time: int | None = None,
                   record_exception: bool = True, set_status_on_exception: bool = True) -> Span:
        tracing = _CURRENT.get()
        if tracing is None:
            return INVALID_SPAN
        return tracing.tracer_for(*self._key).start_span(name, context, kind, attributes, links, start_time,
                                                         record_exception, set_status_on_exception)

    @contextlib.contextmanager
    def start_as_current_span(self, name: str, context: otel_context.Context | None = None,  # type: ignore[override]
                              kind: SpanKind = SpanKind.INTERNAL, attributes: Attributes = None, links: Any = None,
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True) -> Iterator[Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time, record_exception,
                               set_status_on_exception)
        if span is INVALID_SPAN:
            yield span
            return
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as current:
            yield current


class _RoutedTracerProvider(trace.TracerProvider):
    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Attributes = None) -> Tracer:
        return _RoutedTracer(instrumenting_module_name, instrumenting_library_version, schema_url)


def _instrument_driver() -> None:
    """Patch asyncpg once per process (``instrument`` is a no-op the second time)."""
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=_RoutedTracerProvider())


def _span_details(scope: Scope) -> tuple[str, dict[str, str]]:
    """``POST /graphql``: the method and the route, for known routes (other paths are not named,
    so arbitrary paths do not become span names)."""
    method = scope.get("method", "HTTP")
    route = route_of(scope.get("path", ""))
    if route == "other":
        return method, {}
    path = "/dashboard" if route == "dashboard" else scope["path"]
    return f"{method} {path}", {"http.route": path}


class TraceRequests:
    """ASGI middleware: a span per HTTP request (the official ASGI instrumentation, without its
    per-message send/receive spans and with no metrics of its own: ``/metrics`` has those), and the
    request's instrumentation spans routed to this app."""

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing
        self.traced = OpenTelemetryMiddleware(app, excluded_urls=UNTRACED_PATHS, default_span_details=_span_details,
                                              tracer_provider=tracing.provider, meter_provider=NoOpMeterProvider(),
                                              exclude_spans=["receive", "send"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # a WebSocket's spans are its subscriptions' executions (``event_span``)
            await self.app(scope, receive, send)
            return
        token = _CURRENT.set(self.tracing)
        try:
            await self.traced(scope, receive, send)
        finally:
            _CURRENT.reset(token)


class TracedBroker:
    """A ``Broker`` whose publishes are spans (kind PRODUCER: the record type, the change and the
    number of channels; never the channels themselves, which name the tenant)."""

    def __init__(self, broker: Broker, tracing: Tracing) -> None:
        self.broker = broker
        self.tracing = tracing
        self.presence: Presence = broker.presence
        self.stats: BrokerStats = broker.stats

    async def start(self) -> None:
        await self.broker.start()

    async def close(self) -> None:
        await self.broker.close()

    async def publish(self, event: Event) -> None:
        attributes: dict[str, Any] = {"messaging.operation.type": "send", "messaging.system": self.system,
                                      "atrium.channels": len(event.channels())}
        for name, attribute in (("entity_type", "atrium.event.record_type"), ("kind", "atrium.event.kind")):
            if (value := getattr(event, name, None)) is not None:
                attributes[attribute] = str(getattr(value, "value", value))
        attributes.update(self.tracing.tenant_attributes(getattr(event, "tenant_id", None)))
        with self.tracing.tracer.start_as_current_span("broker publish", kind=SpanKind.PRODUCER,
                                                       attributes=attributes):
            await self.broker.publish(event)

    async def publish_many(self, events: Sequence[Event]) -> None:
        if len(events) == 1:  # one span describing the event, as a single publish has
            await self.publish(events[0])
            return
        attributes: dict[str, Any] = {"messaging.operation.type": "send", "messaging.system": self.system,
                                      "messaging.batch.message_count": len(events)}
        with self.tracing.tracer.start_as_current_span("broker publish", kind=SpanKind.PRODUCER,
                                                       attributes=attributes):
            await self.broker.publish_many(events)

    @property
    def system(self) -> str:
        return "redis" if isinstance(self.broker, RedisBroker) else "memory"

    def subscribe(self, channel: str) -> contextlib.AbstractAsyncContextManager[asyncio.Queue[object]]:
        return self.broker.subscribe(channel)

