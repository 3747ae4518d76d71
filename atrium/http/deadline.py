"""A deadline for reading each request, in uvicorn's HTTP protocol: slow clients are cut off; and
connections whose request was refused are not read again before their ``Retry-After``.

Why here and not in the ASGI app: uvicorn calls the app only once a request's headers are complete,
so a client that dribbles its headers a byte at a time (slowloris) is invisible to any middleware,
and holds its socket as long as it likes. uvicorn's ``timeout_keep_alive`` runs only *between*
requests, from the end of a response until the next byte arrives (not even on a fresh connection
before its first byte), and neither httptools nor h11 bounds the time a request takes to arrive.
So the guard sits in the protocol, as a small mixin over uvicorn's two HTTP implementations:

- A deadline starts when a connection is made, and again with the first byte of each next request on
  a kept-alive connection. It ends when the request has been read whole (headers and body), or when
  the connection becomes a WebSocket (graphql-transport-ws then bounds ``connection_init`` itself:
  ``Settings.ws_init_timeout_seconds``).
- Past it the connection is closed: with ``408 Request Timeout`` if part of a request had arrived,
  silently if nothing had. A request whose headers were read by then sees ``http.disconnect``.

A refused request's connection is also held: when the app marks the request (``HOLD_KEY`` in its
scope, seconds: what its 503's ``Retry-After`` said), nothing more is read from that connection for
that long once the response is sent. A client that honours ``Retry-After`` never notices; one that
sends again at once waits out the hint with its request in the socket's buffer, where it costs the
process nothing, instead of making the process refuse it over and over (the refusals of a flood that
ignores the hint would otherwise take the CPU the admitted requests need). The hold is shorter than
the keep-alive timeout, so the connection is not closed meanwhile.

The deadline is ``Settings.request_read_timeout_seconds``: the app's lifespan hands it to uvicorn in
the lifespan state (``STATE_KEY``), which uvicorn gives every protocol it creates; a protocol class
made by ``with_deadline`` carries its own (servers that run no lifespan, such as tests').

Use: ``uvicorn --http atrium.http.deadline:HttpProtocol`` (what ``atrium serve``, the Dockerfile
and the Kubernetes manifests run).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

STATE_KEY = "atrium.request_read_timeout"
HOLD_KEY = "atrium.hold_reading"
DEFAULT_SECONDS = 10.0
_TIMEOUT_TEXT = b"Request not received in time"
TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT))


class ReadDeadline:
    """Mixin over a uvicorn HTTP protocol (``H11Protocol``, ``HttpToolsProtocol``): see module docstring."""

    deadline_seconds: float = DEFAULT_SECONDS
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    app_state: dict[str, Any]
    cycle: Any
    timeout_keep_alive: int

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._deadline: asyncio.TimerHandle | None = None
        self._armed_for: Any = None
        self._received = False
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._deadline is None and self._between_requests():
            self._arm()
        self._received = True
        super().data_received(data)  # type: ignore[misc]
        self._check()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def _ours(self) -> bool:
        """The transport still speaks HTTP through this protocol (not upgraded to a WebSocket)."""
        protocol: object = self.transport.get_protocol()
        return protocol is self

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        cycle = self.cycle
        hold = cycle.scope.get(HOLD_KEY) if cycle is not None else None
        if hold and not self.transport.is_closing() and self._ours():
            self.transport.pause_reading()
            seconds = min(float(hold), 0.8 * float(self.timeout_keep_alive))
            self.loop.call_later(seconds, self._end_hold)

    def _end_hold(self) -> None:
        if not self.transport.is_closing() and self._ours():
            self.transport.resume_reading()

    def _between_requests(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _arm(self) -> None:
        seconds = float(self.app_state.get(STATE_KEY, self.deadline_seconds))
        self._armed_for, self._received = self.cycle, False
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _check(self) -> None:
        """Disarm once the request being read is whole, answered, or the socket is no longer ours."""
        if self._deadline is None:
            return
        if self.transport.is_closing() or not self._ours():
            self._disarm()  # closed, or upgraded to a WebSocket
            return
        cycle = self.cycle
        if cycle is not None and cycle is not self._armed_for and (not cycle.more_body or cycle.response_complete):
            self._disarm()

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing() or not self._ours():
            return
        if self._received and self._between_requests():
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()


class H11WithDeadline(ReadDeadline, H11Protocol):
    """uvicorn's h11 protocol with a read deadline."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
    HttpProtocol: type[asyncio.Protocol] = H11WithDeadline
else:
    class HttpToolsWithDeadline(ReadDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol (its default when httptools is installed) with a read deadline."""

    HttpProtocol = HttpToolsWithDeadline


def with_deadline(base: type[asyncio.Protocol], seconds: float) -> type[asyncio.Protocol]:
    """``base`` (``HttpProtocol``, ``H11WithDeadline``) with its own deadline of ``seconds``, used when
    the lifespan state does not carry one."""
    return type(base.__name__, (base,), {"deadline_seconds": seconds})
