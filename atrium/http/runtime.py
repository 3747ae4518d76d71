"""The long-lived resources of one app instance: built by ``create_app``, started and closed by its lifespan."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError

from atrium.http.admission import Admission, Limits
from atrium.http.ratelimit import RateLimiter, rate_limiter
from atrium.observability.memory import MemoryTrimmer
from atrium.observability.metrics import Metrics
from atrium.observability.tracing import TracedBroker, Tracing, tracing_for
from auth.tokens import TokenVerifier
from core.clock import SYSTEM_CLOCK, Clock, next_round
from core.settings import Settings
from core.tasks import BackgroundTasks
from models.db import Databases
from models.leases import JobLeases
from models.retention import apply_retention
from partners.documents import ApqStore, apq_store
from partners.keys import ApiKeys
from partners.manifests import TrustedDocuments
from planner.answers import AnswerCache
from resolvers.csv_import import due as due_imports
from resolvers.csv_import import run_import
from subscriptions.broker import Broker, RedisBroker, create_broker
from webhooks.dispatcher import ERROR_KINDS, OUTCOMES, Dispatcher
from webhooks.outbox import backlog

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("atrium.retention")


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
    """Cached answers of planned queries (None when ``ATRIUM_ANSWER_CACHE=off`` or plans are off)."""
    admission: Admission
    """Places for HTTP requests in this process, shared fairly between tenants (``atrium.http.admission``)."""
    trimmer: MemoryTrimmer
    """Gives freed memory back to the system after load drops (``atrium.observability.memory``)."""
    leases: JobLeases
    """This process's leases on export jobs, and the look for jobs whose process died (``models.leases``)."""
    tracing: Tracing | None = None
    """Traces (``atrium.observability.tracing``); None when tracing is off."""
    dispatcher: Dispatcher | None = None
    """Sends webhook deliveries from this process (None when ``ATRIUM_WEBHOOK_DISPATCHER=off``)."""
    tasks: BackgroundTasks = field(default_factory=BackgroundTasks)
    """Work outliving its request (exports); cancelled on close."""
    schedule: BackgroundTasks = field(default_factory=BackgroundTasks)
    """What runs for the app's whole life (the retention schedule, job leases); cancelled on close."""
    retention_rounds: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    """The number of each retention round the schedule completed, in order (what tests wait on)."""

    @classmethod
    def build(cls, settings: Settings, clock: Clock = SYSTEM_CLOCK,
              tracer_provider: TracerProvider | None = None) -> Runtime:
        """Every resource for ``settings`` (whose database URL must be resolved); nothing connects yet.
        Spans go to ``tracer_provider`` when one is given, else as ``settings`` say."""
        databases = Databases.of(settings)
        redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
        broker: Broker = create_broker(settings.redis_url, prefix=settings.redis_prefix,
                                       maxsize=settings.subscriber_queue_size,
                                       presence_ttl=settings.presence_ttl_seconds, clock=clock)
        tracing = tracing_for(settings, tracer_provider)
        if tracing is not None:
            tracing.instrument_redis(redis, broker.commands if isinstance(broker, RedisBroker) else None)
            broker = TracedBroker(broker, tracing)
        metrics, admission = Metrics(), Admission(Limits.of(settings), clock)
        metrics.measure_backlog(lambda: backlog(databases.default), clock.time)
        metrics.expect_webhooks(OUTCOMES, ERROR_KINDS)

        def load() -> float:  # what holds memory: open WebSockets, requests running and waiting
            return metrics.open_websockets() + admission.in_flight + admission.waiting

        return cls(settings=settings, clock=clock, databases=databases, redis=redis, broker=broker,
                   verifier=TokenVerifier(settings, clock), api_keys=ApiKeys(databases),
                   apq=apq_store(settings, databases, redis), limiter=rate_limiter(settings, redis),
                   metrics=metrics, answers=answer_cache(settings, redis),
                   trusted=TrustedDocuments(), admission=admission, trimmer=MemoryTrimmer(load, clock),
                   leases=JobLeases(databases, clock, settings.export_lease_seconds),
                   tracing=tracing,
                   dispatcher=Dispatcher(databases, settings, clock, meter=metrics)
                   if settings.webhook_dispatcher else None)

    async def start(self) -> None:
        await self.broker.start()
        self.admission.start()
        self.trimmer.start()
        if self.dispatcher is not None:
            await self.dispatcher.start()
        self.schedule.spawn(self.leases.run(), name="job leases")
        if self.settings.retention_interval_seconds > 0:
            self.schedule.spawn(self._retention_schedule(self.clock.time()), name="retention")
        self.schedule.spawn(self._import_resumer(), name="import resumer")

    async def _import_resumer(self) -> None:
        """Resume the CSV imports no process is running (``resolvers.csv_import``): at start, then every
        ``import_resume_interval_seconds``. Each look is background work (``tasks``, which
        ``tasks.idle()`` waits for); a job another process holds is skipped by ``run_import``."""
        interval = self.settings.import_resume_interval_seconds
        running: set[uuid.UUID] = set()
        while True:
            self.tasks.spawn(self._resume_due(running), name="import resumer")
            if interval <= 0:
                return
            await self.clock.sleep_until(self.clock.time() + interval)

    async def _resume_due(self, running: set[uuid.UUID]) -> None:
        try:
            for tenant_id, job_id in await due_imports(self.databases):
                if job_id not in running:
                    running.add(job_id)
                    self.tasks.spawn(self._resume(tenant_id, job_id, running), name=f"import {job_id}")
        except (TimeoutError, OSError, SQLAlchemyError) as exc:
            log.warning("looking for import jobs to resume failed (%s)", exc)

    async def _resume(self, tenant_id: uuid.UUID, job_id: uuid.UUID, running: set[uuid.UUID]) -> None:
        try:
            await run_import(self.databases, self.broker, tenant_id, job_id)
        finally:
            running.discard(job_id)

    async def _retention_schedule(self, started: float) -> None:
        """Apply the tenants' retention policies every ``retention_interval_seconds`` (the first time
        one interval after start); a failed round is logged and the next one runs as planned, and rounds
        missed while the process was suspended (or its clock moved on) are not made up (``next_round``)."""
        interval = self.settings.retention_interval_seconds
        deadline = started + interval
        rounds = 0
        while True:
            await self.clock.sleep_until(deadline)
            try:
                await apply_retention(self.databases, dt.datetime.fromtimestamp(self.clock.time(), dt.UTC))
            except (TimeoutError, OSError, SQLAlchemyError) as exc:
                log.warning("retention round failed (%s); next in %d s", exc, interval)
            rounds += 1
            if self.retention_rounds.qsize() < 100:  # nobody may be reading: keep it bounded
                self.retention_rounds.put_nowait(rounds)
            deadline = next_round(deadline, interval, self.clock.time())

    async def close(self) -> None:
        self.admission.close()
        await self.trimmer.close()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        await self.schedule.close()
        await self.tasks.close()
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
