"""The disk guest in the lab (real QEMU, ExaBGP, BIRD): no acknowledged disk write is lost when
the primary site is lost at a random moment (a few trials in CI; the long run is
`python -m tests.disk_torture --trials 10`, and `--no-disk-replication` shows that the check has
teeth)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from lab import cli as labcli, world
from tests import disk_torture
from tests.test_bgp_failover import AS_A, AS_B, wait_for
from tests.test_restart import protected_again
from tests.test_switchover import switchover

pytestmark = pytest.mark.lab

TRIALS = int(os.environ.get("GEOMIRROR_DISK_TORTURE_TRIALS", "2"))


@pytest.mark.parametrize("trial", range(TRIALS))
def test_crash_at_random_moment_every_acknowledged_record_reads_back(lab_env, trial):
    r = disk_torture.run_trial(seed=2000 + trial)
    print(f"\ntrial {trial}: {disk_torture.summary(r)}")
    assert r.error is None, r.error
    assert r.appends_before_crash > 3 and len(r.acked) > r.appends_before_crash, "the client did no work"
    assert not r.violations, r.violations


def _disk_line(site: str, rep: dict) -> str:
    return (f"{site}'s disk sync sent {rep['last_disk_sync_chunks']} of {rep['disk_bytes'] // 65536} chunks "
            f"({rep['last_disk_sync_bytes']} bytes on the wire), RAM {rep['last_sync_mode']} "
            f"{rep['last_sync_bytes']} bytes")


def test_switchover_there_and_back_and_a_daemon_restart_keep_every_record(lab_env):
    """With the journal client appending all along on one connection: a switchover to site B
    (site A's disk becomes the replica: the resync sends only the chunks that differ), back to
    site A, then site A's daemon SIGKILLed and started again (QEMU reconnects to the new disk
    server; the writes the old one recorded and never sent reach site B by the session's disk
    sync). Every acknowledged record reads back, and site B's replica disk is then resumable:
    site A lost, site B takes over, the records are still all there."""
    lab_env.up(disk=True, config_edits={"lease_ttl_ms = 2000": "lease_ttl_ms = 6000"})
    labcli.wait_protected()
    labcli.wait_reachable()
    res = disk_torture.TrialResult(seed=7, crash_after_s=0)
    j = labcli.journal_connect(timeout=60)
    stop = threading.Event()
    t = threading.Thread(target=disk_torture._client, args=(j, stop, res), daemon=True)
    t.start()
    lines = []
    time.sleep(2)
    there = switchover("site-a", "site-b", AS_B)
    lines.append("switchover there: " + _disk_line("site-b", labcli.site_status("site-b")["replication"]))
    time.sleep(2)
    back = switchover("site-b", "site-a", AS_A)
    lines.append("switchover back: " + _disk_line("site-a", labcli.site_status("site-a")["replication"]))
    for leg in (there, back):
        assert leg["resync_bytes"] < 16 << 20, f"the reverse resync sent {leg['resync_bytes']} bytes"
    time.sleep(2)
    n0, wall = len(res.acked), time.time()
    world.restart("site-a", kill=True)
    a = protected_again("site-a", wall)
    rep = a["replication"]
    assert a["role"] == "primary" and rep["last_sync_mode"] == "resync"
    lines.append("site-a daemon SIGKILLed and restarted: " + _disk_line("site-a", rep))
    wait_for(lambda: len(res.acked) > n0 + 5 or res.error, 60, "appends after the restart")
    time.sleep(1)
    world.crash("site-a")
    labcli.takeover("site-b")
    time.sleep(1)
    stop.set()
    t.join(90)
    assert not t.is_alive() and res.error is None, res.error
    j.close()
    disk_torture.check(res, labcli.journal_connect(timeout=30))
    assert not res.violations, res.violations
    print("\n" + "\n".join(lines) + f"\nclient: {len(res.acked)} records acknowledged on one connection, all read "
          f"back from site-b's disk after site-a was lost; count {res.count}; longest stall {res.longest_stall_s:.2f}s")
