"""A real QEMU guest, left stopped the way an interrupted checkpoint can leave it (an
outgoing migration that completed with nobody to `cont` afterwards: runstate
postmigrate), is found and resumed by the primary's guest watch."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from geomirror.image import build_image, default_cmdline
from replication.capture import Capture
from replication.gate import Gate
from replication.primary import Primary, PrimaryConfig
from replication.qemu import Guest, GuestSpec

pytestmark = pytest.mark.lab


@pytest.fixture
async def guest(tmp_path):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    img = build_image(progress=False)

    net = tmp_path / "net.sock"  # the guest's NIC: QEMU listens there; nobody needs to dial it
    spec = GuestSpec(name="watch", memory_mb=128, kernel=img.kernel, initrd=img.initrd,
                     append=default_cmdline("198.51.100.10", 24, "198.51.100.1"), ram_path=tmp_path / "ram",
                     qmp_path=tmp_path / "qmp.sock", serial_path=tmp_path / "serial.log", net_socket=net,
                     accel="tcg")
    g = Guest(spec)
    await g.start()
    try:
        await g.wait_ready(120)
        yield g
    finally:
        await g.close()


async def test_guest_left_in_postmigrate_is_resumed_by_the_watch(guest):
    cap = Capture(guest.spec.ram_path, guest.spec.memory_mb << 20)
    p = Primary(PrimaryConfig(site="t", compat={}, run_id="r"), guest, cap, Gate(), connect=None)
    await guest.stop_vcpus()
    await guest.save_device_state()  # completes: QEMU leaves the VM in postmigrate
    assert await guest.status() == "postmigrate"
    watch = asyncio.create_task(p._guest_watch(every_s=0.1))
    try:
        for _ in range(50):
            await asyncio.sleep(0.1)
            if await guest.status() == "running":
                break
        assert await guest.status() == "running"
        assert p.status.guest_restarts == 1
        # a handover freezes the guest on purpose: the watch leaves it alone
        await guest.stop_vcpus()
        p._frozen = True
        await asyncio.sleep(0.5)
        assert await guest.status() == "paused" and p.status.guest_restarts == 1
    finally:
        watch.cancel()
        cap.close()
