"""The site's BGP speaker (ExaBGP) and what it tells the HA machine: which upstream
sessions are up, and whether the upstream still gives us the guest prefix originated by the
peer's AS (the peer is alive somewhere)."""

from __future__ import annotations

import time
from typing import Callable

from bgp.speaker import Neighbor, Speaker
from geomirror import ha


async def start_speaker(cfg, feed: Callable[[object], None]) -> Speaker | None:
    """Start ExaBGP for this site (None with BGP off); its changes are fed as HA events."""
    b = cfg.bgp
    if not b.enabled:
        return None
    neighbors = [Neighbor(address=str(n.address), peer_as=n.peer_as,
                          local_address=str(n.local_address) if n.local_address else None,
                          hold_time=b.hold_time) for n in b.neighbors]
    speaker = Speaker(router_id=str(cfg.site.router_id), local_as=cfg.site.asn, neighbors=neighbors,
                      run_dir=cfg.site.run_dir / "bgp")
    speaker.on_change = BgpWatch(cfg, speaker, feed).changed
    await speaker.start()
    return speaker


class BgpWatch:
    """Turns the speaker's state into HA events, each change once."""

    def __init__(self, cfg, speaker: Speaker, feed):
        self.cfg, self.speaker, self.feed = cfg, speaker, feed
        self.up: set[str] = set()
        self.peer_route: bool | None = None

    def changed(self) -> None:
        sp = self.speaker
        now_up = {n for n, st in sp.neighbor_states.items() if st == "up"}
        now = time.monotonic()
        for n in now_up - self.up:
            self.feed(ha.BgpNeighborUp(n, now))
        for n in self.up - now_up:
            self.feed(ha.BgpNeighborDown(n, now))
        self.up = now_up
        peer_as = self.cfg.peer.asn
        if peer_as:
            seen = any(r.as_path and r.as_path[-1] == peer_as
                       for r in sp.received_routes(str(self.cfg.guest.prefix)))
            if seen != self.peer_route:
                self.peer_route = seen
                self.feed(ha.PeerRouteSeen(seen))
