"""Change events published after a write commits, and their tenant-prefixed channel names."""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any


class ChangeKind(enum.StrEnum):
    CREATED = "CREATED"
    UPDATED = "UPDATED"
    DELETED = "DELETED"


@dataclass(frozen=True)
class ChangeEvent:
    """One committed change of one record; ``fields`` names the columns that changed."""

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

    def channels(self) -> list[str]:
        """Every channel this event goes to: the record's, the entity type's, and scoped ones."""
        base = f"t:{self.tenant_id}"
        out = [f"{base}:record:{self.entity_id}", f"{base}:type:{self.entity_type}"]
        out += [f"{base}:{key}:{value}" for key, value in sorted(self.scope.items())]
        return out

    def encode(self) -> str:
        data = asdict(self)
        data.update(tenant_id=str(self.tenant_id), entity_id=str(self.entity_id),
                    actor_id=str(self.actor_id) if self.actor_id else None,
                    occurred_at=self.occurred_at.isoformat(), fields=list(self.fields))
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> ChangeEvent:
        data: dict[str, Any] = json.loads(raw)
        return cls(
            tenant_id=uuid.UUID(data["tenant_id"]), entity_type=data["entity_type"],
            entity_id=uuid.UUID(data["entity_id"]), kind=ChangeKind(data["kind"]),
            fields=tuple(data["fields"]), actor_id=uuid.UUID(data["actor_id"]) if data["actor_id"] else None,
            version=int(data["version"]), occurred_at=datetime.fromisoformat(data["occurred_at"]),
            scope=dict(data.get("scope") or {}),
        )
