"""GraphQL enums over the model enums (one definition of each value set)."""

from __future__ import annotations

import enum

import strawberry

from models.tables import ActivityKind, DealStatus, Plan, Role

RoleEnum = strawberry.enum(Role, name="Role")
DealStatusEnum = strawberry.enum(DealStatus, name="DealStatus")
ActivityKindEnum = strawberry.enum(ActivityKind, name="ActivityKind")
PlanEnum = strawberry.enum(Plan, name="Plan")


@strawberry.enum
class OrderDirection(enum.Enum):
    ASC = "asc"
    DESC = "desc"
