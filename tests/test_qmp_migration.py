"""The device-state stream is read while `migrate` is in flight, not after its reply.

QEMU's migration thread writes the device state with blocking writes while it holds the big
QEMU lock, and the monitor needs that lock to send `migrate`'s reply. Against a fake QEMU
that keeps that order (the whole stream written before the reply), a reader that waited for
the reply first dead-locked until its QMP deadline cut the socket."""

from __future__ import annotations

import array
import asyncio
import json
import socket
import threading

import pytest
from qemu.qmp import QMPClient

from replication.qemu import Guest, GuestError, GuestSpec, QmpLine
from tests.test_qmp import split_json

STREAM = bytes(range(256)) * (16 << 10)  # 4 MiB: far more than a socketpair's buffer


class FakeMigratingQemu(threading.Thread):
    """One QMP client: greeting, qmp_capabilities, getfd (the fd passed with SCM_RIGHTS),
    migrate (the whole stream written into that fd, blocking, then the reply and the
    MIGRATION completed event), migrate_cancel and query-migrate."""

    def __init__(self, path, stream: bytes, refuse_migrate: bool = False):
        super().__init__(daemon=True)
        self.stream, self.refuse_migrate = stream, refuse_migrate
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.write_error: str | None = None
        self.commands: list[str] = []

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, '
                         b'"capabilities": []}}\r\n')
            buf, fds = "", []
            while True:
                data, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
                if not data:
                    return
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
                msgs, buf = split_json(buf + data.decode())
                for msg in msgs:
                    for out in self._answer(msg, fds):
                        conn.sendall(json.dumps(out).encode() + b"\r\n")

    def _answer(self, msg: dict, fds: list[int]) -> list[dict]:
        cmd = msg["execute"]
        self.commands.append(cmd)
        events = []
        if cmd == "migrate" and self.refuse_migrate:
            reply = {"error": {"class": "GenericError", "desc": "no migration today"}}
        elif cmd == "migrate":
            out = socket.socket(fileno=fds.pop())
            try:  # the migration thread: all of it, blocking, before the monitor can answer
                out.sendall(self.stream)
            except OSError as e:
                self.write_error = str(e)
            finally:
                out.close()
            reply = {"return": {}}
            events.append({"event": "MIGRATION", "data": {"status": "failed" if self.write_error else "completed"},
                           "timestamp": {"seconds": 0, "microseconds": 0}})
        elif cmd == "query-migrate":
            reply = {"return": {"status": "cancelled"}}
        else:  # qmp_capabilities, getfd, migrate_cancel
            reply = {"return": {}}
        if "id" in msg:
            reply["id"] = msg["id"]
        return [reply, *events]


async def _guest_on(tmp_path) -> Guest:
    spec = GuestSpec(name="g", memory_mb=16, kernel=tmp_path / "k", initrd=tmp_path / "i", append="",
                     ram_path=tmp_path / "ram", qmp_path=tmp_path / "qmp.sock", serial_path=tmp_path / "s",
                     net_socket=tmp_path / "n")
    g = Guest(spec)
    g.qmp = QMPClient("g")
    await g.qmp.connect(str(tmp_path / "qmp.sock"))
    g._line = QmpLine(g.qmp, "g")
    g._event_task = asyncio.create_task(g._pump_events())
    return g


async def _close(g: Guest) -> None:
    g._event_task.cancel()
    await g.qmp.disconnect()


async def test_a_device_state_larger_than_the_socket_buffer_is_read_before_migrate_answers(tmp_path):
    fake = FakeMigratingQemu(tmp_path / "qmp.sock", STREAM)
    fake.start()
    g = await _guest_on(tmp_path)
    try:
        state = await g.save_device_state(timeout=5.0)
    finally:
        await _close(g)
    assert state == STREAM
    assert fake.write_error is None
    assert fake.commands == ["qmp_capabilities", "getfd", "migrate"]


async def test_a_refused_migrate_stops_the_reader_and_settles_the_migration(tmp_path):
    fake = FakeMigratingQemu(tmp_path / "qmp.sock", STREAM, refuse_migrate=True)
    fake.start()
    g = await _guest_on(tmp_path)
    try:
        with pytest.raises(GuestError, match="refused migrate: no migration today"):
            await g.save_device_state(timeout=5.0)
        assert not [t for t in asyncio.all_tasks() if "stream" in repr(t.get_coro())]
    finally:
        await _close(g)
    assert fake.commands[:4] == ["qmp_capabilities", "getfd", "migrate", "migrate_cancel"]
