"""The fault suite (issue 10, point 6): real load through two Atrium processes while faults are injected.

Everything runs on servers of the suite's own: a PostgreSQL cluster (``tests.cluster``) and a
``redis-server`` on free ports, and two uvicorn processes (``atrium.asgi:create_from_env``,
production settings, one with plans off) sharing them. Clients write (``createCompany``, each name
once) and read through both processes while the suite restarts PostgreSQL (fast and immediate),
restarts Redis, kills one process with SIGKILL, and cuts a client off in the middle of a keyed
mutation. It asserts:

- every answer is a success or an outage answer (``tests.outages.assert_unavailable``: 503 JSON,
  SERVICE_UNAVAILABLE, ``Retry-After``, the request's id); only the killed process may leave a
  request unanswered;
- no acknowledged write is missing, no record is half-written (each company has its audit row and
  each creation audit its company);
- each process serves again within 1 s of PostgreSQL accepting connections (logged: ``-o log_cli=true
  --log-cli-level=INFO`` shows the times);
- a keyed retry never duplicates: each keyed write exists exactly once;
- the processes logged no traceback.

Waits are on conditions with deadlines (answers counted, servers accepting), never fixed sleeps;
clients honour ``Retry-After`` as real ones do. Run alone with ``pytest -m faults``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

from tests.cluster import PostgresCluster, running_cluster
from tests.live import AtriumProcess, RedisServer, live, redis_answers, start_atrium
from tests.outages import World, assert_unavailable, outage_world

pytestmark = pytest.mark.faults
log = logging.getLogger("tests.faults")

WAIT = 30.0
RECOVERY = 1.0
"""Seconds within which each process must serve again once PostgreSQL accepts connections."""

CREATE = "mutation($name: String!) { createCompany(input: {name: $name}) { id name } }"
READ = "{ companies(first: 5) { totalCount edges { node { id name } } } me { name } }"
PRESENCE = "mutation($id: ID!) { setPresence(recordId: $id, state: VIEWING) { recordId } }"
RECORD = "subscription($id: ID!) { recordChanged(id: $id) { __typename ... on Resync { reason } } }"


@dataclass
class Fleet:
    world: World
    redis: RedisServer
    processes: list[AtriumProcess]

    @property
    def cluster(self) -> PostgresCluster:
        return self.world.cluster


@pytest.fixture(scope="module")
def fault_cluster() -> Iterator[PostgresCluster]:
    with running_cluster("atrium-faults-") as server:
        yield server


ENVIRONMENTS = [{"ATRIUM_ENV": "production", "ATRIUM_DB_POOL_SIZE": "4"},
                {"ATRIUM_ENV": "production", "ATRIUM_DB_POOL_SIZE": "4", "ATRIUM_PLANS": "off"}]


@pytest.fixture(scope="module")
async def fleet(fault_cluster: PostgresCluster) -> AsyncIterator[Fleet]:
    world = await outage_world(fault_cluster)
    redis = RedisServer()
    await redis.start()
    processes: list[AtriumProcess] = []
    try:
        processes.extend(await asyncio.gather(*(start_atrium(world.admin_url, redis.url, env)
                                                for env in ENVIRONMENTS)))
        yield Fleet(world, redis, processes)
    finally:
        for process in processes:
            process.stop()
        redis.stop()


@pytest.fixture
async def running(fleet: Fleet) -> AsyncIterator[Fleet]:
    """The fleet with PostgreSQL, Redis and both processes up when the test starts and ends."""
    await ensure_up(fleet)
    marks = [p.log.stat().st_size for p in fleet.processes]
    try:
        yield fleet
    finally:
        await ensure_up(fleet)
    for process, mark in zip(fleet.processes, marks, strict=True):
        logged = process.log.read_bytes()[mark:].decode(errors="replace") if process.log.exists() else ""
        faults = [line for line in logged.splitlines() if "Traceback" in line or '"level": "error"' in line]
        assert not faults, faults[:5]


async def ensure_up(fleet: Fleet) -> None:
    if not (fleet.cluster.data / "postmaster.pid").exists():
        await fleet.cluster.start()
    await fleet.cluster.accepting()
    if not await redis_answers(fleet.redis.url):
        await fleet.redis.start()
    for index, process in enumerate(fleet.processes):
        if process.process.poll() is not None:
            fleet.processes[index] = await start_atrium(fleet.world.admin_url, fleet.redis.url, ENVIRONMENTS[index],
                                                        port=process.port)


# ---- load ---------------------------------------------------------------------------------------

@dataclass
class Ledger:
    """What the clients saw."""

    acknowledged: dict[str, str] = field(default_factory=dict)
    """Company name -> id, for every createCompany answered with its data."""
    served: int = 0
    unavailable: int = 0
    unanswered: dict[int, int] = field(default_factory=dict)
    """Requests with no HTTP answer, by process index."""
    wrong: list[str] = field(default_factory=list)
    """Answers that were neither a success nor a proper outage answer."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def seen(self) -> None:
        self.changed.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            assert not self.wrong, self.wrong[:3]
            self.changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out waiting for {what}: {self}"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


async def ask(client: httpx.AsyncClient, token: str, query: str, variables: dict[str, Any] | None = None,
              **headers: str) -> tuple[httpx.Response, str]:
    request_id = uuid.uuid4().hex
    response = await client.post("/graphql", json={"query": query, "variables": variables or {}},
                                 headers={"authorization": f"Bearer {token}", "x-request-id": request_id,
                                          **{k.replace("_", "-"): v for k, v in headers.items()}})
    return response, request_id


def judge(ledger: Ledger, response: httpx.Response, request_id: str) -> dict[str, Any] | None:
    """The data of a successful answer; None for an outage answer; anything else is recorded as wrong."""
    try:
        if response.status_code == 200 and "errors" not in response.json():
            ledger.served += 1
            data: dict[str, Any] = response.json()["data"]
            return data
        assert_unavailable(response, request_id)
    except (AssertionError, ValueError) as failed:
        ledger.wrong.append(f"{response.status_code} {response.text[:300]} ({failed})")
        return None
    ledger.unavailable += 1
    return None


class Load:
    """Writers and readers through both processes until ``stop()``; answers judged as they come."""

    def __init__(self, fleet: Fleet, *, writers: int = 4, readers: int = 2) -> None:
        self.fleet = fleet
        self.ledger = Ledger()
        self.stopping = asyncio.Event()
        self.tag = uuid.uuid4().hex[:6]
        self.tasks = [asyncio.create_task(self._client(i, write=i < writers)) for i in range(writers + readers)]

    async def _client(self, index: int, *, write: bool) -> None:
        token, ledger = self.fleet.world.token, self.ledger
        clients = [httpx.AsyncClient(base_url=p.url, timeout=WAIT) for p in self.fleet.processes]
        try:
            n = 0
            while not self.stopping.is_set():
                n += 1
                target = (index + n) % len(clients)
                name = f"load-{self.tag}-{index}-{n}"
                try:
                    response, request_id = await (ask(clients[target], token, CREATE, {"name": name}) if write
                                                  else ask(clients[target], token, READ))
                except httpx.TransportError:
                    ledger.unanswered[target] = ledger.unanswered.get(target, 0) + 1
                    ledger.seen()
                    with contextlib.suppress(TimeoutError):  # pace: the process is gone
                        await asyncio.wait_for(self.stopping.wait(), 0.05)
                    continue
                data = judge(ledger, response, request_id)
                if data is not None and write:
                    ledger.acknowledged[name] = data["createCompany"]["id"]
                ledger.seen()
                if data is None:
                    await self._pause(response)
        finally:
            for client in clients:
                await client.aclose()

    async def _pause(self, response: httpx.Response) -> None:
        """Honour ``Retry-After`` (or stop sooner), as a client would."""
        with contextlib.suppress(TimeoutError, ValueError):
            await asyncio.wait_for(self.stopping.wait(), float(response.headers.get("retry-after", "1")))

    async def stop(self) -> Ledger:
        self.stopping.set()
        await asyncio.gather(*self.tasks)
        return self.ledger


@contextlib.asynccontextmanager
async def load(fleet: Fleet, **kw: int) -> AsyncIterator[Load]:
    running = Load(fleet, **kw)
    try:
        yield running
    finally:
        await running.stop()


# ---- what must hold -----------------------------------------------------------------------------

async def check_records(fleet: Fleet, acknowledged: dict[str, str]) -> None:
    """Every acknowledged company exists as answered; no company without its audit row, no creation
    audit without its company."""
    conn = await asyncpg.connect(fleet.world.admin_url)
    try:
        tenant = fleet.world.tenant_id
        names = {r["name"]: r["id"] for r in await conn.fetch(
            "SELECT name, id FROM companies WHERE tenant_id = $1", tenant)}
        missing = [name for name in acknowledged if name not in names]
        assert not missing, f"acknowledged writes missing: {missing[:5]}"
        orphans = await conn.fetch(
            "SELECT c.name FROM companies c WHERE c.tenant_id = $1 AND NOT EXISTS (SELECT FROM audit_events a "
            "WHERE a.tenant_id = c.tenant_id AND a.entity_id = c.id)", tenant)
        assert not orphans, f"companies without their audit row: {orphans[:5]}"
        ghosts = await conn.fetch(
            "SELECT a.entity_id FROM audit_events a WHERE a.tenant_id = $1 AND a.entity_type = 'company' "
            "AND a.action = 'create' AND NOT EXISTS (SELECT FROM companies c WHERE c.tenant_id = a.tenant_id "
            "AND c.id = a.entity_id)", tenant)
        assert not ghosts, f"creation audits without their company: {ghosts[:5]}"
    finally:
        await conn.close()


def check(ledger: Ledger, *, unanswered_from: frozenset[int] = frozenset()) -> None:
    assert not ledger.wrong, ledger.wrong[:5]
    assert set(ledger.unanswered) <= unanswered_from, ledger.unanswered


async def served_again(process: AtriumProcess, token: str, ledger: Ledger) -> float:
    """Poll ``process`` until a read needing PostgreSQL succeeds; the ``time.monotonic()`` it did."""
    deadline = time.monotonic() + WAIT
    async with httpx.AsyncClient(base_url=process.url, timeout=WAIT) as client:
        while True:
            response, request_id = await ask(client, token, READ)
            if judge(ledger, response, request_id) is not None:
                return time.monotonic()
            assert not ledger.wrong, ledger.wrong[:3]
            assert time.monotonic() < deadline, f"{process.url} did not serve again"
            await asyncio.sleep(0.01)


async def unavailable_everywhere(fleet: Fleet, ledger: Ledger) -> None:
    """Each process answers a read with the outage answer, and /readyz with 503."""
    for process in fleet.processes:
        async with httpx.AsyncClient(base_url=process.url, timeout=WAIT) as client:
            response, request_id = await ask(client, fleet.world.token, READ)
            assert_unavailable(response, request_id)
            ready = await client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["database"] == "down", ready.text


# ---- the faults ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgres_restart(running: Fleet, mode: str) -> None:
    fleet = running
    async with load(fleet) as traffic:
        ledger = traffic.ledger
        await ledger.until(lambda: len(ledger.acknowledged) >= 10, "writes before the restart")
        await fleet.cluster.stop(mode)
        await unavailable_everywhere(fleet, ledger)
        before = len(ledger.acknowledged)
        await fleet.cluster.start()
        accepted, *served = await asyncio.gather(
            fleet.cluster.accepting(), *(served_again(p, fleet.world.token, ledger) for p in fleet.processes))
        recovery = [round(t - accepted, 3) for t in served]
        log.info("PostgreSQL %s restart: each process served again %s s after it accepted connections", mode, recovery)
        assert all(r < RECOVERY for r in recovery), recovery
        await ledger.until(lambda: len(ledger.acknowledged) >= before + 10, "writes after the restart")
    check(ledger)
    assert ledger.unavailable > 0
    await check_records(fleet, ledger.acknowledged)


async def test_redis_restart(running: Fleet) -> None:
    """Reads and writes never need Redis; what does (presence) is an outage answer until Redis is back,
    and a subscriber hears of the gap, then of changes again."""
    fleet = running
    world, a, b = fleet.world, *fleet.processes
    async with httpx.AsyncClient(base_url=b.url, timeout=WAIT) as client:
        company = judge(Ledger(), *await ask(client, world.token, CREATE, {"name": f"redis-{uuid.uuid4().hex[:6]}"}))
        assert company is not None
        record = company["createCompany"]["id"]
        async with live(a.ws_url, world.token) as subscriber, load(fleet) as traffic:
            op = await subscriber.live(RECORD, {"id": record})
            ledger = traffic.ledger
            await ledger.until(lambda: len(ledger.acknowledged) >= 5, "writes before the restart")
            fleet.redis.stop()
            during = ledger.served
            await ledger.until(lambda: ledger.served >= during + 20, "answers while Redis is down")
            assert ledger.unavailable == 0, "reads and writes need no Redis"
            for process in fleet.processes:
                async with httpx.AsyncClient(base_url=process.url, timeout=WAIT) as other:
                    assert_unavailable(*await ask(other, world.token, PRESENCE, {"id": record}))
            await fleet.redis.start()
            back = time.monotonic()
            for process in fleet.processes:
                async with httpx.AsyncClient(base_url=process.url, timeout=WAIT) as other:
                    while True:  # presence answers (BAD_USER_INPUT: not present) once Redis does
                        response, request_id = await ask(other, world.token, PRESENCE, {"id": record})
                        if response.status_code == 200:
                            break
                        assert_unavailable(response, request_id)
                        assert time.monotonic() - back < WAIT
            log.info("Redis restart: presence answered again %.3f s after Redis accepted", time.monotonic() - back)
            assert (await subscriber.data(op))["recordChanged"] == {"__typename": "Resync", "reason": "GAP"}
            judge(ledger, *await ask(client, world.token,
                                     'mutation($id: ID!) { updateCompany(id: $id, input: {name: "after"}) { id } }',
                                     {"id": record}))
            assert (await subscriber.data(op))["recordChanged"]["__typename"] == "RecordChange"
    check(ledger)
    await check_records(fleet, ledger.acknowledged)


async def keyed_writer(fleet: Fleet, names: list[str], results: dict[str, list[str]], ledger: Ledger) -> None:
    """Each name written once, with its own Idempotency-Key, retried (on the other process after a lost
    connection) until acknowledged; the ids of every acknowledgement are kept."""
    for n, name in enumerate(names):
        key, target = uuid.uuid4().hex, n % len(fleet.processes)
        deadline = time.monotonic() + WAIT
        while True:
            assert time.monotonic() < deadline, f"{name} never acknowledged"
            async with httpx.AsyncClient(base_url=fleet.processes[target].url, timeout=WAIT) as client:
                try:
                    response, request_id = await ask(client, fleet.world.token, CREATE, {"name": name},
                                                     idempotency_key=key)
                except httpx.TransportError:
                    ledger.unanswered[target] = ledger.unanswered.get(target, 0) + 1
                    target = (target + 1) % len(fleet.processes)
                    continue
            if response.status_code == 409:  # its first attempt still runs
                assert response.json()["errors"][0]["extensions"]["code"] == "IDEMPOTENCY_KEY_IN_USE"
                await asyncio.sleep(float(response.headers["retry-after"]))
                continue
            data = judge(ledger, response, request_id)
            if data is not None:
                results.setdefault(name, []).append(data["createCompany"]["id"])
                break
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))


async def test_kill_9_of_one_process(running: Fleet) -> None:
    """Process A dies mid-load: B serves throughout; A's clients retry on B with their keys; nothing
    acknowledged is lost, nothing keyed is written twice; A is started again and serves."""
    fleet = running
    a = fleet.processes[0]
    names = [f"keyed-{uuid.uuid4().hex[:6]}-{i}" for i in range(30)]
    results: dict[str, list[str]] = {}
    async with load(fleet) as traffic:
        ledger = traffic.ledger
        writers = [asyncio.create_task(keyed_writer(fleet, names[i::3], results, ledger)) for i in range(3)]
        await ledger.until(lambda: len(results) >= 5, "keyed writes before the kill")
        a.process.send_signal(signal.SIGKILL)
        a.process.wait()
        await asyncio.gather(*writers)
    check(ledger, unanswered_from=frozenset({0}))
    assert sorted(results) == sorted(names)
    conn = await asyncpg.connect(fleet.world.admin_url)
    try:
        rows = await conn.fetch("SELECT name, id::text FROM companies WHERE tenant_id = $1 AND name = ANY($2)",
                                fleet.world.tenant_id, names)
    finally:
        await conn.close()
    assert sorted(r["name"] for r in rows) == sorted(names), "a keyed write is missing or was written twice"
    ids = {r["name"]: r["id"] for r in rows}
    for name, acknowledged in results.items():
        assert {uuid.UUID(i) for i in map(decoded, acknowledged)} == {uuid.UUID(ids[name])}
    await check_records(fleet, ledger.acknowledged)
    await ensure_up(fleet)
    async with httpx.AsyncClient(base_url=fleet.processes[0].url, timeout=WAIT) as client:
        assert judge(Ledger(), *await ask(client, fleet.world.token, READ)) is not None


def decoded(global_id: str) -> str:
    """The uuid in a global id."""
    return base64.urlsafe_b64decode(global_id + "=" * (-len(global_id) % 4)).decode().partition(":")[2]


async def waiting_for_a_lock(watcher: asyncpg.Connection) -> None:
    """Until an application backend waits for a lock (a request is in the middle of its statement)."""
    deadline = time.monotonic() + WAIT
    while not await watcher.fetchval("SELECT count(*) FROM pg_stat_activity WHERE usename = 'atrium_app' "
                                     "AND wait_event_type = 'Lock'"):
        assert time.monotonic() < deadline, "no request waited for the lock"
        await asyncio.sleep(0.01)


async def test_a_client_cut_off_mid_mutation_retries_with_its_key(running: Fleet) -> None:
    """The client sends a keyed mutation and hangs up while it runs (held at its INSERT by a lock, so
    that the hang-up is mid-mutation): the mutation commits all the same; its retry, on the other
    process, gets the stored answer, and the record exists once."""
    fleet = running
    a, b = fleet.processes
    tenant = fleet.world.tenant_id
    admin, watcher = await asyncpg.connect(fleet.world.admin_url), await asyncpg.connect(fleet.world.admin_url)
    try:
        for _ in range(3):
            name, key = f"cut-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            body = json.dumps({"query": CREATE, "variables": {"name": name}}).encode()
            async with admin.transaction():
                await admin.execute("LOCK TABLE companies IN EXCLUSIVE MODE")
                _, writer = await asyncio.open_connection("127.0.0.1", a.port)
                writer.write(b"POST /graphql HTTP/1.1\r\nHost: atrium\r\nContent-Type: application/json\r\n"
                             + f"Authorization: Bearer {fleet.world.token}\r\nIdempotency-Key: {key}\r\n".encode()
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                await waiting_for_a_lock(watcher)
                writer.close()  # gone before any answer, while its mutation runs
                await writer.wait_closed()
            deadline = time.monotonic() + WAIT
            while not await watcher.fetchval("SELECT count(*) FROM companies WHERE tenant_id = $1 AND name = $2",
                                             tenant, name):
                assert time.monotonic() < deadline, "the cut-off mutation never committed"
                await asyncio.sleep(0.01)
            async with httpx.AsyncClient(base_url=b.url, timeout=WAIT) as client:
                response, _ = await ask(client, fleet.world.token, CREATE, {"name": name}, idempotency_key=key)
            assert response.status_code == 200 and response.headers.get("idempotent-replayed") == "true", \
                response.text
            assert await watcher.fetchval("SELECT count(*) FROM companies WHERE tenant_id = $1 AND name = $2",
                                          tenant, name) == 1
    finally:
        await admin.close()
        await watcher.close()
