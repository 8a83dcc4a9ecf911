"""The primary's job: run the guest here and checkpoint it to the peer, paced.

It boots the guest (or adopts the one a takeover resumed), runs the replication
`Primary` with the pacer choosing each interval, reports sessions to the gate policy
(a session that sealed an epoch holds output for its acks; one that ended without an
ack gives the output back) and watches the guest's QEMU."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import structlog

from geomirror import ha
from geomirror.errors import Refused
from geomirror.site.context import SiteContext
from geomirror.site.disk import close_disk, serve_disk
from geomirror.site.gate_policy import GateController
from geomirror.site.guest_spec import GuestSpecs
from geomirror.site.host import set_tap
from replication import transport
from replication.capture import Capture
from replication.colo import ColoSource
from replication.nbd import NbdServer
from replication.pacer import Pacer, PacerPolicy
from replication.primary import EpochRecord, Primary, PrimaryConfig, pacer_sample
from replication.qemu import Guest, GuestError, GuestSpec

log = structlog.get_logger(__name__)


class PrimarySide:
    def __init__(self, ctx: SiteContext, specs: GuestSpecs, gatectl: GateController, on_guest_exit):
        self.ctx = ctx
        self.specs = specs
        self.gatectl = gatectl
        self.on_guest_exit = on_guest_exit  # callable(rc): the guest's QEMU died
        self.guest: Guest | None = None
        self.spec: GuestSpec | None = None
        self.capture: Capture | None = None
        self.primary: Primary | None = None
        self.nbd: NbdServer | None = None  # serves the guest's disk to its QEMU (guest.disk), records its writes
        self.run_id = ""
        ck = ctx.cfg.checkpoint
        self.pacer_policy = PacerPolicy(
            min_interval_ms=ck.min_interval_ms, max_interval_ms=ck.max_interval_ms,
            latency_budget_ms=ck.latency_budget_ms, max_pause_share=ck.max_pause_share,
            max_wan_bytes_per_s=ck.max_wan_mbit * 1e6 / 8, max_in_flight=ck.max_in_flight,
            idle_interval_ms=ck.idle_interval_ms, outcome_trial=ck.outcome_trial)
        self.pacer = Pacer(self.pacer_policy, ck.interval_ms)
        self.adaptive = ck.adaptive
        self.fixed_interval_ms = float(ck.interval_ms)
        self.alarms: list[str] = []
        self._pacer_logged = 0.0
        self._released_seen = -1  # the gate's epochs_released at the last pacer sample
        self._task: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None

    # ------------------------------------------------------------ guest
    async def boot(self, run_id: str) -> None:
        """Start a fresh guest here (its RAM file new) and protect it."""
        spec = self.specs.primary()
        spec.ram_path.unlink(missing_ok=True)
        self.run_id = run_id or secrets.token_hex(8)
        await set_tap(self.ctx.cfg, True)
        self.nbd = serve_disk(self.ctx.cfg, spec.disk_socket, "primary") if spec.disk_socket else None
        guest = Guest(spec)
        try:
            await guest.start()
        except BaseException:
            close_disk(self.nbd)
            self.nbd = None
            raise
        self.ctx.gate.attach_guest(spec.net_socket)
        await guest.wait_ready()
        self.ctx.mark("guest.ready", accel=spec.accel, memory_mb=spec.memory_mb, pid=guest.pid)
        self.gatectl.update(guest_here=True, promised=True)  # a booted guest speaks only under output commit
        self._adopt(guest, spec)

    async def attach(self, record, run_id: str) -> str | None:
        """A restarted daemon takes up the guest its predecessor ran: the same QEMU (pid, QMP
        socket and RAM file from role.json), its NIC dialled again, a checkpoint the old daemon
        died in the middle of undone (the guest resumed), and replication resumed under the same
        run id, so the standby keeps its replica and resyncs only what changed. Returns None, or
        a sentence saying why the guest cannot be taken up (it is gone)."""
        spec = self.specs.spec(incoming=record.tag == "standby", ram_path=Path(record.ram), tag=record.tag,
                               running_pid=record.pid)
        # QEMU reconnects to the new server on the same socket (reconnect-delay). The writes since the
        # last checkpoint sent were recorded by the old daemon's server and died with it: this
        # session's disk sync by chunk hashes carries them to the standby.
        nbd = serve_disk(self.ctx.cfg, spec.disk_socket, "primary") if spec.disk_socket else None
        try:
            guest = await Guest.attach(spec, record.pid, record.started_at)
            state = await guest.ensure_running()
        except GuestError as e:
            close_disk(nbd)
            return str(e)
        self.nbd = nbd
        self.run_id = run_id
        self.ctx.mark("guest.attached", pid=guest.pid, state_found=state, run_id=run_id,
                      hint="the guest ran on while the daemon was away; its output was held (dropped)")
        await set_tap(self.ctx.cfg, True)
        self.gatectl.update(guest_here=True, promised=True)
        self._adopt(guest, spec)
        return None

    def adopt_resumed(self, guest: Guest, spec: GuestSpec, run_id: str, first_epoch: int,
                      nbd: NbdServer | None = None) -> None:
        """After a takeover: the resumed guest is the only copy; protect it again as soon as the old
        primary comes back as a standby (the gate runs open until a session commits). `nbd`: the
        standby's disk server, which the resumed guest's disk goes through (it records from now on)."""
        self.run_id = run_id
        self.nbd = nbd
        self._adopt(guest, spec, first_epoch)

    def _adopt(self, guest: Guest, spec: GuestSpec, first_epoch: int = 0) -> None:
        self.guest, self.spec = guest, spec
        self.ctx.gate.attach_guest(spec.net_socket)
        self.capture = Capture(spec.ram_path, spec.memory_mb << 20)
        self._begin_replication(first_epoch)
        self._watch = self.ctx.spawn(self._watch_guest(guest), "primary.watch_guest")

    async def _watch_guest(self, guest: Guest) -> None:
        rc = await guest.wait_exit()
        if guest is self.guest:
            self.on_guest_exit(rc)

    # ------------------------------------------------------------ replication
    def _begin_replication(self, first_epoch: int) -> None:
        ctx, cfg = self.ctx, self.ctx.cfg
        ck, hb, peer = cfg.checkpoint, cfg.heartbeat, cfg.peer
        pcfg = PrimaryConfig(site=ctx.name, compat=self.spec.compat(), run_id=self.run_id,
                             interval_ms=ck.interval_ms, max_in_flight=ck.max_in_flight,
                             heartbeat_ms=hb.interval_ms, compression_level=ck.compression_level,
                             min_timeout_ms=hb.min_timeout_ms, max_timeout_ms=hb.max_timeout_ms,
                             verify_bytes_per_epoch=ck.verify_bytes_per_epoch,
                             colo_verify_every=ck.colo_verify_every)

        async def connect():
            return await transport.connect(str(peer.address), peer.port, ssl=ctx.tls.client,
                                           server_hostname=peer.name, max_frame=ctx.max_frame(),
                                           local_addr=(str(peer.listen), 0))

        nbd = self.nbd
        if nbd is not None and ctx.unsafe_no_disk_replication:
            log.warning("disk.replication_disabled", site=ctx.name, image=str(nbd.image),
                        hint="GEOMIRROR_UNSAFE_NO_DISK_REPLICATION=1: a takeover resumes on a stale disk")
            nbd = None
        colo = ColoSource(self.guest, self.capture.size) if ck.capture == "colo" else None
        p = Primary(pcfg, self.guest, self.capture, ctx.gate, connect, interval_fn=self._next_interval, nbd=nbd,
                    wake_fn=self._wake_at, colo=colo)
        # Epoch numbers only grow at a site, across primaries: the gate tags held frames with
        # them, and a replica (here or at the peer) rejects anything not after its committed one.
        p.status.epoch = max(ctx.gate.current_epoch, first_epoch)
        p.generation_fn = ctx.generation
        p.upstream_fn = ctx.upstream
        p.forward_frames_fn = lambda: ctx.handover_forward_frames
        p.on_heartbeat = lambda gen, link, upstream: ctx.feed(
            ha.HeartbeatReceived(time.monotonic(), link.rtt_ms, gen, link.rtt_var_ms, upstream))
        p.on_commit = lambda epoch: ctx.feed(ha.StandbyReady(epoch))
        p.on_session_commits = lambda: self.gatectl.update(session_committing=True)
        p.on_session_ended = lambda acked: self.gatectl.update(
            session_committing=False, promised=self.gatectl.inputs.promised or acked)
        self.primary = p
        self._task = ctx.spawn(p.run(), "primary.run")

    def _next_interval(self, primary: Primary, rec: EpochRecord | None) -> float:
        """The pacer's interval (or the fixed one), fed with what the last epoch measured."""
        if not self.adaptive:
            return self.fixed_interval_ms
        if rec is None:
            return self.pacer.interval_ms
        link, gate = primary.link, self.ctx.gate.stats
        before = self.pacer.last.reason if self.pacer.last else None
        # the gate reports its last release until the next one: the pacer takes each once
        released, self._released_seen = gate.epochs_released != self._released_seen, gate.epochs_released
        now = time.monotonic()
        # the outcome trial counts the frames coming in (the clients' requests: 1.02 a request in
        # the lab, where the frames going out ran 1.01-1.19 a request, more at longer intervals)
        d = self.pacer.update(pacer_sample(rec, link, primary.status.in_flight,
                                           release_offset_ms=gate.last_release_offset_ms,
                                           quiet_ms=gate.last_quiet_ms, reply_ms=gate.last_reply_ms,
                                           released=released, now_s=now, frames=gate.frames_in))
        if d.reason != before and now - self._pacer_logged >= 10.0:
            # at most one line per 10 s: near a boundary the reason may flip every few epochs
            # (the status output always shows the current one)
            self._pacer_logged = now
            log.info("pacer.reason", site=self.ctx.name, interval_ms=round(d.interval_ms, 1),
                     target_ms=round(d.target_ms, 1), reason=d.reason, detail=d.detail)
        if d.infeasible:
            self.alarms.append(d.infeasible)
            del self.alarms[:-50]
            log.warning("pacer.budget_infeasible", site=self.ctx.name, message=d.infeasible)
        return d.interval_ms

    def _wake_at(self, first_held_ms: float) -> float | None:
        """When an epoch the pacer lengthened for an idle guest ends, now that output is held."""
        return self.pacer.wake_at(first_held_ms) if self.adaptive else None

    def set_checkpoint(self, adaptive: bool | None = None, interval_ms: float | None = None) -> dict:
        """Operator tuning at run time: adaptive pacing, or a fixed interval."""
        if interval_ms is not None:
            p = self.ctx.cfg.checkpoint
            if not isinstance(interval_ms, (int, float)) or not p.min_interval_ms <= interval_ms <= p.max_interval_ms:
                raise Refused(f"interval {interval_ms!r} ms is outside {p.min_interval_ms:g}..{p.max_interval_ms:g}"
                              " (checkpoint.min_interval_ms..max_interval_ms)")
            self.fixed_interval_ms = float(interval_ms)
        if adaptive is not None:
            self.adaptive = bool(adaptive)
        self.ctx.mark("checkpoint.policy", adaptive=self.adaptive, fixed_interval_ms=self.fixed_interval_ms)
        return {"adaptive": self.adaptive, "fixed_interval_ms": self.fixed_interval_ms}

    @property
    def protected(self) -> bool:
        return self.primary is not None and self.primary.status.state == "protected"

    # ------------------------------------------------------------ ending
    async def stop_replication(self) -> None:
        if self.primary is not None:
            self.primary.stop()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.primary, self._task = None, None

    async def stop(self, reason: str) -> None:
        """This site no longer runs the guest: stop replicating and stop its QEMU (its RAM file
        stays: it seeds the replica if this site becomes the standby)."""
        await self.stop_replication()
        guest, self.guest = self.guest, None
        if self._watch is not None:
            self._watch.cancel()
        dropped = self.ctx.gate.end_inbound_hold(deliver=False)  # a handover's, not forwarded in time
        if dropped:
            self.ctx.mark("gate.inbound_dropped", frames=dropped, reason=reason)
        self.ctx.gate.detach_guest()
        if guest is not None:
            self.ctx.mark("guest.stop", reason=reason, pid=guest.pid)
            await guest.close()
        close_disk(self.nbd)  # after QEMU: nothing writes the disk any more (it becomes the replica's)
        self.nbd = None
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        self.gatectl.update(guest_here=False, session_committing=False)

    async def detach(self) -> int | None:
        """The daemon stops but the guest must not (a restart, an upgrade): stop replicating, let go
        of QMP and leave QEMU running. Returns its pid."""
        if self.primary is not None:
            try:  # QEMU leaves COLO and runs on alone (else the next daemon's attach ends it)
                await self.primary.end_colo()
            except GuestError as e:
                log.warning("primary.colo_end_failed", error=str(e))
        await self.stop_replication()
        if self._watch is not None:
            self._watch.cancel()
        guest, self.guest = self.guest, None
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        close_disk(self.nbd)  # QEMU waits for the next daemon's server (reconnect-delay)
        self.nbd = None
        if guest is None:
            return None
        await guest.detach()
        return guest.pid

    def status(self) -> dict:
        p = self.primary.summary()
        d = self.pacer.last
        pol = self.pacer_policy
        return {
            "committed_epoch": p["committed_epoch"], "interval_ms": round(p["interval_ms"], 1),
            "rtt_ms": p["rtt_ms"], "path_rtt_ms": p["path_rtt_ms"], "last_pause_ms": round(p["last_pause_ms"], 2),
            "backlog_epochs": p["backlog_epochs"], "replication": p,
            "pacer": {"adaptive": self.adaptive, "interval_ms": round(p["interval_ms"], 1),
                      "reason": (d.reason if d else "initial") if self.adaptive else "fixed",
                      "detail": (d.detail if d else "") if self.adaptive else "fixed by the operator",
                      "target_ms": round(d.target_ms, 1) if d and self.adaptive else None,
                      "expected_latency_ms": round(d.expected_latency_ms, 1) if d else None,
                      "budgets": {"latency_ms": pol.latency_budget_ms, "max_pause_share": pol.max_pause_share,
                                  "idle_interval_ms": pol.idle_interval_ms, "outcome_trial": pol.outcome_trial,
                                  "max_wan_mbit": pol.max_wan_bytes_per_s * 8 / 1e6,
                                  "interval_ms": [pol.min_interval_ms, pol.max_interval_ms]}},
        }
