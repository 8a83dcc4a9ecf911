"""A site's status (typed; the control API serves it as JSON) and its Prometheus collector."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from geomirror.ha import STATES


@dataclass
class SiteStatus:
    site: str
    role: str  # primary | standby | fenced (role.json: what this site holds)
    ha_state: str  # the HA machine's state
    lease_generation: int = 0
    committed_epoch: int = 0
    interval_ms: float | None = None
    rtt_ms: float | None = None  # the replication channel's (heartbeats; failure detection uses it)
    path_rtt_ms: float | None = None  # the path's (TCP_INFO; the pacer uses it): rtt_ms above it is queueing
    last_pause_ms: float | None = None
    backlog_epochs: int = 0
    bgp_announced: bool = False
    bgp_backup: bool = False  # the standby pre-announces the guest's prefixes (the backup path)
    protected: bool = False
    protection_changes: int = 0
    alarms: list = field(default_factory=list)
    gate: dict | None = None
    tls: dict | None = None
    ha: dict = field(default_factory=dict)
    loop_lag_ms: dict = field(default_factory=dict)
    guest_pid: int | None = None
    replication: dict | None = None
    pacer: dict | None = None
    bgp: dict | None = None
    takeover: dict | None = None
    timeline: list = field(default_factory=list)

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("replication", "pacer", "bgp", "takeover"):
            if d[k] is None:
                del d[k]
        return d


class LoopLag:
    """How late the event loop runs a 100 ms timer: the symptom of work that blocks the loop
    (which delays heartbeats, acks and the gate). The last lag and the worst of the last minute."""

    def __init__(self, period_s: float = 0.1, window_s: float = 60.0):
        self.period_s = period_s
        self.window = max(1, int(window_s / period_s))
        self.samples: list[float] = []
        self.last_ms = 0.0

    async def run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.period_s)
            self.last_ms = max(0.0, (time.monotonic() - t - self.period_s) * 1000)
            self.samples.append(self.last_ms)
            del self.samples[:-self.window]

    def as_dict(self) -> dict:
        return {"last": round(self.last_ms, 2), "max_1m": round(max(self.samples, default=0.0), 2)}


_GAUGES = (
    ("geomirror_committed_epoch", "committed_epoch", "last epoch the standby committed"),
    ("geomirror_last_pause_ms", "last_pause_ms", "vCPU pause of the last checkpoint"),
    ("geomirror_interval_ms", "interval_ms", "current checkpoint interval"),
    ("geomirror_rtt_ms", "rtt_ms", "inter-site round-trip time of the replication channel's heartbeats (EWMA)"),
    ("geomirror_path_rtt_ms", "path_rtt_ms", "inter-site path round-trip time (TCP's, the pacer's input)"),
    ("geomirror_backlog_epochs", "backlog_epochs", "checkpoints waiting for acknowledgement"),
    ("geomirror_lease_generation", "lease_generation", "lease generation held or last held"),
)
# for alerts on lease trouble: who holds the lease, whether the witness and the peer answer
_HA_FLAGS = (
    ("geomirror_lease_held", "holding_lease", "1 while this site holds the lease"),
    ("geomirror_witness_reachable", "witness_reachable", "1 while the lease service answers this site"),
    ("geomirror_peer_alive", "peer_alive", "1 while the peer's heartbeats arrive"),
)
HA_STATES = tuple(st.value for st in STATES)
_GATE = ("frames_held", "bytes_held", "frames_out", "frames_dropped", "last_release_delay_ms", "epochs_released",
         "frames_passed_through")


class StatusCollector:
    """Prometheus metrics from the site's status, computed at scrape time."""

    def __init__(self, status_fn):
        self.status_fn = status_fn  # () -> SiteStatus

    def collect(self):
        s = self.status_fn()
        for name, key, help_ in _GAUGES:
            g = GaugeMetricFamily(name, help_)
            v = getattr(s, key)
            if v is not None:
                g.add_metric([], float(v))
            yield g
        g = GaugeMetricFamily("geomirror_protected", "1 while the standby commits every epoch")
        g.add_metric([], float(s.protected))
        yield g
        c = CounterMetricFamily("geomirror_protection_changes", "times this site entered or left protection")
        c.add_metric([], float(s.protection_changes))
        yield c
        g = GaugeMetricFamily("geomirror_ha_state", "1 for the HA machine's present state, 0 for the others",
                              labels=["state"])
        for st in HA_STATES:
            g.add_metric([st], float(s.ha_state == st))
        yield g
        for name, key, help_ in _HA_FLAGS:
            g = GaugeMetricFamily(name, help_)
            if s.ha.get(key) is not None:
                g.add_metric([], float(bool(s.ha[key])))
            yield g
        c = CounterMetricFamily("geomirror_slow_epochs", "epochs whose output waited 300 ms or more for its release "
                                "(primary.slow_epoch)")
        slow = (s.replication or {}).get("slow_epochs")
        if slow is not None:
            c.add_metric([], float(slow))
        yield c
        g = GaugeMetricFamily("geomirror_loop_lag_ms", "event loop lateness (worst of the last minute)")
        g.add_metric([], float(s.loop_lag_ms.get("max_1m", 0.0)))
        yield g
        gate = s.gate or {}
        for k in _GATE:
            g = GaugeMetricFamily(f"geomirror_gate_{k}", f"output gate {k.replace('_', ' ')}")
            if k in gate:
                g.add_metric([], float(gate[k]))
            yield g


def build_status(d) -> SiteStatus:
    """The status of a `SiteDaemon` `d`, from its parts as they are now."""
    h = d.ha.snapshot() if d.ha else {}
    e = d.effects
    s = SiteStatus(site=d.name, role=d.role.role.value, ha_state=h.get("state", "starting"),
                   lease_generation=h.get("lease_generation", 0),
                   bgp_announced=bool(e and e.announced),
                   bgp_backup=bool(e and e.backup_prefixes), protected=bool(e and e.protected),
                   protection_changes=e.protection_changes if e else 0,
                   alarms=list(h.get("alarms", {}).values()), ha=h, loop_lag_ms=d.loop_lag.as_dict(),
                   tls=d.tls.info() if d.tls else None, takeover=d.takeover_report,
                   timeline=d.timeline.recent())
    if d.witness is not None:
        for member, why in d.witness.members_down().items():
            s.alarms.append(f"lease backend member {member} does not answer ({why}); the lease works on "
                            "through the others while they keep a quorum")
    if d.ctx is not None:
        g = d.ctx.gate
        s.gate = {"mode": g.mode.value, "allowed": g.allowed, "until": g.until, "why": d.gatectl.decision.why,
                  **g.stats.as_dict()}
    ps, sb = d.primary_side, d.standby_side
    if ps is not None and ps.primary is not None:
        for k, v in ps.status().items():
            setattr(s, k, v)
        s.guest_pid = ps.guest.pid if ps.guest else None
        s.alarms += ps.alarms[-5:]
    elif sb is not None and sb.standby is not None:
        for k, v in sb.status().items():
            setattr(s, k, v)
        if sb.standby.status.problem:  # e.g. the replica's disk is full: not protecting
            s.alarms.append(sb.standby.status.problem)
    if d.speaker is not None:
        s.bgp = {"neighbors": dict(d.speaker.neighbor_states), "exabgp_pid": d.speaker.pid,
                 "exabgp_restarts": d.speaker.restarts}
    return s
