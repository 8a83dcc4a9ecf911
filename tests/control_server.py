"""A real control API (geomirror.control) around a small fake daemon, for the tests of the API
and of the CLI's answers. Run as `python -m tests.control_server SOCKET TOKEN` it serves on that
UNIX socket until killed (the CLI tests talk to it from another process, so the server's log
lines never mix with the CLI's one line on stderr)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from geomirror import control
from geomirror.errors import Refused

PROMOTE_REFUSAL = "site-a already runs the guest (primary)"
SWITCHOVER_REFUSAL = "switchover needs a protected primary; site-a is unprotected"


class FakeDaemon:
    """The daemon surface the control API wraps: refusals raise Refused, fence has a bug."""

    def __init__(self):
        self.metrics_registry = CollectorRegistry()
        Counter("fake_calls", "calls", registry=self.metrics_registry).inc()
        self.calls: list[tuple] = []

    def status(self) -> dict:
        return {"site": "site-a", "role": "primary", "committed_epoch": 7}

    async def promote(self, force: bool) -> dict:
        self.calls.append(("promote", force))
        raise Refused(PROMOTE_REFUSAL)

    async def fence(self, reason: str) -> None:
        self.calls.append(("fence", reason))
        return {}["no such key"]  # a bug: KeyError

    def set_checkpoint(self, adaptive, interval_ms) -> dict:
        self.calls.append(("checkpoint", adaptive, interval_ms))
        if interval_ms is not None and not 1 <= interval_ms <= 1000:
            raise Refused(f"interval {interval_ms:g} ms is outside 1..1000")
        return {"adaptive": adaptive, "interval_ms": interval_ms}

    async def switchover(self, timeout: float) -> dict:
        self.calls.append(("switchover", timeout))
        raise Refused(SWITCHOVER_REFUSAL)

    def reload_tls(self, reason: str) -> dict | None:
        self.calls.append(("reload_tls", reason))
        return None


async def serve(sock: Path, token: str) -> None:
    await control.start(control.make_app(FakeDaemon(), token), "127.0.0.1", 0, sock)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(serve(Path(sys.argv[1]), sys.argv[2]))
