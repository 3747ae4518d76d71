"""Object types of a workspace's data governance: exports, erasures and retention policies."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import strawberry

from core.ids import to_global_id


@strawberry.enum(description="Where an export is: PENDING and RUNNING, then DONE (downloadable once) or FAILED; "
                             "DOWNLOADED after its one download; PURGED when an erasure removed its archive.")
class ExportStatus(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DOWNLOADED = "downloaded"
    PURGED = "purged"


@strawberry.type(description="A tenant export (docs/export.md): every record type, notes with their CRDT state, "
                             "the audit log and the members (without password hashes), as JSON Lines and CSV "
                             "per type in one zip.")
class ExportJob:
    id: strawberry.ID
    status: ExportStatus
    rows_done: int
    rows_total: int
    archive_bytes: float = strawberry.field(description="Size of the archive in bytes (once DONE).")
    sha256: str | None = strawberry.field(description="SHA-256 of the archive, hex (once DONE).")
    error: str | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    expires_at: dt.datetime | None = strawberry.field(description="Until when the archive is kept.")
    downloaded_at: dt.datetime | None
    download_url: str | None = strawberry.field(description="While DONE: a signed link that downloads the "
                                                            "archive once, valid for a short while (ask again "
                                                            "for a fresh one).")

    @classmethod
    def from_row(cls, row: Any, download_url: str | None) -> ExportJob:
        return cls(id=strawberry.ID(to_global_id("ExportJob", row.id)), status=ExportStatus(row.status),
                   rows_done=row.rows_done, rows_total=row.rows_total, archive_bytes=float(row.archive_bytes),
                   sha256=row.sha256, error=row.error, created_at=row.created_at, started_at=row.started_at,
                   finished_at=row.finished_at, expires_at=row.expires_at, downloaded_at=row.downloaded_at,
                   download_url=download_url)


@strawberry.type(description="What eraseContact removed. The audit log keeps one chained `erase` event listing the "
                             "events it redacted, and nothing of the person.")
class ContactErasure:
    contact_id: strawberry.ID
    erasure_event_id: strawberry.ID
    audit_events_redacted: int
    activities_rewritten: int
    deals_rewritten: int = strawberry.field(description="Deals whose title named the person (docs/export.md#erasure).")
    notes_rewritten: int
    stored_answers_removed: int = strawberry.field(description="Stored mutation answers (Idempotency-Key) and other "
                                                               "kept copies of change payloads that named them.")
    exports_purged: int = strawberry.field(description="Export archives not yet downloaded, which held the person.")


@strawberry.type(description="How long one kind of row is kept (docs/export.md#retention).")
class RetentionPolicy:
    target: str
    description: str
    keep_days: int | None = strawberry.field(description="Null: kept for ever.")
