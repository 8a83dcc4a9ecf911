"""Framed messages between the two sites over one TCP stream (mutual TLS in production).

Each message: 1-byte type, 8-byte big-endian length, payload (protocol 3; protocol 2
had a 4-byte length, which stopped at 4 GiB: a checkpoint of a guest of 4 GiB or more
can carry a whole RAM's worth of changed pages). Every type has a size cap: the control messages a few bytes or 64 KiB
(`TYPE_CAPS`), the bulk ones (HASHES, SYNC, CHECKPOINT) the channel's `max_frame`
(guest RAM + 64 MiB in the service). A length over its type's cap, an unknown type,
or a stream cut mid-message is a `ChannelError` naming the peer: the connection is
dropped and nothing from it is applied.

Frames are atomic on the wire (one writer at a time holds the channel's lock for a
whole frame), but a large payload goes out in `slice_bytes` slices with the event
loop free between them, and a large payload comes in the same way, so a 64 MiB
checkpoint does not stall the loop (heartbeat timers, the gate, the HA tick). A sender
cancelled in the middle of a frame leaves the stream unframeable: the channel is
closed then and every later send fails.

Heartbeats (replication/session.py) are HEARTBEAT messages of three u64: a sequence
number, the sender's monotonic clock in ns and the sender's lease generation. The
receiver sends the same 24 bytes back as HEARTBEAT_ECHO and reports the generation;
the sender times the echo against its own clock for the RTT estimate.

GUEST_FRAMES (a planned switchover) carries Ethernet frames for the guest that reached the old
primary after its final epoch, to be given to the guest where it resumes: `pack_frames` /
`unpack_frames`. It is sent only to a standby whose HELLO_REPLY carries `HELLO_FRAMES_KEY`, so
builds of the same protocol version without it still pair (they lose those frames, as before).
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
from replication.tcpinfo import TcpInfo, read_tcp_info

log = structlog.get_logger(__name__)

# 6: checkpoint frames v5 (disk zero ranges); 5: checkpoint frames v4 (disk section), DISK_HASHES,
# "disk_bytes" in HELLO/HELLO_REPLY; 4: checkpoint frames v3 (replica check), DIVERGED; 3: 64-bit frame lengths
PROTOCOL_VERSION = 6
_HDR = struct.Struct(">BQ")
HEADER_SIZE = _HDR.size
DEFAULT_MAX_FRAME = 64 << 20
SLICE_BYTES = 1 << 20  # a payload larger than this is written and read in slices of it
_JOIN_IN_THREAD = 8 << 20  # joining the slices of a payload this large is left to a thread (no GIL held)


class MsgType(enum.IntEnum):
    HELLO = 1  # JSON: primary -> standby
    HELLO_REPLY = 2  # JSON: standby -> primary
    ERROR = 3  # JSON {message}: either side, then close
    HASHES = 4  # raw 16-byte block hashes of the standby's replica
    SYNC_BEGIN = 5  # JSON {mode, blocks, block_pages}
    SYNC = 6  # codec frame, FULL pages
    CHECKPOINT = 7  # codec frame, one epoch
    ACK = 8  # u64 committed epoch
    HEARTBEAT = 9  # u64 seq, u64 sender monotonic ns, u64 sender lease generation
    HEARTBEAT_ECHO = 10  # the same 24 bytes, echoed
    SWITCHOVER = 11  # u64 epoch: primary -> standby, "take over from this epoch" (planned switchover)
    DIVERGED = 12  # JSON {epoch, offset, length, expected, found}: standby -> primary, then close
    GUEST_FRAMES = 13  # (u32 length, Ethernet frame)*: primary -> standby in a handover, frames for the guest
    DISK_HASHES = 14  # raw 16-byte hashes of the standby's replica disk, per 64 KiB (after HASHES)


HELLO_DISK_KEY = "disk_bytes"  # in HELLO / HELLO_REPLY: the size of the guest's disk (0: none)


HELLO_FRAMES_KEY = "guest_frames"  # in HELLO_REPLY: this standby takes GUEST_FRAMES
GUEST_FRAMES_CAP = 1 << 20  # one GUEST_FRAMES message; more frames go in several
MAX_GUEST_FRAME = 65536 + 64  # an Ethernet frame from the TAP (replication/gate.py MAX_FRAME)
_U32 = struct.Struct(">I")


_JSON_CAP = 64 << 10
# The control messages are small whatever the guest's size; the types not named here
# (HASHES, SYNC, CHECKPOINT) are bounded by the channel's max_frame only.
TYPE_CAPS: dict[MsgType, int] = {
    MsgType.HELLO: _JSON_CAP, MsgType.HELLO_REPLY: _JSON_CAP, MsgType.ERROR: _JSON_CAP,
    MsgType.SYNC_BEGIN: _JSON_CAP, MsgType.DIVERGED: _JSON_CAP, MsgType.ACK: 8, MsgType.SWITCHOVER: 8,
    MsgType.HEARTBEAT: 64, MsgType.HEARTBEAT_ECHO: 64, MsgType.GUEST_FRAMES: GUEST_FRAMES_CAP,
}


class ChannelError(GeomirrorError):
    """The peer sent something that breaks the protocol, or the stream broke."""


class PeerRefused(ChannelError):
    """The peer refused us (version or guest configuration mismatch); carries its reason."""


class Channel:
    """A framed, typed message stream. One reader, any number of writers (serialised per frame)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 max_frame: int = DEFAULT_MAX_FRAME, peer: str = "?"):
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame
        self.peer = peer
        self.slice_bytes = SLICE_BYTES  # 0: a payload is written in one piece (no pause inside a frame)
        self._wlock = asyncio.Lock()
        self._broken: str | None = None  # why no frame can be sent any more (a frame was cut short)
        self.bytes_sent = 0
        self.bytes_received = 0

    def frame_cap(self, mtype: MsgType) -> int:
        """The largest payload of type `mtype` this channel sends or accepts."""
        return min(TYPE_CAPS.get(mtype, self.max_frame), self.max_frame)

    async def send(self, mtype: MsgType, payload: bytes | bytearray | memoryview = b"") -> None:
        view = memoryview(payload).cast("B")
        n = view.nbytes
        cap = self.frame_cap(mtype)
        if n > cap:
            raise ChannelError(f"refusing to send a {mtype.name} of {n} bytes to {self.peer} (cap {cap})")
        async with self._wlock:
            if self._broken is not None:
                raise ChannelError(self._broken)
            self.writer.write(_HDR.pack(mtype, n))
            step = self.slice_bytes or n
            if n <= step:  # written whole before the first await: a cancel cannot cut it
                if n:
                    self.writer.write(view)
                self.bytes_sent += _HDR.size + n
                await self.writer.drain()
                return
            done = 0
            try:
                while done < n:
                    self.writer.write(view[done:done + step])
                    done = min(n, done + step)
                    await self.writer.drain()
                    await asyncio.sleep(0)  # drain returns at once while the transport has room
            except BaseException:
                if done < n:
                    self._abandon(f"a {mtype.name} to {self.peer} was cut off after {done} of {n} bytes; "
                                  "the stream cannot be framed any more")
                raise
            finally:
                self.bytes_sent += _HDR.size + done

    def _abandon(self, why: str) -> None:
        self._broken = why
        log.warning("channel.abandoned", peer=self.peer, reason=why)
        self.close()

    async def send_heartbeat(self, payload: bytes) -> None:
        """Waits for a frame in progress to finish: frames never interleave on the stream."""
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
        cap = self.frame_cap(mtype)
        if n > cap:
            raise ChannelError(f"{self.peer} sent a {mtype.name} of {n} bytes, over the cap of {cap} "
                               f"for {mtype.name} (garbage, or a peer of another protocol version)")
        payload = await self._read_payload(mtype, n)
        self.bytes_received += _HDR.size + n
        if mtype is MsgType.ERROR:
            raise PeerRefused(f"{self.peer} refused: {_json(payload).get('message', payload[:200])}")
        return mtype, payload

    async def _read_payload(self, mtype: MsgType, n: int) -> bytes:
        """`n` bytes; a large payload in slices, the loop free between them and for the final join."""
        if not n:
            return b""
        step = self.slice_bytes or n
        parts: list[bytes] = []
        got = 0
        while got < n:
            try:
                part = await self.reader.readexactly(min(step, n - got))
            except asyncio.IncompleteReadError as e:
                raise ChannelError(f"{self.peer} cut a {mtype.name} off after {got + len(e.partial)} "
                                   f"of {n} bytes") from None
            except (ConnectionError, _ssl.SSLError) as e:
                raise ChannelError(f"connection to {self.peer} broke: {e}") from None
            parts.append(part)
            got += len(part)
        if len(parts) == 1:
            return parts[0]
        if n >= _JOIN_IN_THREAD:
            return await asyncio.to_thread(b"".join, parts)
        return b"".join(parts)

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
        except (ChannelError, OSError, asyncio.TimeoutError):
            pass  # best effort: the peer may be gone already; we close either way
        self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except (OSError, RuntimeError):  # already torn down, or its loop is closed
            pass

    def tcp_info(self) -> TcpInfo | None:
        """The kernel's TCP_INFO of this channel's connection (under TLS too: the TCP socket beneath
        it); None for a channel that is not TCP or no longer open."""
        return read_tcp_info(self.writer.get_extra_info("socket"))

    def ssl_object(self):
        return self.writer.get_extra_info("ssl_object")

    def peer_cert_serial(self) -> str | None:
        """The serial (hex) of the certificate the peer presented on this connection, if TLS."""
        obj = self.ssl_object()
        cert = obj.getpeercert() if obj is not None else None
        return cert.get("serialNumber") if cert else None


def pack_frames(frames: list[bytes], cap: int = GUEST_FRAMES_CAP) -> tuple[bytes, int]:
    """The payload of one GUEST_FRAMES message: as many of `frames` (from the first) as fit in
    `cap`, at least one. Returns it and how many frames it carries."""
    out, n, size = [], 0, 0
    for f in frames:
        if len(f) > MAX_GUEST_FRAME:
            raise ChannelError(f"a guest frame of {len(f)} bytes is over {MAX_GUEST_FRAME}")
        if n and size + _U32.size + len(f) > cap:
            break
        out += (_U32.pack(len(f)), f)
        size += _U32.size + len(f)
        n += 1
    return b"".join(out), n


def unpack_frames(payload: bytes, peer: str = "peer") -> list[bytes]:
    """The frames of a GUEST_FRAMES payload; a length that does not fit is a `ChannelError`."""
    frames, off, end = [], 0, len(payload)
    while off < end:
        if off + _U32.size > end:
            raise ChannelError(f"{peer} sent a GUEST_FRAMES cut inside a frame length")
        (n,) = _U32.unpack_from(payload, off)
        off += _U32.size
        if n > MAX_GUEST_FRAME or off + n > end:
            raise ChannelError(f"{peer} sent a GUEST_FRAMES with a frame of {n} bytes that does not fit "
                               f"({end - off} left, at most {MAX_GUEST_FRAME})")
        frames.append(payload[off:off + n])
        off += n
    return frames


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
        except asyncio.CancelledError:  # the service stops: end this connection quietly (asyncio's
            pass  # server would otherwise log the cancelled handler as an unhandled error)
        except Exception as e:  # never let one bad peer take the service down
            log.warning("channel.handler_failed", peer=ch.peer, error=str(e))
        finally:
            ch.close()

    return await asyncio.start_server(_on, host, port, ssl=ssl, limit=1 << 20, reuse_address=True)
