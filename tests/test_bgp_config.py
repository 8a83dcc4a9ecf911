"""ExaBGP config, environment and API command rendering (bgp/config.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from exabgp.configuration.configuration import Configuration
from exabgp.environment import getenv
from exabgp.logger import log as exabgp_log
from exabgp.reactor.api import API
from exabgp.reactor.api.command.limit import extract_neighbors, match_neighbors

from bgp.config import (GRACEFUL_SHUTDOWN, Neighbor, Policy, announce_command, drain_commands, drain_policy,
                        exabgp_env, policy_commands, render_exabgp_config, withdraw_command, withdraw_commands)

EXABGP = str(Path(sys.executable).with_name("exabgp"))
ARGV = [sys.executable, "-m", "bgp.relay", "/run/geomirror/site-b/bgp/api.sock"]


def render(**kw) -> str:
    args = dict(router_id="198.18.2.2", local_as=64502, process_argv=ARGV,
                neighbors=[Neighbor("198.18.2.1", 64500, local_address="198.18.2.2", hold_time=9)])
    args.update(kw)
    return render_exabgp_config(**args)


def block(text: str, head: str) -> str:
    """The text of the `head { … }` block (nested braces included)."""
    start = text.index(head + " {")
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if text[i] == "}" and depth == 0:
            return text[start:i + 1]
    raise AssertionError(f"unterminated block {head}")


def test_neighbor_block_carries_every_value():
    nb = block(render(), "neighbor 198.18.2.1")
    for line in ("router-id 198.18.2.2;", "local-address 198.18.2.2;", "local-as 64502;", "peer-as 64500;",
                 "hold-time 9;", "family { ipv4 unicast; }", "capability { graceful-restart disable; }",
                 "processes [ geomirror ];", "neighbor-changes;", "receive { parsed; update; }"):
        assert line in nb, line


def test_process_runs_the_relay_with_json_encoder():
    proc = block(render(), "process geomirror")
    assert "run " + " ".join(f'"{a}"' for a in ARGV) + ";" in proc
    assert "encoder json;" in proc


def test_one_block_per_neighbor_and_no_local_address_when_unset():
    text = render(neighbors=[Neighbor("198.18.1.1", 64500, hold_time=30), Neighbor("198.18.9.1", 64510)])
    a, b = block(text, "neighbor 198.18.1.1"), block(text, "neighbor 198.18.9.1")
    assert "hold-time 30;" in a and "peer-as 64500;" in a
    assert "hold-time 9;" in b and "peer-as 64510;" in b
    assert "local-address" not in text


def test_exabgp_parses_the_rendered_config(tmp_path):
    """ExaBGP 5's own parser accepts what we render (and rejects a broken variant)."""
    good = tmp_path / "good.conf"
    good.write_text(render(neighbors=[Neighbor("198.18.2.1", 64500, "198.18.2.2"), Neighbor("198.18.3.1", 64503)]))
    r = subprocess.run([EXABGP, "validate", "-n", str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text(good.read_text().replace("hold-time 9;", "hold-time 9; no-such-option 1;"))
    r = subprocess.run([EXABGP, "validate", "-n", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0


@pytest.mark.parametrize("kw, names", [
    (dict(router_id="not-an-ip"), "router id"),
    (dict(router_id="2001:db8::1"), "router id"),
    (dict(local_as=0), "local AS"),
    (dict(local_as=True), "local AS"),
    (dict(local_as=4294967296), "local AS"),
    (dict(neighbors=[Neighbor("198.18.2.1; } neighbor 192.0.2.1 {", 64500)]), "neighbour address"),
    (dict(neighbors=[Neighbor("bird.example", 64500)]), "neighbour address"),
    (dict(neighbors=[Neighbor("198.18.2.1", "64500")]), "peer AS"),
    (dict(neighbors=[Neighbor("198.18.2.1", 64500, local_address="198.18.2.2;")]), "local address"),
    (dict(neighbors=[Neighbor("198.18.2.1", 64500, hold_time=2)]), "hold time"),
    (dict(neighbors=[Neighbor("198.18.2.1", 64500), Neighbor("198.18.2.1", 64501)]), "twice"),
    (dict(neighbors=[]), "no neighbour"),
    (dict(process_argv=[]), "argv is empty"),
    (dict(process_argv=[sys.executable, 'x"; } process evil { run /bin/sh']), "quote"),
    (dict(process_argv=[sys.executable, "a\nb"]), "control character"),
    (dict(process_argv=[sys.executable, "a\\"]), "backslash"),
    (dict(family="ipv4 flow"), "address family"),
    (dict(families=("ipv4 unicast", "ipv4 unicast")), "each once"),
    (dict(families=("ipv4 unicast", "ipv6 unicast")), "next_hop6"),
    (dict(families=("ipv4 unicast", "ipv6 unicast"),
          neighbors=[Neighbor("198.18.2.1", 64500, next_hop6="fe80::2")]), "global unicast"),
    (dict(families=("ipv4 unicast", "ipv6 unicast"),
          neighbors=[Neighbor("198.18.2.1", 64500, next_hop6="198.18.2.2")]), "global unicast"),
])
def test_bad_values_raise_value_error_naming_them(kw, names):
    with pytest.raises(ValueError, match=names):
        render(**kw)


def test_exabgp_env_is_understood_by_exabgp():
    env = exabgp_env(Path("/run/geomirror/site-b/bgp"))
    assert env["exabgp.api.ack"] == "true"
    r = subprocess.run([EXABGP, "env", "-e"], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", **env})
    seen = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
    assert seen["exabgp.api.ack"] == "true"
    assert seen["exabgp.api.cli"] == "false"
    assert seen["exabgp.daemon.user"] == "'root'"
    assert seen["exabgp.daemon.drop"] == "false"
    assert seen["exabgp.daemon.daemonize"] == "false"
    assert seen["exabgp.daemon.pid"] == "''"
    assert seen["exabgp.log.destination"] == "'stderr'"
    assert seen["exabgp.tcp.bind"] == "''"
    assert seen["exabgp.log.statistics"] == "false"


def test_announce_command_plain_and_with_attributes():
    assert announce_command("198.51.100.0/24", local_as=64502) == "announce route 198.51.100.0/24 next-hop self"
    assert announce_command("198.51.100.0/24", local_as=64502, med=50, communities=["64502:100", "0:7"],
                            prepend=2) == ("announce route 198.51.100.0/24 next-hop self med 50 "
                                           "community [ 64502:100 0:7 ] as-path [ 64502 64502 64502 ]")


def test_prepend_n_puts_n_extra_copies_of_the_own_as():
    """An explicit as-path goes on the wire verbatim, so it carries 1 + N copies of our AS."""
    for n in range(1, 9):
        cmd = announce_command("198.51.100.0/24", local_as=64501, prepend=n)
        assert cmd.endswith("as-path [ " + " ".join(["64501"] * (n + 1)) + " ]")


@pytest.mark.parametrize("prefix", ["198.51.100.0/24 next-hop 192.0.2.1", "198.51.100.1/24", "garbage",
                                    "198.51.100.0/33", "2001:db8::/32", ""])
def test_bad_prefix_raises(prefix):
    with pytest.raises(ValueError, match="prefix"):
        announce_command(prefix, local_as=64502)
    with pytest.raises(ValueError, match="prefix"):
        withdraw_command(prefix)


@pytest.mark.parametrize("kw, names", [
    (dict(communities=["64502:100 ] as-path [ 1"]), "community"),
    (dict(communities=["70000:1"]), "community"),
    (dict(communities="64502:100"), "communities"),
    (dict(med=-1), "MED"),
    (dict(med="5"), "MED"),
    (dict(prepend=9), "prepend"),
    (dict(prepend=-1), "prepend"),
    (dict(prepend=1, local_as=0), "local AS"),
])
def test_bad_attributes_raise(kw, names):
    args = dict(local_as=64502)
    args.update(kw)
    with pytest.raises(ValueError, match=names):
        announce_command("198.51.100.0/24", **args)


def test_withdraw_command():
    assert withdraw_command("198.51.100.0/24") == "withdraw route 198.51.100.0/24 next-hop self"


# ---------------------------------------------------------------- dual stack and announcement policy

NB6 = [Neighbor("198.18.1.1", 64500, local_address="198.18.1.2", next_hop6="2001:db8:ffff:1::2"),
       Neighbor("198.18.9.1", 64510, local_address="198.18.9.2", next_hop6="2001:db8:ffff:9::2")]
DUAL = ("ipv4 unicast", "ipv6 unicast")
POLICY = Policy(med=5, communities=("64501:1",), large_communities=("64501:2:3",), prepend=1)


def test_dual_stack_sessions_carry_both_families_and_exabgp_accepts_them(tmp_path):
    text = render(neighbors=NB6, families=DUAL)
    for addr in ("198.18.1.1", "198.18.9.1"):
        assert "family { ipv4 unicast; ipv6 unicast; }" in block(text, f"neighbor {addr}")
    conf = tmp_path / "dual.conf"
    conf.write_text(text)
    r = subprocess.run([EXABGP, "validate", "-n", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ipv6_route_goes_to_each_neighbour_with_its_own_next_hop():
    assert policy_commands("2001:db8:100::/48", POLICY, local_as=64501, neighbors=NB6) == [
        "neighbor 198.18.1.1 announce route 2001:db8:100::/48 next-hop 2001:db8:ffff:1::2 med 5 "
        "community [ 64501:1 ] large-community [ 64501:2:3 ] as-path [ 64501 64501 ]",
        "neighbor 198.18.9.1 announce route 2001:db8:100::/48 next-hop 2001:db8:ffff:9::2 med 5 "
        "community [ 64501:1 ] large-community [ 64501:2:3 ] as-path [ 64501 64501 ]"]
    assert withdraw_commands("2001:db8:100::/48", neighbors=NB6) == [
        "neighbor 198.18.1.1 withdraw route 2001:db8:100::/48 next-hop 2001:db8:ffff:1::2",
        "neighbor 198.18.9.1 withdraw route 2001:db8:100::/48 next-hop 2001:db8:ffff:9::2"]
    # IPv4 keeps one command for every session, with next-hop self
    assert policy_commands("198.51.100.0/24", Policy(), local_as=64501, neighbors=NB6) == [
        "announce route 198.51.100.0/24 next-hop self"]
    assert withdraw_commands("198.51.100.0/24", neighbors=NB6) == ["withdraw route 198.51.100.0/24 next-hop self"]


@pytest.mark.parametrize("call, names", [
    (lambda: announce_command("2001:db8:100::/48", local_as=64501, family="ipv6 unicast"), "explicit IPv6 next hop"),
    (lambda: withdraw_command("2001:db8:100::/48", family="ipv6 unicast"), "explicit IPv6 next hop"),
    (lambda: announce_command("2001:db8:100::/48", local_as=64501, family="ipv6 unicast", next_hop="198.18.1.2"),
     "address family"),
    (lambda: announce_command("198.51.100.0/24", local_as=64501, neighbor="198.18.1.1 announce"),
     "neighbour address"),
    (lambda: policy_commands("2001:db8:100::/48", Policy(), local_as=64501, neighbors=[Neighbor("198.18.1.1", 1)]),
     "next_hop6"),
    (lambda: policy_commands("2001:db8:100::/48", Policy(), local_as=64501, neighbors=[]), "no neighbour"),
    (lambda: announce_command("198.51.100.0/24", local_as=64501, large_communities=["1:2"]), "large community"),
    (lambda: announce_command("198.51.100.0/24", local_as=64501, large_communities=["1:2:4294967296"]),
     "large community"),
    (lambda: announce_command("198.51.100.0/24", local_as=64501, large_communities="1:2:3"), "large communities"),
])
def test_bad_dual_stack_and_policy_values_raise(call, names):
    with pytest.raises(ValueError, match=names):
        call()


def test_drain_adds_graceful_shutdown_once_and_keeps_the_rest():
    d = drain_policy(POLICY, communities=["64501:99"], large_communities=["64501:9:9"])
    assert d == Policy(med=5, communities=("64501:1", GRACEFUL_SHUTDOWN, "64501:99"),
                       large_communities=("64501:2:3", "64501:9:9"), prepend=1)
    assert drain_policy(d) == d  # draining a drained policy changes nothing
    assert drain_commands("198.51.100.0/24", Policy(med=7), local_as=64501, neighbors=NB6) == [
        "announce route 198.51.100.0/24 next-hop self med 7 community [ 65535:0 ]"]
    assert [c.split(" community ")[1] for c in drain_commands("2001:db8:100::/48", Policy(), local_as=64501,
                                                              neighbors=NB6)] == ["[ 65535:0 ]"] * 2


def _exabgp_api(tmp_path, text):
    """ExaBGP's own configuration (from our rendered text) and API route parser, in process."""
    exabgp_log.init(getenv())  # its parser logs through this and fails without it
    conf = tmp_path / "exabgp.conf"
    conf.write_text(text)
    c = Configuration([str(conf)])
    assert c.reload(), c.error
    return c, API(c)


def test_exabgp_api_takes_every_command_we_render_into_the_right_ribs(tmp_path):
    """Each rendered command parses in ExaBGP 5's API and lands in the RIB of the sessions it
    names, with the next hop we chose; `next-hop self` for IPv6 on an IPv4 session is what
    ExaBGP refuses (the reason for next_hop6)."""
    c, api = _exabgp_api(tmp_path, render(neighbors=NB6, families=DUAL))
    cmds = (policy_commands("198.51.100.0/24", POLICY, local_as=64501, neighbors=NB6)
            + policy_commands("2001:db8:100::/48", POLICY, local_as=64501, neighbors=NB6)
            + drain_commands("2001:db8:100::/48", POLICY, local_as=64501, neighbors=NB6)
            + withdraw_commands("2001:db8:100::/48", neighbors=NB6)
            + withdraw_commands("198.51.100.0/24", neighbors=NB6))
    for cmd in cmds:
        selector, command = extract_neighbors(cmd)
        peers = match_neighbors(list(c.neighbors), selector)
        assert len(peers) == (1 if cmd.startswith("neighbor ") else 2), cmd
        changes = api.api_route(command)
        assert len(changes) == 1, cmd
        assert c.inject_change(peers, changes[0]), cmd
        seen = changes[0].extensive()
        assert seen.startswith(cmd.split(" route ", 1)[1].split(" med ")[0]), (cmd, seen)
        if " community " in cmd:
            assert "64501:1" in seen and "large-community 64501:2:3" in seen, seen
    [self6] = api.api_route("announce route 2001:db8:100::/48 next-hop self")
    with pytest.raises(TypeError, match="next-hop self"):
        c.inject_change(list(c.neighbors), self6)
