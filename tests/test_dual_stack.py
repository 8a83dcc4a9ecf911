"""Dual stack: the guest's IPv6 prefix travels with it.

Unit tests for the pure parts (the lab's BIRD config, the site's prefixes, families and TAP
arguments from the lab configs); one lab test with real BIRD, ExaBGP and QEMU: an IPv6 client
connection carries on across the loss of site A, and BIRD holds the /48 from AS 64502 after.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time

import pytest

from geomirror.config import load_site
from geomirror.site.host import GATEWAY_MAC, TAP_NAME, tap_args
from bgp.speaker import ReceivedRoute
from geomirror import ha
from geomirror.site.routing import BgpWatch, families, guest_prefixes
from lab import cli as labcli, world
from tests import torture
from tests.test_bgp_failover import wait_for

AS_A, AS_B = 64501, 64502


# ---------------------------------------------------------------- pure parts


def test_lab_bird_config_carries_the_48_over_each_ipv4_session():
    conf = world.bird_config("bgp", None)
    for site, asn in world.SITE_AS.items():
        block = next(ln for ln in conf.splitlines() if f"neighbor {world.SITE_UPLINK[site]} as {asn}" in ln)
        assert f"ipv4 {{ import filter gshut; export where net = {world.GUEST_PREFIX}; }}" in block
        assert (f"ipv6 {{ import filter gshut; export where net = {world.GUEST_PREFIX6}; "
                f"next hop address {world.INET_SIDE6[site]}; }}") in block
    assert "protocol kernel { ipv6 {" in conf
    assert "lab_static6" not in conf
    static = world.bird_config("static", "site-b")
    assert f"route {world.GUEST_PREFIX6} via {world.SITE_UPLINK6['site-b']};" in static


@pytest.mark.skipif(shutil.which("bird") is None, reason="bird is not installed")
@pytest.mark.parametrize("routing,site", [("bgp", None), ("static", "site-a")])
def test_lab_bird_config_is_accepted_by_bird(tmp_path, routing, site):
    conf = tmp_path / "bird.conf"
    conf.write_text(world.bird_config(routing, site))
    r = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_lab_ipv6_addresses_are_where_design_puts_them():
    import ipaddress

    links6 = ipaddress.ip_network("2001:db8:18::/48")
    for ln in world.LINKS:
        for addr in (ln.addr6_a, ln.addr6_b):
            iface = ipaddress.ip_interface(addr)
            assert iface.ip in links6 or iface.ip in ipaddress.ip_network("2001:db8:10::/64"), addr
    for site in world.SITES:
        nb = load_site(world.repo_configs() / f"{site}.toml").bgp.neighbors[0]
        assert str(nb.next_hop6) == world.SITE_UPLINK6[site]  # what the site announces is BIRD's neighbour
    assert ipaddress.ip_address(world.CLIENT_ADDR6) in ipaddress.ip_network("2001:db8:10::/64")
    assert ipaddress.ip_address(world.GUEST_ADDR6) in ipaddress.ip_network(world.GUEST_PREFIX6)


# `birdc show route for 2001:db8:100::/48 all` in the lab with site A active (BIRD 2.0.12)
BIRD_SHOW_48 = """\
BIRD 2.0.12 ready.
Table master6:
2001:db8:100::/48    unicast [site_a 06:33:15.198 from 198.18.1.2] * (100) [AS64501i]
\tvia 2001:db8:18:1::2 on to-a
\tType: BGP univ
\tBGP.origin: IGP
\tBGP.as_path: 64501
\tBGP.next_hop: 2001:db8:18:1::2
\tBGP.local_pref: 100
"""


def test_parse_bird_routes_reads_the_48():
    assert world.parse_bird_routes(BIRD_SHOW_48) == [
        {"proto": "site_a", "best": True, "via": "2001:db8:18:1::2", "as_path": [AS_A]}]


# the same route as BIRD's control socket sends it (what birdc reads), then the end of the reply
BIRD_SOCKET_48 = [
    "1007-Table master6:",
    " 2001:db8:100::/48    unicast [site_a 06:33:15.198 from 198.18.1.2] * (100) [AS64501i]",
    " \tvia 2001:db8:18:1::2 on to-a",
    "1008-\tType: BGP univ",
    "1012-\tBGP.origin: IGP",
    " \tBGP.as_path: 64501",
    " \tBGP.next_hop: 2001:db8:18:1::2",
    " \tBGP.local_pref: 100",
    "0000 ",
]


def test_bird_reply_text_is_what_birdc_prints():
    assert world.bird_reply_text(BIRD_SOCKET_48) == BIRD_SHOW_48.split("\n", 1)[1]


def _fake_bird(path, replies: dict[str, list[str]], greeting: str = "0001 BIRD 2.0.12 ready.") -> threading.Thread:
    """A Unix socket at `path` that greets like BIRD and answers each command line from `replies`."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def serve():
        conn, _ = srv.accept()
        with conn, srv, conn.makefile("r") as f:
            conn.sendall((greeting + "\n").encode())
            for line in f:
                conn.sendall("".join(r + "\n" for r in replies[line.strip()]).encode())

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_bird_control_reads_routes_and_no_route_over_one_connection(tmp_path):
    _fake_bird(tmp_path / "b.ctl", {
        f"show route for {world.GUEST_PREFIX6} all": BIRD_SOCKET_48,
        f"show route for {world.GUEST_PREFIX} all": ["8001 Network not found"],
        "show bogus": ["9001 syntax error, unexpected CF_SYM_UNDEFINED"]})
    b = world.BirdControl(tmp_path / "b.ctl")
    try:
        for _ in range(2):  # the connection stays usable from one query to the next
            assert b.guest_routes(world.GUEST_PREFIX6) == [
                {"proto": "site_a", "best": True, "via": "2001:db8:18:1::2", "as_path": [AS_A]}]
            assert b.guest_routes(world.GUEST_PREFIX) == []
        assert b.reply("show bogus") == (9001, "syntax error, unexpected CF_SYM_UNDEFINED\n")
    finally:
        b.close()


def test_bird_control_refuses_what_is_not_bird(tmp_path):
    _fake_bird(tmp_path / "b.ctl", {}, greeting="HTTP/1.1 400 Bad Request")
    with pytest.raises(world.LabError, match="b.ctl greeted with"):
        world.BirdControl(tmp_path / "b.ctl")
    with pytest.raises(world.LabError, match="does not answer"):
        world.BirdControl(tmp_path / "none.ctl")


def test_lab_site_configs_are_dual_stack():
    for site in world.SITES:
        cfg = load_site(world.repo_configs() / f"{site}.toml")
        assert not cfg.warnings
        assert guest_prefixes(cfg) == [world.GUEST_PREFIX, world.GUEST_PREFIX6]
        assert families(cfg) == ("ipv4 unicast", "ipv6 unicast")
        assert tap_args(cfg, True) == (TAP_NAME, "198.51.100.1", 24, True, "2001:db8:100::1", 48)
        assert tap_args(cfg, False)[3] is False
        assert str(cfg.guest.address6) == world.GUEST_ADDR6


def test_an_ipv4_only_site_keeps_one_prefix_and_one_family(tmp_path):
    text = (world.repo_configs() / "site-a.toml").read_text()
    for line in ('prefix6 = "2001:db8:100::/48"\n', 'address6 = "2001:db8:100::10"\n',
                 'gateway6 = "2001:db8:100::1"\n'):
        text = text.replace(line, "")
    (tmp_path / "site-a.toml").write_text(text)
    cfg = load_site(tmp_path / "site-a.toml")
    assert guest_prefixes(cfg) == [world.GUEST_PREFIX]
    assert families(cfg) == ("ipv4 unicast",)
    assert tap_args(cfg, True) == (TAP_NAME, "198.51.100.1", 24, True, None, None)


class RoutesSpeaker:
    """What BgpWatch reads of the speaker: neighbour states and received routes."""

    def __init__(self, routes):
        self.neighbor_states = {"198.18.1.1": "up"}
        self.routes = routes

    def received_routes(self, prefix):
        return [r for r in self.routes if r.prefix == prefix]


def test_the_peer_route_is_seen_from_either_guest_prefix_and_a_drain_ends_on_both():
    cfg = load_site(world.repo_configs() / "site-a.toml")
    events = []
    v4, v6 = (ReceivedRoute("198.18.1.1", p, (64500, AS_B), None) for p in (world.GUEST_PREFIX, world.GUEST_PREFIX6))
    for routes, seen in (([v6], (True, False)),
                         ([v4], (True, False)),
                         ([v4, v6], (True, True)),
                         ([ReceivedRoute("198.18.1.1", world.GUEST_PREFIX6, (64500, AS_A), None)], (False, False)),
                         ([], (False, False))):
        events.clear()
        BgpWatch(cfg, RoutesSpeaker(routes), events.append).changed()
        assert [(e.originated_by_peer, e.drain_done) for e in events if isinstance(e, ha.PeerRouteSeen)] == [seen], \
            routes


def test_the_peers_second_prefix_is_reported_when_it_arrives():
    cfg = load_site(world.repo_configs() / "site-a.toml")
    events = []
    sp = RoutesSpeaker([ReceivedRoute("198.18.1.1", world.GUEST_PREFIX, (64500, AS_B), None)])
    watch = BgpWatch(cfg, sp, events.append)
    watch.changed()
    sp.routes.append(ReceivedRoute("198.18.1.1", world.GUEST_PREFIX6, (64500, AS_B), None))
    watch.changed()
    watch.changed()  # nothing new: nothing fed
    assert [e for e in events if isinstance(e, ha.PeerRouteSeen)] == [ha.PeerRouteSeen(True, False),
                                                                      ha.PeerRouteSeen(True, True)]


# ---------------------------------------------------------------- lab


def best_origin(routes: list[dict]) -> int | None:
    return next((r["as_path"][-1] for r in routes if r["best"] and r["as_path"]), None)


@pytest.mark.lab
def test_ipv6_session_survives_site_loss_and_the_48_moves(lab_up):
    wait_for(lambda: best_origin(world.bird_guest_routes6()) == AS_A, 30, "BIRD's /48 from AS 64501")
    a = labcli.site_status("site-a")
    assert a["bgp_announced"] is True
    mc = wait_for(lambda: _connect6(), 30, f"[{world.GUEST_ADDR6}]:{world.MEMCACHED_PORT} from gm-client")
    peer = mc.sock.getsockname()[0]
    assert peer == world.CLIENT_ADDR6, peer
    mc.set("ctr", "0")
    res = torture.TrialResult(seed=0, crash_after_s=0)
    stop = threading.Event()
    t = threading.Thread(target=torture._client, args=(mc, stop, res), daemon=True)
    t.start()
    time.sleep(1.5)
    before = len(res.incrs)
    t_crash = time.time()
    world.crash("site-a")
    wait_for(lambda: best_origin(world.bird_guest_routes6()) == AS_B, 60, "BIRD's /48 from AS 64502")
    t_route6 = time.time()
    wait_for(lambda: best_origin(world.bird_guest_routes()) == AS_B, 30, "BIRD's /24 from AS 64502")
    wait_for(lambda: len(res.incrs) > before + 20 or res.error, 60, "replies from site B")
    stop.set()
    t.join(60)
    assert not t.is_alive(), "client stuck"
    torture.check(res, mc)
    assert res.error is None, res.error
    assert not res.violations, res.violations
    assert before > 0 and len(res.incrs) > before + 20  # the same connection, before and after the crash
    routes6 = world.bird_guest_routes6()
    assert {r["as_path"][-1] for r in routes6 if r["as_path"]} == {AS_B}, routes6
    assert best_origin(world.bird_guest_routes()) == AS_B
    b = labcli.site_status("site-b")
    assert b["role"] == "primary" and b["bgp_announced"] is True
    print(f"\nIPv6 client {world.CLIENT_ADDR6} -> [{world.GUEST_ADDR6}]:{world.MEMCACHED_PORT}: "
          f"{len(res.incrs)} consecutive incr replies ({before} before the crash, "
          f"{len(res.incrs) - before} after), longest stall {res.longest_stall_s:.2f}s; "
          f"/48 via AS {AS_B} in BIRD {t_route6 - t_crash:.2f}s after the crash; gateway MAC {GATEWAY_MAC}")


def _connect6() -> labcli.Memcache | None:
    try:
        s = labcli.client_connect(world.GUEST_ADDR6, timeout=3)
    except OSError:
        return None
    s.settimeout(60)  # a failover stalls the connection for seconds
    return labcli.Memcache(s)
