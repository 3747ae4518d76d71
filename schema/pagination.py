"""Relay-style connections: ``Connection[T]`` with edges, page info and a lazy ``totalCount``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import strawberry

T = TypeVar("T")


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None


@strawberry.type
class Edge(Generic[T]):
    cursor: str
    node: T


@strawberry.type
class Connection(Generic[T]):
    edges: list[Edge[T]]
    page_info: PageInfo
    count_rows: strawberry.Private[Callable[[], Awaitable[int]]]

    @strawberry.field(description="Rows matching the filter, ignoring paging (one extra statement).")
    async def total_count(self) -> int:
        return await self.count_rows()

    @strawberry.field(description="The nodes of `edges`, for clients that do not need cursors.")
    def nodes(self) -> list[T]:
        return [edge.node for edge in self.edges]
