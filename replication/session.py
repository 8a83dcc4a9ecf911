"""What both ends of a replication session share: the hello, the session key, link measurements."""

from __future__ import annotations

import asyncio
import os
import struct
import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from replication.transport import ChannelError, MsgType

BLOCK_PAGES = 16  # resync granularity: 64 KiB blocks
HEARTBEAT = struct.Struct(">QQQ")  # seq, sender's monotonic ns, sender's lease generation


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


@dataclass
class LinkStats:
    """RTT as an EWMA with variance (TCP's estimator), achieved bandwidth, dirty rate."""

    rtt_ms: float | None = None
    rtt_var_ms: float = 0.0
    bandwidth_bps: float | None = None  # bytes per second
    dirty_bytes_per_s: float | None = None
    samples: int = 0
    history: list = field(default_factory=list)

    def add_rtt(self, ms: float) -> None:
        self.samples += 1
        if self.rtt_ms is None:
            self.rtt_ms, self.rtt_var_ms = ms, ms / 2
        else:
            self.rtt_var_ms = 0.75 * self.rtt_var_ms + 0.25 * abs(self.rtt_ms - ms)
            self.rtt_ms = 0.875 * self.rtt_ms + 0.125 * ms

    def add_transfer(self, nbytes: int, seconds: float) -> None:
        """A checkpoint of `nbytes` took `seconds` from send to ack, RTT included."""
        rtt = (self.rtt_ms or 0) / 1000
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
        return {
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "rtt_var_ms": round(self.rtt_var_ms, 3),
            "bandwidth_mbit": None if self.bandwidth_bps is None else round(self.bandwidth_bps * 8 / 1e6, 1),
            "dirty_mb_per_s": None if self.dirty_bytes_per_s is None else round(self.dirty_bytes_per_s / 1e6, 2),
        }


async def on_heartbeat_message(ch, mtype, payload: bytes, link: LinkStats, on_heartbeat) -> bool:
    """Both ends: echo a HEARTBEAT (and report the peer's generation and the link), time an ECHO.
    Returns False for other messages. A heartbeat of the wrong size is a protocol error."""
    if mtype not in (MsgType.HEARTBEAT, MsgType.HEARTBEAT_ECHO):
        return False
    if len(payload) != HEARTBEAT.size:
        raise ChannelError(f"malformed {mtype.name} ({len(payload)} bytes)")
    _, sent_ns, generation = HEARTBEAT.unpack(payload)
    if mtype is MsgType.HEARTBEAT:
        await ch.send(MsgType.HEARTBEAT_ECHO, payload)
        if on_heartbeat:
            on_heartbeat(generation, link)
    else:
        link.add_rtt((time.monotonic_ns() - sent_ns) / 1e6)
    return True


async def send_heartbeats(ch, period_s: float, generation_fn) -> None:
    seq = 0
    while True:
        seq += 1
        await ch.send_heartbeat(HEARTBEAT.pack(seq, time.monotonic_ns(), generation_fn()))
        await asyncio.sleep(period_s)
