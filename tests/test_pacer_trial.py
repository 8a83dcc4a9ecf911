"""The outcome trial (pure): the plan's interval against its neighbours, judged by the frames the
gate passed per second in segments taken in turn. A simulated load whose frame rate depends on the
interval stands in for the clients."""

from __future__ import annotations

import random

from replication.pacer import (TRIAL_FACTORS, TRIAL_HOLD_S, TRIAL_MIN_RATE, TRIAL_RATE_WINDOW_S, TRIAL_ROUNDS,
                               TRIAL_SEGMENT_S, EpochSample, OutcomeTrial, Pacer, PacerPolicy)

# one whole trial after the first window of the frame rate, seconds
TRIAL = TRIAL_RATE_WINDOW_S + TRIAL_ROUNDS * len(TRIAL_FACTORS) * TRIAL_SEGMENT_S


def run(trial: OutcomeTrial, rate, plan=30.0, lo=20.0, hi=200.0, seconds=10.0, t0=None, noise=0.0, seed=1):
    """Steps the trial epoch by epoch for `seconds`; `rate(interval)` frames per second come in.
    Without `t0`, the run goes on from the trial's last step (the same counter, no gap)."""
    rnd = random.Random(seed)
    if t0 is not None or trial._last is None:
        now, frames = t0 or 0.0, 0
    else:
        now, frames = trial._last[0] + 0.05, trial._last[1]
    t0, iv, seen = now, plan, []
    while now < t0 + seconds:
        iv = trial.step(now, int(frames), plan, lo, hi)
        seen.append(iv)
        dt = (iv + 5.0) / 1000
        frames += rate(iv) * dt * (1 + noise * rnd.uniform(-1, 1))
        now += dt
    return iv, seen


def test_a_better_neighbour_becomes_the_interval_and_the_next_trial_goes_on_from_it():
    t = OutcomeTrial()
    best = 45.0
    iv, seen = run(t, lambda i: 1000 - 20 * abs(i - best), seconds=TRIAL + 1)
    assert t.factor == 1.25 and abs(iv - 37.5) < 1e-9, t.summary
    assert {round(x, 1) for x in seen} >= {24.0, 30.0, 37.5}  # all three ran
    iv, _ = run(t, lambda i: 1000 - 20 * abs(i - best), seconds=2 * TRIAL_HOLD_S + 2 * TRIAL)
    assert abs(iv - 46.875) < 1e-6 and "kept 46.9 ms" in t.summary, t.summary  # climbed, then stayed


def test_a_flat_or_noisy_outcome_keeps_the_plan():
    t = OutcomeTrial()
    iv, _ = run(t, lambda i: 1000.0, seconds=TRIAL + 0.5)
    assert t.factor == 1.0 and iv == 30.0 and "kept 30.0 ms" in t.summary
    t = OutcomeTrial()  # 2 % apart: under the gain asked for
    iv, _ = run(t, lambda i: 1000.0 + (20 if i > 30 else 0), seconds=TRIAL + 0.5, noise=0.01)
    assert t.factor == 1.0 and iv == 30.0, t.summary


def test_noise_rarely_moves_the_interval_and_a_real_gain_does():
    """Per-epoch counts spread ±60 %: an outcome that does not depend on the interval moves it in
    few trials (each move lasts one hold); a 10 % gain under ±30 % is found in most."""
    def moved(rate, noise, want):
        n = 0
        for seed in range(100):
            t = OutcomeTrial()
            run(t, rate, seconds=TRIAL + 0.5, noise=noise, seed=seed)
            n += t.factor == want
        return n / 100
    assert moved(lambda i: 1000.0, 0.6, 1.0) >= 0.85
    assert moved(lambda i: 1000.0 * (1.1 if i > 30 else 1.0), 0.3, 1.25) >= 0.6


def test_the_limits_clamp_the_candidates_and_leave_nothing_to_try_when_they_meet():
    t = OutcomeTrial()
    iv, seen = run(t, lambda i: 1000 + 100 * i, plan=20.0, lo=20.0, hi=22.0, seconds=TRIAL + 0.5)
    assert min(seen) >= 20.0 and max(seen) <= 22.0 and iv == 22.0  # 25 ms clamped to the budget's 22
    t = OutcomeTrial()
    iv, seen = run(t, lambda i: 1000 + 10 * i, plan=20.0, lo=20.0, hi=20.0, seconds=TRIAL)
    assert set(seen) == {20.0} and not t.summary


def test_the_pacer_tries_only_with_a_counter_and_reports_it():
    pol = PacerPolicy(min_interval_ms=10, latency_budget_ms=1000)
    p = Pacer(pol, 40.0)
    s = dict(pause_ms=8.0, dirty_bytes=1 << 20, wire_bytes=1 << 18, rtt_ms=10.0, bandwidth_bytes_per_s=1e8)
    reasons, now, frames = set(), 0.0, 0
    for _ in range(400):
        d = p.update(EpochSample(interval_ms=p.interval_ms, now_s=now, frames=frames, **s))
        reasons.add(d.reason)
        dt = (p.interval_ms + 8) / 1000
        frames += int((1000 + 20 * p.interval_ms) * dt)  # the rate grows with the interval: longer wins
        now += dt
    assert "trying" in reasons and "measured" in reasons and "tried" in d.detail
    q = Pacer(pol, 40.0)
    for _ in range(400):
        d = q.update(EpochSample(interval_ms=q.interval_ms, **s))
    assert d.reason not in ("trying", "measured") and "tried" not in d.detail


def test_a_choice_at_a_limit_leaves_the_other_side_to_try():
    """Chosen at the floor (its lower neighbour clamped to it), the next trial still tries longer."""
    t = OutcomeTrial()
    run(t, lambda i: 3000 - 50 * i, plan=22.0, lo=20.0, seconds=TRIAL + 0.5)
    assert abs(t.factor - 20 / 22) < 1e-9, t.summary  # 17.6 ms clamped to 20: what ran
    iv, seen = run(t, lambda i: 1000 + 50 * i, plan=22.0, lo=20.0, seconds=TRIAL_HOLD_S + TRIAL)
    assert abs(max(seen) - 25.0) < 1e-9 and abs(iv - 25.0) < 1e-9, t.summary


def test_off_in_the_policy_the_model_alone_decides():
    pol = PacerPolicy(min_interval_ms=10, latency_budget_ms=1000, outcome_trial=False)
    p = Pacer(pol, 40.0)
    now, frames = 0.0, 0
    for _ in range(400):
        d = p.update(EpochSample(interval_ms=p.interval_ms, pause_ms=8.0, dirty_bytes=1 << 20, wire_bytes=1 << 18,
                                 rtt_ms=10.0, bandwidth_bytes_per_s=1e8, now_s=now, frames=frames))
        assert d.reason not in ("trying", "measured")
        dt = (p.interval_ms + 8) / 1000
        frames += int((1000 + 20 * p.interval_ms) * dt)
        now += dt


def test_too_few_frames_leave_the_model_alone_and_drop_the_factor():
    """One slow client passes too few frames for a trial: none runs, and a factor chosen under a
    heavier load goes back to 1. A gap in the samples forgets it as well."""
    t = OutcomeTrial()
    run(t, lambda i: 1000 + 20 * i, seconds=TRIAL + 0.5)
    assert t.factor == 1.25
    now, frames = t._last
    seen = []
    for _ in range(100):  # the same load's counter goes on, at 100 frames/s: no gap
        now += 0.05
        frames += 5
        seen.append(t.step(now, frames, 30.0, 20.0, 200.0))
    assert seen[0] == 37.5 and set(seen[-60:]) == {30.0} and t.factor == 1.0 and t.rate < TRIAL_MIN_RATE
    t = OutcomeTrial()
    run(t, lambda i: 1000 + 20 * i, seconds=TRIAL + 0.5)
    assert t.factor == 1.25 and t.step(t._last[0] + 5, t._last[1] + 10, 30.0, 20.0, 200.0) == 30.0
