"""Object and input types of the webhook API: endpoints, deliveries, event types."""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any

import strawberry
from strawberry.scalars import JSON

from core.ids import to_global_id


@strawberry.type(description="An event type an endpoint may ask for (derived from the record declarations).")
class WebhookEventType:
    name: str = strawberry.field(description="As in `eventTypes` and in each message's `type`.")
    description: str
    record_type: str | None = strawberry.field(description="The record type whose changes these are.")


@strawberry.type(description="Where the workspace's events are POSTed, signed (Standard Webhooks). Its "
                             "secret is shown once, when it is created or rotated.")
class WebhookEndpoint:
    id: strawberry.ID
    url: str
    description: str | None
    event_types: list[str]
    filter: JSON | None = strawberry.field(description="Record fields to a value or a list of values; a record "
                                                       "event is sent only when its record matches every one.")
    enabled: bool
    disabled_reason: str | None
    disabled_at: dt.datetime | None
    failing_since: dt.datetime | None = strawberry.field(
        description="When its current run of failed attempts began; null after a success.")
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> WebhookEndpoint:
        return cls(id=strawberry.ID(to_global_id("WebhookEndpoint", row.id)), url=row.url,
                   description=row.description, event_types=list(row.event_types), filter=row.filter,
                   enabled=row.enabled, disabled_reason=row.disabled_reason, disabled_at=row.disabled_at,
                   failing_since=row.failing_since, version=row.version, created_at=row.created_at,
                   updated_at=row.updated_at)


@strawberry.type
class CreatedWebhookEndpoint:
    endpoint: WebhookEndpoint
    secret: str = strawberry.field(description="The signing secret (`whsec_…`), for the receiver's verification. "
                                               "It is shown only here: store it now.")


@strawberry.enum
class WebhookDeliveryStatus(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@strawberry.type(description="One message to one endpoint, with the outcome of its last attempt.")
class WebhookDelivery:
    id: strawberry.ID
    endpoint_id: strawberry.ID
    message_id: str = strawberry.field(description="Its `webhook-id` header: the same on retries and replays.")
    event_type: str
    status: WebhookDeliveryStatus
    attempts: int
    response_code: int | None = strawberry.field(description="The HTTP status of the last attempt's answer.")
    latency_ms: int | None = strawberry.field(description="How long the last attempt took, in milliseconds.")
    last_error: str | None
    next_attempt_at: dt.datetime | None
    last_attempt_at: dt.datetime | None
    delivered_at: dt.datetime | None
    replay_of: strawberry.ID | None = strawberry.field(description="The delivery this one replays.")
    created_at: dt.datetime
    payload: JSON = strawberry.field(description="The message's body, as sent.")

    @classmethod
    def from_row(cls, row: Any) -> WebhookDelivery:
        return cls(id=strawberry.ID(to_global_id("WebhookDelivery", row.id)),
                   endpoint_id=strawberry.ID(to_global_id("WebhookEndpoint", row.endpoint_id)),
                   message_id=f"msg_{row.message_id.hex}", event_type=row.event_type,
                   status=WebhookDeliveryStatus(row.status), attempts=row.attempts,
                   response_code=row.response_status, latency_ms=row.latency_ms, last_error=row.last_error,
                   next_attempt_at=row.next_attempt_at, last_attempt_at=row.last_attempt_at,
                   delivered_at=row.delivered_at,
                   replay_of=strawberry.ID(to_global_id("WebhookDelivery", row.replay_of)) if row.replay_of else None,
                   created_at=row.created_at, payload=json.loads(row.body))


@strawberry.input
class WebhookEndpointInput:
    url: str = strawberry.field(description="http(s); its host must resolve to public addresses only.")
    event_types: list[str] = strawberry.field(description="Names from `webhookEventTypes`.")
    filter: JSON | None = None
    description: str | None = None


@strawberry.input
class WebhookEndpointPatch:
    url: str | None = strawberry.UNSET
    event_types: list[str] | None = strawberry.UNSET
    filter: JSON | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    enabled: bool | None = strawberry.field(default=strawberry.UNSET, description=(
        "false stops deliveries (pending ones fail); true resumes them and clears the failure state."))
