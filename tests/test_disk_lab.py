"""The disk guest in the lab (real QEMU, ExaBGP, BIRD): no acknowledged disk write is lost when
the primary site is lost at a random moment (a few trials in CI; the long run is
`python -m tests.disk_torture --trials 10`, and `--no-disk-replication` shows that the check has
teeth)."""

from __future__ import annotations

import os

import pytest

from tests import disk_torture

pytestmark = pytest.mark.lab

TRIALS = int(os.environ.get("GEOMIRROR_DISK_TORTURE_TRIALS", "2"))


@pytest.mark.parametrize("trial", range(TRIALS))
def test_crash_at_random_moment_every_acknowledged_record_reads_back(lab_env, trial):
    r = disk_torture.run_trial(seed=2000 + trial)
    print(f"\ntrial {trial}: {disk_torture.summary(r)}")
    assert r.error is None, r.error
    assert r.appends_before_crash > 3 and len(r.acked) > r.appends_before_crash, "the client did no work"
    assert not r.violations, r.violations
