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
import functools
import glob
import inspect
import json
import logging
import os
import socket
import threading
import time
import types
import uuid
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jobflow import Job, Response
from jobflow.utils.uid import suid
from maggma.stores import MemoryStore
from monty.json import jsanitize

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
    StoreUnavailableError,
    UnhashableInputError,
    warn,
)
from jobflow_cache.files import ObjectArea, PlaceMode, changed_files, snapshot
from jobflow_cache.hashing import (
    SCHEME,
    CallDigest,
    Normalizer,
    bind_arguments,
    digest_bytes,
    digest_call,
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
OPTION_KEYS = ("enabled", "cache_version", "ignore", "files")

#: Functions never cached: jobflow's helper that only gathers a replaced flow's outputs (its
#: arguments are unresolved references, and it is instantaneous).
SKIP_FUNCTIONS = frozenset({"jobflow.core.job:store_inputs"})
_SKIP_QUALNAMES = frozenset(path.rpartition(":")[2] for path in SKIP_FUNCTIONS)  # cheap pre-check

FilesMode = Literal["link", "copy", "none"]

#: Files in a run folder from which on a recorded job warns (once per folder) that listing the
#: folder before and after every job costs time (~10 ms per 1,000 files on a slow disk).
LARGE_FOLDER = 2_000

_ACTIVE: contextvars.ContextVar[Cache | None] = contextvars.ContextVar(
    "jobflow_cache_active", default=None
)


@dataclass(frozen=True)
class JobOptions:
    """Per-job cache options (from ``@cached_job(...)`` or ``metadata["jobflow_cache"]``)."""

    enabled: bool = True
    cache_version: str | None = None
    ignore: tuple[str, ...] = ()
    files: FilesMode | None = None

    def merged(self, overrides: Mapping[str, Any]) -> JobOptions:
        """These options updated by the option keys of ``overrides`` (metadata wins)."""
        values = {k: overrides[k] for k in OPTION_KEYS if k in overrides}
        if "ignore" in values:
            values["ignore"] = tuple(values["ignore"] or ())
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


@dataclass
class CacheReport:
    """What one cache session did: outcome counts, executed and served jobs, time saved."""

    outcomes: Counter[str] = field(default_factory=Counter)
    served: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)
    time_saved: float = 0.0

    @property
    def hits(self) -> int:
        """Number of jobs served from the cache."""
        return self.outcomes[Outcome.HIT.value]

    def summary(self) -> str:
        """One line, e.g. ``"3 jobs: 2 served from cache, 1 executed; 4.1 s of compute saved"``.

        Examples
        --------
        >>> report = CacheReport()
        >>> report.served.append("relax")
        >>> report.summary()
        '1 job: 1 served from cache, 0 executed; 0.0 s of compute saved'
        """
        total = len(self.served) + len(self.executed)
        return (
            f"{total} job{'' if total == 1 else 's'}: {len(self.served)} served from cache, "
            f"{len(self.executed)} executed; {self.time_saved:.1f} s of compute saved"
        )


@dataclass
class _Refs:
    """Job uuids and run folders seen while hashing one call -> digest of their owner job."""

    seen: dict[str, str] = field(default_factory=dict)
    #: absolute paths the store knows no owner folder of (asked once per call)
    unowned: set[str] = field(default_factory=set)


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
        self.settings = settings or get_settings()
        self._spec_error: CacheError | None = None
        if store is None:
            try:
                store = CacheStore.from_settings(self.settings)
            except CacheError as err:  # a bad or unbuildable spec: every job runs uncached
                self._spec_error = err
                store = CacheStore(
                    MemoryStore(collection_name="unusable"), self.settings.objects_dir()
                )
        self.store = store
        self.files: FilesMode = files or self.settings.FILES
        # folders recorded in the store (and looked up there) only when the user says every job
        # of every worker has a folder of its own; run_locally(create_folders) knows it of its run
        self.shared_dirs = self.settings.EXCLUSIVE_DIRS
        self.exclusive_dirs = exclusive_dirs or self.shared_dirs
        self.dedup = self.settings.DEDUP
        self.objects = ObjectArea(self.store.objects_dir)
        self.report = CacheReport()
        self.job_digests: dict[str, str] = {}  # job uuid -> digest (last index wins)
        self.dir_digests: dict[str, str] = {}  # exclusive run folder -> digest
        self._connected = False
        self._broken: str | None = None
        self._exclude_cache: dict[str, list[str]] = {}
        self._base_excludes = list(self.settings.FILES_EXCLUDE)
        self._own_paths: list[tuple[str, str]] | None = None  # object area, SQLite file
        self._large_folders: set[str] = set()
        self._coordinator: Coordinator | None = None
        self._coordination_checked = False
        self._token = uuid.uuid4().hex[:8]
        # while activated (a run): new entries and hit counts are written behind, in batches
        self._lock = threading.Lock()
        self._active = 0
        self._writer: WriteBehind | None = None

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

    def close(self) -> None:
        """Write what is still queued, then close the store."""
        self._stop_writer()
        if self._connected:
            self.store.close()
            self._connected = False

    def _fail(self, err: BaseException) -> None:
        if self._broken is None:
            self._broken = str(err)
            which = (
                "configured by JOBFLOW_CACHE_STORE cannot be built"
                if self._spec_error is not None
                else f"{self.store.name} is unavailable"
            )
            warn(
                f"jobflow-cache: the cache store {which} ({err}); "
                "jobs run uncached for the rest of this run",
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
        if writer is None:
            return
        if last:
            writer.close()
        else:
            writer.flush()
        self._report_errors_of(writer, quiet=quiet)

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
        job_digests, dir_digests = self.job_digests, self.dir_digests
        shared_dirs = self.shared_dirs
        stored_uuids = self._lineage_in_store()

        def normalize(value: str) -> tuple[str, Any] | None:
            if len(value) == 36:
                digest = job_digests.get(value)
                if digest is None and stored_uuids and UUID_RE.fullmatch(value):
                    digest = self._stored_job_digest(value, refs.unowned)
                if digest is not None:
                    refs.seen[value] = digest
                    return ("job", digest)
            if "/" in value and (dir_digests or shared_dirs):
                host, sep, path = value.partition(":")  # "host:/path" names /path
                path = path if sep and not host.startswith("/") else value
                candidate = path.rstrip("/")
                rest: list[str] = []
                while candidate and candidate != "/":
                    owner = dir_digests.get(candidate)
                    if owner is not None:
                        refs.seen[candidate] = owner
                        return ("dir", [owner, "/".join(reversed(rest))])
                    candidate, _, tail = candidate.rpartition("/")
                    rest.append(tail)
                if shared_dirs:  # a folder of a job that ran in another process
                    found = self._stored_folder_owner(path, refs.unowned)
                    if found is not None:
                        folder, owner, tail = found
                        refs.seen[folder] = owner
                        return ("dir", [owner, tail])
            return None

        # Only known job uuids and (with exclusive folders) strings holding a "/" can be
        # replaced; hashing calls normalize for those strings only (the live dict is checked).
        markers: tuple[str, ...] = ("/",) if self.exclusive_dirs or dir_digests else ()
        if stored_uuids:  # any uuid may be an upstream job's that ran in another process
            markers = (*markers, "-")

        return Normalizer(normalize, exact=job_digests, markers=markers)

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
        return digest_call(
            path,
            arguments,
            cache_version=_script_version(path, function, options.cache_version),
            normalize_str=self._normalizer(refs),
        )

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
        try:
            found = self._lookup(digest)
        except Exception as err:  # the store failed in a way of its own: never fail the job
            self._fail(err)
            return self._uncached(job, function, args, kwargs, Outcome.ERROR, options)

        if found.outcome is Outcome.HIT and found.entry is not None:
            served = self._serve_hit(job, found.entry, refs, options)
            if served is not None:
                return served
            outcome = Outcome.INVALID
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
            self._run_and_record, job, function, args, kwargs, options, call_digest, refs, outcome
        )
        if self.dedup:
            return self._run_claimed(job, call_digest.digest, refs, options, run)
        return run()

    def _serve_hit(
        self, job: Job, entry: CacheEntry, refs: _Refs, options: JobOptions
    ) -> Response | None:
        """Serve ``entry`` to ``job``; None (with a warning) when it cannot be served."""
        digest = entry.digest
        try:
            response = self._serve(job, entry, refs, options)
        except Exception as err:  # whatever goes wrong, the job runs instead
            warn(
                f"jobflow-cache: cached entry {digest[:12]} of job {job.name!r} cannot be "
                f"served ({err}); running the job",
                stacklevel=3,
            )
            return None
        self._register(job, digest)
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
        try:
            with Heartbeat(claims, digest, owner, self.settings.LEASE):
                response = run()
            self.flush()  # the entry is in the store before the waiters are let go
            return response
        finally:
            try:
                claims.release(digest, owner)
            except Exception as err:  # the lease runs out by itself
                logger.warning("could not release the claim on %s: %s", digest[:12], err)

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
    ) -> Any:
        files_mode = options.files or self.files
        cwd = os.getcwd()  # the physical path (no symlinks), as Path.cwd() gives it
        before = None
        unrecordable: BaseException | None = None
        if files_mode != "none":
            try:
                before = snapshot(cwd, self._excludes(cwd))
            except Exception as err:
                # without a snapshot the job's files cannot be told apart: run, record nothing
                # (an entry without its files would later be served incomplete)
                unrecordable = err
            else:
                self._check_folder_size(cwd, len(before))
        # registered before running: a child of a job that fails (OnMissing.PASS/NONE) still
        # sees the same digest in place of its uuid on every run
        self._register(job, call_digest.digest)
        self._executing(job, options, call_digest.digest, outcome)
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
            if not isinstance(err, CacheError) and _jobflow_rejects(response.output):
                # jobflow fails this job right after we return: its error, not ours, is shown
                logger.debug("output of %s is not serializable: %s", job.name, err)
            else:
                _warn_not_cached(job, err)
            return response
        if replay is not None:
            # the new jobs jobflow runs are the decoded ones, exactly as a hit replays them:
            # objects such as pymatgen Structures are not bit-identical after a JSON round trip,
            # so live objects would give the new jobs other digests than their replays
            response = _replayed(response, replay)
        try:
            if before is not None:
                self._record_files(entry, cwd, before, files_mode)
            self._put(entry)  # last: its files are safely stored
        except Exception as err:  # recording must never fail a job that succeeded
            _warn_not_cached(job, err)
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
        # the canonical input is only decoded when it is kept
        canonical: dict[str, Any] | None = None
        if _encoded_size(call_digest.encodings) <= self.settings.MAX_CANONICAL_INPUT:
            canonical = call_digest.canonical
        entry = CacheEntry(
            digest=call_digest.digest,
            scheme=call_digest.scheme,
            function=call_digest.function,
            name=job.name,
            cache_version=call_digest.cache_version,
            output=output,
            response=response_text,
            dynamic=dynamic,
            source_uuid=job.uuid,
            source_index=job.index,
            source_dir=cwd,
            input_refs=dict(refs.seen),
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
            patterns = self._base_excludes
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
        changed = changed_files(cwd, before, self._excludes(cwd))
        if not changed:
            return
        folder = Path(cwd)
        limit = self.settings.MAX_FILE_SIZE
        if limit:
            sizes = {path: (folder / path).stat().st_size for path in changed}
            entry.files_skipped = {path: size for path, size in sizes.items() if size > limit}
            changed = [path for path in changed if path not in entry.files_skipped]
        if changed:
            entry.files = self.objects.record(folder, changed, mode=self._place_mode(mode))
            entry.files_size = sum(f.size for f in entry.files)

    def _place_mode(self, mode: FilesMode) -> PlaceMode:
        """How files move between run folders and the object area: hard links only where each
        job has a folder of its own. In a folder shared by several jobs, a later job may
        rewrite a file (two VASP jobs writing OUTCAR); a hard link to a read-only object would
        make that fail (EACCES), and a writable one would let it change the cached object."""
        return "link" if mode != "copy" and self.exclusive_dirs else "copy"

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
        # a job's uuid and its folder map to the same digest: keep the two kinds apart
        now_uuid: dict[str, str] = {}
        now_dir: dict[str, str] = {}
        for literal, digest in refs.seen.items():
            (now_uuid if UUID_RE.fullmatch(literal) else now_dir)[digest] = literal
        for old, digest in entry.input_refs.items():
            if UUID_RE.fullmatch(old):
                new = now_uuid.get(digest)
                if new is not None and new != old:
                    uuids[old] = new
            else:  # an upstream job's exclusive folder: all of it moved
                new = now_dir.get(digest)
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
            self.objects.materialize(entry.files, Path(cwd), mode=place)
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
        if mark:
            self._mark(job, options, digest, outcome, None)

    def _register(self, job: Job, digest: str) -> None:
        self.job_digests[job.uuid] = digest
        aliases: dict[str, str] = {}
        if self.exclusive_dirs:
            cwd = os.getcwd()
            self.dir_digests[cwd] = digest
            if self.shared_dirs:  # for workers in other processes (prev_dir in their inputs)
                aliases[cwd] = digest
        if self._lineage_in_store():
            aliases[job.uuid] = digest
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


def _replayed(response: Response, parts: Mapping[str, Any]) -> Response:
    """A Response with ``response``'s output and the other fields taken from ``parts``."""
    kept = {k: parts[k] for k in _RESPONSE_PARTS if k in parts}
    return Response(output=response.output, job_dir=response.job_dir, **kept)


@functools.cache
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
    """True when jobflow itself cannot store ``output`` (it then fails the job)."""
    try:
        jsanitize(output, strict=True, enum_values=True, allow_bson=True)
    except (AttributeError, TypeError, ValueError):
        return True
    return False


def _warn_not_cached(job: Job, err: BaseException | str) -> None:
    warn(f"jobflow-cache: result of job {job.name!r} was not cached: {err}", stacklevel=3)


def _script_version(path: str, function: Callable[..., Any], version: str | None) -> str | None:
    """``cache_version`` of a call; for a function of a script (``__main__``) its source too.

    ``__main__:relax`` names a different function in every script, so two scripts with a job of
    the same name would share digests: the function's source code tells them apart.
    """
    if not path.startswith("__main__:"):
        return version
    try:
        tag = _SOURCE_TAGS.get(function)
    except TypeError:  # not weakly referenceable
        tag = None
    if tag is None:
        tag = _source_tag(function)
        with suppress(TypeError):
            _SOURCE_TAGS[function] = tag
    return tag if version is None else f"{version}|{tag}"


#: Source tag of each script function seen (reading the source costs ~0.1 ms a call).
_SOURCE_TAGS: weakref.WeakKeyDictionary[Callable[..., Any], str] = weakref.WeakKeyDictionary()


def _source_tag(function: Callable[..., Any]) -> str:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):  # no source file (python -c, notebooks): the compiled code
        code = getattr(function, "__code__", None)
        source = _code_fingerprint(code) if isinstance(code, types.CodeType) else repr(function)
    return "source:" + digest_bytes(source.encode())


def _code_fingerprint(code: types.CodeType) -> str:
    """Bytecode, names and constants of ``code`` (nested code objects included, addresses not)."""
    consts = [
        _code_fingerprint(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts
    ]
    return repr((code.co_code.hex(), code.co_names, code.co_varnames, consts))


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
    settings = get_settings()
    if _default_cache is None or _default_cache.settings is not settings:
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
        return self._cache.call(self._job, self._function, args, kwargs, JobOptions())
