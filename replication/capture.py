"""Primary side: which guest RAM pages changed since the standby's copy.

The guest's RAM is a shared file that we map read-only. A shadow copy holds exactly
what the standby has (or will have once the frames in flight land). The dirty set of
an epoch is every page whose current content differs from the shadow, found with a
numpy compare at memory bandwidth while the vCPUs are stopped. Comparing against
the shadow is self-correcting: a page written while the initial sync streamed is
simply different from the shadow and goes in the next epoch. A dirty-log source
(KVM's dirty bitmap) would only narrow the pages to compare; the interface stays.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE_SIZE = 4096
SCAN_CHUNK_PAGES = 2048  # 8 MiB per compare step keeps the temporaries in cache


@dataclass
class DirtySet:
    """The pages of one epoch: numbers, new contents, and the standby's old contents."""

    page_numbers: np.ndarray  # uint64, sorted
    new_pages: np.ndarray  # (n, PAGE_SIZE) uint8, a copy
    old_pages: np.ndarray  # (n, PAGE_SIZE) uint8, a copy

    @property
    def nbytes(self) -> int:
        return int(self.new_pages.nbytes)


class Capture:
    """Shadow RAM and dirty-page scanning for one guest RAM file."""

    def __init__(self, ram_path: Path, size: int, page_size: int = PAGE_SIZE):
        if size % page_size:
            raise ValueError(f"RAM size {size} is not a multiple of the page size {page_size}")
        self.path = Path(ram_path)
        self.page_size = page_size
        self.size = size
        self.n_pages = size // page_size
        fd = os.open(ram_path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        self.ram = np.frombuffer(self._map, dtype=np.uint8)
        self.shadow = np.zeros(size, dtype=np.uint8)
        w = page_size // 8
        self._ram64 = self.ram.view(np.uint64).reshape(self.n_pages, w)
        self._shadow64 = self.shadow.view(np.uint64).reshape(self.n_pages, w)
        self._neq = np.empty((SCAN_CHUNK_PAGES, w), dtype=bool)

    def close(self) -> None:
        self.ram = self._ram64 = None  # drop views before closing the map
        try:
            self._map.close()
        except BufferError:
            pass

    # -- epochs (called with the vCPUs stopped) --------------------------
    def scan(self) -> np.ndarray:
        """Page numbers whose content differs from the shadow."""
        out = []
        for s in range(0, self.n_pages, SCAN_CHUNK_PAGES):
            e = min(self.n_pages, s + SCAN_CHUNK_PAGES)
            neq = self._neq[: e - s]
            np.not_equal(self._ram64[s:e], self._shadow64[s:e], out=neq)
            d = np.flatnonzero(neq.any(axis=1))
            if d.size:
                out.append(d + s)
        return np.concatenate(out).astype(np.uint64) if out else np.empty(0, np.uint64)

    def take(self, pages: np.ndarray) -> DirtySet:
        """Copy the new and old contents of `pages` and bring the shadow up to date."""
        idx = pages.astype(np.intp)
        ram = self.ram.reshape(self.n_pages, self.page_size)
        sh = self.shadow.reshape(self.n_pages, self.page_size)
        new = ram[idx]
        old = sh[idx]
        sh[idx] = new
        return DirtySet(pages, new, old)

    def capture(self) -> DirtySet:
        return self.take(self.scan())

    # -- initial sync and resync (guest running) -------------------------
    def block_hashes(self, block_pages: int) -> list[bytes]:
        return block_hashes(self.shadow, self.page_size * block_pages)

    def sync_blocks(self, block_pages: int, standby_hashes: list[bytes] | None):
        """Yield (first_page, pages) for every block the standby lacks, copying it into the shadow.

        The guest runs meanwhile: a block copied here may change again right after;
        the next epoch's scan finds that against the shadow.
        """
        bs = self.page_size * block_pages
        for b, off in enumerate(range(0, self.size, bs)):
            end = min(self.size, off + bs)
            np.copyto(self.shadow[off:end], self.ram[off:end])
            block = self.shadow[off:end]
            if standby_hashes is not None and b < len(standby_hashes) and \
                    _hash(block) == standby_hashes[b]:
                continue
            yield off // self.page_size, block.reshape(-1, self.page_size).copy()


def _hash(block) -> bytes:
    return hashlib.blake2b(memoryview(block), digest_size=16).digest()


def block_hashes(buf: np.ndarray, block_bytes: int) -> list[bytes]:
    """blake2b-128 of each block of `buf` (used by resync to skip what the standby has)."""
    return [_hash(buf[off: off + block_bytes]) for off in range(0, buf.size, block_bytes)]
