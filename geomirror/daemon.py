"""One site's service: wires the gate, the guest, replication, the witness, BGP and the
HA state machine, and serves the control API.

The HA machine (geomirror/ha.py) decides; this module carries out its actions (lease
calls, resume, gate, announce/withdraw) and feeds it events (ticks, heartbeats,
commits, lease answers, BGP changes, operator commands). The role and the lease
generation are persisted in state_dir/role.json so a restarted daemon neither forgets
that it took over nor reuses a stale generation.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import time
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pyroute2 import IPRoute

from geomirror import control, ha
from geomirror.errors import GeomirrorError
from gmbase.files import atomic_write
from replication import transport
from replication.capture import Capture
from replication.gate import GateMode, UserspaceGate, open_tap
from replication.primary import Primary, PrimaryConfig
from replication.qemu import Guest, GuestSpec, detect_accel
from replication.standby import Standby, resume, start_hot_standby
from replication.store import Replica

log = structlog.get_logger(__name__)

TAP_NAME = "gm-guest0"
GATEWAY_MAC = "02:47:4d:00:00:01"  # the same at both sites: the guest's ARP entry survives failover


def configure_tap(name: str, gateway: str, prefixlen: int, up: bool) -> None:
    """Give the site-side TAP the guest gateway address (or take it away). Blocking: run in a thread."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=idx, address=GATEWAY_MAC)
        have = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)]
        if up:
            if gateway not in have:
                ip.addr("add", index=idx, address=gateway, prefixlen=prefixlen)
            ip.link("set", index=idx, state="up")
        else:
            ip.link("set", index=idx, state="down")
            if gateway in have:
                ip.addr("del", index=idx, address=gateway, prefixlen=prefixlen)


def rejoin(cfg, *, seed: bool = True, progress: bool | None = None) -> str:
    """Make a site that lost the guest (crashed, fenced, or taken over from) start next time as
    the standby of its peer, which now runs the guest. Offline: the daemon must be stopped.

    Its last RAM image of the guest (run_dir/guest.ram, if it survived) seeds the replica, so
    the resync sends only the blocks that changed since the takeover; without it, a full
    initial sync. Returns what was done, as a sentence."""
    import socket as _socket

    from replication.progress import Progress

    state_dir, run_dir = Path(cfg.site.state_dir), Path(cfg.site.run_dir)
    ctl = run_dir / "control.sock"
    if ctl.exists():
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            s.connect(str(ctl))
            raise RejoinError(f"the daemon of {cfg.site.name} is running ({ctl} answers): stop it first")
        except OSError:
            pass  # a stale socket of a dead daemon
        finally:
            s.close()
    try:
        saved = json.loads((state_dir / "role.json").read_text())
    except FileNotFoundError:
        saved = {}
    except ValueError as e:
        raise RejoinError(f"{state_dir / 'role.json'} is not valid JSON ({e}); remove it to start afresh") from None
    role = saved.get("role") or cfg.site.initial_role
    if role == "standby":
        return f"{cfg.site.name} is already a standby; nothing to do"
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    run_id = saved.get("run_id", "")
    size = cfg.guest.memory_mb << 20
    source = run_dir / "guest.ram"
    how = "it will take a full initial sync"
    if seed and source.exists():
        site = SiteDaemon(cfg)
        site.run_id = run_id
        bar = Progress(f"seeding the replica from {source}", size, event="rejoin.seed_progress", bar=progress)
        try:
            seeded = site.seed_replica(source, progress=lambda n: bar.update(n, n))
        except BaseException:
            bar.abandon()
            raise
        if seeded:
            bar.finish()
            how = (f"its replica is seeded from its last RAM image ({size >> 20} MB), so the resync sends only "
                   "the blocks that changed since")
        else:
            bar.abandon()
            how += f" ({source} is not a RAM image of this guest run)"
    write_role(state_dir, "standby", int(saved.get("lease_generation", 0)), run_id, rejoined_from=role)
    log.info("rejoin", site=cfg.site.name, was=role, seeded="seeded" in how)
    return (f"{cfg.site.name} (was {role}) will start as the standby of {cfg.peer.name}; {how}. "
            "Start its daemon.")


def write_role(state_dir: Path, role: str, lease_generation: int, run_id: str, **extra) -> None:
    """state_dir/role.json, atomically and durably (0600): what this site runs after a restart."""
    atomic_write(state_dir / "role.json", json.dumps({"role": role, "lease_generation": lease_generation,
                                                     "run_id": run_id, "at": time.time(), **extra}))


class RejoinError(GeomirrorError):
    """The site cannot be turned into a standby now."""


class SiteDaemon:
    def __init__(self, cfg):
        self.cfg = cfg
        self.name = cfg.site.name
        self.state_dir = Path(cfg.site.state_dir)
        self.run_dir = Path(cfg.site.run_dir)
        self.role = "starting"  # what runs here: primary | standby | active | fenced | failed
        self.guest: Guest | None = None
        self.hot: Guest | None = None
        self.gate: UserspaceGate | None = None
        self.primary: Primary | None = None
        self.standby: Standby | None = None
        self.replica: Replica | None = None
        self.capture: Capture | None = None
        self.witness = None
        self.speaker = None
        self.ha: ha.HaMachine | None = None
        self.run_id = ""
        self.announced = False
        self.protected = False
        self.protection_changes = 0
        self.takeover_report: dict | None = None
        self.timeline: list[dict] = []
        self.alarms: list[str] = []
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._resumed = asyncio.Event()
        self._lease_busy = False
        self._unprotected_task: asyncio.Task | None = None
        self._t0 = time.monotonic()
        self.metrics_registry = CollectorRegistry()
        self.metrics_registry.register(_Collector(self))

    # ------------------------------------------------------------ paths & spec
    @property
    def net_socket(self) -> Path:
        return self.run_dir / "guest-net.sock"

    def guest_spec(self, *, incoming: bool, ram_path: Path, tag: str) -> GuestSpec:
        g = self.cfg.guest
        kernel, initrd = g.kernel, g.initrd
        from geomirror.image import build_image, default_cmdline

        if not kernel:
            if getattr(self, "_image", None) is None:  # resolved once per daemon (it asks apt)
                self._image = build_image(progress=False)
            kernel, initrd = self._image.kernel, self._image.initrd
        append = default_cmdline(str(g.address), g.prefix.prefixlen, str(g.gateway))
        if g.append:
            append += " " + g.append
        accel = detect_accel() if g.accel == "auto" else g.accel
        return GuestSpec(name=g.name, memory_mb=g.memory_mb, kernel=Path(kernel), initrd=Path(initrd),
                         append=append, ram_path=ram_path, qmp_path=self.run_dir / f"qmp-{tag}.sock",
                         serial_path=self.run_dir / f"serial-{tag}.log", net_socket=self.net_socket,
                         mac=g.mac, vcpus=g.vcpus, machine=_machine(g.machine), accel=accel, incoming=incoming)

    # ------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        for d in (self.state_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        self.cfg.check_files()
        from geomirror import pairing

        t = self.cfg.tls
        self.tls = pairing.TlsIdentity(t.ca, t.cert, t.key, self.name, scratch_dir=self.run_dir)
        token = control.load_or_create_token(self._token_path())
        runner = await control.start(control.make_app(self, token), str(self.cfg.control.listen),
                                     self.cfg.control.port, self.run_dir / "control.sock")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload_tls(reason="SIGHUP"))
        saved = self._load_role()
        role = saved.get("role") or self.cfg.site.initial_role
        self.run_id = saved.get("run_id", "")
        generation = int(saved.get("lease_generation", 0))
        self._mark("daemon.start", role=role, lease_generation=generation)
        ha_role = {"active": "primary", "failed": "fenced"}.get(role, role)
        self.ha = ha.HaMachine(ha_role, ha.HaConfig.from_site_config(self.cfg), generation=generation)
        try:
            await self._start_gate()
            self._start_witness()
            await self._start_bgp()
            if role in ("primary", "active"):
                await self.start_primary(fresh=role == "primary")
            elif role in ("fenced", "failed"):
                self.role = role
                self.gate.set_mode(GateMode.FENCED)
            else:
                await self.start_standby()
            self._tasks.append(asyncio.create_task(self._ha_loop()))
            self._tasks.append(asyncio.create_task(self._watch_tls()))
            await self._stop.wait()
        finally:
            await self.shutdown()
            await runner.cleanup()

    def _token_path(self) -> Path:
        p = Path(self.cfg.control.token_file)
        return p if p.is_absolute() else self.state_dir / p

    def _load_role(self) -> dict:
        try:
            return json.loads((self.state_dir / "role.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    def _save_role(self, role: str | None = None) -> None:
        if role:
            self.role = role
        write_role(self.state_dir, self.role, self.ha.generation if self.ha else 0, self.run_id)

    def seed_replica(self, source: Path, progress=None) -> bool:
        """Seed this site's replica from `source`, a RAM image of the current guest run (blocking;
        the daemon runs it in a thread). False if `source` is no such image."""
        size = self.cfg.guest.memory_mb << 20
        if not (self.run_id and source.exists() and source.stat().st_size == size):
            return False
        compat = self.guest_spec(incoming=True, ram_path=self.state_dir / "replica" / "ram.img",
                                 tag="standby").compat()
        replica = Replica(self.state_dir / "replica", size)
        replica.open()
        try:
            replica.seed(source, compat, self.run_id, progress=progress)
        finally:
            replica.close()
        if source.parent == self.run_dir:  # a former primary's RAM file: stale from now on
            source.unlink(missing_ok=True)
        return True

    def _mark(self, event: str, **fields) -> None:
        """A timeline entry (also a log line): what happened, when, since the daemon started."""
        self.timeline.append({"t": round(time.monotonic() - self._t0, 3), "wall": time.time(), "event": event,
                              **fields})
        del self.timeline[:-300]
        log.info(event, site=self.name, **fields)

    async def _start_gate(self) -> None:
        fd = open_tap(TAP_NAME)
        mode = GateMode.HOLD
        self.unsafe_no_output_commit = os.environ.get("GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT") == "1"
        if self.unsafe_no_output_commit:
            # Only for proving that the torture test has teeth: output leaves before the ack.
            log.warning("gate.output_commit_disabled", site=self.name,
                        hint="GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT=1: clients can see state the standby never got")
            mode = GateMode.OPEN
        self.gate = UserspaceGate(self.net_socket, fd, mode=mode)
        self.gate.allow(False)  # nothing leaves before the HA machine opens the gate (lease in hand)
        await self.gate.start()

    async def _tap(self, up: bool) -> None:
        g = self.cfg.guest
        await asyncio.to_thread(configure_tap, TAP_NAME, str(g.gateway), g.prefix.prefixlen, up)

    def _ssl(self, server: bool):
        """The TLS context for new connections; the same object across certificate reloads."""
        return self.tls.server if server else self.tls.client

    def reload_tls(self, reason: str = "operator") -> dict | None:
        """Take up a rotated certificate: new connections (to the peer, from the peer, to the
        witness) present it; established ones carry on, so protection never stops. None if the
        new files are refused (logged; the previous certificate stays)."""
        from geomirror import pairing

        return pairing.reload_logged(self.tls, reason, log, on_reload=lambda info: self._mark(
            "tls.reloaded", reason=reason, serial=info["serial"], previous_serial=info["previous_serial"],
            not_after=info["not_after"]))

    async def _watch_tls(self, every_s: float = 5.0) -> None:
        from geomirror import pairing

        await pairing.watch_identity(self.tls, lambda: self.reload_tls("files changed"), every_s)

    # ------------------------------------------------------------ witness & BGP
    def _start_witness(self) -> None:
        w = self.cfg.witness
        if w is None:
            return
        from geomirror.witness import WitnessClient

        self.witness = WitnessClient(str(w.address), w.port, self._ssl(False), server_name=w.name,
                                     timeout_s=max(0.3, w.renew_every_ms / 1000))

    async def _start_bgp(self) -> None:
        b = self.cfg.bgp
        if not b.enabled:
            return
        try:
            from bgp.speaker import Neighbor, Speaker
        except ImportError as e:  # pragma: no cover
            log.error("bgp.unavailable", site=self.name, error=str(e))
            return

        neighbors = [Neighbor(address=str(n.address), peer_as=n.peer_as,
                              local_address=str(n.local_address) if n.local_address else None,
                              hold_time=b.hold_time) for n in b.neighbors]
        self.speaker = Speaker(router_id=str(self.cfg.site.router_id), local_as=self.cfg.site.asn,
                               neighbors=neighbors, run_dir=self.run_dir / "bgp")
        self.speaker.on_change = self._on_bgp_change
        await self.speaker.start()

    def _on_bgp_change(self) -> None:
        sp = self.speaker
        now_up = {n for n, st in sp.neighbor_states.items() if st == "up"}
        for n in now_up - getattr(self, "_bgp_up", set()):
            self._feed(ha.BgpNeighborUp(n))
        for n in getattr(self, "_bgp_up", set()) - now_up:
            self._feed(ha.BgpNeighborDown(n))
        self._bgp_up = now_up
        peer_as = self.cfg.peer.asn
        if peer_as:
            seen = any(r.as_path and r.as_path[-1] == peer_as
                       for r in sp.received_routes(str(self.cfg.guest.prefix)))
            if seen != getattr(self, "_peer_route", None):
                self._peer_route = seen
                self._feed(ha.PeerRouteSeen(seen))

    # ------------------------------------------------------------ primary
    async def start_primary(self, fresh: bool = True) -> None:
        ram = self.run_dir / "guest.ram"
        if fresh:
            ram.unlink(missing_ok=True)
        spec = self.guest_spec(incoming=False, ram_path=ram, tag="primary")
        await self._tap(True)
        self.guest = Guest(spec)
        await self.guest.start()
        await self.guest.wait_ready()
        self._mark("guest.ready", accel=spec.accel, memory_mb=spec.memory_mb)
        self._begin_replication(spec, fresh)
        self._save_role("primary" if fresh else "active")
        self._tasks.append(asyncio.create_task(self._watch_guest(self.guest)))

    def _begin_replication(self, spec: GuestSpec, fresh: bool) -> None:
        """Checkpoint the running guest to the peer (after a takeover: to the old primary, once it
        comes back as a standby)."""
        if fresh or not self.run_id:
            self.run_id = secrets.token_hex(8)
        self.capture = Capture(spec.ram_path, spec.memory_mb << 20)
        ck = self.cfg.checkpoint
        pcfg = PrimaryConfig(site=self.name, compat=spec.compat(), run_id=self.run_id, interval_ms=ck.interval_ms,
                             max_in_flight=ck.max_in_flight, heartbeat_ms=self.cfg.heartbeat.interval_ms,
                             compression_level=ck.compression_level,
                             min_timeout_ms=self.cfg.heartbeat.min_timeout_ms,
                             max_timeout_ms=self.cfg.heartbeat.max_timeout_ms)
        peer = self.cfg.peer
        ctx = self._ssl(False)
        max_frame = (spec.memory_mb << 20) + (64 << 20)

        async def connect():
            return await transport.connect(str(peer.address), peer.port, ssl=ctx, server_hostname=peer.name,
                                           max_frame=max_frame, local_addr=(str(peer.listen), 0))

        from replication.pacer import Pacer, PacerPolicy

        self.pacer_policy = PacerPolicy(
            min_interval_ms=ck.min_interval_ms, max_interval_ms=ck.max_interval_ms,
            latency_budget_ms=ck.latency_budget_ms, max_pause_share=ck.max_pause_share,
            max_wan_bytes_per_s=ck.max_wan_mbit * 1e6 / 8, max_in_flight=ck.max_in_flight)
        self.pacer = Pacer(self.pacer_policy, ck.interval_ms)
        self.adaptive = ck.adaptive
        self.fixed_interval_ms = ck.interval_ms
        self.primary = Primary(pcfg, self.guest, self.capture, self.gate, connect, interval_fn=self._next_interval)
        # Epoch numbers only grow at a site, across primaries: the gate tags held frames with
        # them, and a replica (here or at the peer) rejects anything not after its committed one.
        self.primary.status.epoch = max(self.gate.current_epoch,
                                        self.replica.committed_epoch if self.replica else 0)
        self.primary.generation_fn = lambda: self.ha.generation
        self.primary.hold_on_protect = not self.unsafe_no_output_commit
        self.primary.on_heartbeat = lambda gen, rtt: self._feed(ha.HeartbeatReceived(time.monotonic(), rtt, gen))
        self.primary.on_commit = lambda epoch: self._feed(ha.StandbyReady(epoch))
        self._primary_task = asyncio.create_task(self.primary.run())
        self._tasks.append(self._primary_task)

    def _next_interval(self, primary: Primary, rec) -> float:
        """The pacer's interval (or the fixed one), fed with what the last epoch measured."""
        if not self.adaptive:
            return self.fixed_interval_ms
        if rec is None:
            return self.pacer.interval_ms
        from replication.pacer import EpochSample

        link = primary.link
        before = self.pacer.last.reason if self.pacer.last else None
        d = self.pacer.update(EpochSample(
            interval_ms=rec.interval_ms, pause_ms=rec.pause_ms, dirty_bytes=rec.dirty_bytes,
            wire_bytes=rec.wire_bytes, rtt_ms=link.rtt_ms or 0.0, rtt_var_ms=link.rtt_var_ms,
            bandwidth_bytes_per_s=link.bandwidth_bps, in_flight=primary.status.in_flight))
        now = time.monotonic()
        if d.reason != before and now - getattr(self, "_pacer_logged", 0.0) >= 10.0:
            # at most one line per 10 s: near a boundary the reason may flip every few epochs
            # (the status output always shows the current one)
            self._pacer_logged = now
            log.info("pacer.reason", site=self.name, interval_ms=round(d.interval_ms, 1),
                     target_ms=round(d.target_ms, 1), reason=d.reason)
        if d.infeasible:
            self.alarms.append(d.infeasible)
            log.warning("pacer.budget_infeasible", site=self.name, message=d.infeasible)
        return d.interval_ms

    def set_checkpoint(self, adaptive: bool | None = None, interval_ms: float | None = None) -> dict:
        """Operator tuning at run time: adaptive pacing, or a fixed interval."""
        if interval_ms is not None:
            p = self.cfg.checkpoint
            if not p.min_interval_ms <= interval_ms <= p.max_interval_ms:
                raise ValueError(f"interval {interval_ms} ms is outside {p.min_interval_ms:g}..{p.max_interval_ms:g}")
            self.fixed_interval_ms = float(interval_ms)
        if adaptive is not None:
            self.adaptive = bool(adaptive)
        self._mark("checkpoint.policy", adaptive=self.adaptive, fixed_interval_ms=self.fixed_interval_ms)
        return {"adaptive": self.adaptive, "fixed_interval_ms": self.fixed_interval_ms}

    async def _watch_guest(self, guest: Guest) -> None:
        rc = await guest.proc.wait()
        if self._stop.is_set() or guest is not self.guest:
            return
        self._mark("guest.exited", rc=rc, hint="the guest's QEMU died; this site fences itself and releases "
                   "the lease so the standby can take over at once")
        if self.primary:
            self.primary.stop()
        self._feed(ha.OperatorFence(time.monotonic()))  # close gate, withdraw, release the lease
        self._save_role("failed")

    # ------------------------------------------------------------ standby
    async def start_standby(self) -> None:
        g = self.cfg.guest
        self.replica = Replica(self.state_dir / "replica", g.memory_mb << 20)
        report = await asyncio.to_thread(self.replica.open)
        self._mark("replica.open", committed_epoch=report.committed_epoch, valid=report.valid,
                   recovered=report.recovered)
        spec = self.guest_spec(incoming=True, ram_path=self.replica.ram_path, tag="standby")
        from geomirror import pairing

        expected = {self.cfg.peer.name}
        hb = self.cfg.heartbeat
        self.standby = Standby(self.replica, spec.compat(), self.name, hb.interval_ms,
                               allowed_peer=lambda ch: pairing.check_peer(ch.ssl_object(), expected),
                               min_timeout_ms=hb.min_timeout_ms, max_timeout_ms=hb.max_timeout_ms)
        self.standby.generation_fn = lambda: self.ha.generation
        self.standby.on_heartbeat = lambda gen, rtt: self._feed(ha.HeartbeatReceived(time.monotonic(), rtt, gen))
        self.standby.on_commit = self._on_standby_commit
        self.standby.on_switchover = self._on_switchover
        self._standby_spec = spec
        await self._tap(False)
        peer = self.cfg.peer
        max_frame = (g.memory_mb << 20) + (64 << 20)
        self._server = await transport.serve(str(peer.listen), peer.listen_port, self.standby.handle,
                                             ssl=self._ssl(True), max_frame=max_frame)
        self._save_role("standby")
        if self.replica.valid:
            self._feed(ha.ReplicaCommitted(self.replica.committed_epoch))
            self._tasks.append(asyncio.create_task(self._ensure_hot()))
        if self.witness:
            self._tasks.append(asyncio.create_task(self._probe_witness()))

    def _on_standby_commit(self, epoch: int) -> None:
        self._feed(ha.ReplicaCommitted(epoch))
        if self.hot is None and not getattr(self, "_hot_starting", False):
            self._hot_starting = True
            self._tasks.append(asyncio.create_task(self._ensure_hot()))

    async def _ensure_hot(self) -> None:
        """Keep a QEMU waiting in -incoming defer on the replica, so takeover costs only the device state."""
        try:
            g = await start_hot_standby(self._standby_spec)
            self.hot = g
            self._mark("standby.hot_ready", pid=g.pid)
        except Exception as e:
            self._mark("standby.hot_failed", error=str(e))
        finally:
            self._hot_starting = False

    async def _probe_witness(self) -> None:
        """The standby learns whether the witness answers (the primary learns it from renewals)."""
        from geomirror.witness import WitnessError

        period = self.cfg.witness.renew_every_ms / 1000
        while self.role == "standby":
            try:
                await self.witness.health()
                self._feed(ha.WitnessReachable(time.monotonic()))
            except WitnessError as e:
                self._feed(ha.WitnessUnreachable(time.monotonic(), str(e)))
            await asyncio.sleep(period)

    # ------------------------------------------------------------ the HA machine
    async def _ha_loop(self) -> None:
        period = self.cfg.heartbeat.interval_ms / 1000 / 2
        while True:
            self._feed(ha.Tick(time.monotonic()))
            await asyncio.sleep(period)

    def _feed(self, event) -> None:
        if self.ha is None:
            return
        gen_before = self.ha.generation
        for action in self.ha.handle(event):
            self._act(action)
        if self.ha.generation != gen_before:
            self._save_role()

    def _act(self, a) -> None:
        name = type(a).__name__
        if isinstance(a, ha.Log):
            if a.event == "ha.state":
                self._mark("ha.state", **a.fields)
            else:
                log.info(a.event, site=self.name, **a.fields)
        elif isinstance(a, ha.Alarm):
            self.alarms.append(a.message)
            del self.alarms[:-50]
            log.warning("alarm", site=self.name, message=a.message)
        elif isinstance(a, ha.AcquireLease):
            self._spawn(self._lease_call("acquire"))
        elif isinstance(a, ha.RenewLease):
            self._spawn(self._lease_call("renew", a.generation))
        elif isinstance(a, ha.ReleaseLease):
            self._spawn(self._lease_call("release", a.generation))
        elif isinstance(a, ha.ResumeGuest):
            self._spawn(self._resume())
        elif isinstance(a, ha.StopGuest):
            self._spawn(self._stop_guest())
        elif isinstance(a, ha.OpenGate):
            self._mark("gate.open", generation=a.generation)
            if self.gate.mode is GateMode.FENCED:
                hold = self.primary is not None and not self.unsafe_no_output_commit
                self.gate.set_mode(GateMode.HOLD if hold else GateMode.OPEN)
            self.gate.allow(True)
        elif isinstance(a, ha.CloseGate):
            self._mark("gate.close")
            self.gate.allow(False)
            self.gate.set_mode(GateMode.FENCED)
            if self.role in ("primary", "active"):
                self._save_role("fenced")
        elif isinstance(a, ha.Announce):
            self._spawn(self._announce())
        elif isinstance(a, ha.Withdraw):
            self._spawn(self._withdraw())
        elif isinstance(a, ha.SetProtection):
            self._set_protection(a.protected)
        else:  # pragma: no cover - a new action the daemon does not know is a bug
            log.error("ha.unknown_action", action=name)

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.append(t)
        self._tasks[:] = [x for x in self._tasks if not x.done()]

    async def _lease_call(self, op: str, generation: int | None = None) -> None:
        from geomirror.witness import WitnessError, WitnessUnreachable

        if self.witness is None:
            return
        w = self.cfg.witness
        guest = self.cfg.guest.name
        try:
            if op == "acquire":
                r = await self.witness.acquire(guest, w.lease_ttl_ms)
                if r.ok:
                    self._mark("lease.granted", generation=r.generation)
                    self._feed(ha.LeaseGranted(r.generation, r.expires_at, time.monotonic()))
                else:
                    self._feed(ha.LeaseDenied(r.holder, r.generation))
            elif op == "renew":
                r = await self.witness.renew(guest, generation, w.lease_ttl_ms)
                if r.ok:
                    self._feed(ha.LeaseRenewed(r.generation, r.expires_at, time.monotonic()))
                else:
                    self._feed(ha.LeaseLost(r.holder, r.generation))
            else:
                await self.witness.release(guest, generation)
        except WitnessUnreachable as e:
            self._feed(ha.WitnessUnreachable(time.monotonic(), str(e)))
        except WitnessError as e:
            log.warning("lease.error", site=self.name, op=op, error=str(e))

    def _set_protection(self, protected: bool) -> None:
        if protected == self.protected:
            return
        self.protected = protected
        self.protection_changes += 1
        self._mark("protection.entered" if protected else "protection.left")
        ck = self.cfg.checkpoint
        if protected:
            if self._unprotected_task:
                self._unprotected_task.cancel()
            if self.primary and self.gate.mode is GateMode.OPEN and not self.unsafe_no_output_commit:
                self.gate.set_mode(GateMode.HOLD)
        elif ck.unreachable_policy == "continue-unprotected" and self.primary:
            self._unprotected_task = asyncio.create_task(self._continue_unprotected(ck.unprotected_grace_ms))

    async def _continue_unprotected(self, grace_ms: int) -> None:
        await asyncio.sleep(grace_ms / 1000)
        if not self.protected and self.ha.holding and self.gate.mode is GateMode.HOLD:
            self._mark("protection.continue_unprotected", grace_ms=grace_ms,
                       hint="the standby is unreachable; output flows without a replica (policy)")
            self.gate.set_mode(GateMode.OPEN)

    # ------------------------------------------------------------ takeover
    async def _resume(self) -> None:
        t0 = time.perf_counter()
        try:
            self._mark("takeover.resume_begin", epoch=self.replica.committed_epoch if self.replica else None)
            await self.standby.stop_accepting()
            self._server.close()
            hot = self.hot if self.hot is not None and self.hot.proc.returncode is None else None
            await self._tap(True)
            self.gate.open_after_resume()  # the only copy now: frames flow once the gate is allowed
            guest, timings = await resume(self.replica, self._standby_spec, hot)
            self.guest, self.hot = guest, None
            self.run_id = self.replica.run_id
            self.takeover_report = {"epoch": self.replica.committed_epoch, "resume": timings,
                                    "resume_ms": round((time.perf_counter() - t0) * 1000, 1)}
            self._save_role("active")
            self._tasks.append(asyncio.create_task(self._watch_guest(guest)))
            self._mark("takeover.resumed", **timings)
            self._feed(ha.ResumeDone(time.monotonic()))
            self._resumed.set()
            # Reprotect: checkpoint the resumed guest to the old primary as soon as it comes
            # back as a standby (`geomirror rejoin`); until then this site runs unprotected.
            self._begin_replication(self._standby_spec, fresh=False)
            self._mark("reprotect.waiting", peer=self.cfg.peer.name,
                       hint=f"run `geomirror rejoin` at {self.cfg.peer.name}, then start its daemon")
        except Exception as e:
            log.exception("takeover.resume_failed", site=self.name)
            self._feed(ha.ResumeFailed(str(e)))

    async def _stop_guest(self) -> None:
        if self.primary:
            self.primary.stop()
        if self.guest:
            self._mark("guest.stop", reason="another site runs the guest at a newer lease generation")
            g, self.guest = self.guest, None
            await g.close()

    async def _announce(self) -> None:
        if self.speaker is None:
            return
        b = self.cfg.bgp
        try:
            await self.speaker.announce(str(self.cfg.guest.prefix), med=b.med, communities=b.communities,
                                        prepend=b.prepend)
            self.announced = True
            self._mark("bgp.announced", prefix=str(self.cfg.guest.prefix))
        except Exception as e:
            log.error("bgp.announce_failed", site=self.name, error=str(e))

    async def _withdraw(self) -> None:
        if self.speaker is None or not self.announced:
            return
        try:
            await self.speaker.withdraw(str(self.cfg.guest.prefix))
            self.announced = False
            self._mark("bgp.withdrawn", prefix=str(self.cfg.guest.prefix))
        except Exception as e:
            log.error("bgp.withdraw_failed", site=self.name, error=str(e))

    # ------------------------------------------------------------ operator
    async def promote(self, force: bool = False, timeout: float = 60.0) -> dict:
        if self.role in ("primary", "active"):
            raise RuntimeError(f"site {self.name} already runs the guest ({self.ha.state})")
        self._feed(ha.OperatorPromote(time.monotonic(), force))
        try:
            await asyncio.wait_for(self._resumed.wait(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"promote did not complete in {timeout:.0f}s: "
                               + (self.alarms[-1] if self.alarms else f"HA state {self.ha.state}")) from None
        return {**(self.takeover_report or {}), "state": self.ha.state, "lease_generation": self.ha.generation}

    # ------------------------------------------------------------ planned switchover
    def _on_switchover(self, epoch: int) -> None:
        """The primary handed the guest over at `epoch` (committed here): take over now, by
        the ordinary rules (a lease at a higher generation; the primary has released it)."""
        self._mark("switchover.takeover", epoch=epoch, peer=self.cfg.peer.name)
        self._feed(ha.OperatorPromote(time.monotonic(), False))

    async def switchover(self, timeout: float = 15.0) -> dict:
        """Planned move of the guest to the peer (a site-evacuation drill), losing nothing:

        1. the last epoch is taken with the guest left paused, and committed by the peer;
        2. this site fences (gate closed, prefix withdrawn, lease released);
        3. the peer is told; it takes the lease at the next generation, resumes from that
           epoch (its hot standby), opens and announces;
        4. once the witness shows the peer holding the lease, this site stops its guest and
           becomes the peer's standby, its replica seeded from the paused guest's RAM, so
           the reverse resync sends next to nothing and protection resumes at once.
        If the peer has not taken the lease within `timeout`, the guest runs on here."""
        from geomirror.witness import WitnessError

        if self.primary is None or self.ha is None or self.ha.state != ha.PRIMARY or not self.protected:
            raise RuntimeError(f"switchover needs a protected primary; {self.name} is "
                               f"{self.ha.state if self.ha else self.role}")
        if self.witness is None:
            raise RuntimeError("switchover needs the witness: the peer takes the lease over")
        peer, guest = self.cfg.peer.name, self.cfg.guest.name
        t0 = time.monotonic()
        report: dict = {"from": self.name, "to": peer}
        self._mark("switchover.begin", to=peer)
        from replication.qemu import GuestError
        from replication.transport import ChannelError

        deadline = time.monotonic() + timeout
        while True:
            try:
                epoch = await self.primary.handover(timeout=min(timeout, 10.0))
                break
            except (ChannelError, GuestError) as e:
                # The replication session broke under us (the guest runs on, nothing was handed
                # over): wait for protection to come back and try again while time allows.
                self._mark("switchover.retry", error=str(e))
                while time.monotonic() < deadline and not (self.protected and self.primary.status.state
                                                           == "protected"):
                    await asyncio.sleep(0.1)
                if time.monotonic() >= deadline or self.primary is None:
                    raise RuntimeError(f"switchover aborted: {e}; the guest runs on here") from None
        report["final_epoch"] = epoch
        report["paused_at_ms"] = round((time.monotonic() - t0) * 1000, 1)
        gen = self.ha.generation
        self._feed(ha.OperatorFence(time.monotonic()))
        try:
            await self.witness.release(guest, gen)
        except WitnessError as e:
            log.warning("switchover.release_failed", site=self.name, error=str(e))
        report["fenced_at_ms"] = round((time.monotonic() - t0) * 1000, 1)
        try:
            await self.primary.announce_switchover(epoch)
        except Exception as e:
            await self._abort_switchover(f"cannot tell {peer}: {e}")
            raise RuntimeError(f"switchover aborted: cannot tell {peer} ({e}); the guest runs on here") from None
        deadline = time.monotonic() + timeout
        holder = None
        while time.monotonic() < deadline:
            try:
                st = await self.witness.get(guest)
                holder = st.get("holder")
                if holder == peer and int(st.get("generation", 0)) > gen and st.get("valid", True):
                    break
            except WitnessError:
                pass
            await asyncio.sleep(0.05)
        else:
            await self._abort_switchover(f"{peer} did not take the lease within {timeout:g}s (holder {holder})")
            raise RuntimeError(f"switchover aborted: {peer} did not take over within {timeout:g}s; "
                               "the guest runs on here")
        report["peer_holds_lease_at_ms"] = round((time.monotonic() - t0) * 1000, 1)
        self._mark("switchover.handed_over", to=peer, epoch=epoch, ms=report["peer_holds_lease_at_ms"])
        await self._demote_to_standby(f"switchover to {peer}")
        report["standby_at_ms"] = round((time.monotonic() - t0) * 1000, 1)
        self._mark("switchover.done", **report)
        return report

    async def _abort_switchover(self, why: str) -> None:
        self._mark("switchover.aborted", why=why)
        self._feed(ha.OperatorPromote(time.monotonic(), False))  # re-acquire: reopens if nobody held it since
        await self.primary.abort_handover()

    async def _demote_to_standby(self, reason: str) -> None:
        """This site no longer runs the guest (another site does, at a newer generation):
        stop it and become the other site's standby, seeded from the guest's last RAM."""
        self._mark("demote.begin", reason=reason)
        spec_ram = self.capture.path if self.capture is not None else self.run_dir / "guest.ram"
        if self.primary:
            self.primary.stop()
        task = getattr(self, "_primary_task", None)
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self.primary, self._primary_task = None, None
        guest, self.guest = self.guest, None
        if guest is not None:
            await guest.close()
        if self.capture is not None:
            self.capture.close()
            self.capture = None
        self.gate.allow(False)
        self.gate.set_mode(GateMode.FENCED)
        if self.replica is not None:  # from before a takeover: its files are the guest's RAM now
            self.replica.close()
            self.replica = None
        await asyncio.to_thread(self.seed_replica, Path(spec_ram))
        self.protected = False
        self.ha = ha.HaMachine("standby", ha.HaConfig.from_site_config(self.cfg), generation=self.ha.generation)
        self._bgp_up, self._peer_route = set(), None
        if self.speaker is not None:
            self._on_bgp_change()  # the new machine learns what BGP looks like now
        self._resumed.clear()
        await self.start_standby()
        self._mark("demote.done", role=self.role)

    async def fence(self, reason: str = "operator") -> None:
        self._mark("fence", reason=reason)
        self._feed(ha.OperatorFence(time.monotonic()))
        self._save_role("fenced")

    async def shutdown(self) -> None:
        self._mark("daemon.stop", role=self.role)
        if self.primary:
            self.primary.stop()
        for t in self._tasks:
            t.cancel()
        if self.speaker is not None:
            try:
                await asyncio.wait_for(self.speaker.stop(withdraw=True), 10)
            except Exception:
                pass
        if self.witness is not None:
            await self.witness.close()
        for g in (self.guest, self.hot):
            if g is not None:
                try:
                    await g.close()
                except Exception:
                    pass
        if self.gate:
            await self.gate.close()
        if self.replica:
            self.replica.close()

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        h = self.ha.snapshot() if self.ha else {}
        s = {
            "site": self.name,
            "role": self.role,
            "ha_state": h.get("state"),
            "lease_generation": h.get("lease_generation", 0),
            "committed_epoch": 0,
            "interval_ms": None,
            "rtt_ms": None,
            "last_pause_ms": None,
            "backlog_epochs": 0,
            "bgp_announced": self.announced,
            "protected": self.protected,
            "protection_changes": self.protection_changes,
            "alarms": list(h.get("alarms", {}).values()),
            "gate": None,
            "tls": self.tls.info() if getattr(self, "tls", None) else None,
            "ha": h,
        }
        if self.gate:
            s["gate"] = {"mode": self.gate.mode.value, "allowed": self.gate.allowed, **self.gate.stats.as_dict()}
        if self.primary:
            p = self.primary.summary()
            s.update(committed_epoch=p["committed_epoch"], interval_ms=round(p["interval_ms"], 1), rtt_ms=p["rtt_ms"],
                     last_pause_ms=round(p["last_pause_ms"], 2), backlog_epochs=p["backlog_epochs"],
                     replication=p)
            d = self.pacer.last
            pol = self.pacer_policy
            s["pacer"] = {"adaptive": self.adaptive, "interval_ms": round(p["interval_ms"], 1),
                          "reason": (d.reason if d else "initial") if self.adaptive else "fixed by the operator",
                          "expected_latency_ms": round(d.expected_latency_ms, 1) if d else None,
                          "budgets": {"latency_ms": pol.latency_budget_ms, "max_pause_share": pol.max_pause_share,
                                      "max_wan_mbit": pol.max_wan_bytes_per_s * 8 / 1e6,
                                      "interval_ms": [pol.min_interval_ms, pol.max_interval_ms]}}
        elif self.standby:
            st = self.standby.status
            s.update(committed_epoch=self.replica.committed_epoch if self.replica else st.committed_epoch,
                     rtt_ms=self.standby.link.as_dict()["rtt_ms"],
                     replication={"state": st.state, "valid": st.valid, "peer": st.peer,
                                  "peer_cert_serial": st.peer_cert_serial,
                                  "rejected_frames": st.rejected_frames, "last_apply_ms": round(st.last_apply_ms, 2),
                                  "hot_standby": self.hot is not None})
        if self.speaker is not None:
            s["bgp"] = {"neighbors": dict(self.speaker.neighbor_states), "exabgp_pid": self.speaker.pid,
                        "exabgp_restarts": self.speaker.restarts}
        if self.takeover_report:
            s["takeover"] = self.takeover_report
        s["timeline"] = self.timeline[-60:]
        s["guest_pid"] = self.guest.pid if self.guest else None
        return s


def _machine(m: str) -> str:
    return "pc-i440fx-7.2" if m == "pc" else m


class _Collector:
    def __init__(self, d: SiteDaemon):
        self.d = d

    def collect(self):
        s = self.d.status()
        for name, key, help_ in (
            ("geomirror_committed_epoch", "committed_epoch", "last epoch the standby committed"),
            ("geomirror_last_pause_ms", "last_pause_ms", "vCPU pause of the last checkpoint"),
            ("geomirror_interval_ms", "interval_ms", "current checkpoint interval"),
            ("geomirror_rtt_ms", "rtt_ms", "inter-site round-trip time (EWMA)"),
            ("geomirror_backlog_epochs", "backlog_epochs", "checkpoints waiting for acknowledgement"),
            ("geomirror_lease_generation", "lease_generation", "witness lease generation held or last held"),
        ):
            g = GaugeMetricFamily(name, help_)
            if s.get(key) is not None:
                g.add_metric([], float(s[key]))
            yield g
        c = CounterMetricFamily("geomirror_protection_changes", "times this site entered or left protection")
        c.add_metric([], float(s["protection_changes"]))
        yield c
        gate = s.get("gate") or {}
        for k in ("frames_held", "bytes_held", "frames_out", "frames_dropped", "last_release_delay_ms",
                  "epochs_released"):
            g = GaugeMetricFamily(f"geomirror_gate_{k}", f"output gate {k.replace('_', ' ')}")
            if k in gate:
                g.add_metric([], float(gate[k]))
            yield g
