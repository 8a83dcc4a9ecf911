"""Config validation: the lab and example configs load; every bad file names file, key, problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from geomirror.config import load_site, load_witness
from geomirror.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE = (CONFIGS / "lab" / "site-a.toml").read_text()


def test_lab_and_example_configs_load():
    a = load_site(CONFIGS / "lab" / "site-a.toml")
    b = load_site(CONFIGS / "lab" / "site-b.toml")
    assert (a.site.asn, b.site.asn) == (64501, 64502)
    assert a.peer.name == "site-b" and str(b.peer.address) == "198.18.100.1"
    assert str(a.guest.prefix) == "198.51.100.0/24" and a.site.initial_role == "primary"
    assert load_witness(CONFIGS / "lab" / "witness.toml").witness.port == 7790
    ex = load_site(CONFIGS / "example-site.toml")
    assert ex.bgp.neighbors
    load_witness(CONFIGS / "example-witness.toml")


def edit(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


BAD = [
    (edit("interval_ms = 50", "intervall_ms = 50"), "checkpoint.intervall_ms", "did you mean 'interval_ms'"),
    (edit('address = "198.51.100.10"', 'address = "198.51.101.10"'), "guest.address",
     "198.51.101.10 is outside guest.prefix 198.51.100.0/24"),
    (edit('address = "198.51.100.10"', 'address = "198.51.100.300"'), "guest.address", "not an IPv4 address"),
    (edit('gateway = "198.51.100.1"', 'gateway = "198.51.100.10"'), "guest.gateway", "the guest's own address"),
    (edit("asn = 64501", "asn = 0"), "site.asn", "out of range"),
    (edit("asn = 64501", 'asn = "64501"'), "site.asn", "must be an integer, not a string"),
    (edit("min_interval_ms = 20", "min_interval_ms = 900"), "checkpoint.min_interval_ms", "above max_interval_ms"),
    (edit('unreachable_policy = "stall"', 'unreachable_policy = "continue-unprotected"').replace(
        "[witness]", "[witness_disabled]"), "witness_disabled", "unknown table"),
    (edit('name = "site-b"', 'name = "site-a"'), "peer.name", "another site"),
    (edit("[guest]", "[guest\n"), None, "TOML syntax error"),
    (edit("memory_mb = 128", "memory_mb = 8"), "guest.memory_mb", "out of range"),
    (edit('communities = []' if 'communities = []' in BASE else "hold_time = 6",
          'hold_time = 6\ncommunities = ["64501:x"]'), "bgp.communities", "is not a community"),
]


@pytest.mark.parametrize("text,key,problem", BAD)
def test_bad_configs_name_file_key_and_problem(tmp_path, text, key, problem):
    p = tmp_path / "bad-site.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_site(p)
    msg = str(e.value)
    assert "bad-site.toml" in msg
    if key:
        assert key in msg, msg
    assert problem in msg, msg


def test_continue_unprotected_needs_a_witness(tmp_path):
    text = BASE.replace('unreachable_policy = "stall"', 'unreachable_policy = "continue-unprotected"')
    start = text.index("[witness]")
    end = text.index("[bgp]")
    p = tmp_path / "s.toml"
    p.write_text(text[:start] + text[end:])
    with pytest.raises(ConfigError, match="checkpoint.unreachable_policy: continue-unprotected needs a"):
        load_site(p)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_site(tmp_path / "nope.toml")


def test_relative_paths_resolve_against_the_file(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(BASE.replace('"/run/geomirror-lab/pki/ca.pem"', '"pki/ca.pem"'))
    assert load_site(p).tls.ca == tmp_path / "pki" / "ca.pem"
