"""The GraphQL endpoint: credential -> principal -> typed Context, for HTTP and WebSocket alike.

A present but bad credential never degrades to anonymous: over HTTP it is answered with 401 and a
GraphQL error coded UNAUTHENTICATED before any execution. Each HTTP request's database scope is
closed when the response is ready.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError

from atrium.errors import AtriumError, Unauthenticated
from atrium.runtime import Runtime
from atrium.settings import Settings
from auth.context import Context, Principal, authenticate, confirm_membership
from models.db import TenantScope
from resolvers.loaders import Loaders
from schema.root import build_schema

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
CONTEXT_KEY = "atrium.context"


def request_id_for(conn: HTTPConnection) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token, else a fresh one."""
    given = conn.headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


def error_response(error: AtriumError, status: int, request_id: str) -> Response:
    body = {"errors": [{"message": error.message, "extensions": error.extensions}]}
    return Response(json.dumps(body), status_code=status, media_type="application/json",
                    headers={"x-request-id": request_id, "www-authenticate": "Bearer"})


class AtriumGraphQL(GraphQL[Context, None]):
    runtime: Runtime
    """Set by the app's lifespan before the first request."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(build_schema(production=settings.env == "production"), **kwargs)

    def make_context(self, conn: HTTPConnection, principal: Principal | None, request_id: str) -> Context:
        rt = self.runtime
        context = Context(settings=rt.settings, databases=rt.databases, broker=rt.broker, request=conn,
                          request_id=request_id)
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

    def bind(self, context: Context, principal: Principal) -> None:
        """Attach ``principal`` and a fresh tenant scope and loaders to ``context``."""
        context.principal = principal
        context.db = TenantScope(self.runtime.databases, principal.tenant_id)
        context.loaders = Loaders(context.db)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive)
        request_id = request_id_for(request)
        context = self.make_context(request, None, request_id)
        try:
            principal = await authenticate(self.runtime.verifier, request.headers.get("authorization"))
            if principal is not None:
                self.bind(context, principal)
                assert context.db is not None
                context.principal = await confirm_membership(context.db, principal)
        except Unauthenticated as exc:
            if context.db is not None:
                await context.db.close()
            await error_response(exc, 401, request_id)(scope, receive, send)
            return
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
        return None
