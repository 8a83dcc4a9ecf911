"""The dirty-page scan (memcmp skip, then numpy per page) finds exactly the pages the plain
numpy compare finds, whatever RAM holds and wherever it differs (bench/scan.py measures speed)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from replication import capture

PS = 4096


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 2**32 - 1), density=st.sampled_from([0.0, 0.002, 0.05, 0.5, 1.0]),
       clustered=st.booleans(), chunk=st.sampled_from([1, 3, 16, 64, 2048]), sub=st.sampled_from([1, 2, 4, 64]))
def test_memcmp_scan_finds_what_the_numpy_scan_finds(n, seed, density, clustered, chunk, sub):
    rng = np.random.default_rng(seed)
    shadow = rng.integers(0, 256, n * PS, dtype=np.uint8)
    shadow.reshape(n, PS)[rng.random(n) < 0.3] = 0
    ram = shadow.copy()
    k = int(round(density * n))
    if clustered and k:
        start = int(rng.integers(0, n))
        dirty = np.arange(start, min(n, start + k))
    else:
        dirty = rng.choice(n, k, replace=False)
    if dirty.size:  # one byte anywhere in the page: the first, the last or in between
        where = rng.choice([0, PS - 1, int(rng.integers(0, PS))], dirty.size)
        ram.reshape(n, PS)[dirty, where] ^= rng.integers(1, 256, dirty.size).astype(np.uint8)
    want = capture.scan_numpy(ram, shadow, PS)
    assert np.array_equal(want, np.sort(dirty).astype(np.uint64))
    got = capture.scan_memcmp(ram, shadow, PS, chunk_pages=chunk, sub_pages=sub)
    assert got.dtype == np.uint64 and np.array_equal(got, want)
    assert np.array_equal(capture.scan_pages(ram, shadow, PS), want)


def test_capture_scan_uses_the_shadow(tmp_path):
    ram = np.random.default_rng(1).integers(0, 256, 300 * PS, dtype=np.uint8)
    path = tmp_path / "ram"
    path.write_bytes(ram.tobytes())
    cap = capture.Capture(path, ram.size)
    try:
        assert cap.scan().size == 300  # the shadow starts zeroed
        cap.capture()
        assert cap.scan().size == 0
        with open(path, "r+b") as f:
            f.seek(123 * PS + 9)
            f.write(b"\xff\x00")
        assert cap.scan().tolist() == [123]
    finally:
        cap.close()
