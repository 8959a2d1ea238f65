"""CacheStore: a digest -> CacheEntry map on top of any maggma Store."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maggma.core import Sort, Store
from monty.json import MontyDecoder, MSONable
from pydantic import ValidationError

from jobflow_cache.entry import CacheEntry, utcnow
from jobflow_cache.errors import CacheError, StoreUnavailableError
from jobflow_cache.hashing import SCHEME
from jobflow_cache.settings import CacheSettings, get_settings

if TYPE_CHECKING:
    from types import TracebackType

__all__ = ["MISS", "CacheStore", "Lookup", "Outcome", "store_from_spec"]

logger = logging.getLogger(__name__)

#: Fields indexed in the underlying store (the digest index is unique).
INDEXED_FIELDS = ("function", "name", "created", "last_hit", "valid", "source_uuid")


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


def _store_class(name: str) -> type[Store]:
    from maggma import stores

    from jobflow_cache import sqlite_store

    for module in (sqlite_store, stores):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, Store):
            return cls
    raise StoreUnavailableError(f"unknown store type {name!r} in store spec")


def _load_spec_file(path: Path) -> Any:
    from monty.serialization import loadfn

    try:
        return loadfn(path)
    except FileNotFoundError as err:
        raise StoreUnavailableError(f"store spec file {path} does not exist") from err
    except Exception as err:
        raise StoreUnavailableError(f"cannot read store spec file {path}: {err}") from err


def store_from_spec(spec: dict[str, Any] | str | Path | Store) -> Store:
    """Build a maggma Store from a spec, in the same forms jobflow accepts for ``JOB_STORE``.

    A serialized store (``{"@module": ..., "@class": ..., ...}``),
    ``{"type": "MongoStore", "database": ..., "collection_name": ...}``, or the path of a YAML or
    JSON file holding either.

    Examples
    --------
    >>> store_from_spec({"type": "MemoryStore", "collection_name": "c"}).collection_name
    'c'
    """
    if isinstance(spec, Store):
        return spec
    if isinstance(spec, (str, Path)):
        spec = _load_spec_file(Path(spec).expanduser())
    if not isinstance(spec, dict):
        raise StoreUnavailableError(f"a store spec must be a mapping, not {type(spec).__name__}")
    try:
        if "@class" in spec:
            store = MontyDecoder().process_decoded(dict(spec))
        elif "type" in spec:
            kwargs = {k: v for k, v in spec.items() if k != "type"}
            store = _store_class(str(spec["type"]))(**kwargs)
        else:
            raise StoreUnavailableError("a store spec needs '@class' or 'type'")
    except CacheError:
        raise
    except Exception as err:
        raise StoreUnavailableError(f"malformed store spec: {err}") from err
    if not isinstance(store, Store):
        raise StoreUnavailableError(f"store spec built a {type(store).__name__}, not a Store")
    return store


class CacheStore(MSONable):
    """Cache entries keyed by digest, kept in any maggma :obj:`~maggma.core.Store`.

    The wrapped store's key is set to ``"digest"``; a unique index on it (and plain indexes on the
    query fields) is created on :meth:`connect`. Without arguments the embedded default is used:
    a SQLite file under ``JOBFLOW_CACHE_DIR`` that needs no server.

    Parameters
    ----------
    store
        Any maggma store (``MongoStore``, ``MemoryStore``, :obj:`.SQLiteStore`, ...).
    objects_dir
        Folder of the content-addressed run-folder file objects.

    Examples
    --------
    >>> from maggma.stores import MemoryStore
    >>> with CacheStore(MemoryStore(), objects_dir="/tmp/objs") as cache:
    ...     cache.get("0" * 32)
    MISS
    """

    def __init__(self, store: Store | None = None, objects_dir: str | Path | None = None) -> None:
        settings = get_settings()
        if store is None:
            store = default_store(settings)
        self.store = store
        self.store.key = "digest"
        self.objects_dir = str(objects_dir or settings.objects_dir())

    @classmethod
    def from_settings(cls, settings: CacheSettings | None = None) -> CacheStore:
        """The store configured by ``JOBFLOW_CACHE_*`` settings (embedded default if none)."""
        settings = settings or get_settings()
        store = store_from_spec(settings.STORE) if settings.STORE else default_store(settings)
        return cls(store, objects_dir=settings.objects_dir())

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect the underlying store and create its indexes."""
        try:
            self.store.connect()
            self.store.ensure_index("digest", unique=True)
            for field in INDEXED_FIELDS:
                self.store.ensure_index(field)
        except CacheError:
            raise
        except Exception as err:
            raise StoreUnavailableError(
                f"cannot connect to cache store {self.name}: {err}"
            ) from err

    def close(self) -> None:
        """Close the underlying store."""
        self.store.close()

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
            return str(self.store.name)
        except Exception:
            return type(self.store).__name__

    # -- reading ----------------------------------------------------------------------------
    def lookup(self, digest: str) -> Lookup:
        """Find the entry of ``digest`` and say whether it may be served.

        An entry is served only when it decodes, its checksum matches, its scheme is current
        and it is marked valid; otherwise the outcome is ``INVALID`` with the reason.
        Store failures raise :class:`.StoreUnavailableError`.
        """
        try:
            doc = self.store.query_one({"digest": digest})
        except Exception as err:
            raise StoreUnavailableError(f"cache store {self.name} failed: {err}") from err
        if doc is None:
            return Lookup(Outcome.MISS)
        try:
            entry = CacheEntry.from_document(doc)
        except (ValidationError, TypeError, ValueError) as err:
            return Lookup(Outcome.INVALID, None, f"entry does not decode: {err}")
        return self.check_entry(entry)

    @staticmethod
    def check_entry(entry: CacheEntry) -> Lookup:
        """Lookup outcome of a decoded entry (checksum, scheme and valid flag)."""
        if entry.scheme != SCHEME:
            return Lookup(Outcome.INVALID, entry, f"scheme {entry.scheme!r} is not {SCHEME!r}")
        if not entry.valid:
            return Lookup(Outcome.INVALID, entry, f"marked invalid: {entry.invalid_reason}")
        if entry.checksum != entry.compute_checksum():
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
        return int(self.store.count(criteria or {}))

    def find(
        self,
        criteria: dict[str, Any] | None = None,
        properties: list[str] | None = None,
        sort: dict[str, Sort | int] | None = None,
        limit: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Stream raw entry documents (never loads the whole cache)."""
        yield from self.store.query(criteria or {}, properties=properties, sort=sort, limit=limit)

    def entries(self, criteria: dict[str, Any] | None = None) -> Iterator[CacheEntry]:
        """Stream decoded entries; documents that do not decode are skipped with a log line."""
        for doc in self.find(criteria):
            try:
                yield CacheEntry.from_document(doc)
            except (ValidationError, TypeError, ValueError) as err:
                logger.warning("cache entry %s does not decode: %s", doc.get("digest"), err)

    # -- writing ----------------------------------------------------------------------------
    def put(self, entry: CacheEntry) -> None:
        """Seal and write ``entry`` (call only after its files are safely stored)."""
        entry.seal()
        self.store.update(entry.to_document(), key="digest")

    def record_hit(self, digest: str) -> None:
        """Bump the hit counter and last-hit time of an entry, atomically where possible."""
        now = utcnow()
        increment = getattr(self.store, "increment", None)
        if callable(increment):
            increment(digest, {"hits": 1}, {"last_hit": now})
            return
        collection = getattr(self.store, "_coll", None)
        if collection is not None and hasattr(collection, "update_one"):
            collection.update_one(
                {"digest": digest}, {"$inc": {"hits": 1}, "$set": {"last_hit": now}}
            )
            return
        doc = self.store.query_one({"digest": digest})
        if doc is not None:
            doc["hits"] = int(doc.get("hits", 0)) + 1
            doc["last_hit"] = now
            self.store.update(doc, key="digest")

    def invalidate(self, digest: str, reason: str) -> bool:
        """Mark an entry invalid (kept for inspection, never served). True if it existed."""
        doc = self.store.query_one({"digest": digest})
        if doc is None:
            return False
        doc.pop("_id", None)
        doc["valid"] = False
        doc["invalid_reason"] = reason
        self.store.update(doc, key="digest")
        return True

    def remove(self, digests: list[str]) -> None:
        """Delete the entries of ``digests`` (their file objects are left to garbage collection)."""
        if digests:
            self.store.remove_docs({"digest": {"$in": list(digests)}})


def default_store(settings: CacheSettings | None = None) -> Store:
    """The embedded default store: SQLite (WAL) at ``<JOBFLOW_CACHE_DIR>/cache.sqlite``."""
    from jobflow_cache.sqlite_store import SQLiteStore

    settings = settings or get_settings()
    return SQLiteStore(settings.store_path(), collection_name="entries", key="digest")
