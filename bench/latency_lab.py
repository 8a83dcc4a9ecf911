"""Output-commit latency in the lab at one WAN RTT: the WAN emulator's own delay and where an
epoch's time goes, from the sites' own status.

1. The emulator: ping over wan0 (site A → site B) with the RTT set to 0 and to --rtt, against
   the configured value, and the sites' heartbeat RTT.
2. With the guest running a memory-writing workload (gm-dirty) and one memcached `incr` client
   in gm-client, for the adaptive pacer and a fixed interval: the client's p50/p99, the floor
   RTT + pause + interval/2 (as bench/pacer.py), and the primary's `latency_ms` ([p50, p99] of
   pause, encode, send, and write → ACK read) with the standby's read → durable (the ACK
   point) and read → applied.

    .venv/bin/python bench/latency_lab.py [--rtt 25] [--seconds 8] [--base-p50 MS]

`--base-p50`: the unprotected guest's client p50 (bench/pacer.py --base), else ~1 ms is assumed
and said so.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pacer  # noqa: E402  (its load/measure: the same client and figures as the pacer benchmark)
from lab import cli as labcli, world  # noqa: E402


def ping_rtt(n: int = 40) -> tuple[float, float]:
    out = subprocess.run(["ip", "netns", "exec", world.SITES["site-a"], "ping", "-q", "-c", str(n), "-i", "0.05",
                          "198.18.100.2"], capture_output=True, text=True, timeout=60).stdout
    m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", out)
    return float(m.group(1)), float(m.group(2))  # min, avg


def sample(stop: threading.Event, into: dict) -> None:
    while not stop.is_set():
        b = labcli.site_status("site-b") or {}
        rep = b.get("replication") or {}
        if rep.get("last_journal_ms"):
            into["journal"].append(rep["last_journal_ms"])
            into["apply"].append(rep["last_apply_ms"])
        time.sleep(0.05)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt", type=float, default=25)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--base-p50", type=float)
    a = ap.parse_args()
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    world.up(guest_append=pacer.DIRTY)
    rows = []
    try:
        labcli.wait_protected()
        labcli.wait_reachable()
        labcli.wan(rtt="0ms", rate="100mbit")
        time.sleep(1)
        p0 = ping_rtt()
        labcli.wan(rtt=f"{a.rtt:g}ms", rate="100mbit")
        time.sleep(2)
        p1 = ping_rtt()
        hb = (labcli.site_status("site-a") or {}).get("rtt_ms")
        print(f"\nWAN emulator: configured RTT 0 ms → ping min/avg {p0[0]:.2f}/{p0[1]:.2f} ms; configured "
              f"{a.rtt:g} ms → ping min/avg {p1[0]:.2f}/{p1[1]:.2f} ms (+{p1[1] - a.rtt:.2f} ms); heartbeat RTT "
              f"{hb} ms")
        for name, body in (("adaptive", {"adaptive": True}), ("fixed 25ms", {"adaptive": False, "interval_ms": 25})):
            labcli.site_call("site-a", "POST", "/v1/checkpoint", body)
            time.sleep(2)
            pacer.load(1.5, 1)
            got = {"journal": [], "apply": []}
            stop = threading.Event()
            t = threading.Thread(target=sample, args=(stop, got))
            t.start()
            r = pacer.measure(a.seconds, 1)
            stop.set()
            t.join()
            lat = (labcli.site_status("site-a") or {}).get("replication", {}).get("latency_ms", {})
            rows.append((name, r, lat, got))
    finally:
        world.down()
    base = a.base_p50 if a.base_p50 is not None else 1.0
    print(f"one memcached client (incr) for {a.seconds:g}s, guest workload {pacer.DIRTY}, WAN {a.rtt:g} ms "
          f"100 Mbit/s; unprotected p50 {base:.1f} ms{'' if a.base_p50 is not None else ' (assumed)'}")
    for name, r, lat, got in rows:
        floor = a.rtt + r["pause_ms"] + r["interval"] / 2
        print(f"\n{name}: interval {r['interval']:.1f} ms, pause {r['pause_ms']:.1f} ms, {r['ops_s']:.0f} ops/s; "
              f"client p50 {r['p50']:.1f} p99 {r['p99']:.1f} ms; added p50 {r['p50'] - base:.1f} ms against the "
              f"floor {floor:.1f} ms ({(r['p50'] - base) / floor:.2f}x)")
        for step in ("pause", "encode", "send", "ack"):
            v = lat.get(step) or [float("nan")] * 2
            print(f"  primary {step:7} p50 {v[0]:7.2f} p99 {v[1]:7.2f} ms")
        for k, label in (("journal", "read → durable (ACK)"), ("apply", "read → applied")):
            xs = got[k]
            if xs:
                print(f"  standby {label:22} p50 {statistics.median(xs):7.2f} ms (n={len(xs)} samples)")
        ack = (lat.get("ack") or [float("nan")])[0]
        j = statistics.median(got["journal"]) if got["journal"] else float("nan")
        print(f"  write → ACK read p50 {ack:.1f} ms = RTT {a.rtt:g} + standby to durable {j:.1f} + the rest "
              f"{ack - a.rtt - j:.1f} (transfer, emulator, loops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
