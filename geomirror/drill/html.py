"""The drill report as one self-contained HTML page: verdict, an inline SVG timeline of both sites
(where the guest ran, when it was paused, probe stalls), a waterfall of each move's steps against
their budgets, and the checks, probes and versions. Nothing is fetched from the network. Pure."""

from __future__ import annotations

import json
import time
from html import escape

from geomirror.drill.report import STEPS

_COLORS = {"pass": "#1a7f37", "rolled_back": "#9a6700", "fail": "#cf222e", "refused": "#6e7781",
           "skipped": "#6e7781"}
_STEP_LABEL = {"paused": "guest paused", "lease_moved": "lease moved", "resumed": "resumed",
               "announced": "announced", "route_moved": "route seen moved", "protected_again": "protected again"}
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1f2328;max-width:1100px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:26px 0 8px}
.verdict{display:inline-block;color:#fff;padding:4px 12px;border-radius:6px;font-weight:700;font-size:20px}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #d0d7de;padding:4px 10px;text-align:left}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#cf222e;font-weight:600} .ok{color:#1a7f37} .muted{color:#6e7781}
svg text{font:13px system-ui,sans-serif}
"""


def _t(wall: float | None) -> str:
    return "-" if not wall else time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(wall))


def _ms(v) -> str:
    return "-" if v is None else f"{v:,.0f} ms" if v >= 100 else f"{v:.1f} ms"


def _runs(report: dict, t0: float, t_end: float) -> dict[str, list[tuple[float, float, str]]]:
    """Per site, (start s, end s, what) segments: the guest running, or paused between two sites."""
    moves = report.get("moves") or []
    sites = list(report.get("pair") or [])
    out: dict[str, list] = {s: [] for s in sites}
    if not moves:
        at = report.get("guest_at") or (sites[0] if sites else None)
        if at:
            out.setdefault(at, []).append((0.0, t_end - t0, "runs"))
        return out
    cur, since = moves[0]["from"], 0.0
    for m in moves:
        b = m["began_at"] - t0
        paused = b + (m.get("paused_ms") or 0) / 1000
        out.setdefault(cur, []).append((since, paused, "runs"))
        if m.get("resumed_ms") is None:  # not moved (aborted): runs on where it was
            since = paused
            continue
        resumed = b + m["resumed_ms"] / 1000
        out.setdefault(m["from"], []).append((paused, resumed, "paused"))
        cur, since = m["to"], resumed
    back = (report.get("rollback") or {}).get("switchover")
    if back and report["rollback"].get("began_at"):  # moved back by the rollback
        b = report["rollback"]["began_at"] - t0
        paused, back_at = b + (back.get("paused_at_ms") or 0) / 1000, b + (back.get("standby_at_ms") or 0) / 1000
        out.setdefault(cur, []).append((since, paused, "runs"))
        out[cur].append((paused, back_at, "paused"))
        cur, since = report["rollback"]["guest_at"], back_at
    out.setdefault(cur, []).append((since, t_end - t0, "runs"))
    return out


def _timeline(report: dict) -> str:
    t0 = report.get("started_at") or 0
    t_end = max(report.get("ended_at") or t0, t0 + 0.001)
    span = t_end - t0
    W, left, lane = 1000, 150, 46
    sites = list(report.get("pair") or [])
    probes = report.get("probes") or []
    H = 40 + lane * (len(sites) + len(probes)) + 60
    x = lambda s: left + (W - left - 20) * max(0.0, min(s, span)) / span  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
             f'aria-label="drill timeline of both sites">']
    runs = _runs(report, t0, t_end)
    y = 30
    for s in sites:
        parts.append(f'<text x="8" y="{y + 24}" font-weight="600">{escape(s)}</text>')
        parts.append(f'<rect x="{left}" y="{y + 8}" width="{W - left - 20}" height="26" fill="#f6f8fa" '
                     'stroke="#d0d7de"/>')
        for a, b, what in runs.get(s, []):
            color = "#2da44e" if what == "runs" else "#d4a72c"
            parts.append(f'<rect x="{x(a):.1f}" y="{y + 8}" width="{max(1.5, x(b) - x(a)):.1f}" height="26" '
                         f'fill="{color}"><title>{escape(s)}: guest {what} {a:.2f}-{b:.2f} s</title></rect>')
        y += lane
    for p in probes:
        parts.append(f'<text x="8" y="{y + 24}">probe {escape(p["name"])}</text>')
        parts.append(f'<rect x="{left}" y="{y + 14}" width="{W - left - 20}" height="14" fill="#ddf4ff"/>')
        if p.get("longest_stall_ms") and p.get("stall_began_ms") is not None:
            a = p["stall_began_ms"] / 1000
            b = a + p["longest_stall_ms"] / 1000
            parts.append(f'<rect x="{x(a):.1f}" y="{y + 14}" width="{max(2.0, x(b) - x(a)):.1f}" height="14" '
                         f'fill="#cf222e"><title>longest stall {p["longest_stall_ms"]:g} ms</title></rect>')
            label = f"stall {_ms(p['longest_stall_ms'])}"
            at = (f'x="{x(b) + 4:.1f}"' if x(b) + 4 + 8 * len(label) < W  # right of the bar, else left of it
                  else f'x="{x(a) - 4:.1f}" text-anchor="end"')
            parts.append(f'<text {at} y="{y + 26}">{label}</text>')
        y += lane
    for i, m in enumerate(report.get("moves") or [], 1):  # a dashed line where each move began
        bx = x(m["began_at"] - t0)
        parts.append(f'<line x1="{bx:.1f}" y1="22" x2="{bx:.1f}" y2="{y}" stroke="#57606a" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{bx + 3:.1f}" y="18">move {i}: {escape(m["from"])} → {escape(m["to"])}</text>')
    rb = report.get("rollback") or {}
    if rb.get("began_at"):
        bx = x(rb["began_at"] - t0)
        parts.append(f'<line x1="{bx:.1f}" y1="22" x2="{bx:.1f}" y2="{y}" stroke="#9a6700" stroke-dasharray="4 3"/>')
        parts.append(f'<text x="{bx + 3:.1f}" y="18" fill="#9a6700">rollback to {escape(str(rb.get("guest_at")))}</text>')
    ticks = _ticks(span)
    for t in ticks:
        parts.append(f'<line x1="{x(t):.1f}" y1="{y}" x2="{x(t):.1f}" y2="{y + 6}" stroke="#57606a"/>'
                     f'<text x="{x(t) - 8:.1f}" y="{y + 22}">{t:g} s</text>')
    parts.append(f'<text x="{left}" y="{y + 44}" class="muted">seconds since the drill began · '
                 '<tspan fill="#2da44e">■</tspan> guest runs here · <tspan fill="#d4a72c">■</tspan> '
                 'paused, handing over · <tspan fill="#cf222e">■</tspan> longest probe stall</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(span: float) -> list[float]:
    for step in (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600):
        if span / step <= 12:
            return [round(i * step, 3) for i in range(int(span / step) + 1)]
    return [0.0, round(span)]


def _waterfall(m: dict, budgets: dict) -> str:
    vals = [m.get(f"{s}_ms") for s in STEPS]
    top = max([v for v in vals if v is not None] + [1.0])
    W, left, row = 1000, 170, 28
    H = 20 + row * len(STEPS) + 30
    x = lambda v: left + (W - left - 130) * v / top  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" role="img" '
             f'aria-label="steps of the move from {escape(m["from"])} to {escape(m["to"])}">']
    y = 10
    for s, v in zip(STEPS, vals):
        b = budgets.get(s)
        over = v is not None and b is not None and v > b
        parts.append(f'<text x="8" y="{y + 18}">{_STEP_LABEL[s]}</text>')
        if v is None:
            parts.append(f'<text x="{left}" y="{y + 18}" class="bad" fill="#cf222e">not reached</text>')
        else:
            parts.append(f'<rect x="{left}" y="{y + 5}" width="{max(2.0, x(v) - left):.1f}" height="18" '
                         f'fill="{"#cf222e" if over else "#0969da"}"/>')
            parts.append(f'<text x="{x(v) + 6:.1f}" y="{y + 19}">{_ms(v)}</text>')
        if b is not None and b <= top * 1.05:
            parts.append(f'<line x1="{x(b):.1f}" y1="{y + 2}" x2="{x(b):.1f}" y2="{y + 26}" stroke="#cf222e" '
                         'stroke-dasharray="3 2"><title>budget</title></line>')
        y += row
    parts.append(f'<text x="{left}" y="{y + 20}" fill="#6e7781">ms since the move began (a dashed red line '
                 'is a step\'s budget where it falls inside the chart)</text></svg>')
    return "".join(parts)


def _table(head: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(rows_) + "</tr>" for rows_ in
                      [[c if c.startswith("<td") else f"<td>{escape(c)}</td>" for c in r] for r in rows])
            + "</table>")


def render(report: dict) -> str:
    v = report.get("verdict") or "?"
    budgets = report.get("budgets_ms") or {}
    out = ["<!doctype html><html lang=en><head><meta charset=utf-8>",
           f"<title>geomirror drill {escape(str(report.get('id')))}: {escape(v)}</title>",
           f"<style>{_CSS}</style></head><body>",
           f"<h1>Site-evacuation drill {escape(str(report.get('id')))}</h1>",
           f'<p><span class="verdict" style="background:{_COLORS.get(v, "#6e7781")}">{escape(v.upper())}</span> '
           f'&nbsp;{escape(report.get("reason") or "")}</p>',
           f"<p class=muted>{escape(_t(report.get('started_at')))} to {escape(_t(report.get('ended_at')))} · "
           f"pair {escape(' + '.join(report.get('pair') or []))} · "
           f"{'there and back' if report.get('there_and_back') else 'one move'} · started by "
           f"{escape(report.get('initiated_by') or '?')}</p>"]
    if report.get("moves") or report.get("pair"):
        out += ["<h2>Timeline</h2>", _timeline(report)]
    for i, m in enumerate(report.get("moves") or [], 1):
        lost = m.get("epochs_lost")
        out.append(f"<h2>Move {i}: {escape(m['from'])} → {escape(m['to'])}</h2>")
        out.append(f"<p>final epoch {m.get('final_epoch')}, resumed from {m.get('resumed_epoch')}: "
                   f"<span class={'ok' if lost == 0 else 'bad'}>{'?' if lost is None else lost} epochs lost</span>"
                   f"; {escape(m['from'])} its standby after {_ms(m.get('standby_ms'))}</p>")
        out.append(_waterfall(m, budgets))
        rows = []
        for s in STEPS:
            val, b = m.get(f"{s}_ms"), budgets.get(s)
            bad = val is None or (b is not None and val > b)
            rows.append([_STEP_LABEL[s], f'<td class="num {"bad" if bad else ""}">{escape(_ms(val))}</td>',
                         f'<td class=num>{escape(_ms(b))}</td>'])
        out.append(_table(["step", "ms since the move began", "budget"], rows))
    rb = report.get("rollback")
    if rb:
        out.append("<h2>Rollback</h2>")
        out.append(f"<p class={'ok' if rb.get('ok') else 'bad'}>{escape(rb.get('reason') or '')}: "
                   f"{'the guest runs on at ' + escape(str(rb.get('guest_at'))) if rb.get('ok') else escape(str(rb.get('error')))}"
                   "</p>")
    if report.get("probes"):
        out.append("<h2>Probes</h2>")
        out.append(_table(["probe", "target", "attempts", "failures", "longest stall", "allowed"], [
            [p["name"] + f" ({p['kind']})", p["target"], f'<td class=num>{p["attempts"]}</td>',
             f'<td class=num>{p["failures"]}</td>', f'<td class=num>{escape(_ms(p["longest_stall_ms"]))}</td>',
             f'<td class=num>{escape(_ms(p.get("max_stall_ms")))}</td>'] for p in report["probes"]]))
    out.append("<h2>Pre-flight checks</h2>")
    out.append(_table(["check", "result", "seen"], [
        [c["name"], f'<td class={"ok" if c["ok"] else "bad"}>{"ok" if c["ok"] else "FAILED"}</td>', c["detail"]]
        for c in report.get("checks") or []]))
    out.append("<h2>Versions</h2>")
    out.append(_table(["where", "version"], [[k, str(val)] for k, val in (report.get("versions") or {}).items()]))
    out.append("<details><summary>the report as JSON</summary><pre>"
               + escape(json.dumps(report, indent=1, sort_keys=True)) + "</pre></details>")
    out.append("</body></html>\n")
    return "".join(out)
