"""``eraseContact``: the right to erasure. A person's personal data goes from everywhere Atrium keeps it.

In one transaction of the write path (all of it or nothing):

1. The contact's identifying texts (``terms``: full name, e-mail, phone) are looked for, case
   insensitively, in every activity's subject and body and every note's text; each mention is
   replaced by ``[erased]`` through the write path (a note by a CRDT edit, whose compacted state
   keeps no deleted text, published to its co-editors like any other edit).
2. The contact is deleted through the write path: what its declaration says happens to records
   pointing at it happens (its activities and notes are deleted, deals unlinked).
3. Every other kept copy of change payloads that names the person is removed (``PAYLOAD_STORES``:
   stored mutation answers of ``Idempotency-Key`` retries; a store of webhook deliveries registers
   itself there), and export archives not yet downloaded are purged.
4. The audit log: every event about the contact or about a record that mentioned or belonged to it,
   and every event whose diff contains a term (including those this erasure just wrote), is
   redacted by the database (``atrium_audit_redact``): its diff becomes
   ``{"redacted": true, "erasure": <id>}`` and its salt is deleted, while the chain keeps the
   diff's salted digest, so the chain still verifies (``models.audit_chain``). Then one chained
   ``erase`` event records that it happened (which contact id, which events were redacted, how
   many records were rewritten) and nothing of the person.

Why redact in place and chain the erasure, rather than re-chain the redacted log: re-chaining would
rewrite every hash after the first redacted event, so any head published before would stop
matching and a real tampering could hide behind an erasure; with the salted digest, the old hashes
stay valid, the redaction is visible and attributable (its own chained event), and the salt's
deletion leaves nothing from which the erased values could be confirmed by guessing.

Change events already published are not kept by Atrium (Redis pub/sub delivers and forgets);
cached query answers that held the person are never served again after this write (their data
versions changed) and expire from Redis within an hour.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence

import strawberry
from pycrdt import Doc, Text
from sqlalchemy import ColumnElement, cast, delete, func, or_, select, text, update
from sqlalchemy import Text as SqlText
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.roles import Permission, requires
from auth.session import Info
from core.ids import decode_id, to_global_id
from models.tables import (
    ACTIVITIES,
    AUDIT_EVENTS,
    EXPORT_CHUNKS,
    EXPORT_JOBS,
    IDEMPOTENCY_KEYS,
    NOTES,
    WEBHOOK_DELIVERIES,
)
from records.crm import ACTIVITY, CONTACT, NOTE
from resolvers.writes import Change, change
from schema.governance import ContactErasure
from subscriptions.notes import BODY

ERASED = "[erased]"
SUBJECT_MAX = 200  # activities.subject is varchar(200); "[erased]" may be longer than what it replaces
REDACT = text("SELECT atrium_audit_redact(:ids, :erasure)")

PayloadStore = Callable[[AsyncConnection, uuid.UUID, Sequence[str]], Awaitable[int]]
"""Remove ``tenant_id``'s kept copies of change payloads containing any of the terms; how many."""

PAYLOAD_STORES: list[PayloadStore] = []
"""Where copies of change payloads are kept (``payload_store`` registers one)."""


def payload_store(store: PayloadStore) -> PayloadStore:
    PAYLOAD_STORES.append(store)
    return store


def _like_any(column: ColumnElement[str], terms: Sequence[str]) -> ColumnElement[bool]:
    return or_(*(column.ilike("%" + re.sub(r"([\\%_])", r"\\\1", term) + "%", escape="\\") for term in terms))


@payload_store
async def _stored_answers(conn: AsyncConnection, tenant_id: uuid.UUID, terms: Sequence[str]) -> int:
    return (await conn.execute(delete(IDEMPOTENCY_KEYS).where(
        IDEMPOTENCY_KEYS.c.tenant_id == tenant_id, _like_any(IDEMPOTENCY_KEYS.c.body, terms)))).rowcount


@payload_store
async def _webhook_deliveries(conn: AsyncConnection, tenant_id: uuid.UUID, terms: Sequence[str]) -> int:
    # Sent or not: a message naming the person must not leave after their erasure (a pending one is
    # dropped rather than sent; its endpoint gets the erasure's own events instead).
    return (await conn.execute(delete(WEBHOOK_DELIVERIES).where(
        WEBHOOK_DELIVERIES.c.tenant_id == tenant_id, _like_any(WEBHOOK_DELIVERIES.c.body, terms)))).rowcount


def terms_of(contact: dict[str, object]) -> list[str]:
    """The texts that identify a contact (longest first, so a name inside an e-mail goes whole)."""
    name = f"{contact['first_name']} {contact['last_name']}".strip()
    found = {str(v).strip() for v in (name, contact.get("email"), contact.get("phone")) if v}
    return sorted((t for t in found if len(t) >= 3), key=len, reverse=True)


def scrub(value: str | None, pattern: re.Pattern[str]) -> str | None:
    return None if value is None else pattern.sub(ERASED, value)


async def _rewrite_activities(w: Change, terms: Sequence[str], pattern: re.Pattern[str]) -> list[uuid.UUID]:
    t = ACTIVITIES
    rows = (await w.conn.execute(select(t.c.id, t.c.subject, t.c.body).where(
        t.c.tenant_id == w.tenant_id, or_(_like_any(t.c.subject, terms), _like_any(t.c.body, terms))))).all()
    for row in rows:
        subject = scrub(row.subject, pattern) or ""
        await w.update(ACTIVITY, row.id, {"subject": subject[:SUBJECT_MAX], "body": scrub(row.body, pattern)}, None)
    return [row.id for row in rows]


async def _rewrite_notes(w: Change, pattern: re.Pattern[str]) -> list[uuid.UUID]:
    """Replace each mention in a note's text by a CRDT edit (co-editors receive it like any other)."""
    edits: list[tuple[uuid.UUID, bytes, bytes]] = []
    result = await w.conn.stream(select(NOTES.c.id, NOTES.c.state).where(NOTES.c.tenant_id == w.tenant_id)
                                 .execution_options(yield_per=200))
    async for row in result:
        doc: Doc[Text] = Doc()
        doc.apply_update(bytes(row.state))
        body = doc.get(BODY, type=Text)
        matches = list(pattern.finditer(str(body)))
        if not matches:
            continue
        before = doc.get_state()
        with doc.transaction():
            for match in reversed(matches):  # from the end: the earlier offsets stay valid
                del body[match.start():match.end()]
                body.insert(match.start(), ERASED)
        # The compacted document: deleted text is garbage-collected, nothing of it is kept.
        edits.append((row.id, bytes(doc.get_update()), bytes(doc.get_update(before))))
    for note_id, state, edit in edits:
        await w.update(NOTE, note_id, {"state": state}, None,
                       detail={"update": base64.b64encode(edit).decode(), "origin": "erasure"})
    return [note_id for note_id, _, _ in edits]


@strawberry.type
class ErasureMutation:
    @strawberry.mutation(**requires(Permission.MANAGE_TENANT,
                                    "Erase a contact and their personal data everywhere this workspace keeps it "
                                    "(docs/export.md#erasure); leaves an audit event that it happened, without "
                                    "the data."))
    async def erase_contact(self, info: Info, id: strawberry.ID) -> ContactErasure:
        key = decode_id(id, "Contact")
        erasure_id = uuid.uuid4()
        async with change(info) as w:
            contact = dict((await w.require(CONTACT, key, lock=True))._mapping)
            terms = terms_of(contact)
            pattern = re.compile("|".join(re.escape(t) for t in terms), re.IGNORECASE) if terms else None
            activities = await _rewrite_activities(w, terms, pattern) if pattern else []
            notes = await _rewrite_notes(w, pattern) if pattern else []
            owned = [r for (r,) in (await w.conn.execute(
                select(ACTIVITIES.c.id).where(ACTIVITIES.c.tenant_id == w.tenant_id, ACTIVITIES.c.contact_id == key)
                .union_all(select(NOTES.c.id).where(NOTES.c.tenant_id == w.tenant_id, NOTES.c.contact_id == key))
            )).all()]
            await w.delete(CONTACT, key, None)
            await w.purge(CONTACT, key)  # not to the trash: erased for good, with what went along
            # The deletion's own event (webhooks) carries the erased row: every text of it goes.
            w.rows[:] = [{k: ERASED if isinstance(v, str) else v for k, v in row.items()}
                         if row.get("id") == key and event.entity_type == CONTACT.name else row
                         for row, event in zip(w.rows, w.events, strict=True)]
            removed = 0
            if terms:
                for store in PAYLOAD_STORES:
                    removed += await store(w.conn, w.tenant_id, terms)
            purged = (await w.conn.execute(
                update(EXPORT_JOBS).where(EXPORT_JOBS.c.tenant_id == w.tenant_id,
                                          EXPORT_JOBS.c.status.in_(("pending", "running", "done")))
                .values(status="purged", updated_at=func.now()).returning(EXPORT_JOBS.c.id))).scalars().all()
            if purged:
                await w.conn.execute(delete(EXPORT_CHUNKS).where(EXPORT_CHUNKS.c.tenant_id == w.tenant_id,
                                                                 EXPORT_CHUNKS.c.job_id.in_(purged)))
            entities = [key, *activities, *notes, *owned]
            about: ColumnElement[bool] = AUDIT_EVENTS.c.entity_id.in_(entities)
            if terms:
                about = or_(about, _like_any(cast(AUDIT_EVENTS.c.diff, SqlText), terms))
            candidates = (await w.conn.execute(select(AUDIT_EVENTS.c.id).where(
                AUDIT_EVENTS.c.tenant_id == w.tenant_id, about))).scalars().all()
            redacted = (await w.conn.execute(REDACT, {"ids": list(candidates), "erasure": erasure_id})).scalars().all()
            await w.audit("Contact", "erase", key, {
                "redacted": sorted(str(i) for i in redacted), "activitiesRewritten": len(activities),
                "notesRewritten": len(notes), "storedAnswersRemoved": removed, "exportsPurged": len(purged)},
                id=erasure_id)
        return ContactErasure(
            contact_id=id, erasure_event_id=strawberry.ID(to_global_id("AuditEvent", erasure_id)),
            audit_events_redacted=len(redacted), activities_rewritten=len(activities), notes_rewritten=len(notes),
            stored_answers_removed=removed, exports_purged=len(purged))
