"""Deals: their derived CRUD fields, moving a deal between stages, and the pipeline summary."""

from __future__ import annotations

import uuid
from decimal import Decimal

import strawberry
from sqlalchemy import func, select

from auth.roles import requires
from auth.session import Info
from core.errors import HiddenField, NotFound
from core.ids import decode_id
from records.crm import DEAL, PIPELINE, STAGE
from resolvers import crud
from resolvers.aggregates import aggregate_field
from resolvers.writes import change
from schema.crm import Deal, Stage, StageTotal

DEALS = DEAL.table


async def require_pipeline(info: Info, pipeline_id: strawberry.ID) -> uuid.UUID:
    """The pipeline behind ``pipeline_id`` if the caller's tenant has it; NOT_FOUND naming pipelineId."""
    pipeline = decode_id(pipeline_id, "Pipeline", field="pipelineId")
    if await info.context.session.loaders.one(PIPELINE).load(pipeline) is None:
        raise NotFound("pipeline", pipeline, field="pipelineId")
    return pipeline


async def stage_totals(info: Info, pipeline: uuid.UUID) -> list[StageTotal]:
    """Deal count, total and weighted total per stage and currency of ``pipeline`` (deals in the trash
    left out), in board order (what both ``Query.pipelineSummary`` and the live ``pipelineSummary`` report)."""
    session = info.context.session
    if (amount := DEAL.field("amount").name) in session.hidden(DEAL.name):
        # Totals of amounts tell amounts: FORBIDDEN to a role the amount is hidden from (auth.fields).
        raise HiddenField("pipelineId", DEAL.name, amount, session.principal.role.value)
    rows = await session.db.fetch(
        select(DEALS.c.stage_id, DEALS.c.currency, func.count().label("deals"),
               func.sum(DEALS.c.amount).label("total"))
        .where(DEALS.c.tenant_id == session.tenant_id, DEALS.c.pipeline_id == pipeline, *DEAL.visible(DEALS))
        .group_by(DEALS.c.stage_id, DEALS.c.currency)
    )
    stages = await session.loaders.one(STAGE).load_many([r.stage_id for r in rows])
    totals = [
        StageTotal(stage=Stage.from_row(stage), currency=r.currency, count=r.deals, total=r.total,
                   weighted_total=(r.total * stage.probability).quantize(Decimal("0.01")))
        for r, stage in zip(rows, stages, strict=True) if stage is not None
    ]
    return sorted(totals, key=lambda t: (t.stage.position, t.currency))


@strawberry.type
class DealQuery:
    deals = crud.list_field(DEAL)
    deal = crud.get_field(DEAL)
    deals_aggregate = aggregate_field(DEAL, crud.filter_type(DEAL))

    @strawberry.field(**requires(DEAL.access.read, "Deal count and amount per stage and currency (every status)."))
    async def pipeline_summary(self, info: Info, pipeline_id: strawberry.ID) -> list[StageTotal]:
        return await stage_totals(info, await require_pipeline(info, pipeline_id))


@strawberry.type
class DealMutation:
    create_deal = crud.create_field(DEAL)
    update_deal = crud.update_field(DEAL)

    @strawberry.mutation(**requires(DEAL.access.update, "Move a deal to another stage (of any pipeline)."))
    async def move_deal(self, info: Info, id: strawberry.ID, stage_id: strawberry.ID,
                        expected_version: int | None = None) -> Deal:
        deal_id = decode_id(id, "Deal")
        target = decode_id(stage_id, "Stage", field="stageId")
        async with change(info) as w:
            row = await w.update(DEAL, deal_id, {"stage_id": target}, expected_version)
        return Deal.from_row(row)

    delete_deal = crud.delete_field(DEAL)
    restore_deal = crud.restore_field(DEAL)
