"""Reprotection and failback in the lab, on one client connection: site A is lost, site B
takes over; A comes back (`geomirror rejoin`: its replica seeded from its last RAM image)
and becomes B's standby with a resync of only what changed; then B is lost and A takes
the guest back. The client's `incr` replies stay strictly consecutive throughout."""

from __future__ import annotations

import time

import pytest

from lab import cli as labcli, world
from tests.test_bgp_failover import AS_A, AS_B, Client, best_origin, wait_for

pytestmark = pytest.mark.lab

RAM = 128 << 20


def test_lost_taken_over_rejoined_and_failed_back_on_one_connection(lab_up):
    c = Client()
    c.start()
    time.sleep(1.5)
    world.crash("site-a")
    first = labcli.takeover("site-b", timeout=60)
    wait_for(lambda: best_origin() == AS_B, 30, "BIRD's best route to come from site B")
    b = labcli.site_status("site-b")
    assert b["ha_state"] == "active_unprotected" and not b["protected"]

    t0 = time.monotonic()
    said = world.revive("site-a")
    assert "seeded from its last RAM image" in said, said
    b = wait_for(lambda: (s := labcli.site_status("site-b")) and s["protected"] and s["ha_state"] == "active_protected"
                 and s, 180, "site B to be protected by the rejoined site A")
    reprotect_s = time.monotonic() - t0
    rep = b["replication"]
    assert rep["last_sync_mode"] == "resync", rep
    assert rep["last_sync_bytes"] < RAM // 4, f"rejoin resync sent {rep['last_sync_bytes']} bytes for {RAM}"
    a = wait_for(lambda: (s := labcli.site_status("site-a")) and s["committed_epoch"] > 0 and s, 30,
                 "site A to commit an epoch of B's run")
    assert a["role"] == "standby" and a["replication"]["peer_cert_serial"] == b["tls"]["serial"]
    time.sleep(1.5)  # a few epochs with output commit back on

    world.crash("site-b")
    second = labcli.takeover("site-a", timeout=60)
    wait_for(lambda: best_origin() == AS_A, 30, "BIRD's best route to come from site A again")
    time.sleep(1.5)
    res = c.finish()
    assert res.ops > 100
    print(f"\nfailback: B took over at epoch {first['epoch']}; A rejoined and B was protected again "
          f"{reprotect_s:.1f}s after A's daemon started, resync {rep['last_sync_bytes']} bytes for a "
          f"{RAM >> 20} MB guest; A took the guest back at epoch {second['epoch']}; "
          f"{len(res.incrs)} consecutive incr replies on one connection, longest stall {res.longest_stall_s:.2f}s")
