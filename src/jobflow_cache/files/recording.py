"""Recording a job: what it changed in its run folder, between two snapshots.

Each path becomes a :class:`.FileRecord` (the state the job found and the state it left);
its file is stored in the object area, or only hashed.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from jobflow_cache.errors import (
    CacheError,
    UnsafeManifestError,
)
from jobflow_cache.files.digests import file_digest, known_digest
from jobflow_cache.files.fsops import TMP_PREFIX, safe_file
from jobflow_cache.files.layout import PlaceMode
from jobflow_cache.files.manifest import (
    FileRecord,
    FileState,
    check_manifest,
    clean_relpath,
    is_code_path,
)
from jobflow_cache.files.snapshots import DIR, LNK, Snapshot, changed_paths, excluder
from jobflow_cache.files.storage import ObjectStorage

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "LIVE_FILE_PATTERNS",
    "Recorder",
]

logger = logging.getLogger(__name__)

LIVE_FILE_PATTERNS = (
    "*-wal",
    "*-shm",
    "*-journal",
    "*.lock",
    "*.lck",
    ".nfs*",
    "*.pid",
)
"""Names of files that belong to a live process rather than to a job: SQLite's write-ahead
log, shared memory and rollback journal of any database, lock files, NFS's silly-renamed
open files. Never recorded, whatever ``FILES_EXCLUDE`` says; a database file whose ``-wal``,
``-shm`` or ``-journal`` exists after the job is not recorded either (someone has it open)."""

_SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def _bytecode_cache(relpath: str) -> bool:
    """Whether ``relpath`` is in a ``__pycache__`` folder: Python's byte code of a module a
    job imported, never recorded (Python writes it again; a hit never serves one)."""
    return "__pycache__" in relpath.split("/")


def _live_database(folder: Path, relpath: str) -> bool:
    """Whether ``relpath`` is an SQLite database someone has open: its ``-wal``, ``-shm`` or
    ``-journal`` exists."""
    return any(os.path.lexists(folder / (relpath + suffix)) for suffix in _SQLITE_SIDECARS)


class Recorder(ObjectStorage):
    """Record a run folder's files and changes (the part of :class:`.ObjectArea` a miss
    uses)."""

    def record(
        self, folder: Path, relpaths: Iterable[str], mode: PlaceMode = "copy"
    ) -> list[FileRecord]:
        """Ingest regular files of a run folder and return their manifest (each recorded as
        created by the job: ``before`` is None). :meth:`record_changes` records everything a
        job changed, with the states it found.

        Parameters
        ----------
        folder
            The run folder.
        relpaths
            Relative POSIX paths below ``folder``; duplicates and spellings such as ``"./a"``
            are normalised.
        mode
            As for :meth:`ingest`.

        Returns
        -------
        list[FileRecord]
            One record per file, sorted by path.

        Raises
        ------
        CacheError
            Chained to the cause if any file cannot be stored (absolute or escaping path, path
            through a symlink, not a regular file, I/O error). The caller then writes no cache
            entry; objects already stored are left for garbage collection.
        """
        records: dict[str, FileRecord] = {}
        for relpath in relpaths:
            try:
                clean = clean_relpath(relpath)
                if clean in records:
                    continue
                records[clean] = self._file_record(folder, clean, None, store=True)
            except (OSError, ValueError, CacheError) as err:
                raise CacheError(f"cannot record {relpath!r} of {folder}: {err}") from err
        return [records[key] for key in sorted(records)]

    def _file_record(
        self, folder: Path, clean: str, before: FileState | None, *, store: bool
    ) -> FileRecord:
        """The record of the regular file ``clean`` below ``folder``: stored in the area, or
        (``store`` False) only hashed."""
        path = safe_file(folder, clean)
        if store:
            digest, size, st = self._ingest(path)
        else:
            st = os.lstat(path)
            found = file_digest(path, st)
            if found is None:
                raise CacheError(f"{path} was written to while it was being recorded")
            digest, size = found, st.st_size
        return FileRecord(
            path=clean,
            size=size,
            xxh3=digest,
            mode=stat.S_IMODE(st.st_mode) & 0o7777,
            stored=store,
            before=before,
        )

    def record_changes(
        self,
        folder: str | os.PathLike[str],
        before: Snapshot,
        after: Snapshot,
        *,
        max_size: int = 0,
        store: bool = True,
        serve_code: bool | None = None,
    ) -> list[FileRecord]:
        """Record what a job changed in its run folder, between two :func:`.snapshot`\\ s.

        Every path created, modified, replaced or deleted gets one :class:`FileRecord` with
        the state the job left and the state it found (``before``; a file's digest only when
        :func:`known_digest` knows it, i.e. this process stored, placed or hashed it since
        it last changed). Files are stored in the area (reflink or copy); a folder counts
        only when the job made it and left it empty, or deleted it.

        Parameters
        ----------
        folder
            The run folder.
        before, after
            Snapshots taken before and after the job ran, with the same exclude patterns.
        max_size
            Files larger than this many bytes are hashed but not stored (0: no limit).
        store
            False: no file is stored, all are only hashed (``FILES=none``).
        serve_code
            ``SERVE_CODE_FILES`` (default: the area's own): whether files matching
            :data:`CODE_FILE_PATTERNS` and
            symlinks out of the folder may be recorded. Off, a job that changed such a path
            is not recorded at all (``CacheError``, before anything is stored): a hit never
            serves them, and an entry without them would be a wrong result.

        Raises
        ------
        CacheError
            Chained to the cause when a path cannot be recorded (written to meanwhile, I/O
            error); the caller then writes no entry.

        Notes
        -----
        A file that matches :data:`LIVE_FILE_PATTERNS`, or an SQLite database whose ``-wal``,
        ``-shm`` or ``-journal`` exists, is left out: it belongs to a live process. So is
        anything in a ``__pycache__`` folder (byte code Python wrote for an import).
        """
        changed = changed_paths(before, after)
        if not changed:  # the job changed nothing (most jobs of a shared folder)
            return []
        folder = Path(folder)
        if serve_code is None:
            serve_code = self.serve_code
        live = excluder(LIVE_FILE_PATTERNS)

        def skipped(path: str) -> bool:  # a live process's, byte code, the cache's own
            name = path.rpartition("/")[2]
            return live(path) or _bytecode_cache(path) or name.startswith(TMP_PREFIX)

        if not serve_code:
            code = [p for p in changed if is_code_path(p) and not skipped(p)]
            if code:
                raise CacheError(
                    f"the job changed {len(code)} file(s) Python would import or hidden files "
                    f"({', '.join(code[:3])}), which a hit never serves while "
                    "JOBFLOW_CACHE_SERVE_CODE_FILES is off"
                )
        occupied: set[str] = set()
        for path in after:
            parent = path.rpartition("/")[0]
            while parent and parent not in occupied:
                occupied.add(parent)
                parent = parent.rpartition("/")[0]
        records: list[FileRecord] = []
        for path in changed:
            old, new = before.get(path), after.get(path)
            if skipped(path):
                continue
            try:
                state = self._before_state(before, path, old)
                if new is None:
                    records.append(FileRecord(path=path, kind="deleted", before=state))
                elif new[4] == DIR:
                    if path not in occupied:
                        records.append(FileRecord(path=path, kind="dir", mode=0, before=state))
                elif new[4] == LNK:
                    target = os.readlink(folder / path)
                    records.append(
                        FileRecord(path=path, kind="symlink", target=target, before=state)
                    )
                else:
                    if _live_database(folder, path):
                        logger.debug("%s is an open SQLite database: not recorded", path)
                        continue
                    keep = store and not (max_size and new[1] > max_size)
                    records.append(self._file_record(folder, path, state, store=keep))
            except FileNotFoundError:  # gone since the snapshot: no longer the job's to serve
                if new is not None and old is None:
                    continue
                raise CacheError(f"cannot record {path!r} of {folder}: it vanished") from None
            except (OSError, ValueError, CacheError) as err:
                raise CacheError(f"cannot record {path!r} of {folder}: {err}") from err
        try:  # what a hit would refuse to serve is not recorded
            check_manifest(records, folder, serve_code=serve_code)
        except UnsafeManifestError as err:
            raise CacheError(f"not recorded: {err}") from None
        return records

    @staticmethod
    def _before_state(
        before: Snapshot, path: str, old: tuple[int, int, int, int, int] | None
    ) -> FileState | None:
        if old is None:
            return None
        mtime, size, ino, ctime, kind = old
        if kind == DIR:
            return FileState(kind="dir")
        if kind == LNK:
            return FileState(kind="symlink", target=before.targets.get(path, ""))
        then = SimpleNamespace(
            st_dev=before.dev, st_ino=ino, st_size=size, st_mtime_ns=mtime, st_ctime_ns=ctime
        )
        return FileState(kind="file", size=size, xxh3=known_digest(then) or "")  # type: ignore[arg-type]
