"""``atrium apikey create|list|revoke`` and ``atrium persisted push|list|remove|check`` (operator commands).

They run over the admin connection, like ``atrium tenant`` and ``atrium user``, and do what the
admin mutations do (same validation, same audit rows, with no actor): a key is shown once and acts
for the member named by ``--user`` with at most their role; a pushed manifest is validated as a
whole against the schema and only adds documents; removal is its own command. ``persisted check``
re-validates what every tenant has stored against the schema (the code's, or a release's SDL) before
a deploy, and fails when a document would break.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from graphql import GraphQLError
from graphql import build_schema as graphql_build_schema
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from atrium.ops.admin import tenant_database, tenant_id_by_slug
from atrium.ops.bootstrap import resolve_database
from core.console import fail, out
from core.errors import AtriumError
from core.settings import Settings
from models.db import create_engine
from models.tables import AUDIT_EVENTS, MEMBERSHIPS, TENANTS, USERS, Role
from partners.keys import KeySpec, create_key, keys_query, revoke_key
from partners.manifests import (
    InvalidManifest,
    Operation,
    Problem,
    client_name,
    documents_query,
    push_documents,
    read_manifest,
    recheck,
)
from partners.manifests import remove_documents as remove_manifest_documents

Handler = Callable[[argparse.Namespace], Awaitable[int]]




async def _audit(conn: AsyncConnection, tenant_id: uuid.UUID, action: str, entity_type: str, entity_id: uuid.UUID,
                 diff: dict[str, Any]) -> None:
    await conn.execute(insert(AUDIT_EVENTS).values(
        tenant_id=tenant_id, id=uuid.uuid4(), actor_id=None, action=action, entity_type=entity_type,
        entity_id=entity_id, diff=diff, request_id="cli"))


async def _with_tenant(slug: str, work: Callable[[AsyncEngine, AsyncEngine, uuid.UUID], Awaitable[int]]) -> int:
    """Run ``work(registry, home, tenant_id)``: the admin engines of the shared and the tenant's database."""
    settings = await resolve_database(Settings.from_env())
    registry = create_engine(settings.admin_url)
    try:
        tenant_id = await tenant_id_by_slug(registry, slug)
        home = await tenant_database(registry, settings.admin_url, tenant_id)
        try:
            return await work(registry, home, tenant_id)
        except AtriumError as exc:
            return fail(exc.message)
        finally:
            await home.dispose()
    finally:
        await registry.dispose()


def _expiry(args: argparse.Namespace) -> dt.datetime | None:
    if args.expires_in_days is not None:
        return dt.datetime.now(dt.UTC) + dt.timedelta(days=args.expires_in_days)
    if args.expires_at:
        moment = dt.datetime.fromisoformat(args.expires_at)
        return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return None


async def cmd_apikey_create(args: argparse.Namespace) -> int:
    async def work(registry: AsyncEngine, home: AsyncEngine, tenant_id: uuid.UUID) -> int:
        async with registry.connect() as conn:
            route = (await conn.execute(select(TENANTS.c.database_url).where(TENANTS.c.id == tenant_id))).scalar()
        if route is not None:
            return fail("API keys are not available yet for tenants with a dedicated database")
        async with registry.begin() as conn:
            member = (await conn.execute(
                select(USERS.c.id, MEMBERSHIPS.c.role).join(MEMBERSHIPS, MEMBERSHIPS.c.user_id == USERS.c.id)
                .where(MEMBERSHIPS.c.tenant_id == tenant_id, func.lower(USERS.c.email) == args.user.lower())
            )).first()
            if member is None:
                return fail(f"{args.user} is not a member of {args.tenant}")
            spec = KeySpec(name=args.name, role=Role(args.role), expires_at=_expiry(args),
                           persisted_only=args.persisted_only, client=args.client).checked(Role(member.role))
            row, key = await create_key(conn, tenant_id, member.id, spec)
            await _audit(conn, tenant_id, "create", "ApiKey", row.id,
                         {"after": {"name": row.name, "prefix": row.prefix, "role": row.role}})
        out(f"created API key {row.prefix} ({row.name}, {row.role}) for {args.tenant}, acting for {args.user}")
        out("The key is shown only now; store it as a secret:")
        out(key)
        return 0

    return await _with_tenant(args.tenant, work)


async def cmd_apikey_list(args: argparse.Namespace) -> int:
    async def work(registry: AsyncEngine, home: AsyncEngine, tenant_id: uuid.UUID) -> int:
        async with registry.connect() as conn:
            rows = (await conn.execute(keys_query(tenant_id, include_revoked=args.all))).all()
        for r in rows:
            state = "revoked" if r.revoked_at else "expired" if r.expires_at and r.expires_at <= dt.datetime.now(
                dt.UTC) else "active"
            used = r.last_used_at.isoformat(timespec="seconds") if r.last_used_at else "never"
            flags = " persisted-only" if r.persisted_only else ""
            out(f"{r.prefix}  {state:<8} {r.role:<7} client={r.client or '-'}{flags}  last used {used}  {r.name}")
        return 0

    return await _with_tenant(args.tenant, work)


async def cmd_apikey_revoke(args: argparse.Namespace) -> int:
    async def work(registry: AsyncEngine, home: AsyncEngine, tenant_id: uuid.UUID) -> int:
        try:
            key: uuid.UUID | str = uuid.UUID(args.key)
        except ValueError:
            key = args.key.removeprefix("atr_").split("_")[0]
        async with registry.begin() as conn:
            row, revoked = await revoke_key(conn, tenant_id, key)
            if revoked:
                await _audit(conn, tenant_id, "revoke", "ApiKey", row.id, {"after": {"prefix": row.prefix}})
        out(f"API key {row.prefix} {'revoked' if revoked else 'was already revoked'}")
        return 0

    return await _with_tenant(args.tenant, work)


async def cmd_persisted_push(args: argparse.Namespace) -> int:
    from atrium.schema import build_schema

    try:
        manifest = json.loads(await asyncio.to_thread(Path(args.file).read_text))
    except (OSError, ValueError) as exc:
        return fail(f"cannot read {args.file}: {exc}")

    async def work(registry: AsyncEngine, home: AsyncEngine, tenant_id: uuid.UUID) -> int:
        client = client_name(args.client)
        operations = read_manifest(manifest)
        schema = build_schema(production=Settings.from_env().env == "production")._schema
        try:
            async with home.begin() as conn:
                result = await push_documents(conn, tenant_id, client, schema, operations, None)
                for row in result.added:
                    await _audit(conn, tenant_id, "create", "PersistedDocument", row.id,
                                 {"after": {"client": client, "documentId": row.document_id, "sha256": row.sha256}})
        except InvalidManifest as exc:
            sys.stderr.write(f"atrium: {args.file} refused, nothing stored:\n")
            for problem in exc.problems:
                sys.stderr.write(f"  {problem}\n")
            return 2
        out(f"{client}: {len(result.added)} documents added, {len(result.unchanged)} already present")
        return 0

    return await _with_tenant(args.tenant, work)


async def cmd_persisted_list(args: argparse.Namespace) -> int:
    async def work(registry: AsyncEngine, home: AsyncEngine, tenant_id: uuid.UUID) -> int:
        async with home.connect() as conn:
            rows = (await conn.execute(documents_query(tenant_id, args.client))).all()
        for r in rows:
            out(f"{r.client:<20} {r.operation_type:<12} {r.name or '-':<30} {r.document_id}")
        return 0

    return await _with_tenant(args.tenant, work)


async def cmd_persisted_remove(args: argparse.Namespace) -> int:
    async def work(registry: AsyncEngine, home: AsyncEngine, tenant_id: uuid.UUID) -> int:
        client = client_name(args.client)
        async with home.begin() as conn:
            removed = await remove_manifest_documents(conn, tenant_id, client, args.ids)
            for row in removed:
                await _audit(conn, tenant_id, "delete", "PersistedDocument", row.id,
                             {"before": {"client": client, "documentId": row.document_id, "sha256": row.sha256}})
        gone = {r.document_id for r in removed}
        out(f"{client}: removed {len(gone)} documents")
        for missing in sorted(set(args.ids) - gone):
            out(f"  not found: {missing}")
        return 0

    return await _with_tenant(args.tenant, work)


async def cmd_persisted_check(args: argparse.Namespace) -> int:
    """Re-validate every tenant's trusted documents (or one tenant's) against the schema: the code's,
    or the SDL in ``--schema`` (a release about to be deployed). Each document that would break is
    printed with its tenant, client, id and the reason, and so is each use of something deprecated;
    exit status 1 when any would break."""
    from atrium.schema import build_schema

    if args.schema:
        try:
            schema = graphql_build_schema(await asyncio.to_thread(Path(args.schema).read_text))
        except (OSError, GraphQLError, TypeError) as exc:
            return fail(f"cannot read the schema {args.schema}: {exc}")
    else:
        schema = build_schema(production=Settings.from_env().env == "production")._schema
    settings = await resolve_database(Settings.from_env())
    registry = create_engine(settings.admin_url)
    checked: dict[str, tuple[list[Problem], list[Problem]]] = {}  # by sha256: partners share documents
    documents = tenants = breaking = deprecated = 0
    try:
        query = select(TENANTS.c.id, TENANTS.c.slug, TENANTS.c.database_url).order_by(TENANTS.c.slug)
        if args.tenant:
            query = query.where(TENANTS.c.slug == args.tenant)
        async with registry.connect() as conn:
            found = (await conn.execute(query)).all()
        if args.tenant and not found:
            return fail(f"no tenant {args.tenant!r}")
        for tenant in found:
            if tenant.database_url is None:  # shared: the registry's database holds its documents
                async with registry.connect() as conn:
                    rows = (await conn.execute(documents_query(tenant.id))).all()
            else:
                home = await tenant_database(registry, settings.admin_url, tenant.id)
                try:
                    async with home.connect() as conn:
                        rows = (await conn.execute(documents_query(tenant.id))).all()
                finally:
                    await home.dispose()
            tenants += 1
            for row in rows:
                documents += 1
                if row.sha256 not in checked:
                    checked[row.sha256] = recheck(schema, Operation(row.document_id, row.body))
                problems, uses = checked[row.sha256]
                label = f"{tenant.slug} {row.client} {row.name or '-'} {row.document_id}"
                for problem in problems:
                    out(f"breaks      {label}: {problem.located()}")
                for use in uses:
                    out(f"deprecated  {label}: {use.located()}")
                breaking += bool(problems)
                deprecated += bool(uses)
    finally:
        await registry.dispose()
    against = args.schema or "the code's schema"
    out(f"{documents} documents of {tenants} tenants checked against {against}: {breaking} would break, "
        f"{deprecated} use something deprecated")
    return 1 if breaking else 0


COMMANDS = ("apikey", "persisted")


async def run(args: argparse.Namespace) -> int:
    """Run the ``apikey``/``persisted`` action chosen on the command line."""
    handler: Handler = args.handler
    return await handler(args)


def add_parsers(sub: Any) -> None:
    """Register ``apikey`` and ``persisted`` on the CLI's subparsers (their actions run through ``run``)."""
    roles = [r.value for r in Role]
    k = sub.add_parser("apikey", help="create, list or revoke API keys of a tenant")
    ksub = k.add_subparsers(dest="action", required=True)
    kc = ksub.add_parser("create", help="create a key (printed once)")
    kc.add_argument("--tenant", required=True)
    kc.add_argument("--user", required=True, help="email of the member the key acts for (its role caps the key's)")
    kc.add_argument("--name", required=True)
    kc.add_argument("--role", default=Role.VIEWER.value, choices=roles)
    expiry = kc.add_mutually_exclusive_group()
    expiry.add_argument("--expires-in-days", type=int)
    expiry.add_argument("--expires-at", help="ISO 8601 time (UTC unless it names a zone)")
    kc.add_argument("--persisted-only", action="store_true", help="the key may run trusted documents only")
    kc.add_argument("--client", help="restrict the key to this client's documents")
    kc.set_defaults(handler=cmd_apikey_create)
    kl = ksub.add_parser("list")
    kl.add_argument("--tenant", required=True)
    kl.add_argument("--all", action="store_true", help="include revoked keys")
    kl.set_defaults(handler=cmd_apikey_list)
    kr = ksub.add_parser("revoke")
    kr.add_argument("--tenant", required=True)
    kr.add_argument("key", help="the key's prefix, id, or the key itself")
    kr.set_defaults(handler=cmd_apikey_revoke)

    p = sub.add_parser("persisted", help="push, list or remove trusted documents (persisted-query manifests)")
    psub = p.add_subparsers(dest="action", required=True)
    pp = psub.add_parser("push", help="validate a manifest and add its documents (removes nothing)")
    pp.add_argument("file", help="an Apollo persisted-query manifest or a {id: document} JSON map")
    pp.add_argument("--client", required=True)
    pp.add_argument("--tenant", required=True)
    pp.set_defaults(handler=cmd_persisted_push)
    pl = psub.add_parser("list")
    pl.add_argument("--tenant", required=True)
    pl.add_argument("--client")
    pl.set_defaults(handler=cmd_persisted_list)
    pr = psub.add_parser("remove", help="remove documents from a client, by manifest id")
    pr.add_argument("ids", nargs="+")
    pr.add_argument("--client", required=True)
    pr.add_argument("--tenant", required=True)
    pr.set_defaults(handler=cmd_persisted_remove)
    pk = psub.add_parser("check", help="re-validate every tenant's documents against the schema (exit 1 if any "
                                       "would break)")
    pk.add_argument("--tenant", help="only this tenant's documents")
    pk.add_argument("--schema", help="an SDL file to check against (default: the code's schema)")
    pk.set_defaults(handler=cmd_persisted_check)
