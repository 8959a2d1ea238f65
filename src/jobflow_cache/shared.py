"""What workers sharing one cache tell each other besides entries: claims and folder aliases.

* A **claim** says "I am computing digest D until time T" (in-flight deduplication,
  ``JOBFLOW_CACHE_DEDUP``). It is taken by one atomic insert-if-absent, renewed by its owner
  while the job runs, and expires when the owner stops renewing it (a crashed worker never
  blocks the others for longer than one lease).
* An **alias** says "run folder F holds the files of the job of digest D"
  (``JOBFLOW_CACHE_EXCLUSIVE_DIRS``), so a worker in a fresh process can recognise an upstream
  job's folder among a job's inputs (atomate2's ``prev_dir``) without having seen it run.

Both live beside the entries, in the same database: SQL stores (:obj:`.SQLiteStore`,
:obj:`.PostgresStore`) implement ``claim``/``release``/``set_aliases``/``get_aliases``
themselves; for MongoDB (and maggma's ``MemoryStore``, which is mongomock) they are
collections ``<collection>__claims`` and ``<collection>__aliases`` in the same database. Other
stores support neither: the cache then runs without them (with a warning when they were asked
for).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from maggma.core import Store
from maggma.stores import MemoryStore, MongoStore, MongoURIStore
from pymongo import ReturnDocument
from pymongo.errors import DuplicateKeyError

from jobflow_cache.store import CacheStore

__all__ = ["Coordinator", "Heartbeat", "coordinator_of"]

logger = logging.getLogger(__name__)


class Coordinator(Protocol):
    """Claims and aliases kept in a cache store (see the module docstring)."""

    def claim(self, name: str, owner: str, lease: float) -> str:
        """Take or renew claim ``name`` for ``lease`` seconds; return its holder after the
        call (``owner`` when the claim is ours)."""

    def release(self, name: str, owner: str) -> None:
        """Drop claim ``name`` if ``owner`` holds it."""

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        """Record ``alias -> digest`` pairs (last writer wins)."""

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        """The recorded ones among ``names``."""


class _MongoCoordinator:
    """Claims and aliases in two collections beside a MongoDB (or mongomock) collection.

    Leases use the clock of the machine that takes the claim: workers sharing a MongoDB
    cache need synchronised clocks (NTP), within a small part of the lease.
    """

    def __init__(self, store: Store) -> None:
        database = store._collection.database  # maggma exposes no other handle
        name = getattr(store, "collection_name", "cache")
        self.claims = database[f"{name}__claims"]
        self.aliases = database[f"{name}__aliases"]

    def claim(self, name: str, owner: str, lease: float) -> str:
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
        self.claims.delete_one({"_id": name, "owner": owner})

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        for alias, target in pairs.items():
            self.aliases.update_one(
                {"_id": alias}, {"$set": {"target": target, "created": time.time()}}, upsert=True
            )

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        if not names:
            return {}
        found = self.aliases.find({"_id": {"$in": list(names)}}, {"target": 1})
        return {str(doc["_id"]): str(doc["target"]) for doc in found}


def coordinator_of(cache_store: CacheStore) -> Coordinator | None:
    """The claims and aliases of ``cache_store`` (connected), or None if its kind of store
    cannot hold them.

    Examples
    --------
    >>> from maggma.stores import MemoryStore
    >>> with CacheStore(MemoryStore(), objects_dir="/tmp/objs") as cache:
    ...     claims = coordinator_of(cache)
    ...     claims.claim("d1", "worker-1", 60), claims.claim("d1", "worker-2", 60)
    ('worker-1', 'worker-1')
    """
    store = cache_store.store
    if all(callable(getattr(store, m, None)) for m in ("claim", "release", "get_aliases")):
        return store  # type: ignore[return-value]  # SQLiteStore, PostgresStore
    # only where the entries themselves live in that database: a JSONStore is a MemoryStore
    # whose documents go to a file, but other collections would stay in this process's memory
    if type(store) in (MongoStore, MongoURIStore, MemoryStore):
        return _MongoCoordinator(store)
    return None


class Heartbeat:
    """Renews a claim every ``lease / 4`` seconds from a thread, until :meth:`stop`.

    A worker that dies stops renewing: its claim expires one lease later at the latest. A
    renewal that finds the claim held by another worker (this one stalled for longer than a
    lease) is logged: both then compute the job, and one whole entry survives.
    """

    def __init__(self, claims: Coordinator, name: str, owner: str, lease: float) -> None:
        self.claims, self.name, self.owner, self.lease = claims, name, owner, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"jobflow-cache-lease-{name[:8]}", daemon=True
        )

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop renewing (the claim itself is released by the caller)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                holder = self.claims.claim(self.name, self.owner, self.lease)
            except Exception as err:  # the store is down: the lease runs out, others may run
                logger.warning("could not renew the claim on %s: %s", self.name[:12], err)
                continue
            if holder != self.owner:
                logger.warning(
                    "the claim on %s was taken over by %s (this worker stalled for longer "
                    "than its lease); both compute the job",
                    self.name[:12],
                    holder,
                )
                return
