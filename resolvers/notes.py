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

from auth.roles import Can, Permission
from core.errors import BadUserInput
from core.ids import decode_id, parse_global_id
from models.tables import NOTES
from resolvers.entities import COMPANY, CONTACT, DEAL, NOTE
from resolvers.writes import change
from schema.types import Info, Note
from subscriptions.notes import InvalidUpdate, empty_state, merge

PARENTS = {"Deal": ("deal_id", DEAL, "dealId"), "Contact": ("contact_id", CONTACT, "contactId"),
           "Company": ("company_id", COMPANY, "companyId")}
MAX_ORIGIN = 100
MAX_NOTES = 100


# Lives here rather than in schema/inputs.py to keep the notes feature in one reviewable place.
@strawberry.input(description="Where a new note goes: exactly one of the three.")
class NoteInput:
    deal_id: strawberry.ID | None = None
    contact_id: strawberry.ID | None = None
    company_id: strawberry.ID | None = None


@strawberry.type
class NoteQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ)])
    async def note(self, info: Info, id: strawberry.ID) -> Note | None:
        row = await info.context.require()[2].note.load(decode_id(id, "Note"))
        return Note.from_row(row) if row else None

    @strawberry.field(permission_classes=[Can(Permission.READ)],
                      description="Notes of a deal, contact or company, oldest first (at most 100).")
    async def notes(self, info: Info, record_id: strawberry.ID) -> list[Note]:
        principal, db, _ = info.context.require()
        type_name, key = parse_global_id(record_id, field="recordId")
        if type_name not in PARENTS:
            raise BadUserInput("recordId", "notes belong to a Deal, Contact or Company")
        column = NOTES.c[PARENTS[type_name][0]]
        rows = await db.fetch(select(NOTES).where(NOTES.c.tenant_id == principal.tenant_id, column == key)
                              .order_by(NOTES.c.created_at, NOTES.c.id).limit(MAX_NOTES))
        return [Note.from_row(r) for r in rows]


@strawberry.type
class NoteMutation:
    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)],
                         description="An empty note on exactly one deal, contact or company.")
    async def create_note(self, info: Info, input: NoteInput) -> Note:
        given = [(type_name, value) for type_name, value in
                 (("Deal", input.deal_id), ("Contact", input.contact_id), ("Company", input.company_id))
                 if value is not None]
        if len(given) != 1:
            raise BadUserInput("input", "give exactly one of dealId, contactId, companyId")
        type_name, value = given[0]
        column, entity, field = PARENTS[type_name]
        parent = decode_id(value, type_name, field=f"input.{field}")
        async with change(info, Permission.WRITE) as w:
            await w.require(entity, parent, field=f"input.{field}")
            row = await w.insert(NOTE, {column: parent, "state": empty_state()})
        return Note.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.WRITE)],
                         description="Merge a Yjs update into a note. `origin` (e.g. your client id) is echoed "
                                     "to noteUpdates subscribers so that an editor can skip its own updates.")
    async def apply_note_update(self, info: Info, note_id: strawberry.ID, update: Base64,
                                origin: str | None = None) -> Note:
        key = decode_id(note_id, "Note", field="noteId")
        if origin is not None and len(origin) > MAX_ORIGIN:
            raise BadUserInput("origin", f"must be at most {MAX_ORIGIN} characters")
        async with change(info, Permission.WRITE) as w:
            before = await w.require(NOTE, key, field="noteId", lock=True)
            try:
                merged = merge(bytes(before.state), bytes(update))
            except InvalidUpdate as exc:
                raise BadUserInput("update", str(exc)) from None
            row = await w.update(NOTE, key, {"state": merged}, None,
                                 detail={"update": base64.b64encode(update).decode(), "origin": origin})
        return Note.from_row(row)
