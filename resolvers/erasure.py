"""``eraseContact``: the right to erasure. A person's personal data goes from everywhere Atrium keeps it.

In one transaction of the write path (all of it or nothing):

1. The texts that identify the person are replaced by ``[erased]`` through the write path, in
   activities' subject and body, deals' titles and notes' text (a note by a CRDT edit, whose
   compacted state keeps no deleted text, published to its co-editors like any other edit). What is
   matched (``Identity``), always case-insensitively and as whole words (``Mr Adams`` does not
   match ``Ada``):

   - everywhere in the workspace: the full name (``Ada Lovelace``, and ``Lovelace, Ada``), the
     e-mail address and the phone number: texts that name this person and nobody else;
   - in the records that point at the contact (its activities, also linked to a deal or a company,
     and its deals), also the first name and the last name alone: there, ``Call Ada`` is about her.
     Elsewhere a first or last name alone is left alone: it names other people as often as this
     one (another contact, a colleague, a company), and erasing their text would be a harm of its
     own.
2. The contact is deleted through the write path: what its declaration says happens to records
   pointing at it happens (its activities and notes are deleted, deals unlinked).
3. Every other kept copy of change payloads that names the person is removed (``PAYLOAD_STORES``:
   stored mutation answers of ``Idempotency-Key`` retries; a store of webhook deliveries registers
   itself there), and export archives not yet downloaded are purged.
4. The audit log: every event about the contact or about a record that mentioned or belonged to it,
   and every event whose diff names the person (the texts matched everywhere, as whole words;
   including those this erasure just wrote), is redacted by the database (``atrium_audit_redact``):
   its diff becomes ``{"redacted": true, "erasure": <id>}`` and its salt is deleted, while the
   chain keeps the diff's salted digest, so the chain still verifies (``models.audit_chain``). Then
   one chained ``erase`` event records that it happened (which contact id, which events were
   redacted, how many records were rewritten) and nothing of the person.

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
from dataclasses import dataclass
from typing import Any

import strawberry
from pycrdt import Doc, Text
from sqlalchemy import ColumnElement, and_, cast, delete, func, or_, select, text, update
from sqlalchemy import Text as SqlText
from sqlalchemy.ext.asyncio import AsyncConnection

from auth.roles import Permission, requires
from auth.session import Info
from core.ids import decode_id, to_global_id
from models.db import showing_trash
from models.tables import (
    ACTIVITIES,
    AUDIT_EVENTS,
    EXPORT_CHUNKS,
    EXPORT_JOBS,
    IDEMPOTENCY_KEYS,
    NOTES,
    WEBHOOK_DELIVERIES,
)
from records.crm import ACTIVITY, CONTACT, DEAL, NOTE
from records.declare import Record
from resolvers.writes import Change, change, in_trash
from schema.governance import ContactErasure
from subscriptions.notes import BODY

ERASED = "[erased]"
TEXT_MAX = 200  # activities.subject, deals.title: varchar(200); "[erased]" may be longer than what it replaces
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


@dataclass(frozen=True)
class Identity:
    """What identifies a contact in text (module docstring, 1.)."""

    everywhere: list[str]
    """Full name (both orders), e-mail, phone: matched in every record (longest first)."""
    linked: list[str]
    """Those and the first and last name alone: matched in the records that point at the contact."""

    @classmethod
    def of(cls, contact: dict[str, object]) -> Identity:
        first, last = (str(contact.get(k) or "").strip() for k in ("first_name", "last_name"))
        full = [f"{first} {last}", f"{last}, {first}"] if first and last else []  # one name alone: linked only
        everywhere = {t for t in (*full, *(str(contact.get(k) or "").strip() for k in ("email", "phone")))
                      if len(t) >= 3}
        names = {n for n in (first, last) if len(n) >= 2}
        return cls(longest_first(everywhere), longest_first(everywhere | names))


def longest_first(terms: set[str]) -> list[str]:
    return sorted(terms, key=lambda t: (-len(t), t))


def whole_words(terms: Sequence[str]) -> re.Pattern[str] | None:
    """Any of ``terms``, case-insensitively, not inside a longer word (``Ada`` is not in ``Adams``)."""
    if not terms:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in terms) + r")(?!\w)", re.IGNORECASE)


def scrub(value: str | None, pattern: re.Pattern[str]) -> str | None:
    return None if value is None else pattern.sub(ERASED, value)


async def _rewrite(w: Change, record: Record, columns: Sequence[str], owner: str, key: uuid.UUID,
                   who: Identity) -> list[uuid.UUID]:
    """Replace the person's texts in ``columns`` of ``record``'s rows, those in the trash included:
    the ``everywhere`` texts in every row, and the ``linked`` ones too in rows whose ``owner`` column
    points at the contact ``key``; the rows changed. The database narrows the rows (ILIKE), the
    pattern decides."""
    t = record.table
    everywhere, linked = whole_words(who.everywhere), whole_words(who.linked)
    if linked is None:
        return []
    mentions = [_like_any(t.c[c], who.everywhere) for c in columns] if who.everywhere else []
    candidates = or_(*mentions, and_(t.c[owner] == key, or_(*(_like_any(t.c[c], who.linked) for c in columns))))
    changed: list[uuid.UUID] = []
    async with showing_trash(w.conn):
        rows = (await w.conn.execute(select(t).where(t.c.tenant_id == w.tenant_id, candidates))).all()
        for row in rows:
            found = row._mapping
            pattern = linked if found[owner] == key else everywhere
            if pattern is None:
                continue
            values = {c: fit(t.c[c], scrub(found[c], pattern)) for c in columns}
            values = {c: v for c, v in values.items() if v != found[c]}
            if not values:
                continue
            if in_trash(record, found):  # (the write path's update sees no trashed record)
                await w.update_where(record, t.c.id == row.id, values, before={c: found[c] for c in values})
            else:
                await w.update(record, row.id, values, None)
            changed.append(row.id)
    return changed


def fit(column: Any, value: str | None) -> str | None:
    """``value`` cut to ``column``'s length ("[erased]" may be longer than what it replaced)."""
    length = getattr(column.type, "length", None)
    return value[:length] if value is not None and length else value


async def _rewrite_notes(w: Change, pattern: re.Pattern[str]) -> list[uuid.UUID]:
    """Replace each mention in a note's text by a CRDT edit (co-editors receive it like any other);
    a note in the trash is rewritten too (it may be restored)."""
    edits: list[tuple[uuid.UUID, bool, bytes, bytes]] = []
    async with showing_trash(w.conn):
        result = await w.conn.stream(select(NOTES.c.id, NOTES.c.state, NOTES.c.deleted_at)
                                     .where(NOTES.c.tenant_id == w.tenant_id).execution_options(yield_per=200))
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
            edits.append((row.id, row.deleted_at is not None, bytes(doc.get_update()), bytes(doc.get_update(before))))
        for note_id, trashed, state, edit in edits:
            if trashed:
                await w.update_where(NOTE, NOTES.c.id == note_id, {"state": state}, before={"state": None})
            else:
                await w.update(NOTE, note_id, {"state": state}, None,
                               detail={"update": base64.b64encode(edit).decode(), "origin": "erasure"})
    return [note_id for note_id, _, _, _ in edits]


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
            who = Identity.of(contact)
            terms, pattern = who.everywhere, whole_words(who.everywhere)
            activities = await _rewrite(w, ACTIVITY, ("subject", "body"), "contact_id", key, who)
            deals = await _rewrite(w, DEAL, ("title",), "contact_id", key, who)
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
            entities = [key, *activities, *deals, *notes, *owned]
            about: ColumnElement[bool] = AUDIT_EVENTS.c.entity_id.in_(entities)
            diff = cast(AUDIT_EVENTS.c.diff, SqlText)
            if terms:
                about = or_(about, _like_any(diff, terms))
            candidates = [row.id for row in (await w.conn.execute(select(
                AUDIT_EVENTS.c.id, AUDIT_EVENTS.c.entity_id, diff.label("text")).where(
                AUDIT_EVENTS.c.tenant_id == w.tenant_id, about))).all()
                if row.entity_id in entities or (pattern is not None and pattern.search(row.text))]
            redacted = (await w.conn.execute(REDACT, {"ids": list(candidates), "erasure": erasure_id})).scalars().all()
            await w.audit("Contact", "erase", key, {
                "redacted": sorted(str(i) for i in redacted), "activitiesRewritten": len(activities),
                "dealsRewritten": len(deals),
                "notesRewritten": len(notes), "storedAnswersRemoved": removed, "exportsPurged": len(purged)},
                id=erasure_id)
        return ContactErasure(
            contact_id=id, erasure_event_id=strawberry.ID(to_global_id("AuditEvent", erasure_id)),
            audit_events_redacted=len(redacted), activities_rewritten=len(activities), deals_rewritten=len(deals),
            notes_rewritten=len(notes),
            stored_answers_removed=removed, exports_purged=len(purged))
