"""Drills without a lab: pre-flight on two sites' status, step timings from both timelines,
budgets and the verdict, the runner on a fake pair (refusal, pass, rollback), the HTML page,
where reports are kept, the metrics, the probes' stall and the [drill] config."""

from __future__ import annotations

import asyncio
import copy
import json
import stat
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from geomirror.config import load_site
from geomirror.control import ControlError
from geomirror.drill import checks as ck
from geomirror.drill import html
from geomirror.drill import report as rep
from geomirror.drill.probes import Probe, ProbeSpec
from geomirror.drill.runner import Drill, DrillOptions, DrillRefused, exit_code
from geomirror.drill.store import DrillCollector, DrillStore
from geomirror.errors import ConfigError, Refused

PRIMARY = {"site": "site-a", "role": "primary", "ha_state": "active_protected", "protected": True,
           "backlog_epochs": 1, "committed_epoch": 500, "replication": {"state": "protected"},
           "ha": {"peer_alive": True, "witness_reachable": True}, "bgp": {"neighbors": {"198.18.1.1": "up"}}}
STANDBY = {"site": "site-b", "role": "standby", "ha_state": "standby", "protected": False, "committed_epoch": 499,
           "replication": {"state": "replicating", "valid": True, "hot_standby": True},
           "ha": {"peer_alive": True, "witness_reachable": True}, "bgp": {"neighbors": {"198.18.2.1": "up"}}}


def pair(**changes):
    a, b = copy.deepcopy(PRIMARY), copy.deepcopy(STANDBY)
    for key, v in changes.items():
        site, _, path = key.partition("__")
        d = a if site == "a" else b
        *parents, last = path.split("__")
        for p in parents:
            d = d[p]
        d[last] = v
    return {"site-a": a, "site-b": b}


# ---------------------------------------------------------------- pre-flight

def test_a_healthy_pair_passes_every_check():
    checks = ck.preflight(pair())
    assert [c.name for c in checks] == ["reachable", "roles", "protected", "backlog", "peer", "lease_backend",
                                        "bgp", "replica"]
    assert all(c.ok for c in checks) and ck.refusal(checks) is None


@pytest.mark.parametrize("changes, check, words", [
    ({"a__protected": False}, "protected", "site-a is not protected"),
    ({"a__backlog_epochs": 9}, "backlog", "9 checkpoints waiting"),
    ({"b__ha__peer_alive": False}, "peer", "site-b does not hear its peer"),
    ({"a__ha__witness_reachable": None}, "lease_backend", "does not answer site-a"),
    ({"b__bgp__neighbors": {"198.18.2.1": "connect"}}, "bgp", "site-b's session with 198.18.2.1 is connect"),
    ({"b__replication__state": "syncing"}, "replica", "its replica is syncing"),
    ({"b__committed_epoch": 100}, "replica", "trails site-a by 400 epochs"),
    ({"b__replication__hot_standby": False}, "replica", "no hot standby"),
    ({"b__role": "primary"}, "roles", "exactly one site must run the guest"),
])
def test_preflight_refuses_with_the_first_failed_check(changes, check, words):
    why = ck.refusal(ck.preflight(pair(**changes)))
    assert why is not None and why.startswith(f"drill refused by pre-flight ({check}): ") and words in why, why


def test_a_site_that_does_not_answer_is_the_reason():
    why = ck.refusal(ck.preflight({"site-a": PRIMARY, "site-b": None}))
    assert why == "drill refused by pre-flight (reachable): site-b did not answer on the control API"


# ---------------------------------------------------------------- timings, budgets, verdict

BEGIN = 1_700_000_000.0


def ev(name, dt, **f):
    return {"event": name, "wall": BEGIN + dt, **f}


FROM_EVENTS = [ev("bgp.route_seen", -5, origins=[64502]),  # before the move: ignored
               ev("switchover.begin", 0), ev("bgp.route_seen", 0.5, origins=[]),
               ev("bgp.route_seen", 1.9, origins=[64502])]
TO_EVENTS = [ev("protection.entered", -60), ev("lease.granted", 0.30), ev("takeover.resume_begin", 0.31, epoch=812),
             ev("takeover.resumed", 0.45), ev("bgp.announced", 0.5), ev("protection.entered", 3.2)]
SWITCHOVER = {"from": "site-a", "to": "site-b", "final_epoch": 812, "paused_at_ms": 120.0,
              "peer_holds_lease_at_ms": 350.0, "standby_at_ms": 900.0}


def test_move_timings_from_both_timelines():
    m = rep.move_timings("site-a", "site-b", BEGIN, SWITCHOVER, FROM_EVENTS, TO_EVENTS, 64502)
    assert {s: m[f"{s}_ms"] for s in rep.STEPS} == {"paused": 120.0, "lease_moved": 300.0, "resumed": 450.0,
                                                    "announced": 500.0, "route_moved": 1900.0,
                                                    "protected_again": 3200.0}
    assert (m["final_epoch"], m["resumed_epoch"], m["epochs_lost"]) == (812, 812, 0)
    assert rep.pending(m) == []


def test_a_lost_epoch_fails_the_drill():
    to = [dict(e, epoch=811) if e["event"] == "takeover.resume_begin" else e for e in TO_EVENTS]
    m = rep.move_timings("site-a", "site-b", BEGIN, SWITCHOVER, FROM_EVENTS, to, 64502)
    r = rep.finish({"moves": [m]})
    assert m["epochs_lost"] == 1 and r["verdict"] == "fail" and "1 epochs lost" in r["reason"]


def test_budgets_catch_a_late_step_and_a_step_not_reached_in_time():
    m = rep.move_timings("site-a", "site-b", BEGIN, SWITCHOVER, FROM_EVENTS, TO_EVENTS[:-1], 64502)
    budgets = dict(rep.DEFAULT_BUDGETS_MS, route_moved=1000, protected_again=3000)
    assert rep.over_budget(m, budgets, elapsed_ms=2500) == [{"step": "route_moved", "ms": 1900.0, "budget_ms": 1000}]
    late = rep.over_budget(m, budgets, elapsed_ms=3100)
    assert late[-1] == {"step": "protected_again", "ms": None, "budget_ms": 3000}
    assert rep.budget_sentence(late) == ("route_moved took 1900 ms (budget 1000 ms), protected_again not reached "
                                         "(budget 3000 ms)")


def test_without_the_peers_asn_the_route_is_not_judged():
    m = rep.move_timings("site-a", "site-b", BEGIN, SWITCHOVER, FROM_EVENTS, TO_EVENTS, None)
    skip = rep.unmeasured(None)
    assert m["route_moved_ms"] is None and rep.pending(m, skip) == []
    assert rep.finish({"moves": [m], "unmeasured": sorted(skip)})["verdict"] == "pass"
    assert rep.finish({"moves": [m]})["verdict"] == "fail"


def test_verdicts():
    m = rep.move_timings("site-a", "site-b", BEGIN, SWITCHOVER, FROM_EVENTS, TO_EVENTS, 64502)
    assert rep.finish({"moves": [m]})["verdict"] == "pass"
    assert rep.finish({"moves": [m], "rollback": {"ok": True, "reason": "r", "guest_at": "site-a"}})["verdict"] \
        == "rolled_back"
    assert rep.finish({"moves": [m], "rollback": {"ok": False, "reason": "r", "error": "e"}})["verdict"] == "fail"
    stall = {"name": "mc", "longest_stall_ms": 900.0, "max_stall_ms": 500.0}
    assert rep.finish({"moves": [m], "probes": [stall]})["verdict"] == "fail"
    assert rep.finish({"refused": "drill refused by pre-flight (peer): x"})["verdict"] == "refused"
    assert rep.finish({"refused": "x", "unattended": True})["verdict"] == "skipped"


def test_budget_overrides():
    assert rep.parse_budgets({"paused": 1.0}, ["route_moved=5"]) == {"paused": 1.0, "route_moved": 5.0}
    with pytest.raises(rep.BudgetError, match="must be one of"):
        rep.parse_budgets({}, ["routed=5"])


# ---------------------------------------------------------------- the runner on a fake pair

class FakePair:
    """Both sites' control APIs: status, timelines, the claim, a switchover that moves the guest."""

    def __init__(self, statuses, step_s=0.2, lose_epoch=False, refuse_switchover=None):
        self.statuses = statuses
        self.events = {"site-a": [], "site-b": []}
        self.step_s = step_s
        self.lose_epoch = lose_epoch
        self.refuse_switchover = refuse_switchover
        self.calls: list[tuple[str, str, str]] = []
        self.claims: dict[str, str] = {}
        self.asn = {"site-a": 64501, "site-b": 64502}

    def api(self, site):
        pair = self

        class Api:
            async def call(self, method, path, body=None, timeout=30.0):
                return pair.handle(site, method, path, body)
        return Api()

    def handle(self, site, method, path, body):
        self.calls.append((site, method, path.split("?")[0]))
        if self.statuses[site] is None:
            raise ControlError(f"{site}'s daemon is not running")
        if path == "/v1/status":
            return copy.deepcopy(self.statuses[site])
        if path.startswith("/v1/drills/events"):
            since = float(path.split("since=")[1])
            return {"site": site, "asn": self.asn[site], "version": "0.1.0",
                    "events": [e for e in self.events[site] if e["wall"] >= since]}
        if path == "/v1/drills/claim":
            if self.claims.get(site, body["id"]) != body["id"]:
                raise ControlError("drill X runs", 409)
            self.claims[site] = body["id"]
            return {}
        if path == "/v1/drills/release":
            self.claims.pop(site, None)
            return {}
        if path == "/v1/switchover":
            if self.refuse_switchover:
                raise ControlError(self.refuse_switchover, 409)
            return self.switch(site)
        raise AssertionError(path)

    def switch(self, frm):
        to = "site-b" if frm == "site-a" else "site-a"
        t, s = time.time(), self.step_s
        epoch = self.statuses[frm]["committed_epoch"] + 1
        self.events[frm] += [{"event": "switchover.begin", "wall": t},
                             {"event": "bgp.route_seen", "wall": t + 4 * s, "origins": [self.asn[to]]}]
        self.events[to] += [{"event": "lease.granted", "wall": t + s},
                            {"event": "takeover.resume_begin", "wall": t + s,
                             "epoch": epoch - (1 if self.lose_epoch else 0)},
                            {"event": "takeover.resumed", "wall": t + 2 * s}, {"event": "bgp.announced", "wall": t + 3 * s},
                            {"event": "protection.entered", "wall": t + 5 * s}]
        self.statuses[frm], self.statuses[to] = (dict(self.statuses[to], site=frm, committed_epoch=epoch),
                                                 dict(self.statuses[frm], site=to, committed_epoch=epoch))
        return {"from": frm, "to": to, "final_epoch": epoch, "paused_at_ms": 50.0, "standby_at_ms": 800.0}


def run(fake, **opts):
    sites = {n: fake.api(n) for n in ("site-a", "site-b")}
    return asyncio.run(Drill(sites, DrillOptions(poll_s=0.01, **opts)).run())


def test_a_refused_drill_moves_nothing_and_says_why():
    fake = FakePair(pair(b__ha__peer_alive=False))
    r = run(fake)
    assert r["verdict"] == "refused" and r["reason"].startswith("drill refused by pre-flight (peer)")
    assert not any(p == "/v1/switchover" for _, _, p in fake.calls)
    with pytest.raises(DrillRefused, match=r"^drill refused by pre-flight \(peer\)"):
        exit_code(r)


def test_unattended_the_drill_is_skipped_where_the_guest_does_not_run():
    r = run(FakePair(pair()), unattended=True, local="site-b")
    assert r["verdict"] == "skipped" and "the guest runs at site-a" in r["reason"] and exit_code(r) == 0


def test_another_drill_holding_the_pair_refuses_this_one():
    fake = FakePair(pair())
    fake.claims["site-b"] = "someone-else"
    r = run(fake)
    assert r["verdict"] == "refused" and "site-b refused the drill claim" in r["reason"]
    assert "site-a" not in fake.claims, "the claim taken at site-a is given back"


def test_there_and_back_passes_with_every_step_timed():
    fake = FakePair(pair(), step_s=0.01)
    r = run(fake, there_and_back=True)
    assert r["verdict"] == "pass", r["reason"]
    assert [(m["from"], m["to"]) for m in r["moves"]] == [("site-a", "site-b"), ("site-b", "site-a")]
    assert all(m[f"{s}_ms"] is not None for m in r["moves"] for s in rep.STEPS)
    assert [c for c in fake.calls if c[2] == "/v1/switchover"] == [("site-a", "POST", "/v1/switchover"),
                                                                    ("site-b", "POST", "/v1/switchover")]
    assert fake.claims == {} and exit_code(r) == 0


def test_a_step_over_budget_moves_the_guest_back():
    fake = FakePair(pair(), step_s=0.01)
    r = run(fake, budgets_ms=dict(rep.DEFAULT_BUDGETS_MS, announced=1))
    assert r["verdict"] == "rolled_back" and "announced took" in r["reason"], r["reason"]
    assert r["rollback"]["ok"] and r["rollback"]["guest_at"] == "site-a" and r["rollback"]["epochs_lost"] == 0
    assert fake.statuses["site-a"]["role"] == "primary" and exit_code(r) == 1


def test_a_rollback_that_loses_an_epoch_fails_the_drill():
    fake = FakePair(pair(), step_s=0.01)
    switch = fake.switch

    def lossy_back(frm):
        fake.lose_epoch = frm == "site-b"  # the move back resumes one epoch short
        return switch(frm)
    fake.switch = lossy_back
    r = run(fake, budgets_ms=dict(rep.DEFAULT_BUDGETS_MS, announced=1))
    assert r["verdict"] == "fail" and "1 epochs lost moving the guest back to site-a" in r["reason"], r["reason"]


def test_a_switchover_that_aborts_itself_is_a_rollback_in_place():
    fake = FakePair(pair(), refuse_switchover="switchover aborted: site-b did not take over within 15s; "
                                              "the guest runs on here")
    r = run(fake)
    assert r["verdict"] == "rolled_back" and r["rollback"]["guest_at"] == "site-a" and r["moves"] == []


# ---------------------------------------------------------------- the page, the store, the metrics

def finished_report():
    m = rep.move_timings("site-a", "site-b", BEGIN, SWITCHOVER, FROM_EVENTS, TO_EVENTS, 64502)
    r = {"id": rep.new_id(BEGIN), "started_at": BEGIN - 1, "pair": ["site-a", "site-b<x>"], "moves": [m],
         "budgets_ms": rep.DEFAULT_BUDGETS_MS, "checks": [c.as_dict() for c in ck.preflight(pair())],
         "probes": [{"name": "mc", "kind": "memcached", "target": "198.51.100.10:11211", "attempts": 50,
                     "failures": 0, "longest_stall_ms": 700.0, "stall_began_ms": 1100.0, "max_stall_ms": None}],
         "versions": {"runner": "0.1.0"}}
    return rep.finish(r, now=BEGIN + 5)


def test_the_html_page_is_self_contained_and_shows_the_timeline():
    page = html.render(finished_report())
    assert page.count("<svg") == 2 and "PASS" in page and "route seen moved" in page
    assert "1,900 ms" in page and "site-b&lt;x&gt;" in page and "<x>" not in page
    for fetch in ("<script", "<link", "src=", "url(", "@import"):
        assert fetch not in page


def test_reports_are_kept_private_listed_and_pruned(tmp_path):
    store = DrillStore(tmp_path / "drills", keep=2)
    ids = []
    for i in range(3):
        r = finished_report()
        r["id"] = rep.new_id(BEGIN + i)
        ids.append(r["id"])
        where = store.save(r)
    for p in (tmp_path / "drills").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "drills").stat().st_mode) == 0o700
    assert [d["id"] for d in store.list()] == [ids[2], ids[1]] and where["html"].endswith(".html")
    assert json.loads(store.path(ids[2], ".json").read_text())["verdict"] == "pass"
    with pytest.raises(Refused, match="no drill report"):
        store.path("../../etc/passwd", ".json")
    with pytest.raises(Refused, match="needs a verdict"):
        store.save({"id": rep.new_id()})


def test_one_drill_at_a_time_and_a_claim_lapses():
    now = [1000.0]
    store = DrillStore("/nonexistent", clock=lambda: now[0])
    store.take("d1", "timer", ttl_s=60)
    with pytest.raises(Refused, match="drill d1 \\(started by timer\\) runs since"):
        store.take("d2", "operator", ttl_s=60)
    now[0] += 61
    assert store.running() is None
    store.take("d2", "operator", ttl_s=60)
    assert not store.give_back("d1") and store.give_back("d2") and store.running() is None


def test_metrics_of_the_last_drill(tmp_path):
    store = DrillStore(tmp_path / "drills")
    store.save(finished_report())
    reg = CollectorRegistry()
    reg.register(DrillCollector(DrillStore(tmp_path / "drills")))  # a restarted daemon reads them back
    text = generate_latest(reg).decode()
    assert f"geomirror_drill_last_timestamp_seconds {BEGIN + 5:.9e}" in text or \
        f"geomirror_drill_last_timestamp_seconds {BEGIN + 5}" in text
    assert 'geomirror_drill_last_verdict{verdict="pass"} 1.0' in text
    assert 'geomirror_drill_last_verdict{verdict="fail"} 0.0' in text
    assert 'geomirror_drill_step_ms{from="site-a",move="1",step="route_moved",to="site-b"} 1900.0' in text
    assert "geomirror_drill_epochs_lost 0.0" in text and 'probe_longest_stall_ms{probe="mc"} 700.0' in text


# ---------------------------------------------------------------- probes

def test_the_longest_stall_is_the_longest_time_without_an_answer():
    clock = [10.0]
    p = Probe(ProbeSpec("mc", "memcached", "198.51.100.10", 11211), clock=lambda: clock[0])
    p.started = 10.0
    for t in (10.9, 11.0, 12.3, 12.4):  # the first answer took 0.9 s: opening the probe's connection
        p.ok(t)
    r = p.result(origin_mono=10.0, end=12.5)
    assert r["longest_stall_ms"] == 1300.0 and r["stall_began_ms"] == 1000.0
    assert p.result(origin_mono=10.0, end=14.0)["longest_stall_ms"] == 1600.0  # still silent at the end
    never = Probe(ProbeSpec("mc", "memcached", "198.51.100.10", 11211), clock=lambda: clock[0])
    never.started = 10.0
    assert never.result(origin_mono=10.0, end=13.0)["longest_stall_ms"] == 3000.0


async def test_a_memcached_probe_asks_version_on_one_connection():
    conns = []

    async def serve(r, w):
        conns.append(w)
        while (line := await r.readline()):
            w.write(b"VERSION 1.6.18\r\n" if line == b"version\r\n" else b"ERROR\r\n")
            await w.drain()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    p = Probe(ProbeSpec("mc", "memcached", "127.0.0.1", port, interval_ms=10))
    stop = asyncio.Event()
    task = asyncio.create_task(p.run(stop))
    while p.attempts < 5:
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert p.failures == 0 and len(conns) == 1
    assert await Probe(ProbeSpec("tcp", "tcp", "127.0.0.1", port)).attempt()
    srv.close()
    srv2 = await asyncio.start_server(serve, "127.0.0.1", 0)
    closed = srv2.sockets[0].getsockname()[1]
    srv2.close()
    await srv2.wait_closed()
    assert not await Probe(ProbeSpec("tcp", "tcp", "127.0.0.1", closed)).attempt()


# ---------------------------------------------------------------- config

def write(tmp_path, extra: str):
    base = (__import__("pathlib").Path(__file__).parent.parent / "configs" / "lab" / "site-a.toml").read_text()
    p = tmp_path / "site.toml"
    p.write_text(base + "\n" + extra)
    return p


def test_the_drill_section(tmp_path):
    cfg = load_site(write(tmp_path, """
[drill]
peer_control = "http://192.0.2.7:7780"
peer_token_file = "peer.token"
budget_route_moved_ms = 5000
[[drill.probe]]
name = "memcached"
kind = "memcached"
address = "198.51.100.10"
port = 11211
max_stall_ms = 3000
"""))
    d = cfg.drill
    assert d.peer_control == "http://192.0.2.7:7780" and d.peer_token_file == tmp_path / "peer.token"
    assert d.budgets_ms()["route_moved"] == 5000 and d.probes[0].max_stall_ms == 3000


@pytest.mark.parametrize("extra, key", [
    ('[drill]\npeer_control = "http://192.0.2.7:7780"', "drill.peer_token_file"),
    ('[drill]\npeer_control = "ftp://x"', "drill.peer_control"),
    ('[[drill.probe]]\nname = "p"\nkind = "sip"\naddress = "198.51.100.10"\nport = 5060', "drill.probe[0].kind"),
    ('[drill]\nbudget_paused_ms = 0', "drill.budget_paused_ms"),
])
def test_a_bad_drill_section_names_its_key(tmp_path, extra, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_site(write(tmp_path, extra))


# ---------------------------------------------------------------- the control API's drill routes

class DrillDaemon:
    """What the drill routes use of a daemon: its name and AS, timeline and DrillStore."""

    def __init__(self, d):
        from prometheus_client import CollectorRegistry as Registry
        self.name = "site-a"
        self.cfg = type("Cfg", (), {"site": type("Site", (), {"asn": 64501})()})()
        self.timeline = type("Tl", (), {"entries": [ev("switchover.begin", -10), ev("lease.granted", 1)]})()
        self.drills = DrillStore(d)
        self.metrics_registry = Registry()

    def status(self):  # the dashboard's view (make_app builds it for every app)
        return {}


async def test_the_drill_routes(tmp_path):
    from geomirror import control
    from geomirror.control import ControlClient

    daemon = DrillDaemon(tmp_path / "drills")
    sock = tmp_path / "c.sock"
    runner = await control.start(control.make_app(daemon, "tok"), "127.0.0.1", 0, sock)
    try:
        c = ControlClient("tok", sock, name="site-a's daemon")
        got = await c.call("GET", f"/v1/drills/events?since={BEGIN}")
        assert got["asn"] == 64501 and [e["event"] for e in got["events"]] == ["lease.granted"]
        await c.call("POST", "/v1/drills/claim", {"id": "d1", "by": "timer", "ttl_s": 60})
        with pytest.raises(ControlError, match="drill d1 \\(started by timer\\) runs since") as e:
            await c.call("POST", "/v1/drills/claim", {"id": "d2"})
        assert e.value.status == 409
        r = finished_report()
        where = await c.call("POST", "/v1/drills", {"report": r})
        listed = await c.call("GET", "/v1/drills")
        assert listed["running"]["id"] == "d1" and listed["drills"][0]["id"] == r["id"]
        assert (await c.call("GET", f"/v1/drills/{r['id']}"))["verdict"] == "pass"
        assert where["html"].endswith(".html")
        assert (await c.call("POST", "/v1/drills/release", {"id": "d1"}))["released"] is True
        with pytest.raises(ControlError, match="no drill report"):
            await c.call("GET", "/v1/drills/nope")
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------- the command line

def test_a_drill_without_the_peers_control_api_is_one_sentence(tmp_path, capsys, monkeypatch):
    from geomirror import cli
    from geomirror.plugins import Extensions

    monkeypatch.setattr("os.geteuid", lambda: 0)
    cfg = write(tmp_path, "")
    assert cli.main(["drill", "--config", str(cfg)], extensions=Extensions()) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"geomirror: a drill needs site-b's control API too: set drill.peer_control and "
                   f"drill.peer_token_file in {cfg}")


class SipResponder(asyncio.DatagramProtocol):
    """A PBX's answer to OPTIONS: 200 (or `code`) echoing the Call-ID; also a stray 200 first."""

    def __init__(self, code=b"200 OK"):
        self.code, self.seen = code, []

    def connection_made(self, transport):
        self.t = transport

    def datagram_received(self, data, addr):
        self.seen.append(data)
        call_id = next(ln for ln in data.split(b"\r\n") if ln.startswith(b"Call-ID:"))
        self.t.sendto(b"SIP/2.0 200 OK\r\nCall-ID: someone-else\r\nContent-Length: 0\r\n\r\n", addr)  # not ours
        self.t.sendto(b"SIP/2.0 100 Trying\r\n" + call_id + b"\r\nContent-Length: 0\r\n\r\n", addr)
        self.t.sendto(b"SIP/2.0 " + self.code + b"\r\n" + call_id + b"\r\nContent-Length: 0\r\n\r\n", addr)


async def test_a_sip_options_probe_waits_for_the_200_to_its_own_request():
    loop = asyncio.get_running_loop()
    t, pbx = await loop.create_datagram_endpoint(SipResponder, local_addr=("127.0.0.1", 0))
    port = t.get_extra_info("sockname")[1]
    p = Probe(ProbeSpec("sip", "sip-options", "127.0.0.1", port, timeout_ms=1000))
    assert await p.attempt() and await p.attempt() and p.failures == 0
    first = pbx.seen[0].decode()
    assert first.startswith(f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n") and "CSeq: 1 OPTIONS" in first
    assert "CSeq: 2 OPTIONS" in pbx.seen[1].decode() and first.endswith("\r\n\r\n")
    t.close()
    t2, _ = await loop.create_datagram_endpoint(lambda: SipResponder(b"503 Service Unavailable"),
                                                local_addr=("127.0.0.1", 0))
    busy = Probe(ProbeSpec("sip", "sip-options", "127.0.0.1", t2.get_extra_info("sockname")[1], timeout_ms=500))
    assert not await busy.attempt() and "error" in busy.last_error
    t2.close()
    silent = Probe(ProbeSpec("sip", "sip-options", "127.0.0.1", port, timeout_ms=200))  # nobody there now
    assert not await silent.attempt()


def test_sip_replies_are_matched_by_call_id_and_final_code():
    from geomirror.drill.probes import sip_reply_ok

    ok = b"SIP/2.0 200 OK\r\nVia: x\r\nCall-ID: abc@h\r\n\r\n"
    assert sip_reply_ok(ok, "abc@h") is True
    assert sip_reply_ok(ok, "other") is None
    assert sip_reply_ok(b"SIP/2.0 180 Ringing\r\nCall-ID: abc@h\r\n\r\n", "abc@h") is None
    assert sip_reply_ok(b"SIP/2.0 404 Not Found\r\ni: abc@h\r\n\r\n", "abc@h") is False
    assert sip_reply_ok(b"garbage", "abc@h") is None and sip_reply_ok(b"", "abc@h") is None


class DropsFirst(SipResponder):
    """The first datagram is lost on the way (never answered)."""

    def datagram_received(self, data, addr):
        if not getattr(self, "lost", None):
            self.lost = data
            return
        super().datagram_received(data, addr)


async def test_a_sip_options_probe_sends_its_request_again_after_t1_as_a_phone_does(monkeypatch):
    from geomirror.drill import probes

    monkeypatch.setattr(probes, "SIP_T1_S", 0.05)
    loop = asyncio.get_running_loop()
    t, pbx = await loop.create_datagram_endpoint(DropsFirst, local_addr=("127.0.0.1", 0))
    p = Probe(ProbeSpec("sip", "sip-options", "127.0.0.1", t.get_extra_info("sockname")[1], timeout_ms=2000))
    assert await p.attempt()
    assert pbx.seen == [pbx.lost]  # the same request (branch, CSeq) again, answered this time
    t.close()
