"""One statement to enter a tenant; data versions that every write bumps in its own transaction.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``atrium_enter(tenant, member)``: sets the transaction's tenant (``app.tenant_id``, local to the
  transaction, as ``set_config(..., true)`` does everywhere else) and returns, in the same
  statement, the member's current role, the tenant's plan and the tenant's data versions. A
  request's first statement is this one: the membership check costs no statement of its own. It
  runs as its caller (SECURITY INVOKER), so row-level security applies to what it reads.
- ``data_versions``: per tenant and table, a counter that statement-level triggers on every table
  the API reads increment in the transaction of the write (a write and its version commit
  together, or neither does). Answers cached under the versions of the tables they read are never
  served after a write to one of those tables has committed. A change to a (global) user bumps
  ``users`` in every tenant the user belongs to. The application cannot write versions itself: the
  trigger function runs as its owner, the application role only reads its own tenant's rows.

Revision ID: 0005_enter_and_versions
Revises: 0004_products
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0005_enter_and_versions"
down_revision = "0004_products"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"

VERSIONED_TABLES = (
    "memberships", "companies", "contacts", "pipelines", "stages", "deals", "activities", "audit_events",
    "notes", "products", "deal_line_items", "users",
)
EVENTS = (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))

SCHEMA = """
CREATE TABLE data_versions (
    tenant_id  uuid NOT NULL,
    table_name text NOT NULL,
    version    bigint NOT NULL,
    PRIMARY KEY (tenant_id, table_name)
);

CREATE FUNCTION atrium_bump_versions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_TABLE_NAME = 'users' THEN
        INSERT INTO data_versions AS v (tenant_id, table_name, version)
        SELECT DISTINCT m.tenant_id, 'users', 1 FROM changed c JOIN memberships m ON m.user_id = c.id
        ORDER BY 1
        ON CONFLICT (tenant_id, table_name) DO UPDATE SET version = v.version + 1;
    ELSE
        -- Rows of a tenant that is being deleted (a cascade) leave no version behind.
        INSERT INTO data_versions AS v (tenant_id, table_name, version)
        SELECT DISTINCT c.tenant_id, TG_TABLE_NAME, 1 FROM changed c
        WHERE EXISTS (SELECT FROM tenants t WHERE t.id = c.tenant_id)
        ORDER BY 1
        ON CONFLICT (tenant_id, table_name) DO UPDATE SET version = v.version + 1;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION atrium_forget_versions() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    DELETE FROM data_versions v USING changed c WHERE v.tenant_id = c.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER tenants_forget_versions AFTER DELETE ON tenants
REFERENCING OLD TABLE AS changed FOR EACH STATEMENT EXECUTE FUNCTION atrium_forget_versions();

CREATE FUNCTION atrium_enter(p_tenant uuid, p_member uuid)
RETURNS TABLE (role varchar, plan varchar, tables text[], versions bigint[])
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    RETURN QUERY
    SELECT m.role, t.plan,
           ARRAY(SELECT v.table_name FROM public.data_versions v WHERE v.tenant_id = p_tenant ORDER BY 1),
           ARRAY(SELECT v.version FROM public.data_versions v WHERE v.tenant_id = p_tenant ORDER BY v.table_name)
    FROM public.memberships m JOIN public.tenants t ON t.id = m.tenant_id
    WHERE m.tenant_id = p_tenant AND m.user_id = p_member;
END
$$
"""


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n\n"):
        if statement.strip():
            op.execute(statement)
    for table in VERSIONED_TABLES:
        for event, image in EVENTS:
            op.execute(f"CREATE TRIGGER {table}_{event.lower()}_versions AFTER {event} ON {table} "
                       f"REFERENCING {image} TABLE AS changed FOR EACH STATEMENT "
                       "EXECUTE FUNCTION atrium_bump_versions()")
    op.execute("ALTER TABLE data_versions ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE data_versions FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON data_versions TO {APP_ROLE} "
               f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})")
    op.execute(f"GRANT SELECT ON data_versions TO {APP_ROLE}")
    op.execute("REVOKE ALL ON FUNCTION atrium_bump_versions() FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION atrium_forget_versions() FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION atrium_enter(uuid, uuid) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION atrium_enter(uuid, uuid) TO {APP_ROLE}")


def downgrade() -> None:
    for table in VERSIONED_TABLES:
        for event, _ in EVENTS:
            op.execute(f"DROP TRIGGER {table}_{event.lower()}_versions ON {table}")
    op.execute("DROP TRIGGER tenants_forget_versions ON tenants")
    op.execute("DROP FUNCTION atrium_enter(uuid, uuid)")
    op.execute("DROP FUNCTION atrium_forget_versions()")
    op.execute("DROP FUNCTION atrium_bump_versions()")
    op.execute("DROP TABLE data_versions")
