"""Adaptive checkpoint interval against fixed intervals (Remus's 25 ms and 100 ms), in the lab.

For each WAN RTT (1, 10, 25, 50 ms) at 100 Mbit/s, with the guest running a
memory-writing workload (gm-dirty) and clients doing memcached incr on 1, 16 and 64
connections from gm-client, measured in the same run for each pacing:
client ops/s as a ratio to the unprotected guest, client p50/p99 latency added
over the unprotected guest, pause share, WAN bytes/s, checkpoints/s.

    .venv/bin/python bench/pacer.py [--seconds 8] [--clients 1,16,64] [--rtts 1,10,25,50]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import cli as labcli, world  # noqa: E402

DIRTY = "gm.dirty=16:1000"


def load(seconds: float, clients: int) -> dict:
    lats: list[float] = []
    ops = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def one(i):
        mc = labcli.Memcache(labcli.client_connect(timeout=30))
        mc.set(f"c{i}", "0")
        mine = []
        while time.monotonic() < stop:
            t = time.perf_counter()
            mc.incr(f"c{i}")
            mine.append((time.perf_counter() - t) * 1000)
        mc.close()
        with lock:
            lats.extend(mine)
            ops[0] += len(mine)

    ts = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lats.sort()
    return {"ops_s": ops[0] / seconds, "p50": lats[len(lats) // 2], "p99": lats[int(len(lats) * 0.99)]}


def measure(seconds: float, clients: int) -> dict:
    a0 = labcli.site_status("site-a")
    w0 = labcli.wan()["stats"]["a->b"]["bytes"]
    t0 = time.monotonic()
    r = load(seconds, clients)
    dt = time.monotonic() - t0
    a1 = labcli.site_status("site-a")
    w1 = labcli.wan()["stats"]["a->b"]["bytes"]
    p0, p1 = a0["replication"], a1["replication"]
    r.update(pause_share=(p1["pause_total_ms"] - p0["pause_total_ms"]) / (dt * 1000),
             wan_mbit=(w1 - w0) * 8 / dt / 1e6, ckpt_s=(p1["epoch"] - p0["epoch"]) / dt,
             interval=a1["interval_ms"], pause_ms=a1["last_pause_ms"] or 0.0)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--clients", default="1,16,64", help="connection counts, comma-separated")
    ap.add_argument("--rtts", default="1,10,25,50")
    a = ap.parse_args()
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    conns = [int(x) for x in a.clients.split(",")]
    rows = []
    # The unprotected guest: no standby (so no checkpoints, no pauses) and output leaves at once.
    world.down()
    world.up(env={"GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT": "1"}, guest_append=DIRTY)
    try:
        labcli.wait_protected()
        labcli.wait_reachable()
        world.crash("site-b")
        time.sleep(3)
        base = {n: load(a.seconds, n) for n in conns}
    finally:
        world.down()
    for rtt in [float(x) for x in a.rtts.split(",")]:
        world.up(guest_append=DIRTY)
        try:
            labcli.wait_protected()
            labcli.wait_reachable()
            labcli.wan(rtt=f"{rtt}ms", rate="100mbit")
            for name, body in (("adaptive", {"adaptive": True}), ("fixed 25ms", {"adaptive": False, "interval_ms": 25}),
                               ("fixed 100ms", {"adaptive": False, "interval_ms": 100})):
                labcli.site_call("site-a", "POST", "/v1/checkpoint", body)
                time.sleep(2)
                for n in conns:
                    rows.append((rtt, name, n, measure(a.seconds, n)))
        finally:
            world.down()
    print(f"\npacer benchmark: memcached clients (incr) for {a.seconds:g}s each, guest workload {DIRTY}, "
          "WAN 100 Mbit/s; unprotected guest: "
          + ", ".join(f"{n} conn {base[n]['ops_s']:.0f} ops/s p50 {base[n]['p50']:.1f} ms" for n in conns))
    print(f"{'RTT':>5} {'pacing':12} {'conn':>4} {'interval':>9} {'ops/s':>7} {'vs unprot':>9} {'+p50 ms':>8} "
          f"{'+p99 ms':>8} {'floor':>6} {'pause':>6} {'WAN Mbit/s':>10} {'ckpt/s':>7}")
    for rtt, name, n, r in rows:
        b0 = base[n]
        floor = rtt + r["pause_ms"] + r["interval"] / 2  # the added latency output commit cannot avoid
        print(f"{rtt:>4g}ms {name:12} {n:>4} {r['interval']:>7.1f}ms {r['ops_s']:>7.0f} {r['ops_s'] / b0['ops_s']:>9.2f} "
              f"{r['p50'] - b0['p50']:>8.1f} {r['p99'] - b0['p99']:>8.1f} {floor:>6.1f} {r['pause_share']:>6.1%} "
              f"{r['wan_mbit']:>10.1f} {r['ckpt_s']:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
