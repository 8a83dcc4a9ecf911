"""Checkpoint engine end to end in the lab: checkpoints flow from site A to site B while a
client works on one TCP connection; the primary QEMU is SIGKILLed; site B resumes the
guest from its replica; the same connection carries on with no reset."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lab import cli as labcli, world

pytestmark = pytest.mark.lab


def wait_epoch_beyond(site: str, epoch: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = labcli.site_status(site) or {}
        if st.get("committed_epoch", 0) > epoch:
            return st["committed_epoch"]
        time.sleep(0.05)
    raise AssertionError(f"{site} committed no epoch beyond {epoch} in {timeout}s")


def test_kill_primary_qemu_resume_at_standby_same_connection(lab_up):
    labcli.wan(rtt="25ms")  # the sites are a WAN apart; the channel is mutual TLS
    mc = labcli.Memcache(labcli.client_connect(timeout=30))
    assert mc.set("counter", "0") == b"STORED"
    stored = {}
    last = 0
    for i in range(200):
        last = mc.incr("counter")
        assert last == i + 1
        if i % 10 == 0:
            k, v = f"k{i}", f"value-{i}-" + "x" * (i % 50)
            assert mc.set(k, v) == b"STORED"
            stored[k] = v.encode()
    # The client pauses; the next checkpoint is acknowledged by the standby.
    a = labcli.site_status("site-a")
    epoch = wait_epoch_beyond("site-a", a["committed_epoch"])
    b = labcli.site_status("site-b")
    assert b["committed_epoch"] >= epoch
    assert a["last_pause_ms"] is not None and a["last_pause_ms"] > 0
    assert a["rtt_ms"] > 20, f"the channel measured RTT {a['rtt_ms']} ms on a 25 ms WAN"

    os.kill(a["guest_pid"], signal.SIGKILL)
    t0 = time.monotonic()
    report = labcli.takeover("site-b", promote=True)
    assert report["epoch"] >= epoch

    # The same connection: no reset, the counter continues from the last value seen.
    assert mc.incr("counter") == last + 1
    stall = time.monotonic() - t0
    for k, v in stored.items():
        assert mc.get(k) == v, f"{k} lost after failover"
    assert mc.incr("counter") == last + 2
    b = labcli.site_status("site-b")
    assert b["role"] == "primary"
    print(f"\nfailover: resumed epoch {report['epoch']} in {report['resume']['total_ms']} ms "
          f"(hot standby: {report['resume'].get('hot_standby')}), client stall {stall:.2f}s, "
          f"last pause at primary {a['last_pause_ms']} ms")
    mc.close()


def test_resync_after_wan_cut_sends_far_less_than_ram(lab_up):
    labcli.wan(rtt="25ms")
    mc = labcli.Memcache(labcli.client_connect(timeout=60))
    assert mc.set("before", "cut") == b"STORED"
    a0 = labcli.site_status("site-a")
    assert a0["replication"]["sessions"] == 1
    world.partition(False)
    time.sleep(10)
    world.partition(True)
    deadline = time.monotonic() + 60
    a = a0
    while time.monotonic() < deadline:
        a = labcli.site_status("site-a")
        r = a["replication"]
        if r["sessions"] >= 2 and r["state"] == "protected" and a["committed_epoch"] > a0["committed_epoch"]:
            break
        time.sleep(0.2)
    r = a["replication"]
    assert r["state"] == "protected" and r["last_sync_mode"] == "resync", r
    ram = 128 << 20
    print(f"\nresync after a 10 s WAN cut: {r['last_sync_bytes']} bytes on the wire, guest RAM {ram} bytes "
          f"({r['last_sync_bytes'] / ram:.3f} of RAM)")
    assert r["last_sync_bytes"] < ram / 4
    # output flows again, nothing lost
    assert mc.get("before") == b"cut"
    assert mc.set("after", "heal") == b"STORED"
    mc.close()
