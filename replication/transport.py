"""Framed messages between the two sites over one TCP stream (mutual TLS in production).

Each message: 1-byte type, 4-byte big-endian length, payload. A length over the
negotiated cap, an unknown type, or a stream cut mid-message is a `ChannelError`:
the connection is dropped and nothing from it is applied.
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
import ssl as _ssl
import struct

import structlog

from gmbase.errors import GeomirrorError

log = structlog.get_logger(__name__)

PROTOCOL_VERSION = 2  # 2: checkpoint frames v2 (per-page raw/XOR)
_HDR = struct.Struct(">BI")
DEFAULT_MAX_FRAME = 64 << 20


class MsgType(enum.IntEnum):
    HELLO = 1  # JSON: primary -> standby
    HELLO_REPLY = 2  # JSON: standby -> primary
    ERROR = 3  # JSON {message}: either side, then close
    HASHES = 4  # raw 16-byte block hashes of the standby's replica
    SYNC_BEGIN = 5  # JSON {mode, blocks, block_pages}
    SYNC = 6  # codec frame, FULL pages
    CHECKPOINT = 7  # codec frame, one epoch
    ACK = 8  # u64 committed epoch
    HEARTBEAT = 9  # u64 seq, u64 sender monotonic ns
    HEARTBEAT_ECHO = 10  # the same, echoed
    SWITCHOVER = 11  # u64 epoch: primary -> standby, "take over from this epoch" (planned switchover)


class ChannelError(GeomirrorError):
    """The peer sent something that breaks the protocol, or the stream broke."""


class PeerRefused(ChannelError):
    """The peer refused us (version or guest configuration mismatch); carries its reason."""


class Channel:
    """A framed, typed message stream. One reader, any number of writers (serialised)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int = DEFAULT_MAX_FRAME, peer: str = "?"):
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.peer = peer
        self._wlock = asyncio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def send(self, mtype: MsgType, payload: bytes | memoryview = b"") -> None:
        if len(payload) > self.max_frame:
            raise ChannelError(f"refusing to send a {mtype.name} of {len(payload)} bytes "
                               f"(cap {self.max_frame})")
        async with self._wlock:
            self.writer.write(_HDR.pack(mtype, len(payload)))
            if payload:
                self.writer.write(payload)
            self.bytes_sent += _HDR.size + len(payload)
            await self.writer.drain()

    async def send_heartbeat(self, payload: bytes) -> None:
        await self.send(MsgType.HEARTBEAT, payload)

    async def send_json(self, mtype: MsgType, obj) -> None:
        await self.send(mtype, json.dumps(obj).encode())

    async def recv(self) -> tuple[MsgType, bytes]:
        try:
            hdr = await self.reader.readexactly(_HDR.size)
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise ChannelError(f"{self.peer} closed the connection") from None
            raise ChannelError(f"{self.peer} cut a message header short") from None
        except (ConnectionError, _ssl.SSLError) as e:
            raise ChannelError(f"connection to {self.peer} broke: {e}") from None
        t, n = _HDR.unpack(hdr)
        try:
            mtype = MsgType(t)
        except ValueError:
            raise ChannelError(f"{self.peer} sent unknown message type {t} (garbage or another protocol)") from None
        if n > self.max_frame:
            raise ChannelError(f"{self.peer} sent a {mtype.name} of {n} bytes, over the cap of {self.max_frame}")
        try:
            payload = await self.reader.readexactly(n) if n else b""
        except asyncio.IncompleteReadError as e:
            raise ChannelError(f"{self.peer} cut a {mtype.name} off after {len(e.partial)} of {n} bytes") from None
        except (ConnectionError, _ssl.SSLError) as e:
            raise ChannelError(f"connection to {self.peer} broke: {e}") from None
        self.bytes_received += _HDR.size + n
        if mtype is MsgType.ERROR:
            raise PeerRefused(f"{self.peer} refused: {_json(payload).get('message', payload[:200])}")
        return mtype, payload

    async def recv_json(self, expect: MsgType) -> dict:
        mtype, payload = await self.recv()
        if mtype is not expect:
            raise ChannelError(f"{self.peer} sent {mtype.name} where {expect.name} was expected")
        obj = _json(payload)
        if not isinstance(obj, dict):
            raise ChannelError(f"{self.peer} sent a malformed {expect.name}")
        return obj

    async def refuse(self, message: str) -> None:
        try:
            await asyncio.wait_for(self.send_json(MsgType.ERROR, {"message": message}), 2)
        except Exception:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:
            pass

    def ssl_object(self):
        return self.writer.get_extra_info("ssl_object")

    def peer_cert_serial(self) -> str | None:
        """The serial (hex) of the certificate the peer presented on this connection, if TLS."""
        obj = self.ssl_object()
        cert = obj.getpeercert() if obj is not None else None
        return cert.get("serialNumber") if cert else None


def _json(payload: bytes):
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return {}


def _tune(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def connect(host: str, port: int, *, ssl: _ssl.SSLContext | None = None,
                  server_hostname: str | None = None, timeout: float = 5.0,
                  max_frame: int = DEFAULT_MAX_FRAME, local_addr: tuple | None = None) -> Channel:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        host, port, ssl=ssl, server_hostname=server_hostname if ssl else None,
        limit=1 << 20, local_addr=local_addr), timeout)
    _tune(writer)
    return Channel(reader, writer, max_frame, peer=server_hostname or f"{host}:{port}")


async def serve(host: str, port: int, handler, *, ssl: _ssl.SSLContext | None = None,
                max_frame: int = DEFAULT_MAX_FRAME) -> asyncio.AbstractServer:
    """Accept connections; `handler(channel)` runs per connection."""

    async def _on(reader, writer):
        _tune(writer)
        peer = writer.get_extra_info("peername")
        ch = Channel(reader, writer, max_frame, peer=f"{peer[0]}:{peer[1]}" if peer else "peer")
        try:
            await handler(ch)
        except Exception as e:  # never let one bad peer take the service down
            log.warning("channel.handler_failed", peer=ch.peer, error=str(e))
        finally:
            ch.close()

    return await asyncio.start_server(_on, host, port, ssl=ssl, limit=1 << 20, reuse_address=True)
