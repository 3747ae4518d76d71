"""Partner API: API keys, trusted (persisted) documents, and the APQ cache without Redis.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``api_keys`` and ``persisted_documents`` are tenant tables: tenant_id leads the primary key and
  every index, RLS is enabled and forced with the usual policy, and the app role gets the usual
  grants. One index does not lead with tenant_id: ``api_keys.prefix`` is unique across tenants,
  because a key is found by its public prefix before its tenant is known. That lookup is the
  SECURITY DEFINER function ``atrium_api_key(prefix)``; it takes nothing else and returns only the
  matching key (the caller still has to present the secret, compared with the stored SHA-256).
- ``apq_documents`` caches Automatic Persisted Queries when no Redis is configured. It is global, not
  tenant data: a row is a GraphQL document keyed by the SHA-256 of its own text, so whoever can name
  a row already knows its content, and a row can only be stored under the hash of its text (the
  function computes the hash itself). The app role has no privilege on the table at all and reaches
  it only through ``atrium_apq_get`` (refreshes last use at most once a minute) and
  ``atrium_apq_put`` (stores, then evicts the least recently used rows beyond a cap).

Like ``atrium_login_candidates``, the functions read past RLS because they run as the migrating
role, which must be a superuser or have BYPASSRLS (FORCE applies to a plain table owner).

Revision ID: 0003_partners
Revises: 0002_notes
Create Date: 2026-11-23
"""

from __future__ import annotations

from alembic import op

revision = "0003_partners"
down_revision = "0002_notes"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"

TENANT_TABLES = ("api_keys", "persisted_documents")

SCHEMA = """
CREATE TABLE api_keys (
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id             uuid NOT NULL,
    prefix         varchar(16) NOT NULL CHECK (prefix ~ '^[a-z0-9]{8,16}$'),
    secret_sha256  char(64) NOT NULL CHECK (secret_sha256 ~ '^[0-9a-f]{64}$'),
    name           varchar(100) NOT NULL,
    role           varchar NOT NULL CHECK (role IN ('viewer', 'member', 'admin', 'owner')),
    persisted_only boolean NOT NULL DEFAULT false,
    client         varchar(100),
    created_by     uuid NOT NULL,
    expires_at     timestamptz,
    revoked_at     timestamptz,
    last_used_at   timestamptz,
    version        integer NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
CREATE UNIQUE INDEX api_keys_prefix_key ON api_keys (prefix);
CREATE INDEX api_keys_created_idx ON api_keys (tenant_id, created_at, id);

CREATE TABLE persisted_documents (
    tenant_id      uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id             uuid NOT NULL,
    client         varchar(100) NOT NULL,
    document_id    varchar(200) NOT NULL,
    sha256         char(64) NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    name           varchar(200),
    operation_type varchar NOT NULL CHECK (operation_type IN ('query', 'mutation', 'subscription')),
    body           text NOT NULL,
    created_by     uuid,
    version        integer NOT NULL DEFAULT 1,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, client, document_id)
);
CREATE INDEX persisted_documents_sha256_idx ON persisted_documents (tenant_id, sha256);
CREATE INDEX persisted_documents_document_idx ON persisted_documents (tenant_id, document_id);

CREATE TABLE apq_documents (
    sha256       char(64) PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    document     text NOT NULL CHECK (octet_length(document) <= 1048576),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX apq_documents_last_used_idx ON apq_documents (last_used_at)
"""

FUNCTIONS = ("""
CREATE FUNCTION atrium_api_key(p_prefix text)
RETURNS TABLE (tenant_id uuid, id uuid, secret_sha256 text, role varchar, persisted_only boolean,
               client varchar, created_by uuid, expires_at timestamptz, revoked_at timestamptz,
               last_used_at timestamptz)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT k.tenant_id, k.id, k.secret_sha256::text, k.role, k.persisted_only, k.client, k.created_by,
           k.expires_at, k.revoked_at, k.last_used_at
    FROM api_keys k
    WHERE k.prefix = p_prefix
$$
""", """
CREATE FUNCTION atrium_apq_get(p_sha256 text)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    found text;
BEGIN
    -- Recency for the LRU eviction, written at most once a minute per document.
    UPDATE apq_documents SET last_used_at = now()
    WHERE sha256 = p_sha256 AND last_used_at < now() - interval '60 seconds';
    SELECT document INTO found FROM apq_documents WHERE sha256 = p_sha256;
    RETURN found;
END
$$
""", """
CREATE FUNCTION atrium_apq_put(p_document text, p_max_documents integer)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    digest text := encode(sha256(convert_to(p_document, 'UTF8')), 'hex');
BEGIN
    INSERT INTO apq_documents (sha256, document) VALUES (digest, p_document)
    ON CONFLICT (sha256) DO UPDATE SET last_used_at = now();
    DELETE FROM apq_documents WHERE sha256 IN (
        SELECT sha256 FROM apq_documents ORDER BY last_used_at DESC, sha256
        OFFSET greatest(p_max_documents, 1));
    RETURN digest;
END
$$
""")

SIGNATURES = ("atrium_api_key(text)", "atrium_apq_get(text)", "atrium_apq_put(text, integer)")


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)
    for function in FUNCTIONS:
        op.execute(function)
    for signature in SIGNATURES:
        op.execute(f"REVOKE ALL ON FUNCTION {signature} FROM PUBLIC")
        op.execute(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")
    for name in TENANT_TABLES:
        op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
            f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})"
        )
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {APP_ROLE}")
    # apq_documents: no grant at all; the two functions above are the only way in.


def downgrade() -> None:
    for signature in reversed(SIGNATURES):
        op.execute(f"DROP FUNCTION {signature}")
    for name in ("apq_documents", "persisted_documents", "api_keys"):
        op.execute(f"DROP TABLE {name}")
