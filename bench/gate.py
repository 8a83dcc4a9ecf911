"""Output gate benchmark, measured in one run, in a private namespace (gm-t-gatebench-<pid>):

- frames per second guest → TAP through the gate (QEMU's stream protocol in, TAP out),
  in pass-through (OPEN) and in output-commit mode (HOLD, sealed and released every
  N frames), against writing the same frames straight to the TAP;
- per-frame added latency (one frame in flight, send → seen on the TAP), gate vs direct.

    .venv/bin/python bench/gate.py [--frames 50000] [--size 128]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geomirror import netns  # noqa: E402
from replication.gate import GateMode, UserspaceGate, open_tap  # noqa: E402


def frame(i: int, size: int) -> bytes:
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb5" + struct.pack(">I", i) + b"\0" * (size - 18)


async def drain(pkt, want: int, timeout: float = 30, idle: float = 0.2) -> int:
    """Count our frames seen on the TAP until `want` arrived, or none came for `idle` seconds."""
    got = 0
    deadline = time.monotonic() + timeout
    last = time.monotonic()
    while got < want and time.monotonic() < deadline and time.monotonic() - last < idle:
        try:
            d = pkt.recv(2048)
            if d[12:14] == b"\x88\xb5":
                got += 1
                last = time.monotonic()
        except BlockingIOError:
            await asyncio.sleep(0)
    return got


def make_tap() -> int:
    from pyroute2 import IPRoute

    fd = open_tap("gmb0")
    with IPRoute() as ip:
        ip.link("set", index=ip.link_lookup(ifname="gmb0")[0], state="up")
    return fd


async def run(fd: int, frames: int, size: int, tmp: Path) -> dict:
    pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    pkt.bind(("gmb0", 0))
    pkt.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    pkt.setblocking(False)
    out = {}
    # direct: frames written straight to the TAP
    t = time.perf_counter()
    n = 0
    for i in range(frames):
        os.write(fd, frame(i, size))
        n += 1
        if n % 256 == 0:
            await drain(pkt, 0, 0)
    got = await drain(pkt, frames)
    out["direct_fps"] = got / (time.perf_counter() - t - (0.2 if got < frames else 0))
    out["direct_seen"] = got
    lat = []
    for i in range(2000):
        t = time.perf_counter()
        os.write(fd, frame(i, size))
        await drain(pkt, 1, 1)
        lat.append((time.perf_counter() - t) * 1e6)
    out["direct_lat_us"] = statistics.median(lat)
    for mode in (GateMode.OPEN, GateMode.HOLD):
        gate = UserspaceGate(tmp / f"g-{mode.value}.sock", fd, mode=mode)
        await gate.start()
        r, w = await asyncio.open_unix_connection(str(tmp / f"g-{mode.value}.sock"))
        await gate.wait_guest()
        t = time.perf_counter()
        epoch = 0
        for i in range(frames):
            f = frame(i, size)
            w.write(struct.pack(">I", len(f)) + f)
            if i % 256 == 255:
                await w.drain()
                await asyncio.sleep(0)
                if mode is GateMode.HOLD:  # an epoch ends and is acknowledged
                    epoch += 1
                    gate.seal(epoch)
                    gate.release(epoch)
                await drain(pkt, 0, 0)
        await w.drain()
        await asyncio.sleep(0.05)
        if mode is GateMode.HOLD:
            gate.seal(epoch + 1)
            gate.release(epoch + 1)
        got = await drain(pkt, frames)
        out[f"{mode.value}_fps"] = got / (time.perf_counter() - t - (0.2 if got < frames else 0))
        out[f"{mode.value}_seen"] = got
        lat = []
        for i in range(2000):
            t = time.perf_counter()
            f = frame(i, size)
            w.write(struct.pack(">I", len(f)) + f)
            await w.drain()
            if mode is GateMode.HOLD:
                await asyncio.sleep(0)
                epoch += 1
                gate.seal(epoch)
                gate.release(epoch)
            await drain(pkt, 1, 1)
            lat.append((time.perf_counter() - t) * 1e6)
        out[f"{mode.value}_lat_us"] = statistics.median(lat)
        w.close()
        await gate.close()
    pkt.close()
    os.close(fd)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=50000)
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args()
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    ns = f"gm-t-gatebench-{os.getpid()}"
    netns.create(ns)
    try:
        netns.enter(ns)
        with tempfile.TemporaryDirectory() as d:
            import uvloop

            r = uvloop.run(run(make_tap(), a.frames, a.size, Path(d)))
    finally:
        netns.remove(ns)
    print(f"gate benchmark: {a.frames} frames of {a.size} bytes, guest -> TAP "
          f"(seen on the TAP: direct {r['direct_seen']}, gate {r['open_seen']}/{r['hold_seen']})")
    print(f"  direct to TAP          {r['direct_fps']:>9.0f} frames/s   median latency {r['direct_lat_us']:6.1f} us")
    for m, label in (("open", "gate, pass-through"), ("hold", "gate, output commit")):
        print(f"  {label:22} {r[m + '_fps']:>9.0f} frames/s   median latency {r[m + '_lat_us']:6.1f} us   "
              f"throughput ratio {r[m + '_fps'] / r['direct_fps']:.2f}, added {r[m + '_lat_us'] - r['direct_lat_us']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
