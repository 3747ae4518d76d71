"""Idempotency keys: the stored answers of mutations sent with an ``Idempotency-Key`` header.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``idempotency_keys``: per tenant, per principal (``user:<id>`` or ``key:<api key id>``) and key,
  the SHA-256 of the request's parameters and the answer sent (status and JSON body), inserted in
  the transaction of the mutation's change so that the two commit together; a retry finds it and
  gets the same answer. ``expires_at`` ends a key's life (the expired rows of a principal are
  deleted when it stores its next one). Row-level security as on every tenant table.

Revision ID: 0007_idempotency_keys
Revises: 0006_versioned_documents
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0007_idempotency_keys"
down_revision = "0006_versioned_documents"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"

SCHEMA = """
CREATE TABLE idempotency_keys (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    principal   varchar(64) NOT NULL,
    key         varchar(255) NOT NULL,
    fingerprint char(64) NOT NULL,
    status      smallint NOT NULL,
    body        text NOT NULL,
    expires_at  timestamptz NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT idempotency_keys_key UNIQUE (tenant_id, principal, key)
);
CREATE INDEX idempotency_keys_expiry_idx ON idempotency_keys (tenant_id, principal, expires_at)
"""


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)
    op.execute("ALTER TABLE idempotency_keys ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE idempotency_keys FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON idempotency_keys TO {APP_ROLE} "
        f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
    )
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON idempotency_keys TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP TABLE idempotency_keys")
