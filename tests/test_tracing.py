"""Traces: a span per request, per GraphQL operation (the fast path too), per SQL statement, per broker
publish and per subscription execution; the caller's traceparent continued; the tenant on every span
unless turned off; no variable's value anywhere; OTLP/HTTP export when the standard variables ask for
it, and nothing at all otherwise.

Spans are read from the SDK's ``InMemorySpanExporter``; one test runs a real server whose spans a
local OTLP receiver decodes (``tests/otlp.py``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.app import create_app
from atrium.observability.tracing import TracedBroker, TraceRequests
from core.clock import ManualClock
from core.settings import SettingError, Settings
from core.telemetry import trace_headers, traceparent
from models.tables import WEBHOOK_DELIVERIES, Role
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.crm import seed_crm
from tests.live import WAIT, live, serve_in_process, start_atrium
from tests.otlp import otlp_receiver

DASHBOARD = """
query Dashboard($first: Int!, $search: String) {
  deals(first: $first, filter: {search: $search}) {
    totalCount
    edges { node { id title company { name } contact { email } stage { name } activities(first: 3) { subject } } }
  }
}"""
CREATE_COMPANY = "mutation CreateCompany($input: CompanyInput!) { createCompany(input: $input) { id name } }"
FEED = """
subscription {
  activityFeed { __typename ... on Resync { reason } ... on ActivityChange { kind record { id subject } } }
}"""
ACTIVITY = "mutation($input: ActivityInput!) { createActivity(input: $input) { id } }"


class Recorded(SpanProcessor):
    """Spans of one app, kept by the SDK's in-memory exporter; ``wait_for`` is woken as each span ends."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.provider.add_span_processor(self)
        self.ended = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self.ended.set()

    @property
    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()

    def of_trace(self, trace_id: int) -> list[ReadableSpan]:
        return [s for s in self.spans if s.context is not None and s.context.trace_id == trace_id]

    async def wait_for(self, condition: Callable[[tuple[ReadableSpan, ...]], bool]) -> tuple[ReadableSpan, ...]:
        async with asyncio.timeout(WAIT):
            while not condition(spans := self.spans):
                self.ended.clear()
                await self.ended.wait()
        return spans


@asynccontextmanager
async def traced_app(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Recorded]]:
    recorded = Recorded()
    app = create_app(settings, tracer_provider=recorded.provider)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        yield client, recorded


def caller() -> tuple[int, int, dict[str, str]]:
    """A calling service's trace id, span id and the ``traceparent`` header naming them."""
    trace_id, span_id = secrets.randbits(128) | 1, secrets.randbits(64) | 1
    return trace_id, span_id, {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}


def sql(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    return [s for s in spans if (s.attributes or {}).get("db.system", (s.attributes or {}).get("db.system.name"))
            == "postgresql"]


def statement(span: ReadableSpan) -> str:
    attributes = span.attributes or {}
    return str(attributes.get("db.statement", attributes.get("db.query.text", "")))


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    assert parent.context is not None
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def descendants(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    out, frontier = [], [parent]
    while frontier:
        found = [c for p in frontier for c in children(spans, p)]
        out.extend(found)
        frontier = found
    return out


def one(spans: Sequence[ReadableSpan], predicate: Callable[[ReadableSpan], bool]) -> ReadableSpan:
    matching = [s for s in spans if predicate(s)]
    assert len(matching) == 1, [s.name for s in spans]
    return matching[0]


def every_value(spans: Sequence[ReadableSpan]) -> list[str]:
    """Every attribute value and event attribute of ``spans``, as text."""
    values = [str(v) for s in spans for v in (s.attributes or {}).values()]
    values += [str(v) for s in spans for e in s.events for v in (e.attributes or {}).values()]
    return values + [s.name for s in spans]


async def test_a_request_is_one_trace_continuing_the_callers(settings: Settings, make_tenant: Any) -> None:
    tenant: TenantWorld = await make_tenant()
    token = tenant.token()
    async with traced_app(settings) as (client, recorded):
        crm = await seed_crm(client, token)
        trace_id, parent_id, headers = caller()
        body = await gql(client, DASHBOARD, {"first": 10, "search": crm.tag}, token=token, headers=headers)
        assert [e["node"]["title"] for e in data_or_fail(body)["deals"]["edges"]] == [crm.deal["title"]]
        spans = recorded.of_trace(trace_id)

        server = one(spans, lambda s: s.kind is SpanKind.SERVER)
        assert server.name == "POST /graphql"
        assert server.parent is not None and server.parent.span_id == parent_id and server.parent.is_remote
        assert (server.attributes or {})["atrium.tenant.id"] == str(tenant.id)

        operation = one(spans, lambda s: s.name == "query Dashboard")
        attributes = operation.attributes or {}
        assert operation.parent is not None and server.context is not None
        assert operation.parent.span_id == server.context.span_id
        assert attributes["graphql.operation.type"] == "query"
        assert attributes["graphql.operation.name"] == "Dashboard"
        assert attributes["atrium.document.id"] == f"sha256:{hashlib.sha256(DASHBOARD.encode()).hexdigest()}"
        # The connection, then per deal (first: 10): its edge, its node, 3 relations and 3 activities.
        assert attributes["atrium.operation.cost"] == 1 + 10 * (1 + 1 + 3 + 3)
        assert attributes["atrium.tenant.id"] == str(tenant.id)
        assert attributes["atrium.answered_by"] == ("plan" if settings.plans else "executor")

        statements = sql(spans)
        assert all(s.kind is SpanKind.CLIENT for s in statements)
        texts = [statement(s) for s in sorted(statements, key=lambda s: s.start_time or 0)]
        assert texts[0].startswith("BEGIN") and texts[-1].startswith("COMMIT"), texts
        assert any("atrium_enter" in t for t in texts), texts  # the membership check, before the operation
        within = sql(descendants(spans, operation))
        assert within and all("atrium_enter" not in statement(s) for s in within)
        if settings.plans:
            assert len(statements) == 4, texts  # BEGIN, atrium_enter, the plan, COMMIT

        # The search text is a variable's value: no span holds it (statements carry placeholders only).
        assert not [v for v in every_value(spans) if crm.tag in v]


async def test_a_webhook_delivery_carries_the_trace_of_its_change(settings: Settings, make_tenant: Any,
                                                                  admin_engine: AsyncEngine) -> None:
    """The outbox row keeps the change's ``traceparent`` (the dispatcher sends it, tests/test_webhooks.py)."""
    tenant: TenantWorld = await make_tenant()
    async with traced_app(settings) as (client, recorded):
        data_or_fail(await gql(client, """mutation { createWebhookEndpoint(input: {url: "http://127.0.0.1:9/in",
            eventTypes: ["company.created"]}) { secret } }""", token=tenant.token(Role.ADMIN)))
        trace_id, _, headers = caller()
        data_or_fail(await gql(client, 'mutation { createCompany(input: {name: "Traced"}) { id } }',
                               token=tenant.token(), headers=headers))
    async with admin_engine.connect() as conn:
        (sent,) = (await conn.execute(select(WEBHOOK_DELIVERIES.c.traceparent).where(
            WEBHOOK_DELIVERIES.c.tenant_id == tenant.id))).scalars().all()
    assert sent is not None and sent.split("-")[1] == f"{trace_id:032x}"
    span_ids = {f"{s.context.span_id:016x}" for s in recorded.of_trace(trace_id) if s.context is not None}
    assert sent.split("-")[2] in span_ids  # a span of the change's own request


async def test_the_fast_path_is_traced_like_the_pipeline(settings: Settings, make_tenant: Any) -> None:
    tenant: TenantWorld = await make_tenant()
    token = tenant.token()
    async with traced_app(settings) as (client, recorded):
        await seed_crm(client, token)
        for _ in range(2):  # the second one finds its plan prepared: answered without the pipeline
            trace_id, _, headers = caller()
            data_or_fail(await gql(client, DASHBOARD, {"first": 5}, token=token, headers=headers))
        spans = recorded.of_trace(trace_id)
        operation = one(spans, lambda s: s.name == "query Dashboard")
        attributes = operation.attributes or {}
        assert attributes["atrium.operation.cost"] == 1 + 5 * (1 + 1 + 3 + 3)
        assert attributes.get("atrium.fast_path") is (True if settings.plans else None)
        assert sql(descendants(spans, operation))


async def test_the_tenant_attribute_can_be_turned_off(settings: Settings, make_tenant: Any) -> None:
    tenant: TenantWorld = await make_tenant()
    async with traced_app(dataclasses.replace(settings, trace_tenant=False)) as (client, recorded):
        crm = await seed_crm(client, tenant.token())
        trace_id, _, headers = caller()
        data_or_fail(await gql(client, DASHBOARD, {"first": 5}, token=tenant.token(), headers=headers))
        spans = recorded.spans
        assert recorded.of_trace(trace_id)
        assert crm.deal and not [s for s in spans if "atrium.tenant.id" in (s.attributes or {})]
        assert not [v for v in every_value(spans) if str(tenant.id) in v]


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_a_mutation_and_its_publish(settings: Settings, make_tenant: Any, broker: str,
                                          request: pytest.FixtureRequest) -> None:
    if broker == "redis":
        settings = dataclasses.replace(settings, redis_url=request.getfixturevalue("redis_url"))
    tenant: TenantWorld = await make_tenant()
    async with traced_app(settings) as (client, recorded):
        trace_id, _, headers = caller()
        name = f"Secret Company {secrets.token_hex(4)}"
        data_or_fail(await gql(client, CREATE_COMPANY, {"input": {"name": name}}, token=tenant.token(),
                               headers=headers))
        spans = recorded.of_trace(trace_id)
        operation = one(spans, lambda s: s.name == "mutation CreateCompany")
        assert (operation.attributes or {})["atrium.answered_by"] == "executor"
        inside = descendants(spans, operation)
        assert any(statement(s).startswith("INSERT INTO companies") for s in sql(inside)), \
            [statement(s) for s in sql(inside)]
        publish = one(inside, lambda s: s.name == "broker publish")
        attributes = publish.attributes or {}
        assert publish.kind is SpanKind.PRODUCER
        assert attributes["messaging.system"] == broker
        assert attributes["atrium.event.record_type"] == "Company" and attributes["atrium.event.kind"] == "CREATED"
        assert attributes["atrium.tenant.id"] == str(tenant.id)
        if broker == "redis":  # the Redis commands are spans of their own (arguments never shown)
            commands = [s for s in descendants(spans, publish) if (s.attributes or {}).get("db.system") == "redis"]
            assert commands and all("?" in statement(s) or statement(s) == "" for s in commands)
        assert not [v for v in every_value(spans) if name in v]


async def test_each_subscription_execution_is_a_span(settings: Settings, make_tenant: Any) -> None:
    tenant: TenantWorld = await make_tenant()
    token = tenant.token()
    recorded = Recorded()
    async with serve_in_process(settings, ManualClock(), recorded.provider) as server, server.client() as client:
        crm = await seed_crm(client, token)
        async with live(server.ws_url, token) as sub:
            op = await sub.live(FEED)
            await gql(client, ACTIVITY, {"input": {"kind": "NOTE", "subject": "Traced", "dealId": crm.deal["id"]}},
                      token=token)
            change = await sub.data(op)
            assert change["activityFeed"]["kind"] == "CREATED"

            def executions(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
                return [s for s in spans if s.name == "subscription" and s.kind is SpanKind.CONSUMER]

            spans = await recorded.wait_for(lambda spans: len(executions(spans)) >= 2)
    greeting, event = sorted(executions(spans), key=lambda s: s.start_time or 0)[:2]
    for span in (greeting, event):
        assert (span.attributes or {})["atrium.tenant.id"] == str(tenant.id)
        assert (span.attributes or {})["graphql.operation.type"] == "subscription"
    # The event's record was loaded inside its execution, and the publish that caused it is a span too.
    assert sql(descendants(spans, event))
    assert [s for s in spans if s.name == "broker publish"]


def layers(app: Starlette) -> list[object]:
    """The app's middleware stack, outermost first (built by its first request)."""
    found: list[object] = []
    node: object = app.middleware_stack
    while node is not None:
        found.append(node)
        node = getattr(node, "app", None)
    return found


async def test_an_app_without_tracing_starts_no_span(app: Starlette, client: httpx.AsyncClient,
                                                     settings: Settings, make_tenant: Any) -> None:
    tenant: TenantWorld = await make_tenant()
    data_or_fail(await gql(client, DASHBOARD, {"first": 1}, token=tenant.token()))
    assert app.state.runtime.tracing is None and not isinstance(app.state.runtime.broker, TracedBroker)
    assert not [layer for layer in layers(app) if isinstance(layer, TraceRequests)]
    recorded = Recorded()
    traced = create_app(settings, tracer_provider=recorded.provider)  # instruments the driver in this process
    async with traced.router.lifespan_context(traced), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=traced), base_url="http://atrium.test") as traced_client:
        data_or_fail(await gql(traced_client, DASHBOARD, {"first": 1}, token=tenant.token()))
        assert [layer for layer in layers(traced) if isinstance(layer, TraceRequests)]
        before = len(recorded.spans)
        assert before
        _, _, headers = caller()
        data_or_fail(await gql(client, DASHBOARD, {"first": 1}, token=tenant.token(), headers=headers))
        assert len(recorded.spans) == before


def test_tracing_follows_the_standard_variables() -> None:
    base = {"ATRIUM_JWT_SECRET": "x"}
    assert not Settings.from_env(base).tracing
    assert Settings.from_env({**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}).tracing
    assert Settings.from_env({**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c.example/v1/traces"}).tracing
    assert not Settings.from_env({**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                  "OTEL_SDK_DISABLED": "true"}).tracing
    assert not Settings.from_env({**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                  "OTEL_TRACES_EXPORTER": "none"}).tracing
    for wrong, variable in (({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
                            ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
                            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT")):
        with pytest.raises(SettingError, match=variable):
            Settings.from_env({**base, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", **wrong})
    assert not Settings.from_env({**base, "ATRIUM_TRACE_TENANT": "off"}).trace_tenant


def test_the_traceparent_of_the_current_span() -> None:
    assert traceparent() is None and trace_headers() == {}
    tracer = Recorded().provider.get_tracer("test")
    with tracer.start_as_current_span("delivery") as span:
        context = span.get_span_context()
        assert traceparent() == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
        assert context.trace_flags.sampled
    assert traceparent() is None


async def test_spans_reach_an_otlp_receiver(database_url: str, make_tenant: Any) -> None:
    """A real server, configured by the standard variables only, exports its spans over OTLP/HTTP."""
    tenant: TenantWorld = await make_tenant()
    with otlp_receiver() as receiver:
        server = await start_atrium(database_url, None, {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SERVICE_NAME": "atrium-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50"})
        try:
            async with server.client() as client:
                trace_id, parent_id, headers = caller()
                data_or_fail(await gql(client, DASHBOARD, {"first": 3}, token=tenant.token(), headers=headers))

                def complete(spans: list[Any]) -> bool:
                    names = {s.name for s in spans if s.trace_id == f"{trace_id:032x}"}
                    return {"POST /graphql", "query Dashboard"} <= names and any(n.startswith("COMMIT") for n in names)

                spans = [s for s in await receiver.wait_for(complete) if s.trace_id == f"{trace_id:032x}"]
        finally:
            server.stop()
    assert receiver.content_types == {"application/x-protobuf"}
    assert {s.resource.get("service.name") for s in spans} == {"atrium-under-test"}
    request = next(s for s in spans if s.name == "POST /graphql")
    assert request.span.parent_span_id.hex() == f"{parent_id:016x}"
    assert request.attributes["atrium.tenant.id"] == str(tenant.id)
    operation = next(s for s in spans if s.name == "query Dashboard")
    assert operation.span.parent_span_id == request.span.span_id
    assert operation.attributes["graphql.operation.name"] == "Dashboard"
