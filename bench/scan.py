"""Dirty-page scan benchmark: the full compare of guest RAM against the shadow, as
replication/capture.py does it while the vCPUs are stopped, against other ways of finding
the same pages. Prints ratios taken in the same run (each round runs every variant once,
in a shuffled order; the ratio is the median over rounds of reference time / variant time),
so a shared, loaded machine moves the absolute times but not the comparison.

    .venv/bin/python bench/scan.py [--sizes 128,1024] [--dirty 100,2000] [--rounds 11]

Patterns: `random` (dirty pages spread uniformly over RAM) and `clustered` (runs of 8–64
pages, as a process writing its buffer or the kernel its page cache), one 8-byte word
changed per page at a random offset (gm-dirty writes one word per page).

Variants:
- numpy:          the reference (replication.capture.scan_numpy): 8 MiB chunks, uint64
                  not_equal into a bool buffer, any() per page
- memcmp C+np:    libc memcmp (ctypes, GIL released) over chunks of C; a chunk that differs
                  gets the numpy per-page pass
- capture.scan:   replication.capture.scan_memcmp as the capture runs it: memcmp over 8 MiB;
                  a differing chunk is split into 256 KiB memcmps and a differing piece gets
                  the numpy pass, but once most pieces of a chunk differ the rest of it gets
                  one numpy pass (dense epochs cost what numpy costs)
- numpy 2 thr:    the reference split over two threads
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from replication import capture as cap  # noqa: E402
from replication import verify  # noqa: E402

PS = cap.PAGE_SIZE
W = PS // 8
_pool = ThreadPoolExecutor(2)


def make(mb: int, n_dirty: int, clustered: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    size = mb << 20
    n = size // PS
    shadow = rng.integers(0, 256, size, dtype=np.uint8)
    shadow.reshape(n, PS)[::3] = 0  # guests hold many zero pages
    ram = shadow.copy()
    if clustered:
        pages: set[int] = set()
        while len(pages) < n_dirty:
            s = int(rng.integers(0, n))
            pages.update(range(s, min(n, s + int(rng.integers(8, 65)))))
        dirty = np.array(sorted(pages))[:n_dirty]
    else:
        dirty = np.sort(rng.choice(n, n_dirty, replace=False))
    word = rng.integers(0, W, dirty.size)
    ram.view(np.uint64).reshape(n, W)[dirty, word] += np.uint64(1)
    return ram, shadow, dirty.astype(np.uint64)


def memcmp_then_numpy(chunk_pages: int):
    def scan(ram, shadow):
        return cap.scan_memcmp(ram, shadow, PS, chunk_pages=chunk_pages, sub_pages=chunk_pages)
    return scan


def numpy_two_threads(ram, shadow):
    n = ram.size // PS
    h = (n // 2) // cap.SCAN_CHUNK_PAGES * cap.SCAN_CHUNK_PAGES or n
    parts = [_pool.submit(cap.scan_numpy, ram[: h * PS], shadow[: h * PS], PS),
             _pool.submit(cap.scan_numpy, ram[h * PS:], shadow[h * PS:], PS)]
    a, b = parts[0].result(), parts[1].result()
    return np.concatenate([a, b + np.uint64(h)])


def current(ram, shadow):
    return cap.scan_pages(ram, shadow, PS)


VARIANTS = {
    "numpy": lambda r, s: cap.scan_numpy(r, s, PS),
    "memcmp 8M+np": memcmp_then_numpy(2048),
    "memcmp 1M+np": memcmp_then_numpy(256),
    "memcmp 256K+np": memcmp_then_numpy(64),
    "numpy 2 thr": numpy_two_threads,
    "capture.scan": current,
}


def run(mb: int, n_dirty: int, clustered: bool, rounds: int) -> dict:
    ram, shadow, want = make(mb, n_dirty, clustered)
    for name, f in VARIANTS.items():
        got = f(ram, shadow)
        if not np.array_equal(got, want):
            raise SystemExit(f"{name} found {got.size} pages, expected {want.size}")
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for _ in range(rounds):
        order = list(VARIANTS)
        random.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            VARIANTS[name](ram, shadow)
            times[name].append(time.perf_counter() - t0)
    ref = times["numpy"]
    return {"ref_ms": statistics.median(ref) * 1000,
            "ratios": {k: statistics.median(r / v for r, v in zip(ref, times[k])) for k in VARIANTS if k != "numpy"}}


def check_cost(mb: int, rounds: int) -> None:
    """The replica check's share of the pause: one range's digest (replication/verify.py) and
    the alternatives considered, beside the scan of the same RAM, in the same run."""
    ram, shadow, _ = make(mb, 100, False)
    n = verify.DEFAULT_BYTES_PER_EPOCH
    part = memoryview(ram[:n])
    fns = {"sha256 (used)": lambda: verify.digest(part),
           "blake2b-128": lambda: hashlib.blake2b(part, digest_size=16).digest(),
           "crc32": lambda: zlib.crc32(part)}
    scan_ms = statistics.median(_timed(lambda: cap.scan_pages(ram, shadow, PS)) for _ in range(rounds)) * 1000
    costs = {k: statistics.median(_timed(f) for _ in range(rounds * 20)) * 1000 for k, f in fns.items()}
    print(f"replica check of {n >> 10} KiB per epoch at {mb} MB (cycle "
          f"{verify.cycle_epochs(mb << 20, n, PS)} epochs): "
          + ", ".join(f"{k} {v:.3f} ms ({v / scan_ms:.3f} of the scan)" for k, v in costs.items()))


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="128,1024")
    ap.add_argument("--dirty", default="100,2000")
    ap.add_argument("--rounds", type=int, default=11)
    a = ap.parse_args()
    names = [k for k in VARIANTS if k != "numpy"]
    print("speed-up over the numpy reference (median of per-round ratios; >1 is faster)")
    print(f"{'RAM':>6} {'pattern':>9} {'dirty':>5} {'numpy ms':>9} " + " ".join(f"{k:>15}" for k in names))
    for mb in (int(x) for x in a.sizes.split(",")):
        for clustered in (False, True):
            for nd in (int(x) for x in a.dirty.split(",")):
                r = run(mb, nd, clustered, a.rounds)
                print(f"{mb:>4}MB {'clustered' if clustered else 'random':>9} {nd:>5} {r['ref_ms']:>9.1f} "
                      + " ".join(f"{r['ratios'][k]:>14.2f}x" for k in names), flush=True)
    check_cost(128, a.rounds)


if __name__ == "__main__":
    main()
