"""Browser origins: CORS over HTTP and the WebSocket ``Origin`` check follow one allow-list.

Over HTTP the app is driven in process (httpx); the WebSocket handshakes go to a real server on a
socket, as a browser's would, with the ``Origin`` header a browser sends.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from atrium.app import create_app
from atrium.http.cors import REQUEST_HEADERS, RESPONSE_HEADERS
from core.clock import ManualClock
from core.settings import SettingError, Settings
from tests.conftest import TenantWorld
from tests.live import WAIT, serve_in_process

MakeTenant = Callable[..., Awaitable[TenantWorld]]
APP = "https://app.example"
OTHER = "https://evil.example"
QUERY = {"query": "{ tenant { slug } }"}


@asynccontextmanager
async def client_for(settings: Settings, **changes: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(dataclasses.replace(settings, **changes))  # type: ignore[arg-type]
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        yield client


def preflight(origin: str, method: str = "POST", headers: str = "authorization, content-type") -> dict[str, str]:
    return {"origin": origin, "access-control-request-method": method, "access-control-request-headers": headers}


def allow_origin(response: httpx.Response) -> str | None:
    value: str | None = response.headers.get("access-control-allow-origin")
    return value


# ---- settings ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "origins"), [
    ("", ()),
    ("*", ("*",)),
    ("https://App.Example", ("https://app.example",)),
    ("https://app.example:443/, http://localhost:3000", ("https://app.example", "http://localhost:3000")),
    ("http://[::1]:8080 http://127.0.0.1", ("http://[::1]:8080", "http://127.0.0.1")),
    ("https://app.example,https://app.example", ("https://app.example",)),
])
def test_origins_are_read_as_browsers_send_them(raw: str, origins: tuple[str, ...]) -> None:
    settings = Settings.from_env({"ATRIUM_JWT_SECRET": "s", "ATRIUM_CORS_ORIGINS": raw})
    assert settings.cors_origins == origins and settings.cors_credentials is False


@pytest.mark.parametrize("raw", ["app.example", "https://app.example/path", "null", "ftp://app.example",
                                 "https://user@app.example", "*, https://app.example", "https://app.example?x=1"])
def test_an_origin_that_is_not_one_is_refused_by_name(raw: str) -> None:
    with pytest.raises(SettingError, match="ATRIUM_CORS_ORIGINS must be"):
        Settings.from_env({"ATRIUM_JWT_SECRET": "s", "ATRIUM_CORS_ORIGINS": raw})


def test_credentials_are_never_allowed_for_any_origin(settings: Settings) -> None:
    with pytest.raises(SettingError, match="ATRIUM_CORS_CREDENTIALS cannot be on while ATRIUM_CORS_ORIGINS is"):
        Settings.from_env({"ATRIUM_JWT_SECRET": "s", "ATRIUM_CORS_ORIGINS": "*", "ATRIUM_CORS_CREDENTIALS": "on"})
    listed = Settings.from_env({"ATRIUM_JWT_SECRET": "s", "ATRIUM_CORS_ORIGINS": APP, "ATRIUM_CORS_CREDENTIALS": "on"})
    assert listed.cors_credentials is True
    # Settings built in code are refused too, when the app is made.
    with pytest.raises(ValueError, match="credentials"):
        create_app(dataclasses.replace(settings, cors_origins=("*",), cors_credentials=True))


# ---- HTTP ---------------------------------------------------------------------------------------------

async def test_a_listed_origin_gets_its_preflight_answered(settings: Settings) -> None:
    async with client_for(settings, cors_origins=(APP,)) as client:
        asked = ", ".join(h.lower() for h in REQUEST_HEADERS)
        response = await client.options("/graphql", headers=preflight(APP, headers=asked))
        assert response.status_code == 200
        assert allow_origin(response) == APP
        assert {m.strip() for m in response.headers["access-control-allow-methods"].split(",")} == {"GET", "POST"}
        allowed = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
        assert {h.lower() for h in REQUEST_HEADERS} <= allowed
        assert int(response.headers["access-control-max-age"]) > 0
        assert "origin" in response.headers["vary"].lower()
        assert "access-control-allow-credentials" not in response.headers
        get = await client.options("/graphql", headers=preflight(APP, method="GET", headers="authorization"))
        assert get.status_code == 200 and allow_origin(get) == APP


@pytest.mark.parametrize(("origin", "method", "headers"), [
    (OTHER, "POST", "authorization, content-type"),          # an origin not listed
    ("https://app.example.evil.test", "POST", "content-type"),  # no prefix or suffix matching
    (APP, "DELETE", "content-type"),                          # a method the endpoint does not serve
    (APP, "POST", "authorization, x-forwarded-for"),          # a header Atrium does not read
])
async def test_other_preflights_are_refused(settings: Settings, origin: str, method: str, headers: str) -> None:
    """A browser sends the request only after a 2xx preflight naming its origin: 400 refuses it, and
    an origin not listed is not named either."""
    async with client_for(settings, cors_origins=(APP,)) as client:
        response = await client.options("/graphql", headers=preflight(origin, method, headers))
        assert response.status_code == 400
        assert allow_origin(response) == (APP if origin == APP else None)


async def test_with_no_origins_listed_a_preflight_is_refused_not_405(client: httpx.AsyncClient) -> None:
    response = await client.options("/graphql", headers=preflight(APP))
    assert response.status_code == 400 and allow_origin(response) is None
    answer = await client.post("/graphql", json=QUERY, headers={"origin": APP})
    assert answer.status_code == 200 and allow_origin(answer) is None


async def test_a_listed_origin_may_read_the_answer_and_its_headers(settings: Settings,
                                                                   make_tenant: MakeTenant) -> None:
    world = await make_tenant("cors")
    auth = {"authorization": f"Bearer {world.token()}"}
    async with client_for(settings, cors_origins=(APP, "http://localhost:3000")) as client:
        response = await client.post("/graphql", json=QUERY, headers={"origin": APP, **auth})
        assert response.json() == {"data": {"tenant": {"slug": world.slug}}}
        assert allow_origin(response) == APP
        exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
        assert {h.lower() for h in RESPONSE_HEADERS} <= exposed and "x-request-id" in exposed
        assert "origin" in response.headers["vary"].lower() and "accept" in response.headers["vary"].lower()
        assert "access-control-allow-credentials" not in response.headers
        # An origin not on the list: the server answers (CORS binds browsers), but grants it nothing.
        other = await client.post("/graphql", json=QUERY, headers={"origin": OTHER, **auth})
        assert other.status_code == 200 and allow_origin(other) is None
        assert "origin" in other.headers["vary"].lower()
        # No Origin header (not a browser, or same-origin GET): no CORS headers at all.
        plain = await client.post("/graphql", json=QUERY, headers=auth)
        assert allow_origin(plain) is None


async def test_any_origin_is_star_and_never_with_credentials(settings: Settings) -> None:
    async with client_for(settings, cors_origins=("*",)) as client:
        response = await client.options("/graphql", headers=preflight(OTHER))
        assert response.status_code == 200 and allow_origin(response) == "*"
        assert "access-control-allow-credentials" not in response.headers
        answer = await client.post("/graphql", json={"query": "{ __typename }"}, headers={"origin": OTHER,
                                                                                           "cookie": "session=x"})
        assert allow_origin(answer) == "*" and "access-control-allow-credentials" not in answer.headers


async def test_credentials_when_enabled_name_the_origin(settings: Settings) -> None:
    async with client_for(settings, cors_origins=(APP,), cors_credentials=True) as client:
        response = await client.options("/graphql", headers=preflight(APP))
        assert allow_origin(response) == APP
        assert response.headers["access-control-allow-credentials"] == "true"
        answer = await client.post("/graphql", json={"query": "{ __typename }"}, headers={"origin": APP})
        assert allow_origin(answer) == APP and answer.headers["access-control-allow-credentials"] == "true"
        refused = await client.options("/graphql", headers=preflight(OTHER))
        assert allow_origin(refused) is None


# ---- WebSocket --------------------------------------------------------------------------------------------

async def handshake(url: str, token: str, origin: str | None) -> dict[str, object]:
    """Open a graphql-transport-ws connection as a page on ``origin`` would; the server's first message."""
    async with connect(url, subprotocols=["graphql-transport-ws"], origin=origin,  # type: ignore[list-item,arg-type]
                       open_timeout=WAIT) as ws:
        await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}}))
        message: dict[str, object] = json.loads(await ws.recv(decode=True))
        return message


async def test_websocket_origins_follow_the_same_list(settings: Settings, make_tenant: MakeTenant) -> None:
    token = (await make_tenant("corsws")).token()
    async with serve_in_process(dataclasses.replace(settings, cors_origins=(APP,)), ManualClock()) as server:
        assert (await handshake(server.ws_url, token, APP))["type"] == "connection_ack"
        assert (await handshake(server.ws_url, token, None))["type"] == "connection_ack"  # not a browser
        assert (await handshake(server.ws_url, token, server.url))["type"] == "connection_ack"  # same origin
        with pytest.raises(InvalidStatus) as refused:
            await handshake(server.ws_url, token, OTHER)
        assert refused.value.response.status_code == 403
    async with serve_in_process(settings, ManualClock()) as server:  # no list: other origins are refused
        with pytest.raises(InvalidStatus) as refused:
            await handshake(server.ws_url, token, APP)
        assert refused.value.response.status_code == 403
        assert (await handshake(server.ws_url, token, server.url))["type"] == "connection_ack"
    async with serve_in_process(dataclasses.replace(settings, cors_origins=("*",)), ManualClock()) as server:
        assert (await handshake(server.ws_url, token, OTHER))["type"] == "connection_ack"
