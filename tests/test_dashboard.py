"""The dashboard: nothing readable without the token (page data, SSE, reports, script), a login
that sets an HttpOnly, SameSite=Strict (Secure over TLS) session cookie and never echoes the
token, live views over SSE, the drill history, and the view model of both sites."""

from __future__ import annotations

import json
import ssl

import aiohttp
import pytest

from geomirror import control, dashboard, pairing
from geomirror.site.status import SiteStatus

TOKEN = "s3cret-token-Zq9"


def primary_status(**over) -> dict:
    s = SiteStatus(site="site-a", role="primary", ha_state="active_protected", lease_generation=4,
                   committed_epoch=1200, interval_ms=50.0, rtt_ms=2.5, last_pause_ms=3.2, backlog_epochs=1,
                   bgp_announced=True, protected=True,
                   ha={"holding_lease": True, "peer_alive": True, "seen_generation": 4, "peer_route_seen": False,
                       "witness_reachable": True},
                   replication={"state": "protected", "peer_cert_serial": "1f2e", "wire_bytes_total": 5 << 20},
                   pacer={"reason": "latency budget"}, bgp={"neighbors": {"198.18.1.1": "established"}},
                   timeline=[{"t": 1.0, "wall": 1.7e9, "event": "protection.entered"},
                             {"t": 2.0, "wall": 1.7e9 + 1, "event": "lease.granted", "generation": 4}])
    d = s.as_dict()
    d.update(over)
    return d


def standby_status(**over) -> dict:
    s = SiteStatus(site="site-a", role="standby", ha_state="standby", lease_generation=4, committed_epoch=1300,
                   rtt_ms=2.0, ha={"peer_alive": True, "seen_generation": 5},
                   replication={"state": "replicating", "peer": "site-b"})
    d = s.as_dict()
    d.update(over)
    return d


class Daemon:
    """The daemon surface the control API wraps; the dashboard reads only status()."""

    def __init__(self):
        self.now = primary_status()
        from prometheus_client import CollectorRegistry
        self.metrics_registry = CollectorRegistry()

    def status(self) -> dict:
        return self.now


@pytest.fixture
async def served(tmp_path):
    daemon = Daemon()
    drills = tmp_path / "drills"
    app = control.make_app(daemon, TOKEN, peer_name="site-b", drills_dir=drills)
    app[dashboard.DASHBOARD].push_period_s = 0.02  # the SSE test reads several views quickly
    runner = await control.start(app, "127.0.0.1", 0, None)
    port = runner.addresses[0][1]
    yield daemon, f"http://127.0.0.1:{port}", drills
    await runner.cleanup()


async def get(base, path, cookies=None, headers=None, allow_redirects=False):
    # an open event stream never ends: a guard so that a leak fails instead of hanging
    async with aiohttp.ClientSession(cookies=cookies, timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(base + path, headers=headers, allow_redirects=allow_redirects) as r:
            return r.status, r.headers, await r.text()


async def login(base, token=TOKEN):
    async with aiohttp.ClientSession() as s:
        async with s.post(base + "/dashboard/login", data={"token": token}, allow_redirects=False) as r:
            return r.status, r.headers, await r.text(), r.cookies


# ---------------------------------------------------------------- nothing without the token

@pytest.mark.parametrize("path", ["/dashboard/data", "/dashboard/events", "/dashboard/app.js",
                                  "/dashboard/drills/d1.json", "/dashboard/drills/d1.html"])
async def test_without_a_session_every_dashboard_url_is_401_and_says_nothing(served, path):
    daemon, base, drills = served
    drills.mkdir()
    (drills / "d1.json").write_text(json.dumps({"verdict": "pass", "moves": []}))
    (drills / "d1.html").write_text("<p>report</p>")
    for cookies in (None, {dashboard.COOKIE: "1999999999.x.deadbeef"}):
        status, headers, body = await get(base, path, cookies=cookies)
        assert status == 401, (path, status)
        assert "site-b" not in body and "1200" not in body and "verdict" not in body and "report" not in body


async def test_the_page_redirects_to_the_login_form_which_needs_no_session(served):
    _, base, _ = served
    status, headers, _ = await get(base, "/dashboard/")
    assert status == 303 and headers["Location"] == "/dashboard/login"
    status, headers, body = await get(base, "/dashboard/login")
    assert status == 200 and 'name="token"' in body and TOKEN not in body
    assert (await get(base, "/dashboard/style.css"))[0] == 200


async def test_a_wrong_token_sets_no_cookie_and_is_not_echoed(served):
    _, base, _ = served
    status, headers, body, cookies = await login(base, "guess-Zq9-guess")
    assert status == 401 and "Set-Cookie" not in headers and not cookies
    assert "guess-Zq9-guess" not in body and "That is not this site" in body


async def test_a_session_does_not_open_the_control_api(served):
    _, base, _ = served
    _, _, _, cookies = await login(base)
    status, _, _ = await get(base, "/v1/status", cookies={dashboard.COOKIE: cookies[dashboard.COOKIE].value})
    assert status == 401


# ---------------------------------------------------------------- with the token

async def test_login_sets_a_strict_httponly_cookie_and_the_page_never_holds_the_token(served):
    _, base, _ = served
    status, headers, _, cookies = await login(base)
    assert status == 303 and headers["Location"] == "/dashboard/"
    set_cookie = headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/dashboard" in set_cookie
    assert "Secure" not in set_cookie  # plain HTTP: a Secure cookie would never come back
    value = cookies[dashboard.COOKIE].value
    assert TOKEN not in value
    jar = {dashboard.COOKIE: value}
    for path in ("/dashboard/", "/dashboard/app.js", "/dashboard/data"):
        status, headers, body = await get(base, path, cookies=jar)
        assert status == 200 and TOKEN not in body, path
        assert headers["Cache-Control"] == "no-store" and "default-src 'self'" in headers["Content-Security-Policy"]
    data = json.loads(body)
    assert [c["name"] for c in data["sites"]] == ["site-a", "site-b"]
    assert [c["role"] for c in data["sites"]] == ["primary", "standby"]
    assert data["headline"]["title"] == "PROTECTED"


async def test_a_bearer_token_reads_the_data_too(served):
    _, base, _ = served
    status, _, body = await get(base, "/dashboard/data", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200 and json.loads(body)["sites"][0]["committed_epoch"] == 1200


async def test_over_tls_the_cookie_is_secure(tmp_path):
    pki = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], [])
    cert, key = pki.certs["site-a"]
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    app = control.make_app(Daemon(), TOKEN, peer_name="site-b")
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(f"https://127.0.0.1:{port}/dashboard/login", data={"token": TOKEN}, ssl=False,
                              allow_redirects=False) as r:
                assert r.status == 303 and "Secure" in r.headers["Set-Cookie"]
    finally:
        await runner.cleanup()


async def test_sse_pushes_a_new_view_when_the_roles_change(served):
    daemon, base, _ = served
    _, _, _, cookies = await login(base)
    async with aiohttp.ClientSession(cookies={dashboard.COOKIE: cookies[dashboard.COOKIE].value}) as s:
        async with s.get(base + "/dashboard/events") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            first = await _next_view(r)
            assert [c["role"] for c in first["sites"]] == ["primary", "standby"]
            daemon.now = standby_status()
            while True:  # the next views come on the stream, same connection
                v = await _next_view(r)
                if v["sites"][0]["role"] == "standby":
                    break
            assert [c["role"] for c in v["sites"]] == ["standby", "primary"]
            assert v["sites"][1]["lease_generation"] == 5 and v["headline"]["title"] == "PROTECTED"


async def _next_view(resp) -> dict:
    event = data = None
    async for line in resp.content:
        line = line.decode().rstrip("\n")
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data is not None:
            assert event == "view"
            return json.loads(data)
    raise AssertionError("the stream ended")


async def test_drill_history_links_reports_and_refuses_other_paths(served):
    _, base, drills = served
    _, _, _, cookies = await login(base)
    jar = {dashboard.COOKIE: cookies[dashboard.COOKIE].value}
    data = json.loads((await get(base, "/dashboard/data", cookies=jar))[2])
    assert data["drills"] == []
    drills.mkdir()
    (drills / "20250101-0300.json").write_text(json.dumps(
        {"verdict": "pass", "finished_at": 1.7e9, "moves": [{"from": "site-a", "to": "site-b", "epochs_lost": 0},
                                                            {"from": "site-b", "to": "site-a", "epochs_lost": 0}]}))
    (drills / "20250101-0300.html").write_text("<h1>drill report</h1>")
    (drills / "20250102-0300.json").write_text("{torn")
    (tmp_secret := drills.parent / "secret.json").write_text('{"x": 1}')
    data = json.loads((await get(base, "/dashboard/data", cookies=jar))[2])
    by = {d["name"]: d for d in data["drills"]}
    assert by["20250102-0300"]["verdict"] == "unreadable" and by["20250102-0300"]["html"] is None
    good = by["20250101-0300"]
    assert good["verdict"] == "pass" and good["epochs_lost"] == 0 and good["moves"] == ["site-a → site-b",
                                                                                          "site-b → site-a"]
    status, headers, body = await get(base, good["html"], cookies=jar)
    assert status == 200 and "drill report" in body and headers["Content-Type"].startswith("text/html")
    assert (await get(base, good["json"], cookies=jar))[0] == 200
    for bad in ("/dashboard/drills/..%2Fsecret.json", "/dashboard/drills/.hidden.json", "/dashboard/drills/x.txt"):
        assert (await get(base, bad, cookies=jar))[0] == 404, bad
    assert tmp_secret.exists()


# ---------------------------------------------------------------- sessions and the view (pure)

def test_a_session_is_valid_until_expiry_and_only_for_its_token():
    c = dashboard.issue_session(TOKEN, now=1000.0, nonce="n", ttl_s=60)
    assert dashboard.session_valid(TOKEN, c, 1059.0)
    assert not dashboard.session_valid(TOKEN, c, 1060.0)
    assert not dashboard.session_valid("rotated", c, 1000.0)
    expiry, nonce, sig = c.split(".")
    assert not dashboard.session_valid(TOKEN, f"{int(expiry) + 999}.{nonce}.{sig}", 1000.0)
    for junk in (None, "", "a.b", "a.b.c.d", f"x{expiry}.{nonce}.{sig}"):
        assert not dashboard.session_valid(TOKEN, junk, 1000.0)


def test_the_peer_is_what_the_primary_knows_of_its_standby():
    s = primary_status()
    peer = dashboard.peer_site(s, "site-b")
    assert peer["role"] == "standby" and peer["committed_epoch"] == 1200 and peer["heard"]
    assert peer["source"] == "as seen from site-a" and peer["cert_serial"] == "1f2e"
    s["replication"]["state"] = "connecting"
    assert dashboard.peer_site(s, "site-b")["role"] == "not replicating"


def test_the_peer_of_a_standby_is_the_primary_while_heard():
    s = standby_status()
    assert dashboard.peer_site(s, "site-b")["role"] == "primary"
    s["ha"]["peer_alive"] = False
    assert dashboard.peer_site(s, "site-b")["role"] == "not heard"


@pytest.mark.parametrize("status, level, title", [
    (primary_status(), "ok", "PROTECTED"),
    (primary_status(ha_state="active_unprotected"), "bad", "UNPROTECTED"),
    (standby_status(), "ok", "PROTECTED"),
    (standby_status(replication={"state": "waiting"}), "warn", "STANDBY NOT CURRENT"),
    (primary_status(ha_state="handing_over"), "warn", "MOVING"),
    (primary_status(ha_state="fenced", role="fenced"), "bad", "FENCED"),
])
def test_the_headline_says_whether_the_guest_is_protected(status, level, title):
    h = dashboard.headline(status, "site-b")
    assert (h["level"], h["title"]) == (level, title)


def test_rates_come_from_two_samples_and_survive_a_counter_reset():
    r = dashboard.Rates()
    r.update(10.0, 100, 1000)
    assert r.checkpoints_per_s is None
    r.update(10.2, 104, 2000)  # too close to measure: the previous sample stays
    assert r.checkpoints_per_s is None
    r.update(12.0, 140, 41000)
    assert r.checkpoints_per_s == 20.0 and r.wan_bytes_per_s == 20000.0
    r.update(13.0, 160, 500)  # a new primary's byte counter
    assert r.checkpoints_per_s == 20.0 and r.wan_bytes_per_s is None


def test_a_site_not_running_the_guest_shows_no_checkpoint_figures():
    card = dashboard.this_site(standby_status(interval_ms=50.0), dashboard.Rates(checkpoints_per_s=3.0))
    assert card["checkpoints_per_s"] is None and card["interval_ms"] is None and card["wan_bytes"] is None
    card = dashboard.this_site(primary_status(), dashboard.Rates(checkpoints_per_s=19.96))
    assert card["checkpoints_per_s"] == 20.0 and card["wan_bytes"] == 5 << 20
    assert card["interval_reason"] == "latency budget"


def test_repeated_alarms_show_once_each_newest_last():
    alarms = ["the output-latency budget of 150 ms cannot be met: RTT 163 ms", "replica disk full",
              "the output-latency budget of 150 ms cannot be met: RTT 96 ms"]
    assert dashboard.distinct_alarms(alarms) == ["replica disk full",
                                                 "the output-latency budget of 150 ms cannot be met: RTT 96 ms"]
