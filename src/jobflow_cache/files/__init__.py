"""A job's run-folder files: what a manifest records, and the object area that keeps and
serves them.

=====================  =====================================================================
module                 what it holds
=====================  =====================================================================
:mod:`.manifest`       :class:`FileRecord` / :class:`FileState` (what a job changed, what it
                       found) and :func:`check_manifest`, the trust check of a manifest read
                       from a store
:mod:`.fsops`          file-system operations: open flags, temporary names, reflink or copy,
                       walks that never follow symlinks
:mod:`.digests`        file content digests (``xxh3_128``) and the digest memo
:mod:`.snapshots`      run-folder snapshots, :func:`prehash`, the paths a job changed
:mod:`.layout`         where an area keeps objects and its settings (the base of the parts)
:mod:`.housekeeping`   pins of recording processes, stale temporary files, set aside / put
                       back for garbage collection
:mod:`.storage`        the objects themselves: ingest, seal, publish, verify, list, remove
:mod:`.recording`      what a job changed in its run folder, as records and objects
:mod:`.materialize`    a hit's files into a run folder: plan, check, apply, swap
:mod:`.objects`        :class:`ObjectArea`, the facade made of the four parts above
=====================  =====================================================================
"""

from __future__ import annotations

from jobflow_cache.files.digests import file_digest, known_digest, remember
from jobflow_cache.files.fsops import CHUNK_SIZE
from jobflow_cache.files.housekeeping import GC_GRACE, PIN_TTL, STALE_DEAD_AFTER
from jobflow_cache.files.layout import VERIFY_FILES_LIMIT, PlaceMode
from jobflow_cache.files.manifest import (
    CODE_FILE_PATTERNS,
    FileRecord,
    FileState,
    check_manifest,
    is_code_path,
)
from jobflow_cache.files.materialize import LINK_MIN_SIZE, differences
from jobflow_cache.files.objects import ObjectArea
from jobflow_cache.files.recording import LIVE_FILE_PATTERNS
from jobflow_cache.files.snapshots import (
    Snapshot,
    changed_files,
    changed_paths,
    prehash,
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
