"""Authentication: bearer tokens (HS256 secret, RS256 via JWKS), anonymous access, login, error hygiene.

A present but bad credential is answered with HTTP 401 and one UNAUTHENTICATED error before any
execution (never a 500, never data); no credential at all is anonymous, where only ``login`` works.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from sqlalchemy.ext.asyncio import AsyncEngine

from atrium.app import create_app
from atrium.ops.admin import add_user
from auth.tokens import TokenVerifier, issue_token
from core.clock import ManualClock
from core.errors import Unauthenticated
from core.ids import to_global_id
from core.settings import Settings
from models.tables import Role
from tests.conftest import TenantWorld, codes, data_or_fail, gql

ME = "{ me { id email role } tenant { id slug } }"
LEAKS = ("traceback", "sqlalchemy", "asyncpg", 'file "')


# --- token helpers -------------------------------------------------------------------------------

def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None = None) -> str:
    """A JWT put together by hand (for tokens PyJWT refuses to make); ``sign(signing_input) -> bytes``."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode())) if sign else ''}"


def claims(world: TenantWorld, who: Role = Role.MEMBER, **changes: Any) -> dict[str, Any]:
    """Valid claims of the ``who`` user of ``world``; a change to ``None`` drops that claim."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": str(world.users[who]), "tenant": str(world.id), "role": who.value,
        "aud": world.settings.jwt_audience, "iss": world.settings.jwt_issuer, "iat": now, "exp": now + 300,
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def hs256(world: TenantWorld, payload: dict[str, Any], secret: str | None = None) -> str:
    return jwt.encode(payload, secret or world.settings.jwt_secret, algorithm="HS256")


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def assert_unauthorized(body: dict[str, Any]) -> None:
    """HTTP 401, exactly one UNAUTHENTICATED error, no data, nothing internal in the message."""
    assert body["_status"] == 401, body
    assert codes(body) == ["UNAUTHENTICATED"], body
    assert body.get("data") is None
    assert not any(leak in json.dumps(body).lower() for leak in LEAKS), body


# --- malformed and bad credentials ---------------------------------------------------------------

@pytest.mark.parametrize("authorization", [
    "Basic x", "Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc", "Bearer not-a-jwt", "Bearer a.b.c",
    "Bearer ....", "Bearernot-a-jwt",
])
async def test_malformed_authorization_header(client: httpx.AsyncClient, authorization: str) -> None:
    response = await client.post("/graphql", json={"query": ME}, headers={"authorization": authorization})
    body = response.json()
    body["_status"] = response.status_code
    assert_unauthorized(body)
    assert response.headers["www-authenticate"] == "Bearer"


BAD_TOKENS: dict[str, Callable[[TenantWorld], str]] = {
    "expired": lambda w: w.token(Role.MEMBER, ttl_seconds=-10),
    "wrong-secret": lambda w: hs256(w, claims(w), secret="another-secret-" + uuid.uuid4().hex),
    "wrong-audience": lambda w: hs256(w, claims(w, aud="someone-else")),
    "no-audience": lambda w: hs256(w, claims(w, aud=None)),
    "alg-none": lambda w: compact({"alg": "none", "typ": "JWT"}, claims(w)),
    "alg-None-signed": lambda w: compact({"alg": "None", "typ": "JWT"}, claims(w),
                                         lambda m: hmac.digest(w.settings.jwt_secret.encode(), m, hashlib.sha256)),
    "alg-hs512": lambda w: compact({"alg": "HS512", "typ": "JWT"}, claims(w),
                                   lambda m: hmac.digest(w.settings.jwt_secret.encode(), m, hashlib.sha512)),
    "no-tenant": lambda w: hs256(w, claims(w, tenant=None)),
    "no-sub": lambda w: hs256(w, claims(w, sub=None)),
    "no-role": lambda w: hs256(w, claims(w, role=None)),
    "no-exp": lambda w: hs256(w, claims(w, exp=None)),
    "unknown-role": lambda w: hs256(w, claims(w, role="superuser")),
    "uppercase-role": lambda w: hs256(w, claims(w, role="OWNER")),
    "tenant-not-uuid": lambda w: hs256(w, claims(w, tenant=w.slug)),
    "sub-not-uuid": lambda w: hs256(w, claims(w, sub="alice")),
    "tenant-not-string": lambda w: hs256(w, claims(w, tenant=["x"])),
    "signature-stripped": lambda w: w.token(Role.MEMBER).rsplit(".", 1)[0] + ".",
    "payload-tampered": lambda w: _tampered(w),
    "rs256-without-jwks": lambda w: jwt.encode(claims(w), new_rsa_key(), algorithm="RS256", headers={"kid": "k1"}),
}


def _tampered(world: TenantWorld) -> str:
    """A member's valid token with its payload swapped for an owner's (signature kept)."""
    header, _, signature = world.token(Role.MEMBER).split(".")
    payload = b64(json.dumps(claims(world, Role.OWNER)).encode())
    return f"{header}.{payload}.{signature}"


@pytest.mark.parametrize("make_token", list(BAD_TOKENS.values()), ids=list(BAD_TOKENS))
async def test_bad_token_is_401(client: httpx.AsyncClient, make_tenant: Any,
                                make_token: Callable[[TenantWorld], str]) -> None:
    world = await make_tenant("badtok")
    body = await gql(client, ME, token=make_token(world))
    assert_unauthorized(body)


async def test_bad_token_is_401_for_mutations_too(client: httpx.AsyncClient, make_tenant: Any) -> None:
    """A bad credential is refused before execution: the mutation never runs, even ``login``."""
    world = await make_tenant("badmut")
    expired = world.token(Role.OWNER, ttl_seconds=-10)
    body = await gql(client, 'mutation { createCompany(input: {name: "Ghost"}) { id } }', token=expired)
    assert_unauthorized(body)
    body = await gql(client, 'mutation { login(email: "a@b.c", password: "x", tenant: "t") { token } }',
                     token=expired)
    assert_unauthorized(body)
    companies = data_or_fail(await gql(client, "{ companies { totalCount } }", token=world.token(Role.OWNER)))
    assert companies["companies"]["totalCount"] == 0


async def test_wrong_issuer_is_401(client: httpx.AsyncClient, make_tenant: Any) -> None:
    """``iss`` is a documented claim with a configured expected value (ATRIUM_JWT_ISSUER): it must match."""
    world = await make_tenant("iss")
    body = await gql(client, ME, token=hs256(world, claims(world, iss="https://evil.example")))
    assert_unauthorized(body)


async def test_valid_token_and_scheme_case(client: httpx.AsyncClient, make_tenant: Any) -> None:
    world = await make_tenant("good")
    token = world.token(Role.ADMIN)
    expected = {"me": {"id": to_global_id("User", world.users[Role.ADMIN]), "email": f"admin@{world.slug}.example",
                       "role": "ADMIN"},
                "tenant": {"id": to_global_id("Tenant", world.id), "slug": world.slug}}
    for authorization in (f"Bearer {token}", f"bearer {token}", f"  BEARER   {token}  "):
        body = await gql(client, ME, headers={"authorization": authorization})
        assert body["_status"] == 200
        assert data_or_fail(body) == expected


# --- anonymous -----------------------------------------------------------------------------------

@pytest.mark.parametrize("query", [
    "{ me { id } }", "{ tenant { slug } }", "{ deals { totalCount } }", "{ auditEvents { totalCount } }",
    'mutation { createCompany(input: {name: "Anon"}) { id } }',
    'mutation { addMember(input: {email: "a@b.example", name: "A", role: OWNER}) { id } }',
])
async def test_anonymous_fields_are_unauthenticated(client: httpx.AsyncClient, query: str) -> None:
    body = await gql(client, query)
    assert body["_status"] == 200
    assert codes(body) == ["UNAUTHENTICATED"], body
    assert body.get("data") is None


async def test_empty_authorization_header_is_anonymous(client: httpx.AsyncClient) -> None:
    body = await gql(client, "{ me { id } }", headers={"authorization": ""})
    assert body["_status"] == 200
    assert codes(body) == ["UNAUTHENTICATED"]


# --- login ---------------------------------------------------------------------------------------

LOGIN = """mutation($e: String!, $p: String!, $t: String!) {
  login(email: $e, password: $p, tenant: $t) { token expiresAt user { id email role } tenant { id slug } }
}"""


async def login(client: httpx.AsyncClient, email: str, password: str, tenant: str) -> dict[str, Any]:
    return await gql(client, LOGIN, {"e": email, "p": password, "t": tenant})


def unique_email(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}@people.example"


async def test_login_returns_a_working_token(client: httpx.AsyncClient, make_tenant: Any,
                                             admin_engine: AsyncEngine, settings: Settings) -> None:
    world = await make_tenant("login")
    email = unique_email("sam")
    user_id = await add_user(admin_engine, world.id, email, "Sam", Role.MEMBER, "correct horse battery")
    before = time.time()
    payload = data_or_fail(await login(client, email, "correct horse battery", world.slug))["login"]
    assert payload["user"] == {"id": to_global_id("User", user_id), "email": email, "role": "MEMBER"}
    assert payload["tenant"] == {"id": to_global_id("Tenant", world.id), "slug": world.slug}
    decoded = jwt.decode(payload["token"], settings.jwt_secret, algorithms=["HS256"], audience=settings.jwt_audience)
    assert decoded["sub"] == str(user_id)
    assert decoded["tenant"] == str(world.id)
    assert decoded["role"] == "member"
    assert before + settings.token_ttl_seconds - 5 <= decoded["exp"] <= time.time() + settings.token_ttl_seconds + 1

    me = data_or_fail(await gql(client, ME, token=payload["token"]))
    assert me == {"me": payload["user"], "tenant": payload["tenant"]}
    # The email and the slug are matched case-insensitively and trimmed.
    again = data_or_fail(await login(client, f"  {email.upper()} ", "correct horse battery", world.slug.upper()))
    assert again["login"]["user"]["id"] == payload["user"]["id"]


async def test_login_failures_look_the_same(client: httpx.AsyncClient, make_tenant: Any,
                                            admin_engine: AsyncEngine) -> None:
    """Wrong password, unknown email, someone else's workspace: one answer, so nothing can be enumerated."""
    home = await make_tenant("home")
    elsewhere = await make_tenant("elsewhere")
    email = unique_email("kim")
    await add_user(admin_engine, home.id, email, "Kim", Role.OWNER, "s3cret-password")
    attempts = {
        "wrong password": (email, "not-the-password", home.slug),
        "empty password": (email, "", home.slug),
        "unknown email": (unique_email("nobody"), "s3cret-password", home.slug),
        "real tenant, not a member": (email, "s3cret-password", elsewhere.slug),
        "no such tenant": (email, "s3cret-password", f"missing-{uuid.uuid4().hex[:8]}"),
        "member without a password": (f"owner@{home.slug}.example", "", home.slug),
        "member without a password, some password": (f"owner@{home.slug}.example", "anything", home.slug),
    }
    answers = {}
    for name, (e, p, t) in attempts.items():
        body = await login(client, e, p, t)
        assert codes(body) == ["UNAUTHENTICATED"], (name, body)
        assert body.get("data") is None, name
        answers[name] = (body["_status"], body["errors"][0]["message"], body["errors"][0]["extensions"])
    assert len(set(map(repr, answers.values()))) == 1, answers
    status, message, _ = next(iter(answers.values()))
    assert status == 200
    assert message == "Invalid email, password or workspace"
    # And the right password still works afterwards.
    data_or_fail(await login(client, email, "s3cret-password", home.slug))


async def test_login_is_scoped_to_the_tenant_asked_for(client: httpx.AsyncClient, make_tenant: Any,
                                                       admin_engine: AsyncEngine) -> None:
    first = await make_tenant("first")
    second = await make_tenant("second")
    email = unique_email("dual")
    user_id = await add_user(admin_engine, first.id, email, "Dual", Role.MEMBER, "pw-for-both")
    assert await add_user(admin_engine, second.id, email, "Dual", Role.ADMIN, "pw-for-both") == user_id

    # A deal in the first tenant only.
    owner = first.token(Role.OWNER)
    stage = data_or_fail(await gql(client, """mutation { createPipeline(input: {name: "P",
        stages: [{name: "S", probability: "0.5"}]}) { stages { id } } }""", token=owner))["createPipeline"]["stages"][0]
    deal = data_or_fail(await gql(client, """mutation($s: ID!) { createDeal(input: {title: "First's deal",
        amount: "5", currency: "USD", stageId: $s}) { id } }""", {"s": stage["id"]}, token=owner))["createDeal"]["id"]

    query = """query($d: ID!) { me { id role } tenant { slug } deals { totalCount }
        deal(id: $d) { id } node(id: $d) { id } }"""

    to_second = data_or_fail(await login(client, email, "pw-for-both", second.slug))["login"]
    assert to_second["tenant"]["slug"] == second.slug
    assert to_second["user"]["role"] == "ADMIN"
    seen = data_or_fail(await gql(client, query, {"d": deal}, token=to_second["token"]))
    assert seen == {"me": {"id": to_global_id("User", user_id), "role": "ADMIN"}, "tenant": {"slug": second.slug},
                    "deals": {"totalCount": 0}, "deal": None, "node": None}

    to_first = data_or_fail(await login(client, email, "pw-for-both", first.slug))["login"]
    assert to_first["tenant"]["slug"] == first.slug
    seen = data_or_fail(await gql(client, query, {"d": deal}, token=to_first["token"]))
    assert seen == {"me": {"id": to_global_id("User", user_id), "role": "MEMBER"}, "tenant": {"slug": first.slug},
                    "deals": {"totalCount": 1}, "deal": {"id": deal}, "node": {"id": deal}}


# --- RS256 through a JWKS endpoint ---------------------------------------------------------------

@dataclass(frozen=True)
class Jwks:
    url: str
    key: rsa.RSAPrivateKey
    kid: str


@pytest.fixture(scope="module")
def jwks() -> Iterator[Jwks]:
    """A JWKS document with one RSA key, served over HTTP from a thread on 127.0.0.1 (read-only, shared)."""
    key = new_rsa_key()
    kid = f"kid-{uuid.uuid4().hex[:8]}"
    jwk: dict[str, Any] = RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    document = json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="jwks", daemon=True)
    thread.start()
    try:
        yield Jwks(url=f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json", key=key, kid=kid)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
async def jwks_client(settings: Settings, jwks: Jwks) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a separate app whose verifier reads RS256 keys from the ``jwks`` server."""
    application = create_app(dataclasses.replace(settings, jwks_url=jwks.url))
    async with application.router.lifespan_context(application), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url="http://atrium-jwks.test") as c:
        yield c


def rs256(payload: dict[str, Any], key: rsa.RSAPrivateKey, kid: str | None) -> str:
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid} if kid else None)


async def test_rs256_token_from_jwks(jwks_client: httpx.AsyncClient, jwks: Jwks, make_tenant: Any) -> None:
    world = await make_tenant("jwks")
    body = await gql(jwks_client, "{ me { id role } tenant { slug } deals { totalCount } }",
                     token=rs256(claims(world, Role.VIEWER), jwks.key, jwks.kid))
    assert body["_status"] == 200
    assert data_or_fail(body) == {"me": {"id": to_global_id("User", world.users[Role.VIEWER]), "role": "VIEWER"},
                                  "tenant": {"slug": world.slug}, "deals": {"totalCount": 0}}


RS256_BAD: dict[str, Callable[[TenantWorld, Jwks], str]] = {
    "other-key-same-kid": lambda w, j: rs256(claims(w), new_rsa_key(), j.kid),
    "other-key-unknown-kid": lambda w, j: rs256(claims(w), new_rsa_key(), "kid-unknown"),
    "right-key-unknown-kid": lambda w, j: rs256(claims(w), j.key, "kid-unknown"),
    "wrong-audience": lambda w, j: rs256(claims(w, aud="someone-else"), j.key, j.kid),
    "expired": lambda w, j: rs256(claims(w, exp=int(time.time()) - 10), j.key, j.kid),
    "unknown-role": lambda w, j: rs256(claims(w, role="root"), j.key, j.kid),
    "no-tenant": lambda w, j: rs256(claims(w, tenant=None), j.key, j.kid),
    # Algorithm confusion: HMAC keyed with the public key that the JWKS publishes.
    "hs256-keyed-with-public-key": lambda w, j: compact(
        {"alg": "HS256", "typ": "JWT", "kid": j.kid}, claims(w),
        lambda m: hmac.digest(j.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), m, hashlib.sha256)),
}


@pytest.mark.parametrize("make_token", list(RS256_BAD.values()), ids=list(RS256_BAD))
async def test_rs256_bad_token_is_401(jwks_client: httpx.AsyncClient, jwks: Jwks, make_tenant: Any,
                                      make_token: Callable[[TenantWorld, Jwks], str]) -> None:
    world = await make_tenant("jwksbad")
    assert_unauthorized(await gql(jwks_client, ME, token=make_token(world, jwks)))


# --- error hygiene -------------------------------------------------------------------------------

def assert_no_internals(response_text: str, *, sent: str = "") -> None:
    """No traceback, driver or SQL text in a response (unless the caller sent that SQL word itself)."""
    if "SELECT" not in sent:
        assert "SELECT" not in response_text
    lowered = response_text.lower()
    for leak in LEAKS:
        assert leak not in lowered, response_text


@pytest.mark.parametrize(("query", "variables", "code"), [
    ("query($n: Int) { deals(first: $n) { totalCount } }", {"n": "ten"}, "BAD_USER_INPUT"),
    ("query($n: Int) { deals(first: $n) { totalCount } }", {"n": 2**40}, "BAD_USER_INPUT"),
    ("query($d: ID!) { deal(id: $d) { id } }", {}, "BAD_USER_INPUT"),
    ("query($d: ID!) { deal(id: $d) { id } }", {"d": None}, "BAD_USER_INPUT"),
    ("query($f: DealFilter) { deals(filter: $f) { totalCount } }", {"f": {"status": ["MAYBE"]}}, "BAD_USER_INPUT"),
    ("query($f: DealFilter) { deals(filter: $f) { totalCount } }", {"f": {"amountMin": "lots"}}, "BAD_USER_INPUT"),
    ("{ deals { totalCount }", None, "GRAPHQL_PARSE_FAILED"),
    ("query { deals(first: ) { totalCount } }", None, "GRAPHQL_PARSE_FAILED"),
    ("SELECT * FROM deals", None, "GRAPHQL_PARSE_FAILED"),
    ("{ " + "a " * 6000 + "}", None, "GRAPHQL_PARSE_FAILED"),
    ("{ deals { nope } }", None, "GRAPHQL_VALIDATION_FAILED"),
], ids=["int-from-string", "int-overflow", "missing-variable", "null-for-non-null", "bad-enum", "bad-decimal",
        "unclosed-brace", "missing-argument-value", "sql-as-query", "too-many-tokens", "unknown-field"])
async def test_request_errors_are_coded_and_clean(client: httpx.AsyncClient, make_tenant: Any, query: str,
                                                  variables: dict[str, Any] | None, code: str) -> None:
    world = await make_tenant("errs")
    response = await client.post("/graphql", json={"query": query, "variables": variables},
                                 headers={"authorization": f"Bearer {world.token(Role.MEMBER)}"})
    assert response.status_code in (200, 400), response.text
    body = response.json()
    assert codes(body) == [code], body
    assert body.get("data") is None
    assert_no_internals(response.text, sent=query)


@pytest.mark.parametrize(("query", "variables"), [
    ("query($d: ID!) { deal(id: $d) { id } }", {"d": "not-a-global-id"}),
    ("query($d: ID!) { deal(id: $d) { id } }", {"d": to_global_id("Company", uuid.uuid4())}),
    ('mutation($n: String!) { createCompany(input: {name: $n}) { id } }', {"n": "x" * 100_000}),
    ('mutation($s: ID!) { createDeal(input: {title: "t", amount: "1e40", currency: "EUR", stageId: $s}) { id } }',
     {"s": to_global_id("Stage", uuid.uuid4())}),
    ('mutation($s: ID!) { createDeal(input: {title: "t", amount: "1", currency: "EURO", stageId: $s}) { id } }',
     {"s": to_global_id("Stage", uuid.uuid4())}),
], ids=["bad-id", "id-of-other-type", "huge-name", "huge-amount", "bad-currency"])
async def test_resolver_errors_do_not_leak_internals(client: httpx.AsyncClient, make_tenant: Any, query: str,
                                                     variables: dict[str, Any]) -> None:
    world = await make_tenant("leak")
    response = await client.post("/graphql", json={"query": query, "variables": variables},
                                 headers={"authorization": f"Bearer {world.token(Role.OWNER)}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["errors"], body
    assert all(e["extensions"]["code"] in {"BAD_USER_INPUT", "NOT_FOUND"} for e in body["errors"]), body
    assert_no_internals(response.text)


async def test_a_remembered_token_still_expires_and_a_forged_one_is_never_remembered(settings: Settings) -> None:
    """The verifier remembers verified tokens (their signature is not checked on every request); the
    expiry still is, on the verifier's clock, and a token it refused is refused again."""
    clock = ManualClock()
    verifier = TokenVerifier(settings, clock)
    user, tenant = uuid.uuid4(), uuid.uuid4()
    token = issue_token(settings, user_id=user, tenant_id=tenant, role=Role.MEMBER, ttl_seconds=60)
    assert (await verifier.verify(token)).user_id == user
    assert (await verifier.verify(token)).tenant_id == tenant  # remembered
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    for _ in range(2):
        with pytest.raises(Unauthenticated):
            await verifier.verify(forged)
    clock.advance(61)
    with pytest.raises(Unauthenticated, match="expired"):
        await verifier.verify(token)
