"""Checkpoint frames: round trip, and any corruption is detected, never mis-decoded."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from replication.codec import (KIND_DELTA, KIND_FULL, Codec, CodecError, IntegrityError, TruncatedFrame,
                               apply_delta, peek_header)

KEY = bytes(range(32))
PS = 64


@st.composite
def checkpoints(draw):
    n_total = draw(st.integers(1, 64))
    pages = np.array(sorted(draw(st.sets(st.integers(0, n_total * 3), max_size=n_total))), dtype=np.uint64)
    n = pages.size
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, (n, PS), dtype=np.uint8)
    new = old.copy()
    if n:
        new[:, : draw(st.integers(0, PS))] ^= rng.integers(0, 256, dtype=np.uint8)
        # some pages cleared by the guest, some rewritten: the codec sends those raw
        cleared = rng.random(n) < draw(st.floats(0, 1))
        new[cleared] = 0
        new[cleared, : draw(st.integers(0, 8))] = 7
    dev = draw(st.binary(max_size=300))
    return draw(st.integers(1, 2**40)), pages, new, old, dev


def encode(cp, kind=KIND_DELTA, key=KEY):
    epoch, pages, new, old, dev = cp
    return Codec(key).encode(epoch=epoch, kind=kind, page_size=PS, page_numbers=pages, new_pages=new,
                             old_pages=old if kind == KIND_DELTA else None, device_state=dev)


@given(checkpoints(), st.sampled_from([KIND_DELTA, KIND_FULL]))
def test_round_trip(cp, kind):
    epoch, pages, new, old, dev = cp
    d = Codec(KEY).decode(encode(cp, kind))
    assert d.epoch == epoch and d.kind == kind
    assert np.array_equal(d.page_numbers, pages)
    got = d.new_pages(old)
    assert np.array_equal(got, new)
    assert d.device_state == dev


def test_cleared_pages_travel_raw_changed_words_as_xor():
    rng = np.random.default_rng(1)
    old = rng.integers(0, 256, (64, 4096), dtype=np.uint8)
    new = old.copy()
    new[:32] = 0  # the guest cleared half the pages (its XOR is the whole old content)
    new[32:, :8] ^= 1  # and bumped a counter in the others
    pages = np.arange(64, dtype=np.uint64)
    c = Codec(KEY)
    frame = c.encode(epoch=1, kind=KIND_DELTA, page_size=4096, page_numbers=pages, new_pages=new, old_pages=old)
    d = c.decode(frame)
    assert d.raw_mask.tolist() == [True] * 32 + [False] * 32
    assert np.array_equal(d.new_pages(old), new)
    # XOR alone would carry the old contents of the cleared pages: 128 KB of noise
    assert len(frame) < 2048, len(frame)


@settings(max_examples=200)
@given(checkpoints(), st.data())
def test_any_flipped_bit_is_detected(cp, data):
    frame = bytearray(encode(cp))
    bit = data.draw(st.integers(0, len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(CodecError):
        Codec(KEY).decode(bytes(frame))


@given(checkpoints(), st.data())
def test_any_truncation_is_detected(cp, data):
    frame = encode(cp)
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(CodecError):
        Codec(KEY).decode(frame[:cut])


@given(checkpoints())
def test_wrong_key_is_an_integrity_error(cp):
    with pytest.raises(IntegrityError, match="integrity check"):
        Codec(os.urandom(32)).decode(encode(cp))


def test_device_state_only():
    frame = Codec(KEY).encode(epoch=7, kind=KIND_DELTA, page_size=4096, page_numbers=np.empty(0, np.uint64),
                              new_pages=np.empty((0, 4096), np.uint8), old_pages=np.empty((0, 4096), np.uint8),
                              device_state=b"dev")
    d = Codec(KEY).decode(frame)
    assert d.epoch == 7 and d.page_numbers.size == 0 and d.device_state == b"dev"


def test_header_names_the_epoch_on_truncation():
    frame = encode((42, np.arange(3, dtype=np.uint64), np.ones((3, PS), np.uint8), np.zeros((3, PS), np.uint8), b""))
    assert peek_header(frame).epoch == 42
    with pytest.raises(TruncatedFrame, match="epoch 42"):
        peek_header(frame[:-1])


def test_delta_of_mostly_unchanged_pages_compresses_well():
    rng = np.random.default_rng(0)
    old = rng.integers(0, 256, (256, 4096), dtype=np.uint8)
    new = old.copy()
    new[:, 100:108] = 7  # a few words per page change
    frame = Codec(KEY).encode(epoch=1, kind=KIND_DELTA, page_size=4096, page_numbers=np.arange(256, dtype=np.uint64),
                              new_pages=new, old_pages=old)
    assert len(frame) < new.nbytes / 20


@given(st.binary(min_size=1, max_size=2000), st.data())
def test_device_state_delta_round_trip_and_wrong_base_detected(base, data):
    new = bytearray(base)
    for i in data.draw(st.lists(st.integers(0, len(base) - 1), max_size=5)):
        new[i] ^= 0x5A
    new = bytes(new)
    c = Codec(KEY)
    frame = c.encode(epoch=3, kind=KIND_DELTA, page_size=PS, page_numbers=np.empty(0, np.uint64),
                     new_pages=np.empty((0, PS), np.uint8), old_pages=np.empty((0, PS), np.uint8),
                     device_state=new, device_base=base)
    d = c.decode(frame)
    assert d.header.dev_delta
    assert d.device_state_from(base) == new
    wrong = bytes([base[0] ^ 1]) + base[1:]
    with pytest.raises(IntegrityError):
        d.device_state_from(wrong)
