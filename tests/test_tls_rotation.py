"""Rotating the sites' certificates in the lab while the guest is protected and a client
works: nothing stops. Established TLS sessions (replication, witness) carry on; new ones
present the new certificates. Site A picks its new files up on its own (file watch), site
B is told with `geomirror reload-tls`."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from geomirror import pairing
from lab import cli as labcli, world
from tests.test_bgp_failover import Client, wait_for

pytestmark = pytest.mark.lab


def rotate(site: str) -> str:
    """A new certificate for `site` under the lab's pair CA, copied over the files its daemon
    was started with (key first, then certificate: a moment where they do not match)."""
    pki = world.LAB_DIR / "pki"
    out = world.LAB_DIR / f"rotated-{site}"
    cert = pairing.issue_cert(pki, site, out)
    (pki / f"{site}.key").write_bytes((out / f"{site}.key").read_bytes())
    (pki / f"{site}.pem").write_bytes(cert.read_bytes())
    from cryptography import x509

    return pairing.serial_hex(x509.load_pem_x509_certificate(cert.read_bytes()))


def test_certificate_rotation_never_stops_protection(lab_up):
    a0, b0 = labcli.site_status("site-a"), labcli.site_status("site-b")
    assert b0["replication"]["peer_cert_serial"] == a0["tls"]["serial"]
    assert a0["replication"]["peer_cert_serial"] == b0["tls"]["serial"]
    sessions = a0["replication"]["sessions"]
    c = Client()
    c.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    new_a, new_b = rotate("site-a"), rotate("site-b")
    out = subprocess.run([sys.executable, "-m", "geomirror", "reload-tls", "--lab-site", "site-b"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"site-b now presents certificate serial {new_b}" in out.stdout
    a = wait_for(lambda: (s := labcli.site_status("site-a")) and s["tls"]["serial"] == new_a and s, 20,
                 "site-a to pick up its rotated certificate by itself")
    picked_up = time.monotonic() - t0
    epoch = a["committed_epoch"]
    time.sleep(1.5)
    a = labcli.site_status("site-a")
    res = c.finish()
    # Protection never stopped: the same replication session, checkpoints still committed,
    # never unprotected, the lease held at the same generation, the client counting on.
    assert a["replication"]["sessions"] == sessions, "the replication session was not dropped"
    assert a["committed_epoch"] > epoch and a["protected"] and a["protection_changes"] == a0["protection_changes"]
    assert a["lease_generation"] == a0["lease_generation"]
    # the client counted on throughout: every reply in order, none missing, no long stall (a
    # count of operations depends on the machine's load: 48 in ~4 s on a loaded CI run, where the
    # scan's pause put the interval at 50 ms)
    assert res.error is None and not res.violations and res.ops > 0, (res.error, res.violations)
    assert res.longest_stall_s < 2.0, res.longest_stall_s
    # New sessions present the new certificates: cut the WAN so both sides reconnect.
    world.partition(False)
    time.sleep(2.0)
    world.partition(True)
    a = wait_for(lambda: (s := labcli.site_status("site-a")) and s["replication"]["sessions"] > sessions
                 and s["replication"]["state"] == "protected" and s, 90, "protection to resume after the cut")
    b = labcli.site_status("site-b")
    assert a["replication"]["peer_cert_serial"] == new_b
    assert b["replication"]["peer_cert_serial"] == new_a
    print(f"\nrotation: site-a took up serial {new_a} by itself in {picked_up:.1f}s, site-b {new_b} on request; "
          f"{res.ops} client operations meanwhile, longest stall {res.longest_stall_s:.2f}s; after a WAN cut "
          f"each side sees the other's new certificate")
