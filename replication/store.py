"""Standby side: the replica (a RAM image plus the device state of the last committed
epoch), applied whole or not at all — also when the disk fills up or fails mid-way.

Files in the replica directory (all 0600):

- ``ram.img``       guest RAM as of the committed epoch (a hot-standby QEMU maps it);
                    preallocated, so writing it through the shared mapping never needs space
- ``device.state``  the QEMU device state of the committed epoch
- ``replica.json``  {committed_epoch, valid, compat, run_id, seeded, problem}
- ``journal``, ``journal.1``  redo log: the open transaction, and with group commit every
                    transaction since the epoch replica.json says (two files, see below)

and, when the guest has a disk, the replica disk: a raw file given by the caller (`disk`),
of the guest disk's size, written only through the journal (or by an initial sync).

A transaction is what moves the replica from epoch N-1 to N: the resync blocks that
arrived since N-1 (if any: RAM blocks, disk blocks), epoch N's zeroed disk ranges (first block,
number of blocks), epoch N's disk blocks (whole 4 KiB contents; after the ranges: a block the
guest wrote after a zeroing is among them) and epoch N's pages (already decoded to full contents) and device state, closed
by a commit record. Each record carries a CRC-32 of its header and body (`GMJ2`; records of
the earlier `GMJR` format, with a blake2b-256, are still read: a journal left by an older
version replays). The checksum only has to catch a torn or half-written tail, as a database's
WAL CRC does; blake2b-256 cost ~2 ms per MB of pages here on the path to the ACK, CRC-32 ~0.3.

What "committed" means on disk, in the order of the writes:

1. journal append (every byte: a short write is continued) and fsync (`journal`). From here
   the journal holds a complete transaction: epoch N is *durable* — whatever happens next,
   the replica comes out at N, by redo (full page contents, never deltas; zeroing a range
   twice is zeroing it once: idempotent). The
   standby acknowledges N here (docs/replication.md, "What the ACK means").
2. disk ranges zeroed (kept allocated: `zeroing.zero`), disk blocks written (``pwrite``), RAM
   apply and its write-back (fdatasync), the disk fsynced, ``device.state``
   replaced, ``replica.json`` replaced with N (`apply_journalled`): epoch N (RAM and disk) is
   *applied*, `committed_epoch` says N. Nothing reads the replica between 1 and 2 (the
   standby holds its lock across both; `journal` and `settle` apply a pending transaction first).
3. journal truncated, not fsynced (a failure or a lost truncation is harmless: a transaction at
   or below the committed epoch is never replayed; the next transaction first empties the
   journal, and its fsync makes the new length durable).

Failure rules (a full disk, an I/O error, a crash):

- before 1 completes: ``ram.img`` was not touched; the journal is emptied again and the
  replica stays valid at N-1.
- after 1: the transaction is replayed at once from the journal; if that fails too, the
  replica is marked invalid in memory (with a sentence why; `resume` refuses it) and the
  journal is kept, so `settle` (the next session) or `open` replays it when the disk
  works again. A replica whose replay keeps failing is a resync base (``seeded``): its
  block hashes describe what is really in ``ram.img``, so the next sync is a resync,
  never a trusted epoch.
- anything that writes ``ram.img`` outside the journal (initial sync, seeding, another
  guest run) first records ``valid: false`` and then empties the journal, so an old
  transaction is never replayed onto it.
- no ``replica.json`` means a fresh replica: a journal without it is discarded.

So after a crash or a failed write at any point the replica is exactly N-1 or exactly
N (or says it is invalid and why), and `open` says which (`OpenReport.recovered`).

Group commit (``writeback_ms`` > 0, only once replica.json says a valid epoch): step 2 is done
in memory (RAM through the mapping, disk blocks into the page cache, the device state kept) and
step 3 is skipped; `committed_epoch` says N while replica.json says an older M, and the journal
files hold every transaction after M. A write-back (a thread, at most every ``writeback_ms``)
switches new transactions to the other journal file, writes ram.img and the disk back, replaces
device.state and replica.json with its epoch, then empties the old file: a file is emptied only
when all it holds is at or below what replica.json says. ram.img may hold pages of any durable
epoch (never of a later one), so replaying every transaction after M from both files in epoch
order gives the newest durable epoch after a crash at any point. Anything else that writes the
files (`settle`, `bind`, `seed`, `mark_diverged`, an initial sync, `close`, `flush`) first waits
for the write-back; a failed write-back leaves the transaction pending (replayed by `settle`).

Initial sync is different: there is no valid replica yet, so blocks go straight into
``ram.img`` (and disk chunks into the replica disk) and the replica becomes valid at the
first committed epoch.
"""

from __future__ import annotations

import errno as errno_mod
import hashlib
import json
import mmap
import os
import stat as stat_mod
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from gmbase.errors import GeomirrorError
from gmbase.files import atomic_write
from replication import disksync, zeroing

log = structlog.get_logger(__name__)

PAGE_SIZE = 4096
_REC = struct.Struct(">4sBQIIQ")  # magic, kind, epoch, n_pages, dev_len, body_len
_MAGIC = b"GMJ2"  # records checksummed with CRC-32 (zlib), 4 bytes big-endian
_MAGIC_B2 = b"GMJR"  # the earlier records, checksummed with blake2b-256: read, never written
REC_BLOCK, REC_COMMIT, REC_DISK, REC_ZERO = 1, 2, 3, 4  # REC_DISK: disk blocks (numbers + 4 KiB contents)
_ZERO_UNIT = 8  # REC_ZERO: first blocks, then a u64 block count per range
DISK_BLOCK = 4096
_SUM = 4
_SUM_B2 = 32
_SLACK = 3 * PAGE_SIZE  # a device.state and a replica.json temporary beside the old ones

_STEP_WHAT = {
    "ram-alloc": "allocating",
    "resync-append": "appending resync blocks to",
    "journal-append": "appending the checkpoint to",
    "journal-fsync": "syncing",
    "journal-read": "reading",
    "journal-reset": "emptying",
    "journal-truncate": "emptying",
    "ram-flush": "writing back",
    "disk-alloc": "allocating",
    "disk-write": "writing",
    "disk-zero": "zeroing a range of",
    "disk-fsync": "syncing",
    "device-state": "replacing",
    "meta": "replacing",
}


class ReplicaError(GeomirrorError):
    """The replica cannot take this checkpoint (wrong epoch, wrong size, not synced), or a file
    of it is unreadable; the message names the file and what to do."""


class ReplicaStorageError(ReplicaError):
    """A write to the replica's disk failed (full, I/O error): the replica takes no checkpoint
    until the same work succeeds again. Carries the step, file, errno and free bytes."""

    def __init__(self, message: str, *, step: str, path: Path, errno: int | None, free_bytes: int):
        super().__init__(message)
        self.step = step
        self.path = path
        self.errno = errno
        self.free_bytes = free_bytes

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT)


def free_bytes(path: Path) -> int:
    """Bytes this process can still write on `path`'s filesystem (root may use the reserve)."""
    st = os.statvfs(path)
    return st.f_frsize * (st.f_bfree if os.geteuid() == 0 else st.f_bavail)


class FileOps:
    """Every write the replica makes, named by its step: the seam through which tests inject a
    full disk, an I/O error or a short write at any one point. The real thing: plain os calls."""

    def writev(self, step: str, fd: int, parts: list) -> int:
        return os.writev(fd, parts)

    def fsync(self, step: str, fd: int) -> None:
        os.fsync(fd)

    def ftruncate(self, step: str, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    def msync(self, step: str, fd: int) -> None:
        # ram.img's dirty pages (written through the shared mapping) by an fsync of its fd: Linux
        # writes back a shared mapping's dirty pages on fsync as on msync, and os.fsync releases
        # the GIL, where mmap.flush() holds it through the msync (CPython 3.11), which froze every
        # thread of the standby (its event loop, its heartbeats) for the whole write-back. Data
        # only, as msync: ram.img is preallocated, its size never changes.
        os.fdatasync(fd)

    def replace(self, step: str, path: Path, data: bytes, fsync: bool) -> None:
        atomic_write(path, data, fsync=fsync)

    def fallocate(self, step: str, fd: int, length: int) -> None:
        os.posix_fallocate(fd, 0, length)

    def pwritev(self, step: str, fd: int, parts: list, offset: int) -> int:
        return os.pwritev(fd, parts, offset)

    def zero_range(self, step: str, fd: int, offset: int, length: int) -> None:
        zeroing.zero(fd, offset, length, keep_allocated=True)  # the replica disk stays preallocated

    def read(self, step: str, path: Path) -> bytes:
        return path.read_bytes()


# Test hook: GEOMIRROR_CRASH_AT=<point>[#N] makes the process SIGKILL itself there (the Nth time).
_CRASH_AT, _, _CRASH_NTH = os.environ.get("GEOMIRROR_CRASH_AT", "").partition("#")
_crash_hits = [0]


def _crash_point(name: str) -> None:
    if _CRASH_AT == name:
        _crash_hits[0] += 1
        if _crash_hits[0] >= int(_CRASH_NTH or 1):
            os.kill(os.getpid(), 9)


@dataclass(frozen=True)
class OpenReport:
    committed_epoch: int
    valid: bool
    recovered: str  # "clean", "replayed epoch N", "discarded torn epoch N", "replay of epoch N failed: ..."


def _meta_problem(meta) -> str | None:
    """What is wrong with a parsed replica.json (None: nothing). Missing keys take defaults."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__} where an object was expected"
    types = {"committed_epoch": int, "valid": bool, "compat": dict, "run_id": str, "seeded": bool,
             "problem": (str, type(None))}
    for key, t in types.items():
        if key in meta and (not isinstance(meta[key], t) or (t is int and isinstance(meta[key], bool))):
            return f"{key} is {meta[key]!r}"
    if meta.get("committed_epoch", 0) < 0:
        return f"committed_epoch is {meta['committed_epoch']}"
    return None


class Replica:
    def __init__(self, directory: Path, size: int, *, fsync: bool = True, page_size: int = PAGE_SIZE,
                 ops: FileOps | None = None, disk: Path | None = None, writeback_ms: float = 0.0):
        self.dir = Path(directory)
        # Group commit (0: off): an epoch is applied in memory after its journal fsync, and the
        # write-back that makes the files say so (ram.img, the disk, device.state, replica.json)
        # runs in a thread at most every `writeback_ms`, off the path of the next epoch; the
        # journal keeps every transaction since the last write-back (module docstring).
        self.writeback_ms = writeback_ms
        # The replica of the guest's disk (None: the guest has no disk); its size is the file's.
        self.disk_path = Path(disk) if disk is not None else None
        self.disk_size = 0
        self._disk_fd: int | None = None
        self._staged_disk: list[tuple[np.ndarray, np.ndarray]] = []  # resync disk blocks of the open transaction
        self.size = size
        self.page_size = page_size
        self.n_pages = size // page_size
        self.fsync = fsync
        self._ops = ops or FileOps()
        self.committed_epoch = 0
        self.valid = False
        self.compat: dict = {}
        self.run_id: str = ""
        self._staged: dict[int, np.ndarray] = {}  # page number -> row in _staged_rows
        self._staged_list: list[tuple[np.ndarray, np.ndarray]] = []
        # Two journal files: new transactions go to the active one; a write-back switches to the
        # other (empty) one, so it can empty the old one when done without touching newer records.
        self._jfds: list[int | None] = [None, None]
        self._jidx = 0  # the active journal file
        self._jlen = [0, 0]  # bytes of durable transactions in each file not yet written back
        self._jclean = [True, True]  # each file's length is known to be its _jlen
        self._meta_epoch = 0  # the epoch replica.json says (committed_epoch may be ahead: group commit)
        self._meta_valid = False
        self._wb: dict | None = None  # the write-back under way in its thread
        self._wb_thread: threading.Thread | None = None
        self._wb_last = float("-inf")  # when the last write-back began (time.monotonic)
        self.writebacks = 0  # write-backs done
        self.last_writeback_ms = 0.0
        self.max_writeback_ms = 0.0
        self._map: mmap.mmap | None = None
        self._ram_fd: int | None = None
        self.ram: np.ndarray | None = None
        self.syncing_initial = False
        # A seeded replica holds the RAM of a former run of this guest (a site rejoining after
        # a takeover): not resumable, but a base for a block-hash resync, so rejoining sends
        # only what changed since. `valid` stays False until the first committed epoch.
        self.seeded = False
        self._device_state: bytes | None = None  # the committed device state, cached
        # Failure bookkeeping (see the module docstring).
        self.problem: str | None = None  # why the replica is not usable, one sentence
        self.last_error: ReplicaStorageError | None = None  # the failure not yet overcome
        self._pending = False  # the journal holds a durable transaction not (fully) applied
        self._txn: list | None = None  # that transaction's records (journal → apply_journalled)
        self._txn_needed = 0  # free bytes it needs (for the report of a failed apply)
        self._txn_epoch = 0  # its epoch
        self._txn_bytes = 0  # journal bytes of the open transaction
        self._txn_defer = False  # the open transaction is applied in memory, written back later
        self._needed = 0  # free bytes the failed work needs (space check before the next session)

    @property
    def ram_path(self) -> Path:
        return self.dir / "ram.img"

    @property
    def device_state_path(self) -> Path:
        return self.dir / "device.state"

    @property
    def meta_path(self) -> Path:
        return self.dir / "replica.json"

    @property
    def journal_path(self) -> Path:
        """The active journal file (new transactions go there)."""
        return self._journal_paths[self._jidx]

    @property
    def _journal_paths(self) -> list[Path]:
        return [self.dir / "journal", self.dir / "journal.1"]

    @property
    def _journal_fd(self) -> int | None:
        return self._jfds[self._jidx]

    @property
    def _journal_clean(self) -> bool:
        """The active journal file holds exactly its transactions not yet written back."""
        return self._jclean[self._jidx]

    @_journal_clean.setter
    def _journal_clean(self, value: bool) -> None:
        self._jclean[self._jidx] = value

    @property
    def written_epoch(self) -> int:
        """The epoch the files (replica.json) say; the journal holds those after it."""
        return self._meta_epoch

    @property
    def unwritten(self) -> bool:
        """Epochs applied in memory (durable in the journal) that the files do not say yet."""
        return self.committed_epoch > self._meta_epoch or any(self._jlen)

    # ----------------------------------------------------------- errors
    def _io(self, step: str, path: Path, fn, *args):
        """One file operation; an OSError becomes a ReplicaStorageError naming step, file and space."""
        try:
            return fn(step, *args)
        except OSError as e:
            raise self._storage_error(step, path, e) from e

    def _storage_error(self, step: str, path: Path, e: OSError) -> ReplicaStorageError:
        try:
            free = free_bytes(self.dir)
        except OSError:
            free = -1
        name = errno_mod.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__
        what = _STEP_WHAT.get(step, step)
        todo = ("free space there; replication resumes by itself" if e.errno in (errno_mod.ENOSPC, errno_mod.EDQUOT)
                else "check that disk; replication retries at the next session")
        return ReplicaStorageError(
            f"{what} {path} failed with {name} ({e.strerror or e}), {free} bytes free on its filesystem: {todo}",
            step=step, path=path, errno=e.errno, free_bytes=free)

    def _report(self, err: ReplicaStorageError, needed: int) -> None:
        """Log a storage failure once per episode (not once per epoch); remember what it needs."""
        self._needed = needed
        if self.last_error is None:
            log.warning("replica.storage_failed", path=str(err.path), step=err.step,
                        error=os.strerror(err.errno) if err.errno else str(err), free_bytes=err.free_bytes,
                        needed_bytes=needed, committed_epoch=self.committed_epoch, valid=self.valid)
        else:
            log.debug("replica.storage_still_failing", path=str(err.path), step=err.step,
                      free_bytes=err.free_bytes)
        self.last_error = err

    def _recovered(self) -> None:
        if self.last_error is not None:
            log.info("replica.storage_recovered", committed_epoch=self.committed_epoch,
                     free_bytes=free_bytes(self.dir))
        self.last_error = None
        self.problem = None

    # ----------------------------------------------------------- open/close
    def open(self) -> OpenReport:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self._open_ram()
        if self.disk_path is not None:
            self._open_disk()
        meta = self._read_meta()
        self.committed_epoch = meta.get("committed_epoch", 0)
        self.valid = meta.get("valid", False)
        self.compat = meta.get("compat", {})
        self.run_id = meta.get("run_id", "")
        self.seeded = bool(meta.get("seeded", False))
        self.problem = meta.get("problem")
        self._meta_epoch, self._meta_valid = self.committed_epoch, self.valid
        for i, path in enumerate(self._journal_paths):
            try:
                self._jfds[i] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            except OSError as e:
                raise self._storage_error("journal-reset", path, e) from e
        self._jidx, self._jlen, self._jclean = 0, [0, 0], [False, False]
        try:
            recovered = self._recover(replay=bool(meta))
        except ReplicaStorageError as e:
            self._pending = True
            self._give_up(e, f"replaying the journal at open failed: {e}")
            recovered = f"replay failed: {e}"
        log.info("replica.open", dir=str(self.dir), committed_epoch=self.committed_epoch,
                 valid=self.valid, recovered=recovered)
        return OpenReport(self.committed_epoch, self.valid, recovered)

    def _open_ram(self) -> None:
        """Open ram.img, preallocated: a full filesystem fails here, by name, and never later as
        a SIGBUS on a write through the shared mapping."""
        path = self.ram_path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise self._storage_error("ram-alloc", path, e) from e
        try:
            st = os.fstat(fd)
            held = min(st.st_blocks * 512, self.size)
            try:
                if st.st_size != self.size:
                    os.ftruncate(fd, self.size)
                self._ops.fallocate("ram-alloc", fd, self.size)
            except OSError as e:
                try:
                    free = free_bytes(self.dir)
                except OSError:
                    free = -1
                raise ReplicaStorageError(
                    f"cannot allocate {path}: the guest's RAM needs {self.size} bytes there "
                    f"({self.size - held} more than the file holds) and its filesystem has {free} bytes free "
                    f"({e.strerror or e}); free space there or move the state directory",
                    step="ram-alloc", path=path, errno=e.errno, free_bytes=free) from e
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self._ram_fd = fd  # kept: ram.img is written back by fsync (FileOps.msync)
        self.ram = np.frombuffer(self._map, dtype=np.uint8).reshape(self.n_pages, self.page_size)

    def _open_disk(self) -> None:
        """Open the replica disk, preallocated (like ram.img: a full filesystem fails here, by
        name, not in the middle of an apply)."""
        path = self.disk_path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ReplicaError(f"the replica disk {path} does not exist; create it with the guest disk's size "
                               "(qemu-img create -f raw)") from None
        if not stat_mod.S_ISREG(st.st_mode):
            raise ReplicaError(f"the replica disk {path} is not a regular file")
        if st.st_size == 0 or st.st_size % DISK_BLOCK:
            raise ReplicaError(f"the replica disk {path} is {st.st_size} bytes, not a positive multiple of "
                               f"{DISK_BLOCK}; resize it to the guest disk's size (qemu-img resize -f raw)")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise self._storage_error("disk-alloc", path, e) from e
        try:
            self._ops.fallocate("disk-alloc", fd, st.st_size)
        except OSError as e:
            os.close(fd)
            raise self._storage_error("disk-alloc", path, e) from e
        self._disk_fd = fd
        self.disk_size = st.st_size

    def close(self) -> None:
        self._join_writeback()
        if self._map is not None and not self._pending and self.unwritten:
            try:
                self._write_back_now()
            except ReplicaStorageError as e:  # the journal still has it: the next open replays it
                log.warning("replica.write_back_at_close_failed", dir=str(self.dir), error=str(e))
        if self._disk_fd is not None:
            os.close(self._disk_fd)
            self._disk_fd = None
        for i, fd in enumerate(self._jfds):
            if fd is not None:
                os.close(fd)
                self._jfds[i] = None
        self.ram = None
        if self._map is not None:
            try:
                os.fdatasync(self._ram_fd)
                self._map.close()
            except (BufferError, OSError):
                pass
            self._map = None
        if self._ram_fd is not None:
            os.close(self._ram_fd)
            self._ram_fd = None

    def _read_meta(self) -> dict:
        path = self.meta_path
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            meta = json.loads(text)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            what = f"it is not JSON ({e})"
        else:
            what = _meta_problem(meta)
            if what is None:
                return meta
        raise ReplicaError(f"the replica record {path} is corrupt: {what}; remove it (the next session then "
                           "does a full sync) or restore it from a backup")

    def _write_meta(self, **changes) -> None:
        """Replace replica.json with the current fields overridden by `changes`; the fields change
        in memory only once the file is durable."""
        meta = {"committed_epoch": self.committed_epoch, "valid": self.valid, "compat": self.compat,
                "run_id": self.run_id, "seeded": self.seeded, "problem": self.problem}
        meta.update(changes)
        self._io("meta", self.meta_path, self._ops.replace, self.meta_path, json.dumps(meta).encode(), self.fsync)
        for k, v in changes.items():
            setattr(self, k, v)
        self._meta_epoch, self._meta_valid = meta["committed_epoch"], meta["valid"]

    def bind(self, compat: dict, run_id: str) -> None:
        """The replica is of one guest run. Another run (a freshly booted guest) or another
        guest configuration invalidates it: it is not that guest."""
        self._join_writeback()
        if compat != self.compat or run_id != self.run_id:
            if self.valid:
                log.warning("replica.discarded", reason="the primary runs another guest",
                            old_run=self.run_id, new_run=run_id, committed_epoch=self.committed_epoch,
                            compat_changed=compat != self.compat)
            if self.seeded:
                log.warning("replica.seed_discarded", reason="the primary runs another guest",
                            old_run=self.run_id, new_run=run_id)
            self._void_journal()
            self._write_meta(compat=compat, run_id=run_id, valid=False, seeded=False, committed_epoch=0,
                             problem=None)

    @property
    def resync_base(self) -> bool:
        """Worth offering block hashes: a valid replica, or one seeded from a former run."""
        return self.valid or self.seeded

    def seed(self, ram_file: Path, compat: dict, run_id: str, progress=None) -> int:
        """Fill ram.img from `ram_file` (this site's RAM of the same guest run, e.g. from when
        it was the primary) and mark the replica seeded: not resumable, but the next sync is
        a resync that sends only the blocks that differ. Returns the bytes copied."""
        if os.path.getsize(ram_file) != self.size:
            raise ReplicaError(f"cannot seed from {ram_file}: {os.path.getsize(ram_file)} bytes, the guest has "
                               f"{self.size}")
        self._join_writeback()
        self._write_meta(valid=False, committed_epoch=0, seeded=False)  # not a base while the copy is under way
        self._void_journal()
        chunk = 8 << 20
        done = 0
        if os.path.samefile(ram_file, self.ram_path):  # the guest ran on this very file
            done = self.size
        with open(ram_file, "rb") as f:
            flat = self.ram.reshape(-1)
            while done < self.size:
                n = f.readinto(memoryview(flat[done:done + chunk]))
                if not n:
                    raise ReplicaError(f"{ram_file} ended after {done} bytes")
                done += n
                if progress:
                    progress(done)
        if self.fsync:
            self._io("ram-flush", self.ram_path, self._ops.msync, self._ram_fd)
        self._write_meta(compat=compat, run_id=run_id, seeded=True, problem=None)
        log.info("replica.seeded", source=str(ram_file), bytes=done, run_id=run_id)
        return done

    # ----------------------------------------------------------- journal
    @staticmethod
    def _record(kind: int, epoch: int, pages: np.ndarray, data: np.ndarray, dev: bytes) -> list[bytes]:
        p = np.ascontiguousarray(pages, dtype=">u8").tobytes()
        d = np.ascontiguousarray(data).tobytes()
        hdr = _REC.pack(_MAGIC, kind, epoch, len(pages), len(dev), len(p) + len(d) + len(dev))
        crc = 0
        for part in (hdr, p, d, dev):
            crc = zlib.crc32(part, crc)
        return [hdr, p, d, dev, crc.to_bytes(_SUM, "big")]

    def _append(self, step: str, parts: list[bytes]) -> None:
        """Append one record, every byte of it (short writes are continued). A transaction starts
        on an empty journal; a failed append aborts the transaction (RAM was not touched)."""
        if self._txn_bytes == 0:
            self._reap()
            if self._pending:
                self.settle()  # a journalled transaction first: emptying the journal would lose it
            # group commit only onto files that say a valid epoch (never onto an initial sync's
            # RAM, which only its first epoch's write-back makes durable)
            self._txn_defer = self.writeback_ms > 0 and self._meta_valid and not self.syncing_initial
            if not self._txn_defer and self.unwritten:
                self.flush()
            if not self._journal_clean:
                self._reset_journal()
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        try:
            while views:
                n = self._io(step, self.journal_path, self._ops.writev, self._journal_fd, views)
                if n <= 0:
                    raise self._storage_error(step, self.journal_path,
                                              OSError(errno_mod.EIO, "the write made no progress"))
                self._txn_bytes += n
                while n:
                    if n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    else:
                        views[0] = views[0][n:]
                        n = 0
            self._journal_clean = False
        except ReplicaStorageError as e:
            needed = self._txn_bytes + total + _SLACK
            self._abort_txn()
            self._report(e, needed)
            raise

    def _reset_journal(self, step: str = "journal-reset", sync: bool = True, idx: int | None = None) -> None:
        """Cut a journal file (the active one unless `idx`) back to its transactions not yet written
        back (empty when there are none), durably unless `sync` is False (raises
        ReplicaStorageError if it cannot)."""
        i = self._jidx if idx is None else idx
        path, fd = self._journal_paths[i], self._jfds[i]
        self._jclean[i] = False
        self._io(step, path, self._ops.ftruncate, fd, self._jlen[i])
        if self.fsync and sync:
            self._io(step, path, self._ops.fsync, fd)
        self._jclean[i] = True
        if i == self._jidx:
            self._txn_bytes = 0

    def _abort_txn(self) -> None:
        """Drop the open transaction: nothing of it reached ram.img. If the journal cannot be
        cut back now, the next transaction tries again before its first record."""
        self._staged.clear()
        self._staged_list.clear()
        self._staged_disk.clear()
        self._txn_bytes = 0
        try:
            self._reset_journal()
        except ReplicaStorageError as e:
            log.warning("replica.journal_reset_failed", path=str(self.journal_path), error=str(e))

    def _void_journal(self) -> None:
        """Before ram.img is written outside the journal: no old transaction may replay onto it.
        First `valid: false` (a crash now replays onto RAM not yet touched, which is right), then
        empty journal files."""
        self._join_writeback()
        self._staged.clear()
        self._staged_list.clear()
        self._staged_disk.clear()
        if all(self._jclean) and not self._pending and not self.unwritten:
            return
        if self._pending or self.unwritten:  # RAM may be a mix; the disk may still say valid
            self._write_meta(valid=False)
        _crash_point("void-after-meta")
        self._jlen = [0, 0]
        for i in (0, 1):
            self._reset_journal(idx=i)
        self._pending = False

    def _read_journal(self, path: Path) -> tuple[list[list[tuple[int, int, np.ndarray, np.ndarray, bytes]]], bool]:
        """Parse a journal file: (its complete transactions, each a list of records ending with the
        commit, whether a torn tail was dropped)."""
        try:
            buf = self._io("journal-read", path, self._ops.read, path)
        except ReplicaStorageError as e:
            if e.errno == errno_mod.ENOENT:
                return [], False
            raise
        txns, txn, off = [], [], 0
        while off + _REC.size <= len(buf):
            magic, kind, epoch, n, dev_len, body_len = _REC.unpack_from(buf, off)
            sl = _SUM if magic == _MAGIC else _SUM_B2 if magic == _MAGIC_B2 else 0
            end = off + _REC.size + body_len + sl
            unit = DISK_BLOCK if kind == REC_DISK else _ZERO_UNIT if kind == REC_ZERO else self.page_size
            if not sl or end > len(buf) or body_len != n * 8 + n * unit + dev_len:
                break
            body, want = memoryview(buf)[off:end - sl], bytes(buf[end - sl:end])
            got = (zlib.crc32(body).to_bytes(_SUM, "big") if magic == _MAGIC
                   else hashlib.blake2b(body, digest_size=_SUM_B2).digest())
            if got != want:
                break
            b = off + _REC.size
            pages = np.frombuffer(buf, dtype=">u8", count=n, offset=b).astype(np.int64)
            data = np.frombuffer(buf, dtype=np.uint8, count=n * unit, offset=b + n * 8)
            dev = bytes(buf[b + n * 8 + n * unit: b + body_len])
            if kind == REC_ZERO:
                counts = np.frombuffer(buf, dtype=">u8", count=n, offset=b + n * 8).astype(np.int64)
                txn.append((kind, epoch, pages, counts, dev))
            else:
                txn.append((kind, epoch, pages, data.reshape(n, unit), dev))
            if kind == REC_COMMIT:
                txns.append(txn)
                txn = []
            off = end
        return txns, bool(txn) or off != len(buf)

    def _recover(self, replay: bool = True) -> str:
        """Replay every complete transaction after the epoch replica.json says, from both journal
        files in epoch order, then empty them. Raises ReplicaStorageError if the replay fails (the
        journal is kept)."""
        txns, torn = [], False
        for path in self._journal_paths if replay else []:
            t, tn = self._read_journal(path)
            txns += t
            torn |= tn
        txns.sort(key=lambda t: t[-1][1])
        self.committed_epoch = self._meta_epoch  # what the files say; the journal holds the rest
        replayed = None
        for txn in txns:
            if txn[-1][1] > self.committed_epoch:
                self._apply(txn)
                replayed = txn[-1][1]
        self._pending = False
        self._txn = None
        if replayed is not None:
            self.problem = None
        self._truncate_after_commit()
        if replayed is not None:
            return f"replayed epoch {replayed}"
        if torn:
            return f"discarded torn epoch {self.committed_epoch + 1}"
        return "clean"

    def _truncate_after_commit(self) -> None:
        """The committed epoch is recorded: empty the journal files. A failure is logged, not raised
        (a transaction at or below the committed epoch never replays; the next one cuts back first).
        Not fsynced: a crash that loses the truncation leaves transactions at or below the
        committed epoch, which are never replayed, and the next transaction's fsync makes the file's
        new length durable with its records."""
        self._jlen = [0, 0]
        for i in (0, 1):
            try:
                self._reset_journal("journal-truncate", sync=False, idx=i)
            except ReplicaStorageError as e:
                log.warning("replica.journal_truncate_failed", path=str(self._journal_paths[i]), error=str(e),
                            committed_epoch=self.committed_epoch)

    def _give_up(self, err: ReplicaStorageError, why: str) -> None:
        """The journalled transaction could not be applied: RAM may be part N-1, part N. Not
        resumable; a resync base (its hashes are what ram.img holds). The journal is kept: a
        later `settle` or `open` that replays it brings the replica to N."""
        self._device_state = None
        self.problem = f"the replica in {self.dir} is not usable: {why}"
        self.valid = False
        self.seeded = True
        self._report(err, max(self._needed, _SLACK))
        try:
            self._write_meta()
        except ReplicaStorageError:
            pass  # the journal on disk still replays at the next open

    def settle(self) -> None:
        """Finish what a failed write left, and a group commit's write-back: replay a journalled
        transaction, empty the journal. Raises ReplicaStorageError if it still cannot (the replica
        then stays as it was)."""
        self._join_writeback()
        if not self._pending and self.unwritten:
            try:
                self._write_back_now()
            except ReplicaStorageError:
                pass  # now pending: replayed from the journal below
        if self._pending:
            try:
                self._recover()
            except ReplicaStorageError as e:
                self._give_up(e, f"replaying the journal failed: {e}")
                raise
        for i in (0, 1):
            if not self._jclean[i]:
                try:
                    self._reset_journal(idx=i)
                except ReplicaStorageError as e:
                    self._report(e, _SLACK)
                    raise

    # ----------------------------------------------------------- group commit
    def flush(self) -> None:
        """Make the files say the committed epoch: wait for a write-back under way, write back the
        rest (a pending transaction is replayed). Raises ReplicaStorageError if it cannot."""
        self._join_writeback()
        if self._pending:
            self.settle()
            return
        self._write_back_now()

    def _meta_now(self, epoch: int) -> dict:
        return {"committed_epoch": epoch, "valid": True, "compat": self.compat, "run_id": self.run_id,
                "seeded": self.seeded, "problem": None}

    def _write_files(self, epoch: int, dev: bytes, meta: dict, at: str = "wb-") -> None:
        """The write-back of epoch `epoch` (applied to RAM and the disk, durable in the journal):
        ram.img and the replica disk to disk, device.state, then replica.json says it. The one
        order of these writes, for an apply and a group commit's write-back alike (`at` prefixes
        the crash points of the latter)."""
        if self.fsync:
            self._io("ram-flush", self.ram_path, self._ops.msync, self._ram_fd)
        _crash_point(at + "after-ram")
        if self._disk_fd is not None and self.fsync:
            self._io("disk-fsync", self.disk_path, self._ops.fsync, self._disk_fd)
        _crash_point(at + "after-disk")
        self._io("device-state", self.device_state_path, self._ops.replace, self.device_state_path, dev, self.fsync)
        _crash_point(at + "after-device-state")
        self._io("meta", self.meta_path, self._ops.replace, self.meta_path, json.dumps(meta).encode(), self.fsync)
        _crash_point(at + "after-meta")

    def _write_back_now(self) -> None:
        """Write back every epoch applied in memory, here and now (no write-back thread runs)."""
        if self._pending or not self.unwritten:
            return
        epoch = self.committed_epoch
        try:
            self._write_files(epoch, self.device_state(), self._meta_now(epoch))
        except ReplicaStorageError as e:
            self._report(e, _SLACK)
            self._pending, self._txn = True, None  # `settle` replays the journal from replica.json's epoch
            raise
        self._meta_epoch, self._meta_valid = epoch, True
        self._truncate_after_commit()

    def _maybe_write_back(self) -> None:
        """After an epoch applied in memory: begin a write-back in a thread when the last one began
        `writeback_ms` ago and is done. New transactions go to the other journal file from here,
        so the write-back can empty this one when replica.json says its epoch."""
        self._reap()
        if self._wb_thread is not None or not self.unwritten:
            return
        now = time.monotonic()
        if now - self._wb_last < self.writeback_ms / 1000:
            return
        other = 1 - self._jidx
        if self._jlen[other]:
            return  # cannot happen (a failed write-back leaves the replica pending); never lose them
        if not self._jclean[other]:
            try:
                self._reset_journal(idx=other)
            except ReplicaStorageError as e:
                log.warning("replica.journal_reset_failed", path=str(self._journal_paths[other]), error=str(e))
                return
        epoch = self.committed_epoch
        self._wb_last = now
        self._wb = {"epoch": epoch, "old": self._jidx, "error": None, "truncated": False, "ms": 0.0}
        dev, meta = self.device_state(), self._meta_now(epoch)
        self._jidx = other
        self._wb_thread = threading.Thread(target=self._write_back, args=(self._wb, dev, meta),
                                           name="replica-write-back", daemon=True)
        self._wb_thread.start()

    def _write_back(self, job: dict, dev: bytes, meta: dict) -> None:
        """In the write-back thread: touches the files and the old journal file only (the other
        thread goes on appending to the active one and writing RAM and the disk)."""
        t0 = time.perf_counter()
        try:
            self._write_files(job["epoch"], dev, meta)
            old = job["old"]
            try:
                self._io("journal-truncate", self._journal_paths[old], self._ops.ftruncate, self._jfds[old], 0)
                job["truncated"] = True
            except ReplicaStorageError as e:  # harmless: nothing at or below replica.json's epoch replays
                log.warning("replica.journal_truncate_failed", path=str(e.path), error=str(e))
        except Exception as e:  # noqa: BLE001 - reported by the owning thread (_reap)
            job["error"] = e
        job["ms"] = (time.perf_counter() - t0) * 1000

    def _reap(self) -> None:
        """Take up a finished write-back: replica.json now says its epoch, its journal file is
        empty; or it failed: the replica is pending, and `settle` replays the journal files."""
        t = self._wb_thread
        if t is None or t.is_alive():
            return
        t.join()
        job, self._wb_thread, self._wb = self._wb, None, None
        self.last_writeback_ms = job["ms"]
        self.max_writeback_ms = max(self.max_writeback_ms, job["ms"])
        e = job["error"]
        if e is not None:
            if not isinstance(e, ReplicaStorageError):
                raise e
            self._report(e, _SLACK)
            self._pending, self._txn = True, None
            return
        self.writebacks += 1
        self._meta_epoch, self._meta_valid = job["epoch"], True
        self._jlen[job["old"]] = 0
        self._jclean[job["old"]] = job["truncated"]

    def _join_writeback(self) -> None:
        """Wait for a write-back under way and take it up (any other writer of the files first)."""
        if self._wb_thread is not None:
            self._wb_thread.join()
            self._reap()

    def ready(self) -> None:
        """Before a session: `settle`, and if the last failure was a full disk, check that the
        space it needed is back (so a full disk costs no resync per reconnect). Raises
        ReplicaStorageError with the sentence to give the primary."""
        try:
            self.settle()
        except ReplicaStorageError as e:
            if e.disk_full:
                raise
            # Another failure: the replica is marked invalid (a resync base, see `_give_up`); the
            # sync that follows empties the journal or fails again, by name.
        err = self.last_error
        if err is not None and err.disk_full:
            free = free_bytes(self.dir)
            if free < self._needed:
                raise ReplicaStorageError(
                    f"{self.dir} is still full: {free} bytes free, the last checkpoint needed {self._needed} "
                    f"({err}); free space there, replication resumes by itself",
                    step=err.step, path=err.path, errno=err.errno, free_bytes=free)

    # ----------------------------------------------------------- apply
    def begin_initial_sync(self) -> None:
        """The standby has nothing usable: blocks go straight into ram.img."""
        self._join_writeback()
        self._write_meta(valid=False, committed_epoch=0)
        self._void_journal()
        self.syncing_initial = True

    def begin_resync(self) -> None:
        """The replica stays valid at its epoch; resync blocks are staged with the next epoch."""
        self.syncing_initial = not self.valid
        self._staged.clear()
        self._staged_list.clear()
        self._staged_disk.clear()
        if self.syncing_initial:
            self.begin_initial_sync()
        else:
            self.settle()

    def write_block(self, first_page: int, pages: np.ndarray) -> None:
        """A block of full pages from an initial sync or a resync."""
        n = pages.shape[0]
        if first_page < 0 or first_page + n > self.n_pages:
            raise ReplicaError(f"sync block pages {first_page}..{first_page + n} outside the guest's "
                               f"{self.n_pages} pages")
        if self.syncing_initial:
            self.ram[first_page:first_page + n] = pages
            return
        numbers = np.arange(first_page, first_page + n, dtype=np.int64)
        data = np.array(pages, copy=True)
        self._append("resync-append", self._record(REC_BLOCK, self.committed_epoch, numbers, data, b""))
        self._staged_list.append((numbers, data))
        for i, p in enumerate(numbers):
            self._staged[int(p)] = data[i]

    def _check_disk_blocks(self, blocks: np.ndarray, what: str) -> None:
        if self._disk_fd is None:
            raise ReplicaError(f"{what} carries {blocks.size} disk blocks, but this replica has no disk")
        if blocks.size and int(blocks.max()) >= self.disk_size // DISK_BLOCK:
            raise ReplicaError(f"{what}: disk block {int(blocks.max())} is outside the replica disk "
                               f"{self.disk_path} of {self.disk_size // DISK_BLOCK} blocks")

    def _check_disk_ranges(self, ranges: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
        """(first blocks, block counts) of zero ranges that lie inside the replica disk."""
        if self._disk_fd is None:
            raise ReplicaError(f"{what} carries {len(ranges)} zeroed disk ranges, but this replica has no disk")
        first, count = ranges[:, 0].astype(np.int64), ranges[:, 1].astype(np.int64)
        nblocks = self.disk_size // DISK_BLOCK
        if np.any(count <= 0) or np.any(first < 0) or np.any(first > nblocks - count):
            i = int(np.flatnonzero((count <= 0) | (first < 0) | (first > nblocks - count))[0])
            raise ReplicaError(f"{what}: zeroed disk blocks {int(first[i])}..{int(first[i]) + int(count[i]) - 1} "
                               f"are not inside the replica disk {self.disk_path} of {nblocks} blocks")
        return first, count

    def write_disk_blocks(self, blocks: np.ndarray, data: np.ndarray) -> None:
        """Disk blocks (whole contents) from an initial sync or a resync: straight into the replica
        disk during an initial sync, else journalled and staged with the next epoch."""
        blocks = blocks.astype(np.int64)
        self._check_disk_blocks(blocks, "a sync frame")
        if self.syncing_initial:
            self._write_disk(blocks, data)
            return
        data = np.array(data, copy=True)
        self._append("resync-append", self._record(REC_DISK, self.committed_epoch, blocks, data, b""))
        self._staged_disk.append((blocks, data))

    def _write_disk(self, blocks: np.ndarray, data: np.ndarray) -> None:
        """pwrite each run of consecutive blocks in one call (every byte: a short write goes on)."""
        if not blocks.size:
            return
        breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, blocks.size]):
            lo, hi = int(lo), int(hi)
            view = memoryview(np.ascontiguousarray(data[lo:hi])).cast("B")
            off, done = int(blocks[lo]) * DISK_BLOCK, 0
            while done < len(view):
                n = self._io("disk-write", self.disk_path, self._ops.pwritev, self._disk_fd, [view[done:]],
                             off + done)
                if n <= 0:
                    raise self._storage_error("disk-write", self.disk_path,
                                              OSError(errno_mod.EIO, "the write made no progress"))
                done += n

    def _zero_disk(self, first: np.ndarray, count: np.ndarray) -> None:
        """Zero each range (idempotent); the replica disk stays allocated there."""
        for f, n in zip(first.tolist(), count.tolist()):
            self._io("disk-zero", self.disk_path, self._ops.zero_range, self._disk_fd, f * DISK_BLOCK, n * DISK_BLOCK)

    def disk_hashes(self) -> list[bytes]:
        """blake2b-128 per 64 KiB of the replica disk (holes not read): O(disk data), off the loop."""
        if self._disk_fd is None:
            return []
        return disksync.chunk_hashes(self._disk_fd, self.disk_size)

    def old_pages(self, page_numbers: np.ndarray) -> np.ndarray:
        """The standby's current version of these pages (staged resync content wins)."""
        idx = page_numbers.astype(np.intp)
        if idx.size and (idx.max() >= self.n_pages):
            raise ReplicaError(f"page {int(idx.max())} is outside the guest's {self.n_pages} pages")
        old = self.ram[idx]
        if self._staged:
            for i, p in enumerate(idx):
                s = self._staged.get(int(p))
                if s is not None:
                    old[i] = s
        return old

    def commit(self, epoch: int, page_numbers: np.ndarray, new_pages: np.ndarray, device_state: bytes,
               disk_blocks: np.ndarray | None = None, disk_data: np.ndarray | None = None,
               disk_zeroes: np.ndarray | None = None) -> None:
        """Make epoch `epoch` the replica: journal it, fsync, apply, record (`journal`, then
        `apply_journalled`). Whole or nothing; raises ReplicaStorageError when the disk fails (see
        the module docstring for the state it leaves). `disk_blocks`/`disk_data`: the guest disk's
        blocks written in the epoch (whole contents); `disk_zeroes` ((k, 2): first block, number of
        blocks): the ranges it zeroed, applied before the blocks. Both journalled before the commit
        record and applied with the RAM."""
        self.journal(epoch, page_numbers, new_pages, device_state, disk_blocks, disk_data, disk_zeroes)
        self.apply_journalled()

    def journal(self, epoch: int, page_numbers: np.ndarray, new_pages: np.ndarray, device_state: bytes,
                disk_blocks: np.ndarray | None = None, disk_data: np.ndarray | None = None,
                disk_zeroes: np.ndarray | None = None) -> None:
        """Step 1 of `commit`: append epoch `epoch`'s transaction to the journal and fsync it. When
        this returns, the epoch is durable (`durable_epoch`): the replica comes out at it, by
        `apply_journalled` now or by a replay after a crash. Nothing else may touch the replica
        until `apply_journalled` (a transaction begun meanwhile applies this one first)."""
        if self._pending:
            self.settle()  # the previous transaction first (from the journal): epochs never overtake
        if epoch <= self.committed_epoch:
            raise ReplicaError(f"epoch {epoch} is not after the committed epoch {self.committed_epoch} "
                               "(a replayed or stale checkpoint)")
        if not device_state:
            raise ReplicaError(f"epoch {epoch} carries no device state")
        pages = page_numbers.astype(np.int64)
        disk = zero = None
        if disk_zeroes is not None and len(disk_zeroes):
            zero = self._check_disk_ranges(np.asarray(disk_zeroes).reshape(-1, 2), f"the checkpoint of epoch {epoch}")
        if disk_blocks is not None and disk_blocks.size:
            disk = (disk_blocks.astype(np.int64), disk_data)
            self._check_disk_blocks(disk[0], f"the checkpoint of epoch {epoch}")
            if disk_data is None or disk_data.shape != (disk_blocks.size, DISK_BLOCK):
                raise ReplicaError(f"the checkpoint of epoch {epoch}: disk contents do not match its block list")
        if zero is not None:  # before the blocks: a block written after a zeroing overrides it
            self._append("journal-append", self._record(REC_ZERO, epoch, zero[0], zero[1].astype(">u8"), b""))
        if disk is not None:
            self._append("journal-append", self._record(REC_DISK, epoch, disk[0], disk_data, b""))
        self._append("journal-append", self._record(REC_COMMIT, epoch, pages, new_pages, device_state))
        _crash_point("before-journal-sync")
        if self.fsync:
            try:
                self._io("journal-fsync", self.journal_path, self._ops.fsync, self._journal_fd)
            except ReplicaStorageError as e:
                # After a failed fsync the journal's pages may be lost or not: it is not durable.
                needed = self._txn_bytes + _SLACK
                self._abort_txn()
                self._report(e, needed)
                raise
        _crash_point("after-journal")
        # Durable: from here the replica comes out at `epoch`, now or by a later replay.
        self._pending = True
        self._txn_needed = self._txn_bytes + _SLACK
        txn = [(REC_BLOCK, self.committed_epoch, n, d, b"") for n, d in self._staged_list]
        txn += [(REC_DISK, self.committed_epoch, n, d, b"") for n, d in self._staged_disk]
        if zero is not None:
            txn.append((REC_ZERO, epoch, zero[0], zero[1], b""))
        if disk is not None:
            txn.append((REC_DISK, epoch, disk[0], disk[1], b""))
        txn.append((REC_COMMIT, epoch, pages, new_pages, device_state))
        self._txn, self._txn_epoch = txn, epoch
        self._staged.clear()
        self._staged_list.clear()
        self._staged_disk.clear()
        self._jlen[self._jidx] += self._txn_bytes
        self._txn_bytes = 0
        self.syncing_initial = False

    @property
    def durable_epoch(self) -> int:
        """The newest epoch the replica comes out at whatever happens next: the journalled one
        not yet applied, else the committed one."""
        if self._pending:  # cleared only once the apply recorded `committed_epoch`
            return max(self._txn_epoch, self.committed_epoch)
        return self.committed_epoch

    @property
    def pending(self) -> bool:
        """The journal holds a durable transaction not (fully) applied yet."""
        return self._pending

    def range_after(self, offset: int, length: int) -> np.ndarray:
        """Bytes offset..offset+length of RAM as they will be once the journalled transaction is
        applied (a copy; RAM as it is when none is): the replica check of an epoch, before its apply."""
        flat = self.ram.reshape(-1)
        out = np.array(flat[offset:offset + length], copy=True)
        ps, end = self.page_size, offset + length
        for kind, _epoch, pages, data, _dev in (self._txn or []) if self._pending else []:
            if kind in (REC_DISK, REC_ZERO) or not pages.size:
                continue
            pages = pages.astype(np.int64)
            inside = np.flatnonzero((pages * ps < end) & ((pages + 1) * ps > offset))
            for i in inside:
                lo = int(pages[i]) * ps
                a, b = max(lo, offset), min(lo + ps, end)
                out[a - offset:b - offset] = data[i].reshape(-1)[a - lo:b - lo]
        return out

    def apply_journalled(self) -> None:
        """Step 2 of `commit`: apply the journalled transaction to ram.img, the replica disk,
        device.state and replica.json, so `committed_epoch` is the durable epoch; then empty the
        journal. On a storage failure it replays from the journal; if that fails too the replica
        is marked invalid (the journal kept for a later replay) and ReplicaStorageError raised."""
        txn, self._txn = self._txn, None
        if not self._pending:
            return
        if txn is None:  # the transaction is only in the journal (a failure came between): replay it
            self.settle()
            self._recovered()
            return
        needed = self._txn_needed
        try:
            self._apply(txn, in_memory=self._txn_defer)
        except ReplicaStorageError as e:
            self._device_state = None
            self._report(e, needed)
            try:
                self.settle()  # replay from the journal now; marks the replica invalid if it fails again
            except ReplicaStorageError as again:
                raise e from again  # the first failure says best what went wrong
            log.info("replica.replayed_after_failure", committed_epoch=self.committed_epoch)
            self._recovered()
            return
        self._pending = False
        self._recovered()
        if self._txn_defer:
            self._maybe_write_back()
        else:
            self._truncate_after_commit()

    def _apply(self, txn, in_memory: bool = False) -> None:
        """Redo a complete transaction (idempotent). `in_memory`: RAM and the replica disk written
        (the page cache), the device state kept in memory, the files left for a write-back."""
        for kind, epoch, pages, data, dev in txn:
            if kind in (REC_DISK, REC_ZERO) and self._disk_fd is None:
                raise ReplicaError(f"the journal {self.journal_path} holds disk blocks of epoch {epoch}, but no "
                                   "replica disk is configured; configure the guest's disk again")
            if kind == REC_ZERO:  # data: the block count of each range
                half = pages.size // 2
                self._zero_disk(pages[:half], data[:half])
                _crash_point("mid-zero")
                self._zero_disk(pages[half:], data[half:])
                continue
            if kind == REC_DISK:
                half = pages.size // 2
                self._write_disk(pages[:half], data[:half])
                _crash_point("mid-disk")
                self._write_disk(pages[half:], data[half:])
                continue
            if pages.size:
                half = pages.size // 2
                self.ram[pages[:half].astype(np.intp)] = data[:half]
                _crash_point("mid-ram")
                self.ram[pages[half:].astype(np.intp)] = data[half:]
            if kind == REC_COMMIT and in_memory:
                self._device_state = bytes(dev)
                self.committed_epoch, self.valid, self.problem = epoch, True, None
                _crash_point("after-apply-in-memory")
            elif kind == REC_COMMIT:
                self._write_files(epoch, bytes(dev), self._meta_now(epoch), at="")
                self._device_state = bytes(dev)
                self.committed_epoch, self.valid, self.problem = epoch, True, None
                self._meta_epoch, self._meta_valid = epoch, True

    def mark_diverged(self, why: str) -> None:
        """The committed epoch was found to differ from the primary's RAM (a replica check):
        not resumable any more, but a resync base (its block hashes say what ram.img holds, so
        the resync sends the blocks that differ). Recorded on disk: a restart keeps it. The
        journal is emptied: nothing replays onto a replica that is only a resync base."""
        self._join_writeback()
        self._write_meta(valid=False, seeded=True, problem=f"the replica in {self.dir} is not usable: {why}")
        self._pending, self._txn = False, None
        self._truncate_after_commit()
        log.warning("replica.untrusted", dir=str(self.dir), committed_epoch=self.committed_epoch, problem=why)

    def device_state(self) -> bytes:
        if self._device_state is None:
            self._device_state = self.device_state_path.read_bytes()
        return self._device_state

    def block_hashes(self, block_pages: int) -> list[bytes]:
        """blake2b-128 of each block of ram.img: O(RAM), call it off the event loop."""
        flat = self.ram.reshape(-1)
        bs = block_pages * self.page_size
        return [hashlib.blake2b(memoryview(flat[o:o + bs]), digest_size=16).digest()
                for o in range(0, flat.size, bs)]
