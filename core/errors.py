"""Errors Atrium reports to clients, each with a stable ``extensions.code``.

The tree::

    AtriumError                      (base: message, code, optional field)
    ├── Unauthenticated              UNAUTHENTICATED   no, malformed, expired or wrongly signed credential
    ├── Forbidden                    FORBIDDEN         the role lacks the permission
    ├── NotFound                     NOT_FOUND         no such record *in this tenant*
    ├── BadUserInput                 BAD_USER_INPUT    names the offending ``field``
    ├── VersionConflict              VERSION_CONFLICT  carries ``currentVersion``
    ├── RateLimited                  RATE_LIMITED      carries ``retryAfter`` (seconds)
    ├── ServiceUnavailable           SERVICE_UNAVAILABLE  PostgreSQL (or Redis) unreachable (HTTP 503, ``retryAfter``)
    ├── QueryTooComplex              QUERY_TOO_COMPLEX carries ``cost`` and ``maximumCost``; refused before execution
    ├── PersistedQueryNotFound       PERSISTED_QUERY_NOT_FOUND
    ├── PersistedQueryRequired       PERSISTED_QUERY_REQUIRED
    ├── BadRequest                   BAD_REQUEST       a malformed GraphQL-over-HTTP request (HTTP 4xx)
    ├── IdempotencyKeyInUse          IDEMPOTENCY_KEY_IN_USE  its first request still runs (HTTP 409)
    ├── IdempotencyKeyReused         IDEMPOTENCY_KEY_REUSED  the key came with another request (HTTP 422)
    ├── SubscriberTooSlow            SUBSCRIBER_TOO_SLOW  a subscriber fell too far behind; its stream ends
    ├── Overloaded                   SERVICE_UNAVAILABLE  the process is at capacity (HTTP 503, ``Retry-After``)
    └── Internal                     INTERNAL          anything unexpected; the message never leaks details

GraphQL's own errors get GRAPHQL_PARSE_FAILED or GRAPHQL_VALIDATION_FAILED (``schema.extensions``).
Every error body any transport sends is built here (``AtriumError.formatted``, ``error_body``), so
HTTP, WebSocket and pre-execution refusals look the same.

graphql-core copies ``AtriumError.extensions`` onto the GraphQL error it wraps, so resolvers simply
``raise NotFound("deal", id)``; ``schema.extensions.ErrorCoding`` masks everything that is not an
``AtriumError`` as ``INTERNAL``.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    BAD_USER_INPUT = "BAD_USER_INPUT"
    VERSION_CONFLICT = "VERSION_CONFLICT"
    RATE_LIMITED = "RATE_LIMITED"
    PERSISTED_QUERY_NOT_FOUND = "PERSISTED_QUERY_NOT_FOUND"
    PERSISTED_QUERY_REQUIRED = "PERSISTED_QUERY_REQUIRED"
    QUERY_TOO_COMPLEX = "QUERY_TOO_COMPLEX"
    BAD_REQUEST = "BAD_REQUEST"
    INTERNAL = "INTERNAL"
    GRAPHQL_VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
    GRAPHQL_PARSE_FAILED = "GRAPHQL_PARSE_FAILED"
    SUBSCRIBER_TOO_SLOW = "SUBSCRIBER_TOO_SLOW"
    IDEMPOTENCY_KEY_IN_USE = "IDEMPOTENCY_KEY_IN_USE"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"


class AtriumError(Exception):
    """An error whose message is safe to show to the caller."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.extra = extra

    @property
    def extensions(self) -> dict[str, Any]:
        ext: dict[str, Any] = {"code": self.code.value}
        if self.field is not None:
            ext["field"] = self.field
        ext.update(self.extra)
        return ext

    def within(self, prefix: str, **extra: Any) -> AtriumError:
        """This error about a place inside ``prefix``: its field (and the message naming it) gets the
        prefix (``amount`` -> ``input.3.amount``; no field: ``input.3``), so does the message
        (``input.3.amount: must not be negative``, ``input.3: No deal with this id``), and ``extra``
        joins the extensions (``index=3``). Changes the error in place and returns it, to re-raise."""
        old = self.field
        self.field = prefix + old if old is not None else prefix.rstrip(".")
        if old is not None and self.message.startswith(f"{old}: "):
            self.message = f"{self.field}: {self.message[len(old) + 2:]}"
        else:
            self.message = f"{prefix.rstrip('.')}: {self.message}"
        self.args = (self.message,)
        self.extra.update(extra)
        return self

    def formatted(self) -> dict[str, Any]:
        """The error as a GraphQL response's ``errors`` entry (no location or path: a request error)."""
        return {"message": self.message, "extensions": self.extensions}


def error_body(*errors: AtriumError) -> dict[str, Any]:
    """A GraphQL response holding only ``errors`` (nothing was executed)."""
    return {"errors": [error.formatted() for error in errors]}


class Unauthenticated(AtriumError):
    code = ErrorCode.UNAUTHENTICATED

    def __init__(self, message: str = "Authentication required") -> None:
        super().__init__(message)


class Forbidden(AtriumError):
    code = ErrorCode.FORBIDDEN

    def __init__(self, message: str = "Your role does not allow this") -> None:
        super().__init__(message)


class HiddenField(AtriumError):
    """FORBIDDEN: a field rule of the tenant hides ``field`` (a record's field, or a filter, ordering,
    group, measure or input naming it) from the caller's role (``auth.fields``)."""

    code = ErrorCode.FORBIDDEN

    def __init__(self, field: str, record_type: str, name: str, role: str) -> None:
        super().__init__(f"{field}: {record_type}.{name} is hidden from your role ({role})", field=field)


class NotFound(AtriumError):
    code = ErrorCode.NOT_FOUND

    def __init__(self, entity: str, id: object | None = None, *, field: str | None = "id") -> None:
        super().__init__(f"No {entity} with this id", field=field)
        self.entity = entity
        self.id = id


class BadUserInput(AtriumError):
    code = ErrorCode.BAD_USER_INPUT

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)


class VersionConflict(AtriumError):
    code = ErrorCode.VERSION_CONFLICT

    def __init__(self, entity: str, current_version: int, current: dict[str, Any] | None = None) -> None:
        extra: dict[str, Any] = {"currentVersion": current_version}
        if current is not None:
            extra["current"] = current
        super().__init__(
            f"The {entity} was changed by someone else (now at version {current_version})",
            field="expectedVersion",
            **extra,
        )


class RateLimited(AtriumError):
    code = ErrorCode.RATE_LIMITED

    def __init__(self, retry_after: float) -> None:
        super().__init__("Rate limit exceeded", retryAfter=retry_after)


OUTAGE_RETRY_AFTER = 1
"""Seconds a client is told to wait after an outage answer: a process serves again within one
second of the database accepting connections."""


class ServiceUnavailable(AtriumError):
    """A service Atrium depends on (PostgreSQL, or Redis for what needs it) could not be reached or
    dropped the connection: what depended on it did not happen (a write whose commit was cut off
    may have committed: retry it with its ``Idempotency-Key``). Answered 503 with ``Retry-After``."""

    code = ErrorCode.SERVICE_UNAVAILABLE

    def __init__(self, retry_after: int = OUTAGE_RETRY_AFTER) -> None:
        super().__init__("The service is temporarily unavailable; retry shortly", retryAfter=retry_after)
        self.retry_after = retry_after


class QueryTooComplex(AtriumError):
    """The operation's cost (computed from the document and its variables) is above what may run at once."""

    code = ErrorCode.QUERY_TOO_COMPLEX

    def __init__(self, cost: int, maximum: int) -> None:
        super().__init__(f"Operation cost {cost} exceeds the maximum of {maximum}", cost=cost, maximumCost=maximum)


class BadRequest(AtriumError):
    """A request that is not well-formed GraphQL over HTTP (answered with ``status``, never executed)."""

    code = ErrorCode.BAD_REQUEST

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class IdempotencyKeyInUse(AtriumError):
    """Another request with the same ``Idempotency-Key`` has not finished: retry it later (HTTP 409)."""

    code = ErrorCode.IDEMPOTENCY_KEY_IN_USE

    def __init__(self) -> None:
        super().__init__("A request with this Idempotency-Key is still being processed; retry it shortly",
                         retryAfter=1)


class IdempotencyKeyReused(AtriumError):
    """The ``Idempotency-Key`` was first sent with another request body (HTTP 422): use a new key."""

    code = ErrorCode.IDEMPOTENCY_KEY_REUSED

    def __init__(self) -> None:
        super().__init__("This Idempotency-Key was used for a different request; send a new key")


class PersistedQueryNotFound(AtriumError):
    code = ErrorCode.PERSISTED_QUERY_NOT_FOUND

    def __init__(self) -> None:
        super().__init__("PersistedQueryNotFound")


class PersistedQueryRequired(AtriumError):
    code = ErrorCode.PERSISTED_QUERY_REQUIRED

    def __init__(self) -> None:
        super().__init__("This credential may only run persisted documents")


class ValidationFailed(AtriumError):
    """The document is not valid for this request (e.g. several operations and no ``operationName``)."""

    code = ErrorCode.GRAPHQL_VALIDATION_FAILED


class SubscriberTooSlow(AtriumError):
    """The subscriber's queue overflowed: events were dropped, so the stream ends."""

    code = ErrorCode.SUBSCRIBER_TOO_SLOW

    def __init__(self) -> None:
        super().__init__("Subscriber too slow: events were dropped. Subscribe again and refetch.")


class Overloaded(AtriumError):
    """This process has as many operations running and waiting as it may (``atrium.http.admission``):
    nothing ran; retry after ``retryAfter`` seconds, or on another process (HTTP 503)."""

    code = ErrorCode.SERVICE_UNAVAILABLE

    def __init__(self, retry_after: int) -> None:
        super().__init__("The server is at capacity; retry shortly", retryAfter=retry_after)


class Internal(AtriumError):
    code = ErrorCode.INTERNAL

    def __init__(self, request_id: str | None = None) -> None:
        extra = {"requestId": request_id} if request_id else {}
        super().__init__("Internal server error", **extra)
