"""The lab's etcd cluster (`geomirror lab up --lease etcd`, DESIGN.md "Lab verbs").

Three etcd 3.4 members, one each in gm-witness, gm-site-a and gm-site-b, on their "Internet"
addresses (not wan0), client port 2379 and peer port 2380, both over TLS under the pair CA
with client certificates required. Losing a site (`lab crash`) kills its member with
everything else in the namespace, as in a real deployment; `lab revive` starts it again on
its data directory and it rejoins. The site configs get a `[lease]` table in place of
`[witness]`; the built-in witness does not run.
"""

from __future__ import annotations

import re
import ssl
import time
import urllib.request

import structlog

from geomirror import netns, pairing
from lab import world

log = structlog.get_logger(__name__)

CLIENT_PORT, PEER_PORT = 2379, 2380
# Member name -> (namespace, Internet-side address), as in DESIGN.md's lab table. (Literal
# names: lab.world imports this module, so nothing of it is read here at import time.)
MEMBERS = {
    "etcd-witness": ("gm-witness", "198.18.3.2"),
    "etcd-site-a": ("gm-site-a", "198.18.1.2"),
    "etcd-site-b": ("gm-site-b", "198.18.2.2"),
}
SITE_MEMBER = {"site-a": "etcd-site-a", "site-b": "etcd-site-b"}
# A 50 ms heartbeat and a 500 ms election timeout: a lost leader is replaced within about a
# second, and etcd's shortest lease (1.5 election timeouts) stays under the lab's 2 s TTL.
HEARTBEAT_MS, ELECTION_MS = 50, 500
LEASE_TTL_MS, RENEW_EVERY_MS = 2000, 400
PREFIX = "/geomirror-lab"


def url(member: str, port: int = CLIENT_PORT) -> str:
    return f"https://{MEMBERS[member][1]}:{port}"


def endpoints_for(site: str) -> list[str]:
    """A site lists its own member first (the nearest, as an operator would), then the others."""
    own = SITE_MEMBER[site]
    return [url(own)] + [url(m) for m in MEMBERS if m != own]


def lease_table(site: str) -> str:
    eps = ", ".join(f'"{e}"' for e in endpoints_for(site))
    return ("[lease]\n"
            'backend = "etcd"\n'
            f"endpoints = [{eps}]\n"
            f'prefix = "{PREFIX}"\n'
            f"lease_ttl_ms = {LEASE_TTL_MS}\n"
            f"renew_every_ms = {RENEW_EVERY_MS}\n")


def site_config(text: str, site: str) -> str:
    """A lab site config with its [witness] table replaced by the etcd [lease] table."""
    new, n = re.subn(r"^\[witness\]\n(?:(?!\[).*\n)*", lambda _m: lease_table(site) + "\n", text,
                     count=1, flags=re.M)
    if n != 1:
        raise world.LabError(f"the lab config of {site} has no [witness] table to replace with [lease]")
    return new


def issue_certs() -> None:
    """One certificate per member under the lab's pair CA, naming its address: clients check
    the address they dial (no lease.server_name), members check each other's."""
    pki = world.LAB_DIR / "pki"
    for member, (_ns, addr) in MEMBERS.items():
        if not (pki / f"{member}.pem").exists():
            pairing.issue_cert(pki, member, ips=[addr])


def _argv(member: str) -> list[str]:
    pki = world.LAB_DIR / "pki"
    cluster = ",".join(f"{m}={url(m, PEER_PORT)}" for m in MEMBERS)
    cert, key, ca = str(pki / f"{member}.pem"), str(pki / f"{member}.key"), str(pki / "ca.pem")
    return ["etcd", "--name", member, "--data-dir", str(world.LAB_DIR / "etcd" / member),
            "--listen-client-urls", url(member), "--advertise-client-urls", url(member),
            "--listen-peer-urls", url(member, PEER_PORT), "--initial-advertise-peer-urls", url(member, PEER_PORT),
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "geomirror-lab",
            "--heartbeat-interval", str(HEARTBEAT_MS), "--election-timeout", str(ELECTION_MS),
            "--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
            "--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca,
            "--peer-client-cert-auth", "--logger", "zap", "--log-level", "warn"]


def start_member(member: str) -> int:
    """Start (or start again, on its data directory: it rejoins) one member in its namespace."""
    ns, _addr = MEMBERS[member]
    data = world.LAB_DIR / "etcd"
    data.mkdir(mode=0o700, exist_ok=True)
    return world.spawn(ns, member, _argv(member))


def stop_member(member: str) -> int | None:
    """Lose one member (SIGKILL), the rest of its namespace untouched. Returns its pid."""
    pid = world.load_state().get("pids", {}).get(member)
    if not isinstance(pid, int) or not world._alive(pid):
        return None
    world.kill_pids([pid])
    world._wait_gone([pid], 5.0)
    log.info("lab.etcd_member_stopped", member=member, pid=pid)
    return pid


def member_health(member: str, timeout: float = 1.0) -> str | None:
    """None if the member says it is healthy (it has a leader), else why not. Asked from inside
    its namespace with site-a's client certificate."""
    ns, _addr = MEMBERS[member]
    pki = world.LAB_DIR / "pki"
    ctx = pairing.client_context(pki / "ca.pem", pki / "site-a.pem", pki / "site-a.key")
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
    try:
        with netns.inside(ns):
            with opener.open(url(member) + "/health", timeout=timeout) as r:
                body = r.read()
    except (OSError, ssl.SSLError) as e:
        return str(e)
    return None if b'"true"' in body else f"unhealthy: {body[:120]!r}"


def health() -> dict[str, str | None]:
    return {m: member_health(m) for m in MEMBERS}


def wait_healthy(members=None, timeout: float = 30.0) -> None:
    members = list(members or MEMBERS)
    deadline = time.monotonic() + timeout
    while True:
        why = {m: member_health(m) for m in members}
        if not any(why.values()):
            return
        if time.monotonic() > deadline:
            raise world.LabError(f"etcd members not healthy after {timeout:.0f}s: "
                                 + "; ".join(f"{m}: {w}" for m, w in why.items() if w)
                                 + f" (logs: {world.LAB_DIR}/etcd-*.log)")
        time.sleep(0.1)


def start_cluster() -> None:
    issue_certs()
    for member in MEMBERS:
        start_member(member)
    wait_healthy()
    log.info("lab.etcd_up", members=list(MEMBERS))
