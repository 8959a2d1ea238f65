"""SQLiteBackend: the embedded default :class:`~.base.EntryBackend`, a fixed-schema SQLite file.

Schema (version :data:`SCHEMA_VERSION`, in table ``jfc_schema``):

* ``jfc_entries``: one row per entry, one column per :data:`~.base.SELECTABLE` field (kinds
  as in :mod:`jobflow_cache.backends.criteria`: ``created``/``last_hit`` as fixed-width UTC
  text, ``valid`` as 0/1) and ``doc``, a JSON object of the entry's other *small* fields. A
  field whose value does not fit its column (``None``, or ``hits: "5"`` in a tampered
  document) is kept in ``doc`` and its column is NULL, so a read gives back exactly what was
  written; criteria see such a value as missing.
* ``jfc_payloads``: ``served``, a JSON object of the large fields (:data:`PAYLOAD_FIELDS`),
  and ``explain``, one of the :data:`~.base.EXPLAIN_FIELDS`. A hit updates the small entries
  row only: its cost does not depend on the output's size.
* ``jfc_consumed``: ``(upstream, digest)`` for each str in an entry's ``consumed`` list (the
  list itself stays in ``doc``), answering :meth:`SQLiteBackend.consumers`.
* ``entries__claims`` and ``entries__aliases``: the claims and aliases, exactly as
  0.1.0's ``SQLiteStore`` keeps them (a file it wrote keeps its claims and aliases).

Documents are JSON (``TypeError`` otherwise) except ``created`` and ``last_hit``, which are
``datetime`` (aware ones are converted to UTC; they read back as naive UTC, like pymongo's).
A row whose JSON does not decode reads as the stand-in ``{"digest": d, UNREADABLE: why}``.

A file written by 0.1.0's ``SQLiteStore`` (collection ``entries``, the embedded default, or
``cache``, SQLiteStore's own default; key ``digest``) is migrated on
:meth:`~SQLiteBackend.connect`, in one transaction: every row is copied (one that does not
decode as an unreadable row), then the old table is dropped.

The file runs in WAL mode; every write is one ``BEGIN IMMEDIATE`` transaction. Each process
keeps one writer connection (shared by its threads under a lock) and one reader per thread,
and reconnects by itself after ``fork()``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from monty.json import MSONable

from jobflow_cache.backends.base import (
    SELECTABLE,
    UNREADABLE,
    Criteria,
    Totals,
    format_datetime,
    parse_datetime,
)
from jobflow_cache.backends.criteria import Column, Compiler, regexp
from jobflow_cache.backends.layout import (
    FIELD_KINDS,
    PAYLOAD_FIELDS,
    UNMIGRATED,
    UnreadableError,
    old_document,
    parse_object,
    select_statement,
    selected,
    split,
)
from jobflow_cache.backends.sqlite_file import (
    NETWORK_FILE_SYSTEMS,
    decode_text,
    file_system_type,
    identity,
    sidecars_in_use,
)
from jobflow_cache.errors import StoreUnavailableError, warn

__all__ = ["FIELD_KINDS", "PAYLOAD_FIELDS", "SCHEMA_VERSION", "SQLiteBackend", "keeps_old_entries"]

logger = logging.getLogger(__name__)

#: Version of the schema this module writes (in table ``jfc_schema``).
SCHEMA_VERSION = 1

_FIELDS = SELECTABLE[1:]  # the columns after digest, in table order
_DOC = len(SELECTABLE)  # index of doc in a row (served and explain follow)
_SQL_TYPES = {"text": "TEXT", "int": "INTEGER", "real": "REAL", "bool": "INTEGER", "date": "TEXT"}
_INDEXED = ("function", "name", "created", "last_hit", "valid", "source_uuid", "scheme")
_CLAIMS, _ALIASES = '"entries__claims"', '"entries__aliases"'
# SQLiteStore's collection, its side tables and the prefix of an old row this schema cannot hold
#: 0.1.0's SQLiteStore tables the cache could be kept in: ``entries`` (the embedded default),
#: ``cache`` (SQLiteStore's own default collection, for a spec that named none)
_OLD_TABLES = ("entries", "cache")
_OLD_META, _OLD_ARRAYS = "jobflow_cache_collections", "jobflow_cache_array_paths"
_BATCH = 500  # digests per statement
# SQLite primary result codes of a file that cannot be written now (PERM, BUSY, LOCKED,
# READONLY, IOERR, CORRUPT, FULL, CANTOPEN, PROTOCOL, NOTADB), as SQLiteStore had them
_UNAVAILABLE_CODES = frozenset({3, 5, 6, 8, 10, 11, 13, 14, 15, 26})
_FETCH = 256  # rows per fetch while streaming

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS jfc_schema (version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS jfc_entries (digest TEXT PRIMARY KEY, "
    + "".join(f"{f} {_SQL_TYPES[FIELD_KINDS[f]]}, " for f in _FIELDS)
    + "doc TEXT NOT NULL)",
    *(f"CREATE INDEX IF NOT EXISTS jfc_entries_{f} ON jfc_entries ({f})" for f in _INDEXED),
    "CREATE TABLE IF NOT EXISTS jfc_payloads (digest TEXT PRIMARY KEY, served TEXT, explain TEXT)",
    "CREATE TABLE IF NOT EXISTS jfc_consumed (upstream TEXT NOT NULL, digest TEXT NOT NULL, "
    "PRIMARY KEY (upstream, digest)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS jfc_consumed_digest ON jfc_consumed (digest)",
    f"CREATE TABLE IF NOT EXISTS {_CLAIMS} "
    "(name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {_ALIASES} "
    "(alias TEXT PRIMARY KEY, target TEXT NOT NULL, created REAL NOT NULL)",
)

# a field is present in a document when its column holds it or doc does (null, another type)
_PRESENT = "CASE WHEN json_valid(e.doc) THEN json_type(e.doc, '$.{}') IS NOT NULL ELSE 0 END"
_COMPILER = Compiler(
    {"digest": Column("e.digest", "text")}
    | {f: Column(f"e.{f}", FIELD_KINDS[f], _PRESENT.format(f)) for f in _FIELDS}
)

_ROW = "e.digest, " + ", ".join(f"e.{f}" for f in _FIELDS) + ", e.doc"
_READ_SERVED = (
    f"SELECT {_ROW}, p.served FROM jfc_entries e LEFT JOIN jfc_payloads p "
    "ON p.digest = e.digest WHERE e.digest = ?"
)
_READ_EXPLAIN = (
    f"SELECT {_ROW}, p.served, p.explain FROM jfc_entries e LEFT JOIN jfc_payloads p "
    "ON p.digest = e.digest WHERE e.digest = ?"
)
_UNDECODED: Any = object()  # a row sqlite3 could not decode as UTF-8
_WRITE_ENTRY = (
    f"INSERT OR REPLACE INTO jfc_entries (digest, {', '.join(_FIELDS)}, doc) "
    f"VALUES ({'?, ' * len(SELECTABLE)}CAST(? AS TEXT))"
)
_WRITE_PAYLOAD = "INSERT OR REPLACE INTO jfc_payloads (digest, served, explain) VALUES (?, ?, ?)"
# only the small row; a field that was in doc (null, or of another type) moves to its column
_HIT = (
    "UPDATE jfc_entries SET hits = coalesce(hits, 0) + ?, last_hit = ?, doc = CASE WHEN "
    "(hits IS NULL OR last_hit IS NULL) AND json_valid(doc) "
    "THEN json_remove(doc, '$.hits', '$.last_hit') ELSE doc END WHERE digest = ?"
)
_INVALIDATE = (
    "UPDATE jfc_entries SET valid = 0, invalid_reason = ?, doc = CASE WHEN "
    "(valid IS NULL OR invalid_reason IS NULL) AND json_valid(doc) "
    "THEN json_remove(doc, '$.valid', '$.invalid_reason') ELSE doc END WHERE digest = ?"
)

# Connections inherited over fork() are never used or closed in the child (SQLite forbids
# both); holding them here keeps their finalisers from running in the child.
_ABANDONED: list[Any] = []
#: Serialises reopening a file deleted or replaced while in use.
_REOPEN_LOCK = threading.Lock()

_Prepared = tuple[tuple[Any, ...], tuple[Any, ...], list[tuple[str, str]]]


class _Connection(sqlite3.Connection):
    """A SQLite connection that can be weakly referenced."""


class _State:
    """One process's connections: a locked writer and one reader per thread."""

    def __init__(self, writer: sqlite3.Connection, identity: tuple[int, int] | None) -> None:
        self.pid = os.getpid()
        self.writer = writer
        self.identity = identity  # (st_dev, st_ino) of the file opened
        self.lock = threading.RLock()
        self.local = threading.local()
        self.readers: weakref.WeakSet[sqlite3.Connection] = weakref.WeakSet()

    def close(self) -> None:
        with self.lock:
            for conn in [self.writer, *self.readers]:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self.readers.clear()


def _prepare(doc: Mapping[str, Any], digest: Any = None) -> _Prepared:
    """The rows of a document: entries row, payload row and consumed pairs."""
    part = split(doc, digest)
    return (
        (part.digest, *part.columns, part.doc),
        (part.digest, part.served, part.explain),
        part.consumed,
    )


def keeps_old_entries(conn: sqlite3.Connection, table: str) -> bool:
    """Whether ``table`` of the open file is a collection 0.1.0's ``SQLiteStore`` kept cache
    entries in: its catalogue names the table with key ``digest`` (a file without that
    catalogue keeps none)."""
    try:
        row = conn.execute(
            f"SELECT key_field FROM {_OLD_META} WHERE collection = ?", (table,)
        ).fetchone()
    except sqlite3.OperationalError:  # no catalogue: not a file 0.1.0's store wrote
        return False
    return row is not None and row[0] == "digest"


def _utf8(value: Any) -> Any:
    """``value``, unless it is a str holding bytes that were not UTF-8 (bit rot; they read as
    lone surrogates, see decode_text): then ``ValueError``."""
    if type(value) is str and not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("invalid UTF-8") from None
    return value


def _converter(kind: str) -> Any:
    """What turns a column of ``kind`` into its field's value."""
    if kind == "date":
        return lambda value: parse_datetime(_utf8(value))
    if kind == "bool":
        return lambda value: bool(_utf8(value))
    return _utf8


#: (field, converter) of each column after digest: a read turns each row's columns into
#: fields, so the kinds are looked up once here rather than once per column per row
_COLUMNS = tuple((field, _converter(FIELD_KINDS[field])) for field in _FIELDS)


def _document(row: Sequence[Any]) -> dict[str, Any]:
    """The document of a row (digest, columns, doc, served, explain) or its stand-in."""
    digest = row[0]
    try:
        doc = {"digest": digest, **parse_object(row[_DOC])}
        for text in row[_DOC + 1 :]:
            if text is not None:
                doc.update(parse_object(text))
        for (field, convert), value in zip(_COLUMNS, row[1:_DOC]):
            if value is not None:
                doc[field] = convert(value)
    except UnreadableError as err:
        return {"digest": digest, UNREADABLE: str(err)}
    except (ValueError, TypeError) as err:  # a column edited by hand
        return {"digest": digest, UNREADABLE: f"a column does not decode ({err})"}
    return doc


class SQLiteBackend(MSONable):
    """Cache entries in one SQLite file with a fixed schema (see the module docstring).

    Parameters
    ----------
    path
        The SQLite file; ``~`` is expanded, a relative path is taken from the working folder
        now, and missing parent folders are created.
    timeout
        Seconds a write waits for another process's write to finish.

    Examples
    --------
    >>> import tempfile
    >>> from datetime import datetime
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     backend = SQLiteBackend(f"{tmp}/cache.sqlite")
    ...     backend.connect()
    ...     backend.write([{"digest": "ab12", "function": "m:f", "hits": 0, "output": "[1]"}])
    ...     backend.add_hits({"ab12": (2, datetime(2024, 5, 1))})
    ...     [d["hits"] for d in backend.select({"digest": {"$regex": "^ab"}}, ["hits"])]
    ...     backend.close()
    [2]
    """

    thread_safe = True

    def __init__(self, path: str | Path, timeout: float = 30.0) -> None:
        path = os.fspath(path)
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError(f"SQLiteBackend needs a file path, got {path!r}")
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        self.path = os.path.abspath(os.path.expanduser(path))
        self.timeout = float(timeout)
        self.name = f"sqlite://{self.path}"
        self._state: _State | None = None
        self._unusable: str | None = None  # why, since the file was replaced by a non-store

    def __repr__(self) -> str:
        return f"SQLiteBackend({self.path!r})"

    # ---------------------------------------------------------------- connections

    def connect(self) -> None:
        """Open the file, creating the schema or migrating a file of 0.1.0's ``SQLiteStore``.

        Raises
        ------
        StoreUnavailableError
            If the file cannot be opened or created, is not a SQLite database, or was
            written by a newer schema.
        """
        state = self._state
        if state is not None and state.pid == os.getpid():
            return
        if state is not None:
            _ABANDONED.append(state)
        self._unusable = None
        self._state = self._open()

    def close(self) -> None:
        """Close this process's connections; calling it twice is harmless."""
        state, self._state = self._state, None
        if state is not None and state.pid == os.getpid():
            state.close()
        elif state is not None:
            _ABANDONED.append(state)

    def owned_paths(self) -> list[str]:
        """The database file (its ``-wal``/``-shm`` sidecars share the prefix)."""
        return [self.path]

    def coordinator(self) -> SQLiteBackend:
        """This backend: it keeps claims and aliases beside the entries."""
        return self

    def _open(self) -> _State:
        file = self.path
        try:
            Path(file).parent.mkdir(parents=True, exist_ok=True)
            writer = self._new_connection()
        except (OSError, sqlite3.Error) as err:
            raise StoreUnavailableError(f"cannot open the SQLite store {file}: {err}") from err
        fs_type = file_system_type(file)
        if fs_type in NETWORK_FILE_SYSTEMS:
            warn(
                f"jobflow-cache: the SQLite store {file} is on a {fs_type} file system, where "
                "SQLite is not safe for processes on several nodes (its locks and WAL shared "
                "memory do not work across machines). Give workers on several nodes a "
                "PostgreSQL or MongoDB store (docs: Deployment)",
                stacklevel=5,
            )
        try:
            mode = writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("%s: journal_mode is %s, not WAL; writers block readers", file, mode)
            self._create_schema(writer)
        except (sqlite3.Error, StoreUnavailableError, ValueError) as err:
            writer.close()
            if isinstance(err, StoreUnavailableError):
                raise
            raise StoreUnavailableError(
                f"cannot use {file} as a SQLite store (is it a writable SQLite database?): {err}"
            ) from err
        except BaseException:
            writer.close()
            raise
        return _State(writer, identity(file))

    def _new_connection(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self.timeout,
            isolation_level=None,
            check_same_thread=False,
            factory=_Connection,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA cache_size = -65536")
            conn.create_function("regexp", 2, regexp, deterministic=True)
            # bytes that are not UTF-8 (bit rot) make the row unreadable, not the statement fail
            conn.text_factory = decode_text
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            version = conn.execute("SELECT max(version) FROM jfc_schema").fetchone()[0]
            if version is None:
                self._migrate(conn)
                conn.execute("INSERT INTO jfc_schema (version) VALUES (?)", (SCHEMA_VERSION,))
            elif version > SCHEMA_VERSION:
                raise StoreUnavailableError(
                    f"the SQLite store {self.path} has schema version {version}, written by a "
                    f"newer jobflow-cache (this one reads version {SCHEMA_VERSION}): upgrade"
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Copy the rows of 0.1.0's ``SQLiteStore`` collections :data:`_OLD_TABLES` (key
        ``digest``) into the fixed schema and drop them (inside the caller's transaction)."""
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        if _OLD_META not in tables:
            return
        for old in _OLD_TABLES:
            if old not in tables or not keeps_old_entries(conn, old):
                continue
            count = 0
            cursor = conn.execute(f"SELECT key, doc FROM {old}")
            while rows := cursor.fetchmany(_FETCH):
                self._insert(conn, [_old_row(key, text) for key, text in rows])
                count += len(rows)
            conn.execute(f"DROP TABLE {old}")
            conn.execute(f"DELETE FROM {_OLD_META} WHERE collection = ?", (old,))
            if _OLD_ARRAYS in tables:
                conn.execute(f"DELETE FROM {_OLD_ARRAYS} WHERE collection = ?", (old,))
            where = self.path if old == "entries" else f"{self.path} (table {old})"
            logger.info("migrated %d entries of %s to the fixed schema", count, where)

    def _live(self) -> _State:
        """This process's connections (opened on first use, and again after a fork)."""
        state = self._state
        if state is not None and state.pid == os.getpid():
            return state
        if self._unusable is not None:
            raise StoreUnavailableError(self._unusable)
        self.connect()
        assert self._state is not None
        return self._state

    def _reader(self) -> sqlite3.Connection:
        state = self._live()
        conn = getattr(state.local, "conn", None)
        if conn is None:
            try:
                conn = self._new_connection()
            except sqlite3.Error as err:
                raise StoreUnavailableError(f"cannot open {self.path}: {err}") from err
            state.local.conn = conn
            with state.lock:
                state.readers.add(conn)
        return conn

    def _current_file(self, state: _State) -> _State:
        """``state``, or new connections when the file at the path is no longer the one
        ``state`` opened (deleted, or replaced by another file, while in use).

        Writing on would put every later entry into a file no one can open again (SQLite
        writes to an unlinked file without an error), so the backend says so once and
        reopens the path: a deleted file is made again (the rest of the run is recorded
        there), a replaced one is used as it is (or, when it is no store, the error says so
        and the caller runs uncached). One ``stat`` per write transaction."""
        if state.identity is None or identity(self.path) == state.identity:
            return state
        with _REOPEN_LOCK:
            if self._state is not state:  # another thread reopened it meanwhile
                return self._live()
            what = "deleted" if not os.path.exists(self.path) else "replaced by another file"
            # the old file's -wal and -shm are still at the path: a new connection would take
            # the old file's pages from them; removed unless another process made fresh ones
            stale = sidecars_in_use(self.path)
            self._state = None
            state.close()
            for sidecar in (f"{self.path}-wal", f"{self.path}-shm"):
                if identity(sidecar) in stale:
                    with contextlib.suppress(OSError):
                        os.unlink(sidecar)
            try:
                self._state = self._open()
            except StoreUnavailableError as err:
                self._unusable = (
                    f"the SQLite store {self.path} was {what} while in use, and what is there "
                    f"now cannot be used: {err}"
                )
                raise StoreUnavailableError(self._unusable) from err
        warn(
            f"jobflow-cache: the SQLite store {self.path} was {what} while in use; reopened "
            "it, so entries from here on go to the file now at that path (those written "
            "before went with the old file)",
            stacklevel=6,
        )
        return self._live()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction on the process's writer connection; an error
        saying the file cannot be written now (full, locked, read-only, I/O, corrupt) is
        :class:`.StoreUnavailableError`, as :meth:`connect`'s are."""
        state = self._current_file(self._live())
        with state.lock:
            conn = state.writer
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as err:
                if (getattr(err, "sqlite_errorcode", 0) & 0xFF) not in _UNAVAILABLE_CODES:
                    raise
                raise StoreUnavailableError(
                    f"cannot write to the SQLite store {self.path}: {err}"
                ) from err

    # ---------------------------------------------------------------- entries

    def read(self, digest: str, *, explain: bool = True) -> dict[str, Any] | None:
        """The document of ``digest``, None when there is none (a stand-in when its row does
        not decode); without ``explain`` the explain column is never read."""
        statement = _READ_EXPLAIN if explain else _READ_SERVED
        conn = self._reader()
        # texts are decoded by sqlite3 itself (a Python text factory costs a call per column);
        # a row holding bytes that are not UTF-8 fails that, and is read again with the
        # factory that keeps them (the row then reads as unreadable, see decode_text)
        conn.text_factory = str
        try:
            row = conn.execute(statement, (digest,)).fetchone()
        except sqlite3.OperationalError:
            row = _UNDECODED
        finally:
            conn.text_factory = decode_text
        if row is _UNDECODED:
            row = conn.execute(statement, (digest,)).fetchone()
        return None if row is None else _document(row)

    def write(self, docs: Sequence[Mapping[str, Any]]) -> None:
        """Insert or replace whole documents by digest, in one transaction.

        Raises
        ------
        TypeError
            If a document holds a value JSON cannot (a ``datetime`` elsewhere than in
            ``created``/``last_hit``, ``bytes``, NaN): nothing is written.
        ValueError
            If a document has no str ``digest``.
        """
        prepared = [_prepare(doc) for doc in docs]
        if prepared:
            with self._transaction() as conn:
                self._insert(conn, prepared)

    @staticmethod
    def _insert(conn: sqlite3.Connection, prepared: Sequence[_Prepared]) -> None:
        conn.executemany(_WRITE_ENTRY, [entry for entry, _, _ in prepared])
        conn.executemany(_WRITE_PAYLOAD, [payload for _, payload, _ in prepared])
        conn.executemany(
            "DELETE FROM jfc_consumed WHERE digest = ?", [(entry[0],) for entry, _, _ in prepared]
        )
        conn.executemany(
            "INSERT OR IGNORE INTO jfc_consumed (upstream, digest) VALUES (?, ?)",
            [pair for _, _, pairs in prepared for pair in pairs],
        )

    def add_hits(self, hits: Mapping[str, tuple[int, datetime]]) -> None:
        """Add each count to ``hits`` and set ``last_hit``: one small row per digest (the
        payload table is never touched); absent digests are ignored."""
        rows = [(int(n), format_datetime(when), d) for d, (n, when) in hits.items()]
        if rows:
            with self._transaction() as conn:
                conn.executemany(_HIT, rows)

    def set_invalid(self, reasons: Sequence[tuple[str, str]]) -> list[str]:
        """Set ``valid`` to False and ``invalid_reason`` (two columns; a hit count written
        meanwhile is kept), 500 per transaction; the digests that exist, in order."""
        found: list[str] = []
        for start in range(0, len(reasons), _BATCH):
            with self._transaction() as conn:
                for digest, why in reasons[start : start + _BATCH]:
                    if conn.execute(_INVALIDATE, (str(why), digest)).rowcount:
                        found.append(digest)
        return found

    def remove(self, digests: Sequence[str]) -> None:
        """Delete the entries of ``digests`` (absent ones are ignored), in one transaction."""
        digests = list(digests)
        if not digests:
            return
        with self._transaction() as conn:
            for start in range(0, len(digests), _BATCH):
                batch = digests[start : start + _BATCH]
                marks = ", ".join("?" * len(batch))
                for table in ("jfc_entries", "jfc_payloads", "jfc_consumed"):
                    conn.execute(f"DELETE FROM {table} WHERE digest IN ({marks})", batch)

    def select(
        self,
        criteria: Criteria | None = None,
        fields: Sequence[str] | None = None,
        order: Mapping[str, int] | None = None,
        limit: int = 0,
    ) -> Iterator[dict[str, Any]]:
        """Stream the matching documents (see :class:`~.base.EntryBackend`); the payload
        table is joined only when a payload or explain field is asked for.

        Raises
        ------
        ValueError
            For a field or operator criteria or ``order`` do not know (before any row).
        """
        sql, params, wanted = select_statement(
            _COMPILER, _ROW, ("jfc_entries", "jfc_payloads"), criteria, fields, order, limit
        )
        return self._stream(sql, params, wanted)

    def _stream(
        self, sql: str, params: list[Any], wanted: list[str] | None
    ) -> Iterator[dict[str, Any]]:
        cursor = self._reader().execute(sql, params)
        try:
            rows = itertools.chain.from_iterable(iter(lambda: cursor.fetchmany(_FETCH), []))
            yield from selected(rows, wanted, _document)
        finally:
            cursor.close()

    def count(self, criteria: Criteria | None = None) -> int:
        """How many entries match ``criteria``."""
        where, params = _COMPILER.where(criteria)
        sql = f"SELECT count(*) FROM jfc_entries e WHERE {where}"
        return int(self._reader().execute(sql, params).fetchone()[0])

    def totals(self, criteria: Criteria | None = None) -> Totals:
        """Sums over the matching entries, in SQL (values not of their column's type count
        as missing)."""
        where, params = _COMPILER.where(criteria)
        conn = self._reader()
        entries, invalid, hits, saved, size, oldest, newest = conn.execute(
            "SELECT count(*), coalesce(sum(e.valid = 0), 0), coalesce(sum(e.hits), 0), "
            "total(e.hits * e.duration), coalesce(sum(e.files_size), 0), min(e.created), "
            f"max(e.created) FROM jfc_entries e WHERE {where}",
            params,
        ).fetchone()
        functions = conn.execute(
            f"SELECT e.function, count(*) FROM jfc_entries e WHERE ({where}) AND e.function "
            "IS NOT NULL GROUP BY e.function ORDER BY count(*) DESC, e.function",
            params,
        ).fetchall()
        return Totals(
            entries=int(entries),
            invalid=int(invalid),
            hits=int(hits),
            time_saved=float(saved),
            files_bytes=int(size),
            functions={str(name): int(n) for name, n in functions},
            oldest=_aware(oldest),
            newest=_aware(newest),
        )

    def consumers(self) -> Iterator[tuple[str, list[str]]]:
        """``(digest, consumed)`` of every entry that consumed others: the str items of its
        ``consumed`` list, sorted, each once; streamed by digest."""
        cursor = self._reader().execute(
            "SELECT digest, upstream FROM jfc_consumed ORDER BY digest, upstream"
        )
        try:
            rows = itertools.chain.from_iterable(iter(lambda: cursor.fetchmany(_FETCH), []))
            for digest, group in itertools.groupby(rows, key=lambda row: row[0]):
                yield digest, [upstream for _, upstream in group]
        finally:
            cursor.close()

    # ---------------------------------------------------------------- coordination

    def claim(self, name: str, owner: str, lease: float) -> str:
        """Take or renew the claim ``name`` for ``owner`` for ``lease`` seconds, atomically
        (when nobody holds it, its lease has expired, or ``owner`` holds it); the holder
        after the call. Leases use this machine's clock."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                f"INSERT INTO {_CLAIMS} (name, owner, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires = excluded.expires WHERE owner = excluded.owner OR expires < ?",
                (name, owner, now + lease, now),
            )
            row = conn.execute(f"SELECT owner FROM {_CLAIMS} WHERE name = ?", (name,)).fetchone()
        return str(row[0])

    def release(self, name: str, owner: str) -> None:
        """Drop the claim ``name`` if ``owner`` holds it."""
        with self._transaction() as conn:
            conn.execute(f"DELETE FROM {_CLAIMS} WHERE name = ? AND owner = ?", (name, owner))

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        """Record ``alias -> target`` pairs (last writer wins), in one transaction."""
        if not pairs:
            return
        now = time.time()
        with self._transaction() as conn:
            conn.executemany(
                f"INSERT INTO {_ALIASES} (alias, target, created) VALUES (?, ?, ?) "
                "ON CONFLICT (alias) DO UPDATE SET target = excluded.target, "
                "created = excluded.created",
                [(alias, target, now) for alias, target in pairs.items()],
            )

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        """The targets of those of ``names`` that are recorded aliases."""
        conn = self._reader()
        found: dict[str, str] = {}
        for start in range(0, len(names), _BATCH):
            chunk = list(names[start : start + _BATCH])
            marks = ", ".join("?" * len(chunk))
            found.update(
                conn.execute(
                    f"SELECT alias, target FROM {_ALIASES} WHERE alias IN ({marks})", chunk
                ).fetchall()
            )
        return found


def _aware(text: Any) -> datetime | None:
    """An aware UTC datetime of a date column's text (None when missing or damaged)."""
    try:
        return parse_datetime(text).replace(tzinfo=timezone.utc)
    except (ValueError, TypeError, AttributeError):
        return None


def _old_row(key: Any, text: Any) -> _Prepared:
    """The rows of one row of 0.1.0's ``SQLiteStore``'s table (``key`` is the JSON of the
    digest): its document, or, when that does not decode or fit, its text as an unreadable row
    (:meth:`SQLiteBackend.read` then gives the stand-in, ``cachetool verify --fix`` removes it)."""
    digest, doc, raw = old_document(key, text, lambda text: True)
    if doc is not None:
        try:
            return _prepare(doc, digest)
        except (ValueError, TypeError):
            raw = UNMIGRATED + raw  # valid JSON that this schema cannot hold: make it unreadable
    stored: Any = raw
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8: kept as they were
        stored = raw.encode("utf-8", "surrogateescape")
    return (digest, *([None] * len(_FIELDS)), stored), (digest, None, None), []
