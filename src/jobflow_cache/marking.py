"""``cache_flow``: mark every job of a flow so that any manager serves or records it.

A marked job's ``job.function`` is a :class:`CachedFunction`: an MSON object holding the
function jobflow held before (a plain function, a ``@job`` function, a Maker's bound method)
and the cache options. jobflow's ``Job.run`` calls ``getattr(job.function, "original", ...)``,
binding it to ``job.function.__self__`` (the Maker) when there is one: ``original`` goes
through :meth:`.Cache.call` exactly as ``@cached_job`` does, so the job is cached under
``run_locally`` (ours or jobflow's), FireWorks rockets and jobflow-remote workers alike, with
the digests and entries ``run_locally`` makes for the same unmarked job. The mark is kept by
the flow's JSON (``job.as_dict()``, ``jsanitize``, ``MontyEncoder``), so it reaches workers.

Jobs a marked job makes at run time (``Response(replace/addition/detour)``, or a Job or Flow
returned) are marked with the same options once the cache has recorded or replayed them:
entries never depend on the mark.

``Job.update_maker_kwargs`` (and ``Flow.update_maker_kwargs``) replace ``job.function`` with
the Maker's method, which drops the mark: call :func:`cache_flow` last.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from jobflow import CURRENT_JOB, Flow, Job, Response
from monty.json import MSONable

from jobflow_cache.errors import trim_traceback
from jobflow_cache.execution.cache import SKIP_FUNCTIONS, JobOptions, current_cache
from jobflow_cache.hashing.code import env_names
from jobflow_cache.settings import cache_disabled

__all__ = ["CachedFunction", "cache_flow", "is_marked"]

#: The options ``cache_flow`` accepts and stores in the mark (those of ``@cached_job``).
MARK_OPTIONS = ("enabled", "cache_version", "ignore", "env", "files", "mode")
_MODES = ("readwrite", "read_only", "refresh")
_FILES = ("link", "copy", "none")


def _clean_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options as JSON values (what the mark stores), checked."""
    unknown = set(options) - set(MARK_OPTIONS)
    if unknown:
        raise TypeError(f"cache_flow got unknown options {sorted(unknown)}; known: {MARK_OPTIONS}")
    clean: dict[str, Any] = {}
    for key, value in options.items():
        if key == "enabled":
            value = bool(value)
        elif key == "cache_version":
            value = None if value is None else str(value)
        elif key == "ignore":
            value = [value] if isinstance(value, str) else [str(v) for v in value or ()]
        elif key == "env":
            value = list(env_names(value or ()))
        elif key == "files" and value is not None and value not in _FILES:
            raise ValueError(f"files must be one of {_FILES} or None, not {value!r}")
        elif key == "mode" and value is not None and value not in _MODES:
            raise ValueError(f"mode must be one of {_MODES} or None, not {value!r}")
        clean[key] = value
    return clean


def _job_options(options: Mapping[str, Any], base: JobOptions | None) -> JobOptions:
    return (base or JobOptions()).merged(options)


def _unbound(function: Any) -> tuple[Callable[..., Any], JobOptions | None]:
    """The plain function ``Job.run`` ends up calling (unbound), and the options of a
    ``@cached_job`` function (its decorator's), else None."""
    inner = getattr(function, "original", None)
    if inner is None:  # a plain function, or a method not made by @job
        inner = getattr(function, "__func__", function)
    base = getattr(inner, "__jobflow_cache__", None)
    if isinstance(base, JobOptions):  # @cached_job: its caching call wraps the function
        inner = getattr(inner, "__wrapped__", inner)
    return inner, base if isinstance(base, JobOptions) else None


class _CachingCall:
    """``CachedFunction.original``: what jobflow's ``Job.run`` calls (bound to the Maker by
    ``types.MethodType`` for a method, so the instance comes first, as the unbound function
    wants it). Its ``__wrapped__`` and ``__jobflow_cache__`` are those of a ``@cached_job``
    caching call, so ``run_locally`` neither intercepts it twice nor caches it with
    ``cache=False``."""

    __slots__ = ("__jobflow_cache__", "__wrapped__")

    def __init__(self, function: Callable[..., Any], options: JobOptions) -> None:
        self.__wrapped__ = function
        self.__jobflow_cache__ = options

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = self.__wrapped__
        job = CURRENT_JOB.job
        if job is None or cache_disabled():
            # called directly, or JOBFLOW_CACHE_DISABLE: the plain function, no digest computed,
            # no store opened (the new jobs it makes keep the mark: they run plain too)
            return _inherit(function(*args, **kwargs), job)
        try:
            returned = current_cache().call(job, function, args, kwargs, self.__jobflow_cache__)
        except BaseException as err:  # the job's own error: without the cache's frames
            raise err.with_traceback(trim_traceback(err.__traceback__, keep_first=False))  # noqa: B904
        # after recording (a miss) or decoding (a hit): entries never hold the mark
        return _inherit(returned, job)


class CachedFunction(MSONable):
    """A job's function marked by :func:`cache_flow` (it replaces ``job.function``).

    ``function`` is what ``job.function`` held (a plain function, a ``@job`` function, a
    Maker's bound method); ``options`` the cache options of the mark (JSON values). jobflow
    sees the same ``__self__`` (so ``job.maker`` is the Maker), ``__name__``, ``__qualname__``,
    ``__module__`` and ``__wrapped__`` (its function filters), and calls ``original``.
    """

    #: tells :func:`is_marked` (and ``run_locally``) apart from other functions
    __jobflow_cache_mark__ = True

    def __init__(self, function: Callable[..., Any], options: Mapping[str, Any] | None = None):
        if isinstance(function, CachedFunction):  # never nested
            function = function.function
        self.function: Callable[..., Any] = function
        self.options = _clean_options(options or {})
        inner, base = _unbound(function)
        self.original = _CachingCall(inner, _job_options(self.options, base))
        # what jobflow and monty read of a job function (instance attributes: as class
        # properties, __module__ and __qualname__ would be the class's own)
        bound = getattr(function, "__self__", None)
        # Job.run binds ``original`` to it, Job.maker returns it
        self.__self__ = None if isinstance(bound, types.ModuleType) else bound
        name = str(getattr(function, "__name__", type(function).__name__))
        self.__name__ = name
        self.__qualname__ = str(getattr(function, "__qualname__", name))
        self.__module__ = str(getattr(function, "__module__", ""))
        # jobflow's function filters (update_metadata, update_config) unwrap it
        self.__wrapped__ = getattr(function, "__wrapped__", function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function as jobflow's ``job.function`` would be called."""
        return self.function(*args, **kwargs)

    def __repr__(self) -> str:
        return f"CachedFunction({self.function!r}, {self.options!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CachedFunction):
            return NotImplemented
        return self.function == other.function and self.options == other.options

    __hash__ = None  # type: ignore[assignment]

    def __deepcopy__(self, memo: dict[int, Any]) -> CachedFunction:
        """A copy holding a deep copy of the function (jobflow's ``Job`` copies its function,
        so that jobs never share a Maker); ``original`` is shared (it holds no Maker)."""
        from copy import deepcopy

        function = deepcopy(self.function, memo)
        new = object.__new__(CachedFunction)
        new.__dict__.update(self.__dict__)
        new.function = function
        new.options = deepcopy(self.options, memo)
        bound = getattr(function, "__self__", None)
        new.__self__ = None if isinstance(bound, types.ModuleType) else bound
        new.__wrapped__ = getattr(function, "__wrapped__", function)
        return new

    def as_dict(self) -> dict[str, Any]:
        return {
            "@module": type(self).__module__,
            "@class": type(self).__name__,
            "function": self.function,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CachedFunction:
        from monty.json import MontyDecoder

        decoder = MontyDecoder()
        function = decoder.process_decoded(d["function"])
        if not callable(function):
            raise TypeError(f"a marked job's function is not callable: {d['function']!r}")
        return cls(function, decoder.process_decoded(d.get("options") or {}))


def is_marked(function: Any) -> bool:
    """True when ``function`` (a job's) was marked by :func:`cache_flow`."""
    return isinstance(function, CachedFunction)


def _skipped(job: Job) -> bool:
    function = getattr(job.function, "function", job.function)
    inner, _ = _unbound(function)
    path = f"{getattr(inner, '__module__', '')}:{getattr(inner, '__qualname__', '')}"
    return path in SKIP_FUNCTIONS


def _mark_job(job: Job, options: Mapping[str, Any]) -> None:
    function = job.function
    if isinstance(function, CachedFunction):  # marked again: the options are updated
        job.function = CachedFunction(function.function, {**function.options, **options})
    elif not _skipped(job):
        job.function = CachedFunction(function, options)


def _walk(
    node: Any,
    options: Mapping[str, Any],
    accept: Callable[[Job], bool],
    seen: set[int],
) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, Job):
        if accept(node):
            _mark_job(node, options)
    elif isinstance(node, Flow):
        for child in node.jobs:
            _walk(child, options, accept, seen)
    elif isinstance(node, Response):
        for part in (node.replace, node.addition, node.detour):
            if part is not None:
                _walk(part, options, accept, seen)
    elif isinstance(node, (list, tuple)):
        for child in node:
            _walk(child, options, accept, seen)
    elif isinstance(node, Mapping):
        for child in node.values():
            _walk(child, options, accept, seen)


def _new_jobs(returned: Any) -> list[Any]:
    """The jobs and flows that jobflow runs after a job returned ``returned``: a Response's
    ``replace``/``addition``/``detour``, or what ``Response.from_job_returns`` makes a
    replace (a Job, a Flow, or a non-empty list, tuple or dict of only those). A plain output
    is never walked (a list of a million floats costs one ``isinstance``)."""
    if isinstance(returned, Response):
        return [p for p in (returned.replace, returned.addition, returned.detour) if p is not None]
    if isinstance(returned, (Job, Flow)):
        return [returned]
    values = returned.values() if isinstance(returned, dict) else returned
    if (
        isinstance(returned, (list, tuple, dict))
        and returned
        and all(isinstance(item, (Job, Flow)) for item in values)  # stops at the first other
    ):
        return list(values)
    return []


def _inherit(returned: Any, job: Job | None) -> Any:
    """Mark the jobs a marked ``job`` made at run time with its own mark (same options)."""
    function = getattr(job, "function", None)
    if isinstance(function, CachedFunction):
        new = _new_jobs(returned)
        if new:
            _walk(new, function.options, lambda _: True, set())
    return returned


def cache_flow(
    flow_or_job: Any,
    *,
    name_filter: str | None = None,
    class_filter: type | Iterable[type] | None = None,
    **options: Any,
) -> Any:
    """Mark every job of ``flow_or_job`` so that whatever manager runs it serves or records it.

    Nested flows are included, and so are the plain ``@job`` jobs of atomate2's Makers. The
    mark survives the flow's JSON round trip (a LaunchPad, jobflow-remote's queue database),
    and jobs that marked jobs create at run time (``replace``, ``addition``, ``detour``)
    inherit it. Nothing else about the flow changes (names, uuids, metadata, config, hosts).
    Returns ``flow_or_job`` itself, changed in place; marking again updates the options.

    Parameters
    ----------
    flow_or_job
        A :class:`~jobflow.Flow`, a :class:`~jobflow.Job`, or a list of them.
    name_filter
        Only jobs whose name contains this string (as jobflow's ``update_metadata``).
    class_filter
        Only jobs made by a Maker of this class (or one of these classes).
    **options
        The options of ``@cached_job``: ``cache_version``, ``ignore``, ``env``, ``files``,
        ``enabled``; and ``mode`` (``"readwrite"``, ``"read_only"``, ``"refresh"``; default:
        the ``JOBFLOW_CACHE_MODE`` setting). ``metadata["jobflow_cache"]`` of a job wins.

    Notes
    -----
    ``update_maker_kwargs`` replaces a job's function with its Maker's method and so drops
    the mark: call ``cache_flow`` after it.

    Examples
    --------
    >>> from jobflow import Flow, job
    >>> from jobflow_cache import cache_flow
    >>> @job
    ... def add(a, b):
    ...     return a + b
    >>> first = add(1, 2)
    >>> flow = cache_flow(Flow([first, add(first.output, 3)]), cache_version=2)
    >>> type(first.function).__name__, first.function.options
    ('CachedFunction', {'cache_version': '2'})
    """
    clean = _clean_options(options)
    classes: tuple[type, ...] | None
    if class_filter is None:
        classes = None
    elif isinstance(class_filter, type):
        classes = (class_filter,)
    else:
        classes = tuple(class_filter)

    def accept(job: Job) -> bool:
        if name_filter is not None and name_filter not in (job.name or ""):
            return False
        return classes is None or isinstance(job.maker, classes)

    if not isinstance(flow_or_job, (Job, Flow, list, tuple)):
        raise TypeError(f"cache_flow marks a Flow or a Job, not {type(flow_or_job).__name__}")
    _walk(flow_or_job, clean, accept, set())
    return flow_or_job
