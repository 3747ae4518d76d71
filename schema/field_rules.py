"""The object type of a field rule (``resolvers.field_rules``, ``auth.fields``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import strawberry

from core.ids import to_global_id
from models.tables import Role


@strawberry.type(description="A field of a record type hidden from some roles: they read it as null with a "
                             "FORBIDDEN error, cannot filter, sort, group or measure by it, and cannot write it.")
class FieldRule:
    id: strawberry.ID
    record_type: str = strawberry.field(description="The record's GraphQL type name (`Deal`).")
    field: str = strawberry.field(description="The field's API name (`amount`), or `custom.<key>` for a custom "
                                              "field (`custom.tier`).")
    hidden_from: list[Role] = strawberry.field(description="The roles that may not see or write it.")
    updated_at: dt.datetime

    @classmethod
    def from_row(cls, row: Any) -> FieldRule:
        return cls(id=strawberry.ID(to_global_id("FieldRule", row.id)), record_type=row.record_type,
                   field=row.field, hidden_from=[Role(r) for r in row.hidden_from], updated_at=row.updated_at)
