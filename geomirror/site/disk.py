"""The guest's disk at a site (`guest.disk`, docs/disk.md): the site service serves it to QEMU.

At the primary an `NbdServer` on `run_dir/disk.sock` serves the guest's disk and records every
write, so each checkpoint carries the blocks of its epoch. At the standby the same file is the
replica disk (written only by the standby's store), and the standby's own `NbdServer` on
`run_dir/disk-standby.sock` serves it to the hot standby QEMU, inactive until a takeover; after
the takeover that same server records the new primary's writes (it becomes the primary's).

`GEOMIRROR_UNSAFE_NO_DISK_REPLICATION=1` (tests only) serves the disk at both sites but
replicates none of it: the standby then resumes on its own stale copy. It exists to show that
the disk tests fail without disk replication; never set it on a real site.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

from replication.nbd import NbdServer

log = structlog.get_logger(__name__)

UNSAFE_ENV = "GEOMIRROR_UNSAFE_NO_DISK_REPLICATION"


def unsafe_no_disk_replication(env=os.environ) -> bool:
    return env.get(UNSAFE_ENV) == "1"


def serve_disk(cfg, socket_path: Path, role: str) -> NbdServer | None:
    """Serve `guest.disk` on `socket_path` (0600), or None when the guest has no disk. Raises
    `DiskImageError` (a sentence naming the file) if the image cannot be served.

    The server records no writes until a replication session's disk sync starts it (the primary's
    `Primary` turns recording on and off with its sessions), and holds a write's reply while more
    than `checkpoint.disk_unsent_cap_mb` of recorded bytes are unsent."""
    if cfg.guest.disk is None:
        return None
    cap = cfg.checkpoint.disk_unsent_cap_mb << 20
    server = NbdServer(cfg.guest.disk, socket_path, cap_bytes=cap, recording=False)
    server.start()
    log.info("disk.serving", site=cfg.site.name, role=role, image=str(cfg.guest.disk), socket=str(socket_path),
             size=server.size, unsent_cap_bytes=cap)
    return server


def close_disk(server: NbdServer | None) -> None:
    if server is not None:
        server.close()
