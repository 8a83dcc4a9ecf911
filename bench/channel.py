"""Channel benchmark, measured in one run:

1. throughput of the replication channel with mutual TLS 1.3 against the same
   transfer without TLS, on loopback (ratio);
2. event-loop stalls while one large frame (--stall-mb, default 64 MiB) crosses a mutual-TLS
   loopback connection under uvloop: the longest gap a 1 ms ticker sees on the sending loop
   and, in a separate receiving process, on the receiving loop; the frame written in one
   piece (slice 0, how the channel sent before protocol 3) against the channel's slices;
3. with --lab (the lab must be down; it is brought up and down again): the RTT the
   channel measures against the RTT configured on the lab's WAN emulator.

    .venv/bin/python bench/channel.py [--mb 512] [--stall-mb 64] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geomirror import pairing  # noqa: E402
from replication.transport import MsgType, connect, serve  # noqa: E402

MSG = 4 << 20


async def throughput(total: int, ssl_pair) -> float:
    got = asyncio.Event()
    received = 0

    async def handler(ch):
        nonlocal received
        while received < total:
            _, payload = await ch.recv()
            received += len(payload)
        got.set()

    sctx, cctx = ssl_pair if ssl_pair else (None, None)
    server = await serve("127.0.0.1", 0, handler, ssl=sctx, max_frame=MSG + 1)
    port = server.sockets[0].getsockname()[1]
    ch = await connect("127.0.0.1", port, ssl=cctx, server_hostname="site-b" if cctx else None, max_frame=MSG + 1)
    payload = bytes(MSG)
    t0 = time.perf_counter()
    for _ in range(total // MSG):
        await ch.send(MsgType.CHECKPOINT, payload)
    await got.wait()
    dt = time.perf_counter() - t0
    ch.close()
    server.close()
    return total / dt / 1e6


async def _ticker(worst: list, period: float = 0.001) -> None:
    """Record the longest time the loop took to come back to a task asleep for `period`."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period)
        worst[0] = max(worst[0], time.perf_counter() - t - period)


async def _receiver(pki: str, frames: int) -> None:
    """The receiving process: serve one connection, take `frames` frames, print its worst stall."""
    d = Path(pki)
    sctx = pairing.server_context(d / "ca.pem", d / "site-b.pem", d / "site-b.key")
    worst = [0.0]

    async def handler(ch):
        tick = asyncio.create_task(_ticker(worst))
        try:
            for _ in range(frames):
                await ch.recv()
            await ch.send(MsgType.ACK, b"")
        finally:
            tick.cancel()
        done.set()

    done = asyncio.Event()
    server = await serve("127.0.0.1", 0, handler, ssl=sctx, max_frame=1 << 40)
    print(server.sockets[0].getsockname()[1], flush=True)
    await done.wait()
    server.close()
    print(json.dumps({"worst_ms": worst[0] * 1000}), flush=True)


async def stall(pki: Path, nbytes: int, slice_bytes: int | None, frames: int = 3) -> tuple[float, float]:
    """(worst sender stall ms, worst receiver stall ms) while sending `frames` frames of `nbytes`."""
    child = await asyncio.create_subprocess_exec(sys.executable, __file__, "--receiver", str(pki), str(frames),
                                                 stdout=asyncio.subprocess.PIPE)
    port = int(await child.stdout.readline())
    cctx = pairing.client_context(pki / "ca.pem", pki / "site-a.pem", pki / "site-a.key")
    ch = await connect("127.0.0.1", port, ssl=cctx, server_hostname="site-b", max_frame=1 << 40)
    if slice_bytes is not None:
        ch.slice_bytes = slice_bytes
    payload = bytes(nbytes)
    worst = [0.0]
    tick = asyncio.create_task(_ticker(worst))
    await asyncio.sleep(0.05)
    worst[0] = 0.0
    for _ in range(frames):
        await ch.send(MsgType.CHECKPOINT, payload)
    await ch.recv()  # the receiver's ACK: it has everything
    tick.cancel()
    ch.close()
    got = json.loads(await child.stdout.readline())
    await child.wait()
    return worst[0] * 1000, got["worst_ms"]


def lab_rtts(rtts) -> list[tuple[float, float]]:
    from lab import cli as labcli, world

    out = []
    world.down()
    world.up()
    try:
        labcli.wait_protected()
        for r in rtts:
            labcli.wan(rtt=f"{r}ms")
            time.sleep(4)  # let the EWMA settle
            st = labcli.site_status("site-a")
            out.append((r, st["rtt_ms"]))
    finally:
        world.down()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--stall-mb", type=int, default=64)
    ap.add_argument("--lab", action="store_true")
    ap.add_argument("--receiver", nargs=2, help=argparse.SUPPRESS)  # internal: the receiving process
    a = ap.parse_args()
    if a.receiver:
        import uvloop

        uvloop.run(_receiver(a.receiver[0], int(a.receiver[1])))
        return 0
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    with tempfile.TemporaryDirectory() as d:
        files = pairing.create_pair(Path(d), ["site-a", "site-b"], [])
        ctxs = (pairing.server_context(files.ca, *files.certs["site-b"]),
                pairing.client_context(files.ca, *files.certs["site-a"]))
        total = a.mb << 20
        plain = max(asyncio.run(throughput(total, None)) for _ in range(3))
        tls = max(asyncio.run(throughput(total, ctxs)) for _ in range(3))
        import uvloop

        stalls = {label: uvloop.run(stall(Path(d), a.stall_mb << 20, sl))
                  for label, sl in (("one write (slice 0)", 0), ("1 MiB slices", 1 << 20))}
    print(f"channel throughput on loopback ({a.mb} MB in 4 MB messages, best of 3):")
    print(f"  plain TCP   {plain:8.0f} MB/s")
    print(f"  mutual TLS  {tls:8.0f} MB/s   ratio TLS/plain {tls / plain:.2f}")
    print(f"longest event-loop stall while {a.stall_mb} MiB frames cross mutual TLS on loopback (uvloop, 3 frames):")
    for label, (snd, rcv) in stalls.items():
        print(f"  {label:20}  sender {snd:7.1f} ms   receiver {rcv:7.1f} ms")
    if a.lab:
        print("RTT measured by the channel (heartbeat EWMA) against the WAN emulator's configured RTT:")
        for cfg, got in lab_rtts([1, 10, 25, 50]):
            print(f"  configured {cfg:5.1f} ms   measured {got:7.2f} ms   ratio {got / cfg:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
