"""The live dashboard page: ``/dashboard`` and its two assets, static files with no build step.

The page signs in with a bearer token (or the ``login`` mutation), reads over ``/graphql`` and stays
live over the same graphql-transport-ws subscriptions any client uses (``pipelineSummary`` and
``dealBoard``): it holds no privilege of its own. Everything it loads comes from this server, and
the Content-Security-Policy says so: no inline script, no third-party origin, no framing.
"""

from __future__ import annotations

from hashlib import sha256
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

ASSETS = Path(__file__).with_name("static")
MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "connect-src 'self'",
    "img-src 'self' data:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
))
HEADERS = {
    "content-security-policy": POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def _asset(name: str) -> Route:
    body = (ASSETS / name).read_bytes()
    etag = f'"{sha256(body).hexdigest()[:32]}"'
    headers = {**HEADERS, "etag": etag}

    async def serve(request: Request) -> Response:
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type=MEDIA_TYPES[name], headers=headers)

    path = "/dashboard" if name == "index.html" else f"/dashboard/{name}"
    return Route(path, serve, methods=["GET", "HEAD"], name=f"dashboard:{name}")


def dashboard_routes() -> list[Route]:
    """Routes of the page and its script and stylesheet (read once, revalidated by ETag)."""
    return [_asset(name) for name in MEDIA_TYPES]
