"""A Standby serving one replica over plain TCP on loopback, in its own process (run by
tests/test_ack_point.py, which makes it SIGKILL itself at a chosen point via GEOMIRROR_CRASH_AT).
Writes the port it listens on to `port_file`, then serves until killed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from replication.standby import Standby
from replication.store import Replica
from replication.transport import serve
from tests.test_channel_bad_input import COMPAT, RAM


async def main(d: str, port_file: str, writeback_ms: float = 0.0) -> None:
    replica = Replica(Path(d), RAM, writeback_ms=writeback_ms)  # fsync on: what is durable is what a crash keeps
    replica.open()
    sb = Standby(replica, COMPAT, "site-b", refuse_delay_s=0)
    server = await serve("127.0.0.1", 0, sb.handle, max_frame=1 << 20)
    Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0))
