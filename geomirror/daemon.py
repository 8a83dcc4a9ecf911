"""One site's service: wires the gate, the guest, replication, the control API (and BGP/HA).

Roles: ``primary`` runs the guest and checkpoints it to the peer; ``standby`` keeps
the replica and a hot-standby QEMU; ``active`` runs the guest alone after a takeover;
``fenced`` releases nothing. The role is persisted in state_dir/role.json so a
restarted daemon does not forget that it took over or was fenced.
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
from prometheus_client.core import GaugeMetricFamily
from pyroute2 import IPRoute

from geomirror import control
from replication.capture import Capture
from replication.gate import GateMode, UserspaceGate, open_tap
from replication.primary import Primary, PrimaryConfig
from replication.qemu import Guest, GuestSpec, detect_accel
from replication.standby import Standby, resume, start_hot_standby
from replication.store import Replica
from replication import transport

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


class SiteDaemon:
    def __init__(self, cfg):
        self.cfg = cfg
        self.name = cfg.site.name
        self.state_dir = Path(cfg.site.state_dir)
        self.run_dir = Path(cfg.site.run_dir)
        self.role = "starting"
        self.guest: Guest | None = None
        self.hot: Guest | None = None
        self.gate: UserspaceGate | None = None
        self.primary: Primary | None = None
        self.standby: Standby | None = None
        self.replica: Replica | None = None
        self.capture: Capture | None = None
        self.lease_generation = 0
        self.run_id = ""
        self.announced = False
        self.takeover_report: dict | None = None
        self.events: list[dict] = []
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._takeover_lock = asyncio.Lock()
        self.metrics_registry = CollectorRegistry()
        self.metrics_registry.register(_Collector(self))

    # ------------------------------------------------------------ paths & spec
    @property
    def net_socket(self) -> Path:
        return self.run_dir / "guest-net.sock"

    def guest_spec(self, *, incoming: bool, ram_path: Path, tag: str) -> GuestSpec:
        g = self.cfg.guest
        kernel, initrd = g.kernel, g.initrd
        if not kernel:
            from geomirror.image import build_image

            img = build_image(progress=False)
            kernel, initrd = img.kernel, img.initrd
        from geomirror.image import default_cmdline

        net = g.prefix
        append = default_cmdline(str(g.address), net.prefixlen, str(g.gateway))
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
        token = control.load_or_create_token(self._token_path())
        app = control.make_app(self, token)
        runner = await control.start(app, str(self.cfg.control.listen), self.cfg.control.port,
                                     self.run_dir / "control.sock")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        role = self._load_role() or self.cfg.site.initial_role
        self._event("daemon.start", role=role)
        try:
            await self._start_gate()
            if role == "primary":
                await self.start_primary()
            elif role == "active":
                await self.start_primary(fresh=False)
            elif role == "fenced":
                self.role = "fenced"
                self.gate.set_mode(GateMode.FENCED)
            else:
                await self.start_standby()
            await self._stop.wait()
        finally:
            await self.shutdown()
            await runner.cleanup()

    def _token_path(self) -> Path:
        p = Path(self.cfg.control.token_file)
        return p if p.is_absolute() else self.state_dir / p

    def _load_role(self) -> str | None:
        try:
            return json.loads((self.state_dir / "role.json").read_text())["role"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _save_role(self, role: str) -> None:
        self.role = role
        tmp = self.state_dir / "role.json.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"role": role, "lease_generation": self.lease_generation, "run_id": self.run_id,
                       "at": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_dir / "role.json")

    def _event(self, event: str, **fields) -> None:
        self.events.append({"t": time.time(), "event": event, **fields})
        del self.events[:-200]
        log.info(event, site=self.name, **fields)

    async def _start_gate(self) -> None:
        fd = open_tap(TAP_NAME)
        mode = GateMode.HOLD
        if os.environ.get("GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT") == "1":
            # Only for proving that the torture test has teeth: output leaves before the ack.
            log.warning("gate.output_commit_disabled", site=self.name,
                        hint="GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT=1: clients can see state the standby never got")
            mode = GateMode.OPEN
        self.gate = UserspaceGate(self.net_socket, fd, mode=mode)
        await self.gate.start()

    async def _tap(self, up: bool) -> None:
        g = self.cfg.guest
        await asyncio.to_thread(configure_tap, TAP_NAME, str(g.gateway), g.prefix.prefixlen, up)

    # ------------------------------------------------------------ primary
    def _ssl_client(self):
        from geomirror import pairing

        t = self.cfg.tls
        return pairing.client_context(t.ca, t.cert, t.key)

    def _ssl_server(self):
        from geomirror import pairing

        t = self.cfg.tls
        return pairing.server_context(t.ca, t.cert, t.key)

    async def start_primary(self, fresh: bool = True) -> None:
        ram = self.run_dir / "guest.ram"
        if fresh:
            ram.unlink(missing_ok=True)
        spec = self.guest_spec(incoming=False, ram_path=ram, tag="primary")
        await self._tap(True)
        self.guest = Guest(spec)
        await self.guest.start()
        await self.guest.wait_ready()
        self._event("guest.ready", accel=spec.accel, memory_mb=spec.memory_mb)
        self.capture = Capture(ram, spec.memory_mb << 20)
        ck = self.cfg.checkpoint
        if fresh or not self.run_id:
            self.run_id = secrets.token_hex(8)
        pcfg = PrimaryConfig(site=self.name, compat=spec.compat(), run_id=self.run_id, interval_ms=ck.interval_ms,
                             max_in_flight=ck.max_in_flight, heartbeat_ms=self.cfg.heartbeat.interval_ms,
                             compression_level=ck.compression_level,
                             min_timeout_ms=self.cfg.heartbeat.min_timeout_ms,
                             max_timeout_ms=self.cfg.heartbeat.max_timeout_ms)
        peer = self.cfg.peer
        ctx = self._ssl_client()
        max_frame = (spec.memory_mb << 20) + (64 << 20)

        async def connect():
            return await transport.connect(str(peer.address), peer.port, ssl=ctx, server_hostname=peer.name,
                                           max_frame=max_frame, local_addr=(str(peer.listen), 0))

        self.primary = Primary(pcfg, self.guest, self.capture, self.gate, connect)
        self._save_role("primary")
        self._tasks.append(asyncio.create_task(self.primary.run()))
        self._tasks.append(asyncio.create_task(self._watch_guest(self.guest)))

    async def _watch_guest(self, guest: Guest) -> None:
        rc = await guest.proc.wait()
        if self._stop.is_set():
            return
        self._event("guest.exited", rc=rc, hint="the guest's QEMU died; this site no longer runs it")
        if self.primary:
            self.primary.stop()
        self.gate.set_mode(GateMode.FENCED)
        self.role = "failed"

    # ------------------------------------------------------------ standby
    async def start_standby(self) -> None:
        g = self.cfg.guest
        self.replica = Replica(self.state_dir / "replica", g.memory_mb << 20)
        report = await asyncio.to_thread(self.replica.open)
        self._event("replica.open", committed_epoch=report.committed_epoch, valid=report.valid,
                    recovered=report.recovered)
        spec = self.guest_spec(incoming=True, ram_path=self.replica.ram_path, tag="standby")
        from geomirror import pairing

        expected = {self.cfg.peer.name}
        self.standby = Standby(self.replica, spec.compat(), self.name, self.cfg.heartbeat.interval_ms,
                               allowed_peer=lambda ch: pairing.check_peer(ch.ssl_object(), expected),
                               min_timeout_ms=self.cfg.heartbeat.min_timeout_ms,
                               max_timeout_ms=self.cfg.heartbeat.max_timeout_ms)
        self.standby.on_commit = self._on_standby_commit
        self._standby_spec = spec
        await self._tap(False)
        peer = self.cfg.peer
        max_frame = (g.memory_mb << 20) + (64 << 20)
        self._server = await transport.serve(str(peer.listen), peer.listen_port, self.standby.handle,
                                             ssl=self._ssl_server(), max_frame=max_frame)
        self._save_role("standby")
        self.role = "standby"
        if self.replica.valid:
            self._tasks.append(asyncio.create_task(self._ensure_hot()))

    def _on_standby_commit(self, epoch: int) -> None:
        if self.hot is None and not getattr(self, "_hot_starting", False):
            self._hot_starting = True
            self._tasks.append(asyncio.create_task(self._ensure_hot()))

    async def _ensure_hot(self) -> None:
        """Keep a QEMU waiting in -incoming defer on the replica, so takeover costs only the device state."""
        try:
            g = await start_hot_standby(self._standby_spec)
            self.hot = g
            self._event("standby.hot_ready", pid=g.pid)
        except Exception as e:
            self._event("standby.hot_failed", error=str(e))
        finally:
            self._hot_starting = False

    # ------------------------------------------------------------ takeover / fence
    async def promote(self, force: bool = False) -> dict:
        """Take over the guest from the replica (operator command, or the HA machine's decision)."""
        async with self._takeover_lock:
            if self.role != "standby":
                raise RuntimeError(f"site {self.name} is {self.role}, not standby; nothing to promote")
            t0 = time.perf_counter()
            steps = {}
            await self.standby.stop_accepting()
            self._server.close()
            steps["stop_replication_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            hot = self.hot
            if hot is not None and (hot.proc.returncode is not None):
                hot = None
            t1 = time.perf_counter()
            await self._tap(True)
            self.gate.open_after_resume()
            steps["gate_open_ms"] = round((time.perf_counter() - t1) * 1000, 1)
            guest, timings = await resume(self.replica, self._standby_spec, hot)
            steps["resume"] = timings
            self.guest = guest
            self.hot = None
            self.run_id = self.replica.run_id
            self._save_role("active")
            self._tasks.append(asyncio.create_task(self._watch_guest(guest)))
            steps["total_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            steps["epoch"] = self.replica.committed_epoch
            self.takeover_report = steps
            self._event("takeover.done", **{k: v for k, v in steps.items() if k != "resume"})
            return steps

    async def fence(self, reason: str = "operator") -> None:
        self._event("fence", reason=reason)
        if self.gate:
            self.gate.set_mode(GateMode.FENCED)
        if self.primary:
            self.primary.stop()
        self._save_role("fenced")

    async def shutdown(self) -> None:
        self._event("daemon.stop", role=self.role)
        if self.primary:
            self.primary.stop()
        for t in self._tasks:
            t.cancel()
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
        s = {
            "site": self.name,
            "role": self.role,
            "lease_generation": self.lease_generation,
            "committed_epoch": 0,
            "interval_ms": None,
            "rtt_ms": None,
            "last_pause_ms": None,
            "backlog_epochs": 0,
            "bgp_announced": self.announced,
            "gate": None,
        }
        if self.gate:
            s["gate"] = {"mode": self.gate.mode.value, **self.gate.stats.as_dict()}
        if self.primary:
            p = self.primary.summary()
            s.update(committed_epoch=p["committed_epoch"], interval_ms=p["interval_ms"], rtt_ms=p["rtt_ms"],
                     last_pause_ms=round(p["last_pause_ms"], 2), backlog_epochs=p["backlog_epochs"],
                     replication=p)
        if self.standby:
            st = self.standby.status
            s.update(committed_epoch=self.replica.committed_epoch if self.replica else st.committed_epoch,
                     rtt_ms=self.standby.link.as_dict()["rtt_ms"],
                     replication={"state": st.state, "valid": st.valid, "peer": st.peer,
                                  "rejected_frames": st.rejected_frames, "last_apply_ms": round(st.last_apply_ms, 2),
                                  "hot_standby": self.hot is not None})
        if self.takeover_report:
            s["takeover"] = self.takeover_report
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
        ):
            g = GaugeMetricFamily(name, help_)
            if s.get(key) is not None:
                g.add_metric([], float(s[key]))
            yield g
        gate = s.get("gate") or {}
        for k in ("frames_held", "bytes_held", "frames_out", "frames_dropped", "last_release_delay_ms"):
            g = GaugeMetricFamily(f"geomirror_gate_{k}", f"output gate {k.replace('_', ' ')}")
            if k in gate:
                g.add_metric([], float(gate[k]))
            yield g
