"""Carries out the HA machine's actions; what comes of them goes back to it as events.

The machine decides (geomirror/ha.py); this job does: lease calls to the lease backend
(the witness), announce/drain/withdraw through the BGP speaker, the gate's permission through
the gate policy, where the guest's traffic goes (`GuestRoutes`: the TAP here, or forwarded to
the peer), and resume/stop/hand-over of the guest through the daemon's guest operations.
Every dependency is injected, so the sequences are tested on fakes
(tests/test_site_effects.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import structlog
from pyroute2.netlink.exceptions import NetlinkError

from geomirror import ha
from geomirror.site.context import SiteContext
from geomirror.site.gate_policy import GateController
from geomirror.site.routing import guest_prefixes
from geomirror.witness import WitnessError, WitnessUnreachable
from gmbase.errors import GeomirrorError

log = structlog.get_logger(__name__)


class GuestOps(Protocol):
    async def resume_guest(self) -> None: ...  # feeds ResumeDone or ResumeFailed
    async def stop_guest(self, reason: str) -> None: ...
    async def rejoin(self, reason: str) -> None: ...  # stop ours, seed the replica, BecameStandby
    async def hand_over(self, reason: str) -> None: ...  # a planned switchover to the peer


class RouteApplier(Protocol):
    async def apply(self, mode: str) -> None: ...  # raises OSError (NetlinkError) when it cannot


class Effects:
    ROUTE_RETRY_S = 1.0

    def __init__(self, ctx: SiteContext, gatectl: GateController, lease, speaker, guest_ops: GuestOps,
                 routes: RouteApplier | None = None):
        self.ctx = ctx
        self.gatectl = gatectl
        self.lease = lease  # the lease backend (WitnessClient), or None without a witness
        self.speaker = speaker  # bgp.speaker.Speaker, or None with BGP off
        self.guest_ops = guest_ops
        self.announced_prefixes: set[str] = set()  # acknowledged by ExaBGP
        self.backup_prefixes: set[str] = set()  # pre-announced as the backup path, acknowledged
        self._sent: set[str] = set()  # announce sent (the speaker wants them until withdrawn)
        self.protected = False
        self.protection_changes = 0
        self.alarms: list[str] = []
        self.lease_calls = 0
        self.routes = routes  # None: this site's routing is not managed (tests, BGP-less set-ups)
        self.route_mode: str | None = None  # wanted
        self.route_applied: str | None = None
        self._route_task: asyncio.Task | None = None

    @property
    def announced(self) -> bool:
        """Whether this site announces the guest's prefixes (both, for a dual-stack guest)."""
        return set(guest_prefixes(self.ctx.cfg)) <= self.announced_prefixes

    def act(self, a) -> None:
        ctx = self.ctx
        if isinstance(a, ha.Log):
            if a.event == "ha.state":
                ctx.mark("ha.state", **a.fields)
            else:
                log.info(a.event, site=ctx.name, **a.fields)
        elif isinstance(a, ha.Alarm):
            self.alarm(a.message)
        elif isinstance(a, ha.AcquireLease):
            ctx.spawn(self._lease("acquire"), "lease.acquire")
        elif isinstance(a, ha.RenewLease):
            ctx.spawn(self._lease("renew", a.generation), "lease.renew")
        elif isinstance(a, ha.ReleaseLease):
            ctx.spawn(self._lease("release", a.generation), "lease.release")
        elif isinstance(a, ha.ResumeGuest):
            ctx.spawn(self.guest_ops.resume_guest(), "guest.resume")
        elif isinstance(a, ha.StopGuest):
            ctx.spawn(self.guest_ops.stop_guest("another site runs the guest at a newer lease generation"),
                      "guest.stop")
        elif isinstance(a, ha.Rejoin):
            ctx.mark("rejoin.begin", reason=a.reason)
            ctx.spawn(self.guest_ops.rejoin(a.reason), "site.rejoin")
        elif isinstance(a, ha.QueryLease):
            ctx.spawn(self._lease("query"), "lease.query")
        elif isinstance(a, ha.OpenGate):
            ctx.mark("gate.open", generation=a.generation)
            self.gatectl.update(may_release=True)
        elif isinstance(a, ha.CloseGate):
            ctx.mark("gate.close")
            self.gatectl.update(may_release=False)
        elif isinstance(a, ha.Announce):
            ctx.spawn(self._announce(), "bgp.announce")
        elif isinstance(a, ha.PreAnnounce):
            ctx.spawn(self._pre_announce(), "bgp.pre_announce")
        elif isinstance(a, ha.Withdraw):
            ctx.spawn(self._withdraw(), "bgp.withdraw")
        elif isinstance(a, ha.Drain):
            ctx.spawn(self._drain(), "bgp.drain")
        elif isinstance(a, ha.SetGuestRoute):
            self.set_route(a.mode)
        elif isinstance(a, ha.HandOver):
            ctx.mark("upstream_loss.handover", reason=a.reason, peer=ctx.cfg.peer.name)
            ctx.spawn(self.guest_ops.hand_over(a.reason), "switchover.upstream_loss")
        elif isinstance(a, ha.SetProtection):
            self._protection(a.protected)
        else:  # a new action nobody carries out is a bug: say so loudly
            raise TypeError(f"the HA machine emitted {a!r}, which effects does not know")

    def alarm(self, message: str) -> None:
        self.alarms.append(message)
        del self.alarms[:-50]
        log.warning("alarm", site=self.ctx.name, message=message)

    def _protection(self, protected: bool) -> None:
        self.gatectl.protection(protected)
        if protected == self.protected:
            return
        self.protected = protected
        self.protection_changes += 1
        self.ctx.mark("protection.entered" if protected else "protection.left")
        ck = self.ctx.cfg.checkpoint
        if not protected and ck.unreachable_policy == "continue-unprotected":
            self.ctx.spawn(self._grace(ck.unprotected_grace_ms), "gate.grace")

    async def _grace(self, grace_ms: float) -> None:
        """Re-decide the gate when the policy's grace runs out (it reads the elapsed time)."""
        await asyncio.sleep(grace_ms / 1000)
        while not self.protected:
            d = self.gatectl.reapply()
            left = grace_ms - (self.gatectl.inputs.unprotected_ms or 0.0)
            if left <= 0:
                self.ctx.mark("protection.grace_over", grace_ms=grace_ms, gate=d.mode.value, why=d.why)
                return
            # the loop's timer fired a hair early (it runs timers within its clock resolution): the
            # policy, reading the elapsed time, still held; wait out the rest
            await asyncio.sleep(left / 1000)

    async def _lease(self, op: str, generation: int | None = None) -> None:
        if self.lease is None:
            return
        self.lease_calls += 1
        feed, w, guest = self.ctx.feed, self.ctx.cfg.witness, self.ctx.cfg.guest.name
        try:
            if op == "acquire":
                r = await self.lease.acquire(guest, w.lease_ttl_ms)
                if r.ok:
                    self.ctx.mark("lease.granted", generation=r.generation)
                    feed(ha.LeaseGranted(r.generation, r.expires_at, time.monotonic()))
                else:
                    feed(ha.LeaseDenied(r.holder, r.generation))
            elif op == "renew":
                r = await self.lease.renew(guest, generation, w.lease_ttl_ms)
                if r.ok:
                    feed(ha.LeaseRenewed(r.generation, r.expires_at, time.monotonic()))
                else:
                    feed(ha.LeaseLost(r.holder, r.generation))
            elif op == "query":
                st = await self.lease.get(guest)
                holder = st.get("holder") if st.get("valid", True) else None
                feed(ha.LeaseSeen(holder, int(st.get("generation") or 0)))
            else:
                await self.lease.release(guest, generation)
                self.ctx.mark("lease.released", generation=generation)
                self.ctx.released_generation = generation
                self.ctx.lease_released.set()
        except WitnessUnreachable as e:
            feed(ha.WitnessUnreachable(time.monotonic(), str(e)))
        except WitnessError as e:
            log.warning("lease.error", site=self.ctx.name, op=op, error=str(e))

    def set_route(self, mode: str) -> None:
        """Where the guest's traffic goes now: one applier task carries out the latest wish, in order."""
        self.route_mode = mode
        if self.routes is None:
            self.route_applied = mode
            return
        if self._route_task is None or self._route_task.done():
            self._route_task = self.ctx.spawn(self._apply_routes(), "guest.route")

    async def _apply_routes(self) -> None:
        while self.route_mode != self.route_applied:
            mode = self.route_mode
            try:
                await self.routes.apply(mode)
            except (OSError, NetlinkError) as e:  # e.g. the inter-site link is down: try again
                log.warning("guest.route_failed", site=self.ctx.name, mode=mode, error=str(e),
                            retry_s=self.ROUTE_RETRY_S)
                await asyncio.sleep(self.ROUTE_RETRY_S)
                continue
            self.route_applied = mode
            self.ctx.mark("guest.route", mode=mode)

    async def _announce(self) -> None:
        """Announce every guest prefix with the active policy (MED, communities, prepend)."""
        if self.speaker is None:
            return
        prefixes = await self._send(self.ctx.cfg.bgp.active, self.announced_prefixes, self.backup_prefixes,
                                    "announcing")
        if self.announced:
            self.ctx.mark("bgp.announced", prefix=prefixes[0], prefixes=prefixes)

    async def _pre_announce(self) -> None:
        """Announce every guest prefix with the standby's backup policy (bgp.standby_prepend):
        routers keep it as the second path; what arrives by it is forwarded to the peer."""
        policy = self.ctx.cfg.bgp.standby
        if self.speaker is None or policy is None:
            return
        prefixes = await self._send(policy, self.backup_prefixes, self.announced_prefixes, "pre-announcing")
        self.ctx.mark("bgp.pre_announced", prefix=prefixes[0], prefixes=prefixes, prepend=policy.prepend)

    async def _send(self, policy, into: set[str], out_of: set[str], doing: str) -> list[str]:
        """Announce every guest prefix with `policy`; each acknowledged one moves from `out_of`
        to `into`. One that fails is an alarm and the others are still announced."""
        prefixes = guest_prefixes(self.ctx.cfg)
        for prefix in prefixes:
            self._sent.add(prefix)
            try:
                await self.speaker.announce(prefix, policy=policy)
            except (GeomirrorError, OSError) as e:
                self.alarm(f"{doing} {prefix} failed: {e}")
                continue
            into.add(prefix)
            out_of.discard(prefix)
        return prefixes

    async def _drain(self) -> None:
        """Keep the prefix routed here, drained (GRACEFUL_SHUTDOWN), until the peer's route is
        seen: the HA machine then asks for the withdrawal (or after its timeout)."""
        if self.speaker is None or not self._sent:
            return
        b = self.ctx.cfg.bgp
        for prefix in [p for p in guest_prefixes(self.ctx.cfg) if p in self._sent]:
            try:
                await self.speaker.drain(prefix, b.drain)
            except (GeomirrorError, OSError) as e:  # the next step (withdraw) still comes
                self.alarm(f"draining {prefix} failed: {e}")
                continue
            self.ctx.mark("bgp.drained", prefix=prefix)

    async def _withdraw(self) -> None:
        """Withdraw every guest prefix an announcement was sent for."""
        if self.speaker is None or not self._sent:
            return
        prefixes = [p for p in guest_prefixes(self.ctx.cfg) if p in self._sent]
        for prefix in prefixes:
            try:
                await self.speaker.withdraw(prefix)
            except (GeomirrorError, OSError) as e:
                self.alarm(f"withdrawing {prefix} failed: {e}")
                continue
            self._sent.discard(prefix)
            self.announced_prefixes.discard(prefix)
            self.backup_prefixes.discard(prefix)
        if not self._sent:
            self.ctx.mark("bgp.withdrawn", prefix=prefixes[0], prefixes=prefixes)
