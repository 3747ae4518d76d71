"""Custom fields per tenant: definitions as data, values per record in one JSONB column.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``custom_field_definitions``: what a tenant defines on a record type (``record_type`` is the
  record's type name, ``Deal``): ``key`` (what values, filters and orderings name; unique per type,
  deleted definitions included until purged), ``label``, ``type``, ``required``, ``options`` of
  selects, ``default_value`` (JSON), ``position`` (form order), ``deleted_at`` (hidden, values kept
  until a purge). Tenant isolation as every tenant table; versioned like the tables the API reads
  (``data_versions``), so cached answers that read definitions expire with them.
- ``custom_fields jsonb NOT NULL DEFAULT '{}'`` on companies, contacts and deals, each with a GIN
  index (``jsonb_path_ops``): equality, one-of and contains filters on any custom field are
  containment (``@>``) tests the index answers.
- ``jsonb_contains`` (the ``@>`` of jsonb) is marked LEAKPROOF when the migrating role is a
  superuser: row-level security lets PostgreSQL use an index for a condition only when its operator
  is leakproof (it could otherwise see rows the policy hides), and without it a custom field filter
  under RLS scans every row of the tenant. The function raises no error that depends on the values
  it compares, so it reveals nothing of a hidden row. A role that is not a superuser cannot change
  it: the migration says so (NOTICE) and filters stay correct, only slower.

Revision ID: 0017_custom_fields
Revises: 0016_visibility
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0017_custom_fields"
down_revision = "0016_visibility"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
WITH_VALUES = ("companies", "contacts", "deals")
EVENTS = (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))

SCHEMA = """
CREATE TABLE custom_field_definitions (
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            uuid NOT NULL,
    record_type   varchar(40) NOT NULL,
    key           varchar(40) NOT NULL CHECK (key ~ '^[a-z][a-z0-9_]{0,39}$'),
    label         varchar(200) NOT NULL,
    type          varchar(20) NOT NULL CHECK (type IN ('text', 'long_text', 'number', 'money', 'date', 'boolean',
                                                       'single_select', 'multi_select', 'user', 'url', 'email')),
    required      boolean NOT NULL DEFAULT false,
    options       text[] NOT NULL DEFAULT '{}',
    default_value jsonb,
    position      integer NOT NULL DEFAULT 0,
    deleted_at    timestamptz,
    version       integer NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT custom_field_definitions_key UNIQUE (tenant_id, record_type, key)
)
"""


def upgrade() -> None:
    op.execute(SCHEMA)
    name = "custom_field_definitions"
    op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
               f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {APP_ROLE}")
    for event, image in EVENTS:
        op.execute(f"CREATE TRIGGER {name}_{event.lower()}_versions AFTER {event} ON {name} "
                   f"REFERENCING {image} TABLE AS changed FOR EACH STATEMENT "
                   "EXECUTE FUNCTION atrium_bump_versions()")
    for table in WITH_VALUES:
        op.execute(f"ALTER TABLE {table} ADD COLUMN custom_fields jsonb NOT NULL DEFAULT '{{}}'")
        op.execute(f"CREATE INDEX {table}_custom_fields_idx ON {table} USING gin (custom_fields jsonb_path_ops)")
    op.execute(LEAKPROOF.format(setting="LEAKPROOF"))


LEAKPROOF = """
DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        ALTER FUNCTION pg_catalog.jsonb_contains(jsonb, jsonb) {setting};
    ELSE
        RAISE NOTICE 'not a superuser: jsonb_contains left as it is (custom field filters scan under RLS)';
    END IF;
END
$$
"""


def downgrade() -> None:
    op.execute(LEAKPROOF.format(setting="NOT LEAKPROOF"))
    for table in WITH_VALUES:
        op.execute(f"ALTER TABLE {table} DROP COLUMN custom_fields")
    op.execute("DROP TABLE custom_field_definitions")
