"""The shipped systemd units: a restart signals the daemon only (the guest's QEMU runs on, as
tests/test_restart.py proves), run_dir survives a restart, files are private; and systemd
itself accepts them where `systemd-analyze` exists."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "configs" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    c = configparser.ConfigParser(strict=False, interpolation=None)
    c.optionxform = str
    c.read(UNITS / name)
    return c


def test_a_restart_of_the_site_service_never_stops_the_guest():
    s = unit("geomirror.service")["Service"]
    assert s["KillMode"] == "process", "systemd must signal the daemon only, never the guest's QEMU"
    assert s["Restart"] == "always" and s["RuntimeDirectoryPreserve"] == "yes"
    assert s["UMask"] == "0077" and s["StateDirectoryMode"] == "0700" and s["RuntimeDirectoryMode"] == "0700"
    assert "daemon --config" in s["ExecStart"]


def test_the_witness_unit_is_locked_down():
    s = unit("geomirror-witness.service")["Service"]
    assert s["ProtectSystem"] == "strict" and s["UMask"] == "0077" and "witness --config" in s["ExecStart"]


@pytest.mark.parametrize("name", ["geomirror.service", "geomirror-witness.service"])
def test_systemd_accepts_the_unit(tmp_path, name):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = (UNITS / name).read_text()
    text = "\n".join(("ExecStart=/bin/true" if line.startswith("ExecStart=") else line)
                     for line in text.splitlines())  # the console script is not installed there
    (tmp_path / name).write_text(text + "\n")
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
