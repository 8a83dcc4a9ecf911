"""The adaptive checkpoint interval (pure). The model and its reasoning: docs/pacer.md.

Each epoch the primary reports what it measured; the pacer returns the next interval:
the one that delivers the most requests per second to clients waiting on output commit
(`throughput_optimum`: it grows with the pause and the RTT), raised to whatever a hard
limit needs (the link keeps up, the pause share, the WAN bandwidth ceiling, checkpoints
in flight), moved toward by bounded steps so it never oscillates wildly. The output-latency budget is the soft goal: when even the
shortest admissible interval cannot meet it, the pacer says so once, with the numbers,
and runs at the best achievable setting.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPHA = 0.7  # wire bytes per epoch grow ~ interval^ALPHA (overwrites coalesce): used for the WAN cap
HEADROOM = 1.25  # a checkpoint's transfer must take at most interval/HEADROOM


@dataclass(frozen=True)
class PacerPolicy:
    min_interval_ms: float = 20.0
    max_interval_ms: float = 1000.0
    latency_budget_ms: float = 200.0
    max_pause_share: float = 0.25
    max_wan_bytes_per_s: float = 0.0  # 0 = unlimited
    max_step: float = 1.25  # the interval changes by at most this factor per epoch
    max_in_flight: int = 2

    def __post_init__(self):
        if not 0 < self.min_interval_ms <= self.max_interval_ms:
            raise ValueError("need 0 < min_interval_ms <= max_interval_ms")
        if not 0 < self.max_pause_share < 1:
            raise ValueError("max_pause_share must be between 0 and 1")
        if self.max_step <= 1:
            raise ValueError("max_step must be above 1")


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


@dataclass(frozen=True)
class PacerDecision:
    interval_ms: float
    target_ms: float
    reason: str  # which limit set the target
    infeasible: str | None = None  # a sentence with numbers, only when newly infeasible
    expected_latency_ms: float = 0.0


def throughput_optimum(pause_ms: float, rtt_ms: float, transfer_ms: float = 0.0) -> float:
    """The interval that maximises requests per second for clients waiting on output commit.

    A reply waits on average interval/2 (for its epoch to end) + pause + transfer + RTT, and
    the guest runs interval/(interval + pause) of the time; the rate goes as
    i / ((i + p) · (i/2 + p + w)) with w = transfer + RTT, whose maximum is at
    i = sqrt(2·p·(p + w)). A longer RTT makes each epoch's wait dearer relative to the pause,
    so the interval grows with it (and shrinks towards the pause on a fast link)."""
    p = max(pause_ms, 0.0)
    return (2 * p * (p + max(rtt_ms, 0.0) + max(transfer_ms, 0.0))) ** 0.5


def _ewma(old: float | None, new: float, a: float = 0.3) -> float:
    return new if old is None else (1 - a) * old + a * new


class Pacer:
    def __init__(self, policy: PacerPolicy, initial_interval_ms: float | None = None):
        self.policy = policy
        i = initial_interval_ms if initial_interval_ms is not None else policy.min_interval_ms * 2
        self.interval_ms = min(max(i, policy.min_interval_ms), policy.max_interval_ms)
        self._pause = self._wire_rate = self._rtt = self._var = None
        self._bw: float | None = None
        self._reported: str | None = None
        self.last: PacerDecision | None = None

    def update(self, s: EpochSample) -> PacerDecision:
        p = self.policy
        self._pause = _ewma(self._pause, max(s.pause_ms, 0.0))
        self._rtt = _ewma(self._rtt, max(s.rtt_ms, 0.0))
        self._var = _ewma(self._var, max(s.rtt_var_ms, 0.0))
        iv = max(s.interval_ms, 1e-3)
        self._wire_rate = _ewma(self._wire_rate, s.wire_bytes / iv)  # bytes per ms at this interval
        if s.bandwidth_bytes_per_s:
            self._bw = _ewma(self._bw, s.bandwidth_bytes_per_s)
        pause, rtt = self._pause, self._rtt + 2 * self._var

        def wire_at(i: float) -> float:  # bytes per epoch at interval i
            return self._wire_rate * iv * (i / iv) ** ALPHA

        def transfer_ms(i: float) -> float:
            return 0.0 if not self._bw else wire_at(i) / self._bw * 1000

        # hard lower bounds on the interval
        bounds = {"minimum interval": p.min_interval_ms,
                  "pause share": pause * (1 - p.max_pause_share) / p.max_pause_share}
        if self._bw:
            # shortest i with transfer(i) * HEADROOM <= i: transfer grows as i^ALPHA, solve directly
            t_now = transfer_ms(iv)
            if t_now > 0:
                bounds["link bandwidth"] = (HEADROOM * t_now / iv ** ALPHA) ** (1 / (1 - ALPHA))
        if p.max_wan_bytes_per_s:
            rate_now = self._wire_rate * 1000  # bytes/s at the current interval
            if rate_now > 0:
                bounds["WAN ceiling"] = iv * (rate_now / p.max_wan_bytes_per_s) ** (1 / (1 - ALPHA))
        reason = max(bounds, key=bounds.get)
        target = bounds[reason]
        best = throughput_optimum(pause, rtt, transfer_ms(iv))
        if best > target:  # no hard limit binds: the interval that serves waiting clients best,
            # unless the latency budget wants a shorter one (never shorter than a hard limit)
            cap = p.latency_budget_ms - pause - transfer_ms(iv) - rtt
            if best <= cap:
                target, reason = best, f"throughput optimum for pause {pause:.0f} ms, RTT {rtt:.0f} ms"
            elif cap > target:
                target, reason = cap, "latency budget"
        # In flight because of the RTT is pipelining, not a backlog: acks take rtt + transfer to come
        # back while a checkpoint leaves every interval + pause. Only what that does not explain queues.
        explained = (rtt + transfer_ms(iv)) / (iv + pause)
        if s.in_flight >= p.max_in_flight and s.in_flight > explained + 1 and self.interval_ms * p.max_step > target:
            # checkpoints queue: back off whatever the model says
            target, reason = self.interval_ms * p.max_step, "checkpoints queued"
        if target > p.max_interval_ms:
            target, reason = p.max_interval_ms, reason + " (capped at the maximum interval)"
        target = max(target, p.min_interval_ms)

        def latency(i: float) -> float:
            return i + pause + transfer_ms(i) + rtt

        infeasible = None
        if latency(target) > p.latency_budget_ms:
            key = f"latency:{reason}"
            if self._reported != key:
                self._reported = key
                infeasible = (f"the output-latency budget of {p.latency_budget_ms:g} ms cannot be met: "
                              f"RTT {rtt:.1f} ms + pause {pause:.1f} ms + transfer {transfer_ms(target):.1f} ms "
                              f"+ interval {target:.1f} ms (the shortest the {reason} allows) = "
                              f"{latency(target):.1f} ms; running at that interval")
        elif self._reported is not None:
            self._reported = None
        lo, hi = self.interval_ms / p.max_step, self.interval_ms * p.max_step
        self.interval_ms = min(max(target, lo, p.min_interval_ms), hi, p.max_interval_ms)
        self.last = PacerDecision(self.interval_ms, target, reason, infeasible, latency(self.interval_ms))
        return self.last
