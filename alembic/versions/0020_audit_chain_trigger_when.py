"""Rows that ``atrium_audit_append`` chained no longer call the chain trigger's function at all.

Frozen: this revision spells out its DDL and imports nothing from the application.

``audit_events_chain`` (0009, made SECURITY INVOKER by 0018) ran its PL/pgSQL function for every
row inserted: for a row chained by ``atrium_audit_append`` (its chain columns set, inserted as the
table's owner) only to look the owner up in ``pg_class`` and return the row as it is. With the
function's ``SET search_path`` that was about 10 ms per 1,000 audit rows of an import chunk or a
batch write, a fifth of the whole append.

The trigger now has a ``WHEN`` condition with the same test, evaluated by the executor without a
function call: ``NEW.hash IS NULL OR current_user <> <the owner>``. The owner is read from the
catalog when this revision runs (a ``WHEN`` condition cannot hold a subquery); its operators and
functions are bound when the trigger is created, so no search_path of the caller's can change
them. Every row the condition lets through still goes to ``atrium_audit_chain``, which keeps its
own check against the owner of the moment: the condition only skips the call for the role that
owned the table when this revision ran, inserting rows with their chain columns set, which is
what ``atrium_audit_append`` (owned by that role) does. After an ``ALTER TABLE … OWNER TO``, rows
of the new owner go through the function and its check as before.

Revision ID: 0020_audit_chain_trigger_when
Revises: 0019_import_dedupe_indexes
Create Date: 2026-12-02
"""

from __future__ import annotations

from sqlalchemy import text

from alembic import op

revision = "0020_audit_chain_trigger_when"
down_revision = "0019_import_dedupe_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    owner = op.get_bind().execute(text(
        "SELECT relowner::integer FROM pg_class WHERE oid = 'audit_events'::regclass")).scalar_one()
    op.execute("DROP TRIGGER audit_events_chain ON audit_events")
    op.execute("CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events FOR EACH ROW "
               f"WHEN (NEW.hash IS NULL OR current_user <> pg_catalog.pg_get_userbyid({int(owner)}::oid)) "
               "EXECUTE FUNCTION atrium_audit_chain()")


def downgrade() -> None:
    op.execute("DROP TRIGGER audit_events_chain ON audit_events")
    op.execute("CREATE TRIGGER audit_events_chain BEFORE INSERT ON audit_events "
               "FOR EACH ROW EXECUTE FUNCTION atrium_audit_chain()")
