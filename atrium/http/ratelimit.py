"""Rate limits: token buckets of operation cost, per tenant, per API key and per anonymous client.

Every metered operation is charged its cost (``schema/cost.py``) before it runs, to each bucket
that applies: the tenant's and, for an API key, the key's own (both sized by the tenant's plan,
``Settings.plan_limits``); anonymous callers (only ``login`` works for them) share a bucket per
client address. The charge is all-or-nothing across those buckets: either every bucket holds the
cost and all are debited, or none is and the operation is refused with RATE_LIMITED and
``retryAfter`` (whole seconds until the cost fits). A cost above a bucket's capacity could never
fit and is refused with QUERY_TOO_COMPLEX instead.

Two stores implement the same ``BucketStore`` protocol:

- ``RedisBuckets`` (when ``REDIS_URL`` is set): one Lua script reads, refills and debits all the
  buckets of a charge atomically, with Redis's own clock, so any number of server processes share
  exact limits. Idle buckets expire once they would be full again.
- ``MemoryBuckets`` (no Redis): the same arithmetic in-process. The check and the debit run without
  an ``await`` between them, so concurrent requests of one process cannot overspend; but each
  process has its own buckets, so N processes allow N times the limit.

Responses carry ``RateLimit-Limit``, ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds until
the bucket is full again) for the bucket closest to empty, and ``Retry-After`` when refused.

When Redis cannot be reached, limits fail open: the operation runs uncharged, without headers, and
the failure is logged. An outage of the limiter should not become an outage of the API; the
database pool still bounds the load a flood can cause.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from auth.principal import Principal
from core.errors import QueryTooComplex, RateLimited
from core.settings import PlanLimits, Settings

log = logging.getLogger("atrium.http.ratelimit")



@dataclass(frozen=True)
class Bucket:
    """One token bucket: ``capacity`` units, refilled at ``refill`` units per second."""

    key: str
    capacity: int
    refill: float


@dataclass(frozen=True)
class Level:
    """A bucket after a charge: its capacity, the whole units left, seconds until it is full."""

    limit: int
    remaining: int
    reset: int


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: int
    """Whole seconds until the refused cost would fit (0 when allowed)."""
    levels: tuple[Level, ...]

    @property
    def tightest(self) -> Level:
        """The level closest to empty (what the RateLimit-* headers report)."""
        return min(self.levels, key=lambda level: (level.remaining / max(level.limit, 1), level.limit))


class BucketStore(Protocol):
    async def take(self, buckets: Sequence[Bucket], cost: int) -> Decision:
        """Atomically debit ``cost`` from every bucket if each holds it, else debit none.

        A ``cost`` of 0 reads the buckets without changing them.
        """


def _level(bucket: Bucket, tokens: float) -> Level:
    return Level(limit=bucket.capacity, remaining=max(0, math.floor(tokens)),
                 reset=max(0, math.ceil((bucket.capacity - tokens) / bucket.refill)))


class MemoryBuckets:
    """Buckets of this process only (see the module docstring)."""

    MAX_BUCKETS = 100_000

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    async def take(self, buckets: Sequence[Bucket], cost: int) -> Decision:
        now = time.monotonic()
        tokens = [self._refilled(b, now) for b in buckets]
        wait = max(((cost - t) / b.refill for b, t in zip(buckets, tokens, strict=True) if t < cost), default=0.0)
        if wait == 0:
            tokens = [t - cost for t in tokens]
            for bucket, left in zip(buckets, tokens, strict=True):
                self._state[bucket.key] = (left, now)
            if len(self._state) > self.MAX_BUCKETS:
                self._forget_full(now, {b.key: b for b in buckets})
        return Decision(allowed=wait == 0, retry_after=math.ceil(wait),
                        levels=tuple(_level(b, t) for b, t in zip(buckets, tokens, strict=True)))

    def _refilled(self, bucket: Bucket, now: float) -> float:
        state = self._state.get(bucket.key)
        if state is None:
            return float(bucket.capacity)
        tokens, at = state
        return min(float(bucket.capacity), tokens + (now - at) * bucket.refill)

    def _forget_full(self, now: float, current: dict[str, Bucket]) -> None:
        """Drop buckets idle long enough to be full again (they would start full anyway)."""
        idle_after = 3600.0
        self._state = {k: v for k, v in self._state.items() if k in current or now - v[1] < idle_after}


# KEYS: the buckets. ARGV[1]: cost; then capacity and refill per second of each bucket.
# Returns {allowed, wait seconds (string), remaining_1 (string), ..., remaining_n}.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[1])
local tokens = {}
local wait = 0
for i = 1, #KEYS do
  local cap = tonumber(ARGV[2 * i])
  local rate = tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'at')
  local tk = tonumber(state[1])
  local at = tonumber(state[2])
  if tk == nil or at == nil then
    tk = cap
  else
    tk = math.min(cap, tk + math.max(0, now - at) * rate)
  end
  tokens[i] = tk
  if tk < cost then
    wait = math.max(wait, (cost - tk) / rate)
  end
end
local allowed = 0
if wait == 0 then
  allowed = 1
  for i = 1, #KEYS do
    local cap = tonumber(ARGV[2 * i])
    local rate = tonumber(ARGV[2 * i + 1])
    tokens[i] = tokens[i] - cost
    redis.call('HSET', KEYS[i], 'tokens', tostring(tokens[i]), 'at', tostring(now))
    redis.call('PEXPIRE', KEYS[i], math.ceil((cap - tokens[i]) / rate * 1000) + 1000)
  end
end
local out = {allowed, tostring(wait)}
for i = 1, #KEYS do
  out[#out + 1] = tostring(tokens[i])
end
return out
"""


class RedisBuckets:
    """Buckets shared by every process through Redis (see the module docstring)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self._prefix = f"{prefix}rl:"
        self._take = redis.register_script(TAKE)

    async def take(self, buckets: Sequence[Bucket], cost: int) -> Decision:
        args: list[Any] = [cost]
        for bucket in buckets:
            args += [bucket.capacity, repr(bucket.refill)]
        raw = await self._take(keys=[self._prefix + b.key for b in buckets], args=args)
        allowed, wait, *tokens = raw
        return Decision(allowed=int(allowed) == 1, retry_after=math.ceil(float(wait)),
                        levels=tuple(_level(b, float(t)) for b, t in zip(buckets, tokens, strict=True)))


class RateLimiter:
    """The app's limits (owned by the lifespan): the plan table and the store."""

    def __init__(self, settings: Settings, store: BucketStore) -> None:
        self.store = store
        self._plans: dict[str, PlanLimits] = {p.plan: p for p in settings.plan_limits}

    def meter(self, principal: Principal | None, client: str | None) -> RequestMeter:
        """The meter of one request by ``principal`` (None: anonymous, metered by ``client`` address)."""
        return RequestMeter(self, principal, client)

    def limits(self, plan: str) -> PlanLimits:
        return self._plans.get(plan) or self._plans["free"]

    def buckets(self, principal: Principal | None, client: str | None) -> tuple[Bucket, ...]:
        """The buckets a request of ``principal`` (membership confirmed: its plan is known) is charged to."""
        if principal is None:
            anonymous = self.limits("anonymous")
            return (Bucket(f"ip:{client or 'unknown'}", anonymous.tenant_capacity, anonymous.tenant_refill),)
        if principal.plan is None:
            raise RuntimeError("rate limits need a principal whose membership (and plan) was confirmed")
        plan = self.limits(principal.plan)
        tenant = Bucket(f"t:{principal.tenant_id}", plan.tenant_capacity, plan.tenant_refill)
        if principal.api_key_id is None:
            return (tenant,)
        return tenant, Bucket(f"k:{principal.api_key_id}", plan.key_capacity, plan.key_refill)


class RequestMeter:
    """Charges the operations of one HTTP request and reports its headers (``auth.session.Meter``)."""

    def __init__(self, limiter: RateLimiter, principal: Principal | None, client: str | None) -> None:
        self._limiter = limiter
        self._principal = principal
        self._client = client
        self._buckets: tuple[Bucket, ...] | None = None
        self.decision: Decision | None = None
        """The last charge's outcome (None before the first)."""

    async def _resolve(self) -> tuple[Bucket, ...]:
        if self._buckets is None:
            self._buckets = self._limiter.buckets(self._principal, self._client)
        return self._buckets

    async def charge(self, cost: int) -> None:
        """Spend ``cost``: RATE_LIMITED when the buckets lack it now, QUERY_TOO_COMPLEX when they never will."""
        buckets = await self._resolve()
        ceiling = min(b.capacity for b in buckets)
        if cost > ceiling:
            raise QueryTooComplex(cost, ceiling)
        try:
            self.decision = await self._limiter.store.take(buckets, cost)
        except RedisError:
            log.warning("rate limits unavailable: operation admitted uncharged", exc_info=True)
            return
        if not self.decision.allowed:
            raise RateLimited(max(1, self.decision.retry_after))

    async def headers(self) -> dict[str, str]:
        """``RateLimit-*`` (and ``Retry-After`` after a refusal) for the response.

        When nothing was charged (the request failed before execution), the buckets are read as they are;
        when they cannot be read (Redis down), there are no headers.
        """
        decision = self.decision
        if decision is None:
            try:
                decision = await self._limiter.store.take(await self._resolve(), 0)
            except RedisError:
                log.warning("rate limits unavailable: no RateLimit headers", exc_info=True)
                return {}
        level = decision.tightest
        headers = {"RateLimit-Limit": str(level.limit), "RateLimit-Remaining": str(level.remaining),
                   "RateLimit-Reset": str(level.reset)}
        if not decision.allowed:
            headers["Retry-After"] = str(max(1, decision.retry_after))
        return headers


def rate_limiter(settings: Settings, redis: Redis | None) -> RateLimiter | None:
    """The limiter for these settings (Redis buckets when configured, else in-process); None when off."""
    if not settings.rate_limits:
        return None
    store: BucketStore = RedisBuckets(redis, settings.redis_prefix) if redis is not None else MemoryBuckets()
    return RateLimiter(settings, store)
