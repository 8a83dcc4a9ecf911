"""The disk guest: its scripts and key, the build with a stand-in root filesystem (real
mkfs.ext4), the disk journal program on the host, and (lab) the real image booted in QEMU."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from geomirror import netns
from geomirror.disk_image import (
    BOOT_INIT_SCRIPT,
    DISKBENCH_SOURCE,
    JOURNAL_SOURCE,
    DiskImageInputs,
    RootfsSpec,
    apt_list_name,
    archive_state,
    build_disk_from_inputs,
    build_disk_image,
    disk_image_key,
    disk_init_script,
    netns_name,
    parse_dpkg_query,
    shared_services_block,
    sources_list,
    version_mismatches,
)
from geomirror.errors import ImageError
from geomirror.image import DIRTY_SOURCE, INIT_SCRIPT, compile_static, default_cmdline
from tests.test_image import FakeArchive, read_newc

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="network namespaces need root")

# ---------------------------------------------------------------- init scripts


def test_disk_init_runs_the_initramfs_guests_network_and_services_text_verbatim():
    block = shared_services_block()
    assert block.startswith("addr=; gw=") and 'gm.ip6=*) addr6="${arg#gm.ip6=}"' in block
    assert "memcached -u root" in block and "gm-sip-start" in block
    script = disk_init_script()
    assert block in script and block in INIT_SCRIPT
    ready = 'echo "GEOMIRROR-GUEST-READY ip=${addr%/*}${addr6:+ ip6=${addr6%/*}}"'
    dirty = '[ -n "$dirty" ] && gm-dirty "${dirty%%:*}" "${dirty#*:}" &'
    assert ready in INIT_SCRIPT and ready in script and dirty in INIT_SCRIPT and dirty in script


def test_disk_init_needs_the_shared_block_in_the_initramfs_script():
    with pytest.raises(ImageError, match="INIT_SCRIPT"):
        disk_init_script(INIT_SCRIPT.replace("addr=; gw=", "a=;"))


def test_disk_init_waits_for_the_journal_on_both_stacks_and_halts_cleanly():
    script = disk_init_script()
    assert "gm-journal /var/lib/gm-journal/journal 7000 ${any6:+6} &" in script
    assert "':1B58 00000000:0000 0A' /proc/net/tcp" in script and ":1B58 $any6:0000 0A" in script
    assert script.index("gm-journal /var") < script.index('echo "GEOMIRROR-GUEST-READY')
    assert "trap gm_halt INT TERM USR2" in script and "mount -o remount,ro /" in script


def test_disk_init_starts_the_disk_writer_after_ready_only_when_asked():
    script = disk_init_script()
    assert 'gm.diskbench=*) diskbench="${arg#gm.diskbench=}"' in script
    start = '[ -n "$diskbench" ] && gm-diskbench /var/lib/gm-diskbench/data "${diskbench%%/*}" "${diskbench#*/}" &'
    assert start in script
    assert script.index('echo "GEOMIRROR-GUEST-READY') < script.index(start)


def test_boot_init_mounts_root_from_the_command_line_and_switches_root():
    assert 'root=*) root="${arg#root=}"' in BOOT_INIT_SCRIPT and "root=/dev/vda\n" in BOOT_INIT_SCRIPT
    assert "exec switch_root /newroot /sbin/gm-init" in BOOT_INIT_SCRIPT


# ---------------------------------------------------------------- small pure parts


@pytest.mark.parametrize(
    "uri,suite,name",
    [("http://deb.debian.org/debian", "bookworm", "deb.debian.org_debian_dists_bookworm_InRelease"),
     ("http://deb.debian.org/debian-security/", "bookworm-security",
      "deb.debian.org_debian-security_dists_bookworm-security_InRelease")],
)  # fmt: skip
def test_apt_list_name_follows_apts_file_naming(uri, suite, name):
    assert apt_list_name(uri, suite) == name


def test_apt_list_name_rejects_a_non_uri():
    with pytest.raises(ImageError, match="not a URI"):
        apt_list_name("deb.debian.org/debian", "bookworm")


def test_sources_list_is_one_line_per_source():
    assert sources_list((("http://a/debian", "bookworm"), ("http://b/s", "bookworm-security"))) == (
        "deb http://a/debian bookworm main\ndeb http://b/s bookworm-security main\n"
    )


def test_archive_state_hashes_apts_inrelease_and_names_a_missing_one(tmp_path):
    (tmp_path / "a_debian_dists_bookworm_InRelease").write_text("Date: x\n")
    state = archive_state((("http://a/debian", "bookworm"),), tmp_path)
    assert state[0][0] == "a_debian_dists_bookworm_InRelease" and len(state[0][1]) == 64
    with pytest.raises(ImageError, match="bookworm-updates.*apt-get update"):
        archive_state((("http://a/debian", "bookworm-updates"),), tmp_path)


def test_version_checks_and_dpkg_query_parsing():
    installed = parse_dpkg_query("memcached 1.6.18-1\nkamailio 5.6.3-2\n\nbroken line here\n")
    assert installed == {"memcached": "1.6.18-1", "kamailio": "5.6.3-2"}
    assert version_mismatches((("memcached", "1.6.18-1"),), installed) == []
    assert version_mismatches((("memcached", "1.6.19-1"), ("sip-tester", "1")), installed) == [
        "memcached 1.6.18-1 instead of 1.6.19-1", "sip-tester (not installed) instead of 1"]


def test_netns_name_finds_the_namespace_by_inode():
    assert netns_name(7, {"gm-site-a": 5, "gm-site-b": 7}) == "gm-site-b"
    assert netns_name(9, {"gm-site-a": 5}) is None


# ---------------------------------------------------------------- key


@pytest.fixture
def inputs(tmp_path) -> DiskImageInputs:
    (tmp_path / "busybox").write_bytes(b"busybox bytes v1")
    return DiskImageInputs(
        kernel_package="linux-image-test-amd64",
        kernel_package_version="6.1.0-1",
        busybox=tmp_path / "busybox",
        boot_init_script=BOOT_INIT_SCRIPT,
        disk_init_script=disk_init_script(),
        dirty_source=DIRTY_SOURCE.read_text(),
        journal_source=JOURNAL_SOURCE.read_text(),
        diskbench_source=DISKBENCH_SOURCE.read_text(),
        rootfs=RootfsSpec(
            suite="bookworm", variant="minbase", sources=(("http://deb.debian.org/debian", "bookworm"),),
            packages=("memcached",), package_versions=(("memcached", "1.6.18-1"),),
            archive_state=(("deb.debian.org_debian_dists_bookworm_InRelease", "0" * 64),),
            mmdebstrap_version="mmdebstrap 1.3.5",
        ),
        sip_config="loadmodule \"tm.so\"\n",
        modules=("virtio_ring", "virtio_anchor", "virtio_net"),
        disk_mib=16,
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda i: replace(i, kernel_package_version="6.1.0-2"),
        lambda i: replace(i, boot_init_script=i.boot_init_script + "# changed\n"),
        lambda i: replace(i, disk_init_script=i.disk_init_script + "# changed\n"),
        lambda i: replace(i, journal_source=i.journal_source + "/* changed */\n"),
        lambda i: replace(i, dirty_source=i.dirty_source + "/* changed */\n"),
        lambda i: replace(i, diskbench_source=i.diskbench_source + "/* changed */\n"),
        lambda i: replace(i, sip_config=i.sip_config + "# changed\n"),
        lambda i: replace(i, modules=i.modules[:-1]),
        lambda i: replace(i, disk_mib=32),
        lambda i: replace(i, rootfs=replace(i.rootfs, package_versions=(("memcached", "1.6.18-2"),))),
        lambda i: replace(i, rootfs=replace(i.rootfs, packages=("memcached", "strace"))),
        lambda i: replace(i, rootfs=replace(i.rootfs, archive_state=((i.rootfs.archive_state[0][0], "1" * 64),))),
        lambda i: replace(i, rootfs=replace(i.rootfs, mmdebstrap_version="mmdebstrap 1.4.0")),
        lambda i: replace(i, rootfs=replace(i.rootfs, dpkg_options=())),
        lambda i: (i.busybox.write_bytes(b"busybox bytes v2"), i)[1],
    ],
    ids=["kernel", "boot-init", "disk-init", "journal.c", "dirty.c", "diskbench.c", "sip", "modules", "size",
         "pkg-version", "packages", "archive", "mmdebstrap", "dpkg-options", "busybox"],
)  # fmt: skip
def test_disk_key_changes_when_any_input_changes(inputs, change):
    before = disk_image_key(inputs)
    assert disk_image_key(change(inputs)) != before


def test_disk_key_is_stable_for_equal_inputs(inputs):
    assert disk_image_key(inputs) == disk_image_key(replace(inputs))


# ---------------------------------------------------------------- build (stand-in rootfs, real mkfs.ext4)


class FakeRootfs:
    """Stands in for mmdebstrap only: a tiny tree shaped like a Debian root, and the versions."""

    def __init__(self, versions: dict[str, str] | None = None):
        self.calls = 0
        self.versions = versions

    def __call__(self, spec: RootfsSpec, dest: Path, debs_dir: Path, work: Path) -> dict[str, str]:
        self.calls += 1
        for d in ("sbin", "usr/bin", "etc", "proc", "sys", "dev", "run", "tmp", "var/cache/apt/archives"):
            (dest / d).mkdir(parents=True, exist_ok=True)
        (dest / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (dest / "var/cache/apt/archives/memcached_1.6.18-1_amd64.deb").write_bytes(b"deb")
        return self.versions if self.versions is not None else dict(spec.package_versions)


def debugfs(image: Path, request: str) -> str:
    out = subprocess.run(["debugfs", "-R", request, str(image)], capture_output=True, check=True).stdout
    return out.decode(errors="surrogateescape")


def test_build_makes_boot_files_and_an_ext4_disk_and_reuses_it(inputs, tmp_path):
    cache, rootfs = tmp_path / "cache", FakeRootfs()
    img = build_disk_from_inputs(inputs, cache, download=FakeArchive(), make_rootfs=rootfs)
    assert img.path == cache / img.key[:16] and img.disk == img.path / "disk.raw"
    members = {m["name"]: m for m in read_newc(gzip.decompress(img.initrd.read_bytes()))}
    assert members["init"]["data"] == BOOT_INIT_SCRIPT.encode()
    assert members["etc/gm-modules"]["data"] == b"virtio_ring\nvirtio_net\n"
    assert members["bin/switch_root"]["data"] == b"busybox" and "newroot" in members
    st = img.disk.stat()
    assert st.st_size == 16 << 20 and st.st_mode & 0o777 == 0o444
    assert st.st_blocks * 512 < st.st_size  # sparse
    assert debugfs(img.disk, "cat /sbin/gm-init") == inputs.disk_init_script
    assert "0755" in debugfs(img.disk, "stat /usr/bin/gm-journal").split("Mode:")[1][:8]
    assert debugfs(img.disk, "cat /usr/bin/gm-journal").encode(errors="surrogateescape")[:4] == b"\x7fELF"
    assert "busybox" in debugfs(img.disk, "stat /usr/lib/geomirror/bin/ip")  # fast symlink to busybox
    assert "gm-journal" in debugfs(img.disk, "ls /var/lib") and "gm-diskbench" in debugfs(img.disk, "ls /var/lib")
    assert debugfs(img.disk, "cat /usr/bin/gm-diskbench").encode(errors="surrogateescape")[:4] == b"\x7fELF"
    assert "memcached_" not in debugfs(img.disk, "ls /var/cache/apt/archives")
    assert debugfs(img.disk, "cat /etc/kamailio/kamailio.cfg") == inputs.sip_config
    assert subprocess.run(["fsck.ext4", "-n", "-f", str(img.disk)], capture_output=True).returncode == 0
    manifest = json.loads((img.path / "manifest.json").read_text())
    assert manifest["key"] == img.key and manifest["kind"] == "disk"
    assert manifest["files"]["disk.raw"]["size"] == 16 << 20 and manifest["packages"] == {"memcached": "1.6.18-1"}
    assert not list(cache.glob(".build-*"))
    again = build_disk_from_inputs(inputs, cache, download=FakeArchive(), make_rootfs=rootfs)
    assert again == img and rootfs.calls == 1


def test_a_rootfs_with_other_package_versions_than_the_key_is_refused(inputs, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ImageError, match="memcached 1.6.99-1 instead of 1.6.18-1.*apt-get update"):
        build_disk_from_inputs(inputs, cache, download=FakeArchive(),
                               make_rootfs=FakeRootfs({"memcached": "1.6.99-1"}))  # fmt: skip
    assert not (cache / disk_image_key(inputs)[:16]).exists() and not list(cache.glob(".build-*"))


def test_build_is_refused_inside_a_gm_namespace(monkeypatch):
    from geomirror import disk_image

    monkeypatch.setattr(disk_image, "current_netns", lambda: "gm-site-a")
    with pytest.raises(ImageError, match="not inside the network namespace gm-site-a"):
        build_disk_image(Path("/nonexistent"), progress=False)


# ---------------------------------------------------------------- the journal program, on this host


@pytest.fixture(scope="module")
def journal_binary(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("journal")
    (work / "gm-journal").write_bytes(compile_static(JOURNAL_SOURCE.read_text(), "gm-journal", work))
    (work / "gm-journal").chmod(0o755)
    return work / "gm-journal"


@pytest.fixture
def scratch_netns():
    """A throw-away network namespace (loopback up), always removed."""
    name = f"gm-imgtest-{os.getpid()}"
    netns.remove(name)
    netns.create(name)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        netns.remove(name)


class Journal:
    """A line client of the disk journal, connected inside a namespace."""

    def __init__(self, ns: str, host: str, port: int, timeout: float = 30):
        with netns.inside(ns):
            self.sock = socket.create_connection((host, port), timeout=timeout)
        self.f = self.sock.makefile("rwb")

    def ask(self, line: str) -> str:
        self.f.write(line.encode() + b"\n")
        self.f.flush()
        return self.f.readline().decode().rstrip("\n")

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def _journal_process(ns: str, binary: Path, path: Path, port: int, *extra: str) -> subprocess.Popen:
    p = netns.spawn(ns, [str(binary), str(path), str(port), *extra], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10  # a guard against a program that never listens, not a bound
    while True:
        assert p.poll() is None, p.stderr.read().decode()
        with netns.inside(ns), socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return p
        assert time.monotonic() < deadline
        time.sleep(0.02)


@needs_root
def test_journal_appends_reads_counts_and_keeps_records_across_a_restart(journal_binary, scratch_netns, tmp_path):
    path = tmp_path / "journal"
    p = _journal_process(scratch_netns, journal_binary, path, 7000, "6")
    try:
        j = Journal(scratch_netns, "::1", 7000)  # the "6" listener
        assert [j.ask(f"append {r}") for r in ("6869", "0a0b", "41" * 4072)] == ["ok 1", "ok 2", "ok 3"]
        assert j.ask("count") == "count 3"
        assert j.ask("read 2") == "rec 2 0a0b"
        assert j.ask("read 3") == "rec 3 " + "41" * 4072
        assert j.ask("read 4") == "missing 4"
        for bad in ("append 6", "append zz", "append " + "41" * 4073, "read 0", "read x", "frobnicate", "append"):
            assert j.ask(bad).startswith("err "), bad
        j.close()
    finally:
        p.kill()
        p.wait()
    assert path.stat().st_size == 3 * 4096  # one slot per record
    p = _journal_process(scratch_netns, journal_binary, path, 7000)
    try:
        j = Journal(scratch_netns, "127.0.0.1", 7000)
        assert j.ask("count") == "count 3" and j.ask("read 1") == "rec 1 6869"
        assert j.ask("append ff") == "ok 4"
        j.close()
    finally:
        p.kill()
        p.wait()


@needs_root
def test_journal_does_not_count_a_torn_last_record_and_overwrites_it(journal_binary, scratch_netns, tmp_path):
    path = tmp_path / "journal"
    p = _journal_process(scratch_netns, journal_binary, path, 7000)
    try:
        j = Journal(scratch_netns, "127.0.0.1", 7000)
        assert [j.ask(f"append 0{n}") for n in (1, 2, 3)] == ["ok 1", "ok 2", "ok 3"]
        j.close()
    finally:
        p.kill()
        p.wait()
    with open(path, "r+b") as f:  # record 3's data byte changes: a torn write
        f.seek(2 * 4096 + 24)
        f.write(b"\xee")
    p = _journal_process(scratch_netns, journal_binary, path, 7000)
    try:
        j = Journal(scratch_netns, "127.0.0.1", 7000)
        assert j.ask("count") == "count 2" and j.ask("read 3") == "missing 3"
        assert j.ask("append 09") == "ok 3" and j.ask("read 3") == "rec 3 09" and j.ask("count") == "count 3"
        j.close()
    finally:
        p.kill()
        p.wait()


# ---------------------------------------------------------------- lab: the real disk guest in QEMU

TEST_CACHE = Path(os.environ.get("GEOMIRROR_TEST_DISK_CACHE", "/var/cache/geomirror/test-disk"))


@pytest.fixture(scope="module")
def real_disk_image():
    started = time.monotonic()
    img = build_disk_image(TEST_CACHE, progress=False)
    print(f"disk guest image ready in {time.monotonic() - started:.1f}s: {img.path}")
    return img



def qmp_powerdown(sock) -> None:
    """The ACPI power button through QEMU's QMP socket (the disk guest then shuts down cleanly)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        f = s.makefile("rwb")
        f.readline()
        for cmd in ("qmp_capabilities", "system_powerdown"):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while "return" not in json.loads(f.readline()):
                pass

class DiskGuest:
    """QEMU booting the disk guest from `disk` inside netns `ns`; the guest's journal and
    memcached forwarded to 127.0.0.1 of that namespace (QEMU user networking)."""

    def __init__(self, img, disk: Path, ns: str, work: Path, tag: str):
        self.console = work / f"console-{tag}.log"
        self.qmp = work / f"qmp-{tag}.sock"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-cpu", "qemu64", "-m", "256", "-nodefaults", "-nographic",
            "-serial", f"file:{self.console}", "-kernel", str(img.kernel), "-initrd", str(img.initrd),
            "-append", default_cmdline("10.0.2.15", 24, "10.0.2.2", dirty="8:100") + " root=/dev/vda",
            "-drive", f"file={disk},if=virtio,format=raw",
            "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:7000-:7000,hostfwd=tcp:127.0.0.1:11211-:11211",
            "-device", "virtio-net-pci,netdev=n0", "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = netns.spawn(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def text(self) -> str:
        return self.console.read_bytes().decode(errors="replace") if self.console.exists() else ""

    def wait_for(self, needle: str, guard_s: float = 240) -> float:
        """Seconds from QEMU's start until `needle` is on the console (the guard is against a hung boot)."""
        while needle not in self.text():
            assert self.proc.poll() is None, self.proc.stderr.read().decode() + self.text()
            assert time.monotonic() - self.started < guard_s, self.text()
            time.sleep(0.1)
        return time.monotonic() - self.started

    def powerdown(self) -> None:
        qmp_powerdown(self.qmp)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.mark.lab
def test_real_disk_guest_keeps_journal_records_across_a_kill_and_shuts_down_clean(real_disk_image, scratch_netns,
                                                                                  tmp_path):
    assert real_disk_image.disk.stat().st_mode & 0o777 == 0o444
    disk = tmp_path / "disk.raw"
    subprocess.run(["cp", "--sparse=always", str(real_disk_image.disk), str(disk)], check=True)
    disk.chmod(0o644)
    records = [os.urandom(n).hex() for n in (1, 100, 4072)]
    guest = DiskGuest(real_disk_image, disk, scratch_netns, tmp_path, "first")
    try:
        ready_s = guest.wait_for("GEOMIRROR-GUEST-READY ip=10.0.2.15")
        print(f"first boot to READY: {ready_s:.1f}s")
        guest.wait_for("gm-dirty: started")
        j = Journal(scratch_netns, "127.0.0.1", 7000)
        assert [j.ask(f"append {r}") for r in records] == ["ok 1", "ok 2", "ok 3"]
        assert j.ask("count") == "count 3" and j.ask("read 2") == f"rec 2 {records[1]}"
        j.close()
        with netns.inside(scratch_netns):
            mc = socket.create_connection(("127.0.0.1", 11211), timeout=30)
        with mc:
            mc.sendall(b"set gm 0 0 2\r\nok\r\nget gm\r\n")
            reply = b""
            while not reply.endswith(b"END\r\n"):
                chunk = mc.recv(4096)
                assert chunk, reply
                reply += chunk
        assert reply == b"STORED\r\nVALUE gm 0 2\r\nok\r\nEND\r\n"
    finally:
        guest.kill()  # no shutdown: the records must be on the disk already
    guest = DiskGuest(real_disk_image, disk, scratch_netns, tmp_path, "second")
    try:
        print(f"second boot to READY: {guest.wait_for('GEOMIRROR-GUEST-READY'):.1f}s")
        j = Journal(scratch_netns, "127.0.0.1", 7000)
        assert j.ask("count") == "count 3"
        assert [j.ask(f"read {n}") for n in (1, 2, 3, 4)] == [*(f"rec {n} {r}" for n, r in enumerate(records, 1)),
                                                             "missing 4"]  # fmt: skip
        assert j.ask("append 00") == "ok 4"
        j.close()
        guest.powerdown()
        assert guest.proc.wait(timeout=120) == 0  # a guard against a guest that does not power off
        assert "GEOMIRROR-GUEST-HALTED" in guest.text()
    finally:
        guest.kill()
    fsck = subprocess.run(["fsck.ext4", "-n", "-f", str(disk)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert shutil.which("debugfs") and "journal" in debugfs(disk, "ls /var/lib/gm-journal")
