"""The outbox: a change's webhook deliveries, written in the change's own transaction.

``enqueue`` runs at the end of every change of the write path (``resolvers.writes.change``), on
the change's connection, before it commits: it inserts one ``webhook_deliveries`` row per event
type and interested endpoint, and ``NOTIFY atrium_webhooks, '<tenant>'``. Both take effect at the
commit and vanish with a rollback, so a committed change is never missed and a rolled-back one is
never sent. A tenant without enabled endpoints pays one indexed statement per change.

The endpoints read are locked ``FOR KEY SHARE``: an endpoint deleted meanwhile waits for this
change to commit (and then takes its deliveries with it), instead of failing the change.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.telemetry import traceparent
from models.tables import WEBHOOK_DELIVERIES, WEBHOOK_ENDPOINTS
from records.crm import BY_NAME
from subscriptions.events import ChangeEvent
from webhooks.catalog import Render, body, matches, names_of, record_data

CHANNEL = "atrium_webhooks"
"""The PostgreSQL notification channel dispatchers listen on; the payload is the tenant id."""

NOTIFY = text(f"SELECT pg_notify('{CHANNEL}', :tenant)")
BACKLOG = text("SELECT pending, oldest FROM atrium_webhook_backlog()")
E = WEBHOOK_ENDPOINTS


async def _endpoints(conn: AsyncConnection, tenant_id: uuid.UUID) -> list[Any]:
    return list((await conn.execute(
        select(E.c.id, E.c.event_types, E.c.filter).where(E.c.tenant_id == tenant_id, E.c.enabled)
        .order_by(E.c.id).with_for_update(read=True, key_share=True))).all())


async def enqueue(conn: AsyncConnection, tenant_id: uuid.UUID,
                  changes: Iterable[tuple[ChangeEvent, Mapping[Any, Any]]], render: Render) -> int:
    """Write the deliveries of a change's events (each with its row) to the outbox; how many."""
    pending = list(changes)
    if not pending:
        return 0
    endpoints = await _endpoints(conn, tenant_id)
    if not endpoints:
        return 0
    rows: list[dict[str, Any]] = []
    for event, row in pending:
        record = BY_NAME[event.entity_type]
        data: dict[str, Any] | None = None
        for name in names_of(record, event):
            message_id = uuid.uuid4()
            for endpoint in endpoints:
                if name not in endpoint.event_types:
                    continue
                if data is None:
                    data = record_data(record, row, render, event)
                if matches(endpoint.filter, data):
                    rows.append(_delivery(tenant_id, endpoint.id, message_id, name, event.entity_id,
                                          body(name, event.occurred_at, data)))
    return await _insert(conn, tenant_id, rows)


async def enqueue_event(conn: AsyncConnection, tenant_id: uuid.UUID, name: str, key: uuid.UUID,
                        data: Mapping[str, Any], at: dt.datetime) -> int:
    """Write the deliveries of one event that is not a record's change (``webhook_endpoint.disabled``)."""
    message_id = uuid.uuid4()
    rows = [_delivery(tenant_id, endpoint.id, message_id, name, key, body(name, at, data))
            for endpoint in await _endpoints(conn, tenant_id) if name in endpoint.event_types]
    return await _insert(conn, tenant_id, rows)


def _delivery(tenant_id: uuid.UUID, endpoint_id: uuid.UUID, message_id: uuid.UUID, name: str, key: uuid.UUID,
              text_body: str) -> dict[str, Any]:
    return {"tenant_id": tenant_id, "id": uuid.uuid4(), "endpoint_id": endpoint_id, "message_id": message_id,
            "event_type": name, "ordering_key": key, "body": text_body, "traceparent": traceparent()}


async def _insert(conn: AsyncConnection, tenant_id: uuid.UUID, rows: list[dict[str, Any]]) -> int:
    if rows:
        await conn.execute(insert(WEBHOOK_DELIVERIES), rows)
        await notify(conn, tenant_id)
    return len(rows)


async def notify(conn: AsyncConnection, tenant_id: uuid.UUID) -> None:
    """Wake the dispatchers for ``tenant_id`` once the transaction commits (never if it rolls back)."""
    await conn.execute(NOTIFY, {"tenant": str(tenant_id)})


async def backlog(engine: AsyncEngine) -> tuple[int, dt.datetime | None]:
    """Deliveries pending in ``engine``'s outbox, over every tenant, and when the oldest was written
    (``atrium_webhook_backlog``, migration 0014: two numbers, nothing of any tenant)."""
    async with engine.connect() as conn:
        row = (await conn.execute(BACKLOG)).one()
        await conn.commit()
    return int(row.pending), row.oldest
