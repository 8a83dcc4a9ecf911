"""The COLO-capable QEMU (scripts/qemu10.sh --colo-fix) for tests: is it there, and a guest on it."""

from __future__ import annotations

from pathlib import Path

from geomirror.image import build_image, default_cmdline
from replication.colo import COLO_QEMU, COLO_QEMU_DATA
from replication.qemu import GuestSpec


def available() -> str | None:
    """None when the COLO QEMU is there, else why not."""
    if not Path(COLO_QEMU).exists() or not all(Path(d).is_dir() for d in COLO_QEMU_DATA):
        return f"no COLO-capable QEMU at {COLO_QEMU} (scripts/qemu10.sh --colo-fix builds it)"
    return None


def colo_spec(d, name: str, mb: int = 128, incoming: bool = False) -> GuestSpec:
    """The lab's guest writing 2000 pages/s in 16 MB (gm.dirty), its files in `d`."""
    img = build_image(progress=False)
    return GuestSpec(name=name, memory_mb=mb, kernel=img.kernel, initrd=img.initrd,
                     append=default_cmdline("198.51.100.10", 24, "198.51.100.1", dirty="16:2000"),
                     ram_path=d / "ram", qmp_path=d / "qmp.sock", serial_path=d / "serial.log",
                     net_socket=d / "net.sock", accel="tcg", incoming=incoming, stderr_path=d / "stderr",
                     qemu=COLO_QEMU, qemu_data=COLO_QEMU_DATA)
