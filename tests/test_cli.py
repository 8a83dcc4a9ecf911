"""The command line's refusals: one line `geomirror: <sentence>` on stderr, a non-zero exit, no
traceback, nothing made. The control calls go to a real control API (tests/control_server.py, in
its own process) on a UNIX socket, or to a socket nobody serves."""

from __future__ import annotations

import importlib.metadata
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geomirror import cli
from geomirror.plugins import load_extensions
from lab import world
from tests.control_server import PROMOTE_REFUSAL, SWITCHOVER_REFUSAL

ROOT = Path(__file__).resolve().parent.parent
SITE = str(ROOT / "configs" / "example-site.toml")
LAB_A = ROOT / "configs" / "lab" / "site-a.toml"
TOKEN = "cli-test-token"
SITE_COMMANDS = ["status", "promote", "fence", "switchover", "reload-tls"]
LAB = load_extensions([importlib.metadata.EntryPoint("lab", "lab.cli:register", "geomirror.cli")])


def run(capsys, argv) -> tuple[int, str, str]:
    rc = cli.main(argv, extensions=LAB)
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> str:
    """The sentence of the one stderr line (fails on anything else: a traceback, log lines)."""
    assert err.startswith("geomirror: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err[len("geomirror: "):-1]


def site_config(d: Path, name: str, *, state: Path, run_dir: Path) -> Path:
    text = LAB_A.read_text().replace('state_dir = "/run/geomirror-lab/site-a"', f'state_dir = "{state}"')
    text = text.replace('run_dir = "/run/geomirror-lab/site-a"', f'run_dir = "{run_dir}"')
    p = d / f"{name}.toml"
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """live: a control API answers on live/control.sock; stopped: a token, no socket; stale: a
    token and the socket file of a dead daemon; notoken: nothing; wrongtok: another token."""
    d = tmp_path_factory.mktemp("cli")
    for name in ("live", "stopped", "stale", "notoken", "wrongtok"):
        (d / name).mkdir()
    for name in ("live", "stopped", "stale"):
        (d / name / "control.token").write_text(TOKEN + "\n")
    (d / "wrongtok" / "control.token").write_text("not-the-token\n")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "stale" / "control.sock"))
    s.close()
    sock = d / "live" / "control.sock"
    log = open(d / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "tests.control_server", str(sock), TOKEN], cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        assert server.poll() is None, (d / "server.log").read_text()
        try:
            with socket.socket(socket.AF_UNIX) as c:
                c.connect(str(sock))
            break
        except OSError:
            assert time.monotonic() < deadline, "the control server did not start"
            time.sleep(0.05)
    cfg = {name: site_config(d, name, state=d / name, run_dir=d / name)
           for name in ("live", "stopped", "stale", "notoken")}
    cfg["wrongtok"] = site_config(d, "wrongtok", state=d / "wrongtok", run_dir=d / "live")
    yield d, cfg
    server.kill()
    server.wait()
    log.close()


# ---------------------------------------------------------------- without root


@pytest.mark.parametrize("argv, words", [
    (["daemon", "--config", SITE], "the site daemon needs root"),
    (["lab", "up"], "the lab needs root"),
    (["lab", "down"], "the lab needs root"),
    (["demo"], "the demo needs root"),
    (["--netns", "gm-site-a", "status", "--lab-site", "site-a"], "--netns gm-site-a needs root"),
])
def test_without_root_one_sentence_and_exit_2(monkeypatch, capsys, argv, words):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    before = set(os.listdir("/run"))
    rc, _, err = run(capsys, argv)
    assert rc == 2
    said = one_line(err)
    assert said.startswith(words) and said.endswith("run it as root")
    assert set(os.listdir("/run")) == before


# ---------------------------------------------------------------- the daemon is not there


@pytest.mark.parametrize("cmd", SITE_COMMANDS)
@pytest.mark.parametrize("case", ["stopped", "stale"])
def test_a_stopped_daemon_is_one_sentence(sites, capsys, cmd, case):
    d, cfg = sites
    rc, out, err = run(capsys, [cmd, "--config", str(cfg[case])])
    assert rc != 0 and out == ""
    assert one_line(err) == f"site-a's daemon is not running (nothing answers on {d / case / 'control.sock'})"


@pytest.mark.parametrize("cmd", SITE_COMMANDS)
def test_no_token_is_one_sentence(sites, capsys, cmd):
    d, cfg = sites
    rc, _, err = run(capsys, [cmd, "--config", str(cfg["notoken"])])
    assert rc != 0
    assert one_line(err) == f"no control token at {d / 'notoken' / 'control.token'}: is site-a's daemon running?"


def test_unreadable_token_is_one_sentence(sites, monkeypatch, capsys):
    _, cfg = sites
    real = pathlib.Path.read_text

    def deny(self, *a, **k):
        if self.name == "control.token":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "read_text", deny)
    rc, _, err = run(capsys, ["status", "--config", str(cfg["live"])])
    said = one_line(err)
    assert rc != 0 and said.startswith("cannot read the control token") and said.endswith("run this as root")


def test_a_token_path_that_is_a_directory_is_one_sentence(sites, capsys, tmp_path):
    d, _ = sites
    (tmp_path / "control.token").mkdir()
    cfg = site_config(tmp_path, "dir", state=tmp_path, run_dir=d / "live")
    rc, _, err = run(capsys, ["status", "--config", str(cfg)])
    assert rc != 0 and one_line(err) == f"cannot read the control token {tmp_path / 'control.token'}: Is a directory"


@pytest.mark.parametrize("cmd", SITE_COMMANDS + ["rejoin"])
def test_a_bad_config_path_is_one_sentence(capsys, tmp_path, cmd):
    rc, _, err = run(capsys, [cmd, "--config", str(tmp_path / "nope.toml")])
    assert rc != 0 and one_line(err) == f"{tmp_path / 'nope.toml'}: no such file"


# ---------------------------------------------------------------- the daemon answers


def test_status_prints_the_daemons_answer(sites, capsys):
    _, cfg = sites
    rc, out, err = run(capsys, ["status", "--config", str(cfg["live"])])
    assert (rc, err) == (0, "")
    assert json.loads(out)["committed_epoch"] == 7


@pytest.mark.parametrize("argv, sentence", [
    (["promote", "--force"], PROMOTE_REFUSAL),
    (["switchover", "--timeout", "5"], SWITCHOVER_REFUSAL),
    (["reload-tls"], "the certificate files were refused (see the log line tls.reload_refused); "
                     "still presenting the previous one"),
    (["fence"], "site-a's daemon failed on POST /v1/fence: internal error (KeyError); see the daemon log, "
                "event control.bug"),
])
def test_a_refusal_or_a_daemon_bug_is_one_sentence(sites, capsys, argv, sentence):
    _, cfg = sites
    rc, out, err = run(capsys, [*argv, "--config", str(cfg["live"])])
    assert rc != 0 and out == ""
    assert one_line(err) == sentence


def test_a_wrong_token_is_one_sentence(sites, capsys):
    _, cfg = sites
    rc, _, err = run(capsys, ["status", "--config", str(cfg["wrongtok"])])
    assert rc != 0
    assert one_line(err).startswith("site-a's daemon refused the control token (HTTP 401)")


def test_rejoin_while_the_daemon_runs_is_one_sentence(sites, capsys):
    d, cfg = sites
    rc, _, err = run(capsys, ["rejoin", "--config", str(cfg["live"])])
    assert rc != 0
    assert one_line(err) == f"the daemon of site-a is running ({d / 'live' / 'control.sock'} answers): stop it first"


# ---------------------------------------------------------------- --lab-site (through the lab plugin)


def test_lab_site_finds_the_lab_sites_socket_and_token(sites, monkeypatch, capsys):
    d, _ = sites
    (d / "site-a").mkdir(exist_ok=True)
    (d / "site-a" / "control.token").write_text(TOKEN)
    os.symlink(d / "live" / "control.sock", d / "site-a" / "control.sock")
    monkeypatch.setattr(world, "LAB_DIR", d)
    rc, out, err = run(capsys, ["status", "--lab-site", "site-a"])
    assert (rc, err) == (0, "") and json.loads(out)["role"] == "primary"
    rc, _, err = run(capsys, ["promote", "--lab-site", "site-a"])
    assert rc != 0 and one_line(err) == PROMOTE_REFUSAL
    rc, _, err = run(capsys, ["status", "--lab-site", "site-b"])
    assert rc != 0 and one_line(err) == f"no control token at {d / 'site-b' / 'control.token'}: " \
                                        "is site-b's daemon running?"


def test_guest_build_disk_builds_the_disk_guest_and_prints_its_disk(capsys, monkeypatch, tmp_path):
    from geomirror.image import GuestImage

    calls = []

    def fake(kind):
        def build(cache, force=False):
            calls.append((kind, cache, force))
            disk = tmp_path / "disk.raw" if kind == "disk" else None
            return GuestImage(tmp_path / "vmlinuz", tmp_path / "initrd.img", "k" * 64, "6.1.0-test", tmp_path, disk)
        return build

    monkeypatch.setattr(cli, "build_image", fake("initramfs"))
    monkeypatch.setattr(cli, "build_disk_image", fake("disk"))
    rc, out, _ = run(capsys, ["guest", "build", "--disk", "--cache-dir", str(tmp_path), "--force"])
    assert rc == 0 and calls == [("disk", tmp_path, True)]
    assert f"disk    {tmp_path / 'disk.raw'}" in out
    rc, out, _ = run(capsys, ["guest", "build"])
    assert rc == 0 and calls[-1] == ("initramfs", None, False) and "disk " not in out
