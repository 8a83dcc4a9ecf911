"""The HA machine's make-before-break and upstream-loss decisions (pure: events in, actions out),
the route modes it derives, and the extended heartbeat."""

from __future__ import annotations

import pytest

from geomirror import ha
from replication.session import HEARTBEAT, heartbeat_payload, parse_heartbeat
from tests.site_fakes import ha_config

HANDOVER_S, STABLE_S, HOLD_S = 3.0, 5.0, 20.0


def active(t=0.0, lease_s=1e6, **kw):
    """A protected primary holding generation 1 at time t (for `lease_s`), one BGP session up."""
    kw = {"upstream_loss_handover_s": HANDOVER_S, "upstream_loss_peer_stable_s": STABLE_S,
          "upstream_loss_hold_down_s": HOLD_S, **kw}
    m = ha.HaMachine("primary", ha_config(**kw))
    m.handle(ha.Tick(t))
    m.handle(ha.LeaseGranted(1, t + lease_s, t))
    m.handle(ha.StandbyReady(5))
    m.handle(ha.BgpNeighborUp("198.18.1.1", t))
    m.handle(ha.Tick(t))
    assert m.state is ha.ACTIVE_PROTECTED
    return m


def beat(m, t, peer_up_ms):
    return m.handle(ha.HeartbeatReceived(t, 1.0, 1, 0.1, peer_up_ms))


def handovers(out):
    return [a for a in out if isinstance(a, ha.HandOver)]


def ticks(m, t0, t1, peer_up_ms=60_000, step=0.1):
    out, t = [], t0
    while t <= t1:
        beat(m, t, peer_up_ms)
        out += m.handle(ha.Tick(t))
        t = round(t + step, 6)
    return out


def test_upstream_lost_long_enough_hands_over_once():
    m = active()
    ticks(m, 0, 30)
    m.handle(ha.BgpNeighborDown("198.18.1.1", 30.0))
    assert not handovers(ticks(m, 30.1, 32.9)), "not before upstream_loss_handover_s"
    out = ticks(m, 33.0, 40)
    assert len(handovers(out)) == 1 and "upstream lost" in handovers(out)[0].reason


def test_a_session_back_in_time_resets_the_count():
    m = active()
    ticks(m, 0, 30)
    m.handle(ha.BgpNeighborDown("198.18.1.1", 30.0))
    ticks(m, 30.1, 32.0)
    m.handle(ha.BgpNeighborUp("198.18.1.1", 32.0))
    m.handle(ha.BgpNeighborDown("198.18.1.1", 32.5))
    assert not handovers(ticks(m, 32.6, 35.4))
    assert handovers(ticks(m, 35.5, 36))


def test_hold_down_after_becoming_active_and_after_a_handover():
    m = active()
    m.handle(ha.BgpNeighborDown("198.18.1.1", 1.0))
    assert not handovers(ticks(m, 1.1, 19.8)), "hold-down since becoming active"
    assert "hold-down" in m.alarms["upstream"]
    assert len(handovers(ticks(m, 19.9, 39.8))) == 1, "one, then the hold-down since that one"
    assert len(handovers(ticks(m, 39.9, 41))) == 1


@pytest.mark.parametrize("peer_up_ms, why", [(None, "does not report"), (4_000, "have not been up for 5s")])
def test_the_peer_must_have_had_its_sessions_up_for_a_while(peer_up_ms, why):
    m = active()
    ticks(m, 0, 30)
    m.handle(ha.BgpNeighborDown("198.18.1.1", 30.0))
    assert not handovers(ticks(m, 30.1, 40, peer_up_ms=peer_up_ms))
    assert why in m.alarms["upstream"]


def test_no_handover_unprotected_or_when_off():
    m = active()
    ticks(m, 0, 30)
    m.handle(ha.BgpNeighborDown("198.18.1.1", 30.0))
    m.handle(ha.Tick(40.0))  # heartbeats stopped at 30: the standby is lost
    assert m.state is ha.ACTIVE_UNPROTECTED
    assert not handovers(m.handle(ha.Tick(40.1)))
    off = active(upstream_loss_handover_s=0)
    off.handle(ha.BgpNeighborDown("198.18.1.1", 1.0))
    assert not handovers(ticks(off, 1, 60))


def test_hold_down_shorter_than_the_handover_time_is_refused():
    with pytest.raises(ha.HaConfigError, match="upstream_loss_hold_down_s"):
        ha_config(upstream_loss_handover_s=10, upstream_loss_hold_down_s=5)


def test_handover_drains_forwards_and_withdraws_on_the_peers_route():
    m = active()
    out = m.handle(ha.HandoverPrepared(10.0, 7))
    assert ha.Drain() in out and ha.Withdraw() not in out
    assert ha.SetGuestRoute(ha.GUEST_ROUTE_PEER) in out and m.state is ha.HANDING_OVER
    m.handle(ha.BecameStandby(10.5, "switchover"))
    assert m.draining_since is not None, "the drain outlives the demotion"
    out = m.handle(ha.PeerRouteSeen(True))
    assert ha.Withdraw() in out and m.draining_since is None
    assert ha.Withdraw() not in m.handle(ha.Tick(30.0)), "withdrawn once"


def test_the_peers_route_for_one_prefix_of_two_does_not_end_the_drain():
    """Dual stack: the peer's /24 reaches us before its /48; withdrawing both then would leave the
    upstream without a route for the /48 until the peer's arrives."""
    m = active()
    m.handle(ha.HandoverPrepared(10.0, 7))
    out = m.handle(ha.PeerRouteSeen(True, every_prefix=False))
    assert ha.Withdraw() not in out and m.draining_since is not None and m.peer_route_seen
    out = m.handle(ha.PeerRouteSeen(True, every_prefix=True))
    assert ha.Withdraw() in out and m.draining_since is None


def test_drain_times_out_into_a_withdrawal():
    m = active(drain_timeout_s=10)
    m.handle(ha.HandoverPrepared(10.0, 7))
    assert ha.Withdraw() not in m.handle(ha.Tick(19.9))
    out = m.handle(ha.Tick(20.0))
    assert ha.Withdraw() in out and any(isinstance(a, ha.Log) and a.event == "ha.drain_timeout" for a in out)


def test_an_aborted_handover_withdraws_the_drained_route():
    m = active()
    m.handle(ha.HandoverPrepared(10.0, 7))
    out = m.handle(ha.HandoverAborted(11.0, "peer did not take over"))
    assert ha.Withdraw() in out and m.state is ha.FENCED
    assert m.guest_route() == ha.GUEST_ROUTE_HERE, "the guest is still here: its traffic goes to it"


def test_route_modes_never_send_a_running_guests_traffic_away():
    assert active().guest_route() == ha.GUEST_ROUTE_HERE
    sb = ha.HaMachine("standby", ha_config())
    assert sb.guest_route() == ha.GUEST_ROUTE_NONE, "peer not heard yet"
    sb.handle(ha.Tick(0.0))
    assert sb.guest_route() == ha.GUEST_ROUTE_PEER
    sb.handle(ha.Tick(100.0))  # the peer is lost
    assert sb.guest_route() == ha.GUEST_ROUTE_NONE


def test_upstream_status_for_the_peer():
    m = active(t=0.0)
    assert m.upstream_status(2.5) == 2500
    m.handle(ha.BgpNeighborDown("198.18.1.1", 3.0))
    assert m.upstream_status(4.0) == 0
    assert ha.HaMachine("standby", ha_config()).upstream_status(1.0) is None


@pytest.mark.parametrize("up", [False, None, 0, 1234, 1 << 40])
def test_heartbeat_forms_round_trip(up):
    p = heartbeat_payload(7, 99, 3, up)
    assert len(p) == (HEARTBEAT.size if up is False else HEARTBEAT.size + 8)
    want = None if up is False or up is None else min(up, 0xFFFFFFFF)
    assert parse_heartbeat(p) == (7, 99, 3, want)


def test_a_heartbeat_of_another_size_is_refused():
    with pytest.raises(ValueError):
        parse_heartbeat(bytes(28))


def lapsed(t=30.0):
    """`active()` whose upstream and lease authority went together at t: renewals get no answer, so
    past the deadline the lease lapses while protected (the ride-through)."""
    m = active(lease_s=t + 2.0)
    ticks(m, 0, t)
    m.handle(ha.LeaseRenewed(1, t + 2.0, t))  # the last renewal that got through
    m.handle(ha.BgpNeighborDown("198.18.1.1", t))
    m.handle(ha.WitnessUnreachable(t, "uplink0 down"))
    ticks(m, t, t + 1.0)
    assert m.lapsed and not m.holding and m.state is ha.ACTIVE_PROTECTED
    return m


def test_a_lapsed_protected_site_hands_over_its_guest_when_the_upstream_is_lost():
    m = lapsed(30.0)
    out = ticks(m, 31.1, 34)
    assert len(handovers(out)) == 1, m.alarms.get("upstream")


def test_handing_over_without_the_lease_closes_for_good_and_releases_nothing():
    m = lapsed(30.0)
    out = m.handle(ha.HandoverPrepared(33.5, 9))
    assert ha.CloseGate() in out and ha.Drain() in out and m.state is ha.HANDING_OVER
    assert not [a for a in out if isinstance(a, ha.ReleaseLease)]
    assert any(isinstance(a, ha.Log) and a.event == "ha.handover_without_lease" for a in out)
    assert not m.lapsed and not m.gate_open
    out = ticks(m, 33.6, 36) + m.handle(ha.WitnessReachable(36.0)) + m.handle(ha.Tick(36.1))
    assert not [a for a in out if isinstance(a, (ha.AcquireLease, ha.OpenGate))], "it asks for nothing back"
    out = m.handle(ha.LeaseGranted(2, 40.0, 36.2))  # a request from before the handover, answered late
    assert ha.ReleaseLease(2) in out and not m.gate_open and m.state is ha.HANDING_OVER
    out = m.handle(ha.HeartbeatReceived(36.3, 1.0, 3, 0.1, 60_000))  # the peer took generation 3
    assert m.seen_generation == 3 and m.state is ha.HANDING_OVER, "the switchover job demotes, not a fence"
    m.handle(ha.BecameStandby(36.4, "switchover to site-b"))
    assert m.state is ha.STANDBY and not m.gate_open


@pytest.mark.parametrize("granted, reopens", [(2, True), (3, False)])
def test_after_an_aborted_handover_without_the_lease_only_a_grant_nobody_held_since_reopens(granted, reopens):
    m = lapsed(30.0)
    m.handle(ha.HandoverPrepared(33.5, 9))
    m.handle(ha.HandoverAborted(50.0, "site-b did not take over"))
    assert m.state is ha.FENCED and not m.gate_open
    out = []
    for i in range(30):  # the authority stays unreachable: fenced, asking for the lease
        t = 50.0 + i / 10
        out += m.handle(ha.WitnessUnreachable(t)) + m.handle(ha.Tick(t))
    assert any(isinstance(a, ha.AcquireLease) for a in out) and not any(isinstance(a, ha.OpenGate) for a in out)
    assert m.state is ha.FENCED
    out = m.handle(ha.LeaseGranted(granted, 60.0, 53.1))
    if reopens:
        assert ha.OpenGate(2) in out and m.state in ha.ACTIVE
    else:
        assert not any(isinstance(a, ha.OpenGate) for a in out) and m.stale and m.state is ha.FENCED
        assert any(isinstance(a, (ha.Rejoin, ha.StopGuest)) for a in out)


def test_handover_refused_when_forced_or_fenced():
    m = active()
    m.handle(ha.OperatorFence(1.0))
    assert ha.CloseGate() not in m.handle(ha.HandoverPrepared(2.0, 3)) and m.state is ha.FENCED
