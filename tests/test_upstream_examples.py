"""The upstream router examples in configs/ parse in the routers they are for."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BIRD = shutil.which("bird") or "/usr/sbin/bird"
VTYSH = shutil.which("vtysh")


@pytest.mark.skipif(not Path(BIRD).exists(), reason="BIRD 2 is not installed")
def test_bird_example_parses():
    r = subprocess.run([BIRD, "-p", "-c", str(CONFIGS / "bird-upstream.conf")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(VTYSH is None, reason="FRR (vtysh) is not installed")
def test_frr_example_parses_and_a_typo_does_not(tmp_path):
    good = CONFIGS / "frr-upstream.conf"
    r = subprocess.run([VTYSH, "-C", "-f", str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.conf"
    bad.write_text(good.read_text().replace(" set local-preference 0", " set local-prefrence 0"))
    r = subprocess.run([VTYSH, "-C", "-f", str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "local-prefrence" in r.stdout + r.stderr


def test_frr_example_accepts_both_origin_ases_for_both_prefixes():
    text = (CONFIGS / "frr-upstream.conf").read_text()
    assert "permit 198.51.100.0/24" in text and "permit 2001:db8:100::/48" in text
    for asn in (65010, 65020):
        assert f"permit ^{asn}(_{asn})*$" in text
    assert "bgp graceful-restart-disable" in text and "permit graceful-shutdown" in text
