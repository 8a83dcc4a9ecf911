"""Progress for long work (initial sync, resync, image build).

On a terminal: one line redrawn in place with the share done, bytes, rate and time
left. Always: a log event every tenth of the way (the log is what a service manager
keeps). The bar is drawn at most ten times a second so a fast transfer is not slowed
by its own display.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

import structlog

log = structlog.get_logger("replication.progress")

WIDTH = 24


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 1e9 else f"{n / 1e9:,.2f} GB"


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds < 0 or seconds > 359999:  # NaN or absurd
        return "--:--"
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """`update(done)` as work advances (`done` of `total` units), `finish()` at the end.

    `bytes_fn` (optional) gives bytes moved so far, for the rate shown; without it the
    units themselves are shown. `stream` defaults to stderr; `bar` defaults to whether
    that stream is a terminal.
    """

    def __init__(self, label: str, total: float, *, event: str, stream: TextIO | None = None,
                 bar: bool | None = None, clock=time.monotonic, **fields):
        self.label = label
        self.total = max(float(total), 1.0)
        self.event = event
        self.fields = fields
        self.stream = stream if stream is not None else sys.stderr
        self.bar = self.stream.isatty() if bar is None else bar
        self.clock = clock
        self.t0 = clock()
        self._drawn_at = -1.0
        self._next_tenth = 1
        self.done = 0.0
        self.nbytes = 0
        self._finished = False

    def fraction(self) -> float:
        return min(1.0, self.done / self.total)

    def line(self) -> str:
        """The bar as text (also what tests look at)."""
        frac = self.fraction()
        full = int(WIDTH * frac)
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = self.nbytes / elapsed
        left = (elapsed / frac - elapsed) if frac > 0 else float("nan")
        moved = f" {_mb(self.nbytes)} {rate / 1e6:,.1f} MB/s" if self.nbytes else ""
        return (f"{self.label} [{'#' * full}{'.' * (WIDTH - full)}] {frac * 100:5.1f}%"
                f"{moved} eta {_eta(left)}")

    def update(self, done: float, nbytes: int | None = None) -> None:
        self.done = float(done)
        if nbytes is not None:
            self.nbytes = int(nbytes)
        frac = self.fraction()
        permille = int(frac * 1000 + 1e-6)
        if permille >= self._next_tenth * 100 and frac < 1.0:
            log.info(self.event, percent=permille // 10, bytes=self.nbytes,
                     seconds=round(self.clock() - self.t0, 2), **self.fields)
            self._next_tenth = permille // 100 + 1
        if self.bar:
            now = self.clock()
            if now - self._drawn_at >= 0.1:
                self._drawn_at = now
                self._draw()

    def _draw(self, end: str = "") -> None:
        try:
            self.stream.write("\r\x1b[K" + self.line() + end)
            self.stream.flush()
        except (OSError, ValueError):  # a closed terminal must not stop the work
            self.bar = False

    def finish(self, **fields) -> None:
        if self._finished:
            return
        self._finished = True
        self.done = self.total
        if self.bar:
            self._draw("\n")
        log.info(self.event, percent=100, bytes=self.nbytes, seconds=round(self.clock() - self.t0, 2),
                 **self.fields, **fields)

    def abandon(self) -> None:
        """The work stopped before the end: end the terminal line, keep the log honest."""
        if self._finished:
            return
        self._finished = True
        if self.bar and self._drawn_at >= 0:  # only a line that was started needs ending
            self._draw(" (interrupted)\n")
