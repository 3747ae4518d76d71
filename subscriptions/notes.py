"""Collaborative note documents: Yjs-compatible CRDT state handled with pycrdt.

A note's ``state`` is the whole document encoded as one Yjs update (``Y.encodeStateAsUpdate``), so
a client loads it with ``Y.applyUpdate(doc, state)``. The note's text is the document's shared
``Y.Text`` named ``"body"`` (``BODY``). Merging is commutative and idempotent: applying the same
updates in any order, any number of times, gives the same document.
"""

from __future__ import annotations

from typing import Any, Final

from pycrdt import Doc, Text, get_update

BODY: Final = "body"
"""Name of the shared ``Y.Text`` holding a note's text."""


class InvalidUpdate(ValueError):
    """The bytes are not a Yjs update this document can integrate."""


def empty_state() -> bytes:
    """The state of a new, empty note."""
    return bytes(Doc().get_update())


def merge(state: bytes, update: bytes) -> bytes:
    """``state`` with ``update`` integrated, re-encoded compactly (deleted content garbage-collected).

    Raises ``InvalidUpdate`` when ``update`` cannot be decoded, or when it builds on changes that
    ``state`` does not contain (Yjs would keep it pending; persisting would silently drop it).
    """
    doc: Doc[Any] = Doc()
    doc.apply_update(state)
    try:
        doc.apply_update(update)
    except ValueError as exc:
        raise InvalidUpdate(f"not a Yjs update: {exc}") from None
    # What of ``update`` the document still lacks: structs Yjs kept pending (their first byte, the
    # varuint count of clients with structs, is then non-zero; the delete set always remains).
    if get_update(update, doc.get_state())[0] != 0:
        raise InvalidUpdate("the update depends on changes this note does not have; sync with the note's state first")
    return bytes(doc.get_update())


def text_of(state: bytes) -> str:
    """The plain text of the document's ``body``."""
    doc: Doc[Any] = Doc()
    doc.apply_update(state)
    return str(doc.get(BODY, type=Text))
