"""ICMP echo from inside a lab namespace: how many of N echo requests the guest answered.

The guest's kernel answers echo requests itself (no service, no retransmission, no rate limit on
echo replies), so a request that never gets its reply was lost on the way in or out. The lab
uses it to prove that no inbound frame is lost at a checkpoint (tests/test_colo_lab.py); the
replies are held by the output gate like any guest output, so `wait` must exceed the hold.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from geomirror import netns
from lab import world

ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
PAYLOAD = b"geomirror-echo-probe-0123456789"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def echo_request(ident: int, seq: int, payload: bytes = PAYLOAD) -> bytes:
    head = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum(head + payload), ident, seq) + payload


def parse_reply(packet: bytes, ident: int) -> int | None:
    """The sequence number of an echo reply to `ident` in a raw IPv4 packet, else None."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8:
        return None
    typ, _code, _sum, i, seq = struct.unpack("!BBHHH", packet[ihl:ihl + 8])
    return seq if typ == ICMP_ECHO_REPLY and i == ident else None


@dataclass
class EchoResult:
    sent: int
    answered: int
    seconds: float

    @property
    def lost(self) -> int:
        return self.sent - self.answered


def echo(dst: str, count: int, rate: float, burst: int = 1, wait: float = 3.0,
         ns: str = world.CLIENT) -> EchoResult:
    """Send `count` echo requests to `dst` (IPv4) from namespace `ns`, `burst` at a time at `rate`
    requests/s, and count the replies (up to `wait` seconds after the last request). At most
    65536 requests: the sequence number is 16 bits."""
    if not 0 < count <= 0x10000:
        raise ValueError(f"echo: count {count} is not in 1..65536 (the ICMP sequence number is 16 bits)")
    with netns.inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    answered: set[int] = set()

    def drain(until: float) -> None:
        while True:
            r, _, _ = select.select([s], [], [], max(0.0, until - time.monotonic()))
            if not r:
                return
            seq = parse_reply(s.recv(2048), ident)
            if seq is not None:
                answered.add(seq)

    t0 = time.monotonic()
    try:
        sent = 0
        while sent < count:
            for _ in range(min(burst, count - sent)):
                s.sendto(echo_request(ident, sent), (dst, 0))
                sent += 1
            drain(t0 + sent / rate)
        drain(time.monotonic() + wait)
    finally:
        s.close()
    return EchoResult(sent, len(answered), time.monotonic() - t0)
