"""The lease backends: etcd 3.4 for real on 127.0.0.1 (mutual TLS with pair-CA certificates),
and the HA machine driven through Effects against it exactly as against the witness."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from geomirror import config, ha, pairing
from geomirror.errors import ConfigError
from geomirror.lease import (EtcdError, EtcdLease, EtcdUnreachable, LeaseBackend, LeaseError, LeaseUnreachable,
                             _b64, make_lease_backend)
from geomirror.site.effects import Effects
from geomirror.site.gate_policy import GateController, GateInputs, UnreachablePolicy
from geomirror.witness import WitnessClient, WitnessError, WitnessUnreachable
from tests.site_fakes import FakeGate, FakeSpeaker, ha_config, make_ctx, site_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TTL_MS = 1000  # the etcd below runs with a 100 ms election timeout, so it grants 1 s leases


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member on loopback: client URL over mutual TLS (pair CA), peer URL plain."""

    def __init__(self, root: Path, pki: Path):
        self.root, self.pki = root, pki
        self.port = _free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = root / "etcd.log"

    def start(self) -> None:
        peer = f"http://127.0.0.1:{_free_port()}"
        pki = self.pki
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "m1", "--data-dir", str(self.root / "data"),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"m1={peer}", "--initial-cluster-state", "new",
                 "--heartbeat-interval", "10", "--election-timeout", "100",
                 "--cert-file", str(pki / "etcd.pem"), "--key-file", str(pki / "etcd.key"),
                 "--trusted-ca-file", str(pki / "ca.pem"), "--client-cert-auth",
                 "--logger", "zap", "--log-level", "warn"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        ctx = pairing.client_context(pki / "ca.pem", pki / "site-a.pem", pki / "site-a.key")
        ctx.check_hostname = False  # readiness only: the tests check etcd's name themselves
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx))
        deadline = time.monotonic() + 15
        while True:
            try:
                with opener.open(self.url + "/health", timeout=1) as r:
                    if b'"true"' in r.read():
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"etcd did not become healthy at {self.url}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    pairing.create_pair(d, ["site-a", "site-b"], ["witness"])
    pairing.issue_cert(d, "etcd")
    return d


@pytest.fixture(scope="module")
def etcd(tmp_path_factory, pki):
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian etcd-server; scripts/setup.sh installs it)")
    e = Etcd(tmp_path_factory.mktemp("etcd"), pki)
    e.start()
    yield e
    e.stop()


def client(pki: Path, site: str, url, *, cert_dir: Path | None = None, ca: Path | None = None,
           server_name="etcd", prefix="/t", timeout_s=1.0) -> EtcdLease:
    cert_dir = cert_dir or pki
    ctx = pairing.client_context(ca or pki / "ca.pem", cert_dir / f"{site}.pem", cert_dir / f"{site}.key")
    urls = url if isinstance(url, list) else [url]
    return EtcdLease(urls, ctx, site, prefix=prefix, server_name=server_name, timeout_s=timeout_s)


async def until_granted(backend: EtcdLease, guest: str, within_s: float = 5.0):
    deadline = time.monotonic() + within_s
    while True:
        r = await backend.acquire(guest, TTL_MS)
        if r.ok or time.monotonic() > deadline:
            return r
        await asyncio.sleep(0.1)


# ---------------------------------------------------------------- the etcd backend
async def test_acquire_renew_release_and_get(etcd, pki):
    async with client(pki, "site-a", etcd.url) as a:
        assert isinstance(a, LeaseBackend)
        assert await a.get("g1") == {"guest": "g1", "generation": 0, "holder": None, "last_holder": None,
                                     "valid": False, "expires_in_ms": 0}
        before = time.monotonic()
        r = await a.acquire("g1", 3000)
        after = time.monotonic()
        assert (r.ok, r.generation, r.holder, r.expires_in_ms) == (True, 1, "site-a", 3000)
        assert before <= r.expires_at - 3 <= after  # counted from when the grant was sent
        assert r.expires_at_boottime - r.expires_at == pytest.approx(
            time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic(), abs=0.05)
        st = await a.get("g1")
        assert (st["holder"], st["generation"], st["valid"]) == ("site-a", 1, True) and st["expires_in_ms"] > 0
        again = await a.acquire("g1", 3000)  # the holder asks again while valid: same generation
        assert (again.ok, again.generation) == (True, 1)
        assert (await a.renew("g1", 1, 3000)).ok
        refused = await a.renew("g1", 2, 3000)
        assert (refused.ok, refused.generation, refused.holder) == (False, 1, "site-a")
        assert not (await a.release("g1", 2)).ok
        assert (await a.release("g1", 1)).ok
        st = await a.get("g1")
        assert (st["holder"], st["valid"], st["generation"], st["last_holder"]) == (None, False, 1, "site-a")
        assert not (await a.renew("g1", 1, 3000)).ok  # released: no renewal, only a new acquire
        r = await a.acquire("g1", 3000)
        assert (r.ok, r.generation) == (True, 2)  # a new grant after a release: the next generation
        await a.release("g1", 2)


async def test_a_second_site_waits_for_expiry_and_gets_a_higher_generation(etcd, pki):
    async with client(pki, "site-a", etcd.url) as a, client(pki, "site-b", etcd.url) as b:
        ra = await a.acquire("g2", TTL_MS)
        assert (ra.ok, ra.generation, ra.expires_in_ms) == (True, 1, 1000)
        denied = await b.acquire("g2", TTL_MS)
        assert (denied.ok, denied.holder, denied.generation) == (False, "site-a", 1)
        assert not (await b.renew("g2", 1, TTL_MS)).ok and not (await b.release("g2", 1)).ok
        assert (await a.get("g2"))["holder"] == "site-a"  # b's refused calls changed nothing
        old = (await a._read(a.keys("g2"))).holder.lease  # a's etcd lease, for a late keep-alive below
        rb = await until_granted(b, "g2")  # a stops renewing: its lease runs out
        assert (rb.ok, rb.holder) == (True, "site-b") and rb.generation > ra.generation

        # a lost it: no renewal, no re-take at its old generation, no late keep-alive of its old lease
        lost = await a.renew("g2", ra.generation, TTL_MS)
        assert (lost.ok, lost.holder, lost.generation) == (False, "site-b", rb.generation)
        assert await a._keepalive(old) == 0
        retake = await a.acquire("g2", TTL_MS)
        assert (retake.ok, retake.holder) == (False, "site-b")
        assert not (await a.release("g2", ra.generation)).ok
        assert (await b.get("g2"))["holder"] == "site-b"
        assert (await b.release("g2", rb.generation)).ok
        back = await a.acquire("g2", TTL_MS)
        assert (back.ok, back.generation) == (True, rb.generation + 1)
        await a.release("g2", back.generation)


class EndsBeforeTheKeepAlive(EtcdLease):
    """The etcd lease ends between renew's read of the key and its keep-alive."""

    async def _keepalive(self, lease_id):
        await self._revoke(lease_id)
        return await super()._keepalive(lease_id)


async def test_a_lease_that_ends_during_a_renewal_is_not_renewed(etcd, pki):
    async with client(pki, "site-a", etcd.url) as a:
        r = await a.acquire("g8", 3000)
        late = EndsBeforeTheKeepAlive(a.endpoints, a.ssl_context, "site-a", prefix="/t", server_name="etcd")
        async with late:
            lost = await late.renew("g8", r.generation, 3000)
        assert (lost.ok, lost.holder, lost.expires_at) == (False, None, None)
        assert (await a.get("g8"))["holder"] is None


async def test_concurrent_acquires_grant_one_holder_one_generation(etcd, pki):
    sites = [client(pki, s, etcd.url) for s in ("site-a", "site-b")]
    try:
        results = await asyncio.gather(*(s.acquire("g3", 3000) for s in sites for _ in range(3)))
        winners = {(r.holder, r.generation) for r in results if r.ok}
        assert len(winners) == 1, results
        holder, gen = winners.pop()
        assert gen == 1 and all(r.holder == holder and r.generation == 1 for r in results)
    finally:
        for s in sites:
            await s.close()


async def test_a_stranger_certificate_is_refused(etcd, pki, tmp_path):
    other = pairing.create_pair(tmp_path / "other", ["site-a", "site-b"], [])
    async with client(pki, "site-a", etcd.url, cert_dir=other.dir) as stranger:
        with pytest.raises(LeaseUnreachable, match="etcd refused this site's certificate"):
            await stranger.acquire("g4", 3000)
    async with client(pki, "site-a", etcd.url, ca=other.ca) as wrong_ca:  # etcd's own cert is not trusted
        with pytest.raises(LeaseUnreachable, match="etcd's certificate fails verification"):
            await wrong_ca.acquire("g4", 3000)
    async with client(pki, "site-a", etcd.url, server_name="site-b") as wrong_name:
        with pytest.raises(LeaseUnreachable, match="fails verification .*Hostname mismatch.*for the name site-b\\?"):
            await wrong_name.get("g4")
    async with client(pki, "site-b", etcd.url) as b:
        assert (await b.get("g4"))["generation"] == 0  # nothing was written


async def test_another_member_is_tried_when_one_does_not_answer(etcd, pki):
    dead = f"https://127.0.0.1:{_free_port()}"
    async with client(pki, "site-a", [dead, etcd.url]) as a:
        r = await a.acquire("g5", 3000)
        assert r.ok and a.endpoints[a._current] == etcd.url
        h = await a.health()
        assert h["healthy"] == [etcd.url] and list(h["down"]) == [dead]
        assert a.members_down().keys() == {dead}
        await a.release("g5", r.generation)


async def test_keys_not_written_by_geomirror_are_never_taken(etcd, pki):
    async with client(pki, "site-a", etcd.url) as a:
        await a._call("POST", "/v3/kv/put", {"key": _b64("/t/g6/holder"), "value": _b64("not json")})
        with pytest.raises(EtcdError, match="etcd key /t/g6/holder holds b'not json', which is not a geomirror"):
            await a.acquire("g6", 3000)


async def test_etcd_down_is_the_unreachable_error(tmp_path, pki):
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian etcd-server; scripts/setup.sh installs it)")
    e = Etcd(tmp_path / "etcd", pki)
    e.start()
    try:
        async with client(pki, "site-a", e.url) as a:
            r = await a.acquire("g7", 3000)
            assert r.ok
            e.stop()
            with pytest.raises(EtcdUnreachable, match=f"no etcd member \\(etcd\\) answered .*{e.url}: "):
                await a.renew("g7", r.generation, 3000)
            with pytest.raises(WitnessUnreachable, match="no healthy etcd member"):
                await a.health()
    finally:
        e.stop()


# ---------------------------------------------------------------- the HA machine does not know
class GuestOps:
    def __init__(self):
        self.calls = []

    async def resume_guest(self):
        self.calls.append("resume")

    async def stop_guest(self, reason):
        self.calls.append("stop")

    async def rejoin(self, reason):
        self.calls.append("rejoin")


class Site:
    """A real HA machine wired to Effects with a lease backend, as the daemon wires them."""

    def __init__(self, name, lease, role=ha.Role.PRIMARY):
        self.cfg = site_config(name)
        self.cfg.witness.lease_ttl_ms = 3000  # the TTL Effects asks of the backend
        self.gate, self.speaker = FakeGate(), FakeSpeaker()
        self.m = ha.HaMachine(role, ha_config(name))
        self.events = []
        self.ctx = make_ctx(self.cfg, self.gate, self.feed, lambda: self.m.generation)
        gatectl = GateController(self.gate, GateInputs(ha_state=self.m.state, policy=UnreachablePolicy("stall"),
                                                       guest_here=role is ha.Role.PRIMARY, promised=True))
        self.ops = GuestOps()
        self.fx = Effects(self.ctx, gatectl, lease, self.speaker, self.ops)

    def feed(self, e):
        self.events.append(e)
        for a in self.m.handle(e):
            self.fx.act(a)

    async def settle(self):
        await asyncio.sleep(0)
        while len(self.ctx.tasks):
            await asyncio.sleep(0.005)


async def test_the_ha_machine_runs_on_etcd_as_on_the_witness(etcd, pki):
    async with client(pki, "site-a", etcd.url, prefix="/ha") as la, \
            client(pki, "site-b", etcd.url, prefix="/ha") as lb:
        a, b = Site("site-a", la), Site("site-b", lb, ha.Role.STANDBY)
        a.feed(ha.Tick(time.monotonic()))
        await a.settle()
        assert a.m.state is ha.ACTIVE_UNPROTECTED and a.m.generation == 1 and a.fx.announced
        b.feed(ha.ReplicaCommitted(5))
        b.feed(ha.Tick(time.monotonic()))
        b.feed(ha.Tick(time.monotonic() + 10))  # heartbeats stop: the standby asks for the lease
        await b.settle()
        assert any(isinstance(e, ha.LeaseDenied) and e.holder == "site-a" and e.generation == 1 for e in b.events)
        assert b.m.state is ha.TAKING_OVER and not b.m.holding

        a.feed(ha.OperatorFence(time.monotonic()))  # releases the lease at once
        await a.settle()
        b.feed(ha.Tick(time.monotonic() + 20))
        await b.settle()
        granted = [e for e in b.events if isinstance(e, ha.LeaseGranted)]
        assert [e.generation for e in granted] == [2] and b.m.holding and b.ops.calls == ["resume"]


async def test_etcd_unreachable_reaches_the_machine_as_witness_unreachable(pki):
    dead = f"https://127.0.0.1:{_free_port()}"
    async with client(pki, "site-a", dead) as lease:
        s = Site("site-a", lease)
        s.feed(ha.Tick(time.monotonic()))
        await s.settle()
        lost = [e for e in s.events if isinstance(e, ha.WitnessUnreachable)]
        assert lost and f"no etcd member (etcd) answered /v3/kv/range: {dead}" in lost[0].detail
        assert s.m.witness_reachable is False and s.m.state is ha.STARTING


# ---------------------------------------------------------------- [lease] in the site config
BASE = (CONFIGS / "lab" / "site-a.toml").read_text()
NO_WITNESS = BASE[:BASE.index("[witness]")] + BASE[BASE.index("[bgp]"):]
ETCD = NO_WITNESS + """
[lease]
backend = "etcd"
endpoints = ["https://198.18.3.2:2379", "https://198.18.1.2", "https://198.18.2.2:2379/"]
server_name = "etcd"
lease_ttl_ms = 6000
renew_every_ms = 1000
"""


def _load(tmp_path, text):
    p = tmp_path / "site.toml"
    p.write_text(text)
    return config.load_site(p)


def test_the_etcd_lease_section_loads_and_gives_the_ha_machine_its_timing(tmp_path):
    cfg = _load(tmp_path, ETCD)
    assert cfg.lease.endpoints == ("https://198.18.3.2:2379", "https://198.18.1.2:2379", "https://198.18.2.2:2379")
    assert cfg.lease.prefix == "/geomirror" and cfg.lease.tls_files(cfg.tls) == cfg.tls
    assert cfg.witness is cfg.lease
    hc = ha.HaConfig.from_site_config(cfg)
    assert (hc.witness, hc.lease_ttl_ms, hc.renew_every_ms) == (True, 6000, 1000)
    lab = config.load_site(CONFIGS / "lab" / "site-a.toml")
    assert lab.lease.backend == "witness" and lab.witness.address is not None


@pytest.mark.parametrize("text,key,problem", [
    (ETCD.replace("https://198.18.3.2:2379", "http://198.18.3.2:2379"), "lease.endpoints",
     "'http://198.18.3.2:2379' must be https://"),
    (ETCD.replace('"https://198.18.1.2"', '"https://198.18.3.2:2379"'), "lease.endpoints", "is listed twice"),
    (ETCD.replace("endpoints = [", "endpoints = []\n#"), "lease.endpoints", "is empty"),
    (ETCD.replace("endpoints = [", "#"), "lease.endpoints", "missing (required with backend = \"etcd\")"),
    (ETCD.replace("lease_ttl_ms = 6000", "lease_ttl_ms = 6500"), "lease.lease_ttl_ms",
     "6500 is not a whole number of seconds"),
    (ETCD.replace("lease_ttl_ms = 6000", "lease_ttl_ms = 2000"), "lease.renew_every_ms", "too little margin"),
    (ETCD.replace("lease_ttl_ms = 6000", "lease_ttl_ms = 3000").replace("interval_ms = 100\nmin_timeout_ms = 600",
     "interval_ms = 1000\nmin_timeout_ms = 2000"), "lease.lease_ttl_ms", "is too short"),
    (ETCD.replace('server_name = "etcd"', 'ca = "ca.pem"'), "lease.cert", "go together"),
    (ETCD.replace('server_name = "etcd"', 'prefix = "geomirror/"'), "lease.prefix", "is not a key prefix"),
    (ETCD.replace('server_name = "etcd"', 'sever_name = "etcd"'), "lease.sever_name",
     "did you mean 'server_name'?"),
    (ETCD.replace('backend = "etcd"', 'backend = "zookeeper"'), "lease.backend", "must be one of witness, etcd"),
    (BASE + '\n[lease]\nendpoints = ["https://198.18.3.2:2379"]\n', "lease.endpoints",
     'is only for backend = "etcd"'),
    (BASE.replace("[bgp]", ETCD[ETCD.index("[lease]"):] + "\n[bgp]"), "witness",
     'lease.backend is "etcd", so [witness] would not be used'),
])
def test_bad_lease_sections_name_file_key_and_problem(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert e.value.key == key and problem in str(e.value), str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'site.toml'}: {key}: ")


def test_the_factory_picks_the_backend(tmp_path, pki):
    ident = pairing.TlsIdentity(pki / "ca.pem", pki / "site-a.pem", pki / "site-a.key", "site-a")
    w = make_lease_backend(config.load_site(CONFIGS / "lab" / "site-a.toml"), ident)
    assert isinstance(w, WitnessClient) and isinstance(w, LeaseBackend) and w.server_name == "witness"
    e = make_lease_backend(_load(tmp_path, ETCD), ident)
    assert isinstance(e, EtcdLease) and e.ssl_context is ident.client and e.site == "site-a"
    assert e.server_name == "etcd" and len(e.endpoints) == 3 and e.timeout.total == pytest.approx(1 / 3)
    assert make_lease_backend(_load(tmp_path, NO_WITNESS), ident) is None
    assert issubclass(EtcdUnreachable, WitnessUnreachable) and issubclass(EtcdError, WitnessError)
    assert LeaseError is WitnessError


def _site_with_pki(tmp_path, pki, endpoints, extra=""):
    text = ETCD.replace('"/run/geomirror-lab/pki/', f'"{pki}/')
    text = text.replace('endpoints = ["https://198.18.3.2:2379", "https://198.18.1.2", "https://198.18.2.2:2379/"]',
                        f"endpoints = {endpoints}\n{extra}")
    return text


def test_config_check_files_reaches_the_cluster(tmp_path, etcd, pki):
    p = tmp_path / "site.toml"
    p.write_text(_site_with_pki(tmp_path, pki, f'["{etcd.url}"]', 'prefix = "/check"'))
    line = config.check(p, files=True)
    assert f"lease etcd at {etcd.url} (etcd 3.4." in line, line
    assert "1 of 1 members healthy; lease of guest pbx under /check: free (last generation 0))" in line, line
    assert config.check(p).endswith(f"lease etcd at {etcd.url}")  # without --files: not contacted

    dead = f"https://127.0.0.1:{_free_port()}"
    p.write_text(_site_with_pki(tmp_path, pki, f'["{dead}"]'))
    with pytest.raises(ConfigError, match=f"lease.endpoints: no healthy etcd member: {dead}: "):
        config.check(p, files=True)

    other = pairing.create_pair(tmp_path / "other", ["site-a", "site-b"], [])
    own = f'ca = "{pki}/ca.pem"\ncert = "{other.dir}/site-a.pem"\nkey = "{other.dir}/site-a.key"'
    p.write_text(_site_with_pki(tmp_path, pki, f'["{etcd.url}"]', own))
    with pytest.raises(ConfigError, match="lease.endpoints: .*etcd refused this site's certificate"):
        config.check(p, files=True)
    os.chmod(other.dir / "site-a.key", 0o644)
    with pytest.raises(ConfigError, match=r"lease.key: .* is readable by others \(mode 0644\)"):
        config.check(p, files=True)
