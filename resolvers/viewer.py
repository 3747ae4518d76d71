"""The caller and their workspace: ``me``, ``tenant``, ``node``, ``login`` and member management."""

from __future__ import annotations

import datetime as dt
import uuid

import strawberry
from sqlalchemy import func, select, text

from auth.passwords import hash_password_async, verify_password_async
from auth.roles import RANK, Can, Permission
from auth.tokens import issue_token
from core.errors import BadUserInput, Forbidden, NotFound, Unauthenticated
from core.ids import decode_id, parse_global_id
from models.tables import MEMBERSHIPS, TENANTS, Role
from resolvers.entities import MEMBERSHIP
from resolvers.loaders import USERS_IN_TENANT
from resolvers.writes import Change, change
from schema.inputs import MemberInput
from schema.types import (
    Activity,
    Company,
    Contact,
    Deal,
    DeletePayload,
    Info,
    LoginPayload,
    Node,
    Note,
    Pipeline,
    Stage,
    Tenant,
    User,
)

LOGIN_CANDIDATES = text("SELECT * FROM atrium_login_candidates(:slug, :email)")
ENSURE_USER = text("SELECT atrium_ensure_user(:email, :name, :password_hash)")

NODE_TYPES = {
    "Deal": ("deal", Deal.from_row), "Company": ("company", Company.from_row),
    "Contact": ("contact", Contact.from_row), "Pipeline": ("pipeline", Pipeline.from_row),
    "Stage": ("stage", Stage.from_row), "Activity": ("activity", Activity.from_row), "User": ("user", User.from_row),
    "Note": ("note", Note.from_row),
}


async def _tenant_row(info: Info) -> object:
    principal, db, _ = info.context.require()
    rows = await db.fetch(select(TENANTS).where(TENANTS.c.id == principal.tenant_id))
    if not rows:
        raise NotFound("tenant", principal.tenant_id)
    return rows[0]


@strawberry.type
class ViewerQuery:
    @strawberry.field(permission_classes=[Can(Permission.READ)], description="The signed-in user.")
    async def me(self, info: Info) -> User:
        principal, _, loaders = info.context.require()
        row = await loaders.user.load(principal.user_id)
        if row is None:
            raise Unauthenticated("Your membership of this workspace no longer exists")
        return User.from_row(row)

    @strawberry.field(permission_classes=[Can(Permission.READ)], description="The caller's workspace.")
    async def tenant(self, info: Info) -> Tenant:
        return Tenant.from_row(await _tenant_row(info))  # type: ignore[arg-type]

    @strawberry.field(permission_classes=[Can(Permission.READ)], description="Members of the workspace.")
    async def members(self, info: Info) -> list[User]:
        principal, db, _ = info.context.require()
        rows = await db.fetch(USERS_IN_TENANT.order_by(func.lower(USERS_IN_TENANT.selected_columns.name)),
                              {"tenant_id": principal.tenant_id})
        return [User.from_row(r) for r in rows]

    @strawberry.field(permission_classes=[Can(Permission.READ)],
                      description="Any object by its global ID; null when it does not exist in this workspace.")
    async def node(self, info: Info, id: strawberry.ID) -> Node | None:
        type_name, key = parse_global_id(id)
        if type_name not in NODE_TYPES:
            raise BadUserInput("id", f"objects of type {type_name} cannot be fetched by id")
        loader_name, from_row = NODE_TYPES[type_name]
        row = await getattr(info.context.require()[2], loader_name).load(key)
        return from_row(row) if row else None  # type: ignore[no-any-return]


@strawberry.type
class ViewerMutation:
    @strawberry.mutation(description="Exchange a password for a bearer token of one workspace (by its slug).")
    async def login(self, info: Info, email: str, password: str, tenant: str) -> LoginPayload:
        context = info.context
        async with context.databases.default.connect() as conn:
            candidate = (await conn.execute(LOGIN_CANDIDATES, {"slug": tenant.strip().lower(),
                                                               "email": email.strip()})).first()
        valid = await verify_password_async(candidate.password_hash if candidate else None, password)
        if candidate is None or not valid:
            raise Unauthenticated("Invalid email, password or workspace")
        role = Role(candidate.role)
        token = issue_token(context.settings, user_id=candidate.user_id, tenant_id=candidate.tenant_id, role=role)
        async with context.databases.tenant_transaction(candidate.tenant_id) as conn:
            user = (await conn.execute(USERS_IN_TENANT.where(USERS_IN_TENANT.selected_columns.id == candidate.user_id),
                                       {"tenant_id": candidate.tenant_id})).one()
            tenant_row = (await conn.execute(select(TENANTS).where(TENANTS.c.id == candidate.tenant_id))).one()
        expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=context.settings.token_ttl_seconds)
        return LoginPayload(token=token, expires_at=expires.replace(microsecond=0), user=User.from_row(user),
                            tenant=Tenant.from_row(tenant_row))

    @strawberry.mutation(permission_classes=[Can(Permission.MANAGE_USERS)],
                         description="Add a person to the workspace (creating their user if new).")
    async def add_member(self, info: Info, input: MemberInput) -> User:
        values = input.values()
        password_hash = await hash_password_async(values["password"]) if values["password"] else None
        async with change(info, Permission.MANAGE_USERS) as w:
            _check_grant(w, values["role"])
            user_id = (await w.conn.execute(ENSURE_USER, {"email": values["email"], "name": values["name"],
                                                          "password_hash": password_hash})).scalar_one()
            exists = (await w.conn.execute(select(MEMBERSHIPS.c.id).where(
                MEMBERSHIPS.c.tenant_id == w.tenant_id, MEMBERSHIPS.c.user_id == user_id))).first()
            if exists is not None:
                raise BadUserInput("input.email", "is already a member of this workspace")
            await w.insert(MEMBERSHIP, {"user_id": user_id, "role": values["role"].value})
            row = (await w.conn.execute(USERS_IN_TENANT.where(USERS_IN_TENANT.selected_columns.id == user_id),
                                        {"tenant_id": w.tenant_id})).one()
        return User.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.MANAGE_USERS)])
    async def update_member_role(self, info: Info, user_id: strawberry.ID, role: Role) -> User:
        uid = decode_id(user_id, "User", field="userId")
        async with change(info, Permission.MANAGE_USERS) as w:
            membership = await _membership(w, uid)
            _check_grant(w, Role(membership.role))
            _check_grant(w, role)
            if membership.role == Role.OWNER.value and role != Role.OWNER:
                await _keep_an_owner(w)
            await w.update(MEMBERSHIP, membership.id, {"role": role.value}, None)
            row = (await w.conn.execute(USERS_IN_TENANT.where(USERS_IN_TENANT.selected_columns.id == uid),
                                        {"tenant_id": w.tenant_id})).one()
        return User.from_row(row)

    @strawberry.mutation(permission_classes=[Can(Permission.MANAGE_USERS)],
                         description="Remove a person from the workspace; their deals keep no owner.")
    async def remove_member(self, info: Info, user_id: strawberry.ID) -> DeletePayload:
        uid = decode_id(user_id, "User", field="userId")
        async with change(info, Permission.MANAGE_USERS) as w:
            membership = await _membership(w, uid)
            _check_grant(w, Role(membership.role))
            if membership.role == Role.OWNER.value:
                await _keep_an_owner(w)
            await w.delete(MEMBERSHIP, membership.id, None)
        return DeletePayload(deleted_id=user_id)


def _check_grant(w: Change, role: Role) -> None:
    """Nobody grants, changes or removes a role above their own (only owners manage owners)."""
    if RANK[role] > RANK[w.principal.role]:
        raise Forbidden(f"Only an owner can manage the {role.value} role")


async def _membership(w: Change, user_id: uuid.UUID) -> object:
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
