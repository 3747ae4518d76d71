"""Teams and record visibility as clients read them (``docs/visibility.md``)."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

import strawberry

from records.crm import OWNED, TEAM, TEAM_MEMBER
from records.declare import snake
from schema.crm import User
from schema.objects import Node, RecordObject, children, to_one


@strawberry.type(description="A group of members with an optional manager. Where a record type's audience is TEAM, "
                             "a record is seen by its owner, the members of the owner's teams, those teams' "
                             "managers, and the workspace's admins and owners.")
class Team(RecordObject, Node, record=TEAM):
    name: str
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    manager: User | None = to_one(TEAM, "manager")
    members: list[TeamMember] = children(TEAM, "members")


@strawberry.type(description="One member of one team.")
class TeamMember(RecordObject, Node, record=TEAM_MEMBER):
    created_at: dt.datetime = strawberry.field(description="When the member joined the team.")
    user: User = to_one(TEAM_MEMBER, "user")
    team: Team = to_one(TEAM_MEMBER, "team")


_make_enum: Any = enum.Enum
OwnedRecordType: type[enum.Enum] = strawberry.enum(
    _make_enum("OwnedRecordType", {snake(record.name).upper(): record.name for record in OWNED}),
    description="The record types with an owner, whose visibility a workspace chooses.")


@strawberry.enum(description="Who sees the records of one type.")
class RecordAudience(enum.Enum):
    WORKSPACE = "workspace"
    """Every member of the workspace (the default)."""
    TEAM = "team"
    """The record's owner, the members of the owner's teams, those teams' managers, and admins and owners."""


@strawberry.type(description="Who sees the records of one owned type in this workspace.")
class RecordVisibilitySetting:
    record_type: OwnedRecordType  # type: ignore[valid-type]
    audience: RecordAudience
