"""The drill report: step timings of a move from both sites' timelines, budgets, the verdict.
Pure: events and answers in, dicts out (the JSON schema is in DESIGN.md and docs/drills.md).

Every step is counted in milliseconds from the moment the move began (the old site's
`switchover.begin`):

  paused           the guest stopped at the old site with its last epoch committed by the new one
  lease_moved      the new site holds the lease (its `lease.granted`)
  resumed          the guest runs at the new site (`takeover.resumed`)
  announced        the new site announces the prefix (`bgp.announced`)
  route_moved      routing's own view: the old site's BGP session receives the guest prefix from
                   upstream originated by the new site's AS (`bgp.route_seen`)
  protected_again  the new site's checkpoints are committed by the old one (`protection.entered`)

Cross-site steps compare the two hosts' wall clocks (keep them NTP-synchronised; in the lab
they are one clock). `epochs_lost` is the old site's final committed epoch minus the epoch the
new site resumed from: it must be 0.
"""

from __future__ import annotations

import time
import uuid

from gmbase.errors import GeomirrorError

STEPS = ("paused", "lease_moved", "resumed", "announced", "route_moved", "protected_again")
# (site, event) of each step, "from" being the old site, "to" the new one
_STEP_EVENT = {"lease_moved": ("to", "lease.granted"), "resumed": ("to", "takeover.resumed"),
               "announced": ("to", "bgp.announced"), "route_moved": ("from", "bgp.route_seen"),
               "protected_again": ("to", "protection.entered")}
DEFAULT_BUDGETS_MS = {"paused": 2000, "lease_moved": 5000, "resumed": 8000, "announced": 10000,
                      "route_moved": 30000, "protected_again": 120000}
VERDICTS = ("pass", "fail", "rolled_back", "refused", "skipped")
# the events a report keeps of each site's timeline (for the chart and for support)
KEPT_EVENTS = {"switchover.begin", "switchover.handed_over", "switchover.done", "switchover.aborted",
               "switchover.retry", "switchover.takeover", "lease.granted", "lease.released", "takeover.resume_begin",
               "takeover.resumed", "gate.open", "gate.close", "bgp.announced", "bgp.withdrawn", "bgp.route_seen",
               "protection.entered", "protection.left", "demote.begin", "demote.done", "ha.state"}


class BudgetError(GeomirrorError):
    """A `--budget STEP=MS` that names no step or no number."""


def parse_budgets(base: dict, overrides: list[str] | None) -> dict:
    """`base` budgets (step -> ms) with `STEP=MS` overrides applied."""
    out = dict(base)
    for item in overrides or []:
        step, _, ms = item.partition("=")
        if step not in STEPS:
            raise BudgetError(f"--budget {item}: the step must be one of {', '.join(STEPS)}")
        try:
            out[step] = float(ms)
        except ValueError:
            raise BudgetError(f"--budget {item}: {ms!r} is not a number of milliseconds") from None
    return out


def new_id(now: float | None = None) -> str:
    """A report id that sorts by time and names no path: 20240501T030000Z-1a2b3c."""
    t = time.gmtime(time.time() if now is None else now)
    return time.strftime("%Y%m%dT%H%M%SZ", t) + "-" + uuid.uuid4().hex[:6]


def _first(events: list[dict], name: str, since: float, pred=None) -> dict | None:
    for e in events:
        if e.get("event") == name and e.get("wall", 0) >= since and (pred is None or pred(e)):
            return e
    return None


def begin_wall(events: list[dict], since: float) -> float | None:
    """The wall time the old site began the switchover (its `switchover.begin` after `since`)."""
    e = _first(events, "switchover.begin", since)
    return None if e is None else e["wall"]


def move_timings(frm: str, to: str, begin: float, switchover: dict | None, frm_events: list[dict],
                 to_events: list[dict], to_asn: int | None) -> dict:
    """A move's record from what both sites said: step -> ms since `begin` (None: not seen yet)."""
    ms = lambda e: None if e is None else round((e["wall"] - begin) * 1000, 1)  # noqa: E731
    m: dict = {"from": frm, "to": to, "began_at": begin}
    so = switchover or {}
    m["paused_ms"] = so.get("paused_at_ms")
    for step, (side, name) in _STEP_EVENT.items():
        events = to_events if side == "to" else frm_events
        pred = None
        if step == "route_moved":
            if to_asn is None:
                m["route_moved_ms"] = None
                continue
            pred = lambda e: to_asn in (e.get("origins") or [])  # noqa: E731
        m[f"{step}_ms"] = ms(_first(events, name, begin, pred))
    m["standby_ms"] = so.get("standby_at_ms")
    m["final_epoch"] = so.get("final_epoch")
    rb = _first(to_events, "takeover.resume_begin", begin)
    m["resumed_epoch"] = None if rb is None else rb.get("epoch")
    m["epochs_lost"] = (None if m["final_epoch"] is None or m["resumed_epoch"] is None
                        else m["final_epoch"] - m["resumed_epoch"])
    return m


def resumed_epoch(events: list[dict], since: float) -> int | None:
    """The epoch a site resumed the guest from (its `takeover.resume_begin` after `since`)."""
    e = _first(events, "takeover.resume_begin", since)
    return None if e is None else e.get("epoch")


def unmeasured(to_asn: int | None) -> set[str]:
    """Steps a pair cannot measure: the route's move needs the peer's own AS (both sites in one
    AS cannot be told apart in the routes received)."""
    return {"route_moved"} if to_asn is None else set()


def pending(move: dict, skip: set[str] = frozenset()) -> list[str]:
    return [s for s in STEPS if s not in skip and move.get(f"{s}_ms") is None]


def over_budget(move: dict, budgets: dict[str, float], elapsed_ms: float,
                skip: set[str] = frozenset()) -> list[dict]:
    """The steps over their budget: reached later than it, or not reached `elapsed_ms` after the
    move began while the budget is already spent."""
    out = []
    for s in STEPS:
        b = budgets.get(s)
        if b is None or s in skip:
            continue
        v = move.get(f"{s}_ms")
        if (v is not None and v > b) or (v is None and elapsed_ms > b):
            out.append({"step": s, "ms": v, "budget_ms": b})
    return out


def budget_sentence(over: list[dict]) -> str:
    parts = [f"{o['step']} took {o['ms']:g} ms" if o["ms"] is not None else f"{o['step']} not reached"
             for o in over]
    return ", ".join(f"{p} (budget {o['budget_ms']:g} ms)" for p, o in zip(parts, over))


def verdict(report: dict) -> tuple[str, str]:
    """(verdict, one sentence why) of a finished drill report."""
    if report.get("refused"):
        return ("skipped" if report.get("unattended") else "refused"), report["refused"]
    moves = report.get("moves") or []
    lost = [m for m in moves if m.get("epochs_lost")]
    if lost:
        m = lost[0]
        return "fail", (f"{m['epochs_lost']} epochs lost moving from {m['from']} to {m['to']} (final epoch "
                        f"{m['final_epoch']}, resumed from {m['resumed_epoch']})")
    rb = report.get("rollback")
    if rb:
        if rb.get("epochs_lost"):
            return "fail", (f"{rb['epochs_lost']} epochs lost moving the guest back to {rb['guest_at']} (final epoch "
                            f"{rb['switchover'].get('final_epoch')}, resumed from {rb['resumed_epoch']})")
        if rb.get("ok"):
            return "rolled_back", f"{rb['reason']}; the guest runs on at {rb['guest_at']}"
        return "fail", f"{rb['reason']}; rolling back failed: {rb.get('error')}"
    if not moves:
        return "fail", report.get("error") or "no move was made"
    skip = set(report.get("unmeasured") or ())
    for m in moves:
        if m.get("epochs_lost") is None:
            return "fail", f"the epochs of the move from {m['from']} to {m['to']} are not known"
        missing = pending(m, skip)
        if missing:
            return "fail", f"the move from {m['from']} to {m['to']} did not reach {', '.join(missing)}"
    for p in report.get("probes") or []:
        if p.get("max_stall_ms") and (p.get("longest_stall_ms") or 0) > p["max_stall_ms"]:
            return "fail", (f"probe {p['name']} stalled {p['longest_stall_ms']:g} ms (at most "
                            f"{p['max_stall_ms']:g} ms)")
    if report.get("error"):
        return "fail", report["error"]
    n = len(moves)
    return "pass", (f"{n} move{'s' if n > 1 else ''}, 0 epochs lost, every step within its budget")


def finish(report: dict, now: float | None = None) -> dict:
    """Stamp the end, the verdict and its reason on a report (returns it)."""
    report["ended_at"] = time.time() if now is None else now
    report["verdict"], report["reason"] = verdict(report)
    return report


def keep_events(events: list[dict], since: float) -> list[dict]:
    return [e for e in events if e.get("event") in KEPT_EVENTS and e.get("wall", 0) >= since]


def summary(report: dict) -> dict:
    """One line of `geomirror drill list`."""
    moves = report.get("moves") or []
    return {"id": report.get("id"), "started_at": report.get("started_at"), "verdict": report.get("verdict"),
            "reason": report.get("reason"), "moves": [f"{m['from']}->{m['to']}" for m in moves],
            "epochs_lost": sum(m.get("epochs_lost") or 0 for m in moves),
            "protected_again_ms": [m.get("protected_again_ms") for m in moves]}


def text(report: dict) -> str:
    """The report for a person at a terminal: verdict, each move's steps, probes."""
    lines = [f"drill {report.get('id')}: {str(report.get('verdict')).upper()}: {report.get('reason')}"]
    for i, m in enumerate(report.get("moves") or [], 1):
        steps = ", ".join(f"{s.replace('_', ' ')} {m.get(f'{s}_ms')}" + ("" if m.get(f"{s}_ms") is None else " ms")
                          for s in STEPS)
        lines.append(f"  move {i} {m['from']} -> {m['to']}: epochs lost {m.get('epochs_lost')} (final "
                     f"{m.get('final_epoch')}, resumed {m.get('resumed_epoch')}); {steps}")
    rb = report.get("rollback")
    if rb:
        lines.append(f"  rollback: {rb.get('reason')}: " + (f"the guest runs on at {rb.get('guest_at')}"
                                                            if rb.get("ok") else f"FAILED: {rb.get('error')}"))
    for p in report.get("probes") or []:
        lines.append(f"  probe {p['name']} ({p['kind']} {p['target']}): longest stall {p['longest_stall_ms']} ms, "
                     f"{p['failures']} of {p['attempts']} attempts failed")
    return "\n".join(lines)
