"""Logs: JSON lines in production, uvicorn's own included, each with the request id and trace id of its
request; one access log line per request (method, path without the query string, status, duration,
operation, tenant) unless ``ATRIUM_ACCESS_LOG=off``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx

from atrium.app import create_app
from atrium.observability.logs import JsonFormatter
from core.settings import Settings
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.live import start_atrium
from tests.otlp import otlp_receiver

DASHBOARD = "query Dashboard($first: Int!) { deals(first: $first) { totalCount edges { node { id title } } } }"
SEARCH = "query Search($q: String) { deals(first: 5, filter: {search: $q}) { totalCount } }"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` decoded; fails on a line that is not a JSON object."""
    entries = []
    for line in filter(None, (raw.strip() for raw in text.splitlines())):
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        assert {"time", "level", "logger", "message"} <= entry.keys(), line
        entries.append(entry)
    return entries


async def test_production_logs_are_json_uvicorns_included(database_url: str, make_tenant: Any) -> None:
    """A real uvicorn (its access log on, as ``uvicorn --factory`` has it) with production settings:
    every line on its stderr is JSON, and those of a request carry its request id and trace id."""
    tenant: TenantWorld = await make_tenant()
    request_id = f"logs-{secrets.token_hex(6)}"
    trace_id = secrets.token_hex(16)
    secret = f"needle{secrets.token_hex(6)}"
    with otlp_receiver() as receiver:
        server = await start_atrium(database_url, None, {
            "ATRIUM_ENV": "production", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}, log_level="info")
        try:
            async with server.client() as client:
                headers = {"authorization": f"Bearer {tenant.token()}", "x-request-id": request_id,
                           "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"}
                response = await client.post("/graphql", json={"query": DASHBOARD, "variables": {"first": 2}},
                                             headers=headers)
                assert response.status_code == 200 and response.headers["x-request-id"] == request_id
                query = urllib.parse.urlencode({"query": SEARCH, "variables": json.dumps({"q": secret})})
                assert (await client.get(f"/graphql?{query}", headers={
                    "authorization": f"Bearer {tenant.token()}"})).status_code == 200
        finally:
            server.stop()
    entries = json_lines(server.log.read_text())

    started = [e for e in entries if e["logger"] == "uvicorn.error"]
    assert any(e["message"].startswith("Started server process") for e in started), started
    assert any(e["message"] == "Application startup complete." for e in started), started

    ours = [e for e in entries if e.get("request_id") == request_id]
    by_logger = {e["logger"]: e for e in ours}
    assert {"uvicorn.access", "atrium.access"} <= by_logger.keys(), ours
    assert all(e["trace_id"] == trace_id and len(e["span_id"]) == 16 for e in ours), ours
    assert by_logger["uvicorn.access"]["tenant_id"] == str(tenant.id)
    access = by_logger["atrium.access"]
    assert (access["method"], access["path"], access["status"], access["operation"], access["tenant_id"]) == \
        ("POST", "/graphql", 200, "Dashboard", str(tenant.id))
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] > 0

    search = next(e for e in entries if e["logger"] == "atrium.access" and e.get("operation") == "Search")
    assert search["method"] == "GET" and search["path"] == "/graphql"
    # The variables of a GET are in its query string: Atrium's lines never show them (uvicorn's own
    # access line does, which is why `atrium serve` and the image turn that one off).
    assert not [e for e in entries if e["logger"].startswith("atrium") and secret in json.dumps(e)]


@contextmanager
def access_lines() -> Iterator[io.StringIO]:
    """The access log as production writes it (JSON), captured while the block runs."""
    logger = logging.getLogger("atrium.access")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        yield client


async def test_the_access_log_can_be_turned_off(settings: Settings, make_tenant: Any) -> None:
    tenant: TenantWorld = await make_tenant()
    for enabled in (True, False):
        request_id = f"access-{secrets.token_hex(6)}"
        with access_lines() as stream:
            async with app_client(dataclasses.replace(settings, access_log=enabled)) as client:
                data_or_fail(await gql(client, DASHBOARD, {"first": 1}, token=tenant.token(),
                                       headers={"x-request-id": request_id}))
                assert (await client.get("/healthz")).status_code == 200
        entries = json_lines(stream.getvalue())
        if not enabled:
            assert entries == []
            continue
        graphql, health = entries
        assert graphql["request_id"] == request_id and graphql["operation"] == "Dashboard"
        assert graphql["tenant_id"] == str(tenant.id) and graphql["status"] == 200
        assert "trace_id" not in graphql  # tracing is off: no trace to name
        assert (health["path"], health["status"], health.get("operation")) == ("/healthz", 200, None)
