"""The guest's disk through the replicated NBD path against the same guest on a local raw file.

Throughput (`--part throughput`, no lab, no network namespace): the disk guest
(`geomirror guest build --disk`) boots from a fresh copy of its disk once per case, the cases
interleaved, `--rounds` times:

- local: ``-drive file=<copy>,if=virtio,format=raw`` (QEMU's own raw file driver);
- nbd: the disk through ``NbdServer`` (replication/nbd.py) with its extent log sealed and
  released every interval by a thread, but no checkpoints (the data path alone);
- replicated: ``NbdServer`` + ``Primary`` checkpointing to a ``Standby`` with a replica disk over
  loopback (plain TCP, no TLS), as tests/test_disk_replication.py, the standby in a process of its
  own (this file with ``--part standby``). The interval is the product's: the adaptive pacer with
  the default `checkpoint` section, fed as the site feeds it (geomirror/site/primary_side.py);
  ``--interval-ms N`` fixes it instead;
- qemu-nbd (only with ``--cases``): the disk through QEMU's own NBD server (C), no recording: what
  any NBD server can reach here, the ceiling of a C data path.

Inside the guest gm-diskbench (guest/diskbench.c, started by ``gm.diskbench=MB/PLAN`` after
READY) writes a MB MiB file with O_DIRECT: 4 KiB random writes at depth 1 and 8, 64 KiB
sequential writes at depth 1, each write fresh pseudo-random bytes, with idle phases between.
Each phase is timed by the host: from the moment its start line appears on the console to the
moment its done line does (the guest's clock stops during checkpoints). Printed from the same
run: IOPS and MB/s per case, nbd/local and replicated/local (median of the per-round ratios);
for the replicated case the pause per checkpoint while the disk is idle and while each writer
runs, disk blocks per epoch, pause share, and the disk section's bytes on the wire against the
bytes the guest wrote.

Write-to-release latency (`--part latency`, the lab, root): `geomirror lab up --disk`; for each
RTT the WAN emulator is set and one client in gm-client appends journal records (a 4 KiB
O_DIRECT write + fdatasync in the guest, then `ok n`, released by output commit) back to back
for `--seconds`, then does memcached `incr` the same way (a reply that waits for no disk
write); p50/p99 per row. The same again in a second lab with output commit bypassed
(GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT=1: the guest still checkpoints, replies leave at once),
and the floor RTT + pause + interval/2 from the primary's own figures over the row.

    .venv/bin/python bench/disk.py --part throughput [--rounds 3] [--plan PLAN] [--file-mb 64]
    .venv/bin/python bench/disk.py --part latency [--rtts 1,25] [--seconds 10] [--record-bytes 64]

Run each part under `flock /tmp/gm-lab.lock` (the lab's lock; the throughput part uses no lab,
but it loads both cores).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from geomirror import logging as gl  # noqa: E402
from geomirror.config import CheckpointSection  # noqa: E402
from geomirror.disk_image import build_disk_image  # noqa: E402
from geomirror.image import default_cmdline  # noqa: E402
from lab import cli as labcli  # noqa: E402
from lab import world  # noqa: E402
from replication import codec as codec_mod  # noqa: E402
from replication import transport  # noqa: E402
from replication.capture import Capture  # noqa: E402
from replication.gate import Gate  # noqa: E402
from replication.nbd import NbdServer  # noqa: E402
from replication.pacer import EpochSample, Pacer, PacerPolicy  # noqa: E402
from replication.primary import Primary, PrimaryConfig  # noqa: E402
from replication.qemu import Guest, GuestSpec, detect_accel  # noqa: E402
from replication.standby import Standby  # noqa: E402
from replication.store import Replica  # noqa: E402
from gmbase.stats import percentile as pct  # noqa: E402

MB = 1_000_000
DEFAULT_PLAN = "idle:3,randwrite:4k:5,idle:2,randwrite:4k:5:8,idle:2,write:64k:5,idle:2"
CASES = ("local", "nbd", "replicated")
ALL_CASES = CASES + ("qemu-nbd",)
LINE_RE = re.compile(r"GM-DISKBENCH (prefill|start|done|end|error)\b ?(.*)")


# ---------------------------------------------------------------- pure parts


@dataclass(frozen=True)
class Phase:
    kind: str  # idle | randwrite | write
    seconds: float
    bs: int = 0
    depth: int = 0

    @property
    def label(self) -> str:
        if self.kind == "idle":
            return "idle"
        what = "random" if self.kind == "randwrite" else "sequential"
        return f"{self.bs // 1024} KiB {what} d{self.depth}"

    @property
    def unit(self) -> str:
        return "IOPS" if self.kind == "randwrite" else "MB/s"


def _size(text: str) -> int:
    m = re.fullmatch(r"([1-9][0-9]*)([kK]?)", text)
    if not m:
        raise ValueError(f"{text!r} is not a size (bytes, or with a k suffix)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_plan(text: str, file_mb: int) -> list[Phase]:
    """The phases of a gm-diskbench plan (guest/diskbench.c), checked as the guest checks them."""
    phases = []
    for item in text.split(","):
        f = item.split(":")
        try:
            if f[0] == "idle" and len(f) == 2:
                phases.append(Phase("idle", float(f[1])))
                continue
            if f[0] in ("randwrite", "write") and len(f) in (3, 4):
                bs, depth = _size(f[1]), int(f[3]) if len(f) == 4 else 1
                if bs % 4096 or (file_mb << 20) % bs:
                    raise ValueError(f"block size {bs} is not a multiple of 4096 dividing {file_mb} MiB")
                if not 1 <= depth <= 64:
                    raise ValueError(f"depth {depth} is not 1 to 64")
                phases.append(Phase(f[0], float(f[2]), bs, depth))
                continue
        except ValueError as e:
            raise ValueError(f"plan item {item!r}: {e}") from None
        raise ValueError(f"plan item {item!r} is not idle:S, randwrite:BS:S[:DEPTH] or write:BS:S[:DEPTH]")
    if any(p.seconds <= 0 for p in phases):
        raise ValueError("every phase lasts more than 0 seconds")
    return phases


def diskbench_arg(file_mb: int, plan: str) -> str:
    """The kernel command-line option that makes the disk guest's init run gm-diskbench."""
    if not re.fullmatch(r"[a-z0-9:.,kK]+", plan):
        raise ValueError(f"plan {plan!r} has characters a kernel command-line word cannot carry")
    return f"gm.diskbench={file_mb}/{plan}"


@dataclass
class PhaseRun:
    """One phase as the host saw it: `start`/`end` are host times (time.monotonic) of the
    console lines; `ios`, `nbytes`, `guest_s` from the done line."""

    index: int
    kind: str
    start: float
    end: float | None = None
    ios: int = 0
    nbytes: int = 0
    guest_s: float = 0.0

    @property
    def seconds(self) -> float:
        return (self.end or self.start) - self.start

    def rate(self, unit: str) -> float:
        """IOPS or MB/s over the host's time."""
        s = max(self.seconds, 1e-9)
        return self.ios / s if unit == "IOPS" else self.nbytes / s / MB


class ConsoleError(RuntimeError):
    pass


def parse_console(lines: list[tuple[float, str]]) -> tuple[float | None, list[PhaseRun], bool]:
    """(host time, console line) pairs -> (time of the prefill line, the phases, whether the end
    line came). A `GM-DISKBENCH error` line raises ConsoleError with its sentence."""
    prefill, runs, ended = None, [], False
    open_: dict[int, PhaseRun] = {}
    for t, line in lines:
        m = LINE_RE.search(line)
        if not m:
            continue
        what, rest = m.group(1), m.group(2).split()
        if what == "error":
            raise ConsoleError(f"gm-diskbench: {m.group(2).strip()}")
        if what == "prefill":
            prefill = t
        elif what == "end":
            ended = True
        elif what == "start":
            r = PhaseRun(int(rest[0]), rest[1], t)
            open_[r.index] = r
            runs.append(r)
        elif what == "done":
            r = open_.pop(int(rest[0]), None)
            if r is None:
                raise ConsoleError(f"gm-diskbench: done line without its start: {line.strip()}")
            kv = dict(w.split("=", 1) for w in rest[2:] if "=" in w)
            r.end, r.ios, r.nbytes, r.guest_s = t, int(kv["ios"]), int(kv["bytes"]), float(kv["seconds"])
    return prefill, runs, ended


@dataclass(frozen=True)
class Epoch:
    """What the bench keeps of a checkpoint: when its pause began (host monotonic) and its figures."""

    epoch: int
    paused_at: float
    pause_ms: float
    dirty_pages: int
    disk_blocks: int
    disk_bytes: int
    disk_wire: int
    wire_bytes: int
    stop_ms: float = 0.0  # QEMU's stop (it completes the disk writes in flight first)
    seal_ms: float = 0.0  # the extent log's seal: the disk's own part of the pause
    interval_ms: float = 0.0  # the interval that preceded this epoch's pause
    reason: str = ""  # the pacer's reason for it ("fixed" without the pacer)


def top_reason(epochs: list[Epoch]) -> str:
    """The pacer's most frequent reason over these epochs, with its share."""
    if not epochs:
        return "-"
    counts: dict[str, int] = {}
    for e in epochs:
        counts[e.reason] = counts.get(e.reason, 0) + 1
    reason = max(counts, key=counts.get)
    return f"{reason} {counts[reason] / len(epochs):.0%}"


def epochs_between(epochs: list[Epoch], start: float, end: float) -> list[Epoch]:
    """The epochs whose pause began in [start, end)."""
    return [e for e in epochs if start <= e.paused_at < end]


def phase_epochs(epochs: list[Epoch], runs: list[PhaseRun], margin_s: float) -> list[tuple[PhaseRun, list[Epoch]]]:
    """Per phase, the epochs whose pause began inside it, `margin_s` away from either end (for
    pauses: a window wholly idle or wholly busy)."""
    return [(r, epochs_between(epochs, r.start + margin_s, (r.end or r.start) - margin_s)) for r in runs]


def carried_by(epochs: list[Epoch], runs: list[PhaseRun], i: int) -> list[Epoch]:
    """The epochs that carry phase i's writes: from its start to the next phase's start (the
    writer's last writes are sealed by the first checkpoint after its done line)."""
    end = runs[i + 1].start if i + 1 < len(runs) else float("inf")
    return epochs_between(epochs, runs[i].start, end)


def median_ratio(pairs: list[tuple[float, float]]) -> float:
    """The median over rounds of a/b (each pair measured in the same round)."""
    return statistics.median(a / b for a, b in pairs if b > 0) if pairs else float("nan")


# ---------------------------------------------------------------- the throughput part (I/O)


class ConsoleWatch:
    """Tails the guest's serial log; each complete line with the host time it was first seen."""

    def __init__(self, path: Path, poll_s: float = 0.005):
        self.path, self.poll_s = path, poll_s
        self.lines: list[tuple[float, str]] = []
        self._buf, self._off = b"", 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.poll()
            await asyncio.sleep(self.poll_s)

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._off)
                new = f.read()
        except FileNotFoundError:
            return
        if not new:
            return
        t = time.monotonic()
        self._off += len(new)
        *done, self._buf = (self._buf + new).split(b"\n")
        self.lines.extend((t, ln.decode(errors="replace")) for ln in done)

    async def wait_for(self, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(what in ln for _, ln in self.lines):
                return
            if any("GM-DISKBENCH error" in ln for _, ln in self.lines):
                parse_console(self.lines)  # raises with the guest's sentence
            await asyncio.sleep(0.05)
        raise ConsoleError(f"no {what!r} on the guest's console within {timeout:.0f}s ({self.path})")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.poll()


def copy_disk(src: Path, dest: Path) -> None:
    subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(src), str(dest)], check=True)
    os.chmod(dest, 0o600)


class Sealer:
    """The nbd case: seals and releases the extent log every interval, as a checkpoint would,
    without stopping the guest."""

    def __init__(self, server, interval_s: float):
        self.server, self.interval_s = server, interval_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.interval_s):
            self.server.checkpoint_starting()
            sealed = self.server.seal()
            for _numbers, _contents in sealed.by_chunk():
                pass
            self.server.release(sealed.nbytes)


class NoGate(Gate):
    """The guest's NIC is connected to nothing: no output to hold."""

    def __init__(self):
        self._epoch = 0

    @property
    def current_epoch(self):
        return self._epoch

    def seal(self, epoch):
        self._epoch = epoch + 1

    def release(self, epoch):
        pass


class ProductPacing:
    """The replicated case's interval as the product picks it: the adaptive pacer with the default
    `checkpoint` section, fed what each epoch measured the way the site feeds it
    (geomirror/site/primary_side.py `_next_interval`; no guest output here, so no gate timings).
    `reasons[n]`: the pacer's reason for the interval before epoch n."""

    def __init__(self, ck: CheckpointSection | None = None):
        ck = ck or CheckpointSection()
        self.policy = PacerPolicy(min_interval_ms=ck.min_interval_ms, max_interval_ms=ck.max_interval_ms,
                                  latency_budget_ms=ck.latency_budget_ms, max_pause_share=ck.max_pause_share,
                                  max_wan_bytes_per_s=ck.max_wan_mbit * 1e6 / 8, max_in_flight=ck.max_in_flight,
                                  idle_interval_ms=ck.idle_interval_ms)
        self.pacer = Pacer(self.policy, ck.interval_ms)
        self.reasons: dict[int, str] = {}

    def __call__(self, primary, rec) -> float:
        if rec is None:
            return self.pacer.interval_ms
        link = primary.link
        d = self.pacer.update(EpochSample(
            interval_ms=rec.interval_ms, pause_ms=rec.pause_ms, dirty_bytes=rec.dirty_bytes,
            wire_bytes=rec.wire_bytes, rtt_ms=link.rtt_ms or 0.0, rtt_var_ms=link.rtt_var_ms,
            bandwidth_bytes_per_s=link.bandwidth_bps, in_flight=primary.status.in_flight))
        self.reasons[rec.epoch + 1] = d.reason
        return d.interval_ms


class QemuNbd:
    """QEMU's own NBD server (C) on a unix socket: the qemu-nbd case (no recording)."""

    def __init__(self, image: Path, socket_path: Path):
        self.image, self.socket_path = image, socket_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "--cache=writeback", "-k",
                                      str(self.socket_path), str(self.image)], stderr=subprocess.DEVNULL)
        for _ in range(500):
            if self.socket_path.exists():
                return
            time.sleep(0.01)
        self.close()
        raise ConsoleError(f"qemu-nbd did not create {self.socket_path} within 5 s")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None


class TimedNbd(NbdServer):
    """The server whose `seal()` (the disk's whole part of the pause) is timed."""

    last_seal_ms = 0.0

    def seal(self, epoch=None):
        t = time.perf_counter()
        sealed = super().seal(epoch)
        self.last_seal_ms = (time.perf_counter() - t) * 1000
        return sealed


class TimedGuest(Guest):
    """The guest whose `stop` (QEMU completes the writes in flight first) is timed."""

    last_stop_ms = 0.0

    async def stop_vcpus(self) -> None:
        t = time.perf_counter()
        await super().stop_vcpus()
        self.last_stop_ms = (time.perf_counter() - t) * 1000


class MeasuredPrimary(Primary):
    """Keeps when each pause began, how long its `stop` and disk seal took, and the disk
    section's size in each frame."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.paused_at: dict[int, float] = {}
        self.parts: dict[int, tuple[float, float]] = {}  # epoch -> (stop ms, seal ms)
        self.disk_wire: dict[int, int] = {}

    async def _pause(self, n, final):
        self.paused_at[n] = time.monotonic()
        out = await super()._pause(n, final)
        self.parts[n] = (self.guest.last_stop_ms, self.nbd.last_seal_ms)
        return out

    def _encode_epoch(self, codec, n, dirty, dev, base, check, sealed):
        frame = super()._encode_epoch(codec, n, dirty, dev, base, check, sealed)
        h = codec_mod.peek_header(frame)
        self.disk_wire[n] = h.disk_index_len + h.disk_len
        return frame


def max_frame(memory_mb: int) -> int:
    return (memory_mb << 20) + (64 << 20)


async def start_standby(replica_dir: Path, disk: Path, memory_mb: int, compat: dict):
    """The standby in a process of its own (as at its own site: it shares no GIL with the
    primary's NBD server and codec); (the process, its port on 127.0.0.1)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), "--part", "standby", "--standby-dir", str(replica_dir),
        "--replica-disk", str(disk), "--memory", str(memory_mb), "--compat", json.dumps(compat),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    m = re.fullmatch(rb"port (\d+)\n", line)
    if not m:
        proc.kill()
        await proc.wait()
        raise ConsoleError(f"the standby process printed {line!r} instead of its port")
    return proc, int(m.group(1))


async def stop_standby(proc) -> None:
    proc.stdin.close()  # it ends when its stdin does
    try:
        await asyncio.wait_for(proc.wait(), 30)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()


async def standby_main(replica_dir: Path, disk: Path, memory_mb: int, compat: dict) -> None:
    """`--part standby`: serve a Standby over a replica with `disk` until stdin closes."""
    replica = Replica(replica_dir, memory_mb << 20, disk=disk)
    replica.open()
    try:
        standby = Standby(replica, compat, "site-b", refuse_delay_s=0)
        srv = await transport.serve("127.0.0.1", 0, standby.handle, max_frame=max_frame(memory_mb))
        print(f"port {srv.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        srv.close()
    finally:
        replica.close()


async def boot_case(case: str, img, workdir: Path, args, plan: list[Phase]) -> dict:
    """Boot the disk guest once for `case`; its phases (host-timed) and, replicated, its epochs."""
    d = workdir / case
    d.mkdir()
    disk = d / "disk.raw"
    copy_disk(img.disk, disk)
    mem = args.memory
    nbd = sealer = primary = standby_proc = capture = qnbd = pacing = None
    tasks: list[asyncio.Task] = []
    if case in ("nbd", "replicated"):
        nbd = TimedNbd(disk, d / "disk.sock")
        nbd.start()
    elif case == "qemu-nbd":
        qnbd = QemuNbd(disk, d / "disk.sock")
        qnbd.start()
    append = (default_cmdline("198.51.100.10", 24, "198.51.100.1") + " root=/dev/vda "
              + diskbench_arg(args.file_mb, args.plan))
    spec = GuestSpec(name=f"diskbench-{case}", memory_mb=mem, kernel=img.kernel, initrd=img.initrd, append=append,
                     ram_path=d / "ram", qmp_path=d / "qmp.sock", serial_path=d / "serial.log",
                     net_socket=d / "net.sock", accel=detect_accel(),
                     disk_socket=None if case == "local" else d / "disk.sock")
    extra = ("-drive", f"file={disk},if=virtio,format=raw") if case == "local" else ()
    guest = TimedGuest(spec, extra_argv=extra)
    watch = ConsoleWatch(spec.serial_path)
    started = time.monotonic()
    protected_at = None
    try:
        await guest.start()
        watch.start()
        if case == "nbd":
            sealer = Sealer(nbd, (args.interval_ms or 50) / 1000)
            sealer.thread.start()
        elif case == "replicated":
            rdisk = d / "replica-disk.raw"
            copy_disk(img.disk, rdisk)
            standby_proc, port = await start_standby(d / "replica", rdisk, mem, spec.compat())
            capture = Capture(spec.ram_path, mem << 20)
            pacing = None if args.interval_ms else ProductPacing()
            cfg = PrimaryConfig(site="site-a", compat=spec.compat(), run_id="diskbench",
                                interval_ms=args.interval_ms or CheckpointSection().interval_ms)

            async def connect():
                return await transport.connect("127.0.0.1", port, max_frame=max_frame(mem))

            primary = MeasuredPrimary(cfg, guest, capture, NoGate(), connect, nbd=nbd, interval_fn=pacing)
            tasks.append(asyncio.create_task(primary.run()))
        await guest.wait_ready(180)
        ready_s = time.monotonic() - started
        total = sum(p.seconds for p in plan)
        await watch.wait_for("GM-DISKBENCH prefill", 120)
        prefill_t = time.monotonic()
        if primary is not None:
            if primary.status.state != "protected":
                raise ConsoleError(f"the replicated guest started its phases before protection "
                                   f"(state {primary.status.state})")
            protected_at = prefill_t
        await watch.wait_for("GM-DISKBENCH end", total * 3 + 60)
        if primary is not None:  # the last epochs' acknowledgements
            mark = primary.status.epoch
            for _ in range(200):
                if primary.status.committed_epoch >= mark:
                    break
                await asyncio.sleep(0.05)
    finally:
        watch.stop()
        if primary is not None:
            primary.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if sealer is not None:
            sealer.stop.set()
            sealer.thread.join()
        await guest.close()
        if standby_proc is not None:
            await stop_standby(standby_proc)
        if nbd is not None:
            nbd.close()
        if qnbd is not None:
            qnbd.close()
        if capture is not None:
            capture.close()
    _, runs, ended = parse_console(watch.lines)
    if not ended or len(runs) != len(plan) or any(r.end is None for r in runs):
        raise ConsoleError(f"{case}: the guest's phases did not all complete ({spec.serial_path})")
    out = {"case": case, "ready_s": ready_s, "runs": runs, "epochs": [], "protected_before_phases": protected_at}
    if primary is not None:
        out["epochs"] = [Epoch(r.epoch, primary.paused_at.get(r.epoch, r.sent_at), r.pause_ms, r.dirty_pages,
                               r.disk_blocks, r.disk_bytes, primary.disk_wire.get(r.epoch, 0), r.wire_bytes,
                               *primary.parts.get(r.epoch, (0.0, 0.0)), r.interval_ms,
                               pacing.reasons.get(r.epoch, "initial") if pacing else "fixed")
                         for r in primary.history]
        out["disk_sync"] = (primary.status.last_disk_sync_chunks, primary.status.last_disk_sync_bytes)
    return out


def throughput(args) -> int:
    gl.setup(level="WARNING")
    plan = parse_plan(args.plan, args.file_mb)
    img = build_disk_image(progress=False)
    cases = parse_cases(args.cases)
    workdir = Path(tempfile.mkdtemp(prefix="gm-diskbench-", dir=args.dir))
    results: list[dict] = []
    try:
        for rnd in range(args.rounds):
            order = cases if rnd % 2 == 0 else tuple(reversed(cases))  # interleaved, neither always first
            for case in order:
                t0 = time.monotonic()
                sub = workdir / f"r{rnd}"
                sub.mkdir(exist_ok=True)
                r = asyncio.run(boot_case(case, img, sub, args, plan))
                r["round"] = rnd
                results.append(r)
                rates = ", ".join(f"{plan[x.index].label} {x.rate(plan[x.index].unit):.1f} {plan[x.index].unit}"
                                  for x in r["runs"] if plan[x.index].kind != "idle")
                print(f"round {rnd} {case:10} ({time.monotonic() - t0:.0f}s, READY after {r['ready_s']:.1f}s): {rates}",
                      flush=True)
                shutil.rmtree(sub / case, ignore_errors=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        with args.out.open("a") as f:
            for r in results:
                f.write(json.dumps({**{k: v for k, v in r.items() if k not in ("runs", "epochs")},
                                    "runs": [dataclasses.asdict(x) for x in r["runs"]],
                                    "epochs": [dataclasses.asdict(e) for e in r["epochs"]]}) + "\n")
    report_throughput(results, plan, args, detect_accel(), cases)
    return 0


def parse_cases(text: str) -> tuple[str, ...]:
    """`--cases`: comma-separated, from ALL_CASES, `local` among them (the ratios' denominator)."""
    cases = tuple(c for c in text.split(",") if c)
    bad = [c for c in cases if c not in ALL_CASES]
    if bad or "local" not in cases or len(set(cases)) != len(cases):
        raise ValueError(f"cases {text!r}: need distinct names from {', '.join(ALL_CASES)}, local among them")
    return cases


def report_throughput(results: list[dict], plan: list[Phase], args, accel: str,
                      cases: tuple[str, ...] = CASES) -> None:
    pacing = (f"fixed {args.interval_ms:g} ms interval" if args.interval_ms else
              "the product's adaptive pacer (default checkpoint section)")
    print(f"\ndisk benchmark: {args.rounds} rounds, cases interleaved; guest {args.memory} MB, accel {accel}, "
          f"gm-diskbench on a {args.file_mb} MiB file (O_DIRECT, fresh random bytes per write); replicated: "
          f"{pacing}, standby process on loopback")
    by = {(r["round"], r["case"]): r for r in results}
    rounds = sorted({r["round"] for r in results})
    others = [c for c in cases if c != "local"]
    short = {"replicated": "repl"}
    print(f"{'case':24} {'local':>10} " + " ".join(f"{c:>11}" for c in others) + " "
          + " ".join(f"{short.get(c, c) + '/local':>14}" for c in others)
          + "  (median over rounds; ratios: median of per-round ratios)")
    for i, ph in enumerate(plan):
        if ph.kind == "idle":
            continue
        val = {c: [by[(n, c)]["runs"][i].rate(ph.unit) for n in rounds] for c in cases}
        med = {c: statistics.median(v) for c, v in val.items()}
        ratios = [median_ratio(list(zip(val[c], val["local"]))) for c in others]
        print(f"{ph.label + ' ' + ph.unit:24} {med['local']:>10.1f} " + " ".join(f"{med[c]:>11.1f}" for c in others)
              + " " + " ".join(f"{x:>14.2f}" for x in ratios) + "   per round ("
              + "/".join(("local", *others)) + "): "
              + "; ".join("/".join(f"{val[c][k]:.0f}" for c in ("local", *others)) for k in range(len(rounds))))
    if "replicated" not in cases:
        return
    # pauses: idle against busy, all replicated rounds pooled
    rep = [by[(n, "replicated")] for n in rounds]
    print(f"\nreplicated: pause per checkpoint by phase (pauses beginning ≥ {args.margin:g} s inside the phase), "
          "all rounds pooled")
    print(f"{'phase':24} {'epochs':>6} {'pause p50':>10} {'p99':>8} {'stop p50':>9} {'p99':>7} {'seal p50':>9} "
          f"{'p99':>7} {'disk blk/ep':>11} {'dirty pg/ep':>11} {'pause share':>11} {'interval p50':>12}  pacer")
    groups: dict[str, list[Epoch]] = {}
    share: dict[str, list[float]] = {}
    for r in rep:
        for run, eps in phase_epochs(r["epochs"], r["runs"], args.margin):
            label = plan[run.index].label
            groups.setdefault(label, []).extend(eps)
            span = run.seconds - 2 * args.margin
            if span > 0:
                share.setdefault(label, []).append(sum(e.pause_ms for e in eps) / 1000 / span)
    for label, eps in groups.items():
        ps, st, se = [e.pause_ms for e in eps], [e.stop_ms for e in eps], [e.seal_ms for e in eps]
        print(f"{label:24} {len(eps):>6} {pct(ps, 50):>8.1f}ms {pct(ps, 99):>6.1f}ms {pct(st, 50):>7.2f}ms "
              f"{pct(st, 99):>5.1f}ms {pct(se, 50):>7.3f}ms {pct(se, 99):>5.3f}ms "
              f"{statistics.mean(e.disk_blocks for e in eps) if eps else 0:>11.1f} "
              f"{statistics.mean(e.dirty_pages for e in eps) if eps else 0:>11.0f} "
              f"{statistics.mean(share.get(label) or [float('nan')]):>10.0%} "
              f"{pct([e.interval_ms for e in eps], 50) if eps else float('nan'):>10.1f}ms  {top_reason(eps)}")
    idle = [e.pause_ms for e in groups.get("idle", [])]
    for label, eps in groups.items():
        if label != "idle" and idle and eps:
            print(f"  {label}: pause p50 busy/idle {pct([e.pause_ms for e in eps], 50) / pct(idle, 50):.2f}, "
                  f"p99 {pct([e.pause_ms for e in eps], 99) / pct(idle, 99):.2f}")
    print("\nreplicated: disk bytes, per write phase (the epochs from its start to the next phase's start), "
          "all rounds pooled")
    print(f"{'phase':24} {'written MB':>10} {'sealed MB':>10} {'disk wire MB':>12} {'wire/written':>12} "
          f"{'all frames MB':>13}")
    for i, ph in enumerate(plan):
        if ph.kind == "idle":
            continue
        written = sealed = dwire = frames = 0
        for r in rep:
            eps = carried_by(r["epochs"], r["runs"], i)
            written += r["runs"][i].nbytes
            sealed += sum(e.disk_bytes for e in eps)
            dwire += sum(e.disk_wire for e in eps)
            frames += sum(e.wire_bytes for e in eps)
        print(f"{ph.label:24} {written / MB:>10.1f} {sealed / MB:>10.1f} {dwire / MB:>12.1f} "
              f"{dwire / max(written, 1):>12.3f} {frames / MB:>13.1f}")
    syncs = [r.get("disk_sync") for r in rep]
    print(f"initial disk sync (chunks, bytes) per round: {syncs}")


# ---------------------------------------------------------------- the latency part (the lab)


def cycle_figures(before: dict, after: dict, seconds: float) -> tuple[float, float]:
    """(mean interval ms, mean pause ms) over a window, from the primary's status before and after
    it (`epoch`, `pause_total_ms`): cycle = interval + pause."""
    epochs = max(after["epoch"] - before["epoch"], 1)
    pause_ms = (after["pause_total_ms"] - before["pause_total_ms"]) / epochs
    return seconds * 1000 / epochs - pause_ms, pause_ms


def release_floor(rtt_ms: float, pause_ms: float, interval_ms: float) -> float:
    """What output commit adds at least, on average: the rest of the epoch the reply was made in
    (half an interval), the pause, and the round trip of the checkpoint and its acknowledgement."""
    return rtt_ms + pause_ms + interval_ms / 2


def timed_calls(call, seconds: float) -> list[float]:
    """`call()` back to back for `seconds`; ms each."""
    out = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        t = time.perf_counter()
        call()
        out.append((time.perf_counter() - t) * 1000)
    return out


def latency_row(what: str, seconds: float, warmup: float, record: bytes) -> dict:
    """One client connection from gm-client: journal appends (`append`) or memcached `incr`."""
    if what == "append":
        conn = labcli.journal_connect(timeout=30)

        def call():
            conn.append(record)
    else:
        conn = labcli.Memcache(labcli.client_connect(timeout=30))
        conn.set("diskbench", "0")

        def call():
            conn.incr("diskbench")
    try:
        timed_calls(call, warmup)
        a0 = labcli.site_status("site-a")["replication"]
        t0 = time.monotonic()
        lats = timed_calls(call, seconds)
        dt = time.monotonic() - t0
        st = labcli.site_status("site-a")
        a1 = st["replication"]
    finally:
        conn.close()
    interval_ms, pause_ms = cycle_figures(a0, a1, dt)
    return {"n": len(lats), "p50": pct(lats, 50), "p99": pct(lats, 99), "interval_ms": interval_ms,
            "pause_ms": pause_ms, "reason": (st.get("pacer") or {}).get("reason", "?")}


def latency(args) -> int:
    gl.setup(level="WARNING")
    if os.geteuid() != 0:
        print("bench/disk.py --part latency needs root (the lab)", file=sys.stderr)
        return 2
    rtts = [float(x) for x in args.rtts.split(",")]
    record = os.urandom(args.record_bytes)
    rows = []
    for mode, env in (("output commit", None), ("bypassed", {"GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT": "1"})):
        t0 = time.monotonic()
        world.up(disk=True, env=env)  # refused if a lab is up: this never tears down someone else's
        try:
            labcli.wait_protected()
            labcli.wait_reachable()
            print(f"lab up --disk ({mode}): {time.monotonic() - t0:.0f}s", flush=True)
            for rtt in rtts:
                labcli.wan(rtt=f"{rtt:g}ms")
                time.sleep(1.0)
                for what in ("append", "incr"):
                    r = latency_row(what, args.seconds, args.warmup, record)
                    rows.append((mode, rtt, what, r))
                    print(f"  RTT {rtt:g} ms {what}: {r['n']} calls, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms",
                          flush=True)
        finally:
            world.down()
    print(f"\nwrite-to-release latency: journal append of {args.record_bytes} bytes (a 4 KiB O_DIRECT write + "
          "fdatasync in the guest, then the reply) and, for comparison, memcached incr (no disk write), from "
          f"gm-client, one connection back to back, {args.seconds:g} s per row; lab pacer adaptive; floor = "
          "RTT + pause + interval/2 over the row")
    print(f"{'RTT':>5} {'gate':14} {'call':6} {'calls':>6} {'p50 ms':>7} {'p99 ms':>7} {'interval':>9} "
          f"{'pause':>6} {'floor':>6} {'p50/floor':>9}  pacer reason at the row's end")
    for mode, rtt, what, r in rows:
        floor = release_floor(rtt, r["pause_ms"], r["interval_ms"])
        print(f"{rtt:>4g}ms {mode:14} {what:6} {r['n']:>6} {r['p50']:>7.1f} {r['p99']:>7.1f} "
              f"{r['interval_ms']:>7.1f}ms {r['pause_ms']:>5.1f} {floor:>6.1f} {r['p50'] / floor:>9.2f}  {r['reason']}")
    got = {(mode, rtt, what): r for mode, rtt, what, r in rows}
    for rtt in rtts:
        oc, by = got.get(("output commit", rtt, "append")), got.get(("bypassed", rtt, "append"))
        inc = got.get(("output commit", rtt, "incr"))
        if oc and by and inc:
            print(f"RTT {rtt:g} ms: output commit adds to an append p50 {oc['p50'] - by['p50']:+.1f} ms, "
                  f"p99 {oc['p99'] - by['p99']:+.1f} ms; an append over an incr, both committed: "
                  f"p50 {oc['p50'] - inc['p50']:+.1f} ms")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("throughput", "latency", "standby"), required=True,
                    help="standby: the replicated case's standby process (started by the throughput part)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plan", default=DEFAULT_PLAN, help="gm-diskbench phases (guest/diskbench.c)")
    ap.add_argument("--file-mb", type=int, default=64, help="the writer's file in the guest, MiB")
    ap.add_argument("--memory", type=int, default=128, help="guest RAM, MB")
    ap.add_argument("--interval-ms", type=float, default=None,
                    help="a fixed checkpoint interval for the replicated case (default: the product's adaptive "
                         "pacer with the default checkpoint section); the nbd case seals every this many ms (50)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"throughput part: which of {', '.join(ALL_CASES)} to run (local among them)")
    ap.add_argument("--margin", type=float, default=0.5, help="seconds at each phase's ends left out of the pauses")
    ap.add_argument("--dir", default="/dev/shm", help="where the disk copies, RAM and replica live")
    ap.add_argument("--out", type=Path, help="append each boot's phases and epochs here as JSON lines")
    ap.add_argument("--rtts", default="1,25", help="latency part: WAN RTTs in ms")
    ap.add_argument("--seconds", type=float, default=10, help="latency part: seconds per row")
    ap.add_argument("--warmup", type=float, default=1.5, help="latency part: seconds of calls before each row")
    ap.add_argument("--record-bytes", type=int, default=64, help="latency part: bytes per journal record")
    ap.add_argument("--standby-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--replica-disk", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--compat", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.part == "standby":
        gl.setup(level="ERROR")
        asyncio.run(standby_main(a.standby_dir, a.replica_disk, a.memory, json.loads(a.compat)))
        return 0
    return throughput(a) if a.part == "throughput" else latency(a)


if __name__ == "__main__":
    sys.exit(main())
