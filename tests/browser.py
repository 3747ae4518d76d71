"""Headless Chromium for page tests, driven over the DevTools protocol with the ``websockets`` library.

A test browser cannot be downloaded here, so this drives Debian's ``chromium``: ``ATRIUM_BROWSER``
names it, else the one on PATH. Without one the page tests skip, saying how to install it; when
``ATRIUM_BROWSER`` is set (``.ci/run`` installs Chromium and sets it) a browser that does not start
fails them instead. The session-wide ``browser`` fixture is shared by every test module
(``tests/conftest.py`` registers this module as a pytest plugin).

Each ``Page`` lives in a browser context of its own (its own storage) and records the URLs it
requested, the JavaScript exceptions it threw and the Content-Security-Policy violations it hit.
``Page.wait_for`` waits on the page itself: a MutationObserver re-checks a predicate on every DOM
change, so nothing polls; each wait fails after ``WAIT`` seconds with what the page showed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.live import WAIT

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-extensions", "--disable-quic", "--mute-audio",
)
LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class CdpError(RuntimeError):
    """A DevTools command failed."""


class Chromium:
    """One Chromium process and its DevTools connection (commands answered by id, events by session)."""

    def __init__(self, process: asyncio.subprocess.Process, ws: ClientConnection, profile: str,
                 stderr: deque[str]) -> None:
        self.process, self.ws, self.profile, self.stderr = process, ws, profile, stderr
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.pages: dict[str, Page] = {}
        self.reader = asyncio.create_task(self._read())
        self.drain = asyncio.create_task(self._drain())

    @classmethod
    async def launch(cls, executable: str) -> Chromium:
        profile = tempfile.mkdtemp(prefix="atrium-chromium-")
        process = await asyncio.create_subprocess_exec(
            executable, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert process.stderr is not None
        lines: deque[str] = deque(maxlen=50)
        try:
            async with asyncio.timeout(60):
                while not (match := LISTENING.search(line := await process.stderr.readline())):
                    if not line:
                        raise RuntimeError(f"{executable} exited: {' / '.join(lines)}")
                    lines.append(line.decode(errors="replace").strip())
            ws = await connect(match.group(1).decode(), max_size=None, open_timeout=WAIT)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        return cls(process, ws, profile, lines)

    async def _drain(self) -> None:
        """Keep reading Chromium's stderr (a full pipe would stall it); the last lines help diagnose."""
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr.append(line.decode(errors="replace").strip())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self.pending.pop(message["id"], None)
                    if future is not None and not future.done():
                        future.set_result(message)
                elif (page := self.pages.get(message.get("sessionId", ""))) is not None:
                    page.event(message["method"], message.get("params", {}))
        except ConnectionClosed:
            pass
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(CdpError("the DevTools connection closed"))

    async def send(self, method: str, params: dict[str, Any] | None = None, *,
                   session: str | None = None) -> dict[str, Any]:
        """Run a DevTools command and return its result (raising ``CdpError`` on failure)."""
        message: dict[str, Any] = {"id": next(self.ids), "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[message["id"]] = future
        await self.ws.send(json.dumps(message))
        async with asyncio.timeout(WAIT + 5):
            answer = await future
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    @contextlib.asynccontextmanager
    async def page(self) -> AsyncIterator[Page]:
        """A new tab in a fresh browser context (no shared storage), closed afterwards."""
        context = (await self.send("Target.createBrowserContext"))["browserContextId"]
        target = (await self.send("Target.createTarget", {"url": "about:blank", "browserContextId": context}))
        session = (await self.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}))
        page = Page(self, session["sessionId"])
        self.pages[page.session] = page
        try:
            for domain in ("Page", "Runtime", "Network", "Log"):
                await page.send(f"{domain}.enable")
            yield page
        finally:
            self.pages.pop(page.session, None)
            await self.send("Target.disposeBrowserContext", {"browserContextId": context})

    async def close(self) -> None:
        with contextlib.suppress(CdpError, ConnectionClosed, TimeoutError):
            await self.send("Browser.close")
        await self.ws.close()
        await self.reader
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()
        await self.drain
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: navigation, evaluation, waits on the DOM, and what the page requested or reported."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser, self.session = browser, session
        self.requests: list[str] = []
        self.exceptions: list[str] = []
        self.violations: list[str] = []
        self.loaded = asyncio.Event()

    def event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])
        elif method == "Network.webSocketCreated":
            self.requests.append(params["url"])
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.exceptions.append(details.get("exception", {}).get("description") or details["text"])
        elif method == "Log.entryAdded" and "Content Security Policy" in params["entry"]["text"]:
            self.violations.append(params["entry"]["text"])
        elif method == "Page.loadEventFired":
            self.loaded.set()

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session=self.session)

    async def goto(self, url: str) -> None:
        """Navigate and wait for the load event (module scripts have run by then)."""
        self.loaded.clear()
        result = await self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigating to {url}: {result['errorText']}")
        async with asyncio.timeout(WAIT):
            await self.loaded.wait()

    async def reload(self) -> None:
        """Reload the page (a fresh document, same storage) and wait for the load event."""
        self.loaded.clear()
        await self.send("Page.reload")
        async with asyncio.timeout(WAIT):
            await self.loaded.wait()

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` (promises awaited); a page-side exception fails the test."""
        result = await self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                      "returnByValue": True})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            reason = details.get("exception", {}).get("description") or details["text"]
            shown = await self.send("Runtime.evaluate", {"expression": "document.body.innerText",
                                                         "returnByValue": True})
            raise AssertionError(f"{reason}\n--- the page showed:\n{shown['result'].get('value')}")
        return result["result"].get("value")

    async def wait_for(self, predicate: str, what: str) -> Any:
        """The first truthy value of the JavaScript expression ``predicate``, re-checked on every DOM change."""
        return await self.evaluate(f"""new Promise((resolve, reject) => {{
          const check = () => {{
            let value;
            try {{ value = ({predicate}); }} catch (error) {{ finish(); reject(error); return; }}
            if (value) {{ finish(); resolve(value); }}
          }};
          const observer = new MutationObserver(check);
          const timer = setTimeout(() => {{
            finish(); reject(new Error('timed out after {WAIT:g} s waiting for: ' + {json.dumps(what)}));
          }}, {int(WAIT * 1000)});
          const finish = () => {{ observer.disconnect(); clearTimeout(timer); }};
          observer.observe(document, {{subtree: true, childList: true, attributes: true, characterData: true}});
          check();
        }})""")


def browser_executable() -> str:
    configured = os.environ.get("ATRIUM_BROWSER")
    if configured:
        return configured
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("Chromium is not installed (`apt-get install chromium`, which .ci/run does): "
                    "the dashboard page tests drive a real browser")
    return found


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Chromium]:
    browser = await Chromium.launch(browser_executable())
    try:
        yield browser
    finally:
        await browser.close()
