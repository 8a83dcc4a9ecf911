"""The Primary with the COLO capture (QEMU's own dirty log), end to end: a real COLO-capable QEMU
running the lab's guest with a memory-writing workload, the real Primary, codec, channel,
Standby and replica. After protected epochs, a handover's final epoch leaves the guest stopped:
the replica the standby applied is then the guest's RAM byte for byte. A page left out of
QEMU's set is found by the full compare the Primary runs every Nth epoch, goes in the epoch
anyway and is counted."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from replication import transport
from replication.capture import Capture
from replication.colo import ColoSource
from replication.primary import Primary, PrimaryConfig
from replication.standby import Standby
from replication.store import Replica
from tests.test_primary_pause import NullGate
from tests.test_replica_verify import until

pytestmark = pytest.mark.lab


class Pair:
    def __init__(self, tmp_path, guest, verify_every: int):
        self.guest = guest
        size = guest.spec.memory_mb << 20
        self.capture = Capture(guest.spec.ram_path, size)
        self.colo = ColoSource(guest, size)
        self.replica = Replica(tmp_path / "replica", size, fsync=False)
        self.replica.open()
        self.standby = Standby(self.replica, {}, "site-b", refuse_delay_s=0)
        cfg = PrimaryConfig(site="site-a", compat={}, run_id="run", interval_ms=40, colo_verify_every=verify_every)
        self.primary = Primary(cfg, guest, self.capture, NullGate(), connect=self._connect, colo=self.colo)
        self.primary.forward_frames_fn = lambda: False  # no inbound frames to hold (NullGate)

    async def _connect(self):
        return await transport.connect("127.0.0.1", self.port)

    async def __aenter__(self):
        self.server = await transport.serve("127.0.0.1", 0, self.standby.handle, max_frame=64 << 20)
        self.port = self.server.sockets[0].getsockname()[1]
        self.task = asyncio.create_task(self.primary.run())
        return self

    async def __aexit__(self, *exc):
        self.primary.stop()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.primary.end_colo()
        self.server.close()
        self.capture.close()
        self.replica.close()

    def protected_past(self, epoch: int) -> bool:
        st = self.primary.status
        return st.state == "protected" and st.committed_epoch > epoch

    async def handover_matches(self) -> int:
        """A handover's final epoch (the guest stays stopped), applied at the standby: the
        replica must equal the guest's RAM. The guest runs again after."""
        epoch = await self.primary.handover()
        try:
            assert await self.guest.status() == "colo"  # held stopped by the open checkpoint
            await self.standby.wait_applied()
            bad = np.flatnonzero((self.replica.ram.reshape(-1, 4096) != self.capture.ram.reshape(-1, 4096)).any(axis=1))
            assert bad.size == 0, f"replica differs from the guest in {bad.size} pages, e.g. {bad[:5]}"
        finally:
            await self.primary.abort_handover()
        await status_becomes(self.guest, "running")
        return epoch


async def status_becomes(guest, want: str, timeout: float = 15.0) -> None:
    """QEMU's COLO thread starts the guest after our `loaded` message, in its own time (seconds
    on a loaded machine): poll `query-status` until it reports `want`."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while (state := await guest.status()) != want:
        assert loop.time() < end, f"the guest stayed {state!r} for {timeout} s, not {want!r}"
        await asyncio.sleep(0.02)


async def test_colo_epochs_keep_the_replica_equal_to_the_guest(colo_guest, tmp_path):
    g = colo_guest
    async with Pair(tmp_path, g, verify_every=1) as pair:
        await until(lambda: pair.protected_past(30), timeout=60, what="30 protected epochs")
        st = pair.primary.status
        assert st.capture == "colo" and st.colo_error is None
        final = await pair.handover_matches()
        assert st.colo_verified_epochs >= 30 and st.colo_missed_pages == 0
        assert st.colo_sent_pages > 30 * 10  # the guest's workload wrote pages in the epochs
        await until(lambda: pair.protected_past(final + 3), timeout=30, what="epochs after the aborted handover")


async def test_a_page_qemu_left_out_is_found_and_sent(colo_guest, tmp_path):
    g = colo_guest
    async with Pair(tmp_path, g, verify_every=1) as pair:
        await until(lambda: pair.protected_past(5), timeout=60, what="protection")
        stream = pair.colo.stream
        read = stream.read_checkpoint
        cap = pair.capture
        dropped = []

        def drops_one_changed_page():
            cp = read()
            if not dropped:
                ps = cap.page_size
                changed = [p for p in cp.pages.tolist()
                           if not np.array_equal(cap.ram[p * ps:(p + 1) * ps], cap.shadow[p * ps:(p + 1) * ps])]
                if changed:
                    dropped.append(changed[0])
                    cp.pages = cp.pages[cp.pages != changed[0]]
            return cp

        stream.read_checkpoint = drops_one_changed_page
        await until(lambda: dropped, timeout=30, what="a checkpoint with a changed page")
        await until(lambda: pair.primary.status.colo_missed_pages, timeout=10, what="the missed page counted")
        assert pair.primary.status.colo_missed_pages == 1
        await pair.handover_matches()
