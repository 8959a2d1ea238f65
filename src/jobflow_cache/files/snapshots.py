"""Run-folder snapshots: what a folder holds before and after a job, and which paths changed.

A :func:`snapshot` lists every file, symlink and folder below a run folder (one ``stat`` per
entry, nothing read); :func:`prehash` hashes the small files not known yet, so the state a job
found is known; :func:`changed_paths` is what :meth:`.Recorder.record_changes` records.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import os
import re
import stat
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from jobflow_cache.files.digests import RACY_NS, file_digest, known_digest, memo_key

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "DIR",
    "LNK",
    "PREHASH_BUDGET",
    "PREHASH_MAX_FILE",
    "REG",
    "Snapshot",
    "changed_files",
    "changed_paths",
    "excluder",
    "prehash",
    "snapshot",
]

logger = logging.getLogger(__name__)

#: Kinds of snapshot entries (last item of a :data:`Snapshot` value).
REG, LNK, DIR = 0, 1, 2


class Snapshot(dict[str, tuple[int, int, int, int, int]]):
    """Relative POSIX path -> ``(st_mtime_ns, st_size, st_ino, st_ctime_ns, kind)`` of every
    regular file, symlink and folder below a run folder (``kind``: 0 file, 1 symlink, 2
    folder). ``dev`` is the folder's device and ``targets`` the symlinks' target texts."""

    def __init__(self, *args: Any, dev: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dev = dev
        self.targets: dict[str, str] = {}


def _is_excluded(relpath: str, exclude: Sequence[str]) -> bool:
    """Whether a relative POSIX path or its basename matches one of the glob patterns."""
    return excluder(tuple(exclude))(relpath)


@functools.lru_cache(maxsize=64)
def excluder(patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """:func:`_is_excluded` for fixed ``patterns``, with one compiled regex matching what any
    of them matches with ``fnmatchcase`` (a snapshot tests every file of a run folder)."""
    if not patterns:
        return lambda relpath: False
    match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match

    def excluded(relpath: str) -> bool:
        if match(relpath) is not None:
            return True
        name = relpath.rpartition("/")[2]
        return name != relpath and match(name) is not None

    return excluded


def snapshot(folder: str | os.PathLike[str], exclude: Sequence[str] = ()) -> Snapshot:
    """Record the state of the files, symlinks and folders below ``folder`` before a job runs.

    The walk is recursive; symlinks (to files or directories) are listed as symlinks (their
    target text is kept in ``targets``) and never followed. Other special files (sockets,
    fifos) are left out. A missing ``folder`` gives an empty snapshot, since a job may create
    its own folder. Nothing is read: one ``stat`` per entry (and a ``readlink`` per symlink).

    Parameters
    ----------
    folder
        The run folder.
    exclude
        ``fnmatch`` glob patterns matched (case-sensitively) against both the relative POSIX
        path and the basename; a matching file is left out and a matching directory is
        neither listed nor descended into.

    Returns
    -------
    Snapshot
        ``{relpath: (st_mtime_ns, st_size, st_ino, st_ctime_ns, kind)}``.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = (Path(tmp) / "INCAR").write_text("ENCUT = 520")
    ...     _ = (Path(tmp) / "job.log").write_text("started")
    ...     sorted(snapshot(Path(tmp), exclude=["*.log"]))
    ['INCAR']
    """
    result = Snapshot()
    excluded = excluder(tuple(exclude))
    pending: list[tuple[str, str]] = [(os.fspath(folder), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                items = list(entries)
        except FileNotFoundError:  # the run folder itself: an empty snapshot
            continue
        except NotADirectoryError:
            if not prefix:
                raise
            continue
        except PermissionError:
            logger.warning("snapshot: cannot read directory %s, skipped", directory)
            continue
        if not prefix and items:  # the device of the files' memo keys (none: not needed)
            try:
                result.dev = os.stat(directory).st_dev
            except FileNotFoundError:  # gone since it was listed
                return Snapshot()
        for entry in items:
            relpath = prefix + entry.name
            try:
                if excluded(relpath):
                    continue
                st = entry.stat(follow_symlinks=False)
                fmt = stat.S_IFMT(st.st_mode)
                if fmt == stat.S_IFDIR:
                    kind = DIR
                    pending.append((entry.path, relpath + "/"))
                elif fmt == stat.S_IFREG:
                    kind = REG
                elif fmt == stat.S_IFLNK:
                    kind = LNK
                    result.targets[relpath] = os.readlink(entry.path)
                else:
                    continue
            except FileNotFoundError:  # vanished during the walk
                continue
            result[relpath] = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns, kind)
    return result


PREHASH_MAX_FILE = 256 * 1024
"""Files up to this size whose digest is not known are hashed before a job (:func:`prehash`)."""

PREHASH_BUDGET = 16 * 2**20
"""Bytes :func:`prehash` reads at most before one job (files already known cost nothing)."""


def prehash(
    folder: str | os.PathLike[str],
    snap: Snapshot,
    max_file: int = PREHASH_MAX_FILE,
    budget: int = PREHASH_BUDGET,
) -> int:
    """Hash the small files of a snapshot whose content digest is not known yet, so that the
    "before" state of a file the job then changes is known (a hit can be served into a folder
    holding that content, instead of running the job). Bounded: files of at most
    ``max_file`` bytes, ``budget`` bytes in all; files changed in the last two seconds are
    left out (a write within the same time stamp tick could go unseen). Files this process
    stored, placed or hashed before are known already and cost nothing, so in a steady shared
    folder only the files other programs wrote are read. Returns the bytes read."""
    folder = os.fspath(folder)
    read = 0
    now = time.time_ns()
    for relpath, (mtime, size, ino, ctime, kind) in snap.items():
        if kind != REG or size > max_file or now - max(mtime, ctime) < RACY_NS:
            continue
        then = SimpleNamespace(
            st_dev=snap.dev, st_ino=ino, st_size=size, st_mtime_ns=mtime, st_ctime_ns=ctime
        )
        if known_digest(then) is not None:  # type: ignore[arg-type]
            continue
        if read + size > budget:
            break
        path = os.path.join(folder, relpath)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if memo_key(st) != (snap.dev, ino, size, mtime, ctime):
            continue
        file_digest(path, st)
        read += size
    return read


def changed_paths(before: Snapshot, after: Snapshot) -> list[str]:
    """Sorted paths created, modified, replaced or deleted between two snapshots.

    A folder counts only when it appeared or disappeared (its mtime changes with every file
    made in it).
    """
    changed = []
    for path in before.keys() | after.keys():
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is not None and new is not None and old[4] == new[4] == DIR:
            continue
        changed.append(path)
    return sorted(changed)


def changed_files(
    folder: str | os.PathLike[str], before: Snapshot, exclude: Sequence[str] = ()
) -> list[str]:
    """List the regular files created or modified below ``folder`` since ``before`` was taken.

    A file counts as changed when it is new or its mtime, size, ctime or inode differ. When
    several jobs share one folder this yields only the files of the job that ran in between
    (and of other processes that wrote there meanwhile). :func:`changed_paths` also lists
    symlinks, folders and deletions.

    Parameters
    ----------
    folder
        The run folder.
    before
        The :func:`snapshot` taken before the job ran.
    exclude
        Glob patterns, as for :func:`snapshot`.

    Returns
    -------
    list[str]
        Sorted relative POSIX paths.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     run = Path(tmp)
    ...     _ = (run / "INCAR").write_text("ENCUT = 520")
    ...     before = snapshot(run)
    ...     _ = (run / "OUTCAR").write_text("energy = -1.0")
    ...     changed_files(run, before)
    ['OUTCAR']
    """
    after = snapshot(folder, exclude)
    return sorted(
        path for path, state in after.items() if state[4] == REG and before.get(path) != state
    )
