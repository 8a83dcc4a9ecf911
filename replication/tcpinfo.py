"""The kernel's view of one TCP connection (Linux `TCP_INFO`): the path's round trip as TCP
measures it, which the replication channel's own queue does not inflate.

TCP times a segment from the moment it leaves this host to its ACK, so bytes waiting in our
socket buffer or in the channel's write lock (a checkpoint frame going out in slices) and the
peer's event loop are not in it; a heartbeat's round trip is (replication/session.py). The
pacer takes the path's RTT from here (docs/pacer.md).

`parse_tcp_info` is pure (bytes in, `TcpInfo` out), with the offsets of `struct tcp_info` in
linux/tcp.h (`FIELDS`; tests/test_tcpinfo.py checks them against the header and a real
socket); `read_tcp_info` is the I/O edge: None where there is no TCP_INFO (not Linux, not a
TCP socket, the socket closed).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

# struct tcp_info (linux/tcp.h): the fields read here, kernel name -> (offset, struct code), in the
# host's byte order. Older kernels return a shorter struct (tcpi_min_rtt came with Linux 4.6).
FIELDS: dict[str, tuple[int, str]] = {
    "tcpi_state": (0, "B"),
    "tcpi_rto": (8, "I"),  # µs
    "tcpi_snd_mss": (16, "I"),
    "tcpi_unacked": (24, "I"),
    "tcpi_rtt": (68, "I"),  # smoothed RTT, µs (srtt)
    "tcpi_rttvar": (72, "I"),  # its mean deviation, µs
    "tcpi_snd_cwnd": (80, "I"),
    "tcpi_total_retrans": (100, "I"),
    "tcpi_bytes_acked": (120, "Q"),
    "tcpi_bytes_received": (128, "Q"),
    "tcpi_notsent_bytes": (144, "I"),
    "tcpi_min_rtt": (148, "I"),  # the lowest RTT sample of the last net.ipv4.tcp_min_rtt_wlen (300) s, µs
}
_REQUIRED = "tcpi_rttvar"  # a struct too short to hold this is no use
BUFLEN = 256  # asked for; the kernel returns min(this, its struct size)
TCP_ESTABLISHED = 1


def _end(name: str) -> int:
    off, code = FIELDS[name]
    return off + struct.calcsize("=" + code)


@dataclass(frozen=True)
class TcpInfo:
    state: int
    rto_us: int
    snd_mss: int
    unacked: int
    rtt_us: int
    rttvar_us: int
    snd_cwnd: int | None = None
    total_retrans: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None
    notsent_bytes: int | None = None
    min_rtt_us: int | None = None  # None: the kernel is older than 4.6

    @property
    def rtt_ms(self) -> float:
        return self.rtt_us / 1000

    @property
    def rttvar_ms(self) -> float:
        return self.rttvar_us / 1000

    @property
    def min_rtt_ms(self) -> float | None:
        return None if self.min_rtt_us is None else self.min_rtt_us / 1000


def parse_tcp_info(raw: bytes) -> TcpInfo | None:
    """The fields of a TCP_INFO answer `raw` (as long as the kernel made it); None if it is too short
    to hold the RTT and its variance."""
    if len(raw) < _end(_REQUIRED):
        return None
    vals = {}
    for name, (off, code) in FIELDS.items():
        if off + struct.calcsize("=" + code) <= len(raw):
            (vals[name.removeprefix("tcpi_")],) = struct.unpack_from("=" + code, raw, off)
    return TcpInfo(state=vals["state"], rto_us=vals["rto"], snd_mss=vals["snd_mss"], unacked=vals["unacked"],
                   rtt_us=vals["rtt"], rttvar_us=vals["rttvar"], snd_cwnd=vals.get("snd_cwnd"),
                   total_retrans=vals.get("total_retrans"), bytes_acked=vals.get("bytes_acked"),
                   bytes_received=vals.get("bytes_received"), notsent_bytes=vals.get("notsent_bytes"),
                   min_rtt_us=vals.get("min_rtt"))


def read_tcp_info(sock) -> TcpInfo | None:
    """TCP_INFO of `sock` (a socket, or the socket-like object an asyncio/uvloop transport gives);
    None where there is none: no TCP_INFO on this system, not a TCP socket, the socket closed."""
    opt = getattr(socket, "TCP_INFO", None)
    if sock is None or opt is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, opt, BUFLEN)
    except OSError as e:  # closed under us (EBADF), or a system without it (ENOPROTOOPT)
        log.debug("tcpinfo.unavailable", error=str(e))
        return None
    return parse_tcp_info(raw)
