"""``atrium webhooks create|list|update|delete|deliveries|replay|events`` and ``atrium worker``.

The ``webhooks`` commands run over the admin connection, like ``atrium apikey``, and do what the
mutations do (same checks, same audit rows, with no actor): a new endpoint's signing secret is
printed once. Ids are the API's global ids. ``atrium worker`` sends webhook deliveries until it is
stopped (SIGTERM or SIGINT let the batch in flight finish), beside or instead of the dispatchers of
the server processes (``ATRIUM_WEBHOOK_DISPATCHER=off`` there).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import insert, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from atrium.ops.admin import tenant_id_by_slug
from atrium.ops.bootstrap import resolve_database
from core.clock import SYSTEM_CLOCK
from core.console import fail, out
from core.errors import AtriumError
from core.ids import decode_id, to_global_id
from core.settings import Settings
from models.db import Databases, create_engine
from models.tables import AUDIT_EVENTS, TENANTS
from webhooks.catalog import event_types
from webhooks.dispatcher import Dispatcher
from webhooks.endpoints import (
    EndpointSpec,
    create_endpoint,
    delete_endpoint,
    deliveries_query,
    endpoints_query,
    replay,
    update_endpoint,
)

Handler = Callable[[argparse.Namespace], Awaitable[int]]
SET_TENANT = text("SELECT set_config('app.tenant_id', :tenant, true)")




def summary(row: Any) -> dict[str, Any]:
    return {"url": row.url, "eventTypes": list(row.event_types), "filter": row.filter,
            "description": row.description, "enabled": row.enabled}


async def _audit(conn: AsyncConnection, tenant_id: uuid.UUID, action: str, entity_id: uuid.UUID,
                 diff: dict[str, Any]) -> None:
    await conn.execute(insert(AUDIT_EVENTS).values(
        tenant_id=tenant_id, id=uuid.uuid4(), actor_id=None, action=action, entity_type="WebhookEndpoint",
        entity_id=entity_id, diff=diff, request_id="cli"))


Work = Callable[[AsyncConnection, uuid.UUID, Settings], Awaitable[int]]


async def _in_tenant(slug: str, work: Work) -> int:
    """Run ``work(conn, tenant_id, settings)`` in one transaction of the shared database, as the admin."""
    settings = await resolve_database(Settings.from_env())
    engine: AsyncEngine = create_engine(settings.admin_url)
    try:
        tenant_id = await tenant_id_by_slug(engine, slug)
        async with engine.begin() as conn:
            route = (await conn.execute(select(TENANTS.c.database_url).where(TENANTS.c.id == tenant_id))).scalar()
            if route is not None:
                return fail("webhooks are not available yet for tenants with a dedicated database")
            await conn.execute(SET_TENANT, {"tenant": str(tenant_id)})
            try:
                return await work(conn, tenant_id, settings)
            except AtriumError as exc:
                await conn.rollback()
                return fail(exc.message)
    finally:
        await engine.dispose()


def _show(row: Any) -> str:
    state = "enabled" if row.enabled else f"disabled ({row.disabled_reason})"
    filtered = f" filter={json.dumps(row.filter)}" if row.filter else ""
    return f"{to_global_id('WebhookEndpoint', row.id)}  {row.url}  {','.join(row.event_types)}  {state}{filtered}"


def _types(raw: str) -> list[str]:
    return [t.strip() for t in raw.split(",") if t.strip()]


def _filter(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise AtriumError("--filter must be a JSON object") from None


async def cmd_create(args: argparse.Namespace) -> int:
    async def work(conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings) -> int:
        spec = await EndpointSpec(args.url, _types(args.events), _filter(args.filter), args.description).checked(
            settings, prefix="")
        row, secret = await create_endpoint(conn, tenant_id, spec, None, settings)
        await _audit(conn, tenant_id, "create", row.id, {"after": summary(row)})
        out(_show(row))
        out(f"signing secret (shown once): {secret}")
        return 0

    return await _in_tenant(args.tenant, work)


async def cmd_list(args: argparse.Namespace) -> int:
    async def work(conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings) -> int:
        for row in (await conn.execute(endpoints_query(tenant_id))).all():
            out(_show(row))
        return 0

    return await _in_tenant(args.tenant, work)


async def cmd_update(args: argparse.Namespace) -> int:
    async def work(conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings) -> int:
        changes: dict[str, Any] = {}
        if args.url is not None:
            changes["url"] = args.url
        if args.events is not None:
            changes["event_types"] = _types(args.events)
        if args.filter is not None:
            changes["filter"] = _filter(args.filter)
        if args.enable or args.disable:
            changes["enabled"] = bool(args.enable)
        key = decode_id(args.endpoint, "WebhookEndpoint")
        before, after = await update_endpoint(conn, tenant_id, key, changes, None, settings)
        if after is not before:
            await _audit(conn, tenant_id, "update", key, {"before": summary(before), "after": summary(after)})
        out(_show(after))
        return 0

    return await _in_tenant(args.tenant, work)


async def cmd_delete(args: argparse.Namespace) -> int:
    async def work(conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings) -> int:
        key = decode_id(args.endpoint, "WebhookEndpoint")
        before = await delete_endpoint(conn, tenant_id, key)
        await _audit(conn, tenant_id, "delete", key, {"before": summary(before)})
        out(f"deleted {args.endpoint} ({before.url}) and its deliveries")
        return 0

    return await _in_tenant(args.tenant, work)


async def cmd_deliveries(args: argparse.Namespace) -> int:
    async def work(conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings) -> int:
        key = decode_id(args.endpoint, "WebhookEndpoint")
        query = deliveries_query(tenant_id, key, [args.status] if args.status else None)
        rows = (await conn.execute(query.order_by(query.selected_columns.created_at.desc())
                                   .limit(args.limit))).all()
        for r in rows:
            code = r.response_status if r.response_status is not None else "-"
            latency = f"{r.latency_ms}ms" if r.latency_ms is not None else "-"
            out(f"{to_global_id('WebhookDelivery', r.id)}  {r.event_type:<24} {r.status:<9} attempts={r.attempts} "
                f"code={code} latency={latency}  msg_{r.message_id.hex}" + (f"  {r.last_error}" if r.last_error
                                                                             and r.status != "delivered" else ""))
        return 0

    return await _in_tenant(args.tenant, work)


async def cmd_replay(args: argparse.Namespace) -> int:
    async def work(conn: AsyncConnection, tenant_id: uuid.UUID, settings: Settings) -> int:
        key = decode_id(args.delivery, "WebhookDelivery")
        row = await replay(conn, tenant_id, key)
        await _audit(conn, tenant_id, "replay", row.endpoint_id,
                     {"after": {"delivery": str(row.id), "replayOf": str(key)}})
        out(f"replaying as {to_global_id('WebhookDelivery', row.id)} (msg_{row.message_id.hex})")
        return 0

    return await _in_tenant(args.tenant, work)


async def cmd_events(args: argparse.Namespace) -> int:
    for t in event_types():
        out(f"{t.name:<28} {t.description}")
    return 0


async def cmd_worker(args: argparse.Namespace) -> int:
    """Send deliveries until SIGTERM or SIGINT."""
    settings = await resolve_database(Settings.from_env())
    databases = Databases.of(settings)
    dispatcher = Dispatcher(databases, settings, SYSTEM_CLOCK)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await dispatcher.start()
        await dispatcher.listening.wait()
        out(f"atrium worker: sending webhook deliveries ({settings.webhook_concurrency} at once)")
        await stop.wait()
    finally:
        await dispatcher.close()
        await databases.dispose()
    return 0


COMMANDS = ("webhooks", "worker")


async def run(args: argparse.Namespace) -> int:
    handler: Handler = args.handler
    return await handler(args)


def add_parsers(sub: Any) -> None:
    """Register ``webhooks`` and ``worker`` on the CLI's subparsers (their actions run through ``run``)."""
    w = sub.add_parser("webhooks", help="register webhook endpoints, list and replay their deliveries")
    wsub = w.add_subparsers(dest="action", required=True)
    wc = wsub.add_parser("create", help="register an endpoint (its signing secret is printed once)")
    wc.add_argument("--tenant", required=True)
    wc.add_argument("--url", required=True)
    wc.add_argument("--events", required=True, help="comma-separated event types (atrium webhooks events)")
    wc.add_argument("--filter", help='JSON object of record fields to values, e.g. {"pipelineId": "..."}')
    wc.add_argument("--description")
    wc.set_defaults(handler=cmd_create)
    wl = wsub.add_parser("list")
    wl.add_argument("--tenant", required=True)
    wl.set_defaults(handler=cmd_list)
    wu = wsub.add_parser("update", help="change an endpoint; --enable resumes a disabled one")
    wu.add_argument("endpoint")
    wu.add_argument("--tenant", required=True)
    wu.add_argument("--url")
    wu.add_argument("--events")
    wu.add_argument("--filter")
    state = wu.add_mutually_exclusive_group()
    state.add_argument("--enable", action="store_true")
    state.add_argument("--disable", action="store_true")
    wu.set_defaults(handler=cmd_update)
    wd = wsub.add_parser("delete", help="delete an endpoint and its deliveries")
    wd.add_argument("endpoint")
    wd.add_argument("--tenant", required=True)
    wd.set_defaults(handler=cmd_delete)
    wv = wsub.add_parser("deliveries", help="an endpoint's deliveries, newest first")
    wv.add_argument("endpoint")
    wv.add_argument("--tenant", required=True)
    wv.add_argument("--status", choices=["pending", "delivered", "failed"])
    wv.add_argument("--limit", type=int, default=20)
    wv.set_defaults(handler=cmd_deliveries)
    wr = wsub.add_parser("replay", help="send a delivery's message again")
    wr.add_argument("delivery")
    wr.add_argument("--tenant", required=True)
    wr.set_defaults(handler=cmd_replay)
    we = wsub.add_parser("events", help="the event types endpoints may ask for")
    we.set_defaults(handler=cmd_events)

    k = sub.add_parser("worker", help="send webhook deliveries until stopped")
    k.set_defaults(handler=cmd_worker)
