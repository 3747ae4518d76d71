"""Webhooks end to end: registered through the API and the CLI, written to the outbox in the change's
transaction, sent by dispatchers to a real HTTP receiver on 127.0.0.1, signed as Standard Webhooks
says (checked with its reference verifier, the ``standardwebhooks`` package).

The module has a database of its own (so its dispatchers, which look for work across tenants, see
only its deliveries) and an app without a dispatcher: each test starts the dispatchers it needs, in
process or as ``atrium worker`` processes. Waits are on events: the receiver's recorded requests or
a dispatcher's committed batches, each with a timeout.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import ipaddress
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pycrdt import Doc, Text
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette

from atrium.app import create_app
from atrium.cli.main import parser
from core.clock import SYSTEM_CLOCK, Clock, ManualClock
from core.settings import Settings
from models.db import Databases
from models.tables import AUDIT_EVENTS, WEBHOOK_DELIVERIES, WEBHOOK_ENDPOINTS, Role
from tests.cli import ROOT, environment
from tests.conftest import TEST_WEBHOOK_KEY, TenantWorld, codes, data_or_fail, gql, make_tenant_world, scratch_database
from tests.crm import create_company, create_deal, create_pipeline, gid, uuid_of
from tests.receiver import WAIT, Receiver
from webhooks import cli as webhook_cli
from webhooks.addresses import networks, refusal
from webhooks.catalog import ENDPOINT_DISABLED, event_types
from webhooks.dispatcher import ERROR_KINDS, OUTCOMES, Dispatcher

CREATE = """mutation($i: WebhookEndpointInput!) {
  createWebhookEndpoint(input: $i) { secret endpoint { id url eventTypes filter enabled version } } }"""
UPDATE = """mutation($id: ID!, $i: WebhookEndpointPatch!) {
  updateWebhookEndpoint(id: $id, input: $i) { id enabled disabledReason eventTypes version } }"""
DELIVERIES = """query($e: ID!, $s: [WebhookDeliveryStatus!]) {
  webhookDeliveries(endpointId: $e, status: $s, first: 100) { totalCount
    nodes { id messageId eventType status attempts responseCode latencyMs lastError replayOf payload } } }"""
REPLAY = "mutation($id: ID!) { replayWebhookDelivery(id: $id) { id messageId status replayOf attempts } }"


# ---- the module's world -------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def hook_settings(server_url: str, settings: Settings) -> AsyncIterator[Settings]:
    """The run's settings on a database of this module's own, with quick retries."""
    async with scratch_database(server_url, "webhooks") as url:
        yield dataclasses.replace(settings.with_database(url), webhook_backoff_base_seconds=0.05,
                                  webhook_backoff_max_seconds=0.2, webhook_timeout_seconds=5.0)


@pytest.fixture(scope="module")
async def hook_admin(hook_settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(hook_settings.admin_url)
    yield engine
    await engine.dispose()


@pytest.fixture(scope="module")
async def hook_app(hook_settings: Settings) -> AsyncIterator[Starlette]:
    application = create_app(hook_settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def api(hook_app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=hook_app), base_url="http://atrium.test") as c:
        yield c


@pytest.fixture(autouse=True)
async def nothing_left_to_send(hook_admin: AsyncEngine) -> AsyncIterator[None]:
    """After each test, no endpoint of it is sent anything more (by the next tests' dispatchers)."""
    yield
    async with hook_admin.begin() as conn:
        await conn.execute(text("UPDATE webhook_endpoints SET enabled = false WHERE enabled"))
        await conn.execute(text("UPDATE webhook_deliveries SET status = 'failed' WHERE status = 'pending'"))


@pytest.fixture
async def world(hook_admin: AsyncEngine, hook_settings: Settings) -> TenantWorld:
    return await make_tenant_world(hook_admin, hook_settings, "hooks")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@contextlib.asynccontextmanager
async def dispatching(settings: Settings, clock: Clock = SYSTEM_CLOCK) -> AsyncIterator[Dispatcher]:
    """A dispatcher with a connection pool of its own, listening before the block runs."""
    databases = Databases(settings.app_url, pool_size=4)
    dispatcher = Dispatcher(databases, dataclasses.replace(settings, webhook_dispatcher=True), clock)
    await dispatcher.start()
    try:
        async with asyncio.timeout(WAIT):
            await dispatcher.listening.wait()
        yield dispatcher
    finally:
        await dispatcher.close()
        await databases.dispose()


async def register(api: httpx.AsyncClient, world: TenantWorld, url: str, types: list[str],
                   filter: Any = None) -> dict[str, Any]:
    body = await gql(api, CREATE, {"i": {"url": url, "eventTypes": types, "filter": filter}},
                     token=world.token(Role.ADMIN))
    created: dict[str, Any] = data_or_fail(body)["createWebhookEndpoint"]
    return created


async def deliveries(api: httpx.AsyncClient, world: TenantWorld, endpoint: str,
                     status: list[str] | None = None) -> list[dict[str, Any]]:
    body = await gql(api, DELIVERIES, {"e": endpoint, "s": status}, token=world.token(Role.ADMIN))
    nodes: list[dict[str, Any]] = data_or_fail(body)["webhookDeliveries"]["nodes"]
    return nodes


async def outbox(admin: AsyncEngine, endpoint: str) -> list[Any]:
    async with admin.connect() as conn:
        return list((await conn.execute(select(WEBHOOK_DELIVERIES).where(
            WEBHOOK_DELIVERIES.c.endpoint_id == uuid_of(endpoint)).order_by(WEBHOOK_DELIVERIES.c.seq))).all())


ALL_TYPES = [t.name for t in event_types()]


# ---- what can be asked for ----------------------------------------------------------------------

def b64_update(change: Callable[[Text], None]) -> str:
    doc: Doc[Any] = Doc()
    before = doc.get_state()
    change(doc.get("body", type=Text))
    return base64.b64encode(bytes(doc.get_update(before))).decode()


async def every_kind_of_change(api: httpx.AsyncClient, world: TenantWorld) -> None:
    """One of every operation the API offers on records, as the owner."""
    owner = world.token(Role.OWNER)

    async def ok(query: str, variables: dict[str, Any] | None = None) -> Any:
        return data_or_fail(await gql(api, query, variables, token=owner))

    pipeline = await create_pipeline(api, owner, stages=("Lead", "Won"))
    stage, won = (s["id"] for s in pipeline["stages"])
    await ok("mutation($p: ID!) { updatePipeline(id: $p, input: {name: \"Renamed\"}) { id } }", {"p": pipeline["id"]})
    extra = (await ok("mutation($p: ID!) { createStage(pipelineId: $p, input: {name: \"Extra\", probability: \"0.3\"}) "
                      "{ id } }", {"p": pipeline["id"]}))["createStage"]["id"]
    await ok("mutation($s: ID!) { updateStage(id: $s, input: {name: \"Extra!\"}) { id } }", {"s": extra})
    await ok("mutation($s: ID!) { deleteStage(id: $s) { deletedId } }", {"s": extra})
    company = await create_company(api, owner)
    await ok("mutation($c: ID!) { updateCompany(id: $c, input: {name: \"Co\"}) { id } }", {"c": company["id"]})
    contact = data_or_fail(await gql(api, "mutation($c: ID!) { createContact(input: {firstName: \"A\", "
                                          "lastName: \"B\", companyId: $c}) { id } }", {"c": company["id"]},
                                     token=owner))["createContact"]
    await ok("mutation($c: ID!) { updateContact(id: $c, input: {title: \"CTO\"}) { id } }", {"c": contact["id"]})
    deal = await create_deal(api, owner, stage, company_id=company["id"])
    await ok("mutation($d: ID!) { updateDeal(id: $d, input: {title: \"Bigger\"}) { id } }", {"d": deal["id"]})
    await ok("mutation($d: ID!, $s: ID!) { moveDeal(id: $d, stageId: $s) { id } }", {"d": deal["id"], "s": won})
    activity = (await ok("mutation($d: ID!) { createActivity(input: {kind: CALL, subject: \"Hi\", dealId: $d}) "
                         "{ id } }", {"d": deal["id"]}))["createActivity"]["id"]
    await ok("mutation($a: ID!) { updateActivity(id: $a, input: {subject: \"Hello\"}) { id } }", {"a": activity})
    await ok("mutation($a: ID!) { deleteActivity(id: $a) { deletedId } }", {"a": activity})
    note = (await ok("mutation($d: ID!) { createNote(input: {dealId: $d}) { id } }", {"d": deal["id"]}))["createNote"]
    await ok("mutation($n: ID!, $u: Base64!) { applyNoteUpdate(noteId: $n, update: $u) { id } }",
             {"n": note["id"], "u": b64_update(lambda body: body.insert(0, "hello"))})
    product = (await ok("mutation { createProduct(input: {name: \"P\", sku: \"P-1\", unitPrice: \"5.00\", "
                        "currency: \"USD\"}) { id } }"))["createProduct"]["id"]
    await ok("mutation($p: ID!) { updateProduct(id: $p, input: {name: \"Q\"}) { id } }", {"p": product})
    line = (await ok("mutation($d: ID!, $p: ID!) { createDealLineItem(input: {dealId: $d, productId: $p, "
                     "quantity: 2}) { id } }", {"d": deal["id"], "p": product}))["createDealLineItem"]["id"]
    await ok("mutation($l: ID!) { updateDealLineItem(id: $l, input: {quantity: 3}) { id } }", {"l": line})
    await ok("mutation($l: ID!) { deleteDealLineItem(id: $l) { deletedId } }", {"l": line})  # to the trash
    await ok("mutation($l: ID!) { restoreDealLineItem(id: $l) { id } }", {"l": line})
    await ok("mutation($l: ID!) { deleteDealLineItem(id: $l) { deletedId } }", {"l": line})
    await ok("mutation($l: ID!) { purgeTrash(id: $l) { purged } }", {"l": line})  # the product is free to go
    await ok("mutation($p: ID!) { deleteProduct(id: $p) { deletedId } }", {"p": product})
    member = (await ok("mutation($e: String!) { addMember(input: {email: $e, name: \"New\", role: VIEWER}) { id } }",
                       {"e": f"new-{uuid.uuid4().hex[:8]}@example.test"}))["addMember"]["id"]
    await ok("mutation($u: ID!) { updateMemberRole(userId: $u, role: MEMBER) { id } }", {"u": member})
    team = (await ok("mutation($u: ID!) { createTeam(input: {name: \"Hooks\", managerId: $u, memberIds: [$u]}) "
                     "{ id } }", {"u": member}))["createTeam"]["id"]
    await ok("mutation($t: ID!) { updateTeam(id: $t, input: {name: \"Webhooks\"}) { id } }", {"t": team})
    # Leaving the workspace leaves its teams (team_member.deleted) and their management (team.updated).
    await ok("mutation($u: ID!) { removeMember(userId: $u) { deletedId } }", {"u": member})
    await ok("mutation($t: ID!) { deleteTeam(id: $t) { deletedId } }", {"t": team})
    await ok("mutation($d: ID!) { deleteDeal(id: $d) { deletedId } }", {"d": deal["id"]})  # its note goes too
    await ok("mutation($c: ID!) { deleteContact(id: $c) { deletedId } }", {"c": contact["id"]})
    await ok("mutation($c: ID!) { deleteCompany(id: $c) { deletedId } }", {"c": company["id"]})
    await ok("mutation($d: ID!) { purgeTrash(id: $d) { purged } }", {"d": deal["id"]})  # its stage is free then
    await ok("mutation($p: ID!) { deletePipeline(id: $p) { deletedId } }", {"p": pipeline["id"]})


async def test_the_event_types_are_those_the_api_can_produce(
    api: httpx.AsyncClient, world: TenantWorld, hook_admin: AsyncEngine, receiver: Receiver,
) -> None:
    """Derived from the declarations: every listed type happens through the API, and every change
    the API makes (its audit rows) is of a listed type."""
    listed = data_or_fail(await gql(api, "{ webhookEventTypes { name recordType } }",
                                    token=world.token(Role.ADMIN)))["webhookEventTypes"]
    assert [t["name"] for t in listed] == ALL_TYPES
    assert "deal.moved" in ALL_TYPES and not any(t.startswith("user.") for t in ALL_TYPES)
    hook = await register(api, world, receiver.url, [t for t in ALL_TYPES if t != ENDPOINT_DISABLED])
    await every_kind_of_change(api, world)

    produced = {row.event_type for row in await outbox(hook_admin, hook["endpoint"]["id"])}
    assert produced == set(ALL_TYPES) - {ENDPOINT_DISABLED}
    async with hook_admin.connect() as conn:
        audited = {(r.entity_type, r.action) for r in await conn.execute(
            select(AUDIT_EVENTS.c.entity_type, AUDIT_EVENTS.c.action).distinct()
            .where(AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.entity_type != "WebhookEndpoint"))}
    by_record = {(t.record.name, t.name.rsplit(".", 1)[1]) for t in event_types() if t.record is not None}
    # The trash's actions are the same messages: a record trashed or purged is deleted for its
    # receivers, a restored one created again.
    suffix = {"create": "created", "update": "updated", "delete": "deleted", "trash": "deleted",
              "restore": "created", "purge": "deleted"}
    assert {(entity, suffix[action]) for entity, action in audited} <= by_record


# ---- sending -----------------------------------------------------------------------------------

async def test_messages_are_signed_as_standard_webhooks_say(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, receiver: Receiver,
) -> None:
    hook = await register(api, world, receiver.url, ["company.created", "company.updated"])
    secret = hook["secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    async with dispatching(hook_settings):
        company = await create_company(api, world.token(Role.MEMBER), name="Signed Ltd")
        await receiver.until(lambda r: len(r.ids()) == 1)
    [request] = receiver.received
    payload = Webhook(secret).verify(request.body, request.headers)  # the reference algorithm
    assert request.id.startswith("msg_") and request.headers["content-type"] == "application/json"
    assert payload["type"] == "company.created"
    assert payload["data"]["record"]["id"] == company["id"] and payload["data"]["record"]["name"] == "Signed Ltd"
    assert payload["data"]["recordType"] == "Company" and payload["data"]["version"] == 1
    # The signature covers id, timestamp and body: change any and the reference verifier refuses it.
    for tampered in ({**request.headers, "webhook-id": "msg_other"},
                     {**request.headers, "webhook-timestamp": str(int(request.headers["webhook-timestamp"]) - 1)}):
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(request.body, tampered)
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(request.body.replace("Signed Ltd", "Signed Inc"), request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(base64.b64encode(b"x" * 32).decode()).verify(request.body, request.headers)

    [delivery] = await deliveries(api, world, hook["endpoint"]["id"])
    assert delivery["status"] == "DELIVERED" and delivery["attempts"] == 1 and delivery["responseCode"] == 200
    assert delivery["latencyMs"] is not None and delivery["messageId"] == request.id


async def test_a_rolled_back_change_sends_nothing(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, hook_admin: AsyncEngine,
    receiver: Receiver,
) -> None:
    """A change whose COMMIT fails, after its deliveries were written to the outbox (a deferred
    constraint refuses it at commit), leaves no delivery and sends nothing; the next one is sent."""
    async with hook_admin.begin() as conn:
        await conn.execute(text("""
            CREATE OR REPLACE FUNCTION webhooks_test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'refused at commit'; END $$"""))
        await conn.execute(text("DROP TRIGGER IF EXISTS webhooks_test_refuse ON companies"))
        await conn.execute(text("""
            CREATE CONSTRAINT TRIGGER webhooks_test_refuse AFTER INSERT ON companies DEFERRABLE INITIALLY DEFERRED
            FOR EACH ROW WHEN (NEW.name = 'refused-at-commit') EXECUTE FUNCTION webhooks_test_refuse()"""))
    hook = await register(api, world, receiver.url, ["company.created"])
    async with dispatching(hook_settings):
        refused = await gql(api, 'mutation { createCompany(input: {name: "refused-at-commit"}) { id } }',
                            token=world.token(Role.MEMBER))
        assert codes(refused) == ["INTERNAL"]
        kept = await create_company(api, world.token(Role.MEMBER), name="kept")
        await receiver.until(lambda r: len(r.ids()) == 1)
    assert [r.payload["data"]["record"]["id"] for r in receiver.received] == [kept["id"]]
    assert [row.event_type for row in await outbox(hook_admin, hook["endpoint"]["id"])] == ["company.created"]


async def test_a_receiver_down_for_a_while_gets_everything_once_it_is_back(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings,
) -> None:
    down = Receiver()
    down.reserve()
    hook = await register(api, world, down.url, ["company.created", "company.updated"])
    token = world.token(Role.MEMBER)
    async with dispatching(hook_settings) as dispatcher:
        companies = [await create_company(api, token, name=f"Down {i}") for i in range(6)]
        for company in companies[:3]:
            await gql(api, "mutation($c: ID!) { updateCompany(id: $c, input: {domain: \"x.example\"}) { id } }",
                      {"c": company["id"]}, token=token)
        async with asyncio.timeout(WAIT):
            await dispatcher.wait_for(lambda: dispatcher.failures >= 12)  # two rounds of refused connections
        pending = await deliveries(api, world, hook["endpoint"]["id"], ["PENDING"])
        tried = [d for d in pending if d["attempts"]]
        assert len(pending) == 9 and len(tried) == 6 and all(d["lastError"] for d in tried)
        assert {d["eventType"] for d in tried} == {"company.created"}  # the updates wait for their record's create
        await down.start()
        try:
            await down.until(lambda r: len(set(r.ids())) == 9)
        finally:
            await down.stop()
    assert len(down.ids()) == 9 == len(set(down.ids()))  # each once
    states = await deliveries(api, world, hook["endpoint"]["id"])
    assert {d["status"] for d in states} == {"DELIVERED"}
    assert all(d["attempts"] > 1 for d in states if d["eventType"] == "company.created")
    per_record = collections.defaultdict(list)
    for request in down.received:
        per_record[request.payload["data"]["record"]["id"]].append(request.payload["type"])
    for company in companies[:3]:
        assert per_record[company["id"]] == ["company.created", "company.updated"]


async def test_each_records_events_arrive_in_order_while_its_first_is_retried(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, receiver: Receiver,
) -> None:
    """A record's later events wait for its earlier one's retries; other records are not held up."""
    token = world.token(Role.MEMBER)
    slow, quick = await create_company(api, token, name="Slow"), await create_company(api, token, name="Quick")
    failed_once: set[str] = set()

    def answer(request: Any) -> int:
        data = request.payload["data"]
        if data["record"]["id"] == slow["id"] and data["version"] == 2 and request.id not in failed_once:
            failed_once.add(request.id)
            return 503
        return 200

    receiver.answer = answer
    await register(api, world, receiver.url, ["company.updated"])
    async with dispatching(hook_settings):
        for version in range(2, 6):
            for company in (slow, quick):
                await gql(api, "mutation($c: ID!, $n: String!) { updateCompany(id: $c, input: {name: $n}) { id } }",
                          {"c": company["id"], "n": f"{company['name']} v{version}"}, token=token)
        await receiver.until(lambda r: len(r.ids()) == 8)

    def versions(company: dict[str, Any], status: int | None = None) -> list[int]:
        return [r.payload["data"]["version"] for r in receiver.received
                if r.payload["data"]["record"]["id"] == company["id"] and (status is None or r.status == status)]

    assert versions(slow) == [2, 2, 3, 4, 5] and versions(slow, 503) == [2]
    assert versions(quick) == [2, 3, 4, 5]


async def test_two_dispatchers_never_send_one_delivery_twice(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, receiver: Receiver,
) -> None:
    hook = await register(api, world, receiver.url, ["pipeline.created", "stage.created"])
    token = world.token(Role.MEMBER)
    stages = tuple(f"S{i}" for i in range(50))
    async with dispatching(hook_settings) as one, dispatching(hook_settings) as two:
        for _ in range(4):
            await create_pipeline(api, token, stages=stages)  # 51 events each
        await receiver.until(lambda r: len(r.ids()) >= 204)
    # Closed: their last batches have committed.
    assert len(receiver.ids()) == 204 == len(set(receiver.ids()))
    assert one.delivered + two.delivered == 204
    states = await deliveries(api, world, hook["endpoint"]["id"])
    assert len(states) == 100  # a page; the connection has them all
    body = await gql(api, DELIVERIES, {"e": hook["endpoint"]["id"], "s": ["DELIVERED"]}, token=world.token(Role.ADMIN))
    assert data_or_fail(body)["webhookDeliveries"]["totalCount"] == 204


async def start_worker(hook_settings: Settings, log: Any) -> asyncio.subprocess.Process:
    env = environment(DATABASE_URL=str(hook_settings.database_url), ATRIUM_ENV="test",
                      ATRIUM_WEBHOOK_KEY=TEST_WEBHOOK_KEY, ATRIUM_WEBHOOK_ALLOWED_NETWORKS="127.0.0.1/32",
                      ATRIUM_WEBHOOK_BACKOFF_BASE="0.05", ATRIUM_WEBHOOK_BACKOFF_MAX="0.2",
                      ATRIUM_WEBHOOK_CONCURRENCY="8")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "atrium", "worker", cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=log)
    assert process.stdout is not None
    async with asyncio.timeout(60):
        line = await process.stdout.readline()
    assert line.startswith(b"atrium worker: sending"), line
    return process


async def test_killing_a_worker_loses_nothing_and_repeats_only_what_was_in_flight(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, hook_admin: AsyncEngine,
    receiver: Receiver, tmp_path: Any,
) -> None:
    """``atrium worker`` killed with SIGKILL while requests are in flight: a second worker sends
    every delivery; only those the first had sent but not seen answered arrive twice."""
    hook = await register(api, world, receiver.url, ["pipeline.created", "stage.created"])
    token = world.token(Role.MEMBER)
    for _ in range(2):
        await create_pipeline(api, token, stages=tuple(f"S{i}" for i in range(30)))  # 62 deliveries
    answered = 0

    def answer(request: Any) -> int:
        nonlocal answered
        answered += 1
        if answered == 20:
            receiver.hold = True  # from now on requests wait, unanswered
        return 200

    receiver.answer = answer
    endpoint = hook["endpoint"]["id"]
    with (tmp_path / "worker.log").open("wb") as log:
        first = await start_worker(hook_settings, log)
        try:
            await receiver.until(lambda r: len(r.received) >= 20 and len(r.held) >= 1)
            first.send_signal(signal.SIGKILL)
            assert await asyncio.wait_for(first.wait(), WAIT) == -signal.SIGKILL
        finally:
            if first.returncode is None:
                first.kill()
        seen = {request.id for request in [*receiver.received, *receiver.held]}
        committed = {f"msg_{row.message_id.hex}" for row in await outbox(hook_admin, endpoint)
                     if row.status == "delivered"}
        uncertain = seen - committed  # sent by the dead worker, its outcome never recorded
        assert uncertain and committed
        receiver.answer = lambda request: 200
        receiver.release()
        second = await start_worker(hook_settings, log)
        try:
            await receiver.until(lambda r: len(set(r.ids())) == 62 and all(
                collections.Counter(r.ids())[message] >= 2 for message in uncertain), timeout=60)
        finally:
            second.send_signal(signal.SIGTERM)  # lets its last batch commit
            assert await asyncio.wait_for(second.wait(), WAIT) == 0
    rows = await outbox(hook_admin, endpoint)
    assert len(rows) == 62 and {row.status for row in rows} == {"delivered"}
    counts = collections.Counter(r.id for r in receiver.received)
    assert set(counts) == {f"msg_{row.message_id.hex}" for row in rows}  # nothing lost
    assert {message for message, n in counts.items() if n > 1} == uncertain  # at least once, and no more
    assert all(n <= 2 for n in counts.values())


# ---- failing for good ---------------------------------------------------------------------------

async def test_a_day_of_failures_fails_the_delivery_and_disables_the_endpoint(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, hook_admin: AsyncEngine,
    receiver: Receiver,
) -> None:
    broken, watcher = Receiver(answer=lambda request: 500), receiver
    await broken.start()
    try:
        failing = await register(api, world, broken.url, ["company.created"])
        told = await register(api, world, watcher.url, [ENDPOINT_DISABLED])
        clock = ManualClock()
        settings = dataclasses.replace(hook_settings, webhook_backoff_base_seconds=5.0,
                                       webhook_backoff_max_seconds=3600.0, webhook_retry_window_seconds=86400.0)
        async with dispatching(settings, clock) as dispatcher:
            await create_company(api, world.token(Role.MEMBER))
            attempts = 0
            while True:
                async with asyncio.timeout(WAIT):
                    await dispatcher.wait_for(lambda: dispatcher.failures > attempts)  # noqa: B023
                attempts = dispatcher.failures
                [row] = await outbox(hook_admin, failing["endpoint"]["id"])
                if row.status == "failed":
                    break
                assert attempts < 60, "retries did not end"
                clock.advance(3601)  # past the next retry, whatever its jitter
            await watcher.until(lambda r: len(r.ids()) == 1)
        [delivery] = await deliveries(api, world, failing["endpoint"]["id"])
        assert delivery["status"] == "FAILED" and delivery["responseCode"] == 500 and delivery["attempts"] > 10
    finally:
        await broken.stop()
    endpoint = data_or_fail(await gql(api, "{ webhookEndpoints { id enabled disabledReason } }",
                                      token=world.token(Role.ADMIN)))["webhookEndpoints"]
    state = {e["id"]: e for e in endpoint}
    assert state[failing["endpoint"]["id"]]["enabled"] is False and state[failing["endpoint"]["id"]]["disabledReason"]
    assert state[told["endpoint"]["id"]]["enabled"] is True
    [message] = watcher.received
    assert message.payload["type"] == ENDPOINT_DISABLED
    assert message.payload["data"]["endpoint"]["id"] == failing["endpoint"]["id"]
    async with hook_admin.connect() as conn:
        audited = (await conn.execute(select(AUDIT_EVENTS.c.action).where(
            AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.entity_id == uuid_of(failing["endpoint"]["id"]))
            .order_by(AUDIT_EVENTS.c.occurred_at))).scalars().all()
    assert audited == ["create", "disable"]
    # Changes no longer reach it; enabling it again resumes deliveries.
    await create_company(api, world.token(Role.MEMBER))
    assert len(await outbox(hook_admin, failing["endpoint"]["id"])) == 1
    data_or_fail(await gql(api, UPDATE, {"id": failing["endpoint"]["id"], "i": {"enabled": True}},
                           token=world.token(Role.ADMIN)))
    await create_company(api, world.token(Role.MEMBER))
    assert len(await outbox(hook_admin, failing["endpoint"]["id"])) == 2


# ---- replay ------------------------------------------------------------------------------------

async def test_a_delivery_can_be_replayed(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, receiver: Receiver,
) -> None:
    hook = await register(api, world, receiver.url, ["company.created"])
    async with dispatching(hook_settings):
        await create_company(api, world.token(Role.MEMBER))
        await receiver.until(lambda r: len(r.ids()) == 1)
        [original] = await deliveries(api, world, hook["endpoint"]["id"])
        replayed = data_or_fail(await gql(api, REPLAY, {"id": original["id"]},
                                          token=world.token(Role.ADMIN)))["replayWebhookDelivery"]
        assert replayed["replayOf"] == original["id"] and replayed["messageId"] == original["messageId"]
        await receiver.until(lambda r: len(r.ids()) == 2)
    first, again = receiver.received
    assert first.id == again.id == original["messageId"] and first.body == again.body
    Webhook(hook["secret"]).verify(again.body, again.headers)
    states = {d["id"]: d["status"] for d in await deliveries(api, world, hook["endpoint"]["id"])}
    assert states == {original["id"]: "DELIVERED", replayed["id"]: "DELIVERED"}
    member = await gql(api, REPLAY, {"id": original["id"]}, token=world.token(Role.MEMBER))
    assert codes(member) == ["FORBIDDEN"]


async def test_a_rotated_secret_signs_from_then_on(
    api: httpx.AsyncClient, world: TenantWorld, hook_settings: Settings, receiver: Receiver,
) -> None:
    hook = await register(api, world, receiver.url, ["company.created"])
    rotated = data_or_fail(await gql(api, "mutation($id: ID!) { rotateWebhookEndpointSecret(id: $id) "
                                          "{ secret endpoint { version } } }", {"id": hook["endpoint"]["id"]},
                                     token=world.token(Role.ADMIN)))["rotateWebhookEndpointSecret"]
    assert rotated["secret"] != hook["secret"] and rotated["endpoint"]["version"] == hook["endpoint"]["version"] + 1
    async with dispatching(hook_settings):
        await create_company(api, world.token(Role.MEMBER))
        await receiver.until(lambda r: len(r.ids()) == 1)
    [request] = receiver.received
    Webhook(rotated["secret"]).verify(request.body, request.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(hook["secret"]).verify(request.body, request.headers)


# ---- where endpoints may point ----------------------------------------------------------------

@pytest.mark.parametrize(("address", "allowed"), [
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("fe80::1", False), ("fc00::1", False),
    ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("::ffff:127.0.0.1", False),
    ("::ffff:10.0.0.1", False), ("93.184.215.14", True), ("2606:4700::1111", True),
])
def test_internal_addresses_are_refused(address: str, allowed: bool) -> None:
    assert (refusal(ipaddress.ip_address(address), ()) is None) is allowed
    assert refusal(ipaddress.ip_address("127.0.0.1"), networks(["127.0.0.1/32"])) is None


async def test_endpoints_may_not_point_at_internal_addresses(
    hook_settings: Settings, world: TenantWorld, api: httpx.AsyncClient, receiver: Receiver,
) -> None:
    strict = dataclasses.replace(hook_settings, webhook_allowed_networks=())
    app = create_app(strict)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        for url in ("http://127.0.0.1:8080/hook", "http://localhost/hook", "http://10.0.0.5/", "http://[::1]/",
                    "http://169.254.169.254/latest/meta-data", "http://[::ffff:127.0.0.1]/", "ftp://example.com/",
                    "http://user:pw@93.184.215.14/", "http:///nohost"):
            body = await gql(client, CREATE, {"i": {"url": url, "eventTypes": ["company.created"]}},
                             token=world.token(Role.ADMIN))
            assert codes(body) == ["BAD_USER_INPUT"], (url, body)
            assert body["errors"][0]["extensions"]["field"] == "input.url"
    # Registered where 127.0.0.1 is allowed, but sent by a dispatcher that does not allow it: every
    # attempt checks the address again, so nothing reaches the receiver.
    hook = await register(api, world, receiver.url, ["company.created"])
    async with dispatching(strict) as dispatcher:
        await create_company(api, world.token(Role.MEMBER))
        async with asyncio.timeout(WAIT):
            await dispatcher.wait_for(lambda: dispatcher.failures >= 2)
    assert receiver.received == []
    [delivery] = await deliveries(api, world, hook["endpoint"]["id"])
    assert delivery["status"] == "PENDING" and "loopback" in delivery["lastError"]
    data_or_fail(await gql(api, UPDATE, {"id": hook["endpoint"]["id"], "i": {"enabled": False}},
                           token=world.token(Role.ADMIN)))


async def test_a_delivery_continues_the_trace_of_its_change(
    api: httpx.AsyncClient, world: TenantWorld, hook_admin: AsyncEngine, hook_settings: Settings, receiver: Receiver,
) -> None:
    # The traceparent a traced change stored (tests/test_tracing.py) is sent on every attempt; an
    # untraced change's delivery sends none.
    hook = await register(api, world, receiver.url, ["company.created"])
    await create_company(api, world.token(Role.MEMBER), name="Untraced")
    await create_company(api, world.token(Role.MEMBER), name="Traced")
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with hook_admin.begin() as conn:
        await conn.execute(update(WEBHOOK_DELIVERIES).where(
            WEBHOOK_DELIVERIES.c.endpoint_id == uuid_of(hook["endpoint"]["id"]),
            WEBHOOK_DELIVERIES.c.body.contains('"Traced"')).values(traceparent=parent))
    async with dispatching(hook_settings):
        await receiver.until(lambda r: len(r.ids()) == 2)
    by_name = {json.loads(r.body)["data"]["record"]["name"]: r.headers for r in receiver.received}
    assert by_name["Traced"]["traceparent"] == parent and "traceparent" not in by_name["Untraced"]
    data_or_fail(await gql(api, UPDATE, {"id": hook["endpoint"]["id"], "i": {"enabled": False}},
                           token=world.token(Role.ADMIN)))


# ---- tenants ----------------------------------------------------------------------------------

async def test_endpoints_and_deliveries_stay_in_their_tenant(
    api: httpx.AsyncClient, world: TenantWorld, hook_admin: AsyncEngine, hook_settings: Settings,
    receiver: Receiver,
) -> None:
    other = await make_tenant_world(hook_admin, hook_settings, "hooks-other")
    mine = await register(api, world, receiver.url, ["company.created"])
    theirs = await register(api, other, receiver.url + "?other", ["company.created"])
    await create_company(api, world.token(Role.MEMBER))
    await create_company(api, other.token(Role.MEMBER))
    ours = await deliveries(api, world, mine["endpoint"]["id"])
    assert len(ours) == 1 and len(await deliveries(api, other, theirs["endpoint"]["id"])) == 1
    assert ours[0]["payload"]["data"]["actorId"] is not None
    admin = other.token(Role.ADMIN)
    listed = data_or_fail(await gql(api, "{ webhookEndpoints { id } }", token=admin))["webhookEndpoints"]
    assert [e["id"] for e in listed] == [theirs["endpoint"]["id"]]
    assert await deliveries(api, other, mine["endpoint"]["id"]) == []
    for query, variables in ((UPDATE, {"id": mine["endpoint"]["id"], "i": {"enabled": False}}),
                             (REPLAY, {"id": ours[0]["id"]}),
                             ("mutation($id: ID!) { deleteWebhookEndpoint(id: $id) { deletedId } }",
                              {"id": mine["endpoint"]["id"]})):
        assert codes(await gql(api, query, variables, token=admin)) == ["NOT_FOUND"]
    assert len(await outbox(hook_admin, mine["endpoint"]["id"])) == 1  # untouched


async def test_who_may_manage_webhooks(
    api: httpx.AsyncClient, world: TenantWorld, hook_admin: AsyncEngine, receiver: Receiver,
) -> None:
    """Admins and owners, signed in; every webhook field refuses viewers and members and leaves
    nothing written; input errors name their field."""
    variables = {"i": {"url": receiver.url, "eventTypes": ["deal.moved"]}}
    hook = await register(api, world, receiver.url, ["company.created"])
    await create_company(api, world.token(Role.MEMBER))
    [delivery] = await outbox(hook_admin, hook["endpoint"]["id"])
    endpoint, delivery_id = hook["endpoint"]["id"], gid("WebhookDelivery", delivery.id)
    fields = [
        (CREATE, variables), (UPDATE, {"id": endpoint, "i": {"enabled": False}}), (REPLAY, {"id": delivery_id}),
        ("mutation($id: ID!) { rotateWebhookEndpointSecret(id: $id) { secret } }", {"id": endpoint}),
        ("mutation($id: ID!) { deleteWebhookEndpoint(id: $id) { deletedId } }", {"id": endpoint}),
        ("{ webhookEndpoints { id } }", None), ("{ webhookEventTypes { name } }", None),
        (DELIVERIES, {"e": endpoint, "s": None}),
    ]
    for role in (Role.VIEWER, Role.MEMBER):
        for query, given in fields:
            assert codes(await gql(api, query, given, token=world.token(role))) == ["FORBIDDEN"], (role, query)
    assert len(await outbox(hook_admin, endpoint)) == 1
    assert [e["id"] for e in data_or_fail(await gql(api, "{ webhookEndpoints { id enabled } }",
                                                    token=world.token(Role.OWNER)))["webhookEndpoints"]] == [endpoint]
    for role in (Role.ADMIN, Role.OWNER):
        assert not (await gql(api, CREATE, variables, token=world.token(role))).get("errors")
    # Not with an API key, whatever its role: a leaked key must not send the workspace's data away.
    key = data_or_fail(await gql(api, 'mutation { createApiKey(input: {name: "ci", role: ADMIN}) { secret } }',
                                 token=world.token(Role.ADMIN)))["createApiKey"]["secret"]
    assert codes(await gql(api, CREATE, variables, token=key)) == ["FORBIDDEN"]
    for bad, field in (({"eventTypes": ["deal.exploded"]}, "input.eventTypes.0"),
                       ({"eventTypes": []}, "input.eventTypes"),
                       ({"filter": {"nope": 1}}, "input.filter.nope"), ({"filter": [1]}, "input.filter"),
                       ({"description": "x" * 201}, "input.description")):
        body = await gql(api, CREATE, {"i": {**variables["i"], **bad}}, token=world.token(Role.ADMIN))
        assert codes(body) == ["BAD_USER_INPUT"] and body["errors"][0]["extensions"]["field"] == field


async def test_a_filter_picks_the_records_sent(
    api: httpx.AsyncClient, world: TenantWorld, hook_admin: AsyncEngine, receiver: Receiver,
) -> None:
    token = world.token(Role.MEMBER)
    one, two = await create_pipeline(api, token), await create_pipeline(api, token)
    hook = await register(api, world, receiver.url, ["deal.created", "deal.moved"], {"pipelineId": one["id"]})
    deal = await create_deal(api, token, one["stages"][0]["id"])
    await create_deal(api, token, two["stages"][0]["id"])
    await gql(api, "mutation($d: ID!, $s: ID!) { moveDeal(id: $d, stageId: $s) { id } }",
              {"d": deal["id"], "s": one["stages"][1]["id"]}, token=token)
    rows = await outbox(hook_admin, hook["endpoint"]["id"])
    assert [row.event_type for row in rows] == ["deal.created", "deal.moved"]
    assert {row.ordering_key for row in rows} == {uuid_of(deal["id"])}


async def test_a_retried_mutation_is_sent_once(
    api: httpx.AsyncClient, world: TenantWorld, hook_admin: AsyncEngine, receiver: Receiver,
) -> None:
    """With an Idempotency-Key the request is one transaction (its answer stored with the change):
    the deliveries join it, and a retry that replays the answer writes none."""
    hook = await register(api, world, receiver.url, ["company.created"])
    request = {"query": 'mutation { createCompany(input: {name: "Once"}) { id } }'}
    headers = {"authorization": f"Bearer {world.token(Role.MEMBER)}", "idempotency-key": uuid.uuid4().hex}
    first = await api.post("/graphql", json=request, headers=headers)
    again = await api.post("/graphql", json=request, headers=headers)
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == first.json()
    [row] = await outbox(hook_admin, hook["endpoint"]["id"])
    assert row.ordering_key == uuid_of(first.json()["data"]["createCompany"]["id"])


# ---- the command line ----------------------------------------------------------------------------

async def cli(monkeypatch: pytest.MonkeyPatch, settings: Settings, *argv: str) -> int:
    monkeypatch.setenv("DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("ATRIUM_WEBHOOK_KEY", TEST_WEBHOOK_KEY)
    monkeypatch.setenv("ATRIUM_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.1/32")
    return await webhook_cli.run(parser().parse_args(list(argv)))


async def test_the_cli_registers_lists_and_replays(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hook_settings: Settings,
    world: TenantWorld, api: httpx.AsyncClient, receiver: Receiver, hook_admin: AsyncEngine,
) -> None:
    assert await cli(monkeypatch, hook_settings, "webhooks", "create", "--tenant", world.slug, "--url", receiver.url,
                     "--events", "company.created,deal.moved") == 0
    shown = capsys.readouterr().out
    endpoint, secret = shown.split()[0], shown.split("shown once): ")[1].strip()
    assert secret.startswith("whsec_")
    assert await cli(monkeypatch, hook_settings, "webhooks", "list", "--tenant", world.slug) == 0
    listed = capsys.readouterr().out
    assert endpoint in listed and secret not in listed
    async with dispatching(hook_settings):
        await create_company(api, world.token(Role.MEMBER))
        await receiver.until(lambda r: len(r.ids()) == 1)
        assert await cli(monkeypatch, hook_settings, "webhooks", "deliveries", endpoint, "--tenant", world.slug) == 0
        delivery = capsys.readouterr().out.split()[0]
        assert await cli(monkeypatch, hook_settings, "webhooks", "replay", delivery, "--tenant", world.slug) == 0
        await receiver.until(lambda r: len(r.ids()) == 2)
    Webhook(secret).verify(receiver.received[1].body, receiver.received[1].headers)
    assert await cli(monkeypatch, hook_settings, "webhooks", "create", "--tenant", world.slug,
                     "--url", "http://10.0.0.1/", "--events", "company.created") == 2
    assert "url" in capsys.readouterr().err
    assert await cli(monkeypatch, hook_settings, "webhooks", "delete", endpoint, "--tenant", world.slug) == 0
    async with hook_admin.connect() as conn:
        assert (await conn.execute(select(WEBHOOK_ENDPOINTS.c.id).where(
            WEBHOOK_ENDPOINTS.c.tenant_id == world.id))).first() is None
        actions = (await conn.execute(select(AUDIT_EVENTS.c.action).where(
            AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.entity_type == "WebhookEndpoint")
            .order_by(AUDIT_EVENTS.c.occurred_at))).scalars().all()
    assert actions == ["create", "replay", "delete"]


# ---- metrics ------------------------------------------------------------------------------------

async def test_deliveries_are_measured_without_naming_a_tenant(
    world: TenantWorld, hook_settings: Settings, receiver: Receiver,
) -> None:
    """/metrics of a process whose dispatcher sends: attempts by outcome, failures by kind, the
    latency histogram, the outbox backlog (measured at the scrape), endpoints disabled; no label
    names a tenant, endpoint or URL."""
    broken = Receiver(answer=lambda request: 503)
    await broken.start()
    clock = ManualClock(time.time() + AHEAD)
    settings = dataclasses.replace(hook_settings, webhook_dispatcher=True, webhook_backoff_base_seconds=5.0,
                                   webhook_backoff_max_seconds=10.0, webhook_retry_window_seconds=60.0)
    app = create_app(settings, clock=clock)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
            dispatcher: Dispatcher = app.state.runtime.dispatcher
            async with asyncio.timeout(WAIT):
                await dispatcher.listening.wait()
            before = await scrape(client)
            assert {labels for name, labels in before if name == "atrium_webhook_attempts_total"} == {
                frozenset({("outcome", o)}) for o in OUTCOMES}
            assert {labels for name, labels in before if name == "atrium_webhook_attempt_errors_total"} == {
                frozenset({("kind", k)}) for k in ERROR_KINDS}
            assert before[("atrium_webhook_outbox_pending", frozenset())] == 0
            await register(client, world, receiver.url, ["company.created"])
            await register(client, world, broken.url, ["company.created"])
            for _ in range(2):
                await create_company(client, world.token(Role.MEMBER))
            async with asyncio.timeout(WAIT):
                await dispatcher.wait_for(lambda: dispatcher.delivered >= 2 and dispatcher.failures >= 2)
            sent = await scrape(client)  # (no retry is due before 2.5 s: half the first backoff)
            assert sent[("atrium_webhook_attempts_total", frozenset({("outcome", "delivered")}))] == 2
            assert sent[("atrium_webhook_attempts_total", frozenset({("outcome", "retry")}))] == 2
            assert sent[("atrium_webhook_attempts_total", frozenset({("outcome", "failed")}))] == 0
            assert sent[("atrium_webhook_attempt_errors_total", frozenset({("kind", "http_5xx")}))] == 2
            assert sent[("atrium_webhook_attempt_duration_seconds_count", frozenset({("outcome", "delivered")}))] == 2
            assert sent[("atrium_webhook_attempt_duration_seconds_count", frozenset({("outcome", "retry")}))] == 2
            took = sent[("atrium_webhook_attempt_duration_seconds_sum", frozenset({("outcome", "delivered")}))]
            assert 0 < took < WAIT
            assert sent[("atrium_webhook_outbox_pending", frozenset())] == 2  # the broken endpoint's, owed
            # Written at the database's time (real, since the clock was made AHEAD of it), read by the clock.
            assert AHEAD - WAIT < sent[("atrium_webhook_outbox_oldest_seconds", frozenset())] <= AHEAD
            assert sent[("atrium_webhook_endpoints_disabled_total", frozenset())] == 0

            clock.advance(61)  # past the retry window: the next attempts fail for good, the endpoint goes
            async with asyncio.timeout(WAIT):
                await dispatcher.wait_for(lambda: dispatcher.failures >= 4)
            ended = await scrape(client)
            assert ended[("atrium_webhook_attempts_total", frozenset({("outcome", "failed")}))] == 2
            assert ended[("atrium_webhook_attempt_errors_total", frozenset({("kind", "http_5xx")}))] == 4
            assert ended[("atrium_webhook_endpoints_disabled_total", frozenset())] == 1
            assert ended[("atrium_webhook_outbox_pending", frozenset())] == 0
            assert ended[("atrium_webhook_outbox_oldest_seconds", frozenset())] == 0
            # Nothing of the tenant, its endpoints or its URLs is a label.
            labels = {value for name, found in ended if name.startswith("atrium_webhook") for _, value in found}
            assert not labels & {str(world.id), world.slug, receiver.url, broken.url}
    finally:
        await broken.stop()


Scraped = dict[tuple[str, frozenset[tuple[str, str]]], float]
AHEAD = 30.0


async def scrape(client: httpx.AsyncClient) -> Scraped:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}
