"""Pairing: certificates, file modes, real TLS handshakes, refusal of strangers, rotation."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import ssl
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from geomirror import pairing


def test_certificates(tmp_path):
    files = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], ["witness"])
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, 0)
    assert ca.subject.rfc4514_string().startswith("CN=geomirror pair CA ")
    assert set(files.certs) == {"site-a", "site-b", "witness"}
    for name, (cert_path, key_path) in files.certs.items():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = load_pem_private_key(key_path.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
        assert cert.public_key() == key.public_key()
        assert cert.subject.rfc4514_string() == f"CN={name}" and cert.issuer == ca.subject
        assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName) == [name]
        assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
            ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        cert.verify_directly_issued_by(ca)
        pairing.check_leaf(files.ca, cert_path, key_path, name)


def test_files_are_private_and_the_ca_is_not_replaced(tmp_path):
    files = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], ["witness"])
    assert (files.dir.stat().st_mode & 0o777) == 0o700
    written = sorted(p.name for p in files.dir.iterdir())
    assert written == sorted(["ca.pem", "ca.key", *(f"{n}.{e}" for n in files.certs for e in ("pem", "key"))])
    for p in files.dir.iterdir():
        assert (p.stat().st_mode & 0o777) == 0o600, p
    ca_before = files.ca.read_bytes()
    with pytest.raises(pairing.PairingError, match="ca.pem already exists: refusing to replace a pair CA"):
        pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"])
    assert files.ca.read_bytes() == ca_before
    assert pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], force=True).ca.read_bytes() != ca_before
    pairing.issue_cert(tmp_path / "pki", "site-a", tmp_path / "rotated")
    assert ((tmp_path / "rotated").stat().st_mode & 0o777) == 0o700
    assert ((tmp_path / "rotated" / "site-a.key").stat().st_mode & 0o777) == 0o600
    text = pairing.copy_instructions(files)
    for name in ("site-a", "site-b", "witness"):
        assert f"to {name}: {files.ca} {files.dir / name}.pem {files.dir / name}.key" in text


@pytest.mark.parametrize("sites,witnesses,problem", [
    (["site-a"], [], "a pair is two distinct sites"),
    (["site-a", "site-a"], [], "a pair is two distinct sites"),
    (["site-a", "site-b"], ["site-a"], "names must be distinct"),
    (["site-a", "Site B"], [], "'Site B' is not a valid name"),
])
def test_bad_pairs_are_refused(tmp_path, sites, witnesses, problem):
    with pytest.raises(pairing.PairingError, match=problem):
        pairing.create_pair(tmp_path / "pki", sites, witnesses)
    assert not (tmp_path / "pki").exists()


def test_contexts_trust_only_the_pair_ca_and_tls13(tmp_path):
    files = pairing.create_pair(tmp_path, ["site-a", "site-b"], [])
    for ctx in (pairing.server_context(files.ca, *files.certs["site-a"]),
                pairing.client_context(files.ca, *files.certs["site-a"])):
        (only,) = ctx.get_ca_certs()  # the pair CA and nothing else: no system CAs
        assert only["subject"][0][0][1].startswith("geomirror pair CA ")
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(pairing.PairingError, match="nope.pem does not exist"):
        pairing.client_context(files.ca, tmp_path / "nope.pem", files.certs["site-a"][1])


async def handshake(server_ctx, client_ctx, name="site-b", allowed=("site-a",)):
    """Connect over loopback; the server checks the client's name. Returns what the server saw."""
    seen = {}

    async def on(reader, writer):
        try:
            seen["peer"] = pairing.check_peer(writer.get_extra_info("ssl_object"), set(allowed))
        except pairing.PeerRejected as e:
            seen["rejected"] = str(e)
        writer.close()

    server = await asyncio.start_server(on, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname=name)
        seen["server"] = pairing.peer_name(w.get_extra_info("ssl_object"))
        seen["version"] = w.get_extra_info("ssl_object").version()
        await r.read()
        w.close()
    finally:
        server.close()
        await server.wait_closed()
    return seen


async def test_good_pair_handshakes_both_ways(tmp_path):
    files = pairing.create_pair(tmp_path, ["site-a", "site-b"], [])
    ctx = {n: (pairing.server_context(files.ca, *files.certs[n]), pairing.client_context(files.ca, *files.certs[n]))
           for n in ("site-a", "site-b")}
    seen = await handshake(ctx["site-b"][0], ctx["site-a"][1], name="site-b", allowed={"site-a"})
    assert seen == {"peer": "site-a", "server": "site-b", "version": "TLSv1.3"}
    seen = await handshake(ctx["site-a"][0], ctx["site-b"][1], name="site-a", allowed={"site-b"})
    assert seen == {"peer": "site-b", "server": "site-a", "version": "TLSv1.3"}


async def test_rotation_needs_no_restart_of_the_peer(tmp_path):
    files = pairing.create_pair(tmp_path, ["site-a", "site-b"], [])
    peer_server = pairing.server_context(files.ca, *files.certs["site-b"])
    peer_client = pairing.client_context(files.ca, *files.certs["site-b"])
    old = x509.load_pem_x509_certificate(files.certs["site-a"][0].read_bytes())
    cert = pairing.issue_cert(tmp_path, "site-a", tmp_path / "rotated")
    new = x509.load_pem_x509_certificate(cert.read_bytes())
    assert new.serial_number != old.serial_number and new.public_key() != old.public_key()
    key = tmp_path / "rotated" / "site-a.key"
    # the peer's existing contexts accept the new certificate, as client and as server
    assert (await handshake(peer_server, pairing.client_context(files.ca, cert, key)))["peer"] == "site-a"
    seen = await handshake(pairing.server_context(files.ca, cert, key), peer_client, name="site-a",
                           allowed={"site-b"})
    assert seen["peer"] == "site-b" and seen["server"] == "site-a"


async def test_another_ca_is_refused(tmp_path):
    files = pairing.create_pair(tmp_path / "a", ["site-a", "site-b"], [])
    other = pairing.create_pair(tmp_path / "b", ["site-a", "site-b"], [])
    server = pairing.server_context(files.ca, *files.certs["site-b"])
    # a client from another CA: the server refuses its certificate
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(server, pairing.client_context(other.ca, *other.certs["site-a"]))
    # a server from another CA: the client refuses it
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        await handshake(pairing.server_context(other.ca, *other.certs["site-b"]),
                        pairing.client_context(files.ca, *files.certs["site-a"]))


async def test_right_ca_wrong_name_is_refused(tmp_path):
    files = pairing.create_pair(tmp_path, ["site-a", "site-b"], ["witness"])
    server = pairing.server_context(files.ca, *files.certs["site-b"])
    # server side: the witness's certificate chains to the CA but is not the expected peer
    seen = await handshake(server, pairing.client_context(files.ca, *files.certs["witness"]))
    assert "peer" not in seen
    assert seen["rejected"].startswith("peer presented a certificate for 'witness', expected site-a "
                                       "(subject commonName=witness, serial ")
    # client side: the server is site-b but we expected site-c
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        await handshake(server, pairing.client_context(files.ca, *files.certs["site-a"]), name="site-c")


def test_check_peer_without_a_certificate():
    with pytest.raises(pairing.PeerRejected, match="peer presented no certificate, expected site-a or site-b"):
        pairing.check_peer(None, {"site-b", "site-a"})


def test_pair_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "geomirror", "pair", "init", "--out", str(tmp_path / "p"),
                          "--site", "east", "--site", "west"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "to east" in out.stdout and (tmp_path / "p" / "west.key").exists()
    again = subprocess.run([sys.executable, "-m", "geomirror", "pair", "init", "--out", str(tmp_path / "p"),
                            "--site", "east", "--site", "west"], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


def _install(src_cert, src_key, dst_cert, dst_key, *, key_first=False):
    """Copy a rotated pair over the files a service was started with (as an operator would)."""
    steps = [(src_key, dst_key), (src_cert, dst_cert)] if key_first else [(src_cert, dst_cert), (src_key, dst_key)]
    for src, dst in steps:
        dst.write_bytes(src.read_bytes())


def _serial(ssl_object) -> str:
    return ssl_object.getpeercert()["serialNumber"]


async def test_reload_in_place_keeps_established_connections_and_new_ones_see_the_new_cert(tmp_path):
    files = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], [])
    ident = pairing.TlsIdentity(files.ca, *files.certs["site-b"], "site-b", scratch_dir=tmp_path)
    client = pairing.client_context(files.ca, *files.certs["site-a"])
    old_serial = ident.serial

    async def echo(reader, writer):
        while data := await reader.read(100):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=ident.server)
    port = server.sockets[0].getsockname()[1]
    try:
        r1, w1 = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="site-b")
        assert _serial(w1.get_extra_info("ssl_object")) == old_serial
        assert not ident.changed()
        new_cert = pairing.issue_cert(tmp_path / "pki", "site-b", tmp_path / "rotated")
        _install(new_cert, tmp_path / "rotated" / "site-b.key", *files.certs["site-b"])
        assert ident.changed()
        info = ident.reload()
        assert info["previous_serial"] == old_serial and info["serial"] != old_serial and info["reloads"] == 1
        # the established connection carries on, on the old certificate
        w1.write(b"still here")
        assert await r1.readexactly(10) == b"still here"
        # a new connection gets the new certificate, from the same context object
        r2, w2 = await asyncio.open_connection("127.0.0.1", port, ssl=client, server_hostname="site-b")
        assert _serial(w2.get_extra_info("ssl_object")) == info["serial"]
        # and the client side of an identity reloads the same way
        cl = pairing.TlsIdentity(files.ca, *files.certs["site-a"], "site-a", scratch_dir=tmp_path)
        before = cl.serial
        c2 = pairing.issue_cert(tmp_path / "pki", "site-a", tmp_path / "rot-a")
        _install(c2, tmp_path / "rot-a" / "site-a.key", *files.certs["site-a"])
        assert cl.reload()["serial"] != before
        seen = await handshake(pairing.server_context(files.ca, *files.certs["site-b"]), cl.client,
                               name="site-b", allowed={"site-a"})
        assert seen["peer"] == "site-a"
        for w in (w1, w2):
            w.close()
    finally:
        server.close()
        await server.wait_closed()
    assert not list(tmp_path.glob(".tls-reload-*")), "the reload snapshot is removed"


@pytest.mark.parametrize("bad, problem", [
    ("other-name", "is a certificate for site-a, not 'site-b'"),
    ("half-copied", "is not the key of"),
    ("other-ca", "was not issued by the pair CA"),
    ("open-key", "is readable by others (mode 0644)"),
])
def test_a_bad_rotation_is_refused_and_the_old_identity_stays(tmp_path, bad, problem):
    files = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], [])
    cert, key = files.certs["site-b"]
    ident = pairing.TlsIdentity(files.ca, cert, key, "site-b", scratch_dir=tmp_path)
    old = ident.serial
    if bad == "other-name":
        _install(*files.certs["site-a"], cert, key)
    elif bad == "half-copied":  # the new certificate is there, its key not yet
        new = pairing.issue_cert(tmp_path / "pki", "site-b", tmp_path / "rotated")
        cert.write_bytes(new.read_bytes())
    elif bad == "other-ca":
        other = pairing.create_pair(tmp_path / "other", ["site-a", "site-b"], [])
        _install(*other.certs["site-b"], cert, key)
    else:
        key.chmod(0o644)
    with pytest.raises(pairing.PairingError, match=re.escape(problem)):
        ident.reload()
    assert ident.serial == old and ident.reloads == 0
    assert not ident.changed(), "a refused pair is not retried until the files change again"
    if bad == "half-copied":  # the key arrives: the next change loads the pair
        (tmp_path / "rotated" / "site-b.key").chmod(0o600)
        key.write_bytes((tmp_path / "rotated" / "site-b.key").read_bytes())
        assert ident.changed()
        assert ident.reload()["serial"] != old


def test_a_certificate_can_name_ip_addresses(tmp_path):
    pairing.create_pair(tmp_path, ["site-a", "site-b"], [])
    pem = pairing.issue_cert(tmp_path, "etcd-m1", ips=["198.18.3.2", "2001:db8:18::2"])
    san = x509.load_pem_x509_certificate(pem.read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["etcd-m1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.18.3.2"),
                                                       ipaddress.ip_address("2001:db8:18::2")]
