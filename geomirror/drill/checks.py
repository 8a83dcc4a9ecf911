"""Pre-flight: is the pair healthy enough for a drill? Pure: both sites' /v1/status in, checks out.

A drill moves the guest on purpose; it must only start when nothing is lost by doing so and
the move can be undone: the guest protected, little backlog, the peer and the lease backend
reachable from both sites, BGP up everywhere, the standby's replica current.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    max_backlog_epochs: int = 4  # checkpoints the primary may have waiting for an ack
    max_replica_lag_epochs: int = 10  # committed epochs the standby may trail the primary's status by


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str  # one sentence: what was seen (the refusal's reason when not ok)

    def as_dict(self) -> dict:
        return asdict(self)


def locate(statuses: dict[str, dict | None]) -> tuple[str | None, str | None]:
    """(the site that runs the guest, the other one) from the two sites' status (None: no answer)."""
    names = list(statuses)
    running = [n for n in names if (statuses[n] or {}).get("role") == "primary"]
    if len(running) != 1:
        return None, None
    other = [n for n in names if n != running[0]]
    return running[0], other[0] if other else None


def preflight(statuses: dict[str, dict | None], limits: Limits = Limits()) -> list[Check]:
    """Every check, in order; the first failed one is the refusal's reason."""
    out: list[Check] = []
    silent = [n for n, s in statuses.items() if s is None]
    out.append(Check("reachable", not silent,
                     f"{' and '.join(silent)} did not answer on the control API" if silent
                     else "both sites answer on the control API"))
    if silent:
        return out
    prim, sb = locate(statuses)
    if prim is None or sb is None:
        roles = ", ".join(f"{n} is {s.get('role')}" for n, s in statuses.items())
        out.append(Check("roles", False, f"exactly one site must run the guest ({roles})"))
        return out
    P, S = statuses[prim], statuses[sb]
    out.append(Check("roles", S.get("role") == "standby",
                     f"{prim} runs the guest, {sb} is {S.get('role')}"))
    rep = (P.get("replication") or {}).get("state")
    ok = bool(P.get("protected")) and P.get("ha_state") == "active_protected" and rep == "protected"
    out.append(Check("protected", ok, f"{prim} is {'' if ok else 'not '}protected (HA {P.get('ha_state')}, "
                                      f"replication {rep})"))
    backlog = int(P.get("backlog_epochs") or 0)
    out.append(Check("backlog", backlog <= limits.max_backlog_epochs,
                     f"{prim} has {backlog} checkpoints waiting for an ack (at most "
                     f"{limits.max_backlog_epochs})"))
    lost = [n for n, s in ((prim, P), (sb, S)) if not (s.get("ha") or {}).get("peer_alive")]
    out.append(Check("peer", not lost, f"{' and '.join(lost)} does not hear its peer" if lost
                     else "each site hears its peer's heartbeats"))
    nowit = [n for n, s in ((prim, P), (sb, S)) if (s.get("ha") or {}).get("witness_reachable") is not True]
    out.append(Check("lease_backend", not nowit,
                     f"the lease backend does not answer {' and '.join(nowit)} (a drill moves the lease)" if nowit
                     else "the lease backend answers both sites"))
    down = [f"{n}'s session with {addr} is {st}" for n, s in ((prim, P), (sb, S))
            for addr, st in ((s.get("bgp") or {}).get("neighbors") or {}).items() if st != "up"]
    off = [n for n, s in ((prim, P), (sb, S)) if s.get("bgp") is None]
    out.append(Check("bgp", not down, "; ".join(down) if down else
                     ("every BGP session is up" + (f" (BGP is off at {' and '.join(off)}: the route's move "
                                                   "is not measured)" if off else ""))))
    srep = S.get("replication") or {}
    lag = int(P.get("committed_epoch") or 0) - int(S.get("committed_epoch") or 0)
    problems = []
    if srep.get("state") != "replicating":
        problems.append(f"its replica is {srep.get('state')}")
    if not srep.get("valid", False):
        problems.append("its replica is not valid")
    if lag > limits.max_replica_lag_epochs:
        problems.append(f"it trails {prim} by {lag} epochs (at most {limits.max_replica_lag_epochs})")
    if not srep.get("hot_standby", False):
        problems.append("no hot standby QEMU waits")
    out.append(Check("replica", not problems,
                     f"{sb}'s replica is current (epoch {S.get('committed_epoch')}, {max(lag, 0)} behind)"
                     if not problems else f"{sb}: " + "; ".join(problems)))
    return out


def refusal(checks: list[Check]) -> str | None:
    """The one sentence a refused drill prints: the first failed check, or None when all passed."""
    bad = next((c for c in checks if not c.ok), None)
    return None if bad is None else f"drill refused by pre-flight ({bad.name}): {bad.detail}"
