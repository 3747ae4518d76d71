"""Per-request dataloaders, keyed by what they load rather than by name.

``Loaders`` belongs to one ``TenantScope`` (so to one tenant and one request or subscription event);
no cache outlives it. A loader is asked for by the declaration it serves (``loaders.one(COMPANY)``,
``loaders.many(DEAL_ACTIVITIES, 3)``): anything shaped like ``Lookup`` or ``ListLookup``, which the
record declarations (``records``) are. Each batch is one statement whose text does not depend on the
batch size (keys travel as one ``uuid[]`` parameter), filtered explicitly by ``tenant_id`` even
though RLS filters too.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

from aiodataloader import DataLoader
from sqlalchemy import BindParameter, ColumnElement, Row, Select, any_, bindparam, func, select, true
from sqlalchemy.dialects.postgresql import ARRAY, UUID

from models.db import TenantScope

KEYS: BindParameter[Any] = bindparam("keys", type_=ARRAY(UUID(as_uuid=True)))
LIMIT: BindParameter[Any] = bindparam("limit")
TENANT: BindParameter[Any] = bindparam("tenant_id", type_=UUID(as_uuid=True))
"""The tenant parameter every lookup's query filters on (bound from the scope)."""

OneLoader = DataLoader[uuid.UUID, Row[Any] | None]
ManyLoader = DataLoader[uuid.UUID, list[Row[Any]]]


class Lookup(Protocol):
    """Rows found by one key column: ``query`` (filtered on ``TENANT``) and its ``key``."""

    @property
    def query(self) -> Select[Any]: ...

    @property
    def key(self) -> ColumnElement[Any]: ...


class ListLookup(Lookup, Protocol):
    """Lists of rows sharing a key value, in ``order_by`` order."""

    @property
    def order_by(self) -> Sequence[ColumnElement[Any]]: ...


class Loaders:
    """The loaders of one scope, made on first use (a request pays only for what it asks)."""

    def __init__(self, db: TenantScope) -> None:
        self.db = db
        self._one: dict[object, OneLoader] = {}
        self._many: dict[tuple[object, int], ManyLoader] = {}

    def one(self, lookup: Lookup) -> OneLoader:
        """Loads one row per key (None when the tenant has none). ``lookup`` is hashed by identity."""
        loader = self._one.get(lookup)
        if loader is None:
            loader = self._one[lookup] = self._load_one(lookup.query.where(lookup.key == any_(KEYS)),
                                                        str(lookup.key.key))
        return loader

    def many(self, lookup: ListLookup, limit: int) -> ManyLoader:
        """Loads, per key, the rows whose key column equals it: at most ``limit``, in order.

        One statement per batch whatever the number of keys: a LATERAL join over the keys, so "the
        latest 3 activities of each of 50 deals" is one statement.
        """
        loader = self._many.get((lookup, limit))
        if loader is None:
            keyset = func.unnest(KEYS).table_valued("key").render_derived(name="k")
            inner = lookup.query.where(lookup.key == keyset.c.key).order_by(*lookup.order_by).limit(LIMIT)
            lateral = inner.lateral("child")
            statement = select(lateral).select_from(keyset).join(lateral, true())
            loader = self._many[(lookup, limit)] = self._load_many(statement, str(lookup.key.key), limit)
        return loader

    def _load_one(self, statement: Select[Any], key: str) -> OneLoader:
        db = self.db

        async def load(keys: list[uuid.UUID]) -> list[Row[Any] | None]:
            rows = await db.fetch(statement, {"keys": keys, "tenant_id": db.tenant_id})
            found = {row._mapping[key]: row for row in rows}
            return [found.get(k) for k in keys]

        return DataLoader(load)

    def _load_many(self, statement: Select[Any], key: str, limit: int) -> ManyLoader:
        db = self.db

        async def load(keys: list[uuid.UUID]) -> list[list[Row[Any]]]:
            rows = await db.fetch(statement, {"keys": keys, "tenant_id": db.tenant_id, "limit": limit})
            groups: dict[uuid.UUID, list[Row[Any]]] = defaultdict(list)
            for row in rows:
                groups[row._mapping[key]].append(row)
            return [groups.get(k, []) for k in keys]

        return DataLoader(load)
