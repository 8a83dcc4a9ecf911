"""Shared fixtures. Lab fixtures build the real lab and always tear it down."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from replication.qemu import Guest
from tests.colo_qemu import available, colo_spec


def _lab_prereqs() -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root"
    for tool in ("qemu-system-x86_64", "bird", "birdc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (run scripts/setup.sh)"
    return None


def root_netns_snapshot() -> dict:
    """Links, addresses and routes of the root namespace (to prove the lab never touches it)."""
    from pyroute2 import IPRoute

    with IPRoute() as ip:
        links = sorted(l.get_attr("IFLA_IFNAME") for l in ip.get_links())
        addrs = sorted(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in ip.get_addr())
        routes = sorted(str(r.get_attr("RTA_DST")) + "/" + str(r["dst_len"]) for r in ip.get_routes(table=254))
    return {"links": links, "addrs": addrs, "routes": routes}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


FAILED_LABS = Path("/tmp/gm-lab-failed")  # one directory per failed lab test, the lab's small files
_KEEP_MAX_BYTES = 16 << 20  # the logs, configs, role and drill files; not RAM or disk images


def _keep_lab_files(nodeid: str) -> Path | None:
    """On a failed lab test: a copy of the lab directory's small files (every log whole; no
    keys), so a failure that 40 lines of tail do not explain can still be read after the lab is
    gone (the next `lab up` removes the lab directory)."""
    from lab import world

    if not world.LAB_DIR.is_dir():
        return None
    FAILED_LABS.mkdir(mode=0o700, exist_ok=True)
    dest = FAILED_LABS / (time.strftime("%Y%m%dT%H%M%S-") + re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid)[-120:])
    for src in world.LAB_DIR.rglob("*"):
        try:
            if (not src.is_file() or src.is_symlink() or src.stat().st_size > _KEEP_MAX_BYTES
                    or "pki" in src.relative_to(world.LAB_DIR).parts):  # no private keys in /tmp
                continue
            out = dest / src.relative_to(world.LAB_DIR)
            out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            shutil.copy2(src, out)
        except OSError:  # a file a daemon removes while we copy: the rest is still worth having
            continue
    _keep_site_status(dest)
    return dest


def _keep_site_status(dest: Path) -> None:
    """Each running site's /v1/status beside the logs (the pacer, the epochs' step latencies,
    the standby's slow steps): what the logs do not say about the moment of the failure."""
    from lab import cli as labcli

    for site in ("site-a", "site-b"):
        st = labcli.site_status(site, timeout=3.0)
        if st is not None:
            dest.mkdir(parents=True, exist_ok=True, mode=0o700)
            (dest / f"status-{site}.json").write_text(json.dumps(st, indent=1, default=str))


def _print_lab_logs(lines: int = 40) -> None:
    """On a failed lab test: the end of every lab log, so a CI failure can be read."""
    from lab import world

    for name in ("site-a.log", "site-b.log", "witness.log", "wan.log", "bird.log",
                 "etcd-witness.log", "etcd-site-a.log", "etcd-site-b.log"):
        p = world.LAB_DIR / name
        if p.exists():
            tail = p.read_text(errors="replace").splitlines()[-lines:]
            print(f"\n----- {p} (last {len(tail)} lines) -----")
            print("\n".join(tail))


@pytest.fixture
def lab_env(request):
    """A clean slate for a lab test, and a guaranteed `lab down` afterwards (also on failure)."""
    why = _lab_prereqs()
    if why:
        pytest.skip(why)
    from lab import world

    world.down()
    before = root_netns_snapshot()
    yield world
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        _print_lab_logs()
        kept = _keep_lab_files(request.node.nodeid)
        if kept is not None:
            print(f"\n----- the lab's logs and state files, whole: {kept} -----")
    world.down()
    after = root_netns_snapshot()
    assert before == after, f"the root namespace changed: {before} -> {after}"


@pytest.fixture
def lab_up(lab_env):
    """The full lab: BIRD, witness, both site daemons; the guest protected and reachable."""
    from lab import cli as labcli

    lab_env.up()
    labcli.wait_protected()
    labcli.wait_reachable()
    return lab_env


@pytest.fixture
async def colo_guest(tmp_path):
    """The lab's guest (128 MB, writing memory) on the COLO-capable QEMU."""
    why = available()
    if why:
        pytest.fail(why)  # the setup installs it: its absence is a failure, not a skip
    d = tmp_path / "primary"
    d.mkdir()
    g = Guest(colo_spec(d, "colo"))
    await g.start()
    try:
        await g.wait_ready(120)
        yield g
    finally:
        await g.close()
