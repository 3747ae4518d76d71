"""Exactly-once mutations with ``Idempotency-Key`` (``atrium.http.idempotency``).

Each test counts what really got written (as the table owner) next to what the client was told.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.app import create_app
from atrium.http.idempotency import lock_name
from core.clock import ManualClock
from core.settings import Settings
from models.tables import AUDIT_EVENTS, COMPANIES, IDEMPOTENCY_KEYS, Role
from subscriptions.events import ChangeEvent, ChangeKind, type_channel
from tests.conftest import TenantWorld, codes
from tests.live import start_atrium

MakeTenant = Callable[..., Awaitable[TenantWorld]]
CREATE = "mutation($name: String!) { createCompany(input: {name: $name}) { id name version } }"


def body(name: str = "Acme", query: str = CREATE) -> dict[str, Any]:
    return {"query": query, "variables": {"name": name}}


async def send(client: httpx.AsyncClient, token: str, payload: dict[str, Any], key: str | None,
               **headers: str) -> httpx.Response:
    if key is not None:
        headers["idempotency-key"] = f'"{key}"'
    return await client.post("/graphql", json=payload, headers={"authorization": f"Bearer {token}", **headers})


async def companies(engine: AsyncEngine, tenant: TenantWorld, name: str) -> int:
    async with engine.connect() as conn:
        count: int = (await conn.execute(select(func.count()).select_from(COMPANIES).where(
            COMPANIES.c.tenant_id == tenant.id, COMPANIES.c.name == name))).scalar_one()
    return count


@pytest.fixture
async def tenant(make_tenant: MakeTenant) -> TenantWorld:
    return await make_tenant("idem")


async def test_a_retry_gets_the_stored_answer_and_runs_nothing(client: httpx.AsyncClient, tenant: TenantWorld,
                                                              admin_engine: AsyncEngine) -> None:
    key, name = str(uuid.uuid4()), f"Once {uuid.uuid4().hex[:6]}"
    first = await send(client, tenant.token(), body(name), key)
    assert first.status_code == 200 and "errors" not in first.json(), first.text
    assert "idempotent-replayed" not in first.headers
    again = await send(client, tenant.token(), body(name), key)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await companies(admin_engine, tenant, name) == 1
    async with admin_engine.connect() as conn:
        audits = (await conn.execute(select(func.count()).select_from(AUDIT_EVENTS).where(
            AUDIT_EVENTS.c.tenant_id == tenant.id, AUDIT_EVENTS.c.entity_type == "Company"))).scalar_one()
    assert audits == 1


async def test_the_same_body_spelled_otherwise_is_the_same_request(client: httpx.AsyncClient, tenant: TenantWorld,
                                                                  admin_engine: AsyncEngine) -> None:
    key, name = str(uuid.uuid4()), f"Spelled {uuid.uuid4().hex[:6]}"
    await send(client, tenant.token(), body(name), key)
    raw = json.dumps({"variables": {"name": name}, "query": CREATE}, indent=2)  # other key order, spacing
    again = await client.post("/graphql", content=raw, headers={
        "authorization": f"Bearer {tenant.token()}", "content-type": "application/json", "idempotency-key": key})
    assert again.headers["idempotent-replayed"] == "true"  # the bare form of the key is accepted too
    assert await companies(admin_engine, tenant, name) == 1


async def test_the_same_key_with_another_body_is_refused(client: httpx.AsyncClient, tenant: TenantWorld,
                                                        admin_engine: AsyncEngine) -> None:
    key, name = str(uuid.uuid4()), f"First {uuid.uuid4().hex[:6]}"
    await send(client, tenant.token(), body(name), key)
    for accept in ("application/json", "application/graphql-response+json"):
        other = await send(client, tenant.token(), body(name + " changed"), key, accept=accept)
        assert other.status_code == 422
        assert codes(other.json()) == ["IDEMPOTENCY_KEY_REUSED"]
        assert "data" not in other.json()
    assert await companies(admin_engine, tenant, name + " changed") == 0


async def test_a_retry_while_the_first_runs_is_409(client: httpx.AsyncClient, tenant: TenantWorld,
                                                  admin_engine: AsyncEngine) -> None:
    """The first request holds the key's lock until it commits; here the test holds it instead."""
    key, name = str(uuid.uuid4()), f"Busy {uuid.uuid4().hex[:6]}"
    principal = f"user:{tenant.users[Role.OWNER]}"
    async with admin_engine.connect() as conn, conn.begin():
        await conn.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:n, 0))"),
                           {"n": lock_name(tenant.id, principal, key)})
        busy = await send(client, tenant.token(), body(name), key)
    assert busy.status_code == 409
    assert busy.headers["retry-after"] == "1"
    assert codes(busy.json()) == ["IDEMPOTENCY_KEY_IN_USE"]
    assert await companies(admin_engine, tenant, name) == 0
    done = await send(client, tenant.token(), body(name), key)  # the lock is gone: it runs now
    assert done.status_code == 200 and "idempotent-replayed" not in done.headers
    assert await companies(admin_engine, tenant, name) == 1


async def test_concurrent_duplicates_write_once(client: httpx.AsyncClient, tenant: TenantWorld,
                                               admin_engine: AsyncEngine) -> None:
    key, name = str(uuid.uuid4()), f"Race {uuid.uuid4().hex[:6]}"
    answers = await asyncio.gather(*(send(client, tenant.token(), body(name), key) for _ in range(8)))
    ran = [a for a in answers if a.status_code == 200 and "idempotent-replayed" not in a.headers]
    assert len(ran) == 1
    for answer in answers:
        assert answer.status_code in (200, 409), answer.text
        if answer.status_code == 200:
            assert answer.json() == ran[0].json()
    assert await companies(admin_engine, tenant, name) == 1


async def test_keys_belong_to_their_tenant_and_principal(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                        admin_engine: AsyncEngine) -> None:
    one, two = await make_tenant("idem-a"), await make_tenant("idem-b")
    key, name = str(uuid.uuid4()), f"Scoped {uuid.uuid4().hex[:6]}"
    for world, role in ((one, Role.OWNER), (one, Role.ADMIN), (two, Role.OWNER)):
        answer = await send(client, world.token(role), body(name), key)
        assert answer.status_code == 200 and "idempotent-replayed" not in answer.headers, answer.text
    assert await companies(admin_engine, one, name) == 2
    assert await companies(admin_engine, two, name) == 1


async def test_a_partly_failed_mutation_is_stored_as_answered(client: httpx.AsyncClient, tenant: TenantWorld,
                                                             admin_engine: AsyncEngine) -> None:
    """Two root mutations, the second refused: the first's change stands (the non-null second nulls
    ``data``), and a retry replays that answer without running either again."""
    name = f"Half {uuid.uuid4().hex[:6]}"
    query = ('mutation($name: String!) { a: createCompany(input: {name: $name}) { id } '
             'b: createCompany(input: {name: "   "}) { id } }')
    key = str(uuid.uuid4())
    first = await send(client, tenant.token(), body(name, query), key)
    assert codes(first.json()) == ["BAD_USER_INPUT"]
    assert first.json()["data"] is None
    assert await companies(admin_engine, tenant, name) == 1
    again = await send(client, tenant.token(), body(name, query), key)
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()
    assert await companies(admin_engine, tenant, name) == 1


async def test_an_answer_where_nothing_ran_is_not_stored(client: httpx.AsyncClient, tenant: TenantWorld,
                                                        admin_engine: AsyncEngine) -> None:
    key, name = str(uuid.uuid4()), f"Fixed {uuid.uuid4().hex[:6]}"
    broken = await send(client, tenant.token(), body(name, CREATE.replace("version", "nope")), key)
    assert codes(broken.json()) == ["GRAPHQL_VALIDATION_FAILED"]
    fixed = await send(client, tenant.token(), body(name), key)  # the same key, now for the corrected request
    assert fixed.status_code == 200 and "errors" not in fixed.json()
    assert await companies(admin_engine, tenant, name) == 1


async def test_queries_ignore_the_header(client: httpx.AsyncClient, tenant: TenantWorld,
                                         admin_engine: AsyncEngine) -> None:
    key = str(uuid.uuid4())
    for query in ("{ me { name } }", "{ tenant { slug } }"):
        answer = await send(client, tenant.token(), {"query": query}, key)
        assert answer.status_code == 200 and "idempotent-replayed" not in answer.headers
    async with admin_engine.connect() as conn:
        stored = (await conn.execute(select(func.count()).select_from(IDEMPOTENCY_KEYS).where(
            IDEMPOTENCY_KEYS.c.tenant_id == tenant.id))).scalar_one()
    assert stored == 0


@pytest.mark.parametrize("header", ['""', " ", "x" * 256, '"a\\tb"', "naïve", '"unterminated'])
async def test_a_malformed_key_is_a_400(client: httpx.AsyncClient, tenant: TenantWorld, header: str) -> None:
    answer = await client.post("/graphql", json=body(), headers=[
        (b"authorization", f"Bearer {tenant.token()}".encode()), (b"idempotency-key", header.encode())])
    assert answer.status_code == 400
    assert codes(answer.json()) == ["BAD_REQUEST"]


@pytest.fixture
async def clocked(settings: Settings) -> AsyncIterator[tuple[Starlette, ManualClock]]:
    clock = ManualClock()
    app = create_app(dataclasses.replace(settings, idempotency_ttl_seconds=60), clock=clock)
    async with app.router.lifespan_context(app):
        yield app, clock


async def test_keys_expire(clocked: tuple[Starlette, ManualClock], tenant: TenantWorld,
                           admin_engine: AsyncEngine) -> None:
    app, clock = clocked
    key, name = str(uuid.uuid4()), f"Expiring {uuid.uuid4().hex[:6]}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        await send(client, tenant.token(), body(name), key)
        clock.advance(59)
        assert (await send(client, tenant.token(), body(name), key)).headers["idempotent-replayed"] == "true"
        clock.advance(2)
        answer = await send(client, tenant.token(), body(name), key)
        assert answer.status_code == 200 and "idempotent-replayed" not in answer.headers
    assert await companies(admin_engine, tenant, name) == 2


async def test_a_retry_is_answered_after_the_process_that_ran_it_was_killed(
        client: httpx.AsyncClient, tenant: TenantWorld, database_url: str, admin_engine: AsyncEngine) -> None:
    key, name = str(uuid.uuid4()), f"Survivor {uuid.uuid4().hex[:6]}"
    server = await start_atrium(database_url, None)
    try:
        async with server.client() as other:
            first = await send(other, tenant.token(), body(name), key)
        assert first.status_code == 200 and "errors" not in first.json(), first.text
        server.process.kill()  # SIGKILL: nothing of the process survives but what it committed
        server.process.wait()
    finally:
        server.stop()
    again = await send(client, tenant.token(), body(name), key)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await companies(admin_engine, tenant, name) == 1


async def test_the_change_event_is_published_once_after_the_commit(client: httpx.AsyncClient, app: Starlette,
                                                                   tenant: TenantWorld,
                                                                   admin_engine: AsyncEngine) -> None:
    key, name = str(uuid.uuid4()), f"Published {uuid.uuid4().hex[:6]}"
    async with app.state.runtime.broker.subscribe(type_channel(tenant.id, "Company")) as queue:
        await send(client, tenant.token(), body(name), key)
        event = queue.get_nowait()  # published before the answer was sent
        assert isinstance(event, ChangeEvent) and event.kind is ChangeKind.CREATED
        assert await companies(admin_engine, tenant, name) == 1  # and committed before that
        await send(client, tenant.token(), body(name), key)
        assert queue.empty()  # the replay published nothing
