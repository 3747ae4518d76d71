"""JSON text that is already serialised (built by PostgreSQL) and data that holds some of it.

``PlannedData`` is a query's ``data`` whose values are either ``RawJSON`` (written into the response
as it is, never decoded) or ordinary values (serialised as usual); ``dumps`` writes a whole response
body either way.
"""

from __future__ import annotations

import json
from typing import Any

COMPACT = (",", ":")


class RawJSON(str):
    """A JSON value as text."""

    __slots__ = ()


class PlannedData(dict[str, Any]):
    """``data`` whose values may be ``RawJSON``; in response-key order."""

    def dumps(self) -> str:
        return "{" + ",".join(f"{json.dumps(key)}:{value if isinstance(value, RawJSON) else _dumps(value)}"
                              for key, value in self.items()) + "}"

    def decoded(self) -> dict[str, Any]:
        """The same data as plain Python values (for transports that build their own JSON)."""
        return {key: json.loads(value) if isinstance(value, RawJSON) else value for key, value in self.items()}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=COMPACT)


def dumps(body: dict[str, Any] | list[Any]) -> str:
    """A response body (or a batch of them) as compact JSON, ``PlannedData`` spliced in unchanged."""
    if isinstance(body, list):
        return "[" + ",".join(dumps(item) for item in body) + "]"
    return "{" + ",".join(
        f"{json.dumps(key)}:{value.dumps() if isinstance(value, PlannedData) else _dumps(value)}"
        for key, value in body.items()) + "}"
