"""Channel framing: 64-bit lengths, per-type caps, clear errors on garbage, large frames
written in slices with the event loop free between them and never interleaved with
another frame, and a sender cancelled mid-frame closing the channel."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from geomirror import pairing
from replication.transport import (HEADER_SIZE, PROTOCOL_VERSION, TYPE_CAPS, Channel, ChannelError, MsgType,
                                   connect, serve)


async def channel_pair(max_frame: int = 1 << 30) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    return Channel(ra, wa, max_frame, peer="a-side"), Channel(rb, wb, max_frame, peer="b-side")


def test_header_is_type_and_64_bit_length():
    assert PROTOCOL_VERSION == 6 and HEADER_SIZE == 9


async def test_a_length_over_4_gib_is_read_as_such():
    tx, rx = await channel_pair(max_frame=1 << 40)
    n = (5 << 30) + 7  # would not fit the 4-byte length of protocol 2
    tx.writer.write(struct.pack(">BQ", MsgType.CHECKPOINT, n) + b"x" * 1000)
    await tx.writer.drain()
    tx.close()
    with pytest.raises(ChannelError) as e:
        await rx.recv()
    assert f"cut a CHECKPOINT off after 1000 of {n} bytes" in str(e.value)
    rx.close()


@pytest.mark.parametrize("raw,problem", [
    (struct.pack(">BQ", MsgType.CHECKPOINT, 1 << 62), "sent a CHECKPOINT of 4611686018427387904 bytes, over the cap"),
    (struct.pack(">BQ", MsgType.ACK, 9), "sent a ACK of 9 bytes, over the cap of 8 for ACK"),
    (struct.pack(">BQ", MsgType.HELLO, 1 << 20), "over the cap of 65536 for HELLO"),
    (b"GET / HTTP/1.1\r\n", "unknown message type 71 (garbage or another protocol)"),
    (b"\x07\x00\x00", "cut a message header short"),
])
async def test_garbage_gets_a_sentence_naming_the_peer(raw, problem):
    tx, rx = await channel_pair()
    tx.writer.write(raw)
    await tx.writer.drain()
    tx.close()
    with pytest.raises(ChannelError) as e:
        await rx.recv()
    assert problem in str(e.value) and "b-side" in str(e.value)
    rx.close()


async def test_control_messages_are_capped_whatever_max_frame():
    tx, rx = await channel_pair(max_frame=1 << 30)
    assert tx.frame_cap(MsgType.CHECKPOINT) == 1 << 30
    assert tx.frame_cap(MsgType.HEARTBEAT) == TYPE_CAPS[MsgType.HEARTBEAT] < 1 << 30
    with pytest.raises(ChannelError, match="refusing to send a HEARTBEAT of 100 bytes"):
        await tx.send(MsgType.HEARTBEAT, bytes(100))
    tx.close()
    rx.close()


async def test_large_frames_and_heartbeats_do_not_interleave():
    tx, rx = await channel_pair()
    tx.slice_bytes = 64 << 10
    big = [os.urandom(3 << 20) for _ in range(3)]

    async def beats():
        for i in range(50):
            await tx.send_heartbeat(struct.pack(">QQQ", i, 0, 1))
            await asyncio.sleep(0)

    async def bigs():
        for b in big:
            await tx.send(MsgType.CHECKPOINT, b)

    got = []

    async def reader():
        while len(got) < 53:
            got.append(await rx.recv())

    # the deadline only keeps a misframed stream (a reader waiting forever) from hanging the suite
    await asyncio.wait_for(asyncio.gather(beats(), bigs(), reader()), 30)
    assert [p for t, p in got if t is MsgType.CHECKPOINT] == big
    assert [struct.unpack(">QQQ", p)[0] for t, p in got if t is MsgType.HEARTBEAT] == list(range(50))
    assert tx.bytes_sent == rx.bytes_received == 3 * (HEADER_SIZE + (3 << 20)) + 50 * (HEADER_SIZE + 24)
    tx.close()
    rx.close()


class RecordingWriter:
    """Stands in for a StreamWriter: records writes, and what else the loop ran between them."""

    def __init__(self, events: list, block_after: int | None = None):
        self.events = events
        self.block_after = block_after  # drain blocks forever after this many writes
        self.closed = False

    def write(self, data) -> None:
        self.events.append(("write", len(data)))

    async def drain(self) -> None:
        writes = sum(1 for e in self.events if e[0] == "write")
        if self.block_after is not None and writes >= self.block_after:
            await asyncio.Event().wait()

    def close(self) -> None:
        self.closed = True


async def test_a_large_frame_goes_out_in_slices_with_the_loop_free_between():
    events: list = []
    ch = Channel(asyncio.StreamReader(), RecordingWriter(events), 1 << 30, peer="site-b")
    ch.slice_bytes = 1 << 20

    async def other_task():
        for _ in range(200):
            events.append(("tick",))
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    await ch.send(MsgType.CHECKPOINT, bytes(8 << 20))
    ticker.cancel()
    writes = [e for e in events if e[0] == "write"]
    assert writes[0] == ("write", HEADER_SIZE) and writes[1:] == [("write", 1 << 20)] * 8
    # between any two slices, another task ran
    idx = [i for i, e in enumerate(events) if e[0] == "write"][1:]
    assert all(any(e[0] == "tick" for e in events[i + 1:j]) for i, j in zip(idx, idx[1:]))


async def test_a_sender_cancelled_mid_frame_closes_the_channel():
    events: list = []
    writer = RecordingWriter(events, block_after=3)  # header + 2 slices, then the peer stops reading
    ch = Channel(asyncio.StreamReader(), writer, 1 << 30, peer="site-b")
    ch.slice_bytes = 1 << 20
    task = asyncio.create_task(ch.send(MsgType.CHECKPOINT, bytes(4 << 20)))
    while sum(1 for e in events if e[0] == "write") < 3:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writer.closed
    with pytest.raises(ChannelError, match=r"CHECKPOINT to site-b was cut off after 2097152 of 4194304 bytes"):
        await ch.send_heartbeat(bytes(24))
    assert sum(1 for e in events if e[0] == "write") == 3  # nothing written after the cut


async def test_a_large_frame_over_mutual_tls(tmp_path):
    files = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], [])
    got: asyncio.Queue = asyncio.Queue()

    async def handler(ch):
        for _ in range(2):
            await got.put(await ch.recv())

    server = await serve("127.0.0.1", 0, handler, ssl=pairing.server_context(files.ca, *files.certs["site-b"]),
                         max_frame=32 << 20)
    port = server.sockets[0].getsockname()[1]
    ch = await connect("127.0.0.1", port, ssl=pairing.client_context(files.ca, *files.certs["site-a"]),
                       server_hostname="site-b", max_frame=32 << 20)
    payload = os.urandom(20 << 20)  # over the 8 MiB where the receiver joins its slices in a thread
    await asyncio.gather(ch.send(MsgType.CHECKPOINT, payload), ch.send_heartbeat(bytes(24)))
    first, second = await got.get(), await got.get()
    assert {first[0], second[0]} == {MsgType.CHECKPOINT, MsgType.HEARTBEAT}
    assert (first if first[0] is MsgType.CHECKPOINT else second)[1] == payload
    ch.close()
    server.close()
