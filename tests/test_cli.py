"""The command line's refusals: one sentence, a non-zero exit, nothing made."""

import os

import pytest

from geomirror import cli

SITE = os.path.join(os.path.dirname(__file__), "..", "configs", "example-site.toml")


@pytest.mark.parametrize("argv, words", [
    (["daemon", "--config", SITE], "the site daemon needs root"),
    (["lab", "up"], "the lab needs root"),
    (["lab", "down"], "the lab needs root"),
    (["demo"], "the demo needs root"),
    (["--netns", "gm-site-a", "status", "--lab-site", "site-a"], "--netns gm-site-a needs root"),
])
def test_without_root_one_sentence_and_exit_2(monkeypatch, capsys, tmp_path, argv, words):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    before = set(os.listdir("/run"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"geomirror: {words}") and err.endswith("run it as root\n")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert set(os.listdir("/run")) == before


def test_unreadable_token_is_one_sentence(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "site.toml"
    text = open(SITE).read()
    cfg.write_text(text)
    real_open = open

    def deny(path, *a, **k):
        if str(path).endswith("control.token"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    import pathlib

    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: deny(self).read())
    assert cli.main(["status", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "cannot read the control token" in err and "run this as root" in err and err.count("\n") == 1
