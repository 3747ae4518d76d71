"""Activities: notes, calls, emails, meetings and tasks on a deal, contact or company."""

from __future__ import annotations

import uuid

import strawberry
from sqlalchemy import Select, select

from auth.roles import Can, Permission
from core.errors import BadUserInput
from core.ids import decode_id
from models.tables import ACTIVITIES, ActivityKind
from resolvers.connections import paginate
from resolvers.entities import ACTIVITY, COMPANY, CONTACT, DEAL
from resolvers.paging import SortKey, parse_datetime
from resolvers.writes import change
from schema.enums import OrderDirection
from schema.inputs import ActivityFilter, ActivityInput, ActivityOrder, ActivityOrderField, ActivityPatch
from schema.types import Activity, Connection, DeletePayload, Info

SORT_KEYS = {
    ActivityOrderField.OCCURRED_AT: SortKey("occurredAt", ACTIVITIES.c.occurred_at, parse_datetime,
                                            lambda r: r.occurred_at),
}


def filtered(tenant_id: uuid.UUID, f: ActivityFilter | None) -> Select[tuple[object, ...]]:
    query = select(ACTIVITIES).where(ACTIVITIES.c.tenant_id == tenant_id)
    if f is None:
        return query
    if f.kind:
        query = query.where(ACTIVITIES.c.kind.in_([ActivityKind(k).value for k in f.kind]))
    for column, name, type_name in (("deal_id", "dealId", "Deal"), ("contact_id", "contactId", "Contact"),
                                    ("company_id", "companyId", "Company")):
        value = getattr(f, column)
        if value is not None:
            query = query.where(ACTIVITIES.c[column] == decode_id(value, type_name, field=f"filter.{name}"))
    if f.done is not None:
        query = query.where(ACTIVITIES.c.done == f.done)
    if f.due_before is not None:
        query = query.where(ACTIVITIES.c.due_date < f.due_before)
    return query


@strawberry.type
class ActivityQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def activities(
        self, info: Info, filter: ActivityFilter | None = None, order_by: ActivityOrder | None = None,
        first: int | None = None, after: str | None = None, last: int | None = None, before: str | None = None,
    ) -> Connection[Activity]:
        principal, db, _ = info.context.require()
        order = order_by or ActivityOrder()
        return await paginate(
            db, filtered(principal.tenant_id, filter), ACTIVITIES.c.id, SORT_KEYS[order.field], Activity.from_row,
            descending=order.direction == OrderDirection.DESC, first=first, after=after, last=last,
            before=before, max_page=info.context.settings.max_page_size,
        )


@strawberry.type
class ActivityMutation:
    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def create_activity(self, info: Info, input: ActivityInput) -> Activity:
        values = input.values()
        async with change(info, Permission.WRITE) as w:
            for column, entity, name in (("deal_id", DEAL, "dealId"), ("contact_id", CONTACT, "contactId"),
                                         ("company_id", COMPANY, "companyId")):
                if values[column] is not None:
                    await w.require(entity, values[column], field=name)
            row = await w.insert(ACTIVITY, {**values, "actor_id": w.principal.user_id})
        return Activity.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def update_activity(self, info: Info, id: strawberry.ID, input: ActivityPatch,
                              expected_version: int | None = None) -> Activity:
        activity_id = decode_id(id, "Activity")
        changes = input.changes()
        async with change(info, Permission.WRITE) as w:
            if changes.get("due_date") is not None:
                current = await w.require(ACTIVITY, activity_id)
                if current.kind != ActivityKind.TASK.value:
                    raise BadUserInput("dueDate", "only tasks have a due date")
            row = await w.update(ACTIVITY, activity_id, changes, expected_version)
        return Activity.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.DELETE)])
    async def delete_activity(self, info: Info, id: strawberry.ID,
                              expected_version: int | None = None) -> DeletePayload:
        activity_id = decode_id(id, "Activity")
        async with change(info, Permission.DELETE) as w:
            await w.delete(ACTIVITY, activity_id, expected_version)
        return DeletePayload(deleted_id=id)
