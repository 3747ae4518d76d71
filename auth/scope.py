"""``Scope``: everything about a caller that decides what they may see, as one value.

Work that is shared between callers is keyed by it, so two callers who may see different things
never share it: a cached planned answer (``planner.answers``) and one execution of a subscription
for many subscribers (``atrium.http.websocket.Grouping``). Today it holds the role (permissions)
and the record-level view (``models.visibility.View``: whose records of which types); a new rule
that narrows what a caller sees (field-level permissions, say) adds a field here and to ``key``, and
both places follow.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.tables import Role
from models.visibility import View


@dataclass(frozen=True)
class Scope:
    """What one caller may see (module docstring). Frozen and hashable; ``key`` is its stable text."""

    role: Role
    view: View

    @property
    def key(self) -> str:
        """Equal for two scopes that see the same thing (callers with equal keys may share answers)."""
        return f"{self.role.value}|{self.view.key}"
