"""API keys for partner integrations: generated, shown once, stored hashed, verified, revoked.

A key reads ``atr_<prefix>_<secret>``: ``prefix`` (12 lower-case hex digits) is public, unique across
tenants and names the key in listings and logs; ``secret`` is 32 random bytes, base64url. Only the
SHA-256 of the secret is stored. A slow password hash (argon2, as for passwords) would buy nothing
here: the secret has 256 bits of entropy, so neither a dictionary nor brute force can reach it at
any hash speed, while every request would pay milliseconds to verify. Digests are compared in
constant time.

Each key belongs to one tenant and acts for the member who created it (``created_by``), with a role
no higher than theirs; the server re-checks that membership on every request (see
``auth.principal.confirm_membership``), so a key also stops working when its creator leaves. Keys
may expire, may be limited to persisted documents of one ``client``, and are revoked, never deleted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import math
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, Select, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import BadUserInput, Forbidden, NotFound, Unauthenticated
from models.db import Databases
from models.tables import API_KEYS, Role

KEY_PREFIX = "atr_"
KEY_SHAPE = re.compile(r"^atr_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
TOUCH_INTERVAL = 60.0
"""Seconds between two writes of a key's ``last_used_at`` (per process and in the database)."""

LOOKUP = text("SELECT * FROM atrium_api_key(:prefix)")
TOUCH = text(
    "UPDATE api_keys SET last_used_at = now() WHERE tenant_id = :tenant_id AND id = :id "
    "AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => :interval))"
)


def is_api_key(credential: str) -> bool:
    """True when ``credential`` is meant as an API key (by its prefix), well-formed or not."""
    return credential.startswith(KEY_PREFIX)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def generate() -> tuple[str, str, str]:
    """A fresh ``(prefix, secret, key)``; ``key`` is what the caller is shown, once."""
    prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    return prefix, secret, f"{KEY_PREFIX}{prefix}_{secret}"


@dataclass(frozen=True)
class VerifiedKey:
    """What a valid key grants: its tenant, the member it acts for, and its limits."""

    key_id: uuid.UUID
    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: Role
    persisted_only: bool
    client: str | None
    expires_at: float
    """POSIX time; ``math.inf`` for a key without expiry."""


class ApiKeys:
    """The server's key verifier (one per app, owned by the lifespan).

    ``verify`` looks the key up by prefix through ``atrium_api_key`` (before any tenant is known),
    then checks the secret, revocation and expiry. It records the key's last use at most once per
    ``touch_interval`` seconds per key, so a busy key does not write on every request.
    """

    def __init__(self, databases: Databases, *, touch_interval: float = TOUCH_INTERVAL) -> None:
        self._databases = databases
        self._touch_interval = touch_interval
        self._touched: dict[uuid.UUID, float] = {}

    async def verify(self, key: str) -> VerifiedKey:
        """The grant of ``key``; UNAUTHENTICATED when it is malformed, unknown, revoked or expired."""
        match = KEY_SHAPE.match(key)
        if match is None:
            raise Unauthenticated("Invalid API key")
        prefix, secret = match.groups()
        async with self._databases.default.connect() as conn:
            row = (await conn.execute(LOOKUP, {"prefix": prefix})).first()
        if row is None or not hmac.compare_digest(digest(secret), row.secret_sha256):
            raise Unauthenticated("Invalid API key")
        now = dt.datetime.now(dt.UTC)
        if row.revoked_at is not None:
            raise Unauthenticated("API key revoked")
        if row.expires_at is not None and row.expires_at <= now:
            raise Unauthenticated("API key expired")
        await self._touch(row, now)
        return VerifiedKey(key_id=row.id, tenant_id=row.tenant_id, user_id=row.created_by, role=Role(row.role),
                           persisted_only=row.persisted_only, client=row.client,
                           expires_at=row.expires_at.timestamp() if row.expires_at else math.inf)

    async def _touch(self, row: Row[Any], now: dt.datetime) -> None:
        if row.last_used_at is not None and (now - row.last_used_at).total_seconds() < self._touch_interval:
            return
        clock = time.monotonic()
        if clock - self._touched.get(row.id, -math.inf) < self._touch_interval:
            return
        self._touched[row.id] = clock  # before the write: concurrent requests of this key skip it
        if len(self._touched) > 10_000:
            self._touched = {k: t for k, t in self._touched.items() if clock - t < self._touch_interval}
        async with self._databases.tenant_transaction(row.tenant_id) as conn:
            await conn.execute(TOUCH, {"tenant_id": row.tenant_id, "id": row.id, "interval": self._touch_interval})


@dataclass(frozen=True)
class KeySpec:
    """A key to create, validated by ``checked`` (field names as in ``CreateApiKeyInput``)."""

    name: str
    role: Role
    expires_at: dt.datetime | None = None
    persisted_only: bool = False
    client: str | None = None

    def checked(self, creator_role: Role) -> KeySpec:
        """This spec cleaned up; BAD_USER_INPUT or FORBIDDEN (a role above ``creator_role``)."""
        name = self.name.strip()
        if not name or len(name) > 100 or "\x00" in name:
            raise BadUserInput("input.name", "must be 1 to 100 characters, without NUL")
        if self.role.rank > creator_role.rank:
            raise Forbidden(f"A {creator_role.value} cannot create a key with the {self.role.value} role")
        expires_at = self.expires_at
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise BadUserInput("input.expiresAt", "must include a time zone")
            try:
                expires_at = expires_at.astimezone(dt.UTC)
            except OverflowError:
                raise BadUserInput("input.expiresAt", "must be between the years 1 and 9999 in UTC") from None
            if expires_at <= dt.datetime.now(dt.UTC):
                raise BadUserInput("input.expiresAt", "must be in the future")
        client = self.client.strip() if self.client and self.client.strip() else None
        if client is not None and not CLIENT_NAME.match(client):
            raise BadUserInput("input.client", "must be letters, digits, '.', '_' or '-' (at most 100)")
        return KeySpec(name=name, role=self.role, expires_at=expires_at, persisted_only=self.persisted_only,
                       client=client)


async def create_key(conn: AsyncConnection, tenant_id: uuid.UUID, created_by: uuid.UUID,
                     spec: KeySpec) -> tuple[Row[Any], str]:
    """Insert a key for ``spec`` (already ``checked``) and return its row and the full key.

    The key is returned only here; the database keeps its SHA-256. ``conn`` is a tenant transaction
    of ``tenant_id`` (or the admin connection).
    """
    prefix, secret, key = generate()
    row = (await conn.execute(insert(API_KEYS).values(
        tenant_id=tenant_id, id=uuid.uuid4(), prefix=prefix, secret_sha256=digest(secret), name=spec.name,
        role=spec.role.value, persisted_only=spec.persisted_only, client=spec.client, created_by=created_by,
        expires_at=spec.expires_at,
    ).returning(API_KEYS))).one()
    return row, key


def keys_query(tenant_id: uuid.UUID, *, include_revoked: bool = False) -> Select[Any]:
    """The tenant's keys, newest first (their rows hold only the secrets' digests)."""
    query = select(API_KEYS).where(API_KEYS.c.tenant_id == tenant_id)
    if not include_revoked:
        query = query.where(API_KEYS.c.revoked_at.is_(None))
    return query.order_by(API_KEYS.c.created_at.desc(), API_KEYS.c.id)


async def find_key(conn: AsyncConnection, tenant_id: uuid.UUID, key: uuid.UUID | str) -> Row[Any]:
    """The tenant's key by id or by public prefix (locked for update); NOT_FOUND otherwise."""
    column = API_KEYS.c.id if isinstance(key, uuid.UUID) else API_KEYS.c.prefix
    row = (await conn.execute(select(API_KEYS).where(API_KEYS.c.tenant_id == tenant_id, column == key)
                              .with_for_update())).first()
    if row is None:
        raise NotFound("API key", key)
    return row


async def revoke_key(conn: AsyncConnection, tenant_id: uuid.UUID, key: uuid.UUID | str) -> tuple[Row[Any], bool]:
    """Revoke the tenant's key (by id or prefix); returns its row and whether this call revoked it.

    Revoking twice changes nothing the second time. The next request with the key is refused.
    """
    row = await find_key(conn, tenant_id, key)
    if row.revoked_at is not None:
        return row, False
    revoked = (await conn.execute(
        update(API_KEYS).where(API_KEYS.c.tenant_id == tenant_id, API_KEYS.c.id == row.id)
        .values(revoked_at=func.now(), version=API_KEYS.c.version + 1, updated_at=func.now()).returning(API_KEYS)
    )).one()
    return revoked, True
