"""The BGP speaker the daemon uses: announce/withdraw the guest prefix through ExaBGP,
neighbour states, routes received from upstream. ExaBGP runs in the current network
namespace, supervised: if it dies it is restarted and the announcements re-applied.

ExaBGP's process API contract: one command a line, read every ack (`done`/`error`,
exabgp.api.ack=true) and every JSON event so the pipe never fills.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

from bgp.config import Neighbor, announce_command, exabgp_env, render_exabgp_config, withdraw_command

__all__ = ["Neighbor", "Speaker", "SpeakerError", "ReceivedRoute"]

log = structlog.get_logger(__name__)


class SpeakerError(Exception):
    pass


@dataclass(frozen=True)
class ReceivedRoute:
    neighbor: str
    prefix: str
    as_path: tuple[int, ...]
    next_hop: str | None


def _as_path(attr) -> tuple[int, ...]:
    p = attr.get("as-path") if isinstance(attr, dict) else None
    if isinstance(p, list):
        return tuple(int(x) for x in p if isinstance(x, int) or str(x).isdigit())
    if isinstance(p, dict):  # {"0": {"element": "as-sequence", "value": [...]}, ...}
        out: list[int] = []
        for k in sorted(p, key=lambda x: int(x) if str(x).isdigit() else 0):
            seg = p[k]
            if isinstance(seg, dict):
                out += [int(x) for x in seg.get("value", [])]
        return tuple(out)
    return ()


class Speaker:
    def __init__(self, *, router_id: str, local_as: int, neighbors: list[Neighbor], run_dir: Path,
                 exabgp_argv: list[str] | None = None, python: str = sys.executable):
        self.router_id = router_id
        self.local_as = local_as
        self.neighbors = neighbors
        self.run_dir = Path(run_dir)
        self.python = python
        self.exabgp_argv = exabgp_argv or [str(Path(sys.executable).with_name("exabgp"))]
        self.neighbor_states: dict[str, str] = {n.address: "down" for n in neighbors}
        self.on_change: Callable[[], None] | None = None
        self.restarts = 0
        self._routes: dict[tuple[str, str], ReceivedRoute] = {}
        self._desired: dict[str, str] = {}  # prefix -> announce command
        self._writer: asyncio.StreamWriter | None = None
        self._acks: asyncio.Queue | None = None
        self._lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._supervisor: asyncio.Task | None = None
        self._stopping = False

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "api.sock"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self.socket_path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(self._on_relay, path=str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        conf = render_exabgp_config(router_id=self.router_id, local_as=self.local_as, neighbors=self.neighbors,
                                    process_argv=[self.python, "-m", "bgp.relay", str(self.socket_path)])
        self.conf_path = self.run_dir / "exabgp.conf"
        self.conf_path.write_text(conf)
        os.chmod(self.conf_path, 0o600)
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        backoff = 0.5
        env = {**os.environ, **exabgp_env(self.run_dir),
               "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        logf = open(self.run_dir / "exabgp.log", "ab")
        try:
            while not self._stopping:
                self._proc = await asyncio.create_subprocess_exec(
                    *self.exabgp_argv, "server", str(self.conf_path), env=env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf, stderr=logf, start_new_session=True)
                log.info("bgp.exabgp_started", pid=self._proc.pid)
                rc = await self._proc.wait()
                if self._stopping:
                    break
                self.restarts += 1
                self._connected.clear()
                for n in self.neighbor_states:
                    self.neighbor_states[n] = "down"
                self._changed()
                log.warning("bgp.exabgp_exited", rc=rc, restart_in=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
        finally:
            logf.close()

    async def stop(self, withdraw: bool = True) -> None:
        if withdraw and self._desired and self._connected.is_set():
            for prefix in list(self._desired):
                try:
                    await asyncio.wait_for(self.withdraw(prefix), 3)
                except Exception:
                    pass
        self._stopping = True
        if self._proc and self._proc.returncode is None:
            try:
                os.kill(self._proc.pid, signal.SIGTERM)
                await asyncio.wait_for(self._proc.wait(), 5)
            except (ProcessLookupError, asyncio.TimeoutError):
                try:
                    os.kill(self._proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._supervisor:
            self._supervisor.cancel()
        if self._server:
            self._server.close()
        self.socket_path.unlink(missing_ok=True)

    # ------------------------------------------------------------ the relay connection
    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        self._acks = asyncio.Queue()
        self._connected.set()
        log.info("bgp.api_connected")
        asyncio.create_task(self._reapply())
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                self._on_line(line.decode(errors="replace").strip())
        finally:
            if self._writer is writer:
                self._writer = None
                self._connected.clear()

    async def _reapply(self) -> None:
        for prefix, cmd in list(self._desired.items()):
            try:
                await self._command(cmd)
                log.info("bgp.reannounced", prefix=prefix)
            except SpeakerError as e:
                log.error("bgp.reannounce_failed", prefix=prefix, error=str(e))

    def _on_line(self, line: str) -> None:
        if not line:
            return
        if line in ("done", "error"):
            if self._acks is not None:
                self._acks.put_nowait(line)
            return
        try:
            ev = json.loads(line)
        except ValueError:
            log.debug("bgp.api_line", line=line[:200])
            return
        kind = ev.get("type")
        nb = ev.get("neighbor", {})
        peer = (nb.get("address") or {}).get("peer")
        if kind == "state" and peer:
            st = nb.get("state", "?")
            if self.neighbor_states.get(peer) != st:
                self.neighbor_states[peer] = st
                log.info("bgp.neighbor", neighbor=peer, state=st)
                if st == "down":
                    for k in [k for k in self._routes if k[0] == peer]:
                        del self._routes[k]
                self._changed()
        elif kind == "update" and peer:
            upd = (nb.get("message") or {}).get("update") or {}
            path = _as_path(upd.get("attribute") or {})
            for fam in (upd.get("announce") or {}).values():
                for nh, nlris in fam.items():
                    for n in nlris:
                        pfx = n.get("nlri") if isinstance(n, dict) else str(n)
                        self._routes[(peer, pfx)] = ReceivedRoute(peer, pfx, path, nh)
            for nlris in (upd.get("withdraw") or {}).values():
                for n in nlris:
                    pfx = n.get("nlri") if isinstance(n, dict) else str(n)
                    self._routes.pop((peer, pfx), None)
            self._changed()

    def _changed(self) -> None:
        if self.on_change:
            try:
                self.on_change()
            except Exception:
                log.exception("bgp.on_change_failed")

    async def _command(self, cmd: str, timeout: float = 10.0) -> None:
        async with self._lock:
            await asyncio.wait_for(self._connected.wait(), timeout)
            self._writer.write(cmd.encode() + b"\n")
            await self._writer.drain()
            try:
                ack = await asyncio.wait_for(self._acks.get(), timeout)
            except asyncio.TimeoutError:
                raise SpeakerError(f"ExaBGP did not acknowledge {cmd!r} in {timeout:.0f}s") from None
            if ack != "done":
                raise SpeakerError(f"ExaBGP refused {cmd!r}")

    # ------------------------------------------------------------ the API
    async def announce(self, prefix: str, *, med: int | None = None, communities=(), prepend: int = 0) -> None:
        cmd = announce_command(prefix, local_as=self.local_as, med=med, communities=communities, prepend=prepend)
        self._desired[prefix] = cmd
        await self._command(cmd)
        log.info("bgp.announce", prefix=prefix, med=med, prepend=prepend)

    async def withdraw(self, prefix: str) -> None:
        self._desired.pop(prefix, None)
        await self._command(withdraw_command(prefix))
        log.info("bgp.withdraw", prefix=prefix)

    def received_routes(self, prefix: str) -> list[ReceivedRoute]:
        return [r for (_, p), r in self._routes.items() if p == prefix]

    @property
    def announced(self) -> list[str]:
        return list(self._desired)
