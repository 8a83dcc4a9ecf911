"""Site and witness configuration: TOML into frozen dataclasses, validated.

Every error is a ConfigError naming the file, the dotted key and what is wrong.
Unknown keys are errors at every level (with a suggestion). Relative paths resolve
against the config file's directory; `control.token_file` against `site.state_dir`.
The reference is docs/config.md.
"""

from __future__ import annotations

import asyncio
import difflib
import sys
import ipaddress
import re
import ssl
import stat
import tomllib
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from bgp.config import GRACEFUL_SHUTDOWN, MAX_PREPEND, Policy, check_large_community, drain_policy
from geomirror import lease as lease_backends
from geomirror.errors import ConfigError
from geomirror.ha import HaConfig, HaConfigError
from geomirror.pairing import NAME_PATTERN, PairingError, check_leaf

_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_COMMUNITY = re.compile(r"^(\d{1,10}):(\d{1,10})$")
_TOML_POS = re.compile(r"^(.*) \(at line (\d+), column (\d+)\)$")
MAX_ASN = 4294967295
# run_dir holds UNIX sockets (e.g. bgp/exabgp.sock, qmp-primary.sock): sun_path is 108 bytes
MAX_RUN_DIR = 80
# longer prefixes than these are filtered by most networks on the Internet
MAX_ROUTED_LEN = {4: 24, 6: 48}


# ---------------------------------------------------------------- sections

@dataclass(frozen=True)
class SiteSection:
    name: str
    asn: int
    router_id: ipaddress.IPv4Address
    initial_role: str = "primary"
    auto_rejoin: bool = True  # a site taken over from becomes the standby by itself (False: wait for `rejoin`)
    state_dir: Path = Path("/var/lib/geomirror")
    run_dir: Path = Path("/run/geomirror")


@dataclass(frozen=True)
class PeerSection:
    name: str
    address: ipaddress.IPv4Address
    listen: ipaddress.IPv4Address
    port: int = 7788
    listen_port: int = 7788
    asn: int | None = None  # the peer site's AS: its routes for the guest prefix are recognised by it
    # the peer's IPv6 address on the inter-site link: stray IPv6 traffic for a dual-stack guest
    # is forwarded to it (make before break); without it only IPv4 is forwarded
    address6: ipaddress.IPv6Address | None = None


@dataclass(frozen=True)
class TLSSection:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class WitnessRef:
    address: ipaddress.IPv4Address
    name: str = "witness"
    port: int = 7790
    lease_ttl_ms: int = 6000
    renew_every_ms: int = 1000


@dataclass(frozen=True)
class LeaseSection:
    """[lease]: who grants the guest's lease. `backend = "witness"` (the default): the [witness]
    table says everything and no other key belongs here. `backend = "etcd"`: the keys below; the
    config's `witness` is then this section, so its `lease_ttl_ms` / `renew_every_ms` are what the
    HA machine reads for either backend."""
    backend: str = "witness"
    endpoints: tuple[str, ...] = ()  # etcd client URLs, https://host:port
    server_name: str = ""  # the name every member's certificate carries ("" = each endpoint's host)
    ca: Path | None = None  # None: the site's [tls] files
    cert: Path | None = None
    key: Path | None = None
    prefix: str = "/geomirror"
    lease_ttl_ms: int = 6000
    renew_every_ms: int = 1000

    @property
    def name(self) -> str:
        return self.backend

    def tls_files(self, tls: TLSSection) -> TLSSection:
        return tls if self.ca is None else TLSSection(self.ca, self.cert, self.key)


@dataclass(frozen=True)
class Neighbor:
    address: ipaddress.IPv4Address
    peer_as: int
    local_address: ipaddress.IPv4Address | None = None
    next_hop6: ipaddress.IPv6Address | None = None  # our IPv6 address on this link (needed with guest.prefix6)


@dataclass(frozen=True)
class BGPSection:
    """[bgp]. The announcement policy per role: `med`, `communities`, `large_communities` and
    `prepend` for the site that runs the guest (active); `standby_*` for the optional
    pre-announcement by the standby (off while standby_prepend = 0); `drain_*` added, with
    GRACEFUL_SHUTDOWN, to the active policy when the site drains before a planned move."""
    enabled: bool = True
    med: int | None = None
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    prepend: int = 0
    standby_prepend: int = 0
    standby_med: int | None = None  # None: med
    standby_communities: tuple[str, ...] | None = None  # None: communities
    standby_large_communities: tuple[str, ...] | None = None  # None: large_communities
    drain_communities: tuple[str, ...] = ()
    drain_large_communities: tuple[str, ...] = ()
    hold_time: int = 9
    # planned switchover, make before break: withdraw once the peer's route is seen, or after this
    drain_timeout_s: float = 10.0
    # hand the guest to the peer when every session has been down this long (0 = off), the
    # peer's sessions up for upstream_loss_peer_stable_s; none within upstream_loss_hold_down_s
    # of becoming active or of the last one
    upstream_loss_handover_s: float = 0.0
    upstream_loss_peer_stable_s: float = 30.0
    upstream_loss_hold_down_s: float = 300.0
    neighbors: tuple[Neighbor, ...] = ()

    @property
    def active(self) -> Policy:
        """The announcement of the site that runs the guest."""
        return Policy(med=self.med, communities=self.communities, large_communities=self.large_communities,
                      prepend=self.prepend)

    @property
    def standby(self) -> Policy | None:
        """The standby's pre-announcement, or None when it is off (standby_prepend = 0)."""
        if not self.standby_prepend:
            return None
        return Policy(med=self.med if self.standby_med is None else self.standby_med,
                      communities=self.communities if self.standby_communities is None else self.standby_communities,
                      large_communities=(self.large_communities if self.standby_large_communities is None
                                         else self.standby_large_communities),
                      prepend=self.standby_prepend)

    @property
    def drain(self) -> Policy:
        """The re-announcement before a planned withdrawal: the active policy plus GRACEFUL_SHUTDOWN
        (65535:0, RFC 8326) plus drain_communities / drain_large_communities."""
        return drain_policy(self.active, self.drain_communities, self.drain_large_communities)


@dataclass(frozen=True)
class GuestSection:
    prefix: ipaddress.IPv4Network
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    name: str = "guest"
    memory_mb: int = 128
    vcpus: int = 1
    kernel: str = ""  # "" = the image from `geomirror guest build`; else an absolute path
    initrd: str = ""
    append: str = ""
    machine: str = "pc"
    accel: str = "auto"
    mac: str = "52:54:00:12:34:56"
    # dual stack: an IPv6 prefix beside the IPv4 one (all three or none)
    prefix6: ipaddress.IPv6Network | None = None
    address6: ipaddress.IPv6Address | None = None
    gateway6: ipaddress.IPv6Address | None = None
    # a raw image on this site (each site its own copy): the guest's disk at the primary, the
    # replica disk at the standby (written only by the service); None: no disk
    disk: Path | None = None
    # the QEMU that runs the guest (both sites must run the same version): system (the Debian
    # package) | colo (scripts/qemu10.sh --colo-fix: QEMU 10.0 with COLO fixed) | an absolute path
    qemu: str = "system"


@dataclass(frozen=True)
class CheckpointSection:
    interval_ms: float = 100.0
    min_interval_ms: float = 20.0
    max_interval_ms: float = 1000.0
    adaptive: bool = True
    latency_budget_ms: float = 200.0
    max_pause_share: float = 0.25
    max_wan_mbit: float = 0.0
    max_in_flight: int = 2
    # the pacer's longest interval while the guest sends nothing (``idle``; 0: off, never above
    # max_interval_ms); the first output ends the epoch early and drops the interval back
    idle_interval_ms: float = 0.0  # off by default: with it on, SIP calls across a switchover saw dead-call messages
    # the pacer checks its interval against 0.8x / 1.25x of it by the frames the gate passes
    # (``trying``, ``measured``: docs/pacer.md); off: the model alone decides
    outcome_trial: bool = True
    compression_level: int = 1
    unreachable_policy: str = "stall"
    unprotected_grace_ms: int = 5000
    verify_bytes_per_epoch: int = 256 << 10  # replica check: live RAM hashed per epoch (0: off)
    # guest UDP flows (source-port ranges, inclusive) whose output the gate releases at once
    # instead of at the epoch's commit (RTP media); empty: everything under output commit
    pass_through: tuple[tuple[int, int], ...] = ()
    # planned switchover: the guest's inbound frames that reach the old primary after its final
    # epoch are sent to the new site and given to the resumed guest (else lost to TCP retransmission)
    handover_forward_frames: bool = True
    # guest disk (guest.disk): written bytes recorded and not yet sent to the standby above which
    # the guest's write replies are held (backpressure: the guest writes no faster than the WAN
    # carries); applies only while a replication session runs
    disk_unsent_cap_mb: int = 64
    # how an epoch finds the guest's written pages: scan (compare all of RAM with the shadow while
    # the guest is stopped: O(RAM)) | colo (QEMU's own dirty log through its COLO stream: O(pages
    # written); needs guest.qemu = "colo")
    capture: str = "scan"
    # with capture = colo: every Nth epoch also compares all of RAM (0: never); a page found
    # there is sent anyway and counted (colo_missed_pages)
    colo_verify_every: int = 0
    # the standby's group commit: each epoch is applied in memory once its journal record is
    # durable (then acknowledged), and the files are written back in a thread at most this often,
    # off the path of the next epoch (0: every epoch, before the next one is read)
    standby_writeback_ms: float = 100.0


@dataclass(frozen=True)
class HeartbeatSection:
    interval_ms: float = 100.0
    min_timeout_ms: float = 600.0
    max_timeout_ms: float = 5000.0


@dataclass(frozen=True)
class ControlSection:
    listen: ipaddress.IPv4Address = ipaddress.IPv4Address("127.0.0.1")
    port: int = 7780
    token_file: Path = Path("control.token")  # resolved against site.state_dir by load_site


@dataclass(frozen=True)
class DrillProbe:
    name: str
    kind: str  # tcp (a new connection each time) | memcached (`version` on one kept connection)
    address: str
    port: int
    interval_ms: float = 100.0
    timeout_ms: float = 10000.0
    max_stall_ms: float = 0.0  # a longer stall fails the drill; 0: reported only


@dataclass(frozen=True)
class DrillSection:
    """`geomirror drill` (docs/drills.md): the peer's control API, budgets, probes."""
    there_and_back: bool = True
    peer_control: str = ""  # http://HOST:PORT of the peer's control API (its control.listen)
    peer_token_file: Path | None = None  # a copy of the peer's control token
    switchover_timeout_s: float = 15.0
    rollback_timeout_s: float = 120.0
    max_backlog_epochs: int = 4
    max_replica_lag_epochs: int = 10
    keep: int = 100  # reports kept in state_dir/drills
    budget_paused_ms: float = 2000.0
    budget_lease_moved_ms: float = 5000.0
    budget_resumed_ms: float = 8000.0
    budget_announced_ms: float = 10000.0
    budget_route_moved_ms: float = 30000.0
    budget_protected_again_ms: float = 120000.0
    probes: tuple[DrillProbe, ...] = ()

    def budgets_ms(self) -> dict[str, float]:
        return {k[len("budget_"):-len("_ms")]: getattr(self, k) for k in self.__dataclass_fields__
                if k.startswith("budget_")}


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    site: SiteSection
    peer: PeerSection
    tls: TLSSection
    guest: GuestSection
    # the lease authority: [witness], or [lease] itself with backend "etcd" (both carry
    # lease_ttl_ms and renew_every_ms); None: no lease backend, no automatic takeover
    witness: WitnessRef | LeaseSection | None = None
    bgp: BGPSection = BGPSection()
    checkpoint: CheckpointSection = CheckpointSection()
    heartbeat: HeartbeatSection = HeartbeatSection()
    control: ControlSection = ControlSection()
    lease: LeaseSection = LeaseSection()
    drill: DrillSection = DrillSection()
    # things that load but are probably not what the operator wants: (key, problem)
    warnings: tuple[tuple[str, str], ...] = ()

    def check_files(self) -> None:
        """The TLS files exist, the key is private, the certificate names this site and chains to the CA."""
        _check_tls(self.path, self.tls, self.site.name)
        if self.lease.backend == "etcd" and self.lease.ca is not None:
            _check_lease_tls(self.path, self.lease)
        if self.guest.disk is not None:
            check_guest_disk(self.path, self.guest.disk)


QCOW2_MAGIC = b"QFI\xfb"
DISK_BLOCK = 4096


def check_guest_disk(path: Path, disk: Path) -> None:
    """guest.disk is a raw image whose size is a positive multiple of 4 KiB (the replication unit)."""
    try:
        st = disk.stat()
        with open(disk, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise ConfigError(path, "guest.disk", f"file {disk} does not exist (each site needs its own copy of the "
                          "guest's raw disk image; at a new standby an empty one of the same size will do: "
                          "truncate -s SIZE)") from None
    except OSError as e:
        raise ConfigError(path, "guest.disk", f"cannot read {disk}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(path, "guest.disk", f"{disk} is not a regular file (a raw image file is needed)")
    if head == QCOW2_MAGIC:
        raw = disk.with_suffix(".raw") if disk.suffix != ".raw" else disk.with_name(f"{disk.stem}-converted.raw")
        raise ConfigError(path, "guest.disk", f"{disk} is a qcow2 image; the disk must be raw: convert it with "
                          f"qemu-img convert -O raw {disk} {raw} and set guest.disk to {raw}")
    if st.st_size == 0 or st.st_size % DISK_BLOCK:
        raise ConfigError(path, "guest.disk", f"{disk} is {st.st_size} bytes, not a positive multiple of "
                          f"{DISK_BLOCK}; resize it (qemu-img resize -f raw {disk} SIZE)")


@dataclass(frozen=True)
class WitnessSection:
    listen: ipaddress.IPv4Address
    sites: tuple[str, ...]  # the only certificate names that may hold a lease (never the witness's own)
    name: str = "witness"
    port: int = 7790
    state_dir: Path = Path("/var/lib/geomirror-witness")


@dataclass(frozen=True)
class WitnessConfig:
    path: Path
    witness: WitnessSection
    tls: TLSSection

    def check_files(self) -> None:
        _check_tls(self.path, self.tls, self.witness.name)


def _check_key_files(path: Path, section: str, files, hint: str = "") -> None:
    """`files` (with .ca, .cert, .key) exist and the key is readable by its owner only."""
    for k in ("ca", "cert", "key"):
        p = getattr(files, k)
        if not p.is_file():
            raise ConfigError(path, f"{section}.{k}", f"file {p} does not exist{hint}")
    mode = stat.S_IMODE(files.key.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(path, f"{section}.key", f"{files.key} is readable by others (mode {mode:04o}); chmod 600 it")


def _check_tls(path: Path, tls: TLSSection, name: str) -> None:
    _check_key_files(path, "tls", tls, " (run `geomirror pair init`)")
    try:
        check_leaf(tls.ca, tls.cert, tls.key, name)
    except PairingError as e:
        raise ConfigError(path, "tls.cert", str(e)) from None


def _check_lease_tls(path: Path, lease: LeaseSection) -> None:
    """The operator's own files for etcd: they exist, the key is private, cert and key match."""
    _check_key_files(path, "lease", lease)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(str(lease.cert), str(lease.key))
    except ssl.SSLError as e:
        raise ConfigError(path, "lease.cert", f"cannot load {lease.cert} with {lease.key}: {e.reason or e}") from None
    try:
        ctx.load_verify_locations(cafile=str(lease.ca))
    except ssl.SSLError as e:
        raise ConfigError(path, "lease.ca", f"{lease.ca} is not a CA certificate: {e.reason or e}") from None


# ---------------------------------------------------------------- the loader

def _tname(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def _unknown(L: "_Loader", key: str, name: str, known, what: str = "key") -> ConfigError:
    close = difflib.get_close_matches(name, sorted(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return L.err(key, f"unknown {what} '{name}'{hint}")


class _Loader:
    def __init__(self, path, resolved: Path):
        self.path = path  # as the operator named it, for messages
        self.base = resolved.parent

    def err(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    def top(self, data: dict, known: set[str]) -> None:
        for k, v in data.items():
            if k not in known:
                raise _unknown(self, k, k, known, "table" if isinstance(v, dict) else "key")

    def table(self, data: dict, key: str, required: bool = True) -> dict | None:
        v = data.get(key.rsplit(".", 1)[-1])
        if v is None:
            if required:
                raise self.err(key, f"missing table [{key}]")
            return None
        if not isinstance(v, dict):
            raise self.err(key, f"must be a table ([{key}]), not {_tname(v)}")
        return v

    def section(self, cls, data: dict | None, prefix: str, convert: dict[str, Callable] | None = None,
                ranges: dict[str, tuple] | None = None, *, file_keys: dict[str, str] | None = None):
        """Build dataclass `cls` from `data`: unknown keys, types, conversions (key -> fn), ranges.

        `file_keys` maps fields the caller fills itself to the key that spells them in the file.
        """
        data = data or {}
        convert = convert or {}
        file_keys = file_keys or {}
        own = [f for f in fields(cls) if f.name not in file_keys]
        known = {f.name for f in own} | set(file_keys.values())
        for k in data:
            if k not in known:
                raise _unknown(self, f"{prefix}.{k}", k, known)
        kw = {}
        for f in own:
            key = f"{prefix}.{f.name}"
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise self.err(key, "missing (required)")
                continue
            v = data[f.name]
            fn = convert.get(f.name)
            try:
                kw[f.name] = fn(v) if fn else _typed(v, f.type)
            except (ValueError, TypeError) as e:
                raise self.err(key, str(e)) from None
            lo_hi = (ranges or {}).get(f.name)
            if lo_hi and not lo_hi[0] <= kw[f.name] <= lo_hi[1]:
                raise self.err(key, f"{v} is out of range ({lo_hi[0]}..{lo_hi[1]})")
        return cls(**kw)

    def path_(self, v) -> Path:
        if not isinstance(v, str) or not v:
            raise TypeError(f"must be a non-empty path string, not {_tname(v)} ({v!r})")
        p = Path(v)
        return p if p.is_absolute() else (self.base / p)


# ipaddress class -> (what it is, what a good value looks like), for type errors that say so
_IP_TYPES = {
    "IPv4Address": ("an IPv4 address", "an IPv4 address string"),
    "IPv4Network": ("an IPv4 prefix", "a prefix string like 198.51.100.0/24"),
    "IPv6Address": ("an IPv6 address", "an IPv6 address string"),
    "IPv6Network": ("an IPv6 prefix", "a prefix string like 2001:db8:100::/48"),
}


def _typed(v, t: str):
    """Check/convert a TOML value against the annotation string `t`."""
    t = str(t)
    if t == "str":
        if not isinstance(v, str):
            raise TypeError(f"must be a string, not {_tname(v)} ({v!r})")
        return v
    if t == "bool":
        if not isinstance(v, bool):
            raise TypeError(f"must be true or false, not {_tname(v)} ({v!r})")
        return v
    if t in ("int", "int | None"):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"must be an integer, not {_tname(v)} ({v!r})")
        return v
    if t == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"must be a number, not {_tname(v)} ({v!r})")
        return float(v)
    for name, (kind, example) in _IP_TYPES.items():
        if name in t:
            if not isinstance(v, str):
                raise TypeError(f"must be {example}, not {_tname(v)} ({v!r})")
            try:
                return getattr(ipaddress, name)(v)
            except ValueError as e:
                detail = f" ({e})" if "Network" in name else ""
                raise ValueError(f"{v} is not {kind}{detail}") from None
    raise AssertionError(f"no converter for {t}")  # a field without a converter: a bug here


def _read(path) -> tuple[Path, dict]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    try:
        return path.resolve(), tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(path, None, f"not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        m = _TOML_POS.match(str(e))
        where = f" at line {m.group(2)}, column {m.group(3)}" if m else ""
        raise ConfigError(path, None, f"TOML syntax error{where}: {m.group(1) if m else e}") from None


def _name(v) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string, not {_tname(v)} ({v!r})")
    if not NAME_PATTERN.match(v):
        raise ValueError(f"{v!r} is not a valid name (lowercase letters, digits and '-', e.g. site-a)")
    return v


def _choice(*allowed: str) -> Callable[[Any], str]:
    def check(v):
        if not isinstance(v, str):
            raise TypeError(f"must be a string, not {_tname(v)} ({v!r})")
        if v not in allowed:
            raise ValueError(f"{v!r} must be one of {', '.join(allowed)}")
        return v
    return check


def _communities(v) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise TypeError(f"must be an array of strings like \"64501:100\", not {v!r}")
    for c in v:
        m = _COMMUNITY.match(c)
        if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
            raise ValueError(f"{c!r} is not a community (ASN:VALUE, each 0..65535)")
    if len(set(v)) != len(v):
        raise ValueError(f"{v!r} names a community twice")
    return tuple(v)


def _announced_communities(v) -> tuple[str, ...]:
    """Communities of an announcement that must not drain it."""
    out = _communities(v)
    if GRACEFUL_SHUTDOWN in out:
        raise ValueError(f"{GRACEFUL_SHUTDOWN} is GRACEFUL_SHUTDOWN (RFC 8326): routers would set the route's "
                         "preference to 0 all the time; geomirror adds it only when it drains (bgp.drain_communities)")
    return out


def _large_communities(v) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
        raise TypeError(f"must be an array of strings like \"64501:1:100\", not {v!r}")
    for c in v:
        try:
            check_large_community(c)
        except ValueError:
            raise ValueError(f"{c!r} is not a large community (ASN:VALUE:VALUE, each 0..4294967295)") from None
    if len(set(v)) != len(v):
        raise ValueError(f"{v!r} names a large community twice")
    return tuple(v)


_FLOW = re.compile(r"^([a-z0-9]+):(\d{1,5})(?:-(\d{1,5}))?$")


def _pass_through(v) -> tuple[tuple[int, int], ...]:
    """["udp:6000-6100", "udp:7078"] -> ((6000, 6100), (7078, 7078)): UDP source-port ranges."""
    if not isinstance(v, list) or not all(isinstance(f, str) for f in v):
        raise TypeError(f"must be an array of strings like \"udp:6000-6100\", not {v!r}")
    out: list[tuple[int, int]] = []
    for f in v:
        m = _FLOW.match(f.strip().lower())
        if not m:
            raise ValueError(f"{f!r} is not a flow (udp:PORT or udp:LOW-HIGH, e.g. \"udp:6000-6100\")")
        proto, lo = m.group(1), int(m.group(2))
        hi = int(m.group(3)) if m.group(3) else lo
        if proto != "udp":
            raise ValueError(f"{f!r}: only udp flows can pass through; TCP (and anything else) stays under "
                             "output commit, since a peer that saw unreplicated TCP output cannot be resumed")
        if not (1 <= lo <= 65535 and 1 <= hi <= 65535):
            raise ValueError(f"{f!r}: ports are 1..65535")
        if lo > hi:
            raise ValueError(f"{f!r}: the range ends ({hi}) below where it starts ({lo})")
        for a, b in out:
            if lo <= b and a <= hi:
                raise ValueError(f"{f!r} overlaps udp:{a}-{b}")
        out.append((lo, hi))
    return tuple(out)


def _mac(v) -> str:
    if not isinstance(v, str) or not _MAC.match(v.lower()):
        raise ValueError(f"{v!r} is not a MAC address (like 52:54:00:12:34:56)")
    if int(v[:2], 16) & 1:
        raise ValueError(f"{v} is a multicast address; a NIC needs a unicast MAC (first octet even)")
    return v.lower()


PORT = (1, 65535)
ASN = (1, MAX_ASN)
SITE_TABLES = {"site", "peer", "tls", "witness", "lease", "bgp", "guest", "checkpoint", "heartbeat", "control",
               "drill"}


def load_site(path) -> SiteConfig:
    """Read and validate a site config; raises ConfigError naming file, key and problem."""
    resolved, data = _read(path)
    L = _Loader(path, resolved)
    L.top(data, SITE_TABLES)

    site = L.section(SiteSection, L.table(data, "site"), "site", {
        "name": _name, "state_dir": L.path_, "run_dir": L.path_,
        "initial_role": _choice("primary", "standby")}, {"asn": ASN})
    if len(str(site.run_dir)) > MAX_RUN_DIR:
        raise L.err("site.run_dir", f"{site.run_dir} is too long for the UNIX sockets it holds "
                    f"(at most {MAX_RUN_DIR} characters)")

    peer = L.section(PeerSection, L.table(data, "peer"), "peer", {"name": _name},
                     {"port": PORT, "listen_port": PORT, "asn": ASN})
    if peer.name == site.name:
        raise L.err("peer.name", f"the peer must be another site than this one ({site.name})")
    if peer.address == peer.listen:
        raise L.err("peer.address", f"{peer.address} is also peer.listen: the peer's address must be its own")
    if peer.asn is not None and peer.asn == site.asn:
        raise L.err("peer.asn", f"{peer.asn} is site.asn too: the peer's routes could not be told from ours "
                    "(leave peer.asn out when both sites share an AS)")
    tls = L.section(TLSSection, L.table(data, "tls"), "tls", {k: L.path_ for k in ("ca", "cert", "key")})

    wdata = L.table(data, "witness", required=False)
    witness = None
    if wdata is not None:
        witness = L.section(WitnessRef, wdata, "witness", {"name": _name},
                            {"port": PORT, "lease_ttl_ms": (50, 600_000), "renew_every_ms": (10, 600_000)})
        if witness.name in (site.name, peer.name):
            raise L.err("witness.name", f"{witness.name!r} is a site's name; the witness needs its own certificate")
        if witness.renew_every_ms * 3 > witness.lease_ttl_ms:
            raise L.err("witness.renew_every_ms", f"{witness.renew_every_ms} ms leaves too little margin: renew "
                        f"at least three times per lease_ttl_ms ({witness.lease_ttl_ms} ms)")
    lease = _load_lease(L, L.table(data, "lease", required=False), has_witness=wdata is not None)
    if lease.backend == "etcd":
        witness = lease

    bgp = _load_bgp(L, L.table(data, "bgp", required=False))
    guest = _load_guest(L, L.table(data, "guest"))

    ck = L.section(CheckpointSection, L.table(data, "checkpoint", required=False), "checkpoint",
                   {"unreachable_policy": _choice("stall", "continue-unprotected"), "pass_through": _pass_through,
                    "capture": _choice("scan", "colo")},
                   {"interval_ms": (1, 60_000), "min_interval_ms": (1, 60_000), "max_interval_ms": (1, 60_000),
                    "latency_budget_ms": (1, 600_000), "max_wan_mbit": (0, 1e6), "max_in_flight": (1, 64),
                    "idle_interval_ms": (0, 60_000), "compression_level": (1, 19), "unprotected_grace_ms": (0, 3_600_000),
                    "verify_bytes_per_epoch": (0, 64 << 20), "disk_unsent_cap_mb": (1, 65536),
                    "colo_verify_every": (0, 1_000_000), "standby_writeback_ms": (0, 60_000)})
    if ck.capture == "colo" and guest.qemu == "system":
        raise L.err("checkpoint.capture", "colo needs a COLO-capable QEMU: set guest.qemu = \"colo\" "
                    "(scripts/qemu10.sh --colo-fix installs it; Debian's QEMU 7.2 deadlocks in COLO under TCG)")
    if ck.verify_bytes_per_epoch % 4096:
        raise L.err("checkpoint.verify_bytes_per_epoch", f"{ck.verify_bytes_per_epoch} is not a multiple of the "
                    "4096-byte page (e.g. 262144 for 256 KiB; 0 turns the replica check off)")
    if ck.min_interval_ms > ck.max_interval_ms:
        raise L.err("checkpoint.min_interval_ms", f"{ck.min_interval_ms:g} is above max_interval_ms "
                    f"{ck.max_interval_ms:g}")
    if not ck.min_interval_ms <= ck.interval_ms <= ck.max_interval_ms:
        raise L.err("checkpoint.interval_ms", f"{ck.interval_ms:g} is outside min_interval_ms..max_interval_ms "
                    f"({ck.min_interval_ms:g}..{ck.max_interval_ms:g})")
    if not 0 < ck.max_pause_share < 1:
        raise L.err("checkpoint.max_pause_share", f"{ck.max_pause_share:g} must be between 0 and 1 (exclusive)")
    if ck.unreachable_policy == "continue-unprotected" and witness is None:
        raise L.err("checkpoint.unreachable_policy", "continue-unprotected needs a [witness]: running "
                    "unprotected is only safe while this site holds the witness lease, otherwise the "
                    "standby may take over at the same time (split brain)")

    hb = L.section(HeartbeatSection, L.table(data, "heartbeat", required=False), "heartbeat", None,
                   {"interval_ms": (1, 60_000), "min_timeout_ms": (1, 600_000), "max_timeout_ms": (1, 600_000)})
    if hb.min_timeout_ms > hb.max_timeout_ms:
        raise L.err("heartbeat.min_timeout_ms", f"{hb.min_timeout_ms:g} is above max_timeout_ms "
                    f"{hb.max_timeout_ms:g}")
    if hb.interval_ms * 2 > hb.min_timeout_ms:
        raise L.err("heartbeat.min_timeout_ms", f"{hb.min_timeout_ms:g} ms is less than two heartbeat intervals "
                    f"({hb.interval_ms:g} ms)")

    def token(v) -> Path:
        if not isinstance(v, str) or not v:
            raise TypeError(f"must be a non-empty path string, not {_tname(v)} ({v!r})")
        return Path(v) if Path(v).is_absolute() else site.state_dir / v

    ctl = L.section(ControlSection, L.table(data, "control", required=False), "control",
                    {"token_file": token}, {"port": PORT})
    if "token_file" not in (data.get("control") or {}):
        ctl = replace(ctl, token_file=site.state_dir / ctl.token_file)
    if guest.prefix6 is not None and bgp.enabled:
        for i, n in enumerate(bgp.neighbors):
            if n.next_hop6 is None:
                raise L.err(f"bgp.neighbor[{i}].next_hop6", f"missing: guest.prefix6 {guest.prefix6} is announced "
                            f"over the IPv4 session with {n.address} (MP-BGP) and needs this site's IPv6 address "
                            "on that link as its next hop")
    for i, n in enumerate(bgp.neighbors):
        if n.next_hop6 is not None and (n.next_hop6.is_link_local or n.next_hop6.is_multicast
                                        or n.next_hop6.is_unspecified):
            raise L.err(f"bgp.neighbor[{i}].next_hop6", f"{n.next_hop6} is not a global unicast address "
                        "(a BGP next hop must be reachable beyond the link-local scope)")
    drill = _load_drill(L, L.table(data, "drill", required=False))
    cfg = SiteConfig(resolved, site, peer, tls, guest, witness, bgp, ck, hb, ctl, lease, drill,
                     _warnings(guest, ck))
    _check_ha_timing(L, cfg)
    return cfg


SIP_PORTS = (5060, 5061)


def _warnings(g: GuestSection, ck: CheckpointSection) -> tuple[tuple[str, str], ...]:
    out = []
    sip = [p for p in SIP_PORTS for lo, hi in ck.pass_through if lo <= p <= hi]
    if sip:
        out.append(("checkpoint.pass_through", f"covers UDP {', '.join(map(str, sip))} (SIP): signalling released "
                    "before its epoch commits can be answered twice or forgotten after a failover; pass media "
                    "(RTP) only"))
    for key, net in (("guest.prefix", g.prefix), ("guest.prefix6", g.prefix6)):
        if net is not None and net.prefixlen > MAX_ROUTED_LEN[net.version]:
            out.append((key, f"{net} is longer than /{MAX_ROUTED_LEN[net.version]}: most networks on the "
                        "Internet filter such prefixes, so the guest may be reachable only near your upstreams"))
    return tuple(out)


def _check_ha_timing(L: _Loader, cfg: SiteConfig) -> None:
    """The HA state machine's own timing rule (lease long enough to fence before it expires)."""
    try:
        HaConfig.from_site_config(cfg)
    except HaConfigError as e:
        key = "lease.lease_ttl_ms" if cfg.lease.backend == "etcd" else "witness.lease_ttl_ms"
        raise L.err(key if cfg.witness else "heartbeat", str(e)) from None


_ETCD_ONLY = {f.name for f in fields(LeaseSection)} - {"backend"}
_PREFIX = re.compile(r"^(/[A-Za-z0-9_.-]+)+$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _endpoints(v) -> tuple[str, ...]:
    """etcd client URLs: https only (the lease needs TLS with a client certificate), host and port."""
    if not isinstance(v, list) or not all(isinstance(e, str) for e in v):
        raise TypeError(f"must be an array of URLs like \"https://10.0.0.1:2379\", not {v!r}")
    if not v:
        raise ValueError("is empty: name the etcd cluster's client URLs, e.g. [\"https://10.0.0.1:2379\"]")
    out = []
    for e in v:
        try:
            u = urlsplit(e)
            port = u.port or 2379
        except ValueError as err:
            raise ValueError(f"{e!r} is not a URL ({err})") from None
        if u.scheme != "https":
            raise ValueError(f"{e!r} must be https://: the lease goes to etcd over TLS with this site's "
                             "client certificate")
        if not u.hostname or u.username or u.password or u.path not in ("", "/") or u.query or u.fragment:
            raise ValueError(f"{e!r} must be https://HOST:PORT and nothing else")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        url = f"https://{host}:{port}"
        if url in out:
            raise ValueError(f"{e!r} is listed twice")
        out.append(url)
    return tuple(out)


def _lease_prefix(v) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string like \"/geomirror\", not {_tname(v)} ({v!r})")
    if len(v) > 200 or not _PREFIX.match(v):
        raise ValueError(f"{v!r} is not a key prefix: '/' then letters, digits, '_', '.', '-' (more "
                         "'/'-separated parts allowed), no trailing '/'")
    return v


def _server_name(v) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string, not {_tname(v)} ({v!r})")
    if v and not _HOSTNAME.match(v):
        raise ValueError(f"{v!r} is not a host name")
    return v


def _load_lease(L: _Loader, data: dict | None, has_witness: bool) -> LeaseSection:
    data = data or {}
    try:
        backend = _choice("witness", "etcd")(data.get("backend", "witness"))
    except (TypeError, ValueError) as e:
        raise L.err("lease.backend", str(e)) from None
    if backend == "witness":
        for k in data:
            if k in _ETCD_ONLY:
                raise L.err(f"lease.{k}", 'is only for backend = "etcd"; the built-in witness is configured '
                            "in [witness]")
            if k != "backend":
                raise _unknown(L, f"lease.{k}", k, {"backend"} | _ETCD_ONLY)
        return LeaseSection()
    if has_witness:
        raise L.err("witness", 'lease.backend is "etcd", so [witness] would not be used: remove it (the lease '
                    "timing is lease.lease_ttl_ms and lease.renew_every_ms)")
    if "endpoints" not in data:
        raise L.err("lease.endpoints", 'missing (required with backend = "etcd"): the etcd client URLs, e.g. '
                    '["https://10.0.0.1:2379", "https://10.0.1.1:2379", "https://10.0.2.1:2379"]')
    s = L.section(LeaseSection, data, "lease", {
        "backend": _choice("witness", "etcd"), "endpoints": _endpoints, "server_name": _server_name,
        "prefix": _lease_prefix, "ca": L.path_, "cert": L.path_, "key": L.path_},
        {"lease_ttl_ms": (1000, 600_000), "renew_every_ms": (10, 600_000)})
    given = [k for k in ("ca", "cert", "key") if k in data]
    if given and len(given) < 3:
        missing = next(k for k in ("ca", "cert", "key") if k not in data)
        raise L.err(f"lease.{missing}", "lease.ca, lease.cert and lease.key go together (leave all three out "
                    "to use the [tls] files)")
    if s.lease_ttl_ms % 1000:
        raise L.err("lease.lease_ttl_ms", f"{s.lease_ttl_ms} is not a whole number of seconds: etcd leases "
                    "count whole seconds")
    if s.renew_every_ms * 3 > s.lease_ttl_ms:
        raise L.err("lease.renew_every_ms", f"{s.renew_every_ms} ms leaves too little margin: renew at least "
                    f"three times per lease_ttl_ms ({s.lease_ttl_ms} ms)")
    return s


def _load_bgp(L: _Loader, data: dict | None) -> BGPSection:
    data = dict(data or {})
    raw = data.pop("neighbor", [])
    if not isinstance(raw, list):
        raise L.err("bgp.neighbor", "must be an array of tables ([[bgp.neighbor]])")
    neighbors = []
    for i, n in enumerate(raw):
        if not isinstance(n, dict):
            raise L.err(f"bgp.neighbor[{i}]", f"must be a table, not {_tname(n)}")
        nb = L.section(Neighbor, n, f"bgp.neighbor[{i}]", None, {"peer_as": ASN})
        if any(nb.address == o.address for o in neighbors):
            raise L.err(f"bgp.neighbor[{i}].address", f"{nb.address} is configured twice")
        neighbors.append(nb)
    bgp = L.section(BGPSection, data, "bgp",
                    {"communities": _announced_communities, "standby_communities": _announced_communities,
                     "drain_communities": _communities, "large_communities": _large_communities,
                     "standby_large_communities": _large_communities, "drain_large_communities": _large_communities},
                    {"prepend": (0, MAX_PREPEND), "standby_prepend": (0, MAX_PREPEND), "med": (0, MAX_ASN),
                     "standby_med": (0, MAX_ASN), "hold_time": (0, 65535), "drain_timeout_s": (0, 600),
                     "upstream_loss_handover_s": (0, 3600), "upstream_loss_peer_stable_s": (0, 3600),
                     "upstream_loss_hold_down_s": (0, 86400)},
                    file_keys={"neighbors": "neighbor"})
    if bgp.standby_prepend:
        if bgp.standby_prepend <= bgp.prepend:
            raise L.err("bgp.standby_prepend", f"{bgp.standby_prepend} must be more than bgp.prepend "
                        f"({bgp.prepend}): the standby's pre-announcement must have the longer AS path, or "
                        "routers would send the guest's traffic to the standby")
    else:
        for k in ("standby_med", "standby_communities", "standby_large_communities"):
            if k in data:
                raise L.err(f"bgp.{k}", "is used only by the standby's pre-announcement, which is off: set "
                            f"bgp.standby_prepend (more than bgp.prepend) to turn it on, or remove {k}")
    if bgp.upstream_loss_handover_s and bgp.upstream_loss_hold_down_s < bgp.upstream_loss_handover_s:
        raise L.err("bgp.upstream_loss_hold_down_s", f"{bgp.upstream_loss_hold_down_s:g} must be at least "
                    f"bgp.upstream_loss_handover_s ({bgp.upstream_loss_handover_s:g}), or a flapping upstream "
                    "could move the guest to and fro")
    if 0 < bgp.hold_time < 3:
        raise L.err("bgp.hold_time", f"{bgp.hold_time} is not allowed by BGP (0, or 3..65535 seconds)")
    if bgp.enabled and not neighbors:
        raise L.err("bgp.neighbor", "BGP is enabled but no [[bgp.neighbor]] is configured")
    return replace(bgp, neighbors=tuple(neighbors))


def _control_url(v) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a URL string like http://192.0.2.7:7780, not {_tname(v)} ({v!r})")
    u = urlsplit(v)
    if u.scheme not in ("http", "https") or not u.hostname or u.path not in ("", "/"):
        raise ValueError(f"{v!r} is not a control API URL like http://192.0.2.7:7780 (scheme, host, port; no path)")
    return v.rstrip("/")


def _load_drill(L: _Loader, data: dict | None) -> DrillSection:
    data = dict(data or {})
    raw = data.pop("probe", [])
    if not isinstance(raw, list):
        raise L.err("drill.probe", "must be an array of tables ([[drill.probe]])")
    probes = []
    for i, p in enumerate(raw):
        if not isinstance(p, dict):
            raise L.err(f"drill.probe[{i}]", f"must be a table, not {_tname(p)}")
        pr = L.section(DrillProbe, p, f"drill.probe[{i}]", {"name": _name, "kind": _choice("tcp", "memcached", "sip-options")},
                       {"port": PORT, "interval_ms": (10, 60_000), "timeout_ms": (10, 600_000),
                        "max_stall_ms": (0, 3_600_000)})
        if any(pr.name == o.name for o in probes):
            raise L.err(f"drill.probe[{i}].name", f"{pr.name!r} is used by another probe")
        probes.append(pr)
    budgets = {k: (1, 3_600_000) for k in DrillSection.__dataclass_fields__ if k.startswith("budget_")}
    d = L.section(DrillSection, data, "drill", {"peer_control": _control_url, "peer_token_file": L.path_},
                  {"switchover_timeout_s": (1, 600), "rollback_timeout_s": (1, 3600), "max_backlog_epochs": (0, 10_000),
                   "max_replica_lag_epochs": (0, 1_000_000), "keep": (1, 100_000), **budgets},
                  file_keys={"probes": "probe"})
    if d.peer_control and d.peer_token_file is None:
        raise L.err("drill.peer_token_file", f"missing: drill.peer_control {d.peer_control} needs the peer's "
                    "control token (a copy of its control.token)")
    return replace(d, probes=tuple(probes))


def _load_guest(L: _Loader, data: dict) -> GuestSection:
    data = dict(data)
    if data.get("disk") == "":  # empty: no disk (as if absent)
        del data["disk"]
    g = L.section(GuestSection, data, "guest",
                  {"mac": _mac, "accel": _choice("auto", "kvm", "tcg"), "name": _name, "disk": L.path_},
                  {"memory_mb": (16, 65536), "vcpus": (1, 64)})
    for k in ("address", "gateway"):
        a = getattr(g, k)
        if a not in g.prefix:
            raise L.err(f"guest.{k}", f"{a} is outside guest.prefix {g.prefix}")
        if g.prefix.prefixlen < 31 and a in (g.prefix.network_address, g.prefix.broadcast_address):
            raise L.err(f"guest.{k}", f"{a} is the network or broadcast address of {g.prefix}")
    if g.address == g.gateway:
        raise L.err("guest.gateway", f"{g.gateway} is the guest's own address (guest.address)")
    if g.qemu not in ("system", "colo") and not Path(g.qemu).is_absolute():
        raise L.err("guest.qemu", f"{g.qemu!r} is neither system, colo nor an absolute path to a QEMU binary")
    six = [k for k in ("prefix6", "address6", "gateway6") if getattr(g, k) is not None]
    if six and len(six) < 3:
        missing = next(k for k in ("prefix6", "address6", "gateway6") if getattr(g, k) is None)
        raise L.err(f"guest.{missing}", "guest.prefix6, guest.address6 and guest.gateway6 go together (leave "
                    "all three out for an IPv4-only guest)")
    if six:
        for k in ("address6", "gateway6"):
            a = getattr(g, k)
            if a not in g.prefix6:
                raise L.err(f"guest.{k}", f"{a} is outside guest.prefix6 {g.prefix6}")
            if g.prefix6.prefixlen < 127 and a == g.prefix6.network_address:
                raise L.err(f"guest.{k}", f"{a} is the network (subnet-router anycast) address of {g.prefix6}")
            if a.is_link_local or a.is_multicast:
                raise L.err(f"guest.{k}", f"{a} is not a global unicast address")
        if g.address6 == g.gateway6:
            raise L.err("guest.gateway6", f"{g.gateway6} is the guest's own address (guest.address6)")
    if bool(g.kernel) != bool(g.initrd):
        raise L.err("guest.initrd" if g.kernel else "guest.kernel",
                    "kernel and initrd go together (leave both empty for the built image)")
    if g.kernel:
        g = replace(g, kernel=str(L.path_(g.kernel)), initrd=str(L.path_(g.initrd)))
    return g


_SITES_NEEDED = ("name the sites that may hold leases, e.g. sites = [\"fra1\", \"ams1\"]; any other "
                 "certificate of the pair CA, the witness's own included, is refused")


def load_witness(path) -> WitnessConfig:
    """Read and validate a witness config."""
    resolved, data = _read(path)
    L = _Loader(path, resolved)
    L.top(data, {"witness", "tls"})

    def sites(v):
        if not isinstance(v, list):
            raise TypeError(f"must be an array of site names, not {_tname(v)} ({v!r})")
        if not v:
            raise ValueError(f"is empty: {_SITES_NEEDED}")
        names = tuple(_name(s) for s in v)
        if len(set(names)) != len(names):
            raise ValueError(f"{list(names)} names a site twice")
        return names

    wdata = L.table(data, "witness")
    if "sites" not in wdata:
        raise L.err("witness.sites", f"missing (required): {_SITES_NEEDED}")
    w = L.section(WitnessSection, wdata, "witness",
                  {"state_dir": L.path_, "sites": sites, "name": _name}, {"port": PORT})
    if w.name in w.sites:
        raise L.err("witness.sites", f"{w.name!r} is the witness's own name: its certificate must never "
                    "hold a lease")
    tls = L.section(TLSSection, L.table(data, "tls"), "tls", {k: L.path_ for k in ("ca", "cert", "key")})
    return WitnessConfig(resolved, w, tls)


def check(path, files: bool = False) -> str:
    """Load a site or witness config (told apart by its tables); with `files`, check TLS files too."""
    _, data = _read(path)
    cfg = load_site(path) if "site" in data or "witness" not in data else load_witness(path)
    if files:
        cfg.check_files()
    if isinstance(cfg, SiteConfig):
        if cfg.lease.backend == "etcd":
            authority = f"lease etcd at {', '.join(cfg.lease.endpoints)}"
            if files:
                authority += f" ({_reach_etcd(cfg)})"
        else:
            authority = f"witness {cfg.witness.name if cfg.witness else 'none (no automatic takeover)'}"
        prefixes = str(cfg.guest.prefix) + (f" {cfg.guest.prefix6}" if cfg.guest.prefix6 else "")
        return "\n".join([f"{cfg.path}: site {cfg.site.name} (AS {cfg.site.asn}, {cfg.site.initial_role}), peer "
                          f"{cfg.peer.name} at {cfg.peer.address}:{cfg.peer.port}, guest {prefixes}, {authority}",
                          *(f"warning: {cfg.path}: {key}: {problem}" for key, problem in cfg.warnings)])
    return (f"{cfg.path}: witness {cfg.witness.name} on {cfg.witness.listen}:{cfg.witness.port}, "
            f"serving sites {', '.join(cfg.witness.sites)}")


def _reach_etcd(cfg: SiteConfig) -> str:
    """Ask the etcd cluster what it holds for this guest (`check --files`): one line, or a ConfigError."""
    key = "lease.cert" if cfg.lease.ca is not None else "tls.cert"
    try:
        return asyncio.run(lease_backends.describe_etcd(cfg))
    except PairingError as e:
        raise ConfigError(cfg.path, key, str(e)) from None
    except lease_backends.LeaseError as e:
        raise ConfigError(cfg.path, "lease.endpoints", str(e)) from None


if __name__ == "__main__":  # python -m geomirror.config FILE [--files]
    try:
        print(check(sys.argv[1], "--files" in sys.argv[2:]))
    except (ConfigError, IndexError) as e:
        print(e if isinstance(e, ConfigError) else "usage: python -m geomirror.config FILE [--files]",
              file=sys.stderr)
        sys.exit(2)
