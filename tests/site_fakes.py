"""Small stand-ins for the site jobs' unit tests (the I/O parts; the logic under test is real)."""

from __future__ import annotations

from types import SimpleNamespace

from bgp.config import Policy
from geomirror import ha
from geomirror.site.context import SiteContext, Tasks, Timeline
from replication.gate import GateMode


class FakeGate:
    def __init__(self):
        self.mode = GateMode.FENCED
        self.allowed = False
        self.current_epoch = 0
        self.until = None
        self.pass_through = False
        self.calls: list = []

    def set_pass_through(self, on):
        self.pass_through = on

    def set_mode(self, mode):
        self.calls.append(("mode", mode))
        self.mode = mode

    def allow(self, allowed, until=None):
        self.calls.append(("allow", allowed))
        self.allowed = allowed
        self.until = until if allowed else None


class FakeLease:
    """The witness as the site sees it: acquire/renew/release/get."""

    def __init__(self, site="site-a"):
        self.site = site
        self.holder: str | None = None
        self.generation = 0
        self.calls: list = []
        self.unreachable = False
        self.on_get = None  # callable(state) -> state, to script another site's moves

    def _check(self):
        from geomirror.witness import WitnessUnreachable

        if self.unreachable:
            raise WitnessUnreachable("witness 198.18.3.2:7790 unreachable (test)")

    async def acquire(self, guest, ttl_ms):
        self.calls.append(("acquire", guest))
        self._check()
        if self.holder not in (None, self.site):
            return SimpleNamespace(ok=False, generation=self.generation, holder=self.holder, expires_at=None)
        if self.holder is None:
            self.generation += 1
        self.holder = self.site
        return SimpleNamespace(ok=True, generation=self.generation, holder=self.site, expires_at=1e12)

    async def renew(self, guest, generation, ttl_ms):
        self.calls.append(("renew", generation))
        self._check()
        ok = self.holder == self.site and generation == self.generation
        return SimpleNamespace(ok=ok, generation=self.generation, holder=self.holder, expires_at=1e12)

    async def release(self, guest, generation):
        self.calls.append(("release", generation))
        self._check()
        if self.holder == self.site and generation == self.generation:
            self.holder = None

    async def get(self, guest):
        self.calls.append(("get", guest))
        self._check()
        st = {"holder": self.holder, "generation": self.generation, "valid": self.holder is not None}
        if self.on_get:
            st = self.on_get(self, st)
        return st

    def members_down(self):
        return {}


class FakeSpeaker:
    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.calls: list = []

    async def announce(self, prefix, **kw):
        self.calls.append(("announce", prefix))
        if self.fail:
            raise self.fail

    async def withdraw(self, prefix):
        self.calls.append(("withdraw", prefix))
        if self.fail:
            raise self.fail

    async def drain(self, prefix, policy):
        self.calls.append(("drain", prefix, policy))
        if self.fail:
            raise self.fail


class FakeRoutes:
    """Where the guest's traffic goes (host.GuestRoutes): records each mode applied."""

    def __init__(self, fail: int = 0):
        self.applied: list[str] = []
        self.fail = fail

    async def apply(self, mode):
        if self.fail:
            self.fail -= 1
            raise OSError(101, "Network is unreachable (test)")
        self.applied.append(mode)


def site_config(name="site-a", policy="stall", grace_ms=5000):
    return SimpleNamespace(
        site=SimpleNamespace(name=name, state_dir="/nonexistent/state", run_dir="/nonexistent/run"),
        peer=SimpleNamespace(name="site-b" if name == "site-a" else "site-a"),
        guest=SimpleNamespace(name="guest", prefix="198.51.100.0/24", prefix6=None, memory_mb=16),
        witness=SimpleNamespace(lease_ttl_ms=6000, renew_every_ms=1000),
        bgp=SimpleNamespace(med=None, communities=(), prepend=0, active=Policy(),
                            drain=Policy(communities=("65535:0",))),
        checkpoint=SimpleNamespace(unreachable_policy=policy, unprotected_grace_ms=grace_ms,
                                   handover_forward_frames=True),
        heartbeat=SimpleNamespace(interval_ms=100, min_timeout_ms=600, max_timeout_ms=5000),
    )


def make_ctx(cfg, gate, feed, generation=lambda: 0):
    return SiteContext(cfg, None, gate, feed, generation, Timeline(cfg.site.name), Tasks(cfg.site.name))


def ha_config(name="site-a", **kw):
    return ha.HaConfig(site=name, heartbeat_interval_ms=100, min_timeout_ms=600, max_timeout_ms=5000,
                       lease_ttl_ms=6000, renew_every_ms=1000, **kw)
