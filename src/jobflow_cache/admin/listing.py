"""Selecting cache entries without the command line: filters, listings, digest prefixes, stats.

Everything here streams documents from the store: a cache of a million entries is never held in
memory. Selections are plain maggma (Mongo) criteria, built by :class:`Filters`; digest prefixes
are anchored ``$regex`` queries, which MongoDB and the SQL backends answer from the unique
digest index. Checking entries is in :mod:`jobflow_cache.admin.verify`, removing them in
:mod:`jobflow_cache.admin.purge`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from maggma.core import Sort

from jobflow_cache.backends.base import Totals, unreadable_reason
from jobflow_cache.errors import AmbiguousDigestError, UnknownDigestError
from jobflow_cache.files import ObjectArea
from jobflow_cache.store import CacheStore

__all__ = [
    "MIN_PREFIX",
    "SHORT_LENGTH",
    "SORT_FIELDS",
    "EntryRow",
    "Filters",
    "Stats",
    "glob_regex",
    "iter_rows",
    "parse_age",
    "resolve_prefix",
    "short_digest",
    "stats",
]

logger = logging.getLogger(__name__)

MIN_PREFIX = 4
"""Shortest digest prefix accepted by :func:`resolve_prefix`."""

SHORT_LENGTH = 8
"""Shortest prefix :func:`short_digest` shows (longer where needed to stay unique)."""

MAX_CANDIDATES = 10
"""Candidates named by :class:`AmbiguousDigestError`."""

_HEX = re.compile(r"[0-9a-f]+")
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w|y)", re.IGNORECASE)
_AGE_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31557600}

#: Fields of an entry that a listing shows.
ROW_FIELDS = [
    "digest",
    "name",
    "function",
    "created",
    "last_hit",
    "hits",
    "files",
    "files_size",
    "valid",
    "invalid_reason",
]

#: ``--sort`` keys and the entry fields they sort on (all but hits and size are indexed).
SORT_FIELDS = {
    "created": "created",
    "last-hit": "last_hit",
    "hits": "hits",
    "name": "name",
    "function": "function",
    "size": "files_size",
}


# --------------------------------------------------------------------------- selecting


def glob_regex(pattern: str) -> str:
    """An anchored regular expression (Python and MongoDB) for a shell glob (``*``, ``?``).

    Examples
    --------
    >>> glob_regex("relax*")
    '^relax.*$'
    >>> bool(re.search(glob_regex("relax?"), "relax2")), bool(re.search(glob_regex("a.b"), "axb"))
    (True, False)
    """
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return f"^{body}$"


def parse_age(text: str) -> timedelta:
    """A duration such as ``30d``, ``12h``, ``2w``, ``1d12h`` or ``90s``.

    Examples
    --------
    >>> parse_age("30d")
    datetime.timedelta(days=30)
    >>> parse_age("1d12h").total_seconds()
    129600.0
    """
    text = text.strip()
    pos, seconds = 0, 0.0
    for match in _AGE.finditer(text):
        if match.start() != pos and text[pos : match.start()].strip():
            break
        seconds += float(match.group(1)) * _AGE_UNITS[match.group(2).lower()]
        pos = match.end()
    if not text or text[pos:].strip():
        raise ValueError(f"not a duration: {text!r} (e.g. 30d, 12h, 2w, 90s)")
    return timedelta(seconds=seconds)


def _utc(value: datetime) -> datetime:
    """Aware UTC datetime (naive datetimes are taken as local time)."""
    return value.astimezone(timezone.utc)


@dataclasses.dataclass(frozen=True)
class Filters:
    """A selection of entries, turned into maggma criteria by :meth:`criteria`.

    Parameters
    ----------
    name
        Job name, a glob (``relax*``) or an exact name.
    function
        Function path ``module:qualname``, a glob or exact.
    since, before
        Created at or after ``since``, before ``before`` (naive datetimes are local time).
    invalid
        ``True``: only entries marked invalid; ``False``: only valid ones; ``None``: both.
    unused_since
        Entries not served since then (never-served entries count from their creation).
    digests
        Full digests.

    Examples
    --------
    >>> Filters(name="relax*", invalid=True).criteria()
    {'name': {'$regex': '^relax.*$'}, 'valid': False}
    """

    name: str | None = None
    function: str | None = None
    since: datetime | None = None
    before: datetime | None = None
    invalid: bool | None = None
    unused_since: datetime | None = None
    digests: tuple[str, ...] = ()

    def criteria(self) -> dict[str, Any]:
        """The maggma criteria of this selection (``{}`` selects everything)."""
        criteria: dict[str, Any] = {}
        for field, value in (("name", self.name), ("function", self.function)):
            if value is not None:
                glob = any(c in value for c in "*?")
                criteria[field] = {"$regex": glob_regex(value)} if glob else value
        created: dict[str, Any] = {}
        if self.since is not None:
            created["$gte"] = _utc(self.since)
        if self.before is not None:
            created["$lt"] = _utc(self.before)
        if created:
            criteria["created"] = created
        if self.invalid is not None:
            criteria["valid"] = not self.invalid
        if self.unused_since is not None:
            cutoff = _utc(self.unused_since)
            criteria["$or"] = [
                {"last_hit": {"$lt": cutoff}},
                {"last_hit": None, "created": {"$lt": cutoff}},
            ]
        if self.digests:
            criteria["digest"] = {"$in": list(self.digests)}
        return criteria

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) not in (None, ()) for f in dataclasses.fields(self))


# --------------------------------------------------------------------------- listing


@dataclasses.dataclass(frozen=True)
class EntryRow:
    """The summary of one entry that ``cachetool ls`` shows."""

    digest: str
    name: str
    function: str
    created: datetime | None
    last_hit: datetime | None
    hits: int
    files: int
    files_size: int
    valid: bool
    invalid_reason: str | None = None

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> EntryRow:
        """Summarise a (possibly malformed) store document without failing."""

        def when(value: Any) -> datetime | None:
            if isinstance(value, datetime):
                return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
            return None

        unreadable = unreadable_reason(doc)
        if unreadable is not None:  # a damaged row: listed, never a crash
            return cls(
                digest=str(doc.get("digest", "?")),
                name="(unreadable)",
                function="?",
                created=None,
                last_hit=None,
                hits=0,
                files=0,
                files_size=0,
                valid=False,
                invalid_reason=f"unreadable row: {unreadable}",
            )
        files = doc.get("files")
        return cls(
            digest=str(doc.get("digest", "?")),
            name=str(doc.get("name", "")),
            function=str(doc.get("function", "?")),
            created=when(doc.get("created")),
            last_hit=when(doc.get("last_hit")),
            hits=int(doc.get("hits") or 0),
            files=len(files) if isinstance(files, list) else 0,
            files_size=int(doc.get("files_size") or 0),
            valid=bool(doc.get("valid", True)),
            invalid_reason=doc.get("invalid_reason"),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (datetimes as ISO 8601 UTC)."""
        data = dataclasses.asdict(self)
        for key in ("created", "last_hit"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def iter_rows(
    cache: CacheStore,
    criteria: dict[str, Any] | None = None,
    sort: str = "created",
    descending: bool = True,
    limit: int = 0,
) -> Iterator[EntryRow]:
    """Stream entry summaries matching ``criteria``, sorted by one of :data:`SORT_FIELDS`.

    With a limit and an indexed sort key this is one indexed query, whatever the cache size.
    """
    field = SORT_FIELDS[sort]
    order: dict[str, Sort | int] = {field: -1 if descending else 1}
    for doc in cache.find(criteria, properties=ROW_FIELDS, sort=order, limit=limit):
        yield EntryRow.from_document(doc)


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _prefix_criteria(prefix: str) -> dict[str, Any]:
    return {"digest": {"$regex": "^" + re.escape(prefix)}}


def short_digest(cache: CacheStore, digest: str, min_length: int = SHORT_LENGTH) -> str:
    """The shortest prefix of ``digest`` (at least ``min_length``) no other entry shares.

    Git-style: usually one query of at most two documents on the digest index.
    """
    length = min(min_length, len(digest))
    while length < len(digest):
        others = [
            doc["digest"]
            for doc in cache.find(_prefix_criteria(digest[:length]), ["digest"], limit=2)
            if doc.get("digest") != digest and isinstance(doc.get("digest"), str)
        ]
        if not others:
            break
        length = max(length + 1, _common(digest, others[0]) + 1)
    return digest[:length]


def resolve_prefix(cache: CacheStore, prefix: str) -> str:
    """The full digest of the one entry whose digest starts with ``prefix``.

    Raises
    ------
    ValueError
        If ``prefix`` is not :data:`MIN_PREFIX` to 32 hex digits.
    UnknownDigestError
        If no entry matches.
    AmbiguousDigestError
        If several do (it names them).
    """
    prefix = prefix.strip().lower()
    if not _HEX.fullmatch(prefix) or not MIN_PREFIX <= len(prefix) <= 32:
        raise ValueError(f"{prefix!r} is not a digest prefix ({MIN_PREFIX} to 32 hex digits)")
    docs = list(cache.find(_prefix_criteria(prefix), ["digest", "name"], limit=MAX_CANDIDATES + 1))
    if not docs:
        raise UnknownDigestError(f"no cache entry has a digest starting with {prefix!r}")
    if len(docs) > 1:
        raise AmbiguousDigestError(prefix, [(d["digest"], str(d.get("name", ""))) for d in docs])
    return str(docs[0]["digest"])


# --------------------------------------------------------------------------- stats


@dataclasses.dataclass
class Stats(Totals):
    """Numbers describing a cache (see :func:`stats`): the backend's :class:`.Totals`, and the
    object area's file count and bytes."""

    objects: int = 0
    objects_bytes: int = 0

    @property
    def dedup_ratio(self) -> float:
        """Bytes the manifests name per byte stored in the object area (1.0: no sharing)."""
        return self.files_bytes / self.objects_bytes if self.objects_bytes else 1.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["dedup_ratio"] = round(self.dedup_ratio, 3)
        for key in ("oldest", "newest"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


def stats(cache: CacheStore, criteria: dict[str, Any] | None = None) -> Stats:
    """Count entries, hits, time saved, file bytes, object-area bytes and entries per function.

    The sums come from the backend (:meth:`.EntryBackend.totals`: SQL aggregates on the
    embedded store and PostgreSQL, one streamed pass elsewhere); then the object area is
    listed.
    """
    result = Stats(**vars(cache.backend.totals(criteria or {})))
    for _, size in ObjectArea(cache.objects_dir).iter_objects():
        result.objects += 1
        result.objects_bytes += size
    return result
