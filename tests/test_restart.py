"""The guest does not depend on the service process (DESIGN.md, property 7), in the lab under
a live memcached client on one connection:

* the primary's daemon SIGKILLed and started again at once, then SIGTERMed and started again,
  then the standby's daemon SIGKILLed: the same QEMU runs on, the connection carries on with
  consecutive replies, nothing STORED is lost, and protection comes back with a resync of
  what changed, not a full initial sync;
* a restart slower than the lease: site B takes over, site A comes back as its standby by
  itself, and no QEMU of the old run is left;
* site A cut off from everything for longer than the lease, then healed: it becomes the
  standby by itself and protection resumes."""

from __future__ import annotations

import time

import pytest

from lab import cli as labcli, world
from tests.test_bgp_failover import AS_B, Client, best_origin, wait_for

pytestmark = pytest.mark.lab

RAM = 128 << 20


def qemu_pids(site: str) -> list[int]:
    out = []
    for pid in world.pids_in_netns(world.SITES[site]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu-system" in f.read().split(b"\0")[0]:
                    out.append(pid)
        except OSError:
            pass
    return out


def protected_again(site: str, since_wall: float, timeout: float = 120) -> dict:
    """The site's status once it is protected by a session that began after `since_wall`."""
    return wait_for(lambda: (s := labcli.site_status(site, timeout=3)) and s.get("protected")
                    and s.get("ha_state") == "active_protected"
                    and any(e["event"] == "protection.entered" and e["wall"] > since_wall for e in s["timeline"])
                    and s, timeout, f"{site} to be protected again")


def test_daemon_restarts_keep_the_guest_and_resync_only_what_changed(lab_env):
    # the production default lease (6 s): a daemon restart fits in it, so no takeover happens
    lab_env.up(config_edits={"lease_ttl_ms = 2000": "lease_ttl_ms = 6000"})
    labcli.wait_protected()
    labcli.wait_reachable()
    c = Client()
    c.start()
    time.sleep(1.5)
    a = labcli.site_status("site-a")
    guest_pid = a["guest_pid"]
    assert guest_pid and qemu_pids("site-a") == [guest_pid]
    lines = []
    for site, kill in (("site-a", True), ("site-a", False), ("site-b", True)):
        t0, wall = time.monotonic(), time.time()
        r = world.restart(site, kill=kill)
        a = protected_again("site-a", wall)
        took = time.monotonic() - t0
        rep = a["replication"]
        assert a["guest_pid"] == guest_pid and qemu_pids("site-a") == [guest_pid], "the same QEMU runs on"
        assert a["role"] == "primary" and a["lease_generation"] == 1, "no takeover happened"
        assert rep["last_sync_mode"] == "resync", rep
        assert rep["last_sync_bytes"] < RAM // 4, f"resync sent {rep['last_sync_bytes']} bytes for {RAM}"
        lines.append(f"{site} SIG{'KILL' if kill else 'TERM'}: stopped in {r['stopped_s']:.2f}s, protected "
                     f"again {took:.1f}s after the signal, resync {rep['last_sync_bytes']} bytes")
        time.sleep(1.0)
    b = labcli.site_status("site-b")
    assert b["role"] == "standby" and b["replication"]["valid"]
    res = c.finish()
    assert len(res.incrs) > 10
    print("\n" + "\n".join(lines) + f"\n{len(res.incrs)} consecutive incr replies on one connection, "
          f"{len(res.stored)} STORED values read back, longest stall {res.longest_stall_s:.2f}s")


def test_a_restart_slower_than_the_lease_hands_over_and_the_old_primary_rejoins(lab_up):
    c = Client()
    c.start()
    time.sleep(1.5)
    old_guest = labcli.site_status("site-a")["guest_pid"]
    t0, wall = time.monotonic(), time.time()
    world.restart("site-a", kill=True, delay_s=5.0)  # the lab's lease: 2 s
    wait_for(lambda: best_origin() == AS_B, 60, "BIRD's best route to come from site B")
    b = protected_again("site-b", wall, timeout=180)
    took = time.monotonic() - t0
    a = labcli.site_status("site-a")
    assert a["role"] == "standby" and a["ha_state"] == "standby", (a["role"], a["ha_state"])
    assert any(e["event"] == "rejoin.begin" for e in a["timeline"]), "it rejoined by itself"
    assert old_guest not in qemu_pids("site-a"), "the old run's QEMU is gone"
    assert len(qemu_pids("site-a")) <= 1, "at most the hot standby runs at site A"
    rep = b["replication"]
    assert rep["last_sync_mode"] == "resync" and rep["last_sync_bytes"] < RAM // 4, rep
    res = c.finish()
    print(f"\nslow restart: B took over, A rejoined by itself; B protected again {took:.1f}s after the kill, "
          f"resync {rep['last_sync_bytes']} bytes; {len(res.incrs)} consecutive replies, longest stall "
          f"{res.longest_stall_s:.2f}s")


def test_an_isolated_primary_comes_back_as_the_standby_by_itself(lab_up):
    c = Client()
    c.start()
    time.sleep(1.5)
    ns = world.SITES["site-a"]
    world.set_links(ns, False)  # cut off from the WAN, the witness and its upstream; alive
    try:
        wait_for(lambda: best_origin() == AS_B, 60, "BIRD's best route to come from site B")
        time.sleep(3.0)  # well past the lease: A has fenced itself
    finally:
        world.set_links(ns, True)
    t0, wall = time.monotonic(), time.time()
    b = protected_again("site-b", wall, timeout=180)
    took = time.monotonic() - t0
    a = labcli.site_status("site-a")
    assert a["role"] == "standby", a["role"]
    assert any(e["event"] == "rejoin.begin" for e in a["timeline"])
    res = c.finish()
    print(f"\nisolation healed: A rejoined as B's standby, B protected {took:.1f}s after the heal, resync "
          f"{b['replication']['last_sync_bytes']} bytes; {len(res.incrs)} consecutive replies")


def test_a_fenced_primary_restarted_takes_up_its_guest_and_rejoins_the_site_that_took_over(lab_up):
    """The operator fences site A (it releases the lease) and restarts its daemon: B takes over
    meanwhile. A comes back, takes up its fenced guest (no orphan QEMU, nothing released), sees
    B's newer generation and becomes its standby by itself."""
    c = Client()
    c.start()
    time.sleep(1.0)
    guest_pid = labcli.site_status("site-a")["guest_pid"]
    labcli.site_call("site-a", "POST", "/v1/fence", {"reason": "operator"})
    wall = time.time()
    world.restart("site-a")
    wait_for(lambda: best_origin() == AS_B, 60, "BIRD's best route to come from site B")
    b = protected_again("site-b", wall, timeout=180)
    a = labcli.site_status("site-a")
    assert a["role"] == "standby" and any(e["event"] == "guest.attached" for e in a["timeline"]), a["role"]
    assert guest_pid not in qemu_pids("site-a"), "the fenced run's QEMU is gone once A rejoined"
    res = c.finish()
    print(f"\nfenced, restarted, rejoined: B protected again (resync {b['replication']['last_sync_bytes']} bytes); "
          f"{len(res.incrs)} consecutive replies, longest stall {res.longest_stall_s:.2f}s")
