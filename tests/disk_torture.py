"""Disk torture (DESIGN properties 2 and 6 with a disk): a client in gm-client appends records
to the disk guest's journal (TCP 7000: each `ok n` only once the record is fdatasynced to the
guest's disk) on one connection as fast as it can; site A is lost (every process SIGKILLed,
links down) at a random moment; site B takes over from its replica (RAM and disk of one
epoch). Checks: the acknowledged record numbers are strictly consecutive from 1, every one of
them reads back from site B's disk (`read n`, O_DIRECT in the guest) with its bytes, and
`count` equals the last acknowledged number.

    python -m tests.disk_torture --trials 10                      # the documented run (~8 minutes)
    python -m tests.disk_torture --trials 1 --no-disk-replication # shows the loss without disk replication
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from dataclasses import dataclass, field

from geomirror.site.disk import UNSAFE_ENV
from lab import cli as labcli, world


@dataclass
class TrialResult:
    seed: int
    crash_after_s: float
    acked: list = field(default_factory=list)  # (n, data) in the order the replies came
    appends_before_crash: int = 0
    count: int | None = None
    longest_stall_s: float = 0.0
    violations: list = field(default_factory=list)
    error: str | None = None
    takeover: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.violations and self.error is None


def _client(j: labcli.Journal, stop: threading.Event, res: TrialResult) -> None:
    rng = random.Random(res.seed)
    last_t = time.monotonic()
    i = 0
    try:
        while not stop.is_set():
            i += 1
            data = f"{res.seed}:{i}:".encode() + rng.randbytes(rng.randint(8, 600))
            res.acked.append((j.append(data), data))
            now = time.monotonic()
            res.longest_stall_s = max(res.longest_stall_s, now - last_t)
            last_t = now
    except Exception as e:  # a reset, a timeout or an error reply fails the trial
        res.error = f"client connection failed after {len(res.acked)} appends: {e!r}"


def check(res: TrialResult, j: labcli.Journal) -> None:
    """Against the journal as the guest now reads it from its disk."""
    nums = [n for n, _ in res.acked]
    if nums and nums[0] != 1:
        res.violations.append(f"the first acknowledged record is {nums[0]}, not 1")
    for a, b in zip(nums, nums[1:]):
        if b != a + 1:
            res.violations.append(f"acknowledged record numbers {a} -> {b} are not consecutive")
            break
    res.count = j.count()
    last = nums[-1] if nums else 0
    if res.count != last:
        res.violations.append(f"count is {res.count}, the last acknowledged record {last}")
    for n, data in res.acked:
        got = j.read(n)
        if got != data:
            res.violations.append(f"acknowledged record {n} reads back as "
                                  + ("missing" if got is None else f"other bytes ({got[:16]!r}...)"))
            if len(res.violations) > 10:
                break


def run_trial(seed: int, *, disk_replication: bool = True, run_after_s: float = 2.0) -> TrialResult:
    rng = random.Random(seed)
    res = TrialResult(seed, crash_after_s=rng.uniform(0.5, 3.0))
    env = None if disk_replication else {UNSAFE_ENV: "1"}
    world.down()
    world.up(env=env, disk=True)
    try:
        labcli.wait_protected()
        labcli.wait_reachable()
        j = labcli.journal_connect(timeout=60)
        stop = threading.Event()
        t = threading.Thread(target=_client, args=(j, stop, res), daemon=True)
        t.start()
        time.sleep(res.crash_after_s)
        res.appends_before_crash = len(res.acked)
        world.crash("site-a")
        res.takeover = labcli.takeover("site-b")
        time.sleep(run_after_s)
        deadline = time.monotonic() + 60  # a few appends after the takeover too
        while res.error is None and time.monotonic() < deadline and len(res.acked) < res.appends_before_crash + 3:
            time.sleep(0.1)
        stop.set()
        t.join(90)
        if t.is_alive():
            res.error = res.error or "client stuck (no reply for 90s)"
        j.close()
        check(res, labcli.journal_connect(timeout=30))  # a new connection: what the disk holds
    except Exception as e:
        res.error = res.error or f"{type(e).__name__}: {e}"
    finally:
        world.down()
    return res


def summary(r: TrialResult) -> str:
    return (f"crash after {r.crash_after_s:.2f}s, {len(r.acked)} records acknowledged "
            f"({r.appends_before_crash} before the crash), count {r.count}, resumed epoch "
            f"{(r.takeover or {}).get('epoch')}, longest stall {r.longest_stall_s:.2f}s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--no-disk-replication", action="store_true",
                    help=f"{UNSAFE_ENV}=1 at both sites: the disk is not replicated (the test must then fail)")
    a = ap.parse_args(argv)
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    results = []
    for i in range(a.trials):
        r = run_trial(a.seed + i, disk_replication=not a.no_disk_replication)
        results.append(r)
        print(f"trial {i + 1:2}/{a.trials}: {summary(r)}: "
              f"{'ok' if r.ok else 'FAIL ' + (r.error or '; '.join(r.violations[:3]))}", flush=True)
    bad = [r for r in results if not r.ok]
    print(f"trials {len(results)}, failed {len(bad)}, records acknowledged {sum(len(r.acked) for r in results)}, "
          f"longest stall {max(r.longest_stall_s for r in results):.2f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
