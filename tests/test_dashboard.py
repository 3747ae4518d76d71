"""The live dashboard page (``/dashboard``) in headless Chromium, against real Atrium processes.

The page is served by process A; deals are changed over HTTP through process B (same database,
same Redis), so whatever the page shows has come through the subscriptions. Session expiry is
shown against an in-process server whose clock the test moves. Every wait is on the page's own DOM
(a MutationObserver in the page), with a timeout.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from atrium.ops.admin import add_user
from models.tables import Role
from tests.browser import Chromium, Page
from tests.conftest import TenantWorld
from tests.crm import create_deal, create_pipeline
from tests.live import AtriumProcess, InProcessAtrium, graphql, start_atrium, token_expiry

MakeTenant = Callable[..., Awaitable[TenantWorld]]
Servers = tuple[AtriumProcess, AtriumProcess]

MOVE = "mutation($id: ID!, $stageId: ID!) { moveDeal(id: $id, stageId: $stageId) { id } }"
DELETE = "mutation($id: ID!) { deleteDeal(id: $id) { deletedId } }"
HOSTILE_TITLE = '<img src=x onerror="window.injected = true">Acme renewal'


def card_in(stage_id: str, deal_id: str) -> str:
    """JS: the deal's card is in the stage's column."""
    return (f"document.querySelector('[data-stage-id=\"{stage_id}\"] [data-deal-id=\"{deal_id}\"]') !== null")


def count_of(stage_id: str, count: int) -> str:
    """JS: the stage's column header shows ``count`` deals (from the live totals)."""
    return f"document.querySelector('[data-stage-id=\"{stage_id}\"] [data-count=\"{count}\"]') !== null"


def signed_in_and_synced() -> str:
    return ("document.body.dataset.view === 'dashboard' && document.body.dataset.synced === 'true'"
            " && document.getElementById('status').dataset.status === 'live'")


async def test_page_and_assets_are_served_with_a_strict_policy(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert page.headers["x-content-type-options"] == "nosniff"
    assets = re.findall(r'(?:src|href)="(/dashboard/[^"]+)"', page.text)
    assert sorted(assets) == ["/dashboard/dashboard.css", "/dashboard/dashboard.js"]
    for path in assets:
        asset = await client.get(path)
        assert asset.status_code == 200 and asset.headers["content-security-policy"] == policy
        assert not re.search(r"\b(?:https?|wss?)://", asset.text), f"{path} names another origin"
        again = await client.get(path, headers={"if-none-match": asset.headers["etag"]})
        assert again.status_code == 304
    assert (await client.get("/dashboard/app.js")).status_code == 404


async def test_a_deal_moved_over_http_moves_on_the_page(servers: Servers, make_tenant: MakeTenant,
                                                       browser: Chromium) -> None:
    a, b = servers
    tenant = await make_tenant("dash")
    owner = tenant.token()
    async with b.client() as client:
        pipeline = await create_pipeline(client, owner, stages=("Lead", "Qualified", "Won"))
        lead, qualified, won = (s["id"] for s in pipeline["stages"])
        deal = (await create_deal(client, owner, lead, title=HOSTILE_TITLE, amount="1200.00"))["id"]
        async with browser.page() as page:
            # A sales manager's read-only token is enough: the page has no privilege of its own.
            await page.goto(f"{a.url}/dashboard#token={tenant.token(Role.VIEWER)}")
            await page.wait_for(f"{signed_in_and_synced()} && {card_in(lead, deal)} && {count_of(lead, 1)}",
                                "the deal in Lead, totals shown, live")
            assert "token" not in await page.evaluate("location.href"), "the token stays out of the address bar"

            await graphql(client, owner, MOVE, id=deal, stageId=qualified)
            await page.wait_for(f"{card_in(qualified, deal)} && !({card_in(lead, deal)})"
                                f" && {count_of(qualified, 1)} && {count_of(lead, 0)}", "the deal moved to Qualified")

            created = (await create_deal(client, owner, won, title="Globex expansion"))["id"]
            await page.wait_for(f"{card_in(won, created)} && {count_of(won, 1)}", "a new deal in Won")
            await graphql(client, owner, DELETE, id=created)
            await page.wait_for(f"!document.querySelector('[data-deal-id=\"{created}\"]') && {count_of(won, 0)}",
                                "the deleted deal gone")

            title = await page.evaluate(f"document.querySelector('[data-deal-id=\"{deal}\"] h3').textContent")
            assert title == HOSTILE_TITLE, "a title is shown as text"
            assert await page.evaluate("document.querySelectorAll('#board img').length") == 0
            assert await page.evaluate("window.injected === undefined")
            assert_only_own_origin(page, a)


async def test_password_sign_in_pipeline_choice_reload_and_sign_out(servers: Servers, make_tenant: MakeTenant,
                                                                    admin_engine: AsyncEngine,
                                                                    browser: Chromium) -> None:
    a, b = servers
    tenant = await make_tenant("dashlogin")
    async with b.client() as client:
        await create_pipeline(client, tenant.token(), name="New business", stages=("Lead", "Won"))
        renewals = await create_pipeline(client, tenant.token(), name="Renewals",
                                         stages=("Upcoming", "Renewed", "Churned"))
    await add_user(admin_engine, tenant.id, f"manager@{tenant.slug}.example", "Mia Manager", Role.VIEWER,
                   password="correct horse battery")
    async with browser.page() as page:
        await page.goto(f"{a.url}/dashboard#token=not-a-token")
        await page.wait_for("document.body.dataset.view === 'sign-in'"
                            " && document.getElementById('notice').textContent.startsWith('Sign-in failed')",
                            "the sign-in form saying the token was rejected")

        await page.evaluate(f"""(() => {{
          document.getElementById('workspace').value = {tenant.slug!r};
          document.getElementById('email').value = 'manager@{tenant.slug}.example';
          document.getElementById('password').value = 'wrong password';
          document.getElementById('login-form').requestSubmit();
        }})()""")
        await page.wait_for("document.getElementById('notice').textContent.includes('Invalid')", "the login error")
        await page.evaluate("""(() => {
          document.getElementById('password').value = 'correct horse battery';
          document.getElementById('login-form').requestSubmit();
        })()""")
        await page.wait_for(f"{signed_in_and_synced()}"
                            " && document.getElementById('who').textContent.startsWith('Mia Manager')"
                            " && document.querySelectorAll('[data-stage-id]').length === 2",
                            "the first pipeline by name (New business), live")

        await page.evaluate(f"""(() => {{
          const select = document.getElementById('pipeline');
          select.value = {renewals["id"]!r};
          select.dispatchEvent(new Event('change'));
        }})()""")
        columns = f"[...document.querySelectorAll('[data-stage-id]')].map(c => c.dataset.stageId).join() === " \
                  f"{','.join(s['id'] for s in renewals['stages'])!r}"
        await page.wait_for(f"{signed_in_and_synced()} && {columns}", "the Renewals board")
        # A reload keeps the tab signed in (session storage) and on the pipeline in the address.
        await page.reload()
        await page.wait_for(f"{signed_in_and_synced()} && {columns}", "the Renewals board after a reload")

        await page.evaluate("document.getElementById('sign-out').click()")
        await page.wait_for("document.body.dataset.view === 'sign-in'", "the sign-in form")
        assert await page.evaluate("sessionStorage.length") == 0
        assert not page.exceptions and not page.violations


async def test_an_expired_session_goes_back_to_sign_in(clocked_server: InProcessAtrium, make_tenant: MakeTenant,
                                                       browser: Chromium) -> None:
    tenant = await make_tenant("dashexpiry")
    clock = clocked_server.clock
    viewer = tenant.token(Role.VIEWER, ttl_seconds=600)  # the page's
    owner = tenant.token(ttl_seconds=3600)  # the test's own changes: outlives the page's token
    async with clocked_server.client() as client, browser.page() as page:
        lead = (await create_pipeline(client, owner))["stages"][0]["id"]
        await page.goto(f"{clocked_server.url}/dashboard#token={viewer}")
        await page.wait_for(signed_in_and_synced(), "the board, live")
        # A second before the token expires the page is still signed in and live: a new deal reaches it.
        clock.advance(token_expiry(viewer) - clock.time() - 1)
        deal = (await create_deal(client, owner, lead))["id"]
        await page.wait_for(f"{signed_in_and_synced()} && {card_in(lead, deal)}", "the new deal, still live")
        # Once it has expired the server closes the socket with 4401; the page asks to sign in again.
        clock.advance(2)
        await page.wait_for("document.body.dataset.view === 'sign-in'"
                            " && document.getElementById('notice').textContent.includes('expired')",
                            "the sign-in form saying the session expired")
        assert await page.evaluate("sessionStorage.length") == 0
        assert not page.exceptions and not page.violations


async def test_the_page_reconnects_and_catches_up_after_a_server_restart(
        servers: Servers, database_url: str, redis_url: str, make_tenant: MakeTenant, browser: Chromium) -> None:
    _, b = servers
    tenant = await make_tenant("dashrestart")
    owner = tenant.token()
    server = await start_atrium(database_url, redis_url)
    try:
        async with b.client() as client, browser.page() as page:
            pipeline = await create_pipeline(client, owner)
            lead, qualified, _ = (s["id"] for s in pipeline["stages"])
            deal = (await create_deal(client, owner, lead))["id"]
            await page.goto(f"{server.url}/dashboard#token={tenant.token(Role.VIEWER)}")
            await page.wait_for(f"{signed_in_and_synced()} && {card_in(lead, deal)}", "the deal in Lead")

            server.stop()
            await page.wait_for("document.getElementById('status').dataset.status === 'reconnecting'",
                                "the page reconnecting")
            # Moved while the page's server is down: no event can reach the page for this.
            await graphql(client, owner, MOVE, id=deal, stageId=qualified)
            server = await start_atrium(database_url, redis_url, port=server.port)
            await page.wait_for(f"{signed_in_and_synced()} && {card_in(qualified, deal)} && {count_of(qualified, 1)}",
                                "the page live again, showing the move it missed")
            assert not page.exceptions and not page.violations
    finally:
        server.stop()


def assert_only_own_origin(page: Page, server: AtriumProcess) -> None:
    """The page loaded nothing from anywhere but its own server, threw nothing, violated no policy."""
    ws_origin = server.url.replace("http://", "ws://", 1)
    foreign = [u for u in page.requests if not u.startswith((server.url + "/", ws_origin + "/", "data:"))]
    assert not foreign, foreign
    assert any(u.startswith(ws_origin + "/graphql") for u in page.requests), page.requests
    assert not page.exceptions, page.exceptions
    assert not page.violations, page.violations
