"""The control API of a site: status, promote, fence, switchover, checkpoint policy, TLS reload,
metrics, and the operator's dashboard under /dashboard/ (geomirror/dashboard.py: a login form
that sets a session cookie, so a browser needs the token once). Bearer token on every call but
/healthz and the dashboard, which guards itself (cookie or bearer). Served on TCP (127.0.0.1 by default) and on a
UNIX socket (0600).

Answers: 200 with the result; 409 with {"error": sentence} when the daemon refuses (it raised a
GeomirrorError: `Refused` in the site's present state); 400 for a malformed request; 401 for a
missing or wrong token; 500 with {"error": ...} for a bug, logged as `control.bug` with its
traceback. `ControlClient.call` turns each into a `ControlError` of one sentence.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import os
import secrets
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import geomirror
from geomirror import dashboard
from gmbase.errors import GeomirrorError

log = structlog.get_logger(__name__)


class ControlError(GeomirrorError):
    """A control call did not give a result: the daemon refused, is not running, did not answer
    in time, or failed. The message is one sentence; `status` is the HTTP status if there was one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def load_or_create_token(path: Path) -> str:
    """The control token: created with 0600 on first start, read afterwards."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tok = path.read_text().strip()
        if tok:
            return tok
    except FileNotFoundError:
        pass
    tok = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(tok + "\n")
    return tok


def _error(status: int, sentence: str) -> web.Response:
    return web.json_response({"error": sentence}, status=status)


def _bad_request(sentence: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": sentence}), content_type="application/json")


def make_app(daemon, token: str, *, peer_name: str | None = None, drills_dir: Path | None = None) -> web.Application:
    """The API around `daemon`. `peer_name` and `drills_dir` (state_dir/drills) feed the dashboard."""
    # ------------------------------------------------------------ dashboard (geomirror/dashboard.py)
    # Its own sub-app under /dashboard with its own guard (session cookie or bearer token), so the
    # bearer check below lets requests routed into it through; nothing else is exempt.
    dash = dashboard.Dashboard(daemon.status, token, peer_name, drills_dir)
    dash_app = dashboard.make_subapp(dash)

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path == "/healthz" or dash_app in request.match_info.apps:
            return await handler(request)
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            log.warning("control.unauthorized", path=request.path, remote=request.remote)
            return _error(401, "missing or wrong bearer token (see the site's control.token)")
        return await handler(request)

    @web.middleware
    async def answers(request: web.Request, handler):
        """A refusal is 409 with its sentence; anything else a handler raises is a bug: 500."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except GeomirrorError as e:
            log.info("control.refused", method=request.method, path=request.path, reason=str(e))
            return _error(409, str(e))
        except Exception as e:  # noqa: BLE001 - a bug: logged with its traceback, answered 500
            log.exception("control.bug", method=request.method, path=request.path, error=type(e).__name__)
            return _error(500, f"internal error ({type(e).__name__}); see the daemon log, event control.bug")

    async def healthz(_):
        return web.json_response({"ok": True})

    async def status(_):
        return web.json_response(daemon.status())

    async def promote(request: web.Request):
        body = await _json(request)
        force = _field(body, "force", bool, False)
        return web.json_response(await daemon.promote(force=force))

    async def fence(request: web.Request):
        body = await _json(request)
        await daemon.fence(reason=_field(body, "reason", str, "operator"))
        return web.json_response(daemon.status())

    async def checkpoint(request: web.Request):
        body = await _json(request)
        adaptive = _field(body, "adaptive", bool, None)
        interval_ms = _field(body, "interval_ms", (int, float), None)
        forward = _field(body, "handover_forward_frames", bool, None)
        if forward is None:  # keeps the two-argument call of daemons (and fakes) without it
            return web.json_response(daemon.set_checkpoint(adaptive, interval_ms))
        return web.json_response(daemon.set_checkpoint(adaptive, interval_ms, handover_forward_frames=forward))

    async def switchover(request: web.Request):
        body = await _json(request)
        timeout = _field(body, "timeout_s", (int, float), 15.0)
        return web.json_response(await daemon.switchover(timeout=float(timeout)))

    async def reload_tls(_):
        info = daemon.reload_tls(reason="operator")
        if info is None:
            return _error(409, "the certificate files were refused (see the log line tls.reload_refused); "
                               "still presenting the previous one")
        return web.json_response(info)

    async def tasks(_):
        """Where every asyncio task of the daemon is waiting (for support: a stuck daemon)."""
        out = []
        for t in asyncio.all_tasks():
            buf = io.StringIO()
            t.print_stack(limit=12, file=buf)
            out.append({"name": t.get_name(), "done": t.done(), "stack": buf.getvalue()})
        return web.json_response({"tasks": out})

    async def metrics(_):
        return web.Response(body=generate_latest(daemon.metrics_registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    # a drill report (POST /v1/drills) carries both sites' timelines: up to 1 MiB
    app = web.Application(middlewares=[auth, answers], client_max_size=1 << 20)
    app[dashboard.DASHBOARD] = dash
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/v1/status", status),
        web.post("/v1/promote", promote),
        web.post("/v1/fence", fence),
        web.post("/v1/checkpoint", checkpoint),
        web.post("/v1/reload-tls", reload_tls),
        web.post("/v1/switchover", switchover),
        web.get("/metrics", metrics),
        web.get("/v1/debug/tasks", tasks),
    ])
    app.add_routes(_drill_routes(daemon))
    # ------------------------------------------------------------ dashboard routes (see above)
    app.add_subapp(dashboard.PREFIX, dash_app)
    return app


# ---------------------------------------------------------------- drills (geomirror/drill)
# The drill runner (geomirror/drill/runner.py) reads each site's timeline, holds the drill claim
# at both sites while it runs and leaves its report at both; `geomirror drill list` reads them.
# `daemon.drills` is the site's geomirror.drill.store.DrillStore.

def _drill_routes(daemon) -> list[web.RouteDef]:
    async def events(request: web.Request):
        try:
            since = float(request.query.get("since", "0"))
        except ValueError:
            raise _bad_request("since must be a Unix time in seconds") from None
        return web.json_response({"site": daemon.name, "asn": daemon.cfg.site.asn,
                                  "version": geomirror.__version__,
                                  "events": [e for e in daemon.timeline.entries if e["wall"] >= since]})

    async def claim(request: web.Request):
        body = await _json(request)
        rid = _field(body, "id", str, None)
        if rid is None:
            raise _bad_request("id is required (the drill's report id)")
        return web.json_response(daemon.drills.take(rid, _field(body, "by", str, "operator"),
                                                    float(_field(body, "ttl_s", (int, float), 1800))))

    async def release(request: web.Request):
        body = await _json(request)
        return web.json_response({"released": daemon.drills.give_back(_field(body, "id", str, ""))})

    async def save(request: web.Request):
        body = await _json(request)
        report = body.get("report")
        if not isinstance(report, dict):
            raise _bad_request("report must be a JSON object (a drill report)")
        return web.json_response(daemon.drills.save(report))

    async def listing(_):
        return web.json_response({"site": daemon.name, "running": daemon.drills.running(),
                                  "drills": daemon.drills.list()})

    async def one(request: web.Request):
        rid = request.match_info["id"]
        if rid.endswith(".html"):
            return web.FileResponse(daemon.drills.path(rid[:-5], ".html"),
                                    headers={"Content-Type": "text/html; charset=utf-8"})
        return web.json_response(json.loads(daemon.drills.path(rid, ".json").read_text()))

    return [web.get("/v1/drills/events", events), web.post("/v1/drills/claim", claim),
            web.post("/v1/drills/release", release), web.post("/v1/drills", save),
            web.get("/v1/drills", listing), web.get("/v1/drills/{id}", one)]


async def _json(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise _bad_request("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise _bad_request("the request body must be a JSON object")
    return body


_TYPE_NAMES = {bool: "true or false", str: "a string", (int, float): "a number"}


def _field(body: dict, key: str, types, default):
    """body[key] if it has the wanted JSON type (a bool is not a number here), else 400."""
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, types) and not (isinstance(v, bool) and types is not bool):
        return v
    raise _bad_request(f"{key} must be {_TYPE_NAMES[types]}, not {json.dumps(v)}")


async def start(app: web.Application, host: str, port: int, unix_path: Path | None) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    if unix_path is not None:
        unix_path.unlink(missing_ok=True)
        await web.UnixSite(runner, str(unix_path)).start()
        os.chmod(unix_path, 0o600)
    return runner


class ControlClient:
    """Talks to a site's control API over its UNIX socket (or TCP at `base`)."""

    def __init__(self, token: str, unix_path: Path | None = None, base: str = "http://localhost",
                 name: str = "the site's daemon"):
        self.token = token
        self.unix_path = unix_path
        self.base = base
        self.name = name  # for the sentences: "site-a's daemon is not running (...)"

    async def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        """The JSON answer of a 2xx; a ControlError of one sentence for anything else."""
        where = str(self.unix_path) if self.unix_path else self.base
        conn = aiohttp.UnixConnector(path=str(self.unix_path)) if self.unix_path else None
        try:
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                async with s.request(method, self.base + path, json=body,
                                     headers={"Authorization": f"Bearer {self.token}"}) as r:
                    status, text = r.status, await r.text()
        except aiohttp.ClientConnectorError as e:
            if isinstance(e.os_error, PermissionError):
                raise ControlError(f"cannot connect to {where}: permission denied; run this as root") from None
            raise ControlError(f"{self.name} is not running (nothing answers on {where})") from None
        except asyncio.TimeoutError:
            raise ControlError(f"{self.name} did not answer {method} {path} within {timeout:g} s "
                               f"(on {where})") from None
        except aiohttp.ClientError as e:
            raise ControlError(f"{self.name} dropped {method} {path} without an answer "
                               f"({type(e).__name__}, on {where})") from None
        return self._answer(method, path, status, text)

    def _answer(self, method: str, path: str, status: int, text: str) -> dict:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        said = data.get("error") if isinstance(data, dict) else None
        said = said or text.strip()[:200] or "no reason given"
        if status == 409:
            raise ControlError(said, status)
        if status == 401:
            raise ControlError(f"{self.name} refused the control token (HTTP 401): the token file is not the "
                               "one the daemon uses", status)
        if status == 400:
            raise ControlError(f"{self.name} rejected {method} {path} as malformed: {said}", status)
        if status >= 500:
            raise ControlError(f"{self.name} failed on {method} {path}: {said}", status)
        if status >= 300:
            raise ControlError(f"{self.name} answered {method} {path} with HTTP {status}: {said}", status)
        if not isinstance(data, dict):
            raise ControlError(f"{self.name} answered {method} {path} with something not a JSON object", status)
        return data
