"""Site-evacuation drills in the lab (geomirror/drill): there and back under a live memcached
client with every step timed and nothing lost; refused by pre-flight when the standby cannot
take over; rolled back when a step is over its budget."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geomirror.drill.report import STEPS
from lab import cli as labcli
from tests.test_bgp_failover import Client, wait_for

pytestmark = pytest.mark.lab


def test_drill_there_and_back_loses_nothing_and_times_every_step(lab_up):
    c = Client()
    c.start()
    time.sleep(1.5)
    report, kept = labcli.drill(there_and_back=True)
    time.sleep(1.0)
    res = c.finish()  # strictly consecutive incr replies on one connection, or it raises
    print("\n" + json.dumps({k: report[k] for k in ("verdict", "reason", "moves", "probes")}, indent=1))
    assert report["verdict"] == "pass", report["reason"]
    assert [(m["from"], m["to"]) for m in report["moves"]] == [("site-a", "site-b"), ("site-b", "site-a")]
    for m in report["moves"]:
        assert m["epochs_lost"] == 0 and m["final_epoch"] == m["resumed_epoch"] > 0, m
        timed = [m[f"{s}_ms"] for s in STEPS]
        assert all(v is not None and v >= 0 for v in timed), m
        # "announced" is both prefixes of the dual-stack guest; the route seen moved is the IPv4 one,
        # which may move before the IPv6 announcement is through
        assert m["paused_ms"] <= m["resumed_ms"] <= m["announced_ms"], json.dumps(m)
        assert m["resumed_ms"] <= m["route_moved_ms"], json.dumps(m)
    assert {p["name"] for p in report["probes"]} == {"memcached", "tcp-connect", "sip-options"}
    assert all(p["attempts"] > 5 for p in report["probes"]), report["probes"]  # each ran through the drill
    assert len(res.incrs) > 50
    for site in ("site-a", "site-b"):
        html = Path(kept[site]["html"])
        assert stat.S_IMODE(html.stat().st_mode) == 0o600 and stat.S_IMODE(html.parent.stat().st_mode) == 0o700
        assert "<svg" in html.read_text() and "PASS" in html.read_text()
    keep = Path(os.environ.get("GM_TEST_ARTIFACTS", "/tmp/gm-test-artifacts"))  # the page, to look at
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(kept["site-a"]["html"], keep / "drill-there-and-back.html")
    listed = labcli.site_call("site-b", "GET", "/v1/drills")
    assert listed["drills"][0]["id"] == report["id"] and listed["running"] is None
    print(f"client: {len(res.incrs)} consecutive incr replies, longest stall {res.longest_stall_s:.2f}s; "
          f"report {kept['site-a']['html']}")


def test_drill_is_refused_by_preflight_when_the_wan_is_cut(lab_up):
    lab_up.partition(False)
    wait_for(lambda: not ((labcli.site_status("site-b") or {}).get("ha") or {}).get("peer_alive"), 30,
             "site-b to stop hearing site-a")
    out = subprocess.run([sys.executable, "-m", "geomirror", "lab", "drill"], capture_output=True, text=True,
                         timeout=120)
    print(out.stdout, out.stderr)
    assert out.returncode == 2, (out.stdout, out.stderr)
    err = out.stderr.strip().splitlines()[-1]
    assert err.startswith("geomirror: drill refused by pre-flight (") and err.count(".") <= 2, err
    a = labcli.site_status("site-a")
    assert a["role"] == "primary", "a refused drill must not move the guest"
    last = labcli.site_call("site-a", "GET", "/v1/drills")["drills"][0]
    assert last["verdict"] == "refused"


def test_drill_step_over_budget_rolls_back(lab_up):
    c = Client()
    c.start()
    time.sleep(1.0)
    report, _ = labcli.drill(budgets=["route_moved=1"])
    res = c.finish()
    print("\n" + json.dumps({k: report[k] for k in ("verdict", "reason", "rollback")}, indent=1, default=str))
    assert report["verdict"] == "rolled_back", report["reason"]
    assert "route_moved" in report["reason"] and "budget 1 ms" in report["reason"]
    assert report["rollback"]["ok"] and report["rollback"]["guest_at"] == "site-a"
    assert report["moves"][0]["epochs_lost"] == 0 and report["rollback"]["epochs_lost"] == 0
    assert labcli.site_status("site-a")["role"] == "primary"
    assert len(res.incrs) > 20
    keep = Path(os.environ.get("GM_TEST_ARTIFACTS", "/tmp/gm-test-artifacts"))
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(labcli.site_call("site-a", "GET", "/v1/drills")["drills"][0]["html"]),
                keep / "drill-rolled-back.html")
