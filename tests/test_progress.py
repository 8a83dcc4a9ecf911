"""The progress display for long work: the bar on a terminal, log events always."""

import io

import structlog

from replication.progress import Progress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal_shows_share_bytes_rate_and_eta():
    out, clock = Tty(), Clock()
    p = Progress("initial sync to site-b", 1000, event="t.progress", stream=out, clock=clock)
    assert p.bar
    clock.t = 2.0
    p.update(250, 50_000_000)
    line = out.getvalue().split("\r\x1b[K")[-1]
    assert "initial sync to site-b [######..................]  25.0%" in line
    assert "50.0 MB 25.0 MB/s" in line and "eta 00:06" in line
    p.finish()
    assert out.getvalue().endswith("100.0% 50.0 MB 25.0 MB/s eta 00:00\n")


def test_not_a_terminal_draws_nothing_but_logs_each_tenth():
    out, clock = io.StringIO(), Clock()
    with structlog.testing.capture_logs() as logs:
        p = Progress("resync", 100, event="t.progress", stream=out, clock=clock, peer="site-b")
        for i in range(1, 101):
            clock.t = i / 10
            p.update(i, i * 1000)
        p.finish(blocks=7)
    assert out.getvalue() == ""
    percents = [e["percent"] for e in logs if e["event"] == "t.progress"]
    assert percents == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert logs[-1]["blocks"] == 7 and logs[-1]["peer"] == "site-b" and logs[-1]["bytes"] == 100_000


def test_redraw_is_rate_limited_and_interruption_ends_the_line():
    out, clock = Tty(), Clock()
    p = Progress("sync", 10_000, event="t.progress", stream=out, clock=clock)
    for i in range(5000):  # all at the same instant: one draw
        p.update(i)
    assert out.getvalue().count("\r") == 1
    p.abandon()
    assert out.getvalue().endswith("(interrupted)\n")
    p.finish()  # after abandon: nothing more
    assert out.getvalue().endswith("(interrupted)\n")
