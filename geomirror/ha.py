"""The HA state machine of one site: events in, actions out.

No I/O and no clock reads: time (`now`, seconds of the daemon's monotonic clock) arrives
in the events, and the daemon carries out the returned actions in order.
docs/state-machine.md has the states, the transitions and the safety argument.
The two rules everything rests on:

* a site releases guest output (gate open, prefix announced) only while it holds a
  witness lease, and closes the gate at `expires_at - fence_margin`, before the
  witness can grant the lease to anyone else;
* a site takes over only with a lease whose generation is higher than any it has
  seen held, so two sites never release output under the same generation.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from geomirror.errors import GeomirrorError
from replication.session import detection_timeout_ms


class Role(str, enum.Enum):
    """What a site holds, persisted in role.json: the one word for "this site runs the guest"."""

    PRIMARY = "primary"  # the guest runs here (booted here, or taken over)
    STANDBY = "standby"  # this site holds the replica
    FENCED = "fenced"  # neither: taken over from, operator-fenced, or its guest died


class HaState(str, enum.Enum):
    """The HA machine's state. "active" means releasing output under the lease."""

    STARTING = "starting"  # the guest runs here; asking the witness for the lease
    ACTIVE_PROTECTED = "active_protected"  # releasing output, the standby commits every epoch
    ACTIVE_UNPROTECTED = "active_unprotected"  # releasing output, no standby in sync
    STANDBY = "standby"
    TAKING_OVER = "taking_over"  # lease asked for or held, resuming the guest here
    HANDING_OVER = "handing_over"  # planned switchover: fenced here, the peer takes the lease
    FENCED = "fenced"

    def __str__(self) -> str:
        return self.value


STARTING = HaState.STARTING
ACTIVE_PROTECTED = HaState.ACTIVE_PROTECTED
ACTIVE_UNPROTECTED = HaState.ACTIVE_UNPROTECTED
STANDBY = HaState.STANDBY
TAKING_OVER = HaState.TAKING_OVER
HANDING_OVER = HaState.HANDING_OVER
FENCED = HaState.FENCED
STATES = tuple(HaState)
ACTIVE = (ACTIVE_PROTECTED, ACTIVE_UNPROTECTED)


class HaConfigError(GeomirrorError):
    """HA timing parameters that cannot be safe together."""


@dataclass(frozen=True)
class HaConfig:
    site: str
    heartbeat_interval_ms: float = 100.0
    min_timeout_ms: float = 600.0
    max_timeout_ms: float = 5000.0
    rtt_k: float = 4.0
    missed_heartbeats: int = 3
    witness: bool = True  # a lease backend is configured (the built-in witness or etcd)
    authority: str = "the witness"  # what grants the lease, as alarms name it ("the etcd cluster")
    lease_ttl_ms: float = 6000.0
    renew_every_ms: float = 1000.0
    max_clock_skew_ms: float = 250.0
    # A protected primary (its standby heartbeats and acknowledges) keeps running through a
    # witness outage instead of fencing at the lease deadline. Safe because of output commit:
    # its output leaves only on the standby's acks, and a standby that acks is not active (it
    # stops acking before it resumes), while without a witness it cannot get a lease to resume.
    # It fences as soon as the standby is lost while the lease is lapsed.
    ride_through_witness_outage: bool = True
    # A site that lost the guest to its peer (its lease taken over: a crash, a partition, a
    # restart slower than the lease) becomes the peer's standby by itself; False keeps it
    # fenced until the operator runs `geomirror rejoin`.
    auto_rejoin: bool = True
    # Planned switchover, make before break: the old site re-announces the prefix drained
    # (GRACEFUL_SHUTDOWN) and withdraws once its upstream gives it the peer's route, or after
    # this many seconds at the latest.
    drain_timeout_s: float = 10.0
    # Upstream loss at the active site: hand the guest over (a planned switchover) once every BGP
    # session has been down this long while the peer's have been up for `upstream_loss_peer_stable_s`
    # and the guest is protected; 0 = off. No such handover within `upstream_loss_hold_down_s` of
    # becoming active (nor of the last one), so a flapping upstream cannot move the guest to and fro.
    upstream_loss_handover_s: float = 0.0
    upstream_loss_peer_stable_s: float = 30.0
    upstream_loss_hold_down_s: float = 300.0
    # The standby pre-announces the guest's prefixes with a longer AS path (bgp.standby_prepend)
    # while it holds a replica and its peer is alive, so routers already hold a backup path.
    pre_announce: bool = False

    def __post_init__(self):
        if not 0 < self.heartbeat_interval_ms <= self.min_timeout_ms <= self.max_timeout_ms:
            raise HaConfigError(f"heartbeat timing must satisfy 0 < interval ({self.heartbeat_interval_ms:g} ms) "
                                f"<= min_timeout ({self.min_timeout_ms:g} ms) <= max_timeout "
                                f"({self.max_timeout_ms:g} ms)")
        if self.renew_every_ms <= 0 or self.max_clock_skew_ms < 0:
            raise HaConfigError("renew_every_ms must be positive and max_clock_skew_ms not negative")
        if self.drain_timeout_s < 0 or self.upstream_loss_handover_s < 0 or self.upstream_loss_peer_stable_s < 0 \
                or self.upstream_loss_hold_down_s < 0:
            raise HaConfigError("drain_timeout_s and the upstream_loss_* times must not be negative")
        if self.upstream_loss_handover_s and self.upstream_loss_hold_down_s < self.upstream_loss_handover_s:
            raise HaConfigError(f"upstream_loss_hold_down_s ({self.upstream_loss_hold_down_s:g}) must be at least "
                                f"upstream_loss_handover_s ({self.upstream_loss_handover_s:g}), or a flapping "
                                "upstream could move the guest to and fro")
        if self.witness and self.lease_ttl_ms < self.fence_margin_ms + self.renew_every_ms:
            raise HaConfigError(
                f"lease_ttl_ms {self.lease_ttl_ms:g} is too short: a site fences {self.fence_margin_ms:g} ms "
                f"before expiry (renew {self.renew_every_ms:g} + clock skew {self.max_clock_skew_ms:g} + one "
                f"heartbeat {self.heartbeat_interval_ms:g}), so it needs at least "
                f"{self.fence_margin_ms + self.renew_every_ms:g} ms")

    @property
    def fence_margin_ms(self) -> float:
        """How long before lease expiry a holder closes its gate: renew interval + clock skew + one tick."""
        return self.renew_every_ms + self.max_clock_skew_ms + self.heartbeat_interval_ms

    @classmethod
    def from_site_config(cls, cfg, max_clock_skew_ms: float = 250.0) -> "HaConfig":
        """From a `geomirror.config.SiteConfig` (duck-typed)."""
        hb, w, b = cfg.heartbeat, cfg.witness, cfg.bgp
        extra = dict(lease_ttl_ms=w.lease_ttl_ms, renew_every_ms=w.renew_every_ms) if w else {}
        extra.update(drain_timeout_s=b.drain_timeout_s,
                     upstream_loss_handover_s=b.upstream_loss_handover_s if b.enabled else 0.0,
                     upstream_loss_peer_stable_s=b.upstream_loss_peer_stable_s,
                     upstream_loss_hold_down_s=b.upstream_loss_hold_down_s,
                     pre_announce=bool(b.enabled and b.standby is not None))
        return cls(site=cfg.site.name, heartbeat_interval_ms=hb.interval_ms, min_timeout_ms=hb.min_timeout_ms,
                   max_timeout_ms=hb.max_timeout_ms, witness=w is not None, max_clock_skew_ms=max_clock_skew_ms,
                   auto_rejoin=cfg.site.auto_rejoin,
                   authority="the etcd cluster" if cfg.lease.backend == "etcd" else "the witness", **extra)


# ---------------------------------------------------------------- events
@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class HeartbeatReceived:
    """A heartbeat from the peer, with the link's smoothed RTT and its variance (the one estimator,
    `replication.session.LinkStats`; the machine does not smooth again)."""
    now: float
    rtt_ms: float | None
    peer_generation: int = 0  # the lease generation the peer holds or last held
    rtt_var_ms: float = 0.0
    # how long (ms) the peer has had a BGP session up without a break, as its heartbeat says;
    # 0: none up now; None: not reported (a peer of an older version, or BGP off there)
    peer_upstream_up_ms: float | None = None


@dataclass(frozen=True)
class ReplicaCommitted:
    """Standby side: the local replica committed `epoch` (there is something to resume)."""
    epoch: int


@dataclass(frozen=True)
class StandbyReady:
    """Active side: the peer holds a complete replica and acknowledges checkpoints."""
    epoch: int


@dataclass(frozen=True)
class LeaseGranted:
    generation: int
    expires_at: float  # local clock, counted from when the request was sent
    now: float


@dataclass(frozen=True)
class LeaseRenewed:
    generation: int
    expires_at: float
    now: float


@dataclass(frozen=True)
class LeaseDenied:
    holder: str | None
    generation: int


@dataclass(frozen=True)
class LeaseLost:
    """A renewal was refused: the lease expired or another site holds it."""
    holder: str | None
    generation: int


@dataclass(frozen=True)
class WitnessUnreachable:
    now: float
    detail: str = ""


@dataclass(frozen=True)
class WitnessReachable:
    now: float


@dataclass(frozen=True)
class BgpNeighborUp:
    neighbor: str
    now: float | None = None  # None: counted from the next Tick


@dataclass(frozen=True)
class BgpNeighborDown:
    neighbor: str
    now: float | None = None


@dataclass(frozen=True)
class PeerRouteSeen:
    """Whether our upstream still gives us a guest prefix originated by the peer's AS (the peer
    is alive somewhere), and whether it gives us every guest prefix so (`every_prefix`; None:
    the same, one prefix). Only the latter ends a drain: make before break holds for each
    prefix of a dual-stack guest, not just for the first the peer's announcement reaches."""
    originated_by_peer: bool
    every_prefix: bool | None = None

    @property
    def drain_done(self) -> bool:
        return self.originated_by_peer if self.every_prefix is None else self.every_prefix


@dataclass(frozen=True)
class OperatorPromote:
    now: float
    force: bool = False


@dataclass(frozen=True)
class OperatorFence:
    now: float


@dataclass(frozen=True)
class HandoverPrepared:
    """Planned switchover: the last epoch is committed by the peer with the guest paused here.
    Fence now (gate closed, prefix drained, traffic forwarded to the peer) and release the lease
    once, for the peer to take; withdraw once the peer's route is seen (or drain_timeout_s)."""
    now: float
    epoch: int


@dataclass(frozen=True)
class HandoverAborted:
    """The peer did not take over: fenced, take the lease back (granted only if nobody held it
    since) and run on here once it is held; the switchover job keeps the guest paused until then."""
    now: float
    reason: str


@dataclass(frozen=True)
class BecameStandby:
    """This site stopped its guest and holds a replica of the peer's (after a switchover, or a
    rejoin after the peer took the lease): act as the standby from now on."""
    now: float
    reason: str


@dataclass(frozen=True)
class LeaseSeen:
    """Who holds the lease now, as the lease backend answered a query (fenced sites ask)."""
    holder: str | None
    generation: int


@dataclass(frozen=True)
class ResumeDone:
    now: float


@dataclass(frozen=True)
class ResumeFailed:
    reason: str


# ---------------------------------------------------------------- actions
@dataclass(frozen=True)
class AcquireLease:
    pass


@dataclass(frozen=True)
class RenewLease:
    generation: int


@dataclass(frozen=True)
class ReleaseLease:
    generation: int


@dataclass(frozen=True)
class ResumeGuest:
    """Stop acknowledging checkpoints, then resume the guest from the last committed epoch."""


@dataclass(frozen=True)
class StopGuest:
    pass


@dataclass(frozen=True)
class QueryLease:
    """Ask the lease backend who holds the lease (answer: LeaseSeen)."""


@dataclass(frozen=True)
class Rejoin:
    """Another site runs the guest at a newer lease generation: stop ours (never releasing its
    output), seed the replica from its RAM and become that site's standby (then BecameStandby)."""
    reason: str


@dataclass(frozen=True)
class OpenGate:
    generation: int | None  # None: forced promotion without a lease


@dataclass(frozen=True)
class CloseGate:
    pass


@dataclass(frozen=True)
class Announce:
    generation: int | None


@dataclass(frozen=True)
class Withdraw:
    pass


@dataclass(frozen=True)
class PreAnnounce:
    """The standby announces the guest's prefixes with its backup policy (bgp.standby_prepend: a
    longer AS path): routers hold a path to this site before it is needed, and what arrives by it
    is forwarded to the peer that runs the guest. Replaced by Announce when this site takes over."""


@dataclass(frozen=True)
class Drain:
    """Re-announce the prefix with GRACEFUL_SHUTDOWN (RFC 8326): routers prefer any other path
    (the peer's) but keep this one until it appears, so the prefix is never unrouted."""


GUEST_ROUTE_HERE = "here"  # the guest runs (or resumes) here: its traffic goes to the guest's TAP
GUEST_ROUTE_PEER = "peer"  # the peer runs it (or takes it over): forward its traffic over the inter-site link
GUEST_ROUTE_NONE = "none"  # nobody known to run it: no route of ours (never a loop between the sites)


@dataclass(frozen=True)
class SetGuestRoute:
    """Where this site sends traffic for the guest's prefixes (GUEST_ROUTE_*)."""
    mode: str


@dataclass(frozen=True)
class HandOver:
    """Start a planned switchover to the peer (the upstream is lost here, the peer's is up)."""
    reason: str


@dataclass(frozen=True)
class SetProtection:
    protected: bool


@dataclass(frozen=True)
class Alarm:
    message: str


@dataclass(frozen=True)
class Log:
    event: str
    fields: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the machine
class HaMachine:
    """One site's HA state. `handle(event)` returns the actions to carry out, in order."""

    def __init__(self, role: Role | str, config: HaConfig, generation: int = 0, *,
                 guest_here: bool | None = None, fenced_by_operator: bool = True):
        """`guest_here`: a guest runs at this site (default: the role is primary; a fenced site
        may keep its guest). `fenced_by_operator` (a fenced role): False when circumstance fenced
        it (its guest was gone at a restart), so it may rejoin by itself."""
        try:
            role = Role(role)
        except ValueError:
            raise HaConfigError(f"initial role {role!r} must be 'primary', 'standby' or 'fenced'") from None
        self.config = config
        self.state: HaState = {Role.PRIMARY: STARTING, Role.STANDBY: STANDBY, Role.FENCED: FENCED}[role]
        self.generation = generation  # held, or last held, by this site (persist it across restarts)
        self.seen_generation = generation
        self.holding = False
        self.expires_at: float | None = None
        self.forced = False
        self.guest_running = role is Role.PRIMARY if guest_here is None else guest_here
        self.stale = False
        self.operator_fenced = role is Role.FENCED and fenced_by_operator
        self.protected = False
        self.gate_open = False
        self.rtt_ms: float | None = None  # the link's smoothed RTT, as measured by the replication session
        self.rtt_var_ms = 0.0
        self.last_heard: float | None = None
        self.peer_alive = False
        self.standby_ready = False
        self.replica_epoch: int | None = None
        self.witness_reachable: bool | None = None
        self.peer_route_seen: bool | None = None
        self.bgp_up: set[str] = set()
        self._bgp_seen = False  # a BGP event arrived (BGP is on here)
        self.takeover_by: str | None = None  # "peer_lost" | "operator"
        self.force_pending = False
        self.resuming = False
        self.alarms: dict[str, str] = {}
        self.lapsed = False  # the lease ran out during a witness outage while protected (ride-through)
        self.rejoining = False  # a Rejoin is being carried out
        self._forced_denied_since: float | None = None  # a forced site denied the lease: since when (Tick)
        self._forced_denied = False
        self._forced_denied_last = 0.0
        self._next_query: float | None = None
        self._next_acquire: float | None = None
        self._last_renew: float | None = None
        self.draining_since: float | None = None  # a drained announcement waits for the peer's route
        self._route_mode: str | None = None  # the last SetGuestRoute emitted
        self._pre_announced = False  # the last announcement sent is the standby's pre-announcement
        self._now: float | None = None  # the latest time an event carried
        self._bgp_down_since: float | None = None  # every BGP session down (while active), since
        self._bgp_up_since: float | None = None  # some BGP session up without a break, since
        self._active_since: float | None = None
        self.peer_upstream_up_ms: float | None = None
        self.upstream_handover_at: float | None = None  # the last upstream-loss handover asked for
        self._out: list = []
        self._route_mode = self.guest_route()  # the daemon applies the first one at start

    @property
    def lease_generation(self) -> int:
        return self.generation

    @property
    def timeout_ms(self) -> float:
        c = self.config
        return detection_timeout_ms(self.rtt_ms, self.rtt_var_ms, c.heartbeat_interval_ms, c.min_timeout_ms,
                                    c.max_timeout_ms, k=c.rtt_k, missed=c.missed_heartbeats)

    def handle(self, event) -> list:
        self._out = []
        now = getattr(event, "now", None)
        if now is not None:
            self._now = now
        getattr(self, "_on_" + type(event).__name__)(event)
        want = self.wants_pre_announce()
        if want != self._pre_announced:
            self._pre_announced = want
            self._emit(PreAnnounce() if want else Withdraw())
        mode = self.guest_route()
        if mode != self._route_mode:
            self._route_mode = mode
            self._emit(SetGuestRoute(mode))
        return self._out

    def guest_route(self) -> str:
        """Where this site's traffic for the guest goes, from the HA state alone. The site that
        runs the guest (or resumes it) delivers to it; a site handing over forwards to the peer,
        which takes it over; a standby forwards to a live peer (which runs it). Both sites forward
        to each other only between a handover's release and the peer's takeover (a fraction of a
        second, while the guest runs nowhere); never while one of them runs it."""
        s = self.state
        if s in ACTIVE or s in (STARTING, TAKING_OVER) or (s is FENCED and self.guest_running and not self.stale):
            return GUEST_ROUTE_HERE
        if s is HANDING_OVER:
            return GUEST_ROUTE_PEER
        return GUEST_ROUTE_PEER if self.peer_alive else GUEST_ROUTE_NONE

    def wants_pre_announce(self) -> bool:
        """Whether this site announces the guest's prefixes as the backup path, from the HA state
        alone: a standby with a replica whose peer answers (what arrives is forwarded there), kept
        while it takes over (Announce replaces it then). Never while it drains or is fenced, and
        not while the peer is lost: traffic drawn here could go nowhere."""
        if not self.config.pre_announce or self.draining_since is not None or self.operator_fenced or self.stale:
            return False
        if self.state is TAKING_OVER:
            return True
        return self.state is STANDBY and self.peer_alive and self.replica_epoch is not None

    def upstream_status(self, now: float) -> int | None:
        """For the peer (in heartbeats): ms some BGP session has been up here without a break
        (0: none up), None when unknown (no BGP event yet)."""
        if self._bgp_up_since is not None:
            return int(max(0.0, now - self._bgp_up_since) * 1000)
        return 0 if self._bgp_down_since is not None or self._bgp_seen else None

    def snapshot(self) -> dict:
        return {"site": self.config.site, "state": self.state.value, "lease_generation": self.generation,
                "holding_lease": self.holding, "lease_expires_at": self.expires_at,
                "seen_generation": self.seen_generation, "forced": self.forced, "stale": self.stale,
                "gate_open": self.gate_open, "protected": self.protected, "peer_alive": self.peer_alive,
                "rtt_ms": self.rtt_ms, "detection_timeout_ms": self.timeout_ms,
                "witness_reachable": self.witness_reachable, "peer_route_seen": self.peer_route_seen,
                "bgp_neighbors_up": sorted(self.bgp_up), "replica_epoch": self.replica_epoch,
                "lease_lapsed": self.lapsed, "draining": self.draining_since is not None,
                "guest_route": self.guest_route(), "peer_upstream_up_ms": self.peer_upstream_up_ms,
                "alarms": dict(self.alarms)}

    # ------------------------------------------------------------ helpers
    def _emit(self, *actions) -> None:
        if any(isinstance(a, (Announce, Drain, Withdraw)) for a in actions):
            self._pre_announced = False  # replaced: what the speaker sends now is that
        self._out.extend(actions)

    def _goto(self, state: HaState, why: str) -> None:
        if state != self.state:
            self._emit(Log("ha.state", {"from": self.state.value, "to": state.value, "why": why}))
            self.state = state

    def _alarm(self, key: str, message: str) -> None:
        if self.alarms.get(key) != message:
            self.alarms[key] = message
            self._emit(Alarm(message))

    def _clear(self, *keys: str) -> None:
        for k in keys:
            self.alarms.pop(k, None)

    def _deadline(self) -> float | None:
        return None if self.expires_at is None else self.expires_at - self.config.fence_margin_ms / 1000

    def _set_protection(self, protected: bool) -> None:
        if self.protected != protected:
            self.protected = protected
            self._emit(SetProtection(protected))

    def _open(self, why: str) -> None:
        """Release output: the lease (or a forced promotion) is in hand and the guest runs here."""
        gen = self.generation if self.holding else None
        self.gate_open = True
        self._emit(OpenGate(gen), Announce(gen))
        self.protected = self.standby_ready and self.peer_alive
        self._goto(ACTIVE_PROTECTED if self.protected else ACTIVE_UNPROTECTED, why)
        self._emit(SetProtection(self.protected))
        if not self.bgp_up:
            self._alarm("bgp", "active but no BGP neighbour is up: the guest prefix reaches nobody")

    def _fence(self, why: str, *, stale: bool = False, release: bool = False, operator: bool = False) -> None:
        """Stop releasing output and withdraw; `stale`: another site ran the guest since, so stop ours."""
        self._emit(CloseGate(), Withdraw())
        self.draining_since = None
        if release and self.holding:
            self._emit(ReleaseLease(self.generation))
        self.gate_open = self.holding = self.forced = self.resuming = self.force_pending = False
        self.lapsed = False
        self.expires_at, self.takeover_by, self._next_acquire = None, None, None
        self.protected = False
        if stale:
            self.stale = True
            if self.config.auto_rejoin and not self.rejoining:
                self.rejoining = True
                self.guest_running = False
                self._emit(Rejoin(why))
            elif self.guest_running:
                self._emit(StopGuest())
                self.guest_running = False
        self._goto(FENCED, why)
        if operator:
            self._emit(Log("ha.operator_fence", {"generation": self.generation}))
        else:
            self._alarm("fenced", f"{self.config.site} fenced itself: {why}")

    def _hold(self, generation: int, expires_at: float, now: float) -> None:
        self.holding, self.forced, self.generation, self.expires_at = True, False, generation, expires_at
        self.seen_generation = max(self.seen_generation, generation)
        self._last_renew = now
        self._clear("lease", "witness")

    def _why_not_taking_over(self) -> str | None:
        peer = "the peer"
        if not self.config.witness:
            return (f"{peer} is lost and no witness is configured: automatic takeover is never safe; "
                    "run `geomirror promote --force` only if the peer site is known dead")
        if self.replica_epoch is None:
            return f"{peer} is lost but this site has no committed replica to resume"
        if self.witness_reachable is False:
            if self.peer_route_seen:
                route = ("our upstream still receives the guest prefix originated by the peer's AS, so the "
                         "peer is probably alive and only cut off from us")
            elif self.peer_route_seen is False:
                route = "the peer's route is gone"
            else:
                route = "the peer's route is not known"
            return (f"{peer} is lost and {self.config.authority} is unreachable ({route}): not taking over without a "
                    "lease; `geomirror promote --force` only if the peer site is known dead")
        return None

    def _wants_lease(self) -> bool:
        if not self.config.witness or self.holding:
            return False
        if self.state == STARTING:
            return True
        if self.state == TAKING_OVER:
            return not self.resuming
        if self.state == STANDBY:
            return not self.peer_alive and self.replica_epoch is not None and not self.operator_fenced
        if self.state == FENCED:
            return self.guest_running and not self.stale and not self.operator_fenced
        return self.forced or self.lapsed  # active without a lease: regularise when the witness answers

    def _maybe_acquire(self, now: float) -> None:
        if self._wants_lease() and (self._next_acquire is None or now >= self._next_acquire):
            self._emit(AcquireLease())
            self._next_acquire = now + self.config.renew_every_ms / 1000

    def _begin_takeover(self, by: str, now: float) -> None:
        self.takeover_by = by
        self._goto(TAKING_OVER, "peer lost" if by == "peer_lost" else "operator promote")
        self._next_acquire = None
        self._maybe_acquire(now)

    def _force(self, why: str) -> None:
        """Promotion without a lease (operator --force with the witness unreachable)."""
        self.forced, self.force_pending = True, False
        self.generation = max(self.generation, self.seen_generation)
        self._emit(Log("ha.promote_forced", {"why": why, "generation": self.generation}))
        self._alarm("forced", f"{self.config.site} promoted WITHOUT a lease from {self.config.authority} ({why}): "
                              "the other site must be dead or fenced")
        if self.peer_route_seen:
            self._alarm("forced_route", "forced promotion while the peer's AS still originates the guest prefix")
        if self.guest_running:
            self._open("forced promote")
        else:
            self.resuming = True
            self._goto(TAKING_OVER, "forced promote")
            self._emit(ResumeGuest())

    def _peer_lost(self, now: float) -> None:
        self.standby_ready = False
        self._emit(Log("ha.peer_lost", {"timeout_ms": round(self.timeout_ms, 1)}))
        if self.state in ACTIVE and self.lapsed:
            self._fence(f"the standby is lost while the lease is lapsed ({self.config.authority} unreachable): "
                        "no authority left")
        elif self.state in ACTIVE:
            self._goto(ACTIVE_UNPROTECTED, "standby lost")
            self._set_protection(False)
            self._alarm("peer", "the standby stopped answering heartbeats: running unprotected")
        elif self.state == STANDBY and not self.operator_fenced:
            why = self._why_not_taking_over()
            if why is None:
                self._begin_takeover("peer_lost", now)
            else:
                self._alarm("takeover", why)

    # ------------------------------------------------------------ events
    def _on_Tick(self, e: Tick) -> None:
        now = e.now
        if self.last_heard is None:
            self.last_heard, self.peer_alive = now, True  # grace: as if heard at start
        if self.draining_since is not None and now - self.draining_since >= self.config.drain_timeout_s:
            self.draining_since = None
            self._emit(Withdraw(), Log("ha.drain_timeout", {
                "why": f"the peer's route did not reach us within {self.config.drain_timeout_s:g}s: "
                       "withdrawing anyway"}))
        if self.state not in ACTIVE:
            self._active_since = None
        elif self._active_since is None:
            self._active_since = now
        self._maybe_hand_over(now)
        if self.state == STARTING and not self.config.witness:
            self._emit(Log("ha.no_witness", {"why": "no witness configured: running without a lease"}))
            self._open("started without a witness")
        if self.holding and now >= self._deadline():
            if (self.config.ride_through_witness_outage and self.witness_reachable is False
                    and self.state == ACTIVE_PROTECTED and self.protected and self.peer_alive and self.standby_ready):
                self.holding, self.lapsed, self.expires_at = False, True, None
                self._next_acquire = None
                self._emit(Log("ha.lease_lapsed", {"generation": self.generation}))
                self._alarm("witness", f"{self.config.authority} unreachable: the lease lapsed; running on, "
                                       "protected (output leaves only on the standby's acks), re-acquiring when "
                                       f"{self.config.authority} answers")
            else:
                self._fence("lease renewal did not get through in time; closing before the lease can expire")
                return
        if self.holding and now - self._last_renew >= self.config.renew_every_ms / 1000:
            self._emit(RenewLease(self.generation))
            self._last_renew = now
        if self._forced_denied:  # a denial under a forced promotion since the last tick
            self._forced_denied, self._forced_denied_last = False, now
            if self._forced_denied_since is None:
                self._forced_denied_since = now
        if self._forced_denied_since is not None:
            if not self.forced or now - self._forced_denied_last > 3 * self.config.renew_every_ms / 1000:
                self._forced_denied_since = None  # granted, or the denials stopped: start afresh
            elif now - self._forced_denied_since > 2 * self.config.lease_ttl_ms / 1000:
                self._forced_denied_since = None
                self._fence("another site still renews the lease two lease TTLs after a forced promotion: "
                            "it is alive", stale=True)
                return
        if self.peer_alive and (now - self.last_heard) * 1000 > self.timeout_ms:
            self.peer_alive = False
            self._peer_lost(now)
        self._maybe_acquire(now)
        if self._wants_to_know_holder() and (self._next_query is None or now >= self._next_query):
            self._emit(QueryLease())
            self._next_query = now + self.config.renew_every_ms / 1000

    def upstream_loss(self, now: float) -> tuple[bool, str]:
        """Whether to hand the guest over because this site's upstream is lost: (due, why). Pure:
        reads only the machine's state and `now`."""
        c = self.config
        if c.upstream_loss_handover_s <= 0 or self.state not in ACTIVE or self.bgp_up:
            return False, ""
        since = [t for t in (self._bgp_down_since, self._active_since) if t is not None]
        if not since or now - max(since) < c.upstream_loss_handover_s:
            return False, ""
        lost = f"every BGP session has been down for {c.upstream_loss_handover_s:g}s or more"
        if self._active_since is None or now - self._active_since < c.upstream_loss_hold_down_s:
            return False, f"{lost}, but this site became active less than {c.upstream_loss_hold_down_s:g}s ago " \
                          "(hold-down)"
        if self.upstream_handover_at is not None and now - self.upstream_handover_at < c.upstream_loss_hold_down_s:
            return False, f"{lost}, but the last upstream-loss handover was less than " \
                          f"{c.upstream_loss_hold_down_s:g}s ago (hold-down)"
        if not self._may_hand_over():
            return False, (f"{lost}, but the guest is not protected under a lease (held, or lapsed while "
                           f"protected): a handover could lose state")
        up = self.peer_upstream_up_ms
        if up is None:
            return False, f"{lost}, but the peer does not report its BGP sessions"
        if up < c.upstream_loss_peer_stable_s * 1000:
            return False, (f"{lost}, but the peer's BGP sessions have not been up for "
                           f"{c.upstream_loss_peer_stable_s:g}s without a break")
        return True, (f"every BGP session has been down for {now - max(since):.1f}s; the peer's have been up "
                      f"for {up / 1000:.1f}s and the guest is protected")

    def _may_hand_over(self) -> bool:
        """A planned handover needs the guest protected (the standby commits every epoch) under a
        lease this site holds, or one that lapsed while protected (its authority unreachable: the
        ride-through) — the guest's output has only ever left on the standby's acks. Not forced."""
        return (self.state is ACTIVE_PROTECTED and self.protected and self.peer_alive and self.standby_ready
                and (self.holding or self.lapsed) and not self.forced)

    def _maybe_hand_over(self, now: float) -> None:
        due, why = self.upstream_loss(now)
        if due:
            self.upstream_handover_at = now
            self._clear("upstream")
            self._emit(Log("ha.upstream_loss_handover", {"why": why}), HandOver(f"upstream lost: {why}"))
        elif why:
            self._alarm("upstream", f"upstream lost, not handing over: {why}")

    def _wants_to_know_holder(self) -> bool:
        """A fenced site asks who holds the lease: without a guest (it died, or was gone after a
        restart) to rejoin as the standby once the peer runs the guest; with one, to learn that
        another site runs the guest since (then ours is stale: stopped, or rejoin)."""
        if not self.config.witness or self.state is not FENCED or self.rejoining or self.stale:
            return False
        # with a guest here (fenced by the operator, or by a lapsed lease): is it stale now?
        return self.guest_running or (self.config.auto_rejoin and not self.operator_fenced)

    def _on_HeartbeatReceived(self, e: HeartbeatReceived) -> None:
        if e.rtt_ms is not None:
            self.rtt_ms, self.rtt_var_ms = e.rtt_ms, e.rtt_var_ms
        self.last_heard = e.now
        self.peer_upstream_up_ms = e.peer_upstream_up_ms
        self.seen_generation = max(self.seen_generation, e.peer_generation)
        if e.peer_generation > self.generation and (self.holding or self.guest_running) and not self.forced \
                and self.state is not HANDING_OVER:  # a handover expects the peer's newer lease
            self._fence(f"the peer holds lease generation {e.peer_generation}, newer than ours "
                        f"({self.generation})", stale=True)
        if self.forced and self.peer_alive is False:
            self._alarm("forced_peer", "the peer answers heartbeats while this site runs on a forced "
                                       "promotion: fence one of the two sites")
        if not self.peer_alive:
            self.peer_alive = True
            self._clear("peer", "takeover")
            self._emit(Log("ha.peer_back", {"rtt_ms": e.rtt_ms}))
            if self.state == TAKING_OVER and self.takeover_by == "peer_lost" and not self.holding \
                    and not self.resuming:
                self.takeover_by = None
                self._goto(STANDBY, "peer answers heartbeats again")

    def _on_ReplicaCommitted(self, e: ReplicaCommitted) -> None:
        self.replica_epoch = max(self.replica_epoch or 0, e.epoch)

    def _on_StandbyReady(self, e: StandbyReady) -> None:
        self.standby_ready = True
        self._clear("peer")
        if self.state == ACTIVE_UNPROTECTED:
            self._goto(ACTIVE_PROTECTED, f"standby has a full replica (epoch {e.epoch})")
            self._set_protection(True)

    def _on_LeaseGranted(self, e: LeaseGranted) -> None:
        self.witness_reachable = True
        g, mine = e.generation, e.generation in (self.generation, self.generation + 1)
        if e.now >= e.expires_at - self.config.fence_margin_ms / 1000:
            self._emit(Log("ha.lease_too_late", {"generation": g}))
            return
        if self.holding:
            if g == self.generation:
                self.expires_at = max(self.expires_at, e.expires_at)
            return
        if self.state in (STANDBY, TAKING_OVER) and not self.operator_fenced:
            if g <= self.seen_generation:
                self._alarm("lease", f"witness granted generation {g} but generation {self.seen_generation} "
                                     "was already held: has the witness lost its state? not taking over")
                return
            if self.replica_epoch is None:
                self._emit(ReleaseLease(g))
                return
            self._hold(g, e.expires_at, e.now)
            self.resuming, self.force_pending = True, False
            self._goto(TAKING_OVER, f"lease generation {g} granted")
            self._emit(ResumeGuest())
        elif self.state == STARTING:
            if self.generation == 0 or mine:
                self._hold(g, e.expires_at, e.now)
                self._open(f"lease generation {g} granted")
            else:
                self._emit(ReleaseLease(g))
                self._fence(f"another site held the lease since our generation {self.generation} "
                            f"(now {g}): this guest must not run", stale=True)
        elif self.state == FENCED and self._wants_lease():
            if mine:
                self._hold(g, e.expires_at, e.now)
                self._clear("fenced")
                self._open(f"lease generation {g} granted and no other site held it since")
            else:
                self._emit(ReleaseLease(g))
                self._fence(f"another site held the lease since our generation {self.generation} "
                            f"(now {g}): our guest is stale", stale=True)
        elif self.state in ACTIVE and self.lapsed:
            self.lapsed = False
            if mine:
                self._hold(g, e.expires_at, e.now)
                self._emit(Log("ha.lease_regained", {"generation": g}))
                self.generation = g
            else:
                self._emit(ReleaseLease(g))
                self._fence(f"another site held the lease while ours was lapsed (now {g})", stale=True)
        elif self.state in ACTIVE and self.forced:
            self._hold(g, e.expires_at, e.now)
            self._clear("forced", "forced_route", "forced_peer")
            self._emit(OpenGate(g), Announce(g))
        else:
            self._emit(ReleaseLease(g))

    def _on_LeaseRenewed(self, e: LeaseRenewed) -> None:
        self.witness_reachable = True
        self._clear("witness")
        if self.holding and e.generation == self.generation:
            self.expires_at = max(self.expires_at, e.expires_at)

    def _on_LeaseDenied(self, e: LeaseDenied) -> None:
        self.witness_reachable = True
        self._clear("witness")
        other = e.holder is not None and e.holder != self.config.site
        if other:
            self.seen_generation = max(self.seen_generation, e.generation)
        if not other:
            return
        if self.forced and not self.holding and not self.peer_alive and self.state in ACTIVE:
            # The operator promoted this site because the other one is dead; the lease backend still
            # shows that site's lease (it outlived the site, or a new etcd leader extended it). Run on
            # and retry until it expires; a lease that is still renewed after two TTLs means its holder
            # is alive after all, and then this site gives way (Tick).
            self._forced_denied = True
            self._alarm("forced_lease", f"{e.holder} still holds the lease at generation {e.generation}: "
                                        "running on under the forced promotion until it expires")
            return
        if self.state == STARTING or (self.state == FENCED and self._wants_lease()) or self.holding or self.forced \
                or self.lapsed:
            self._fence(f"{e.holder} holds the lease at generation {e.generation}", stale=True)
        elif self.state == STANDBY and self._wants_lease():
            self.takeover_by = "peer_lost"  # the witness answers: wait for the peer's lease to expire
            self._goto(TAKING_OVER, f"{e.holder} still holds generation {e.generation}; waiting for expiry")
            self._clear("takeover")
        elif self.state == TAKING_OVER and self.takeover_by == "operator":
            self._alarm("lease", f"promote waits: {e.holder} holds the lease at generation {e.generation}; "
                                 "fence that site or wait for its lease to expire")

    def _on_LeaseLost(self, e: LeaseLost) -> None:
        self.witness_reachable = True
        other = e.holder is not None and e.holder != self.config.site
        if other:
            self.seen_generation = max(self.seen_generation, e.generation)
        if self.holding:
            self._fence(f"{self.config.authority} refused to renew generation {self.generation}"
                        + (f": {e.holder} holds generation {e.generation}" if other else ""), stale=other)

    def _on_WitnessUnreachable(self, e: WitnessUnreachable) -> None:
        self.witness_reachable = False
        detail = f" ({e.detail})" if e.detail else ""
        if self.holding:
            self._alarm("witness", f"{self.config.authority} unreachable{detail}: fencing at the lease deadline unless a "
                                   "renewal gets through")
        elif self.force_pending:
            self._force("witness unreachable")
        elif self.state == TAKING_OVER and not self.resuming:
            by, self.takeover_by = self.takeover_by, None
            self._goto(STANDBY, "witness unreachable")
            if by == "operator":
                self._alarm("takeover", f"promote needs {self.config.authority}, which is unreachable{detail}: "
                                        "use --force only if the peer site is known dead")
            else:
                self._alarm("takeover", self._why_not_taking_over() or "witness unreachable")
        elif self.state == STANDBY and not self.peer_alive:
            self._alarm("takeover", self._why_not_taking_over() or "witness unreachable")
        else:
            self._alarm("witness", f"{self.config.authority} unreachable{detail}")
        self._maybe_acquire(e.now)

    def _on_WitnessReachable(self, e: WitnessReachable) -> None:
        self.witness_reachable = True
        self._clear("witness")
        if self.state == STANDBY and not self.peer_alive and self._why_not_taking_over() is None \
                and not self.operator_fenced:
            self._clear("takeover")
            self._begin_takeover("peer_lost", e.now)
        else:
            self._next_acquire = None
            self._maybe_acquire(e.now)

    def _on_BgpNeighborUp(self, e: BgpNeighborUp) -> None:
        self._bgp_seen = True
        if not self.bgp_up:
            self._bgp_up_since = e.now if e.now is not None else self._now
        self.bgp_up.add(e.neighbor)
        self._bgp_down_since = None
        self._clear("bgp", "upstream")

    def _on_BgpNeighborDown(self, e: BgpNeighborDown) -> None:
        self._bgp_seen = True
        self.bgp_up.discard(e.neighbor)
        if not self.bgp_up:
            self._bgp_up_since = None
            if self._bgp_down_since is None:
                self._bgp_down_since = e.now if e.now is not None else self._now
        if not self.bgp_up and self.gate_open:
            self._alarm("bgp", "active but no BGP neighbour is up: the guest prefix reaches nobody")

    def _on_PeerRouteSeen(self, e: PeerRouteSeen) -> None:
        self.peer_route_seen = e.originated_by_peer
        if e.drain_done and self.draining_since is not None:
            self.draining_since = None
            self._emit(Withdraw(), Log("ha.drain_done", {"why": "the upstream gives us the peer's route"}))
        if e.originated_by_peer and self.gate_open:
            self._alarm("route", "the peer's AS also originates the guest prefix while this site is active")
        elif not e.originated_by_peer:
            self._clear("route")
        if "takeover" in self.alarms and self.state == STANDBY:
            why = self._why_not_taking_over()
            if why:
                self._alarm("takeover", why)

    def _on_OperatorPromote(self, e: OperatorPromote) -> None:
        self._emit(Log("ha.operator_promote", {"force": e.force, "state": self.state}))
        no_witness = not self.config.witness or self.witness_reachable is False
        if self.state in ACTIVE or (self.state == TAKING_OVER and self.holding):
            return
        if self.state == FENCED:
            self.operator_fenced = False
            if self.stale:
                self._alarm("promote", "refusing to promote: another site ran the guest after this one, so "
                                       "this site's copy is stale; rejoin as standby")
                return
            if not self.guest_running:
                self._goto(STANDBY, "operator promote of a fenced standby")
        if self.state == STANDBY and self.replica_epoch is None:
            self._alarm("promote", "refusing to promote: this site has no committed replica to resume")
            return
        if e.force and no_witness:
            self._force("operator --force")
            return
        if not self.config.witness:
            self._alarm("promote", "no witness is configured: promote needs --force")
            return
        self.force_pending = e.force
        if self.state == STANDBY or self.state == TAKING_OVER:
            self._begin_takeover("operator", e.now)
        else:  # starting, or fenced with the guest still here: same lease rule as a restart
            self._next_acquire = None
            self._maybe_acquire(e.now)

    def _on_OperatorFence(self, e: OperatorFence) -> None:
        self.operator_fenced = True
        self._fence("operator fence", release=True, operator=True)

    def _on_HandoverPrepared(self, e: HandoverPrepared) -> None:
        if self.state not in ACTIVE or not (self.holding or self.lapsed) or self.forced:
            self._emit(Log("ha.handover_refused", {"state": self.state.value, "holding": self.holding,
                                                   "lapsed": self.lapsed, "forced": self.forced}))
            return
        # Closed for good under this generation: nothing here reopens it but a new grant after an
        # abort (g or g+1: nobody held the lease since). The release is a courtesy that lets the
        # peer in at once; without it (lapsed, or the authority unreachable) the peer gets the next
        # generation once ours has expired at the authority, which never grants two at a time.
        self._emit(CloseGate(), Drain())
        if self.holding:
            self._emit(ReleaseLease(self.generation))
        else:
            self._emit(Log("ha.handover_without_lease", {
                "generation": self.generation,
                "why": f"the lease lapsed ({self.config.authority} unreachable): the peer takes the next "
                       "generation once it has expired"}))
        self.draining_since = e.now
        self.gate_open = self.holding = self.protected = self.lapsed = False
        self.expires_at, self._next_acquire = None, None
        self._goto(HANDING_OVER, f"planned switchover at epoch {e.epoch}: the peer takes the lease")

    def _on_HandoverAborted(self, e: HandoverAborted) -> None:
        if self.state is not HANDING_OVER:
            return
        self._emit(Log("ha.handover_aborted", {"reason": e.reason}))
        if self.draining_since is not None:  # fenced until the lease is back: announce nothing
            self.draining_since = None
            self._emit(Withdraw())
        self._goto(FENCED, f"handover aborted ({e.reason}); taking the lease back")
        self._next_acquire = None
        self._maybe_acquire(e.now)

    def _on_BecameStandby(self, e: BecameStandby) -> None:
        if self.gate_open or self.holding:  # never demote a site that releases output: fence first
            self._fence(f"becoming the standby ({e.reason})", release=True)
        self.guest_running = self.stale = self.operator_fenced = self.forced = False
        self.resuming = self.force_pending = self.lapsed = self.standby_ready = self.rejoining = False
        self.replica_epoch, self.takeover_by, self._next_acquire, self._next_query = None, None, None, None
        self._clear("fenced", "promote", "resume", "forced", "forced_route", "forced_peer")
        self._set_protection(False)
        self._goto(STANDBY, e.reason)

    def _on_LeaseSeen(self, e: LeaseSeen) -> None:
        self.witness_reachable = True
        if e.holder is None or e.holder == self.config.site:
            return
        self.seen_generation = max(self.seen_generation, e.generation)
        if e.generation > self.generation and self._wants_to_know_holder():
            why = f"{e.holder} runs the guest at lease generation {e.generation} (ours was {self.generation})"
            if self.guest_running:
                self._fence(why, stale=True)  # Rejoin (auto_rejoin) or StopGuest
            else:
                self.rejoining, self.stale = True, True
                self._emit(Rejoin(why))

    def _on_ResumeDone(self, e: ResumeDone) -> None:
        self.resuming = False
        if self.stale:
            self._emit(StopGuest())
            return
        self.guest_running = True
        if self.holding and e.now >= self._deadline():
            self._fence("lease deadline passed while resuming")
        elif self.state == TAKING_OVER and (self.holding or self.forced):
            self.takeover_by = None
            self._open("guest resumed")
        else:
            self._emit(Log("ha.resumed_while_fenced", {"state": self.state}))

    def _on_ResumeFailed(self, e: ResumeFailed) -> None:
        self.resuming = False
        self._alarm("resume", f"resuming the guest failed: {e.reason}")
        self._fence(f"resume failed: {e.reason}", release=True)
