"""Keyset pagination (``first/after``, ``last/before``) from a filtered select to a ``Connection``.

Cursors are opaque: base64url JSON of the ordering's name, the sort value and the row id. A page is
one statement (``LIMIT n + 1`` tells whether there is more). Rows are ordered by (sort value, id),
so ties never duplicate or skip rows between pages.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import InvalidOperation
from typing import Any, Protocol, TypeVar

from sqlalchemy import ColumnElement, Executable, Row, Select, func, literal, select, tuple_

from core.errors import BadUserInput
from records.declare import SortKey
from schema.pagination import Connection, Edge, PageInfo

T = TypeVar("T")

DEFAULT_PAGE = 20


class Reader(Protocol):
    """Where pages are read: a request's ``models.db.TenantScope`` (or its view of the trash)."""

    async def fetch(self, statement: Executable, params: dict[str, Any] | None = None) -> Sequence[Row[Any]]: ...


def cursor_text(value: Any) -> str:
    """A sort value as cursors hold it: ISO 8601 for dates and times, the text form otherwise."""
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def encode_cursor(key: SortKey, row: Row[Any]) -> str:
    """``base64url('["<ordering>","<sort value>","<id>"]')`` (compact JSON, UTF-8, unpadded): the
    plan path writes the same bytes in SQL (``planner.formats.cursor``)."""
    raw = json.dumps([key.name, cursor_text(key.value(row)), str(row.id)], ensure_ascii=False, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(key: SortKey, cursor: str, field: str) -> tuple[Any, uuid.UUID]:
    try:
        name, value, id_ = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(value, str) or "\x00" in value or len(value) > 400:
            raise ValueError(value)
        if name != key.name:
            raise BadUserInput(field, "cursor belongs to another ordering")
        return key.parse(value), uuid.UUID(id_)
    except (ValueError, TypeError, binascii.Error, InvalidOperation, UnicodeDecodeError):
        raise BadUserInput(field, "is not a valid cursor") from None


@dataclass(frozen=True)
class Page:
    rows: Sequence[Row[Any]]
    cursors: Sequence[str]
    has_next_page: bool
    has_previous_page: bool


async def fetch_page(
    db: Reader,
    query: Select[Any],
    id_column: ColumnElement[Any],
    key: SortKey,
    *,
    descending: bool,
    first: int | None,
    after: str | None,
    last: int | None,
    before: str | None,
    max_page: int,
) -> Page:
    """One page of ``query`` in (key, id) order; ``descending`` flips both.

    ``first``/``after`` pages forward, ``last``/``before`` backward; giving both ``first`` and
    ``last`` is BAD_USER_INPUT, as are sizes outside 0..max_page and malformed cursors.
    """
    if first is not None and last is not None:
        raise BadUserInput("last", "cannot be combined with first")
    for field, size in (("first", first), ("last", last)):
        if size is not None and not 0 <= size <= max_page:
            raise BadUserInput(field, f"must be between 0 and {max_page}")
    backward = last is not None
    size = last if backward else (first if first is not None else DEFAULT_PAGE)
    assert size is not None
    sort = tuple_(key.expression, id_column)

    def bound(cursor: str, field: str) -> ColumnElement[bool]:
        value, id_ = decode_cursor(key, cursor, field)
        point = tuple_(literal(value, key.expression.type), literal(id_, id_column.type))
        is_after = field == "after"
        return sort > point if is_after != descending else sort < point

    if after is not None:
        query = query.where(bound(after, "after"))
    if before is not None:
        query = query.where(bound(before, "before"))
    ascending = descending == backward  # scan direction in SQL
    order = (key.expression.asc(), id_column.asc()) if ascending else (key.expression.desc(), id_column.desc())
    rows = list(await db.fetch(query.order_by(*order).limit(size + 1)))
    more = len(rows) > size
    rows = rows[:size]
    if backward:
        rows.reverse()
    return Page(
        rows=rows,
        cursors=[encode_cursor(key, row) for row in rows],
        has_next_page=more if not backward else before is not None,
        has_previous_page=more if backward else after is not None,
    )


async def count_rows(db: Reader, query: Select[Any]) -> int:
    """The number of rows ``query`` matches (what ``totalCount`` reports)."""
    rows = await db.fetch(select(func.count()).select_from(query.order_by(None).subquery()))
    return int(rows[0][0])


async def paginate(
    db: Reader,
    query: Select[Any],
    id_column: ColumnElement[Any],
    key: SortKey,
    build: Callable[[Row[Any]], T],
    *,
    descending: bool,
    first: int | None,
    after: str | None,
    last: int | None,
    before: str | None,
    max_page: int,
) -> Connection[T]:
    """A page of ``query`` (see ``fetch_page``) as a connection; ``totalCount`` runs only when selected."""
    page = await fetch_page(db, query, id_column, key, descending=descending, first=first, after=after,
                            last=last, before=before, max_page=max_page)
    edges = [Edge(cursor=cursor, node=build(row)) for row, cursor in zip(page.rows, page.cursors, strict=True)]

    async def count() -> int:
        return await count_rows(db, query)

    return Connection(
        edges=edges,
        page_info=PageInfo(has_next_page=page.has_next_page, has_previous_page=page.has_previous_page,
                           start_cursor=page.cursors[0] if page.cursors else None,
                           end_cursor=page.cursors[-1] if page.cursors else None),
        count_rows=count,
    )
