"""Channel benchmark, measured in one run:

1. throughput of the replication channel with mutual TLS 1.3 against the same
   transfer without TLS, on loopback (ratio);
2. with --lab (the lab must be down; it is brought up and down again): the RTT the
   channel measures against the RTT configured on the lab's WAN emulator.

    .venv/bin/python bench/channel.py [--mb 512] [--lab]
"""

from __future__ import annotations

import argparse
import asyncio
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
    ap.add_argument("--lab", action="store_true")
    a = ap.parse_args()
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    with tempfile.TemporaryDirectory() as d:
        files = pairing.create_pair(Path(d), ["site-a", "site-b"], [])
        ctxs = (pairing.server_context(files.ca, *files.certs["site-b"]),
                pairing.client_context(files.ca, *files.certs["site-a"]))
        total = a.mb << 20
        plain = max(asyncio.run(throughput(total, None)) for _ in range(3))
        tls = max(asyncio.run(throughput(total, ctxs)) for _ in range(3))
    print(f"channel throughput on loopback ({a.mb} MB in 4 MB messages, best of 3):")
    print(f"  plain TCP   {plain:8.0f} MB/s")
    print(f"  mutual TLS  {tls:8.0f} MB/s   ratio TLS/plain {tls / plain:.2f}")
    if a.lab:
        print("RTT measured by the channel (heartbeat EWMA) against the WAN emulator's configured RTT:")
        for cfg, got in lab_rtts([1, 10, 25, 50]):
            print(f"  configured {cfg:5.1f} ms   measured {got:7.2f} ms   ratio {got / cfg:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
