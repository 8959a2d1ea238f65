"""jobflow-cache: content-addressed caching and rerun prevention for jobflow workflows.

A job's digest is taken over its function's import path and its *resolved* inputs; when it is
in the cache, the cached output is served (and the run folder's files linked back) instead of
running the job again, so a rebuilt flow with all-new UUIDs resumes where it failed.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from jobflow_cache.backends import EntryBackend, MaggmaBackend, PostgresBackend, SQLiteBackend
from jobflow_cache.decorator import cached_job

# layer 2: entries and stores
from jobflow_cache.entry import CacheEntry

# layer 0: errors and settings
from jobflow_cache.errors import (
    AmbiguousDigestError,
    CacheError,
    CacheWarning,
    CorruptEntryError,
    FilesUnavailableError,
    FolderConflictError,
    InputTooLargeError,
    SettingsError,
    StoreUnavailableError,
    UnhashableInputError,
    UnknownDigestError,
    UnsafeManifestError,
    UntrustedValueError,
)

# layer 3: execution
from jobflow_cache.execution.cache import Cache, CacheReport, JobOptions, current_cache
from jobflow_cache.files import FileRecord, ObjectArea

# layer 1: hashing and files (pure)
from jobflow_cache.hashing import SCHEME, CallDigest, digest_call, digest_value
from jobflow_cache.local import run_locally
from jobflow_cache.marking import cache_flow
from jobflow_cache.plan import Plan, plan
from jobflow_cache.settings import CacheSettings, get_settings
from jobflow_cache.store import MISS, CacheStore, Lookup, Outcome, store_from_spec

try:
    __version__ = version("jobflow-cache")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    # errors and settings
    "AmbiguousDigestError",
    "CacheError",
    "CacheWarning",
    "CorruptEntryError",
    "FilesUnavailableError",
    "FolderConflictError",
    "InputTooLargeError",
    "SettingsError",
    "StoreUnavailableError",
    "UnhashableInputError",
    "UnknownDigestError",
    "UnsafeManifestError",
    "UntrustedValueError",
    "CacheSettings",
    "get_settings",
    # hashing and files
    "SCHEME",
    "CallDigest",
    "digest_call",
    "digest_value",
    "FileRecord",
    "ObjectArea",
    # entries and stores
    "CacheEntry",
    "EntryBackend",
    "SQLiteBackend",
    "MaggmaBackend",
    "PostgresBackend",
    "MISS",
    "CacheStore",
    "Lookup",
    "Outcome",
    "store_from_spec",
    # execution
    "Cache",
    "CacheReport",
    "JobOptions",
    "current_cache",
    "run_locally",
    "cached_job",
    "cache_flow",
    "plan",
    "Plan",
    "__version__",
]
