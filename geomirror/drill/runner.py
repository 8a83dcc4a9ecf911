"""The drill: pre-flight, a timed planned switchover (optionally there and back), rollback when a
step is over its budget, the report kept at both sites.

The runner talks to both sites' control APIs (their tokens; the peer's API must be reachable
from where the drill runs, e.g. over a management network: `[drill] peer_control`). That is
what lets it time each step from each site's own timeline, drive the move back from the other
site, and check the pair before it starts. The daemons know nothing of drills beyond keeping
their reports and the claim that makes a second drill wait (`/v1/drills/*`).
"""

from __future__ import annotations

import asyncio
import platform
import time
from dataclasses import dataclass, field
from typing import Protocol

import structlog

import geomirror
from geomirror.control import ControlError
from geomirror.drill import checks as ck
from geomirror.drill import report as rep
from geomirror.drill.probes import Probe
from gmbase.errors import GeomirrorError

log = structlog.get_logger(__name__)


class SiteApi(Protocol):
    async def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict: ...


@dataclass
class DrillOptions:
    there_and_back: bool = False
    budgets_ms: dict = field(default_factory=lambda: dict(rep.DEFAULT_BUDGETS_MS))
    limits: ck.Limits = ck.Limits()
    switchover_timeout_s: float = 15.0
    rollback_timeout_s: float = 120.0
    unattended: bool = False  # from the timer: skip (logged) rather than refuse
    local: str | None = None  # the site the runner belongs to (unattended: drills only where the guest runs)
    initiated_by: str = "operator"
    poll_s: float = 0.1


class Drill:
    def __init__(self, sites: dict[str, SiteApi], opts: DrillOptions, probes: list[Probe] = ()):
        if len(sites) != 2:
            raise ValueError("a drill needs both sites of the pair")
        self.sites = sites
        self.opts = opts
        self.probes = list(probes)
        self.info: dict[str, dict] = {}  # site -> {"asn", "version"}
        self.report: dict = {}

    # ------------------------------------------------------------ helpers
    async def _status(self, site: str) -> dict | None:
        try:
            return await self.sites[site].call("GET", "/v1/status", timeout=5)
        except ControlError as e:
            log.info("drill.site_silent", site=site, error=str(e))
            return None

    async def statuses(self) -> dict[str, dict | None]:
        names = list(self.sites)
        got = await asyncio.gather(*(self._status(n) for n in names))
        return dict(zip(names, got))

    async def _events(self, site: str, since: float) -> list[dict]:
        r = await self.sites[site].call("GET", f"/v1/drills/events?since={since:.3f}", timeout=10)
        self.info[site] = {"asn": r.get("asn"), "version": r.get("version")}
        return r.get("events") or []

    # ------------------------------------------------------------ the drill
    async def run(self) -> dict:
        o = self.opts
        t0 = time.time()
        r = self.report = {"id": rep.new_id(t0), "started_at": t0, "pair": sorted(self.sites),
                           "there_and_back": o.there_and_back, "initiated_by": o.initiated_by,
                           "unattended": o.unattended, "budgets_ms": dict(o.budgets_ms), "moves": [],
                           "probes": [], "checks": [], "rollback": None, "unmeasured": []}
        statuses = await self.statuses()
        checks = ck.preflight(statuses, o.limits)
        r["checks"] = [c.as_dict() for c in checks]
        prim, sb = ck.locate(statuses)
        r["guest_at"] = prim
        refused = ck.refusal(checks)
        if refused is None and o.unattended and o.local and prim != o.local:
            refused = f"drill skipped: the guest runs at {prim}, not here ({o.local}); its own timer drills it"
            r["not_here"] = True
        if refused is None:
            refused = await self._claim(r["id"])
        if refused is not None:
            r["refused"] = refused
            r["versions"] = {"runner": geomirror.__version__, "python": platform.python_version()}
            log.info("drill.skipped" if o.unattended else "drill.refused", id=r["id"], reason=refused)
            return rep.finish(r)
        log.info("drill.begin", id=r["id"], primary=prim, standby=sb, there_and_back=o.there_and_back)
        stop = asyncio.Event()
        mono0 = time.monotonic()
        tasks = [asyncio.create_task(p.run(stop), name=f"drill.probe.{p.spec.name}") for p in self.probes]
        try:
            moved = await self._move(prim, sb)
            if moved and o.there_and_back:
                again = await self._healthy_again(sb)
                if again is not None:
                    r["error"] = f"the move back was not started: {again}"
                else:
                    await self._move(sb, prim)
        except ControlError as e:
            r["error"] = f"the drill stopped: {e}"
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            r["probes"] = [p.result(mono0) for p in self.probes]
            await self._collect(t0)
            await self._release(r["id"])
        rep.finish(r)
        log.info("drill.end", id=r["id"], verdict=r["verdict"], reason=r["reason"])
        return r

    async def _claim(self, rid: str) -> str | None:
        o = self.opts
        moves = 2 if o.there_and_back else 1
        ttl = moves * (o.switchover_timeout_s + max(o.budgets_ms.values()) / 1000) + o.rollback_timeout_s + 120
        taken = []
        for n, api in self.sites.items():
            try:
                await api.call("POST", "/v1/drills/claim", {"id": rid, "by": o.initiated_by, "ttl_s": ttl})
                taken.append(n)
            except ControlError as e:
                await self._release(rid, taken)
                return f"drill not started: {n} refused the drill claim: {e}"
        return None

    async def _release(self, rid: str, sites=None) -> None:
        for n in (self.sites if sites is None else sites):
            try:
                await self.sites[n].call("POST", "/v1/drills/release", {"id": rid}, timeout=10)
            except ControlError as e:
                log.warning("drill.release_failed", site=n, error=str(e))

    async def _healthy_again(self, prim: str) -> str | None:
        """Before the move back: the pair passes the pre-flight again (waits for the hot standby)."""
        deadline = time.monotonic() + 60
        while True:
            statuses = await self.statuses()
            checks = ck.preflight(statuses, self.opts.limits)
            why = ck.refusal(checks)
            if why is None and ck.locate(statuses)[0] == prim:
                return None
            if time.monotonic() > deadline:
                return why or f"{prim} does not run the guest"
            await asyncio.sleep(0.5)

    async def _move(self, frm: str, to: str) -> bool:
        """One timed switchover from `frm` to `to`. False when the guest did not stay moved
        (aborted, or rolled back over budget)."""
        o, r = self.opts, self.report
        t_call, mono = time.time(), time.monotonic()
        try:
            so = await self.sites[frm].call("POST", "/v1/switchover", {"timeout_s": o.switchover_timeout_s},
                                            timeout=o.switchover_timeout_s + 60)
        except ControlError as e:
            if e.status == 409 and "runs on here" in str(e):  # the switchover itself undid the move
                r["rollback"] = {"ok": True, "reason": f"the switchover from {frm} to {to} aborted ({e})",
                                 "guest_at": frm, "by": "switchover"}
                return False
            raise
        fe = await self._events(frm, t_call - 30)
        begin = max((e["wall"] for e in fe if e["event"] == "switchover.begin"), default=t_call)
        to_asn = (await self._status_asn(to))
        skip = rep.unmeasured(to_asn)
        r["unmeasured"] = sorted(set(r["unmeasured"]) | skip)
        while True:
            fe, te = await self._events(frm, begin), await self._events(to, begin)
            m = rep.move_timings(frm, to, begin, so, fe, te, to_asn)
            elapsed = (time.monotonic() - mono) * 1000
            over = rep.over_budget(m, o.budgets_ms, elapsed, skip)
            if over or not rep.pending(m, skip):
                break
            await asyncio.sleep(o.poll_s)
        m["over_budget"] = over
        r["moves"].append(m)
        log.info("drill.moved", frm=frm, to=to, **{k: v for k, v in m.items() if k.endswith("_ms")},
                 epochs_lost=m["epochs_lost"])
        if over:
            await self._roll_back(to, frm, f"{rep.budget_sentence(over)} moving from {frm} to {to}")
            return False
        return True

    async def _status_asn(self, site: str) -> int | None:
        if site not in self.info:
            await self._events(site, time.time())
        return self.info[site].get("asn")

    async def _roll_back(self, at: str, home: str, reason: str) -> None:
        """Move the guest back to `home` once `at` protects it (a move without loss needs that)."""
        o, r = self.opts, self.report
        log.warning("drill.rolling_back", reason=reason, at=at, to=home)
        rb = r["rollback"] = {"ok": False, "reason": reason, "guest_at": at}
        deadline = time.monotonic() + o.rollback_timeout_s
        while True:
            st = await self._status(at)
            if st and st.get("protected") and st.get("ha_state") == "active_protected":
                break
            if time.monotonic() > deadline:
                rb["error"] = f"{at} was not protected within {o.rollback_timeout_s:g} s to move the guest back"
                return
            await asyncio.sleep(0.2)
        rb["began_at"] = time.time()
        try:
            rb["switchover"] = await self.sites[at].call("POST", "/v1/switchover",
                                                         {"timeout_s": o.switchover_timeout_s},
                                                         timeout=o.switchover_timeout_s + 60)
        except ControlError as e:
            rb["error"] = f"the switchover back from {at} to {home} failed: {e}"
            return
        resumed = rep.resumed_epoch(await self._events(home, rb["began_at"] - 30), rb["began_at"] - 30)
        final = rb["switchover"].get("final_epoch")
        rb.update(ok=True, guest_at=home, resumed_epoch=resumed,
                  epochs_lost=None if resumed is None or final is None else final - resumed)

    async def _collect(self, t0: float) -> None:
        r = self.report
        r["timeline"] = {}
        for n in self.sites:
            try:
                r["timeline"][n] = rep.keep_events(await self._events(n, t0), t0)
            except ControlError as e:
                r["timeline"][n] = []
                log.warning("drill.timeline_unavailable", site=n, error=str(e))
        r["versions"] = {"runner": geomirror.__version__, "python": platform.python_version(),
                         **{n: i.get("version") for n, i in self.info.items()}}


async def store(sites: dict[str, SiteApi], report: dict) -> dict[str, dict | str]:
    """Keep the report at every site that answers: where it went, or why not."""
    out: dict[str, dict | str] = {}
    for n, api in sites.items():
        try:
            out[n] = await api.call("POST", "/v1/drills", {"report": report}, timeout=30)
        except ControlError as e:
            out[n] = str(e)
            log.warning("drill.not_stored", site=n, id=report.get("id"), error=str(e))
    return out


class DrillRefused(GeomirrorError):
    """Pre-flight (or another drill holding the pair) refused the drill: one sentence why."""


async def run_and_keep(sites: dict[str, SiteApi], opts: DrillOptions, probes: list[Probe] = ()) -> tuple[dict, dict]:
    """Run a drill and keep its report at both sites, except the routine skip of a timer at the site
    that does not run the guest (logged only). Returns (report, where it was kept)."""
    report = await Drill(sites, opts, probes).run()
    if report.get("not_here"):
        return report, {}
    return report, await store(sites, report)


def exit_code(report: dict) -> int:
    """0 pass (or a timer's skip), 1 fail or rolled back; a refusal raises DrillRefused (exit 2)."""
    v = report["verdict"]
    if v == "refused":
        raise DrillRefused(report["reason"])
    return 0 if v in ("pass", "skipped") else 1


def where_kept(kept: dict) -> str:
    lines = []
    for site, k in kept.items():
        lines.append(f"  report at {site}: {k['html']}" if isinstance(k, dict) else f"  report NOT kept at {site}: {k}")
    return "\n".join(lines)
