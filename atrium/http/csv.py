"""CSV over HTTP, authenticated like ``/graphql`` (a bearer token or an API key; the membership re-checked):

- ``POST /imports?type=<plural>[&map=<column>=<field>...][&dryRun=true]``: the body is the CSV file
  (any content type; read up to ``MAX_FILE_BYTES``, 413 beyond); answers 202 with the new job as
  ``importJob`` shows it (``{"data": {"startImport": {...}}}``), or 400 with coded errors
  (``resolvers.imports.submit``, the same function ``startImport`` calls).
- ``GET /csv/<plural>?filter=<JSON>``: the filtered list as CSV, streamed (``resolvers.csv_export``).

Errors are GraphQL-shaped bodies (``errors[].extensions.code``), as ``/graphql`` answers them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from atrium.http.endpoint import open_session, request_id_for
from atrium.http.graphql_http import failure_response
from atrium.http.runtime import Runtime
from auth.principal import authenticate
from auth.roles import allows
from auth.session import Session
from core.errors import AtriumError, BadUserInput, Forbidden, Unauthenticated
from resolvers import csv_export
from resolvers.csv_import import MAX_FILE_BYTES, BadCsv, record_for
from resolvers.imports import submit
from schema.imports import ImportJob

Handler = Callable[[Request], Awaitable[Response]]
STATUS = {"UNAUTHENTICATED": 401, "FORBIDDEN": 403, "NOT_FOUND": 404}


async def _session(runtime: Runtime, request: Request) -> Session:
    principal = await authenticate(runtime.verifier, request.headers.get("authorization"),
                                   api_key=request.headers.get("x-api-key"), api_keys=runtime.api_keys)
    if principal is None:
        raise Unauthenticated()
    return await open_session(runtime.databases, principal)


async def _body(request: Request) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_FILE_BYTES:
            raise BadCsv("file", "TOO_LARGE", f"must be at most {MAX_FILE_BYTES} bytes")
        parts.append(part)
    return b"".join(parts)


def _mapping(request: Request) -> dict[str, str | None] | None:
    given = request.query_params.getlist("map")
    if not given:
        return None
    out: dict[str, str | None] = {}
    for item in given:
        column, sep, target = item.partition("=")
        if not sep:
            raise BadUserInput("map", f"{item!r} must be <column>=<field> (an empty field leaves the column out)")
        out[column.strip()] = target.strip() or None
    return out


def _failure(error: AtriumError, request: Request, request_id: str) -> Response:
    status = 413 if error.extra.get("reason") == "TOO_LARGE" else STATUS.get(error.code.value, 400)
    return failure_response(error, status, request_id, request.headers.get("accept"))


def import_upload(runtime: Runtime) -> Handler:
    async def upload(request: Request) -> Response:
        request_id = request_id_for(request)
        session: Session | None = None
        try:
            session = await _session(runtime, request)
            record = record_for(request.query_params.get("type", ""))
            dry_run = request.query_params.get("dryRun", "false").lower() in ("true", "1", "yes")
            mapping = _mapping(request)
            content = await _body(request)
            row = await submit(session, runtime.databases, runtime.broker, runtime.tasks, request_id, record,
                               content, mapping, dry_run=dry_run)
        except AtriumError as error:
            return _failure(error, request, request_id)
        finally:
            if session is not None:
                await session.close()
        job = ImportJob.from_row(row)
        return JSONResponse({"data": {"startImport": {
            "id": job.id, "type": job.type.name,  # type: ignore[attr-defined]
            "state": job.state.name, "dryRun": job.dry_run, "total": job.total,
            "processed": job.processed}}}, status_code=202, headers={"x-request-id": request_id})

    return upload


def list_export(runtime: Runtime) -> Handler:
    async def export(request: Request) -> Response:
        request_id = request_id_for(request)
        session: Session | None = None
        try:
            session = await _session(runtime, request)
            record = csv_export.record_for(request.path_params["plural"])
            if not allows(session.principal.role, record.access.read):
                raise Forbidden(f"Reading {record.plural_label} requires `{record.access.read.value}`")
            filters = csv_export.filter_of(record, request.query_params.get("filter"))
            record.refuse_hidden(session.hidden(record.name), session.principal.role.value, filters=filters)
            tenant_id, view, hidden = session.tenant_id, session.principal.view, session.hidden
        except AtriumError as error:
            return _failure(error, request, request_id)
        finally:
            if session is not None:
                await session.close()

        async def body() -> AsyncIterator[bytes]:
            async for piece in csv_export.csv_rows(runtime.databases, tenant_id, record, filters, view=view,
                                                     hidden=hidden):
                yield piece

        return StreamingResponse(body(), media_type="text/csv; charset=utf-8", headers={
            "content-disposition": f'attachment; filename="{record.plural}.csv"', "cache-control": "no-store",
            "x-request-id": request_id})

    return export
