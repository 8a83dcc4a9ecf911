"""Output commit under a crash at a random moment (a few trials in CI; the 20-trial run is
`python -m tests.torture --trials 20`, and `--no-gate` shows that this check has teeth)."""

from __future__ import annotations

import os

import pytest

from tests import torture

pytestmark = pytest.mark.lab

TRIALS = int(os.environ.get("GEOMIRROR_TORTURE_TRIALS", "2"))


@pytest.mark.parametrize("trial", range(TRIALS))
def test_crash_at_random_moment_client_sees_consecutive_replies(lab_env, trial):
    r = torture.run_trial(seed=1000 + trial)
    print(f"\ntrial {trial}: crash after {r.crash_after_s:.2f}s, {r.ops} ops, resumed epoch "
          f"{r.resumed_epoch}, longest stall {r.longest_stall_s:.2f}s")
    assert r.error is None, r.error
    assert r.ops > 0 and len(r.incrs) > 10, "the client did no work"
    assert not r.violations, r.violations
