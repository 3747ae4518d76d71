"""Failures that escape the GraphQL endpoint are still answered in GraphQL, never by Starlette's text/plain 500.

``AnswerFailures`` wraps the endpoint's HTTP side. Most failures are answered where they happen (a
field's error in its response, a request error before execution); what is left escapes the
endpoint, and is answered here, in the media type the request accepts, with its ``X-Request-ID``:

- an outage (``models.outages.is_outage``: PostgreSQL or Redis unreachable, restarting, refusing,
  or gone from under a statement) on the request's way through the endpoint (verifying an API key,
  confirming the membership, its transaction, a cut-off commit) is 503 SERVICE_UNAVAILABLE with
  ``Retry-After``;
- anything else is logged with its traceback and the request id, and answered 500 INTERNAL
  carrying only ``requestId``.

A failure after the response began cannot be answered any more: it is left to the server (uvicorn
closes the connection and logs it). A client that left before its request was read gets nothing.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from atrium.http.endpoint import request_id_for
from atrium.http.graphql_http import failure_response
from core.errors import Internal, ServiceUnavailable
from models.outages import is_outage

log = logging.getLogger("atrium.http")


def unavailable_response(request_id: str, accept: str | None) -> Response:
    """503 SERVICE_UNAVAILABLE with ``Retry-After``."""
    error = ServiceUnavailable()
    return failure_response(error, 503, request_id, accept, {"retry-after": str(error.retry_after)})


class AnswerFailures:
    """The ASGI wrapper answering what escapes the endpoint (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:
            return  # the client left before its request was read: there is nobody to answer
        except Exception as exc:
            if started:
                raise
            request = Request(scope, receive)
            request_id = request_id_for(request)
            accept = request.headers.get("accept")
            if is_outage(exc):
                if not isinstance(exc, ServiceUnavailable):  # that one was logged where it was raised
                    log.warning("service unavailable (request %s): %s: %s", request_id, type(exc).__name__, exc,
                                extra={"request_id": request_id})
                response = unavailable_response(request_id, accept)
            else:
                log.error("unexpected error (request %s)", request_id, exc_info=exc, extra={"request_id": request_id})
                response = failure_response(Internal(request_id), 500, request_id, accept)
            await response(scope, receive, send)
