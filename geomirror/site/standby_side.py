"""The standby's job: hold the replica, take checkpoints, keep a hot standby QEMU ready,
watch the witness; on takeover, resume the guest from the last committed epoch.

In a planned switchover (checkpoint.handover_forward_frames) the guest's inbound frames are held
at this site's gate from the SWITCHOVER on; after the resume the frames the old primary
forwarded go to the guest first, then those held here, in arrival order."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from geomirror import ha, pairing
from geomirror.site.context import SiteContext
from geomirror.site.disk import close_disk, serve_disk
from geomirror.site.guest_spec import GuestSpecs
from geomirror.site.host import set_tap
from geomirror.witness import WitnessClient, WitnessError
from replication import transport
from replication.nbd import NbdServer
from replication.qemu import Guest, GuestError, GuestSpec
from replication.standby import Standby, resume, start_hot_standby
from replication.store import Replica


def seed_replica(cfg, specs: GuestSpecs, run_id: str, source: Path, progress=None) -> bool:
    """Seed the site's replica from `source`, a RAM image of the guest run `run_id` (this site's
    own last copy after it lost the guest), so the resync from the peer sends only the blocks
    that changed since. Blocking. False if `source` is no such image."""
    size = cfg.guest.memory_mb << 20
    if not (run_id and source.exists() and source.stat().st_size == size):
        return False
    state_dir = Path(cfg.site.state_dir)
    compat = specs.standby(state_dir / "replica" / "ram.img").compat()
    replica = Replica(state_dir / "replica", size)
    replica.open()
    try:
        replica.seed(source, compat, run_id, progress=progress)
    finally:
        replica.close()
    if source.parent == Path(cfg.site.run_dir):  # a former primary's RAM file: stale from now on
        source.unlink(missing_ok=True)
    return True


class StandbySide:
    def __init__(self, ctx: SiteContext, specs: GuestSpecs, witness: WitnessClient | None, on_hot=None):
        self.ctx = ctx
        self.on_hot = on_hot  # callable(Guest | None): the hot standby QEMU started (role.json records it)
        self.specs = specs
        self.witness = witness
        self.replica: Replica | None = None
        self.standby: Standby | None = None
        self.spec: GuestSpec | None = None
        self.hot: Guest | None = None
        # serves the replica disk to the hot standby QEMU (inactive until a takeover: it never
        # writes), and to the guest it resumes, whose writes it records from then on
        self.nbd: NbdServer | None = None
        self._hot_starting = False
        self._hot_task: asyncio.Task | None = None
        self._hot_settled = False  # resume or close began: no hot standby QEMU starts any more
        self._server: asyncio.AbstractServer | None = None
        self._probe: asyncio.Task | None = None
        self._handover_hold = False  # the gate holds inbound frames for a switchover's resume

    async def start(self, hot_record=None) -> None:
        """Open the replica and serve the primary. `hot_record`: the hot standby QEMU a previous
        daemon left running (taken up again if it still waits, else ended and started anew)."""
        ctx, cfg = self.ctx, self.ctx.cfg
        disk = cfg.guest.disk
        if disk is not None and ctx.unsafe_no_disk_replication:
            ctx.mark("disk.replication_disabled", image=str(disk),
                     hint="GEOMIRROR_UNSAFE_NO_DISK_REPLICATION=1: a takeover resumes on this site's stale disk")
            disk = None
        self.replica = Replica(ctx.state_dir / "replica", cfg.guest.memory_mb << 20, disk=disk,
                               writeback_ms=cfg.checkpoint.standby_writeback_ms)
        report = await asyncio.to_thread(self.replica.open)
        ctx.mark("replica.open", committed_epoch=report.committed_epoch, valid=report.valid,
                 recovered=report.recovered)
        self.spec = self.specs.spec(incoming=True, ram_path=self.replica.ram_path, tag="standby",
                                    running_pid=hot_record.pid if hot_record else None)
        expected = {cfg.peer.name}
        hb = cfg.heartbeat
        sb = Standby(self.replica, self.spec.compat(), ctx.name, hb.interval_ms,
                     allowed_peer=lambda ch: pairing.check_peer(ch.ssl_object(), expected),
                     min_timeout_ms=hb.min_timeout_ms, max_timeout_ms=hb.max_timeout_ms)
        sb.generation_fn = ctx.generation
        sb.upstream_fn = ctx.upstream
        sb.on_heartbeat = lambda gen, link, upstream: ctx.feed(
            ha.HeartbeatReceived(time.monotonic(), link.rtt_ms, gen, link.rtt_var_ms, upstream))
        sb.on_commit = self._on_commit
        self.standby = sb
        await set_tap(cfg, False)
        if self.spec.disk_socket is not None:  # before any QEMU of ours connects (a hot standby taken up)
            self.nbd = serve_disk(cfg, self.spec.disk_socket, "standby")
        peer = cfg.peer
        self._server = await transport.serve(str(peer.listen), peer.listen_port, sb.handle,
                                             ssl=ctx.tls.server, max_frame=ctx.max_frame())
        if hot_record is not None:
            await self._take_up_hot(hot_record)
        if self.replica.valid:
            ctx.feed(ha.ReplicaCommitted(self.replica.committed_epoch))
            self._want_hot()
        if self.witness is not None:
            self._probe = ctx.spawn(self._probe_witness(), "standby.probe_witness")

    async def _take_up_hot(self, record) -> None:
        spec = self.spec
        if record.qmp != str(spec.qmp_path) or not self.replica.valid:
            Guest.end_stale(record.pid, record.started_at, Path(record.qmp))
            return
        try:
            g = await Guest.attach(spec, record.pid, record.started_at)
            state = await g.status()
        except GuestError as e:
            self.ctx.mark("standby.hot_lost", pid=record.pid, error=str(e))
            Guest.end_stale(record.pid, record.started_at, Path(record.qmp))
            return
        if state != "inmigrate":
            self.ctx.mark("standby.hot_unusable", pid=record.pid, state=state)
            await g.close()
            return
        self.hot = g
        self.ctx.gate.attach_guest(spec.net_socket)
        self.ctx.mark("standby.hot_attached", pid=g.pid)

    def set_switchover_handler(self, fn) -> None:
        """`fn(epoch)`: the primary handed the guest over at `epoch` (committed here)."""
        if self.standby is not None:
            def on_switchover(epoch: int) -> None:
                if self.ctx.handover_forward_frames:
                    # frames reaching this site before the resume wait for the guest to run, after
                    # those the old primary forwards (older)
                    self._handover_hold = True
                    self.ctx.gate.hold_inbound()
                fn(epoch)
            self.standby.on_switchover = on_switchover

    def _on_commit(self, epoch: int) -> None:
        if self._handover_hold:  # the switchover did not happen: the primary goes on
            self._handover_hold = False
            self.ctx.gate.end_inbound_hold(deliver=False)
        self.ctx.feed(ha.ReplicaCommitted(epoch))
        self._want_hot()

    def _want_hot(self) -> None:
        if self.hot is None and not self._hot_starting and not self._hot_settled:
            self._hot_starting = True
            self._hot_task = self.ctx.spawn(self._ensure_hot(), "standby.hot")

    async def _settle_hot(self) -> None:
        """Before a resume or a close: no hot standby QEMU starts from now on, and one being
        started is waited for (its start ends by its own deadline), so it is either `self.hot` or
        gone. A start that finished after a cold resume began left two QEMUs on the guest's NIC
        socket, and the gate, already dialling that path, relayed the idle one: the resumed
        guest's replies went nowhere. One that finished after a close outlived the daemon."""
        self._hot_settled = True
        task = self._hot_task
        if task is not None and not task.done():
            self.ctx.mark("standby.hot_start_awaited", hint="a hot standby QEMU is starting: it is used or closed")
            await asyncio.wait({task})

    async def _ensure_hot(self) -> None:
        """Keep a QEMU waiting in -incoming defer on the replica, so takeover costs only the device state."""
        try:
            g = await start_hot_standby(self.spec)
            self.hot = g
            self.ctx.gate.attach_guest(self.spec.net_socket)  # fenced: nothing leaves until a takeover
            self.ctx.mark("standby.hot_ready", pid=g.pid)
            if self.on_hot:
                self.on_hot(g)
        except (OSError, asyncio.TimeoutError, ValueError, GuestError) as e:
            self.ctx.mark("standby.hot_failed", error=str(e))
        finally:
            self._hot_starting = False

    async def _probe_witness(self) -> None:
        """The standby learns whether the witness answers (the primary learns it from renewals)."""
        period = self.ctx.cfg.witness.renew_every_ms / 1000
        while True:
            try:
                await self.witness.health()
                self.ctx.feed(ha.WitnessReachable(time.monotonic()))
            except WitnessError as e:
                self.ctx.feed(ha.WitnessUnreachable(time.monotonic(), str(e)))
            await asyncio.sleep(period)

    async def resume(self) -> tuple[Guest, dict, str]:
        """Takeover: stop taking checkpoints, bring the gateway up here, resume the guest from the
        last committed epoch (on the hot standby if it runs). Returns the guest, the timings and
        the run id it continues."""
        if self._probe is not None:
            self._probe.cancel()
        await self.standby.stop_accepting()
        self._server.close()
        await self._settle_hot()
        hot = self.hot if self.hot is not None and self.hot.running else None
        await set_tap(self.ctx.cfg, True)
        guest, timings = await resume(self.replica, self.spec, hot)
        self.ctx.gate.attach_guest(self.spec.net_socket)
        self._deliver_handover_frames()
        self.hot = None
        return guest, timings, self.replica.run_id

    def take_disk_server(self) -> NbdServer | None:
        """After `resume`: the disk server the resumed guest uses, for the primary's side (it records
        the new primary's epochs); this side no longer closes it."""
        nbd, self.nbd = self.nbd, None
        return nbd

    def _deliver_handover_frames(self) -> None:
        """Right after the resume: the frames the old primary forwarded, then those held here."""
        forwarded = self.standby.take_forwarded()
        if forwarded:
            self.ctx.gate.inject_inbound(forwarded)
        held = self.ctx.gate.end_inbound_hold(deliver=True) - len(forwarded) if self._handover_hold else 0
        if self._handover_hold or forwarded:
            self.ctx.mark("switchover.frames_delivered", forwarded=len(forwarded), held_here=max(0, held),
                          dropped=self.standby.status.frames_dropped)
        self._handover_hold = False

    @property
    def committed_epoch(self) -> int:
        return self.replica.committed_epoch if self.replica else 0

    def status(self) -> dict:
        st = self.standby.status
        return {"committed_epoch": self.committed_epoch, "rtt_ms": self.standby.link.as_dict()["rtt_ms"],
                "replication": {"state": st.state, "problem": st.problem, "valid": st.valid, "peer": st.peer,
                                "peer_cert_serial": st.peer_cert_serial, "rejected_frames": st.rejected_frames,
                                "last_apply_ms": round(st.last_apply_ms, 2),
                                "last_journal_ms": round(st.last_journal_ms, 2),
                                "max_journal_ms": round(st.max_journal_ms, 2),
                                "max_apply_ms": round(st.max_apply_ms, 2), "slow_steps": st.slow_steps,
                                "written_epoch": self.replica.written_epoch, "writebacks": self.replica.writebacks,
                                "last_writeback_ms": round(self.replica.last_writeback_ms, 2),
                                "max_writeback_ms": round(self.replica.max_writeback_ms, 2),
                                "hot_standby": self.hot is not None,
                                "verified": st.verified, "verified_bytes": st.verified_bytes,
                                "diverged": st.diverged, "last_divergence": st.last_divergence,
                                "frames_received": st.frames_received, "frames_dropped": st.frames_dropped}}

    async def close(self, *, keep_replica_open: bool = False, keep_hot: bool = False) -> None:
        """Stop being the standby: no server, no hot standby (`keep_hot`: left running for the next
        daemon, which takes it up again); the replica closed unless it is the running guest's RAM."""
        if self._probe is not None:
            self._probe.cancel()
        if self._server is not None:
            self._server.close()
        if self.standby is not None:
            await self.standby.stop_accepting()
        await self._settle_hot()
        if self.hot is not None:
            hot, self.hot = self.hot, None
            if keep_hot:
                await hot.detach()
            else:
                await hot.close()
        close_disk(self.nbd)  # a hot standby left running reconnects to the next daemon's server
        self.nbd = None
        if self.replica is not None and not keep_replica_open:
            self.replica.close()
