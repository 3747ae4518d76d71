"""Kit of the outage and fault tests: a migrated Atrium database on a throwaway cluster, and what an
outage answer must look like.

- ``outage_world(cluster)``: a database ``atrium`` on the cluster, migrated, with a tenant, its owner
  (token, password ``pw-faults``) and an API key (``World``).
- ``assert_unavailable(response, request_id)``: the answer every request gets while a service it
  needs is down: HTTP 503, a JSON GraphQL body whose errors are all SERVICE_UNAVAILABLE,
  ``Retry-After``, the request's ``X-Request-ID``, and nothing of the driver's words.
"""

from __future__ import annotations

import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from atrium.ops.admin import add_user, create_tenant
from auth.tokens import issue_token
from core.settings import Settings
from models.db import create_engine
from models.migrations import migrate
from models.tables import Role
from partners.keys import KeySpec, create_key
from tests.cluster import PostgresCluster
from tests.conftest import TEST_SECRET

LEAKS = ("traceback", "asyncpg", "sqlalchemy", "select ", "connection refused", "127.0.0.1", "postgres",
         "terminating connection", "redis")
"""Words of drivers, servers and SQL that no answer may carry."""


@dataclass(frozen=True)
class World:
    cluster: PostgresCluster
    admin_url: str
    tenant_id: uuid.UUID
    owner_id: uuid.UUID
    token: str
    api_key: str

    def settings(self, **changes: Any) -> Settings:
        """Production settings (JSON answers as deployed) on this world's database; rate limits off."""
        values: dict[str, Any] = {"env": "production", "database_url": self.admin_url, "jwt_secret": TEST_SECRET,
                                  "data_dir": Path(tempfile.gettempdir()), "rate_limits": False, "pool_size": 4}
        return Settings(**{**values, **changes})


async def outage_world(cluster: PostgresCluster) -> World:
    """A migrated database on ``cluster`` with one tenant, its owner and an API key."""
    conn = await asyncpg.connect(cluster.url())
    try:
        await conn.execute("CREATE DATABASE atrium")
    finally:
        await conn.close()
    admin_url = cluster.url(database="atrium")
    await migrate(admin_url)
    admin = create_engine(admin_url)
    try:
        tenant_id = await create_tenant(admin, "faults", "Faults Inc")
        owner_id = await add_user(admin, tenant_id, "owner@faults.example", "Owner", Role.OWNER, password="pw-faults")
        async with admin.begin() as tx:
            _, api_key = await create_key(tx, tenant_id, owner_id, KeySpec(name="faults", role=Role.MEMBER))
    finally:
        await admin.dispose()
    token = issue_token(Settings(env="test", database_url=admin_url, jwt_secret=TEST_SECRET,
                                 data_dir=Path(tempfile.gettempdir())),
                        user_id=owner_id, tenant_id=tenant_id, role=Role.OWNER)
    return World(cluster, admin_url, tenant_id, owner_id, token, api_key)


def assert_unavailable(response: httpx.Response, request_id: str) -> dict[str, Any]:
    """``response`` is an outage answer (module docstring); its body."""
    assert response.status_code == 503, (response.status_code, response.text)
    assert response.headers["content-type"].split(";")[0] in ("application/json", "application/graphql-response+json")
    assert response.headers.get("retry-after") == "1", response.headers
    assert response.headers.get("x-request-id") == request_id, response.headers
    body: dict[str, Any] = response.json()
    codes = [e.get("extensions", {}).get("code") for e in body.get("errors") or []]
    assert codes and set(codes) == {"SERVICE_UNAVAILABLE"}, body
    assert all(e["extensions"].get("retryAfter") == 1 for e in body["errors"]), body
    text = response.text.lower()
    assert not [leak for leak in LEAKS if leak in text], response.text
    return body
