"""The standby's replica disk fills up or fails: the standby says it is not protecting (status
and one warning), refuses sessions with the sentence so the primary knows, and protection
comes back by itself once the disk works again — over real mutual TLS, with a real full
tmpfs and through the FileOps seam."""

from __future__ import annotations

import asyncio
import errno
import hashlib

import numpy as np
import pytest
import structlog

from geomirror import pairing
from replication import codec as C
from replication.session import BLOCK_PAGES, new_nonce, session_key
from replication.standby import Standby
from replication.store import Replica
from replication.transport import PROTOCOL_VERSION, MsgType, PeerRefused, connect, serve
from tests.test_channel_bad_input import COMPAT, RAM, GoodPrimary, client_ctx
from tests.test_store_faults import Faults
from tests.test_store_tmpfs import fill_to, small_fs  # noqa: F401  (a fixture)


class Primary(GoodPrimary):
    """The test driver also resyncs by block hashes, like the real primary."""

    async def hello(self, run_id="run1"):
        nonce = new_nonce()
        await self.ch.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION, "site": "site-a", "compat": COMPAT,
                                                "run_id": run_id, "nonce": nonce.hex(), "ram_bytes": RAM})
        reply = await self.ch.recv_json(MsgType.HELLO_REPLY)
        self.hashes = None
        if reply["hashes"]:
            mtype, self.hashes = await self.ch.recv()
            assert mtype is MsgType.HASHES
        self.codec = C.Codec(session_key(nonce, bytes.fromhex(reply["nonce"])))
        return reply

    async def resync(self, hashes: bytes):
        bs = BLOCK_PAGES * 4096
        flat = self.ram.reshape(-1)
        await self.ch.send_json(MsgType.SYNC_BEGIN, {"mode": "resync"})
        sent = 0
        for b in range(RAM // bs):
            if hashlib.blake2b(flat[b * bs:(b + 1) * bs].tobytes(), digest_size=16).digest() != \
                    hashes[b * 16:(b + 1) * 16]:
                pages = np.arange(b * BLOCK_PAGES, (b + 1) * BLOCK_PAGES, dtype=np.uint64)
                await self.ch.send(MsgType.SYNC, self.codec.encode(
                    epoch=0, kind=C.KIND_FULL, page_size=4096, page_numbers=pages,
                    new_pages=self.ram[b * BLOCK_PAGES:(b + 1) * BLOCK_PAGES], old_pages=None))
                sent += 1
        return sent


@pytest.fixture
def pki(tmp_path):
    return pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], [])


async def serve_standby(replica, pki):
    sb = Standby(replica, COMPAT, "site-b", refuse_delay_s=0)
    ctx = pairing.server_context(pki.ca, *pki.certs["site-b"])
    server = await serve("127.0.0.1", 0, sb.handle, ssl=ctx, max_frame=1 << 20)
    return sb, server, server.sockets[0].getsockname()[1]


async def session(port, pki, ram, epochs):
    """One session of a primary whose RAM is `ram`: hello, initial sync or resync, epochs."""
    ch = await connect("127.0.0.1", port, ssl=client_ctx(pki, "site-a"), server_hostname="site-b")
    p = Primary(ch)
    p.ram = ram
    try:
        reply = await p.hello()
        if not reply["valid"] and not reply["hashes"]:
            await p.initial_sync()
        else:
            await p.resync(p.hashes)
        return [await p.checkpoint(e) for e in epochs]
    finally:
        ch.close()


async def test_full_disk_stops_protection_visibly_and_it_comes_back(small_fs, pki):  # noqa: F811
    replica = Replica(small_fs / "replica", RAM)
    replica.open()
    sb, server, port = await serve_standby(replica, pki)
    ram = np.zeros((RAM // 4096, 4096), np.uint8)
    try:
        assert await session(port, pki, ram, [1, 2]) == [1, 2]
        await sb.wait_applied()  # the ACK says durable; epoch 2's apply follows it
        filler = fill_to(small_fs, 0)
        before = replica.ram.copy()
        with structlog.testing.capture_logs() as logs:
            with pytest.raises(PeerRefused, match="site-b is not protecting the guest: .*journal failed with "
                                                  "ENOSPC .*free space there"):
                await session(port, pki, ram, [3])
            assert sb.status.state == "disk_full"
            assert str(replica.dir) in sb.status.problem
            # while the disk is full, a session is refused at its HELLO, with the same reason
            for _ in range(3):
                with pytest.raises(PeerRefused, match="still full"):
                    await session(port, pki, ram, [3])
            assert sb.status.state == "disk_full"
        # (the first session's end, when its primary closed, may also land here)
        warnings = [x["event"] for x in logs if x["log_level"] == "warning" and x["event"] != "standby.session_ended"]
        assert warnings == ["replica.storage_failed", "standby.not_protecting"], warnings
        storage = next(x for x in logs if x["event"] == "replica.storage_failed")
        assert storage["free_bytes"] == 0 and storage["error"] == "No space left on device"
        assert replica.valid and replica.committed_epoch == 2 and np.array_equal(replica.ram, before)

        filler.unlink()
        with structlog.testing.capture_logs() as logs:
            assert await session(port, pki, ram, [3, 4]) == [3, 4]
        await sb.wait_applied()  # the ACK says durable; epoch 4's apply follows it
        assert sb.status.state == "replicating" and sb.status.problem is None
        assert any(x["event"] == "standby.protecting_again" for x in logs)
        assert np.array_equal(replica.ram, ram) and replica.committed_epoch == 4
    finally:
        server.close()
        replica.close()


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
async def test_replica_left_mixed_is_replayed_or_resynced_never_trusted(tmp_path, pki, err):
    """The checkpoint is journalled (durable: acknowledged) but cannot be applied (device.state
    cannot be written): RAM is part epoch 2, part 3, and the standby stops protecting. The next
    session either replays it (the disk works again) or, while it fails with something other
    than a full disk, resyncs by block hashes."""
    ops = Faults()
    replica = Replica(tmp_path / "replica", RAM, fsync=False, ops=ops)
    replica.open()
    sb, server, port = await serve_standby(replica, pki)
    ram = np.zeros((RAM // 4096, 4096), np.uint8)
    state = "disk_full" if err == errno.ENOSPC else "disk_failed"
    try:
        assert await session(port, pki, ram, [1, 2]) == [1, 2]
        await sb.wait_applied()
        ops.fail("device-state", err, times=3)  # the apply, its replay, the replay at the next HELLO
        assert await session(port, pki, ram, [3]) == [3]  # durable in the journal: acknowledged
        await sb.wait_applied()
        for _ in range(200):  # the session that failed refuses its primary after the ACK
            if sb.status.state == state:
                break
            await asyncio.sleep(0.01)
        assert sb.status.state == state
        assert "device.state failed with " + errno.errorcode[err] in sb.status.problem
        assert not replica.valid and "not usable" in replica.problem
        if err == errno.ENOSPC:
            with pytest.raises(PeerRefused, match="No space left"):
                await session(port, pki, ram, [4])
            # the disk works again: the journalled epoch 3 is replayed, the primary resyncs from it
            assert await session(port, pki, ram, [4]) == [4]
        else:
            # an I/O error: the replica is not trusted; the primary resyncs it from its block hashes
            assert await session(port, pki, ram, [4]) == [4]
        await sb.wait_applied()
        assert replica.valid and replica.committed_epoch == 4
        assert np.array_equal(replica.ram, ram), "the replica differs from the primary's RAM"
        assert sb.status.state == "replicating" and sb.status.problem is None
    finally:
        server.close()
        replica.close()


async def test_block_hashes_run_off_the_event_loop(tmp_path, pki, monkeypatch):
    """A big replica's hashing must not stall heartbeats: it runs in a thread, so the event loop
    can run a coroutine while the hashing waits for it (on the loop this would deadlock)."""
    replica = Replica(tmp_path / "replica", RAM, fsync=False)
    replica.open()
    sb, server, port = await serve_standby(replica, pki)
    loop = asyncio.get_running_loop()
    real = Replica.block_hashes

    def hashes_needing_the_loop(self, block_pages):
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(timeout=5)
        return real(self, block_pages)

    try:
        ram = np.zeros((RAM // 4096, 4096), np.uint8)
        assert await session(port, pki, ram, [1]) == [1]
        monkeypatch.setattr(Replica, "block_hashes", hashes_needing_the_loop)
        assert await asyncio.wait_for(session(port, pki, ram, [2]), 10) == [2]
    finally:
        server.close()
        replica.close()
