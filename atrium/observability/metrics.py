"""Prometheus metrics of one app instance, served at ``/metrics`` in the text exposition format.

What is measured (per process; a registry of the app's own, so two apps in one process never mix):

- ``atrium_http_requests_total{route,status}`` and ``atrium_http_request_duration_seconds{route}``:
  every HTTP request, ``route`` one of a fixed set (``graphql``, ``dashboard``, ``healthz``,
  ``readyz``, ``metrics``, ``other``) so a client cannot grow the label space.
- ``atrium_graphql_operations_total{type}`` and ``atrium_graphql_errors_total{code}``: operations
  executed over HTTP and WebSocket, and errors by ``extensions.code`` as clients see them
  (``schema.extensions.OperationMetrics`` says exactly what counts).
- ``atrium_websocket_connections``, ``atrium_subscriptions``, ``atrium_subscription_groups``,
  ``atrium_subscription_results_total``, ``atrium_subscribers_cut_off_total``: live updates.
- ``atrium_broker_*_total``: events published, failed publishes, events received from Redis,
  reconnects and subscriber overflows, read from the broker's own counters at scrape time.
- ``atrium_db_connections_in_use`` and ``atrium_db_pool_size``: over every engine (shared and dedicated).
- ``atrium_answer_cache_total{outcome}`` (``hit``, ``miss``, ``failure``: Redis unreachable) and
  ``atrium_answer_cache_entries`` (answers held in this process): the answer cache, when it is on.
- Webhooks, sent by this process's dispatcher (``webhooks.dispatcher``):
  ``atrium_webhook_attempts_total{outcome}`` (``delivered``, ``retry``, ``failed``: for good),
  ``atrium_webhook_attempt_errors_total{kind}`` (why an attempt failed: ``http_4xx``, ``http_5xx``,
  ``http_other``, ``timeout``, ``connection``, ``refused``, ``secret``),
  ``atrium_webhook_attempt_duration_seconds{outcome}`` (a histogram) and
  ``atrium_webhook_endpoints_disabled_total``. And, measured at each scrape from the shared
  database whichever process sends: ``atrium_webhook_outbox_pending`` (deliveries owed, over every
  tenant) and ``atrium_webhook_outbox_oldest_seconds`` (the age of the oldest of them; 0 when none).

No label holds a tenant, user, record, endpoint, URL or operation name: metrics never reveal one
tenant's activity to whoever reads them, and their cardinality stays fixed (the webhook labels are
the fixed sets above; per-endpoint figures are ``webhookDeliveries``' job, not the metrics').

Access: open in development and test; in production only with ``ATRIUM_METRICS_TOKEN`` set, and
then only for ``Authorization: Bearer <that token>`` (404 otherwise, so an unconfigured
deployment does not publish its internals).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from auth.principal import bearer_token
from core.errors import Unauthenticated

if TYPE_CHECKING:
    from core.settings import Settings
    from models.db import Databases
    from subscriptions.broker import Broker


class AnswerCounts(Protocol):
    """What the answer cache reports (``planner.answers.AnswerCache``)."""

    hits: int
    misses: int
    failures: int

    @property
    def entries(self) -> int: ...


class LiveCounts(Protocol):
    """What the subscription transport reports (``atrium.http.websocket.LiveGroups``)."""

    events: int
    cut_off: int

    def counts(self) -> tuple[int, int]: ...

ROUTES = {"/graphql": "graphql", "/dashboard": "dashboard", "/healthz": "healthz", "/readyz": "readyz",
          "/metrics": "metrics"}
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SCRAPE_MEASURE_SECONDS = 2.0
"""How long a scrape waits for what it measures in the database before answering without it."""
Backlog = Callable[[], Awaitable[tuple[int, dt.datetime | None]]]
"""Deliveries pending in the outbox and when the oldest was written (``webhooks.outbox.backlog``)."""
log = logging.getLogger("atrium.metrics")


def route_of(path: str) -> str:
    """The fixed route label of ``path``."""
    if path.startswith("/dashboard/"):
        return "dashboard"
    return ROUTES.get(path, "other")


class Metrics:
    """The app's metrics; ``observe`` adds what is read from the runtime at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter("atrium_http_requests", "HTTP requests by route and status.",
                                     ("route", "status"), registry=self.registry)
        self.http_duration = Histogram("atrium_http_request_duration_seconds",
                                       "Time from request to the end of the response.", ("route",),
                                       buckets=DURATION_BUCKETS, registry=self.registry)
        self.operations = Counter("atrium_graphql_operations", "GraphQL operations by type.", ("type",),
                                  registry=self.registry)
        self.errors = Counter("atrium_graphql_errors", "GraphQL errors by extensions.code.", ("code",),
                              registry=self.registry)
        self.websockets = Gauge("atrium_websocket_connections", "Open WebSocket connections.",
                                registry=self.registry)
        self.webhook_attempts = Counter("atrium_webhook_attempts", "Webhook delivery attempts by outcome: "
                                        "delivered, retry (failed, tried again later), failed (for good).",
                                        ("outcome",), registry=self.registry)
        self.webhook_errors = Counter("atrium_webhook_attempt_errors", "Failed webhook delivery attempts by "
                                      "kind of failure.", ("kind",), registry=self.registry)
        self.webhook_duration = Histogram("atrium_webhook_attempt_duration_seconds",
                                          "Time from connecting to a webhook receiver to the end of its answer.",
                                          ("outcome",), buckets=DURATION_BUCKETS, registry=self.registry)
        self.webhook_disabled = Counter("atrium_webhook_endpoints_disabled", "Webhook endpoints disabled for "
                                        "failing (by this process's dispatcher).", registry=self.registry)
        self.webhook_pending = Gauge("atrium_webhook_outbox_pending", "Webhook deliveries owed, over every tenant.",
                                     registry=self.registry)
        self.webhook_oldest = Gauge("atrium_webhook_outbox_oldest_seconds", "Age of the oldest webhook delivery "
                                    "owed (0 when none).", registry=self.registry)
        self._runtime_collector: RuntimeCollector | None = None
        self._backlog: Backlog | None = None
        self._now: Callable[[], float] = time.time

    def open_websockets(self) -> float:
        """The ``atrium_websocket_connections`` gauge's value."""
        return next(iter(self.websockets.collect())).samples[0].value

    def record_operation(self, operation_type: str) -> None:
        """Count one executed operation."""
        self.operations.labels(operation_type).inc()

    def record_errors(self, codes: Iterable[str]) -> None:
        """Count the errors of one operation by code."""
        for code in codes:
            self.errors.labels(code).inc()

    def expect_webhooks(self, outcomes: Iterable[str], error_kinds: Iterable[str]) -> None:
        """Show every webhook label value from the start, at 0 (the dispatcher's fixed sets)."""
        for outcome in outcomes:
            self.webhook_attempts.labels(outcome)
            self.webhook_duration.labels(outcome)
        for kind in error_kinds:
            self.webhook_errors.labels(kind)

    def webhook_attempt(self, outcome: str, error_kind: str | None, seconds: float) -> None:
        """One webhook attempt whose outcome has committed (``webhooks.dispatcher.DeliveryMeter``)."""
        self.webhook_attempts.labels(outcome).inc()
        self.webhook_duration.labels(outcome).observe(seconds)
        if error_kind is not None:
            self.webhook_errors.labels(error_kind).inc()

    def webhook_endpoint_disabled(self) -> None:
        self.webhook_disabled.inc()

    def measure_backlog(self, backlog: Backlog, now: Callable[[], float]) -> None:
        """Measure the outbox's backlog with ``backlog`` at every scrape, its age as of ``now()``."""
        self._backlog, self._now = backlog, now

    async def _measure(self) -> None:
        if self._backlog is None:
            return
        try:
            async with asyncio.timeout(SCRAPE_MEASURE_SECONDS):
                pending, oldest = await self._backlog()
        except (TimeoutError, OSError, SQLAlchemyError) as exc:  # down or slow: the scrape answers what it knows
            log.warning("metrics: cannot measure the webhook outbox (%s)", exc)
            return
        self.webhook_pending.set(pending)
        self.webhook_oldest.set(0.0 if oldest is None else max(0.0, self._now() - oldest.timestamp()))

    def observe(self, broker: Broker, databases: Databases, live: LiveCounts,
                answers: AnswerCounts | None = None) -> None:
        """Read broker, subscription, pool and answer-cache state at every scrape (replacing an earlier set)."""
        if self._runtime_collector is not None:
            self.registry.unregister(self._runtime_collector)
        self._runtime_collector = RuntimeCollector(broker, databases, live, answers)
        self.registry.register(self._runtime_collector)

    def endpoint(self, settings: Settings) -> Callable[[Request], Awaitable[Response]]:
        """The ``/metrics`` handler under the access rule of the module docstring."""
        token = settings.metrics_token

        async def metrics(request: Request) -> Response:
            if token is None and settings.env == "production":
                return Response("Not Found", status_code=404, media_type="text/plain")
            if token is not None:
                try:
                    given = bearer_token(request.headers.get("authorization")) or ""
                except Unauthenticated:
                    given = ""
                if not hmac.compare_digest(given.encode(), token.encode()):
                    return Response("Unauthorized", status_code=401, media_type="text/plain",
                                    headers={"www-authenticate": "Bearer"})
            await self._measure()
            return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

        return metrics


class MeasureHttp:
    """ASGI middleware: every HTTP request counted by route and status, and timed."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route, status, started = route_of(scope["path"]), 500, time.perf_counter()

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.http_requests.labels(route, str(status)).inc()
            self.metrics.http_duration.labels(route).observe(time.perf_counter() - started)


class RuntimeCollector(Collector):
    """Broker, subscription and connection-pool figures, read when scraped."""

    def __init__(self, broker: Broker, databases: Databases, live: LiveCounts,
                 answers: AnswerCounts | None = None) -> None:
        self.broker = broker
        self.databases = databases
        self.live_groups = live
        self.answers = answers

    def collect(self) -> Iterator[Metric]:
        stats = self.broker.stats
        for name, value, doc in (
            ("atrium_broker_events_published", stats.published, "Events published after their write committed."),
            ("atrium_broker_publish_failures", stats.publish_failures, "Publishes that failed (Redis unreachable)."),
            ("atrium_broker_events_received", stats.received, "Events received from the broker's subscription."),
            ("atrium_broker_reconnects", stats.reconnects, "Times the broker regained its Redis subscription."),
            ("atrium_broker_overflows", stats.overflows, "Subscriber queues that overflowed."),
            ("atrium_subscription_results", self.live_groups.events,
             "Subscription results executed (each sent to every member of its group)."),
            ("atrium_subscribers_cut_off", self.live_groups.cut_off, "Subscribers cut off for being too slow."),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        groups, members = self.live_groups.counts()
        yield GaugeMetricFamily("atrium_subscriptions", "Open subscription operations.", value=members)
        yield GaugeMetricFamily("atrium_subscription_groups",
                                "Distinct subscription executions (shared by equal subscriptions).", value=groups)
        in_use, size = self.databases.pool_usage()
        yield GaugeMetricFamily("atrium_db_connections_in_use", "Connections checked out of the pools.", value=in_use)
        yield GaugeMetricFamily("atrium_db_pool_size", "Connections the pools keep open.", value=size)
        if self.answers is not None:
            outcomes = CounterMetricFamily("atrium_answer_cache", "Answer cache lookups by outcome.",
                                           labels=("outcome",))
            for outcome, value in (("hit", self.answers.hits), ("miss", self.answers.misses),
                                   ("failure", self.answers.failures)):
                outcomes.add_metric((outcome,), value)
            yield outcomes
            yield GaugeMetricFamily("atrium_answer_cache_entries", "Cached answers held in this process.",
                                    value=self.answers.entries)
