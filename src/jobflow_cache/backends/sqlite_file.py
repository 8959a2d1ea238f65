"""What the embedded backend's SQLite file needs apart from SQL: the file-system check, file
identity, and how text is read.

* :func:`file_system_type` names the file system of a path (``/proc/mounts``), so opening a
  file on a network file system (:data:`NETWORK_FILE_SYSTEMS`), where SQLite's locks and WAL
  shared memory do not work across nodes, gives one warning;
* :func:`identity` and :func:`sidecars_in_use` tell a file deleted or replaced while in use;
* :func:`decode_text` reads a row holding bytes that are not UTF-8 (bit rot) as a text no JSON
  decoder accepts, so the row reads as unreadable instead of failing the statement.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "MOUNTS",
    "NETWORK_FILE_SYSTEMS",
    "decode_text",
    "file_system_type",
    "identity",
    "sidecars_in_use",
]

#: File systems on which SQLite's WAL mode (shared memory between processes) and its file
#: locks are not safe: processes on two nodes can corrupt the database or lose writes.
NETWORK_FILE_SYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "lustre",
        "gpfs",
        "beegfs",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "fuse.sshfs",
        "glusterfs",
        "fuse.glusterfs",
        "panfs",
        "afs",
        "9p",
        "fuse.gcsfuse",
        "wekafs",
    }
)

#: The mount table read by :func:`file_system_type`.
MOUNTS = "/proc/mounts"

_SIDECARS = ("-wal", "-shm")


def file_system_type(path: str | os.PathLike[str], mounts: str | None = None) -> str | None:
    """Type of the file system holding ``path`` (its nearest existing parent), from
    ``/proc/mounts``; None where that cannot be read (not Linux).

    Examples
    --------
    >>> file_system_type("/", mounts="/nonexistent") is None
    True
    """
    try:
        with open(mounts or MOUNTS, encoding="utf-8") as handle:
            table = [line.split()[1:3] for line in handle if len(line.split()) >= 3]
    except OSError:
        return None
    target = Path(path).expanduser().absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    real = os.path.realpath(target)
    best: tuple[int, str] | None = None
    for mount_point, fs_type in table:
        mount_point = mount_point.replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) > best[0]):
            best = (len(mount_point), fs_type)
    return best[1] if best else None


def identity(file: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file at a path, None when there is none."""
    try:
        st = os.stat(file)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def sidecars_in_use(file: str) -> set[tuple[int, int] | None]:
    """(st_dev, st_ino) of the -wal/-shm files of ``file`` this process has open (Linux's
    /proc; empty elsewhere)."""
    names = {f"{name}{suffix}" for name in (file, os.path.realpath(file)) for suffix in _SIDECARS}
    found: set[tuple[int, int] | None] = set()
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in fds:
        link = f"/proc/self/fd/{fd}"
        try:
            if os.readlink(link) in names:
                st = os.stat(link)
                found.add((st.st_dev, st.st_ino))
        except OSError:
            continue
    return found


def decode_text(raw: bytes) -> str:
    """SQLite's text factory: UTF-8, with bytes that are not UTF-8 kept as lone surrogates
    (bit rot), which no JSON decoder accepts, so the row reads as unreadable instead of
    failing the whole statement."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape")
