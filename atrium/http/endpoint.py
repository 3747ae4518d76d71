"""The GraphQL endpoint: credential -> principal -> ``Session`` and ``Context``, for HTTP and WebSocket.

A present but bad credential never degrades to anonymous: over HTTP it is answered with 401 and a
GraphQL error coded UNAUTHENTICATED before any execution. Once its credential is verified (cheaply:
tokens are remembered, ``auth.tokens``), a request takes its place in the process
(``atrium.http.admission``: per-tenant shares of a bound on requests in flight) or is answered 503
SERVICE_UNAVAILABLE with ``Retry-After`` at once. Each admitted request gets one session, made once
its membership is confirmed, and closed when the response is ready; its place is given back then.

WebSocket (graphql-transport-ws only): the credential comes in ``connection_init``, which must arrive
within ``Settings.ws_init_timeout_seconds`` of the socket's opening (else Strawberry closes it with
4408, the protocol's ``connectionInitWaitTimeout``); a missing or bad one closes the socket with 4403
(Strawberry's ``ConnectionRejectionError``) before any operation, and the socket is closed with 4401
when the token expires (one timer task per connection, on the app's clock, cancelled when it closes).
Every operation runs with a context and session of its own, through ``atrium.http.websocket``:
subscriptions with equal tenant, role, document and variables share one execution.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult

from atrium.http.admission import admission_key
from atrium.http.deadline import HOLD_KEY
from atrium.http.graphql_http import GraphQLOverHTTP, Page, failure_response
from atrium.http.runtime import Runtime
from atrium.http.websocket import GroupedTransportWSHandler, Grouping, LiveGroups, OperationSpec
from atrium.observability.logs import request_id_for as request_id_of_headers
from atrium.schema import build_schema
from auth.principal import Principal, authenticate, confirm_membership
from auth.session import Context, Session
from core.errors import AtriumError, Overloaded, Unauthenticated, error_body
from core.telemetry import current_request, identify
from models.db import Databases
from schema.extensions import coded

EXPIRY_KEY = "atrium.expiry"
TOKEN_EXPIRED = 4401


def request_id_for(conn: HTTPConnection) -> str:
    """The request's id as its log lines carry it (``atrium.observability.logs``): the caller's sane
    ``X-Request-ID``, else a fresh one."""
    record = current_request()
    return record.request_id if record is not None else request_id_of_headers(conn.headers)


def error_response(error: AtriumError, status: int, request_id: str) -> Response:
    return Response(json.dumps(error_body(error)), status_code=status, media_type="application/json",
                    headers={"x-request-id": request_id, "www-authenticate": "Bearer"})


def overloaded_response(error: Overloaded, request_id: str, accept: str | None) -> Response:
    """The 503 answer to a request refused by admission (``failure_response``, with ``Retry-After``)."""
    return failure_response(error, 503, request_id, accept, {"retry-after": str(error.extra["retryAfter"])})


@dataclass
class SocketState:
    """One WebSocket connection as Strawberry keeps it: the ``connection_init`` payload and, once it
    was accepted, the verified principal. Operations never see this; each gets a ``Context``."""

    request: WebSocket
    request_id: str
    connection_params: dict[str, Any] | None = None
    principal: Principal | None = None
    expiry: asyncio.Task[None] | None = field(default=None, repr=False)


class AtriumGraphQL(GraphQLOverHTTP):
    graphql_transport_ws_handler_class = GroupedTransportWSHandler

    def __init__(self, runtime: Runtime, *, ide: Page | None = None) -> None:
        """The endpoint for ``runtime``; ``ide``: the page a browser's plain GET gets (GraphiQL), or
        none. WebSocket handshakes from other origins are accepted from ``Settings.cors_origins``
        only (``atrium.http.cors``)."""
        settings = runtime.settings
        super().__init__(build_schema(production=settings.env == "production"), runtime, ide=ide,
                         subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
                         allowed_origins=settings.cors_origins,
                         connection_init_wait_timeout=dt.timedelta(seconds=settings.ws_init_timeout_seconds))
        self.live_groups = LiveGroups(self.schema, self.live_result, queue_size=settings.subscriber_queue_size)
        self.grouping = Grouping(self.schema)

    def context(self, conn: HTTPConnection, request_id: str, session: Session | None, response: Any = None,
                *, planned: bool = False) -> Context:
        rt = self.runtime
        meter = rt.limiter.meter(session.principal if session else None, conn.client.host if conn.client else None) \
            if rt.limiter is not None else None
        return Context(settings=rt.settings, databases=rt.databases, broker=rt.broker, clock=rt.clock,
                       request=conn, request_id=request_id, principal=session.principal if session else None,
                       own_session=session, response=response, meter=meter, metrics=rt.metrics, planned=planned,
                       tasks=rt.tasks, leases=rt.leases)

    async def open_session(self, principal: Principal) -> Session:
        return await open_session(self.runtime.databases, principal)

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
        try:
            principal = await authenticate(self.runtime.verifier, request.headers.get("authorization"),
                                           api_key=request.headers.get("x-api-key"), api_keys=self.runtime.api_keys)
        except Unauthenticated as exc:
            await error_response(exc, 401, request_id)(scope, receive, send)
            return
        try:
            async with self.runtime.admission.place(admission_key(principal, request)):
                await self.answer(request, request_id, principal, send)
        except Overloaded as exc:
            scope[HOLD_KEY] = exc.extra["retryAfter"]  # this connection is not read again before then
            await overloaded_response(exc, request_id, request.headers.get("accept"))(scope, receive, send)

    async def answer(self, request: Request, request_id: str, principal: Principal | None, send: Send) -> None:
        """Serve an admitted HTTP request: its session opened (the membership confirmed), then its answer."""
        scope, receive = request.scope, request.receive
        session: Session | None = None
        try:
            if principal is not None:
                identify(str(principal.tenant_id), trace=self.runtime.settings.trace_tenant)
                session = await self.open_session(principal)
        except Unauthenticated as exc:
            await error_response(exc, 401, request_id)(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            sub_response = await self.get_sub_response(request)
            context = self.context(request, request_id, session, sub_response, planned=self.runtime.settings.plans)
            response = await self.serve(request, context, sub_response)
            await response(scope, receive, send_with_id)
        finally:
            if session is not None:
                await session.close()

    async def get_context(self, request: Request | WebSocket, response: Any) -> SocketState:  # type: ignore[override]
        """Strawberry asks this only for WebSocket connections (HTTP requests are served by ``__call__``)."""
        assert isinstance(request, WebSocket)
        return SocketState(request=request, request_id=request_id_for(request))

    async def on_ws_connect(self, context: SocketState) -> dict[str, Any] | None:  # type: ignore[override]
        params = context.connection_params or {}
        authorization = params.get("authorization") or params.get("Authorization")
        try:
            principal = await authenticate(self.runtime.verifier, authorization if isinstance(authorization, str)
                                           else None)
            if principal is None:
                raise Unauthenticated("connection_init needs authorization")
            session = await self.open_session(principal)  # the membership, checked once for the connection
            await session.close()
        except Unauthenticated as exc:
            raise ConnectionRejectionError({"code": "UNAUTHENTICATED", "message": exc.message}) from exc
        context.principal = session.principal
        identify(str(session.principal.tenant_id), trace=False)  # the connection's lines (it has no span)
        context.request.scope[EXPIRY_KEY] = asyncio.create_task(
            self.close_when_expired(context.request, principal.expires_at), name="atrium-token-expiry")
        return None

    async def close_when_expired(self, websocket: WebSocket, expires_at: float) -> None:
        """Close ``websocket`` with 4401 when its token expires (the client re-authenticates)."""
        await self.runtime.clock.sleep_until(expires_at)
        with contextlib.suppress(RuntimeError):  # already closed
            await websocket.close(code=TOKEN_EXPIRED, reason="Token expired")

    def operation_spec(self, state: SocketState, query: str, variables: dict[str, Any] | None,
                       operation_name: str | None) -> OperationSpec | None:
        """How a WebSocket operation runs (``Grouping``), in a context of its own, in a place of its
        tenant's share of the process (``atrium.http.admission``, as over HTTP)."""
        if state.principal is None or (plan := self.grouping.spec(state.principal, query, variables,
                                                                   operation_name)) is None:
            return None  # Strawberry's own handling (it closes the socket for unparsable documents)
        group, replay, subscription = plan
        tenant = admission_key(state.principal, state.request)
        return OperationSpec(group, replay, context=lambda: self.operation_context(state, operation_name),
                             subscription=subscription, place=lambda: self.runtime.admission.place(tenant))

    @contextlib.asynccontextmanager
    async def operation_context(self, state: SocketState, operation_name: str | None = None) -> AsyncIterator[Context]:
        """A context for one operation on a WebSocket: the connection's principal, a session of its own,
        and the same rate-limit buckets as HTTP (a socket is no way around them); with tracing, each
        event it executes is a span (``Context.trace_event``)."""
        assert state.principal is not None
        principal = state.principal
        opened = Session.open(self.runtime.databases, principal)
        session = opened
        try:
            session = await opened.with_rules()
            context = self.context(state.request, uuid.uuid4().hex, session)
            if (tracing := self.runtime.tracing) is not None:
                context = dataclasses.replace(
                    context, trace_event=lambda: tracing.event_span(principal.tenant_id, operation_name))
            yield context
        finally:
            await session.close()

    def live_result(self, result: ExecutionResult) -> dict[str, Any]:
        """A result as graphql-transport-ws sends it, errors coded and masked as over HTTP."""
        payload: dict[str, Any] = {"data": result.data}
        if result.errors:
            payload["errors"] = [coded(e, None).formatted for e in result.errors]
        if result.extensions:
            payload["extensions"] = result.extensions
        return payload


async def open_session(databases: Databases, principal: Principal) -> Session:
    """A session for ``principal``, its membership confirmed in the session's own transaction (one
    statement): the role is capped by the current membership, a removed member is refused; its
    tenant's field rules read."""
    session = Session.open(databases, principal)
    try:
        confirmed = dataclasses.replace(session, principal=await confirm_membership(session.db, principal))
        return await confirmed.with_rules()
    except BaseException:
        await session.close()
        raise
