"""The dispatcher: sends the outbox's deliveries, signed, and records every attempt.

Any number of dispatchers may run (one in each server process, ``atrium worker`` processes); they
share the work through PostgreSQL alone:

- **Finding work.** Each listens on ``atrium_webhooks`` (a change's ``NOTIFY`` names its tenant, at
  commit) and, whenever it wakes, asks ``atrium_webhook_due`` which tenants have due deliveries:
  those of first attempts, of retries whose time has come, and those a notification missed (a
  dispatcher that was not listening, or one that died). It sleeps until a notification, the next
  retry anyone scheduled, or at most ``ATRIUM_WEBHOOK_POLL`` seconds.
- **Claiming.** Inside the tenant's own transaction (row-level security as everywhere), a batch of
  due deliveries is selected ``FOR UPDATE OF d SKIP LOCKED``: rows another dispatcher holds are
  skipped, so no two dispatchers send one delivery at once. Their endpoints are locked ``FOR KEY
  SHARE`` (skipped while an admin changes one), so an endpoint is changed or deleted between
  batches, never under one. The locks are held while the batch is
  sent and released by the commit that records the outcomes. A dispatcher killed mid-batch leaves
  its transaction to be rolled back by PostgreSQL: the rows are pending again and are sent again
  (at least once: receivers deduplicate by ``webhook-id``).
- **Ordering.** A delivery is claimed only when no earlier delivery (``seq``) of the same record to
  the same endpoint is still pending, so each endpoint receives each record's events in order (a
  retrying one holds back the later ones of its record; other records go on).
- **Retrying.** A delivery not answered with a 2xx status is retried with exponential backoff and
  jitter (``ATRIUM_WEBHOOK_BACKOFF_BASE`` doubling up to ``ATRIUM_WEBHOOK_BACKOFF_MAX``, each delay
  between half and all of that) until ``ATRIUM_WEBHOOK_RETRY_WINDOW`` (a day) after its first
  attempt, when it fails for good. An endpoint one of whose deliveries fails for good, and that
  answered no delivery successfully since that delivery's first attempt, is disabled: its pending
  deliveries fail, an audit row says so, and ``webhook_endpoint.disabled`` goes to the tenant's
  other endpoints that want it.
- **Sending.** Every attempt re-resolves the endpoint's host and connects to the checked address
  (``webhooks.addresses``); redirects are not followed; each attempt is bounded by
  ``ATRIUM_WEBHOOK_TIMEOUT`` as a whole.
- **Measuring.** Once a batch's outcomes have committed, each attempt is told to the dispatcher's
  ``DeliveryMeter`` (the app's Prometheus metrics): its outcome (``delivered``, ``retry``: failed
  and scheduled again, ``failed``: failed for good), why it failed (``ERROR_KINDS``) and how long
  it took; and each endpoint this dispatcher disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import httpx
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from core.clock import Clock
from core.ids import to_global_id
from core.pgurl import PgUrl
from core.settings import Settings
from models.db import Databases
from webhooks.addresses import AddressRefused, networks, vet
from webhooks.catalog import ENDPOINT_DISABLED
from webhooks.outbox import CHANNEL, enqueue_event
from webhooks.signing import SecretBox, SecretUnreadable, headers, secret_box

log = logging.getLogger("atrium.webhooks")

USER_AGENT = "Atrium-Webhooks/1"
RESPONSE_BYTES = 4096
"""At most this much of a receiver's answer is read (and none of it is kept)."""
MAX_TENANTS = 4
"""Tenants one dispatcher drains at once."""
LANES = 2
"""Batches of one tenant a dispatcher has in flight at once (one is sent while another is claimed or
recorded); ``SKIP LOCKED`` keeps them apart and a record's next delivery waits for its first."""

DUE = text("SELECT tenant_id FROM atrium_webhook_due(:now, :limit)")
NEXT_DUE = text("SELECT atrium_webhook_next_due(:now)")
CLAIM = text("""
SELECT d.id, d.endpoint_id, d.message_id, d.event_type, d.body, d.traceparent, d.attempts, d.first_attempt_at,
       e.url, e.secret, e.version AS endpoint_version, e.failing_since
FROM webhook_deliveries d
JOIN webhook_endpoints e ON e.tenant_id = d.tenant_id AND e.id = d.endpoint_id
WHERE d.tenant_id = :tenant AND d.status = 'pending' AND e.enabled
  AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= :now)
  AND d.seq = (
      SELECT p.seq FROM webhook_deliveries p
      WHERE p.tenant_id = d.tenant_id AND p.endpoint_id = d.endpoint_id AND p.ordering_key = d.ordering_key
        AND p.status = 'pending'
      ORDER BY p.seq LIMIT 1)
ORDER BY d.seq
LIMIT :limit
FOR UPDATE OF d SKIP LOCKED FOR KEY SHARE OF e SKIP LOCKED""")
"""A record's first pending delivery to an endpoint, only: a correlated subquery (one probe of
``webhook_deliveries_order_idx`` per candidate, walked in ``seq`` order by ``_pending_idx``), which
the planner cannot turn into a join whose cost grows with the square of the backlog."""
RECORD = text("""
UPDATE webhook_deliveries SET status = :status, attempts = :attempts, first_attempt_at = :first,
    last_attempt_at = :at, next_attempt_at = :next, response_status = :code, latency_ms = :latency,
    last_error = :error, delivered_at = :delivered, version = version + 1, updated_at = now()
WHERE tenant_id = :tenant AND id = :id""")
HEALTHY = text("UPDATE webhook_endpoints SET failing_since = NULL WHERE tenant_id = :tenant AND id = :id "
               "AND failing_since IS NOT NULL")
FAILING = text("UPDATE webhook_endpoints SET failing_since = :since WHERE tenant_id = :tenant AND id = :id "
               "AND failing_since IS NULL")
DISABLE = text("""
UPDATE webhook_endpoints SET enabled = false, disabled_reason = :reason, disabled_at = :at,
    version = version + 1, updated_at = now()
WHERE tenant_id = :tenant AND id = :id AND enabled
RETURNING url""")
FAIL_PENDING = text("""
UPDATE webhook_deliveries SET status = 'failed', last_error = 'the endpoint was disabled', next_attempt_at = NULL,
    version = version + 1, updated_at = now()
WHERE tenant_id = :tenant AND id IN (
    SELECT p.id FROM webhook_deliveries p
    WHERE p.tenant_id = :tenant AND p.endpoint_id = :id AND p.status = 'pending'
      AND EXISTS (SELECT 1 FROM webhook_endpoints e WHERE e.tenant_id = :tenant AND e.id = :id AND NOT e.enabled)
    FOR UPDATE SKIP LOCKED)""")
"""The pending deliveries of a disabled endpoint fail, but for those another lane's batch holds: that
batch fails them itself once it finds the endpoint disabled (``Dispatcher._disable``). Waiting for
them instead deadlocked: the other batch, holding them, waits for the endpoint row this one updated."""
AUDIT = text("""
INSERT INTO audit_events (tenant_id, id, actor_id, action, entity_type, entity_id, diff, request_id)
VALUES (:tenant, :id, NULL, 'disable', 'WebhookEndpoint', :endpoint, CAST(:diff AS jsonb), 'webhooks')""")


def instant(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


OUTCOMES = ("delivered", "retry", "failed")
"""What became of an attempt: answered with a 2xx; failed and tried again later; failed for good."""
ERROR_KINDS = ("http_4xx", "http_5xx", "http_other", "timeout", "connection", "refused", "secret")
"""Why an attempt failed: the receiver's status class; no answer in time; no connection (DNS, TCP,
TLS, a broken response); an address the settings refuse; a signing secret this server cannot open."""


class DeliveryMeter(Protocol):
    """Where a dispatcher reports what it did (``atrium.observability.metrics.Metrics``)."""

    def webhook_attempt(self, outcome: str, error_kind: str | None, seconds: float) -> None: ...

    def webhook_endpoint_disabled(self) -> None: ...


def status_kind(status: int) -> str:
    return "http_4xx" if 400 <= status < 500 else "http_5xx" if 500 <= status < 600 else "http_other"


@dataclass(frozen=True)
class Outcome:
    """One attempt: when it began, the receiver's status (None when there was no answer), why it
    failed (None for a 2xx, with its kind of ``ERROR_KINDS``), and how long it took."""

    at: dt.datetime
    status: int | None
    error: str | None
    seconds: float
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency_ms(self) -> int:
        return round(self.seconds * 1000)


class Dispatcher:
    """Sends due deliveries of every tenant until closed (see the module docstring).

    ``start()`` begins listening and dispatching in the background; ``close()`` lets the batches in
    flight finish (bounded by the send timeout) and stops. ``run_until(stop)`` does both, for
    ``atrium worker``.
    """

    def __init__(self, databases: Databases, settings: Settings, clock: Clock, *,
                 client: httpx.AsyncClient | None = None, meter: DeliveryMeter | None = None) -> None:
        self.databases = databases
        self.meter = meter
        self.settings = settings
        self.clock = clock
        self._dsn = PgUrl.parse(settings.app_url).dsn()
        self._allowed = networks(settings.webhook_allowed_networks)
        self._box: SecretBox | None = secret_box(settings.webhook_key) if settings.webhook_key else None
        self._batch = min(settings.webhook_concurrency, 100)
        self._sending = asyncio.Semaphore(settings.webhook_concurrency)
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.webhook_timeout_seconds), follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=settings.webhook_concurrency * 2,
                                max_keepalive_connections=settings.webhook_concurrency))
        self._wake = asyncio.Event()
        self._notified: set[uuid.UUID] = set()
        self._again: set[uuid.UUID] = set()
        self._drains: dict[uuid.UUID, asyncio.Task[int]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._secrets: dict[tuple[uuid.UUID, int], bytes] = {}
        self.listening = asyncio.Event()
        """Set while the notification connection is listening (tests wait for it)."""
        self.delivered = 0
        self.failures = 0
        """This dispatcher's attempts answered with a 2xx, and the others (counted once recorded)."""
        self.progress = asyncio.Condition()
        """Notified whenever a batch's outcomes have committed."""

    # ---- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        # httpx logs every request at INFO: one line per attempt is what webhook_deliveries is for.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger("httpx").level))
        self._tasks = [asyncio.create_task(self._listen(), name="webhooks-listen"),
                       asyncio.create_task(self._dispatch(), name="webhooks-dispatch")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        running = list(self._drains.values())
        if running:
            _, late = await asyncio.wait(running, timeout=self.settings.webhook_timeout_seconds + 5)
            for drain in late:
                drain.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        await self._client.aclose()

    async def run_until(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    # ---- finding work ---------------------------------------------------------------------------

    def _on_notification(self, connection: Any, pid: int, channel: str, payload: str) -> None:
        try:
            self._notified.add(uuid.UUID(payload))
        except ValueError:
            return
        self._wake.set()

    async def _listen(self) -> None:
        """Keep one connection listening; after every (re)connect, wake to look for missed work."""
        delay = 0.5
        while True:
            try:
                connection = await asyncpg.connect(self._dsn)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("webhooks: cannot listen for notifications (%s); retrying in %.0fs", exc, delay)
                await self.clock.sleep_until(self.clock.time() + delay)
                delay = min(delay * 2, 30.0)
                continue
            lost = asyncio.Event()
            try:
                connection.add_termination_listener(lambda _, lost=lost: lost.set())
                await connection.add_listener(CHANNEL, self._on_notification)
                delay = 0.5
                self.listening.set()
                self._wake.set()
                await lost.wait()
                log.warning("webhooks: the notification connection was lost; reconnecting")
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("webhooks: listening failed (%s); reconnecting", exc)
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.close(timeout=2))

    async def _due(self, now: dt.datetime) -> tuple[set[uuid.UUID], dt.datetime | None]:
        """Tenants with due deliveries, and when the next retry of any tenant is due (after ``now``)."""
        async with self.databases.default.connect() as conn:
            due = {row.tenant_id for row in await conn.execute(DUE, {"now": now, "limit": 1000})}
            after = (await conn.execute(NEXT_DUE, {"now": now})).scalar()
            await conn.commit()
        return due, after

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            now = instant(self.clock.time())
            tenants, self._notified = self._notified, set()
            try:
                due, after = await self._due(now)
            except (OSError, SQLAlchemyError) as exc:
                log.warning("webhooks: cannot look for due deliveries (%s)", exc)
                due, after = set(), None
            for tenant in sorted(tenants | due):
                if tenant in self._drains:
                    self._again.add(tenant)
                elif len(self._drains) >= MAX_TENANTS:
                    self._notified.add(tenant)
                else:
                    self._drains[tenant] = task = asyncio.create_task(self._drain(tenant))
                    task.add_done_callback(functools.partial(self._drained, tenant))
            deadline = self.clock.time() + self.settings.webhook_poll_seconds
            if after is not None:
                deadline = min(deadline, after.timestamp())
            await self._sleep(deadline)

    def _drained(self, tenant: uuid.UUID, task: asyncio.Task[int]) -> None:
        self._drains.pop(tenant, None)
        progressed = False
        if not task.cancelled():
            if (error := task.exception()) is not None:
                log.error("webhooks: dispatching for tenant %s failed", tenant, exc_info=error)
            else:
                progressed = task.result() > 0
        if tenant in self._again:
            self._again.discard(tenant)
            self._notified.add(tenant)
            progressed = True
        if progressed or self._notified:
            self._wake.set()

    async def _sleep(self, deadline: float) -> None:
        woken = asyncio.ensure_future(self._wake.wait())
        timer = asyncio.ensure_future(self.clock.sleep_until(deadline))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (woken, timer):
                waiter.cancel()

    # ---- one tenant -----------------------------------------------------------------------------

    async def _drain(self, tenant: uuid.UUID) -> int:
        """Send the tenant's claimable deliveries, batch after batch in ``LANES`` lanes, until none is
        left; how many."""

        async def lane() -> int:
            total = 0
            while claimed := await self._batch_of(tenant):
                total += claimed
            return total

        async with asyncio.TaskGroup() as group:
            lanes = [group.create_task(lane()) for _ in range(LANES)]
        return sum(task.result() for task in lanes)

    async def _batch_of(self, tenant: uuid.UUID) -> int:
        async with self.databases.tenant_transaction(tenant) as conn:
            now = instant(self.clock.time())
            rows = (await conn.execute(CLAIM, {"tenant": tenant, "now": now, "limit": self._batch})).all()
            if not rows:
                return 0
            outcomes = await asyncio.gather(*(self._attempt(tenant, row) for row in rows))
            ends, disabled = await self._record(conn, tenant, rows, outcomes)
        if self.meter is not None:
            for outcome, end in zip(outcomes, ends, strict=True):
                self.meter.webhook_attempt(end, outcome.kind, outcome.seconds)
            for _ in range(disabled):
                self.meter.webhook_endpoint_disabled()
        async with self.progress:
            ok = sum(outcome.ok for outcome in outcomes)
            self.delivered += ok
            self.failures += len(outcomes) - ok
            self.progress.notify_all()
        return len(rows)

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` holds after a batch committed (wrap it in ``asyncio.timeout``)."""
        async with self.progress:
            await self.progress.wait_for(predicate)

    def _secret(self, tenant: uuid.UUID, row: Any) -> bytes:
        key = (row.endpoint_id, row.endpoint_version)
        found = self._secrets.get(key)
        if found is None:
            if self._box is None:
                raise SecretUnreadable("this server has no webhook key (ATRIUM_WEBHOOK_KEY)")
            if len(self._secrets) > 10_000:
                self._secrets.clear()
            found = self._secrets[key] = self._box.open(bytes(row.secret), tenant, row.endpoint_id)
        return found

    async def _attempt(self, tenant: uuid.UUID, row: Any) -> Outcome:
        async with self._sending:
            at = instant(self.clock.time())
            started = time.perf_counter()
            status: int | None = None
            kind: str | None = None
            try:
                secret = self._secret(tenant, row)
                target = await vet(row.url, self._allowed)
                signed = headers(secret, f"msg_{row.message_id.hex}", int(self.clock.time()), row.body)
                sent = {"content-type": "application/json", "user-agent": USER_AGENT, "host": target.host, **signed}
                if row.traceparent is not None:  # the trace of the change that wrote it continues
                    sent["traceparent"] = row.traceparent
                async with asyncio.timeout(self.settings.webhook_timeout_seconds):
                    async with self._client.stream("POST", target.url, content=row.body.encode(), headers=sent,
                                                   extensions={"sni_hostname": target.server_name}) as response:
                        status = response.status_code
                        read = 0
                        async for chunk in response.aiter_raw():
                            read += len(chunk)
                            if read > RESPONSE_BYTES:
                                break
                error = None if 200 <= status < 300 else f"HTTP {status}"
                kind = None if error is None else status_kind(status)
            except AddressRefused as exc:
                error, kind = f"refused: {exc}", "refused"
            except SecretUnreadable as exc:
                error, kind = str(exc), "secret"
            except TimeoutError:
                error, kind = f"no answer within {self.settings.webhook_timeout_seconds:g}s", "timeout"
            except (httpx.HTTPError, OSError) as exc:
                error, kind = f"{type(exc).__name__}: {exc}"[:500], "connection"
            return Outcome(at, status, error, time.perf_counter() - started, kind)

    def _backoff(self, attempts: int) -> float:
        """Seconds until the retry after ``attempts`` attempts: exponential, capped, with jitter."""
        base, cap = self.settings.webhook_backoff_base_seconds, self.settings.webhook_backoff_max_seconds
        delay = min(cap, base * 2.0 ** min(attempts - 1, 40))
        return delay / 2 + delay / 2 * secrets.randbelow(10_001) / 10_000

    async def _record(self, conn: AsyncConnection, tenant: uuid.UUID, rows: Sequence[Any],
                      outcomes: Sequence[Outcome]) -> tuple[list[str], int]:
        """Write the batch's outcomes; what became of each attempt (``OUTCOMES``) and how many
        endpoints were disabled."""
        window = dt.timedelta(seconds=self.settings.webhook_retry_window_seconds)
        updates: list[dict[str, Any]] = []
        healthy: set[uuid.UUID] = set()
        failing: dict[uuid.UUID, dt.datetime] = {}
        exhausted: dict[uuid.UUID, Any] = {}
        for row, outcome in zip(rows, outcomes, strict=True):
            first = row.first_attempt_at or outcome.at
            values: dict[str, Any] = {
                "tenant": tenant, "id": row.id, "attempts": row.attempts + 1, "first": first, "at": outcome.at,
                "code": outcome.status, "latency": outcome.latency_ms, "error": outcome.error, "next": None,
                "delivered": None, "status": "pending"}
            if outcome.ok:
                values.update(status="delivered", delivered=outcome.at)
                healthy.add(row.endpoint_id)
            else:
                failing.setdefault(row.endpoint_id, outcome.at)
                if outcome.at >= first + window:
                    values["status"] = "failed"
                    if row.failing_since is not None and row.failing_since <= first:
                        exhausted.setdefault(row.endpoint_id, row)
                else:
                    retry = outcome.at + dt.timedelta(seconds=self._backoff(row.attempts + 1))
                    values["next"] = min(retry, first + window)
            updates.append(values)
        await conn.execute(RECORD, updates)
        for endpoint in sorted(healthy):
            await conn.execute(HEALTHY, {"tenant": tenant, "id": endpoint})
        for endpoint, since in sorted(failing.items()):
            if endpoint not in healthy:
                await conn.execute(FAILING, {"tenant": tenant, "id": endpoint, "since": since})
        disabled = 0
        for endpoint, row in sorted(exhausted.items()):
            if endpoint not in healthy:
                disabled += await self._disable(conn, tenant, endpoint, row)
        ends = ["delivered" if u["status"] == "delivered" else "failed" if u["status"] == "failed" else "retry"
                for u in updates]
        return ends, disabled

    async def _disable(self, conn: AsyncConnection, tenant: uuid.UUID, endpoint: uuid.UUID, row: Any) -> bool:
        """Disable ``endpoint`` (module docstring); whether this call did (not someone before it)."""
        at = instant(self.clock.time())
        reason = (f"every delivery failed for {self.settings.webhook_retry_window_seconds:g}s "
                  f"(since {row.failing_since.isoformat()})")
        url = (await conn.execute(DISABLE, {"tenant": tenant, "id": endpoint, "reason": reason, "at": at})).scalar()
        await conn.execute(FAIL_PENDING, {"tenant": tenant, "id": endpoint})  # those this batch holds too
        if url is None:
            return False  # already disabled by someone else
        endpoint_id = to_global_id("WebhookEndpoint", endpoint)
        await conn.execute(AUDIT, {"tenant": tenant, "id": uuid.uuid4(), "endpoint": endpoint, "diff": json.dumps(
            {"before": {"enabled": True}, "after": {"enabled": False, "disabledReason": reason}})})
        await enqueue_event(conn, tenant, ENDPOINT_DISABLED, endpoint,
                            {"endpoint": {"id": endpoint_id, "url": url, "reason": reason}}, at)
        log.warning("webhooks: disabled endpoint %s of tenant %s: %s", endpoint_id, tenant, reason)
        return True
