"""The guest's disk in the checkpoint pipeline (docs/disk.md): epoch N's disk blocks travel in
N's frame under its AEAD and the standby applies them together with N's RAM, whole or not at
all.

End to end: the real Primary, codec, channel, Standby and replica, and a real QEMU whose disk
is ``-blockdev driver=nbd,server.type=unix,...,reconnect-delay=`` served by NbdServer over a
16 MiB raw image. QEMU writes that disk (HMP ``qemu-io aio_write``, i.e. QEMU's own block
layer, with writes in flight when ``stop`` comes) and is stopped and continued by each
checkpoint over QMP; the RAM is a stand-in written between pauses (tests/test_replica_verify.py),
as no guest with a disk exists yet. Store-level crashes and full disks go through the same
seams as tests/test_store.py and tests/test_store_faults.py."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import structlog
from qemu.qmp import QMPClient, QMPError

from replication import codec as codec_mod
from replication import disksync, transport
from replication.capture import Capture
from replication import nbd as nbd_mod
from replication.nbd import NbdServer
from replication.primary import Primary, PrimaryConfig
from replication.standby import Standby
from replication.store import Replica, ReplicaError, ReplicaStorageError
from tests import disk_replica_worker as DW
from tests import replica_worker as W
from tests.test_primary_pause import NullGate
from tests.test_replica_verify import PS, RAM, StandInGuest, until
from tests.test_store_faults import Faults

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None,
                                reason="qemu-system-x86_64 is not installed")
DISK = 16 << 20


def _h(data) -> bytes:
    return hashlib.blake2b(memoryview(data), digest_size=16).digest()


# -- the guest: stand-in RAM, a real QEMU writing its disk over NBD ----------------------------
class DiskGuest(StandInGuest):
    """`stop`/`cont` go to a real QEMU (-machine none) whose only device is the NBD disk; a writer
    task issues `qemu-io aio_write` to it while the guest runs. At each `stop` the primary's image
    and RAM are hashed: what the standby must hold once it commits that epoch."""

    def __init__(self, ram_path: Path, tmp: Path, nbd_sock: Path, image: Path):
        super().__init__(ram_path)
        self.tmp, self.nbd_sock, self.image = tmp, nbd_sock, image
        self.proc: subprocess.Popen | None = None
        self.qmp = QMPClient("disk-guest")
        self.io = asyncio.Lock()  # a disk write is issued only while running, and never across a stop
        self.primary: Primary | None = None
        self.snapshots: dict[int, tuple[bytes, bytes]] = {}  # epoch -> (hash of image, hash of RAM)
        self.disk_writes = 0
        self.disk_rng = np.random.default_rng(11)
        self.take_snapshots = True  # hash image and RAM at each stop (off for a large disk)

    async def start(self) -> None:
        qmp_path = self.tmp / "qmp.sock"
        self.proc = subprocess.Popen(
            ["qemu-system-x86_64", "-machine", "none", "-nodefaults", "-display", "none",
             "-qmp", f"unix:{qmp_path},server=on,wait=off",
             "-blockdev", f"driver=nbd,server.type=unix,server.path={self.nbd_sock},node-name=d0,reconnect-delay=10,"
                          "discard=unmap"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1000):  # the socket file appears at bind, before QEMU listens on it
            try:
                await self.qmp.connect(str(qmp_path))
                return
            except QMPError:
                assert self.proc.poll() is None, "QEMU exited"
                await asyncio.sleep(0.01)
        raise AssertionError(f"QEMU did not answer on {qmp_path}")

    async def close(self) -> None:
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), 10)
            except (QMPError, EOFError, asyncio.TimeoutError):
                self.proc.kill()
            try:
                await self.qmp.disconnect()
            except EOFError:  # QEMU quit first: the connection is gone either way
                pass
            self.proc.wait(timeout=30)

    async def stop_vcpus(self):
        async with self.io:
            self.running = False
            await self.qmp.execute("stop")  # QEMU completes the writes in flight first
            n = self.primary.status.epoch + 1  # the pause of that epoch runs now
            if self.take_snapshots:
                self.snapshots[n] = await asyncio.to_thread(
                    lambda: (_h(self.image.read_bytes()), _h(self.ram)))

    async def cont(self):
        async with self.io:
            await self.qmp.execute("cont")
            self.running = True

    async def write_sync(self, offset: int, length: int, pattern: int, timeout: float = 30.0) -> float:
        """One write through QEMU's block layer that returns only once the NBD server has answered
        it (HMP ``qemu-io write``, a queue depth of one); issued while the guest runs. Returns the
        seconds it took, the wait for the guest to run excluded."""
        return await self.io_sync(f"write -P {pattern} {offset} {length}", f"a {length}-byte write at {offset}",
                                  timeout)

    async def io_sync(self, command: str, what: str, timeout: float = 30.0) -> float:
        """One ``qemu-io`` command on the disk, issued while the guest runs, waited for."""
        while True:
            async with self.io:
                if self.running:
                    t0 = time.monotonic()
                    try:
                        await asyncio.wait_for(self.qmp.execute(
                            "human-monitor-command", {"command-line": f'qemu-io d0 "{command}"'}), timeout)
                    except asyncio.TimeoutError:
                        raise AssertionError(f"{what} got no reply within {timeout:g}s "
                                             "(held by the disk cap with nothing to release it)") from None
                    return time.monotonic() - t0
            await asyncio.sleep(0.001)

    async def write_disk_forever(self):
        rng = self.disk_rng
        while True:
            await asyncio.sleep(0.002)
            async with self.io:
                if not (self.running and self.writing):
                    continue
                length = int(rng.choice([512, 4096, 4096, 8192, 65536, int(rng.integers(1, 20000))]))
                hot = int(rng.random() < 0.7)  # mostly the first 1 MiB: blocks rewritten across epochs
                span = (1 << 20) if hot else DISK
                offset = int(rng.integers(0, span - length))
                if rng.random() < 0.5:
                    offset -= offset % 4096
                cmd = f"aio_write -P {int(rng.integers(1, 256))} {offset} {length}"
                if rng.random() < 0.05:
                    cmd = f"aio_write -z {offset - offset % 4096} 8192"  # WRITE_ZEROES
                await self.qmp.execute("human-monitor-command", {"command-line": f'qemu-io d0 "{cmd}"'})
                self.disk_writes += 1


class DropsOneDiskBlock(Primary):
    """The deliberately broken variant: once armed, one disk block is left out of one frame."""

    armed = False
    dropped: int | None = None

    def _encode_epoch(self, codec, n, dirty, dev, base, check, sealed):
        if self.armed and sealed is not None and len(sealed) >= 2:
            self.armed = False
            blocks, data = sealed.block_numbers(), sealed.contents()
            i = blocks.size // 2
            self.dropped = int(blocks[i])
            keep = np.arange(blocks.size) != i
            return codec.encode(epoch=n, kind=codec_mod.KIND_DELTA, page_size=PS, page_numbers=dirty.page_numbers,
                                new_pages=dirty.new_pages, old_pages=dirty.old_pages, device_state=dev,
                                device_base=base, check=check, disk_blocks=blocks[keep], disk_data=data[keep])
        return super()._encode_epoch(codec, n, dirty, dev, base, check, sealed)


class Peak:
    """Samples the disk server's unsent bytes and the open epoch's arena in a thread (every ~0.5 ms)."""

    def __init__(self, nbd: NbdServer):
        self.ext, self.unsent, self.arena, self.samples = nbd.extents, 0, 0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.0005):
            self.unsent = max(self.unsent, self.ext.unsent_bytes)
            self.arena = max(self.arena, self.ext.arena_bytes)
            self.samples += 1

    def stop(self) -> "Peak":
        self._stop.set()
        self._t.join()
        return self


class DiskPair:
    def __init__(self, tmp: Path, *, primary_disk: int = DISK, replica_disk: int | None = DISK,
                 primary_cls=Primary, image_init=None, cap_bytes: int | None = None):
        ram_path = tmp / "guest.ram"
        ram_path.write_bytes(np.random.default_rng(1).integers(0, 256, RAM, dtype=np.uint8).tobytes())
        self.image = tmp / "disk.raw"
        with open(self.image, "wb") as f:
            f.truncate(primary_disk)  # sparse
        if image_init:
            image_init(self.image)
        self.nbd = NbdServer(self.image, tmp / "nbd.sock", cap_bytes=cap_bytes)
        self.refuse = False  # the standby cannot be reached: no session
        self.checkpoint_send_s = 0.0  # a slow WAN: each checkpoint takes this long to leave
        self.ch = None
        self.guest = DiskGuest(ram_path, tmp, self.nbd.socket_path, self.image)
        self.capture = Capture(ram_path, RAM)
        self.replica_disk = None
        if replica_disk is not None:
            self.replica_disk = tmp / "replica-disk.raw"
            with open(self.replica_disk, "wb") as f:
                f.truncate(replica_disk)
        self.replica = Replica(tmp / "replica", RAM, fsync=False, disk=self.replica_disk)
        self.replica.open()
        self.standby = Standby(self.replica, {}, "site-b", refuse_delay_s=0)
        cfg = PrimaryConfig(site="site-a", compat={}, run_id="run", interval_ms=20, verify_bytes_per_epoch=0)
        self.nbd.start()
        self.primary = primary_cls(cfg, self.guest, self.capture, NullGate(), connect=self._connect, nbd=self.nbd)
        self.guest.primary = self.primary
        self.port = 0
        self.tasks: list[asyncio.Task] = []

    async def _connect(self):
        if self.refuse:
            raise OSError("the standby is unreachable (test)")
        ch = await transport.connect("127.0.0.1", self.port)
        send = ch.send

        async def send_slowly(mtype, payload=b""):
            if mtype is transport.MsgType.CHECKPOINT and self.checkpoint_send_s:
                await asyncio.sleep(self.checkpoint_send_s)
            await send(mtype, payload)

        ch.send = send_slowly
        self.ch = ch
        return ch

    async def __aenter__(self):
        await self.guest.start()
        self.server = await transport.serve("127.0.0.1", 0, self.standby.handle, max_frame=RAM + (16 << 20))
        self.port = self.server.sockets[0].getsockname()[1]
        self.tasks = [asyncio.create_task(self.primary.run()), asyncio.create_task(self.guest.write_forever()),
                      asyncio.create_task(self.guest.write_disk_forever())]
        return self

    async def __aexit__(self, *exc):
        self.primary.stop()
        for t in self.tasks:
            t.cancel()
        _, stuck = await asyncio.wait(self.tasks, timeout=30)
        if stuck:  # a checkpoint's `stop` waits for a write the cap holds (a deadlock): closing the server ends it
            self.nbd.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.guest.close()
        self.server.close()
        self.nbd.close()
        self.capture.close()
        self.replica.close()

    def protected_past(self, epoch: int) -> bool:
        return self.primary.status.state == "protected" and self.primary.status.committed_epoch > epoch

    async def quiesce(self) -> None:
        """No more writes; wait until the standby committed an epoch taken after the last one."""
        self.guest.writing = False
        async with self.guest.io:  # a write in flight ends (QEMU's next stop drains it anyway)
            pass
        mark = self.primary.status.epoch + 1
        await until(lambda: self.protected_past(mark), timeout=60, what=f"an acknowledged epoch after {mark}")
        await self.standby.wait_applied()  # the ACK says durable; the apply follows it

    async def committed_matches_snapshot(self) -> int:
        """Under the standby's lock (no apply running): the replica's disk and RAM are both the
        primary's at the committed epoch N. Returns N."""
        async with self.standby._lock:
            n = self.replica.committed_epoch
            disk = await asyncio.to_thread(self.replica_disk.read_bytes)
            got = (_h(disk), _h(self.replica.ram))
        want = self.guest.snapshots[n]
        assert got[0] == want[0], f"the replica disk is not the primary's image at the committed epoch {n}"
        assert got[1] == want[1], f"the replica RAM is not the guest's at the committed epoch {n}"
        return n

    def disk_equal(self) -> bool:
        with open(self.replica_disk, "rb") as a, open(self.image, "rb") as b:
            while True:
                x, y = a.read(8 << 20), b.read(8 << 20)
                if x != y:
                    return False
                if not x:
                    return True


@needs_qemu
async def test_disk_and_ram_of_every_committed_epoch_are_the_primarys_and_the_wire_carries_them(tmp_path):
    async with DiskPair(tmp_path) as pair:
        await until(lambda: pair.protected_past(3), timeout=60, what="protection")
        checked = set()
        while len(checked) < 6:  # several committed epochs, mid-run, under write load
            await asyncio.sleep(0.05)
            checked.add(await pair.committed_matches_snapshot())
        await until(lambda: pair.guest.disk_writes >= 300, timeout=120, what="300 disk writes")
        await pair.quiesce()
        assert pair.disk_equal() and np.array_equal(pair.replica.ram, pair.guest.ram)
        await pair.committed_matches_snapshot()
        st = pair.primary.status
        recs = [r for r in pair.primary.history if r.disk_blocks]
        assert st.disk_blocks_total > 0 and recs
        assert st.sessions == 1 and pair.standby.status.rejected_frames == 0
        assert pair.nbd.extents.unsent_bytes == pair.nbd.extents.open_bytes  # every sealed byte released
        disk_raw = sum(r.disk_bytes for r in pair.primary.history)
        wire = sum(r.wire_bytes for r in pair.primary.history)
        print(f"\n{len(pair.primary.history)} epochs, {pair.guest.disk_writes} disk writes: "
              f"{st.disk_blocks_total} disk blocks ({disk_raw} bytes raw) in epochs with disk "
              f"{len(recs)}; frames on the wire {wire} bytes in all; initial disk sync "
              f"{st.last_disk_sync_chunks} chunks, {st.last_disk_sync_bytes} bytes")


BIG_DISK = 288 << 20
ZEROED = 256 << 20


def _disk_section_bytes(h: codec_mod.FrameHeader) -> int:
    """A frame's disk section on the wire (block index, contents and zero ranges, compressed)."""
    return h.body_len - (h.index_len + h.pages_len + h.dev_len + h.check_len)


@needs_qemu
async def test_a_256_mib_zeroing_travels_as_a_range_and_the_replica_disk_equals_the_image(tmp_path):
    """QEMU zeroes 256 MiB (with unaligned edges) of a 288 MiB disk that holds replicated data
    there: the checkpoints carry zero ranges and a few edge blocks (the disk section is about a
    hundred bytes; it was every one of the 65 537 blocks before), the open epoch's arena holds at most the
    edges' chunk (it was 256 MiB), the primary's image is sparse there afterwards, and the
    replica disk equals the image."""
    async with DiskPair(tmp_path, primary_disk=BIG_DISK, replica_disk=BIG_DISK) as pair:
        pair.guest.writing = False
        pair.guest.take_snapshots = False  # hashing 288 MiB at every stop would be the test's whole time
        await until(lambda: pair.protected_past(1), timeout=60, what="protection")
        start = (16 << 20) + 512
        for i in range(8):  # 8 MiB of data inside the range, replicated as blocks first
            await pair.guest.write_sync(start + i * (32 << 20), 1 << 20, 1 + i)
        await pair.quiesce()
        assert pair.disk_equal()
        held = pair.image.stat().st_blocks * 512
        headers = {}
        journal = pair.standby._journal_checkpoint

        def keep_header(codec, payload):
            h = codec_mod.peek_header(payload)
            headers[h.epoch] = h
            return journal(codec, payload)

        pair.standby._journal_checkpoint = keep_header
        first = pair.primary.status.epoch + 1
        peak = Peak(pair.nbd)
        took = await pair.guest.io_sync(f"write -z -u {start} {ZEROED}", "the 256 MiB zeroing", timeout=120)
        await pair.quiesce()
        peak.stop()
        assert pair.disk_equal()
        epochs = [h for e, h in headers.items() if e >= first]
        disk_wire = sum(_disk_section_bytes(h) for h in epochs)
        disk_blocks = sum(h.n_disk_blocks for h in epochs)
        recs = [r for r in pair.primary.history if r.epoch >= first]
        zeroed = sum(r.disk_zeroed_bytes for r in recs)
        print(f"\n256 MiB zeroing (qemu-io write -z -u, {took * 1000:.0f} ms) over {len(epochs)} epochs: frames' disk "
              f"sections {disk_wire} bytes on the wire, {disk_blocks} disk blocks, {zeroed} bytes zeroed as "
              f"{sum(h.n_zero_ranges for h in epochs)} ranges; "
              f"peak arena {peak.arena} bytes, peak unsent {peak.unsent} bytes; primary image allocation "
              f"{held} -> {pair.image.stat().st_blocks * 512} bytes")
        # each of the 65 537 blocks touched travels once: in a range, or as a block (the partial edges,
        # and what QEMU writes as plain zeros to reach its alignment)
        assert disk_blocks + zeroed // 4096 == ZEROED // 4096 + 1
        assert disk_blocks <= 32 and disk_wire < 1024, (disk_blocks, disk_wire)
        assert peak.arena <= nbd_mod.CHUNK_BLOCKS * 4096 and peak.unsent <= 64 << 10, (peak.arena, peak.unsent)
        assert pair.image.stat().st_blocks * 512 <= held - (8 << 20) + (64 << 10)  # the data's blocks were freed
        assert pair.primary.status.disk_zeroed_bytes_total == zeroed
        # a discard (TRIM, as fstrim sends) is a zeroing too: the replica follows, the image gets a hole
        await pair.guest.write_sync(276 << 20, 1 << 20, 0x77)
        await pair.quiesce()
        held = pair.image.stat().st_blocks * 512
        await pair.guest.io_sync(f"discard {276 << 20} {1 << 20}", "the discard")
        await pair.quiesce()
        assert pair.disk_equal() and pair.image.read_bytes()[276 << 20:277 << 20] == bytes(1 << 20)
        assert pair.image.stat().st_blocks * 512 <= held - (1 << 20)
        assert pair.primary.status.disk_zeroed_bytes_total == zeroed + (1 << 20)


@needs_qemu
async def test_a_block_left_out_of_one_frame_is_caught_by_the_comparison(tmp_path):
    """The control: the comparison above would see a single missing block."""
    async with DiskPair(tmp_path, primary_cls=DropsOneDiskBlock) as pair:
        await until(lambda: pair.protected_past(3), timeout=60, what="protection")
        pair.guest.disk_rng = np.random.default_rng(99)
        pair.primary.armed = True
        await until(lambda: pair.primary.dropped is not None, timeout=60, what="a dropped block")
        b = pair.primary.dropped
        pair.guest.writing = False  # the block is not written again, so only the drop tells
        await pair.quiesce()
        with pytest.raises(AssertionError, match="replica disk is not the primary's image"):
            await pair.committed_matches_snapshot()
        rep, img = pair.replica_disk.read_bytes(), pair.image.read_bytes()
        bad = {i // 4096 for i in range(0, DISK, 4096) if rep[i:i + 4096] != img[i:i + 4096]}
        assert bad == {b}


def _fill_chunks(chunks: list[int], seed: int):
    def init(path: Path):
        rng = np.random.default_rng(seed)
        with open(path, "r+b") as f:
            for c in chunks:
                f.seek(c * disksync.CHUNK)
                f.write(rng.integers(0, 256, disksync.CHUNK, dtype=np.uint8).tobytes())
    return init


@needs_qemu
async def test_initial_sync_sends_only_chunks_with_data_and_a_broken_session_resyncs_the_disk(tmp_path):
    """The primary's image holds data in 5 chunks of 256, the replica is a fresh sparse file:
    only those 5 chunks cross (plus what the guest writes meanwhile). Then the session breaks with
    epochs sealed and not committed; the next session's disk resync makes the replica whole."""
    data_chunks = [0, 3, 100, 200, 255]
    with structlog.testing.capture_logs() as logs:
        async with DiskPair(tmp_path, image_init=_fill_chunks(data_chunks, 5)) as pair:
            pair.guest.writing = False  # writes would add chunks to the sync
            await until(lambda: pair.protected_past(1), timeout=60, what="protection")
            progress = [x for x in logs if x["event"] == "primary.disk_sync_progress"]
            await _initial_sync_then_broken_session(pair, data_chunks)
    # the disk sync reports its progress (every tenth of the disk, then done) like the RAM sync
    assert progress and progress[-1]["percent"] == 100 and progress[-1]["chunks_sent"] == len(data_chunks), progress
    assert [p["percent"] for p in progress[:-1]] == sorted(p["percent"] for p in progress[:-1]), progress


async def _initial_sync_then_broken_session(pair, data_chunks):
    """Only the chunks with data crossed; then the session breaks with epochs sealed and not
    committed, and the next session's disk resync makes the replica whole."""
    assert pair.primary.status.last_disk_sync_chunks == len(data_chunks)
    assert pair.primary.status.last_disk_sync_bytes > 0
    await pair.quiesce()
    assert pair.disk_equal()
    pair.guest.writing = True
    await until(lambda: pair.guest.disk_writes >= 50, timeout=60, what="disk writes")
    journal, lost = pair.standby._journal_checkpoint, []

    def link_breaks_with_a_disk_frame_in_flight(codec, payload):
        h = codec_mod.peek_header(payload)
        if not lost and h.n_disk_blocks:
            lost.append(h.epoch)
            pair.guest.writing = False  # its blocks are not written again: only a resync brings them
            raise transport.ChannelError("the link broke with this frame in flight")
        return journal(codec, payload)

    pair.standby._journal_checkpoint = link_breaks_with_a_disk_frame_in_flight
    await until(lambda: lost and pair.primary.status.sessions >= 2 and pair.protected_past(lost[0]),
                timeout=60, what="protection again")
    assert pair.primary.status.last_sync_mode == "resync" and pair.primary.status.last_disk_sync_chunks > 0
    pair.guest.writing = True
    await until(lambda: pair.guest.disk_writes >= 150, timeout=60, what="more disk writes")
    await pair.quiesce()
    assert pair.disk_equal() and np.array_equal(pair.replica.ram, pair.guest.ram)
    await pair.committed_matches_snapshot()


@needs_qemu
async def test_a_restarted_service_loses_its_extent_log_and_the_next_sessions_disk_sync_covers_it(tmp_path):
    """DESIGN property 7 with a disk: the service dies with writes recorded in its open epoch and
    never sealed (checkpoints held off meanwhile); a new service serves the same image on the same
    socket (QEMU reconnects) with an empty extent log. The new session's disk sync by chunk hashes
    brings those writes to the standby: the replica disk ends as the primary's image."""
    async with DiskPair(tmp_path) as pair:
        await until(lambda: pair.protected_past(1), timeout=60, what="protection")
        pair.primary.pause_checkpoints(True)
        start = pair.guest.disk_writes
        await until(lambda: pair.guest.disk_writes >= start + 40, timeout=60, what="writes in the open epoch")
        pair.guest.writing = False
        async with pair.guest.io:
            pass
        unsent = pair.nbd.extents.open_blocks
        assert unsent > 0
        # the service dies: its session, its extent log and its server with it
        pair.primary.stop()
        pair.tasks[0].cancel()
        await asyncio.gather(pair.tasks[0], return_exceptions=True)
        pair.nbd.close()
        # the new service: the same image on the same socket, an empty extent log
        pair.nbd = NbdServer(pair.image, pair.guest.nbd_sock)
        pair.nbd.start()
        cfg = PrimaryConfig(site="site-a", compat={}, run_id="run", interval_ms=20, verify_bytes_per_epoch=0)
        pair.primary = Primary(cfg, pair.guest, pair.capture, NullGate(), connect=pair._connect, nbd=pair.nbd)
        pair.guest.primary = pair.primary
        pair.tasks[0] = asyncio.create_task(pair.primary.run())
        await until(lambda: pair.protected_past(1), timeout=60, what="protection by the new service")
        st = pair.primary.status
        assert st.last_sync_mode == "resync" and st.last_disk_sync_chunks > 0
        pair.guest.writing = True  # QEMU writes through the new server (it reconnected)
        more = pair.guest.disk_writes
        await until(lambda: pair.guest.disk_writes >= more + 30, timeout=60, what="writes after the restart")
        await pair.quiesce()
        assert pair.nbd.connections == 1
        assert pair.disk_equal() and np.array_equal(pair.replica.ram, pair.guest.ram)
        await pair.committed_matches_snapshot()
        print(f"\n{unsent} blocks recorded by the old service and never sent; the new session's disk sync sent "
              f"{st.last_disk_sync_chunks} chunks ({st.last_disk_sync_bytes} bytes)")


CAP = 256 << 10
W64 = 64 << 10


@needs_qemu
async def test_with_no_session_the_disk_server_keeps_nothing_and_the_cap_holds_no_write(tmp_path):
    """Before the first session and after a session is lost (a takeover with the peer gone), the
    guest writes 4x the cap: no write waits and the service keeps no block copies (the open epoch
    would otherwise hold every block written, up to the disk's size). The next session's disk sync
    by chunk hashes brings those writes to the standby: the replica ends as the primary's image."""
    async with DiskPair(tmp_path, cap_bytes=CAP) as pair:
        pair.guest.writing = False  # only the writes below
        ext = pair.nbd.extents
        figures = []
        for phase in ("before the first session", "after the session was lost"):
            if phase == "before the first session":
                pair.refuse = True
            else:
                await until(lambda: pair.protected_past(1), timeout=60, what="protection")
                pair.refuse = True
                pair.ch.close()  # the standby is gone
                await until(lambda: pair.primary.status.state in ("connecting", "disconnected"), timeout=30,
                            what="the session to end")
            base = 0 if phase.startswith("before") else 4 * CAP
            peak = Peak(pair.nbd)
            took = [await pair.guest.write_sync(base + i * W64, W64, 1 + i % 250) for i in range(4 * CAP // W64)]
            peak.stop()
            assert not ext.recording and ext.open_blocks == 0
            assert peak.unsent <= CAP and peak.arena <= CAP, (phase, peak.unsent, peak.arena)
            assert ext.delayed_replies == 0, f"{phase}: a write waited for the cap with no session to release it"
            figures.append(f"{phase}: {4 * CAP} bytes written in {len(took)} writes (slowest {max(took) * 1000:.1f} "
                           f"ms), peak unsent {peak.unsent} bytes, peak arena {peak.arena} bytes "
                           f"({peak.samples} samples), cap {CAP}")
            pair.refuse = False
        await until(lambda: pair.primary.status.sessions >= 2 and pair.protected_past(1), timeout=60,
                    what="protection again")
        st = pair.primary.status
        assert st.last_disk_sync_chunks >= 4 * CAP // disksync.CHUNK  # what was written meanwhile, found by hash
        await pair.quiesce()
        assert pair.disk_equal()
        await pair.committed_matches_snapshot()
        print("\n" + "\n".join(figures) + f"\nthen the resync sent {st.last_disk_sync_chunks} chunks "
              f"({st.last_disk_sync_bytes} bytes on the wire); the replica disk is the primary's image")


@needs_qemu
async def test_a_writer_faster_than_the_wan_is_slowed_by_the_cap_and_the_checkpoints_go_on(tmp_path):
    """With a session whose checkpoints take 200 ms each to leave, a writer with one write in
    flight (64 KiB each) is held at the cap: its replies wait until a checkpoint is sent. The
    unsent bytes stay under the cap plus one epoch, the checkpoints' `stop` is never held by a
    waiting write (`checkpoint_starting` lets it go), and the replica ends as the image."""
    async with DiskPair(tmp_path, cap_bytes=CAP) as pair:
        pair.guest.writing = False
        await until(lambda: pair.protected_past(1), timeout=60, what="protection")
        ext = pair.nbd.extents

        async def write(count: int, first: int) -> tuple[int, float, float]:
            t0 = time.monotonic()
            took = [await pair.guest.write_sync(((first + i) * W64) % DISK, W64, 1 + i % 250) for i in range(count)]
            return count * W64, time.monotonic() - t0, max(took)

        fast = await write(24, 0)
        pair.checkpoint_send_s = 0.2
        e0, held0, s0, stops0 = pair.primary.status.committed_epoch, ext.delayed_replies, ext.delayed_s, ext.stop_releases
        peak = Peak(pair.nbd)
        slow = await write(40, 1000)  # 10x the cap: only checkpoints that leave let it through
        peak.stop()
        pair.checkpoint_send_s = 0.0
        epochs = [r for r in pair.primary.history if r.epoch > e0]
        max_epoch = max(r.disk_bytes for r in epochs)
        committed = pair.primary.status.committed_epoch - e0
        assert ext.delayed_replies > held0, "the writer was never held"
        assert peak.unsent <= CAP + max_epoch, (peak.unsent, CAP, max_epoch)
        assert ext.stop_releases > stops0, "no checkpoint came while a write was held: the test proves nothing"
        await pair.quiesce()
        assert pair.disk_equal()
        await pair.committed_matches_snapshot()
        print(f"\nwriter, fast WAN: {fast[0] / fast[1] / 1e6:.1f} MB/s (slowest write {fast[2] * 1000:.0f} ms); "
              f"200 ms per checkpoint: {slow[0] / slow[1] / 1e6:.2f} MB/s (slowest write {slow[2] * 1000:.0f} ms); "
              f"{ext.delayed_replies - held0} replies held, {ext.delayed_s - s0:.2f}s in all; peak unsent "
              f"{peak.unsent} bytes (cap {CAP}, largest epoch {max_epoch}); {committed} epochs committed meanwhile, "
              f"{ext.stop_releases - stops0} of their stops came while a write was held")


@needs_qemu
@pytest.mark.parametrize("replica_disk,sentence", [
    (8 << 20, r"guest disk size mismatch: the primary's disk is 16777216 bytes, the replica disk "
              r"\S*replica-disk.raw at site site-b is 8388608 bytes"),
    (None, r"the primary's guest has a disk of 16777216 bytes, but site site-b has no replica disk configured"),
])
async def test_a_standby_whose_replica_disk_does_not_fit_is_refused_with_a_sentence(tmp_path, replica_disk, sentence):
    with structlog.testing.capture_logs() as logs:
        async with DiskPair(tmp_path, replica_disk=replica_disk) as pair:
            await until(lambda: any(e["event"] == "standby.refused" for e in logs), what="the refusal")
            await until(lambda: any(e["event"] == "primary.session_lost" for e in logs), what="the primary's log")
            assert pair.primary.status.state != "protected" and pair.replica.committed_epoch == 0
    refused = [e["reason"] for e in logs if e["event"] == "standby.refused"]
    lost = [e["error"] for e in logs if e["event"] == "primary.session_lost"]
    assert re.search(sentence, refused[0]) and re.search(sentence, lost[0]), (refused, lost)


async def test_a_primary_without_a_disk_is_refused_by_a_standby_with_one(tmp_path):
    replica_disk = tmp_path / "replica-disk.raw"
    replica_disk.write_bytes(bytes(1 << 20))
    replica = Replica(tmp_path / "replica", RAM, fsync=False, disk=replica_disk)
    replica.open()
    sb = Standby(replica, {}, "site-b", refuse_delay_s=0)
    try:
        assert "the primary's guest has no disk, but site site-b replicates one into" in sb._disk_mismatch(0)
        assert sb._disk_mismatch(1 << 20) is None
        assert "malformed" in sb._disk_mismatch("1048576")
    finally:
        replica.close()


# -- the frame ---------------------------------------------------------------------------------
def _frame(codec, nblocks: int = 40):
    rng = np.random.default_rng(3)
    blocks = np.unique(rng.choice(4096, nblocks, replace=False)).astype(np.uint64)
    data = rng.integers(0, 256, (blocks.size, 4096), dtype=np.uint8)
    data[::3] = 0  # zero blocks: zstd makes them nearly free
    pages = np.array([1, 5], dtype=np.uint64)
    new = rng.integers(0, 256, (2, PS), dtype=np.uint8)
    frame = codec.encode(epoch=7, kind=codec_mod.KIND_DELTA, page_size=PS, page_numbers=pages, new_pages=new,
                         old_pages=np.zeros_like(new), device_state=b"dev" * 50, disk_blocks=blocks, disk_data=data)
    return frame, blocks, data


def test_a_frame_carries_the_disk_blocks_and_a_tampered_disk_section_never_decodes():
    c = codec_mod.Codec(bytes(32))
    frame, blocks, data = _frame(c)
    d = c.decode(frame)
    assert np.array_equal(d.disk_blocks, blocks) and np.array_equal(d.disk_data, data) and d.epoch == 7
    h = codec_mod.peek_header(frame)
    assert h.n_disk_blocks == blocks.size and h.disk_index_len and h.disk_len
    disk_at = codec_mod.HEADER_SIZE + h.body_len - h.disk_len  # the disk contents' ciphertext
    for off in (disk_at, disk_at + h.disk_len // 2, disk_at - 1):  # ... and the disk index before it
        bad = bytearray(frame)
        bad[off] ^= 1
        with pytest.raises(codec_mod.IntegrityError):
            c.decode(bytes(bad))
    # the header's disk fields are associated data: a changed count fails the check (or the bounds)
    bad = bytearray(frame)
    bad[40:44] = (blocks.size - 1).to_bytes(4, "big")
    with pytest.raises(codec_mod.CodecError):
        c.decode(bytes(bad))
    with pytest.raises(codec_mod.FrameFormatError, match="disk blocks with a"):
        bad = bytearray(frame)
        bad[40:44] = (0).to_bytes(4, "big")
        codec_mod.peek_header(bytes(bad))
    empty = c.decode(c.encode(epoch=8, kind=codec_mod.KIND_DELTA, page_size=PS, page_numbers=np.empty(0, np.uint64),
                              new_pages=np.empty((0, PS), np.uint8), old_pages=np.empty((0, PS), np.uint8),
                              device_state=b"d"))
    assert empty.disk_blocks is None


def _disk_standby(tmp_path, disk: bytes):
    """A Standby over a replica (in its initial sync) whose disk holds `disk`, and a codec."""
    replica_disk = tmp_path / "replica-disk.raw"
    replica_disk.write_bytes(disk)
    replica = Replica(tmp_path / "replica", RAM, fsync=False, disk=replica_disk)
    replica.open()
    replica.begin_initial_sync()
    return replica, replica_disk, Standby(replica, {}, "site-b", refuse_delay_s=0), codec_mod.Codec(bytes(32))


def test_the_standby_rejects_a_tampered_disk_section_and_applies_nothing(tmp_path):
    replica, replica_disk, sb, c = _disk_standby(tmp_path, bytes(16 << 20))
    try:
        frame, blocks, data = _frame(c)
        h = codec_mod.peek_header(frame)
        bad = bytearray(frame)
        bad[codec_mod.HEADER_SIZE + h.body_len - 10] ^= 0x40
        with pytest.raises(codec_mod.IntegrityError):
            sb._journal_checkpoint(c, bytes(bad))
        assert replica.committed_epoch == 0 and replica_disk.read_bytes() == bytes(16 << 20)
        sb._journal_checkpoint(c, frame)  # the frame as sent is journalled, then applied
        replica.apply_journalled()
        disk = np.frombuffer(replica_disk.read_bytes(), np.uint8).reshape(-1, 4096)
        assert replica.committed_epoch == 7 and np.array_equal(disk[blocks.astype(np.intp)], data)
    finally:
        replica.close()


def test_the_standby_journals_and_applies_zero_ranges_before_the_blocks_and_refuses_them_in_a_sync(tmp_path):
    """A frame whose zero ranges cover blocks it also carries (written after the zeroing): the
    replica disk ends with the ranges zeroed and those blocks written; the zeroed range stays
    allocated (the replica disk is preallocated). A tampered frame applies nothing; a SYNC frame
    carrying zero ranges is refused."""
    size = 16 << 20
    replica, replica_disk, sb, c = _disk_standby(tmp_path, b"\xee" * size)
    try:
        zeroes = np.array([[16, 1024], [2048, 16]], np.uint64)  # 4 MiB and 64 KiB
        blocks = np.array([20, 21, 2050], np.uint64)
        data = np.full((3, 4096), 0x5A, np.uint8)
        frame = c.encode(epoch=7, kind=codec_mod.KIND_DELTA, page_size=PS, page_numbers=np.empty(0, np.uint64),
                         new_pages=np.empty((0, PS), np.uint8), old_pages=np.empty((0, PS), np.uint8),
                         device_state=b"dev", disk_blocks=blocks, disk_data=data, disk_zeroes=zeroes)
        bad = bytearray(frame)
        bad[-20] ^= 1
        with pytest.raises(codec_mod.IntegrityError):
            sb._journal_checkpoint(c, bytes(bad))
        assert replica.committed_epoch == 0 and replica_disk.read_bytes() == b"\xee" * size
        held = replica_disk.stat().st_blocks
        sb._journal_checkpoint(c, frame)
        replica.apply_journalled()
        want = np.full((size // 4096, 4096), 0xEE, np.uint8)
        want[16:1040] = 0
        want[2048:2064] = 0
        want[blocks.astype(np.intp)] = data
        assert replica.committed_epoch == 7
        assert replica_disk.read_bytes() == want.tobytes()
        assert replica_disk.stat().st_blocks >= held  # still allocated: a later write needs no space
        sync = c.encode(epoch=7, kind=codec_mod.KIND_FULL, page_size=PS, page_numbers=np.empty(0, np.uint64),
                        new_pages=np.empty((0, PS), np.uint8), disk_zeroes=zeroes)
        with pytest.raises(transport.ChannelError, match="a SYNC frame carried 2 zeroed disk ranges"):
            sb._apply_sync(c, sync)
    finally:
        replica.close()


def test_disk_hashes_are_sparse_aware_and_only_differing_chunks_are_sent(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with open(a, "wb") as f:
        f.truncate(40 * disksync.CHUNK)  # all holes
    b.write_bytes(bytes(40 * disksync.CHUNK))  # the same zeros, written
    fa, fb = os.open(a, os.O_RDWR), os.open(b, os.O_RDWR)
    try:
        assert disksync.chunk_hashes(fa, 40 * disksync.CHUNK) == disksync.chunk_hashes(fb, 40 * disksync.CHUNK)
        os.pwrite(fa, b"x", 5 * disksync.CHUNK + 100)
        os.pwrite(fa, bytes(4096), 9 * disksync.CHUNK)  # zeros written over a hole: still the zero chunk
        theirs = disksync.chunk_hashes(fb, 40 * disksync.CHUNK)
        diff = list(disksync.differing_chunks(fa, 40 * disksync.CHUNK, theirs))
        assert [first for first, _ in diff] == [5 * disksync.CHUNK_BLOCKS]
        assert diff[0][1].reshape(-1)[100] == ord("x")
        with pytest.raises(ValueError, match="expected 640"):
            disksync.split_hashes(b"x" * 16, 40 * disksync.CHUNK)
    finally:
        os.close(fa)
        os.close(fb)


# -- the replica with a disk: crashes and full disks ---------------------------------------------
POINTS = ["before-journal-sync", "after-journal", "mid-zero", "mid-disk", "mid-ram", "after-ram", "after-disk",
          "after-device-state", "after-meta"]


def run_worker(d: Path, disk: Path, upto: int, resync_at: int = 0, crash_at: str = "") -> int:
    env = dict(os.environ, GEOMIRROR_CRASH_AT=crash_at, PYTHONPATH=str(Path(__file__).parent.parent))
    p = subprocess.run([sys.executable, "-m", "tests.disk_replica_worker", str(d), str(disk), str(upto),
                        str(resync_at)], env=env, cwd=Path(__file__).parent.parent, capture_output=True)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr.decode()[-800:]
    return p.returncode


def _replica_disk(tmp: Path) -> Path:
    disk = tmp / "replica-disk.raw"
    disk.write_bytes(bytes(DW.DISK_BLOCKS * DW.BS))
    return disk


def assert_epoch(r: Replica, disk: Path, epoch: int, resync_at: int = 0) -> None:
    ram, dev = W.expected(epoch, resync_at=resync_at or None)
    assert np.array_equal(r.ram, ram), f"replica RAM is not exactly epoch {epoch}'s"
    assert r.device_state() == dev
    assert disk.read_bytes() == DW.expected_disk(epoch, resync_at=resync_at or None), \
        f"replica disk is not exactly epoch {epoch}'s"


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("resync", [False, True])
def test_killed_mid_apply_disk_and_ram_are_both_at_n_minus_1_or_n(tmp_path, point, resync):
    disk = _replica_disk(tmp_path)
    d = tmp_path / "replica"
    assert run_worker(d, disk, 3) == 0
    resync_at = 4 if resync else 0
    assert run_worker(d, disk, 4, resync_at=resync_at, crash_at=point) == -signal.SIGKILL, point
    r = Replica(d, W.PAGES * W.PS, disk=disk)
    rep = r.open()
    try:
        if point != "before-journal-sync":
            assert rep.committed_epoch == 4, f"journalled epoch 4 lost after a crash at {point}"
        assert rep.committed_epoch in (3, 4) and rep.valid
        assert_epoch(r, disk, rep.committed_epoch, resync_at)
    finally:
        r.close()
    assert run_worker(d, disk, 6, resync_at=resync_at) == 0  # and it carries on from there
    r = Replica(d, W.PAGES * W.PS, disk=disk)
    r.open()
    try:
        assert r.committed_epoch == 6
        assert_epoch(r, disk, 6, resync_at)
    finally:
        r.close()


class DiskFaults(Faults):
    def zero_range(self, step, fd, offset, length):
        self._check(step)
        super().zero_range(step, fd, offset, length)

    def pwritev(self, step, fd, parts, offset):
        self._check(step)
        if self.short:
            return os.pwrite(fd, b"".join(bytes(p) for p in parts)[: self.short], offset)
        return super().pwritev(step, fd, parts, offset)


@pytest.mark.parametrize("step", ["disk-zero", "disk-write", "disk-fsync", "journal-append", "journal-fsync"])
@pytest.mark.parametrize("persistent", [True, False])
def test_a_full_or_failing_disk_mid_apply_leaves_n_minus_1_or_n_never_a_mix(tmp_path, step, persistent):
    disk = _replica_disk(tmp_path)
    ops = DiskFaults()
    r = Replica(tmp_path / "replica", W.PAGES * W.PS, ops=ops, disk=disk)
    r.open()
    r.begin_initial_sync()
    for e in (1, 2, 3):
        r.commit(e, *W.epoch_content(e), **DW.disk_epoch(e))
    ops.fail(step, errno.ENOSPC, times=None if persistent else 1)
    try:
        r.commit(4, *W.epoch_content(4), **DW.disk_epoch(4))
    except ReplicaStorageError as e:
        assert e.disk_full and str(e.path) in str(e)
        assert step in ops.failed
    if r.valid:
        assert r.committed_epoch in (3, 4)
        assert_epoch(r, disk, r.committed_epoch)
    else:  # a replay failed too: not resumable, says why; the next open (disk healed) brings it to 4
        assert r.problem and "not usable" in r.problem
    ops.heal()
    r.close()
    r = Replica(tmp_path / "replica", W.PAGES * W.PS, disk=disk)
    r.open()
    try:
        assert r.valid and r.committed_epoch in (3, 4)
        if step in ("disk-zero", "disk-write", "disk-fsync"):  # after the journal was durable: epoch 4 survives
            assert r.committed_epoch == 4
        assert_epoch(r, disk, r.committed_epoch)
    finally:
        r.close()


def test_a_short_disk_write_is_continued(tmp_path):
    disk = _replica_disk(tmp_path)
    r = Replica(tmp_path / "replica", W.PAGES * W.PS, ops=DiskFaults(short=1000), disk=disk, fsync=False)
    r.open()
    try:
        r.begin_initial_sync()
        r.commit(1, *W.epoch_content(1), **DW.disk_epoch(1))
        assert_epoch(r, disk, 1)
    finally:
        r.close()


def test_replica_disk_problems_are_named(tmp_path):
    r = Replica(tmp_path / "replica", W.PAGES * W.PS, disk=tmp_path / "missing.raw")
    with pytest.raises(ReplicaError, match="missing.raw does not exist"):
        r.open()
    r.close()
    odd = tmp_path / "odd.raw"
    odd.write_bytes(bytes(5000))
    r = Replica(tmp_path / "replica", W.PAGES * W.PS, disk=odd)
    with pytest.raises(ReplicaError, match="odd.raw is 5000 bytes, not a positive multiple of 4096"):
        r.open()
    r.close()
    disk = _replica_disk(tmp_path)
    r = Replica(tmp_path / "replica", W.PAGES * W.PS, disk=disk)
    r.open()
    try:
        r.begin_initial_sync()
        with pytest.raises(ReplicaError, match="disk block 512 is outside the replica disk"):
            r.commit(1, *W.epoch_content(1), np.array([512], np.uint64), np.zeros((1, 4096), np.uint8))
        with pytest.raises(ReplicaError, match="zeroed disk blocks 500..512 are not inside the replica disk "
                                               r"\S*replica-disk.raw of 512 blocks"):
            r.commit(1, *W.epoch_content(1), disk_zeroes=np.array([[3, 4], [500, 13]], np.uint64))
        assert r.committed_epoch == 0
    finally:
        r.close()
    r = Replica(tmp_path / "nodisk", W.PAGES * W.PS)
    r.open()
    try:
        r.begin_initial_sync()
        with pytest.raises(ReplicaError, match="this replica has no disk"):
            r.commit(1, *W.epoch_content(1), *DW.disk_content(1))
        with pytest.raises(ReplicaError, match="carries 1 zeroed disk ranges, but this replica has no disk"):
            r.commit(1, *W.epoch_content(1), disk_zeroes=np.array([[3, 4]], np.uint64))
    finally:
        r.close()
