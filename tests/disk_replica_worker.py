"""Applies a deterministic sequence of epochs with disk blocks to a replica with a disk (run as a
subprocess by test_disk_replication.py, which makes it SIGKILL itself at a chosen point via
GEOMIRROR_CRASH_AT)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from tests import replica_worker as W

DISK_BLOCKS = 512  # a 2 MiB replica disk
BS = 4096


def disk_content(e: int):
    """Epoch e's disk blocks (sorted, unique; a run and scattered blocks) and their contents."""
    rng = np.random.default_rng(20_000 + e)
    run0 = int(rng.integers(0, DISK_BLOCKS - 40))
    blocks = np.unique(np.concatenate([np.arange(run0, run0 + 32), rng.choice(DISK_BLOCKS, 20, replace=False)]))
    return blocks.astype(np.uint64), rng.integers(0, 256, (blocks.size, BS), dtype=np.uint8)


def disk_resync(e: int):
    """Disk blocks a resync before epoch e brings (one 64 KiB chunk)."""
    rng = np.random.default_rng(30_000 + e)
    first = int(rng.integers(0, DISK_BLOCKS // 16)) * 16
    return np.arange(first, first + 16, dtype=np.uint64), rng.integers(0, 256, (16, BS), dtype=np.uint8)


def expected_disk(upto: int, resync_at: int | None = None) -> bytes:
    disk = np.zeros((DISK_BLOCKS, BS), dtype=np.uint8)
    for e in range(1, upto + 1):
        if resync_at == e:
            blocks, data = disk_resync(e)
            disk[blocks.astype(np.intp)] = data
        blocks, data = disk_content(e)
        disk[blocks.astype(np.intp)] = data
    return disk.tobytes()


def main(d: str, disk: str, upto: int, resync_at: int) -> None:
    from replication.store import Replica

    r = Replica(Path(d), W.PAGES * W.PS, disk=Path(disk))
    r.open()
    start = r.committed_epoch + 1
    if start == 1:
        r.begin_initial_sync()
    for e in range(start, upto + 1):
        if e == resync_at:
            r.begin_resync()
            first, block = W.resync_blocks(e)
            r.write_block(first, block)
            r.write_disk_blocks(*disk_resync(e))
        pages, data, dev = W.epoch_content(e)
        r.commit(e, pages, data, dev, *disk_content(e))
    r.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
