"""Per-request dataloaders: the one factory (``by_key``) and the ``Loaders`` a request gets.

Every loader is bound to one ``TenantScope`` (so to one tenant and one request); its cache never
outlives the request. Each batch is one statement whose text does not depend on the batch size
(keys are passed as one ``uuid[]`` parameter), filtered explicitly by ``tenant_id`` even though
RLS would filter too.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from functools import cached_property
from typing import Any

from aiodataloader import DataLoader
from sqlalchemy import ColumnElement, Row, Select, any_, bindparam, func, select, true
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from models.db import TenantScope
from models.tables import ACTIVITIES, COMPANIES, CONTACTS, DEALS, MEMBERSHIPS, NOTES, PIPELINES, STAGES, USERS

KEYS = bindparam("keys", type_=ARRAY(UUID(as_uuid=True)))
LIMIT = bindparam("limit")


def by_key(
    db: TenantScope,
    query: Select[Any],
    key: ColumnElement[Any],
    *,
    many: bool = False,
    order_by: Sequence[ColumnElement[Any]] = (),
    limit: int | None = None,
) -> DataLoader:
    """A loader of ``query``'s rows by ``key``.

    ``many=False``: each key loads one row or None. ``many=True``: each key loads the list of rows
    whose ``key`` equals it, in ``order_by`` order, at most ``limit`` per key (a LATERAL join, so
    "the latest 3 activities of each of 50 deals" is one statement).
    """
    if not many:
        statement = query.where(key == any_(KEYS))

        async def load_one(keys: list[uuid.UUID]) -> list[Row[Any] | None]:
            rows = await db.fetch(statement, {"keys": keys, "tenant_id": db.tenant_id})
            found = {row._mapping[key.key]: row for row in rows}
            return [found.get(k) for k in keys]

        return DataLoader(load_one)

    keyset = func.unnest(KEYS).table_valued("key").render_derived(name="k")
    inner = query.where(key == keyset.c.key).order_by(*order_by)
    if limit is not None:
        inner = inner.limit(LIMIT)
    lateral = inner.lateral("child")
    statement = select(lateral).select_from(keyset).join(lateral, true())

    async def load_many(keys: list[uuid.UUID]) -> list[list[Row[Any]]]:
        rows = await db.fetch(statement, {"keys": keys, "tenant_id": db.tenant_id, "limit": limit})
        groups: dict[uuid.UUID, list[Row[Any]]] = defaultdict(list)
        for row in rows:
            groups[row._mapping[key.key]].append(row)
        return [groups.get(k, []) for k in keys]

    return DataLoader(load_many)


TENANT = bindparam("tenant_id", type_=UUID(as_uuid=True))


def _scoped(table: Any) -> Select[Any]:
    return select(table).where(table.c.tenant_id == TENANT)


USERS_IN_TENANT = (
    select(USERS.c.id, USERS.c.email, USERS.c.name, MEMBERSHIPS.c.role, MEMBERSHIPS.c.id.label("membership_id"))
    .join(MEMBERSHIPS, MEMBERSHIPS.c.user_id == USERS.c.id)
    .where(MEMBERSHIPS.c.tenant_id == TENANT)
)
ACTIVITY_ORDER = (ACTIVITIES.c.occurred_at.desc(), ACTIVITIES.c.id.desc())


class Loaders:
    """The loaders of one request (created lazily, so a request pays only for what it uses)."""

    def __init__(self, db: TenantScope) -> None:
        self.db = db
        self._limited: dict[tuple[str, int], DataLoader] = {}

    def _one(self, table: Any) -> DataLoader:
        return by_key(self.db, _scoped(table), table.c.id)

    @cached_property
    def company(self) -> DataLoader:
        return self._one(COMPANIES)

    @cached_property
    def contact(self) -> DataLoader:
        return self._one(CONTACTS)

    @cached_property
    def pipeline(self) -> DataLoader:
        return self._one(PIPELINES)

    @cached_property
    def stage(self) -> DataLoader:
        return self._one(STAGES)

    @cached_property
    def deal(self) -> DataLoader:
        return self._one(DEALS)

    @cached_property
    def activity(self) -> DataLoader:
        return self._one(ACTIVITIES)

    @cached_property
    def note(self) -> DataLoader:
        return self._one(NOTES)

    @cached_property
    def user(self) -> DataLoader:
        """Users of this tenant with their role; a user of another tenant loads as None."""
        return by_key(self.db, USERS_IN_TENANT, USERS.c.id)

    @cached_property
    def stages_of_pipeline(self) -> DataLoader:
        return by_key(self.db, _scoped(STAGES), STAGES.c.pipeline_id, many=True,
                      order_by=(STAGES.c.position, STAGES.c.id))

    def children(self, name: str, limit: int) -> DataLoader:
        """A per-parent list loader, at most ``limit`` children per parent (one loader per limit)."""
        loader = self._limited.get((name, limit))
        if loader is None:
            table, column, order = CHILDREN[name]
            loader = by_key(self.db, _scoped(table), table.c[column], many=True, order_by=order, limit=limit)
            self._limited[(name, limit)] = loader
        return loader


CHILDREN: dict[str, tuple[Any, str, tuple[Any, ...]]] = {
    "activities_of_deal": (ACTIVITIES, "deal_id", ACTIVITY_ORDER),
    "activities_of_contact": (ACTIVITIES, "contact_id", ACTIVITY_ORDER),
    "activities_of_company": (ACTIVITIES, "company_id", ACTIVITY_ORDER),
    "contacts_of_company": (CONTACTS, "company_id", (CONTACTS.c.last_name, CONTACTS.c.first_name, CONTACTS.c.id)),
    "deals_of_company": (DEALS, "company_id", (DEALS.c.created_at.desc(), DEALS.c.id.desc())),
    "deals_of_contact": (DEALS, "contact_id", (DEALS.c.created_at.desc(), DEALS.c.id.desc())),
    "deals_of_stage": (DEALS, "stage_id", (DEALS.c.created_at.desc(), DEALS.c.id.desc())),
}
