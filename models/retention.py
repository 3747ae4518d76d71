"""Retention: per tenant, how many days of each kind of row to keep, and the job that applies it.

A tenant's policies are rows of ``retention_policies`` (target, keep_days), set with the
``setRetentionPolicy`` mutation. A target is an entry of ``RETENTION``: a table that holds rows worth
expiring registers itself with ``retention_target`` (its name, what it removes, and how), and the
policies, the mutation's validation, the job and the docs' list all follow from the registry::

    @retention_target("webhook_deliveries", "deliveries older than the policy, whatever their status")
    async def _deliveries(conn: AsyncConnection, tenant_id: uuid.UUID, cutoff: dt.datetime) -> int:
        ...

A target may instead keep its days in a column of the tenant's own row (``setting``; the trash's
``trash_retention_days``, registered by ``resolvers.trash``): it always has a value, so it is due
for every tenant, and ``setRetentionPolicy`` writes that column (within ``days``).

``apply_retention`` runs every policy of every tenant, on the shared database and on every
dedicated one (``Databases.homes``); each (tenant, target) runs in the tenant's own transaction, as the
application role, under an advisory lock so that two processes never apply one at once. The
policies come from ``atrium_retention_due()`` (migrations 0010, 0014), which lists the policy rows
and every tenant's trash. Audit events are trimmed by the database (``atrium_audit_trim``, migration
0010), which keeps the hash chain verifiable: it records the last removed event as the chain's
anchor and appends a chained ``retention`` event naming it.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, delete, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from models.db import Databases
from models.tables import ACTIVITIES, AUDIT_EVENTS, EXPORT_JOBS, WEBHOOK_DELIVERIES

log = logging.getLogger("atrium.retention")

Apply = Callable[[AsyncConnection, uuid.UUID, dt.datetime], Awaitable[int]]
"""Remove ``tenant_id``'s rows older than the cutoff in the tenant transaction ``conn``; how many."""


MAX_KEEP_DAYS = 36_500


@dataclass(frozen=True)
class RetentionTarget:
    name: str
    """What a policy names (``retentionPolicies.target``)."""
    description: str
    apply: Apply
    setting: Column[Any] | None = None
    """The column of ``tenants`` holding this target's days instead of a policy row (never null)."""
    days: tuple[int, int] = (0, MAX_KEEP_DAYS)
    """The days a policy of this target may keep."""


RETENTION: dict[str, RetentionTarget] = {}
"""Every target a retention policy can name, by name."""


def retention_target(name: str, description: str, *, setting: Column[Any] | None = None,
                     days: tuple[int, int] = (0, MAX_KEEP_DAYS)) -> Callable[[Apply], Apply]:
    """Register ``apply`` as the retention target ``name`` (module docstring)."""

    def register(apply: Apply) -> Apply:
        if name in RETENTION:
            raise ValueError(f"retention target {name!r} is registered twice")
        RETENTION[name] = RetentionTarget(name, description, apply, setting, days)
        return apply

    return register


async def record_removal(conn: AsyncConnection, tenant_id: uuid.UUID, entity_type: str, removed: int,
                         cutoff: dt.datetime) -> None:
    """The audit event of a retention removal: what, how many and up to when (never the rows)."""
    if removed:
        await conn.execute(AUDIT_EVENTS.insert().values(
            tenant_id=tenant_id, id=uuid.uuid4(), action="retention", entity_type=entity_type, entity_id=tenant_id,
            diff={"removed": removed, "before": cutoff.isoformat()}, request_id="retention"))


@retention_target("audit_events", "audit events older than the policy (the chain is kept verifiable from an "
                                  "anchor; a chained retention event records each cut)")
async def _audit_events(conn: AsyncConnection, tenant_id: uuid.UUID, cutoff: dt.datetime) -> int:
    # The database reads the policy itself: the caller cannot choose what is cut.
    return int((await conn.execute(text("SELECT atrium_audit_trim()"))).scalar_one())


@retention_target("activities", "activities that occurred before the policy's cutoff")
async def _activities(conn: AsyncConnection, tenant_id: uuid.UUID, cutoff: dt.datetime) -> int:
    removed = (await conn.execute(delete(ACTIVITIES).where(
        ACTIVITIES.c.tenant_id == tenant_id, ACTIVITIES.c.occurred_at < cutoff))).rowcount
    await record_removal(conn, tenant_id, "Activity", removed, cutoff)
    return removed


@retention_target("exports", "export jobs (and their archives) created before the cutoff, whatever their status")
async def _exports(conn: AsyncConnection, tenant_id: uuid.UUID, cutoff: dt.datetime) -> int:
    removed = (await conn.execute(delete(EXPORT_JOBS).where(
        EXPORT_JOBS.c.tenant_id == tenant_id, EXPORT_JOBS.c.created_at < cutoff))).rowcount
    await record_removal(conn, tenant_id, "ExportJob", removed, cutoff)
    return removed


@retention_target("webhook_deliveries", "webhook deliveries created before the cutoff that were delivered or failed "
                                        "(pending ones are still owed to their endpoint and are kept)")
async def _webhook_deliveries(conn: AsyncConnection, tenant_id: uuid.UUID, cutoff: dt.datetime) -> int:
    removed = (await conn.execute(delete(WEBHOOK_DELIVERIES).where(
        WEBHOOK_DELIVERIES.c.tenant_id == tenant_id, WEBHOOK_DELIVERIES.c.created_at < cutoff,
        WEBHOOK_DELIVERIES.c.status != "pending"))).rowcount
    await record_removal(conn, tenant_id, "WebhookDelivery", removed, cutoff)
    return removed


@dataclass(frozen=True)
class Applied:
    tenant_id: uuid.UUID
    target: str
    keep_days: int
    removed: int


DUE = text("SELECT tenant_id, target, keep_days FROM atrium_retention_due()")


async def apply_retention(databases: Databases, now: dt.datetime, *,
                          tenant_id: uuid.UUID | None = None) -> list[Applied]:
    """Apply every retention policy (of ``tenant_id`` only, when given) on every database of
    ``databases`` (``Databases.homes``), as of ``now``; what each removed. A policy naming no registered target
    (one whose table left) is skipped; a (tenant, target) another process is applying is skipped too;
    a tenant listed by a database that is not its home (the shared registry's row of a dedicated
    tenant) is applied in its home only."""
    due: list[Any] = []
    for home in await databases.homes():
        try:
            async with home.engine.connect() as conn:
                listed = (await conn.execute(DUE)).all()
                await conn.commit()
        except (OSError, SQLAlchemyError) as exc:  # one database down stops nobody else's retention
            log.warning("retention: cannot list the policies of %s (%s)", home.engine.url.render_as_string(), exc)
            continue
        due.extend((home, policy) for policy in listed
                   if (tenant_id is None or policy.tenant_id == tenant_id) and home.holds(policy.tenant_id))
    applied: list[Applied] = []
    for home, policy in due:
        target = RETENTION.get(policy.target)
        if target is None:
            continue
        cutoff = now - dt.timedelta(days=policy.keep_days)
        async with databases.tenant_transaction(policy.tenant_id, home=home) as conn:
            lock = zlib.crc32(f"retention:{policy.tenant_id}:{policy.target}".encode())
            if not (await conn.execute(select(func.pg_try_advisory_xact_lock(lock)))).scalar():
                continue
            removed = await target.apply(conn, policy.tenant_id, cutoff)
        applied.append(Applied(policy.tenant_id, policy.target, policy.keep_days, removed))
        if removed:
            log.info("retention removed %d %s of tenant %s (keep %d days)", removed, policy.target,
                     policy.tenant_id, policy.keep_days)
    return applied
