"""Pairing: file modes, real TLS handshakes, refusal of strangers, rotation without a restart."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys

import pytest

from geomirror import pairing


def test_files_are_private_and_refuse_overwrite(tmp_path):
    files = pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"], ["witness"])
    assert (files.dir.stat().st_mode & 0o777) == 0o700
    for p in files.dir.iterdir():
        assert (p.stat().st_mode & 0o777) == 0o600, p
    with pytest.raises(pairing.PairingError, match="already exists"):
        pairing.create_pair(tmp_path / "pki", ["site-a", "site-b"])
    text = pairing.copy_instructions(files)
    assert "to site-a" in text and "to witness" in text


async def handshake(server_ctx, client_ctx, name="site-b", allowed=("site-a",)):
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
        await r.read()
        w.close()
    finally:
        server.close()
    return seen


async def test_good_pair_and_rotation_without_restarting_the_peer(tmp_path):
    files = pairing.create_pair(tmp_path, ["site-a", "site-b"], [])
    server = pairing.server_context(files.ca, *files.certs["site-b"])
    assert (await handshake(server, pairing.client_context(files.ca, *files.certs["site-a"])))["peer"] == "site-a"
    # rotate site-a's certificate: the peer's context (trusting the CA) is untouched
    rotated = tmp_path / "rotated"
    cert = pairing.issue_cert(tmp_path, "site-a", rotated)
    new_client = pairing.client_context(files.ca, cert, rotated / "site-a.key")
    assert (await handshake(server, new_client))["peer"] == "site-a"


async def test_other_ca_and_wrong_name_are_refused(tmp_path):
    files = pairing.create_pair(tmp_path / "a", ["site-a", "site-b"], ["witness"])
    other = pairing.create_pair(tmp_path / "b", ["site-a", "site-b"], [])
    server = pairing.server_context(files.ca, *files.certs["site-b"])
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(server, pairing.client_context(other.ca, *other.certs["site-a"]))
    seen = await handshake(server, pairing.client_context(files.ca, *files.certs["witness"]))
    assert "presented a certificate for 'witness', expected site-a" in seen["rejected"]
    with pytest.raises(ssl.SSLCertVerificationError):
        await handshake(server, pairing.client_context(files.ca, *files.certs["site-a"]), name="site-c")


def test_pair_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "geomirror", "pair", "init", "--out", str(tmp_path / "p"),
                          "--site", "east", "--site", "west"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "to east" in out.stdout and (tmp_path / "p" / "west.key").exists()
    again = subprocess.run([sys.executable, "-m", "geomirror", "pair", "init", "--out", str(tmp_path / "p"),
                            "--site", "east", "--site", "west"], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
