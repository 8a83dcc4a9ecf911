"""Guest image builder: the newc writer, the content key, the cache, and (lab) the real image."""

from __future__ import annotations

import gzip
import io
import json
import lzma
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomirror.errors import ImageError
from geomirror.image import (
    DIRTY_SOURCE,
    INIT_SCRIPT,
    CpioEntry,
    ImageInputs,
    apt_download,
    build_from_inputs,
    build_image,
    default_cmdline,
    image_key,
    parse_ldd,
    write_newc,
)


def read_newc(blob: bytes) -> list[dict]:
    """A tiny newc reader: members up to (not including) the trailer; asserts the format."""
    out, pos = [], 0
    while True:
        assert blob[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, nlink, size, rmaj, rmin, namesize = f[1], f[4], f[6], f[9], f[10], f[11]
        name_end = pos + 110 + namesize
        assert blob[name_end - 1] == 0, "name is not NUL terminated"
        name = blob[pos + 110 : name_end - 1].decode()
        data_start = name_end + (-name_end % 4)
        data = blob[data_start : data_start + size]
        pos = data_start + size + (-(data_start + size) % 4)
        if name == "TRAILER!!!":
            assert pos == len(blob), "bytes after the trailer"
            return out
        out.append({"name": name, "mode": mode, "nlink": nlink, "data": data, "rdev": (rmaj, rmin)})


# ---------------------------------------------------------------- cpio writer


def test_newc_round_trip_of_every_member_kind():
    entries = [
        CpioEntry.dir("bin"),
        CpioEntry.file("bin/busybox", b"\x7fELF" + bytes(range(256)), 0o755),
        CpioEntry.symlink("bin/sh", "busybox"),
        CpioEntry.dir("dev"),
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.file("/init", b"#!/bin/sh\n", 0o755),
        CpioEntry.file("empty", b""),
    ]
    buf = io.BytesIO()
    write_newc(entries, buf)
    members = read_newc(buf.getvalue())
    assert [m["name"] for m in members] == ["bin", "bin/busybox", "bin/sh", "dev", "dev/console", "init", "empty"]
    by = {m["name"]: m for m in members}
    assert stat.S_ISDIR(by["bin"]["mode"]) and by["bin"]["nlink"] == 2
    assert by["bin/busybox"]["data"] == b"\x7fELF" + bytes(range(256))
    assert stat.S_IMODE(by["bin/busybox"]["mode"]) == 0o755
    assert stat.S_ISLNK(by["bin/sh"]["mode"]) and by["bin/sh"]["data"] == b"busybox"
    assert stat.S_ISCHR(by["dev/console"]["mode"]) and by["dev/console"]["rdev"] == (5, 1)
    assert by["empty"]["data"] == b""


@settings(max_examples=50, deadline=None)
@given(
    st.dictionaries(
        st.text("abcxyz_.-0123456789", min_size=1, max_size=13).filter(lambda s: s not in (".", "..")),
        st.binary(max_size=40),
        max_size=8,
    )
)
def test_newc_round_trip_keeps_names_and_bytes_at_any_alignment(files):
    buf = io.BytesIO()
    write_newc([CpioEntry.file(name, data) for name, data in files.items()], buf)
    assert {m["name"]: m["data"] for m in read_newc(buf.getvalue())} == files
    assert len(buf.getvalue()) % 4 == 0


@pytest.mark.parametrize(
    "entries",
    [
        [CpioEntry.file("a", b"1"), CpioEntry.file("/a", b"2")],
        [CpioEntry.file("../etc/passwd", b"x")],
        [CpioEntry.file("/", b"x")],
    ],
)
def test_newc_rejects_duplicate_or_escaping_paths(entries):
    with pytest.raises(ImageError):
        write_newc(entries, io.BytesIO())


# ---------------------------------------------------------------- fake inputs


def make_kernel_deb(debs_dir: Path, package: str, version: str, modules: dict[str, bytes], builtin: list[str]) -> Path:
    """A real (small) kernel-shaped .deb, built with dpkg-deb, so unpacking runs `dpkg -x` for real."""
    root = debs_dir / f".src-{package}-{version}"
    release = "6.1.0-0-test-amd64"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: amd64\n"
        "Maintainer: geomirror tests <tests@example.invalid>\nDescription: fake kernel for tests\n"
    )
    (root / "boot").mkdir()
    (root / "boot" / f"vmlinuz-{release}").write_bytes(b"fake-bzImage " + version.encode())
    moddir = root / "lib" / "modules" / release
    (moddir / "kernel" / "drivers").mkdir(parents=True)
    for filename, data in modules.items():
        (moddir / "kernel" / "drivers" / filename).write_bytes(data)
    (moddir / "modules.builtin").write_text("".join(f"kernel/drivers/{b}.ko\n" for b in builtin))
    deb = debs_dir / f"{package}_{version}_amd64.deb"
    subprocess.run(["dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(root), str(deb)],
                   check=True, capture_output=True)  # fmt: skip
    shutil.rmtree(root)
    return deb


class FakeArchive:
    """Stands in for apt's archive only: hands out a dpkg-deb built package and counts fetches."""

    def __init__(self):
        self.fetches = 0
        self.modules = {
            "virtio_ring.ko.xz": lzma.compress(b"\x7fELF virtio_ring"),
            "virtio_net.ko": b"\x7fELF virtio_net",
        }
        self.builtin = ["virtio_anchor"]

    def __call__(self, package: str, version: str, debs_dir: Path) -> Path:
        self.fetches += 1
        debs_dir.mkdir(parents=True, exist_ok=True)
        return make_kernel_deb(debs_dir, package, version, self.modules, self.builtin)


@pytest.fixture
def inputs(tmp_path) -> ImageInputs:
    src = tmp_path / "src"
    src.mkdir()
    (src / "busybox").write_bytes(b"busybox bytes v1")
    (src / "memcached").write_bytes(b"memcached bytes v1")
    (src / "libevent.so.7").write_bytes(b"libevent bytes")
    return ImageInputs(
        kernel_package="linux-image-test-amd64",
        kernel_package_version="6.1.0-1",
        busybox=src / "busybox",
        memcached=src / "memcached",
        memcached_libs=(src / "libevent.so.7",),
        init_script=INIT_SCRIPT,
        dirty_source=DIRTY_SOURCE.read_text(),
        modules=("virtio_ring", "virtio_anchor", "virtio_net"),
    )


def initrd_members(path: Path) -> dict[str, dict]:
    return {m["name"]: m for m in read_newc(gzip.decompress(path.read_bytes()))}


# ---------------------------------------------------------------- key


def test_key_is_stable_for_equal_inputs_even_at_other_paths(inputs, tmp_path):
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    shutil.copy(inputs.busybox, copy / "busybox")
    assert image_key(inputs) == image_key(replace(inputs)) == image_key(replace(inputs, busybox=copy / "busybox"))


@pytest.mark.parametrize(
    "change",
    [
        lambda i: replace(i, kernel_package="linux-image-other-amd64"),
        lambda i: replace(i, kernel_package_version="6.1.0-2"),
        lambda i: replace(i, init_script=i.init_script + "# changed\n"),
        lambda i: replace(i, dirty_source=i.dirty_source + "/* changed */\n"),
        lambda i: replace(i, modules=i.modules[:-1]),
        lambda i: replace(i, format_version=i.format_version + 1),
        lambda i: (i.busybox.write_bytes(b"busybox bytes v2"), i)[1],
        lambda i: (i.memcached.write_bytes(b"memcached bytes v2"), i)[1],
        lambda i: (i.memcached_libs[0].write_bytes(b"libevent v2"), i)[1],
    ],
    ids=["package", "version", "init", "dirty.c", "modules", "format", "busybox", "memcached", "lib"],
)
def test_key_changes_when_any_input_changes(inputs, change):
    before = image_key(inputs)
    assert image_key(change(inputs)) != before


# ---------------------------------------------------------------- build and cache


def test_build_makes_a_bootable_layout(inputs, tmp_path):
    img = build_from_inputs(inputs, tmp_path / "cache", download=FakeArchive())
    assert img.path == tmp_path / "cache" / img.key[:16]
    assert img.kernel.read_bytes() == b"fake-bzImage 6.1.0-1"
    assert img.kernel_version == "6.1.0-0-test-amd64"
    members = initrd_members(img.initrd)
    assert members["init"]["data"] == INIT_SCRIPT.encode()
    assert stat.S_IMODE(members["init"]["mode"]) == 0o755
    assert members["bin/busybox"]["data"] == b"busybox bytes v1"
    assert members["bin/sh"]["data"] == b"busybox"
    assert members["usr/bin/memcached"]["data"] == b"memcached bytes v1"
    assert members[str(inputs.memcached_libs[0]).lstrip("/")]["data"] == b"libevent bytes"
    assert members["usr/bin/gm-dirty"]["data"].startswith(b"\x7fELF")
    assert members["lib/modules/virtio_ring.ko"]["data"] == b"\x7fELF virtio_ring"  # .xz decompressed
    assert members["etc/gm-modules"]["data"] == b"virtio_ring\nvirtio_net\n"  # built-in one skipped
    assert members["dev/console"]["rdev"] == (5, 1)
    names = list(members)
    for name in names:  # every parent directory comes before what it holds
        parent = name.rpartition("/")[0]
        assert not parent or names.index(parent) < names.index(name)
    manifest = json.loads((img.path / "manifest.json").read_text())
    assert manifest["key"] == img.key
    assert manifest["modules_builtin"] == ["virtio_anchor"]
    assert manifest["files"]["initrd.img"]["size"] == img.initrd.stat().st_size
    assert not list((tmp_path / "cache").glob(".build-*"))


def test_second_build_with_same_inputs_reuses_the_image(inputs, tmp_path):
    archive = FakeArchive()
    first = build_from_inputs(inputs, tmp_path / "cache", download=archive)
    manifest = first.path / "manifest.json"
    build_id, mtime = json.loads(manifest.read_text())["build_id"], manifest.stat().st_mtime_ns
    again = build_from_inputs(inputs, tmp_path / "cache", download=archive)
    assert again == first
    assert archive.fetches == 1
    assert json.loads(manifest.read_text())["build_id"] == build_id and manifest.stat().st_mtime_ns == mtime
    forced = build_from_inputs(inputs, tmp_path / "cache", download=archive, force=True)
    assert json.loads((forced.path / "manifest.json").read_text())["build_id"] != build_id


def test_changed_input_builds_a_new_image_beside_the_old(inputs, tmp_path):
    first = build_from_inputs(inputs, tmp_path / "cache", download=FakeArchive())
    second = build_from_inputs(replace(inputs, init_script=INIT_SCRIPT + "# v2\n"), tmp_path / "cache",
                               download=FakeArchive())  # fmt: skip
    assert second.key != first.key and first.initrd.exists() and second.initrd.exists()
    assert initrd_members(second.initrd)["init"]["data"].endswith(b"# v2\n")


def test_half_made_image_is_not_taken(inputs, tmp_path):
    cache = tmp_path / "cache"
    first = build_from_inputs(inputs, cache, download=FakeArchive())
    build_id = json.loads((first.path / "manifest.json").read_text())["build_id"]
    with open(first.initrd, "r+b") as f:  # torn: shorter than the manifest says
        f.truncate(100)
    again = build_from_inputs(inputs, cache, download=FakeArchive())
    assert json.loads((again.path / "manifest.json").read_text())["build_id"] != build_id
    assert again.initrd.stat().st_size > 100


def test_leftover_build_dir_of_a_dead_builder_is_ignored_and_swept(inputs, tmp_path):
    cache = tmp_path / "cache"
    key = image_key(inputs)
    dead = subprocess.Popen(["true"])
    dead.wait()
    leftover = cache / f".build-{key[:16]}-{dead.pid}-abc"
    (leftover / "image").mkdir(parents=True)
    (leftover / "image" / "manifest.json").write_text(json.dumps({"key": key, "files": {}}))
    archive = FakeArchive()
    img = build_from_inputs(inputs, cache, download=archive)
    assert archive.fetches == 1 and img.path == cache / key[:16]
    assert not leftover.exists()


def test_missing_module_that_is_not_built_in_is_named(inputs, tmp_path):
    with pytest.raises(ImageError, match="no module virtio_blk"):
        build_from_inputs(replace(inputs, modules=("virtio_ring", "virtio_blk")), tmp_path / "cache",
                          download=FakeArchive())  # fmt: skip
    assert not (tmp_path / "cache" / image_key(inputs)[:16]).exists()
    assert not list((tmp_path / "cache").glob(".build-*"))


def test_apt_download_reuses_a_cached_deb_without_asking_apt(tmp_path):
    debs = tmp_path / "debs"
    debs.mkdir()
    cached = debs / "gm-no-such-package_1%3a2.0-1_amd64.deb"
    cached.write_bytes(b"deb")
    # The package does not exist: reaching apt-get here would fail with ImageError.
    assert apt_download("gm-no-such-package", "1:2.0-1", debs) == cached


# ---------------------------------------------------------------- small pure parts


def test_default_cmdline_carries_the_guest_contract():
    line = default_cmdline("198.51.100.10", 24, "198.51.100.1", dirty="64:2000")
    words = line.split()
    assert words[0] == "console=ttyS0"
    assert {"gm.ip=198.51.100.10/24", "gm.gw=198.51.100.1", "gm.dirty=64:2000"} <= set(words)
    assert "gm.dirty" not in default_cmdline("198.51.100.10", 24, "198.51.100.1")


@pytest.mark.parametrize(
    "args", [("198.51.100.10", 24, "203.0.113.1", None), ("bogus", 24, "198.51.100.1", None),
             ("198.51.100.10", 24, "198.51.100.1", "64"), ("198.51.100.10", 24, "198.51.100.1", "0:10")],
)  # fmt: skip
def test_default_cmdline_rejects_bad_values(args):
    with pytest.raises(ImageError):
        default_cmdline(*args)


def test_default_cmdline_dual_stack_adds_the_ipv6_address_and_gateway():
    line = default_cmdline("198.51.100.10", 24, "198.51.100.1", ip6="2001:db8:100::10", prefixlen6=48,
                           gateway6="2001:db8:100::1")
    assert {"gm.ip=198.51.100.10/24", "gm.ip6=2001:db8:100::10/48", "gm.gw6=2001:db8:100::1"} <= set(line.split())
    assert "gm.ip6" not in default_cmdline("198.51.100.10", 24, "198.51.100.1")


@pytest.mark.parametrize(
    "six", [dict(ip6="2001:db8:100::10", prefixlen6=48), dict(ip6="198.51.100.10", prefixlen6=48, gateway6="::1"),
            dict(ip6="2001:db8:100::10", prefixlen6=48, gateway6="2001:db8:200::1")],
)  # fmt: skip
def test_default_cmdline_rejects_bad_ipv6(six):
    with pytest.raises(ImageError):
        default_cmdline("198.51.100.10", 24, "198.51.100.1", **six)


def test_init_script_configures_ipv6_only_when_asked():
    # the init script is part of the image key (test_changed_input_builds_a_new_image_beside_the_old), so a
    # cached IPv4-only image is rebuilt; here: it reads gm.ip6/gm.gw6 and listens on [::] too
    assert 'gm.ip6=*) addr6="${arg#gm.ip6=}"' in INIT_SCRIPT and 'ip -6 addr add "$addr6" dev eth0' in INIT_SCRIPT
    assert 'listen="0.0.0.0,[::]"' in INIT_SCRIPT and "/proc/net/tcp6" in INIT_SCRIPT
    assert "disable_ipv6=1" in INIT_SCRIPT  # an IPv4-only guest stays silent on IPv6


def test_parse_ldd_includes_loader_and_names_missing_libraries():
    text = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibevent-2.1.so.7 => /lib/x86_64-linux-gnu/libevent-2.1.so.7 (0x00007f1)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f2)\n"
    )
    assert parse_ldd(text) == [Path("/lib/x86_64-linux-gnu/libevent-2.1.so.7"), Path("/lib64/ld-linux-x86-64.so.2")]
    with pytest.raises(ImageError, match="libsasl2.so.2"):
        parse_ldd("\tlibsasl2.so.2 => not found\n")


# ---------------------------------------------------------------- lab: the real image


@pytest.fixture(scope="module")
def real_image():
    return build_image(progress=False)


@pytest.mark.lab
def test_real_image_is_built_and_cached(real_image):
    assert real_image.kernel.stat().st_size > 1_000_000
    assert real_image.initrd.stat().st_size > 1_000_000
    assert real_image.kernel_version.endswith("-cloud-amd64")
    manifest = json.loads((real_image.path / "manifest.json").read_text())
    assert manifest["modules"][-1] == "virtio_net"
    assert build_image(progress=False) == real_image


@pytest.mark.lab
def test_real_image_boots_and_serves_memcached(real_image, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    console = tmp_path / "console.log"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-m", "128", "-nodefaults", "-nographic",
         "-serial", f"file:{console}", "-kernel", str(real_image.kernel), "-initrd", str(real_image.initrd),
         "-append", default_cmdline("10.0.2.15", 24, "10.0.2.2", dirty="8:100"),
         "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:11211", "-device", "virtio-net-pci,netdev=n0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # a guard against a hung boot, not a performance bound
        while b"gm-dirty: started" not in (console.read_bytes() if console.exists() else b""):
            assert qemu.poll() is None, qemu.stderr.read().decode()
            assert time.monotonic() < deadline, console.read_bytes().decode(errors="replace")
            time.sleep(0.2)
        assert b"GEOMIRROR-GUEST-READY ip=10.0.2.15" in console.read_bytes()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
            c.sendall(b"set gm 0 0 2\r\nok\r\nget gm\r\n")
            reply = b""
            while not reply.endswith(b"END\r\n"):
                chunk = c.recv(4096)
                assert chunk, reply
                reply += chunk
        assert reply == b"STORED\r\nVALUE gm 0 2\r\nok\r\nEND\r\n"
    finally:
        qemu.kill()
        qemu.wait()
