"""Build a GraphQL ``Connection`` from a filtered query, an ordering and the paging arguments."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Row, Select

from models.db import TenantScope
from resolvers.paging import SortKey, count_rows, fetch_page
from schema.types import Connection, Edge, PageInfo

T = TypeVar("T")


async def paginate(
    db: TenantScope,
    query: Select[Any],
    id_column: ColumnElement[Any],
    key: SortKey,
    from_row: Callable[[Row[Any]], T],
    *,
    descending: bool,
    first: int | None,
    after: str | None,
    last: int | None,
    before: str | None,
    max_page: int,
) -> Connection[T]:
    page = await fetch_page(db, query, id_column, key, descending=descending, first=first, after=after,
                            last=last, before=before, max_page=max_page)
    edges = [Edge(cursor=cursor, node=from_row(row)) for row, cursor in zip(page.rows, page.cursors, strict=True)]

    async def count() -> int:
        return await count_rows(db, query)

    return Connection(
        edges=edges,
        page_info=PageInfo(has_next_page=page.has_next_page, has_previous_page=page.has_previous_page,
                           start_cursor=page.cursors[0] if page.cursors else None,
                           end_cursor=page.cursors[-1] if page.cursors else None),
        count_rows=count,
    )
