"""GraphQL over HTTP as the specification has it, with persisted documents and rate limits.

``GraphQLOverHTTP`` replaces Strawberry's HTTP request handling (its WebSocket handling, and HTTP
streaming when a stream protocol is configured and asked for, stay Strawberry's; persisted-only
credentials are refused there):

- Media types: ``application/graphql-response+json`` when the ``Accept`` header prefers it (or
  names it and ``application/json`` equally), ``application/json`` for ``application/json``,
  ``*/*``, ``application/*`` or no ``Accept`` header (what legacy clients and Apollo Client 3
  send); 406 when nothing acceptable is named.
- Requests: POST with ``Content-Type: application/json`` (else 415) whose body is a JSON object
  (invalid JSON, JSON nested deeper than ``core.jsontext.MAX_DEPTH`` or another shape: 400; a
  JSON array only when ``Settings.batching`` is on), or GET with URL parameters (``variables`` and
  ``extensions`` JSON-encoded, read within the same bounds). ``query`` and
  ``operationName`` must be strings, ``variables`` and ``extensions`` objects; ``documentId``
  names a persisted document (``partners.documents``). GET runs queries only: a mutation by GET is
  answered 405 with ``Allow: POST``. Other methods: 405 with ``Allow: GET, POST``.
- Status codes under ``application/json``: 200 for every well-formed request, request errors
  included, except RATE_LIMITED (429) and the APQ hash mismatch and version errors (400, as Apollo).
  Under ``application/graphql-response+json``: 200 when the response has ``data`` (even null), and
  for a request error (no ``data``) 400, or 401 / 403 / 404 / 429 / 500 by its code (see
  ``REQUEST_ERROR_STATUS``). An APQ miss is always 200 with ``Cache-Control: private, no-cache,
  must-revalidate``, as Apollo Server answers it and Apollo Client expects; an unknown
  ``documentId`` is 404 there. A request error (nothing executed) has no ``data`` entry at all.
- A document with several operations and no ``operationName`` is refused (``schema.cost``), not
  run as its first operation.
- Every response to a GraphQL request carries the ``RateLimit-*`` headers of its meter.
- Cached answers (``planner.answers``): a persisted document's answer (``documentId`` or an APQ
  hash) may be cached unless the request says ``Atrium-Cache: off``; any other query's only when it
  says ``Atrium-Cache: on`` (another value is a 400). The response's ``Atrium-Cache`` header says
  ``hit`` or ``miss`` when the cache was consulted, ``uncacheable`` when the operation cannot be
  cached (a mutation, a field the executor answers, an error).
- A mutation POSTed with an ``Idempotency-Key`` runs exactly once (``atrium.http.idempotency``): a
  retry gets the stored answer (``Idempotent-Replayed: true``); a retry while the first still runs
  is 409 IDEMPOTENCY_KEY_IN_USE (``Retry-After``), the same key with another body 422
  IDEMPOTENCY_KEY_REUSED, under either media type. A malformed key, or one on a batch, is a 400.
- A successful GET answer carries an ``ETag`` (the SHA-256 of its body) and ``Cache-Control:
  private, no-cache``; a GET whose ``If-None-Match`` names the current one is answered ``304 Not
  Modified`` without a body.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphql import GraphQLError
from starlette.requests import Request
from starlette.responses import Response
from strawberry.asgi import GraphQL
from strawberry.exceptions import MissingQueryError
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType

from atrium.http.idempotency import HEADER, REPLAYED, Conflict, Once, fingerprint, is_mutation, key_of, principal_of
from atrium.http.ratelimit import RequestMeter
from atrium.http.runtime import Runtime
from atrium.schema import AtriumSchema
from auth.session import Context
from core.errors import (
    OUTAGE_RETRY_AFTER,
    AtriumError,
    BadRequest,
    ErrorCode,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    PersistedQueryNotFound,
    PersistedQueryRequired,
    ValidationFailed,
    error_body,
)
from core.jsontext import UnreadableJSON, dumps, loads
from partners.documents import Source, resolve_document
from schema.extensions import code_of

GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
JSON = "application/json"
QUERIES_ONLY = frozenset({OperationType.QUERY})
QUERIES_AND_MUTATIONS = frozenset({OperationType.QUERY, OperationType.MUTATION})
APQ_MISS_HEADERS = {"Cache-Control": "private, no-cache, must-revalidate"}
Page = Callable[[Request], Awaitable[Response]]
"""An HTML page answering a request (the IDE served at the endpoint)."""
NOT_STORED_CODES = (ErrorCode.GRAPHQL_PARSE_FAILED.value, ErrorCode.GRAPHQL_VALIDATION_FAILED.value)

REQUEST_ERROR_STATUS = {
    ErrorCode.UNAUTHENTICATED.value: 401,
    ErrorCode.FORBIDDEN.value: 403,
    ErrorCode.PERSISTED_QUERY_REQUIRED.value: 403,
    ErrorCode.PERSISTED_QUERY_NOT_FOUND.value: 404,
    ErrorCode.RATE_LIMITED.value: 429,
    ErrorCode.INTERNAL.value: 500,
    ErrorCode.SERVICE_UNAVAILABLE.value: 503,
}
"""Status of a request error under application/graphql-response+json, by its first error's code (else 400)."""


class HTTPError(Exception):
    """A request answered before any GraphQL processing, with ``status`` and a one-error body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Params:
    """The parameters of one GraphQL-over-HTTP request (or persisted document request)."""

    query: str | None = None
    document_id: str | None = None
    operation_name: str | None = None
    variables: dict[str, Any] | None = None
    extensions: dict[str, Any] | None = None


@dataclass
class Outcome:
    """One operation's answer: its body, the status it asks for, and extra headers."""

    body: dict[str, Any]
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def negotiate(accept: str | None) -> str:
    """The response media type for an ``Accept`` header (see the module docstring); HTTPError 406."""
    if accept is None or not accept.strip():
        return JSON
    best: tuple[float, int, str] | None = None
    for part in accept.split(","):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if quality <= 0:
            continue
        if media == GRAPHQL_RESPONSE_JSON:
            candidate = (quality, 2, GRAPHQL_RESPONSE_JSON)
        elif media == JSON:
            candidate = (quality, 1, JSON)
        elif media in ("*/*", "application/*"):
            candidate = (quality, 0, JSON)
        else:
            continue
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    if best is None:
        raise HTTPError(406, f"Not acceptable: answers are {GRAPHQL_RESPONSE_JSON} or {JSON}")
    return best[2]


def params_of(data: Any) -> Params:
    """Validated request parameters from a decoded JSON object; HTTPError 400 otherwise."""
    if not isinstance(data, dict):
        raise HTTPError(400, "The request body must be a JSON object")
    query, document_id = data.get("query"), data.get("documentId")
    operation_name, variables, extensions = data.get("operationName"), data.get("variables"), data.get("extensions")
    if not isinstance(query, str | None):
        raise HTTPError(400, "query must be a string")
    if not isinstance(document_id, str | None):
        raise HTTPError(400, "documentId must be a string")
    if not isinstance(operation_name, str | None):
        raise HTTPError(400, "operationName must be a string")
    if not isinstance(variables, dict | None):
        raise HTTPError(400, "variables must be an object")
    if not isinstance(extensions, dict | None):
        raise HTTPError(400, "extensions must be an object")
    return Params(query=query, document_id=document_id, operation_name=operation_name or None,
                  variables=variables, extensions=extensions)


def params_of_url(query_params: Mapping[str, str]) -> Params:
    """Parameters of a GET request (``variables`` and ``extensions`` are JSON strings)."""
    data: dict[str, Any] = {k: query_params[k] for k in ("query", "documentId", "operationName") if k in query_params}
    for name in ("variables", "extensions"):
        if raw := query_params.get(name):
            try:
                data[name] = loads(raw)
            except UnreadableJSON as exc:
                raise HTTPError(400, f"{name} must be a JSON object: {exc}") from None
    return params_of(data)


async def params_of_body(request: Request, *, batching: bool, max_batch: int) -> Params | list[Params]:
    """Parameters of a POST request (one object, or a list of them when ``batching``)."""
    content_type, *options = (piece.strip().lower() for piece in request.headers.get("content-type", "").split(";"))
    charset = next((o.partition("=")[2].strip('"') for o in options if o.startswith("charset=")), "utf-8")
    if content_type != JSON or charset != "utf-8":
        raise HTTPError(415, f"POST a body of Content-Type {JSON} (UTF-8)")
    try:
        data = loads((await request.body()).decode())
    except UnicodeDecodeError:
        raise HTTPError(400, "The request body is not valid JSON: not UTF-8") from None
    except UnreadableJSON as exc:
        raise HTTPError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, list):
        return params_of(data)
    if not batching:
        raise HTTPError(400, "Batching is not enabled: send one operation per request")
    if not data or len(data) > max_batch:
        raise HTTPError(400, f"A batch holds 1 to {max_batch} operations")
    return [params_of(item) for item in data]


def is_request_error(result: ExecutionResult) -> bool:
    """True when nothing was executed: no data and no error attached to a field."""
    return result.data is None and bool(result.errors) and all(not e.path for e in result.errors or ())


def unavailable(result: ExecutionResult) -> int | None:
    """The ``retryAfter`` of the result's first SERVICE_UNAVAILABLE error (a service it needed was
    down: the whole answer is a 503), or None."""
    for error in result.errors or ():
        if code_of(error) == ErrorCode.SERVICE_UNAVAILABLE.value:
            retry_after = (error.extensions or {}).get("retryAfter")
            return retry_after if isinstance(retry_after, int) else OUTAGE_RETRY_AFTER
    return None


def outcome_of(result: ExecutionResult, media: str) -> Outcome:
    body: dict[str, Any] = {}
    request_error = is_request_error(result)
    if not request_error:
        body["data"] = result.data
    if result.errors:
        body["errors"] = [e.formatted for e in result.errors]
    if result.extensions:
        body["extensions"] = result.extensions
    status = 200
    if request_error:
        code = code_of(result.errors[0]) if result.errors else None
        if code == ErrorCode.RATE_LIMITED.value:
            status = 429
        elif media == GRAPHQL_RESPONSE_JSON:
            status = REQUEST_ERROR_STATUS.get(code or "", 400)
    if (retry_after := unavailable(result)) is not None:
        return Outcome(body, 503, {"Retry-After": str(retry_after)})
    return Outcome(body, status)


def cache_asked(request: Request) -> bool | None:
    """What ``Atrium-Cache: on|off`` asks (None: the default, caching persisted documents only).
    HTTPError 400 for another value."""
    asked = request.headers.get("atrium-cache")
    if asked is None:
        return None
    value = asked.strip().lower()
    if value not in ("on", "off"):
        raise HTTPError(400, "Atrium-Cache must be on or off")
    return value == "on"


def idempotency_key(request: Request) -> str | None:
    """The ``Idempotency-Key`` of a POST (None for GET: queries only); HTTPError 400 when malformed."""
    if request.method != "POST":
        return None
    try:
        return key_of(request.headers.get(HEADER))
    except ValueError as exc:
        raise HTTPError(400, str(exc)) from None


def document_id_of(params: Params, source: Source) -> str | None:
    """The id a persisted document was asked for by (``documentId``, or the APQ hash), else None."""
    if not source.persisted:
        return None
    if params.document_id is not None:
        return params.document_id
    pq = (params.extensions or {}).get("persistedQuery")
    sha = pq.get("sha256Hash") if isinstance(pq, dict) else None
    return f"sha256:{sha}" if isinstance(sha, str) else None


def refusal(error: AtriumError, status: int, headers: Mapping[str, str] | None = None) -> Outcome:
    return Outcome(error_body(error), status, dict(headers or {}))


class GraphQLOverHTTP(GraphQL[Context, None]):
    """Strawberry's ASGI view with Atrium's HTTP handling (module docstring). Strawberry's own request
    handling serves WebSockets only; no HTTP stream protocol (SSE, multipart) is enabled."""

    schema: AtriumSchema

    def __init__(self, schema: AtriumSchema, runtime: Runtime, *, ide: Page | None = None, **kwargs: Any) -> None:
        super().__init__(schema, graphql_ide=None, **kwargs)  # never Strawberry's page (it loads from a CDN)
        self.runtime = runtime
        self.ide = ide

    def decode_json(self, data: str | bytes) -> object:
        """WebSocket messages are read within the bounds of request bodies (``core.jsontext.loads``);
        one that is not (too deep, not JSON) closes the socket with 4400, as unparsable JSON does."""
        try:
            return loads(data if isinstance(data, str) else data.decode())
        except (UnreadableJSON, UnicodeDecodeError) as exc:
            raise json.JSONDecodeError(str(exc), "", 0) from None

    def should_render_graphql_ide(self, request: Any) -> bool:
        """The IDE page (when there is one) for a browser's plain GET only: never for a hash-only or
        documentId request."""
        params = request.query_params
        return (request.method == "GET" and self.ide is not None
                and not any(k in params for k in ("query", "documentId", "extensions"))
                and "text/html" in request.headers.get("accept", ""))

    async def render_graphql_ide(self, request: Request) -> Response:
        """The IDE page the view was given (Strawberry's own would load its scripts from a CDN)."""
        assert self.ide is not None
        return await self.ide(request)

    async def serve(self, request: Request, context: Context, sub_response: Response) -> Response:
        """Answer one HTTP request on the GraphQL endpoint (``sub_response``: headers resolvers set)."""
        media = JSON
        try:
            if request.method not in ("GET", "POST"):
                raise HTTPError(405, "GraphQL is served by GET (queries) and POST", {"Allow": "GET, POST"})
            if self.should_render_graphql_ide(request):
                return await self.render_graphql_ide(request)
            media = negotiate(request.headers.get("accept"))
            cache = cache_asked(request)
            key = idempotency_key(request)
            if request.method == "GET":
                params: Params | list[Params] = params_of_url(request.query_params)
            else:
                settings = self.runtime.settings
                params = await params_of_body(request, batching=settings.batching, max_batch=settings.max_batch)
            if isinstance(params, list) and key is not None:
                raise HTTPError(400, "An Idempotency-Key belongs to one operation: send a batch without it")
        except HTTPError as exc:
            body, status, headers = error_body(BadRequest(exc.message)), exc.status, exc.headers
        else:
            if isinstance(params, list):
                outcomes = [await self.execute(request, p, context, media, cache) for p in params]
                body_list = [o.body for o in outcomes]
                headers = {k: v for o in outcomes for k, v in o.headers.items()}
                return await self.respond(request, body_list, 200, headers, media, sub_response, context)
            outcome = await self.execute(request, params, context, media, cache, key)
            body, status, headers = outcome.body, outcome.status, outcome.headers
        return await self.respond(request, body, status, headers, media, sub_response, context)

    async def respond(self, request: Request, body: Any, status: int, headers: dict[str, str], media: str,
                      sub_response: Response, context: Context) -> Response:
        content_type = f"{GRAPHQL_RESPONSE_JSON}; charset=utf-8" if media == GRAPHQL_RESPONSE_JSON else JSON
        text = dumps(body)
        if request.method == "GET" and status == 200 and isinstance(body, dict) and "errors" not in body:
            etag = f'"{hashlib.sha256(text.encode()).hexdigest()[:40]}"'
            headers = {**headers, "ETag": etag, "Cache-Control": "private, no-cache"}
            if etag in (request.headers.get("if-none-match") or "").replace("W/", "").split(", "):
                response = Response(status_code=304)
            else:
                response = Response(text, status_code=status, media_type=content_type)
        else:
            response = Response(text, status_code=status, media_type=content_type)
        response.headers.raw.extend(sub_response.headers.raw)
        if isinstance(context.meter, RequestMeter):
            headers = {**await context.meter.headers(), **headers}
        for name, value in headers.items():
            response.headers[name] = value
        response.headers["Vary"] = "Accept, Authorization, X-API-Key"
        if sub_response.background:
            response.background = sub_response.background
        return response

    async def execute(self, request: Request, params: Params, context: Context, media: str,
                      cache: bool | None, key: str | None = None) -> Outcome:
        """Resolve the document of ``params``, run it (its answer cached when ``cache`` says so, or by
        default for a persisted document; a mutation with an idempotency ``key`` exactly once), and
        shape the answer for ``media``."""
        try:
            source = await resolve_document(query=params.query, document_id=params.document_id,
                                            extensions=params.extensions, principal=context.principal,
                                            db=context.own_session.db if context.own_session else None,
                                            apq=self.runtime.apq, trusted=self.runtime.trusted)
        except BadRequest as exc:
            return refusal(exc, exc.status)
        except PersistedQueryNotFound as exc:
            if params.document_id is None:
                return refusal(exc, 200, APQ_MISS_HEADERS)
            return refusal(exc, 200 if media == JSON else 404)
        except PersistedQueryRequired as exc:
            return refusal(exc, 200 if media == JSON else 403)
        if key is not None and context.own_session is not None and is_mutation(source.query, params.operation_name):
            return await self.execute_once(key, request, params, source, context, media)
        return await self.run_operation(request, params, source, context, media, cache)

    async def execute_once(self, key: str, request: Request, params: Params, source: Source, context: Context,
                           media: str) -> Outcome:
        """A mutation sent with an Idempotency-Key (``atrium.http.idempotency``): its stored answer, or
        it runs and its answer is stored in the same transaction, committed before it is sent."""
        assert context.own_session is not None
        scope = context.own_session.db
        scope.hold()
        once = Once(scope, principal_of(context.own_session.principal), key,
                    fingerprint({"query": params.query, "documentId": params.document_id,
                                 "operationName": params.operation_name, "variables": params.variables,
                                 "extensions": params.extensions}),
                    dt.datetime.fromtimestamp(self.runtime.clock.time(), dt.UTC),
                    self.runtime.settings.idempotency_ttl_seconds)
        try:
            stored = await once.claim()
        except Conflict as exc:
            if exc.in_use:
                return refusal(IdempotencyKeyInUse(), 409, {"Retry-After": "1"})
            return refusal(IdempotencyKeyReused(), 422)
        if stored is not None:
            await scope.commit()
            return Outcome(json.loads(stored.body), stored.status, {REPLAYED: "true"})  # our own JSON
        outcome = await self.run_operation(request, params, source, context, media, None)
        if outcome.status == 503:  # a service it needed was down: undo it all, so that its retry runs
            await scope.rollback()
            return outcome
        if "data" in outcome.body:  # something ran: its answer is the one every retry gets
            await once.store(outcome.status, dumps(outcome.body))
        await scope.commit()
        return outcome

    async def run_operation(self, request: Request, params: Params, source: Source, context: Context, media: str,
                            cache: bool | None) -> Outcome:
        """Execute ``source`` for ``params`` and shape the answer for ``media``: in the operation's span
        when tracing is on (``atrium.observability.tracing``), the fast path and the pipeline alike."""
        tracing = self.runtime.tracing
        if tracing is None:
            return await self.answer_operation(request, params, source, context, media, cache)
        tenant = context.principal.tenant_id if context.principal is not None else None
        with tracing.operation_span(tenant, source.query, document_id_of(params, source)):
            return await self.answer_operation(request, params, source, context, media, cache)

    async def answer_operation(self, request: Request, params: Params, source: Source, context: Context, media: str,
                               cache: bool | None) -> Outcome:
        get = request.method == "GET"
        if self.runtime.answers is not None and (source.persisted if cache is None else cache):
            context = dataclasses.replace(context, answers=self.runtime.answers)
        prepared = await self.schema.answer_prepared(context, source.query, params.operation_name, params.variables)
        if prepared is not None:
            await self.register(source, prepared.errors)  # a prepared document parsed and validated
            return outcome_of(prepared, media)
        try:
            result = await self.schema.execute(
                source.query, variable_values=params.variables, context_value=context,
                operation_name=params.operation_name,
                allowed_operation_types=QUERIES_ONLY if get else QUERIES_AND_MUTATIONS,
                operation_extensions=params.extensions)
        except InvalidOperationTypeError as exc:
            if get and exc.operation_type == OperationType.MUTATION:
                return Outcome(error_body(BadRequest("Mutations are sent by POST, not GET")), 405,
                               {"Allow": "POST"})
            return Outcome(error_body(BadRequest("Subscriptions are served over WebSocket "
                                                 "(graphql-transport-ws), not HTTP")), 400)
        except CannotGetOperationTypeError as exc:
            reason = exc.as_http_error_reason()
            return Outcome(error_body(ValidationFailed(reason)), 200 if media == JSON else 400)
        except MissingQueryError:
            return Outcome(error_body(BadRequest("The request has no GraphQL document")), 400)
        await self.register(source, result.errors)
        return outcome_of(result, media)

    async def register(self, source: Source, errors: Sequence[GraphQLError] | None) -> None:
        """Store an APQ registration's document once it has parsed and validated."""
        if source.register is not None and not any(code_of(e) in NOT_STORED_CODES for e in errors or ()):
            await self.runtime.apq.put(source.register, source.query)


def failure_response(error: AtriumError, status: int, request_id: str, accept: str | None,
                     headers: dict[str, str] | None = None) -> Response:
    """A GraphQL error body for ``error`` with ``status``, in the media type ``accept`` asks for
    (``application/json`` when it names none Atrium answers), carrying the request id."""
    try:
        media = negotiate(accept)
    except HTTPError:
        media = JSON
    content_type = f"{GRAPHQL_RESPONSE_JSON}; charset=utf-8" if media == GRAPHQL_RESPONSE_JSON else JSON
    return Response(json.dumps(error_body(error)), status_code=status, media_type=content_type,
                    headers={**(headers or {}), "x-request-id": request_id})
