"""Checkpoints reach the standby in epoch order, each exactly after the one before it.

A handover's final epoch is taken while the epoch loop may still be encoding (in a thread) or
sending the epoch before it: it must wait for that one, or the standby would commit N+1 on a
replica without N. The standby refuses a checkpoint that does not follow the last one of its
session, so a gap can never be committed. Primary and Standby run for real over loopback with a
stand-in guest (tests/test_handover_frames.py's Pair)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from tests.test_handover_frames import Pair
from tests.test_replica_verify import until


async def test_a_handover_waits_for_the_epoch_still_being_encoded(tmp_path):
    async with Pair(tmp_path) as p:
        writer = asyncio.create_task(p.guest.write_forever())
        encode, entered, slow = p.primary._encode_epoch, threading.Event(), threading.Event()

        def slow_encode(*a, **kw):  # the loop's next epoch takes 0.3 s to encode, once
            if slow.is_set():
                slow.clear()
                entered.set()
                threading.Event().wait(0.3)
            return encode(*a, **kw)

        p.primary._encode_epoch = slow_encode
        slow.set()
        await until(entered.is_set, what="an epoch in its encoding")
        before = p.primary.status.epoch  # the one being encoded
        epoch = await p.primary.handover(timeout=5)
        assert epoch == before + 1
        await until(lambda: p.replica.committed_epoch == epoch, what="the final epoch applied")  # ACK, then apply
        await p.primary.announce_switchover(epoch)
        await until(lambda: p.switched == [epoch], what="the SWITCHOVER")
        await asyncio.sleep(0.5)  # the slow epoch's frame, had it been left behind, arrives now
        writer.cancel()
        assert p.standby.status.rejected_frames == 0
        assert p.standby.status.sessions == 1 and p.primary.status.sessions == 1
        assert np.array_equal(p.replica.ram, p.guest.ram)  # the guest stayed paused since the final epoch


async def test_the_standby_refuses_a_checkpoint_that_skips_an_epoch(tmp_path):
    async with Pair(tmp_path) as p:
        await until(lambda: p.replica.committed_epoch >= 3, what="a few epochs")
        async with p.primary._ship_lock:  # between two epochs
            skipped = p.primary.status.epoch + 1
            p.primary.status.epoch += 1  # the next frame carries skipped + 1: epoch `skipped` never left
        await until(lambda: p.standby.status.rejected_frames == 1, what="the refusal")
        assert p.replica.committed_epoch < skipped
        # the session ended; the next one resyncs and the epochs go on from there
        await until(lambda: p.primary.status.sessions == 2 and p.primary.status.state == "protected"
                    and p.replica.committed_epoch > skipped + 1, what="protection again")
        assert p.standby.status.rejected_frames == 1
