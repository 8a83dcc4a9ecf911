"""The rolling replica check, end to end with the real Primary, codec, channel, Standby and
replica (a guest stand-in writes pages of a real RAM file between pauses; no QEMU, no lab).

A capture that drops one dirty page once, while believing the standby has it (the shadow is
updated: what an O(dirty) capture that missed a write would do), leaves the replica silently
different from the guest. The check catches it within one cycle of ranges, the epoch is not
acknowledged, and the next session's resync makes the replica equal to the guest again.
Without the check nothing notices (the control case)."""

from __future__ import annotations

import asyncio
import mmap
import os

import numpy as np
import pytest
import structlog

from replication import transport, verify
from replication.capture import Capture, DirtySet
from replication.primary import Primary, PrimaryConfig
from replication.standby import Standby
from replication.store import Replica
from tests.test_primary_pause import NullGate

PS = 4096
RAM = 1 << 20  # 256 pages
VERIFY = 64 << 10  # 16 pages an epoch: a cycle of 16 epochs
HOT = 64  # the stand-in guest writes pages 0..63 only, so most ranges hold a page it never rewrites


class StandInGuest:
    """What the Primary asks of QEMU; a writer task dirties RAM only while `running`."""

    def __init__(self, ram_path):
        fd = os.open(ram_path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, RAM, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.ram = np.frombuffer(self._map, np.uint8).reshape(-1, PS)
        self.running = True
        self.writing = True
        self.avoid: set[int] = set()
        self.rng = np.random.default_rng(7)

    async def stop_vcpus(self):
        self.running = False

    async def save_device_state(self):
        return b"device-state" * 8

    async def cont(self):
        self.running = True

    async def status(self):
        return "running" if self.running else "paused"

    async def write_forever(self):
        counter = 0
        while True:
            await asyncio.sleep(0.001)
            if not (self.running and self.writing):
                continue
            for p in self.rng.choice(HOT, 4, replace=False):
                if int(p) in self.avoid:
                    continue
                counter += 1
                self.ram[p, self.rng.integers(0, PS // 8) * 8:][:8] = np.frombuffer(
                    counter.to_bytes(8, "little"), np.uint8)


class DropsOnePageOnce(Capture):
    """Once armed, the next capture with dirty pages leaves one of them out of the checkpoint
    but updates the shadow as if it had been sent."""

    primary: Primary | None = None
    guest: StandInGuest | None = None
    armed = False
    dropped: int | None = None
    dropped_epoch: int | None = None

    def take(self, pages: np.ndarray) -> DirtySet:
        ds = super().take(pages)
        if not self.armed or pages.size == 0:
            return ds
        self.armed = False
        i = pages.size // 2
        self.dropped = int(pages[i])
        self.dropped_epoch = self.primary.status.epoch + 1  # the pause of that epoch runs now
        # never written again (decided before the guest runs on): only the check can bring it to light
        self.guest.avoid.add(self.dropped)
        keep = np.arange(pages.size) != i
        return DirtySet(ds.page_numbers[keep], ds.new_pages[keep], ds.old_pages[keep])


async def until(cond, timeout=20.0, what="condition"):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Pair:
    def __init__(self, tmp_path, verify_bytes: int):
        ram_path = tmp_path / "guest.ram"
        ram_path.write_bytes(np.random.default_rng(1).integers(0, 256, RAM, dtype=np.uint8).tobytes())
        self.guest = StandInGuest(ram_path)
        self.capture = DropsOnePageOnce(ram_path, RAM)
        self.replica = Replica(tmp_path / "replica", RAM, fsync=False)
        self.replica.open()
        self.standby = Standby(self.replica, {}, "site-b", refuse_delay_s=0)
        cfg = PrimaryConfig(site="site-a", compat={}, run_id="run", interval_ms=3,
                            verify_bytes_per_epoch=verify_bytes)
        self.primary = Primary(cfg, self.guest, self.capture, NullGate(), connect=self._connect)
        self.capture.primary, self.capture.guest = self.primary, self.guest
        self.port = 0
        self.tasks: list[asyncio.Task] = []

    async def _connect(self):
        return await transport.connect("127.0.0.1", self.port)

    async def __aenter__(self):
        self.server = await transport.serve("127.0.0.1", 0, self.standby.handle, max_frame=RAM + (1 << 20))
        self.port = self.server.sockets[0].getsockname()[1]
        self.tasks = [asyncio.create_task(self.primary.run()), asyncio.create_task(self.guest.write_forever())]
        return self

    async def __aexit__(self, *exc):
        self.primary.stop()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.server.close()
        self.capture.close()
        self.replica.close()

    def protected_past(self, epoch: int) -> bool:
        return self.primary.status.state == "protected" and self.primary.status.committed_epoch > epoch

    async def quiesce(self) -> None:
        """Stop writing and wait until the standby committed an epoch taken after the last write:
        then the replica must equal the guest's RAM byte for byte."""
        self.guest.writing = False
        await asyncio.sleep(0.01)
        mark = self.primary.status.epoch + 1
        await until(lambda: self.protected_past(mark), what=f"an acknowledged epoch after {mark}")
        await self.standby.wait_applied()  # the ACK says durable; the apply follows it

    def replica_matches(self) -> bool:
        return np.array_equal(self.replica.ram, self.guest.ram)


async def test_a_run_without_faults_verifies_every_range_and_reports_no_divergence(tmp_path):
    async with Pair(tmp_path, VERIFY) as pair:
        cycle = verify.cycle_epochs(RAM, VERIFY, PS)
        assert pair.primary.status.verify_cycle_epochs == cycle == 16
        await until(lambda: pair.standby.status.verified >= 2 * cycle, what="two cycles of checks")
        await pair.quiesce()
        assert pair.standby.status.diverged == 0 and pair.primary.status.diverged == 0
        assert pair.primary.status.sessions == 1
        assert pair.standby.status.verified_bytes >= 2 * RAM
        assert pair.replica_matches()


@pytest.mark.parametrize("verify_bytes", [VERIFY, 0], ids=["checked", "unchecked"])
async def test_a_page_the_capture_dropped_once_is_caught_within_one_cycle(tmp_path, verify_bytes):
    async with Pair(tmp_path, verify_bytes) as pair:
        await until(lambda: pair.protected_past(3), what="protection")
        pair.capture.armed = True
        await until(lambda: pair.capture.dropped is not None, what="the dropped page")
        page = pair.capture.dropped
        cycle = verify.cycle_epochs(RAM, VERIFY, PS)
        if not verify_bytes:
            # the control: a cycle's worth of epochs later nothing has noticed, and the replica is wrong
            await until(lambda: pair.protected_past(pair.capture.dropped_epoch + 2 * cycle), what="two cycles")
            await pair.quiesce()
            assert pair.primary.status.diverged == 0 and pair.standby.status.diverged == 0
            assert not np.array_equal(pair.replica.ram[page], pair.guest.ram[page])
            assert pair.replica.valid  # and the standby would resume it as if it were right
            return

        with structlog.testing.capture_logs() as logs:
            await until(lambda: pair.primary.status.diverged >= 1, what="replica.diverged at the primary")
            await until(lambda: pair.primary.status.sessions >= 2, what="the next session")
        div = pair.primary.status.last_divergence
        events = [(x["event"], x.get("side")) for x in logs if x["event"].startswith("replica.")]
        assert ("replica.diverged", "standby") in events and ("replica.diverged", "primary") in events
        assert ("replica.untrusted", None) in events  # not resumable until the resync
        assert div["offset"] <= page * PS < div["offset"] + div["length"]
        assert pair.capture.dropped_epoch <= div["epoch"] < pair.capture.dropped_epoch + cycle
        assert pair.standby.status.diverged == 1 and pair.standby.status.last_divergence == div
        # the diverged epoch was never acknowledged: its output stayed held
        assert div["epoch"] not in {r.epoch for r in pair.primary.history}

        # the next session resyncs by block hashes; then the replica is the guest's RAM again
        await until(lambda: pair.primary.status.sessions >= 2 and pair.protected_past(div["epoch"]),
                    what="protection again after the resync")
        assert pair.primary.status.last_sync_mode == "resync"
        await pair.quiesce()
        assert pair.replica.valid and pair.replica_matches()
        await until(lambda: pair.standby.status.verified >= 2 * cycle, what="checks after the resync")
        assert pair.primary.status.diverged == 1 and pair.standby.status.diverged == 1
