"""Roles, permissions and the grants table; ``Can(permission)`` for Strawberry fields."""

from __future__ import annotations

import enum
from functools import cache
from typing import Any

from strawberry.permission import BasePermission
from strawberry.types import Info

from core.errors import Forbidden, Unauthenticated
from models.tables import Role


class Permission(enum.StrEnum):
    READ = "crm:read"
    WRITE = "crm:write"
    DELETE = "crm:delete"
    MANAGE_USERS = "users:manage"
    READ_AUDIT = "audit:read"
    MANAGE_TENANT = "tenant:manage"


GRANTS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.MEMBER: frozenset({Permission.READ, Permission.WRITE}),
    Role.ADMIN: frozenset({Permission.READ, Permission.WRITE, Permission.DELETE, Permission.MANAGE_USERS,
                             Permission.READ_AUDIT}),
    Role.OWNER: frozenset(Permission),
}

RANK = {Role.VIEWER: 0, Role.MEMBER: 1, Role.ADMIN: 2, Role.OWNER: 3}


def allows(role: Role, permission: Permission) -> bool:
    return permission in GRANTS[role]


@cache
def Can(permission: Permission) -> type[BasePermission]:  # noqa: N802 - reads as a declaration
    """A Strawberry permission class requiring ``permission``.

    Without a principal it raises UNAUTHENTICATED; with a role lacking the permission, FORBIDDEN.
    """

    def has_permission(self: BasePermission, source: Any, info: Info, **kwargs: Any) -> bool:
        principal = info.context.principal
        if principal is None:
            raise Unauthenticated()
        if not allows(principal.role, permission):
            raise Forbidden(f"Your role ({principal.role.value}) does not have {permission.value}")
        return True

    return type(
        f"Can_{permission.name}",
        (BasePermission,),
        {"message": f"Requires {permission.value}", "has_permission": has_permission},
    )
