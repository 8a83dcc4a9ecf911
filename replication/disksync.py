"""Disk sync by chunk hashes: both sides hash their raw image per 64 KiB chunk, the primary
sends the chunks whose hash differs (docs/disk.md, "Sync").

Sparse-aware: a chunk that lies wholly in a hole of the file (``SEEK_DATA``/``SEEK_HOLE``) is
not read, its hash is the all-zero chunk's; a chunk whose contents are all zero is a zero
chunk however it is stored. A fresh sparse replica and a mostly empty guest disk therefore
cost one hash per chunk of data, and only chunks with data cross the WAN.
"""

from __future__ import annotations

import errno
import hashlib
import os
from typing import Iterator

import numpy as np

BLOCK = 4096  # the disk's unit (replication/nbd.py BLOCK_SIZE, codec DISK_BLOCK)
CHUNK_BLOCKS = 16  # hash granularity: 64 KiB, as for RAM (session.BLOCK_PAGES)
CHUNK = BLOCK * CHUNK_BLOCKS
HASH_SIZE = 16


def _hash(data) -> bytes:
    return hashlib.blake2b(memoryview(data), digest_size=HASH_SIZE).digest()


ZERO_HASH = _hash(bytes(CHUNK))


def data_ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The (start, end) byte ranges of `fd` that hold data; the rest are holes (read as zeros).
    A filesystem without SEEK_DATA reports the whole file as data."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            return [(0, size)]
        end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        out.append((start, end))
        pos = end
    return out


def _chunks_with_data(fd: int, size: int) -> np.ndarray:
    """Bool per chunk: it overlaps a data range (must be read)."""
    n = -(-size // CHUNK)
    has = np.zeros(n, dtype=bool)
    for start, end in data_ranges(fd, size):
        has[start // CHUNK:-(-end // CHUNK)] = True
    return has


def _read(fd: int, off: int, n: int) -> bytes:
    data = os.pread(fd, n, off)
    if len(data) < n:  # the file is shorter than it was said to be: what is missing reads as zeros
        data += bytes(n - len(data))
    return data


def chunk_hashes(fd: int, size: int) -> list[bytes]:
    """blake2b-128 of each 64 KiB chunk of the first `size` bytes of `fd` (the last chunk may be
    shorter; it is hashed as it is). O(data), not O(size): holes are not read."""
    has = _chunks_with_data(fd, size)
    out = []
    for c in range(has.size):
        off = c * CHUNK
        n = min(CHUNK, size - off)
        if not has[c] and n == CHUNK:
            out.append(ZERO_HASH)
        else:
            out.append(_hash(_read(fd, off, n)))
    return out


def differing_chunks(fd: int, size: int, theirs: list[bytes]) -> Iterator[tuple[int, np.ndarray]]:
    """(first block, (k, BLOCK) uint8 contents) of each chunk whose hash differs from `theirs`,
    in order. A chunk in a hole is all zeros without a read."""
    has = _chunks_with_data(fd, size)
    for c in range(has.size):
        off = c * CHUNK
        n = min(CHUNK, size - off)
        data = _read(fd, off, n) if has[c] else bytes(n)
        if c < len(theirs) and _hash(data) == theirs[c]:
            continue
        yield off // BLOCK, np.frombuffer(data, dtype=np.uint8).reshape(-1, BLOCK)


def split_hashes(blob: bytes, size: int) -> list[bytes]:
    """A DISK_HASHES payload as a list; ValueError unless it has one hash per chunk of `size`."""
    n = -(-size // CHUNK)
    if len(blob) != n * HASH_SIZE:
        raise ValueError(f"{len(blob)} bytes of disk hashes, expected {n * HASH_SIZE} for a disk of {size} bytes")
    return [blob[i:i + HASH_SIZE] for i in range(0, len(blob), HASH_SIZE)]
