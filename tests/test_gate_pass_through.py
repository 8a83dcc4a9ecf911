"""The gate's pass-through policy: in HOLD, guest output of the configured UDP flows leaves at
once (while this site may release), everything else waits for its epoch's commit; nothing
passes while fenced or without the lease; the classifier takes any bytes without raising.

The real UserspaceGate, with one end of a datagram socketpair as its TAP (one frame per
datagram, like a TAP) and frames handed to it as the guest's NIC would."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomirror.ha import HaState
from geomirror.site.gate_policy import GateController, GateInputs, UnreachablePolicy
from replication.gate import GateMode, UserspaceGate, udp_source_port

MAC = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02"


def ipv4(proto: int, sport: int, tag: int, *, flags_frag: int = 0, ihl: int = 5) -> bytes:
    l4 = struct.pack(">HHHH", sport, 40000, 8 + 4, 0) + struct.pack(">I", tag)
    ip = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(l4), 0, flags_frag, 64, proto, 0,
                     bytes([198, 51, 100, 10]), bytes([198, 18, 10, 2])) + b"\x01" * (4 * ihl - 20)
    return MAC + b"\x08\x00" + ip + l4


def ipv6(next_header: int, sport: int, tag: int) -> bytes:
    l4 = struct.pack(">HHHH", sport, 40000, 8 + 4, 0) + struct.pack(">I", tag)
    ip = struct.pack(">IHBB16s16s", 6 << 28, len(l4), next_header, 64, b"\x20\x01\x0d\xb8" + b"\0" * 11 + b"\x10",
                     b"\x20\x01\x0d\xb8" + b"\0" * 11 + b"\x02")
    return MAC + b"\x86\xdd" + ip + l4


def udp4(sport, tag, **kw):
    return ipv4(17, sport, tag, **kw)


def tcp4(sport, tag):
    return ipv4(6, sport, tag)


def tag_of(frame: bytes) -> int:
    return struct.unpack(">I", frame[-4:])[0]


@pytest.fixture
def tap():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def left(net: socket.socket) -> list[int]:
    out = []
    while True:
        try:
            out.append(tag_of(net.recv(4096)))
        except BlockingIOError:
            return out


def gate_on(tap_end, mode=GateMode.HOLD, flows=((6000, 6100),)) -> UserspaceGate:
    g = UserspaceGate(None, tap_end.fileno(), mode=mode, pass_through=flows)
    g.set_pass_through(True)
    return g


# ---------------------------------------------------------------- the classifier

def test_classifier_reads_udp_source_ports_of_whole_datagrams_only():
    assert udp_source_port(udp4(6000, 1)) == 6000
    assert udp_source_port(ipv6(17, 6001, 1)) == 6001
    assert udp_source_port(udp4(6002, 1, ihl=6)) == 6002  # IPv4 options
    vlan = MAC + b"\x81\x00\x00\x05" + udp4(6003, 1)[12:]
    assert udp_source_port(vlan) == 6003
    assert udp_source_port(tcp4(6000, 1)) is None
    assert udp_source_port(ipv6(6, 6000, 1)) is None
    assert udp_source_port(ipv6(0, 6000, 1)) is None  # an extension header first: not classified
    assert udp_source_port(udp4(6000, 1, flags_frag=0x2000)) is None  # more fragments follow
    assert udp_source_port(udp4(6000, 1, flags_frag=0x0010)) is None  # a later fragment
    assert udp_source_port(udp4(6000, 1, ihl=4)) is None
    assert udp_source_port(MAC + b"\x08\x06" + b"\0" * 28) is None  # ARP
    assert udp_source_port(udp4(6000, 1)[:14 + 20 + 7]) is None  # the UDP header cut short


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_classifier_takes_any_bytes(data):
    port = udp_source_port(data)
    assert port is None or 0 <= port <= 65535


@settings(max_examples=300, deadline=None)
@given(base=st.sampled_from([udp4(6000, 7), ipv6(17, 6000, 7), tcp4(6000, 7), udp4(6000, 7, ihl=15)]),
       cut=st.integers(0, 80), flips=st.lists(st.tuples(st.integers(0, 79), st.integers(0, 255)), max_size=6))
def test_malformed_frames_never_crash_the_gate(base, cut, flips):
    """Truncated and bit-flipped frames through the real gate: each leaves or is held, none raises."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    try:
        g = gate_on(a)
        f = bytearray(base[:cut])
        for i, v in flips:
            if i < len(f):
                f[i] = v
        g._outbound(bytes(f))
        out = left(b) if len(f) >= 4 else []
        assert g.stats.frames_passed_through + g.stats.frames_held == 1
        assert len(out) == g.stats.frames_passed_through
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------- the gate

def test_media_leaves_at_once_while_tcp_and_signalling_of_the_same_epoch_wait(tap):
    t, net = tap
    g = gate_on(t)
    for f in (udp4(6000, 1), tcp4(6000, 2), udp4(5060, 3), ipv6(17, 6100, 4), ipv6(6, 6050, 5),
              udp4(6101, 6), udp4(6000, 7, flags_frag=0x2000)):
        g._outbound(f)
    assert left(net) == [1, 4]  # RTP (IPv4 and IPv6) of the configured range, at once
    assert g.stats.frames_passed_through == 2 and g.stats.frames_held == 5
    g.seal(1)
    g._outbound(udp4(6000, 8))
    assert left(net) == [8]
    g.release(1)
    assert left(net) == [2, 3, 5, 6, 7]  # the rest, at its epoch's commit, in order
    assert g.stats.frames_held == 0


def test_pass_through_is_off_by_default(tap):
    t, net = tap
    g = UserspaceGate(None, t.fileno(), mode=GateMode.HOLD)  # no flows configured
    g.set_pass_through(True)
    g._outbound(udp4(6000, 1))
    assert left(net) == []
    g2 = UserspaceGate(None, t.fileno(), mode=GateMode.HOLD, pass_through=((6000, 6000),))  # flows, policy off
    g2._outbound(udp4(6000, 2))
    assert left(net) == []
    g2.seal(1)
    g.seal(1)
    g.release(1)
    g2.release(1)
    assert left(net) == [1, 2]


def test_nothing_passes_when_fenced_or_without_the_lease(tap):
    t, net = tap
    fenced = gate_on(t, mode=GateMode.FENCED)
    fenced._outbound(udp4(6000, 1))
    assert left(net) == [] and fenced.stats.dropped_fenced == 1
    g = gate_on(t)
    g.allow(False)  # the lease is lost (or not held yet)
    g._outbound(udp4(6000, 2))
    assert left(net) == []
    clock = [100.0]
    late = UserspaceGate(None, t.fileno(), mode=GateMode.HOLD, pass_through=((6000, 6000),),
                         clock=lambda: clock[0])
    late.set_pass_through(True)
    late.allow(True, until=101.0)
    late._outbound(udp4(6000, 3))
    assert left(net) == [3]
    clock[0] = 101.0  # the lease deadline passed, the HA loop has not closed the gate yet
    late._outbound(udp4(6000, 4))
    assert left(net) == [] and late.stats.withheld_lease_expired >= 1
    late.set_mode(GateMode.FENCED)
    assert late.stats.dropped_fenced == 1  # the withheld media frame is discarded, never sent


def test_the_policy_turns_pass_through_on_only_while_a_session_commits_with_the_lease(tap):
    t, net = tap
    g = UserspaceGate(None, t.fileno(), mode=GateMode.FENCED, pass_through=((6000, 6100),))
    ctl = GateController(g, GateInputs(policy=UnreachablePolicy.STALL))
    n = iter(range(1, 100))

    def media_left() -> bool:
        g._outbound(udp4(6000, next(n)))
        return bool(left(net))

    ctl.update(ha_state=HaState.ACTIVE_PROTECTED, guest_here=True, may_release=True, promised=True)
    assert g.mode is GateMode.HOLD and not media_left(), "waiting for a lost standby (stall): nothing leaves"
    ctl.update(session_committing=True)
    assert ctl.decision.pass_through and media_left()
    ctl.update(may_release=False)  # the lease is gone
    assert not ctl.decision.pass_through and not media_left()
    ctl.update(may_release=True)
    left(net)  # (what was held meanwhile may leave at the next commit)
    assert media_left()
    ctl.update(ha_state=HaState.FENCED)
    assert g.mode is GateMode.FENCED and not media_left()
    ctl.update(ha_state=HaState.ACTIVE_PROTECTED, session_committing=False, promised=False)
    assert g.mode is GateMode.OPEN and media_left(), "the only copy speaks, media included"
