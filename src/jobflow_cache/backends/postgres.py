"""PostgresBackend: a fixed-schema :class:`~.base.EntryBackend` on PostgreSQL, the shared cache.

The layout of :class:`.SQLiteBackend`, with real column types. For ``table`` ``T`` (at most
48 bytes, as 0.1.0's ``PostgresStore`` allows), schema version :data:`SCHEMA_VERSION`:

* ``T__v``: the schema version (one row).
* ``T__e``: one row per entry, one column per :data:`~.base.SELECTABLE` field (text
  ``COLLATE "C"``, so orders and prefix ranges are code-point orders whatever the database's
  collation; ``created``/``last_hit`` ``timestamptz``; ``valid`` ``boolean``; ``hits``/
  ``files_size`` ``bigint``; ``duration`` ``double precision``), ``doc``, the JSON text of the
  entry's other *small* fields, and ``in_doc``, the names of the column fields ``doc`` holds
  instead of their column (a ``None``, or a value not of the column's type, such as
  ``hits: "5"`` in a tampered document, or a text holding NUL, which PostgreSQL text cannot):
  criteria see such a value as missing, ``$exists`` sees it present, a read gives back exactly
  what was written. A column value, when there is one, wins over ``doc``'s (a hit fills the
  columns, never ``doc``).
* ``T__p``: ``served``, the JSON text of the large fields
  (:data:`~.sqlite.PAYLOAD_FIELDS`), and ``explain``, of the :data:`~.base.EXPLAIN_FIELDS`.
  Large texts are TOASTed (compressed, out of line): a hit updates the small ``T__e`` row only
  and never this table, so its cost does not depend on the output's size.
* ``T__c``: ``(upstream, digest)`` for each str of an entry's ``consumed`` list
  (:meth:`PostgresBackend.consumers`).
* ``T_claims`` and ``T_aliases``: the claims (leases on the database clock) and aliases, the
  very tables 0.1.0's ``PostgresStore`` keeps, with its SQL.

``doc`` and the payloads are ``text``, not ``jsonb``: JSON text gives back exactly what was
written (jsonb reorders keys, reads a float such as ``1e16`` back as an int, loses ``-0.0`` and
refuses ``\\u0000``), costs no parsing on a write, and can hold a row that does not decode
(bit rot, a migrated row this schema cannot hold), which reads as the stand-in
``{"digest": d, UNREADABLE: why}``. No criteria look inside it: they are answered by the
columns alone (a field's presence in ``doc`` by ``in_doc``).

Documents are JSON (``TypeError`` otherwise) except ``created`` and ``last_hit``, which are
``datetime`` (aware ones are converted to UTC; they read back naive UTC). ``$regex`` runs as
a PostgreSQL regular expression translated to search exactly as Python's ``re.search``
(:func:`postgres_pattern`), the flags of ``$options`` written out in it (``i`` as classes
of the letters Python's ``IGNORECASE`` takes, not PostgreSQL's own ASCII-only case folding
under ``"C"``); an anchored literal prefix is a range of the column.

**Migration**: on :meth:`~PostgresBackend.connect`, when the schema is new and
0.1.0's ``PostgresStore``'s table ``T`` (key ``digest``) exists, every row is copied in the same
transaction (decoded as 0.1.0's ``PostgresStore`` decodes it; a row that is no document, or
that this schema cannot hold, becomes an unreadable row), then ``T`` is dropped; its claims
and aliases stay where they are. Several processes connecting at once are serialised by the
advisory lock 0.1.0's ``PostgresStore`` takes to create its tables.

Each process keeps one connection pool (psycopg 3, ``psycopg_pool``: the optional
``postgres`` extra, imported on first use), made again by itself after ``fork()``; the
backend may be used from several threads at once.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import re
import socket
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import import_module
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import xxhash
from monty.json import MSONable

from jobflow_cache.backends.base import (
    SELECTABLE,
    UNREADABLE,
    Criteria,
    Totals,
    parse_datetime,
)
from jobflow_cache.backends.criteria import REGEX_OPTIONS, Column, Compiler, column_value
from jobflow_cache.backends.layout import (
    FIELD_KINDS,
    UNMIGRATED,
    UnreadableError,
    old_document,
    parse_object,
    select_statement,
    selected,
    split,
)
from jobflow_cache.errors import StoreUnavailableError

if TYPE_CHECKING:
    from types import ModuleType

    from psycopg import Connection
    from psycopg_pool import ConnectionPool

__all__ = ["SCHEMA_VERSION", "PostgresBackend", "postgres_pattern"]

logger = logging.getLogger(__name__)

#: Version of the schema this module writes (in table ``<table>__v``).
SCHEMA_VERSION = 1

UTC = timezone.utc
_INSTALL_HINT = "pip install 'jobflow-cache[postgres]'"
_MIN_SERVER_VERSION = 140000
_MAX_TABLE_BYTES = 48  # PostgresStore's limit: "<table>_aliases" must fit 63 bytes
_FIELDS = SELECTABLE[1:]  # the columns after digest, in table order
_DOC = len(SELECTABLE)  # index of doc in a row (served and explain follow)
_SQL_TYPES = {
    "text": 'text COLLATE "C"',
    "int": "bigint",
    "real": "double precision",
    "bool": "boolean",
    "date": "timestamptz",
}
_INDEXED = ("function", "name", "created", "last_hit", "valid", "source_uuid", "scheme")
_OLD_FORMAT = 'jobflow-cache PostgresStore {"format":1,"key":"digest"}'  # its table comment
_BATCH = 500  # rows per statement
_FETCH = 256  # rows per fetch while streaming
_SMALL_LIMIT = 1000  # results up to this many rows are read in one round trip
_CURSOR_IDS = itertools.count(1)
_OPEN_LOCK = threading.RLock()  # one pool per backend and process, even if threads race


# --------------------------------------------------------------------------- connections


class _State:
    """One process's connection pool, the connections it made and what is known to exist."""

    def __init__(self, pool: ConnectionPool, pg: ModuleType, pool_module: ModuleType) -> None:
        self.pid = os.getpid()
        self.pool = pool
        self.pg = pg
        self.pool_module = pool_module
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()

    def close(self) -> None:
        self.pool.close(timeout=5.0)

    def abandon(self) -> None:
        """In a forked child: make the parent's connections unusable here without touching
        the parent's sessions, and keep every object alive so nothing is ever finalised.

        Closing (or freeing) a connection sends the server a Terminate message on the
        socket the parent shares; pointing each socket's descriptor at a fresh unconnected
        socket makes those messages fail harmlessly instead.
        """
        _ABANDONED.append(self)
        dummy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            for conn in list(self.connections):
                try:
                    fd = conn.pgconn.socket
                except Exception:  # closed or never connected
                    continue
                os.dup2(dummy.fileno(), fd, inheritable=False)
        finally:
            dummy.close()


# Process states left behind in a forked child: never used, closed or freed there (their
# sockets belong to the parent; see _State.abandon).
_ABANDONED: list[_State] = []
#: The states of this process's open pools (a forked child abandons those of its parent).
_LIVE: weakref.WeakSet[_State] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _OPEN_LOCK
    _OPEN_LOCK = threading.RLock()  # another thread may have held it at fork()
    for state in list(_LIVE):
        if state.pid != os.getpid():
            _LIVE.discard(state)
            state.abandon()


os.register_at_fork(after_in_child=_after_fork_in_child)


_DSN_PAIR = re.compile(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)")


def _conninfo_parts(uri: str) -> dict[str, str]:
    """host, port, user and dbname of a URI or ``key=value`` connection string."""
    if uri.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(uri)
        found = {
            "host": parts.hostname or "",
            "port": str(parts.port or ""),
            "user": unquote(parts.username or ""),
            "dbname": unquote(parts.path.lstrip("/")),
        }
    else:
        found = {k: v.strip("'") for k, v in _DSN_PAIR.findall(uri)}
    return {k: found.get(k, "") for k in ("host", "port", "user", "dbname")}


def _redact(uri: str) -> str:
    """The URI with its password hidden."""
    if uri.startswith(("postgresql://", "postgres://")):
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", uri)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", uri)


# --------------------------------------------------------------------------- values


def _text_fits(value: str) -> bool:
    """Whether PostgreSQL text can hold ``value`` (no NUL, no lone surrogate)."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _column(kind: str, value: Any) -> Any:
    """The value a column of ``kind`` holds for a document's ``value`` (None: none)."""
    stored = column_value(kind, value)
    if stored is None:
        return None
    if kind == "text":
        return stored if _text_fits(stored) else None
    if kind == "bool":
        return bool(stored)
    if kind == "date":
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return stored


def _operand(kind: str, value: Any) -> Any:
    """The parameter of a criteria operand (what ``column_value`` gives), None: no column
    holds it (see :class:`.Compiler`)."""
    if kind == "text":
        return value if _text_fits(value) else None
    if kind == "bool":
        return bool(value)
    if kind == "date":
        return parse_datetime(value).replace(tzinfo=UTC)
    return value


def _naive(value: datetime) -> datetime:
    return value.astimezone(UTC).replace(tzinfo=None)


_CLASS_ESCAPES = frozenset("ntrfv")  # mean the same in Python and in PostgreSQL
_ESCAPES = _CLASS_ESCAPES | {"A", "Z"}
_GROUPS = ("(?:", "(?=", "(?!", "(?<=", "(?<!")
_BOUNDS = re.compile(r"\{\d+(,\d*)?\}")
_FLAGS = re.compile(r"\(\?([a-zA-Z]+)\)")  # a global flag group: only at the start
_CLASS_CHARS = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v"}
#: The non-ASCII letters Python's IGNORECASE takes for an ASCII letter (found by searching
#: every code point, see tests/backends/test_postgres_backend.py).
_CASE_EXTRAS = {"i": "\u0130\u0131", "k": "\u212a", "s": "\u017f"}


def _unsupported(pattern: str, what: str) -> ValueError:
    return ValueError(
        f"$regex {pattern!r}: PostgresBackend cannot search with {what} as Python does "
        "(use literals, escapes of punctuation, . ^ $ * + ? {m,n} | ( ) (?:) lookarounds and "
        "[...] classes of literals; with the flags i, m, s)"
    )


def _caseless(char: str) -> str:
    """The letters Python's ``IGNORECASE`` searches for the ASCII ``char``: ``char`` itself,
    its other case and the non-ASCII letters of :data:`_CASE_EXTRAS`; ``char`` when it is
    not an ASCII letter."""
    lower = char.lower()
    if not ("a" <= lower <= "z"):
        return char
    return lower + lower.upper() + _CASE_EXTRAS.get(lower, "")


def postgres_pattern(pattern: str) -> str:
    """The PostgreSQL regular expression (ARE) that ``~`` searches with exactly as
    ``re.search(pattern, text)`` does.

    ``.`` becomes ``[^\\n]`` and ``$`` ``(?=\\n?\\Z)`` (Python's meanings); everything else
    is written the same in both. Syntax whose meaning differs (``\\d \\w \\s \\b``, which
    depend on Unicode tables or mean another thing, back-references, named or atomic
    groups, possessive quantifiers, POSIX classes) raises ``ValueError``.

    Global flags at the start (``(?i)``, ``(?m)``, ``(?s)``: what ``$options`` adds, see
    :mod:`.criteria`) are written out: ``s``, ``.`` is ``.``; ``m``, ``^`` is
    ``(?:\\A|(?<=\\n))`` and ``$`` ``(?=\\n|\\Z)``; ``i``, each ASCII letter is a class of
    the letters Python's ``IGNORECASE`` takes for it (``k``: ``[kK\\u212a]``, the Kelvin sign
    too), and so is each class, since PostgreSQL's own case folding under the column's
    collation ``"C"`` knows only ASCII. Other flags, and non-ASCII characters with ``i``,
    raise ``ValueError``.

    Examples
    --------
    >>> postgres_pattern("^relax.*$")
    '^relax[^\\\\n]*(?=\\\\n?\\\\Z)'
    >>> postgres_pattern(r"^3f\\-2c")
    '^3f\\\\-2c'
    >>> postgres_pattern("(?is)^re.x")
    '^[rR][eE].[xX]'
    """
    out: list[str] = []
    i = 0
    flags = ""
    while (leading := _FLAGS.match(pattern, i)) is not None:
        flags += leading.group(1)
        i = leading.end()
    other = sorted(set(flags) - set(REGEX_OPTIONS))
    if other:
        raise _unsupported(pattern, f"the flag {other[0]!r}")
    caseless = "i" in flags
    if caseless and not pattern.isascii():
        raise _unsupported(pattern, "non-ASCII characters case-insensitively")
    quantified = False  # the last token was a quantifier
    while i < len(pattern):
        char = pattern[i]
        token = written = char  # what is read, what is written
        quantifier = False
        if char == "\\":
            escaped = pattern[i + 1 : i + 2]
            if not escaped or (escaped.isalnum() and escaped not in _ESCAPES):
                raise _unsupported(pattern, f"the escape \\{escaped}")
            token = written = char + escaped
        elif char == ".":
            written = "." if "s" in flags else "[^\\n]"
        elif char == "^" and "m" in flags:
            written = "(?:\\A|(?<=\\n))"
        elif char == "$":
            written = "(?=\\n|\\Z)" if "m" in flags else "(?=\\n?\\Z)"
        elif char == "[":
            token = written = _bracket(pattern, i)
            if caseless:
                written = _caseless_bracket(token)
        elif char == "(" and pattern.startswith("(?", i):
            group = next((g for g in _GROUPS if pattern.startswith(g, i)), None)
            if group is None:
                raise _unsupported(pattern, "this kind of group or flag")
            token = written = group
        elif char == "{":
            bounds = _BOUNDS.match(pattern, i)
            if bounds:
                token = written = bounds.group(0)
                quantifier = True
            else:
                written = "\\{"
        elif char == "}":
            written = "\\}"
        elif char in "*+?":
            if quantified and char == "+":
                raise _unsupported(pattern, "a possessive quantifier")
            quantifier = char != "?" or not quantified  # "?" after one marks it lazy
        elif caseless and char != _caseless(char):
            written = f"[{_caseless(char)}]"
        out.append(written)
        i += len(token)
        quantified = quantifier
    return "".join(out)


def _bracket(pattern: str, start: int) -> str:
    """The bracket expression at ``start`` as it is, if both dialects read it alike."""
    i = start + 1
    if pattern.startswith("^", i):
        i += 1
    if pattern.startswith("]", i):
        i += 1
    while i < len(pattern):
        char = pattern[i]
        if char == "]":
            return pattern[start : i + 1]
        if char == "[":
            raise _unsupported(pattern, "a '[' inside a class")
        if char == "\\":
            escaped = pattern[i + 1 : i + 2]
            if escaped.isalnum() and escaped not in _CLASS_ESCAPES:
                raise _unsupported(pattern, f"the escape \\{escaped}")
            i += 2
            continue
        i += 1
    raise _unsupported(pattern, "an unterminated class")  # re.compile refused it already


def _caseless_bracket(bracket: str) -> str:
    """The class ``bracket`` (as :func:`_bracket` gave it, ASCII) with the letters Python's
    ``IGNORECASE`` also takes for the ASCII letters it holds, written first (a ``]`` or
    ``-`` that was first is escaped, as it is no longer first)."""
    body = bracket[1:-1]
    head = "^" if body.startswith("^") else ""
    body = body[len(head) :]

    def member(j: int) -> tuple[str, int]:  # the character at j (an escape: what it means)
        if body[j] == "\\":
            return _CLASS_CHARS.get(body[j + 1], body[j + 1]), j + 2
        return body[j], j + 1

    held: set[str] = set()
    j = 0
    while j < len(body):
        low, j = member(j)
        high = low
        if body.startswith("-", j) and j + 1 < len(body):
            high, j = member(j + 1)
        held.update(chr(code) for code in range(ord(low), ord(high) + 1))
    extra = {other for char in held for other in _caseless(char)} - held
    if body.startswith(("]", "-")):
        body = "\\" + body
    return f"[{head}{''.join(sorted(extra))}{body}]"


# --------------------------------------------------------------------------- rows

_Prepared = tuple[tuple[Any, ...], tuple[Any, ...], list[tuple[str, str]]]


def _prepare(doc: Mapping[str, Any], digest: Any = None) -> _Prepared:
    """The rows of a document: entries row, payload row and consumed pairs."""
    part = split(doc, digest, _column, _text_fits)
    return (
        (part.digest, *part.columns, part.in_doc or None, part.doc),
        (part.digest, part.served, part.explain),
        part.consumed,
    )


def _document(row: Sequence[Any]) -> dict[str, Any]:
    """The document of a row (digest, columns, doc, served, explain) or its stand-in."""
    digest = row[0]
    try:
        doc = {"digest": digest, **parse_object(row[_DOC])}
        for text in row[_DOC + 1 :]:
            if text is not None:
                doc.update(parse_object(text))
    except UnreadableError as err:
        return {"digest": digest, UNREADABLE: str(err)}
    for field, value in zip(_FIELDS, row[1:_DOC]):
        if value is not None:
            doc[field] = _naive(value) if isinstance(value, datetime) else value
    return doc


def _old_row(key: Any, text: Any) -> _Prepared:
    """The rows of one row of 0.1.0's ``PostgresStore``'s table (``key`` the JSON of the
    digest, ``text`` its JSONB document as text), decoded as that store decodes it: the
    document, or an unreadable row when it is none or this schema cannot hold it."""
    digest, doc, raw = old_document(key, str(text), _text_fits, postgres=True)
    if doc is not None:
        try:
            return _prepare(doc, digest)
        except (ValueError, TypeError):
            raw = UNMIGRATED + raw  # JSON this schema cannot hold (a date elsewhere, NaN...)
    # a JSON scalar or array reads as "a JSON <kind>", the rest as "does not decode"
    return (digest, *([None] * len(_FIELDS)), None, raw), (digest, None, None), []


# --------------------------------------------------------------------------- SQL


def _ident(name: str) -> str:
    """A quoted identifier (``%`` doubled: statements run with parameters)."""
    return '"' + name.replace('"', '""').replace("%", "%%") + '"'


def _regclass(name: str) -> str:
    """A quoted identifier as a parameter of ``to_regclass``."""
    return '"' + name.replace('"', '""') + '"'


class _Tables:
    """The quoted names of one backend's tables and its SQL."""

    def __init__(self, table: str) -> None:
        self.names = {
            "version": f"{table}__v",
            "entries": f"{table}__e",
            "payloads": f"{table}__p",
            "consumed": f"{table}__c",
            "claims": f"{table}_claims",
            "aliases": f"{table}_aliases",
        }
        self.old = table
        q = {what: _ident(name) for what, name in self.names.items()}
        self.version, self.entries, self.payloads = q["version"], q["entries"], q["payloads"]
        self.consumed, self.claims, self.aliases = q["consumed"], q["claims"], q["aliases"]
        e = self.entries
        self.schema = (
            f"CREATE TABLE IF NOT EXISTS {self.version} (version integer NOT NULL)",
            f'CREATE TABLE IF NOT EXISTS {e} (digest text COLLATE "C" PRIMARY KEY, '
            + "".join(f"{f} {_SQL_TYPES[FIELD_KINDS[f]]}, " for f in _FIELDS)
            + "in_doc text[], doc text NOT NULL)",
            *(
                f"CREATE INDEX IF NOT EXISTS {_ident(f'{table}__e{n}')} ON {e} ({f})"
                for n, f in enumerate(_INDEXED, 1)
            ),
            f'CREATE TABLE IF NOT EXISTS {self.payloads} (digest text COLLATE "C" PRIMARY KEY, '
            "served text, explain text)",
            f'CREATE TABLE IF NOT EXISTS {self.consumed} (upstream text COLLATE "C" NOT NULL, '
            'digest text COLLATE "C" NOT NULL, PRIMARY KEY (upstream, digest))',
            f"CREATE INDEX IF NOT EXISTS {_ident(f'{table}__c1')} ON {self.consumed} (digest)",
            # PostgresStore's own claims and aliases tables, as it makes them
            f'CREATE TABLE IF NOT EXISTS {self.claims} (name text COLLATE "C" '
            "PRIMARY KEY, owner text NOT NULL, expires timestamptz NOT NULL)",
            f'CREATE TABLE IF NOT EXISTS {self.aliases} (alias text COLLATE "C" '
            "PRIMARY KEY, digest text NOT NULL)",
        )
        present = "coalesce({!r} = ANY(e.in_doc), FALSE)"
        self.compiler = Compiler(
            {"digest": Column("e.digest", "text")}
            | {f: Column(f"e.{f}", FIELD_KINDS[f], present.format(f)) for f in _FIELDS},
            param="%s",
            regexp="{value} ~ {pattern}",
            operand=_operand,
            pattern=postgres_pattern,
        )
        self.row = "e.digest, " + ", ".join(f"e.{f}" for f in _FIELDS) + ", e.doc"
        updates = ", ".join(f"{f} = EXCLUDED.{f}" for f in (*_FIELDS, "in_doc", "doc"))
        self.write_entry = (
            f"INSERT INTO {e} (digest, {', '.join(_FIELDS)}, in_doc, doc) "
            f"VALUES ({', '.join(['%s'] * (len(SELECTABLE) + 2))}) "
            f"ON CONFLICT (digest) DO UPDATE SET {updates}"
        )
        self.write_payload = (
            f"INSERT INTO {self.payloads} (digest, served, explain) VALUES (%s, %s, %s) "
            "ON CONFLICT (digest) DO UPDATE SET served = EXCLUDED.served, "
            "explain = EXCLUDED.explain"
        )
        # only the small row: a column value wins over doc's, so doc is left as it is
        self.hit = f"UPDATE {e} SET hits = coalesce(hits, 0) + %s, last_hit = %s WHERE digest = %s"


# --------------------------------------------------------------------------- the backend


def _modules() -> tuple[ModuleType, ModuleType]:
    """psycopg and psycopg_pool, imported on first use (they are an optional dependency)."""
    try:
        return import_module("psycopg"), import_module("psycopg_pool")
    except ImportError as err:
        raise StoreUnavailableError(
            f"PostgresBackend needs psycopg and psycopg-pool: {_INSTALL_HINT} ({err})"
        ) from err


class PostgresBackend(MSONable):
    """Cache entries in PostgreSQL tables of a fixed schema (see the module docstring).

    The arguments of a ``{"type": "PostgresStore", ...}`` store spec may be given as they are.

    Parameters
    ----------
    uri
        libpq connection URI or string, e.g. ``postgresql://user:pw@host:5432/db``.
    table
        The name the tables are derived from (``<table>__e``, ``<table>__p``, ...,
        ``<table>_claims``, ``<table>_aliases``); at most 48 bytes. A ``PostgresStore`` (0.1.0)
        table of this name is migrated on :meth:`connect`.
    connect_timeout
        Seconds to wait for a connection (also how long a busy pool is waited for).
    pool_size
        Most connections this process keeps open.
    key
        Must be ``"digest"`` (accepted for a PostgresStore spec's sake).
    **kwargs
        Other options of a PostgresStore spec (maggma ``Store`` options such as
        ``validator``): accepted and ignored.

    Examples
    --------
    >>> backend = PostgresBackend("postgresql://cache:secret@db.example.org/cache")
    >>> backend.name
    'postgresql://cache@db.example.org/cache/jobflow_cache'
    >>> PostgresBackend.from_dict(backend.as_dict()).name == backend.name
    True
    """

    thread_safe = True

    def __init__(
        self,
        uri: str,
        table: str = "jobflow_cache",
        connect_timeout: float = 5.0,
        pool_size: int = 4,
        key: str = "digest",
        **kwargs: Any,
    ) -> None:
        if not isinstance(uri, str) or not uri:
            raise ValueError("PostgresBackend needs a connection URI")
        if not isinstance(table, str) or not table or "\x00" in table:
            raise ValueError("table must be a non-empty string")
        if len(table.encode("utf-8")) > _MAX_TABLE_BYTES:
            raise ValueError(f"table names are at most {_MAX_TABLE_BYTES} bytes: {table!r}")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        if key != "digest":
            raise ValueError(f"PostgresBackend keys entries by 'digest', not {key!r}")
        self.uri = uri
        self.table = table
        self.connect_timeout = float(connect_timeout)
        self.pool_size = int(pool_size)
        self.key = key
        self.kwargs = kwargs
        self._t = _Tables(table)
        self._state: _State | None = None

    @property
    def name(self) -> str:
        """``postgresql://user@host:port/dbname/table`` (never the password)."""
        parts = _conninfo_parts(self.uri)
        user = f"{parts['user']}@" if parts["user"] else ""
        port = f":{parts['port']}" if parts["port"] else ""
        return f"postgresql://{user}{parts['host']}{port}/{parts['dbname']}/{self.table}"

    def __repr__(self) -> str:
        return f"PostgresBackend(uri={_redact(self.uri)!r}, table={self.table!r})"

    def owned_paths(self) -> list[str]:
        """Nothing: the entries live on the server."""
        return []

    def coordinator(self) -> PostgresBackend:
        """This backend: it keeps claims and aliases beside the entries."""
        return self

    # ---------------------------------------------------------------- connections

    def connect(self) -> None:
        """Open this process's pool, creating the schema or migrating a PostgresStore table.

        Raises
        ------
        StoreUnavailableError
            If psycopg is missing, the server cannot be reached (or refuses the login) within
            ``connect_timeout``, it is older than PostgreSQL 14 or not UTF-8, or its schema
            was written by a newer jobflow-cache.
        """
        with _OPEN_LOCK:
            state = self._state
            if state is not None and state.pid == os.getpid():
                return
            self._state = None
            if state is not None:  # the parent's, after fork(): never touched here
                _LIVE.discard(state)
                state.abandon()
            self._state = self._open()

    def close(self) -> None:
        """Close this process's pool; calling it twice is harmless."""
        state, self._state = self._state, None
        if state is None:
            return
        _LIVE.discard(state)
        if state.pid == os.getpid():
            state.close()
        else:
            state.abandon()

    def _open(self) -> _State:
        pg, pool_module = _modules()
        try:
            given = pg.conninfo.conninfo_to_dict(self.uri)
        except pg.Error as err:
            raise StoreUnavailableError(f"bad PostgreSQL connection string: {err}") from err
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = max(2, math.ceil(self.connect_timeout))
        if "application_name" not in given:
            kwargs["application_name"] = "jobflow-cache"
        try:
            with pg.connect(self.uri, **kwargs) as conn:
                self._check_server(conn)
                self._create_schema(conn)
        except pg.Error as err:
            raise StoreUnavailableError(
                f"cannot use the PostgreSQL store {self.name}: {err}".rstrip()
            ) from err
        state: _State | None = None

        def configure(conn: Connection[Any]) -> None:
            if state is not None:
                state.connections.add(conn)

        pool = pool_module.ConnectionPool(
            self.uri,
            min_size=1,
            max_size=self.pool_size,
            kwargs=kwargs,
            configure=configure,
            open=False,
            timeout=self.connect_timeout,
            name=f"jobflow-cache:{self.table}",
        )
        state = _State(pool, pg, pool_module)
        try:
            pool.open(wait=True, timeout=max(self.connect_timeout, 1.0))
        except pool_module.PoolTimeout as err:
            pool.close(timeout=1.0)
            raise StoreUnavailableError(
                f"cannot open connections to the PostgreSQL store {self.name}: {err}"
            ) from err
        _LIVE.add(state)  # the fork handler abandons it in a child
        logger.debug("connected to %s", self.name)
        return state

    def _check_server(self, conn: Connection[Any]) -> None:
        if conn.info.server_version < _MIN_SERVER_VERSION:
            raise StoreUnavailableError(
                f"PostgresBackend needs PostgreSQL 14 or later; {self.name} runs "
                f"{conn.info.server_version}"
            )
        encoding = conn.execute("SHOW server_encoding").fetchone()
        if encoding is None or str(encoding[0]).upper() not in ("UTF8", "UTF-8"):
            raise StoreUnavailableError(
                f"PostgresBackend needs a UTF-8 database; {self.name} uses {encoding}"
            )

    def _version(self, conn: Connection[Any]) -> int | None:
        """The schema version, None while any table is missing or it has none."""
        names = [_regclass(name) for name in self._t.names.values()]
        row = conn.execute(
            "SELECT " + " AND ".join(["to_regclass(%s) IS NOT NULL"] * len(names)), names
        ).fetchone()
        if row is None or not row[0]:
            return None
        found = conn.execute(f"SELECT max(version) FROM {self._t.version}").fetchone()
        return None if found is None or found[0] is None else int(found[0])

    def _create_schema(self, conn: Connection[Any]) -> None:
        version = self._version(conn)
        if version is None:
            # PostgresStore's lock: concurrent CREATE TABLE IF NOT EXISTS can fail on the
            # catalog, and a PostgresStore creating its table meanwhile waits for the migration
            lock = xxhash.xxh64_intdigest(f"jobflow-cache:{self.table}:schema".encode()) - 2**63
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [lock])
                for statement in self._t.schema:
                    conn.execute(statement)
                row = conn.execute(f"SELECT max(version) FROM {self._t.version}").fetchone()
                version = None if row is None or row[0] is None else int(row[0])
                if version is None:
                    self._migrate(conn)
                    conn.execute(
                        f"INSERT INTO {self._t.version} (version) VALUES (%s)", [SCHEMA_VERSION]
                    )
                    version = SCHEMA_VERSION
        if version > SCHEMA_VERSION:
            raise StoreUnavailableError(
                f"the PostgreSQL store {self.name} has schema version {version}, written by a "
                f"newer jobflow-cache (this one reads version {SCHEMA_VERSION}): upgrade"
            )

    def _migrate(self, conn: Connection[Any]) -> None:
        """Copy the rows of PostgresStore's table (key ``digest``) into the fixed schema and
        drop it (inside the caller's transaction)."""
        old = _regclass(self._t.old)
        row = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), 'pg_class')",
            [old, old],
        ).fetchone()
        if row is None or not row[0] or row[1] != _OLD_FORMAT:
            return
        count = 0
        with conn.cursor(name=f"jfc_migrate_{next(_CURSOR_IDS)}") as cursor:
            cursor.execute(f"SELECT key, doc::text FROM {_ident(self._t.old)}")
            while rows := cursor.fetchmany(_FETCH):
                self._insert(conn, [_old_row(key, text) for key, text in rows])
                count += len(rows)
        conn.execute(f"DROP TABLE {_ident(self._t.old)}")
        logger.info("migrated %d entries of %s to the fixed schema", count, self.name)

    def _live(self) -> _State:
        """This process's pool (opened on first use, and again after a fork)."""
        state = self._state
        if state is None or state.pid != os.getpid():
            self.connect()
            state = self._state
            assert state is not None
        return state

    @contextmanager
    def _errors(self, state: _State) -> Iterator[None]:
        """Turn "the server cannot be used" errors into StoreUnavailableError."""
        pg, pool_module = state.pg, state.pool_module
        try:
            yield
        except (
            pg.OperationalError,
            pg.InterfaceError,
            pool_module.PoolTimeout,
            pool_module.PoolClosed,
        ) as err:
            raise StoreUnavailableError(f"PostgreSQL store {self.name}: {err}") from err

    def _run(self, work: Callable[[Connection[Any]], Any], retry_broken: bool = True) -> Any:
        """Run ``work(conn)`` on a pooled connection: again after a deadlock or a
        serialisation failure and, with ``retry_broken``, on another connection when its
        connection broke under it (for work safe to repeat)."""
        state = self._live()
        pg = state.pg
        attempts = self.pool_size + 2
        with self._errors(state):
            for attempt in range(attempts):
                conn = None
                try:
                    with state.pool.connection() as conn:
                        return work(conn)
                except (pg.errors.DeadlockDetected, pg.errors.SerializationFailure):
                    if attempt + 1 >= attempts:
                        raise
                except pg.OperationalError:
                    if not retry_broken or conn is None or not conn.broken:
                        raise
                    if attempt + 1 >= attempts:
                        raise
                logger.debug("retrying on %s (attempt %d)", self.name, attempt + 2)
        raise AssertionError("unreachable")  # pragma: no cover

    def _rows(self, sql: str, params: Sequence[Any], expected: int = 0) -> Iterator[Any]:
        """Stream the rows of a query: one round trip if at most ``expected`` (>0) rows are
        wanted, else a server-side cursor read a few hundred rows at a time."""
        if 0 < expected <= _SMALL_LIMIT:
            yield from self._run(lambda conn: conn.execute(sql, params).fetchall())
            return
        state = self._live()
        name = f"jfc_{next(_CURSOR_IDS)}"
        with (
            self._errors(state),
            state.pool.connection() as conn,
            conn.transaction(),
            conn.cursor(name=name) as cursor,
        ):
            cursor.execute(sql, params)
            while rows := cursor.fetchmany(_FETCH):
                yield from rows

    # ---------------------------------------------------------------- entries

    def read(self, digest: str, *, explain: bool = True) -> dict[str, Any] | None:
        """The document of ``digest``, None when there is none (a stand-in when its row does
        not decode); without ``explain`` the explain column is never read."""
        extra = "p.served, p.explain" if explain else "p.served"
        sql = (
            f"SELECT {self._t.row}, {extra} FROM {self._t.entries} e LEFT JOIN "
            f"{self._t.payloads} p ON p.digest = e.digest WHERE e.digest = %s"
        )
        if not _text_fits(digest):
            return None
        row = self._run(lambda conn: conn.execute(sql, [digest]).fetchone())
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
        latest = {p[0][0]: p for p in map(_prepare, docs)}  # the last of one digest wins
        prepared = [latest[d] for d in sorted(latest)]  # one lock order for every writer
        if prepared:
            self._run(lambda conn: self._in_transaction(conn, prepared))

    def _in_transaction(self, conn: Connection[Any], prepared: Sequence[_Prepared]) -> None:
        with conn.transaction():
            self._insert(conn, prepared)

    def _insert(self, conn: Connection[Any], prepared: Sequence[_Prepared]) -> None:
        t = self._t
        cursor = conn.cursor()
        cursor.executemany(t.write_entry, [entry for entry, _, _ in prepared])
        cursor.executemany(t.write_payload, [payload for _, payload, _ in prepared])
        digests = [entry[0] for entry, _, _ in prepared]
        cursor.execute(f"DELETE FROM {t.consumed} WHERE digest = ANY(%s::text[])", [digests])
        pairs = [pair for _, _, pairs in prepared for pair in pairs]
        if pairs:
            cursor.executemany(
                f"INSERT INTO {t.consumed} (upstream, digest) VALUES (%s, %s) "
                "ON CONFLICT DO NOTHING",
                pairs,
            )

    def add_hits(self, hits: Mapping[str, tuple[int, datetime]]) -> None:
        """Add each count to ``hits`` and set ``last_hit``: one small row per digest (the
        payload table is never touched); absent digests are ignored."""
        rows = sorted(
            (d, int(n), when.replace(tzinfo=UTC) if when.tzinfo is None else when)
            for d, (n, when) in hits.items()
            if _text_fits(d)
        )
        if not rows:
            return
        params = [(n, when, d) for d, n, when in rows]

        def work(conn: Connection[Any]) -> None:
            with conn.transaction():
                conn.cursor().executemany(self._t.hit, params)

        self._run(work, retry_broken=False)  # counts must not be added twice

    def set_invalid(self, reasons: Sequence[tuple[str, str]]) -> list[str]:
        """Set ``valid`` to False and ``invalid_reason`` (two columns; a hit count written
        meanwhile is kept), 500 per statement; the digests that exist, in order. NUL
        characters of a reason become U+FFFD (PostgreSQL text cannot hold them)."""
        sql = (
            f"UPDATE {self._t.entries} e SET valid = FALSE, invalid_reason = u.why FROM "
            "unnest(%s::text[], %s::text[]) AS u(digest, why) WHERE e.digest = u.digest "
            "RETURNING e.digest"
        )
        found: list[str] = []
        for start in range(0, len(reasons), _BATCH):
            batch = reasons[start : start + _BATCH]
            last = {d: str(why).replace("\x00", "\ufffd") for d, why in batch if _text_fits(d)}
            digests = sorted(last)
            params = [digests, [last[d] for d in digests]]

            def work(conn: Connection[Any], params: list[Any] = params) -> set[str]:
                return {row[0] for row in conn.execute(sql, params).fetchall()}

            exists = self._run(work)
            found.extend(d for d, _ in batch if d in exists)
        return found

    def remove(self, digests: Sequence[str]) -> None:
        """Delete the entries of ``digests`` (absent ones are ignored), in one transaction."""
        chosen = sorted({d for d in digests if _text_fits(d)})
        if not chosen:
            return
        t = self._t

        def work(conn: Connection[Any]) -> None:
            with conn.transaction():
                for table in (t.entries, t.payloads, t.consumed):
                    conn.execute(f"DELETE FROM {table} WHERE digest = ANY(%s::text[])", [chosen])

        self._run(work)

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
            For a field or operator criteria or ``order`` do not know, or a ``$regex`` not
            searchable as Python does (:func:`postgres_pattern`), before any row.
        """
        t = self._t
        sql, params, wanted = select_statement(
            t.compiler, t.row, (t.entries, t.payloads), criteria, fields, order, limit
        )
        limit = int(limit) if limit and limit > 0 else 0
        return selected(self._rows(sql, params, limit), wanted, _document)

    def count(self, criteria: Criteria | None = None) -> int:
        """How many entries match ``criteria``."""
        where, params = self._t.compiler.where(criteria)
        sql = f"SELECT count(*) FROM {self._t.entries} e WHERE {where}"
        row = self._run(lambda conn: conn.execute(sql, params).fetchone())
        return int(row[0])

    def totals(self, criteria: Criteria | None = None) -> Totals:
        """Sums over the matching entries, in SQL (values not of their column's type count
        as missing)."""
        where, params = self._t.compiler.where(criteria)
        e = self._t.entries
        sums = (
            "SELECT count(*), count(*) FILTER (WHERE e.valid = FALSE), coalesce(sum(e.hits), 0), "
            "coalesce(sum(e.hits * e.duration), 0), coalesce(sum(e.files_size), 0), "
            f"min(e.created), max(e.created) FROM {e} e WHERE {where}"
        )
        groups = (
            f"SELECT e.function, count(*) FROM {e} e WHERE ({where}) AND e.function IS NOT NULL "
            "GROUP BY e.function ORDER BY count(*) DESC, e.function"
        )

        def work(conn: Connection[Any]) -> tuple[Any, list[Any]]:
            return conn.execute(sums, params).fetchone(), conn.execute(groups, params).fetchall()

        (entries, invalid, hits, saved, size, oldest, newest), functions = self._run(work)
        return Totals(
            entries=int(entries),
            invalid=int(invalid),
            hits=int(hits),
            time_saved=float(saved),
            files_bytes=int(size),
            functions={str(name): int(n) for name, n in functions},
            oldest=None if oldest is None else oldest.astimezone(UTC),
            newest=None if newest is None else newest.astimezone(UTC),
        )

    def consumers(self) -> Iterator[tuple[str, list[str]]]:
        """``(digest, consumed)`` of every entry that consumed others: the str items of its
        ``consumed`` list, sorted, each once; streamed by digest."""
        rows = self._rows(f"SELECT digest, upstream FROM {self._t.consumed} ORDER BY 1, 2", [])
        for digest, group in itertools.groupby(rows, key=lambda row: row[0]):
            yield digest, [upstream for _, upstream in group]

    # ---------------------------------------------------------------- coordination
    # PostgresStore's SQL on its own tables: a cache it kept keeps its claims and aliases

    def claim(self, name: str, owner: str, lease: float) -> str:
        """Take or renew the claim ``name`` for ``owner`` for ``lease`` seconds, atomically
        (when nobody holds it, its lease has expired on the database's clock, or ``owner``
        holds it); the holder after the call."""
        claims = self._t.claims
        sql = (
            f"WITH c AS (INSERT INTO {claims} AS x (name, owner, expires) "
            "VALUES (%(name)s, %(owner)s, clock_timestamp() + make_interval(secs => %(lease)s)) "
            "ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires = EXCLUDED.expires "
            "WHERE x.expires <= clock_timestamp() OR x.owner = EXCLUDED.owner "
            "RETURNING x.owner) "
            f"SELECT owner FROM c UNION ALL SELECT owner FROM {claims} "
            "WHERE name = %(name)s AND NOT EXISTS (SELECT 1 FROM c)"
        )
        params = {"name": name, "owner": owner, "lease": float(lease)}
        for _ in range(100):
            row = self._run(lambda conn: conn.execute(sql, params).fetchone())
            if row is not None:
                return str(row[0])
            # the holder committed after this statement's snapshot, or released meanwhile
        raise StoreUnavailableError(f"could not claim {name!r} in {self.name}")

    def release(self, name: str, owner: str) -> None:
        """Drop the claim ``name`` if ``owner`` holds it."""
        sql = f"DELETE FROM {self._t.claims} WHERE name = %s AND owner = %s"
        self._run(lambda conn: conn.execute(sql, [name, owner]))

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        """Record ``alias -> digest`` pairs (last writer wins), in one statement."""
        if not pairs:
            return
        aliases = sorted(pairs)
        sql = (
            f"INSERT INTO {self._t.aliases} (alias, digest) SELECT * FROM "
            "unnest(%b::text[], %b::text[]) ON CONFLICT (alias) DO UPDATE SET digest = "
            "EXCLUDED.digest"
        )
        params = [aliases, [pairs[a] for a in aliases]]
        self._run(lambda conn: conn.execute(sql, params))

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        """The digests of the recorded aliases among ``names``."""
        names = list(names)
        if not names:
            return {}
        sql = f"SELECT alias, digest FROM {self._t.aliases} WHERE alias = ANY(%b::text[])"
        rows = self._run(lambda conn: conn.execute(sql, [names]).fetchall())
        return {alias: digest for alias, digest in rows}
