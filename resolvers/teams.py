"""Teams and each owned record type's audience: the rules of record-level visibility (``docs/visibility.md``).

Admins manage both (``MANAGE_USERS``, like members and roles); every member may read them. Teams and
their members are declared records (``records.crm.TEAM``, ``TEAM_MEMBER``) written through the one write path, so each
change is audited and published; an audience is a row of ``record_visibility``, audited as
``RecordVisibility``. What they decide is enforced by ``records.declare.Record.visible`` and by
row-level security (migration 0016) from the next request on: a request's view is read when it
begins (``atrium_enter``).
"""

from __future__ import annotations

import enum
import uuid
from typing import Any

import strawberry
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from auth.roles import Permission, requires
from auth.session import Info
from core.errors import BadUserInput
from core.ids import decode_id
from models.tables import RECORD_VISIBILITY
from records.crm import BY_NAME, OWNED, TEAM, TEAM_MEMBER
from resolvers.writes import Change, change
from schema.crm import DeletePayload
from schema.objects import load
from schema.teams import OwnedRecordType, RecordAudience, RecordVisibilitySetting, Team

MAX_MEMBERS = TEAM.child_list("members").maximum


@strawberry.input(description="A new team.")
class TeamInput:
    name: str
    manager_id: strawberry.ID | None = strawberry.field(default=None, description="A member of the workspace.")
    member_ids: list[strawberry.ID] = strawberry.field(default_factory=list, description="Members of the workspace.")


@strawberry.input(description="Changes to a team; `memberIds`, when given, replaces its members.")
class TeamPatch:
    name: str | None = strawberry.UNSET
    manager_id: strawberry.ID | None = strawberry.UNSET
    member_ids: list[strawberry.ID] | None = strawberry.UNSET


def _member_ids(ids: list[strawberry.ID], field: str) -> list[uuid.UUID]:
    if len(ids) > MAX_MEMBERS:
        raise BadUserInput(field, f"must hold at most {MAX_MEMBERS} members")
    return list(dict.fromkeys(decode_id(i, "User", field=field) for i in ids))


async def _set_members(w: Change, team_id: uuid.UUID, wanted: list[uuid.UUID], field: str) -> None:
    """Make ``wanted`` the team's members: those missing are added (each must be a member of the
    workspace: NOT_FOUND naming ``field``), the others removed."""
    t = TEAM_MEMBER.table
    current = {row.user_id: row.id for row in (await w.conn.execute(
        select(t.c.user_id, t.c.id).where(t.c.tenant_id == w.tenant_id, t.c.team_id == team_id))).all()}
    for user_id, member_id in current.items():
        if user_id not in wanted:
            await w.delete(TEAM_MEMBER, member_id, None)
    for user_id in wanted:
        if user_id not in current:
            await w.create(TEAM_MEMBER, {"team_id": team_id, "user_id": user_id}, prefix=f"{field}.")


async def _team(info: Info, key: uuid.UUID) -> Team:
    team = await load(info, TEAM, key)
    assert team is not None  # written in this request
    return team  # type: ignore[no-any-return]


@strawberry.type
class TeamQuery:
    @strawberry.field(**requires(Permission.READ, "The workspace's teams, by name."))
    async def teams(self, info: Info) -> list[Team]:
        session = info.context.session
        t = TEAM.table
        rows = await session.db.fetch(TEAM.query.order_by(func.lower(t.c.name), t.c.id),
                                      {"tenant_id": session.tenant_id})
        return [Team.from_row(row) for row in rows]

    @strawberry.field(**requires(Permission.READ, "Who sees the records of each owned type (WORKSPACE unless "
                                                  "set otherwise)."))
    async def record_visibility(self, info: Info) -> list[RecordVisibilitySetting]:
        session = info.context.session
        v = RECORD_VISIBILITY
        rows = await session.db.fetch(select(v.c.record_type, v.c.audience).where(v.c.tenant_id == session.tenant_id))
        chosen = {row.record_type: row.audience for row in rows}
        default = RecordAudience.WORKSPACE.value
        return [RecordVisibilitySetting(record_type=OwnedRecordType(record.name),
                                        audience=RecordAudience(chosen.get(record.name, default)))
                for record in OWNED]


@strawberry.type
class TeamMutation:
    @strawberry.mutation(**requires(Permission.MANAGE_USERS, "Create a team with its manager and members."))
    async def create_team(self, info: Info, input: TeamInput) -> Team:
        values = TEAM.create_values({"name": input.name, "manager_id": input.manager_id}, prefix="input.")
        members = _member_ids(input.member_ids, "input.memberIds")
        async with change(info) as w:
            row = await w.create(TEAM, values, prefix="input.")
            await _set_members(w, row.id, members, "input.memberIds")
        return await _team(info, row.id)

    @strawberry.mutation(**requires(Permission.MANAGE_USERS, "Rename a team, change its manager or its members."))
    async def update_team(self, info: Info, id: strawberry.ID, input: TeamPatch,
                          expected_version: int | None = None) -> Team:
        key = decode_id(id, "Team")
        given: dict[str, Any] = {"name": input.name, "manager_id": input.manager_id}
        changes = TEAM.patch_values(given, prefix="input.")
        members = None if input.member_ids is None or input.member_ids is strawberry.UNSET else \
            _member_ids(input.member_ids, "input.memberIds")
        async with change(info) as w:
            await w.update(TEAM, key, changes, expected_version)
            if members is not None:
                await _set_members(w, key, members, "input.memberIds")
        return await _team(info, key)

    @strawberry.mutation(**requires(Permission.MANAGE_USERS, "Delete a team (its members stay in the workspace)."))
    async def delete_team(self, info: Info, id: strawberry.ID, expected_version: int | None = None) -> DeletePayload:
        key = decode_id(id, "Team")
        async with change(info) as w:
            await w.delete(TEAM, key, expected_version)
        return DeletePayload(deleted_id=id)

    @strawberry.mutation(**requires(Permission.MANAGE_USERS, "Choose who sees the records of one owned type; "
                                                              "applies from the next request on."))
    async def set_record_visibility(self, info: Info, record_type: OwnedRecordType,  # type: ignore[valid-type]
                                    audience: RecordAudience) -> RecordVisibilitySetting:
        chosen: enum.Enum = record_type
        record = BY_NAME[chosen.value]
        v = RECORD_VISIBILITY
        async with change(info) as w:
            before = (await w.conn.execute(select(v.c.audience).where(
                v.c.tenant_id == w.tenant_id, v.c.record_type == record.name))).scalar()
            statement = insert(v).values(tenant_id=w.tenant_id, id=uuid.uuid4(), record_type=record.name,
                                         audience=audience.value)
            row = (await w.conn.execute(statement.on_conflict_do_update(
                constraint="record_visibility_type_key",
                set_={"audience": audience.value, "version": v.c.version + 1, "updated_at": func.now()})
                .returning(v.c.id))).one()
            await w.audit("RecordVisibility", "update", row.id, {
                "before": {"recordType": record.name, "audience": before or RecordAudience.WORKSPACE.value},
                "after": {"recordType": record.name, "audience": audience.value}})
        return RecordVisibilitySetting(record_type=record_type, audience=audience)
