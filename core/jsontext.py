"""JSON text: read from clients (``loads``), and already serialised (built by PostgreSQL).

``loads`` reads a request's JSON within bounds: at most ``MAX_DEPTH`` arrays and objects deep, no
``NaN``/``Infinity`` (not JSON), no lone UTF-16 surrogates (not text); anything else raises
``UnreadableJSON``, so a hostile body is refused before anything recurses over it.

``PlannedData`` is a query's ``data`` whose values are either ``RawJSON`` (written into the response
as it is, never decoded) or ordinary values (serialised as usual); ``dumps`` writes a whole response
body either way.
"""

from __future__ import annotations

import json
import re
from itertools import accumulate
from typing import Any

COMPACT = (",", ":")
MAX_DEPTH = 64
"""How deeply arrays and objects may nest in a request's JSON (Atrium's inputs nest a few levels)."""

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class UnreadableJSON(ValueError):
    """Text that ``loads`` refuses; the message says why (safe to show)."""


def nesting(text: str) -> int:
    """How deeply arrays and objects nest in JSON ``text`` (brackets inside strings do not count)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    return max(accumulate(_STEP[c] for c in brackets))


def _no_constant(name: str) -> Any:
    raise UnreadableJSON(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
"""One decoder for every body and message (``json.loads`` with an option builds a decoder and its
scanner per call)."""


def loads(text: str, *, max_depth: int = MAX_DEPTH) -> Any:
    """``text`` decoded, if it is JSON nested at most ``max_depth`` deep (module docstring)."""
    if len(text) > max_depth and nesting(text) > max_depth:
        raise UnreadableJSON(f"arrays and objects nest more than {max_depth} deep")
    try:
        value = _DECODER.decode(text)
    except UnreadableJSON:
        raise
    except (ValueError, RecursionError):
        raise UnreadableJSON("not valid JSON") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise UnreadableJSON("a string holds a lone UTF-16 surrogate (not text)") from None
    return value


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
