"""What the trash shows: a record deleted on its own (with what went along), when, by whom, until when."""

from __future__ import annotations

import datetime as dt
import uuid

import strawberry

from auth.session import Info
from records.crm import USER
from schema.crm import User
from schema.objects import Node, load


@strawberry.type(description="A record in the trash, deleted on its own: restoring it brings back what went with "
                             "it (records that went along are not listed themselves).")
class TrashedRecord:
    record: Node = strawberry.field(description="The record as it was deleted (its links to records in the "
                                                "trash read as null).")
    deleted_at: dt.datetime
    purge_after: dt.datetime = strawberry.field(
        description="From then on a purge removes it for good (deletedAt plus the workspace's trash retention).")
    deleted_by_id: strawberry.Private[uuid.UUID | None]

    @strawberry.field(description="Who deleted it (null once they have left the workspace).")
    async def deleted_by(self, info: Info) -> User | None:
        return await load(info, USER, self.deleted_by_id)  # type: ignore[no-any-return]


@strawberry.type
class PurgePayload:
    purged: int = strawberry.field(description="Records removed for good (with what went to the trash with them).")
    kept: int = strawberry.field(description="Records past retention that could not go yet: something outside the "
                                             "trash still needs them.")
