"""A resume or a close while the hot standby QEMU is still starting (geomirror/site/standby_side.py).

Found in the lab: a drill rolled back moments after the site had become the standby, so the
takeover began while its hot standby QEMU was starting; the resume started a second, cold QEMU,
then the first one finished starting and was attached to the gate: the resumed guest's replies
went nowhere and the client's connection stalled for good. The QEMU start and resume are stand-ins
here; the StandbySide logic that orders them is the real one."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from geomirror.site import standby_side
from geomirror.site.standby_side import StandbySide


class FakeGuest:
    def __init__(self, name):
        self.name, self.running, self.closed, self.pid = name, True, False, 4242

    async def close(self):
        self.closed, self.running = True, False

    async def detach(self):
        self.running = False


class Recorder:
    def __init__(self):
        self.events: list = []
        self.started: list[FakeGuest] = []
        self.attached: list = []


@pytest.fixture
def side(monkeypatch):
    rec = Recorder()
    tasks: set = set()

    async def slow_hot_start(spec):
        await asyncio.sleep(0.05)  # the QEMU start in flight while the takeover begins
        g = FakeGuest("hot")
        rec.started.append(g)
        rec.events.append(("hot_started", g))
        return g

    async def fake_resume(replica, spec, hot=None):
        guest = hot
        if guest is None:
            guest = FakeGuest("cold")
            rec.started.append(guest)
        rec.events.append(("resumed_on", guest))
        return guest, {"hot_standby": hot is not None}

    async def no_tap(cfg, up):
        return None

    monkeypatch.setattr(standby_side, "start_hot_standby", slow_hot_start)
    monkeypatch.setattr(standby_side, "resume", fake_resume)
    monkeypatch.setattr(standby_side, "set_tap", no_tap)

    def spawn(coro, name=None):
        t = asyncio.get_running_loop().create_task(coro, name=name)
        tasks.add(t)
        return t

    gate = SimpleNamespace(attach_guest=lambda path: (rec.attached.append(path), rec.events.append(("attach", path))),
                           end_inbound_hold=lambda deliver: 0, inject_inbound=lambda frames: None)
    ctx = SimpleNamespace(spawn=spawn, mark=lambda event, **f: rec.events.append((event,)), gate=gate, cfg=None)
    s = StandbySide(ctx, specs=None, witness=None, on_hot=lambda g: rec.events.append(("on_hot", g)))

    async def stop_accepting():
        return None

    s.standby = SimpleNamespace(stop_accepting=stop_accepting, take_forwarded=lambda: [],
                                status=SimpleNamespace(frames_dropped=0))
    s._server = SimpleNamespace(close=lambda: None)
    s.spec = SimpleNamespace(net_socket="/run/x/net.sock")
    s.replica = SimpleNamespace(run_id="r1", close=lambda: None)
    return s, rec, tasks


async def test_a_resume_during_the_hot_start_resumes_on_that_qemu_and_starts_no_other(side):
    s, rec, tasks = side
    s._want_hot()
    await asyncio.sleep(0)  # the start is in flight
    guest, timings, run_id = await s.resume()
    await asyncio.sleep(0.1)  # anything still pending finishes
    await asyncio.gather(*tasks)
    assert [g.name for g in rec.started] == ["hot"], "one QEMU for the guest, not a hot one and a cold one"
    assert guest is rec.started[0] and timings["hot_standby"]
    after = rec.events[rec.events.index(("resumed_on", guest)) + 1:]
    assert [e for e in after if e[0] in ("attach", "on_hot", "hot_started")] == [("attach", "/run/x/net.sock")], \
        "after the resume only the resume itself attaches the gate (no late hot standby re-attaches it)"
    assert s.hot is None


async def test_no_hot_standby_starts_after_a_resume_began(side):
    s, rec, tasks = side
    guest, _, _ = await s.resume()
    s._want_hot()  # e.g. a late commit's event
    await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    assert [g.name for g in rec.started] == ["cold"]


async def test_a_close_during_the_hot_start_closes_that_qemu(side):
    s, rec, tasks = side
    s._want_hot()
    await asyncio.sleep(0)
    await s.close()
    await asyncio.sleep(0.1)
    await asyncio.gather(*tasks)
    assert [g.name for g in rec.started] == ["hot"]
    assert rec.started[0].closed, "a hot standby that finished starting after the close outlived the daemon"
    assert s.hot is None
