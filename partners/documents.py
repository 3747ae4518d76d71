"""Persisted queries at request time: Automatic Persisted Queries and trusted documents.

``resolve_document`` turns a request's ``query`` / ``documentId`` / ``extensions.persistedQuery``
into the document to run, following Apollo's APQ protocol exactly and the GraphQL-over-HTTP
persisted-documents appendix:

- ``documentId``: ``sha256:<hex>`` names a document by the SHA-256 of its text; any other id is a
  manifest id. The tenant's trusted documents are searched first (only the credential's ``client``
  when it has one); callers that are not persisted-only may also name an APQ-cached document by
  ``sha256:``. Unknown: PERSISTED_QUERY_NOT_FOUND.
- ``extensions.persistedQuery`` (``version`` must be 1): with ``query``, the query is run if its
  SHA-256 is the given hash ("provided sha does not match query", HTTP 400, otherwise) and is stored
  in the APQ cache once it validates; without ``query``, the hash names a trusted document (by id or
  SHA-256) or an APQ-cached one, and an unknown hash answers ``PersistedQueryNotFound``, upon which
  Apollo Client retries with the query.
- a free-form ``query`` runs as it is.

A persisted-only credential (an API key so marked) may run trusted documents only: a free-form
query, or an APQ registration, is refused with PERSISTED_QUERY_REQUIRED, and the APQ cache is not
searched for it.

The APQ cache is global, not tenant data: entries are keyed by the SHA-256 of their own text, so a
hash reveals a document only to whoever already has it, and nothing is stored under a hash that is
not its text's. It is bounded in entries, in age and in document size (``Settings.apq_*``), and kept
in Redis when configured (``RedisApq``), otherwise in PostgreSQL (``PostgresApq``), behind a small
in-process cache (``CachedApq``; safe to keep because an entry can never change).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import text

from auth.principal import Principal
from core.errors import BadRequest, PersistedQueryNotFound, PersistedQueryRequired
from core.settings import Settings
from models.db import Databases, TenantScope
from partners.manifests import DOCUMENT_ID, TrustedDocuments

log = logging.getLogger("partners.documents")

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
HASH_MISMATCH = "provided sha does not match query"
UNSUPPORTED_VERSION = "Unsupported persisted query version"


def sha256_of(document: str) -> str:
    """The lower-case hex SHA-256 of a document's UTF-8 text (what APQ and ``sha256:`` ids use)."""
    return hashlib.sha256(document.encode()).hexdigest()


class ApqStore(Protocol):
    async def get(self, sha256: str) -> str | None:
        """The document stored under ``sha256``, or None."""

    async def put(self, sha256: str, document: str) -> None:
        """Store ``document``, whose SHA-256 the caller has checked to be ``sha256``."""


# Recency scores are microseconds of Redis's clock, nudged to stay strictly increasing, so the eviction
# order is the order of use even within one microsecond.
RECENCY = """
local function recency(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] ~= nil and tonumber(last[2]) >= now then
    now = tonumber(last[2]) + 1
  end
  return now
end
"""

# KEYS: documents hash, recency sorted set. ARGV: sha256, max age (µs).
APQ_GET = RECENCY + """
local now = recency(KEYS[2])
local used = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not used then
  return false
end
if tonumber(used) < now - tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[1], ARGV[1])
  return false
end
redis.call('ZADD', KEYS[2], now, ARGV[1])
return redis.call('HGET', KEYS[1], ARGV[1])
"""

# KEYS: documents hash, recency sorted set. ARGV: sha256, document, max age (µs), max documents.
APQ_PUT = RECENCY + """
local now = recency(KEYS[2])
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl, 'LIMIT', 0, 1000)
local excess = redis.call('ZCARD', KEYS[2]) - #stale - tonumber(ARGV[4])
if excess > 0 then
  for _, sha in ipairs(redis.call('ZRANGE', KEYS[2], #stale, #stale + excess - 1)) do
    stale[#stale + 1] = sha
  end
end
for _, sha in ipairs(stale) do
  redis.call('ZREM', KEYS[2], sha)
  redis.call('HDEL', KEYS[1], sha)
end
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl / 1000))
redis.call('PEXPIRE', KEYS[2], math.ceil(ttl / 1000))
return #stale
"""


class RedisApq:
    """APQ entries in one Redis hash, least recently used first out of a sorted set (atomic scripts).

    Bounded by ``apq_max_documents`` entries, each dropped ``apq_ttl_seconds`` after its last use,
    regardless of Redis's maxmemory policy.
    """

    def __init__(self, redis: Redis, settings: Settings) -> None:
        tag = f"{settings.redis_prefix}{{apq}}"  # one hash slot for both keys (Redis Cluster)
        self._keys = [f"{tag}:documents", f"{tag}:recency"]
        self._ttl_us = settings.apq_ttl_seconds * 1_000_000
        self._max = settings.apq_max_documents
        self._get = redis.register_script(APQ_GET)
        self._put = redis.register_script(APQ_PUT)

    async def get(self, sha256: str) -> str | None:
        found = await self._get(keys=self._keys, args=[sha256, self._ttl_us])
        return found.decode() if isinstance(found, bytes) else found

    async def put(self, sha256: str, document: str) -> None:
        await self._put(keys=self._keys, args=[sha256, document, self._ttl_us, self._max])


class PostgresApq:
    """APQ entries in ``apq_documents`` through its two SECURITY DEFINER functions (no Redis).

    Bounded by ``apq_max_documents`` rows, evicting the least recently used (recency is written at
    most once a minute per entry).
    """

    GET = text("SELECT atrium_apq_get(:sha256)")
    PUT = text("SELECT atrium_apq_put(:document, :max_documents)")

    def __init__(self, databases: Databases, settings: Settings) -> None:
        self._databases = databases
        self._max = settings.apq_max_documents

    async def get(self, sha256: str) -> str | None:
        async with self._databases.default.begin() as conn:
            found: str | None = (await conn.execute(self.GET, {"sha256": sha256})).scalar()
        return found

    async def put(self, sha256: str, document: str) -> None:
        async with self._databases.default.begin() as conn:
            stored = (await conn.execute(self.PUT, {"document": document, "max_documents": self._max})).scalar()
        if stored != sha256:
            raise RuntimeError("apq_documents stored a document under another hash")


class CachedApq:
    """An in-process LRU of recently used entries in front of another store.

    Entries are content-addressed, so a cached one is never stale; documents above ``max_bytes`` are
    run but not stored. When Redis cannot be reached the cache degrades to a miss (Apollo Client then
    sends the document in full) and the failure is logged.
    """

    def __init__(self, store: ApqStore, *, max_bytes: int, size: int = 1024) -> None:
        self._store = store
        self._max_bytes = max_bytes
        self._size = size
        self._recent: OrderedDict[str, str] = OrderedDict()

    async def get(self, sha256: str) -> str | None:
        if (found := self._recent.get(sha256)) is not None:
            self._recent.move_to_end(sha256)
            return found
        try:
            found = await self._store.get(sha256)
        except RedisError:
            log.warning("APQ cache unavailable: answered as a miss", exc_info=True)
            return None
        if found is not None:
            self._remember(sha256, found)
        return found

    async def put(self, sha256: str, document: str) -> None:
        if len(document.encode()) > self._max_bytes:
            return
        try:
            await self._store.put(sha256, document)
        except RedisError:
            log.warning("APQ cache unavailable: document not stored", exc_info=True)
        self._remember(sha256, document)

    def _remember(self, sha256: str, document: str) -> None:
        self._recent[sha256] = document
        self._recent.move_to_end(sha256)
        while len(self._recent) > self._size:
            self._recent.popitem(last=False)


@dataclass(frozen=True)
class Source:
    """The document a request runs."""

    query: str
    register: str | None = None
    """The APQ hash to store ``query`` under once it has validated (an APQ registration)."""
    persisted: bool = False
    """Named by a persisted document id or an APQ hash (its answers are cached by default)."""


async def resolve_document(*, query: str | None, document_id: str | None, extensions: dict[str, Any] | None,
                           principal: Principal | None, db: TenantScope | None, apq: ApqStore,
                           trusted: TrustedDocuments) -> Source:
    """The document to run for these request parameters (see the module docstring).

    Raises BadRequest (HTTP 400: malformed persisted-query parameters), PersistedQueryNotFound and
    PersistedQueryRequired.
    """
    persisted_only = principal is not None and principal.persisted_only
    client = principal.client if principal is not None else None
    pq = (extensions or {}).get("persistedQuery")

    if document_id is not None:
        if query is not None:
            raise BadRequest("Send either query or documentId, not both")
        sha = document_id[7:] if document_id.startswith("sha256:") else None
        if sha is not None and not SHA256_HEX.match(sha):
            raise BadRequest("A sha256: documentId is followed by 64 lower-case hex digits")
        if not DOCUMENT_ID.match(document_id):
            raise BadRequest("A documentId is 1-200 letters, digits or ._~:-")
        found = None
        if db is not None:
            found = await trusted.find(db, client=client, document_id=None if sha else document_id, sha256=sha)
        if found is None and sha is not None and not persisted_only:
            found = await apq.get(sha)
        if found is None:
            raise PersistedQueryNotFound()
        return Source(found, persisted=True)

    if pq is not None:
        if not isinstance(pq, dict) or pq.get("version") != 1:
            raise BadRequest(UNSUPPORTED_VERSION)
        sha = pq.get("sha256Hash")
        if not isinstance(sha, str) or not sha:
            raise BadRequest("extensions.persistedQuery.sha256Hash must be a string")
        if query is not None:
            if persisted_only:
                raise PersistedQueryRequired()
            if sha256_of(query) != sha:
                raise BadRequest(HASH_MISMATCH)
            return Source(query, register=sha, persisted=True)
        found = None
        if db is not None and DOCUMENT_ID.match(sha):  # no other id can name a document
            found = await trusted.find(db, client=client, document_id=sha,
                                        sha256=sha if SHA256_HEX.match(sha) else None)
        if found is None and not persisted_only and SHA256_HEX.match(sha):
            found = await apq.get(sha)
        if found is None:
            raise PersistedQueryNotFound()
        return Source(found, persisted=True)

    if query is None:
        raise BadRequest("Send a query, a documentId or extensions.persistedQuery")
    if persisted_only:
        raise PersistedQueryRequired()
    return Source(query)


def apq_store(settings: Settings, databases: Databases, redis: Redis | None) -> ApqStore:
    """The APQ cache for these settings: Redis when configured, else PostgreSQL; cached in-process."""
    store: ApqStore = RedisApq(redis, settings) if redis is not None else PostgresApq(databases, settings)
    return CachedApq(store, max_bytes=settings.apq_max_bytes)
