"""Site and witness configuration: TOML into frozen dataclasses, validated.

Every error is a ConfigError naming the file, the dotted key and what is wrong.
Unknown keys are errors (with a suggestion). Relative paths resolve against the
config file's directory. The reference is docs/config.md.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from geomirror.errors import ConfigError

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_COMMUNITY = re.compile(r"^(\d{1,10}):(\d{1,10})$")


# ---------------------------------------------------------------- sections

@dataclass(frozen=True)
class SiteSection:
    name: str
    asn: int
    router_id: ipaddress.IPv4Address
    initial_role: str = "primary"
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
class Neighbor:
    address: ipaddress.IPv4Address
    peer_as: int
    local_address: ipaddress.IPv4Address | None = None


@dataclass(frozen=True)
class BGPSection:
    enabled: bool = True
    med: int | None = None
    communities: tuple[str, ...] = ()
    prepend: int = 0
    hold_time: int = 9
    neighbors: tuple[Neighbor, ...] = ()


@dataclass(frozen=True)
class GuestSection:
    prefix: ipaddress.IPv4Network
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    name: str = "guest"
    memory_mb: int = 128
    vcpus: int = 1
    kernel: str = ""
    initrd: str = ""
    append: str = ""
    machine: str = "pc"
    accel: str = "auto"
    mac: str = "52:54:00:12:34:56"


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
    compression_level: int = 1
    unreachable_policy: str = "stall"
    unprotected_grace_ms: int = 5000


@dataclass(frozen=True)
class HeartbeatSection:
    interval_ms: float = 100.0
    min_timeout_ms: float = 600.0
    max_timeout_ms: float = 5000.0


@dataclass(frozen=True)
class ControlSection:
    listen: ipaddress.IPv4Address = ipaddress.IPv4Address("127.0.0.1")
    port: int = 7780
    token_file: str = "control.token"


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    site: SiteSection
    peer: PeerSection
    tls: TLSSection
    guest: GuestSection
    witness: WitnessRef | None = None
    bgp: BGPSection = BGPSection()
    checkpoint: CheckpointSection = CheckpointSection()
    heartbeat: HeartbeatSection = HeartbeatSection()
    control: ControlSection = ControlSection()

    def check_files(self) -> None:
        for k in ("ca", "cert", "key"):
            p = getattr(self.tls, k)
            if not p.exists():
                raise ConfigError(self.path, f"tls.{k}", f"file {p} does not exist (run `geomirror pair init`)")


@dataclass(frozen=True)
class WitnessSection:
    listen: ipaddress.IPv4Address
    name: str = "witness"
    port: int = 7790
    state_dir: Path = Path("/var/lib/geomirror-witness")
    sites: tuple[str, ...] = ()


@dataclass(frozen=True)
class WitnessConfig:
    path: Path
    witness: WitnessSection
    tls: TLSSection


# ---------------------------------------------------------------- the loader

class _Loader:
    def __init__(self, path: Path):
        self.path = path
        self.base = path.parent

    def err(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    def table(self, data: Any, key: str, required: bool = True) -> dict | None:
        v = data.get(key.rsplit(".", 1)[-1]) if isinstance(data, dict) else None
        if v is None:
            if required:
                raise self.err(key, "missing table")
            return None
        if not isinstance(v, dict):
            raise self.err(key, f"must be a table, not {_tname(v)}")
        return v

    def section(self, cls, data: dict | None, prefix: str, convert: dict | None = None):
        """Build dataclass `cls` from `data`, checking keys and types; `convert` maps key -> fn."""
        data = data or {}
        convert = convert or {}
        known = {f.name for f in fields(cls)}
        for k in data:
            if k not in known:
                close = difflib.get_close_matches(k, sorted(known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
                raise self.err(f"{prefix}.{k}", f"unknown key '{k}'{hint}")
        kw = {}
        for f in fields(cls):
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise self.err(f"{prefix}.{f.name}", "missing (required)")
                continue
            v = data[f.name]
            key = f"{prefix}.{f.name}"
            fn = convert.get(f.name)
            try:
                kw[f.name] = fn(v) if fn else _typed(v, f.type)
            except ConfigError:
                raise
            except (ValueError, TypeError) as e:
                raise self.err(key, str(e)) from None
        return cls(**kw)

    def path_(self, v) -> Path:
        if not isinstance(v, str) or not v:
            raise ValueError(f"must be a non-empty path string, not {_tname(v)}")
        p = Path(v)
        return p if p.is_absolute() else (self.base / p)


def _tname(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
            dict: "a table"}.get(type(v), type(v).__name__)


def _typed(v, t: str):
    """Check/convert a scalar against the annotation string `t`."""
    t = str(t)
    if t in ("str",):
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
    if "IPv4Address" in t:
        if not isinstance(v, str):
            raise TypeError(f"must be an IPv4 address string, not {_tname(v)}")
        try:
            return ipaddress.IPv4Address(v)
        except ValueError:
            raise ValueError(f"{v} is not an IPv4 address") from None
    if "IPv4Network" in t:
        if not isinstance(v, str):
            raise TypeError(f"must be a prefix string like 198.51.100.0/24, not {_tname(v)}")
        try:
            return ipaddress.IPv4Network(v)
        except ValueError as e:
            raise ValueError(f"{v} is not an IPv4 prefix ({e})") from None
    if t == "Path":
        raise AssertionError("paths are converted explicitly")
    raise AssertionError(f"no converter for {t}")


def _read(path) -> tuple[Path, dict]:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(path, None, "no such file") from None
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror}") from None
    try:
        return path.resolve(), tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, None, f"TOML syntax error: {e}") from None


def _range(L: _Loader, key: str, v, lo, hi) -> None:
    if v is not None and not (lo <= v <= hi):
        raise L.err(key, f"{v} is out of range ({lo}..{hi})")


def _name(v) -> str:
    if not isinstance(v, str) or not _NAME.match(v):
        raise ValueError(f"{v!r} is not a valid name (lowercase letters, digits and '-', e.g. site-a)")
    return v


def load_site(path) -> SiteConfig:
    path, data = _read(path)
    L = _Loader(path)
    top = {"site", "peer", "tls", "witness", "bgp", "guest", "checkpoint", "heartbeat", "control"}
    for k in data:
        if k not in top:
            close = difflib.get_close_matches(k, sorted(top), n=1)
            raise L.err(k, f"unknown table '{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))

    def role(v):
        if v not in ("primary", "standby"):
            raise ValueError(f"{v!r} must be 'primary' or 'standby'")
        return v

    site = L.section(SiteSection, L.table(data, "site"), "site", {
        "name": _name, "state_dir": L.path_, "run_dir": L.path_, "initial_role": role})
    _range(L, "site.asn", site.asn, 1, 4294967295)
    peer = L.section(PeerSection, L.table(data, "peer"), "peer", {"name": _name})
    if peer.name == site.name:
        raise L.err("peer.name", f"the peer must be another site than this one ({site.name})")
    for k in ("port", "listen_port"):
        _range(L, f"peer.{k}", getattr(peer, k), 1, 65535)
    _range(L, "peer.asn", peer.asn, 1, 4294967295)
    tls = L.section(TLSSection, L.table(data, "tls"), "tls", {k: L.path_ for k in ("ca", "cert", "key")})

    wdata = L.table(data, "witness", required=False)
    witness = L.section(WitnessRef, wdata, "witness", {"name": _name}) if wdata is not None else None
    if witness:
        _range(L, "witness.port", witness.port, 1, 65535)
        if witness.renew_every_ms * 3 > witness.lease_ttl_ms:
            raise L.err("witness.renew_every_ms", f"{witness.renew_every_ms} ms leaves too little margin: renew "
                        f"at least three times per lease_ttl_ms ({witness.lease_ttl_ms} ms)")

    bdata = dict(L.table(data, "bgp", required=False) or {})
    raw_neighbors = bdata.pop("neighbor", [])
    if not isinstance(raw_neighbors, list):
        raise L.err("bgp.neighbor", "must be an array of tables ([[bgp.neighbor]])")
    neighbors = []
    for i, n in enumerate(raw_neighbors):
        if not isinstance(n, dict):
            raise L.err(f"bgp.neighbor[{i}]", "must be a table")
        nb = L.section(Neighbor, n, f"bgp.neighbor[{i}]")
        _range(L, f"bgp.neighbor[{i}].peer_as", nb.peer_as, 1, 4294967295)
        neighbors.append(nb)

    def communities(v):
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise TypeError("must be an array of strings like \"64501:100\"")
        for c in v:
            m = _COMMUNITY.match(c)
            if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
                raise ValueError(f"{c!r} is not a community (ASN:VALUE, each 0..65535)")
        return tuple(v)

    bgp = L.section(BGPSection, bdata, "bgp", {"communities": communities})
    bgp = BGPSection(**{**bgp.__dict__, "neighbors": tuple(neighbors)})
    _range(L, "bgp.prepend", bgp.prepend, 0, 8)
    _range(L, "bgp.med", bgp.med, 0, 4294967295)
    if bgp.hold_time != 0:
        _range(L, "bgp.hold_time", bgp.hold_time, 3, 65535)
    if bgp.enabled and not neighbors:
        raise L.err("bgp.neighbor", "BGP is enabled but no [[bgp.neighbor]] is configured")

    def mac(v):
        if not isinstance(v, str) or not _MAC.match(v):
            raise ValueError(f"{v!r} is not a MAC address (aa:bb:cc:dd:ee:ff, lowercase)")
        return v

    def accel(v):
        if v not in ("auto", "kvm", "tcg"):
            raise ValueError(f"{v!r} must be auto, kvm or tcg")
        return v

    guest = L.section(GuestSection, L.table(data, "guest"), "guest", {"mac": mac, "accel": accel, "name": _name})
    for k in ("address", "gateway"):
        a = getattr(guest, k)
        if a not in guest.prefix:
            raise L.err(f"guest.{k}", f"{a} is outside guest.prefix {guest.prefix}")
        if a in (guest.prefix.network_address, guest.prefix.broadcast_address):
            raise L.err(f"guest.{k}", f"{a} is the network or broadcast address of {guest.prefix}")
    if guest.address == guest.gateway:
        raise L.err("guest.gateway", f"{guest.gateway} is the guest's own address")
    _range(L, "guest.memory_mb", guest.memory_mb, 16, 65536)
    _range(L, "guest.vcpus", guest.vcpus, 1, 64)
    if bool(guest.kernel) != bool(guest.initrd):
        raise L.err("guest.initrd" if guest.kernel else "guest.kernel",
                    "kernel and initrd go together (leave both empty for the built image)")
    if guest.kernel:
        guest = GuestSection(**{**guest.__dict__, "kernel": str(L.path_(guest.kernel)),
                                "initrd": str(L.path_(guest.initrd))})

    def policy(v):
        if v not in ("stall", "continue-unprotected"):
            raise ValueError(f"{v!r} must be 'stall' or 'continue-unprotected'")
        return v

    ck = L.section(CheckpointSection, L.table(data, "checkpoint", required=False), "checkpoint",
                   {"unreachable_policy": policy})
    _range(L, "checkpoint.min_interval_ms", ck.min_interval_ms, 1, 60000)
    _range(L, "checkpoint.max_interval_ms", ck.max_interval_ms, 1, 60000)
    if ck.min_interval_ms > ck.max_interval_ms:
        raise L.err("checkpoint.min_interval_ms", f"{ck.min_interval_ms:g} is above max_interval_ms "
                    f"{ck.max_interval_ms:g}")
    if not ck.min_interval_ms <= ck.interval_ms <= ck.max_interval_ms:
        raise L.err("checkpoint.interval_ms", f"{ck.interval_ms:g} is outside min_interval_ms..max_interval_ms "
                    f"({ck.min_interval_ms:g}..{ck.max_interval_ms:g})")
    if not 0 < ck.max_pause_share < 1:
        raise L.err("checkpoint.max_pause_share", f"{ck.max_pause_share} must be between 0 and 1")
    _range(L, "checkpoint.max_in_flight", ck.max_in_flight, 1, 64)
    _range(L, "checkpoint.compression_level", ck.compression_level, 1, 19)
    if ck.max_wan_mbit < 0:
        raise L.err("checkpoint.max_wan_mbit", "must not be negative (0 = unlimited)")
    if ck.unreachable_policy == "continue-unprotected" and witness is None:
        raise L.err("checkpoint.unreachable_policy", "continue-unprotected needs a [witness]: running "
                    "unprotected is only safe while this site holds the witness lease")

    hb = L.section(HeartbeatSection, L.table(data, "heartbeat", required=False), "heartbeat")
    if hb.min_timeout_ms > hb.max_timeout_ms:
        raise L.err("heartbeat.min_timeout_ms", f"{hb.min_timeout_ms:g} is above max_timeout_ms {hb.max_timeout_ms:g}")
    if hb.interval_ms * 2 > hb.min_timeout_ms:
        raise L.err("heartbeat.min_timeout_ms", f"{hb.min_timeout_ms:g} ms is less than two heartbeat intervals "
                    f"({hb.interval_ms:g} ms)")
    ctl = L.section(ControlSection, L.table(data, "control", required=False), "control")
    _range(L, "control.port", ctl.port, 1, 65535)
    return SiteConfig(path, site, peer, tls, guest, witness, bgp, ck, hb, ctl)


def load_witness(path) -> WitnessConfig:
    path, data = _read(path)
    L = _Loader(path)
    for k in data:
        if k not in ("witness", "tls"):
            raise L.err(k, f"unknown table '{k}'")

    def sites(v):
        if not isinstance(v, list):
            raise TypeError("must be an array of site names")
        return tuple(_name(s) for s in v)

    w = L.section(WitnessSection, L.table(data, "witness"), "witness",
                  {"state_dir": L.path_, "sites": sites, "name": _name})
    _range(L, "witness.port", w.port, 1, 65535)
    tls = L.section(TLSSection, L.table(data, "tls"), "tls", {k: L.path_ for k in ("ca", "cert", "key")})
    return WitnessConfig(path, w, tls)
