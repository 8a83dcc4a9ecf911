"""Output commit in one place: the gate's mode and release permission as one pure function.

Inputs come from three owners: the HA machine (may this site release output: the lease
is held, or a forced promotion; is a guest running here), the replication side (is a
session committing this guest's output; was output commit promised for this guest
run), and the operator's policy (what to do when the standby is lost). `decide` turns
them into the gate's `GateMode` and permission; `GateController` is the only code that
changes the gate, by applying `decide` whenever an input changes.

The safety rule (tests/test_gate_policy.py checks it on random histories against the
real gate): a frame leaves only while this site holds the current lease, and only for an
epoch the standby committed, unless nothing is protecting the guest by design (the only
copy after a takeover, before a session commits; continue-unprotected after its grace;
the unsafe test switch). The one exception an operator may configure: frames of the
pass-through flows ([checkpoint] pass_through, UDP media) leave at once while a session
commits and this site may release; never while fenced or without the lease, and not while
output waits for a lost standby (the stall policy's promise: nothing unprotected leaves).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, replace

import structlog

from geomirror.ha import HaState
from replication.gate import Gate, GateMode

log = structlog.get_logger(__name__)


class UnreachablePolicy(str, enum.Enum):
    STALL = "stall"  # output waits for a standby to come back (nothing unprotected ever leaves)
    CONTINUE_UNPROTECTED = "continue-unprotected"  # after a grace, output flows without a replica


# HA states in which a guest may run here and its output may (once permitted) leave.
_RUNS_GUEST = (HaState.STARTING, HaState.ACTIVE_PROTECTED, HaState.ACTIVE_UNPROTECTED, HaState.TAKING_OVER)


@dataclass(frozen=True)
class GateInputs:
    ha_state: HaState = HaState.STANDBY
    may_release: bool = False  # the HA machine: lease held (or forced) and the guest runs here
    guest_here: bool = False  # a guest QEMU runs at this site
    session_committing: bool = False  # a replication session sealed an epoch: output waits for its acks
    promised: bool = False  # output commit was promised for this guest run (boot, or a standby acked)
    policy: UnreachablePolicy = UnreachablePolicy.STALL
    unprotected_ms: float | None = None  # how long the standby has been lost (None: not lost)
    grace_ms: float = 5000.0
    unsafe: bool = False  # GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT: only to prove the tests have teeth
    until: float | None = None  # the lease deadline (CLOCK_BOOTTIME s): nothing leaves after it, even
    # if the HA loop is late to close the gate (None: no lease, e.g. no witness or a forced promotion)


@dataclass(frozen=True)
class GateDecision:
    mode: GateMode
    allowed: bool
    why: str
    pass_through: bool = False  # the gate may release its pass-through flows before their epoch commits


def decide(i: GateInputs) -> GateDecision:
    if not i.guest_here or i.ha_state not in _RUNS_GUEST:
        return GateDecision(GateMode.FENCED, False, f"no guest of ours may speak ({i.ha_state.value})")
    if i.unsafe:
        return GateDecision(GateMode.OPEN, i.may_release, "UNSAFE: output commit disabled")
    if i.session_committing:
        return GateDecision(GateMode.HOLD, i.may_release, "output waits for the standby's acks",
                            pass_through=i.may_release)
    if i.promised:
        if (i.policy is UnreachablePolicy.CONTINUE_UNPROTECTED and i.unprotected_ms is not None
                and i.unprotected_ms >= i.grace_ms):
            return GateDecision(GateMode.OPEN, i.may_release,
                                "standby lost longer than the grace: continue-unprotected policy")
        return GateDecision(GateMode.HOLD, i.may_release, "output commit promised: waits for a standby")
    return GateDecision(GateMode.OPEN, i.may_release, "the only copy: no standby commits this guest yet")


class GateController:
    """Holds the inputs and applies `decide` to the gate on every change; nothing else
    changes the gate's mode or permission."""

    def __init__(self, gate: Gate, inputs: GateInputs, on_change=None, clock=time.monotonic):
        self.gate = gate
        self.clock = clock
        self.inputs = inputs
        self.decision = decide(inputs)
        self._lost_at: float | None = None
        self._protected = False
        self._on_change = on_change  # callable(decision): the timeline
        self._apply(self.decision)

    def update(self, **changes) -> GateDecision:
        self.inputs = replace(self.inputs, **changes)
        return self.reapply()

    def reapply(self) -> GateDecision:
        if self._lost_at is not None:
            self.inputs = replace(self.inputs, unprotected_ms=(self.clock() - self._lost_at) * 1000)
        d = decide(self.inputs)
        if d != self.decision:
            old, self.decision = self.decision, d
            self._apply(d)
            log.info("gate.policy", mode=d.mode.value, allowed=d.allowed, why=d.why, was=old.mode.value)
            if self._on_change:
                self._on_change(d)
        elif d.allowed and self.gate.until != self.inputs.until:
            self.gate.allow(True, until=self.inputs.until)  # a renewed lease moves the deadline
        return d

    def protection(self, protected: bool) -> None:
        """The HA machine's word on protection (SetProtection). Entering it promises output commit
        for this guest run; leaving it (the standby lost) starts the policy's grace clock."""
        if protected == self._protected:
            return
        self._protected = protected
        self._lost_at = None if protected else self.clock()
        self.update(unprotected_ms=None if protected else 0.0, **({"promised": True} if protected else {}))

    def _apply(self, d: GateDecision) -> None:
        g = self.gate
        if not d.pass_through:
            g.set_pass_through(False)
        if not d.allowed:
            g.allow(False)
        g.set_mode(d.mode)
        if d.pass_through:
            g.set_pass_through(True)
        if d.allowed:
            g.allow(True, until=self.inputs.until)
