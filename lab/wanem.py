"""The lab's WAN: a user-space link emulator between the two sites (a lab tool, not in
the product's data path; this kernel has no netem).

One process in the gm-wan namespace owns two TAP devices, created inside the site
namespaces as their ``wan0``. Every frame a site sends on wan0 is read here and
written to the other site's wan0 after the configured one-way delay (RTT/2), jitter,
loss and serialisation at the configured rate, FIFO per direction (no reordering),
with a tail-drop queue. Settings change at run time over a UNIX control socket.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import os
import random
import re
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog
import uvloop
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from geomirror import logging as gmlog
from geomirror import netns
from lab import world
from replication.gate import open_tap

log = structlog.get_logger(__name__)
MAX_FRAME = 65536


@dataclass
class WanSettings:
    rtt_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0  # probability 0..1
    rate_bps: float = 0.0  # bits per second, 0 = unlimited
    queue_bytes: int = 4 << 20

    def describe(self) -> str:
        rate = f"{self.rate_bps / 1e6:g}mbit" if self.rate_bps else "unlimited"
        return f"rtt {self.rtt_ms:g}ms jitter {self.jitter_ms:g}ms loss {self.loss * 100:g}% rate {rate}"


_UNITS = {"": 1, "bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def parse_duration_ms(s: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)?\s*", s)
    if not m:
        raise ValueError(f"{s!r} is not a duration (e.g. 25ms)")
    v = float(m.group(1))
    return {"us": v / 1000, "ms": v, "s": v * 1000, None: v}[m.group(2)]


def parse_rate_bps(s: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmg]?bit)?\s*", s.lower())
    if not m:
        raise ValueError(f"{s!r} is not a rate (e.g. 100mbit)")
    return float(m.group(1)) * _UNITS[m.group(2) or ""]


def parse_loss(s: str) -> float:
    s = s.strip()
    v = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    if not 0 <= v <= 1:
        raise ValueError(f"loss {s!r} is not between 0% and 100%")
    return v


class Direction:
    """One direction of the link: a FIFO with delay, jitter, loss and a rate."""

    def __init__(self, name: str, out_fd: int, settings: WanSettings):
        self.name = name
        self.out_fd = out_fd
        self.s = settings
        self.queue: list[tuple[float, int, bytes]] = []
        self.seq = 0
        self.queued_bytes = 0
        self.last_departure = 0.0
        self.stats = {"frames": 0, "bytes": 0, "lost": 0, "dropped": 0}

    def admit(self, frame: bytes, now: float) -> None:
        s = self.s
        if s.loss and random.random() < s.loss:
            self.stats["lost"] += 1
            return
        if self.queued_bytes + len(frame) > s.queue_bytes:
            self.stats["dropped"] += 1
            return
        delay = s.rtt_ms / 2000 + (random.uniform(-s.jitter_ms, s.jitter_ms) / 1000 if s.jitter_ms else 0)
        t = now + max(delay, 0)
        if s.rate_bps:
            t = max(t, self.last_departure + len(frame) * 8 / s.rate_bps)
        t = max(t, self.last_departure)  # FIFO: never reorder
        self.last_departure = t
        self.seq += 1
        heapq.heappush(self.queue, (t, self.seq, frame))
        self.queued_bytes += len(frame)

    def due(self, now: float) -> None:
        q = self.queue
        while q and q[0][0] <= now:
            _, _, frame = heapq.heappop(q)
            self.queued_bytes -= len(frame)
            try:
                os.write(self.out_fd, frame)
                self.stats["frames"] += 1
                self.stats["bytes"] += len(frame)
            except OSError:  # the far side's wan0 is down (partition, crash)
                self.stats["dropped"] += 1

    def next_time(self) -> float | None:
        return self.queue[0][0] if self.queue else None


class WanEmulator:
    def __init__(self, ends: list[tuple[str, str, str]], control_path: Path, settings: WanSettings | None = None):
        """ends: [(netns, ifname, address/prefixlen)] for the two sites."""
        self.ends = ends
        self.control_path = control_path
        self.settings = settings or WanSettings()
        self.fds: list[int] = []
        self.dirs: list[Direction] = []
        self._wake = asyncio.Event()

    def _make_taps(self) -> None:
        from pyroute2 import IPRoute

        for ns, ifname, addr in self.ends:
            with netns.inside(ns):
                fd = open_tap(ifname)
                with IPRoute() as ip:
                    idx = ip.link_lookup(ifname=ifname)[0]
                    a, plen = addr.split("/")
                    ip.addr("add", index=idx, address=a, prefixlen=int(plen))
                    ip.link("set", index=idx, state="up", mtu=1500)
                    a6 = world.WAN_ENDS6.get(ns)
                    if a6:  # the inter-site link carries IPv6 too (forwarding on a planned move)
                        a, plen = a6.split("/")
                        ip.addr("add", index=idx, family=socket.AF_INET6, address=a, prefixlen=int(plen),
                                flags=IFA_F_NODAD)
            self.fds.append(fd)

    async def run(self) -> None:
        await asyncio.to_thread(self._make_taps)
        a, b = self.fds
        self.dirs = [Direction("a->b", b, self.settings), Direction("b->a", a, self.settings)]
        loop = asyncio.get_running_loop()
        loop.add_reader(a, self._readable, a, self.dirs[0])
        loop.add_reader(b, self._readable, b, self.dirs[1])
        self.control_path.unlink(missing_ok=True)
        server = await asyncio.start_unix_server(self._control, path=str(self.control_path))
        os.chmod(self.control_path, 0o600)
        log.info("wan.start", settings=self.settings.describe())
        async with server:
            await self._pump()

    def _readable(self, fd: int, d: Direction) -> None:
        now = time.monotonic()
        for _ in range(64):
            try:
                frame = os.read(fd, MAX_FRAME)
            except (BlockingIOError, OSError):
                break
            d.admit(frame, now)
        d.due(now)
        self._wake.set()

    async def _pump(self) -> None:
        while True:
            now = time.monotonic()
            for d in self.dirs:
                d.due(now)
            times = [t for t in (d.next_time() for d in self.dirs) if t is not None]
            self._wake.clear()
            timeout = max(min(times) - time.monotonic(), 0) if times else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            req = json.loads(line or b"{}")
            for k, v in (req.get("set") or {}).items():
                if k not in asdict(self.settings):
                    raise ValueError(f"unknown WAN setting {k!r}")
                setattr(self.settings, k, type(getattr(self.settings, k))(v))
            if req.get("set"):
                log.info("wan.settings", settings=self.settings.describe())
            reply = {"settings": asdict(self.settings), "describe": self.settings.describe(),
                     "stats": {d.name: d.stats for d in self.dirs}}
        except (ValueError, TypeError) as e:
            reply = {"error": str(e)}
        writer.write(json.dumps(reply).encode() + b"\n")
        await writer.drain()
        writer.close()


async def control(path: Path, settings: dict | None = None) -> dict:
    r, w = await asyncio.open_unix_connection(str(path))
    w.write(json.dumps({"set": settings or {}}).encode() + b"\n")
    await w.drain()
    reply = json.loads(await r.readline())
    w.close()
    if "error" in reply:
        raise ValueError(reply["error"])
    return reply


def main() -> None:
    """`python -m lab.wanem`: the lab's WAN; lab.world.start_wan starts it inside gm-wan."""
    gmlog.setup()
    uvloop.run(WanEmulator(world.WAN_ENDS, world.WAN_CTL).run())


if __name__ == "__main__":
    main()
