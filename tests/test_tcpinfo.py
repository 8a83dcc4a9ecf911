"""TCP_INFO: the offsets match this system's linux/tcp.h, a real loopback connection reads back the
bytes it moved, and a replication channel (plain and under mutual TLS, asyncio and uvloop) gives its
connection's RTT."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from pathlib import Path

import pytest
import uvloop

from geomirror import pairing
from replication.tcpinfo import FIELDS, TCP_ESTABLISHED, TcpInfo, parse_tcp_info, read_tcp_info
from replication.transport import Channel, MsgType, connect, serve

HEADER = Path("/usr/include/linux/tcp.h")


def header_layout(text: str) -> dict[str, tuple[int, int]]:
    """name -> (offset, size) of struct tcp_info as the C compiler lays it out (natural alignment;
    a line of bit-fields fills one unit of its type)."""
    body = re.search(r"struct tcp_info \{(.*?)\n\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    out, off = {}, 0
    for decl in filter(None, (d.strip() for d in body.split(";"))):
        m = re.fullmatch(r"__u(8|16|32|64)\s+(.+)", decl, re.S)
        assert m, f"unexpected declaration in struct tcp_info: {decl!r}"
        size = int(m.group(1)) // 8
        off = -(-off // size) * size
        for name in m.group(2).split(","):
            out[name.split(":")[0].strip()] = (off, size)
        off += size
    return out


@pytest.mark.skipif(not HEADER.exists(), reason="no linux/tcp.h on this system (linux-libc-dev)")
def test_offsets_are_those_of_linux_tcp_h():
    layout = header_layout(HEADER.read_text())
    assert layout["tcpi_rtt"] == (68, 4) and layout["tcpi_min_rtt"] == (148, 4)  # the parser itself
    for name, (off, code) in FIELDS.items():
        assert layout[name] == (off, struct.calcsize("=" + code)), name


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    srv = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(srv.getsockname())
    server, _ = srv.accept()
    srv.close()
    return client, server


def test_a_real_loopback_connection_reads_back_what_it_moved():
    client, server = loopback_pair()
    try:
        sent, answered = 300_001, 4_999
        client.sendall(b"q" * sent)
        got = 0
        while got < sent:
            got += len(server.recv(1 << 20))
        server.sendall(b"a" * answered)
        got = 0
        while got < answered:  # the answer carries the ACK of everything sent
            got += len(client.recv(1 << 20))
        c, s = read_tcp_info(client), read_tcp_info(server)
        assert c.state == s.state == TCP_ESTABLISHED
        assert c.bytes_received == answered and s.bytes_received == sent  # the u64s at 120/128
        assert c.bytes_acked in (sent, sent + 1)  # + 1: the kernel counts the SYN
        assert c.unacked == 0 and c.notsent_bytes == 0
        assert c.snd_mss > 0 and c.snd_cwnd > 0 and c.total_retrans == 0
        assert c.rtt_us > 0 and c.min_rtt_us is not None and 0 < c.min_rtt_us <= c.rtt_us + c.rttvar_us
        assert c.rto_us >= c.rtt_us  # RTO is at least the RTT (200 ms minimum on Linux)
    finally:
        client.close()
        server.close()


def test_no_tcp_info_where_there_is_no_tcp():
    a, b = socket.socketpair()
    assert read_tcp_info(a) is None  # AF_UNIX
    a.close()
    b.close()
    client, server = loopback_pair()
    server.close()
    client.close()
    assert read_tcp_info(client) is None  # closed: EBADF, not an exception
    assert read_tcp_info(None) is None


def test_a_short_answer_gives_what_it_holds():
    raw = bytearray(256)
    struct.pack_into("=II", raw, 68, 1500, 250)
    struct.pack_into("=I", raw, 148, 900)
    assert parse_tcp_info(bytes(raw)).min_rtt_us == 900
    old = parse_tcp_info(bytes(raw[:104]))  # a kernel before 4.6: no tcpi_min_rtt
    assert (old.rtt_us, old.rttvar_us, old.min_rtt_us, old.bytes_acked) == (1500, 250, None, None)
    assert parse_tcp_info(bytes(raw[:72])) is None  # not even tcpi_rttvar


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("tls", [False, True])
def test_a_channel_reads_its_connections_tcp_info(tmp_path, loop, tls):
    """The socket beneath the channel (uvloop gives a PseudoSocket, asyncio a TransportSocket,
    TLS the TCP socket under it) answers TCP_INFO for the bytes the channel moved."""
    async def main() -> tuple[TcpInfo | None, int]:
        files = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], []) if tls else None
        got = asyncio.Queue()

        async def handler(ch):
            mtype, payload = await ch.recv()
            await ch.send(MsgType.ACK, bytes(8))
            await got.put(len(payload))
            await asyncio.sleep(1)  # keep the connection until the client has read TCP_INFO

        server = await serve("127.0.0.1", 0, handler,
                             ssl=pairing.server_context(files.ca, *files.certs["site-b"]) if tls else None)
        port = server.sockets[0].getsockname()[1]
        ch = await connect("127.0.0.1", port, server_hostname="site-b" if tls else None,
                           ssl=pairing.client_context(files.ca, *files.certs["site-a"]) if tls else None)
        try:
            await ch.send(MsgType.CHECKPOINT, b"c" * 500_000)
            assert await ch.recv() == (MsgType.ACK, bytes(8))
            return ch.tcp_info(), ch.bytes_sent
        finally:
            ch.close()
            server.close()

    info, sent = uvloop.run(main()) if loop == "uvloop" else asyncio.run(main())
    assert info is not None and info.state == TCP_ESTABLISHED
    assert info.bytes_acked >= sent  # TLS adds its records and handshake
    assert info.rtt_us > 0 and info.min_rtt_us > 0


async def test_a_channel_that_is_not_tcp_has_no_tcp_info():
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    cha, chb = Channel(ra, wa), Channel(rb, wb)
    assert cha.tcp_info() is None
    cha.close()
    chb.close()
