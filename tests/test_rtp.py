"""The lab's RTP stream (lab/rtp.py): packets, their parsing, the analysis, and a short run
against an echo on loopback that drops one packet and repeats another."""

from __future__ import annotations

import socket
import threading

import pytest

from lab import rtp


def test_packets_carry_sequence_timestamp_and_index():
    p = rtp.packet(70000, 0x1234, 99)
    assert len(p) == 12 + rtp.PAYLOAD
    v, pt, seq, ts, ssrc = rtp.HEADER.unpack_from(p)
    assert (v, pt, seq, ts, ssrc) == (0x80, 0, 70000 & 0xFFFF, 70000 * 160, 0x1234)
    assert rtp.parse(p, 0x1234) == 70000
    assert rtp.parse(p, 0x4321) is None  # another stream
    assert rtp.parse(p[:20], 0x1234) is None
    assert rtp.parse(b"\x00" + p[1:], 0x1234) is None  # not RTP version 2


def test_analysis_counts_losses_duplicates_and_the_longest_gap():
    ms = 1_000_000
    sent = [i * 20 * ms for i in range(10)]
    # echoes 30 ms after sending; packet 3 lost; 5..7 come late in a burst at 200 ms; 6 twice
    recv = [(i, sent[i] + 30 * ms) for i in (0, 1, 2, 4)] + [(5, 200 * ms), (6, 200 * ms), (6, 201 * ms),
                                                            (7, 200 * ms), (8, 190 * ms), (9, 210 * ms)]
    s = rtp.analyse(sent, recv)
    assert (s.sent, s.received, s.lost, s.duplicates) == (10, 9, 1, 1)
    assert s.longest_gap_ms == pytest.approx(200 - 110)  # packet 4's echo at 110 ms, then 5's at 200 ms
    assert s.gap_start_s == pytest.approx(0.110)
    assert s.rtt_median_ms == pytest.approx(30)  # 30,30,30,30,100,80,60,30,30
    assert s.rtt_max_ms == pytest.approx(100)
    assert s.jitter_ms > 0
    window = rtp.analyse(sent, recv, start_ns=sent[5], end_ns=sent[8])
    assert (window.sent, window.received, window.duplicates) == (3, 3, 1)
    steady = rtp.analyse(sent, [(i, t + 30 * ms) for i, t in enumerate(sent)])
    assert steady.jitter_ms == 0 and steady.longest_gap_ms == pytest.approx(20)


def test_a_short_run_against_an_echo(tmp_path):
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(0.2)
    done = threading.Event()

    def serve():
        n = 0
        while not done.is_set():
            try:
                data, peer = echo.recvfrom(2048)
            except TimeoutError:
                continue
            n += 1
            if n == 3:
                continue  # the third packet is lost
            echo.sendto(data, peer)
            if n == 5:
                echo.sendto(data, peer)  # the fifth comes back twice

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        rtp.run("127.0.0.1", echo.getsockname()[1], 0.2, tmp_path / "r.json", drain_s=0.3)
    finally:
        done.set()
        t.join(2)
        echo.close()
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    s = rtp.Stream(data["sent_ns"], [tuple(r) for r in data["recv"]]).stats()
    assert s.sent == 10  # 0.2 s of 20 ms packets
    assert (s.lost, s.duplicates) == (1, 1)
