"""The dashboard in a real headless Chromium against the real control API around a fake daemon:
the login form, the HttpOnly cookie the page's script cannot read, a live role change over SSE
without a reload, the drill links, and a logged-out browser that reads nothing. Screenshots go
to the artifacts directory (tests/browser.py). The lab test (test_dashboard_lab.py) does the same
against real sites during a real switchover."""

from __future__ import annotations

import json

import pytest

from geomirror import control, dashboard
from tests.browser import CHROMIUM, Browser, artifacts_dir
from tests.test_dashboard import TOKEN, Daemon, standby_status

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/setup.sh installs it)")

ROLES = "[...document.querySelectorAll('[data-site]')].map(c => c.dataset.site + '=' + " \
        "c.querySelector('[data-field=role]').textContent).join(' ')"


async def login_in_browser(b: Browser, base: str, token: str) -> None:
    await b.goto(base + "/dashboard/")
    await b.wait_for("location.pathname === '/dashboard/login' && !!document.getElementById('token')", 20,
                     "the login form")
    await b.eval(f"document.getElementById('token').value = {json.dumps(token)}; "
                 "document.querySelector('form.login').requestSubmit(); true")


async def test_dashboard_in_chromium_logs_in_updates_live_and_leaks_nothing_logged_out(tmp_path):
    daemon = Daemon()
    drills = tmp_path / "drills"
    drills.mkdir()
    (drills / "drill-20250101T030000Z.json").write_text(json.dumps(
        {"verdict": "pass", "finished_at": 1.7e9, "moves": [{"from": "site-a", "to": "site-b", "epochs_lost": 0}]}))
    (drills / "drill-20250101T030000Z.html").write_text("<!doctype html><h1>Drill report</h1>")
    app = control.make_app(daemon, TOKEN, peer_name="site-b", drills_dir=drills)
    app[dashboard.DASHBOARD].push_period_s = 0.2
    runner = await control.start(app, "127.0.0.1", 0, None)
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    out = artifacts_dir()
    b = await Browser.launch()
    try:
        await login_in_browser(b, base, "wrong-token")
        await b.wait_for("document.querySelector('.login-error') !== null", 20, "the refusal")
        assert "wrong-token" not in await b.eval("document.documentElement.outerHTML")
        await b.screenshot(out / "dashboard-fake-login-refused.png")

        await login_in_browser(b, base, TOKEN)
        await b.wait_for("Number(document.body.dataset.updates || 0) >= 1", 20, "the first view")
        assert await b.eval(ROLES) == "site-a=primary site-b=standby"
        assert await b.eval("document.getElementById('headline-title').textContent") == "PROTECTED"
        assert await b.eval("document.cookie") == ""  # HttpOnly: the page's script cannot read the session
        (c,) = [c for c in await b.cookies() if c["name"] == dashboard.COOKIE]
        assert c["httpOnly"] and c["sameSite"] == "Strict" and c["path"] == "/dashboard"
        assert TOKEN not in await b.eval("document.documentElement.outerHTML")
        links = await b.eval("[...document.querySelectorAll('#drills a')].map(a => a.getAttribute('href'))")
        assert links == ["/dashboard/drills/drill-20250101T030000Z.html", "/dashboard/drills/drill-20250101T030000Z.json"]
        await b.screenshot(out / "dashboard-fake-primary.png")

        loaded_at = await b.eval("window.gmLoadedAt")
        daemon.now = standby_status()
        await b.wait_for(f"({ROLES}) === 'site-a=standby site-b=primary'", 20, "the roles to change live")
        assert await b.eval("window.gmLoadedAt") == loaded_at  # pushed over SSE, not a reload
        await b.screenshot(out / "dashboard-fake-standby.png")

        await b.send("Network.clearBrowserCookies")
        got = await b.eval("Promise.all(['/dashboard/data', '/dashboard/events', '/dashboard/app.js', "
                           "'/dashboard/drills/drill-20250101T030000Z.html'].map(u => fetch(u).then(r => r.status)))")
        assert got == [401, 401, 401, 401]
        await b.goto(base + "/dashboard/")
        assert await b.eval("location.pathname") == "/dashboard/login"
        print(f"\nscreenshots in {out}")
    finally:
        await b.close()
        await runner.cleanup()
