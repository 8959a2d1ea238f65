"""CacheStore: a digest -> CacheEntry map on an :class:`.EntryBackend` (the embedded
fixed-schema SQLite file by default, or any maggma Store), with a blob store for outputs too
large for one document; WriteBehind: its writes in batches (one commit for many entries or hit
counts, at most ~0.1 s behind)."""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import xxhash
from maggma import stores as maggma_stores
from maggma.core import Sort, Store
from maggma.stores import GridFSStore, MongoStore, MongoURIStore
from maggma.stores.gridfs import GridFSURIStore
from monty.json import MontyDecoder, MSONable
from pydantic import ValidationError

from jobflow_cache.backends import EntryBackend, MaggmaBackend, PostgresBackend, SQLiteBackend
from jobflow_cache.backends.base import unreadable_reason
from jobflow_cache.backends.maggma import is_thread_safe, store_name
from jobflow_cache.entry import (
    CHECKSUM_FIELDS,
    PACKED_KEY,
    CacheEntry,
    TooLargeError,
    document_checksum,
    unpack_document,
    utcnow,
)
from jobflow_cache.errors import CacheError, SettingsError, StoreUnavailableError
from jobflow_cache.hashing.canonical import SCHEME
from jobflow_cache.settings import CacheSettings, get_settings
from jobflow_cache.trust import group_key, sign, signature_problem

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "BLOBS_KEY",
    "MISS",
    "CacheStore",
    "Lookup",
    "Outcome",
    "WriteBehind",
    "default_blob_store",
    "maggma_store_from_spec",
    "store_from_spec",
]

logger = logging.getLogger(__name__)

#: A :class:`WriteBehind` writes what it holds once the oldest item is this old (seconds), or
#: its watchdog does at twice that: a crash or SIGKILL loses at most ~3 times this.
WRITE_DELAY = 0.035
#: The same for a queue holding hit counts only (book-keeping, outside the checksum): a
#: warm run of trivial jobs then writes its counts in batches of ~500, not ~35.
HIT_DELAY = 0.5

#: Key of a stored entry document whose compressed ``output``/``response`` are kept in the blob
#: store: field -> xxh3-128 of the compressed text there (the blob itself is keyed by digest).
BLOBS_KEY = "blobs"

#: Fields whose presence in a ``find`` projection means the blob must be read back.
_BLOB_FIELDS = frozenset({"output", "response", PACKED_KEY})


class _Miss:
    """Sentinel type of :data:`MISS` (a miss is never ``None``: None can be a cached output)."""

    _instance: _Miss | None = None

    def __new__(cls) -> _Miss:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISS"

    def __bool__(self) -> bool:
        return False


MISS = _Miss()


class Outcome(str, Enum):
    """What the cache did for one job."""

    HIT = "hit"  #: served from the cache, the job did not run
    MISS = "miss"  #: not in the cache; the job ran (and was recorded if it succeeded)
    INVALID = "invalid"  #: an entry exists but cannot be trusted; the job ran
    DISABLED = "disabled"  #: caching turned off (JOBFLOW_CACHE_DISABLE or opt-out)
    UNCACHEABLE = "uncacheable"  #: inputs could not be hashed; the job ran uncached
    ERROR = "error"  #: the store failed; the job ran uncached


@dataclass(frozen=True)
class Lookup:
    """Result of :meth:`CacheStore.lookup`: an outcome, the entry on a hit, and why not."""

    outcome: Outcome
    entry: CacheEntry | None = None
    reason: str = ""


#: The package's own backends, by the ``type`` a store spec gives them.
_BACKENDS: dict[str, type[SQLiteBackend] | type[PostgresBackend]] = {
    "SQLiteBackend": SQLiteBackend,
    "PostgresBackend": PostgresBackend,
}

#: The modules of the document stores earlier releases kept the cache in (removed after 0.1.0),
#: and their class, as a serialized spec names them.
_REMOVED_MODULES = {
    "jobflow_cache.sqlite_store": "SQLiteStore",
    "jobflow_cache.postgres_store": "PostgresStore",
}


def _store_class(name: str) -> type[Store]:
    cls = getattr(maggma_stores, name, None)
    if isinstance(cls, type) and issubclass(cls, Store):
        return cls
    raise StoreUnavailableError(f"unknown store type {name!r} in store spec")


def _removed_store(kind: str, kwargs: dict[str, Any]) -> EntryBackend:
    """The backend that keeps what a spec of an earlier release's ``SQLiteStore`` or
    ``PostgresStore`` named (both removed after 0.1.0), or :class:`.StoreUnavailableError`
    saying what to use instead when it cannot be honoured.

    ``{"type": "SQLiteStore", "path": p}`` is the cache file ``p``: :class:`.SQLiteBackend`
    migrates on first open the table 0.1.0 kept the cache in, ``entries`` (the embedded
    default) or ``cache`` (SQLiteStore's own default, for a spec naming no collection).
    ``{"type": "PostgresStore", "uri": u, "table": t}`` (key ``digest``) is
    :class:`.PostgresBackend` on ``t``, which migrates that table.
    """
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("@")}
    if kind == "SQLiteStore":
        collection = kwargs.get("collection_name", "cache")
        key = kwargs.get("key", "digest")
        if collection not in ("entries", "cache") or key != "digest":
            raise StoreUnavailableError(
                f"SQLiteStore was removed after jobflow-cache 0.1.0, and this spec's table "
                f"({collection!r}, key {key!r}) is not the one the cache kept ('entries', key "
                '\'digest\'): give the cache {"type": "SQLiteBackend", "path": ...} (a JobStore: '
                "maggma's JSONStore or MongoStore)"
            )
        if "path" not in kwargs:
            raise StoreUnavailableError("a SQLiteStore spec needs a 'path'")
        return SQLiteBackend(kwargs["path"], timeout=float(kwargs.get("timeout", 30.0)))
    try:
        return PostgresBackend(**kwargs)
    except (TypeError, ValueError) as err:
        raise StoreUnavailableError(
            f"PostgresStore was removed after jobflow-cache 0.1.0 and this spec cannot open "
            f'PostgresBackend ({err}): give the cache {{"type": "PostgresBackend", "uri": ..., '
            '"table": ...}'
        ) from err


def _load_spec_file(path: Path) -> Any:
    from monty.serialization import loadfn

    try:
        return loadfn(path)
    except FileNotFoundError as err:
        raise StoreUnavailableError(f"store spec file {path} does not exist") from err
    except Exception as err:
        raise StoreUnavailableError(f"cannot read store spec file {path}: {err}") from err


def store_from_spec(spec: dict[str, Any] | str | Path | Store) -> Store | EntryBackend:
    """Build the store a spec names, in the same forms jobflow accepts for ``JOB_STORE``.

    A serialized store (``{"@module": ..., "@class": ..., ...}``),
    ``{"type": "MongoStore", "database": ..., "collection_name": ...}``, or the path of a YAML or
    JSON file holding either, gives a maggma ``Store``. The package's backends are named the
    same way: ``{"type": "SQLiteBackend", "path": ...}``,
    ``{"type": "PostgresBackend", "uri": ..., "table": ...}``. The specs of the
    ``SQLiteStore`` and ``PostgresStore`` of earlier releases (removed after 0.1.0) still open
    the cache they named, through those backends.

    Examples
    --------
    >>> store_from_spec({"type": "MemoryStore", "collection_name": "c"}).collection_name
    'c'
    >>> store_from_spec({"type": "SQLiteStore", "path": "/tmp/cache.sqlite"})
    SQLiteBackend('/tmp/cache.sqlite')
    """
    if isinstance(spec, Store):
        return spec
    if isinstance(spec, (str, Path)):
        spec = _load_spec_file(Path(spec).expanduser())
    if not isinstance(spec, dict):
        raise StoreUnavailableError(f"a store spec must be a mapping, not {type(spec).__name__}")
    try:
        if "@class" in spec:
            removed = _REMOVED_MODULES.get(str(spec.get("@module")))
            if removed is not None and spec["@class"] == removed:
                return _removed_store(removed, spec)
            store = MontyDecoder().process_decoded(dict(spec))
        elif "type" in spec:
            kind = str(spec["type"])
            kwargs = {k: v for k, v in spec.items() if k != "type"}
            if kind in _REMOVED_MODULES.values():
                return _removed_store(kind, kwargs)
            backend = _BACKENDS.get(kind)
            store = backend(**kwargs) if backend is not None else _store_class(kind)(**kwargs)
        else:
            raise StoreUnavailableError("a store spec needs '@class' or 'type'")
    except CacheError:
        raise
    except Exception as err:
        raise StoreUnavailableError(f"malformed store spec: {err}") from err
    if not isinstance(store, Store | EntryBackend):
        raise StoreUnavailableError(f"store spec built a {type(store).__name__}, not a Store")
    return store


def maggma_store_from_spec(spec: dict[str, Any] | str | Path | Store, what: str) -> Store:
    """:func:`store_from_spec` for a place only a maggma store fits (``what``: a blob store,
    a JobStore's documents); :class:`.StoreUnavailableError` for a backend."""
    store = store_from_spec(spec)
    if not isinstance(store, Store):
        raise StoreUnavailableError(
            f"{what} must be a maggma store (MongoStore, GridFSStore, JSONStore, ...), "
            f"not {store!r}"
        )
    return store


class CacheStore(MSONable):
    """Cache entries keyed by digest, kept in an :class:`.EntryBackend`.

    Without arguments the embedded default is used: :class:`.SQLiteBackend`, a fixed-schema
    SQLite file under ``JOBFLOW_CACHE_DIR`` that needs no server. A maggma
    :obj:`~maggma.core.Store` is wrapped in a :class:`.MaggmaBackend` (its key is set to
    ``"digest"``; a unique index on it and plain indexes on the query fields are created on
    :meth:`connect`). :attr:`backend` is the backend; :attr:`store` is the maggma store when one
    was given, the backend otherwise.

    **Large outputs.** A sealed entry document larger than ``blob_threshold`` bytes (its
    ``output`` and ``response`` already compressed) keeps those two in the blob store, in one
    blob keyed by the digest; the entry holds the xxh3 of each instead (:data:`BLOBS_KEY`). The
    blob is written before its entry, read back on lookup, and removed with its entry. The
    entry's checksum still covers the restored text: a blob that is missing, altered or replaced
    makes the entry ``INVALID`` (the job runs), never a wrong result.

    Parameters
    ----------
    store
        An :class:`.EntryBackend` (:class:`.SQLiteBackend`, :class:`.PostgresBackend`), any
        maggma store (``MongoStore``, ``MemoryStore``, ...), or a store spec (see
        :func:`store_from_spec`; ``CacheStore.from_dict`` passes one for a serialized store
        it cannot import, such as an earlier release's ``SQLiteStore``, which then opens the
        cache it named).
    objects_dir
        Folder of the content-addressed run-folder file objects.
    blob_store
        Store of large outputs (any maggma store). Default: ``JOBFLOW_CACHE_BLOB_STORE``, else
        :func:`default_blob_store` (a ``GridFSStore`` beside a ``MongoStore``, none otherwise:
        without a blob store nothing is moved).
    blob_threshold
        Document size in bytes above which outputs go to the blob store (default
        ``JOBFLOW_CACHE_BLOB_THRESHOLD``, 8 MiB; MongoDB refuses documents over 16 MiB).

    Examples
    --------
    >>> from maggma.stores import MemoryStore
    >>> with CacheStore(MemoryStore(), objects_dir="/tmp/objs") as cache:
    ...     cache.get("0" * 32)
    MISS
    >>> cache = CacheStore(MemoryStore(), "/tmp/objs", blob_store=MemoryStore(), blob_threshold=0)
    >>> cache.connect()
    >>> cache.put(CacheEntry(digest="b" * 32, scheme=SCHEME, function="m:f", output="[0]" * 9**5))
    >>> sorted(cache.backend.read("b" * 32)[BLOBS_KEY])
    ['output']
    >>> cache.get("b" * 32).output == "[0]" * 9**5
    True
    """

    def __init__(
        self,
        store: Store | EntryBackend | dict[str, Any] | None = None,
        objects_dir: str | Path | None = None,
        blob_store: Store | None = None,
        blob_threshold: int | None = None,
    ) -> None:
        try:
            settings = get_settings()
        except SettingsError:  # the Cache that runs jobs uncached on a bad setting makes one
            settings = CacheSettings.model_construct()
        if store is None:
            store = default_store(settings)
        elif isinstance(store, dict):  # from_dict of a store it could not import (below)
            store = store_from_spec(store)
        self.backend: EntryBackend = _backend_of(store)
        #: the maggma store given, else the backend
        self.store = store if isinstance(self.backend, MaggmaBackend) else self.backend
        self.objects_dir = str(objects_dir or settings.objects_dir())
        self._blob_error: StoreUnavailableError | None = None
        if blob_store is None:
            try:  # a bad spec fails connect() (the cache is then skipped), not the constructor
                blob_store = _configured_blob_store(self.store, settings)
            except StoreUnavailableError as err:
                self._blob_error = err
        if blob_store is not None:
            blob_store.key = "digest"
        self.blob_store = blob_store
        self.blob_threshold = (
            settings.BLOB_THRESHOLD if blob_threshold is None else int(blob_threshold)
        )
        self.configure_trust(settings)

    def configure_trust(self, settings: CacheSettings) -> None:
        """Take the group key and the decoding limit from ``settings``.

        With a group key (``GROUP_KEY`` or ``GROUP_KEY_FILE``) entries are written signed and
        only entries signed with that key are served. A key that cannot be read fails
        :meth:`connect` (the cache is then skipped, the flow runs uncached): a cache told to
        check signatures never serves without checking them.
        """
        self._key_error: SettingsError | None = None
        self.group_key: bytes | None = None
        try:
            self.group_key = group_key(settings)
        except SettingsError as err:
            self._key_error = err
        except Exception as err:  # a settings object built without validation, say
            self._key_error = SettingsError(f"cannot read the group key: {err}")
        limit = getattr(settings, "MAX_DECODED_SIZE", None)
        self.max_decoded_size = int(limit) if isinstance(limit, int) and limit > 0 else 1 << 30

    @classmethod
    def from_settings(cls, settings: CacheSettings | None = None) -> CacheStore:
        """The store configured by ``JOBFLOW_CACHE_*`` settings (embedded default if none)."""
        settings = settings or get_settings()
        store = store_from_spec(settings.STORE) if settings.STORE else default_store(settings)
        try:
            blob_store, error = _configured_blob_store(store, settings), None
        except StoreUnavailableError as err:
            blob_store, error = None, err
        cache = cls(
            store,
            objects_dir=settings.objects_dir(),
            blob_store=blob_store,
            blob_threshold=settings.BLOB_THRESHOLD,
        )
        if error is not None:  # raised by connect(): the cache is skipped, the flow runs
            cache.blob_store, cache._blob_error = None, error
        cache.configure_trust(settings)
        return cache

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect the underlying store (and the blob store) and create their indexes."""
        if self._blob_error is not None:
            raise self._blob_error
        if self._key_error is not None:
            raise StoreUnavailableError(
                f"cache store {self.name} is not used: {self._key_error}"
            ) from self._key_error
        try:
            self.backend.connect()
        except CacheError:
            raise
        except Exception as err:
            raise StoreUnavailableError(
                f"cannot connect to cache store {self.name}: {err}"
            ) from err
        if self.blob_store is not None:
            try:
                self.blob_store.connect()
                # not unique: GridFSStore writes the new file before deleting the old one
                self.blob_store.ensure_index("digest")
            except Exception as err:
                raise StoreUnavailableError(
                    f"cannot connect to the blob store {store_name(self.blob_store)} of cache "
                    f"store {self.name}: {err}"
                ) from err

    def close(self) -> None:
        """Close the underlying store (and the blob store)."""
        self.backend.close()
        if self.blob_store is not None:
            try:
                self.blob_store.close()
            except Exception as err:  # never connected, say: nothing to close
                logger.debug("closing blob store: %s", err)

    def __enter__(self) -> CacheStore:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def name(self) -> str:
        """Name of the underlying store."""
        try:
            return str(self.backend.name)
        except Exception:
            return type(self.store).__name__

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, digest: str, *, serving: bool = False) -> Lookup:
        """Find the entry of ``digest`` and say whether it may be served.

        An entry is served only when it decodes, its checksum matches, its scheme is current
        and it is marked valid (and, with a group key, it is signed with that key for this
        digest); otherwise the outcome is ``INVALID`` with the reason.
        With ``serving``, the fields that only explain a miss (:data:`EXPLAIN_FIELDS`) are not
        read: the entry returned lacks them. Store failures raise
        :class:`.StoreUnavailableError`.

        Nothing unchecked is decoded: compressed fields are inflated within
        ``MAX_DECODED_SIZE`` (measured a chunk at a time first), the checksum (and signature)
        are checked on the fields as stored, and only then is the entry validated; its output
        is parsed later, by the one serving it.
        """
        try:
            doc = self.backend.read(digest, explain=not serving)
        except Exception as err:
            raise StoreUnavailableError(f"cache store {self.name} failed: {err}") from err
        if doc is None:
            return Lookup(Outcome.MISS)
        unreadable = unreadable_reason(doc)  # a damaged row: invalid for this digest only
        if unreadable is not None:
            reason = f"entry does not decode: not an entry document ({unreadable})"
            return Lookup(Outcome.INVALID, None, reason)
        if BLOBS_KEY in doc:
            doc, problem = self.restore_blobs(doc)
            if problem is not None:
                return Lookup(Outcome.INVALID, None, problem)
        try:
            doc = unpack_document(doc, self.max_decoded_size)  # once, for checksum and entry
        except TooLargeError as err:
            return Lookup(Outcome.INVALID, None, f"entry too large to decode: {err}")
        except (TypeError, ValueError) as err:
            return Lookup(Outcome.INVALID, None, f"entry does not decode: {err}")
        problem = self._seal_problem(digest, doc)
        if problem is not None:
            return Lookup(Outcome.INVALID, None, problem)
        try:
            entry = CacheEntry.from_document(doc, unpacked=True)
        except (ValidationError, TypeError, ValueError) as err:
            return Lookup(Outcome.INVALID, None, f"entry does not decode: {err}")
        return self._judge(entry, verified=True)

    def _seal_problem(self, digest: str, doc: Mapping[str, Any]) -> str | None:
        """Why the stored fields of ``doc`` are not those sealed (and signed) for ``digest``,
        or None; checked before the entry is validated."""
        stored = doc.get("checksum")
        if not isinstance(doc.get("scheme"), str) or not isinstance(stored, str) or not stored:
            return "entry does not decode: it has no scheme or no checksum"
        if doc["scheme"] != SCHEME:  # an older entry, kept for inspection: said first
            return f"scheme {doc['scheme']!r} is not {SCHEME!r}"
        if doc.get("valid") is False:
            return f"marked invalid: {doc.get('invalid_reason')}"
        if doc.get("digest") != digest:
            return "entry is filed under another digest than its own (moved)"
        if document_checksum(doc) != stored:
            # a document written by another backend may hold other number types: the
            # checksum of the sealed fields, validated (no text is parsed), decides
            try:
                sealed = {k: doc[k] for k in CHECKSUM_FIELDS if k in doc}
                partial = CacheEntry.model_validate({"function": "", "scheme": "", **sealed})
            except (ValidationError, TypeError, ValueError) as err:
                return f"entry does not decode: {err}"
            if partial.compute_checksum() != stored:
                return "checksum mismatch (entry altered)"
        if self.group_key is not None:
            return signature_problem(self.group_key, digest, stored, doc.get("signature"))
        return None

    @staticmethod
    def check_entry(entry: CacheEntry) -> Lookup:
        """Lookup outcome of a decoded entry (checksum, scheme and valid flag)."""
        return CacheStore._judge(entry, verified=False)

    @staticmethod
    def _judge(entry: CacheEntry, verified: bool) -> Lookup:
        if entry.scheme != SCHEME:
            return Lookup(Outcome.INVALID, entry, f"scheme {entry.scheme!r} is not {SCHEME!r}")
        if not entry.valid:
            return Lookup(Outcome.INVALID, entry, f"marked invalid: {entry.invalid_reason}")
        if not verified and entry.checksum != entry.compute_checksum():
            return Lookup(Outcome.INVALID, entry, "checksum mismatch (entry altered)")
        return Lookup(Outcome.HIT, entry)

    def get(self, digest: str, default: Any = MISS) -> CacheEntry | Any:
        """The servable entry of ``digest``, or ``default`` (:data:`MISS`)."""
        found = self.lookup(digest)
        return found.entry if found.outcome is Outcome.HIT else default

    def __contains__(self, digest: object) -> bool:
        return isinstance(digest, str) and self.lookup(digest).outcome is Outcome.HIT

    def count(self, criteria: dict[str, Any] | None = None) -> int:
        """Number of entries matching ``criteria``."""
        return int(self.backend.count(criteria or {}))

    def find(
        self,
        criteria: dict[str, Any] | None = None,
        properties: list[str] | None = None,
        sort: dict[str, Sort | int] | None = None,
        limit: int = 0,
        *,
        blobs: bool = True,
    ) -> Iterator[dict[str, Any]]:
        """Stream entry documents as stored (never loads the whole cache).

        With ``blobs`` (default), the compressed fields of an entry kept in the blob store are
        read back into the document (under ``"packed"``, as for an entry stored whole) when all
        fields or ``"packed"`` are asked for; a document whose blob cannot be restored (see
        :meth:`restore_blobs`) comes as stored, its text fields empty (they fail the checksum).
        """
        if properties is not None and PACKED_KEY in properties and BLOBS_KEY not in properties:
            properties = [*properties, BLOBS_KEY]
        order = {field: _direction(way) for field, way in (sort or {}).items()}
        docs = self.backend.select(criteria or {}, properties, order, limit)
        restore = (
            blobs
            and self.blob_store is not None
            and (properties is None or not _BLOB_FIELDS.isdisjoint(properties))
        )
        if not restore:
            yield from docs
            return
        for doc in docs:
            if BLOBS_KEY in doc:
                doc, problem = self.restore_blobs(doc)
                if problem is not None:
                    logger.warning("cache entry %s: %s", doc.get("digest"), problem)
            yield doc

    def restore_blobs(self, doc: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        """``doc`` with its fields kept in the blob store read back, and why not if they cannot be.

        Returns ``(restored, None)``, or ``(doc, reason)`` when the blob is missing, altered or
        no blob store is configured. A document without blobs comes back as it is (a copy).
        A failure of the blob store itself raises :class:`.StoreUnavailableError`.
        """
        doc = dict(doc)
        refs = doc.get(BLOBS_KEY)
        if refs is None:
            return doc, None
        if not isinstance(refs, Mapping) or not refs:
            return doc, "blob reference of unknown form"
        if self.blob_store is None:
            return doc, "its output is kept in a blob store, and none is configured"
        try:
            blob = self.blob_store.query_one({"digest": doc.get("digest")})
        except Exception as err:
            raise StoreUnavailableError(
                f"blob store {store_name(self.blob_store)} of cache store {self.name} failed: {err}"
            ) from err
        held = blob.get(PACKED_KEY) if isinstance(blob, Mapping) else None
        if not isinstance(held, Mapping):
            return doc, f"blob missing from {store_name(self.blob_store)}"
        packed = dict(doc.get(PACKED_KEY) or {})
        for field, expected in refs.items():
            text = held.get(field)
            if not isinstance(text, str):
                return doc, f"blob missing its {field}"
            if _blob_hash(text) != expected:
                return doc, f"blob altered: its {field} is not the one this entry was sealed with"
            packed[field] = text
        restored = {k: v for k, v in doc.items() if k != BLOBS_KEY}
        restored[PACKED_KEY] = packed
        return restored, None

    def entries(self, criteria: dict[str, Any] | None = None) -> Iterator[CacheEntry]:
        """Stream decoded entries; documents that do not decode are skipped with a log line."""
        for doc in self.find(criteria):
            try:
                yield CacheEntry.from_document(doc)
            except (ValidationError, TypeError, ValueError) as err:
                logger.warning("cache entry %s does not decode: %s", doc.get("digest"), err)

    # -- writing ----------------------------------------------------------------------------
    def _sealed(self, entry: CacheEntry) -> dict[str, Any]:
        """The sealed document of ``entry``, signed when this cache has a group key."""
        doc = entry.sealed_document()
        if self.group_key is not None:
            entry.signature = doc["signature"] = sign(self.group_key, entry.digest, entry.checksum)
        else:
            entry.signature = doc["signature"] = ""
        return doc

    def put(self, entry: CacheEntry) -> None:
        """Seal (and sign, with a group key) and write ``entry`` (call only after its files
        are safely stored); a large output goes to the blob store first."""
        doc, blob = self._split(self._sealed(entry))
        if blob is not None and self.blob_store is not None:
            self.blob_store.update(blob, key="digest")
        self.backend.write([doc])

    def put_many(self, entries: list[CacheEntry]) -> None:
        """Seal and write ``entries`` at once (one transaction where the backend has them).

        Call only after their files are safely stored. Each entry is written whole or not
        at all, and only after its blob (if any): all blobs are written first.
        """
        if entries:
            docs, blobs = [], []
            for entry in entries:
                doc, blob = self._split(self._sealed(entry))
                docs.append(doc)
                if blob is not None:
                    blobs.append(blob)
            if blobs and self.blob_store is not None:
                self.blob_store.update(blobs, key="digest")
            self.backend.write(docs)

    def _split(self, doc: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """A sealed document larger than the threshold, without its compressed fields, and
        the blob holding them; ``(doc, None)`` when it stays whole."""
        packed = doc.get(PACKED_KEY)
        if self.blob_store is None or not packed or not isinstance(packed, dict):
            return doc, None
        rest = {k: v for k, v in doc.items() if k != PACKED_KEY}
        size = sum(len(text) for text in packed.values()) + len(
            orjson.dumps(rest, default=str, option=orjson.OPT_NON_STR_KEYS)
        )
        if size <= self.blob_threshold:
            return doc, None
        rest[BLOBS_KEY] = {field: _blob_hash(text) for field, text in packed.items()}
        return rest, {"digest": doc["digest"], PACKED_KEY: packed}

    def record_hit(self, digest: str, count: int = 1, when: datetime | None = None) -> None:
        """Add ``count`` to the hit counter of an entry and set its last-hit time
        (default: now), atomically where the backend can."""
        self.backend.add_hits({digest: (count, when or utcnow())})

    def record_hits(self, hits: Mapping[str, tuple[int, datetime]]) -> None:
        """Record many hits: digest -> (count, last-hit time); one transaction in SQL."""
        self.backend.add_hits(hits)

    def dependents(self, digests: Iterable[str]) -> list[str]:
        """Digests of the entries that consumed any of ``digests``, transitively: each entry
        whose ``consumed`` names one of them, the entries that consumed those, and so on.

        The ``digests`` themselves are left out (unless one consumed another); the order is
        breadth first (direct consumers first), each digest once.

        One pass over the backend's consumed links (:meth:`.EntryBackend.consumers`) finds
        the consumers of every digest; memory grows with the number of links, not with the
        entries' size.

        Examples
        --------
        >>> from maggma.stores import MemoryStore
        >>> cache = CacheStore(MemoryStore(), objects_dir="/tmp/objs")
        >>> cache.connect()
        >>> for name, up in [("a", []), ("b", ["a"]), ("c", ["b"]), ("d", [])]:
        ...     cache.put(CacheEntry(digest=name * 32, scheme=SCHEME, function="m:f",
        ...                          consumed=[u * 32 for u in up]))
        >>> [d[0] for d in cache.dependents(["a" * 32])]
        ['b', 'c']
        """
        return [digest for digest, _ in self._cascade(digests)]

    def _cascade(self, digests: Iterable[str]) -> list[tuple[str, str]]:
        """(dependent, the consumed digest it was reached through), breadth first."""
        seen = set(digests)
        if not seen:
            return []
        consumers: dict[str, list[str]] = {}
        for digest, consumed in self.backend.consumers():
            for upstream in consumed:
                consumers.setdefault(upstream, []).append(digest)
        found: list[tuple[str, str]] = []
        frontier = sorted(seen)
        while frontier:
            level: list[str] = []
            for upstream in frontier:
                for digest in sorted(consumers.get(upstream, ())):
                    if digest not in seen:
                        seen.add(digest)
                        found.append((digest, upstream))
                        level.append(digest)
            frontier = level
        return found

    def invalidate(
        self, digests: str | Iterable[str], reason: str, *, cascade: bool = True
    ) -> list[str]:
        """Mark entries invalid (kept for inspection, never served: their jobs run again and
        record sound entries in their place).

        With ``cascade`` (the default), every entry that consumed one of them is invalidated
        too, transitively (see :meth:`dependents`), with a reason naming the entry it
        consumed. A job's result computed from a wrong upstream result (the static
        calculation that parsed the OUTCAR of a relaxation run with a bad POTCAR) is then
        recomputed as well.

        Returns the digests of the entries marked invalid, those of ``digests`` that exist
        first (an empty list when none exists: false in a boolean test, as before).
        """
        targets = [digests] if isinstance(digests, str) else list(dict.fromkeys(digests))
        marked = self._mark_invalid([(digest, reason) for digest in targets])
        if cascade and targets:
            cascaded = [
                (digest, f"{reason} (it consumed invalidated entry {via[:12]})")
                for digest, via in self._cascade(targets)
            ]
            marked += self._mark_invalid(cascaded)
        return marked

    def _mark_invalid(self, reasons: list[tuple[str, str]]) -> list[str]:
        """Set ``valid: False`` and the reason of each (digest, reason); the digests found.

        Only these two fields are written (atomically where the store can), so a hit count
        written at the same moment is not lost.
        """
        return self.backend.set_invalid(reasons) if reasons else []

    def remove(self, digests: list[str]) -> None:
        """Delete the entries of ``digests``, then their blobs (their file objects are left to
        garbage collection)."""
        if digests:
            self.backend.remove(list(digests))
            if self.blob_store is not None:
                self.blob_store.remove_docs({"digest": {"$in": list(digests)}})

    def orphan_blobs(self) -> list[str]:
        """Digests of blobs that no entry refers to (left by a crash between a blob and its
        entry, or by an entry replaced by a smaller one)."""
        if self.blob_store is None:
            return []
        held = sorted(str(d) for d in self.blob_store.distinct("digest") if d)
        orphans: list[str] = []
        for start in range(0, len(held), 500):
            batch = held[start : start + 500]
            referring = {
                doc.get("digest")
                for doc in self.backend.select({"digest": {"$in": batch}}, [BLOBS_KEY])
                if doc.get(BLOBS_KEY)
            }
            orphans.extend(d for d in batch if d not in referring)
        return orphans

    def remove_blobs(self, digests: list[str]) -> None:
        """Delete the blobs of ``digests`` (not their entries)."""
        if digests and self.blob_store is not None:
            self.blob_store.remove_docs({"digest": {"$in": list(digests)}})


def default_store(settings: CacheSettings | None = None) -> EntryBackend:
    """The embedded default backend: :class:`.SQLiteBackend` (WAL) at
    ``<JOBFLOW_CACHE_DIR>/cache.sqlite`` (a file written by an earlier release is migrated
    when first opened)."""
    settings = settings or get_settings()
    return SQLiteBackend(settings.store_path())


def default_blob_store(store: Store | EntryBackend) -> Store | None:
    """The blob store used with ``store`` when none is configured.

    A ``MongoStore`` (or ``MongoURIStore``) gets a ``GridFSStore`` in the same database and
    server, collection ``<collection_name>_blobs`` (MongoDB refuses documents over 16 MiB).
    Other stores get none: SQLite, PostgreSQL and in-memory stores have no such limit, so
    nothing is moved unless ``JOBFLOW_CACHE_BLOB_STORE`` names a blob store.

    Examples
    --------
    >>> from maggma.stores import MongoStore
    >>> blobs = default_blob_store(MongoStore("jobflow", "cache", host="db.example.org"))
    >>> type(blobs).__name__, blobs.database, blobs.collection_name, blobs.host
    ('GridFSStore', 'jobflow', 'cache_blobs', 'db.example.org')
    >>> from maggma.stores import MemoryStore
    >>> default_blob_store(MemoryStore()) is None
    True
    """
    if type(store) not in (MongoStore, MongoURIStore):
        return None
    mongo: Any = store
    uri = getattr(mongo, "uri", None)
    name = f"{mongo.collection_name}_blobs"
    if uri is not None:
        if "uri" in inspect.signature(GridFSStore.__init__).parameters:
            return GridFSStore(
                database=mongo.database,
                collection_name=name,
                uri=uri,
                mongoclient_kwargs=getattr(mongo, "mongoclient_kwargs", None),
            )
        return GridFSURIStore(uri, name, database=mongo.database)  # older maggma
    return GridFSStore(
        database=mongo.database,
        collection_name=name,
        host=mongo.host,
        port=mongo.port,
        username=mongo.username,
        password=mongo.password,
        auth_source=getattr(mongo, "auth_source", None),
        mongoclient_kwargs=getattr(mongo, "mongoclient_kwargs", None),
        ssh_tunnel=getattr(mongo, "ssh_tunnel", None),
    )


def _configured_blob_store(store: Store | EntryBackend, settings: CacheSettings) -> Store | None:
    """``JOBFLOW_CACHE_BLOB_STORE`` if set, else :func:`default_blob_store` of ``store``."""
    if settings.BLOB_STORE:
        return maggma_store_from_spec(settings.BLOB_STORE, "a blob store")
    return default_blob_store(store)


def _backend_of(store: Store | EntryBackend) -> EntryBackend:
    """The backend keeping entries in ``store`` (a maggma store: a :class:`.MaggmaBackend`)."""
    return MaggmaBackend(store) if isinstance(store, Store) else store


def _direction(way: Sort | int) -> int:
    """1 or -1 of a maggma ``Sort`` or an int."""
    value = way.value if isinstance(way, Sort) else way
    return -1 if int(value) < 0 else 1


def _blob_hash(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8"))


class WriteBehind:
    """New entries and hit counts of a :class:`CacheStore`, written in batches.

    A commit costs a few tenths of a millisecond, more than everything else the cache does
    for a trivial job. :meth:`put` and :meth:`hit` queue; the queue is written as one batch
    (all entries in one write, then the hit counts in another) by the caller's own thread
    once its oldest item is ``delay`` seconds old (``hit_delay`` while only hit counts
    wait) or ``max_batch`` items wait, or by a watchdog thread at twice that age (while a
    long job runs, say), or by :meth:`flush`. Entries waiting to be written are found by
    :meth:`pending`, so a process always sees its own entries.

    Safety: an entry is queued only once its files are stored, and each entry is written
    whole (one transaction per batch in a :class:`.SQLiteBackend`), so a crash or ``SIGKILL``
    loses at most the entries queued in the last ``3 * delay`` seconds (plus one write) and
    the hit counts of the last ``3 * hit_delay`` seconds, never
    leaves a partial entry and never an entry without its files. A batch that fails is
    retried entry by entry; what still fails is reported by :meth:`take_errors`. In a child
    made by ``fork()``, items are written at once (the watchdog does not exist there).

    Parameters
    ----------
    store
        The store to write to (connected, and safe to call from two threads).
    delay
        Age in seconds at which the queue is written by the caller (twice that by the
        watchdog).
    hit_delay
        The same while the queue holds hit counts only (at least ``delay``).
    max_batch
        Queued items that make the queue due at once.

    Examples
    --------
    >>> from maggma.stores import MemoryStore
    >>> store = CacheStore(MemoryStore(), objects_dir="/tmp/objs")
    >>> store.connect()
    >>> writer = WriteBehind(store)
    >>> writer.put(CacheEntry(digest="a" * 32, scheme=SCHEME, function="m:f", output="1"))
    >>> writer.hit("a" * 32)
    >>> writer.pending("a" * 32).hits, store.get("a" * 32)
    (1, MISS)
    >>> writer.close()
    >>> store.get("a" * 32).hits, writer.pending("a" * 32)
    (1, None)
    """

    def __init__(
        self,
        store: CacheStore,
        delay: float = WRITE_DELAY,
        max_batch: int = 500,
        hit_delay: float = HIT_DELAY,
    ) -> None:
        self.store = store
        self.delay = delay
        self.hit_delay = max(hit_delay, delay)
        self.max_batch = max_batch
        self._pid = os.getpid()
        self._cond = threading.Condition()  # guards the queue
        self._write_lock = threading.Lock()  # one batch at a time, in queue order
        self._entries: dict[str, CacheEntry] = {}  # queued
        self._hits: dict[str, tuple[int, datetime]] = {}
        self._writing: dict[str, CacheEntry] = {}  # taken from the queue, not yet written
        self._count = 0  # items queued
        self._oldest = 0.0  # time.monotonic() when the oldest queued item arrived
        self._stopping = False
        self._errors: list[tuple[list[str], BaseException]] = []
        self._watchdog: threading.Thread | None = None
        self._sleeping_long = False  # the watchdog waits hit_delay (only hit counts queued)

    @staticmethod
    def supports(store: CacheStore) -> bool:
        """Whether ``store`` (and its blob store) may be written from a thread while the job
        thread reads it."""
        blobs = store.blob_store
        return store.backend.thread_safe and (blobs is None or is_thread_safe(blobs))

    # -- queueing ---------------------------------------------------------------------------
    def put(self, entry: CacheEntry) -> None:
        """Queue ``entry`` (its files must already be stored); it is sealed when written."""
        if os.getpid() != self._pid:  # a forked child: no watchdog here
            self.store.put(entry)
            return
        with self._cond:
            if self._sleeping_long:  # the watchdog waits for hit counts: not for an entry
                self._sleeping_long = False
                self._cond.notify_all()
            self._entries[entry.digest] = entry
            self._hits.pop(entry.digest, None)  # counted on the entry it replaces: start over
            due = self._queue_one()
        if due:
            self._write_queue()

    def hit(self, digest: str) -> None:
        """Queue one hit of ``digest``."""
        now = utcnow()
        if os.getpid() != self._pid:
            self.store.record_hit(digest, 1, now)
            return
        with self._cond:
            queued = self._entries.get(digest)
            if queued is not None:  # not written yet: count it on the entry itself
                queued.hits += 1
                queued.last_hit = now
                return
            count = self._hits.get(digest, (0, now))[0]
            self._hits[digest] = (count + 1, now)
            due = self._queue_one()
        if due:
            self._write_queue()

    def pending(self, digest: str) -> CacheEntry | None:
        """The entry of ``digest`` if it is queued or being written by this process."""
        if os.getpid() != self._pid:
            return None
        with self._cond:
            return self._entries.get(digest) or self._writing.get(digest)

    def _queue_one(self) -> bool:
        """Count one queued item (lock held); True when the queue is due."""
        self._count += 1
        now = time.monotonic()
        if self._count == 1:
            self._oldest = now
            if self._watchdog is None:
                self._stopping = False
                self._watchdog = threading.Thread(
                    target=self._watch, name="jobflow-cache-writer", daemon=True
                )
                self._watchdog.start()
        return self._count >= self.max_batch or now - self._oldest >= self._due_age()

    def _due_age(self) -> float:
        """Age of the oldest item at which the queue is due (lock held): ``delay`` when an
        entry waits, ``hit_delay`` when only hit counts do."""
        return self.delay if self._entries else self.hit_delay

    # -- writing ----------------------------------------------------------------------------
    def flush(self) -> None:
        """Write everything queued so far, in the calling thread."""
        if os.getpid() == self._pid:
            self._write_queue()

    def close(self) -> None:
        """Flush, then stop the watchdog (it starts again if more is queued)."""
        if os.getpid() != self._pid:
            return
        self.flush()
        with self._cond:
            watchdog, self._watchdog = self._watchdog, None
            self._stopping = True
            self._cond.notify_all()
        if watchdog is not None:
            watchdog.join()

    def take_errors(self) -> list[tuple[list[str], BaseException]]:
        """The writes that failed since the last call: (digests, error) pairs."""
        if not self._errors:
            return []
        with self._cond:
            errors, self._errors = self._errors, []
        return errors

    def _watch(self) -> None:
        """Every ``delay`` seconds (``hit_delay`` while only hit counts wait), write the queue
        if its oldest item is twice its due age old (polling: waking it on every new batch
        would cost the job thread a switch each; only the first entry queued behind hit
        counts wakes it, see :meth:`put`)."""
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._sleeping_long = bool(self._hits) and not self._entries
                self._cond.wait(self.hit_delay if self._sleeping_long else self.delay)
                self._sleeping_long = False
                if self._stopping:
                    return
                due = self._count and time.monotonic() - self._oldest >= 2 * self._due_age()
            if due:
                self._write_queue()

    def _write_queue(self) -> None:
        with self._write_lock:
            with self._cond:
                if not self._count:
                    return
                entries, hits = self._entries, self._hits
                self._entries, self._hits, self._writing = {}, {}, entries
                self._count = 0
            try:
                errors = self._write(entries, hits)
            finally:
                with self._cond:
                    self._writing = {}
            if errors:
                with self._cond:
                    self._errors.extend(errors)

    def _write(
        self, entries: dict[str, CacheEntry], hits: dict[str, tuple[int, datetime]]
    ) -> list[tuple[list[str], BaseException]]:
        errors: list[tuple[list[str], BaseException]] = []
        if entries:
            try:
                self.store.put_many(list(entries.values()))
            except Exception:  # one bad entry must not lose the others: one at a time
                for digest, entry in entries.items():
                    try:
                        self.store.put(entry)
                    except Exception as err:
                        errors.append(([digest], err))
        if hits:
            try:
                self.store.record_hits(hits)
            except Exception:
                for digest, (count, when) in hits.items():
                    try:
                        self.store.record_hit(digest, count, when)
                    except Exception as err:  # book-keeping only: logged, never raised
                        logger.warning("could not record hits of %s: %s", digest[:12], err)
        return errors
