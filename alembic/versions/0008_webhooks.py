"""Webhooks: endpoints and the transactional outbox of their deliveries.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``webhook_endpoints``: per tenant, a URL, the event types it wants, an optional filter (JSON) on
  their data, the signing secret encrypted at rest (AES-256-GCM, bytea), whether it is enabled
  and, while its deliveries fail, since when.
- ``webhook_deliveries``: the outbox. A change inserts one row per interested endpoint in its own
  transaction; a dispatcher claims due rows with ``FOR UPDATE SKIP LOCKED`` and records each
  attempt. ``seq`` (an identity) orders the deliveries of one record to one endpoint. Deleting an
  endpoint deletes its deliveries.
- ``atrium_webhook_due(now, limit)`` and ``atrium_webhook_next_due(after)``: SECURITY DEFINER, they
  return only tenant ids with due deliveries and the time of the next one, so that a dispatcher
  (connected as the application role) knows which tenants to enter; everything else it reads and
  writes inside each tenant's own transaction, under row-level security. Their partial index is
  the one index not led by the tenant id: it is the queue's clock, across tenants.

Revision ID: 0008_webhooks
Revises: 0007_idempotency_keys
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0008_webhooks"
down_revision = "0007_idempotency_keys"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"

TENANT_TABLES = ("webhook_endpoints", "webhook_deliveries")

SCHEMA = """
CREATE TABLE webhook_endpoints (
    tenant_id       uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id              uuid NOT NULL,
    url             text NOT NULL,
    description     varchar(200),
    event_types     text[] NOT NULL,
    filter          jsonb,
    secret          bytea NOT NULL,
    enabled         boolean NOT NULL DEFAULT true,
    disabled_reason text,
    disabled_at     timestamptz,
    failing_since   timestamptz,
    created_by      uuid,
    version         integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE INDEX webhook_endpoints_created_idx ON webhook_endpoints (tenant_id, created_at, id);

CREATE TABLE webhook_deliveries (
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id               uuid NOT NULL,
    seq              bigint GENERATED ALWAYS AS IDENTITY,
    endpoint_id      uuid NOT NULL,
    message_id       uuid NOT NULL,
    event_type       varchar(100) NOT NULL,
    ordering_key     uuid NOT NULL,
    body             text NOT NULL,
    status           varchar(10) NOT NULL DEFAULT 'pending',
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    response_status  smallint,
    latency_ms       integer,
    last_error       text,
    delivered_at     timestamptz,
    replay_of        uuid,
    version          integer NOT NULL DEFAULT 1,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    FOREIGN KEY (tenant_id, endpoint_id) REFERENCES webhook_endpoints (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT webhook_deliveries_status CHECK (status IN ('pending', 'delivered', 'failed'))
);
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (tenant_id, endpoint_id, created_at, id);
CREATE INDEX webhook_deliveries_pending_idx ON webhook_deliveries (tenant_id, seq) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (tenant_id, endpoint_id, ordering_key, seq)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at NULLS FIRST)
    WHERE status = 'pending'
"""

FUNCTIONS = ("""
CREATE FUNCTION atrium_webhook_due(p_now timestamptz, p_limit integer)
RETURNS TABLE (tenant_id uuid)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT DISTINCT due.tenant_id FROM (
        SELECT d.tenant_id FROM webhook_deliveries d
        WHERE d.status = 'pending' AND (d.next_attempt_at IS NULL OR d.next_attempt_at <= p_now)
        ORDER BY d.next_attempt_at NULLS FIRST
        LIMIT greatest(p_limit, 1)) due
$$
""", """
CREATE FUNCTION atrium_webhook_next_due(p_after timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT d.next_attempt_at FROM webhook_deliveries d
    WHERE d.status = 'pending' AND d.next_attempt_at > p_after
    ORDER BY d.next_attempt_at
    LIMIT 1
$$
""")


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)
    for name in TENANT_TABLES:
        op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
            f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
        )
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {APP_ROLE}")
    for function in FUNCTIONS:
        op.execute(function)
    for signature in ("atrium_webhook_due(timestamptz, integer)", "atrium_webhook_next_due(timestamptz)"):
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")


def downgrade() -> None:
    op.execute("DROP FUNCTION atrium_webhook_next_due(timestamptz)")
    op.execute("DROP FUNCTION atrium_webhook_due(timestamptz, integer)")
    op.execute("DROP TABLE webhook_deliveries")
    op.execute("DROP TABLE webhook_endpoints")
