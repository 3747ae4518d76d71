"""Automatic Persisted Queries, exactly as Apollo Client speaks them (request bodies from WIRE.md).

Run against both stores: Redis (an app of its own on the run's Redis, ``redis_url``) and PostgreSQL (the
shared app, which has no Redis). The store-level tests check the bounds: the LRU cap, the age limit, the size limit.
"""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from core.settings import Settings
from models.db import Databases
from models.tables import APQ_DOCUMENTS, Role
from partners.documents import CachedApq, PostgresApq, RedisApq
from tests.conftest import TenantWorld, codes
from tests.partners import RUN_PREFIX, bearer, drop_keys, running, sha256

MakeTenant = Callable[..., Awaitable[TenantWorld]]

# WIRE.md, verbatim: Apollo's own example (its document does not validate against Atrium's schema).
WIRE_HASH = "c4b6bec9cad9aca3d2a55390750c55399cf1c834005290ad473446e002c136ee"
WIRE_QUERY = "query Deal($id: ID!) { deal(id: $id) { id name amount } }"
WIRE_HASH_ONLY = {"operationName": "Deal", "variables": {"id": "1"},
                  "extensions": {"persistedQuery": {"version": 1, "sha256Hash": WIRE_HASH}}}
WIRE_REGISTER = {"query": WIRE_QUERY, "variables": {"id": "1"},
                 "extensions": {"persistedQuery": {"version": 1, "sha256Hash": WIRE_HASH}}}
TYPENAME_HASH = "ecf4edb46db40b5132295c0291d62fb65d6759a9eedfa4d5d612dd5ec54a6b38"  # {__typename}, WIRE.md's GET


def apollo_bodies(query: str, operation_name: str | None, variables: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """The hash-only and the registering request Apollo Client's persisted-queries link sends."""
    extensions = {"persistedQuery": {"version": 1, "sha256Hash": sha256(query)}}
    hash_only = {"operationName": operation_name, "variables": variables, "extensions": extensions}
    return hash_only, {**hash_only, "query": query}


def get_url(hash_only: dict[str, Any]) -> str:
    """Apollo's GET form: each JSON value URL-encoded."""
    params = {k: json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else v
              for k, v in hash_only.items() if v is not None}
    return "/graphql?" + urllib.parse.urlencode(params)


@pytest.fixture(params=["redis", "postgres"])
async def apq_client(request: pytest.FixtureRequest, settings: Settings,
                     client: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    if request.param == "postgres":
        yield client
        return
    async with running(settings, redis=request.getfixturevalue("redis_url")) as (_, redis_client):
        yield redis_client


async def test_apollo_flow_miss_register_then_hash_only_by_post_and_get(apq_client: httpx.AsyncClient,
                                                                       make_tenant: MakeTenant) -> None:
    world = await make_tenant("apq")
    auth = bearer(world.token(Role.MEMBER))
    query = "query Tenant($n: Int) { tenant { slug } deals(first: $n) { totalCount } }"
    hash_only, register = apollo_bodies(query, "Tenant", {"n": 5})

    miss = await apq_client.post("/graphql", json=hash_only, headers=auth)
    assert miss.status_code == 200
    assert miss.json() == {"errors": [{"message": "PersistedQueryNotFound",
                                       "extensions": {"code": "PERSISTED_QUERY_NOT_FOUND"}}]}
    assert miss.headers["cache-control"] == "private, no-cache, must-revalidate"

    registered = await apq_client.post("/graphql", json=register, headers=auth)
    assert registered.status_code == 200
    expected = {"data": {"tenant": {"slug": world.slug}, "deals": {"totalCount": 0}}}
    assert registered.json() == expected

    hit = await apq_client.post("/graphql", json=hash_only, headers=auth)
    assert hit.status_code == 200 and hit.json() == expected
    by_get = await apq_client.get(get_url(hash_only), headers={**auth, "accept": "text/html,*/*;q=0.8"})
    assert by_get.status_code == 200 and by_get.json() == expected, by_get.text


async def test_a_document_the_fast_path_answers_is_still_registered(apq_client: httpx.AsyncClient,
                                                                     make_tenant: MakeTenant) -> None:
    # Run as a plain query first, the document is prepared (planner.execution): its registering
    # request is then answered by the fast path, which must store it all the same, or every later
    # hash-only request misses and Apollo Client re-sends the text forever.
    world = await make_tenant("apq-fast")
    auth = bearer(world.token(Role.MEMBER))
    query = "query Few($n: Int) { deals(first: $n) { totalCount edges { node { id } } } }"
    hash_only, register = apollo_bodies(query, "Few", {"n": 3})
    expected = {"data": {"deals": {"totalCount": 0, "edges": []}}}
    for _ in range(2):
        plain = await apq_client.post("/graphql", json={"query": query, "operationName": "Few", "variables": {"n": 3}},
                                      headers=auth)
        assert plain.json() == expected
    assert codes((await apq_client.post("/graphql", json=hash_only, headers=auth)).json()) == [
        "PERSISTED_QUERY_NOT_FOUND"]
    assert (await apq_client.post("/graphql", json=register, headers=auth)).json() == expected
    hit = await apq_client.post("/graphql", json=hash_only, headers=auth)
    assert hit.json() == expected, hit.text


async def test_wire_fixtures(apq_client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("wire")
    auth = bearer(world.token(Role.MEMBER))
    miss = await apq_client.post("/graphql", json=WIRE_HASH_ONLY, headers=auth)
    assert (miss.status_code, codes(miss.json())) == (200, ["PERSISTED_QUERY_NOT_FOUND"])
    # The hash is right but the document does not validate here: it answers the validation error and is
    # not stored, so the hash stays unknown.
    invalid = await apq_client.post("/graphql", json=WIRE_REGISTER, headers=auth)
    assert codes(invalid.json()) == ["GRAPHQL_VALIDATION_FAILED"], invalid.text
    assert codes((await apq_client.post("/graphql", json=WIRE_HASH_ONLY, headers=auth)).json()) == [
        "PERSISTED_QUERY_NOT_FOUND"]

    wrong = {**WIRE_REGISTER, "query": "{ __typename }"}
    mismatch = await apq_client.post("/graphql", json=wrong, headers=auth)
    assert mismatch.status_code == 400
    assert mismatch.json()["errors"][0]["message"] == "provided sha does not match query"

    for version in (2, "1", None):
        body = {**WIRE_HASH_ONLY, "extensions": {"persistedQuery": {"version": version, "sha256Hash": WIRE_HASH}}}
        unsupported = await apq_client.post("/graphql", json=body, headers=auth)
        assert unsupported.status_code == 400
        assert unsupported.json()["errors"][0]["message"] == "Unsupported persisted query version"

    # WIRE.md's GET ({__typename}, anonymous): unknown, registered by POST, then served by GET.
    url = "/graphql?extensions=" + urllib.parse.quote(
        json.dumps({"persistedQuery": {"version": 1, "sha256Hash": TYPENAME_HASH}}, separators=(",", ":")))
    assert codes((await apq_client.get(url)).json()) == ["PERSISTED_QUERY_NOT_FOUND"]
    register = {"query": "{__typename}",
                "extensions": {"persistedQuery": {"version": 1, "sha256Hash": TYPENAME_HASH}}}
    assert (await apq_client.post("/graphql", json=register)).json() == {"data": {"__typename": "Query"}}
    assert (await apq_client.get(url)).json() == {"data": {"__typename": "Query"}}


async def test_persisted_mutation_runs_by_post_but_not_by_get(apq_client: httpx.AsyncClient,
                                                              make_tenant: MakeTenant) -> None:
    world = await make_tenant("apqmut")
    auth = bearer(world.token(Role.MEMBER))
    mutation = f'mutation Add {{ createCompany(input: {{name: "APQ {uuid.uuid4().hex[:6]}"}}) {{ name }} }}'
    hash_only, register = apollo_bodies(mutation, "Add", {})
    assert not (await apq_client.post("/graphql", json=register, headers=auth)).json().get("errors")
    by_get = await apq_client.get(get_url(hash_only), headers=auth)
    assert by_get.status_code == 405 and by_get.headers["allow"] == "POST"
    assert (await apq_client.post("/graphql", json=hash_only, headers=auth)).json()["data"]["createCompany"]


async def test_postgres_store_is_written_through_its_functions(client: httpx.AsyncClient,
                                                               admin_engine: AsyncEngine) -> None:
    query = f"query Stored{uuid.uuid4().hex[:8]} {{ __typename }}"
    _, register = apollo_bodies(query, None, {})
    assert (await client.post("/graphql", json=register)).json() == {"data": {"__typename": "Query"}}
    async with admin_engine.connect() as conn:
        stored = (await conn.execute(select(APQ_DOCUMENTS.c.document).where(
            APQ_DOCUMENTS.c.sha256 == sha256(query)))).scalar_one()
    assert stored == query


async def test_postgres_store_evicts_least_recently_used(settings: Settings, admin_engine: AsyncEngine) -> None:
    databases = Databases(settings.app_url, pool_size=1)
    try:
        small = PostgresApq(databases, Settings(apq_max_documents=2))
        documents = [f"query Evict{i}{uuid.uuid4().hex[:6]} {{ __typename }}" for i in range(3)]
        for document in documents:
            await small.put(sha256(document), document)
        assert await small.get(sha256(documents[0])) is None
        assert await small.get(sha256(documents[2])) == documents[2]
        async with admin_engine.connect() as conn:
            count = (await conn.execute(select(APQ_DOCUMENTS.c.sha256))).all()
        assert len(count) <= 2
        # The definer function stores under the text's own hash only.
        with pytest.raises(RuntimeError):
            await small.put("0" * 64, "{ __typename }")
    finally:
        await databases.dispose()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_store_is_bounded_by_count_and_age(redis_url: str, redis_client: Redis) -> None:
    prefix = f"{RUN_PREFIX}apq-{uuid.uuid4().hex[:6]}:"
    try:
        store = RedisApq(redis_client, Settings(redis_prefix=prefix, apq_max_documents=3, apq_ttl_seconds=3600))
        documents = [f"query R{i} {{ __typename }}" for i in range(5)]
        for document in documents:
            await store.put(sha256(document), document)
        assert [await store.get(sha256(d)) for d in documents] == [None, None, *documents[2:]]
        assert await redis_client.hlen(f"{prefix}{{apq}}:documents") == 3
        assert 0 < await redis_client.pttl(f"{prefix}{{apq}}:documents") <= 3600 * 1000
        # An entry unused for longer than the age limit is gone (its recency moved back an hour and a bit).
        await redis_client.zadd(f"{prefix}{{apq}}:recency", {sha256(documents[2]): 1})
        assert await store.get(sha256(documents[2])) is None
        assert not await redis_client.hexists(f"{prefix}{{apq}}:documents", sha256(documents[2]))
    finally:
        await drop_keys(redis_url, prefix)


async def test_documents_above_the_size_limit_run_but_are_not_stored(redis_url: str,
                                                                        redis_client: Redis) -> None:
    prefix = f"{RUN_PREFIX}apq-{uuid.uuid4().hex[:6]}:"
    try:
        store = CachedApq(RedisApq(redis_client, Settings(redis_prefix=prefix)), max_bytes=64)
        big = "query Big { " + "__typename " * 10 + "}"
        await store.put(sha256(big), big)
        assert await store.get(sha256(big)) is None
        small = "{ __typename }"
        await store.put(sha256(small), small)
        assert await store.get(sha256(small)) == small
    finally:
        await drop_keys(redis_url, prefix)
