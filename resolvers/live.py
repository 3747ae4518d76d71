"""The Subscription root: record changes, deal boards, live pipeline totals, activities, presence, notes.

Every subscription field checks READ permission and that what it names exists *in the caller's
tenant* (through the loaders, so another tenant's id gives NOT_FOUND exactly like a query), then
subscribes to channels named from the principal's tenant only.

Contract with the transport (``atrium.http.websocket``): each operation runs with a context of its
own, so these generators replace ``context.db`` / ``context.loaders`` with a fresh ``TenantScope`` for
every delivered event and close it once the event's selection has been resolved (when the generator
resumes). Between events no database connection is held.

Event streams (``recordChanged``, ``dealBoard``, ``activityFeed``, ``noteUpdates``) start with a
``Resync`` (reason SUBSCRIBED) sent once the broker subscription is live, and send another (GAP)
when the server's feed had a gap: clients (re)fetch on either. ``pipelineSummary`` and
``presence`` stream full states instead, the current one first. A subscriber too slow to keep up
gets an error coded SUBSCRIBER_TOO_SLOW and the stream ends.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import strawberry

from auth.roles import Permission, allows, requires
from auth.session import Info, Session, event_session
from core.errors import BadUserInput, Forbidden, NotFound, SubscriberTooSlow
from core.ids import decode_id, parse_global_id, to_global_id
from records.crm import BY_NAME, NOTE
from records.custom import hidden_key
from records.declare import Record, camel
from resolvers.deals import require_pipeline, stage_totals
from schema.live import (
    ActivityChange,
    ActivityFeedEvent,
    ChangeFields,
    DealBoardEvent,
    DealChange,
    NoteEvent,
    NoteUpdate,
    PipelineTotals,
    PresenceList,
    PresenceUser,
    RecordChange,
    RecordEvent,
    Resync,
    ResyncReason,
    TrashAction,
)
from schema.objects import RecordObject, load
from subscriptions.broker import GAP, OVERFLOW
from subscriptions.events import (
    DELIVERY,
    ChangeEvent,
    Delivery,
    presence_channel,
    record_channel,
    scope_channel,
    type_channel,
)
from subscriptions.presence import PresenceState

T = TypeVar("T")

SUMMARY_WINDOW = 0.25
"""Seconds of deal changes coalesced into one ``pipelineSummary`` recalculation."""
STATE = {DELIVERY: Delivery.STATE}
PRIVATE_STATE = {DELIVERY: Delivery.PRIVATE_STATE}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def existing_record(info: Info, global_id: str, *, field: str) -> tuple[Record, uuid.UUID]:
    """The record type and key of a record the caller can read; NOT_FOUND otherwise."""
    type_name, key = parse_global_id(global_id, field=field)
    if RecordObject.type_named(type_name) is None or await load(info, BY_NAME[type_name], key) is None:
        raise NotFound(type_name.lower(), key, field=field)
    return BY_NAME[type_name], key


def change_fields(event: ChangeEvent) -> dict[str, Any]:
    return {
        "kind": event.kind, "record_id": strawberry.ID(to_global_id(event.entity_type, event.entity_id)),
        "record_type": event.entity_type, "changed_fields": list(event.fields), "version": event.version,
        "timestamp": event.committed_at or event.occurred_at, "actor_id": event.actor_id,
        "record_key": event.entity_id,
        "trash": TrashAction(trash) if (trash := event.detail.get("trash")) else None,
        "custom_keys": event.custom_keys,
    }


async def changes(info: Info, channel: str, build: Callable[[ChangeEvent], T | None]) -> AsyncGenerator[T | Resync]:
    """``Resync(SUBSCRIBED)``, then ``build(event)`` for each change on ``channel`` of a record the
    subscriber may see (None: skipped)."""
    context = info.context
    view = context.session.principal.view
    async with context.broker.subscribe(channel) as queue:
        async with event_session(context):
            yield Resync(reason=ResyncReason.SUBSCRIBED, timestamp=now())
        while True:
            item = await queue.get()
            payload: T | Resync | None
            if item is OVERFLOW:
                raise SubscriberTooSlow()
            if item is GAP:
                payload = Resync(reason=ResyncReason.GAP, timestamp=now())
            elif isinstance(item, ChangeEvent):
                # A record the subscriber may not see sends nothing (record-level visibility).
                payload = build(item) if view.sees(item.entity_type, item.owner_id) else None
            else:
                payload = None
            if payload is not None:
                async with event_session(context) as session:
                    yield without_hidden(payload, session)


def without_hidden(payload: T | Resync, session: Session) -> T | Resync:
    """A change as a subscriber may see it: the fields hidden from its role (``auth.fields``, read
    for this event) left out of ``changedFields`` (the record itself reads them as null, FORBIDDEN),
    ``customFields`` too when every custom field that changed is hidden from it."""
    if isinstance(payload, ChangeFields) and (hidden := session.hidden(payload.record_type)):
        shown = [name for name in payload.changed_fields if name not in hidden]
        if CUSTOM_FIELDS in shown and payload.custom_keys and all(
                hidden_key(key, hidden) for key in payload.custom_keys):
            shown.remove(CUSTOM_FIELDS)
        payload.changed_fields = shown
    return payload


CUSTOM_FIELDS = camel("custom_fields")
"""A change event's name of a change of custom field values."""


def drain(queue: asyncio.Queue[object]) -> None:
    """Drop what is queued: the caller recomputes a full state, which covers all of it (an
    overflow included: state streams lose nothing by dropping events)."""
    while not queue.empty():
        queue.get_nowait()


@strawberry.type
class LiveSubscription:
    @strawberry.subscription(**requires(Permission.READ,
                                        "Changes of one record of any type (NOT_FOUND unless you can read it)."))
    async def record_changed(self, info: Info, id: strawberry.ID) -> AsyncGenerator[RecordEvent]:
        tenant = info.context.session.tenant_id
        _, key = await existing_record(info, id, field="id")

        def build(event: ChangeEvent) -> RecordChange:
            return RecordChange(**change_fields(event))

        async with aclosing(changes(info, record_channel(tenant, key), build)) as stream:
            async for item in stream:
                yield item

    @strawberry.subscription(**requires(Permission.READ,
                                        "Deals created, moved, updated or deleted in a pipeline (a deal "
                                        "moved to another pipeline is sent to both boards)."))
    async def deal_board(self, info: Info, pipeline_id: strawberry.ID) -> AsyncGenerator[DealBoardEvent]:
        tenant = info.context.session.tenant_id
        pipeline = await require_pipeline(info, pipeline_id)

        def build(event: ChangeEvent) -> DealChange | None:
            return DealChange(**change_fields(event)) if event.entity_type == "Deal" else None

        channel = scope_channel(tenant, "pipeline", str(pipeline))
        async with aclosing(changes(info, channel, build)) as stream:
            async for item in stream:
                yield item

    @strawberry.subscription(**requires(Permission.READ,
                                        "Activities created, updated or deleted anywhere in the workspace."))
    async def activity_feed(self, info: Info) -> AsyncGenerator[ActivityFeedEvent]:
        tenant = info.context.session.tenant_id

        def build(event: ChangeEvent) -> ActivityChange:
            return ActivityChange(**change_fields(event))

        async with aclosing(changes(info, type_channel(tenant, "Activity"), build)) as stream:
            async for item in stream:
                yield item

    @strawberry.subscription(**requires(Permission.READ,
                                        "Other editors' updates of a note. Updates sent with the same "
                                        "`origin` as given here are left out (your own echo)."))
    async def note_updates(self, info: Info, note_id: strawberry.ID,
                           origin: str | None = None) -> AsyncGenerator[NoteEvent]:
        tenant = info.context.session.tenant_id
        key = decode_id(note_id, "Note", field="noteId")
        if await load(info, NOTE, key) is None:
            raise NotFound("note", key, field="noteId")

        def build(event: ChangeEvent) -> NoteUpdate | None:
            update = event.detail.get("update")
            if event.entity_type != "Note" or not isinstance(update, str):
                return None
            if origin is not None and event.detail.get("origin") == origin:
                return None
            return NoteUpdate(note_id=note_id, update=base64.b64decode(update),  # type: ignore[arg-type]
                              version=event.version, origin=event.detail.get("origin"),
                              timestamp=event.committed_at or event.occurred_at, actor_id=event.actor_id)

        async with aclosing(changes(info, record_channel(tenant, key), build)) as stream:
            async for item in stream:
                yield item

    @strawberry.subscription(**requires(Permission.READ,
                                        "Totals per stage and currency: now, then after each burst of "
                                        "changes (coalesced over a quarter second)."), metadata=STATE)
    async def pipeline_summary(self, info: Info, pipeline_id: strawberry.ID) -> AsyncGenerator[PipelineTotals]:
        tenant = info.context.session.tenant_id
        pipeline = await require_pipeline(info, pipeline_id)
        channel = scope_channel(tenant, "pipeline", str(pipeline))
        async with info.context.broker.subscribe(channel) as queue:
            while True:
                async with event_session(info.context):
                    # The same function as Query.pipelineSummary, so live and queried totals never differ.
                    totals = await stage_totals(info, pipeline)
                    yield PipelineTotals(pipeline_id=pipeline_id, totals=totals, timestamp=now())
                if await queue.get() not in (GAP, OVERFLOW):
                    await asyncio.sleep(SUMMARY_WINDOW)  # the coalescing window, not a wait for a condition
                drain(queue)

    @strawberry.subscription(**requires(Permission.READ,
                                        "Who is viewing or editing a record. Subscribing joins you as VIEWING "
                                        "(setPresence changes it); ending the subscription or the connection "
                                        "leaves."), metadata=PRIVATE_STATE)
    async def presence(self, info: Info, record_id: strawberry.ID) -> AsyncGenerator[PresenceList]:
        principal = info.context.session.principal
        _, key = await existing_record(info, record_id, field="recordId")
        tenant, registry = principal.tenant_id, info.context.broker.presence
        async with info.context.broker.subscribe(presence_channel(tenant, key)) as queue:
            session = await registry.join(tenant, key, principal.user_id)
            try:
                last: list[tuple[uuid.UUID, PresenceState, float]] | None = None
                while True:
                    members = await registry.members(tenant, key)
                    current = [(m.user_id, m.state, m.since) for m in members]
                    if current != last:
                        last = current
                        async with event_session(info.context):
                            yield presence_list(record_id, current)
                    await queue.get()
                    drain(queue)  # PresenceChanged, GAP or OVERFLOW: one re-read covers everything queued
            finally:
                await registry.leave(tenant, key, session)


def presence_list(record_id: str, members: list[tuple[uuid.UUID, PresenceState, float]]) -> PresenceList:
    return PresenceList(
        record_id=strawberry.ID(record_id), timestamp=now(),
        users=[PresenceUser(state=state, since=dt.datetime.fromtimestamp(since, dt.UTC), user_id=user)
               for user, state, since in members],
    )


@strawberry.type
class LiveMutation:
    @strawberry.mutation(**requires(Permission.READ,
                                    "Say whether you are VIEWING or EDITING a record you are present on (through "
                                    "the presence subscription). EDITING needs write permission."))
    async def set_presence(self, info: Info, record_id: strawberry.ID, state: PresenceState) -> PresenceList:
        principal = info.context.session.principal
        if state is PresenceState.EDITING and not allows(principal.role, Permission.WRITE):
            raise Forbidden(f"Your role ({principal.role.value}) does not have {Permission.WRITE.value}")
        _, key = await existing_record(info, record_id, field="recordId")
        registry = info.context.broker.presence
        if not await registry.set_state(principal.tenant_id, key, principal.user_id, state):
            raise BadUserInput("recordId", "you are not present on this record: subscribe to presence(recordId) first")
        members = await registry.members(principal.tenant_id, key)
        return presence_list(record_id, [(m.user_id, m.state, m.since) for m in members])
