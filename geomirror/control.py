"""The control API of a site: status, promote, fence, switchover, checkpoint policy, TLS reload,
metrics. Bearer token on every call
but /healthz. Served on TCP (127.0.0.1 by default) and on a UNIX socket (0600)."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

import aiohttp
from aiohttp import web
import structlog

log = structlog.get_logger(__name__)


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


def make_app(daemon, token: str) -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path == "/healthz":
            return await handler(request)
        got = request.headers.get("Authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            log.warning("control.unauthorized", path=request.path, remote=request.remote)
            return web.json_response({"error": "missing or wrong bearer token (see the site's control.token)"},
                                     status=401)
        return await handler(request)

    async def healthz(_):
        return web.json_response({"ok": True})

    async def status(_):
        return web.json_response(daemon.status())

    async def promote(request: web.Request):
        body = await _json(request)
        try:
            report = await daemon.promote(force=bool(body.get("force", False)))
        except Exception as e:
            return web.json_response({"error": str(e)}, status=409)
        return web.json_response(report)

    async def fence(request: web.Request):
        body = await _json(request)
        await daemon.fence(reason=str(body.get("reason", "operator")))
        return web.json_response(daemon.status())

    async def checkpoint(request: web.Request):
        body = await _json(request)
        try:
            r = daemon.set_checkpoint(body.get("adaptive"), body.get("interval_ms"))
        except (ValueError, AttributeError) as e:
            return web.json_response({"error": str(e)}, status=409)
        return web.json_response(r)

    async def switchover(request: web.Request):
        body = await _json(request)
        try:
            report = await daemon.switchover(timeout=float(body.get("timeout_s", 15.0)))
        except Exception as e:
            return web.json_response({"error": str(e)}, status=409)
        return web.json_response(report)

    async def reload_tls(_):
        info = daemon.reload_tls(reason="operator")
        if info is None:
            return web.json_response({"error": "the certificate files were refused (see the log line "
                                               "tls.reload_refused); still presenting the previous one"}, status=409)
        return web.json_response(info)

    async def tasks(_):
        """Where every asyncio task of the daemon is waiting (for support: a stuck daemon)."""
        import asyncio
        import io

        out = []
        for t in asyncio.all_tasks():
            buf = io.StringIO()
            t.print_stack(limit=12, file=buf)
            out.append({"name": t.get_name(), "done": t.done(), "stack": buf.getvalue()})
        return web.json_response({"tasks": out})

    async def metrics(_):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return web.Response(body=generate_latest(daemon.metrics_registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(middlewares=[auth], client_max_size=1 << 16)
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
    return app


async def _json(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except Exception:
        raise web.HTTPBadRequest(text="request body is not JSON")
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="request body must be a JSON object")
    return body


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
    """Talks to a site's control API over its UNIX socket (or TCP)."""

    def __init__(self, token: str, unix_path: Path | None = None, base: str = "http://localhost"):
        self.token = token
        self.unix_path = unix_path
        self.base = base

    async def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        conn = aiohttp.UnixConnector(path=str(self.unix_path)) if self.unix_path else None
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.request(method, self.base + path, json=body,
                                 headers={"Authorization": f"Bearer {self.token}"}) as r:
                data = await r.json(content_type=None)
                if r.status >= 400:
                    raise RuntimeError(f"{method} {path}: HTTP {r.status}: {data.get('error', data)}")
                return data
