"""ExaBGP config, environment and API command rendering (bgp/config.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bgp.config import Neighbor, announce_command, exabgp_env, render_exabgp_config, withdraw_command

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
