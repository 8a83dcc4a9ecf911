"""Checkpoint benchmark: boots the guest (128 MB and 512 MB) with a memory-writing
workload inside it and prints, measured in the same run:

- pause per checkpoint (median, p99) against a memcpy of the same RAM size (the floor)
- fixed cost per checkpoint (device state bytes and time)
- bytes on the wire per checkpoint against raw dirty bytes (compression ratio)
- codec throughput (MB/s of raw dirty bytes, one core)

    .venv/bin/python bench/checkpoint.py [--sizes 128,512] [--epochs 40] [--interval-ms 50]

Runs inside a private network namespace it makes and removes (gm-t-bench-<pid>).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from geomirror import netns  # noqa: E402
from geomirror.image import build_image, default_cmdline  # noqa: E402
from replication import codec as codec_mod  # noqa: E402
from replication.capture import Capture  # noqa: E402
from replication.gate import GateMode, UserspaceGate, open_tap  # noqa: E402
from replication.qemu import Guest, GuestSpec, detect_accel  # noqa: E402
from gmbase.stats import percentile as pct  # noqa: E402


async def bench_size(mb: int, epochs: int, interval_ms: float, dirty: str, workdir: Path) -> dict:
    img = build_image(progress=False)
    d = workdir / f"m{mb}"
    d.mkdir()
    fd = open_tap(f"gmb{mb}")
    gate = UserspaceGate(d / "net.sock", fd, mode=GateMode.OPEN)
    await gate.start()
    spec = GuestSpec(name=f"bench{mb}", memory_mb=mb, kernel=img.kernel, initrd=img.initrd,
                     append=default_cmdline("198.51.100.10", 24, "198.51.100.1", dirty=dirty),
                     ram_path=d / "ram", qmp_path=d / "qmp.sock", serial_path=d / "serial.log",
                     net_socket=d / "net.sock", accel=detect_accel())
    g = Guest(spec)
    await g.start()
    try:
        await g.wait_ready(120)
        await asyncio.sleep(1.0)  # let the workload start
        cap = Capture(spec.ram_path, mb << 20)
        cap.capture()  # the "initial sync": shadow = RAM
        codec = codec_mod.Codec(os.urandom(32), level=1)
        pauses, dev_ms, dev_bytes, dirty_b, wire_b, enc_s = [], [], [], [], [], []
        prev_dev = None
        for n in range(1, epochs + 1):
            await asyncio.sleep(interval_ms / 1000)
            t0 = time.perf_counter()
            await g.stop_vcpus()
            scan = asyncio.create_task(asyncio.to_thread(cap.capture))
            t1 = time.perf_counter()
            dev = await g.save_device_state()
            dev_ms.append((time.perf_counter() - t1) * 1000)
            ds = await scan
            await g.cont()
            pauses.append((time.perf_counter() - t0) * 1000)
            t2 = time.perf_counter()
            frame = codec.encode(epoch=n, kind=codec_mod.KIND_DELTA, page_size=4096,
                                 page_numbers=ds.page_numbers, new_pages=ds.new_pages, old_pages=ds.old_pages,
                                 device_state=dev, device_base=prev_dev)
            prev_dev = dev
            enc_s.append(time.perf_counter() - t2)
            dev_bytes.append(len(dev))
            dirty_b.append(ds.nbytes + len(dev))
            wire_b.append(len(frame))
        # The floor: a memcpy of the whole RAM, measured now, on this machine.
        src = np.frombuffer(cap.ram, dtype=np.uint8)
        dst = np.empty_like(src)
        floor = []
        for _ in range(7):
            t = time.perf_counter()
            np.copyto(dst, src)
            floor.append((time.perf_counter() - t) * 1000)
        cap.close()
    finally:
        await g.close()
        await gate.close()
        os.close(fd)
    floor_ms = statistics.median(floor)
    med = statistics.median(pauses)
    return {
        "mb": mb, "epochs": epochs, "pause_median_ms": med, "pause_p99_ms": pct(pauses, 99),
        "memcpy_ms": floor_ms, "pause_over_floor": med / floor_ms,
        "target_ms": 1.5 * floor_ms + 5,
        "device_state_kb": statistics.median(dev_bytes) / 1024, "device_state_ms": statistics.median(dev_ms),
        "raw_dirty_kb": statistics.mean(dirty_b) / 1024, "wire_kb": statistics.mean(wire_b) / 1024,
        "wire_over_raw": sum(wire_b) / max(1, sum(dirty_b)),
        "codec_mb_s": sum(dirty_b) / max(1e-9, sum(enc_s)) / 1e6,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,512")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--interval-ms", type=float, default=50)
    ap.add_argument("--dirty", default="32:2000", help="gm-dirty workload in the guest: MB:PAGES_PER_S")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/checkpoint.py needs root (a TAP device in a private namespace)", file=sys.stderr)
        return 2
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    ns = f"gm-t-bench-{os.getpid()}"
    netns.create(ns)
    workdir = Path(tempfile.mkdtemp(prefix="gm-bench-", dir="/dev/shm"))
    rows = []
    try:
        netns.enter(ns)
        for mb in [int(x) for x in a.sizes.split(",")]:
            rows.append(asyncio.run(bench_size(mb, a.epochs, a.interval_ms, a.dirty, workdir)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        netns.remove(ns)
    print(f"\ncheckpoint benchmark: interval {a.interval_ms:g} ms, guest workload gm-dirty {a.dirty}, "
          f"{a.epochs} epochs, accel {detect_accel()}")
    hdr = (f"{'RAM':>6} {'pause p50':>10} {'p99':>8} {'memcpy':>8} {'ratio':>6} {'target':>8} "
           f"{'devstate':>10} {'dev ms':>7} {'raw/ckpt':>10} {'wire/ckpt':>10} {'wire/raw':>9} {'codec':>10}")
    print(hdr)
    for r in rows:
        print(f"{r['mb']:>4}MB {r['pause_median_ms']:>8.1f}ms {r['pause_p99_ms']:>6.1f}ms {r['memcpy_ms']:>6.1f}ms "
              f"{r['pause_over_floor']:>5.2f}x {r['target_ms']:>6.1f}ms {r['device_state_kb']:>8.0f}KB "
              f"{r['device_state_ms']:>7.1f} {r['raw_dirty_kb']:>8.0f}KB {r['wire_kb']:>8.0f}KB "
              f"{r['wire_over_raw']:>9.3f} {r['codec_mb_s']:>6.0f}MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
