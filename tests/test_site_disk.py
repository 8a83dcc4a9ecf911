"""The guest's disk at a site (geomirror/site/disk.py): QEMU's command line, the sockets of the
primary's and the standby's disk servers, the unsafe test switch."""

from __future__ import annotations

import socket
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from geomirror.config import load_site
from geomirror.site.disk import UNSAFE_ENV, serve_disk, unsafe_no_disk_replication
from geomirror.site.guest_spec import GuestSpecs
from replication.nbd import DiskImageError
from replication.qemu import GuestSpec, build_argv

LAB = Path(__file__).resolve().parent.parent / "configs" / "lab" / "site-a.toml"


def _spec(**kw) -> GuestSpec:
    base = dict(name="pbx", memory_mb=128, kernel=Path("/k"), initrd=Path("/i"), append="console=ttyS0",
                ram_path=Path("/r/guest.ram"), qmp_path=Path("/r/qmp.sock"), serial_path=Path("/r/serial.log"),
                net_socket=Path("/r/net.sock"))
    return GuestSpec(**{**base, **kw})


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_qemu_reaches_the_disk_over_nbd_from_the_service_and_reconnects_to_a_new_one():
    plain = build_argv(_spec())
    assert not _after(plain, "-blockdev") and "disk" not in _spec().compat()
    spec = _spec(disk_socket=Path("/r/a,b/disk.sock"), disk_reconnect_s=7)
    argv = build_argv(spec)
    assert _after(argv, "-blockdev") == ["driver=nbd,server.type=unix,server.path=/r/a,,b/disk.sock,"
                                         "reconnect-delay=7,node-name=disk0,discard=unmap"]
    assert "virtio-blk-pci,drive=disk0" in _after(argv, "-device")
    assert spec.compat()["disk"] == "virtio-blk"  # both sites must have the device: it is device state
    assert "-incoming" not in argv and "-incoming" in build_argv(_spec(disk_socket=Path("/d"), incoming=True))


def _disk_config(tmp_path: Path, disk: str | None):
    text = LAB.read_text().replace("/run/geomirror-lab/site-a", str(tmp_path / "site-a"))
    extra = 'kernel = "/boot/k"\ninitrd = "/boot/i"\n' + (f'disk = "{disk}"\n' if disk else "")
    text = text.replace("[guest]\n", "[guest]\n" + extra, 1)
    (tmp_path / "site-a.toml").write_text(text)
    return load_site(tmp_path / "site-a.toml")


def test_each_qemu_of_a_site_has_its_own_disk_socket_only_when_the_guest_has_a_disk(tmp_path):
    cfg = _disk_config(tmp_path, "disk.raw")
    assert cfg.guest.disk == tmp_path / "disk.raw"
    run = cfg.site.run_dir
    specs = GuestSpecs(cfg, run)
    assert specs.primary().disk_socket == run / "disk.sock"
    assert specs.standby(run / "replica" / "ram.img").disk_socket == run / "disk-standby.sock"
    none = GuestSpecs(_disk_config(tmp_path, None), run)
    assert none.primary().disk_socket is None and none.standby(run / "ram.img").disk_socket is None


def test_the_disk_server_serves_guest_disk_on_a_private_socket_or_names_the_missing_file(tmp_path):
    cfg = SimpleNamespace(site=SimpleNamespace(name="site-a"), guest=SimpleNamespace(disk=None),
                          checkpoint=SimpleNamespace(disk_unsent_cap_mb=3))
    assert serve_disk(cfg, tmp_path / "disk.sock", "primary") is None
    cfg.guest.disk = tmp_path / "disk.raw"
    with pytest.raises(DiskImageError, match=f"disk image {tmp_path}/disk.raw does not exist"):
        serve_disk(cfg, tmp_path / "disk.sock", "primary")
    with open(cfg.guest.disk, "wb") as f:
        f.truncate(1 << 20)
    server = serve_disk(cfg, tmp_path / "disk.sock", "primary")
    try:
        assert server.size == 1 << 20
        # the cap from checkpoint.disk_unsent_cap_mb; nothing recorded until a session's disk sync
        assert server.extents.cap_bytes == 3 << 20 and not server.extents.recording
        assert stat.S_IMODE((tmp_path / "disk.sock").stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as s:  # it answers with the NBD greeting
            s.connect(str(tmp_path / "disk.sock"))
            assert s.recv(8) == b"NBDMAGIC"
    finally:
        server.close()
    assert not (tmp_path / "disk.sock").exists()


def test_the_unsafe_switch_is_on_only_when_set_to_1():
    assert unsafe_no_disk_replication({UNSAFE_ENV: "1"})
    for v in ("", "0", "true", "yes"):
        assert not unsafe_no_disk_replication({UNSAFE_ENV: v})
    assert not unsafe_no_disk_replication({})
