"""The long-lived resources of one app instance: built by ``create_app``, started and closed by its lifespan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from atrium.http.ratelimit import RateLimiter, rate_limiter
from atrium.observability.metrics import Metrics
from atrium.observability.tracing import TracedBroker, Tracing, tracing_for
from auth.tokens import TokenVerifier
from core.clock import SYSTEM_CLOCK, Clock
from core.settings import Settings
from models.db import Databases
from partners.documents import ApqStore, apq_store
from partners.keys import ApiKeys
from partners.manifests import TrustedDocuments
from planner.answers import AnswerCache
from subscriptions.broker import Broker, RedisBroker, create_broker

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    clock: Clock
    databases: Databases
    redis: Redis | None
    """Rate limits and the APQ cache (None without ``REDIS_URL``); the broker has its own connections."""
    broker: Broker
    verifier: TokenVerifier
    api_keys: ApiKeys
    apq: ApqStore
    limiter: RateLimiter | None
    """None when rate limits are off (``ATRIUM_RATE_LIMITS=off``)."""
    metrics: Metrics
    answers: AnswerCache | None
    """Cached answers of planned queries (None when ``ATRIUM_ANSWER_CACHE=off`` or plans are off)."""
    trusted: TrustedDocuments
    """Trusted-document lookups remembered until the tenant's documents change."""
    tracing: Tracing | None = None
    """Traces (``atrium.observability.tracing``); None when tracing is off."""

    @classmethod
    def build(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK,
              tracer_provider: TracerProvider | None = None) -> Runtime:
        """Every resource for ``settings`` (whose database URL must be resolved); nothing connects yet.
        Spans go to ``tracer_provider`` when one is given, else as ``settings`` say."""
        databases = Databases(settings.app_url, pool_size=settings.pool_size)
        redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
        broker: Broker = create_broker(settings.redis_url, prefix=settings.redis_prefix,
                                       maxsize=settings.subscriber_queue_size,
                                       presence_ttl=settings.presence_ttl_seconds, clock=clock)
        tracing = tracing_for(settings, tracer_provider)
        if tracing is not None:
            tracing.instrument_redis(redis, broker.commands if isinstance(broker, RedisBroker) else None)
            broker = TracedBroker(broker, tracing)
        return cls(settings=settings, clock=clock, databases=databases, redis=redis, broker=broker,
                   verifier=TokenVerifier(settings, clock), api_keys=ApiKeys(databases),
                   apq=apq_store(settings, databases, redis), limiter=rate_limiter(settings, redis),
                   metrics=Metrics(), answers=answer_cache(settings, redis),
                   trusted=TrustedDocuments(), tracing=tracing)

    async def start(self) -> None:
        await self.broker.start()

    async def close(self) -> None:
        await self.broker.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.databases.dispose()
        if self.tracing is not None:
            await self.tracing.close()


def answer_cache(settings: Settings, redis: Redis | None) -> AnswerCache | None:
    """The answer cache ``settings`` ask for: in process, in front of Redis when there is one."""
    if not (settings.answer_cache and settings.plans):
        return None
    return AnswerCache(redis, prefix=settings.redis_prefix, ttl_seconds=settings.answer_cache_ttl_seconds,
                       max_entries=settings.answer_cache_entries, max_bytes=settings.answer_cache_bytes)
