"""The witness over real mutual TLS on 127.0.0.1, and its pure lease table."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from geomirror.witness import (LeaseStateError, LeaseTable, WitnessClient, WitnessError, WitnessRefused,
                               WitnessServer, WitnessUnreachable, load_state)

GUEST = "guest"
TTL = 300


# ---------------------------------------------------------------- a tiny PKI
def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    def __init__(self, tmp, label):
        self.dir = tmp / label
        self.dir.mkdir()
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        self.cert = (x509.CertificateBuilder().subject_name(_name(f"test CA {label}"))
                     .issuer_name(_name(f"test CA {label}")).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.dir / "ca.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name):
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(self.cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
                .sign(self.key, hashes.SHA256()))
        c, k = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return c, k

    def server_ctx(self, name="witness"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*self.issue(name))
        ctx.load_verify_locations(cafile=str(self.pem))
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_ctx(self, name, trust=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(*self.issue(name))
        ctx.load_verify_locations(cafile=str((trust or self).pem))
        return ctx


@pytest.fixture
def pki(tmp_path):
    return CA(tmp_path, "pair")


@pytest.fixture
async def witness(tmp_path, pki):
    servers = []

    async def start(allowed=frozenset({"site-a", "site-b"}), state_dir=tmp_path / "state"):
        srv = WitnessServer(state_dir, "127.0.0.1", 0, pki.server_ctx(), allowed)
        await srv.start()
        servers.append(srv)
        return srv

    yield start
    for s in servers:
        await s.stop()


@pytest.fixture
async def clients(pki):
    made = []

    def client(srv, site, ca=None, trust=None):
        c = WitnessClient("127.0.0.1", srv.port, (ca or pki).client_ctx(site, trust or pki), "witness",
                          timeout_s=5)
        made.append(c)
        return c

    yield client
    for c in made:
        await c.close()


async def wait_until(predicate, timeout_s=10.0):
    """Poll an async predicate; the deadline only guards against hanging, it is never the thing tested."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- over TLS
async def test_grant_renew_and_second_site_denied_while_valid(witness, clients):
    srv = await witness()
    a, b = clients(srv, "site-a"), clients(srv, "site-b")
    g = await a.acquire(GUEST, TTL)
    assert g.ok and g.generation == 1 and g.holder == "site-a" and g.expires_at is not None
    again = await a.acquire(GUEST, TTL)
    assert again.ok and again.generation == 1, "re-acquire by the holder keeps the generation"
    r = await a.renew(GUEST, 1, TTL)
    assert r.ok and r.generation == 1
    d = await b.acquire(GUEST, TTL)
    assert not d.ok and d.holder == "site-a" and d.generation == 1
    view = await b.get(GUEST)
    assert view["holder"] == "site-a" and view["valid"]
    # b cannot renew or release a lease it does not hold
    assert not (await b.renew(GUEST, 1, TTL)).ok
    assert not (await b.release(GUEST, 1)).ok


async def test_other_site_granted_after_expiry_with_higher_generation(witness, clients):
    srv = await witness()
    a, b = clients(srv, "site-a"), clients(srv, "site-b")
    assert (await a.acquire(GUEST, TTL)).generation == 1

    async def b_granted():
        r = await b.acquire(GUEST, TTL)
        return r if r.ok else None

    g = await wait_until(b_granted)
    assert g.generation == 2 and g.holder == "site-b"
    late = await a.renew(GUEST, 1, TTL)
    assert not late.ok and late.holder == "site-b" and late.generation == 2


async def test_release_lets_another_site_in_at_once_with_a_new_generation(witness, clients):
    srv = await witness()
    a, b = clients(srv, "site-a"), clients(srv, "site-b")
    await a.acquire(GUEST, 60_000)
    assert (await a.release(GUEST, 1)).ok
    g = await b.acquire(GUEST, TTL)
    assert g.ok and g.generation == 2


async def test_restart_keeps_generation_and_holder(witness, clients, tmp_path):
    srv = await witness()
    a, b = clients(srv, "site-a"), clients(srv, "site-b")
    await a.acquire(GUEST, TTL)

    async def b_granted():
        return (await b.acquire(GUEST, TTL)).ok

    await wait_until(b_granted)  # generation 2, held by site-b
    await srv.stop()
    state = tmp_path / "state" / "leases.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["leases"][GUEST] == {"generation": 2, "holder": "site-b",
                                                               "ttl_ms": TTL, "released": False}
    srv2 = await witness()
    a2, b2 = clients(srv2, "site-a"), clients(srv2, "site-b")
    view = await a2.get(GUEST)
    assert view["generation"] == 2 and view["holder"] == "site-b" and view["valid"], \
        "after a restart the lease is honoured for a full TTL"
    assert not (await a2.acquire(GUEST, TTL)).ok
    assert (await b2.renew(GUEST, 2, TTL)).ok

    async def a_granted():
        r = await a2.acquire(GUEST, TTL)
        return r if r.ok else None

    assert (await wait_until(a_granted)).generation == 3


async def test_client_from_another_ca_is_refused_at_the_handshake(witness, clients, tmp_path, pki):
    srv = await witness()
    rogue_ca = CA(tmp_path, "rogue")
    rogue = clients(srv, "site-a", ca=rogue_ca, trust=pki)  # trusts the witness, but its cert is foreign
    with pytest.raises(WitnessUnreachable) as err:
        await rogue.acquire(GUEST, TTL)
    assert f"127.0.0.1:{srv.port}" in str(err.value)
    # the raw TLS view: the server aborts the handshake (TLS 1.3 reports it on the client's first read)
    answer, why = b"", ""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port, server_hostname="witness",
                                                       ssl=rogue_ca.client_ctx("site-a", pki))
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: witness\r\n\r\n")
        answer = await reader.read(100)
        writer.close()
    except (ssl.SSLError, ConnectionError) as e:
        why = str(e)
    assert answer == b"", "the witness answered a client whose certificate it cannot verify"
    assert why == "" or "unknown ca" in why.lower() or "reset" in why.lower(), why
    assert srv.table.view(GUEST, time.monotonic())["generation"] == 0, "nothing was granted"


async def test_garbage_body_is_400_and_unknown_site_403(witness, clients, pki):
    srv = await witness(allowed={"site-a", "site-b"})
    a = clients(srv, "site-a")
    for bad, needle in ((b"\x00\xffnot json", "not JSON"), (b"[1]", "JSON object"), (b"{}", "missing field"),
                        (b'{"ttl_ms": "300"}', "integer"), (b'{"ttl_ms": 1}', "outside")):
        with pytest.raises(WitnessRefused) as err:
            await _raw(a, f"/v1/lease/{GUEST}/acquire", bad)
        assert err.value.status == 400 and needle in str(err.value), bad
    with pytest.raises(WitnessRefused) as err:
        await a.acquire("../etc", TTL)
    assert err.value.status in (400, 404)
    stranger = clients(srv, "site-z")
    with pytest.raises(WitnessRefused) as err:
        await stranger.acquire(GUEST, TTL)
    assert err.value.status == 403 and "site-z" in str(err.value)
    assert (await a.health())["site"] == "site-a"


async def test_only_the_configured_sites_are_served(witness, clients, tmp_path, pki):
    for none in (None, set(), ()):
        with pytest.raises(WitnessError, match="needs the names of the sites it serves"):
            WitnessServer(tmp_path / "s", "127.0.0.1", 0, pki.server_ctx(), none)
    srv = await witness()
    # a certificate of the pair CA whose name is not listed, the witness's own included: 403 and why
    for name in ("witness", "site-c"):
        c = clients(srv, name)
        for call in (c.acquire(GUEST, TTL), c.get(GUEST), c.health()):
            with pytest.raises(WitnessRefused) as err:
                await call
            assert err.value.status == 403
            assert (f"certificate '{name}' is not one of the sites this witness serves (site-a, site-b)"
                    in str(err.value)), str(err.value)
    assert srv.table.view(GUEST, time.monotonic())["generation"] == 0, "nothing was granted"
    assert (await clients(srv, "site-a").acquire(GUEST, TTL)).ok


async def test_a_grant_carries_its_deadline_on_both_clocks(witness, clients):
    srv = await witness()
    before = time.clock_gettime(time.CLOCK_BOOTTIME)
    g = await clients(srv, "site-a").acquire(GUEST, TTL)
    after = time.clock_gettime(time.CLOCK_BOOTTIME)
    assert g.ok and g.expires_at is not None
    # counted from when the request was sent: never later than the witness's own expiry
    assert before + g.expires_in_ms / 1000 <= g.expires_at_boottime <= after + g.expires_in_ms / 1000
    denied = await clients(srv, "site-b").acquire(GUEST, TTL)
    assert not denied.ok and denied.expires_at_boottime is None


async def _raw(client: WitnessClient, path: str, body: bytes):
    """Post raw bytes over the same mutual TLS as the client."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(client.base + path, data=body, ssl=client.ssl_context,
                                server_hostname=client.server_name) as resp:
            data = await resp.json(content_type=None)
            if resp.status != 200:
                raise WitnessRefused(resp.status, data.get("error"))
            return data


async def test_unreachable_witness_names_the_address(pki):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    async with WitnessClient("127.0.0.1", port, pki.client_ctx("site-a"), timeout_s=2) as c:
        with pytest.raises(WitnessUnreachable) as err:
            await c.acquire(GUEST, TTL)
    assert f"127.0.0.1:{port}" in str(err.value)


def test_corrupt_state_file_refuses_to_start(tmp_path):
    p = tmp_path / "leases.json"
    p.write_text("{not json")
    with pytest.raises(LeaseStateError, match="leases.json"):
        load_state(p, 0.0)


# ---------------------------------------------------------------- the pure table
def test_table_generation_is_strictly_monotonic_across_grants():
    t = LeaseTable()
    assert t.acquire("g", "a", 1000, 0.0)["generation"] == 1
    assert not t.acquire("g", "b", 1000, 0.5)["granted"]
    assert t.acquire("g", "a", 1000, 1.5)["generation"] == 2, "a new grant after expiry, even to the same site"
    assert t.acquire("g", "b", 1000, 2.6)["generation"] == 3
    assert not t.renew("g", "b", 3, 1000, 3.7)["renewed"], "no renewal after expiry"
    restored = LeaseTable.restore(t.dump(), now=100.0)
    assert restored.view("g", 100.5) == {"guest": "g", "generation": 3, "holder": "b", "last_holder": "b",
                                         "valid": True, "expires_in_ms": 500}
