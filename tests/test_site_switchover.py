"""The planned switchover as a sequence, against a fake primary and lease backend and the real
HA machine: one lease release, the peer told after the release, demotion only once the peer
holds a newer generation, and a clean abort otherwise."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from geomirror import ha
from geomirror.errors import Refused
from geomirror.site.switchover import Switchover, on_peer_handover
from replication.transport import ChannelError
from tests.site_fakes import FakeGate, FakeLease, ha_config, make_ctx, site_config


class FakePrimary:
    def __init__(self, fail_handover: int = 0):
        self.status = SimpleNamespace(state="protected")
        self.calls: list = []
        self.fail_handover = fail_handover
        self.lease: FakeLease | None = None

    async def handover(self, timeout):
        self.calls.append("handover")
        if self.fail_handover:
            self.fail_handover -= 1
            raise ChannelError("the session to the standby is gone")
        return 42

    async def announce_switchover(self, epoch):
        self.calls.append(("announce_switchover", epoch, self.lease.holder))

    async def abort_handover(self):
        self.calls.append("abort_handover")


class Rig:
    def __init__(self, peer_takes=True, fail_handover=0):
        self.m = ha.HaMachine("primary", ha_config())
        self.actions: list = []
        self.events: list = []
        self.lease = FakeLease()
        self.lease.holder, self.lease.generation = "site-a", 3
        now = time.monotonic()
        for e in (ha.LeaseGranted(3, now + 60, now), ha.StandbyReady(40)):
            self.m.handle(e)
        assert self.m.state is ha.ACTIVE_PROTECTED
        self.ctx = make_ctx(site_config(), FakeGate(), self.feed, lambda: self.m.generation)
        self.primary = FakePrimary(fail_handover)
        self.primary.lease = self.lease
        self.demoted: list = []
        self.told = False

        def peer_moves(lease, st):  # the peer takes the lease once told, at the next generation
            if peer_takes and any(c[0] == "announce_switchover" for c in self.primary.calls if isinstance(c, tuple)):
                if lease.holder is None:
                    lease.holder, lease.generation = "site-b", lease.generation + 1
                return {"holder": lease.holder, "generation": lease.generation, "valid": True}
            return st

        self.lease.on_get = peer_moves

        async def demote(reason):
            self.demoted.append(reason)
            self.feed(ha.BecameStandby(time.monotonic(), reason))

        self.job = Switchover(self.ctx, self.lease, lambda: self.primary, lambda: self.m.state, demote, poll_s=0.001)

    def feed(self, e):
        self.events.append(e)
        for a in self.m.handle(e):
            self.actions.append(a)
            if isinstance(a, ha.ReleaseLease):  # what Effects would do
                if self.lease.holder == "site-a" and a.generation == self.lease.generation:
                    self.lease.holder = None


async def test_switchover_releases_once_tells_the_peer_after_and_demotes():
    r = Rig()
    report = await r.job.run(timeout=1.0)
    assert report["from"] == "site-a" and report["to"] == "site-b" and report["final_epoch"] == 42
    for k in ("paused_at_ms", "fenced_at_ms", "peer_holds_lease_at_ms", "standby_at_ms"):
        assert isinstance(report[k], float)
    assert [a for a in r.actions if isinstance(a, ha.ReleaseLease)] == [ha.ReleaseLease(3)], "released once"
    assert ha.CloseGate() in r.actions and ha.Drain() in r.actions
    assert ha.Withdraw() not in r.actions, "make before break: no withdrawal before the peer's route is seen"
    assert ha.SetGuestRoute(ha.GUEST_ROUTE_PEER) in r.actions, "traffic still arriving here goes to the peer"
    r.feed(ha.PeerRouteSeen(True))
    assert r.actions[-2:][0] == ha.Withdraw() and r.m.draining_since is None
    assert ("announce_switchover", 42, None) in r.primary.calls, "the peer is told once the lease is free"
    assert r.demoted == ["switchover to site-b"] and r.m.state is ha.STANDBY
    assert not r.m.guest_running and not r.m.gate_open
    assert ha.StopGuest() not in r.actions, "the demotion stops the guest, not a stale-fence"


async def test_a_peer_that_does_not_take_over_aborts_and_the_guest_runs_on():
    r = Rig(peer_takes=False)
    with pytest.raises(Refused, match="site-b did not take over within 0.2s; the guest runs on here"):
        await r.job.run(timeout=0.2)
    assert "abort_handover" in r.primary.calls and not r.demoted
    assert any(isinstance(e, ha.HandoverAborted) for e in r.events)
    assert r.m.state is ha.FENCED and ha.AcquireLease() in r.actions, "it asks for the lease back"
    now = time.monotonic()
    for a in r.m.handle(ha.LeaseGranted(4, now + 60, now)):
        r.actions.append(a)
    assert r.m.state in ha.ACTIVE and r.m.gate_open, "nobody held it since: it runs on here"


async def test_a_broken_session_is_retried_within_the_timeout():
    r = Rig(fail_handover=1)
    report = await r.job.run(timeout=1.0)
    assert r.primary.calls.count("handover") == 2 and report["final_epoch"] == 42
    assert any(e["event"] == "switchover.retry" for e in r.ctx.timeline.entries)


@pytest.mark.parametrize("why", ["unprotected", "not active", "no lease backend", "running"])
async def test_refusals_are_sentences(why):
    r = Rig()
    if why == "unprotected":
        r.primary.status.state = "syncing"
        match = r"switchover needs a protected primary; site-a is active_protected \(replication syncing\)"
    elif why == "not active":
        r.m.handle(ha.OperatorFence(time.monotonic()))
        match = "switchover needs a protected primary; site-a is fenced"
    elif why == "no lease backend":
        r.job.lease = None
        match = "switchover needs the lease backend"
    else:
        r.job.running = True
        match = "a switchover is already running"
    with pytest.raises(Refused, match=match):
        await r.job.run(timeout=0.1)
    assert "handover" not in r.primary.calls


def test_the_standby_takes_over_on_the_peers_word_by_the_ordinary_rules():
    events = []
    ctx = make_ctx(site_config("site-b"), FakeGate(), events.append)
    on_peer_handover(ctx, 42)
    assert isinstance(events[0], ha.OperatorPromote) and events[0].force is False
