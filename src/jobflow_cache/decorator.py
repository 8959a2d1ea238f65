"""``@cached_job``: jobflow's ``@job`` whose calls go through the cache under any manager."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, overload

from jobflow import CURRENT_JOB
from jobflow import job as jobflow_job

from jobflow_cache.codeversion import env_names
from jobflow_cache.errors import trim_traceback
from jobflow_cache.executor import CacheMode, FilesMode, JobOptions, current_cache
from jobflow_cache.hashing import CallDigest, bind_arguments, function_path
from jobflow_cache.settings import cache_disabled

__all__ = ["cached_job"]

logger = logging.getLogger(__name__)


def _make_caching_call(func: Callable[..., Any], options: JobOptions) -> Callable[..., Any]:
    @functools.wraps(func)
    def caching_call(*args: Any, **kwargs: Any) -> Any:
        job = CURRENT_JOB.job
        if job is None or cache_disabled():
            # called directly (``f.original(...)``), or caching is off: the plain function,
            # no digest computed, no store opened
            return func(*args, **kwargs)
        try:
            return current_cache().call(job, func, args, kwargs, options)
        except BaseException as err:  # the job's own error: without the cache's frames
            raise err.with_traceback(trim_traceback(err.__traceback__, keep_first=False))  # noqa: B904

    caching_call.__jobflow_cache__ = options  # type: ignore[attr-defined]
    return caching_call


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
        function_path(inner)  # fail early for lambdas and local functions
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
