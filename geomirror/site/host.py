"""The site's side of the guest's network: the TAP device that carries the guest's traffic
to the uplink, with the guest's gateway addresses (IPv4, and IPv6 for a dual-stack guest) and
the gateway MAC both sites share; and, at the site that does not run the guest, the routes that
forward the guest's traffic to the peer over the inter-site link (make before break: nothing
that still arrives here is lost)."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

log = structlog.get_logger(__name__)

TAP_NAME = "gm-guest0"
# the same at both sites: the guest's ARP entry (IPv4) and neighbour entry (IPv6) for its
# gateway survive failover, and the new site answers ARP and neighbour solicitations with it
GATEWAY_MAC = "02:47:4d:00:00:01"
_TAP_LOCK = threading.Lock()  # one change of the TAP at a time (callers run in worker threads)


def configure_tap(name: str, gateway: str, prefixlen: int, up: bool,
                  gateway6: str | None = None, prefixlen6: int | None = None) -> None:
    """Give the site-side TAP the guest gateway addresses (or take them away). Blocking.

    The IPv6 gateway is added without duplicate address detection (the address is ours by
    configuration; DAD would hold it tentative for a second after a takeover) and after the
    link is up; it is removed before the link goes down (the kernel flushes IPv6 addresses of a
    link that goes down, so removing it afterwards would find nothing)."""
    with _TAP_LOCK, IPRoute() as ip:
        idx = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=idx, address=GATEWAY_MAC)
        have = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)]
        # two callers (the primary/standby side and the route applier, each from a thread) are
        # serialised by _TAP_LOCK; an address already added or already gone (by someone else,
        # e.g. the kernel flushing IPv6 on link down) is what was wanted
        if up:
            if gateway not in have:
                _tolerate(errno.EEXIST, ip.addr, "add", index=idx, address=gateway, prefixlen=prefixlen)
            ip.link("set", index=idx, state="up")
            if gateway6 is not None and gateway6 not in have:
                _tolerate(errno.EEXIST, ip.addr, "add", index=idx, family=socket.AF_INET6, address=gateway6,
                          prefixlen=prefixlen6, flags=IFA_F_NODAD)
        else:
            if gateway6 is not None and gateway6 in have:
                _tolerate(errno.EADDRNOTAVAIL, ip.addr, "del", index=idx, family=socket.AF_INET6,
                          address=gateway6, prefixlen=prefixlen6)
            ip.link("set", index=idx, state="down")
            if gateway in have:
                _tolerate(errno.EADDRNOTAVAIL, ip.addr, "del", index=idx, address=gateway, prefixlen=prefixlen)


def _tolerate(code: int, fn, *args, **kw) -> None:
    try:
        fn(*args, **kw)
    except NetlinkError as e:
        if e.code != code:
            raise


def tap_args(cfg, up: bool) -> tuple:
    """The arguments of `configure_tap` for this site's guest (pure)."""
    g = cfg.guest
    six = (str(g.gateway6), g.prefix6.prefixlen) if g.prefix6 is not None else (None, None)
    return (TAP_NAME, str(g.gateway), g.prefix.prefixlen, up, *six)


async def set_tap(cfg, up: bool) -> None:
    """Bring the guest's gateway up at this site (the guest runs here) or down (it does not)."""
    await asyncio.to_thread(configure_tap, *tap_args(cfg, up))


# ---------------------------------------------------------------- where the guest's traffic goes
ROUTE_PROTO = 71  # rtnetlink protocol of the routes this daemon manages (not a standard one): found again by it


def _rp_filter_loose(ip: IPRoute, peer: str) -> str | None:
    """Forwarded guest traffic arrives from the peer on the inter-site link with a client's source
    address, which this site reaches through its uplink: strict reverse-path filtering (1) drops
    it. Make the inter-site interface loose (2) when its effective mode is strict. Returns the
    interface name changed, else None."""
    oif = ip.route("get", dst=peer)[0].get_attr("RTA_OIF")
    name = ip.get_links(oif)[0].get_attr("IFLA_IFNAME")
    base = Path("/proc/sys/net/ipv4/conf")
    eff = max(int((base / "all" / "rp_filter").read_text()), int((base / name / "rp_filter").read_text()))
    if eff != 1:
        return None
    (base / name / "rp_filter").write_text("2\n")
    return name


def apply_guest_route(mode: str, routes: list[tuple[int, str, int, str | None]], tap_up: tuple,
                      tap_down: tuple, peer: str) -> str | None:
    """Carry out a route mode (geomirror.ha.GUEST_ROUTE_*) for the guest's prefixes. Blocking.

    `routes` are (family, network, prefixlen, the peer's inter-site address of that family or
    None); `tap_up`/`tap_down` the `configure_tap` arguments (both gateways, dual stack).
    here: our forward routes go, the TAP carries the gateways (their connected routes win);
    peer: the TAP's gateways go (so their connected routes do) and each prefix with a peer
          address of its family is routed via it;
    none: neither (no loop between the sites while nobody is known to run the guest).
    In both here and peer, strict rp_filter on the link to the peer is made loose.
    Returns the interface whose rp_filter was loosened, if any."""
    configure_tap(*(tap_up if mode == "here" else tap_down))
    loosened = None
    with IPRoute() as ip:
        for family, dst, dst_len, via in routes:
            if mode == "peer" and via is not None:
                ip.route("replace", family=family, dst=dst, dst_len=dst_len, gateway=via, proto=ROUTE_PROTO)
            else:  # the kernel matches the protocol too: only our route goes, never the TAP's
                try:
                    ip.route("del", family=family, dst=dst, dst_len=dst_len, proto=ROUTE_PROTO)
                except NetlinkError as e:
                    if e.code != errno.ESRCH:  # none there: nothing to do
                        raise
        if mode != "none":  # IPv6 has no rp_filter: only IPv4 needs loosening
            # here too: the peer forwards stray traffic to the site that runs the guest (a
            # draining old site, a standby that pre-announces)
            loosened = _rp_filter_loose(ip, peer)
    return loosened


def guest_route_table(cfg) -> list[tuple[int, str, int, str | None]]:
    """The guest's prefixes with the peer's inter-site address of each family (pure)."""
    g, p = cfg.guest, cfg.peer
    out = [(socket.AF_INET, str(g.prefix.network_address), g.prefix.prefixlen, str(p.address))]
    if g.prefix6 is not None:
        out.append((socket.AF_INET6, str(g.prefix6.network_address), g.prefix6.prefixlen,
                    str(p.address6) if p.address6 is not None else None))
    return out


class GuestRoutes:
    """The `RouteApplier` of a site: its guest prefixes, the TAP, the peer's inter-site addresses."""

    def __init__(self, cfg):
        self.routes = guest_route_table(cfg)
        self.tap_up, self.tap_down = tap_args(cfg, True), tap_args(cfg, False)
        self.peer = str(cfg.peer.address)
        self.site = cfg.site.name
        if cfg.guest.prefix6 is not None and cfg.peer.address6 is None:
            log.warning("guest.no_ipv6_forwarding", site=self.site,
                        why="peer.address6 is not set: stray IPv6 traffic for the guest is not forwarded to the "
                            "peer during a planned move")

    async def apply(self, mode: str) -> None:
        loosened = await asyncio.to_thread(apply_guest_route, mode, self.routes, self.tap_up, self.tap_down,
                                           self.peer)
        if loosened:
            log.info("guest.rp_filter_loosened", site=self.site, interface=loosened,
                     why="forwarded guest traffic arrives from the peer with a client's source address")
