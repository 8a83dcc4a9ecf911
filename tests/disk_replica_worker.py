"""Applies a deterministic sequence of epochs with disk blocks and zeroed ranges to a replica with a disk (run as a
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


def disk_zeroes(e: int) -> np.ndarray:
    """Epoch e's zeroed disk ranges ((first block, blocks), ascending, disjoint): one at random and
    one over the start of epoch e's block run, whose blocks are written after it (they win)."""
    rng = np.random.default_rng(40_000 + e)
    run0 = int(disk_content(e)[0][0])
    a0 = int(rng.integers(0, DISK_BLOCKS - 100))
    ranges = sorted([(a0, a0 + int(rng.integers(20, 100))), (max(0, run0 - 6), run0 + 10)])
    merged = [list(ranges[0])]
    for lo, hi in ranges[1:]:
        if lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return np.array([(lo, hi - lo) for lo, hi in merged], dtype=np.uint64)


def disk_epoch(e: int) -> dict:
    """Epoch e's disk, as `Replica.commit` takes it."""
    blocks, data = disk_content(e)
    return {"disk_blocks": blocks, "disk_data": data, "disk_zeroes": disk_zeroes(e)}


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
        for first, n in disk_zeroes(e).tolist():  # the ranges, then the blocks
            disk[first:first + n] = 0
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
        r.commit(e, pages, data, dev, **disk_epoch(e))
    r.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
