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


def test_the_drill_runs_unattended_once_at_a_time_from_a_timer():
    s = unit("geomirror-drill.service")["Service"]
    assert s["Type"] == "oneshot" and "drill --config" in s["ExecStart"] and "--unattended" in s["ExecStart"]
    assert s["ProtectSystem"] == "strict" and s["UMask"] == "0077"
    t = unit("geomirror-drill.timer")["Timer"]
    assert t["Unit"] == "geomirror-drill.service" and t["OnCalendar"] and t["Persistent"] == "false"


@pytest.mark.parametrize("name", ["geomirror.service", "geomirror-witness.service", "geomirror-drill.service",
                                  "geomirror-drill.timer"])
def test_systemd_accepts_the_unit(tmp_path, name):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    for other in UNITS.iterdir():  # a timer is verified with the service it starts beside it
        text = other.read_text()
        text = "\n".join(("ExecStart=/bin/true" if line.startswith("ExecStart=") else line)
                         for line in text.splitlines())  # the console script is not installed there
        (tmp_path / other.name).write_text(text + "\n")
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
