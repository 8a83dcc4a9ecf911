"""ExaBGP 5 configuration, environment and API commands for one site (pure: values in, text out).

Every value that reaches ExaBGP's configuration or its API is validated here, so a name or
an address can never smuggle a `;`, a brace or a second command into what ExaBGP parses.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Neighbor", "Policy", "render_exabgp_config", "exabgp_env", "announce_command", "withdraw_command",
           "policy_commands", "withdraw_commands", "drain_policy", "drain_commands", "family_of",
           "check_community", "check_large_community", "PROCESS_NAME", "MAX_PREPEND", "GRACEFUL_SHUTDOWN"]

PROCESS_NAME = "geomirror"
MAX_PREPEND = 8
FAMILIES = {"ipv4 unicast": 4, "ipv6 unicast": 6}
# RFC 8326: routers receiving it lower the route's preference (local-pref 0), so they move to
# another path before the route is withdrawn
GRACEFUL_SHUTDOWN = "65535:0"
_COMMUNITY = re.compile(r"^(\d{1,5}):(\d{1,5})$")
_LARGE_COMMUNITY = re.compile(r"^(\d{1,10}):(\d{1,10}):(\d{1,10})$")
# characters ExaBGP's tokeniser treats specially even inside quotes (quotes, escapes) or that end a line
_ARG_FORBIDDEN = re.compile(r"[\"'\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Neighbor:
    """One upstream BGP router this site peers with."""
    address: str
    peer_as: int
    local_address: str | None = None
    hold_time: int = 9
    # our IPv6 address on this upstream link: the next hop of IPv6 routes sent over this (IPv4)
    # session with MP-BGP. ExaBGP's `next-hop self` has no IPv6 address on an IPv4 session.
    next_hop6: str | None = None


@dataclass(frozen=True)
class Policy:
    """The attributes of one announcement (active, standby pre-announcement or drain)."""
    med: int | None = None
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    prepend: int = 0


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


def family_of(prefix) -> str:
    """The address family ("ipv4 unicast" / "ipv6 unicast") of a prefix."""
    try:
        net = ipaddress.ip_network(str(prefix), strict=True)
    except ValueError as e:
        raise ValueError(f"prefix {prefix!r} is not a network address: {e}") from None
    return "ipv6 unicast" if net.version == 6 else "ipv4 unicast"


def check_community(c) -> str:
    """A standard community `ASN:VALUE` (each 0..65535), or ValueError naming it."""
    m = _COMMUNITY.match(c) if isinstance(c, str) else None
    if not m or int(m.group(1)) > 65535 or int(m.group(2)) > 65535:
        raise ValueError(f"community {c!r} is not ASN:VALUE (each 0..65535)")
    return c


def check_large_community(c) -> str:
    """A large community `GLOBAL:LOCAL1:LOCAL2` (RFC 8092, each 0..4294967295), or ValueError naming it."""
    m = _LARGE_COMMUNITY.match(c) if isinstance(c, str) else None
    if not m or any(int(g) > 4294967295 for g in m.groups()):
        raise ValueError(f"large community {c!r} is not ASN:VALUE:VALUE (each 0..4294967295)")
    return c


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
                         process_argv: list[str], family: str = "ipv4 unicast",
                         families: tuple[str, ...] | list[str] | None = None) -> str:
    """ExaBGP 5 config: one neighbor block per upstream (graceful restart off), every
    neighbour change and parsed received update to our API process, which speaks JSON.
    `families` (default: just `family`) are negotiated on each session: with "ipv6 unicast"
    the IPv6 routes go over the same IPv4 session (MP-BGP), so every neighbour needs `next_hop6`."""
    rid = _ip(router_id, "router id")
    if ipaddress.ip_address(rid).version != 4:
        raise ValueError(f"router id {router_id!r} must be an IPv4 address")
    _asn(local_as, "local AS")
    fams = [family] if families is None else list(families)
    if not fams or len(set(fams)) != len(fams):
        raise ValueError(f"address families {fams!r} must be one or more, each once")
    for f in fams:
        _family(f)
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
        if "ipv6 unicast" in fams:
            _next_hop6(n)
        out += [f"    local-as {local_as};",
                f"    peer-as {_asn(n.peer_as, 'peer AS')};",
                f"    hold-time {_hold_time(n.hold_time)};",
                f"    family {{ {' '.join(f + ';' for f in fams)} }}",
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


def _next_hop6(n: Neighbor) -> str:
    if n.next_hop6 is None:
        raise ValueError(f"neighbour {n.address} has no IPv6 next hop (next_hop6): IPv6 routes over its "
                         "IPv4 session need our IPv6 address on that link")
    nh = ipaddress.ip_address(_ip(n.next_hop6, f"IPv6 next hop of neighbour {n.address}"))
    if nh.version != 6 or nh.is_link_local or nh.is_multicast or nh.is_unspecified:
        raise ValueError(f"IPv6 next hop {n.next_hop6!r} of neighbour {n.address} must be a global "
                         "unicast IPv6 address")
    return str(nh)


def announce_command(prefix: str, *, local_as: int, med: int | None = None, communities=(),
                     prepend: int = 0, family: str = "ipv4 unicast", large_communities=(),
                     next_hop: str | None = None, neighbor: str | None = None) -> str:
    """`announce route …` for ExaBGP's API; `prepend` = extra copies of our AS on the wire.
    `next_hop` None = `next-hop self` (IPv4 only: ExaBGP has no IPv6 "self" on an IPv4 session);
    `neighbor` limits the command to that one session (ExaBGP's `neighbor X announce …`)."""
    parts = [_route("announce", prefix, family, next_hop, neighbor)]
    if med is not None:
        if isinstance(med, bool) or not isinstance(med, int) or not 0 <= med <= 4294967295:
            raise ValueError(f"MED {med!r} must be an integer 0..4294967295")
        parts.append(f"med {med}")
    comms = _list(communities, "communities", "ASN:VALUE")
    for c in comms:
        check_community(c)
    if comms:
        parts.append(f"community [ {' '.join(comms)} ]")
    large = _list(large_communities, "large communities", "ASN:VALUE:VALUE")
    for c in large:
        check_large_community(c)
    if large:
        parts.append(f"large-community [ {' '.join(large)} ]")
    if isinstance(prepend, bool) or not isinstance(prepend, int) or not 0 <= prepend <= MAX_PREPEND:
        raise ValueError(f"prepend {prepend!r} must be 0..{MAX_PREPEND}")
    if prepend:
        path = _as_path_for_prepend(_asn(local_as, "local AS"), prepend)
        parts.append(f"as-path [ {' '.join(map(str, path))} ]")
    return " ".join(parts)


def _list(values, what: str, form: str) -> list:
    if isinstance(values, str):
        raise ValueError(f"{what} must be a list of {form} strings, not the string {values!r}")
    return list(dict.fromkeys(values))  # once each, in the given order


def _route(verb: str, prefix, family: str, next_hop, neighbor) -> str:
    p = _prefix(prefix, family)
    if next_hop is None:
        if _family(family) == 6:
            raise ValueError(f"IPv6 prefix {p} needs an explicit IPv6 next hop (ExaBGP's next-hop self "
                             "is an IPv4 address on an IPv4 session)")
        nh = "self"
    else:
        nh = _ip(next_hop, "next hop")
        if ipaddress.ip_address(nh).version != _family(family):
            raise ValueError(f"next hop {nh} is not in the address family of prefix {p}")
    sel = "" if neighbor is None else f"neighbor {_ip(neighbor, 'neighbour address')} "
    return f"{sel}{verb} route {p} next-hop {nh}"


def withdraw_command(prefix: str, *, family: str = "ipv4 unicast", next_hop: str | None = None,
                     neighbor: str | None = None) -> str:
    return _route("withdraw", prefix, family, next_hop, neighbor)


def policy_commands(prefix: str, policy: Policy, *, local_as: int, neighbors: list[Neighbor]) -> list[str]:
    """The API commands that announce `prefix` with `policy`: one `next-hop self` command for an
    IPv4 prefix; for an IPv6 prefix one per neighbour, each with that link's `next_hop6`."""
    kw = dict(local_as=local_as, med=policy.med, communities=policy.communities,
              large_communities=policy.large_communities, prepend=policy.prepend)
    fam = family_of(prefix)
    if fam == "ipv4 unicast":
        return [announce_command(prefix, family=fam, **kw)]
    return [announce_command(prefix, family=fam, next_hop=_next_hop6(n), neighbor=n.address, **kw)
            for n in _need(neighbors)]


def withdraw_commands(prefix: str, *, neighbors: list[Neighbor]) -> list[str]:
    """The API commands that withdraw `prefix` (the counterpart of `policy_commands`)."""
    fam = family_of(prefix)
    if fam == "ipv4 unicast":
        return [withdraw_command(prefix, family=fam)]
    return [withdraw_command(prefix, family=fam, next_hop=_next_hop6(n), neighbor=n.address)
            for n in _need(neighbors)]


def _need(neighbors: list[Neighbor]) -> list[Neighbor]:
    if not neighbors:
        raise ValueError("no neighbour: an IPv6 route needs a neighbour's next_hop6")
    return list(neighbors)


def drain_policy(policy: Policy, communities=(), large_communities=()) -> Policy:
    """`policy` plus GRACEFUL_SHUTDOWN (65535:0, RFC 8326) and any extra drain communities: the
    re-announcement a site makes before it withdraws in a planned move, so routers prefer the
    other site's route while this one is still there. Idempotent."""
    comms = tuple(check_community(c) for c in _list([*policy.communities, GRACEFUL_SHUTDOWN, *communities],
                                                    "communities", "ASN:VALUE"))
    large = tuple(check_large_community(c) for c in _list([*policy.large_communities, *large_communities],
                                                          "large communities", "ASN:VALUE:VALUE"))
    return Policy(med=policy.med, communities=comms, large_communities=large, prepend=policy.prepend)


def drain_commands(prefix: str, policy: Policy, *, local_as: int, neighbors: list[Neighbor]) -> list[str]:
    """The API commands that re-announce `prefix` drained (see `drain_policy`)."""
    return policy_commands(prefix, drain_policy(policy), local_as=local_as, neighbors=neighbors)
