"""Inbound frames in a planned switchover: from the final epoch on, the old primary's gate holds
the guest's inbound frames instead of writing them into the socket of a paused QEMU that never
reads again; with the SWITCHOVER they go to the standby (GUEST_FRAMES), which keeps them for
the guest it resumes; an abandoned handover gives them to the old guest after all.

The gate runs for real with a socketpair as its TAP and a stand-in for QEMU's stream socket
(tests/test_gate.py); the Primary and Standby run for real over a loopback channel with a
stand-in guest (tests/test_replica_verify.py)."""

from __future__ import annotations

import asyncio
import socket
import struct

import numpy as np
import pytest

from replication import transport
from replication.capture import Capture
from replication.gate import GateMode, UserspaceGate
from replication.primary import Primary, PrimaryConfig
from replication.standby import Standby
from replication.store import Replica
from replication.transport import ChannelError, pack_frames, unpack_frames
from tests.test_gate import fake_qemu, fake_tap_gate, frame  # noqa: F401  (a fixture)
from tests.test_replica_verify import RAM, StandInGuest, until


def ident(f: bytes) -> int:
    return struct.unpack(">I", f[14:18])[0]


async def to_gate(net, *ids) -> None:
    """Frames arriving from the network (the TAP side), then loop turns for the gate to read them."""
    for i in ids:
        net.send(frame(i))
    for _ in range(20):
        await asyncio.sleep(0)


async def guest_got(r, n: int) -> list[int]:
    out = []
    for _ in range(n):
        (size,) = struct.unpack(">I", await asyncio.wait_for(r.readexactly(4), 5))
        out.append(ident(await r.readexactly(size)))
    return out


def nothing_more(r) -> bool:
    """The guest's side of the stream socket has no unread byte (after the loop turns of to_gate)."""
    return len(r._buffer) == 0


# ---------------------------------------------------------------- the gate
async def test_held_inbound_skips_the_guest_and_reaches_it_in_order_when_the_handover_is_abandoned(fake_tap_gate):
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD)
    await to_gate(net, 1)
    assert await guest_got(r, 1) == [1]
    gate.hold_inbound()
    await to_gate(net, 2, 3, 4)
    assert nothing_more(r)
    assert (gate.stats.inbound_held, gate.stats.inbound_held_bytes) == (3, 3 * len(frame(0)))
    assert gate.end_inbound_hold(deliver=True) == 3
    await to_gate(net, 5)
    assert await guest_got(r, 4) == [2, 3, 4, 5]
    assert gate.stats.inbound_held == 0 and gate.stats.frames_dropped == 0


async def test_forwarding_hands_over_the_held_frames_then_each_later_one(fake_tap_gate):
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD)
    gate.hold_inbound()
    await to_gate(net, 1, 2)
    sent: list[int] = []
    gate.forward_inbound(lambda frames: sent.extend(ident(f) for f in frames))
    assert sent == [1, 2]
    await to_gate(net, 3)
    assert sent == [1, 2, 3] and gate.stats.inbound_forwarded == 3
    gate.forward_inbound(None)  # the channel is gone: held here again
    await to_gate(net, 4)
    assert sent == [1, 2, 3] and gate.stats.inbound_held == 1
    assert gate.end_inbound_hold(deliver=False) == 1  # this site stops running the guest
    assert gate.stats.dropped_inbound_hold == 1 and nothing_more(r)


async def test_the_hold_is_bounded_and_counts_what_it_drops(fake_tap_gate):
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD, max_inbound_hold_bytes=2 * len(frame(0)))
    gate.hold_inbound()
    await to_gate(net, 1, 2, 3, 4)
    assert gate.stats.inbound_held == 2 and gate.stats.dropped_inbound_hold_cap == 2
    gate.end_inbound_hold(deliver=True)
    assert await guest_got(r, 2) == [1, 2]


async def test_frames_from_the_peer_go_before_those_held_here(fake_tap_gate):
    gate, net, r, w = await fake_tap_gate(GateMode.FENCED)
    gate.hold_inbound()  # the new site, from the SWITCHOVER on
    await to_gate(net, 20, 21)
    gate.inject_inbound([frame(10), frame(11)])  # older: they reached the old site first
    assert nothing_more(r)
    gate.end_inbound_hold(deliver=True)
    assert await guest_got(r, 4) == [10, 11, 20, 21]
    assert gate.stats.inbound_injected == 2


async def test_released_before_the_guest_connects_they_wait_for_its_connection(tmp_path):
    tap, net = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tap.setblocking(False)
    net.setblocking(False)
    gate = UserspaceGate(None, tap.fileno(), mode=GateMode.OPEN)
    await gate.start()
    try:
        gate.hold_inbound()
        gate.inject_inbound([frame(1)])
        await to_gate(net, 2)
        gate.end_inbound_hold(deliver=True)  # a cold resume: the QEMU is not connected yet
        await to_gate(net, 3)  # after the release, but it must not overtake the held ones
        assert gate.stats.frames_dropped == 0
        accepted = await fake_qemu(tmp_path / "net.sock")
        gate.attach_guest(tmp_path / "net.sock")
        r, w = await asyncio.wait_for(accepted, 5)
        assert await guest_got(r, 3) == [1, 2, 3]
        w.close()
    finally:
        await gate.close()
        tap.close()
        net.close()


# ---------------------------------------------------------------- the message
def test_guest_frames_pack_and_unpack_in_order_and_split_at_the_cap():
    frames = [frame(i) + bytes(i) for i in range(5)]
    payload, n = pack_frames(frames)
    assert n == 5 and unpack_frames(payload) == frames
    payload, n = pack_frames(frames, cap=2 * (4 + len(frames[1])))
    assert n == 2 and unpack_frames(payload) == frames[:2]


@pytest.mark.parametrize("payload", [b"\0\0\0", struct.pack(">I", 10) + b"x" * 9,
                                     struct.pack(">I", 1 << 20) + b"x" * 100])
def test_a_malformed_guest_frames_message_is_a_channel_error(payload):
    with pytest.raises(ChannelError, match="GUEST_FRAMES"):
        unpack_frames(payload, "site-a")


# ---------------------------------------------------------------- Primary and Standby
class Pair:
    """A Primary with a real gate (socketpair TAP, stand-in QEMU socket) and a Standby, over loopback."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        ram_path = tmp_path / "guest.ram"
        ram_path.write_bytes(np.random.default_rng(1).integers(0, 256, RAM, dtype=np.uint8).tobytes())
        self.guest = StandInGuest(ram_path)
        self.capture = Capture(ram_path, RAM)
        self.replica = Replica(tmp_path / "replica", RAM, fsync=False)
        self.replica.open()
        self.standby = Standby(self.replica, {}, "site-b", refuse_delay_s=0)
        self.switched: list[int] = []
        self.standby.on_switchover = self.switched.append
        self.tap, self.net = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.tap.setblocking(False)
        self.net.setblocking(False)
        self.gate = UserspaceGate(tmp_path / "net.sock", self.tap.fileno(), mode=GateMode.HOLD)
        cfg = PrimaryConfig(site="site-a", compat={}, run_id="run", interval_ms=3, verify_bytes_per_epoch=0)
        self.primary = Primary(cfg, self.guest, self.capture, self.gate, connect=self._connect)

    async def _connect(self):
        return await transport.connect("127.0.0.1", self.port)

    async def __aenter__(self):
        self.server = await transport.serve("127.0.0.1", 0, self.standby.handle, max_frame=RAM + (1 << 20))
        self.port = self.server.sockets[0].getsockname()[1]
        accepted = await fake_qemu(self.tmp / "net.sock")
        await self.gate.start()
        self.r, self.w = await asyncio.wait_for(accepted, 5)
        self.task = asyncio.create_task(self.primary.run())
        await until(lambda: self.primary.status.state == "protected" and self.primary.status.committed_epoch > 0,
                    what="protection")
        return self

    async def __aexit__(self, *exc):
        self.primary.stop()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.w.close()
        await self.gate.close()
        self.server.close()
        self.capture.close()
        self.replica.close()
        self.tap.close()
        self.net.close()


async def test_a_handover_sends_the_frames_that_reach_the_paused_guest_to_the_standby(tmp_path):
    async with Pair(tmp_path) as p:
        await to_gate(p.net, 1)
        assert await guest_got(p.r, 1) == [1]  # the guest runs: inbound passes at once
        epoch = await p.primary.handover(timeout=5)
        await to_gate(p.net, 2, 3)  # the guest is paused for good here: held, not written to it
        assert p.gate.stats.inbound_held == 2
        await p.primary.announce_switchover(epoch)
        await to_gate(p.net, 4)  # still reaching the old site after the SWITCHOVER: sent on
        await until(lambda: p.standby.status.frames_received == 3, what="the frames at the standby")
        assert p.switched == [epoch]
        assert [ident(f) for f in p.standby.take_forwarded()] == [2, 3, 4]
        assert nothing_more(p.r)
        assert p.primary.status.frames_forwarded == 3 and p.primary.status.frames_forward_lost == 0


async def test_switched_off_the_frames_go_to_the_paused_guest_as_before(tmp_path):
    async with Pair(tmp_path) as p:
        p.primary.forward_frames_fn = lambda: False
        epoch = await p.primary.handover(timeout=5)
        await to_gate(p.net, 2, 3)
        await p.primary.announce_switchover(epoch)
        await until(lambda: p.switched == [epoch], what="the SWITCHOVER")
        assert p.standby.take_forwarded() == [] and p.standby.status.frames_received == 0
        assert await guest_got(p.r, 2) == [2, 3]  # into the socket of a QEMU that will be stopped


async def test_an_abandoned_handover_gives_the_held_frames_to_its_own_guest(tmp_path):
    async with Pair(tmp_path) as p:
        await p.primary.handover(timeout=5)
        await to_gate(p.net, 5, 6)
        assert nothing_more(p.r)
        await p.primary.abort_handover()
        await to_gate(p.net, 7)
        assert await guest_got(p.r, 3) == [5, 6, 7]
        assert p.standby.status.frames_received == 0
        mark = p.primary.status.epoch
        await until(lambda: p.primary.status.committed_epoch > mark, what="epochs again after the abort")


async def test_a_standby_that_does_not_take_guest_frames_gets_none(tmp_path, monkeypatch):
    """An older build at the standby (no `guest_frames` in its HELLO_REPLY) still switches over."""
    monkeypatch.setattr("replication.standby.HELLO_FRAMES_KEY", "older_build_key")
    async with Pair(tmp_path) as p:
        epoch = await p.primary.handover(timeout=5)
        await to_gate(p.net, 2)
        await p.primary.announce_switchover(epoch)
        await until(lambda: p.switched == [epoch], what="the SWITCHOVER")
        assert p.standby.status.frames_received == 0 and p.gate.stats.inbound_held == 1
