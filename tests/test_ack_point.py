"""The point the standby acknowledges: "durable in its journal" (docs/replication.md, "What the
ACK means"). The apply follows the ACK; these tests hold the two rules that make that safe:

- a standby killed after it sent ACK N, anywhere before N's apply ends, comes out at N (the
  journal replays it), with N's RAM and device state: nothing acknowledged is lost;
- a takeover right after the last ACK (`stop_accepting`, then `resume`) sees N applied, never
  N-1 or a mix.

Real Standby, codec, channel and replica; the primary is the protocol driver of
tests/test_channel_bad_input.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from replication.standby import Standby, resume
from replication.store import FileOps, Replica
from replication.transport import ChannelError, connect, serve
from tests.test_channel_bad_input import COMPAT, RAM, GoodPrimary

ROOT = Path(__file__).parent.parent
# after the ACK: right after it is sent, and at each step of the apply that follows
AFTER_ACK = ["after-ack", "mid-ram", "after-ram", "after-device-state", "after-meta"]


async def start_worker(d: Path, crash_at: str, writeback_ms: float = 0.0) -> tuple[subprocess.Popen, int]:
    port_file = d.parent / f"{d.name}.port"
    env = dict(os.environ, GEOMIRROR_CRASH_AT=crash_at, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tests.standby_worker", str(d), str(port_file), str(writeback_ms)],
                            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(1000):
        if port_file.exists() and port_file.read_text():
            return proc, int(port_file.read_text())
        assert proc.poll() is None, "the standby worker exited at start"
        await asyncio.sleep(0.01)
    raise AssertionError("the standby worker did not listen")


@pytest.mark.parametrize("point", AFTER_ACK)
async def test_a_standby_killed_after_its_ack_comes_out_at_the_acknowledged_epoch(tmp_path, point):
    d = tmp_path / "replica"
    proc, port = await start_worker(d, point)
    try:
        p = GoodPrimary(await connect("127.0.0.1", port))
        reply = await p.hello()
        assert not reply["valid"]
        await p.initial_sync()
        acked = await p.checkpoint(1)  # returns only once ACK 1 is read
        p.ch.close()
        assert acked == 1
        assert await asyncio.to_thread(proc.wait, 30) == -signal.SIGKILL, f"the worker was meant to die at {point}"
    finally:
        if proc.poll() is None:
            proc.kill()
    r = Replica(d, RAM)
    try:
        rep = r.open()
        assert rep.committed_epoch == 1 and rep.valid, f"acknowledged epoch 1 lost after a crash at {point} ({rep})"
        assert np.array_equal(r.ram, p.ram), f"the replica is not the acknowledged epoch's RAM ({point})"
        assert r.device_state() == b"dev1"
    finally:
        r.close()


@pytest.mark.parametrize("point", ["after-ack#4", "after-apply-in-memory#3", "wb-after-ram#2",
                                   "wb-after-device-state#2", "wb-after-meta#3"])
async def test_a_group_committing_standby_killed_anywhere_keeps_every_acknowledged_epoch(tmp_path, point):
    """Group commit: epochs applied in memory after their ACK, written back in a thread (here
    after every epoch) while the next are journalled. Killed at any of those steps, the standby
    comes out at the last epoch it acknowledged or the one after, whole."""
    d = tmp_path / "replica"
    proc, port = await start_worker(d, point, writeback_ms=0.001)
    acked = 0
    try:
        p = GoodPrimary(await connect("127.0.0.1", port))
        await p.hello()
        await p.initial_sync()
        for e in range(1, 400):  # until it dies: how many write-backs N epochs bring depends on the disk
            try:
                acked = await p.checkpoint(e)
            except (ChannelError, OSError, asyncio.TimeoutError):  # the worker died
                break
        p.ch.close()
        assert await asyncio.to_thread(proc.wait, 30) == -signal.SIGKILL, f"the worker was meant to die at {point}"
    finally:
        if proc.poll() is None:
            proc.kill()
    assert acked >= 1
    r = Replica(d, RAM)
    try:
        rep = r.open()
        assert rep.valid and rep.committed_epoch in (acked, acked + 1), (point, rep, acked)
        c = rep.committed_epoch
        assert np.all(r.ram[[1, 5, 9]] == c) and r.device_state() == b"dev%d" % c, (point, rep)
    finally:
        r.close()


@contextlib.asynccontextmanager
async def standby_with(tmp_path, ops: FileOps, writeback_ms: float = 0.0):
    """A real Standby over a replica with these file ops, and a primary synced to it."""
    replica = Replica(tmp_path / "replica", RAM, ops=ops, writeback_ms=writeback_ms)
    replica.open()
    sb = Standby(replica, COMPAT, "site-b", refuse_delay_s=0)
    server = await serve("127.0.0.1", 0, sb.handle, max_frame=1 << 20)
    try:
        p = GoodPrimary(await connect("127.0.0.1", server.sockets[0].getsockname()[1]))
        await p.hello()
        await p.initial_sync()
        yield replica, sb, p
        p.ch.close()
    finally:
        server.close()
        replica.close()


class SlowApply(FileOps):
    """The apply's RAM write-back takes long: a takeover that did not wait for it would see N-1."""

    def msync(self, step, m):
        time.sleep(0.3)
        super().msync(step, m)


class ResumedGuest:
    """What `resume` asks of the hot standby QEMU: records the device state it is given."""

    running = True

    def __init__(self):
        self.device_state: bytes | None = None

    async def load_device_state(self, data: bytes) -> None:
        self.device_state = data

    async def cont(self) -> None:
        pass


async def test_a_takeover_right_after_the_last_ack_resumes_that_epoch_applied(tmp_path):
    async with standby_with(tmp_path, SlowApply()) as (replica, sb, p):
        assert [await p.checkpoint(e) for e in (1, 2)] == [1, 2]
        assert replica.durable_epoch == 2 and replica.pending  # acknowledged; its apply still runs
        await sb.stop_accepting()  # the takeover's first step
        assert replica.committed_epoch == 2 and not replica.pending
        hot = ResumedGuest()
        _, timings = await resume(replica, None, hot)
        assert timings["epoch"] == 2 and hot.device_state == b"dev2"
        assert np.array_equal(replica.ram, p.ram)


async def test_a_takeover_with_group_commit_resumes_the_last_ack_and_the_files_say_it(tmp_path):
    """Group commit: the last epochs live in memory and the journal only; a takeover resumes the
    last acknowledged epoch, and the files say it once `resume` is done (its write-back)."""
    async with standby_with(tmp_path, SlowApply(), writeback_ms=60_000) as (replica, sb, p):
        assert [await p.checkpoint(e) for e in (1, 2, 3, 4)] == [1, 2, 3, 4]
        await sb.stop_accepting()
        assert replica.committed_epoch == 4 and replica.written_epoch < 4  # 4 in memory and the journal
        hot = ResumedGuest()
        _, timings = await resume(replica, None, hot)
        assert timings["epoch"] == 4 and hot.device_state == b"dev4"
        assert np.array_equal(replica.ram, p.ram)
        assert replica.written_epoch == 4 and replica.device_state_path.read_bytes() == b"dev4"
        assert not (replica.dir / "journal").stat().st_size and not (replica.dir / "journal.1").stat().st_size


class SlowSteps(FileOps):
    """The journal's fsync of the 2nd checkpoint and the RAM write-back of the 3rd's apply take
    long (a busy disk)."""

    def __init__(self):
        self.fsyncs = self.msyncs = 0

    def fsync(self, step, fd):
        if step == "journal-fsync":
            self.fsyncs += 1
            if self.fsyncs == 2:
                time.sleep(0.15)
        super().fsync(step, fd)

    def msync(self, step, m):
        self.msyncs += 1
        if self.msyncs == 3:
            time.sleep(0.15)
        super().msync(step, m)


async def test_slow_journal_and_apply_steps_are_counted_and_logged_with_what_they_held(tmp_path, monkeypatch):
    """ACK N waits for N's journal fsync, and epoch N+1 is read only once N is applied: a slow
    step holds the guest's output that long. The standby keeps the longest of each, counts those
    over SLOW_STEP_MS and logs a line naming the step, the epoch, the time and the ACK it held."""
    import structlog

    from replication import standby as standby_mod
    monkeypatch.setattr(standby_mod, "SLOW_STEP_MS", 100.0)
    ops = SlowSteps()
    async with standby_with(tmp_path, ops) as (replica, sb, p):
        with structlog.testing.capture_logs() as logs:
            for e in (1, 2, 3, 4):
                sb._slow_logged_at = float("-inf")  # one line a second: here each epoch's may come
                assert await p.checkpoint(e) == e
    assert ops.fsyncs >= 3 and ops.msyncs >= 3
    assert sb.status.slow_steps == 2
    assert sb.status.max_journal_ms >= 150 and sb.status.max_apply_ms >= 150
    slow = [(e["step"], e["epoch"], e["holds"]) for e in logs if e["event"] == "standby.slow_step"]
    assert slow == [("journal", 2, "the ACK of epoch 2"), ("apply", 3, "the ACK of epoch 4")], slow
    assert all(e["ms"] >= 150 and e["replica"] == str(tmp_path / "replica") for e in logs
               if e["event"] == "standby.slow_step")
