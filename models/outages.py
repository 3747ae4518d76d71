"""Which failures are outages: a service Atrium depends on could not be reached or dropped the connection.

``is_outage(exc)`` is true when ``exc`` (or what it wraps: SQLAlchemy's ``orig``, ``raise ... from``)
says PostgreSQL or Redis is unreachable, restarting, shutting down, refusing connections, or closed
the connection under a statement: a socket error or timeout, PostgreSQL's connection errors (class
08), ``the database system is starting up / shutting down`` and ``terminating connection``
(57P01-57P03), ``too many connections`` (53300), a connection asyncpg found gone before the
statement could be sent (``unusable_connection``), a connection SQLAlchemy invalidated as
disconnected, an exhausted pool's timeout, and Redis' connection and timeout errors. Everything
else (a statement PostgreSQL refused, a bug) is not an outage, so it stays INTERNAL and is logged
as the fault it is.

Outages are answered SERVICE_UNAVAILABLE (``core.errors.ServiceUnavailable``): ``models.db`` raises
it where statements run; the transports also classify what escapes elsewhere with this function.
"""

from __future__ import annotations

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from core.errors import ServiceUnavailable

POSTGRES_OUTAGES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # 08xxx, and asyncpg's "connection was closed in the middle of operation"
    asyncpg.CannotConnectNowError,  # 57P03: starting up, shutting down, in recovery
    asyncpg.AdminShutdownError,  # 57P01: terminating connection due to administrator command
    asyncpg.CrashShutdownError,  # 57P02: terminating connection because of crash of another server process
    asyncpg.TooManyConnectionsError,  # 53300
)
TRANSPORT_OUTAGES: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, unknown host (socket.gaierror)
    TimeoutError,  # connecting took too long
    DisconnectionError,
    PoolTimeout,  # every pooled connection busy for the pool's whole timeout
    RedisConnectionError,
    RedisTimeoutError,
)

OUTAGES: tuple[type[BaseException], ...] = (ServiceUnavailable, *POSTGRES_OUTAGES, *TRANSPORT_OUTAGES)


def unusable_connection(exc: BaseException) -> bool:
    """Whether asyncpg refused to run a statement at all because its connection is gone: closed
    (``connection is closed``), or holding an error the server sent unasked. PostgreSQL sends one
    only as it ends a connection (``terminating connection due to administrator command`` at a
    shutdown); asyncpg reads it between statements, and until it also reads the end of the socket,
    refuses every operation with ``cannot switch to state N; another operation (2) is in progress``
    (2 is its error-consuming state): no statement overlapped another, the server had left."""
    if isinstance(exc, asyncpg.InterfaceError):
        return "connection is closed" in str(exc)
    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith("cannot switch to state")


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means a service Atrium depends on is unavailable (module docstring)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OUTAGES):
            return True
        if unusable_connection(current):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        wrapped = current.orig if isinstance(current, DBAPIError) else None
        current = wrapped if isinstance(wrapped, BaseException) else current.__cause__
    return False
