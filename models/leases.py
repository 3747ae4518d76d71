"""Leases on background jobs: an export whose server process died is found and failed, never RUNNING for ever.

An export job (``export_jobs``) is claimed by the process that accepted it: ``lease_owner`` is that
process's ``JobLeases.owner`` and ``lease_expires_at`` the end of its claim, written with the job.
While the process lives, ``JobLeases.run`` renews the claim of every job it holds every third of
``seconds`` (pending ones waiting for a slot included). A process killed outright (``kill -9``, a
lost machine) stops renewing; once the lease has expired, the next ``JobLeases`` to look (another
server process, or this one restarted: a look runs at start, then every third of ``seconds``) fails
the job with ``ABANDONED``, which its owner reads from ``exportJob(id:)``, and deletes the chunks it
had stored. A half-built archive is not resumed: the export reads one consistent snapshot, which
died with its transaction, so a new export is the only honest archive.

Finding abandoned jobs crosses tenants (``atrium_abandoned_exports``, migration 0014, ids only, on
every database: ``Databases.homes``); failing one runs in that tenant's own transaction, under RLS,
and re-checks the lease, so a job renewed meanwhile is left alone. Time is the app's clock.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

from sqlalchemy import delete, text, update
from sqlalchemy.exc import SQLAlchemyError

from core.clock import Clock, next_round
from models.db import Databases
from models.tables import EXPORT_CHUNKS, EXPORT_JOBS

log = logging.getLogger("atrium.leases")

ABANDONED = ("the server process running this export stopped before it finished (its lease expired); "
             "nothing of it was kept: start another export")
"""The ``error`` of an export failed because its process died."""
UNDER_WAY = ("pending", "running")
FIND = text("SELECT tenant_id, id FROM atrium_abandoned_exports(:now)")


@dataclass(frozen=True)
class Reaped:
    tenant_id: uuid.UUID
    job_id: uuid.UUID


@dataclass
class JobLeases:
    """This process's leases on export jobs (module docstring)."""

    databases: Databases
    clock: Clock
    seconds: float
    owner: uuid.UUID = field(default_factory=uuid.uuid4)
    held: set[tuple[uuid.UUID, uuid.UUID]] = field(default_factory=set)
    rounds: asyncio.Queue[list[Reaped]] = field(default_factory=asyncio.Queue)
    """What each look for abandoned jobs failed, in order (what tests wait on)."""

    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock.time(), dt.UTC)

    def expiry(self) -> dt.datetime:
        """When a lease taken or renewed now ends."""
        return self.now() + dt.timedelta(seconds=self.seconds)

    def hold(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
        self.held.add((tenant_id, job_id))

    def release(self, tenant_id: uuid.UUID, job_id: uuid.UUID) -> None:
        self.held.discard((tenant_id, job_id))

    async def renew(self) -> None:
        """Extend the lease of every job this process holds that is still under way."""
        until = self.expiry()
        for tenant_id, job_id in list(self.held):
            async with self.databases.tenant_transaction(tenant_id) as conn:
                await conn.execute(update(EXPORT_JOBS).where(
                    EXPORT_JOBS.c.tenant_id == tenant_id, EXPORT_JOBS.c.id == job_id,
                    EXPORT_JOBS.c.lease_owner == self.owner, EXPORT_JOBS.c.status.in_(UNDER_WAY))
                    .values(lease_expires_at=until))

    async def reap(self) -> list[Reaped]:
        """Fail every job under way whose lease has expired, on every database; which."""
        now = self.now()
        reaped: list[Reaped] = []
        for home in await self.databases.homes():
            try:
                async with home.engine.connect() as conn:
                    found = (await conn.execute(FIND, {"now": now})).all()
                    await conn.commit()
            except (OSError, SQLAlchemyError) as exc:  # one database down stops nobody else's look
                log.warning("job leases: cannot look for abandoned exports in %s (%s)",
                            home.engine.url.render_as_string(), exc)
                continue
            for row in found:
                if not home.holds(row.tenant_id):
                    continue  # listed by a database that is not the tenant's home
                j = EXPORT_JOBS
                async with self.databases.tenant_transaction(row.tenant_id, home=home) as conn:
                    failed = (await conn.execute(update(j).where(
                        j.c.tenant_id == row.tenant_id, j.c.id == row.id, j.c.status.in_(UNDER_WAY),
                        j.c.lease_expires_at < now).values(status="failed", error=ABANDONED, updated_at=now)
                        .returning(j.c.id))).first()
                    if failed is None:
                        continue  # renewed or finished meanwhile
                    await conn.execute(delete(EXPORT_CHUNKS).where(EXPORT_CHUNKS.c.tenant_id == row.tenant_id,
                                                                   EXPORT_CHUNKS.c.job_id == row.id))
                reaped.append(Reaped(row.tenant_id, row.id))
                log.warning("export %s of tenant %s was abandoned by its process (lease expired): failed",
                            row.id, row.tenant_id)
        return reaped

    async def run(self) -> None:
        """Look for abandoned jobs now, then renew and look every third of the lease, for ever."""
        interval = self.seconds / 3
        deadline = self.clock.time()
        while True:
            try:
                await self.renew()
                reaped = await self.reap()
            except (TimeoutError, OSError, SQLAlchemyError) as exc:
                log.warning("job leases: a round failed (%s); next in %.0f s", exc, interval)
                reaped = []
            if self.rounds.qsize() < 100:  # nobody may be reading: keep it bounded
                self.rounds.put_nowait(reaped)
            deadline = next_round(deadline, interval, self.clock.time())
            await self.clock.sleep_until(deadline)
