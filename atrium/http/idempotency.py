"""Exactly-once mutations: the ``Idempotency-Key`` request header (IETF httpapi idempotency-key draft).

A POST whose operation is a mutation, from an authenticated caller, with ``Idempotency-Key: "<key>"``:

- The first request with a key runs in one transaction (``models.db.TenantScope.hold``) that also
  stores its answer (status and body) under (tenant, principal, key) with the SHA-256 of its
  parameters (``query`` or ``documentId``, ``operationName``, ``variables``, ``extensions``); the
  answer is sent once that transaction has committed, and change events are published after it.
- A retry with the same key and the same parameters gets the stored answer, with
  ``Idempotent-Replayed: true``, and nothing runs again: from any process, also after the one that
  ran the first died (either its change and its answer committed, or neither did and the retry runs).
- A retry while the first one still runs: 409 IDEMPOTENCY_KEY_IN_USE with ``Retry-After`` (the
  first holds a transaction-level advisory lock on the key; the retry does not wait for it).
- The same key with other parameters: 422 IDEMPOTENCY_KEY_REUSED.
- A key lives ``Settings.idempotency_ttl_seconds`` (24 h by default); after that it is new again.

An answer for which nothing was executed (no ``data``: a document that does not parse or validate,
RATE_LIMITED, QUERY_TOO_COMPLEX...) is not stored: its retry runs. Queries, GET requests and
anonymous callers ignore the header. A malformed key (empty, over 255 characters, not visible
ASCII) or a key on a batch is 400 BAD_REQUEST.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from graphql import GraphQLError, OperationDefinitionNode, OperationType, parse
from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert

from auth.principal import Principal
from core.limits import MAX_TOKENS
from models.db import TenantScope
from models.tables import IDEMPOTENCY_KEYS

HEADER = "idempotency-key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY = 255
BARE_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
QUOTED_KEY = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])+)"$')
LOCK = text("SELECT pg_try_advisory_xact_lock(hashtextextended(:name, 0)) AS locked")
T = IDEMPOTENCY_KEYS


def key_of(header: str | None) -> str | None:
    """The key of an ``Idempotency-Key`` header: a structured-field string (``"abc"``), or bare visible
    ASCII as many clients send it; None when absent. ValueError (saying why) when malformed."""
    if header is None:
        return None
    value = header.strip()
    if (quoted := QUOTED_KEY.match(value)) is not None:
        key = re.sub(r'\\(["\\])', r"\1", quoted[1])
        if len(key) <= MAX_KEY:
            return key
    elif BARE_KEY.match(value) and not value.startswith('"'):
        return value
    raise ValueError(f"Idempotency-Key must be a string of 1 to {MAX_KEY} visible ASCII characters, "
                     'such as "8e03978e-40d5-43e8-bc93-6894a57f9324"')


@lru_cache(maxsize=512)
def is_mutation(query: str, operation_name: str | None) -> bool:
    """Whether ``query`` runs a mutation (for ``operation_name``); False when it cannot be told (the
    executor then reports why)."""
    try:
        document = parse(query, no_location=True, max_tokens=MAX_TOKENS)
    except (GraphQLError, RecursionError):
        return False
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    chosen = [o for o in operations if operation_name is None or (o.name and o.name.value == operation_name)]
    return len(chosen) == 1 and chosen[0].operation is OperationType.MUTATION


def fingerprint(parameters: dict[str, Any]) -> str:
    """SHA-256 (hex) of a request's parameters, independent of key order and spacing."""
    canonical = json.dumps(parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def lock_name(tenant_id: uuid.UUID, principal: str, key: str) -> str:
    """The name of the advisory lock the running request holds on its key."""
    return f"atrium-idempotency:{tenant_id}:{principal}:{key}"


def principal_of(principal: Principal) -> str:
    """Who a key belongs to within its tenant: the API key, or else the user."""
    return f"key:{principal.api_key_id}" if principal.api_key_id else f"user:{principal.user_id}"


@dataclass(frozen=True)
class Stored:
    """The answer a key's first request got."""

    status: int
    body: str


class Conflict(Exception):
    """The key is taken: ``in_use`` by a request still running, or else by another request's parameters."""

    def __init__(self, *, in_use: bool) -> None:
        super().__init__("in use" if in_use else "reused")
        self.in_use = in_use


@dataclass(frozen=True)
class Once:
    """One keyed request, inside its held transaction (``scope``)."""

    scope: TenantScope
    principal: str
    key: str
    fingerprint: str
    now: dt.datetime
    ttl_seconds: int

    async def claim(self) -> Stored | None:
        """The stored answer for a retry, or None for the first request (which then holds the key
        until its transaction ends). Raises ``Conflict``."""
        (lock,) = await self.scope.fetch(LOCK, {"name": lock_name(self.scope.tenant_id, self.principal, self.key)})
        if not lock.locked:
            raise Conflict(in_use=True)
        rows = await self.scope.fetch(select(T.c.fingerprint, T.c.status, T.c.body).where(
            T.c.tenant_id == self.scope.tenant_id, T.c.principal == self.principal, T.c.key == self.key,
            T.c.expires_at > self.now))
        if not rows:
            return None
        if rows[0].fingerprint != self.fingerprint:
            raise Conflict(in_use=False)
        return Stored(rows[0].status, rows[0].body)

    async def store(self, status: int, body: str) -> None:
        """Keep the answer, in the request's transaction; the principal's expired keys go."""
        tenant = self.scope.tenant_id
        await self.scope.fetch(delete(T).where(T.c.tenant_id == tenant, T.c.principal == self.principal,
                                               T.c.expires_at <= self.now).returning(T.c.id))
        expires = self.now + dt.timedelta(seconds=self.ttl_seconds)
        values = {"fingerprint": self.fingerprint, "status": status, "body": body, "expires_at": expires}
        await self.scope.fetch(
            insert(T).values(tenant_id=tenant, id=uuid.uuid4(), principal=self.principal, key=self.key, **values)
            .on_conflict_do_update(constraint="idempotency_keys_key",
                                   set_={**values, "version": T.c.version + 1, "updated_at": func.now()})
            .returning(T.c.id))
