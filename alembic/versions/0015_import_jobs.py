"""Bulk CSV imports: the job, its uploaded file and its per-row error report.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``import_jobs``: one import of a CSV file into one record type (``resolvers.imports``): its column
  mapping (CSV header -> field), dry-run flag, state, progress (``processed`` rows of ``total``: the
  checkpoint, advanced in the same transaction as the rows it covers, so a job resumed after a crash
  starts exactly after the last committed chunk) and counts of rows created, updated and refused.
- ``import_files``: the uploaded file itself, in PostgreSQL so that any server process can resume
  the job after a restart; deleted when the job ends.
- ``import_errors``: the per-row error report (row number, CSV column, field, error code, message).
- ``atrium_import_jobs_due()``: the (tenant, job) pairs of every job not yet ended, for the resumer
  that each server runs at start and then periodically (it runs as the application role and claims
  each job, inside that tenant's own transactions, with a session-level advisory lock: a job whose
  process died is free the moment its connection closes). It returns ids only, no tenant data.

Revision ID: 0015_import_jobs
Revises: 0013_webhook_traceparent
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0015_import_jobs"
down_revision = "0013_webhook_traceparent"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
TABLES = ("import_jobs", "import_files", "import_errors")

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
    op.execute("REVOKE ALL ON FUNCTION atrium_import_jobs_due() FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION atrium_import_jobs_due() TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION atrium_import_jobs_due()")
    for table in ("import_errors", "import_files", "import_jobs"):
        op.execute(f"DROP TABLE {table}")
