"""The product never imports the lab: every module of gmbase/, geomirror/, replication/ and bgp/
is parsed and every import in it (top level or inside a function, absolute or relative, or by
name through importlib) is checked. The lab reaches the CLI through an entry point instead."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("gmbase", "geomirror", "replication", "bgp")


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file at `path` (a module under `root`)."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    if path.name == "__init__.py":
        package = list(path.relative_to(root).parent.parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.append((node.lineno, mod))
            out += [(node.lineno, f"{mod}.{a.name}" if mod else a.name) for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module")))):
            out.append((node.lineno, node.args[0].value))
    return out


def lab_imports(path: Path, root: Path = ROOT) -> list[str]:
    return [f"{path.relative_to(root)}:{line} imports {mod}" for line, mod in imported_modules(path, root)
            if mod == "lab" or mod.startswith("lab.")]


def product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py"))


def test_the_product_never_imports_the_lab():
    files = product_files()
    assert len(files) > 20 and any(p.name == "cli.py" for p in files)
    found = [hit for p in files for hit in lab_imports(p)]
    assert not found, "the product imports the lab: " + "; ".join(found)


@pytest.mark.parametrize("source", [
    "import lab\n",
    "import lab.world as w\n",
    "from lab import cli\n",
    "from lab.world import LAB_DIR\n",
    "def f():\n    from lab import world\n",
    "from .. import lab\n",
    "from ..lab import world\n",
    "import importlib\nimportlib.import_module('lab.cli')\n",
    "__import__('lab')\n",
])
def test_every_kind_of_import_of_the_lab_is_found(tmp_path, source):
    f = tmp_path / "geomirror" / "sub.py"
    f.parent.mkdir()
    f.write_text(source)
    assert lab_imports(f, tmp_path), source


@pytest.mark.parametrize("source", [
    "import labels\n",
    "from geomirror import lab_tools\n",
    "from . import lab\n",  # geomirror.lab, not the top-level lab
    "x = 'lab'\n",
])
def test_names_that_only_look_like_the_lab_are_not_flagged(tmp_path, source):
    f = tmp_path / "geomirror" / "sub.py"
    f.parent.mkdir()
    f.write_text(source)
    assert not lab_imports(f, tmp_path), source
