"""Database access: engines per URL and the one tenant-scoped transaction.

``Databases.tenant_transaction(tenant_id)`` (writes) and ``Databases.read_transaction(tenant_id,
user_id)`` (a request's reads) are the only code that sets tenant state in PostgreSQL: each begins a
transaction and runs ``set_config('app.tenant_id', $1, true)`` (transaction-local, so it can never
leak through the pool), or, for a request of a member, ``atrium_enter(tenant, user, role)``, which
does the same and returns the caller's membership, the tenant's data versions and the caller's view
of its records in that one statement (``Entry``). Every transaction also carries a viewer
(``models.visibility.View``: the member's user id, teams and what they see; the system's own work
sees everything), set beside the tenant for row-level security and bound to the application's
queries. ``TenantScope`` is a request's view of them: one connection at a time, statements
serialised by a lock because Strawberry resolves sibling fields (and their loader batches)
concurrently.

Outages (``models.outages``): a statement that finds PostgreSQL unreachable, restarting or gone
from under it raises ``ServiceUnavailable``, and its connection is discarded, never given back to
the pool. The pool keeps no pre-ping (a round trip per request); instead a pooled connection whose
server closed it (asyncpg saw the socket end, as after a restart) is replaced when it is checked
out, so a process serves again with the first request after PostgreSQL accepts connections.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg
from sqlalchemy import URL, ColumnElement, Executable, Row, Select, bindparam, event, func, select, text, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection, QueuePool

from core.errors import ServiceUnavailable
from core.pgurl import ASYNCPG, PgUrl, async_url
from core.settings import Settings
from models.outages import is_outage
from models.visibility import NOBODY, SETTINGS_SQL, SYSTEM, View, current_view, viewing

log = logging.getLogger("atrium.db")

SET_TENANT = text("SELECT set_config('app.tenant_id', :tenant_id, true)")
ENTER_SQL = "SELECT role, plan, tables, versions, teams, peers, restricted FROM atrium_enter($1, $2, $3)"
ENTER_MEMBER = text("SELECT role, teams, peers, restricted FROM atrium_enter(:tenant_id, :member, NULL)")
"""``ENTER_SQL`` for SQLAlchemy connections: work outside a request done as one member (an import job)."""
SET_VIEW = text("SELECT set_config('app.tenant_id', :tenant_id, true), set_config('atrium.user_id', :user_id, true), "
                "set_config('atrium.team_ids', :teams, true), set_config('atrium.sees_all', :sees_all, true)")
"""``models.visibility.SETTINGS_SQL`` for SQLAlchemy connections."""
SHOW_TRASH = text("SELECT set_config('atrium.trash', 'on', true)")
CUSTOM_PLANS = text("SET LOCAL plan_cache_mode = force_custom_plan")
DEFAULT_PLANS = text("SET LOCAL plan_cache_mode TO DEFAULT")
HIDE_TRASH = text("SELECT set_config('atrium.trash', 'off', true)")
TRASH_DEPTH = "atrium.trash.depth"
"""Key in a connection's ``info``: how many ``showing_trash`` blocks are open on it."""
TENANT_ROUTE = text("SELECT isolation, database_url FROM tenants WHERE id = :tenant_id")
DEDICATED_TENANTS = text("SELECT tenant_id FROM atrium_dedicated_tenants()")
READY_TIMEOUT = 2.0
"""Seconds a readiness check waits for the database before calling it down."""
CONNECT_TIMEOUT = 5.0
"""Seconds opening a connection may take by default (``Settings.db_connect_timeout_seconds``)."""
POOL_TIMEOUT = 5.0
"""Seconds a checkout may wait for a busy pool by default (``Settings.db_pool_timeout_seconds``)."""
"""Seconds a readiness check waits for the database before calling it down."""


def each_key(query: Select[Any], column: ColumnElement[Any], name: str) -> Select[Any]:
    """The rows of ``query`` whose ``column`` equals one of the values of the array parameter
    ``name`` (of the column's type), found key by key: ``SELECT found.* FROM unnest(:name) AS
    wanted(key) JOIN LATERAL (<query> AND column = wanted.key) AS found ON true``. Bulk writes (an
    import chunk of 1,000 keys, a batch of 500) look up many keys at once, in tables that may have
    grown by as many rows since PostgreSQL last counted them; ``column = ANY(:name)`` or
    ``column IN (SELECT unnest(:name))`` then leave the plan to those counts, and a table thought
    to hold a few rows is scanned whole and compared with every key (in a prepared statement's
    generic plan, ``= ANY`` of a parameter is not hashed), which grows with the square of the
    import. The lateral subquery, kept whole by ``OFFSET 0`` (PostgreSQL would otherwise flatten it
    into that same join), runs once per key and probes the column's index whatever the counts
    say. ``query``'s row locks (``FOR UPDATE``) apply to the rows found; order the result by
    ``statement.selected_columns``."""
    wanted = func.unnest(bindparam(name, type_=ARRAY(column.type))).table_valued("key").render_derived(name="wanted")
    found = query.where(column == wanted.c.key).offset(0).lateral("found")
    return select(found).select_from(wanted).join(found, true())


@asynccontextmanager
async def custom_plans(conn: AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """Statements inside the block are planned for their parameters' values each time they run
    (``plan_cache_mode = force_custom_plan``, transaction-local, back to the default after the
    block). For a long list of keys that no index can answer, ``column = ANY(:keys)`` in a
    prepared statement's generic plan compares every row with every key; planned for the values,
    the list is hashed, and the tenant's rows are read once (``each_key`` is for indexed keys)."""
    await conn.execute(CUSTOM_PLANS)
    try:
        yield conn
    finally:
        await conn.execute(DEFAULT_PLANS)


@asynccontextmanager
async def showing_trash(conn: AsyncConnection) -> AsyncIterator[AsyncConnection]:
    """Statements run inside the block also see (and may write) rows in the trash: the tenant
    policy of a trashable table (migration 0012) hides rows with ``deleted_at`` set unless the
    transaction's ``atrium.trash`` setting is ``on``. Set transaction-locally and turned off again
    when the block ends, so no other statement of the transaction sees the trash; a block that
    raises leaves a transaction that is rolled back. The application's own queries still say
    which rows they want (``Record.visible``): this lifts only the database's backstop. Blocks nest
    (the outermost one turns the setting off)."""
    depth: int = conn.info.get(TRASH_DEPTH, 0)
    if depth == 0:
        await conn.execute(SHOW_TRASH)
    conn.info[TRASH_DEPTH] = depth + 1
    try:
        yield conn
    finally:
        conn.info[TRASH_DEPTH] = depth
    if depth == 0:
        await conn.execute(HIDE_TRASH)


class Trashed(Protocol):
    @property
    def trash(self) -> bool:
        """Whether the record's rows go to the trash (``records.declare.Record.trash``)."""


@asynccontextmanager
async def trash_seen(conn: AsyncConnection, record: Trashed) -> AsyncIterator[AsyncConnection]:
    """``showing_trash`` for a record that has a trash; for any other, the block as it is."""
    if not record.trash:
        yield conn
        return
    async with showing_trash(conn):
        yield conn


class Unique(Trashed, Protocol):
    @property
    def name(self) -> str:
        """The record type's name (``records.declare.Record.name``), as ``View.restricted`` holds it."""


SEE_ALL = text("SELECT set_config('atrium.sees_all', 'on', true)")
SEE_OWN = text("SELECT set_config('atrium.sees_all', 'off', true)")


@asynccontextmanager
async def every_holder_seen(conn: AsyncConnection, record: Unique) -> AsyncIterator[AsyncConnection]:
    """For a check that a unique value is free: statements in the block see every row of ``record``
    in the tenant, those in the trash (``trash_seen``) and those record-level visibility hides from
    the transaction's viewer (``models.visibility``), since a value a hidden record holds is taken
    all the same, as the database's unique constraint would say; the check answers that it is used,
    never by which record. Lifted for the block only (a block that raises leaves a transaction that
    is rolled back)."""
    view = current_view()
    hidden = view is None or (not view.sees_all and record.name in view.restricted)
    async with trash_seen(conn, record):
        if not hidden:
            yield conn
            return
        await conn.execute(SEE_ALL)
        yield conn
        await conn.execute(SEE_OWN)


def create_engine(url: str, *, connect_timeout: float = CONNECT_TIMEOUT, **options: Any) -> AsyncEngine:
    """An asyncpg engine for a PostgreSQL URL as libpq reads it (``core.pgurl``): each connection is
    made by ``asyncpg.connect`` from the URL as written, TLS parameters and several hosts included.
    ``engine.url`` shows the first host and the credentials (for deriving other URLs).

    Opening a connection (TCP, TLS, startup, authentication; every host of the URL in turn) may take
    ``connect_timeout`` seconds, or the URL's own ``connect_timeout``: past it ``TimeoutError``, an
    outage (``models.outages``), so a host that silently drops packets is answered SERVICE_UNAVAILABLE
    within that bound instead of holding the request for asyncpg's default of 60 s."""
    parsed = PgUrl.parse(url)
    (host, port), *_ = parsed.endpoints()
    shown = URL.create(ASYNCPG, username=parsed.user, password=parsed.password,
                       host=None if host.startswith("/") else host, port=port, database=parsed.database)
    timeout = parsed.connect_timeout() or connect_timeout
    dsn = parsed.without("connect_timeout").dsn()

    async def connect() -> Any:
        return await asyncpg.connect(dsn, timeout=timeout)

    engine = create_async_engine(shown, async_creator=connect, **options)
    event.listen(engine.sync_engine, "checkout", _replace_closed)
    return engine


def _replace_closed(dbapi_connection: Any, record: ConnectionPoolEntry, proxy: PoolProxiedConnection) -> None:
    """A pooled connection the server has closed (a restart, a terminated backend) is replaced on checkout.

    asyncpg notices the end of the socket as soon as the server closes it, idle or not, so this costs
    no round trip; raising ``DisconnectionError`` makes the pool connect afresh in its place.
    """
    if dbapi_connection.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


async def _end(conn: AsyncConnection, end: Callable[[], Awaitable[None]], *, quiet: bool = False) -> None:
    """Commit or roll back with ``end``; a connection that fails to is discarded (not given back to the
    pool), and the failure raised unless ``quiet`` (a rollback on the way out of a failure)."""
    try:
        await end()
    except BaseException as exc:
        await conn.invalidate()
        if not quiet or not isinstance(exc, Exception):
            raise


@dataclass(frozen=True)
class Entry:
    """What entering a tenant as a user found: the membership's role and the tenant's plan (None when
    the user is not a member), and the tenant's data versions (a table never written is absent)."""

    role: str | None
    plan: str | None
    versions: Mapping[str, int]
    view: View = NOBODY
    """Whose records the member sees (``models.visibility``); nobody's restricted ones when not a member."""

    def version(self, table: str) -> int:
        return self.versions.get(table, 0)


@dataclass(frozen=True)
class Home:
    """A database holding tenants' rows (``Databases.homes``)."""

    engine: AsyncEngine
    tenants: frozenset[uuid.UUID]
    """Shared: the dedicated tenants (whose rows are elsewhere); dedicated: the tenants living here."""
    shared: bool

    def holds(self, tenant_id: uuid.UUID) -> bool:
        """Whether ``tenant_id``'s rows live here (the shared registry also lists dedicated tenants)."""
        return (tenant_id not in self.tenants) if self.shared else (tenant_id in self.tenants)


class Databases:
    """Engines for the shared database and for tenants with a dedicated one.

    A tenant whose row says ``isolation = 'dedicated'`` is routed to its own ``database_url`` (same
    schema, same RLS, same application role). Routes are cached for the life of the process.
    """

    def __init__(self, app_url: str, *, pool_size: int = 10, connect_timeout: float = CONNECT_TIMEOUT,
                 pool_timeout: float = POOL_TIMEOUT) -> None:
        """Pools of ``pool_size`` connections (and as many overflow) per database; opening one may take
        ``connect_timeout`` seconds, waiting for one while all are busy ``pool_timeout`` seconds: either
        bound passed is an outage, answered SERVICE_UNAVAILABLE (``models.outages``)."""
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self.default = self._make_engine(app_url)
        self._engines: dict[str, AsyncEngine] = {app_url: self.default}
        self._routes: dict[uuid.UUID, AsyncEngine] = {}
        self._lookups: dict[uuid.UUID, asyncio.Future[AsyncEngine]] = {}
        self._readers: dict[AsyncEngine, AsyncEngine] = {}
        """Each engine in autocommit mode (same pool): what read transactions run SQLAlchemy statements on."""

    @classmethod
    def of(cls, settings: Settings, url: str | None = None) -> Databases:
        """The databases a server or worker process uses: ``url`` (by default the application role's),
        with the pool size and timeouts of ``settings``."""
        return cls(url or settings.app_url, pool_size=settings.pool_size,
                   connect_timeout=settings.db_connect_timeout_seconds, pool_timeout=settings.db_pool_timeout_seconds)

    def _make_engine(self, url: str) -> AsyncEngine:
        # Last in, first out: requests reuse the connections used last, whose prepared statements and
        # introspected types are warm, and the ones left idle are the ones to let go.
        return create_engine(url, connect_timeout=self._connect_timeout, pool_size=self._pool_size,
                             max_overflow=self._pool_size, pool_timeout=self._pool_timeout, pool_pre_ping=False,
                             pool_use_lifo=True)

    def pool_usage(self) -> tuple[int, int]:
        """(connections checked out, connections kept open) over every engine's pool."""
        pools = [engine.sync_engine.pool for engine in self._engines.values()]
        return (sum(p.checkedout() for p in pools if isinstance(p, QueuePool)),
                sum(p.size() for p in pools if isinstance(p, QueuePool)))

    async def engine_for(self, tenant_id: uuid.UUID) -> AsyncEngine:
        """The engine holding ``tenant_id``'s data (the shared one unless the tenant is dedicated).

        A tenant's route is looked up once per process; concurrent first requests of one tenant share
        that lookup, and lookups of different tenants do not wait for each other.
        """
        engine = self._routes.get(tenant_id)
        if engine is not None:
            return engine
        lookup = self._lookups.get(tenant_id)
        if lookup is None:
            lookup = asyncio.ensure_future(self._route(tenant_id))
            self._lookups[tenant_id] = lookup
            lookup.add_done_callback(lambda done: self._looked_up(tenant_id, done))
        return await asyncio.shield(lookup)

    def _looked_up(self, tenant_id: uuid.UUID, lookup: asyncio.Future[AsyncEngine]) -> None:
        self._lookups.pop(tenant_id, None)
        if not lookup.cancelled():
            lookup.exception()  # retrieved: a failure is raised to the waiting requests, not logged again

    async def _route(self, tenant_id: uuid.UUID) -> AsyncEngine:
        async with self.default.connect() as conn, conn.begin():
            await conn.execute(SET_TENANT, {"tenant_id": str(tenant_id)})
            route = (await conn.execute(TENANT_ROUTE, {"tenant_id": tenant_id})).first()
        engine = self.default
        if route is not None and route.isolation == "dedicated" and route.database_url:
            url = async_url(route.database_url)
            engine = self._engines.get(url) or self._engines.setdefault(url, self._make_engine(url))
        self._routes[tenant_id] = engine
        return engine

    async def homes(self) -> list[Home]:
        """Every database holding tenants' rows: the shared one, then each dedicated one (once), with
        which tenants' rows each holds; what jobs over every tenant (retention, abandoned exports)
        visit. One statement, plus a route lookup per dedicated tenant (cached, as for requests)."""
        async with self.default.connect() as conn:
            dedicated = frozenset((await conn.execute(DEDICATED_TENANTS)).scalars().all())
            await conn.commit()
        routed: dict[AsyncEngine, set[uuid.UUID]] = {}
        for tenant in sorted(dedicated):
            routed.setdefault(await self.engine_for(tenant), set()).add(tenant)
        return [Home(self.default, dedicated, shared=True),
                *(Home(engine, frozenset(tenants), shared=False)
                  for engine, tenants in routed.items() if engine is not self.default)]

    @asynccontextmanager
    async def tenant_transaction(self, tenant_id: uuid.UUID, *, isolation: str | None = None,
                                 view: View = SYSTEM, home: Home | None = None) -> AsyncIterator[AsyncConnection]:
        """A transaction in which PostgreSQL sees only ``tenant_id``'s rows, and of those the ones
        ``view`` may see (default: the system's, every one), in row-level security and in the
        application's filter alike (``models.visibility``).

        Commits when the block exits normally, rolls back when it raises. ``isolation`` (e.g.
        ``"REPEATABLE READ"``: one snapshot for every statement) replaces the server's default.
        ``home``: the tenant's database as ``homes`` found it (no route lookup).
        """
        engine = home.engine if home is not None else await self.engine_for(tenant_id)
        async with engine.connect() as conn:
            if isolation is not None:
                await conn.execution_options(isolation_level=isolation)
            async with conn.begin():
                await set_view(conn, tenant_id, view)
                with viewing(view):
                    yield conn

    @asynccontextmanager
    async def read_transaction(self, tenant_id: uuid.UUID, user_id: uuid.UUID | None, *, role: str | None = None,
                               view: View = NOBODY) -> AsyncIterator[tuple[AsyncConnection, Any, Entry | None]]:
        """A request's read transaction for ``tenant_id``: ``(conn, driver, entry)``.

        The transaction is the asyncpg driver's own (``BEGIN``/``COMMIT`` sent by the driver, not
        through SQLAlchemy's per-statement machinery, which shows in a request's profile); ``conn``
        runs SQLAlchemy statements inside it (in autocommit mode, so it begins no transaction of its
        own). With ``user_id`` the first statement is ``atrium_enter``: it sets the tenant and returns
        the user's membership (its role capped by ``role``), the tenant's data versions and the member's
        view (``entry``); without, ``set_config`` of the tenant and ``view``.
        Committed on normal exit (reads change nothing), rolled back when the block raises. A
        connection on which beginning, committing or rolling back failed is discarded.
        """
        engine = await self.engine_for(tenant_id)
        reader = self._readers.get(engine)
        if reader is None:
            reader = self._readers[engine] = engine.execution_options(isolation_level="AUTOCOMMIT")
        conn, driver, transaction = await self._begin(reader)
        try:
            try:
                entry = None
                if user_id is None:
                    await driver.execute(SETTINGS_SQL, *view.settings(tenant_id))
                else:
                    row = await driver.fetchrow(ENTER_SQL, tenant_id, user_id, role)
                    # Not a member: the tenant is set all the same, but its versions are not read.
                    entry = Entry(None, None, {}) if row is None else \
                        Entry(row["role"], row["plan"], dict(zip(row["tables"], row["versions"], strict=True)),
                              entered_view(user_id, row))
            except BaseException:
                await _end(conn, transaction.rollback, quiet=True)
                raise
            try:
                yield conn, driver, entry
            except BaseException:
                await _end(conn, transaction.rollback, quiet=True)
                raise
            await _end(conn, transaction.commit)
        finally:
            await conn.close()

    @staticmethod
    async def _begin(reader: AsyncEngine) -> tuple[AsyncConnection, Any, Any]:
        """A pooled connection with the driver's transaction begun on it: ``(conn, driver, transaction)``.

        A pooled connection can be gone without the pool knowing (the server ended it while it sat
        idle, and asyncpg has read the server's farewell but not yet the socket's end): ``BEGIN``
        then fails before anything ran, so that connection is discarded and another one tried, once.
        A connection whose ``BEGIN`` failed is never reused (asyncpg may still count a transaction
        as open on it).
        """
        for attempt in (1, 2):
            conn = await reader.connect()
            try:
                driver = (await conn.get_raw_connection()).driver_connection
                transaction = driver.transaction()  # type: ignore[union-attr]
                await transaction.start()
            except BaseException as exc:
                await conn.invalidate()
                await conn.close()
                if attempt == 2 or not isinstance(exc, Exception) or not is_outage(exc):
                    raise
                log.info("discarded a pooled connection the server had ended: %s", _describe(exc))
                continue
            return conn, driver, transaction
        raise AssertionError("unreachable")

    async def reachable(self) -> bool:
        """Whether the shared database answers a statement within ``READY_TIMEOUT`` seconds (readiness)."""
        try:
            async with asyncio.timeout(READY_TIMEOUT), self.default.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:
            if not is_outage(exc):
                raise
            return False
        return True

    async def dispose(self) -> None:
        # Route lookups still under way (shielded from their callers' cancellation) would add engines
        # while they are disposed: they end first.
        lookups = list(self._lookups.values())
        for lookup in lookups:
            lookup.cancel()
        await asyncio.gather(*lookups, return_exceptions=True)
        for engine in list(self._engines.values()):
            await engine.dispose()


async def set_view(conn: AsyncConnection, tenant_id: uuid.UUID, view: View) -> None:
    """Set the transaction's tenant and ``view`` (row-level security's half of ``models.visibility``)."""
    tenant, user, teams, sees_all = view.settings(tenant_id)
    await conn.execute(SET_VIEW, {"tenant_id": tenant, "user_id": user, "teams": teams, "sees_all": sees_all})


def entered_view(user_id: uuid.UUID, row: Any) -> View:
    """The view ``atrium_enter`` returned (an admin's or owner's has no peers: they see all)."""
    return View(user_id=user_id, teams=frozenset(row["teams"]), peers=frozenset(row["peers"]),
                restricted=frozenset(row["restricted"]), sees_all=not row["peers"])


T = TypeVar("T")


async def _uninterrupted(work: Coroutine[Any, Any, T]) -> T:
    """``work`` run to its end even if the caller is cancelled (its outcome is then discarded)."""
    task = asyncio.ensure_future(work)
    task.add_done_callback(_retrieve)
    return await asyncio.shield(task)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # seen: a failure nobody waits for any more is not logged as unretrieved


class ScopeClosed(RuntimeError):
    """A statement was asked of a request scope that has been closed."""


class _Abandoned(Exception):
    """Thrown into a read transaction to end it with a rollback instead of a commit."""


class TenantScope:
    """One request's database access for one tenant.

    Reads share one lazily begun tenant transaction; ``write()`` ends it and runs a transaction of
    its own that commits when the block exits. Only one statement runs at a time.

    ``hold()`` makes the whole request one transaction instead (what exactly-once retries need: a
    change and the answer stored for its retries commit together): each ``write()`` is then a
    savepoint of the read transaction (a failed one undoes only itself), and nothing commits before
    ``commit()``: ``rollback()`` or ``close()`` without it undo everything held. Work that must
    follow a commit (publishing change events) is handed to ``after_commit`` and runs after the
    commit that makes the change durable, whichever it is.

    A read is never interrupted half way: when its caller is cancelled (the executor drops the
    siblings of a field whose error nulls their parent), the statement still runs to its end under
    the lock, so the connection is never left with a statement in progress, and ``close`` (itself
    never interrupted) waits for it. After ``close`` no read begins a transaction again: a load
    still queued when the request ended (a batch whose waiters were all cancelled) fails with
    ``ScopeClosed`` instead of taking a connection nobody would give back.

    Outages: a statement that fails because PostgreSQL cannot be reached or dropped the connection
    (``models.outages.is_outage``) raises ``ServiceUnavailable``; the transaction is then over and
    its connection discarded, and every later statement of the scope raises ``ServiceUnavailable``
    at once, never beginning another transaction (a request sees one snapshot, and a held request
    never commits half of itself). ``close`` never raises for an outage.
    """

    def __init__(self, databases: Databases, tenant_id: uuid.UUID, view: View = NOBODY) -> None:
        self.tenant_id = tenant_id
        self.view = view
        """Whose records every transaction of the scope sees (``models.visibility``): given, or what
        ``enter`` found."""
        self._databases = databases
        self._lock = asyncio.Lock()
        self._read: AsyncExitStack | None = None
        self._read_conn: AsyncConnection | None = None
        self._driver: Any = None
        self._writing = False
        self._closed = False
        self._broken = False
        self._held: list[Callable[[], Awaitable[None]]] | None = None
        self.entry: Entry | None = None
        """What ``enter`` found (None until then)."""

    async def fetch(self, statement: Executable, params: dict[str, Any] | None = None) -> Sequence[Row[Any]]:
        """Run a read statement in the request's tenant transaction and return all rows.

        Inside ``write()`` use its connection instead: reading here would wait for the write's lock.
        """
        if self._writing:
            raise RuntimeError("fetch() inside write(): use the write's connection")
        return await _uninterrupted(self._fetch(statement, params))

    async def _fetch(self, statement: Executable, params: dict[str, Any] | None) -> Sequence[Row[Any]]:
        async with self._lock, self._outages():
            if self._read_conn is None:
                await self._begin_read()
            assert self._read_conn is not None
            with viewing(self.view):
                return (await self._read_conn.execute(statement, params)).all()

    async def fetch_trash(self, statement: Executable, params: dict[str, Any] | None = None) -> Sequence[Row[Any]]:
        """``fetch`` with the trash shown for this one statement (``showing_trash``): the statement
        itself must say which trashed rows it wants."""
        if self._writing:
            raise RuntimeError("fetch_trash() inside write(): use the write's connection")
        return await _uninterrupted(self._fetch_trash(statement, params))

    async def _fetch_trash(self, statement: Executable, params: dict[str, Any] | None) -> Sequence[Row[Any]]:
        async with self._lock:
            if self._read_conn is None:
                await self._begin_read()
            assert self._read_conn is not None
            async with showing_trash(self._read_conn) as conn:
                with viewing(self.view):
                    return (await conn.execute(statement, params)).all()

    async def fetch_raw(self, sql: str, args: Sequence[Any]) -> Any:
        """Run compiled SQL (asyncpg placeholders ``$1``...) in the request's tenant transaction on the
        driver connection directly, and return its one row: no SQLAlchemy result processing. asyncpg
        prepares each statement text once per connection and reuses it."""
        if self._writing:
            raise RuntimeError("fetch_raw() inside write(): use the write's connection")
        return await _uninterrupted(self._fetch_raw(sql, args))

    async def _fetch_raw(self, sql: str, args: Sequence[Any]) -> Any:
        async with self._lock, self._outages():
            if self._read_conn is None:
                await self._begin_read()
            return await self._driver.fetchrow(sql, *args)

    async def enter(self, user_id: uuid.UUID, role: str | None = None) -> Entry:
        """Begin the read transaction as ``user_id`` (its role capped by ``role``): its first statement
        sets the tenant and the member's view and returns the membership, the data versions and the
        view (``Entry``, kept as ``entry``; the view becomes the scope's). Must come first."""
        async with self._lock:
            if self._read_conn is not None or self._closed:
                raise RuntimeError("enter() must be the scope's first statement")
            async with self._outages():
                entry = await self._begin_read(user_id, role)
            assert entry is not None
            self.entry = entry
            self.view = entry.view
            return entry

    @asynccontextmanager
    async def _outages(self) -> AsyncIterator[None]:
        """Around every statement (under the lock): refused once an outage broke the scope; an outage
        ends the transaction, discarding its connection, and is raised as ``ServiceUnavailable``."""
        if self._broken:
            raise ServiceUnavailable()
        try:
            yield
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._broken = True
            self._held = None
            log.warning("database unavailable (tenant %s): %s", self.tenant_id, _describe(exc))
            await self._end_read(commit=False)
            raise ServiceUnavailable() from exc

    async def _begin_read(self, user_id: uuid.UUID | None = None, role: str | None = None) -> Entry | None:
        """Begin the read transaction (``Databases.read_transaction``); its entry when ``user_id`` is given."""
        if self._closed:
            raise ScopeClosed("the request's database access has ended")
        stack = AsyncExitStack()
        try:
            self._read_conn, self._driver, entry = await stack.enter_async_context(
                self._databases.read_transaction(self.tenant_id, user_id, role=role, view=self.view))
        except BaseException:
            await stack.aclose()
            raise
        self._read = stack
        return entry

    async def _end_read(self, *, commit: bool = True) -> None:
        """End the read transaction: commit it, or roll it back (a failing rollback only discards the connection)."""
        stack, self._read, self._read_conn, self._driver = self._read, None, None, None
        if stack is None:
            return
        if commit:
            await stack.aclose()
        else:
            await stack.__aexit__(_Abandoned, _Abandoned(), None)

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A tenant transaction for one change: committed on normal exit, rolled back on error (held:
        a savepoint, released or rolled back, committed by ``commit()``)."""
        async with self._lock, self._outages():
            if self._held is not None:
                if self._read_conn is None:
                    await self._begin_read()
                conn = self._read_conn
                assert conn is not None
                async with conn.begin_nested():
                    self._writing = True
                    try:
                        with viewing(self.view):
                            yield conn
                    finally:
                        self._writing = False
                return
            await self._end_read()
            if self._closed:
                raise ScopeClosed("the request's database access has ended")
            async with self._databases.tenant_transaction(self.tenant_id, view=self.view) as conn:
                self._writing = True
                try:
                    yield conn
                finally:
                    self._writing = False

    def hold(self) -> None:
        """From now on, one transaction for the whole request, committed by ``commit()`` (class docstring)."""
        if self._held is None:
            self._held = []

    async def after_commit(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` once what was written so far has committed: now, or after ``commit()`` when held."""
        if self._held is None:
            await work()
        else:
            self._held.append(work)

    async def commit(self) -> None:
        """Commit the held transaction and run the work waiting for it; the scope reads on in a new one.

        ``ServiceUnavailable`` when the commit was cut off: it may or may not have happened, and the
        waiting work is dropped."""
        async with self._lock, self._outages():
            await self._end_read()
        waiting, self._held = self._held or [], None
        for work in waiting:
            await work()

    async def rollback(self) -> None:
        """Undo the held transaction, dropping the work waiting for its commit; the scope reads on in a new one."""
        async with self._lock:
            self._held = None
            await self._end_read(commit=False)

    async def close(self) -> None:
        """Release the connection (idempotent); no statement runs after this. Reads are committed, a
        held transaction that was not committed is rolled back. Never interrupted by cancellation."""
        await _uninterrupted(self._close())

    async def _close(self) -> None:
        async with self._lock:
            self._closed = True
            commit, self._held = self._held is None, None
            try:
                await self._end_read(commit=commit)
            except Exception as exc:
                if not is_outage(exc):
                    raise
                # Only reads were left to commit: nothing is lost, and the connection was discarded.
                log.info("read transaction ended by an outage (tenant %s): %s", self.tenant_id, _describe(exc))


def _describe(exc: BaseException) -> str:
    """One line for the log: the exception's type and message, and what it wraps."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    cause = exc.__cause__
    return text if cause is None else f"{text} (from {_describe(cause)})"
