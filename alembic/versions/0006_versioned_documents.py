"""Trusted documents are versioned too: a process may remember its lookups until a manifest changes.

Frozen: this revision spells out its DDL and imports nothing from the application.

Every hash-only persisted request looks its document up among the tenant's trusted documents
before the APQ cache. With ``persisted_documents`` bumping its data version (as the tables of
0005 do), a lookup's result is valid for as long as that version stands, so it is remembered in
process and the request spends no statement on it.

Revision ID: 0006_versioned_documents
Revises: 0005_enter_and_versions
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0006_versioned_documents"
down_revision = "0005_enter_and_versions"
branch_labels = None
depends_on = None

EVENTS = (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))


def upgrade() -> None:
    for event, image in EVENTS:
        op.execute(f"CREATE TRIGGER persisted_documents_{event.lower()}_versions AFTER {event} ON persisted_documents "
                   f"REFERENCING {image} TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION atrium_bump_versions()")


def downgrade() -> None:
    for event, _ in EVENTS:
        op.execute(f"DROP TRIGGER persisted_documents_{event.lower()}_versions ON persisted_documents")
