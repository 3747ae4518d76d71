"""GraphQL enums over the model and declaration enums (one definition of each value set)."""

from __future__ import annotations

import strawberry

from models.tables import ActivityKind, DealStatus, Plan, Role
from records.declare import Direction

strawberry.enum(Role, name="Role")
strawberry.enum(DealStatus, name="DealStatus")
strawberry.enum(ActivityKind, name="ActivityKind")
strawberry.enum(Plan, name="Plan")
strawberry.enum(Direction, name="OrderDirection")
