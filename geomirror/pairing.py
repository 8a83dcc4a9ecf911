"""Pairing: a pair CA, one certificate per site and witness, and the TLS contexts.

A site trusts the pair CA only (never the system CAs) and accepts a peer only if its
certificate chains to that CA *and* names the expected peer. Because the peer trusts
the CA and not the leaf, a site's certificate is rotated by issuing a new one under
the same CA (`issue_cert`); the peer needs no change. See docs/config.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
import re
import secrets
import ssl
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
import structlog

from geomirror.errors import GeomirrorError
from gmbase.files import atomic_write

# A site or witness name: a DNS label (it is the certificates' common name and SAN).
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class PairingError(GeomirrorError):
    """Pair files cannot be created, read or used."""


class PeerRejected(GeomirrorError):
    """A TLS peer presented a certificate (from the pair CA) for a name we do not expect."""


@dataclass(frozen=True)
class PairFiles:
    dir: Path
    ca: Path
    certs: dict[str, tuple[Path, Path]]  # name -> (cert path, key path)


# ---------------------------------------------------------------- files

def _private_dir(d: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PairingError(f"{name!r} is not a valid name (lowercase letters, digits and '-', e.g. site-a)")


# ---------------------------------------------------------------- certificates

def _issue(name: str, ca_cert: x509.Certificate, ca_key, valid_days: int, ips: Sequence[str] = ()):
    key = ec.generate_private_key(ec.SECP256R1())
    alt = [x509.DNSName(name), *(x509.IPAddress(ipaddress.ip_address(a)) for a in ips)]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=valid_days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert, key


def _new_ca(valid_days: int):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"geomirror pair CA {secrets.token_hex(4)}")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _write_leaf(out_dir: Path, name: str, ca, ca_key, valid_days: int,
                ips: Sequence[str] = ()) -> tuple[Path, Path]:
    cert, key = _issue(name, ca, ca_key, valid_days, ips)
    cert_path, key_path = out_dir / f"{name}.pem", out_dir / f"{name}.key"
    atomic_write(key_path, _key_pem(key))
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def create_pair(out_dir, sites: list[str], witnesses: list[str] = ("witness",), *,
                valid_days: int = 825, force: bool = False) -> PairFiles:
    """A pair CA (ca.pem, ca.key) and `<name>.pem`/`<name>.key` for each site and witness in `out_dir`.

    The CA is valid twice as long as the leaves so that leaves can be re-issued under it.
    Refuses to replace an existing CA unless `force` (every certificate must then be redistributed).
    """
    out_dir = Path(out_dir)
    sites, witnesses = list(sites), list(witnesses)
    for n in (*sites, *witnesses):
        _check_name(n)
    if len(sites) != 2 or sites[0] == sites[1]:
        raise PairingError(f"a pair is two distinct sites, got {sites}")
    if len(set(sites + witnesses)) != len(sites) + len(witnesses):
        raise PairingError(f"names must be distinct: sites {sites}, witnesses {witnesses}")
    if valid_days < 1:
        raise PairingError(f"valid_days must be at least 1, got {valid_days}")
    existing = [p for p in (out_dir / "ca.pem", out_dir / "ca.key") if p.exists()]
    if existing and not force:
        raise PairingError(f"{existing[0]} already exists: refusing to replace a pair CA "
                           "(use --force, then redistribute every certificate)")
    _private_dir(out_dir)
    ca, ca_key = _new_ca(valid_days * 2)
    atomic_write(out_dir / "ca.key", _key_pem(ca_key))
    atomic_write(out_dir / "ca.pem", ca.public_bytes(serialization.Encoding.PEM))
    certs = {name: _write_leaf(out_dir, name, ca, ca_key, valid_days) for name in (*sites, *witnesses)}
    return PairFiles(out_dir, out_dir / "ca.pem", certs)


def issue_cert(ca_dir, name: str, out_dir=None, valid_days: int = 825, ips: Sequence[str] = ()) -> Path:
    """A new certificate and key for `name` under the existing pair CA in `ca_dir` (rotation).
    `ips` are IP addresses the certificate also names (a server reached by address, e.g. an
    etcd member whose peers check the address they connect to).

    Writes `<out_dir>/<name>.pem` and `<name>.key` (out_dir defaults to ca_dir); returns the cert path.
    """
    _check_name(name)
    ca_dir = Path(ca_dir)
    try:
        ca = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    except FileNotFoundError as e:
        raise PairingError(f"no pair CA in {ca_dir}: {e.filename} is missing") from None
    except ValueError as e:
        raise PairingError(f"cannot read the pair CA in {ca_dir}: {e}") from None
    if ca.public_key() != ca_key.public_key():
        raise PairingError(f"{ca_dir / 'ca.key'} is not the key of {ca_dir / 'ca.pem'}")
    left = (ca.not_valid_after_utc - _now()).days
    if left < valid_days:
        valid_days = max(1, left)  # a leaf cannot outlive its CA
    out = Path(out_dir) if out_dir else ca_dir
    _private_dir(out)
    return _write_leaf(out, name, ca, ca_key, valid_days, ips)[0]


def serial_hex(cert: x509.Certificate) -> str:
    """A certificate's serial as OpenSSL prints it (upper-case hex, whole bytes): the form
    `getpeercert()` gives, so ours and the peer's compare directly."""
    h = f"{cert.serial_number:X}"
    return "0" + h if len(h) % 2 else h


def check_leaf(ca, cert, key, name: str) -> None:
    """`cert` is for `name`, issued by the CA in `ca`, currently valid, and `key` is its key."""
    try:
        data = Path(ca).read_bytes(), Path(cert).read_bytes(), Path(key).read_bytes()
    except OSError as e:
        raise PairingError(f"cannot read TLS files ({ca}, {cert}, {key}): {e}") from None
    check_leaf_pem(*data, name, labels=(ca, cert, key))


def check_leaf_pem(ca_pem: bytes, cert_pem: bytes, key_pem: bytes, name: str, labels=("ca", "cert", "key")):
    """`check_leaf` on file contents (read once, so what is checked is what gets loaded).
    Returns the leaf certificate."""
    ca, cert, key = labels
    try:
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        leaf = x509.load_pem_x509_certificate(cert_pem)
        leaf_key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        raise PairingError(f"cannot read TLS files ({ca}, {cert}, {key}): {e}") from None
    names = _cert_names(leaf)
    if name not in names:
        raise PairingError(f"{cert} is a certificate for {', '.join(names) or 'no name'}, not {name!r}")
    try:
        leaf.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PairingError(f"{cert} was not issued by the pair CA in {ca}") from None
    now = _now()
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        raise PairingError(f"{cert} is valid only from {leaf.not_valid_before_utc:%Y-%m-%d} to "
                           f"{leaf.not_valid_after_utc:%Y-%m-%d} (issue a new one: `geomirror pair issue`)")
    if leaf.public_key() != leaf_key.public_key():
        raise PairingError(f"{key} is not the key of {cert}")
    return leaf


class TlsIdentity:
    """This host's TLS identity: one server and one client context, reloaded *in place* when
    the certificate or key file changes (or on request).

    OpenSSL takes the certificate of a context at each new handshake, so after a reload new
    connections present the new certificate while established ones carry on untouched:
    rotating a certificate stops nothing. A reload checks the new files first (name, CA,
    validity, key match, key mode 0600) and keeps the old identity if they fail, so a
    half-copied pair of files is refused, not half loaded.
    """

    def __init__(self, ca, cert, key, name: str, scratch_dir=None):
        self.ca, self.cert, self.key, self.name = Path(ca), Path(cert), Path(key), name
        self.scratch_dir = scratch_dir  # a private directory for the moment a reload needs a file
        self.server = server_context(ca, cert, key)
        self.client = client_context(ca, cert, key)
        self.reloads = 0
        self.loaded_at = time.time()
        self._leaf = check_leaf_pem(self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes(), name,
                                    labels=(self.ca, self.cert, self.key))
        self._stamp = self.stamp()

    def stamp(self) -> tuple:
        """What identifies the current file contents cheaply (checked every few seconds)."""
        out = []
        for p in (self.cert, self.key):
            try:
                st = p.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def changed(self) -> bool:
        return self.stamp() != self._stamp

    def reload(self) -> dict:
        """Load the files as they are now; PairingError (identity unchanged) if they don't pass."""
        stamp = self.stamp()
        self._stamp = stamp  # a refused pair is not retried until the files change again
        try:
            ca_pem, cert_pem, key_pem = self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
            mode = stat.S_IMODE(self.key.stat().st_mode)
        except OSError as e:
            raise PairingError(f"cannot read TLS files ({self.cert}, {self.key}): {e}") from None
        if mode & 0o077:
            raise PairingError(f"{self.key} is readable by others (mode {mode:04o}); chmod 600 it")
        leaf = check_leaf_pem(ca_pem, cert_pem, key_pem, self.name, labels=(self.ca, self.cert, self.key))
        # Load from one private snapshot of what was checked (the files may change meanwhile).
        fd, tmp = tempfile.mkstemp(prefix=".tls-reload-", suffix=".pem", dir=self.scratch_dir)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cert_pem.rstrip(b"\n") + b"\n" + key_pem)
            for ctx in (self.server, self.client):
                try:
                    ctx.load_cert_chain(tmp)
                except ssl.SSLError as e:
                    raise PairingError(f"cannot load {self.cert} / {self.key}: {e.reason or e}") from None
        finally:
            os.unlink(tmp)
        old = self.serial
        self._leaf = leaf
        self.reloads += 1
        self.loaded_at = time.time()
        return {**self.info(), "previous_serial": old}

    @property
    def serial(self) -> str:
        return serial_hex(self._leaf)

    def info(self) -> dict:
        return {"name": self.name, "serial": self.serial, "cert": str(self.cert),
                "not_after": self._leaf.not_valid_after_utc.isoformat(), "reloads": self.reloads,
                "loaded_at": self.loaded_at}


async def watch_identity(identity: "TlsIdentity", reload, every_s: float = 5.0) -> None:
    """Call `reload()` whenever `identity`'s files change (a rotation needs no signal). Runs
    until cancelled; `reload` logs and swallows a refusal (it is retried on the next change)."""
    while True:
        await asyncio.sleep(every_s)
        if identity.changed():
            reload()


def reload_logged(identity: "TlsIdentity", reason: str, log=None, on_reload=None) -> dict | None:
    """Reload `identity`, logging the outcome; None (old identity kept) if the files are refused.
    `on_reload(info)` replaces the success log line (the daemon puts it on its timeline)."""
    if log is None:
        log = structlog.get_logger(__name__)
    try:
        info = identity.reload()
    except PairingError as e:
        log.error("tls.reload_refused", name=identity.name, reason=reason, error=str(e), serial=identity.serial,
                  hint="still presenting the previous certificate")
        return None
    if on_reload is not None:
        on_reload(info)
    else:
        log.info("tls.reloaded", name=identity.name, reason=reason, serial=info["serial"],
                 previous_serial=info["previous_serial"], not_after=info["not_after"])
    return info


def _cert_names(cert: x509.Certificate) -> list[str]:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    except x509.ExtensionNotFound:
        return [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]


def copy_instructions(files: PairFiles) -> str:
    """Which files go to which host."""
    lines = [f"pair created in {files.dir}; keep ca.key offline (it issues certificates) and copy:"]
    for name, (cert, key) in files.certs.items():
        lines.append(f"  to {name}: {files.ca} {cert} {key}")
    lines.append("install them with mode 0600 in a 0700 directory and point [tls] ca/cert/key at them")
    return "\n".join(lines)


# ---------------------------------------------------------------- TLS

def _context(ca, cert, key, protocol) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)  # no system CAs: only the pair CA is loaded below
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    for p in (ca, cert, key):
        if not Path(p).is_file():
            raise PairingError(f"TLS file {p} does not exist (run `geomirror pair init`)")
    try:
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as e:
        raise PairingError(f"cannot load TLS files {cert} / {key} / {ca}: {e.reason or e}") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_context(ca, cert, key) -> ssl.SSLContext:
    """TLS 1.3; requires a client certificate from the pair CA (check its name with `check_peer`)."""
    return _context(ca, cert, key, ssl.PROTOCOL_TLS_SERVER)


def client_context(ca, cert, key) -> ssl.SSLContext:
    """TLS 1.3; the server's certificate must come from the pair CA and match `server_hostname`
    (pass the peer's name), checked against its SAN."""
    ctx = _context(ca, cert, key, ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = True
    return ctx


def peer_name(ssl_object) -> str | None:
    """The name in the peer's (verified) certificate: its first SAN DNS name, else its CN."""
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
    """The peer's name if it is in `allowed`; else PeerRejected naming what was presented and expected."""
    expected = " or ".join(sorted(allowed)) or "(nobody)"
    name = peer_name(ssl_object)
    if name is None:
        raise PeerRejected(f"peer presented no certificate, expected {expected}")
    if name not in allowed:
        cert = ssl_object.getpeercert()
        subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
        raise PeerRejected(f"peer presented a certificate for {name!r}, expected {expected} "
                           f"(subject {subject}, serial {cert.get('serialNumber', '?')})")
    return name
