"""API keys: shown once, stored hashed, scoped to a tenant and a role, revocable, expiring, audited.

Keys are made through the admin mutations (and the CLI) and used through both headers; every refusal
of a key is HTTP 401 with one UNAUTHENTICATED error. The role table of the partner mutations (which
``test_roles.py`` leaves to this module) is here too.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from core.ids import to_global_id
from core.settings import Settings
from models.db import Databases
from models.tables import API_KEYS, AUDIT_EVENTS, PERSISTED_DOCUMENTS, Role
from partners.keys import ApiKeys, digest
from tests.cli import run_cli
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.partners import CREATE_KEY, PUSH, REMOVE, bearer, new_key, push

MakeTenant = Callable[..., Awaitable[TenantWorld]]
ME = "{ me { id role } tenant { slug } }"
KEY_SHAPE = re.compile(r"^atr_([0-9a-f]{12})_[A-Za-z0-9_-]{43}$")
REVOKE = "mutation($id: ID!) { revokeApiKey(id: $id) { id revokedAt } }"
KEYS = "query($all: Boolean!) { apiKeys(includeRevoked: $all) { id name prefix role revokedAt lastUsedAt } }"


async def me(client: httpx.AsyncClient, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = await client.post("/graphql", json={"query": ME}, headers=headers)
    return response.status_code, response.json()


def assert_refused(status: int, body: dict[str, Any]) -> None:
    assert status == 401, body
    assert codes(body) == ["UNAUTHENTICATED"], body
    assert body.get("data") is None


async def key_row(engine: AsyncEngine, prefix: str) -> Any:
    async with engine.connect() as conn:
        return (await conn.execute(select(API_KEYS).where(API_KEYS.c.prefix == prefix))).one()


# ---- creating and using keys ----------------------------------------------------------------------

async def test_secret_is_shown_once_and_stored_only_as_its_hash(
        client: httpx.AsyncClient, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("key")
    created = await new_key(client, world, name="Zapier", role="MEMBER")
    secret = created["secret"]
    match = KEY_SHAPE.match(secret)
    assert match is not None, secret
    assert created["apiKey"]["prefix"] == match.group(1) and created["apiKey"]["role"] == "MEMBER"

    row = await key_row(admin_engine, match.group(1))
    assert row.secret_sha256 == digest(secret.split("_", 2)[2])
    assert secret not in json.dumps([str(v) for v in row]) and secret.split("_", 2)[2] not in str(tuple(row))
    # Listing never shows it again (the type has no field for it).
    listed = data_or_fail(await gql(client, KEYS, {"all": False}, token=world.token(Role.ADMIN)))["apiKeys"]
    assert [k["prefix"] for k in listed] == [match.group(1)]
    assert secret.split("_", 2)[2] not in json.dumps(listed)


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
async def test_key_acts_for_its_creator_in_its_tenant(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                      header: str) -> None:
    world, other = await make_tenant("keyuse"), await make_tenant("other")
    secret = (await new_key(client, world, creator=Role.ADMIN, role="MEMBER"))["secret"]
    headers = bearer(secret) if header == "authorization" else {"x-api-key": secret}
    status, body = await me(client, headers)
    assert status == 200, body
    assert body["data"] == {"me": {"id": to_global_id("User", world.users[Role.ADMIN]), "role": "ADMIN"},
                            "tenant": {"slug": world.slug}}
    # The key's own role applies: a member key may write, a viewer key may not.
    created = await gql(client, 'mutation { createCompany(input: {name: "Via key"}) { id } }', headers=headers)
    assert not created.get("errors"), created
    viewer = (await new_key(client, world, role="VIEWER"))["secret"]
    refused = await gql(client, 'mutation { createCompany(input: {name: "No"}) { id } }', headers=bearer(viewer))
    assert codes(refused) == ["FORBIDDEN"]
    # Another tenant's data is not reachable with it.
    assert other.slug not in json.dumps(body)


async def test_a_key_never_outranks_its_creator(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                admin_engine: AsyncEngine) -> None:
    world = await make_tenant("rank")
    body = await gql(client, CREATE_KEY, {"input": {"name": "Too strong", "role": "OWNER"}},
                     token=world.token(Role.ADMIN))
    assert codes(body) == ["FORBIDDEN"], body
    # A key made while its creator was admin follows the creator's demotion.
    secret = (await new_key(client, world, creator=Role.ADMIN, role="ADMIN"))["secret"]
    async with admin_engine.begin() as conn:
        await conn.execute(text("UPDATE memberships SET role = 'viewer' WHERE tenant_id = :t AND user_id = :u"),
                           {"t": world.id, "u": world.users[Role.ADMIN]})
    status, data = await me(client, bearer(secret))
    assert status == 200 and data["data"]["me"]["role"] == "VIEWER", data
    # And stops working once the creator has left.
    async with admin_engine.begin() as conn:
        await conn.execute(text("DELETE FROM memberships WHERE tenant_id = :t AND user_id = :u"),
                           {"t": world.id, "u": world.users[Role.ADMIN]})
    assert_refused(*await me(client, bearer(secret)))


async def test_revoked_key_is_refused_immediately(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                                  admin_engine: AsyncEngine) -> None:
    world = await make_tenant("revoke")
    created = await new_key(client, world)
    assert (await me(client, bearer(created["secret"])))[0] == 200
    revoked = data_or_fail(await gql(client, REVOKE, {"id": created["apiKey"]["id"]}, token=world.token(Role.ADMIN)))
    assert revoked["revokeApiKey"]["revokedAt"] is not None
    status, body = await me(client, bearer(created["secret"]))
    assert_refused(status, body)
    assert body["errors"][0]["message"] == "API key revoked"
    assert_refused(*await me(client, {"x-api-key": created["secret"]}))
    # Revoking again changes nothing; the key is listed only with includeRevoked.
    again = data_or_fail(await gql(client, REVOKE, {"id": created["apiKey"]["id"]}, token=world.token(Role.ADMIN)))
    assert again["revokeApiKey"]["revokedAt"] == revoked["revokeApiKey"]["revokedAt"]
    assert data_or_fail(await gql(client, KEYS, {"all": False}, token=world.token(Role.ADMIN)))["apiKeys"] == []
    assert len(data_or_fail(await gql(client, KEYS, {"all": True}, token=world.token(Role.ADMIN)))["apiKeys"]) == 1
    async with admin_engine.connect() as conn:
        actions = (await conn.execute(select(AUDIT_EVENTS.c.action).where(
            AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.entity_type == "ApiKey"))).scalars().all()
    assert sorted(actions) == ["create", "revoke"]


async def test_expired_key_is_refused(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                      admin_engine: AsyncEngine) -> None:
    world = await make_tenant("expiry")
    soon = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    created = await new_key(client, world, expiresAt=soon)
    assert (await me(client, bearer(created["secret"])))[0] == 200
    async with admin_engine.begin() as conn:
        await conn.execute(update(API_KEYS).where(API_KEYS.c.prefix == created["apiKey"]["prefix"])
                           .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)))
    status, body = await me(client, bearer(created["secret"]))
    assert_refused(status, body)
    assert body["errors"][0]["message"] == "API key expired"
    # An expiry in the past is refused when creating.
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).isoformat()
    body = await gql(client, CREATE_KEY, {"input": {"name": "Old", "role": "VIEWER", "expiresAt": past}},
                     token=world.token(Role.OWNER))
    assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == "input.expiresAt"


async def test_unknown_malformed_and_doubled_keys_are_refused(client: httpx.AsyncClient,
                                                              make_tenant: MakeTenant) -> None:
    world = await make_tenant("badkey")
    secret = (await new_key(client, world))["secret"]
    prefix, rest = secret[:17], secret[17:]
    wrong_secret = prefix + ("A" if rest[0] != "A" else "B") + rest[1:]
    unknown = "atr_000000000000_" + rest
    for headers in (bearer(wrong_secret), bearer(unknown), bearer("atr_short"), {"x-api-key": "not-a-key"},
                    {"x-api-key": unknown}, {**bearer(secret), "x-api-key": secret}):
        assert_refused(*await me(client, headers))
    assert (await me(client, bearer(secret)))[0] == 200


async def test_keys_cannot_manage_keys(client: httpx.AsyncClient, make_tenant: MakeTenant) -> None:
    world = await make_tenant("keymint")
    owner_key = (await new_key(client, world, role="OWNER"))["secret"]
    body = await gql(client, CREATE_KEY, {"input": {"name": "Minted", "role": "VIEWER"}}, headers=bearer(owner_key))
    assert codes(body) == ["FORBIDDEN"], body
    other = await new_key(client, world)
    body = await gql(client, REVOKE, {"id": other["apiKey"]["id"]}, headers=bearer(owner_key))
    assert codes(body) == ["FORBIDDEN"], body


async def test_last_use_is_recorded_at_most_once_a_minute(settings: Settings, client: httpx.AsyncClient,
                                                          make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("lastuse")
    created = await new_key(client, world)
    prefix, secret = created["apiKey"]["prefix"], created["secret"]
    databases = Databases(settings.app_url, pool_size=2)
    try:
        keys = ApiKeys(databases)
        await keys.verify(secret)
        first = (await key_row(admin_engine, prefix)).last_used_at
        assert first is not None
        for _ in range(3):
            await keys.verify(secret)
        assert (await key_row(admin_engine, prefix)).last_used_at == first, "written more than once a minute"
        # A use more than a minute after the recorded one is recorded (by any process).
        old = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=2)
        async with admin_engine.begin() as conn:
            await conn.execute(update(API_KEYS).where(API_KEYS.c.prefix == prefix).values(last_used_at=old))
        await ApiKeys(databases).verify(secret)
        assert (await key_row(admin_engine, prefix)).last_used_at > old
    finally:
        await databases.dispose()


# ---- the partner mutations' role table ------------------------------------------------------------

PARTNER_RULES: dict[str, tuple[str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "createApiKey": (CREATE_KEY, lambda s: {"input": {"name": "Role test", "role": "VIEWER"}}),
    "revokeApiKey": (REVOKE, lambda s: {"id": s["key"]}),
    "pushPersistedDocuments": (PUSH, lambda s: {"client": "web", "manifest": {"new-op": "query New { __typename }"}}),
    "removePersistedDocuments": (REMOVE, lambda s: {"client": "web", "ids": ["old-op"]}),
}


@pytest.mark.parametrize("role", list(Role), ids=[r.value for r in Role])
@pytest.mark.parametrize("field", list(PARTNER_RULES))
async def test_partner_mutations_need_admin(client: httpx.AsyncClient, make_tenant: MakeTenant,
                                            admin_engine: AsyncEngine, field: str, role: Role) -> None:
    world = await make_tenant("partnerroles")
    key = await new_key(client, world)
    assert not (await push(client, world, "web", {"old-op": "query Old { __typename }"})).get("errors")
    document, variables = PARTNER_RULES[field]

    async def state() -> list[list[tuple[Any, ...]]]:
        tables = []
        async with admin_engine.connect() as conn:
            for t in (API_KEYS, PERSISTED_DOCUMENTS, AUDIT_EVENTS):
                rows = await conn.execute(select(t).where(t.c.tenant_id == world.id).order_by(t.c.id))
                tables.append([tuple(r) for r in rows])
        return tables

    before = await state()
    body = await gql(client, document, variables({"key": key["apiKey"]["id"]}), token=world.token(role))
    if role.rank >= Role.ADMIN.rank:
        assert data_or_fail(body)[field] is not None
        async with admin_engine.connect() as conn:
            actors = set((await conn.execute(select(AUDIT_EVENTS.c.actor_id).where(
                AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.entity_type.in_(("ApiKey", "PersistedDocument")),
                AUDIT_EVENTS.c.id.not_in([row[1] for row in before[2]] or [uuid.uuid4()])))).scalars())
        assert actors == {world.users[role]}
    else:
        assert codes(body) == ["FORBIDDEN"], body
        assert role.value in body["errors"][0]["message"]
        assert await state() == before


# ---- the CLI --------------------------------------------------------------------------------------

async def test_cli_creates_lists_and_revokes_keys(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                  settings: Settings, client: httpx.AsyncClient,
                                                  make_tenant: MakeTenant) -> None:
    world = await make_tenant("cli")
    email = f"admin@{world.slug}.example"
    assert await run_cli(monkeypatch, settings, "apikey", "create", "--tenant", world.slug, "--user", email,
                         "--name", "Nightly export", "--role", "viewer", "--persisted-only", "--client",
                         "exporter", "--expires-in-days", "30") == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    match = KEY_SHAPE.match(secret)
    assert match is not None, secret
    status, body = await me(client, bearer(secret))
    # Persisted-only: even this free-form query is refused (the key itself is valid).
    assert status == 200 and codes(body) == ["PERSISTED_QUERY_REQUIRED"], body

    assert await run_cli(monkeypatch, settings, "apikey", "list", "--tenant", world.slug) == 0
    listing = capsys.readouterr().out
    assert match.group(1) in listing and "persisted-only" in listing and "client=exporter" in listing

    # Above the member's own role is refused.
    assert await run_cli(monkeypatch, settings, "apikey", "create", "--tenant", world.slug, "--user", email,
                         "--name", "Too strong", "--role", "owner") == 2
    assert "cannot create a key with the owner role" in capsys.readouterr().err

    assert await run_cli(monkeypatch, settings, "apikey", "revoke", "--tenant", world.slug, match.group(1)) == 0
    assert "revoked" in capsys.readouterr().out
    assert_refused(*await me(client, bearer(secret)))
