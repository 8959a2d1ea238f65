"""One job's call as the cache sees it (:class:`Call`), and what a session may do (:class:`Role`).

A :class:`Call` is made once per job by :meth:`.Cache.call` and handed to every part of the
execution core (lineage, recording, serving, in-flight dedup) instead of loose values: the
job, the unbound function and its resolved arguments, the job's options, the cache mode and
files mode that hold for it, the job uuids and run folders met while hashing its inputs
(:class:`Refs`) and, once hashed, its :class:`.CallDigest`. It is frozen: :meth:`Call.hashed`
gives the hashed one.

A :class:`Role` is the seam for sessions that do less than a worker (:mod:`.plan`'s serve-only
session): what happens where a job would run, whether the store is written, where upstream
jobs are looked up. :class:`Intercept` is the stand-in for ``job.function`` that routes
jobflow's call into :meth:`.Cache.call`.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from jobflow import Job

from jobflow_cache.errors import trim_traceback
from jobflow_cache.execution.options import FilesMode, JobOptions
from jobflow_cache.hashing.canonical import CallDigest
from jobflow_cache.store import Outcome

__all__ = ["Call", "CallsJobs", "Intercept", "Refs", "Role"]


@dataclass
class Refs:
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


@dataclass(frozen=True)
class Call:
    """One job's call of its function through the cache.

    Examples
    --------
    >>> from jobflow import job
    >>> @job
    ... def add(a, b):
    ...     return a + b
    >>> call = Call(add(1, 2), add.original, (1, 2), {}, JobOptions(), "readwrite", "copy")
    >>> call.run(), call.write, call.call_digest is None
    (3, True, True)
    """

    job: Job
    #: the unbound job function (for a method, ``args[0]`` is the instance)
    function: Callable[..., Any]
    args: Sequence[Any]
    kwargs: Mapping[str, Any]
    options: JobOptions
    #: the cache mode that holds for this job (its option, else the ``MODE`` setting); not
    #: checked yet: :meth:`.Cache.call` runs a job with an unknown mode uncached
    mode: str
    #: how this job's run-folder files are recorded and placed (its option, else the run's)
    files: FilesMode
    #: the job uuids and run folders its inputs name (filled while hashing)
    refs: Refs = field(default_factory=Refs)
    #: the digest of the call, once hashed (:meth:`hashed`)
    call_digest: CallDigest | None = None

    @property
    def digest(self) -> str:
        """The hex digest (of a hashed call: :meth:`hashed`)."""
        if self.call_digest is None:
            raise ValueError(f"the call of job {self.job.name!r} is not hashed yet")
        return self.call_digest.digest

    @property
    def write(self) -> bool:
        """False in ``read_only`` mode: serve hits, write nothing to the store."""
        return self.mode != "read_only"

    def hashed(self, call_digest: CallDigest) -> Call:
        """This call with its digest (made directly: ``dataclasses.replace`` reads the fields
        of the class again on every call)."""
        return Call(
            self.job,
            self.function,
            self.args,
            self.kwargs,
            self.options,
            self.mode,
            self.files,
            self.refs,
            call_digest,
        )

    def run(self) -> Any:
        """Call the function (what jobflow would have done)."""
        return self.function(*self.args, **self.kwargs)


#: What a session does instead of running a job it does not serve: called with the outcome,
#: the digest (None when not hashed) and why (a folder conflict, refresh mode), it raises.
Refusal = Callable[[Outcome, str | None, str | None], NoReturn]


@dataclass(frozen=True)
class Role:
    """What a cache session may do besides serving hits (a worker's: everything).

    Examples
    --------
    >>> Role().runs, Role(writes=False).writes
    (True, False)
    """

    #: None: a job the cache does not serve runs (and is recorded); else this is called
    #: instead, and raises (a miss, an unservable entry, caching off, an unusable store)
    refuse: Refusal | None = None
    #: False: nothing is written to the store (no entry, no hit count, no job or folder
    #: record); claims and aliases are still read
    writes: bool = True
    #: True: job uuids and run folders the session does not know are looked up in the store
    #: (recorded there by other processes), also inside an activated run
    lineage_in_store: bool = False
    #: False: never claim a digest (in-flight dedup off whatever DEDUP says)
    dedup: bool = True

    @property
    def runs(self) -> bool:
        """Whether jobs the cache does not serve run."""
        return self.refuse is None


class CallsJobs(Protocol):
    """What :class:`Intercept` needs of a cache: its :meth:`.Cache.call`."""

    def call(
        self,
        job: Job,
        function: Callable[..., Any],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: JobOptions,
    ) -> Any: ...


class Intercept:
    """Stand-in for ``job.function`` during ``Job.run``: jobflow calls its ``.original``.

    For a method (a Maker's ``make``) the unbound function is called with the instance first,
    which is exactly the bound call, and lets the instance's fields enter the digest.
    """

    __slots__ = ("_cache", "_function", "_instance", "_job", "original")

    def __init__(self, cache: CallsJobs, job: Job, function: Any) -> None:
        self._cache, self._job = cache, job
        bound = getattr(function, "__self__", None)
        self._function = getattr(function, "original", function)
        self._instance = None if isinstance(bound, types.ModuleType) else bound
        self.original = self._call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    @property
    def instance(self) -> Any:
        """The instance whose method the job runs (a Maker), None for a plain function."""
        return self._instance

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self._instance is not None:
            args = (self._instance, *args)
        try:
            return self._cache.call(self._job, self._function, args, kwargs, JobOptions())
        except BaseException as err:  # the job's own error: without the cache's frames
            raise err.with_traceback(trim_traceback(err.__traceback__, keep_first=False))  # noqa: B904
