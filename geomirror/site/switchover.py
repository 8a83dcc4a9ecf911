"""Planned switchover (a site-evacuation drill, or an upstream-loss handover): move the guest
to the peer, losing nothing.

At the primary:
 1. the last epoch is taken with the guest left paused, and committed by the peer;
 2. the HA machine is told (`HandoverPrepared`): gate closed for good under this generation,
    prefix drained (re-announced with GRACEFUL_SHUTDOWN, withdrawn only once the upstream gives
    us the peer's route, or after bgp.drain_timeout_s), the guest's traffic that still arrives
    here forwarded to the peer over the inter-site link, the lease released if held; this job
    waits until the lease backend shows it free — unless the lease backend is unreachable from
    here (an upstream lost together with the way to the witness): then it goes on at once and
    the peer gets the lease when ours expires, up to one lease TTL later;
 3. the peer is told (SWITCHOVER on the replication channel); it takes the lease at the
    next generation by the ordinary rules, resumes from that epoch (its hot standby),
    opens and announces;
 4. once this site sees the peer at a newer generation — from the lease backend, or from the
    peer's heartbeats (the generation it holds, which only the lease authority hands out) —
    this site stops its guest and becomes the peer's standby (`demote`), its replica seeded from
    the paused guest's RAM, so the reverse resync sends next to nothing.
If a step fails or the peer has not taken over within the timeout, the HA machine is told
(`HandoverAborted`): fenced, it asks for the lease back, granted only if nobody held it since.
The guest stays paused until this site holds the lease again (then it runs on here), or until
it learns that the peer runs it (then it rejoins as the standby): never running behind a
closed gate, so whichever site resumes it resumes the handed-over epoch. Every dependency is
injected (tests/test_site_switchover.py runs it on fakes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from geomirror import ha
from geomirror.errors import Refused
from geomirror.site.context import SiteContext
from geomirror.witness import WitnessError, WitnessUnreachable
from replication.qemu import GuestError
from replication.transport import ChannelError


class Switchover:
    def __init__(self, ctx: SiteContext, lease, primary: Callable[[], object | None],
                 ha_state: Callable[[], ha.HaState], demote: Callable[[str], Awaitable[None]],
                 poll_s: float = 0.05, peer_generation: Callable[[], int] = lambda: 0,
                 lease_ttl_s: float = 0.0):
        self.ctx = ctx
        self.lease = lease
        self._primary = primary  # the replication Primary now (None when none runs)
        self._ha_state = ha_state
        self._demote = demote
        self.poll_s = poll_s
        # the highest lease generation this site has seen held elsewhere (the HA machine's view:
        # the peer's heartbeats, denials); the peer's takeover shows here without the lease backend
        self._peer_generation = peer_generation
        self.lease_ttl_s = lease_ttl_s  # how long a lease we could not release may still block the peer
        self.running = False
        self.thawing: asyncio.Task | None = None  # an aborted handover's guest, paused until the lease is back

    def _check(self):
        p = self._primary()
        state = self._ha_state()
        if self.running:
            raise Refused("a switchover is already running")
        if self.thawing is not None and not self.thawing.done():
            raise Refused("an aborted switchover's guest is paused until this site holds the lease again")
        if p is None or state is not ha.ACTIVE_PROTECTED or p.status.state != "protected":
            raise Refused(f"switchover needs a protected primary; {self.ctx.name} is {state.value}"
                          + ("" if p is None else f" (replication {p.status.state})"))
        if self.lease is None:
            raise Refused("switchover needs the lease backend (witness): the peer takes the lease over")
        return p

    async def run(self, timeout: float = 15.0) -> dict:
        primary = self._check()
        self.running = True
        try:
            return await self._run(primary, timeout)
        finally:
            self.running = False

    async def _run(self, primary, timeout: float) -> dict:
        ctx, feed = self.ctx, self.ctx.feed
        peer = ctx.cfg.peer.name
        t0 = time.monotonic()
        ms = lambda: round((time.monotonic() - t0) * 1000, 1)  # noqa: E731
        report: dict = {"from": ctx.name, "to": peer}
        ctx.mark("switchover.begin", to=peer)
        deadline = t0 + timeout
        while True:
            try:
                epoch = await primary.handover(timeout=min(timeout, 10.0))
                break
            except (ChannelError, GuestError) as e:
                # The session broke under us (the guest runs on, nothing was handed over): wait
                # for protection to come back and try again while time allows.
                ctx.mark("switchover.retry", error=str(e))
                while time.monotonic() < deadline and primary.status.state != "protected":
                    await asyncio.sleep(self.poll_s)
                if time.monotonic() >= deadline or self._primary() is not primary:
                    raise Refused(f"switchover aborted: {e}; the guest runs on here") from None
        report["final_epoch"] = epoch
        report["paused_at_ms"] = ms()
        gen = ctx.generation()
        feed(ha.HandoverPrepared(time.monotonic(), epoch))
        if self._ha_state() is not ha.HANDING_OVER:  # nothing was closed or released: run on
            await primary.abort_handover()
            ctx.mark("switchover.refused", state=self._ha_state().value)
            raise Refused(f"switchover refused by the HA machine ({self._ha_state().value}, not protected under "
                          "a lease); the guest runs on here")
        released = await self._wait_released(gen, deadline)
        if released is None:
            await self._abort(primary, f"the lease backend did not show generation {gen} released")
            raise Refused("switchover aborted: the lease was not released in time; the guest stays paused "
                          "until this site holds the lease again")
        report["lease_backend"] = "released" if released else "unreachable"
        report["fenced_at_ms"] = ms()
        try:
            await primary.announce_switchover(epoch)
        except (ChannelError, OSError) as e:
            await self._abort(primary, f"cannot tell {peer}: {e}")
            raise Refused(f"switchover aborted: cannot tell {peer} ({e}); the guest stays paused until this "
                          "site holds the lease again") from None
        # Unreleased, our lease may block the peer until it expires at the authority.
        wait = timeout + (0.0 if released else self.lease_ttl_s)
        seen = await self._wait_peer(peer, gen, time.monotonic() + wait)
        if seen is None:
            await self._abort(primary, f"{peer} did not take over within {wait:g}s")
            raise Refused(f"switchover aborted: {peer} did not take over within {wait:g}s; the guest stays "
                          "paused until this site holds the lease again")
        report["peer_generation_seen_via"] = seen
        report["peer_holds_lease_at_ms"] = ms()
        ctx.mark("switchover.handed_over", to=peer, epoch=epoch, ms=report["peer_holds_lease_at_ms"], via=seen)
        await self._demote(f"switchover to {peer}")
        report["standby_at_ms"] = ms()
        ctx.mark("switchover.done", **report)
        return report

    async def _wait_released(self, gen: int, deadline: float) -> bool | None:
        """True once our own release of generation `gen` went through, or the lease backend shows
        it released (or expired); False at once if the backend is unreachable from here (the peer
        waits out our lease instead); None if it still shows ours held at the deadline. Woken by
        the release itself rather than the next poll (a poll interval off every switchover)."""
        guest, ctx = self.ctx.cfg.guest.name, self.ctx
        while time.monotonic() < deadline:
            if ctx.released_generation == gen:
                return True
            ctx.lease_released.clear()
            try:
                st = await self.lease.get(guest)
            except WitnessUnreachable as e:
                ctx.mark("switchover.lease_unreachable", generation=gen, error=str(e),
                         hint=f"{ctx.cfg.peer.name} takes the next generation once ours has expired "
                              f"(up to {self.lease_ttl_s:g}s)")
                return False
            except WitnessError:
                st = None
            if st is not None and (st.get("holder") != ctx.name or not st.get("valid", True)):
                return True
            if ctx.released_generation == gen:
                return True
            try:
                await asyncio.wait_for(ctx.lease_released.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
        return None

    async def _wait_peer(self, peer: str, gen: int, deadline: float) -> str | None:
        """How this site learnt that the peer holds a newer generation ("heartbeat" or "lease
        backend"), or None at the deadline."""
        guest = self.ctx.cfg.guest.name
        while time.monotonic() < deadline:
            if self._peer_generation() > gen:
                return "heartbeat"
            try:
                st = await self.lease.get(guest)
                if st.get("holder") == peer and int(st.get("generation", 0)) > gen and st.get("valid", True):
                    return "lease backend"
            except WitnessError:  # unreachable from here: the heartbeats will tell
                pass
            await asyncio.sleep(self.poll_s)
        return None

    async def _abort(self, primary, why: str) -> None:
        """Fenced (the machine asks for the lease back); the guest stays paused until this site
        holds the lease again, or until another site is known to run it (then the machine rejoins)."""
        self.ctx.mark("switchover.aborted", why=why)
        self.ctx.feed(ha.HandoverAborted(time.monotonic(), why))
        self.thawing = self.ctx.spawn(self._thaw_when_held(primary), "switchover.thaw")

    async def _thaw_when_held(self, primary) -> None:
        while self._primary() is primary:
            if self._ha_state() in ha.ACTIVE:
                await primary.abort_handover()
                self.ctx.mark("switchover.resumed_here", state=self._ha_state().value)
                return
            await asyncio.sleep(self.poll_s)


def on_peer_handover(ctx: SiteContext, epoch: int) -> None:
    """At the standby: the primary handed the guest over at `epoch` (committed here). Take over
    now, by the ordinary rules (a lease at a higher generation; the primary released it)."""
    ctx.mark("switchover.takeover", epoch=epoch, peer=ctx.cfg.peer.name)
    ctx.feed(ha.OperatorPromote(time.monotonic(), False))
