"""Content digests of files (``xxh3_128``) and this process's memo of them.

The memo is keyed on a file's ``stat`` (device, inode, size, mtime, ctime), and reaches
:mod:`jobflow_cache.hashing.contents`' memo when it is there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import xxhash

from jobflow_cache.files.fsops import CHUNK_SIZE, O_NOFOLLOW

if TYPE_CHECKING:
    from io import FileIO

__all__ = [
    "MEMO",
    "RACY_NS",
    "file_digest",
    "hash_file",
    "hash_stream",
    "known_digest",
    "memo_key",
    "remember",
]

RACY_NS = 2_000_000_000

MEMO: dict[tuple[int, int, int, int, int], str] = {}
_MEMO_MAX = 500_000


def memo_key(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def known_digest(st: os.stat_result) -> str | None:
    """The content digest of the regular file whose ``lstat`` is ``st``, when this process
    hashed, stored or placed that file since it last changed (device, inode, size, mtime and
    ctime all equal), or :mod:`jobflow_cache.hashing.contents`' memo knows it (a file named in the
    inputs, a large file hashed by another process of this host); otherwise None. Never reads
    the file."""
    digest = MEMO.get(memo_key(st))
    if digest is None:
        contents = _contents_module()
        if contents is not None:
            try:
                digest = contents.memo().get(st)
            except Exception:  # an optional shortcut: unknown
                digest = None
    return digest if isinstance(digest, str) else None


def remember(path: str | os.PathLike[str], st: os.stat_result, xxh3: str) -> None:
    """Remember that the file ``path`` whose ``lstat`` is ``st`` holds content ``xxh3`` (see
    :func:`known_digest`); also tells :mod:`jobflow_cache.hashing.contents` when it is there."""
    if len(MEMO) >= _MEMO_MAX:
        MEMO.clear()
    MEMO[memo_key(st)] = xxh3
    contents = _contents_module()
    if contents is not None:
        with contextlib.suppress(Exception):
            contents.remember(os.fspath(path), st, xxh3)


@functools.cache
def _contents_module() -> Any:
    try:
        from jobflow_cache.hashing import contents  # a later layer, optional
    except ImportError:
        return None
    usable = callable(getattr(contents, "remember", None)) and callable(
        getattr(contents, "memo", None)
    )
    return contents if usable else None


def file_digest(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str | None:
    """The ``xxh3_128`` of the regular file ``path`` now (its ``lstat`` is ``st`` if known):
    from the memo when it is unchanged since it was last hashed, else by reading it. None
    when it is no regular file, vanished, or was written to while it was read."""
    try:
        st = st or os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return None
        known = known_digest(st)
        if known is not None:
            return known
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
        with open(fd, "rb", buffering=0) as stream:
            first = os.fstat(stream.fileno())
            if memo_key(first) != memo_key(st):
                return None
            digest, size = hash_stream(stream)
            after = os.fstat(stream.fileno())
    except OSError:
        return None
    if size != st.st_size or memo_key(after) != memo_key(st):
        return None
    remember(path, st, digest)
    return digest


def hash_stream(src: FileIO, dst: IO[bytes] | None = None) -> tuple[str, int]:
    """Hash a binary stream in :data:`CHUNK_SIZE` chunks, optionally copying it to ``dst``.

    Returns
    -------
    tuple[str, int]
        The ``xxh3_128`` hex digest and the number of bytes read.
    """
    hasher = xxhash.xxh3_128()
    buffer = bytearray(CHUNK_SIZE)
    view = memoryview(buffer)
    size = 0
    while True:
        n = src.readinto(view)
        if not n:
            break
        chunk = view[:n]
        hasher.update(chunk)
        if dst is not None:
            dst.write(chunk)
        size += n
    return hasher.hexdigest(), size


def hash_file(path: Path) -> tuple[str, int]:
    """``xxh3_128`` hex digest and size of a regular file (symlinks are not followed)."""
    fd = os.open(path, os.O_RDONLY | O_NOFOLLOW)
    with open(fd, "rb", buffering=0) as stream:
        return hash_stream(stream)
