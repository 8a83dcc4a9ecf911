"""The operator's dashboard, served by the control API under /dashboard/.

Read-only: it shows both sites (this one from its own status; the peer as far as this site
knows it, from the replication session and the HA machine, because a site's control API
listens on its own host only), the recent event timeline, the drill history with links to
the reports, and pushes a fresh view every second over Server-Sent Events.

Access needs the control token: a login form takes it once and sets a signed session cookie
(HttpOnly, SameSite=Strict, Secure over TLS). The cookie is `expiry.nonce.hmac`, keyed from
the token: rotating the token ends every session, and no session state lives in the daemon.
A bearer token works too (curl). Without either, every dashboard URL but the login form and
its stylesheet answers 401 (a page GET is redirected to the login form).

Pure parts (session cookies, the view model, the rates) are plain functions; the aiohttp
handlers at the end are the I/O edge.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from aiohttp import web

from geomirror import dashboard_page

log = structlog.get_logger(__name__)

PREFIX = "/dashboard"
COOKIE = "gm_dashboard"
SESSION_TTL_S = 12 * 3600  # one on-call shift
PUSH_PERIOD_S = 0.5  # a switchover's steps take a second or two: the page shows them
_REPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,120}\.(json|html)$")


# ---------------------------------------------------------------- sessions (pure)

def _session_key(token: str) -> bytes:
    return hmac.new(token.encode(), b"geomirror dashboard session v1", hashlib.sha256).digest()


def issue_session(token: str, now: float, nonce: str | None = None, ttl_s: float = SESSION_TTL_S) -> str:
    """A session cookie value that `session_valid` accepts until now + ttl_s."""
    body = f"{int(now + ttl_s)}.{nonce or secrets.token_urlsafe(12)}"
    return f"{body}.{hmac.new(_session_key(token), body.encode(), hashlib.sha256).hexdigest()}"


def session_valid(token: str, cookie: str | None, now: float) -> bool:
    """The cookie was issued with this token and has not expired (signature compared in constant time)."""
    if not cookie or cookie.count(".") != 2:
        return False
    expiry, nonce, sig = cookie.split(".")
    want = hmac.new(_session_key(token), f"{expiry}.{nonce}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(sig.encode(), want.encode()):
        return False
    return expiry.isdigit() and int(expiry) > now


def token_matches(token: str, given: str) -> bool:
    return hmac.compare_digest(given.encode(), token.encode())


# ---------------------------------------------------------------- the view (pure)

@dataclass
class Rates:
    """Checkpoints per second and WAN bytes per second, from two status samples apart in time."""

    last: tuple[float, int, int] | None = None  # (monotonic t, committed epoch, wire bytes total)
    checkpoints_per_s: float | None = None
    wan_bytes_per_s: float | None = None
    min_span_s: float = 0.5

    def update(self, now: float, committed_epoch: int, wire_bytes: int | None) -> None:
        wire = wire_bytes or 0
        if self.last is not None:
            t, epoch, wb = self.last
            span = now - t
            if span < self.min_span_s:
                return
            # a new primary restarts its byte counter; epochs never go back at a site
            self.checkpoints_per_s = max(0.0, (committed_epoch - epoch) / span)
            self.wan_bytes_per_s = max(0.0, (wire - wb) / span) if wire >= wb else None
        self.last = (now, committed_epoch, wire)


def _round(v, nd=1):
    return None if v is None else round(float(v), nd)


def this_site(s: dict, rates: Rates) -> dict:
    """The card of the site serving the page, from its own status."""
    rep = s.get("replication") or {}
    pacer = s.get("pacer") or {}
    bgp = s.get("bgp") or {}
    running = s.get("ha_state") in ("active_protected", "active_unprotected")
    return {
        "name": s.get("site"), "source": "this site", "role": s.get("role"), "ha_state": s.get("ha_state"),
        "runs_guest": running,
        "lease_generation": s.get("lease_generation"), "holding_lease": (s.get("ha") or {}).get("holding_lease"),
        "committed_epoch": s.get("committed_epoch"), "protected": bool(s.get("protected")),
        "replication_state": rep.get("state"),
        "checkpoints_per_s": _round(rates.checkpoints_per_s) if running else None,
        "last_pause_ms": _round(s.get("last_pause_ms"), 2) if running else None,
        "interval_ms": _round(s.get("interval_ms")) if running else None,
        "interval_reason": pacer.get("reason") if running else None,
        "rtt_ms": _round(s.get("rtt_ms"), 2), "backlog_epochs": s.get("backlog_epochs"),
        "wan_bytes": rep.get("wire_bytes_total") if running else None,
        "wan_bytes_per_s": _round(rates.wan_bytes_per_s, 0) if running else None,
        "bgp_announced": bool(s.get("bgp_announced")), "bgp_backup": bool(s.get("bgp_backup")),
        "bgp_neighbors": bgp.get("neighbors") or {},
        "alarms": distinct_alarms(s.get("alarms") or []),
    }


def distinct_alarms(alarms: list, keep: int = 3) -> list[str]:
    """The newest alarms, one of each kind (the same first words: the pacer repeats its budget
    alarm with new figures), newest last."""
    out: dict[str, str] = {}
    for a in alarms:
        kind = " ".join(str(a).split()[:5])
        out.pop(kind, None)
        out[kind] = str(a)
    return list(out.values())[-keep:]


def peer_site(s: dict, peer: str | None) -> dict:
    """The peer's card: what this site knows of it (heartbeats, the replication session, the HA
    machine's view of routing). The peer's own control API is not asked: it listens on its host."""
    ha = s.get("ha") or {}
    rep = s.get("replication") or {}
    here_runs = s.get("ha_state") in ("active_protected", "active_unprotected", "handing_over")
    alive = bool(ha.get("peer_alive"))
    if here_runs:
        role = "standby" if rep.get("state") == "protected" else ("standby (syncing)" if rep.get("state") == "syncing"
                                                                  else "not replicating")
        epoch = s.get("committed_epoch")  # the last epoch it acknowledged
    elif s.get("ha_state") == "standby":
        role = "primary" if alive else "not heard"
        epoch = None  # its own epoch is not sent; ours (committed from it) is on our card
    else:
        role = "unknown" if not alive else "heard"
        epoch = None
    return {
        "name": peer or "the peer", "source": f"as seen from {s.get('site')}", "role": role,
        "heard": alive, "lease_generation": ha.get("seen_generation"), "committed_epoch": epoch,
        "rtt_ms": _round(s.get("rtt_ms"), 2), "cert_serial": rep.get("peer_cert_serial") or rep.get("peer"),
        "route_seen": ha.get("peer_route_seen"), "witness_reachable": ha.get("witness_reachable"),
    }


def headline(s: dict, peer: str | None) -> dict:
    """One line for the person on call: is the guest protected, and where does it run."""
    st, here = s.get("ha_state"), s.get("site")
    peer = peer or "the peer"
    epoch = s.get("committed_epoch")
    if st == "active_protected":
        return {"level": "ok", "title": "PROTECTED",
                "text": f"The guest runs at {here}; {peer} holds every epoch (committed {epoch})."}
    if st == "active_unprotected":
        return {"level": "bad", "title": "UNPROTECTED",
                "text": f"The guest runs at {here} but {peer} is not in sync: a loss of {here} now loses the guest."}
    if st == "standby":
        if (s.get("replication") or {}).get("state") == "replicating":
            return {"level": "ok", "title": "PROTECTED",
                    "text": f"The guest runs at {peer}; {here} holds the replica (committed epoch {epoch})."}
        return {"level": "warn", "title": "STANDBY NOT CURRENT",
                "text": f"{here} is the standby but receives no checkpoints from {peer} "
                        f"(replication {(s.get('replication') or {}).get('state', 'not started')})."}
    if st in ("taking_over", "handing_over", "starting"):
        return {"level": "warn", "title": "MOVING", "text": f"{here} is {st.replace('_', ' ')}."}
    return {"level": "bad", "title": (st or "unknown").upper(),
            "text": f"{here} does not run the guest and is not the standby ({st})."}


def view(s: dict, peer: str | None, rates: Rates, drills: list[dict], now: float) -> dict:
    return {"generated_at": now, "headline": headline(s, peer), "sites": [this_site(s, rates), peer_site(s, peer)],
            "timeline": [dict(e, site=s.get("site")) for e in reversed(s.get("timeline") or [])][:40],
            "drills": drills,
            "peer_note": f"{peer or 'The peer'} is shown as {s.get('site')} knows it (heartbeats, the replication "
                         "session, routing); its own dashboard is on its own control API."}


# ---------------------------------------------------------------- drill reports (I/O)

def list_drills(drills_dir: Path | None, keep: int = 20) -> list[dict]:
    """The newest drill reports under drills_dir (*.json, each maybe with its .html), newest first.
    A report that is not JSON is listed with verdict "unreadable" rather than hidden."""
    if drills_dir is None or not drills_dir.is_dir():
        return []
    out = []
    for p in sorted(drills_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)[:keep]:
        if not _REPORT_NAME.match(p.name):
            continue
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            data = {"verdict": "unreadable"}
        if not isinstance(data, dict):
            data = {"verdict": "unreadable"}
        moves = data.get("moves") if isinstance(data.get("moves"), list) else []
        html = p.with_suffix(".html")
        out.append({
            "name": p.stem, "verdict": str(data.get("verdict", "unknown")),
            "when": data.get("ended_at") or data.get("finished_at") or data.get("started_at") or p.stat().st_mtime,
            "moves": [f"{m.get('from')} → {m.get('to')}" for m in moves if isinstance(m, dict)],
            "epochs_lost": sum(m.get("epochs_lost") or 0 for m in moves if isinstance(m, dict)) if moves else None,
            "reason": data.get("reason") or data.get("abort_reason"),
            "json": f"{PREFIX}/drills/{p.name}", "html": f"{PREFIX}/drills/{html.name}" if html.exists() else None,
        })
    return out


# ---------------------------------------------------------------- the aiohttp edge

@dataclass
class Dashboard:
    status_fn: object  # () -> dict, the site's /v1/status
    token: str
    peer_name: str | None = None
    drills_dir: Path | None = None
    push_period_s: float = PUSH_PERIOD_S
    rates: Rates = field(default_factory=Rates)

    def current(self) -> dict:
        s = self.status_fn()
        self.rates.update(time.monotonic(), s.get("committed_epoch") or 0,
                          (s.get("replication") or {}).get("wire_bytes_total"))
        return view(s, self.peer_name, self.rates, list_drills(self.drills_dir), time.time())

    def authorized(self, request: web.Request) -> bool:
        if session_valid(self.token, request.cookies.get(COOKIE), time.time()):
            return True
        got = request.headers.get("Authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode())


_OPEN = {f"{PREFIX}/login", f"{PREFIX}/style.css"}
_SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # self-contained: nothing from elsewhere, no inline script (a report page may style itself inline)
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
}


DASHBOARD = web.AppKey("dashboard", Dashboard)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def make_subapp(dash: Dashboard) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler):
        if request.path not in _OPEN and not dash.authorized(request):
            log.info("dashboard.unauthorized", path=request.path, remote=request.remote)
            if request.method == "GET" and request.path == f"{PREFIX}/":
                resp = _see_other(f"{PREFIX}/login")
            else:
                resp = web.json_response({"error": "log in first (the dashboard needs the site's control token)"},
                                         status=401)
        else:
            resp = await handler(request)
        if not resp.prepared:  # an SSE stream has sent its headers already
            resp.headers.update(_SECURITY_HEADERS)
        return resp

    async def page(_):
        return web.Response(text=dashboard_page.PAGE, content_type="text/html")

    async def login_form(_):
        return web.Response(text=dashboard_page.login(None), content_type="text/html")

    async def login(request: web.Request):
        form = await request.post()
        given = form.get("token")
        if not isinstance(given, str) or not token_matches(dash.token, given.strip()):
            log.warning("dashboard.login_refused", remote=request.remote)
            return web.Response(text=dashboard_page.login("That is not this site's control token."),
                                content_type="text/html", status=401)
        log.info("dashboard.login", remote=request.remote)
        resp = _see_other(f"{PREFIX}/")
        resp.set_cookie(COOKIE, issue_session(dash.token, time.time()), max_age=SESSION_TTL_S, path=PREFIX,
                        httponly=True, samesite="Strict", secure=request.secure)
        return resp

    async def logout(_):
        resp = _see_other(f"{PREFIX}/login")
        resp.del_cookie(COOKIE, path=PREFIX)
        return resp

    async def data(_):
        return web.json_response(dash.current())

    async def events(request: web.Request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no",
                                           **_SECURITY_HEADERS})
        await resp.prepare(request)
        n = 0
        try:
            while True:
                n += 1
                await resp.write(f"id: {n}\nevent: view\ndata: {json.dumps(dash.current())}\n\n".encode())
                await asyncio.sleep(dash.push_period_s)
        except (ConnectionResetError, ConnectionError):
            pass  # the browser went away
        return resp

    async def report(request: web.Request):
        name = request.match_info["name"]
        if dash.drills_dir is None or not _REPORT_NAME.match(name):
            raise web.HTTPNotFound(text="no such drill report")
        path = dash.drills_dir / name
        if not path.is_file():
            raise web.HTTPNotFound(text="no such drill report")
        ctype = "application/json" if name.endswith(".json") else "text/html"
        return web.Response(body=path.read_bytes(), content_type=ctype)

    async def asset(request: web.Request):
        name = request.match_info["asset"]
        body, ctype = {"app.js": (dashboard_page.SCRIPT, "application/javascript"),
                       "style.css": (dashboard_page.STYLE, "text/css")}[name]
        return web.Response(text=body, content_type=ctype)

    sub = web.Application(middlewares=[guard])
    sub[DASHBOARD] = dash
    sub.add_routes([
        web.get("/", page),
        web.get("/login", login_form), web.post("/login", login), web.post("/logout", logout),
        web.get("/data", data), web.get("/events", events),
        web.get("/drills/{name}", report),
        web.get("/{asset:app\\.js|style\\.css}", asset),
    ])
    return sub
