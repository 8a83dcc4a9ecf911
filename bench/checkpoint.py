"""Checkpoint benchmark: boots the guest (128 MB to 2 GB) on the COLO-capable QEMU with a
memory-writing workload inside it and measures, for each capture on that same guest in the
same run:

- scan: stop → (dirty scan of all RAM ∥ device state) → cont (O(RAM))
- colo: QEMU's dirty log through its COLO stream (replication/colo.py), the pause taken as
  replication/primary.py takes it: from just after QEMU's request (the guest runs until then)
  to after `finish` (the guest runs again), the pages QEMU logged compared with the shadow and
  the changed ones copied (`Capture.take_changed`) while QEMU holds the guest stopped

and prints, per size and capture: pause median and p99; pages per epoch; device-state bytes;
the floor of issue 13, 1.5 × (device-state part + dirty copy) (scan: the device-state
`migrate` and the copy of the dirty pages; colo: reply → the device state read, i.e. QEMU
stopping the guest and sending pages and devices, and the compare + copy); a memcpy of the
whole RAM; bytes on the wire against raw dirty bytes; codec throughput. Then the targets:
pause(largest) ≤ 1.5 × pause(smallest) per capture, and pause ≤ 1.5 × (device state + copy).

    .venv/bin/python bench/checkpoint.py [--sizes 128,512,1024,2048] [--captures scan,colo]
        [--epochs 40] [--interval-ms 50]

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
from replication.colo import COLO_QEMU, COLO_QEMU_DATA, ColoSource  # noqa: E402
from replication.gate import GateMode, UserspaceGate, open_tap  # noqa: E402
from replication.qemu import Guest, GuestSpec, detect_accel  # noqa: E402
from gmbase.stats import percentile as pct  # noqa: E402

CAPTURES = ("scan", "colo")


class Samples:
    """Per-epoch figures of one capture."""

    def __init__(self):
        self.pause, self.dev_ms, self.copy_ms, self.dev_bytes = [], [], [], []
        self.pages, self.logged, self.raw, self.wire, self.enc_s = [], [], [], [], []
        self.extra: dict = {}

    def encode(self, codec, n: int, ds, dev: bytes, prev_dev: bytes | None) -> None:
        t = time.perf_counter()
        frame = codec.encode(epoch=n, kind=codec_mod.KIND_DELTA, page_size=4096,
                             page_numbers=ds.page_numbers, new_pages=ds.new_pages, old_pages=ds.old_pages,
                             device_state=dev, device_base=prev_dev)
        self.enc_s.append(time.perf_counter() - t)
        self.dev_bytes.append(len(dev))
        self.pages.append(len(ds.page_numbers))
        self.raw.append(ds.nbytes + len(dev))
        self.wire.append(len(frame))

    def row(self, mb: int, capture: str, memcpy_ms: float) -> dict:
        med = statistics.median(self.pause)
        dev, copy = statistics.median(self.dev_ms), statistics.median(self.copy_ms)
        floor = dev + copy  # the target is 1.5 × this
        return {
            "mb": mb, "capture": capture, "epochs": len(self.pause),
            "pause_median_ms": med, "pause_p99_ms": pct(self.pause, 99), "pause_max_ms": max(self.pause),
            "pages": statistics.median(self.pages),
            "logged": statistics.median(self.logged) if self.logged else None,
            "device_state_kb": statistics.median(self.dev_bytes) / 1024, "device_state_ms": dev, "copy_ms": copy,
            "floor_ms": floor, "target_ms": 1.5 * floor, "pause_over_floor": med / floor,
            "memcpy_ms": memcpy_ms, "pause_over_memcpy": med / memcpy_ms,
            "raw_dirty_kb": statistics.mean(self.raw) / 1024, "wire_kb": statistics.mean(self.wire) / 1024,
            "wire_over_raw": sum(self.wire) / max(1, sum(self.raw)),
            "codec_mb_s": sum(self.raw) / max(1e-9, sum(self.enc_s)) / 1e6, **self.extra,
        }


async def bench_scan(g: Guest, cap: Capture, epochs: int, interval_ms: float) -> Samples:
    """stop → (scan ∥ device state) → cont; the scan's copy of the dirty pages timed apart."""
    s = Samples()
    codec = codec_mod.Codec(os.urandom(32), level=1)
    cap.capture()  # shadow = RAM
    prev_dev = None

    def scan_then_copy():
        pages = cap.scan()
        t = time.perf_counter()
        ds = cap.take(pages)
        return ds, time.perf_counter() - t

    for n in range(1, epochs + 1):
        await asyncio.sleep(interval_ms / 1000)
        t0 = time.perf_counter()
        await g.stop_vcpus()
        scan = asyncio.create_task(asyncio.to_thread(scan_then_copy))
        t1 = time.perf_counter()
        dev = await g.save_device_state()
        s.dev_ms.append((time.perf_counter() - t1) * 1000)
        ds, copy_s = await scan
        await g.cont()
        s.pause.append((time.perf_counter() - t0) * 1000)
        s.copy_ms.append(copy_s * 1000)
        s.encode(codec, n, ds, dev, prev_dev)
        prev_dev = dev
    return s


async def bench_colo(g: Guest, cap: Capture, epochs: int, interval_ms: float) -> Samples:
    """QEMU's dirty log: wait for the request (guest running), then reply → QEMU stops the guest
    and sends pages + devices → compare and copy the logged pages → finish (guest runs)."""
    s = Samples()
    codec = codec_mod.Codec(os.urandom(32), level=1)
    src = ColoSource(g, cap.size)
    info = await src.start()
    s.extra["initial_s"] = info["seconds"]
    s.extra["initial_mb"] = info["stream_bytes"] / 1e6
    prev_dev = None

    def work(cp):
        t = time.perf_counter()
        ds = cap.take_changed(cp.pages)
        return ds, time.perf_counter() - t

    try:
        # The first checkpoint makes the shadow equal RAM (all pages): not counted.
        await asyncio.sleep(interval_ms / 1000)
        await src.checkpoint(lambda cp: cap.take(np.arange(cap.n_pages, dtype=np.uint64)))
        src.finish()
        for n in range(1, epochs + 1):
            await asyncio.sleep(interval_ms / 1000)
            await src.wait_request()  # QEMU asks `delay` after the last checkpoint; the guest runs meanwhile
            t0 = time.perf_counter()
            cp, (ds, copy_s) = await src.checkpoint(work)
            dev = src.device_state(cp)
            src.finish()
            s.pause.append((time.perf_counter() - t0) * 1000)
            s.dev_ms.append((cp.begin_s + cp.read_s) * 1000)
            s.copy_ms.append(copy_s * 1000)
            s.logged.append(len(cp.pages))
            s.encode(codec, n, ds, dev, prev_dev)
            prev_dev = dev
    finally:
        await src.end()
    return s


async def bench_size(mb: int, epochs: int, interval_ms: float, dirty: str, workdir: Path,
                     captures: list[str]) -> list[dict]:
    img = build_image(progress=False)
    d = workdir / f"m{mb}"
    d.mkdir()
    fd = open_tap(f"gmb{mb}")
    gate = UserspaceGate(d / "net.sock", fd, mode=GateMode.OPEN)
    await gate.start()
    # One guest on the COLO-capable QEMU for both captures: same QEMU, same workload.
    spec = GuestSpec(name=f"bench{mb}", memory_mb=mb, kernel=img.kernel, initrd=img.initrd,
                     append=default_cmdline("198.51.100.10", 24, "198.51.100.1", dirty=dirty),
                     ram_path=d / "ram", qmp_path=d / "qmp.sock", serial_path=d / "serial.log",
                     net_socket=d / "net.sock", accel=detect_accel(), stderr_path=d / "stderr",
                     qemu=COLO_QEMU, qemu_data=COLO_QEMU_DATA)
    g = Guest(spec)
    t_boot = time.monotonic()
    await g.start()
    samples: dict[str, Samples] = {}
    try:
        await g.wait_ready(300)
        boot_s = time.monotonic() - t_boot
        await asyncio.sleep(1.0)  # let the workload start
        cap = Capture(spec.ram_path, mb << 20)
        for c in captures:
            samples[c] = await (bench_scan if c == "scan" else bench_colo)(g, cap, epochs, interval_ms)
            print(f"  {mb} MB {c}: pause p50 {statistics.median(samples[c].pause):.1f} ms", file=sys.stderr)
        # The memcpy floor: a copy of the whole RAM, measured now, on this machine.
        src = np.frombuffer(cap.ram, dtype=np.uint8)
        dst = np.empty_like(src)
        floor = []
        for _ in range(7):
            t = time.perf_counter()
            np.copyto(dst, src)
            floor.append((time.perf_counter() - t) * 1000)
        del dst, src
        cap.close()
    finally:
        await g.close()
        await gate.close()
        os.close(fd)
    memcpy_ms = statistics.median(floor)
    rows = [samples[c].row(mb, c, memcpy_ms) for c in captures]
    for r in rows:
        r["boot_s"] = boot_s
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="128,512,1024,2048", help="guest RAM in MB, comma-separated")
    ap.add_argument("--captures", default="scan,colo", help="scan, colo or both (same guest, same QEMU)")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--interval-ms", type=float, default=50)
    ap.add_argument("--dirty", default="32:2000", help="gm-dirty workload in the guest: MB:PAGES_PER_S")
    a = ap.parse_args()
    captures = [c for c in a.captures.split(",") if c]
    bad = [c for c in captures if c not in CAPTURES]
    if bad or not captures:
        print(f"--captures {a.captures!r}: choose from {', '.join(CAPTURES)}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench/checkpoint.py needs root (a TAP device in a private namespace)", file=sys.stderr)
        return 2
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    sizes = [int(x) for x in a.sizes.split(",")]
    ns = f"gm-t-bench-{os.getpid()}"
    netns.create(ns)
    workdir = Path(tempfile.mkdtemp(prefix="gm-bench-", dir="/dev/shm"))
    rows = []
    try:
        netns.enter(ns)
        for mb in sizes:
            rows += asyncio.run(bench_size(mb, a.epochs, a.interval_ms, a.dirty, workdir, captures))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        netns.remove(ns)
    print(f"\ncheckpoint benchmark: interval {a.interval_ms:g} ms, guest workload gm-dirty {a.dirty}, "
          f"{a.epochs} epochs per capture, accel {detect_accel()}, QEMU {COLO_QEMU}")
    hdr = (f"{'RAM':>6} {'capture':7} {'pause p50':>9} {'p99':>7} {'max':>7} {'pages':>6} {'logged':>6} "
           f"{'devstate':>8} {'dev ms':>6} {'copy ms':>7} {'dev+copy':>8} {'p50/(d+c)':>9} {'memcpy':>7} "
           f"{'p50/memcpy':>10} {'wire/ckpt':>9} {'wire/raw':>8} {'codec':>8}")
    print(hdr)
    for r in rows:
        logged = f"{r['logged']:>6.0f}" if r["logged"] is not None else f"{'-':>6}"
        print(f"{r['mb']:>4}MB {r['capture']:7} {r['pause_median_ms']:>7.1f}ms {r['pause_p99_ms']:>5.1f}ms "
              f"{r['pause_max_ms']:>5.1f}ms {r['pages']:>6.0f} {logged} {r['device_state_kb']:>6.0f}KB "
              f"{r['device_state_ms']:>6.2f} {r['copy_ms']:>7.2f} {r['floor_ms']:>6.1f}ms {r['pause_over_floor']:>8.2f}x "
              f"{r['memcpy_ms']:>5.1f}ms {r['pause_over_memcpy']:>9.2f}x {r['wire_kb']:>7.0f}KB "
              f"{r['wire_over_raw']:>8.3f} {r['codec_mb_s']:>4.0f}MB/s")
    for r in rows:
        if "initial_s" in r:
            print(f"{r['mb']:>4}MB colo initial stream {r['initial_s']:.2f} s ({r['initial_mb']:.0f} MB); "
                  f"boot {r['boot_s']:.0f} s")
    print("\ntargets (p50):")
    lo, hi = min(sizes), max(sizes)
    for c in captures:
        a_, b_ = [next(r for r in rows if r["mb"] == m and r["capture"] == c) for m in (lo, hi)]
        ratio = b_["pause_median_ms"] / a_["pause_median_ms"]
        print(f"  {c}: pause({hi} MB) / pause({lo} MB) = {b_['pause_median_ms']:.1f} / {a_['pause_median_ms']:.1f} "
              f"= {ratio:.2f} (target <= 1.5: {'met' if ratio <= 1.5 else 'MISSED'})")
    for r in rows:
        ok = r["pause_median_ms"] <= r["target_ms"]
        print(f"  {r['mb']:>4} MB {r['capture']}: pause {r['pause_median_ms']:.1f} ms vs 1.5 x (device state "
              f"{r['device_state_ms']:.2f} + copy {r['copy_ms']:.2f}) = {r['target_ms']:.1f} ms: ratio "
              f"{r['pause_over_floor']:.2f} (target <= 1.5: "
              f"{'met' if ok else 'MISSED by %.1f ms' % (r['pause_median_ms'] - r['target_ms'])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
