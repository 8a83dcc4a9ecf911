"""The site's BGP speaker (ExaBGP) and what it tells the HA machine: which upstream
sessions are up, and whether the upstream still gives us the guest prefix originated by the
peer's AS (the peer is alive somewhere). A dual-stack guest's IPv6 prefix goes over the same
IPv4 sessions (MP-BGP), each with that link's `next_hop6`."""

from __future__ import annotations

import time
from typing import Callable

from bgp.config import family_of
from bgp.speaker import Neighbor, Speaker
from geomirror import ha


async def start_speaker(cfg, feed: Callable[[object], None], mark=None) -> Speaker | None:
    """Start ExaBGP for this site (None with BGP off); its changes are fed as HA events.
    `mark(event, **fields)`: the timeline, told which ASes originate the guest prefix we receive."""
    b = cfg.bgp
    if not b.enabled:
        return None
    neighbors = [Neighbor(address=str(n.address), peer_as=n.peer_as,
                          local_address=str(n.local_address) if n.local_address else None,
                          hold_time=b.hold_time, next_hop6=str(n.next_hop6) if n.next_hop6 else None)
                 for n in b.neighbors]
    speaker = Speaker(router_id=str(cfg.site.router_id), local_as=cfg.site.asn, neighbors=neighbors,
                      run_dir=cfg.site.run_dir / "bgp", families=families(cfg))
    speaker.on_change = BgpWatch(cfg, speaker, feed, mark).changed
    await speaker.start()
    return speaker


def guest_prefixes(cfg) -> list[str]:
    """The prefixes the site announces for its guest: the IPv4 one, then the IPv6 one if set."""
    g = cfg.guest
    return [str(g.prefix)] + ([str(g.prefix6)] if g.prefix6 is not None else [])


def families(cfg) -> tuple[str, ...]:
    """The address families every BGP session negotiates (IPv6 only for a dual-stack guest)."""
    return tuple(family_of(p) for p in guest_prefixes(cfg))


class BgpWatch:
    """Turns the speaker's state into HA events, each change once; and marks on the timeline when
    the origins of the guest prefix upstream sends us change (`bgp.route_seen`: routing's own view
    of where the guest is, which a drill times)."""

    def __init__(self, cfg, speaker: Speaker, feed, mark=None):
        self.cfg, self.speaker, self.feed, self.mark = cfg, speaker, feed, mark
        self.up: set[str] = set()
        self.peer_route: tuple[bool, bool] | None = None  # the peer's route for (any, every) guest prefix
        self.origins: list[int] | None = None

    def changed(self) -> None:
        sp = self.speaker
        now_up = {n for n, st in sp.neighbor_states.items() if st == "up"}
        now = time.monotonic()
        for n in now_up - self.up:
            self.feed(ha.BgpNeighborUp(n, now))
        for n in self.up - now_up:
            self.feed(ha.BgpNeighborDown(n, now))
        self.up = now_up
        b, peer_as = self.cfg.bgp, self.cfg.peer.asn
        paths = [r.as_path for r in sp.received_routes(str(self.cfg.guest.prefix)) if r.as_path]
        origins = sorted({p[-1] for p in paths if not is_backup_path(p, b.standby_prepend)})
        if origins != self.origins:
            self.origins = origins
            if self.mark is not None:
                backup = sorted({p[-1] for p in paths if is_backup_path(p, b.standby_prepend)})
                self.mark("bgp.route_seen", prefix=str(self.cfg.guest.prefix), origins=origins, backup=backup)
        if peer_as:
            each = [any(p[-1] == peer_as and not is_backup_path(p, b.standby_prepend)
                        for p in ([r.as_path for r in sp.received_routes(prefix) if r.as_path]))
                    for prefix in guest_prefixes(self.cfg)]
            seen = (any(each), all(each))
            if seen != self.peer_route:
                self.peer_route = seen
                self.feed(ha.PeerRouteSeen(*seen))


def origin_run(path) -> int:
    """How many times the origin AS stands at the end of an AS path (1 + its prepends)."""
    n = 0
    for asn in reversed(path):
        if asn != path[-1]:
            break
        n += 1
    return n


def is_backup_path(path, standby_prepend: int) -> bool:
    """Whether an AS path is a standby's pre-announcement (its origin prepended standby_prepend
    times or more; both sites use the same [bgp] prepends) rather than the route of the site that
    runs the guest. Without pre-announcement (standby_prepend 0) no path is a backup."""
    return bool(standby_prepend) and bool(path) and origin_run(path) >= 1 + standby_prepend
