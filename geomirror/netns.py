"""Network namespaces without shelling out to `ip`: enter one, spawn into one.

Named namespaces are bind mounts under /run/netns (the iproute2 convention), made
and removed with pyroute2.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import netns as _netns

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def listed() -> list[str]:
    return sorted(_netns.listnetns())


def create(name: str) -> None:
    _netns.create(name)


def remove(name: str) -> None:
    if exists(name):
        _netns.remove(name)


def enter(name: str) -> None:
    """Move the calling process (all of it: call before starting threads) into netns `name`."""
    fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextmanager
def inside(name: str):
    """Run a block with the calling thread in netns `name`, then return to where it was.

    Sockets keep the namespace they were created in, so a socket made inside the
    block stays in `name` afterwards.
    """
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        enter(name)
        yield
    finally:
        _setns(back)
        os.close(back)


def spawn(name: str | None, argv: list[str], **popen_kw) -> subprocess.Popen:
    """Start argv (an argument list, never a shell) inside netns `name`."""
    if name is None:
        return subprocess.Popen(argv, **popen_kw)
    path = str(NETNS_DIR / name)
    fd = os.open(path, os.O_RDONLY)  # opened in the parent so the child only calls setns

    def _child():
        _setns(fd)

    try:
        return subprocess.Popen(argv, preexec_fn=_child, pass_fds=(fd,), **popen_kw)
    finally:
        os.close(fd)
