"""The audit log: every change, newest first, readable by admins and owners."""

from __future__ import annotations

import strawberry
from sqlalchemy import select

from auth.roles import Can, Permission
from core.ids import parse_global_id
from models.tables import AUDIT_EVENTS
from resolvers.connections import paginate
from resolvers.paging import SortKey, parse_datetime
from schema.types import AuditEvent, Connection, Info

OCCURRED = SortKey("occurredAt", AUDIT_EVENTS.c.occurred_at, parse_datetime, lambda r: r.occurred_at)


@strawberry.type
class AuditQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ_AUDIT)],
                      description="Audit events, newest first; `entityId` narrows to one record's history.")
    async def audit_events(
        self, info: Info, entity_id: strawberry.ID | None = None,
        first: int | None = None, after: str | None = None, last: int | None = None, before: str | None = None,
    ) -> Connection[AuditEvent]:
        principal, db, _ = info.context.require()
        query = select(AUDIT_EVENTS).where(AUDIT_EVENTS.c.tenant_id == principal.tenant_id)
        if entity_id is not None:
            type_name, key = parse_global_id(entity_id, field="entityId")
            query = query.where(AUDIT_EVENTS.c.entity_type == type_name, AUDIT_EVENTS.c.entity_id == key)
        return await paginate(db, query, AUDIT_EVENTS.c.id, OCCURRED, AuditEvent.from_row, descending=True,
                              first=first, after=after, last=last, before=before,
                              max_page=info.context.settings.max_page_size)
