"""The adaptive checkpoint interval (pure). The model and its reasoning: docs/pacer.md.

`plan_interval` is the model: from the pause, the RTT, the link's bandwidth, the guest's
wire bytes (its dirty rate after coalescing and compression) and, when clients wait on
output commit, how long the guest takes to answer what a release let through, it returns
the interval and the term that decided it (`Plan.reason`, one short word):

- ``rtt-optimum``: the interval that delivers the most requests per second to clients
  waiting on output commit (`rtt_optimum`: it grows with the pause and the RTT; for a light
  load, under 200 frames/s coming in, the shortest: the guest's share does not bound it);
- ``rtt-aligned``: longer, so that the replies to what a release let through (they start
  coming an RTT + transfer after the epoch began, or as late as releases were measured to come)
  are out before the epoch ends; one that misses waits a whole extra epoch. All or nothing: not
  when it is out of reach (past twice the interval without it, or past the latency budget), when
  one aligned cycle would not serve a request 15 % faster than the cycles at the shorter
  interval, nor 5 % faster than a request at a random moment of its epochs (many connections
  fall out of step with the releases);
- ``latency-budget``: shortened to keep interval + pause + transfer + RTT in the budget;
- ``min-interval``, ``pause-share``, ``bandwidth``, ``wan-ceiling``: raised to a hard limit;
- ``hard-max``: capped at the longest interval allowed;
- ``idle``: lengthened toward `idle_interval_ms` because the guest sent nothing for a few epochs
  (nobody waits on output commit; the throughput of a disk- or CPU-bound guest gains). The
  epoch loop ends such a long epoch early once the gate holds output (`wake_at`), and the
  first output drops the interval back to the latency-driven target at once.

- ``trying``, ``measured``: an outcome trial runs, or its choice (a factor on the smoothed
  plan) is in force: `OutcomeTrial` climbs from the plan's interval by 0.8x / 1.25x steps,
  judged by the frames per second coming in through the gate in segments taken in turn (only
  at 200 frames/s or more).

`Pacer` is the stateful edge: it smooths what each epoch measured (the reply time and the
releases' offset come from the gate, measured on its own clock), adds the back-off for real
backlogs (``queued``), moves toward the plan by bounded steps, and reports an infeasible latency
budget once, with numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALPHA = 0.7  # wire bytes per epoch grow ~ interval^ALPHA (overwrites coalesce)
HEADROOM = 1.25  # a checkpoint's transfer must take at most interval/HEADROOM
ALIGN_SLACK = 0.1  # the aligned interval leaves this share of the reply round trip spare ...
ALIGN_MIN_SLACK_MS = 3.0  # ... and at least this much
ALIGN_MAX_FACTOR = 2.0  # an alignment past this multiple of the interval without it is out of reach: none
SILENT_EPOCHS = 10  # epochs without output after which the measured reply time is forgotten
IDLE_EPOCHS = 3  # epochs in a row without output after which the interval may lengthen (``idle``)
WAKE_BATCH_MS = 3.0  # an idle epoch woken by output ends this long after its first held frame
CUT_OFF_MS = 1.0  # output this close to the pause may have been cut off by it
ALIGN_MARGIN = 0.15  # an aligned cycle must serve a request this much faster than the shorter interval's cycles
SPREAD_MARGIN = 0.05  # ... and this much faster than a request at a random moment of the shorter interval's epochs

# the outcome trial (`OutcomeTrial`): the model's plan against its neighbours, judged by what the
# clients got (frames through the gate per second) in segments taken in turn
TRIAL_FACTORS = (1 / 1.25, 1.0, 1.25)  # the neighbours, as factors of the centre
TRIAL_SEGMENT_S = 0.6  # each candidate runs this long per round ...
TRIAL_SETTLE_S = 0.15  # ... of which the start is not counted (the interval steps there, the clients fall in)
TRIAL_ROUNDS = 4  # rounds, each candidate once per round, in rotated order
TRIAL_HOLD_S = 15.0  # a centre that held its own stands this long before the next trial (a move: at once)
TRIAL_MIN_GAIN = 0.05  # a neighbour must pass this share more frames than the centre, beyond the rounds' noise
TRIAL_GAP_S = 1.0  # samples further apart (fixed pacing in between, a stall): the climb starts over ...
TRIAL_FIRST_S = 3.0  # ... with a first trial this long after the gap (the pause and the plan settle)
TRIAL_FACTOR_RANGE = (0.5, 2.0)  # how far the trials may take the interval from the model's (smoothed) plan
TRIAL_PLAN_TAU_S = 3.0  # the plan is smoothed over this long (it flips epoch by epoch at many connections)
TRIAL_REPLAN = 1.5  # the smoothed plan moved by this factor since the choice: the climb starts over
TRIAL_MIN_RATE = 200.0  # frames per second coming in through the gate below which there is no trial (nor factor)
TRIAL_RATE_WINDOW_S = 1.0  # ... measured over windows this long
TRIAL_REASONS = ("min-interval", "pause-share", "rtt-optimum", "rtt-aligned", "latency-budget")

REASONS = ("min-interval", "pause-share", "bandwidth", "wan-ceiling", "rtt-optimum", "rtt-aligned",
           "latency-budget", "hard-max", "queued", "idle", "trying", "measured")


@dataclass(frozen=True)
class PacerPolicy:
    min_interval_ms: float = 20.0
    max_interval_ms: float = 1000.0
    latency_budget_ms: float = 200.0
    max_pause_share: float = 0.25
    max_wan_bytes_per_s: float = 0.0  # 0 = unlimited
    max_step: float = 1.25  # the interval changes by at most this factor per epoch
    max_in_flight: int = 2
    # the longest interval while the guest sends nothing (``idle``); 0, or not above the
    # latency-driven target, = off. Never above max_interval_ms.
    idle_interval_ms: float = 0.0
    # climb from the plan's interval by the frames coming in through the gate (`OutcomeTrial`)
    outcome_trial: bool = True

    def __post_init__(self):
        if not 0 < self.min_interval_ms <= self.max_interval_ms:
            raise ValueError("need 0 < min_interval_ms <= max_interval_ms")
        if not 0 < self.max_pause_share < 1:
            raise ValueError("max_pause_share must be between 0 and 1")
        if self.max_step <= 1:
            raise ValueError("max_step must be above 1")
        if self.idle_interval_ms < 0:
            raise ValueError("idle_interval_ms must be 0 (off) or positive")


@dataclass(frozen=True)
class ModelInputs:
    pause_ms: float
    rtt_ms: float  # the link's round trip (with a margin for its variance)
    bandwidth_bytes_per_s: float | None = None  # achieved on recent checkpoints; None/0 = transfer costs nothing
    wire_bytes_per_ms: float = 0.0  # wire bytes per ms of interval, measured at ref_interval_ms
    ref_interval_ms: float = 100.0
    reply_ms: float | None = None  # how long the guest answers a release's worth of clients; None = none seen
    # how far into the next epoch releases come (the guest's resume after the released epoch's
    # pause -> release; smoothed mean + twice its mean deviation): encode + RTT + transfer + the
    # standby's commit + jitter. None = not measured
    release_offset_ms: float | None = None
    # reply_ms is only a lower bound, just raised by replies the pause cut off: align without the
    # margin, where the whole reply is seen (the next plan judges with it)
    reply_at_least: bool = False
    # few requests come in (under TRIAL_MIN_RATE frames/s, measured by the outcome trial): the
    # guest's running share does not bound what its clients get, only their wait does
    light: bool = False

    def wire_bytes(self, interval_ms: float) -> float:
        r = max(self.ref_interval_ms, 1e-3)
        return self.wire_bytes_per_ms * r * (max(interval_ms, 0.0) / r) ** ALPHA

    def transfer_ms(self, interval_ms: float) -> float:
        bw = self.bandwidth_bytes_per_s
        return self.wire_bytes(interval_ms) / bw * 1000 if bw else 0.0


@dataclass(frozen=True)
class Plan:
    interval_ms: float
    reason: str  # one of REASONS
    detail: str  # the numbers behind it, for status and the log


def modelled_rate(interval_ms: float, inp: ModelInputs) -> float:
    """Requests per ms one client waiting on output commit gets at this interval (up to a constant):
    it waits on average interval/2 + pause + transfer + RTT per request, and the guest runs
    interval/(interval + pause) of the time (which does not bound a light load: `light`)."""
    i, p = interval_ms, max(inp.pause_ms, 0.0)
    share = 1.0 if inp.light else i / (i + p)
    return share / (i / 2 + p + inp.transfer_ms(i) + max(inp.rtt_ms, 0.0))


def rtt_optimum(inp: ModelInputs) -> float:
    """The maximum of `modelled_rate`. With a free transfer it is i = sqrt(2·p·(p + RTT)); a transfer
    that grows as i^ALPHA moves it a little shorter, so it is found by bisection on the sign of the
    rate's log-derivative (positive below the maximum, negative above: the rate has one peak)."""
    p, rtt = max(inp.pause_ms, 0.0), max(inp.rtt_ms, 0.0)
    if p == 0:
        return 0.0  # no pause: every interval costs nothing, the shortest is best
    if inp.light:
        # A light load waits, it does not queue for the guest's running time: the latency term
        # alone, which the shortest interval minimises (one connection, COLO: at the optimum's
        # 27-41 ms adaptive served 0.89-1.03 x the best fixed interval at 1, 10 and 25 ms RTT)
        return 0.0

    def slope(i: float) -> float:
        t = inp.transfer_ms(i)
        return p / (i * (i + p)) - (0.5 + ALPHA * t / i) / (i / 2 + p + t + rtt)

    lo, hi = 1e-6, max(2 * (p + rtt) + 10, 1.0)
    while slope(hi) > 0:
        hi *= 2
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if slope(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-9 * hi:
            break
    return (lo + hi) / 2


def throughput_optimum(pause_ms: float, rtt_ms: float, transfer_ms: float = 0.0) -> float:
    """The closed form sqrt(2·p·(p + RTT + transfer)) for a transfer that does not depend on the
    interval (the earlier interface; `rtt_optimum` is the model's)."""
    p = max(pause_ms, 0.0)
    return (2 * p * (p + max(rtt_ms, 0.0) + max(transfer_ms, 0.0))) ** 0.5


def aligned_interval(inp: ModelInputs) -> float | None:
    """The shortest interval in which a client's next request, sent when its reply is released
    (RTT + transfer after the epoch began, or later: as late as the releases were measured to
    come), is answered before the epoch ends, with some slack."""
    if inp.reply_ms is None:
        return None
    rtt, reply, late = max(inp.rtt_ms, 0.0), max(inp.reply_ms, 0.0), max(inp.release_offset_ms or 0.0, 0.0)

    def need(i: float) -> float:
        w = max(rtt + inp.transfer_ms(i), late) + reply
        return w + max(ALIGN_MIN_SLACK_MS, ALIGN_SLACK * w)

    # need(i) grows as i^ALPHA: the smallest i with need(i) <= i, by doubling then bisection. On a
    # link too slow for any interval (transfer alone outgrows it) there is none; the bandwidth
    # floor then decides anyway, and the alignment asks for nothing.
    hi = max(need(0.0), 1.0)
    for _ in range(60):
        if need(hi) <= hi:
            break
        hi *= 2
    else:
        return None
    lo = need(0.0)
    for _ in range(100):
        mid = (lo + hi) / 2
        if need(mid) <= mid:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-9 * hi:
            break
    return hi


def hard_floors(inp: ModelInputs, policy: PacerPolicy) -> dict[str, float]:
    """The shortest interval each hard limit allows."""
    p = max(inp.pause_ms, 0.0)
    floors = {"min-interval": policy.min_interval_ms,
              "pause-share": p * (1 - policy.max_pause_share) / policy.max_pause_share}
    k = inp.transfer_ms(1.0)  # transfer(i) = k · i^ALPHA
    if k > 0:  # transfer(i) · HEADROOM <= i
        floors["bandwidth"] = (HEADROOM * k) ** (1 / (1 - ALPHA))
    if policy.max_wan_bytes_per_s and inp.wire_bytes_per_ms > 0:
        c = inp.wire_bytes(1.0) * 1000  # bytes/s at interval i = c · i^(ALPHA - 1)
        floors["wan-ceiling"] = (c / policy.max_wan_bytes_per_s) ** (1 / (1 - ALPHA))
    return floors


def plan_interval(inp: ModelInputs, policy: PacerPolicy) -> Plan:
    """The interval the model asks for and the term that decided it (see the module docstring)."""
    p, rtt = max(inp.pause_ms, 0.0), max(inp.rtt_ms, 0.0)
    best = rtt_optimum(inp)
    target, reason = best, "rtt-optimum"
    detail = f"pause {p:.1f} ms, RTT {rtt:.1f} ms, transfer {inp.transfer_ms(best):.1f} ms: optimum {best:.1f} ms"
    if inp.light:
        detail += " (a light load: the shortest)"
    aligned = aligned_interval(inp)
    # the interval the plan has without alignment: the optimum, or a hard floor above it
    floors = hard_floors(inp, policy)
    short = max(best, max(floors.values()))
    if aligned is not None and aligned > ALIGN_MAX_FACTOR * short:
        # Out of reach (a bulk sender that never goes quiet must not drag the interval up either).
        # Not capped there: an interval lengthened toward the alignment but short of it is the worst
        # place, two cycles per request of a longer epoch (the lab at 25 ms RTT, COLO: capped at
        # 31-37 ms for an alignment at 38-41 ms, releases fell in the pause, 16 connections got
        # 170-217 ops/s where the shortest interval served 259)
        detail += (f"; replies take {inp.reply_ms:.1f} ms after a release: aligned {aligned:.1f} ms is past "
                   f"{ALIGN_MAX_FACTOR:g}x {short:.1f} ms, not aligned")
        aligned = None
    if aligned is not None and aligned > best:
        # Worth it only if one cycle of the aligned interval clearly beats the cycles a request
        # takes at the shorter one (with a pause of a few ms, two cycles of a short interval
        # cost about one aligned cycle: the lab at 25 ms RTT with COLO). `start`: when the released
        # clients' next requests come (RTT + transfer, or as late as the releases were measured to come)
        start = max(rtt + inp.transfer_ms(aligned), inp.release_offset_ms or 0.0)
        ready = start + inp.reply_ms
        # the shorter interval is judged by the alignment's own standard: a request is served in a
        # cycle only with the same slack the alignment leaves (else the band short - slack < ready <=
        # short counted one cycle where part of the replies missed: two cycles each in the lab)
        need = ready + max(ALIGN_MIN_SLACK_MS, ALIGN_SLACK * ready)
        cycles = 1 + max(0, math.ceil((need - short) / (short + p)))
        if not inp.reply_at_least and (aligned + p) * (1 + ALIGN_MARGIN) > cycles * (short + p):
            detail += (f"; replies take {inp.reply_ms:.1f} ms after a release: aligned {aligned:.1f} ms "
                       f"({aligned + p:.0f} ms per request) serves no better than {cycles} cycles at {short:.1f} ms "
                       f"({cycles * (short + p):.0f} ms): not aligned")
            aligned = None
    if aligned is not None and aligned > best:  # (the block above set `start`)
        # Nor if the clients need not be in step: a request that comes at any moment of the shorter
        # interval's epochs waits half an interval on average, not whole cycles. Many connections the
        # guest answers one after another fall out of step at the shorter interval (their replies
        # leave in different epochs), so its epochs serve them as such; the aligned one serves a
        # request once the whole batch has been answered. Few connections gain from the alignment
        # (one connection at 25 ms RTT, COLO: aligned 36 ms served 1.07 x fixed 25 ms); many lose
        # (64 connections at 10 ms RTT: aligned 35-45 ms 0.89 x fixed 25 ms, fixed 20 ms best)
        spread = start + short / 2 + p
        # (a reply time known only as a lower bound decides this too: a longer one aligns later, and
        # the random moment does not move. Bypassed, it would align for an epoch each time a cut-off
        # reply raised the estimate: with the bypass, one run at 1 ms RTT / 64 connections had 26 ms
        # mean epochs under a 20 ms plan, 0.85 x fixed 20 ms)
        if (aligned + p) * (1 + SPREAD_MARGIN) > spread:
            detail += (f"; replies take {inp.reply_ms:.1f} ms after a release: aligned {aligned:.1f} ms "
                       f"({aligned + p:.0f} ms per request) serves no better than a request at any moment of "
                       f"{short:.1f} ms epochs ({spread:.0f} ms): not aligned")
            aligned = None
    if aligned is not None and aligned > best:
        target, reason = aligned, "rtt-aligned"
        detail += f"; replies take {inp.reply_ms:.1f} ms after a release: aligned {aligned:.1f} ms"
    cap = policy.latency_budget_ms - p - rtt - inp.transfer_ms(target)
    if reason == "rtt-aligned" and target > cap:  # short of the alignment: back to the optimum (above)
        target, reason = best, "rtt-optimum"
        detail += f"; budget {policy.latency_budget_ms:g} ms allows {cap:.1f} ms, short of it: not aligned"
        cap = policy.latency_budget_ms - p - rtt - inp.transfer_ms(target)
    if target > cap:
        target, reason = cap, "latency-budget"
        detail += f"; budget {policy.latency_budget_ms:g} ms allows {cap:.1f} ms"
    floor_reason = max(floors, key=floors.get)
    if floors[floor_reason] > target:
        target, reason = floors[floor_reason], floor_reason
        detail += f"; {floor_reason} needs {target:.1f} ms"
    if target > policy.max_interval_ms:
        target, reason = policy.max_interval_ms, "hard-max"
        detail += f"; capped at {policy.max_interval_ms:g} ms"
    return Plan(target, reason, detail)


def idle_plan(plan: Plan, policy: PacerPolicy, silent_epochs: int) -> Plan:
    """The plan while the guest sends nothing: after `IDLE_EPOCHS` epochs in a row without output,
    the interval may be as long as `idle_interval_ms` (at most `max_interval_ms`): nobody waits on
    output commit, so the latency terms ask for nothing and fewer pauses let the guest run. A hard
    limit that needs more still decides (the plan is only ever lengthened). Off (the plan as is)
    when `idle_interval_ms` is 0 or not above the plan."""
    bound = min(policy.idle_interval_ms, policy.max_interval_ms)
    if silent_epochs < IDLE_EPOCHS or bound <= plan.interval_ms:
        return plan
    return Plan(bound, "idle", plan.detail + f"; no output for {silent_epochs} epochs: up to {bound:g} ms")


def wake_at(first_held_ms: float, interval_ms: float, latency_target_ms: float, floor_ms: float,
            batch_ms: float = WAKE_BATCH_MS) -> float | None:
    """When (ms after the epoch began) an epoch that runs at `interval_ms` ends, now that the gate
    holds output whose first frame came `first_held_ms` into it: `batch_ms` after that frame (the
    rest of a reply joins it), but not before `floor_ms` (the hard limits: the guest runs at least
    the pause-share floor between two pauses) and not after the interval. None: the interval is not
    longer than the latency-driven target, so the epoch ends as planned (no wake-up)."""
    if interval_ms <= latency_target_ms:
        return None
    return min(interval_ms, max(first_held_ms + max(batch_ms, 0.0), floor_ms))


class OutcomeTrial:
    """The model's plan checked against what the clients get: a hill climb on a factor over the
    model's plan, smoothed over `TRIAL_PLAN_TAU_S` (at many connections the plan flips epoch by
    epoch between the floor and an alignment: the trials must not follow each flip). A trial runs
    the centre (the smoothed plan times the factor) and its neighbours (`TRIAL_FACTORS`), each
    `TRIAL_SEGMENT_S` at a time in rotated order for `TRIAL_ROUNDS` rounds, and counts the frames
    that came in through the gate in each segment after its first `TRIAL_SETTLE_S`. A neighbour
    through which `TRIAL_MIN_GAIN` more frames per second came than through the centre, and by more
    than twice the standard error of the rounds' differences, sets the factor, and the next trial
    follows at once, the new centre against the next step the same way; a centre that held its own
    stands `TRIAL_HOLD_S` before the next trial tries both sides again. Taken in turn, the segments
    share the machine's and the load's drift, which a comparison of rows does not.

    After a gap in the samples (adaptive pacing switched on again, a stall), or when the smoothed
    plan moved by `TRIAL_REPLAN` since the last choice (the RTT or the pause changed), the factor
    goes back to 1 and the climb starts again; after a gap only once `TRIAL_FIRST_S` have passed
    (the pause and the plan settle after the load or the pacing changed). The factor stays within
    `TRIAL_FACTOR_RANGE`.

    Only while at least `TRIAL_MIN_RATE` frames per second come in (over `TRIAL_RATE_WINDOW_S`
    windows): below it the factor goes back to 1 and the model alone decides (its plan as it is);
    above it again, the first trial waits `TRIAL_FIRST_S` as after a gap.

    Pure: the time and the frame counter come in with each step. `lo`/`hi`: the range the hard
    limits and the latency budget allow (candidates are clamped to it, and those the clamp makes
    equal run once: with fewer than two there is nothing to try)."""

    def __init__(self):
        self.factor = 1.0  # on the smoothed plan: what the trials chose
        self.summary = ""  # the last trial's figures, for the detail
        self._next_at: float | None = None  # when the next trial may start (None: at once)
        self._direction = 0  # the last move (-1 shorter, +1 longer): the next trial goes on that way
        self._splan = 0.0  # the plan, smoothed over TRIAL_PLAN_TAU_S
        self._splan_at_choice: float | None = None
        self._last: tuple[float, int] | None = None
        self._order: list[int] | None = None  # the running trial's segments (candidate indices)
        self._seg = 0
        self._seg_t0 = 0.0
        self._from: tuple[float, int] | None = None
        self._rounds: list[list[tuple[int, float]]] = []  # per candidate: (frames, seconds) of each segment
        self._window = (0.0, 0)  # the frame rate's window: its start and the counter there
        self.rate: float | None = None  # frames per second in the last whole window (None: none yet)
        self._cands: list[float] = []
        self._centre = 0

    @property
    def trying(self) -> bool:
        return self._order is not None

    @property
    def choice(self) -> float | None:
        """The interval the trials chose or kept, ms, at today's smoothed plan (None: none yet)."""
        return None if self._splan_at_choice is None else self._splan * self.factor

    def abort(self) -> None:
        self._order = None

    def light(self, now: float | None) -> bool:
        """Fewer than TRIAL_MIN_RATE frames per second came in over the last window, and that
        window is current (no gap since)."""
        return (now is not None and self.rate is not None and self.rate < TRIAL_MIN_RATE
                and self._last is not None and now - self._last[0] <= TRIAL_GAP_S)

    def _forget(self, next_at: float | None) -> None:
        self._order, self.factor, self._splan_at_choice = None, 1.0, None
        self._next_at, self._direction = next_at, 0

    def _clamp(self, ms: float, lo: float, hi: float) -> float:
        """Within the factor's range of the smoothed plan, then within the limits (which win)."""
        lo_f, hi_f = TRIAL_FACTOR_RANGE
        return min(max(min(max(ms, self._splan * lo_f), self._splan * hi_f), lo), hi)

    def step(self, now: float, frames: int, plan_ms: float, lo: float, hi: float) -> float:
        """The interval for the next epoch: a candidate while a trial runs, else the smoothed plan
        times the factor (the plan itself when no trial can run), clamped to lo..hi."""
        hi = max(hi, lo)
        gap = self._last is None or now - self._last[0] > TRIAL_GAP_S or frames < self._last[1]
        if gap:  # the counts before it say nothing about now, nor does the factor they chose
            self._forget(now + TRIAL_FIRST_S)
            self._window, self.rate, self._splan = (now, frames), None, plan_ms
        else:
            self._splan += (1 - math.exp(-(now - self._last[0]) / TRIAL_PLAN_TAU_S)) * (plan_ms - self._splan)
            if now - self._window[0] >= TRIAL_RATE_WINDOW_S:
                self.rate = (frames - self._window[1]) / (now - self._window[0])
                self._window = (now, frames)
        self._last = (now, frames)
        if self.rate is not None and self.rate < TRIAL_MIN_RATE:
            # Too few frames to tell the candidates apart in a trial's length (one connection at
            # 25 ms RTT: ~30 frames/s, and its rounds' differences were within their noise); what a
            # trial chose for another load does not hold either: the model alone, and when the
            # load grows, a first trial only once the pause and the plan have settled to it
            self._forget(now + TRIAL_FIRST_S)
        if self.rate is None or self.rate < TRIAL_MIN_RATE:
            return min(max(plan_ms, lo), hi)
        if self._order is None and self._splan_at_choice is not None and max(
                self._splan / self._splan_at_choice, self._splan_at_choice / self._splan) > TRIAL_REPLAN:
            self._forget(None)  # the conditions moved: climb again from the plan
        if self._order is None:
            centre = self._clamp(self._splan * self.factor, lo, hi)
            if self._next_at is not None and now < self._next_at:
                # before a first choice the plan as it is (the model's reason stands), after it
                # the factor on the smoothed plan
                return centre if self._splan_at_choice is not None else min(max(plan_ms, lo), hi)
            factors = {-1: TRIAL_FACTORS[:2], 1: TRIAL_FACTORS[1:]}.get(self._direction, TRIAL_FACTORS)
            cands = sorted({round(self._clamp(centre * f, lo, hi), 6) for f in factors})
            if len(cands) < 2:  # the limits leave nothing to try (this way): the centre holds
                self._choose(centre, 0, now + TRIAL_HOLD_S)
                return centre
            n = len(cands)
            self._cands, self._centre = cands, cands.index(round(centre, 6))
            self._order = [(r + k) % n for r in range(TRIAL_ROUNDS) for k in range(n)]
            self._seg, self._seg_t0, self._from, self._rounds = 0, now, None, [[] for _ in range(n)]
        if self._from is None and now - self._seg_t0 >= TRIAL_SETTLE_S:
            self._from = (now, frames)
        if now - self._seg_t0 >= TRIAL_SEGMENT_S:
            if self._from is not None and now > self._from[0]:
                self._rounds[self._order[self._seg]].append((frames - self._from[1], now - self._from[0]))
            self._seg, self._seg_t0, self._from = self._seg + 1, now, None
            if self._seg == len(self._order):
                self._decide(now)
                return self._clamp(self._splan * self.factor, lo, hi)
        return self._clamp(self._cands[self._order[self._seg]], lo, hi)

    def _choose(self, ms: float, direction: int, next_at: float | None) -> None:
        """The interval that ran (a clamped one included: a factor past a limit would hide the
        neighbours on that side from the next trial), as a factor of the smoothed plan."""
        lo_f, hi_f = TRIAL_FACTOR_RANGE
        self.factor = min(max(ms / max(self._splan, 1e-9), lo_f), hi_f)
        self._splan_at_choice, self._direction, self._next_at = self._splan, direction, next_at

    def _decide(self, now: float) -> None:
        self._order = None
        cands, c = self._cands, self._centre
        rates = [sum(f for f, _ in r) / max(sum(s for _, s in r), 1e-9) for r in self._rounds]
        best = max(range(len(rates)), key=lambda j: rates[j])
        figures = ", ".join(f"{cands[j]:.1f} ms {rates[j]:.0f}/s" for j in range(len(rates)))
        # the noise: the spread of the round-by-round differences (each round's segments ran within
        # ~2 s of each other), so a slow drift of the machine or the load cancels out
        diffs = [fb / sb - fc / sc for (fb, sb), (fc, sc) in zip(self._rounds[best], self._rounds[c])]
        noise = math.inf
        if best != c and len(diffs) >= 2:
            mean = sum(diffs) / len(diffs)
            sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
            noise = 2 * sd / math.sqrt(len(diffs))
        if best != c and rates[best] >= rates[c] * (1 + TRIAL_MIN_GAIN) and rates[best] - rates[c] > noise:
            self._choose(cands[best], 1 if best > c else -1, None)
            self.summary = f"tried {figures}: {cands[best]:.1f} ms"
        else:
            self._choose(cands[c], 0, now + TRIAL_HOLD_S)
            self.summary = f"tried {figures}: kept {cands[c]:.1f} ms"


# ---------------------------------------------------------------------------- the stateful edge


@dataclass(frozen=True)
class EpochSample:
    interval_ms: float  # the interval that produced this epoch
    pause_ms: float
    dirty_bytes: int
    wire_bytes: int
    rtt_ms: float
    rtt_var_ms: float = 0.0
    bandwidth_bytes_per_s: float | None = None  # achieved on recent checkpoints; None = unknown yet
    in_flight: int = 0
    # the gate's timings (replication/gate.py, all measured there on one clock): the last release,
    # counted from the resume after its epoch's pause; this epoch's quiet tail (last held frame →
    # its pause began; None: the guest sent nothing); and the guest's run from the release that
    # let its clients' requests in to that last frame (`gate.reply_time`; None: none to measure)
    release_offset_ms: float | None = None
    quiet_ms: float | None = None
    reply_ms: float | None = None
    released: bool = True  # release_offset_ms is of a release since the last sample (not a repeat)
    # for the outcome trial: when the sample was taken (monotonic seconds) and the frames that have
    # come in through the gate so far (a counter); None: no trial
    now_s: float | None = None
    frames: int | None = None


@dataclass(frozen=True)
class PacerDecision:
    interval_ms: float
    target_ms: float
    reason: str  # one of REASONS
    infeasible: str | None = None  # a sentence with numbers, only when newly infeasible
    expected_latency_ms: float = 0.0
    detail: str = ""


def _ewma(old: float | None, new: float, a: float = 0.3) -> float:
    return new if old is None else (1 - a) * old + a * new


class Pacer:
    def __init__(self, policy: PacerPolicy, initial_interval_ms: float | None = None):
        self.policy = policy
        i = initial_interval_ms if initial_interval_ms is not None else policy.min_interval_ms * 2
        self.interval_ms = min(max(i, policy.min_interval_ms), policy.max_interval_ms)
        self._pause = self._wire_rate = self._rtt = self._var = self._reply = None
        self._roff = self._rdev = None  # the releases' offset into the next epoch, and its deviation
        self._silent = 0  # epochs in a row in which the guest sent nothing
        self.latency_target_ms = self.interval_ms  # the plan before ``idle`` lengthened it
        self.floor_ms = policy.min_interval_ms  # the longest of the hard limits' floors
        self._bw: float | None = None
        self._reported: str | None = None
        self.last: PacerDecision | None = None
        self.trial = OutcomeTrial()

    def update(self, s: EpochSample) -> PacerDecision:
        p = self.policy
        self._pause = _ewma(self._pause, max(s.pause_ms, 0.0))
        self._rtt = _ewma(self._rtt, max(s.rtt_ms, 0.0))
        self._var = _ewma(self._var, max(s.rtt_var_ms, 0.0))
        iv = max(s.interval_ms, 1e-3)
        self._wire_rate = _ewma(self._wire_rate, s.wire_bytes / iv)  # bytes per ms at this interval
        if s.bandwidth_bytes_per_s:
            self._bw = _ewma(self._bw, s.bandwidth_bytes_per_s)
        r = s.reply_ms
        grew = False  # a cut-off reply raised the estimate: replies may be longer still
        if r is not None:
            # output up to the pause may have been cut off by it: its reply time is a lower bound,
            # which raises the estimate but never lowers it (epochs the guest went quiet in do);
            # else an alignment out of reach would come back each time the shorter interval cut
            # the replies off, and go again when they were seen whole
            cut = s.quiet_ms is not None and s.quiet_ms < CUT_OFF_MS
            grew = cut and r > (self._reply or 0.0)
            self._reply = max(self._reply or 0.0, r) if cut else _ewma(self._reply, r)
        self._silent = self._silent + 1 if s.quiet_ms is None else 0
        if s.release_offset_ms is not None and s.released:  # each release once (the gate repeats its last)
            off = max(s.release_offset_ms, 0.0)
            self._rdev = _ewma(self._rdev, abs(off - self._roff) if self._roff is not None else 0.0)
            self._roff = _ewma(self._roff, off)
        if self._silent >= SILENT_EPOCHS:  # nobody is waiting for replies any more
            self._reply = None
        inp = ModelInputs(pause_ms=self._pause, rtt_ms=self._rtt + 2 * self._var, bandwidth_bytes_per_s=self._bw,
                          wire_bytes_per_ms=self._wire_rate, ref_interval_ms=iv, reply_ms=self._reply,
                          release_offset_ms=None if self._roff is None else self._roff + 2 * self._rdev,
                          reply_at_least=grew, light=p.outcome_trial and self.trial.light(s.now_s))
        base = plan_interval(inp, p)
        was_idle = self.last is not None and self.last.reason == "idle"
        plan = idle_plan(base, p, self._silent)
        self.latency_target_ms = base.interval_ms
        self.floor_ms = max(hard_floors(inp, p).values())
        target, reason, detail = plan.interval_ms, plan.reason, plan.detail
        # In flight because of the RTT is pipelining, not a backlog: acks take rtt + transfer to come
        # back while a checkpoint leaves every interval + pause. Only what that does not explain queues:
        # besides the checkpoint just sent (the sample is taken after it), the one whose ack is due may
        # still be out (acks jitter around their mean; with an interval near the ack time, counting it
        # made the interval climb step by step: the lab at 25 ms RTT settled at 39-49 ms where a fixed
        # 25 ms served 1.2-1.4x the requests, the loop's own wait at max_in_flight pacing it by acks).
        explained = (inp.rtt_ms + inp.transfer_ms(iv)) / (iv + inp.pause_ms)
        if s.in_flight >= p.max_in_flight and s.in_flight > explained + 2 and self.interval_ms * p.max_step > target:
            target, reason = min(self.interval_ms * p.max_step, p.max_interval_ms), "queued"
            detail += f"; {s.in_flight} checkpoints in flight where the RTT explains {explained:.1f}"

        def latency(i: float) -> float:
            return i + inp.pause_ms + inp.transfer_ms(i) + inp.rtt_ms

        if p.outcome_trial and s.now_s is not None and s.frames is not None and reason in TRIAL_REASONS:
            # the plan's interval, checked against its neighbours by what the clients got
            hi = min(p.max_interval_ms, p.latency_budget_ms - inp.pause_ms - inp.rtt_ms - inp.transfer_ms(target))
            tried = self.trial.step(s.now_s, s.frames, target, self.floor_ms, hi)
            if self.trial.trying:
                target, reason = tried, "trying"
                detail += f"; trying {tried:.1f} ms against its neighbours"
            elif abs(tried - target) > 1e-9 * target:
                target, reason = tried, "measured"
            if self.trial.summary:
                detail += f"; {self.trial.summary}"
        else:
            self.trial.abort()

        infeasible = None
        # idle: nobody waits on output, and the first that comes wakes the epoch up (`wake_at`):
        # the budget is judged at the latency-driven target
        judged = base.interval_ms if reason == "idle" else target
        if latency(judged) > p.latency_budget_ms:
            key = f"latency:{reason}"
            if self._reported != key:
                self._reported = key
                infeasible = (f"the output-latency budget of {p.latency_budget_ms:g} ms cannot be met: "
                              f"RTT {inp.rtt_ms:.1f} ms + pause {inp.pause_ms:.1f} ms + transfer "
                              f"{inp.transfer_ms(judged):.1f} ms + interval {judged:.1f} ms (the shortest "
                              f"{reason} allows) = {latency(judged):.1f} ms; running at that interval")
        elif self._reported is not None:
            self._reported = None
        lo, hi = self.interval_ms / p.max_step, self.interval_ms * p.max_step
        if was_idle and reason != "idle":  # output ended the idleness: back to the target at once
            lo = 0.0
        self.interval_ms = min(max(target, lo, p.min_interval_ms), hi, p.max_interval_ms)
        expected = latency(min(self.interval_ms, judged))  # an idle epoch is woken by output
        self.last = PacerDecision(self.interval_ms, target, reason, infeasible, expected, detail)
        return self.last

    def wake_at(self, first_held_ms: float) -> float | None:
        """`wake_at` for the interval in force: when the epoch ends now that output is held (ms
        after it began), or None when it runs as planned (not lengthened by ``idle``)."""
        if self.last is None or self.last.reason != "idle":
            return None
        return wake_at(first_held_ms, self.interval_ms, self.latency_target_ms, self.floor_ms)
