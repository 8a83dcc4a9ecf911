"""The guest operations of a site (the `GuestOps` that `Effects` calls): resume on takeover,
stop, rejoin as the standby (demotion), and what happens when the guest's QEMU is gone.

A part of `SiteDaemon`, kept in its own file: these run across the primary and standby
jobs, role.json and the gate policy, which the daemon owns."""

from __future__ import annotations

import asyncio
import time

import structlog

from geomirror import ha
from geomirror.site.role import GuestRecord
from geomirror.site.standby_side import seed_replica

log = structlog.get_logger(__name__)
Role = ha.Role


class GuestOperations:
    async def resume_guest(self) -> None:
        """Takeover: resume the guest from the replica, then protect it again towards the old
        primary as soon as that comes back as a standby."""
        t0 = time.perf_counter()
        sb = self.standby_side
        try:
            self.timeline.mark("takeover.resume_begin", epoch=sb.committed_epoch)
            self.gatectl.update(guest_here=True, promised=False, session_committing=False)
            guest, timings, run_id = await sb.resume()
        except Exception as e:  # any failure here must reach the HA machine, which fences
            log.exception("takeover.resume_failed", site=self.name)
            self.feed(ha.ResumeFailed(str(e) or type(e).__name__))
            return
        self.takeover_report = {"epoch": sb.committed_epoch, "resume": timings,
                                "resume_ms": round((time.perf_counter() - t0) * 1000, 1)}
        self.primary_side.adopt_resumed(guest, sb.spec, run_id, sb.committed_epoch, sb.take_disk_server())
        self._save_role(Role.PRIMARY, "took the guest over", run_id=run_id, guest=GuestRecord.of(guest))
        self.timeline.mark("takeover.resumed", **timings)
        self.feed(ha.ResumeDone(time.monotonic()))
        self.timeline.mark("reprotect.waiting", peer=self.cfg.peer.name,
                           hint=f"the guest is protected again once {self.cfg.peer.name} runs as the standby")

    async def rejoin(self, reason: str) -> None:
        """Another site runs the guest at a newer generation: become its standby (auto-rejoin)."""
        await self._demote(f"rejoin: {reason}")

    async def stop_guest(self, reason: str) -> None:
        await self.primary_side.stop(reason)
        self._save_role(Role.FENCED, reason, guest=None)

    def _guest_exited(self, rc: int) -> None:
        if self._stop.is_set():
            return
        self.timeline.mark("guest.exited", rc=rc, hint="the guest's QEMU died; this site fences itself and "
                           "releases the lease so the standby can take over at once")
        self.feed(ha.OperatorFence(time.monotonic()))  # close gate, withdraw, release the lease
        self.tasks.spawn(self.stop_guest(f"the guest's QEMU exited with {rc}"), "guest.cleanup")

    async def _demote(self, reason: str) -> None:
        """This site no longer runs the guest (the peer does, at a newer generation): stop it and
        become the peer's standby, the replica seeded from the guest's last RAM."""
        self.timeline.mark("demote.begin", reason=reason)
        ps = self.primary_side
        ram = ps.spec.ram_path if ps.spec else self.cfg.site.run_dir / "guest.ram"
        run_id = ps.run_id or self.role.run_id
        self.gatectl.update(guest_here=False, session_committing=False, promised=False)  # nothing leaves
        await ps.stop(reason)
        if self.standby_side is not None:  # from before a takeover: its files are the guest's RAM now
            await self.standby_side.close()
            self.standby_side = None
        seeded = await asyncio.to_thread(seed_replica, self.cfg, self.specs, run_id, ram)
        self.timeline.mark("demote.seeded" if seeded else "demote.unseeded", source=str(ram),
                           hint="the resync sends only what changed" if seeded else "a full initial sync follows")
        self.feed(ha.BecameStandby(time.monotonic(), reason))
        await self._start_standby()
        self.timeline.mark("demote.done", role=self.role.role.value)


    def _guest_lost_at_start(self, why: str) -> None:
        """The guest this site ran is gone (its QEMU died while no daemon watched it). Booting a new
        one would silently lose its state: fence instead, give the lease back so the peer takes
        over at once from its replica, and (auto-rejoin) become its standby."""
        msg = f"the guest {self.cfg.guest.name} is gone ({why}); not booting a new one: {self.cfg.peer.name} takes over"
        self.effects.alarm(msg)
        self.timeline.mark("guest.lost", why=why, generation=self.ha.generation)
        self.effects.act(ha.ReleaseLease(self.ha.generation))
        self._save_role(Role.FENCED, msg, guest=None)
