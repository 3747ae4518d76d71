"""Object and input types of the partner API: API keys and trusted documents."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import strawberry

from auth.session import Info
from core.ids import to_global_id
from models.tables import Role
from records.crm import USER
from schema.crm import User
from schema.objects import load


@strawberry.type(description="An API key of this workspace. Its secret is shown once, when it is created.")
class ApiKey:
    id: strawberry.ID
    name: str
    prefix: str = strawberry.field(description="The public part of the key: `atr_<prefix>_<secret>`.")
    role: Role = strawberry.field(description="The key's role (never above its creator's current role).")
    persisted_only: bool = strawberry.field(description="The key may run trusted documents only.")
    client: str | None = strawberry.field(description="The manifest client whose documents the key may run.")
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None = strawberry.field(description="Recorded at most once a minute.")
    revoked_at: dt.datetime | None
    created_at: dt.datetime
    created_by_id: strawberry.Private[uuid.UUID]

    @classmethod
    def from_row(cls, row: Any) -> ApiKey:
        return cls(id=strawberry.ID(to_global_id("ApiKey", row.id)), name=row.name, prefix=row.prefix,
                   role=Role(row.role), persisted_only=row.persisted_only, client=row.client,
                   expires_at=row.expires_at, last_used_at=row.last_used_at, revoked_at=row.revoked_at,
                   created_at=row.created_at, created_by_id=row.created_by)

    @strawberry.field(description="The member the key acts for; null once they have left the workspace.")
    async def created_by(self, info: Info) -> User | None:
        return await load(info, USER, self.created_by_id)  # type: ignore[no-any-return]


@strawberry.type
class CreatedApiKey:
    api_key: ApiKey
    secret: str = strawberry.field(description="The whole key, to send as `Authorization: Bearer <secret>` or "
                                               "`X-API-Key`. It is shown only here: store it now.")


@strawberry.input
class CreateApiKeyInput:
    name: str
    role: Role = strawberry.field(description="At most your own role.")
    expires_at: dt.datetime | None = None
    persisted_only: bool = strawberry.field(default=False,
                                            description="Refuse anything but the trusted documents of `client`.")
    client: str | None = strawberry.field(default=None, description="Restrict the key to this client's documents.")


@strawberry.type(description="A trusted document (one operation) of a client's manifest.")
class PersistedDocument:
    id: strawberry.ID
    client: str
    document_id: str = strawberry.field(description="The manifest's id; also callable as `sha256:<sha256>`.")
    sha256: str
    name: str | None
    operation_type: str = strawberry.field(description="query, mutation or subscription.")
    body: str
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> PersistedDocument:
        return cls(id=strawberry.ID(to_global_id("PersistedDocument", row.id)), client=row.client,
                   document_id=row.document_id, sha256=row.sha256, name=row.name,
                   operation_type=row.operation_type, body=row.body, created_at=row.created_at)


@strawberry.type
class PushPersistedDocumentsPayload:
    client: str
    added: list[PersistedDocument] = strawberry.field(description="Documents new to the client.")
    unchanged_count: int = strawberry.field(description="Documents the client already had, with the same text.")


@strawberry.type
class RemovePersistedDocumentsPayload:
    client: str
    removed_ids: list[str]
    missing_ids: list[str] = strawberry.field(description="Ids the client did not have.")
