"""A local OTLP/HTTP receiver: what a collector would be told, decoded with opentelemetry-proto.

``OtlpReceiver`` listens on a free 127.0.0.1 port (in a thread: ``http.server``), answers every
``POST /v1/traces`` with 200 and an empty ``ExportTraceServiceResponse``, and keeps each decoded
span with its resource's attributes. ``wait_for`` awaits a condition on the spans received so far,
woken by each export.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.live import WAIT


def value_of(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind is not None else None


@dataclass(frozen=True)
class Received:
    """One span as a collector received it."""

    span: Span
    resource: dict[str, Any]

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def attributes(self) -> dict[str, Any]:
        return {a.key: value_of(a.value) for a in self.span.attributes}


@dataclass
class OtlpReceiver:
    port: int = 0
    spans: list[Received] = field(default_factory=list)
    requests: int = 0
    content_types: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _received(self, body: bytes, content_type: str, encoding: str) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(gzip.decompress(body) if encoding == "gzip" else body)
        with self._lock:
            self.requests += 1
            self.content_types.add(content_type)
            for resource_spans in request.resource_spans:
                resource = {a.key: value_of(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(Received(span, resource) for span in scope_spans.spans)
            waiters = list(self._waiters)
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)

    async def wait_for(self, condition: Callable[[list[Received]], bool]) -> list[Received]:
        """The spans received so far once ``condition`` holds for them; fails after ``WAIT`` seconds."""
        event = asyncio.Event()
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.append(entry)
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    with self._lock:
                        spans = list(self.spans)
                    if condition(spans):
                        return spans
                    await event.wait()
                    event.clear()
        finally:
            with self._lock:
                self._waiters.remove(entry)


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A receiver serving in a thread until the block ends."""
    receiver = OtlpReceiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            if self.path != "/v1/traces":
                self.send_response(404)
                self.end_headers()
                return
            receiver._received(body, self.headers.get("content-type", ""), self.headers.get("content-encoding", ""))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
