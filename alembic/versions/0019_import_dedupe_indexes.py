"""An index for the key CSV imports find existing companies by: their domain.

Frozen: this revision spells out its DDL and imports nothing from the application.

An import chunk looks its rows' keys up one by one (``models.db.each_key``: a probe per key, so
that a table grown since PostgreSQL last counted it is not scanned once per key). Deals and every
record with an ``external_id`` have its unique index; companies, found by ``domain``, had none:

- ``companies_domain_idx`` on ``(tenant_id, domain)`` (domains are stored lower-case; not unique,
  a workspace may hold two companies of one domain: an import updates the oldest).

Contacts are found by e-mail case-insensitively (``lower(email)``). An index on that expression
would not help: under row-level security PostgreSQL uses an index only for conditions whose
functions are leakproof, and ``lower`` is not, so the import reads the workspace's contacts once per
chunk instead (``resolvers.csv_import``).

Revision ID: 0019_import_dedupe_indexes
Revises: 0018_import_jobs
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0019_import_dedupe_indexes"
down_revision = "0018_import_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE INDEX companies_domain_idx ON companies (tenant_id, domain)")


def downgrade() -> None:
    op.execute("DROP INDEX companies_domain_idx")
