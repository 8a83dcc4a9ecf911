"""The output gate with a real TAP device in a private namespace: outbound frames are
held per epoch and released in order on ack; inbound frames pass at once."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest
import structlog.testing

from geomirror import netns
from replication.gate import GateMode, UserspaceGate, open_tap, reply_time

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
    accepted = await fake_qemu(tmp_path / "net.sock")
    gate = UserspaceGate(tmp_path / "net.sock", fd, mode=mode)
    await gate.start()
    r, w = await accepted
    await gate.wait_guest()
    return gate, pkt, r, w


async def fake_qemu(path):
    """QEMU's side of `-netdev stream,server=on`: listens; the gate connects. Returns an
    awaitable of the (reader, writer) of the gate's connection."""
    conn = asyncio.get_running_loop().create_future()

    async def on(r, w):
        if not conn.done():
            conn.set_result((r, w))

    await asyncio.start_unix_server(on, path=str(path))
    return conn


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
        assert gate.stats.dropped_fenced == 2  # the one held when the fence came, and the one after
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


# ---------------------------------------------------------------- without a TAP: the gate's own logic
# A SOCK_DGRAM socketpair stands in for the TAP fd: one datagram per read/write, like a TAP.

class Clock:
    """CLOCK_BOOTTIME as the test sets it."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def fake_tap_gate(tmp_path):
    made = []

    async def make(mode, **kw):
        tap, net = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        tap.setblocking(False)
        net.setblocking(False)
        accepted = await fake_qemu(tmp_path / f"net{len(made)}.sock")
        gate = UserspaceGate(tmp_path / f"net{len(made)}.sock", tap.fileno(), mode=mode, **kw)
        await gate.start()
        r, w = await accepted
        await gate.wait_guest()
        made.append((gate, tap, net, w))
        return gate, net, r, w

    yield make
    for gate, tap, net, w in made:
        w.close()
        await gate.close()
        tap.close()
        net.close()


def on_net(net) -> list[int]:
    """Ids of the frames the gate wrote to the (fake) TAP so far."""
    out = []
    while True:
        try:
            out.append(struct.unpack(">I", net.recv(2048)[14:18])[0])
        except BlockingIOError:
            return out


async def from_guest(w, *ids):
    for i in ids:
        f = frame(i)
        w.write(struct.pack(">I", len(f)) + f)
    await w.drain()
    for _ in range(20):  # let the gate's reader take them (no timing: loop turns)
        await asyncio.sleep(0)


async def test_interface_names_everything_the_site_calls():
    from replication.gate import Gate

    for name in ("allow", "attach_guest", "detach_guest", "seal", "stopping", "resumed", "release", "set_mode",
                 "held_epochs", "start", "close", "hold_inbound", "forward_inbound", "inject_inbound",
                 "end_inbound_hold"):
        assert getattr(UserspaceGate, name) is not getattr(Gate, name), name
    assert isinstance(UserspaceGate.current_epoch, property) and UserspaceGate.current_epoch is not Gate.current_epoch
    assert {"mode", "allowed", "until", "stats"} <= set(Gate.__annotations__)
    with pytest.raises(NotImplementedError):
        Gate().release(1)


async def test_hold_before_allow_in_open_mode_is_capped(fake_tap_gate):
    size = len(frame(0))
    gate, net, r, w = await fake_tap_gate(GateMode.OPEN, max_held_bytes=10 * size)
    gate.allow(False)  # e.g. a resumed guest before the lease is confirmed
    await from_guest(w, *range(30))
    assert on_net(net) == []
    assert (gate.stats.frames_held, gate.stats.bytes_held) == (10, 10 * size)
    assert gate.stats.dropped_held_cap == 20 and gate.stats.frames_dropped == 20
    gate.allow(True)
    assert on_net(net) == list(range(10))  # the first ten, in order
    await from_guest(w, 30)
    assert on_net(net) == [30] and gate.stats.frames_held == 0


async def test_hold_mode_cap_is_counted_as_such(fake_tap_gate):
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD, max_held_bytes=3 * len(frame(0)))
    await from_guest(w, 1, 2, 3, 4, 5)
    gate.seal(1)
    gate.release(1)
    assert on_net(net) == [1, 2, 3] and gate.stats.dropped_held_cap == 2


async def test_fenced_drops_are_counted_as_such(fake_tap_gate):
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD)
    await from_guest(w, 1, 2)
    gate.set_mode(GateMode.FENCED)
    await from_guest(w, 3)
    gate.seal(1)
    gate.release(1)
    assert on_net(net) == [] and gate.stats.dropped_fenced == 3 and gate.stats.frames_held == 0


async def test_traffic_toward_a_guest_that_does_not_read_is_capped(fake_tap_gate):
    cap = 64 << 10
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD, max_to_guest_bytes=cap)
    big = frame(0) + bytes(1400)
    sent = 0
    for i in range(3000):  # ~4.4 MB toward the guest, which reads none of it yet
        f = big[:14] + struct.pack(">I", i) + big[18:]
        while True:
            try:
                net.send(f)
                break
            except BlockingIOError:
                await asyncio.sleep(0)
        sent += 1
        await asyncio.sleep(0)
    for _ in range(50):
        await asyncio.sleep(0)
    assert gate.stats.frames_in == sent
    assert gate.stats.dropped_to_guest > 0
    assert gate._writer.transport.get_write_buffer_size() <= cap
    # the guest reads again: whole frames, in order, every one not counted as dropped
    got = []
    while len(got) < sent - gate.stats.dropped_to_guest:
        (n,) = struct.unpack(">I", await asyncio.wait_for(r.readexactly(4), 5))
        data = await r.readexactly(n)
        assert n == len(big)
        got.append(struct.unpack(">I", data[14:18])[0])
    assert got == sorted(got) and len(got) == sent - gate.stats.dropped_to_guest


async def test_release_checks_the_lease_deadline_when_output_leaves(fake_tap_gate):
    clock = Clock(99.0)
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD, clock=clock)
    gate.allow(True, until=100.0)
    await from_guest(w, 1, 2)
    gate.seal(1)
    gate.release(1)
    assert on_net(net) == [1, 2]
    await from_guest(w, 3)
    gate.seal(2)
    clock.now = 100.0  # the lease ran out; the HA tick has not noticed yet
    with structlog.testing.capture_logs() as logs:
        gate.release(2)
        gate.release(2)
    assert on_net(net) == [] and gate.stats.frames_held == 1
    assert gate.stats.withheld_lease_expired == 2
    assert [e["event"] for e in logs] == ["gate.lease_expired"]  # logged once, counted each time
    gate.allow(True, until=110.0)  # renewed: what was acknowledged leaves
    assert on_net(net) == [3]


async def test_open_mode_stops_at_the_deadline(fake_tap_gate):
    clock = Clock(99.0)
    gate, net, r, w = await fake_tap_gate(GateMode.OPEN, clock=clock)
    gate.allow(True, until=100.0)
    await from_guest(w, 1)
    assert on_net(net) == [1]
    clock.now = 100.5
    await from_guest(w, 2, 3)
    assert on_net(net) == [] and gate.stats.frames_held == 2 and gate.stats.withheld_lease_expired == 2
    gate.allow(True, until=200.0)
    await from_guest(w, 4)
    assert on_net(net) == [2, 3, 4]


async def test_allow_without_until_has_no_deadline(fake_tap_gate):
    clock = Clock(1e12)
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD, clock=clock)
    gate.allow(True, until=5.0)
    gate.allow(False)
    gate.allow(True)  # no witness: no deadline
    assert gate.until is None
    await from_guest(w, 1)
    gate.seal(1)
    gate.release(1)
    assert on_net(net) == [1] and gate.stats.withheld_lease_expired == 0


async def test_the_gate_dials_the_guest_and_again_after_a_drop(tmp_path):
    """QEMU is the stream server (`-netdev stream,server=on`): the gate connects, and connects
    again when the connection drops, as a restarted daemon does to the same running QEMU."""
    conns: asyncio.Queue = asyncio.Queue()

    async def on(r, w):
        await conns.put((r, w))

    path = tmp_path / "net.sock"
    tap, net = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    tap.setblocking(False)
    net.setblocking(False)
    gate = UserspaceGate(path, tap.fileno(), mode=GateMode.OPEN)
    await gate.start()  # before QEMU listens: it keeps dialling
    await asyncio.sleep(0.1)
    srv = await asyncio.start_unix_server(on, path=str(path))
    try:
        gate.allow(True)
        for word in (b"a", b"b"):
            r, w = await asyncio.wait_for(conns.get(), 5)
            await gate.wait_guest()
            w.write(struct.pack(">I", 60) + word * 60)
            await w.drain()
            for _ in range(50):
                try:
                    assert net.recv(100) == word * 60
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            else:
                raise AssertionError("the frame did not reach the TAP")
            w.close()  # the connection drops; the gate dials again
        gate.detach_guest()
        await asyncio.sleep(0.2)
        assert conns.empty(), "detached: no more dialling"
    finally:
        srv.close()
        await gate.close()
        tap.close()
        net.close()


async def test_a_renewed_permission_does_not_count_an_epoch_twice(fake_tap_gate):
    """Every lease renewal re-allows the gate (a later deadline); that is no new epoch released."""
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD)
    gate.allow(True, until=None)
    gate.seal(1)
    gate.release(1)
    assert gate.stats.epochs_released == 1
    for deadline in (1e12, 1e12 + 1, 1e12 + 2):
        gate.allow(True, until=deadline)
    assert gate.stats.epochs_released == 1
    gate.seal(2)
    gate.release(2)
    assert gate.stats.epochs_released == 2


async def test_seal_reports_the_epochs_quiet_tail(fake_tap_gate):
    """The pacer's reply measurement: an epoch that held frames has a quiet tail (last frame to
    seal), one that held none has None, and the next epoch starts afresh."""
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD)
    assert gate.stats.last_quiet_ms is None
    await from_guest(w, 1, 2)
    gate.seal(1)
    assert gate.stats.last_quiet_ms is not None and gate.stats.last_quiet_ms >= 0
    gate.seal(2)
    assert gate.stats.last_quiet_ms is None
    await from_guest(w, 3)
    gate.seal(3)
    assert gate.stats.last_quiet_ms is not None


def test_the_reply_time_counts_the_guests_run_from_the_release_that_let_the_requests_in():
    """All on one clock (seconds): the previous epoch ran 0.900-0.960, its pause 0.960-1.000,
    this one from 1.000 (`resumed`). The old pacer derived this from the seal-to-release delay
    less the pause and the interval less the quiet tail, which under COLO (the seal comes after
    the RAM's transfer, most of the pause) put the replies 1.6-2.1 ms after the release where
    the held frames showed 5-13 ms."""
    edges = dict(resumed=1.000, prev_stop=0.960, prev_resumed=0.900)
    assert reply_time(1.055, [1.050], **edges) == pytest.approx(5)  # released in this epoch
    assert reply_time(1.045, [1.010, 1.040], **edges) == pytest.approx(5)  # the latest release before the frame
    # released 20 ms before the previous epoch's pause, answered 10 ms into this one: the guest
    # ran 30 ms for it (the 40 ms pause between is not reply time)
    assert reply_time(1.010, [0.940], **edges) == pytest.approx(30)
    assert reply_time(1.050, [0.980], **edges) == pytest.approx(50)  # released in the pause: from the resume
    # the only release came after the last frame, or before the previous epoch: nothing to measure
    assert reply_time(1.030, [1.050], **edges) is None
    assert reply_time(1.030, [0.500, 1.050], **edges) is None
    assert reply_time(1.030, [], **edges) is None
    assert reply_time(1.030, [1.010], resumed=None, prev_stop=None, prev_resumed=None) is None


async def test_the_gate_measures_release_offsets_reply_times_and_cut_off_output(fake_tap_gate):
    """The pacer's inputs as the gate takes them on its own clock: a release's offset from the
    resume after its epoch's pause, the reply from that release to the next held frame, and output
    that came after the pause began (cut off: quiet 0)."""
    import time
    gate, net, r, w = await fake_tap_gate(GateMode.HOLD)
    gate.resumed()
    await from_guest(w, 1)
    gate.stopping()
    gate.seal(1)
    assert gate.stats.last_reply_ms is None  # no release has let anything out yet
    assert gate.stats.last_quiet_ms is not None and gate.stats.last_quiet_ms >= 0
    t_resume = time.monotonic()
    gate.resumed()
    assert gate.stats.last_release_offset_ms is None
    gate.release(1)  # lets frame 1 out: the client's next request comes after this
    t_release = time.monotonic()
    offset = gate.stats.last_release_offset_ms
    assert offset is not None and 0 <= offset <= (t_release - t_resume) * 1000
    await from_guest(w, 2)
    gate.stopping()
    t_stop = time.monotonic()
    gate.seal(2)
    assert gate.stats.last_reply_ms is not None and 0 <= gate.stats.last_reply_ms <= (t_stop - t_release + 1e-3) * 1000
    gate.resumed()
    gate.stopping()
    await from_guest(w, 3)  # held after the pause began (before the guest actually stopped)
    gate.seal(3)
    assert gate.stats.last_quiet_ms == 0
    gate.release(3)
    assert gate.stats.last_release_offset_ms is not None
