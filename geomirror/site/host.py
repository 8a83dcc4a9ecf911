"""The site's side of the guest's network: the TAP device that carries the guest's traffic
to the uplink, with the guest's gateway address and the gateway MAC both sites share."""

from __future__ import annotations

import asyncio

from pyroute2 import IPRoute

TAP_NAME = "gm-guest0"
GATEWAY_MAC = "02:47:4d:00:00:01"  # the same at both sites: the guest's ARP entry survives failover


def configure_tap(name: str, gateway: str, prefixlen: int, up: bool) -> None:
    """Give the site-side TAP the guest gateway address (or take it away). Blocking."""
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=name)[0]
        ip.link("set", index=idx, address=GATEWAY_MAC)
        have = [a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)]
        if up:
            if gateway not in have:
                ip.addr("add", index=idx, address=gateway, prefixlen=prefixlen)
            ip.link("set", index=idx, state="up")
        else:
            ip.link("set", index=idx, state="down")
            if gateway in have:
                ip.addr("del", index=idx, address=gateway, prefixlen=prefixlen)


async def set_tap(cfg, up: bool) -> None:
    """Bring the guest's gateway up at this site (the guest runs here) or down (it does not)."""
    g = cfg.guest
    await asyncio.to_thread(configure_tap, TAP_NAME, str(g.gateway), g.prefix.prefixlen, up)
