"""ExaBGP 5 configuration and environment for one site (pure)."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

_SAFE_ARG = re.compile(r"^[A-Za-z0-9_./:=+-]+$")


@dataclass(frozen=True)
class Neighbor:
    address: str
    peer_as: int
    local_address: str | None = None
    hold_time: int = 9


def _ip(v: str, what: str) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise ValueError(f"{what} {v!r} is not an IP address") from None


def _asn(v: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 4294967295:
        raise ValueError(f"{what} {v!r} is not an AS number")
    return v


def render_exabgp_config(*, router_id: str, local_as: int, neighbors: list[Neighbor],
                         process_argv: list[str]) -> str:
    """One neighbor block per upstream, graceful restart off, every event to our process."""
    rid = _ip(router_id, "router id")
    _asn(local_as, "local AS")
    for a in process_argv:
        if not _SAFE_ARG.match(a):
            raise ValueError(f"process argument {a!r} has characters ExaBGP's config cannot carry safely")
    out = ["process geomirror {", f"    run {' '.join(process_argv)};", "    encoder json;", "}", ""]
    for n in neighbors:
        peer = _ip(n.address, "neighbour address")
        _asn(n.peer_as, "peer AS")
        if not (n.hold_time == 0 or 3 <= n.hold_time <= 65535):
            raise ValueError(f"hold time {n.hold_time} must be 0 or 3..65535")
        out += [f"neighbor {peer} {{",
                f"    router-id {rid};",
                f"    local-as {local_as};",
                f"    peer-as {n.peer_as};",
                f"    hold-time {n.hold_time};"]
        if n.local_address:
            out.append(f"    local-address {_ip(n.local_address, 'local address')};")
        out += ["    family { ipv4 unicast; }",
                "    api {",
                "        processes [ geomirror ];",
                "        neighbor-changes;",
                "        receive { parsed; update; }",
                "    }",
                "}", ""]
    return "\n".join(out)


def exabgp_env(run_dir: Path) -> dict[str, str]:
    """ExaBGP's settings: acks on, no privilege drop or daemonising, no CLI pipes, no listener."""
    return {
        "exabgp.api.ack": "true",
        "exabgp.api.cli": "false",
        "exabgp.api.respawn": "true",
        "exabgp.api.encoder": "json",
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        "exabgp.log.destination": "stderr",
        "exabgp.log.level": "INFO",
        "exabgp.tcp.bind": "",
        "exabgp.cache.attributes": "false",
    }


def announce_command(prefix: str, *, local_as: int, med: int | None = None, communities=(),
                     prepend: int = 0) -> str:
    """`announce route …` for ExaBGP's API. `prepend` extra copies of our AS go first in the path."""
    net = ipaddress.ip_network(prefix)
    parts = [f"announce route {net} next-hop self"]
    if med is not None:
        parts.append(f"med {int(med)}")
    comms = [c for c in communities]
    for c in comms:
        if not re.fullmatch(r"\d{1,5}:\d{1,5}", c):
            raise ValueError(f"community {c!r} is not ASN:VALUE")
    if comms:
        parts.append(f"community [ {' '.join(comms)} ]")
    if prepend:
        if not 0 <= prepend <= 8:
            raise ValueError("prepend must be 0..8")
        parts.append(f"as-path [ {' '.join([str(_asn(local_as, 'local AS'))] * prepend)} ]")
    return " ".join(parts)


def withdraw_command(prefix: str) -> str:
    return f"withdraw route {ipaddress.ip_network(prefix)} next-hop self"
