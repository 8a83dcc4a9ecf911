"""Planned switchover (a site-evacuation drill) in the lab, there and back, on one client
connection: nothing is lost, BGP follows, and the site handed over from becomes the
standby at once, so protection resumes with a resync of next to nothing."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from lab import cli as labcli
from tests.test_bgp_failover import AS_A, AS_B, Client, best_origin, wait_for

pytestmark = pytest.mark.lab


def switchover(frm: str, to: str, as_to: int) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "geomirror", "switchover", "--lab-site", frm],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"the guest moved from {frm} to {to} at epoch" in out.stdout
    wait_for(lambda: best_origin() == as_to, 30, f"BIRD's best route to come from {to}")
    routed = time.monotonic() - t0
    st = wait_for(lambda: (s := labcli.site_status(to)) and s["protected"] and s["ha_state"] == "active_protected" and s,
                  120, f"{to} to be protected by {frm}")
    reprotected = time.monotonic() - t0
    old = labcli.site_status(frm)
    assert old["role"] == "standby" and old["ha_state"] == "standby"
    rep = st["replication"]
    assert rep["last_sync_mode"] == "resync", rep
    report = next(e for e in reversed(labcli.site_status(frm)["timeline"]) if e["event"] == "switchover.done")
    return {"routed_s": routed, "reprotected_s": reprotected, "resync_bytes": rep["last_sync_bytes"],
            "report": report, "line": out.stdout.strip()}


def test_switchover_there_and_back_loses_nothing(lab_up):
    c = Client()
    c.start()
    time.sleep(1.5)
    there = switchover("site-a", "site-b", AS_B)
    time.sleep(1.5)
    back = switchover("site-b", "site-a", AS_A)
    time.sleep(1.5)
    res = c.finish()
    assert res.ops > 50
    for leg in (there, back):
        assert leg["resync_bytes"] < 4 << 20, f"the reverse resync sent {leg['resync_bytes']} bytes"
    print("\nswitchover there: " + there["line"] + f"; BGP moved {there['routed_s']:.2f}s, protected again "
          f"{there['reprotected_s']:.2f}s after the command, reverse resync {there['resync_bytes']} bytes")
    print("switchover back:  " + back["line"] + f"; BGP moved {back['routed_s']:.2f}s, protected again "
          f"{back['reprotected_s']:.2f}s, reverse resync {back['resync_bytes']} bytes")
    print(f"client: {len(res.incrs)} consecutive incr replies on one connection, longest stall "
          f"{res.longest_stall_s:.2f}s")
