"""The caller and their workspace: ``me``, ``tenant``, ``node``, ``login`` and member management."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import strawberry
from sqlalchemy import func, select, text

from auth.passwords import hash_password_async, verify_password_async
from auth.roles import Permission, requires
from auth.session import Info
from auth.tokens import issue_token
from core.errors import BadUserInput, Forbidden, NotFound, Unauthenticated
from core.ids import decode_id, parse_global_id
from models.tables import MEMBERSHIPS, TENANTS, Role
from records.crm import BY_NAME, MEMBERSHIP, USER
from records.rules import Email, Text
from resolvers.writes import Change, change
from schema.crm import DeletePayload, LoginPayload, Tenant, User
from schema.objects import Node, RecordObject, load, planned

MAX_LOGIN_TEXT = 1000

LOGIN_CANDIDATES = text("SELECT * FROM atrium_login_candidates(:slug, :email)")
ENSURE_USER = text("SELECT atrium_ensure_user(:email, :name, :password_hash)")
NAME = Text(200)
EMAIL = Email()


@strawberry.input
class MemberInput:
    email: str
    name: str
    role: Role
    password: str | None = strawberry.field(default=None, description="Lets the user sign in with login().")

    def values(self) -> dict[str, Any]:
        address = EMAIL("email", self.email)
        if address is None:
            raise BadUserInput("email", "must not be empty")
        if self.password is not None and not 12 <= len(self.password) <= 200:
            raise BadUserInput("password", "must be 12 to 200 characters")
        return {"email": address, "name": NAME("name", self.name), "role": Role(self.role),
                "password": self.password}


async def _tenant_row(info: Info) -> Any:
    session = info.context.session
    rows = await session.db.fetch(select(TENANTS).where(TENANTS.c.id == session.tenant_id))
    if not rows:
        raise NotFound("tenant", session.tenant_id)
    return rows[0]


def _member(user_id: uuid.UUID) -> Any:
    """The query of one member of the session's tenant (with their role)."""
    return USER.query.where(USER.key == user_id)


async def _node(self: Any, info: Info, id: strawberry.ID) -> Node | None:
    type_name, key = parse_global_id(id)
    if RecordObject.type_named(type_name) is None:
        raise BadUserInput("id", f"objects of type {type_name} cannot be fetched by id")
    return await load(info, BY_NAME[type_name], key)  # type: ignore[no-any-return]


planned(_node, "node", None, Permission.READ)


@strawberry.type
class ViewerQuery:
    @strawberry.field(**requires(Permission.READ, "The signed-in user."))
    async def me(self, info: Info) -> User:
        user = await load(info, USER, info.context.session.user_id)
        if user is None:
            raise Unauthenticated("Your membership of this workspace no longer exists")
        return user  # type: ignore[no-any-return]

    @strawberry.field(**requires(Permission.READ, "The caller's workspace."))
    async def tenant(self, info: Info) -> Tenant:
        return Tenant.from_row(await _tenant_row(info))

    @strawberry.field(**requires(Permission.READ, "Members of the workspace."))
    async def members(self, info: Info) -> list[User]:
        session = info.context.session
        rows = await session.db.fetch(USER.query.order_by(func.lower(USER.query.selected_columns.name)),
                                      {"tenant_id": session.tenant_id})
        return [User.from_row(r) for r in rows]

    node = strawberry.field(resolver=_node, **requires(
        Permission.READ, "Any object by its global ID; null when it does not exist in this workspace."))


@strawberry.type
class ViewerMutation:
    @strawberry.mutation(description="Exchange a password for a bearer token of one workspace (by its slug).")
    async def login(self, info: Info, email: str, password: str, tenant: str) -> LoginPayload:
        context = info.context
        for field, value in (("email", email), ("password", password), ("tenant", tenant)):
            if "\x00" in value or len(value) > MAX_LOGIN_TEXT:  # text PostgreSQL cannot compare, or absurd
                raise BadUserInput(field, f"must be at most {MAX_LOGIN_TEXT} characters, without NUL")
        async with context.databases.default.connect() as conn:
            candidate = (await conn.execute(LOGIN_CANDIDATES, {"slug": tenant.strip().lower(),
                                                               "email": email.strip()})).first()
        valid = await verify_password_async(candidate.password_hash if candidate else None, password)
        if candidate is None or not valid:
            raise Unauthenticated("Invalid email, password or workspace")
        role = Role(candidate.role)
        token = issue_token(context.settings, user_id=candidate.user_id, tenant_id=candidate.tenant_id, role=role)
        async with context.databases.tenant_transaction(candidate.tenant_id) as conn:
            user = (await conn.execute(_member(candidate.user_id), {"tenant_id": candidate.tenant_id})).one()
            tenant_row = (await conn.execute(select(TENANTS).where(TENANTS.c.id == candidate.tenant_id))).one()
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=context.settings.token_ttl_seconds)
        return LoginPayload(token=token, expires_at=expires.replace(microsecond=0), user=User.from_row(user),
                            tenant=Tenant.from_row(tenant_row))

    @strawberry.mutation(**requires(Permission.MANAGE_USERS,
                                    "Add a person to the workspace (creating their user if new)."))
    async def add_member(self, info: Info, input: MemberInput) -> User:
        values = input.values()
        password_hash = await hash_password_async(values["password"]) if values["password"] else None
        async with change(info) as w:
            _check_grant(w, values["role"])
            user_id = (await w.conn.execute(ENSURE_USER, {"email": values["email"], "name": values["name"],
                                                          "password_hash": password_hash})).scalar_one()
            exists = (await w.conn.execute(select(MEMBERSHIPS.c.id).where(
                MEMBERSHIPS.c.tenant_id == w.tenant_id, MEMBERSHIPS.c.user_id == user_id))).first()
            if exists is not None:
                raise BadUserInput("input.email", "is already a member of this workspace")
            await w.insert(MEMBERSHIP, {"user_id": user_id, "role": values["role"].value})
            row = (await w.conn.execute(_member(user_id), {"tenant_id": w.tenant_id})).one()
        return User.from_row(row)

    @strawberry.mutation(**requires(Permission.MANAGE_USERS))
    async def update_member_role(self, info: Info, user_id: strawberry.ID, role: Role) -> User:
        uid = decode_id(user_id, "User", field="userId")
        async with change(info) as w:
            membership = await _membership(w, uid)
            _check_grant(w, Role(membership.role))
            _check_grant(w, role)
            if membership.role == Role.OWNER.value and role != Role.OWNER:
                await _keep_an_owner(w)
            await w.update(MEMBERSHIP, membership.id, {"role": role.value}, None)
            row = (await w.conn.execute(_member(uid), {"tenant_id": w.tenant_id})).one()
        return User.from_row(row)

    @strawberry.mutation(**requires(Permission.MANAGE_USERS,
                                    "Remove a person from the workspace; their deals keep no owner."))
    async def remove_member(self, info: Info, user_id: strawberry.ID) -> DeletePayload:
        uid = decode_id(user_id, "User", field="userId")
        async with change(info) as w:
            membership = await _membership(w, uid)
            _check_grant(w, Role(membership.role))
            if membership.role == Role.OWNER.value:
                await _keep_an_owner(w)
            await w.release(USER, uid)
            await w.delete(MEMBERSHIP, membership.id, None)
        return DeletePayload(deleted_id=user_id)


def _check_grant(w: Change, role: Role) -> None:
    """Nobody grants, changes or removes a role above their own (only owners manage owners)."""
    if role.rank > w.principal.role.rank:
        raise Forbidden(f"Only an owner can manage the {role.value} role")


async def _membership(w: Change, user_id: uuid.UUID) -> Any:
    row = (await w.conn.execute(select(MEMBERSHIPS).where(
        MEMBERSHIPS.c.tenant_id == w.tenant_id, MEMBERSHIPS.c.user_id == user_id).with_for_update())).first()
    if row is None:
        raise NotFound("user", user_id, field="userId")
    return row


async def _keep_an_owner(w: Change) -> None:
    owners = (await w.conn.execute(select(func.count()).where(
        MEMBERSHIPS.c.tenant_id == w.tenant_id, MEMBERSHIPS.c.role == Role.OWNER.value))).scalar_one()
    if owners <= 1:
        raise BadUserInput("role", "a workspace must keep at least one owner")
