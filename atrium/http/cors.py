"""Browser origins: which pages on other origins may call Atrium (``Settings.cors_origins``).

One list serves both transports. Over HTTP it is CORS, through Starlette's ``CORSMiddleware``:

- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from a listed
  origin, for ``GET`` or ``POST`` and the request headers Atrium reads (``REQUEST_HEADERS``), is
  answered 200 with ``Access-Control-Allow-Origin`` naming that origin (``*`` when any origin is
  allowed), the allowed methods and headers, and ``Access-Control-Max-Age``; any other preflight is
  answered 400 without ``Access-Control-Allow-Origin`` (so the browser refuses the request). Today's
  405 for every preflight is gone.
- Other responses to a listed origin carry ``Access-Control-Allow-Origin`` and
  ``Access-Control-Expose-Headers`` (``RESPONSE_HEADERS``: what a client reads: the request id,
  rate limits, ETag, cache and replay markers); to an origin not listed, no
  ``Access-Control-Allow-Origin``. Every answer to a request with an ``Origin`` varies by it.
- ``Access-Control-Allow-Credentials: true`` only when ``Settings.cors_credentials`` is on, and
  never together with ``*``: ``cors_middleware`` refuses that combination (``ValueError``), because
  Starlette would then echo every origin with credentials allowed, which is no allow-list at all.

WebSocket handshakes are not subject to CORS: ``Settings.cors_origins`` is the view's
``allowed_origins`` (``atrium.http.endpoint``), so a handshake whose ``Origin`` is another origin
not on the list is refused with HTTP 403 before it is accepted; same-origin pages and clients that
send no ``Origin`` (not browsers) are unaffected.
"""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from atrium.http.idempotency import HEADER as IDEMPOTENCY_KEY
from atrium.http.idempotency import REPLAYED
from core.settings import Settings

METHODS = ("GET", "POST")
"""The methods of the GraphQL endpoint (the only ones a page on another origin needs)."""
REQUEST_HEADERS = (
    "Authorization", "Content-Type", "Accept", "X-API-Key", "X-Request-ID", IDEMPOTENCY_KEY, "Atrium-Cache",
    "If-None-Match", "traceparent", "tracestate",
)
"""Request headers Atrium reads (W3C trace context included), which pages may therefore send."""
RESPONSE_HEADERS = (
    "X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset", "Retry-After", "ETag",
    "Atrium-Cache", REPLAYED, "WWW-Authenticate",
)
"""Response headers beyond the CORS-safelisted ones that scripts on allowed origins may read."""
MAX_AGE = 600
"""Seconds a browser may cache a preflight's answer."""


def cors_middleware(settings: Settings) -> Middleware:
    """The CORS middleware for ``settings`` (module docstring). With no origins listed it still
    answers preflights, refusing them, and adds no ``Access-Control-Allow-Origin`` anywhere."""
    origins = settings.cors_origins
    if settings.cors_credentials and "*" in origins:
        raise ValueError("CORS credentials cannot be allowed for any origin (*): list the origins")
    return Middleware(CORSMiddleware, allow_origins=origins, allow_methods=METHODS, allow_headers=REQUEST_HEADERS,
                      allow_credentials=settings.cors_credentials, expose_headers=RESPONSE_HEADERS, max_age=MAX_AGE)
