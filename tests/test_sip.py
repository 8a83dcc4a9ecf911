"""The guest's PBX across a site loss, measured with sipp from gm-client (lab).

Calls to sip:echo@198.51.100.10 are set up at 2 per second and each held 12 s, so site A is
lost (at 4 s) while some calls are up and others are being set up; every call must end
with a 200 to its BYE. A registration made before the loss must still route a call after it.
The same calls across a planned switchover there and back, with an RTP stream through the
echo and media pass-through on; and garbage and a flood on 5060 that the gate, the service
and the PBX must take.
The longer run (5 site losses, 20 calls each, both transports): `python -m tests.sip_torture`.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time

import pytest

from bench.media import pass_through_edit
from geomirror import netns
from lab import cli as labcli, rtp, sipp, world

pytestmark = pytest.mark.lab

CALLS, RATE, HOLD_MS, CRASH_AT_S = 20, 2.0, 12_000, 4.0


def lose_site_a_at(at_s: float):
    """A `during` for sipp.run_uac: crash site A `at_s` after sipp started, wait for site B."""
    out: dict = {}

    def during(elapsed):
        while elapsed() < at_s:
            time.sleep(0.05)
        t = time.monotonic()
        world.crash("site-a")
        out["takeover"] = labcli.takeover("site-b")
        out["takeover_s"] = time.monotonic() - t

    return during, out


@pytest.mark.parametrize("transport", ["t1", "u1"], ids=["tcp", "udp"])
def test_calls_survive_a_site_loss(lab_up, tmp_path, transport):
    during, out = lose_site_a_at(CRASH_AT_S)
    run = sipp.run_uac(tmp_path / transport, transport=transport, calls=CALLS, rate=RATE, hold_ms=HOLD_MS,
                       during=during)
    print(f"\nsite loss with {CALLS} calls up/being set up: {run.summary()}; site B took over "
          f"{out.get('takeover_s', float('nan')):.2f}s after the kill")
    assert run.created == CALLS
    assert not run.problems, run.problems
    assert labcli.site_status("site-b")["role"] == "primary"


def test_registration_survives_a_site_loss(lab_up, tmp_path):
    phone = sipp.start_phone(tmp_path / "phone", 5062)
    try:
        reg = sipp.register(tmp_path / "register", "alice", 5062)
        assert not reg.problems, reg.problems
        world.crash("site-a")
        labcli.takeover("site-b")
        call = sipp.run_uac(tmp_path / "call", transport="u1", calls=1, rate=1, hold_ms=500, service="alice")
        print(f"\nregistered before the loss, called after it: {call.summary()}")
        assert not call.problems, call.problems
    finally:
        phone.kill()
        phone.wait()


def _switchover(frm: str, to: str) -> float:
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "geomirror", "switchover", "--lab-site", frm],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = labcli.site_status(to)
        if st and st["protected"] and st["ha_state"] == "active_protected":
            return time.monotonic() - t
        time.sleep(0.1)
    raise AssertionError(f"{to} was not protected 120 s after the switchover from {frm}")


SW_HOLD_MS, SW_RATE = 40_000, 10.0


def test_calls_and_media_survive_a_switchover_there_and_back(lab_env, tmp_path):
    """20 UDP and 20 TCP calls held across A -> B -> A, an RTP stream with pass-through on."""
    lab_env.up(config_edits=pass_through_edit())
    labcli.wait_protected()
    labcli.wait_reachable()
    stream = rtp.start(tmp_path / "rtp.json", seconds=600)
    watch = sipp.TcpWatch()
    t0 = time.monotonic()
    tcp = sipp.start_uac(tmp_path / "tcp", transport="t1", calls=CALLS, rate=SW_RATE, hold_ms=SW_HOLD_MS,
                         local_port=5061)
    udp = sipp.start_uac(tmp_path / "udp", transport="u1", calls=CALLS, rate=SW_RATE, hold_ms=SW_HOLD_MS,
                         local_port=5064)
    watch.start()
    try:
        time.sleep(CALLS / SW_RATE + 1)  # every call set up and held
        there = _switchover("site-a", "site-b")
        passed_b = labcli.site_status("site-b")["gate"]["frames_passed_through"]
        back = _switchover("site-b", "site-a")
        both_done = time.monotonic() - t0
        time.sleep(2)
        passed_a = labcli.site_status("site-a")["gate"]["frames_passed_through"]
        limit = CALLS / SW_RATE + SW_HOLD_MS / 1000 + 120
        runs = [sipp.finish_uac(tcp, tmp_path / "tcp", "t1", limit), sipp.finish_uac(udp, tmp_path / "udp", "u1",
                                                                                      limit)]
        runs[0].tcp_local_ports = sorted(watch.finish())
    finally:
        media = rtp.finish(stream, tmp_path / "rtp.json", stop=True)
    m = media.stats()
    tail = media.stats(start_ns=media.sent_ns[-1] - int(3e9))
    print(f"\nswitchover there {there:.1f}s, back {back:.1f}s (command to protected); "
          + "; ".join(r.summary() for r in runs))
    print(f"RTP with pass-through: {m.line()}; frames passed through: site-b {passed_b}, site-a {passed_a}")
    assert both_done < SW_HOLD_MS / 1000, f"the calls ended before the switchover back ({both_done:.0f}s)"
    for r in runs:
        assert r.created == CALLS
        assert not r.problems, r.problems
    assert passed_b > 0 and passed_a > 0, "media did not pass through the gate"
    assert tail.received > 0.9 * tail.sent, f"media did not resume after the switchovers: {tail.line()}"


def _daemon_rss_kb(site: str) -> int:
    pid = world.load_state()["pids"][site]
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {site} (pid {pid})")


def _flood(seconds: float, rng: random.Random) -> dict:
    """From gm-client: garbage datagrams and OPTIONS as fast as the socket takes them to UDP 5060,
    garbage and unterminated messages on TCP 5060 connections."""
    with netns.inside(world.CLIENT):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcps = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(40)]
    u.connect((world.GUEST_ADDR, sipp.SIP_PORT))
    u.setblocking(False)
    opened = 0
    for t in tcps:
        t.settimeout(5)
        try:
            t.connect((world.GUEST_ADDR, sipp.SIP_PORT))
            t.sendall(rng.randbytes(rng.randint(1, 3000)))
            t.sendall(b"INVITE sip:echo@198.51.100.10 SIP/2.0\r\nContent-Length: 99999999\r\nVia: " + b"x" * 4000)
            opened += 1
        except OSError:
            pass
    sent = {"udp_garbage": 0, "udp_options": 0, "tcp_connections": opened}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        i += 1
        if i % 2:
            msg, key = rng.randbytes(rng.randint(0, 1400)), "udp_garbage"
        else:
            msg = (f"OPTIONS sip:198.51.100.10 SIP/2.0\r\nVia: SIP/2.0/UDP 198.18.10.2:5099;branch=z9hG4bK{i}\r\n"
                   f"From: <sip:flood@198.18.10.2>;tag={i}\r\nTo: <sip:198.51.100.10>\r\nCall-ID: flood{i}\r\n"
                   f"CSeq: 1 OPTIONS\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()
            key = "udp_options"
        try:
            u.send(msg)
            sent[key] += 1
        except (BlockingIOError, ConnectionRefusedError):
            time.sleep(0.0005)
    for t in tcps:
        t.close()
    u.close()
    return sent


def test_garbage_and_a_flood_on_5060(lab_up, tmp_path):
    rss_before = {s: _daemon_rss_kb(s) for s in ("site-a", "site-b")}
    epoch_before = labcli.site_status("site-a")["committed_epoch"]
    sent = _flood(8.0, random.Random(12))
    gate = labcli.site_status("site-a")["gate"]
    st = labcli.wait_protected(timeout=120)
    rss_after = {s: _daemon_rss_kb(s) for s in ("site-a", "site-b")}
    call = sipp.run_uac(tmp_path / "after", transport="u1", calls=2, rate=2, hold_ms=500)
    tcp_call = sipp.run_uac(tmp_path / "after-tcp", transport="t1", calls=1, rate=1, hold_ms=500)
    print(f"\nflood sent {sent}; gate after it: held {gate['frames_held']} frames / {gate['bytes_held']} bytes, "
          f"dropped to the guest {gate['dropped_to_guest']}, at the hold cap {gate['dropped_held_cap']}; "
          f"daemon RSS kB before {rss_before}, after {rss_after}; committed epoch {epoch_before} -> "
          f"{st['committed_epoch']}; a call after it: {call.summary()}; {tcp_call.summary()}")
    assert sent["udp_options"] > 1000 and sent["tcp_connections"] > 0
    assert gate["bytes_held"] <= 64 << 20
    for s in rss_before:  # the gate's caps (64 MB held, 4 MB toward the guest) bound what a flood costs
        assert rss_after[s] - rss_before[s] < 80 << 10, f"{s}'s daemon grew by {rss_after[s] - rss_before[s]} kB"
    assert st["committed_epoch"] > epoch_before, "protection did not carry on"
    assert not call.problems, call.problems
    assert not tcp_call.problems, tcp_call.problems
