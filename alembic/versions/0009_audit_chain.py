"""A tamper-evident audit log: each tenant's audit events form a SHA-256 hash chain.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``audit_events`` gains ``seq`` (1, 2, 3... per tenant, in commit order), ``salt`` (16 random bytes),
  ``diff_sha256`` (SHA-256 of ``salt`` and the diff's JSON text: the commitment to the diff that the
  chain covers, so a diff can later be redacted without breaking the chain, and the salt, deleted
  with it, makes the commitment unguessable), ``prev_hash`` and ``hash``::

      hash = sha256(prev_hash || utf8(canonical(row)))
      canonical(row) = 'atrium-audit-v1' || f(tenant_id) || f(seq) || f(id) || f(occurred_at UTC, microseconds)
                       || f(actor_id) || f(action) || f(entity_type) || f(entity_id) || f(hex(diff_sha256))
                       || f(request_id)
      f(NULL) = '-'      f(v) = length(v) || ':' || v

  The first row's ``prev_hash`` is 32 zero bytes (or, after retention deleted a prefix, the hash of
  the last deleted row: the anchor). ``models/audit_chain.py`` recomputes all of it in Python.
- ``audit_chain_heads``: per tenant, the last ``seq`` and ``hash`` (the head) and the anchor
  (``anchor_seq``, ``anchor_hash``: where verification starts). The BEFORE INSERT trigger
  ``audit_events_chain`` locks the tenant's head row (``FOR UPDATE``), links the new row to it and
  advances it, in the inserting transaction: inserts of one tenant are chained one after another
  (the lock is held to commit, so ``seq`` order is commit order), and a rolled-back change leaves no
  link behind. Whatever a writer puts in the chain columns is overwritten. The application role
  only reads its own tenant's head (row-level security as on every tenant table).
- Existing rows are chained here, per tenant in ``(occurred_at, id)`` order.

Revision ID: 0009_audit_chain
Revises: 0007_idempotency_keys
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0009_audit_chain"
down_revision = "0008_webhooks"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
GENESIS = "decode(repeat('00', 32), 'hex')"

SCHEMA = f"""
ALTER TABLE audit_events
    ADD COLUMN seq bigint,
    ADD COLUMN salt bytea,
    ADD COLUMN diff_sha256 bytea,
    ADD COLUMN prev_hash bytea,
    ADD COLUMN hash bytea;

CREATE TABLE audit_chain_heads (
    tenant_id   uuid PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    seq         bigint NOT NULL,
    hash        bytea NOT NULL,
    anchor_seq  bigint NOT NULL DEFAULT 0,
    anchor_hash bytea NOT NULL DEFAULT {GENESIS},
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION atrium_audit_field(v text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN v IS NULL THEN '-' ELSE length(v)::text || ':' || v END
$$;

CREATE FUNCTION atrium_audit_hash(e audit_events, prev bytea) RETURNS bytea
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT sha256(prev || convert_to('atrium-audit-v1'
        || atrium_audit_field(e.tenant_id::text)
        || atrium_audit_field(e.seq::text)
        || atrium_audit_field(e.id::text)
        || atrium_audit_field(to_char(e.occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'))
        || atrium_audit_field(e.actor_id::text)
        || atrium_audit_field(e.action::text)
        || atrium_audit_field(e.entity_type::text)
        || atrium_audit_field(e.entity_id::text)
        || atrium_audit_field(encode(e.diff_sha256, 'hex'))
        || atrium_audit_field(e.request_id::text), 'UTF8'))
$$;

CREATE FUNCTION atrium_audit_chain() RETURNS trigger
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
$$;

DO $$
DECLARE
    e       audit_events;
    tenant  uuid;
    n       bigint := 0;
    prev    bytea;
    genesis CONSTANT bytea := {GENESIS};
BEGIN
    FOR e IN SELECT * FROM audit_events ORDER BY tenant_id, occurred_at, id LOOP
        IF tenant IS DISTINCT FROM e.tenant_id THEN
            IF tenant IS NOT NULL THEN
                INSERT INTO audit_chain_heads (tenant_id, seq, hash) VALUES (tenant, n, prev);
            END IF;
            tenant := e.tenant_id;
            n := 0;
            prev := genesis;
        END IF;
        n := n + 1;
        e.seq := n;
        e.salt := uuid_send(gen_random_uuid());
        e.diff_sha256 := sha256(e.salt || convert_to(e.diff::text, 'UTF8'));
        e.prev_hash := prev;
        e.hash := atrium_audit_hash(e, prev);
        UPDATE audit_events SET seq = e.seq, salt = e.salt, diff_sha256 = e.diff_sha256, prev_hash = e.prev_hash,
                                hash = e.hash
        WHERE tenant_id = e.tenant_id AND id = e.id;
        prev := e.hash;
    END LOOP;
    IF tenant IS NOT NULL THEN
        INSERT INTO audit_chain_heads (tenant_id, seq, hash) VALUES (tenant, n, prev);
    END IF;
END
$$;

ALTER TABLE audit_events
    ALTER COLUMN seq SET NOT NULL,
    ALTER COLUMN diff_sha256 SET NOT NULL,
    ALTER COLUMN prev_hash SET NOT NULL,
    ALTER COLUMN hash SET NOT NULL;

CREATE UNIQUE INDEX audit_events_seq_key ON audit_events (tenant_id, seq);

CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events
FOR EACH ROW EXECUTE FUNCTION atrium_audit_chain()
"""


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n\n"):
        if statement.strip():
            op.execute(statement)
    op.execute("ALTER TABLE audit_chain_heads ENABLE ROW LEVEL SECURITY")
    op.execute("ALTER TABLE audit_chain_heads FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON audit_chain_heads TO {APP_ROLE} "
               f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})")
    op.execute(f"GRANT SELECT ON audit_chain_heads TO {APP_ROLE}")
    op.execute("REVOKE ALL ON FUNCTION atrium_audit_chain() FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_events_chain ON audit_events")
    op.execute("DROP FUNCTION atrium_audit_chain()")
    op.execute("DROP FUNCTION atrium_audit_hash(audit_events, bytea)")
    op.execute("DROP FUNCTION atrium_audit_field(text)")
    op.execute("DROP TABLE audit_chain_heads")
    op.execute("DROP INDEX audit_events_seq_key")
    op.execute("ALTER TABLE audit_events DROP COLUMN seq, DROP COLUMN salt, DROP COLUMN diff_sha256, "
               "DROP COLUMN prev_hash, DROP COLUMN hash")
