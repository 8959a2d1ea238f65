"""``@cached_job``: jobflow's ``@job`` whose calls go through the cache under any manager."""

from __future__ import annotations

import functools
import inspect
import logging
import types
import weakref
from collections.abc import Callable, Iterable
from typing import Any, overload

from jobflow import CURRENT_JOB
from jobflow import job as jobflow_job

from jobflow_cache.errors import UnhashableInputError, trim_traceback, warn
from jobflow_cache.execution.cache import (
    CacheMode,
    FilesMode,
    JobOptions,
    Outcome,
    current_cache,
    job_options,
)
from jobflow_cache.hashing.canonical import CallDigest, bind_arguments, function_path
from jobflow_cache.hashing.code import env_names, instance_type, is_local, local_identity
from jobflow_cache.settings import cache_disabled

__all__ = ["cached_job"]

logger = logging.getLogger(__name__)

#: code objects of local functions already warned about (one warning per definition)
_WARNED: weakref.WeakSet[types.CodeType] = weakref.WeakSet()


def _local_problem(func: Callable[..., Any], args: tuple[Any, ...]) -> str | None:
    """Why a lambda or a function (or Maker) defined inside a function cannot be told apart
    from another of its name on this call (a captured value that cannot be hashed), or None.

    Checked before the cache sees the call, so that such a job warns once, not once per call.
    """
    try:
        owner = instance_type(func, args)
        if not is_local(func) and not (owner is not None and any(map(is_local, owner.__mro__))):
            return None
        local_identity(func, owner)
    except UnhashableInputError as err:
        return str(err)
    except Exception as err:  # whatever it holds: never fail the job for it
        return f"what it captures cannot be read ({type(err).__name__}: {err})"
    return None


class _CachedFunction:
    """What jobflow holds for a ``@cached_job`` function (``Job.function``, and the decorated
    attribute's ``.original``): calling it goes through the cache.

    It compares and hashes as the function as written, so that jobflow's ``Job.function ==
    f``, ``update_metadata(function_filter=f)`` and ``update_config(function_filter=f)`` hold
    exactly as under ``@job``; ``__wrapped__`` is that function, ``__jobflow_cache__`` its
    options. It is named as the function (``__module__``, ``__qualname__``), so a job keeps
    it across a JSON round trip (jobflow re-imports the decorated module attribute), binds to
    a Maker like a function, and deep copies (``Job.__init__``) as a function does: itself.
    """

    __wrapped__: Callable[..., Any]

    def __init__(self, func: Callable[..., Any], options: JobOptions) -> None:
        functools.update_wrapper(self, func)
        self.__jobflow_cache__ = options

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        func = self.__wrapped__
        options: JobOptions = self.__jobflow_cache__
        job = CURRENT_JOB.job
        if job is None or cache_disabled():
            # called directly (``f.original(...)``), or caching is off: the plain function,
            # no digest computed, no store opened
            return func(*args, **kwargs)
        problem = _local_problem(func, args)
        if problem is not None and job_options(job, options).enabled:
            # a local function whose captured values cannot be hashed: uncached, one warning
            # per definition (not per call, nor per call of the enclosing function)
            code = getattr(func, "__code__", None)
            if code is None or code not in _WARNED:
                if code is not None:
                    _WARNED.add(code)
                warn(
                    f"jobflow-cache: {function_path(func)} is defined inside a function and "
                    f"cannot be told apart from others of its name: {problem}; its jobs run "
                    "uncached (shown once)"
                )
            cache = current_cache()
            return cache._uncached(job, func, args, kwargs, Outcome.UNCACHEABLE, options)
        try:
            return current_cache().call(job, func, args, kwargs, options)
        except BaseException as err:  # the job's own error: without the cache's frames
            raise err.with_traceback(trim_traceback(err.__traceback__, keep_first=False))  # noqa: B904

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        # a method: bound as a function would be
        return self if instance is None else types.MethodType(self, instance)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _CachedFunction):
            other = other.__wrapped__
        return bool(self.__wrapped__ == other)

    def __hash__(self) -> int:
        return hash(self.__wrapped__)

    def __copy__(self) -> _CachedFunction:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _CachedFunction:
        return self

    def __repr__(self) -> str:
        return f"<cached_job {self.__wrapped__!r}>"


def _make_caching_call(func: Callable[..., Any], options: JobOptions) -> Callable[..., Any]:
    return _CachedFunction(func, options)


def _digest_method(func: Callable[..., Any], options: JobOptions) -> Callable[..., CallDigest]:
    def cache_digest(*args: Any, **kwargs: Any) -> CallDigest:
        """Digest that calling this job with these (resolved) arguments would have.

        For a Maker method pass the Maker first: ``Maker.make.cache_digest(maker, structure)``.
        Nothing is run and nothing is read from the cache.
        """
        bind_arguments(func, args, kwargs, ignore=options.ignore)  # raises on a bad call
        return current_cache().digest(func, args, kwargs, options)

    return cache_digest


@overload
def cached_job(method: Callable[..., Any]) -> Callable[..., Any]: ...


@overload
def cached_job(
    method: None = None,
    *,
    cache_version: str | int | None = None,
    ignore: Iterable[str] = (),
    env: Iterable[str] = (),
    files: FilesMode | None = None,
    enabled: bool = True,
    mode: CacheMode | None = None,
    **job_kwargs: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]: ...


def cached_job(
    method: Callable[..., Any] | None = None,
    *,
    cache_version: str | int | None = None,
    ignore: Iterable[str] = (),
    env: Iterable[str] = (),
    files: FilesMode | None = None,
    enabled: bool = True,
    mode: CacheMode | None = None,
    **job_kwargs: Any,
) -> Any:
    """Turn a function or Maker method into a jobflow job whose result is cached.

    A drop-in for :func:`jobflow.job` (``@cached_job`` and ``@cached_job(...)`` both work, and
    every ``job`` keyword such as ``data=`` or ``output_schema=`` is passed on). When the job
    runs, under any manager that calls ``Job.run`` (``run_locally``, FireWorks, jobflow-remote),
    the digest of the function and its *resolved* inputs is looked up in the cache: a hit serves
    the cached output (and run-folder files) without running the function.

    Parameters
    ----------
    method
        The function (when used as ``@cached_job`` without parentheses).
    cache_version
        Bump it when the function's behaviour changes without its inputs changing: entries
        made with another version are not served.
    ignore
        Names of arguments left out of the digest (e.g. ``"ncores"``, ``"verbose"``).
    env
        Names of environment variables whose values enter the digest (e.g.
        ``["OMP_NUM_THREADS"]``), on top of the ``JOBFLOW_CACHE_DIGEST_ENV`` setting.
    files
        ``"link"``, ``"copy"`` or ``"none"``: how run-folder files are cached and restored.
    enabled
        ``False`` keeps the decorator but never caches (same as per-job metadata opt-out).
    mode
        ``"read_only"`` (serve hits, never write to the store), ``"refresh"`` (never serve:
        recompute and replace the entry) or ``"readwrite"``; None: the ``MODE`` setting.
    **job_kwargs
        Passed to :func:`jobflow.job`.

    Examples
    --------
    >>> from jobflow_cache import cached_job
    >>> @cached_job(cache_version=2, ignore=["verbose"])
    ... def relax(structure, steps=100, verbose=False):
    ...     return {"steps": steps}
    >>> relax.cache_digest("Si", 100).digest == relax.cache_digest("Si", verbose=True).digest
    True
    >>> relax.original("Si")  # outside a job: the plain function
    {'steps': 100}
    """

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        inner = func.__func__ if isinstance(func, (staticmethod, classmethod)) else func
        options = JobOptions(
            enabled=enabled,
            mode=mode,
            cache_version=None if cache_version is None else str(cache_version),
            ignore=tuple(ignore),
            env=env_names(env),
            files=files,
        )
        unknown = set(options.ignore) - set(inspect.signature(inner).parameters)
        if unknown:
            raise ValueError(f"ignore names unknown arguments of {inner.__qualname__}: {unknown}")
        # No check of the name here: a lambda or a function or Maker defined inside a function
        # (a notebook, a test) is cached when what it captures can be hashed (its code and
        # closure values count, see jobflow_cache.hashing.code.local_identity), else its jobs
        # run uncached with one warning; never an error at decoration.
        caching_call = _make_caching_call(inner, options)
        wrapped: Any = caching_call
        if isinstance(func, staticmethod):
            wrapped = staticmethod(caching_call)
        elif isinstance(func, classmethod):
            wrapped = classmethod(caching_call)
        jobbed = jobflow_job(wrapped, **job_kwargs)
        target = jobbed.__func__ if isinstance(jobbed, (staticmethod, classmethod)) else jobbed
        setattr(target, "cache_digest", _digest_method(inner, options))  # noqa: B010
        setattr(target, "cache_options", options)  # noqa: B010
        return jobbed

    if method is None:
        return decorator
    return decorator(method)
