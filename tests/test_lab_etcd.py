"""The lease on a real 3-member etcd cluster in the lab (`lab up --lease etcd`): one member in
gm-witness and one at each site, so losing a site loses its member. Real etcd, QEMU, ExaBGP,
BIRD; the client on one memcached connection throughout."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from geomirror import netns, pairing
from geomirror.lease import EtcdLease, LeaseUnreachable
from lab import cli as labcli, world
from lab import etcd as lab_etcd
from tests.test_bgp_failover import AS_A, AS_B, Client, best_origin, origins, wait_for

pytestmark = pytest.mark.lab

GUEST = "pbx"


@pytest.fixture
def lab_etcd_up(lab_env):
    lab_env.up(lease="etcd")
    labcli.wait_protected()
    labcli.wait_reachable()
    return lab_env


def _site_log(site: str) -> str:
    return (world.LAB_DIR / f"{site}.log").read_text(errors="replace")


def _as_site(site: str, cert_dir=None, ca=None) -> EtcdLease:
    """A lease client of the real cluster, as `site` (or a stranger with another CA's files)."""
    pki = world.LAB_DIR / "pki"
    d = cert_dir or pki
    ctx = pairing.client_context(ca or pki / "ca.pem", d / f"{site}.pem", d / f"{site}.key")
    return EtcdLease([lab_etcd.url(m) for m in ("etcd-witness", "etcd-site-b")], ctx, site,
                     prefix=lab_etcd.PREFIX, timeout_s=2.0)


def _in_witness_ns(coro_fn):
    """Run an asyncio client inside gm-witness (its sockets are made there)."""
    with netns.inside(world.WITNESS):
        return asyncio.run(coro_fn())


def test_site_loss_the_survivors_grant_site_b_a_higher_generation(lab_etcd_up, tmp_path):
    c = Client()
    c.start()
    time.sleep(1.5)
    t_crash = time.time()
    world.crash("site-a")  # its etcd member goes with it
    wait_for(lambda: best_origin() == AS_B, 60, "BIRD's best route to come from AS 64502")
    t_route = time.time()
    time.sleep(1.5)
    res = c.finish()
    b = labcli.site_status("site-b")
    assert b["role"] == "primary" and b["lease_generation"] == 2, (b["role"], b["lease_generation"])
    resumed = next(e for e in b["timeline"] if e["event"] == "takeover.resumed")

    async def against_the_cluster():
        async with _as_site("site-a") as a:
            held = await a.get(GUEST)
            assert (held["holder"], held["generation"]) == ("site-b", 2)
            old = await a.renew(GUEST, 1, 2000)  # the lost site's lease cannot come back...
            assert (old.ok, old.holder, old.generation) == (False, "site-b", 2)
            retake = await a.acquire(GUEST, 2000)  # ...nor be taken again while site-b holds it
            assert (retake.ok, retake.holder) == (False, "site-b")
            assert not (await a.release(GUEST, 1)).ok
        other = pairing.create_pair(tmp_path / "other", ["site-a", "site-b"], [])
        async with _as_site("site-a", cert_dir=other.dir) as stranger:
            with pytest.raises(LeaseUnreachable, match="etcd refused this site's certificate"):
                await stranger.acquire(GUEST, 2000)
        async with _as_site("site-b") as b_:
            st = await b_.get(GUEST)
            assert (st["holder"], st["generation"]) == ("site-b", 2)  # nothing of the above changed it

    _in_witness_ns(against_the_cluster)
    print(f"\netcd, site A lost with its member: site B resumed at {resumed['wall'] - t_crash:.2f}s at "
          f"generation 2, BIRD via AS 64502 at {t_route - t_crash:.2f}s; client's longest stall "
          f"{res.longest_stall_s:.2f}s over {len(res.incrs)} consecutive replies; old generation and a stranger's "
          "certificate refused by the cluster")


def test_member_loss_moves_nothing_quorum_loss_no_takeover_then_promote(lab_etcd_up):
    c = Client()
    c.start()
    time.sleep(1.0)
    lab_etcd.stop_member("etcd-witness")
    time.sleep(4)  # two lease TTLs
    a, b = labcli.site_status("site-a"), labcli.site_status("site-b")
    assert (a["role"], a["lease_generation"], a["ha_state"]) == ("primary", 1, "active_protected"), a["ha_state"]
    assert b["role"] == "standby"
    for s in (a, b):
        assert any("198.18.3.2:2379 does not answer" in m for m in s["alarms"]), (s["site"], s["alarms"])
    assert "lease.etcd_member_down" in _site_log("site-a") and "lease.etcd_member_down" in _site_log("site-b")
    assert best_origin() == AS_A

    lab_etcd.stop_member("etcd-site-b")  # quorum lost: only site A's member is left
    time.sleep(5)
    a, b = labcli.site_status("site-a"), labcli.site_status("site-b")
    assert b["role"] == "standby" and b["ha_state"] in ("standby", "taking_over"), b["ha_state"]
    # The documented lease rules (docs/state-machine.md, "Quorum lost"): the primary rides through
    # while its standby acknowledges, and fences as soon as the standby is lost too (on a loaded
    # machine a checkpoint that misses its QMP deadline breaks the session: that is such a loss).
    if a["ha_state"] == "fenced":
        rode_through = "fenced by the rules: standby lost while the lease was lapsed"
        assert any("the standby is lost while the lease is lapsed" in m for m in a["alarms"]), a["alarms"]
    else:
        rode_through = "rode through"
        assert a["role"] == "primary" and a["ha_state"] == "active_protected" and a["gate"]["allowed"], \
            a["ha_state"]
        ops = c.res.ops
        time.sleep(1)
        assert c.res.ops > ops, "the client stopped while the primary rode through the quorum loss"
        assert best_origin() == AS_A

    world.crash("site-a")  # and now the primary: the cluster cannot decide anything
    time.sleep(4)
    b = labcli.site_status("site-b")
    assert b["role"] == "standby", "took over without a quorum"
    assert any("unreachable" in m for m in b["alarms"]), b["alarms"]
    rep = labcli.site_call("site-b", "POST", "/v1/promote", {"force": True}, timeout=60)
    assert rep["state"] == "active_unprotected"
    wait_for(lambda: best_origin() == AS_B, 60, "the route to follow the promoted site")
    time.sleep(1)
    res = c.finish()

    lab_etcd.start_member("etcd-witness")  # the quorum comes back (witness + site B)
    lab_etcd.start_member("etcd-site-b")
    lab_etcd.wait_healthy(["etcd-witness", "etcd-site-b"])
    wait_for(lambda: (labcli.site_status("site-b") or {}).get("lease_generation", 0) >= 2, 60,
             "site B to hold a real lease once the quorum is back")
    b = labcli.site_status("site-b")
    assert b["role"] == "primary" and b["lease_generation"] == 2
    print(f"\netcd: one member lost -> nothing moved, alarm at both sites; quorum lost -> primary {rode_through}, "
          f"no takeover after site loss; promote --force resumed epoch {rep['epoch']}, a real lease at "
          f"generation 2 once the quorum returned; client's longest stall {res.longest_stall_s:.2f}s")


def test_wan_partition_with_every_member_up_never_two_announcing(lab_etcd_up):
    c = Client()
    c.start()
    time.sleep(1.0)
    seen_both, samples = [], [0]
    stop = threading.Event()

    def watch_bird():
        while not stop.is_set():
            if {AS_A, AS_B} <= origins():
                seen_both.append(time.time())
            samples[0] += 1
            time.sleep(0.05)

    w = threading.Thread(target=watch_bird, daemon=True)
    w.start()
    world.partition(False)
    time.sleep(6)
    a, b = labcli.site_status("site-a"), labcli.site_status("site-b")
    assert a["role"] == "primary" and a["lease_generation"] == 1
    assert b["role"] == "standby" and b["ha_state"] in ("standby", "taking_over"), b["ha_state"]
    world.partition(True)
    wait_for(lambda: (labcli.site_status("site-a") or {}).get("replication", {}).get("state") == "protected"
             and labcli.site_status("site-a")["replication"]["sessions"] >= 2, 60, "protection to resume")
    time.sleep(1.0)
    stop.set()
    w.join()
    res = c.finish()
    assert not seen_both, f"BIRD had the prefix from both sites at {seen_both[:3]}"
    assert labcli.site_status("site-b")["role"] == "standby"
    print(f"\netcd, WAN partition 6 s: no takeover, never two origins in {samples[0]} BIRD samples, "
          f"client's longest stall {res.longest_stall_s:.2f}s, no step back")
