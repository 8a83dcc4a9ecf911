"""ExaBGP 5 configuration, environment and API commands for one site (pure: values in, text out).

Every value that reaches ExaBGP's configuration or its API is validated here, so a name or
an address can never smuggle a `;`, a brace or a second command into what ExaBGP parses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Neighbor", "render_exabgp_config", "exabgp_env", "announce_command", "withdraw_command",
           "PROCESS_NAME", "MAX_PREPEND"]

PROCESS_NAME = "geomirror"
MAX_PREPEND = 8
FAMILIES = {"ipv4 unicast": 4, "ipv6 unicast": 6}
_COMMUNITY = re.compile(r"^(\d{1,5}):(\d{1,5})$")
# characters ExaBGP's tokeniser treats specially even inside quotes (quotes, escapes) or that end a line
_ARG_FORBIDDEN = re.compile(r"[\"'\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Neighbor:
    """One upstream BGP router this site peers with."""
    address: str
    peer_as: int
    local_address: str | None = None
    hold_time: int = 9


def _ip(value, what: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IP address") from None


def _asn(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4294967295:
        raise ValueError(f"{what} {value!r} is not an AS number (1..4294967295)")
    return value


def _family(family: str) -> int:
    if family not in FAMILIES:
        raise ValueError(f"address family {family!r} is not supported (one of {', '.join(FAMILIES)})")
    return FAMILIES[family]


def _prefix(prefix, family: str = "ipv4 unicast") -> str:
    try:
        net = ipaddress.ip_network(str(prefix), strict=True)
    except ValueError as e:
        raise ValueError(f"prefix {prefix!r} is not a network address: {e}") from None
    if net.version != _family(family):
        raise ValueError(f"prefix {prefix} is not in address family {family}")
    return str(net)


def _hold_time(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == 0 or 3 <= value <= 65535):
        raise ValueError(f"hold time {value!r} must be 0 or 3..65535 seconds")
    return value


def _run_arg(arg) -> str:
    if not isinstance(arg, str) or not arg or _ARG_FORBIDDEN.search(arg):
        raise ValueError(f"process argument {arg!r} is empty or holds a quote, backslash or control character")
    return f'"{arg}"'


def render_exabgp_config(*, router_id: str, local_as: int, neighbors: list[Neighbor],
                         process_argv: list[str], family: str = "ipv4 unicast") -> str:
    """ExaBGP 5 config: one neighbor block per upstream (graceful restart off), every
    neighbour change and parsed received update to our API process, which speaks JSON."""
    rid = _ip(router_id, "router id")
    if ipaddress.ip_address(rid).version != 4:
        raise ValueError(f"router id {router_id!r} must be an IPv4 address")
    _asn(local_as, "local AS")
    _family(family)
    if not process_argv:
        raise ValueError("process argv is empty: ExaBGP needs a program to run")
    if not neighbors:
        raise ValueError("no neighbour: ExaBGP needs at least one")
    run = " ".join(_run_arg(a) for a in process_argv)
    out = [f"process {PROCESS_NAME} {{", f"    run {run};", "    encoder json;", "}", ""]
    seen: set[str] = set()
    for n in neighbors:
        peer = _ip(n.address, "neighbour address")
        if peer in seen:
            raise ValueError(f"neighbour {peer} is configured twice")
        seen.add(peer)
        out += [f"neighbor {peer} {{",
                f"    router-id {rid};"]
        if n.local_address is not None:
            out.append(f"    local-address {_ip(n.local_address, 'local address')};")
        out += [f"    local-as {local_as};",
                f"    peer-as {_asn(n.peer_as, 'peer AS')};",
                f"    hold-time {_hold_time(n.hold_time)};",
                f"    family {{ {family}; }}",
                "    capability { graceful-restart disable; }",
                "    api {",
                f"        processes [ {PROCESS_NAME} ];",
                "        neighbor-changes;",
                "        receive { parsed; update; }",
                "    }",
                "}", ""]
    return "\n".join(out)


def exabgp_env(run_dir: Path) -> dict[str, str]:
    """Environment for `exabgp server`: acks on; runs as root with no privilege drop, no
    daemonising and no pid file of its own; logs to stderr; no CLI pipes; no listening socket
    (we connect out to each neighbour)."""
    del run_dir  # nothing of ExaBGP's own needs to live there: the speaker keeps pid and log
    return {
        "exabgp.api.ack": "true",
        "exabgp.api.encoder": "json",
        "exabgp.api.respawn": "true",
        "exabgp.api.terminate": "false",
        "exabgp.api.cli": "false",
        "exabgp.daemon.user": "root",
        "exabgp.daemon.drop": "false",
        "exabgp.daemon.daemonize": "false",
        "exabgp.daemon.pid": "",
        "exabgp.log.enable": "true",
        "exabgp.log.destination": "stderr",
        "exabgp.log.level": "INFO",
        "exabgp.log.packets": "false",
        "exabgp.log.routes": "false",
        "exabgp.log.statistics": "false",  # else a line per keepalive
        "exabgp.log.configuration": "false",
        "exabgp.tcp.bind": "",
    }


def _as_path_for_prepend(local_as: int, prepend: int) -> list[int]:
    """The AS_PATH to hand ExaBGP. An explicit `as-path` goes on the wire verbatim (ExaBGP adds
    its own AS only when none is given), so the own AS appears 1 + `prepend` times."""
    return [local_as] * (1 + prepend)


def announce_command(prefix: str, *, local_as: int, med: int | None = None, communities=(),
                     prepend: int = 0, family: str = "ipv4 unicast") -> str:
    """`announce route …` for ExaBGP's API; `prepend` = extra copies of our AS on the wire."""
    parts = [f"announce route {_prefix(prefix, family)} next-hop self"]
    if med is not None:
        if isinstance(med, bool) or not isinstance(med, int) or not 0 <= med <= 4294967295:
            raise ValueError(f"MED {med!r} must be an integer 0..4294967295")
        parts.append(f"med {med}")
    if isinstance(communities, str):
        raise ValueError(f"communities must be a list of ASN:VALUE strings, not the string {communities!r}")
    comms = list(communities)
    for c in comms:
        m = _COMMUNITY.match(c) if isinstance(c, str) else None
        if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
            raise ValueError(f"community {c!r} is not ASN:VALUE (each 0..65535)")
    if comms:
        parts.append(f"community [ {' '.join(comms)} ]")
    if isinstance(prepend, bool) or not isinstance(prepend, int) or not 0 <= prepend <= MAX_PREPEND:
        raise ValueError(f"prepend {prepend!r} must be 0..{MAX_PREPEND}")
    if prepend:
        path = _as_path_for_prepend(_asn(local_as, "local AS"), prepend)
        parts.append(f"as-path [ {' '.join(map(str, path))} ]")
    return " ".join(parts)


def withdraw_command(prefix: str, *, family: str = "ipv4 unicast") -> str:
    return f"withdraw route {_prefix(prefix, family)} next-hop self"
