"""Helpers for the partner-API tests: apps of their own (metered, with or without Redis), keys, requests.

Redis is the real server of the test run: a test that needs it asks for conftest's ``redis_url``
fixture (skipped, saying so, when it cannot be reached) and passes it on. Every app made here writes
its Redis keys under a prefix unique to this test run and to the app, and deletes them when the app stops.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from redis.asyncio import Redis
from starlette.applications import Starlette

from atrium.app import create_app
from core.settings import PlanLimits, Settings
from models.tables import Role
from tests.conftest import TenantWorld, data_or_fail, gql

RUN_PREFIX = f"atrium-test-{uuid.uuid4().hex[:10]}:"
"""Prefix of every Redis key this test run writes."""

CREATE_KEY = """mutation($input: CreateApiKeyInput!) {
  createApiKey(input: $input) { secret apiKey { id prefix role persistedOnly client } } }"""
PUSH = """mutation($client: String!, $manifest: JSON!) {
  pushPersistedDocuments(client: $client, manifest: $manifest) {
    client unchangedCount added { id documentId sha256 name operationType } } }"""
REMOVE = """mutation($client: String!, $ids: [String!]!) {
  removePersistedDocuments(client: $client, ids: $ids) { removedIds missingIds } }"""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def drop_keys(redis_url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` in the Redis at ``redis_url``."""
    client = Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def plans(capacity: int, refill: float, key_capacity: int | None = None,
          key_refill: float | None = None) -> tuple[PlanLimits, ...]:
    """The same limits for every plan (and for anonymous callers)."""
    return tuple(PlanLimits(name, capacity, refill, key_capacity or capacity, key_refill or refill)
                 for name in ("free", "pro", "enterprise", "anonymous"))


@asynccontextmanager
async def running(settings: Settings, *, redis: str | None, prefix: str | None = None,
                  **changes: Any) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """An app of its own (lifespan run) and a client for it.

    ``redis``: the Redis of the run (the ``redis_url`` fixture) for an app using it, its keys cleaned up
    afterwards; None for an app without (``changes`` may still name a ``redis_url``, say an unreachable one).
    ``prefix``: its Redis keys' prefix (by default one of its own; another app's to share its keys).
    """
    prefix = prefix or f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:"
    if redis is not None:
        changes["redis_url"] = redis
    app = create_app(dataclasses.replace(settings, redis_prefix=prefix, **changes))
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as c:
                yield app, c
    finally:
        if redis is not None:
            await drop_keys(redis, prefix)


async def new_key(http: httpx.AsyncClient, world: TenantWorld, *, creator: Role = Role.OWNER,
                  **fields: Any) -> dict[str, Any]:
    """Create a key through the API as ``creator`` (``fields``: CreateApiKeyInput's); returns ``{secret, apiKey}``."""
    values = {"name": "Partner", "role": "VIEWER", **fields}
    created: dict[str, Any] = data_or_fail(await gql(http, CREATE_KEY, {"input": values},
                                                     token=world.token(creator)))["createApiKey"]
    return created


async def push(client: httpx.AsyncClient, world: TenantWorld, client_name: str, manifest: Any,
               *, token: str | None = None) -> dict[str, Any]:
    body = await gql(client, PUSH, {"client": client_name, "manifest": manifest},
                     token=token or world.token(Role.ADMIN))
    return body


async def post(client: httpx.AsyncClient, body: Any, *, headers: dict[str, str] | None = None) -> httpx.Response:
    return await client.post("/graphql", json=body, headers=headers or {})


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}
