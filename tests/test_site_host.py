"""The site's TAP gets the guest's gateway addresses and loses them, on a real TAP in a
private network namespace (`unshare -n`: nothing of it is seen outside the test process)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from geomirror.site.host import GATEWAY_MAC

ROOT = Path(__file__).resolve().parent.parent

# runs inside the private namespace: makes a TAP, calls configure_tap up/up/down/down/up and
# reports the TAP's addresses (with their flags) and IPv6 routes after each call
SCRIPT = r"""
import json, socket, sys
from pyroute2 import IPRoute
from geomirror.site.host import GATEWAY_MAC, TAP_NAME, configure_tap
with IPRoute() as ip:
    ip.link("add", ifname=TAP_NAME, kind="tuntap", mode="tap")
out = []
for up in (True, True, False, False, True):
    configure_tap(TAP_NAME, "198.51.100.1", 24, up, "2001:db8:100::1", 48)
    with IPRoute() as ip:
        idx = ip.link_lookup(ifname=TAP_NAME)[0]
        link = ip.get_links(idx)[0]
        out.append({
            "mac": link.get_attr("IFLA_ADDRESS"),
            "addrs": sorted([a.get_attr("IFA_ADDRESS"), a["prefixlen"], a.get_attr("IFA_FLAGS") or a["flags"]]
                            for a in ip.get_addr(index=idx) if a.get_attr("IFA_SCOPE") != 253 and a["scope"] != 253),
            "routes6": sorted(f"{r.get_attr('RTA_DST')}/{r['dst_len']}" for r in ip.get_routes(family=socket.AF_INET6)
                              if r.get_attr("RTA_OIF") == idx and r["dst_len"] == 48),
        })
print(json.dumps(out))
"""

IFA_F_NODAD, IFA_F_TENTATIVE = 0x02, 0x40


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare (a private network namespace)")
def test_tap_gets_both_gateways_without_dad_and_loses_them():
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)
    up, up_again, down, down_again, up_last = steps
    assert up["mac"] == GATEWAY_MAC
    assert [a[:2] for a in up["addrs"]] == [["198.51.100.1", 24], ["2001:db8:100::1", 48]]
    flags6 = up["addrs"][1][2]
    assert flags6 & IFA_F_NODAD and not flags6 & IFA_F_TENTATIVE  # usable at once after a takeover
    assert up["routes6"] == ["2001:db8:100::/48"]
    assert up_again == up == up_last  # idempotent, and back after a down
    assert down["addrs"] == [] and down["routes6"] == [] and down_again == down
