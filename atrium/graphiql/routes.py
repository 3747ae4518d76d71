"""GraphiQL, served by Atrium itself: the page at ``/graphql`` (for a browser's plain GET) and its
assets under ``/graphiql/``, so that it works with no internet and loads nothing from elsewhere.

The assets are this package's ``static/`` folder: a page, a stylesheet and a start-up script of
our own, and GraphiQL and React as published on npm (``static/vendor``, each package with its
licence; ``vendor.json`` records versions and hashes, ``tools/vendor_graphiql.py`` re-vendors
them). Each asset is read once, when the routes are built, and answered with an ``ETag`` (a
matching ``If-None-Match`` gets 304) and gzip-compressed when the client accepts it (GraphiQL's
bundle is 3.5 MB, 0.7 MB compressed). The page's
Content-Security-Policy allows scripts, styles and connections (HTTP and WebSocket) to this origin
only, with no inline script or style.

Whether GraphiQL is served at all is ``Settings.graphiql_enabled`` (off in production unless
``ATRIUM_GRAPHIQL=on``); ``atrium.app`` then mounts neither the page nor the assets.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STATIC = Path(__file__).with_name("static")
PREFIX = "/graphiql/"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    "": "text/plain; charset=utf-8",  # licences
    ".json": "application/json",
}
POLICY = "; ".join((
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "font-src 'self' data:",
    "img-src 'self' data:",
    "connect-src 'self'",
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


@dataclass(frozen=True)
class Asset:
    """One static file, held in memory as it is and gzip-compressed."""

    body: bytes
    compressed: bytes
    media_type: str
    etag: str

    @classmethod
    def read(cls, path: Path) -> Asset:
        body = path.read_bytes()
        return cls(body, gzip.compress(body, compresslevel=6, mtime=0), MEDIA_TYPES[path.suffix],
                   f'"{sha256(body).hexdigest()[:32]}"')

    def response(self, request: Request) -> Response:
        headers = {**HEADERS, "etag": self.etag, "vary": "Accept-Encoding"}
        if request.headers.get("if-none-match") == self.etag:
            return Response(status_code=304, headers=headers)
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(self.compressed, media_type=self.media_type,
                            headers={**headers, "content-encoding": "gzip"})
        return Response(self.body, media_type=self.media_type, headers=headers)


@functools.cache
def assets() -> dict[str, Asset]:
    """Every file under ``static/`` but the page, by its URL path (read once per process: they are
    the package's own files, which do not change while it runs)."""
    return {PREFIX + path.relative_to(STATIC).as_posix(): Asset.read(path)
            for path in sorted(STATIC.rglob("*")) if path.is_file() and path.name != "index.html"}


class GraphiQL:
    """The page (``page``, the endpoint's IDE) and its asset routes (``routes``)."""

    def __init__(self) -> None:
        self.index = Asset.read(STATIC / "index.html")
        self.assets = assets()

    async def page(self, request: Request) -> Response:
        return self.index.response(request)

    def routes(self) -> list[Route]:
        return [Route(path, _serving(asset), methods=["GET", "HEAD"]) for path, asset in self.assets.items()]


def _serving(asset: Asset) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return asset.response(request)

    return endpoint
