"""The one interception core, :class:`Cache` (the drop-in ``run_locally`` is in :mod:`.local`).

jobflow's ``Job.run`` resolves a job's references, sets ``CURRENT_JOB``, enters the run folder and
then calls ``getattr(job.function, "original", job.function)(*args, **kwargs)``. That call is the
only place we intercept: :meth:`Cache.call` computes the digest of the *resolved* call, serves a
cached :obj:`~jobflow.Response` on a hit (with its run-folder files linked back), or runs the
function and records its result on a miss. Everything after the call (output stored in the
JobStore and its additional stores, ``Response`` handling, ``prepare_replace``) is jobflow's own.

While a cache is activated (inside ``run_locally``), new entries and hit counts are written
behind, in batches (:class:`.WriteBehind`): a crash or ``SIGKILL`` loses at most the entries of
the last ~0.1 s, never a part of one, and never leaves an entry whose files are missing (files
are stored before the entry is queued). Everything is written before the run returns or raises.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import glob
import json
import logging
import os
import socket
import threading
import time
import types
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import bson
from jobflow import Flow, Job, OutputReference, Response
from jobflow.utils.uid import suid
from maggma.stores import MemoryStore
from monty.json import jsanitize

from jobflow_cache import codeversion, contents
from jobflow_cache.codec import (
    UUID_RE,
    DirRewrite,
    created_uuids,
    dumps,
    job_uuids,
    loads,
    rewrite_text,
)
from jobflow_cache.entry import CacheEntry, package_versions
from jobflow_cache.errors import (
    CacheError,
    FilesUnavailableError,
    FolderConflictError,
    SettingsError,
    StoreUnavailableError,
    UnhashableInputError,
    trim_traceback,
    warn,
)
from jobflow_cache.files import LIVE_FILE_PATTERNS, ObjectArea, PlaceMode, prehash, snapshot
from jobflow_cache.hashing import (
    SCHEME,
    CallDigest,
    Normalizer,
    bind_arguments,
    digest_call,
    digest_value,
    function_path,
)
from jobflow_cache.settings import CacheSettings, cache_disabled, get_settings
from jobflow_cache.shared import Coordinator, Heartbeat, coordinator_of
from jobflow_cache.store import CacheStore, Lookup, Outcome, WriteBehind

__all__ = [
    "META_KEY",
    "Cache",
    "CacheReport",
    "JobOptions",
    "current_cache",
    "job_options",
]

logger = logging.getLogger(__name__)
#: Hits and recordings are reported on a child of jobflow's logger, so they show wherever
#: jobflow's own "Starting job" lines do (``run_locally(log=True)``), in the same format.
progress = logging.getLogger("jobflow.cache")

#: Key of ``Job.metadata`` used both for per-job options set by users (``enabled``,
#: ``cache_version``, ``ignore``, ``files``) and for the record we write (``digest``, ``outcome``,
#: ``source_uuid``, ``scheme``), which is stored with the job's output in the JobStore.
META_KEY = "jobflow_cache"
OPTION_KEYS = (
    "enabled",
    "cache_version",
    "ignore",
    "files",
    "env",
    "cache_exposed_store",
    "mode",
)

#: Why a job with ``expose_store=True`` ran uncached (``metadata["jobflow_cache"]["reason"]``).
EXPOSED_STORE_REASON = (
    "the job reads the JobStore (expose_store=True), which its digest does not cover; "
    "set metadata['jobflow_cache']['cache_exposed_store'] = True to cache it anyway"
)

#: The cache modes (settings ``MODE`` and the ``mode`` option), and why a job of the last two
#: ran (its ``metadata["jobflow_cache"]["reason"]``)
_MODES = ("readwrite", "read_only", "refresh")
READ_ONLY_REASON = "read_only: not in the cache, and not recorded"
REFRESH_REASON = "refresh: recomputed, its entry replaced"

#: Functions never cached: jobflow's helper that only gathers a replaced flow's outputs (its
#: arguments are unresolved references, and it is instantaneous).
SKIP_FUNCTIONS = frozenset({"jobflow.core.job:store_inputs"})
_SKIP_QUALNAMES = frozenset(path.rpartition(":")[2] for path in SKIP_FUNCTIONS)  # cheap pre-check

FilesMode = Literal["link", "copy", "none"]
#: How a job uses the cache (issue 13): serve and record; serve, never write; never serve,
#: recompute and replace the entry (the ``MODE`` setting, or a job's own ``mode`` option)
CacheMode = Literal["readwrite", "read_only", "refresh"]

#: Files a workflow manager writes into a run folder after the job's function returned
#: (jobflow-remote's file JobStores of the job's outputs and of its additional stores): left out
#: of folders named in inputs.
_MANAGER_OUTPUT_FILES = ("remote_job_data*.json", "additional_store_*.json")

#: Strings the normaliser's exact set holds at most before the folder names in it are forgotten.
_MAX_EXACT = 1_000_000

#: Files in a run folder from which on a recorded job warns (once per folder) that listing the
#: folder before and after every job costs time (~10 ms per 1,000 files on a slow disk).
LARGE_FOLDER = 2_000

_ACTIVE: contextvars.ContextVar[Cache | None] = contextvars.ContextVar(
    "jobflow_cache_active", default=None
)

#: What the manager running the current job knows of its run folders: True when every job has
#: a folder of its own (``run_locally(create_folders=True)``), False when they share one; None
#: outside ``run_locally``. It wins over ``Cache(exclusive_dirs=)`` and EXCLUSIVE_DIRS, and
#: lasts one run only: the :class:`Cache` object given to ``run_locally`` is never changed.
RUN_FOLDERS: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "jobflow_cache_run_folders", default=None
)
#: ``run_locally(files=)`` of the run of the current job (None: the cache's own ``files``).
RUN_FILES: contextvars.ContextVar[FilesMode | None] = contextvars.ContextVar(
    "jobflow_cache_run_files", default=None
)


@dataclass(frozen=True)
class JobOptions:
    """Per-job cache options (from ``@cached_job(...)`` or ``metadata["jobflow_cache"]``)."""

    enabled: bool = True
    cache_version: str | None = None
    ignore: tuple[str, ...] = ()
    files: FilesMode | None = None
    #: names of environment variables whose values enter the digest (see codeversion)
    env: tuple[str, ...] = ()
    #: cache a job with ``expose_store=True`` too (it reads the JobStore, which is not hashed:
    #: the user vouches that its result depends on its inputs only)
    cache_exposed_store: bool = False
    #: ``"readwrite"``, ``"read_only"`` or ``"refresh"``; None: the ``MODE`` setting
    mode: CacheMode | None = None

    def merged(self, overrides: Mapping[str, Any]) -> JobOptions:
        """These options updated by the option keys of ``overrides`` (metadata wins)."""
        values = {k: overrides[k] for k in OPTION_KEYS if k in overrides}
        if "ignore" in values:
            values["ignore"] = tuple(values["ignore"] or ())
        if "env" in values:
            values["env"] = codeversion.env_names(values["env"])
        if "cache_version" in values and values["cache_version"] is not None:
            values["cache_version"] = str(values["cache_version"])
        return JobOptions(**{**self.__dict__, **values}) if values else self


def job_options(job: Job, base: JobOptions | None = None) -> JobOptions:
    """Options of ``job``: ``base`` (decorator) updated by ``job.metadata["jobflow_cache"]``.

    Examples
    --------
    >>> from jobflow import job
    >>> @job
    ... def add(a, b):
    ...     return a + b
    >>> j = add(1, 2)
    >>> j.update_metadata({"jobflow_cache": {"enabled": False}})
    >>> job_options(j).enabled
    False
    """
    meta = job.metadata.get(META_KEY) if job.metadata else None
    base = base or JobOptions()
    return base.merged(meta) if isinstance(meta, Mapping) else base


#: Misses whose digests a :class:`CacheReport` keeps (the summary explains the first few).
KEPT_MISSES = 20

#: Why a job ran without the cache, by outcome (the summary's "uncached" reasons).
UNCACHED_REASONS = {
    "uncacheable": "input cannot be hashed",
    "error": "cache store unavailable",
    "disabled": "caching turned off for the job",
}


@dataclass
class CacheReport:
    """What one cache session did: outcome counts, executed and served jobs, time saved.

    ``run_locally`` also fills ``failed`` (the job raised), ``not_run`` (skipped: a parent
    failed or stopped the flow) and, when the whole run had no cache, ``off`` (why); its
    summary is logged on the ``jobflow.cache`` logger at the end of a run (``log=True``).
    """

    outcomes: Counter[str] = field(default_factory=Counter)
    served: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    time_saved: float = 0.0
    failed: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    #: ``(job name, digest)`` of the first :data:`KEPT_MISSES` misses
    misses: list[tuple[str, str]] = field(default_factory=list)
    #: why no job of the run used the cache (disabled, unusable store, bad setting), if so
    off: str | None = None

    @property
    def hits(self) -> int:
        """Number of jobs served from the cache."""
        return self.outcomes[Outcome.HIT.value]

    def uncached(self) -> dict[str, int]:
        """Jobs that ran without the cache, by reason."""
        return {
            reason: self.outcomes[outcome]
            for outcome, reason in UNCACHED_REASONS.items()
            if self.outcomes[outcome] and not (outcome == "error" and self.off)
        }

    def summary(self) -> str:
        """What happened, e.g. ``"3 jobs: 2 served from cache, 1 executed; 4.1 s of compute
        saved"``; failed, not run and uncached jobs and a cache that was off are named too.

        Examples
        --------
        >>> report = CacheReport()
        >>> report.served.append("relax")
        >>> report.summary()
        '1 job: 1 served from cache, 0 executed; 0.0 s of compute saved'
        >>> report = CacheReport(executed=["a", "b"], failed=["b"], not_run=["c"])
        >>> report.outcomes["uncacheable"] += 1
        >>> print(report.summary().replace("; ", ";\\n"))
        3 jobs: 0 served from cache, 2 executed (1 failed), 1 not run;
        0.0 s of compute saved;
        1 ran uncached (input cannot be hashed)
        """
        total = len(self.served) + len(self.executed) + len(self.not_run)
        executed = f"{len(self.executed)} executed"
        if self.failed:
            executed += f" ({len(self.failed)} failed)"
        parts = [f"{len(self.served)} served from cache", executed]
        if self.not_run:
            parts.append(f"{len(self.not_run)} not run")
        text = f"{total} job{'' if total == 1 else 's'}: {', '.join(parts)}"
        if self.off is not None:
            return f"{text}; cache off: {self.off}"
        text += f"; {self.time_saved:.1f} s of compute saved"
        uncached = self.uncached()
        if uncached:
            reasons = ", ".join(
                f"{n} {reason}" if len(uncached) > 1 else reason for reason, n in uncached.items()
            )
            text += f"; {sum(uncached.values())} ran uncached ({reasons})"
        return text


@dataclass
class _Refs:
    """Job uuids and run folders seen while hashing one call.

    ``seen`` maps each literal (a uuid, or the absolute run folder of a known job) to a key:
    the digest of its owner job for the first literal of that digest (of that kind: uuid or
    folder), ``"<digest>:<n>"`` for the n-th distinct one. Twin upstream jobs (same digest)
    thus keep keys of their own, in the order hashing meets them, which is the order of the
    inputs: a hit maps the recorded twins onto this call's twins one to one (the keys are
    stored in ``CacheEntry.input_refs``; no store's key order matters).
    """

    seen: dict[str, str] = field(default_factory=dict)
    #: absolute paths the store knows no owner folder of (asked once per call)
    unowned: set[str] = field(default_factory=set)
    #: digests of the entries whose results this job consumed: upstream jobs named by uuid,
    #: and jobs whose run folders (or files in them) the inputs name
    consumed: set[str] = field(default_factory=set)
    #: (kind, digest) -> distinct literals met so far
    _twins: dict[tuple[bool, str], int] = field(default_factory=dict)

    def refer(self, literal: str, digest: str, *, folder: bool) -> None:
        """Note that ``literal`` (a job uuid, or with ``folder`` a run folder) belongs to
        the job of ``digest``."""
        if literal in self.seen:
            return
        kind = (folder, digest)
        n = self._twins.get(kind, 0) + 1
        self._twins[kind] = n
        self.seen[literal] = digest if n == 1 else f"{digest}:{n}"
        self.consumed.add(digest)


class Cache:
    """A cache session: a :class:`.CacheStore`, its file object area, settings, and what this
    process has learnt (which job uuid / run folder belongs to which digest).

    Parameters
    ----------
    store
        The cache store (default: the one configured by ``JOBFLOW_CACHE_*`` settings).
    files
        ``"link"``, ``"copy"`` or ``"none"``: how run-folder files are recorded and restored
        (default: ``JOBFLOW_CACHE_FILES``, ``"link"``).
    exclusive_dirs
        True when every job runs in a folder of its own (``run_locally(create_folders=True)``,
        FireWorks, jobflow-remote); only then are run-folder paths in inputs normalised to the
        digest of the job that owns the folder. ``JOBFLOW_CACHE_EXCLUSIVE_DIRS`` turns it on
        and also records each run folder in the store, for workers in other processes.
    settings
        Settings to use (default: from the environment).
    """

    def __init__(
        self,
        store: CacheStore | None = None,
        *,
        files: FilesMode | None = None,
        exclusive_dirs: bool = False,
        settings: CacheSettings | None = None,
    ) -> None:
        self._spec_error: CacheError | None = None
        if settings is None:
            try:
                settings = get_settings()
            except SettingsError as err:  # a bad setting never fails a workflow: cache off
                settings = CacheSettings.model_construct()
                self._spec_error = err
                store = store or CacheStore(MemoryStore(collection_name="unusable"), "")
        self.settings = settings
        if store is None:
            try:
                store = CacheStore.from_settings(self.settings)
            except CacheError as err:  # a bad or unbuildable spec: every job runs uncached
                self._spec_error = err
                store = CacheStore(
                    MemoryStore(collection_name="unusable"), self.settings.objects_dir()
                )
        self.store = store
        self._files: FilesMode = files or self.settings.FILES
        # folders recorded in the store (and looked up there) only when the user says every job
        # of every worker has a folder of its own; run_locally(create_folders) knows it of its run
        self._shared_dirs = self.settings.EXCLUSIVE_DIRS
        self._exclusive_dirs = exclusive_dirs or self._shared_dirs
        self.dedup = self.settings.DEDUP
        self.objects = ObjectArea(
            self.store.objects_dir,
            verify_limit=self.settings.VERIFY_FILES_LIMIT,
            serve_code=self.settings.SERVE_CODE_FILES,
        )
        self.report = CacheReport()
        self.job_digests: dict[str, str] = {}  # job uuid -> digest (last index wins)
        self.dir_digests: dict[str, str] = {}  # run folder of a job -> digest
        self._dir_jobs: dict[str, str] = {}  # run folder -> uuid of the job that ran there
        self._shared_folders: set[str] = set()  # run folders where several jobs ran
        # strings the normaliser is asked about without a marker: known job uuids (kept in
        # step with job_digests, see _know_job) and the names met in run folders
        self._exact: set[str] = set()
        self._exact_jobs = 0
        self._names_known: frozenset[str] = frozenset()
        # absolute now: a relative cache folder must not be found again in each job's folder
        self._contents_db = contents.default_database(
            os.path.abspath(os.path.expanduser(self.settings.DIR))
        )
        self._connected = False
        self._broken: str | None = None
        self._full_warned = False  # a full file system is warned about once per run
        self._exclude_cache: dict[str, list[str]] = {}
        self._base_excludes = list(self.settings.FILES_EXCLUDE)
        self._own_paths: list[tuple[str, str]] | None = None  # object area, SQLite file
        self._large_folders: set[str] = set()
        # job uuid -> why its hit could not be served into its folder (a miss, see _serve_hit)
        self._conflicts: dict[str, str] = {}
        self._coordinator: Coordinator | None = None
        self._coordination_checked = False
        self._token = uuid.uuid4().hex[:8]
        # while activated (a run): new entries and hit counts are written behind, in batches
        self._lock = threading.Lock()
        self._active = 0
        self._writer: WriteBehind | None = None

    @property
    def files(self) -> FilesMode:
        """How run-folder files are recorded and restored: the running ``run_locally``'s
        ``files=`` (:data:`RUN_FILES`), else this cache's."""
        return RUN_FILES.get() or self._files

    @files.setter
    def files(self, value: FilesMode) -> None:
        self._files = value

    @property
    def exclusive_dirs(self) -> bool:
        """Whether the current job's run folder is its own: what the running manager knows
        (:data:`RUN_FOLDERS`, set by ``run_locally`` for one run), else the value this cache
        was made with (or EXCLUSIVE_DIRS)."""
        known = RUN_FOLDERS.get()
        return self._exclusive_dirs if known is None else known

    @exclusive_dirs.setter
    def exclusive_dirs(self, value: bool) -> None:
        self._exclusive_dirs = bool(value)

    @property
    def shared_dirs(self) -> bool:
        """Whether run folders are recorded in the store and looked up there
        (EXCLUSIVE_DIRS), unless the running manager knows its jobs share a folder."""
        return self._shared_dirs and RUN_FOLDERS.get() is not False

    @shared_dirs.setter
    def shared_dirs(self, value: bool) -> None:
        self._shared_dirs = bool(value)

    # -- lifecycle --------------------------------------------------------------------------
    def connect(self) -> bool:
        """Connect the store once; on failure warn once and run everything uncached."""
        if self._connected or self._broken:
            return self._connected
        try:
            if self._spec_error is not None:
                raise self._spec_error
            self.store.connect()
        except Exception as err:  # any failure: the workflow must still run
            self._fail(err)
            return False
        self._connected = True
        return True

    def _store_file_absent(self) -> bool:
        """True when the store is an embedded SQLite store whose file does not exist."""
        from jobflow_cache.sqlite_store import SQLiteStore  # layer 2: only asked here

        inner = self.store.store
        return isinstance(inner, SQLiteStore) and not os.path.exists(inner.path)

    def close(self) -> None:
        """Write what is still queued, then close the store."""
        self._stop_writer()
        if self._connected:
            self.store.close()
            self._connected = False

    def _fail(self, err: BaseException) -> None:
        if self._broken is None and self._full_warned and _disk_full(err):
            # the store's file system filled up: its one warning of this run was given
            self._broken = str(err)
            self.report.off = f"store {self.store.name} is unavailable (file system full)"
            logger.warning("the cache store is unavailable for this run: %s", err)
            return
        if self._broken is None:
            self._broken = str(err)
            if isinstance(err, SettingsError):
                which = f"is off: {err}"
            elif self._spec_error is not None:
                which = f"store configured by JOBFLOW_CACHE_STORE cannot be built ({err})"
            else:
                # one line: pymongo appends its whole topology to a server selection timeout
                reason = str(err).strip().split("\n")[0].split(", Topology Description")[0]
                which = f"store {self.store.name} is unavailable ({reason})"
            self.report.off = which
            warn(
                f"jobflow-cache: the cache {which}; jobs run uncached for the rest of this run",
                stacklevel=4,
            )

    @contextmanager
    def activate(self) -> Iterator[Cache]:
        """Make this the cache used by ``@cached_job`` jobs run inside the ``with`` block.

        Inside the block, new entries and hit counts are written behind, in batches (see
        :class:`.WriteBehind`); everything is written before the block is left, also when it
        raises.
        """
        token = _ACTIVE.set(self)
        with self._lock:
            self._active += 1
        failed = False
        try:
            yield self
        except BaseException:
            failed = True
            raise
        finally:
            _ACTIVE.reset(token)
            self._end_run(quiet=failed)

    def _end_run(self, quiet: bool) -> None:
        """Leave an activated block: write the queue, and stop the writer with the last run.

        With ``quiet`` (the block raised), entries that could not be written are logged, not
        warned about: a warning turned into an error must not hide the run's own exception.
        """
        with self._lock:
            self._active -= 1
            last = self._active == 0
            writer = self._writer
            if last:
                self._writer = None
        try:
            if writer is None:
                return
            if last:
                writer.close()
            else:
                writer.flush()
            self._report_errors_of(writer, quiet=quiet)
        finally:
            if last:  # the next run warns again about a file system still full
                self._full_warned = False

    def flush(self) -> None:
        """Write the entries and hit counts still queued (a no-op when none are)."""
        if self._writer is not None:
            self._writer.flush()
        self._report_write_errors()

    def _stop_writer(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            self._report_errors_of(writer)

    def _report_write_errors(self) -> None:
        if self._writer is not None:
            self._report_errors_of(self._writer)

    def _report_errors_of(self, writer: WriteBehind, quiet: bool = False) -> None:
        """One line for the entries ``writer`` could not write since the last report: a
        warning, unless the store is already known to be unavailable (its warning was given:
        a store that broke mid-run warns once) or ``quiet``."""
        errors = writer.take_errors()
        if not errors:
            return
        lost = [digest for digests, _ in errors for digest in digests]
        last = errors[-1][1]
        message = (
            f"jobflow-cache: {len(lost)} job result(s) were not cached "
            f"({', '.join(d[:12] for d in lost[:3])}{', ...' if len(lost) > 3 else ''}): {last}"
        )
        if not quiet and self._broken is None and isinstance(last, StoreUnavailableError):
            self._fail(last)  # the one warning of a store that broke: later jobs run uncached
            quiet = True
        if quiet or self._broken is not None:
            logger.warning(message)
        else:
            warn(message, stacklevel=4)

    def accepting(self, job: Job) -> _Accepting:
        """Around jobflow's ``Job.run(store)`` of ``job`` (``run_locally`` does this): the
        entry of a job that runs inside is written only when the block ends without an error,
        that is once jobflow has accepted the output and stored it in the JobStore. An output
        the JobStore refuses (an int over 64 bits in a MongoDB or ``MemoryStore``) fails the
        job there, and then nothing is recorded. With DEDUP, the claim on the digest is let
        go after the entry is written (or dropped).
        """
        return _Accepting(self, job)

    # -- reading and writing the store ------------------------------------------------------
    def _lookup(self, digest: str) -> Lookup:
        writer = self._writer
        if writer is not None:
            queued = writer.pending(digest)
            if queued is not None:  # made by this process, not yet written: sound as it is
                return Lookup(Outcome.HIT, queued)
        return self.store.lookup(digest, serving=True)

    def _writer_of_run(self) -> WriteBehind | None:
        """The writer of the active run (made on first use), or None outside a run."""
        writer = self._writer
        if writer is None and self._active and WriteBehind.supports(self.store):
            with self._lock:
                if self._active and self._writer is None:
                    self._writer = WriteBehind(self.store)
                writer = self._writer
        return writer

    def _put(self, entry: CacheEntry) -> None:
        writer = self._writer_of_run()
        if writer is not None:
            writer.put(entry)
        else:
            self.store.put(entry)

    def _record_hit(self, digest: str) -> None:
        writer = self._writer_of_run()
        if writer is not None:
            writer.hit(digest)
        else:
            self.store.record_hit(digest)

    # -- hashing ----------------------------------------------------------------------------
    def _normalizer(self, refs: _Refs) -> Normalizer:
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
        stored = self._lineage_in_store()
        exact = self._exact
        if len(job_digests) != self._exact_jobs:  # someone filled job_digests directly
            exact.update(job_digests)
            self._exact_jobs = len(job_digests)
        contents.use_database(self._contents_db)
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
                        self._know_job(value, digest)
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
        self, value: str, cwd: str, refs: _Refs, stored: bool
    ) -> tuple[str, Any] | None:
        """See :meth:`_normalizer`; None for a string that names nothing here."""
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
        node = contents.describe(absolute, self._input_excludes(absolute))
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
        self, path: str, cwd: str, refs: _Refs, stored: bool
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

    def _input_excludes(self, path: str) -> tuple[str, ...]:
        """Patterns of files left out of a folder named in the inputs: those recording leaves
        out (a batch system's queue.out, the cache's own files), and the files a manager
        writes into a run folder after the job's function returned (jobflow-remote's JobStore
        file, which holds the run's uuids): no job reads them as its upstream's results."""
        try:
            patterns = self._excludes(path)
        except Exception:  # its own paths could not be resolved: the settings' patterns
            patterns = self._base_excludes
        return (*patterns, *_MANAGER_OUTPUT_FILES)

    def _know_job(self, job_uuid: str, digest: str) -> None:
        """Record that ``job_uuid`` is a job of ``digest`` (job_digests and the exact set)."""
        job_digests = self.job_digests
        in_step = self._exact_jobs == len(job_digests)
        new = job_uuid not in job_digests
        job_digests[job_uuid] = digest
        self._exact.add(job_uuid)
        if in_step and new:
            self._exact_jobs += 1

    def digest(
        self,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: JobOptions = JobOptions(),
        refs: _Refs | None = None,
    ) -> CallDigest:
        """Digest of calling the (unbound) ``function`` with resolved ``args``/``kwargs``.

        For a method, ``args[0]`` is the instance (e.g. the Maker), whose fields are hashed.
        """
        refs = refs if refs is not None else _Refs()
        path = function_path(function)
        try:
            arguments = bind_arguments(function, args, kwargs, ignore=options.ignore)
        except TypeError as err:
            raise _CallMismatchError(str(err)) from err
        # user code (not installed packages) counts by its source, see jobflow_cache.codeversion
        instance = codeversion.instance_type(function, args)
        code = codeversion.job_code(function, instance, versioned=options.cache_version is not None)
        env = codeversion.env_part(
            codeversion.env_names(options.env, getattr(self.settings, "DIGEST_ENV", None))
        )
        normalize: Normalizer | None
        if _holds_no_str(arguments.values()):
            # no str for the hook to see (the same digest without it): no folder listing for
            # bare names, no path, no uuid
            contents.use_database(self._contents_db)
            normalize = None
        else:
            normalize = self._normalizer(refs)
        # dict keys never reach the hashing hook: keys naming files, folders or upstream jobs
        # ({"/data/POTCAR": "potcar"}) count through the slot, by what the hook makes of them
        keys = _str_keys(arguments.values())
        if keys and normalize is None:
            normalize = self._normalizer(refs)
        keyed = _keyed(keys, normalize)
        version = _with_keys(
            codeversion.cache_version_slot(options.cache_version, code, env=env), keyed
        )
        call = digest_call(path, arguments, cache_version=version, normalize_str=normalize)
        named = codeversion.argument_code(call.encodings, call.arg_digests, instance)
        if named is not None:  # user functions or classes in the arguments: their code too
            version = _with_keys(
                codeversion.cache_version_slot(options.cache_version, code, named, env), keyed
            )
            call = digest_call(path, arguments, cache_version=version, normalize_str=normalize)
        return call

    # -- the interception core --------------------------------------------------------------
    def call(
        self,
        job: Job,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: JobOptions,
    ) -> Any:
        """Run ``function(*args, **kwargs)`` for ``job`` through the cache.

        ``function`` is the unbound job function; for a method ``args[0]`` is the instance.
        Called inside ``Job.run`` (cwd is the run folder). Returns either the function's return
        value wrapped in a :obj:`~jobflow.Response` (miss) or the cached Response (hit).
        Cache problems never fail the job: they warn and the job runs uncached.
        """
        if getattr(function, "__qualname__", "") in _SKIP_QUALNAMES and (
            _safe_path(function) in SKIP_FUNCTIONS
        ):
            # jobflow's own book-keeping job: transparent (its metadata dict is the parent's)
            return function(*args, **kwargs)
        options = job_options(job, options)
        if not options.enabled or cache_disabled():
            return self._uncached(job, function, args, kwargs, Outcome.DISABLED, options)
        mode = options.mode or getattr(self.settings, "MODE", "readwrite")
        if mode not in _MODES:  # a bad metadata["jobflow_cache"]["mode"]: never fail the job
            warn(
                f"jobflow-cache: job {job.name!r} runs uncached: its cache mode {mode!r} is not "
                f"one of {', '.join(_MODES)}",
                stacklevel=2,
            )
            return self._uncached(job, function, args, kwargs, Outcome.UNCACHEABLE, options)
        if mode == "read_only" and not self._connected and self._store_file_absent():
            # nothing to serve, and opening the embedded store would create it: the job runs
            self._executing(job, options, None, Outcome.MISS)
            if isinstance(job.metadata.get(META_KEY), dict):
                job.metadata[META_KEY]["reason"] = READ_ONLY_REASON
            return function(*args, **kwargs)
        if job.config.expose_store and not options.cache_exposed_store:
            # it reads the JobStore (CURRENT_JOB.store), which its digest cannot see
            logger.debug("%s reads the JobStore (expose_store=True): not cached", job.name)
            self._executing(job, options, None, Outcome.UNCACHEABLE)
            meta = job.metadata.get(META_KEY)
            if isinstance(meta, dict):
                meta["reason"] = EXPOSED_STORE_REASON
            return function(*args, **kwargs)
        if not self.connect():
            return self._uncached(job, function, args, kwargs, Outcome.ERROR, options)
        self._report_write_errors()
        refs = _Refs()
        try:
            call_digest = self.digest(function, args, kwargs, options, refs)
        except _CallMismatchError:
            # the arguments do not fit the signature: the call itself raises jobflow's error
            return function(*args, **kwargs)
        except Exception as err:  # unhashable input, or an object whose as_dict() fails
            reason = (
                "its input cannot be hashed"
                if isinstance(err, UnhashableInputError)
                else (f"hashing its input failed ({type(err).__name__})")
            )
            warn(
                f"jobflow-cache: job {job.name!r} ({_safe_path(function)}) runs uncached: "
                f"{reason}: {err}",
                stacklevel=2,
            )
            return self._uncached(job, function, args, kwargs, Outcome.UNCACHEABLE, options)

        digest = call_digest.digest
        if mode == "refresh":
            # never served: recomputed, and its entry replaces the one stored (no claim either:
            # a claim's waiter would be served the entry this job does not trust)
            self._conflicts[job.uuid] = REFRESH_REASON
            return self._run_and_record(
                job, function, args, kwargs, options, call_digest, refs, Outcome.MISS
            )
        write = mode != "read_only"  # read_only: serve hits, never write to the store
        try:
            found = self._lookup(digest)
        except Exception as err:  # the store failed in a way of its own: never fail the job
            self._fail(err)
            return self._uncached(job, function, args, kwargs, Outcome.ERROR, options)

        if found.outcome is Outcome.HIT and found.entry is not None:
            served = self._serve_hit(job, found.entry, refs, options, write=write)
            if served is not None:
                return served
            outcome = Outcome.MISS if job.uuid in self._conflicts else Outcome.INVALID
        elif found.outcome is Outcome.INVALID:
            warn(
                f"jobflow-cache: cached entry {digest[:12]} of job {job.name!r} is not used: "
                f"{found.reason}; running the job",
                stacklevel=2,
            )
            outcome = Outcome.INVALID
        else:
            outcome = Outcome.MISS
        run = functools.partial(
            self._run_and_record,
            job,
            function,
            args,
            kwargs,
            options,
            call_digest,
            refs,
            outcome,
            write=write,
        )
        if self.dedup and write:
            return self._run_claimed(job, call_digest.digest, refs, options, run)
        return run()

    def _serve_hit(
        self, job: Job, entry: CacheEntry, refs: _Refs, options: JobOptions, *, write: bool = True
    ) -> Response | None:
        """Serve ``entry`` to ``job``; None (with a warning) when it cannot be served."""
        digest = entry.digest
        try:
            response = self._serve(job, entry, refs, options)
        except FolderConflictError as err:  # not a cache problem: the job runs (a miss)
            self._conflicts[job.uuid] = str(err)
            progress.info(
                "Not served - %s (%s) <- %s: %s; running it", job.name, job.uuid, digest[:12], err
            )
            return None
        except Exception as err:  # whatever goes wrong, the job runs instead
            warn(
                f"jobflow-cache: cached entry {digest[:12]} of job {job.name!r} cannot be "
                f"served ({err}); running the job",
                stacklevel=3,
            )
            return None
        self._register(job, digest, write=write)
        self._mark(job, options, digest, Outcome.HIT, entry.source_uuid)
        self.report.outcomes[Outcome.HIT.value] += 1
        self.report.served.append(job.name)
        self.report.time_saved += entry.duration
        progress.info(
            "Served from cache - %s (%s) <- %s, %.1f s saved",
            job.name,
            job.uuid,
            digest[:12],
            entry.duration,
        )
        try:
            if write:  # read_only: not even a hit count
                self._record_hit(digest)
        except Exception as err:  # bookkeeping only: never fail a served job
            logger.warning("could not record hit of %s: %s", digest[:12], err)
        return response

    # -- in-flight deduplication (JOBFLOW_CACHE_DEDUP) --------------------------------------
    def _run_claimed(
        self, job: Job, digest: str, refs: _Refs, options: JobOptions, run: Callable[[], Any]
    ) -> Any:
        """Run the job (``run`` runs and records it) under a claim on its digest, or wait for
        the worker holding the claim and serve its result (see :mod:`.shared`)."""
        claims = self._coordination()
        owner = f"{_this_host()}:{os.getpid()}:{self._token}"
        if claims is not None:
            try:
                served = self._await_claim(job, claims, digest, owner, refs, options)
            except Exception as err:  # the store failed: compute without a claim
                logger.warning("could not claim %s (%s); running %s", digest[:12], err, job.name)
                claims = None
            else:
                if served is not None:
                    return served
        if claims is None:
            return run()

        def release() -> None:
            try:
                claims.release(digest, owner)
            except Exception as err:  # the lease runs out by itself
                logger.warning("could not release the claim on %s: %s", digest[:12], err)

        held = _HELD.get()
        try:
            with Heartbeat(claims, digest, owner, self.settings.LEASE):
                response = run()
        except BaseException:
            release()
            raise
        if held is not None:  # the entry is written once jobflow accepts the output: then
            held.after.append(release)  # the waiters are let go (see accepting)
        else:
            try:
                self.flush()  # the entry is in the store before the waiters are let go
            finally:
                release()
        return response

    def _await_claim(
        self,
        job: Job,
        claims: Coordinator,
        digest: str,
        owner: str,
        refs: _Refs,
        options: JobOptions,
    ) -> Response | None:
        """Claim ``digest`` (None: the caller computes it), or wait while another worker holds
        the claim and return its result once it is stored.

        The entry is looked up again right after a claim is taken: its owner may have stored
        it and let go between this worker's first lookup and its claim.
        """
        delay, waiting_since = 0.02, None
        while True:
            holder = claims.claim(digest, owner, self.settings.LEASE)
            if holder == owner:
                found = self.store.lookup(digest, serving=True)
                if found.outcome is Outcome.HIT and found.entry is not None:
                    claims.release(digest, owner)
                    return self._serve_hit(job, found.entry, refs, options)
                return None
            if waiting_since is None:
                waiting_since = time.monotonic()
                progress.info(
                    "Waiting - %s (%s): %s computes the same job (%s)",
                    job.name,
                    job.uuid,
                    holder,
                    digest[:12],
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0, self.settings.LEASE / 4)
            found = self.store.lookup(digest, serving=True)
            if found.outcome is Outcome.HIT and found.entry is not None:
                logger.debug(
                    "%s served after waiting %.2f s", job.name, time.monotonic() - waiting_since
                )
                return self._serve_hit(job, found.entry, refs, options)

    def _uncached(
        self,
        job: Job,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        outcome: Outcome,
        options: JobOptions,
    ) -> Any:
        # JOBFLOW_CACHE_DISABLE: jobflow's behaviour exactly, metadata untouched
        self._executing(job, options, None, outcome, mark=not cache_disabled())
        return function(*args, **kwargs)

    def _run_and_record(
        self,
        job: Job,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: JobOptions,
        call_digest: CallDigest,
        refs: _Refs,
        outcome: Outcome,
        *,
        write: bool = True,
    ) -> Any:
        """Run the job and record its entry (``write=False``, read_only: run it, record and
        register nothing in the store; a dynamic job's new jobs are still the decoded ones)."""
        files_mode = options.files or self.files
        cwd = os.getcwd()  # the physical path (no symlinks), as Path.cwd() gives it
        before = None
        unrecordable: BaseException | None = None
        # listed with FILES=none too: the files the job writes are then recorded by digest
        # only, and a hit takes them from this folder (or runs the job when they changed)
        try:
            # read_only: no files will be recorded, the folder is not listed
            before = snapshot(cwd, self._excludes(cwd)) if write else None
        except Exception as err:
            # without a snapshot the job's files cannot be told apart: run, record nothing
            # (an entry without its files would later be served incomplete)
            unrecordable = err
        if before is not None:
            self._check_folder_size(cwd, len(before))
            try:  # small files not known yet: their content is the "before" state a hit checks
                prehash(cwd, before)
            except Exception as err:  # only a shortcut: their before-states stay unknown
                logger.debug("could not hash the files of %s: %s", cwd, err)
        # registered before running: a child of a job that fails (OnMissing.PASS/NONE) still
        # sees the same digest in place of its uuid on every run
        self._register(job, call_digest.digest, write=write)
        self._executing(job, options, call_digest.digest, outcome)
        conflict = self._conflicts.pop(job.uuid, None) or (None if write else READ_ONLY_REASON)
        if conflict is not None and isinstance(job.metadata.get(META_KEY), dict):
            job.metadata[META_KEY]["reason"] = conflict
        started = time.perf_counter()
        returned = function(*args, **kwargs)  # a failure propagates: nothing is recorded
        duration = time.perf_counter() - started
        # the same conversion jobflow applies right after this call (idempotent on a Response)
        response: Response = Response.from_job_returns(returned, job.output_schema)
        if unrecordable is not None:
            _warn_not_cached(job, f"its run folder could not be listed: {unrecordable}")
            return response
        try:
            entry, replay = self._make_entry(job, call_digest, response, refs, cwd, duration)
        except Exception as err:
            if not write:  # read_only: nothing was to be recorded
                logger.debug("%s (read_only) cannot be recorded: %s", job.name, err)
            elif not isinstance(err, CacheError) and _jobflow_rejects(response.output):
                # jobflow fails this job right after we return: its error, not ours, is shown
                logger.debug("output of %s is not serializable: %s", job.name, err)
            else:
                _warn_not_cached(job, err, self)
            return response
        if replay is not None:
            # the new jobs jobflow runs are the decoded ones, exactly as a hit replays them:
            # objects such as pymatgen Structures are not bit-identical after a JSON round trip,
            # so live objects would give the new jobs other digests than their replays
            response = _replayed(response, replay)
        if not write:
            return response
        held = _HELD.get()
        if held is None and _jobflow_rejects(response.output):
            # jobflow fails this job right after we return (its JobStore refuses the output):
            # its error, not ours, is shown, and nothing is recorded
            logger.debug("output of %s would not be accepted by jobflow: not cached", job.name)
            return response
        try:
            if before is not None:
                self._record_files(entry, cwd, before, files_mode)
            if held is not None:  # written once jobflow has stored the output (see accepting)
                held.entries.append((self, job, entry))
            else:
                self._put(entry)  # last: its files are safely stored
        except Exception as err:  # recording must never fail a job that succeeded
            _warn_not_cached(job, err, self)
        else:
            progress.debug("Cached - %s (%s) as %s", job.name, job.uuid, call_digest.digest[:12])
        return response

    # -- recording --------------------------------------------------------------------------
    def _make_entry(
        self,
        job: Job,
        call_digest: CallDigest,
        response: Response,
        refs: _Refs,
        cwd: str,
        duration: float,
    ) -> tuple[CacheEntry, dict[str, Any] | None]:
        """The entry of a job that ran, and for a dynamic job its response parts as a hit
        replays them (decoded from the entry's text), which jobflow must run instead of the
        live ones."""
        output = dumps(response.output)
        if '"@module"' in output and _names_lost(json.loads(output)):
            raise CacheError(
                "its output holds objects that JSON cannot rebuild (a class defined inside a "
                "function?): a hit would serve their dicts"
            )
        # None and False (the defaults) are left out: a plain return keeps an empty response
        parts = {
            name: value
            for name in _RESPONSE_PARTS
            if (value := getattr(response, name)) is not None and value is not False
        }
        dynamic = any(name in parts for name in _DYNAMIC_PARTS)
        response_text = dumps(parts) if parts else ""
        del parts
        replay: dict[str, Any] | None = None
        if dynamic:
            # parsed once: the tree is checked, then decoded (and consumed) into the replay
            tree = json.loads(response_text)
            self._check_replayable(job, tree, refs)
            replay = loads(response_text, tree)
            del tree
            if _undecoded(replay):
                raise CacheError(
                    "its new jobs hold functions or objects that JSON cannot rebuild (defined "
                    "inside a function?): a hit would hand jobflow their dicts"
                )
        # the canonical input is only decoded when it is kept
        canonical: dict[str, Any] | None = None
        if _encoded_size(call_digest.encodings) <= self.settings.MAX_CANONICAL_INPUT:
            canonical = call_digest.canonical
        entry = CacheEntry(
            digest=call_digest.digest,
            scheme=call_digest.scheme,
            function=call_digest.function,
            name=job.name,
            maker=_maker_of(job),
            cache_version=call_digest.cache_version,
            output=output,
            response=response_text,
            dynamic=dynamic,
            source_uuid=job.uuid,
            source_index=job.index,
            source_dir=cwd,
            input_refs=dict(refs.seen),
            # provenance: invalidating or purging one of these cascades to this entry
            consumed=sorted(refs.consumed - {call_digest.digest}),
            arg_digests=dict(call_digest.arg_digests),
            canonical_input=canonical,
            versions=package_versions(call_digest.function),
            duration=duration,
        )
        return entry, replay

    @staticmethod
    def _check_replayable(job: Job, tree: Any, refs: _Refs) -> None:
        """A dynamic response (its parsed JSON ``tree``) may only reference jobs it made, the
        job itself, or known inputs."""
        created, referenced = job_uuids(tree)
        outside = referenced - created - {job.uuid} - set(refs.seen)
        if outside:
            raise CacheError(
                f"its new jobs reference jobs outside their own sub-flow ({sorted(outside)[:3]}), "
                "which a fresh flow would not have"
            )

    def _excludes(self, cwd: str) -> list[str]:
        """Exclude patterns for the run folder ``cwd`` (a physical path, as ``os.getcwd()``
        gives it): the settings' plus the cache's own files when the object area or the SQLite
        store lies inside it."""
        patterns = self._exclude_cache.get(cwd)
        if patterns is None:
            if self._own_paths is None:  # resolved once: a fresh run folder costs no syscalls
                own = [(Path(self.store.objects_dir).resolve().as_posix(), "")]
                store_path = getattr(self.store.store, "path", None)
                if store_path:  # the file and its -wal / -shm / -journal
                    own.append((Path(store_path).expanduser().resolve().as_posix(), "*"))
                self._own_paths = own
            # files of live processes (SQLite journals, locks) are never a job's
            patterns = [*self._base_excludes, *LIVE_FILE_PATTERNS]
            prefix = cwd.rstrip("/") + "/"
            for path, suffix in self._own_paths:
                if path.startswith(prefix) and len(path) > len(prefix):
                    patterns = [*patterns, glob.escape(path[len(prefix) :]) + suffix]
            if len(self._exclude_cache) < 10_000:  # a run with create_folders: one per job
                self._exclude_cache[cwd] = patterns
        return patterns

    def _check_folder_size(self, cwd: str, files: int) -> None:
        """Warn once per folder when a shared run folder is large enough to slow every job."""
        if files < LARGE_FOLDER or cwd in self._large_folders:
            return
        self._large_folders.add(cwd)
        warn(
            f"jobflow-cache: the run folder {cwd} holds {files} files; every recorded job lists "
            "them all twice to find the files it writes. Give each job a folder of its own "
            "(run_locally(create_folders=True)) or set JOBFLOW_CACHE_FILES=none",
            stacklevel=4,
        )

    def _record_files(self, entry: CacheEntry, cwd: str, before: Any, mode: FilesMode) -> None:
        """Record what the job changed in ``cwd`` since the snapshot ``before``: every path
        with the state it found and the state it left (:meth:`.ObjectArea.record_changes`).
        Files over MAX_FILE_SIZE, and every file with FILES=none, are recorded by digest only
        (``files_skipped``): a hit takes them from this folder while they are unchanged."""
        after = snapshot(cwd, self._excludes(cwd))
        records = self.objects.record_changes(
            cwd,
            before,
            after,
            max_size=self.settings.MAX_FILE_SIZE,
            store=mode != "none",
            serve_code=self.settings.SERVE_CODE_FILES,
        )
        if records:
            entry.files = records
            entry.files_size = sum(r.size for r in records if r.has_object)
            entry.files_skipped = {
                r.path: r.size for r in records if r.kind == "file" and not r.stored
            }

    def _place_mode(self, mode: FilesMode) -> PlaceMode:
        """How a hit places files: independent copies (reflinks where the file system has
        them), except with the opt-in FILES=link where each job has a folder of its own:
        then files of at least ``files.LINK_MIN_SIZE`` are read-only hard links to their
        object (never as root). In a folder shared by several jobs, a later job may rewrite
        a file in place (two VASP jobs writing OUTCAR), which a read-only link would make
        fail (EACCES). Recording never links: the user's files keep their inode and mode."""
        return "link" if mode == "link" and self.exclusive_dirs else "copy"

    # -- serving ----------------------------------------------------------------------------
    def _serve(self, job: Job, entry: CacheEntry, refs: _Refs, options: JobOptions) -> Response:
        cwd = os.getcwd()
        # an entry recorded with files gets them back whatever this job's mode: its output may
        # name them (FILES=none only means "record no files"); without them it is not served
        files_mode = options.files or self.files
        place = self._place_mode(files_mode)
        if entry.files and not self.objects.has_all(entry.files):
            raise FilesUnavailableError("run-folder files of the entry are missing or corrupt")
        uuids: dict[str, str] = {}
        dirs: dict[str, DirRewrite] = {}
        if entry.source_uuid and entry.source_uuid != job.uuid:
            uuids[entry.source_uuid] = job.uuid
        hosts = (entry.host.rpartition("@")[2], _this_host())
        if entry.source_dir and entry.source_dir != cwd:
            # the folder itself and the files the job wrote; other paths that happen to lie in
            # it (inputs, in a shared folder) are not the job's and keep pointing where they did
            dirs[entry.source_dir] = DirRewrite(cwd, _manifest_paths(entry), hosts)
        # a job's uuid and its folder map to the same digest: keep the two kinds apart; twin
        # upstream jobs have keys of their own (see _Refs), so each keeps its uuid and folder
        now_uuid: dict[str, str] = {}
        now_dir: dict[str, str] = {}
        for literal, key in refs.seen.items():
            (now_uuid if UUID_RE.fullmatch(literal) else now_dir)[key] = literal
        for old, key in entry.input_refs.items():
            if UUID_RE.fullmatch(old):
                new = now_uuid.get(key)
                if new is not None and new != old:
                    uuids[old] = new
            else:  # an upstream job's run folder: all of it moved
                new = now_dir.get(key)
                if new is not None and new != old:
                    dirs.setdefault(old, DirRewrite(new, None, hosts))
        parts: dict[str, Any] = {}
        if entry.response:
            text = entry.response
            if entry.dynamic:
                created = created_uuids(json.loads(text)) - {entry.source_uuid}
                uuids = {**uuids, **{old: suid() for old in created}}
            parts = loads(rewrite_text(text, uuids, dirs))
        output = loads(rewrite_text(entry.output, uuids, dirs))
        if entry.files:
            # checks the whole folder first: raises FolderConflictError (the job runs) where
            # serving would overwrite or hide work, before anything is changed
            self.objects.materialize(
                entry.files, Path(cwd), mode=place, source_dir=entry.source_dir
            )
        # the schema check jobflow applies to the function's return value
        return Response.from_job_returns(
            _replayed(Response(output=output), parts), job.output_schema
        )

    # -- book-keeping -----------------------------------------------------------------------
    def _executing(
        self,
        job: Job,
        options: JobOptions,
        digest: str | None,
        outcome: Outcome,
        *,
        mark: bool = True,
    ) -> None:
        """Count a job that is about to run and (``mark``) record why in its metadata."""
        self.report.outcomes[outcome.value] += 1
        self.report.executed.append(job.name)
        if digest is not None and len(self.report.misses) < KEPT_MISSES:
            self.report.misses.append((job.name, digest))
        if mark:
            self._mark(job, options, digest, outcome, None)

    def _register(self, job: Job, digest: str, *, write: bool = True) -> None:
        """Remember that ``job`` (its uuid and its run folder, the cwd) is a job of ``digest``.

        A folder where jobs of two uuids ran is shared (the default ``run_locally``, FireWorks'
        singleshot): paths in it are hashed as they are written, never as a job's folder.
        Outside ``run_locally`` (or with EXCLUSIVE_DIRS) the uuid and the folder are also
        recorded in the store, for jobs that run in other processes (prev_dir).
        """
        self._know_job(job.uuid, digest)
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
        lineage = write and self._lineage_in_store()  # read_only: nothing in the store
        if lineage:
            aliases[job.uuid] = digest
            if cwd:  # for workers in other processes (prev_dir in their inputs)
                aliases[cwd] = digest
        if aliases:
            claims = self._coordination()
            if claims is not None:
                try:
                    claims.set_aliases(aliases)
                except Exception as err:  # a later job just misses: never fail this one
                    logger.warning("could not record job %s in the cache: %s", job.uuid, err)

    def _lineage_in_store(self) -> bool:
        """Whether job uuids (and, with EXCLUSIVE_DIRS, run folders) are recorded in the store
        and looked up there: outside ``run_locally``, where the upstream jobs of a job may have
        run in other processes (FireWorks, jobflow-remote), or when the user says so."""
        return self.shared_dirs or not self._active

    def _stored_job_digest(self, job_uuid: str, unknown: set[str]) -> str | None:
        """Digest of the job ``job_uuid`` as recorded by the process that ran it, if any."""
        if job_uuid in unknown:
            return None
        claims = self._coordination()
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

    # -- coordination with other workers (claims and folder aliases, :mod:`.shared`) --------
    def _coordination(self) -> Coordinator | None:
        """The store's claims and aliases (None if this kind of store has none)."""
        if not self._coordination_checked:
            self._coordination_checked = True
            if self.connect():
                self._coordinator = coordinator_of(self.store)
            if self._coordinator is None and (self.dedup or self.shared_dirs):
                warn(
                    f"jobflow-cache: the cache store {self.store.name} cannot hold claims or run "
                    "folder records; JOBFLOW_CACHE_DEDUP and JOBFLOW_CACHE_EXCLUSIVE_DIRS have no "
                    "effect with it (use the embedded SQLite store, PostgreSQL or MongoDB)",
                    stacklevel=4,
                )
        return self._coordinator

    def _stored_folder_owner(self, path: str, unowned: set[str]) -> tuple[str, str, str] | None:
        """(folder, digest, rest) when the store knows the job whose folder holds ``path``.

        Not remembered across calls when unknown: another worker may record it any time.
        """
        path = path.rstrip("/")
        if not path.startswith("/") or path in unowned:
            return None
        claims = self._coordination()
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

    @staticmethod
    def _mark(
        job: Job,
        options: JobOptions,
        digest: str | None,
        outcome: Outcome,
        source_uuid: str | None,
    ) -> None:
        """Record what the cache did in the job's metadata (stored with its output)."""
        previous = job.metadata.get(META_KEY) if job.metadata else None
        record: dict[str, Any] = {}
        if isinstance(previous, Mapping):
            record.update({k: previous[k] for k in OPTION_KEYS if k in previous})
        record["outcome"] = outcome.value
        if digest is not None:
            record["digest"] = digest
            record["scheme"] = SCHEME
        if source_uuid is not None:
            record["source_uuid"] = source_uuid
        job.metadata[META_KEY] = record


#: The Response fields besides ``output`` that an entry keeps; the first three make new jobs.
_DYNAMIC_PARTS = ("replace", "addition", "detour")
_RESPONSE_PARTS = (*_DYNAMIC_PARTS, "stored_data", "stop_children", "stop_jobflow")


#: Values :func:`_holds_no_str` looks at before it gives up (and says a str may be there).
_NO_STR_BUDGET = 64


def _holds_no_str(values: Iterable[Any]) -> bool:
    """True when ``values`` are only numbers, bools, None and lists, tuples and dicts of them
    (dict keys aside: hashing never normalises them), so that no str reaches a hashing hook;
    False when a str or any other object may be there, or after :data:`_NO_STR_BUDGET` items.

    Examples
    --------
    >>> _holds_no_str([1, 2.0, None, [True, (3,)], {"a": 4}]), _holds_no_str([[1, "x"]])
    (True, False)
    """
    stack = list(values)
    budget = _NO_STR_BUDGET
    while stack:
        value = stack.pop()
        kind = type(value)
        if kind is int or kind is float or kind is bool or value is None:
            continue
        if kind is list or kind is tuple or kind is dict:
            budget -= len(value)
            if budget < 0:
                return False
            stack.extend(value.values() if kind is dict else value)
            continue
        return False
    return True


def _replayed(response: Response, parts: Mapping[str, Any]) -> Response:
    """A Response with ``response``'s output and the other fields taken from ``parts``."""
    kept = {k: parts[k] for k in _RESPONSE_PARTS if k in parts}
    for name in _DYNAMIC_PARTS:
        if name in kept:
            _reference_tuples(kept[name], 0)
    return Response(output=response.output, job_dir=response.job_dir, **kept)


@functools.cache
def _maker_of(job: Job) -> str | None:
    """``module:qualname`` of the class of the instance whose method the job runs (the Maker
    the user made the job with), None for a plain function."""
    function = job.function
    owner = getattr(function, "__self__", None)
    if owner is None and isinstance(function, _Intercept):
        owner = function._instance
    if owner is None or isinstance(owner, (types.ModuleType, type)):
        return None
    cls = type(owner)
    return f"{cls.__module__}:{cls.__qualname__}"


def _str_keys(values: Iterable[Any]) -> list[str]:
    """The str keys of the plain dicts in ``values`` (nested in lists, tuples and dicts), at
    most :data:`_NO_STR_BUDGET` times 16 items looked at.

    Examples
    --------
    >>> sorted(_str_keys([{"/a": 1, "b": [{"c": 2}]}, (3, "x")]))
    ['/a', 'b', 'c']
    """
    keys: list[str] = []
    stack = list(values)
    budget = _NO_STR_BUDGET * 16
    while stack and budget > 0:
        value = stack.pop()
        kind = type(value)
        if kind is dict:
            budget -= len(value)
            keys.extend(k for k in value if type(k) is str)
            stack.extend(value.values())
        elif kind is list or kind is tuple:
            budget -= len(value)
            stack.extend(value)
    return keys


def _keyed(keys: list[str], normalize: Normalizer | None) -> list[list[Any]]:
    """``[key, node]`` for each key the hashing hook replaces (a path, an upstream uuid)."""
    if normalize is None:
        return []
    found = []
    for key in dict.fromkeys(keys):
        node = normalize(key)
        if node is not None:
            found.append([key, node])
    return sorted(found, key=lambda pair: pair[0])


def _with_keys(version: str | None, keyed: list[list[Any]]) -> str | None:
    """The cache_version slot with the dict keys that name paths or jobs, when there are."""
    if not keyed:
        return version
    return f"{version or ''}|keys:{digest_value(keyed)}"


#: Strings naming the run folder itself and its parent: no listing holds them, and a job given
#: "." that lists it must miss when a file was added there (hashed as a tree, like "./")
_FOLDER_ITSELF = frozenset({".", ".."})


def _reference_tuples(node: Any, depth: int) -> None:
    """Give the references in decoded new jobs the tuples jobflow's live ones hold.

    ``OutputReference`` has no ``from_dict``: monty rebuilds its ``attributes`` (``(("a",
    "energy"),)``) as lists, and references then compare unequal to the live ones, which
    ``run_locally`` returns on a miss without the cache. Walks flows, jobs, their arguments
    and outputs, lists and dicts (bounded in depth, as a flow's nesting is).
    """
    if depth > 64:
        return
    if isinstance(node, OutputReference):
        if not isinstance(node.attributes, tuple) or any(
            not isinstance(a, tuple) for a in node.attributes
        ):
            node.attributes = tuple(tuple(a) for a in node.attributes)
    elif isinstance(node, Flow):
        _reference_tuples(node.jobs, depth + 1)
        _reference_tuples(node.output, depth + 1)
    elif isinstance(node, Job):
        _reference_tuples(node.function_args, depth + 1)
        _reference_tuples(node.function_kwargs, depth + 1)
    elif isinstance(node, list | tuple):
        for item in node:
            _reference_tuples(item, depth + 1)
    elif isinstance(node, dict):
        for item in node.values():
            _reference_tuples(item, depth + 1)


def _this_host() -> str:
    return socket.gethostname()


def _encoded_size(encodings: Mapping[str, bytes]) -> int:
    """Length of ``encode(canonical)`` of the canonical input, from its per-argument bytes:
    ``{"name":<bytes>,...}``."""
    commas = max(len(encodings) - 1, 0)
    return 2 + commas + sum(len(name.encode()) + 3 + len(data) for name, data in encodings.items())


def _manifest_paths(entry: CacheEntry) -> frozenset[str]:
    """Relative paths of the entry's files and of the folders holding them."""
    paths: set[str] = set()
    for record in entry.files:
        parts = record.path.split("/")
        paths.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return frozenset(paths)


def _jobflow_rejects(output: Any) -> bool:
    """True when jobflow cannot store ``output`` in a JobStore (it then fails the job).

    Used where the cache cannot see jobflow store the output (``@cached_job`` under another
    manager; ``run_locally`` records only after jobflow has stored it, see
    :meth:`Cache.accepting`): jobflow's own conversion (``Job.run``: ``jsanitize(strict=True,
    enum_values=True, allow_bson=True)``), then the BSON encoding of MongoDB and mongomock
    (``MemoryStore``, ``JSONStore``), the stores jobflow runs with, which refuse integers
    beyond 64 bits, say. An output only another kind of JobStore would accept is not cached.
    """
    try:
        sanitized = jsanitize(output, strict=True, enum_values=True, allow_bson=True)
        bson.encode({"output": sanitized})
    except Exception:  # AttributeError, TypeError, ValueError, OverflowError, InvalidDocument
        return True
    return False


class _Held:
    """Entries of jobs running inside :meth:`Cache.accepting`, held until jobflow has stored
    their outputs, and what to do after (release a claim)."""

    __slots__ = ("after", "entries")

    def __init__(self) -> None:
        self.entries: list[tuple[Cache, Job, CacheEntry]] = []
        self.after: list[Callable[[], None]] = []


class _Accepting:
    """The context manager of :meth:`Cache.accepting` (a class: it runs around every job)."""

    __slots__ = ("_cache", "_held", "_job", "_token")

    def __init__(self, cache: Cache, job: Job) -> None:
        self._cache, self._job = cache, job

    def __enter__(self) -> None:
        self._held = _Held()
        self._token = _HELD.set(self._held)

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        held = self._held
        _HELD.reset(self._token)
        try:
            if kind is None:  # jobflow accepted the output
                for cache, recorded, entry in held.entries:
                    try:
                        cache._put(entry)
                    except Exception as err:  # recording must never fail the job
                        _warn_not_cached(recorded, err, cache)
                if held.after and held.entries:
                    self._cache.flush()  # in the store before the waiters are let go
            elif held.entries:
                logger.debug("%s failed after its function returned: not cached", self._job.name)
        finally:
            for callback in held.after:
                callback()


_HELD: contextvars.ContextVar[_Held | None] = contextvars.ContextVar(
    "jobflow_cache_held", default=None
)


def _warn_not_cached(job: Job, err: BaseException | str, cache: Cache | None = None) -> None:
    if cache is not None and _disk_full(err):  # once per run, not once per job
        if cache._full_warned:
            logger.warning("result of job %r was not cached: %s", job.name, err)
            return
        cache._full_warned = True
        warn(
            f"jobflow-cache: the cache's file system is full (job {job.name!r}: {err}); "
            "results are not cached while it is (said once per run)",
            stacklevel=3,
        )
        return
    warn(f"jobflow-cache: result of job {job.name!r} was not cached: {err}", stacklevel=3)


_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_FULL_TEXTS = ("database or disk is full", "No space left on device", "Disk quota exceeded")


def _disk_full(err: BaseException | str) -> bool:
    """Whether ``err`` (or an error it was raised from) says a file system is full."""
    seen = 0
    cause: BaseException | str | None = err
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in _FULL_ERRNOS:
            return True
        if any(text in str(cause) for text in _FULL_TEXTS):
            return True
        if isinstance(cause, str):
            return False
        cause = cause.__cause__ or cause.__context__
        seen += 1
    return False


def _safe_path(function: Callable[..., Any]) -> str:
    try:
        return function_path(function)
    except CacheError:
        return getattr(function, "__qualname__", repr(function))


_default_cache: Cache | None = None


def current_cache() -> Cache:
    """The cache of the enclosing :func:`run_locally` (or ``Cache.activate()``), else a default
    cache built from the settings (shared by every ``@cached_job`` call in this process)."""
    global _default_cache
    active = _ACTIVE.get()
    if active is not None:
        return active
    try:
        settings: CacheSettings | None = get_settings()
    except SettingsError:  # Cache() warns once and runs every job uncached
        settings = None
    if _default_cache is None or (
        _default_cache.settings is not settings
        and not (settings is None and isinstance(_default_cache._spec_error, SettingsError))
    ):
        _default_cache = Cache(settings=settings)
    return _default_cache


# -- running plain @job functions through the cache ----------------------------------------------
def is_cached_function(function: Any) -> bool:
    """True for functions made with ``@cached_job`` (they intercept themselves)."""
    inner = getattr(function, "original", function)
    return getattr(inner, "__jobflow_cache__", None) is not None


class _CallMismatchError(TypeError):
    """The arguments do not fit the job function's signature (the call would raise)."""


class _Intercept:
    """Stand-in for ``job.function`` during ``Job.run``: jobflow calls its ``.original``.

    For a method (a Maker's ``make``) the unbound function is called with the instance first,
    which is exactly the bound call, and lets the instance's fields enter the digest.
    """

    __slots__ = ("_cache", "_function", "_instance", "_job", "original")

    def __init__(self, cache: Cache, job: Job, function: Any) -> None:
        self._cache, self._job = cache, job
        bound = getattr(function, "__self__", None)
        self._function = getattr(function, "original", function)
        self._instance = None if isinstance(bound, types.ModuleType) else bound
        self.original = self._call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self._instance is not None:
            args = (self._instance, *args)
        try:
            return self._cache.call(self._job, self._function, args, kwargs, JobOptions())
        except BaseException as err:  # the job's own error: without the cache's frames
            raise err.with_traceback(trim_traceback(err.__traceback__, keep_first=False))  # noqa: B904


def _names_lost(tree: Any) -> bool:
    """True when a monty form in the JSON ``tree`` of a job's own output names a class or
    function its module does not hold by that name (monty names a class by ``__name__``, so a
    class defined inside a function): decoding would leave the dict. Checked by name, on the
    modules the objects came from (imported already), without decoding anything."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            module = node.get("@module")
            name = node.get("@class", node.get("@callable"))
            if isinstance(module, str) and isinstance(name, str) and not _held(module, name):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


@functools.lru_cache(maxsize=4096)
def _held(module: str, name: str) -> bool:
    import sys

    target: Any = sys.modules.get(module)
    if target is None:
        # not imported: monty's decoder would import it; a module that exists holds its names
        import importlib.util

        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            return False
    for part in name.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return True


def _undecoded(value: Any, depth: int = 0) -> bool:
    """True when a decoded replay still holds a monty form (a dict naming ``"@module"`` and
    ``"@class"`` or ``"@callable"``): its class or function could not be imported back."""
    if depth > 200:
        return False
    if isinstance(value, dict):
        if "@module" in value and ("@class" in value or "@callable" in value):
            return True
        return any(_undecoded(item, depth + 1) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_undecoded(item, depth + 1) for item in value)
    if isinstance(value, Job):
        parts = [value.function, value.function_args, value.function_kwargs, value.maker]
        return _undecoded(parts, depth + 1) or not callable(value.function)
    if isinstance(value, Flow):
        return _undecoded(list(value.jobs), depth + 1)
    return False
