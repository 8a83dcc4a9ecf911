"""The guest's written pages from QEMU's own dirty log, read through its COLO checkpoint stream.

Today's capture finds an epoch's pages by comparing all of guest RAM with the shadow while the
vCPUs are stopped: O(RAM). QEMU tracks every page written (by a vCPU or by DMA) for migration;
its COLO mode (`x-colo`) sends exactly those pages at each checkpoint, with the guest stopped.
This module stands in for COLO's *secondary*: QEMU migrates to a socketpair we hold, we answer
the COLO messages, and each checkpoint yields the numbers of the pages QEMU sent (O(dirty)) and
the device state. The page contents in the stream are skipped: the service maps the guest's RAM
file and copies the pages from it while the guest is stopped (`Capture.take`).

The pause is ours to place and bound: QEMU asks for a checkpoint (`request`) and waits, guest
running, until we `reply`; then it stops the guest, sends `vmstate-send`, the RAM pages, EOF,
`vmstate-size` and the device state, and starts the guest again only after our `loaded`.
Holding `loaded` back keeps the guest stopped (a planned handover's last epoch).

Stream facts (QEMU 10.0 migration/savevm.c, ram.c, colo.c; docs/colo.md): the file magic
0x5145564d, version 3, a configuration section; sections START(1)/PART(2)/END(3) (ram),
FULL(4) (devices), COMMAND(8), EOF(0), VMDESCRIPTION(6); a section footer 0x7e + section id.
RAM page header be64 (offset | flags): MEM_SIZE 0x4, ZERO 0x2 (+1 byte), PAGE 0x8 (+4096
bytes), EOS 0x10, CONTINUE 0x20 (no block name: the block of the previous page, also across
sections). COLO messages are be32: 0 checkpoint-ready, 1 request, 2 reply, 3 vmstate-send,
4 vmstate-size (+be64), 5 vmstate-received, 6 vmstate-loaded. The initial stream (all of RAM,
guest running, then the devices with the guest stopped) ends with EOF and VMDESCRIPTION, and
QEMU then waits for checkpoint-ready with the guest stopped.

Needs a QEMU whose COLO works under this accelerator: scripts/qemu10.sh --colo-fix.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from dataclasses import dataclass, field

import numpy as np

from gmbase.errors import GeomirrorError

VM_MAGIC, VM_VERSION = 0x5145564D, 3
VM_EOF, SEC_START, SEC_PART, SEC_END, SEC_FULL = 0, 1, 2, 3, 4
VM_SUBSECTION, VM_VMDESC, VM_CONFIGURATION, VM_COMMAND, VM_FOOTER = 5, 6, 7, 8, 0x7E
F_ZERO, F_MEM_SIZE, F_PAGE, F_EOS, F_CONTINUE = 0x2, 0x4, 0x8, 0x10, 0x20
READY, REQUEST, REPLY, SEND, SIZE, RECEIVED, LOADED = range(7)
MESSAGES = ["checkpoint-ready", "checkpoint-request", "checkpoint-reply", "vmstate-send",
            "vmstate-size", "vmstate-received", "vmstate-loaded"]
EMPTY_VMDESC = bytes([VM_VMDESC]) + struct.pack(">I", 2) + b"{}"
# scripts/qemu10.sh --colo-fix: the COLO-capable build, and the data of Debian's same version
COLO_QEMU = "/opt/geomirror/qemu-10-colofix/bin/qemu-system-x86_64"
COLO_QEMU_DATA = ("/opt/geomirror/qemu-10/usr/share/qemu", "/opt/geomirror/qemu-10/usr/share/seabios")
_BE32, _BE64 = struct.Struct(">I"), struct.Struct(">Q")


class ColoError(GeomirrorError):
    """The COLO stream from QEMU broke off or is not what this parser knows."""


class ColoTimeout(ColoError):
    """QEMU sent nothing for the read's deadline."""


class _Reader:
    """Buffered blocking reads from the migration socket (called from one thread)."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.timeout = timeout
        self.buf = bytearray()
        self.pos = 0
        self.total = 0
        self.what = "the stream's start"

    def need(self, n: int) -> None:
        while len(self.buf) - self.pos < n:
            if self.pos > (4 << 20):
                del self.buf[: self.pos]
                self.pos = 0
            self.sock.settimeout(self.timeout)
            try:
                chunk = self.sock.recv(max(1 << 20, n))
            except socket.timeout:
                raise ColoTimeout(f"QEMU sent nothing for {self.timeout:g}s while we waited for {self.what}") from None
            except OSError as e:
                raise ColoError(f"the COLO stream from QEMU failed while reading {self.what}: {e}") from None
            if not chunk:
                raise ColoError(f"QEMU closed the COLO stream while we read {self.what}")
            self.buf += chunk

    def take(self, n: int) -> bytes:
        self.need(n)
        out = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        self.total += n
        return out

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n
        self.total += n

    def peek(self) -> int:
        self.need(1)
        return self.buf[self.pos]

    def u8(self) -> int:
        self.need(1)
        self.pos += 1
        self.total += 1
        return self.buf[self.pos - 1]

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

    def name(self) -> str:
        return self.take(self.u8()).decode()

    def buffered(self) -> int:
        return len(self.buf) - self.pos


def parse_header(r: _Reader) -> bytes:
    """The file header (magic, version, configuration section), byte for byte."""
    raw = bytearray()
    r.what = "the migration stream's header"
    magic, version = r.be32(), r.be32()
    if magic != VM_MAGIC or version != VM_VERSION:
        raise ColoError(f"not a QEMU migration stream (magic {magic:#x}, version {version})")
    raw += _BE32.pack(magic) + _BE32.pack(version)
    if r.peek() == VM_CONFIGURATION:
        r.u8()
        n = r.be32()
        raw += bytes([VM_CONFIGURATION]) + _BE32.pack(n) + r.take(n)
        while r.peek() == VM_SUBSECTION:
            r.u8()
            sub = r.name()
            ver = r.be32()
            raw += bytes([VM_SUBSECTION, len(sub)]) + sub.encode() + _BE32.pack(ver)
            if sub == "configuration/target-page-bits":
                raw += r.take(4)
            elif sub == "configuration/capabilities":
                cnt = r.be32()
                raw += _BE32.pack(cnt)
                for _ in range(cnt):
                    c = r.name()
                    raw += bytes([len(c)]) + c.encode()
            elif sub == "configuration/uuid":
                raw += r.take(16)
            else:
                raise ColoError(f"unknown configuration subsection {sub!r} in QEMU's migration header")
    return bytes(raw)


def header_of(stream: bytes) -> bytes:
    """The header of a complete migration stream held in memory (e.g. `Guest.save_device_state`)."""

    class _Bytes:
        def __init__(self, data: bytes):
            self.data, self.off = data, 0

        def recv(self, n: int) -> bytes:
            out = self.data[self.off: self.off + n]
            self.off += len(out)
            return out

        def settimeout(self, t) -> None:
            pass

    return parse_header(_Reader(_Bytes(stream), 1.0))  # type: ignore[arg-type]


@dataclass
class RamPages:
    """The pages of one stream part: numbers in the main block, and the rest."""

    main: list = field(default_factory=list)  # page numbers in guest RAM (the main block)
    other: int = 0  # pages of other RAM blocks (ROMs, ACPI tables): not replicated
    zero: int = 0


@dataclass
class Checkpoint:
    pages: np.ndarray  # uint64, sorted, unique: the main block's pages QEMU sent
    other_pages: int
    device_blob: bytes  # QEMU's device sections ending with EOF (no file header)
    stream_bytes: int
    read_s: float  # vmstate-send → the device state read (the pages and the devices)
    begin_s: float = 0.0  # reply sent → QEMU's vmstate-send (it stopped the guest): set by ColoSource


class ColoStream:
    """The COLO secondary's half of one migration: the initial stream, then checkpoints.
    Blocking; each call is meant for a worker thread."""

    def __init__(self, sock: socket.socket, ram_bytes: int, page_size: int = 4096, timeout: float = 10.0):
        self.sock = sock
        self.r = _Reader(sock, timeout)
        self.ram_bytes = ram_bytes
        self.page_size = page_size
        self.main: str | None = None  # the RAM block of `ram_bytes` (the guest's memory backend)
        self.blocks: dict[str, int] = {}
        self._sections: dict[int, str] = {}
        self._block: str | None = None  # the block of the last page (CONTINUE)
        self.header = b""
        self.checkpoints = 0

    # -- messages -------------------------------------------------------------
    def send(self, msg: int) -> None:
        try:
            self.sock.sendall(_BE32.pack(msg))
        except OSError as e:
            raise ColoError(f"could not send COLO {MESSAGES[msg]} to QEMU: {e}") from None

    def expect(self, msg: int) -> None:
        self.r.what = f"COLO {MESSAGES[msg]} (checkpoint {self.checkpoints + 1})"
        got = self.r.be32()
        if got != msg:
            name = MESSAGES[got] if got < len(MESSAGES) else str(got)
            raise ColoError(f"QEMU sent COLO {name} where {MESSAGES[msg]} belongs (checkpoint {self.checkpoints + 1})")

    # -- the initial stream ----------------------------------------------------
    def read_initial(self, quiet_s: float = 0.2) -> RamPages:
        """All of RAM, then the devices: read to the end (the stream goes quiet after the
        VMDESCRIPTION: QEMU waits for checkpoint-ready). Returns the RAM part's pages."""
        self.header = parse_header(self.r)
        pages, eof = self._sections_until_eof("the initial stream", stop_at_full=True)
        if eof:
            raise ColoError("QEMU's initial COLO stream ended without device sections")
        if self.main is None:
            raise ColoError(f"no RAM block of {self.ram_bytes} bytes in QEMU's stream (blocks: {self.blocks})")
        self._drain_devices(quiet_s)
        return pages

    def _drain_devices(self, quiet_s: float) -> None:
        """The initial device part cannot be walked without QEMU's vmstate descriptions: read
        until it ends in EOF + VMDESCRIPTION (or EOF) and nothing more comes for `quiet_s`."""
        r = self.r
        data = bytearray(r.buf[r.pos:])
        r.buf, r.pos = bytearray(), 0
        r.what = "the initial stream's device state"
        while True:
            self.sock.settimeout(quiet_s)
            try:
                chunk = self.sock.recv(1 << 20)
            except socket.timeout:
                if _ends_like_devices(data):
                    r.total += len(data)
                    return
                continue
            except OSError as e:
                raise ColoError(f"the COLO stream from QEMU failed while reading {r.what}: {e}") from None
            if not chunk:
                raise ColoError(f"QEMU closed the COLO stream while we read {r.what}")
            data += chunk
            if len(data) > (256 << 20):
                raise ColoError("QEMU's initial device state is larger than 256 MiB: not a device part")

    # -- checkpoints -------------------------------------------------------------
    def wait_request(self) -> None:
        """QEMU's next checkpoint request (it sends one `delay` after the last checkpoint and
        waits, the guest running, for our reply)."""
        self.expect(REQUEST)

    def begin(self) -> None:
        """Answer the request: returns once QEMU has stopped the guest."""
        self.send(REPLY)
        self.expect(SEND)

    def read_checkpoint(self) -> Checkpoint:
        """With the guest stopped (after `begin`): the RAM pages QEMU sent and the device state."""
        t0 = time.perf_counter()
        start = self.r.total
        n = self.checkpoints + 1
        pages, eof = self._sections_until_eof(f"checkpoint {n}", stop_at_full=False)
        self.expect(SIZE)
        size = self.r.be64()
        self.r.what = f"the device state of checkpoint {n} ({size} bytes)"
        blob = self.r.take(size)
        arr = np.unique(np.asarray(pages.main, dtype=np.uint64))
        return Checkpoint(arr, pages.other, blob, self.r.total - start, time.perf_counter() - t0)

    def finish(self) -> None:
        """The checkpoint is ours: QEMU starts the guest again."""
        self.send(RECEIVED)
        self.send(LOADED)
        self.checkpoints += 1

    # -- sections -------------------------------------------------------------------
    def _sections_until_eof(self, where: str, stop_at_full: bool) -> tuple[RamPages, bool]:
        r = self.r
        out = RamPages()
        while True:
            r.what = f"a section of {where}"
            t = r.u8()
            if t == VM_EOF:
                return out, True
            if t == VM_COMMAND:
                r.be16()
                r.skip(r.be16())
                continue
            if t == SEC_FULL and stop_at_full:
                r.pos -= 1
                r.total -= 1
                return out, False
            if t == SEC_START:
                sid = r.be32()
                idstr = r.name()
                r.be32(), r.be32()  # instance, version
                self._sections[sid] = idstr
            elif t in (SEC_PART, SEC_END):
                sid = r.be32()
                idstr = self._sections.get(sid, f"unknown section {sid}")
            else:
                raise ColoError(f"section type {t} at byte {r.total} of {where}: not a RAM section")
            if idstr != "ram":
                raise ColoError(f"iterable section {idstr!r} in {where}: only RAM is understood")
            self._ram(out, where)
            r.what = f"a section footer of {where}"
            if r.u8() != VM_FOOTER or r.be32() != sid:
                raise ColoError(f"bad section footer after RAM section {sid} of {where}")

    def _ram(self, out: RamPages, where: str) -> None:
        r = self.r
        ps = self.page_size
        mask = ~(ps - 1)
        main = out.main
        while True:
            hdr = r.be64()
            flags, addr = hdr & ~mask, hdr & mask
            if flags & F_MEM_SIZE:
                total = addr
                while total > 0:
                    name = r.name()
                    length = r.be64()
                    self.blocks[name] = length
                    if length == self.ram_bytes and self.main is None:
                        self.main = name
                    total -= length
                continue
            if flags & F_EOS:
                return
            if flags & (F_ZERO | F_PAGE):
                if not flags & F_CONTINUE:
                    self._block = r.name()
                if flags & F_PAGE:
                    r.skip(ps)
                else:
                    r.u8()
                    out.zero += 1
                if self._block == self.main:
                    main.append(addr // ps)
                else:
                    out.other += 1
                continue
            raise ColoError(f"RAM page flags {flags:#x} in {where} are not handled")


def _ends_like_devices(data: bytearray) -> bool:
    """True when `data` (the initial device part) ends with EOF + a VMDESCRIPTION of the exact
    remaining length, or with a bare EOF."""
    if not data:
        return False
    for i in range(len(data) - 5, max(0, len(data) - (8 << 20)) - 1, -1):
        if data[i] == VM_VMDESC and i > 0 and data[i - 1] == VM_EOF and \
                _BE32.unpack_from(data, i + 1)[0] == len(data) - i - 5:
            return True
    return data[-1] == VM_EOF


def device_stream(header: bytes, blob: bytes) -> bytes:
    """A COLO checkpoint's device sections as a stream `migrate-incoming` loads: `header` (the
    file header of a stream the loading QEMU accepts, e.g. one of `Guest.save_device_state`, so
    its capabilities match) in front, an empty VMDESCRIPTION behind."""
    return header + blob + EMPTY_VMDESC


class ColoSource:
    """One COLO migration of a running guest, driven from the event loop: the blocking reads run
    in a worker thread, one step at a time (`begin`, `read`, `finish`)."""

    def __init__(self, guest, ram_bytes: int, page_size: int = 4096, timeout: float = 10.0):
        self.guest = guest
        self.ram_bytes = ram_bytes
        self.page_size = page_size
        self.timeout = timeout
        self.stream: ColoStream | None = None
        self._sock: socket.socket | None = None
        self.device_header = b""  # the header the standby's QEMU accepts (x-ignore-shared on)
        self.open_checkpoint = False  # `begin` done, `finish` not: the guest is stopped
        self._requested = False  # QEMU's request is read and not yet answered
        self.delay_ms = 10  # QEMU's x-checkpoint-delay: how soon after a checkpoint it asks again

    @property
    def active(self) -> bool:
        return self.stream is not None

    async def start(self) -> dict:
        """Take the device-state header from one ordinary save (the vCPUs stopped for it), start
        the COLO migration and read its initial stream (all of RAM: the guest runs meanwhile,
        then QEMU stops it for the devices), then let QEMU start the guest and checkpoint."""
        g = self.guest
        await g.stop_vcpus()
        try:
            self.device_header = header_of(await g.save_device_state())
        finally:
            await g.cont()
        t0 = time.monotonic()
        self._sock = await g.start_colo(self.delay_ms)
        stream = ColoStream(self._sock, self.ram_bytes, self.page_size, self.timeout)
        try:
            pages = await asyncio.to_thread(stream.read_initial)
            await asyncio.to_thread(stream.send, READY)
        except BaseException:
            await self.end()
            raise
        self.stream = stream  # active only now: a sync must not begin before the initial stream ended
        return {"seconds": round(time.monotonic() - t0, 2), "pages": len(pages.main), "zero_pages": pages.zero,
                "other_pages": pages.other, "stream_bytes": stream.r.total, "blocks": dict(stream.blocks)}

    async def wait_request(self) -> None:
        """Until QEMU asks for a checkpoint (the guest runs meanwhile)."""
        assert self.stream is not None
        if not self._requested:
            await asyncio.to_thread(self.stream.wait_request)
            self._requested = True

    async def checkpoint(self, work=None) -> tuple[Checkpoint, object]:
        """Take the checkpoint QEMU asked for, in one worker-thread hop: reply, QEMU stops the
        guest, read its pages and device state, then `work(checkpoint)` (still stopped: copy the
        pages). Returns with the guest stopped; `finish` starts it again."""
        assert self.stream is not None
        await self.wait_request()
        self._requested = False
        stream = self.stream

        def step():
            t0 = time.perf_counter()
            stream.begin()
            self.open_checkpoint = True
            begin_s = time.perf_counter() - t0
            cp = stream.read_checkpoint()
            cp.begin_s = begin_s
            return cp, (work(cp) if work is not None else None)

        return await asyncio.to_thread(step)

    def finish(self) -> None:
        """QEMU starts the guest again (two 4-byte messages: sent from the caller's thread)."""
        assert self.stream is not None
        self.stream.finish()
        self.open_checkpoint = False

    def device_state(self, cp: Checkpoint) -> bytes:
        return device_stream(self.device_header, cp.device_blob)

    async def end(self) -> None:
        """Leave COLO: QEMU fails over to running alone (a stopped guest runs again), the
        capabilities go back to the ordinary checkpoint's."""
        sock, self._sock, self.stream = self._sock, None, None
        self.open_checkpoint = self._requested = False
        try:
            await self.guest.end_colo()
        finally:
            if sock is not None:
                sock.close()
