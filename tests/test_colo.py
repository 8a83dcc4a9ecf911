"""QEMU's own dirty log through its COLO checkpoint stream (replication/colo.py), against a real
COLO-capable QEMU (scripts/qemu10.sh --colo-fix) running the lab's guest with a memory-writing
workload: every page the guest wrote is among the pages QEMU sends (a full compare of live RAM
with the shadow after each checkpoint finds nothing left), a page left out is found by that
compare, the device state resumes in a fresh QEMU, and a checkpoint the service died in is ended
by the next service (the guest runs again) which can start COLO anew."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import pytest

from replication.capture import Capture, scan_pages
from replication.colo import ColoSource
from replication.qemu import Guest
from tests.colo_qemu import colo_spec

pytestmark = pytest.mark.lab  # a real QEMU; not a namespace lab, but as slow


async def _first(src: ColoSource, cap: Capture):
    """The first checkpoint after the initial stream: the shadow becomes RAM as it is now."""
    await asyncio.sleep(0.03)
    await src.checkpoint(lambda cp: cap.take(np.arange(cap.n_pages, dtype=np.uint64)))
    src.finish()


async def test_every_written_page_is_in_the_checkpoint(colo_guest):
    g = colo_guest
    cap = Capture(g.spec.ram_path, g.spec.memory_mb << 20)
    src = ColoSource(g, cap.size)
    info = await src.start()
    assert info["pages"] + info["zero_pages"] >= cap.n_pages // 2, info  # the initial stream has the RAM
    try:
        await _first(src, cap)
        sent, left = [], []

        def work(cp):
            cap.take(cp.pages)
            return scan_pages(cap.ram, cap.shadow)

        for _ in range(25):
            await asyncio.sleep(0.03)
            cp, missing = await src.checkpoint(work)
            assert await g.status() == "colo"  # stopped by QEMU for the checkpoint
            src.finish()
            sent.append(len(cp.pages))
            left.append(int(missing.size))
            assert cp.device_blob.endswith(b"\x00")  # the device sections end with EOF
        assert left == [0] * 25, left
        assert sum(sent) > 25 * 10, sent  # the workload writes ~2000 pages/s: QEMU sent them
    finally:
        await src.end()
    assert await g.status() == "running"


async def test_a_page_left_out_is_found_by_the_full_compare(colo_guest):
    """The primitive of the capture's verifier: drop one written page from QEMU's set, and the
    compare of all RAM with the shadow names exactly that page."""
    g = colo_guest
    cap = Capture(g.spec.ram_path, g.spec.memory_mb << 20)
    src = ColoSource(g, cap.size)
    await src.start()
    try:
        await _first(src, cap)
        found = None
        for _ in range(40):
            await asyncio.sleep(0.03)

            def work(cp):
                ps = cap.page_size
                changed = [p for p in cp.pages.tolist()
                           if not np.array_equal(cap.ram[p * ps:(p + 1) * ps], cap.shadow[p * ps:(p + 1) * ps])]
                if not changed:
                    cap.take(cp.pages)
                    return None
                drop = changed[len(changed) // 2]
                cap.take(cp.pages[cp.pages != drop])
                return drop, scan_pages(cap.ram, cap.shadow).tolist()

            _, res = await src.checkpoint(work)
            src.finish()
            if res is not None:
                found = res
                break
        assert found is not None, "no checkpoint carried a changed page"
        dropped, missing = found
        assert missing == [dropped]
    finally:
        await src.end()


async def test_the_device_state_resumes_in_a_fresh_qemu(colo_guest, tmp_path):
    """RAM as of a checkpoint (copied while QEMU holds the guest stopped) and that checkpoint's
    device state, with the header of an ordinary save in front, load into a QEMU waiting with
    `-incoming defer` and x-ignore-shared on (the standby's hot QEMU): the guest runs there."""
    g = colo_guest
    cap = Capture(g.spec.ram_path, g.spec.memory_mb << 20)
    src = ColoSource(g, cap.size)
    await src.start()
    d = tmp_path / "standby"
    d.mkdir()
    try:
        for _ in range(5):
            await asyncio.sleep(0.03)
            await src.checkpoint()
            src.finish()
        await asyncio.sleep(0.03)
        cp, _ = await src.checkpoint(lambda cp: shutil.copyfile(g.spec.ram_path, d / "ram"))
        state = src.device_state(cp)
        src.finish()
    finally:
        await src.end()
    h = Guest(colo_spec(d, "resumed", incoming=True))
    await h.start()
    try:
        await h.load_device_state(state)
        await h.cont()
        before = np.fromfile(d / "ram", np.uint8)
        await asyncio.sleep(1.0)
        assert await h.status() == "running"
        after = np.fromfile(d / "ram", np.uint8)
        assert scan_pages(after, before).size > 10  # the resumed guest's workload writes on
    finally:
        await h.close()


async def test_a_checkpoint_the_service_died_in_is_ended_by_the_next(colo_guest):
    """The service dies with the guest stopped inside a checkpoint (our end of the stream goes
    away, QMP too). The next service takes the QEMU up: it finds the migration in `colo`, ends
    it (the guest runs again, alone) and can start a new COLO capture."""
    g = colo_guest
    cap = Capture(g.spec.ram_path, g.spec.memory_mb << 20)
    src = ColoSource(g, cap.size)
    await src.start()
    await asyncio.sleep(0.03)
    await src.checkpoint()  # the guest is stopped now; `finish` never comes
    assert await g.status() == "colo"
    src._sock.close()  # what the process's death does to our end
    await g.detach()
    again = await Guest.attach(g.spec, g.pid, g.started_at)
    try:
        assert await again.status() == "running"
        assert (await again._execute("query-migrate"))["status"] == "completed"
        src2 = ColoSource(again, cap.size)
        await src2.start()
        await asyncio.sleep(0.03)
        cp, _ = await src2.checkpoint()
        src2.finish()
        assert cp.device_blob
        await src2.end()
        assert await again.status() == "running"
    finally:
        await again.detach()
