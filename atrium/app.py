"""``create_app(settings)``: the ASGI application, built with its ``Runtime``; the lifespan starts and closes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from atrium.dashboard.routes import dashboard_routes
from atrium.graphiql.routes import GraphiQL
from atrium.http.cors import cors_middleware
from atrium.http.csv import import_upload, list_export
from atrium.http.deadline import STATE_KEY as READ_DEADLINE
from atrium.http.endpoint import AtriumGraphQL
from atrium.http.exports import export_download
from atrium.http.failures import AnswerFailures
from atrium.http.runtime import Runtime
from atrium.observability.logs import RequestLogging
from atrium.observability.metrics import MeasureHttp
from core.clock import SYSTEM_CLOCK, Clock
from core.errors import OUTAGE_RETRY_AFTER
from core.settings import Settings
from core.version import VERSION
from resolvers.csv_import import MAX_FILE_BYTES

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

MAX_BODY = 1 << 20


def create_app(settings: Settings, *, clock: Clock = SYSTEM_CLOCK,
               tracer_provider: TracerProvider | None = None) -> Starlette:
    """An Atrium app for ``settings`` (whose database URL must be resolved), reading time from ``clock``.

    Building it connects to nothing; its lifespan starts the broker and, on exit, closes the broker,
    Redis and every database engine, and flushes traces. Spans go to ``tracer_provider`` when one is
    given (tests), else over OTLP when ``settings.tracing`` is on (``atrium.observability.tracing``).
    Pages on other origins reach it as ``settings.cors_origins`` allows (``atrium.http.cors``);
    GraphiQL is served when ``settings.graphiql_enabled``.
    """
    runtime = Runtime.build(settings, clock, tracer_provider)
    graphiql = GraphiQL() if settings.graphiql_enabled else None
    view = AtriumGraphQL(runtime, ide=graphiql.page if graphiql else None)
    metrics = runtime.metrics
    metrics.observe(runtime.broker, runtime.databases, view.live_groups, runtime.answers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        await runtime.start()
        try:
            yield {READ_DEADLINE: settings.request_read_timeout_seconds}  # uvicorn's protocols read it
        finally:
            await runtime.close()

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": VERSION})

    async def readyz(request: Request) -> JSONResponse:
        if runtime.admission.saturated:  # a load balancer should send new work elsewhere for now
            return JSONResponse({"status": "unavailable", "saturated": True}, status_code=503,
                                headers={"retry-after": str(settings.retry_after_seconds)})
        if not await runtime.databases.reachable():
            return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503,
                                headers={"retry-after": str(OUTAGE_RETRY_AFTER)})
        return JSONResponse({"status": "ready"})

    app = Starlette(
        routes=[
            Route("/graphql", AnswerFailures(view), methods=["GET", "POST"]),
            WebSocketRoute("/graphql", view),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics.endpoint(settings)),
            Route("/exports/{job_id}", export_download(runtime)),
            Route("/imports", import_upload(runtime), methods=["POST"], max_body_size=MAX_FILE_BYTES),
            Route("/csv/{plural}", list_export(runtime)),
            *dashboard_routes(),
            *(graphiql.routes() if graphiql else ()),
        ],
        # Outermost first: the request's span, then its log record (so every line has its trace id),
        # then its metrics.
        middleware=[
            *([Middleware(runtime.tracing.middleware)] if runtime.tracing is not None else []),
            Middleware(RequestLogging, access_log=settings.access_log),
            Middleware(MeasureHttp, metrics=metrics),
            cors_middleware(settings),
        ],
        lifespan=lifespan,
        max_body_size=MAX_BODY,
    )
    app.state.runtime = runtime
    return app
