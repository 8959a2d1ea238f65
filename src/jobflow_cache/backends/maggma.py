"""Cache entries in any maggma Store: :class:`MaggmaBackend`, the adapter the jobflow ecosystem
expects (``MongoStore``, ``MongoURIStore``, ``MemoryStore``, ``JSONStore``, ...).

Criteria stay native Mongo criteria: the store answers them (MongoDB with its indexes). What
a store can do beyond maggma's ``Store`` interface is known from its type, in one place here:

* MongoDB (and maggma's ``MemoryStore``, which is mongomock) updates hit counts with ``$inc``
  and keeps claims and aliases in two collections beside the entries;
* any other store is read, modified and written back (last writer wins), without claims.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from maggma.core import Sort, Store, StoreError
from maggma.stores import GridFSStore, MemoryStore, MongoStore, MongoURIStore
from maggma.stores.gridfs import GridFSURIStore
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from jobflow_cache.backends.base import EXPLAIN_FIELDS, Coordinator, Criteria, Totals

__all__ = ["INDEXED_FIELDS", "MaggmaBackend", "is_thread_safe", "store_name"]

logger = logging.getLogger(__name__)

#: Fields indexed in the underlying store (the digest index is unique).
INDEXED_FIELDS = ("function", "name", "created", "last_hit", "valid", "source_uuid")

#: Stores whose methods may be called from a writer thread while the job thread reads.
_THREAD_SAFE = (MongoStore, MemoryStore, MongoURIStore, GridFSStore, GridFSURIStore)

#: Stores whose database can hold the claims and aliases collections beside the entries (a
#: JSONStore is a MemoryStore whose documents go to a file: other collections would not).
_MONGO = (MongoStore, MongoURIStore, MemoryStore)


def store_name(store: Store) -> str:
    """The name of a maggma store for messages (its type when ``name`` fails)."""
    try:
        return str(store.name)
    except Exception:
        return type(store).__name__


def is_thread_safe(store: Store) -> bool:
    """Whether a writer thread may call ``store`` while another thread reads it."""
    return type(store) in _THREAD_SAFE or bool(getattr(store, "thread_safe", False))


class MaggmaBackend:
    """An :class:`.EntryBackend` on a maggma ``Store`` (its key is set to ``digest``).

    Examples
    --------
    >>> backend = MaggmaBackend(MemoryStore())
    >>> backend.connect()
    >>> backend.write([{"digest": "a" * 32, "name": "relax", "hits": 0}])
    >>> backend.add_hits({"a" * 32: (2, datetime(2026, 1, 1))})
    >>> [doc["hits"] for doc in backend.select({"name": "relax"}, ["hits"])]
    [2]
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.store.key = "digest"
        self._mongo = type(store) in _MONGO
        self.thread_safe = is_thread_safe(store)
        self._coordinator: Coordinator | None = None

    @property
    def name(self) -> str:
        """The store's name (``mongodb://...``, ``sqlite://...``, ``mem://...``)."""
        return store_name(self.store)

    def __repr__(self) -> str:
        return f"MaggmaBackend({self.store!r})"

    # -- connection -------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect the store and create its indexes."""
        self.store.connect()
        self.store.ensure_index("digest", unique=True)
        for field in INDEXED_FIELDS:
            self.store.ensure_index(field)

    def close(self) -> None:
        """Close the store; calling it twice (or before connecting) is harmless."""
        try:
            self.store.close()
        except StoreError as err:  # maggma's Mongo-like stores refuse to close unconnected
            logger.debug("closing %s: %s", self.name, err)

    def owned_paths(self) -> list[str]:
        """Nothing: no maggma store keeps its documents in a file of the cache's."""
        return []

    # -- reading ----------------------------------------------------------------------------
    def read(self, digest: str, *, explain: bool = True) -> dict[str, Any] | None:
        """The document of ``digest`` (the store leaves the explain fields out when it can)."""
        leave_out = () if explain else EXPLAIN_FIELDS
        store: Any = self.store
        if leave_out and isinstance(store, MongoStore):  # MemoryStore too: mongomock
            doc = store.query_one({"digest": digest}, properties=dict.fromkeys(leave_out, 0))
        else:
            doc = store.query_one({"digest": digest})
        if isinstance(doc, dict):
            doc.pop("_id", None)
            if not explain:
                for name in leave_out:
                    doc.pop(name, None)
        return doc

    def select(
        self,
        criteria: Criteria | None = None,
        fields: Sequence[str] | None = None,
        order: Mapping[str, int] | None = None,
        limit: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Stream the matching documents (the store's own query)."""
        properties = None if fields is None else list(dict.fromkeys(["digest", *fields]))
        sort: dict[str, Sort | int] | None = dict(order) if order else None
        for doc in self.store.query(
            dict(criteria or {}), properties=properties, sort=sort, limit=limit
        ):
            if isinstance(doc, dict):
                doc.pop("_id", None)
            yield doc

    def count(self, criteria: Criteria | None = None) -> int:
        """How many entries match."""
        return int(self.store.count(dict(criteria or {})))

    def totals(self, criteria: Criteria | None = None) -> Totals:
        """Sums of one streamed pass over the matching entries."""
        result = Totals()
        functions: Counter[str] = Counter()
        fields = ["function", "hits", "duration", "files_size", "valid", "created"]
        for doc in self.select(criteria, fields):
            result.entries += 1
            hits = doc.get("hits")
            hits = hits if isinstance(hits, int) and not isinstance(hits, bool) else 0
            result.hits += hits
            duration = doc.get("duration")
            if isinstance(duration, int | float) and not isinstance(duration, bool):
                result.time_saved += hits * duration
            size = doc.get("files_size")
            result.files_bytes += size if isinstance(size, int) else 0
            if doc.get("valid") is False:
                result.invalid += 1
            functions[str(doc.get("function", "?"))] += 1
            _widen(result, doc.get("created"))
        result.functions = dict(functions.most_common())
        return result

    def consumers(self) -> Iterator[tuple[str, list[str]]]:
        """``(digest, consumed)`` of the entries holding a consumed list."""
        for doc in self.store.query({}, properties=["digest", "consumed"]):
            digest, consumed = doc.get("digest"), doc.get("consumed")
            if isinstance(digest, str) and isinstance(consumed, list) and consumed:
                yield digest, [d for d in consumed if isinstance(d, str)]

    # -- writing ----------------------------------------------------------------------------
    def write(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Upsert whole documents."""
        if docs:
            self.store.update([dict(doc) for doc in docs], key="digest")

    def add_hits(self, hits: Mapping[str, tuple[int, datetime]]) -> None:
        """Add hit counts: ``$inc`` in MongoDB, read, modified and written back elsewhere."""
        if not hits:
            return
        store: Any = self.store
        for digest, (n, when) in hits.items():
            if self._mongo:
                store._collection.update_one(
                    {"digest": digest}, {"$inc": {"hits": n}, "$set": {"last_hit": when}}
                )
                continue
            doc = store.query_one({"digest": digest})
            if doc is not None:
                doc.pop("_id", None)
                doc["hits"] = int(doc.get("hits", 0)) + n
                doc["last_hit"] = when
                store.update(doc, key="digest")

    def set_invalid(self, reasons: Sequence[tuple[str, str]]) -> list[str]:
        """Set ``valid``/``invalid_reason`` only; the digests found, in order."""
        store: Any = self.store
        found: list[str] = []
        for digest, why in reasons:
            if self._mongo:
                result = store._collection.update_one(
                    {"digest": digest}, {"$set": {"valid": False, "invalid_reason": why}}
                )
                if result.matched_count:
                    found.append(digest)
                continue
            doc = store.query_one({"digest": digest})
            if doc is None:
                continue
            doc.pop("_id", None)
            doc["valid"] = False
            doc["invalid_reason"] = why
            store.update(doc, key="digest")
            found.append(digest)
        return found

    def remove(self, digests: Sequence[str]) -> None:
        """Delete the entries of ``digests``."""
        if digests:
            self.store.remove_docs({"digest": {"$in": list(digests)}})

    # -- coordination -----------------------------------------------------------------------
    def coordinator(self) -> Coordinator | None:
        """Claims and aliases in two collections beside a MongoDB (or mongomock) collection,
        or None for other stores."""
        if self._mongo:
            if self._coordinator is None:
                self._coordinator = MongoCoordinator(self.store)
            return self._coordinator
        return None


def _widen(totals: Totals, value: Any) -> None:
    """Widen ``oldest``/``newest`` of ``totals`` to the datetime ``value``."""
    if not isinstance(value, datetime):
        return
    when = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if totals.oldest is None or when < totals.oldest:
        totals.oldest = when
    if totals.newest is None or when > totals.newest:
        totals.newest = when


class MongoCoordinator:
    """Claims and aliases in two collections beside a MongoDB (or mongomock) collection:
    ``<collection>__claims`` and ``<collection>__aliases``.

    Leases use the clock of the machine that takes the claim: workers sharing a MongoDB
    cache need synchronised clocks (NTP), within a small part of the lease.
    """

    def __init__(self, store: Store) -> None:
        database = store._collection.database  # maggma has no other handle
        name = getattr(store, "collection_name", "cache")
        self.claims = database[f"{name}__claims"]
        self.aliases = database[f"{name}__aliases"]

    def claim(self, name: str, owner: str, lease: float) -> str:
        """Take or renew claim ``name``; its holder after the call."""
        now = time.time()
        for _ in range(3):
            try:
                self.claims.find_one_and_update(
                    {"_id": name, "$or": [{"owner": owner}, {"expires": {"$lt": now}}]},
                    {"$set": {"owner": owner, "expires": now + lease}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
                return owner
            except DuplicateKeyError:  # held by somebody else, and not expired
                held = self.claims.find_one({"_id": name}, {"owner": 1})
                if held is not None:
                    return str(held["owner"])
                # released between the two calls: try again
        return "unknown"  # the caller waits and asks again

    def release(self, name: str, owner: str) -> None:
        """Drop claim ``name`` if ``owner`` holds it."""
        self.claims.delete_one({"_id": name, "owner": owner})

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        """Record ``alias -> digest`` pairs (last writer wins)."""
        for alias, target in pairs.items():
            self.aliases.update_one(
                {"_id": alias}, {"$set": {"target": target, "created": time.time()}}, upsert=True
            )

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        """The recorded ones among ``names``."""
        if not names:
            return {}
        found = self.aliases.find({"_id": {"$in": list(names)}}, {"target": 1})
        return {str(doc["_id"]): str(doc["target"]) for doc in found}
