"""Core CRM schema, the application role and row-level security.

Frozen: this revision spells out its DDL and imports nothing from the application.

Revision ID: 0001_core
Revises:
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0001_core"
down_revision = None
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"

TENANT_TABLES = (
    "memberships", "companies", "contacts", "pipelines", "stages", "deals", "activities", "audit_events",
)

SCHEMA = """
CREATE TABLE tenants (
    id          uuid PRIMARY KEY,
    slug        varchar(63) NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]*$'),
    name        varchar(200) NOT NULL,
    plan        varchar NOT NULL DEFAULT 'free' CHECK (plan IN ('free', 'pro', 'enterprise')),
    isolation   varchar NOT NULL DEFAULT 'shared' CHECK (isolation IN ('shared', 'dedicated')),
    database_url text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (isolation = 'shared' OR database_url IS NOT NULL)
);

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    email         varchar(320) NOT NULL,
    name          varchar(200) NOT NULL,
    password_hash text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE memberships (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role       varchar NOT NULL CHECK (role IN ('viewer', 'member', 'admin', 'owner')),
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, user_id)
);

CREATE TABLE companies (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    name       varchar(200) NOT NULL,
    domain     varchar(253),
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX companies_name_idx ON companies (tenant_id, name, id);
CREATE INDEX companies_created_idx ON companies (tenant_id, created_at, id);

CREATE TABLE contacts (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    company_id uuid,
    first_name varchar(100) NOT NULL,
    last_name  varchar(100) NOT NULL,
    email      varchar(320),
    phone      varchar(40),
    title      varchar(200),
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, company_id) REFERENCES companies (tenant_id, id) ON DELETE SET NULL (company_id)
);
CREATE INDEX contacts_company_idx ON contacts (tenant_id, company_id);
CREATE INDEX contacts_name_idx ON contacts (tenant_id, last_name, first_name, id);
CREATE INDEX contacts_created_idx ON contacts (tenant_id, created_at, id);

CREATE TABLE pipelines (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    name       varchar(200) NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE TABLE stages (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    pipeline_id uuid NOT NULL,
    name        varchar(100) NOT NULL,
    position    integer NOT NULL,
    probability numeric(5, 4) NOT NULL CHECK (probability >= 0 AND probability <= 1),
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, pipeline_id, id),
    FOREIGN KEY (tenant_id, pipeline_id) REFERENCES pipelines (tenant_id, id) ON DELETE CASCADE
);
CREATE INDEX stages_pipeline_idx ON stages (tenant_id, pipeline_id, position);

CREATE TABLE deals (
    tenant_id           uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id                  uuid NOT NULL,
    title               varchar(200) NOT NULL,
    amount              numeric(18, 2) NOT NULL CHECK (amount >= 0),
    currency            char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    pipeline_id         uuid NOT NULL,
    stage_id            uuid NOT NULL,
    company_id          uuid,
    contact_id          uuid,
    owner_id            uuid,
    expected_close_date date,
    status              varchar NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'won', 'lost')),
    version             integer NOT NULL DEFAULT 1,
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, pipeline_id, stage_id) REFERENCES stages (tenant_id, pipeline_id, id),
    FOREIGN KEY (tenant_id, company_id) REFERENCES companies (tenant_id, id) ON DELETE SET NULL (company_id),
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id) ON DELETE SET NULL (contact_id),
    FOREIGN KEY (tenant_id, owner_id) REFERENCES memberships (tenant_id, user_id) ON DELETE SET NULL (owner_id)
);
CREATE INDEX deals_created_idx ON deals (tenant_id, created_at, id);
CREATE INDEX deals_amount_idx ON deals (tenant_id, amount, id);
CREATE INDEX deals_close_idx ON deals (tenant_id, (coalesce(expected_close_date, 'infinity'::date)), id);
CREATE INDEX deals_stage_idx ON deals (tenant_id, stage_id);
CREATE INDEX deals_owner_idx ON deals (tenant_id, owner_id);
CREATE INDEX deals_company_idx ON deals (tenant_id, company_id);
CREATE INDEX deals_contact_idx ON deals (tenant_id, contact_id);

CREATE TABLE activities (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    kind        varchar NOT NULL CHECK (kind IN ('note', 'call', 'email', 'meeting', 'task')),
    subject     varchar(200) NOT NULL,
    body        text,
    deal_id     uuid,
    contact_id  uuid,
    company_id  uuid,
    actor_id    uuid,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    due_date    date,
    done        boolean NOT NULL DEFAULT false,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CHECK (num_nonnulls(deal_id, contact_id, company_id) >= 1),
    FOREIGN KEY (tenant_id, deal_id) REFERENCES deals (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, contact_id) REFERENCES contacts (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, company_id) REFERENCES companies (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, actor_id) REFERENCES memberships (tenant_id, user_id) ON DELETE SET NULL (actor_id)
);
CREATE INDEX activities_deal_idx ON activities (tenant_id, deal_id, occurred_at DESC, id DESC);
CREATE INDEX activities_contact_idx ON activities (tenant_id, contact_id, occurred_at DESC, id DESC);
CREATE INDEX activities_company_idx ON activities (tenant_id, company_id, occurred_at DESC, id DESC);
CREATE INDEX activities_occurred_idx ON activities (tenant_id, occurred_at, id);

CREATE TABLE audit_events (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    occurred_at timestamptz NOT NULL DEFAULT now(),
    actor_id    uuid,
    action      varchar NOT NULL,
    entity_type varchar NOT NULL,
    entity_id   uuid NOT NULL,
    diff        jsonb NOT NULL,
    request_id  varchar,
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX audit_events_entity_idx ON audit_events (tenant_id, entity_type, entity_id, occurred_at);
CREATE INDEX audit_events_occurred_idx ON audit_events (tenant_id, occurred_at, id);
"""

# Functions that must see across tenants run as their owner (SECURITY DEFINER), take no
# tenant from the caller beyond what they are for, and pin search_path.
FUNCTIONS = ("""
CREATE FUNCTION atrium_login_candidates(p_tenant_slug text, p_email text)
RETURNS TABLE (tenant_id uuid, user_id uuid, password_hash text, role varchar)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT t.id, u.id, u.password_hash, m.role
    FROM tenants t
    JOIN memberships m ON m.tenant_id = t.id
    JOIN users u ON u.id = m.user_id
    WHERE t.slug = p_tenant_slug AND lower(u.email) = lower(p_email)
$$
""", """
CREATE FUNCTION atrium_ensure_user(p_email text, p_name text, p_password_hash text)
RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    found uuid;
BEGIN
    SELECT id INTO found FROM users WHERE lower(email) = lower(p_email);
    IF found IS NULL THEN
        INSERT INTO users (id, email, name, password_hash)
        VALUES (gen_random_uuid(), p_email, p_name, p_password_hash)
        ON CONFLICT DO NOTHING
        RETURNING id INTO found;
        IF found IS NULL THEN
            SELECT id INTO found FROM users WHERE lower(email) = lower(p_email);
        END IF;
    END IF;
    RETURN found;
END
$$
""")


def upgrade() -> None:
    op.execute(
        f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN
                CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
            END IF;
        END $$;
        """
    )
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)
    for function in FUNCTIONS:
        op.execute(function)
    op.execute("REVOKE ALL ON FUNCTION atrium_login_candidates(text, text) FROM PUBLIC")
    op.execute("REVOKE ALL ON FUNCTION atrium_ensure_user(text, text, text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION atrium_login_candidates(text, text) TO {APP_ROLE}")
    op.execute(f"GRANT EXECUTE ON FUNCTION atrium_ensure_user(text, text, text) TO {APP_ROLE}")
    op.execute(f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}")

    # tenants: a tenant sees only itself; it changes nothing here (administration runs as the owner).
    op.execute("ALTER TABLE tenants ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE tenants FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_isolation ON tenants TO {APP_ROLE} "
        f"USING (id = {CURRENT_TENANT}) WITH CHECK (id = {CURRENT_TENANT})"
    )
    op.execute(f"GRANT SELECT ON tenants TO {APP_ROLE}")

    # users: global rows, visible only through a membership of the current tenant, and read-only to
    # the application: a tenant must never change a person who may belong to other tenants too.
    op.execute("ALTER TABLE users ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE users FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY tenant_members ON users TO {APP_ROLE} USING (EXISTS ("
        f"SELECT 1 FROM memberships m WHERE m.user_id = users.id AND m.tenant_id = {CURRENT_TENANT}))"
    )
    op.execute(f"GRANT SELECT ON users TO {APP_ROLE}")

    for name in TENANT_TABLES:
        op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
            f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
        )
        privileges = "SELECT, INSERT" if name == "audit_events" else "SELECT, INSERT, UPDATE, DELETE"
        op.execute(f"GRANT {privileges} ON {name} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION atrium_ensure_user(text, text, text)")
    op.execute("DROP FUNCTION atrium_login_candidates(text, text)")
    op.execute("DROP POLICY tenant_members ON users")  # it reads memberships
    for name in ("activities", "deals", "stages", "pipelines", "contacts", "companies", "audit_events",
                 "memberships", "users", "tenants"):
        op.execute(f"DROP TABLE {name}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {APP_ROLE}")
    # The role is cluster-wide and may still hold grants in other databases; drop it only when it
    # is free everywhere.
    op.execute(
        f"""
        DO $$ BEGIN
            DROP ROLE {APP_ROLE};
        EXCEPTION WHEN dependent_objects_still_exist THEN
            RAISE NOTICE 'role {APP_ROLE} kept: still used by another database';
        END $$;
        """
    )
