"""The standby applies a checkpoint whole or not at all, also when killed mid-apply."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replication.store import Replica, ReplicaError
from tests import replica_worker as W

POINTS = ["before-journal-sync", "after-journal", "mid-ram", "after-ram", "after-device-state", "after-meta"]


def run_worker(d: Path, upto: int, resync_at: int = 0, crash_at: str = "") -> int:
    env = dict(os.environ, GEOMIRROR_CRASH_AT=crash_at, PYTHONPATH=str(Path(__file__).parent.parent))
    p = subprocess.run([sys.executable, "-m", "tests.replica_worker", str(d), str(upto), str(resync_at)],
                       env=env, cwd=Path(__file__).parent.parent, capture_output=True)
    return p.returncode


def open_replica(d: Path):
    r = Replica(d, W.PAGES * W.PS)
    rep = r.open()
    return r, rep


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("resync", [False, True])
def test_killed_mid_apply_replica_is_whole_at_n_minus_1_or_n(tmp_path, point, resync):
    assert run_worker(tmp_path, 3) == 0
    resync_at = 4 if resync else 0
    rc = run_worker(tmp_path, 4, resync_at=resync_at, crash_at=point)
    assert rc == -signal.SIGKILL, f"the worker was meant to die at {point}"
    r, rep = open_replica(tmp_path)
    try:
        assert rep.committed_epoch in (3, 4)
        # Once the journal is synced the epoch must survive; before it, it must not appear.
        if point == "before-journal-sync":
            # the record was written (not fsynced): a process crash keeps it, so either is whole
            pass
        elif point != "before-journal-sync":
            assert rep.committed_epoch == 4, f"journalled epoch 4 lost after a crash at {point}"
        ram, dev = W.expected(rep.committed_epoch, resync_at=resync_at or None)
        assert np.array_equal(r.ram, ram), f"replica RAM is a mix after a crash at {point} ({rep})"
        assert r.device_state() == dev
        assert rep.recovered in ("clean", "replayed epoch 4", "discarded torn epoch 4")
    finally:
        r.close()


def _as_blake2b_records(buf: bytes) -> bytes:
    """The same records in the earlier journal format (`GMJR`, blake2b-256), as an older version wrote them."""
    import hashlib

    from replication.store import _REC as rec
    out, off = [], 0
    while off < len(buf):
        magic, kind, epoch, n, dev_len, body_len = rec.unpack_from(buf, off)
        assert magic == b"GMJ2"
        end = off + rec.size + body_len
        body = rec.pack(b"GMJR", kind, epoch, n, dev_len, body_len) + buf[off + rec.size:end]
        out.append(body + hashlib.blake2b(body, digest_size=32).digest())
        off = end + 4
    return b"".join(out)


def test_a_journal_an_older_version_wrote_replays(tmp_path):
    """A standby upgraded with an epoch still in its journal (blake2b-checksummed records) comes
    out at that epoch; a record torn in that format is dropped as before."""
    assert run_worker(tmp_path, 2) == 0
    assert run_worker(tmp_path, 3, crash_at="after-journal") == -signal.SIGKILL
    j = tmp_path / "journal"
    old = _as_blake2b_records(j.read_bytes())
    j.write_bytes(old)
    r, rep = open_replica(tmp_path)
    try:
        assert rep.committed_epoch == 3 and rep.recovered == "replayed epoch 3"
        ram, dev = W.expected(3)
        assert np.array_equal(r.ram, ram) and r.device_state() == dev
    finally:
        r.close()
    tmp2 = tmp_path / "torn"
    tmp2.mkdir()
    assert run_worker(tmp2, 2) == 0
    assert run_worker(tmp2, 3, crash_at="after-journal") == -signal.SIGKILL
    j = tmp2 / "journal"
    old = _as_blake2b_records(j.read_bytes())
    j.write_bytes(old[:-1] + bytes([old[-1] ^ 1]))  # one bit of the checksum: the record is not whole
    r, rep = open_replica(tmp2)
    try:
        assert rep.committed_epoch == 2 and rep.recovered == "discarded torn epoch 3"
    finally:
        r.close()


def test_torn_journal_tail_is_discarded(tmp_path):
    assert run_worker(tmp_path, 2) == 0
    rc = run_worker(tmp_path, 3, crash_at="before-journal-sync")
    assert rc == -signal.SIGKILL
    j = tmp_path / "journal"
    data = j.read_bytes()
    assert data, "the journal record was expected on disk"
    j.write_bytes(data[: len(data) - 100])  # tear the record
    r, rep = open_replica(tmp_path)
    try:
        assert rep.committed_epoch == 2
        assert rep.recovered == "discarded torn epoch 3"
        ram, dev = W.expected(2)
        assert np.array_equal(r.ram, ram) and r.device_state() == dev
    finally:
        r.close()
    # and the replica carries on from there
    assert run_worker(tmp_path, 4) == 0
    r, rep = open_replica(tmp_path)
    try:
        assert rep.committed_epoch == 4 and np.array_equal(r.ram, W.expected(4)[0])
    finally:
        r.close()


def test_stale_epoch_rejected(tmp_path):
    assert run_worker(tmp_path, 2) == 0
    r, _ = open_replica(tmp_path)
    try:
        pages, data, dev = W.epoch_content(2)
        with pytest.raises(ReplicaError, match="replayed or stale"):
            r.commit(2, pages, data, dev)
        assert r.committed_epoch == 2
    finally:
        r.close()


def test_state_files_are_private(tmp_path):
    assert run_worker(tmp_path, 1) == 0
    assert (tmp_path.stat().st_mode & 0o777) == 0o700
    for f in ("ram.img", "device.state", "replica.json", "journal"):
        assert ((tmp_path / f).stat().st_mode & 0o777) == 0o600, f


def test_seeded_replica_offers_hashes_but_is_not_resumable(tmp_path):
    from replication.standby import resume

    size = W.PAGES * W.PS
    src = tmp_path / "old-guest.ram"
    data = np.random.default_rng(3).integers(0, 256, size, dtype=np.uint8)
    src.write_bytes(data.tobytes())
    r = Replica(tmp_path / "rep", size)
    r.open()
    seen = []
    assert r.seed(src, {"qemu": "7.2"}, "run-1", progress=seen.append) == size
    assert seen[-1] == size
    assert r.seeded and r.resync_base and not r.valid and r.committed_epoch == 0
    assert np.array_equal(r.ram.reshape(-1), data)
    hashes = r.block_hashes(4)
    r.close()
    # persisted; the same run keeps it as a resync base
    r, rep = Replica(tmp_path / "rep", size), None
    rep = r.open()
    assert r.seeded and not rep.valid and r.block_hashes(4) == hashes
    r.bind({"qemu": "7.2"}, "run-1")
    assert r.resync_base
    with pytest.raises(ReplicaError, match="not valid"):
        import asyncio

        asyncio.run(resume(r, None))
    # another run of the guest: the seed is not that guest
    r.bind({"qemu": "7.2"}, "run-2")
    assert not r.seeded and not r.resync_base
    r.close()
    bad = tmp_path / "short.ram"
    bad.write_bytes(b"x" * 4096)
    r = Replica(tmp_path / "rep2", size)
    r.open()
    with pytest.raises(ReplicaError, match="cannot seed from .*short.ram: 4096 bytes"):
        r.seed(bad, {}, "run-1")
    r.close()


_FAIL_THEN_INITIAL_SYNC = """
import errno, sys
from pathlib import Path
from replication.store import FileOps, Replica, ReplicaStorageError
from tests import replica_worker as W

class DeviceStateFull(FileOps):
    def replace(self, step, path, data, fsync):
        if step == "device-state":
            raise OSError(errno.ENOSPC, "No space left on device")
        super().replace(step, path, data, fsync)

r = Replica(Path(sys.argv[1]), W.PAGES * W.PS, ops=DeviceStateFull())
r.open()
pages, data, dev = W.epoch_content(4)
try:
    r.commit(4, pages, data, dev)  # journalled, not applicable: RAM part 3, part 4
except ReplicaStorageError:
    pass
r.begin_initial_sync()  # GEOMIRROR_CRASH_AT=void-after-meta: killed before the journal is emptied
"""


def test_killed_while_an_initial_sync_empties_a_pending_journal(tmp_path):
    """`valid: false` is recorded, the journal not yet emptied, no block written: a reopen
    replays the journalled epoch onto that RAM and is exactly epoch 4."""
    assert run_worker(tmp_path, 3) == 0
    env = dict(os.environ, GEOMIRROR_CRASH_AT="void-after-meta", PYTHONPATH=str(Path(__file__).parent.parent))
    p = subprocess.run([sys.executable, "-c", _FAIL_THEN_INITIAL_SYNC, str(tmp_path)], env=env,
                       cwd=Path(__file__).parent.parent, capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-500:]
    r, rep = open_replica(tmp_path)
    try:
        assert rep.recovered == "replayed epoch 4" and rep.valid and rep.committed_epoch == 4
        ram, dev = W.expected(4)
        assert np.array_equal(r.ram, ram) and r.device_state() == dev
    finally:
        r.close()


def test_the_ram_write_back_leaves_other_threads_running(tmp_path):
    """The apply writes ram.img back (its dirty pages) off the standby's event loop, in a thread;
    that only helps if the write-back lets the loop run meanwhile: `mmap.flush()` holds the GIL
    through its msync (CPython 3.11), so the loop (heartbeats, the next checkpoint's read) froze
    for the whole write-back. Measured as a ratio in the same run: the longest the main thread
    went without running, against the length of the write-back step."""
    import threading
    import time

    from replication.store import FileOps

    class Timed(FileOps):
        def msync(self, step, fd):
            t0 = time.perf_counter()
            super().msync(step, fd)
            self.took = time.perf_counter() - t0

    ops = Timed()
    r = Replica(tmp_path, 128 << 20, ops=ops)
    r.open()
    try:
        r.begin_initial_sync()
        seen = []
        for e in (1, 2, 3):
            r.ram[:] = e  # every page dirty: a write-back worth measuring
            pages = np.array([e], dtype=np.uint64)
            t = threading.Thread(target=r.commit, args=(e, pages, np.full((1, 4096), e, dtype=np.uint8), b"dev"))
            longest, last = 0.0, time.perf_counter()
            t.start()
            while t.is_alive():
                now = time.perf_counter()
                longest, last = max(longest, now - last), now
            t.join()
            seen.append((round(longest, 4), round(ops.took, 4)))
        if max(took for _, took in seen) < 0.03:
            pytest.skip(f"this filesystem writes 128 MB back too fast to tell: {seen}")
        # the main thread kept running (a GIL switch interval is 5 ms), however long the write-back
        assert min(gap / took for gap, took in seen) < 0.5, f"(longest stop of the main thread, write-back) s: {seen}"
    finally:
        r.close()


# ------------------------------------------------------------------ group commit
# A write-back begins after an epoch only once the previous one is done, so how many there are
# in N epochs depends on the disk and the load: the worker runs far more epochs than any point's
# count needs, and is killed long before its end.
GC_EPOCHS = 200
GC_POINTS = ["after-apply-in-memory#5", "wb-after-ram#2", "wb-after-device-state#3", "wb-after-meta#1",
             "wb-after-meta#4", "before-journal-sync#7", "after-journal#6", "mid-ram#8"]


def run_group_worker(d: Path, upto: int, crash_at: str, resync_at: int = 0) -> tuple[int, int]:
    """The worker with group commit (a write-back may begin after every epoch): (return code, the
    last epoch whose commit returned, i.e. durable and acknowledgeable)."""
    env = dict(os.environ, GEOMIRROR_CRASH_AT=crash_at, PYTHONPATH=str(Path(__file__).parent.parent))
    p = subprocess.run([sys.executable, "-m", "tests.replica_worker", str(d), str(upto), str(resync_at), "0.001"],
                       env=env, cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    durable = [int(line.split()[1]) for line in p.stdout.splitlines() if line.startswith("durable ")]
    return p.returncode, max(durable, default=0)


@pytest.mark.parametrize("point", GC_POINTS)
@pytest.mark.parametrize("resync", [False, True])
def test_group_commit_killed_anywhere_comes_out_whole_at_or_after_the_last_durable_epoch(tmp_path, point, resync):
    """Epochs applied in memory, written back in a thread while the next ones are journalled into
    the other journal file: killed at any of those steps, the replica comes out whole at an epoch
    no older than the last one durable (acknowledged) before the kill."""
    resync_at = 9 if resync else 0
    rc, durable = run_group_worker(tmp_path, GC_EPOCHS, point, resync_at)
    assert rc == -signal.SIGKILL, f"the worker was meant to die at {point}"
    r, rep = open_replica(tmp_path)
    try:
        assert rep.valid and rep.committed_epoch >= durable, (rep, durable)
        ram, dev = W.expected(rep.committed_epoch, resync_at=resync_at or None)
        assert np.array_equal(r.ram, ram), f"replica RAM is a mix after a crash at {point} ({rep}, durable {durable})"
        assert r.device_state() == dev
        assert not any(p.stat().st_size for p in (tmp_path / "journal", tmp_path / "journal.1"))
    finally:
        r.close()


@pytest.mark.parametrize("point", ["after-apply-in-memory#6", "wb-after-ram#3", "wb-after-meta#2"])
def test_group_commit_journal_holds_every_epoch_the_files_do_not(tmp_path, point):
    """A host crash can lose any page written after replica.json's epoch M that no write-back
    reached: the journal files must still hold every transaction after M. Simulated by putting
    back ram.img and device.state as of M before opening."""
    rc, durable = run_group_worker(tmp_path, GC_EPOCHS, point)
    assert rc == -signal.SIGKILL
    import json
    meta = json.loads((tmp_path / "replica.json").read_text())
    assert meta["valid"] and meta["committed_epoch"] < durable, (meta, durable)  # something left to replay
    ram, dev = W.expected(meta["committed_epoch"])
    (tmp_path / "ram.img").write_bytes(ram.tobytes())
    (tmp_path / "device.state").write_bytes(dev)
    r, rep = open_replica(tmp_path)
    try:
        assert rep.committed_epoch >= durable and rep.recovered.startswith("replayed"), (rep, durable)
        ram, dev = W.expected(rep.committed_epoch)
        assert np.array_equal(r.ram, ram) and r.device_state() == dev
    finally:
        r.close()


def test_group_commit_writes_back_in_a_thread_and_at_close(tmp_path):
    """In memory at once; the files say the epoch after a write-back (in a thread), all of them
    at close."""
    r = Replica(tmp_path, W.PAGES * W.PS, writeback_ms=60_000)
    r.open()
    r.begin_initial_sync()
    for e in (1, 2, 3):
        r.commit(e, *W.epoch_content(e))
    r._join_writeback()
    meta = json.loads((tmp_path / "replica.json").read_text())
    # epoch 1 written back at once (after an initial sync); 2 by a write-back; 3 in memory only
    assert (r.committed_epoch, meta["committed_epoch"], r.writebacks) == (3, 2, 1)
    assert r.durable_epoch == 3 and r.unwritten and r.device_state() == W.epoch_content(3)[2]
    assert np.array_equal(r.ram, W.expected(3)[0])
    r.close()
    assert json.loads((tmp_path / "replica.json").read_text())["committed_epoch"] == 3
    assert not (tmp_path / "journal").stat().st_size and not (tmp_path / "journal.1").stat().st_size
