"""COLO spike: does QEMU's own dirty tracking, read through the COLO checkpoint stream, give a
checkpoint pause that is O(dirty pages) instead of O(guest RAM)? Is the RAM it sends complete?

This process is the COLO *secondary*: QEMU (the primary, x-colo on) migrates to a unix socket
we listen on; we parse the migration stream, keep our own copy of every RAM block, and answer
the COLO protocol. At each checkpoint, while the primary is stopped (after the device state
arrived, before we answer `loaded`), our rebuilt RAM is compared page by page with the live
RAM (the guest's shared memory-backend-file): any differing page is a mismatch.

In the same run, on the same QEMU and guest, the current capture runs first (stop → dirty scan
of all RAM against a shadow ∥ device state over `migrate` with x-ignore-shared → cont, as
replication/primary.py `_pause` does it), so the two pauses are compared under the same load.

    .venv/bin/python bench/colo_spike.py [--qemu PATH] [--sizes 128,1024] [--checkpoints 300,100]
        [--runs 1] [--delay-ms 80] [--dirty 32:2000] [--verify-every 1] [--json out.json]

QEMU: the COLO-fixed 10.0.2 of `scripts/qemu10.sh --colo-fix` by default. Debian's 10.0.2 never
enters COLO (the run ends with "0 checkpoints"); the system 7.2 (`--qemu system`) deadlocks at
the first checkpoint under TCG: a read that waits longer than --timeout is reported as a hang,
with every QEMU thread's stack and the owner of any mutex they wait for (gdb), see
docs/colo-spike.md.

Times (per checkpoint, from our side of the socket):
- cycle:  `request` received → `loaded` sent
- stop:   `reply` sent → `loaded` sent (the primary stops the guest after `reply` and starts it
          after `loaded`); the time of our own RAM compare is taken out of both
QEMU's own view (trace event colo_vm_state_change, timestamps from -msg timestamp=on) is read
back from its stderr file afterwards: `qemu stop` = 'run'=>'stop' to 'stop'=>'run'.

Stream facts used (QEMU 10.0 migration/savevm.c, ram.c, colo.c): file magic 0x5145564d,
version 3, a configuration section, then sections START(1)/PART(2)/END(3) (iterable: ram),
FULL(4) (devices), COMMAND(8), EOF(0), VMDESCRIPTION(6); a section footer 0x7e + section id.
RAM: be64 (offset | flags), MEM_SIZE 0x4, ZERO 0x2 (+1 byte), PAGE 0x8 (+4096 bytes),
EOS 0x10, CONTINUE 0x20 (no block name follows). COLO messages are be32: 0 checkpoint-ready,
1 request, 2 reply, 3 vmstate-send, 4 vmstate-size (+be64), 5 vmstate-received, 6 loaded.
A checkpoint: request → reply → vmstate-send, the RAM END sections and EOF, vmstate-size, the
device state (its own FULL sections and EOF, no file header) → received → loaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from geomirror.image import build_image, default_cmdline  # noqa: E402
from replication import qemu as qemu_mod  # noqa: E402
from replication.capture import PAGE_SIZE, Capture, scan_pages  # noqa: E402
from replication.qemu import Guest, GuestSpec, detect_accel  # noqa: E402
from gmbase.stats import percentile as pct  # noqa: E402

QEMU10 = Path("/opt/geomirror/qemu-10")  # Debian's 10.0.2 unpacked by scripts/qemu10.sh (data, firmware)
QEMU10_FIXED = Path("/opt/geomirror/qemu-10-colofix/bin/qemu-system-x86_64")  # the same source + COLO fix

VM_MAGIC, VM_VERSION = 0x5145564D, 3
VM_EOF, SEC_START, SEC_PART, SEC_END, SEC_FULL = 0, 1, 2, 3, 4
VM_SUBSECTION, VM_VMDESC, VM_CONFIGURATION, VM_COMMAND, VM_FOOTER = 5, 6, 7, 8, 0x7E
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE, F_XBZRLE, F_HOOK, F_MULTIFD_FLUSH = (
    0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x200)
PAGE_MASK = ~(PAGE_SIZE - 1)
COLO_READY, COLO_REQUEST, COLO_REPLY, COLO_SEND, COLO_SIZE, COLO_RECEIVED, COLO_LOADED = range(7)
COLO_NAMES = ["checkpoint-ready", "checkpoint-request", "checkpoint-reply", "vmstate-send",
              "vmstate-size", "vmstate-received", "vmstate-loaded"]
_BE32, _BE64 = struct.Struct(">I"), struct.Struct(">Q")


class SpikeError(Exception):
    pass


class Hang(SpikeError):
    """A read from QEMU saw nothing for the socket timeout."""


class Reader:
    """Buffered reads from the migration socket; every read has a timeout (a hang is a Hang)."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.pos = 0
        self.total = 0  # bytes consumed
        self.what = "start"

    def need(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            if self.pos > (8 << 20):
                del self.buf[: self.pos]
                self.pos = 0
            try:
                chunk = self.sock.recv(max(4 << 20, n))
            except socket.timeout:
                raise Hang(f"no byte from QEMU for {self.sock.gettimeout():g}s while reading {self.what}") from None
            if not chunk:
                raise SpikeError(f"QEMU closed the migration socket while reading {self.what}")
            self.buf += chunk

    def take(self, n: int) -> memoryview:
        self.need(n)
        mv = memoryview(self.buf)[self.pos: self.pos + n]
        self.pos += n
        self.total += n
        return mv

    def peek(self) -> int:
        self.need(1)
        return self.buf[self.pos]

    def u8(self) -> int:
        self.need(1)
        v = self.buf[self.pos]
        self.pos += 1
        self.total += 1
        return v

    def be16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def be32(self) -> int:
        self.need(4)
        (v,) = _BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        self.total += 4
        return v

    def be64(self) -> int:
        self.need(8)
        (v,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        self.total += 8
        return v

    def counted_str(self) -> str:
        n = self.u8()
        return bytes(self.take(n)).decode()

    def drain_quiet(self, quiet_s: float) -> bytes:
        """Everything already buffered plus what arrives until the socket is quiet for `quiet_s`."""
        out = bytearray(self.buf[self.pos:])
        self.pos = len(self.buf)
        old = self.sock.gettimeout()
        self.sock.settimeout(quiet_s)
        try:
            while True:
                try:
                    chunk = self.sock.recv(1 << 20)
                except socket.timeout:
                    break
                if not chunk:
                    break
                out += chunk
        finally:
            self.sock.settimeout(old)
        self.total += len(out)
        return bytes(out)


@dataclass
class RamStats:
    pages: int = 0
    zero: int = 0
    bytes: int = 0
    page_numbers: list = field(default_factory=list)  # pages of the main block sent in this section


class Secondary:
    """The RAM image and the stream parser."""

    def __init__(self, reader: Reader, main_block_size: int):
        self.r = reader
        self.blocks: dict[str, np.ndarray] = {}
        self.main_size = main_block_size
        self.main: str | None = None
        self.sections: dict[int, str] = {}  # section id → idstr
        self.header = b""  # magic, version and the configuration section, byte for byte
        self.last_sent: np.ndarray | None = None  # per main page: checkpoint that last carried it
        self._arr: np.ndarray | None = None  # the block of the last page read
        self._is_main = False
        self.commands: list[tuple[int, int, int]] = []  # (checkpoint, command, length) seen

    # -- the file header ----------------------------------------------------
    def read_header(self) -> None:
        r = self.r
        start = r.total
        raw = bytearray()
        r.what = "file header"
        magic, version = r.be32(), r.be32()
        raw += _BE32.pack(magic) + _BE32.pack(version)
        if magic != VM_MAGIC or version != VM_VERSION:
            raise SpikeError(f"not a migration stream (magic {magic:#x} version {version})")
        if r.peek() == VM_CONFIGURATION:
            r.u8()
            n = r.be32()
            name = bytes(r.take(n))
            raw += bytes([VM_CONFIGURATION]) + _BE32.pack(n) + name
            while r.peek() == VM_SUBSECTION:
                r.u8()
                sub = r.counted_str()
                ver = r.be32()
                raw += bytes([VM_SUBSECTION, len(sub)]) + sub.encode() + _BE32.pack(ver)
                if sub == "configuration/target-page-bits":
                    raw += bytes(r.take(4))
                elif sub == "configuration/capabilities":
                    cnt = r.be32()
                    raw += _BE32.pack(cnt)
                    for _ in range(cnt):
                        c = r.counted_str()
                        raw += bytes([len(c)]) + c.encode()
                elif sub == "configuration/uuid":
                    raw += bytes(r.take(16))
                else:
                    raise SpikeError(f"unknown configuration subsection {sub}")
        assert r.total - start == len(raw)
        self.header = bytes(raw)

    # -- sections ---------------------------------------------------------------
    def read_until_eof(self, checkpoint: int, allow_full: bool) -> tuple[RamStats, bool]:
        """Sections until QEMU_VM_EOF (True) or, when `allow_full`, the first FULL section (False:
        the device sections follow, which this parser cannot walk)."""
        r = self.r
        st = RamStats()
        while True:
            r.what = f"section type (checkpoint {checkpoint})"
            t = r.u8()
            if t == VM_EOF:
                return st, True
            if t == VM_COMMAND:
                cmd = r.be16()
                n = r.be16()
                self.commands.append((checkpoint, cmd, n))
                r.take(n)
                continue
            if t in (SEC_START, SEC_FULL):
                if t == SEC_FULL:
                    if allow_full:
                        r.pos -= 1
                        r.total -= 1
                        return st, False
                    raise SpikeError(f"device section in the RAM part of checkpoint {checkpoint}")
                sid = r.be32()
                idstr = r.counted_str()
                r.be32(), r.be32()  # instance, version
                self.sections[sid] = idstr
            elif t in (SEC_PART, SEC_END):
                sid = r.be32()
                idstr = self.sections.get(sid)
            else:
                raise SpikeError(f"unknown section type {t} at byte {r.total} (checkpoint {checkpoint})")
            if idstr != "ram":
                raise SpikeError(f"iterable section {idstr!r} (id {sid}) is not RAM: cannot parse it")
            self.read_ram(st, checkpoint)
            r.what = "section footer"
            if r.u8() != VM_FOOTER or r.be32() != sid:
                raise SpikeError(f"bad section footer after RAM section {sid} (checkpoint {checkpoint})")

    def read_ram(self, st: RamStats, checkpoint: int) -> None:
        r = self.r
        t0 = r.total
        while True:
            r.what = f"RAM page header (checkpoint {checkpoint})"
            hdr = r.be64()
            flags = hdr & ~PAGE_MASK
            addr = hdr & PAGE_MASK
            if flags & F_MEM_SIZE:
                total = addr
                while total > 0:
                    name = r.counted_str()
                    length = r.be64()
                    if name not in self.blocks:
                        self.blocks[name] = np.zeros(length, np.uint8)
                    if length == self.main_size and self.main is None:
                        self.main = name
                        self.last_sent = np.full(length // PAGE_SIZE, -1, np.int32)
                    total -= length
                continue
            if flags & F_EOS:
                break
            if flags & (F_ZERO | F_PAGE):
                if not flags & F_CONTINUE:  # else the block of the last page, also across sections
                    block = r.counted_str()
                    self._arr = self.blocks[block]
                    self._is_main = block == self.main
                arr, is_main = self._arr, self._is_main
                if flags & F_PAGE:
                    arr[addr: addr + PAGE_SIZE] = np.frombuffer(r.take(PAGE_SIZE), np.uint8)
                else:
                    ch = r.u8()
                    page = arr[addr: addr + PAGE_SIZE]
                    if ch or page.any():
                        page[:] = ch
                    st.zero += 1
                st.pages += 1
                if is_main:
                    pn = addr // PAGE_SIZE
                    st.page_numbers.append(pn)
                    self.last_sent[pn] = checkpoint
                continue
            raise SpikeError(f"RAM flags {flags:#x} not handled (checkpoint {checkpoint})")
        st.bytes += r.total - t0

    def send(self, sock: socket.socket, msg: int) -> None:
        sock.sendall(_BE32.pack(msg))

    def expect(self, msg: int, what: str) -> None:
        self.r.what = what
        got = self.r.be32()
        if got != msg:
            raise SpikeError(f"expected COLO {COLO_NAMES[msg]}, got {got} ({what})")


def device_tail_ok(data: bytes) -> bool:
    """The initial stream's device part ends with EOF and (usually) a VMDESCRIPTION."""
    if data.endswith(b"\x00"):
        return True
    for i in range(len(data) - 5, max(0, len(data) - (4 << 20)), -1):
        if data[i] == VM_VMDESC and data[i - 1] == VM_EOF and \
                _BE32.unpack_from(data, i + 1)[0] == len(data) - i - 5:
            return True
    return False


@dataclass
class Checkpoint:
    n: int
    t_request: float
    t_reply: float = 0.0
    t_received: float = 0.0
    t_loaded: float = 0.0
    verify_ms: float = 0.0  # our own work inside the stop window (RAM compare, copies): taken out of the times
    pages: int = 0
    zero: int = 0
    ram_bytes: int = 0
    dev_bytes: int = 0
    mismatches: int = -1  # -1: not compared

    @property
    def cycle_ms(self) -> float:
        return (self.t_loaded - self.t_request) * 1000 - self.verify_ms

    @property
    def stop_ms(self) -> float:
        return (self.t_loaded - self.t_reply) * 1000 - self.verify_ms


class ColoRun:
    """One COLO session: accept QEMU's connection, initial sync, checkpoints (in a thread)."""

    def __init__(self, sock_path: Path, ram_path: Path, size: int, checkpoints: int, verify_every: int,
                 timeout: float):
        self.sock_path, self.size, self.want = sock_path, size, checkpoints
        self.verify_every = verify_every
        self.timeout = timeout
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock_path.unlink(missing_ok=True)
        self.listener.bind(str(sock_path))
        self.listener.listen(1)
        fd = os.open(ram_path, os.O_RDONLY)
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        os.close(fd)
        self.live = np.frombuffer(self._map, np.uint8)
        self.cps: list[Checkpoint] = []
        self.initial: dict = {}
        self.error: str | None = None
        self.hang = False
        self.mismatch_detail: list[dict] = []
        self.last_device_state = b""
        self.header = b""
        self.image_at_last: np.ndarray | None = None
        self.done = threading.Event()

    def compare(self, sec: Secondary, n: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        img = sec.blocks[sec.main]
        bad = scan_pages(self.live, img, PAGE_SIZE)
        ms = (time.perf_counter() - t0) * 1000
        if bad.size and len(self.mismatch_detail) < 50:
            for pn in bad[:10].tolist():
                a = self.live[pn * PAGE_SIZE:(pn + 1) * PAGE_SIZE]
                b = img[pn * PAGE_SIZE:(pn + 1) * PAGE_SIZE]
                diff = np.flatnonzero(a != b)
                self.mismatch_detail.append({
                    "checkpoint": n, "page": int(pn), "last_sent_in": int(sec.last_sent[pn]),
                    "differing_bytes": int(diff.size), "first_offset": int(diff[0]),
                    "live_zero": bool(not a.any()), "image_zero": bool(not b.any())})
        return int(bad.size), ms

    def run(self) -> None:
        try:
            self._run()
        except Hang as e:
            self.hang, self.error = True, str(e)
        except (SpikeError, OSError) as e:
            self.error = f"{type(e).__name__}: {e}"
        except Exception:  # a parser bug: reported with its traceback, never swallowed
            self.error = traceback.format_exc()
        finally:
            self.done.set()

    def _run(self) -> None:
        self.listener.settimeout(30)
        conn, _ = self.listener.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.conn = conn
        r = Reader(conn, self.timeout)
        sec = Secondary(r, self.size)
        t0 = time.monotonic()
        sec.read_header()
        self.header = sec.header
        st, eof = sec.read_until_eof(0, allow_full=True)
        if eof:
            raise SpikeError("initial stream ended without device sections")
        t_ram = time.monotonic()
        dev = r.drain_quiet(0.5)  # QEMU now waits for checkpoint-ready: the stream is quiet
        if not device_tail_ok(dev):
            raise SpikeError(f"initial device part ({len(dev)} bytes) does not end with EOF/VMDESCRIPTION")
        if sec.main is None:
            raise SpikeError(f"no RAM block of {self.size} bytes in {list(sec.blocks)}")
        bad, vms = self.compare(sec, 0)
        self.initial = {"commands": sec.commands[:], "seconds": round(t_ram - t0, 2), "ram_pages": st.pages, "zero_pages": st.zero,
                        "ram_bytes": st.bytes, "device_bytes": len(dev), "mismatches": bad,
                        "blocks": {k: int(v.size) for k, v in sec.blocks.items()}, "main_block": sec.main,
                        "verify_ms": round(vms, 1)}
        sec.send(conn, COLO_READY)
        for n in range(1, self.want + 1):
            sec.expect(COLO_REQUEST, f"checkpoint-request {n}")
            cp = Checkpoint(n, time.monotonic())
            sec.send(conn, COLO_REPLY)
            cp.t_reply = time.monotonic()
            sec.expect(COLO_SEND, f"vmstate-send {n}")
            st, eof = sec.read_until_eof(n, allow_full=False)
            sec.expect(COLO_SIZE, f"vmstate-size {n}")
            size = r.be64()
            r.what = f"device state {n}"
            blob = bytes(r.take(size))
            cp.t_received = time.monotonic()
            sec.send(conn, COLO_RECEIVED)
            if self.verify_every and n % self.verify_every == 0 or n == self.want:
                cp.mismatches, cp.verify_ms = self.compare(sec, n)
            cp.pages, cp.zero, cp.ram_bytes, cp.dev_bytes = st.pages, st.zero, st.bytes, size
            if n == self.want:  # the state the guest is in now, for the resume test (not timed)
                c0 = time.perf_counter()
                self.last_device_state = blob
                self.image_at_last = sec.blocks[sec.main].copy()
                cp.verify_ms += (time.perf_counter() - c0) * 1000
            sec.send(conn, COLO_LOADED)
            cp.t_loaded = time.monotonic()
            self.cps.append(cp)


def qemu_stops_from_trace(path: Path) -> list[float]:
    """'run' => 'stop' … 'stop' => 'run' spans (ms) from QEMU's colo_vm_state_change trace lines."""
    spans, t_stop = [], None
    pat = re.compile(r"(\d+\.\d+):colo_vm_state_change Change '(\w+)' => '(\w+)'")
    for line in path.read_text(errors="replace").splitlines():
        m = pat.search(line)
        if not m:
            continue
        t, old, new = float(m.group(1)), m.group(2), m.group(3)
        if old == "run" and new == "stop":
            t_stop = t
        elif old == "stop" and new == "run" and t_stop is not None:
            spans.append((t - t_stop) * 1000)
            t_stop = None
    return spans


async def current_pause(g: Guest, cap: Capture, epochs: int, interval_s: float) -> dict:
    """replication/primary.py `_pause` without the gate and the disk: stop → (scan ∥ device state) → cont."""
    pauses, scans, pages = [], [], []
    for _ in range(epochs):
        await asyncio.sleep(interval_s)
        t0 = time.perf_counter()
        await g.stop_vcpus()
        ts = {}

        def scan():
            s0 = time.perf_counter()
            d = cap.capture()
            ts["scan"] = time.perf_counter() - s0
            return d
        task = asyncio.create_task(asyncio.to_thread(scan))
        try:
            await g.save_device_state()
        finally:
            dirty = await task
            await g.cont()
        pauses.append((time.perf_counter() - t0) * 1000)
        scans.append(ts["scan"] * 1000)
        pages.append(int(dirty.page_numbers.size))
    return {"pause_ms": pauses, "scan_ms": scans, "pages": pages}


def gdb_threads(pid: int, out: Path) -> None:
    try:
        res = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
                             capture_output=True, text=True, timeout=60)
        text = res.stdout + res.stderr
        # a thread blocked in a mutex: which thread (LWP) owns it? (glibc: __owner at offset 8)
        words = sorted(set(re.findall(r"__lll_lock_wait \(futex=futex@entry=(0x[0-9a-f]+)", text)))
        if words:
            own = subprocess.run(["gdb", "-p", str(pid), "-batch",
                                  *[a for w in words for a in ("-ex", f"p/d *(int*)({w}+8)")]],
                                 capture_output=True, text=True, timeout=60)
            owners = re.findall(r"^\$\d+ = (-?\d+)", own.stdout, re.M)
            text += "\n== mutex owners (LWP): " + ", ".join(f"{w}: {o}" for w, o in zip(words, owners)) + "\n"
        out.write_text(text)
    except (OSError, subprocess.TimeoutExpired) as e:
        out.write_text(f"gdb failed: {e}")


async def resume_test(qemu_argv_extra: tuple, spec: GuestSpec, run: ColoRun, workdir: Path) -> dict:
    """Feed the last checkpoint (our RAM image + its device state with the initial stream's file
    header in front) to a fresh QEMU 10 with -incoming defer; does the guest run on?"""
    d = workdir / "resume"
    d.mkdir(exist_ok=True)
    ram = d / "ram"
    run.image_at_last.tofile(ram)
    rspec = GuestSpec(name="resume", memory_mb=spec.memory_mb, kernel=spec.kernel, initrd=spec.initrd,
                      append=spec.append, ram_path=ram, qmp_path=d / "qmp.sock", serial_path=d / "serial.log",
                      net_socket=d / "net.sock", accel=spec.accel, incoming=True, stderr_path=d / "stderr")
    g = Guest(rspec, extra_argv=qemu_argv_extra)
    out = {}
    await g.start()
    try:
        await g._execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False}]})
        # the file header of the initial stream, the checkpoint's device sections (they end with EOF),
        # and an empty VMDESCRIPTION (QEMU reads one after EOF and warns when it is missing)
        stream = run.header + run.last_device_state + bytes([VM_VMDESC]) + _BE32.pack(2) + b"{}"
        try:
            await g.load_device_state(stream, timeout=30)
            out["loaded"] = True
        except qemu_mod.GuestError as e:
            out["loaded"] = False
            out["error"] = str(e)
            out["stderr"] = (d / "stderr").read_text(errors="replace")[-800:]
            for cmd in ("query-migrate", "query-status"):
                try:
                    out[cmd] = await g._execute(cmd)
                except qemu_mod.GuestError as e2:
                    out[cmd] = str(e2)
            return out
        await g.cont()
        before = np.fromfile(ram, np.uint8)
        await asyncio.sleep(2.0)
        after = np.fromfile(ram, np.uint8)
        out["status"] = await g.status()
        out["pages_changed_in_2s"] = int(scan_pages(after, before, PAGE_SIZE).size)
        return out
    finally:
        await g.close()


async def one_run(args, mb: int, checkpoints: int, run_no: int, workdir: Path) -> dict:
    img = build_image(progress=False)
    d = workdir / f"m{mb}-r{run_no}"
    d.mkdir()
    extra = (("-L", str(QEMU10 / "usr/share/qemu"), "-L", str(QEMU10 / "usr/share/seabios"))
             if args.qemu != "system" else ()) + (
             "-msg", "timestamp=on", "-trace", "enable=colo_vm_state_change",
             *[a for t in args.trace for a in ("-trace", f"enable={t}")])
    spec = GuestSpec(name=f"colo{mb}", memory_mb=mb, kernel=img.kernel, initrd=img.initrd,
                     append=default_cmdline("198.51.100.10", 24, "198.51.100.1", dirty=args.dirty),
                     ram_path=d / "ram", qmp_path=d / "qmp.sock", serial_path=d / "serial.log",
                     net_socket=d / "net.sock", accel=detect_accel(), stderr_path=d / "stderr")
    g = Guest(spec, extra_argv=extra)
    res: dict = {"mb": mb, "run": run_no, "qemu": qemu_mod.qemu_version()}
    await g.start()
    try:
        await g.wait_ready(120)
        await asyncio.sleep(1.5)
        cap = Capture(spec.ram_path, mb << 20)
        cap.capture()
        cur = await current_pause(g, cap, args.current_epochs, args.delay_ms / 1000)
        cap.close()
        res["current"] = cur

        await g._execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False},
            {"capability": "x-colo", "state": True}]})
        await g._execute("migrate-set-parameters", {"x-checkpoint-delay": args.delay_ms})
        run = ColoRun(d / "colo.sock", spec.ram_path, mb << 20, checkpoints, args.verify_every, args.timeout)
        th = threading.Thread(target=run.run, daemon=True)
        th.start()
        await g._execute("migrate", {"uri": f"unix:{d / 'colo.sock'}"})
        states = []
        while not run.done.is_set():
            await asyncio.sleep(0.2)
            try:
                st = (await g._execute("query-migrate")).get("status")
            except qemu_mod.GuestError as e:  # the main loop is stuck: take the threads' stacks now
                res["qmp_stuck"] = f"after {len(run.cps)} checkpoints: {e}"
                gdb_threads(g.pid, d / "gdb-qmp.txt")
                res["gdb_qmp"] = str(d / "gdb-qmp.txt")
                await asyncio.to_thread(run.done.wait, args.timeout + 5)
                break
            if not states or states[-1] != st:
                states.append(st)
            if not g.running:
                run.error = run.error or "QEMU exited"
                break
        if run.hang:
            gdb_threads(g.pid, d / "gdb.txt")
            res["gdb"] = str(d / "gdb.txt")
            for cmd in ("query-status", "query-migrate"):
                try:
                    res[f"{cmd}_at_hang"] = await g._execute(cmd)
                except qemu_mod.GuestError as e:
                    res[f"{cmd}_at_hang"] = str(e)
        if getattr(run, "conn", None) is not None:
            res["status_after"] = (await g._execute("query-status"))["status"]
            run.conn.close()  # QEMU's COLO thread sees the end of the stream and leaves COLO
        res["error"] = run.error
        res["migrate_states"] = states
        if run.error:
            res["query_migrate"] = await g._execute("query-migrate")
        res["initial"] = run.initial
        res["checkpoints"] = [cp.__dict__ | {"cycle_ms": cp.cycle_ms, "stop_ms": cp.stop_ms} for cp in run.cps]
        res["mismatch_detail"] = run.mismatch_detail
        if args.resume and run.image_at_last is not None and not run.error:
            # the guest keeps running on the primary; the copy is the state at the last checkpoint
            res["resume"] = await resume_test(extra, spec, run, d)
    finally:
        try:
            await g.close()
        except qemu_mod.GuestError:
            g.kill()
    if spec.stderr_path.exists():
        res["qemu_stop_ms"] = qemu_stops_from_trace(spec.stderr_path)
    if not args.keep:
        for p in d.glob("ram"):
            p.unlink()
    return res


def summarize(res: dict) -> str:
    cps = res["checkpoints"]
    cur = res["current"]
    lines = [f"== {res['mb']} MB run {res['run']} ({res['qemu']}): {len(cps)} checkpoints"
             + (f", ERROR {res['error']}" if res.get("error") else "")]
    i = res["initial"]
    if i:
        lines.append(f"  initial sync {i['seconds']} s, {i['ram_pages']} pages ({i['zero_pages']} zero), "
                     f"device {i['device_bytes']} B, mismatches {i['mismatches']}, main block {i['main_block']}")
    if cps:
        stop = [c["stop_ms"] for c in cps]
        cyc = [c["cycle_ms"] for c in cps]
        pages = [c["pages"] for c in cps]
        mism = [c["mismatches"] for c in cps if c["mismatches"] >= 0]
        cp50 = statistics.median(cur["pause_ms"])
        lines.append(f"  COLO stop p50 {statistics.median(stop):.2f} ms p99 {pct(stop, 99):.2f} max {max(stop):.2f}; "
                     f"cycle p50 {statistics.median(cyc):.2f} p99 {pct(cyc, 99):.2f}; "
                     f"pages/cp p50 {statistics.median(pages):.0f} max {max(pages)}; "
                     f"device {statistics.median([c['dev_bytes'] for c in cps]):.0f} B")
        lines.append(f"  current pause p50 {cp50:.2f} ms p99 {pct(cur['pause_ms'], 99):.2f} (scan p50 "
                     f"{statistics.median(cur['scan_ms']):.2f} ms), pages/epoch p50 "
                     f"{statistics.median(cur['pages']):.0f}; ratio current/COLO p50 "
                     f"{cp50 / statistics.median(stop):.1f}x, p99 {pct(cur['pause_ms'], 99) / pct(stop, 99):.1f}x")
        lines.append(f"  compared {len(mism)} checkpoints, mismatching pages total {sum(mism)} "
                     f"(checkpoints with any: {sum(1 for m in mism if m)}); verify p50 "
                     f"{statistics.median([c['verify_ms'] for c in cps if c['mismatches'] >= 0]):.1f} ms")
    q = res.get("qemu_stop_ms") or []
    if q:
        lines.append(f"  QEMU's own stop (trace, with our compare in it): p50 {statistics.median(q):.2f} ms "
                     f"p99 {pct(q, 99):.2f} ms (n={len(q)})")
        if len(q) >= len(cps) > 0:
            net = [q[i] - cps[i]["verify_ms"] for i in range(len(cps))]
            lines.append(f"  QEMU's own stop minus our compare: p50 {statistics.median(net):.2f} ms "
                         f"p99 {pct(net, 99):.2f} max {max(net):.2f}")
    if res.get("resume"):
        lines.append(f"  resume from the last checkpoint in a fresh QEMU: {res['resume']}")
    if res.get("qmp_stuck"):
        lines.append(f"  QMP STUCK {res['qmp_stuck']} (stacks: {res['gdb_qmp']})")
    if res.get("gdb"):
        lines.append(f"  HANG: status {res.get('status_at_hang')} gdb {res['gdb']}")
    return "\n".join(lines)


async def main_async(args) -> list[dict]:
    if args.qemu != "system":  # QEMU 10 beside the system's 7.2: its data and modules, never 7.2's
        qemu_mod.QEMU_BINARY = args.qemu
        os.environ["QEMU_MODULE_DIR"] = str(QEMU10 / "usr/lib/x86_64-linux-gnu/qemu")
    workdir = Path(tempfile.mkdtemp(prefix="gm-colo-", dir="/dev/shm"))
    out = []
    try:
        sizes = [int(x) for x in args.sizes.split(",")]
        counts = [int(x) for x in args.checkpoints.split(",")]
        for mb, n in zip(sizes, counts):
            for run_no in range(1, args.runs + 1):
                res = await one_run(args, mb, n, run_no, workdir)
                print(summarize(res), flush=True)
                out.append(res)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"kept {workdir}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qemu", default=str(QEMU10_FIXED if QEMU10_FIXED.exists() else QEMU10 / "usr/bin/qemu-system-x86_64"),
                    help="QEMU binary: default the COLO-fixed 10.0 build (scripts/qemu10.sh --colo-fix), else "
                         "Debian's 10.0 from scripts/qemu10.sh; `system` for the system QEMU (7.2)")
    ap.add_argument("--sizes", default="128,1024")
    ap.add_argument("--checkpoints", default="300,100")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--delay-ms", type=int, default=80, help="x-checkpoint-delay (and the current pipeline's interval)")
    ap.add_argument("--dirty", default="32:2000", help="gm.dirty MB:PAGES_PER_S")
    ap.add_argument("--verify-every", type=int, default=1, help="compare RAM every Nth checkpoint (0: last only)")
    ap.add_argument("--current-epochs", type=int, default=60)
    ap.add_argument("--timeout", type=float, default=15.0, help="seconds any read from QEMU may wait")
    ap.add_argument("--resume", action="store_true", help="resume the last checkpoint in a fresh QEMU")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--trace", action="append", default=[], help="more QEMU trace events (patterns)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
