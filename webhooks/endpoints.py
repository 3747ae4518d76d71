"""Registering endpoints and replaying deliveries: what the mutations and ``atrium webhooks`` share.

Each function works on a connection already in the tenant's transaction and leaves the audit row to
its caller (the write path for mutations, the CLI its own). The signing secret is made here, shown
once (returned to the caller) and stored sealed (``webhooks.signing``). A URL is checked for its
shape and for where its host resolves (``webhooks.addresses``) before anything is written.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, Select, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from core.errors import BadUserInput, Forbidden, NotFound, VersionConflict
from core.settings import Settings
from core.telemetry import traceparent
from models.tables import WEBHOOK_DELIVERIES, WEBHOOK_ENDPOINTS
from webhooks.addresses import AddressRefused, networks, vet
from webhooks.catalog import check_event_types, check_filter
from webhooks.outbox import notify
from webhooks.signing import new_secret, secret_box

E, D = WEBHOOK_ENDPOINTS, WEBHOOK_DELIVERIES
STATUSES = ("pending", "delivered", "failed")


def _box(settings: Settings) -> Any:
    if not settings.webhook_key:
        raise Forbidden("Webhooks are not configured on this server: its operator must set ATRIUM_WEBHOOK_KEY")
    return secret_box(settings.webhook_key)


async def checked_url(url: str, settings: Settings, field: str) -> str:
    """``url`` if an endpoint may point at it now; BAD_USER_INPUT naming ``field`` saying why not."""
    try:
        await vet(url, networks(settings.webhook_allowed_networks))
    except AddressRefused as exc:
        raise BadUserInput(field, str(exc)) from None
    return url


def checked_description(description: str | None, field: str) -> str | None:
    text = description.strip() if description else None
    if text is not None and (len(text) > 200 or "\x00" in text):
        raise BadUserInput(field, "at most 200 characters, without NUL")
    return text or None


@dataclass(frozen=True)
class EndpointSpec:
    """A new endpoint as given: checked by ``checked``."""

    url: str
    event_types: Sequence[str]
    filter: Any = None
    description: str | None = None

    async def checked(self, settings: Settings, prefix: str = "input.") -> EndpointSpec:
        types = check_event_types(self.event_types, f"{prefix}eventTypes")
        filter = check_filter(self.filter, types, f"{prefix}filter")
        description = checked_description(self.description, f"{prefix}description")
        url = await checked_url(self.url, settings, f"{prefix}url")
        return EndpointSpec(url, types, filter, description)


async def create_endpoint(conn: AsyncConnection, tenant_id: uuid.UUID, spec: EndpointSpec,
                          created_by: uuid.UUID | None, settings: Settings) -> tuple[Row[Any], str]:
    """Insert a checked endpoint; ``(row, secret)``, the secret in its ``whsec_`` form (shown once)."""
    box = _box(settings)
    endpoint_id = uuid.uuid4()
    shown, raw = new_secret()
    row: Row[Any] = (await conn.execute(insert(E).values(
        tenant_id=tenant_id, id=endpoint_id, url=spec.url, description=spec.description,
        event_types=list(spec.event_types), filter=spec.filter, secret=box.seal(raw, tenant_id, endpoint_id),
        created_by=created_by).returning(E))).one()
    return row, shown


async def rotate_secret(conn: AsyncConnection, tenant_id: uuid.UUID, endpoint_id: uuid.UUID,
                        settings: Settings) -> tuple[Row[Any], str]:
    """Give the endpoint a new secret (the old one signs nothing more); ``(row, secret)``."""
    box = _box(settings)
    await require_endpoint(conn, tenant_id, endpoint_id, lock=True)
    shown, raw = new_secret()
    row: Row[Any] = (await conn.execute(update(E).where(E.c.tenant_id == tenant_id, E.c.id == endpoint_id).values(
        secret=box.seal(raw, tenant_id, endpoint_id), version=E.c.version + 1, updated_at=func.now())
        .returning(E))).one()
    return row, shown


async def require_endpoint(conn: AsyncConnection, tenant_id: uuid.UUID, endpoint_id: uuid.UUID, *,
                           lock: bool = False, field: str = "id") -> Row[Any]:
    query = select(E).where(E.c.tenant_id == tenant_id, E.c.id == endpoint_id)
    row = (await conn.execute(query.with_for_update() if lock else query)).first()
    if row is None:
        raise NotFound("webhook endpoint", endpoint_id, field=field)
    return row


async def update_endpoint(conn: AsyncConnection, tenant_id: uuid.UUID, endpoint_id: uuid.UUID,
                          changes: dict[str, Any], expected_version: int | None,
                          settings: Settings) -> tuple[Row[Any], Row[Any]]:
    """Apply ``changes`` (url, event_types, filter, description, enabled; checked here against the
    endpoint's other values); ``(before, after)``. Enabling an endpoint clears its failure state."""
    before = await require_endpoint(conn, tenant_id, endpoint_id, lock=True)
    if expected_version is not None and before.version != expected_version:
        raise VersionConflict("webhook endpoint", before.version)
    values = dict(changes)
    if "description" in values:
        values["description"] = checked_description(values["description"], "input.description")
    if "url" in values:
        values["url"] = await checked_url(values["url"], settings, "input.url")
    if "event_types" in values or "filter" in values:
        types = check_event_types(values.get("event_types", before.event_types), "input.eventTypes")
        values["event_types"] = types
        values["filter"] = check_filter(values.get("filter", before.filter), types, "input.filter")
    if values.get("enabled") is True and not before.enabled:
        values.update(disabled_reason=None, disabled_at=None, failing_since=None)
    elif values.get("enabled") is False and before.enabled:
        values.update(disabled_reason="disabled by an admin", disabled_at=dt.datetime.now(dt.UTC))
    changed = {k: v for k, v in values.items() if before._mapping[k] != v}
    if not changed:
        return before, before
    after: Row[Any] = (await conn.execute(update(E).where(E.c.tenant_id == tenant_id, E.c.id == endpoint_id)
                                          .values(**changed, version=E.c.version + 1, updated_at=func.now())
                                          .returning(E))).one()
    if changed.get("enabled") is False:
        await conn.execute(update(D).where(D.c.tenant_id == tenant_id, D.c.endpoint_id == endpoint_id,
                                           D.c.status == "pending")
                           .values(status="failed", last_error="the endpoint was disabled", next_attempt_at=None,
                                   version=D.c.version + 1, updated_at=func.now()))
    return before, after


async def delete_endpoint(conn: AsyncConnection, tenant_id: uuid.UUID, endpoint_id: uuid.UUID) -> Row[Any]:
    """Delete the endpoint and its deliveries; the row as it was."""
    before = await require_endpoint(conn, tenant_id, endpoint_id, lock=True)
    await conn.execute(delete(E).where(E.c.tenant_id == tenant_id, E.c.id == endpoint_id))
    return before


async def replay(conn: AsyncConnection, tenant_id: uuid.UUID, delivery_id: uuid.UUID) -> Row[Any]:
    """A new pending delivery of the same message (same ``webhook-id`` and body) to the same
    endpoint, sent after the endpoint's earlier deliveries of that record; the endpoint must be
    enabled."""
    original = (await conn.execute(select(D).where(D.c.tenant_id == tenant_id, D.c.id == delivery_id))).first()
    if original is None:
        raise NotFound("webhook delivery", delivery_id)
    endpoint = await require_endpoint(conn, tenant_id, original.endpoint_id)
    if not endpoint.enabled:
        raise BadUserInput("id", "the delivery's endpoint is disabled: enable it first")
    row: Row[Any] = (await conn.execute(insert(D).values(
        tenant_id=tenant_id, id=uuid.uuid4(), endpoint_id=original.endpoint_id, message_id=original.message_id,
        event_type=original.event_type, ordering_key=original.ordering_key, body=original.body,
        replay_of=original.replay_of or original.id, traceparent=traceparent()).returning(D))).one()
    await notify(conn, tenant_id)
    return row


def endpoints_query(tenant_id: uuid.UUID) -> Select[Any]:
    return select(E).where(E.c.tenant_id == tenant_id).order_by(E.c.created_at, E.c.id)


def deliveries_query(tenant_id: uuid.UUID, endpoint_id: uuid.UUID, statuses: Sequence[str] | None) -> Select[Any]:
    query = select(D).where(D.c.tenant_id == tenant_id, D.c.endpoint_id == endpoint_id)
    if statuses:
        query = query.where(D.c.status.in_(list(statuses)))
    return query
