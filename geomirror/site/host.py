"""The site's side of the guest's network: the TAP device that carries the guest's traffic
to the uplink, with the guest's gateway address and the gateway MAC both sites share; and,
at the site that does not run the guest, the route that forwards the guest's traffic to the
peer over the inter-site link (make before break: nothing that still arrives here is lost)."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = structlog.get_logger(__name__)

TAP_NAME = "gm-guest0"
GATEWAY_MAC = "02:47:4d:00:00:01"  # the same at both sites: the guest's ARP entry survives failover


def configure_tap(name: str, gateway: str, prefixlen: int, up: bool) -> None:
    """Give the site-side TAP the guest gateway address (or take it away). Blocking."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=idx, address=GATEWAY_MAC)
        have = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)]
        # two callers may race here (the primary/standby side and the route applier, each from a
        # thread): an address already added or already gone is what was wanted
        if up:
            if gateway not in have:
                _tolerate(errno.EEXIST, ip.addr, "add", index=idx, address=gateway, prefixlen=prefixlen)
            ip.link("set", index=idx, state="up")
        else:
            ip.link("set", index=idx, state="down")
            if gateway in have:
                _tolerate(errno.EADDRNOTAVAIL, ip.addr, "del", index=idx, address=gateway, prefixlen=prefixlen)


def _tolerate(code: int, fn, *args, **kw) -> None:
    try:
        fn(*args, **kw)
    except NetlinkError as e:
        if e.code != code:
            raise


async def set_tap(cfg, up: bool) -> None:
    """Bring the guest's gateway up at this site (the guest runs here) or down (it does not)."""
    g = cfg.guest
    await asyncio.to_thread(configure_tap, TAP_NAME, str(g.gateway), g.prefix.prefixlen, up)


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


def apply_guest_route(mode: str, prefixes: list[tuple[str, int]], peer: str, tap: str, gateway: str) -> str | None:
    """Carry out a route mode (geomirror.ha.GUEST_ROUTE_*) for the guest's prefixes. Blocking.

    here: our forward routes go, the TAP carries the gateway (its connected route wins);
    peer: the TAP's gateway goes (so its connected route does) and each prefix is routed via the
          peer's inter-site address; strict rp_filter on that link is made loose;
    none: neither (no loop between the sites while nobody is known to run the guest).
    Returns the interface whose rp_filter was loosened, if any."""
    plen = prefixes[0][1]
    if mode == "here":
        configure_tap(tap, gateway, plen, True)
    else:
        configure_tap(tap, gateway, plen, False)
    loosened = None
    with IPRoute() as ip:
        for dst, dst_len in prefixes:
            if mode == "peer":
                ip.route("replace", dst=dst, dst_len=dst_len, gateway=peer, proto=ROUTE_PROTO)
            else:  # the kernel matches the protocol too: only our route goes, never the TAP's
                try:
                    ip.route("del", dst=dst, dst_len=dst_len, proto=ROUTE_PROTO)
                except NetlinkError as e:
                    if e.code != errno.ESRCH:  # none there: nothing to do
                        raise
        if mode == "peer":
            loosened = _rp_filter_loose(ip, peer)
    return loosened


class GuestRoutes:
    """The `RouteApplier` of a site: its guest prefixes, the TAP, the peer's inter-site address."""

    def __init__(self, cfg):
        g = cfg.guest
        self.prefixes = [(str(g.prefix.network_address), g.prefix.prefixlen)]  # one entry per address family
        self.peer = str(cfg.peer.address)
        self.gateway = str(g.gateway)
        self.site = cfg.site.name

    async def apply(self, mode: str) -> None:
        loosened = await asyncio.to_thread(apply_guest_route, mode, self.prefixes, self.peer, TAP_NAME, self.gateway)
        if loosened:
            log.info("guest.rp_filter_loosened", site=self.site, interface=loosened,
                     why="forwarded guest traffic arrives from the peer with a client's source address")
