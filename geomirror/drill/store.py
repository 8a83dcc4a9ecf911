"""At each site's daemon: the drill reports under state_dir/drills/ (one JSON and one HTML file
each, 0600, written atomically), the drill claim that keeps two drills from running at once,
and the Prometheus metrics of the last drill."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import structlog
from prometheus_client.core import GaugeMetricFamily

from geomirror.drill import html, report as rep
from geomirror.errors import Refused
from gmbase.files import atomic_write

log = structlog.get_logger(__name__)
_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")


class DrillStore:
    def __init__(self, directory: Path, keep: int = 100, clock=time.time):
        self.dir = Path(directory)
        self.keep = keep
        self.clock = clock
        self.last: dict | None = None  # the newest report (for the metrics)
        self.last_pass_at: float | None = None
        self.claim: dict | None = None  # {"id", "by", "since", "until"} while a drill runs
        self._loaded = False

    # ------------------------------------------------------------ reports
    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for p in sorted(self.dir.glob("*.json"), reverse=True):
            try:
                r = json.loads(p.read_text())
            except (OSError, ValueError) as e:
                log.warning("drill.report_unreadable", file=str(p), error=str(e))
                continue
            if self.last is None:
                self.last = r
            if r.get("verdict") == "pass":
                self.last_pass_at = r.get("ended_at")
                break

    def save(self, report: dict) -> dict:
        """Keep a finished report (JSON and HTML); returns where."""
        rid = report.get("id")
        if not isinstance(rid, str) or not _ID.match(rid):
            raise Refused(f"a drill report needs an id like 20240501T030000Z-1a2b3c, not {rid!r}")
        if report.get("verdict") not in rep.VERDICTS:
            raise Refused(f"a drill report needs a verdict ({', '.join(rep.VERDICTS)}), not {report.get('verdict')!r}")
        self._load()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        j, h = self.dir / f"{rid}.json", self.dir / f"{rid}.html"
        atomic_write(j, json.dumps(report, indent=1, sort_keys=True))
        atomic_write(h, html.render(report))
        self.last = report
        if report["verdict"] == "pass":
            self.last_pass_at = report.get("ended_at")
        for old in sorted(self.dir.glob("*.json"))[:-self.keep]:
            old.unlink(missing_ok=True)
            old.with_suffix(".html").unlink(missing_ok=True)
        log.info("drill.saved", id=rid, verdict=report["verdict"], file=str(j))
        return {"id": rid, "json": str(j), "html": str(h)}

    def list(self, limit: int = 50) -> list[dict]:
        out = []
        for p in sorted(self.dir.glob("*.json"), reverse=True)[:limit]:
            try:
                out.append({**rep.summary(json.loads(p.read_text())), "html": str(p.with_suffix(".html"))})
            except (OSError, ValueError) as e:
                out.append({"id": p.stem, "verdict": None, "reason": f"unreadable: {e}"})
        return out

    def path(self, rid: str, suffix: str) -> Path:
        if not _ID.match(rid):
            raise Refused(f"no drill report {rid!r} (ids look like 20240501T030000Z-1a2b3c)")
        p = self.dir / f"{rid}{suffix}"
        if not p.exists():
            raise Refused(f"no drill report {rid} in {self.dir}")
        return p

    # ------------------------------------------------------------ the claim (never two drills at once)
    def take(self, rid: str, by: str, ttl_s: float) -> dict:
        now = self.clock()
        c = self.claim
        if c is not None and c["id"] != rid and c["until"] > now:
            raise Refused(f"drill {c['id']} (started by {c['by']}) runs since "
                          f"{time.strftime('%H:%M:%S', time.localtime(c['since']))}; one drill at a time")
        self.claim = {"id": rid, "by": by, "since": now if c is None or c["id"] != rid else c["since"],
                      "until": now + ttl_s}
        return dict(self.claim)

    def give_back(self, rid: str) -> bool:
        if self.claim is not None and self.claim["id"] == rid:
            self.claim = None
            return True
        return False

    def running(self) -> dict | None:
        c = self.claim
        return dict(c) if c is not None and c["until"] > self.clock() else None


class DrillCollector:
    """Prometheus: when the last drill ended, its verdict, each step of each move, epochs lost,
    the probes' longest stall; and when a drill last passed."""

    def __init__(self, store: DrillStore):
        self.store = store

    def collect(self):
        s = self.store
        s._load()
        r = s.last or {}
        g = GaugeMetricFamily("geomirror_drill_last_timestamp_seconds", "when the last drill ended (Unix time)")
        if r.get("ended_at"):
            g.add_metric([], float(r["ended_at"]))
        yield g
        g = GaugeMetricFamily("geomirror_drill_last_pass_timestamp_seconds", "when a drill last passed (Unix time)")
        if s.last_pass_at:
            g.add_metric([], float(s.last_pass_at))
        yield g
        g = GaugeMetricFamily("geomirror_drill_last_verdict", "1 for the last drill's verdict, 0 for the others",
                              labels=["verdict"])
        if r:
            for v in rep.VERDICTS:
                g.add_metric([v], float(r.get("verdict") == v))
        yield g
        g = GaugeMetricFamily("geomirror_drill_step_ms", "ms from the move's start to each step, last drill",
                              labels=["move", "from", "to", "step"])
        lost = GaugeMetricFamily("geomirror_drill_epochs_lost", "epochs lost by the last drill (must be 0)")
        for i, m in enumerate(r.get("moves") or [], 1):
            for step in rep.STEPS:
                v = m.get(f"{step}_ms")
                if v is not None:
                    g.add_metric([str(i), m["from"], m["to"], step], float(v))
        if r.get("moves"):
            lost.add_metric([], float(sum(m.get("epochs_lost") or 0 for m in r["moves"])))
        yield g
        yield lost
        g = GaugeMetricFamily("geomirror_drill_probe_longest_stall_ms", "a probe's longest stall in the last drill",
                              labels=["probe"])
        for p in r.get("probes") or []:
            g.add_metric([p["name"]], float(p.get("longest_stall_ms") or 0))
        yield g
        g = GaugeMetricFamily("geomirror_drill_running", "1 while a drill holds this site")
        g.add_metric([], float(s.running() is not None))
        yield g
