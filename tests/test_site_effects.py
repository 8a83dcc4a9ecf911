"""Effects carries out the HA machine's actions against fake lease, gate and speaker objects,
and what comes of them goes back to the machine as events."""

from __future__ import annotations

import asyncio
import time

import pytest

from bgp.speaker import SpeakerError
from geomirror import ha
from geomirror.site.effects import Effects
from geomirror.site.gate_policy import GateController, GateInputs, UnreachablePolicy
from replication.gate import GateMode
from bgp.config import Policy
from tests.site_fakes import FakeGate, FakeLease, FakeSpeaker, ha_config, make_ctx, site_config


class FakeGuestOps:
    def __init__(self):
        self.calls = []

    async def resume_guest(self):
        self.calls.append("resume")

    async def stop_guest(self, reason):
        self.calls.append(("stop", reason))

    async def rejoin(self, reason):
        self.calls.append(("rejoin", reason))

    async def hand_over(self, reason):
        self.calls.append(("hand_over", reason))


class Site:
    """A real HA machine wired to Effects, the way the daemon wires them."""

    def __init__(self, policy="stall", grace_ms=5000, speaker=None, lease=None, role=ha.Role.PRIMARY,
                 auto_rejoin=False, fenced_by_operator=True):
        self.cfg = site_config(policy=policy, grace_ms=grace_ms)
        self.gate = FakeGate()
        self.lease = lease or FakeLease()
        self.speaker = speaker or FakeSpeaker()
        self.ops = FakeGuestOps()
        self.m = ha.HaMachine(role, ha_config(auto_rejoin=auto_rejoin), fenced_by_operator=fenced_by_operator)
        self.events = []
        self.ctx = make_ctx(self.cfg, self.gate, self.feed, lambda: self.m.generation)
        self.gatectl = GateController(self.gate, GateInputs(ha_state=self.m.state, policy=UnreachablePolicy(policy),
                                                            grace_ms=grace_ms,
                                                            guest_here=role is ha.Role.PRIMARY, promised=True))
        self.fx = Effects(self.ctx, self.gatectl, self.lease, self.speaker, self.ops)

    def feed(self, e):
        self.events.append(e)
        for a in self.m.handle(e):
            self.fx.act(a)
        self.gatectl.update(ha_state=self.m.state)

    async def settle(self):
        for _ in range(20):
            await asyncio.sleep(0)
        while len(self.ctx.tasks):
            await asyncio.sleep(0.001)


async def test_a_booted_primary_gets_the_lease_opens_and_announces():
    s = Site()
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert ("acquire", "guest") in s.lease.calls
    assert any(isinstance(e, ha.LeaseGranted) and e.generation == 1 for e in s.events)
    assert s.m.state is ha.ACTIVE_UNPROTECTED and s.gate.allowed and s.gate.mode is GateMode.HOLD
    assert s.speaker.calls == [("announce", "198.51.100.0/24")] and s.fx.announced
    assert [e["event"] for e in s.ctx.timeline.entries][:3] == ["lease.granted", "gate.open", "ha.state"]


async def test_a_lease_held_elsewhere_fences_and_stops_the_stale_guest():
    s = Site(lease=FakeLease())
    s.lease.holder, s.lease.generation = "site-b", 4
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert any(isinstance(e, ha.LeaseDenied) and e.holder == "site-b" for e in s.events)
    assert s.m.state is ha.FENCED and not s.gate.allowed and s.gate.mode is GateMode.FENCED
    assert s.ops.calls and s.ops.calls[0][0] == "stop" and "newer lease generation" in s.ops.calls[0][1]
    assert s.speaker.calls == [], "never announced, so nothing to withdraw"


async def test_an_unreachable_witness_comes_back_as_an_event():
    s = Site()
    s.lease.unreachable = True
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert any(isinstance(e, ha.WitnessUnreachable) and "unreachable (test)" in e.detail for e in s.events)
    assert s.m.witness_reachable is False and not s.gate.allowed


async def test_a_failed_announce_is_an_alarm_not_a_crash():
    s = Site(speaker=FakeSpeaker(fail=SpeakerError("ExaBGP refused 'announce route' (see x.log)")))
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert not s.fx.announced and s.gate.allowed
    assert any("announcing 198.51.100.0/24 failed: ExaBGP refused" in a for a in s.fx.alarms)


async def test_operator_fence_closes_withdraws_and_releases_once():
    s = Site()
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    s.feed(ha.OperatorFence(time.monotonic()))
    await s.settle()
    assert s.gate.mode is GateMode.FENCED and not s.gate.allowed
    assert s.speaker.calls[-1] == ("withdraw", "198.51.100.0/24") and not s.fx.announced
    assert [c for c in s.lease.calls if c[0] == "release"] == [("release", 1)] and s.lease.holder is None


async def test_continue_unprotected_opens_the_gate_after_the_grace_only():
    s = Site(policy="continue-unprotected", grace_ms=30)
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    s.feed(ha.StandbyReady(5))
    assert s.m.state is ha.ACTIVE_PROTECTED and s.fx.protected
    s.fx.act(ha.SetProtection(False))  # the standby lost
    assert s.gate.mode is GateMode.HOLD, "within the grace output still waits"
    await asyncio.sleep(0.06)
    await s.settle()
    assert s.gate.mode is GateMode.OPEN and s.gate.allowed
    assert any(e["event"] == "protection.grace_over" for e in s.ctx.timeline.entries)


async def test_stall_policy_never_opens():
    s = Site(policy="stall", grace_ms=10)
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    s.feed(ha.StandbyReady(5))
    s.fx.act(ha.SetProtection(False))
    await asyncio.sleep(0.03)
    await s.settle()
    assert s.gate.mode is GateMode.HOLD


async def test_resume_and_stop_go_to_the_guest_operations():
    s = Site(role=ha.Role.STANDBY)
    s.fx.act(ha.ResumeGuest())
    s.fx.act(ha.StopGuest())
    await s.settle()
    assert s.ops.calls[0] == "resume" and s.ops.calls[1][0] == "stop"


def test_an_unknown_action_is_a_bug_said_loudly():
    s = Site()
    with pytest.raises(TypeError, match="which effects does not know"):
        s.fx.act(object())


async def test_a_site_taken_over_from_rejoins_by_itself():
    s = Site(auto_rejoin=True)
    s.lease.holder, s.lease.generation = "site-b", 4
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert s.ops.calls == [("rejoin", "site-b holds the lease at generation 4")]
    assert any(e["event"] == "rejoin.begin" for e in s.ctx.timeline.entries)


async def test_a_fenced_site_without_a_guest_learns_the_holder_and_rejoins():
    s = Site(auto_rejoin=True, role=ha.Role.FENCED, fenced_by_operator=False)
    s.lease.holder, s.lease.generation = "site-b", 3
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert ("get", "guest") in s.lease.calls
    assert any(isinstance(e, ha.LeaseSeen) and e.holder == "site-b" and e.generation == 3 for e in s.events)
    assert s.ops.calls and s.ops.calls[0][0] == "rejoin" and "site-b runs the guest at lease generation 3" \
        in s.ops.calls[0][1]


class FailV6Speaker(FakeSpeaker):
    """ExaBGP refuses the IPv6 announcement only (e.g. a neighbour without the family)."""

    async def announce(self, prefix, **kw):
        self.calls.append(("announce", prefix))
        if ":" in prefix:
            raise SpeakerError(f"ExaBGP refused 'announce route {prefix}' (see x.log)")


async def test_a_dual_stack_site_announces_and_withdraws_both_prefixes():
    s = Site()
    s.cfg.guest.prefix6 = "2001:db8:100::/48"
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert s.speaker.calls == [("announce", "198.51.100.0/24"), ("announce", "2001:db8:100::/48")]
    assert s.fx.announced
    marks = [e for e in s.ctx.timeline.entries if e["event"] == "bgp.announced"]
    assert [m["prefixes"] for m in marks] == [["198.51.100.0/24", "2001:db8:100::/48"]]
    s.feed(ha.OperatorFence(time.monotonic()))
    await s.settle()
    assert s.speaker.calls[-2:] == [("withdraw", "198.51.100.0/24"), ("withdraw", "2001:db8:100::/48")]
    assert not s.fx.announced and not s.fx.announced_prefixes


async def test_a_dual_stack_site_with_one_prefix_refused_is_not_announced_and_withdraws_both():
    s = Site(speaker=FailV6Speaker())
    s.cfg.guest.prefix6 = "2001:db8:100::/48"
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    assert s.fx.announced_prefixes == {"198.51.100.0/24"} and not s.fx.announced
    assert any("announcing 2001:db8:100::/48 failed" in a for a in s.fx.alarms)
    assert not [e for e in s.ctx.timeline.entries if e["event"] == "bgp.announced"]
    s.feed(ha.OperatorFence(time.monotonic()))
    await s.settle()
    # the speaker keeps a refused announcement to re-apply after an ExaBGP restart: withdraw it too
    assert s.speaker.calls[-2:] == [("withdraw", "198.51.100.0/24"), ("withdraw", "2001:db8:100::/48")]


async def test_route_modes_are_applied_in_order_latest_wins_and_failures_retry():
    from tests.site_fakes import FakeRoutes

    s = Site()
    s.fx.routes = FakeRoutes(fail=1)
    s.fx.ROUTE_RETRY_S = 0
    s.fx.act(ha.SetGuestRoute(ha.GUEST_ROUTE_PEER))
    s.fx.act(ha.SetGuestRoute(ha.GUEST_ROUTE_HERE))
    await s.settle()
    assert s.fx.routes.applied == [ha.GUEST_ROUTE_HERE] and s.fx.route_applied == ha.GUEST_ROUTE_HERE


async def test_drain_then_withdraw_and_an_upstream_handover_goes_to_the_guest_operations():
    s = Site()
    s.feed(ha.Tick(time.monotonic()))
    await s.settle()
    s.fx.act(ha.Drain())
    s.fx.act(ha.HandOver("upstream lost: test"))
    await s.settle()
    assert s.speaker.calls[-1][0] == "drain" and s.speaker.calls[-1][2].communities == ("65535:0",)
    assert ("hand_over", "upstream lost: test") in s.ops.calls
    assert any(e["event"] == "upstream_loss.handover" for e in s.ctx.timeline.entries)


class PolicySpeaker(FakeSpeaker):
    async def announce(self, prefix, **kw):
        await super().announce(prefix, **kw)
        self.calls[-1] += (kw["policy"].prepend,)


async def test_a_pre_announcing_standby_announces_the_backup_path_and_withdraws_it_when_fenced():
    s = Site(speaker=PolicySpeaker(), role=ha.Role.STANDBY)
    s.cfg.bgp.standby = Policy(prepend=2)
    s.m = ha.HaMachine(ha.Role.STANDBY, ha_config(pre_announce=True))
    now = time.monotonic()
    for e in (ha.Tick(now), ha.HeartbeatReceived(now, 20.0, 1), ha.ReplicaCommitted(5)):
        s.feed(e)
    await s.settle()
    assert s.speaker.calls == [("announce", "198.51.100.0/24", 2)], "the backup path: own AS 1 + 2 times"
    assert s.fx.backup_prefixes == {"198.51.100.0/24"} and not s.fx.announced
    assert [e["prepend"] for e in s.ctx.timeline.entries if e["event"] == "bgp.pre_announced"] == [2]
    s.feed(ha.OperatorFence(time.monotonic()))
    await s.settle()
    assert s.speaker.calls[-1] == ("withdraw", "198.51.100.0/24") and not s.fx.backup_prefixes
