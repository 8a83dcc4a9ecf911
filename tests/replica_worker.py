"""Applies a deterministic sequence of epochs to a replica (run as a subprocess by
test_store.py, which makes it SIGKILL itself at a chosen point via GEOMIRROR_CRASH_AT)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PAGES, PS = 256, 4096


def epoch_content(e: int):
    rng = np.random.default_rng(e)
    pages = np.sort(rng.choice(PAGES, 24, replace=False)).astype(np.uint64)
    data = rng.integers(0, 256, (len(pages), PS), dtype=np.uint8)
    dev = bytes(rng.integers(0, 256, 300 + e, dtype=np.uint8))
    return pages, data, dev


def resync_blocks(e: int):
    """Full blocks a resync before epoch e brings (block of 16 pages)."""
    rng = np.random.default_rng(10_000 + e)
    first = int(rng.integers(0, PAGES // 16)) * 16
    return first, rng.integers(0, 256, (16, PS), dtype=np.uint8)


def expected(upto: int, resync_at: int | None = None):
    ram = np.zeros((PAGES, PS), dtype=np.uint8)
    dev = b""
    for e in range(1, upto + 1):
        if resync_at == e:
            first, block = resync_blocks(e)
            ram[first:first + 16] = block
        pages, data, dev = epoch_content(e)
        ram[pages.astype(np.intp)] = data
    return ram, dev


def main(d: str, upto: int, resync_at: int, writeback_ms: float = 0.0) -> None:
    from replication.store import Replica

    r = Replica(Path(d), PAGES * PS, writeback_ms=writeback_ms)
    r.open()
    start = r.committed_epoch + 1
    if start == 1:
        r.begin_initial_sync()
    for e in range(start, upto + 1):
        if e == resync_at:
            r.begin_resync()
            first, block = resync_blocks(e)
            r.write_block(first, block)
        pages, data, dev = epoch_content(e)
        r.commit(e, pages, data, dev)
        print(f"durable {e}", flush=True)  # the epoch a crash from here on must not lose
    r.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
