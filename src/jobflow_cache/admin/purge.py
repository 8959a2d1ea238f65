"""Removing cache entries and collecting the file objects no entry references any more.

Entries are removed in batches while their file objects are noted; then only those objects are
checked against the remaining entries (streamed, a few fields each), so memory grows with the
objects of the purged entries, never with the cache. An object still referenced by any remaining
entry, including one marked invalid, is never deleted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from jobflow_cache.errors import CacheError
from jobflow_cache.files import GC_GRACE, ObjectArea
from jobflow_cache.hashing.canonical import SCHEME
from jobflow_cache.settings import CacheSettings
from jobflow_cache.store import CacheStore

__all__ = ["GCReport", "PurgeReport", "collect_garbage", "purge"]

logger = logging.getLogger(__name__)

_BATCH = 500
_ASIDE_BATCH = 256  # objects set aside at once before the pins are read again


def _grace() -> float:
    """``JOBFLOW_CACHE_GC_GRACE`` (seconds), or :data:`.files.GC_GRACE` when unreadable."""
    try:
        return float(CacheSettings().GC_GRACE)
    except (CacheError, ValueError, AttributeError):
        return GC_GRACE


@dataclasses.dataclass
class GCReport:
    """What :func:`collect_garbage` removed (or would remove, in a dry run).

    ``bytes_freed`` counts objects no run folder links to; ``bytes_linked`` those whose space
    is released only once the run folders holding hard links to them are deleted. ``blobs``
    counts large outputs in the blob store that no entry refers to.
    """

    objects: int = 0
    bytes_freed: int = 0
    bytes_linked: int = 0
    blobs: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PurgeReport:
    """What :func:`purge` removed (or would remove, in a dry run)."""

    entries: int = 0
    digests: list[str] = dataclasses.field(default_factory=list)
    #: entries removed (or that would be) because they consumed a matching entry
    cascaded: list[str] = dataclasses.field(default_factory=list)
    gc: GCReport = dataclasses.field(default_factory=GCReport)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


def _object_ids(doc: Mapping[str, Any]) -> Iterator[str]:
    files = doc.get("files") if isinstance(doc, Mapping) else None  # None: a damaged row
    if isinstance(files, list):
        for record in files:
            if isinstance(record, Mapping) and isinstance(record.get("xxh3"), str):
                yield record["xxh3"]


def collect_garbage(
    cache: CacheStore,
    candidates: set[str] | None = None,
    *,
    dry_run: bool = False,
    grace: float | None = None,
) -> GCReport:
    """Delete the file objects no entry references (entries marked invalid still do), and,
    without ``candidates``, the blobs of large outputs no entry refers to and the temporary
    files that killed processes left in the object area (counted as objects).

    Parameters
    ----------
    cache
        The (connected) cache store.
    candidates
        Only consider these objects (e.g. those of just-purged entries); default: every object
        in the area. Memory grows with the number of candidates, never with the entries.
    dry_run
        Only count.
    grace
        Seconds: objects stored more recently than this (their ctime) are kept, referenced
        or not; default ``JOBFLOW_CACHE_GC_GRACE`` (an hour).

    Notes
    -----
    Safe against flows recording meanwhile: an object stored within the grace period, or
    pinned by a process recording an entry (:meth:`.ObjectArea.pinned`: every object it
    stored or reused, pinned before it looked whether the object exists), is never deleted.
    Unreferenced objects are first set aside (renamed), then the pins are read again and
    the pinned ones put back, so a recorder that found an object just before it was set
    aside keeps it, and one that looks just after stores it anew. A blob whose entry is
    being written while a collection runs may still go: that entry is never served, the job
    just runs again.
    """
    area = ObjectArea(cache.objects_dir)
    started = time.time() - (_grace() if grace is None else max(grace, 0.0))
    orphans: list[str] = []
    full = candidates is None
    if candidates is None:
        candidates = {xxh3 for xxh3, _ in area.iter_objects()}
        orphans = cache.orphan_blobs()
    unreferenced = _unreferenced(cache, candidates, {})
    report = _sweep(area, unreferenced, started, remove=not dry_run)
    if full:  # and what processes killed while storing a file left behind
        stale, freed = area.remove_stale(dry_run=dry_run)
        report.objects += stale
        report.bytes_freed += freed
    if orphans and not dry_run:
        cache.remove_blobs(orphans)
    report.blobs = len(orphans)
    return report


def _unreferenced(cache: CacheStore, candidates: set[str], criteria: dict[str, Any]) -> set[str]:
    """The ``candidates`` that no entry matching ``criteria`` references (streams entries)."""
    unreferenced = set(candidates)
    if unreferenced:
        for doc in cache.find(criteria, properties=["files"]):
            unreferenced.difference_update(_object_ids(doc))
            if not unreferenced:
                break
    return unreferenced


def _sweep(area: ObjectArea, objects: set[str], started: float, *, remove: bool) -> GCReport:
    """Count (and with ``remove`` delete) ``objects``; ones changed since ``started`` and
    ones pinned by a recording process are kept (see :func:`collect_garbage`)."""
    report = GCReport(dry_run=not remove)
    old: list[tuple[str, os.stat_result]] = []
    for xxh3 in sorted(objects):
        try:
            st = os.lstat(area.path_of(xxh3))
        except (OSError, ValueError):
            continue
        if stat.S_ISREG(st.st_mode) and st.st_ctime < started:
            old.append((xxh3, st))
    if not old:
        return report
    pinned = area.pinned(clean=remove)
    old = [(xxh3, st) for xxh3, st in old if xxh3 not in pinned]
    for start in range(0, len(old), _ASIDE_BATCH):
        batch = old[start : start + _ASIDE_BATCH]
        if remove:
            aside = [(xxh3, st, area.set_aside(xxh3)) for xxh3, st in batch]
            pinned = area.pinned()  # pins written before a recorder looked at an object
            gone = []
            for xxh3, st, path in aside:
                if path is None:
                    continue
                if xxh3 in pinned:
                    area.put_back(xxh3, path)
                    continue
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                gone.append((xxh3, st))
            batch = gone
        for _, st in batch:
            report.objects += 1
            if st.st_nlink > 1:
                report.bytes_linked += st.st_size
            else:
                report.bytes_freed += st.st_size
    return report


def purge(
    cache: CacheStore,
    criteria: dict[str, Any],
    *,
    dry_run: bool = False,
    gc: bool = True,
    keep_digests: int = 1000,
    cascade: bool = True,
    outdated_schemes: bool = False,
) -> PurgeReport:
    """Remove the matching entries, then the file objects only they referenced.

    Entries are streamed and removed in batches; ``criteria`` of ``{}`` removes everything.
    Objects still referenced by any remaining entry are never deleted.

    Parameters
    ----------
    cache
        The (connected) cache store.
    criteria
        Which entries (see :class:`Filters`).
    dry_run
        Remove nothing, report what would go.
    gc
        Also delete the file objects no remaining entry references.
    keep_digests
        How many of the removed digests the report lists.
    cascade
        Also remove every entry that consumed a matching entry, transitively
        (:meth:`.CacheStore.dependents`): a result computed from a removed one would
        otherwise be served beside a recomputed upstream result it does not come from. The
        report lists them under ``cascaded`` (and counts them in ``entries``).
    outdated_schemes
        Only the matching entries recorded under another hash scheme than :data:`.SCHEME`
        (they can never be served: ``cachetool purge --outdated``).
    """
    if outdated_schemes:
        outdated = {"scheme": {"$ne": SCHEME}}
        criteria = {"$and": [criteria, outdated]} if criteria else outdated
    report = PurgeReport(dry_run=dry_run)
    candidates: set[str] = set()
    matched: set[str] | None = set() if cascade and criteria else None

    def take(docs: list[dict[str, Any]]) -> list[str]:
        digests = [d["digest"] for d in docs if isinstance(d.get("digest"), str)]
        for doc in docs:
            candidates.update(_object_ids(doc))
        report.entries += len(digests)
        room = keep_digests - len(report.digests)
        report.digests.extend(digests[: max(room, 0)])
        if matched is not None:
            matched.update(digests)
        return digests

    _remove(cache, criteria, take, dry_run=dry_run)
    extra: set[str] = set()
    if matched:
        report.cascaded = cache.dependents(matched)
        extra = set(report.cascaded)
        for start in range(0, len(report.cascaded), _BATCH):
            batch = report.cascaded[start : start + _BATCH]
            _remove(cache, {"digest": {"$in": batch}}, take, dry_run=dry_run)
    if gc and candidates:
        if dry_run:
            report.gc = _dry_gc(cache, candidates, criteria, extra)
        else:
            report.gc = collect_garbage(cache, candidates)
    return report


def _remove(
    cache: CacheStore,
    criteria: dict[str, Any],
    take: Callable[[list[dict[str, Any]]], list[str]],
    *,
    dry_run: bool,
) -> None:
    """Remove the entries matching ``criteria`` in batches (only count them in a dry run),
    passing each batch of documents (digest and files) to ``take``."""
    if dry_run:
        batch: list[dict[str, Any]] = []
        for doc in cache.find(criteria, properties=["digest", "files"]):
            batch.append(doc)
            if len(batch) >= _BATCH:
                take(batch)
                batch = []
        take(batch)
        return
    # re-query after each removal: safe on every backend (no cursor outlives a delete)
    previous: set[str] = set()
    while True:
        docs = list(cache.find(criteria, properties=["digest", "files"], limit=_BATCH))
        digests = {d.get("digest") for d in docs}
        if not docs or digests & previous:
            if docs:
                logger.warning("purge: %d matching entries could not be removed", len(docs))
            break
        cache.remove(take(docs))
        previous = {d for d in digests if isinstance(d, str)}


def _dry_gc(
    cache: CacheStore, candidates: set[str], purged: dict[str, Any], cascaded: set[str]
) -> GCReport:
    """Objects a purge of ``purged`` (and of the ``cascaded`` entries) would free: referenced
    by no other entry."""
    rest: dict[str, Any] = {"$nor": [purged]} if purged else {"digest": {"$exists": False}}
    started = time.time() - _grace()
    unreferenced = set(candidates)
    if unreferenced:
        for doc in cache.find(rest, properties=["digest", "files"]):
            if doc.get("digest") in cascaded:
                continue
            unreferenced.difference_update(_object_ids(doc))
            if not unreferenced:
                break
    return _sweep(ObjectArea(cache.objects_dir), unreferenced, started, remove=False)
