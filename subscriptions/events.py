"""What the broker carries: committed changes and presence changes, their channels and wire codec.

Channel names always start with ``t:<tenant uuid>:``, and the tenant comes from the event (so from
the writer's principal), never from a subscriber's arguments:

    t:<tenant>:record:<uuid>        every change of one record
    t:<tenant>:type:<EntityType>    every change of one record type (``activityFeed``)
    t:<tenant>:<key>:<value>        routing keys of an entity, e.g. ``pipeline:<uuid>`` for deals
    t:<tenant>:presence:<uuid>      who is viewing or editing one record changed

On Redis every event travels as one JSON text (``encode_event`` / ``decode_event``).
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


class ChangeKind(enum.StrEnum):
    CREATED = "CREATED"
    UPDATED = "UPDATED"
    DELETED = "DELETED"


def tenant_prefix(tenant_id: uuid.UUID) -> str:
    return f"t:{tenant_id}"


def record_channel(tenant_id: uuid.UUID, record_id: uuid.UUID) -> str:
    """Every change of one record."""
    return f"{tenant_prefix(tenant_id)}:record:{record_id}"


def type_channel(tenant_id: uuid.UUID, entity_type: str) -> str:
    """Every change of one record type (``"Activity"``, ``"Deal"``...)."""
    return f"{tenant_prefix(tenant_id)}:type:{entity_type}"


def scope_channel(tenant_id: uuid.UUID, key: str, value: str) -> str:
    """Changes routed by an entity's scope key, e.g. ``scope_channel(t, "pipeline", id)``."""
    return f"{tenant_prefix(tenant_id)}:{key}:{value}"


def presence_channel(tenant_id: uuid.UUID, record_id: uuid.UUID) -> str:
    """The presence list of one record changed."""
    return f"{tenant_prefix(tenant_id)}:presence:{record_id}"


@dataclass(frozen=True)
class ChangeEvent:
    """One committed change of one record; ``fields`` names the GraphQL fields that changed."""

    tenant_id: uuid.UUID
    entity_type: str
    entity_id: uuid.UUID
    kind: ChangeKind
    fields: tuple[str, ...]
    actor_id: uuid.UUID | None
    version: int
    occurred_at: datetime
    scope: dict[str, str] = field(default_factory=dict)
    """Extra routing keys, e.g. ``{"pipeline": "<uuid>"}`` for deals."""
    previous_scope: dict[str, str] = field(default_factory=dict)
    """Routing keys before an update that changed them (a deal moved to another pipeline also
    reaches the board it left)."""
    detail: dict[str, Any] = field(default_factory=dict)
    """JSON data for subscribers beyond the record itself, e.g. a note's CRDT ``update`` (base64)."""
    committed_at: datetime | None = None
    """When the write's transaction committed (set by the write path just before publishing)."""
    owner_id: uuid.UUID | None = None
    """The record's owner after the change (before it, for a delete) when its type has one
    (``Record.owner``): subscribers who may not see the record are not sent the event."""
    custom_keys: tuple[str, ...] = ()
    """The custom fields whose values changed, by key, when ``fields`` names ``customFields``: a
    subscriber whom field rules hide all of them from is not told ``customFields`` changed."""

    def committed(self, at: datetime) -> ChangeEvent:
        """This event with ``committed_at`` set: ``dataclasses.replace``, without running ``__init__``
        again (a bulk change stamps thousands of events, and nothing here is derived)."""
        stamped = object.__new__(ChangeEvent)
        stamped.__dict__.update(self.__dict__, committed_at=at)
        return stamped

    def channels(self) -> list[str]:
        """Every channel this event goes to: the record's, the entity type's, and scoped ones."""
        out = [record_channel(self.tenant_id, self.entity_id), type_channel(self.tenant_id, self.entity_type)]
        for scope in (self.scope, self.previous_scope):
            for key, value in sorted(scope.items()):
                channel = scope_channel(self.tenant_id, key, value)
                if channel not in out:
                    out.append(channel)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "event": "change", "tenant_id": str(self.tenant_id), "entity_type": self.entity_type,
            "entity_id": str(self.entity_id), "kind": self.kind.value, "fields": list(self.fields),
            "actor_id": str(self.actor_id) if self.actor_id else None, "version": self.version,
            "occurred_at": self.occurred_at.isoformat(), "scope": self.scope,
            "previous_scope": self.previous_scope, "detail": self.detail,
            "committed_at": self.committed_at.isoformat() if self.committed_at else None,
            "owner_id": str(self.owner_id) if self.owner_id else None, "custom_keys": list(self.custom_keys),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChangeEvent:
        committed = data.get("committed_at")
        return cls(
            tenant_id=uuid.UUID(data["tenant_id"]), entity_type=data["entity_type"],
            entity_id=uuid.UUID(data["entity_id"]), kind=ChangeKind(data["kind"]),
            fields=tuple(data["fields"]), actor_id=uuid.UUID(data["actor_id"]) if data["actor_id"] else None,
            version=int(data["version"]), occurred_at=datetime.fromisoformat(data["occurred_at"]),
            scope=dict(data.get("scope") or {}), previous_scope=dict(data.get("previous_scope") or {}),
            detail=dict(data.get("detail") or {}),
            committed_at=datetime.fromisoformat(committed) if committed else None,
            owner_id=uuid.UUID(owner) if (owner := data.get("owner_id")) else None,
            custom_keys=tuple(data.get("custom_keys") or ()),
        )

    def encode(self) -> str:
        return encode_event(self)

    @classmethod
    def decode(cls, raw: str | bytes) -> ChangeEvent:
        event = decode_event(raw)
        if not isinstance(event, ChangeEvent):
            raise ValueError("not a change event")
        return event


@dataclass(frozen=True)
class PresenceChanged:
    """Someone joined, left or changed state on ``record_id``: subscribers re-read the list."""

    tenant_id: uuid.UUID
    record_id: uuid.UUID

    def channels(self) -> list[str]:
        return [presence_channel(self.tenant_id, self.record_id)]

    def to_json(self) -> dict[str, Any]:
        return {"event": "presence", "tenant_id": str(self.tenant_id), "record_id": str(self.record_id)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PresenceChanged:
        return cls(tenant_id=uuid.UUID(data["tenant_id"]), record_id=uuid.UUID(data["record_id"]))


Event = ChangeEvent | PresenceChanged


def encode_event(event: Event) -> str:
    """One compact JSON text for the wire."""
    return json.dumps(event.to_json(), separators=(",", ":"))


def decode_event(raw: str | bytes) -> Event:
    """The event ``encode_event`` produced; ValueError (or KeyError) for anything else."""
    data: dict[str, Any] = json.loads(raw)
    kind = data.get("event", "change")
    if kind == "change":
        return ChangeEvent.from_json(data)
    if kind == "presence":
        return PresenceChanged.from_json(data)
    raise ValueError(f"unknown event {kind!r}")


class Delivery(enum.StrEnum):
    """How a subscription field's results reach subscribers: the transport groups subscribers by it.

    Declared on the field as ``metadata={DELIVERY: Delivery.STATE}`` (default ``EVENTS``).
    """

    EVENTS = "events"
    """A stream of changes: equal subscriptions share one execution; a late joiner gets the first
    result (the Resync that says the stream is live)."""
    STATE = "state"
    """Every result is a full state: shared too, and a late joiner gets the latest one."""
    PRIVATE_STATE = "private-state"
    """Full states with a per-subscriber side effect (presence joins the subscriber): never shared."""


DELIVERY = "atrium.delivery"
"""The field metadata key of ``Delivery``."""
