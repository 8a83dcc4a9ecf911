"""Config validation: the lab and example configs load; every bad file names file, key, problem."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from geomirror import pairing
from bgp.config import Policy
from geomirror.config import check, load_site, load_witness
from geomirror.errors import ConfigError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# the lab's site-a, IPv4 only (the lab's guest is dual stack: DUAL below adds the IPv6 keys back)
BASE = re.sub(r"^(next_hop6|prefix6|address6|gateway6) = .*\n", "", (CONFIGS / "lab" / "site-a.toml").read_text(),
              flags=re.M)


def test_lab_configs_follow_the_lab_table():
    a = load_site(CONFIGS / "lab" / "site-a.toml")
    b = load_site(CONFIGS / "lab" / "site-b.toml")
    ip = ipaddress.IPv4Address
    assert (a.site.asn, str(a.site.router_id), a.site.initial_role) == (64501, "198.18.1.2", "primary")
    assert (b.site.asn, str(b.site.router_id), b.site.initial_role) == (64502, "198.18.2.2", "standby")
    assert (a.peer.name, a.peer.address, a.peer.listen) == ("site-b", ip("198.18.100.2"), ip("198.18.100.1"))
    assert (b.peer.name, b.peer.address, b.peer.listen) == ("site-a", ip("198.18.100.1"), ip("198.18.100.2"))
    assert [(n.address, n.peer_as) for n in a.bgp.neighbors] == [(ip("198.18.1.1"), 64500)]
    assert [(n.address, n.peer_as) for n in b.bgp.neighbors] == [(ip("198.18.2.1"), 64500)]
    for cfg, site in ((a, "site-a"), (b, "site-b")):
        assert (cfg.witness.address, cfg.witness.port) == (ip("198.18.3.2"), 7790)
        g = cfg.guest
        assert (str(g.prefix), str(g.address), str(g.gateway), g.memory_mb) == (
            "198.51.100.0/24", "198.51.100.10", "198.51.100.1", 128)
        assert cfg.site.state_dir == cfg.site.run_dir == Path("/run/geomirror-lab") / site
        assert cfg.tls.cert == Path(f"/run/geomirror-lab/pki/{site}.pem")
        assert cfg.control.token_file == Path("/run/geomirror-lab") / site / "control.token"
    w = load_witness(CONFIGS / "lab" / "witness.toml")
    assert (w.witness.listen, w.witness.port, w.witness.sites) == (ip("198.18.3.2"), 7790, ("site-a", "site-b"))
    assert w.witness.state_dir == Path("/run/geomirror-lab/witness")


def test_example_configs_load_and_resolve_relative_paths():
    ex = load_site(CONFIGS / "example-site.toml")
    assert ex.bgp.neighbors and ex.bgp.communities == ("65010:100",)
    assert str(ex.guest.prefix6) == "2001:db8:100::/48" and str(ex.bgp.neighbors[0].next_hop6) == "2001:db8:ffff:1::2"
    assert ex.tls.ca == CONFIGS / "pki" / "ca.pem"
    assert ex.control.token_file == Path("/var/lib/geomirror/control.token")
    w = load_witness(CONFIGS / "example-witness.toml")
    assert w.witness.sites == ("fra1", "ams1") and w.tls.key == CONFIGS / "pki" / "witness.key"


def edit(old: str, new: str, text: str = BASE) -> str:
    """Replace the first line matching `old` (a regex; `N` stands for any number) with `new`."""
    pattern = "^" + re.escape(old).replace("N", r"[0-9.]+") + "$"
    out, n = re.subn(pattern, new.replace("\\", "\\\\"), text, count=1, flags=re.M)
    assert n == 1, old
    return out


def put(table: str, key: str, value: str, text: str = BASE) -> str:
    """Set `key = value` in `[table]`, replacing the line if the key is there, else adding it."""
    start = text.index(f"\n[{table}]\n") + len(table) + 4
    end = text.find("\n[", start)
    end = len(text) if end < 0 else end + 1
    body, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text[start:end], count=1, flags=re.M)
    return text[:start] + (body if n else f"{key} = {value}\n" + body) + text[end:]


# the lab's site-a, dual stack
DUAL = put("guest", "gateway6", '"2001:db8:100::1"', put("guest", "address6", '"2001:db8:100::10"', put(
    "guest", "prefix6", '"2001:db8:100::/48"', BASE.replace('local_address = "198.18.1.2"\n',
                                                           'local_address = "198.18.1.2"\nnext_hop6 = "2001:db8:ffff:1::2"\n'))))


def without_witness(text: str) -> str:
    return text[:text.index("[witness]")] + text[text.index("[bgp]"):]


BAD = {
    "unknown key": (edit("interval_ms = N", "intervall_ms = 50"), "checkpoint.intervall_ms",
                    "unknown key 'intervall_ms' (did you mean 'interval_ms'?)"),
    "unknown key in a neighbour": (edit("peer_as = 64500", "peer_asn = 64500"), "bgp.neighbor[0].peer_asn",
                                   "did you mean 'peer_as'"),
    "neighbour spelt british": (edit("[[bgp.neighbor]]", "[[bgp.neighbour]]"), "bgp.neighbour",
                                "unknown key 'neighbour' (did you mean 'neighbor'?)"),
    "unknown table": (edit("[heartbeat]", "[heartbeats]"), "heartbeats", "unknown table 'heartbeats' (did you "
                      "mean 'heartbeat'?)"),
    "int where a string belongs": (edit('name = "pbx"', "name = 5"), "guest.name",
                                   "must be a string, not an integer (5)"),
    "string where an int belongs": (edit("asn = 64501", 'asn = "64501"'), "site.asn",
                                    "must be an integer, not a string ('64501')"),
    "bad address": (edit('address = "198.51.100.10"', 'address = "198.51.100.300"'), "guest.address",
                    "198.51.100.300 is not an IPv4 address"),
    "address outside prefix": (edit('address = "198.51.100.10"', 'address = "198.51.101.10"'), "guest.address",
                               "198.51.101.10 is outside guest.prefix 198.51.100.0/24"),
    "gateway is the address": (edit('gateway = "198.51.100.1"', 'gateway = "198.51.100.10"'), "guest.gateway",
                               "198.51.100.10 is the guest's own address"),
    "gateway is broadcast": (edit('gateway = "198.51.100.1"', 'gateway = "198.51.100.255"'), "guest.gateway",
                             "network or broadcast address"),
    "bad ASN": (edit("asn = 64501", "asn = 0"), "site.asn", "0 is out of range (1..4294967295)"),
    "ASN too large": (edit("peer_as = 64500", "peer_as = 4294967296"), "bgp.neighbor[0].peer_as",
                      "out of range"),
    "min above max": (put("checkpoint", "min_interval_ms", "59999"), "checkpoint.min_interval_ms",
                      "59999 is above max_interval_ms"),
    "interval outside bounds": (put("checkpoint", "interval_ms", "1"), "checkpoint.interval_ms",
                                "1 is outside min_interval_ms..max_interval_ms"),
    "heartbeat timeout too short": (put("heartbeat", "min_timeout_ms", "1"),
                                    "heartbeat.min_timeout_ms", "less than two heartbeat intervals"),
    "continue-unprotected without witness": (
        without_witness(edit('unreachable_policy = "stall"', 'unreachable_policy = "continue-unprotected"')),
        "checkpoint.unreachable_policy", "continue-unprotected needs a [witness]"),
    "peer is ourselves": (edit('name = "site-b"', 'name = "site-a"'), "peer.name", "another site"),
    "peer ASN is ours": (edit("asn = 64502", "asn = 64501"), "peer.asn", "is site.asn too"),
    "bad role": (edit('initial_role = "primary"', 'initial_role = "master"'), "site.initial_role",
                 "'master' must be one of primary, standby"),
    "bad name": (edit('name = "site-a"', 'name = "Site_A"'), "site.name", "is not a valid name"),
    "memory too small": (put("guest", "memory_mb", "8"), "guest.memory_mb", "8 is out of range"),
    "bad community": (put("bgp", "communities", '["64501:x"]'), "bgp.communities",
                      "'64501:x' is not a community"),
    "hold time 2": (put("bgp", "hold_time", "2"), "bgp.hold_time", "0, or 3..65535"),
    "bgp without neighbours": (BASE[:BASE.index("[[bgp.neighbor]]")] + BASE[BASE.index("[guest]"):],
                               "bgp.neighbor", "no [[bgp.neighbor]]"),
    "renew too rare": (put("witness", "renew_every_ms", "600000"), "witness.renew_every_ms",
                       "renew at least three times per lease_ttl_ms"),
    "lease too short to fence": (put("witness", "renew_every_ms", "300", put("witness", "lease_ttl_ms", "900")),
                                 "witness.lease_ttl_ms", "lease_ttl_ms 900 is too short: a site fences"),
    "kernel without initrd": (put("guest", "kernel", '"vmlinuz"'), "guest.initrd",
                              "kernel and initrd go together"),
    "disk not a path": (put("guest", "disk", "5"), "guest.disk", "must be a non-empty path string"),
    "multicast mac": (put("guest", "mac", '"53:54:00:12:34:56"'), "guest.mac",
                      "multicast"),
    "pause share": (put("checkpoint", "max_pause_share", "1.0"),
                    "checkpoint.max_pause_share", "between 0 and 1"),
    "replica check not whole pages": (put("checkpoint", "verify_bytes_per_epoch", "1000"),
                                      "checkpoint.verify_bytes_per_epoch", "not a multiple of the 4096-byte page"),
    "replica check too large": (put("checkpoint", "verify_bytes_per_epoch", str(128 << 20)),
                                "checkpoint.verify_bytes_per_epoch", "out of range"),
    "idle interval negative": (put("checkpoint", "idle_interval_ms", "-1"), "checkpoint.idle_interval_ms",
                               "out of range"),
    "disk cap zero": (put("checkpoint", "disk_unsent_cap_mb", "0"), "checkpoint.disk_unsent_cap_mb", "out of range"),
    "disk cap not an int": (put("checkpoint", "disk_unsent_cap_mb", '"64M"'), "checkpoint.disk_unsent_cap_mb",
                            "must be"),
    "pass-through not an array": (put("checkpoint", "pass_through", '"udp:6000"'), "checkpoint.pass_through",
                                  "must be an array of strings"),
    "pass-through no port": (put("checkpoint", "pass_through", '["udp"]'), "checkpoint.pass_through",
                             "is not a flow (udp:PORT or udp:LOW-HIGH"),
    "pass-through tcp": (put("checkpoint", "pass_through", '["tcp:6000-6100"]'), "checkpoint.pass_through",
                         "only udp flows can pass through"),
    "pass-through port 0": (put("checkpoint", "pass_through", '["udp:0-100"]'), "checkpoint.pass_through",
                            "ports are 1..65535"),
    "pass-through port too high": (put("checkpoint", "pass_through", '["udp:65000-70000"]'),
                                   "checkpoint.pass_through", "ports are 1..65535"),
    "pass-through reversed": (put("checkpoint", "pass_through", '["udp:6100-6000"]'), "checkpoint.pass_through",
                              "ends (6000) below where it starts (6100)"),
    "pass-through overlap": (put("checkpoint", "pass_through", '["udp:6000-6100", "udp:6050"]'),
                             "checkpoint.pass_through", "'udp:6050' overlaps udp:6000-6100"),
    "table is a value": ("control = 5\n" + BASE[:BASE.index("[control]")], "control", "must be a table"),
    "missing table": (BASE[:BASE.index("[guest]")] + BASE[BASE.index("[checkpoint]"):], "guest",
                      "missing table [guest]"),
    "missing key": (edit('router_id = "198.18.1.2"', ""), "site.router_id", "missing (required)"),
    "TOML syntax error": (edit("[guest]", "[guest"), None, "TOML syntax error at line"),
    "address6 without prefix6": (put("guest", "address6", '"2001:db8:100::10"'), "guest.prefix6",
                                 "go together"),
    "address6 outside prefix6": (put("guest", "address6", '"2001:db8:200::10"', DUAL), "guest.address6",
                                 "2001:db8:200::10 is outside guest.prefix6 2001:db8:100::/48"),
    "gateway6 is the network": (put("guest", "gateway6", '"2001:db8:100::"', DUAL), "guest.gateway6",
                                "subnet-router anycast"),
    "gateway6 is address6": (put("guest", "gateway6", '"2001:db8:100::10"', DUAL), "guest.gateway6",
                             "the guest's own address"),
    "prefix6 with host bits": (put("guest", "prefix6", '"2001:db8:100::1/48"', DUAL), "guest.prefix6",
                               "is not an IPv6 prefix"),
    "IPv4 in prefix6": (put("guest", "prefix6", '"198.51.100.0/24"', DUAL), "guest.prefix6",
                        "is not an IPv6 prefix"),
    "prefix6 without next_hop6": (DUAL.replace('next_hop6 = "2001:db8:ffff:1::2"\n', ""),
                                  "bgp.neighbor[0].next_hop6", "needs this site's IPv6 address"),
    "link-local next_hop6": (DUAL.replace('"2001:db8:ffff:1::2"', '"fe80::2"'), "bgp.neighbor[0].next_hop6",
                             "not a global unicast address"),
    "standby path not longer": (put("bgp", "standby_prepend", "1", put("bgp", "prepend", "1")),
                                "bgp.standby_prepend", "must be more than bgp.prepend (1)"),
    "standby key while off": (put("bgp", "standby_med", "10"), "bgp.standby_med",
                              "pre-announcement, which is off"),
    "graceful shutdown always": (put("bgp", "communities", '["64501:1", "65535:0"]'), "bgp.communities",
                                 "GRACEFUL_SHUTDOWN"),
    "graceful shutdown on the standby": (put("bgp", "standby_communities", '["65535:0"]',
                                             put("bgp", "standby_prepend", "2")),
                                         "bgp.standby_communities", "GRACEFUL_SHUTDOWN"),
    "bad large community": (put("bgp", "large_communities", '["64501:1"]'), "bgp.large_communities",
                            "is not a large community"),
    "community twice": (put("bgp", "drain_communities", '["64501:1", "64501:1"]'), "bgp.drain_communities",
                        "twice"),
    "prepend 9": (put("bgp", "standby_prepend", "9"), "bgp.standby_prepend", "out of range (0..8)"),
    "colo capture on the system QEMU": (put("checkpoint", "capture", '"colo"'), "checkpoint.capture",
                                        'set guest.qemu = "colo"'),
    "unknown capture": (put("checkpoint", "capture", '"bitmap"'), "checkpoint.capture", "scan"),
    "relative qemu": (put("guest", "qemu", '"qemu-10"'), "guest.qemu", "an absolute path"),
    "negative verify": (put("checkpoint", "colo_verify_every", "-1", put("guest", "qemu", '"colo"')),
                        "checkpoint.colo_verify_every", "out of range"),
}


@pytest.mark.parametrize("text,key,problem", BAD.values(), ids=BAD.keys())
def test_bad_configs_name_file_key_and_problem(tmp_path, text, key, problem):
    p = tmp_path / "bad-site.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_site(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: "), msg
    if key:
        assert e.value.key == key, msg
        assert f": {key}: " in msg, msg
    assert problem in msg, msg


def test_toml_line_number_is_the_real_line(tmp_path):
    lines = BASE.splitlines()
    n = lines.index("[guest]")
    lines[n] = "[guest"
    p = tmp_path / "s.toml"
    p.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match=f"at line {n + 1}, column"):
        load_site(p)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml: no such file"):
        load_site(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_witness(tmp_path)
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[site]")
    with pytest.raises(ConfigError, match="bin.toml: not UTF-8"):
        load_site(tmp_path / "bin.toml")


def test_bad_witness_configs(tmp_path):
    base = (CONFIGS / "lab" / "witness.toml").read_text()
    p = tmp_path / "w.toml"
    for old, new, expected in [
        ('port = 7790', 'prot = 7790', "witness.prot: unknown key 'prot' (did you mean 'port'?)"),
        ('sites = ["site-a", "site-b"]', 'sites = ["site-a", "site-a"]', "witness.sites: ['site-a', 'site-a']"),
        ('sites = ["site-a", "site-b"]', 'sites = "site-a"', "witness.sites: must be an array"),
        ('listen = "198.18.3.2"', 'listen = "198.18.3"', "witness.listen: 198.18.3 is not an IPv4 address"),
        ('sites = ["site-a", "site-b"]', '', "witness.sites: missing (required): name the sites that may hold "
         "leases"),
        ('sites = ["site-a", "site-b"]', 'sites = []', "witness.sites: is empty: name the sites"),
        ('sites = ["site-a", "site-b"]', 'sites = ["site-a", "witness"]', "witness.sites: 'witness' is the "
         "witness's own name: its certificate must never hold a lease"),
    ]:
        p.write_text(edit(old, new, base))
        with pytest.raises(ConfigError) as e:
            load_witness(p)
        assert str(e.value).startswith(f"{p}: {expected}"), str(e.value)


def test_relative_paths_resolve_against_the_file(tmp_path):
    p = tmp_path / "s.toml"
    text = BASE.replace('"/run/geomirror-lab/pki/ca.pem"', '"pki/ca.pem"')
    text = text.replace('state_dir = "/run/geomirror-lab/site-a"', 'state_dir = "state"')
    text = text.replace("port = 7780", 'port = 7780\ntoken_file = "tok"')
    cfg = load_site(p.write_text(text) and p)
    assert cfg.tls.ca == tmp_path / "pki" / "ca.pem"
    assert cfg.site.state_dir == tmp_path / "state"
    assert cfg.control.token_file == tmp_path / "state" / "tok"


def test_check_files_against_a_real_pair(tmp_path):
    pki = tmp_path / "pki"
    pairing.create_pair(pki, ["site-a", "site-b"], ["witness"])
    other = pairing.create_pair(tmp_path / "other", ["site-a", "site-b"], [])
    p = tmp_path / "s.toml"

    def cfg(ca="ca.pem", cert="site-a.pem", key="site-a.key"):
        text = BASE
        for k, v in (("ca", ca), ("cert", cert), ("key", key)):
            old = {"ca": "ca.pem", "cert": "site-a.pem", "key": "site-a.key"}[k]
            text = text.replace(f'{k} = "/run/geomirror-lab/pki/{old}"', f'{k} = "{v}"')
        p.write_text(text)
        return load_site(p)

    cfg(f"{pki}/ca.pem", f"{pki}/site-a.pem", f"{pki}/site-a.key").check_files()
    with pytest.raises(ConfigError, match=r"tls.cert: .*site-b.pem is a certificate for site-b, not 'site-a'"):
        cfg(f"{pki}/ca.pem", f"{pki}/site-b.pem", f"{pki}/site-b.key").check_files()
    with pytest.raises(ConfigError, match="tls.cert: .* was not issued by the pair CA"):
        cfg(f"{pki}/ca.pem", f"{other.dir}/site-a.pem", f"{other.dir}/site-a.key").check_files()
    with pytest.raises(ConfigError, match="tls.cert: .*site-b.key is not the key of"):
        cfg(f"{pki}/ca.pem", f"{pki}/site-a.pem", f"{pki}/site-b.key").check_files()
    with pytest.raises(ConfigError, match="tls.ca: file .*/missing.pem does not exist"):
        cfg(f"{pki}/missing.pem", f"{pki}/site-a.pem", f"{pki}/site-a.key").check_files()
    os.chmod(pki / "site-a.key", 0o644)
    with pytest.raises(ConfigError, match=r"tls.key: .* is readable by others \(mode 0644\); chmod 600 it"):
        cfg(f"{pki}/ca.pem", f"{pki}/site-a.pem", f"{pki}/site-a.key").check_files()


def test_guest_disk_resolves_against_the_file_and_is_checked_with_the_files(tmp_path):
    pki = tmp_path / "pki"
    pairing.create_pair(pki, ["site-a", "site-b"], ["witness"])
    text = BASE.replace("/run/geomirror-lab/pki/", f"{pki}/")
    p = tmp_path / "s.toml"
    p.write_text(put("guest", "disk", '""', text))
    assert load_site(p).guest.disk is None  # empty: no disk
    cfg = load_site(p.write_text(put("guest", "disk", '"disks/pbx.raw"', text)) and p)
    disk = tmp_path / "disks" / "pbx.raw"
    assert cfg.guest.disk == disk
    with pytest.raises(ConfigError, match=rf"s.toml: guest.disk: file {disk} does not exist .*truncate -s SIZE"):
        cfg.check_files()
    disk.parent.mkdir()
    disk.write_bytes(b"QFI\xfb" + bytes(8188))
    with pytest.raises(ConfigError, match=rf"guest.disk: {disk} is a qcow2 image; the disk must be raw: convert it "
                       rf"with qemu-img convert -O raw {disk} {tmp_path}/disks/pbx-converted.raw and set guest.disk"):
        cfg.check_files()
    disk.write_bytes(bytes(4096 * 3 + 512))
    with pytest.raises(ConfigError, match=r"guest.disk: .*pbx.raw is 12800 bytes, not a positive multiple of 4096"):
        cfg.check_files()
    disk.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is 0 bytes, not a positive multiple"):
        cfg.check_files()
    os.truncate(disk, 1 << 20)
    cfg.check_files()


VALUES = st.one_of(
    st.integers(-2**63, 2**63 - 1).map(str), st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.booleans().map(lambda b: str(b).lower()), st.text(max_size=20).map(json.dumps),
    st.sampled_from(['"198.51.100.0/24"', '"198.51.100.10"', '"::1"', '"-1"', '[]', '[1, 2]', '["a:b"]',
                     '{ x = 1 }', '"52:54:00:00:00:01"', '"continue-unprotected"', '""', '"/"']))
LINES = [i for i, line in enumerate(BASE.splitlines()) if " = " in line and not line.startswith("#")]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LINES), VALUES), min_size=1, max_size=3))
def test_any_value_anywhere_gives_a_config_or_a_config_error(changes):
    lines = BASE.splitlines()
    for i, value in changes:
        lines[i] = lines[i].split(" = ", 1)[0] + " = " + value
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzzed.toml"
        p.write_text("\n".join(lines))
        try:
            load_site(p)
        except ConfigError as e:
            assert str(e).startswith(f"{p}: "), str(e)


def _load(tmp_path, text):
    p = tmp_path / "site.toml"
    p.write_text(text)
    return p, load_site(p)


def test_dual_stack_guest_loads(tmp_path):
    _, cfg = _load(tmp_path, DUAL)
    g = cfg.guest
    assert (str(g.prefix6), str(g.address6), str(g.gateway6)) == ("2001:db8:100::/48", "2001:db8:100::10",
                                                                  "2001:db8:100::1")
    assert str(cfg.bgp.neighbors[0].next_hop6) == "2001:db8:ffff:1::2"
    assert cfg.warnings == ()
    _, v4 = _load(tmp_path, BASE)
    assert (v4.guest.prefix6, v4.guest.address6, v4.guest.gateway6) == (None, None, None)


def test_prefixes_the_internet_filters_are_warned_about_not_refused(tmp_path):
    text = DUAL
    for old, new in (("198.51.100.0/24", "198.51.100.0/25"), ("2001:db8:100::/48", "2001:db8:100::/56")):
        text = text.replace(old, new)
    p, cfg = _load(tmp_path, text)
    assert [k for k, _ in cfg.warnings] == ["guest.prefix", "guest.prefix6"]
    out = check(p).splitlines()
    assert out[0].startswith(f"{p}: site site-a") and "guest 198.51.100.0/25 2001:db8:100::/56" in out[0]
    assert out[1] == (f"warning: {p}: guest.prefix: 198.51.100.0/25 is longer than /24: most networks on the "
                      "Internet filter such prefixes, so the guest may be reachable only near your upstreams")
    assert out[2].startswith(f"warning: {p}: guest.prefix6: 2001:db8:100::/56 is longer than /48")
    p.write_text(DUAL)  # a /24 and a /48: no warning
    assert len(check(p).splitlines()) == 1


def test_announcement_policy_per_role(tmp_path):
    text = BASE
    for k, v in (("med", "100"), ("communities", '["64501:100"]'), ("large_communities", '["64501:1:100"]'),
                 ("prepend", "1"), ("drain_communities", '["64501:666"]')):
        text = put("bgp", k, v, text)
    _, cfg = _load(tmp_path, text)
    b = cfg.bgp
    # today's keys keep their meaning: they are the active site's announcement
    assert (b.med, b.communities, b.prepend) == (100, ("64501:100",), 1)
    assert b.active == Policy(med=100, communities=("64501:100",), large_communities=("64501:1:100",), prepend=1)
    assert b.standby is None  # off by default
    assert b.drain == Policy(med=100, communities=("64501:100", "65535:0", "64501:666"),
                             large_communities=("64501:1:100",), prepend=1)
    _, on = _load(tmp_path, put("bgp", "standby_prepend", "3", text))
    assert on.bgp.standby == Policy(med=100, communities=("64501:100",), large_communities=("64501:1:100",),
                                    prepend=3)
    own = put("bgp", "standby_med", "500", put("bgp", "standby_communities", '["64501:200"]',
                                                put("bgp", "standby_large_communities", "[]",
                                                    put("bgp", "standby_prepend", "3", text))))
    _, own = _load(tmp_path, own)
    assert own.bgp.standby == Policy(med=500, communities=("64501:200",), large_communities=(), prepend=3)


def test_pass_through_is_off_by_default_and_parses_udp_ranges(tmp_path):
    assert _load(tmp_path, BASE)[1].checkpoint.pass_through == ()
    _, cfg = _load(tmp_path, put("checkpoint", "pass_through", '["udp:6000-6100", "UDP:7078", "udp:10000-10000"]'))
    assert cfg.checkpoint.pass_through == ((6000, 6100), (7078, 7078), (10000, 10000))
    assert not [k for k, _ in cfg.warnings if k == "checkpoint.pass_through"]
    _, sip = _load(tmp_path, put("checkpoint", "pass_through", '["udp:5000-5100"]'))
    assert [p for k, p in sip.warnings if k == "checkpoint.pass_through"] == [
        "covers UDP 5060, 5061 (SIP): signalling released before its epoch commits can be answered twice or "
        "forgotten after a failover; pass media (RTP) only"]


def test_the_disk_write_cap_defaults_to_64_mb(tmp_path):
    assert _load(tmp_path, BASE)[1].checkpoint.disk_unsent_cap_mb == 64
    assert _load(tmp_path, put("checkpoint", "disk_unsent_cap_mb", "512"))[1].checkpoint.disk_unsent_cap_mb == 512


def test_replica_check_is_on_by_default_and_can_be_turned_off(tmp_path):
    assert _load(tmp_path, BASE)[1].checkpoint.verify_bytes_per_epoch == 256 << 10
    assert _load(tmp_path, put("checkpoint", "verify_bytes_per_epoch", "0"))[1].checkpoint.verify_bytes_per_epoch == 0
