"""The audit log: every change, newest first, readable by admins and owners."""

from __future__ import annotations

import strawberry
from sqlalchemy import select

from auth.roles import Permission, requires
from auth.session import Info
from core.ids import parse_global_id
from models.tables import AUDIT_EVENTS
from records.declare import Sort
from resolvers.paging import paginate
from schema.crm import AuditEvent
from schema.pagination import Connection

OCCURRED = Sort("OCCURRED_AT", "occurred_at").key(AUDIT_EVENTS)


@strawberry.type
class AuditQuery:
    @strawberry.field(**requires(Permission.READ_AUDIT,
                                 "Audit events, newest first; `entityId` narrows to one record's history."))
    async def audit_events(
        self, info: Info, entity_id: strawberry.ID | None = None,
        first: int | None = None, after: str | None = None, last: int | None = None, before: str | None = None,
    ) -> Connection[AuditEvent]:
        session = info.context.session
        query = select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == session.tenant_id)
        if entity_id is not None:
            type_name, key = parse_global_id(entity_id, field="entityId")
            query = query.where(AUDIT_EVENTS.c.entity_type == type_name, AUDIT_EVENTS.c.entity_id == key)
        return await paginate(session.db, query, AUDIT_EVENTS.c.id, OCCURRED, AuditEvent.from_row, descending=True,
                              first=first, after=after, last=last, before=before,
                              max_page=info.context.settings.max_page_size)
