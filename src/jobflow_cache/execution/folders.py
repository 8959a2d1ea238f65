"""Which files of a run folder are a job's: the patterns left out when listing one.

:class:`Excludes` answers for two readers: recording lists a job's run folder before and
after it runs (:meth:`Excludes.of_run_folder`), and hashing describes a folder named in a
job's inputs by content (:meth:`Excludes.of_input`). Left out are the ``FILES_EXCLUDE``
setting's patterns, the files of live processes (SQLite journals, locks), the cache's own
files when its object area or store file lies inside the folder, and, for inputs, the files a
workflow manager writes into a run folder after the job's function returned.

Contract: the cache's own paths are resolved once per session, the patterns of a folder once
(up to 10,000 folders), so a fresh run folder costs no system call.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from jobflow_cache.files import LIVE_FILE_PATTERNS
from jobflow_cache.store import CacheStore

__all__ = ["MANAGER_OUTPUT_FILES", "Excludes"]

#: Files a workflow manager writes into a run folder after the job's function returned
#: (jobflow-remote's file JobStores of the job's outputs and of its additional stores): left out
#: of folders named in inputs.
MANAGER_OUTPUT_FILES = ("remote_job_data*.json", "additional_store_*.json")


class Excludes:
    """Exclude patterns per folder, for one cache store (see the module docstring).

    Examples
    --------
    >>> from maggma.stores import MemoryStore
    >>> tmp = getfixture("tmp_path")
    >>> store = CacheStore(MemoryStore(), objects_dir=str(tmp / "run" / "objects"))
    >>> excludes = Excludes(store, ["queue.out"])
    >>> [p for p in excludes.of_run_folder(str(tmp / "run")) if "*" not in p]
    ['queue.out', 'objects']
    """

    def __init__(self, store: CacheStore, patterns: Sequence[str]) -> None:
        self._store = store
        #: the FILES_EXCLUDE setting
        self.base = list(patterns)
        self._cache: dict[str, list[str]] = {}
        self._own_paths: list[tuple[str, str]] | None = None  # object area, store file

    def of_run_folder(self, cwd: str) -> list[str]:
        """Exclude patterns for the run folder ``cwd`` (a physical path, as ``os.getcwd()``
        gives it): the settings' plus the cache's own files when the object area or the
        store's file lies inside it."""
        patterns = self._cache.get(cwd)
        if patterns is None:
            if self._own_paths is None:  # resolved once: a fresh run folder costs no syscalls
                own = [(Path(self._store.objects_dir).resolve().as_posix(), "")]
                for path in self._store.backend.owned_paths():  # with -wal / -shm / -journal
                    own.append((Path(path).resolve().as_posix(), "*"))
                self._own_paths = own
            # files of live processes (SQLite journals, locks) are never a job's
            patterns = [*self.base, *LIVE_FILE_PATTERNS]
            prefix = cwd.rstrip("/") + "/"
            for path, suffix in self._own_paths:
                if path.startswith(prefix) and len(path) > len(prefix):
                    patterns = [*patterns, glob.escape(path[len(prefix) :]) + suffix]
            if len(self._cache) < 10_000:  # a run with create_folders: one per job
                self._cache[cwd] = patterns
        return patterns

    def of_input(self, path: str) -> tuple[str, ...]:
        """Patterns of files left out of a folder named in the inputs: those recording leaves
        out (a batch system's queue.out, the cache's own files), and the files a manager
        writes into a run folder after the job's function returned (jobflow-remote's JobStore
        file, which holds the run's uuids): no job reads them as its upstream's results."""
        try:
            patterns = self.of_run_folder(path)
        except Exception:  # its own paths could not be resolved: the settings' patterns
            patterns = self.base
        return (*patterns, *MANAGER_OUTPUT_FILES)
