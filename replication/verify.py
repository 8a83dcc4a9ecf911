"""Rolling replica verification: proof, epoch after epoch, that the standby's replica is the
primary's live guest RAM.

Each epoch, with the vCPUs still stopped right after the capture, the primary hashes one
range of LIVE guest RAM (not the shadow: the shadow is what the primary believes the
standby has, so it cannot show a page the capture missed). The range is chosen by the
epoch number alone (`range_for`): `bytes_per_epoch` bytes (whole pages), moving on by that
much every epoch and wrapping at the end of RAM, so any `cycle_epochs` consecutive epochs
cover all of it. (offset, length, digest) travels inside the epoch's checkpoint frame
(docs/wire-format.md); the standby, once that epoch is journalled and before it acknowledges
it, hashes the same range of its replica as epoch N leaves it (`Replica.range_after`) and
compares (`compare_range`). Both then describe epoch N, so they must be
equal byte for byte; a difference means a checkpoint failed to carry a write (a capture
that missed a page), and is a `replica.diverged` (docs/replication.md says what follows).

Digest: SHA-256. Measured here on 256 KiB ranges (one core): SHA-256 1.7 GB/s (the CPU has
SHA extensions; ~0.4–0.5 GB/s on one without), blake2b 0.69, blake2s 0.42, md5 0.73,
sha1 1.85, zlib.crc32 2.7–4.2 GB/s. SHA-256 costs ~0.15 ms per 256 KiB in the pause, and,
unlike a CRC, a guest cannot write contents that hide a difference from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

DIGEST_SIZE = 32
DEFAULT_BYTES_PER_EPOCH = 256 << 10
MAX_BYTES_PER_EPOCH = 64 << 20


@dataclass(frozen=True)
class RangeCheck:
    """What the primary's live RAM held in one range when epoch `epoch` was taken."""

    offset: int
    length: int
    digest: bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class Divergence:
    """The standby's replica differs from the primary's RAM in a range, at an epoch."""

    epoch: int
    offset: int
    length: int
    expected: bytes  # the primary's digest
    found: bytes  # the replica's

    def as_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "length": self.length,
                "expected": self.expected.hex(), "found": self.found.hex()}

    def sentence(self) -> str:
        return (f"the replica differs from the primary's RAM in bytes {self.offset}..{self.offset + self.length} "
                f"at epoch {self.epoch} (a checkpoint missed a write)")


def range_bytes(ram_size: int, bytes_per_epoch: int, page_size: int) -> int:
    """The length of a full range: `bytes_per_epoch` rounded up to whole pages, at most all of RAM."""
    if bytes_per_epoch <= 0:
        raise ValueError(f"bytes_per_epoch must be positive, not {bytes_per_epoch}")
    pages = -(-bytes_per_epoch // page_size)
    return min(pages * page_size, ram_size)


def cycle_epochs(ram_size: int, bytes_per_epoch: int, page_size: int) -> int:
    """How many consecutive epochs it takes to check every byte of RAM once."""
    return -(-ram_size // range_bytes(ram_size, bytes_per_epoch, page_size))


def range_for(epoch: int, ram_size: int, bytes_per_epoch: int, page_size: int) -> tuple[int, int]:
    """(offset, length) checked at `epoch`: the ranges of consecutive epochs follow each other
    and wrap at the end of RAM (the last one of a cycle may be shorter)."""
    chunk = range_bytes(ram_size, bytes_per_epoch, page_size)
    offset = (epoch % cycle_epochs(ram_size, bytes_per_epoch, page_size)) * chunk
    return offset, min(chunk, ram_size - offset)


def digest(buf) -> bytes:
    return hashlib.sha256(memoryview(buf).cast("B")).digest()


def take(epoch: int, ram: np.ndarray, bytes_per_epoch: int, page_size: int) -> RangeCheck:
    """The check of epoch `epoch` over `ram` (flat uint8): call it with the vCPUs stopped."""
    offset, length = range_for(epoch, ram.size, bytes_per_epoch, page_size)
    return RangeCheck(offset, length, digest(ram[offset:offset + length]))


def problem(check: RangeCheck, ram_size: int) -> str | None:
    """Why `check` cannot be a range of a RAM of `ram_size` bytes (None: it can)."""
    if check.length <= 0 or check.offset < 0 or check.end > ram_size:
        return f"range {check.offset}+{check.length} is outside the guest's {ram_size} bytes of RAM"
    if len(check.digest) != DIGEST_SIZE:
        return f"digest of {len(check.digest)} bytes, expected {DIGEST_SIZE}"
    return None


def compare(epoch: int, check: RangeCheck, replica_ram: np.ndarray) -> Divergence | None:
    """Hash the same range of the replica (flat uint8, holding epoch `epoch`) and compare."""
    return compare_range(epoch, check, replica_ram[check.offset:check.end])


def compare_range(epoch: int, check: RangeCheck, contents: np.ndarray) -> Divergence | None:
    """Compare `check` with the replica's contents of its range at epoch `epoch` (flat uint8)."""
    found = digest(contents)
    if found == check.digest:
        return None
    return Divergence(epoch, check.offset, check.length, check.digest, found)
