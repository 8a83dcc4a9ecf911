"""`geomirror lab ...`, `geomirror demo` and `--lab-site`: drive the lab from the root namespace.

The product's command line finds this module through the entry point `lab = "lab.cli:register"`
of the group `geomirror.cli` (pyproject.toml) and calls `register`."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import threading
import time
from pathlib import Path

from geomirror import netns
from geomirror.control import ControlClient, ControlError
from geomirror.drill import report as drill_report
from geomirror.drill.probes import Probe, ProbeSpec, udp_socket
from geomirror.drill.runner import DrillOptions, exit_code, run_and_keep, where_kept
from geomirror.plugins import Extensions, SiteEndpoint, SiteSource
from lab import etcd as lab_etcd
from lab import wanem, world
from lab.world import LabError


# ---------------------------------------------------------------- the client namespace

def client_connect(host: str = world.GUEST_ADDR, port: int = world.MEMCACHED_PORT, timeout: float = 5.0,
                   ns: str = world.CLIENT) -> socket.socket:
    """A TCP socket connected from inside gm-client (it stays in that namespace); IPv6 for an
    IPv6 `host` (e.g. world.GUEST_ADDR6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with netns.inside(ns):
        s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.connect((host, port))
    return s


class Memcache:
    """A minimal memcached text-protocol client over one connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.f = sock.makefile("rb")

    def _line(self) -> bytes:
        line = self.f.readline()
        if not line:
            raise ConnectionError("memcached closed the connection")
        return line.rstrip(b"\r\n")

    def set(self, key: str, value: bytes | str) -> bytes:
        v = value.encode() if isinstance(value, str) else value
        self.sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(v), v))
        return self._line()

    def get(self, key: str) -> bytes | None:
        self.sock.sendall(b"get %s\r\n" % key.encode())
        line = self._line()
        if line == b"END":
            return None
        n = int(line.split()[3])
        data = self.f.read(n + 2)[:-2]
        if self._line() != b"END":
            raise ConnectionError("malformed get reply")
        return data

    def incr(self, key: str, by: int = 1) -> int:
        self.sock.sendall(b"incr %s %d\r\n" % (key.encode(), by))
        line = self._line()
        if not line.isdigit():
            raise ConnectionError(f"incr failed: {line!r}")
        return int(line)

    def version(self) -> bytes:
        self.sock.sendall(b"version\r\n")
        return self._line()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Journal:
    """A client of the disk guest's journal (TCP 7000, DESIGN "Guest services") over one connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.f = sock.makefile("rb")

    def _call(self, line: bytes) -> list[bytes]:
        self.sock.sendall(line + b"\n")
        reply = self.f.readline()
        if not reply:
            raise ConnectionError("the journal closed the connection")
        words = reply.split()
        if not words or words[0] == b"err":
            raise ConnectionError(f"journal: {reply.decode(errors='replace').strip()}")
        return words

    def append(self, data: bytes) -> int:
        """Append a record; its number once the guest has it on its disk."""
        w = self._call(b"append " + data.hex().encode())
        if w[0] != b"ok" or len(w) != 2:
            raise ConnectionError(f"append: unexpected reply {b' '.join(w)!r}")
        return int(w[1])

    def read(self, n: int) -> bytes | None:
        """Record n as read from the guest's disk (O_DIRECT there), or None if it is missing."""
        w = self._call(b"read %d" % n)
        if w[0] == b"missing":
            return None
        if w[0] != b"rec" or int(w[1]) != n or len(w) != 3:
            raise ConnectionError(f"read {n}: unexpected reply {b' '.join(w)[:80]!r}")
        return bytes.fromhex(w[2].decode())

    def count(self) -> int:
        w = self._call(b"count")
        if w[0] != b"count":
            raise ConnectionError(f"count: unexpected reply {b' '.join(w)!r}")
        return int(w[1])

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def journal_connect(timeout: float = 5.0) -> Journal:
    return Journal(client_connect(port=world.JOURNAL_PORT, timeout=timeout))


# ---------------------------------------------------------------- site control

def site_endpoint(site: str) -> SiteEndpoint:
    """Where a lab site's control API answers (also what `--lab-site` resolves to)."""
    d = world.LAB_DIR / site
    return SiteEndpoint(site, d / "control.sock", d / "control.token")


def site_client(site: str) -> ControlClient:
    ep = site_endpoint(site)
    return ControlClient(ep.token_file.read_text().strip(), ep.socket, name=f"{site}'s daemon")


def site_status(site: str, timeout: float = 5.0) -> dict | None:
    """The site's /v1/status, or None while it has no token yet or does not answer."""
    try:
        return asyncio.run(site_client(site).call("GET", "/v1/status", timeout=timeout))
    except (ControlError, OSError):
        return None


def site_call(site: str, method: str, path: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    return asyncio.run(site_client(site).call(method, path, body, timeout=timeout))


def wait_protected(timeout: float = 180.0, site: str = "site-a") -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = site_status(site)
        if last and last.get("replication", {}).get("state") == "protected" and last.get("committed_epoch", 0) > 0:
            return last
        time.sleep(0.5)
    raise LabError(f"{site} did not reach protected within {timeout:.0f}s (last status: "
                   f"{json.dumps(last)[:400] if last else 'no answer'}); see {world.LAB_DIR}/{site}.log")


def wait_reachable(timeout: float = 60.0) -> float:
    """Until memcached answers from gm-client (and, with the disk guest, the journal)."""
    t0 = time.monotonic()
    err = None
    disk = world.load_state().get("disk", False)
    while time.monotonic() - t0 < timeout:
        try:
            mc = Memcache(client_connect(timeout=3))
            mc.version()
            mc.close()
            if disk:
                j = journal_connect(timeout=3)
                j.count()
                j.close()
            return time.monotonic() - t0
        except OSError as e:
            err = e
            time.sleep(0.5)
    raise LabError(f"the guest {world.GUEST_ADDR}:{world.MEMCACHED_PORT} is not reachable from {world.CLIENT}: {err}")


def status() -> dict:
    st = world.load_state()
    out = {"namespaces": [n for n in world.NAMESPACES if netns.exists(n)], "routing": st.get("routing"),
           "lease": st.get("lease", "witness"), "sites": {}}
    if out["lease"] == "etcd" and out["namespaces"]:
        out["etcd"] = {m: why or "healthy" for m, why in lab_etcd.health().items()}
    routes = world.bird_guest_routes() if out["namespaces"] else []
    out["bird_routes"] = routes
    if st.get("routing") == "static":
        out["note"] = (f"the guest prefix is routed to {st.get('static_site')} by a static route in BIRD "
                       "(BGP announcements are not driving the lab yet)")
    for site in world.SITES:
        s = site_status(site, timeout=3) or {"role": "down"}
        asn = world.SITE_AS[site]
        s["bgp_route_in_bird"] = any(r["as_path"][-1:] == [asn] for r in routes)
        s["bgp_best_in_bird"] = any(r["best"] and r["as_path"][-1:] == [asn] for r in routes)
        out["sites"][site] = s
    return out


def print_status(st: dict) -> None:
    print(f"namespaces: {' '.join(st['namespaces']) or '(none: lab is down)'}")
    if st.get("note"):
        print(f"note: {st['note']}")
    if st.get("etcd"):
        print("etcd: " + ", ".join(f"{m} {why}" for m, why in st["etcd"].items()))
    # path rtt: the pacer's (TCP's view of the link); chan rtt: heartbeats on the replication channel,
    # which also wait behind checkpoint frames: the gap between the two is queueing
    print(f"{'site':8} {'role':10} {'lease':>5} {'epoch':>7} {'interval':>9} {'path rtt':>9} {'chan rtt':>9} "
          f"{'pause':>8} {'backlog':>7}  bgp")
    for site, s in st["sites"].items():
        def f(k, unit=""):
            v = s.get(k)
            return "-" if v is None else f"{v}{unit}"
        print(f"{site:8} {s.get('role', '?'):10} {f('lease_generation'):>5} {f('committed_epoch'):>7} "
              f"{f('interval_ms', 'ms'):>9} {f('path_rtt_ms', 'ms'):>9} {f('rtt_ms', 'ms'):>9} "
              f"{f('last_pause_ms', 'ms'):>8} "
              f"{f('backlog_epochs'):>7}  {'announces' if s.get('bgp_route_in_bird') else '-'}")
    for site, s in st["sites"].items():
        if s.get("pacer"):
            pc = s["pacer"]
            print(f"{site}: interval set by {pc['reason']}; expected output latency "
                  f"{pc['expected_latency_ms']} ms (budget {pc['budgets']['latency_ms']:g} ms)"
                  + (f"\n{site}:   {pc['detail']}" if pc.get("detail") else ""))
        rep = s.get("replication") or {}
        if rep.get("capture") == "colo":
            print(f"{site}: capture colo (QEMU's dirty log): {rep['colo_verified_epochs']} epochs checked by a full "
                  f"compare, {rep['colo_missed_pages']} pages missed")
        elif rep.get("colo_error"):
            print(f"{site}: capture scan (colo asked for, not in use: {rep['colo_error']})")
        for a in s.get("alarms") or []:
            print(f"{site}: ALARM {a}")


# ---------------------------------------------------------------- CLI

def register(ext: Extensions) -> None:
    """The entry point (group `geomirror.cli`): the lab's subcommands and `--lab-site`."""
    ext.add_commands(add_parser)
    ext.add_site_source(SiteSource("--lab-site", tuple(world.SITES), "a lab site", site_endpoint))


def add_parser(sub) -> None:
    labp = sub.add_parser("lab", help="the two-site lab on this machine")
    labp.set_defaults(needs_root="the lab needs root: it creates network namespaces and TAP devices")
    lp = labp.add_subparsers(dest="lab_cmd", required=True)
    up = lp.add_parser("up", help="build the lab; returns when the guest is protected and reachable")
    up.add_argument("--no-daemons", action="store_true", help="network and BIRD only")
    up.add_argument("--memory", type=int, metavar="MB", help="the guest's RAM (default 128)")
    up.add_argument("--capture", choices=world.CAPTURES, default=None,
                    help="how checkpoints find written pages: scan all RAM (default, or $GM_LAB_CAPTURE) or colo "
                         "(QEMU's dirty log, on the COLO QEMU of scripts/qemu10.sh --colo-fix)")
    up.add_argument("--disk", action=argparse.BooleanOptionalAction, default=True,
                    help="boot the disk guest from a replicated disk, each site its own copy (the default); "
                         "--no-disk: the diskless initramfs guest")
    up.add_argument("--lease", choices=world.LEASE_BACKENDS, default="witness",
                    help="lease backend: the built-in witness (default) or a 3-member etcd cluster, one "
                         "member in gm-witness and one at each site")
    lp.add_parser("down", help="remove every namespace and process the lab made (idempotent)")
    st = lp.add_parser("status", help="per-site role, epochs, interval, path and channel RTT, pause, BGP")
    st.add_argument("--json", action="store_true")
    cr = lp.add_parser("crash", help="lose a site: SIGKILL its processes, take its links down")
    cr.add_argument("site", choices=list(world.SITES))
    rv = lp.add_parser("revive", help="bring a lost site back as the standby of the site that took over")
    rv.add_argument("site", choices=list(world.SITES))
    rs = lp.add_parser("restart", help="stop a site's daemon and start it again; QEMU and the site keep running")
    rs.add_argument("site", choices=list(world.SITES))
    rs.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM (a crash of the service)")
    rs.add_argument("--delay", type=float, default=0.0, help="seconds between the stop and the start")
    lp.add_parser("partition", help="cut the inter-site WAN link")
    lp.add_parser("heal", help="restore the inter-site WAN link")
    rt = lp.add_parser("route", help="point the lab's static route for the guest prefix at a site")
    rt.add_argument("site", choices=list(world.SITES))
    wn = lp.add_parser("wan", help="show or set the lab WAN (user-space emulator between the sites)")
    wn.add_argument("--rtt", help="round-trip time, e.g. 25ms")
    wn.add_argument("--jitter", help="per-packet jitter, e.g. 1ms")
    wn.add_argument("--rate", help="link rate, e.g. 100mbit (0 = unlimited)")
    wn.add_argument("--loss", help="loss probability, e.g. 0.1%%")
    dr = lp.add_parser("drill", help="a site-evacuation drill: pre-flight, timed switchover, report")
    dr.add_argument("--there-and-back", action="store_true", help="move the guest back afterwards")
    dr.add_argument("--json", action="store_true", help="print the report as JSON")
    dr.add_argument("--budget", action="append", metavar="STEP=MS",
                    help="a step's budget (ms since the move began), e.g. route_moved=5000")
    for p in lp.choices.values():
        p.set_defaults(func=main)
    dm = sub.add_parser("demo", help="bring the lab up, show a site failover, tear it down")
    dm.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    dm.set_defaults(func=demo, needs_root="the demo needs root: it builds the lab's network namespaces "
                                          "and TAP devices")


def main(args) -> int:
    c = args.lab_cmd
    if c == "up":
        t0 = time.monotonic()
        world.up(with_daemons=not args.no_daemons, lease=args.lease, memory_mb=args.memory, disk=args.disk,
                 capture=args.capture)
        if not args.no_daemons:
            try:
                wait_protected()
                wait_reachable()
            except BaseException:
                world.down()
                raise
        if args.no_daemons:
            print(f"lab network up in {time.monotonic() - t0:.1f}s (BIRD and the WAN emulator; no site daemons)")
        else:
            print(f"lab up in {time.monotonic() - t0:.1f}s: guest {world.GUEST_ADDR} "
                  + ("(with its disk replicated; journal on TCP 7000) " if args.disk else "")
                  + f"protected and reachable from {world.CLIENT}; lease backend: "
                  + ("etcd, 3 members" if args.lease == "etcd" else "the built-in witness"))
    elif c == "down":
        removed = world.down()
        print(f"lab down (removed: {' '.join(removed) or 'nothing'})")
    elif c == "status":
        st = status()
        if args.json:
            print(json.dumps(st, indent=2))
        else:
            print_status(st)
    elif c == "crash":
        pids = world.crash(args.site)
        print(f"{args.site} lost: killed {len(pids)} processes, links down")
    elif c == "revive":
        print(world.revive(args.site))
        print(f"{args.site}'s daemon started; `geomirror lab status` shows protection resume")
    elif c == "restart":
        r = world.restart(args.site, kill=args.kill, delay_s=args.delay)
        print(f"{args.site}'s daemon restarted (pid {r['old_pid']} -> {r['new_pid']}, stopped in "
              f"{r['stopped_s']:.2f} s); `geomirror lab status` shows protection resume")
    elif c == "partition":
        world.partition(False)
        print("WAN partitioned (wan0 down at both sites)")
    elif c == "heal":
        world.partition(True)
        print("WAN healed")
    elif c == "wan":
        print(wan(args.rtt, args.jitter, args.rate, args.loss)["describe"])
    elif c == "drill":
        report, kept = drill(args.there_and_back, args.budget)
        print(json.dumps(report, indent=2) if args.json else drill_report.text(report) + "\n" + where_kept(kept))
        return exit_code(report)
    elif c == "route":
        world.route_static_to(args.site)
        print(f"static route for {world.GUEST_PREFIX} now points at {args.site}")
    return 0


def takeover(site: str = "site-b", timeout: float = 60.0, promote: bool = False) -> dict:
    """After the other site is lost: wait until `site` has taken over on its own (lease, resume,
    gate, announce) and return its takeover report. `promote=True` asks for it (operator path).
    While the lab routes the guest prefix statically, the static route follows the takeover."""
    if promote:
        rep = site_call(site, "POST", "/v1/promote", {"force": True}, timeout=timeout)
    else:
        deadline = time.monotonic() + timeout
        st = None
        while time.monotonic() < deadline:
            st = site_status(site, timeout=3)
            if st and st.get("role") == "primary" and st.get("takeover"):
                break
            time.sleep(0.05)
        else:
            raise LabError(f"{site} did not take over within {timeout:.0f}s; last status: "
                           f"{json.dumps({k: (st or {}).get(k) for k in ('role', 'ha_state', 'alarms')})}")
        rep = {**st["takeover"], "lease_generation": st["lease_generation"]}
    if world.load_state().get("routing") == "static":
        world.route_static_to(site)
    return rep


async def client_open(host: str, port: int):
    """An asyncio connection opened from inside gm-client (the drill's probes in the lab)."""
    with netns.inside(world.CLIENT):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(s, (host, port))
    except BaseException:
        s.close()
        raise
    return await asyncio.open_connection(sock=s)


def client_udp(host: str, port: int) -> socket.socket:
    """A UDP socket made inside gm-client (the drill's SIP probe in the lab)."""
    with netns.inside(world.CLIENT):
        return udp_socket(host, port)


def lab_probes() -> list[Probe]:
    """A new client's view (TCP connect), an existing client's (memcached `version` on one
    connection) and a phone's (SIP OPTIONS to the PBX over UDP)."""
    return [Probe(ProbeSpec("memcached", "memcached", world.GUEST_ADDR, world.MEMCACHED_PORT), client_open),
            Probe(ProbeSpec("tcp-connect", "tcp", world.GUEST_ADDR, world.MEMCACHED_PORT, timeout_ms=1000),
                  client_open),
            Probe(ProbeSpec("sip-options", "sip-options", world.GUEST_ADDR, 5060, timeout_ms=1000),
                  client_open, udp=client_udp)]


def drill(there_and_back: bool = False, budgets: list[str] | None = None, probes: bool = True) -> tuple[dict, dict]:
    """A drill in the lab, driven through both sites' control sockets: (report, where it is kept)."""
    opts = DrillOptions(there_and_back=there_and_back,
                        budgets_ms=drill_report.parse_budgets(drill_report.DEFAULT_BUDGETS_MS, budgets),
                        initiated_by="lab")
    return asyncio.run(run_and_keep({s: site_client(s) for s in world.SITES}, opts,
                                    lab_probes() if probes else []))


def wan(rtt=None, jitter=None, rate=None, loss=None) -> dict:
    new = {}
    if rtt is not None:
        new["rtt_ms"] = wanem.parse_duration_ms(rtt)
    if jitter is not None:
        new["jitter_ms"] = wanem.parse_duration_ms(jitter)
    if rate is not None:
        new["rate_bps"] = wanem.parse_rate_bps(rate)
    if loss is not None:
        new["loss"] = wanem.parse_loss(loss)
    if not world.WAN_CTL.exists():
        raise LabError("the lab WAN is not running (is the lab up?)")
    return asyncio.run(wanem.control(world.WAN_CTL, new))


DEMO_REPORTS = Path("/var/tmp/geomirror-demo")


def demo_drill(t0: float) -> bool:
    """The demo's last act: a drill there and back; its report is copied out of the lab (which
    is torn down) and its place printed."""
    print(f"[{time.monotonic() - t0:5.1f}s] site-evacuation drill: site-b -> site-a -> site-b, every step timed")
    report, kept = drill(there_and_back=True)
    print(drill_report.text(report))
    src = next((Path(k["html"]) for k in kept.values() if isinstance(k, dict)), None)
    if src is not None:
        DEMO_REPORTS.mkdir(mode=0o700, parents=True, exist_ok=True)
        for suffix in (".html", ".json"):
            shutil.copy(src.with_suffix(suffix), DEMO_REPORTS / src.with_suffix(suffix).name)
        print(f"drill report: {DEMO_REPORTS / src.name} (and .json beside it)")
    return report["verdict"] == "pass"


def demo(args) -> int:
    """The story: lab up, a client counting on one TCP connection, site A lost, site B takes
    over on its own (witness lease, resume, BGP), the same connection carries on."""
    print("== geomirror demo: a two-site failover on this machine ==")
    world.down()
    t0 = time.monotonic()
    world.up()
    try:
        wait_protected()
        wait_reachable()
        wan(rtt="20ms")
        print(f"[{time.monotonic() - t0:5.1f}s] lab up: the guest runs at site-a (AS 64501), checkpointed to site-b "
              "over a 20 ms WAN; BIRD routes 198.51.100.0/24 to site-a")
        print_status(status())
        mc = Memcache(client_connect(timeout=60))
        mc.set("greeting", "hello from before the failover")
        mc.set("counter", "0")
        replies: list[tuple[float, int]] = []
        stop = threading.Event()
        err: list[BaseException] = []

        def count():
            try:
                while not stop.is_set():
                    replies.append((time.time(), mc.incr("counter")))
            except BaseException as e:  # noqa: BLE001 - reported below
                err.append(e)

        th = threading.Thread(target=count, daemon=True)
        th.start()
        time.sleep(3)
        print(f"[{time.monotonic() - t0:5.1f}s] client: {len(replies)} increments so far on one TCP connection")
        t_crash = time.time()
        world.crash("site-a")
        print(f"[{time.monotonic() - t0:5.1f}s] site-a LOST: every process killed, links down")
        deadline = time.monotonic() + 60
        flipped = None
        while time.monotonic() < deadline:
            best = [r for r in world.bird_guest_routes() if r["best"]]
            if best and best[0]["as_path"][-1:] == [world.SITE_AS["site-b"]]:
                flipped = time.time()
                break
            time.sleep(0.05)
        time.sleep(2)
        t_revive = time.time()
        print(f"[{time.monotonic() - t0:5.1f}s] site-a comes back: `geomirror rejoin` -> "
              + world.revive("site-a"))
        reprotected = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            b = site_status("site-b") or {}
            if b.get("protected") and b.get("ha_state") == "active_protected":
                reprotected = b
                break
            time.sleep(0.1)
        if reprotected:
            rep = reprotected.get("replication", {})
            ram_mb = round((rep.get("ram_bytes") or 128 << 20) / (1 << 20))
            print(f"[{time.monotonic() - t0:5.1f}s] site-b is protected again by site-a, "
                  f"{time.time() - t_revive:.1f}s after site-a's daemon started: {rep.get('last_sync_mode')} sent "
                  f"{rep.get('last_sync_bytes', 0) / 1e6:.2f} MB for a {ram_mb} MB guest")
        time.sleep(2)
        stop.set()
        th.join(30)
        vals = [v for _, v in replies]
        ok = not err and all(b == a + 1 for a, b in zip(vals, vals[1:]))
        stall = max((b[0] - a[0] for a, b in zip(replies, replies[1:])), default=0)
        b = site_status("site-b") or {}
        print("\ntimeline (seconds after site-a was lost):")
        lines = [(0.0, "site-a lost")]
        for e in b.get("timeline", []):
            if e["wall"] >= t_crash - 0.5 and e["event"] in ("ha.state", "lease.granted", "takeover.resumed",
                                                               "gate.open", "bgp.announced"):
                extra = {k: v for k, v in e.items() if k not in ("t", "wall", "event", "site")}
                lines.append((e["wall"] - t_crash, f"site-b {e['event']} {json.dumps(extra)}"))
        if flipped:
            lines.append((flipped - t_crash, "BIRD's best route for 198.51.100.0/24 now via AS 64502 (site-b)"))
        lines.append((t_revive - t_crash, "site-a back: rejoined as the standby of site-b, daemon started"))
        for t, text in sorted(lines, key=lambda x: x[0]):
            print(f"  {t:6.2f}  {text}")
        print(f"\nclient: {len(vals)} increments on the same connection, "
              f"{'strictly consecutive' if ok else 'NOT consecutive: ' + str(err[:1])}; last value {vals[-1] if vals else None}; "
              f"longest stall {stall:.2f}s; greeting still {mc.get('greeting')!r}")
        mc.close()
        print_status(status())
        drilled = demo_drill(t0) if reprotected else None
        good = ok and flipped and reprotected and drilled
        print("demo " + ("OK" if good else "FAILED"))
        return 0 if good else 1
    finally:
        if not getattr(args, "keep", False):
            world.down()
