"""Live-update test kit: servers to subscribe to and a graphql-transport-ws client.

Its fixtures are shared by every test module (``tests/conftest.py`` registers this module as a
pytest plugin); the helpers below are imported as usual.

- ``servers`` (fixture): processes A and B, real Atrium servers (``uvicorn --factory
  atrium.asgi:create_from_env``) sharing the test database and the Redis of the run (``redis_url``),
  started once per session.
- ``own_redis`` (fixture): a private ``redis-server`` on a free port (``RedisServer``) that a test
  may kill and restart.
- ``clocked_server`` (fixture): an Atrium app served in the test's own event loop, reading time from
  a ``ManualClock`` that the test moves (token expiry without waiting real seconds).
- ``Live``: a graphql-transport-ws client on the ``websockets`` library; every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import uvicorn
from opentelemetry.sdk.trace import TracerProvider
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from atrium.app import create_app
from core.clock import ManualClock
from core.settings import Settings
from tests.conftest import TEST_SECRET, data_or_fail, gql

ROOT = Path(__file__).resolve().parent.parent
WAIT = 15.0
"""Seconds any single expected message may take before the test fails."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def redis_answers(url: str) -> bool:
    client = Redis.from_url(url, socket_connect_timeout=1.0)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


class RedisServer:
    """A ``redis-server`` of the test's own on a fixed free port, to kill and restart at will."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (needed to restart Redis during a test)")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.process = subprocess.Popen(  # noqa: ASYNC220 - a server process, awaited through its port
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + WAIT
        while not await redis_answers(self.url):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A private, started ``redis-server`` (skips when none is installed); killed after the test."""
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class AtriumProcess:
    """One Atrium server process (uvicorn) on its own port."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30.0)

    def rss(self) -> int:
        """Resident memory of the process, in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def start_atrium(database_url: str, redis_url: str | None, env: Mapping[str, str] | None = None, *,
                       port: int | None = None, log_level: str = "warning") -> AtriumProcess:
    """Start ``uvicorn --factory atrium.asgi:create_from_env`` and wait until ``/healthz`` answers.

    ``database_url`` is the admin URL of the migrated test database: the app derives its
    ``atrium_app`` role URL from it. ``env``: more environment variables. ``port``: a free one unless
    given (to restart a server in place). Its stdout and stderr go to ``AtriumProcess.log``.
    """
    port = port or free_port()
    environment = {**os.environ, "DATABASE_URL": database_url, "ATRIUM_JWT_SECRET": TEST_SECRET,
                   "ATRIUM_ENV": "test", "ATRIUM_DATA_DIR": tempfile.gettempdir(), "ATRIUM_RATE_LIMITS": "off",
                   **(env or {})}
    environment.pop("REDIS_URL", None)
    if redis_url:
        environment["REDIS_URL"] = redis_url
    log = Path(tempfile.gettempdir()) / f"atrium-test-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(  # noqa: ASYNC220 - a server process, awaited through /healthz
            [sys.executable, "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--host", "127.0.0.1",
             "--port", str(port), "--log-level", log_level], cwd=ROOT, env=environment, stdout=out, stderr=out)
    server = AtriumProcess(port, process, log)
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=server.url, timeout=2.0) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"Atrium exited ({process.returncode}): {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get("/healthz")).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"Atrium did not become healthy: {log.read_text()[-2000:]}")
            await asyncio.sleep(0.1)


LIVE_ENV = {"ATRIUM_SUBSCRIBER_QUEUE": "16"}
"""Small subscriber queues (the slow-consumer test fills one). Presence keeps its default 30 s TTL:
the expiry test moves a ``ManualClock`` instead of waiting for these processes' heartbeats."""


@pytest.fixture(scope="session")
async def servers(database_url: str, redis_url: str) -> AsyncIterator[tuple[AtriumProcess, AtriumProcess]]:
    """Processes A and B: one database, one Redis."""
    a = await start_atrium(database_url, redis_url, LIVE_ENV)
    try:
        b = await start_atrium(database_url, redis_url, LIVE_ENV)
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


class _Server(uvicorn.Server):
    """uvicorn's server, saying when it listens (``ready``) instead of being polled for it."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@dataclass
class InProcessAtrium:
    """An Atrium app served by uvicorn inside the test's event loop, on a 127.0.0.1 port of its own."""

    app: Starlette
    clock: ManualClock
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/graphql"

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=30.0)


@contextlib.asynccontextmanager
async def serve_in_process(settings: Settings, clock: ManualClock, tracer_provider: TracerProvider | None = None,
                           *, port: int = 0, **options: Any) -> AsyncIterator[InProcessAtrium]:
    """``create_app(settings, clock=clock, tracer_provider=...)``, its lifespan run, served over real
    sockets until exit (``options``: more ``uvicorn.Config`` options, such as ``http``), on ``port``
    (0: any free one).

    The listening socket is bound before uvicorn starts (no free-port race); the app's lifespan is run
    here rather than by uvicorn, so that a failing startup raises in the test instead of exiting.
    """
    app = create_app(settings, clock=clock, tracer_provider=tracer_provider)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a given port, again after a test
        listener.bind(("127.0.0.1", port))  # 0: any free port
        listener.listen()
        bound: int = listener.getsockname()[1]
        async with app.router.lifespan_context(app):
            config = uvicorn.Config(app, lifespan="off", log_level="warning", log_config=None,
                                    timeout_graceful_shutdown=5, **options)
            server = _Server(config)
            serving = asyncio.create_task(server.serve(sockets=[listener]), name="atrium-in-process")
            try:
                ready = asyncio.create_task(server.ready.wait())
                await asyncio.wait({serving, ready}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if serving.done():
                    serving.result()  # raises what stopped it
                    raise RuntimeError("the in-process server stopped before it was listening")
                if not server.ready.is_set():
                    raise RuntimeError(f"the in-process server did not listen within {WAIT:g} s")
                yield InProcessAtrium(app, clock, bound)
            finally:
                server.should_exit = True
                await serving
    finally:
        listener.close()


def token_expiry(token: str) -> float:
    """The ``exp`` claim of a token (read, not verified): when a ``clocked_server`` refuses it."""
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


@pytest.fixture
async def clocked_server(settings: Settings) -> AsyncIterator[InProcessAtrium]:
    """An in-process Atrium (the test run's settings: no Redis, so a MemoryBroker) on a ``ManualClock``.

    Its token verifier, WebSocket expiry timers and presence read ``clocked_server.clock``; real time
    passing changes nothing until the test calls ``clock.advance``.
    """
    async with serve_in_process(settings, ManualClock()) as server:
        yield server


@dataclass
class Live:
    """One graphql-transport-ws connection; messages are sorted per operation id as they arrive."""

    ws: ClientConnection
    queues: dict[str, asyncio.Queue[dict[str, Any]]] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None
    ack: dict[str, Any] | None = None
    counter: int = 0

    @classmethod
    async def connect(cls, url: str, token: str | None, **kw: Any) -> Live:
        """Connect and initialise with ``token``; fails unless the server acknowledges."""
        ws = await connect(url, subprotocols=["graphql-transport-ws"], **kw)  # type: ignore[list-item]
        payload = {"authorization": f"Bearer {token}"} if token else {}
        await ws.send(json.dumps({"type": "connection_init", "payload": payload}))
        ack = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
        assert ack["type"] == "connection_ack", ack
        live = cls(ws, ack=ack)
        live.reader = asyncio.create_task(live._read())
        return live

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    self.queues.setdefault(message["id"], asyncio.Queue()).put_nowait(message)
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    async def subscribe(self, query: str, variables: dict[str, Any] | None = None) -> str:
        self.counter += 1
        op = str(self.counter)
        self.queues.setdefault(op, asyncio.Queue())
        await self.ws.send(json.dumps({"id": op, "type": "subscribe",
                                       "payload": {"query": query, "variables": variables or {}}}))
        return op

    async def message(self, op: str) -> dict[str, Any]:
        """The next message of operation ``op`` (next, error or complete), within ``WAIT`` seconds."""
        return await asyncio.wait_for(self.queues[op].get(), WAIT)

    async def data(self, op: str) -> dict[str, Any]:
        """The ``data`` of the next message of ``op``, which must be an error-free ``next``."""
        message = await self.message(op)
        assert message["type"] == "next" and not message["payload"].get("errors"), message
        data: dict[str, Any] = message["payload"]["data"]
        return data

    async def live(self, query: str, variables: dict[str, Any] | None = None) -> str:
        """Subscribe to an event stream and wait for its first ``Resync`` (the stream is live then)."""
        op = await self.subscribe(query, variables)
        first = next(iter((await self.data(op)).values()))
        assert first == {"__typename": "Resync", "reason": "SUBSCRIBED"}, first
        return op

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader


@contextlib.asynccontextmanager
async def live(url: str, token: str, **kw: Any) -> AsyncIterator[Live]:
    session = await Live.connect(url, token, **kw)
    try:
        yield session
    finally:
        await session.close()


async def close_code(url: str, init_payload: dict[str, Any] | None, *, first: dict[str, Any] | None = None) -> int:
    """The close code the server ends a connection with (after ``connection_init``, or ``first``)."""
    async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        message = first if first is not None else {"type": "connection_init", "payload": init_payload or {}}
        await ws.send(json.dumps(message))
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), WAIT)
        assert ws.close_code is not None
        return ws.close_code


def error_codes(message: dict[str, Any]) -> list[str]:
    """Codes of an ``error`` message, or of the errors of a ``next`` message."""
    payload = message["payload"]
    errors = payload if message["type"] == "error" else payload.get("errors") or []
    return [e.get("extensions", {}).get("code") for e in errors]


async def graphql(client: httpx.AsyncClient, token: str, query: str, **variables: Any) -> dict[str, Any]:
    """Run ``query`` over HTTP and return its data (failing the test on errors)."""
    return data_or_fail(await gql(client, query, variables, token=token))
