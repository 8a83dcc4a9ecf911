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

import ctypes
import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAGE_SIZE = 4096
SCAN_CHUNK_PAGES = 2048  # 8 MiB per compare step keeps the temporaries in cache
SCAN_SUB_PAGES = 64  # a differing chunk is looked at again in 256 KiB pieces
_DENSE_AFTER = 4  # pieces looked at before a chunk whose pieces mostly differ gets one numpy pass

_libc = ctypes.CDLL(None)  # the process's own libc: memcmp, called with the GIL released
_memcmp = _libc.memcmp
_memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_memcmp.restype = ctypes.c_int


def scan_numpy(ram: np.ndarray, shadow: np.ndarray, page_size: int = PAGE_SIZE,
               chunk_pages: int = SCAN_CHUNK_PAGES) -> np.ndarray:
    """Page numbers where `ram` and `shadow` (flat uint8, the same size) differ: a numpy
    compare of every 64-bit word, chunk by chunk. The reference for `scan_pages`."""
    n = ram.size // page_size
    w = page_size // 8
    a = ram.view(np.uint64).reshape(n, w)
    b = shadow.view(np.uint64).reshape(n, w)
    neq = np.empty((min(n, chunk_pages), w), dtype=bool)
    out = []
    for s in range(0, n, chunk_pages):
        e = min(n, s + chunk_pages)
        q = neq[: e - s]
        np.not_equal(a[s:e], b[s:e], out=q)
        d = np.flatnonzero(q.any(axis=1))
        if d.size:
            out.append(d + s)
    return np.concatenate(out).astype(np.uint64) if out else np.empty(0, np.uint64)


def scan_memcmp(ram: np.ndarray, shadow: np.ndarray, page_size: int = PAGE_SIZE,
                chunk_pages: int = SCAN_CHUNK_PAGES, sub_pages: int = SCAN_SUB_PAGES) -> np.ndarray:
    """The same pages as `scan_numpy`, reading less where little changed: libc memcmp skips
    an equal chunk at memory speed (no temporaries); a differing chunk is compared again in
    `sub_pages` pieces, and only a differing piece gets the per-page numpy pass. Where most
    pieces of a chunk differ (pages dirtied all over), the rest of the chunk goes straight
    to the numpy pass, so a dense epoch costs about what `scan_numpy` costs."""
    n = ram.size // page_size
    w = page_size // 8
    a = ram.view(np.uint64).reshape(n, w)
    b = shadow.view(np.uint64).reshape(n, w)
    pa, pb = ram.ctypes.data, shadow.ctypes.data
    neq = np.empty((min(n, chunk_pages), w), dtype=bool)
    out = []

    def numpy_pass(t: int, u: int) -> None:
        q = neq[: u - t]
        np.not_equal(a[t:u], b[t:u], out=q)
        d = np.flatnonzero(q.any(axis=1))
        if d.size:
            out.append(d + t)

    for s in range(0, n, chunk_pages):
        e = min(n, s + chunk_pages)
        if not _memcmp(pa + s * page_size, pb + s * page_size, (e - s) * page_size):
            continue
        if sub_pages >= e - s:
            numpy_pass(s, e)
            continue
        looked = differing = 0
        t = s
        while t < e:
            if looked >= _DENSE_AFTER and 2 * differing > looked:
                numpy_pass(t, e)
                break
            u = min(e, t + sub_pages)
            looked += 1
            if _memcmp(pa + t * page_size, pb + t * page_size, (u - t) * page_size):
                differing += 1
                numpy_pass(t, u)
            t = u
    return np.concatenate(out).astype(np.uint64) if out else np.empty(0, np.uint64)


scan_pages = scan_memcmp  # bench/scan.py measures the choice


@dataclass
class DirtySet:
    """The pages of one epoch: numbers, new contents, and the standby's old contents."""

    page_numbers: np.ndarray  # uint64, sorted
    new_pages: np.ndarray  # (n, PAGE_SIZE) uint8, a copy
    old_pages: np.ndarray  # (n, PAGE_SIZE) uint8, a copy

    @property
    def nbytes(self) -> int:
        return int(self.new_pages.nbytes)

    def merge(self, other: "DirtySet") -> "DirtySet":
        """Both sets' pages, sorted (the two must not share a page)."""
        pages = np.concatenate([self.page_numbers, other.page_numbers])
        order = np.argsort(pages, kind="stable")
        return DirtySet(pages[order], np.concatenate([self.new_pages, other.new_pages])[order],
                        np.concatenate([self.old_pages, other.old_pages])[order])


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

    def close(self) -> None:
        self.ram = None  # drop the view before closing the map
        try:
            self._map.close()
        except BufferError:
            pass

    # -- epochs (called with the vCPUs stopped) --------------------------
    def scan(self) -> np.ndarray:
        """Page numbers whose content differs from the shadow."""
        return scan_pages(self.ram, self.shadow, self.page_size)

    def take(self, pages: np.ndarray) -> DirtySet:
        """Copy the new and old contents of `pages` and bring the shadow up to date."""
        idx = pages.astype(np.intp)
        ram = self.ram.reshape(self.n_pages, self.page_size)
        sh = self.shadow.reshape(self.n_pages, self.page_size)
        new = ram[idx]
        old = sh[idx]
        sh[idx] = new
        return DirtySet(pages, new, old)

    def take_changed(self, pages: np.ndarray) -> DirtySet:
        """`take` of those `pages` (sorted, unique) whose content differs from the shadow: a
        dirty log names every page written, also with the bytes it held. O(len(pages)); each
        page is gathered once (this runs in the checkpoint pause)."""
        idx = pages.astype(np.intp)
        new = self.ram.reshape(self.n_pages, self.page_size)[idx]
        sh = self.shadow.reshape(self.n_pages, self.page_size)
        old = sh[idx]
        changed = (new.view(np.uint64) != old.view(np.uint64)).any(axis=1)
        if not changed.all():
            idx, new, old, pages = idx[changed], new[changed], old[changed], pages[changed]
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
