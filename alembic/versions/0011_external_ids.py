"""External ids: a client's own key of a record (its id in another system), unique in the tenant.

Frozen: this revision spells out its DDL and imports nothing from the application.

Every record type the API creates and updates (companies, contacts, pipelines, stages, deals,
activities, products, deal line items) gets a nullable ``external_id`` (up to 200 characters) and a
``UNIQUE (tenant_id, external_id)`` constraint: two records of one tenant never share one (NULLs
never collide), two tenants may use the same. Batch upserts (``upsertDeals`` ...) find records by
it. The constraint's index leads with ``tenant_id`` like every other. The tables keep their
row-level security and grants (adding a column changes neither).

Revision ID: 0011_external_ids
Revises: 0007_idempotency_keys
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0011_external_ids"
down_revision = "0010_exports"
branch_labels = None
depends_on = None

TABLES = ("companies", "contacts", "pipelines", "stages", "deals", "activities", "products", "deal_line_items")


def upgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ADD COLUMN external_id varchar(200)")
        op.execute(f"ALTER TABLE {table} ADD CONSTRAINT {table}_external_id_key UNIQUE (tenant_id, external_id)")


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_external_id_key")
        op.execute(f"ALTER TABLE {table} DROP COLUMN external_id")
