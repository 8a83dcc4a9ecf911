"""The site's side of the guest's network: the TAP device that carries the guest's traffic
to the uplink, with the guest's gateway addresses (IPv4, and IPv6 for a dual-stack guest) and
the gateway MAC both sites share."""

from __future__ import annotations

import asyncio
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ifaddrmsg import IFA_F_NODAD

TAP_NAME = "gm-guest0"
# the same at both sites: the guest's ARP entry (IPv4) and neighbour entry (IPv6) for its
# gateway survive failover, and the new site answers ARP and neighbour solicitations with it
GATEWAY_MAC = "02:47:4d:00:00:01"


def configure_tap(name: str, gateway: str, prefixlen: int, up: bool,
                  gateway6: str | None = None, prefixlen6: int | None = None) -> None:
    """Give the site-side TAP the guest gateway addresses (or take them away). Blocking.

    The IPv6 gateway is added without duplicate address detection (the address is ours by
    configuration; DAD would hold it tentative for a second after a takeover) and after the
    link is up; it is removed before the link goes down (the kernel flushes IPv6 addresses of a
    link that goes down, so removing it afterwards would find nothing)."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=idx, address=GATEWAY_MAC)
        have = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)]
        if up:
            if gateway not in have:
                ip.addr("add", index=idx, address=gateway, prefixlen=prefixlen)
            ip.link("set", index=idx, state="up")
            if gateway6 is not None and gateway6 not in have:
                ip.addr("add", index=idx, family=socket.AF_INET6, address=gateway6, prefixlen=prefixlen6,
                        flags=IFA_F_NODAD)
        else:
            if gateway6 is not None and gateway6 in have:
                ip.addr("del", index=idx, family=socket.AF_INET6, address=gateway6, prefixlen=prefixlen6)
            ip.link("set", index=idx, state="down")
            if gateway in have:
                ip.addr("del", index=idx, address=gateway, prefixlen=prefixlen)


def tap_args(cfg, up: bool) -> tuple:
    """The arguments of `configure_tap` for this site's guest (pure)."""
    g = cfg.guest
    six = (str(g.gateway6), g.prefix6.prefixlen) if g.prefix6 is not None else (None, None)
    return (TAP_NAME, str(g.gateway), g.prefix.prefixlen, up, *six)


async def set_tap(cfg, up: bool) -> None:
    """Bring the guest's gateway up at this site (the guest runs here) or down (it does not)."""
    await asyncio.to_thread(configure_tap, *tap_args(cfg, up))
