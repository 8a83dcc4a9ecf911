"""Media through the protected PBX guest, measured in one run (two labs, as root; ~5 min).

An RTP stream (lab/rtp.py: 20 ms PCMU packets from gm-client to the guest's echo on UDP
6000, echoed back) runs through each lab while it is steady, across a planned switchover
(site A to site B) and across the loss of the site that then runs the guest (B killed,
A takes over). The first lab has the default config (every packet of the guest under
output commit), the second `[checkpoint] pass_through = ["udp:6000-6100"]`. Printed: the
round trip, jitter and the gate's added one-way latency with and without pass-through
(the ratios), and the media gap, losses and duplicates at the switchover and the site loss.

    python -m bench.media [--steady 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import cli as labcli, rtp, world  # noqa: E402

PASS_THROUGH = '["udp:6000-6100"]'


def pass_through_edit() -> dict:
    """The lab's config edit that turns media pass-through on (both sites)."""
    return {"[checkpoint]\n": f"[checkpoint]\npass_through = {PASS_THROUGH}\n"}


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def protected_on(site: str):
    s = labcli.site_status(site)
    return s if s and s.get("protected") and s.get("ha_state") == "active_protected" else None


def switchover(frm: str, to: str) -> float:
    """`geomirror switchover` from `frm`; returns when `to` runs the guest protected (seconds)."""
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "geomirror", "switchover", "--lab-site", frm],
                         capture_output=True, text=True, timeout=120, cwd=world.CODE_ROOT, env=world.child_env())
    if out.returncode != 0:
        raise RuntimeError(f"switchover {frm} -> {to} failed: {out.stderr.strip()[-300:]}")
    _wait(lambda: protected_on(to), 120, f"{to} to run the guest protected")
    return time.monotonic() - t


def one_lab(work: Path, pass_through: bool, steady_s: float) -> dict:
    """A fresh lab; the stream steady, across a switchover A -> B, across the loss of B."""
    world.down()
    world.up(config_edits=pass_through_edit() if pass_through else None)
    proc = None
    try:
        labcli.wait_protected()
        labcli.wait_reachable()
        out = work / f"rtp-{'pt' if pass_through else 'oc'}.json"
        proc = rtp.start(out, seconds=600)
        ns = time.monotonic_ns
        t_start = ns()
        time.sleep(1.0 + steady_s)  # a second to settle, then the steady window
        t_steady_end = ns()
        interval_ms = (labcli.site_status("site-a") or {}).get("interval_ms")
        t_sw = ns()
        sw_s = switchover("site-a", "site-b")
        time.sleep(3)
        t_sw_end = ns()
        time.sleep(2)
        t_kill = ns()
        world.crash("site-b")
        labcli.takeover("site-a")
        takeover_s = (ns() - t_kill) / 1e9
        time.sleep(5)
        t_end = ns()
        gate = (labcli.site_status("site-a") or {}).get("gate") or {}
        stream = rtp.finish(proc, out, stop=True)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        world.down()
    steady = stream.stats(t_start + int(1e9), t_steady_end)
    sw = stream.stats(t_sw - int(1e9), t_sw_end)
    loss = stream.stats(t_kill - int(1e9), t_end)
    return {"pass_through": pass_through, "interval_ms": interval_ms, "steady": asdict(steady),
            "switchover": {**asdict(sw), "command_to_protected_s": sw_s},
            "site_loss": {**asdict(loss), "takeover_s": takeover_s},
            "gate_frames_passed_through_after_takeover": gate.get("frames_passed_through")}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.inf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steady", type=float, default=10.0, help="seconds of steady stream per lab")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    from geomirror import logging as gl

    gl.setup(level="WARNING")
    with tempfile.TemporaryDirectory(prefix="gm-bench-media-") as tmp:
        oc = one_lab(Path(tmp), False, a.steady)
        pt = one_lab(Path(tmp), True, a.steady)
    if a.json:
        print(json.dumps({"output_commit": oc, "pass_through": pt}, indent=1))
    else:
        report(oc, pt)
    return 0


def report(oc: dict, pt: dict) -> None:
    s_oc, s_pt = oc["steady"], pt["steady"]
    print(f"RTP through the guest's echo, 20 ms packets, checkpoint interval {oc['interval_ms']} / "
          f"{pt['interval_ms']} ms (adaptive)")
    for name, r in (("output commit (default)", oc), ("pass-through udp:6000-6100", pt)):
        s = r["steady"]
        print(f"  steady, {name:27s}: RTT median {s['rtt_median_ms']:6.1f} ms, p99 {s['rtt_p99_ms']:6.1f} ms, "
              f"jitter {s['jitter_ms']:5.1f} ms, longest gap {s['longest_gap_ms']:5.0f} ms, lost {s['lost']} of "
              f"{s['sent']}")
    added = s_oc["rtt_median_ms"] - s_pt["rtt_median_ms"]
    print(f"  output commit adds {added:.1f} ms one-way (median; the gate holds only the guest's output); "
          f"RTT ratio {ratio(s_oc['rtt_median_ms'], s_pt['rtt_median_ms']):.1f}x, jitter ratio "
          f"{ratio(s_oc['jitter_ms'], s_pt['jitter_ms']):.1f}x (output commit / pass-through)")
    for name, r in (("output commit", oc), ("pass-through", pt)):
        sw, lo = r["switchover"], r["site_loss"]
        print(f"  {name:13s} switchover A->B: media gap {sw['longest_gap_ms']:5.0f} ms, lost {sw['lost']}, "
              f"duplicates {sw['duplicates']} (protected again {sw['command_to_protected_s']:.1f}s after the command)")
        print(f"  {name:13s} site loss of B:  media gap {lo['longest_gap_ms']:5.0f} ms, lost {lo['lost']}, "
              f"duplicates {lo['duplicates']} (A took over {lo['takeover_s']:.2f}s after the kill)")


if __name__ == "__main__":
    sys.exit(main())
