"""The operator's probes: run through the whole drill, report their longest stall.

`tcp` opens a new connection to address:port every interval (a new client's view: SYN to
established); `memcached` keeps one connection and asks `version` every interval (an existing
client's view: the guest's TCP session carries on across the move, replies are only late);
`sip-options` sends a SIP OPTIONS over UDP every interval and waits for its 200 (the PBX's
view: what a phone's keep-alive sees).
The longest stall is the longest time without a good answer, from the drill's start to its end.
How a connection is opened is injected (the lab opens them inside its client namespace).
"""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

Connect = Callable[[str, int], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
UdpSocket = Callable[[str, int], socket.socket]  # a non-blocking UDP socket connected to (host, port)
KINDS = ("tcp", "memcached", "sip-options")
SIP_T1_S = 0.5  # RFC 3261's T1: a UDP request is sent again after T1, then 2·T1, …


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    kind: str  # tcp | memcached
    address: str
    port: int
    interval_ms: float = 100.0
    timeout_ms: float = 10000.0  # one attempt (a connect, or a reply on the kept connection)
    max_stall_ms: float = 0.0  # a longer stall fails the drill (0: reported, not judged)


async def _open(host: str, port: int):
    return await asyncio.open_connection(host, port)


def udp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        s.connect((host, port))
    except OSError:
        s.close()
        raise
    return s


def sip_options(target: str, port: int, local: tuple, cseq: int, call_id: str) -> bytes:
    """A SIP OPTIONS request to the PBX itself (no user part), answered by the proxy (pure)."""
    host = f"[{target}]" if ":" in target else target
    lhost = f"[{local[0]}]" if ":" in local[0] else local[0]
    return "\r\n".join([
        f"OPTIONS sip:{host}:{port} SIP/2.0",
        f"Via: SIP/2.0/UDP {lhost}:{local[1]};branch=z9hG4bK{secrets.token_hex(8)};rport",
        "Max-Forwards: 70",
        f"From: <sip:drill@{lhost}>;tag={secrets.token_hex(4)}",
        f"To: <sip:{host}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} OPTIONS",
        "User-Agent: geomirror-drill",
        "Content-Length: 0", "", ""]).encode()


def sip_reply_ok(data: bytes, call_id: str) -> bool | None:
    """True: a 200 to our request; False: another final answer to it; None: not ours (pure)."""
    head, _, _ = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines or not lines[0].startswith(b"SIP/2.0 "):
        return None
    if not any(ln.lower().startswith((b"call-id:", b"i:")) and ln.split(b":", 1)[1].strip() == call_id.encode()
               for ln in lines[1:]):
        return None
    code = lines[0][8:11]
    if code.startswith(b"1"):
        return None  # provisional: keep waiting
    return code == b"200"


class Probe:
    def __init__(self, spec: ProbeSpec, connect: Connect = _open, clock=time.monotonic,
                 udp: UdpSocket = udp_socket):
        if spec.kind not in KINDS:
            raise ValueError(f"probe {spec.name}: kind {spec.kind!r} is not one of {', '.join(KINDS)}")
        self.spec = spec
        self.connect = connect
        self.udp = udp
        self._sip: socket.socket | None = None
        self._cseq = 0
        self.clock = clock
        self.attempts = 0
        self.failures = 0
        self.last_error: str | None = None
        self.started: float | None = None
        self.last_ok: float | None = None
        self.longest: tuple[float, float] = (0.0, 0.0)  # (stall seconds, when it began)
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    def ok(self, now: float) -> None:
        """A good answer at `now`. Stalls count from the first one (opening the probe's own
        connection is not a stall of the service)."""
        if self.last_ok is not None and now - self.last_ok > self.longest[0]:
            self.longest = (now - self.last_ok, self.last_ok)
        self.last_ok = now

    async def attempt(self) -> bool:
        s = self.spec
        self.attempts += 1
        try:
            await asyncio.wait_for(self._once(), s.timeout_ms / 1000)
            return True
        except (OSError, asyncio.TimeoutError, ConnectionError, ValueError) as e:
            self.failures += 1
            self.last_error = str(e) or type(e).__name__
            self._drop()
            return False

    async def _once(self) -> None:
        s = self.spec
        if s.kind == "tcp":
            _, w = await self.connect(s.address, s.port)
            w.close()
            return
        if s.kind == "sip-options":
            await self._options()
            return
        if self._conn is None:
            self._conn = await self.connect(s.address, s.port)
        r, w = self._conn
        w.write(b"version\r\n")
        await w.drain()
        line = await r.readline()
        if not line.startswith(b"VERSION"):
            raise ConnectionError(f"memcached answered {line[:60]!r} to version")

    async def _options(self) -> None:
        s, loop = self.spec, asyncio.get_running_loop()
        if self._sip is None:
            self._sip = self.udp(s.address, s.port)
        self._cseq += 1
        call_id = f"{secrets.token_hex(8)}@geomirror-drill"
        request = sip_options(s.address, s.port, self._sip.getsockname()[:2], self._cseq, call_id)
        t1 = SIP_T1_S
        while True:  # RFC 3261 timer E: the same request again after T1, 2·T1, … (as a phone does)
            await loop.sock_sendall(self._sip, request)
            try:
                await asyncio.wait_for(self._sip_answer(call_id), t1)
                return
            except asyncio.TimeoutError:
                t1 = min(2 * t1, 4.0)

    async def _sip_answer(self, call_id: str) -> None:
        loop = asyncio.get_running_loop()
        while True:  # a late answer to an earlier attempt is not this one's
            ok = sip_reply_ok(await loop.sock_recv(self._sip, 65535), call_id)
            if ok is True:
                return
            if ok is False:
                raise ConnectionError("the PBX answered OPTIONS with an error")

    def _drop(self) -> None:
        if self._sip is not None:
            self._sip.close()
            self._sip = None
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None

    async def run(self, stop: asyncio.Event) -> None:
        self.started = self.clock()
        period = self.spec.interval_ms / 1000
        try:
            while not stop.is_set():
                if await self.attempt():
                    self.ok(self.clock())
                try:
                    await asyncio.wait_for(stop.wait(), period)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._drop()

    def result(self, origin_mono: float, end: float | None = None) -> dict:
        """The probe's line in the report; stall times in ms since `origin_mono` (the drill's start)."""
        end = self.clock() if end is None else end
        stall, began = self.longest
        since = self.last_ok if self.last_ok is not None else self.started
        if since is not None and end - since > stall:  # still stalled at the end
            stall, began = end - since, since
        s = self.spec
        return {"name": s.name, "kind": s.kind, "target": f"{s.address}:{s.port}", "attempts": self.attempts,
                "failures": self.failures, "last_error": self.last_error,
                "longest_stall_ms": round(stall * 1000, 1),
                "stall_began_ms": round((began - origin_mono) * 1000, 1) if stall else None,
                "max_stall_ms": s.max_stall_ms or None}
