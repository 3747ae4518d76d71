"""The ``atrium`` command: serve, migrate, tenant, user, token, seed-demo, trash, import, export-schema, schema, db
(and the partner and webhook commands: apikey, persisted, webhooks, worker).

Every command reads its settings first and reaches its database before doing anything else: a bad
setting (``core.settings.SettingError``), an unreachable database (``DatabaseUnreachable``) or, for
``serve``, a port in use is one line on stderr and a non-zero exit (2 for usage and settings, 1 for
the rest), never a traceback. ``serve`` stops the embedded PostgreSQL it started when it stops;
``atrium db stop`` stops one left running.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import errno
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from atrium.cli import importing
from atrium.observability.logs import uvicorn_log_config
from atrium.ops.admin import (
    add_user,
    create_tenant,
    delete_tenant,
    has_export,
    list_tenants,
    rows_of_tenant,
    tenant_database,
    tenant_id_by_slug,
)
from atrium.ops.bootstrap import DatabaseUnreachable, resolve_database
from atrium.ops.embedded_pg import embedded_running, stop_embedded_postgres
from core.console import out
from core.pgurl import async_url
from core.settings import Settings
from core.version import VERSION
from models.db import create_engine
from models.migrations import migrate
from models.tables import MEMBERSHIPS, USERS, Isolation, Plan, Role
from partners import cli as partner_cli
from webhooks import cli as webhook_cli

log = logging.getLogger("atrium")



class ProgressBar:
    """A one-line progress bar on stderr."""

    def __init__(self, label: str, total: int, width: int = 40) -> None:
        self.label, self.total, self.width, self.done = label, max(total, 1), width, 0

    def advance(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total:
            self.total = total
        filled = int(self.width * self.done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


async def _settings(args: argparse.Namespace) -> Settings:
    return await resolve_database(Settings.from_env())


async def cmd_migrate(args: argparse.Namespace) -> int:
    settings = await _settings(args)
    await migrate(settings.admin_url, args.revision, downgrade=args.downgrade)
    out(f"database {'downgraded' if args.downgrade else 'migrated'} to {args.revision}")
    return 0


async def cmd_tenant(args: argparse.Namespace) -> int:
    settings = await _settings(args)
    engine = create_engine(settings.admin_url)
    try:
        if args.action == "create":
            if args.database_url:
                await migrate(async_url(args.database_url))
            tenant_id = await create_tenant(engine, args.slug, args.name or args.slug.title(), plan=Plan(args.plan),
                                            isolation=Isolation(args.isolation), database_url=args.database_url)
            out(f"created tenant {args.slug} ({tenant_id})")
        elif args.action == "delete":
            return await delete_tenant_command(engine, settings, args)
        else:
            for row in await list_tenants(engine):
                out(f"{row.slug:<24} {row.plan:<11} {row.isolation:<10} {row.members:>4} members  {row.name}")
    finally:
        await engine.dispose()
    return 0


async def delete_tenant_command(registry: AsyncEngine, settings: Settings, args: argparse.Namespace) -> int:
    """``atrium tenant delete SLUG [--yes]``: only once the tenant has a finished export, and only when
    confirmed (``--yes``, or the slug typed again); then every row of the tenant in every table."""
    tenant_id = await tenant_id_by_slug(registry, args.slug)
    home = await tenant_database(registry, settings.admin_url, tenant_id)
    try:
        if not await has_export(home, tenant_id):
            raise ValueError(f"tenant {args.slug!r} has no finished export: run exportTenant first "
                             "(docs/export.md), then delete")
        if not args.yes:
            sys.stderr.write(f"This deletes every row of tenant {args.slug!r} ({tenant_id}) in every table, "
                             "for good.\nType the tenant's slug to confirm: ")
            sys.stderr.flush()
            answer = await asyncio.to_thread(sys.stdin.readline)
            if answer.strip() != args.slug:
                raise ValueError("not confirmed; nothing was deleted")
        deleted = await delete_tenant(registry, home, tenant_id)
        left = {name: n for name, n in (await rows_of_tenant(home, tenant_id)).items() if n}
    finally:
        await home.dispose()
    if left:
        sys.stderr.write(f"atrium: rows of {args.slug} remain in {left}\n")
        return 1
    out(f"deleted tenant {args.slug} ({tenant_id}): {sum(deleted.values())} rows in "
        f"{sum(1 for n in deleted.values() if n)} tables")
    return 0


async def cmd_retention(args: argparse.Namespace) -> int:
    """``atrium retention run [--tenant SLUG]``: apply the retention policies now (shared database and
    every dedicated one, the trash included); prints what each removed."""
    import resolvers.trash  # noqa: F401  (registers the trash's retention target)
    from models.db import Databases
    from models.retention import apply_retention

    settings = await _settings(args)
    engine = create_engine(settings.admin_url)
    try:
        only = await tenant_id_by_slug(engine, args.tenant) if args.tenant else None
    finally:
        await engine.dispose()
    databases = Databases(settings.admin_url, pool_size=2)
    try:
        for applied in await apply_retention(databases, dt.datetime.now(dt.UTC), tenant_id=only):
            out(f"{applied.tenant_id} {applied.target}: kept {applied.keep_days} days, removed {applied.removed}")
    finally:
        await databases.dispose()
    return 0


async def cmd_user(args: argparse.Namespace) -> int:
    settings = await _settings(args)
    engine = create_engine(settings.admin_url)
    try:
        tenant_id = await tenant_id_by_slug(engine, args.tenant)
        home = await tenant_database(engine, settings.admin_url, tenant_id)
        try:
            user_id = await add_user(home, tenant_id, args.email, args.name or args.email.split("@")[0],
                                     Role(args.role), args.password)
        finally:
            await home.dispose()
    finally:
        await engine.dispose()
    out(f"{args.email} is {args.role} of {args.tenant} (user {user_id})")
    return 0


async def cmd_audit(args: argparse.Namespace) -> int:
    """``atrium audit verify --tenant SLUG``: 0 when the chain is intact, 1 with its first broken link."""
    from models.audit_chain import verify_chain

    settings = await _settings(args)
    engine = create_engine(settings.admin_url)
    try:
        tenant_id = await tenant_id_by_slug(engine, args.tenant)
        home = await tenant_database(engine, settings.admin_url, tenant_id)
        try:
            async with home.connect() as conn:
                await conn.execution_options(isolation_level="REPEATABLE READ")
                async with conn.begin():
                    found = await verify_chain(conn, tenant_id)
        finally:
            await home.dispose()
    finally:
        await engine.dispose()
    span = f"events {found.first_seq}..{found.last_seq}" if found.first_seq is not None else "no events"
    if found.broken is not None:
        sys.stderr.write(f"atrium: audit chain of {args.tenant} is BROKEN at {found.broken.describe()}\n")
        return 1
    out(f"audit chain of {args.tenant} intact: {found.checked} events checked ({span}, anchor {found.anchor_seq}); "
        f"head {found.head_seq} sha256 {found.head_hash.hex()}")
    return 0


async def mint_token(settings: Settings, tenant: str, email: str, role: Role, ttl: int | None = None) -> str:
    """A development token for ``email``'s membership of ``tenant`` (which must exist)."""
    from auth.tokens import issue_token

    engine = create_engine(settings.admin_url)
    try:
        tenant_id = await tenant_id_by_slug(engine, tenant)
        home = await tenant_database(engine, settings.admin_url, tenant_id)
        try:
            async with home.connect() as conn:
                user_id = (await conn.execute(
                    select(USERS.c.id).join(MEMBERSHIPS, MEMBERSHIPS.c.user_id == USERS.c.id)
                    .where(MEMBERSHIPS.c.tenant_id == tenant_id, func.lower(USERS.c.email) == email.lower())
                )).scalar_one_or_none()
        finally:
            await home.dispose()
    finally:
        await engine.dispose()
    if user_id is None:
        raise ValueError(f"{email} is not a member of {tenant}")
    return issue_token(settings, user_id=user_id, tenant_id=tenant_id, role=role, ttl_seconds=ttl)


async def cmd_token(args: argparse.Namespace) -> int:
    settings = await _settings(args)
    out(await mint_token(settings, args.tenant, args.email, Role(args.role), args.ttl))
    return 0


async def cmd_trash(args: argparse.Namespace) -> int:
    """``atrium trash purge``: what has been in the trash past retention is removed for good."""
    import datetime as dt

    from resolvers.trash import purge_trash

    settings = await _settings(args)
    older_than = dt.timedelta(days=args.older_than_days) if args.older_than_days is not None else None
    engine = create_engine(settings.admin_url)
    try:
        tenants = [row for row in await list_tenants(engine) if args.tenant in (None, row.slug)]
        if args.tenant is not None and not tenants:
            raise ValueError(f"no tenant {args.tenant!r}")
        for row in tenants:
            home = await tenant_database(engine, settings.admin_url, row.id)
            try:
                purged = await purge_trash(home, older_than, tenant_id=row.id)
            finally:
                await home.dispose()
            out(f"{row.slug}: purged {purged[row.id]} records")
    finally:
        await engine.dispose()
    return 0


async def cmd_import(args: argparse.Namespace) -> int:
    """``atrium import FILE --tenant SLUG --type TYPE`` (``atrium.cli.importing``)."""
    return await importing.run(args, await _settings(args))


async def cmd_seed_demo(args: argparse.Namespace) -> int:
    from atrium.ops.demo import seed_demo

    settings = await _settings(args)
    await migrate(settings.admin_url)
    slugs = [s.strip() for s in args.tenants.split(",") if s.strip()]
    bar = ProgressBar("seeding deals", args.deals * len(slugs))
    tenants = await seed_demo(settings.admin_url, slugs=slugs, deals=args.deals, progress=bar.advance)
    for tenant in tenants:
        out(f"{tenant.slug}: {tenant.deals} deals; sign in as {tenant.owner.email} / {tenant.owner.password}")
    return 0


def cmd_export_schema(args: argparse.Namespace) -> int:
    from atrium.schema import schema

    Path(args.output).write_text(schema.as_str() + "\n")
    out(f"wrote {args.output}")
    return 0


def cmd_schema_check(args: argparse.Namespace) -> int:
    """``atrium schema check``: the code's schema against the last release's SDL and CHANGELOG.md
    (``atrium.ops.contract``); 0 when the contract holds, 1 with each problem otherwise."""
    from graphql import build_schema

    from atrium.ops.contract import changelog_entry, check
    from atrium.schema import schema

    try:
        release = build_schema(Path(args.release).read_text())
        changelog = Path(args.changelog).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    report = check(release, build_schema(schema.as_str()), changelog, VERSION)
    counts = {kind: sum(c.kind == kind for c in report.changes) for kind in ("breaking", "dangerous")}
    out(f"{args.release} -> the code's schema ({VERSION}): {counts['breaking']} breaking, "
        f"{counts['dangerous']} dangerous changes")
    for change in report.changes:
        out(f"  {change.kind:<9} {change.type} {change.coordinate}: {change.description}")
    if report.ok:
        out("the contract holds")
        return 0
    for problem in report.problems:
        sys.stderr.write(f"atrium: {problem}\n")
    if report.unlisted:
        sys.stderr.write(f"List them in {args.changelog} under ## [Unreleased] / ### Schema changes:\n")
        for change in report.unlisted:
            sys.stderr.write(changelog_entry(change) + "\n")
    return 1


class PortInUse(Exception):
    """The address ``serve`` was asked to listen on is taken (or not ours to take)."""


def check_port(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (SO_REUSEADDR) and let go; ``PortInUse`` when that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortInUse(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            reason = "is already in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
            raise PortInUse(f"port {port} on {host} {reason}: stop what holds it or choose another with "
                            "--port") from None


async def prepare_serve(args: argparse.Namespace, settings: Settings) -> Settings:
    """Resolve the database, migrate in development, seed demo data when empty, print how to start."""
    from atrium.ops.demo import DEMO_PASSWORD, seed_demo

    settings = await resolve_database(settings)
    if settings.env != "production":
        await migrate(settings.admin_url)
        engine = create_engine(settings.admin_url)
        try:
            empty = not await list_tenants(engine)
        finally:
            await engine.dispose()
        if empty and not args.no_demo:
            bar = ProgressBar("seeding demo data", 500 * 2)
            await seed_demo(settings.admin_url, slugs=("acme", "globex"), deals=500, progress=bar.advance)
        if not args.no_demo:
            token = await mint_token(settings, "acme", "owner@acme.example", Role.OWNER, ttl=7 * 24 * 3600)
            host = "localhost" if args.host in ("0.0.0.0", "127.0.0.1", "::") else args.host  # noqa: S104
            ide = "GraphiQL" if settings.graphiql_enabled else "GraphQL (GraphiQL is off: ATRIUM_GRAPHIQL)"
            out(f"\nAtrium: {ide} at http://{host}:{args.port}/graphql")
            out("Demo tenant 'acme' (also 'globex'); owner token, valid 7 days (paste as an HTTP header):")
            out(f'  {{"Authorization": "Bearer {token}"}}')
            out(f'Or sign in: login(email: "owner@acme.example", password: "{DEMO_PASSWORD}", tenant: "acme")')
            out(f"Live dashboard (signed in as that owner): http://{host}:{args.port}/dashboard#token={token}\n")
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    """Check the settings and the port, then the database, then print the banner and serve; the
    embedded PostgreSQL this started is stopped when serving ends (Ctrl+C, SIGTERM)."""
    import uvicorn

    settings = Settings.from_env()
    check_port(args.host, args.port)
    embedded = settings.data_dir.resolve() / "pg"
    ours = settings.database_url is None and not embedded_running(embedded)
    try:
        settings = asyncio.run(prepare_serve(args, settings))
        # Worker processes rebuild settings from the environment: hand them the resolved database.
        assert settings.database_url is not None
        os.environ["DATABASE_URL"] = settings.database_url
        os.environ.setdefault("ATRIUM_DATA_DIR", str(settings.data_dir))
        # Atrium writes the access log (atrium.access); uvicorn's lines are formatted as Atrium's.
        uvicorn.run("atrium.asgi:create_from_env", factory=True, host=args.host, port=args.port,
                    workers=None if args.reload else args.workers, reload=args.reload, log_level=args.log_level,
                    proxy_headers=True, access_log=False, log_config=uvicorn_log_config(settings),
                    http="atrium.http.deadline:HttpProtocol")  # slow clients cut off
    finally:
        if ours and embedded_running(embedded):
            stop_embedded_postgres(embedded)
            log.info("stopped the embedded PostgreSQL in %s", embedded)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """``atrium db stop``: stop the embedded PostgreSQL of ``ATRIUM_DATA_DIR`` (one left running)."""
    embedded = Settings.from_env().data_dir.resolve() / "pg"
    if not embedded_running(embedded):
        out(f"no embedded PostgreSQL is running in {embedded}")
        return 0
    stop_embedded_postgres(embedded)
    out(f"stopped the embedded PostgreSQL in {embedded}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="atrium", description="Atrium, a multi-tenant CRM GraphQL API")
    p.add_argument("--version", action="version", version=f"atrium {VERSION}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the API (embedded PostgreSQL and demo data when nothing is configured)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--reload", action="store_true")
    s.add_argument("--no-demo", action="store_true", help="do not seed or print demo credentials")
    s.add_argument("--log-level", default="info")

    m = sub.add_parser("migrate", help="apply (or with --downgrade, revert to) a revision")
    m.add_argument("revision", nargs="?", default="head")
    m.add_argument("--downgrade", action="store_true")

    t = sub.add_parser("tenant", help="create, list or delete tenants")
    tsub = t.add_subparsers(dest="action", required=True)
    tc = tsub.add_parser("create")
    tc.add_argument("slug")
    tc.add_argument("--name")
    tc.add_argument("--plan", default="free", choices=[x.value for x in Plan])
    tc.add_argument("--isolation", default="shared", choices=[x.value for x in Isolation])
    tc.add_argument("--database-url", help="dedicated tenants: the tenant's own (migrated) database")
    tsub.add_parser("list")
    td = tsub.add_parser("delete", help="delete every row of a tenant (after an export; asks to confirm)")
    td.add_argument("slug")
    td.add_argument("--yes", action="store_true", help="do not ask: confirmed")

    u = sub.add_parser("user", help="add a user to a tenant")
    usub = u.add_subparsers(dest="action", required=True)
    ua = usub.add_parser("add")
    ua.add_argument("--tenant", required=True)
    ua.add_argument("--email", required=True)
    ua.add_argument("--name")
    ua.add_argument("--role", default="member", choices=[x.value for x in Role])
    ua.add_argument("--password")

    k = sub.add_parser("token", help="mint a development token (HS256, ATRIUM_JWT_SECRET)")
    k.add_argument("--tenant", required=True)
    k.add_argument("--email", required=True)
    k.add_argument("--role", default="member", choices=[x.value for x in Role])
    k.add_argument("--ttl", type=int, help="seconds (default ATRIUM_TOKEN_TTL)")

    d = sub.add_parser("seed-demo", help="(re)create demo tenants with realistic data")
    d.add_argument("--tenants", default="acme,globex", help="comma-separated slugs")
    d.add_argument("--deals", type=int, default=500, help="deals per tenant (up to 100000)")

    tr = sub.add_parser("trash", help="the trash of deleted records")
    trsub = tr.add_subparsers(dest="action", required=True)
    tp = trsub.add_parser("purge", help="remove for good what has been in the trash past retention")
    tp.add_argument("--tenant", help="one tenant's slug (default: every tenant)")
    tp.add_argument("--older-than-days", type=int, help="instead of each tenant's own retention")

    e = sub.add_parser("export-schema", help="print the SDL to a file")
    e.add_argument("--output", default="schema.graphql")

    c = sub.add_parser("schema", help="the schema contract (docs/contract.md)")
    csub = c.add_subparsers(dest="action", required=True)
    cc = csub.add_parser("check", help="the code's schema against the last release's SDL and CHANGELOG.md")
    cc.add_argument("--release", default="schema.release.graphql", help="the SDL of the last release")
    cc.add_argument("--changelog", default="CHANGELOG.md")

    b = sub.add_parser("db", help="the embedded PostgreSQL (in ATRIUM_DATA_DIR/pg)")
    bsub = b.add_subparsers(dest="action", required=True)
    bsub.add_parser("stop", help="stop it (atrium serve stops the one it started by itself)")

    a = sub.add_parser("audit", help="the tamper-evident audit log (docs/audit.md)")
    asub = a.add_subparsers(dest="action", required=True)
    av = asub.add_parser("verify", help="recompute a tenant's audit hash chain and report its first broken link")
    av.add_argument("--tenant", required=True)

    r = sub.add_parser("retention", help="apply the tenants' retention policies now (docs/export.md)")
    rsub = r.add_subparsers(dest="action", required=True)
    rr = rsub.add_parser("run")
    rr.add_argument("--tenant", help="only this tenant")

    importing.add_parser(sub)
    partner_cli.add_parsers(sub)
    webhook_cli.add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parser().parse_args(argv)
    if args.command == "seed-demo" and not 1 <= args.deals <= 100_000:
        parser().error("--deals must be between 1 and 100000")
    handlers = {"migrate": cmd_migrate, "tenant": cmd_tenant, "user": cmd_user, "token": cmd_token,
                "seed-demo": cmd_seed_demo, "audit": cmd_audit, "retention": cmd_retention,
                "trash": cmd_trash, "import": cmd_import,
                **dict.fromkeys(partner_cli.COMMANDS, partner_cli.run),
                **dict.fromkeys(webhook_cli.COMMANDS, webhook_cli.run)}
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "export-schema":
            return cmd_export_schema(args)
        if args.command == "schema":
            return cmd_schema_check(args)
        if args.command == "db":
            return cmd_db(args)
        return asyncio.run(handlers[args.command](args))
    except ValueError as exc:
        sys.stderr.write(f"atrium: {exc}\n")
        return 2
    except (DatabaseUnreachable, PortInUse) as exc:
        sys.stderr.write(f"atrium: {exc}\n")
        return 1
