"""A job's run-folder files: what a manifest records, and the object area that keeps and
serves them.

==================  ========================================================================
module              what it holds
==================  ========================================================================
:mod:`.manifest`    :class:`FileRecord` / :class:`FileState` (what a job changed, what it
                    found) and :func:`check_manifest`, the trust check of a manifest read
                    from a store
:mod:`.objects`     run-folder snapshots and change records, the digest memo, and the
                    content-addressed :class:`ObjectArea` (ingest, verify, materialize, gc)
==================  ========================================================================
"""

from __future__ import annotations

from jobflow_cache.files.manifest import (
    CODE_FILE_PATTERNS,
    FileRecord,
    FileState,
    check_manifest,
    is_code_path,
)
from jobflow_cache.files.objects import (
    CHUNK_SIZE,
    GC_GRACE,
    LINK_MIN_SIZE,
    LIVE_FILE_PATTERNS,
    PIN_TTL,
    STALE_DEAD_AFTER,
    VERIFY_FILES_LIMIT,
    ObjectArea,
    PlaceMode,
    Snapshot,
    changed_files,
    changed_paths,
    differences,
    file_digest,
    known_digest,
    prehash,
    remember,
    snapshot,
)

__all__ = [
    "CHUNK_SIZE",
    "CODE_FILE_PATTERNS",
    "GC_GRACE",
    "LINK_MIN_SIZE",
    "LIVE_FILE_PATTERNS",
    "PIN_TTL",
    "STALE_DEAD_AFTER",
    "VERIFY_FILES_LIMIT",
    "FileRecord",
    "FileState",
    "ObjectArea",
    "PlaceMode",
    "Snapshot",
    "changed_files",
    "changed_paths",
    "check_manifest",
    "differences",
    "file_digest",
    "is_code_path",
    "known_digest",
    "prehash",
    "remember",
    "snapshot",
]
