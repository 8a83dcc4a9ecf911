"""The lab: a simulated two-site world on one machine (DESIGN.md, "The lab").

Every process of a site runs inside that site's namespace, so killing the
namespace's processes is the loss of the site. Links are veth pairs created
directly inside the namespaces: nothing is ever added to the root namespace.
State, logs, pids and sockets live under /run/geomirror-lab.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from pyroute2 import NetNS
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

from geomirror import netns
from gmbase.errors import GeomirrorError
from lab import etcd as lab_etcd

log = structlog.get_logger(__name__)


class LabError(GeomirrorError):
    """The lab cannot be built or driven."""


LAB_DIR = Path(os.environ.get("GEOMIRROR_LAB_DIR", "/run/geomirror-lab"))
BIRD_CTL = LAB_DIR / "bird.ctl"
INET, SITE_A, SITE_B, WITNESS, CLIENT = "gm-inet", "gm-site-a", "gm-site-b", "gm-witness", "gm-client"
WAN = "gm-wan"
NAMESPACES = [INET, SITE_A, SITE_B, WITNESS, CLIENT, WAN]
SITES = {"site-a": SITE_A, "site-b": SITE_B}
SITE_AS = {"site-a": 64501, "site-b": 64502}
SITE_UPLINK = {"site-a": "198.18.1.2", "site-b": "198.18.2.2"}
GUEST_PREFIX = "198.51.100.0/24"
GUEST_ADDR = "198.51.100.10"
# dual stack (DESIGN.md, "The lab"): inter-namespace links from 2001:db8:18::/48, the client in
# 2001:db8:10::/64; BIRD routes the guest's /48 like its /24 (MP-BGP over the IPv4 sessions)
GUEST_PREFIX6 = "2001:db8:100::/48"
GUEST_ADDR6 = "2001:db8:100::10"
SITE_UPLINK6 = {"site-a": "2001:db8:18:1::2", "site-b": "2001:db8:18:2::2"}
INET_SIDE6 = {"site-a": "2001:db8:18:1::1", "site-b": "2001:db8:18:2::1"}  # BIRD's next hop to each site
CLIENT_ADDR6 = "2001:db8:10::2"
MEMCACHED_PORT = 11211
JOURNAL_PORT = 7000  # the disk guest's journal (DESIGN "Guest services")
DISK_FILE = "disk.raw"  # each site's own copy of the disk guest's image, in its lab dir


# The checkout (or site-packages) this lab was imported from: the lab's processes run the
# product from here, so a worktree's lab runs that worktree's daemons, not whatever the
# console script on PATH would import.
CODE_ROOT = Path(__file__).resolve().parent.parent


def repo_configs() -> Path:
    env = os.environ.get("GEOMIRROR_LAB_CONFIGS")
    if env:
        return Path(env)
    return CODE_ROOT / "configs" / "lab"


@dataclass(frozen=True)
class Link:
    """A veth pair: (ns_a, if_a, addr_a) <-> (ns_b, if_b, addr_b); addr6_a/addr6_b its IPv6 ends."""

    ns_a: str
    if_a: str
    addr_a: str
    ns_b: str
    if_b: str
    addr_b: str
    addr6_a: str | None = None
    addr6_b: str | None = None


LINKS = [
    Link(INET, "to-a", "198.18.1.1/30", SITE_A, "uplink0", "198.18.1.2/30", "2001:db8:18:1::1/64", "2001:db8:18:1::2/64"),
    Link(INET, "to-b", "198.18.2.1/30", SITE_B, "uplink0", "198.18.2.2/30", "2001:db8:18:2::1/64", "2001:db8:18:2::2/64"),
    Link(INET, "to-w", "198.18.3.1/30", WITNESS, "eth0", "198.18.3.2/30", "2001:db8:18:3::1/64", "2001:db8:18:3::2/64"),
    Link(INET, "to-client", "198.18.10.1/24", CLIENT, "eth0", "198.18.10.2/24", "2001:db8:10::1/64",
         f"{CLIENT_ADDR6}/64"),
]
# wan0 at each site is a TAP owned by the WAN emulator in gm-wan (lab/wanem.py).
WAN_ENDS = [(SITE_A, "wan0", "198.18.100.1/30"), (SITE_B, "wan0", "198.18.100.2/30")]
WAN_ENDS6 = {SITE_A: "2001:db8:18:100::1/64", SITE_B: "2001:db8:18:100::2/64"}
WAN_CTL = LAB_DIR / "wan.sock"
DEFAULT_ROUTES = {SITE_A: "198.18.1.1", SITE_B: "198.18.2.1", WITNESS: "198.18.3.1", CLIENT: "198.18.10.1"}
DEFAULT_ROUTES6 = {SITE_A: "2001:db8:18:1::1", SITE_B: "2001:db8:18:2::1", WITNESS: "2001:db8:18:3::1",
                   CLIENT: "2001:db8:10::1"}
FORWARDING = [INET, SITE_A, SITE_B]
# IPv6 in every lab namespace, set before any link exists (a link takes the `default` values):
# no router advertisements or autoconfiguration (the lab's addresses are static), no duplicate
# address detection (it holds a new address tentative for a second), and addresses kept when a
# link goes down (a crashed site's uplink comes back with them; the kernel flushes them otherwise)
IPV6_SYSCTLS = {"accept_ra": "0", "autoconf": "0", "accept_dad": "0", "keep_addr_on_down": "1"}


# ---------------------------------------------------------------- processes

def _state_path() -> Path:
    return LAB_DIR / "lab.json"


def load_state() -> dict:
    try:
        return json.loads(_state_path().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"pids": {}, "namespaces": [], "routing": "static", "static_site": "site-a"}


def save_state(state: dict) -> None:
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    tmp = _state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.chmod(tmp, 0o600)
    os.replace(tmp, _state_path())


def _ns_inode(name: str) -> int | None:
    try:
        return os.stat(netns.NETNS_DIR / name).st_ino
    except FileNotFoundError:
        return None


def pids_in_netns(name: str) -> list[int]:
    """Every process whose network namespace is `name` (found by the namespace's inode)."""
    ino = _ns_inode(name)
    if ino is None:
        return []
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if os.stat(f"/proc/{d}/ns/net").st_ino == ino:
                out.append(int(d))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return out


def kill_pids(pids, sig=signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        left = [p for p in left if _alive(p)]
        if left:
            time.sleep(0.05)
    return left


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between open and read
        return False


def child_env(extra: dict | None = None) -> dict:
    """The environment of a lab process: ours, plus `extra`, with CODE_ROOT first on PYTHONPATH."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CODE_ROOT), env.get("PYTHONPATH")) if p)
    return env


def spawn(ns: str, role: str, argv: list[str], env: dict | None = None) -> int:
    """Start a lab process inside `ns`, its output appended to LAB_DIR/<role>.log. It runs in
    CODE_ROOT with CODE_ROOT first on its PYTHONPATH; `env` adds variables (tests only)."""
    logf = open(LAB_DIR / f"{role}.log", "ab")
    try:
        p = netns.spawn(ns, argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                        start_new_session=True, env=child_env(env), cwd=CODE_ROOT)
    finally:
        logf.close()
    state = load_state()
    state["pids"][role] = p.pid
    save_state(state)
    log.info("lab.spawn", role=role, netns=ns, pid=p.pid)
    return p.pid


# ---------------------------------------------------------------- network

def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates network namespaces and TAP devices); run it as root")


def build_network() -> None:
    state = load_state()
    for name in NAMESPACES:
        netns.create(name)
        state["namespaces"].append(name)
        save_state(state)
    for name in NAMESPACES:
        _ipv6_sysctls(name)
    handles = {name: NetNS(name) for name in NAMESPACES}
    try:
        for name, h in handles.items():
            h.link("set", index=h.link_lookup(ifname="lo")[0], state="up")
        for ln in LINKS:
            a, b = handles[ln.ns_a], handles[ln.ns_b]
            a.link("add", ifname=ln.if_a, kind="veth", peer={"ifname": ln.if_b, "net_ns_fd": ln.ns_b})
            for h, ifname, addr, addr6 in ((a, ln.if_a, ln.addr_a, ln.addr6_a), (b, ln.if_b, ln.addr_b, ln.addr6_b)):
                idx = h.link_lookup(ifname=ifname)[0]
                ip, plen = addr.split("/")
                h.addr("add", index=idx, address=ip, prefixlen=int(plen))
                if addr6:
                    ip6, plen6 = addr6.split("/")
                    h.addr("add", index=idx, family=socket.AF_INET6, address=ip6, prefixlen=int(plen6),
                           flags=IFA_F_NODAD)
                h.link("set", index=idx, state="up")
        for name, gw in DEFAULT_ROUTES.items():
            handles[name].route("add", dst="0.0.0.0/0", gateway=gw)
        for name, gw in DEFAULT_ROUTES6.items():
            handles[name].route("add", family=socket.AF_INET6, dst="::/0", gateway=gw)
    finally:
        for h in handles.values():
            h.close()
    for name in FORWARDING:
        with netns.inside(name):
            Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
            Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1\n")


def _ipv6_sysctls(name: str) -> None:
    """IPV6_SYSCTLS for `all` and `default` inside namespace `name` (never the root namespace)."""
    with netns.inside(name):
        for conf in ("all", "default"):
            for key, value in IPV6_SYSCTLS.items():
                Path(f"/proc/sys/net/ipv6/conf/{conf}/{key}").write_text(value + "\n")


def start_wan(python: str = sys.executable, timeout: float = 10.0) -> int:
    """The WAN emulator; returns when wan0 exists and is up at both sites."""
    pid = spawn(WAN, "wan", [python, "-m", "lab.wanem"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            raise LabError(f"the WAN emulator exited at start; see {LAB_DIR / 'wan.log'}")
        if WAN_CTL.exists() and all(_has_link(ns, ifn) for ns, ifn, _ in WAN_ENDS):
            return pid
        time.sleep(0.05)
    raise LabError(f"the WAN emulator did not come up in {timeout:.0f}s; see {LAB_DIR / 'wan.log'}")


def _has_link(ns: str, ifname: str) -> bool:
    with NetNS(ns) as h:
        return bool(h.link_lookup(ifname=ifname))


def set_links(ns: str, up: bool, ifnames=("uplink0", "wan0")) -> None:
    """Links down (a lost site, a cut WAN) or up again; the kernel drops the routes through a
    link that goes down, so bringing it up puts the namespace's default route back."""
    with NetNS(ns) as h:
        for ifname in ifnames:
            idx = h.link_lookup(ifname=ifname)
            if idx:
                h.link("set", index=idx[0], state="up" if up else "down")
        for family, routes, dst in ((socket.AF_INET, DEFAULT_ROUTES, "0.0.0.0/0"),
                                    (socket.AF_INET6, DEFAULT_ROUTES6, "::/0")):
            gw = routes.get(ns)
            if up and gw and not any(r.get_attr("RTA_DST") is None and r["dst_len"] == 0
                                     for r in h.get_routes(family=family, table=254)):
                h.route("add", family=family, dst=dst, gateway=gw)


# ---------------------------------------------------------------- BIRD

def bird_config(routing: str, static_site: str | None) -> str:
    """BIRD 2 in gm-inet: AS 64500, both sites as neighbours, best routes to the kernel. Each
    session carries IPv4 and, over the same IPv4 session (MP-BGP), IPv6: the guest's /24 and
    /48 are imported from the sites and exported to them (so each site sees the other's route);
    BIRD's IPv6 next hop towards a site is its own address on that link."""
    lines = [
        "router id 198.18.0.1;",
        'log stderr all;',
        "protocol device { scan time 2; }",
        "protocol direct { ipv4; interface \"to-*\"; }",
        "protocol kernel { ipv4 { import none; export all; }; learn off; }",
        "protocol kernel { ipv6 { import none; export where source = RTS_BGP || source = RTS_STATIC; }; learn off; }",
    ]
    # RFC 8326: a route tagged GRACEFUL_SHUTDOWN (65535:0) gets local-pref 0 on import, so any
    # other path wins while it stays as the fallback (make before break on a planned move)
    lines.append("filter gshut { if (65535, 0) ~ bgp_community then bgp_local_pref = 0; accept; }")
    if routing == "static" and static_site:
        lines.append(f"protocol static lab_static {{ ipv4; route {GUEST_PREFIX} via {SITE_UPLINK[static_site]}; }}")
        lines.append(f"protocol static lab_static6 {{ ipv6; route {GUEST_PREFIX6} via {SITE_UPLINK6[static_site]}; }}")
    for site, asn in SITE_AS.items():
        addr = SITE_UPLINK[site]
        local = addr.rsplit(".", 1)[0] + ".1"
        lines.append(
            f"protocol bgp {site.replace('-', '_')} {{ local {local} as 64500; neighbor {addr} as {asn}; "
            "hold time 6; connect retry time 2; error wait time 1, 5; "
            f"ipv4 {{ import filter gshut; export where net = {GUEST_PREFIX}; }}; "
            f"ipv6 {{ import filter gshut; export where net = {GUEST_PREFIX6}; next hop address {INET_SIDE6[site]}; }}; "
            "graceful restart off; }")
    return "\n".join(lines) + "\n"


def write_bird_config(routing: str, static_site: str | None) -> Path:
    path = LAB_DIR / "bird.conf"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(bird_config(routing, static_site))
    os.replace(tmp, path)
    return path


def start_bird(routing: str, static_site: str | None) -> int:
    conf = write_bird_config(routing, static_site)
    return spawn(INET, "bird", ["bird", "-f", "-c", str(conf), "-s", str(BIRD_CTL),
                                "-P", str(LAB_DIR / "bird.pid")])


def birdc(*args: str, timeout: float = 5.0) -> str:
    r = subprocess.run(["birdc", "-s", str(BIRD_CTL), *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise LabError(f"birdc {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def route_static_to(site: str) -> None:
    """Until BGP drives it: point the lab's static route for the guest prefix at `site`."""
    state = load_state()
    state["static_site"] = site
    save_state(state)
    write_bird_config(state.get("routing", "static"), site)
    birdc("configure")


def bird_guest_routes(prefix: str = GUEST_PREFIX) -> list[dict]:
    """Routes BIRD has for the guest prefix: [{'via': ..., 'proto': ..., 'as_path': [...], 'best': bool}]."""
    try:
        out = birdc("show", "route", "for", prefix, "all")
    except (LabError, subprocess.TimeoutExpired):
        return []
    return parse_bird_routes(out)


def bird_guest_routes6() -> list[dict]:
    """Routes BIRD has for the guest's IPv6 prefix (the /48), in the form of `bird_guest_routes`."""
    return bird_guest_routes(GUEST_PREFIX6)


def bird_reply_text(lines: list[str]) -> str:
    """The text birdc prints for one reply of BIRD's control socket: each line's four-digit code
    and separator ('1007-...', '0000 ...') or the leading space of a continuation line go (pure)."""
    out = []
    for line in lines:
        if len(line) >= 5 and line[:4].isdigit() and line[4] in " -":
            if line[:4] != "0000":
                out.append(line[5:])
        elif line.startswith((" ", "+")):
            out.append(line[1:])
    return "\n".join(out) + "\n"


BIRD_NETWORK_NOT_FOUND = 8001  # BIRD's reply code to `show route for` a prefix it has no route for


class BirdControl:
    """One connection to BIRD's control socket, the protocol birdc speaks: for sampling the
    guest routes every few milliseconds without starting a birdc process each time (a birdc
    call costs ~3 ms of a CPU the sites and QEMU share in the lab; a query here ~0.1 ms)."""

    def __init__(self, path: Path = BIRD_CTL, timeout: float = 5.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as e:
            self.sock.close()
            raise LabError(f"BIRD's control socket {path} does not answer: {e}") from e
        self.f = self.sock.makefile("r", encoding="utf-8", errors="replace")
        greeting = self.f.readline()
        if not greeting.startswith("0001 "):
            self.close()
            raise LabError(f"BIRD's control socket {path} greeted with {greeting.strip()!r}, not '0001 ... ready'")

    def reply(self, line: str) -> tuple[int, str]:
        """Run one CLI command: the code of its last reply line (0 done, 8000 or more an error)
        and its output as birdc prints it."""
        self.sock.sendall(line.encode() + b"\n")
        lines = []
        while True:
            raw = self.f.readline()
            if not raw:
                raise LabError(f"BIRD closed its control socket {self.path} during {line!r}")
            raw = raw.rstrip("\n")
            lines.append(raw)
            if len(raw) >= 5 and raw[:4].isdigit() and raw[4] == " ":
                return int(raw[:4]), bird_reply_text(lines)

    def guest_routes(self, prefix: str = GUEST_PREFIX) -> list[dict]:
        """`bird_guest_routes` over this connection ([] when BIRD has no route for `prefix`)."""
        code, text = self.reply(f"show route for {prefix} all")
        if code == BIRD_NETWORK_NOT_FOUND:
            return []
        if code >= 8000:
            raise LabError(f"BIRD refused 'show route for {prefix}' on {self.path}: {code} {text.strip()}")
        return parse_bird_routes(text)

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def parse_bird_routes(out: str) -> list[dict]:
    """Parse `birdc show route ... all`: each 'unicast [proto time] [*] ...' line starts a route."""
    routes: list[dict] = []
    cur: dict | None = None
    for line in out.splitlines():
        s = line.strip()
        if "unicast [" in s:
            head = s.split("unicast [", 1)[1]
            cur = {"proto": head.split()[0], "best": "] * " in s, "via": None, "as_path": []}
            routes.append(cur)
        elif cur is not None and s.startswith("via "):
            cur["via"] = s.split()[1]
        elif cur is not None and s.startswith("BGP.as_path:"):
            cur["as_path"] = [int(x) for x in s.split(":", 1)[1].split()]
    return routes


# ---------------------------------------------------------------- up / down

LEASE_BACKENDS = ("witness", "etcd")


CAPTURES = ("scan", "colo")


def up(*, routing: str = "bgp", with_daemons: bool = True, python: str = sys.executable,
       env: dict | None = None, guest_append: str = "", config_edits: dict | None = None,
       lease: str = "witness", memory_mb: int | None = None, disk: bool = True, capture: str | None = None) -> None:
    """Build the lab. `env` adds environment variables for the site daemons (tests only);
    `config_edits` maps text of the site configs to its replacement (a key "site-b|text" edits
    that site's file only); `lease` is the lease backend: the built-in witness, or a 3-member
    etcd cluster (lab/etcd.py); `memory_mb` the guest's RAM (default: the lab configs' 128);
    `disk`: the disk guest (`geomirror guest build --disk`, the default), booted from a replicated
    disk, each site with its own copy of the image in its lab dir; False: the initramfs guest;
    `capture`: scan (the configs' default) or colo (QEMU's dirty log: both sites run the COLO QEMU
    of scripts/qemu10.sh, and every 20th epoch checks QEMU's pages against a full compare); None:
    $GM_LAB_CAPTURE, else scan (`GM_LAB_CAPTURE=colo pytest -m lab` runs the lab suite on it)."""
    _require_root()
    if capture is None:
        capture = os.environ.get("GM_LAB_CAPTURE", "scan")
    if lease not in LEASE_BACKENDS:
        raise LabError(f"lease backend {lease!r} is not one of {', '.join(LEASE_BACKENDS)}")
    if memory_mb is not None:
        if not 64 <= memory_mb <= 16384:
            raise LabError(f"--memory {memory_mb}: the lab guest takes 64 to 16384 MB")
        config_edits = {"memory_mb = 128\n": f"memory_mb = {memory_mb}\n", **(config_edits or {})}
    if capture not in CAPTURES:
        raise LabError(f"--capture {capture!r} is not one of {', '.join(CAPTURES)}")
    if capture == "colo":
        config_edits = {'name = "pbx"\n': 'name = "pbx"\nqemu = "colo"\n',
                        'unreachable_policy = "stall"\n': 'unreachable_policy = "stall"\ncapture = "colo"\n'
                                                          'colo_verify_every = 20\n', **(config_edits or {})}
    busy = [n for n in NAMESPACES if netns.exists(n)]
    if busy:  # checked before anything is made, so a refusal leaves nothing behind
        raise LabError(f"network namespace {busy[0]} already exists: a lab is up or was left behind; "
                       "run `geomirror lab down` first")
    if LAB_DIR.exists():  # a new lab starts from nothing (no replica, role or lease of an old one)
        shutil.rmtree(LAB_DIR)
    LAB_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(LAB_DIR, 0o700)
    disk_image = None
    if with_daemons:
        # The site namespaces have no way to the package mirror: build (or find in the cache)
        # the guest image here, on the host's network, before any daemon needs it.
        from geomirror.disk_image import build_disk_image
        from geomirror.image import build_image

        if disk:
            disk_image = build_disk_image()
        else:
            build_image()
    save_state({"pids": {}, "namespaces": [], "routing": routing, "static_site": "site-a", "lease": lease,
                "disk": disk_image is not None})
    try:
        build_network()
        start_wan(python)
        start_bird(routing, "site-a" if routing == "static" else None)
        if with_daemons:
            if disk_image is not None:
                config_edits = {**(config_edits or {}), **disk_config_edits(disk_image)}
            start_services(python, env, guest_append, config_edits, lease)
    except BaseException:
        log.error("lab.up_failed", hint="tearing down what was made")
        down()
        raise


def copy_disk(image: Path, dest: Path) -> None:
    """A site's own copy of the disk image: sparse (and a reflink where the filesystem has them),
    writable by the service only."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(dest.parent, 0o700)
    tmp = dest.with_name(dest.name + ".tmp")
    r = subprocess.run(["cp", "--sparse=always", "--reflink=auto", str(image), str(tmp)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"cannot copy the disk image {image} to {tmp}: {r.stderr.strip()}")
    os.chmod(tmp, 0o600)
    os.replace(tmp, dest)


def disk_config_edits(image) -> dict:
    """Each site's copy of the disk image (made here) and the config lines that name it: the
    image's kernel and virtio_blk initramfs, and guest.disk (`config_edits` of `up`)."""
    edits = {}
    for site in SITES:
        dest = LAB_DIR / site / DISK_FILE
        copy_disk(image.disk, dest)
        edits[f"{site}|[guest]\n"] = (f'[guest]\nkernel = "{image.kernel}"\ninitrd = "{image.initrd}"\n'
                                       f'disk = "{dest}"\n')
    return edits


def start_services(python: str = sys.executable, env: dict | None = None, guest_append: str = "",
                   config_edits: dict | None = None, lease: str = "witness") -> None:
    """PKI, the lease backend (the witness, or the etcd cluster) and both site daemons (each in
    its own namespace).

    `guest_append` adds to the guest's kernel command line (e.g. gm.dirty=16:2000, a
    memory-writing workload for benchmarks); `config_edits` replaces text in both site configs
    (tests: e.g. another unreachable_policy). Either way the configs are copied into the lab dir.
    """
    from geomirror import pairing

    cfg = repo_configs()
    if guest_append or config_edits or lease == "etcd":
        if guest_append and not re.fullmatch(r"[A-Za-z0-9_.=:, -]+", guest_append):
            raise LabError(f"guest_append {guest_append!r} has unexpected characters")
        copy = LAB_DIR / "configs"
        copy.mkdir(exist_ok=True)
        for name in ("site-a.toml", "site-b.toml", "witness.toml"):
            text = (cfg / name).read_text()
            if name.startswith("site") and lease == "etcd":
                text = lab_etcd.site_config(text, name.removesuffix(".toml"))
            if name.startswith("site") and guest_append:
                text = text.replace("[guest]\n", f'[guest]\nappend = "{guest_append}"\n', 1)
            for old, new in (config_edits or {}).items():
                only, _, bare = old.rpartition("|")  # "site-b|old": that site's file only
                if only and name != f"{only}.toml":
                    continue
                old = bare
                if name.startswith("site"):
                    if old not in text:
                        raise LabError(f"config edit: {old!r} is not in {name}")
                    text = text.replace(old, new)
            (copy / name).write_text(text)
        cfg = copy
    pki = LAB_DIR / "pki"
    if not (pki / "ca.pem").exists():
        pairing.create_pair(pki, ["site-a", "site-b"], ["witness"])
    if lease == "etcd":
        lab_etcd.start_cluster()
    else:
        spawn(WITNESS, "witness", [python, "-m", "geomirror.cli", "witness", "--config", str(cfg / "witness.toml")])
    state = load_state()
    state["config_dir"], state["python"], state["daemon_env"] = str(cfg), python, env or {}
    save_state(state)
    for site, ns in SITES.items():
        spawn(ns, site, [python, "-m", "geomirror.cli", "daemon", "--config", str(cfg / f"{site}.toml")], env=env)


def restart(site: str, kill: bool = False, delay_s: float = 0.0) -> dict:
    """Stop a site's daemon (SIGTERM, or SIGKILL with `kill`) and start it again after `delay_s`,
    as systemd does on an upgrade or after a crash of the service. QEMU, the rest of the site and
    its links keep running. Returns the old and new pid and how long the old one took to go."""
    state = load_state()
    pid = state.get("pids", {}).get(site)
    if not isinstance(pid, int) or not _alive(pid):
        raise LabError(f"{site}'s daemon is not running (no live pid in {_state_path()})")
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    if _wait_gone([pid], 30.0):
        raise LabError(f"{site}'s daemon (pid {pid}) did not stop within 30 s of SIG{'KILL' if kill else 'TERM'}")
    stopped_s = time.monotonic() - t0
    if delay_s > 0:
        time.sleep(delay_s)
    cfg_dir = Path(state.get("config_dir") or repo_configs())
    python = state.get("python") or sys.executable
    new = spawn(SITES[site], site, [python, "-m", "geomirror.cli", "daemon", "--config",
                                    str(cfg_dir / f"{site}.toml")], env=state.get("daemon_env") or None)
    log.info("lab.restart", site=site, signal="KILL" if kill else "TERM", old_pid=pid, new_pid=new,
             stopped_s=round(stopped_s, 2), delay_s=delay_s)
    return {"site": site, "old_pid": pid, "new_pid": new, "stopped_s": round(stopped_s, 3)}


def revive(site: str, rejoin: bool = True) -> str:
    """Bring a lost site back: links up, (rejoin: make it the standby of the site that took
    over, seeded from its last RAM image), and its daemon started again. Returns what rejoin said."""
    from geomirror.config import load_site
    from geomirror.site.rejoin import rejoin as do_rejoin

    state = load_state()
    cfg_dir = Path(state.get("config_dir") or repo_configs())
    python = state.get("python") or sys.executable
    ns = SITES[site]
    left = pids_in_netns(ns)
    if left:
        raise LabError(f"{site} still has processes ({left}): crash it first")
    said = do_rejoin(load_site(cfg_dir / f"{site}.toml"), progress=False) if rejoin else ""
    set_links(ns, True)
    if state.get("lease") == "etcd":  # the site's etcd member was lost with it: it rejoins the cluster
        lab_etcd.start_member(lab_etcd.SITE_MEMBER[site])
    spawn(ns, site, [python, "-m", "geomirror.cli", "daemon", "--config", str(cfg_dir / f"{site}.toml")])
    log.info("lab.revive", site=site, rejoin=rejoin, said=said)
    return said


def down() -> list[str]:
    """Idempotent: stop every process the lab made (by pid), remove every namespace."""
    removed = []
    state = load_state()
    pids = [p for p in state.get("pids", {}).values() if isinstance(p, int)]
    stopped: set[int] = set()
    # Scanned again after each round: a daemon may start a process (a hot-standby QEMU right
    # after a demotion) between the scan and its own stop, and that process would outlive the
    # namespace's removal in no namespace at all.
    for _ in range(5):
        for name in NAMESPACES:
            pids += pids_in_netns(name)
        pids = sorted(set(pids) - {os.getpid()} - stopped)
        if not pids:
            break
        kill_pids(pids, signal.SIGTERM)
        left = _wait_gone(pids, 3.0)
        kill_pids(left, signal.SIGKILL)
        _wait_gone(left, 3.0)
        stopped.update(pids)
        pids = []
    else:
        log.warning("lab.down_left_running", pids=[p for name in NAMESPACES for p in pids_in_netns(name)])
    for name in NAMESPACES:
        if netns.exists(name):
            netns.remove(name)
            removed.append(name)
    for p in (BIRD_CTL, LAB_DIR / "bird.pid"):
        p.unlink(missing_ok=True)
    save_state({"pids": {}, "namespaces": [], "routing": state.get("routing", "static"), "static_site": None,
                "lease": state.get("lease", "witness")})
    log.info("lab.down", removed=removed, stopped=len(stopped))
    return removed


def crash(site: str) -> list[int]:
    """The loss of a site: SIGKILL every process in its namespace and take its links down."""
    ns = SITES[site]
    pids = pids_in_netns(ns)
    kill_pids(pids, signal.SIGKILL)
    _wait_gone(pids, 3.0)
    set_links(ns, False)
    log.info("lab.crash", site=site, killed=pids)
    return pids


def partition(up_: bool = False) -> None:
    """Cut (or heal) the inter-site link wan0 while both sites and the witness stay up."""
    for ns in (SITE_A, SITE_B):
        set_links(ns, up_, ("wan0",))
