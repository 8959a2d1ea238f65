"""What a session knows of the jobs that ran: which job uuid and run folder belong to which digest.

A job's inputs may name an upstream job (its uuid, which a rebuilt flow changes) or a file in
its run folder (atomate2's ``prev_dir``, which a rebuilt flow moves). Hashing replaces both by
the digest of the job they belong to (:meth:`Lineage.normalizer`), so a rebuilt flow hits.
:class:`Lineage` owns that knowledge:

* ``job_digests`` (job uuid -> digest) and ``dir_digests`` (run folder -> digest) of the jobs
  this session ran or served (:meth:`Lineage.register`); a folder where jobs of two uuids ran
  is shared, and no job's own;
* the *exact set* the hashing hook is asked about without a marker (known uuids, and the names
  met in run folders);
* where the store is consulted (outside ``run_locally``, with EXCLUSIVE_DIRS, or when the role
  says so): uuids and folders of jobs that ran in other processes are looked up among the
  store's aliases, and this session's are recorded there.

Contract: a lookup that fails never fails a job (the uuid or path is hashed as it is, a miss);
a folder unknown to the store is asked about once per call (:attr:`.Refs.unowned`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from jobflow import Job

from jobflow_cache.codec import UUID_RE
from jobflow_cache.execution.call import Refs
from jobflow_cache.execution.claims import Coordinator
from jobflow_cache.execution.folders import Excludes
from jobflow_cache.hashing import contents
from jobflow_cache.hashing.canonical import Normalizer

__all__ = ["Lineage"]

logger = logging.getLogger(__name__)

#: Strings the normaliser's exact set holds at most before the folder names in it are forgotten.
_MAX_EXACT = 1_000_000

#: Strings naming the run folder itself and its parent: no listing holds them, and a job given
#: "." that lists it must miss when a file was added there (hashed as a tree, like "./")
_FOLDER_ITSELF = frozenset({".", ".."})


class Lineage:
    """Job uuids and run folders of one session, by digest (see the module docstring).

    Parameters
    ----------
    coordinator
        The store's claims and aliases (None when the store has none).
    in_store
        Whether uuids and folders are looked up in (and recorded to) the store now.
    excludes
        The patterns left out of folders named in inputs.
    contents_db
        The database of file contents hashing uses (:mod:`.contents`).
    """

    def __init__(
        self,
        *,
        coordinator: Callable[[], Coordinator | None],
        in_store: Callable[[], bool],
        excludes: Excludes,
        contents_db: Any,
    ) -> None:
        self._coordinator = coordinator
        self._in_store = in_store
        self._excludes = excludes
        self.contents_db = contents_db
        self.job_digests: dict[str, str] = {}  # job uuid -> digest (last index wins)
        self.dir_digests: dict[str, str] = {}  # run folder of a job -> digest
        self._dir_jobs: dict[str, str] = {}  # run folder -> uuid of the job that ran there
        self._shared_folders: set[str] = set()  # run folders where several jobs ran
        # strings the normaliser is asked about without a marker: known job uuids (kept in
        # step with job_digests, see know_job) and the names met in run folders
        self._exact: set[str] = set()
        self._exact_jobs = 0
        self._names_known: frozenset[str] = frozenset()

    # -- hashing ----------------------------------------------------------------------------
    def normalizer(self, refs: Refs) -> Normalizer:
        """The string hook of one call's hashing (cwd: the job's run folder).

        * a known job's uuid becomes ``("job", digest)``;
        * a string naming an existing file or folder (absolute, or relative to the run
          folder) counts by content (:mod:`.contents`): inside the run folder of a known job
          that is not this job's folder (prev_dir), ``("dir", [owner digest, relative path,
          content])``, without the folder's own path, so a rebuilt flow with new folders hits
          and a hit rewrites the old folder to the new one; elsewhere ``(kind, [the string,
          content])``, the path as written kept (the job may return it);
        * a path inside a known job's folder that does not exist here (a folder on another
          host) becomes ``("dir", [owner digest, relative path, ["missing"]])``.
        """
        job_digests = self.job_digests
        stored = self._in_store()
        exact = self._exact
        if len(job_digests) != self._exact_jobs:  # someone filled job_digests directly
            exact.update(job_digests)
            self._exact_jobs = len(job_digests)
        contents.use_database(self.contents_db)
        try:
            cwd = os.getcwd()
            names = contents.folder_names(cwd)
        except OSError:  # no run folder to speak of: only absolute paths count
            cwd, names = "", frozenset()
        if names and names is not self._names_known and not names <= exact:
            if len(exact) > _MAX_EXACT:  # a very long run: forget the folder names met
                exact.clear()
                exact.update(job_digests)
            exact.update(names)
        self._names_known = names  # the same listing again (cached): nothing to add
        exact.update(_FOLDER_ITSELF)  # "." and "..": a job may list its own folder or parent

        def normalize(value: str) -> tuple[str, Any] | None:
            if len(value) == 36:
                digest = job_digests.get(value)
                if digest is None and stored and UUID_RE.fullmatch(value):
                    digest = self._stored_job_digest(value, refs.unowned)
                    if digest is not None:
                        self.know_job(value, digest)
                if digest is not None:
                    refs.refer(value, digest, folder=False)
                    return ("job", digest)
            if "/" in value or value in names or value in _FOLDER_ITSELF:
                return self._normalize_path(value, cwd, refs, stored)
            return None

        # hashing calls normalize only for the strings in `exact` (the live set) or holding a
        # marker: any path holds a "/" or is a name in the run folder
        markers: tuple[str, ...] = ("/",)
        if stored:  # any uuid may be an upstream job's that ran in another process
            markers = (*markers, "-")
        return Normalizer(normalize, exact=exact, markers=markers)

    def _normalize_path(
        self, value: str, cwd: str, refs: Refs, stored: bool
    ) -> tuple[str, Any] | None:
        """See :meth:`normalizer`; None for a string that names nothing here."""
        host, sep, rest = value.partition(":")
        remote = bool(sep) and rest.startswith("/") and "/" not in host  # "host:/path"
        path = rest if remote else value
        if path.strip("/") == "":  # "/" names the whole machine: a separator, no input
            return None
        if path.startswith("/"):
            absolute = os.path.normpath(path)
        elif cwd:
            absolute = os.path.normpath(os.path.join(cwd, path))
        else:
            return None
        owned = self._folder_owner(absolute, cwd, refs, stored)
        node = contents.describe(absolute, self._excludes.of_input(absolute))
        if owned is None and node is not None and self.dir_digests:
            # a known folder reached through a symlink (/scratch -> /lustre/scratch)
            real = os.path.realpath(absolute)
            if real != absolute:
                owned = self._folder_owner(real, cwd, refs, stored)
        if owned is not None:
            folder, owner, tail = owned
            refs.refer(folder, owner, folder=True)
            return ("dir", [owner, tail, node if node is not None else ["missing"]])
        if node is None:
            return None
        return (node[0], [value, *node[1:]])

    def _folder_owner(
        self, path: str, cwd: str, refs: Refs, stored: bool
    ) -> tuple[str, str, str] | None:
        """(folder, digest, rest) of the known job whose run folder holds the absolute,
        normalised ``path``: a folder where exactly that job ran, which is neither this job's
        run folder nor one holding it (a shared folder is no job's own)."""
        dir_digests = self.dir_digests
        found: tuple[str, str, str] | None = None
        if dir_digests:
            candidate, rest = path, ""
            while candidate and candidate != "/":
                owner = dir_digests.get(candidate)
                if owner is not None:
                    found = (candidate, owner, rest)
                    break
                candidate, _, tail = candidate.rpartition("/")
                rest = f"{tail}/{rest}" if rest else tail
        if found is None and stored:  # a folder of a job that ran in another process
            found = self._stored_folder_owner(path, refs.unowned)
        if found is None:
            return None
        folder = found[0]
        if folder in self._shared_folders or cwd == folder or cwd.startswith(folder + "/"):
            return None
        return found

    # -- what ran where ---------------------------------------------------------------------
    def know_job(self, job_uuid: str, digest: str) -> None:
        """Record that ``job_uuid`` is a job of ``digest`` (job_digests and the exact set)."""
        job_digests = self.job_digests
        in_step = self._exact_jobs == len(job_digests)
        new = job_uuid not in job_digests
        job_digests[job_uuid] = digest
        self._exact.add(job_uuid)
        if in_step and new:
            self._exact_jobs += 1

    def register(self, job: Job, digest: str, *, write: bool = True) -> None:
        """Remember that ``job`` (its uuid and its run folder, the cwd) is a job of ``digest``.

        A folder where jobs of two uuids ran is shared (the default ``run_locally``, FireWorks'
        singleshot): paths in it are hashed as they are written, never as a job's folder.
        Outside ``run_locally`` (or with EXCLUSIVE_DIRS) the uuid and the folder are also
        recorded in the store, for jobs that run in other processes (prev_dir); not with
        ``write`` False (read_only).
        """
        self.know_job(job.uuid, digest)
        aliases: dict[str, str] = {}
        try:
            cwd = os.getcwd()
        except OSError:  # the run folder is gone: nothing to know of it
            cwd = ""
        if cwd:
            ran_here = self._dir_jobs.get(cwd)
            if ran_here is not None and ran_here != job.uuid:
                self._shared_folders.add(cwd)
            elif cwd not in self._shared_folders:
                self._dir_jobs[cwd] = job.uuid
                self.dir_digests[cwd] = digest
        if write and self._in_store():  # read_only: nothing in the store
            aliases[job.uuid] = digest
            if cwd:  # for workers in other processes (prev_dir in their inputs)
                aliases[cwd] = digest
        if aliases:
            claims = self._coordinator()
            if claims is not None:
                try:
                    claims.set_aliases(aliases)
                except Exception as err:  # a later job just misses: never fail this one
                    logger.warning("could not record job %s in the cache: %s", job.uuid, err)

    def _stored_job_digest(self, job_uuid: str, unknown: set[str]) -> str | None:
        """Digest of the job ``job_uuid`` as recorded by the process that ran it, if any."""
        if job_uuid in unknown:
            return None
        claims = self._coordinator()
        if claims is not None:
            try:
                digest = claims.get_aliases([job_uuid]).get(job_uuid)
            except Exception as err:  # unknown: the uuid is hashed as it is (a miss)
                logger.warning("could not look up job %s in the cache: %s", job_uuid, err)
            else:
                if digest is not None:
                    self.job_digests[job_uuid] = digest
                    return digest
        unknown.add(job_uuid)
        return None

    def _stored_folder_owner(self, path: str, unowned: set[str]) -> tuple[str, str, str] | None:
        """(folder, digest, rest) when the store knows the job whose folder holds ``path``.

        Not remembered across calls when unknown: another worker may record it any time.
        """
        path = path.rstrip("/")
        if not path.startswith("/") or path in unowned:
            return None
        claims = self._coordinator()
        if claims is None:
            return None
        prefixes = []
        candidate = path
        while candidate.count("/") > 1:  # never "/" or a top-level folder
            prefixes.append(candidate)
            candidate = candidate.rpartition("/")[0]
        try:
            known = claims.get_aliases(prefixes) if prefixes else {}
        except Exception as err:  # unknown owner: the path is hashed as it is (a miss)
            logger.warning("could not look up run folders in the cache: %s", err)
            return None
        for folder in prefixes:  # the longest first
            owner = known.get(folder)
            if owner is not None:
                self.dir_digests[folder] = owner
                return folder, owner, path[len(folder) + 1 :]
        unowned.add(path)
        return None
