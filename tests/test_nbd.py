"""The primary's disk data path (replication/nbd.py): the extent log as a pure core under
hypothesis, and the NBD server against QEMU's own clients (qemu-io, a QEMU with
``-blockdev driver=nbd,...,reconnect-delay=``) and a hand-written client for bad input."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
import structlog
from hypothesis import given, settings, strategies as st

from replication import codec, disksync, nbd
from replication.nbd import BLOCK_SIZE, DiskImageError, ExtentLog, NbdServer

BS = BLOCK_SIZE
IMAGE_BLOCKS = 256  # 1 MiB images: enough room, fast

needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io is not installed (qemu-utils)")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")


# -- the extent log, pure --------------------------------------------------------------------
def _write(log: ExtentLog, image: bytearray, offset: int, data: bytes) -> None:
    with log.lock:
        image[offset:offset + len(data)] = data
        log.record(offset, data, lambda b: bytes(image[b * BS:(b + 1) * BS]))


def _zero(log: ExtentLog, image: bytearray, offset: int, length: int) -> None:
    with log.lock:
        image[offset:offset + length] = bytes(length)
        log.record_zeroes(offset, length, lambda b: bytes(image[b * BS:(b + 1) * BS]))


def _touched(offset: int, length: int) -> set[int]:
    return set(range(offset // BS, (offset + length - 1) // BS + 1))


def _whole(offset: int, length: int) -> set[int]:
    """The blocks a range covers whole."""
    return set(range(-(-offset // BS), (offset + length) // BS))


def _apply(sealed, replica: bytearray) -> None:
    """What the standby does with an epoch: the zero ranges, then the blocks."""
    for first, n in sealed.zero_ranges().tolist():
        replica[first * BS:(first + n) * BS] = bytes(n * BS)
    for b, c in zip(sealed.block_numbers().tolist(), sealed.contents()):
        replica[b * BS:(b + 1) * BS] = c.tobytes()


_op = st.tuples(st.sampled_from(["write", "write", "zero", "seal"]),
                st.one_of(st.integers(0, IMAGE_BLOCKS * BS - 1), st.integers(0, IMAGE_BLOCKS - 1).map(lambda b: b * BS)),
                st.one_of(st.integers(1, 5 * BS), st.integers(1, 40).map(lambda n: n * BS),  # runs past a chunk of the arena
                          st.integers(1, 200).map(lambda n: n * BS)),  # large zeroings
                st.integers(0, 255))


@settings(max_examples=200, deadline=None)
@given(st.lists(_op, max_size=60))
def test_extent_log_gives_each_epochs_end_state_as_zero_ranges_then_blocks(ops):
    """Any mix of writes and zeroings: each sealed epoch, applied to the previous replica as its
    zero ranges then its blocks, is the image at the seal. The blocks are exactly those whose last
    change in the epoch was a write (a partial zeroing is a write of its edge blocks); the ranges
    are exactly the blocks zeroed whole in the epoch, sorted, disjoint and merged; a range counts
    16 bytes against the cap, whatever its length."""
    image = bytearray(IMAGE_BLOCKS * BS)
    replica = bytearray(IMAGE_BLOCKS * BS)
    log = ExtentLog(chunk_blocks=4)  # small arena chunks: runs cross them
    last: dict[int, str] = {}  # block -> its last change in the open epoch: "write" or "zero" (whole)
    zeroed: set[int] = set()  # blocks zeroed whole in the open epoch
    sealed_total = 0

    def check(sealed):
        blocks = sealed.block_numbers().tolist()
        assert set(blocks) == {b for b, k in last.items() if k == "write"}
        ranges = sealed.zero_ranges().tolist()
        covered, prev_end = set(), -1
        for first, n in ranges:
            assert n > 0 and first > prev_end, ranges  # sorted, disjoint, not touching
            prev_end = first + n
            covered |= set(range(first, first + n))
        assert covered == zeroed
        assert sealed.nbytes == len(blocks) * BS + len(ranges) * nbd.ZERO_RANGE_BYTES
        contents = sealed.contents()
        for i, b in enumerate(blocks):
            assert contents[i].tobytes() == bytes(image[b * BS:(b + 1) * BS])
            assert sealed.block(b) == bytes(image[b * BS:(b + 1) * BS])
        pairs = [(int(b), c.tobytes()) for bs_, cs in sealed.by_chunk() for b, c in zip(bs_, cs)]
        assert sorted(pairs) == [(b, bytes(image[b * BS:(b + 1) * BS])) for b in blocks]
        _apply(sealed, replica)
        assert replica == image

    for kind, offset, length, fill in ops + [("seal", 0, 1, 0)]:
        length = min(length, len(image) - offset)
        if kind == "seal":
            epoch = log.epoch
            assert log.open_bytes == log.unsent_bytes - sealed_total
            sealed = log.seal()
            assert sealed.epoch == epoch and log.epoch == epoch + 1 and log.open_blocks == 0
            assert log.open_zero_ranges == 0
            check(sealed)
            sealed_total += sealed.nbytes
            last, zeroed = {}, set()
            continue
        if kind == "write":
            _write(log, image, offset, bytes([fill]) * length)
            last.update(dict.fromkeys(_touched(offset, length), "write"))
        else:
            _zero(log, image, offset, length)
            whole = _whole(offset, length)
            last.update(dict.fromkeys(_touched(offset, length) - whole, "write"))
            last.update(dict.fromkeys(whole, "zero"))
            zeroed |= whole
    assert log.unsent_bytes == sealed_total  # each block and range counted once per epoch


def _image_log(**kw) -> tuple[bytearray, ExtentLog]:
    return bytearray(IMAGE_BLOCKS * BS), ExtentLog(**kw)


def test_a_large_zeroing_is_one_range_not_a_copy_per_block():
    """1 GiB zeroed with partial edges: two edge blocks read back, one range, 16 bytes unsent,
    no arena beyond the edges' chunk (the old log took a 4 KiB slot per block: 1 GiB of arena)."""
    log = ExtentLog()
    reads = []
    with log.lock:
        log.record_zeroes(100, (1 << 30) + 8000, lambda b: reads.append(b) or bytes(BS))
    assert reads == [0, ((1 << 30) + 8100) // BS]
    assert log.open_blocks == 2 and log.open_zero_ranges == 1
    assert log.unsent_bytes == 2 * BS + nbd.ZERO_RANGE_BYTES and log.arena_bytes == nbd.CHUNK_BLOCKS * BS
    sealed = log.seal()
    assert sealed.zero_ranges().tolist() == [[1, (1 << 30) // BS]]
    assert sealed.zeroed_bytes == 1 << 30 and sealed.nbytes == 2 * BS + 16
    assert nbd.ZERO_RANGE_BYTES == codec.ZERO_RANGE_SIZE  # counted as the frame encodes it


def test_zero_ranges_merge_when_they_overlap_or_touch_and_stay_apart_otherwise():
    image, log = _image_log()
    _zero(log, image, 10 * BS, 5 * BS)  # [10, 15)
    _zero(log, image, 20 * BS, 5 * BS)  # [20, 25)
    _zero(log, image, 30 * BS, 2 * BS)  # [30, 32)
    assert log.open_zero_ranges == 3 and log.unsent_bytes == 3 * 16
    _zero(log, image, 15 * BS, 1 * BS)  # touches [10, 15): [10, 16)
    _zero(log, image, 12 * BS, 2 * BS)  # inside: nothing new
    assert log.open_zero_ranges == 3 and log.unsent_bytes == 3 * 16
    _zero(log, image, 16 * BS, 4 * BS)  # fills the gap: [10, 25)
    assert log.open_zero_ranges == 2 and log.unsent_bytes == 2 * 16
    _zero(log, image, 5 * BS, 40 * BS)  # covers all: [5, 45)
    assert log.open_zero_ranges == 1 and log.unsent_bytes == 16
    _zero(log, image, 50 * BS, BS)
    assert log.seal().zero_ranges().tolist() == [[5, 40], [50, 1]]


def test_a_write_after_a_zeroing_is_a_block_and_wins_for_that_block():
    image, log = _image_log()
    image[:] = b"\xee" * len(image)  # what the replica holds too
    replica = bytearray(image)
    _zero(log, image, 0, 64 * BS)
    _write(log, image, 8 * BS, b"w" * BS)  # whole block inside the range
    _write(log, image, 20 * BS + 10, b"p" * 10)  # a partial write inside the range: read back whole
    sealed = log.seal()
    assert sealed.zero_ranges().tolist() == [[0, 64]]
    assert sealed.block_numbers().tolist() == [8, 20]
    assert sealed.block(8) == b"w" * BS and sealed.block(20) == bytes(10) + b"p" * 10 + bytes(BS - 20)
    _apply(sealed, replica)
    assert replica == image


def test_a_zeroing_after_a_write_drops_the_written_blocks_and_reuses_their_slots():
    image, log = _image_log(chunk_blocks=4)
    image[:] = b"\xee" * len(image)  # what the replica holds too
    replica = bytearray(image)
    _write(log, image, 0, b"a" * 8 * BS)  # blocks 0..7: two arena chunks
    _zero(log, image, 2 * BS, 4 * BS)  # blocks 2..5 zeroed whole: their copies are gone
    assert log.open_blocks == 4 and log.unsent_bytes == 4 * BS + 16
    arena = log.arena_bytes
    _write(log, image, 40 * BS, b"b" * 4 * BS)  # new blocks take the freed slots: no new chunk
    assert log.arena_bytes == arena and log.open_blocks == 8
    _zero(log, image, 0, BS)  # block 0 zeroed after its write; touches no range: a second one
    sealed = log.seal()
    assert sealed.block_numbers().tolist() == [1, 6, 7, 40, 41, 42, 43]
    assert sealed.zero_ranges().tolist() == [[0, 1], [2, 4]]
    assert [sealed.block(b) for b in (1, 40)] == [b"a" * BS, b"b" * BS]
    assert sum(len(n) for n, _ in sealed.by_chunk()) == 7
    _apply(sealed, replica)
    assert replica == image


def test_the_partial_blocks_at_a_zeroings_edges_are_recorded_whole():
    image, log = _image_log()
    _write(log, image, 0, b"x" * 4 * BS)
    _zero(log, image, BS + 100, 2 * BS)  # block 1 from byte 100, block 2 whole, block 3 up to byte 99
    _zero(log, image, 10 * BS + 5, 10)  # inside one block: no range at all
    sealed = log.seal()
    assert sealed.zero_ranges().tolist() == [[2, 1]]
    assert sealed.block_numbers().tolist() == [0, 1, 3, 10]
    assert sealed.block(1) == b"x" * 100 + bytes(BS - 100)
    assert sealed.block(3) == bytes(100) + b"x" * (BS - 100)
    assert sealed.block(10) == bytes(BS)


def test_dropping_the_open_epoch_drops_its_zero_ranges_too():
    image, log = _image_log(cap_bytes=BS)
    _zero(log, image, 0, 100 * BS)
    _write(log, image, 200 * BS, b"q" * BS)
    assert log.stop_recording() == BS + 16 and log.unsent_bytes == 0 and log.open_zero_ranges == 0
    log.start_recording()
    _zero(log, image, 0, 8 * BS)
    assert log.start_recording() == 16 and log.unsent_bytes == 0


def test_sealed_contents_are_a_snapshot_not_a_view_of_later_writes():
    image = bytearray(IMAGE_BLOCKS * BS)
    log = ExtentLog()
    _write(log, image, 0, b"\x01" * BS)
    sealed = log.seal(epoch=41)  # numbered by the checkpoint
    _write(log, image, 0, b"\x02" * BS)
    assert sealed.epoch == 41 and sealed.block(0) == b"\x01" * BS
    nxt = log.seal()
    assert nxt.epoch == 42 and nxt.block(0) == b"\x02" * BS


def _writer_waiting(log: ExtentLog, done: threading.Event) -> threading.Thread:
    def run():
        log.wait_under_cap()
        done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    while log.delayed_replies == 0:  # it is inside the wait (the count is taken before waiting)
        time.sleep(0.001)
    return t


def test_backpressure_holds_a_write_reply_until_release_brings_the_backlog_under_the_cap():
    image = bytearray(IMAGE_BLOCKS * BS)
    log = ExtentLog(cap_bytes=2 * BS)
    _write(log, image, 0, b"a" * 2 * BS)
    log.wait_under_cap()  # at the cap: not held
    assert log.delayed_replies == 0
    _write(log, image, 8 * BS, b"b" * 2 * BS)  # 4 blocks unsent > cap
    done = threading.Event()
    t = _writer_waiting(log, done)
    log.seal()  # sealing does not send anything: still held
    log.release(BS)  # 3 blocks unsent: still over
    assert not done.is_set()
    log.release(BS)  # 2 blocks: at the cap
    t.join(timeout=60)
    assert not t.is_alive()
    assert done.is_set() and log.unsent_bytes == 2 * BS


def test_backpressure_lets_held_replies_go_while_the_checkpoint_stops_the_guest():
    """QEMU's `stop` waits for in-flight writes: a reply held until a release that only the
    next checkpoint can bring would deadlock it."""
    image = bytearray(IMAGE_BLOCKS * BS)
    log = ExtentLog(cap_bytes=BS)
    _write(log, image, 0, b"a" * 2 * BS)
    done = threading.Event()
    t = _writer_waiting(log, done)
    log.checkpoint_starting()
    t.join(timeout=60)
    assert not t.is_alive()
    log.wait_under_cap()  # until seal, writes are not held
    log.seal()
    done2 = threading.Event()
    t2 = _writer_waiting(log, done2)  # after seal the cap applies again
    assert not done2.is_set()
    log.close()
    t2.join(timeout=60)
    assert not t2.is_alive()


def test_with_recording_off_nothing_is_kept_and_the_cap_holds_nothing():
    """No session (recording off): the open epoch is dropped, writes are not recorded, a reply held
    by the cap goes at once. `start_recording` drops what the open epoch holds and records again."""
    image = bytearray(IMAGE_BLOCKS * BS)
    log = ExtentLog(cap_bytes=BS)
    _write(log, image, 0, b"a" * 4 * BS)
    sealed = log.seal()
    _write(log, image, 8 * BS, b"b" * 2 * BS)  # 6 blocks unsent: over the cap
    done = threading.Event()
    t = _writer_waiting(log, done)
    assert log.stop_recording() == 2 * BS  # the open epoch's 2 blocks; the sealed 4 stay until released
    t.join(timeout=60)
    assert not t.is_alive() and done.is_set()
    assert log.open_blocks == 0 and log.arena_bytes == 0 and log.unsent_bytes == 4 * BS
    _write(log, image, 16 * BS, b"c" * 40 * BS)  # not recorded, and not held though over the cap
    log.wait_under_cap()
    assert log.open_blocks == 0 and log.unsent_bytes == 4 * BS and log.delayed_replies == 1
    log.release(sealed.nbytes)
    log.record_zeroes(0, BS, lambda b: bytes(BS))
    assert log.open_blocks == 0 and log.unsent_bytes == 0
    log.recording = True  # as the server had it on: start_recording drops what it holds
    _write(log, image, 0, b"d" * BS)
    assert log.start_recording() == BS and log.open_blocks == 0 and log.unsent_bytes == 0
    _write(log, image, 4 * BS, b"e" * BS)
    nxt = log.seal()
    assert list(nxt.block_numbers()) == [4] and nxt.block(4) == b"e" * BS


# -- the server against QEMU's clients ------------------------------------------------------
@pytest.fixture
def served(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_BLOCKS * BS))
    server = NbdServer(image, tmp_path / "nbd.sock")
    server.start()
    yield server
    server.close()


def _uri(server: NbdServer) -> str:
    return f"nbd+unix:///?socket={server.socket_path}"


def qemu_io(server: NbdServer, commands: list[str], check: bool = True,
            discard: str = "ignore") -> subprocess.CompletedProcess:
    """Run qemu-io on the server with the commands on its stdin (no length limit); ``discard``:
    qemu-io's discard mode ("unmap" passes discards and unmapping zero writes on)."""
    p = subprocess.run(["qemu-io", "-f", "raw", "-d", discard, _uri(server)], input="\n".join(commands) + "\nquit\n",
                       capture_output=True, text=True, timeout=60)
    if check:
        assert p.returncode == 0, (p.stderr, p.stdout[-2000:])
        assert "fail" not in p.stdout.lower() and "error" not in p.stdout.lower(), p.stdout[-2000:]
    return p


def test_the_socket_is_private_and_bad_images_are_refused_with_a_sentence(tmp_path, served):
    assert stat.S_IMODE(served.socket_path.stat().st_mode) == 0o600
    with pytest.raises(DiskImageError, match="does not exist"):
        NbdServer(tmp_path / "nope.raw", tmp_path / "x.sock").start()
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(BS + 512))
    with pytest.raises(DiskImageError, match="not a positive multiple of 4096"):
        NbdServer(odd, tmp_path / "y.sock").start()


@needs_qemu_io
def test_qemu_io_writes_read_back_byte_exact_also_unaligned_and_zeroed(served):
    qemu_io(served, [
        "write -P 0xab 0 8k", "write -z 4096 1000", "write -P 0xcd 5000 100", "write -P 0x11 65536 300000",
        "aio_flush", "write -P 0x22 -f 131072 4096",  # -f: FUA
        "read -P 0xab 0 4096", "read -P 0 4096 904",
        "read -P 0xcd 5000 100", "read -P 0xab 5100 3092", "read -P 0x11 65536 65536",
        "read -P 0x22 131072 4096", "read -P 0x11 135168 230368",
    ])
    want = bytearray(IMAGE_BLOCKS * BS)
    want[0:8192] = b"\xab" * 8192
    want[4096:5096] = bytes(1000)
    want[5000:5100] = b"\xcd" * 100
    want[65536:365536] = b"\x11" * 300000
    want[131072:135168] = b"\x22" * 4096
    assert served.image.read_bytes() == bytes(want)
    sealed = served.seal()
    assert set(sealed.block_numbers().tolist()) == {0, 1} | _touched(65536, 300000)
    for b in sealed.block_numbers().tolist():
        assert sealed.block(b) == bytes(want[b * BS:(b + 1) * BS])


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def _complement(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    for a, b in ranges:
        if a > pos:
            out.append((pos, a))
        pos = b
    return out + ([(pos, size)] if pos < size else [])


@needs_qemu_io
def test_zeroing_and_trim_punch_holes_no_hole_stays_allocated_and_each_is_one_range(served):
    """WRITE_ZEROES that may unmap and TRIM punch holes in the image (it stays sparse);
    WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE (qemu-io without -u) leaves the zeros allocated.
    Each is one zero range in the epoch, no block copies; a partial zeroing records its edges."""
    data = bytes(random.Random(3).randbytes(IMAGE_BLOCKS * BS))
    served.image.write_bytes(data)
    served.seal()
    assert _allocated(served.image) == IMAGE_BLOCKS * BS
    qemu_io(served, ["write -z -u 64k 256k", "discard 512k 128k", "write -z 768k 64k",
                     "write -z -u 901k 12k"], discard="unmap")
    want = bytearray(data)
    for off, n in ((64 << 10, 256 << 10), (512 << 10, 128 << 10), (768 << 10, 64 << 10), (901 << 10, 12 << 10)):
        want[off:off + n] = bytes(n)
    assert served.image.read_bytes() == bytes(want)
    fd = os.open(served.image, os.O_RDONLY)
    try:
        holes = _complement(disksync.data_ranges(fd, served.size), served.size)
    finally:
        os.close(fd)
    for hole in ((64 << 10, 320 << 10), (512 << 10, 640 << 10), (904 << 10, 912 << 10)):  # 901k..913k: 2 whole blocks
        assert any(a <= hole[0] and hole[1] <= b for a, b in holes), (hole, holes)
    # NO_HOLE: 768k..832k stays allocated (ext4 may report it as a hole to SEEK_DATA: unwritten
    # extents); the file's blocks count it, give or take an extent-tree block
    punched = (256 << 10) + (128 << 10) + (8 << 10)
    assert 0 <= _allocated(served.image) - (IMAGE_BLOCKS * BS - punched) <= 2 * BS
    sealed = served.seal()
    assert sealed.zero_ranges().tolist() == [[16, 64], [128, 32], [192, 16], [226, 2]]
    assert sealed.block_numbers().tolist() == [225, 228]  # the edges of 901k..913k, read back whole
    assert sealed.block(225) == bytes(want[225 * BS:226 * BS])
    assert sealed.nbytes == 2 * BS + 4 * nbd.ZERO_RANGE_BYTES


@needs_qemu_io
@pytest.mark.parametrize("seed", [1, 2])
def test_a_random_write_pattern_is_recorded_as_exactly_the_blocks_it_touched(served, seed):
    rng = random.Random(seed)
    want = bytearray(IMAGE_BLOCKS * BS)
    epochs = []
    for _ in range(3):
        cmds, touched = [], set()
        for _ in range(150):
            length = rng.choice([512, 4096, 4096, 8192, 65536, rng.randrange(1, 20000)])
            offset = rng.randrange(0, len(want) - length)
            if rng.random() < 0.5:
                offset -= offset % 4096
            fill = rng.randrange(1, 256)
            cmds.append(f"aio_write -P {fill} {offset} {length}" if rng.random() < 0.7
                        else f"write -P {fill} {offset} {length}")
            cmds.append("aio_flush")  # keep writes to overlapping ranges in order
            want[offset:offset + length] = bytes([fill]) * length
            touched |= _touched(offset, length)
        qemu_io(served, cmds)
        epochs.append((served.seal(), touched, bytes(want)))
    image = served.image.read_bytes()
    assert image == bytes(want)
    for sealed, touched, snapshot in epochs:
        assert set(sealed.block_numbers().tolist()) == touched
        c = sealed.contents()
        for i, b in enumerate(sealed.block_numbers().tolist()):
            assert c[i].tobytes() == snapshot[b * BS:(b + 1) * BS]


@needs_qemu_io
def test_sealing_under_concurrent_writers_puts_each_write_in_exactly_one_epoch(served):
    """Four qemu-io clients write disjoint blocks (each once, content = its block number)
    while epochs are sealed as fast as possible: the epochs' block sets are disjoint and
    their union is every block written, with the right content."""
    writers = 4
    blocks = list(range(IMAGE_BLOCKS))
    procs = []
    for w in range(writers):
        mine = blocks[w::writers]
        script = "\n".join(f"write -P {b % 251 + 1} {b * BS} {BS}" for b in mine) + "\nquit\n"
        p = subprocess.Popen(["qemu-io", "-f", "raw", _uri(served)], stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        p.stdin.write(script)
        p.stdin.close()
        procs.append(p)
    epochs = []
    while any(p.poll() is None for p in procs):
        epochs.append(served.seal())
    epochs.append(served.seal())
    assert all(p.wait() == 0 for p in procs)
    seen: dict[int, int] = {}
    for e in epochs:
        for b in e.block_numbers().tolist():
            assert b not in seen, f"block {b} in epochs {seen[b]} and {e.epoch}"
            seen[b] = e.epoch
            assert e.block(b) == bytes([b % 251 + 1]) * BS
    assert sorted(seen) == blocks
    assert sum(len(e) for e in epochs) == len(blocks)
    assert len([e for e in epochs if len(e)]) > 1  # the writes really were cut into several epochs


@needs_qemu_io
def test_write_replies_are_held_over_the_cap_until_release(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_BLOCKS * BS))
    server = NbdServer(image, tmp_path / "nbd.sock", cap_bytes=BS)
    server.start()
    try:
        p = subprocess.Popen(["qemu-io", "-f", "raw", _uri(server), "-c", "write -P 1 0 8k", "-c", "write -P 2 8k 8k"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while server.extents.delayed_replies == 0:
            assert p.poll() is None, p.communicate()
            time.sleep(0.005)
        assert p.poll() is None  # the first write's reply is held: qemu-io waits
        server.seal()
        server.release(2 * BS)  # the first write's 8 KiB left; the second write goes over again
        while server.extents.delayed_replies == 1:
            assert p.poll() is None
            time.sleep(0.005)
        server.release(BS)
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert "wrote 8192/8192 bytes at offset 8192" in out
    finally:
        server.close()


@needs_qemu_io
def test_a_client_that_leaves_and_comes_back_is_served_again(served):
    qemu_io(served, ["write -P 0x42 0 4k"])
    qemu_io(served, ["read -P 0x42 0 4k", "write -P 0x43 4k 4k"])
    qemu_io(served, ["read -P 0x43 4k 4k"])
    assert served.connections == 0 or _eventually(lambda: served.connections == 0)


def _eventually(pred) -> bool:
    for _ in range(2000):
        if pred():
            return True
        time.sleep(0.005)
    return False


class Qmp:
    """A QEMU with a disk on the server, driven over QMP on its stdio."""

    def __init__(self, socket_path: Path):
        self.p = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio",
             "-blockdev", f"driver=nbd,server.type=unix,server.path={socket_path},node-name=d0,reconnect-delay=10"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        json.loads(self.p.stdout.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args) -> tuple[dict, str]:
        """The reply, and the text QEMU printed on its stdout meanwhile (HMP qemu-io prints there)."""
        self.p.stdin.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.p.stdin.flush()
        text = ""
        while True:
            line = self.p.stdout.readline()
            assert line, self.p.stderr.read()
            if not line.startswith("{"):
                text += line
                continue
            msg = json.loads(line)
            if "return" in msg or "error" in msg:
                return msg, text

    def qemu_io(self, command: str) -> str:
        r, text = self.cmd("human-monitor-command", **{"command-line": f'qemu-io d0 "{command}"'})
        assert "return" in r, r
        return text + r["return"]

    def quit(self):
        self.cmd("quit")
        self.p.wait(timeout=30)


@needs_qemu
def test_qemu_with_reconnect_delay_carries_on_across_dropped_connections_and_a_server_restart(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_BLOCKS * BS))
    sock = tmp_path / "nbd.sock"
    server = NbdServer(image, sock)
    server.start()
    q = Qmp(sock)
    try:
        assert "wrote 4096/4096" in q.qemu_io("write -P 0x61 0 4k")
        server.drop_connections()  # QEMU reconnects on the next request
        assert "wrote 4096/4096" in q.qemu_io("write -P 0x62 4k 4k")
        first = server.seal()
        server.close()  # the daemon restarts: a new server on the same socket, a new extent log
        server = NbdServer(image, sock)
        server.start()
        out = q.qemu_io("read -P 0x62 4k 4k")
        assert "read 4096/4096" in out and "fail" not in out.lower()
        assert "wrote 4096/4096" in q.qemu_io("write -P 0x63 8k 4k")
        assert set(first.block_numbers().tolist()) == {0, 1}
        assert server.seal().block_numbers().tolist() == [2]
    finally:
        q.quit()
        server.close()


# -- bad input: a hand-written client --------------------------------------------------------
class Client:
    def __init__(self, path: Path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(30)
        self.s.connect(str(path))

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            k = self.s.recv(n - len(buf))
            if not k:
                raise EOFError
            buf += k
        return buf

    def hello(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT) and flags & nbd.FLAG_FIXED_NEWSTYLE
        self.s.sendall(struct.pack(">I", nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES))

    def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, opt, len(data)) + data)
        replies = []
        while True:
            magic, o, rtype, length = struct.unpack(">QIII", self.recv(20))
            assert magic == nbd.REPLY_MAGIC and o == opt
            replies.append((rtype, self.recv(length)))
            if rtype != nbd.REP_INFO and rtype != nbd.REP_SERVER:
                return replies

    def go(self, name: bytes = b"") -> list[tuple[int, bytes]]:
        return self.option(nbd.OPT_GO, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE))

    def request(self, cmd: int, offset: int, length: int, payload: bytes = b"", flags: int = 0,
                cookie: int = 7) -> tuple[int, bytes]:
        self.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload)
        magic, err, c = struct.unpack(">IIQ", self.recv(16))
        assert magic == nbd.SIMPLE_REPLY_MAGIC and c == cookie
        data = self.recv(length) if cmd == nbd.CMD_READ and err == 0 else b""
        return err, data

    def closed(self) -> bool:
        try:
            return self.s.recv(1) == b""
        except ConnectionResetError:
            return True


def test_the_handshake_offers_what_qemu_asks_for_and_refuses_the_rest(served):
    c = Client(served.socket_path)
    c.hello()
    assert c.option(nbd.OPT_LIST) == [(nbd.REP_SERVER, struct.pack(">I", 0)), (nbd.REP_ACK, b"")]
    assert c.option(8)[0][0] == nbd.REP_ERR_UNSUP  # structured replies: QEMU falls back to simple ones
    assert c.option(nbd.OPT_STARTTLS)[0][0] == nbd.REP_ERR_POLICY
    assert c.go(b"other")[0][0] == nbd.REP_ERR_UNKNOWN
    info = c.option(nbd.OPT_INFO, struct.pack(">IH", 0, 0))
    assert info[0] == (nbd.REP_INFO, struct.pack(">HQH", nbd.INFO_EXPORT, served.size, nbd.TRANSMISSION_FLAGS))
    replies = c.go()
    assert replies[-1][0] == nbd.REP_ACK
    assert (nbd.REP_INFO, struct.pack(">HIII", nbd.INFO_BLOCK_SIZE, 1, BS, nbd.MAX_PAYLOAD)) in replies
    assert c.request(nbd.CMD_WRITE, 0, 5, b"hello") == (0, b"")
    assert c.request(nbd.CMD_READ, 0, 5) == (0, b"hello")
    assert c.request(nbd.CMD_FLUSH, 0, 0) == (0, b"")
    c.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 9, 0, 0))
    assert c.closed()
    c2 = Client(served.socket_path)  # the old-style EXPORT_NAME ending of the handshake
    c2.hello()
    c2.s.sendall(struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_EXPORT_NAME, 0))
    assert struct.unpack(">QH", c2.recv(10)) == (served.size, nbd.TRANSMISSION_FLAGS)
    assert c2.request(nbd.CMD_READ, 0, 5) == (0, b"hello")


def test_requests_beyond_the_image_and_unknown_commands_get_nbd_errors(served):
    c = Client(served.socket_path)
    c.hello()
    c.go()
    end = served.size
    assert c.request(nbd.CMD_READ, end - 10, 20)[0] == nbd.NBD_EINVAL
    assert c.request(nbd.CMD_WRITE, end - 10, 20, b"x" * 20)[0] == nbd.NBD_ENOSPC
    assert c.request(nbd.CMD_WRITE_ZEROES, end, 4096)[0] == nbd.NBD_ENOSPC
    assert c.request(nbd.CMD_TRIM, end - 4096, 8192)[0] == nbd.NBD_EINVAL
    assert c.request(nbd.CMD_CACHE, 0, 4096)[0] == nbd.NBD_EINVAL  # not advertised
    assert c.request(99, 0, 0)[0] == nbd.NBD_EINVAL
    assert c.request(nbd.CMD_WRITE, end - 4, 4, b"tail") == (0, b"")  # the connection still works
    assert c.request(nbd.CMD_READ, end - 4, 4) == (0, b"tail")
    assert served.seal().block_numbers().tolist() == [IMAGE_BLOCKS - 1]  # refused writes left no extent


@needs_qemu_io
@pytest.mark.parametrize("phase,garbage", [
    ("handshake", b"GET / HTTP/1.1\r\n\r\n"),  # not NBD at all
    ("handshake", struct.pack(">I", 0)),  # a client without fixed newstyle
    ("handshake", struct.pack(">I", 3) + struct.pack(">QII", 0xDEAD, 7, 0)),  # a bad option magic
    ("handshake", struct.pack(">I", 3) + struct.pack(">QII", nbd.IHAVEOPT, 7, 1 << 30)),  # an absurd option
    ("transmission", b"x" * 28),  # garbage instead of a request
    ("transmission", struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 1 << 30)),  # 1 GiB write
])
def test_garbage_closes_that_connection_with_a_log_line_and_the_server_serves_on(served, phase, garbage):
    c = Client(served.socket_path)
    with structlog.testing.capture_logs() as logs:
        if phase == "transmission":
            c.hello()
            c.go()
        else:
            c.recv(18)
        c.s.sendall(garbage)
        assert c.closed()
        assert _eventually(lambda: any(e["event"] == "nbd.protocol_violation" for e in logs))
    qemu_io(served, ["write -P 0x33 0 4k", "read -P 0x33 0 4k"])


def test_close_wakes_a_connection_blocked_on_backpressure_and_removes_the_socket(tmp_path):
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(IMAGE_BLOCKS * BS))
    server = NbdServer(image, tmp_path / "nbd.sock", cap_bytes=0)
    server.start()
    c = Client(server.socket_path)
    c.hello()
    c.go()
    c.s.sendall(struct.pack(">IHHQQI", nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 4) + b"abcd")
    assert _eventually(lambda: server.extents.delayed_replies == 1)
    server.close()  # returns: the held connection was woken and dropped
    assert not server.socket_path.exists()
    assert image.read_bytes()[:4] == b"abcd"
