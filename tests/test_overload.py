"""Overload: a bound on requests in flight, fair between tenants; slow and idle clients cut off.

- Admission (``atrium.http.admission``): the excess is answered at once with 503
  SERVICE_UNAVAILABLE, ``Retry-After`` and the request id; a tenant over its share waits or is refused
  while another tenant is served; free places go to the waiting tenants in turn; ``/readyz`` says
  not ready while the process is saturated. Every test holds places itself (the gate), or lets real
  requests wait, and waits on the admission's own state (``Admission.until``), never on time.
- Memory: the heap is trimmed (glibc's ``malloc_trim``) once after the load drops.
- Slow clients: headers dribbled past the read deadline close the connection
  (``atrium.http.deadline``, under both of uvicorn's HTTP implementations); a WebSocket that never
  sends ``connection_init`` is closed with 4408.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from atrium.app import create_app
from atrium.http.admission import (
    ACTIVE_FOR,
    MACHINE_BUSY,
    MACHINE_CALM,
    SATURATED_FOR,
    Admission,
    CpuProbe,
    Limits,
    LoopLag,
    machine_cpu,
)
from atrium.http.deadline import STATE_KEY, H11WithDeadline, HttpProtocol, with_deadline
from atrium.observability.memory import MemoryTrimmer, malloc_trim
from core.clock import ManualClock
from core.errors import Overloaded
from core.settings import SettingError, Settings
from core.version import VERSION
from models.tables import Role
from tests.conftest import TenantWorld, codes
from tests.live import WAIT, error_codes, live, serve_in_process

MakeTenant = Callable[..., Awaitable[TenantWorld]]

ME = "{ tenant { id } }"


def limits(max_in_flight: int = 1, tenant_in_flight: int = 1, queue: int = 0, tenant_queue: int = 0,
           wait_seconds: float = 1.0, busy_tenant_in_flight: int | None = None) -> Limits:
    return Limits(max_in_flight=max_in_flight, tenant_in_flight=tenant_in_flight,
                  busy_tenant_in_flight=tenant_in_flight if busy_tenant_in_flight is None else busy_tenant_in_flight,
                  queue=queue, tenant_queue=tenant_queue, wait_seconds=wait_seconds, retry_after=3)


def narrow(settings: Settings, **bounds: Any) -> Settings:
    defaults = {"max_in_flight": 2, "tenant_in_flight": 1, "admission_queue": 0, "tenant_queue": 0,
                "retry_after_seconds": 3}
    return dataclasses.replace(settings, **{**defaults, **bounds})


@dataclasses.dataclass
class Served:
    app: Starlette
    admission: Admission
    clock: ManualClock
    client: httpx.AsyncClient


@pytest.fixture
def serve(settings: Settings):  # type: ignore[no-untyped-def]
    """An app with narrow admission bounds on a ``ManualClock``, and an ASGI client for it."""

    @contextlib.asynccontextmanager
    async def make(**bounds: Any) -> AsyncIterator[Served]:
        clock = ManualClock()
        app = create_app(narrow(settings, **bounds), clock=clock)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://atrium.test") as client:
                yield Served(app, app.state.runtime.admission, clock, client)

    return make


async def ask(client: httpx.AsyncClient, world: TenantWorld, request_id: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {world.token(Role.VIEWER)}"}
    if request_id:
        headers["x-request-id"] = request_id
    return await client.post("/graphql", json={"query": ME}, headers=headers)


def assert_refused(response: httpx.Response, retry_after: int = 3) -> None:
    body = response.json()
    assert response.status_code == 503, response.text
    assert codes(body) == ["SERVICE_UNAVAILABLE"] and "data" not in body
    assert body["errors"][0]["extensions"]["retryAfter"] == retry_after
    assert response.headers["retry-after"] == str(retry_after)
    assert response.headers["content-type"].startswith("application/json")


def answered(response: httpx.Response, world: TenantWorld) -> bool:
    return response.status_code == 200 and response.json()["data"]["tenant"]["id"] is not None


# ---- the bound ----------------------------------------------------------------------------------


async def test_a_request_over_the_bound_is_answered_503_at_once(serve, make_tenant: MakeTenant) -> None:  # type: ignore[no-untyped-def]
    world, other = await make_tenant("busy"), await make_tenant("calm")
    async with serve(max_in_flight=1) as served:
        async with served.admission.place(other.id):  # the one place is taken
            refused = await ask(served.client, world, "overload-1")
            assert_refused(refused)
            assert refused.headers["x-request-id"] == "overload-1"
            graphql_json = await served.client.post(
                "/graphql", json={"query": ME}, headers={"authorization": f"Bearer {world.token()}",
                                                       "accept": "application/graphql-response+json"})
            assert graphql_json.status_code == 503
            assert graphql_json.headers["content-type"].startswith("application/graphql-response+json")
            assert served.admission.in_flight == 1 and served.admission.waiting == 0
        response = await ask(served.client, world)
        assert answered(response, world)
        assert served.admission.in_flight == 0


async def test_a_mutation_refused_by_admission_did_not_run(serve, make_tenant: MakeTenant) -> None:  # type: ignore[no-untyped-def]
    world = await make_tenant("norun")
    create = "mutation { createCompany(input: {name: \"Never\"}) { id } }"
    count = "query { companies(first: 10) { totalCount } }"
    auth = {"authorization": f"Bearer {world.token()}"}
    async with serve(max_in_flight=1) as served:
        async with served.admission.place(world.id):
            refused = await served.client.post("/graphql", json={"query": create}, headers=auth)
            assert_refused(refused)
        after = await served.client.post("/graphql", json={"query": count}, headers=auth)
        assert after.json()["data"]["companies"]["totalCount"] == 0


async def test_a_request_waits_in_the_queue_then_runs_or_times_out(serve, make_tenant: MakeTenant) -> None:  # type: ignore[no-untyped-def]
    world = await make_tenant("queue")
    async with serve(max_in_flight=1, tenant_in_flight=1, admission_queue=1, tenant_queue=1,
                     admission_wait_seconds=2.0) as served:
        admission = served.admission
        async with admission.place(world.id):
            waiting = asyncio.create_task(ask(served.client, world))
            await admission.until(lambda a: a.waiting == 1)
            assert_refused(await ask(served.client, world))  # the queue is full: refused at once
        assert answered(await waiting, world)  # the freed place went to it

        async with admission.place(world.id):
            late = asyncio.create_task(ask(served.client, world))
            await admission.until(lambda a: a.waiting == 1)
            served.clock.advance(2.0)  # its wait is over
            assert_refused(await late)
            assert admission.waiting == 0


# ---- fairness -----------------------------------------------------------------------------------


async def test_one_tenants_flood_does_not_keep_another_tenant_out(serve, make_tenant: MakeTenant) -> None:  # type: ignore[no-untyped-def]
    flood, other = await make_tenant("flood"), await make_tenant("other")
    async with serve(max_in_flight=3, tenant_in_flight=2, admission_queue=8, tenant_queue=2) as served:
        admission = served.admission
        async with admission.place(flood.id), admission.place(flood.id):  # the flood holds its whole share
            queued = [asyncio.create_task(ask(served.client, flood)) for _ in range(2)]
            await admission.until(lambda a: a.waiting == 2)
            refused = await asyncio.gather(*(ask(served.client, flood) for _ in range(5)))
            for response in refused:
                assert_refused(response)  # over its share and its line: refused at once
            assert answered(await ask(served.client, other), other)  # the other tenant is served meanwhile
            assert admission.waiting == 2 and all(not task.done() for task in queued)
            assert not admission.saturated  # refusals of one tenant's excess are not the process's
        for task in queued:
            assert answered(await task, flood)


async def test_free_places_go_to_the_waiting_tenants_in_turn() -> None:
    admission = Admission(limits(max_in_flight=1, tenant_in_flight=1, queue=10, tenant_queue=10), ManualClock())
    order: list[str] = []
    release = asyncio.Event()

    async def request(tenant: str, name: str) -> None:
        async with admission.place(tenant):
            order.append(name)
            await release.wait()

    gate = asyncio.Event()

    async def hold() -> None:
        async with admission.place("gate"):
            await gate.wait()

    holder = asyncio.create_task(hold())
    await admission.until(lambda a: a.in_flight == 1)
    tasks = []
    for tenant, name in [("a", "a1"), ("a", "a2"), ("a", "a3"), ("b", "b1"), ("c", "c1"), ("b", "b2")]:
        tasks.append(asyncio.create_task(request(tenant, name)))
        queued = len(tasks)
        await admission.until(lambda a: a.waiting == queued)  # noqa: B023  (awaited before the next turn)
    release.set()  # each request, once it has its place, ends at once and hands the place on
    gate.set()
    await asyncio.gather(holder, *tasks)
    assert order == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert (admission.in_flight, admission.waiting) == (0, 0)


async def test_a_tenant_at_its_share_leaves_free_places_to_others() -> None:
    admission = Admission(limits(max_in_flight=3, tenant_in_flight=1, queue=4, tenant_queue=4), ManualClock())
    async with admission.place("a"):
        waiting = asyncio.create_task(admission.place("a").__aenter__())
        await admission.until(lambda a: a.waiting == 1)
        async with admission.place("b"), admission.place("c"):  # admitted beside a's waiting request
            assert (admission.in_flight, admission.waiting) == (3, 1)
        assert not waiting.done()
    await waiting
    assert admission.running("a") == 1


async def test_a_cancelled_waiter_gives_up_its_turn() -> None:
    admission = Admission(limits(max_in_flight=1, tenant_in_flight=1, queue=4, tenant_queue=4), ManualClock())
    async with admission.place("a"):
        gone = asyncio.create_task(admission.place("b").__aenter__())
        await admission.until(lambda a: a.waiting == 1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert admission.waiting == 0
    assert admission.in_flight == 0
    full = Admission(limits(queue=0), ManualClock())
    async with full.place("x"):
        with pytest.raises(Overloaded):  # no place and no queue: refused at once
            async with full.place("y"):
                pass


# ---- a busy process -----------------------------------------------------------------------------


class Switch:
    """A stand-in for the busy probe that says what the test sets."""

    def __init__(self) -> None:
        self.now = True

    def __call__(self) -> bool:
        return self.now


async def hold_places(admission: Admission, key: str, count: int) -> tuple[asyncio.Event, list[asyncio.Task[None]]]:
    """``count`` requests of ``key`` holding their places (or waiting for them) until the event is set."""
    release = asyncio.Event()

    async def request() -> None:
        async with admission.place(key):
            await release.wait()

    return release, [asyncio.create_task(request()) for _ in range(count)]


async def test_while_busy_and_shared_a_flooding_tenant_runs_only_its_busy_share() -> None:
    busy, clock = Switch(), ManualClock()
    admission = Admission(limits(max_in_flight=10, tenant_in_flight=3, busy_tenant_in_flight=1, queue=10,
                                 tenant_queue=1), clock, busy=busy)
    first_release, first = await hold_places(admission, "flood", 3)
    await admission.until(lambda a: a.running("flood") == 3)  # alone: its whole share
    next_release, following = await hold_places(admission, "flood", 1)
    await admission.until(lambda a: a.waiting == 1)  # over its share: it waits in its line ...
    assert admission.share("flood") == 3
    with pytest.raises(Overloaded):  # ... and its line is full: it floods
        await admission.place("flood").__aenter__()
    calm_release, calm = await hold_places(admission, "calm", 2)  # another tenant is served ...
    await admission.until(lambda a: a.running("calm") == 2)  # ... with its whole share: it does not flood
    assert admission.share("flood") == 1 and admission.share("calm") == 3
    first_release.set()  # the flood's places, given back, go to its line only down to its busy share
    await admission.until(lambda a: a.running("flood") == 1 and a.waiting == 0)
    more_release, more = await hold_places(admission, "flood", 1)
    await admission.until(lambda a: a.waiting == 1)  # places are free, but the flood is at its busy share
    assert admission.in_flight == 3
    busy.now = False  # the CPU idle again (the process waits on its database): whole shares
    calm_release.set()
    await admission.until(lambda a: a.running("flood") == 2 and a.waiting == 0)
    next_release.set()
    more_release.set()
    await asyncio.gather(*first, *following, *calm, *more)
    assert (admission.in_flight, admission.waiting) == (0, 0)


async def test_a_flooding_tenant_alone_keeps_its_whole_share_however_busy() -> None:
    busy, clock = Switch(), ManualClock()
    admission = Admission(limits(max_in_flight=10, tenant_in_flight=2, busy_tenant_in_flight=1, queue=10,
                                 tenant_queue=0), clock, busy=busy)
    async with admission.place("calm"):
        pass
    release, flood = await hold_places(admission, "flood", 2)
    await admission.until(lambda a: a.running("flood") == 2)
    assert admission.share("flood") == 2  # it does not flood yet
    with pytest.raises(Overloaded):
        await admission.place("flood").__aenter__()
    assert admission.share("flood") == 1  # it floods, and calm was served a moment ago
    clock.advance(ACTIVE_FOR)  # calm not since
    assert admission.share("flood") == 2
    release.set()
    await asyncio.gather(*flood)


async def test_the_busy_share_lets_the_quiet_tenant_in_first() -> None:
    """Under a flood, a free place goes to the quiet tenant's waiting request, not to the flood's line."""
    busy, clock = Switch(), ManualClock()
    admission = Admission(limits(max_in_flight=2, tenant_in_flight=2, busy_tenant_in_flight=1, queue=10,
                                 tenant_queue=3), clock, busy=busy)
    async with admission.place("calm"):
        release, flood = await hold_places(admission, "flood", 4)
        await admission.until(lambda a: a.running("flood") == 1 and a.waiting == 3)
        with pytest.raises(Overloaded):  # its line full: it floods
            await admission.place("flood").__aenter__()
        calm_release, calm = await hold_places(admission, "calm", 1)
        await admission.until(lambda a: a.waiting == 4)  # the process is full: calm waits too
    # calm's place, given back, went to calm's next request: the flood is at its busy share
    await admission.until(lambda a: a.running("calm") == 1)
    assert admission.running("flood") == 1 and admission.waiting == 3
    release.set()
    calm_release.set()
    await asyncio.gather(*flood, *calm)
    assert (admission.in_flight, admission.waiting) == (0, 0)


def test_the_cpu_probe_says_busy_when_the_process_used_most_of_a_core() -> None:
    wall, cpu = [100.0], [10.0]
    probe = CpuProbe(cpu=lambda: cpu[0], wall=lambda: wall[0])
    assert not probe()
    for _ in range(4):  # 90% of a core over the window
        wall[0] += CpuProbe.WINDOW / 4
        cpu[0] += 0.9 * CpuProbe.WINDOW / 4
    assert probe()
    for _ in range(8):  # then 10%: the old samples leave the window
        wall[0] += CpuProbe.WINDOW / 4
        cpu[0] += 0.1 * CpuProbe.WINDOW / 4
        probe()
    assert not probe()


def test_the_machine_probe_stays_busy_until_the_cores_calm_down() -> None:
    """The host's cores busy ``MACHINE_BUSY`` of the window make it busy; it stays so while a flood
    held to one place keeps them above ``MACHINE_CALM``, and ends once they fall below."""
    wall, cpu = [100.0], [10.0]
    probe = CpuProbe(cpu=lambda: cpu[0], wall=lambda: wall[0], threshold=MACHINE_BUSY, release=MACHINE_CALM)

    def run(share: float, steps: int = 8) -> bool:
        for _ in range(steps):
            wall[0] += CpuProbe.WINDOW / 4
            cpu[0] += share * CpuProbe.WINDOW / 4
            probe()
        return probe()

    assert not run((MACHINE_BUSY + MACHINE_CALM) / 2)  # between the two: not busy yet
    assert run(MACHINE_BUSY + 0.05)
    assert run((MACHINE_BUSY + MACHINE_CALM) / 2)  # between the two: still busy
    assert not run(MACHINE_CALM - 0.1)


def test_the_machine_cpu_is_read_from_the_kernel(tmp_path: Path) -> None:
    """``/proc/stat``'s first line: busy is every tick but idle and iowait, per core, in seconds."""
    stat = tmp_path / "stat"
    ticks = os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    stat.write_text(f"cpu  {3 * ticks} 0 {ticks} {50 * ticks} {7 * ticks} 0 0 0 0 0\ncpu0 1 2 3 4\n")
    assert machine_cpu(str(stat)) == 4.0
    stat.write_text("intr 1 2 3\n")
    assert machine_cpu(str(stat)) is None
    assert machine_cpu(str(tmp_path / "missing")) is None
    here = machine_cpu()
    assert here is None or here > 0  # on Linux the real counters


class SteppedLoop:
    """The two methods of an event loop ``LoopLag`` uses, on a time the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Callable[..., object], tuple[Any, ...]]] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> asyncio.TimerHandle:
        self.timers.append((when, callback, args))
        return asyncio.TimerHandle(when, callback, args, asyncio.get_running_loop())

    def run_next(self, late: float) -> None:
        when, callback, args = self.timers.pop(0)
        self.now = when + late
        callback(*args)


async def test_the_loop_lag_says_busy_when_every_tick_of_the_window_ran_late() -> None:
    lag, loop = LoopLag(), SteppedLoop()
    lag._next(loop)  # type: ignore[arg-type]  # what start() does on the running loop
    ticks = round(LoopLag.WINDOW / LoopLag.TICK)
    for _ in range(ticks - 1):
        loop.run_next(late=2 * LoopLag.TARGET)
        assert not lag()  # not a whole window yet
    loop.run_next(late=2 * LoopLag.TARGET)
    assert lag()
    loop.run_next(late=0.0)  # one tick on time: a burst, not a standing queue
    assert not lag()
    for _ in range(ticks):
        loop.run_next(late=1.5 * LoopLag.TARGET)
    assert lag()


# ---- WebSocket operations ----------------------------------------------------------------------

FEED = "subscription { activityFeed { __typename ... on Resync { reason } } }"


async def test_websocket_operations_take_places_fairly_and_are_refused_with_the_code(
        settings: Settings, make_tenant: MakeTenant) -> None:
    flood, calm = await make_tenant("wsflood"), await make_tenant("wscalm")
    narrowed = narrow(settings, max_in_flight=3, tenant_in_flight=1, admission_queue=0, tenant_queue=0)
    async with serve_in_process(narrowed, ManualClock()) as server:
        admission: Admission = server.app.state.runtime.admission
        async with live(server.ws_url, flood.token()) as ws, live(server.ws_url, calm.token()) as other:
            async with admission.place(flood.id):  # the flooding tenant's whole share is taken
                for query in (FEED, ME):  # a subscription's start and a query alike
                    assert_refused_message(await ws.message(await ws.subscribe(query)))
                assert admission.refused == 2
                assert await other.live(FEED)  # another tenant's subscription starts meanwhile ...
                assert (await other.data(await other.subscribe(ME)))["tenant"]["id"]  # ... and its query runs
                await admission.until(lambda a: a.running(calm.id) == 0)  # a live subscription holds no place
            op = await ws.live(FEED)  # the share free again: the same socket subscribes
            assert (await ws.data(await ws.subscribe(ME)))["tenant"]["id"]
            await admission.until(lambda a: a.in_flight == 0)
            await ws.ws.send(json.dumps({"id": op, "type": "complete"}))


async def test_a_websocket_query_holds_its_place_until_it_is_answered(
        settings: Settings, make_tenant: MakeTenant, admin_engine: AsyncEngine) -> None:
    world = await make_tenant("wshold")
    async with serve_in_process(narrow(settings), ManualClock()) as server:
        admission: Admission = server.app.state.runtime.admission
        async with live(server.ws_url, world.token()) as ws:
            async with admin_engine.connect() as admin, admin.begin():
                # the query's read of its tenant waits for this lock, so it keeps its place meanwhile
                await admin.execute(text("LOCK TABLE tenants IN ACCESS EXCLUSIVE MODE"))
                op = await ws.subscribe(ME)
                await admission.until(lambda a: a.running(world.id) == 1)
                assert_refused_message(await ws.message(await ws.subscribe(ME)))  # its tenant's one place
            assert (await ws.data(op))["tenant"]["id"]
            await admission.until(lambda a: a.in_flight == 0)


def assert_refused_message(message: dict[str, Any]) -> None:
    assert message["type"] == "error" and error_codes(message) == ["SERVICE_UNAVAILABLE"], message
    assert message["payload"][0]["extensions"]["retryAfter"] == 3


# ---- readiness ----------------------------------------------------------------------------------


async def test_readyz_says_not_ready_while_saturated(serve, make_tenant: MakeTenant) -> None:  # type: ignore[no-untyped-def]
    world = await make_tenant("ready")
    async with serve(max_in_flight=1, admission_queue=0) as served:
        assert (await served.client.get("/readyz")).status_code == 200
        async with served.admission.place("someone"):
            ready = await served.client.get("/readyz")
            assert ready.status_code == 503 and ready.json() == {"status": "unavailable", "saturated": True}
            assert ready.headers["retry-after"] == "3"
            assert_refused(await ask(served.client, world))
        assert (await served.client.get("/readyz")).status_code == 503  # it refused work a moment ago
        served.clock.advance(SATURATED_FOR)
        assert (await served.client.get("/readyz")).status_code == 200


# ---- slow and idle clients ----------------------------------------------------------------------


async def test_the_lifespan_hands_the_read_deadline_to_uvicorn(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, request_read_timeout_seconds=7.5))
    async with app.router.lifespan_context(app) as given:
        assert given == {STATE_KEY: 7.5}


@pytest.fixture(params=[HttpProtocol, H11WithDeadline], ids=["httptools", "h11"])
async def deadline_server(request: pytest.FixtureRequest, settings: Settings) -> AsyncIterator[int]:
    protocol = with_deadline(request.param, 0.5)
    async with serve_in_process(settings, ManualClock(), http=protocol) as server:
        yield server.port


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (fails after ``WAIT`` seconds)."""
    return await asyncio.wait_for(reader.read(), WAIT)


async def test_headers_dribbled_past_the_deadline_are_cut_off(deadline_server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", deadline_server)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        answer = await closed_by_server(reader)
        assert answer.startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()


async def test_a_connection_that_sends_nothing_is_closed(deadline_server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", deadline_server)
    try:
        assert await closed_by_server(reader) == b""
    finally:
        writer.close()


async def test_a_kept_alive_connection_is_cut_off_when_its_next_request_dribbles(deadline_server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", deadline_server)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        assert json.loads(await reader.readexactly(length)) == {"status": "ok", "version": VERSION}
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # the next request never ends its headers
        await writer.drain()
        assert (await closed_by_server(reader)).startswith(b"HTTP/1.1 408 ")
    finally:
        writer.close()


async def test_a_body_that_never_arrives_is_cut_off(deadline_server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", deadline_server)
    try:
        writer.write(b"POST /graphql HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 100\r\n\r\n{\"query\":")
        await writer.drain()
        await closed_by_server(reader)  # the app saw the client go; the socket is closed
    finally:
        writer.close()


async def test_a_websocket_outlives_the_read_deadline(deadline_server: int, make_tenant: MakeTenant) -> None:
    world = await make_tenant("wsok")
    url = f"ws://127.0.0.1:{deadline_server}/graphql"
    async with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {world.token()}"}}))
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] == "connection_ack"
        reader, writer = await asyncio.open_connection("127.0.0.1", deadline_server)
        try:  # a connection opened later than the WebSocket's is cut off by its deadline ...
            assert await closed_by_server(reader) == b""
        finally:
            writer.close()
        await ws.send(json.dumps({"type": "ping"}))  # ... while the WebSocket still answers
        assert json.loads(await asyncio.wait_for(ws.recv(), WAIT))["type"] == "pong"


async def test_a_websocket_that_never_sends_connection_init_is_closed_4408(settings: Settings) -> None:
    quick = dataclasses.replace(settings, ws_init_timeout_seconds=0.3)
    async with serve_in_process(quick, ManualClock()) as server:
        async with connect(server.ws_url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), WAIT)
            assert ws.close_code == 4408


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    return int(head.split()[1]), json.loads(await asyncio.wait_for(reader.readexactly(length), WAIT))


async def test_a_refused_connection_is_not_read_again_before_its_retry_after(
        settings: Settings, make_tenant: MakeTenant) -> None:
    world = await make_tenant("hold")
    body = json.dumps({"query": ME}).encode()
    request = (b"POST /graphql HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nauthorization: Bearer "
               + world.token().encode() + b"\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    narrowed = narrow(settings, max_in_flight=1, retry_after_seconds=1)
    async with serve_in_process(narrowed, ManualClock(), http=with_deadline(HttpProtocol, 10)) as server:
        admission: Admission = server.app.state.runtime.admission
        held_reader, held = await asyncio.open_connection("127.0.0.1", server.port)
        other_reader, other = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            async with admission.place("someone"):
                held.write(request)
                status, answer = await read_response(held_reader)
                assert status == 503 and codes(answer) == ["SERVICE_UNAVAILABLE"]
                held.write(request)  # again at once, ignoring Retry-After
                other.write(request)  # sent later, on another connection: read and refused
                status, _ = await read_response(other_reader)
                assert status == 503
                assert admission.refused == 2  # the held connection's second request was not read
            status, answer = await read_response(held_reader)  # read once the hold is over
            assert status == 200 and answer["data"]["tenant"]["id"]
            assert admission.refused == 2
        finally:
            held.close()
            other.close()


# ---- memory -------------------------------------------------------------------------------------


async def test_memory_is_trimmed_once_after_the_load_drops() -> None:
    load = [0.0]
    trims: list[float] = []
    steps: list[str] = []

    def purge() -> int:
        steps.append("purge")
        return 0

    def trim() -> None:
        steps.append("trim")
        trims.append(load[0])

    clock = ManualClock()
    trimmer = MemoryTrimmer(lambda: load[0], clock, drop=32, purge=purge, trim=trim)
    for value in (10, 500, 2000, 2000, 1000):  # up, then falling: not yet
        load[0] = value
        assert not await trimmer.check()
    load[0] = 3
    assert not await trimmer.check()  # still falling
    assert await trimmer.check()  # fallen by 1,997 and holding still: trimmed
    assert not await trimmer.check()  # once
    load[0] = 20
    assert not await trimmer.check()
    load[0] = 0
    assert not await trimmer.check() and not await trimmer.check()  # a small swing is no reason
    assert trims == [3]
    assert steps == ["purge", "trim"]  # Python's empty pools first, then glibc's free pages


def test_this_platform_can_trim() -> None:
    trim = malloc_trim()
    assert trim is not None, "glibc's malloc_trim is missing: memory freed after load stays resident"
    trim()


# ---- settings -----------------------------------------------------------------------------------


def test_admission_settings_default_to_the_pool_and_name_a_bad_value() -> None:
    base = {"ATRIUM_JWT_SECRET": "s" * 40}
    defaults = Settings.from_env(base)
    assert (defaults.max_in_flight, defaults.tenant_in_flight, defaults.busy_tenant_in_flight) == (10, 5, 1)
    assert (defaults.admission_queue, defaults.tenant_queue) == (32, 16)
    assert (defaults.admission_wait_seconds, defaults.retry_after_seconds) == (1.0, 1)
    assert (defaults.request_read_timeout_seconds, defaults.ws_init_timeout_seconds) == (10.0, 10.0)
    sized = Settings.from_env({**base, "ATRIUM_DB_POOL_SIZE": "24", "ATRIUM_ADMISSION_QUEUE": "100"})
    assert (sized.max_in_flight, sized.tenant_in_flight, sized.busy_tenant_in_flight, sized.tenant_queue) == \
        (24, 12, 3, 50)
    with pytest.raises(SettingError, match="ATRIUM_MAX_IN_FLIGHT must be a whole number of requests, at least 1"):
        Settings.from_env({**base, "ATRIUM_MAX_IN_FLIGHT": "0"})
