"""Pairing: a pair CA, one certificate per site and witness, and the TLS contexts.

A site trusts the pair CA only (never the system CAs) and accepts a peer only if its
certificate chains to that CA *and* names the expected peer. Rotating a site's
certificate needs no restart of the peer: issue a new one under the same CA
(`geomirror pair issue`), install it, restart that site's daemon.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geomirror.errors import GeomirrorError


class PairingError(GeomirrorError):
    pass


class PeerRejected(GeomirrorError):
    """A TLS peer presented a certificate for the wrong name."""


@dataclass(frozen=True)
class PairFiles:
    dir: Path
    ca: Path
    certs: dict  # name -> (cert path, key path)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now():
    return dt.datetime.now(dt.timezone.utc)


def _issue(name: str, ca_cert, ca_key, valid_days: int):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def create_pair(out_dir: Path, sites: list[str], witnesses: list[str] = ("witness",), *,
                valid_days: int = 825, force: bool = False) -> PairFiles:
    out_dir = Path(out_dir)
    if len(set(sites)) != 2:
        raise PairingError(f"a pair is two distinct sites, got {sites}")
    if (out_dir / "ca.pem").exists() and not force:
        raise PairingError(f"{out_dir / 'ca.pem'} already exists: refusing to replace a pair CA "
                           "(use --force, then redistribute every certificate)")
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"geomirror pair CA {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(_now() - dt.timedelta(minutes=5))
          .not_valid_after(_now() + dt.timedelta(days=valid_days * 2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_private(out_dir / "ca.key", _key_pem(ca_key))
    _write_private(out_dir / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    certs = {}
    for name in [*sites, *witnesses]:
        certs[name] = _write_leaf(out_dir, name, ca, ca_key, valid_days)
    return PairFiles(out_dir, out_dir / "ca.pem", certs)


def _write_leaf(out_dir: Path, name: str, ca, ca_key, valid_days: int):
    cert, key = _issue(name, ca, ca_key, valid_days)
    _write_private(out_dir / f"{name}.key", _key_pem(key))
    _write_private(out_dir / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return out_dir / f"{name}.pem", out_dir / f"{name}.key"


def issue_cert(ca_dir: Path, name: str, out_dir: Path | None = None, valid_days: int = 825) -> Path:
    """A new certificate for `name` under an existing pair CA (rotation)."""
    ca_dir = Path(ca_dir)
    try:
        ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except FileNotFoundError as e:
        raise PairingError(f"no pair CA in {ca_dir}: {e.filename} is missing") from None
    out = Path(out_dir or ca_dir)
    out.mkdir(parents=True, exist_ok=True)
    return _write_leaf(out, name, ca, ca_key, valid_days)[0]


def copy_instructions(files: PairFiles) -> str:
    lines = [f"pair created in {files.dir} (keep ca.key offline; it issues new certificates)"]
    for name, (cert, key) in files.certs.items():
        lines.append(f"  to {name}: {files.ca.name} {cert.name} {key.name}  (install with mode 0600)")
    return "\n".join(lines)


def _base(ca: Path, cert: Path, key: Path, purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == "server" else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cafile=str(ca))
    except FileNotFoundError as e:
        raise PairingError(f"TLS file {e.filename} does not exist (run `geomirror pair init`)") from None
    except ssl.SSLError as e:
        raise PairingError(f"cannot load TLS files {cert} / {key} / {ca}: {e.reason or e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(ca, cert, key) -> ssl.SSLContext:
    """Requires a client certificate from the pair CA (the name is checked with check_peer)."""
    return _base(Path(ca), Path(cert), Path(key), "server")


def client_context(ca, cert, key) -> ssl.SSLContext:
    """Checks the server's certificate against the pair CA and server_hostname (the peer's name)."""
    ctx = _base(Path(ca), Path(cert), Path(key), "client")
    ctx.check_hostname = True
    return ctx


def peer_name(ssl_object) -> str | None:
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return None
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            return value
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return None


def check_peer(ssl_object, allowed: set[str]) -> str:
    name = peer_name(ssl_object)
    if name not in allowed:
        raise PeerRejected(f"peer presented a certificate for {name!r}, expected {' or '.join(sorted(allowed))}")
    return name
