"""Guest image builder: Debian's cloud kernel plus a busybox/memcached initramfs, cached by content.

The image is `<cache_dir>/<key[:16]>/{vmlinuz,initrd.img,manifest.json}`; the key is a
sha256 over every input, so a changed input makes a new image and an unchanged one
is reused. A build happens in a `.build-*` directory beside it and is renamed into
place whole. The kernel package is fetched with `apt-get download` and unpacked with
`dpkg -x`; it is never installed on the host.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import ipaddress
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import structlog
import zstandard

from geomirror import guest_sip
from geomirror.errors import ImageError

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
# virtio-net and what it needs, in load order (each is a module in Debian's cloud kernel).
VIRTIO_NET_MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
)
BUSYBOX = Path("/bin/busybox")
MEMCACHED = Path("/usr/bin/memcached")
DIRTY_SOURCE = Path(__file__).resolve().parent.parent / "guest" / "dirty.c"
DEFAULT_CACHE_DIR = Path("/var/cache/geomirror/guest")
READY_MARKER = "GEOMIRROR-GUEST-READY"
BUSYBOX_APPLETS = (
    "sh", "mount", "insmod", "lsmod", "cat", "grep", "ip", "sysctl", "sleep", "mkdir",
    "ls", "ps", "dmesg", "kill", "free", "uname", "top", "nc",
)  # fmt: skip
STEPS = (
    "resolve kernel",
    "download",
    "unpack",
    "collect modules",
    "compile gm-dirty",
    "collect memcached libs",
    "unpack kamailio",
    "write initramfs",
)

INIT_SCRIPT = r"""#!/bin/sh
# geomirror guest init (PID 1): virtio-net from modules, addresses from the kernel
# command line (gm.ip=ADDR/LEN gm.gw=ADDR [gm.ip6=ADDR6/LEN gm.gw6=ADDR6]
# [gm.dirty=MB:PAGES_PER_S]), memcached on TCP 11211 (IPv4, and IPv6 with gm.ip6),
# then the READY line on the console. It never exits.
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/gm-modules); do
    insmod "/lib/modules/$m.ko" || echo "gm-init: insmod $m failed"
done
addr=; gw=; addr6=; gw6=; dirty=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        gm.ip=*) addr="${arg#gm.ip=}" ;;
        gm.gw=*) gw="${arg#gm.gw=}" ;;
        gm.ip6=*) addr6="${arg#gm.ip6=}" ;;
        gm.gw6=*) gw6="${arg#gm.gw6=}" ;;
        gm.dirty=*) dirty="${arg#gm.dirty=}" ;;
    esac
done
n=0
while [ ! -e /sys/class/net/eth0 ] && [ "$n" -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
ip link set lo up
if [ -z "$addr" ]; then
    echo "GEOMIRROR-GUEST-ERROR no gm.ip= on the kernel command line"
elif [ ! -e /sys/class/net/eth0 ]; then
    echo "GEOMIRROR-GUEST-ERROR no eth0 (virtio-net) appeared"
else
    listen=0.0.0.0; any6=
    if [ -n "$addr6" ]; then
        # static IPv6: no router advertisements, no autoconfiguration, and no DAD (the
        # address is ours by configuration; DAD would hold it tentative for a second)
        for k in accept_ra=0 autoconf=0 accept_dad=0; do
            sysctl -w "net.ipv6.conf.eth0.$k" >/dev/null 2>&1
        done
        listen="0.0.0.0,[::]"; any6=00000000000000000000000000000000
    else
        sysctl -w net.ipv6.conf.eth0.disable_ipv6=1 >/dev/null 2>&1
    fi
    ip addr add "$addr" dev eth0
    ip link set eth0 up
    [ -n "$gw" ] && ip route add default via "$gw" dev eth0
    if [ -n "$addr6" ]; then
        ip -6 addr add "$addr6" dev eth0
        [ -n "$gw6" ] && ip -6 route add default via "$gw6" dev eth0
    fi
    memcached -u root -l "$listen" -p 11211 -U 0 -m 64 -t 1 &
    mc=$!
    while ! grep -q ':2BCB 00000000:0000 0A' /proc/net/tcp \
            || { [ -n "$any6" ] && ! grep -q ":2BCB $any6:0000 0A" /proc/net/tcp6; }; do
        if ! kill -0 "$mc" 2>/dev/null; then echo "GEOMIRROR-GUEST-ERROR memcached exited"; break; fi
        sleep 0.1
    done
    # SIP (geomirror/guest_sip.py): Kamailio on UDP+TCP 5060 and the echo UA; READY waits for them.
    sip=ok; [ -x /usr/bin/gm-sip-start ] && { gm-sip-start "${addr%/*}" || sip=failed; }
    if kill -0 "$mc" 2>/dev/null && [ "$sip" = ok ]; then
        echo "GEOMIRROR-GUEST-READY ip=${addr%/*}${addr6:+ ip6=${addr6%/*}}"
        [ -n "$dirty" ] && gm-dirty "${dirty%%:*}" "${dirty#*:}" &
    fi
fi
while :; do sleep 3600; done
"""


# ---------------------------------------------------------------- data


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    key: str
    kernel_version: str
    path: Path
    disk: Path | None = None  # the raw ext4 root disk of a disk guest (geomirror.disk_image); read-only: copy it


@dataclass(frozen=True)
class ImageInputs:
    """Everything an image is made from; `image_key` hashes it."""

    kernel_package: str
    kernel_package_version: str
    busybox: Path
    memcached: Path
    memcached_libs: tuple[Path, ...]
    init_script: str
    dirty_source: str
    modules: tuple[str, ...] = VIRTIO_NET_MODULES
    format_version: int = FORMAT_VERSION
    sip: guest_sip.SipInputs | None = None  # None: an image without the SIP PBX


@dataclass(frozen=True)
class KernelTree:
    vmlinuz: Path
    release: str
    modules_dir: Path


@dataclass(frozen=True)
class CpioEntry:
    """One newc member: `mode` holds the file type bits; a symlink's `data` is its target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)

    @classmethod
    def dir(cls, path: str, perm: int = 0o755) -> CpioEntry:
        return cls(path, stat.S_IFDIR | perm)

    @classmethod
    def file(cls, path: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(path, stat.S_IFREG | perm, data)

    @classmethod
    def symlink(cls, path: str, target: str) -> CpioEntry:
        return cls(path, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, path: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(path, stat.S_IFCHR | perm, b"", (major, minor))


Downloader = Callable[[str, str, Path], Path]  # (package, version, debs_dir) -> .deb


# ---------------------------------------------------------------- pure parts


def write_newc(entries: Iterable[CpioEntry], out: BinaryIO) -> None:
    """Write `entries` as a newc ("070701") cpio archive, with mtime 0 and owner root."""
    seen: set[str] = set()
    ino = 0

    def member(name: str, mode: int, data: bytes, nlink: int, rdev: tuple[int, int], ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw), 0)
        head = b"070701" + b"".join(b"%08X" % f for f in fields) + raw
        out.write(head + b"\0" * (-len(head) % 4))
        out.write(data + b"\0" * (-len(data) % 4))

    for e in entries:
        name = e.path.strip("/")
        if not name or ".." in name.split("/"):
            raise ImageError(f"initramfs member path {e.path!r} is not a plain relative path")
        if name in seen:
            raise ImageError(f"initramfs member {name!r} is listed twice")
        if (stat.S_ISDIR(e.mode) or stat.S_ISCHR(e.mode)) and e.data:
            raise ImageError(f"initramfs member {name!r} is a directory or device but has data")
        seen.add(name)
        ino += 1
        member(name, e.mode, e.data, 2 if stat.S_ISDIR(e.mode) else 1, e.rdev, ino)
    member("TRAILER!!!", 0, b"", 1, (0, 0), 0)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def input_digests(inputs: ImageInputs) -> dict:
    """What the key covers: names and versions as text, files by the sha256 of their bytes."""
    try:
        return {
            "format_version": inputs.format_version,
            "kernel_package": inputs.kernel_package,
            "kernel_package_version": inputs.kernel_package_version,
            "busybox_sha256": _sha256_file(inputs.busybox),
            "memcached_sha256": _sha256_file(inputs.memcached),
            "memcached_libs": {str(p): _sha256_file(p) for p in inputs.memcached_libs},
            "init_sha256": hashlib.sha256(inputs.init_script.encode()).hexdigest(),
            "dirty_sha256": hashlib.sha256(inputs.dirty_source.encode()).hexdigest(),
            "modules": list(inputs.modules),
            "sip": guest_sip.digests(inputs.sip, _sha256_file) if inputs.sip else None,
        }
    except OSError as e:
        raise ImageError(f"cannot read image input {e.filename}: {e.strerror}") from e


def image_key(inputs: ImageInputs) -> str:
    """sha256 over the inputs (file inputs by content); same inputs, same key."""
    canon = json.dumps(input_digests(inputs), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def default_cmdline(ip: str, prefixlen: int, gateway: str, dirty: str | None = None, *,
                    ip6: str | None = None, prefixlen6: int | None = None, gateway6: str | None = None) -> str:
    """The guest's kernel command line (see the guest contract in docs/architecture.md);
    `ip6`/`prefixlen6`/`gateway6` (all or none) make the guest dual stack."""
    try:
        addr = ipaddress.IPv4Interface(f"{ip}/{prefixlen}")
        gw = ipaddress.IPv4Address(gateway)
    except ValueError as e:
        raise ImageError(f"guest address {ip}/{prefixlen} or gateway {gateway} is not valid IPv4: {e}") from e
    if gw not in addr.network:
        raise ImageError(f"guest gateway {gw} is not inside the guest network {addr.network}")
    parts = ["console=ttyS0", "panic=-1", "quiet", f"gm.ip={addr}", f"gm.gw={gw}"]
    six = (ip6, prefixlen6, gateway6)
    if any(v is not None for v in six):
        if any(v is None for v in six):
            raise ImageError("guest IPv6 address, prefix length and gateway go together (all or none)")
        try:
            addr6 = ipaddress.IPv6Interface(f"{ip6}/{prefixlen6}")
            gw6 = ipaddress.IPv6Address(gateway6)
        except ValueError as e:
            raise ImageError(f"guest address {ip6}/{prefixlen6} or gateway {gateway6} is not valid IPv6: {e}") from e
        if gw6 not in addr6.network:
            raise ImageError(f"guest IPv6 gateway {gw6} is not inside the guest network {addr6.network}")
        parts += [f"gm.ip6={addr6}", f"gm.gw6={gw6}"]
    if dirty is not None:
        m = re.fullmatch(r"(\d+):(\d+)", dirty)
        if not m or int(m.group(1)) == 0:
            raise ImageError(f"gm.dirty {dirty!r} is not MB:PAGES_PER_S with MB > 0")
        parts.append(f"gm.dirty={dirty}")
    return " ".join(parts)


def parse_ldd(text: str, binary: str = "memcached") -> list[Path]:
    """Library paths from `ldd` output, the dynamic loader included; vdso skipped."""
    libs: list[Path] = []
    for line in text.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, rest = line.partition("=>")
            rest = rest.strip()
            if rest.startswith("not found"):
                raise ImageError(f"{binary} needs {name.strip()}, which ldd cannot find on this host")
            target = rest.split(" (")[0].strip()
            if target.startswith("/"):
                libs.append(Path(target))
        elif line.startswith("/"):
            libs.append(Path(line.split(" (")[0]))
    return libs


# ---------------------------------------------------------------- progress


class _Progress:
    def __init__(self, bar: bool, steps: tuple[str, ...] = STEPS):
        self.bar = bar
        self.steps = steps
        self.n = 0

    def step(self, name: str) -> None:
        self.n += 1
        of = len(self.steps)
        log.info("image.step", step=name, n=self.n, of=of)
        if self.bar:
            done = int(20 * self.n / of)
            sys.stderr.write(f"[{'#' * done}{'.' * (20 - done)}] {self.n}/{of} {name}\n")
            sys.stderr.flush()


# ---------------------------------------------------------------- I/O edges


def _run(argv: list[str], *, cwd: Path | None = None, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise ImageError(f"cannot {what}: the program {argv[0]} is not installed") from e


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def candidate_version(package: str) -> str:
    """apt's candidate version of `package`."""
    show = _run(["apt-cache", "show", "--no-all-versions", package], what=f"ask apt about {package}")
    ver = re.search(r"^Version:\s*(\S+)", show.stdout, re.M)
    if not ver:
        raise ImageError(f"apt cannot find the package {package} (run apt-get update?)")
    return ver.group(1)


def resolve_kernel_package(meta: str = KERNEL_METAPACKAGE) -> tuple[str, str]:
    """The concrete linux-image package `meta` depends on, and apt's candidate version."""
    for attempt in (0, 1):
        deps = _run(["apt-cache", "depends", meta], what=f"ask apt about {meta}")
        pkg = next(iter(re.findall(r"^\s*Depends:\s*(linux-image-\S+)", deps.stdout, re.M)), None)
        if pkg:
            show = _run(["apt-cache", "show", "--no-all-versions", pkg], what=f"ask apt about {pkg}")
            ver = re.search(r"^Version:\s*(\S+)", show.stdout, re.M)
            if ver:
                return pkg, ver.group(1)
        if attempt == 0:
            log.info("image.apt_update", reason=f"apt-cache does not know {meta}")
            upd = _run(["apt-get", "update", "-qq"], what="update apt's package lists")
            if upd.returncode != 0:
                raise ImageError(f"apt-get update failed: {_last_line(upd.stderr)}")
    raise ImageError(f"apt cannot find the kernel package {meta} or the linux-image package it depends on")


def shared_libraries(binary: Path, lib_dirs: Iterable[Path] = ()) -> tuple[Path, ...]:
    """Shared libraries `binary` loads (via ldd); empty for a static binary. `lib_dirs` are
    searched first (LD_LIBRARY_PATH): where an unpacked package keeps its own libraries."""
    env = None
    dirs = [str(d) for d in lib_dirs]
    if dirs:
        env = {**os.environ, "LD_LIBRARY_PATH": ":".join(dirs)}
    try:
        res = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False, env=env)
    except FileNotFoundError as e:
        raise ImageError(f"cannot list the libraries of {binary}: the program ldd is not installed") from e
    if res.returncode != 0:
        if "not a dynamic executable" in res.stdout + res.stderr:
            return ()
        raise ImageError(f"ldd {binary} failed: {_last_line(res.stderr or res.stdout)}")
    return tuple(parse_ldd(res.stdout, binary.name))


def _deb_glob(package: str, version: str) -> str:
    return f"{package}_{version.replace(':', '%3a')}_*.deb"


def apt_download(package: str, version: str, debs_dir: Path) -> Path:
    """The .deb of package=version, from debs_dir if already there, else `apt-get download`."""
    debs_dir.mkdir(parents=True, exist_ok=True)
    cached = sorted(debs_dir.glob(_deb_glob(package, version)))
    if cached:
        log.info("image.deb_cached", deb=str(cached[0]))
        return cached[0]
    part = Path(tempfile.mkdtemp(prefix=".download-", dir=debs_dir))
    try:
        res = _run(["apt-get", "download", f"{package}={version}"], cwd=part, what=f"download {package}")
        got = sorted(part.glob(_deb_glob(package, version)))
        if res.returncode != 0 or len(got) != 1:
            raise ImageError(f"apt-get download {package}={version} failed: {_last_line(res.stderr)}")
        dest = debs_dir / got[0].name
        os.replace(got[0], dest)
        log.info("image.deb_downloaded", deb=str(dest), size=dest.stat().st_size)
        return dest
    finally:
        shutil.rmtree(part, ignore_errors=True)


def unpack_deb(deb: Path, dest: Path) -> Path:
    """`dpkg -x` a package into dest (never installed); a .deb that fails is removed from the cache."""
    res = _run(["dpkg", "-x", str(deb), str(dest)], what=f"unpack {deb.name}")
    if res.returncode != 0:
        deb.unlink(missing_ok=True)  # likely a torn download: fetch it again next time
        raise ImageError(f"dpkg -x {deb.name} failed (the cached .deb was removed): {_last_line(res.stderr)}")
    return dest


def unpack_kernel(deb: Path, dest: Path) -> KernelTree:
    """`dpkg -x` the kernel package into dest (never installed) and find vmlinuz and the modules."""
    unpack_deb(deb, dest)
    kernels = sorted((dest / "boot").glob("vmlinuz-*"))
    releases = sorted(p for p in (dest / "lib" / "modules").glob("*") if p.is_dir())
    if len(kernels) != 1 or len(releases) != 1:
        raise ImageError(f"{deb.name} does not hold exactly one boot/vmlinuz-* and one lib/modules/<release>")
    return KernelTree(vmlinuz=kernels[0], release=releases[0].name, modules_dir=releases[0])


def collect_modules(tree: KernelTree, names: Iterable[str]) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Module bytes (decompressed) in load order, and the names skipped because they are built in."""
    found: dict[str, Path] = {}
    for p in tree.modules_dir.rglob("*.ko*"):
        stem = p.name.split(".ko")[0].replace("-", "_")
        found.setdefault(stem, p)
    builtin_file = tree.modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        for line in builtin_file.read_text().splitlines():
            builtin.add(Path(line.strip()).name.split(".ko")[0].replace("-", "_"))
    modules: list[tuple[str, bytes]] = []
    skipped: list[str] = []
    for name in names:
        path = found.get(name)
        if path is None:
            if name in builtin:
                log.info("image.module_builtin", module=name, note="built into the kernel; not loaded")
                skipped.append(name)
                continue
            raise ImageError(f"kernel {tree.release} has no module {name} and does not build it in")
        data = path.read_bytes()
        if path.name.endswith(".ko.xz"):
            data = lzma.decompress(data)
        elif path.name.endswith(".ko.zst"):
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif path.name.endswith(".ko.gz"):
            data = gzip.decompress(data)
        elif not path.name.endswith(".ko"):
            raise ImageError(f"module file {path.name} has a compression this builder cannot read")
        modules.append((name, data))
    return modules, skipped


def compile_static(source: str, name: str, work: Path) -> bytes:
    """Compile one C file statically into the program `name`; ImageError naming the apt
    packages if the toolchain is missing."""
    src, out = work / f"{name}.c", work / name
    src.write_text(source)
    need = "install the apt packages gcc libc6-dev"
    if shutil.which("gcc") is None:
        raise ImageError(f"cannot compile {name}: gcc is not installed; {need}")
    res = _run(["gcc", "-static", "-O2", "-s", "-o", str(out), str(src)], what=f"compile {name}")
    if res.returncode != 0:
        err = res.stderr
        if "cannot find -lc" in err or "No such file or directory" in err or "crt1.o" in err:
            raise ImageError(f"cannot compile {name}: a static C library is missing; {need}")
        raise ImageError(f"gcc failed to compile {name}: {_last_line(err)}")
    return out.read_bytes()


def compile_dirty(source: str, work: Path) -> bytes:
    """Compile gm-dirty statically (see `compile_static`)."""
    return compile_static(source, "gm-dirty", work)


def initramfs_entries(
    inputs: ImageInputs,
    modules: list[tuple[str, bytes]],
    dirty_binary: bytes,
    sip_files: Iterable[tuple[Path, str]] = (),
) -> list[CpioEntry]:
    """The initramfs members, every directory before what it holds. `sip_files` are
    (source, guest path) of the SIP part's binaries and libraries (see `collect_sip`)."""
    files: list[CpioEntry] = [
        CpioEntry.file("init", inputs.init_script.encode(), 0o755),
        CpioEntry.file("bin/busybox", inputs.busybox.read_bytes(), 0o755),
        *(CpioEntry.symlink(f"bin/{a}", "busybox") for a in BUSYBOX_APPLETS),
        CpioEntry.file("usr/bin/memcached", inputs.memcached.read_bytes(), 0o755),
        CpioEntry.file("usr/bin/gm-dirty", dirty_binary, 0o755),
        *(CpioEntry.file(str(p), p.read_bytes(), 0o755) for p in inputs.memcached_libs),
        *(CpioEntry.file(f"lib/modules/{n}.ko", d) for n, d in modules),
        CpioEntry.file("etc/gm-modules", "".join(f"{n}\n" for n, _ in modules).encode()),
        CpioEntry.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        CpioEntry.file("etc/group", b"root:x:0:\n"),
        CpioEntry.chardev("dev/console", 5, 1),
        CpioEntry.chardev("dev/null", 1, 3, 0o666),
    ]
    if inputs.sip is not None:
        have = {e.path.strip("/") for e in files}  # a library memcached also loads goes in once
        for src, guest in sip_files:
            if guest not in have:
                have.add(guest)
                files.append(CpioEntry.file(guest, src.read_bytes(), 0o755))
        files += [CpioEntry.file(g, data, perm) for g, data, perm in
                  guest_sip.guest_files(inputs.sip.config, inputs.sip.start_script)]
    dirs = {"dev", "proc", "sys", "tmp", "root", "run"}
    for e in files:
        parts = e.path.strip("/").split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return [CpioEntry.dir(d) for d in sorted(dirs)] + files


def collect_sip(sip: guest_sip.SipInputs, download: Downloader, debs_dir: Path, work: Path) -> list[tuple[Path, str]]:
    """Fetch and unpack the kamailio package; (source, guest path) of the Kamailio binary, the
    modules the config loads, sipp, and every library they load (ldd; the package's own
    libraries are looked up inside the unpacked tree, the rest on the host)."""
    guest_sip.check_config_modules(sip.config, sip.modules)
    deb = download(sip.kamailio_package, sip.kamailio_package_version, debs_dir)
    tree = unpack_deb(deb, work)
    picks = guest_sip.kamailio_files(tree, sip.modules)
    libs: list[Path] = []
    for src, _ in picks:
        libs += shared_libraries(src, [tree / guest_sip.KAMAILIO_LIB_DIR])
    files = [
        *picks,
        *guest_sip.place_libraries(libs, tree),
        (sip.sipp, "usr/bin/sipp"),
        *((p, str(p).lstrip("/")) for p in sip.sipp_libs),
    ]
    return list({guest: (src, guest) for src, guest in reversed(files)}.values())[::-1]  # first wins


# ---------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("GEOMIRROR_CACHE_DIR") or DEFAULT_CACHE_DIR)


def load_cached(path: Path, key: str) -> GuestImage | None:
    """The image at `path` if its manifest names `key` and its files have the recorded sizes."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("key") != key:
            return None
        for name, meta in manifest["files"].items():
            if (path / name).stat().st_size != meta["size"]:
                return None
        return GuestImage(
            kernel=path / "vmlinuz",
            initrd=path / "initrd.img",
            key=key,
            kernel_version=manifest["kernel"]["release"],
            path=path,
            disk=path / "disk.raw" if "disk.raw" in manifest["files"] else None,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _sweep_stale_builds(cache_dir: Path) -> None:
    """Remove `.build-*` dirs left by builders that died (their pid is gone)."""
    for d in cache_dir.glob(".build-*"):
        m = re.match(r"\.build-[0-9a-f]+-(\d+)-", d.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            log.info("image.stale_build_removed", path=str(d))
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish(out: Path, final: Path, tmp: Path, key: str) -> GuestImage | None:
    """Rename the finished build dir `out` into place as `final` (an old `final` goes into
    `tmp`, removed with it) and fsync the cache dir; the image another builder put there
    first if it won the race with the same inputs, else None."""
    if final.exists():
        os.replace(final, tmp / "replaced")
    try:
        os.rename(out, final)
    except OSError:
        hit = load_cached(final, key)
        if hit:
            return hit
        raise
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return None


@contextlib.contextmanager
def build_space(cache_dir: Path, key: str):
    """A fresh `.build-*` directory beside the cache entries, with `image/` (what `publish`
    moves into place) and `work/` inside; removed with all it holds when the build ends."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    _sweep_stale_builds(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{key[:16]}-{os.getpid()}-", dir=cache_dir))
    try:
        out, work = tmp / "image", tmp / "work"
        out.mkdir()
        work.mkdir()
        yield tmp, out, work
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def kernel_modules(inputs, download: Downloader, cache_dir: Path, work: Path, prog: _Progress,
                   steps: tuple[str, str, str]) -> tuple[KernelTree, list[tuple[str, bytes]], list[str]]:
    """Download and unpack the kernel package, collect the boot modules: the first three steps
    of every guest build (`steps` names them in the progress)."""
    prog.step(steps[0])
    deb = download(inputs.kernel_package, inputs.kernel_package_version, cache_dir / "debs")
    prog.step(steps[1])
    tree = unpack_kernel(deb, work / "kernel")
    prog.step(steps[2])
    modules, builtin = collect_modules(tree, inputs.modules)
    return tree, modules, builtin


def write_initrd(path: Path, entries: Iterable[CpioEntry]) -> None:
    """A gzip'd newc initramfs of `entries`, reproducible (mtime 0) and fsynced."""
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as gz:
            write_newc(entries, gz)
        raw.flush()
        os.fsync(raw.fileno())


def build_from_inputs(
    inputs: ImageInputs,
    cache_dir: Path,
    *,
    download: Downloader = apt_download,
    force: bool = False,
    progress: _Progress | None = None,
) -> GuestImage:
    """Return the cached image for `inputs`, or build it and move it into place whole."""
    prog = progress or _Progress(False)
    key = image_key(inputs)
    final = cache_dir / key[:16]
    if not force:
        hit = load_cached(final, key)
        if hit:
            log.info("image.cached", key=key[:16], path=str(final))
            return hit
    started = time.monotonic()
    with build_space(cache_dir, key) as (tmp, out, work):
        tree, modules, builtin = kernel_modules(inputs, download, cache_dir, work, prog,
                                                ("download", "unpack", "collect modules"))
        prog.step("compile gm-dirty")
        dirty = compile_dirty(inputs.dirty_source, work)
        prog.step("collect memcached libs")
        log.info("image.memcached_libs", libs=[str(p) for p in inputs.memcached_libs])
        prog.step("unpack kamailio")
        sip_files: list[tuple[Path, str]] = []
        if inputs.sip is not None:
            sip_files = collect_sip(inputs.sip, download, cache_dir / "debs", work / "kamailio")
            log.info("image.sip_files", files=[g for _, g in sip_files])
        prog.step("write initramfs")
        write_initrd(out / "initrd.img", initramfs_entries(inputs, modules, dirty, sip_files))
        shutil.copyfile(tree.vmlinuz, out / "vmlinuz")
        files = {n: {"size": (out / n).stat().st_size, "sha256": _sha256_file(out / n)} for n in ("vmlinuz", "initrd.img")}
        manifest = {
            "key": key,
            "build_id": uuid.uuid4().hex,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "inputs": input_digests(inputs),
            "kernel": {
                "package": inputs.kernel_package,
                "version": inputs.kernel_package_version,
                "release": tree.release,
            },
            "modules": [n for n, _ in modules],
            "modules_builtin": builtin,
            "sip_files": sorted(g for _, g in sip_files),
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
            vmlinuz_bytes=files["vmlinuz"]["size"],
            initrd_bytes=files["initrd.img"]["size"],
            seconds=round(time.monotonic() - started, 2),
        )
        return GuestImage(final / "vmlinuz", final / "initrd.img", key, tree.release, final)


def build_image(cache_dir: Path | None = None, *, force: bool = False, progress: bool | None = None) -> GuestImage:
    """Build (or reuse) the guest image from Debian's cloud kernel and this host's busybox/memcached."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prog = _Progress(sys.stderr.isatty() if progress is None else progress)
    prog.step("resolve kernel")
    package, version = resolve_kernel_package()
    for p, apt in ((BUSYBOX, "busybox-static"), (MEMCACHED, "memcached"), (guest_sip.SIPP, "sip-tester")):
        if not p.is_file():
            raise ImageError(f"{p} is missing; install the apt package {apt}")
    if not DIRTY_SOURCE.is_file():
        raise ImageError(f"the gm-dirty source {DIRTY_SOURCE} is missing from the geomirror tree")
    if not guest_sip.KAMAILIO_CFG.is_file():
        raise ImageError(f"the Kamailio config {guest_sip.KAMAILIO_CFG} is missing from the geomirror tree")
    sip = guest_sip.SipInputs(
        kamailio_package_version=candidate_version(guest_sip.KAMAILIO_PACKAGE),
        config=guest_sip.KAMAILIO_CFG.read_text(),
        sipp=guest_sip.SIPP,
        sipp_libs=shared_libraries(guest_sip.SIPP),
    )
    inputs = ImageInputs(
        kernel_package=package,
        kernel_package_version=version,
        busybox=BUSYBOX,
        memcached=MEMCACHED,
        memcached_libs=shared_libraries(MEMCACHED),
        init_script=INIT_SCRIPT,
        dirty_source=DIRTY_SOURCE.read_text(),
        sip=sip,
    )
    return build_from_inputs(inputs, cache_dir, force=force, progress=prog)
