"""Output-commit torture: a client runs memcached `incr` and `set` on one connection as
fast as it can, never pausing; site A is lost (every process SIGKILLed, links down) at a
random moment; site B takes over; the connection carries on. Checks: the `incr` replies
are strictly consecutive (no gap, no repeat, no step back) and every STORED value reads
back after the failover.

    python -m tests.torture --trials 20          # the documented 20-trial run
    python -m tests.torture --trials 3 --no-gate # shows the violation without output commit
    python -m tests.torture --trials 10 --capture colo --memory 1024   # QEMU's dirty log, 1 GB guest
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from dataclasses import dataclass, field

from lab import cli as labcli, world


@dataclass
class TrialResult:
    seed: int
    crash_after_s: float
    ops: int = 0
    incrs: list = field(default_factory=list)
    stored: dict = field(default_factory=dict)
    longest_stall_s: float = 0.0
    violations: list = field(default_factory=list)
    error: str | None = None
    takeover: dict | None = None
    resumed_epoch: int | None = None

    @property
    def ok(self) -> bool:
        return not self.violations and self.error is None


def _client(mc: labcli.Memcache, stop: threading.Event, res: TrialResult) -> None:
    last_t = time.monotonic()
    i = 0
    try:
        while not stop.is_set():
            i += 1
            if i % 4 == 0:
                k, v = f"s{i}", f"v{i}-{res.seed}"
                r = mc.set(k, v)
                if r == b"STORED":
                    res.stored[k] = v.encode()
            else:
                res.incrs.append(mc.incr("ctr"))
            now = time.monotonic()
            res.longest_stall_s = max(res.longest_stall_s, now - last_t)
            last_t = now
            res.ops += 1
    except Exception as e:  # a reset or timeout is a failure of the trial
        res.error = f"client connection failed after {res.ops} operations: {e!r}"


def check(res: TrialResult, mc: labcli.Memcache | None) -> None:
    v = res.incrs
    for a, b in zip(v, v[1:]):
        if b != a + 1:
            kind = "repeat" if b == a else ("step back" if b < a else "gap")
            res.violations.append(f"incr replies {a} -> {b} ({kind})")
            if len(res.violations) > 5:
                break
    if mc is not None and res.error is None:
        for k, val in res.stored.items():
            got = mc.get(k)
            if got != val:
                res.violations.append(f"STORED {k}={val!r} reads back as {got!r}")
                if len(res.violations) > 10:
                    break


def run_trial(seed: int, *, gate: bool = True, run_after_s: float = 2.0, capture: str | None = None,
              memory_mb: int | None = None) -> TrialResult:
    rng = random.Random(seed)
    res = TrialResult(seed, crash_after_s=rng.uniform(0.3, 2.5))
    env = None if gate else {"GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT": "1"}
    world.down()
    world.up(env=env, capture=capture, memory_mb=memory_mb)
    try:
        labcli.wait_protected()
        labcli.wait_reachable()
        mc = labcli.Memcache(labcli.client_connect(timeout=60))
        mc.set("ctr", "0")
        stop = threading.Event()
        t = threading.Thread(target=_client, args=(mc, stop, res), daemon=True)
        t.start()
        time.sleep(res.crash_after_s)
        world.crash("site-a")
        res.takeover = labcli.takeover("site-b")
        res.resumed_epoch = res.takeover.get("epoch")
        time.sleep(run_after_s)
        deadline = time.monotonic() + 60
        while res.ops and time.monotonic() < deadline and len(res.incrs) < 3:
            time.sleep(0.1)
        stop.set()
        t.join(90)
        if t.is_alive():
            res.error = res.error or "client stuck (no reply for 90s)"
        check(res, mc if not t.is_alive() else None)
        mc.close()
    except Exception as e:
        res.error = res.error or f"{type(e).__name__}: {e}"
    finally:
        world.down()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--no-gate", action="store_true", help="disable output commit (the test must then fail)")
    ap.add_argument("--capture", choices=("scan", "colo"), default=None,
                    help="the checkpoint capture (colo: QEMU's dirty log, lab up --capture colo)")
    ap.add_argument("--memory", type=int, metavar="MB", help="the guest's RAM (default 128)")
    a = ap.parse_args(argv)
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    results = []
    for i in range(a.trials):
        r = run_trial(a.seed + i, gate=not a.no_gate, capture=a.capture, memory_mb=a.memory)
        results.append(r)
        print(f"trial {i + 1:2}/{a.trials}: crash after {r.crash_after_s:.2f}s, {r.ops} ops, "
              f"resumed epoch {r.resumed_epoch}, longest stall {r.longest_stall_s:.2f}s: "
              f"{'ok' if r.ok else 'FAIL ' + (r.error or '; '.join(r.violations[:3]))}", flush=True)
    bad = [r for r in results if not r.ok]
    stalls = [r.longest_stall_s for r in results]
    print(f"trials {len(results)}, failed {len(bad)}, stalls > 1s: {sum(s > 1 for s in stalls)}, "
          f"longest stall {max(stalls):.2f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
