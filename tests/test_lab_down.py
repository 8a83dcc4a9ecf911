"""`lab down` stops what the lab's namespaces hold, also a process started while it stops them
(a site daemon starts its hot-standby QEMU right after a demotion: seen once, a QEMU outlived
the demo's `lab down` in no namespace at all). Real processes in a real throw-away namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from geomirror import netns
from lab import world

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def test_down_also_stops_what_a_process_starts_while_it_is_stopped(tmp_path, monkeypatch):
    ns = f"gm-downtest-{os.getpid()}"
    monkeypatch.setattr(world, "NAMESPACES", [ns])
    monkeypatch.setattr(world, "LAB_DIR", tmp_path)
    monkeypatch.setattr(world, "BIRD_CTL", tmp_path / "bird.ctl")
    child_file = tmp_path / "child.pid"
    netns.create(ns)
    late = None
    try:
        # on SIGTERM it starts another process in the namespace, then exits: after down's scan
        proc = subprocess.Popen(["ip", "netns", "exec", ns, "bash", "-c",
                                 f"trap 'sleep 300 & echo $! > {child_file}; exit 0' TERM; "
                                 "while :; do sleep 0.05; done"])
        deadline = time.monotonic() + 10
        while proc.pid not in world.pids_in_netns(ns) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.pid in world.pids_in_netns(ns)
        assert world.down() == [ns]
        proc.wait(10)
        late = int(child_file.read_text())
        assert not world._alive(late), f"pid {late}, started while down stopped its parent, outlived down"
    finally:
        if late is not None and world._alive(late):
            os.kill(late, signal.SIGKILL)
        if netns.exists(ns):
            netns.remove(ns)
