"""The replica check's pure parts: which range each epoch checks (every byte once per cycle,
consecutive, wrapping), its digest and compare, and its section of the checkpoint frame."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replication import codec as C
from replication import verify

PS = 4096


@settings(max_examples=200, deadline=None)
@given(pages=st.integers(1, 5000), per_epoch=st.integers(1, 300 * PS), start=st.integers(0, 10**9))
def test_one_cycle_of_consecutive_epochs_covers_every_byte_exactly_once(pages, per_epoch, start):
    size = pages * PS
    n = verify.cycle_epochs(size, per_epoch, PS)
    ranges = sorted(verify.range_for(e, size, per_epoch, PS) for e in range(start, start + n))
    pos = 0
    for off, length in ranges:
        assert off == pos and length > 0 and off % PS == 0
        pos += length
    assert pos == size
    # the cycle repeats: epoch e and e + n check the same range
    assert verify.range_for(start, size, per_epoch, PS) == verify.range_for(start + n, size, per_epoch, PS)


def test_default_cycle_lengths():
    d = verify.DEFAULT_BYTES_PER_EPOCH
    assert verify.cycle_epochs(128 << 20, d, PS) == 512
    assert verify.cycle_epochs(2 << 30, d, PS) == 8192
    assert verify.range_for(511, 128 << 20, d, PS) == ((128 << 20) - d, d)
    assert verify.range_for(512, 128 << 20, d, PS) == (0, d)
    # a range larger than RAM checks all of it every epoch; partial pages round up to a page
    assert verify.range_for(3, 8 * PS, 100 * PS, PS) == (0, 8 * PS)
    assert verify.range_for(1, 8 * PS, 1, PS) == (PS, PS)
    with pytest.raises(ValueError):
        verify.cycle_epochs(8 * PS, 0, PS)


def test_compare_finds_one_changed_byte_in_the_range_only():
    ram = np.random.default_rng(0).integers(0, 256, 64 * PS, dtype=np.uint8)
    check = verify.take(5, ram, 4 * PS, PS)
    assert (check.offset, check.length) == (20 * PS, 4 * PS)
    replica = ram.copy()
    assert verify.compare(5, check, replica) is None
    replica[0] ^= 1  # outside the range: not this epoch's business
    assert verify.compare(5, check, replica) is None
    replica[check.offset + 3 * PS + 17] ^= 1
    div = verify.compare(5, check, replica)
    assert div is not None and (div.epoch, div.offset, div.length) == (5, 20 * PS, 4 * PS)
    assert div.expected == check.digest != div.found
    assert "bytes 81920..98304 at epoch 5" in div.sentence()


def test_problem_names_a_range_outside_ram():
    assert verify.problem(verify.RangeCheck(0, PS, b"x" * 32), PS) is None
    assert "outside the guest's 4096 bytes" in verify.problem(verify.RangeCheck(PS, PS, b"x" * 32), PS)
    assert "outside" in verify.problem(verify.RangeCheck(0, 0, b"x" * 32), PS)
    assert "digest of 3 bytes" in verify.problem(verify.RangeCheck(0, PS, b"abc"), PS)


def _frame(codec, check):
    pages = np.array([1, 4], np.uint64)
    new = np.full((2, PS), 7, np.uint8)
    return codec.encode(epoch=9, kind=C.KIND_DELTA, page_size=PS, page_numbers=pages, new_pages=new,
                        old_pages=np.zeros_like(new), device_state=b"dev", check=check)


def test_the_check_travels_sealed_in_the_frame():
    codec = C.Codec(b"k" * 32)
    check = verify.RangeCheck(8 * PS, 4 * PS, bytes(range(32)))
    frame = _frame(codec, check)
    d = codec.decode(frame)
    assert d.check == check and d.header.check_len == 48 and d.device_state == b"dev"
    assert codec.decode(_frame(codec, None)).check is None
    assert check.digest not in frame  # inside the AEAD, not in the clear header
    bad = bytearray(frame)
    bad[-20] ^= 1  # a bit of the check section: the frame fails whole
    with pytest.raises(C.IntegrityError):
        codec.decode(bytes(bad))


def test_a_header_with_an_odd_check_length_is_refused_before_the_key():
    frame = bytearray(_frame(C.Codec(b"k" * 32), None))
    off = 4 + 1 + 1 + 4 + 8 + 4 + 4 + 8 + 4  # check_len (u16)
    frame[off:off + 2] = (5).to_bytes(2, "big")
    with pytest.raises(C.FrameFormatError, match="replica check of 5 bytes"):
        C.peek_header(bytes(frame))
