"""Answers cached until a write (``planner.answers``), and the data versions they are keyed by.

- Data versions: every write bumps the versions of the tables it changes, in its own transaction (a
  failed or rolled-back write bumps nothing); a change to a user bumps ``users`` in each tenant of
  theirs; the application role reads its own tenant's versions only and cannot write any.
- The cache over HTTP: what is cached (planned answers, by default of persisted documents, else
  when asked) and what is not (mutations, executor fields, errors); who shares an entry (members of
  one role) and who does not (other roles, tenants, variables); a write makes the next answer fresh,
  in this process and in every other one (two apps sharing Redis); Redis down costs only speed.
- GET: ``ETag`` and ``304 Not Modified``.
- No stale answer after a committed write, under concurrent readers and writers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.ops.admin import add_user
from auth.tokens import issue_token
from core.settings import Settings
from models.db import Databases
from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import create_company, create_pipeline
from tests.partners import running, sha256

MakeTenant = Callable[..., Awaitable[TenantWorld]]

DEALS = "query Deals($n: Int!) { deals(first: $n) { totalCount nodes { id title amount owner { name } } } }"
CREATE_DEAL = "mutation($i: DealInput!) { createDeal(input: $i) { id version } }"
RENAME = "mutation($id: ID!, $t: String!) { updateDeal(id: $id, input: {title: $t}) { id title version } }"
ON = {"Atrium-Cache": "on"}


@pytest.fixture
async def cached(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient]]:
    """An app with plans and the in-process answer cache (whatever ATRIUM_PLANS says for the run)."""
    async with running(dataclasses.replace(settings, plans=True, answer_cache=True), redis=None) as running_app:
        yield running_app


async def post(client: httpx.AsyncClient, token: str, query: str, variables: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None, **extra: Any) -> httpx.Response:
    return await client.post("/graphql", json={"query": query, "variables": variables or {}, **extra},
                             headers={"authorization": f"Bearer {token}", **(headers or {})})


async def seeded(client: httpx.AsyncClient, tenant: TenantWorld, deals: int = 3) -> list[str]:
    token = tenant.token(Role.OWNER)
    pipeline = await create_pipeline(client, token, name="Cache", stages=("Lead", "Won"))
    ids = []
    for i in range(deals):
        made = data_or_fail(await gql(client, CREATE_DEAL, {"i": {
            "title": f"Deal {i}", "amount": f"{i}00.00", "currency": "EUR",
            "stageId": pipeline["stages"][0]["id"]}}, token=token))["createDeal"]
        ids.append(made["id"])
    return ids


async def versions(engine: AsyncEngine, tenant_id: uuid.UUID) -> dict[str, int]:
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT table_name, version FROM data_versions WHERE tenant_id = :t"),
                                  {"t": tenant_id})
        return {r.table_name: r.version for r in rows}


# ---- data versions --------------------------------------------------------------------------------

async def test_a_write_bumps_the_versions_of_the_tables_it_changes(
        client: httpx.AsyncClient, admin_engine: AsyncEngine, make_tenant: MakeTenant) -> None:
    tenant = await make_tenant("versions")
    token = tenant.token(Role.OWNER)
    [deal] = await seeded(client, tenant, 1)
    before = await versions(admin_engine, tenant.id)
    data_or_fail(await gql(client, RENAME, {"id": deal, "t": "Renamed"}, token=token))
    after = await versions(admin_engine, tenant.id)
    assert after["deals"] == before["deals"] + 1 and after["audit_events"] == before["audit_events"] + 1
    assert {t for t in after if after[t] != before.get(t)} == {"deals", "audit_events"}

    # A write that fails (stale version) rolls back whole: its versions too.
    stale = await gql(client, "mutation($id: ID!) { updateDeal(id: $id, input: {title: \"x\"}, expectedVersion: 1) "
                              "{ id } }", {"id": deal}, token=token)
    assert codes(stale) == ["VERSION_CONFLICT"]
    assert await versions(admin_engine, tenant.id) == after


async def test_a_change_to_a_user_bumps_users_in_each_of_their_tenants(
        admin_engine: AsyncEngine, make_tenant: MakeTenant) -> None:
    a, b, other = await make_tenant("ua"), await make_tenant("ub"), await make_tenant("uo")
    user = a.users[Role.MEMBER]
    async with admin_engine.begin() as conn:
        await conn.execute(text("INSERT INTO memberships (tenant_id, id, user_id, role) "
                                "VALUES (:t, gen_random_uuid(), :u, 'viewer')"), {"t": b.id, "u": user})
    before = {t.id: (await versions(admin_engine, t.id)).get("users", 0) for t in (a, b, other)}
    async with admin_engine.begin() as conn:
        await conn.execute(text("UPDATE users SET name = 'Renamed' WHERE id = :u"), {"u": user})
    after = {t.id: (await versions(admin_engine, t.id)).get("users", 0) for t in (a, b, other)}
    assert after == {a.id: before[a.id] + 1, b.id: before[b.id] + 1, other.id: before[other.id]}


async def test_the_app_role_reads_its_own_tenants_versions_only_and_writes_none(
        client: httpx.AsyncClient, settings: Settings, make_tenant: MakeTenant) -> None:
    a, b = await make_tenant("va"), await make_tenant("vb")
    await seeded(client, a, 1)
    await seeded(client, b, 1)
    databases = Databases(settings.app_url)
    try:
        async with databases.tenant_transaction(a.id) as conn:
            seen = {r.tenant_id for r in await conn.execute(text("SELECT tenant_id FROM data_versions"))}
        assert seen == {a.id}
        for statement in ("UPDATE data_versions SET version = 0",
                          "INSERT INTO data_versions VALUES (:t, 'deals', 0)",
                          "DELETE FROM data_versions"):
            with pytest.raises(DBAPIError, match="permission denied"):
                async with databases.tenant_transaction(a.id) as conn:
                    await conn.execute(text(statement), {"t": a.id})
    finally:
        await databases.dispose()


# ---- the cache over HTTP --------------------------------------------------------------------------

async def test_an_answer_is_cached_when_asked_and_served_until_a_write(
        cached: tuple[Starlette, httpx.AsyncClient], make_tenant: MakeTenant) -> None:
    _, client = cached
    tenant = await make_tenant("hit")
    ids = await seeded(client, tenant)
    token = tenant.token(Role.VIEWER)

    plain = await post(client, token, DEALS, {"n": 5})
    assert "atrium-cache" not in plain.headers  # not asked, not persisted
    first = await post(client, token, DEALS, {"n": 5}, ON)
    second = await post(client, token, DEALS, {"n": 5}, ON)
    assert (first.headers["atrium-cache"], second.headers["atrium-cache"]) == ("miss", "hit")
    assert second.json() == first.json() == plain.json()

    # A write to a table the plan does not read leaves the answer cached ...
    await create_company(client, tenant.token(Role.OWNER), name="Unrelated")
    assert (await post(client, token, DEALS, {"n": 5}, ON)).headers["atrium-cache"] == "hit"
    # ... a write to one it reads makes the next answer fresh.
    data_or_fail(await gql(client, RENAME, {"id": ids[0], "t": "Fresh"}, token=tenant.token(Role.OWNER)))
    fresh = await post(client, token, DEALS, {"n": 5}, ON)
    assert fresh.headers["atrium-cache"] == "miss"
    assert "Fresh" in [d["title"] for d in fresh.json()["data"]["deals"]["nodes"]]
    assert (await post(client, token, DEALS, {"n": 5}, ON)).headers["atrium-cache"] == "hit"


async def test_who_shares_an_answer(cached: tuple[Starlette, httpx.AsyncClient], make_tenant: MakeTenant,
                                    admin_engine: AsyncEngine, settings: Settings) -> None:
    """Members of one role share it; another role, another tenant or other variables do not."""
    _, client = cached
    a, b = await make_tenant("sa"), await make_tenant("sb")
    await seeded(client, a)
    await seeded(client, b, 2)
    second = await add_user(admin_engine, a.id, f"second@{a.slug}.example", "Second member", Role.MEMBER)
    other_member = issue_token(settings, user_id=second, tenant_id=a.id, role=Role.MEMBER)
    assert (await post(client, a.token(Role.MEMBER), DEALS, {"n": 5}, ON)).headers["atrium-cache"] == "miss"
    assert (await post(client, other_member, DEALS, {"n": 5}, ON)).headers["atrium-cache"] == "hit"
    assert (await post(client, a.token(Role.VIEWER), DEALS, {"n": 5}, ON)).headers["atrium-cache"] == "miss"
    assert (await post(client, a.token(Role.VIEWER), DEALS, {"n": 4}, ON)).headers["atrium-cache"] == "miss"
    theirs = await post(client, b.token(Role.MEMBER), DEALS, {"n": 5}, ON)
    assert theirs.headers["atrium-cache"] == "miss" and theirs.json()["data"]["deals"]["totalCount"] == 2
    # A member joining changes whom owner { name } can show (users are visible through memberships).
    await add_user(admin_engine, a.id, f"third@{a.slug}.example", "Third member", Role.MEMBER)
    assert (await post(client, other_member, DEALS, {"n": 5}, ON)).headers["atrium-cache"] == "miss"


async def test_what_is_never_cached(cached: tuple[Starlette, httpx.AsyncClient], make_tenant: MakeTenant) -> None:
    _, client = cached
    tenant = await make_tenant("never")
    [deal] = await seeded(client, tenant, 1)
    token = tenant.token(Role.OWNER)
    for query, variables in (
        (RENAME, {"id": deal, "t": "Mutated"}),  # a mutation
        ("{ me { name } deals(first: 1) { totalCount } }", {}),  # a field the executor answers
        ("{ deals(first: 500) { totalCount } }", {}),  # an error (a bad argument)
    ):
        for _ in range(2):
            response = await post(client, token, query, variables, ON)
            assert response.headers["atrium-cache"] == "uncacheable", (query, response.headers)
    errors = (await post(client, token, "{ deals(first: 500) { totalCount } }", {}, ON)).json()["errors"]
    assert [e["extensions"]["code"] for e in errors] == ["BAD_USER_INPUT"]
    # Asking for no cache; asking wrongly.
    assert "atrium-cache" not in (await post(client, token, DEALS, {"n": 1}, {"Atrium-Cache": "off"})).headers
    wrong = await post(client, token, DEALS, {"n": 1}, {"Atrium-Cache": "please"})
    assert wrong.status_code == 400 and codes(wrong.json()) == ["BAD_REQUEST"]


async def test_persisted_documents_are_cached_by_default(
        cached: tuple[Starlette, httpx.AsyncClient], make_tenant: MakeTenant) -> None:
    _, client = cached
    tenant = await make_tenant("apq")
    await seeded(client, tenant)
    token = tenant.token(Role.VIEWER)
    extensions = {"persistedQuery": {"version": 1, "sha256Hash": sha256(DEALS)}}
    registered = await post(client, token, DEALS, {"n": 3}, extensions=extensions)
    assert registered.headers["atrium-cache"] == "miss"
    headers = {"authorization": f"Bearer {token}"}
    hash_only = await client.post("/graphql", json={"variables": {"n": 3}, "extensions": extensions}, headers=headers)
    assert hash_only.headers["atrium-cache"] == "hit" and hash_only.json() == registered.json()
    off = await client.post("/graphql", json={"variables": {"n": 3}, "extensions": extensions},
                            headers={**headers, "Atrium-Cache": "off"})
    assert "atrium-cache" not in off.headers and off.json() == registered.json()


async def test_get_answers_carry_an_etag_and_revalidate_with_304(
        cached: tuple[Starlette, httpx.AsyncClient], make_tenant: MakeTenant) -> None:
    _, client = cached
    tenant = await make_tenant("etag")
    [deal] = await seeded(client, tenant, 1)
    headers = {"authorization": f"Bearer {tenant.token(Role.VIEWER)}"}
    url = "/graphql?" + urllib.parse.urlencode({"query": DEALS, "variables": json.dumps({"n": 2})})
    first = await client.get(url, headers=headers)
    etag = first.headers["etag"]
    assert first.status_code == 200 and first.headers["cache-control"] == "private, no-cache"
    again = await client.get(url, headers={**headers, "If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    data_or_fail(await gql(client, RENAME, {"id": deal, "t": "Changed"}, token=tenant.token(Role.OWNER)))
    changed = await client.get(url, headers={**headers, "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert changed.json()["data"]["deals"]["nodes"][0]["title"] == "Changed"
    failed = await client.get("/graphql?" + urllib.parse.urlencode({"query": "{ deals(first: 500) { totalCount } }"}),
                              headers=headers)
    assert "etag" not in failed.headers


async def test_cached_answers_are_shared_through_redis_and_fresh_in_every_process(
        settings: Settings, redis_url: str, make_tenant: MakeTenant) -> None:
    """Two apps (two processes' worth) on one Redis: one stores, the other hits; a write through
    either makes both answer fresh."""
    shared = dataclasses.replace(settings, plans=True, answer_cache=True)
    async with running(shared, redis=redis_url) as (first, one), running(
            shared, redis=redis_url, prefix=first.state.runtime.settings.redis_prefix) as (_, two):
        tenant = await make_tenant("redis")
        [deal] = await seeded(one, tenant, 1)
        token = tenant.token(Role.VIEWER)
        assert (await post(one, token, DEALS, {"n": 1}, ON)).headers["atrium-cache"] == "miss"
        assert (await post(two, token, DEALS, {"n": 1}, ON)).headers["atrium-cache"] == "hit"
        data_or_fail(await gql(two, RENAME, {"id": deal, "t": "Through two"}, token=tenant.token(Role.OWNER)))
        fresh = await post(one, token, DEALS, {"n": 1}, ON)
        assert fresh.headers["atrium-cache"] == "miss"
        assert fresh.json()["data"]["deals"]["nodes"][0]["title"] == "Through two"


async def test_an_unreachable_redis_costs_only_the_cache(settings: Settings, make_tenant: MakeTenant) -> None:
    down = dataclasses.replace(settings, plans=True, answer_cache=True, answer_cache_entries=0,
                               redis_url="redis://127.0.0.1:1/0")
    async with running(down, redis=None) as (app, client):
        tenant = await make_tenant("down")
        await seeded(client, tenant, 2)
        for _ in range(2):
            response = await post(client, tenant.token(Role.VIEWER), DEALS, {"n": 2}, ON)
            assert response.status_code == 200 and response.headers["atrium-cache"] == "miss"
            assert response.json()["data"]["deals"]["totalCount"] == 2
        metrics = (await client.get("/metrics")).text
        assert 'atrium_answer_cache_total{outcome="failure"} 4.0' in metrics, metrics
        assert app.state.runtime.answers.failures == 4


async def test_no_answer_older_than_a_committed_write_is_served(
        cached: tuple[Starlette, httpx.AsyncClient], make_tenant: MakeTenant) -> None:
    """A writer renames a deal n times; readers run all along. A read that starts after rename i
    returned (committed) sees i or later, never earlier."""
    _, client = cached
    tenant = await make_tenant("race")
    [deal] = await seeded(client, tenant, 1)
    owner, viewer = tenant.token(Role.OWNER), tenant.token(Role.VIEWER)
    query = "query($id: ID!) { deal(id: $id) { title } }"
    committed = -1
    stale: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def write() -> None:
        nonlocal committed
        for i in range(30):
            data_or_fail(await gql(client, RENAME, {"id": deal, "t": f"v{i}"}, token=owner))
            committed = i
        done.set()

    async def read() -> None:
        while not done.is_set():
            floor = committed
            body = (await post(client, viewer, query, {"id": deal}, ON)).json()
            seen = body["data"]["deal"]["title"]
            seen_version = int(seen[1:]) if seen.startswith("v") else -1
            if seen_version < floor:
                stale.append((floor, seen_version))

    await asyncio.gather(write(), *(read() for _ in range(4)))
    assert not stale, stale
    assert (await post(client, viewer, query, {"id": deal}, ON)).json()["data"]["deal"]["title"] == "v29"

