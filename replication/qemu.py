"""QEMU guest driver: command line, launch, QMP, device-state capture and load.

Guest RAM lives in a shared ``memory-backend-file`` so the service reads it
directly and a standby QEMU can resume on a replica of it. The device state moves
through QEMU's migration stream with ``x-ignore-shared`` (RAM skipped), over a
socketpair handed to QEMU with ``getfd``: no temp files, no shell.
"""

from __future__ import annotations

import array
import asyncio
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from qemu.qmp import QMPClient

from gmbase.errors import GeomirrorError

log = structlog.get_logger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
READY_MARK = b"GEOMIRROR-GUEST-READY"


class GuestError(GeomirrorError):
    """The guest could not be started, driven or checkpointed."""


def choose_accel(cpuinfo: str, kvm_present: bool) -> str:
    """KVM only when the CPU flags show hardware virtualisation, else TCG."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return "kvm" if kvm_present and ({"vmx", "svm"} & flags) else "tcg"


def detect_accel() -> str:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    return choose_accel(cpuinfo, os.path.exists("/dev/kvm"))


@dataclass(frozen=True)
class GuestSpec:
    """Everything that defines the guest's hardware. Both sites must agree on it."""

    name: str
    memory_mb: int
    kernel: Path
    initrd: Path
    append: str
    ram_path: Path
    qmp_path: Path
    serial_path: Path
    net_socket: Path
    mac: str = "52:54:00:12:34:56"
    vcpus: int = 1
    machine: str = "pc-i440fx-7.2"
    accel: str = "tcg"
    incoming: bool = False

    def compat(self) -> dict:
        """What must be identical at both sites for a checkpoint to apply."""
        return {
            "qemu": qemu_version(),
            "machine": self.machine,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "mac": self.mac,
            "cpu": "qemu64" if self.accel == "tcg" else "host",
        }


_qemu_version: str | None = None


def qemu_version() -> str:
    global _qemu_version
    if _qemu_version is None:
        out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True, check=True).stdout
        _qemu_version = out.splitlines()[0].strip()
    return _qemu_version


def build_argv(spec: GuestSpec) -> list[str]:
    """The QEMU command line (an argument list, never a shell string)."""
    cpu = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", "tcg", "-cpu", "qemu64"]
    argv = [
        QEMU_BINARY,
        "-name", f"geomirror-{spec.name}",
        "-machine", f"{spec.machine},memory-backend=ram0",
        *cpu,
        "-smp", str(spec.vcpus),
        "-m", f"{spec.memory_mb}M",
        "-object", f"memory-backend-file,id=ram0,size={spec.memory_mb}M,mem-path={spec.ram_path},share=on",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", spec.append,
        "-chardev", f"file,id=ser0,path={spec.serial_path}",
        "-serial", "chardev:ser0",
        "-qmp", f"unix:{spec.qmp_path},server=on,wait=off",
        "-netdev", f"stream,id=net0,server=off,addr.type=unix,addr.path={spec.net_socket}",
        "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
    ]
    if spec.incoming:
        argv += ["-incoming", "defer"]
    return argv


@dataclass
class Guest:
    """One running QEMU process and its QMP connection."""

    spec: GuestSpec
    proc: asyncio.subprocess.Process | None = None
    qmp: QMPClient | None = None
    _events: asyncio.Queue = field(default_factory=asyncio.Queue)
    _event_task: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def start(self, timeout: float = 20.0) -> None:
        spec = self.spec
        for p in (spec.qmp_path, spec.serial_path):
            p.unlink(missing_ok=True)
        if not spec.ram_path.exists():
            # Create the RAM file with owner-only access before QEMU maps it.
            fd = os.open(spec.ram_path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, spec.memory_mb << 20)
            os.close(fd)
        argv = build_argv(spec)
        log.info("guest.start", name=spec.name, accel=spec.accel, memory_mb=spec.memory_mb,
                 incoming=spec.incoming)
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not spec.qmp_path.exists():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                err = (await self.proc.stderr.read()).decode(errors="replace").strip() if self.proc.stderr else ""
                raise GuestError(f"QEMU for guest {spec.name} did not start: {err or 'no QMP socket'}")
            await asyncio.sleep(0.02)
        self.qmp = QMPClient(spec.name)
        for _ in range(100):
            try:
                await self.qmp.connect(str(spec.qmp_path))
                break
            except Exception:
                if self.proc.returncode is not None:
                    raise GuestError(f"QEMU for guest {spec.name} exited with {self.proc.returncode}")
                await asyncio.sleep(0.05)
        else:
            raise GuestError(f"cannot connect to QMP socket {spec.qmp_path}")
        self._event_task = asyncio.create_task(self._pump_events())
        await self.qmp.execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},
        ]})
        await self.qmp.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": 2000})

    async def _pump_events(self) -> None:
        assert self.qmp is not None
        try:
            async for ev in self.qmp.events:
                await self._events.put(ev)
        except asyncio.CancelledError:
            pass

    async def wait_ready(self, timeout: float = 60.0) -> float:
        """Wait for the guest's READY line on its serial console; returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            try:
                if READY_MARK in self.spec.serial_path.read_bytes():
                    return time.monotonic() - t0
            except FileNotFoundError:
                pass
            if self.proc and self.proc.returncode is not None:
                raise GuestError(f"QEMU for guest {self.spec.name} exited with {self.proc.returncode}")
            await asyncio.sleep(0.1)
        raise GuestError(f"guest {self.spec.name} printed no ready line within {timeout:.0f}s "
                         f"(serial log: {self.spec.serial_path})")

    async def _wait_migration(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestError("migration stream did not complete in time")
            try:
                ev = await asyncio.wait_for(self._events.get(), left)
            except asyncio.TimeoutError:
                raise GuestError("migration stream did not complete in time") from None
            if ev.get("event") != "MIGRATION":
                continue
            status = ev["data"]["status"]
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                info = await self.qmp.execute("query-migrate")
                raise GuestError(f"migration {status}: {info.get('error-desc', 'no reason given')}")

    def _send_fd(self, fd: int) -> None:
        """SCM_RIGHTS over the QMP socket (works under asyncio and uvloop alike)."""
        sock = self.qmp._writer.transport.get_extra_info("socket")
        dup = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=os.dup(sock.fileno()))
        try:  # closing the duplicate leaves QMP's own socket open
            dup.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            dup.close()

    def _drain_events(self) -> None:
        while not self._events.empty():
            self._events.get_nowait()

    async def _execute(self, command: str, args: dict | None = None, timeout: float = 2.0):
        """A QMP command with a deadline: a QEMU that stops answering must not stall the
        checkpoint loop forever (the session fails instead, and resyncs)."""
        try:
            return await asyncio.wait_for(self.qmp.execute(command, args), timeout)
        except asyncio.TimeoutError:
            raise GuestError(f"QEMU of guest {self.spec.name} did not answer {command} within {timeout:g}s") \
                from None

    async def stop_vcpus(self) -> None:
        await self._execute("stop")

    async def cont(self) -> None:
        await self._execute("cont")

    async def _migration(self, command: str, feed: bytes | None, timeout: float) -> bytes:
        """Run `migrate` or `migrate-incoming` over a socketpair handed to QEMU with getfd;
        read the stream (migrate) or write `feed` into it (migrate-incoming)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        started = completed = False
        try:
            self._drain_events()
            self._send_fd(theirs.fileno())
            await self._execute("getfd", {"fdname": "gmstate"})
            theirs.close()
            started = True
            await self._execute(command, {"uri": "fd:gmstate"})
            loop = asyncio.get_running_loop()
            ours.setblocking(False)
            chunks = []
            deadline = time.monotonic() + timeout

            async def stream():
                if feed is None:
                    while b := await loop.sock_recv(ours, 1 << 20):
                        chunks.append(b)
                else:
                    await loop.sock_sendall(ours, feed)
                    ours.shutdown(socket.SHUT_WR)

            try:
                await asyncio.wait_for(stream(), timeout)
            except asyncio.TimeoutError:
                raise GuestError(f"the {command} stream of guest {self.spec.name} did not end within "
                                 f"{timeout:g}s ({sum(map(len, chunks))} bytes read)") from None
            await self._wait_migration(max(0.5, deadline - time.monotonic()))
            completed = True
            return b"".join(chunks)
        finally:
            ours.close()
            if theirs.fileno() >= 0:
                theirs.close()
            if started and not completed and command == "migrate":
                # An outgoing migration we gave up on (error, timeout, cancelled session) must
                # not complete later: QEMU stops the VM when a migration completes, and nobody
                # would `cont` it again. Cancel it and wait until QEMU has let go of it.
                await self._settle_migration()

    async def _settle_migration(self, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.qmp.execute("migrate_cancel"), timeout)
            while time.monotonic() < deadline:
                info = await asyncio.wait_for(self.qmp.execute("query-migrate"), timeout)
                if info.get("status") not in ("setup", "active", "cancelling", "pre-switchover", "device",
                                              "wait-unplug"):
                    return
                await asyncio.sleep(0.01)
            log.warning("qemu.migration_not_settled", guest=self.spec.name)
        except Exception as e:  # best effort: the caller's `cont` and the guest watch follow
            log.warning("qemu.migration_cancel_failed", guest=self.spec.name, error=str(e) or type(e).__name__)

    async def save_device_state(self, timeout: float = 10.0) -> bytes:
        """With the vCPUs stopped: the device state as a migration stream (RAM skipped)."""
        return await self._migration("migrate", None, timeout)

    async def load_device_state(self, state: bytes, timeout: float = 30.0) -> None:
        """For a QEMU started with `incoming`: feed the saved device state."""
        await self._migration("migrate-incoming", state, timeout)

    async def status(self) -> str:
        return (await self._execute("query-status"))["status"]

    def kill(self) -> None:
        """SIGKILL the QEMU process (the crash case)."""
        if self.proc and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def close(self, timeout: float = 5.0) -> None:
        if self._event_task:
            self._event_task.cancel()
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.execute("quit"), 2)
            except Exception:
                pass
            try:
                await self.qmp.disconnect()
            except Exception:
                pass
        if self.proc and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.kill()
                await self.proc.wait()
