"""The webhook API's root fields, for admins (``webhooks:manage``).

Endpoints are registered, changed and removed by members signed in (an API key cannot manage
webhooks: a leaked key must not be able to send the workspace's data elsewhere), each change one
tenant transaction with its audit row. Webhooks are not available yet for workspaces with a
dedicated database (dispatchers look for work in the shared one).
"""

from __future__ import annotations

import uuid
from typing import Any

import strawberry
from strawberry.types.unset import UNSET

from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput, Forbidden
from core.ids import decode_id
from models.tables import WEBHOOK_DELIVERIES
from records.declare import Sort
from resolvers.paging import paginate
from resolvers.writes import Change, change
from schema.crm import DeletePayload
from schema.pagination import Connection
from webhooks.catalog import event_types
from webhooks.endpoints import (
    EndpointSpec,
    create_endpoint,
    delete_endpoint,
    deliveries_query,
    endpoints_query,
    replay,
    require_endpoint,
    rotate_secret,
    update_endpoint,
)
from webhooks.types import (
    CreatedWebhookEndpoint,
    WebhookDelivery,
    WebhookDeliveryStatus,
    WebhookEndpoint,
    WebhookEndpointInput,
    WebhookEndpointPatch,
    WebhookEventType,
)

MANAGE = Permission.MANAGE_WEBHOOKS
CREATED = Sort("CREATED_AT", "created_at").key(WEBHOOK_DELIVERIES)


def summary(row: Any) -> dict[str, Any]:
    """An endpoint in its audit rows (never its secret)."""
    return {"url": row.url, "eventTypes": list(row.event_types), "filter": row.filter,
            "description": row.description, "enabled": row.enabled}


async def _members_of_shared_workspaces(info: Info) -> None:
    session = info.context.session
    if session.principal.api_key_id is not None:
        raise Forbidden("API keys cannot manage webhooks: sign in as a member")
    databases = info.context.databases
    if await databases.engine_for(session.tenant_id) is not databases.default:
        raise Forbidden("Webhooks are not available yet for workspaces with a dedicated database")


async def _audit(w: Change, action: str, endpoint_id: uuid.UUID, diff: dict[str, Any]) -> None:
    await w.audit("WebhookEndpoint", action, endpoint_id, diff)


@strawberry.type
class WebhookQuery:
    @strawberry.field(**requires(MANAGE, "Every event type an endpoint may ask for."))
    def webhook_event_types(self, info: Info) -> list[WebhookEventType]:
        return [WebhookEventType(name=t.name, description=t.description,
                                 record_type=t.record.name if t.record else None) for t in event_types()]

    @strawberry.field(**requires(MANAGE, "The workspace's webhook endpoints, oldest first."))
    async def webhook_endpoints(self, info: Info) -> list[WebhookEndpoint]:
        session = info.context.session
        return [WebhookEndpoint.from_row(r) for r in await session.db.fetch(endpoints_query(session.tenant_id))]

    @strawberry.field(**requires(MANAGE, "An endpoint's deliveries, newest first (optionally of some statuses)."))
    async def webhook_deliveries(
        self, info: Info, endpoint_id: strawberry.ID, status: list[WebhookDeliveryStatus] | None = None,
        first: int | None = None, after: str | None = None, last: int | None = None, before: str | None = None,
    ) -> Connection[WebhookDelivery]:
        session = info.context.session
        endpoint = decode_id(endpoint_id, "WebhookEndpoint", field="endpointId")
        query = deliveries_query(session.tenant_id, endpoint, [s.value for s in status] if status else None)
        return await paginate(session.db, query, WEBHOOK_DELIVERIES.c.id, CREATED, WebhookDelivery.from_row,
                              descending=True, first=first, after=after, last=last, before=before,
                              max_page=info.context.settings.max_page_size)


@strawberry.type
class WebhookMutation:
    @strawberry.mutation(**requires(MANAGE, "Register an endpoint. The answer holds its signing secret; it "
                                            "cannot be shown again."))
    async def create_webhook_endpoint(self, info: Info, input: WebhookEndpointInput) -> CreatedWebhookEndpoint:
        await _members_of_shared_workspaces(info)
        settings = info.context.settings
        spec = await EndpointSpec(input.url, input.event_types, input.filter, input.description).checked(settings)
        async with change(info) as w:
            row, secret = await create_endpoint(w.conn, w.tenant_id, spec, w.user_id, settings)
            await _audit(w, "create", row.id, {"after": summary(row)})
        return CreatedWebhookEndpoint(endpoint=WebhookEndpoint.from_row(row), secret=secret)

    @strawberry.mutation(**requires(MANAGE, "Change an endpoint; `enabled: true` resumes one that was disabled."))
    async def update_webhook_endpoint(self, info: Info, id: strawberry.ID, input: WebhookEndpointPatch,
                                      expected_version: int | None = None) -> WebhookEndpoint:
        await _members_of_shared_workspaces(info)
        key = decode_id(id, "WebhookEndpoint")
        changes = {name: value for name, value in vars(input).items() if value is not UNSET}
        for name in ("url", "event_types", "enabled"):
            if name in changes and changes[name] is None:
                raise BadUserInput(f"input.{'eventTypes' if name == 'event_types' else name}", "must not be null")
        async with change(info) as w:
            before, after = await update_endpoint(w.conn, w.tenant_id, key, changes, expected_version,
                                                  info.context.settings)
            if after is not before:
                await _audit(w, "update", key, {"before": summary(before), "after": summary(after)})
        return WebhookEndpoint.from_row(after)

    @strawberry.mutation(**requires(MANAGE, "Give an endpoint a new signing secret (shown only in the answer); "
                                            "the old one signs nothing more."))
    async def rotate_webhook_endpoint_secret(self, info: Info, id: strawberry.ID) -> CreatedWebhookEndpoint:
        await _members_of_shared_workspaces(info)
        key = decode_id(id, "WebhookEndpoint")
        async with change(info) as w:
            row, secret = await rotate_secret(w.conn, w.tenant_id, key, info.context.settings)
            await _audit(w, "rotate", key, {"after": {"version": row.version}})
        return CreatedWebhookEndpoint(endpoint=WebhookEndpoint.from_row(row), secret=secret)

    @strawberry.mutation(**requires(MANAGE, "Delete an endpoint and its deliveries."))
    async def delete_webhook_endpoint(self, info: Info, id: strawberry.ID) -> DeletePayload:
        await _members_of_shared_workspaces(info)
        key = decode_id(id, "WebhookEndpoint")
        async with change(info) as w:
            before = await delete_endpoint(w.conn, w.tenant_id, key)
            await _audit(w, "delete", key, {"before": summary(before)})
        return DeletePayload(deleted_id=id)

    @strawberry.mutation(**requires(MANAGE, "Send a delivery's message again (same webhook-id and body) as a new "
                                            "delivery, after the endpoint's earlier ones of the same record."))
    async def replay_webhook_delivery(self, info: Info, id: strawberry.ID) -> WebhookDelivery:
        await _members_of_shared_workspaces(info)
        key = decode_id(id, "WebhookDelivery")
        async with change(info) as w:
            row = await replay(w.conn, w.tenant_id, key)
            endpoint = await require_endpoint(w.conn, w.tenant_id, row.endpoint_id)
            await _audit(w, "replay", endpoint.id, {"after": {"delivery": str(row.id), "replayOf": str(key)}})
        return WebhookDelivery.from_row(row)
