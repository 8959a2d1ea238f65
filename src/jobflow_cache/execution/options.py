"""What a user asks of the cache for one job: :class:`JobOptions`, and the metadata key.

Options come from ``@cached_job(...)`` (or :func:`.cache_flow`) and from the job's own
``metadata["jobflow_cache"]``, which wins (:func:`job_options`). The same metadata key holds
the record the cache writes of what it did (:func:`.report.mark`): jobflow stores it with the
job's output in the JobStore.

Contract: nothing here touches a store or the file system; an option value is checked where
it is used (a bad ``mode`` makes the job run uncached with a warning, see :class:`.Cache`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from jobflow import Job

from jobflow_cache.hashing import code as codeversion

__all__ = [
    "EXPOSED_STORE_REASON",
    "META_KEY",
    "MODES",
    "OPTION_KEYS",
    "READ_ONLY_REASON",
    "REFRESH_REASON",
    "CacheMode",
    "FilesMode",
    "JobOptions",
    "job_options",
]

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
MODES = ("readwrite", "read_only", "refresh")
READ_ONLY_REASON = "read_only: not in the cache, and not recorded"
REFRESH_REASON = "refresh: recomputed, its entry replaced"

FilesMode = Literal["link", "copy", "none"]
#: How a job uses the cache (issue 13): serve and record; serve, never write; never serve,
#: recompute and replace the entry (the ``MODE`` setting, or a job's own ``mode`` option)
CacheMode = Literal["readwrite", "read_only", "refresh"]


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
