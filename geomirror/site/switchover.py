"""Planned switchover (a site-evacuation drill): move the guest to the peer, losing nothing.

At the primary:
 1. the last epoch is taken with the guest left paused, and committed by the peer;
 2. the HA machine is told (`HandoverPrepared`): gate closed, prefix drained (re-announced
    with GRACEFUL_SHUTDOWN, withdrawn only once the upstream gives us the peer's route, or after
    bgp.drain_timeout_s), the guest's traffic that still arrives here forwarded to the peer over
    the inter-site link, lease released, once; this job waits until the lease backend shows it free;
 3. the peer is told (SWITCHOVER on the replication channel); it takes the lease at the
    next generation by the ordinary rules, resumes from that epoch (its hot standby),
    opens and announces;
 4. once the lease backend shows the peer holding a newer generation, this site stops its
    guest and becomes the peer's standby (`demote`), its replica seeded from the paused
    guest's RAM, so the reverse resync sends next to nothing.
If a step fails or the peer has not taken the lease within the timeout, the HA machine is
told (`HandoverAborted`): it takes the lease back (nobody held it since) and the guest runs
on here. Every dependency is injected (tests/test_site_switchover.py runs it on fakes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from geomirror import ha
from geomirror.errors import Refused
from geomirror.site.context import SiteContext
from geomirror.witness import WitnessError
from replication.qemu import GuestError
from replication.transport import ChannelError


class Switchover:
    def __init__(self, ctx: SiteContext, lease, primary: Callable[[], object | None],
                 ha_state: Callable[[], ha.HaState], demote: Callable[[str], Awaitable[None]],
                 poll_s: float = 0.05):
        self.ctx = ctx
        self.lease = lease
        self._primary = primary  # the replication Primary now (None when none runs)
        self._ha_state = ha_state
        self._demote = demote
        self.poll_s = poll_s
        self.running = False

    def _check(self):
        p = self._primary()
        state = self._ha_state()
        if self.running:
            raise Refused("a switchover is already running")
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
        if not await self._wait_lease(lambda st: st.get("holder") != ctx.name or not st.get("valid", True),
                                      deadline):
            await self._abort(primary, f"the lease backend did not show generation {gen} released")
            raise Refused("switchover aborted: the lease was not released in time; the guest runs on here")
        report["fenced_at_ms"] = ms()
        try:
            await primary.announce_switchover(epoch)
        except (ChannelError, OSError) as e:
            await self._abort(primary, f"cannot tell {peer}: {e}")
            raise Refused(f"switchover aborted: cannot tell {peer} ({e}); the guest runs on here") from None
        if not await self._wait_lease(lambda st: st.get("holder") == peer and int(st.get("generation", 0)) > gen
                                      and st.get("valid", True), time.monotonic() + timeout):
            await self._abort(primary, f"{peer} did not take the lease within {timeout:g}s")
            raise Refused(f"switchover aborted: {peer} did not take over within {timeout:g}s; "
                          "the guest runs on here")
        report["peer_holds_lease_at_ms"] = ms()
        ctx.mark("switchover.handed_over", to=peer, epoch=epoch, ms=report["peer_holds_lease_at_ms"])
        await self._demote(f"switchover to {peer}")
        report["standby_at_ms"] = ms()
        ctx.mark("switchover.done", **report)
        return report

    async def _wait_lease(self, ok, deadline: float) -> bool:
        guest = self.ctx.cfg.guest.name
        while time.monotonic() < deadline:
            try:
                if ok(await self.lease.get(guest)):
                    return True
            except WitnessError:
                pass
            await asyncio.sleep(self.poll_s)
        return False

    async def _abort(self, primary, why: str) -> None:
        self.ctx.mark("switchover.aborted", why=why)
        self.ctx.feed(ha.HandoverAborted(time.monotonic(), why))
        await primary.abort_handover()


def on_peer_handover(ctx: SiteContext, epoch: int) -> None:
    """At the standby: the primary handed the guest over at `epoch` (committed here). Take over
    now, by the ordinary rules (a lease at a higher generation; the primary released it)."""
    ctx.mark("switchover.takeover", epoch=epoch, peer=ctx.cfg.peer.name)
    ctx.feed(ha.OperatorPromote(time.monotonic(), False))
