"""Headless Chromium (Debian `chromium`) driven over the DevTools protocol, for the dashboard
tests: a page's JavaScript, DOM, cookies and screenshots, from a real browser.

Chromium may run inside a network namespace (a lab site's, where the control API listens on
127.0.0.1:7780); the DevTools websocket is then opened from inside it too."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from geomirror import netns

CHROMIUM = shutil.which("chromium")


class BrowserError(AssertionError):
    pass


def _inside(ns: str | None):
    return netns.inside(ns) if ns else contextlib.nullcontext()


class Browser:
    """One headless Chromium with one page. `await Browser.launch(ns)`; `await b.close()`."""

    def __init__(self, proc: subprocess.Popen, profile: Path, ns: str | None):
        self.proc = proc
        self.profile = profile
        self.ns = ns
        self.session: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None
        self.console: list[str] = []

    @classmethod
    async def launch(cls, ns: str | None = None, width: int = 1400, height: int = 1000) -> "Browser":
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed (apt-get install chromium; scripts/setup.sh does)")
        profile = Path(tempfile.mkdtemp(prefix="gm-chromium-"))
        argv = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"]
        proc = netns.spawn(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        b = cls(proc, profile, ns)
        try:
            await b._connect()
        except BaseException:
            await b.close()
            raise
        return b

    async def _connect(self) -> None:
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode} before it listened")
            if time.monotonic() > deadline:
                raise BrowserError("chromium did not open its DevTools port within 30 s")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split("\n")[0])
        self.session = aiohttp.ClientSession()
        with _inside(self.ns):  # the sockets are made inside the namespace and stay there
            async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            self.ws = await self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=64 << 20)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Network"):
            await self.send(f"{domain}.enable")

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            elif data.get("method") == "Runtime.consoleAPICalled":
                self.console.append(" ".join(str(a.get("value", a.get("description", "")))
                                             for a in data["params"]["args"]))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.console.append("exception: " + json.dumps(data["params"]["exceptionDetails"])[:500])
        for f in self._pending.values():
            f.set_exception(BrowserError("the DevTools connection closed"))

    async def send(self, method: str, **params) -> dict:
        n = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[n] = fut
        await self.ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, 60)
        if "error" in data:
            raise BrowserError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def eval(self, expression: str):
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise BrowserError(f"{expression!r} threw: {r['exceptionDetails'].get('text')} "
                               f"{r['exceptionDetails'].get('exception', {}).get('description', '')}")
        return r["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href !== 'about:blank'", 30)

    async def wait_for(self, expression: str, timeout: float, what: str = "") -> object:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = await self.eval(expression)
            except BrowserError:
                last = None  # e.g. the page is navigating
            if last:
                return last
            await asyncio.sleep(0.2)
        raise BrowserError(f"waited {timeout:g} s for {what or expression} (last {last!r}); "
                           f"console: {self.console[-5:]}")

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not only the window)."""
        h = await self.eval("Math.ceil(document.documentElement.scrollHeight)")
        w = await self.eval("Math.ceil(document.documentElement.scrollWidth)")
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                            clip={"x": 0, "y": 0, "width": w, "height": h, "scale": 1})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    async def cookies(self) -> list[dict]:
        return (await self.send("Network.getAllCookies"))["cookies"]

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.send("Browser.close")
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: chromium's helper processes too
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                await asyncio.to_thread(self.proc.wait, 10)
        shutil.rmtree(self.profile, ignore_errors=True)


def artifacts_dir() -> Path:
    """Where the browser tests leave their screenshots (GEOMIRROR_ARTIFACTS, else /tmp/geomirror-artifacts)."""
    d = Path(os.environ.get("GEOMIRROR_ARTIFACTS", "/tmp/geomirror-artifacts"))
    d.mkdir(parents=True, exist_ok=True)
    return d
