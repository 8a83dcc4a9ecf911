"""Foundation: the lab comes up, the guest at site A answers memcached from gm-client,
and `lab down` leaves no namespace or process behind."""

from __future__ import annotations

import os
import tomllib

import pytest

from geomirror import netns
from lab import cli as labcli, world
from lab import etcd as lab_etcd

pytestmark = pytest.mark.lab


def test_lab_up_guest_answers_and_down_removes_everything(lab_up):
    st = labcli.status()
    assert set(st["namespaces"]) == set(world.NAMESPACES)
    a, b = st["sites"]["site-a"], st["sites"]["site-b"]
    assert a["role"] == "primary" and b["role"] == "standby"
    assert a["committed_epoch"] > 0

    mc = labcli.Memcache(labcli.client_connect())
    assert mc.set("greeting", "hello") == b"STORED"
    assert mc.get("greeting") == b"hello"
    assert mc.set("n", "41") == b"STORED"
    assert mc.incr("n") == 42
    assert mc.incr("n", 8) == 50
    mc.close()

    pids = set(world.load_state()["pids"].values())
    for ns in world.NAMESPACES:
        pids.update(world.pids_in_netns(ns))
    assert pids, "the lab recorded no processes"
    world.down()
    assert not [n for n in netns.listed() if n.startswith("gm-")]
    alive = [p for p in pids if world._alive(p)]
    assert not alive, f"processes left after lab down: {alive}"
    # idempotent
    assert world.down() == []


def test_lab_refuses_busy_namespace(lab_env):
    netns.create(world.CLIENT)
    try:
        with pytest.raises(world.LabError, match="gm-client already exists"):
            world.up(with_daemons=False)
        # nothing half made: the other namespaces were not created
        assert [n for n in world.NAMESPACES if netns.exists(n)] == [world.CLIENT]
    finally:
        netns.remove(world.CLIENT)


def test_lab_refuses_without_root(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(world.LabError, match="needs root"):
        world.up()


def test_etcd_lab_config_has_a_lease_table_in_place_of_the_witness():
    for site in world.SITES:
        text = (world.repo_configs() / f"{site}.toml").read_text()
        data = tomllib.loads(lab_etcd.site_config(text, site))
        assert "witness" not in data
        lease = data["lease"]
        assert lease["backend"] == "etcd" and lease["lease_ttl_ms"] == 2000
        own = lab_etcd.MEMBERS[lab_etcd.SITE_MEMBER[site]][1]
        assert lease["endpoints"][0] == f"https://{own}:2379" and len(set(lease["endpoints"])) == 3
        assert data["guest"] == tomllib.loads(text)["guest"]  # the rest is untouched
    with pytest.raises(world.LabError, match="no \\[witness\\] table"):
        lab_etcd.site_config("[site]\nname = 'x'\n", "site-a")
