"""Witness: a lease service (one holder per guest, fencing generations) over mutual TLS, and its client.

The pure core is `LeaseTable` (time is passed in). `WitnessServer` puts it behind aiohttp
with mutual TLS: the site is the CN of its client certificate, never the request body, and
only the sites the witness is configured with (`allowed_sites`, required) are served; any
other certificate of the pair CA, the witness's own included, gets 403.
Every change of generation or holder is on disk (temp, fsync, rename, fsync dir) before
the answer leaves. After a restart every lease counts as valid for its full TTL from the
restart, because the monotonic clock it was measured with is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import signal
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import structlog
from aiohttp import web

from geomirror import pairing
from geomirror.errors import GeomirrorError
from gmbase.files import atomic_write

log = structlog.get_logger(__name__)

GUEST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_TTL_MS, MAX_TTL_MS = 50, 600_000
STATE_FILE = "leases.json"


class WitnessError(GeomirrorError):
    """Base class of witness errors."""


class WitnessUnreachable(WitnessError):
    """No answer from the witness (connection refused, timeout, TLS handshake failed)."""


class WitnessRefused(WitnessError):
    """The witness answered with an error (4xx/5xx); the message is the witness's own."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(f"witness refused the request ({status}): {message}")


class LeaseStateError(WitnessError):
    """The witness state file is unreadable: the witness refuses to start rather than reuse a generation."""


# ---------------------------------------------------------------- pure core
@dataclass
class Lease:
    generation: int
    holder: str | None
    ttl_ms: int
    expires_at: float  # witness-local monotonic seconds
    released: bool = False

    def valid(self, now: float) -> bool:
        return self.holder is not None and not self.released and now < self.expires_at

    def expires_in_ms(self, now: float) -> int:
        return max(0, int((self.expires_at - now) * 1000)) if self.valid(now) else 0


class LeaseTable:
    """Leases per guest. A new grant (other site, or after expiry/release) increments the generation."""

    def __init__(self, leases: dict[str, Lease] | None = None):
        self.leases: dict[str, Lease] = dict(leases or {})

    @classmethod
    def restore(cls, data: dict, now: float) -> "LeaseTable":
        """From `dump()`; a lease that was held counts as valid for its full TTL from `now`."""
        leases = {}
        for guest, d in data.get("leases", {}).items():
            leases[guest] = Lease(int(d["generation"]), d.get("holder"), int(d["ttl_ms"]),
                                  now + int(d["ttl_ms"]) / 1000, bool(d.get("released", False)))
        return cls(leases)

    def dump(self) -> dict:
        """What must survive a restart (expiry times do not: they are re-derived conservatively)."""
        return {"version": 1, "leases": {g: {"generation": l.generation, "holder": l.holder,
                                             "ttl_ms": l.ttl_ms, "released": l.released}
                                         for g, l in sorted(self.leases.items())}}

    def acquire(self, guest: str, site: str, ttl_ms: int, now: float) -> dict:
        lease = self.leases.get(guest)
        if lease is not None and lease.valid(now):
            if lease.holder != site:
                return {"granted": False, "generation": lease.generation, "holder": lease.holder,
                        "expires_in_ms": lease.expires_in_ms(now)}
            lease.ttl_ms, lease.expires_at = ttl_ms, now + ttl_ms / 1000
        else:
            gen = (lease.generation if lease else 0) + 1
            lease = self.leases[guest] = Lease(gen, site, ttl_ms, now + ttl_ms / 1000)
        return {"granted": True, "generation": lease.generation, "holder": site,
                "expires_in_ms": lease.expires_in_ms(now)}

    def renew(self, guest: str, site: str, generation: int, ttl_ms: int, now: float) -> dict:
        lease = self.leases.get(guest)
        if lease is None or not lease.valid(now) or lease.holder != site or lease.generation != generation:
            holder = lease.holder if lease is not None and lease.valid(now) else None
            return {"renewed": False, "generation": lease.generation if lease else 0, "holder": holder,
                    "expires_in_ms": lease.expires_in_ms(now) if lease else 0}
        lease.ttl_ms, lease.expires_at = ttl_ms, now + ttl_ms / 1000
        return {"renewed": True, "generation": generation, "holder": site,
                "expires_in_ms": lease.expires_in_ms(now)}

    def release(self, guest: str, site: str, generation: int, now: float) -> dict:
        lease = self.leases.get(guest)
        ok = lease is not None and lease.holder == site and lease.generation == generation
        if ok and not lease.released:
            lease.released, lease.expires_at = True, now
        return {"released": ok, "generation": lease.generation if lease else 0}

    def view(self, guest: str, now: float) -> dict:
        lease = self.leases.get(guest)
        if lease is None:
            return {"guest": guest, "generation": 0, "holder": None, "last_holder": None,
                    "valid": False, "expires_in_ms": 0}
        valid = lease.valid(now)
        return {"guest": guest, "generation": lease.generation, "holder": lease.holder if valid else None,
                "last_holder": lease.holder, "valid": valid, "expires_in_ms": lease.expires_in_ms(now)}


# ---------------------------------------------------------------- persistence
def load_state(path: Path, now: float) -> LeaseTable:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return LeaseTable()
    try:
        return LeaseTable.restore(json.loads(raw), now)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LeaseStateError(f"witness state file {path} is corrupt ({e}): refusing to start, since "
                              "forgetting a lease generation could let two sites hold the lease") from None


def write_state(path: Path, data: dict) -> None:
    """Durably, atomically, mode 0600."""
    atomic_write(path, json.dumps(data, sort_keys=True))


# ---------------------------------------------------------------- server
def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class _BadRequest(Exception):
    pass


def peer_cn(peercert: dict | None) -> str | None:
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class WitnessServer:
    """The lease service. `start()` binds (port 0 picks a free port: see `.port`); `stop()` ends it."""

    def __init__(self, state_dir, host: str, port: int, ssl_context: ssl.SSLContext,
                 allowed_sites: set[str] | frozenset[str] | tuple[str, ...] | None):
        if not allowed_sites:
            raise WitnessError("the witness needs the names of the sites it serves (witness.sites): "
                               "without them any certificate of the pair CA could hold a lease")
        self.state_dir = Path(state_dir)
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.allowed_sites = frozenset(allowed_sites)
        self.state_path = self.state_dir / STATE_FILE
        self.table: LeaseTable | None = None
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/v1/lease/{guest}", self._get)
        app.router.add_post("/v1/lease/{guest}/acquire", self._acquire)
        app.router.add_post("/v1/lease/{guest}/renew", self._renew)
        app.router.add_post("/v1/lease/{guest}/release", self._release)
        return app

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.table = load_state(self.state_path, time.monotonic())
        for guest, lease in self.table.leases.items():
            log.info("lease.restored", guest=guest, generation=lease.generation, holder=lease.holder,
                     released=lease.released, valid_for_ms=lease.ttl_ms)
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise WitnessError(f"witness cannot listen on {self.host}:{self.port}: {e.strerror}") from None
        sock.listen(64)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()
        log.info("witness.listening", host=self.host, port=self.port, state=str(self.state_path),
                 allowed_sites=sorted(self.allowed_sites))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------ request plumbing
    def _site(self, request: web.Request) -> str:
        name = peer_cn(request.transport.get_extra_info("peercert") if request.transport else None)
        if name is None:
            raise web.HTTPForbidden(text=json.dumps({"error": "no client certificate with a CN"}),
                                    content_type="application/json")
        if name not in self.allowed_sites:
            log.warning("lease.refused", site=name, why="not in witness.sites")
            raise web.HTTPForbidden(text=json.dumps({"error": (
                f"certificate {name!r} is not one of the sites this witness serves "
                f"({', '.join(sorted(self.allowed_sites))}): it may not hold or read a lease")}),
                content_type="application/json")
        return name

    @staticmethod
    def _guest(request: web.Request) -> str:
        guest = request.match_info["guest"]
        if not GUEST_RE.match(guest):
            raise _BadRequest(f"guest name {guest!r} is invalid (letters, digits, '_', '.', '-'; at most 64)")
        return guest

    @staticmethod
    async def _body(request: web.Request, *fields: str) -> dict:
        raw = await request.read()
        try:
            body = json.loads(raw or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise _BadRequest(f"request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        for f in fields:
            v = body.get(f)
            if f not in body:
                raise _BadRequest(f"missing field {f!r}")
            if not isinstance(v, int) or isinstance(v, bool):
                raise _BadRequest(f"field {f!r} must be an integer, got {v!r}")
        if "ttl_ms" in fields and not MIN_TTL_MS <= body["ttl_ms"] <= MAX_TTL_MS:
            raise _BadRequest(f"ttl_ms {body['ttl_ms']} is outside {MIN_TTL_MS}..{MAX_TTL_MS}")
        if "generation" in fields and body["generation"] < 1:
            raise _BadRequest(f"generation {body['generation']} must be at least 1")
        return body

    async def _change(self, request: web.Request, op: str, fields: tuple[str, ...]) -> web.Response:
        try:
            site = self._site(request)
            guest = self._guest(request)
            body = await self._body(request, *fields)
        except _BadRequest as e:
            return _json_error(400, str(e))
        async with self._lock:
            before = self.table.dump()
            saved = {g: Lease(**asdict(l)) for g, l in self.table.leases.items()}
            now = time.monotonic()
            if op == "acquire":
                answer = self.table.acquire(guest, site, body["ttl_ms"], now)
            elif op == "renew":
                answer = self.table.renew(guest, site, body["generation"], body["ttl_ms"], now)
            else:
                answer = self.table.release(guest, site, body["generation"], now)
            after = self.table.dump()
            if after != before:
                try:
                    await asyncio.to_thread(write_state, self.state_path, after)
                except OSError as e:
                    self.table.leases = saved
                    log.error("lease.persist_failed", path=str(self.state_path), error=str(e))
                    return _json_error(503, f"witness cannot persist its state to {self.state_path}: "
                                            f"{e.strerror or e}; nothing was granted")
        ok = answer.get("granted", answer.get("renewed", answer.get("released")))
        level = log.debug if op == "renew" and ok else log.info
        level(f"lease.{op}", guest=guest, site=site, ok=ok, generation=answer["generation"],
              holder=answer.get("holder"))
        return web.json_response(answer)

    async def _acquire(self, request):
        return await self._change(request, "acquire", ("ttl_ms",))

    async def _renew(self, request):
        return await self._change(request, "renew", ("generation", "ttl_ms"))

    async def _release(self, request):
        return await self._change(request, "release", ("generation",))

    async def _get(self, request):
        self._site(request)
        try:
            guest = self._guest(request)
        except _BadRequest as e:
            return _json_error(400, str(e))
        return web.json_response(self.table.view(guest, time.monotonic()))

    async def _healthz(self, request):
        return web.json_response({"ok": True, "site": self._site(request), "guests": len(self.table.leases)})


async def serve_witness(state_dir, host: str, port: int, ssl_context: ssl.SSLContext,
                        allowed_sites: set[str] | None, identity=None) -> None:
    """Run the witness until cancelled. With `identity` (a pairing.TlsIdentity whose server
    context is `ssl_context`), a rotated certificate is taken up when its files change or on
    SIGHUP, without dropping a lease."""
    server = WitnessServer(state_dir, host, port, ssl_context, allowed_sites)
    await server.start()
    watcher = None
    if identity is not None:
        watcher = asyncio.create_task(pairing.watch_identity(
            identity, lambda: pairing.reload_logged(identity, "files changed", log)))
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, lambda: pairing.reload_logged(identity, "SIGHUP", log))
    try:
        await asyncio.Future()
    finally:
        if watcher:
            watcher.cancel()
        await server.stop()
        log.info("witness.stopped")


# ---------------------------------------------------------------- client
def _now() -> tuple[float, float]:
    """(monotonic, CLOCK_BOOTTIME) seconds, read before a request is sent."""
    return time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class LeaseResult:
    ok: bool  # granted / renewed / released
    generation: int
    holder: str | None
    expires_in_ms: int
    expires_at: float | None  # local time.monotonic(), counted from when the request was *sent*
    # the same deadline on CLOCK_BOOTTIME (counts through a suspend): the gate's `allow(until=)`
    expires_at_boottime: float | None = None


class HttpsSession:
    """An aiohttp session made on first use and closed once: `async with` or `close()`.
    (The lease backends' clients share this lifecycle.)"""

    _session: aiohttp.ClientSession | None = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class WitnessClient(HttpsSession):
    """Talks to one witness over mutual TLS; use as `async with` or call `close()`."""

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext, server_name: str = "witness",
                 timeout_s: float = 1.0):
        self.host, self.port, self.server_name = host, port, server_name
        self.ssl_context = ssl_context
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        h = f"[{host}]" if ":" in host else host
        self.base = f"https://{h}:{port}"

    def members_down(self) -> dict[str, str]:
        """One process, no members: its outage shows in every call (WitnessUnreachable)."""
        return {}

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        where = f"the witness ({self.server_name}) at {self.host}:{self.port}"
        try:
            async with self._session.request(method, self.base + path, json=body, ssl=self.ssl_context,
                                             server_hostname=self.server_name) as resp:
                try:
                    data = await resp.json(content_type=None)
                except ValueError:
                    data = None
                if resp.status != 200 or not isinstance(data, dict):
                    msg = data.get("error") if isinstance(data, dict) else None
                    raise WitnessRefused(resp.status, msg or f"{where} answered {method} {path} without JSON")
                return data
        except (aiohttp.ClientSSLError, ssl.SSLError) as e:
            raise WitnessUnreachable(f"TLS with {where} failed: {e}") from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            hint = ""
            if "reset by peer" in str(e):
                hint = " (a reset during the first exchange usually means it rejected this site's certificate)"
            raise WitnessUnreachable(f"{where} is unreachable: {type(e).__name__}: {e or 'timed out'}{hint}") from None

    @staticmethod
    def _result(data: dict, ok_key: str, sent: tuple[float, float]) -> LeaseResult:
        ok = bool(data.get(ok_key))
        ms = int(data.get("expires_in_ms", 0))
        valid = ok and ms
        return LeaseResult(ok, int(data.get("generation", 0)), data.get("holder"), ms,
                           sent[0] + ms / 1000 if valid else None, sent[1] + ms / 1000 if valid else None)

    async def acquire(self, guest: str, ttl_ms: int) -> LeaseResult:
        sent = _now()
        return self._result(await self._call("POST", f"/v1/lease/{guest}/acquire", {"ttl_ms": ttl_ms}),
                            "granted", sent)

    async def renew(self, guest: str, generation: int, ttl_ms: int) -> LeaseResult:
        sent = _now()
        data = await self._call("POST", f"/v1/lease/{guest}/renew", {"generation": generation, "ttl_ms": ttl_ms})
        return self._result(data, "renewed", sent)

    async def release(self, guest: str, generation: int) -> LeaseResult:
        sent = _now()
        data = await self._call("POST", f"/v1/lease/{guest}/release", {"generation": generation})
        return self._result(data, "released", sent)

    async def get(self, guest: str) -> dict:
        return await self._call("GET", f"/v1/lease/{guest}")

    async def health(self) -> dict:
        return await self._call("GET", "/healthz")
