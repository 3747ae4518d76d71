"""``create_app(settings)``: the ASGI application. Its lifespan owns engines, broker and verifier."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute

from atrium.dashboard.routes import dashboard_routes
from atrium.http.endpoint import AtriumGraphQL
from atrium.http.ratelimit import rate_limiter
from atrium.http.runtime import Runtime
from atrium.observability.metrics import MeasureHttp, Metrics
from auth.tokens import TokenVerifier
from core.settings import Settings
from models.db import Databases
from partners.documents import apq_store
from partners.keys import ApiKeys
from subscriptions.broker import create_broker

MAX_BODY = 1 << 20


def create_app(settings: Settings) -> Starlette:
    """An Atrium app for ``settings`` (whose database URL must be resolved)."""
    view = AtriumGraphQL(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        databases = Databases(settings.app_url, pool_size=settings.pool_size)
        redis = Redis.from_url(settings.redis_url) if settings.redis_url else None  # limits and APQ
        broker = create_broker(settings.redis_url, prefix=settings.redis_prefix,
                               maxsize=settings.subscriber_queue_size, presence_ttl=settings.presence_ttl_seconds)
        await broker.start()
        runtime = Runtime(settings=settings, databases=databases, broker=broker,
                          verifier=TokenVerifier(settings), api_keys=ApiKeys(databases),
                          apq=apq_store(settings, databases, redis), limiter=rate_limiter(settings, redis),
                          metrics=metrics)
        metrics.observe_runtime(runtime, view.live_groups)
        view.runtime = runtime
        app.state.runtime = runtime
        try:
            yield
        finally:
            await broker.close()
            if redis is not None:
                await redis.aclose()
            await databases.dispose()

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> JSONResponse:
        runtime: Runtime = request.app.state.runtime
        try:
            async with runtime.databases.default.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except (OSError, SQLAlchemyError):
            return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Starlette(
        routes=[
            Route("/graphql", view, methods=["GET", "POST"]),
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
