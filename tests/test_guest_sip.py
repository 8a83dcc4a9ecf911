"""The guest's SIP part: which Kamailio files go in, where, and that the config is in the key."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from geomirror import guest_sip
from geomirror.errors import ImageError
from geomirror.image import INIT_SCRIPT, build_from_inputs, image_key
from tests.test_image import FakeArchive, initrd_members, inputs  # noqa: F401  (fixture)

CFG = guest_sip.KAMAILIO_CFG.read_text()


def test_the_repo_config_loads_exactly_the_modules_the_image_carries():
    assert guest_sip.config_modules(CFG) == guest_sip.KAMAILIO_MODULES
    guest_sip.check_config_modules(CFG, guest_sip.KAMAILIO_MODULES)


def test_a_config_that_loads_a_module_the_image_lacks_is_refused():
    cfg = CFG + '\nloadmodule "htable.so"\n'
    with pytest.raises(ImageError, match="htable"):
        guest_sip.check_config_modules(cfg, guest_sip.KAMAILIO_MODULES)


def test_config_matches_in_dialog_requests_by_dialog():
    assert 'modparam("dialog", "dlg_match_mode", 1)' in CFG
    assert "is_known_dlg()" in CFG


def fake_tree(root: Path, modules) -> Path:
    (root / guest_sip.KAMAILIO_MODULE_DIR).mkdir(parents=True)
    (root / guest_sip.KAMAILIO_BINARY).parent.mkdir(parents=True)
    (root / guest_sip.KAMAILIO_BINARY).write_bytes(b"kamailio binary")
    for m in modules:
        (root / guest_sip.KAMAILIO_MODULE_DIR / f"{m}.so").write_bytes(f"module {m}".encode())
    (root / guest_sip.KAMAILIO_MODULE_DIR / "htable.so").write_bytes(b"not wanted")
    return root


def test_only_the_binary_and_the_named_modules_are_picked(tmp_path):
    tree = fake_tree(tmp_path, ("tm", "dialog"))
    picks = guest_sip.kamailio_files(tree, ("tm", "dialog"))
    assert [g for _, g in picks] == [
        "usr/sbin/kamailio",
        "usr/lib/x86_64-linux-gnu/kamailio/modules/tm.so",
        "usr/lib/x86_64-linux-gnu/kamailio/modules/dialog.so",
    ]
    assert all(src.is_file() and str(src).startswith(str(tree)) for src, _ in picks)


def test_a_module_missing_from_the_package_is_named(tmp_path):
    tree = fake_tree(tmp_path, ("tm",))
    with pytest.raises(ImageError, match="modules/dialog.so"):
        guest_sip.kamailio_files(tree, ("tm", "dialog"))


def test_package_libraries_go_to_their_package_path_host_libraries_to_theirs(tmp_path):
    tree = tmp_path / "kamailio"
    libs = [tree / guest_sip.KAMAILIO_LIB_DIR / "libsrdb1.so.1", Path("/lib/x86_64-linux-gnu/libc.so.6"),
            Path("/lib/x86_64-linux-gnu/libc.so.6")]
    placed = guest_sip.place_libraries(libs, tree)
    assert placed == [
        (Path("/lib/x86_64-linux-gnu/libc.so.6"), "lib/x86_64-linux-gnu/libc.so.6"),
        (libs[0], "usr/lib/x86_64-linux-gnu/kamailio/libsrdb1.so.1"),
    ]


def test_start_script_waits_for_udp_and_tcp_5060_and_the_echo_ua():
    s = guest_sip.START_SCRIPT
    assert ":13C4 00000000:0000 0A' /proc/net/tcp" in s  # TCP 5060 listening
    assert ":13C4 00000000:0000 07' /proc/net/udp" in s  # UDP 5060 bound
    assert ":13CE 00000000:0000 07' /proc/net/udp" in s  # the echo UA on UDP 5070
    assert f"-m {guest_sip.SHM_MB} -M {guest_sip.PKG_MB}" in s


def test_ready_line_waits_for_sip():
    sip_at = INIT_SCRIPT.index("gm-sip-start")
    ready_if = INIT_SCRIPT.rindex("\n", 0, INIT_SCRIPT.index('echo "GEOMIRROR-GUEST-READY'))
    assert sip_at < ready_if and '[ "$sip" = ok ]' in INIT_SCRIPT[sip_at:ready_if + 1]


# ---------------------------------------------------------------- in the image


def make_kamailio_deb(debs_dir: Path, version: str) -> Path:
    root = debs_dir / f".src-kamailio-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: kamailio\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: geomirror tests <tests@example.invalid>\nDescription: fake kamailio for tests\n"
    )
    fake_tree(root, guest_sip.KAMAILIO_MODULES)
    (root / guest_sip.KAMAILIO_LIB_DIR / "libsrdb1.so.1").write_bytes(b"srdb1")
    deb = debs_dir / f"kamailio_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


class FakeArchiveWithKamailio(FakeArchive):
    def __call__(self, package: str, version: str, debs_dir: Path) -> Path:
        if package == "kamailio":
            self.fetches += 1
            debs_dir.mkdir(parents=True, exist_ok=True)
            return make_kamailio_deb(debs_dir, version)
        return super().__call__(package, version, debs_dir)


@pytest.fixture
def sip_inputs(inputs, tmp_path):  # noqa: F811
    sipp = tmp_path / "src" / "sipp"
    sipp.write_bytes(b"sipp bytes v1")
    return replace(inputs, sip=guest_sip.SipInputs(
        kamailio_package_version="5.6.3-2", config=CFG, sipp=sipp,
        sipp_libs=(inputs.memcached_libs[0],),  # shared with memcached: goes in once
    ))


def test_sip_inputs_are_in_the_key(sip_inputs):
    base = image_key(sip_inputs)
    assert image_key(replace(sip_inputs, sip=None)) != base
    for change in (
        lambda s: replace(s, config=s.config + "# changed\n"),
        lambda s: replace(s, kamailio_package_version="5.6.4-1"),
        lambda s: replace(s, modules=s.modules[:-1]),
        lambda s: replace(s, start_script=s.start_script + "# changed\n"),
        lambda s: (s.sipp.write_bytes(b"sipp bytes v2"), s)[1],
    ):
        assert image_key(replace(sip_inputs, sip=change(sip_inputs.sip))) != base


def test_build_puts_kamailio_its_config_and_sipp_into_the_initramfs(sip_inputs, tmp_path):
    img = build_from_inputs(sip_inputs, tmp_path / "cache", download=FakeArchiveWithKamailio())
    members = initrd_members(img.initrd)
    assert members["etc/kamailio/kamailio.cfg"]["data"] == CFG.encode()
    assert members["usr/bin/gm-sip-start"]["data"] == guest_sip.START_SCRIPT.encode()
    assert members["usr/sbin/kamailio"]["data"] == b"kamailio binary"
    mods = {n.rsplit("/", 1)[1] for n in members if n.startswith(guest_sip.KAMAILIO_MODULE_DIR + "/")}
    assert mods == {f"{m}.so" for m in guest_sip.KAMAILIO_MODULES}  # htable.so left out
    assert members["usr/bin/sipp"]["data"] == b"sipp bytes v1"
    assert b"tcp 6 TCP" in members["etc/protocols"]["data"]


def test_image_without_sip_has_no_sip_files(inputs, tmp_path):  # noqa: F811
    img = build_from_inputs(inputs, tmp_path / "cache", download=FakeArchive())
    members = initrd_members(img.initrd)
    assert "usr/bin/gm-sip-start" not in members and "usr/sbin/kamailio" not in members
    assert gzip.decompress(img.initrd.read_bytes())  # still a valid archive
