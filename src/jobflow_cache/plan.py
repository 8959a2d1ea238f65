"""``plan``: which jobs of a flow the cache serves ahead of submission, and serving them.

A job can be served before its flow is submitted when every job it depends on is served too
(or already in the JobStore): its inputs, and so its digest, are known now. :func:`plan` walks
the flow in jobflow's order and says, for every job, ``served`` (its entry is servable now),
``run`` (its digest is known, but the cache will not serve it here: a miss, an invalid entry,
caching off, or a dynamic job whose replay cannot be served whole) or ``unknown`` (it depends
on a job that will run). :meth:`Plan.apply` then serves the ``served`` jobs into a JobStore,
exactly as jobflow stores them, with their files in run folders on the shared file system,
and returns the flow of the jobs still to run.

How it stays true to the worker
-------------------------------
There is no second hashing path. Both :func:`plan` and :meth:`Plan.apply` run the candidate
jobs through jobflow's own ``Job.run``, whose function call goes through :meth:`.Cache.call`
as on any worker, in a *serve-only* session (:class:`_ServeOnly`): a hit is served (files
placed in the job's folder, uuids and folders rewritten, the ``Response`` replayed) and a
miss raises instead of running the function. References are resolved from a staging JobStore
(in memory) holding the outputs the served upstream jobs were given, decoded as a hit decodes
them, and the outputs of upstream jobs already in the given JobStore. :func:`plan` does this
in a temporary folder and writes nothing to the cache (no hit counts, no folder records);
:meth:`Plan.apply` does it in the served folders, then copies each served job's documents from
the staging store into the JobStore: its additional-store blobs first, its documents last, so
a failure leaves no document pointing at nothing, and the job stays in the flow.

Managers hand a job its inputs in three ways
---------------------------------------------
A digest sees the difference between a tuple and a list, so ``plan(flow, manager=...)`` gives
every job the arguments the manager's worker would give it, made by the manager's own code:

* ``"local"``, ``"jobflow"`` (the default): our ``run_locally`` and jobflow's call the job
  as it is in memory, its references resolved from the JobStore into decoded objects;
* ``"fireworks"``: the job travels in its Firework, through FireWorks' serialization (a
  tuple argument arrives as a list); the rocket resolves its references like ``Job.run``;
* ``"jobflow-remote"``: the job travels as JSON through the queue database, and its runner
  resolves the references before uploading it through ``jsanitize`` and JSON, so upstream
  values arrive as JSON too (a ``TaskDoc``'s stress, a pydantic tuple, as lists).

A plan made for another manager than the one that runs the flow only costs submissions: a
digest that differs from the worker's is a miss there, never a wrong hit.
"""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import logging
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

from jobflow import Flow, Job, JobStore, Response
from jobflow.core.flow import get_flow
from maggma.stores import MemoryStore

from jobflow_cache.errors import CacheError, CacheWarning, warn
from jobflow_cache.execution.cache import (
    META_KEY,
    RUN_FILES,
    RUN_FOLDERS,
    SKIP_FUNCTIONS,
    Cache,
    JobOptions,
    is_cached_function,
)
from jobflow_cache.execution.call import Intercept, Role
from jobflow_cache.local.manager import chdir
from jobflow_cache.local.view import indexed_view
from jobflow_cache.marking import cache_flow
from jobflow_cache.settings import cache_disabled
from jobflow_cache.store import CacheStore, Outcome

__all__ = ["Plan", "PlannedJob", "plan"]

logger = logging.getLogger(__name__)

Status = Literal["served", "run", "unknown"]

#: The function, positional and keyword arguments a worker calls a job with.
_WorkerForm = Callable[[Job, JobStore], tuple[Any, tuple[Any, ...], dict[str, Any]]]


def _called(worker_job: Job) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
    """What the worker calls: ``worker_job``'s function and arguments."""
    return (
        worker_job.function,
        tuple(worker_job.function_args),
        dict(worker_job.function_kwargs),
    )


def _as_jobflow_remote_worker(job: Job, store: JobStore) -> tuple[Any, tuple[Any, ...], dict]:
    """The function and arguments a jobflow-remote worker calls ``job`` with: the runner
    resolves the references of the job's JSON form (as the queue database holds it) from the
    JobStore and uploads the job through ``jsanitize`` and orjson; the worker decodes it with
    monty. The references are resolved as its ``resolve_job_dict_args`` does (less its check
    that the project configures the job's additional stores: the staging store has none), the
    upload is its own ``get_remote_in_file``."""
    import orjson
    from jobflow.core.reference import OnMissing, find_and_resolve_references
    from jobflow_remote.remote.data import get_remote_in_file
    from monty.json import MontyDecoder

    job_dict = json.loads(job.to_json())
    config = job_dict["config"]
    if config["resolve_references"]:
        on_missing = OnMissing(config["on_missing_references"])
        cache: dict[str, Any] = {}
        for name in ("function_args", "function_kwargs"):
            job_dict[name] = find_and_resolve_references(
                job_dict[name], store, cache=cache, on_missing=on_missing
            )
        job_dict["function_args"] = tuple(job_dict["function_args"])
    uploaded = orjson.loads(get_remote_in_file(job_dict, None).getvalue())
    return _called(MontyDecoder().process_decoded(uploaded["job"]))


def _as_fireworks_worker(job: Job, store: JobStore) -> tuple[Any, tuple[Any, ...], dict]:
    """The function and arguments a FireWorks rocket calls ``job`` with, its references still
    to resolve (the rocket resolves them from the JobStore, as ``Job.run`` then does here):
    the job goes into a Firework as jobflow's ``flow_to_workflow`` puts it there, through
    FireWorks' own serialization and back (a tuple argument arrives as a list)."""
    from fireworks import Firework
    from jobflow.managers.fireworks import job_to_firework

    firework = job_to_firework(job, store)  # the store is only named in it, never read
    return _called(Firework.from_dict(json.loads(firework.to_format("json"))).tasks[0]["job"])


#: Per manager: the module its worker form needs, and the form (None: the job as it is here).
_FORMS: dict[str, tuple[str, _WorkerForm] | None] = {
    "local": None,
    "jobflow": None,
    "fireworks": ("fireworks", _as_fireworks_worker),
    "jobflow-remote": ("jobflow_remote.remote.data", _as_jobflow_remote_worker),
}

#: The managers :func:`plan` knows how to hand a job its inputs as.
MANAGERS = tuple(_FORMS)


def _worker_form(manager: str | None) -> _WorkerForm | None:
    """How a worker of ``manager`` gets a job's inputs (None: the job as it is here)."""
    if manager is not None and manager not in _FORMS:
        raise ValueError(f"manager must be one of {MANAGERS} or None, not {manager!r}")
    needed = _FORMS[manager] if manager is not None else None
    if needed is None:
        return None
    module, form = needed
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise CacheError(
            f"plan(manager={manager!r}) needs {manager} installed in this process ({err})"
        ) from None
    return form


#: Why a job the cache does not serve runs, by the outcome :meth:`.Cache.call` came to.
_REASONS = {
    Outcome.MISS: "not in the cache",
    Outcome.INVALID: "its cached entry cannot be served",
    Outcome.DISABLED: "caching is turned off for it",
    Outcome.UNCACHEABLE: "it cannot be cached (its input cannot be hashed, or it reads the "
    "JobStore)",
    Outcome.ERROR: "the cache store is unavailable",
}


@dataclass(frozen=True)
class PlannedJob:
    """What the cache does with one job of a planned flow."""

    name: str
    uuid: str
    #: ``served`` (served ahead of submission), ``run`` (submitted: its digest is known but
    #: it is not served ahead) or ``unknown`` (submitted: it waits for a job that runs)
    status: Status
    #: its digest, when known (``served`` and most ``run`` jobs)
    digest: str | None
    reason: str
    #: jobs its replay makes (a served dynamic job: ``replace``/``addition``)
    new_jobs: int = 0
    #: a ``run`` job the cache holds a servable entry of: the worker serves it
    served_on_worker: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The row as JSON values."""
        return {
            "name": self.name,
            "uuid": self.uuid,
            "status": self.status,
            "digest": self.digest,
            "reason": self.reason,
            "new_jobs": self.new_jobs,
            "served_on_worker": self.served_on_worker,
        }


class _NotServedError(Exception):
    """A serve-only session found no servable entry: the job would run."""

    def __init__(self, outcome: Outcome, digest: str | None, why: str | None = None) -> None:
        super().__init__(why or _REASONS.get(outcome, outcome.value))
        self.outcome = outcome
        self.digest = digest


class _BlockedError(Exception):
    """A served job whose response cannot be served ahead (the worker serves it)."""


class _ServeOnly(Cache):
    """A cache session that serves hits and never runs a job function.

    Everything up to the decision is :meth:`.Cache.call` itself (options, digest, lookup, the
    checks of a hit, placing files, rewriting uuids and folders); where the worker would run
    the function (a miss, an unservable entry, caching off) its :class:`.Role` raises
    :class:`_NotServedError` instead. Job uuids and run folders of other processes are looked
    up in the store, as a worker outside ``run_locally`` does, and no digest is claimed
    (nothing runs). With ``record`` False (:func:`plan`) nothing is written to the cache; with
    ``record`` True (:meth:`Plan.apply`) hits are counted and the served jobs' uuids and
    folders recorded, for the workers that run their children.
    """

    def __init__(self, base: Cache, *, record: bool) -> None:
        role = Role(refuse=_refuse, writes=record, lineage_in_store=True, dedup=False)
        super().__init__(
            base.store, files=base._files, exclusive_dirs=True, settings=base.settings, role=role
        )
        # a store that could not be built stays unusable here too
        self.store_session.spec_error = base.store_session.spec_error


def _refuse(outcome: Outcome, digest: str | None, why: str | None) -> NoReturn:
    """Where the worker would run the function: the job is not served (why: a folder
    conflict, refresh mode)."""
    raise _NotServedError(outcome, digest, why)


class _PlanIntercept(Intercept):
    """``job.function`` for an unmarked job (when :func:`.cache_flow` is unavailable): the
    cache's call with the plan's options."""

    __slots__ = ("_options",)

    def __init__(self, cache: Cache, job: Job, function: Any, options: JobOptions) -> None:
        super().__init__(cache, job, function)
        self._options = options

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self._instance is not None:
            args = (self._instance, *args)
        return self._cache.call(self._job, self._function, args, kwargs, self._options)


class _AnyStores(dict[str, MemoryStore]):
    """Additional stores of the staging JobStore: a connected ``MemoryStore`` for any name."""

    def __missing__(self, name: str) -> MemoryStore:
        store = MemoryStore(collection_name=f"plan_{name}")
        store.connect()
        self[name] = store
        return store


def _additional(job_store: JobStore) -> dict[str, Any]:
    """The additional stores of ``job_store`` (a dict, possibly empty)."""
    stores: Any = getattr(job_store, "additional_stores", None)
    return stores if stores is not None else {}


def _staging_store() -> JobStore:
    """An in-memory JobStore, indexed by uuid as in ``run_locally`` (linear in the jobs)."""
    docs = MemoryStore(collection_name="plan_docs")
    stores: Any = _AnyStores()
    store = JobStore(docs, additional_stores=stores)
    store.connect()
    return indexed_view(store)


def _clean(docs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in doc.items() if k != "_id"} for doc in docs]


def _upstream(job: Job, parents: Sequence[str] = ()) -> list[str]:
    """Uuids of the jobs ``job`` references and of its ``parents`` in jobflow's graph (which
    holds the order of a ``JobOrder.LINEAR`` flow too), in a stable order."""
    return sorted({ref.uuid for ref in job.input_references}.union(parents))


@dataclass
class _Served:
    """One top-level job served in a walk, with the jobs its replay made."""

    job: Job
    uuids: list[str] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: jobs its replay made (jobflow's own ``store_inputs`` book-keeping jobs not counted)
    made: int = 0


def _new_folder(root: Path, name: str) -> Path:
    """The folder ``root/name``, made now (``name.2``, ``name.3``, ... when that is taken: a
    second apply of one plan, a folder of the user's): served files never go into, and a
    failure never removes, a folder that apply did not create. ``root`` exists (apply made it,
    or plan's scratch folder)."""
    for n in itertools.count(1):
        folder = root / (name if n == 1 else f"{name}.{n}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise AssertionError("unreachable")  # pragma: no cover


class _Walk:
    """Serve the jobs of a flow in jobflow's order, as far as they can be served."""

    def __init__(
        self,
        session: _ServeOnly,
        staging: JobStore,
        root: Path,
        external: set[str],
        options: JobOptions,
        marked: bool,
        allowed: set[str] | None = None,
        worker_form: _WorkerForm | None = None,
    ) -> None:
        self.session = session
        self.worker_form = worker_form
        self.staging = staging
        self.root = root
        self.external = external
        self.options = options
        self.marked = marked
        self.allowed = allowed
        self.rows: dict[str, PlannedJob] = {}
        self.served: set[str] = set()
        self.committed: list[_Served] = []
        self.problems: list[str] = []
        self.folders: dict[str, Path] = {}
        self.parents: dict[str, list[str]] = {}

    def walk(self, flow: Flow) -> None:
        for job, parents in flow.iterflow():
            self.parents[job.uuid] = parents
            self.rows[job.uuid] = self._plan_job(job, parents)

    def _plan_job(self, job: Job, parents: Sequence[str]) -> PlannedJob:
        upstream = _upstream(job, parents)
        waiting = [u for u in upstream if u not in self.served and u not in self.external]
        if waiting:
            first = self.rows.get(waiting[0])
            what = f"{first.name} ({first.status})" if first is not None else waiting[0]
            where = "" if first is not None else ", which is not in the JobStore"
            return PlannedJob(job.name, job.uuid, "unknown", None, f"waits for {what}{where}")
        if self.allowed is not None and job.uuid not in self.allowed:
            return PlannedJob(job.name, job.uuid, "run", None, "not planned to be served")
        served = _Served(job)
        try:
            digest = self._serve(job, served, top=True)
        except _NotServedError as err:
            self._discard(served)
            return PlannedJob(job.name, job.uuid, "run", err.digest, self._why(err, served))
        except _BlockedError as err:
            self._discard(served)
            digest = _digest_of(job)
            return PlannedJob(
                job.name,
                job.uuid,
                "run",
                digest,
                f"cached, served on the worker: {err}",
                served_on_worker=True,
            )
        except Exception as err:  # whatever it is, the job is simply submitted
            self._discard(served)
            reason = f"cannot be served ahead ({type(err).__name__}: {err})"
            if served.problems:
                reason += f"; {served.problems[0]}"
            return PlannedJob(job.name, job.uuid, "run", _digest_of(job), reason)
        self.committed.append(served)
        self.served.update(served.uuids)
        new_jobs = served.made
        reason = "served from the cache"
        if new_jobs:
            reason += f" with the {new_jobs} job{'s' if new_jobs > 1 else ''} its replay makes"
        return PlannedJob(job.name, job.uuid, "served", digest, reason, new_jobs=new_jobs)

    @staticmethod
    def _why(err: _NotServedError, served: _Served) -> str:
        reason = str(err)
        if served.problems:
            reason += f": {served.problems[0]}"
        return reason

    def _discard(self, served: _Served) -> None:
        """Forget a job that is not served ahead (its folders go; its staging documents stay
        unexported, and no job depending on it is served)."""
        self.problems.extend(served.problems)
        for folder in served.folders:
            shutil.rmtree(folder, ignore_errors=True)

    def _serve(self, job: Job, served: _Served, top: bool = False) -> str | None:
        """Serve ``job`` (and its replay, recursively) into the staging store; its digest."""
        folder = _new_folder(self.root, job.uuid if job.index == 1 else f"{job.uuid}-{job.index}")
        served.folders.append(folder)
        response = self._run(job, folder, served)
        served.uuids.append(job.uuid)
        if not top and not _is_store_inputs(job):
            served.made += 1
        self.folders.setdefault(job.uuid, folder)
        digest = _digest_of(job)
        if response.detour is not None:
            raise _BlockedError("its replay makes a detour")
        if response.stop_children:
            raise _BlockedError("it stops its children")
        if response.stop_jobflow:
            raise _BlockedError("it stops the flow")
        for part in (response.replace, response.addition):
            if part is None:
                continue
            for new, parents in part.iterflow():
                known = set(served.uuids)
                waiting = [
                    u
                    for u in _upstream(new, parents)
                    if u not in known and u not in self.served and u not in self.external
                ]
                if waiting:
                    what = f"its replay makes {new.name}, which waits for {waiting[0]}"
                    raise _BlockedError(what)
                try:
                    self._serve(new, served)
                except _NotServedError as err:
                    raise _BlockedError(f"its replay makes {new.name}, which is {err}") from err
        return digest

    def _run(self, job: Job, folder: Path, served: _Served) -> Response:
        """jobflow's ``Job.run`` of ``job`` in ``folder``, through the serve-only session."""
        original = function = job.function
        inputs = job.function_args, job.function_kwargs
        if self.worker_form is not None:  # the inputs as this manager's worker gets them
            function, job.function_args, job.function_kwargs = self.worker_form(job, self.staging)
            job.function = function
        folders = RUN_FOLDERS.set(True)
        files = RUN_FILES.set(None)
        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught, chdir(folder):
                warnings.simplefilter("always")
                try:
                    if self.marked or is_cached_function(function):
                        return job.run(store=self.staging, job_dir=folder)
                    job.function = _PlanIntercept(self.session, job, function, self.options)
                    return job.run(store=self.staging, job_dir=folder)
                finally:
                    job.function = original
                    job.function_args, job.function_kwargs = inputs
        finally:
            RUN_FILES.reset(files)
            RUN_FOLDERS.reset(folders)
            # outside the block that records them: passed on inside it, a warning was
            # recorded again, and this loop never ended
            _pass_on(caught, served)


def _pass_on(caught: list[warnings.WarningMessage], served: _Served) -> None:
    """The cache's warnings of a job served ahead become its problems; the others are
    warned again, to the caller's filters."""
    for message in caught:
        if issubclass(message.category, CacheWarning):
            served.problems.append(str(message.message).removeprefix("jobflow-cache: "))
        else:
            warnings.warn_explicit(
                message.message, message.category, message.filename, message.lineno
            )


def _is_store_inputs(job: Job) -> bool:
    function = getattr(job.function, "function", job.function)  # marked: the one it holds
    inner = getattr(function, "original", function)
    name = f"{getattr(inner, '__module__', '')}:{getattr(inner, '__qualname__', '')}"
    return name in SKIP_FUNCTIONS


def _digest_of(job: Job) -> str | None:
    record = job.metadata.get(META_KEY) if job.metadata else None
    digest = record.get("digest") if isinstance(record, Mapping) else None
    return str(digest) if digest else None


def _session_of(cache: Cache | CacheStore | None) -> Cache:
    if isinstance(cache, Cache):
        return cache
    return Cache(cache)


def _external_uuids(flow: Flow) -> set[str]:
    """Uuids the jobs of ``flow`` reference that are not jobs of ``flow``."""
    inside = set(flow.job_uuids)
    return {u for job, _ in flow.iterflow() for u in _upstream(job)} - inside


def _seed(staging: JobStore, job_store: JobStore | None, uuids: set[str]) -> set[str]:
    """Copy the documents (and blobs) of ``uuids`` from ``job_store`` into ``staging``; the
    uuids found there."""
    if job_store is None or not uuids:
        return set()
    docs = _clean(list(job_store.docs_store.query({"uuid": {"$in": sorted(uuids)}})))
    found = {doc["uuid"] for doc in docs}
    if not found:
        return set()
    staging.docs_store.update(docs, key=["uuid", "index"])
    for name, store in _additional(job_store).items():
        blobs = _clean(list(store.query({"job_uuid": {"$in": sorted(found)}})))
        if blobs:
            _additional(staging)[name].update(blobs, key="blob_uuid")
    return found


def _mark_flow(flow: Flow, options: Mapping[str, Any]) -> bool:
    """:func:`.cache_flow` on ``flow``; False when marking is not available."""
    try:
        cache_flow(flow, **options)
    except NotImplementedError:  # pragma: no cover - before cache_flow landed
        return False
    return True


def _options(options: Mapping[str, Any]) -> JobOptions:
    return JobOptions().merged(options)


def _remaining(flow: Flow, served: set[str], root: bool = True) -> Flow | None:
    """``flow`` (changed in place) without the ``served`` jobs; empty subflows dropped."""
    kept: list[Flow | Job] = []
    for child in flow.jobs:
        if isinstance(child, Flow):
            sub = _remaining(child, served, root=False)
            if sub is not None:
                kept.append(sub)
        elif child.uuid not in served:
            kept.append(child)
    if not kept and not root:
        return None
    flow.jobs = kept
    return flow


class Plan:
    """What the cache serves of a flow ahead of submission (made by :func:`plan`).

    Iterating gives one :class:`PlannedJob` per job of the flow, in jobflow's order.
    """

    def __init__(
        self,
        flow: Flow,
        jobs: list[PlannedJob],
        cache: Cache,
        options: Mapping[str, Any],
        served_dir: Path | None,
        job_store: JobStore | None,
        manager: str | None = None,
    ) -> None:
        self._flow = flow  # a copy of the planned flow, never run
        self.manager = manager
        self.jobs = jobs
        self._cache = cache
        self._options = dict(options)
        self._served_dir = served_dir
        self._job_store = job_store
        #: uuids served by the last :meth:`apply`, and their run folders
        self.applied: dict[str, Path] = {}

    def __iter__(self) -> Iterator[PlannedJob]:
        return iter(self.jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __repr__(self) -> str:
        return f"<Plan: {self.summary()}>"

    def with_status(self, status: Status) -> list[PlannedJob]:
        """The jobs of one status."""
        return [job for job in self.jobs if job.status == status]

    @property
    def served(self) -> list[PlannedJob]:
        """Jobs served ahead of submission."""
        return self.with_status("served")

    def counts(self) -> dict[str, int]:
        """Jobs by status."""
        return {s: len(self.with_status(s)) for s in ("served", "run", "unknown")}

    def summary(self) -> str:
        """E.g. ``"5 jobs: 3 served ahead, 1 to run, 1 unknown"``."""
        counts = self.counts()
        total = len(self.jobs)
        return (
            f"{total} job{'' if total == 1 else 's'}: {counts['served']} served ahead, "
            f"{counts['run']} to run, {counts['unknown']} unknown until something runs"
        )

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON values."""
        return {
            "summary": self.summary(),
            "counts": self.counts(),
            "jobs": [job.to_dict() for job in self.jobs],
        }

    def served_dir(self) -> Path:
        """Where :meth:`apply` places the run folders of served jobs."""
        if self._served_dir is not None:
            return self._served_dir
        setting = getattr(self._cache.settings, "SERVED_DIR", None)
        if setting:
            return Path(setting).expanduser()
        return Path(self._cache.store.objects_dir).expanduser().parent / "served"

    def apply(self, job_store: JobStore, served_dir: str | Path | None = None) -> Flow:
        """Serve the ``served`` jobs into ``job_store``; return the flow still to run.

        Each served job (and each job its replay makes) is run by jobflow's ``Job.run`` in a
        folder of its own, ``<served_dir>/<uuid>`` (``<uuid>.2``, ... when that exists: never
        a folder apply did not make), through the cache in a serve-only mode: its output,
        metadata and additional-store data reach ``job_store`` exactly as a worker serving it
        would store them, its files are placed in its folder, and its uuid and folder are
        recorded in the cache for the workers that run its children.
        A job that cannot be served now (the store is down, a file object is missing, the
        entry turned out invalid) stays in the flow, and so does every job that depends on
        it: no document of it is written.

        The returned flow keeps the nested structure, names, uuids and metadata of the
        planned one, without the served jobs (empty subflows dropped); its references to
        served jobs are resolved from ``job_store``, so submit it with external references
        allowed (``run_locally(flow, store=job_store, allow_external_references=True)``,
        ``flow_to_workflow(flow, allow_external_references=True)``, jobflow-remote's
        ``submit_flow(flow, allow_external_references=True)``). Its jobs are marked with
        :func:`.cache_flow` and the plan's options, so any manager serves or records them.
        It is empty when the whole flow was served: nothing to submit.

        Parameters
        ----------
        job_store
            The JobStore the remaining flow will run with.
        served_dir
            Folder of the served jobs' run folders (default: the one given to :func:`plan`,
            else ``JOBFLOW_CACHE_SERVED_DIR``, else ``served`` beside the object area).
        """
        planned = {job.uuid for job in self.jobs if job.status == "served"}
        root = Path(served_dir).expanduser() if served_dir is not None else self.served_dir()
        served: set[str] = set()
        self.applied = {}
        if planned:
            try:
                job_store.connect()
                root.mkdir(parents=True, exist_ok=True)
                served = self._serve_into(job_store, root.resolve(), planned)
            except Exception as err:  # nothing is served ahead: the whole flow is submitted
                warn(
                    f"jobflow-cache: no job is served ahead of submission ({err}); "
                    "the whole flow is submitted",
                    stacklevel=2,
                )
                served = set()
        remaining = copy.deepcopy(self._flow)
        _remaining(remaining, served)
        _mark_flow(remaining, self._options)
        return remaining

    def _serve_into(self, job_store: JobStore, root: Path, planned: set[str]) -> set[str]:
        flow = copy.deepcopy(self._flow)
        marked = _mark_flow(flow, self._options)
        staging = _staging_store()
        external = _seed(staging, job_store, _external_uuids(flow))
        session = _ServeOnly(self._cache, record=True)
        walk = _Walk(
            session,
            staging,
            root,
            external,
            _options(self._options),
            marked,
            planned,
            _worker_form(self.manager),
        )
        with session.activate():
            walk.walk(flow)
        failed: set[str] = set()
        served: set[str] = set()
        broken: str | None = None  # the JobStore failed: nothing more is written to it
        for item in walk.committed:
            job = item.job
            upstream = _upstream(job, walk.parents.get(job.uuid, ()))
            if broken is not None or failed.intersection(upstream):
                failed.update(item.uuids)
                self._remove_folders(item)
                continue
            try:
                _export(staging, job_store, item.uuids)
            except Exception as err:  # this job (and its children) are submitted instead
                if isinstance(err, CacheError):
                    what = f"job {job.name!r} is not served ahead of submission"
                else:
                    what = (
                        f"job {job.name!r} and the jobs after it are not served ahead of submission"
                    )
                    broken = str(err)
                warn(
                    f"jobflow-cache: {what}: its documents cannot be written to the "
                    f"JobStore ({err})",
                    stacklevel=3,
                )
                failed.update(item.uuids)
                self._remove_folders(item)
                continue
            served.update(item.uuids)
            for uuid in item.uuids:
                if uuid in walk.folders:
                    self.applied.setdefault(uuid, walk.folders[uuid])
        if walk.problems:
            warn(
                f"jobflow-cache: {len(walk.problems)} planned job(s) cannot be served ahead "
                f"of submission and are submitted instead: {walk.problems[0]}",
                stacklevel=3,
            )
        return served

    @staticmethod
    def _remove_folders(item: _Served) -> None:
        for folder in item.folders:
            shutil.rmtree(folder, ignore_errors=True)


def _export(staging: JobStore, job_store: JobStore, uuids: list[str]) -> None:
    """Copy the staged documents of ``uuids`` into ``job_store``: blobs first, then the
    job documents, all of them in one write (no document points at a blob not written)."""
    criteria = {"uuid": {"$in": sorted(set(uuids))}}
    docs = _clean(list(staging.docs_store.query(criteria)))
    if not docs:
        raise CacheError("nothing was staged")
    blobs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for name, store in _additional(staging).items():
        found = _clean(list(store.query({"job_uuid": {"$in": sorted(set(uuids))}})))
        if found:
            blobs[name] = found
    targets = _additional(job_store)
    missing = sorted(set(blobs) - set(targets))
    if missing:
        raise CacheError(f"the JobStore has no additional store {missing[0]!r}")
    for name, found in blobs.items():
        targets[name].update(found, key="blob_uuid")
    job_store.docs_store.update(docs, key=["uuid", "index"])


def plan(
    flow: Flow | Job | list[Job],
    *,
    cache: Cache | CacheStore | None = None,
    job_store: JobStore | None = None,
    served_dir: str | Path | None = None,
    manager: str | None = None,
    **options: Any,
) -> Plan:
    """Which jobs of ``flow`` the cache serves ahead of submission, which run, which wait.

    For every job of ``flow`` (nested flows included), in jobflow's order: ``served`` when
    every job it depends on is served too (or already in ``job_store``), so its inputs and
    digest are known now, and the cache holds a servable entry of it; ``run`` when its
    digest is known but the job is not served ahead (not cached, an invalid entry, caching
    off, or a dynamic job whose replay cannot be served whole: the reason says when the
    worker serves it); ``unknown`` when it depends on a job that runs. A dynamic job is
    served ahead only when every job its replay makes is served too, and never when it makes
    a detour or stops its children or the flow. The digests are the worker's own: the jobs
    go through :meth:`.Cache.call` (see :mod:`jobflow_cache.plan`). Nothing is written: not
    to the cache, not to ``job_store``, not to the flow.

    Parameters
    ----------
    flow
        A Flow, a Job, or a list of jobs. References to jobs outside it are resolved from
        ``job_store``.
    cache
        The cache (default: the one configured by the ``JOBFLOW_CACHE_*`` settings).
    job_store
        A JobStore whose jobs count as done (the remaining flow of an earlier plan).
    served_dir
        Where :meth:`Plan.apply` places the served jobs' run folders (see there).
    manager
        Which manager will run the flow, as far as it changes a job's inputs: ``None``,
        ``"local"`` or ``"jobflow"`` (the jobs as they are in memory, the default),
        ``"fireworks"`` (as a rocket gets them from its Firework: tuples arrive as lists) or
        ``"jobflow-remote"`` (as its worker gets them: sent as JSON, references resolved by
        the runner). The manager must be installed. A job planned for another manager than
        the one that runs it may be left to run; it is never served wrongly.
    **options
        The options of :func:`.cache_flow` (``cache_version``, ``ignore``, ``env``,
        ``files``, ``enabled``, ``mode``): the jobs are planned, and the remaining flow is
        marked, with them.

    Examples
    --------
    >>> from jobflow import Flow, job
    >>> from jobflow_cache import Cache, CacheStore, plan, run_locally
    >>> from maggma.stores import MemoryStore
    >>> @job
    ... def add(a, b):
    ...     return a + b
    >>> tmp = getfixture("tmp_path")
    >>> cache = Cache(CacheStore(MemoryStore(), objects_dir=str(tmp / "objects")))
    >>> first = add(1, 2)
    >>> flow = Flow([first, add(first.output, 3)])
    >>> out = run_locally(flow, log=False, cache=cache, create_folders=True, root_dir=tmp)
    >>> first = add(1, 2)  # rebuilt: new uuids, the same first job, a new second one
    >>> flow = Flow([first, add(first.output, 4), add(5, 6)])
    >>> [(job.status, job.reason) for job in plan(flow, cache=cache)][:2]
    [('served', 'served from the cache'), ('run', 'not in the cache')]
    """
    worker_form = _worker_form(manager)  # an unknown manager: ValueError, before anything
    flow = get_flow(flow, allow_external_references=True)
    session = _session_of(cache)
    kept = copy.deepcopy(flow)
    rows: list[PlannedJob]
    if cache_disabled():
        rows = [
            PlannedJob(job.name, job.uuid, "run", None, "the cache is turned off")
            for job, _ in kept.iterflow()
        ]
    else:
        rows = _plan_rows(kept, session, job_store, options, worker_form)
    return Plan(
        kept,
        rows,
        session,
        options,
        Path(served_dir).expanduser() if served_dir is not None else None,
        job_store,
        manager,
    )


def _plan_rows(
    flow: Flow,
    session: Cache,
    job_store: JobStore | None,
    options: Mapping[str, Any],
    worker_form: _WorkerForm | None = None,
) -> list[PlannedJob]:
    simulated = copy.deepcopy(flow)
    marked = _mark_flow(simulated, options)
    staging = _staging_store()
    if job_store is not None:
        job_store.connect()
    external = _seed(staging, job_store, _external_uuids(simulated))
    serve_only = _ServeOnly(session, record=False)
    scratch = Path(tempfile.mkdtemp(prefix="jobflow-cache-plan-")).resolve()
    try:
        walk = _Walk(
            serve_only, staging, scratch, external, _options(options), marked, None, worker_form
        )
        with serve_only.activate():
            walk.walk(simulated)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [walk.rows[job.uuid] for job, _ in flow.iterflow()]
