"""QEMU guest driver: command line, launch, QMP, device-state capture and load.

Guest RAM lives in a shared ``memory-backend-file`` so the service reads it
directly and a standby QEMU can resume on a replica of it. The device state moves
through QEMU's migration stream with ``x-ignore-shared`` (RAM skipped), over a
socketpair handed to QEMU with ``getfd``: no temp files, no shell.

A QMP exchange is never cancelled half-way (`QmpLine`): a caller that gives up (a
deadline, a cancelled session) leaves the exchange running, its late reply is logged,
and the next command waits for it first. QEMU's stderr is read all the time
(`Guest._read_stderr`): a pipe nobody reads fills at 64 KiB and then blocks QEMU
inside a write, possibly while it holds its global lock, which freezes the guest.
"""

from __future__ import annotations

import array
import asyncio
import itertools
import os
import signal
import socket
import subprocess
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from qemu.qmp import QMPClient, QMPError

from gmbase.errors import GeomirrorError

log = structlog.get_logger(__name__)

QEMU_BINARY = "qemu-system-x86_64"
READY_MARK = b"GEOMIRROR-GUEST-READY"
QMP_DEADLINE_S = 2.0  # a caller waits this long for a reply, then gets a GuestError
QMP_STUCK_S = 10.0  # an exchange left unanswered this long: QEMU counts as unresponsive
STDERR_LINES_PER_S = 20  # QEMU stderr lines logged per second; the rest are counted
STDERR_MAX_LINE = 4096  # longer lines are cut (and a line without an end is logged in pieces)


class GuestError(GeomirrorError):
    """The guest could not be started, driven or checkpointed."""


@dataclass
class _Exchange:
    command: str
    id: str
    started: float
    task: asyncio.Task
    abandoned: str | None = None  # why the caller stopped waiting: "deadline" | "cancelled"


class QmpLine:
    """QMP commands over one QMPClient, each run as a task that is never cancelled.

    Cancelling an exchange half-way makes qemu.qmp forget its id, and QEMU's reply, which
    comes anyway, is dropped ("Unknown ID ... message dropped"); worse, the command still
    took effect in QEMU. So a caller that stops waiting (its deadline, or its own
    cancellation) leaves the exchange running: the reply is logged when it comes
    (`qemu.qmp_late_reply`), and the next command waits for it first, for at most
    `stuck_s` after it was sent; past that QEMU is declared unresponsive."""

    def __init__(self, client: QMPClient, guest: str, stuck_s: float = QMP_STUCK_S):
        self.client = client
        self.guest = guest
        self.stuck_s = stuck_s
        self._ids = itertools.count(1)
        self._abandoned: list[_Exchange] = []

    async def execute(self, command: str, args: dict | None = None, timeout: float = QMP_DEADLINE_S,
                      settle: bool = True):
        """Run `command`; its reply's return value. GuestError when QEMU refuses it, does not
        answer within `timeout`, or still owes the answer to an earlier command."""
        if settle:
            await self._settle(command)
        ex = self._start(command, args)
        try:
            done, _ = await asyncio.wait({ex.task}, timeout=timeout)
        except asyncio.CancelledError:
            ex.abandoned = "cancelled"
            self._abandoned.append(ex)
            raise
        if not done:
            ex.abandoned = "deadline"
            self._abandoned.append(ex)
            raise GuestError(f"QEMU of guest {self.guest} did not answer {command} (id {ex.id}) within "
                             f"{timeout:g}s; the exchange is kept and its late reply will be logged")
        return ex.task.result()

    def _start(self, command: str, args: dict | None) -> _Exchange:
        msg = {"execute": command, "id": f"gm-{next(self._ids)}"}
        if args is not None:
            msg["arguments"] = args
        task = asyncio.get_running_loop().create_task(self._exchange(msg))
        ex = _Exchange(command, msg["id"], time.monotonic(), task)
        task.add_done_callback(lambda _t: self._finished(ex))
        return ex

    async def _exchange(self, msg: dict):
        command = msg["execute"]
        try:
            reply = await self.client._raw(msg, assign_id=False)  # our own id, to name it in the log
        except QMPError as e:
            raise GuestError(f"the QMP connection of guest {self.guest} failed during {command}: "
                             f"{e or type(e).__name__}") from e
        if "error" in reply:
            err = reply["error"]
            raise GuestError(f"QEMU of guest {self.guest} refused {command}: "
                             f"{err.get('desc', err)} ({err.get('class', 'no class')})")
        if "return" not in reply:
            raise GuestError(f"QEMU of guest {self.guest} answered {command} with neither return nor error")
        return reply["return"]

    def _finished(self, ex: _Exchange) -> None:
        """Every exchange ends here; one whose caller stopped waiting is logged as late."""
        failed = None if ex.task.cancelled() else ex.task.exception()  # also marks it retrieved
        if ex.abandoned is None:
            return
        with_error = {"error": str(failed)} if failed is not None else {}
        log.warning("qemu.qmp_late_reply", guest=self.guest, command=ex.command, id=ex.id,
                    latency_ms=round((time.monotonic() - ex.started) * 1000, 1), abandoned=ex.abandoned,
                    outcome="cancelled" if ex.task.cancelled() else "error" if failed else "ok", **with_error)

    async def _settle(self, command: str) -> None:
        """Wait for exchanges whose callers gave up, each at most until it is `stuck_s` old."""
        while self._abandoned:
            ex = self._abandoned[0]
            if ex.task.done():
                self._abandoned.pop(0)
                continue
            age = time.monotonic() - ex.started
            if age >= self.stuck_s:
                raise GuestError(f"QEMU of guest {self.guest} is unresponsive: {ex.command} (id {ex.id}) has "
                                 f"had no answer for {age:.1f}s, so {command} was not sent")
            await asyncio.wait({ex.task}, timeout=self.stuck_s - age)

    @property
    def outstanding(self) -> list[str]:
        """Ids of exchanges whose callers gave up and that QEMU has not answered yet."""
        return [ex.id for ex in self._abandoned if not ex.task.done()]


class LineBudget:
    """At most `per_window` lines let through per window of `window_s`; the rest are counted
    and the count is handed out once (at the next window, or on `flush`)."""

    def __init__(self, per_window: int = STDERR_LINES_PER_S, window_s: float = 1.0):
        self.per_window = per_window
        self.window_s = window_s
        self._start: float | None = None
        self._used = 0
        self._suppressed = 0

    def admit(self, now: float) -> tuple[bool, int]:
        """(let this line through?, lines suppressed in earlier windows, to report now)."""
        report = 0
        if self._start is None or now - self._start >= self.window_s:
            self._start, self._used = now, 0
            report, self._suppressed = self._suppressed, 0
        if self._used < self.per_window:
            self._used += 1
            return True, report
        self._suppressed += 1
        return False, report

    def flush(self) -> int:
        n, self._suppressed = self._suppressed, 0
        return n


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
    stderr_path: Path | None = None  # QEMU's stderr goes to this file (tailed into the log); None: a pipe
    # the guest's disk: the unix socket of the NbdServer that serves it (None: no disk). QEMU
    # reconnects to a new server on the same path (a restarted service) for this long, the
    # guest's disk requests waiting meanwhile
    disk_socket: Path | None = None
    disk_reconnect_s: int = 30
    # the QEMU binary ("": QEMU_BINARY, the system's) and its data directories (-L, in order)
    qemu: str = ""
    qemu_data: tuple[str, ...] = ()

    def compat(self) -> dict:
        """What must be identical at both sites for a checkpoint to apply."""
        c = {
            "qemu": qemu_version(self.qemu or None),
            "machine": self.machine,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "mac": self.mac,
            "cpu": "qemu64" if self.accel == "tcg" else "host",
        }
        if self.disk_socket is not None:  # a virtio-blk device: part of the device state
            c["disk"] = "virtio-blk"
        return c


_qemu_version: str | None = None  # of QEMU_BINARY
_qemu_versions: dict[str, str] = {}  # of other binaries


def qemu_version(binary: str | None = None) -> str:
    """The first line of `binary --version` (default QEMU_BINARY); cached."""
    global _qemu_version
    if binary is None:
        if _qemu_version is None:
            _qemu_version = _version_of(QEMU_BINARY)
        return _qemu_version
    if binary not in _qemu_versions:
        _qemu_versions[binary] = _version_of(binary)
    return _qemu_versions[binary]


def _version_of(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise GuestError(f"QEMU {binary} does not run: {e}") from None
    return out.splitlines()[0].strip()


def _opt(value) -> str:
    """A value inside a QEMU `key=value,...` option (a comma is written twice)."""
    return str(value).replace(",", ",,")


def build_argv(spec: GuestSpec) -> list[str]:
    """The QEMU command line (an argument list, never a shell string)."""
    cpu = ["-accel", "kvm", "-cpu", "host"] if spec.accel == "kvm" else ["-accel", "tcg", "-cpu", "qemu64"]
    argv = [
        spec.qemu or QEMU_BINARY,
        *[a for d in spec.qemu_data for a in ("-L", d)],
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
        # QEMU is the server of its NIC's stream: the site's gate dials it, and dials it again
        # after a restart of the service, so the guest never depends on the service process
        "-netdev", f"stream,id=net0,server=on,addr.type=unix,addr.path={spec.net_socket}",
        "-device", f"virtio-net-pci,netdev=net0,mac={spec.mac},romfile=",
    ]
    if spec.disk_socket is not None:
        # the disk over NBD from the site service, which records every write (docs/disk.md);
        # discard=unmap passes the guest's discards (fstrim, mkfs) on as TRIM: holes in the image
        argv += ["-blockdev", f"driver=nbd,server.type=unix,server.path={_opt(spec.disk_socket)},"
                              f"reconnect-delay={spec.disk_reconnect_s},node-name=disk0,discard=unmap",
                 "-device", "virtio-blk-pci,drive=disk0"]
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
    extra_argv: tuple[str, ...] = ()  # appended to the command line (diagnostics: -trace, -d)
    qmp_stuck_s: float = QMP_STUCK_S
    stderr_lines: int = 0  # lines and bytes QEMU wrote to its stderr (all of it was read)
    stderr_bytes: int = 0
    _line: QmpLine | None = None
    _stderr_task: asyncio.Task | None = None
    _stderr_tail: deque = field(default_factory=lambda: deque(maxlen=5))
    _pid: int | None = None  # a QEMU this process did not start (taken up after a restart)
    started_at: float = 0.0  # the process's start time in clock ticks since boot (/proc/PID/stat)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else self._pid

    @property
    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.returncode is None
        return self._pid is not None and process_start_ticks(self._pid) == self.started_at

    def _exited(self) -> bool:
        return not self.running

    async def wait_exit(self) -> int | None:
        """Until QEMU exits; its exit code when it is our child, else None."""
        if self.proc is not None:
            return await self.proc.wait()
        await wait_pid_exit(self._pid, self.started_at)
        return None

    async def _read_stderr(self, stream, pid: int) -> None:
        """QEMU's stderr into the log, line by line, at most STDERR_LINES_PER_S lines a second
        (the rest counted in `qemu.stderr_suppressed`), until QEMU closes it. `stream` has an
        async `read(n)`: the pipe, or `_FileTail` over the stderr file."""
        budget = LineBudget()
        name = self.spec.name
        rest = b""

        def suppressed(n: int) -> None:
            if n:
                log.warning("qemu.stderr_suppressed", guest=name, pid=pid, lines=n)

        def line(raw: bytes) -> None:
            self.stderr_lines += 1
            self._stderr_tail.append(raw[:STDERR_MAX_LINE])
            show, report = budget.admit(time.monotonic())
            suppressed(report)
            if show:
                log.warning("qemu.stderr", guest=name, pid=pid,
                            line=raw[:STDERR_MAX_LINE].decode(errors="replace").rstrip())

        while True:
            try:
                chunk = await asyncio.wait_for(stream.read(1 << 16), 1.0)
            except asyncio.TimeoutError:  # quiet for a second: say how much was left out
                suppressed(budget.flush())
                continue
            if not chunk:
                break
            self.stderr_bytes += len(chunk)
            *lines, rest = (rest + chunk).split(b"\n")
            for raw in lines:
                line(raw)
            if len(rest) > STDERR_MAX_LINE:
                line(rest)
                rest = b""
        if rest:
            line(rest)
        suppressed(budget.flush())

    def _stderr_summary(self) -> str:
        return " | ".join(r.decode(errors="replace").strip() for r in self._stderr_tail)

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
        err_file = None
        if spec.stderr_path is not None:  # a file never blocks QEMU, and a restarted service tails it on
            err_file = os.open(spec.stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            start_offset = os.fstat(err_file).st_size
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, *self.extra_argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=err_file if err_file is not None else asyncio.subprocess.PIPE, start_new_session=True)
        finally:
            if err_file is not None:
                os.close(err_file)
        self.started_at = process_start_ticks(self.proc.pid) or 0.0
        stream = self.proc.stderr if err_file is None else _FileTail(spec.stderr_path, start_offset, self)
        self._stderr_task = asyncio.create_task(self._read_stderr(stream, self.proc.pid))
        try:
            await self._attach(time.monotonic() + timeout, timeout)
        except BaseException:  # a QEMU we cannot drive is of no use: do not leave it behind
            self.kill()
            raise

    async def _attach(self, deadline: float, timeout: float) -> None:
        """Connect QMP (each attempt bounded: a QEMU stuck before its greeting must not hang
        the start) and set the migration capabilities the checkpoints need."""
        spec = self.spec
        while not spec.qmp_path.exists():
            if self._exited() or time.monotonic() > deadline:
                if self._stderr_task is not None:
                    await asyncio.wait({self._stderr_task}, timeout=1.0)  # QEMU's last words
                raise GuestError(f"QEMU for guest {spec.name} did not start: "
                                 f"{self._stderr_summary() or 'no QMP socket'}")
            await asyncio.sleep(0.02)
        self.qmp = QMPClient(spec.name)
        while True:
            try:
                await asyncio.wait_for(self.qmp.connect(str(spec.qmp_path)), max(0.1, deadline - time.monotonic()))
                break
            except (QMPError, OSError, asyncio.TimeoutError) as e:
                if self._exited():
                    if self._stderr_task is not None:
                        await asyncio.wait({self._stderr_task}, timeout=1.0)
                    raise GuestError(f"QEMU for guest {spec.name} exited with "
                                     f"{self.proc.returncode if self.proc else 'an unknown code'}: "
                                     f"{self._stderr_summary() or 'nothing on stderr'}") from None
                if time.monotonic() > deadline:
                    raise GuestError(f"QEMU of guest {spec.name} did not greet on its QMP socket {spec.qmp_path} "
                                     f"within {timeout:g}s ({type(e).__name__})") from None
                await asyncio.sleep(0.05)
        self._line = QmpLine(self.qmp, spec.name, self.qmp_stuck_s)
        self._event_task = asyncio.create_task(self._pump_events())
        if self.proc is None:  # taken up after a restart: a migration the old service left must end first
            info = await self._execute("query-migrate", timeout=10.0)
            if info.get("status") == "colo":  # a COLO capture the old service ran: end it (guest runs on)
                log.warning("qemu.colo_left_over", guest=spec.name)
                await self.end_colo()
            elif info.get("status") in _MIGRATION_ACTIVE:
                log.warning("qemu.migration_left_over", guest=spec.name, status=info.get("status"))
                await self._settle_migration()
        await self._execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": True},
            {"capability": "events", "state": True},
        ]}, timeout=10.0)
        await self._execute("migrate-set-parameters", {"max-bandwidth": 1 << 40, "downtime-limit": 2000},
                            timeout=10.0)

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
            if self._exited():
                raise GuestError(f"QEMU for guest {self.spec.name} exited"
                                 + (f" with {self.proc.returncode}" if self.proc else ""))
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
                info = await self._execute("query-migrate")
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

    async def _execute(self, command: str, args: dict | None = None, timeout: float = QMP_DEADLINE_S,
                       settle: bool = True):
        """A QMP command with a deadline: a QEMU that stops answering must not stall the
        checkpoint loop forever (the session fails instead, and resyncs). The exchange
        itself is never cut off (see QmpLine)."""
        if self._line is None:
            raise GuestError(f"guest {self.spec.name} has no QMP connection (QEMU not started)")
        return await self._line.execute(command, args, timeout, settle)

    async def stop_vcpus(self) -> None:
        await self._execute("stop")

    async def cont(self) -> None:
        await self._execute("cont")

    async def _migration(self, command: str, feed: bytes | None, timeout: float) -> bytes:
        """Run `migrate` or `migrate-incoming` over a socketpair handed to QEMU with getfd;
        read the stream (migrate) or write `feed` into it (migrate-incoming).

        The stream is read from before `migrate` is sent, not after its reply: QEMU's
        migration thread writes the device state while holding the big QEMU lock, with
        blocking writes, and QEMU's monitor needs that lock to send the reply. A stream
        larger than the socket's buffer, with the thread ahead of the monitor (a busy main
        loop: frames arriving at the stopped guest), left both waiting on us until our QMP
        deadline cut the socket: the checkpoint failed and the session resynced, holding the
        guest's output for seconds."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        started = completed = False
        loop = asyncio.get_running_loop()
        chunks: list[bytes] = []
        pump: asyncio.Task | None = None

        async def stream():
            if feed is None:
                while b := await loop.sock_recv(ours, 1 << 20):
                    chunks.append(b)
            else:
                await loop.sock_sendall(ours, feed)
                ours.shutdown(socket.SHUT_WR)

        try:
            self._drain_events()
            self._send_fd(theirs.fileno())
            await self._execute("getfd", {"fdname": "gmstate"})
            theirs.close()
            ours.setblocking(False)
            deadline = time.monotonic() + timeout
            pump = loop.create_task(stream())
            started = True
            await self._execute(command, {"uri": "fd:gmstate"})
            try:
                await asyncio.wait_for(asyncio.shield(pump), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise GuestError(f"the {command} stream of guest {self.spec.name} did not end within "
                                 f"{timeout:g}s ({sum(map(len, chunks))} bytes read)") from None
            await self._wait_migration(max(0.5, deadline - time.monotonic()))
            completed = True
            return b"".join(chunks)
        finally:
            if pump is not None:  # stopped if still running; a failure of it is the QMP side's to report
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
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
            await self._execute("migrate_cancel", timeout=timeout)
            while time.monotonic() < deadline:
                info = await self._execute("query-migrate", timeout=timeout)
                if info.get("status") not in _MIGRATION_ACTIVE:
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

    # -- COLO: QEMU's dirty log as the capture (replication/colo.py) -----------------------
    async def start_colo(self, delay_ms: int = 0) -> socket.socket:
        """Start a COLO migration into a socketpair; returns our end (the stream and the COLO
        messages). RAM must travel in it, so x-ignore-shared is off until `end_colo`."""
        await self._execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-ignore-shared", "state": False},
            {"capability": "x-colo", "state": True}]})
        await self._execute("migrate-set-parameters", {"x-checkpoint-delay": delay_ms})
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            self._drain_events()
            self._send_fd(theirs.fileno())
            await self._execute("getfd", {"fdname": "gmcolo"})
            await self._execute("migrate", {"uri": "fd:gmcolo"})
        except BaseException:
            ours.close()
            await self._colo_capabilities_off()
            raise
        finally:
            theirs.close()
        return ours

    async def end_colo(self, timeout: float = 5.0) -> None:
        """Leave COLO (x-colo-lost-heartbeat: QEMU's failover, after which the guest runs on
        alone) and put the checkpoint capabilities back. A guest left stopped by a checkpoint
        that never finished runs again."""
        info = await self._execute("query-migrate", timeout=timeout)
        if info.get("status") == "colo":
            await self._execute("x-colo-lost-heartbeat", timeout=timeout)
            deadline = time.monotonic() + timeout
            while (await self._execute("query-migrate", timeout=timeout)).get("status") in ("colo",) + _MIGRATION_ACTIVE:
                if time.monotonic() > deadline:
                    raise GuestError(f"guest {self.spec.name}'s QEMU did not leave COLO within {timeout:g}s")
                await asyncio.sleep(0.01)
        elif info.get("status") in _MIGRATION_ACTIVE:  # still in the initial stream
            await self._settle_migration(timeout)
        await self._colo_capabilities_off()
        if await self.status() in ("paused", "colo", "postmigrate", "finish-migrate"):
            await self.cont()

    async def _colo_capabilities_off(self) -> None:
        await self._execute("migrate-set-capabilities", {"capabilities": [
            {"capability": "x-colo", "state": False},
            {"capability": "x-ignore-shared", "state": True}]})

    def kill(self) -> None:
        """SIGKILL the QEMU process (the crash case)."""
        if self.running:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def ensure_running(self) -> str:
        """After a restart of the service: the guest must run. A checkpoint the old service died in
        the middle of left it stopped (or a migration it gave up on left it in postmigrate): undo
        that and resume it. Returns the state found."""
        state = await self.status()
        if state in ("paused", "postmigrate", "finish-migrate"):
            log.warning("qemu.found_stopped", guest=self.spec.name, pid=self.pid, state=state,
                        hint="the service stopped in the middle of a checkpoint: resuming the guest")
            await self._settle_migration()
            await self.cont()
        elif state != "running":
            raise GuestError(f"the guest's QEMU (pid {self.pid}) is in state {state!r}, not running")
        return state

    @classmethod
    async def attach(cls, spec: GuestSpec, pid: int, started_at: float, timeout: float = 10.0) -> "Guest":
        """Take up a QEMU a previous service process started (it is not our child): check it is
        the same process (pid, start time, its QMP socket on its command line), connect QMP and
        tail its stderr from here on. GuestError with a sentence if it is gone."""
        if process_start_ticks(pid) != started_at:
            raise GuestError(f"the guest's QEMU (pid {pid}) is gone")
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            raise GuestError(f"the guest's QEMU (pid {pid}) is gone") from None
        if str(spec.qmp_path).encode() not in b" ".join(cmdline):
            raise GuestError(f"pid {pid} is no QEMU of guest {spec.name} (its command line does not name "
                             f"{spec.qmp_path})")
        g = cls(spec)
        g._pid, g.started_at = pid, started_at
        if spec.stderr_path is not None and spec.stderr_path.exists():
            g._stderr_task = asyncio.create_task(
                g._read_stderr(_FileTail(spec.stderr_path, spec.stderr_path.stat().st_size, g), pid))
        try:
            await g._attach(time.monotonic() + timeout, timeout)
        except BaseException:
            await g.detach()
            raise
        log.info("guest.attached", name=spec.name, pid=pid)
        return g

    @staticmethod
    def end_stale(pid: int, started_at: float, qmp_path: Path) -> bool:
        """SIGKILL a QEMU an earlier service left that nobody will take up (checked by start time
        and its QMP socket on the command line, so no other process is ever hit)."""
        try:
            if process_start_ticks(pid) != started_at:
                return False
            if str(qmp_path).encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
                return False
            os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            return False
        log.warning("qemu.stale_ended", pid=pid, qmp=str(qmp_path))
        return True

    async def detach(self) -> None:
        """Let go of QEMU without stopping it (the service restarts; the guest runs on)."""
        if self._event_task:
            self._event_task.cancel()
        if self._stderr_task is not None and self.proc is None:
            self._stderr_task.cancel()
        if self.qmp is not None:
            try:
                await asyncio.wait_for(self.qmp.disconnect(), 2)
            except Exception:  # the connection is going away either way
                pass
            self.qmp, self._line = None, None

    async def close(self, timeout: float = 5.0) -> None:
        if self._event_task:
            self._event_task.cancel()
        if self.qmp is not None:
            try:  # not behind an unanswered command: a stuck QEMU is killed below
                await self._execute("quit", timeout=2, settle=False)
            except Exception:
                pass
            try:
                await self.qmp.disconnect()
            except Exception:
                pass
        if self.proc is None and self.running:  # a QEMU taken up after a restart: not our child
            try:
                await asyncio.wait_for(wait_pid_exit(self._pid, self.started_at), timeout)
            except asyncio.TimeoutError:
                self.kill()
        if self.proc and self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.kill()
                try:  # bounded: asyncio's wait() also waits for QEMU's pipes to close
                    await asyncio.wait_for(self.proc.wait(), timeout)
                except asyncio.TimeoutError:
                    log.error("qemu.not_reaped", guest=self.spec.name, pid=self.proc.pid,
                              returncode=self.proc.returncode)
        if self._stderr_task is not None:  # QEMU is gone: its stderr ends
            await asyncio.wait({self._stderr_task}, timeout=2.0)
            self._stderr_task.cancel()


_MIGRATION_ACTIVE = ("setup", "active", "cancelling", "pre-switchover", "device", "wait-unplug")
STDERR_FILE_KEEP = 8 << 20  # the stderr file is emptied once read past this size


def process_start_ticks(pid: int | None) -> float | None:
    """A process's start time (clock ticks since boot), or None if it does not exist (or is a
    zombie): with the pid, it names one process, never a later one that reuses the pid."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return float(fields[19])


async def wait_pid_exit(pid: int, started_at: float) -> None:
    """Until a process that is not our child exits (a pidfd; a poll where there is none)."""
    if process_start_ticks(pid) != started_at:
        return
    try:
        fd = os.pidfd_open(pid)
    except (OSError, AttributeError):
        while process_start_ticks(pid) == started_at:
            await asyncio.sleep(0.5)
        return
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class _FileTail:
    """`read(n)` over QEMU's stderr file, from `offset` on: new bytes as they are appended, b"" at
    the end once QEMU has exited. Empties the file once it has read past STDERR_FILE_KEEP (QEMU
    appends: it writes on at the new end). The file stays open between reads."""

    def __init__(self, path: Path, offset: int, guest: "Guest"):
        self.path, self.offset, self.guest = path, offset, guest
        self._f = None

    async def read(self, n: int) -> bytes:
        while True:
            if self._f is None:
                try:
                    self._f = open(self.path, "rb")
                except FileNotFoundError:
                    self._f = None
            data = b""
            if self._f is not None:
                size = os.fstat(self._f.fileno()).st_size
                if size < self.offset:  # emptied (by us, or by an operator): start over
                    self.offset = 0
                self._f.seek(self.offset)
                data = self._f.read(n)
            if data:
                self.offset += len(data)
                if self.offset >= STDERR_FILE_KEEP and self.offset >= size:
                    os.truncate(self.path, 0)
                    self.offset = 0
                return data
            if self.guest._exited():
                if self._f is not None:
                    self._f.close()
                    self._f = None
                return b""
            await asyncio.sleep(0.2)
