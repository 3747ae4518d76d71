"""Partner administration: API keys and trusted documents, for admins (``users:manage``).

Every change is one tenant transaction with its audit rows. API keys cannot manage API keys (a
leaked key must not be able to mint more); they may push and remove trusted documents when their
role allows, and only for their own ``client`` when they have one, so a partner's build can upload
its manifest with a key of its own. Keys are not available yet for tenants with a dedicated
database: they are found, before the tenant is known, in the shared database only.
"""

from __future__ import annotations

import uuid
from typing import Any

import strawberry
from strawberry.scalars import JSON

from auth.principal import Principal
from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput, Forbidden
from core.ids import decode_id
from partners.keys import KeySpec, create_key, keys_query, revoke_key
from partners.manifests import (
    DOCUMENT_ID,
    client_name,
    documents_query,
    push_documents,
    read_manifest,
    remove_documents,
)
from partners.types import (
    ApiKey,
    CreateApiKeyInput,
    CreatedApiKey,
    PersistedDocument,
    PushPersistedDocumentsPayload,
    RemovePersistedDocumentsPayload,
)
from resolvers.writes import Change, change

MANAGE = Permission.MANAGE_USERS


def _users_only(principal: Principal) -> None:
    if principal.api_key_id is not None:
        raise Forbidden("API keys cannot manage API keys: sign in as a member")


def _own_client(principal: Principal, client: str) -> None:
    if principal.client is not None and principal.client != client:
        raise Forbidden(f"This key may manage only the documents of client {principal.client!r}")


async def _shared_database_only(info: Info, tenant_id: uuid.UUID) -> None:
    databases = info.context.databases
    if await databases.engine_for(tenant_id) is not databases.default:
        raise Forbidden("API keys are not available yet for workspaces with a dedicated database")


async def _audit(w: Change, action: str, entity_type: str, entity_id: uuid.UUID, diff: dict[str, Any]) -> None:
    """An audit row in the change's transaction (these records publish no change events)."""
    await w.audit(entity_type, action, entity_id, diff)


def _key_summary(row: Any) -> dict[str, Any]:
    return {"name": row.name, "prefix": row.prefix, "role": row.role, "persistedOnly": row.persisted_only,
            "client": row.client, "expiresAt": row.expires_at.isoformat() if row.expires_at else None}


@strawberry.type
class PartnerQuery:
    @strawberry.field(**requires(MANAGE, "The workspace's API keys, newest first."))
    async def api_keys(self, info: Info, include_revoked: bool = False) -> list[ApiKey]:
        session = info.context.session
        rows = await session.db.fetch(keys_query(session.tenant_id, include_revoked=include_revoked))
        return [ApiKey.from_row(r) for r in rows]

    @strawberry.field(**requires(MANAGE, "Trusted documents pushed for the workspace's clients (or one client)."))
    async def persisted_documents(self, info: Info, client: str | None = None) -> list[PersistedDocument]:
        session = info.context.session
        rows = await session.db.fetch(documents_query(session.tenant_id, client_name(client) if client else None))
        return [PersistedDocument.from_row(r) for r in rows]


@strawberry.type
class PartnerMutation:
    @strawberry.mutation(**requires(MANAGE, "Create an API key acting for you, with at most your role. The answer "
                                            "holds the secret; it cannot be shown again."))
    async def create_api_key(self, info: Info, input: CreateApiKeyInput) -> CreatedApiKey:
        principal = info.context.session.principal
        _users_only(principal)
        await _shared_database_only(info, principal.tenant_id)
        spec = KeySpec(name=input.name, role=input.role, expires_at=input.expires_at,
                       persisted_only=input.persisted_only, client=input.client).checked(principal.role)
        async with change(info) as w:
            row, key = await create_key(w.conn, w.tenant_id, w.principal.user_id, spec)
            await _audit(w, "create", "ApiKey", row.id, {"after": _key_summary(row)})
        return CreatedApiKey(api_key=ApiKey.from_row(row), secret=key)

    @strawberry.mutation(**requires(MANAGE, "Revoke an API key: its next request is refused. Revoking twice is "
                                            "harmless."))
    async def revoke_api_key(self, info: Info, id: strawberry.ID) -> ApiKey:
        _users_only(info.context.session.principal)
        key_id = decode_id(id, "ApiKey")
        async with change(info) as w:
            row, revoked = await revoke_key(w.conn, w.tenant_id, key_id)
            if revoked:
                await _audit(w, "revoke", "ApiKey", row.id, {"after": _key_summary(row)})
        return ApiKey.from_row(row)

    @strawberry.mutation(**requires(MANAGE, "Add a manifest's documents to a client's trusted documents, after "
                                            "validating each against the schema (one invalid document refuses the "
                                            "whole push). `manifest` is an Apollo persisted-query manifest or a "
                                            "`{id: document}` map. Documents missing from the manifest are kept: "
                                            "remove them explicitly."))
    async def push_persisted_documents(self, info: Info, client: str, manifest: JSON) -> PushPersistedDocumentsPayload:
        principal = info.context.session.principal
        name = client_name(client)
        _own_client(principal, name)
        operations = read_manifest(manifest)
        async with change(info) as w:
            result = await push_documents(w.conn, w.tenant_id, name, info.schema._schema, operations,
                                          w.principal.user_id)
            for row in result.added:
                await _audit(w, "create", "PersistedDocument", row.id,
                             {"after": {"client": name, "documentId": row.document_id, "sha256": row.sha256}})
        return PushPersistedDocumentsPayload(client=name, added=[PersistedDocument.from_row(r) for r in result.added],
                                             unchanged_count=len(result.unchanged))

    @strawberry.mutation(**requires(MANAGE, "Remove documents from a client's trusted documents, by manifest id."))
    async def remove_persisted_documents(self, info: Info, client: str,
                                         ids: list[str]) -> RemovePersistedDocumentsPayload:
        principal = info.context.session.principal
        name = client_name(client)
        _own_client(principal, name)
        for index, document_id in enumerate(ids):
            if not DOCUMENT_ID.match(document_id):
                raise BadUserInput(f"ids.{index}", "an id is 1-200 letters, digits or ._~:-")
        async with change(info) as w:
            removed = await remove_documents(w.conn, w.tenant_id, name, ids)
            for row in removed:
                await _audit(w, "delete", "PersistedDocument", row.id,
                             {"before": {"client": name, "documentId": row.document_id, "sha256": row.sha256}})
        gone = {r.document_id for r in removed}
        return RemovePersistedDocumentsPayload(client=name, removed_ids=sorted(gone),
                                               missing_ids=sorted(set(ids) - gone))
