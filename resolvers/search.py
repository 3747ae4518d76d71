"""Case-insensitive substring search with LIKE wildcards in the term escaped."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement


def contains(column: ColumnElement[Any], term: str) -> ColumnElement[bool]:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.ilike(f"%{escaped}%", escape="\\")
