"""The dashboard in the lab, in headless Chromium running inside site A's namespace (where the
control API listens on 127.0.0.1:7780): log in, see both sites, watch a planned switchover
change the roles live over SSE (no reload), and, logged out, read nothing. Screenshots of each
stage (and of site B's own dashboard afterwards) go to the artifacts directory."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from lab import cli as labcli
from tests.browser import CHROMIUM, Browser, artifacts_dir
from tests.test_dashboard_browser import ROLES, login_in_browser

pytestmark = [pytest.mark.lab, pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")]

BASE = "http://127.0.0.1:7780"
HEADLINE = "document.getElementById('headline-title').textContent"


def token(site: str) -> str:
    return labcli.site_endpoint(site).token_file.read_text().strip()


async def test_dashboard_watches_a_switchover_live_and_leaks_nothing_logged_out(lab_up):
    out = artifacts_dir()
    b = await Browser.launch("gm-site-a")
    try:
        await login_in_browser(b, BASE, token("site-a"))
        await b.wait_for(f"({ROLES}) === 'site-a=primary site-b=standby' && {HEADLINE} === 'PROTECTED'", 30,
                         "site-a primary and protected, site-b its standby")
        # a second view for the checkpoint rate (two samples apart)
        await b.wait_for("[...document.querySelectorAll('.facts th')].some(th => th.textContent === 'Checkpoints' "
                         "&& /\\/s$/.test(th.nextSibling.textContent))", 20, "a checkpoint rate")
        await b.screenshot(out / "dashboard-lab-1-site-a-primary.png")
        loaded_at = await b.eval("window.gmLoadedAt")

        t0 = time.monotonic()
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "geomirror", "switchover", "--lab-site",
                                                    "site-a", stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        seen: list[tuple[float, str, str]] = []  # (s after the command, roles, headline) as the page showed them
        shot_moving = False
        while True:
            roles, title = await b.eval(f"[{ROLES}, {HEADLINE}]")
            if not seen or seen[-1][1:] != (roles, title):
                seen.append((round(time.monotonic() - t0, 2), roles, title))
                if title == "MOVING" and not shot_moving:
                    shot_moving = True
                    await b.screenshot(out / "dashboard-lab-2-moving.png")
            if roles == "site-a=standby site-b=primary" and proc.returncode is not None:
                break
            assert time.monotonic() - t0 < 120, f"the page did not show the move: {seen}"
            try:
                await asyncio.wait_for(proc.wait(), 0.2)
            except asyncio.TimeoutError:
                pass
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        assert "the guest moved from site-a to site-b" in stdout.decode()
        assert await b.eval("window.gmLoadedAt") == loaded_at, "the page reloaded: the roles did not come over SSE"
        await b.screenshot(out / "dashboard-lab-3-site-a-standby.png")
        await b.wait_for(f"{HEADLINE} === 'PROTECTED'", 120, "site-a to be a current standby again")
        seen.append((round(time.monotonic() - t0, 2), await b.eval(ROLES), "PROTECTED"))
        await b.wait_for("[...document.querySelectorAll('#timeline td')].some(td => td.textContent === 'demote.done')",
                         20, "the switchover in the timeline")
        await b.screenshot(out / "dashboard-lab-4-site-a-standby-protected.png")
        print("\nthe page at site-a showed, seconds after `geomirror switchover`:")
        for t, roles, title in seen:
            print(f"  {t:6.2f}s  {title:<20} {roles}")

        # logged out: nothing is readable, from the same browser, inside the site's namespace
        await b.send("Network.clearBrowserCookies")
        got = await b.eval("Promise.all(['/dashboard/data', '/dashboard/events', '/dashboard/app.js', "
                           "'/dashboard/drills/x.json', '/v1/status'].map(u => fetch(u).then(r => r.status)))")
        assert got == [401, 401, 401, 401, 401], got
        await b.goto(BASE + "/dashboard/")
        assert await b.eval("location.pathname") == "/dashboard/login"
        assert token("site-a") not in await b.eval("document.documentElement.outerHTML")
    finally:
        await b.close()

    b = await Browser.launch("gm-site-b")  # site B's own dashboard: the primary now
    try:
        await login_in_browser(b, BASE, token("site-b"))
        await b.wait_for(f"({ROLES}) === 'site-b=primary site-a=standby' && {HEADLINE} === 'PROTECTED'", 60,
                         "site-b primary, protected by site-a")
        await b.screenshot(out / "dashboard-lab-5-site-b-primary.png")
    finally:
        await b.close()
    print(f"screenshots in {out}")
