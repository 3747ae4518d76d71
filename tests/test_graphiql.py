"""GraphiQL is served by Atrium itself (nothing from elsewhere), runs queries and subscriptions in a
real browser, and is off in production unless enabled."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from atrium.app import create_app
from atrium.graphiql.routes import STATIC
from core.clock import ManualClock
from core.settings import SettingError, Settings
from tests.browser import Chromium, Page
from tests.conftest import TenantWorld
from tests.crm import create_company
from tests.live import WAIT, serve_in_process

MakeTenant = Callable[..., Awaitable[TenantWorld]]
HTML = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
VENDOR = STATIC / "vendor"
MANIFEST = json.loads((VENDOR / "vendor.json").read_text())
EDITOR = "document.querySelector('.graphiql-query-editor .CodeMirror')"
RESULT = "(document.querySelector('.result-window') || {textContent: ''}).textContent"


def page_assets(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="(/[^"]*)"', html)


async def test_the_page_and_every_asset_come_from_atrium(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
                      "frame-ancestors 'none'"):
        assert directive in policy
    assert "unsafe" not in policy
    assert (await client.get("/graphql", headers={**HTML, "if-none-match": page.headers["etag"]})).status_code == 304
    assets = page_assets(page.text)
    assert sorted(assets) == ["/graphiql/graphiql.css", "/graphiql/graphiql.js",
                              "/graphiql/vendor/graphiql/graphiql.min.css", "/graphiql/vendor/graphiql/graphiql.min.js",
                              "/graphiql/vendor/react-dom/react-dom.production.min.js",
                              "/graphiql/vendor/react/react.production.min.js"]
    for path in assets:
        asset = await client.get(path, headers={"accept-encoding": "identity"})
        assert asset.status_code == 200, path
        assert asset.content == (STATIC / path.removeprefix("/graphiql/")).read_bytes()
        kind = "text/javascript" if path.endswith(".js") else "text/css"
        assert asset.headers["content-type"].startswith(kind) and asset.headers["x-content-type-options"] == "nosniff"
        again = await client.get(path, headers={"if-none-match": asset.headers["etag"]})
        assert again.status_code == 304
    # Our own files name no other origin (the vendored bundles only mention URLs in comments and messages).
    for own in ("index.html", "graphiql.js", "graphiql.css"):
        assert not re.search(r"\b(?:https?|wss?)://", (STATIC / own).read_text()), own
    assert (await client.get("/graphiql/vendor/graphiql/graphiql.min.js.map")).status_code == 404


async def test_the_bundle_is_compressed_for_clients_that_accept_it(client: httpx.AsyncClient) -> None:
    raw = (VENDOR / "graphiql" / "graphiql.min.js").read_bytes()
    response = await client.get("/graphiql/vendor/graphiql/graphiql.min.js", headers={"accept-encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip" and "accept-encoding" in response.headers["vary"].lower()
    assert int(response.headers["content-length"]) < len(raw) / 3
    assert response.content == raw  # httpx decodes it


def test_the_vendored_files_are_the_published_ones_with_their_licences() -> None:
    """Each file is byte for byte what ``vendor.json`` records (tools/vendor_graphiql.py copies them
    from the npm tarball with that integrity); each package carries its licence; nothing else lies there."""
    listed = set()
    for package in MANIFEST["packages"]:
        assert re.fullmatch(r"\d+\.\d+\.\d+", package["version"]), package["name"]  # pinned, not a range
        assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", package["integrity"])
        folder = VENDOR / package["name"]
        assert sorted(package["files"].values()) == sorted(package["sha256"])
        assert "LICENSE" in package["sha256"], f"{package['name']} has no licence"
        licence = (folder / "LICENSE").read_text()
        assert "MIT License" in licence and "Permission is hereby granted" in licence
        for name, digest in package["sha256"].items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, f"{package['name']}/{name}"
            listed.add(folder / name)
    present = {p for p in VENDOR.rglob("*") if p.is_file() and p.name != "vendor.json"}
    assert present == listed


def test_the_package_ships_every_asset() -> None:
    """Every file the page serves is package data (a wheel or the image carries it)."""
    import tomllib

    config = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["atrium.graphiql"]
    package = STATIC.parent
    for path in STATIC.rglob("*"):
        if path.is_file():
            relative = path.relative_to(package)
            assert any(relative.match(p) for p in patterns), relative
    assert "atrium.graphiql" in config["tool"]["setuptools"]["packages"]


@pytest.mark.parametrize(("environment", "setting", "served"), [
    ("development", None, True), ("test", None, True), ("production", None, False), ("production", "on", True),
    ("development", "off", False),
])
def test_graphiql_is_off_in_production_unless_enabled(environment: str, setting: str | None, served: bool) -> None:
    env = {"ATRIUM_ENV": environment, "ATRIUM_JWT_SECRET": "s", **({"ATRIUM_GRAPHIQL": setting} if setting else {})}
    assert Settings.from_env(env).graphiql_enabled is served
    assert Settings(env=environment).graphiql_enabled is (environment != "production")  # type: ignore[arg-type]


def test_a_graphiql_setting_that_is_not_on_or_off_is_refused() -> None:
    with pytest.raises(SettingError, match="ATRIUM_GRAPHIQL must be on or off"):
        Settings.from_env({"ATRIUM_JWT_SECRET": "s", "ATRIUM_GRAPHIQL": "maybe"})


@pytest.mark.parametrize("graphiql", [None, False, True])
async def test_production_serves_no_ide_unless_told_to(settings: Settings, graphiql: bool | None) -> None:
    app = create_app(dataclasses.replace(settings, env="production", graphiql=graphiql))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://atrium.test") as client:
        page = await client.get("/graphql", headers=HTML)
        script = await client.get("/graphiql/graphiql.js")
        if graphiql:
            assert page.headers["content-type"].startswith("text/html") and script.status_code == 200
        else:
            assert not page.headers["content-type"].startswith("text/html")
            assert page.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"  # a GET with no document
            assert script.status_code == 404


async def run_in_graphiql(page: Page, document: str | None = None, kind: str = "query") -> None:
    """Put ``document`` in the query editor (or keep the one shown) and press the run button once
    GraphiQL has parsed it: it parses 100 ms after an edit, into the editor's ``documentAST``, and
    sends what it last parsed (a subscription over WebSocket, anything else over HTTP). The wait is
    on that assignment itself (a setter put on the editor before the edit), not on a timer."""
    await page.evaluate(f"""new Promise((resolve, reject) => {{
      const editor = {EDITOR}.CodeMirror;
      const wanted = (ast) => Boolean(ast && ast.definitions[0] && ast.definitions[0].operation === {json.dumps(kind)});
      let parsed = editor.documentAST;
      const timer = setTimeout(() => reject(new Error('GraphiQL did not parse a {kind}')), {int(WAIT * 1000)});
      Object.defineProperty(editor, 'documentAST', {{configurable: true, get: () => parsed, set: (ast) => {{
        parsed = ast;
        if (wanted(ast)) {{ clearTimeout(timer); resolve(true); }}
      }}}});
      const text = {json.dumps(document)};
      if (text !== null) {{ editor.setValue(text); }}
      else if (wanted(parsed)) {{ clearTimeout(timer); resolve(true); }}
    }})""")
    await page.evaluate("document.querySelector('.graphiql-execute-button').click()")


async def test_graphiql_runs_queries_and_subscriptions_with_nothing_from_elsewhere(
        settings: Settings, make_tenant: MakeTenant, browser: Chromium) -> None:
    tenant = await make_tenant("graphiql")
    async with serve_in_process(settings, ManualClock()) as server:
        async with server.client() as client:
            company = await create_company(client, tenant.token(), name="Initech")
        async with browser.page() as page:
            await page.goto(f"{server.url}/graphql#token={tenant.token()}")
            await page.wait_for(f"{EDITOR} !== null", "the GraphiQL editor")
            assert "token" not in await page.evaluate("location.href"), "the token leaves the address bar"
            # The example query as the page shows it, sent with the token from the link.
            await run_in_graphiql(page)
            shown = await page.wait_for(f"{RESULT}.includes('\"slug\"') && {RESULT}", "the example query's answer")
            assert f'"slug": "{tenant.slug}"' in shown
            # A subscription, over graphql-transport-ws with the same header in connection_init.
            # (The operation keeps the example's name: GraphiQL sends the name it last parsed.)
            await run_in_graphiql(page, f'subscription Me {{ presence(recordId: "{company["id"]}") '
                                        "{ recordId users { state } } }", kind="subscription")
            shown = await page.wait_for(f"{RESULT}.includes('VIEWING') && {RESULT}", "the presence list")
            assert company["id"] in shown
        ws_origin = server.url.replace("http://", "ws://", 1)
        foreign = [u for u in page.requests if not u.startswith((server.url + "/", ws_origin + "/", "data:"))]
        assert foreign == [], "the page loaded something from elsewhere"
        assert any(u.startswith(ws_origin + "/graphql") for u in page.requests)
        assert page.exceptions == [] and page.violations == []
