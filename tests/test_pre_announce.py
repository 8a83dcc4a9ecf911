"""The standby's pre-announcement (bgp.standby_prepend): routers hold the backup path to the
standby before it is needed. The pure rules (which AS paths are a backup) and, in the lab with
real ExaBGP, BIRD and QEMU: the backup path is in BIRD's table beside the active one for both
prefixes, a planned switchover still drains until the new site's ACTIVE route is seen (not its
backup), the demoted site pre-announces in turn, and a site loss never leaves BIRD without a
route for the guest while the client's connection carries on."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from bgp.speaker import ReceivedRoute
from geomirror import ha
from geomirror.config import load_site
from geomirror.site.routing import BgpWatch, is_backup_path, origin_run
from lab import cli as labcli, world
from tests.test_bgp_failover import AS_A, AS_B, Client, wait_for
from tests.test_dual_stack import RoutesSpeaker
from tests.test_switchover import switchover

STANDBY_PREPEND = 2


# ---------------------------------------------------------------- pure parts
def test_origin_run_and_backup_paths():
    assert origin_run((64500, 64502)) == 1
    assert origin_run((64500, 64502, 64502, 64502)) == 3
    assert origin_run((64502, 64500, 64502)) == 1
    assert origin_run(()) == 0
    assert not is_backup_path((64500, 64502, 64502, 64502), 0), "no pre-announcement: every path is active"
    assert is_backup_path((64500, 64502, 64502, 64502), 2)
    assert not is_backup_path((64500, 64502, 64502), 2), "the active route with one prepend is not the backup"
    assert is_backup_path((64500, 64502, 64502, 64502, 64502), 2)


def test_the_peers_backup_path_is_not_its_route():
    """A draining site withdraws once the peer's ACTIVE route reaches it: the peer's pre-announced
    backup path (seen at once when we drain) must not count, nor mark the route as moved."""
    cfg = load_site(world.repo_configs() / "site-a.toml")
    cfg = replace(cfg, bgp=replace(cfg.bgp, standby_prepend=STANDBY_PREPEND))
    backup = ReceivedRoute("198.18.1.1", world.GUEST_PREFIX, (64500, AS_B, AS_B, AS_B), None)
    active = ReceivedRoute("198.18.1.1", world.GUEST_PREFIX, (64500, AS_B), None)
    for routes, seen, origins in (([backup], False, []), ([active], True, [AS_B]), ([], False, [])):
        events, marks = [], []
        BgpWatch(cfg, RoutesSpeaker(routes), events.append, lambda ev, **f: marks.append(f)).changed()
        assert [e.originated_by_peer for e in events if isinstance(e, ha.PeerRouteSeen)] == [seen], routes
        assert marks and marks[0]["origins"] == origins


# ---------------------------------------------------------------- lab
@pytest.fixture
def lab_pre_announce(lab_env):
    lab_env.up(config_edits={"upstream_loss_hold_down_s = 20\n":
                             f"upstream_loss_hold_down_s = 20\nstandby_prepend = {STANDBY_PREPEND}\n"})
    labcli.wait_protected()
    labcli.wait_reachable()
    return lab_env


def paths(prefix: str) -> dict[str, list[tuple[int, ...]]]:
    """BIRD's routes for `prefix`: {"best": [path], "other": [paths]}."""
    out: dict[str, list[tuple[int, ...]]] = {"best": [], "other": []}
    for r in world.bird_guest_routes(prefix):
        out["best" if r["best"] else "other"].append(tuple(r["as_path"]))
    return out


def backup_held(active_as: int, backup_as: int):
    """Both prefixes: best = the active site's plain path, and the standby's prepended one held."""
    want_backup = (backup_as,) * (1 + STANDBY_PREPEND)
    for prefix in (world.GUEST_PREFIX, world.GUEST_PREFIX6):
        p = paths(prefix)
        if p["best"] != [(active_as,)] or want_backup not in p["other"]:
            return False
    return True


class Sampler(threading.Thread):
    """BIRD's table for both prefixes every ~20 ms: samples, and the samples without a route."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.samples = {world.GUEST_PREFIX: 0, world.GUEST_PREFIX6: 0}
        self.gaps = {world.GUEST_PREFIX: 0, world.GUEST_PREFIX6: 0}

    def run(self):
        while not self.stop.is_set():
            for prefix in self.samples:
                self.samples[prefix] += 1
                if not any(r["best"] for r in world.bird_guest_routes(prefix)):
                    self.gaps[prefix] += 1
            time.sleep(0.02)

    def finish(self):
        self.stop.set()
        self.join(10)
        return self.samples, self.gaps


def first_wall(status: dict, event: str, after: float) -> float | None:
    return next((e["wall"] for e in status["timeline"] if e["event"] == event and e["wall"] >= after), None)


@pytest.mark.lab
def test_pre_announced_backup_path_switchover_and_site_loss(lab_pre_announce):
    wait_for(lambda: backup_held(AS_A, AS_B), 30, "BIRD to hold site-b's backup path beside site-a's route")
    b = labcli.site_status("site-b")
    assert b["bgp_backup"] and not b["bgp_announced"], b
    c = Client()
    c.start()
    sampler = Sampler()
    sampler.start()
    time.sleep(1.0)

    # planned switchover: site-a drains and withdraws only after site-b's ACTIVE route reached it
    wall0 = time.time()
    there = switchover("site-a", "site-b", AS_B)
    a, b = labcli.site_status("site-a"), labcli.site_status("site-b")
    drained, withdrawn = first_wall(a, "bgp.drained", wall0), first_wall(a, "bgp.withdrawn", wall0)
    resumed_b = first_wall(b, "takeover.resumed", wall0)
    assert drained and withdrawn and resumed_b, [e["event"] for e in a["timeline"] if e["wall"] >= wall0]
    # site-b's backup path reaches site-a as soon as it drains; site-b's active route only after
    # it resumed: a withdrawal before that resume would have taken the backup path for the move
    assert withdrawn >= resumed_b, f"site-a withdrew {resumed_b - withdrawn:.3f}s before site-b resumed the guest"
    seen = [e for e in a["timeline"] if e["event"] == "bgp.route_seen" and drained <= e["wall"] <= withdrawn]
    backup_seen = any(AS_B in (e.get("backup") or []) and AS_B not in e["origins"] for e in seen)
    active_seen = [e["wall"] for e in seen if AS_B in e["origins"]]
    assert active_seen, seen
    wait_for(lambda: backup_held(AS_B, AS_A), 60, "the demoted site-a to pre-announce the backup path")

    # site loss: the backup path is already in BIRD, so the prefix is never unrouted
    time.sleep(1.0)
    t_crash = time.time()
    world.crash("site-b")
    wait_for(lambda: paths(world.GUEST_PREFIX)["best"] == [(AS_A,)], 60, "site-a's active route to be best")
    t_routed = time.time()
    time.sleep(1.0)
    samples, gaps = sampler.finish()
    res = c.finish()
    a = labcli.site_status("site-a")
    resumed = first_wall(a, "takeover.resumed", t_crash)
    print(f"\npre-announcement (standby_prepend {STANDBY_PREPEND}): switchover routed after "
          f"{there['routed_s']:.2f}s, site-a withdrew {withdrawn - resumed_b:.3f}s after site-b resumed (its backup path seen while "
          f"draining: {backup_seen}); "
          f"site-b lost: site-a resumed {resumed - t_crash:.2f}s and its route best {t_routed - t_crash:.2f}s "
          f"after the crash; BIRD samples {samples}, without a route {gaps}; client {len(res.incrs)} "
          f"consecutive replies, longest stall {res.longest_stall_s:.2f}s")
    assert gaps == {world.GUEST_PREFIX: 0, world.GUEST_PREFIX6: 0}, (samples, gaps)
    assert a["role"] == "primary" and a["bgp_announced"]
