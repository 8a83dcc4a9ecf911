"""SIP across repeated site losses: per loss a fresh lab, a phone registered, 20 calls over one
TCP connection and 20 over UDP to sip:echo@198.51.100.10 (set up at 4/s, each held 20 s),
site A killed at a random moment while the calls are up, then a call to the registered
phone. Every call must end with a 200 to its BYE; the TCP connection must never be reopened.

    python -m tests.sip_torture --losses 5     # the documented run (about 6 minutes)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from lab import cli as labcli, sipp, world

CALLS, RATE, HOLD_MS = 20, 4.0, 20_000


def one_loss(seed: int, work: Path) -> tuple[list[str], str]:
    rng = random.Random(seed)
    crash_at = rng.uniform(1.0, CALLS / RATE + HOLD_MS / 1000 - 6)  # while calls are up or being set up
    problems: list[str] = []
    world.down()
    world.up()
    phone = None
    try:
        labcli.wait_protected()
        labcli.wait_reachable()
        phone = sipp.start_phone(work / "phone", 5062)
        reg = sipp.register(work / "register", "alice", 5062)
        problems += [f"register: {p}" for p in reg.problems]
        watch = sipp.TcpWatch()
        t0 = time.monotonic()
        tcp = sipp.start_uac(work / "tcp", transport="t1", calls=CALLS, rate=RATE, hold_ms=HOLD_MS, local_port=5061)
        udp = sipp.start_uac(work / "udp", transport="u1", calls=CALLS, rate=RATE, hold_ms=HOLD_MS, local_port=5064)
        watch.start()
        time.sleep(max(0.0, crash_at - (time.monotonic() - t0)))
        t_kill = time.monotonic()
        world.crash("site-a")
        labcli.takeover("site-b")
        takeover_s = time.monotonic() - t_kill
        limit = CALLS / RATE + HOLD_MS / 1000 + 120
        runs = [sipp.finish_uac(tcp, work / "tcp", "t1", limit), sipp.finish_uac(udp, work / "udp", "u1", limit)]
        runs[0].tcp_local_ports = sorted(watch.finish())
        call = sipp.run_uac(work / "alice", transport="u1", calls=1, rate=1, hold_ms=500, service="alice")
        problems += [f"{r.transport}: {p}" for r in runs for p in r.problems]
        problems += [f"call to the registered phone: {p}" for p in call.problems]
        line = (f"crash at {crash_at:.1f}s, takeover {takeover_s:.2f}s after the kill; "
                + "; ".join(r.summary() for r in runs)
                + f"; registered phone called after the loss: {'ok' if not call.problems else 'FAILED'}")
        return problems, line
    finally:
        if phone is not None:
            phone.kill()
            phone.wait()
        world.down()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", type=int, default=5)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gm-sip-torture-") as tmp:
        for i in range(a.losses):
            try:
                problems, line = one_loss(a.seed + i, Path(tmp) / f"loss{i + 1}")
            except Exception as e:  # a lab that cannot be built or driven fails this loss, not the run
                problems, line = [f"{type(e).__name__}: {e}"], "lab error"
            failed += bool(problems)
            print(f"loss {i + 1}/{a.losses}: {line}: {'ok' if not problems else 'FAIL ' + '; '.join(problems[:4])}",
                  flush=True)
    print(f"site losses {a.losses}, calls {a.losses * 2 * CALLS}, losses with a failure {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
