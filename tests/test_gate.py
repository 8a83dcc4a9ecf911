"""The output gate with a real TAP device in a private namespace: outbound frames are
held per epoch and released in order on ack; inbound frames pass at once."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from geomirror import netns
from replication.gate import GateMode, UserspaceGate, open_tap

ETH_P_ALL = 0x0003


@pytest.fixture
def tap_ns():
    if os.geteuid() != 0:
        pytest.skip("needs root for a TAP device")
    name = f"gm-t-gate-{os.getpid()}"
    netns.create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def frame(i: int) -> bytes:
    # broadcast dst, locally administered src, an unassigned ethertype, payload carries i
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb5" + struct.pack(">I", i) + b"\0" * 46


async def _setup(ns, tmp_path, mode):
    with netns.inside(ns):
        fd = open_tap("gmt0")
        from pyroute2 import IPRoute

        def up():
            with IPRoute() as ip:
                ip.link("set", index=ip.link_lookup(ifname="gmt0")[0], state="up")
        await asyncio.to_thread(lambda: _in(ns, up))
        pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    pkt.bind(("gmt0", 0))
    pkt.setblocking(False)
    gate = UserspaceGate(tmp_path / "net.sock", fd, mode=mode)
    await gate.start()
    r, w = await asyncio.open_unix_connection(str(tmp_path / "net.sock"))
    await gate.wait_guest()
    return gate, pkt, r, w


def _in(ns, fn):
    with netns.inside(ns):
        return fn()


def seen(pkt) -> list[int]:
    out = []
    while True:
        try:
            data = pkt.recv(2048)
        except BlockingIOError:
            return out
        if data[12:14] == b"\x88\xb5":
            out.append(struct.unpack(">I", data[14:18])[0])


async def send(w, *ids):
    for i in ids:
        f = frame(i)
        w.write(struct.pack(">I", len(f)) + f)
    await w.drain()
    await asyncio.sleep(0.05)


async def test_hold_and_release_in_epoch_order(tap_ns, tmp_path):
    gate, pkt, r, w = await _setup(tap_ns, tmp_path, GateMode.HOLD)
    try:
        await send(w, 1, 2, 3)
        gate.seal(1)  # checkpoint 1 taken: frames 1-3 belong to epoch <= 1
        await send(w, 4, 5)
        assert seen(pkt) == []  # nothing leaves before the standby acknowledges
        assert gate.stats.frames_held == 5
        gate.release(1)
        await asyncio.sleep(0.02)
        assert seen(pkt) == [1, 2, 3]
        gate.seal(2)
        gate.release(2)
        await asyncio.sleep(0.02)
        assert seen(pkt) == [4, 5]
        assert gate.stats.frames_held == 0
    finally:
        w.close()
        await gate.close()
        pkt.close()


async def test_inbound_passes_at_once_and_fenced_drops(tap_ns, tmp_path):
    gate, pkt, r, w = await _setup(tap_ns, tmp_path, GateMode.HOLD)
    try:
        pkt.send(frame(77))
        hdr = await asyncio.wait_for(r.readexactly(4), 2)
        data = await r.readexactly(struct.unpack(">I", hdr)[0])
        assert struct.unpack(">I", data[14:18])[0] == 77
        await send(w, 9)
        gate.set_mode(GateMode.FENCED)
        gate.seal(1)
        gate.release(1)
        await send(w, 10)
        await asyncio.sleep(0.02)
        assert seen(pkt) == []  # a fenced site releases nothing, ever
        assert gate.stats.frames_dropped == 2
    finally:
        w.close()
        await gate.close()
        pkt.close()


async def test_open_mode_passes_through(tap_ns, tmp_path):
    gate, pkt, r, w = await _setup(tap_ns, tmp_path, GateMode.OPEN)
    try:
        await send(w, 1, 2)
        assert seen(pkt) == [1, 2]
    finally:
        w.close()
        await gate.close()
        pkt.close()


async def test_release_waits_for_permission(tap_ns, tmp_path):
    gate, pkt, r, w = await _setup(tap_ns, tmp_path, GateMode.HOLD)
    try:
        gate.allow(False)  # e.g. no witness lease yet
        await send(w, 1, 2)
        gate.seal(1)
        gate.release(1)
        await asyncio.sleep(0.02)
        assert seen(pkt) == []  # acknowledged, but this site may not release yet
        gate.allow(True)
        await asyncio.sleep(0.02)
        assert seen(pkt) == [1, 2]
    finally:
        w.close()
        await gate.close()
        pkt.close()
