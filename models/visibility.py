"""Record-level visibility as a transaction carries it: the viewer (``View``) and its two enforcements.

A ``View`` is what ``atrium_enter`` (migration 0016) found for one member of one tenant: their id, the
teams they belong to or manage, their *peers* (themselves and everyone in those teams) and the record
types whose audience is ``team`` for them (none for admins and owners, who see everything). The same
view reaches PostgreSQL and the application's own SQL, from one place:

- **Row-level security**: every transaction a ``models.db.TenantScope`` begins sets the view's
  settings transaction-locally with the tenant (``atrium.user_id``, ``atrium.team_ids``,
  ``atrium.sees_all``; ``View.settings``), and the policy of an owned table reads them. A
  transaction that set only the tenant sees no restricted record (it fails closed); the system's
  own work (``Databases.tenant_transaction`` without a view, exports, purges) sees all (``SYSTEM``).
- **The application's filter**: ``RESTRICTED`` and ``PEERS`` are bind parameters whose values come
  from the view of the statement being run (``current_view``): ``records.declare.Record.visible``
  adds ``type <> ALL(:restricted) OR owner = ANY(:peers)`` to every query of an owned record. A
  statement run outside any view binds NULL for both, which matches no restricted-type row (fails
  closed too). Plans bind them explicitly (``View.params``), as they bind the tenant.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, String, bindparam
from sqlalchemy.dialects.postgresql import ARRAY, UUID

SETTINGS_SQL = ("SELECT set_config('app.tenant_id', $1, true), set_config('atrium.user_id', $2, true), "
                "set_config('atrium.team_ids', $3, true), set_config('atrium.sees_all', $4, true)")
"""One statement setting the tenant and a view (what a transaction that did not enter runs first)."""


@dataclass(frozen=True)
class View:
    """Whose records of which types one transaction sees (module docstring). Frozen, hashable."""

    user_id: uuid.UUID | None = None
    teams: frozenset[uuid.UUID] = frozenset()
    peers: frozenset[uuid.UUID] = frozenset()
    """Owners whose records of a restricted type are visible: the user and the members of their teams."""
    restricted: frozenset[str] = frozenset()
    """Record types (``Record.name``) whose audience is ``team`` for this viewer."""
    sees_all: bool = False
    """An admin or owner (or the system): no record is hidden (``restricted`` is then empty)."""

    @property
    def key(self) -> str:
        """Equal for two views that see the same records: what shared work (cached answers, subscription
        executions) is keyed by. Everything visible: ``all``."""
        if not self.restricted:
            return "all"
        return "team:" + ",".join(sorted(self.restricted)) + ":" + ",".join(sorted(map(str, self.peers)))

    def params(self) -> dict[str, Any]:
        """The values of ``RESTRICTED`` and ``PEERS`` (the application's filter)."""
        return {RESTRICTED.key: sorted(self.restricted), PEERS.key: sorted(self.peers)}

    def sees(self, record_type: str, owner: uuid.UUID | None) -> bool:
        """Whether a record of ``record_type`` owned by ``owner`` is visible (the rule in Python, for
        things that are not rows: change events)."""
        return record_type not in self.restricted or (owner is not None and owner in self.peers)

    def settings(self, tenant_id: uuid.UUID) -> tuple[str, str, str, str]:
        """The arguments of ``SETTINGS_SQL``."""
        teams = "{" + ",".join(sorted(map(str, self.teams))) + "}"
        return (str(tenant_id), "" if self.user_id is None else str(self.user_id), teams,
                "on" if self.sees_all else "off")


SYSTEM = View(sees_all=True)
"""The system's own work on a tenant (exports, purges, routing): sees every record."""

NOBODY = View()
"""A transaction without a viewer: sees no record of a restricted type."""

_CURRENT: ContextVar[View | None] = ContextVar("atrium_view", default=None)


def current_view() -> View | None:
    """The view of the statement being run (None outside any: the filter then matches no restricted row)."""
    return _CURRENT.get()


@contextmanager
def viewing(view: View) -> Iterator[None]:
    """Statements run in the block bind ``view``'s values (``RESTRICTED``, ``PEERS``)."""
    token = _CURRENT.set(view)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _restricted() -> list[str] | None:
    view = _CURRENT.get()
    return None if view is None else sorted(view.restricted)


def _peers() -> list[uuid.UUID] | None:
    view = _CURRENT.get()
    return None if view is None else sorted(view.peers)


RESTRICTED: BindParameter[Any] = bindparam("scope_restricted", type_=ARRAY(String()), callable_=_restricted)
PEERS: BindParameter[Any] = bindparam("scope_peers", type_=ARRAY(UUID(as_uuid=True)), callable_=_peers)
