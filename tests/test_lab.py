"""Foundation: the lab comes up, the guest at site A answers memcached from gm-client,
and `lab down` leaves no namespace or process behind."""

from __future__ import annotations

import os

import pytest

from geomirror import lab, labctl, netns

pytestmark = pytest.mark.lab


def test_lab_up_guest_answers_and_down_removes_everything(lab_up):
    st = labctl.status()
    assert set(st["namespaces"]) == set(lab.NAMESPACES)
    a, b = st["sites"]["site-a"], st["sites"]["site-b"]
    assert a["role"] == "primary" and b["role"] == "standby"
    assert a["committed_epoch"] > 0

    mc = labctl.Memcache(labctl.client_connect())
    assert mc.set("greeting", "hello") == b"STORED"
    assert mc.get("greeting") == b"hello"
    assert mc.set("n", "41") == b"STORED"
    assert mc.incr("n") == 42
    assert mc.incr("n", 8) == 50
    mc.close()

    pids = set(lab.load_state()["pids"].values())
    for ns in lab.NAMESPACES:
        pids.update(lab.pids_in_netns(ns))
    assert pids, "the lab recorded no processes"
    lab.down()
    assert not [n for n in netns.listed() if n.startswith("gm-")]
    alive = [p for p in pids if lab._alive(p)]
    assert not alive, f"processes left after lab down: {alive}"
    # idempotent
    assert lab.down() == []


def test_lab_refuses_busy_namespace(lab_env):
    netns.create(lab.CLIENT)
    try:
        with pytest.raises(lab.LabError, match="gm-client already exists"):
            lab.up(with_daemons=False)
        # nothing half made: the other namespaces were not created
        assert [n for n in lab.NAMESPACES if netns.exists(n)] == [lab.CLIENT]
    finally:
        netns.remove(lab.CLIENT)


def test_lab_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(lab.LabError, match="needs root"):
        lab.up()
