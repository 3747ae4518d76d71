"""Contacts."""

from __future__ import annotations

import uuid

import strawberry
from sqlalchemy import Select, or_, select

from auth.roles import Can, Permission
from core.ids import decode_id
from models.tables import CONTACTS
from resolvers.connections import paginate
from resolvers.entities import COMPANY, CONTACT
from resolvers.links import release
from resolvers.paging import SortKey, parse_datetime
from resolvers.search import contains
from resolvers.writes import change
from schema.enums import OrderDirection
from schema.inputs import ContactFilter, ContactInput, ContactOrder, ContactOrderField, ContactPatch, text
from schema.types import Connection, Contact, DeletePayload, Info

SORT_KEYS = {
    ContactOrderField.LAST_NAME: SortKey("lastName", CONTACTS.c.last_name, str, lambda r: r.last_name),
    ContactOrderField.CREATED_AT: SortKey("createdAt", CONTACTS.c.created_at, parse_datetime, lambda r: r.created_at),
}


def filtered(tenant_id: uuid.UUID, f: ContactFilter | None) -> Select[tuple[object, ...]]:
    query = select(CONTACTS).where(CONTACTS.c.tenant_id == tenant_id)
    if f is None:
        return query
    if f.company_id is not None:
        query = query.where(CONTACTS.c.company_id == decode_id(f.company_id, "Company", field="filter.companyId"))
    if f.search is not None and f.search.strip():
        term = text("filter.search", f.search, 100)
        query = query.where(or_(contains(CONTACTS.c.first_name, term), contains(CONTACTS.c.last_name, term),
                                contains(CONTACTS.c.email, term)))
    return query


@strawberry.type
class ContactQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def contacts(
        self, info: Info, filter: ContactFilter | None = None, order_by: ContactOrder | None = None,
        first: int | None = None, after: str | None = None, last: int | None = None, before: str | None = None,
    ) -> Connection[Contact]:
        principal, db, _ = info.context.require()
        order = order_by or ContactOrder()
        return await paginate(
            db, filtered(principal.tenant_id, filter), CONTACTS.c.id, SORT_KEYS[order.field], Contact.from_row,
            descending=order.direction == OrderDirection.DESC, first=first, after=after, last=last,
            before=before, max_page=info.context.settings.max_page_size,
        )

    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def contact(self, info: Info, id: strawberry.ID) -> Contact | None:
        row = await info.context.require()[2].contact.load(decode_id(id, "Contact"))
        return Contact.from_row(row) if row else None


@strawberry.type
class ContactMutation:
    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def create_contact(self, info: Info, input: ContactInput) -> Contact:
        values = input.values()
        async with change(info, Permission.WRITE) as w:
            if values["company_id"] is not None:
                await w.require(COMPANY, values["company_id"], field="companyId")
            row = await w.insert(CONTACT, values)
        return Contact.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def update_contact(self, info: Info, id: strawberry.ID, input: ContactPatch,
                             expected_version: int | None = None) -> Contact:
        contact_id = decode_id(id, "Contact")
        changes = input.changes()
        async with change(info, Permission.WRITE) as w:
            if changes.get("company_id") is not None:
                await w.require(COMPANY, changes["company_id"], field="companyId")
            row = await w.update(CONTACT, contact_id, changes, expected_version)
        return Contact.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.DELETE)])
    async def delete_contact(self, info: Info, id: strawberry.ID,
                             expected_version: int | None = None) -> DeletePayload:
        contact_id = decode_id(id, "Contact")
        async with change(info, Permission.DELETE) as w:
            await w.require(CONTACT, contact_id, lock=True)
            await release(w, "contact_id", contact_id)
            await w.delete(CONTACT, contact_id, expected_version)
        return DeletePayload(deleted_id=id)
