"""Primary side of disk replication: the guest's disk served over NBD, every write recorded.

QEMU reaches the guest's disk through ``-blockdev driver=nbd,server.type=unix,...`` on a
unix socket this module serves. Each write is written to the primary's raw image
(``os.pwrite``) and recorded in the open epoch's extent set at 4 KiB block granularity:
a block written twice in one epoch is recorded once, with its latest content. At the
checkpoint, with the guest stopped (QEMU completes in-flight writes before ``stop``
returns), ``seal()`` closes the epoch and returns its extents; they travel in
checkpoint N with the RAM delta. The pause work of ``seal()`` is O(1): the block
contents are copies of the write payloads taken as the writes arrive (a block only
partly covered by a write is read back from the image once it is written), so nothing
is read from the image in the pause.

Zeroing: WRITE_ZEROES and TRIM (advertised, and treated alike: a trimmed range reads as zeros
here and at the replica, so the two images stay identical) punch a hole in the image
(``FALLOC_FL_PUNCH_HOLE``; with ``NBD_CMD_FLAG_NO_HOLE`` the zeros stay allocated:
``FALLOC_FL_ZERO_RANGE``; zeros written where the filesystem has neither), so the image stays
sparse, and are recorded as a range of whole blocks, not block by block: a ``mkfs`` or
``fstrim`` over a large disk costs a few bytes of arena and of frame (``ExtentLog``).

Output commit, and why FLUSH/FUA do not wait for the WAN: a write is durable, in the
sense that survives the loss of the primary, once the standby has committed the epoch
that holds it. The guest's network output of that epoch is held by the output gate
until then, so no client can observe anything that depended on a write the standby
does not have. FLUSH and FUA are therefore answered as soon as the local write is
done (and, with ``sync_on_flush``, the local image synced).

Everything here runs on plain threads, off the asyncio event loop: one thread accepts,
one thread per connection reads requests, writes the image and answers. Replies are
simple replies (QEMU falls back to them when structured replies are refused).

Backpressure: ``unsent_bytes`` counts the bytes of blocks recorded and not yet handed
back with ``release(n)`` (open epoch + sealed epochs not yet sent), a zero range as its
encoded size (``ZERO_RANGE_BYTES``). Above ``cap_bytes``
the reply to a write is held until ``release`` brings it under the cap. Because QEMU's
``stop`` waits for in-flight writes, a held reply would also hold ``stop``; the
checkpoint calls ``checkpoint_starting()`` before ``stop``, which lets held replies go
until the next ``seal()``.

Recording only while a session runs: with no session nothing seals or sends, so an
open epoch that kept every written block would grow up to the disk's size. The next
session's disk sync by chunk hashes finds those blocks anyway, so the replication
layer calls ``stop_recording()`` when no session runs (the open epoch's copies are
dropped, nothing is recorded, the cap holds nothing) and ``start_recording()`` as the
session's disk sync begins (before it reads the image: a block written before its
chunk is read is in what the sync reads, one written after is recorded).
"""

from __future__ import annotations

import bisect
import errno
import os
import socket
import stat
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import structlog

from gmbase.errors import GeomirrorError
from replication import zeroing

log = structlog.get_logger(__name__)

BLOCK_SIZE = 4096
MAX_PAYLOAD = 32 * 1024 * 1024  # largest READ/WRITE; QEMU never sends more

# -- the NBD protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 2, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
TF_HAS_FLAGS, TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES = 1, 4, 8, 32, 64
TRANSMISSION_FLAGS = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 5, 6
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1, 2
NBD_EPERM, NBD_EIO, NBD_EINVAL, NBD_ENOSPC, NBD_ENOTSUP = 1, 5, 22, 28, 95

_REQ = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
_OPT = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPT_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
_MAX_OPTION = 64 * 1024


class DiskImageError(GeomirrorError):
    """The guest's disk image cannot be served (missing, wrong size, not a regular file)."""


class _ConnectionClosed(Exception):
    """The peer closed the connection (cleanly or not)."""


class _ProtocolViolation(Exception):
    """The peer sent something that is not NBD; the connection is dropped, the server runs on."""


# -- the extent log: the epoch's recorded blocks, seal, backpressure (no sockets) ----------
CHUNK_BLOCKS = 256  # the extent log's content arena grows by 1 MiB at a time
ZERO_RANGE_BYTES = 16  # a zeroed range in the frame: two u64 (replication/codec.py), what it counts as unsent


@dataclass(frozen=True)
class SealedExtents:
    """What one epoch wrote: blocks with their content at the end of that epoch, and the ranges
    of whole blocks it zeroed.

    Built in O(1) inside the pause (the epoch's block -> slot map, its content arena and its zero
    ranges change hands); ``block_numbers()`` / ``contents()`` do the O(blocks) work when called
    (after ``cont``). Applied in the order zero ranges, then blocks, they give the epoch's end
    state: a block written after a zeroing in the same epoch is among the blocks, a block zeroed
    whole after its last write is not (``ExtentLog`` keeps it so). A slot of ``order`` holding -1
    is a block dropped that way (its arena slot is unused)."""

    epoch: int
    slots: dict[int, int] = field(repr=False)  # block number -> slot in the arena
    order: list[int] = field(repr=False)  # slot -> block number (-1: dropped)
    chunks: list[bytearray] = field(repr=False)  # the arena: chunk_blocks blocks each
    block_size: int = BLOCK_SIZE
    chunk_blocks: int = CHUNK_BLOCKS
    zero_starts: list[int] = field(default_factory=list, repr=False)  # zeroed block ranges [start, end):
    zero_ends: list[int] = field(default_factory=list, repr=False)  # sorted, disjoint, not adjacent

    def __len__(self) -> int:
        """The blocks (zero ranges not counted)."""
        return len(self.slots)

    @property
    def empty(self) -> bool:
        return not self.slots and not self.zero_starts

    @property
    def nbytes(self) -> int:
        """What the epoch puts in the frame, as counted against the cap: its blocks' bytes and
        ``ZERO_RANGE_BYTES`` per zero range (not the bytes it zeroes)."""
        return len(self.slots) * self.block_size + len(self.zero_starts) * ZERO_RANGE_BYTES

    @property
    def zeroed_bytes(self) -> int:
        """The disk bytes the zero ranges cover."""
        return sum(e - s for s, e in zip(self.zero_starts, self.zero_ends)) * self.block_size

    def zero_ranges(self) -> np.ndarray:
        """(k, 2) uint64: (first block, number of blocks) of each zeroed range, ascending."""
        out = np.empty((len(self.zero_starts), 2), dtype=np.uint64)
        if self.zero_starts:
            starts = np.array(self.zero_starts, dtype=np.uint64)
            out[:, 0] = starts
            out[:, 1] = np.array(self.zero_ends, dtype=np.uint64) - starts
        return out

    def _dropped(self) -> bool:
        return len(self.slots) != len(self.order)

    def _sorted(self) -> tuple[np.ndarray, np.ndarray]:
        """(block numbers ascending, the slot of each)."""
        by_slot = np.array(self.order, dtype=np.int64)
        if self._dropped():
            live = np.flatnonzero(by_slot >= 0)
            perm = live[np.argsort(by_slot[live], kind="stable")]
        else:
            perm = np.argsort(by_slot, kind="stable")
        return by_slot[perm].astype(np.uint64), perm

    def block_numbers(self) -> np.ndarray:
        return self._sorted()[0]

    def contents(self) -> np.ndarray:
        """(n, block_size) uint8, in the order of ``block_numbers()``: one copy out of the arena."""
        n, bs, nslots = len(self.slots), self.block_size, len(self.order)
        out = np.empty((n, bs), dtype=np.uint8)
        if not n:
            return out
        _, perm = self._sorted()
        where = np.full(nslots, -1, dtype=np.int64)  # slot -> row of the output (-1: dropped)
        where[perm] = np.arange(n)
        dropped = self._dropped()
        for ci, chunk in enumerate(self.chunks):
            lo, hi = ci * self.chunk_blocks, min(nslots, (ci + 1) * self.chunk_blocks)
            rows = where[lo:hi]
            view = np.frombuffer(chunk, dtype=np.uint8).reshape(self.chunk_blocks, bs)[:hi - lo]
            if dropped:
                live = rows >= 0
                out[rows[live]] = view[live]
            else:
                out[rows] = view
        return out

    def by_chunk(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per arena chunk, (block numbers in slot order, their contents as a (k, block_size)
        uint8 view). For a consumer that does not need the blocks sorted (a compressor): no sort,
        and no copy unless blocks were dropped from the chunk."""
        nslots, bs, cb = len(self.order), self.block_size, self.chunk_blocks
        dropped = self._dropped()
        for ci, chunk in enumerate(self.chunks):
            lo, hi = ci * cb, min(nslots, (ci + 1) * cb)
            numbers = np.array(self.order[lo:hi], dtype=np.int64)
            view = np.frombuffer(chunk, dtype=np.uint8).reshape(cb, bs)[:hi - lo]
            if dropped:
                live = numbers >= 0
                numbers, view = numbers[live], view[live]
            yield numbers.astype(np.uint64), view

    def block(self, b: int) -> bytes:
        s = self.slots[b]
        c = self.chunks[s // self.chunk_blocks]
        o = (s % self.chunk_blocks) * self.block_size
        return bytes(c[o:o + self.block_size])


class ExtentLog:
    """The open epoch's extent set and the unsent-bytes account, shared by all connections.

    Writers hold ``lock`` around "write the image, then ``record``", so a write lands
    whole in exactly one epoch and the recorded content is the image's content. The
    content of each block is copied into an arena as the write arrives (no allocation
    per block): 5-8 us per 4 KiB block in the write path here, against 2-6 us per block
    to read it back from the image at seal time, which would be inside the pause
    (docs/disk.md).

    Zeroing (WRITE_ZEROES, TRIM) keeps the whole blocks it covers as a range (merged with the
    open epoch's other zeroed ranges: memory O(ranges), not O(blocks)) and drops those blocks'
    earlier copies, so a later zeroing wins over an earlier write; a write after a zeroing is
    recorded as a block like any write, so applying the ranges first and then the blocks gives
    the epoch's end state. The partial blocks at a zeroed range's edges are recorded blocks
    (read back whole). A dropped block's arena slot is reused by the next new block."""

    def __init__(self, block_size: int = BLOCK_SIZE, cap_bytes: int | None = None, first_epoch: int = 1,
                 chunk_blocks: int = CHUNK_BLOCKS, recording: bool = True):
        self.block_size = block_size
        self.chunk_blocks = chunk_blocks
        self.cap_bytes = cap_bytes
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self.epoch = first_epoch
        self._slots: dict[int, int] = {}
        self._order: list[int] = []
        self._chunks: list[bytearray] = []
        self._views: list[memoryview] = []
        self._free: list[int] = []  # arena slots of dropped blocks, reused first
        self._zstart: list[int] = []  # the open epoch's zeroed block ranges [start, end): sorted,
        self._zend: list[int] = []  # disjoint and not adjacent (touching ranges are merged)
        self.unsent_bytes = 0
        self._stop_pending = False  # checkpoint_starting() .. seal(): held replies may go
        self._closed = False
        self.recording = recording  # off: writes are not recorded and the cap holds nothing (no session)
        self.delayed_replies = 0  # write replies held by the cap
        self.delayed_s = 0.0  # the time they were held, summed
        self.stop_releases = 0  # checkpoints whose checkpoint_starting() let held replies go
        self._waiting = 0  # replies held right now

    def _slot_view(self, b: int) -> memoryview:
        """The arena slot of block ``b`` in the open epoch, allocated on its first write."""
        s = self._slots.get(b)
        if s is None:
            s = self._reuse_slot(b) if self._free else self._new_slots(b, 1)
        o = (s % self.chunk_blocks) * self.block_size
        return self._views[s // self.chunk_blocks][o:o + self.block_size]

    def _new_slots(self, b: int, k: int) -> int:
        """Give blocks b..b+k-1 (none recorded yet, k <= room left in the last chunk or
        self.chunk_blocks) consecutive slots; returns the first."""
        s = len(self._order)
        if s // self.chunk_blocks == len(self._chunks):
            c = bytearray(self.chunk_blocks * self.block_size)
            self._chunks.append(c)
            self._views.append(memoryview(c))
        self._slots.update(zip(range(b, b + k), range(s, s + k)))
        self._order.extend(range(b, b + k))
        self.unsent_bytes += k * self.block_size
        return s

    def _reuse_slot(self, b: int) -> int:
        """Give block ``b`` (not recorded) the slot of a dropped block."""
        s = self._free.pop()
        self._slots[b] = s
        self._order[s] = b
        self.unsent_bytes += self.block_size
        return s

    def _copy_whole_blocks(self, b0: int, b1: int, src: memoryview) -> None:
        """Blocks b0..b1-1 are wholly covered by ``src``: runs of new blocks go into
        consecutive slots with one copy per run (a 64 KiB write is one copy, not 16)."""
        bs, slots = self.block_size, self._slots
        if self._free or not slots.keys().isdisjoint(range(b0, b1)):  # rewritten or free slots: block by block
            for b in range(b0, b1):
                self._slot_view(b)[:] = src[(b - b0) * bs:(b - b0 + 1) * bs]
            return
        b = b0
        while b < b1:
            si = len(self._order) % self.chunk_blocks
            k = min(b1 - b, self.chunk_blocks - si)
            s = self._new_slots(b, k)
            self._views[s // self.chunk_blocks][si * bs:(si + k) * bs] = src[(b - b0) * bs:(b - b0 + k) * bs]
            b += k

    def record(self, offset: int, data: bytes | bytearray | memoryview,
               read_block: Callable[[int], bytes]) -> None:
        """Record a write of ``data`` at ``offset`` that has just reached the image.
        Call with ``lock`` held. Whole blocks are copied from ``data``; a block the write
        covers only in part is read back whole."""
        bs = self.block_size
        if not data or not self.recording:
            return
        mv = memoryview(data)
        end = offset + len(mv)
        first, last = offset // bs, (end - 1) // bs
        whole0 = -(-offset // bs)  # the first block the write covers whole
        whole1 = end // bs  # one past the last
        if first < whole0:
            self._slot_view(first)[:] = read_block(first)
        if whole0 < whole1:
            self._copy_whole_blocks(whole0, whole1, mv[whole0 * bs - offset:whole1 * bs - offset])
        if last >= whole1 and not (last == first and first < whole0):  # a partial last block, not done above
            self._slot_view(last)[:] = read_block(last)

    def record_zeroes(self, offset: int, length: int, read_block: Callable[[int], bytes]) -> None:
        """Record a zeroed range (WRITE_ZEROES, TRIM) that has just reached the image. Call with
        ``lock`` held. The whole blocks it covers become a zero range (their earlier copies in
        this epoch are dropped); a block it covers only in part is read back whole."""
        bs = self.block_size
        if length <= 0 or not self.recording:
            return
        end = offset + length
        first, last = offset // bs, (end - 1) // bs
        whole0, whole1 = -(-offset // bs), end // bs
        if whole0 < whole1:
            self._drop_blocks(whole0, whole1)
            self._add_zero_range(whole0, whole1)
        if first < whole0:
            self._slot_view(first)[:] = read_block(first)
        if last >= whole1 and not (last == first and first < whole0):
            self._slot_view(last)[:] = read_block(last)

    def _drop_blocks(self, b0: int, b1: int) -> None:
        """Forget the open epoch's copies of blocks b0..b1-1 (zeroed whole after their write):
        O(min(range, recorded blocks))."""
        slots = self._slots
        if not slots:
            return
        if b1 - b0 <= len(slots):
            gone = [b for b in range(b0, b1) if b in slots]
        else:
            gone = [b for b in slots if b0 <= b < b1]
        for b in gone:
            s = slots.pop(b)
            self._order[s] = -1
            self._free.append(s)
        if gone:
            self.unsent_bytes -= len(gone) * self.block_size
            self._cond.notify_all()

    def _add_zero_range(self, a: int, b: int) -> None:
        """Add zeroed blocks a..b-1, merged with the ranges it overlaps or touches."""
        starts, ends = self._zstart, self._zend
        i = bisect.bisect_left(ends, a)  # the first range ending at or after a
        j = bisect.bisect_right(starts, b)  # one past the last range starting at or before b
        if i < j:
            a, b = min(a, starts[i]), max(b, ends[j - 1])
        starts[i:j] = [a]
        ends[i:j] = [b]
        self.unsent_bytes += (1 - (j - i)) * ZERO_RANGE_BYTES
        if j - i > 1:
            self._cond.notify_all()

    def over_cap(self) -> bool:
        """Unlocked peek for the fast path; ``wait_under_cap`` decides under the lock."""
        return self.cap_bytes is not None and self.unsent_bytes > self.cap_bytes

    def _must_wait(self) -> bool:
        return (self.unsent_bytes > self.cap_bytes and self.recording and not self._stop_pending
                and not self._closed)

    def wait_under_cap(self) -> None:
        """Before answering a write: wait while the unsent bytes are over the cap (not during a
        checkpoint's ``stop``, not while nothing is recorded, and never once closed)."""
        if self.cap_bytes is None:
            return
        with self._cond:
            if not self._must_wait():
                return
            self.delayed_replies += 1
            self._waiting += 1
            t0 = time.monotonic()
            try:
                while self._must_wait():
                    self._cond.wait()
            finally:
                self._waiting -= 1
                self.delayed_s += time.monotonic() - t0

    def checkpoint_starting(self) -> None:
        """The checkpoint is about to ``stop`` the guest: let held replies go (``stop`` waits for
        in-flight writes) until ``seal``."""
        with self._cond:
            if self._waiting:
                self.stop_releases += 1
            self._stop_pending = True
            self._cond.notify_all()

    def _drop_open_epoch(self) -> int:
        """Forget the open epoch's blocks and zero ranges (call under the lock); returns their bytes."""
        dropped = self.open_bytes
        self._reset_open_epoch()
        self.unsent_bytes = max(0, self.unsent_bytes - dropped)
        return dropped

    def start_recording(self) -> int:
        """A session's disk sync is about to read the image: drop what the open epoch holds (the
        sync reads it from the image) and record every write from now on. Returns the bytes dropped."""
        with self._cond:
            dropped = self._drop_open_epoch()
            self.recording = True
            self._cond.notify_all()
        return dropped

    def stop_recording(self) -> int:
        """No session runs: drop the open epoch's blocks and record nothing until
        ``start_recording`` (the next session's disk sync finds those writes by their chunk
        hashes). Held replies go. Returns the bytes dropped."""
        with self._cond:
            dropped = self._drop_open_epoch()
            self.recording = False
            self._stop_pending = False
            self._cond.notify_all()
        return dropped

    def seal(self, epoch: int | None = None) -> SealedExtents:
        """Close the open epoch and open the next; O(1). ``epoch``: the number the
        checkpoint gives the closed epoch (the next one is numbered after it)."""
        with self._cond:
            if epoch is not None:
                self.epoch = epoch
            sealed = SealedExtents(self.epoch, self._slots, self._order, self._chunks, self.block_size,
                                   self.chunk_blocks, self._zstart, self._zend)
            self._reset_open_epoch()
            self.epoch += 1
            self._stop_pending = False
        return sealed

    def release(self, nbytes: int) -> None:
        """``nbytes`` of sealed extents have left (sent): held replies may go once under the cap."""
        with self._cond:
            self.unsent_bytes = max(0, self.unsent_bytes - nbytes)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _reset_open_epoch(self) -> None:
        self._slots, self._order, self._chunks, self._views, self._free = {}, [], [], [], []
        self._zstart, self._zend = [], []

    @property
    def open_blocks(self) -> int:
        return len(self._slots)

    @property
    def open_zero_ranges(self) -> int:
        return len(self._zstart)

    @property
    def open_bytes(self) -> int:
        """The open epoch's share of ``unsent_bytes``: its blocks and its zero ranges as encoded."""
        return len(self._slots) * self.block_size + len(self._zstart) * ZERO_RANGE_BYTES

    @property
    def arena_bytes(self) -> int:
        """Memory the open epoch's block copies take (its arena chunks)."""
        return len(self._chunks) * self.chunk_blocks * self.block_size


# -- the server -----------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int, buf: bytearray | None = None) -> bytearray:
    if buf is None:
        buf = bytearray(n)
    view = memoryview(buf)[:n]
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            raise _ConnectionClosed()
        got += k
    return buf


def _errno_to_nbd(e: OSError) -> int:
    return {errno.ENOSPC: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC, errno.EPERM: NBD_EPERM,
            errno.EROFS: NBD_EPERM, errno.EINVAL: NBD_EINVAL}.get(e.errno or 0, NBD_EIO)


class NbdServer:
    """One raw image served over NBD on a unix socket (mode 0600), writes recorded in ``extents``."""

    def __init__(self, image: Path, socket_path: Path, *, export_name: str = "",
                 cap_bytes: int | None = None, sync_on_flush: bool = False, block_size: int = BLOCK_SIZE,
                 recording: bool = True):
        self.image = Path(image)
        self.socket_path = Path(socket_path)
        self.export_name = export_name
        self.sync_on_flush = sync_on_flush
        self.block_size = block_size
        self.extents = ExtentLog(block_size, cap_bytes, recording=recording)
        self.size = 0
        self._fd = -1
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[int, tuple[socket.socket, threading.Thread]] = {}
        self._conns_lock = threading.Lock()
        self._next_conn = 0
        self._closing = False
        self.requests = 0

    # lifecycle
    def start(self) -> None:
        try:
            st = os.stat(self.image)
        except FileNotFoundError:
            raise DiskImageError(f"disk image {self.image} does not exist") from None
        if not stat.S_ISREG(st.st_mode):
            raise DiskImageError(f"disk image {self.image} is not a regular file")
        if st.st_size == 0 or st.st_size % self.block_size:
            raise DiskImageError(f"disk image {self.image} is {st.st_size} bytes, not a positive multiple of "
                                 f"{self.block_size}; resize it (qemu-img resize -f raw)")
        self.size = st.st_size
        self._fd = os.open(self.image, os.O_RDWR | os.O_CLOEXEC)
        self._listener = self._listen()
        self._accept_thread = threading.Thread(target=self._accept_loop, name="nbd-accept", daemon=True)
        self._accept_thread.start()
        log.info("nbd.serving", image=str(self.image), socket=str(self.socket_path), size=self.size)

    def _listen(self) -> socket.socket:
        """Bind under a temporary name, chmod 0600, rename into place: the socket is never
        reachable at its path with wider permissions."""
        tmp = self.socket_path.with_name(f".{self.socket_path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.bind(str(tmp))
            os.chmod(tmp, 0o600)
            s.listen(8)
            os.rename(tmp, self.socket_path)
        except OSError:
            s.close()
            tmp.unlink(missing_ok=True)
            raise
        return s

    def close(self) -> None:
        """Stop accepting, drop every connection, close the image."""
        self._closing = True
        self.extents.close()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join()
        self.drop_connections()
        try:
            if self._listener is not None:
                self.socket_path.unlink(missing_ok=True)
        finally:
            self._listener = None
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def drop_connections(self) -> None:
        """Cut every client connection (QEMU with ``reconnect-delay`` reconnects)."""
        with self._conns_lock:
            conns = list(self._conns.values())
        for sock, _ in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, t in conns:
            t.join()

    @property
    def connections(self) -> int:
        with self._conns_lock:
            return len(self._conns)

    # the checkpoint's side
    def checkpoint_starting(self) -> None:
        self.extents.checkpoint_starting()

    def seal(self, epoch: int | None = None) -> SealedExtents:
        return self.extents.seal(epoch)

    def release(self, nbytes: int) -> None:
        self.extents.release(nbytes)

    def start_recording(self) -> int:
        return self.extents.start_recording()

    def stop_recording(self) -> int:
        return self.extents.stop_recording()

    # threads
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                log.warning("nbd.accept_failed", socket=str(self.socket_path))
                time.sleep(0.05)
                continue
            with self._conns_lock:
                cid = self._next_conn
                self._next_conn += 1
                t = threading.Thread(target=self._serve, args=(cid, sock), name=f"nbd-conn-{cid}", daemon=True)
                self._conns[cid] = (sock, t)
            t.start()

    def _serve(self, cid: int, sock: socket.socket) -> None:
        try:
            if self._handshake(sock):
                log.info("nbd.connected", conn=cid, socket=str(self.socket_path))
                self._transmission(sock)
        except _ConnectionClosed:
            log.info("nbd.disconnected", conn=cid)
        except _ProtocolViolation as e:
            log.warning("nbd.protocol_violation", conn=cid, socket=str(self.socket_path), reason=str(e))
        except OSError as e:  # the socket failed under us (reset, shut down by close())
            log.info("nbd.connection_lost", conn=cid, error=str(e))
        finally:
            sock.close()
            with self._conns_lock:
                self._conns.pop(cid, None)

    # handshake (fixed newstyle)
    def _handshake(self, sock: socket.socket) -> bool:
        sock.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (cflags,) = struct.unpack(">I", _recv_exact(sock, 4))
        if not cflags & FLAG_FIXED_NEWSTYLE or cflags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
            raise _ProtocolViolation(f"client flags {cflags:#x} (fixed newstyle required)")
        no_zeroes = bool(cflags & FLAG_NO_ZEROES)
        while True:
            magic, opt, length = _OPT.unpack(_recv_exact(sock, _OPT.size))
            if magic != IHAVEOPT:
                raise _ProtocolViolation(f"option magic {magic:#x}")
            if length > _MAX_OPTION:
                raise _ProtocolViolation(f"option {opt} of {length} bytes")
            data = bytes(_recv_exact(sock, length)) if length else b""
            if opt == OPT_EXPORT_NAME:
                if data.decode("utf-8", "replace") != self.export_name:
                    raise _ProtocolViolation(f"unknown export {data[:64]!r}")
                sock.sendall(struct.pack(">QH", self.size, TRANSMISSION_FLAGS) + (b"" if no_zeroes else bytes(124)))
                return True
            if opt == OPT_ABORT:
                self._opt_reply(sock, opt, REP_ACK)
                return False
            if opt == OPT_LIST:
                if data:
                    self._opt_reply(sock, opt, REP_ERR_INVALID, b"LIST takes no data")
                    continue
                name = self.export_name.encode()
                self._opt_reply(sock, opt, REP_SERVER, struct.pack(">I", len(name)) + name)
                self._opt_reply(sock, opt, REP_ACK)
            elif opt in (OPT_INFO, OPT_GO):
                if self._opt_info(sock, opt, data) and opt == OPT_GO:
                    return True
            elif opt == OPT_STARTTLS:
                self._opt_reply(sock, opt, REP_ERR_POLICY, b"TLS is not offered on a local unix socket")
            else:  # STRUCTURED_REPLY, META_CONTEXT and the rest: simple replies only
                self._opt_reply(sock, opt, REP_ERR_UNSUP, b"option not supported")

    def _opt_info(self, sock: socket.socket, opt: int, data: bytes) -> bool:
        if len(data) < 6:
            self._opt_reply(sock, opt, REP_ERR_INVALID, b"short INFO/GO request")
            return False
        (nlen,) = struct.unpack_from(">I", data)
        if 4 + nlen + 2 > len(data):
            self._opt_reply(sock, opt, REP_ERR_INVALID, b"bad export name length")
            return False
        name = data[4:4 + nlen]
        (nreq,) = struct.unpack_from(">H", data, 4 + nlen)
        if 4 + nlen + 2 + 2 * nreq != len(data):
            self._opt_reply(sock, opt, REP_ERR_INVALID, b"bad information request count")
            return False
        if name.decode("utf-8", "replace") != self.export_name:
            self._opt_reply(sock, opt, REP_ERR_UNKNOWN, b"no such export")
            return False
        reqs = struct.unpack_from(f">{nreq}H", data, 4 + nlen + 2)
        self._opt_reply(sock, opt, REP_INFO, struct.pack(">HQH", INFO_EXPORT, self.size, TRANSMISSION_FLAGS))
        if INFO_BLOCK_SIZE in reqs:
            self._opt_reply(sock, opt, REP_INFO, struct.pack(">HIII", INFO_BLOCK_SIZE, 1, self.block_size, MAX_PAYLOAD))
        self._opt_reply(sock, opt, REP_ACK)
        return True

    @staticmethod
    def _opt_reply(sock: socket.socket, opt: int, rtype: int, data: bytes = b"") -> None:
        sock.sendall(_OPT_REPLY.pack(REPLY_MAGIC, opt, rtype, len(data)) + data)

    # transmission
    def _read_block(self, b: int) -> bytes:
        return os.pread(self._fd, self.block_size, b * self.block_size)

    def _transmission(self, sock: socket.socket) -> None:
        """Serve requests until DISC. Requests are parsed out of one receive buffer and the
        replies of a batch go out in one ``sendmsg`` when the buffer holds no further whole
        request (before blocking in ``recv``, and before a reply is held by backpressure):
        one or two syscalls per batch instead of three per request."""
        fd, size, ext = self._fd, self.size, self.extents
        rd = _Reader(sock)
        out: list[bytes] = []

        def reply(err: int, cookie: int) -> None:
            out.append(_REPLY.pack(SIMPLE_REPLY_MAGIC, err, cookie))

        def flush() -> None:
            if out:
                _sendmsg_all(sock, out)
                out.clear()

        while True:
            if not rd.has(_REQ.size):
                flush()
            magic, flags, cmd, cookie, offset, length = _REQ.unpack(rd.take(_REQ.size))
            if magic != REQUEST_MAGIC:
                raise _ProtocolViolation(f"request magic {magic:#x}")
            self.requests += 1
            if cmd == CMD_WRITE:
                if length > MAX_PAYLOAD:
                    raise _ProtocolViolation(f"WRITE of {length} bytes (max {MAX_PAYLOAD})")
                if not rd.has(length):
                    flush()
                data = rd.take(length)  # valid until the next take
                if offset + length > size:
                    reply(NBD_ENOSPC, cookie)
                    continue
                err = 0
                with ext.lock:
                    try:
                        os.pwrite(fd, data, offset)
                        ext.record(offset, data, self._read_block)
                    except OSError as e:
                        err = _errno_to_nbd(e)
                        log.warning("nbd.write_failed", image=str(self.image), offset=offset, length=length, error=str(e))
                if not err and flags & CMD_FLAG_FUA and self.sync_on_flush:
                    os.fdatasync(fd)
                if ext.over_cap():
                    flush()
                    ext.wait_under_cap()
                reply(err, cookie)
            elif cmd == CMD_READ:
                if length > MAX_PAYLOAD:
                    raise _ProtocolViolation(f"READ of {length} bytes (max {MAX_PAYLOAD})")
                if offset + length > size:
                    reply(NBD_EINVAL, cookie)
                    continue
                try:
                    data = os.pread(fd, length, offset)
                except OSError as e:
                    log.warning("nbd.read_failed", image=str(self.image), offset=offset, length=length, error=str(e))
                    reply(_errno_to_nbd(e), cookie)
                    continue
                if len(data) < length:  # the image shrank under us
                    data += bytes(length - len(data))
                reply(0, cookie)
                out.append(data)
            elif cmd == CMD_FLUSH:
                err = 0
                if self.sync_on_flush:
                    try:
                        os.fdatasync(fd)
                    except OSError as e:
                        err = _errno_to_nbd(e)
                reply(err, cookie)
            elif cmd == CMD_WRITE_ZEROES or cmd == CMD_TRIM:
                # TRIM is a zeroing too: the replica must hold the same bytes as this image
                if offset + length > size:
                    reply(NBD_ENOSPC if cmd == CMD_WRITE_ZEROES else NBD_EINVAL, cookie)
                    continue
                keep = cmd == CMD_WRITE_ZEROES and bool(flags & CMD_FLAG_NO_HOLE)  # zeros must stay allocated
                err = 0
                with ext.lock:
                    try:
                        zeroing.zero(fd, offset, length, keep_allocated=keep)
                        ext.record_zeroes(offset, length, self._read_block)
                    except OSError as e:
                        err = _errno_to_nbd(e)
                        log.warning("nbd.zero_failed", image=str(self.image), offset=offset, length=length,
                                    command="trim" if cmd == CMD_TRIM else "write_zeroes", error=str(e))
                if not err and flags & CMD_FLAG_FUA and self.sync_on_flush:
                    os.fdatasync(fd)
                if ext.over_cap():
                    flush()
                    ext.wait_under_cap()
                reply(err, cookie)
            elif cmd == CMD_DISC:
                flush()
                return
            else:  # CACHE/BLOCK_STATUS are not advertised; anything else is unknown
                log.warning("nbd.unsupported_command", command=cmd, socket=str(self.socket_path))
                reply(NBD_EINVAL, cookie)


def _sendmsg_all(sock: socket.socket, parts: list[bytes]) -> None:
    sent = sock.sendmsg(parts)
    total = sum(len(p) for p in parts)
    if sent < total:  # a short write (a full socket buffer): send the rest plainly
        rest = b"".join(parts)[sent:]
        sock.sendall(rest)


class _Reader:
    """A receive buffer for the transmission phase: ``take(n)`` returns the next n bytes as
    a view that stays valid until the next ``take``."""

    def __init__(self, sock: socket.socket, capacity: int = 1 << 20):
        self.sock = sock
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self._big: memoryview | None = None

    def has(self, n: int) -> bool:
        return self.end - self.start >= n

    def take(self, n: int) -> memoryview:
        if self.end - self.start < n:
            self._fill(n)
        if n > len(self.buf):  # _fill left a big payload in its own buffer
            big, self._big = self._big, None
            return big
        v = self.view[self.start:self.start + n]
        self.start += n
        return v

    def _fill(self, n: int) -> None:
        have = self.end - self.start
        if n > len(self.buf):  # a payload larger than the buffer: assemble it apart
            big = bytearray(n)
            big[:have] = self.view[self.start:self.end]
            self.start = self.end = 0
            self._big = memoryview(big)
            got = have
            while got < n:
                k = self.sock.recv_into(self._big[got:], n - got)
                if k == 0:
                    raise _ConnectionClosed()
                got += k
            return
        if self.start:
            self.buf[:have] = self.view[self.start:self.end]
            self.start, self.end = 0, have
        while self.end - self.start < n:
            k = self.sock.recv_into(self.view[self.end:], len(self.buf) - self.end)
            if k == 0:
                raise _ConnectionClosed()
            self.end += k
