"""A webhook receiver for tests: a real HTTP server on 127.0.0.1 (uvicorn, in the test's event loop).

It records every request it gets (headers, body, when), answers with the status its ``answer``
function gives (200 by default), can hold requests unanswered until released (``hold``), and can be
stopped and started again on the same port (a receiver that is down for a while). Tests wait on
``until(predicate)``, which returns as soon as the recorded requests satisfy it.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

WAIT = 30.0


@dataclass(frozen=True)
class Received:
    headers: dict[str, str]
    body: str
    status: int | None = None
    """What it was answered (None while held, or when the answer was never sent)."""

    @property
    def id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.body)
        return data


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@dataclass
class Receiver:
    port: int = 0
    answer: Callable[[Received], int] = lambda request: 200
    received: list[Received] = field(default_factory=list)
    held: list[Received] = field(default_factory=list)
    """Requests waiting for ``release`` (while ``hold`` is set)."""
    hold: bool = False
    _gate: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _server: _Server | None = None
    _task: asyncio.Task[None] | None = None
    _socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        request = Received(headers, b"".join(chunks).decode())
        if self.hold:
            async with self._changed:
                self.held.append(request)
                self._changed.notify_all()
            await self._gate.wait()
        status = self.answer(request)
        async with self._changed:
            if request in self.held:
                self.held.remove(request)
            self.received.append(Received(headers, request.body, status))
            self._changed.notify_all()
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def release(self) -> None:
        self.hold = False
        self._gate.set()

    async def until(self, predicate: Callable[[Receiver], bool], timeout: float = WAIT) -> None:  # noqa: ASYNC109
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    def ids(self, status: int = 200) -> list[str]:
        """The webhook-ids answered with ``status``, in arrival order."""
        return [r.id for r in self.received if r.status == status]

    async def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._socket = listener
        self._server = _Server(uvicorn.Config(self, lifespan="off", log_level="warning", log_config=None,
                                              timeout_graceful_shutdown=1))
        self._task = asyncio.create_task(self._server.serve(sockets=[listener]))
        async with asyncio.timeout(WAIT):
            await self._server.ready.wait()

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self.release()
            self._server.should_exit = True
            await self._task
        if self._socket is not None:
            self._socket.close()
        self._server = self._task = self._socket = None

    def reserve(self) -> None:
        """Choose the port now without listening yet (a receiver that is down from the start)."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
