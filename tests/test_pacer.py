"""The pacer: bounds, bounded steps, convergence, back-off, and one clear infeasibility report."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st

from replication.pacer import ALPHA, EpochSample, Pacer, PacerPolicy

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
    assert d.reason.startswith("checkpoints queued")


def test_pause_share_sets_the_floor():
    pol = PacerPolicy(min_interval_ms=10, max_interval_ms=1000, max_pause_share=0.2, latency_budget_ms=1000)
    p = Pacer(pol, 10)
    for _ in range(100):
        d = p.update(steady(p.interval_ms, pause=20, wire_at_100=1e4))
    # pause 20 ms at share 0.2 needs interval >= 80 ms
    assert 79 <= p.interval_ms <= 82 and d.reason == "pause share"


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
    # transfer(i) = (i/100)^0.7 s must fit in i/1.25: i >= ~1.29 s
    assert p.interval_ms > 1000 and d.reason.startswith("link bandwidth")


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
    assert p.interval_ms < 30 and not d.reason.startswith("checkpoints queued")


def test_the_optimum_is_the_maximum_of_the_modelled_rate():
    from replication.pacer import throughput_optimum

    for pause, w in ((5.0, 1.0), (25.0, 1.0), (25.0, 50.0), (40.0, 200.0)):
        best = throughput_optimum(pause, w)
        rate = lambda i: i / ((i + pause) * (i / 2 + pause + w))  # noqa: E731
        grid = [best * f for f in (0.5, 0.8, 0.95, 1.05, 1.25, 2.0)]
        assert all(rate(best) >= rate(i) for i in grid), (pause, w)


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
        assert p.last.reason.startswith("throughput optimum")
    assert ivs[1] > ivs[0] * 1.05
