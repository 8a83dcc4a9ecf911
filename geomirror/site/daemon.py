"""One site's service: lifecycle, the HA machine, the jobs, the operator's entry points.

The HA machine (geomirror/ha.py) decides; `Effects` carries out its actions; the jobs
(`PrimarySide`, `StandbySide`, `Switchover`) do the work and report back as events
through the `SiteContext`. This class only wires them and owns what lives as long as the
daemon: the machine, the task registry, the gate and its policy, the lease client, the
BGP speaker and role.json.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import structlog
from prometheus_client import CollectorRegistry

from bgp.speaker import Speaker
from geomirror import control, ha, pairing
from geomirror.drill.store import DrillCollector, DrillStore
from geomirror.errors import Refused
from geomirror.lease import LeaseBackend, LeaseError, make_lease_backend
from geomirror.site.context import SiteContext, Tasks, Timeline
from geomirror.site.disk import unsafe_no_disk_replication
from geomirror.site.effects import Effects
from geomirror.site.gate_policy import GateController, GateInputs, UnreachablePolicy
from geomirror.site.guest_ops import GuestOperations
from geomirror.site.guest_spec import GuestSpecs
from geomirror.site.host import TAP_NAME, GuestRoutes
from geomirror.site.primary_side import PrimarySide
from geomirror.site.role import GuestRecord, RoleState, RoleStore
from geomirror.site.routing import start_speaker
from geomirror.site.standby_side import StandbySide
from geomirror.site.status import LoopLag, SiteStatus, StatusCollector, build_status
from geomirror.site.switchover import Switchover, on_peer_handover
from replication.gate import GateMode, UserspaceGate, boottime, open_tap

log = structlog.get_logger(__name__)
Role = ha.Role


class SiteDaemon(GuestOperations):
    def __init__(self, cfg):
        self.cfg = cfg
        self.name = cfg.site.name
        self.timeline = Timeline(self.name)
        self.tasks = Tasks(self.name)
        self.roles = RoleStore(cfg.site.state_dir, cfg.site.initial_role)
        self.role = RoleState(Role(cfg.site.initial_role))
        self.ha: ha.HaMachine | None = None
        self.ctx: SiteContext | None = None
        self.gatectl: GateController | None = None
        self.specs: GuestSpecs | None = None
        self.effects: Effects | None = None
        self.primary_side: PrimarySide | None = None
        self.standby_side: StandbySide | None = None
        self.switchover_job: Switchover | None = None
        self.witness: LeaseBackend | None = None
        self.speaker: Speaker | None = None
        self.tls: pairing.TlsIdentity | None = None
        self.takeover_report: dict | None = None
        self.unsafe_no_output_commit = os.environ.get("GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT") == "1"
        self.unsafe_no_disk_replication = unsafe_no_disk_replication()
        self.loop_lag = LoopLag()
        self._deadline_for: tuple[float | None, float | None] = (None, None)  # (expires_at, on CLOCK_BOOTTIME)
        self._stop = asyncio.Event()
        self.metrics_registry = CollectorRegistry()
        self.metrics_registry.register(StatusCollector(self.site_status))
        self.drills = DrillStore(cfg.site.state_dir / "drills", keep=cfg.drill.keep)  # reports, the claim
        self.metrics_registry.register(DrillCollector(self.drills))

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        cfg = self.cfg
        for d in (cfg.site.state_dir, cfg.site.run_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        cfg.check_files()
        self.role = self.roles.load()  # a corrupt role.json refuses the start, before anything runs
        t = cfg.tls
        self.tls = pairing.TlsIdentity(t.ca, t.cert, t.key, self.name, scratch_dir=cfg.site.run_dir)
        token = control.load_or_create_token(self._token_path())
        app = control.make_app(self, token, peer_name=cfg.peer.name, drills_dir=cfg.site.state_dir / "drills")
        runner = await control.start(app, str(cfg.control.listen), cfg.control.port,
                                     cfg.site.run_dir / "control.sock")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload_tls(reason="SIGHUP"))
        try:
            await self._start()
            await self._stop.wait()
        finally:
            await self.shutdown()
            await runner.cleanup()

    async def _start(self) -> None:
        cfg, role = self.cfg, self.role
        self.timeline.mark("daemon.start", role=role.role.value, lease_generation=role.lease_generation,
                           guest_pid=role.guest.pid if role.guest else None)
        for key, problem in cfg.warnings:  # e.g. a prefix longer than the Internet accepts
            log.warning("config.warning", site=self.name, file=str(cfg.path), key=key, problem=problem)
        gate = UserspaceGate(None, open_tap(TAP_NAME), mode=GateMode.FENCED,  # it dials each guest's NIC
                             pass_through=cfg.checkpoint.pass_through)
        self.ctx = SiteContext(cfg, self.tls, gate, self.feed, lambda: self.ha.generation, self.timeline,
                               self.tasks, self.unsafe_no_output_commit, self.upstream_status,
                               unsafe_no_disk_replication=self.unsafe_no_disk_replication)
        if self.unsafe_no_output_commit:
            log.warning("gate.output_commit_disabled", site=self.name,
                        hint="GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT=1: clients can see state the standby never got")
        ck = cfg.checkpoint
        self.gatectl = GateController(gate, GateInputs(
            policy=UnreachablePolicy(ck.unreachable_policy), grace_ms=ck.unprotected_grace_ms,
            unsafe=self.unsafe_no_output_commit))
        await gate.start()
        self.specs = GuestSpecs(cfg, cfg.site.run_dir)
        self.witness = make_lease_backend(cfg, self.tls)  # the witness or etcd: [lease] backend
        self.primary_side = PrimarySide(self.ctx, self.specs, self.gatectl, self._guest_exited)
        ha_role, lost = role.role, None
        if role.role is Role.PRIMARY and role.guest is not None:  # a restart: take up the running guest
            lost = await self.primary_side.attach(role.guest, role.run_id)
            if lost is not None:
                ha_role = Role.FENCED
        fenced_guest = role.role is Role.FENCED and role.guest is not None  # fenced by the operator, guest kept
        if fenced_guest and await self.primary_side.attach(role.guest, role.run_id) is not None:
            fenced_guest = False
            self._save_role(Role.FENCED, "the fenced guest's QEMU was gone at start", guest=None)
        self.ha = ha.HaMachine(ha_role, ha.HaConfig.from_site_config(cfg), generation=role.lease_generation,
                               guest_here=(ha_role is Role.PRIMARY) or fenced_guest,  # `promote` may reopen it
                               fenced_by_operator=lost is None)
        self.gatectl.update(ha_state=self.ha.state)
        self.effects = Effects(self.ctx, self.gatectl, self.witness, self.speaker, self, GuestRoutes(cfg))
        self.effects.act(ha.SetGuestRoute(self.ha.guest_route()))  # later changes come from the machine
        self.switchover_job = Switchover(self.ctx, self.witness, lambda: self._primary(),
                                         lambda: self.ha.state, self._demote,
                                         peer_generation=lambda: self.ha.seen_generation,
                                         lease_ttl_s=cfg.witness.lease_ttl_ms / 1000 if cfg.witness else 0.0)
        self.speaker = await start_speaker(cfg, self.feed, mark=self.timeline.mark)
        self.effects.speaker = self.speaker
        if lost is not None:
            self._guest_lost_at_start(lost)
        elif role.role is Role.PRIMARY and role.guest is not None:
            self._save_role(Role.PRIMARY, "took up the running guest after a restart")
        elif role.role is Role.PRIMARY:
            await self._boot_primary()
        elif role.role is Role.STANDBY:
            await self._start_standby(role.guest)
        self.tasks.spawn(self._ha_loop(), "ha.loop")
        self.tasks.spawn(pairing.watch_identity(self.tls, lambda: self.reload_tls("files changed")), "tls.watch")
        self.tasks.spawn(self.loop_lag.run(), "loop_lag")
        if self.witness is not None and len(cfg.lease.endpoints) > 1:
            self.tasks.spawn(self._watch_lease_members(), "lease.members")

    async def _watch_lease_members(self, period_s: float = 2.0) -> None:
        """A member of the lease cluster that stops answering is an alarm at both sites, though
        the lease still works through the others (requests go to one member at a time, so a
        primary renewing through its own member would not notice another's loss by itself)."""
        while True:
            try:
                await self.witness.health()
            except LeaseError:
                pass  # no member answers: the lease calls themselves report it to the HA machine
            await asyncio.sleep(period_s)

    def _token_path(self):
        p = self.cfg.control.token_file
        return p if p.is_absolute() else self.cfg.site.state_dir / p

    def _save_role(self, role: Role | None = None, reason: str = "", **changes) -> None:
        fields = {"lease_generation": self.ha.generation if self.ha else self.role.lease_generation, **changes}
        if role is not None:
            fields["role"] = role
        if reason:
            fields["reason"] = reason
        self.role = self.roles.save(RoleState(**{**self.role.__dict__, **fields}))

    def _primary(self):
        return self.primary_side.primary if self.primary_side else None

    async def _boot_primary(self) -> None:
        await self.primary_side.boot("")
        self._save_role(Role.PRIMARY, "booted the guest", run_id=self.primary_side.run_id,
                        guest=GuestRecord.of(self.primary_side.guest))

    async def _start_standby(self, hot_record: GuestRecord | None = None) -> None:
        self.standby_side = StandbySide(self.ctx, self.specs, self.witness, on_hot=self._on_hot)
        await self.standby_side.start(hot_record)
        self.standby_side.set_switchover_handler(lambda epoch: on_peer_handover(self.ctx, epoch))
        self._save_role(Role.STANDBY, guest=GuestRecord.of(self.standby_side.hot) if self.standby_side.hot else None)

    def _on_hot(self, guest) -> None:
        if self.role.role is Role.STANDBY:
            self._save_role(guest=GuestRecord.of(guest))

    # ------------------------------------------------------------ the HA machine
    async def _ha_loop(self) -> None:
        period = self.cfg.heartbeat.interval_ms / 1000 / 2
        while True:
            self.feed(ha.Tick(time.monotonic()))
            await asyncio.sleep(period)

    def feed(self, event) -> None:
        if self.ha is None:
            return
        gen_before = self.ha.generation
        for action in self.ha.handle(event):
            self.effects.act(action)
        until = self._release_deadline()
        if self.gatectl.inputs.ha_state is not self.ha.state or self.gatectl.inputs.until != until:
            self.gatectl.update(ha_state=self.ha.state, until=until)
        if self.ha.generation != gen_before:
            self._save_role()

    def _release_deadline(self) -> float | None:
        """The moment the gate must stop releasing on its own (CLOCK_BOOTTIME): the HA machine's
        fence deadline of the lease it holds. None without a lease (no witness, forced)."""
        m = self.ha
        if not m.holding or m.expires_at is None:
            return None
        if self._deadline_for[0] != m.expires_at:  # converted once per grant or renewal, not per event
            deadline = m.expires_at - m.config.fence_margin_ms / 1000  # on time.monotonic()
            self._deadline_for = (m.expires_at, boottime() + (deadline - time.monotonic()))
        return self._deadline_for[1]

    # ------------------------------------------------------------ operator
    async def promote(self, force: bool = False, timeout: float = 60.0) -> dict:
        if self.ha.state in ha.ACTIVE:
            raise Refused(f"site {self.name} already runs the guest ({self.ha.state.value})")
        self.feed(ha.OperatorPromote(time.monotonic(), force))
        deadline = time.monotonic() + timeout
        while self.ha.state not in ha.ACTIVE and time.monotonic() < deadline:  # a takeover resumed, or a
            await asyncio.sleep(0.05)  # fenced primary reopened: either way it releases output now
        if self.ha.state not in ha.ACTIVE:
            alarms = self.effects.alarms
            raise Refused(f"promote did not complete in {timeout:.0f}s: "
                          + (alarms[-1] if alarms else f"HA state {self.ha.state.value}"))
        return {**(self.takeover_report or {}), "state": self.ha.state.value,
                "lease_generation": self.ha.generation}

    async def switchover(self, timeout: float = 15.0) -> dict:
        return await self.switchover_job.run(timeout)

    async def hand_over(self, reason: str) -> None:
        """The HA machine asks for a planned switchover (its upstream is lost): run it, and say
        so when it cannot (the guest runs on here; the machine's hold-down spaces the retries)."""
        try:
            report = await self.switchover_job.run()
        except Refused as e:
            self.effects.alarm(f"handover for upstream loss refused: {e}")
            self.timeline.mark("upstream_loss.handover_refused", reason=reason, error=str(e))
            return
        self.timeline.mark("upstream_loss.handed_over", reason=reason, to=report["to"],
                           epoch=report["final_epoch"])

    def upstream_status(self) -> int | None:
        """For the peer, in heartbeats: ms some BGP session has been up here without a break."""
        if self.speaker is None or self.ha is None:
            return None
        return self.ha.upstream_status(time.monotonic())

    async def fence(self, reason: str = "operator") -> dict:
        self.timeline.mark("fence", reason=reason)
        self.feed(ha.OperatorFence(time.monotonic()))
        self._save_role(Role.FENCED, f"fenced by the {reason}")
        return self.site_status().as_dict()

    def set_checkpoint(self, adaptive: bool | None = None, interval_ms: float | None = None,
                       handover_forward_frames: bool | None = None) -> dict:
        if handover_forward_frames is not None:  # read by either side at its next switchover
            self.ctx.handover_forward_frames = handover_forward_frames
            self.timeline.mark("checkpoint.handover_forward_frames", enabled=handover_forward_frames)
            if adaptive is None and interval_ms is None:
                return {"handover_forward_frames": handover_forward_frames}
        if self.primary_side is None or self.primary_side.primary is None:
            raise Refused(f"site {self.name} takes no checkpoints now ({self.ha.state.value}): "
                          "tune the checkpoint interval at the site that runs the guest")
        return self.primary_side.set_checkpoint(adaptive, interval_ms)

    def reload_tls(self, reason: str = "operator") -> dict | None:
        """Take up a rotated certificate: new connections (to the peer, from the peer, to the
        witness) present it; established ones carry on, so protection never stops. None if the
        new files are refused (logged; the previous certificate stays)."""
        return pairing.reload_logged(self.tls, reason, log, on_reload=lambda info: self.timeline.mark(
            "tls.reloaded", reason=reason, serial=info["serial"], previous_serial=info["previous_serial"],
            not_after=info["not_after"]))

    async def shutdown(self) -> None:
        self.timeline.mark("daemon.stop", role=self.role.role.value)
        await self.tasks.cancel_all()
        if self.speaker is not None:
            try:
                await asyncio.wait_for(self.speaker.stop(withdraw=True), 10)
            except (asyncio.TimeoutError, OSError) as e:
                log.warning("bgp.stop_failed", site=self.name, error=str(e) or type(e).__name__)
        if self.witness is not None:
            await self.witness.close()
        left = []
        if self.primary_side is not None and self.primary_side.guest is not None:
            pid = await self.primary_side.detach()
            left.append(f"the guest's QEMU (pid {pid})")
        if self.standby_side is not None:
            hot = self.standby_side.hot
            await self.standby_side.close(keep_hot=True)
            if hot is not None:
                left.append(f"the hot standby QEMU (pid {hot.pid})")
        if left:
            lease = self.cfg.witness.lease_ttl_ms / 1000 if self.cfg.witness else None
            log.warning("daemon.leaves_running", site=self.name, running=", ".join(left),
                        hint="a restarted daemon takes them up again; the guest's output is held meanwhile"
                        + (f"; if no daemon is back within the lease ({lease:g} s), {self.cfg.peer.name} takes "
                           "over and this site rejoins as its standby" if lease and self.role.role is Role.PRIMARY
                           else ""))
        if self.ctx is not None:
            await self.ctx.gate.close()

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        return self.site_status().as_dict()

    def site_status(self) -> SiteStatus:
        return build_status(self)
