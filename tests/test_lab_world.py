"""Small pieces of the lab's world (lab/world.py) that need no namespace."""

from __future__ import annotations

import os

from lab import world


class _ExitsWhileRead:
    """/proc/PID/stat of a process that exits after the open: the read fails with ESRCH."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self):
        raise ProcessLookupError(3, "No such process")


def test_a_process_is_alive_until_it_is_gone():
    assert world._alive(os.getpid())
    assert not world._alive(2**31 - 1)  # above any pid_max: no /proc entry


def test_a_process_that_exits_while_its_stat_is_read_counts_as_gone(monkeypatch):
    # lab down once failed its teardown on this race (ProcessLookupError out of _wait_gone)
    monkeypatch.setattr("builtins.open", lambda *a, **k: _ExitsWhileRead())
    assert not world._alive(12345)
