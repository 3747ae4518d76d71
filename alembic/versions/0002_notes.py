"""Collaborative notes: one compacted Yjs document per note, attached to a deal, contact or company.

Frozen: this revision spells out its DDL and imports nothing from the application.

Revision ID: 0002_notes
Revises: 0001_core
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0002_notes"
down_revision = "0001_core"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"

SCHEMA = """
CREATE TABLE notes (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    deal_id    uuid,
    contact_id uuid,
    company_id uuid,
    state      bytea NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CHECK (num_nonnulls(deal_id, contact_id, company_id) = 1),
    FOREIGN KEY (tenant_id, deal_id) REFERENCES deals (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, company_id) REFERENCES companies (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX notes_deal_idx ON notes (tenant_id, deal_id);
CREATE INDEX notes_contact_idx ON notes (tenant_id, contact_id);
CREATE INDEX notes_company_idx ON notes (tenant_id, company_id)
"""


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)
    op.execute("ALTER TABLE notes ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE notes FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON notes TO {APP_ROLE} "
        f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON notes TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP TABLE notes")
