"""Output-commit latency, step by step: where a held frame's time goes between the pause that
ends its epoch and its release at the gate.

Boots the real guest (QEMU, a memory-writing workload inside it) in a private network
namespace, replicates it with the real Primary, codec, channel and output gate to a real
Standby and replica (fsync on, the replica on the disk under --replica-dir) in a second
process, over loopback, and drives a memcached `incr` client at the guest through the gate's
TAP. Per epoch it timestamps (one monotonic clock for both processes):

    stop → cont (the pause) → encoded → written to the socket → read at the standby →
    journal durable (fsync) → ACK sent → applied (the replica at N) → ACK read at the primary →
    released at the gate

and prints p50/p99 per step, each step's share of seal → release, the client's added latency
(protected minus the same guest with the gate open and no checkpoints), and the floor
pause + interval/2 (+ RTT, 0 here).

    .venv/bin/python bench/latency.py [--seconds 10] [--interval-ms 25] [--memory 128]
        [--dirty 16:1000] [--replica-dir /var/tmp] [--rtt MS [--rate 100mbit]]

`--rtt`: the standby runs in a second namespace behind the lab's user-space WAN emulator
(lab/wanem.py) set to that RTT (and rate); a UDP echo through it first measures the
emulator's own delay (configured 0 and --rtt against the measured RTT).

Needs root (a TAP in namespaces it makes and removes: gm-t-lat-<pid>, gm-t-latb-<pid>).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gmbase.stats import percentile as pct  # noqa: E402

GUEST, GATEWAY, PORT = "198.51.100.10", "198.51.100.1", 11211
mono = time.monotonic


# ------------------------------------------------------------------ the standby (its own process)
def standby_worker(replica_dir: str, size: int, port_file: str, out_file: str, host: str = "127.0.0.1") -> None:
    import uvloop

    from replication import codec as codec_mod
    from replication import transport
    from replication.standby import Standby
    from replication.store import FileOps, Replica
    from replication.transport import MsgType

    events: list[tuple[str, int, float]] = []
    cur = [0]

    class TimedOps(FileOps):
        def fsync(self, step, fd):
            super().fsync(step, fd)
            if step == "journal-fsync":
                events.append(("durable", cur[0], mono()))

        def replace(self, step, path, data, fsync):
            super().replace(step, path, data, fsync)
            if step == "meta":
                events.append(("applied", cur[0], mono()))

    class TimedStandby(Standby):
        async def handle(self, ch):
            recv, send = ch.recv, ch.send

            async def timed_recv():
                mtype, payload = await recv()
                if mtype is MsgType.CHECKPOINT:
                    cur[0] = codec_mod.peek_header(payload).epoch
                    events.append(("received", cur[0], mono()))
                return mtype, payload

            async def timed_send(mtype, payload=b""):
                if mtype is MsgType.ACK:
                    events.append(("ack_sent", int.from_bytes(payload, "big"), mono()))
                return await send(mtype, payload)

            ch.recv, ch.send = timed_recv, timed_send
            return await super().handle(ch)

    async def main():
        replica = Replica(Path(replica_dir), size, ops=TimedOps())
        replica.open()
        sb = TimedStandby(replica, {}, "bench-b", refuse_delay_s=0)
        server = await transport.serve(host, 0, sb.handle, max_frame=size + (64 << 20))
        Path(port_file).write_text(str(server.sockets[0].getsockname()[1]))
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        server.close()
        Path(out_file).write_text(json.dumps(events))
        os._exit(0)  # the session task may still run; the figures are written

    uvloop.run(main())


# ------------------------------------------------------------------ the WAN emulator between the two
WAN_A, WAN_B = "198.18.100.1/30", "198.18.100.2/30"


def start_wan(ns_a: str, ns_b: str, workdir: Path) -> subprocess.Popen:
    """The lab's WAN emulator (lab/wanem.py) between the two namespaces (their `wan0`)."""
    code = ("import sys, uvloop; from pathlib import Path; from lab.wanem import WanEmulator; "
            "uvloop.run(WanEmulator([(sys.argv[1], 'wan0', sys.argv[3]), (sys.argv[2], 'wan0', sys.argv[4])], "
            "Path(sys.argv[5])).run())")
    return subprocess.Popen([sys.executable, "-c", code, ns_a, ns_b, WAN_A, WAN_B, str(workdir / "wan.sock")],
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL)


async def wan_settings(workdir: Path, settings: dict) -> dict:
    from lab import wanem

    for _ in range(200):
        if (workdir / "wan.sock").exists():
            break
        await asyncio.sleep(0.05)
    return await wanem.control(workdir / "wan.sock", settings)


def echo_rtt(host: str, n: int = 60) -> tuple[float, float]:
    """(min, median) ms of a 64-byte UDP echo to the standby's namespace (its echo: `udp_echo`)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    xs = []
    for i in range(n):
        t = time.perf_counter()
        s.sendto(i.to_bytes(64, "big"), (host, 7))
        try:
            s.recvfrom(128)
        except socket.timeout:
            continue
        xs.append((time.perf_counter() - t) * 1000)
        time.sleep(0.02)
    s.close()
    return min(xs), statistics.median(xs)


def udp_echo(ns: str, host: str) -> None:
    """A UDP echo on port 7 in namespace `ns` (a daemon thread serves it)."""
    from geomirror import netns

    with netns.inside(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 7))

    def serve():
        while True:
            data, addr = s.recvfrom(128)
            s.sendto(data, addr)

    threading.Thread(target=serve, daemon=True).start()


# ------------------------------------------------------------------ the client
class Client:
    """memcached incr on one connection, latencies (ms) tagged with the phase they fell in."""

    def __init__(self):
        self.phase = "warmup"
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from lab.cli import Memcache

        s = None
        for _ in range(100):
            try:
                s = socket.create_connection((GUEST, PORT), timeout=5)
                break
            except OSError:
                time.sleep(0.2)
        if s is None:
            raise SystemExit("the guest's memcached did not answer")
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mc = Memcache(s)
        mc.set("n", "0")
        while not self.stop.is_set():
            t = time.perf_counter()
            mc.incr("n")
            self.lat[self.phase].append((time.perf_counter() - t) * 1000)


# ------------------------------------------------------------------ the primary (this process)
async def run(a, workdir: Path, replica_dir: Path) -> dict:
    from geomirror.image import build_image, default_cmdline
    from replication import transport
    from replication.capture import Capture
    from replication.gate import GateMode, UserspaceGate, open_tap
    from replication.primary import Primary, PrimaryConfig
    from replication.qemu import Guest, GuestSpec, detect_accel

    from geomirror import netns

    T: dict[int, dict[str, float]] = defaultdict(dict)
    hold_ms: list[float] = []
    wan_probe: dict = {}

    class TimedGate(UserspaceGate):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.held_at: deque[float] = deque()

        def _hold(self, frame):
            n = len(self._held)
            super()._hold(frame)
            if len(self._held) > n:
                self.held_at.append(mono())

        def seal(self, epoch):
            super().seal(epoch)
            T[epoch]["sealed"] = mono()

        def release(self, epoch):
            before = len(self._held)
            super().release(epoch)
            now = mono()
            for _ in range(before - len(self._held)):
                hold_ms.append((now - self.held_at.popleft()) * 1000)
            T[epoch]["released"] = now
            T[epoch]["frames"] = before - len(self._held)

    class TimedGuest(Guest):
        primary = None

        async def stop_vcpus(self):
            T[self.primary.status.epoch + 1]["stop"] = mono()
            return await super().stop_vcpus()

        async def cont(self):
            r = await super().cont()
            if self.primary is not None:
                T[self.primary.status.epoch + 1]["cont"] = mono()
            return r

    class TimedPrimary(Primary):
        def _encode_epoch(self, codec, n, *args):
            frame = super()._encode_epoch(codec, n, *args)
            T[n]["encoded"] = mono()
            T[n]["wire_bytes"] = len(frame)
            return frame

        async def _send_checkpoint(self, ch, rec, frame):
            T[rec.epoch]["send_start"] = mono()
            await super()._send_checkpoint(ch, rec, frame)
            T[rec.epoch]["sent"] = mono()

        def _on_ack(self, epoch):
            T[epoch]["ack_read"] = mono()
            super()._on_ack(epoch)

    from geomirror.site.host import configure_tap

    img = build_image(progress=False)
    size = a.memory << 20
    tap = open_tap("gmlat0")
    await asyncio.to_thread(configure_tap, "gmlat0", GATEWAY, 24, True)
    gate = TimedGate(workdir / "net.sock", tap, mode=GateMode.OPEN)
    await gate.start()
    spec = GuestSpec(name="lat", memory_mb=a.memory, kernel=img.kernel, initrd=img.initrd,
                     append=default_cmdline(GUEST, 24, GATEWAY, dirty=a.dirty), ram_path=workdir / "ram",
                     qmp_path=workdir / "qmp.sock", serial_path=workdir / "serial.log",
                     net_socket=workdir / "net.sock", accel=detect_accel())
    guest = TimedGuest(spec)
    await guest.start()
    sb_proc = None
    client = Client()
    try:
        await guest.wait_ready(180)
        gate.attach_guest(spec.net_socket)
        client.thread.start()
        await asyncio.sleep(3)
        client.phase = "open"  # the same guest, no checkpoints, output not held
        await asyncio.sleep(a.seconds)
        port_file, out_file = workdir / "port", workdir / "standby.json"
        host = "127.0.0.1"
        if a.rtt is not None:
            host = WAN_B.split("/")[0]
            await wan_settings(workdir, {"rtt_ms": 0.0, "rate_bps": 0.0})
            r0 = await asyncio.to_thread(echo_rtt, host)
            await wan_settings(workdir, {"rtt_ms": a.rtt, "rate_bps": a.rate_bps})
            r1 = await asyncio.to_thread(echo_rtt, host)
            wan_probe.update(zero=r0, set=r1)
        sb_proc = netns.spawn(a.ns_b, [sys.executable, __file__, "--standby-worker", str(replica_dir), str(size),
                                       str(port_file), str(out_file), host])
        while not port_file.exists() or not port_file.read_text():
            await asyncio.sleep(0.05)
        port = int(port_file.read_text())
        cap = Capture(spec.ram_path, size)
        cfg = PrimaryConfig(site="bench-a", compat={}, run_id="bench", interval_ms=a.interval_ms,
                            max_in_flight=a.max_in_flight)
        primary = TimedPrimary(cfg, guest, cap, gate,
                               connect=lambda: transport.connect(host, port, max_frame=size + (64 << 20)))
        primary.on_session_commits = lambda: gate.set_mode(GateMode.HOLD)
        guest.primary = primary
        task = asyncio.create_task(primary.run())
        while primary.status.state != "protected":
            await asyncio.sleep(0.1)
        client.phase = "settle"
        await asyncio.sleep(2)
        first = primary.status.epoch + 1
        client.phase = "protected"
        await asyncio.sleep(a.seconds)
        last = primary.status.committed_epoch
        client.phase = "done"
        primary.stop()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        cap.close()
        sb_proc.send_signal(signal.SIGTERM)
        sb_proc.wait(30)
        for name, epoch, t in json.loads(out_file.read_text()):
            T[epoch][name] = t
    finally:
        client.stop.set()
        if sb_proc is not None and sb_proc.poll() is None:
            sb_proc.kill()
        await guest.close()
        await gate.close()
        os.close(tap)
    rows = [T[e] for e in range(first, last + 1) if "released" in T[e] and "applied" in T[e] and "stop" in T[e]]
    return {"rows": rows, "hold_ms": hold_ms, "client": client.lat, "interval_ms": a.interval_ms, "wan": wan_probe}


STEPS = [  # (label, from, to)
    ("pause (stop → cont)", "stop", "cont"),
    ("encode (cont → encoded)", "cont", "encoded"),
    ("send (encoded → written)", "encoded", "sent"),
    ("wire (written → read at standby)", "sent", "received"),
    ("journal (read → durable)", "received", "durable"),
    ("ack point (durable → ACK sent)", "durable", "ack_sent"),
    ("return (ACK sent → read)", "ack_sent", "ack_read"),
    ("gate (ACK read → released)", "ack_read", "released"),
]


def report(r: dict, a) -> None:
    rows = r["rows"]
    total = [(x["released"] - x["sealed"]) * 1000 for x in rows]
    where = "loopback" if a.rtt is None else f"the lab WAN emulator at RTT {a.rtt:g} ms, {a.rate}"
    w = r.get("wan") or {}
    if w:
        print(f"\nWAN emulator, UDP echo min/p50: configured 0 ms → {w['zero'][0]:.2f}/{w['zero'][1]:.2f} ms; "
              f"configured {a.rtt:g} ms → {w['set'][0]:.2f}/{w['set'][1]:.2f} ms "
              f"(+{w['set'][1] - a.rtt:.2f} ms over the setting)")
    print(f"\noutput-commit latency over {where}: {len(rows)} epochs, interval {a.interval_ms:g} ms, guest "
          f"{a.memory} MB gm.dirty={a.dirty}, replica on {a.replica_dir} (fsync on)")
    print(f"{'step':38} {'p50 ms':>8} {'p99 ms':>8} {'share':>6}")
    tot_mean = statistics.mean(total)
    for label, a_, b_ in STEPS:
        xs = [(x[b_] - x[a_]) * 1000 for x in rows if a_ in x and b_ in x]
        print(f"{label:38} {pct(xs, 50):8.2f} {pct(xs, 99):8.2f} {statistics.mean(xs) / tot_mean:6.1%}")
    for label, a_, b_ in (("  (standby: durable → applied)", "durable", "applied"),
                          ("  (standby: read → applied)", "received", "applied")):
        xs = [(x[b_] - x[a_]) * 1000 for x in rows]
        print(f"{label:38} {pct(xs, 50):8.2f} {pct(xs, 99):8.2f}")
    print(f"{'seal → released':38} {pct(total, 50):8.2f} {pct(total, 99):8.2f}")
    pause = statistics.median((x["cont"] - x["stop"]) * 1000 for x in rows)
    cycle = statistics.median((b["stop"] - a_["stop"]) * 1000 for a_, b in zip(rows, rows[1:]))
    wire = statistics.median(x["wire_bytes"] for x in rows)
    print(f"cycle (stop → next stop) p50 {cycle:.1f} ms, wire bytes/epoch p50 {wire / 1024:.0f} KiB")
    hold = r["hold_ms"]
    floor = pause + (cycle - pause) / 2 + (a.rtt or 0)
    print(f"held frames: {len(hold)}, hold p50 {pct(hold, 50):.1f} ms p99 {pct(hold, 99):.1f} ms; "
          f"floor RTT + pause + interval/2 = {floor:.1f} ms")
    c = r["client"]
    if c.get("open") and c.get("protected"):
        o, p = c["open"], c["protected"]
        print(f"client incr: open p50 {pct(o, 50):.1f} ms, protected p50 {pct(p, 50):.1f} ms p99 {pct(p, 99):.1f} ms; "
              f"added p50 {pct(p, 50) - pct(o, 50):.1f} ms ({(pct(p, 50) - pct(o, 50)) / floor:.2f}x the floor), "
              f"{len(p) / a.seconds:.0f} ops/s")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--standby-worker":
        standby_worker(*sys.argv[2:3], int(sys.argv[3]), *sys.argv[4:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--interval-ms", type=float, default=25)
    ap.add_argument("--max-in-flight", type=int, default=2)
    ap.add_argument("--memory", type=int, default=128)
    ap.add_argument("--dirty", default="16:1000", help="gm-dirty workload in the guest: MB:PAGES_PER_S")
    ap.add_argument("--replica-dir", default="/var/tmp", help="where the replica goes (the lab's is on /run, ext4)")
    ap.add_argument("--json", type=Path, help="also write the per-epoch timestamps here")
    ap.add_argument("--rtt", type=float, help="put the lab's WAN emulator at this RTT (ms) between the sites")
    ap.add_argument("--rate", default="100mbit", help="its rate with --rtt (0: unlimited)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/latency.py needs root (a TAP device in a private namespace)", file=sys.stderr)
        return 2
    from pyroute2 import IPRoute

    from geomirror import logging as gl
    from geomirror import netns

    gl.setup(level="WARNING")
    from lab.wanem import parse_rate_bps

    ns = f"gm-t-lat-{os.getpid()}"
    a.ns_b = ns if a.rtt is None else f"gm-t-latb-{os.getpid()}"
    a.rate_bps = parse_rate_bps(a.rate) if a.rate not in ("0", "") else 0.0
    for n in {ns, a.ns_b}:
        netns.create(n)
    workdir = Path(tempfile.mkdtemp(prefix="gm-lat-", dir="/dev/shm"))
    replica_dir = Path(tempfile.mkdtemp(prefix="gm-lat-replica-", dir=a.replica_dir))
    wan = None
    try:
        for n in {ns, a.ns_b}:
            with netns.inside(n), IPRoute() as ip:
                ip.link("set", index=ip.link_lookup(ifname="lo")[0], state="up")
        netns.enter(ns)
        if a.rtt is not None:
            wan = start_wan(ns, a.ns_b, workdir)
            for _ in range(200):
                if (workdir / "wan.sock").exists():
                    break
                time.sleep(0.05)
            udp_echo(a.ns_b, WAN_B.split("/")[0])
        import uvloop

        r = uvloop.run(run(a, workdir, replica_dir))
    finally:
        if wan is not None:
            wan.kill()
            wan.wait()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(replica_dir, ignore_errors=True)
        for n in {ns, a.ns_b}:
            netns.remove(n)
    if a.json:
        a.json.write_text(json.dumps({k: v for k, v in r.items()}))
    report(r, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
