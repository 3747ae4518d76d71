"""Record-level visibility: teams, a per-tenant audience for each owned record type, and RLS that uses them.

Frozen: this revision spells out its DDL and imports nothing from the application.

- ``teams`` (name unique in the tenant, an optional manager) and ``team_members``: composite foreign
  keys keep both in the tenant and tie members and managers to memberships, so a person who leaves
  the workspace leaves its teams (a manager's team keeps no manager).
- ``record_visibility``: per tenant and record type (its GraphQL name, ``Deal``), who sees a record:
  ``workspace`` (every member; also what a type without a row gets) or ``team`` (its owner, the
  members of the owner's teams, the managers of those teams, and the workspace's admins and owners).
- ``atrium_enter(tenant, member, role)`` (replacing the two-argument one of 0005) also sets, transaction-
  locally like the tenant, ``atrium.user_id``, ``atrium.team_ids`` (the teams the member belongs to or
  manages) and ``atrium.sees_all`` (``on`` for admins and owners, the role capped by the credential's
  ``role``), and returns the teams, the *peers* (the member and everyone in those teams: whose
  records a ``team`` audience shows) and the types restricted for the member (none when they see all).
- The ``tenant_isolation`` policy of ``deals`` (the one record type with an owner) also hides a deal
  of a ``team``-audience type unless the transaction sees all, or the deal's owner is the
  transaction's user or a member of one of its teams. Without those settings (a transaction that
  set only the tenant) such deals are hidden: it fails closed. WITH CHECK stays the tenant and the
  trash: who may hand a deal to whom is the application's rule (it refuses an owner outside the
  caller's peers, so no write ends in a policy violation).
- The policies of ``deal_line_items`` and ``notes`` (deleted with their deal) show a row of a deal
  only while that deal is visible (the deals policy decides, inside theirs).
- Writes to the three tables bump the data versions (0005), so cached answers follow them.

Revision ID: 0016_visibility
Revises: 0015_field_rules
Create Date: 2026-12-01
"""

from __future__ import annotations

from alembic import op

revision = "0016_visibility"
down_revision = "0015_field_rules"
branch_labels = None
depends_on = None

APP_ROLE = "atrium_app"
CURRENT_TENANT = "(SELECT NULLIF(current_setting('app.tenant_id', true), '')::uuid)"
SHOWING_TRASH = "(SELECT coalesce(current_setting('atrium.trash', true), '') = 'on')"
SEES_ALL = "(SELECT coalesce(current_setting('atrium.sees_all', true), '') = 'on')"
CURRENT_USER_ID = "(SELECT NULLIF(current_setting('atrium.user_id', true), '')::uuid)"
CURRENT_TEAMS = "coalesce(NULLIF(current_setting('atrium.team_ids', true), ''), '{}')::uuid[]"

TABLES = ("teams", "team_members", "record_visibility")
EVENTS = (("INSERT", "NEW"), ("UPDATE", "NEW"), ("DELETE", "OLD"))

SCHEMA = """
CREATE TABLE teams (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    name       varchar(100) NOT NULL,
    manager_id uuid,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT teams_name_key UNIQUE (tenant_id, name),
    FOREIGN KEY (tenant_id, manager_id) REFERENCES memberships (tenant_id, user_id) ON DELETE SET NULL (manager_id)
);
CREATE INDEX teams_manager_idx ON teams (tenant_id, manager_id);

CREATE TABLE team_members (
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id         uuid NOT NULL,
    team_id    uuid NOT NULL,
    user_id    uuid NOT NULL,
    version    integer NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT team_members_key UNIQUE (tenant_id, team_id, user_id),
    FOREIGN KEY (tenant_id, team_id) REFERENCES teams (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, user_id) REFERENCES memberships (tenant_id, user_id) ON DELETE CASCADE
);
CREATE INDEX team_members_user_idx ON team_members (tenant_id, user_id, team_id);

CREATE TABLE record_visibility (
    tenant_id   uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    id          uuid NOT NULL,
    record_type varchar(64) NOT NULL,
    audience    varchar(16) NOT NULL CHECK (audience IN ('workspace', 'team')),
    version     integer NOT NULL DEFAULT 1,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    CONSTRAINT record_visibility_type_key UNIQUE (tenant_id, record_type)
)
"""

ENTER = """
CREATE FUNCTION atrium_enter(p_tenant uuid, p_member uuid, p_role text)
RETURNS TABLE (role varchar, plan varchar, tables text[], versions bigint[], teams uuid[], peers uuid[],
               restricted text[])
LANGUAGE plpgsql VOLATILE SECURITY INVOKER AS $$
DECLARE
    ranks constant text[] := ARRAY['viewer', 'member', 'admin', 'owner'];
    v_role varchar;
    v_teams uuid[];
    v_all boolean;
BEGIN
    PERFORM set_config('app.tenant_id', p_tenant::text, true);
    SELECT m.role INTO v_role FROM public.memberships m WHERE m.tenant_id = p_tenant AND m.user_id = p_member;
    v_teams := ARRAY(SELECT t.id FROM public.teams t WHERE t.tenant_id = p_tenant AND t.manager_id = p_member
                     UNION
                     SELECT tm.team_id FROM public.team_members tm WHERE tm.tenant_id = p_tenant AND tm.user_id = p_member
                     ORDER BY 1);
    v_all := v_role IS NOT NULL
             AND least(array_position(ranks, v_role::text), coalesce(array_position(ranks, p_role), 4)) >= 3;
    PERFORM set_config('atrium.user_id', p_member::text, true);
    PERFORM set_config('atrium.team_ids', v_teams::text, true);
    PERFORM set_config('atrium.sees_all', CASE WHEN v_all THEN 'on' ELSE 'off' END, true);
    RETURN QUERY
    SELECT m.role, t.plan,
           ARRAY(SELECT v.table_name FROM public.data_versions v WHERE v.tenant_id = p_tenant ORDER BY 1),
           ARRAY(SELECT v.version FROM public.data_versions v WHERE v.tenant_id = p_tenant ORDER BY v.table_name),
           v_teams,
           CASE WHEN v_all THEN '{}'::uuid[] ELSE ARRAY(
               SELECT p_member UNION SELECT tm.user_id FROM public.team_members tm
               WHERE tm.tenant_id = p_tenant AND tm.team_id = ANY (v_teams) ORDER BY 1) END,
           CASE WHEN v_all THEN '{}'::text[] ELSE ARRAY(
               SELECT r.record_type::text FROM public.record_visibility r
               WHERE r.tenant_id = p_tenant AND r.audience = 'team' ORDER BY 1) END
    FROM public.memberships m JOIN public.tenants t ON t.id = m.tenant_id
    WHERE m.tenant_id = p_tenant AND m.user_id = p_member;
END
$$
"""

OLD_ENTER = """
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

TENANT_AND_TRASH = f"tenant_id = {CURRENT_TENANT} AND (deleted_at IS NULL OR {SHOWING_TRASH})"


def owned(record_type: str, owner: str) -> str:
    """A row of ``record_type`` (owner column ``owner``) is visible to the transaction's viewer."""
    return (f"({SEES_ALL} OR NOT EXISTS (SELECT FROM record_visibility v WHERE v.tenant_id = {CURRENT_TENANT} "
            f"AND v.record_type = '{record_type}' AND v.audience = 'team') "
            f"OR {owner} = {CURRENT_USER_ID} "
            f"OR {owner} IN (SELECT m.user_id FROM team_members m WHERE m.tenant_id = {CURRENT_TENANT} "
            f"AND m.team_id = ANY ({CURRENT_TEAMS})))")


def follows(record_type: str, key: str, table: str) -> str:
    """A row that belongs to a row of ``table`` (an owned type) through ``key`` is visible with it
    (that row's own policy decides)."""
    return (f"({SEES_ALL} OR NOT EXISTS (SELECT FROM record_visibility v WHERE v.tenant_id = {CURRENT_TENANT} "
            f"AND v.record_type = '{record_type}' AND v.audience = 'team') OR {key} IS NULL "
            f"OR EXISTS (SELECT FROM {table} o WHERE o.tenant_id = {CURRENT_TENANT} AND o.id = {key}))")


FOLLOWING = (("deal_line_items", "deal_id"), ("notes", "deal_id"))
"""Tables whose rows are seen with the deal they belong to (deleted with it)."""


def upgrade() -> None:
    # asyncpg runs one statement per call.
    for statement in SCHEMA.split(";\n"):
        if statement.strip():
            op.execute(statement)
    for name in TABLES:
        op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
        op.execute(f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
                   f"USING (tenant_id = {CURRENT_TENANT}) WITH CHECK (tenant_id = {CURRENT_TENANT})")
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {APP_ROLE}")
        for event, image in EVENTS:
            op.execute(f"CREATE TRIGGER {name}_{event.lower()}_versions AFTER {event} ON {name} "
                       f"REFERENCING {image} TABLE AS changed FOR EACH STATEMENT "
                       "EXECUTE FUNCTION atrium_bump_versions()")
    op.execute("DROP FUNCTION atrium_enter(uuid, uuid)")
    op.execute(ENTER)
    op.execute("REVOKE ALL ON FUNCTION atrium_enter(uuid, uuid, text) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION atrium_enter(uuid, uuid, text) TO {APP_ROLE}")
    op.execute("DROP POLICY tenant_isolation ON deals")
    op.execute(f"CREATE POLICY tenant_isolation ON deals TO {APP_ROLE} "
               f"USING ({TENANT_AND_TRASH} AND {owned('Deal', 'owner_id')}) WITH CHECK ({TENANT_AND_TRASH})")
    for name, key in FOLLOWING:
        op.execute(f"DROP POLICY tenant_isolation ON {name}")
        op.execute(f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
                   f"USING ({TENANT_AND_TRASH} AND {follows('Deal', key, 'deals')}) WITH CHECK ({TENANT_AND_TRASH})")


def downgrade() -> None:
    for name in ("deals", *(name for name, _ in FOLLOWING)):
        op.execute(f"DROP POLICY tenant_isolation ON {name}")
        op.execute(f"CREATE POLICY tenant_isolation ON {name} TO {APP_ROLE} "
                   f"USING ({TENANT_AND_TRASH}) WITH CHECK ({TENANT_AND_TRASH})")
    op.execute("DROP FUNCTION atrium_enter(uuid, uuid, text)")
    op.execute(OLD_ENTER)
    op.execute("REVOKE ALL ON FUNCTION atrium_enter(uuid, uuid) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION atrium_enter(uuid, uuid) TO {APP_ROLE}")
    for name in reversed(TABLES):
        op.execute(f"DROP TABLE {name}")
