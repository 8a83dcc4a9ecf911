"""The Speaker against a real BIRD 2 over a veth between two private namespaces.

router namespace gm-t-bgp-r-<pid>: BIRD, AS 64500, 198.18.200.1/30, exports a static
203.0.113.0/24 to us and installs what it learns in its kernel table.
speaker namespace gm-t-bgp-s-<pid>: the Speaker and its ExaBGP, AS 64502, 198.18.200.2/30.
Nothing is ever created in the root namespace: the veth is made inside the router
namespace with its peer placed straight into the speaker namespace.
"""

from __future__ import annotations

import asyncio
import os
import sys
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute, netns

from bgp.speaker import Neighbor, Policy, Speaker, SpeakerError

ROUTER_AS, SPEAKER_AS = 64500, 64502
ROUTER_IP, SPEAKER_IP = "198.18.200.1", "198.18.200.2"
GUEST_PREFIX = "198.51.100.0/24"
UPSTREAM_PREFIX = "203.0.113.0/24"
BIRD = "/usr/sbin/bird"
BIRDC = "/usr/sbin/birdc"

BIRD_CONF = f"""
router id {ROUTER_IP};
log stderr all;
protocol device {{ scan time 1; }}
protocol direct {{ ipv4; interface "r0"; }}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}
protocol static upstream {{ ipv4; route {UPSTREAM_PREFIX} blackhole; }}
protocol bgp speaker {{
    local {ROUTER_IP} as {ROUTER_AS};
    neighbor {SPEAKER_IP} as {SPEAKER_AS};
    hold time 9;
    connect retry time 1;
    graceful restart off;
    ipv4 {{ import all; export where proto = "upstream"; }};
}}
"""


def in_netns(name: str, fn):
    """Run fn() on a fresh thread that has entered netns `name` (namespaces are per thread),
    so the calling thread never leaves the root namespace."""
    out: dict = {}

    def body():
        try:
            netns.setns(name)
            out["value"] = fn()
        except BaseException as e:  # handed back to the caller
            out["error"] = e

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class NetnsLoop:
    """An asyncio loop on a thread inside a namespace: the Speaker and the ExaBGP it spawns
    live in the speaker namespace while pytest stays in the root namespace."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.error: BaseException | None = None

        def body():
            try:
                netns.setns(name)
            except BaseException as e:
                self.error = e
                ready.set()
                return
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()
        ready.wait()
        if self.error:
            raise self.error

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _kill(pid: int | None) -> None:
    if not pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _setup_link(name: str, ifname: str, address: str) -> None:
    with IPRoute(netns=name) as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.link("set", index=lo, state="up")
        idx = ipr.link_lookup(ifname=ifname)[0]
        ipr.addr("add", index=idx, address=address, prefixlen=30)
        ipr.link("set", index=idx, state="up")


class Lab:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.router = f"gm-t-bgp-r-{os.getpid()}"
        self.speaker_ns = f"gm-t-bgp-s-{os.getpid()}"
        self.ctl = str(tmp / "bird.ctl")
        self.bird: subprocess.Popen | None = None

    def build(self) -> None:
        for ns in (self.router, self.speaker_ns):
            assert ns not in netns.listnetns(), f"namespace {ns} already exists"
            netns.create(ns)
        with IPRoute(netns=self.router) as ipr:
            ipr.link("add", ifname="r0", kind="veth", peer={"ifname": "s0", "net_ns_fd": self.speaker_ns})
        _setup_link(self.router, "r0", ROUTER_IP)
        _setup_link(self.speaker_ns, "s0", SPEAKER_IP)
        conf = self.tmp / "bird.conf"
        conf.write_text(BIRD_CONF)
        log = open(self.tmp / "bird.log", "wb")
        self.bird = in_netns(self.router, lambda: subprocess.Popen(
            [BIRD, "-f", "-c", str(conf), "-s", self.ctl, "-P", str(self.tmp / "bird.pid")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log))
        wait_until(lambda: Path(self.ctl).exists() and self.birdc("show status").startswith("BIRD"), 15,
                   "BIRD control socket")

    def teardown(self) -> None:
        if self.bird is not None:
            _kill(self.bird.pid)
            self.bird.wait(5)
        for ns in (self.router, self.speaker_ns):
            if ns in netns.listnetns():
                netns.remove(ns)

    def birdc(self, *cmd: str) -> str:
        r = subprocess.run([BIRDC, "-r", "-s", self.ctl, *cmd], capture_output=True, text=True, timeout=10)
        return r.stdout

    def bird_route(self, prefix: str) -> dict | None:
        """BIRD's view of `prefix`: next hop, AS path, MED, communities; None if it has no route."""
        out = self.birdc("show", "route", prefix, "all")
        if not re.search(rf"^{re.escape(prefix)}\s", out, re.M):
            return None
        r: dict = {}
        if m := re.search(r"via (\S+)", out):
            r["via"] = m.group(1)
        if m := re.search(r"BGP\.as_path:(.*)", out):
            r["as_path"] = [int(x) for x in m.group(1).split()]
        if m := re.search(r"BGP\.med:\s*(\d+)", out):
            r["med"] = int(m.group(1))
        if m := re.search(r"BGP\.community:(.*)", out):
            r["communities"] = re.findall(r"\((\d+),(\d+)\)", m.group(1))
        return r

    def kernel_route(self, prefix: str) -> str | None:
        """The gateway of the router namespace's kernel route for `prefix`, if any."""
        net, plen = prefix.split("/")
        with IPRoute(netns=self.router) as ipr:
            for r in ipr.get_routes(family=2):
                if r["dst_len"] == int(plen) and r.get_attr("RTA_DST") == net:
                    return r.get_attr("RTA_GATEWAY")
        return None


def wait_until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lab():
    if os.geteuid() != 0 or not shutil.which(BIRD):
        pytest.skip("needs root and BIRD 2")
    tmp = Path(tempfile.mkdtemp(prefix="gm-t-bgp-"))
    lab = Lab(tmp)
    try:
        lab.build()
        yield lab
    finally:
        lab.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def speaker(lab):
    """A started Speaker in the speaker namespace with its session to BIRD up."""
    loop = NetnsLoop(lab.speaker_ns)
    run_dir = Path(tempfile.mkdtemp(prefix="gm-t-bgp-sp-"))
    sp: Speaker | None = None

    async def make():
        s = Speaker(router_id=SPEAKER_IP, local_as=SPEAKER_AS, run_dir=run_dir / "bgp",
                    neighbors=[Neighbor(ROUTER_IP, ROUTER_AS, local_address=SPEAKER_IP, hold_time=9)])
        await s.start()
        return s

    try:
        sp = loop.run(make())
        sp.loop = loop  # the tests drive it through this
        loop.run(sp.wait_for(lambda: sp.neighbor_states.get(ROUTER_IP) == "up", 30))
        yield sp
    finally:
        pid = sp.pid if sp else None
        if sp is not None:
            try:
                loop.run(sp.stop(withdraw=False), timeout=20)
            except Exception:
                pass
        _kill(pid)  # in case stop() did not get there
        loop.close()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.lab
def test_neighbor_up_and_upstream_route_received(lab, speaker):
    assert speaker.neighbor_states == {ROUTER_IP: "up"}
    speaker.loop.run(speaker.wait_for(lambda: speaker.received_routes(UPSTREAM_PREFIX), 15))
    (r,) = speaker.received_routes(UPSTREAM_PREFIX)
    assert (r.neighbor, r.prefix, r.as_path, r.next_hop) == (ROUTER_IP, UPSTREAM_PREFIX, (ROUTER_AS,), ROUTER_IP)
    assert r.origin_as == ROUTER_AS
    assert speaker.received_routes(GUEST_PREFIX) == []


@pytest.mark.lab
def test_announce_reaches_bird_and_kernel_then_withdraw_removes_it(lab, speaker):
    speaker.loop.run(speaker.announce(GUEST_PREFIX))
    r = wait_until(lambda: lab.bird_route(GUEST_PREFIX), 15, "the guest prefix in BIRD")
    assert r["via"] == SPEAKER_IP
    assert r["as_path"] == [SPEAKER_AS]
    assert wait_until(lambda: lab.kernel_route(GUEST_PREFIX), 15, "the kernel route") == SPEAKER_IP
    assert speaker.announced == [GUEST_PREFIX]

    speaker.loop.run(speaker.withdraw(GUEST_PREFIX))
    wait_until(lambda: lab.bird_route(GUEST_PREFIX) is None, 15, "the withdrawal in BIRD")
    wait_until(lambda: lab.kernel_route(GUEST_PREFIX) is None, 15, "the kernel route to go")
    assert speaker.announced == []


@pytest.mark.lab
def test_med_community_and_prepend_reach_bird(lab, speaker):
    speaker.loop.run(speaker.announce(GUEST_PREFIX, med=50, communities=("64502:100", "65535:7"), prepend=2))
    r = wait_until(lambda: lab.bird_route(GUEST_PREFIX), 15, "the guest prefix in BIRD")
    assert r["as_path"] == [SPEAKER_AS] * 3, "prepend=2 must put exactly two extra copies of our AS"
    assert r["med"] == 50
    assert sorted(r["communities"]) == [("64502", "100"), ("65535", "7")]
    # a new announcement replaces the attributes
    speaker.loop.run(speaker.announce(GUEST_PREFIX, prepend=0))
    r = wait_until(lambda: (x := lab.bird_route(GUEST_PREFIX)) and "med" not in x and x, 15, "re-announcement")
    assert r["as_path"] == [SPEAKER_AS] and "communities" not in r


@pytest.mark.lab
def test_bad_announcement_is_refused_before_exabgp(lab, speaker):
    with pytest.raises(ValueError):
        speaker.loop.run(speaker.announce("198.51.100.0/24 next-hop 1.2.3.4"))
    with pytest.raises(ValueError):
        speaker.loop.run(speaker.announce(GUEST_PREFIX, communities=["64502:100; withdraw"]))
    assert speaker.announced == []


@pytest.mark.lab
def test_exabgp_killed_is_restarted_and_route_reapplied(lab, speaker):
    speaker.loop.run(speaker.announce(GUEST_PREFIX, med=7))
    wait_until(lambda: lab.bird_route(GUEST_PREFIX), 15, "the guest prefix in BIRD")
    old = speaker.pid
    os.kill(old, signal.SIGKILL)
    # the session went with the process, so BIRD drops the route ...
    wait_until(lambda: lab.bird_route(GUEST_PREFIX) is None, 15, "BIRD to drop the route of the dead ExaBGP")
    # ... and only a re-applied announcement from the new ExaBGP can bring it back
    r = wait_until(lambda: lab.bird_route(GUEST_PREFIX), 30, "the route from the restarted ExaBGP")
    assert r["med"] == 7 and r["as_path"] == [SPEAKER_AS]
    assert speaker.pid not in (None, old)
    assert speaker.restarts == 1
    speaker.loop.run(speaker.wait_for(lambda: speaker.neighbor_states[ROUTER_IP] == "up", 15))


@pytest.mark.lab
def test_stop_withdraws_and_ends_exabgp(lab, speaker):
    speaker.loop.run(speaker.announce(GUEST_PREFIX))
    wait_until(lambda: lab.bird_route(GUEST_PREFIX), 15, "the guest prefix in BIRD")
    pid = speaker.pid
    speaker.loop.run(speaker.stop(withdraw=True))
    assert lab.bird_route(GUEST_PREFIX) is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not speaker.socket_path.exists()
    assert speaker.neighbor_states == {ROUTER_IP: "down"}


async def test_command_without_exabgp_fails_with_speaker_error(tmp_path):
    """No ExaBGP connected: announce must fail with SpeakerError, not hang."""
    s = Speaker(router_id=SPEAKER_IP, local_as=SPEAKER_AS, run_dir=tmp_path / "b",
                neighbors=[Neighbor(ROUTER_IP, ROUTER_AS)], ack_timeout=0.2)
    with pytest.raises(SpeakerError, match="not connected"):
        await s.announce(GUEST_PREFIX)


async def test_relay_carries_lines_both_ways_and_survives_a_daemon_restart(tmp_path):
    """bgp.relay as ExaBGP runs it: stdin → socket, socket → stdout; while the daemon's socket
    is gone, events are kept and acks (answers for the old connection) are dropped."""
    path = str(tmp_path / "api.sock")
    conns: asyncio.Queue = asyncio.Queue()

    async def accept(reader, writer):
        await conns.put((reader, writer))

    server = await asyncio.start_unix_server(accept, path=path)
    relay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bgp.relay", path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        cwd=str(Path(__file__).resolve().parent.parent))
    try:
        reader, writer = await asyncio.wait_for(conns.get(), 10)
        relay.stdin.write(b'{"type": "state", "n": 1}\n')
        assert await asyncio.wait_for(reader.readline(), 10) == b'{"type": "state", "n": 1}\n'
        writer.write(b"announce route 198.51.100.0/24 next-hop self\n")
        assert await asyncio.wait_for(relay.stdout.readline(), 10) == b"announce route 198.51.100.0/24 next-hop self\n"

        # the daemon goes away; ExaBGP keeps talking
        server.close()
        await server.wait_closed()
        writer.close()
        await writer.wait_closed()
        relay.stdin.write(b"done\n" b'{"type": "update", "n": 2}\n')
        await relay.stdin.drain()
        os.unlink(path)
        server = await asyncio.start_unix_server(accept, path=path)
        reader, writer = await asyncio.wait_for(conns.get(), 10)
        relay.stdin.write(b'{"type": "state", "n": 3}\n')
        assert await asyncio.wait_for(reader.readline(), 10) == b'{"type": "update", "n": 2}\n'
        assert await asyncio.wait_for(reader.readline(), 10) == b'{"type": "state", "n": 3}\n'
        writer.write(b"withdraw route 198.51.100.0/24 next-hop self\n")
        assert await asyncio.wait_for(relay.stdout.readline(), 10) == b"withdraw route 198.51.100.0/24 next-hop self\n"

        relay.stdin.close()  # ExaBGP exits: so does the relay
        assert await asyncio.wait_for(relay.wait(), 10) == 0
    finally:
        if relay.returncode is None:
            relay.kill()
            await relay.wait()
        server.close()


async def test_dual_stack_announce_drain_and_withdraw_send_what_exabgp_needs(tmp_path):
    """Without ExaBGP: a connection in the relay's place reads the commands and acks them. An
    IPv6 prefix goes to each neighbour with its next_hop6; drain re-announces with 65535:0;
    a reconnect (ExaBGP restarted) re-applies the latest announcement of every prefix."""
    nbs = [Neighbor("198.18.1.1", 64500, next_hop6="2001:db8:ffff:1::2"),
           Neighbor("198.18.9.1", 64510, next_hop6="2001:db8:ffff:9::2")]
    s = Speaker(router_id="198.18.1.2", local_as=64501, run_dir=tmp_path, neighbors=nbs,
                families=("ipv4 unicast", "ipv6 unicast"), ack_timeout=5)
    assert "family { ipv4 unicast; ipv6 unicast; }" in s.config_text
    path = str(tmp_path / "api.sock")
    server = await asyncio.start_unix_server(s._on_relay, path=path)
    lines: asyncio.Queue = asyncio.Queue()

    async def relay():
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            while line := await reader.readline():
                lines.put_nowait(line.decode().strip())
                writer.write(b"done\n")
        finally:
            writer.close()

    async def sent(n: int) -> list[str]:
        out = [await asyncio.wait_for(lines.get(), 5) for _ in range(n)]
        assert lines.empty(), lines.get_nowait()
        return out

    task = asyncio.create_task(relay())
    try:
        await asyncio.wait_for(s._relay_up.wait(), 5)  # else the first announce is sent twice (re-apply)
        await s.announce("2001:db8:100::/48", policy=Policy(med=5, communities=("64501:1",)))
        await s.announce("198.51.100.0/24", med=5, prepend=1)
        assert await sent(3) == [
            "neighbor 198.18.1.1 announce route 2001:db8:100::/48 next-hop 2001:db8:ffff:1::2 med 5 community [ 64501:1 ]",
            "neighbor 198.18.9.1 announce route 2001:db8:100::/48 next-hop 2001:db8:ffff:9::2 med 5 community [ 64501:1 ]",
            "announce route 198.51.100.0/24 next-hop self med 5 as-path [ 64501 64501 ]"]
        await s.drain("2001:db8:100::/48", Policy(med=5, communities=("64501:1",)))
        assert [c.split(" community ")[1] for c in await sent(2)] == ["[ 64501:1 65535:0 ]"] * 2
        task.cancel()  # ExaBGP restarted: the new relay gets the drained announcement again
        await asyncio.gather(task, return_exceptions=True)
        task = asyncio.create_task(relay())
        again = await sent(3)
        assert [c.split(" community ")[-1] for c in again[:2]] == ["[ 64501:1 65535:0 ]"] * 2
        assert again[2] == "announce route 198.51.100.0/24 next-hop self med 5 as-path [ 64501 64501 ]"
        await s.withdraw("2001:db8:100::/48")
        assert await sent(2) == [
            "neighbor 198.18.1.1 withdraw route 2001:db8:100::/48 next-hop 2001:db8:ffff:1::2",
            "neighbor 198.18.9.1 withdraw route 2001:db8:100::/48 next-hop 2001:db8:ffff:9::2"]
        assert s.announced == ["198.51.100.0/24"]
        with pytest.raises(ValueError, match="not both"):
            await s.announce("198.51.100.0/24", med=1, policy=Policy())
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()


async def test_ipv6_prefix_is_refused_when_the_sessions_carry_only_ipv4(tmp_path):
    s = Speaker(router_id="198.18.1.2", local_as=64501, run_dir=tmp_path,
                neighbors=[Neighbor("198.18.1.1", 64500, next_hop6="2001:db8:ffff:1::2")], ack_timeout=0.2)
    with pytest.raises(ValueError, match="carry only ipv4 unicast"):
        await s.announce("2001:db8:100::/48")
