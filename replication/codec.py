"""Checkpoint frames: bytes in, bytes out (no I/O). Layout in docs/wire-format.md.

A frame carries one epoch's pages (for DELTA, each page either XOR against its previous
version or raw, whichever has fewer non-zero words; raw for FULL), the device state and
the guest's disk blocks written in the epoch (whole 4 KiB contents) and the ranges of disk blocks it zeroed,
compressed with zstd and sealed with
AES-256-GCM: the clear header is associated data, the GCM tag is the integrity check
over all of it, so a torn, truncated, bit-flipped or forged frame never decodes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np
import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gmbase.errors import GeomirrorError
from replication.verify import DIGEST_SIZE, RangeCheck

MAGIC = b"GMCK"
VERSION = 5  # 5: disk zero ranges; 4: the disk section; 3: the replica check section; 2: per-page XOR-or-raw choice
KIND_DELTA = 1
KIND_FULL = 2
DEV_DELTA = 0x80  # flag in the kind byte: the device state is XOR against the previous epoch's
_DEV_HASH = 8  # blake2b-64 of the full device state, checked after undoing the XOR
# magic, version, kind, page_size, epoch, n_pages, index_len, pages_len, dev_len, check_len,
# n_disk_blocks, disk_index_len, disk_len, n_zero_ranges, zero_len, body_len, nonce
_HDR = struct.Struct(">4sBBIQIIQIHIIQIIQ12s")
_CHECK = struct.Struct(f">QQ{DIGEST_SIZE}s")  # a replica check: offset, length, digest (replication/verify.py)
HEADER_SIZE = _HDR.size
TAG_SIZE = 16
MAX_PAGES_BYTES = 64 << 30
MAX_DEVICE_STATE = 64 << 20
DISK_BLOCK = 4096  # the disk section's unit (replication/nbd.py BLOCK_SIZE)
MAX_DISK_BYTES = 64 << 30
ZERO_RANGE_SIZE = 16  # a zero range in the disk section: u64 gap from the previous range's end, u64 blocks
MAX_ZERO_RANGES = 1 << 24
_MAX_RANGE_BLOCKS = 1 << 38  # a gap or a length beyond this (4 PiB) is not a disk


class CodecError(GeomirrorError):
    """A frame cannot be decoded."""


class TruncatedFrame(CodecError):
    pass


class IntegrityError(CodecError):
    pass


class FrameFormatError(CodecError):
    pass


@dataclass(frozen=True)
class FrameHeader:
    epoch: int
    kind: int
    page_size: int
    n_pages: int
    index_len: int
    pages_len: int
    dev_len: int
    body_len: int
    nonce: bytes
    dev_delta: bool = False
    check_len: int = 0
    n_disk_blocks: int = 0
    disk_index_len: int = 0
    disk_len: int = 0
    n_zero_ranges: int = 0
    zero_len: int = 0

    @property
    def total_len(self) -> int:
        return HEADER_SIZE + self.body_len + TAG_SIZE


@dataclass(frozen=True)
class DecodedCheckpoint:
    header: FrameHeader
    page_numbers: np.ndarray  # uint64, sorted, unique
    payload: np.ndarray  # (n, page_size) uint8: XOR deltas or contents (DELTA, see raw_mask); contents (FULL)
    device_state: bytes
    raw_mask: np.ndarray | None = None  # DELTA: bool per page, True where the payload is the contents
    check: RangeCheck | None = None  # the primary's live-RAM range digest of this epoch, if it sent one
    disk_blocks: np.ndarray | None = None  # uint64, sorted, unique: the disk blocks written (4 KiB each)
    disk_data: np.ndarray | None = None  # (n, DISK_BLOCK) uint8: their contents at the end of the epoch
    # (k, 2) uint64: (first block, number of blocks) of each disk range zeroed in the epoch, ascending and
    # disjoint; applied before disk_blocks (a block written after a zeroing is among those)
    disk_zeroes: np.ndarray | None = None

    def new_pages(self, old_pages: np.ndarray) -> np.ndarray:
        """The pages' new contents, given their previous contents (FULL: the payload)."""
        if self.kind == KIND_FULL:
            return self.payload
        return apply_delta(self.payload, old_pages, self.raw_mask)

    @property
    def epoch(self) -> int:
        return self.header.epoch

    @property
    def kind(self) -> int:
        return self.header.kind

    def device_state_from(self, base: bytes) -> bytes:
        """The full device state: as sent, or (DEV_DELTA) rebuilt from the previous epoch's."""
        if not self.header.dev_delta:
            return self.device_state
        want, delta = self.device_state[:_DEV_HASH], self.device_state[_DEV_HASH:]
        if len(base) != len(delta):
            raise CodecError(f"epoch {self.epoch}: device-state delta of {len(delta)} bytes does not fit the "
                             f"previous device state of {len(base)} bytes")
        full = np.bitwise_xor(np.frombuffer(delta, np.uint8), np.frombuffer(base, np.uint8)).tobytes()
        if hashlib.blake2b(full, digest_size=_DEV_HASH).digest() != want:
            raise IntegrityError(f"epoch {self.epoch}: device state rebuilt from the previous epoch's does not "
                                 "match (the standby's previous device state differs from the primary's)")
        return full


def peek_header(buf) -> FrameHeader:
    """Parse and bounds-check the clear header (no key needed)."""
    if len(buf) < HEADER_SIZE:
        raise TruncatedFrame(f"frame of {len(buf)} bytes is shorter than its {HEADER_SIZE}-byte header")
    magic, ver, kind, ps, epoch, n, ilen, plen, dlen, clen, nd, dilen, dklen, nz, zlen, blen, nonce = \
        _HDR.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameFormatError(f"not a checkpoint frame (magic {magic!r})")
    if ver != VERSION:
        raise FrameFormatError(f"checkpoint frame version {ver}, this build reads {VERSION}")
    dev_delta = bool(kind & DEV_DELTA)
    kind &= ~DEV_DELTA
    if kind not in (KIND_DELTA, KIND_FULL):
        raise FrameFormatError(f"unknown frame kind {kind} (epoch {epoch})")
    if ps < 64 or ps & (ps - 1) or ps > 1 << 16:
        raise FrameFormatError(f"bad page size {ps} (epoch {epoch})")
    if n * ps > MAX_PAGES_BYTES or dlen > MAX_DEVICE_STATE:
        raise FrameFormatError(f"frame for epoch {epoch} claims {n} pages and {dlen} bytes of device state: "
                               "over the limits")
    if clen not in (0, _CHECK.size):
        raise FrameFormatError(f"frame for epoch {epoch}: a replica check of {clen} bytes (expected 0 or "
                               f"{_CHECK.size})")
    if nd * DISK_BLOCK > MAX_DISK_BYTES:
        raise FrameFormatError(f"frame for epoch {epoch} claims {nd} disk blocks: over the limit")
    if (nd == 0) != (dilen == 0) or (dklen and not nd):
        raise FrameFormatError(f"frame for epoch {epoch}: {nd} disk blocks with a {dilen}-byte index and "
                               f"{dklen} bytes of contents")
    if nz > MAX_ZERO_RANGES:
        raise FrameFormatError(f"frame for epoch {epoch} claims {nz} disk zero ranges: over the limit")
    if (nz == 0) != (zlen == 0):
        raise FrameFormatError(f"frame for epoch {epoch}: {nz} disk zero ranges in a {zlen}-byte section")
    if blen != ilen + plen + dlen + clen + dilen + dklen + zlen:
        raise FrameFormatError(f"frame for epoch {epoch}: section lengths do not add up")
    h = FrameHeader(epoch, kind, ps, n, ilen, plen, dlen, blen, nonce, dev_delta, clen, nd, dilen, dklen, nz, zlen)
    if len(buf) < h.total_len:
        raise TruncatedFrame(f"frame for epoch {epoch} is cut off: {len(buf)} of {h.total_len} bytes")
    if len(buf) > h.total_len:
        raise FrameFormatError(f"frame for epoch {epoch} has {len(buf) - h.total_len} trailing bytes")
    return h


def _encode_index(pages: np.ndarray, raw_mask: np.ndarray | None = None) -> bytes:
    """Sorted page numbers as deltas (u32 each; zstd squeezes runs of 1s to nothing), then
    for DELTA frames one byte per page: 1 where the page travels raw, 0 where as XOR."""
    if pages.size == 0:
        return b""
    d = np.diff(pages.astype(np.uint64), prepend=np.uint64(0))
    if d.size and int(d.max()) >= 1 << 32:
        raise ValueError("page number gap too large")
    out = d.astype(">u4").tobytes()
    if raw_mask is not None:
        out += raw_mask.astype(np.uint8).tobytes()
    return out


def _encode_disk_index(blocks: np.ndarray) -> bytes:
    """Sorted disk block numbers as u64 gaps from the previous one (first from 0)."""
    return np.diff(blocks.astype(np.uint64), prepend=np.uint64(0)).astype(">u8").tobytes()


def _encode_zero_ranges(ranges: np.ndarray) -> bytes:
    """(first block, blocks) pairs, ascending and disjoint, as u64 (gap from the previous range's
    end, the first from 0; blocks)."""
    first, count = ranges[:, 0].astype(np.uint64), ranges[:, 1].astype(np.uint64)
    prev_end = np.concatenate([np.zeros(1, np.uint64), (first + count)[:-1]])
    return np.stack([first - prev_end, count], axis=1).astype(">u8").tobytes()


def _check_zero_ranges(ranges: np.ndarray) -> None:
    if ranges.ndim != 2 or ranges.shape[1] != 2:
        raise ValueError(f"disk_zeroes must have shape (k, 2), not {ranges.shape}")
    first, count = ranges[:, 0].astype(np.int64), ranges[:, 1].astype(np.int64)
    if np.any(count <= 0) or np.any(first < 0) or np.any(first[1:] < (first + count)[:-1]):
        raise ValueError("disk zero ranges must be non-empty, ascending and disjoint")


def _decode_zero_ranges(raw: bytes, epoch: int) -> np.ndarray:
    pairs = np.frombuffer(raw, dtype=">u8").reshape(-1, 2).astype(np.uint64)
    gaps, count = pairs[:, 0], pairs[:, 1]
    if np.any(count == 0) or np.any(count >= _MAX_RANGE_BLOCKS) or np.any(gaps >= _MAX_RANGE_BLOCKS):
        raise FrameFormatError(f"frame for epoch {epoch}: a disk zero range is empty or beyond any disk")
    end = np.cumsum(gaps + count, dtype=np.uint64)  # no wrap: at most 2^24 terms below 2^39 each
    return np.stack([end - count, count], axis=1)


def choose_raw(new_pages: np.ndarray, xor: np.ndarray) -> np.ndarray:
    """Per page: send it raw where that has fewer non-zero words than its XOR delta.

    XOR wins when a page changes a little (a counter, a list pointer); raw wins when a
    page is rewritten with mostly zeros (the guest clearing a freed page: its XOR is the
    whole old content). On the lab's guest this took the page section of a checkpoint
    from ~0.21 of the raw dirty bytes to ~0.004 (docs/wire-format.md)."""
    words = new_pages.shape[1] // 8
    a = np.count_nonzero(new_pages.view(np.uint64).reshape(-1, words), axis=1)
    b = np.count_nonzero(xor.view(np.uint64).reshape(-1, words), axis=1)
    return a < b


def apply_delta(payload: np.ndarray, old_pages: np.ndarray, raw_mask: np.ndarray | None = None) -> np.ndarray:
    """New page contents from a DELTA payload and the old contents (`raw_mask`: pages whose
    payload is already the contents)."""
    if payload.shape != old_pages.shape:
        raise CodecError(f"delta shape {payload.shape} does not match old pages {old_pages.shape}")
    out = np.bitwise_xor(payload, old_pages)
    if raw_mask is not None and raw_mask.any():
        out[raw_mask] = payload[raw_mask]
    return out


class Codec:
    """Encodes and decodes frames under one key. Reuses its zstd contexts (not thread-safe:
    one Codec per thread of use)."""

    def __init__(self, key: bytes, level: int = 1):
        if len(key) != 32:
            raise ValueError("the frame key must be 32 bytes")
        self._aead = AESGCM(key)
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._dctx = zstandard.ZstdDecompressor()

    def encode(self, *, epoch: int, kind: int, page_size: int, page_numbers: np.ndarray,
               new_pages: np.ndarray, old_pages: np.ndarray | None = None, device_state: bytes = b"",
               device_base: bytes | None = None, check: RangeCheck | None = None,
               disk_blocks: np.ndarray | None = None, disk_data: np.ndarray | None = None,
               disk_zeroes: np.ndarray | None = None) -> bytes:
        """`device_base`: the previous epoch's device state the receiver holds; when given (and of
        the same length) only the XOR goes on the wire, with a hash of the full state. `check`:
        a digest of a range of the primary's live RAM at this epoch, for the standby to compare.
        `disk_blocks` (sorted, unique) and `disk_data` ((n, DISK_BLOCK) uint8): the guest's disk
        blocks of this epoch, whole contents (the replica applies them without a base). `disk_zeroes`
        ((k, 2): first block, number of blocks; ascending, disjoint): the ranges of the disk zeroed
        in this epoch, applied before `disk_blocks`."""
        n = int(page_numbers.size)
        if new_pages.shape != (n, page_size):
            raise ValueError(f"new_pages has shape {new_pages.shape}, expected {(n, page_size)}")
        if n > 1 and not np.all(np.diff(page_numbers.astype(np.int64)) > 0):
            raise ValueError("page numbers must be sorted and unique")
        raw_mask = None
        if kind == KIND_DELTA:
            if old_pages is None or old_pages.shape != new_pages.shape:
                raise ValueError("a DELTA frame needs old_pages of the same shape")
            data = np.bitwise_xor(new_pages, old_pages)
            if n:
                raw_mask = choose_raw(new_pages, data)
                if raw_mask.any():
                    data[raw_mask] = new_pages[raw_mask]
        elif kind == KIND_FULL:
            data = new_pages
        else:
            raise ValueError(f"unknown kind {kind}")
        index = self._cctx.compress(_encode_index(page_numbers, raw_mask))
        pages = self._cctx.compress(np.ascontiguousarray(data).data) if n else b""
        flag = 0
        if device_state and device_base is not None and len(device_base) == len(device_state):
            x = np.bitwise_xor(np.frombuffer(device_state, np.uint8), np.frombuffer(device_base, np.uint8))
            device_state = hashlib.blake2b(device_state, digest_size=_DEV_HASH).digest() + x.tobytes()
            flag = DEV_DELTA
        dev = self._cctx.compress(device_state) if device_state else b""
        chk = _CHECK.pack(check.offset, check.length, check.digest) if check is not None else b""
        nd, dindex, ddata = 0, b"", b""
        if disk_blocks is not None and disk_blocks.size:
            nd = int(disk_blocks.size)
            if disk_data is None or disk_data.shape != (nd, DISK_BLOCK):
                raise ValueError(f"disk_data must have shape {(nd, DISK_BLOCK)}")
            if nd > 1 and not np.all(np.diff(disk_blocks.astype(np.int64)) > 0):
                raise ValueError("disk block numbers must be sorted and unique")
            dindex = self._cctx.compress(_encode_disk_index(disk_blocks))
            ddata = self._cctx.compress(np.ascontiguousarray(disk_data).data)
        nz, zdata = 0, b""
        if disk_zeroes is not None and len(disk_zeroes):
            _check_zero_ranges(disk_zeroes)
            nz = len(disk_zeroes)
            zdata = self._cctx.compress(_encode_zero_ranges(disk_zeroes))
        nonce = os.urandom(12)
        sections = (index, pages, dev, chk, dindex, ddata, zdata)
        hdr = _HDR.pack(MAGIC, VERSION, kind | flag, page_size, epoch, n, len(index), len(pages), len(dev),
                        len(chk), nd, len(dindex), len(ddata), nz, len(zdata), sum(len(x) for x in sections), nonce)
        return hdr + self._aead.encrypt(nonce, b"".join(sections), hdr)

    def decode(self, frame) -> DecodedCheckpoint:
        h = peek_header(frame)
        mv = memoryview(frame)
        try:
            body = self._aead.decrypt(h.nonce, mv[HEADER_SIZE:h.total_len], mv[:HEADER_SIZE])
        except InvalidTag:
            raise IntegrityError(f"frame for epoch {h.epoch} failed its integrity check "
                                 "(wrong key or corrupted)") from None
        i0, i1 = h.index_len, h.index_len + h.pages_len
        i2 = i1 + h.dev_len
        i3 = i2 + h.check_len
        i4 = i3 + h.disk_index_len
        i5 = i4 + h.disk_len
        per_page = 5 if h.kind == KIND_DELTA else 4  # u32 gap (+ the raw/XOR byte for DELTA)
        try:
            raw_index = self._dctx.decompress(body[:i0], max_output_size=per_page * h.n_pages) if i0 else b""
            raw_pages = (self._dctx.decompress(body[i0:i1], max_output_size=h.n_pages * h.page_size)
                         if h.pages_len else b"")
            dev = self._dctx.decompress(body[i1:i2], max_output_size=MAX_DEVICE_STATE) if h.dev_len else b""
            nd = h.n_disk_blocks
            raw_dindex = self._dctx.decompress(body[i3:i4], max_output_size=8 * nd) if nd else b""
            raw_disk = (self._dctx.decompress(body[i4:i5], max_output_size=nd * DISK_BLOCK)
                        if h.disk_len else b"")
            nz = h.n_zero_ranges
            raw_zero = self._dctx.decompress(body[i5:], max_output_size=ZERO_RANGE_SIZE * nz) if nz else b""
        except zstandard.ZstdError as e:
            raise FrameFormatError(f"frame for epoch {h.epoch} does not decompress: {e}") from None
        if len(raw_index) != per_page * h.n_pages or len(raw_pages) != h.n_pages * h.page_size \
                or len(raw_dindex) != 8 * nd or len(raw_disk) != nd * DISK_BLOCK \
                or len(raw_zero) != ZERO_RANGE_SIZE * nz:
            raise FrameFormatError(f"frame for epoch {h.epoch}: decompressed sizes do not match its header")
        deltas = np.frombuffer(raw_index, dtype=">u4", count=h.n_pages).astype(np.uint64)
        raw_mask = None
        if h.kind == KIND_DELTA:
            modes = np.frombuffer(raw_index, dtype=np.uint8, offset=4 * h.n_pages)
            if modes.size and int(modes.max()) > 1:
                raise FrameFormatError(f"frame for epoch {h.epoch}: unknown page encoding {int(modes.max())}")
            raw_mask = modes.astype(bool)
        if h.n_pages > 1 and not np.all(deltas[1:] > 0):
            raise FrameFormatError(f"frame for epoch {h.epoch}: page numbers not sorted and unique")
        numbers = np.cumsum(deltas, dtype=np.uint64) if h.n_pages else np.empty(0, np.uint64)
        payload = np.frombuffer(raw_pages, dtype=np.uint8).reshape(h.n_pages, h.page_size)
        check = RangeCheck(*_CHECK.unpack_from(body, i2)) if h.check_len else None
        disk_blocks = disk_data = None
        if nd:
            gaps = np.frombuffer(raw_dindex, dtype=">u8").astype(np.uint64)
            if nd > 1 and not np.all(gaps[1:] > 0):
                raise FrameFormatError(f"frame for epoch {h.epoch}: disk block numbers not sorted and unique")
            disk_blocks = np.cumsum(gaps, dtype=np.uint64)
            disk_data = np.frombuffer(raw_disk, dtype=np.uint8).reshape(nd, DISK_BLOCK)
        zeroes = _decode_zero_ranges(raw_zero, h.epoch) if nz else None
        return DecodedCheckpoint(h, numbers, payload, dev, raw_mask, check, disk_blocks, disk_data, zeroes)
