"""A real QEMU that floods its stderr (every guest MMIO/PIO access traced: megabytes
while the guest boots) runs on: the service reads the pipe all the time into the log,
rate-limited. Unread, the pipe fills at 64 KiB and QEMU blocks in write(2) holding its
global lock: the vCPU and QMP stop (seen with the reader disabled: `start` fails on its
first QMP command)."""

from __future__ import annotations

import shutil

import pytest
import structlog

from geomirror.image import build_image, default_cmdline
from replication.qemu import STDERR_LINES_PER_S, Guest, GuestSpec

FLOOD = ("-trace", "memory_region_ops_*")  # QEMU's own trace output goes to stderr


@pytest.fixture
def net(tmp_path):
    return tmp_path / "net.sock"  # the guest's NIC: QEMU listens there; nobody needs to dial it


@pytest.mark.parametrize("to_file", [True, False], ids=["stderr-file", "stderr-pipe"])
async def test_a_guest_flooding_stderr_boots_and_runs_and_the_flood_is_logged(tmp_path, net, to_file):
    """The service gives QEMU a file (a restarted service tails it on); a pipe is read all the
    time too. Either way QEMU never blocks on its stderr."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    img = build_image(progress=False)
    spec = GuestSpec(name="flood", memory_mb=128, kernel=img.kernel, initrd=img.initrd,
                     append=default_cmdline("198.51.100.10", 24, "198.51.100.1"), ram_path=tmp_path / "ram",
                     qmp_path=tmp_path / "qmp.sock", serial_path=tmp_path / "serial.log", net_socket=net,
                     accel="tcg", stderr_path=tmp_path / "qemu.log" if to_file else None)
    g = Guest(spec, extra_argv=FLOOD)
    with structlog.testing.capture_logs() as logs:
        try:
            await g.start()
            pid = g.pid
            await g.wait_ready(30)  # the guest booted through the flood
            assert await g.status() == "running"
            assert g.stderr_bytes > 1 << 20, f"only {g.stderr_bytes} bytes of trace: no flood to prove anything"
        finally:
            await g.close()
    shown = [e for e in logs if e["event"] == "qemu.stderr"]
    suppressed = sum(e["lines"] for e in logs if e["event"] == "qemu.stderr_suppressed")
    assert shown and {(e["guest"], e["pid"]) for e in shown} == {("flood", pid)}
    assert any("memory_region_ops_" in e["line"] for e in shown)
    # every line read is either logged or counted, and most of the flood is counted
    assert len(shown) + suppressed == g.stderr_lines
    assert suppressed > 10 * len(shown) and len(shown) >= STDERR_LINES_PER_S
