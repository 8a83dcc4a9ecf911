"""bench/pacer.py's parts that run without the lab: the pacings asked for, the order of the
rounds, the paired comparison of adaptive against the best fixed interval that its summary prints,
and the CPU accounting of a row (on real processes)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.pacer import CpuUse, compare, keep_logs, parse_pacings, round_order, thread_ticks


def test_pacings_are_adaptive_or_a_fixed_interval_in_ms():
    assert parse_pacings("adaptive,25,100ms") == [
        ("adaptive", {"adaptive": True}),
        ("fixed 25ms", {"adaptive": False, "interval_ms": 25.0}),
        ("fixed 100ms", {"adaptive": False, "interval_ms": 100.0}),
    ]
    for bad in ("adaptve", "0", "-5", ","):
        with pytest.raises(SystemExit, match="--pacings"):
            parse_pacings(bad)


def test_each_round_runs_the_pacings_in_the_reverse_order_of_the_one_before():
    assert [order for _, order in round_order(["a", "b", "c"], 3)] == [
        ["a", "b", "c"], ["c", "b", "a"], ["a", "b", "c"]]


def _row(rtt, name, n, ops, rnd):
    return (rtt, name, n, {"ops_s": ops}, rnd)


def test_the_ratio_is_taken_round_by_round_against_the_best_fixed_interval():
    # the machine slows down by half in round 1: unpaired, adaptive's 50 against fixed's 100 would
    # read 0.5; round by round it is level, then ahead
    rows = [
        _row(10, "adaptive", 16, 100, 0), _row(10, "fixed 25ms", 16, 100, 0), _row(10, "fixed 100ms", 16, 60, 0),
        _row(10, "fixed 100ms", 16, 30, 1), _row(10, "fixed 25ms", 16, 50, 1), _row(10, "adaptive", 16, 55, 1),
        _row(10, "adaptive", 64, 1, 0),  # another cell: not counted
        _row(1, "fixed 25ms", 16, 1000, 0),  # another RTT: not counted
    ]
    c = compare(rows, 10, 16)
    assert c["best"] == "fixed 25ms"
    assert c["ratios"] == pytest.approx([1.0, 1.1])
    assert c["median"] == pytest.approx(1.05)
    assert c["spread"]["adaptive"] == pytest.approx(100 / 55 - 1)
    assert c["spread"]["fixed 25ms"] == pytest.approx(1.0)


def test_two_adaptive_rows_in_a_round_count_as_their_mean_and_a_single_row_has_no_spread():
    rows = [_row(50, "adaptive", 1, 10, 0), _row(50, "fixed 25ms", 1, 10, 0), _row(50, "adaptive #2", 1, 14, 0)]
    c = compare(rows, 50, 1)
    assert c["ratios"] == pytest.approx([1.2])
    assert c["spread"]["fixed 25ms"] is None
    assert c["spread"]["adaptive"] == pytest.approx(0.4)


def test_a_cell_without_adaptive_or_without_a_fixed_interval_has_no_comparison():
    assert compare([_row(1, "adaptive", 1, 5, 0)], 1, 1) is None
    assert compare([_row(1, "fixed 25ms", 1, 5, 0)], 1, 1) is None


def test_a_rows_cpu_is_each_processs_and_its_busiest_threads_share():
    """Two real processes over the same window: one spins in two threads (sharing Python's GIL,
    so each gets about half of what the process gets), one sleeps. The spinner's cores are well
    above the sleeper's, and `vcpu` (reported for `qemu` only) is its busiest thread, not its sum;
    a process that is gone counts nothing."""
    spin = subprocess.Popen([sys.executable, "-c",
                             "import threading, time\n"
                             "def f():\n    while True: pass\n"
                             "for _ in range(2): threading.Thread(target=f, daemon=True).start()\ntime.sleep(60)"])
    sleep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.3)  # both started
        use = CpuUse({"qemu": spin.pid, "site-b": sleep.pid})
        time.sleep(1.0)
        got = use.stop()
    finally:
        for p in (spin, sleep):
            p.kill()
            p.wait()
    assert got["qemu"] > 10 * got["site-b"] and got["qemu"] > 0, got
    assert 0.2 * got["qemu"] < got["vcpu"] < 0.8 * got["qemu"], got
    assert set(got) == {"qemu", "vcpu", "site-b"}
    assert thread_ticks(spin.pid) == {}  # gone


def test_a_row_without_replies_keeps_the_labs_logs(tmp_path, monkeypatch):
    """A stall of output must be readable afterwards: the next `lab up` removes the lab's directory."""
    from bench import pacer
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "site-a.log").write_text('{"event": "primary.colo_failed"}\n')
    (lab / "site-b.log").write_text("{}\n")
    (lab / "disk.raw").write_bytes(b"not a log")
    monkeypatch.setattr(pacer.world, "LAB_DIR", lab)
    dest = keep_logs("the warm-up of fixed 20ms, 1 conn, 1 ms RTT", root=tmp_path / "kept")
    assert sorted(p.name for p in dest.iterdir()) == ["site-a.log", "site-b.log", "why.txt"]
    assert "colo_failed" in (dest / "site-a.log").read_text()
    assert "fixed 20ms" in (dest / "why.txt").read_text()
    assert dest.stat().st_mode & 0o777 == 0o700 and (dest / "site-a.log").stat().st_mode & 0o777 == 0o600
