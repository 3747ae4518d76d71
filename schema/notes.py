"""The collaborative note's object type (``subscriptions.notes`` holds its CRDT document logic)."""

from __future__ import annotations

import datetime as dt

import strawberry
from strawberry.scalars import Base64

from records.crm import NOTE
from schema.crm import Company, Contact, Deal
from schema.objects import Node, RecordObject, to_one
from subscriptions.notes import BODY, text_of


@strawberry.type(description="A collaborative note on a deal, contact or company: a Yjs document.")
class Note(RecordObject, Node, record=NOTE):
    version: int = strawberry.field(description="Number of updates merged so far, plus one.")
    created_at: dt.datetime
    updated_at: dt.datetime
    state: Base64 = strawberry.field(description=(
        "The whole document as one Yjs update (`Y.applyUpdate(doc, state)`), base64."))
    text: str = strawberry.field(resolver=lambda self: text_of(self.state),
                                 description=f"Plain text of the document's shared `Y.Text` named \"{BODY}\".")
    deal: Deal | None = to_one(NOTE, "deal")
    contact: Contact | None = to_one(NOTE, "contact")
    company: Company | None = to_one(NOTE, "company")
