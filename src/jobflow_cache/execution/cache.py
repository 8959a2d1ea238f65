"""The one interception core, :class:`Cache` (the drop-in ``run_locally`` is in :mod:`.local`).

jobflow's ``Job.run`` resolves a job's references, sets ``CURRENT_JOB``, enters the run folder and
then calls ``getattr(job.function, "original", job.function)(*args, **kwargs)``. That call is the
only place we intercept: :meth:`Cache.call` computes the digest of the *resolved* call, serves a
cached :obj:`~jobflow.Response` on a hit (with its run-folder files linked back), or runs the
function and records its result on a miss. Everything after the call (output stored in the
JobStore and its additional stores, ``Response`` handling, ``prepare_replace``) is jobflow's own.

:class:`Cache` is the sequence; the parts it composes own their state, in
:mod:`jobflow_cache.execution`: one :class:`.Call` per job is handed to the store session
(health, the one lookup path, writes), the lineage (which uuid and run folder belong to which
digest), the server (a hit), the recorder (a run and its entry) and in-flight dedup (claims).
A :class:`.Role` says what a session may do besides serving (:mod:`.plan`'s serve-only one).

While a cache is activated (inside ``run_locally``), new entries and hit counts are written
behind, in batches (:class:`.WriteBehind`): a crash or ``SIGKILL`` loses at most the entries of
the last ~0.1 s, never a part of one, and never leaves an entry whose files are missing (files
are stored before the entry is queued). Everything is written before the run returns or raises.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from jobflow import Job
from maggma.stores import MemoryStore

from jobflow_cache.errors import (
    CacheError,
    CallMismatchError,
    SettingsError,
    UnhashableInputError,
    warn,
)
from jobflow_cache.execution.call import Call, Intercept, Refs, Role
from jobflow_cache.execution.dedup import InFlight
from jobflow_cache.execution.digest import digest_of
from jobflow_cache.execution.folders import Excludes
from jobflow_cache.execution.lineage import Lineage
from jobflow_cache.execution.options import EXPOSED_STORE_REASON as EXPOSED_STORE_REASON
from jobflow_cache.execution.options import (
    META_KEY,
    MODES,
    REFRESH_REASON,
    FilesMode,
    JobOptions,
    job_options,
)
from jobflow_cache.execution.options import OPTION_KEYS as OPTION_KEYS
from jobflow_cache.execution.options import READ_ONLY_REASON as READ_ONLY_REASON
from jobflow_cache.execution.options import CacheMode as CacheMode
from jobflow_cache.execution.recording import LARGE_FOLDER as LARGE_FOLDER
from jobflow_cache.execution.recording import Recorder
from jobflow_cache.execution.report import KEPT_MISSES as KEPT_MISSES
from jobflow_cache.execution.report import UNCACHED_REASONS as UNCACHED_REASONS
from jobflow_cache.execution.report import CacheReport, note_run, set_reason
from jobflow_cache.execution.report import progress as progress
from jobflow_cache.execution.serving import NotServed, Server
from jobflow_cache.execution.session import Accepting, StoreSession
from jobflow_cache.files import ObjectArea
from jobflow_cache.hashing import contents
from jobflow_cache.hashing.canonical import CallDigest, function_path
from jobflow_cache.settings import CacheSettings, cache_disabled, get_settings
from jobflow_cache.store import CacheStore, Outcome

__all__ = [
    "META_KEY",
    "Cache",
    "CacheReport",
    "JobOptions",
    "current_cache",
    "job_options",
]

#: the stand-in for ``job.function`` (:mod:`.local` and :mod:`.plan` import it from here)
_Intercept = Intercept

logger = logging.getLogger(__name__)

#: Functions never cached: jobflow's helper that only gathers a replaced flow's outputs (its
#: arguments are unresolved references, and it is instantaneous).
SKIP_FUNCTIONS = frozenset({"jobflow.core.job:store_inputs"})
_SKIP_QUALNAMES = frozenset(path.rpartition(":")[2] for path in SKIP_FUNCTIONS)  # cheap pre-check

_NO_OPTIONS = JobOptions()

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
    role
        What the session may do besides serving hits (default: everything a worker does);
        see :class:`.Role`.
    """

    def __init__(
        self,
        store: CacheStore | None = None,
        *,
        files: FilesMode | None = None,
        exclusive_dirs: bool = False,
        settings: CacheSettings | None = None,
        role: Role | None = None,
    ) -> None:
        spec_error: CacheError | None = None
        if settings is None:
            try:
                settings = get_settings()
            except SettingsError as err:  # a bad setting never fails a workflow: cache off
                settings = CacheSettings.model_construct()
                spec_error = err
                store = store or CacheStore(MemoryStore(collection_name="unusable"), "")
        self.settings = settings
        if store is None:
            try:
                store = CacheStore.from_settings(self.settings)
            except CacheError as err:  # a bad or unbuildable spec: every job runs uncached
                spec_error = err
                store = CacheStore(
                    MemoryStore(collection_name="unusable"), self.settings.objects_dir()
                )
        self.store = store
        self.role = role if role is not None else Role()
        self._files: FilesMode = files or self.settings.FILES
        # folders recorded in the store (and looked up there) only when the user says every job
        # of every worker has a folder of its own; run_locally(create_folders) knows it of its run
        self._shared_dirs = self.settings.EXCLUSIVE_DIRS
        self._exclusive_dirs = exclusive_dirs or self._shared_dirs
        self.dedup = self.settings.DEDUP and self.role.dedup
        self.objects = ObjectArea(
            self.store.objects_dir,
            verify_limit=self.settings.VERIFY_FILES_LIMIT,
            serve_code=self.settings.SERVE_CODE_FILES,
        )
        self.report = CacheReport()
        # the parts of the core, each owning its state
        self.store_session = StoreSession(
            store,
            self.report,
            spec_error=spec_error,
            writes=self.role.writes,
            wanted=lambda: self.dedup or self.shared_dirs,
        )
        excludes = Excludes(store, self.settings.FILES_EXCLUDE)
        self.lineage = Lineage(
            coordinator=self.store_session.coordinator,
            in_store=self._lineage_in_store,
            excludes=excludes,
            # absolute now: a relative cache folder must not be found again in each job's folder
            contents_db=contents.default_database(
                os.path.abspath(os.path.expanduser(self.settings.DIR))
            ),
        )
        self.recorder = Recorder(
            self.settings, self.objects, excludes, self.lineage, self.store_session, self.report
        )
        self.server = Server(
            self.objects, self.lineage, self.store_session, self.report, lambda: self.exclusive_dirs
        )
        self.inflight = InFlight(self.store_session, self.server, self.settings)

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

    @property
    def job_digests(self) -> dict[str, str]:
        """Job uuid -> digest of the jobs this session ran or served (or looked up)."""
        return self.lineage.job_digests

    @property
    def dir_digests(self) -> dict[str, str]:
        """Run folder -> digest of the job that ran there."""
        return self.lineage.dir_digests

    def _lineage_in_store(self) -> bool:
        """Whether job uuids (and, with EXCLUSIVE_DIRS, run folders) are recorded in the store
        and looked up there: outside ``run_locally``, where the upstream jobs of a job may have
        run in other processes (FireWorks, jobflow-remote), when the user says so, or when the
        role does (a serve-only session)."""
        return self.role.lineage_in_store or self.shared_dirs or not self.store_session.active

    # -- lifecycle --------------------------------------------------------------------------
    def connect(self) -> bool:
        """Connect the store once; on failure warn once and run everything uncached."""
        return self.store_session.connect()

    def close(self) -> None:
        """Write what is still queued, then close the store."""
        self.store_session.close()

    @contextmanager
    def activate(self) -> Iterator[Cache]:
        """Make this the cache used by ``@cached_job`` jobs run inside the ``with`` block.

        Inside the block, new entries and hit counts are written behind, in batches (see
        :class:`.WriteBehind`); everything is written before the block is left, also when it
        raises.
        """
        token = _ACTIVE.set(self)
        self.store_session.begin_run()
        failed = False
        try:
            yield self
        except BaseException:
            failed = True
            raise
        finally:
            _ACTIVE.reset(token)
            self.store_session.end_run(quiet=failed)

    def flush(self) -> None:
        """Write the entries and hit counts still queued (a no-op when none are)."""
        self.store_session.flush()

    def accepting(self, job: Job) -> Accepting:
        """Around jobflow's ``Job.run(store)`` of ``job`` (``run_locally`` does this): the
        entry of a job that runs inside is written only when the block ends without an error,
        that is once jobflow has accepted the output and stored it in the JobStore. An output
        the JobStore refuses (an int over 64 bits in a MongoDB or ``MemoryStore``) fails the
        job there, and then nothing is recorded. With DEDUP, the claim on the digest is let
        go after the entry is written (or dropped).
        """
        return Accepting(self.store_session, job)

    # -- hashing ----------------------------------------------------------------------------
    def digest(
        self,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: JobOptions = _NO_OPTIONS,
        refs: Refs | None = None,
    ) -> CallDigest:
        """Digest of calling the (unbound) ``function`` with resolved ``args``/``kwargs``.

        For a method, ``args[0]`` is the instance (e.g. the Maker), whose fields are hashed.
        """
        refs = refs if refs is not None else Refs()
        env = getattr(self.settings, "DIGEST_ENV", None)
        return digest_of(function, args, kwargs, options, refs, self.lineage, env)

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
        if _bookkeeping(function):  # transparent: its metadata dict is the parent's
            return function(*args, **kwargs)
        call = self._new_call(job, function, args, kwargs, job_options(job, options))
        bypass = self._bypass(call)
        if bypass is not None:  # caching off, a bad mode, the JobStore read, no store
            return self._run_uncached(call, *bypass)
        self.store_session.report_write_errors()
        try:
            call = call.hashed(self.digest(function, args, kwargs, call.options, call.refs))
        except CallMismatchError:  # the arguments do not fit: the call raises jobflow's error
            return call.run()
        except Exception as err:  # unhashable input, or an object whose as_dict() fails
            _warn_unhashable(call, err)
            return self._run_uncached(call, Outcome.UNCACHEABLE)
        if call.mode == "refresh":
            # never served: recomputed, and its entry replaces the one stored (no claim either:
            # a claim's waiter would be served the entry this job does not trust)
            return self._run(call, Outcome.MISS, REFRESH_REASON)
        try:
            found = self.store_session.lookup(call.digest)
        except Exception as err:  # the store failed in a way of its own: never fail the job
            self.store_session.fail(err)
            return self._run_uncached(call, Outcome.ERROR)
        outcome, reason = Outcome.MISS, None
        if found.outcome is Outcome.HIT and found.entry is not None:
            served = self.server.serve(call, found.entry)
            if not isinstance(served, NotServed):
                return served
            # a folder conflict is a miss (the job runs); an entry that failed is invalid
            outcome = Outcome.INVALID if served.conflict is None else Outcome.MISS
            reason = served.conflict
        elif found.outcome is Outcome.INVALID:
            _warn_invalid(call, found.reason)
            outcome = Outcome.INVALID
        if self.dedup and call.write:  # claimed while it runs; served if another worker ran it
            return self.inflight.run_claimed(
                call, lambda later: self._run(call, outcome, reason if later is None else later)
            )
        return self._run(call, outcome, reason)

    def _new_call(
        self,
        job: Job,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: JobOptions,
    ) -> Call:
        mode = options.mode or str(getattr(self.settings, "MODE", "readwrite"))
        return Call(job, function, args, kwargs, options, mode, options.files or self.files)

    def _bypass(self, call: Call) -> tuple[Outcome, str | None] | None:
        """Why the cache leaves ``call`` alone (the outcome, and a reason for the job's
        metadata), or None when it takes it; the store is connected (once) last."""
        if not call.options.enabled or cache_disabled():
            return Outcome.DISABLED, None
        if call.mode not in MODES:  # a bad metadata["jobflow_cache"]["mode"]: never fail the job
            warn(
                f"jobflow-cache: job {call.job.name!r} runs uncached: its cache mode "
                f"{call.mode!r} is not one of {', '.join(MODES)}",
                stacklevel=3,
            )
            return Outcome.UNCACHEABLE, None
        session = self.store_session
        if call.mode == "read_only" and not session.connected and session.store_file_absent():
            # nothing to serve, and opening the embedded store would create it: the job runs
            return Outcome.MISS, READ_ONLY_REASON
        if call.job.config.expose_store and not call.options.cache_exposed_store:
            # it reads the JobStore (CURRENT_JOB.store), which its digest cannot see
            logger.debug("%s reads the JobStore (expose_store=True): not cached", call.job.name)
            return Outcome.UNCACHEABLE, EXPOSED_STORE_REASON
        if not self.connect():
            return Outcome.ERROR, None
        return None

    def _refuse(self, outcome: Outcome, digest: str | None, why: str | None) -> None:
        """Where a job would run: the role's refusal, if it has one (it raises)."""
        if self.role.refuse is not None:
            self.role.refuse(outcome, digest, why)

    def _run(self, call: Call, outcome: Outcome, reason: str | None) -> Any:
        """Run a hashed job the cache did not serve, and record it."""
        self._refuse(outcome, call.digest, reason)
        return self.recorder.run(call, outcome, reason)

    def _run_uncached(self, call: Call, outcome: Outcome, reason: str | None = None) -> Any:
        """Run a job the cache leaves alone, counted (and marked) with ``outcome``."""
        self._refuse(outcome, None, None)
        # JOBFLOW_CACHE_DISABLE: jobflow's behaviour exactly, metadata untouched
        note_run(self.report, call.job, call.options, None, outcome, marked=not cache_disabled())
        if reason is not None:
            set_reason(call.job, reason)
        return call.run()

    def _uncached(
        self,
        job: Job,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        outcome: Outcome,
        options: JobOptions,
    ) -> Any:
        """Run ``job`` uncached (``@cached_job`` of a function it cannot tell apart)."""
        return self._run_uncached(self._new_call(job, function, args, kwargs, options), outcome)


def _bookkeeping(function: Callable[..., Any]) -> bool:
    """Whether ``function`` is jobflow's own book-keeping job (:data:`SKIP_FUNCTIONS`)."""
    return getattr(function, "__qualname__", "") in _SKIP_QUALNAMES and (
        _safe_path(function) in SKIP_FUNCTIONS
    )


def _warn_unhashable(call: Call, err: Exception) -> None:
    reason = (
        "its input cannot be hashed"
        if isinstance(err, UnhashableInputError)
        else (f"hashing its input failed ({type(err).__name__})")
    )
    warn(
        f"jobflow-cache: job {call.job.name!r} ({_safe_path(call.function)}) runs uncached: "
        f"{reason}: {err}",
        stacklevel=3,
    )


def _warn_invalid(call: Call, reason: str | None) -> None:
    warn(
        f"jobflow-cache: cached entry {call.digest[:12]} of job {call.job.name!r} is not used: "
        f"{reason}; running the job",
        stacklevel=3,
    )


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
        and not (
            settings is None and isinstance(_default_cache.store_session.spec_error, SettingsError)
        )
    ):
        _default_cache = Cache(settings=settings)
    return _default_cache


# -- running plain @job functions through the cache ----------------------------------------------
def is_cached_function(function: Any) -> bool:
    """True for functions made with ``@cached_job`` (they intercept themselves)."""
    inner = getattr(function, "original", function)
    return getattr(inner, "__jobflow_cache__", None) is not None
