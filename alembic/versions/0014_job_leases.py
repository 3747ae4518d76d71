"""Export jobs hold a lease; the retention job also empties the trash and reaches dedicated databases;
the webhook outbox's backlog can be measured.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``export_jobs.lease_owner`` / ``lease_expires_at``: the server process running (or about to run)
  an export and until when its claim holds. The process renews it while the job lives; a pending or
  running job whose lease has expired was abandoned (its process crashed) and is failed by whichever
  process notices first (``atrium_abandoned_exports``). Jobs under way before this revision get a
  lease ending ten minutes after their last update (what "stale" meant before).
- ``atrium_abandoned_exports(p_now)``: every (tenant, job) pending or running whose lease ended
  before ``p_now`` (ids only); the caller fails each inside the tenant's own transaction, under RLS,
  re-checking the lease there.
- ``atrium_retention_due()`` also lists every tenant's trash (target ``trash``, its
  ``trash_retention_days``, migration 0012): the trash always has a retention (30 days unless the
  owner chose another), so it is due for every tenant, policy row or not, that has anything in
  the trash (an index-only look at each trashable table's ``_trash_idx``): a round is then one
  transaction per tenant with a trash, not one per tenant.
- ``atrium_dedicated_tenants()``: the ids of the tenants living on a dedicated database, so that the
  server's scheduled jobs (retention, abandoned exports) reach those databases too (their routes are
  then looked up one tenant at a time, as for requests).
- ``atrium_webhook_backlog()``: how many webhook deliveries are pending across tenants and when the
  oldest was written (two numbers, no tenant), for the metrics' outbox backlog gauges.

Revision ID: 0014_job_leases
Revises: 0013_webhook_traceparent
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0014_job_leases"
down_revision = "0013_webhook_traceparent"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"

ABANDONED = """
CREATE FUNCTION atrium_abandoned_exports(p_now timestamptz)
RETURNS TABLE (tenant_id uuid, id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT j.tenant_id, j.id FROM export_jobs j
    WHERE j.status IN ('pending', 'running') AND j.lease_expires_at < p_now
    ORDER BY j.tenant_id, j.id
$$
"""

DEDICATED = """
CREATE FUNCTION atrium_dedicated_tenants()
RETURNS TABLE (tenant_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT t.id FROM tenants t WHERE t.isolation = 'dedicated' ORDER BY t.id
$$
"""

BACKLOG = """
CREATE FUNCTION atrium_webhook_backlog()
RETURNS TABLE (pending bigint, oldest timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT count(*), min(d.created_at) FROM webhook_deliveries d WHERE d.status = 'pending'
$$
"""

DUE = """
CREATE OR REPLACE FUNCTION atrium_retention_due()
RETURNS TABLE (tenant_id uuid, target varchar, keep_days integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT d.tenant_id, d.target, d.keep_days FROM (
        SELECT p.tenant_id, p.target, p.keep_days FROM retention_policies p
        UNION ALL
        SELECT t.id, 'trash'::varchar, t.trash_retention_days FROM tenants t
        WHERE EXISTS (SELECT FROM companies x WHERE x.tenant_id = t.id AND x.deleted_at IS NOT NULL)
           OR EXISTS (SELECT FROM contacts x WHERE x.tenant_id = t.id AND x.deleted_at IS NOT NULL)
           OR EXISTS (SELECT FROM deals x WHERE x.tenant_id = t.id AND x.deleted_at IS NOT NULL)
           OR EXISTS (SELECT FROM activities x WHERE x.tenant_id = t.id AND x.deleted_at IS NOT NULL)
           OR EXISTS (SELECT FROM notes x WHERE x.tenant_id = t.id AND x.deleted_at IS NOT NULL)
           OR EXISTS (SELECT FROM deal_line_items x WHERE x.tenant_id = t.id AND x.deleted_at IS NOT NULL)
    ) d ORDER BY d.tenant_id, d.target
$$
"""

DUE_BEFORE = """
CREATE OR REPLACE FUNCTION atrium_retention_due()
RETURNS TABLE (tenant_id uuid, target varchar, keep_days integer)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT p.tenant_id, p.target, p.keep_days FROM retention_policies p ORDER BY p.tenant_id, p.target
$$
"""


def upgrade() -> None:
    op.execute("ALTER TABLE export_jobs ADD COLUMN lease_owner uuid, ADD COLUMN lease_expires_at timestamptz")
    op.execute("UPDATE export_jobs SET lease_expires_at = updated_at + interval '10 minutes' "
               "WHERE status IN ('pending', 'running')")
    op.execute("CREATE INDEX export_jobs_lease_idx ON export_jobs (lease_expires_at) "
               "WHERE status IN ('pending', 'running')")
    op.execute(ABANDONED)
    op.execute(DEDICATED)
    op.execute(BACKLOG)
    op.execute(DUE)
    for function in ("atrium_abandoned_exports(timestamptz)", "atrium_dedicated_tenants()",
                     "atrium_webhook_backlog()"):
        op.execute(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {function} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute(DUE_BEFORE)
    op.execute("DROP FUNCTION atrium_webhook_backlog()")
    op.execute("DROP FUNCTION atrium_dedicated_tenants()")
    op.execute("DROP FUNCTION atrium_abandoned_exports(timestamptz)")
    op.execute("DROP INDEX export_jobs_lease_idx")
    op.execute("ALTER TABLE export_jobs DROP COLUMN lease_expires_at, DROP COLUMN lease_owner")
