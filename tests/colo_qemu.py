"""The COLO-capable QEMU (scripts/qemu10.sh --colo-fix) for tests: its binary, data and modules,
set for one test and put back after it (the module-level QEMU binary is process-wide)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from replication import qemu as qemu_mod

DEBIAN = Path("/opt/geomirror/qemu-10")  # Debian's 10.0 unpacked: data, firmware, modules
FIXED = Path("/opt/geomirror/qemu-10-colofix/bin/qemu-system-x86_64")


def available() -> str | None:
    """None when the COLO QEMU is there, else why not."""
    if not FIXED.exists() or not (DEBIAN / "usr/share/qemu").is_dir():
        return f"no COLO-capable QEMU at {FIXED} (scripts/qemu10.sh --colo-fix builds it)"
    return None


@contextlib.contextmanager
def colo_qemu():
    """Yields the extra QEMU arguments (-L data dirs) while the COLO QEMU is the binary."""
    old = (qemu_mod.QEMU_BINARY, qemu_mod._qemu_version, os.environ.get("QEMU_MODULE_DIR"))
    qemu_mod.QEMU_BINARY, qemu_mod._qemu_version = str(FIXED), None
    os.environ["QEMU_MODULE_DIR"] = str(DEBIAN / "usr/lib/x86_64-linux-gnu/qemu")
    try:
        yield ("-L", str(DEBIAN / "usr/share/qemu"), "-L", str(DEBIAN / "usr/share/seabios"))
    finally:
        qemu_mod.QEMU_BINARY, qemu_mod._qemu_version = old[0], old[1]
        if old[2] is None:
            os.environ.pop("QEMU_MODULE_DIR", None)
        else:
            os.environ["QEMU_MODULE_DIR"] = old[2]
