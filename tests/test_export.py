"""Tenant export: a background job with progress, a complete archive (every tenant table and declared
record, notes' text and CRDT state, the audit log, members without password hashes) as JSON Lines
and CSV per type in one zip, downloadable once through a signed, expiring link; owners only, and
only their own tenant's."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from core.ids import to_global_id
from core.settings import Settings
from models.archive import ArchiveWriter, sign_download
from models.tables import AUDIT_EVENTS, EXPORT_CHUNKS, TENANT_TABLES, Role
from records.crm import RECORDS
from resolvers.exports import NOT_EXPORTED, SECRET_COLUMNS, export_sources
from tests.conftest import TenantWorld, codes, data_or_fail, gql
from tests.crm import uuid_of
from tests.governance import JOB, archive_files, fill, finished_export, jsonl

MakeTenant = Callable[..., Awaitable[TenantWorld]]


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


async def test_an_export_holds_every_type_and_downloads_once(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world = await make_tenant("export")
    other = await make_tenant("export-other")
    mine, theirs = await fill(client, world), await fill(client, other)
    job = await finished_export(client, app, world)
    assert job["status"] == "DONE" and job["error"] is None
    assert job["rowsDone"] == job["rowsTotal"] > 0 and job["downloadUrl"].startswith("http://atrium.test/exports/")

    response = await client.get(path_of(job["downloadUrl"]))
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    assert hashlib.sha256(response.content).hexdigest() == job["sha256"] == response.headers["x-archive-sha256"]
    assert len(response.content) == job["archiveBytes"]
    files = archive_files(response.content)

    # One JSON Lines and one CSV file per source, derived from the declarations, and a manifest.
    names = {source.name for source in export_sources()}
    assert set(files) == {f"{n}.{kind}" for n in names for kind in ("jsonl", "csv")} | {"manifest.json"}
    manifest = json.loads(files["manifest.json"])
    assert manifest["tenant"]["slug"] == world.slug and manifest["auditChain"]["verified"] is True
    for name in names:
        rows = jsonl(files[f"{name}.jsonl"])
        table = list(csv.reader(io.StringIO(files[f"{name}.csv"].decode())))
        assert len(rows) == len(table) - 1 == manifest["files"][name]["rows"], name
        assert "tenant_id" not in table[0]
    # Its records are there, the other tenant's are not.
    text = b"".join(files.values()).decode(errors="replace")
    for name in mine.crm.names:
        assert name in text
    assert theirs.crm.tag not in text and str(other.id) not in text
    # Notes with their text and their CRDT state; members without password hashes.
    (note,) = jsonl(files["notes.jsonl"])
    assert note["text"] == mine.note_text and note["state"]
    members = jsonl(files["users.jsonl"])
    assert {m["email"] for m in members} == {f"{r.value}@{world.slug}.example" for r in Role}
    assert all("password_hash" not in m for m in members)
    assert "password" not in files["users.csv"].decode().splitlines()[0]
    assert "secret_sha256" not in files["api_keys.csv"].decode().splitlines()[0]
    # The audit log, chain and all.
    async with admin_engine.connect() as conn:
        audit_count = (await conn.execute(select(func.count()).select_from(AUDIT_EVENTS).where(
            AUDIT_EVENTS.c.tenant_id == world.id))).scalar_one()
    events = jsonl(files["audit_events.jsonl"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len(events) >= audit_count - 1  # the export's own event may have been written after its snapshot

    # Once: a second download is refused, the archive is gone, the job says so.
    again = await client.get(path_of(job["downloadUrl"]))
    assert again.status_code == 410
    after = data_or_fail(await gql(client, JOB, {"id": job["id"]}, token=world.token()))["exportJob"]
    assert after["status"] == "DOWNLOADED" and after["downloadUrl"] is None and after["downloadedAt"]
    async with admin_engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(EXPORT_CHUNKS).where(
            EXPORT_CHUNKS.c.job_id == uuid_of(job["id"])))).scalar_one() == 0


def test_the_export_covers_every_tenant_table_and_declared_record() -> None:
    """A new tenant table is exported or named, with its reason, in NOT_EXPORTED."""
    names = {source.name for source in export_sources()}
    assert names | set(NOT_EXPORTED) >= {t.name for t in TENANT_TABLES}
    assert names.isdisjoint(NOT_EXPORTED)
    assert {record.plural for record in RECORDS if record.table not in TENANT_TABLES} <= names
    for source in export_sources():
        columns = set(source.query.selected_columns.keys())
        assert "tenant_id" not in columns and "password_hash" not in columns
        assert columns.isdisjoint(SECRET_COLUMNS.get(source.name, ())), source.name


async def test_a_link_works_only_as_signed_and_until_it_expires(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, settings: Settings,
) -> None:
    world, other = await make_tenant("link"), await make_tenant("link-other")
    await fill(client, world)
    job = await finished_export(client, app, world)
    url = urlsplit(job["downloadUrl"])
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    key = settings.download_secret
    job_id = uuid_of(job["id"])
    forged = [
        f"{url.path}?tenant={other.id}&expires={query['expires']}&signature={query['signature']}",  # other tenant
        f"/exports/{uuid.uuid4()}?{url.query}",  # another job
        f"{url.path}?tenant={world.id}&expires={int(query['expires']) + 3600}&signature={query['signature']}",
        f"{url.path}?{sign_download(key, world.id, job_id, int(time.time()) - 1)}",  # expired
        f"{url.path}?{sign_download('not-the-key', world.id, job_id, int(time.time()) + 60)}",
        f"{url.path}?tenant={world.id}",
        "/exports/not-a-uuid?tenant=x&expires=y&signature=z",
    ]
    for path in forged:
        assert (await client.get(path)).status_code == 403, path
    # None of that spent the one download.
    assert (await client.get(f"{url.path}?{url.query}")).status_code == 200


async def test_only_the_owner_exports_and_only_their_own_tenant(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant,
) -> None:
    world, other = await make_tenant("own"), await make_tenant("own-other")
    job = await finished_export(client, app, world)
    for role in (Role.VIEWER, Role.MEMBER, Role.ADMIN):
        assert codes(await gql(client, JOB, {"id": job["id"]}, token=world.token(role))) == ["FORBIDDEN"]
    # Another tenant's owner cannot see the job (nor guess it into existence).
    assert codes(await gql(client, JOB, {"id": job["id"]}, token=other.token())) == ["NOT_FOUND"]
    assert codes(await gql(client, JOB, {"id": to_global_id("ExportJob", uuid.uuid4())},
                           token=world.token())) == ["NOT_FOUND"]
    # Their own link does not open this tenant's job.
    theirs = await finished_export(client, app, other)
    their_query = urlsplit(theirs["downloadUrl"]).query
    assert (await client.get(f"/exports/{uuid_of(job['id'])}?{their_query}")).status_code == 403


async def test_progress_is_visible_while_running_and_the_job_is_audited(
    client: httpx.AsyncClient, app: Starlette, make_tenant: MakeTenant, admin_engine: AsyncEngine,
) -> None:
    world = await make_tenant("progress")
    await fill(client, world)
    started = data_or_fail(await gql(client, "mutation { exportTenant { id status rowsDone } }",
                                     token=world.token()))["exportTenant"]
    assert started["status"] == "PENDING" and started["rowsDone"] == 0
    await app.state.runtime.tasks.idle()
    done = data_or_fail(await gql(client, JOB, {"id": started["id"]}, token=world.token()))["exportJob"]
    assert done["status"] == "DONE" and done["rowsDone"] == done["rowsTotal"]
    async with admin_engine.connect() as conn:
        actions = (await conn.execute(select(AUDIT_EVENTS.c.action, AUDIT_EVENTS.c.actor_id).where(
            AUDIT_EVENTS.c.tenant_id == world.id, AUDIT_EVENTS.c.entity_id == uuid_of(started["id"])))).all()
    assert [(a.action, a.actor_id) for a in actions] == [("export", world.users[Role.OWNER])]


def test_the_archive_is_produced_in_chunks_whatever_its_size() -> None:
    """Memory holds at most a chunk plus one write: the zip's output is taken as it grows."""
    archive = ArchiveWriter(chunk_bytes=64 * 1024)
    produced: list[bytes] = []
    largest_pending = 0
    with archive.entry("big.jsonl") as entry:
        for n in range(20_000):
            entry.write(f'{{"n": {n}, "noise": "{uuid.uuid4().hex * 4}"}}\n'.encode())
            produced += archive.take()
            largest_pending = max(largest_pending, len(archive._sink.buffer))
    produced += archive.close()
    assert len(produced) > 5 and all(len(c) == 64 * 1024 for c in produced[:-1])
    assert largest_pending < 64 * 1024 + 70_000  # a chunk and one deflate flush at most
    data = b"".join(produced)
    assert hashlib.sha256(data).hexdigest() == archive.sha256 and len(data) == archive.size
    assert archive_files(data)["big.jsonl"].count(b"\n") == 20_000
