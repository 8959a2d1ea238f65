"""The one interface every cache backend implements: :class:`EntryBackend`.

A backend keeps *entry documents* (what :meth:`.CacheEntry.to_document` returns, sealed and
signed by :class:`.CacheStore`) by their ``digest``, with the book-keeping the cache needs
beside them (hit counts, validity, claims and aliases). It never interprets an entry: sealing,
checking, decoding and blobs are the :class:`.CacheStore`'s.

**Criteria** (:data:`Criteria`) are the small Mongo-style language the package itself speaks,
nothing more:

* keys are top-level entry fields of :data:`SELECTABLE` (or ``$and``/``$or``/``$nor`` with a
  list of criteria);
* a value is either a scalar (equality; ``None`` matches a null or missing field) or a dict
  of operators ``$eq $ne $in $nin $gt $gte $lt $lte $regex $exists`` (``$regex`` is a
  Python/MongoDB regular expression, searched, not matched, with ``$options`` beside it
  holding the flags ``i``, ``m`` and ``s``, as MongoDB reads them; dates are aware or
  naive-UTC ``datetime`` values).

A fixed-schema backend answers every such criteria with its own columns (SQL) and raises
``ValueError`` for anything else; the maggma adapter passes them to the store as they are.

In the spirit of joblib's ``StoreBackendBase`` and redun's ``RedunBackend``: domain methods,
no query language of its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "EXPLAIN_FIELDS",
    "SELECTABLE",
    "UNREADABLE",
    "Coordinator",
    "Criteria",
    "EntryBackend",
    "Totals",
    "format_datetime",
    "json_kind",
    "parse_datetime",
    "unreadable_reason",
]

#: Criteria: see the module docstring.
Criteria = Mapping[str, Any]

#: Top-level entry fields criteria and ``order`` may name (a fixed-schema backend keeps each in
#: a column of its own).
SELECTABLE = (
    "digest",
    "scheme",
    "function",
    "name",
    "maker",
    "cache_version",
    "created",
    "last_hit",
    "hits",
    "valid",
    "invalid_reason",
    "source_uuid",
    "files_size",
    "duration",
    "host",
)

#: Fields only needed to explain a miss: left out by ``read(digest, explain=False)``.
EXPLAIN_FIELDS = ("canonical_input", "arg_digests")

#: Field of the stand-in document a backend yields for a row it cannot read.
UNREADABLE = "_jfc_unreadable"


def format_datetime(value: datetime) -> str:
    """The fixed-width UTC ISO-8601 text a SQL backend stores for a datetime (text order is
    time order; a naive datetime is taken as UTC).

    Examples
    --------
    >>> format_datetime(datetime(2024, 5, 1, 12))
    '2024-05-01T12:00:00.000000Z'
    """
    offset = value.utcoffset()
    if offset is not None:
        value = value.replace(tzinfo=None) - offset
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}Z"
    )


def parse_datetime(text: str) -> datetime:
    """The naive UTC datetime of a text written by :func:`format_datetime`."""
    return datetime.fromisoformat(text[:-1] if text.endswith("Z") else text)


def unreadable_reason(doc: Any) -> str | None:
    """Why a document read from a backend is not one (None: it is a document).

    A row that cannot be read (invalid UTF-8, JSON cut short, a JSON array, number or string
    where a document belongs: bit rot or a hand-edited table) comes out of a read or a
    selection as a stand-in ``{"digest": <its key>, UNREADABLE: <why>}``, never as an
    exception, so one damaged row never stops a lookup or a listing of the others.

    Examples
    --------
    >>> unreadable_reason({"digest": "ab", UNREADABLE: "a JSON number, not a document"})
    'a JSON number, not a document'
    >>> unreadable_reason({"digest": "ab"}) is None
    True
    """
    if not isinstance(doc, Mapping):
        return f"a JSON {json_kind(doc)}, not a document"
    reason = doc.get(UNREADABLE)
    return None if reason is None else str(reason)


def json_kind(value: Any) -> str:
    """The JSON name of a value's kind (``null``, ``boolean``, ``number``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


@dataclass
class Totals:
    """Sums over the entries a criteria selects (``cachetool stats``)."""

    entries: int = 0
    invalid: int = 0
    hits: int = 0
    time_saved: float = 0.0  # sum of hits * duration
    files_bytes: int = 0
    functions: dict[str, int] = field(default_factory=dict)  # entries per function, most first
    oldest: datetime | None = None  # aware UTC
    newest: datetime | None = None


@runtime_checkable
class Coordinator(Protocol):
    """Claims (in-flight deduplication) and run-folder aliases kept beside the entries."""

    def claim(self, name: str, owner: str, lease: float) -> str:
        """Take or renew claim ``name`` for ``lease`` seconds; return its holder after the
        call (``owner`` when the claim is ours)."""

    def release(self, name: str, owner: str) -> None:
        """Drop claim ``name`` if ``owner`` holds it."""

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        """Record ``alias -> digest`` pairs (last writer wins)."""

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        """The recorded ones among ``names``."""


@runtime_checkable
class EntryBackend(Protocol):
    """Where entry documents live, keyed by digest (see the module docstring).

    Every method may raise any exception when the backend itself fails (a server down, a
    file gone): the :class:`.CacheStore` turns it into :class:`.StoreUnavailableError`.
    """

    @property
    def name(self) -> str:
        """A string naming the data source in messages (``sqlite:///path``, ...)."""

    @property
    def thread_safe(self) -> bool:
        """True when a writer thread may call it while another thread reads (write-behind)."""

    def connect(self) -> None:
        """Open (creating the schema, or migrating an older one, as needed). Idempotent."""

    def close(self) -> None:
        """Release connections; calling it twice is harmless."""

    def owned_paths(self) -> list[str]:
        """Absolute paths of the files this backend keeps (their ``-wal``/``-shm``/
        ``-journal`` sidecars share the prefix): never a job's run-folder files."""

    def read(self, digest: str, *, explain: bool = True) -> dict[str, Any] | None:
        """The document of ``digest`` as stored, None when there is none; without
        ``explain`` the :data:`EXPLAIN_FIELDS` are left out (cheaper, for serving)."""

    def write(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Insert or replace whole documents by digest, as one transaction where the
        backend has them (each document is written whole or not at all)."""

    def add_hits(self, hits: Mapping[str, tuple[int, datetime]]) -> None:
        """Add ``count`` to ``hits`` and set ``last_hit`` of each digest: ``digest ->
        (count, when)``; absent digests are ignored. Costs the same whatever the entry's size."""

    def set_invalid(self, reasons: Sequence[tuple[str, str]]) -> list[str]:
        """Set ``valid: False`` and ``invalid_reason`` of each ``(digest, reason)``, nothing
        else (a hit count written meanwhile is kept); the digests that exist, in order."""

    def select(
        self,
        criteria: Criteria | None = None,
        fields: Sequence[str] | None = None,
        order: Mapping[str, int] | None = None,
        limit: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Stream the documents matching ``criteria`` (all when None), with only ``fields``
        (and ``digest``) when given, sorted by ``order`` (field -> 1 or -1, in order),
        at most ``limit`` (0: no limit). Never holds the whole cache in memory."""

    def count(self, criteria: Criteria | None = None) -> int:
        """How many entries match ``criteria``."""

    def totals(self, criteria: Criteria | None = None) -> Totals:
        """Sums over the matching entries (:class:`Totals`)."""

    def consumers(self) -> Iterator[tuple[str, list[str]]]:
        """``(digest, consumed)`` of every entry that consumed others (cascades)."""

    def remove(self, digests: Sequence[str]) -> None:
        """Delete the entries of ``digests`` (absent ones are ignored)."""

    def coordinator(self) -> Coordinator | None:
        """Claims and aliases kept beside the entries, None when this backend has none."""
