"""What workers sharing one cache tell each other besides entries: claims and folder aliases.

* A **claim** says "I am computing digest D until time T" (in-flight deduplication,
  ``JOBFLOW_CACHE_DEDUP``). It is taken by one atomic insert-if-absent, renewed by its owner
  while the job runs, and expires when the owner stops renewing it (a crashed worker never
  blocks the others for longer than one lease).
* An **alias** says "run folder F holds the files of the job of digest D"
  (``JOBFLOW_CACHE_EXCLUSIVE_DIRS``), so a worker in a fresh process can recognise an upstream
  job's folder among a job's inputs (atomate2's ``prev_dir``) without having seen it run.

Both live beside the entries, in the same database, kept by the backend
(:meth:`.EntryBackend.coordinator`): tables of the SQLite file or the PostgreSQL database;
for MongoDB (and maggma's ``MemoryStore``, which is mongomock) collections
``<collection>__claims`` and ``<collection>__aliases`` in the same database. Other stores
support neither: the cache then runs without them (with a warning when they were asked for).
"""

from __future__ import annotations

import logging
import threading

from jobflow_cache.backends.base import Coordinator
from jobflow_cache.store import CacheStore

__all__ = ["Coordinator", "Heartbeat", "coordinator_of"]

logger = logging.getLogger(__name__)


def coordinator_of(cache_store: CacheStore) -> Coordinator | None:
    """The claims and aliases of ``cache_store`` (connected), or None if its backend cannot
    hold them.

    Examples
    --------
    >>> from maggma.stores import MemoryStore
    >>> with CacheStore(MemoryStore(), objects_dir="/tmp/objs") as cache:
    ...     claims = coordinator_of(cache)
    ...     claims.claim("d1", "worker-1", 60), claims.claim("d1", "worker-2", 60)
    ('worker-1', 'worker-1')
    """
    return cache_store.backend.coordinator()


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
