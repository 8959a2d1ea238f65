"""File-system operations the object area is built on.

Open flags, temporary names, a reflink or a copy, and a walk that never follows symlinks.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import socket
import stat
import uuid
from pathlib import Path

from jobflow_cache.files.manifest import clean_relpath

try:  # reflinks (FICLONE); not on every platform
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHUNK_SIZE",
    "O_DIRECTORY",
    "O_NOFOLLOW",
    "O_NONBLOCK",
    "TMP_PREFIX",
    "clone_or_copy",
    "host",
    "lstat_or_none",
    "safe_file",
    "tmp_base",
    "tmp_name",
    "unlink_quietly",
]

CHUNK_SIZE = 1 << 20
"""Bytes read at a time when hashing or copying (1 MiB)."""

TMP_PREFIX = ".jfc-tmp-"
"""The start of every temporary name the object area makes (see :func:`tmp_base`)."""

O_NOFOLLOW: int = getattr(os, "O_NOFOLLOW", 0)
O_DIRECTORY: int = getattr(os, "O_DIRECTORY", 0)
O_NONBLOCK: int = getattr(os, "O_NONBLOCK", 0)  # a FIFO swapped in is never waited on

_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


@functools.cache
def host() -> str:
    """This host's name, as temporary and pin file names carry it (safe characters only)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "localhost"


def tmp_base() -> str:
    """A fresh temporary name: ``.jfc-tmp-<pid>-<random>-<host>`` (the pid and host tell a
    later ingest whether the process that made it is gone, see :meth:`.ObjectArea.remove_stale`)."""
    return f"{TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}-{host()}"


def tmp_name(directory: Path) -> Path:
    """A fresh, unused-looking name for a temporary file in ``directory``."""
    return directory / tmp_base()


def unlink_quietly(path: Path) -> None:
    """Remove ``path`` if it exists, ignoring a missing file."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def safe_file(folder: Path, relpath: str) -> Path:
    """``folder / relpath`` after checking that no component below ``folder`` is a symlink.

    Raises
    ------
    ValueError
        If ``relpath`` is absolute or escapes ``folder``, or a component is a symlink or the
        file is not a regular file.
    """
    clean = clean_relpath(relpath)
    current = Path(folder)
    parts = clean.split("/")
    for part in parts[:-1]:
        current = current / part
        st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise ValueError(f"{current} is not a real directory (symlinks are not followed)")
    target = current / parts[-1]
    st = os.lstat(target)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{target} is not a regular file (symlinks are not followed)")
    return target


_CLONELESS: set[int] = set()  # devices whose file system has no reflinks


def _may_clone(fd: int) -> bool:
    """Whether a reflink into the file ``fd`` is worth trying (not known to fail there)."""
    return fcntl is not None and os.fstat(fd).st_dev not in _CLONELESS


def _no_clone(fd: int, err: OSError) -> None:
    """Remember a file system without reflinks (not a one-off failure: across devices)."""
    if err.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
        _CLONELESS.add(os.fstat(fd).st_dev)


def clone_or_copy(src_fd: int, dst_fd: int) -> str:
    """Copy the whole of ``src_fd`` to the empty ``dst_fd``: a reflink (FICLONE) where the
    file system shares blocks, ``copy_file_range`` (in the kernel) elsewhere, read/write as a
    last resort. Returns how: ``"reflink"``, ``"kernel"`` or ``"read"``."""
    if _may_clone(dst_fd):
        try:
            fcntl.ioctl(dst_fd, _FICLONE, src_fd)
            return "reflink"
        except OSError as err:
            _no_clone(dst_fd, err)
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while copy_range(src_fd, dst_fd, 1 << 30):
                pass
            return "kernel"
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            os.lseek(src_fd, 0, os.SEEK_SET)
            os.ftruncate(dst_fd, 0)
            os.lseek(dst_fd, 0, os.SEEK_SET)
    while True:
        chunk = os.read(src_fd, CHUNK_SIZE)
        if not chunk:
            return "read"
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view) :]


def lstat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
