"""Command-line plugins: packages installed beside the product add subcommands through the
entry-point group `geomirror.cli`. Each entry point names a `register(ext: Extensions)` function,
called before the command line is parsed; the product never names its plugins (the lab,
`lab = "lab.cli:register"`, adds `lab`, `demo` and `--lab-site`)."""

from __future__ import annotations

import argparse
import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

PLUGIN_GROUP = "geomirror.cli"


@dataclass(frozen=True)
class SiteEndpoint:
    """Where a site's control API answers: its UNIX socket and the token file it wants."""

    name: str  # the site, as the operator knows it ("fra1", "site-a")
    socket: Path
    token_file: Path


@dataclass(frozen=True)
class SiteSource:
    """A set of sites a plugin knows by name: an option of promote/fence/status/switchover/
    reload-tls beside --config (the lab's `--lab-site site-a`)."""

    option: str
    choices: tuple[str, ...]
    help: str
    resolve: Callable[[str], SiteEndpoint]


@dataclass
class Extensions:
    """What the plugins of PLUGIN_GROUP add to the command line."""

    commands: list[Callable[[argparse._SubParsersAction], None]] = field(default_factory=list)
    site_sources: list[SiteSource] = field(default_factory=list)
    unavailable: list[tuple[str, str]] = field(default_factory=list)  # (entry point, why)

    def add_commands(self, add: Callable[[argparse._SubParsersAction], None]) -> None:
        """`add(subparsers)` adds the plugin's subcommands; each sets `func` (and `needs_root`,
        a sentence, when it cannot work without root)."""
        self.commands.append(add)

    def add_site_source(self, source: SiteSource) -> None:
        self.site_sources.append(source)


def load_extensions(entry_points: Iterable | None = None) -> Extensions:
    """Call every plugin's register function. `entry_points` defaults to the installed ones of
    PLUGIN_GROUP; a plugin that cannot be imported is skipped (and reported once logging is up)."""
    ext = Extensions()
    eps = importlib.metadata.entry_points(group=PLUGIN_GROUP) if entry_points is None else entry_points
    for ep in eps:
        try:
            register = ep.load()
        except ImportError as e:
            ext.unavailable.append((f"{ep.name} = {ep.value}", str(e)))
            continue
        register(ext)
    return ext
