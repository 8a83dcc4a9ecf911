"""Adaptive checkpoint interval against fixed intervals (Remus's 25 ms and 100 ms), in the lab.

For each WAN RTT (1, 10, 25, 50 ms) at 100 Mbit/s, with the guest running a
memory-writing workload (gm-dirty) and clients doing memcached incr on 1, 16 and 64
connections from gm-client, measured in the same run for each pacing:
client ops/s as a ratio to the unprotected guest, client p50/p99 latency added
over the unprotected guest, pause share, WAN bytes/s, checkpoints/s.

    .venv/bin/python bench/pacer.py [--seconds 8] [--clients 1,16,64] [--rtts 1,10,25,50]
        [--capture scan|colo] [--pacings adaptive,25,100] [--rounds N] [--repeat-adaptive]
        [--latency-budget MS] [--min-interval MS] [--standby-writeback MS]
        [--base FILE] [--out FILE]

`--capture colo` runs both sites on the COLO QEMU with QEMU's dirty log as the capture
(`world.up(capture="colo")`), the unprotected guest too, so both run on the same QEMU. The pause
p50 is of the pauses sampled from the site's status every 0.25 s during the row.

The matrix can be run in pieces (the lab is shared): `--base FILE` stores the unprotected
guest's figures on the first run and reuses them on the next, `--out FILE` appends the rows
as JSON lines. `--repeat-adaptive` measures adaptive again after the fixed intervals, so each
RTT has two adaptive rows minutes apart: their spread is the noise the comparison is judged by.

`--rounds N` measures the pacings (`--pacings`: `adaptive` and fixed intervals in ms) N times
over at each RTT, in turn, each round in the reverse order of the one before (A B, B A, A B...),
so that a drift of the shared machine's speed during a cell falls on both sides. The summary
then gives, per RTT and connection count, adaptive over the best fixed interval round by round
(the rows of one round are next to each other in time: a paired ratio), their median, and the
spread of each pacing's own rows across the rounds: the noise that ratio is judged against.

Each row also says where the CPU went (`CpuUse`, from /proc): the cores site A's QEMU, both
daemons and the WAN emulator used over the row, and QEMU's busiest thread's share (under load the
vCPU: how much of the time the guest ran), so a row can be told apart as guest-bound, host-bound or
waiting on output commit.
After setting each RTT the benchmark waits out the pacer's path-RTT window (`PATH_WINDOW_S`, 10 s:
the floor of the window's samples), else the first rows would be paced for the previous RTT.

A row (or its warm-up) that gets no reply at all is a stall of output, not noise: it is reported
as 0 ops/s and the lab's daemon logs are copied to /var/tmp/geomirror-bench/stall-<time>/ before
the next `lab up` removes them (one such warm-up was seen in a whole run, with no logs left).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import cli as labcli, world  # noqa: E402
from replication.session import PATH_WINDOW_S  # noqa: E402

DIRTY = "gm.dirty=16:1000"
STALL_LOGS = Path("/var/tmp/geomirror-bench")  # where a row without replies leaves the lab's logs


def keep_logs(why: str, root: Path = STALL_LOGS) -> Path:
    """Copy the lab's daemon logs aside (the next `lab up` removes them) when a row got no reply at
    all, so the stall can be read afterwards; readable by root only, like the lab's own directory."""
    dest = root / time.strftime("stall-%Y%m%dT%H%M%S")
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    for f in sorted(world.LAB_DIR.glob("*.log")):
        shutil.copy2(f, dest / f.name)
        os.chmod(dest / f.name, 0o600)
    (dest / "why.txt").write_text(why + "\n")
    print(f"no reply at all in {why}: the lab's logs are kept in {dest}", file=sys.stderr)
    return dest


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
    if not lats:  # no reply in the whole row (output stalled: a resync, a stuck session): a row, not a crash
        return {"ops_s": 0.0, "p50": float("nan"), "p99": float("nan")}
    return {"ops_s": ops[0] / seconds, "p50": lats[len(lats) // 2], "p99": lats[int(len(lats) * 0.99)]}


def sample_pauses(until: threading.Event, out: list) -> None:
    """The pause of each epoch seen in the site's status while the row runs (one per poll)."""
    last = None
    while not until.wait(0.25):
        st = labcli.site_status("site-a", timeout=2.0)
        rep = (st or {}).get("replication") or {}
        if rep.get("epoch") != last and rep.get("last_pause_ms") is not None:
            last = rep["epoch"]
            out.append(rep["last_pause_ms"])


def thread_ticks(pid: int) -> dict[int, int]:
    """CPU clock ticks (user + system) of each thread of `pid`; {} for a process that is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    out = {}
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        out[int(tid)] = int(fields[11]) + int(fields[12])
    return out


def lab_processes() -> dict[str, int]:
    """The lab's processes whose CPU a row reports: both daemons, the WAN emulator, site A's QEMU."""
    procs = {k: v for k, v in world.load_state().get("pids", {}).items()
             if k in ("site-a", "site-b", "wan") and isinstance(v, int)}
    for pid in world.pids_in_netns("gm-site-a"):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().startswith("qemu-system"):
                    procs["qemu"] = pid
        except OSError:
            continue
    return procs


class CpuUse:
    """The cores each process used from construction to `stop()`, and for `qemu` its busiest
    thread's share of one core (`vcpu`: under load, the guest's vCPU)."""

    def __init__(self, procs: dict[str, int]):
        self.procs = procs
        self.before = {name: thread_ticks(pid) for name, pid in procs.items()}
        self.t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        dt = max(time.monotonic() - self.t0, 1e-6)
        hz = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, pid in self.procs.items():
            before = self.before[name]
            per = {tid: (t - before.get(tid, 0)) / hz / dt for tid, t in thread_ticks(pid).items()}
            out[name] = round(sum(per.values()), 3)
            if name == "qemu" and per:
                out["vcpu"] = round(max(per.values()), 3)
        return out


def measure(seconds: float, clients: int) -> dict:
    a0 = labcli.site_status("site-a")
    w0 = labcli.wan()["stats"]["a->b"]["bytes"]
    done, seen = threading.Event(), []
    sampler = threading.Thread(target=sample_pauses, args=(done, seen))
    sampler.start()
    cpu = CpuUse(lab_processes())
    t0 = time.monotonic()
    try:
        r = load(seconds, clients)
    finally:
        done.set()
        sampler.join()
    dt = time.monotonic() - t0
    used = cpu.stop()
    a1 = labcli.site_status("site-a")
    w1 = labcli.wan()["stats"]["a->b"]["bytes"]
    p0, p1 = a0["replication"], a1["replication"]
    epochs = p1["epoch"] - p0["epoch"]
    pause_share = (p1["pause_total_ms"] - p0["pause_total_ms"]) / (dt * 1000)
    # the mean interval and pause over the row (not one epoch's): cycle = interval + pause
    cycle = dt * 1000 / max(epochs, 1)
    r.update(pause_share=pause_share, wan_mbit=(w1 - w0) * 8 / dt / 1e6, ckpt_s=epochs / dt,
             interval=cycle * (1 - pause_share), pause_ms=cycle * pause_share,
             reason=(a1.get("pacer") or {}).get("reason", "?"),
             pause_p50=statistics.median(seen) if seen else float("nan"), pause_samples=len(seen),
             cpu=used, capture=p1.get("capture", "scan"), colo_error=p1.get("colo_error"),
             colo_missed=p1.get("colo_missed_pages", 0))
    return r


def parse_pacings(text: str) -> list[tuple[str, dict]]:
    """`adaptive,25,100` -> the rows' names and the /v1/checkpoint bodies that set them."""
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item == "adaptive":
            out.append(("adaptive", {"adaptive": True}))
            continue
        try:
            ms = float(item.removesuffix("ms"))
        except ValueError:
            raise SystemExit(f"--pacings: {item!r} is neither 'adaptive' nor an interval in ms") from None
        if ms <= 0:
            raise SystemExit(f"--pacings: interval {item!r} must be above 0 ms")
        out.append((f"fixed {ms:g}ms", {"adaptive": False, "interval_ms": ms}))
    if not out:
        raise SystemExit("--pacings: nothing to measure")
    return out


def round_order(pacings: list, rounds: int) -> list[tuple[int, list]]:
    """Each round the pacings in the reverse order of the round before: a drift falls on both sides."""
    return [(r, pacings if r % 2 == 0 else pacings[::-1]) for r in range(rounds)]


def compare(rows: list[tuple], rtt: float, conns: int) -> dict | None:
    """Adaptive over the best fixed interval in one cell, round by round.

    `rows` are (rtt, name, conns, figures, round). The best fixed interval is the one with the
    most ops/s over all rounds; each round's ratio is that round's adaptive (the mean of its
    adaptive rows) over that round's row of the best fixed interval. `spread` is each pacing's
    max/min ops/s across the rounds, less one: the noise of the same row measured again (None
    for a pacing measured once).
    """
    cell = [(name, r["ops_s"], rnd) for t, name, n, r, rnd in rows if t == rtt and n == conns]
    by_pacing: dict[str, dict[int, list[float]]] = {}
    for name, ops, rnd in cell:
        key = "adaptive" if name.startswith("adaptive") else name
        by_pacing.setdefault(key, {}).setdefault(rnd, []).append(ops)
    ad = by_pacing.pop("adaptive", None)
    if not ad or not by_pacing:
        return None
    best = max(by_pacing, key=lambda k: statistics.fmean(v for vs in by_pacing[k].values() for v in vs))
    ratios = [statistics.fmean(ad[rnd]) / statistics.fmean(by_pacing[best][rnd])
              for rnd in sorted(ad) if rnd in by_pacing[best] and statistics.fmean(by_pacing[best][rnd]) > 0]

    def spread(per_round: dict[int, list[float]]) -> float | None:
        vals = [v for vs in per_round.values() for v in vs]
        if len(vals) < 2:
            return None  # measured once: no noise figure
        return max(vals) / min(vals) - 1 if min(vals) > 0 else float("inf")

    return {"best": best, "ratios": ratios, "median": statistics.median(ratios) if ratios else float("nan"),
            "spread": {"adaptive": spread(ad), **{k: spread(v) for k, v in by_pacing.items()}}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--clients", default="1,16,64", help="connection counts, comma-separated")
    ap.add_argument("--rtts", default="1,10,25,50")
    ap.add_argument("--capture", default="scan", choices=["scan", "colo"],
                    help="the sites' capture (colo: the COLO QEMU, for the unprotected guest too)")
    ap.add_argument("--pacings", default="adaptive,25,100",
                    help="what to measure at each RTT: 'adaptive' and fixed intervals in ms, comma-separated")
    ap.add_argument("--rounds", type=int, default=1,
                    help="measure the pacings this many times at each RTT, each round in reverse order")
    ap.add_argument("--repeat-adaptive", action="store_true", help="measure adaptive again after the fixed ones")
    ap.add_argument("--latency-budget", type=float, help="the sites' checkpoint.latency_budget_ms (lab: 150)")
    ap.add_argument("--min-interval", type=float, help="the sites' checkpoint.min_interval_ms (lab: 20)")
    ap.add_argument("--standby-writeback", type=float,
                    help="the sites' checkpoint.standby_writeback_ms (default 100; 0: write back every epoch)")
    ap.add_argument("--warmup", type=float, default=1.5, help="seconds of load before each measured row")
    ap.add_argument("--base", type=Path, help="the unprotected figures: read if present, else measured and written")
    ap.add_argument("--out", type=Path, help="append each row here as a JSON line")
    a = ap.parse_args()
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    conns = [int(x) for x in a.clients.split(",")]
    rows = []
    base = {int(k): v for k, v in json.loads(a.base.read_text()).items()} if a.base and a.base.exists() else {}
    if any(n not in base for n in conns):
        # The unprotected guest: no standby (so no checkpoints, no pauses) and output leaves at once.
        world.down()
        world.up(env={"GEOMIRROR_UNSAFE_NO_OUTPUT_COMMIT": "1"}, guest_append=DIRTY, capture=a.capture)
        try:
            labcli.wait_protected()
            labcli.wait_reachable()
            world.crash("site-b")
            time.sleep(3)
            for n in conns:
                load(a.warmup, n)
                base[n] = load(a.seconds, n)
        finally:
            world.down()
        if a.base:
            a.base.write_text(json.dumps(base))
    edits = {"latency_budget_ms = 150": f"latency_budget_ms = {a.latency_budget:g}"} if a.latency_budget else {}
    if a.min_interval or a.standby_writeback is not None:
        edits["min_interval_ms = 20"] = f"min_interval_ms = {a.min_interval or 20:g}" + (
            f"\nstandby_writeback_ms = {a.standby_writeback:g}" if a.standby_writeback is not None else "")
    edits = edits or None
    if a.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    pacings = parse_pacings(a.pacings)
    if a.repeat_adaptive:
        pacings.append(("adaptive #2", {"adaptive": True}))
    for rtt in [float(x) for x in a.rtts.split(",")]:
        world.up(guest_append=DIRTY, config_edits=edits, capture=a.capture)
        try:
            labcli.wait_protected()
            labcli.wait_reachable()
            labcli.wan(rtt=f"{rtt}ms", rate="100mbit")
            # the pacer's path RTT is the floor of a window (replication/session.py): until the
            # window holds only samples of the new WAN it paces for the old, shorter RTT
            time.sleep(PATH_WINDOW_S + 1)
            for rnd, order in round_order(pacings, a.rounds):
                for name, body in order:
                    labcli.site_call("site-a", "POST", "/v1/checkpoint", body)
                    time.sleep(2)
                    for n in conns:
                        # the pacer sees this load before the row is measured
                        if load(a.warmup, n)["ops_s"] == 0:
                            keep_logs(f"the warm-up of {name}, {n} conn, {rtt:g} ms RTT")
                        r = measure(a.seconds, n)
                        if r["ops_s"] == 0:
                            keep_logs(f"the row {name}, {n} conn, {rtt:g} ms RTT")
                        rows.append((rtt, name, n, r, rnd))
                        if a.out:
                            with a.out.open("a") as f:
                                f.write(json.dumps({"rtt": rtt, "pacing": name, "conn": n, "round": rnd,
                                                    "budget": a.latency_budget or 150,
                                                    "min_interval": a.min_interval or 20,
                                                    "capture_asked": a.capture, "base": base[n], **r}) + "\n")
        finally:
            world.down()
    print(f"\npacer benchmark: capture {a.capture}, memcached clients (incr) for {a.seconds:g}s each, "
          f"guest workload {DIRTY}, "
          "WAN 100 Mbit/s; unprotected guest: "
          + ", ".join(f"{n} conn {base[n]['ops_s']:.0f} ops/s p50 {base[n]['p50']:.1f} ms" for n in conns))
    print(f"{'RTT':>5} {'rnd':>3} {'pacing':12} {'conn':>4} {'interval':>9} {'reason':15} {'ops/s':>7} {'vs unprot':>9} "
          f"{'+p50 ms':>8} {'+p99 ms':>8} {'floor':>6} {'1.2xfl':>6} {'pause':>6} {'pause ms':>8} {'p50 ms':>6} "
          f"{'WAN Mbit/s':>10} {'ckpt/s':>7} {'vCPU':>5} {'cores':>5} {'capture':7}")
    for rtt, name, n, r, rnd in rows:
        b0 = base[n]
        floor = rtt + r["pause_ms"] + r["interval"] / 2  # the added latency output commit cannot avoid
        print(f"{rtt:>4g}ms {rnd:>3} {name:12} {n:>4} {r['interval']:>7.1f}ms {r['reason']:15} {r['ops_s']:>7.0f} "
              f"{r['ops_s'] / b0['ops_s']:>9.2f} {r['p50'] - b0['p50']:>8.1f} {r['p99'] - b0['p99']:>8.1f} "
              f"{floor:>6.1f} {1.2 * floor:>6.1f} {r['pause_share']:>6.1%} {r['pause_ms']:>8.1f} {r['pause_p50']:>6.1f} "
              f"{r['wan_mbit']:>10.1f} {r['ckpt_s']:>7.1f} {r['cpu'].get('vcpu', float('nan')):>5.0%} "
              f"{sum(v for k, v in r['cpu'].items() if k != 'vcpu'):>5.2f} {r['capture']:7}"
              + (f" colo error: {r['colo_error']}" if r.get("colo_error") else "")
              + (f" missed pages {r['colo_missed']}" if r.get("colo_missed") else ""))
    # adaptive against the best fixed interval, per RTT and connection count
    for rtt in sorted({r[0] for r in rows}):
        for n in conns:
            c = compare(rows, rtt, n)
            if c:
                print(f"{rtt:>4g}ms {n:>3} conn: adaptive / {c['best']} by round "
                      f"{' '.join(f'{x:.2f}' for x in c['ratios'])}, median {c['median']:.2f}; "
                      "the same row again moves " + ", ".join(
                          f"{k} {'(once)' if v is None else f'{v:.0%}'}" for k, v in c["spread"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
