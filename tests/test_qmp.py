"""QMP exchanges are never cut off: against a fake QMP server (an asyncio unix socket
speaking the greeting, qmp_capabilities and commands whose reply the test holds back), a
reply that comes after its caller's deadline, or after its caller was cancelled, is logged
as late instead of dropped, and the next command still gets its own reply."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog
from qemu.qmp import QMPClient

from replication.qemu import Guest, GuestError, GuestSpec, LineBudget, QmpLine


def split_json(buf: str) -> tuple[list[dict], str]:
    """The whole JSON objects at the start of `buf` (QMP needs no newline between them) and
    what is left of it."""
    dec, msgs = json.JSONDecoder(), []
    while buf.strip():
        try:
            msg, end = dec.raw_decode(buf.lstrip())
        except ValueError:
            break
        buf = buf.lstrip()[end:]
        msgs.append(msg)
    return msgs, buf


class FakeQmp:
    """Enough of QEMU's monitor: greeting, qmp_capabilities, `query-status`, and `slow`,
    whose reply waits until the test sets `release`. Commands are answered in order, one
    at a time, the way QEMU's monitor does."""

    def __init__(self):
        self.release = asyncio.Event()
        self.received: list[dict] = []
        self.got_slow = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None

    async def serve(self, path) -> None:
        self.server = await asyncio.start_unix_server(self._client, path=str(path))

    @staticmethod
    async def _messages(reader):
        """JSON objects as they arrive (QMP needs no newline between them)."""
        buf = ""
        while chunk := await reader.read(4096):
            msgs, buf = split_json(buf + chunk.decode())
            for msg in msgs:
                yield msg

    async def _client(self, reader, writer) -> None:
        writer.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
                     b'"capabilities": []}}\r\n')
        async for msg in self._messages(reader):
            self.received.append(msg)
            cmd, reply = msg["execute"], {}
            if cmd == "slow":
                self.got_slow.set()
                await self.release.wait()
                reply = {"return": {"slow": True}}
            elif cmd == "query-status":
                reply = {"return": {"status": "running", "running": True}}
            elif cmd == "qmp_capabilities":
                reply = {"return": {}}
            else:
                reply = {"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"}}
            if "id" in msg:
                reply["id"] = msg["id"]
            writer.write(json.dumps(reply).encode() + b"\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def fake(tmp_path):
    f = FakeQmp()
    await f.serve(tmp_path / "qmp.sock")
    client = QMPClient("fake")
    await client.connect(str(tmp_path / "qmp.sock"))
    f.client = client
    yield f
    f.release.set()
    await client.disconnect()
    f.server.close()


def dropped(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "message dropped" in r.getMessage()]


async def turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_reply_after_the_deadline_is_logged_late_and_the_next_command_gets_its_own(fake, caplog):
    caplog.set_level(logging.WARNING, logger="qemu.qmp")
    line = QmpLine(fake.client, "t")
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(GuestError, match=r"did not answer slow \(id gm-1\) within 0\.05s"):
            await line.execute("slow", timeout=0.05)
        assert line.outstanding == ["gm-1"]
        nxt = asyncio.create_task(line.execute("query-status"))
        await turns()
        assert not nxt.done()  # it waits for the outstanding `slow` first
        assert [m["execute"] for m in fake.received] == ["qmp_capabilities", "slow"]
        fake.release.set()
        assert await nxt == {"status": "running", "running": True}
    late = [e for e in logs if e["event"] == "qemu.qmp_late_reply"]
    assert len(late) == 1
    assert late[0]["command"] == "slow" and late[0]["id"] == "gm-1" and late[0]["outcome"] == "ok"
    assert late[0]["abandoned"] == "deadline" and late[0]["latency_ms"] > 0
    assert line.outstanding == [] and dropped(caplog) == []


async def test_cancelling_the_caller_leaves_the_exchange_and_the_next_command_works(fake, caplog):
    caplog.set_level(logging.WARNING, logger="qemu.qmp")
    line = QmpLine(fake.client, "t")
    with structlog.testing.capture_logs() as logs:
        caller = asyncio.create_task(line.execute("slow", timeout=60))
        await fake.got_slow.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert line.outstanding == ["gm-1"]
        fake.release.set()
        assert (await line.execute("query-status"))["status"] == "running"
        assert (await line.execute("query-status"))["status"] == "running"
    late = [e for e in logs if e["event"] == "qemu.qmp_late_reply"]
    assert [(e["command"], e["abandoned"], e["outcome"]) for e in late] == [("slow", "cancelled", "ok")]
    assert dropped(caplog) == []


async def test_an_exchange_that_never_ends_declares_qemu_unresponsive(fake):
    line = QmpLine(fake.client, "t", stuck_s=0.2)
    with pytest.raises(GuestError, match="did not answer slow"):
        await line.execute("slow", timeout=0.05)
    with pytest.raises(GuestError, match=r"unresponsive: slow \(id gm-1\) has had no answer .*query-status was not sent"):
        await line.execute("query-status")
    assert [m["execute"] for m in fake.received] == ["qmp_capabilities", "slow"]


async def test_a_refused_command_is_a_guest_error_naming_it(fake):
    line = QmpLine(fake.client, "t")
    with pytest.raises(GuestError, match="refused no-such-thing: The command no-such-thing has not been found"):
        await line.execute("no-such-thing")
    assert (await line.execute("query-status"))["running"] is True


async def test_guest_commands_go_through_the_line(fake, tmp_path):
    spec = GuestSpec(name="g", memory_mb=16, kernel=tmp_path / "k", initrd=tmp_path / "i", append="",
                     ram_path=tmp_path / "ram", qmp_path=tmp_path / "qmp.sock", serial_path=tmp_path / "s",
                     net_socket=tmp_path / "n")
    g = Guest(spec)
    with pytest.raises(GuestError, match="guest g has no QMP connection"):
        await g.status()
    g.qmp, g._line = fake.client, QmpLine(fake.client, "g")
    assert await g.status() == "running"
    caller = asyncio.create_task(g._execute("slow"))
    await fake.got_slow.wait()
    caller.cancel()
    fake.release.set()
    assert await g.status() == "running"


def test_line_budget_lets_n_lines_a_window_through_and_counts_the_rest():
    b = LineBudget(per_window=3, window_s=1.0)
    first = [b.admit(10.0 + i * 0.01) for i in range(10)]
    assert [ok for ok, _ in first] == [True] * 3 + [False] * 7
    assert all(report == 0 for _, report in first)
    ok, report = b.admit(11.5)  # a new window: the 7 suppressed lines are reported once
    assert ok and report == 7
    assert [b.admit(11.6) for _ in range(3)] == [(True, 0), (True, 0), (False, 0)]
    assert b.flush() == 1 and b.flush() == 0
