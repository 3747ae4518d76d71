"""The GraphQL endpoint: credential -> principal -> typed Context, for HTTP and WebSocket alike.

A present but bad credential never degrades to anonymous: over HTTP it is answered with 401 and a
GraphQL error coded UNAUTHENTICATED before any execution. Each HTTP request's database scope is
closed when the response is ready.

WebSocket (graphql-transport-ws only): the credential comes in ``connection_init``; a missing or bad
one closes the socket with 4403 (Strawberry's ``ConnectionRejectionError``) before any operation,
and the socket is closed with 4401 when the token expires (one timer task per connection,
cancelled when it closes). Every operation runs with a context of its own, through
``atrium.http.websocket``: subscriptions with equal tenant, role, document and variables share one
execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult

from atrium.http.graphql_http import GraphQLOverHTTP
from atrium.http.runtime import Runtime
from atrium.http.websocket import GroupedTransportWSHandler, LiveGroups, OperationSpec
from atrium.schema import build_schema
from auth.context import Context, Principal, authenticate, confirm_membership
from core.errors import AtriumError, Unauthenticated
from core.settings import Settings
from models.db import TenantScope
from resolvers.live import delivery
from resolvers.loaders import Loaders
from schema.extensions import coded

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CONTEXT_KEY = "atrium.context"
EXPIRY_KEY = "atrium.expiry"
TOKEN_EXPIRED = 4401


def request_id_for(conn: HTTPConnection) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token, else a fresh one."""
    given = conn.headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


def error_response(error: AtriumError, status: int, request_id: str) -> Response:
    body = {"errors": [{"message": error.message, "extensions": error.extensions}]}
    return Response(json.dumps(body), status_code=status, media_type="application/json",
                    headers={"x-request-id": request_id, "www-authenticate": "Bearer"})


class AtriumGraphQL(GraphQLOverHTTP):
    runtime: Runtime
    """Set by the app's lifespan before the first request."""
    graphql_transport_ws_handler_class = GroupedTransportWSHandler

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        kwargs.setdefault("subscription_protocols", (GRAPHQL_TRANSPORT_WS_PROTOCOL,))
        super().__init__(build_schema(production=settings.env == "production"), **kwargs)
        self.live_groups = LiveGroups(self.schema, self.live_result, queue_size=settings.subscriber_queue_size)

    def make_context(self, conn: HTTPConnection, principal: Principal | None, request_id: str) -> Context:
        rt = self.runtime
        context = Context(settings=rt.settings, databases=rt.databases, broker=rt.broker, request=conn,
                          request_id=request_id, metrics=rt.metrics)
        if principal is not None:
            self.bind(context, principal)
        return context

    async def confirmed(self, principal: Principal) -> Principal:
        """``principal`` re-checked against its membership in a short transaction of its own
        (for WebSocket connections, whose context outlives any one transaction)."""
        scope = TenantScope(self.runtime.databases, principal.tenant_id)
        try:
            return await confirm_membership(scope, principal)
        finally:
            await scope.close()

    def attach_meter(self, context: Context, conn: HTTPConnection) -> None:
        """Charge ``context``'s operations to its principal's (or its address's) rate limits, when on."""
        if self.runtime.limiter is not None:
            client = conn.client.host if conn.client else None
            context.meter = self.runtime.limiter.meter(context.principal, client)

    def bind(self, context: Context, principal: Principal) -> None:
        """Attach ``principal`` and a fresh tenant scope and loaders to ``context``."""
        context.principal = principal
        context.db = TenantScope(self.runtime.databases, principal.tenant_id)
        context.loaders = Loaders(context.db)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            websockets = self.runtime.metrics.websockets
            websockets.inc()
            try:
                await super().__call__(scope, receive, send)
            finally:
                websockets.dec()
                if (timer := scope.pop(EXPIRY_KEY, None)) is not None:
                    timer.cancel()
            return
        request = Request(scope, receive)
        request_id = request_id_for(request)
        context = self.make_context(request, None, request_id)
        try:
            principal = await authenticate(self.runtime.verifier, request.headers.get("authorization"),
                                           api_key=request.headers.get("x-api-key"), api_keys=self.runtime.api_keys)
            if principal is not None:
                self.bind(context, principal)
                assert context.db is not None
                context.principal = await confirm_membership(context.db, principal)
        except Unauthenticated as exc:
            if context.db is not None:
                await context.db.close()
            await error_response(exc, 401, request_id)(scope, receive, send)
            return
        self.attach_meter(context, request)
        scope[CONTEXT_KEY] = context

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await super().__call__(scope, receive, send_with_id)
        finally:
            if context.db is not None:
                await context.db.close()

    async def get_context(self, request: Request | WebSocket, response: Any) -> Context:
        context = request.scope.get(CONTEXT_KEY)
        if context is None:  # WebSocket: authenticated later, in on_ws_connect
            context = self.make_context(request, None, request_id_for(request))
        context.response = response
        return context  # type: ignore[no-any-return]

    async def on_ws_connect(self, context: Context) -> dict[str, Any] | None:
        params = context.connection_params or {}
        authorization = params.get("authorization") or params.get("Authorization")
        try:
            principal = await authenticate(self.runtime.verifier, authorization if isinstance(authorization, str)
                                           else None)
        except Unauthenticated as exc:
            raise ConnectionRejectionError({"code": "UNAUTHENTICATED", "message": exc.message}) from exc
        if principal is None:
            raise ConnectionRejectionError({"code": "UNAUTHENTICATED",
                                            "message": "connection_init needs authorization"})
        try:
            principal = await self.confirmed(principal)
        except Unauthenticated as exc:
            raise ConnectionRejectionError({"code": "UNAUTHENTICATED", "message": exc.message}) from exc
        self.bind(context, principal)
        if isinstance(context.request, WebSocket):
            context.request.scope[EXPIRY_KEY] = asyncio.create_task(
                self.close_when_expired(context.request, principal.expires_at), name="atrium-token-expiry")
        return None

    @staticmethod
    async def close_when_expired(websocket: WebSocket, expires_at: float) -> None:
        """Close ``websocket`` with 4401 when its token expires (the client re-authenticates)."""
        await asyncio.sleep(max(0.0, expires_at - time.time()))
        with contextlib.suppress(RuntimeError):  # already closed
            await websocket.close(code=TOKEN_EXPIRED, reason="Token expired")

    def operation_spec(self, context: Context, query: str, variables: dict[str, Any] | None,
                       operation_name: str | None) -> OperationSpec | None:
        """How a WebSocket operation runs (``resolvers.live.delivery``), in a context of its own."""
        if context.principal is None or (plan := delivery(context.principal, query, variables,
                                                          operation_name)) is None:
            return None  # Strawberry's own handling (it closes the socket for unparsable documents)
        return OperationSpec(*plan, context=lambda: self.operation_context(context))

    @contextlib.asynccontextmanager
    async def operation_context(self, connection: Context) -> AsyncIterator[Context]:
        """A context for one operation on a WebSocket: the connection's principal, a scope of its own."""
        assert connection.principal is not None and connection.request is not None
        context = self.make_context(connection.request, connection.principal, uuid.uuid4().hex)
        context.connection_params = connection.connection_params
        self.attach_meter(context, connection.request)  # the same buckets as HTTP: a socket is no way around them
        try:
            yield context
        finally:
            if context.db is not None:
                await context.db.close()

    def live_result(self, result: ExecutionResult) -> dict[str, Any]:
        """A result as graphql-transport-ws sends it, errors coded and masked as over HTTP."""
        payload: dict[str, Any] = {"data": result.data}
        if result.errors:
            payload["errors"] = [coded(e, None).formatted for e in result.errors]
        if result.extensions:
            payload["extensions"] = result.extensions
        return payload
