"""The outcome trial (pure): a hill climb on the interval, each step the centre against its
neighbours, judged by the frames the gate passed per second in segments taken in turn. A simulated
load whose frame rate depends on the interval stands in for the clients."""

from __future__ import annotations

import random

from replication.pacer import (TRIAL_FACTORS, TRIAL_FIRST_S, TRIAL_HOLD_S, TRIAL_MIN_RATE, TRIAL_RATE_WINDOW_S,
                               TRIAL_ROUNDS, TRIAL_SEGMENT_S, EpochSample, ModelInputs, OutcomeTrial, Pacer,
                               PacerPolicy, rtt_optimum)

# the first whole trial (both neighbours) after a start, seconds; and a trial that goes on the way
# the last one moved (the centre and one neighbour)
TRIAL = max(TRIAL_RATE_WINDOW_S, TRIAL_FIRST_S) + TRIAL_ROUNDS * len(TRIAL_FACTORS) * TRIAL_SEGMENT_S
ONWARD = TRIAL_ROUNDS * 2 * TRIAL_SEGMENT_S


def near(a, b) -> bool:
    return a is not None and abs(a - b) < 1e-6


def run(trial: OutcomeTrial, rate, plan=30.0, lo=20.0, hi=200.0, seconds=10.0, t0=None, noise=0.0, seed=1):
    """Steps the trial epoch by epoch for `seconds`; `rate(interval)` frames per second come in;
    `plan` is the model's, or a function of the epoch's number giving it. Without `t0`, the run
    goes on from the trial's last step (the same counter, no gap)."""
    rnd = random.Random(seed)
    if t0 is not None or trial._last is None:
        now, frames = t0 or 0.0, 0
    else:
        now, frames = trial._last[0] + 0.05, trial._last[1]
    t0, iv, seen, n = now, None, [], 0
    while now < t0 + seconds:
        iv = trial.step(now, int(frames), plan(n) if callable(plan) else plan, lo, hi)
        seen.append(iv)
        dt = (iv + 5.0) / 1000
        frames += rate(iv) * dt * (1 + noise * rnd.uniform(-1, 1))
        now, n = now + dt, n + 1
    return iv, seen


def test_a_better_neighbour_becomes_the_interval_and_the_climb_goes_on_that_way():
    t = OutcomeTrial()
    best = 45.0
    iv, seen = run(t, lambda i: 1000 - 20 * abs(i - best), seconds=TRIAL + 0.5)
    assert near(t.choice, 37.5), t.summary
    assert {round(x, 1) for x in seen} >= {24.0, 30.0, 37.5}  # all three ran
    iv, seen = run(t, lambda i: 1000 - 20 * abs(i - best), seconds=2 * ONWARD + 0.5)
    # on at once, the centre against the next step up only: 46.9 won, 58.6 did not
    assert abs(iv - 46.875) < 1e-6 and "kept 46.9 ms" in t.summary, t.summary
    assert near(min(seen), 37.5) and round(max(seen), 1) == 58.6
    iv, seen = run(t, lambda i: 1000 - 20 * abs(i - best), seconds=TRIAL_HOLD_S - 1)
    assert all(near(x, 46.875) for x in seen)  # a centre that held its own stands


def test_a_flat_or_noisy_outcome_keeps_the_plan():
    t = OutcomeTrial()
    iv, _ = run(t, lambda i: 1000.0, seconds=TRIAL + 0.5)
    assert near(t.choice, 30.0) and iv == 30.0 and "kept 30.0 ms" in t.summary
    t = OutcomeTrial()  # 2 % apart: under the gain asked for
    iv, _ = run(t, lambda i: 1000.0 + (20 if i > 30 else 0), seconds=TRIAL + 0.5, noise=0.01)
    assert near(t.choice, 30.0) and iv == 30.0, t.summary


def test_noise_rarely_moves_the_interval_and_a_real_gain_does():
    """Per-epoch counts spread ±60 %: an outcome that does not depend on the interval moves it in
    few trials; a 10 % gain under ±30 % is found in most."""
    def moved(rate, noise, want):
        n = 0
        for seed in range(100):
            t = OutcomeTrial()
            run(t, rate, seconds=TRIAL + 0.5, noise=noise, seed=seed)
            n += near(t.choice, want)
        return n / 100
    assert moved(lambda i: 1000.0, 0.6, 30.0) >= 0.85
    assert moved(lambda i: 1000.0 * (1.1 if i > 30 else 1.0), 0.3, 37.5) >= 0.6


def test_the_limits_clamp_the_candidates_and_leave_nothing_to_try_when_they_meet():
    t = OutcomeTrial()
    iv, seen = run(t, lambda i: 1000 + 100 * i, plan=20.0, lo=20.0, hi=22.0, seconds=TRIAL + 0.5)
    assert set(seen) == {20.0, 22.0} and iv == 22.0  # 25 ms clamped to the budget's 22, 16 to the floor
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
    """Chosen at the floor (its lower neighbour clamped to it, so the climb stops there), the next
    trial still tries longer, and climbs that way when longer wins."""
    t = OutcomeTrial()
    run(t, lambda i: 3000 - 50 * i, plan=22.0, lo=20.0, seconds=TRIAL + 0.5)
    assert near(t.choice, 20.0), t.summary  # 17.6 ms clamped to 20: what ran
    iv, seen = run(t, lambda i: 1000 + 50 * i, plan=22.0, lo=20.0, seconds=TRIAL_HOLD_S + TRIAL)
    assert t.choice >= 25.0 - 1e-6 and min(seen) == 20.0, t.summary  # and on up


def test_the_climb_stops_at_the_edge_of_the_factor_range():
    """Longer keeps winning: the climb goes up to twice the plan, tries nothing past it, and holds."""
    t = OutcomeTrial()
    iv, seen = run(t, lambda i: 1000 + 30 * i, plan=30.0, seconds=TRIAL + 4 * ONWARD + 1)
    assert max(seen) <= 60.0 + 1e-9 and t.choice > 58 and not t.trying, t.summary  # the last step: under 5 %
    held, left = t.choice, t._next_at - t._last[0]
    assert left > 5
    iv, seen = run(t, lambda i: 1000 + 30 * i, plan=30.0, seconds=left - 0.5)
    assert all(near(x, held) for x in seen)  # the kept interval stands until the hold is over


def test_a_plan_that_flips_epoch_by_epoch_does_not_move_the_climb():
    """At many connections the model's plan flips between the floor and an alignment; the trials
    centre on the smoothed plan times the factor, so the climb still reaches the floor when shorter
    wins."""
    t = OutcomeTrial()
    iv, seen = run(t, lambda i: 3000 - 50 * i, plan=lambda n: 31.0 if n % 6 < 3 else 20.0, lo=20.0,
                   seconds=TRIAL + 2 * ONWARD + 1)
    assert iv <= 21.5 and t.choice <= 21.5, t.summary


def test_a_plan_that_moved_for_good_starts_the_climb_again():
    """The smoothed plan doubled (the RTT grew): the choice made at the old plan is forgotten and
    the next trial centres on the new plan."""
    t = OutcomeTrial()
    run(t, lambda i: 1000.0, plan=30.0, seconds=TRIAL + 0.5)
    assert near(t.choice, 30.0)
    iv, seen = run(t, lambda i: 1000.0, plan=60.0, seconds=4.0)
    assert seen[0] < 31 and max(seen) > 50 and t.trying and t.factor == 1.0


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


def test_too_few_frames_leave_the_model_alone_and_forget_the_choice():
    """One slow client passes too few frames for a trial: none runs, and a choice made under a
    heavier load is forgotten. A gap in the samples forgets it as well."""
    t = OutcomeTrial()
    run(t, lambda i: 1000 + 20 * i, seconds=TRIAL + 0.5)
    assert near(t.choice, 37.5)
    now, frames = t._last
    seen = []
    for _ in range(100):  # the same load's counter goes on, at 100 frames/s: no gap
        now += 0.05
        frames += 5
        seen.append(t.step(now, frames, 30.0, 20.0, 200.0))
    assert seen[0] != 30.0 and set(seen[-60:]) == {30.0} and t.choice is None and t.rate < TRIAL_MIN_RATE
    iv, seen = run(t, lambda i: 1000.0, seconds=TRIAL_FIRST_S - 0.1)
    assert set(seen) == {30.0} and not t.trying  # the load grew: the first trial waits as after a gap
    run(t, lambda i: 1000.0, seconds=TRIAL_RATE_WINDOW_S + 0.3)
    assert t.trying
    t = OutcomeTrial()
    run(t, lambda i: 1000 + 20 * i, seconds=TRIAL + 0.5)
    assert near(t.choice, 37.5) and t.step(t._last[0] + 5, t._last[1] + 10, 30.0, 20.0, 200.0) == 30.0
    assert t.choice is None


def test_a_light_load_is_paced_for_its_wait_alone():
    """Under TRIAL_MIN_RATE frames/s coming in, the guest's running share does not bound what the
    clients get: the model asks for the shortest interval the hard limits allow, not the optimum
    that trades the pause's share against the wait; a heavier load gets the optimum back."""
    pol = PacerPolicy(min_interval_ms=10, latency_budget_ms=1000, max_pause_share=0.4)
    s = dict(pause_ms=8.0, dirty_bytes=1 << 20, wire_bytes=1 << 16, rtt_ms=25.0, bandwidth_bytes_per_s=1e8)

    def paced(per_s: float, seconds: float = 5.0):
        p, now, frames = Pacer(pol, 30.0), 0.0, 0
        while now < seconds:
            d = p.update(EpochSample(interval_ms=p.interval_ms, now_s=now, frames=int(frames), **s))
            dt = (p.interval_ms + 8) / 1000
            frames += per_s * dt
            now += dt
        return d
    light = paced(30.0)
    assert light.reason == "pause-share" and abs(light.interval_ms - 12.0) < 0.5, light  # 8 ms x 0.6/0.4
    assert "a light load" in light.detail
    heavy = paced(1000.0, seconds=2.5)  # before the first trial (3 s): the model's own plan
    assert heavy.reason == "rtt-optimum" and heavy.interval_ms > 20, heavy
    assert abs(rtt_optimum(ModelInputs(pause_ms=8.0, rtt_ms=25.0, light=True))) == 0.0
