"""The BGP speaker the daemon uses: announce/withdraw the guest prefix through ExaBGP, watch
neighbour states and the routes upstream sends us. ExaBGP runs in the current network
namespace under supervision: if it dies it is restarted with backoff and, once its API helper
(`bgp.relay`) connects back, the desired announcements are applied again.

ExaBGP's process API contract: one command a line, read every ack (`done`/`error`,
exabgp.api.ack=true) and every JSON event, so the pipe never fills.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from bgp.config import (Neighbor, Policy, drain_policy, exabgp_env, family_of, policy_commands, render_exabgp_config,
                        withdraw_commands)

from gmbase.errors import GeomirrorError

__all__ = ["Neighbor", "Policy", "Speaker", "SpeakerError", "ReceivedRoute"]

log = structlog.get_logger(__name__)

RESTART_MIN_S = 0.5
RESTART_MAX_S = 10.0
STABLE_RUN_S = 30.0  # a run this long resets the restart backoff
LOG_KEEP_BYTES = 4 << 20
_LOST = object()  # put in an ack queue when the relay connection goes away


class SpeakerError(GeomirrorError):
    """ExaBGP refused a command, did not answer in time, or cannot be started."""


@dataclass(frozen=True)
class ReceivedRoute:
    neighbor: str
    prefix: str
    as_path: tuple[int, ...]
    next_hop: str | None

    @property
    def origin_as(self) -> int | None:
        return self.as_path[-1] if self.as_path else None


@dataclass
class _Relay:
    """One connection from `bgp.relay` (i.e. from one ExaBGP instance)."""
    writer: asyncio.StreamWriter
    acks: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False


def _as_path(attribute: dict) -> tuple[int, ...]:
    """ExaBGP JSON `as-path`: {"0": {"element": "as-sequence", "value": [..]}, ...} → flat tuple."""
    p = attribute.get("as-path")
    if isinstance(p, list):  # older encoders
        return tuple(int(x) for x in p if str(x).isdigit())
    out: list[int] = []
    if isinstance(p, dict):
        for k in sorted(p, key=lambda x: int(x) if str(x).isdigit() else 0):
            seg = p[k]
            if isinstance(seg, dict):
                out += [int(x) for x in seg.get("value", []) if str(x).isdigit()]
    return tuple(out)


def _nlri(n) -> str:
    return n.get("nlri", "") if isinstance(n, dict) else str(n)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Speaker:
    def __init__(self, *, router_id: str, local_as: int, neighbors: list[Neighbor], run_dir: Path,
                 family: str = "ipv4 unicast", families: tuple[str, ...] | None = None, exabgp_argv: list[str] | None = None,
                 python: str = sys.executable, ack_timeout: float = 10.0):
        self.router_id = router_id
        self.local_as = local_as
        self.neighbors = list(neighbors)
        self.family = family
        self.families = tuple(families) if families is not None else (family,)
        self.run_dir = Path(run_dir)
        self.python = python
        self.exabgp_argv = list(exabgp_argv or [str(Path(sys.executable).with_name("exabgp"))])
        self.ack_timeout = ack_timeout
        self.neighbor_states: dict[str, str] = {str(n.address): "down" for n in self.neighbors}
        self.on_change: Callable[[], None] | None = None
        self.restarts = 0
        self._routes: dict[tuple[str, str], ReceivedRoute] = {}
        self._desired: dict[str, list[str]] = {}  # prefix -> its announce commands (one per neighbour for IPv6)
        self._relay: _Relay | None = None
        self._relay_up = asyncio.Event()
        self._changed_ev = asyncio.Event()
        self._lock = asyncio.Lock()
        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        # validate now, so a bad value fails at construction and not in ExaBGP's log
        self.config_text = render_exabgp_config(router_id=router_id, local_as=local_as, neighbors=self.neighbors,
                                                process_argv=[python, "-m", "bgp.relay", str(self.socket_path)],
                                                families=self.families)

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "api.sock"

    @property
    def config_path(self) -> Path:
        return self.run_dir / "exabgp.conf"

    @property
    def pid_path(self) -> Path:
        return self.run_dir / "exabgp.pid"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "exabgp.log"

    @property
    def pid(self) -> int | None:
        """ExaBGP's pid while it runs."""
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def announced(self) -> list[str]:
        """Prefixes we want announced (re-applied after every ExaBGP restart)."""
        return list(self._desired)

    def received_routes(self, prefix: str) -> list[ReceivedRoute]:
        """Routes for `prefix` upstream currently sends us (from parsed update events)."""
        return [r for (_, p), r in self._routes.items() if p == prefix]

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        exe = Path(self.exabgp_argv[0])
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise SpeakerError(f"ExaBGP program {exe} does not exist or is not executable")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self._kill_stale()
        self.socket_path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:  # the socket is 0600 from birth
            self._server = await asyncio.start_unix_server(self._on_relay, path=str(self.socket_path),
                                                           limit=1 << 22)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        self.config_path.write_text(self.config_text)
        os.chmod(self.config_path, 0o600)
        self._stopping = False
        self._supervisor = asyncio.create_task(self._supervise(), name="bgp-supervisor")

    def _kill_stale(self) -> None:
        """An ExaBGP left by an earlier daemon on this run_dir would announce our prefix forever."""
        try:
            pid = int(self.pid_path.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if str(self.config_path).encode() in cmdline:
            log.warning("bgp.exabgp_stale_killed", pid=pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = RESTART_MIN_S
        env = {**os.environ, **exabgp_env(self.run_dir),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent),
                                                           os.environ.get("PYTHONPATH")]))}
        while not self._stopping:
            started = loop.time()
            self._trim_log()
            rc: int | None
            try:
                with open(self.log_path, "ab") as logf:
                    self._proc = await asyncio.create_subprocess_exec(
                        *self.exabgp_argv, "server", str(self.config_path), env=env,
                        stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                        start_new_session=True, preexec_fn=_die_with_parent)
                self.pid_path.write_text(f"{self._proc.pid}\n")
                log.info("bgp.exabgp_started", pid=self._proc.pid)
                rc = await self._proc.wait()
            except OSError as e:
                log.error("bgp.exabgp_spawn_failed", error=str(e))
                rc = None
            if self._stopping:
                break
            if loop.time() - started > STABLE_RUN_S:
                backoff = RESTART_MIN_S
            self.restarts += 1
            self._exabgp_lost()
            log.warning("bgp.exabgp_exited", rc=rc, restart_in=backoff, log=str(self.log_path))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_MAX_S)

    def _trim_log(self) -> None:
        try:
            if self.log_path.stat().st_size > LOG_KEEP_BYTES:
                data = self.log_path.read_bytes()[-LOG_KEEP_BYTES // 2:]
                self.log_path.write_bytes(data)
        except OSError:
            pass

    def _exabgp_lost(self) -> None:
        for n in self.neighbor_states:
            if self.neighbor_states[n] != "down":
                self.neighbor_states[n] = "down"
                log.info("bgp.neighbor", neighbor=n, state="down", reason="exabgp exited")
        self._routes.clear()
        self._changed()

    async def stop(self, withdraw: bool = True) -> None:
        """Withdraw everything (bounded wait for acks), then end ExaBGP by its pid."""
        if withdraw and self._relay_up.is_set():
            for prefix in list(self._desired):
                try:
                    for cmd in withdraw_commands(prefix, neighbors=self.neighbors):
                        await self._command(cmd, timeout=min(self.ack_timeout, 3.0))
                    log.info("bgp.withdraw", prefix=prefix)
                except SpeakerError as e:
                    log.warning("bgp.withdraw_failed", prefix=prefix, error=str(e))
        self._desired.clear()
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    await asyncio.wait_for(proc.wait(), wait)
                    break
                except asyncio.TimeoutError:
                    continue
        for t in [self._supervisor, *self._tasks]:
            if t is not None:
                t.cancel()
        if self._server is not None:
            self._server.close()
        if self._relay is not None:
            self._relay.writer.close()
        self.socket_path.unlink(missing_ok=True)
        self.pid_path.unlink(missing_ok=True)
        self._exabgp_lost()

    # ------------------------------------------------------------ the relay connection
    async def _on_relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopping:
            writer.close()
            return
        if self._relay is not None:  # a new ExaBGP (or a reconnecting relay) replaces the old one
            self._drop(self._relay)
        relay = self._relay = _Relay(writer)
        self._relay_up.set()
        log.info("bgp.api_connected")
        self._spawn(self._reapply())
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, ConnectionError) as e:  # line over the limit, reset
                    log.error("bgp.api_read_failed", error=str(e))
                    break
                if not line:
                    break
                self._on_line(relay, line.decode(errors="replace").strip())
        finally:
            self._drop(relay)

    def _drop(self, relay: _Relay) -> None:
        if relay.closed:
            return
        relay.closed = True
        relay.acks.put_nowait(_LOST)
        relay.writer.close()
        if self._relay is relay:
            self._relay = None
            self._relay_up.clear()
            log.info("bgp.api_disconnected")

    def _spawn(self, coro) -> None:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _reapply(self) -> None:
        for prefix in list(self._desired):
            cmds = self._desired.get(prefix)
            if cmds is None:
                continue
            try:
                for cmd in cmds:
                    await self._command(cmd)
                log.info("bgp.reannounced", prefix=prefix)
            except SpeakerError as e:
                log.error("bgp.reannounce_failed", prefix=prefix, error=str(e))

    def _on_line(self, relay: _Relay, line: str) -> None:
        if not line:
            return
        if line in ("done", "error"):
            relay.acks.put_nowait(line)
            return
        try:
            ev = json.loads(line)
        except ValueError:
            log.debug("bgp.api_line", line=line[:200])
            return
        if not isinstance(ev, dict):
            return
        if "answer" in ev:  # JSON-style ack
            relay.acks.put_nowait("done" if ev.get("answer") == "done" else "error")
            return
        nb = ev.get("neighbor") or {}
        peer = (nb.get("address") or {}).get("peer") if isinstance(nb, dict) else None
        if not peer:
            return
        kind = ev.get("type")
        if kind == "state":
            self._on_state(peer, str(nb.get("state", "?")), nb.get("reason"))
        elif kind == "update" and nb.get("direction", "receive") == "receive":
            self._on_update(peer, (nb.get("message") or {}).get("update") or {})

    def _on_state(self, peer: str, state: str, reason) -> None:
        if self.neighbor_states.get(peer) == state:
            return
        self.neighbor_states[peer] = state
        log.info("bgp.neighbor", neighbor=peer, state=state, **({"reason": reason} if reason else {}))
        if state != "up":
            for k in [k for k in self._routes if k[0] == peer]:
                del self._routes[k]
        self._changed()

    def _on_update(self, peer: str, update: dict) -> None:
        path = _as_path(update.get("attribute") or {})
        for family in (update.get("announce") or {}).values():
            for next_hop, nlris in family.items():
                for n in nlris:
                    pfx = _nlri(n)
                    self._routes[(peer, pfx)] = ReceivedRoute(peer, pfx, path, None if next_hop == "null" else next_hop)
        for nlris in (update.get("withdraw") or {}).values():
            for n in nlris:
                self._routes.pop((peer, _nlri(n)), None)
        self._changed()

    def _changed(self) -> None:
        self._changed_ev.set()
        self._changed_ev = asyncio.Event()
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                log.exception("bgp.on_change_failed")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until predicate() holds, re-checked on every neighbour or route change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise SpeakerError(f"condition not reached in {timeout:g}s; neighbours {self.neighbor_states}")
            try:
                await asyncio.wait_for(self._changed_ev.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def _command(self, cmd: str, timeout: float | None = None) -> None:
        """Send one command, wait for its ack. A relay that drops mid-command (ExaBGP died) is
        waited for and the command sent again, all within `timeout`."""
        timeout = self.ack_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._lock:
            while True:
                try:
                    await asyncio.wait_for(self._relay_up.wait(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise SpeakerError(f"ExaBGP's API is not connected; {cmd!r} not sent within {timeout:g}s "
                                       f"(see {self.log_path})") from None
                relay = self._relay
                if relay is None or relay.closed:
                    await asyncio.sleep(0)
                    continue
                while not relay.acks.empty():  # answers to commands that timed out earlier
                    relay.acks.get_nowait()
                try:
                    relay.writer.write(cmd.encode() + b"\n")
                    await relay.writer.drain()
                except ConnectionError:
                    self._drop(relay)
                    continue
                try:
                    ack = await asyncio.wait_for(relay.acks.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    raise SpeakerError(f"ExaBGP did not acknowledge {cmd!r} within {timeout:g}s") from None
                if ack is _LOST:
                    continue
                if ack != "done":
                    raise SpeakerError(f"ExaBGP refused {cmd!r} (see {self.log_path})")
                return

    # ------------------------------------------------------------ the API
    async def announce(self, prefix: str, *, med: int | None = None, communities=(), prepend: int = 0,
                       local_as: int | None = None, large_communities=(), policy: Policy | None = None) -> None:
        """Announce `prefix` with `policy` (or the loose attributes, not both): IPv4 with next-hop
        self; IPv6 over each IPv4 session with that neighbour's `next_hop6` (MP-BGP). `prepend` =
        extra copies of our AS in the path. Announcing a prefix again replaces its attributes (a
        re-announcement). Remembered and re-applied after ExaBGP restarts; raises SpeakerError on
        error/timeout, ValueError on a bad value."""
        if policy is None:
            policy = Policy(med=med, communities=tuple(communities), large_communities=tuple(large_communities),
                            prepend=prepend)
        elif med is not None or communities or large_communities or prepend:
            raise ValueError("give either policy or med/communities/large_communities/prepend, not both")
        family = family_of(prefix)
        if family not in self.families:
            raise ValueError(f"prefix {prefix} is {family} but the sessions carry only {', '.join(self.families)}")
        cmds = policy_commands(prefix, policy, local_as=self.local_as if local_as is None else local_as,
                               neighbors=self.neighbors)
        prefix = str(ipaddress.ip_network(prefix))
        self._desired[prefix] = cmds
        for cmd in cmds:
            await self._command(cmd)
        log.info("bgp.announce", prefix=prefix, med=policy.med, communities=list(policy.communities),
                 large_communities=list(policy.large_communities), prepend=policy.prepend)

    async def drain(self, prefix: str, policy: Policy) -> None:
        """Re-announce `prefix` with `policy` plus GRACEFUL_SHUTDOWN (65535:0, RFC 8326): routers
        move to the other site's route while ours stays; withdraw once theirs is seen."""
        await self.announce(prefix, policy=drain_policy(policy))

    async def withdraw(self, prefix: str) -> None:
        cmds = withdraw_commands(prefix, neighbors=self.neighbors)
        prefix = str(ipaddress.ip_network(prefix))
        self._desired.pop(prefix, None)
        for cmd in cmds:
            await self._command(cmd)
        log.info("bgp.withdraw", prefix=prefix)
