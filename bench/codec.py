"""Codec benchmark on one core, measured in one run: encode and decode MB/s of raw dirty
page bytes, wire bytes / raw bytes, against zstd-1 alone and a memcpy of the same bytes.

    .venv/bin/python bench/codec.py [--mb 128] [--dirty 0.05]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import zstandard  # noqa: E402

from replication.codec import KIND_DELTA, Codec  # noqa: E402


def ram_image(mb: int, rng) -> np.ndarray:
    """Guest-like RAM: a third zero pages, a third text-like, a third random."""
    n = (mb << 20) // 4096
    ram = np.zeros((n, 4096), np.uint8)
    third = n // 3
    text = np.frombuffer((b"INVITE sip:bob@example.com SIP/2.0 Via: SIP/2.0/UDP 198.51.100.10 " * 64)[:4096], np.uint8)
    ram[third:2 * third] = text
    ram[2 * third:] = rng.integers(0, 256, (n - 2 * third, 4096), dtype=np.uint8)
    return ram


def best(fn, n=3):
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = fn()
        t.append(time.perf_counter() - t0)
    return min(t), r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=128)
    ap.add_argument("--dirty", type=float, default=0.05, help="share of pages dirtied per epoch")
    a = ap.parse_args()
    rng = np.random.default_rng(1)
    ram = ram_image(a.mb, rng)
    pages = np.sort(rng.choice(ram.shape[0], int(ram.shape[0] * a.dirty), replace=False)).astype(np.uint64)
    old = ram[pages.astype(int)]
    new = old.copy()
    new[:, rng.integers(0, 4000):][:, :64] ^= rng.integers(1, 256, dtype=np.uint8)  # a few words change per page
    raw = new.nbytes
    codec = Codec(os.urandom(32), level=1)
    enc_t, frame = best(lambda: codec.encode(epoch=1, kind=KIND_DELTA, page_size=4096, page_numbers=pages,
                                             new_pages=new, old_pages=old, device_state=os.urandom(1) * 400_000))
    dec_t, d = best(lambda: codec.decode(frame).new_pages(old))
    assert np.array_equal(d, new)
    z = zstandard.ZstdCompressor(level=1)
    z_t, zb = best(lambda: z.compress(new.data))
    dst = np.empty_like(new)
    m_t, _ = best(lambda: np.copyto(dst, new))
    print(f"codec benchmark: {len(pages)} dirty pages ({raw / 1e6:.1f} MB raw) of a {a.mb} MB guest-like RAM")
    print(f"  encode (XOR + zstd-1 + AES-GCM)  {raw / enc_t / 1e6:8.0f} MB/s")
    print(f"  decode (+ apply delta)           {raw / dec_t / 1e6:8.0f} MB/s")
    print(f"  zstd-1 alone on the raw pages    {raw / z_t / 1e6:8.0f} MB/s   wire/raw {len(zb) / raw:.3f}")
    print(f"  memcpy of the same bytes         {raw / m_t / 1e6:8.0f} MB/s")
    print(f"  wire bytes / raw dirty bytes     {len(frame) / raw:.4f}  (XOR delta; device state included)")
    print(f"  encode / zstd-alone speed ratio  {z_t / enc_t:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
