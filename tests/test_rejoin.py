"""`geomirror rejoin`: a site that lost the guest becomes the standby of its peer, its
replica seeded from its last RAM image; refused while its daemon runs."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from geomirror import cli
from geomirror.config import load_site
from geomirror.site.rejoin import RejoinError, rejoin
from replication.store import Replica

LAB_A = __import__("pathlib").Path(__file__).parent.parent / "configs" / "lab" / "site-a.toml"


def site_config(tmp_path, memory_mb=16):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.img").write_bytes(b"i")
    text = LAB_A.read_text().replace("/run/geomirror-lab/site-a", str(tmp_path / "site"))
    text = text.replace("memory_mb = 128", f"memory_mb = {memory_mb}")
    text = text.replace("[guest]\n", f'[guest]\nkernel = "{tmp_path / "vmlinuz"}"\ninitrd = "{tmp_path / "initrd.img"}"\n')
    p = tmp_path / "site-a.toml"
    p.write_text(text)
    return load_site(p)


def test_rejoin_seeds_the_replica_and_makes_the_next_start_a_standby(tmp_path):
    cfg = site_config(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "role.json").write_text(json.dumps({"role": "fenced", "lease_generation": 7, "run_id": "abc"}))
    ram = np.random.default_rng(5).integers(0, 256, 16 << 20, dtype=np.uint8)
    (site / "guest.ram").write_bytes(ram.tobytes())
    said = rejoin(cfg, progress=False)
    assert said.startswith("site-a (was fenced) will start as the standby of site-b; its replica is seeded from "
                           "its last RAM image (16 MB)")
    role = json.loads((site / "role.json").read_text())
    assert role["role"] == "standby" and role["lease_generation"] == 7 and role["run_id"] == "abc"
    assert (site / "role.json").stat().st_mode & 0o777 == 0o600
    assert not (site / "guest.ram").exists(), "the stale primary RAM is not kept around"
    r = Replica(site / "replica", 16 << 20)
    r.open()
    try:
        assert r.seeded and not r.valid and r.run_id == "abc" and np.array_equal(r.ram.reshape(-1), ram)
    finally:
        r.close()
    assert rejoin(cfg) == "site-a is already a standby; nothing to do"


def test_rejoin_after_a_takeover_seeds_from_the_replica_file_the_guest_ran_on(tmp_path):
    """A site that had taken the guest over ran it on its replica's ram.img (not run_dir/guest.ram):
    that file is the resync base, kept in place (the copy onto itself is skipped)."""
    cfg = site_config(tmp_path)
    site = tmp_path / "site"
    r = Replica(site / "replica", 16 << 20)
    r.open()
    ram = np.random.default_rng(6).integers(0, 256, (16 << 20) // 4096 * 4096, dtype=np.uint8)
    r.ram.reshape(-1)[:] = ram
    ram_img = r.ram_path
    r.close()
    guest = {"pid": 1, "qmp": str(site / "qmp-standby.sock"), "ram": str(ram_img), "started_at": 0.0,
             "tag": "standby"}
    (site / "role.json").write_text(json.dumps({"role": "fenced", "lease_generation": 3, "run_id": "abc",
                                                "guest": guest}))
    said = rejoin(cfg, progress=False)
    assert "its replica is seeded from its last RAM image" in said, said
    r = Replica(site / "replica", 16 << 20)
    r.open()
    try:
        assert r.seeded and r.run_id == "abc" and np.array_equal(r.ram.reshape(-1), ram)
    finally:
        r.close()


def test_rejoin_without_a_ram_image_means_a_full_sync(tmp_path):
    cfg = site_config(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "role.json").write_text(json.dumps({"role": "primary", "run_id": "abc"}))
    assert "it will take a full initial sync" in rejoin(cfg)


def test_rejoin_refuses_while_the_daemon_runs(tmp_path, capsys):
    cfg = site_config(tmp_path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "role.json").write_text(json.dumps({"role": "active", "run_id": "abc"}))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(site / "control.sock"))
    srv.listen(1)
    try:
        with pytest.raises(RejoinError, match=r"the daemon of site-a is running \(.*control.sock answers\): "
                                              "stop it first"):
            rejoin(cfg)
        assert cli.main(["rejoin", "--config", str(tmp_path / "site-a.toml")]) == 2
        assert "stop it first" in capsys.readouterr().err
    finally:
        srv.close()
    assert json.loads((site / "role.json").read_text())["role"] == "active", "nothing changed"
    # a stale socket of a dead daemon does not block a rejoin
    assert "will start as the standby" in rejoin(cfg)
