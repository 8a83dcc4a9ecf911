"""structlog set up once: one event per line with fields; JSON when not on a terminal."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


class _Stderr:
    """Whatever sys.stderr is at the time of writing (a test harness, a daemon that
    redirects it): a logger never holds on to a stream that has since been closed."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def setup(level: str | None = None, json: bool | None = None, stream=None) -> None:
    """Configure structlog and the stdlib root logger. Safe to call more than once."""
    global _configured
    stream = stream or _Stderr()
    if json is None:
        env = os.environ.get("GEOMIRROR_LOG_FORMAT")
        json = (env == "json") if env else not stream.isatty()
    lvl = getattr(logging, (level or os.environ.get("GEOMIRROR_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer = (
        structlog.processors.JSONRenderer(sort_keys=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (qemu.qmp, aiohttp) go through the same stream.
    root = logging.getLogger()
    root.handlers[:] = [logging.StreamHandler(stream)]
    root.setLevel(max(lvl, logging.WARNING))
    _configured = True


def get(name: str | None = None, **fields):
    if not _configured:
        setup()
    log = structlog.get_logger(name) if name else structlog.get_logger()
    return log.bind(**fields) if fields else log
