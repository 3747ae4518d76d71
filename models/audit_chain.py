"""The audit log's hash chain, recomputed and verified in Python.

Each tenant's audit events are chained by the database as they are inserted (migration 0009, its
trigger ``audit_events_chain``): event ``seq`` n holds ``prev_hash`` (the ``hash`` of event n - 1, or
the anchor for the first one) and ``hash = sha256(prev_hash || canonical(event))``, where the
canonical text (``canonical``) covers every column but the diff itself, which it covers through
``diff_sha256 = sha256(salt || diff as JSON text)``. ``audit_chain_heads`` holds the tenant's last
``seq``/``hash`` and the anchor (where retention last cut the log).

``verify_chain`` reads a tenant's events in ``seq`` order (streamed, constant memory) and reports the
first broken link: which event and why. It recomputes every hash here rather than asking the
database, so a changed database function cannot vouch for changed rows. What it finds:

- an event whose content (seq, time, actor, action, entity, request id) or diff was changed;
- events deleted (a gap in ``seq``, or the chain ending before its head);
- events inserted or reordered (a ``prev_hash`` that is not the previous event's ``hash``, a ``seq``
  out of place, or an event that bypassed the trigger and carries no chain columns);
- a redaction without a chained erasure event naming it, or a redacted diff changed afterwards;
- an anchor that no chained retention event records (the log cut by hand).

Redaction (``eraseContact``) replaces an event's diff by ``{"redacted": true, "erasure": <id>}`` and
deletes its salt; the chain still holds ``diff_sha256``, so every hash still verifies, and the
erasure is itself a chained event listing the events it redacted. Retention deletes a prefix of
the chain, records the last deleted event as the anchor and appends a chained ``retention`` event
that names it (migration 0010). Anyone able to rewrite every row and the head at once can forge a
consistent chain: publish the head (``atrium audit verify`` prints it) somewhere the database
owner cannot reach to detect that too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection

from models.tables import AUDIT_CHAIN_HEADS, AUDIT_EVENTS

GENESIS = bytes(32)
"""The ``prev_hash`` of a tenant's first event (and the anchor before retention ever ran)."""
VERSION = "atrium-audit-v1"
ERASE_ACTION = "erase"
RETENTION_ACTION = "retention"


def _field(value: str | None) -> str:
    return "-" if value is None else f"{len(value)}:{value}"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def utc_text(moment: dt.datetime) -> str:
    """A timestamp as the chain spells it: UTC, microseconds (PostgreSQL's ``to_char(... 'US')``)."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical(event: Mapping[str, Any]) -> str:
    """The canonical text of an audit event (without its diff, which ``diff_sha256`` stands for)."""
    digest = event["diff_sha256"]
    return VERSION + "".join(_field(v) for v in (
        _text(event["tenant_id"]), _text(event["seq"]), _text(event["id"]), utc_text(event["occurred_at"]),
        _text(event["actor_id"]), event["action"], event["entity_type"], _text(event["entity_id"]),
        None if digest is None else bytes(digest).hex(), event["request_id"],
    ))


def link_hash(prev_hash: bytes, event: Mapping[str, Any]) -> bytes:
    """``sha256(prev_hash || canonical(event))``: what ``event["hash"]`` must be."""
    return hashlib.sha256(bytes(prev_hash) + canonical(event).encode()).digest()


def diff_digest(salt: bytes, diff_text: str) -> bytes:
    """``sha256(salt || diff)``: what ``diff_sha256`` must be while the diff is not redacted."""
    return hashlib.sha256(bytes(salt) + diff_text.encode()).digest()


def redaction_marker(erasure_id: uuid.UUID) -> dict[str, Any]:
    """The diff a redacted event holds: nothing of the old one, and the erasure that redacted it."""
    return {"redacted": True, "erasure": str(erasure_id)}


@dataclass(frozen=True)
class Break:
    """The first broken link: the event (None when the break is not at one row) and why."""

    seq: int | None
    event_id: uuid.UUID | None
    reason: str

    def describe(self) -> str:
        where = f"event {self.seq} ({self.event_id})" if self.seq is not None else "the chain"
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class Verification:
    """What ``verify_chain`` found for one tenant."""

    tenant_id: uuid.UUID
    checked: int
    """Events read and checked."""
    first_seq: int | None
    last_seq: int | None
    head_seq: int
    head_hash: bytes
    anchor_seq: int
    broken: Break | None

    @property
    def ok(self) -> bool:
        return self.broken is None


class ChainVerifier:
    """Checks a tenant's events fed in ``seq`` order; ``finish`` checks the end against the head."""

    def __init__(self, anchor_seq: int, anchor_hash: bytes) -> None:
        self.anchor_seq, self.anchor_hash = anchor_seq, bytes(anchor_hash)
        self.expected_seq = anchor_seq + 1
        self.prev_hash = self.anchor_hash
        self.checked = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.anchor_confirmed = anchor_seq == 0
        self._pending: dict[str, dict[str, int]] = {}
        """Redacted events waiting for their erasure event: erasure id -> {event id: seq}."""
        self._ids: dict[str, uuid.UUID] = {}

    def feed(self, event: Mapping[Any, Any]) -> Break | None:
        """Check one event; the first break found (possibly at an earlier, redacted event), or None."""
        seq, event_id = event["seq"], event["id"]

        def broken(reason: str) -> Break:
            return Break(seq, event_id, reason)

        if seq is None or event["hash"] is None or event["prev_hash"] is None or event["diff_sha256"] is None:
            return broken("it is not chained (written without the chain trigger)")
        self.checked += 1
        if seq <= self.anchor_seq:
            return broken(f"it lies at or before the anchor (retention removed events up to {self.anchor_seq})")
        if seq > self.expected_seq:
            return broken(f"events {self.expected_seq}..{seq - 1} before it are missing (deleted)"
                          if seq > self.expected_seq + 1 else f"event {self.expected_seq} before it is missing")
        if seq < self.expected_seq:
            return broken(f"its sequence number repeats or is out of order (expected {self.expected_seq})")
        if bytes(event["prev_hash"]) != self.prev_hash:
            return broken("it does not link to the event before it (prev_hash differs: an event was inserted, "
                          "reordered or rewritten)")
        diff = json.loads(event["diff_text"])
        if event["salt"] is not None:
            if diff_digest(event["salt"], event["diff_text"]) != bytes(event["diff_sha256"]):
                return broken("its diff was changed")
        else:
            erasure = diff.get("erasure") if isinstance(diff, dict) else None
            if not isinstance(erasure, str) or diff != redaction_marker(uuid.UUID(erasure)):
                return broken("its diff was removed or changed without an erasure")
            self._pending.setdefault(erasure, {})[str(event_id)] = seq
            self._ids[str(event_id)] = event_id
        if link_hash(self.prev_hash, event) != bytes(event["hash"]):
            return broken("its content was changed (hash differs)")
        if self.first_seq is None:
            self.first_seq = seq
        self.last_seq, self.expected_seq, self.prev_hash = seq, seq + 1, bytes(event["hash"])
        if event["action"] == ERASE_ACTION and isinstance(diff, dict):
            waiting = self._pending.pop(str(event_id), {})
            listed = set(diff.get("redacted") or ())
            unlisted = [s for i, s in waiting.items() if i not in listed]
            if unlisted:
                earliest = min(unlisted)
                eid = next(self._ids[i] for i, s in waiting.items() if s == earliest)
                return Break(earliest, eid, f"it was redacted, but the erasure (event {seq}) does not list it")
        if (event["action"] == RETENTION_ACTION and isinstance(diff, dict)
                and diff.get("throughSeq") == self.anchor_seq and diff.get("anchorHash") == self.anchor_hash.hex()):
            self.anchor_confirmed = True
        return None

    def finish(self, head_seq: int, head_hash: bytes) -> Break | None:
        """Check the chain's end against the head, then what waited for a later event."""
        if self._pending:
            earliest = min((s, i) for waiting in self._pending.values() for i, s in waiting.items())
            return Break(earliest[0], self._ids[earliest[1]], "it was redacted, but no chained erasure lists it")
        last = self.expected_seq - 1
        if last < head_seq:
            missing = f"events {last + 1}..{head_seq} are" if head_seq > last + 1 else f"event {head_seq} is"
            return Break(None, None, f"{missing} missing at the end (the head is at {head_seq})")
        if last > head_seq or self.prev_hash != bytes(head_hash):
            return Break(None, None, f"the head (event {head_seq}) does not match the last event ({last})")
        if not self.anchor_confirmed:
            return Break(None, None, f"no chained retention event records the anchor (event {self.anchor_seq}): "
                                     "events were removed outside retention")
        return None


EVENT_COLUMNS: tuple[ColumnElement[Any], ...] = (
    *(AUDIT_EVENTS.c[name] for name in ("tenant_id", "id", "seq", "occurred_at", "actor_id", "action", "entity_type",
                                        "entity_id", "request_id", "salt", "diff_sha256", "prev_hash", "hash")),
    literal_column("audit_events.diff::text").label("diff_text"),
)
"""Everything the chain covers, the diff as the JSON text its digest was taken of."""


async def verify_chain(conn: AsyncConnection, tenant_id: uuid.UUID, *, batch: int = 1000) -> Verification:
    """Verify ``tenant_id``'s audit chain over ``conn`` (one snapshot: run it in a REPEATABLE READ
    transaction, so writes committing meanwhile are not half seen). Rows are streamed with a
    server-side cursor; memory does not grow with the log (redactions awaiting their erasure aside)."""
    head = (await conn.execute(select(AUDIT_CHAIN_HEADS).where(AUDIT_CHAIN_HEADS.c.tenant_id == tenant_id))).first()
    head_seq, head_hash = (head.seq, bytes(head.hash)) if head else (0, GENESIS)
    anchor_seq, anchor_hash = (head.anchor_seq, bytes(head.anchor_hash)) if head else (0, GENESIS)
    verifier = ChainVerifier(anchor_seq, anchor_hash)
    broken: Break | None = None
    query = (select(*EVENT_COLUMNS).where(AUDIT_EVENTS.c.tenant_id == tenant_id)
             .order_by(AUDIT_EVENTS.c.seq.asc().nulls_first(), AUDIT_EVENTS.c.id)
             .execution_options(yield_per=batch))
    result = await conn.stream(query)
    try:
        async for row in result:
            broken = verifier.feed(row._mapping)
            if broken is not None:
                break
    finally:
        await result.close()
    if broken is None:
        broken = verifier.finish(head_seq, head_hash)
    return Verification(tenant_id=tenant_id, checked=verifier.checked, first_seq=verifier.first_seq,
                        last_seq=verifier.last_seq, head_seq=head_seq, head_hash=head_hash, anchor_seq=anchor_seq,
                        broken=broken)
