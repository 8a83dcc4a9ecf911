"""Policy when the standby is unreachable: continue-unprotected after the grace period
(stall, the default, is what every other lab test runs)."""

from __future__ import annotations

import time

import pytest

from lab import cli as labcli

pytestmark = pytest.mark.lab


def test_continue_unprotected_after_grace_while_holding_the_lease(lab_env):
    lab_env.up(config_edits={'unreachable_policy = "stall"':
                             'unreachable_policy = "continue-unprotected"\nunprotected_grace_ms = 1500'})
    labcli.wait_protected()
    labcli.wait_reachable()
    mc = labcli.Memcache(labcli.client_connect(timeout=30))
    mc.set("k", "0")
    lab_env.crash("site-b")
    t0 = time.monotonic()
    assert mc.incr("k") == 1  # held until the grace period ends, then released unprotected
    waited = time.monotonic() - t0
    a = labcli.site_status("site-a")
    assert a["ha_state"] == "active_unprotected" and a["gate"]["mode"] == "open"
    assert a["protection_changes"] >= 2 and a["ha"]["holding_lease"]
    assert any(e["event"] == "protection.grace_over" and e["gate"] == "open" for e in a["timeline"])
    t1 = time.monotonic()
    for i in range(50):
        assert mc.incr("k") == i + 2
    print(f"\ncontinue-unprotected: first reply after {waited:.2f}s (grace 1.5 s + detection); "
          f"then 50 unprotected replies in {time.monotonic() - t1:.2f}s")
    mc.close()
