"""The drop-in :func:`run_locally`: jobflow's local manager, in time linear in the number of jobs.

Why not jobflow's own ``run_locally``
-------------------------------------
jobflow 0.4.0's loop is linear, but with its default JobStore, a maggma ``MemoryStore``, every
job costs time proportional to the number of documents already stored, so a flow of n jobs costs
O(n²). A ``MemoryStore`` is a mongomock collection, which answers every query and every upsert
by testing each document it holds against the filter (it keeps no index). Each job stores its
output with an upsert (one full scan), and each distinct job it references costs three queries
(latest index, output, latest index again in ``OutputReference.resolve``), each a full scan.
Measured with cProfile on a 1,000-job chain (4 scans per job): 2.0 million document tests
(``mongomock_ng.filtering.filter_applies``), 23 of the 28.6 s of the run; the graph walk
(``Flow.graph``, ``Flow.iterflow``) took 0.5 s and grows linearly.

What this module does instead
-----------------------------
* The loop below mirrors ``jobflow/managers/local.py`` statement by statement: the same order of
  jobs (``Flow.iterflow``, diversions run depth first where jobflow runs them), the same log
  lines on jobflow's logger, the same handling of ``stop_children``, ``stop_jobflow``,
  ``replace``/``detour``/``addition``, ``OnMissing``, errors, ``ensure_success``,
  ``raise_immediately``, ``create_folders`` and ``root_dir``, and the same return value. (The
  traceback logged for a failed job shows this module's frames where jobflow's shows its own.)
* Every job still runs through jobflow's own ``Job.run``, which resolves its references, calls
  the function, stores the output (and its additional-store blobs) and handles the ``Response``.
  For a cached run, the function call goes through :meth:`.Cache.call` (``job.function`` is
  swapped for a stand-in around that one ``Job.run``, so nothing global is patched).
* When the JobStore is a plain ``JobStore`` on maggma ``MemoryStore`` s, ``Job.run`` is given a
  shallow copy of it whose stores are :class:`.IndexedMemoryStore` views (:mod:`.local.view`):
  the same documents are written to the same collections (an insert where the upsert would
  insert), and queries that name one of this run's job (or blob) uuids are answered from an
  index of the documents this run wrote, with mongomock's own filter and sort functions,
  instead of by a scan. Uuids already in the store before the run are loaded from it once; any
  other query and any other store type (a MongoDB server has indexes) go to the store itself.

The view alone would also make jobflow's own loop linear. The loop is copied (it is 60 lines)
so that the cache needs no global patch of ``Job.run``: the stand-in is set on one job for the
duration of its ``Job.run``, which keeps concurrent runs in several threads, and plain jobflow
runs beside them, independent without reference counting, and lets a run without cache skip
``@cached_job`` 's interception too.

Turning the cache off (``cache=False`` or ``JOBFLOW_CACHE_DISABLE=1``) keeps this loop, with no
digest computed, no cache store opened and no ``metadata["jobflow_cache"]`` written, for plain
``@job`` and ``@cached_job`` functions alike. ``jobflow.run_locally`` itself stays available as
the escape hatch.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import traceback
import types
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from random import randint
from typing import Any, cast

from jobflow import SETTINGS, Flow, Job, JobStore, Response, initialize_logger
from jobflow.core.flow import get_flow
from jobflow.core.reference import OnMissing

from jobflow_cache.errors import trim_traceback
from jobflow_cache.execution.cache import (
    RUN_FILES,
    RUN_FOLDERS,
    Cache,
    CacheReport,
    FilesMode,
    is_cached_function,
    progress,
)
from jobflow_cache.execution.call import Intercept
from jobflow_cache.local.view import indexed_view
from jobflow_cache.settings import cache_disabled, file_read_once
from jobflow_cache.store import CacheStore

__all__ = ["chdir", "run_locally"]

logger = logging.getLogger(__name__)
#: jobflow's manager logger: "Started executing jobs locally", "... failed with exception", ...
manager_log = logging.getLogger("jobflow.managers.local")


def run_locally(
    flow: Flow | Job | list[Job],
    log: bool | str = True,
    store: JobStore | None = None,
    create_folders: bool = False,
    root_dir: str | Path | None = None,
    ensure_success: bool = False,
    allow_external_references: bool = False,
    raise_immediately: bool = False,
    *,
    cache: Cache | CacheStore | bool | None = None,
    files: FilesMode | None = None,
) -> dict[str, dict[int, Response]]:
    """Run a :obj:`~jobflow.Job` or :obj:`~jobflow.Flow` locally, serving cached jobs.

    A drop-in replacement for :func:`jobflow.run_locally`: same arguments, same return value,
    same JobStore contents. Every job is cached, including jobs of Makers that use plain
    ``@job`` (atomate2): a job whose digest (function + resolved inputs) is in the cache is not
    run; its cached output is stored instead and its run-folder files are linked back. The
    manager loop is jobflow's, made linear in the number of jobs (see :mod:`jobflow_cache.local`).

    Parameters
    ----------
    flow, log, store, create_folders, root_dir, ensure_success, allow_external_references, \
raise_immediately
        As for :func:`jobflow.run_locally`.
    cache
        ``None``/``True``: the cache configured by the ``JOBFLOW_CACHE_*`` settings (embedded
        SQLite store by default); a :class:`.CacheStore` or :class:`.Cache`; ``False``: no cache
        for any job of this run (``@cached_job`` ones included): no digest is computed, no
        cache store opened, no ``metadata["jobflow_cache"]`` written. ``JOBFLOW_CACHE_DISABLE=1``
        does the same. To use jobflow's own manager, call :func:`jobflow.run_locally`.
    files
        ``"link"`` (default), ``"copy"`` or ``"none"``: how run-folder files are restored.

    Returns
    -------
    dict[str, dict[int, Response]]
        The responses of the jobs, as a dict of ``{uuid: {index: response}}``.

    Examples
    --------
    >>> from jobflow import job, Flow
    >>> from jobflow_cache import CacheStore, run_locally
    >>> from maggma.stores import MemoryStore
    >>> @job
    ... def add(a, b):
    ...     return a + b
    >>> cache = CacheStore(MemoryStore(), objects_dir=str(getfixture("tmp_path")))
    >>> first = add(1, 2)
    >>> out = run_locally(first, log=False, cache=cache)
    >>> again = add(1, 2)  # a fresh job: new uuid, same inputs
    >>> out = run_locally(again, log=False, cache=cache)
    >>> out[again.uuid][1].output, again.metadata["jobflow_cache"]["outcome"]
    (3, 'hit')
    """
    session = _session(cache, files, create_folders)
    # from here on, jobflow's run_locally step by step
    if store is None:
        store = SETTINGS.JOB_STORE
    root = Path.cwd() if root_dir is None else Path(root_dir).resolve()
    root.mkdir(exist_ok=True)
    store.connect()
    if log:
        initialize_logger(fmt=log if isinstance(log, str) else "")
    flow = get_flow(flow, allow_external_references=allow_external_references)

    manager = _LocalManager(
        indexed_view(store), session, root, create_folders, raise_immediately, files
    )
    try:
        with (
            _older_objects_frozen(),
            file_read_once(),  # the settings file's DISABLE: once for the run's jobs
            session.activate() if session is not None else nullcontext(),
            _progress(manager.report, show=not log),
        ):
            manager_log.info("Started executing jobs locally")
            finished_successfully = manager.run(flow)
            manager_log.info("Finished executing jobs locally")
    except BaseException as err:  # Ctrl-C: what was done (the cache is written); the job's
        if log:  # error: the frames of plain jobflow
            _log_summary(manager.report, session, interrupted=isinstance(err, KeyboardInterrupt))
        raise err.with_traceback(trim_traceback(err.__traceback__, keep_first=False))  # noqa: B904
    if log:
        _log_summary(manager.report, session)

    if ensure_success and not finished_successfully:
        raise RuntimeError("Flow did not finish running successfully")
    return dict(manager.responses)


_GC_LOCK = threading.RLock()  # re-entrant: a finalizer run by a collection may start a run
_gc_runs = 0  # runs in progress in this process
_gc_froze = False  # whether the first of them froze the older objects (and the last thaws)
_gc_full = 0  # full collections counted when the objects were last frozen


@contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Around a run: the objects the process already holds (the imported libraries, the
    flow) are left out of the cyclic garbage collector's later scans (:func:`gc.freeze`)
    until the last run in progress ends (:func:`gc.unfreeze`); so are, from then on, the
    objects alive between two jobs (:func:`_freeze_between_jobs`).

    A run of many jobs triggers full collections, and each one scanned every object of the
    process (about 0.1 s with pymatgen imported, and more as the run's outputs and
    responses pile up): a per-job cost that grew with the flow, 4 s of a 10,000-job chain.
    Frozen, each scans what was made since the last freeze. Left alone when the collector
    is off or something else froze objects (its freeze is kept).
    """
    global _gc_runs, _gc_froze, _gc_full
    with _GC_LOCK:
        if _gc_runs == 0:
            _gc_froze = gc.isenabled() and gc.get_freeze_count() == 0
            if _gc_froze:
                gc.freeze()
                _gc_full = _full_collections()
        _gc_runs += 1
    try:
        yield
    finally:
        with _GC_LOCK:
            _gc_runs -= 1
            if _gc_runs == 0 and _gc_froze:
                _gc_froze = False
                gc.unfreeze()


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])


def _freeze_between_jobs() -> None:
    """After a job: when the collector ran a full collection during it, collect once more
    and freeze what survives.

    Only between jobs, after a collection: an object frozen is then one the run still holds
    (its responses, outputs, the flow). Frozen during a job (after the collector's own full
    collection, as an earlier release did), a job's working set stayed frozen after the job
    let go of it, and the garbage cycles in it (ASE atoms and their calculator, say) were
    kept until the end of the run: a 30-job chain whose jobs each left 20 MB in a cycle
    peaked at 690 MB against plain jobflow's 152 MB. Nothing is done while another run
    goes on in another thread (its job's working set is alive now)."""
    global _gc_full
    if not _gc_froze or _gc_runs != 1 or _full_collections() == _gc_full:
        return
    with _GC_LOCK:
        if _gc_froze and _gc_runs == 1:
            gc.collect()
            gc.freeze()
            _gc_full = _full_collections()


def _session(
    cache: Cache | CacheStore | bool | None, files: FilesMode | None, create_folders: bool
) -> Cache | None:
    """The cache session of a run, or None when the run uses no cache (nothing is opened)."""
    if cache is False or cache_disabled():
        return None
    if isinstance(cache, Cache):
        # never changed: what this run knows of its folders (create_folders) and its files=
        # hold for its own jobs only (RUN_FOLDERS and RUN_FILES, see _LocalManager._execute)
        return cache
    cache_store = cache if isinstance(cache, CacheStore) else None
    return Cache(cache_store, files=files, exclusive_dirs=create_folders)


# -- the run's summary and progress ---------------------------------------------------------------
#: Misses the summary explains (each costs one query of the nearest entries of its function).
EXPLAINED_MISSES = 3


def _off_reason() -> str:
    if cache_disabled():
        return "JOBFLOW_CACHE_DISABLE is set"
    return "run_locally(cache=False)"


def _log_summary(report: CacheReport, session: Cache | None, interrupted: bool = False) -> None:
    """Log what the run did on ``jobflow.cache``; for the first misses that have a near cached
    entry of the same function, the field that differs and the command that shows more."""
    head = "Interrupted (KeyboardInterrupt) - " if interrupted else "Cache summary - "
    progress.info("%s%s", head, report.summary())
    if session is None or report.off is not None or not report.misses:
        return
    hinted: list[str] = []
    try:
        for digest, line in _miss_hints(report, session):
            hinted.append(digest)
            progress.info("  %s", line)
    except Exception as err:  # explaining is a courtesy: never fail the run for it
        logger.debug("could not explain the misses: %s", err)
    others = [(name, digest) for name, digest in report.misses if digest not in hinted]
    if others and (hinted or report.hits):  # a rerun that missed: which digests to explain
        shown = ", ".join(f"{name} {digest[:8]}" for name, digest in others[:EXPLAINED_MISSES])
        more = len(report.executed) - len(hinted) - min(len(others), EXPLAINED_MISSES)
        shown += f" and {more} more" if more > 0 else ""
        progress.info("  missed: %s (cachetool explain DIGEST says why)", shown)


def _miss_hints(report: CacheReport, session: Cache) -> Iterator[tuple[str, str]]:
    # explain sits above local in the layers; imported here, only when there are misses
    from jobflow_cache.admin.explain import Inputs, nearest, render

    store = session.store
    explained = 0
    recorded_now = frozenset(digest for _, digest in report.misses)  # compare with older ones
    for name, digest in report.misses:
        if explained == EXPLAINED_MISSES:
            break
        doc = next(iter(store.find({"digest": digest}, limit=1)), None)
        if doc is None:  # not recorded (the job failed)
            continue
        now = Inputs.from_document(doc)
        comparisons, _ = nearest(store, now, exclude=recorded_now, count=1)
        if not comparisons:
            continue
        explained += 1
        best = comparisons[0]
        if best.differences:
            first = best.differences[0]
            what = f"{first.path} {render(first.cached, 40)} \u2192 {render(first.now, 40)}"
            more = len(best.differences) - 1
            what += f" (+{more} more)" if more else ""
        elif best.cache_version is not None:
            what = f"cache_version {best.cache_version[0]} \u2192 {best.cache_version[1]}"
        else:
            what = ", ".join(best.changed or best.only_now or best.only_cached) or "inputs"
        yield digest, f"{name}: {what}; cachetool explain {digest[:8]}"


@contextmanager
def _progress(report: CacheReport, show: bool) -> Iterator[None]:
    """A live count of the run's jobs on stderr, on a terminal only (and without log lines)."""
    if not show or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    def text() -> str:
        done = len(report.served) + len(report.executed)
        return f"{done} jobs done ({len(report.served)} served from cache)"

    console = Console(stderr=True)
    with console.status(text()) as status:
        stop = threading.Event()

        def refresh() -> None:
            while not stop.wait(0.25):
                status.update(text())

        thread = threading.Thread(target=refresh, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


# -- the manager loop (jobflow/managers/local.py) --------------------------------------------------
class _LocalManager:
    """The state of one run: jobflow's ``_run``/``_run_job`` closures as methods."""

    def __init__(
        self,
        store: JobStore,
        cache: Cache | None,
        root_dir: Path,
        create_folders: bool,
        raise_immediately: bool,
        files: FilesMode | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.files = files  # run_locally(files=): for this run's jobs only
        self.root_dir = root_dir
        self.create_folders = create_folders
        self.raise_immediately = raise_immediately
        self.stopped_parents: set[str] = set()
        self.errored: set[str] = set()
        # the run's summary: the session's report, or one of its own when there is no cache
        self.report = cache.report if cache is not None else CacheReport(off=_off_reason())
        self.responses: dict[str, dict[int, Response]] = defaultdict(dict)
        self.stop_jobflow = False

    def run(self, root_flow: Flow) -> bool:
        """Run every job of ``root_flow`` in order; False if one failed or stopped the flow."""
        encountered_bad_response = False
        for job, parents in root_flow.iterflow():
            job_dir = self._job_dir()
            with chdir(job_dir):
                response, jobflow_stopped = self._run_job(job, parents)
            _freeze_between_jobs()
            if response is not None:
                response.job_dir = job_dir
            encountered_bad_response = encountered_bad_response or response is None
            if jobflow_stopped:
                return False
        return not encountered_bad_response

    def _run_job(self, job: Job, parents: list[str]) -> tuple[Response | None, bool]:
        if self.stop_jobflow:
            self.report.not_run.append(job.name)
            return None, True

        if not self.stopped_parents.isdisjoint(parents):
            # stop children has been called for one of the jobs' parents
            manager_log.info(f"{job.name} is a child of a job with stop_children=True, skipping...")
            self.stopped_parents.add(job.uuid)
            self.report.not_run.append(job.name)
            return None, False

        if (
            not self.errored.isdisjoint(parents)
            and job.config.on_missing_references == OnMissing.ERROR
        ):
            self.errored.add(job.uuid)
            self.report.not_run.append(job.name)
            return None, False

        if self.raise_immediately:
            try:
                response = self._execute(job)
            except Exception:
                self.report.failed.append(job.name)
                raise
        else:
            try:
                response = self._execute(job)
            except Exception as err:
                # the frames plain jobflow shows: none of the cache's
                shown = traceback.format_exception(
                    type(err), err, trim_traceback(err.__traceback__)
                )
                manager_log.info(f"{job.name} failed with exception:\n{''.join(shown)}")
                self.errored.add(job.uuid)
                self.report.failed.append(job.name)
                return None, False

        self.responses[job.uuid][job.index] = response

        if response.stored_data is not None:
            manager_log.warning("Response.stored_data is not supported with local manager.")

        if response.stop_children:
            self.stopped_parents.add(job.uuid)

        if response.stop_jobflow:
            self.stop_jobflow = True
            return None, True

        diversion_responses = []
        if response.replace is not None:
            # first run any restarts
            diversion_responses.append(self.run(cast("Flow", response.replace)))

        if response.detour is not None:
            # next any detours
            diversion_responses.append(self.run(cast("Flow", response.detour)))

        if response.addition is not None:
            # finally any additions
            diversion_responses.append(self.run(cast("Flow", response.addition)))

        if not all(diversion_responses):
            return None, False
        return response, False

    def _job_dir(self) -> Path:
        if self.create_folders:
            time_now = datetime.now(tz=timezone.utc).strftime(SETTINGS.DIRECTORY_FORMAT)
            job_dir = self.root_dir / f"job_{time_now}-{randint(10000, 99999)}"
            job_dir.mkdir()
            return job_dir
        return self.root_dir

    def _execute(self, job: Job) -> Response:
        """``job.run(store)``, its function call going through the cache (or none at all)."""
        function = job.function
        if self.cache is None:
            self.report.executed.append(job.name)
            if not is_cached_function(function):
                return job.run(store=self.store)
            stand_in: Any = _Undecorated(function)
            job.function = stand_in
            try:
                return job.run(store=self.store)
            finally:
                job.function = function
        # what this run knows of its folders wins over Cache(exclusive_dirs=) and
        # EXCLUSIVE_DIRS, for its own jobs only; and an entry is written once jobflow has
        # stored the job's output (Cache.accepting)
        folders = RUN_FOLDERS.set(self.create_folders)
        files = RUN_FILES.set(self.files)
        try:
            with self.cache.accepting(job):
                if is_cached_function(function):  # @cached_job: intercepts itself
                    return job.run(store=self.store)
                job.function = Intercept(self.cache, job, function)
                try:
                    return job.run(store=self.store)
                finally:
                    job.function = function
        finally:
            RUN_FILES.reset(files)
            RUN_FOLDERS.reset(folders)


class _Undecorated:
    """Stand-in for a ``@cached_job`` function in a run without cache: jobflow calls its
    ``.original``, the function as written (bound to its Maker for a method)."""

    __slots__ = ("original",)

    def __init__(self, function: Any) -> None:
        caching_call = getattr(function, "original", function)
        inner = getattr(caching_call, "__wrapped__", caching_call)
        bound = getattr(function, "__self__", None)
        if bound is not None and not isinstance(bound, types.ModuleType):
            inner = types.MethodType(inner, bound)
        self.original: Callable[..., Any] = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.original(*args, **kwargs)


@contextmanager
def chdir(path: Path) -> Iterator[None]:
    """``contextlib.chdir`` (what jobflow's ``monty.os.cd`` is), also on Python 3.10."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
