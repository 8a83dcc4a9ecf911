"""The standby's channel against bad input, over real mutual TLS on loopback.

Each case: the connection is dropped or the frame rejected with a clear log line,
nothing is applied, the service keeps running, and a good primary then gets its
checkpoints committed again.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import struct

import numpy as np
import pytest
import structlog

from geomirror import pairing
from replication import codec as C
from replication.capture import Capture
from replication.primary import Primary, PrimaryConfig
from replication.session import new_nonce, session_key
from replication.standby import Standby
from replication.store import Replica
from replication.transport import PROTOCOL_VERSION, Channel, MsgType, connect, serve
from tests import test_replica_verify as V
from tests.test_primary_pause import NullGate

RAM = 64 * 4096
COMPAT = {"qemu": "test", "machine": "pc", "memory_mb": 0}


@pytest.fixture
def pki(tmp_path):
    good = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], ["witness"])
    other = pairing.create_pair(tmp_path / "other", ["site-a", "site-b"], [])
    return good, other


@pytest.fixture
async def standby(tmp_path, pki):
    good, _ = pki
    replica = Replica(tmp_path / "replica", RAM, fsync=False)
    replica.open()
    sb = Standby(replica, COMPAT, "site-b",
                 allowed_peer=lambda ch: pairing.check_peer(ch.ssl_object(), {"site-a"}))
    ctx = pairing.server_context(good.ca, *good.certs["site-b"])
    server = await serve("127.0.0.1", 0, sb.handle, ssl=ctx, max_frame=1 << 20)
    port = server.sockets[0].getsockname()[1]
    yield sb, port
    server.close()
    replica.close()


def client_ctx(files, name):
    return pairing.client_context(files.ca, *files.certs[name])


class GoodPrimary:
    """Speaks the real protocol with the real codec (a test driver, not a stand-in for the standby)."""

    def __init__(self, ch: Channel):
        self.ch = ch
        self.codec = None
        self.ram = np.zeros((RAM // 4096, 4096), np.uint8)

    async def hello(self, run_id="run1"):
        nonce = new_nonce()
        await self.ch.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION, "site": "site-a", "compat": COMPAT,
                                                "run_id": run_id, "nonce": nonce.hex(), "ram_bytes": RAM})
        reply = await self.ch.recv_json(MsgType.HELLO_REPLY)
        if reply["valid"]:
            await self.ch.recv()  # hashes
        self.codec = C.Codec(session_key(nonce, bytes.fromhex(reply["nonce"])))
        return reply

    async def initial_sync(self):
        await self.ch.send_json(MsgType.SYNC_BEGIN, {"mode": "initial"})
        await self.ch.send(MsgType.SYNC, self.codec.encode(
            epoch=0, kind=C.KIND_FULL, page_size=4096, page_numbers=np.arange(self.ram.shape[0], dtype=np.uint64),
            new_pages=self.ram, old_pages=None))

    def checkpoint_frame(self, epoch: int, seed: int = 0) -> bytes:
        pages = np.array([1, 5, 9], dtype=np.uint64)
        old = self.ram[pages.astype(int)].copy()
        new = np.full_like(old, (epoch + seed) % 256)
        return self.codec.encode(epoch=epoch, kind=C.KIND_DELTA, page_size=4096, page_numbers=pages,
                                 new_pages=new, old_pages=old, device_state=b"dev%d" % epoch), (pages, new)

    async def checkpoint(self, epoch: int) -> int:
        frame, (pages, new) = self.checkpoint_frame(epoch)
        await self.ch.send(MsgType.CHECKPOINT, frame)
        while True:
            t, payload = await asyncio.wait_for(self.ch.recv(), 10)
            if t is MsgType.ACK:
                self.ram[pages.astype(int)] = new
                return struct.unpack(">Q", payload)[0]


async def good_session(port, pki, start_epoch=1, n=2):
    good, _ = pki
    ch = await connect("127.0.0.1", port, ssl=client_ctx(good, "site-a"), server_hostname="site-b")
    p = GoodPrimary(ch)
    reply = await p.hello()
    if not reply["valid"]:
        await p.initial_sync()
    acks = [await p.checkpoint(e) for e in range(start_epoch, start_epoch + n)]
    ch.close()
    return acks


async def test_good_peer_commits(standby, pki):
    sb, port = standby
    assert await good_session(port, pki) == [1, 2]
    assert sb.replica.durable_epoch == 2  # what the ACK says; the apply follows it
    await sb.stop_accepting()  # a takeover waits for that apply
    assert sb.replica.committed_epoch == 2


async def test_certificate_from_another_ca_is_refused(standby, pki):
    sb, port = standby
    _, other = pki
    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError, OSError)):
        ch = await connect("127.0.0.1", port, ssl=client_ctx(other, "site-a"), server_hostname="site-b")
        await GoodPrimary(ch).hello()
    assert sb.replica.committed_epoch == 0
    assert await good_session(port, pki) == [1, 2]


async def test_right_ca_wrong_name_is_refused(standby, pki):
    sb, port = standby
    good, _ = pki
    # the witness's certificate chains to the pair CA but is not the configured peer
    ch = await connect("127.0.0.1", port, ssl=client_ctx(good, "witness"), server_hostname="site-b")
    with pytest.raises(Exception):
        await GoodPrimary(ch).hello()
    # and a client expecting site-b refuses a server presenting another name
    with pytest.raises(ssl.SSLCertVerificationError):
        await connect("127.0.0.1", port, ssl=client_ctx(good, "site-a"), server_hostname="site-c")
    assert sb.replica.committed_epoch == 0
    assert await good_session(port, pki) == [1, 2]


async def test_plain_tcp_garbage_is_dropped(standby, pki):
    sb, port = standby
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 10)
    await w.drain()
    assert await asyncio.wait_for(r.read(), 5) == b""  # the TLS handshake fails; the server closes
    w.close()
    assert await good_session(port, pki) == [1, 2]


@pytest.mark.parametrize("case", ["oversized", "oversized_64bit", "oversized_control", "cut_off", "replayed",
                                  "forged", "garbage_type"])
async def test_bad_frames_never_applied(standby, pki, case, caplog):
    sb, port = standby
    assert await good_session(port, pki) == [1, 2]
    await sb.wait_applied()
    before = sb.replica.ram.copy()
    good, _ = pki
    ch = await connect("127.0.0.1", port, ssl=client_ctx(good, "site-a"), server_hostname="site-b")
    p = GoodPrimary(ch)
    await p.hello()
    if case == "oversized":
        ch.writer.write(struct.pack(">BQ", MsgType.CHECKPOINT, (1 << 20) + 1) + b"x" * 100)
    elif case == "oversized_64bit":  # a length only a 64-bit field can carry, far over the cap
        ch.writer.write(struct.pack(">BQ", MsgType.CHECKPOINT, 1 << 62) + b"x" * 100)
    elif case == "oversized_control":  # under the channel's cap, over a HEARTBEAT's
        ch.writer.write(struct.pack(">BQ", MsgType.HEARTBEAT, 4096) + b"x" * 4096)
    elif case == "cut_off":
        frame, _ = p.checkpoint_frame(3)
        ch.writer.write(struct.pack(">BQ", MsgType.CHECKPOINT, len(frame)) + frame[: len(frame) // 2])
        await ch.writer.drain()
        ch.close()  # the stream ends mid-frame
        await asyncio.sleep(0.2)
    elif case == "replayed":
        frame, _ = p.checkpoint_frame(2, seed=7)  # epoch 2 is already committed
        await ch.send(MsgType.CHECKPOINT, frame)
    elif case == "forged":
        frame = bytearray(p.checkpoint_frame(3)[0])
        frame[-40] ^= 0x55
        await ch.send(MsgType.CHECKPOINT, bytes(frame))
    elif case == "garbage_type":
        ch.writer.write(struct.pack(">BQ", 200, 4) + b"abcd")
    if case != "cut_off":
        await ch.writer.drain()
    # the standby drops the connection
    with pytest.raises(Exception):
        while True:
            t, _ = await asyncio.wait_for(ch.recv(), 5)
            assert t is not MsgType.ACK, f"{case}: a bad frame was acknowledged"
    ch.close()
    assert sb.replica.committed_epoch == 2
    assert np.array_equal(sb.replica.ram, before), f"{case}: replica changed"
    # protection resumes with a good peer
    assert await good_session(port, pki, start_epoch=3) == [3, 4]


async def test_compat_mismatch_is_refused_with_both_values(standby, pki):
    sb, port = standby
    good, _ = pki
    ch = await connect("127.0.0.1", port, ssl=client_ctx(good, "site-a"), server_hostname="site-b")
    await ch.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION, "site": "site-a",
                                       "compat": {**COMPAT, "machine": "q35"}, "run_id": "r",
                                       "nonce": new_nonce().hex(), "ram_bytes": RAM})
    with pytest.raises(Exception, match="machine: ours 'pc', theirs 'q35'"):
        await ch.recv()


async def test_a_primary_of_the_previous_protocol_is_refused_with_both_versions(standby, pki):
    """Protocol 6 added zero ranges to the frames' disk section: a protocol-5 primary would send
    frames this standby cannot read (and a protocol-5 standby could not read ours)."""
    sb, port = standby
    good, _ = pki
    ch = await connect("127.0.0.1", port, ssl=client_ctx(good, "site-a"), server_hostname="site-b")
    await ch.send_json(MsgType.HELLO, {"proto": PROTOCOL_VERSION - 1, "site": "site-a", "compat": COMPAT,
                                       "run_id": "r", "nonce": new_nonce().hex(), "ram_bytes": RAM})
    with pytest.raises(Exception, match=f"the primary .* speaks replication protocol 5, site site-b speaks 6; "
                                        "run the same geomirror version at both sites"):
        await ch.recv()
    ch.close()
    assert await good_session(port, pki) == [1, 2]


async def test_a_standby_of_the_previous_protocol_is_refused_by_the_primary_with_both_versions(tmp_path):
    """The primary's side of the same check: a standby whose HELLO_REPLY says protocol 5."""
    ram_path = tmp_path / "guest.ram"
    ram_path.write_bytes(bytes(V.RAM))

    async def old_standby(ch: Channel) -> None:
        await ch.recv_json(MsgType.HELLO)
        await ch.send_json(MsgType.HELLO_REPLY, {"proto": PROTOCOL_VERSION - 1, "site": "site-b",
                                                 "nonce": new_nonce().hex(), "valid": False, "hashes": False})
        await ch.recv()  # until the primary drops the connection

    server = await serve("127.0.0.1", 0, old_standby)
    port = server.sockets[0].getsockname()[1]
    capture = Capture(ram_path, V.RAM)
    primary = Primary(PrimaryConfig(site="site-a", compat={}, run_id="r", interval_ms=20), V.StandInGuest(ram_path),
                      capture, NullGate(), connect=lambda: connect("127.0.0.1", port))
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(primary.run())
        try:
            await V.until(lambda: any(e["event"] == "primary.session_lost" for e in logs), what="the refusal")
        finally:
            primary.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            server.close()
            capture.close()
    lost = next(e for e in logs if e["event"] == "primary.session_lost")
    assert re.search(r"the standby \S+ speaks replication protocol 5, site site-a speaks 6; run the same "
                     "geomirror version at both sites", lost["error"]), lost
    assert primary.status.state != "protected"
