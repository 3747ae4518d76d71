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
    MANAGE_WEBHOOKS = "webhooks:manage"
    TRASH = "trash:manage"
    """See the trash and purge it (restoring a record needs the permission to delete it)."""
    MANAGE_FIELDS = "fields:manage"
    """Define, change, delete and purge custom fields (``resolvers.custom_fields``) and set and remove
    the tenant's field rules (``auth.fields``)."""


GRANTS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.MEMBER: frozenset({Permission.READ, Permission.WRITE}),
    Role.ADMIN: frozenset({Permission.READ, Permission.WRITE, Permission.DELETE, Permission.MANAGE_USERS,
                             Permission.READ_AUDIT, Permission.MANAGE_WEBHOOKS, Permission.TRASH,
                             Permission.MANAGE_FIELDS}),
    Role.OWNER: frozenset(Permission),
}

def allows(role: Role, permission: Permission) -> bool:
    return permission in GRANTS[role]


def described(description: str | None, permission: Permission) -> str:
    """A field's description followed by the permission it requires (so the SDL says who may call it)."""
    note = f"Requires `{permission.value}`."
    return f"{description} {note}" if description else note


def requires(permission: Permission, description: str | None = None) -> dict[str, Any]:
    """The keyword arguments that make a Strawberry field require ``permission``: its permission
    class, and its description saying so. The one place a field's permission is stated::

        @strawberry.field(**requires(Permission.READ, "All pipelines, by name."))
    """
    return {"permission_classes": [Can(permission)], "description": described(description, permission)}


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
        {"message": f"Requires {permission.value}", "has_permission": has_permission, "permission": permission},
    )
