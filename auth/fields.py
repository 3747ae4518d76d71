"""Field rules: which fields of which record types a tenant hides from which roles.

A tenant's rules are data (``field_rules``, migration 0018), managed by ``resolvers.field_rules``.
A session carries the rules of its tenant (``FieldRules``) and asks them what its role may not
see: ``rules.hidden(role, "Deal")`` is the set of the Deal's hidden field names (the API's names,
``amount``; a custom field as ``custom.<key>``, ``records.custom.rule_name``). Every read path asks
that one question: the object types' guarded fields
(``schema.objects.guarded``), filters and orderings (``Record.refuse_hidden``), aggregates, the
planner (a plan reading a hidden field falls back to the executor), change events and audit reads;
the write path refuses input naming a hidden field.

Loading: a request of a member reads the data version of ``field_rules`` with its membership
(``atrium_enter``, no statement of its own); the rules of that version are kept in process, so the
table is read once per tenant and change. A version of 0 means the tenant never had a rule. A scope
without that version (a subscription event) reads the table.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncConnection

from models.db import TenantScope
from models.tables import FIELD_RULES, Role

TABLE = FIELD_RULES.name
KEEP = 1024
"""Tenants whose current rules are kept in process (least recently used out)."""


@dataclass(frozen=True)
class FieldRules:
    """One tenant's rules: ``(record type, field) -> roles it is hidden from``, and their version."""

    hidden_from: Mapping[tuple[str, str], frozenset[Role]] = field(default_factory=dict)
    version: int = 0
    """The data version of ``field_rules`` they were read at (part of cached answers' keys)."""

    def hidden(self, role: Role, record_type: str) -> frozenset[str]:
        """The fields of ``record_type`` hidden from ``role`` (the owner sees every field)."""
        if not self.hidden_from or role is Role.OWNER:
            return frozenset()
        return frozenset(name for (kind, name), roles in self.hidden_from.items()
                         if kind == record_type and role in roles)

    def any_hidden(self, role: Role) -> bool:
        return role is not Role.OWNER and any(role in roles for roles in self.hidden_from.values())

    @classmethod
    def of(cls, rows: Iterable[tuple[str, str, Iterable[str]]], version: int) -> FieldRules:
        return cls({(kind, name): frozenset(Role(r) for r in roles) for kind, name, roles in rows}, version)


NO_RULES = FieldRules()

_kept: OrderedDict[tuple[uuid.UUID, int], FieldRules] = OrderedDict()


def forget() -> None:
    """Drop the rules kept in process (tests that rewrite the table behind the application's back)."""
    _kept.clear()


def rules_query(tenant_id: uuid.UUID) -> Select[Any]:
    """The statement reading the rules of ``tenant_id``."""
    t = FIELD_RULES
    return select(t.c.record_type, t.c.field, t.c.hidden_from).where(t.c.tenant_id == tenant_id)


def of_rows(rows: Iterable[Any], version: int) -> FieldRules:
    """The rules ``rules_query``'s rows hold."""
    return FieldRules.of(((r.record_type, r.field, r.hidden_from) for r in rows), version)


async def rules_on(conn: AsyncConnection, tenant_id: uuid.UUID) -> FieldRules:
    """The rules of ``tenant_id`` as ``conn``'s transaction sees them (work outside a request: an
    import job, which writes as the member who started it)."""
    return of_rows((await conn.execute(rules_query(tenant_id))).all(), -1)


async def read_rules(db: TenantScope) -> FieldRules:
    """The rules of ``db``'s tenant (module docstring): from the process when the scope's entry names
    a version already read, otherwise one statement in the scope's transaction."""
    entry = db.entry
    version = entry.version(TABLE) if entry is not None else None
    if version == 0:
        return NO_RULES
    if version is not None and (found := _kept.get((db.tenant_id, version))) is not None:
        _kept.move_to_end((db.tenant_id, version))
        return found
    rules = of_rows(await db.fetch(rules_query(db.tenant_id)), version or -1)
    if version is not None:
        _kept[(db.tenant_id, version)] = rules
        while len(_kept) > KEEP:
            _kept.popitem(last=False)
    return rules
