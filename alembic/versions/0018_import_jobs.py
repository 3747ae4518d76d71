"""Bulk CSV imports: the job, its uploaded file and its per-row error report.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``import_jobs``: one import of a CSV file into one record type (``resolvers.imports``): its column
  mapping (CSV header -> field), dry-run flag, state, progress (``processed`` rows of ``total``: the
  checkpoint, advanced in the same transaction as the rows it covers, so a job resumed after a crash
  starts exactly after the last committed chunk) and counts of rows created, updated and refused.
- ``import_files``: the uploaded file itself, in PostgreSQL so that any server process can resume
  the job after a restart; deleted when the job ends.
- ``import_errors``: the per-row error report (row number, CSV column, field, error code, message).
- ``atrium_audit_append(actor, request, ids, actions, types, entities, diffs)``: the audit rows of a
  bulk change (an import chunk, a batch write) chained in one call instead of one trigger run per
  row: under the chain head's lock, taken once, it links each row to the one before exactly as the
  ``audit_events_chain`` trigger does (``atrium_audit_hash``; a fresh salt per row), inserts them
  all and advances the head once. The tenant is the transaction's (``app.tenant_id``), never an
  argument. To make that possible the trigger function now runs as the caller (SECURITY INVOKER):
  a row arriving with its chain columns set *from the table owner* (which only the definer
  ``atrium_audit_append`` runs as; an owner could as well disable the trigger) is inserted as it
  is; every other row, the application role's included, is linked by ``atrium_audit_link``
  (SECURITY DEFINER, the former trigger body, refusing to run outside a trigger), whatever its
  writer put in the chain columns. ``models/audit_chain.py`` verifies both kinds alike.
- ``atrium_import_jobs_due()``: the (tenant, job) pairs of every job not yet ended, for the resumer
  that each server runs at start and then periodically (it runs as the application role and claims
  each job, inside that tenant's own transactions, with a session-level advisory lock: a job whose
  process died is free the moment its connection closes). It returns ids only, no tenant data.

Revision ID: 0018_import_jobs
Revises: 0017_custom_fields
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0018_import_jobs"
down_revision = "0017_custom_fields"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
TABLES = ("import_jobs", "import_files", "import_errors")
APPEND = "atrium_audit_append(uuid, text, uuid[], text[], text[], uuid[], jsonb)"
GENESIS = "decode(repeat('00', 32), 'hex')"
CHAIN_0009 = f"""
CREATE OR REPLACE FUNCTION atrium_audit_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    head_seq  bigint;
    head_hash bytea;
BEGIN
    SELECT h.seq, h.hash INTO head_seq, head_hash
    FROM audit_chain_heads h WHERE h.tenant_id = NEW.tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO audit_chain_heads (tenant_id, seq, hash) VALUES (NEW.tenant_id, 0, {GENESIS})
        ON CONFLICT (tenant_id) DO NOTHING;
        SELECT h.seq, h.hash INTO head_seq, head_hash
        FROM audit_chain_heads h WHERE h.tenant_id = NEW.tenant_id FOR UPDATE;
    END IF;
    NEW.seq := head_seq + 1;
    NEW.salt := uuid_send(gen_random_uuid());
    NEW.diff_sha256 := sha256(NEW.salt || convert_to(NEW.diff::text, 'UTF8'));
    NEW.prev_hash := head_hash;
    NEW.hash := atrium_audit_hash(NEW, head_hash);
    UPDATE audit_chain_heads SET seq = NEW.seq, hash = NEW.hash, updated_at = now()
    WHERE tenant_id = NEW.tenant_id;
    RETURN NEW;
END
$$"""

SCHEMA = """
CREATE TABLE import_jobs (
    tenant_id     uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id            uuid NOT NULL,
    requested_by  uuid,
    record_type   varchar(64) NOT NULL,
    mapping       jsonb NOT NULL,
    dry_run       boolean NOT NULL DEFAULT false,
    state         varchar NOT NULL DEFAULT 'queued' CHECK (state IN ('queued', 'running', 'done', 'failed')),
    total         integer NOT NULL DEFAULT 0,
    processed     integer NOT NULL DEFAULT 0,
    created_count integer NOT NULL DEFAULT 0,
    updated_count integer NOT NULL DEFAULT 0,
    error_count   integer NOT NULL DEFAULT 0,
    file_bytes    bigint NOT NULL DEFAULT 0,
    error         text,
    started_at    timestamptz,
    finished_at   timestamptz,
    version       integer NOT NULL DEFAULT 1,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);

CREATE INDEX import_jobs_open_idx ON import_jobs (state) WHERE state IN ('queued', 'running');

CREATE TABLE import_files (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    job_id     uuid NOT NULL,
    content    bytea NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, job_id) REFERENCES import_jobs (tenant_id, id) ON DELETE CASCADE
);

CREATE INDEX import_files_job_idx ON import_files (tenant_id, job_id);

CREATE TABLE import_errors (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    job_id      uuid NOT NULL,
    row_number  integer NOT NULL,
    column_name text,
    field       varchar(200),
    code        varchar(64) NOT NULL,
    message     text NOT NULL,
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, job_id) REFERENCES import_jobs (tenant_id, id) ON DELETE CASCADE
);

CREATE INDEX import_errors_row_idx ON import_errors (tenant_id, job_id, row_number);

CREATE FUNCTION atrium_audit_link(e audit_events) RETURNS audit_events
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    head_seq  bigint;
    head_hash bytea;
BEGIN
    IF pg_trigger_depth() = 0 THEN
        RAISE EXCEPTION 'atrium_audit_link links rows being inserted into audit_events only';
    END IF;
    SELECT h.seq, h.hash INTO head_seq, head_hash
    FROM audit_chain_heads h WHERE h.tenant_id = e.tenant_id FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO audit_chain_heads (tenant_id, seq, hash) VALUES (e.tenant_id, 0, decode(repeat('00', 32), 'hex'))
        ON CONFLICT (tenant_id) DO NOTHING;
        SELECT h.seq, h.hash INTO head_seq, head_hash
        FROM audit_chain_heads h WHERE h.tenant_id = e.tenant_id FOR UPDATE;
    END IF;
    e.seq := head_seq + 1;
    e.salt := uuid_send(gen_random_uuid());
    e.diff_sha256 := sha256(e.salt || convert_to(e.diff::text, 'UTF8'));
    e.prev_hash := head_hash;
    e.hash := atrium_audit_hash(e, head_hash);
    UPDATE audit_chain_heads SET seq = e.seq, hash = e.hash, updated_at = now() WHERE tenant_id = e.tenant_id;
    RETURN e;
END
$$;

CREATE OR REPLACE FUNCTION atrium_audit_chain() RETURNS trigger
LANGUAGE plpgsql SECURITY INVOKER SET search_path FROM CURRENT AS $$
BEGIN
    -- Rows chained by atrium_audit_append (running as the table's owner) are inserted as they are;
    -- every other row is linked here, whatever its writer put in the chain columns.
    IF NEW.hash IS NOT NULL AND current_user = (SELECT pg_get_userbyid(c.relowner) FROM pg_class c
                                                WHERE c.oid = TG_RELID) THEN
        RETURN NEW;
    END IF;
    RETURN atrium_audit_link(NEW);
END
$$;

CREATE FUNCTION atrium_audit_append(p_actor uuid, p_request text, p_ids uuid[], p_actions text[], p_types text[],
                                    p_entities uuid[], p_diffs jsonb) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t         uuid := NULLIF(current_setting('app.tenant_id', true), '')::uuid;
    head_seq  bigint;
    head_hash bytea;
    e         audit_events;
    chained   audit_events[] := '{}';
    n         integer := coalesce(array_length(p_ids, 1), 0);
BEGIN
    IF t IS NULL THEN
        RAISE EXCEPTION 'atrium_audit_append needs the transaction''s tenant (app.tenant_id)';
    END IF;
    IF n = 0 THEN
        RETURN 0;
    END IF;
    IF array_length(p_actions, 1) <> n OR array_length(p_types, 1) <> n OR array_length(p_entities, 1) <> n
       OR jsonb_array_length(p_diffs) <> n THEN
        RAISE EXCEPTION 'atrium_audit_append: the arrays differ in length';
    END IF;
    SELECT h.seq, h.hash INTO head_seq, head_hash FROM audit_chain_heads h WHERE h.tenant_id = t FOR UPDATE;
    IF NOT FOUND THEN
        INSERT INTO audit_chain_heads (tenant_id, seq, hash) VALUES (t, 0, decode(repeat('00', 32), 'hex'))
        ON CONFLICT (tenant_id) DO NOTHING;
        SELECT h.seq, h.hash INTO head_seq, head_hash FROM audit_chain_heads h WHERE h.tenant_id = t FOR UPDATE;
    END IF;
    FOR i IN 1..n LOOP
        e := NULL;
        e.tenant_id := t;
        e.id := p_ids[i];
        e.occurred_at := now();
        e.actor_id := p_actor;
        e.action := p_actions[i];
        e.entity_type := p_types[i];
        e.entity_id := p_entities[i];
        e.diff := p_diffs -> (i - 1);
        e.request_id := p_request;
        e.seq := head_seq + i;
        e.salt := uuid_send(gen_random_uuid());
        e.diff_sha256 := sha256(e.salt || convert_to(e.diff::text, 'UTF8'));
        e.prev_hash := head_hash;
        e.hash := atrium_audit_hash(e, head_hash);
        head_hash := e.hash;
        chained[i] := e;
    END LOOP;
    INSERT INTO audit_events SELECT * FROM unnest(chained);
    UPDATE audit_chain_heads SET seq = head_seq + n, hash = head_hash, updated_at = now() WHERE tenant_id = t;
    RETURN n;
END
$$;

CREATE FUNCTION atrium_import_jobs_due()
RETURNS TABLE (tenant_id uuid, id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT j.tenant_id, j.id FROM import_jobs j WHERE j.state IN ('queued', 'running') ORDER BY j.created_at, j.id
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
    for function in ("atrium_import_jobs_due()", "atrium_audit_link(audit_events)", APPEND):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION atrium_import_jobs_due()")
    op.execute(CHAIN_0009)
    op.execute(f"DROP FUNCTION {APPEND}")
    op.execute("DROP FUNCTION atrium_audit_link(audit_events)")
    for table in ("import_errors", "import_files", "import_jobs"):
        op.execute(f"DROP TABLE {table}")
