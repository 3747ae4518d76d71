"""The audit log: every change, newest first, readable by admins and owners; its hash chain's verification."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import strawberry
from sqlalchemy import select

from auth.roles import Permission, requires
from auth.session import Info
from core.ids import parse_global_id, to_global_id
from models.audit_chain import Verification, verify_chain
from models.tables import AUDIT_EVENTS
from records.custom import hidden_key, rule_name
from records.declare import Sort, camel
from resolvers.paging import paginate
from schema.crm import AuditChainBreak, AuditChainVerification, AuditEvent
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
        def build(row: Any) -> AuditEvent:
            event = AuditEvent.from_row(row)
            event.diff = redacted(event.diff, session.hidden(row.entity_type))
            return event

        return await paginate(session.db, query, AUDIT_EVENTS.c.id, OCCURRED, build, descending=True,
                              first=first, after=after, last=last, before=before,
                              max_page=info.context.settings.max_page_size)

    @strawberry.field(**requires(Permission.READ_AUDIT,
                                 "Verify the workspace's audit hash chain: every event's hash recomputed from "
                                 "its content and linked to the one before, from the anchor to the head; "
                                 "reports the first broken link."))
    async def audit_chain(self, info: Info) -> AuditChainVerification:
        session = info.context.session
        async with info.context.databases.tenant_transaction(session.tenant_id, isolation="REPEATABLE READ") as conn:
            found = await verify_chain(conn, session.tenant_id)
        return verification_object(found)


def redacted(diff: Any, hidden: Collection[str]) -> Any:
    """An audit diff as a role may read it: the before/after values of the fields hidden from it
    (``auth.fields``; diffs name columns) null, and their API names listed under ``hidden``; inside
    ``custom_fields`` (an object of key -> value), the values of the custom fields hidden from it
    null, listed as ``custom.<key>``."""
    if not hidden or not isinstance(diff, dict):
        return diff
    out = dict(diff)
    names: set[str] = set()
    for side in ("before", "after"):
        values = diff.get(side)
        if isinstance(values, dict):
            out[side] = {k: None if camel(k) in hidden else v for k, v in values.items()}
            names.update(camel(k) for k in values if camel(k) in hidden)
            custom = out[side].get("custom_fields")
            if isinstance(custom, dict):
                out[side]["custom_fields"] = {k: None if hidden_key(k, hidden) else v for k, v in custom.items()}
                names.update(rule_name(k) for k in custom if hidden_key(k, hidden))
    if names:
        out["hidden"] = sorted(names)
    return out


def verification_object(found: Verification) -> AuditChainVerification:
    broken = found.broken
    return AuditChainVerification(
        ok=found.ok, checked=found.checked, first_seq=found.first_seq, last_seq=found.last_seq,
        head_seq=found.head_seq, head_hash=found.head_hash.hex(), anchor_seq=found.anchor_seq,
        broken=None if broken is None else AuditChainBreak(
            seq=broken.seq, reason=broken.reason,
            event_id=None if broken.event_id is None else strawberry.ID(to_global_id("AuditEvent", broken.event_id))))
