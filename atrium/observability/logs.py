"""Logs: one JSON object per line in production, with the request id and trace id of the request.

Every line, uvicorn's own included (``uvicorn.error``, ``uvicorn.access``), goes through the root
logger's one handler (``configure_logging``; ``uvicorn_log_config`` gives uvicorn the same setup
before it imports the app). A line has ``time``, ``level``, ``logger`` and ``message``, then, when
it was logged during a request (or a WebSocket connection): ``request_id`` (the caller's sane
``X-Request-ID``, else a fresh one; echoed in the response), ``tenant_id`` once the credential was
verified, and ``trace_id``/``span_id`` while a span is recorded; ``exception`` with the traceback
when there is one. In development lines are plain text, for people.

``RequestLogging`` (ASGI middleware) gives each request its ``RequestRecord`` and writes the access
log: one line per HTTP request on logger ``atrium.access`` with ``method``, ``path`` (never the
query string: GET requests carry variables there), ``status``, ``duration_ms``, ``operation`` (the
GraphQL operation's name, when it has one) and ``tenant_id``; ``Settings.access_log`` turns it off.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
import uuid
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.settings import Settings
from core.telemetry import RequestRecord, begin_request, current_request, end_request

REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
ACCESS = logging.getLogger("atrium.access")
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
EXTRA_FIELDS = ("method", "path", "status", "duration_ms", "operation")
"""Fields of the access log line, passed as ``extra``."""


def request_id_for(headers: Mapping[str, str]) -> str:
    """The caller's ``X-Request-ID`` when it is a sane token (64 letters, digits, ``._-`` at most),
    else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if REQUEST_ID.match(given) else uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = current_request()
        for key in ("request_id", "tenant_id"):
            value = getattr(record, key, None)
            if value is None and request is not None:
                value = getattr(request, key)
            if value is not None:
                entry[key] = str(value)
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        for key in EXTRA_FIELDS:
            if (value := getattr(record, key, None)) is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """Development lines: ``time level logger message`` and the request id when there is one."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request = current_request()
        return line if request is None else f"{line} [request {request.request_id}]"


def formatter_for(settings: Settings) -> logging.Formatter:
    return JsonFormatter() if settings.env == "production" else TextFormatter()


def configure_logging(settings: Settings) -> None:
    """Every log line to stderr through one handler on the root logger, uvicorn's loggers included
    (their own handlers removed, so nothing is written twice or in another format)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter_for(settings))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    for name in UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def uvicorn_log_config(settings: Settings) -> dict[str, Any]:
    """``uvicorn.run(log_config=...)``: the setup of ``configure_logging`` as uvicorn applies it at
    start, so its lines are formatted alike before the app is even loaded (a supervisor process
    of several workers never loads it)."""
    kind = "atrium.observability.logs.JsonFormatter" if settings.env == "production" else \
        "atrium.observability.logs.TextFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"atrium": {"()": kind}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "atrium", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {name: {"handlers": [], "propagate": True} for name in UVICORN_LOGGERS},
    }


class RequestLogging:
    """ASGI middleware: each HTTP request and WebSocket connection gets its ``RequestRecord`` (what
    every line logged while serving it carries); each HTTP request gets an access log line when
    ``access_log`` is on (module docstring)."""

    def __init__(self, app: ASGIApp, access_log: bool) -> None:
        self.app = app
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        record = RequestRecord(request_id_for(Headers(scope=scope)))
        token = begin_request(record)
        try:
            if scope["type"] != "http" or not self.access_log:
                await self.app(scope, receive, send)
                return
            status, started = 500, time.perf_counter()

            async def send_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await self.app(scope, receive, send_status)
            finally:
                duration = round((time.perf_counter() - started) * 1000, 3)
                ACCESS.info("%s %s %d %.1f ms", scope["method"], scope["path"], status, duration,
                            extra={"method": scope["method"], "path": scope["path"], "status": status,
                                   "duration_ms": duration, "operation": record.operation})
        finally:
            end_request(token)
