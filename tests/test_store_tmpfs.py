"""A real full disk: the replica on a small tmpfs, filled so that ENOSPC strikes commit at
each of its writes in turn (needs root to mount; skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replication.store import Replica, ReplicaStorageError, free_bytes
from tests.test_store_faults import SIZE, assert_whole, build, epoch

PS = 4096


@pytest.fixture
def small_fs(tmp_path):
    """A 1.5 MiB tmpfs (ram.img is 1 MiB), unmounted at the end."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill_to(fs: Path, left: int) -> Path:
    """Take all free space of `fs` but `left` bytes with one file."""
    filler = fs / "filler"
    filler.unlink(missing_ok=True)
    take = free_bytes(fs) - left
    assert take >= 0
    if take:
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, take)
        finally:
            os.close(fd)
    assert free_bytes(fs) == left
    return filler


def test_enospc_at_every_point_of_commit(small_fs):
    """For every amount of free space from none to enough: a resync epoch (blocks + checkpoint)
    fails with ENOSPC wherever the space runs out, or succeeds. The replica is exactly epoch 3
    or 4 — in the process, after a reopen on the still full disk, and once space returns."""
    d = small_fs / "replica"
    outcomes: dict[str, list[int]] = {}
    for left_pages in range(0, 48):
        shutil.rmtree(d, ignore_errors=True)
        (small_fs / "filler").unlink(missing_ok=True)
        r = build(d, 3)
        filler = fill_to(small_fs, left_pages * PS)
        # A reader of the old device.state keeps its page allocated after the rename, so the
        # space can also run out at replica.json.
        with open(r.device_state_path, "rb"):
            try:
                epoch(r, 4, resync_at=4)
                outcome = "ok"
            except ReplicaStorageError as e:
                outcome = e.step
                assert e.disk_full and f"{e.free_bytes} bytes free" in str(e) and str(d) in str(e)
        outcomes.setdefault(outcome, []).append(left_pages)
        if r.valid:
            assert_whole(r, (3, 4), resync_at=4)
        else:
            assert outcome in ("device-state", "meta") and r.problem
        if left_pages % 2:
            # reopen while the disk is still full: whole, or invalid because the replay failed
            r.close()
            r = Replica(d, SIZE)
            rep = r.open()
            if rep.valid:
                assert_whole(r, (3, 4), resync_at=4)
            else:
                assert rep.recovered.startswith("replay failed") and r.problem
                with pytest.raises(ReplicaStorageError, match="No space left"):
                    r.ready()  # the replay still fails: a session now would be refused
        filler.unlink()
        r.ready()
        got = assert_whole(r, (3, 4), resync_at=4)
        assert got == (3 if outcome in ("resync-append", "journal-append") else 4), outcome
        r.close()
        r = Replica(d, SIZE)
        r.open()
        assert assert_whole(r, (got,), resync_at=4) == got
        for e in range(got + 1, 6):
            epoch(r, e, resync_at=4)
        assert_whole(r, (5,), resync_at=4)
        r.close()
    # every write of the transaction ran out of space at least once, and then it fit
    assert {"resync-append", "journal-append", "device-state", "meta", "ok"} <= set(outcomes), outcomes


def test_full_filesystem_refuses_ram_image_by_name(small_fs):
    fill_to(small_fs, 512 << 10)
    r = Replica(small_fs / "replica", SIZE)
    with pytest.raises(ReplicaStorageError) as ei:
        r.open()
    msg = str(ei.value)
    assert f"cannot allocate {small_fs / 'replica' / 'ram.img'}: the guest's RAM needs {SIZE} bytes" in msg
    assert "bytes free" in msg and "free space there or move the state directory" in msg


def test_ram_written_through_the_mapping_on_a_full_disk_never_sigbus(small_fs):
    """Once open, ram.img owns its blocks: filling the disk and then writing every page (an
    initial sync does exactly that) cannot fault."""
    code = (
        "import sys, numpy as np\n"
        "from replication.store import Replica\n"
        "from tests.test_store_tmpfs import fill_to\n"
        "from pathlib import Path\n"
        f"r = Replica(Path({str(small_fs / 'replica')!r}), {SIZE}, fsync=False)\n"
        "r.open()\n"
        f"fill_to(Path({str(small_fs)!r}), 0)\n"
        "r.ram[:] = 7\n"
        "r.close()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True,
                       text=True)
    assert p.returncode == 0, f"rc {p.returncode}: {p.stderr[-500:]}"
    assert np.all(np.fromfile(small_fs / "replica" / "ram.img", np.uint8) == 7)
