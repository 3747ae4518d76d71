"""Tenant export, erasure and retention.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``export_jobs``: a tenant's export (``exportTenant``): status, progress, size and SHA-256 of the
  archive, when it was finished, until when it is kept, when it was downloaded (once).
- ``export_chunks``: the archive itself, in order (``n``), in PostgreSQL so that any server process
  can serve the download; deleted once downloaded (or by retention).
- ``retention_policies``: per tenant and target (``audit_events``, ``activities``, ...), how many days
  to keep; applied by the retention job.
- ``atrium_audit_trim()``: applies the tenant's ``audit_events`` policy without breaking the chain:
  under the chain head's lock it deletes the longest prefix of the chain older than the cutoff,
  records its last event as the anchor (``audit_chain_heads.anchor_seq``/``anchor_hash``), and
  appends a chained ``retention`` event naming the anchor, so verification starts there and a
  prefix cut by hand (without such an event) is reported. The cutoff comes from the policy, never
  from the caller.
- ``atrium_audit_redact(ids, erasure)``: replaces the diff of the transaction's tenant's events
  ``ids`` by ``{"redacted": true, "erasure": <erasure>}`` and deletes their salt (``eraseContact``);
  the chain keeps each event's ``diff_sha256``, so it still verifies, and the erasure's own chained
  event lists the ids. Erasure and retention events themselves are never redacted.
- ``atrium_retention_due()``: every (tenant, target, days) policy, for the scheduled job, which runs
  as the application role and applies each inside that tenant's own transaction.

Revision ID: 0010_exports
Revises: 0009_audit_chain
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0010_exports"
down_revision = "0009_audit_chain"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
TABLES = ("export_jobs", "export_chunks", "retention_policies")

SCHEMA = """
CREATE TABLE export_jobs (
    tenant_id    uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id           uuid NOT NULL,
    requested_by uuid,
    status       varchar NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'done', 'failed', 'downloaded', 'purged')),
    rows_done    bigint NOT NULL DEFAULT 0,
    rows_total   bigint NOT NULL DEFAULT 0,
    archive_bytes bigint NOT NULL DEFAULT 0,
    sha256       char(64),
    error        text,
    started_at   timestamptz,
    finished_at  timestamptz,
    expires_at   timestamptz,
    downloaded_at timestamptz,
    version      integer NOT NULL DEFAULT 1,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE INDEX export_jobs_created_idx ON export_jobs (tenant_id, created_at, id);

CREATE TABLE export_chunks (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    job_id     uuid NOT NULL,
    n          integer NOT NULL,
    data       bytea NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, job_id, n),
    FOREIGN KEY (tenant_id, job_id) REFERENCES export_jobs (tenant_id, id) ON DELETE CASCADE
);

CREATE TABLE retention_policies (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    target     varchar(64) NOT NULL,
    keep_days  integer NOT NULL CHECK (keep_days >= 0),
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT retention_policies_target_key UNIQUE (tenant_id, target)
);

CREATE FUNCTION atrium_audit_trim() RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t         uuid := NULLIF(current_setting('app.tenant_id', true), '')::uuid;
    keep      integer;
    cutoff    timestamptz;
    head      audit_chain_heads;
    through   bigint;
    through_h bytea;
    deleted   bigint;
BEGIN
    IF t IS NULL THEN
        RAISE EXCEPTION 'atrium_audit_trim needs the transaction''s tenant (app.tenant_id)';
    END IF;
    SELECT p.keep_days INTO keep FROM retention_policies p WHERE p.tenant_id = t AND p.target = 'audit_events';
    IF keep IS NULL THEN
        RETURN 0;
    END IF;
    cutoff := now() - make_interval(days => keep);
    SELECT * INTO head FROM audit_chain_heads h WHERE h.tenant_id = t FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    -- The longest prefix of the chain whose events are all older than the cutoff.
    SELECT coalesce(min(e.seq) - 1, head.seq) INTO through
    FROM audit_events e WHERE e.tenant_id = t AND e.seq > head.anchor_seq AND e.occurred_at >= cutoff;
    IF through <= head.anchor_seq THEN
        RETURN 0;
    END IF;
    SELECT e.hash INTO through_h FROM audit_events e WHERE e.tenant_id = t AND e.seq = through;
    DELETE FROM audit_events e WHERE e.tenant_id = t AND e.seq <= through;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    UPDATE audit_chain_heads SET anchor_seq = through, anchor_hash = through_h, updated_at = now()
    WHERE tenant_id = t;
    INSERT INTO audit_events (tenant_id, id, action, entity_type, entity_id, diff)
    VALUES (t, gen_random_uuid(), 'retention', 'AuditLog', t,
            jsonb_build_object('throughSeq', through, 'anchorHash', encode(through_h, 'hex'), 'deleted', deleted,
                               'keepDays', keep));
    RETURN deleted;
END
$$;

CREATE FUNCTION atrium_audit_redact(p_ids uuid[], p_erasure uuid) RETURNS SETOF uuid
LANGUAGE sql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    UPDATE audit_events
    SET diff = jsonb_build_object('redacted', true, 'erasure', p_erasure::text), salt = NULL
    WHERE tenant_id = NULLIF(current_setting('app.tenant_id', true), '')::uuid
      AND id = ANY (p_ids) AND salt IS NOT NULL AND action NOT IN ('erase', 'retention')
    RETURNING id
$$;

CREATE FUNCTION atrium_retention_due()
RETURNS TABLE (tenant_id uuid, target varchar, keep_days integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT p.tenant_id, p.target, p.keep_days FROM retention_policies p ORDER BY p.tenant_id, p.target
$$
"""


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n\n"):
        if statement.strip():
            op.execute(statement)
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON {table} TO {APP_ROLE} "
                   f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})")
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP_ROLE}")
    for function in ("atrium_audit_trim()", "atrium_audit_redact(uuid[], uuid)", "atrium_retention_due()"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION atrium_retention_due()")
    op.execute("DROP FUNCTION atrium_audit_redact(uuid[], uuid)")
    op.execute("DROP FUNCTION atrium_audit_trim()")
    for table in ("export_chunks", "export_jobs", "retention_policies"):
        op.execute(f"DROP TABLE {table}")
