"""What both ends of a replication session share: the hello, the session key, link measurements."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import structlog
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replication.tcpinfo import TcpInfo
from replication.transport import ChannelError, MsgType

log = structlog.get_logger(__name__)

BLOCK_PAGES = 16  # resync granularity: 64 KiB blocks
HEARTBEAT = struct.Struct(">QQQ")  # seq, sender's monotonic ns, sender's lease generation
# The extended heartbeat appends the sender's upstream: u32 flags (bit 0: reported), u32 ms some
# BGP session has been up there without a break (0: none up; saturates). Sent only to a peer whose
# HELLO / HELLO_REPLY carries HELLO_UPSTREAM_KEY; read in either form (an older peer sends 24 bytes).
HEARTBEAT_UPSTREAM = struct.Struct(">II")
HEARTBEAT_EXT_SIZE = HEARTBEAT.size + HEARTBEAT_UPSTREAM.size
HELLO_UPSTREAM_KEY = "heartbeat_upstream"
_U32_MAX = 0xFFFFFFFF


def heartbeat_payload(seq: int, sent_ns: int, generation: int, upstream=False) -> bytes:
    """A HEARTBEAT's payload: the 24-byte form, or (`upstream` not False: a peer that reads it) the
    32-byte form with the sender's upstream-up ms (None: not reported)."""
    base = HEARTBEAT.pack(seq, sent_ns, generation)
    if upstream is False:
        return base
    if upstream is None:
        return base + HEARTBEAT_UPSTREAM.pack(0, 0)
    return base + HEARTBEAT_UPSTREAM.pack(1, min(_U32_MAX, max(0, int(upstream))))


def parse_heartbeat(payload: bytes) -> tuple[int, int, int, int | None]:
    """(seq, sender's ns, generation, upstream-up ms or None); ValueError for any other size."""
    if len(payload) == HEARTBEAT.size:
        return (*HEARTBEAT.unpack(payload), None)
    if len(payload) == HEARTBEAT_EXT_SIZE:
        seq, ns, gen = HEARTBEAT.unpack_from(payload)
        flags, up_ms = HEARTBEAT_UPSTREAM.unpack_from(payload, HEARTBEAT.size)
        return seq, ns, gen, (up_ms if flags & 1 else None)
    raise ValueError(f"{len(payload)} bytes")


def new_nonce() -> bytes:
    return os.urandom(16)


def session_key(primary_nonce: bytes, standby_nonce: bytes) -> bytes:
    """The checkpoint-frame key of one session, from both sides' nonces (exchanged inside TLS)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"geomirror checkpoint frames v1").derive(primary_nonce + standby_nonce)


def compat_mismatch(ours: dict, theirs: dict) -> str | None:
    """One sentence naming every guest-configuration field that differs, with both values."""
    keys = sorted(set(ours) | set(theirs))
    diffs = [f"{k}: ours {ours.get(k)!r}, theirs {theirs.get(k)!r}" for k in keys if ours.get(k) != theirs.get(k)]
    return "incompatible guest configuration (" + "; ".join(diffs) + ")" if diffs else None


def detection_timeout_ms(srtt_ms: float | None, rttvar_ms: float, heartbeat_ms: float, min_ms: float,
                         max_ms: float, *, k: float = 4.0, missed: int = 3) -> float:
    """How long silence must last before the peer counts as lost: srtt + k·rttvar + `missed`
    heartbeat intervals, clamped to [min, max]; the maximum before the first RTT sample.
    The one formula: both ends of a session and the HA machine use it."""
    if srtt_ms is None:
        return max_ms
    return max(min_ms, min(max_ms, srtt_ms + k * rttvar_ms + missed * heartbeat_ms))


LATE_TOLERANCE_S = 0.05  # a watchdog sleep that overruns by more than this was the loop's own delay


def own_lateness(asked_s: float, slept_s: float, tolerance_s: float = LATE_TOLERANCE_S) -> float:
    """How much of a sleep was the sleeper's own lateness: the overrun beyond `asked_s`, when
    it exceeds `tolerance_s` (ordinary scheduling jitter counts as nothing), else 0. A watchdog
    moves its "last heard" forward by it, so a stalled loop is not taken for a silent peer."""
    late = slept_s - asked_s
    return late if late > tolerance_s else 0.0


PATH_WINDOW_S = 10.0  # the path's RTT is the floor of what was measured in this window


@dataclass
class PathRtt:
    """The path's round trip without queueing: the lowest RTT (and, separately, the lowest variance)
    of the samples of the last `window_s` seconds. A floor follows a path that got shorter at once
    and one that got longer within a window, and ignores what queues (our own checkpoints in a
    bottleneck, the channel's write lock, the peer's busy loop) as long as the path is idle once in
    a while, which it is between checkpoints. Pure: the caller gives the time."""

    window_s: float = PATH_WINDOW_S
    samples: deque = field(default_factory=deque)  # (t, rtt_ms, var_ms), oldest first

    def add(self, now: float, rtt_ms: float, var_ms: float = 0.0) -> None:
        self.samples.append((now, rtt_ms, var_ms))
        while len(self.samples) > 1 and self.samples[0][0] < now - self.window_s:
            self.samples.popleft()  # the newest always stays: a stale floor beats none

    @property
    def rtt_ms(self) -> float | None:
        return min((r for _, r, _ in self.samples), default=None)

    @property
    def var_ms(self) -> float:
        return min((v for _, _, v in self.samples), default=0.0)


@dataclass
class LinkStats:
    """Two round trips, for two jobs. The channel's (`rtt_ms`, `rtt_var_ms`): heartbeats timed at
    the application, an EWMA with variance (TCP's estimator); it includes every queue a message
    meets (a heartbeat waits behind a checkpoint frame), which is right for failure detection:
    it is how long the peer takes to answer. The path's (`path`): the floor of the kernel's
    TCP_INFO RTT over a window (replication/tcpinfo.py), or, where there is no TCP_INFO, the floor
    of the heartbeat round trips; the pacer models output latency with it (`pacer_rtt`), since
    its own transfer is a term of its own there. Also achieved bandwidth, dirty rate."""

    rtt_ms: float | None = None
    rtt_var_ms: float = 0.0
    bandwidth_bps: float | None = None  # bytes per second
    dirty_bytes_per_s: float | None = None
    samples: int = 0
    history: list = field(default_factory=list)
    path: PathRtt = field(default_factory=PathRtt)  # from TCP_INFO
    heartbeat_path: PathRtt = field(default_factory=PathRtt)  # floor of heartbeat RTTs: the fallback
    tcp_min_rtt_ms: float | None = None  # the kernel's own minimum (a 300 s window): shown, not used

    def add_rtt(self, ms: float, now: float | None = None) -> None:
        """A heartbeat's round trip."""
        self.samples += 1
        if self.rtt_ms is None:
            self.rtt_ms, self.rtt_var_ms = ms, ms / 2
        else:
            self.rtt_var_ms = 0.75 * self.rtt_var_ms + 0.25 * abs(self.rtt_ms - ms)
            self.rtt_ms = 0.875 * self.rtt_ms + 0.125 * ms
        self.heartbeat_path.add(time.monotonic() if now is None else now, ms)

    def add_tcp_info(self, info: TcpInfo, now: float) -> None:
        """What the kernel says of the channel's connection now. Ignored before TCP has timed a
        segment (an RTT of 0)."""
        if info.rtt_us <= 0:
            return
        self.path.add(now, info.rtt_ms, info.rttvar_ms)
        self.tcp_min_rtt_ms = info.min_rtt_ms

    @property
    def path_source(self) -> str | None:
        """Where `pacer_rtt` comes from: "tcp_info", "heartbeat-floor", or None (nothing yet)."""
        if self.path.samples:
            return "tcp_info"
        return "heartbeat-floor" if self.heartbeat_path.samples else None

    def pacer_rtt(self) -> tuple[float, float]:
        """The pacer's RTT and its variance, ms: the path's, not the channel's (0, 0 before any)."""
        src = self.path if self.path.samples else self.heartbeat_path
        return src.rtt_ms or 0.0, src.var_ms

    def add_transfer(self, nbytes: int, seconds: float) -> None:
        """A checkpoint of `nbytes` took `seconds` from send to ack, RTT included: the path's RTT is
        taken off (the heartbeats' would take off the queue this checkpoint's own bytes made, and
        the transfer came out as nothing). What remains is the transfer and the standby's commit:
        the pacer's transfer term."""
        rtt = self.pacer_rtt()[0] / 1000
        t = max(seconds - rtt, 1e-4)
        if nbytes < 16384:  # too small to say anything about bandwidth
            return
        bw = nbytes / t
        self.bandwidth_bps = bw if self.bandwidth_bps is None else 0.8 * self.bandwidth_bps + 0.2 * bw

    def add_dirty(self, nbytes: int, interval_s: float) -> None:
        if interval_s <= 0:
            return
        r = nbytes / interval_s
        self.dirty_bytes_per_s = r if self.dirty_bytes_per_s is None else 0.8 * self.dirty_bytes_per_s + 0.2 * r

    def detection_timeout_ms(self, min_ms: float, max_ms: float, heartbeat_ms: float) -> float:
        """How long silence must last before the peer counts as lost."""
        return detection_timeout_ms(self.rtt_ms, self.rtt_var_ms, heartbeat_ms, min_ms, max_ms)

    def as_dict(self) -> dict:
        src = self.path_source
        rtt, var = self.pacer_rtt()
        return {
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),  # the channel's (heartbeats)
            "rtt_var_ms": round(self.rtt_var_ms, 3),
            "path_rtt_ms": None if src is None else round(rtt, 3),  # the pacer's
            "path_rtt_var_ms": None if src is None else round(var, 3),
            "path_rtt_source": src,
            "tcp_min_rtt_ms": None if self.tcp_min_rtt_ms is None else round(self.tcp_min_rtt_ms, 3),
            "bandwidth_mbit": None if self.bandwidth_bps is None else round(self.bandwidth_bps * 8 / 1e6, 1),
            "dirty_mb_per_s": None if self.dirty_bytes_per_s is None else round(self.dirty_bytes_per_s / 1e6, 2),
        }


async def on_heartbeat_message(ch, mtype, payload: bytes, link: LinkStats, on_heartbeat) -> bool:
    """Both ends: echo a HEARTBEAT (and report the peer's generation, the link and the peer's
    upstream-up ms, None if not reported: `on_heartbeat(generation, link, upstream_up_ms)`), time
    an ECHO. Returns False for other messages. A heartbeat of the wrong size is a protocol error."""
    if mtype not in (MsgType.HEARTBEAT, MsgType.HEARTBEAT_ECHO):
        return False
    try:
        _, sent_ns, generation, upstream = parse_heartbeat(payload)
    except ValueError:
        raise ChannelError(f"malformed {mtype.name} ({len(payload)} bytes)") from None
    if mtype is MsgType.HEARTBEAT:
        try:
            await ch.send(MsgType.HEARTBEAT_ECHO, payload)
        finally:  # reported even when the echo cannot go: a taking-over standby's last heartbeat
            if on_heartbeat:
                on_heartbeat(generation, link, upstream)
    else:
        link.add_rtt((time.monotonic_ns() - sent_ns) / 1e6)
    return True


async def send_heartbeats(ch, period_s: float, generation_fn, upstream_fn=None) -> None:
    """`upstream_fn` (ms up, or None): only for a peer that said in its hello it reads it."""
    seq = 0
    while True:
        seq += 1
        up = False if upstream_fn is None else upstream_fn()
        await ch.send_heartbeat(heartbeat_payload(seq, time.monotonic_ns(), generation_fn(), up))
        await asyncio.sleep(period_s)


async def run_to_end(fut: asyncio.Future):
    """Await `fut` to its end even if the caller is cancelled meanwhile; then the caller's
    cancellation is raised (the result of `fut` is dropped; an error of it is logged). For units
    that must not be cut short (a checkpoint's pause, a standby's apply); `fut` itself is never
    cancelled."""
    cancelled: asyncio.CancelledError | None = None
    while not fut.done():
        try:
            await asyncio.wait({fut})
        except asyncio.CancelledError as e:
            cancelled = e
    if cancelled is None:
        return fut.result()
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("replication.unit_failed_while_cancelled", error=str(fut.exception()) or repr(fut.exception()))
    raise cancelled
