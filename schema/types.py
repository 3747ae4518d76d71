"""Every GraphQL object type. Scalars are plain attributes (fast); relations read loaders.

Each type keeps the foreign keys it needs as ``strawberry.Private`` and is built from a row with
``from_row``. A relation never runs its own query: it asks ``info.context.loaders``.

A ``Deal`` may also carry its relations already loaded (``prefetched``, filled by
``resolvers.prefetch.prefetch_relations`` for a page or list of deals): its relation fields then answer
synchronously. That matters because graphql-core pays for every awaitable field (a coroutine, and a
task per list item): on the 50-deal dashboard, 250 awaited relations cost more than the ~1,500
plain fields around them.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import field as dataclass_field
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

import strawberry
from sqlalchemy import Row
from strawberry.scalars import JSON, Base64

from auth.context import Context
from core.errors import BadUserInput
from core.ids import to_global_id
from models.tables import ActivityKind, DealStatus, Plan, Role
from resolvers.loaders import Loaders
from subscriptions.events import ChangeKind
from subscriptions.notes import BODY as NOTE_BODY
from subscriptions.notes import text_of as note_text
from subscriptions.presence import PresenceState

Info = strawberry.Info[Context, None]
T = TypeVar("T")

NESTED_MAX = 50
ACTIVITIES_FIRST = 10
"""Default ``first`` of ``Deal.activities``."""


def loaders(info: Info) -> Loaders:
    """The request's loaders (types are reachable only through authenticated roots)."""
    return info.context.require()[2]


async def one(info: Info, loader: str, key: uuid.UUID | None, build: Callable[[Row[Any]], T]) -> T | None:
    """A to-one relation through the request's loader ``loader``; None without a key or a row."""
    if key is None:
        return None
    row = await getattr(loaders(info), loader).load(key)
    return build(row) if row else None


async def deal_list(info: Info, loader: str, parent_id: uuid.UUID, first: int) -> list[Deal]:
    """The deals of one parent (newest first), with what the query selects on them loaded ahead."""
    # resolvers.prefetch builds these types, so it is imported when first needed, not at import time.
    from resolvers.prefetch import prefetch_relations

    rows = await loaders(info).children(loader, _limit(first)).load(parent_id)
    deals = [Deal.from_row(r) for r in rows]
    await prefetch_relations(info, deals, path=())
    return deals


async def activities_of_deal(info: Info, deal_id: uuid.UUID, first: int) -> list[Activity]:
    rows = await loaders(info).children("activities_of_deal", _limit(first)).load(deal_id)
    return [Activity.from_row(r) for r in rows]


def _limit(first: int, field: str = "first") -> int:
    if not 0 <= first <= NESTED_MAX:
        raise BadUserInput(field, f"must be between 0 and {NESTED_MAX}")
    return first


@strawberry.interface(description="An object with a globally unique, opaque ID.")
class Node:
    id: strawberry.ID


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


@strawberry.type
class Edge(Generic[T]):
    cursor: str
    node: T


@strawberry.type
class Connection(Generic[T]):
    edges: list[Edge[T]]
    page_info: PageInfo
    count_rows: strawberry.Private[Callable[[], Awaitable[int]]]

    @strawberry.field(description="Rows matching the filter, ignoring paging (one extra statement).")
    async def total_count(self) -> int:
        return await self.count_rows()

    @strawberry.field(description="The nodes of `edges`, for clients that do not need cursors.")
    def nodes(self) -> list[T]:
        return [edge.node for edge in self.edges]


@strawberry.type
class Tenant(Node):
    slug: str
    name: str
    plan: Plan
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> Tenant:
        return cls(id=strawberry.ID(to_global_id("Tenant", row.id)), slug=row.slug, name=row.name,
                   plan=Plan(row.plan), created_at=row.created_at)


@strawberry.type(description="A person who belongs to this workspace, with their role in it.")
class User(Node):
    email: str
    name: str
    role: Role
    uuid: strawberry.Private[uuid.UUID]

    @classmethod
    def from_row(cls, row: Row[Any]) -> User:
        return cls(id=strawberry.ID(to_global_id("User", row.id)), email=row.email, name=row.name,
                   role=Role(row.role), uuid=row.id)


@strawberry.type
class Company(Node):
    name: str
    domain: str | None
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    uuid: strawberry.Private[uuid.UUID]

    @classmethod
    def from_row(cls, row: Row[Any]) -> Company:
        return cls(id=strawberry.ID(to_global_id("Company", row.id)), name=row.name, domain=row.domain,
                   version=row.version, created_at=row.created_at, updated_at=row.updated_at, uuid=row.id)

    @strawberry.field
    async def contacts(self, info: Info, first: int = 20) -> list[Contact]:
        rows = await loaders(info).children("contacts_of_company", _limit(first)).load(self.uuid)
        return [Contact.from_row(r) for r in rows]

    @strawberry.field
    async def deals(self, info: Info, first: int = 20) -> list[Deal]:
        return await deal_list(info, "deals_of_company", self.uuid, first)

    @strawberry.field(description="Latest activities first.")
    async def activities(self, info: Info, first: int = 10) -> list[Activity]:
        rows = await loaders(info).children("activities_of_company", _limit(first)).load(self.uuid)
        return [Activity.from_row(r) for r in rows]


@strawberry.type
class Contact(Node):
    first_name: str
    last_name: str
    email: str | None
    phone: str | None
    title: str | None
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    uuid: strawberry.Private[uuid.UUID]
    company_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def from_row(cls, row: Row[Any]) -> Contact:
        return cls(id=strawberry.ID(to_global_id("Contact", row.id)), first_name=row.first_name,
                   last_name=row.last_name, email=row.email, phone=row.phone, title=row.title,
                   version=row.version, created_at=row.created_at, updated_at=row.updated_at,
                   uuid=row.id, company_id=row.company_id)

    @strawberry.field
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"

    @strawberry.field
    async def company(self, info: Info) -> Company | None:
        return await one(info, "company", self.company_id, Company.from_row)

    @strawberry.field
    async def deals(self, info: Info, first: int = 20) -> list[Deal]:
        return await deal_list(info, "deals_of_contact", self.uuid, first)

    @strawberry.field(description="Latest activities first.")
    async def activities(self, info: Info, first: int = 10) -> list[Activity]:
        rows = await loaders(info).children("activities_of_contact", _limit(first)).load(self.uuid)
        return [Activity.from_row(r) for r in rows]


@strawberry.type
class Pipeline(Node):
    name: str
    version: int
    created_at: dt.datetime
    uuid: strawberry.Private[uuid.UUID]

    @classmethod
    def from_row(cls, row: Row[Any]) -> Pipeline:
        return cls(id=strawberry.ID(to_global_id("Pipeline", row.id)), name=row.name, version=row.version,
                   created_at=row.created_at, uuid=row.id)

    @strawberry.field(description="Stages in board order.")
    async def stages(self, info: Info) -> list[Stage]:
        rows = await loaders(info).stages_of_pipeline.load(self.uuid)
        return [Stage.from_row(r) for r in rows]


@strawberry.type
class Stage(Node):
    name: str
    position: int
    probability: Decimal = strawberry.field(description="Win probability between 0 and 1.")
    version: int
    uuid: strawberry.Private[uuid.UUID]
    pipeline_id: strawberry.Private[uuid.UUID]

    @classmethod
    def from_row(cls, row: Row[Any]) -> Stage:
        return cls(id=strawberry.ID(to_global_id("Stage", row.id)), name=row.name, position=row.position,
                   probability=row.probability, version=row.version, uuid=row.id, pipeline_id=row.pipeline_id)

    @strawberry.field
    async def pipeline(self, info: Info) -> Pipeline:
        row = await loaders(info).pipeline.load(self.pipeline_id)
        return Pipeline.from_row(row)

    @strawberry.field(description="Newest deals first.")
    async def deals(self, info: Info, first: int = 20) -> list[Deal]:
        return await deal_list(info, "deals_of_stage", self.uuid, first)


@strawberry.type
class Activity(Node):
    kind: ActivityKind
    subject: str
    body: str | None
    occurred_at: dt.datetime
    due_date: dt.date | None = strawberry.field(description="Tasks only.")
    done: bool
    version: int
    created_at: dt.datetime
    uuid: strawberry.Private[uuid.UUID]
    deal_id: strawberry.Private[uuid.UUID | None]
    contact_id: strawberry.Private[uuid.UUID | None]
    company_id: strawberry.Private[uuid.UUID | None]
    actor_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def from_row(cls, row: Row[Any]) -> Activity:
        return cls(id=strawberry.ID(to_global_id("Activity", row.id)), kind=ActivityKind(row.kind),
                   subject=row.subject, body=row.body, occurred_at=row.occurred_at, due_date=row.due_date,
                   done=row.done, version=row.version, created_at=row.created_at, uuid=row.id,
                   deal_id=row.deal_id, contact_id=row.contact_id, company_id=row.company_id, actor_id=row.actor_id)

    @strawberry.field
    async def deal(self, info: Info) -> Deal | None:
        return await one(info, "deal", self.deal_id, Deal.from_row)

    @strawberry.field
    async def contact(self, info: Info) -> Contact | None:
        return await one(info, "contact", self.contact_id, Contact.from_row)

    @strawberry.field
    async def company(self, info: Info) -> Company | None:
        return await one(info, "company", self.company_id, Company.from_row)

    @strawberry.field
    async def actor(self, info: Info) -> User | None:
        return await one(info, "user", self.actor_id, User.from_row)


@strawberry.type
class Deal(Node):
    title: str
    amount: Decimal
    currency: str = strawberry.field(description="ISO 4217 code of `amount`.")
    status: DealStatus
    expected_close_date: dt.date | None
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    uuid: strawberry.Private[uuid.UUID]
    stage_id: strawberry.Private[uuid.UUID]
    pipeline_id: strawberry.Private[uuid.UUID]
    company_id: strawberry.Private[uuid.UUID | None]
    contact_id: strawberry.Private[uuid.UUID | None]
    owner_id: strawberry.Private[uuid.UUID | None]
    prefetched: strawberry.Private[dict[Hashable, Any]] = dataclass_field(default_factory=dict)
    """Relations loaded ahead (field name, or ``("activities", first)``) -> their value."""

    @classmethod
    def from_row(cls, row: Row[Any]) -> Deal:
        return cls(id=strawberry.ID(to_global_id("Deal", row.id)), title=row.title, amount=row.amount,
                   currency=row.currency, status=DealStatus(row.status), expected_close_date=row.expected_close_date,
                   version=row.version, created_at=row.created_at, updated_at=row.updated_at, uuid=row.id,
                   stage_id=row.stage_id, pipeline_id=row.pipeline_id, company_id=row.company_id,
                   contact_id=row.contact_id, owner_id=row.owner_id)

    def _related(self, name: Hashable, load: Callable[[], Awaitable[T]]) -> T | Awaitable[T]:
        """The prefetched value of relation ``name``, else ``load()`` (awaited by the executor)."""
        if name in self.prefetched:
            return self.prefetched[name]  # type: ignore[no-any-return]
        return load()

    @strawberry.field(graphql_type=Stage)
    def stage(self, info: Info) -> Stage | Awaitable[Stage]:
        return self._related("stage", lambda: one(info, "stage", self.stage_id, Stage.from_row))

    @strawberry.field(graphql_type=Pipeline)
    def pipeline(self, info: Info) -> Pipeline | Awaitable[Pipeline]:
        return self._related("pipeline", lambda: one(info, "pipeline", self.pipeline_id, Pipeline.from_row))

    @strawberry.field(graphql_type=Company | None)
    def company(self, info: Info) -> Company | Awaitable[Company | None] | None:
        return self._related("company", lambda: one(info, "company", self.company_id, Company.from_row))

    @strawberry.field(graphql_type=Contact | None, description="The primary contact.")
    def contact(self, info: Info) -> Contact | Awaitable[Contact | None] | None:
        return self._related("contact", lambda: one(info, "contact", self.contact_id, Contact.from_row))

    @strawberry.field(graphql_type=User | None)
    def owner(self, info: Info) -> User | Awaitable[User | None] | None:
        return self._related("owner", lambda: one(info, "user", self.owner_id, User.from_row))

    @strawberry.field(graphql_type=list[Activity], description="Latest activities first.")
    def activities(self, info: Info, first: int = ACTIVITIES_FIRST) -> list[Activity] | Awaitable[list[Activity]]:
        return self._related(("activities", first), lambda: activities_of_deal(info, self.uuid, first))


@strawberry.type(description="One change of one record, written in the same transaction as the change.")
class AuditEvent:
    id: strawberry.ID
    occurred_at: dt.datetime
    action: str
    entity_type: str
    entity_id: strawberry.ID
    diff: JSON
    request_id: str | None
    actor_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def from_row(cls, row: Row[Any]) -> AuditEvent:
        return cls(id=strawberry.ID(to_global_id("AuditEvent", row.id)), occurred_at=row.occurred_at,
                   action=row.action, entity_type=row.entity_type,
                   entity_id=strawberry.ID(to_global_id(row.entity_type, row.entity_id)), diff=row.diff,
                   request_id=row.request_id, actor_id=row.actor_id)

    @strawberry.field
    async def actor(self, info: Info) -> User | None:
        return await one(info, "user", self.actor_id, User.from_row)


@strawberry.type(description="Deals (of every status) in one stage and one currency.")
class StageTotal:
    stage: Stage
    currency: str
    count: int
    total: Decimal
    weighted_total: Decimal = strawberry.field(description="total x stage win probability.")


@strawberry.type
class DeletePayload:
    deleted_id: strawberry.ID


@strawberry.type
class LoginPayload:
    token: str
    expires_at: dt.datetime
    user: User
    tenant: Tenant


# ---- Partner API: API keys and trusted documents ---------------------------------------------------

@strawberry.type(description="An API key of this workspace. Its secret is shown once, when it is created.")
class ApiKey:
    id: strawberry.ID
    name: str
    prefix: str = strawberry.field(description="The public part of the key: `atr_<prefix>_<secret>`.")
    role: Role = strawberry.field(description="The key's role (never above its creator's current role).")
    persisted_only: bool = strawberry.field(description="The key may run trusted documents only.")
    client: str | None = strawberry.field(description="The manifest client whose documents the key may run.")
    expires_at: dt.datetime | None
    last_used_at: dt.datetime | None = strawberry.field(description="Recorded at most once a minute.")
    revoked_at: dt.datetime | None
    created_at: dt.datetime
    created_by_id: strawberry.Private[uuid.UUID]

    @classmethod
    def from_row(cls, row: Row[Any]) -> ApiKey:
        return cls(id=strawberry.ID(to_global_id("ApiKey", row.id)), name=row.name, prefix=row.prefix,
                   role=Role(row.role), persisted_only=row.persisted_only, client=row.client,
                   expires_at=row.expires_at, last_used_at=row.last_used_at, revoked_at=row.revoked_at,
                   created_at=row.created_at, created_by_id=row.created_by)

    @strawberry.field(description="The member the key acts for; null once they have left the workspace.")
    async def created_by(self, info: Info) -> User | None:
        row = await loaders(info).user.load(self.created_by_id)
        return User.from_row(row) if row else None


@strawberry.type
class CreatedApiKey:
    api_key: ApiKey
    secret: str = strawberry.field(description="The whole key, to send as `Authorization: Bearer <secret>` or "
                                               "`X-API-Key`. It is shown only here: store it now.")


@strawberry.input
class CreateApiKeyInput:
    name: str
    role: Role = strawberry.field(description="At most your own role.")
    expires_at: dt.datetime | None = None
    persisted_only: bool = strawberry.field(default=False,
                                            description="Refuse anything but the trusted documents of `client`.")
    client: str | None = strawberry.field(default=None, description="Restrict the key to this client's documents.")


@strawberry.type(description="A trusted document (one operation) of a client's manifest.")
class PersistedDocument:
    id: strawberry.ID
    client: str
    document_id: str = strawberry.field(description="The manifest's id; also callable as `sha256:<sha256>`.")
    sha256: str
    name: str | None
    operation_type: str = strawberry.field(description="query, mutation or subscription.")
    body: str
    created_at: dt.datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> PersistedDocument:
        return cls(id=strawberry.ID(to_global_id("PersistedDocument", row.id)), client=row.client,
                   document_id=row.document_id, sha256=row.sha256, name=row.name,
                   operation_type=row.operation_type, body=row.body, created_at=row.created_at)


@strawberry.type
class PushPersistedDocumentsPayload:
    client: str
    added: list[PersistedDocument] = strawberry.field(description="Documents new to the client.")
    unchanged_count: int = strawberry.field(description="Documents the client already had, with the same text.")


@strawberry.type
class RemovePersistedDocumentsPayload:
    client: str
    removed_ids: list[str]
    missing_ids: list[str] = strawberry.field(description="Ids the client did not have.")


# --- Live updates (subscriptions) ---------------------------------------------------------------

strawberry.enum(ChangeKind, name="ChangeKind")
strawberry.enum(PresenceState, name="PresenceState")


@strawberry.type(description="A collaborative note on a deal, contact or company: a Yjs document.")
class Note(Node):
    version: int = strawberry.field(description="Number of updates merged so far, plus one.")
    created_at: dt.datetime
    updated_at: dt.datetime
    state: Base64 = strawberry.field(description=(
        "The whole document as one Yjs update (`Y.applyUpdate(doc, state)`), base64."))
    uuid: strawberry.Private[uuid.UUID]
    deal_id: strawberry.Private[uuid.UUID | None]
    contact_id: strawberry.Private[uuid.UUID | None]
    company_id: strawberry.Private[uuid.UUID | None]

    @classmethod
    def from_row(cls, row: Row[Any]) -> Note:
        return cls(id=strawberry.ID(to_global_id("Note", row.id)), version=row.version, created_at=row.created_at,
                   updated_at=row.updated_at, state=Base64(bytes(row.state)), uuid=row.id, deal_id=row.deal_id,
                   contact_id=row.contact_id, company_id=row.company_id)

    @strawberry.field(description=f"Plain text of the document's shared `Y.Text` named \"{NOTE_BODY}\".")
    def text(self) -> str:
        return note_text(self.state)

    @strawberry.field
    async def deal(self, info: Info) -> Deal | None:
        return await one(info, "deal", self.deal_id, Deal.from_row)

    @strawberry.field
    async def contact(self, info: Info) -> Contact | None:
        return await one(info, "contact", self.contact_id, Contact.from_row)

    @strawberry.field
    async def company(self, info: Info) -> Company | None:
        return await one(info, "company", self.company_id, Company.from_row)


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
    record_uuid: strawberry.Private[uuid.UUID]

    @strawberry.field(description="Who made the change.")
    async def actor(self, info: Info) -> User | None:
        return await one(info, "user", self.actor_id, User.from_row)


@strawberry.type(description="A change of one record of any type.")
class RecordChange(ChangeFields):
    fetch: strawberry.Private[Callable[[Loaders], Awaitable[Node | None]]]

    @strawberry.field(description="The record as you may read it now; null when DELETED.")
    async def record(self, info: Info) -> Node | None:
        if self.kind is ChangeKind.DELETED:
            return None
        return await self.fetch(loaders(info))


@strawberry.type(description="A deal created, moved, updated or deleted on a board.")
class DealChange(ChangeFields):
    @strawberry.field(description="The deal as you may read it now; null when DELETED.")
    async def record(self, info: Info) -> Deal | None:
        if self.kind is ChangeKind.DELETED:
            return None
        row = await loaders(info).deal.load(self.record_uuid)
        return Deal.from_row(row) if row else None


@strawberry.type(description="An activity created, updated or deleted.")
class ActivityChange(ChangeFields):
    @strawberry.field(description="The activity as you may read it now; null when DELETED.")
    async def record(self, info: Info) -> Activity | None:
        if self.kind is ChangeKind.DELETED:
            return None
        row = await loaders(info).activity.load(self.record_uuid)
        return Activity.from_row(row) if row else None


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
        return await one(info, "user", self.actor_id, User.from_row)


@strawberry.type
class PresenceUser:
    state: PresenceState
    since: dt.datetime
    user_id: strawberry.Private[uuid.UUID]

    @strawberry.field
    async def user(self, info: Info) -> User | None:
        row = await loaders(info).user.load(self.user_id)
        return User.from_row(row) if row else None


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
