"""wrk requests files for ``bench.compare``: the same requests, tenant by tenant, for Atrium and the peer.

A requests file holds one HTTP request per line, which ``bench/wrk.lua`` replays in rotation:
``name<TAB>value[<TAB>name<TAB>value ...]<TAB>JSON body``. Consecutive lines belong to different
tenants, so a run spreads over all of them. Cases (``build``):

- ``dashboard``: the peer's dashboard selection (its ``queries/dashboard.graphql``; Atrium:
  :data:`ATRIUM_DASHBOARD`, the same fields under Atrium's names) at ``first: 50``, one line per
  tenant with that tenant's owner token.
- ``readme``: Atrium's own README dashboard (``bench.dashboard.DASHBOARD``); the peer gets its dashboard.
- ``deal``: one deal by id (peer: ``queries/deal.graphql``), the tenant's 10 largest deals.
- ``mix``: per tenant, a fixed 10-slot cycle of 3 dashboards, 4 deal pages, 2 deal-list pages (page 2
  to 5 of 20, by cursor) and one write, sent by the tenant's members in turn: 10 % writes, each a title
  update of one of the tenant's deals ranked 51-100 by amount (10 deals per tenant, 500 in all), to a
  title unique to the request (:data:`UNIQUE`, which ``bench/wrk.lua`` fills in), so every write changes
  the row (Atrium skips updates that change nothing). On Atrium the reads are persisted documents
  (APQ: hash only; register the texts first with :func:`registrations`) and carry ``Atrium-Cache: on``.

Tokens: Atrium's are ``auth.tokens.issue_token`` for the members seeded by ``bench.dashboard``
(HS256, ``bench.dashboard.SECRET``); the peer's are HS256 JWTs with a ``tenant_id`` claim, what its
``harness.mjs`` ``mintToken`` makes (secret ``PEER_JWT_SECRET``, default its development secret).
Deal ids and cursors are asked from a running server. Run from Atrium's checkout:

    python -m bench.requests deal --server atrium --url http://127.0.0.1:8841/graphql > atrium-deal.tsv
    python -m bench.requests mix --server peer --url http://127.0.0.1:5678/graphql > peer-mix.tsv
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt

from auth.tokens import issue_token
from bench.dashboard import DASHBOARD, SECRET, seeded_tenants
from core.pgurl import libpq_url
from core.settings import Settings
from models.tables import Role

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = Path(os.environ.get("PEER_DIR", ROOT.parent / "shared" / "peers" / "postgraphile"))
SERVER = "postgresql://root@127.0.0.1:5432"
ATRIUM_DB = "atrium_bench_50x1000"
PEER_DB = "peerbench"
PEER_DEV_SECRET = "peerbench-development-secret-not-for-production"  # the peer's defaults.mjs
TOKEN_TTL = 4 * 3600
FIRST = 50
DEALS_PER_TENANT = 10
CATALOG = 100
"""Deals per tenant fetched (largest first) for deal pages, list cursors and writes."""
PAGE = 20
MIX_CYCLE = "DPLPDPLDPW"
"""One tenant's mix, slot by slot: D dashboard, P deal page, L deal-list page, W a write."""
MIX_ROUNDS = 10 * len(MIX_CYCLE)
UNIQUE = "{{unique}}"
"""Replaced in every request by a value of its own (bench/wrk.lua; :func:`unique_body` here)."""
EDIT = re.compile(r" \(edit [^)]*\)$")
"""The suffix the mix's writes give a title."""
CASES = ("dashboard", "readme", "deal", "mix")

ATRIUM_DASHBOARD = """
query Dashboard($first: Int = 50) {
  deals(first: $first, orderBy: {field: AMOUNT, direction: DESC}) {
    nodes {
      id title amount currency expectedCloseDate
      company { name }
      contact { firstName lastName email }
      owner { name }
      stage { name }
      activities(first: 3) { body occurredAt }
    }
  }
}
"""
ATRIUM_DEAL = """
query Deal($id: ID!) {
  deal(id: $id) {
    id title amount currency expectedCloseDate status version
    company { name }
    contact { firstName lastName email }
    owner { name }
    stage { name }
  }
}
"""
ATRIUM_PAGE = """
query DealPage($first: Int!, $after: String) {
  deals(first: $first, after: $after, orderBy: {field: AMOUNT, direction: DESC}) {
    edges { cursor node { id title amount currency status company { name } owner { name } stage { name } } }
    pageInfo { hasNextPage endCursor }
  }
}
"""
PEER_PAGE = """
query DealPage($first: Int!, $after: Cursor) {
  allDeals(first: $first, after: $after, orderBy: AMOUNT_DESC) {
    edges { cursor node { id title amount currency status company { name } owner { name } stage { name } } }
    pageInfo { hasNextPage endCursor }
  }
}
"""
ATRIUM_UPDATE = """
mutation UpdateDeal($id: ID!, $title: String!) { updateDeal(id: $id, input: {title: $title}) { id title } }
"""
PEER_UPDATE = """
mutation UpdateDeal($id: ID!, $title: String!) {
  updateDeal(input: {id: $id, dealPatch: {title: $title}}) { deal { id title } }
}
"""
ATRIUM_CATALOG = """
query Catalog($first: Int!) {
  deals(first: $first, orderBy: {field: AMOUNT, direction: DESC}) { edges { cursor node { id title } } }
}
"""
PEER_CATALOG = """
query Catalog($first: Int!) { allDeals(first: $first, orderBy: AMOUNT_DESC) { edges { cursor node { id title } } } }
"""


@dataclass(frozen=True)
class Dialect:
    """One server's documents for the benchmark's requests."""

    name: str
    dashboard: str
    readme: str
    deal: str
    page: str
    update: str
    catalog: str
    connection: str
    """The root field of the deal list (``deals`` / ``allDeals``)."""
    persisted: bool
    """Send reads of the mix as persisted documents with ``Atrium-Cache: on``."""


ATRIUM = Dialect("atrium", ATRIUM_DASHBOARD, DASHBOARD, ATRIUM_DEAL, ATRIUM_PAGE, ATRIUM_UPDATE, ATRIUM_CATALOG,
                 "deals", persisted=True)


def peer_dialect(peer_dir: Path = PEER_DIR) -> Dialect:
    """The peer's documents: its own dashboard and deal queries, and list/update under its names."""
    dashboard = (peer_dir / "queries" / "dashboard.graphql").read_text()
    deal = (peer_dir / "queries" / "deal.graphql").read_text()
    return Dialect("peer", dashboard, dashboard, deal, PEER_PAGE, PEER_UPDATE, PEER_CATALOG, "allDeals",
                   persisted=False)


@dataclass(frozen=True)
class Tenant:
    """A tenant's bearer tokens: every member's (owner first) and those allowed to write."""

    key: str
    readers: tuple[str, ...]
    writers: tuple[str, ...]


@dataclass(frozen=True)
class Deal:
    id: str
    title: str
    cursor: str


@dataclass(frozen=True)
class Line:
    """One request of a requests file (``tenant``: whose); ``document``: the text a hash-only body names."""

    kind: str
    tenant: str
    headers: tuple[tuple[str, str], ...]
    body: dict[str, Any]
    document: str | None = None

    def tsv(self) -> str:
        fields = [part for header in self.headers for part in header]
        return "\t".join([*fields, json.dumps(self.body)])

    def unique_body(self) -> str:
        """The JSON body as one request sends it: :data:`UNIQUE` filled in like bench/wrk.lua does."""
        return json.dumps(self.body).replace(UNIQUE, uuid.uuid4().hex)


def database_url(name: str, server: str = SERVER) -> str:
    return f"{server}/{name}"


def sha256_hex(document: str) -> str:
    return hashlib.sha256(document.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Tokens


def atrium_settings(url: str) -> Settings:
    return Settings(env="production", database_url=url, jwt_secret=SECRET)


async def atrium_owners(url: str) -> list[Tenant]:
    """The bench tenants of Atrium's database at ``url`` (seeding order), each with its owner's token."""
    settings = atrium_settings(url)
    tenants = await seeded_tenants(url, 0)
    tokens = [issue_token(settings, user_id=t.owner.user_id, tenant_id=t.tenant_id, role=Role.OWNER,
                          ttl_seconds=TOKEN_TTL) for t in tenants]
    return [Tenant(str(t.tenant_id), (tok,), (tok,)) for t, tok in zip(tenants, tokens, strict=True)]


async def atrium_members(url: str) -> list[Tenant]:
    """The bench tenants with a token for every member; viewers only read."""
    settings = atrium_settings(url)
    order = [str(t.tenant_id) for t in await seeded_tenants(url, 0)]
    conn = await asyncpg.connect(libpq_url(url))
    try:
        rows = await conn.fetch(
            "SELECT m.tenant_id, m.user_id, m.role FROM memberships m JOIN users u ON u.id = m.user_id"
            " ORDER BY m.tenant_id, m.role <> 'owner', u.email")
    finally:
        await conn.close()
    readers: dict[str, list[str]] = {key: [] for key in order}
    writers: dict[str, list[str]] = {key: [] for key in order}
    for row in rows:
        key = str(row["tenant_id"])
        if key not in readers:
            continue
        role = Role(row["role"])
        token = issue_token(settings, user_id=row["user_id"], tenant_id=row["tenant_id"], role=role,
                            ttl_seconds=TOKEN_TTL)
        readers[key].append(token)
        if role is not Role.VIEWER:
            writers[key].append(token)
    return [Tenant(key, tuple(readers[key]), tuple(writers[key])) for key in order]


def peer_token(tenant_id: str, user: str) -> str:
    """What the peer's ``mintToken`` makes (HS256, claim ``tenant_id``), with ``user`` as the subject."""
    now = int(time.time())
    secret = os.environ.get("PEER_JWT_SECRET", PEER_DEV_SECRET)
    payload = {"tenant_id": tenant_id, "sub": user, "iat": now, "exp": now + TOKEN_TTL}
    return jwt.encode(payload, secret, algorithm="HS256")


async def peer_tenants(url: str, users: int = 1) -> list[Tenant]:
    """The peer's tenants in its own order (tenant-1, tenant-2, ...), each with ``users`` tokens.

    The peer has no users or roles in its tokens; several tokens per tenant only make the rotation
    (and the JWT verification per request) the same as Atrium's.
    """
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id::text FROM crm.tenants"
                                " ORDER BY nullif(regexp_replace(slug, '\\D', '', 'g'), '')::int NULLS LAST, slug")
    finally:
        await conn.close()
    tenants = []
    for row in rows:
        tokens = tuple(peer_token(row["id"], f"user-{k}") for k in range(users))
        tenants.append(Tenant(row["id"], tokens, tokens))
    return tenants


# --------------------------------------------------------------------------------------------------
# Deals, from the running server


async def catalogs(dialect: Dialect, url: str, tenants: Sequence[Tenant]) -> list[list[Deal]]:
    """Each tenant's :data:`CATALOG` largest deals, with their list cursors, asked from the server at ``url``."""
    async with httpx.AsyncClient(timeout=60) as client:
        return [await catalog(client, dialect, url, t) for t in tenants]


async def catalog(client: httpx.AsyncClient, dialect: Dialect, url: str, tenant: Tenant) -> list[Deal]:
    r = await client.post(url, json={"query": dialect.catalog, "variables": {"first": CATALOG}},
                          headers={"authorization": f"Bearer {tenant.readers[0]}"})
    body = r.json()
    if r.status_code != 200 or body.get("errors"):
        raise RuntimeError(f"cannot list the deals of tenant {tenant.key} on {url}: {r.text[:300]}")
    return [Deal(e["node"]["id"], EDIT.sub("", e["node"]["title"]), e["cursor"])
            for e in body["data"][dialect.connection]["edges"]]


# --------------------------------------------------------------------------------------------------
# Lines


def bearer(token: str) -> tuple[str, str]:
    return ("Authorization", f"Bearer {token}")


def plain(kind: str, tenant: str, token: str, query: str, variables: dict[str, Any]) -> Line:
    return Line(kind, tenant, (bearer(token),), {"query": query, "variables": variables})


def read(dialect: Dialect, kind: str, tenant: str, token: str, query: str, variables: dict[str, Any]) -> Line:
    """A read of the mix: on Atrium a hash-only persisted document with ``Atrium-Cache: on``."""
    if not dialect.persisted:
        return plain(kind, tenant, token, query, variables)
    extensions = {"persistedQuery": {"version": 1, "sha256Hash": sha256_hex(query)}}
    return Line(kind, tenant, (bearer(token), ("Atrium-Cache", "on")),
                {"variables": variables, "extensions": extensions}, document=query)


def dashboard_lines(tenants: Sequence[Tenant], query: str) -> list[Line]:
    return [plain("dashboard", t.key, t.readers[0], query, {"first": FIRST}) for t in tenants]


def deal_lines(dialect: Dialect, tenants: Sequence[Tenant], deals: Sequence[Sequence[Deal]]) -> list[Line]:
    return [plain("deal", t.key, t.readers[0], dialect.deal, {"id": d.id})
            for t, own in zip(tenants, deals, strict=True) for d in own[:DEALS_PER_TENANT]]


def mix_lines(dialect: Dialect, tenants: Sequence[Tenant], deals: Sequence[Sequence[Deal]]) -> list[Line]:
    """:data:`MIX_ROUNDS` rounds; in each, every tenant's next slot of :data:`MIX_CYCLE` (see the module doc)."""
    lines: list[Line] = []
    for r in range(MIX_ROUNDS):
        for t, (tenant, own) in enumerate(zip(tenants, deals, strict=True)):
            slot = MIX_CYCLE[(r + t) % len(MIX_CYCLE)]
            reader = tenant.readers[(r + t) % len(tenant.readers)]
            if slot == "D":
                lines.append(read(dialect, "dashboard", tenant.key, reader, dialect.dashboard, {"first": FIRST}))
            elif slot == "P":
                deal_id = own[(7 * r + t) % len(own)].id
                lines.append(read(dialect, "deal", tenant.key, reader, dialect.deal, {"id": deal_id}))
            elif slot == "L":
                after = own[PAGE * (1 + r % 4) - 1].cursor
                lines.append(read(dialect, "list", tenant.key, reader, dialect.page, {"first": PAGE, "after": after}))
            else:
                deal = own[FIRST + (37 * (r // len(MIX_CYCLE)) + t) % (len(own) - FIRST)]
                writer = tenant.writers[(r + t) % len(tenant.writers)]
                title = f"{deal.title} (edit {UNIQUE})"
                lines.append(plain("update", tenant.key, writer, dialect.update, {"id": deal.id, "title": title}))
    return lines


def registrations(lines: Iterable[Line]) -> list[Line]:
    """One line per persisted document of ``lines``, carrying its text: send these once before a run."""
    seen: dict[str, Line] = {}
    for line in lines:
        if line.document is not None and line.document not in seen:
            seen[line.document] = Line(line.kind, line.tenant, line.headers, {**line.body, "query": line.document})
    return list(seen.values())


def window(lines: Sequence[Line], start: int, count: int) -> list[Line]:
    """``count`` lines from ``start``, wrapping around."""
    return [lines[(start + i) % len(lines)] for i in range(min(count, len(lines)))]


def warm_up_lines(lines: Sequence[Line], count: int) -> list[Line]:
    """One line for every tenant of the first ``count`` lines: a later line of that tenant when there is one.

    Sending these first warms every tenant of ``window(lines, 0, count)`` (per-tenant look-ups, prepared
    statements) without repeating its requests, whose answers a cache could then serve.
    """
    chosen = window(lines, 0, count)
    tenants = {line.tenant for line in chosen}
    picked: dict[str, Line] = {}
    for line in [*lines[len(chosen):], *chosen]:
        if line.tenant in tenants:
            picked.setdefault(line.tenant, line)
    return list(picked.values())


def write_file(path: Path, lines: Iterable[Line]) -> int:
    count = 0
    with path.open("w") as out:
        for line in lines:
            out.write(line.tsv() + "\n")
            count += 1
    return count


# --------------------------------------------------------------------------------------------------
# One case for one server


async def build(case: str, dialect: Dialect, url: str, database: str, *, users: int = 8) -> list[Line]:
    """The lines of ``case`` for the server of ``dialect`` answering at ``url``, reading tenants from ``database``.

    ``users``: tokens per peer tenant in the mix (Atrium's mix uses every seeded member).
    """
    if dialect.persisted:
        tenants = await (atrium_members(database) if case == "mix" else atrium_owners(database))
    else:
        tenants = await peer_tenants(database, users if case == "mix" else 1)
    if not tenants:
        raise RuntimeError(f"no tenants in {database}")
    if case in ("dashboard", "readme"):
        return dashboard_lines(tenants, dialect.dashboard if case == "dashboard" else dialect.readme)
    deals = await catalogs(dialect, url, tenants)
    return deal_lines(dialect, tenants, deals) if case == "deal" else mix_lines(dialect, tenants, deals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=CASES)
    parser.add_argument("--server", choices=("atrium", "peer"), required=True)
    parser.add_argument("--url", help="the running server (default: 127.0.0.1:8841 / :5678)")
    parser.add_argument("--db", help=f"database URL (default: {database_url(ATRIUM_DB)} / {database_url(PEER_DB)})")
    parser.add_argument("--users", type=int, default=8, help="tokens per peer tenant in the mix")
    parser.add_argument("--registrations", action="store_true",
                        help="write the APQ registration lines of the case instead (Atrium's mix)")
    args = parser.parse_args()
    atrium = args.server == "atrium"
    dialect = ATRIUM if atrium else peer_dialect()
    url = args.url or ("http://127.0.0.1:8841/graphql" if atrium else "http://127.0.0.1:5678/graphql")
    db = args.db or database_url(ATRIUM_DB if atrium else PEER_DB)
    lines = asyncio.run(build(args.case, dialect, url, db, users=args.users))
    for line in registrations(lines) if args.registrations else lines:
        sys.stdout.write(line.tsv() + "\n")


if __name__ == "__main__":
    main()
