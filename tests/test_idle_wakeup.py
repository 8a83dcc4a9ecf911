"""The pacer's idle lengthening and the output wake-up, with real parts: a real gate (socketpair
TAP, stand-in QEMU stream socket: tests/test_gate.py), the Primary's epoch loop and a Standby over
loopback (tests/test_handover_frames.py), and the pacer fed the way the site feeds it
(geomirror/site/primary_side.py `_next_interval`). While the guest sends nothing the interval
grows; the first frame the gate holds ends the long epoch early, is released after the standby
acknowledged it, and brings the interval back to the latency-driven target."""

from __future__ import annotations

import asyncio
import struct
import time

from replication.gate import GateMode
from replication.pacer import Pacer, PacerPolicy
from replication.primary import Primary, pacer_sample
from tests.test_gate import frame, on_net
from tests.test_handover_frames import Pair
from tests.test_replica_verify import until

POLICY = PacerPolicy(min_interval_ms=2, max_interval_ms=1000, latency_budget_ms=500, max_pause_share=0.5,
                     idle_interval_ms=200)


class Paced(Pair):
    """The Pair's Primary, paced by a real Pacer; `wake`: the epoch loop ends idle epochs early."""

    def __init__(self, tmp_path, policy: PacerPolicy, wake: bool = True):
        super().__init__(tmp_path)
        self.pacer = Pacer(policy, 5)
        self.planned: list[tuple[float, str]] = []  # (interval, reason) of each decision
        self.sampled: list[tuple[float, bool]] = []  # (the epoch's interval, held output) per sample
        self.primary = Primary(self.primary.cfg, self.guest, self.capture, self.gate, connect=self._connect,
                               interval_fn=self._interval, wake_fn=self.pacer.wake_at if wake else None)

    def _interval(self, primary: Primary, rec) -> float:
        if rec is None:
            return self.pacer.interval_ms
        st = self.gate.stats
        self.sampled.append((rec.interval_ms, st.last_quiet_ms is not None))
        d = self.pacer.update(pacer_sample(rec, primary.link, primary.status.in_flight,
                                           release_offset_ms=st.last_release_offset_ms,
                                           quiet_ms=st.last_quiet_ms, reply_ms=st.last_reply_ms))
        self.planned.append((d.interval_ms, d.reason))
        return d.interval_ms


def send(w, i: int) -> None:
    f = frame(i)
    w.write(struct.pack(">I", len(f)) + f)


async def test_the_interval_grows_while_nothing_is_held_and_the_first_frame_ends_the_epoch(tmp_path):
    async with Paced(tmp_path, POLICY) as p:
        assert p.gate.mode is GateMode.HOLD
        await until(lambda: p.pacer.interval_ms >= 100, what="the idle interval")
        idle = [iv for iv, reason in p.planned if reason == "idle"]
        assert len(idle) >= 5 and idle == sorted(idle) and max(idle) <= 200
        assert p.primary.status.epochs_woken == 0
        planned = p.pacer.interval_ms
        n = len(p.sampled)
        send(p.w, 7)  # the guest's first output after the idle stretch
        await until(lambda: p.primary.status.epochs_woken == 1, what="the woken epoch")
        await until(lambda: len(p.sampled) > n, what="the woken epoch's sample")
        woken_interval, held = p.sampled[n]
        assert held and woken_interval < planned  # ended early, with the frame in it
        d = p.pacer.last
        assert d.reason != "idle" and d.interval_ms == p.pacer.latency_target_ms < planned / POLICY.max_step
        got: list[int] = []
        await until(lambda: got.extend(on_net(p.net)) or got == [7], what="the frame's release")
        assert p.gate.stats.frames_held == 0


async def test_without_the_wake_up_the_epoch_runs_its_whole_interval(tmp_path):
    """The loop without `wake_fn` (a fixed interval, or another pacer): held output waits for the
    epoch's planned end, as before."""
    async with Paced(tmp_path, POLICY, wake=False) as p:
        await until(lambda: p.pacer.interval_ms >= 100, what="the idle interval")
        planned = p.pacer.interval_ms
        n = len(p.sampled)
        send(p.w, 8)
        await until(lambda: any(held for _, held in p.sampled[n:]), what="the epoch that held the frame")
        iv = next(iv for iv, held in p.sampled[n:] if held)
        assert p.primary.status.epochs_woken == 0 and iv >= planned  # its whole (idle) interval


async def test_the_interval_counts_from_the_guests_resume(tmp_path):
    """The interval is the guest's run between two pauses: a checkpoint whose send takes a while
    (encode, a full socket) does not lengthen the next epoch by that much. Fails on a loop that
    slept the whole interval after the send (every gap >= interval + send)."""
    interval, send_ms = 80.0, 60.0
    async with Paced(tmp_path, POLICY, wake=False) as p:
        p.primary._interval_fn = lambda primary, rec: interval
        gaps: list[float] = []
        resumed = [None]
        slow_send, pause = p.primary._send_checkpoint, p.primary._pause

        async def send_slowly(ch, rec, frame):
            await asyncio.sleep(send_ms / 1000)
            await slow_send(ch, rec, frame)

        async def timed(n, final):  # the guest is stopped from its start to its end
            if resumed[0] is not None:
                gaps.append((time.monotonic() - resumed[0]) * 1000)
            try:
                return await pause(n, final)
            finally:
                resumed[0] = time.monotonic()

        p.primary._send_checkpoint, p.primary._pause = send_slowly, timed
        await until(lambda: len(gaps) >= 8, what="eight epochs at the fixed interval")
    gaps.sort()
    assert gaps[len(gaps) // 2] < interval + send_ms / 2, gaps  # the old loop: >= 140 ms every time
