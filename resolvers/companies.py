"""Companies."""

from __future__ import annotations

import uuid

import strawberry
from sqlalchemy import Select, or_, select

from auth.roles import Can, Permission
from core.ids import decode_id
from models.tables import COMPANIES
from resolvers.connections import paginate
from resolvers.entities import COMPANY
from resolvers.links import release
from resolvers.paging import SortKey, parse_datetime
from resolvers.search import contains
from resolvers.writes import change
from schema.enums import OrderDirection
from schema.inputs import CompanyFilter, CompanyInput, CompanyOrder, CompanyOrderField, CompanyPatch, text
from schema.types import Company, Connection, DeletePayload, Info

SORT_KEYS = {
    CompanyOrderField.NAME: SortKey("name", COMPANIES.c.name, str, lambda r: r.name),
    CompanyOrderField.CREATED_AT: SortKey("createdAt", COMPANIES.c.created_at, parse_datetime, lambda r: r.created_at),
}


def filtered(tenant_id: uuid.UUID, f: CompanyFilter | None) -> Select[tuple[object, ...]]:
    query = select(COMPANIES).where(COMPANIES.c.tenant_id == tenant_id)
    if f is not None and f.search is not None and f.search.strip():
        term = text("filter.search", f.search, 100)
        query = query.where(or_(contains(COMPANIES.c.name, term), contains(COMPANIES.c.domain, term)))
    return query


@strawberry.type
class CompanyQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def companies(
        self, info: Info, filter: CompanyFilter | None = None, order_by: CompanyOrder | None = None,
        first: int | None = None, after: str | None = None, last: int | None = None, before: str | None = None,
    ) -> Connection[Company]:
        principal, db, _ = info.context.require()
        order = order_by or CompanyOrder()
        return await paginate(
            db, filtered(principal.tenant_id, filter), COMPANIES.c.id, SORT_KEYS[order.field], Company.from_row,
            descending=order.direction == OrderDirection.DESC, first=first, after=after, last=last,
            before=before, max_page=info.context.settings.max_page_size,
        )

    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def company(self, info: Info, id: strawberry.ID) -> Company | None:
        row = await info.context.require()[2].company.load(decode_id(id, "Company"))
        return Company.from_row(row) if row else None


@strawberry.type
class CompanyMutation:
    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def create_company(self, info: Info, input: CompanyInput) -> Company:
        values = input.values()
        async with change(info, Permission.WRITE) as w:
            row = await w.insert(COMPANY, values)
        return Company.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def update_company(self, info: Info, id: strawberry.ID, input: CompanyPatch,
                             expected_version: int | None = None) -> Company:
        company_id = decode_id(id, "Company")
        changes = input.changes()
        async with change(info, Permission.WRITE) as w:
            row = await w.update(COMPANY, company_id, changes, expected_version)
        return Company.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.DELETE)],
                         description="Deletes the company and its activities; its contacts and deals are kept, "
                                     "unlinked.")
    async def delete_company(self, info: Info, id: strawberry.ID,
                             expected_version: int | None = None) -> DeletePayload:
        company_id = decode_id(id, "Company")
        async with change(info, Permission.DELETE) as w:
            await w.require(COMPANY, company_id, lock=True)
            await release(w, "company_id", company_id)
            await w.delete(COMPANY, company_id, expected_version)
        return DeletePayload(deleted_id=id)
