"""Output commit in one place: `decide` and the controller, checked against the safety rule
on random histories with the real gate (its TAP is a pipe here).

The rule: a frame leaves only while this site may release (the lease), and only for an
epoch the standby committed, unless nothing protects the guest by design at that moment
(no session committing and output commit not promised, or the continue-unprotected
policy after its grace, or the unsafe switch)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from geomirror.ha import HaState
from geomirror.site import gate_policy
from geomirror.site.gate_policy import GateController, GateInputs, UnreachablePolicy, decide
from replication.gate import GateMode, UserspaceGate

RUNS = [HaState.STARTING, HaState.ACTIVE_PROTECTED, HaState.ACTIVE_UNPROTECTED, HaState.TAKING_OVER]


def test_no_guest_or_no_authority_means_fenced():
    for state in HaState:
        d = decide(GateInputs(ha_state=state, may_release=True, guest_here=state in RUNS, promised=True))
        if state in RUNS:
            assert d.mode is GateMode.HOLD and d.allowed
        else:
            assert d.mode is GateMode.FENCED and not d.allowed, state
    d = decide(GateInputs(ha_state=HaState.ACTIVE_PROTECTED, may_release=True, guest_here=False))
    assert d.mode is GateMode.FENCED and not d.allowed


def test_policy_grace_and_sessions():
    base = dict(ha_state=HaState.ACTIVE_UNPROTECTED, may_release=True, guest_here=True, promised=True,
                policy=UnreachablePolicy.CONTINUE_UNPROTECTED, grace_ms=5000)
    assert decide(GateInputs(**base, unprotected_ms=4999)).mode is GateMode.HOLD
    assert decide(GateInputs(**base, unprotected_ms=5000)).mode is GateMode.OPEN
    assert decide(GateInputs(**base, unprotected_ms=9e9, session_committing=True)).mode is GateMode.HOLD, \
        "a committing session holds output whatever the policy"
    stall = {**base, "policy": UnreachablePolicy.STALL}
    assert decide(GateInputs(**stall, unprotected_ms=9e9)).mode is GateMode.HOLD
    taken_over = {**base, "promised": False}
    assert decide(GateInputs(**taken_over)).mode is GateMode.OPEN, "the only copy after a takeover speaks"
    assert decide(GateInputs(**taken_over, unsafe=True)).mode is GateMode.OPEN
    assert not decide(GateInputs(**{**base, "may_release": False})).allowed


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class GateHistory(RuleBasedStateMachine):
    """Random histories of guest frames, seals, acks, sessions, leases and protection."""

    def __init__(self):
        super().__init__()
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self.r, self.w = r, w
        self.gate = UserspaceGate("/nonexistent/gate.sock", w, mode=GateMode.FENCED, pass_through=((6000, 6000),))
        self.clock = FakeClock()
        self.ctl = GateController(self.gate, GateInputs(policy=UnreachablePolicy.CONTINUE_UNPROTECTED,
                                                        grace_ms=1000), clock=self.clock)
        self.sealed = 0
        self.committed = 0
        self.next_id = 0
        self.epoch_of: dict[int, int] = {}
        self.media: set[int] = set()  # frames of the pass-through flow (UDP from port 6000)
        self.released = 0

    def teardown(self):
        os.close(self.r)
        os.close(self.w)

    # ---- the world
    @rule(state=st.sampled_from(list(HaState)))
    def ha_state(self, state):
        self.ctl.update(ha_state=state)

    @rule(may=st.booleans())
    def lease(self, may):
        self.ctl.update(may_release=may)

    @rule(here=st.booleans(), promised=st.booleans())
    def guest(self, here, promised):  # boot (promised) / resume after takeover (not) / stop
        self.ctl.update(guest_here=here, promised=promised, session_committing=False)

    @rule()
    def frame(self):
        fid = self.next_id
        self.next_id += 1
        self.epoch_of[fid] = self.gate.current_epoch
        self.gate._outbound(struct.pack(">Q", fid) + b"x" * 56)

    @rule()
    def media_frame(self):
        """A 64-byte IPv4 UDP frame from port 6000; the frame id in its first 8 bytes (the MACs)."""
        fid = self.next_id
        self.next_id += 1
        self.epoch_of[fid] = self.gate.current_epoch
        self.media.add(fid)
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 50, 0, 0, 64, 17, 0, b"\xc6\x33\x64\x0a", b"\xc6\x12\x0a\x02")
        self.gate._outbound(struct.pack(">Q", fid) + b"\0" * 4 + b"\x08\x00" + ip
                            + struct.pack(">HHHH", 6000, 40000, 30, 0) + b"m" * 22)

    @precondition(lambda self: self.ctl.inputs.session_committing)
    @rule()
    def seal(self):
        self.sealed = max(self.sealed, self.gate.current_epoch) + 1
        self.gate.seal(self.sealed)

    @precondition(lambda self: self.ctl.inputs.session_committing and self.sealed > self.committed)
    @rule(data=st.data())
    def ack(self, data):
        self.committed = data.draw(st.integers(self.committed + 1, self.sealed))
        self.gate.release(self.committed)

    @precondition(lambda self: self.ctl.inputs.guest_here and not self.ctl.inputs.session_committing)
    @rule()
    def session_commits(self):
        self.ctl.update(session_committing=True)

    @precondition(lambda self: self.ctl.inputs.session_committing)
    @rule(acked=st.booleans())
    def session_ends(self, acked):
        self.ctl.update(session_committing=False, promised=self.ctl.inputs.promised or acked)

    @rule(protected=st.booleans())
    def protection(self, protected):
        self.ctl.protection(protected)

    @rule(ms=st.sampled_from([10, 500, 2000]))
    def time_passes(self, ms):
        self.clock.t += ms / 1000
        self.ctl.reapply()

    # ---- the rule
    def unprotected_by_design(self) -> bool:
        i = self.ctl.inputs
        grace_over = (i.policy is UnreachablePolicy.CONTINUE_UNPROTECTED and i.unprotected_ms is not None
                      and i.unprotected_ms >= i.grace_ms)
        return i.unsafe or (not i.session_committing and (not i.promised or grace_over))

    @invariant()
    def check_released(self):
        """After every step: what reached the TAP in that step obeys the rule as it stands now."""
        try:
            data = os.read(self.r, 1 << 20)
        except BlockingIOError:
            return
        for off in range(0, len(data), 64):
            (fid,) = struct.unpack(">Q", data[off:off + 8])
            self.released += 1
            i = self.ctl.inputs
            assert i.may_release and i.guest_here and i.ha_state in RUNS, \
                f"frame {fid} left without the lease or without a guest here ({i})"
            early_media = fid in self.media and i.session_committing  # pass-through: with the lease only
            assert self.epoch_of[fid] <= self.committed or self.unprotected_by_design() or early_media, \
                f"frame {fid} of epoch {self.epoch_of[fid]} left, the standby committed {self.committed} ({i})"

    @invariant()
    def gate_follows_the_decision(self):
        d = self.ctl.decision
        assert d == gate_policy.decide(self.ctl.inputs)
        assert self.gate.mode is d.mode and self.gate.allowed == d.allowed
        if d.mode is GateMode.FENCED:
            assert self.gate.held_epochs() == 0


GateHistory.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
test_gate_safety_on_random_histories = GateHistory.TestCase


def test_the_history_test_has_teeth(monkeypatch):
    """A policy that opens the gate while a session commits must be caught (a scripted history:
    a booted guest with the lease, a session that sealed epoch 1, a frame of epoch 2)."""
    real = gate_policy.decide

    def leaky(i):
        d = real(i)
        return gate_policy.GateDecision(GateMode.OPEN, d.allowed, "leaky") if d.mode is GateMode.HOLD else d

    def history():
        h = GateHistory()
        try:
            h.ha_state(HaState.ACTIVE_PROTECTED)
            h.guest(True, True)
            h.lease(True)
            h.session_commits()
            h.seal()
            h.frame()
            h.check_released()
        finally:
            h.teardown()

    history()  # the real policy holds the frame
    monkeypatch.setattr(gate_policy, "decide", leaky)
    with pytest.raises(AssertionError, match="frame 0 of epoch 2 left, the standby committed 0"):
        history()


def test_the_lease_deadline_reaches_the_gate_and_follows_renewals():
    from tests.site_fakes import FakeGate

    g = FakeGate()
    ctl = GateController(g, GateInputs(ha_state=HaState.ACTIVE_PROTECTED, guest_here=True, promised=True))
    ctl.update(may_release=True, until=100.0)
    assert g.allowed and g.until == 100.0
    ctl.update(until=101.5)  # a renewal: same decision, a later deadline
    assert g.until == 101.5
    ctl.update(may_release=False)
    assert not g.allowed and g.until is None
