"""`geomirror rejoin`: offline, make a site that lost the guest start next time as its peer's
standby, its replica seeded from its last RAM image (run_dir/guest.ram) so the resync sends
only the blocks that changed since the takeover."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import structlog

from geomirror.errors import GeomirrorError
from geomirror.ha import Role
from geomirror.site.guest_spec import GuestSpecs
from geomirror.site.role import RoleStore
from geomirror.site.standby_side import seed_replica
from replication.progress import Progress

log = structlog.get_logger(__name__)


class RejoinError(GeomirrorError):
    """The site cannot be turned into a standby now."""


def _daemon_answers(ctl: Path) -> bool:
    if not ctl.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(ctl))
        return True
    except OSError:
        return False  # a stale socket of a dead daemon
    finally:
        s.close()


def rejoin(cfg, *, seed: bool = True, progress: bool | None = None) -> str:
    """Returns what was done, as a sentence."""
    state_dir, run_dir = Path(cfg.site.state_dir), Path(cfg.site.run_dir)
    ctl = run_dir / "control.sock"
    if _daemon_answers(ctl):
        raise RejoinError(f"the daemon of {cfg.site.name} is running ({ctl} answers): stop it first")
    roles = RoleStore(state_dir, cfg.site.initial_role)
    saved = roles.load()
    if saved.role is Role.STANDBY:
        return f"{cfg.site.name} is already a standby; nothing to do"
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    size = cfg.guest.memory_mb << 20
    # the RAM file the guest last ran on here: run_dir/guest.ram, or the replica's own ram.img
    # when this site had taken the guest over (a resumed standby runs on its replica's file)
    source = Path(saved.guest.ram) if saved.guest is not None else run_dir / "guest.ram"
    how = "it will take a full initial sync"
    if seed and source.exists():
        specs = GuestSpecs(cfg, run_dir)
        bar = Progress(f"seeding the replica from {source}", size, event="rejoin.seed_progress", bar=progress)
        try:
            seeded = seed_replica(cfg, specs, saved.run_id, source, progress=lambda n: bar.update(n, n))
        except BaseException:
            bar.abandon()
            raise
        if seeded:
            bar.finish()
            how = (f"its replica is seeded from its last RAM image ({size >> 20} MB), so the resync sends only "
                   "the blocks that changed since")
        else:
            bar.abandon()
            how += f" ({source} is not a RAM image of this guest run)"
    roles.save(saved.__class__(Role.STANDBY, saved.lease_generation, saved.run_id,
                               reason=f"rejoined (was {saved.role.value})", extra={"rejoined_from": saved.role.value}))
    log.info("rejoin", site=cfg.site.name, was=saved.role.value, seeded="seeded" in how)
    return (f"{cfg.site.name} (was {saved.role.value}) will start as the standby of {cfg.peer.name}; {how}. "
            "Start its daemon.")
