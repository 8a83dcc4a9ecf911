"""The planned switchover as a sequence, against a fake primary and lease backend and the real
HA machine: one lease release, the peer told after the release, demotion only once the peer
holds a newer generation, and a clean abort otherwise."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from geomirror import ha
from geomirror.errors import Refused
from geomirror.site.switchover import Switchover, on_peer_handover
from replication.session import LinkStats, heartbeat_payload, on_heartbeat_message, parse_heartbeat
from replication.standby import Standby
from replication.transport import ChannelError, MsgType
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
    def __init__(self, peer_takes=True, fail_handover=0, release_after_s: float | None = None, poll_s=0.001):
        self.release_after_s = release_after_s  # None: the release is done at once, as the HA machine asks
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

        self.job = Switchover(self.ctx, self.lease, lambda: self.primary, lambda: self.m.state, demote, poll_s=poll_s)

    def feed(self, e):
        self.events.append(e)
        for a in self.m.handle(e):
            self.actions.append(a)
            if isinstance(a, ha.ReleaseLease):  # what Effects would do
                if self.release_after_s is None:
                    self.release(a.generation)
                else:
                    asyncio.get_running_loop().call_later(self.release_after_s, self.release, a.generation)

    def release(self, generation):
        if self.lease.holder == "site-a" and generation == self.lease.generation:
            self.lease.holder = None
            self.ctx.released_generation = generation  # what Effects does once the backend answered
            self.ctx.lease_released.set()


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


async def test_the_switchover_is_woken_by_its_own_release_not_by_the_next_poll():
    """The release RPC ends after the job first asked the backend: the job must not sleep a poll
    interval (an hour here) before it tells the peer."""
    r = Rig(release_after_s=0.01, poll_s=3600.0)
    report = await asyncio.wait_for(r.job.run(timeout=7200.0), 60)
    assert report["lease_backend"] == "released"
    assert ("announce_switchover", 42, None) in r.primary.calls


async def settle(r, until, polls=500):
    """Let the job's background task run (it polls every 1 ms) until `until()` or `polls` passes."""
    for _ in range(polls):
        if until():
            return True
        await asyncio.sleep(0.001)
    return until()


async def test_a_peer_that_does_not_take_over_aborts_and_the_guest_stays_paused_until_the_lease_is_back():
    r = Rig(peer_takes=False)
    with pytest.raises(Refused, match="site-b did not take over within 0.2s; the guest stays paused"):
        await r.job.run(timeout=0.2)
    assert not r.demoted and any(isinstance(e, ha.HandoverAborted) for e in r.events)
    assert r.m.state is ha.FENCED and ha.AcquireLease() in r.actions, "it asks for the lease back"
    assert not await settle(r, lambda: "abort_handover" in r.primary.calls, polls=50), \
        "never running behind a closed gate: paused until the lease is held again"
    with pytest.raises(Refused, match="paused until this site holds the lease again"):
        await r.job.run(timeout=0.2)
    now = time.monotonic()
    for a in r.m.handle(ha.LeaseGranted(4, now + 60, now)):
        r.actions.append(a)
    assert r.m.state in ha.ACTIVE and r.m.gate_open, "nobody held it since: it runs on here"
    assert await settle(r, lambda: "abort_handover" in r.primary.calls), "the guest runs again"


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


class LeaselessRig(Rig):
    """Site A's upstream is lost with its way to the lease authority: the lease lapsed while
    protected (ride-through), the backend answers nothing; the peer reaches the authority and
    takes the next generation, which A learns from the peer's heartbeats."""

    def __init__(self, peer_takes_after_polls: int | None = 0, lease_ttl_s: float = 5.0):
        super().__init__(peer_takes=False)
        m, t = self.m, time.monotonic()
        self.m = ha.HaMachine("primary", ha_config())
        for e in (ha.Tick(t), ha.LeaseGranted(3, t + 6, t), ha.HeartbeatReceived(t, 1.0, 0),
                  ha.StandbyReady(40), ha.WitnessUnreachable(t, "uplink0 down")):
            self.m.handle(e)
        while not self.m.lapsed:  # renewals get no answer: past the deadline it rides through
            t += 0.1
            self.m.handle(ha.HeartbeatReceived(t, 1.0, 0))
            self.m.handle(ha.Tick(t))
        assert self.m.state is ha.ACTIVE_PROTECTED and self.m.gate_open and not self.m.holding
        self.t = t
        self.lease.unreachable = True
        self.polls = 0
        self.takes_after = peer_takes_after_polls

        def peer_generation():  # what the heartbeats tell the machine; the peer moves once told
            told = any(isinstance(c, tuple) and c[0] == "announce_switchover" for c in self.primary.calls)
            if told and self.takes_after is not None:
                self.polls += 1
                if self.polls > self.takes_after and self.m.seen_generation < 4:
                    self.t += 0.1
                    self.feed(ha.HeartbeatReceived(self.t, 1.0, 4))
            return self.m.seen_generation

        self.job = Switchover(self.ctx, self.lease, lambda: self.primary, lambda: self.m.state, self.job._demote,
                              poll_s=0.001, peer_generation=peer_generation, lease_ttl_s=lease_ttl_s)
        del m


async def test_without_the_lease_authority_the_handover_goes_by_the_peers_heartbeats():
    r = LeaselessRig()
    report = await r.job.run(timeout=1.0)
    assert report["lease_backend"] == "unreachable" and report["peer_generation_seen_via"] == "heartbeat"
    assert ("announce_switchover", 42, "site-a") in r.primary.calls, "told without waiting for the lease"
    assert not [a for a in r.actions if isinstance(a, ha.ReleaseLease)], "nothing held, nothing released"
    assert ha.CloseGate() in r.actions and not [a for a in r.actions if isinstance(a, ha.OpenGate)]
    assert r.demoted == ["switchover to site-b"] and r.m.state is ha.STANDBY and not r.m.gate_open
    assert "abort_handover" not in r.primary.calls
    assert any(e["event"] == "switchover.lease_unreachable" for e in r.ctx.timeline.entries)


async def test_an_unreleased_lease_gives_the_peer_one_lease_ttl_more():
    r = LeaselessRig(peer_takes_after_polls=300, lease_ttl_s=5.0)  # ≥ 0.3 s of 1 ms polls: past the timeout
    report = await r.job.run(timeout=0.05)
    assert r.demoted and report["peer_generation_seen_via"] == "heartbeat"


async def test_without_the_authority_an_aborted_handover_stays_fenced_and_paused():
    r = LeaselessRig(peer_takes_after_polls=None, lease_ttl_s=0.0)
    with pytest.raises(Refused, match="did not take over within 0.1s; the guest stays paused"):
        await r.job.run(timeout=0.1)
    assert r.m.state is ha.FENCED and not r.m.gate_open and ha.AcquireLease() in r.actions
    for _ in range(30):  # the authority stays unreachable: no output, no guest running
        r.t += 0.1
        for a in r.m.handle(ha.WitnessUnreachable(r.t)) + r.m.handle(ha.Tick(r.t)):
            r.actions.append(a)
    assert r.m.state is ha.FENCED and not [a for a in r.actions if isinstance(a, ha.OpenGate)]
    assert not await settle(r, lambda: "abort_handover" in r.primary.calls, polls=50)
    r.feed(ha.HeartbeatReceived(r.t, 1.0, 4))  # the peer did take over after all
    assert any(isinstance(a, ha.Rejoin) for a in r.actions), "its guest is stale now: rejoin as the standby"
    assert "abort_handover" not in r.primary.calls


async def test_a_handover_the_machine_refuses_runs_on_at_once():
    r = Rig()
    r.m.forced = True  # e.g. a forced promotion: not protected under a lease
    with pytest.raises(Refused, match="switchover refused by the HA machine"):
        await r.job.run(timeout=0.2)
    assert r.primary.calls[-1] == "abort_handover" and r.m.gate_open
    assert not [a for a in r.actions if isinstance(a, ha.CloseGate)]


class RecordingChannel:
    peer = "198.18.100.1:40000"

    def __init__(self, fail: Exception | None = None):
        self.sent: list = []
        self.closed = False
        self.fail = fail

    async def send_heartbeat(self, payload):
        if self.fail:
            raise self.fail
        self.sent.append(payload)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("fail", [None, ChannelError("the primary closed the connection")])
async def test_a_standby_that_takes_over_tells_the_primary_its_new_generation_before_it_hangs_up(fail):
    """The only way a primary that cannot reach the lease authority learns the peer's takeover:
    the session's last heartbeat carries the generation the standby now holds."""
    sb = Standby(SimpleNamespace(committed_epoch=42, valid=True), {}, "site-b")
    sb.generation_fn = lambda: 4
    ch = RecordingChannel(fail)
    sb._current = ch
    await sb.stop_accepting()
    assert ch.closed and not sb.accepting
    if fail is None:
        assert len(ch.sent) == 1 and parse_heartbeat(ch.sent[0])[2] == 4


async def test_a_heartbeat_is_reported_even_when_its_echo_cannot_go():
    class Closed:
        async def send(self, mtype, payload):
            raise ChannelError("site-b closed the connection")

    seen = []
    with pytest.raises(ChannelError):
        await on_heartbeat_message(Closed(), MsgType.HEARTBEAT, heartbeat_payload(0, 1, 4), LinkStats(),
                                   lambda gen, link, up: seen.append(gen))
    assert seen == [4]
