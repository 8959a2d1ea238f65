"""Where cache entries live: one protocol (:class:`EntryBackend`) and its implementations.

* :class:`SQLiteBackend`: the embedded default, a fixed-schema SQLite file (stdlib
  ``sqlite3``, WAL); the large fields of an entry sit in a table of their own, so a hit
  updates a small row.
* :class:`PostgresBackend`: the same fixed schema on a PostgreSQL server, for a cache shared
  by many machines (psycopg, imported on first use).
* :class:`MaggmaBackend`: any maggma ``Store`` (MongoDB, GridFS blobs beside it, a
  ``MemoryStore``), Mongo criteria kept native.
"""

from jobflow_cache.backends.base import (
    EXPLAIN_FIELDS,
    SELECTABLE,
    UNREADABLE,
    Coordinator,
    Criteria,
    EntryBackend,
    Totals,
    unreadable_reason,
)
from jobflow_cache.backends.maggma import MaggmaBackend
from jobflow_cache.backends.postgres import PostgresBackend
from jobflow_cache.backends.sqlite import SQLiteBackend

__all__ = [
    "EXPLAIN_FIELDS",
    "SELECTABLE",
    "UNREADABLE",
    "Coordinator",
    "Criteria",
    "EntryBackend",
    "MaggmaBackend",
    "PostgresBackend",
    "SQLiteBackend",
    "Totals",
    "unreadable_reason",
]
