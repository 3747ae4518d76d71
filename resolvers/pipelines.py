"""Pipelines and their ordered stages."""

from __future__ import annotations

import strawberry
from sqlalchemy import func, select

from auth.roles import Can, Permission
from core.errors import BadUserInput
from core.ids import decode_id
from models.tables import DEALS, PIPELINES, STAGES
from resolvers.entities import PIPELINE, STAGE
from resolvers.writes import change
from schema.inputs import PipelineInput, PipelinePatch, StageInput, StagePatch
from schema.types import DeletePayload, Info, Pipeline, Stage


@strawberry.type
class PipelineQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ)], description="All pipelines, by name.")
    async def pipelines(self, info: Info) -> list[Pipeline]:
        principal, db, _ = info.context.require()
        rows = await db.fetch(select(PIPELINES).where(PIPELINES.c.tenant_id == principal.tenant_id)
                              .order_by(PIPELINES.c.name, PIPELINES.c.id).limit(500))
        return [Pipeline.from_row(r) for r in rows]

    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def pipeline(self, info: Info, id: strawberry.ID) -> Pipeline | None:
        row = await info.context.require()[2].pipeline.load(decode_id(id, "Pipeline"))
        return Pipeline.from_row(row) if row else None


@strawberry.type
class PipelineMutation:
    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)],
                         description="Create a pipeline with its stages in the given order.")
    async def create_pipeline(self, info: Info, input: PipelineInput) -> Pipeline:
        values = input.values()
        stages = [s.values(f"stages.{i}.") for i, s in enumerate(input.stages)]
        async with change(info, Permission.WRITE) as w:
            row = await w.insert(PIPELINE, values)
            for position, stage in enumerate(stages):
                await w.insert(STAGE, {"position": position, **stage, "pipeline_id": row.id})
        return Pipeline.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def update_pipeline(self, info: Info, id: strawberry.ID, input: PipelinePatch,
                              expected_version: int | None = None) -> Pipeline:
        pipeline_id = decode_id(id, "Pipeline")
        changes = input.changes()
        async with change(info, Permission.WRITE) as w:
            row = await w.update(PIPELINE, pipeline_id, changes, expected_version)
        return Pipeline.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.DELETE)],
                         description="Delete an empty pipeline (with its stages); fails while it has deals.")
    async def delete_pipeline(self, info: Info, id: strawberry.ID,
                              expected_version: int | None = None) -> DeletePayload:
        pipeline_id = decode_id(id, "Pipeline")
        async with change(info, Permission.DELETE) as w:
            await w.require(PIPELINE, pipeline_id, lock=True)
            in_use = (await w.conn.execute(select(DEALS.c.id).where(
                DEALS.c.tenant_id == w.tenant_id, DEALS.c.pipeline_id == pipeline_id).limit(1))).first()
            if in_use is not None:
                raise BadUserInput("id", "this pipeline still has deals; move or delete them first")
            await w.delete_where(STAGE, STAGES.c.pipeline_id == pipeline_id)
            await w.delete(PIPELINE, pipeline_id, expected_version)
        return DeletePayload(deleted_id=id)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)],
                         description="Add a stage; without a position it goes last.")
    async def create_stage(self, info: Info, pipeline_id: strawberry.ID, input: StageInput) -> Stage:
        pipeline = decode_id(pipeline_id, "Pipeline", field="pipelineId")
        values = input.values()
        async with change(info, Permission.WRITE) as w:
            await w.require(PIPELINE, pipeline, field="pipelineId", lock=True)
            if "position" not in values:
                last = (await w.conn.execute(
                    select(func.coalesce(func.max(STAGES.c.position) + 1, 0))
                    .where(STAGES.c.tenant_id == w.tenant_id, STAGES.c.pipeline_id == pipeline))).scalar_one()
                values["position"] = last
            row = await w.insert(STAGE, {**values, "pipeline_id": pipeline})
        return Stage.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)])
    async def update_stage(self, info: Info, id: strawberry.ID, input: StagePatch,
                           expected_version: int | None = None) -> Stage:
        stage_id = decode_id(id, "Stage")
        changes = input.changes()
        async with change(info, Permission.WRITE) as w:
            row = await w.update(STAGE, stage_id, changes, expected_version)
        return Stage.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.DELETE)],
                         description="Delete a stage that holds no deals.")
    async def delete_stage(self, info: Info, id: strawberry.ID, expected_version: int | None = None) -> DeletePayload:
        stage_id = decode_id(id, "Stage")
        async with change(info, Permission.DELETE) as w:
            await w.delete(STAGE, stage_id, expected_version)
        return DeletePayload(deleted_id=id)
