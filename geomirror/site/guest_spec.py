"""The guest's QEMU definition at this site, from the config (and the built image)."""

from __future__ import annotations

from pathlib import Path

from geomirror.image import GuestImage, build_image, default_cmdline
from replication.qemu import GuestSpec, detect_accel


def _machine(m: str) -> str:
    return "pc-i440fx-7.2" if m == "pc" else m


class GuestSpecs:
    """Builds `GuestSpec`s for this site; resolves the image once (it asks apt)."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self._image: GuestImage | None = None

    def spec(self, *, incoming: bool, ram_path: Path, tag: str) -> GuestSpec:
        g = self.cfg.guest
        kernel, initrd = g.kernel, g.initrd
        if not kernel:
            if self._image is None:
                self._image = build_image(progress=False)
            kernel, initrd = self._image.kernel, self._image.initrd
        append = default_cmdline(str(g.address), g.prefix.prefixlen, str(g.gateway))
        if g.append:
            append += " " + g.append
        accel = detect_accel() if g.accel == "auto" else g.accel
        return GuestSpec(name=g.name, memory_mb=g.memory_mb, kernel=Path(kernel), initrd=Path(initrd),
                         append=append, ram_path=ram_path, qmp_path=self.run_dir / f"qmp-{tag}.sock",
                         serial_path=self.run_dir / f"serial-{tag}.log", net_socket=self.run_dir / f"net-{tag}.sock",
                         stderr_path=self.run_dir / f"qemu-{tag}.log",
                         mac=g.mac, vcpus=g.vcpus, machine=_machine(g.machine), accel=accel, incoming=incoming)

    def primary(self) -> GuestSpec:
        return self.spec(incoming=False, ram_path=self.run_dir / "guest.ram", tag="primary")

    def standby(self, replica_ram: Path) -> GuestSpec:
        return self.spec(incoming=True, ram_path=replica_ram, tag="standby")
