"""``create_app(settings)``: the ASGI application, built with its ``Runtime``; the lifespan starts and closes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from atrium.dashboard.routes import dashboard_routes
from atrium.http.endpoint import AtriumGraphQL
from atrium.http.failures import AnswerFailures
from atrium.http.runtime import Runtime
from atrium.observability.metrics import MeasureHttp
from core.clock import SYSTEM_CLOCK, Clock
from core.errors import OUTAGE_RETRY_AFTER
from core.settings import Settings

MAX_BODY = 1 << 20


def create_app(settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> Starlette:
    """An Atrium app for ``settings`` (whose database URL must be resolved), reading time from ``clock``.

    Building it connects to nothing; its lifespan starts the broker and, on exit, closes the broker,
    Redis and every database engine.
    """
    runtime = Runtime.build(settings, clock)
    view = AtriumGraphQL(runtime)
    metrics = runtime.metrics
    metrics.observe(runtime.broker, runtime.databases, view.live_groups, runtime.answers)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.close()

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
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
            *dashboard_routes(),
        ],
        middleware=[Middleware(MeasureHttp, metrics=metrics)],
        lifespan=lifespan,
        max_body_size=MAX_BODY,
    )
    app.state.runtime = runtime
    return app
