"""Collaborative notes: CRDT documents on a deal, contact or company (``subscriptions.notes`` merges).

``applyNoteUpdate`` merges a Yjs update into the stored document under ``SELECT ... FOR UPDATE``,
so concurrent editors serialise on the row and every update is integrated into the latest state;
the compacted document is stored, the audit row records the update itself (not the document), and
the change event carries the update (base64) and its ``origin`` to ``noteUpdates`` subscribers.
"""

from __future__ import annotations

import base64

import strawberry
from sqlalchemy import select
from strawberry.scalars import Base64

from auth.roles import requires
from auth.session import Info
from core.errors import BadUserInput
from core.ids import decode_id, parse_global_id
from records.crm import NOTE
from resolvers import crud
from resolvers.writes import change
from schema.notes import Note
from subscriptions.notes import InvalidUpdate, merge

NOTES = NOTE.table
MAX_ORIGIN = 100
MAX_NOTES = 100


@strawberry.type
class NoteQuery:
    note = crud.get_field(NOTE)

    @strawberry.field(**requires(NOTE.access.read, "Notes of a deal, contact or company, oldest first (at most 100)."))
    async def notes(self, info: Info, record_id: strawberry.ID) -> list[Note]:
        session = info.context.session
        type_name, key = parse_global_id(record_id, field="recordId")
        parent = next((r for r in NOTE.relations if r.target().name == type_name), None)
        if parent is None:
            raise BadUserInput("recordId", "notes belong to a Deal, Contact or Company")
        rows = await session.db.fetch(select(NOTES).where(NOTES.c.tenant_id == session.tenant_id,
                                                          NOTES.c[parent.key] == key, *NOTE.visible(NOTES))
                                      .order_by(NOTES.c.created_at, NOTES.c.id).limit(MAX_NOTES))
        return [Note.from_row(r) for r in rows]


@strawberry.type
class NoteMutation:
    create_note = crud.create_field(NOTE)

    @strawberry.mutation(**requires(NOTE.access.update,
                                    "Merge a Yjs update into a note. `origin` (e.g. your client id) is echoed "
                                    "to noteUpdates subscribers so that an editor can skip its own updates."))
    async def apply_note_update(self, info: Info, note_id: strawberry.ID, update: Base64,
                                origin: str | None = None) -> Note:
        key = decode_id(note_id, "Note", field="noteId")
        if origin is not None and len(origin) > MAX_ORIGIN:
            raise BadUserInput("origin", f"must be at most {MAX_ORIGIN} characters")
        if origin is not None and "\x00" in origin:
            raise BadUserInput("origin", "must not contain NUL characters")
        async with change(info) as w:
            before = await w.require(NOTE, key, field="noteId", lock=True)
            try:
                merged = merge(bytes(before.state), bytes(update))
            except InvalidUpdate as exc:
                raise BadUserInput("update", str(exc)) from None
            row = await w.update(NOTE, key, {"state": merged}, None,
                                 detail={"update": base64.b64encode(update).decode(), "origin": origin})
        return Note.from_row(row)
