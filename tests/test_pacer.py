"""The pacer: the pure model (optimum, alignment, limits, reasons) and the stateful edge (bounds,
bounded steps, convergence, back-off, one clear infeasibility report)."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given, settings, strategies as st

from replication.pacer import (ALIGN_MAX_FACTOR, ALPHA, REASONS, EpochSample, ModelInputs, Pacer, PacerPolicy,
                               WAKE_BATCH_MS, aligned_interval, hard_floors, modelled_rate, plan_interval,
                               rtt_optimum, wake_at)
from replication.primary import EpochRecord, pacer_sample
from replication.session import LinkStats
from replication.tcpinfo import TcpInfo

samples = st.builds(
    EpochSample,
    interval_ms=st.floats(1, 2000), pause_ms=st.floats(0, 200), dirty_bytes=st.integers(0, 1 << 28),
    wire_bytes=st.integers(0, 1 << 27), rtt_ms=st.floats(0, 300), rtt_var_ms=st.floats(0, 50),
    bandwidth_bytes_per_s=st.one_of(st.none(), st.floats(1e4, 1e10)), in_flight=st.integers(0, 8))
policies = st.builds(
    PacerPolicy, min_interval_ms=st.floats(5, 100), max_interval_ms=st.floats(100, 3000),
    latency_budget_ms=st.floats(1, 1000), max_pause_share=st.floats(0.05, 0.9),
    max_wan_bytes_per_s=st.one_of(st.just(0.0), st.floats(1e5, 1e9)), max_step=st.floats(1.05, 2.0),
    max_in_flight=st.integers(1, 4))


@given(policies, st.lists(samples, min_size=1, max_size=60))
def test_interval_stays_in_bounds_and_moves_by_bounded_steps(policy, seq):
    p = Pacer(policy)
    prev = p.interval_ms
    for s in seq:
        d = p.update(s)
        assert policy.min_interval_ms - 1e-9 <= d.interval_ms <= policy.max_interval_ms + 1e-9
        assert d.interval_ms <= prev * policy.max_step * (1 + 1e-9)
        assert d.interval_ms >= prev / policy.max_step * (1 - 1e-9)
        prev = d.interval_ms


def steady(interval, pause=10.0, wire_at_100=2e6, rtt=25.0, bw=12.5e6, in_flight=0):
    """What a steady link and workload report at `interval` (wire bytes grow as interval^ALPHA)."""
    return EpochSample(interval, pause, int(wire_at_100 * 2), int(wire_at_100 * (interval / 100) ** ALPHA), rtt,
                       1.0, bw, in_flight)


@settings(max_examples=100)
@given(st.floats(5, 40), st.floats(2e5, 5e6), st.floats(1, 100), st.floats(20, 900))
def test_converges_on_a_steady_link(pause, wire, rtt, start):
    pol = PacerPolicy(min_interval_ms=10, max_interval_ms=1000, latency_budget_ms=5000, max_pause_share=0.3)
    p = Pacer(pol, start)
    for _ in range(200):
        p.update(steady(p.interval_ms, pause, wire, rtt))
    before = p.interval_ms
    for _ in range(20):
        p.update(steady(p.interval_ms, pause, wire, rtt))
    assert abs(p.interval_ms - before) <= 0.01 * before


@given(st.floats(20, 500))
def test_backs_off_when_checkpoints_queue(start):
    pol = PacerPolicy(min_interval_ms=10, max_interval_ms=1000, max_in_flight=2)
    p = Pacer(pol, start)
    # 3 in flight with a 1 ms RTT: far more than pipelining explains
    d = p.update(steady(start, pause=1, rtt=1, bw=1e9, in_flight=3))
    assert d.interval_ms > start or d.interval_ms == pol.max_interval_ms
    assert d.reason == "queued"


def test_pause_share_sets_the_floor():
    pol = PacerPolicy(min_interval_ms=10, max_interval_ms=1000, max_pause_share=0.2, latency_budget_ms=1000)
    p = Pacer(pol, 10)
    for _ in range(100):
        d = p.update(steady(p.interval_ms, pause=20, wire_at_100=1e4))
    # pause 20 ms at share 0.2 needs interval >= 80 ms
    assert 79 <= p.interval_ms <= 82 and d.reason == "pause-share"


def test_shortens_while_the_link_keeps_up():
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=1000, latency_budget_ms=500)
    p = Pacer(pol, 800)
    for _ in range(60):
        p.update(steady(p.interval_ms, pause=2, wire_at_100=1e5, bw=1e8))
    assert p.interval_ms == 20


def test_slow_link_lengthens_the_interval():
    pol = PacerPolicy(min_interval_ms=10, max_interval_ms=2000, latency_budget_ms=5000)
    p = Pacer(pol, 20)
    for _ in range(200):
        d = p.update(steady(p.interval_ms, pause=1, wire_at_100=1e6, bw=1e6))  # 1 MB/s link
    # transfer(i) = (i/100 ms)^0.7 s never fits in i/1.25 below the maximum: capped there, and says why
    assert p.interval_ms == 2000 and d.reason == "hard-max" and "bandwidth needs" in d.detail


def test_impossible_latency_budget_is_reported_once_with_numbers():
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=1000, latency_budget_ms=5)
    p = Pacer(pol, 50)
    msgs = [d.infeasible for d in (p.update(steady(p.interval_ms, rtt=50, bw=1e9)) for _ in range(30))
            if d.infeasible]
    assert len(msgs) == 1
    assert "budget of 5 ms cannot be met" in msgs[0] and "RTT" in msgs[0]
    assert abs(p.interval_ms - 30) < 0.5  # the best achievable: 10 ms pause at a 0.25 share


def test_in_flight_explained_by_rtt_is_not_a_backlog():
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=1000, max_in_flight=2, latency_budget_ms=1000)
    p = Pacer(pol, 25)
    for _ in range(50):  # 50 ms RTT, 25 ms interval: two checkpoints are always in flight
        d = p.update(steady(p.interval_ms, pause=2, rtt=50, bw=1e9, in_flight=2))
    assert p.interval_ms < 30 and d.reason != "queued"




@settings(max_examples=60)
@given(st.floats(5, 40), st.floats(1, 60))
def test_the_interval_follows_the_rtt(pause, rtt):
    """With no hard limit binding, a longer RTT gives a longer interval (today's complaint: the
    interval stayed at 46 ms while the RTT went from 5 to 52 ms)."""
    pol = PacerPolicy(min_interval_ms=5, max_interval_ms=1000, latency_budget_ms=5000, max_pause_share=0.9)
    ivs = []
    for r in (rtt, rtt * 3 + 20):
        p = Pacer(pol, 50)
        for _ in range(300):
            p.update(steady(p.interval_ms, pause, 1e4, r, bw=1e10))
        ivs.append(p.interval_ms)
        assert p.last.reason == "rtt-optimum"
    assert ivs[1] > ivs[0] * 1.05


# ---------------------------------------------------------------------------- the pure model

inputs = st.builds(
    ModelInputs, pause_ms=st.floats(0.5, 200), rtt_ms=st.floats(0, 300),
    bandwidth_bytes_per_s=st.one_of(st.none(), st.floats(1e5, 1e10)), wire_bytes_per_ms=st.floats(0, 1e5),
    ref_interval_ms=st.floats(5, 1000), reply_ms=st.one_of(st.none(), st.floats(0, 200)))


def test_the_optimum_without_transfer_is_the_closed_form():
    for pause, rtt in ((5.0, 1.0), (25.0, 1.0), (25.0, 50.0), (40.0, 200.0)):
        got = rtt_optimum(ModelInputs(pause, rtt))
        assert math.isclose(got, math.sqrt(2 * pause * (pause + rtt)), rel_tol=1e-6), (pause, rtt)


@settings(max_examples=150)
@given(inputs)
def test_the_optimum_is_the_maximum_of_a_brute_force_scan(inp):
    best = rtt_optimum(inp)
    grid = [0.01 * 1.01 ** k for k in range(1500)]  # 0.01 ms .. ~30 s, 1 % apart
    scan = max(grid, key=lambda i: modelled_rate(i, inp))
    assert modelled_rate(best, inp) >= modelled_rate(scan, inp) * (1 - 1e-9)
    assert abs(best - scan) <= 0.011 * scan  # the scan's argmax is within one grid step


@given(inputs, st.floats(0, 300), st.floats(0, 300))
def test_the_plan_is_monotone_in_the_rtt(inp, r1, r2):
    """A longer RTT never gives a shorter interval while the latency budget does not bind
    (the budget is the one term that shortens the interval as the RTT grows)."""
    pol = PacerPolicy(min_interval_ms=1, max_interval_ms=100_000, latency_budget_ms=1e9, max_pause_share=0.9)
    lo, hi = sorted((r1, r2))
    # without a reply time: the alignment is all or nothing (a longer RTT can put it out of reach
    # and the plan back at the optimum: test_an_alignment_out_of_reach_leaves_the_optimum)
    a = plan_interval(ModelInputs(**{**inp.__dict__, "rtt_ms": lo, "reply_ms": None}), pol)
    b = plan_interval(ModelInputs(**{**inp.__dict__, "rtt_ms": hi, "reply_ms": None}), pol)
    assert b.interval_ms >= a.interval_ms * (1 - 1e-9)


@given(inputs, policies)
def test_the_plan_respects_the_hard_limits_and_names_its_term(inp, pol):
    plan = plan_interval(inp, pol)
    assert plan.reason in REASONS and plan.detail
    assert plan.interval_ms <= pol.max_interval_ms
    floors = hard_floors(inp, pol)
    if plan.reason != "hard-max":
        assert all(plan.interval_ms >= f * (1 - 1e-9) for f in floors.values())
        assert plan.interval_ms >= pol.min_interval_ms
    else:
        assert plan.interval_ms == pol.max_interval_ms


def test_reasons_name_the_deciding_term():
    free = PacerPolicy(min_interval_ms=1, max_interval_ms=10_000, latency_budget_ms=10_000, max_pause_share=0.9)
    assert plan_interval(ModelInputs(25, 50), free).reason == "rtt-optimum"
    assert plan_interval(ModelInputs(25, 50, reply_ms=10), free).reason == "rtt-aligned"
    assert plan_interval(ModelInputs(25, 50), PacerPolicy(max_pause_share=0.1, latency_budget_ms=10_000)).reason \
        == "pause-share"
    assert plan_interval(ModelInputs(25, 50, 1e6, 1e3), free).reason == "bandwidth"
    assert plan_interval(ModelInputs(25, 50), PacerPolicy(min_interval_ms=100, max_interval_ms=200,
                                                          latency_budget_ms=10_000)).reason == "min-interval"
    assert plan_interval(ModelInputs(25, 50), PacerPolicy(min_interval_ms=1, max_interval_ms=30,
                                                          latency_budget_ms=10_000, max_pause_share=0.9)).reason \
        == "hard-max"
    tight = PacerPolicy(min_interval_ms=1, max_interval_ms=10_000, latency_budget_ms=120, max_pause_share=0.9)
    plan = plan_interval(ModelInputs(25, 50, reply_ms=30), tight)
    assert plan.reason == "latency-budget" and math.isclose(plan.interval_ms, 120 - 25 - 50)


@given(st.floats(1, 60), st.floats(0, 150), st.floats(0, 80))
def test_aligned_interval_lets_the_replies_out_in_the_same_epoch(pause, rtt, reply):
    inp = ModelInputs(pause, rtt, 12.5e6, 2e4, 100, reply)
    pol = PacerPolicy(min_interval_ms=1, max_interval_ms=10_000, latency_budget_ms=1e9, max_pause_share=0.95)
    plan = plan_interval(inp, pol)
    i = plan.interval_ms
    need = rtt + inp.transfer_ms(i) + reply
    assert plan.reason in ("rtt-optimum", "rtt-aligned", "bandwidth", "min-interval", "pause-share")
    if plan.reason.startswith("rtt-"):  # aligned, or at the alignment's cap
        assert i >= need * (1 - 1e-9) or math.isclose(i, ALIGN_MAX_FACTOR * rtt_optimum(inp))
    a = aligned_interval(inp)
    assert a >= rtt + inp.transfer_ms(a) + reply


def test_the_interval_follows_the_rtt_in_the_lab_case():
    """The lab's numbers with the COLO capture (pause 7.7 ms, 20 ms floor, releases ~3 ms after an
    RTT of 1..50 ms). One client answered in 2 ms aligns where its reply comes back past the floor
    (25 ms RTT: one aligned cycle instead of a wait of half an epoch plus the release); 64 clients
    the TCG guest answers in ~30 ms never do (they fall out of step at the shorter interval, whose
    epochs serve them best: the lab at 10 ms RTT, fixed 20 ms 876-978 ops/s, aligned 35-45 ms
    712-868), and the interval grows with the RTT by the optimum alone."""
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=500, latency_budget_ms=150, max_pause_share=0.4)

    def lab(rtt, reply):
        return ModelInputs(7.7, rtt, 12.5e6, 300, 25, reply_ms=reply, release_offset_ms=rtt + 3)
    one = [plan_interval(lab(r, 2), pol) for r in (1, 10, 25, 50)]
    many = [plan_interval(lab(r, 30), pol) for r in (1, 10, 25, 50)]
    assert [p.reason for p in one] == ["min-interval", "min-interval", "rtt-aligned", "rtt-optimum"], one
    assert one[2].interval_ms > 30
    assert [p.reason for p in many] == ["min-interval"] * 2 + ["rtt-optimum"] * 2, many
    assert "at any moment" in many[0].detail  # in reach at 1 ms RTT (37 ms), but not taken
    assert many[0].interval_ms < many[2].interval_ms < many[3].interval_ms < one[2].interval_ms
    assert all(p.interval_ms + 7.7 + r + lab(r, 2).transfer_ms(p.interval_ms) <= 150
               for p, r in zip(one + many, (1, 10, 25, 50) * 2))


def test_many_clients_answered_one_after_another_are_not_aligned():
    """The rule that decides the 64-connection case above on its own: an alignment within reach and
    clearly better than whole cycles at the shorter interval, but not better than a request at a
    random moment of its epochs (start + interval/2 + pause), is not taken."""
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=500, latency_budget_ms=150, max_pause_share=0.4)
    inp = ModelInputs(7.7, 12, 12.5e6, 300, 25, reply_ms=14, release_offset_ms=15)
    a = aligned_interval(inp)
    assert 20 < a < 40  # in reach (2 x 20 ms), and one cycle of it beats two of 20 ms by far
    assert (a + 7.7) * 1.15 < 2 * (20 + 7.7)
    assert (a + 7.7) * 1.05 > 15 + 10 + 7.7  # but not a random moment of a 20 ms epoch
    plan = plan_interval(inp, pol)
    assert plan.reason == "min-interval" and "at any moment" in plan.detail, plan
    # replies just raised by a cut-off one are at least this long: a longer reply aligns later still,
    # so the verdict stands (it is the 15 % test alone that such a sample skips)
    at_least = ModelInputs(7.7, 12, 12.5e6, 300, 25, reply_ms=14, release_offset_ms=15, reply_at_least=True)
    assert plan_interval(at_least, pol).reason == "min-interval"
    in_step = ModelInputs(7.7, 12, 12.5e6, 300, 25, reply_ms=1, release_offset_ms=24, reply_at_least=True)
    assert plan_interval(in_step, pol).reason == "rtt-aligned"


# ---------------------------------------------------------------------------- measured reply time


def closed_loop(interval, pause, w, service):
    """What the gate measures when clients send their next request the moment a release lets their
    reply out: the requests arrive `w` into the epoch and take `service` ms to answer; an epoch
    that ends first cuts the answers off (quiet 0)."""
    cycle = interval + pause
    arrival = (w - pause) % cycle if w > pause else 0.0
    arrival = 0.0 if arrival > interval else arrival
    last = min(arrival + service, interval)
    return EpochSample(interval, pause, 10_000, 5_000, w - pause, 1.0, 1e9, 1,
                       release_offset_ms=w - pause, quiet_ms=interval - last, reply_ms=last - arrival)


@settings(max_examples=60)
@given(st.floats(10, 30), st.floats(5, 60), st.floats(2, 40))
def test_the_pacer_lengthens_the_interval_until_the_replies_make_the_epoch(pause, rtt, service):
    """Closed-loop clients whose replies spill past the epoch's end: the pacer grows the interval
    until they fit, or, when that is past twice the RTT optimum, stays at the optimum."""
    pol = PacerPolicy(min_interval_ms=5, max_interval_ms=1000, latency_budget_ms=1e6, max_pause_share=0.9)
    p = Pacer(pol, 20)
    w = pause + rtt  # the release comes pause + RTT after the seal
    for _ in range(400):
        p.update(closed_loop(p.interval_ms, pause, w, service))
    opt = rtt_optimum(ModelInputs(pause, rtt + 2))  # the sample's RTT + 2 x its variance
    need = rtt + 2 + service
    aligned = need + max(3.0, 0.1 * need)
    assume(abs(aligned - ALIGN_MAX_FACTOR * opt) > 5)  # not on the cap's edge
    if aligned < ALIGN_MAX_FACTOR * opt:
        # aligned: the replies make the epoch; or not, because a cycle of it would not clearly
        # beat the cycles at the optimum (the detail says so)
        if p.last.reason == "rtt-aligned":
            assert p.interval_ms >= rtt + service
        else:
            assert p.last.reason == "rtt-optimum", p.last
            assert "serves no better" in p.last.detail or p.interval_ms >= rtt + service  # or it fits anyway
    else:  # not somewhere short of the alignment: two cycles of a longer epoch serve worst
        assert p.last.reason == "rtt-optimum"
        assert math.isclose(p.interval_ms, opt, rel_tol=0.05)


def test_an_alignment_out_of_reach_leaves_the_optimum():
    """The lab at 25 ms RTT with the COLO capture: a 6 ms pause, releases ~33 ms into the epoch. The
    aligned interval (~37 ms) is past twice the optimum (~2 x 16 ms): lengthening toward it and stopping
    short put the releases in the pause, two cycles of a longer epoch per request. The optimum it is."""
    pol = PacerPolicy(min_interval_ms=5, max_interval_ms=500, latency_budget_ms=150, max_pause_share=0.4)
    lab = ModelInputs(6, 27, 12.5e6, 1700, 30, reply_ms=8)  # ~4 ms transfer
    plan = plan_interval(lab, pol)
    assert plan.reason == "rtt-optimum" and "not aligned" in plan.detail, plan
    assert plan.interval_ms == pytest.approx(rtt_optimum(lab))
    # within reach (a 15 ms pause: the optimum is ~35 ms), it aligns
    assert plan_interval(ModelInputs(15, 27, 12.5e6, 1700, 30, reply_ms=8), pol).reason == "rtt-aligned"


def test_the_alignment_waits_for_the_releases_as_late_as_they_were_measured():
    """The lab at 10 ms RTT, 16 connections: RTT + transfer said 21 ms was enough, but the releases
    came ~20 ms into the next epoch (the standby's commit, jitter): the replies missed, two cycles
    per request (306 ops/s at 21 ms against 413 at a fixed 25 ms). With the measured offset the plan
    aligns past it, since one such cycle clearly beats two at the floor."""
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=500, latency_budget_ms=150, max_pause_share=0.4)
    guessed = plan_interval(ModelInputs(6, 12, reply_ms=2), pol)
    assert guessed.reason == "min-interval" and guessed.interval_ms == 20
    measured = plan_interval(ModelInputs(6, 12, reply_ms=2, release_offset_ms=20), pol)
    assert measured.reason == "rtt-aligned" and measured.interval_ms >= 20 + 2
    # and the pacer takes the offset the gate measures (resume -> release)
    p = Pacer(pol, 20)
    for _ in range(100):
        d = p.update(EpochSample(p.interval_ms, 6, 10_000, 5_000, 12, 0, 12.5e9, 1, release_offset_ms=20,
                                 quiet_ms=p.interval_ms - 21, reply_ms=1))
    assert d.reason == "rtt-aligned" and d.interval_ms >= 22, d


def test_a_release_seen_again_is_not_counted_again():
    """The gate reports its last release's offset until the next release: a sample that repeats it
    (released=False) leaves the measured offset as if it had not come."""
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=500, latency_budget_ms=150, max_pause_share=0.4)
    once, repeated = Pacer(pol, 20), Pacer(pol, 20)

    def sample(p, delay, released=True):
        return EpochSample(p.interval_ms, 6, 10_000, 5_000, 12, 0, 12.5e9, 1, release_offset_ms=delay - 6,
                           quiet_ms=2, released=released)
    for _ in range(20):  # a late release, then three on time; `repeated` sees the late one 3 more times
        once.update(sample(once, 60))
        repeated.update(sample(repeated, 60))
        for _ in range(3):
            repeated.update(sample(repeated, 60, released=False))
        for _ in range(3):
            once.update(sample(once, 26))
            repeated.update(sample(repeated, 26))
    assert repeated._roff == pytest.approx(once._roff, rel=1e-6)
    assert repeated._rdev == pytest.approx(once._rdev, rel=1e-6)


def test_one_aligned_cycle_must_clearly_beat_the_cycles_at_the_shorter_interval():
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=500, latency_budget_ms=500, max_pause_share=0.4)
    # releases 34 ms in, 1 ms replies, 4 ms pause: aligned ~38.5 ms (42.5 per request); at the 20 ms
    # floor a request takes two cycles of 24 (48): not 15 % better
    plan = plan_interval(ModelInputs(4, 27, reply_ms=1, release_offset_ms=34), pol)
    assert plan.reason == "min-interval" and "serves no better than 2 cycles" in plan.detail, plan
    # with a 12 ms pause the optimum is ~31 ms and two cycles of it cost 85 ms: the aligned 50 wins
    assert plan_interval(ModelInputs(12, 27, reply_ms=1, release_offset_ms=34), pol).reason == "rtt-aligned"


def test_a_short_interval_is_judged_with_the_slack_the_alignment_leaves():
    """The lab at 10 ms RTT, 16 connections, COLO: releases ~15.5 ms into the epoch (offset + 2
    deviations), replies 2.5 ms, the 20 ms floor. Ready at ~18 ms is inside the floor, but not by
    the 3 ms the alignment itself asks for: part of the replies missed and each request took two
    cycles (372 ops/s, p50 48 ms, against 486 at a fixed 25 ms). Counted as two cycles, the
    alignment clearly pays and is taken."""
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=500, latency_budget_ms=150, max_pause_share=0.4)
    lab = ModelInputs(4.5, 11.4, 12.5e6, 1700, 22, reply_ms=2.5, release_offset_ms=15.5)
    plan = plan_interval(lab, pol)
    assert plan.reason == "rtt-aligned" and plan.interval_ms > 20, plan
    assert plan.interval_ms == pytest.approx(aligned_interval(lab))
    # replies that leave the full slack inside the floor: one cycle there, no alignment
    fits = ModelInputs(4.5, 11.4, 12.5e6, 1700, 22, reply_ms=0.5, release_offset_ms=13)
    assert plan_interval(fits, pol).reason == "min-interval"


def test_silence_forgets_the_reply_time():
    pol = PacerPolicy(min_interval_ms=5, max_interval_ms=1000, latency_budget_ms=1e6, max_pause_share=0.9)
    p = Pacer(pol, 20)
    for _ in range(200):
        p.update(closed_loop(p.interval_ms, 20, 70, 5))
    assert p.last.reason == "rtt-aligned"
    for _ in range(200):
        p.update(EpochSample(p.interval_ms, 20, 0, 0, 50, 0, 1e9, 1, release_offset_ms=50, quiet_ms=None))
    assert p.last.reason == "rtt-optimum"


# ---------------------------------------------------------------------------- the pacer's RTT input


def queued_link(channel_rtt: float, path_rtt: float, path_var: float = 0.0, seconds: float = 5.0) -> LinkStats:
    """A link whose heartbeats come back after `channel_rtt` (they wait behind checkpoint frames)
    while TCP measures `path_rtt`: samples every 100 ms for `seconds`."""
    link = LinkStats()
    for k in range(int(seconds * 10)):
        link.add_rtt(channel_rtt, now=k / 10)
        link.add_tcp_info(TcpInfo(state=1, rto_us=200_000, snd_mss=1448, unacked=0, rtt_us=int(path_rtt * 1000),
                                  rttvar_us=int(path_var * 1000)), now=k / 10)
    return link


def paced(link: LinkStats, epochs: int = 200, pause: float = 25.0) -> tuple[Pacer, list]:
    """The interval a pacer settles on when every epoch's sample is built from `link`."""
    pacer = Pacer(PacerPolicy(min_interval_ms=10, max_interval_ms=1000, latency_budget_ms=150, max_pause_share=0.5),
                  100)
    alarms = []
    for n in range(epochs):
        rec = EpochRecord(n + 1, pause, 100, 1 << 20, int(2e5 * (pacer.interval_ms / 100) ** ALPHA), 600_000, 0.0,
                          pacer.interval_ms)
        d = pacer.update(pacer_sample(rec, link, in_flight=1))
        alarms += [d.infeasible] if d.infeasible else []
    return pacer, alarms


def test_the_pacer_paces_for_the_path_not_for_the_channels_queue():
    """The lab's case: heartbeats queue behind checkpoint frames to 100 ms on a 1 ms path. The
    pacer must choose what it chooses for a clean 1 ms link, and raise no budget alarm."""
    queued, alarms = paced(queued_link(channel_rtt=100.0, path_rtt=1.0))
    clean, _ = paced(queued_link(channel_rtt=1.0, path_rtt=1.0))
    assert queued.interval_ms == pytest.approx(clean.interval_ms, rel=1e-9)
    assert queued.last.reason == "rtt-optimum" and alarms == []
    assert "RTT 1.0 ms" in queued.last.detail
    # and the case discriminates: on a real 100 ms path the budget cannot be met (the lab's alarm)
    wan, wan_alarms = paced(queued_link(channel_rtt=100.0, path_rtt=100.0, path_var=5.0))
    assert abs(wan.interval_ms - clean.interval_ms) > 5 and wan_alarms


def test_the_path_rtt_adds_its_own_variance_not_the_queues():
    link = queued_link(channel_rtt=100.0, path_rtt=20.0, path_var=2.0)
    assert link.pacer_rtt() == (20.0, 2.0)
    s = pacer_sample(EpochRecord(1, 10.0, 1, 4096, 4096, 0, 0.0, 50.0), link, in_flight=0)
    assert (s.rtt_ms, s.rtt_var_ms) == (20.0, 2.0)


def test_the_path_rtt_is_the_floor_of_a_window():
    link = LinkStats()
    info = lambda rtt_ms, var_ms=0.5: TcpInfo(1, 200_000, 1448, 0, int(rtt_ms * 1000), int(var_ms * 1000))  # noqa: E731
    for k, rtt in enumerate([5.0, 40.0, 1.0, 30.0, 2.0]):  # a queue builds and drains
        link.add_tcp_info(info(rtt), now=k)
    assert link.pacer_rtt() == (1.0, 0.5) and link.path_source == "tcp_info"
    for k in range(5, 30):  # the path got longer: the old floor leaves with the window
        link.add_tcp_info(info(25.0, 3.0), now=k)
    assert link.pacer_rtt() == (25.0, 3.0)
    link.add_tcp_info(info(0.0), now=31)  # TCP has timed nothing yet: not a sample
    assert link.pacer_rtt() == (25.0, 3.0)
    assert link.as_dict()["path_rtt_ms"] == 25.0


def test_without_tcp_info_the_path_rtt_is_the_floor_of_the_heartbeats():
    link = LinkStats()
    assert link.pacer_rtt() == (0.0, 0.0) and link.path_source is None
    for k, rtt in enumerate([90.0, 1.5, 120.0, 100.0]):
        link.add_rtt(rtt, now=k)
    assert link.pacer_rtt() == (1.5, 0.0) and link.path_source == "heartbeat-floor"
    assert link.rtt_ms > 50  # the channel's EWMA (failure detection) keeps the queue in it
    d = link.as_dict()
    assert (d["path_rtt_ms"], d["path_rtt_source"], d["rtt_ms"]) == (1.5, "heartbeat-floor", round(link.rtt_ms, 3))


def test_the_bandwidth_takes_the_path_rtt_off_the_ack_time():
    """A 1 MiB checkpoint acked 51 ms after it was sent over a 1 ms path: 50 ms of transfer, even
    when the heartbeats (queued behind it) say 100 ms."""
    link = queued_link(channel_rtt=100.0, path_rtt=1.0)
    link.add_transfer(1 << 20, 0.051)
    assert link.bandwidth_bps == pytest.approx((1 << 20) / 0.050)


# ---------------------------------------------------------------- idle lengthening and the wake-up

def quiet(interval, output: bool, pause=10.0, rtt=1.0):
    """A steady epoch at `interval`; `output`: the gate held a frame in it (a quiet tail)."""
    s = steady(interval, pause, 2e5, rtt)
    return EpochSample(s.interval_ms, s.pause_ms, s.dirty_bytes, s.wire_bytes, s.rtt_ms, s.rtt_var_ms,
                       s.bandwidth_bytes_per_s, s.in_flight, release_offset_ms=10.0 if output else None,
                       quiet_ms=1.0 if output else None, reply_ms=max(interval - 11.0, 0.0) if output else None)


IDLE_POL = PacerPolicy(min_interval_ms=10, max_interval_ms=1000, latency_budget_ms=500, max_pause_share=0.3,
                       idle_interval_ms=300)


@settings(max_examples=60)
@given(st.floats(2, 40), st.floats(100, 900), st.integers(0, 80))
def test_idle_epochs_lengthen_by_bounded_steps_up_to_the_bound_and_not_beyond(pause, idle, n):
    pol = PacerPolicy(min_interval_ms=10, max_interval_ms=600, latency_budget_ms=500, max_pause_share=0.3,
                      idle_interval_ms=idle)
    p = Pacer(pol, 40)
    for _ in range(30):  # settle with output: the latency-driven interval
        p.update(quiet(p.interval_ms, True, pause))
    target = p.interval_ms
    prev = target
    bound = min(idle, 600)
    for _ in range(n + 40):
        d = p.update(quiet(p.interval_ms, False, pause))
        assert d.interval_ms <= prev * pol.max_step * (1 + 1e-9)
        if d.reason == "idle":  # toward the bound: up by steps, or down by steps from an aligned interval above it
            assert min(prev, bound) - 1e-9 <= d.interval_ms <= max(bound, prev) + 1e-9
        prev = d.interval_ms
    if bound > target * 1.01:
        assert d.reason == "idle" and d.interval_ms == pytest.approx(bound)


def test_one_epoch_with_output_drops_back_to_the_target_at_once():
    p = Pacer(IDLE_POL, 40)
    for _ in range(30):
        p.update(quiet(p.interval_ms, True))
    target = p.interval_ms
    for _ in range(40):
        p.update(quiet(p.interval_ms, False))
    assert p.interval_ms == pytest.approx(300) and p.last.reason == "idle"
    assert p.last.expected_latency_ms < 100  # judged at the target: the first output wakes the epoch
    d = p.update(quiet(20.0, True))  # the woken epoch: short, with output
    assert d.reason != "idle" and d.interval_ms == pytest.approx(p.latency_target_ms)
    assert d.interval_ms < 300 / IDLE_POL.max_step and d.interval_ms < 1.5 * target  # not one step down: all
    assert p.wake_at(1.0) is None  # back at the target: epochs end as planned


def test_the_first_idle_epochs_keep_the_target():
    p = Pacer(IDLE_POL, 40)
    for _ in range(30):
        p.update(quiet(p.interval_ms, True))
    target = p.interval_ms
    for _ in range(2):  # fewer than IDLE_EPOCHS in a row
        assert p.update(quiet(p.interval_ms, False)).reason != "idle"
    assert p.interval_ms == pytest.approx(target, rel=0.03)  # the transfer estimate moves a little
    assert p.update(quiet(p.interval_ms, False)).reason == "idle"


@given(policies, st.lists(st.tuples(samples, st.booleans()), min_size=1, max_size=60))
def test_disabled_idle_lengthening_keeps_todays_behaviour_exactly(policy, seq):
    """idle_interval_ms = 0, or not above the target: the same decisions as a pacer without it."""
    from dataclasses import replace
    off = Pacer(policy)
    low = Pacer(replace(policy, idle_interval_ms=policy.min_interval_ms))  # never above the plan
    for s, out in seq:
        s = replace(s, quiet_ms=1.0 if out else None, release_offset_ms=5.0 if out else None,
                    reply_ms=1.0 if out else None)
        a, b = off.update(s), low.update(s)
        assert a == b and a.reason != "idle"
        assert off.wake_at(0.0) is None


@given(st.floats(0, 2000), st.floats(1, 2000), st.floats(1, 2000), st.floats(0, 2000), st.floats(0, 20))
def test_the_wake_up_respects_the_floor_and_the_interval(first, interval, target, floor, batch):
    at = wake_at(first, interval, target, floor, batch)
    if interval <= target:
        assert at is None
        return
    assert at is not None and at <= interval
    assert at >= min(floor, interval)  # never before the pause-share (hard) floor
    assert at >= min(first + batch, interval)  # the rest of the reply may join the first frame
    if first + batch <= interval and floor <= first + batch:
        assert at == pytest.approx(first + batch)


def test_the_pacers_wake_up_uses_the_pause_share_floor():
    pol = PacerPolicy(min_interval_ms=5, max_interval_ms=1000, latency_budget_ms=500, max_pause_share=0.25,
                      idle_interval_ms=400)
    p = Pacer(pol, 100)
    for _ in range(60):
        p.update(quiet(p.interval_ms, False, pause=30.0))
    assert p.last.reason == "idle" and p.interval_ms == pytest.approx(400)
    floor = hard_floors(ModelInputs(30.0, 1.0), pol)["pause-share"]  # 90 ms
    assert p.floor_ms == pytest.approx(floor, rel=0.01)
    assert p.wake_at(2.0) == pytest.approx(p.floor_ms)  # an early reply waits for the floor
    assert p.wake_at(200.0) == pytest.approx(200.0 + WAKE_BATCH_MS)
    assert p.wake_at(399.0) == pytest.approx(400.0)


def test_idle_keeps_the_hard_limits():
    """A pause-share floor above the idle bound still decides."""
    pol = PacerPolicy(min_interval_ms=5, max_interval_ms=1000, latency_budget_ms=500, max_pause_share=0.1,
                      idle_interval_ms=100)
    p = Pacer(pol, 100)
    for _ in range(60):
        d = p.update(quiet(p.interval_ms, False, pause=30.0))  # pause share 10 %: 270 ms at least
    assert d.reason == "pause-share" and p.interval_ms == pytest.approx(270, rel=0.01)


def test_idle_never_goes_above_max_interval():
    pol = PacerPolicy(min_interval_ms=5, max_interval_ms=150, latency_budget_ms=500, idle_interval_ms=400)
    p = Pacer(pol, 40)
    for _ in range(60):
        d = p.update(quiet(p.interval_ms, False))
    assert d.reason == "idle" and p.interval_ms == pytest.approx(150)


def test_an_ack_due_now_is_not_a_backlog():
    """Pipelining by acks: at a 25 ms RTT with an interval a little longer than the ack time, the
    sample (taken right after a checkpoint is sent) often still counts the previous checkpoint,
    whose ack is due. That is not a queue: the interval must not climb."""
    pol = PacerPolicy(min_interval_ms=20, max_interval_ms=1000, max_in_flight=2, latency_budget_ms=1000)
    p = Pacer(pol, 40)
    for i in range(40):
        d = p.update(steady(p.interval_ms, pause=5, rtt=25, bw=1e9, in_flight=2 if i % 2 else 1))
        assert d.reason != "queued" and p.interval_ms <= 40
