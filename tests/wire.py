"""Statements on the wire: a PostgreSQL protocol proxy that records what a client asks the server to run.

The app under test connects through ``WireCounter`` (its ``url``) instead of straight to PostgreSQL;
every simple query (``Q``: ``BEGIN``, ``COMMIT``, …) and every executed prepared statement (``E``,
named by the SQL its ``Parse`` carried) is recorded, whichever layer sent it — SQLAlchemy or the
asyncpg driver directly. Only the client's side of the conversation is parsed; bytes pass through
unchanged both ways. SSL is refused by PostgreSQL's own answer (the test server has none), so the
stream stays readable.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.engine import make_url

SSL_REQUEST, GSS_REQUEST = 80877103, 80877104


@dataclass
class WireCounter:
    """Listens on 127.0.0.1 and forwards to ``upstream`` (host, port); ``statements`` in order."""

    upstream: tuple[str, int]
    statements: list[str] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _pipes: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def url(self, url: str) -> str:
        """``url`` pointed at the proxy."""
        return make_url(url).set(host="127.0.0.1", port=self.port).render_as_string(hide_password=False)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._pipes):
            task.cancel()
        for task in list(self._pipes):
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[str]]:
        """The statements sent while the block runs."""
        start = len(self.statements)
        seen: list[str] = []
        try:
            yield seen
        finally:
            seen.extend(self.statements[start:])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        tasks = {asyncio.create_task(self._client_to_server(reader, up_writer)),
                 asyncio.create_task(_copy(up_reader, writer))}
        self._pipes |= tasks
        for task in tasks:
            task.add_done_callback(self._pipes.discard)

    async def _client_to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        prepared: dict[bytes, str] = {}
        portals: dict[bytes, str] = {}
        try:
            while True:  # untyped startup messages (SSL/GSS requests first, then the startup packet)
                length = struct.unpack("!i", await reader.readexactly(4))[0]
                body = await reader.readexactly(length - 4)
                writer.write(struct.pack("!i", length) + body)
                if struct.unpack("!i", body[:4])[0] not in (SSL_REQUEST, GSS_REQUEST):
                    break
            while True:
                kind = await reader.readexactly(1)
                length = struct.unpack("!i", await reader.readexactly(4))[0]
                body = await reader.readexactly(length - 4)
                writer.write(kind + struct.pack("!i", length) + body)
                await writer.drain()
                if kind == b"Q":
                    self.statements.append(body.rstrip(b"\0").decode())
                elif kind == b"P":
                    name, rest = body.split(b"\0", 1)
                    prepared[name] = rest.split(b"\0", 1)[0].decode()
                elif kind == b"B":
                    portal, statement, _ = body.split(b"\0", 2)
                    portals[portal] = prepared.get(statement, "?")
                elif kind == b"E":
                    self.statements.append(portals.get(body.split(b"\0", 1)[0], "?"))
                elif kind == b"X":
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


QUIET: dict[str, Any] = {"export_lease_seconds": 3 * 3600, "retention_interval_seconds": 0,
                         "import_resume_interval_seconds": 0}
"""Settings under which a process's periodic jobs stay off the wire while a test counts: the
retention schedule is off, the look for CSV imports to resume runs once at start, and the look for
abandoned exports at start and then not again for an hour (``settled`` waits for both)."""


async def settled(application: Any) -> None:
    """Wait until the looks a started app (under ``QUIET``) makes at start are over."""
    runtime = application.state.runtime
    await asyncio.wait_for(runtime.leases.rounds.get(), 30)
    await asyncio.wait_for(runtime.tasks.idle(), 30)


@contextlib.asynccontextmanager
async def wired_app(settings: Any, **changes: Any) -> AsyncIterator[Any]:
    """A started app (``create_app``) whose connections go through a ``WireCounter``
    (``app.state.wire``), with ``changes`` to its settings; its periodic jobs are ``QUIET`` (and
    ``settled``), so what the wire records is what the test's requests sent."""
    from atrium.app import create_app  # the app is what is measured; imported only when asked for

    url = make_url(settings.app_url)
    wire = WireCounter((url.host or "127.0.0.1", url.port or 5432))
    await wire.start()
    application = create_app(replace(settings, app_database_url=wire.url(settings.app_url), **(QUIET | changes)))
    application.state.wire = wire
    try:
        async with application.router.lifespan_context(application):
            await settled(application)
            yield application
    finally:
        await wire.close()
