"""Export jobs hold a lease in PostgreSQL: a job whose server process died (kill -9) is found by
another process (or the next start) once its lease has expired and failed with an error its owner
reads from ``exportJob``; a job whose process lives is never touched."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from atrium.app import create_app
from core.clock import ManualClock
from core.ids import to_global_id
from core.settings import Settings
from models.leases import ABANDONED, JobLeases, Reaped
from models.tables import EXPORT_CHUNKS, EXPORT_JOBS
from tests.conftest import TenantWorld, data_or_fail, gql
from tests.crm import uuid_of
from tests.governance import EXPORT, JOB
from tests.live import start_atrium

MakeTenant = Callable[..., Awaitable[TenantWorld]]
LEASE = 30
PORT = 18150
"""The killed server's port (this helper's range)."""


@pytest.fixture
async def clocked(settings: Settings) -> AsyncIterator[tuple[Starlette, httpx.AsyncClient, ManualClock]]:
    clock = ManualClock()
    app = create_app(dataclasses.replace(settings, export_lease_seconds=LEASE, pool_size=2), clock=clock)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        yield app, client, clock


async def look(leases: JobLeases, job: uuid.UUID) -> bool:
    """Whether the next look for abandoned jobs failed ``job``."""
    reaped: list[Reaped] = await asyncio.wait_for(leases.rounds.get(), 30)
    return any(r.job_id == job for r in reaped)


async def job_row(engine: AsyncEngine, tenant: TenantWorld, job: uuid.UUID) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(select(EXPORT_JOBS).where(EXPORT_JOBS.c.tenant_id == tenant.id,
                                                             EXPORT_JOBS.c.id == job))).one()


async def test_a_job_whose_lease_expired_is_failed_with_an_error_its_owner_sees(
    clocked: tuple[Starlette, httpx.AsyncClient, ManualClock], make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    app, client, clock = clocked
    leases: JobLeases = app.state.runtime.leases
    world = await make_tenant("lease")
    token = world.token(ttl_seconds=3600)
    # A job another process claimed, with part of its archive stored, and that process gone.
    job, now = uuid.uuid4(), dt.datetime.fromtimestamp(clock.time(), dt.UTC)
    async with admin_engine.begin() as conn:
        await conn.execute(EXPORT_JOBS.insert().values(
            tenant_id=world.id, id=job, status="running", rows_done=10, rows_total=99, lease_owner=uuid.uuid4(),
            lease_expires_at=now + dt.timedelta(seconds=LEASE)))
        await conn.execute(EXPORT_CHUNKS.insert().values(tenant_id=world.id, id=uuid.uuid4(), job_id=job, n=0,
                                                         data=b"PK\x03\x04 part of an archive"))
    gid = to_global_id("ExportJob", job)
    while not leases.rounds.empty():  # the look at start ran before the job existed
        leases.rounds.get_nowait()

    # While the lease holds, the job counts as under way: asking for an export answers it.
    clock.advance(LEASE / 3)
    assert not await look(leases, job)
    assert data_or_fail(await gql(client, EXPORT, token=token))["exportTenant"] == {"id": gid, "status": "RUNNING"}

    clock.advance(LEASE)
    while not await look(leases, job):
        pass
    found = data_or_fail(await gql(client, JOB, {"id": gid}, token=token))["exportJob"]
    assert (found["status"], found["error"], found["downloadUrl"]) == ("FAILED", ABANDONED, None)
    async with admin_engine.connect() as conn:
        chunks = (await conn.execute(select(func.count()).select_from(EXPORT_CHUNKS).where(
            EXPORT_CHUNKS.c.tenant_id == world.id, EXPORT_CHUNKS.c.job_id == job))).scalar_one()
    assert chunks == 0
    # A new export is a new job, which this (live) process finishes.
    fresh = data_or_fail(await gql(client, EXPORT, token=token))["exportTenant"]
    assert fresh["id"] != gid
    await app.state.runtime.tasks.idle()
    assert data_or_fail(await gql(client, JOB, {"id": fresh["id"]}, token=token))["exportJob"]["status"] == "DONE"
    assert (await job_row(admin_engine, world, uuid_of(fresh["id"]))).lease_owner == leases.owner  # type: ignore[attr-defined]


async def test_an_export_survives_nothing_of_a_killed_process_but_its_failure(
    clocked: tuple[Starlette, httpx.AsyncClient, ManualClock], make_tenant: MakeTenant, admin_engine: AsyncEngine,
    database_url: str,
) -> None:
    """A real server process is killed with SIGKILL in the middle of an export (held there by a lock
    the test takes on a table the export reads); this process fails the job once the dead one's
    lease has expired, and not before."""
    app, client, clock = clocked
    leases: JobLeases = app.state.runtime.leases
    world = await make_tenant("killed")
    token = world.token(ttl_seconds=3600)
    server = await start_atrium(database_url, None, {"ATRIUM_EXPORT_LEASE": str(LEASE)}, port=PORT)
    try:
        async with admin_engine.connect() as blocker:
            await blocker.execute(text("LOCK TABLE retention_policies IN ACCESS EXCLUSIVE MODE"))
            async with server.client() as other:
                gid = data_or_fail(await gql(other, EXPORT, token=token))["exportTenant"]["id"]
                job = uuid_of(gid)
                async with admin_engine.connect() as watch:  # the export waits for the lock, RUNNING
                    while not (await watch.execute(text(  # noqa: ASYNC110 - another process's wait, seen by asking
                            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = "
                            "'retention_policies'::regclass"))).scalar_one():
                        await asyncio.sleep(0.05)
                running = data_or_fail(await gql(other, JOB, {"id": gid}, token=token))["exportJob"]
                assert running["status"] == "RUNNING"
            # The other process is alive: its lease holds, this process leaves the job alone.
            while not leases.rounds.empty():
                leases.rounds.get_nowait()
            clock.advance(LEASE / 3)
            assert not await look(leases, job)
            server.process.kill()  # SIGKILL: it never gets to say anything
            server.process.wait()
            await blocker.rollback()
    finally:
        server.stop()
    row = await job_row(admin_engine, world, job)
    assert row.status == "running" and row.lease_owner != leases.owner  # type: ignore[attr-defined]
    assert data_or_fail(await gql(client, JOB, {"id": gid}, token=token))["exportJob"]["status"] == "RUNNING"

    clock.advance(2 * LEASE)  # (the dead process renewed at most a third of a lease before it died)
    while not await look(leases, job):
        pass
    found = data_or_fail(await gql(client, JOB, {"id": gid}, token=token))["exportJob"]
    assert (found["status"], found["error"]) == ("FAILED", ABANDONED)
