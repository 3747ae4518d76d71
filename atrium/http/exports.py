"""``GET /exports/{job_id}?tenant=..&expires=..&signature=..``: an export's archive, downloaded once.

The link (``exportJob.downloadUrl``) is the credential: signed for one tenant's one job until it
expires (``models.archive``). The first request that presents a valid link claims the archive (one
UPDATE in the tenant's own transaction, as the application role under row-level security), so a
second request, however close, gets 410; the archive is streamed chunk by chunk, each read in a
short transaction of its own, and deleted once sent. A wrong, altered or expired link is 403 and
reveals nothing of whether the job exists.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from sqlalchemy import delete, func, select, update
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from atrium.http.runtime import Runtime
from models.archive import verify_download
from models.tables import EXPORT_CHUNKS, EXPORT_JOBS


def export_download(runtime: Runtime) -> Callable[[Request], Awaitable[Response]]:
    databases = runtime.databases

    async def download(request: Request) -> Response:
        grant = verify_download(runtime.settings.download_secret, request.path_params["job_id"],
                                request.query_params, runtime.clock.time())
        if grant is None:
            return JSONResponse({"error": "this download link is not valid (or has expired)"}, status_code=403)
        jobs = EXPORT_JOBS
        async with databases.tenant_transaction(grant.tenant_id) as conn:
            claimed = (await conn.execute(
                update(jobs).where(jobs.c.tenant_id == grant.tenant_id, jobs.c.id == grant.job_id,
                                   jobs.c.status == "done", jobs.c.downloaded_at.is_(None),
                                   jobs.c.expires_at > func.now())
                .values(status="downloaded", downloaded_at=func.now(), updated_at=func.now())
                .returning(jobs.c.archive_bytes, jobs.c.sha256))).first()
            count = (await conn.execute(select(func.count()).where(
                EXPORT_CHUNKS.c.tenant_id == grant.tenant_id, EXPORT_CHUNKS.c.job_id == grant.job_id))).scalar_one()
        if claimed is None:
            return JSONResponse({"error": "this export is not ready, or has already been downloaded"},
                                status_code=410)

        async def body() -> AsyncIterator[bytes]:
            chunks = EXPORT_CHUNKS
            for n in range(count):
                async with databases.tenant_transaction(grant.tenant_id) as conn:
                    yield (await conn.execute(select(chunks.c.data).where(
                        chunks.c.tenant_id == grant.tenant_id, chunks.c.job_id == grant.job_id,
                        chunks.c.n == n))).scalar_one()
            async with databases.tenant_transaction(grant.tenant_id) as conn:
                await conn.execute(delete(chunks).where(chunks.c.tenant_id == grant.tenant_id,
                                                        chunks.c.job_id == grant.job_id))

        return StreamingResponse(body(), media_type="application/zip", headers={
            "content-length": str(claimed.archive_bytes), "cache-control": "no-store",
            "content-disposition": f'attachment; filename="atrium-export-{grant.job_id}.zip"',
            "x-archive-sha256": claimed.sha256 or ""})

    return download
