"""Checking cache entries: diskcache's ``check(fix=False)`` for jobflow-cache.

:func:`verify` streams entries, checks each one the way a hit would trust it (it decodes, its
checksum matches, its scheme is current, its output decodes, its inputs give its digest, its file
objects exist with the recorded size and xxh3) and returns typed :class:`Problem` s. With
``fix=True`` it repairs: broken entries are invalidated (undecodable and outdated ones removed)
and corrupt file objects deleted, so the next job that produces them stores a sound copy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any

from pydantic import ValidationError

from jobflow_cache.backends.base import unreadable_reason
from jobflow_cache.codec import loads
from jobflow_cache.entry import CacheEntry
from jobflow_cache.files import FileRecord, ObjectArea
from jobflow_cache.hashing.canonical import SCHEME, digest_bytes, encode
from jobflow_cache.store import CacheStore

__all__ = ["Problem", "ProblemKind", "verify"]

logger = logging.getLogger(__name__)


class ProblemKind(str, Enum):
    """What :func:`verify` found wrong with an entry."""

    UNDECODABLE = "undecodable"  #: the document is not a cache entry (fix: removed)
    SCHEME = "scheme"  #: made by another hash scheme, never served again (fix: removed)
    CHECKSUM = "checksum"  #: served fields altered since the entry was sealed
    OUTPUT = "output"  #: the output or response JSON does not decode
    INPUTS = "inputs"  #: the recorded per-argument digests do not give the entry's digest
    AREA_MISSING = "area-missing"  #: the object area folder does not exist
    FILE_MISSING = "file-missing"  #: a manifest file's object is gone
    FILE_CORRUPT = "file-corrupt"  #: an object's size or xxh3 differs (fix: object removed too)
    BLOB = "blob"  #: the output kept in the blob store is missing or altered


#: Problems that :func:`verify` fixes by removing the entry; the others invalidate it.
_REMOVE = frozenset({ProblemKind.UNDECODABLE, ProblemKind.SCHEME})


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem found by :func:`verify`.

    Attributes
    ----------
    kind
        Its :class:`ProblemKind`.
    digest
        The entry's digest (``None`` for a problem of the whole cache).
    message
        What is wrong, in a few words.
    path, xxh3
        The manifest file concerned, if any.
    fixed
        What ``fix=True`` did: ``"invalidated"``, ``"removed"`` or ``None``.
    """

    kind: ProblemKind
    digest: str | None
    message: str
    path: str | None = None
    xxh3: str | None = None
    fixed: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {**dataclasses.asdict(self), "kind": self.kind.value}


def _expected_digest(entry: CacheEntry) -> str:
    pairs = [[name, entry.arg_digests[name]] for name in sorted(entry.arg_digests)]
    return digest_bytes(encode(["call", SCHEME, entry.function, entry.cache_version, pairs]))


def _check_inputs(entry: CacheEntry) -> str | None:
    if _expected_digest(entry) != entry.digest:
        return "its per-argument digests do not give its digest"
    for name, canon in (entry.canonical_input or {}).items():
        if entry.arg_digests.get(name) != digest_bytes(encode(canon)):
            return f"the canonical input of argument {name!r} does not give its digest"
    return None


class _Checker:
    """Checks entries one at a time, hashing each file object once per run."""

    def __init__(self, area: ObjectArea, hash_files: bool) -> None:
        self.area = area
        self.hash_files = hash_files
        self.objects: dict[tuple[str, int], str | None] = {}
        self.area_reported = False

    def object_problem(self, record: FileRecord) -> str | None:
        key = (record.xxh3, record.size)
        if key not in self.objects:
            if len(self.objects) > 200_000:
                self.objects.clear()
            if self.hash_files:
                self.objects[key] = self.area.verify(record)
            else:
                self.objects[key] = None if self.area.has_all([record]) else self._quick(record)
        return self.objects[key]

    def _quick(self, record: FileRecord) -> str:
        try:
            size = os.lstat(self.area.path_of(record.xxh3)).st_size
        except (OSError, ValueError):
            return "missing"
        if size != record.size:
            return f"size {size} != {record.size}"
        return "changed since it was stored (its content no longer matches)"

    def check(self, doc: Mapping[str, Any], blob_problem: str | None = None) -> list[Problem]:
        digest = doc.get("digest") if isinstance(doc.get("digest"), str) else None
        unreadable = unreadable_reason(doc)
        if unreadable is not None:  # a row the store could not read (fix: removed)
            return [Problem(ProblemKind.UNDECODABLE, digest, f"unreadable row: {unreadable}")]
        try:
            entry = CacheEntry.from_document(dict(doc))
        except (ValidationError, TypeError, ValueError) as err:
            first = str(err).splitlines()
            return [Problem(ProblemKind.UNDECODABLE, digest, f"not a cache entry: {first[0]}")]
        if not entry.valid:  # kept for inspection, never served: nothing to check
            return []
        digest = entry.digest
        if entry.scheme != SCHEME:
            return [Problem(ProblemKind.SCHEME, digest, f"scheme {entry.scheme!r}, not {SCHEME}")]
        problems = []
        if blob_problem is not None:  # output and response are not there to check
            problems.append(Problem(ProblemKind.BLOB, digest, blob_problem))
        elif entry.checksum != entry.compute_checksum():
            # altered text is never parsed, not even under the trust check (as on a lookup)
            problems.append(Problem(ProblemKind.CHECKSUM, digest, "checksum mismatch"))
        for field in ("output", "response"):
            text = getattr(entry, field)
            if (field == "response" and not text) or problems:
                continue
            try:
                loads(text)
            except Exception as err:
                problems.append(
                    Problem(ProblemKind.OUTPUT, digest, f"{field} does not decode: {err}")
                )
        reason = _check_inputs(entry)
        if reason:
            problems.append(Problem(ProblemKind.INPUTS, digest, reason))
        if entry.files and not self.area.root.is_dir() and not self.area_reported:
            self.area_reported = True
            problems.append(
                Problem(ProblemKind.AREA_MISSING, None, f"object area {self.area.root} is missing")
            )
        for record in entry.files:
            found = self.object_problem(record)
            if found is not None:
                kind = ProblemKind.FILE_MISSING if found == "missing" else ProblemKind.FILE_CORRUPT
                problems.append(
                    Problem(kind, digest, f"{record.path}: {found}", record.path, record.xxh3)
                )
        return problems


def verify(
    cache: CacheStore,
    criteria: dict[str, Any] | None = None,
    fix: bool = False,
    *,
    limit: int = 0,
    hash_files: bool = True,
    on_entry: Callable[[], None] | None = None,
) -> list[Problem]:
    """Check entries: each decodes, its output decodes (read back from the blob store when
    kept there), its checksum matches, its scheme is current, its inputs give its digest, and
    every manifest file's object exists with the recorded size and xxh3.

    Entries already marked invalid are never served and are not checked.

    Parameters
    ----------
    cache
        The (connected) cache store.
    criteria
        Check only the matching entries (default: all).
    fix
        Repair: remove undecodable and outdated-scheme entries, invalidate the other broken
        ones, and delete corrupt file objects (a later job then stores a sound copy). Fixes
        are applied after the scan.
    limit
        Check at most this many entries (``0``: all).
    hash_files
        Re-hash every file object (default); ``False`` only compares sizes.
    on_entry
        Called once per entry checked (a progress bar).

    Returns
    -------
    list[Problem]
        Empty when everything checked is sound.
    """
    area = ObjectArea(cache.objects_dir)
    checker = _Checker(area, hash_files)
    problems: list[Problem] = []
    for doc in cache.find(criteria, limit=limit, blobs=False):
        if not isinstance(doc, Mapping):  # a damaged row: JSON, but not an object
            message = f"not a cache entry: a stored {type(doc).__name__}"
            problems.append(Problem(ProblemKind.UNDECODABLE, None, message))
            continue
        doc, blob_problem = cache.restore_blobs(doc)
        problems.extend(checker.check(doc, blob_problem))
        if on_entry is not None:
            on_entry()
    return _fix(cache, area, problems) if fix else problems


def _fix(cache: CacheStore, area: ObjectArea, problems: list[Problem]) -> list[Problem]:
    remove = {p.digest for p in problems if p.kind in _REMOVE and p.digest}
    invalid: dict[str, str] = {}
    for p in problems:
        if p.digest and p.digest not in remove:
            invalid.setdefault(p.digest, f"verify: {p.kind.value}: {p.message}")
    cache.remove(sorted(remove))
    for digest, reason in invalid.items():
        # no cascade: a damaged copy in the cache says nothing against the results that were
        # computed from the entry while it was sound
        cache.invalidate(digest, reason, cascade=False)
    corrupt = {p.xxh3 for p in problems if p.kind is ProblemKind.FILE_CORRUPT and p.xxh3}
    for xxh3 in corrupt:
        try:
            area.remove(xxh3)
        except (OSError, ValueError) as err:
            logger.warning("could not remove corrupt object %s: %s", xxh3, err)
    fixed = []
    for p in problems:
        action = "removed" if p.digest in remove else "invalidated" if p.digest else None
        fixed.append(dataclasses.replace(p, fixed=action))
    return fixed
