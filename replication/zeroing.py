"""Zeroing a byte range of a file: a hole punched, zeros in place, or zeros written.

The primary's guest image is kept sparse (a zeroed range becomes a hole); the standby's replica
disk is preallocated (a full filesystem must fail at open, not mid-apply), so there a zeroed
range stays allocated. Both fall back to writing zeros where the filesystem cannot do better.

Python 3.11's ``os`` has ``posix_fallocate`` but no ``fallocate`` with mode flags, so libc's
``fallocate(2)`` is called through ctypes (the process's own libc, as replication/capture.py
does for ``memcmp``).
"""

from __future__ import annotations

import ctypes
import errno
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

# the filesystem (or kernel) does not do this mode: try the next way
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS)
_ZEROS = bytes(1 << 20)


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); an OSError on failure."""
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _try(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate; False where the filesystem does not support the mode (other errors raise)."""
    try:
        fallocate(fd, mode, offset, length)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise
    return True


def write_zeros(fd: int, offset: int, length: int) -> None:
    """pwrite zeros over the range (every byte: a short write is continued)."""
    pos, end = offset, offset + length
    view = memoryview(_ZEROS)
    while pos < end:
        n = os.pwrite(fd, view[:min(len(_ZEROS), end - pos)], pos)
        if n <= 0:
            raise OSError(errno.EIO, "a write of zeros made no progress")
        pos += n


def zero(fd: int, offset: int, length: int, *, keep_allocated: bool) -> str:
    """Make bytes offset..offset+length of the file read as zeros; the file's size is unchanged.

    ``keep_allocated`` False: punch a hole (the space is freed; a sparse image stays sparse).
    True: the range stays allocated, so a later write there needs no space (FALLOC_FL_ZERO_RANGE;
    on a filesystem without it, such as tmpfs, a punched hole allocated again). Either way the
    last resort is writing zeros. Returns how it was done: "punch", "zero-range", "punch+alloc"
    or "write"."""
    if length <= 0:
        return "none"
    if not keep_allocated and _try(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        return "punch"
    if _try(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
        return "zero-range"
    if keep_allocated and _try(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
        fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length)  # may fail with ENOSPC: the caller says so
        return "punch+alloc"
    write_zeros(fd, offset, length)
    return "write"
