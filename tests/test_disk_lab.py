"""The disk guest in the lab (real QEMU, ExaBGP, BIRD): no acknowledged disk write is lost when
the primary site is lost at a random moment (a few trials in CI; the long run is
`python -m tests.disk_torture --trials 10`, and `--no-disk-replication` shows that the check has
teeth); in one more lab run, switchovers, a daemon restart, a site loss, the lost site's rejoin
(its replica disk then equal to the primary's) and a clean stop after which fsck finds the
filesystem clean."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from lab import cli as labcli, world
from replication import disksync
from replication.nbd import NbdServer
from tests import disk_torture
from tests.test_bgp_failover import AS_A, AS_B, wait_for
from tests.test_disk_image import qmp_powerdown
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


def _disk(site: str) -> Path:
    return world.LAB_DIR / site / world.DISK_FILE


def _chunk_hashes(path: Path) -> list[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return disksync.chunk_hashes(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def replica_matches_when_quiet(primary: str, standby: str, timeout: float = 120) -> tuple[int, float]:
    """Compare the primary's disk with the standby's replica disk once the guest has stopped
    writing: the primary's disk hashes the same before and after (no write in between) and the
    standby committed an epoch taken after the first hashing (so it holds every write before it).
    Returns (chunks that differ at the first quiet point, seconds it took to find one)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        before = _chunk_hashes(_disk(primary))
        epoch = labcli.site_status(primary)["replication"]["epoch"]
        wait_for(lambda: labcli.site_status(primary)["committed_epoch"] > epoch, 30, "a commit after the hashing")
        replica = _chunk_hashes(_disk(standby))
        if _chunk_hashes(_disk(primary)) == before:
            return sum(a != b for a, b in zip(before, replica)), time.monotonic() - t0
        time.sleep(1)
    raise AssertionError(f"{primary}'s guest kept writing its disk for {timeout:.0f}s")


def power_off_and_fsck(site: str) -> str:
    """The guest's clean stop at `site` (the ACPI power button: the disk guest stops its services,
    remounts / read-only, prints GEOMIRROR-GUEST-HALTED and powers off), then `fsck.ext4 -n -f` on
    the site's disk file; returns fsck's output. The site's daemon holds the guest's only QMP
    connection, so it is stopped first (SIGTERM: it leaves the guest running) and this test
    serves the disk to QEMU meanwhile, with the same NbdServer, on the same socket (QEMU
    reconnects as after a daemon restart)."""
    role = json.loads((world.LAB_DIR / site / "role.json").read_text())
    g = role["guest"]
    pid = world.load_state()["pids"][site]
    os.kill(pid, signal.SIGTERM)
    assert not world._wait_gone([pid], 60), f"{site}'s daemon did not stop"
    sock = world.LAB_DIR / site / ("disk.sock" if g["tag"] == "primary" else f"disk-{g['tag']}.sock")
    server = NbdServer(_disk(site), sock)
    server.start()
    try:
        qmp_powerdown(g["qmp"])
        assert not world._wait_gone([g["pid"]], 120), f"{site}'s guest did not power off"
    finally:
        server.close()
    serial = (world.LAB_DIR / site / f"serial-{g['tag']}.log").read_text(errors="replace")
    assert "GEOMIRROR-GUEST-HALTED" in serial, serial[-2000:]
    return assert_fs_clean(_disk(site))


def assert_fs_clean(image: Path) -> str:
    """`fsck.ext4 -n -f` finds nothing, and the filesystem was unmounted cleanly: no journal to
    replay (fsck -n skips a replay and still answers 0, so the superblock is read as well)."""
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", str(image)], capture_output=True, text=True)
    out = fsck.stdout + fsck.stderr
    assert fsck.returncode == 0 and "journal recovery" not in out, out
    sb = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    features = next(line for line in sb.splitlines() if line.startswith("Filesystem features:"))
    state = next(line for line in sb.splitlines() if line.startswith("Filesystem state:"))
    assert "needs_recovery" not in features and state.split(":", 1)[1].strip() == "clean", (features, state)
    return fsck.stdout.strip() + "\n" + state


def test_switchover_there_and_back_and_a_daemon_restart_keep_every_record(lab_env):
    """With the journal client appending all along on one connection: a switchover to site B
    (site A's disk becomes the replica: the resync sends only the chunks that differ), back to
    site A, then site A's daemon SIGKILLed and started again (QEMU reconnects to the new disk
    server; the writes the old one recorded and never sent reach site B by the session's disk
    sync). Every acknowledged record reads back, and site B's replica disk is then resumable:
    site A lost, site B takes over, the records are still all there.

    Then site A comes back (`lab revive`: it rejoins as site B's standby): the disk resync sends
    only the chunks that differ, and once the guest is quiet site A's replica disk is site B's
    disk chunk for chunk. Last, site A is lost again and the guest at site B, resumed there at the
    takeover, is stopped cleanly: its filesystem is clean (`fsck.ext4 -n -f` on site B's disk)."""
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
    lines.append(f"client: {len(res.acked)} records acknowledged on one connection, all read back from site-b's "
                 f"disk after site-a was lost; count {res.count}; longest stall {res.longest_stall_s:.2f}s")

    wall = time.time()
    said = world.revive("site-a")
    b = protected_again("site-b", wall)
    rep = b["replication"]
    chunks = rep["disk_bytes"] // disksync.CHUNK
    assert labcli.site_status("site-a")["role"] == "standby"
    assert 0 < rep["last_disk_sync_chunks"] < chunks // 4, rep
    lines.append(f"site-a revived ({said}) and protecting site-b {time.time() - wall:.1f}s later: "
                 + _disk_line("site-b", rep))
    differ, quiet_s = replica_matches_when_quiet("site-b", "site-a")
    assert differ == 0, f"{differ} chunks of site-a's replica disk differ from site-b's disk"
    lines.append(f"site-a's replica disk equals site-b's disk, all {chunks} chunks (quiet point found in "
                 f"{quiet_s:.1f}s)")
    world.crash("site-a")
    fsck = power_off_and_fsck("site-b")
    lines.append("site-a lost again; site-b's guest powered off cleanly; fsck.ext4 -n -f on site-b's disk:\n  "
                 + fsck.replace("\n", "\n  "))
    print("\n" + "\n".join(lines))
