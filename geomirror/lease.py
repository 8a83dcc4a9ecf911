"""Lease backends: one holder per guest with a fencing generation, behind one interface.

The HA machine (geomirror/ha.py) and the jobs that carry out its actions (geomirror/site/)
talk to a `LeaseBackend` and do not know which one it is:

* the built-in witness (`geomirror.witness.WitnessClient`), the default: one small process
  at a third location;
* etcd 3.4 (`EtcdLease`): the quorum engine operators already run, so no single machine
  decides a takeover.

Both answer with `witness.LeaseResult` and raise `LeaseUnreachable` (no answer) or
`LeaseError` (an answer that is an error). Those are the witness's own classes under
backend-neutral names, so `except WitnessUnreachable` in existing code catches the etcd
backend's errors too.

etcd is reached through its v3 JSON gateway (served on every member's client port) with
aiohttp, which the service already uses: plain HTTPS with a client certificate and a checked
server name, one request per operation, no new dependency. `aetcd` would bring a gRPC stack
(grpcio, protobuf) for five calls. Per guest, under `prefix`:

    <prefix>/<guest>/holder      {"site", "generation"}, attached to an etcd lease (the TTL)
    <prefix>/<guest>/generation  {"generation", "holder"}, no etcd lease: the fencing counter

* acquire: read both keys. The holder key absent: grant an etcd lease, then one transaction
  that compares the holder key's create_revision with 0 and the counter's mod_revision with
  the one read, bumps the counter to g+1 and puts the holder key with the etcd lease. So the
  generation is decided by etcd's linearizable transaction and only ever grows. The holder
  key ours: put it again with a new etcd lease (same generation, extended), compared on its
  mod_revision. Anyone else's: denied.
* renew: check that the holder key is ours at that generation, then keep-alive its etcd
  lease. A new holder always has a new etcd lease ID, so an old holder's late keep-alive can
  never extend someone else's lease; an expired lease answers TTL 0: refused.
* release: revoke the etcd lease of the holder key if it is ours at that generation.

Expiry is counted, as for the witness, from when the request was sent: the grant (acquire)
or the keep-alive (renew). etcd counts lease TTLs in whole seconds and never grants less
than its minimum (1.5 election timeouts, 2 s with etcd's defaults); the TTL it reports is
the one used. A new etcd leader extends leases (never shortens them).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable
from urllib.parse import urlsplit

import aiohttp
import structlog

from geomirror import pairing
from geomirror.witness import GUEST_RE, HttpsSession, LeaseResult, WitnessClient, WitnessError, WitnessUnreachable

if TYPE_CHECKING:
    from geomirror.config import SiteConfig

log = structlog.get_logger(__name__)

LeaseError = WitnessError  # an answer that is an error (every lease backend)
LeaseUnreachable = WitnessUnreachable  # no answer from the lease backend

# gRPC codes (etcd's gateway puts them in "code") that mean "no answer from the cluster"
_NO_ANSWER_CODES = {1: "canceled", 4: "deadline exceeded", 14: "unavailable"}
MIN_ETCD_VERSION = (3, 4)


class EtcdError(LeaseError):
    """etcd answered with an error, or its lease keys are not in geomirror's format."""


class EtcdUnreachable(EtcdError, LeaseUnreachable):
    """No etcd member answered (connection, TLS, timeout, or no quorum)."""


@runtime_checkable
class LeaseBackend(Protocol):
    """What a site asks of whoever grants its guest's lease."""

    async def acquire(self, guest: str, ttl_ms: int) -> LeaseResult: ...
    async def renew(self, guest: str, generation: int, ttl_ms: int) -> LeaseResult: ...
    async def release(self, guest: str, generation: int) -> LeaseResult: ...
    async def get(self, guest: str) -> dict: ...  # generation, holder, last_holder, valid, expires_in_ms
    async def health(self) -> dict: ...
    def members_down(self) -> dict[str, str]: ...  # member -> why, as of the last look (witness: none)
    async def close(self) -> None: ...


def _now() -> tuple[float, float]:
    """(monotonic, CLOCK_BOOTTIME) seconds, read before a request is sent."""
    return time.monotonic(), time.clock_gettime(time.CLOCK_BOOTTIME)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _prefix_end(key: str) -> str:
    """etcd's range_end for every key that starts with `key` (its last byte plus one)."""
    b = key.encode()
    return base64.b64encode(b[:-1] + bytes([b[-1] + 1])).decode()


def ttl_seconds(ttl_ms: int) -> int:
    """etcd leases count whole seconds: a TTL in ms rounded up (never shorter than asked)."""
    return max(1, math.ceil(ttl_ms / 1000))


# ---------------------------------------------------------------- the keys (pure)
@dataclass(frozen=True)
class EtcdKey:
    name: str
    value: dict
    lease: int
    create_revision: int
    mod_revision: int


@dataclass(frozen=True)
class GuestKeys:
    """The two keys of one guest's lease and what they hold now (None: absent)."""

    holder_key: str
    counter_key: str
    holder: EtcdKey | None = None
    counter: EtcdKey | None = None

    @property
    def holder_site(self) -> str | None:
        return self.holder.value["site"] if self.holder else None

    @property
    def generation(self) -> int:
        """The holder's generation, else the last one handed out (0: never)."""
        if self.holder is not None:
            return self.holder.value["generation"]
        return self.counter.value["generation"] if self.counter is not None else 0

    def with_kvs(self, kvs: list[dict]) -> "GuestKeys":
        found = {}
        for kv in kvs:
            name = base64.b64decode(kv.get("key", "")).decode(errors="replace")
            if name not in (self.holder_key, self.counter_key):
                continue
            raw = base64.b64decode(kv.get("value", ""))
            try:
                value = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                value = None
            want = ("site", "generation") if name == self.holder_key else ("generation",)
            if not isinstance(value, dict) or any(k not in value for k in want) \
                    or not isinstance(value["generation"], int) or isinstance(value["generation"], bool) \
                    or value["generation"] < (1 if name == self.holder_key else 0) \
                    or (name == self.holder_key and not isinstance(value["site"], str)):
                raise EtcdError(f"etcd key {name} holds {raw[:80]!r}, which is not a geomirror lease: "
                                "refusing to touch it (does something else write under lease.prefix?)")
            found[name] = EtcdKey(name, value, int(kv.get("lease", 0)), int(kv.get("create_revision", 0)),
                                  int(kv.get("mod_revision", 0)))
        return GuestKeys(self.holder_key, self.counter_key, found.get(self.holder_key),
                         found.get(self.counter_key))


# ---------------------------------------------------------------- the etcd backend
class _NoAnswer(Exception):
    """One member did not answer usefully; the next one is tried."""


class EtcdLease(HttpsSession):
    """The lease held in an etcd 3.4+ cluster, through its JSON gateway over mutual TLS.

    `endpoints` are client URLs (https://host:port); they are tried in turn, starting with the
    last one that answered. `site` is the holder name written into the keys (this site's name,
    the name its certificate carries). `server_name` is the name every member's certificate
    must carry (None: each endpoint's host). `timeout_s` bounds each attempt at one member.
    """

    def __init__(self, endpoints: Sequence[str], ssl_context: ssl.SSLContext, site: str, *,
                 prefix: str = "/geomirror", server_name: str | None = None, timeout_s: float = 1.0):
        if not endpoints:
            raise EtcdError("the etcd lease backend needs at least one endpoint (lease.endpoints)")
        self.endpoints = tuple(e.rstrip("/") for e in endpoints)
        self.ssl_context = ssl_context
        self.site = site
        self.prefix = prefix.rstrip("/")
        self.server_name = server_name or None
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._current = 0
        self.down: dict[str, str] = {}  # members that did not answer at the last try: url -> why
        self._session: aiohttp.ClientSession | None = None

    def keys(self, guest: str) -> GuestKeys:
        if not GUEST_RE.match(guest):
            raise EtcdError(f"guest name {guest!r} is invalid (letters, digits, '_', '.', '-'; at most 64)")
        return GuestKeys(f"{self.prefix}/{guest}/holder", f"{self.prefix}/{guest}/generation")

    # ------------------------------------------------------------ transport
    def _where(self, url: str) -> str:
        return f"etcd at {url}" + (f" (as {self.server_name})" if self.server_name else "")

    async def _one(self, url: str, method: str, path: str, body: dict | None) -> dict:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.request(method, url + path, json=body, ssl=self.ssl_context,
                                             server_hostname=self.server_name) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorCertificateError as e:
            raise _NoAnswer(f"etcd's certificate fails verification ({e.certificate_error}): is it issued by "
                            f"the CA this site trusts for etcd and for the name "
                            f"{self.server_name or urlsplit(url).hostname}?")
        except (aiohttp.ClientSSLError, ssl.SSLError) as e:
            raise _NoAnswer(f"TLS failed: {e}")
        except aiohttp.ClientConnectorError as e:
            raise _NoAnswer(f"cannot connect: {e.os_error}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            text = f"{type(e).__name__}: {e}" if str(e) else f"no answer within {self.timeout.total:g} s"
            trust = "is it issued by a CA in etcd's --trusted-ca-file?"
            if "alert" in text:
                text += f" (etcd refused this site's certificate: {trust})"
            elif any(s in text for s in ("reset by peer", "Server disconnected", "EOF occurred")):
                text += f" (a reset during the first exchange usually means etcd refused this site's certificate: {trust})"
            raise _NoAnswer(text)
        data = self._decode(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if status != 200 or err is not None or not isinstance(data, dict):
            if isinstance(err, dict):  # a streamed call's error: {"error": {"grpc_code", "message"}}
                code, msg = err.get("grpc_code", err.get("code")), err.get("message")
            else:
                code = data.get("code") if isinstance(data, dict) else None
                msg = (data.get("message") or err) if isinstance(data, dict) else None
            msg = msg or f"HTTP {status}: {raw[:120]!r}"
            if code in _NO_ANSWER_CODES or status in (502, 503, 504):
                raise _NoAnswer(f"{msg} ({_NO_ANSWER_CODES.get(code, f'HTTP {status}')})")
            raise EtcdError(f"{self._where(url)} refused {method} {path}: {msg}")
        return data

    @staticmethod
    def _decode(raw: bytes):
        """JSON, or the first object of a streamed answer (keep-alive: one {"result": ...} a line)."""
        for line in raw.splitlines() or [b""]:
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except (ValueError, UnicodeDecodeError):
                return None
            return data.get("result", data) if isinstance(data, dict) and "result" in data else data
        return None

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        failures = []
        n = len(self.endpoints)
        for i in range(n):
            k = (self._current + i) % n
            url = self.endpoints[k]
            try:
                data = await self._one(url, method, path, body)
            except _NoAnswer as e:
                failures.append(f"{url}: {e}")
                self._member(url, str(e))
                continue
            self._member(url, None)
            self._current = k
            return data
        who = self.server_name or "etcd"
        raise EtcdUnreachable(f"no etcd member ({who}) answered {path}: " + "; ".join(failures))

    def _member(self, url: str, why: str | None) -> None:
        """Log a member that stops answering (the cluster may still have its quorum) and its return."""
        if why is not None and url not in self.down:
            self.down[url] = why
            log.warning("lease.etcd_member_down", site=self.site, endpoint=url, error=why,
                        members=len(self.endpoints), down=len(self.down))
        elif why is None and url in self.down:
            del self.down[url]
            log.info("lease.etcd_member_back", site=self.site, endpoint=url, down=len(self.down))

    # ------------------------------------------------------------ etcd calls
    async def _read(self, keys: GuestKeys) -> GuestKeys:
        d = keys.holder_key.rsplit("/", 1)[0] + "/"
        data = await self._call("POST", "/v3/kv/range", {"key": _b64(d), "range_end": _prefix_end(d)})
        return keys.with_kvs(data.get("kvs", []))

    async def _grant(self, ttl_s: int) -> tuple[int, int]:
        data = await self._call("POST", "/v3/lease/grant", {"TTL": str(ttl_s)})
        return int(data["ID"]), int(data["TTL"])

    async def _keepalive(self, lease_id: int) -> int:
        """The etcd lease's TTL after the keep-alive; 0 if it had expired (or was revoked)."""
        data = await self._call("POST", "/v3/lease/keepalive", {"ID": str(lease_id)})
        return int(data.get("TTL", 0))

    async def _time_to_live(self, lease_id: int) -> int:
        """Whole seconds left (rounded down: 0 is under a second), or -1 when the etcd lease is gone."""
        data = await self._call("POST", "/v3/lease/timetolive", {"ID": str(lease_id)})
        return int(data.get("TTL", 0))  # the gateway leaves out fields that are 0

    async def _revoke(self, lease_id: int) -> bool:
        try:
            await self._call("POST", "/v3/lease/revoke", {"ID": str(lease_id)})
        except EtcdError as e:
            if "lease not found" in str(e):
                return False
            raise
        return True

    async def _revoke_quietly(self, lease_id: int) -> None:
        """Give back an etcd lease nothing should be attached to (it also expires on its own)."""
        try:
            await self._revoke(lease_id)
        except EtcdError as e:
            log.info("lease.etcd_revoke_failed", lease=lease_id, error=str(e))

    @staticmethod
    def _put(key: str, value: dict, lease: int = 0) -> dict:
        put = {"key": _b64(key), "value": _b64(json.dumps(value, sort_keys=True))}
        if lease:
            put["lease"] = str(lease)
        return {"request_put": put}

    # ------------------------------------------------------------ the interface
    async def acquire(self, guest: str, ttl_ms: int) -> LeaseResult:
        keys = await self._read(self.keys(guest))
        for _ in range(3):
            h = keys.holder
            if h is not None and h.value["site"] != self.site:
                return LeaseResult(False, keys.generation, keys.holder_site, 0, None)
            sent = _now()
            lease_id, ttl = await self._grant(ttl_seconds(ttl_ms))
            if h is None:  # free: the next generation, decided by the transaction
                gen = keys.generation + 1
                c = keys.counter
                compare = [{"target": "CREATE", "key": _b64(keys.holder_key), "create_revision": "0",
                            "result": "EQUAL"},
                           {"target": "MOD", "key": _b64(keys.counter_key),
                            "mod_revision": str(c.mod_revision if c else 0), "result": "EQUAL"}]
                success = [self._put(keys.counter_key, {"generation": gen, "holder": self.site}),
                           self._put(keys.holder_key, {"site": self.site, "generation": gen}, lease_id)]
            else:  # ours: same generation, a new etcd lease (extended, with the TTL asked now)
                gen = h.value["generation"]
                compare = [{"target": "MOD", "key": _b64(keys.holder_key), "mod_revision": str(h.mod_revision),
                            "result": "EQUAL"}]
                success = [self._put(keys.holder_key, h.value, lease_id)]
            d = keys.holder_key.rsplit("/", 1)[0] + "/"
            data = await self._call("POST", "/v3/kv/txn", {
                "compare": compare, "success": success,
                "failure": [{"request_range": {"key": _b64(d), "range_end": _prefix_end(d)}}]})
            if data.get("succeeded"):
                if h is not None:
                    await self._revoke_quietly(h.lease)  # the key left it for the new one
                log.info("lease.etcd_acquired", guest=guest, site=self.site, generation=gen, ttl_s=ttl,
                         renewed_hold=h is not None)
                return LeaseResult(True, gen, self.site, ttl * 1000, sent[0] + ttl, sent[1] + ttl)
            await self._revoke_quietly(lease_id)
            kvs = [kv for r in data.get("responses", []) for kv in r.get("response_range", {}).get("kvs", [])]
            keys = keys.with_kvs(kvs)
        raise EtcdError(f"the lease keys of guest {guest} under {self.prefix} changed during each of three "
                        "attempts to acquire them: another writer is racing this site")

    async def renew(self, guest: str, generation: int, ttl_ms: int) -> LeaseResult:
        """Keep-alive: the etcd lease keeps the TTL it was granted with (`ttl_ms` is not applied)."""
        keys = await self._read(self.keys(guest))
        h = keys.holder
        if h is None or h.value["site"] != self.site or h.value["generation"] != generation:
            return LeaseResult(False, keys.generation, keys.holder_site, 0, None)
        sent = _now()
        ttl = await self._keepalive(h.lease)
        if ttl <= 0:
            return LeaseResult(False, generation, None, 0, None)
        return LeaseResult(True, generation, self.site, ttl * 1000, sent[0] + ttl, sent[1] + ttl)

    async def release(self, guest: str, generation: int) -> LeaseResult:
        keys = await self._read(self.keys(guest))
        h = keys.holder
        if h is None or h.value["site"] != self.site or h.value["generation"] != generation:
            return LeaseResult(False, keys.generation, keys.holder_site, 0, None)
        await self._revoke(h.lease)  # only our key is attached to it: someone else's is never touched
        log.info("lease.etcd_released", guest=guest, site=self.site, generation=generation)
        return LeaseResult(True, generation, None, 0, None)

    async def get(self, guest: str) -> dict:
        keys = await self._read(self.keys(guest))
        h = keys.holder
        ttl = await self._time_to_live(h.lease) if h is not None else -1
        valid = ttl >= 0  # the key and its etcd lease exist (etcd deletes the key when the lease ends)
        ttl = max(0, ttl)
        last = keys.holder_site or (keys.counter.value.get("holder") if keys.counter else None)
        return {"guest": guest, "generation": keys.generation, "holder": keys.holder_site if valid else None,
                "last_holder": last, "valid": valid, "expires_in_ms": ttl * 1000}

    async def _member_health(self, url: str) -> str | None:
        """None if the member reports itself healthy (a leader, no alarm: etcd's /health), else why not."""
        try:
            data = await self._one(url, "GET", "/health", None)
        except _NoAnswer as e:
            return str(e)
        except EtcdError as e:
            return str(e)
        return None if str(data.get("health")) == "true" else "unhealthy (no leader or no quorum)"

    def members_down(self) -> dict[str, str]:
        """The members that did not answer at the last try (or health check): endpoint -> why."""
        return dict(self.down)

    async def health(self) -> dict:
        """Asks every member at once; fine while one is healthy. A member that stops answering is
        logged (`lease.etcd_member_down`) though the lease still works through the others."""
        answers = await asyncio.gather(*(self._member_health(url) for url in self.endpoints))
        for url, why in zip(self.endpoints, answers):
            self._member(url, why)
        healthy = [url for url, why in zip(self.endpoints, answers) if why is None]
        if not healthy:
            raise EtcdUnreachable("no healthy etcd member: " + "; ".join(
                f"{url}: {why}" for url, why in zip(self.endpoints, answers)))
        return {"ok": True, "backend": "etcd", "healthy": healthy, "down": dict(self.down)}

    async def describe(self, guest: str) -> str:
        """One line for `geomirror config check --files`: what each member said, the guest's lease."""
        answered, failed, version = [], [], None
        for url in self.endpoints:
            try:
                v = await self._one(url, "GET", "/version", None)
                h = await self._one(url, "GET", "/health", None)
            except _NoAnswer as e:
                failed.append(f"{url}: {e}")
                continue
            version = str(v.get("etcdserver", "?"))
            nums = tuple(int(x) for x in version.split(".")[:2] if x.isdigit())
            if nums < MIN_ETCD_VERSION:
                raise EtcdError(f"etcd at {url} is version {version}; geomirror needs etcd 3.4 or later "
                                "(its /v3 gateway)")
            (answered if str(h.get("health")) == "true" else failed).append(
                url if str(h.get("health")) == "true" else f"{url}: unhealthy (no leader or no quorum)")
        if not answered:
            raise EtcdUnreachable("no healthy etcd member: " + "; ".join(failed))
        st = await self.get(guest)
        lease = (f"held by {st['holder']} at generation {st['generation']}" if st["valid"]
                 else f"free (last generation {st['generation']})")
        return (f"etcd {version}: {len(answered)} of {len(self.endpoints)} members healthy"
                + (f" (not: {'; '.join(failed)})" if failed else "")
                + f"; lease of guest {guest} under {self.prefix}: {lease}")


# ---------------------------------------------------------------- from the config
def lease_ssl_context(cfg: "SiteConfig", tls_identity: pairing.TlsIdentity | None) -> ssl.SSLContext:
    """The client context for the lease backend: the site's own (reloaded in place on rotation),
    or one from lease.ca/cert/key when the operator gives etcd its own CA."""
    lease = cfg.lease
    if lease.ca is None:
        if tls_identity is not None:
            return tls_identity.client
        return pairing.client_context(cfg.tls.ca, cfg.tls.cert, cfg.tls.key)
    return pairing.client_context(lease.ca, lease.cert, lease.key)


def make_etcd(cfg: "SiteConfig", tls_identity: pairing.TlsIdentity | None) -> EtcdLease:
    lease = cfg.lease
    return EtcdLease(lease.endpoints, lease_ssl_context(cfg, tls_identity), cfg.site.name, prefix=lease.prefix,
                     server_name=lease.server_name or None,
                     timeout_s=max(0.3, lease.renew_every_ms / 1000 / len(lease.endpoints)))


def make_lease_backend(cfg: "SiteConfig", tls_identity: pairing.TlsIdentity) -> LeaseBackend | None:
    """The lease backend `cfg` names ([lease] backend), or None without one (no automatic takeover)."""
    if cfg.lease.backend == "etcd":
        return make_etcd(cfg, tls_identity)
    w = cfg.witness
    if w is None:
        return None
    return WitnessClient(str(w.address), w.port, tls_identity.client, server_name=w.name,
                         timeout_s=max(0.3, w.renew_every_ms / 1000))


async def describe_etcd(cfg: "SiteConfig") -> str:
    async with make_etcd(cfg, None) as backend:
        return await backend.describe(cfg.guest.name)
