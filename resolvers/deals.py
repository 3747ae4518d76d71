"""Deals: the board's records. Queries page with keyset cursors; writes go through ``writes``."""

from __future__ import annotations

import uuid
from decimal import Decimal

import strawberry
from sqlalchemy import Select, func, literal_column, or_, select

from auth.roles import Can, Permission
from core.errors import BadUserInput, NotFound
from core.ids import decode_id
from models.tables import COMPANIES, CONTACTS, DEALS
from resolvers.connections import paginate
from resolvers.entities import COMPANY, CONTACT, DEAL, STAGE
from resolvers.links import release
from resolvers.paging import SortKey, parse_date, parse_datetime, parse_decimal
from resolvers.prefetch import prefetch_relations
from resolvers.search import contains
from resolvers.writes import Change, change
from schema.enums import OrderDirection
from schema.inputs import DealFilter, DealInput, DealOrder, DealOrderField, DealPatch, currency, text
from schema.types import Connection, Deal, DeletePayload, Info, Stage, StageTotal

CLOSE_DATE = func.coalesce(DEALS.c.expected_close_date, literal_column("'infinity'::date"))
SORT_KEYS = {
    DealOrderField.CREATED_AT: SortKey("createdAt", DEALS.c.created_at, parse_datetime, lambda r: r.created_at),
    DealOrderField.UPDATED_AT: SortKey("updatedAt", DEALS.c.updated_at, parse_datetime, lambda r: r.updated_at),
    DealOrderField.AMOUNT: SortKey("amount", DEALS.c.amount, parse_decimal, lambda r: r.amount),
    DealOrderField.TITLE: SortKey("title", DEALS.c.title, str, lambda r: r.title),
    DealOrderField.EXPECTED_CLOSE_DATE: SortKey("closeDate", CLOSE_DATE, parse_date, lambda r: r.close_sort),
}


def filtered(tenant_id: uuid.UUID, f: DealFilter | None) -> Select[tuple[object, ...]]:
    """Deals of ``tenant_id`` matching ``f`` (every filter combined with AND)."""
    query = select(DEALS, CLOSE_DATE.label("close_sort")).where(DEALS.c.tenant_id == tenant_id)
    if f is None:
        return query
    ids = (("pipeline_id", "pipelineId", "Pipeline"), ("stage_id", "stageId", "Stage"),
           ("owner_id", "ownerId", "User"), ("company_id", "companyId", "Company"),
           ("contact_id", "contactId", "Contact"))
    for column, name, type_name in ids:
        value = getattr(f, column)
        if value is not None:
            query = query.where(DEALS.c[column] == decode_id(value, type_name, field=f"filter.{name}"))
    if f.status:
        query = query.where(DEALS.c.status.in_([s.value for s in f.status]))
    if f.amount_min is not None and f.amount_max is not None and f.amount_min > f.amount_max:
        raise BadUserInput("filter.amountMin", "must not exceed amountMax")
    if f.amount_min is not None:
        query = query.where(DEALS.c.amount >= f.amount_min)
    if f.amount_max is not None:
        query = query.where(DEALS.c.amount <= f.amount_max)
    if f.currency is not None:
        query = query.where(DEALS.c.currency == currency("filter.currency", f.currency))
    if f.close_date_from and f.close_date_to and f.close_date_from > f.close_date_to:
        raise BadUserInput("filter.closeDateFrom", "must not be after closeDateTo")
    if f.close_date_from is not None:
        query = query.where(DEALS.c.expected_close_date >= f.close_date_from)
    if f.close_date_to is not None:
        query = query.where(DEALS.c.expected_close_date <= f.close_date_to)
    if f.search is not None and f.search.strip():
        term = text("filter.search", f.search, 100)
        company = select(COMPANIES.c.id).where(
            COMPANIES.c.tenant_id == DEALS.c.tenant_id, COMPANIES.c.id == DEALS.c.company_id,
            contains(COMPANIES.c.name, term)).exists()
        contact = select(CONTACTS.c.id).where(
            CONTACTS.c.tenant_id == DEALS.c.tenant_id, CONTACTS.c.id == DEALS.c.contact_id,
            or_(contains(CONTACTS.c.first_name, term), contains(CONTACTS.c.last_name, term),
                contains(CONTACTS.c.email, term))).exists()
        query = query.where(or_(contains(DEALS.c.title, term), company, contact))
    return query


async def require_pipeline(info: Info, pipeline_id: strawberry.ID) -> uuid.UUID:
    """The pipeline behind ``pipeline_id`` if the caller's tenant has it; NOT_FOUND naming pipelineId."""
    pipeline = decode_id(pipeline_id, "Pipeline", field="pipelineId")
    if await info.context.require()[2].pipeline.load(pipeline) is None:
        raise NotFound("pipeline", pipeline, field="pipelineId")
    return pipeline


async def stage_totals(info: Info, pipeline: uuid.UUID) -> list[StageTotal]:
    """Deal count, total and weighted total per stage and currency of ``pipeline``, in board order
    (what both ``Query.pipelineSummary`` and the live ``pipelineSummary`` report)."""
    principal, db, loaders = info.context.require()
    rows = await db.fetch(
        select(DEALS.c.stage_id, DEALS.c.currency, func.count().label("count"),
               func.sum(DEALS.c.amount).label("total"))
        .where(DEALS.c.tenant_id == principal.tenant_id, DEALS.c.pipeline_id == pipeline)
        .group_by(DEALS.c.stage_id, DEALS.c.currency)
    )
    stages = await loaders.stage.load_many([r.stage_id for r in rows])
    totals = [
        StageTotal(stage=Stage.from_row(stage), currency=r.currency, count=r.count, total=r.total,
                   weighted_total=(r.total * stage.probability).quantize(Decimal("0.01")))
        for r, stage in zip(rows, stages, strict=True)
    ]
    return sorted(totals, key=lambda t: (t.stage.position, t.currency))


@strawberry.type
class DealQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def deals(
        self, info: Info, filter: DealFilter | None = None, order_by: DealOrder | None = None,
        first: int | None = None, after: str | None = None, last: int | None = None, before: str | None = None,
    ) -> Connection[Deal]:
        principal, db, _ = info.context.require()
        order = order_by or DealOrder()
        connection = await paginate(
            db, filtered(principal.tenant_id, filter), DEALS.c.id, SORT_KEYS[order.field], Deal.from_row,
            descending=order.direction == OrderDirection.DESC, first=first, after=after, last=last,
            before=before, max_page=info.context.settings.max_page_size,
        )
        await prefetch_relations(info, [edge.node for edge in connection.edges])
        return connection

    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def deal(self, info: Info, id: strawberry.ID) -> Deal | None:
        row = await info.context.require()[2].deal.load(decode_id(id, "Deal"))
        return Deal.from_row(row) if row else None

    @strawberry.field(permission_classes=[Can(Permission.READ)],
                      description="Deal count and amount per stage and currency (every status).")
    async def pipeline_summary(self, info: Info, pipeline_id: strawberry.ID) -> list[StageTotal]:
        return await stage_totals(info, await require_pipeline(info, pipeline_id))


@strawberry.type
class DealMutation:
    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def create_deal(self, info: Info, input: DealInput) -> Deal:
        values = input.values()
        async with change(info, Permission.WRITE) as w:
            stage = await w.require(STAGE, values["stage_id"], field="stageId")
            await _check_links(w, values)
            if values["owner_id"] is None:
                values["owner_id"] = w.principal.user_id
            row = await w.insert(DEAL, {**values, "pipeline_id": stage.pipeline_id})
        return Deal.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def update_deal(self, info: Info, id: strawberry.ID, input: DealPatch,
                          expected_version: int | None = None) -> Deal:
        deal_id = decode_id(id, "Deal")
        changes = input.changes()
        async with change(info, Permission.WRITE) as w:
            await _check_links(w, changes)
            row = await w.update(DEAL, deal_id, changes, expected_version)
        return Deal.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)],
                         description="Move a deal to another stage (of any pipeline).")
    async def move_deal(self, info: Info, id: strawberry.ID, stage_id: strawberry.ID,
                        expected_version: int | None = None) -> Deal:
        deal_id = decode_id(id, "Deal")
        target = decode_id(stage_id, "Stage", field="stageId")
        async with change(info, Permission.WRITE) as w:
            stage = await w.require(STAGE, target, field="stageId")
            row = await w.update(DEAL, deal_id, {"stage_id": stage.id, "pipeline_id": stage.pipeline_id},
                                 expected_version)
        return Deal.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.DELETE)])
    async def delete_deal(self, info: Info, id: strawberry.ID, expected_version: int | None = None) -> DeletePayload:
        deal_id = decode_id(id, "Deal")
        async with change(info, Permission.DELETE) as w:
            await w.require(DEAL, deal_id, lock=True)
            await release(w, "deal_id", deal_id)
            await w.delete(DEAL, deal_id, expected_version)
        return DeletePayload(deleted_id=id)


async def _check_links(w: Change, values: dict[str, object]) -> None:
    """Company, contact and owner named by a deal must exist in the caller's tenant."""
    if isinstance(company := values.get("company_id"), uuid.UUID):
        await w.require(COMPANY, company, field="companyId")
    if isinstance(contact := values.get("contact_id"), uuid.UUID):
        await w.require(CONTACT, contact, field="contactId")
    if isinstance(owner := values.get("owner_id"), uuid.UUID):
        await w.require_member(owner, field="ownerId")

