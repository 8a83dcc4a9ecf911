"""Checkpoint frames: round trip, and any corruption is detected, never mis-decoded."""

from __future__ import annotations

import os

import numpy as np
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings, strategies as st

from replication.codec import (HEADER_SIZE, KIND_DELTA, KIND_FULL, MAX_ZERO_RANGES, VERSION, Codec, CodecError,
                               FrameFormatError, IntegrityError, TruncatedFrame, apply_delta, peek_header)

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


# -- the disk section's zero ranges (format 5) ------------------------------------------------------
@st.composite
def zero_ranges(draw):
    """Ascending, disjoint (first block, blocks) pairs; adjacent ones allowed, huge ones too."""
    out, pos = [], 0
    for _ in range(draw(st.integers(0, 40))):
        first = pos + draw(st.one_of(st.integers(0, 3), st.integers(0, 1 << 30)))
        n = draw(st.one_of(st.integers(1, 4), st.integers(1, 1 << 34)))
        out.append((first, n))
        pos = first + n
    return np.array(out, dtype=np.uint64).reshape(-1, 2)


def _disk_frame(c, zeroes, blocks=np.array([3, 900], np.uint64), epoch=9):
    data = np.zeros((blocks.size, 4096), np.uint8)
    data[:, :5] = 7
    return c.encode(epoch=epoch, kind=KIND_DELTA, page_size=PS, page_numbers=np.empty(0, np.uint64),
                    new_pages=np.empty((0, PS), np.uint8), old_pages=np.empty((0, PS), np.uint8),
                    device_state=b"dev", disk_blocks=blocks if blocks.size else None,
                    disk_data=data if blocks.size else None, disk_zeroes=zeroes)


@given(zero_ranges(), st.booleans())
def test_disk_zero_ranges_round_trip_beside_the_blocks(zeroes, with_blocks):
    c = Codec(KEY)
    blocks = np.array([3, 900], np.uint64) if with_blocks else np.empty(0, np.uint64)
    frame = _disk_frame(c, zeroes, blocks)
    h = peek_header(frame)
    assert h.n_zero_ranges == len(zeroes) and (h.zero_len > 0) == (len(zeroes) > 0)
    d = c.decode(frame)
    if len(zeroes):
        assert d.disk_zeroes.dtype == np.uint64 and np.array_equal(d.disk_zeroes, zeroes)
    else:
        assert d.disk_zeroes is None
    assert (d.disk_blocks is not None) == with_blocks


def test_a_256_mib_zeroing_is_a_few_bytes_of_frame():
    c = Codec(KEY)
    frame = _disk_frame(c, np.array([[256, 65536]], np.uint64), np.empty(0, np.uint64))
    h = peek_header(frame)
    assert h.n_disk_blocks == 0 and h.n_zero_ranges == 1 and h.zero_len < 64
    assert len(frame) < 200, len(frame)


def test_a_tampered_zero_section_or_header_never_decodes():
    c = Codec(KEY)
    frame = _disk_frame(c, np.array([[10, 5], [40, 1 << 20]], np.uint64))
    h = peek_header(frame)
    zero_at = HEADER_SIZE + h.body_len - h.zero_len  # the zero ranges' ciphertext: the last section
    for off in (zero_at, zero_at + h.zero_len - 1):
        bad = bytearray(frame)
        bad[off] ^= 1
        with pytest.raises(IntegrityError):
            c.decode(bytes(bad))
    bad = bytearray(frame)
    bad[56:60] = (1).to_bytes(4, "big")  # one range fewer: associated data, so the tag fails
    with pytest.raises(IntegrityError):
        c.decode(bytes(bad))
    bad[56:60] = (0).to_bytes(4, "big")
    with pytest.raises(FrameFormatError, match="0 disk zero ranges in a"):
        peek_header(bytes(bad))
    bad = bytearray(frame)
    bad[56:60] = (MAX_ZERO_RANGES + 1).to_bytes(4, "big")
    with pytest.raises(FrameFormatError, match="zero ranges: over the limit"):
        peek_header(bytes(bad))


def _reseal(frame: bytes, zero_plain: bytes) -> bytes:
    """The frame with its zero section's plaintext replaced, sealed again with the key: what a
    peer holding the key but with a bug would send."""
    h = peek_header(frame)
    body = AESGCM(KEY).decrypt(h.nonce, frame[HEADER_SIZE:], frame[:HEADER_SIZE])
    z = zstandard.ZstdCompressor().compress(zero_plain)
    body = body[:h.body_len - h.zero_len] + z
    hdr = bytearray(frame[:HEADER_SIZE])
    hdr[56:60] = (len(zero_plain) // 16).to_bytes(4, "big")
    hdr[60:64] = len(z).to_bytes(4, "big")
    hdr[64:72] = len(body).to_bytes(8, "big")
    return bytes(hdr) + AESGCM(KEY).encrypt(h.nonce, body, bytes(hdr))


def test_a_sealed_frame_with_an_impossible_zero_range_is_refused():
    c = Codec(KEY)
    frame = _disk_frame(c, np.array([[10, 5]], np.uint64))
    ok = _reseal(frame, np.array([[10, 5], [0, 3]], ">u8").tobytes())
    assert c.decode(ok).disk_zeroes.tolist() == [[10, 5], [15, 3]]  # gaps of 0: adjacent, fine
    for pairs in ([[10, 0]], [[1 << 40, 1]], [[0, 1 << 40]]):  # empty, or beyond any disk
        with pytest.raises(FrameFormatError, match="disk zero range is empty or beyond any disk"):
            c.decode(_reseal(frame, np.array(pairs, ">u8").tobytes()))
    with pytest.raises(FrameFormatError, match="decompressed sizes"):
        c.decode(_reseal(frame, np.array([[10, 5]], ">u8").tobytes() + b"x"))


def test_zero_ranges_must_be_ascending_and_disjoint_to_be_encoded():
    c = Codec(KEY)
    for bad in ([[10, 5], [12, 1]], [[10, 0]], [[10, 5], [2, 1]]):
        with pytest.raises(ValueError, match="ascending and disjoint"):
            _disk_frame(c, np.array(bad, np.uint64))


def test_a_frame_of_the_previous_format_is_refused_by_version():
    frame = bytearray(_disk_frame(Codec(KEY), None))
    assert frame[4] == VERSION == 5
    frame[4] = 4
    with pytest.raises(FrameFormatError, match="checkpoint frame version 4, this build reads 5"):
        peek_header(bytes(frame))
