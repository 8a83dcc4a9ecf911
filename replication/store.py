"""Standby side: the replica (a RAM image plus the device state of the last committed
epoch), applied whole or not at all.

Files in the replica directory (all 0600):

- ``ram.img``       guest RAM as of the committed epoch (a hot-standby QEMU maps it)
- ``device.state``  the QEMU device state of the committed epoch
- ``replica.json``  {committed_epoch, valid, compat}
- ``journal``       redo log of the open transaction

A transaction is what moves the replica from epoch N-1 to N: the resync blocks that
arrived since N-1 (if any) and epoch N's pages (already decoded to full contents)
and device state, closed by a commit record. Each record carries a blake2b checksum.
The journal is fsynced before anything touches ``ram.img``; on open, a complete
transaction is replayed (redo is idempotent: full page contents, never deltas) and a
torn one is discarded. So after a crash at any point the replica is exactly N-1 or
exactly N, and `open` says which.

Initial sync is different: there is no valid replica yet, so blocks go straight into
``ram.img`` and the replica becomes valid at the first committed epoch.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog

from gmbase.errors import GeomirrorError
from gmbase.files import atomic_write, fsync_dir

log = structlog.get_logger(__name__)

PAGE_SIZE = 4096
_REC = struct.Struct(">4sBQIIQ")  # magic, kind, epoch, n_pages, dev_len, body_len
_MAGIC = b"GMJR"
REC_BLOCK, REC_COMMIT = 1, 2
_SUM = 32


class ReplicaError(GeomirrorError):
    """The replica cannot take this checkpoint (wrong epoch, wrong size, not synced)."""


# Test hook: GEOMIRROR_CRASH_AT=<point> makes the process SIGKILL itself there.
_CRASH_AT = os.environ.get("GEOMIRROR_CRASH_AT", "")


def _crash_point(name: str) -> None:
    if _CRASH_AT == name:
        os.kill(os.getpid(), 9)


@dataclass(frozen=True)
class OpenReport:
    committed_epoch: int
    valid: bool
    recovered: str  # "clean", "replayed epoch N", "discarded torn epoch N"




class Replica:
    def __init__(self, directory: Path, size: int, *, fsync: bool = True, page_size: int = PAGE_SIZE):
        self.dir = Path(directory)
        self.size = size
        self.page_size = page_size
        self.n_pages = size // page_size
        self.fsync = fsync
        self.committed_epoch = 0
        self.valid = False
        self.compat: dict = {}
        self.run_id: str = ""
        self._staged: dict[int, np.ndarray] = {}  # page number -> row in _staged_rows
        self._staged_list: list[tuple[np.ndarray, np.ndarray]] = []
        self._journal_fd: int | None = None
        self._map: mmap.mmap | None = None
        self.ram: np.ndarray | None = None
        self.syncing_initial = False
        # A seeded replica holds the RAM of a former run of this guest (a site rejoining after
        # a takeover): not resumable, but a base for a block-hash resync, so rejoining sends
        # only what changed since. `valid` stays False until the first committed epoch.
        self.seeded = False
        self._device_state: bytes | None = None  # the committed device state, cached

    @property
    def ram_path(self) -> Path:
        return self.dir / "ram.img"

    @property
    def device_state_path(self) -> Path:
        return self.dir / "device.state"

    # ----------------------------------------------------------- open/close
    def open(self) -> OpenReport:
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        fd = os.open(self.ram_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)
            self._map = mmap.mmap(fd, self.size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.ram = np.frombuffer(self._map, dtype=np.uint8).reshape(self.n_pages, self.page_size)
        meta = self._read_meta()
        self.committed_epoch = meta.get("committed_epoch", 0)
        self.valid = meta.get("valid", False)
        self.compat = meta.get("compat", {})
        self.run_id = meta.get("run_id", "")
        self.seeded = bool(meta.get("seeded", False))
        recovered = self._recover()
        self._journal_fd = os.open(self.dir / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        log.info("replica.open", dir=str(self.dir), committed_epoch=self.committed_epoch,
                 valid=self.valid, recovered=recovered)
        return OpenReport(self.committed_epoch, self.valid, recovered)

    def close(self) -> None:
        if self._journal_fd is not None:
            os.close(self._journal_fd)
            self._journal_fd = None
        self.ram = None
        if self._map is not None:
            try:
                self._map.flush()
                self._map.close()
            except BufferError:
                pass
            self._map = None

    def _read_meta(self) -> dict:
        try:
            return json.loads((self.dir / "replica.json").read_text())
        except FileNotFoundError:
            return {}

    def _write_meta(self) -> None:
        atomic_write(self.dir / "replica.json", json.dumps(
            {"committed_epoch": self.committed_epoch, "valid": self.valid, "compat": self.compat,
             "run_id": self.run_id, "seeded": self.seeded}).encode(),
            fsync=self.fsync)

    def bind(self, compat: dict, run_id: str) -> None:
        """The replica is of one guest run. Another run (a freshly booted guest) or another
        guest configuration invalidates it: it is not that guest."""
        if compat != self.compat or run_id != self.run_id:
            if self.valid:
                log.warning("replica.discarded", reason="the primary runs another guest",
                            old_run=self.run_id, new_run=run_id, committed_epoch=self.committed_epoch,
                            compat_changed=compat != self.compat)
            if self.seeded:
                log.warning("replica.seed_discarded", reason="the primary runs another guest",
                            old_run=self.run_id, new_run=run_id)
            self.compat = compat
            self.run_id = run_id
            self.valid = False
            self.seeded = False
            self.committed_epoch = 0
            self._write_meta()

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
        self.valid = False
        self.committed_epoch = 0
        self.seeded = False
        self._write_meta()  # not a base while the copy is under way
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
            self._map.flush()
        self.compat, self.run_id, self.seeded = compat, run_id, True
        self._write_meta()
        log.info("replica.seeded", source=str(ram_file), bytes=done, run_id=run_id)
        return done

    # ----------------------------------------------------------- journal
    @staticmethod
    def _record(kind: int, epoch: int, pages: np.ndarray, data: np.ndarray, dev: bytes) -> list[bytes]:
        p = np.ascontiguousarray(pages, dtype=">u8").tobytes()
        d = np.ascontiguousarray(data).tobytes()
        hdr = _REC.pack(_MAGIC, kind, epoch, len(pages), len(dev), len(p) + len(d) + len(dev))
        h = hashlib.blake2b(digest_size=_SUM)
        for part in (hdr, p, d, dev):
            h.update(part)
        return [hdr, p, d, dev, h.digest()]

    def _append(self, parts: list[bytes]) -> None:
        os.writev(self._journal_fd, parts)

    def _read_journal(self) -> tuple[list[tuple[int, int, np.ndarray, np.ndarray, bytes]], bool]:
        """Parse the journal: (complete records up to the last commit, whether a torn tail was dropped)."""
        try:
            buf = (self.dir / "journal").read_bytes()
        except FileNotFoundError:
            return [], False
        recs, txn, off = [], [], 0
        while off + _REC.size <= len(buf):
            magic, kind, epoch, n, dev_len, body_len = _REC.unpack_from(buf, off)
            end = off + _REC.size + body_len + _SUM
            if magic != _MAGIC or end > len(buf) or body_len != n * 8 + n * self.page_size + dev_len:
                break
            if hashlib.blake2b(buf[off:end - _SUM], digest_size=_SUM).digest() != buf[end - _SUM:end]:
                break
            b = off + _REC.size
            pages = np.frombuffer(buf, dtype=">u8", count=n, offset=b).astype(np.int64)
            data = np.frombuffer(buf, dtype=np.uint8, count=n * self.page_size, offset=b + n * 8)
            dev = bytes(buf[b + n * 8 + n * self.page_size: b + body_len])
            txn.append((kind, epoch, pages, data.reshape(n, self.page_size), dev))
            if kind == REC_COMMIT:
                recs.extend(txn)
                txn = []
            off = end
        return recs, bool(txn) or off != len(buf)

    def _recover(self) -> str:
        recs, torn = self._read_journal()
        replayed = None
        commit_epochs = [r[1] for r in recs if r[0] == REC_COMMIT]
        if commit_epochs and max(commit_epochs) > self.committed_epoch:
            pending = []
            for rec in recs:
                pending.append(rec)
                if rec[0] == REC_COMMIT:
                    if rec[1] > self.committed_epoch:
                        self._apply(pending)
                        replayed = rec[1]
                    pending = []
        self._truncate_journal()
        if replayed is not None:
            return f"replayed epoch {replayed}"
        if torn:
            return f"discarded torn epoch {self.committed_epoch + 1}"
        return "clean"

    def _truncate_journal(self) -> None:
        fd = os.open(self.dir / "journal", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        if self.fsync:
            os.fsync(fd)
        os.close(fd)

    # ----------------------------------------------------------- apply
    def begin_initial_sync(self) -> None:
        """The standby has nothing usable: blocks go straight into ram.img."""
        self.valid = False
        self.committed_epoch = 0
        self.syncing_initial = True
        self._staged.clear()
        self._staged_list.clear()
        self._write_meta()

    def begin_resync(self) -> None:
        """The replica stays valid at its epoch; resync blocks are staged with the next epoch."""
        self.syncing_initial = not self.valid
        self._staged.clear()
        self._staged_list.clear()
        if self.syncing_initial:
            self.begin_initial_sync()

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
        self._staged_list.append((numbers, data))
        for i, p in enumerate(numbers):
            self._staged[int(p)] = data[i]
        self._append(self._record(REC_BLOCK, self.committed_epoch, numbers, data, b""))

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

    def commit(self, epoch: int, page_numbers: np.ndarray, new_pages: np.ndarray, device_state: bytes) -> None:
        """Make epoch `epoch` the replica: journal it, fsync, apply, record. Whole or nothing."""
        if epoch <= self.committed_epoch:
            raise ReplicaError(f"epoch {epoch} is not after the committed epoch {self.committed_epoch} "
                               "(a replayed or stale checkpoint)")
        if not device_state:
            raise ReplicaError(f"epoch {epoch} carries no device state")
        pages = page_numbers.astype(np.int64)
        self._append(self._record(REC_COMMIT, epoch, pages, new_pages, device_state))
        _crash_point("before-journal-sync")
        if self.fsync:
            os.fsync(self._journal_fd)
        _crash_point("after-journal")
        txn = [(REC_BLOCK, self.committed_epoch, n, d, b"") for n, d in self._staged_list]
        txn.append((REC_COMMIT, epoch, pages, new_pages, device_state))
        self._apply(txn)
        self._staged.clear()
        self._staged_list.clear()
        self.syncing_initial = False
        os.ftruncate(self._journal_fd, 0)

    def _apply(self, txn) -> None:
        """Redo a complete transaction (idempotent)."""
        for kind, epoch, pages, data, dev in txn:
            if pages.size:
                half = pages.size // 2
                self.ram[pages[:half].astype(np.intp)] = data[:half]
                _crash_point("mid-ram")
                self.ram[pages[half:].astype(np.intp)] = data[half:]
            if kind == REC_COMMIT:
                if self.fsync:
                    self._map.flush()
                _crash_point("after-ram")
                atomic_write(self.device_state_path, dev, fsync=self.fsync)
                self._device_state = bytes(dev)
                _crash_point("after-device-state")
                self.committed_epoch = epoch
                self.valid = True
                self._write_meta()
                _crash_point("after-meta")

    def device_state(self) -> bytes:
        if self._device_state is None:
            self._device_state = self.device_state_path.read_bytes()
        return self._device_state

    def block_hashes(self, block_pages: int) -> list[bytes]:
        flat = self.ram.reshape(-1)
        bs = block_pages * self.page_size
        return [hashlib.blake2b(memoryview(flat[o:o + bs]), digest_size=16).digest()
                for o in range(0, flat.size, bs)]
