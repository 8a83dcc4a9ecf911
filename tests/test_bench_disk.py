"""bench/disk.py's pure parts (the plan, the console lines, epochs by phase, the statistics) and
the in-guest writer gm-diskbench (guest/diskbench.c) run on this host: what it prints is what the
benchmark parses."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from bench.disk import (
    DEFAULT_PLAN,
    ConsoleError,
    ConsoleWatch,
    Epoch,
    Phase,
    PhaseRun,
    ProductPacing,
    carried_by,
    cycle_figures,
    diskbench_arg,
    epochs_between,
    median_ratio,
    parse_cases,
    parse_console,
    parse_plan,
    pct,
    phase_epochs,
    release_floor,
    top_reason,
)
from geomirror.config import CheckpointSection
from geomirror.disk_image import DISKBENCH_SOURCE
from geomirror.image import compile_static
from replication.primary import EpochRecord


def test_the_default_plan_parses_and_alternates_work_with_idle():
    plan = parse_plan(DEFAULT_PLAN, 64)
    assert [p.kind for p in plan] == ["idle", "randwrite", "idle", "randwrite", "idle", "write", "idle"]
    assert plan[1] == Phase("randwrite", 5.0, 4096, 1) and plan[3].depth == 8 and plan[5].bs == 65536
    assert plan[1].label == "4 KiB random d1" and plan[1].unit == "IOPS" and plan[5].unit == "MB/s"


@pytest.mark.parametrize("plan,match", [
    ("randwrite:3k:5", "multiple of 4096"),
    ("write:12k:5", "dividing 1 MiB"),
    ("randwrite:4k:5:65", "depth 65"),
    ("idle", "is not idle:S"),
    ("read:4k:5", "is not idle:S"),
    ("idle:0", "more than 0"),
    ("randwrite:4x:5", "not a size"),
])  # fmt: skip
def test_a_bad_plan_is_refused_with_the_item(plan, match):
    with pytest.raises(ValueError, match=match):
        parse_plan(plan, 1)


def test_diskbench_arg_is_one_kernel_command_line_word():
    assert diskbench_arg(64, "idle:1,randwrite:4k:2") == "gm.diskbench=64/idle:1,randwrite:4k:2"
    with pytest.raises(ValueError, match="kernel command-line"):
        diskbench_arg(64, "idle:1 init=/bin/sh")


def lines(*pairs):
    return [(t, s) for t, s in pairs]


def test_parse_console_times_phases_by_the_host_and_ignores_other_lines():
    prefill, runs, ended = parse_console(lines(
        (1.0, "[    3.1] random kernel line"),
        (2.0, "GM-DISKBENCH prefill mb=64 seconds=0.500"),
        (2.1, "GM-DISKBENCH start 0 idle bs=0 depth=0 seconds=1"),
        (3.1, "GM-DISKBENCH done 0 idle ios=0 bytes=0 seconds=1.000"),
        (3.2, "noise GM-DISKBENCH start 1 randwrite bs=4096 depth=1 seconds=2"),
        (7.2, "GM-DISKBENCH done 1 randwrite ios=4000 bytes=16384000 seconds=2.001"),
        (7.3, "GM-DISKBENCH end"),
    ))  # fmt: skip
    assert prefill == 2.0 and ended and [r.kind for r in runs] == ["idle", "randwrite"]
    r = runs[1]
    assert (r.start, r.end, r.ios, r.nbytes, r.guest_s) == (3.2, 7.2, 4000, 16384000, 2.001)
    assert r.seconds == pytest.approx(4.0)  # the host's time, not the guest's 2 s
    assert r.rate("IOPS") == pytest.approx(1000) and r.rate("MB/s") == pytest.approx(4.096)


def test_parse_console_raises_the_guests_error_and_an_orphan_done():
    with pytest.raises(ConsoleError, match="gm-diskbench: cannot open /x: No space"):
        parse_console(lines((1.0, "GM-DISKBENCH error cannot open /x: No space left on device")))
    with pytest.raises(ConsoleError, match="without its start"):
        parse_console(lines((1.0, "GM-DISKBENCH done 3 write ios=1 bytes=65536 seconds=1.0")))
    _, runs, ended = parse_console(lines((1.0, "GM-DISKBENCH start 0 write bs=65536 depth=1 seconds=1")))
    assert not ended and runs[0].end is None


def ep(n, at, pause=10.0, blocks=0, wire=0):
    return Epoch(n, at, pause, 5, blocks, blocks * 4096, wire, 1000 + wire)


def test_epochs_are_assigned_to_phases_by_when_their_pause_began():
    runs = [PhaseRun(0, "idle", 0.0, 4.0), PhaseRun(1, "randwrite", 4.0, 12.0), PhaseRun(2, "idle", 12.0, 15.0)]
    eps = [ep(i, i * 0.5, blocks=(10 if 4.0 <= i * 0.5 < 12.2 else 0)) for i in range(30)]
    got = phase_epochs(eps, runs, margin_s=0.5)
    assert [e.paused_at for e in got[0][1]] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # [0.5, 3.5)
    assert got[1][1][0].paused_at == 4.5 and got[1][1][-1].paused_at == 11.0
    assert all(e.disk_blocks == 10 for e in got[1][1])
    carried = carried_by(eps, runs, 1)  # up to the next phase's start: the tail's epoch too
    assert carried[0].paused_at == 4.0 and carried[-1].paused_at == 11.5
    assert carried_by(eps, runs, 2)[-1].paused_at == 14.5  # the last phase: to the end
    assert epochs_between(eps, 100, 200) == []


def test_percentile_and_median_ratio():
    assert pct([5, 1, 3, 2, 4], 50) == 3 and pct([5, 1, 3, 2, 4], 99) == 5 and pct(list(range(101)), 99) == 99
    assert pct([], 50) != pct([], 50)  # NaN
    assert median_ratio([(50, 100), (30, 100), (90, 100)]) == 0.5
    assert median_ratio([(1, 0), (2, 4)]) == 0.5  # a zero baseline is left out


def test_interval_and_pause_over_a_window_and_the_release_floor():
    # 10 s, 100 epochs: a 100 ms cycle of which 30 ms paused
    interval, pause = cycle_figures({"epoch": 50, "pause_total_ms": 1000.0},
                                    {"epoch": 150, "pause_total_ms": 4000.0}, 10.0)
    assert (interval, pause) == pytest.approx((70.0, 30.0))
    assert cycle_figures({"epoch": 5, "pause_total_ms": 0.0}, {"epoch": 5, "pause_total_ms": 0.0}, 1.0)[0] == 1000.0
    assert release_floor(25.0, 30.0, 70.0) == 90.0


def test_console_watch_stamps_complete_lines_only(tmp_path):
    p = tmp_path / "serial.log"
    w = ConsoleWatch(p)
    w.poll()  # no file yet
    p.write_bytes(b"GM-DISKBENCH prefill mb=1 seconds=0.1\nGM-DISKBENCH st")
    w.poll()
    assert [s for _, s in w.lines] == ["GM-DISKBENCH prefill mb=1 seconds=0.1"]
    with open(p, "ab") as f:
        f.write(b"art 0 idle bs=0 depth=0 seconds=1\r\n")
    w.poll()
    assert w.lines[-1][1].startswith("GM-DISKBENCH start 0 idle") and len(w.lines) == 2
    assert parse_console(w.lines)[1][0].kind == "idle"


# ---------------------------------------------------------------- the writer itself, on this host


@pytest.fixture(scope="module")
def diskbench(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("diskbench")
    exe = work / "gm-diskbench"
    exe.write_bytes(compile_static(DISKBENCH_SOURCE.read_text(), "gm-diskbench", work))
    exe.chmod(0o755)
    return exe


def o_direct_works(d: Path) -> bool:
    try:
        fd = os.open(d / "probe", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    os.close(fd)
    return True


def test_the_writer_writes_what_it_reports_and_the_benchmark_parses_it(diskbench, tmp_path):
    if not o_direct_works(tmp_path):
        pytest.skip(f"{tmp_path} does not take O_DIRECT (tmpfs)")
    data = tmp_path / "data"
    plan = "idle:0.1,randwrite:4k:0.2,write:64k:0.2:2,randwrite:4k:0.2:3"
    out = subprocess.run([str(diskbench), str(data), "4", plan], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    prefill, runs, ended = parse_console([(float(i), s) for i, s in enumerate(out.stdout.splitlines())])
    assert prefill is not None and ended
    phases = parse_plan(plan, 4)
    assert [r.kind for r in runs] == [p.kind for p in phases]
    assert runs[0].ios == 0 and all(r.ios > 0 for r in runs[1:])
    for r, p in zip(runs, phases):
        assert r.nbytes == r.ios * p.bs and r.guest_s >= p.seconds
    body = data.read_bytes()
    assert len(body) == 4 << 20
    # fresh pseudo-random bytes: no two written 4 KiB blocks alike, and no zero block left where
    # the sequential writer went round (64 blocks of 64 KiB: it passes the whole file many times)
    blocks = {body[i:i + 4096] for i in range(0, len(body), 4096)}
    assert bytes(4096) not in blocks and len(blocks) == len(body) // 4096


def test_the_writer_refuses_a_bad_plan_as_the_benchmark_does(diskbench, tmp_path):
    for plan in ("randwrite:3k:1", "randwrite:4k:1:65", "read:4k:1"):
        out = subprocess.run([str(diskbench), str(tmp_path / "data"), "4", plan], capture_output=True, text=True)
        assert out.returncode == 2 and out.stdout.startswith("GM-DISKBENCH error ")
        with pytest.raises(ConsoleError):
            parse_console([(0.0, out.stdout.strip())])
        with pytest.raises(ValueError):
            parse_plan(plan, 4)


class _Link:
    rtt_ms, rtt_var_ms, bandwidth_bps = 0.3, 0.05, 500e6


class _Status:
    in_flight = 1


class _Primary:
    link, status = _Link(), _Status()


def test_the_replicated_case_paces_as_the_product_does_with_idle_lengthening():
    """A disk-bound guest on loopback that sends nothing, `idle_interval_ms = 200`: the pacer
    lengthens the interval to it in bounded steps; each epoch's reason is kept for the report."""
    pacing = ProductPacing(CheckpointSection(idle_interval_ms=200))
    assert pacing.policy.max_pause_share == CheckpointSection().max_pause_share
    assert pacing.policy.idle_interval_ms == 200
    interval = pacing(_Primary(), None)
    assert interval == CheckpointSection().interval_ms
    for n in range(1, 30):
        rec = EpochRecord(n, 22.0, 100, 100 * 4096, 2 << 20, 600_000, 0.0, interval)
        interval = pacing(_Primary(), rec)
    assert interval == pytest.approx(200.0)
    assert pacing.reasons[29] == "idle"
    eps = [Epoch(n, 0.0, 22.0, 0, 0, 0, 0, 0, reason=pacing.reasons[n]) for n in range(20, 30)]
    assert top_reason(eps) == "idle 100%"
    assert top_reason([]) == "-"


def test_without_idle_lengthening_the_pause_share_limit_decides():
    """`idle_interval_ms = 0`: the pause-share limit (25 %) decides, so a 22 ms pause gets a 66 ms
    interval, reached from the default 100 ms in bounded steps (the behaviour before idle pacing)."""
    pacing = ProductPacing(CheckpointSection(idle_interval_ms=0))
    interval = pacing(_Primary(), None)
    for n in range(1, 30):
        rec = EpochRecord(n, 22.0, 100, 100 * 4096, 2 << 20, 600_000, 0.0, interval)
        interval = pacing(_Primary(), rec)
    assert interval == pytest.approx(66.0, rel=0.01)
    assert pacing.reasons[29] == "pause-share"


def test_cases_are_checked_and_local_is_required():
    assert parse_cases("local,nbd,replicated,qemu-nbd") == ("local", "nbd", "replicated", "qemu-nbd")
    for bad in ("nbd,replicated", "local,nfs", "local,local"):
        with pytest.raises(ValueError, match="local among them"):
            parse_cases(bad)
