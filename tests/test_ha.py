"""The HA state machine: one test per rule, and two sites plus the real lease table under hypothesis."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from geomirror import ha
from geomirror.ha import (HANDING_OVER, HandoverAborted, HandoverPrepared, ACTIVE_PROTECTED, BecameStandby, LeaseSeen, QueryLease, Rejoin, ACTIVE_UNPROTECTED, FENCED, STANDBY, STARTING, TAKING_OVER, AcquireLease,
                          Alarm, Announce, BgpNeighborUp, CloseGate, HaConfig, HaConfigError, HaMachine,
                          HeartbeatReceived, LeaseDenied, LeaseGranted, LeaseLost, LeaseRenewed, OpenGate,
                          OperatorFence, OperatorPromote, PeerRouteSeen, ReleaseLease, RenewLease,
                          ReplicaCommitted, ResumeDone, ResumeFailed, ResumeGuest, SetProtection, StandbyReady,
                          StopGuest, Tick, Withdraw, WitnessReachable, WitnessUnreachable, Drain, PreAnnounce)
from geomirror.witness import LeaseTable

CFG = dict(heartbeat_interval_ms=50, min_timeout_ms=300, max_timeout_ms=1000, lease_ttl_ms=1000,
           renew_every_ms=200, max_clock_skew_ms=50,
           # the strict rule (fence at the lease deadline) is what the two-site model proves without
           # output commit; the ride-through has its own directed tests below
           ride_through_witness_outage=False,
           # the operator's manual mode (stale guest stopped, site fenced until `rejoin`); the
           # automatic rejoin has its own tests below
           auto_rejoin=False)
TTL_S = CFG["lease_ttl_ms"] / 1000


def cfg(site="site-a", **kw):
    return HaConfig(site=site, **{**CFG, **kw})


def types(actions):
    return [type(a) for a in actions]


def alarms(actions):
    return " | ".join(a.message for a in actions if isinstance(a, Alarm))


# ---------------------------------------------------------------- targeted rules
def active_primary(now=0.0):
    m = HaMachine("primary", cfg())
    assert types(m.handle(Tick(now))) == [AcquireLease]
    m.handle(BgpNeighborUp("198.18.1.1"))
    out = m.handle(LeaseGranted(1, now + TTL_S, now))
    assert OpenGate(1) in out and Announce(1) in out and SetProtection(False) in out
    assert m.state == ACTIVE_UNPROTECTED
    m.handle(HeartbeatReceived(now, 20.0))
    out = m.handle(StandbyReady(1))
    assert m.state == ACTIVE_PROTECTED and SetProtection(True) in out
    return m


def standby_with_replica(now=0.0, peer_generation=1):
    m = HaMachine("standby", cfg("site-b"))
    m.handle(Tick(now))
    m.handle(ReplicaCommitted(7))
    m.handle(HeartbeatReceived(now, 20.0, peer_generation))
    return m


def test_detection_timeout_follows_rtt_and_is_clamped():
    """The machine takes the link's smoothed RTT as measured (one estimator: LinkStats) and
    applies the one formula; it does not smooth again."""
    from replication.session import LinkStats

    m = HaMachine("standby", cfg(min_timeout_ms=300, max_timeout_ms=1000))
    link = LinkStats()

    def timeout_after(samples) -> float:
        for x in samples:
            link.add_rtt(x)
        m.handle(HeartbeatReceived(0.0, link.rtt_ms, 0, link.rtt_var_ms))
        return m.timeout_ms

    assert m.timeout_ms == 1000, "no sample yet: the conservative maximum"
    assert timeout_after([10.0] * 50) == 300, "a fast, steady link is clamped to the minimum"
    jittery = timeout_after((10.0, 200.0) * 20)
    assert jittery > link.rtt_ms + 3 * 50 and jittery <= 1000, "variance widens the timeout"
    assert m.rtt_ms == link.rtt_ms, "the machine uses the link's estimate as is"
    assert timeout_after([5000.0] * 50) == 1000


def test_config_rejects_a_ttl_that_leaves_no_room_to_renew():
    with pytest.raises(HaConfigError, match="lease_ttl_ms 400 is too short"):
        cfg(lease_ttl_ms=400)
    with pytest.raises(HaConfigError, match="heartbeat timing"):
        cfg(min_timeout_ms=20)


def test_primary_renews_every_interval_and_fences_before_expiry_when_renewals_fail():
    m = active_primary()
    assert types(m.handle(Tick(0.1))) == []
    assert types(m.handle(Tick(0.2))) == [RenewLease]
    m.handle(LeaseRenewed(1, 0.2 + TTL_S, 0.21))
    out = m.handle(WitnessUnreachable(0.3, "timeout"))
    assert m.state == ACTIVE_PROTECTED and CloseGate not in types(out) and "fencing at the lease deadline" in alarms(out)
    deadline = 0.2 + TTL_S - m.config.fence_margin_ms / 1000
    assert deadline < 0.2 + TTL_S - (CFG["renew_every_ms"] + CFG["max_clock_skew_ms"]) / 1000 + 1e-9
    t = 0.25
    while t < deadline - 0.01:
        assert CloseGate not in types(m.handle(Tick(t))), f"fenced too early at {t}"
        t += 0.05
    out = m.handle(Tick(deadline))
    assert types(out)[:2] == [CloseGate, Withdraw] and StopGuest not in types(out)
    assert m.state == FENCED and not m.holding and "fenced itself" in alarms(out)


def test_witness_unreachable_with_peer_heartbeating_only_alarms_at_the_standby():
    b = standby_with_replica()
    out = b.handle(WitnessUnreachable(0.1))
    assert b.state == STANDBY and types(out) == [Alarm]
    for i in range(1, 40):
        out = b.handle(Tick(i * 0.05))
        b.handle(HeartbeatReceived(i * 0.05, 20.0, 1))
        assert AcquireLease not in types(out) and b.state == STANDBY


def test_takeover_sequence_waits_for_a_higher_generation():
    b = standby_with_replica()
    b.handle(BgpNeighborUp("198.18.2.1"))
    out = b.handle(Tick(1.5))  # heartbeats stopped at 0.0
    assert b.state == TAKING_OVER and AcquireLease in types(out)
    out = b.handle(LeaseDenied("site-a", 1))
    assert b.state == TAKING_OVER and ResumeGuest not in types(out)
    assert AcquireLease not in types(b.handle(Tick(1.6))), "retries are paced by renew_every_ms"
    assert AcquireLease in types(b.handle(Tick(1.7)))
    out = b.handle(LeaseGranted(2, 1.7 + TTL_S, 1.72))
    assert types(out)[-1] == ResumeGuest and b.holding and b.lease_generation == 2
    assert OpenGate not in types(out), "no output before the guest has resumed"
    out = b.handle(ResumeDone(1.9))
    assert OpenGate(2) in out and Announce(2) in out and b.state == ACTIVE_UNPROTECTED
    assert b.snapshot()["gate_open"] and b.snapshot()["lease_generation"] == 2


def test_standby_refuses_a_grant_not_above_the_generation_it_saw():
    b = standby_with_replica(peer_generation=5)
    b.handle(Tick(1.5))
    out = b.handle(LeaseGranted(5, 1.5 + TTL_S, 1.5))
    assert ResumeGuest not in types(out) and not b.holding and "has the witness lost its state" in alarms(out)


def test_takeover_aborts_when_the_peer_answers_again():
    b = standby_with_replica()
    b.handle(Tick(1.5))
    assert b.state == TAKING_OVER
    b.handle(HeartbeatReceived(1.55, 20.0, 1))
    assert b.state == STANDBY and AcquireLease not in types(b.handle(Tick(1.7)))


def test_bgp_aware_refusal_when_the_witness_is_unreachable():
    b = standby_with_replica()
    b.handle(WitnessUnreachable(0.1))
    b.handle(PeerRouteSeen(True))
    out = b.handle(Tick(1.5))
    assert b.state == STANDBY and ResumeGuest not in types(out)
    assert "originated by the peer's AS" in alarms(out) and "not taking over" in alarms(out)
    out = b.handle(PeerRouteSeen(False))
    assert "the peer's route is gone" in alarms(out) and b.state == STANDBY
    # it keeps probing with lease requests; a failed probe changes nothing
    probes = [a for t in (1.6, 1.7, 1.8) for a in b.handle(Tick(t)) if isinstance(a, AcquireLease)]
    assert probes and b.state == STANDBY
    b.handle(WitnessUnreachable(1.8))
    assert b.state == STANDBY
    out = b.handle(WitnessReachable(2.0))
    assert b.state == TAKING_OVER and AcquireLease in types(out)


def test_witness_down_then_primary_lost_needs_promote_and_force_without_lease():
    b = standby_with_replica()
    b.handle(WitnessUnreachable(0.1))
    out = b.handle(Tick(1.5))
    assert b.state == STANDBY and "not taking over" in alarms(out)
    out = b.handle(OperatorPromote(1.6))
    assert ResumeGuest not in types(out) and AcquireLease in types(out), "the witness may be back: ask"
    out = b.handle(WitnessUnreachable(1.65))
    assert b.state == STANDBY and ResumeGuest not in types(out) and "--force" in alarms(out)
    b.handle(PeerRouteSeen(True))
    out = b.handle(OperatorPromote(1.7, force=True))
    assert ResumeGuest in types(out) and "WITHOUT a lease from the witness" in alarms(out)
    assert "still originates" in alarms(out)
    assert any(isinstance(a, ha.Log) and a.event == "ha.promote_forced" for a in out)
    out = b.handle(ResumeDone(1.9))
    assert OpenGate(None) in out and b.state == ACTIVE_UNPROTECTED and b.forced
    # once the witness answers, the forced site takes a real lease
    out = b.handle(WitnessReachable(3.0))
    assert AcquireLease in types(out)
    out = b.handle(LeaseGranted(2, 3.0 + TTL_S, 3.0))
    assert OpenGate(2) in out and b.holding and not b.forced


def forced_site():
    b = standby_with_replica()
    b.handle(WitnessUnreachable(0.1))
    b.handle(Tick(1.5))
    b.handle(OperatorPromote(1.6, force=True))
    b.handle(ResumeDone(1.7))
    assert b.forced and b.state in ha.ACTIVE
    return b


def test_a_forced_site_runs_on_while_the_dead_sites_lease_lingers_then_takes_a_real_one():
    """The lease backend still shows the lost site's lease (it outlived the site, or etcd's new
    leader extended it): the forced site keeps running and retries until it expires."""
    b = forced_site()
    out = b.handle(LeaseDenied("site-a", 3))
    assert CloseGate not in types(out) and b.state in ha.ACTIVE and b.gate_open
    assert "running on under the forced promotion" in alarms(out)
    t = 1.7
    for _ in range(int(TTL_S / 0.05)):  # denied for one TTL: still running, still asking
        t += 0.05
        out = b.handle(Tick(t))
        if AcquireLease in types(out):
            b.handle(LeaseDenied("site-a", 3))
        assert b.state in ha.ACTIVE
    out = b.handle(LeaseGranted(4, t + TTL_S, t))
    assert b.holding and not b.forced and b.generation == 4 and OpenGate(4) in out


def test_a_forced_site_gives_way_when_the_lease_is_still_renewed_after_two_ttls():
    b = forced_site()
    t, fenced = 1.7, None
    b.handle(LeaseDenied("site-a", 3))
    while t < 1.7 + 3 * TTL_S and fenced is None:
        t += 0.05
        out = b.handle(Tick(t))
        if CloseGate in types(out):
            fenced = t
        elif AcquireLease in types(out):
            b.handle(LeaseDenied("site-a", 3))
    assert fenced is not None and fenced - 1.7 > 2 * TTL_S, "the holder kept renewing: it is alive"
    assert b.state == FENCED and b.stale


def test_a_forced_site_fences_at_once_when_the_peer_answers():
    b = forced_site()
    b.handle(HeartbeatReceived(1.8, 20.0, 1))
    out = b.handle(LeaseDenied("site-a", 3))
    assert types(out)[:2] == [CloseGate, Withdraw] and StopGuest in types(out) and b.state == FENCED


def test_promote_with_unknown_witness_tries_the_lease_first_then_forces():
    b = standby_with_replica()
    out = b.handle(OperatorPromote(0.2, force=True))
    assert AcquireLease in types(out) and ResumeGuest not in types(out)
    out = b.handle(WitnessUnreachable(0.3))
    assert ResumeGuest in types(out) and b.forced


def test_promote_while_the_peer_holds_the_lease_waits_and_says_why():
    b = standby_with_replica()
    out = b.handle(OperatorPromote(0.2))
    assert b.state == TAKING_OVER and AcquireLease in types(out)
    out = b.handle(LeaseDenied("site-a", 1))
    assert "site-a holds the lease" in alarms(out) and b.state == TAKING_OVER
    b.handle(HeartbeatReceived(0.3, 20.0, 1))
    assert b.state == TAKING_OVER, "an operator promote is not cancelled by heartbeats"


def test_operator_fence_releases_the_lease_and_keeps_the_guest():
    m = active_primary()
    out = m.handle(OperatorFence(0.5))
    assert types(out)[:3] == [CloseGate, Withdraw, ReleaseLease] and StopGuest not in types(out)
    assert m.state == FENCED
    assert AcquireLease not in types(m.handle(Tick(2.0))), "an operator fence is not undone automatically"
    out = m.handle(OperatorPromote(2.1))
    assert AcquireLease in types(out)
    out = m.handle(LeaseGranted(2, 2.1 + TTL_S, 2.1))
    assert OpenGate(2) in out and m.state == ACTIVE_UNPROTECTED, "nobody held it in between: reopen"


def test_self_fenced_primary_reopens_only_if_no_other_site_held_the_lease():
    for granted, reopens in ((2, True), (3, False)):
        m = active_primary()
        m.handle(WitnessUnreachable(0.1))
        m.handle(Tick(TTL_S))
        assert m.state == FENCED
        out = m.handle(WitnessReachable(1.5))
        assert AcquireLease in types(out)
        out = m.handle(LeaseGranted(granted, 1.5 + TTL_S, 1.5))
        if reopens:
            assert OpenGate(granted) in out and m.holding
        else:
            assert ReleaseLease(granted) in out and StopGuest() in out and m.state == FENCED and m.stale
            out = m.handle(OperatorPromote(2.0))
            assert "stale" in alarms(out) and AcquireLease not in types(out)


def test_lease_lost_to_another_site_fences_and_stops_the_guest():
    m = active_primary()
    out = m.handle(LeaseLost("site-b", 2))
    assert types(out)[:3] == [CloseGate, Withdraw, StopGuest] and m.state == FENCED


def test_a_newer_generation_in_the_peer_heartbeat_fences_the_old_primary():
    m = active_primary()
    out = m.handle(HeartbeatReceived(0.3, 20.0, peer_generation=2))
    assert CloseGate in types(out) and StopGuest in types(out) and m.state == FENCED


def test_primary_loses_its_standby_and_runs_unprotected():
    m = active_primary()
    assert RenewLease(1) in m.handle(Tick(0.2))
    m.handle(LeaseRenewed(1, 0.2 + TTL_S, 0.2))
    out = m.handle(Tick(0.35))  # last heartbeat at 0.0; the timeout is clamped to 300 ms
    assert m.state == ACTIVE_UNPROTECTED and SetProtection(False) in out and m.gate_open


def test_restarted_primary_does_not_start_if_another_site_held_the_lease():
    m = HaMachine("primary", cfg(), generation=4)
    m.handle(Tick(0.0))
    out = m.handle(LeaseGranted(6, TTL_S, 0.0))
    assert StopGuest in types(out) and ReleaseLease(6) in out and m.state == FENCED
    m = HaMachine("primary", cfg(), generation=4)
    m.handle(Tick(0.0))
    out = m.handle(LeaseDenied("site-b", 5))
    assert StopGuest in types(out) and m.state == FENCED


def test_resume_failure_fences_and_releases():
    b = standby_with_replica()
    b.handle(Tick(1.5))
    b.handle(LeaseGranted(2, 1.5 + TTL_S, 1.5))
    out = b.handle(ResumeFailed("qemu exited with status 1"))
    assert ReleaseLease(2) in out and b.state == FENCED and "qemu exited" in alarms(out)


def test_a_grant_that_arrives_too_late_is_not_used():
    b = standby_with_replica()
    b.handle(Tick(1.5))
    out = b.handle(LeaseGranted(2, 1.5 + TTL_S, 1.5 + TTL_S - 0.05))
    assert ResumeGuest not in types(out) and not b.holding


# ---------------------------------------------------------------- the standby's pre-announcement
def pre_announcing_standby(now=0.0):
    b = HaMachine("standby", cfg("site-b", pre_announce=True))
    b.handle(Tick(now))
    b.handle(HeartbeatReceived(now, 20.0, 1))
    out = b.handle(ReplicaCommitted(7))
    assert types(out).count(PreAnnounce) == 1, "announced as the backup path once it holds a replica"
    return b


def test_standby_pre_announces_only_when_configured_and_with_a_replica():
    b = HaMachine("standby", cfg("site-b"))
    outs = [b.handle(Tick(0.0)), b.handle(HeartbeatReceived(0.0, 20.0, 1)), b.handle(ReplicaCommitted(7))]
    assert all(PreAnnounce not in types(o) for o in outs), "off unless bgp.standby_prepend is set"
    b = HaMachine("standby", cfg("site-b", pre_announce=True))
    assert PreAnnounce not in types(b.handle(Tick(0.0))) + types(b.handle(HeartbeatReceived(0.0, 20.0, 1)))
    assert PreAnnounce in types(b.handle(ReplicaCommitted(7)))
    assert PreAnnounce not in types(b.handle(ReplicaCommitted(8))), "once, not per epoch"


def test_pre_announcement_stays_through_a_takeover_until_the_active_announcement():
    b = pre_announcing_standby()
    seen = []
    for ev in (Tick(1.5), LeaseGranted(2, 1.5 + TTL_S, 1.5), ResumeDone(1.7)):
        seen += b.handle(ev)
    assert Withdraw not in types(seen), "no gap: the active announcement replaces the backup one"
    assert Announce(2) in seen and b.state == ACTIVE_UNPROTECTED
    assert PreAnnounce not in types(b.handle(Tick(1.8)))


def test_pre_announcement_is_withdrawn_when_the_peer_is_lost_and_no_takeover_follows():
    b = pre_announcing_standby()
    b.handle(WitnessUnreachable(0.1))
    out = b.handle(Tick(1.5))
    assert b.state == STANDBY and Withdraw in types(out), "traffic drawn here could reach nobody"
    out = b.handle(HeartbeatReceived(1.6, 20.0, 1))
    assert PreAnnounce in types(out), "the peer answers again: the backup path is back"


def test_operator_fence_withdraws_the_pre_announcement():
    b = pre_announcing_standby()
    out = b.handle(OperatorFence(0.5))
    assert Withdraw in types(out) and PreAnnounce not in types(out)


def test_a_draining_old_primary_pre_announces_only_after_the_drain():
    m = HaMachine("primary", cfg(pre_announce=True))
    m.handle(Tick(0.0))
    m.handle(BgpNeighborUp("198.18.1.1"))
    m.handle(LeaseGranted(1, TTL_S, 0.0))
    m.handle(HeartbeatReceived(0.0, 20.0))
    m.handle(StandbyReady(1))
    out = m.handle(HandoverPrepared(0.1, 9))
    assert Drain in types(out) and PreAnnounce not in types(out) and m.state == HANDING_OVER
    out = m.handle(BecameStandby(0.2, "handed over"))
    out += m.handle(ReplicaCommitted(10))
    assert PreAnnounce not in types(out), "the drained route stays until the peer's is seen"
    out = m.handle(PeerRouteSeen(True))
    assert types(out).index(Withdraw) < types(out).index(PreAnnounce), types(out)


# ---------------------------------------------------------------- two sites, one witness, random world
GUEST = "guest"


class Site:
    def __init__(self, name, role, rate, offset, generation=0):
        self.name, self.rate, self.offset = name, rate, offset
        self.m = HaMachine(role, cfg(name, pre_announce=True), generation)
        self.alive = True
        self.bgp: str | None = None  # what the speaker announces: active, backup, drained or None
        self.gate: int | None | bool = False  # False = closed, else the generation it opened under
        self.requests: deque = deque()
        self.responses: deque = deque()
        self.resume_pending = False

    def now(self, t):
        return self.offset + self.rate * t


class TwoSites(RuleBasedStateMachine):
    """Site A primary, site B standby, the real LeaseTable as witness; links fail, clocks drift."""

    @initialize(rate_a=st.floats(0.99, 1.01), rate_b=st.floats(0.99, 1.01),
                off_a=st.floats(0, 1000), off_b=st.floats(0, 1000))
    def setup(self, rate_a, rate_b, off_a, off_b):
        self.t = 0.0
        self.table = LeaseTable()
        self.witness_up = True
        self.wan_up = True
        self.cut = {"site-a": False, "site-b": False}
        self.sites = {"site-a": Site("site-a", "primary", rate_a, off_a),
                      "site-b": Site("site-b", "standby", rate_b, off_b)}
        self.opened: dict[int, str] = {}
        self.feed(self.sites["site-b"], ReplicaCommitted(1))
        for s in self.sites.values():
            self.feed(s, BgpNeighborUp("upstream"))

    # ------------------------------------------------------------ plumbing
    @staticmethod
    def note(msg):
        try:
            note_event(msg)  # shown by --hypothesis-show-statistics
        except InvalidArgument:
            pass  # a directed scenario, outside hypothesis

    def feed(self, s, event):
        if not s.alive:
            return
        for a in s.m.handle(event):
            now = s.now(self.t)
            if isinstance(a, AcquireLease):
                s.requests.append(("acquire", None, now))
            elif isinstance(a, RenewLease):
                s.requests.append(("renew", a.generation, now))
            elif isinstance(a, ReleaseLease):
                s.requests.append(("release", a.generation, now))
            elif isinstance(a, OpenGate):
                assert a.generation is not None, "opened without a lease"
                first = self.opened.setdefault(a.generation, s.name)
                assert first == s.name, f"generation {a.generation} opened by {first} and {s.name}"
                s.gate = a.generation
                if any(site != s.name for site in self.opened.values()):
                    self.note("output moved between sites")
            elif isinstance(a, Alarm) and "fenced itself" in a.message:
                self.note(f"{s.name} fenced itself")
            elif isinstance(a, CloseGate):
                s.gate = False
            elif isinstance(a, (Announce, PreAnnounce, Drain, Withdraw)):
                s.bgp = {Announce: "active", PreAnnounce: "backup", Drain: "drained", Withdraw: None}[type(a)]
            elif isinstance(a, ResumeGuest):
                s.resume_pending = True

    # ------------------------------------------------------------ the world
    @rule(ticks=st.integers(1, 40), ms=st.integers(5, 50), heartbeats=st.booleans(), lease_io=st.booleans())
    def advance(self, ticks, ms, heartbeats, lease_io):
        """Time passes in steps of at most one heartbeat interval; optionally heartbeats and lease
        requests flow promptly while it does."""
        for _ in range(ticks):
            self.t += ms / 1000
            for s in list(self.sites.values()):
                self.feed(s, Tick(s.now(self.t)))
                if lease_io:
                    self.witness_serves(s.name)
                    self.responses_arrive(s.name)
                    self.resume_finishes(s.name, True)
            a, b = self.sites.values()
            if heartbeats and self.wan_up and a.alive and b.alive:
                self.feed(a, HeartbeatReceived(a.now(self.t), 20.0, b.m.generation))
                self.feed(b, HeartbeatReceived(b.now(self.t), 20.0, a.m.generation))
                if a.m.state in (ACTIVE_PROTECTED, ACTIVE_UNPROTECTED) and b.m.state == STANDBY:
                    self.feed(a, StandbyReady(1))
                if b.m.state in (ACTIVE_PROTECTED, ACTIVE_UNPROTECTED) and a.m.state == STANDBY:
                    self.feed(b, StandbyReady(1))
            self.check()

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def witness_serves(self, name):
        s = self.sites[name]
        while s.requests:
            op, gen, sent = s.requests.popleft()
            if not self.witness_up or self.cut[name]:
                s.responses.append(("unreachable", None, sent))
                continue
            if op == "acquire":
                s.responses.append((op, self.table.acquire(GUEST, name, int(TTL_S * 1000), self.t), sent))
            elif op == "renew":
                s.responses.append((op, self.table.renew(GUEST, name, gen, int(TTL_S * 1000), self.t), sent))
            else:
                self.table.release(GUEST, name, gen, self.t)

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def responses_arrive(self, name):
        s = self.sites[name]
        while s.responses:
            op, ans, sent = s.responses.popleft()
            now = s.now(self.t)
            if op == "unreachable":
                ev = WitnessUnreachable(now)
            elif op == "acquire":
                ev = (LeaseGranted(ans["generation"], sent + ans["expires_in_ms"] / 1000, now) if ans["granted"]
                      else LeaseDenied(ans["holder"], ans["generation"]))
            else:
                ev = (LeaseRenewed(ans["generation"], sent + ans["expires_in_ms"] / 1000, now) if ans["renewed"]
                      else LeaseLost(ans["holder"], ans["generation"]))
            self.feed(s, ev)

    @rule(name=st.sampled_from(["site-a", "site-b"]), ok=st.booleans())
    def resume_finishes(self, name, ok):
        s = self.sites[name]
        if s.resume_pending:
            s.resume_pending = False
            self.feed(s, ResumeDone(s.now(self.t)) if ok else ResumeFailed("test"))

    @rule(up=st.booleans(), restart=st.booleans())
    def witness_power(self, up, restart):
        if up and not self.witness_up and restart:
            self.table = LeaseTable.restore(self.table.dump(), self.t)
        self.witness_up = up
        for s in self.sites.values():
            self.feed(s, (WitnessReachable if up else WitnessUnreachable)(s.now(self.t)))

    @rule(name=st.sampled_from(["site-a", "site-b"]), cut=st.booleans())
    def witness_link(self, name, cut):
        self.cut[name] = cut

    @rule(up=st.booleans())
    def wan(self, up):
        self.wan_up = up

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def isolate(self, name):
        """The site loses the WAN and the witness; it keeps running."""
        self.wan_up, self.cut[name] = False, True

    @rule(name=st.sampled_from(["site-a", "site-b"]), seen=st.booleans())
    def peer_route(self, name, seen):
        self.feed(self.sites[name], PeerRouteSeen(seen))

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def promote(self, name):
        s = self.sites[name]
        self.feed(s, OperatorPromote(s.now(self.t)))

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def fence(self, name):
        s = self.sites[name]
        self.feed(s, OperatorFence(s.now(self.t)))

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def hand_over(self, name):
        """A planned switchover (or an upstream-loss handover): the last epoch is committed, the
        machine is told, and the peer is told over the WAN (SWITCHOVER: it promotes) — whether
        or not the lease backend answered the release, as when the authority is unreachable."""
        s, peer = self.sites[name], self.sites["site-b" if name == "site-a" else "site-a"]
        if s.m.state is not ACTIVE_PROTECTED:
            return
        self.feed(s, HandoverPrepared(s.now(self.t), 1))
        if s.m.state is HANDING_OVER and self.wan_up and peer.alive:
            self.note("handed over")
            self.feed(peer, OperatorPromote(peer.now(self.t)))

    @rule(name=st.sampled_from(["site-a", "site-b"]), abort=st.booleans())
    def handover_ends(self, name, abort):
        """The switchover job: the peer is seen at a newer generation (heartbeats or the lease
        backend) → demote; or it gives up → HandoverAborted (the machine asks for the lease back)."""
        s = self.sites[name]
        if s.m.state is not HANDING_OVER:
            return
        if s.m.seen_generation > s.m.generation:
            self.note("demoted after a handover")
            self.feed(s, BecameStandby(s.now(self.t), "switchover"))
            self.feed(s, ReplicaCommitted(1))
        elif abort:
            self.feed(s, HandoverAborted(s.now(self.t), "test"))

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def crash(self, name):
        s = self.sites[name]
        s.alive, s.gate, s.resume_pending = False, False, False  # a dead site releases nothing
        s.responses.clear()  # its in-flight requests may still reach the witness

    @rule(name=st.sampled_from(["site-a", "site-b"]))
    def restart(self, name):
        old = self.sites[name]
        if old.alive:
            return
        st_ = old.m.state
        role = "primary" if st_ in (ACTIVE_PROTECTED, ACTIVE_UNPROTECTED, STARTING, HANDING_OVER) else "fenced" if st_ == FENCED else "standby"
        new = Site(name, role, old.rate, old.offset, generation=old.m.generation)
        new.requests = old.requests
        self.sites[name] = new
        if role == "standby":
            self.feed(new, ReplicaCommitted(1))
        self.feed(new, BgpNeighborUp("upstream"))

    # ------------------------------------------------------------ what must always hold
    def check(self):
        for s in self.sites.values():
            if s.alive and s.gate is not False:  # output leaves only where the prefix is announced as active
                assert s.bgp == "active", f"{s.name} releases output but announces {s.bgp} ({s.m.state})"
            if s.alive and s.bgp == "backup":  # the backup path only from a standby that can forward or take over
                assert s.m.state in (STANDBY, TAKING_OVER) and s.gate is False, (s.name, s.m.state)
                assert s.m.state is TAKING_OVER or s.m.peer_alive, f"{s.name} pre-announces with its peer lost"
        open_ = [s for s in self.sites.values() if s.alive and s.gate is not False]
        assert len(open_) <= 1, f"two sites release output at t={self.t:.3f}: " + \
            ", ".join(f"{s.name} gen {s.gate} ({s.m.state})" for s in open_)
        for s in open_:
            lease = self.table.leases.get(GUEST)
            assert lease is not None and lease.valid(self.t) and lease.holder == s.name \
                and lease.generation == s.gate, \
                f"{s.name} releases output under generation {s.gate} but the witness says {lease}"

    @invariant()
    def one_site_at_most_and_only_with_a_valid_lease(self):
        if hasattr(self, "sites"):
            self.check()


TwoSites.TestCase.settings = settings(max_examples=400, stateful_step_count=40, deadline=None,
                                      suppress_health_check=[HealthCheck.too_slow])
test_two_sites_never_both_release_output = TwoSites.TestCase


def _world():
    w = TwoSites()
    w.setup(rate_a=1.01, rate_b=0.99, off_a=100.0, off_b=7.0)
    return w


def test_wan_partition_with_the_witness_reachable_keeps_one_active_site():
    w = _world()
    w.advance(20, 30, heartbeats=True, lease_io=True)
    assert w.sites["site-a"].gate == 1 and w.sites["site-a"].m.state == ACTIVE_PROTECTED
    w.wan(False)
    for _ in range(5):
        w.advance(40, 30, heartbeats=False, lease_io=True)  # ~6 s, each step checks the invariants
    a, b = w.sites["site-a"], w.sites["site-b"]
    assert a.gate == 1 and a.m.state == ACTIVE_UNPROTECTED, "the lease holder keeps running"
    assert b.gate is False and b.m.state == TAKING_OVER and b.m.seen_generation == 1


def test_isolated_primary_fences_and_the_standby_takes_over_once():
    w = _world()
    w.advance(20, 30, heartbeats=True, lease_io=True)
    w.isolate("site-a")
    w.advance(40, 30, heartbeats=False, lease_io=True)
    w.advance(40, 30, heartbeats=False, lease_io=True)
    a, b = w.sites["site-a"], w.sites["site-b"]
    assert a.gate is False and a.m.state == FENCED
    assert b.gate == 2 and b.m.state == ACTIVE_UNPROTECTED and w.opened == {1: "site-a", 2: "site-b"}
    # the partition heals: the old primary learns generation 2 from heartbeats and stops its stale guest
    w.wan(True)
    w.witness_link("site-a", False)
    w.advance(10, 30, heartbeats=True, lease_io=True)
    assert a.m.stale and a.m.state == FENCED and b.gate == 2


@pytest.mark.parametrize("abort_early", [False, True])
def test_a_handover_with_the_witness_cut_from_the_old_site_keeps_one_active_site(abort_early):
    """The upstream-loss case: site A's way to the witness goes with its upstream, it hands over
    anyway (no release gets through); B is granted generation 2 only once A's lease has expired at
    the witness, and A learns it from B's heartbeats. An impatient A that aborts first stays fenced
    (it cannot reach the witness) and then rejoins. The invariants are checked after every step."""
    w = _world()
    w.advance(20, 30, heartbeats=True, lease_io=True)
    a, b = w.sites["site-a"], w.sites["site-b"]
    assert a.m.state == ACTIVE_PROTECTED and a.gate == 1
    w.witness_link("site-a", True)
    w.hand_over("site-a")
    assert a.m.state == HANDING_OVER and a.gate is False and b.m.state == TAKING_OVER
    if abort_early:
        w.handover_ends("site-a", abort=True)
        assert a.m.state == FENCED
    for _ in range(4):  # ~1.6 s: A's lease (1 s TTL) expires at the witness, B takes generation 2
        w.advance(20, 20, heartbeats=True, lease_io=True)
        w.handover_ends("site-a", abort=False)
    assert b.gate == 2 and b.m.state in (ACTIVE_PROTECTED, ACTIVE_UNPROTECTED) and w.opened == {1: "site-a", 2: "site-b"}
    assert a.gate is False and (a.m.state == STANDBY if not abort_early else a.m.stale)


def test_without_a_witness_the_primary_runs_and_the_standby_never_takes_over_alone():
    a = HaMachine("primary", cfg(witness=False))
    out = a.handle(Tick(0.0))
    assert OpenGate(None) in out and a.state == ACTIVE_UNPROTECTED and AcquireLease not in types(out)
    b = HaMachine("standby", cfg("site-b", witness=False))
    b.handle(Tick(0.0))
    b.handle(ReplicaCommitted(3))
    out = b.handle(Tick(2.0))
    assert b.state == STANDBY and "no witness is configured" in alarms(out) and AcquireLease not in types(out)
    out = b.handle(OperatorPromote(2.1))
    assert ResumeGuest not in types(out) and "--force" in alarms(out)
    out = b.handle(OperatorPromote(2.2, force=True))
    assert ResumeGuest in types(out)


def _protected_primary(**kw):
    m = HaMachine("primary", cfg(**kw))
    m.handle(Tick(0.0))
    m.handle(LeaseGranted(1, 1.0, 0.0))
    m.handle(HeartbeatReceived(0.01, 20.0, 0))
    m.handle(StandbyReady(5))
    assert m.state == ACTIVE_PROTECTED and m.gate_open and m.protected
    return m


def _run(m, t0, t1, step=0.05, heartbeats=True):
    out, t = [], t0
    while t < t1:
        t += step
        if heartbeats:
            out += m.handle(HeartbeatReceived(t, 20.0, 0))
        out += m.handle(Tick(t))
    return out, t


def test_witness_down_while_protected_rides_through_then_regains_the_lease():
    m = _protected_primary(ride_through_witness_outage=True)
    m.handle(WitnessUnreachable(0.1))
    out, t = _run(m, 0.1, 3.0)
    assert m.state == ACTIVE_PROTECTED and m.gate_open and m.lapsed, "a protected primary keeps running"
    assert not any(isinstance(a, CloseGate) for a in out)
    assert any(isinstance(a, Alarm) and "lease lapsed" in a.message for a in out)
    out = m.handle(WitnessReachable(t)) + m.handle(Tick(t + 0.3))
    assert any(isinstance(a, AcquireLease) for a in out)
    m.handle(LeaseGranted(2, t + 1.3, t + 0.3))
    assert m.holding and not m.lapsed and m.lease_generation == 2 and m.gate_open


def test_lapsed_primary_fences_when_the_standby_is_lost():
    m = _protected_primary(ride_through_witness_outage=True)
    m.handle(WitnessUnreachable(0.1))
    _, t = _run(m, 0.1, 2.0)
    assert m.lapsed
    out, t = _run(m, t, t + 2.0, heartbeats=False)
    assert m.state == FENCED and not m.gate_open
    assert any(isinstance(a, CloseGate) for a in out) and any(isinstance(a, Withdraw) for a in out)


def test_lapsed_primary_fences_if_another_site_got_the_lease():
    m = _protected_primary(ride_through_witness_outage=True)
    m.handle(WitnessUnreachable(0.1))
    _, t = _run(m, 0.1, 2.0)
    m.handle(LeaseGranted(3, t + 1.0, t))  # generation 2 went to someone else meanwhile
    assert m.state == FENCED and not m.gate_open


def test_strict_mode_fences_at_the_deadline_even_when_protected():
    m = _protected_primary(ride_through_witness_outage=False)
    m.handle(WitnessUnreachable(0.1))
    _run(m, 0.1, 3.0)
    assert m.state == FENCED


# ---------------------------------------------------------------- automatic rejoin

def test_auto_rejoin_replaces_the_stale_stop_with_a_rejoin():
    m = HaMachine("primary", cfg(auto_rejoin=True), generation=4)
    m.handle(Tick(0.0))
    out = m.handle(LeaseDenied("site-b", 5))
    assert types(out)[:2] == [CloseGate, Withdraw] and StopGuest not in types(out)
    assert [a for a in out if isinstance(a, Rejoin)] == [Rejoin("site-b holds the lease at generation 5")]
    assert m.state == FENCED and m.stale and not m.guest_running
    assert Rejoin not in types(m.handle(HeartbeatReceived(0.1, 20.0, peer_generation=5))), "asked once"
    out = m.handle(BecameStandby(0.2, "rejoined"))
    assert m.state == STANDBY and not m.stale and not m.rejoining and m.generation == 4
    assert m.seen_generation == 5, "a later takeover must still beat the peer's generation"


def test_a_fenced_site_without_its_guest_asks_who_holds_the_lease_and_rejoins():
    """E.g. a restarted daemon found its guest gone: it is fenced with nothing to run; once the
    peer runs the guest at a newer generation, it becomes the peer's standby."""
    m = HaMachine("fenced", cfg(auto_rejoin=True), generation=4, fenced_by_operator=False)
    out = m.handle(Tick(0.0))
    assert QueryLease() in out
    assert QueryLease() not in m.handle(Tick(0.1)), "at most once per renew interval"
    assert QueryLease() in m.handle(Tick(0.25))
    assert m.handle(LeaseSeen("site-a", 4)) == [] and m.handle(LeaseSeen(None, 4)) == []
    assert m.handle(LeaseSeen("site-b", 4)) == [], "not newer than ours: the peer has not taken over yet"
    out = m.handle(LeaseSeen("site-b", 5))
    assert types(out) == [Rejoin] and m.rejoining and QueryLease() not in m.handle(Tick(1.0))


def test_an_operator_fence_or_the_manual_switch_never_rejoins():
    m = HaMachine("fenced", cfg(auto_rejoin=True), generation=4)  # fenced by the operator (role.json)
    assert QueryLease() not in m.handle(Tick(0.0)) and m.handle(LeaseSeen("site-b", 9)) == []
    m = HaMachine("fenced", cfg(auto_rejoin=False), generation=4, fenced_by_operator=False)
    assert QueryLease() not in m.handle(Tick(0.0)) and m.handle(LeaseSeen("site-b", 9)) == []


def test_a_fenced_site_with_its_guest_learns_it_is_stale_and_stops_or_rejoins():
    """An operator-fenced primary restarted with its guest: if the peer took over meanwhile (the
    fence released the lease), nobody tells it by heartbeat; it asks the lease backend."""
    for auto, action in ((True, Rejoin), (False, StopGuest)):
        m = HaMachine("fenced", cfg(auto_rejoin=auto), generation=1, guest_here=True)  # the fenced guest
        out = m.handle(Tick(0.0))
        assert QueryLease() in out and AcquireLease not in types(out), "fenced by the operator: no lease"
        assert m.handle(LeaseSeen("site-a", 1)) == [] and m.handle(LeaseSeen("site-b", 1)) == []
        out = m.handle(LeaseSeen("site-b", 2))
        assert action in types(out) and m.state == FENCED and m.stale and not m.guest_running, auto
        assert QueryLease() not in m.handle(Tick(1.0))
