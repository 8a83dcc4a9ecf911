"""The guest's PBX across a site loss, measured with sipp from gm-client (lab).

Calls to sip:echo@198.51.100.10 are set up at 2 per second and each held 12 s, so site A is
lost (at 4 s) while some calls are up and others are being set up; every call must end
with a 200 to its BYE. A registration made before the loss must still route a call after it.
The longer run (5 site losses, 20 calls each, both transports): `python -m tests.sip_torture`.
"""

from __future__ import annotations

import time

import pytest

from lab import cli as labcli, sipp, world

pytestmark = pytest.mark.lab

CALLS, RATE, HOLD_MS, CRASH_AT_S = 20, 2.0, 12_000, 4.0


def lose_site_a_at(at_s: float):
    """A `during` for sipp.run_uac: crash site A `at_s` after sipp started, wait for site B."""
    out: dict = {}

    def during(elapsed):
        while elapsed() < at_s:
            time.sleep(0.05)
        t = time.monotonic()
        world.crash("site-a")
        out["takeover"] = labcli.takeover("site-b")
        out["takeover_s"] = time.monotonic() - t

    return during, out


@pytest.mark.parametrize("transport", ["t1", "u1"], ids=["tcp", "udp"])
def test_calls_survive_a_site_loss(lab_up, tmp_path, transport):
    during, out = lose_site_a_at(CRASH_AT_S)
    run = sipp.run_uac(tmp_path / transport, transport=transport, calls=CALLS, rate=RATE, hold_ms=HOLD_MS,
                       during=during)
    print(f"\nsite loss with {CALLS} calls up/being set up: {run.summary()}; site B took over "
          f"{out.get('takeover_s', float('nan')):.2f}s after the kill")
    assert run.created == CALLS
    assert not run.problems, run.problems
    assert labcli.site_status("site-b")["role"] == "primary"


def test_registration_survives_a_site_loss(lab_up, tmp_path):
    phone = sipp.start_phone(tmp_path / "phone", 5062)
    try:
        reg = sipp.register(tmp_path / "register", "alice", 5062)
        assert not reg.problems, reg.problems
        world.crash("site-a")
        labcli.takeover("site-b")
        call = sipp.run_uac(tmp_path / "call", transport="u1", calls=1, rate=1, hold_ms=500, service="alice")
        print(f"\nregistered before the loss, called after it: {call.summary()}")
        assert not call.problems, call.problems
    finally:
        phone.kill()
        phone.wait()
