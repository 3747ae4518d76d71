"""Answers cached until a write: planned query results stored under everything they depend on.

A key is the SHA-256 of: the tenant, the caller's scope (``auth.scope.Scope.key``: role and
record-level view), the document and operation (and the values
of the variables its ``@skip``/``@include`` read, as the plan is keyed), the variables, and the
**data versions** of every table the plan's statement reads (``Plan.tables``) and of the tenant's
field rules (``field_rules``, ``auth.fields``), as ``atrium_enter`` read them at the start of the
request (migration 0005). Every write bumps the versions of the tables
it changes in its own transaction, so once it has committed every later request reads new versions,
computes a new key and cannot find an answer older than the write. A key never names a changed
answer, which is why entries need no invalidation: old ones are simply never asked for again and
age out (least recently used first in process; ``answer_cache_ttl_seconds`` in Redis).

The user is not part of the key: a plan's statement reads the caller's tenant, checks its role
(``Plan.bind``) and binds its record-level view (whose records of which types it sees), nothing else
of who asks, so members with one scope share answers; two callers who may see different records
have different scopes and never share one. Only whole
planned answers are stored: never mutations, errors, partial results, or operations with a field the
executor answers (its resolver may read anything).

Stores: in process (bounded by entries and bytes), in front of Redis when ``REDIS_URL`` is set
(shared by every process). Since an entry never changes, the in-process copy of a Redis entry is
never stale. Redis being unreachable makes a lookup a miss, logged, never an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from core.jsontext import PlannedData, RawJSON

log = logging.getLogger("atrium.planner")


def answer_key(tenant_id: uuid.UUID, scope: str, operation: str, variables: Mapping[str, Any] | None,
               versions: str) -> str:
    """The cache key of an answer (module docstring); ``scope`` is the caller's ``Scope.key``,
    ``versions`` names each table read with its version."""
    parts = [str(tenant_id), scope, operation, json.dumps(variables or {}, sort_keys=True, separators=(",", ":")),
             versions]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def encode(data: PlannedData) -> bytes:
    """``data`` (every value ``RawJSON``) as one value: a header of keys and lengths, then the texts."""
    texts = [value.encode() for value in data.values()]
    header = json.dumps([[key, len(text)] for key, text in zip(data, texts, strict=True)], separators=(",", ":"))
    return header.encode() + b"\n" + b"".join(texts)


def decode(value: bytes) -> PlannedData:
    header, _, body = value.partition(b"\n")
    data, at = PlannedData(), 0
    for key, length in json.loads(header):
        data[key] = RawJSON(body[at:at + length].decode())
        at += length
    return data


class AnswerCache:
    """Cached answers of one app instance; counts its outcomes (``hits``, ``misses``, ``failures``)."""

    def __init__(self, redis: Redis | None, *, prefix: str, ttl_seconds: int, max_entries: int,
                 max_bytes: int) -> None:
        self._redis = redis
        self._prefix = f"{prefix}answer:"
        self._ttl = ttl_seconds
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = self.failures = 0

    async def get(self, key: str) -> PlannedData | None:
        value = self._recent.get(key)
        if value is not None:
            self._recent.move_to_end(key)
        elif self._redis is not None:
            try:
                found = await self._redis.get(self._prefix + key)
                value = found.encode() if isinstance(found, str) else found
            except (RedisError, OSError):
                self.failures += 1
                log.warning("answer cache: Redis unreachable; answering without it", exc_info=True)
                value = None
            if value is not None:
                self._remember(key, value)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        return decode(value)

    async def put(self, key: str, data: PlannedData) -> None:
        value = encode(data)
        self._remember(key, value)
        if self._redis is not None:
            try:
                await self._redis.set(self._prefix + key, value, ex=self._ttl)
            except (RedisError, OSError):
                self.failures += 1
                log.warning("answer cache: Redis unreachable; answer not shared", exc_info=True)

    def _remember(self, key: str, value: bytes) -> None:
        if len(value) > self._max_bytes // 16:
            return  # one answer never takes more than a sixteenth of the cache
        if key in self._recent:
            return
        self._recent[key] = value
        self._bytes += len(value)
        while len(self._recent) > self._max_entries or self._bytes > self._max_bytes:
            _, dropped = self._recent.popitem(last=False)
            self._bytes -= len(dropped)

    @property
    def entries(self) -> int:
        """Answers held in this process."""
        return len(self._recent)
