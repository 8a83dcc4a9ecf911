"""The output gate: the guest's network output is released only after the standby
has acknowledged the checkpoint that produced it.

The guest's NIC is a QEMU ``-netdev stream`` connected to a UNIX socket this gate
listens on (each frame: 4-byte big-endian length + Ethernet frame). The gate owns a
TAP device in the site's namespace that carries the guest's traffic to and from the
site's uplink. Inbound frames (TAP → guest) go through at once. Outbound frames
(guest → TAP) are tagged with the epoch they were read in and held until
``release(epoch)``. ``seal(N)`` is called while the vCPUs are stopped for epoch N's
checkpoint: every frame read before belongs to N or earlier; any frame read after
belongs to a later epoch (the safe side, since it may have left the guest after the
pause began).

`Gate` is the interface; `UserspaceGate` is the implementation used here (this
kernel has no ``sch_plug``; a plug-qdisc backend would implement the same methods).
"""

from __future__ import annotations

import asyncio
import enum
import fcntl
import os
import struct
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536 + 64


class GateMode(enum.Enum):
    OPEN = "open"  # pass-through: the only copy of the guest (active, unprotected)
    HOLD = "hold"  # output commit: frames wait for the standby's ack
    FENCED = "fenced"  # this site must release nothing: frames are dropped


@dataclass
class GateStats:
    frames_in: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    frames_held: int = 0
    bytes_held: int = 0
    frames_dropped: int = 0
    epochs_released: int = 0
    last_release_delay_ms: float = 0.0
    max_release_delay_ms: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def open_tap(name: str) -> int:
    """Create (or attach to) TAP device `name` in the current netns; returns a non-blocking fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


class Gate:
    """Interface of an output gate backend."""

    mode: GateMode

    def seal(self, epoch: int) -> None: ...
    def release(self, epoch: int) -> None: ...
    def set_mode(self, mode: GateMode) -> None: ...


class UserspaceGate(Gate):
    """Relays frames between QEMU's stream socket and a TAP fd, holding output per epoch."""

    def __init__(self, socket_path: Path, tap_fd: int, *, mode: GateMode = GateMode.HOLD,
                 max_held_bytes: int = 64 << 20):
        self.socket_path = Path(socket_path)
        self.tap_fd = tap_fd
        self.mode = mode
        self.max_held_bytes = max_held_bytes
        self.stats = GateStats()
        # Held frames: deque of (epoch, frame). Frames read now are tagged `self._epoch`.
        self._held: deque[tuple[int, bytes]] = deque()
        self._epoch = 0  # epoch the next frame read belongs to
        self._committed = -1  # newest epoch the standby acknowledged
        self.allowed = True  # the HA layer's word: this site may release output (holds the lease)
        self._sealed_at: dict[int, float] = {}
        self._server: asyncio.AbstractServer | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_guest, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        self._loop.add_reader(self.tap_fd, self._on_tap_readable)
        log.info("gate.start", socket=str(self.socket_path), mode=self.mode.value)

    async def close(self) -> None:
        if self._loop:
            self._loop.remove_reader(self.tap_fd)
        if self._writer:
            self._writer.close()
        if self._server:
            self._server.close()
        self.socket_path.unlink(missing_ok=True)

    async def wait_guest(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # -- guest side ------------------------------------------------------
    async def _on_guest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()  # a new QEMU (resume) replaces the old connection
        self._writer = writer
        self._connected.set()
        log.info("gate.guest_connected")
        try:
            while True:
                hdr = await reader.readexactly(4)
                (n,) = struct.unpack(">I", hdr)
                if n > MAX_FRAME:
                    log.error("gate.bad_frame", length=n)
                    break
                self._outbound(await reader.readexactly(n))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if self._writer is writer:
                self._writer = None
                self._connected.clear()
            writer.close()
            log.info("gate.guest_disconnected")

    def _outbound(self, frame: bytes) -> None:
        mode = self.mode
        if mode is GateMode.OPEN and self.allowed:
            self._to_tap(frame)
        elif mode is GateMode.OPEN:
            self._held.append((self._epoch, frame))  # not yet allowed: hold, release on allow()
            self.stats.frames_held += 1
            self.stats.bytes_held += len(frame)
        elif mode is GateMode.HOLD:
            if self.stats.bytes_held + len(frame) > self.max_held_bytes:
                self.stats.frames_dropped += 1  # like a full link: the guest's TCP retransmits
                return
            self._held.append((self._epoch, frame))
            self.stats.frames_held += 1
            self.stats.bytes_held += len(frame)
        else:
            self.stats.frames_dropped += 1

    def _to_tap(self, frame: bytes) -> None:
        try:
            os.write(self.tap_fd, frame)
            self.stats.frames_out += 1
            self.stats.bytes_out += len(frame)
        except BlockingIOError:
            self.stats.frames_dropped += 1
        except OSError as e:  # TAP down (site being torn down): count, don't crash the relay
            self.stats.frames_dropped += 1
            log.debug("gate.tap_write_failed", error=str(e))

    # -- network side ----------------------------------------------------
    def _on_tap_readable(self) -> None:
        for _ in range(64):
            try:
                frame = os.read(self.tap_fd, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:
                return
            self.stats.frames_in += 1
            w = self._writer
            if w is not None and not w.is_closing():
                w.write(struct.pack(">I", len(frame)) + frame)

    # -- epochs ----------------------------------------------------------
    def seal(self, epoch: int) -> None:
        """Called with the vCPUs stopped for epoch `epoch`: frames read so far are <= epoch."""
        self._sealed_at[epoch] = time.monotonic()
        self._epoch = epoch + 1

    def allow(self, allowed: bool) -> None:
        """Release permission from the HA layer. While withheld, acks are recorded, nothing leaves."""
        self.allowed = allowed
        if allowed and self.mode is GateMode.OPEN:
            self._flush()
        elif allowed and self._committed >= 0:
            self.release(self._committed)

    def release(self, epoch: int) -> None:
        """The standby committed `epoch`: send every held frame of epochs <= epoch, in order."""
        self._committed = max(self._committed, epoch)
        if not self.allowed:
            return
        held = self._held
        while held and held[0][0] <= epoch:
            _, frame = held.popleft()
            self.stats.frames_held -= 1
            self.stats.bytes_held -= len(frame)
            self._to_tap(frame)
        t = self._sealed_at.pop(epoch, None)
        for e in [e for e in self._sealed_at if e < epoch]:
            del self._sealed_at[e]
        if t is not None:
            ms = (time.monotonic() - t) * 1000
            self.stats.last_release_delay_ms = ms
            self.stats.max_release_delay_ms = max(self.stats.max_release_delay_ms, ms)
        self.stats.epochs_released += 1

    def set_mode(self, mode: GateMode) -> None:
        if mode is self.mode:
            return
        log.info("gate.mode", old=self.mode.value, new=mode.value, held_frames=len(self._held))
        if mode is GateMode.FENCED:
            self.stats.frames_dropped += len(self._held)
            self._held.clear()
            self.stats.frames_held = self.stats.bytes_held = 0
        elif mode is GateMode.OPEN and self._held and self.allowed:
            # Leaving protection (continue-unprotected): what was held goes out in order.
            self._flush()
        self.mode = mode

    def _flush(self) -> None:
        while self._held:
            _, frame = self._held.popleft()
            self._to_tap(frame)
        self.stats.frames_held = self.stats.bytes_held = 0

    def open_after_resume(self) -> None:
        """At the standby after takeover: the resumed guest is the only copy; output flows."""
        self._held.clear()
        self.stats.frames_held = self.stats.bytes_held = 0
        self.mode = GateMode.OPEN

    @property
    def current_epoch(self) -> int:
        return self._epoch

    def held_epochs(self) -> int:
        return len({e for e, _ in self._held})
