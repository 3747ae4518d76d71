"""PostgreSQL URLs as libpq reads them (and as managed providers hand them out), for asyncpg.

``postgresql://user:password@host1:5432,host2:5433/database?sslmode=verify-full&sslrootcert=ca.pem``:
asyncpg understands this form itself (``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``,
``sslpassword``, ``target_session_attrs``, several hosts, ``host=``/``port=`` parameters for unix
sockets; any other parameter, such as ``application_name``, is sent as a server setting), so a
URL is handed to ``asyncpg.connect`` as it was written (``PgUrl.dsn``). SQLAlchemy's own URL parser
is never asked: it reads neither several hosts nor these parameters as asyncpg does (it passed
``sslmode`` to ``connect()`` as a keyword, a ``TypeError``). ``models.db.create_engine`` makes
engines from these URLs.

Accepted schemes: ``postgresql``, ``postgres`` and the SQLAlchemy spellings ``postgresql+<driver>``.
Nothing here ever puts the password in a message (``describe``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode

SCHEME = re.compile(r"^(postgres|postgresql)(\+[a-z0-9]+)?://", re.IGNORECASE)
ASYNCPG = "postgresql+asyncpg"


@dataclass(frozen=True)
class PgUrl:
    """A parsed PostgreSQL URL; ``hosts`` is the host list as written (``h1:5432,h2``)."""

    user: str | None
    password: str | None
    hosts: str
    database: str | None
    query: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> PgUrl:
        """ValueError (without the URL, which may hold a password) when ``url`` is not a PostgreSQL URL."""
        match = SCHEME.match(url.strip())
        if match is None:
            raise ValueError("expected a PostgreSQL URL such as postgresql://user:password@host:5432/database")
        rest = url.strip()[match.end():]
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        user = password = None
        if at:
            name, colon, secret = userinfo.partition(":")
            user, password = unquote(name) or None, unquote(secret) if colon else None
        return cls(user=user, password=password, hosts=hosts, database=unquote(path) or None,
                   query=tuple(parse_qsl(query, keep_blank_values=True)))

    def with_user(self, user: str | None, password: str | None = None) -> PgUrl:
        return dataclasses.replace(self, user=user, password=password)

    def with_database(self, database: str) -> PgUrl:
        return dataclasses.replace(self, database=database)

    def param(self, name: str) -> str | None:
        return next((value for key, value in self.query if key == name), None)

    def without(self, name: str) -> PgUrl:
        """The URL without the parameter ``name`` (one read here rather than by asyncpg)."""
        return dataclasses.replace(self, query=tuple((k, v) for k, v in self.query if k != name))

    def connect_timeout(self) -> float | None:
        """libpq's ``connect_timeout`` in seconds, when the URL gives a positive one (asyncpg does not
        read it: it would send it to the server as a setting)."""
        raw = self.param("connect_timeout")
        try:
            seconds = float(raw) if raw is not None else 0.0
        except ValueError:
            raise ValueError("connect_timeout must be a number of seconds") from None
        return seconds if seconds > 0 else None

    def _render(self, scheme: str) -> str:
        auth = ""
        if self.user is not None:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        database = "/" + quote(self.database, safe="") if self.database else "/"
        query = "?" + urlencode(self.query, safe="/") if self.query else ""
        return f"{scheme}://{auth}{self.hosts}{database}{query}"

    def dsn(self) -> str:
        """The libpq form, for ``asyncpg.connect`` (and psql)."""
        return self._render("postgresql")

    def sqlalchemy(self) -> str:
        """The same URL spelled for SQLAlchemy's asyncpg dialect (how settings keep it)."""
        return self._render(ASYNCPG)

    def endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of each server the URL names, as libpq defaults them (a unix socket directory
        given as ``host=`` counts as a host)."""
        default_port = int(self.param("port") or 5432)
        listed = [h for h in self.hosts.split(",") if h] or [self.param("host") or "localhost"]
        out = []
        for item in listed:
            host, port = item, default_port
            if item.startswith("["):  # [::1]:5432
                host, _, tail = item[1:].partition("]")
                port = int(tail[1:]) if tail.startswith(":") and tail[1:].isdigit() else default_port
            elif item.count(":") == 1:
                host, _, text = item.partition(":")
                port = int(text) if text.isdigit() else default_port
            out.append((host, port))
        return out

    def describe(self) -> str:
        """Where the URL points, for messages: ``host:port[, host:port] database 'name'`` (no password)."""
        where = ", ".join(f"{host}:{port}" for host, port in self.endpoints())
        return f"{where} database {self.database or self.user or 'postgres'!r}" + (
            f" as {self.user!r}" if self.user else "")


def async_url(url: str) -> str:
    """``url`` spelled for SQLAlchemy's asyncpg dialect, everything else kept as written."""
    return PgUrl.parse(url).sqlalchemy()


def libpq_url(url: str) -> str:
    """``url`` as libpq and asyncpg read it (no ``+driver``)."""
    return PgUrl.parse(url).dsn()


def with_user(url: str, user: str, password: str | None = None) -> str:
    """``url`` (any accepted spelling) with another user, in SQLAlchemy's asyncpg spelling."""
    return PgUrl.parse(url).with_user(user, password).sqlalchemy()
