"""The output gate: the guest's network output is released only after the standby
has acknowledged the checkpoint that produced it.

The guest's NIC is a QEMU ``-netdev stream,server=on`` on a UNIX socket this gate
connects to, and reconnects to after a restart of the service (each frame: 4-byte
big-endian length + Ethernet frame). The gate owns a
TAP device in the site's namespace that carries the guest's traffic to and from the
site's uplink. Inbound frames (TAP → guest) go through at once. Outbound frames
(guest → TAP) are tagged with the epoch they were read in and held until
``release(epoch)``. ``seal(N)`` is called while the vCPUs are stopped for epoch N's
checkpoint: every frame read before belongs to N or earlier; any frame read after
belongs to a later epoch (the safe side, since it may have left the guest after the
pause began).

Memory is bounded both ways: outbound frames held (HOLD, or OPEN before the HA layer
allows output) stop at `max_held_bytes`, and inbound frames queued toward a guest whose
QEMU does not read stop at `max_to_guest_bytes`; what does not fit is dropped (like a
full link: TCP in the guest and at the client retransmits) and counted per reason in
`GateStats`.

Pass-through (off unless flows are configured): in HOLD, guest output of the configured UDP
flows (`pass_through`: source-port ranges; IPv4 and IPv6, unfragmented) leaves at once
instead of waiting for its epoch's commit, while the HA layer allows output and the policy
turned it on (`set_pass_through`); everything else stays held. Media released this way may
be repeated after a failover (the resumed guest replays what it sent since the last
committed epoch). `udp_source_port` is the classifier: bytes in, a port or None, never an
exception.

Inbound frames can be held too (a planned switchover, replication/primary.py `handover()`):
from the final epoch's pause on, frames for the guest are not written into the socket of a
QEMU that will never run again; they are held (bounded by `max_inbound_hold_bytes`, counted)
and either handed to a sink (`forward_inbound`: sent to the site that resumes the guest) or,
when the handover is abandoned, given to this guest after all (`end_inbound_hold(deliver=True)`).
The site that resumes the guest holds its own inbound frames from the switchover on, puts the
frames the old site forwarded in front of them (`inject_inbound`) and delivers both in that
order once the guest runs (`end_inbound_hold(deliver=True)`, on the guest's connection if it
is not connected yet).

Output needs the HA layer's permission, `allow(True, until=...)`: `until` is the
lease's deadline on CLOCK_BOOTTIME (seconds; `boottime()`), checked at the moment a
frame would leave, not only at the HA tick, so a site whose lease ran out sends
nothing more even if its HA loop is late. `allow(True)` without `until` has no deadline
(a site without a witness).

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
from typing import Callable

import structlog

log = structlog.get_logger(__name__)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65536 + 64
DEFAULT_MAX_HELD_BYTES = 64 << 20
DEFAULT_MAX_TO_GUEST_BYTES = 4 << 20  # a few checkpoint pauses of inbound traffic at 1 Gbit/s
DEFAULT_MAX_INBOUND_HOLD_BYTES = 4 << 20  # inbound held through a handover (a few hundred ms at most)
ETH_HLEN = 14
ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_VLAN = (0x8100, 0x88A8)
IPPROTO_UDP = 17


def boottime() -> float:
    """CLOCK_BOOTTIME in seconds: monotonic and counting through a suspend, the clock of `allow(until=)`."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def udp_source_port(frame: bytes) -> int | None:
    """The UDP source port of an Ethernet frame carrying an unfragmented IPv4 or IPv6 UDP
    datagram (one VLAN tag allowed), else None (other protocols, fragments, IPv6 extension
    headers, anything short or malformed)."""
    n = len(frame)
    if n < ETH_HLEN:
        return None
    off = 12
    ethertype = (frame[off] << 8) | frame[off + 1]
    if ethertype in ETHERTYPE_VLAN:
        if n < ETH_HLEN + 4:
            return None
        off += 4
        ethertype = (frame[off] << 8) | frame[off + 1]
    ip = off + 2
    if ethertype == ETHERTYPE_IPV4:
        if n < ip + 20 or frame[ip] >> 4 != 4 or frame[ip + 9] != IPPROTO_UDP:
            return None
        ihl = (frame[ip] & 0x0F) * 4
        if ihl < 20 or (frame[ip + 6] & 0x3F) or frame[ip + 7]:  # options too short; MF or an offset: a fragment
            return None
        udp = ip + ihl
    elif ethertype == ETHERTYPE_IPV6:
        if n < ip + 40 or frame[ip] >> 4 != 6 or frame[ip + 6] != IPPROTO_UDP:
            return None
        udp = ip + 40
    else:
        return None
    if n < udp + 8:
        return None
    return (frame[udp] << 8) | frame[udp + 1]


def port_matcher(ranges) -> Callable[[int], bool]:
    """A test for "port in one of `ranges`" ((low, high) pairs, inclusive)."""
    ports = frozenset(p for lo, hi in ranges for p in range(lo, hi + 1))
    return ports.__contains__


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
    frames_passed_through: int = 0  # outbound frames of a pass-through flow released before their epoch committed
    frames_dropped: int = 0  # all drops; the dropped_* fields say why
    dropped_to_guest: int = 0  # inbound: the guest's QEMU does not read and its queue is at the cap
    dropped_no_guest: int = 0  # inbound: no guest connected (e.g. between two QEMUs at a resume)
    dropped_held_cap: int = 0  # outbound: the hold is at max_held_bytes
    dropped_fenced: int = 0  # outbound: fenced (arrived while fenced, or held when the fence came)
    dropped_tap: int = 0  # outbound: the TAP would block or is gone
    withheld_lease_expired: int = 0  # times output was due to leave but the lease deadline had passed
    epochs_released: int = 0
    inbound_held: int = 0  # inbound frames held now (a handover), not yet delivered or forwarded
    inbound_held_bytes: int = 0
    inbound_forwarded: int = 0  # inbound frames handed to the forward sink (sent to the peer)
    inbound_injected: int = 0  # frames the peer forwarded, put in front of this site's inbound
    dropped_inbound_hold_cap: int = 0  # inbound: held at max_inbound_hold_bytes
    dropped_inbound_hold: int = 0  # inbound: held, and this site stopped running the guest
    last_release_delay_ms: float = 0.0
    max_release_delay_ms: float = 0.0
    # The last release, counted from the guest's resume after its epoch's pause: when in the
    # next epoch the clients whose replies it let out can send again (None: not known yet).
    last_release_offset_ms: float | None = None
    # The sealed epoch's quiet tail: from its last held frame to the moment its pause began
    # (`stopping`; the seal if no pause was announced); 0 when frames came after that moment (the
    # stop cut the output off). None: it held none.
    last_quiet_ms: float | None = None
    # How long the guest ran, in the sealed epoch and the one before it, from the last release
    # that let frames out (the clients' next requests) to its last held frame (`reply_time`);
    # None: it held none, or no such release came in those two epochs.
    last_reply_ms: float | None = None
    # ... and its burst: from its first held frame to its last (None: it held none). Short against
    # the interval: the guest answered what a release let in, then waited (clients in step with
    # the releases); long: output all through the epoch (many clients, or a sender that never stops).
    last_burst_ms: float | None = None

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def reply_time(last_held: float, let_in, resumed: float | None, prev_stop: float | None,
               prev_resumed: float | None) -> float | None:
    """How long (ms) the guest ran from the release that let its clients' requests in to its last
    held frame of the epoch that began at `resumed` (all times monotonic seconds): the release is
    the latest of `let_in` (releases that let frames out) at or before that frame. A release in
    the epoch before (from `prev_resumed` to `prev_stop`) counts the guest's run in both epochs,
    not the pause between them; one during that pause, the run from `resumed`. None when no such
    release came since `prev_resumed` (the frames answer older requests, or none: a timer, an
    ARP) or the epochs' edges are not known yet."""
    if resumed is None:
        return None
    at = max((t for t in let_in if t <= last_held), default=None)
    if at is None:
        return None
    if at >= resumed:
        run = last_held - at
    elif prev_stop is not None and prev_resumed is not None and at >= prev_resumed and prev_stop <= resumed:
        run = max(prev_stop - at, 0.0) + (last_held - resumed)
    else:
        return None
    return max(run, 0.0) * 1000


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
    """Interface of an output gate backend: everything the site service calls.

    Frames the guest sends are tagged with the epoch they were read in; `seal(N)` (vCPUs
    stopped) ends epoch N; `release(N)` (the standby committed N) lets epochs <= N leave,
    in order, if and while the HA layer allows it (`allow`). The mode says what happens
    to output at all: OPEN passes it (when allowed), HOLD keeps it for `release`, FENCED
    drops it.
    """

    mode: GateMode
    allowed: bool  # the HA layer's word: this site may release output
    until: float | None  # the lease deadline (CLOCK_BOOTTIME seconds) output must not outlive
    stats: GateStats
    # Called (on the event loop, from the relay) when the open epoch holds its first frame: the
    # epoch loop ends an epoch the pacer lengthened for an idle guest early (replication/primary.py).
    on_first_held: Callable[[], None] | None = None

    @property
    def first_held_at(self) -> float | None:
        """When (time.monotonic()) the open epoch held its first frame; None: it holds none yet
        (a backend that does not track it never wakes the epoch loop)."""
        return None

    async def start(self) -> None:
        """Begin relaying (attach to the network; the guest's NIC comes with `attach_guest`)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop relaying; held frames are lost."""
        raise NotImplementedError

    def attach_guest(self, path: Path) -> None:
        """Relay the guest whose NIC listens on `path` (dialled again after any drop)."""
        raise NotImplementedError

    def detach_guest(self) -> None:
        """No guest any more (it stopped, or this site demotes)."""
        raise NotImplementedError

    def seal(self, epoch: int) -> None:
        """With the vCPUs stopped for `epoch`: every frame read so far belongs to `epoch` or earlier."""
        raise NotImplementedError

    def stopping(self) -> None:
        """The pause of the open epoch begins now (the guest is being stopped): its quiet tail and
        reply time count to here, not to the seal (which in COLO comes after the RAM's transfer)."""

    def resumed(self) -> None:
        """The guest runs again after the pause of the epoch last sealed: the next epoch begins."""

    def release(self, epoch: int) -> None:
        """The standby committed `epoch`: frames of epochs <= `epoch` may leave (if allowed, before `until`)."""
        raise NotImplementedError

    def allow(self, allowed: bool, until: float | None = None) -> None:
        """The HA layer's permission to release output, up to the lease deadline `until`
        (CLOCK_BOOTTIME seconds; None: no deadline). Acks are recorded while withheld."""
        raise NotImplementedError

    def set_mode(self, mode: GateMode) -> None:
        """OPEN, HOLD or FENCED (fencing discards what is held)."""
        raise NotImplementedError

    def set_pass_through(self, on: bool) -> None:
        """In HOLD, release frames of the configured pass-through flows at once (if allowed)."""
        raise NotImplementedError

    @property
    def current_epoch(self) -> int:
        """The epoch a frame read now belongs to."""
        raise NotImplementedError

    def held_epochs(self) -> int:
        """How many epochs have frames waiting."""
        raise NotImplementedError

    def hold_inbound(self) -> None:
        """From now on inbound frames are held (bounded), not given to the guest (a handover)."""
        raise NotImplementedError

    def forward_inbound(self, sink: Callable[[list[bytes]], None] | None) -> None:
        """While holding: the held frames go to `sink` now, in order, and each later inbound frame
        at once. None: hold them here again (the sink's channel is gone)."""
        raise NotImplementedError

    def inject_inbound(self, frames: list[bytes]) -> None:
        """Frames for the guest that reached the peer: delivered ahead of those held here (at once
        when nothing is held)."""
        raise NotImplementedError

    def end_inbound_hold(self, deliver: bool) -> int:
        """Inbound passes again; what is held goes to the guest in order (`deliver`, as soon as it
        is connected) or is dropped and counted. Returns how many frames were held."""
        raise NotImplementedError


class UserspaceGate(Gate):
    """Relays frames between QEMU's stream socket and a TAP fd, holding output per epoch."""

    def __init__(self, socket_path: Path | None, tap_fd: int, *, mode: GateMode = GateMode.HOLD,
                 max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
                 max_to_guest_bytes: int = DEFAULT_MAX_TO_GUEST_BYTES,
                 max_inbound_hold_bytes: int = DEFAULT_MAX_INBOUND_HOLD_BYTES,
                 clock: Callable[[], float] = boottime, pass_through: tuple[tuple[int, int], ...] = ()):
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.tap_fd = tap_fd
        self.mode = mode
        self.max_held_bytes = max_held_bytes
        self.max_to_guest_bytes = max_to_guest_bytes
        self.max_inbound_hold_bytes = max_inbound_hold_bytes
        self.stats = GateStats()
        self.pass_through = tuple(pass_through)  # UDP source-port ranges released at once in HOLD
        self._passes = port_matcher(self.pass_through)
        self._pass_on = False  # the policy's word (set_pass_through): only while a session commits
        # Held frames: deque of (epoch, frame). Frames read now are tagged `self._epoch`.
        self._held: deque[tuple[int, bytes]] = deque()
        self._epoch = 0  # epoch the next frame read belongs to
        self._committed = -1  # newest epoch the standby acknowledged
        self._released_upto = -1  # newest epoch whose frames were let out
        self.allowed = True  # the HA layer's word: this site may release output (holds the lease)
        self.until: float | None = None  # ... until this CLOCK_BOOTTIME second (None: no deadline)
        self._clock = clock
        self._expiry_logged = False  # one log line per deadline passed
        self._guest_full_logged = False  # one log line per episode of a guest not reading
        self._sealed_at: dict[int, float] = {}
        self._last_held_at: float | None = None  # the current epoch's latest held frame (monotonic)
        self._first_held_at: float | None = None  # ... and its first
        # The pauses' edges (monotonic): this epoch's and the one before it (`reply_time`), the
        # resume after each sealed epoch (a release's offset), and the releases that let frames out.
        self._stop_at: float | None = None
        self._prev_stop_at: float | None = None
        self._resumed_at: float | None = None
        self._prev_resumed_at: float | None = None
        self._resumed_after: dict[int, float] = {}
        self._let_in: deque[float] = deque(maxlen=8)
        self._target: Path | None = None  # the guest NIC's socket this gate connects to
        self._connector: asyncio.Task | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Inbound hold (a handover): frames toward the guest wait here, or go to the sink.
        self._in_held: deque[bytes] = deque()
        self._in_holding = False
        self._in_sink: Callable[[list[bytes]], None] | None = None
        self._in_deliver_on_connect = False  # released while no guest was connected: on connection

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.tap_fd, self._on_tap_readable)
        log.info("gate.start", mode=self.mode.value)
        if self.socket_path is not None:
            self.attach_guest(self.socket_path)

    def attach_guest(self, path: Path) -> None:
        """Connect to the guest NIC's stream socket (QEMU `-netdev stream,server=on`), and keep
        reconnecting while it is the guest of this site. QEMU is the server so that the guest
        does not depend on this process: a restarted service connects again to the same QEMU."""
        path = Path(path)
        if self._target == path and self._connector is not None and not self._connector.done():
            return
        self.detach_guest()
        self._target = path
        self.socket_path = path
        self._connector = asyncio.get_running_loop().create_task(self._connect_loop(path), name="gate.connect")

    def detach_guest(self) -> None:
        self._target = None
        if self._connector is not None:
            self._connector.cancel()
            self._connector = None
        if self._writer is not None:
            self._writer.close()

    async def _connect_loop(self, path: Path) -> None:
        announced = False
        while self._target == path:
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as e:
                if not announced:
                    log.info("gate.guest_waiting", socket=str(path), error=e.strerror)
                    announced = True
                await asyncio.sleep(0.05)
                continue
            announced = False
            await self._on_guest(reader, writer)
            if self._target == path:
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._loop:
            self._loop.remove_reader(self.tap_fd)
        self.detach_guest()

    async def wait_guest(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    # -- guest side ------------------------------------------------------
    async def _on_guest(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()  # a new QEMU (a resume) replaces the old connection
        self._writer = writer
        self._connected.set()
        log.info("gate.guest_connected")
        if self._in_deliver_on_connect:
            self._deliver_held()
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
        if mode is GateMode.FENCED:
            self._drop("dropped_fenced")
        elif mode is GateMode.HOLD and self._pass_on and self._is_pass_through(frame) and self._may_send():
            self.stats.frames_passed_through += 1
            self._to_tap(frame)
        elif mode is GateMode.OPEN and self._may_send():
            if self._held:  # what waited (not yet allowed, or past a deadline) leaves first
                self._flush()
            self._to_tap(frame)
        else:  # HOLD, or OPEN while not allowed: held, released by release() / allow()
            self._hold(frame)

    def _is_pass_through(self, frame: bytes) -> bool:
        port = udp_source_port(frame)
        return port is not None and self._passes(port)

    def _hold(self, frame: bytes) -> None:
        if self.stats.bytes_held + len(frame) > self.max_held_bytes:
            self._drop("dropped_held_cap")  # like a full link: the guest's TCP retransmits
            return
        self._held.append((self._epoch, frame))
        self._last_held_at = time.monotonic()
        self.stats.frames_held += 1
        self.stats.bytes_held += len(frame)
        if self._first_held_at is None:
            self._first_held_at = self._last_held_at
            if self.on_first_held is not None:
                self.on_first_held()

    def _drop(self, reason: str, n: int = 1) -> None:
        self.stats.frames_dropped += n
        setattr(self.stats, reason, getattr(self.stats, reason) + n)

    def _to_tap(self, frame: bytes) -> None:
        try:
            os.write(self.tap_fd, frame)
            self.stats.frames_out += 1
            self.stats.bytes_out += len(frame)
        except BlockingIOError:
            self._drop("dropped_tap")
        except OSError as e:  # TAP down (site being torn down): count, don't crash the relay
            self._drop("dropped_tap")
            log.debug("gate.tap_write_failed", error=str(e))

    def _may_send(self) -> bool:
        """Allowed, and the lease deadline (if any) not passed: read now, at the moment output leaves."""
        if not self.allowed:
            return False
        if self.until is None:
            return True
        now = self._clock()
        if now < self.until:
            return True
        self.stats.withheld_lease_expired += 1
        if not self._expiry_logged:
            self._expiry_logged = True
            log.warning("gate.lease_expired", until=round(self.until, 3), overdue_ms=round((now - self.until) * 1000, 1),
                        held_frames=len(self._held), hint="output is withheld until the lease is renewed")
        return False

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
            self._inbound(frame)

    def _inbound(self, frame: bytes) -> None:
        if self._in_sink is not None:
            self.stats.inbound_forwarded += 1
            self._in_sink([frame])
        elif self._in_holding:
            self._hold_in(frame)
        else:
            self._to_guest(frame)

    def _to_guest(self, frame: bytes) -> None:
        w = self._writer
        if w is None or w.is_closing():
            self._drop("dropped_no_guest")
            return
        queued = w.transport.get_write_buffer_size()
        if queued + 4 + len(frame) > self.max_to_guest_bytes:
            self._drop("dropped_to_guest")
            if not self._guest_full_logged:
                self._guest_full_logged = True
                log.warning("gate.guest_not_reading", queued_bytes=queued, cap=self.max_to_guest_bytes,
                            hint="inbound frames are dropped until the guest's QEMU reads again")
            return
        self._guest_full_logged = False
        w.write(struct.pack(">I", len(frame)) + frame)

    # -- epochs ----------------------------------------------------------
    def seal(self, epoch: int) -> None:
        """Called with the vCPUs stopped for epoch `epoch`: frames read so far are <= epoch."""
        now = self._sealed_at[epoch] = time.monotonic()
        t = self._last_held_at
        stop = self._stop_at if self._stop_at is not None and (self._resumed_at or 0.0) <= self._stop_at else now
        self.stats.last_quiet_ms = None if t is None else max(stop - t, 0.0) * 1000
        self.stats.last_burst_ms = None if t is None else (t - self._first_held_at) * 1000
        self.stats.last_reply_ms = None if t is None else reply_time(
            t, self._let_in, self._resumed_at, self._prev_stop_at, self._prev_resumed_at)
        self._last_held_at = self._first_held_at = None
        self._epoch = epoch + 1

    def stopping(self) -> None:
        self._prev_stop_at, self._stop_at = self._stop_at, time.monotonic()

    def resumed(self) -> None:
        now = time.monotonic()
        self._prev_resumed_at, self._resumed_at = self._resumed_at, now
        self._resumed_after[self._epoch - 1] = now
        for e in [e for e in self._resumed_after if e < self._epoch - 16]:
            del self._resumed_after[e]

    def allow(self, allowed: bool, until: float | None = None) -> None:
        """Release permission from the HA layer, up to the lease deadline `until` (CLOCK_BOOTTIME
        seconds, see `boottime()`; None: no deadline). While withheld, acks are recorded, nothing
        leaves; a later allow (a renewed lease) releases what is due."""
        self.allowed = allowed
        if until != self.until:
            self._expiry_logged = False
        self.until = until if allowed else None
        if allowed and self.mode is GateMode.OPEN:
            if self._held and self._may_send():
                self._flush()
        elif allowed and self._committed >= 0:
            self.release(self._committed)

    def release(self, epoch: int) -> None:
        """The standby committed `epoch`: send every held frame of epochs <= epoch, in order."""
        self._committed = max(self._committed, epoch)
        if not self._may_send():
            return
        held = self._held
        now = time.monotonic()
        if held and held[0][0] <= epoch:
            self._let_in.append(now)  # replies leave: the clients' next requests come after this
        while held and held[0][0] <= epoch:
            _, frame = held.popleft()
            self.stats.frames_held -= 1
            self.stats.bytes_held -= len(frame)
            self._to_tap(frame)
        t = self._sealed_at.pop(epoch, None)
        for e in [e for e in self._sealed_at if e < epoch]:
            del self._sealed_at[e]
        if t is not None:
            ms = (now - t) * 1000
            self.stats.last_release_delay_ms = ms
            self.stats.max_release_delay_ms = max(self.stats.max_release_delay_ms, ms)
            r = self._resumed_after.pop(epoch, None)
            if r is not None:
                self.stats.last_release_offset_ms = max(now - r, 0.0) * 1000
        if epoch > self._released_upto:  # a permission renewed re-releases: count each epoch once
            self.stats.epochs_released += 1
            self._released_upto = epoch

    def set_mode(self, mode: GateMode) -> None:
        if mode is self.mode:
            return
        log.info("gate.mode", old=self.mode.value, new=mode.value, held_frames=len(self._held))
        self.mode = mode
        if mode is GateMode.FENCED:
            self._discard("dropped_fenced")
        elif mode is GateMode.OPEN and self._held and self._may_send():
            # Leaving protection (continue-unprotected): what was held goes out in order.
            self._flush()

    def set_pass_through(self, on: bool) -> None:
        on = bool(on and self.pass_through)
        if on != self._pass_on:
            log.info("gate.pass_through", on=on, flows=[f"udp:{lo}-{hi}" for lo, hi in self.pass_through])
        self._pass_on = on

    def _flush(self) -> None:
        while self._held:
            _, frame = self._held.popleft()
            self._to_tap(frame)
        self.stats.frames_held = self.stats.bytes_held = 0

    def _discard(self, reason: str) -> None:
        if self._held:
            self._drop(reason, len(self._held))
        self._held.clear()
        self.stats.frames_held = self.stats.bytes_held = 0

    # -- inbound hold (a handover) ----------------------------------------
    def hold_inbound(self) -> None:
        if not self._in_holding:
            log.info("gate.inbound_hold")
        self._in_holding = True
        self._in_deliver_on_connect = False

    def forward_inbound(self, sink: Callable[[list[bytes]], None] | None) -> None:
        if sink is not None:
            self.hold_inbound()  # forwarding implies that nothing goes to this guest any more
        self._in_sink = sink
        if sink is not None and self._in_held:
            frames = list(self._in_held)
            self._in_held.clear()
            self.stats.inbound_held = self.stats.inbound_held_bytes = 0
            self.stats.inbound_forwarded += len(frames)
            sink(frames)

    def inject_inbound(self, frames: list[bytes]) -> None:
        self.stats.inbound_injected += len(frames)
        if not self._in_holding:
            for f in frames:
                self._to_guest(f)
            return
        keep = self._in_held  # the peer's frames are older: they go first, this site's after them
        self._in_held = deque()
        self.stats.inbound_held = self.stats.inbound_held_bytes = 0
        for f in list(frames) + list(keep):
            self._hold_in(f)

    def end_inbound_hold(self, deliver: bool) -> int:
        n = len(self._in_held)
        was = self._in_holding
        self._in_sink = None
        if not deliver:
            if n:
                self._drop("dropped_inbound_hold", n)
            self._in_held.clear()
            self.stats.inbound_held = self.stats.inbound_held_bytes = 0
            self._in_holding = self._in_deliver_on_connect = False
        elif self._writer is None or self._writer.is_closing():
            self._in_deliver_on_connect = True  # keeps holding (in order) until the guest connects
        else:
            self._deliver_held()
        if was:
            log.info("gate.inbound_hold_end", deliver=deliver, frames=n,
                     pending_connection=self._in_deliver_on_connect)
        return n

    def _hold_in(self, frame: bytes) -> None:
        if self.stats.inbound_held_bytes + len(frame) > self.max_inbound_hold_bytes:
            self._drop("dropped_inbound_hold_cap")  # like a full link: the client retransmits
            return
        self._in_held.append(frame)
        self.stats.inbound_held += 1
        self.stats.inbound_held_bytes += len(frame)

    def _deliver_held(self) -> None:
        self._in_holding = self._in_deliver_on_connect = False
        held, self._in_held = self._in_held, deque()
        self.stats.inbound_held = self.stats.inbound_held_bytes = 0
        for f in held:
            self._to_guest(f)

    @property
    def current_epoch(self) -> int:
        return self._epoch

    @property
    def first_held_at(self) -> float | None:
        return self._first_held_at

    def held_epochs(self) -> int:
        return len({e for e, _ in self._held})
