"""An RTP stream through the guest's echo, measured from gm-client.

The echo UA in the guest is sipp with `-rtp_echo`: a thread that sends every datagram
arriving on its media socket (the guest's address, UDP 6000) back to where it came from.
It runs from sipp's start, independent of any call, so the stream needs no call: this
sender puts one RTP packet (PCMU, 160 samples: 20 ms, sequence number and timestamp
stepping per packet) on the wire every 20 ms to 198.51.100.10:6000 and records when each
echo comes back. Sender and receiver are one process in gm-client and share
CLOCK_MONOTONIC with the caller, so events of a test (a kill, a switchover) line up with
the stream.

What the gate adds is on the guest's output only (inbound frames pass at once), so a round
trip's extra delay is the added one-way latency. The analysis is pure (`analyse`): echoes
received, lost, duplicates (a packet echoed twice: a resumed guest replays output it had
sent before the last committed epoch, possible only with pass-through), round trip times,
RFC 3550 interarrival jitter over the round trip, and the longest gap between two new
echoes (the media gap).

    python -m lab.rtp --seconds 10 --out /tmp/rtp.json     # inside gm-client (see `start`)
"""

from __future__ import annotations

import argparse
import json
import math
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from geomirror import netns
from lab import world

MEDIA_PORT = 6000
INTERVAL_MS = 20
SAMPLES = 160  # 20 ms of 8 kHz PCMU
PAYLOAD = 160
HEADER = struct.Struct(">BBHII")  # V/P/X/CC, M/PT, sequence, timestamp, SSRC
STAMP = struct.Struct(">QQ")  # the packet's index and its send time (ns), at the start of the payload
PT_PCMU = 0


def packet(index: int, ssrc: int, sent_ns: int) -> bytes:
    """RTP packet number `index` of a 20 ms PCMU stream; the payload starts with (index, sent_ns)."""
    head = HEADER.pack(0x80, PT_PCMU, index & 0xFFFF, (index * SAMPLES) & 0xFFFFFFFF, ssrc)
    body = STAMP.pack(index, sent_ns)
    return head + body + b"\xff" * (PAYLOAD - len(body))


def parse(data: bytes, ssrc: int) -> int | None:
    """The index of an echoed packet of our stream, or None (not RTP v2, another SSRC, short)."""
    if len(data) < HEADER.size + STAMP.size:
        return None
    v, _, seq, _, their_ssrc = HEADER.unpack_from(data)
    if v >> 6 != 2 or their_ssrc != ssrc:
        return None
    index, _ = STAMP.unpack_from(data, HEADER.size)
    if index & 0xFFFF != seq:
        return None
    return index


# ---------------------------------------------------------------- analysis (pure)


@dataclass
class MediaStats:
    sent: int
    received: int  # distinct packets echoed
    lost: int
    duplicates: int  # echoes of a packet already received
    rtt_median_ms: float
    rtt_p99_ms: float
    rtt_max_ms: float
    jitter_ms: float  # RFC 3550 interarrival jitter over the round trip
    longest_gap_ms: float  # the longest time between two new echoes
    gap_start_s: float  # when that gap began, seconds after the window's start

    def line(self) -> str:
        return (f"sent {self.sent}, echoed {self.received}, lost {self.lost}, duplicates {self.duplicates}, "
                f"RTT median {self.rtt_median_ms:.1f} ms (p99 {self.rtt_p99_ms:.1f}, max {self.rtt_max_ms:.1f}), "
                f"jitter {self.jitter_ms:.1f} ms, longest media gap {self.longest_gap_ms:.0f} ms")


def analyse(sent_ns: list[int], recv: list[tuple[int, int]], start_ns: int | None = None,
            end_ns: int | None = None) -> MediaStats:
    """Stats of the packets sent in [start_ns, end_ns) (monotonic ns; None: the whole run).
    `sent_ns[i]` is when packet i left; `recv` is (index, arrival ns) in arrival order."""
    lo = start_ns if start_ns is not None else -math.inf
    hi = end_ns if end_ns is not None else math.inf
    chosen = {i for i, t in enumerate(sent_ns) if lo <= t < hi}
    seen: set[int] = set()
    dups = 0
    rtts: list[float] = []
    arrivals: list[int] = []
    jitter = 0.0
    last_transit: float | None = None
    for index, at in recv:
        if index not in chosen:
            continue
        if index in seen:
            dups += 1
            continue
        seen.add(index)
        transit = (at - sent_ns[index]) / 1e6
        rtts.append(transit)
        arrivals.append(at)
        if last_transit is not None:
            jitter += (abs(transit - last_transit) - jitter) / 16
        last_transit = transit
    gap, gap_at = 0.0, 0.0
    first = min((sent_ns[i] for i in chosen), default=0)
    for a, b in zip(arrivals, arrivals[1:]):
        if (b - a) / 1e6 > gap:
            gap, gap_at = (b - a) / 1e6, (a - first) / 1e9
    rtts_sorted = sorted(rtts)
    return MediaStats(
        sent=len(chosen), received=len(seen), lost=len(chosen) - len(seen), duplicates=dups,
        rtt_median_ms=statistics.median(rtts) if rtts else math.nan,
        rtt_p99_ms=rtts_sorted[min(len(rtts_sorted) - 1, int(len(rtts_sorted) * 0.99))] if rtts else math.nan,
        rtt_max_ms=rtts_sorted[-1] if rtts else math.nan, jitter_ms=jitter,
        longest_gap_ms=gap, gap_start_s=gap_at)


# ---------------------------------------------------------------- the stream (runs in gm-client)


def run(target: str, port: int, seconds: float, out: Path, interval_ms: float = INTERVAL_MS,
        drain_s: float = 3.0) -> None:
    """Send `seconds` worth of packets (or until SIGTERM), keep receiving `drain_s` longer, write
    `out` (JSON)."""
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.connect((target, port))
    sock.setblocking(False)
    ssrc = int.from_bytes(struct.pack(">d", time.time())[-4:], "big")
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    step = int(interval_ms * 1e6)
    t0 = time.monotonic_ns()
    sent: list[int] = []
    recv: list[tuple[int, int]] = []
    total = round(seconds * 1000 / interval_ms)  # packets on the 20 ms schedule
    stopped_at: int | None = None
    while True:
        now = time.monotonic_ns()
        sending = not stop[0] and len(sent) < total
        if not sending:
            stopped_at = stopped_at or now
            if now >= stopped_at + int(drain_s * 1e9):
                break
        due = t0 + len(sent) * step
        if sending and now >= due:
            try:
                sock.send(packet(len(sent), ssrc, now))
            except OSError:  # no route for a moment (a site loss): the packet is lost, as on a link
                pass
            sent.append(now)
            continue
        wait = (due - now) / 1e9 if sending else 0.05
        for _ in sel.select(max(0.0, wait)):
            while True:
                try:
                    data = sock.recv(2048)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                index = parse(data, ssrc)
                if index is not None and index < len(sent):
                    recv.append((index, time.monotonic_ns()))
    out.write_text(json.dumps({"target": target, "port": port, "interval_ms": interval_ms, "sent_ns": sent,
                               "recv": recv}))


def start(out: Path, seconds: float, target: str = world.GUEST_ADDR, port: int = MEDIA_PORT) -> subprocess.Popen:
    """Start a stream in gm-client (a child process); `finish` waits for it and reads the result."""
    return netns.spawn(world.CLIENT, [sys.executable, "-m", "lab.rtp", "--target", target, "--port", str(port),
                                      "--seconds", str(seconds), "--out", str(out)],
                       env=world.child_env(), cwd=world.CODE_ROOT, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)


@dataclass
class Stream:
    sent_ns: list[int]
    recv: list[tuple[int, int]]

    def stats(self, start_ns: int | None = None, end_ns: int | None = None) -> MediaStats:
        return analyse(self.sent_ns, self.recv, start_ns, end_ns)


def finish(proc: subprocess.Popen, out: Path, timeout: float = 120.0, stop: bool = False) -> Stream:
    """Wait for the stream (SIGTERM first if `stop`) and read what it recorded."""
    if stop:
        proc.terminate()
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"the RTP stream exited {proc.returncode}: {(err or '').strip()[-400:]}")
    data = json.loads(out.read_text())
    return Stream(data["sent_ns"], [tuple(r) for r in data["recv"]])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=world.GUEST_ADDR)
    ap.add_argument("--port", type=int, default=MEDIA_PORT)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    run(a.target, a.port, a.seconds, a.out)
    print(json.dumps(asdict(Stream(**{k: v for k, v in json.loads(a.out.read_text()).items()
                                      if k in ("sent_ns", "recv")}).stats())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
