"""The CLI's plugins: the product finds `geomirror lab ...`, `geomirror demo` and `--lab-site`
through the entry-point group `geomirror.cli` (declared in pyproject.toml), never by name."""

from __future__ import annotations

import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from geomirror import cli
from geomirror.plugins import PLUGIN_GROUP, SiteEndpoint, load_extensions
from lab import cli as labcli
from lab import world

ROOT = Path(__file__).resolve().parent.parent


def declared_entry_points() -> list[EntryPoint]:
    """The entry points pyproject.toml declares for PLUGIN_GROUP (what `pip install` records)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [EntryPoint(name, value, PLUGIN_GROUP) for name, value in project["entry-points"][PLUGIN_GROUP].items()]


def test_pyproject_installs_the_lab_and_declares_its_entry_point():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "lab" in data["tool"]["setuptools"]["packages"]
    assert [(e.name, e.value) for e in declared_entry_points()] == [("lab", "lab.cli:register")]


def test_the_declared_entry_point_adds_lab_demo_and_lab_site():
    ext = load_extensions(declared_entry_points())
    assert ext.unavailable == []
    p = cli.build_parser(ext)
    args = p.parse_args(["lab", "wan", "--rtt", "25ms"])
    assert args.func is labcli.main and args.lab_cmd == "wan" and args.rtt == "25ms"
    assert args.needs_root.startswith("the lab needs root")
    assert p.parse_args(["demo", "--keep"]).func is labcli.demo
    args = p.parse_args(["switchover", "--lab-site", "site-b", "--timeout", "3"])
    assert args.site == "site-b" and args.config is None
    assert args.site_resolve(args.site) == SiteEndpoint("site-b", world.LAB_DIR / "site-b" / "control.sock",
                                                        world.LAB_DIR / "site-b" / "control.token")
    with pytest.raises(SystemExit):
        p.parse_args(["status", "--lab-site", "site-c"])
    with pytest.raises(SystemExit):  # one source of the site, not two
        p.parse_args(["status", "--lab-site", "site-a", "--config", "x.toml"])


def test_without_plugins_the_product_has_no_lab_commands(capsys):
    p = cli.build_parser(load_extensions([]))
    for argv in (["lab", "up"], ["demo"], ["status", "--lab-site", "site-a"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)
    assert p.parse_args(["status", "--config", "x.toml"]).config == "x.toml"
    capsys.readouterr()


def test_the_installed_entry_points_are_read_by_default(monkeypatch):
    seen = []

    def fake_entry_points(*, group):
        seen.append(group)
        return [EntryPoint("lab", "lab.cli:register", group)]

    monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)
    ext = load_extensions()
    assert seen == [PLUGIN_GROUP] and len(ext.commands) == 1 and ext.site_sources[0].option == "--lab-site"


def test_a_plugin_that_cannot_be_imported_is_reported_and_the_rest_works(capsys):
    ext = load_extensions([EntryPoint("ghost", "no_such_package.cli:register", PLUGIN_GROUP)])
    assert ext.commands == [] and ext.unavailable[0][0] == "ghost = no_such_package.cli:register"
    assert cli.main(["config", "check", str(ROOT / "configs" / "lab" / "site-a.toml")], extensions=ext) == 0
    out, err = capsys.readouterr()
    assert "cli.plugin_unavailable" in err and "no_such_package" in err
