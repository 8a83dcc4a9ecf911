"""BGP failover in the lab with real ExaBGP, BIRD, the witness and QEMU."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from lab import cli as labcli, world
from tests import torture

pytestmark = pytest.mark.lab

AS_A, AS_B = 64501, 64502


def origins() -> set[int]:
    """The origin ASes BIRD currently holds routes for the guest prefix from."""
    return {r["as_path"][-1] for r in world.bird_guest_routes() if r["as_path"]}


def best_origin() -> int | None:
    for r in world.bird_guest_routes():
        if r["best"] and r["as_path"]:
            return r["as_path"][-1]
    return None


class Client(threading.Thread):
    """A memcached client on one connection (to the guest's IPv4 address unless `host` names
    another, e.g. world.GUEST_ADDR6) running incr as fast as replies come."""

    def __init__(self, host: str = world.GUEST_ADDR):
        super().__init__(daemon=True)
        self.mc = labcli.Memcache(labcli.client_connect(host, timeout=60))
        self.mc.set("ctr", "0")
        self.res = torture.TrialResult(seed=0, crash_after_s=0)
        self.stop = threading.Event()

    def run(self):
        torture._client(self.mc, self.stop, self.res)

    def finish(self):
        self.stop.set()
        self.join(90)
        assert not self.is_alive(), "client stuck"
        torture.check(self.res, self.mc)
        assert self.res.error is None, self.res.error
        assert not self.res.violations, self.res.violations
        return self.res


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_lab_routes_the_guest_by_bgp_from_site_a(lab_up):
    routes = world.bird_guest_routes()
    assert routes and all(r["proto"] != "lab_static" for r in routes), routes
    assert best_origin() == AS_A


def test_site_loss_bgp_flips_and_the_session_survives(lab_up):
    c = Client()
    c.start()
    time.sleep(1.5)
    t_crash = time.time()
    world.crash("site-a")
    wait_for(lambda: best_origin() == AS_B, 60, "BIRD's best route to come from AS 64502")
    t_route = time.time()
    time.sleep(1.5)
    res = c.finish()
    b = labcli.site_status("site-b")
    ev = {e["event"]: e for e in b["timeline"]}
    detect = next(e["wall"] for e in b["timeline"] if e["event"] == "ha.state" and e.get("why") == "peer lost")
    resumed, announced = ev["takeover.resumed"], ev["bgp.announced"]
    print(f"\nsite loss: detection {detect - t_crash:.2f}s, lease+resume at {resumed['wall'] - t_crash:.2f}s "
          f"(resume {resumed['total_ms']} ms from the hot standby), announce -> route installed in BIRD "
          f"{max(0.0, t_route - announced['wall']):.2f}s, client's longest stall {res.longest_stall_s:.2f}s, "
          f"{len(res.incrs)} consecutive incr replies")
    assert b["role"] == "primary" and b["lease_generation"] == 2


def test_partition_no_takeover_never_two_announcing(lab_up):
    c = Client()
    c.start()
    time.sleep(1.0)
    seen_both = []
    stop = threading.Event()

    def watch_bird():
        while not stop.is_set():
            o = origins()
            if {AS_A, AS_B} <= o:
                seen_both.append(time.time())
            time.sleep(0.1)

    w = threading.Thread(target=watch_bird, daemon=True)
    w.start()
    world.partition(False)
    time.sleep(6)
    a, b = labcli.site_status("site-a"), labcli.site_status("site-b")
    assert b["role"] == "standby" and b["ha_state"] in ("standby", "taking_over"), b["ha_state"]
    assert a["role"] == "primary"
    world.partition(True)
    wait_for(lambda: (labcli.site_status("site-a") or {}).get("replication", {}).get("state") == "protected"
             and labcli.site_status("site-a")["replication"]["sessions"] >= 2, 60, "protection to resume")
    time.sleep(1.0)
    stop.set()
    w.join()
    res = c.finish()
    a = labcli.site_status("site-a")
    assert a["replication"]["last_sync_mode"] == "resync"
    assert not seen_both, f"BIRD had the prefix from both sites at {seen_both[:3]}"
    assert labcli.site_status("site-b")["role"] == "standby"
    print(f"\npartition 6s: no takeover, never two origins in BIRD, resync sent "
          f"{a['replication']['last_sync_bytes']} bytes, client's longest stall {res.longest_stall_s:.2f}s")


def _kill_witness():
    pid = world.load_state()["pids"]["witness"]
    os.kill(pid, signal.SIGKILL)


def test_witness_down_nothing_changes_then_site_loss_needs_promote(lab_up):
    c = Client()
    c.start()
    _kill_witness()
    time.sleep(5)  # well past the 2 s lease
    a = labcli.site_status("site-a")
    assert a["role"] == "primary" and a["ha_state"] == "active_protected" and a["gate"]["allowed"], a["ha_state"]
    assert any("witness unreachable" in m for m in a["alarms"]), a["alarms"]
    assert best_origin() == AS_A
    ops_before = c.res.ops
    time.sleep(1)
    assert c.res.ops > ops_before, "the client stopped while only the witness was down"
    world.crash("site-a")
    time.sleep(4)
    b = labcli.site_status("site-b")
    assert b["role"] == "standby", "took over without a lease while the witness was down"
    assert any("witness is unreachable" in m for m in b["alarms"]), b["alarms"]
    rep = labcli.site_call("site-b", "POST", "/v1/promote", {"force": True}, timeout=60)
    assert rep["state"] == "active_unprotected"
    wait_for(lambda: best_origin() == AS_B, 60, "the route to follow the promoted site")
    time.sleep(1)
    res = c.finish()
    print(f"\nwitness down: primary rode through; site loss then: standby refused ({b['alarms'][-1][:80]}...), "
          f"promote --force resumed epoch {rep['epoch']}; client's longest stall {res.longest_stall_s:.2f}s")


def test_exabgp_killed_at_the_primary_is_restarted_and_reannounces(lab_up):
    c = Client()
    c.start()
    a = labcli.site_status("site-a")
    pid = a["bgp"]["exabgp_pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (labcli.site_status("site-a")["bgp"]["exabgp_pid"] or pid) != pid, 30, "ExaBGP to restart")
    wait_for(lambda: best_origin() == AS_A and labcli.site_status("site-a")["bgp"]["neighbors"].get("198.18.1.1")
             == "up", 60, "the route to be announced again")
    time.sleep(1)
    res = c.finish()
    a = labcli.site_status("site-a")
    assert a["bgp"]["exabgp_restarts"] >= 1 and a["role"] == "primary"
    print(f"\nExaBGP killed: restarted, route back; client's longest stall {res.longest_stall_s:.2f}s")
