"""Field rules: fields of a record type a tenant hides from some roles (issue 11, field-level permissions).

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``field_rules``: per tenant, record type (its GraphQL type name) and field (the API's name of a
  declared field, or a custom field's key), the roles it is hidden from (``hidden_from``, never
  empty, never the owner). A hidden field reads null with FORBIDDEN, cannot be filtered, sorted,
  grouped or measured by, and cannot be written by those roles.
- The table bumps its data version like every table the API reads (``atrium_bump_versions`` of
  0005): a request reads the rules' version with its membership (``atrium_enter``), so a rule
  change invalidates the cached rules and every cached answer (``planner.answers``) of the tenant.

Revision ID: 0015_field_rules
Revises: 0014_job_leases
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0015_field_rules"
down_revision = "0014_job_leases"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
EVENTS = (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))

SCHEMA = """
CREATE TABLE field_rules (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    record_type varchar(100) NOT NULL,
    field       varchar(100) NOT NULL,
    hidden_from text[] NOT NULL CHECK (cardinality(hidden_from) > 0 AND NOT 'owner' = ANY (hidden_from)),
    created_by  uuid,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT field_rules_field_key UNIQUE (tenant_id, record_type, field)
)
"""


def upgrade() -> None:
    op.execute(SCHEMA)
    op.execute("ALTER TABLE field_rules ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE field_rules FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON field_rules TO {APP_ROLE} "
               f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON field_rules TO {APP_ROLE}")
    for event, image in EVENTS:
        op.execute(f"CREATE TRIGGER field_rules_{event.lower()}_versions AFTER {event} ON field_rules "
                   f"REFERENCING {image} TABLE AS changed FOR EACH STATEMENT "
                   "EXECUTE FUNCTION atrium_bump_versions()")


def downgrade() -> None:
    for event, _ in EVENTS:
        op.execute(f"DROP TRIGGER field_rules_{event.lower()}_versions ON field_rules")
    op.execute("DROP TABLE field_rules")
