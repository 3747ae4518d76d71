"""The trash: soft-deleted rows, hidden by row-level security unless a transaction asks to see them.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``deleted_at`` / ``deleted_by`` / ``trash_batch`` on every trashable table (companies, contacts,
  deals, activities, notes, deal line items): when the record went to the trash, who moved it, and
  the id of the record whose delete moved it (itself, or the parent it went with). ``deleted_by``
  has no foreign key, like ``audit_events.actor_id``: a member who leaves keeps their trail.
- The ``tenant_isolation`` policy of those tables hides trashed rows as well: a row is visible (and
  writable, WITH CHECK being the same condition) only while ``deleted_at IS NULL``, unless the
  transaction has set ``atrium.trash`` to ``on`` (``set_config(..., true)``: transaction-local, so
  it cannot leak through the pool). The server sets it only for the statements that move rows in
  and out of the trash, list it and purge it; a read that forgets the application's filter still
  cannot show a trashed row.
- ``tenants.trash_retention_days`` (default 30): how long a record stays in the trash before a
  purge removes it for good. The application role may change that one column of its own tenant.
- Partial indexes: the trash of a tenant by type in deletion order, and the rows of one batch.

Revision ID: 0012_trash
Revises: 0007_idempotency_keys
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0012_trash"
down_revision = "0011_external_ids"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
SHOWING_TRASH = "(SELECT coalesce(current_setting('atrium.trash', true), '') = 'on')"
TRASHABLE = ("companies", "contacts", "deals", "activities", "notes", "deal_line_items")


def policy(name: str, condition: str) -> str:
    return f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} USING ({condition}) WITH CHECK ({condition})"


def upgrade() -> None:
    op.execute("ALTER TABLE tenants ADD COLUMN trash_retention_days integer NOT NULL DEFAULT 30 "
               "CONSTRAINT tenants_trash_retention_range CHECK (trash_retention_days BETWEEN 1 AND 3650)")
    op.execute(f"GRANT UPDATE (trash_retention_days) ON tenants TO {APP_ROLE}")
    for name in TRASHABLE:
        op.execute(f"ALTER TABLE {name} ADD COLUMN deleted_at timestamptz, ADD COLUMN deleted_by uuid, "
                   "ADD COLUMN trash_batch uuid")
        op.execute(f"ALTER TABLE {name} ADD CONSTRAINT {name}_trash_complete "
                   "CHECK ((deleted_at IS NULL) = (trash_batch IS NULL))")
        op.execute(f"CREATE INDEX {name}_trash_idx ON {name} (tenant_id, deleted_at, id) "
                   "WHERE deleted_at IS NOT NULL")
        op.execute(f"CREATE INDEX {name}_trash_batch_idx ON {name} (tenant_id, trash_batch) "
                   "WHERE trash_batch IS NOT NULL")
        op.execute(f"DROP POLICY tenant_isolation ON {name}")
        op.execute(policy(name, f"tenant_id = {CURRENT_TENANT} AND (deleted_at IS NULL OR {SHOWING_TRASH})"))


UNLINKED = (("contacts", "company_id", "companies"), ("deals", "company_id", "companies"),
            ("deals", "contact_id", "contacts"))
"""Links without ON DELETE to trashable tables: unlinked from trashed rows before the trash is emptied."""


def downgrade() -> None:
    # The trash is emptied for good (the schema before this revision has no place for it).
    for name, column, target in UNLINKED:
        op.execute(f"UPDATE {name} SET {column} = NULL FROM {target} t WHERE t.tenant_id = {name}.tenant_id "
                   f"AND t.id = {name}.{column} AND t.deleted_at IS NOT NULL")
    for name in reversed(TRASHABLE):
        op.execute(f"DELETE FROM {name} WHERE deleted_at IS NOT NULL")
    for name in TRASHABLE:
        op.execute(f"DROP POLICY tenant_isolation ON {name}")
        op.execute(policy(name, f"tenant_id = {CURRENT_TENANT}"))
        op.execute(f"ALTER TABLE {name} DROP COLUMN deleted_at, DROP COLUMN deleted_by, DROP COLUMN trash_batch")
    op.execute(f"REVOKE UPDATE (trash_retention_days) ON tenants FROM {APP_ROLE}")
    op.execute("ALTER TABLE tenants DROP COLUMN trash_retention_days")
