"""The primary's NBD disk path (replication/nbd.py) against qemu-nbd and a local raw file.

The same tool (``qemu-img bench``, QEMU's own block layer, the path a guest's writes
take) drives all three targets in the same run, interleaved, ``--rounds`` times; the
median is printed with ratios. Cases: 4 KiB random writes at queue depth 32 (a stride
coprime with the image's block count visits blocks in a scattered order), 4 KiB writes
at depth 1 (latency), 64 KiB sequential writes at depth 16. While our server runs, a
thread plays the checkpoint every ``--interval-ms``: ``checkpoint_starting()``,
``seal()``, walk the extents chunk by chunk (zero copy, as a compressor would take them),
``release()`` their bytes.

Also measured: the extent log's cost per block (``record``), ``seal()`` (the pause
part), and what reading the sealed blocks back from the image would cost instead.

    .venv/bin/python bench/nbd.py [--rounds 3] [--count 100000] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog  # noqa: E402

from replication.nbd import BLOCK_SIZE, ExtentLog, NbdServer  # noqa: E402

IMAGE_SIZE = 1 << 30
STRIDE = 4096 * 7919  # 7919 is prime: coprime with the 2^18 blocks of the image

CASES = {  # name -> (qemu-img bench arguments, bytes per request, unit)
    "4k-rand-d32": (["-s", "4k", "-S", str(STRIDE), "-d", "32"], 4096, "IOPS"),
    "4k-rand-d1": (["-s", "4k", "-S", str(STRIDE), "-d", "1"], 4096, "IOPS"),
    "64k-seq-d16": (["-s", "64k", "-d", "16"], 65536, "MB/s"),
}


def qemu_img_bench(target: str, args: list[str], count: int) -> float:
    """Seconds for `count` writes."""
    p = subprocess.run(["qemu-img", "bench", "-w", "-f", "raw", "-c", str(count), *args, target],
                       capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([\d.]+) seconds", p.stdout)
    if not m:
        raise RuntimeError(f"qemu-img bench printed no time: {p.stdout} {p.stderr}")
    return float(m.group(1))


class Checkpointer:
    """Seals the server's epoch every interval, materialises the extents and releases them."""

    def __init__(self, server: NbdServer, interval: float):
        self.server = server
        self.interval = interval
        self.stop = threading.Event()
        self.seal_ms: list[float] = []
        self.blocks = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            t = time.perf_counter()
            self.server.checkpoint_starting()
            sealed = self.server.seal()
            self.seal_ms.append((time.perf_counter() - t) * 1000)
            for numbers, contents in sealed.by_chunk():  # what a compressor would be handed
                self.blocks += len(numbers)
            self.server.release(sealed.nbytes)


def run_ours(image: Path, sock: Path, args: list[str], count: int, interval: float) -> tuple[float, Checkpointer]:
    server = NbdServer(image, sock, cap_bytes=256 << 20)
    server.start()
    cp = Checkpointer(server, interval)
    cp.thread.start()
    try:
        return qemu_img_bench(f"nbd+unix:///?socket={sock}", args, count), cp
    finally:
        cp.stop.set()
        cp.thread.join()
        server.close()


def run_qemu_nbd(image: Path, sock: Path, args: list[str], count: int) -> float:
    sock.unlink(missing_ok=True)
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "--cache=writeback", "-k", str(sock), str(image)],
                         stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        return qemu_img_bench(f"nbd+unix:///?socket={sock}", args, count)
    finally:
        p.terminate()
        p.wait()


def extent_costs(n: int = 50000) -> dict:
    """Per-block costs of the extent log, and of reading sealed blocks back from an image."""
    log = ExtentLog()
    payload = os.urandom(BLOCK_SIZE)
    blocks = random.Random(1).sample(range(IMAGE_SIZE // BLOCK_SIZE), n)
    t = time.perf_counter()
    for b in blocks:
        with log.lock:
            log.record(b * BLOCK_SIZE, payload, lambda _b: payload)
    record_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    sealed = log.seal()
    seal_us = (time.perf_counter() - t) * 1e6
    t = time.perf_counter()
    sealed.block_numbers()
    sealed.contents()
    sorted_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for numbers, contents in sealed.by_chunk():
        pass
    chunks_us = (time.perf_counter() - t) / n * 1e6
    return {"record_us_per_block": record_us, "seal_us": seal_us, "sorted_us_per_block": sorted_us,
            "chunks_us_per_block": chunks_us}


def pread_back_us(image: Path, n: int = 20000) -> float:
    fd = os.open(image, os.O_RDONLY)
    try:
        blocks = sorted(random.Random(2).sample(range(IMAGE_SIZE // BLOCK_SIZE), n))
        t = time.perf_counter()
        for b in blocks:
            os.pread(fd, BLOCK_SIZE, b * BLOCK_SIZE)
        return (time.perf_counter() - t) / n * 1e6
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=100000, help="4 KiB writes per run (64 KiB runs do a fifth)")
    ap.add_argument("--dir", default="/var/tmp", help="where the images live (the same filesystem for all)")
    ap.add_argument("--interval-ms", type=float, default=100.0, help="checkpoint interval played against our server")
    a = ap.parse_args()
    for tool in ("qemu-img", "qemu-nbd"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is not installed (qemu-utils)")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings only

    with tempfile.TemporaryDirectory(dir=a.dir, prefix="gm-nbd-bench-") as d:
        d = Path(d)
        image = d / "disk.raw"
        with open(image, "wb") as f:
            f.truncate(IMAGE_SIZE)
        results: dict[str, dict[str, list[float]]] = {c: {"ours": [], "qemu-nbd": [], "local": []} for c in CASES}
        seal_ms: list[float] = []
        for r in range(a.rounds):
            for case, (args, size, unit) in CASES.items():
                count = a.count if size == 4096 else a.count // 5
                if case == "4k-rand-d1":
                    count //= 3
                per = (lambda s: count / s) if unit == "IOPS" else (lambda s: count * size / s / 1e6)
                secs, cp = run_ours(image, d / "ours.sock", args, count, a.interval_ms / 1000)
                results[case]["ours"].append(per(secs))
                seal_ms += cp.seal_ms
                results[case]["qemu-nbd"].append(per(run_qemu_nbd(image, d / "qemu-nbd.sock", args, count)))
                results[case]["local"].append(per(qemu_img_bench(str(image), args, count)))
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)

        print(f"qemu-img bench, {a.rounds} rounds interleaved, medians; images in {a.dir}; "
              f"our server checkpointed every {a.interval_ms:g} ms")
        print(f"{'case':<14}{'ours':>10}{'qemu-nbd':>10}{'local':>10}   {'ours/local':>10}{'qemu-nbd/local':>15}{'ours/qemu-nbd':>14}")
        for case, (_, _, unit) in CASES.items():
            m = {k: statistics.median(v) for k, v in results[case].items()}
            print(f"{case:<14}{m['ours']:>10.0f}{m['qemu-nbd']:>10.0f}{m['local']:>10.0f}   "
                  f"{m['ours'] / m['local']:>10.2f}{m['qemu-nbd'] / m['local']:>15.2f}{m['ours'] / m['qemu-nbd']:>14.2f}  {unit}")
        costs = extent_costs()
        print(f"seal() during the runs: median {statistics.median(seal_ms) * 1000:.0f} us, max {max(seal_ms) * 1000:.0f} us "
              f"over {len(seal_ms)} checkpoints")
        print(f"extent log per 4 KiB block: record {costs['record_us_per_block']:.2f} us (in the write path), "
              f"seal of 50k blocks {costs['seal_us']:.0f} us; after cont: sorted copy (contents()) "
              f"{costs['sorted_us_per_block']:.2f} us, zero-copy walk (by_chunk()) {costs['chunks_us_per_block']:.3f} us")
        print(f"reading a sealed block back from the image instead: {pread_back_us(image):.2f} us per block "
              f"(would be inside the pause)")


if __name__ == "__main__":
    main()
