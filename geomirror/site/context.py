"""What every job of a site may touch: the `SiteContext`.

A job (primary side, standby side, effects, switchover) gets the context and nothing
else of the daemon: the config, the site's name and directories, the TLS identity, the
gate, the HA machine's generation, `feed(event)` to report what happened, `mark(...)` for
the timeline, `spawn(coro)` for background work the daemon cancels at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Coroutine

import structlog

from geomirror.config import SiteConfig
from geomirror.pairing import TlsIdentity
from replication.gate import Gate

log = structlog.get_logger("geomirror.site")


class Timeline:
    """The recent events of a site (also log lines): what happened, when, since the daemon started."""

    def __init__(self, site: str, keep: int = 300):
        self.site = site
        self.keep = keep
        self.t0 = time.monotonic()
        self.entries: list[dict] = []

    def mark(self, event: str, **fields) -> None:
        self.entries.append({"t": round(time.monotonic() - self.t0, 3), "wall": time.time(), "event": event,
                             **fields})
        del self.entries[:-self.keep]
        log.info(event, site=self.site, **fields)

    def recent(self, n: int = 60) -> list[dict]:
        return self.entries[-n:]


class Tasks:
    """The background tasks of a site: named, pruned when done, cancelled together at shutdown.
    A task that dies of an unexpected exception is logged (never silently lost)."""

    def __init__(self, site: str):
        self.site = site
        self._tasks: set[asyncio.Task] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        t = asyncio.create_task(coro, name=name)
        self._tasks.add(t)
        t.add_done_callback(self._done)
        return t

    def _done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            e = t.exception()
            log.error("site.task_failed", site=self.site, task=t.get_name(), error=repr(e),
                      exc_info=(type(e), e, e.__traceback__))

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class SiteContext:
    cfg: SiteConfig
    tls: TlsIdentity
    gate: Gate
    feed: Callable[[Any], None]  # an event for the HA machine
    generation: Callable[[], int]  # the lease generation held or last held here
    timeline: Timeline
    tasks: Tasks
    unsafe_no_output_commit: bool = False
    # this site's upstream for the peer's heartbeats: ms some BGP session has been up without a
    # break (0: none), None when not known (BGP off)
    upstream: Callable[[], int | None] = lambda: None
    # tests only (GEOMIRROR_UNSAFE_NO_DISK_REPLICATION=1): the disk is served but not replicated
    unsafe_no_disk_replication: bool = False
    name: str = field(init=False)
    state_dir: Path = field(init=False)
    run_dir: Path = field(init=False)
    # checkpoint.handover_forward_frames, switchable at run time (POST /v1/checkpoint)
    handover_forward_frames: bool = field(init=False)
    # the lease generation this site last released (a planned switchover waits for it) and its signal
    released_generation: int | None = field(default=None, init=False)
    lease_released: asyncio.Event = field(default_factory=asyncio.Event, init=False)

    def __post_init__(self) -> None:
        self.name = self.cfg.site.name
        self.handover_forward_frames = self.cfg.checkpoint.handover_forward_frames
        self.state_dir = Path(self.cfg.site.state_dir)
        self.run_dir = Path(self.cfg.site.run_dir)

    def mark(self, event: str, **fields) -> None:
        self.timeline.mark(event, **fields)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task:
        return self.tasks.spawn(coro, name)

    def max_frame(self) -> int:
        """The largest replication frame this guest can need: all of RAM plus room for device state,
        and with a disk the blocks of one epoch (held under the disk cap; twice it for the writes
        the cap lets through while a checkpoint stops the guest)."""
        disk = 2 * (self.cfg.checkpoint.disk_unsent_cap_mb << 20) if self.cfg.guest.disk is not None else 0
        return (self.cfg.guest.memory_mb << 20) + (64 << 20) + disk
