"""Object types of live updates: change events, resyncs, note updates, presence and live totals."""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Annotated, Any

import strawberry
from strawberry.scalars import Base64

from auth.session import Info
from records.crm import ACTIVITY, BY_NAME, DEAL, USER
from records.declare import Record
from schema.crm import Activity, Deal, StageTotal, User
from schema.objects import Node, load
from subscriptions.events import ChangeKind
from subscriptions.presence import PresenceState

strawberry.enum(ChangeKind, name="ChangeKind")
strawberry.enum(PresenceState, name="PresenceState")


@strawberry.enum
class ResyncReason(enum.Enum):
    SUBSCRIBED = "SUBSCRIBED"
    GAP = "GAP"


@strawberry.type(description=(
    "Events before this point may be missing from this stream: fetch the current state now. Sent first "
    "on every event stream (SUBSCRIBED: the stream is live, nothing after this is missed) and whenever "
    "the server's own event feed had a gap (GAP), e.g. after losing Redis for a while."))
class Resync:
    reason: ResyncReason
    timestamp: dt.datetime


@strawberry.enum(description="A change that moved the record in or out of the trash.")
class TrashAction(enum.Enum):
    TRASHED = "trashed"
    """Deleted into the trash (kind DELETED): restoreX brings it back."""
    RESTORED = "restored"
    """Back from the trash (kind CREATED)."""


@strawberry.type
class ChangeFields:
    """What every change event says besides the record (shared by the *Change types)."""

    kind: ChangeKind
    record_id: strawberry.ID
    record_type: str = strawberry.field(description="The record's GraphQL type name (`Deal`, `Company`...).")
    changed_fields: list[str] = strawberry.field(description="GraphQL names of the fields that changed.")
    version: int = strawberry.field(description="The record's version after the change.")
    timestamp: dt.datetime = strawberry.field(description="When the change's transaction committed.")
    actor_id: strawberry.Private[uuid.UUID | None]
    record_key: strawberry.Private[uuid.UUID]
    custom_keys: strawberry.Private[tuple[str, ...]] = ()
    """The custom fields whose values changed (``ChangeEvent.custom_keys``)."""
    trash: TrashAction | None = strawberry.field(
        default=None, description="TRASHED for a delete into the trash (kind DELETED), RESTORED for a restore "
                                  "from it (kind CREATED); null otherwise.")

    @strawberry.field(description="Who made the change.")
    async def actor(self, info: Info) -> User | None:
        return await load(info, USER, self.actor_id)  # type: ignore[no-any-return]


def current(record: Record | None, description: str) -> Any:
    """The changed record as the subscriber may read it now (through the event's session); null when
    it was deleted. ``record`` None: whatever record type the event names."""

    async def resolve(self: ChangeFields, info: Info) -> Any:
        if self.kind is ChangeKind.DELETED:
            return None
        return await load(info, record or BY_NAME[self.record_type], self.record_key)

    return strawberry.field(resolver=resolve, description=description)


@strawberry.type(description="A change of one record of any type.")
class RecordChange(ChangeFields):
    record: Node | None = current(None, "The record as you may read it now; null when DELETED.")


@strawberry.type(description="A deal created, moved, updated or deleted on a board.")
class DealChange(ChangeFields):
    record: Deal | None = current(DEAL, "The deal as you may read it now; null when DELETED.")


@strawberry.type(description="An activity created, updated or deleted.")
class ActivityChange(ChangeFields):
    record: Activity | None = current(ACTIVITY, "The activity as you may read it now; null when DELETED.")


@strawberry.type(description="Another editor's change to a note: apply `update` to your Yjs document.")
class NoteUpdate:
    note_id: strawberry.ID
    update: Base64 = strawberry.field(description="A Yjs update (`Y.applyUpdate(doc, update)`), base64.")
    version: int = strawberry.field(description="The note's version after this update.")
    origin: str | None = strawberry.field(description="The `origin` the editor sent with the update.")
    timestamp: dt.datetime = strawberry.field(description="When the update's transaction committed.")
    actor_id: strawberry.Private[uuid.UUID | None]

    @strawberry.field(description="Who wrote the update.")
    async def author(self, info: Info) -> User | None:
        return await load(info, USER, self.actor_id)  # type: ignore[no-any-return]


@strawberry.type
class PresenceUser:
    state: PresenceState
    since: dt.datetime
    user_id: strawberry.Private[uuid.UUID]

    @strawberry.field
    async def user(self, info: Info) -> User | None:
        return await load(info, USER, self.user_id)  # type: ignore[no-any-return]


@strawberry.type(description="Everyone viewing or editing a record now, longest present first.")
class PresenceList:
    record_id: strawberry.ID
    users: list[PresenceUser]
    timestamp: dt.datetime


@strawberry.type(description="Live totals of a pipeline (the same numbers as `Query.pipelineSummary`).")
class PipelineTotals:
    pipeline_id: strawberry.ID
    totals: list[StageTotal]
    timestamp: dt.datetime


RecordEvent = Annotated[RecordChange | Resync, strawberry.union("RecordEvent")]
DealBoardEvent = Annotated[DealChange | Resync, strawberry.union("DealBoardEvent")]
ActivityFeedEvent = Annotated[ActivityChange | Resync, strawberry.union("ActivityFeedEvent")]
NoteEvent = Annotated[NoteUpdate | Resync, strawberry.union("NoteEvent")]
