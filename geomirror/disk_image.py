"""The disk guest: Debian's cloud kernel, a small boot initramfs, and an ext4 root disk.

`build_disk_image()` returns a `GuestImage` whose `disk` is a raw ext4 image
(`<cache_dir>/<key[:16]>/{vmlinuz,initrd.img,disk.raw,manifest.json}`). The root
filesystem is Debian bookworm made by `mmdebstrap --variant=minbase` with memcached,
Kamailio and sipp (the same services as the initramfs guest) plus the disk journal
(`guest/journal.c`, TCP 7000, DESIGN "Guest services"), gm-dirty and the benchmark's disk
writer gm-diskbench (`guest/diskbench.c`, started by `gm.diskbench=`); `mkfs.ext4 -d`
turns the tree into the image, no loop mount. The boot initramfs (busybox) loads the
virtio modules, mounts `root=` (default /dev/vda) read-write and switch_roots into the
disk's /sbin/gm-init, which configures the network from the kernel command line exactly
as the initramfs guest does (the same shell text, taken from `image.INIT_SCRIPT`).

Cached by content like the initramfs image: the key covers the kernel package and
version, the boot and disk init scripts, the C sources, the host busybox, the package
list and apt's candidate versions of the named packages, the archive state (sha256 of
apt's InRelease files for the sources mmdebstrap uses), the mmdebstrap version and the
disk size. The build happens on the host (never inside a gm-* network namespace) in a
`.build-*` directory that is renamed into place whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import structlog

from geomirror import guest_sip
from geomirror.errors import ImageError
from geomirror.image import (
    BUSYBOX,
    DIRTY_SOURCE,
    INIT_SCRIPT,
    VIRTIO_NET_MODULES,
    CpioEntry,
    Downloader,
    GuestImage,
    _last_line,
    _Progress,
    _run,
    _sha256_file,
    _write_file,
    apt_download,
    build_space,
    candidate_version,
    compile_static,
    default_cache_dir,
    kernel_modules,
    load_cached,
    publish,
    resolve_kernel_package,
    write_initrd,
)

log = structlog.get_logger(__name__)

DISK_FORMAT_VERSION = 1
JOURNAL_SOURCE = Path(__file__).resolve().parent.parent / "guest" / "journal.c"
JOURNAL_PORT = 7000
JOURNAL_FILE = "/var/lib/gm-journal/journal"
# The in-guest disk writer of bench/disk.py (`gm.diskbench=MB/PLAN` on the kernel command line)
DISKBENCH_SOURCE = Path(__file__).resolve().parent.parent / "guest" / "diskbench.c"
DISKBENCH_FILE = "/var/lib/gm-diskbench/data"
# The boot initramfs loads these; the disk carries no kernel modules. virtio_blk for the
# root disk; button and evdev so that an ACPI power button (QMP system_powerdown) reaches
# the disk's init, which then shuts down cleanly. ext4, jbd2, mbcache, crc16 and crc32c are
# built into Debian's cloud kernel (modules.builtin).
DISK_BOOT_MODULES = (*VIRTIO_NET_MODULES, "virtio_blk", "button", "evdev")
DISK_MIB = 512  # sparse: ~215 MB of it is allocated; the rest is headroom for the journal and logs
SUITE = "bookworm"
VARIANT = "minbase"
# Where mmdebstrap fetches from: the Debian archive as apt on this host sees it; the key
# covers apt's InRelease of each (run apt-get update to move the guest to newer packages).
SOURCES = (
    ("http://deb.debian.org/debian", "bookworm"),
    ("http://deb.debian.org/debian", "bookworm-updates"),
    ("http://deb.debian.org/debian-security", "bookworm-security"),
)
# The packages the guest's services come from; minbase brings the rest. Their versions
# (apt's candidates here) are in the key and checked in the built tree.
PACKAGES = ("memcached", guest_sip.KAMAILIO_PACKAGE, "sip-tester")
# Documentation, manual pages and translations are not installed (about 45 MB).
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
GM_BIN = "usr/lib/geomirror/bin"  # busybox applets the minbase tree lacks (first in the disk init's PATH)
GM_BIN_APPLETS = ("ip", "sysctl", "poweroff", "nc", "ps", "free", "top")
APT_LISTS = Path("/var/lib/apt/lists")
NETNS_DIR = Path("/run/netns")
DISK_STEPS = (
    "resolve packages",
    "download kernel",
    "unpack kernel",
    "collect modules",
    "compile gm-dirty, gm-journal and gm-diskbench",
    "write boot initramfs",
    "make root filesystem (mmdebstrap)",
    "install guest files",
    "make ext4 image",
)

BOOT_INIT_SCRIPT = r"""#!/bin/sh
# geomirror disk guest boot (initramfs PID 1): the virtio modules, then the root filesystem
# from root= (default /dev/vda; ext4, read-write) and switch_root into its /sbin/gm-init.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/gm-modules); do
    insmod "/lib/modules/$m.ko" || echo "gm-boot: insmod $m failed"
done
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
    esac
done
n=0
while [ ! -b "$root" ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
if mount -t ext4 -o rw "$root" /newroot && [ -x /newroot/sbin/gm-init ]; then
    mount --move /proc /newroot/proc
    mount --move /sys /newroot/sys
    mount --move /dev /newroot/dev
    exec switch_root /newroot /sbin/gm-init
fi
echo "GEOMIRROR-GUEST-ERROR cannot boot from $root (no ext4 holding /sbin/gm-init)"
while :; do sleep 3600; done
"""

_NET_START = "addr=; gw="
_NET_END = '    if kill -0 "$mc" 2>/dev/null && [ "$sip" = ok ]; then\n'


def shared_services_block(init_script: str = INIT_SCRIPT) -> str:
    """The initramfs guest's command-line parsing, network set-up, memcached and SIP start
    (from `addr=; gw=` up to its READY check): the disk guest runs the same text."""
    try:
        start, end = init_script.index(_NET_START), init_script.index(_NET_END)
    except ValueError as e:
        raise ImageError("geomirror.image.INIT_SCRIPT no longer has the network and services block "
                         "the disk guest shares (from 'addr=; gw=' to the READY check)") from e
    return init_script[start:end]


def disk_init_script(init_script: str = INIT_SCRIPT) -> str:
    """The disk's /sbin/gm-init: tmpfs for /run and /tmp, a clean shutdown on the ACPI power
    button, SIGINT (ctrl-alt-del), SIGTERM or SIGUSR2, then the initramfs guest's network
    and services block, the disk journal on TCP 7000, and the same READY line."""
    head = rf"""#!/bin/sh
# geomirror disk guest init (PID 1 after the boot initramfs switched root to the disk):
# addresses from the kernel command line (gm.ip=ADDR/LEN gm.gw=ADDR [gm.ip6=ADDR6/LEN
# gm.gw6=ADDR6] [gm.dirty=MB:PAGES_PER_S] [gm.diskbench=MB/PLAN]), memcached on TCP 11211,
# SIP on 5060, the disk journal on TCP {JOURNAL_PORT} ({JOURNAL_FILE}), then the READY line on
# the console; after it, with gm.diskbench, the disk writer gm-diskbench on {DISKBENCH_FILE}
# (MB MiB, the phases of PLAN: guest/diskbench.c).
# The ACPI power button (QMP system_powerdown), ctrl-alt-del, SIGTERM or SIGUSR2 stop the
# services, remount / read-only and power off. It never exits otherwise.
export PATH=/{GM_BIN}:/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/console >/dev/console 2>&1
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
gm_halt() {{
    echo "gm-init: shutting down"
    kill -TERM -1 2>/dev/null; sleep 1; kill -KILL -1 2>/dev/null
    sync
    umount /tmp /run 2>/dev/null
    if mount -o remount,ro /; then echo "GEOMIRROR-GUEST-HALTED root filesystem read-only"; fi
    poweroff -f
}}
trap gm_halt INT TERM USR2
echo 0 > /proc/sys/kernel/ctrl-alt-del
for ev in /sys/class/input/event*; do
    [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ] || continue
    ( dd if="/dev/input/${{ev##*/}}" bs=24 count=1 >/dev/null 2>&1 && kill -USR2 1 ) &
done
diskbench=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        gm.diskbench=*) diskbench="${{arg#gm.diskbench=}}" ;;
    esac
done
"""
    tail = rf"""    # the disk journal (guest/journal.c): READY waits for it too
    journal=ok
    gm-journal {JOURNAL_FILE} {JOURNAL_PORT} ${{any6:+6}} &
    jp=$!
    while ! grep -q ':{JOURNAL_PORT:04X} 00000000:0000 0A' /proc/net/tcp \
            || {{ [ -n "$any6" ] && ! grep -q ":{JOURNAL_PORT:04X} $any6:0000 0A" /proc/net/tcp6; }}; do
        if ! kill -0 "$jp" 2>/dev/null; then echo "GEOMIRROR-GUEST-ERROR gm-journal exited"; journal=failed; break; fi
        sleep 0.1
    done
    if kill -0 "$mc" 2>/dev/null && [ "$sip" = ok ] && [ "$journal" = ok ]; then
        echo "GEOMIRROR-GUEST-READY ip=${{addr%/*}}${{addr6:+ ip6=${{addr6%/*}}}}"
        [ -n "$dirty" ] && gm-dirty "${{dirty%%:*}}" "${{dirty#*:}}" &
        [ -n "$diskbench" ] && gm-diskbench {DISKBENCH_FILE} "${{diskbench%%/*}}" "${{diskbench#*/}}" &
    fi
fi
while :; do sleep 3600 & wait $!; done
"""
    return head + shared_services_block(init_script) + tail


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class RootfsSpec:
    """What mmdebstrap makes the tree from; every field is in the key."""

    suite: str
    variant: str
    sources: tuple[tuple[str, str], ...]
    packages: tuple[str, ...]
    package_versions: tuple[tuple[str, str], ...]  # apt's candidates here, checked in the tree
    archive_state: tuple[tuple[str, str], ...]  # (apt list file, sha256) per source
    dpkg_options: tuple[str, ...] = DPKG_OPTIONS
    mmdebstrap_version: str = ""


@dataclass(frozen=True)
class DiskImageInputs:
    """Everything a disk guest is made from; `disk_image_key` hashes it."""

    kernel_package: str
    kernel_package_version: str
    busybox: Path
    boot_init_script: str
    disk_init_script: str
    dirty_source: str
    journal_source: str
    diskbench_source: str
    rootfs: RootfsSpec
    sip_config: str
    sip_start_script: str = guest_sip.START_SCRIPT
    modules: tuple[str, ...] = DISK_BOOT_MODULES
    disk_mib: int = DISK_MIB
    format_version: int = DISK_FORMAT_VERSION


RootfsMaker = Callable[[RootfsSpec, Path, Path, Path], dict[str, str]]  # (spec, dest, debs_dir, work) -> versions


# ---------------------------------------------------------------- pure parts


def apt_list_name(uri: str, suite: str) -> str:
    """The file apt keeps a source's InRelease in under /var/lib/apt/lists."""
    m = re.fullmatch(r"[a-z+]+://(.+?)/*", uri)
    if not m:
        raise ImageError(f"apt source {uri!r} is not a URI")
    return f"{m.group(1).replace('/', '_')}_dists_{suite}_InRelease"


def sources_list(sources: tuple[tuple[str, str], ...]) -> str:
    """One-line sources.list text for mmdebstrap."""
    return "".join(f"deb {uri} {suite} main\n" for uri, suite in sources)


def disk_input_digests(inputs: DiskImageInputs) -> dict:
    """What the key covers: names and versions as text, files and scripts by sha256."""

    def h(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()

    r = inputs.rootfs
    try:
        busybox = _sha256_file(inputs.busybox)
    except OSError as e:
        raise ImageError(f"cannot read image input {e.filename}: {e.strerror}") from e
    return {
        "format_version": inputs.format_version,
        "kind": "disk",
        "kernel_package": inputs.kernel_package,
        "kernel_package_version": inputs.kernel_package_version,
        "busybox_sha256": busybox,
        "boot_init_sha256": h(inputs.boot_init_script),
        "disk_init_sha256": h(inputs.disk_init_script),
        "dirty_sha256": h(inputs.dirty_source),
        "journal_sha256": h(inputs.journal_source),
        "diskbench_sha256": h(inputs.diskbench_source),
        "sip_config_sha256": h(inputs.sip_config),
        "sip_start_sha256": h(inputs.sip_start_script),
        "modules": list(inputs.modules),
        "disk_mib": inputs.disk_mib,
        "rootfs": {
            "suite": r.suite,
            "variant": r.variant,
            "sources": [list(s) for s in r.sources],
            "packages": list(r.packages),
            "package_versions": dict(r.package_versions),
            "archive_state": dict(r.archive_state),
            "dpkg_options": list(r.dpkg_options),
            "mmdebstrap_version": r.mmdebstrap_version,
        },
    }


def disk_image_key(inputs: DiskImageInputs) -> str:
    """sha256 over the inputs; same inputs, same key."""
    canon = json.dumps(disk_input_digests(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def boot_initramfs_entries(inputs: DiskImageInputs, modules: list[tuple[str, bytes]]) -> list[CpioEntry]:
    """The boot initramfs: busybox, the modules, the boot init; every directory first."""
    applets = ("sh", "mount", "insmod", "cat", "sleep", "switch_root", "echo")
    files = [
        CpioEntry.file("init", inputs.boot_init_script.encode(), 0o755),
        CpioEntry.file("bin/busybox", inputs.busybox.read_bytes(), 0o755),
        *(CpioEntry.symlink(f"bin/{a}", "busybox") for a in applets),
        *(CpioEntry.file(f"lib/modules/{n}.ko", d) for n, d in modules),
        CpioEntry.file("etc/gm-modules", "".join(f"{n}\n" for n, _ in modules).encode()),
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.chardev("dev/null", 1, 3, 0o666),
    ]
    dirs = {"bin", "dev", "etc", "lib", "lib/modules", "newroot", "proc", "sys"}
    return [CpioEntry.dir(d) for d in sorted(dirs)] + files


def guest_files(inputs: DiskImageInputs, dirty: bytes, journal: bytes,
                diskbench: bytes) -> list[tuple[str, bytes, int]]:
    """(path in the root filesystem, bytes, permissions) of what geomirror adds to the tree."""
    return [
        ("sbin/gm-init", inputs.disk_init_script.encode(), 0o755),
        ("usr/bin/gm-dirty", dirty, 0o755),
        ("usr/bin/gm-journal", journal, 0o755),
        ("usr/bin/gm-diskbench", diskbench, 0o755),
        (f"{GM_BIN}/busybox", inputs.busybox.read_bytes(), 0o755),
        ("etc/hostname", b"geomirror-guest\n", 0o644),
        *guest_sip.guest_files(inputs.sip_config, inputs.sip_start_script),
    ]


def version_mismatches(want: tuple[tuple[str, str], ...], installed: dict[str, str]) -> list[str]:
    """Sentences for each named package the tree holds at another version than the key says."""
    out = []
    for pkg, ver in want:
        got = installed.get(pkg)
        if got != ver:
            out.append(f"{pkg} {got or '(not installed)'} instead of {ver}")
    return out


def parse_dpkg_query(text: str) -> dict[str, str]:
    """`dpkg-query -W -f '${Package} ${Version}\\n'` output as {package: version}."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = parts[1]
    return out


def netns_name(self_inode: int, named: dict[str, int]) -> str | None:
    """The name of the network namespace with inode `self_inode` among `named`, if any."""
    return next((n for n, ino in sorted(named.items()) if ino == self_inode), None)


# ---------------------------------------------------------------- I/O edges


def current_netns() -> str | None:
    """The name (under /run/netns) of the network namespace this process runs in, if named."""
    named = {}
    for p in NETNS_DIR.glob("*") if NETNS_DIR.is_dir() else ():
        try:
            named[p.name] = os.stat(p).st_ino
        except OSError:
            continue
    return netns_name(os.stat("/proc/self/ns/net").st_ino, named)


def refuse_inside_lab_netns() -> None:
    ns = current_netns()
    if ns is not None and ns.startswith("gm-"):
        raise ImageError(f"build the disk image on the host, not inside the network namespace {ns} "
                         "(mmdebstrap downloads from the Debian archive)")


def archive_state(sources: tuple[tuple[str, str], ...], lists: Path = APT_LISTS) -> tuple[tuple[str, str], ...]:
    """(apt list file, sha256) of the InRelease apt holds for each source."""
    out = []
    for uri, suite in sources:
        path = lists / apt_list_name(uri, suite)
        try:
            out.append((path.name, _sha256_file(path)))
        except OSError as e:
            raise ImageError(f"apt has no index for {uri} {suite} ({path}: {e.strerror}); add it to apt's "
                             "sources and run apt-get update") from e
    return tuple(out)


def mmdebstrap_version() -> str:
    res = _run(["mmdebstrap", "--version"], what="make the guest root filesystem (install the apt package mmdebstrap)")
    if res.returncode != 0:
        raise ImageError(f"mmdebstrap --version failed: {_last_line(res.stderr)}")
    return res.stdout.strip()


def mmdebstrap_rootfs(spec: RootfsSpec, dest: Path, debs_dir: Path, work: Path) -> dict[str, str]:
    """Make the tree at `dest` with mmdebstrap; {package: version} of what it installed.
    The .debs are kept in `debs_dir` (exactly this build's set) so a rebuild downloads
    only what changed."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    fresh = work / "debs-out"
    fresh.mkdir()
    src = work / "sources.list"
    src.write_text(sources_list(spec.sources))
    argv = [
        "mmdebstrap", f"--variant={spec.variant}", "--mode=root", "--format=directory",
        f"--include={','.join(spec.packages)}",
        *(f"--dpkgopt={o}" for o in spec.dpkg_options),
        "--skip=essential/unlink",
        "--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/",
        f"--setup-hook=sync-in {debs_dir} /var/cache/apt/archives/",
        f"--customize-hook=sync-out /var/cache/apt/archives {fresh}",
        spec.suite, str(dest), str(src),
    ]  # fmt: skip
    started = time.monotonic()
    res = _run(argv, what="make the guest root filesystem (install the apt package mmdebstrap)")
    if res.returncode != 0:
        raise ImageError(f"mmdebstrap failed to make the guest root filesystem: {_last_line(res.stderr)}")
    log.info("image.rootfs_made", seconds=round(time.monotonic() - started, 1))
    for leftover in fresh.iterdir():  # apt's lock and partial/: not packages
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif not leftover.name.endswith(".deb"):
            leftover.unlink()
    try:  # the package cache is only a speed-up: a concurrent builder swapping it too is harmless
        os.replace(debs_dir, work / "debs-old")
        os.replace(fresh, debs_dir)
    except OSError as e:
        log.info("image.deb_cache_not_replaced", path=str(debs_dir), error=str(e))
    q = _run(["dpkg-query", f"--admindir={dest / 'var/lib/dpkg'}", "-W", "-f", "${Package} ${Version}\n"],
             what="list the guest's packages")  # fmt: skip
    if q.returncode != 0:
        raise ImageError(f"dpkg-query on the guest tree {dest} failed: {_last_line(q.stderr)}")
    return parse_dpkg_query(q.stdout)


def install_guest_files(tree: Path, files: list[tuple[str, bytes, int]], applets: tuple[str, ...] = GM_BIN_APPLETS) -> None:
    """Write geomirror's files into the tree (owned by root) and the busybox applet links."""
    for rel, data, perm in files:
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists():
            path.unlink()
        path.write_bytes(data)
        os.chmod(path, perm)
    for a in applets:
        link = tree / GM_BIN / a
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("busybox")
    for f in (JOURNAL_FILE, DISKBENCH_FILE):
        (tree / Path(f).parent.relative_to("/")).mkdir(parents=True, exist_ok=True)
    for deb in (tree / "var/cache/apt/archives").glob("*.deb"):  # the build's packages stay out of the guest
        deb.unlink()


def make_ext4(tree: Path, image: Path, size_mib: int) -> None:
    """A sparse raw file of `size_mib` MiB holding an ext4 made from `tree` (mkfs.ext4 -d;
    4 KiB blocks, inode tables and journal written now so the guest's first boot does not)."""
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    res = _run(["mkfs.ext4", "-q", "-F", "-T", "default", "-b", "4096", "-m", "0", "-L", "gm-root",
                "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(tree), str(image)],
               what="make the guest's ext4 image (install the apt package e2fsprogs)")  # fmt: skip
    if res.returncode != 0:
        raise ImageError(f"mkfs.ext4 -d {tree} failed (is {size_mib} MiB too small?): {_last_line(res.stderr)}")
    fsck = _run(["fsck.ext4", "-n", "-f", str(image)], what="check the guest's ext4 image")
    if fsck.returncode != 0:
        raise ImageError(f"fsck.ext4 -n finds the freshly made {image} unclean: {_last_line(fsck.stdout)}")
    with open(image, "rb") as f:
        os.fsync(f.fileno())


def build_disk_from_inputs(
    inputs: DiskImageInputs,
    cache_dir: Path,
    *,
    download: Downloader = apt_download,
    make_rootfs: RootfsMaker = mmdebstrap_rootfs,
    force: bool = False,
    progress: _Progress | None = None,
) -> GuestImage:
    """Return the cached disk guest for `inputs`, or build it and move it into place whole.
    `make_rootfs(spec, dest, debs_dir, work)` makes the tree and returns {package: version}."""
    prog = progress or _Progress(False, DISK_STEPS)
    key = disk_image_key(inputs)
    final = cache_dir / key[:16]
    if not force:
        hit = load_cached(final, key)
        if hit and hit.disk is not None:
            log.info("image.cached", key=key[:16], path=str(final), disk=True)
            return hit
    started = time.monotonic()
    with build_space(cache_dir, key) as (tmp, out, work):
        tree, modules, builtin = kernel_modules(inputs, download, cache_dir, work, prog,
                                                ("download kernel", "unpack kernel", "collect modules"))
        prog.step("compile gm-dirty, gm-journal and gm-diskbench")
        dirty = compile_static(inputs.dirty_source, "gm-dirty", work)
        journal = compile_static(inputs.journal_source, "gm-journal", work)
        diskbench = compile_static(inputs.diskbench_source, "gm-diskbench", work)
        prog.step("write boot initramfs")
        write_initrd(out / "initrd.img", boot_initramfs_entries(inputs, modules))
        shutil.copyfile(tree.vmlinuz, out / "vmlinuz")
        prog.step("make root filesystem (mmdebstrap)")
        root = work / "root"
        t0 = time.monotonic()
        installed = make_rootfs(inputs.rootfs, root, cache_dir / "debs" / "rootfs", work)
        rootfs_s = time.monotonic() - t0
        wrong = version_mismatches(inputs.rootfs.package_versions, installed)
        if wrong:
            raise ImageError(f"the guest root filesystem got {'; '.join(wrong)}: the archive moved on since apt's "
                             "last update here; run apt-get update and build again")
        prog.step("install guest files")
        install_guest_files(root, guest_files(inputs, dirty, journal, diskbench))
        prog.step("make ext4 image")
        make_ext4(root, out / "disk.raw", inputs.disk_mib)
        os.chmod(out / "disk.raw", 0o444)  # boot a copy: a guest writes its disk
        names = ("vmlinuz", "initrd.img", "disk.raw")
        files = {n: {"size": (out / n).stat().st_size, "sha256": _sha256_file(out / n)} for n in names}
        allocated = (out / "disk.raw").stat().st_blocks * 512
        manifest = {
            "key": key,
            "kind": "disk",
            "build_id": uuid.uuid4().hex,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": disk_input_digests(inputs),
            "kernel": {
                "package": inputs.kernel_package,
                "version": inputs.kernel_package_version,
                "release": tree.release,
            },
            "modules": [n for n, _ in modules],
            "modules_builtin": builtin,
            "packages": dict(sorted(installed.items())),
            "disk": {"apparent_bytes": files["disk.raw"]["size"], "allocated_bytes": allocated},
            "files": files,
        }
        _write_file(out / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode())
        hit = publish(out, final, tmp, key)
        if hit:
            return hit
        log.info(
            "image.built",
            key=key[:16],
            path=str(final),
            kernel=tree.release,
            disk_apparent_bytes=files["disk.raw"]["size"],
            disk_allocated_bytes=allocated,
            packages=len(installed),
            rootfs_seconds=round(rootfs_s, 1),
            seconds=round(time.monotonic() - started, 2),
        )
        return GuestImage(final / "vmlinuz", final / "initrd.img", key, tree.release, final, final / "disk.raw")


def disk_inputs(package: str, version: str, rootfs: RootfsSpec) -> DiskImageInputs:
    """The inputs from this geomirror tree and this host (busybox, the C sources, kamailio.cfg)."""
    for p, what in ((DIRTY_SOURCE, "the gm-dirty source"), (JOURNAL_SOURCE, "the gm-journal source"),
                    (DISKBENCH_SOURCE, "the gm-diskbench source"),
                    (guest_sip.KAMAILIO_CFG, "the Kamailio config")):  # fmt: skip
        if not p.is_file():
            raise ImageError(f"{what} {p} is missing from the geomirror tree")
    if not BUSYBOX.is_file():
        raise ImageError(f"{BUSYBOX} is missing; install the apt package busybox-static")
    return DiskImageInputs(
        kernel_package=package,
        kernel_package_version=version,
        busybox=BUSYBOX,
        boot_init_script=BOOT_INIT_SCRIPT,
        disk_init_script=disk_init_script(),
        dirty_source=DIRTY_SOURCE.read_text(),
        journal_source=JOURNAL_SOURCE.read_text(),
        diskbench_source=DISKBENCH_SOURCE.read_text(),
        rootfs=rootfs,
        sip_config=guest_sip.KAMAILIO_CFG.read_text(),
    )


def build_disk_image(cache_dir: Path | None = None, *, force: bool = False, progress: bool | None = None,
                     disk_mib: int = DISK_MIB) -> GuestImage:
    """Build (or reuse) the disk guest: kernel, boot initramfs and `disk` (raw ext4, read-only in
    the cache: boot a copy). Runs on the host; refused inside a gm-* network namespace."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prog = _Progress(sys.stderr.isatty() if progress is None else progress, DISK_STEPS)
    prog.step("resolve packages")
    refuse_inside_lab_netns()
    package, version = resolve_kernel_package()
    rootfs = RootfsSpec(
        suite=SUITE,
        variant=VARIANT,
        sources=SOURCES,
        packages=PACKAGES,
        package_versions=tuple((p, candidate_version(p)) for p in PACKAGES),
        archive_state=archive_state(SOURCES),
        mmdebstrap_version=mmdebstrap_version(),
    )
    inputs = replace(disk_inputs(package, version, rootfs), disk_mib=disk_mib)
    return build_disk_from_inputs(inputs, cache_dir, force=force, progress=prog)

