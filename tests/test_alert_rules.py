"""The shipped Prometheus alert rules (configs/prometheus/geomirror-alerts.yml): well-formed,
about metrics the daemon exports (names taken from a real scrape of the collectors and from
the package's source), and, where promtool is installed (Debian `prometheus`, scripts/setup.sh),
accepted by `promtool check rules` and firing as tests/prometheus/geomirror-alerts-test.yml says."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from geomirror.site.status import SiteStatus, StatusCollector

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "configs" / "prometheus" / "geomirror-alerts.yml"
RULE_TESTS = ROOT / "tests" / "prometheus" / "geomirror-alerts-test.yml"
PROMTOOL = shutil.which("promtool")
# what a rule may refer to besides our metrics: Prometheus' own series and PromQL's words
NOT_METRICS = {"up", "time", "max", "sum", "by", "on", "and", "or", "rate", "changes", "avg_over_time", "instance",
               "pair", "site", "state", "verdict", "job", "m", "s", "increase"}


# The drill metrics come with geomirror/drill/store.py (built in parallel on another branch);
# until that module is in this tree, these are taken on trust. Once it is, its source decides.
DRILL_STORE = ROOT / "geomirror" / "drill" / "store.py"
DRILL_METRICS = {"geomirror_drill_last_verdict", "geomirror_drill_epochs_lost",
                 "geomirror_drill_last_pass_timestamp_seconds"}


def exported_names() -> set[str]:
    """Every metric name the daemon can export: a scrape of the status collector (with every
    optional figure set), plus the families the package declares elsewhere (e.g. the drills')."""
    reg = CollectorRegistry()
    full = SiteStatus(site="a", role="primary", ha_state="active_protected", interval_ms=1, rtt_ms=1,
                      last_pause_ms=1, ha={"holding_lease": True, "witness_reachable": True, "peer_alive": True},
                      gate={"frames_held": 0, "bytes_held": 0, "frames_out": 0, "frames_dropped": 0,
                            "last_release_delay_ms": 0, "epochs_released": 0})
    reg.register(StatusCollector(lambda: full))
    names = set(re.findall(r"^# TYPE (\w+) ", generate_latest(reg).decode(), re.M))
    names |= {n + "_total" for n in names}
    for p in (ROOT / "geomirror").rglob("*.py"):
        names |= set(re.findall(r'MetricFamily\(\s*"(geomirror_\w+)"', p.read_text()))
    if not DRILL_STORE.exists():
        names |= DRILL_METRICS
    return names


def rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_every_rule_is_an_alert_with_severity_summary_and_a_unique_name():
    rs = rules()
    assert len(rs) >= 10
    names = [r["alert"] for r in rs]
    assert len(names) == len(set(names))
    for r in rs:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"], r["alert"]
        assert isinstance(r["expr"], str) and r["expr"].strip(), r["alert"]


def test_the_rules_cover_protection_lease_backlog_and_drills():
    exprs = " ".join(r["expr"] for r in rules())
    for metric in ("geomirror_protected", "geomirror_lease_held", "geomirror_backlog_epochs",
                   "geomirror_drill_last_verdict"):
        assert metric in exprs, metric


def test_every_metric_a_rule_names_is_exported():
    known = exported_names()
    for r in rules():
        expr = re.sub(r'"[^"]*"', '""', r["expr"])  # label values are not metric names
        for word in set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", expr)) - NOT_METRICS:
            assert word in known, f"{r['alert']}: {word} is not a metric the daemon exports"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian prometheus; scripts/setup.sh)")
def test_promtool_accepts_the_rules_and_they_fire_as_specified():
    out = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run([PROMTOOL, "test", "rules", RULE_TESTS.name], capture_output=True, text=True,
                         timeout=60, cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
