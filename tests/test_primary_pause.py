"""The pause of a checkpoint (stop → capture → cont) is one unit: cancelling the caller
(session teardown) waits for the `cont`, so the guest is never left stopped; a handover
keeps it stopped on purpose. The session watchdog does not count its own lateness (a
starved event loop) as the standby's silence."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from replication.capture import Capture
from replication.codec import Codec
from replication.gate import Gate
from replication.primary import Primary, PrimaryConfig, run_to_end
from replication.session import own_lateness
from replication.qemu import GuestError
from replication.transport import ChannelError

PAGES = 16


class NullGate(Gate):
    """The gate as a checkpoint sees it: seals and releases, recorded."""

    def __init__(self):
        self.sealed, self.released, self._epoch = [], [], 0

    @property
    def current_epoch(self):
        return self._epoch

    def seal(self, epoch):
        self.sealed.append(epoch)
        self._epoch = epoch + 1

    def release(self, epoch):
        self.released.append(epoch)


class FakeGuest:
    """Records what QEMU would have done. Each step may be held by the test: `stop` takes
    effect at once (as in QEMU) but its reply can be held; the device state and the `cont`
    reply likewise."""

    def __init__(self):
        self.running = True
        self.calls: list[str] = []
        self.hold = {k: asyncio.Event() for k in ("stop", "migrate", "cont")}
        self.at = {k: asyncio.Event() for k in ("stop", "migrate", "cont")}
        for ev in self.hold.values():
            ev.set()

    async def _step(self, name: str) -> None:
        self.at[name].set()
        await self.hold[name].wait()

    async def stop_vcpus(self) -> None:
        self.running = False
        self.calls.append("stop")
        await self._step("stop")

    async def save_device_state(self) -> bytes:
        await self._step("migrate")
        self.calls.append("migrate")
        return b"device-state"

    async def cont(self) -> None:
        await self._step("cont")
        self.running = True
        self.calls.append("cont")


@pytest.fixture
def primary(tmp_path):
    ram = tmp_path / "ram"
    with open(ram, "wb") as f:
        f.write(os.urandom(PAGES * 4096))
    cap = Capture(ram, PAGES * 4096)
    p = Primary(PrimaryConfig(site="t", compat={}, run_id="r"), FakeGuest(), cap, NullGate(), connect=None)
    yield p
    cap.close()


CODEC = Codec(b"k" * 32)


async def test_a_checkpoint_pauses_and_resumes(primary):
    rec, frame = await primary.checkpoint(CODEC, 100)
    assert primary.guest.calls == ["stop", "migrate", "cont"] and primary.guest.running
    assert rec.epoch == 1 and rec.dirty_pages == PAGES and frame


@pytest.mark.parametrize("step", ["stop", "migrate", "cont"])
async def test_cancelled_mid_pause_the_guest_is_still_resumed(primary, step):
    g = primary.guest
    g.hold[step].clear()
    cp = asyncio.create_task(primary.checkpoint(CODEC, 100))
    await g.at[step].wait()
    cp.cancel()
    await asyncio.sleep(0)
    cp.cancel()  # teardown of the session, then of the whole run: twice
    await asyncio.sleep(0.01)
    assert not cp.done()  # the caller waits for the unit to end
    g.hold[step].set()
    with pytest.raises(asyncio.CancelledError):
        await cp
    assert g.calls == ["stop", "migrate", "cont"] and g.running
    assert primary.status.epoch == 0  # the epoch was not taken


async def test_a_cancelled_handover_leaves_the_guest_stopped_on_purpose(primary):
    g = primary.guest
    g.hold["migrate"].clear()
    cp = asyncio.create_task(primary.checkpoint(CODEC, 100, final=True))
    await g.at["migrate"].wait()
    cp.cancel()
    g.hold["migrate"].set()
    with pytest.raises(asyncio.CancelledError):
        await cp
    assert g.calls == ["stop", "migrate"] and not g.running and primary._frozen


async def test_a_failed_stop_is_still_followed_by_cont(primary):
    g = primary.guest

    async def stop_unanswered():
        g.running = False  # QEMU stopped, but its reply did not come in time
        raise GuestError("QEMU of guest t did not answer stop (id gm-1) within 2s")

    g.stop_vcpus = stop_unanswered
    with pytest.raises(GuestError, match="did not answer stop"):
        await primary.checkpoint(CODEC, 100)
    assert g.calls == ["cont"] and g.running


async def test_run_to_end_returns_the_result_when_not_cancelled():
    assert await run_to_end(asyncio.ensure_future(asyncio.sleep(0, result=7))) == 7


def test_own_lateness_counts_only_overruns_past_the_tolerance():
    assert own_lateness(0.1, 0.12, tolerance_s=0.05) == 0.0
    assert own_lateness(0.1, 1.1, tolerance_s=0.05) == pytest.approx(1.0)
    assert own_lateness(0.1, 0.09, tolerance_s=0.05) == 0.0


async def test_the_watchdog_does_not_count_its_own_stall_as_silence(primary):
    p = primary
    p.status.state = "protected"
    p.cfg.heartbeat_ms, p.cfg.min_timeout_ms = 20, 200
    work = asyncio.create_task(asyncio.Event().wait())
    p._last_heard = time.monotonic()
    dog = asyncio.create_task(p._watchdog(None, work))
    await asyncio.sleep(0.01)
    stall_s = 3 * p.detection_timeout_ms() / 1000
    time.sleep(stall_s)  # the event loop is blocked: nobody (not the reader either) can run
    await asyncio.sleep(0.01)  # the watchdog woke up (its timer was due first) and looked
    assert not dog.done(), dog.exception()
    # real silence still ends the session
    with pytest.raises(ChannelError, match="no word from the standby"):
        await asyncio.wait_for(dog, 10)
    work.cancel()


def test_epoch_latency_gives_p50_and_p99_per_step_of_acknowledged_epochs():
    from replication.primary import EpochRecord, epoch_latency

    recs = [EpochRecord(e, pause_ms=float(e), dirty_pages=0, dirty_bytes=0, wire_bytes=0, device_state_bytes=0,
                        sent_at=10.0, interval_ms=25, acked_at=10.0 + e / 1000, encode_ms=2.0, send_ms=0.5)
            for e in range(1, 101)]
    lat = epoch_latency(recs)
    assert lat["pause"] == [51.0, 99.0] and lat["encode"] == [2.0, 2.0] and lat["send"] == [0.5, 0.5]
    assert lat["ack"][0] == pytest.approx(51.0) and lat["ack"][1] == pytest.approx(99.0)
    assert epoch_latency([]) == {"pause": None, "encode": None, "send": None, "ack": None}


async def test_a_late_ack_is_logged_with_where_the_epochs_output_waited(tmp_path, monkeypatch):
    """Real Primary, gate and Standby over loopback: the standby's journal step of one epoch takes
    300 ms (a busy disk). The primary counts the epoch whose output waited past SLOW_HOLD_MS, keeps
    the longest hold, and logs a line whose parts (run, pause, encode, ACK) add up to it, the ACK
    named as the long part; quick epochs are neither counted nor logged."""
    import structlog

    from replication import primary as primary_mod
    from tests.test_handover_frames import Pair
    from tests.test_replica_verify import until

    monkeypatch.setattr(primary_mod, "SLOW_HOLD_MS", 200.0)
    async with Pair(tmp_path) as p:
        journal, calls = p.standby._journal_checkpoint, []

        def slow_journal(codec, payload):
            calls.append(1)
            if len(calls) == 3:
                time.sleep(0.3)
            return journal(codec, payload)

        p.standby._journal_checkpoint = slow_journal
        with structlog.testing.capture_logs() as logs:
            await until(lambda: len(calls) >= 12, what="a dozen epochs")
        st = p.primary.status
    slow = [e for e in logs if e["event"] == "primary.slow_epoch"]
    assert 1 <= st.slow_epochs <= p.primary.cfg.max_in_flight + 1, st.slow_epochs
    assert len(slow) == 1 and st.max_held_ms >= 300
    e = slow[0]
    assert e["ack_ms"] >= 290 and e["held_ms"] >= e["ack_ms"]
    assert e["held_ms"] == pytest.approx(e["ran_ms"] + e["pause_ms"] + e["encode_ms"] + e["ack_ms"], abs=0.5)
    quick = [r for r in p.primary.history if r.acked_at is not None and r.held_ms(r.acked_at) < 200]
    assert len(quick) >= 6  # the other epochs: under the threshold, not counted
