"""The guest's QEMU definition at this site, from the config (and the built image)."""

from __future__ import annotations

from pathlib import Path

from geomirror.disk_image import build_disk_image
from geomirror.image import GuestImage, build_image, default_cmdline
from replication.colo import COLO_QEMU, COLO_QEMU_DATA
from replication.qemu import GuestError, GuestSpec, detect_accel


def _machine(m: str) -> str:
    return "pc-i440fx-7.2" if m == "pc" else m


class GuestSpecs:
    """Builds `GuestSpec`s for this site; resolves the image once (it asks apt)."""

    def __init__(self, cfg, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir
        self._image: GuestImage | None = None

    def spec(self, *, incoming: bool, ram_path: Path, tag: str, running_pid: int | None = None) -> GuestSpec:
        """`running_pid`: the spec of a QEMU that already runs (taken up after a restart): its
        kernel and initrd are read from its command line, not resolved again (which asks apt)."""
        g = self.cfg.guest
        kernel, initrd = g.kernel, g.initrd
        if running_pid is not None and not kernel:
            kernel, initrd = _boot_files_of(running_pid)
        if not kernel:
            if self._image is None:  # a disk guest boots the disk image's kernel and virtio_blk initramfs
                self._image = build_disk_image(progress=False) if g.disk else build_image(progress=False)
            kernel, initrd = self._image.kernel, self._image.initrd
        six = {}
        if g.prefix6 is not None:  # dual stack: the guest configures its IPv6 address too
            six = dict(ip6=str(g.address6), prefixlen6=g.prefix6.prefixlen, gateway6=str(g.gateway6))
        append = default_cmdline(str(g.address), g.prefix.prefixlen, str(g.gateway), **six)
        if g.append:
            append += " " + g.append
        accel = detect_accel() if g.accel == "auto" else g.accel
        qemu, data = _qemu(g.qemu)
        return GuestSpec(qemu=qemu, qemu_data=data,
                         name=g.name, memory_mb=g.memory_mb, kernel=Path(kernel), initrd=Path(initrd),
                         append=append, ram_path=ram_path, qmp_path=self.run_dir / f"qmp-{tag}.sock",
                         serial_path=self.run_dir / f"serial-{tag}.log", net_socket=self.run_dir / f"net-{tag}.sock",
                         stderr_path=self.run_dir / f"qemu-{tag}.log",
                         mac=g.mac, vcpus=g.vcpus, machine=_machine(g.machine), accel=accel, incoming=incoming,
                         disk_socket=self.disk_socket(tag) if g.disk else None)

    def disk_socket(self, tag: str) -> Path:
        """Where the site's NbdServer serves the guest's disk to the QEMU of `tag` (primary: the
        guest booted here; standby: the hot standby, and the guest it resumes at a takeover)."""
        return self.run_dir / ("disk.sock" if tag == "primary" else f"disk-{tag}.sock")

    def primary(self) -> GuestSpec:
        return self.spec(incoming=False, ram_path=self.run_dir / "guest.ram", tag="primary")

    def standby(self, replica_ram: Path) -> GuestSpec:
        return self.spec(incoming=True, ram_path=replica_ram, tag="standby")


def _qemu(choice: str) -> tuple[str, tuple[str, ...]]:
    """guest.qemu → the binary ("" = the system's) and its -L data directories."""
    if choice == "system":
        return "", ()
    if choice == "colo":
        if not Path(COLO_QEMU).exists():
            raise GuestError(f"guest.qemu = colo, but there is no {COLO_QEMU}: run scripts/qemu10.sh --colo-fix "
                             "(make setup does)")
        return COLO_QEMU, COLO_QEMU_DATA
    if not Path(choice).exists():
        raise GuestError(f"guest.qemu {choice} does not exist")
    return choice, ()


def _boot_files_of(pid: int) -> tuple[str, str]:
    """The -kernel and -initrd of a running QEMU ("" if it is gone: attaching then fails)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "", ""
    val = {a: argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-kernel", "-initrd")}
    return val.get("-kernel", ""), val.get("-initrd", "")
