"""SQLiteStore: a maggma Store kept in one SQLite file, the embedded default cache store.

Each collection is one table ``(key TEXT PRIMARY KEY, doc TEXT)``: ``key`` is the JSON
encoding of the document's key field (so ``1`` and ``"1"`` differ) and ``doc`` the whole
document as JSON. Mongo-style criteria are translated to SQL over ``json_extract``; the
few operators SQL cannot express are evaluated row by row in Python with mongomock's
matcher, inside the same SQL statement, so results stay exact and streamed.

Encoding of values JSON cannot hold (Mongo extended-JSON style, one reserved key each):

* ``datetime`` -> ``{"$date": "YYYY-MM-DDTHH:MM:SS.ffffffZ"}``, fixed width, UTC. Naive
  datetimes are taken as UTC; aware ones are converted to UTC. Reading gives naive UTC
  datetimes back, as pymongo and maggma's MemoryStore do.
* ``bytes`` -> ``{"$binary": "<base64>"}``.
* NaN and +/-infinity -> ``{"$numberDouble": "NaN" | "Infinity" | "-Infinity"}``.

Documents may therefore not contain the keys ``$date``, ``$binary`` or ``$numberDouble``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from maggma.core import StoreError
from pydash import get

from jobflow_cache.backends.sqlite_file import (
    NETWORK_FILE_SYSTEMS,
    decode_text,
    file_system_type,
    identity,
    sidecars_in_use,
)
from jobflow_cache.docstore import (  # one encoding and Mongo semantics for both stores
    _ARRAY,
    _BINARY,
    _BINDATA,
    _BOOL,
    _DATE,
    _DATETIME,
    _INT64_MAX,
    _INT64_MIN,
    _NULL,
    _NUMBER,
    _OBJECT,
    _STRING,
    NOTHING,
    UNREADABLE,
    DocStore,
    _add_distinct,
    _dumps,
    _encode,
    _field_operators,
    _format_datetime,
    _Fragment,
    _increment_key,
    _increment_paths,
    _joined,
    _key_literal,
    _loads,
    _negation,
    _NotPlainError,
    _orjson_default,
    _Page,
    _project,
    _regex_pattern,
    _row,
    _sort_key_function,
    _sorted_page,
    _split_path,
    _sql_sort_items,
    _sub_criteria,
    _to_storable,
    filter_applies,
    iter_key_candidates,
)
from jobflow_cache.docstore import _sanitize as _sanitize  # kept importable from here
from jobflow_cache.errors import StoreUnavailableError, warn

__all__ = ["SQLiteStore"]

logger = logging.getLogger(__name__)

_META_TABLE = "jobflow_cache_collections"
_ARRAYS_TABLE = "jobflow_cache_array_paths"
_FORMAT_VERSION = 1

# SQLite primary result codes that mean "the store cannot be used", not "bad request".
_UNAVAILABLE_CODES = frozenset({3, 5, 6, 8, 10, 11, 13, 14, 15, 26})
_UNAVAILABLE_WORDS = (
    "locked",
    "readonly",
    "read-only",
    "unable to open",
    "not a database",
    "disk",
    "malformed",
    "database or disk is full",
)

_FETCH_BATCH = 256
# Planner statistics: ANALYZE once a table reaches this many rows and again whenever it has
# doubled since; checked every _STATS_CHECK_EVERY write transactions of a process.
_STATS_MIN_ROWS = 1000
_STATS_CHECK_EVERY = 200

# Connections inherited over fork() are never used or closed in the child (SQLite forbids
# both); holding them here keeps their finalisers from running in the child.
_ABANDONED: list[Any] = []

# --------------------------------------------------------------------------- SQL helpers


def _quote_identifier(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """Quote an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _json_path(parts: list[str]) -> str:
    """Return the SQL literal of the SQLite JSON path for path components."""
    return _literal("$" + "".join(f'."{part}"' for part in parts))


def _x(parts: list[str]) -> str:
    """SQL expression: the value at a path (``json_extract``)."""
    return f"json_extract(doc, {_json_path(parts)})"


def _t(parts: list[str]) -> str:
    """SQL expression: the JSON type at a path (``json_type``, NULL when missing)."""
    return f"json_type(doc, {_json_path(parts)})"


def _b(parts: list[str]) -> str:
    """SQL expression: the BSON type class at a path; missing counts as null."""
    return (
        f"(CASE {_t(parts)} WHEN 'integer' THEN {_NUMBER} WHEN 'real' THEN {_NUMBER} "
        f"WHEN 'text' THEN {_STRING} WHEN 'object' THEN (CASE substr({_x(parts)}, 1, 9) "
        f"WHEN '{{\"{_DATE}\":' THEN {_DATETIME} WHEN '{{\"{_BINARY}' THEN {_BINDATA} "
        f"ELSE {_OBJECT} END) WHEN 'array' THEN {_ARRAY} WHEN 'true' THEN {_BOOL} "
        f"WHEN 'false' THEN {_BOOL} ELSE {_NULL} END)"
    )


def _and(fragments: list[_Fragment]) -> _Fragment:
    """Join fragments with AND."""
    return _joined(fragments, "AND", "1")


def _or(fragments: list[_Fragment]) -> _Fragment:
    """Join fragments with OR."""
    return _joined(fragments, "OR", "0")


def _not(fragment: _Fragment) -> _Fragment:
    """Negate a fragment, treating SQL NULL (unknown) as false first."""
    return f"(NOT ifnull({fragment[0]}, 0))", fragment[1]


def _sql_scalar(value: Any) -> tuple[int, Any] | None:
    """Return ``(type class, SQL value)`` for a value compared natively, else None."""
    if value is None:
        return _NULL, None
    if isinstance(value, bool):
        return _BOOL, int(value)
    if isinstance(value, int):
        return (_NUMBER, value) if _INT64_MIN <= value <= _INT64_MAX else None
    if isinstance(value, float):
        return (_NUMBER, value) if math.isfinite(value) else None
    if isinstance(value, str):
        return _STRING, value
    if isinstance(value, datetime):
        return _DATETIME, f'{{"{_DATE}":"{_format_datetime(value)}"}}'
    return None


@lru_cache(maxsize=256)
def _compile_regex(pattern: str) -> re.Pattern[str]:
    """Compile and cache a regular expression."""
    return re.compile(pattern)


def _sql_regexp(pattern: str, value: Any) -> int:
    """The SQL ``REGEXP`` function: 1 if the string value contains a match."""
    return int(isinstance(value, str) and _compile_regex(pattern).search(value) is not None)


# --------------------------------------------------------------------------- Python fallback


class _Matcher:
    """Criteria evaluated in Python for one SQL statement, with the first error raised."""

    __slots__ = ("__weakref__", "criteria", "error")

    def __init__(self, criteria: dict[str, Any]) -> None:
        self.criteria = criteria
        self.error: BaseException | None = None


_MATCHERS: weakref.WeakValueDictionary[int, _Matcher] = weakref.WeakValueDictionary()
_MATCHER_IDS = itertools.count(1)


def _sql_match(doc: str, token: int) -> int:
    """The SQL ``jfc_match`` function: mongomock's matcher on a decoded document."""
    matcher = _MATCHERS.get(token)
    if matcher is None or matcher.error is not None:
        return 0
    try:
        return int(bool(filter_applies(matcher.criteria, _row(doc, "", None))))
    except Exception as err:  # reported by _Compiled.check once the statement stops
        matcher.error = err
        return 0


class _Compiled:
    """A translated WHERE clause, its parameters and the matchers it relies on."""

    def __init__(
        self,
        where: str,
        params: list[Any],
        matchers: list[_Matcher],
        pinned: dict[str, int] | None = None,
    ) -> None:
        self.where = where
        self.params = params
        self.matchers = matchers  # strong references keep the tokens alive
        # fields whose type class every matching document shares (see _Translator.pinned)
        self.pinned = pinned or {}

    def check(self) -> None:
        """Raise the first error the Python fallback met while matching."""
        for matcher in self.matchers:
            if matcher.error is not None:
                raise ValueError(
                    f"cannot evaluate criteria {matcher.criteria!r}: {matcher.error}"
                ) from matcher.error


class _ArrayProbe:
    """Answers "has a document of the collection ever held an array at this path?".

    Paths are recorded in the array-path table by every write, in the same transaction,
    and never removed, so a positive answer stays true. Negative answers are re-checked
    by :meth:`stale` once a statement has started, inside that statement's snapshot.
    """

    def __init__(self, conn: sqlite3.Connection, collection: str, known: set[str]) -> None:
        self.conn = conn
        self.collection = collection
        self.known = known  # the process's cache of paths known to hold arrays
        self.answers: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        if path in self.known:
            return True
        if path not in self.answers:
            row = self.conn.execute(
                f"SELECT 1 FROM {_ARRAYS_TABLE} WHERE collection = ? AND path = ?",
                (self.collection, path),
            ).fetchone()
            self.answers[path] = row is not None
            if row is not None:
                self.known.add(path)
        return self.answers[path]

    def stale(self) -> bool:
        """Whether a path answered "no arrays" now has some (another process wrote)."""
        negatives = [path for path, answer in self.answers.items() if not answer]
        if not negatives:
            return False
        marks = ", ".join("?" * len(negatives))
        row = self.conn.execute(
            f"SELECT 1 FROM {_ARRAYS_TABLE} WHERE collection = ? AND path IN ({marks}) LIMIT 1",
            [self.collection, *negatives],
        ).fetchone()
        return row is not None


_Plan = tuple[str, list[Any], "_Compiled"]


class _Translator:
    """Translate Mongo criteria to SQL over ``json_extract`` (see ``SQLiteStore.query``).

    A positive condition on path ``a.b`` becomes exact SQL ``S`` for documents without
    arrays on the path, an expression an index on the field serves. Only if some
    document has ever held an array at ``a`` or ``a.b`` (``has_arrays``, recorded at
    write time) is it widened to ``S OR (a is array AND m) OR (a.b is array AND m)``,
    ``m`` being mongomock's matcher, so documents with arrays get Mongo's semantics.
    Negative operators are ``NOT`` of the exact positive form.
    """

    _COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}

    def __init__(self, key_field: str, has_arrays: Callable[[str], bool]) -> None:
        self.key_field = key_field
        self.has_arrays = has_arrays
        self.matchers: list[_Matcher] = []
        # path -> the one type class a top-level AND condition allows. Sorting on such a
        # path can skip its type-class term, which lets SQLite read the order from the
        # (type class, value) index instead of sorting (it misses that on its own).
        self.pinned: dict[str, int] = {}

    def _array_depths(self, parts: list[str], strict: bool = False) -> list[int]:
        """The prefix lengths of a path at which some document holds an array."""
        stop = len(parts) if strict else len(parts) + 1
        return [d for d in range(1, stop) if self.has_arrays(".".join(parts[:d]))]

    def compile(self, criteria: Mapping[str, Any] | None) -> _Compiled:
        """Translate criteria into a :class:`_Compiled` WHERE clause."""
        if criteria is None:
            criteria = {}
        if not isinstance(criteria, Mapping):
            raise TypeError(f"criteria must be a dict, not {type(criteria).__name__}")
        where, params = self._document(criteria, top=True)
        return _Compiled(where, params, self.matchers, self.pinned)

    def _python(self, criteria: dict[str, Any]) -> _Fragment:
        matcher = _Matcher(criteria)
        token = next(_MATCHER_IDS)
        _MATCHERS[token] = matcher
        self.matchers.append(matcher)
        return "jfc_match(doc, ?)", [token]

    def _document(self, criteria: Mapping[str, Any], top: bool = False) -> _Fragment:
        return _and([self._item(key, value, top) for key, value in criteria.items()])

    def _item(self, key: str, value: Any, top: bool = False) -> _Fragment:
        if key in ("$and", "$or", "$nor"):
            subs = [self._document(sub, top and key == "$and") for sub in _sub_criteria(key, value)]
            if key == "$and":
                return _and(subs)
            return _or(subs) if key == "$or" else _not(_or(subs))
        if not isinstance(key, str):
            raise TypeError(f"field names must be strings, not {key!r}")
        if key.startswith("$"):
            return self._python({key: value})
        parts = _split_path(key)
        if parts is None:
            return self._python({key: value})
        ops = _field_operators(value)
        if key == self.key_field:
            return self._key_field(key, parts, ops, top)
        return self._field(key, parts, ops, top)

    # -- the store key: the indexed ``key`` column answers equality exactly
    def _key_field(self, path: str, parts: list[str], ops: dict[str, Any], top: bool) -> _Fragment:
        fragments = []
        rest: dict[str, Any] = {}
        for op, value in ops.items():
            if op == "$eq":
                literal = _key_literal(value)
                fragments.append(("key = ?", [literal]) if literal is not None else ("0", []))
            elif op == "$ne":
                literal = _key_literal(value)
                fragments.append(("key <> ?", [literal]) if literal is not None else ("1", []))
            elif op in ("$in", "$nin") and isinstance(value, list | tuple):
                literals = [lit for lit in map(_key_literal, value) if lit is not None]
                if not literals:
                    fragments.append(("0", []) if op == "$in" else ("1", []))
                else:
                    marks = ", ".join("?" * len(literals))
                    negation = "NOT " if op == "$nin" else ""
                    fragments.append((f"key {negation}IN ({marks})", literals))
            elif op == "$exists":
                fragments.append(("1", []) if value else ("0", []))
            else:
                if op == "$regex" and "$options" not in ops:
                    bounds = _key_prefix_range(value)
                    if bounds is not None:  # a range on the primary key narrows, the regex decides
                        fragments.append(("(key >= ? AND key < ?)", list(bounds)))
                rest[op] = value
        if rest:
            fragments.append(self._field(path, parts, rest, top))
        return _and(fragments)

    # -- any other field
    def _field(self, path: str, parts: list[str], ops: dict[str, Any], top: bool) -> _Fragment:
        fragments: list[_Fragment] = []
        scalars: list[_Fragment] = []
        positive: dict[str, Any] = {}
        python: dict[str, Any] = {}
        for op, value in ops.items():
            if op == "$options":
                if "$regex" not in ops:
                    python[op] = value
                continue
            negated = _negation(op, value, "$not")  # an invalid $not: the fallback reports it
            if negated is not None:
                inner = self._positive(path, parts, negated)
                if inner is None:
                    python[op] = value
                else:
                    fragments.append(_not(inner))
                continue
            scalar = self._scalar(parts, op, value, ops.get("$options"))
            target = python if scalar is None else positive
            target[op] = value
            if op == "$regex" and "$options" in ops:
                target["$options"] = ops["$options"]
            if scalar is not None:
                scalars.append(scalar)
        if scalars:
            fragments.append(self._guarded(path, parts, scalars, positive))
            classes = {_op_class(op, value) for op, value in positive.items()} - {0}
            pinned = classes.pop() if len(classes) == 1 else None
            if top and pinned is not None and not self._array_depths(parts):
                self.pinned[path] = pinned
        if python:
            fragments.append(self._python({path: python}))
        return _and(fragments)

    def _positive(self, path: str, parts: list[str], ops: dict[str, Any]) -> _Fragment | None:
        """Exact SQL for positive operators, or None if one cannot be expressed."""
        scalars = []
        for op, value in ops.items():
            if op == "$options":
                if "$regex" not in ops:
                    return None
                continue
            scalar = self._scalar(parts, op, value, ops.get("$options"))
            if scalar is None:
                return None
            scalars.append(scalar)
        return self._guarded(path, parts, scalars, ops)

    def _guarded(
        self, path: str, parts: list[str], scalars: list[_Fragment], ops: dict[str, Any]
    ) -> _Fragment:
        """Combine exact scalar SQL with the Python matcher for documents holding arrays."""
        depths = self._array_depths(parts)
        if not depths:
            return _and(scalars)
        sql, params = self._python({path: ops})
        token = params[0]
        terms = [_and(scalars)]
        for depth in depths:
            if depth == len(parts):
                terms.append((f"({_b(parts)} = {_ARRAY} AND {sql})", [token]))
            else:
                terms.append((f"({_t(parts[:depth])} = 'array' AND {sql})", [token]))
        return _or(terms)

    def _scalar(self, parts: list[str], op: str, value: Any, options: Any) -> _Fragment | None:
        """Exact SQL for one positive operator on array-free paths, or None."""
        if op == "$eq":
            return self._equals(parts, value)
        if op == "$in":
            if not isinstance(value, list | tuple):
                return None
            alternatives = self._in(parts, value)
            return None if alternatives is None else _or(alternatives)
        if op in self._COMPARISONS:
            scalar = _sql_scalar(value)
            if scalar is None or scalar[0] == _NULL:
                return None
            type_class, sql_value = scalar
            return f"({_b(parts)} = {type_class} AND {_x(parts)} {self._COMPARISONS[op]} ?)", [
                sql_value
            ]
        if op == "$exists":
            return (f"({_t(parts)} IS NOT NULL)", []) if value else None
        if op == "$regex":
            pattern = _regex_pattern(value, options)
            if pattern is None:
                return None
            try:
                _compile_regex(pattern)
            except re.error:
                return None  # the fallback reports the error clearly
            return f"({_b(parts)} = {_STRING} AND {_x(parts)} REGEXP ?)", [pattern]
        return None

    def _equals(self, parts: list[str], value: Any) -> _Fragment | None:
        scalar = _sql_scalar(value)
        if scalar is None:
            return None
        type_class, sql_value = scalar
        if type_class == _NULL:
            # missing or null, unless an array on the way leaves it to the matcher
            # IS, not =: a missing parent gives NULL, and NOT NULL would drop the row
            prefixes = [f"{_t(parts[:d])} IS 'array'" for d in self._array_depths(parts, True)]
            no_arrays = f" AND NOT ({' OR '.join(prefixes)})" if prefixes else ""
            return f"({_b(parts)} = {_NULL}{no_arrays})", []
        return f"({_b(parts)} = {type_class} AND {_x(parts)} = ?)", [sql_value]

    def _in(self, parts: list[str], values: Iterable[Any]) -> list[_Fragment] | None:
        by_class: dict[int, list[Any]] = {}
        alternatives = []
        for value in values:
            scalar = _sql_scalar(value)
            if scalar is None:
                return None
            if scalar[0] == _NULL:
                null = self._equals(parts, None)
                assert null is not None
                alternatives.append(null)
            else:
                by_class.setdefault(scalar[0], []).append(scalar[1])
        for type_class, sql_values in by_class.items():
            marks = ", ".join("?" * len(sql_values))
            alternatives.append(
                (f"({_b(parts)} = {type_class} AND {_x(parts)} IN ({marks}))", sql_values)
            )
        return alternatives


def _op_class(op: str, value: Any) -> int | None:
    """The type class a natively translated operator requires (0: any, None: unknown)."""
    if op in ("$exists", "$options"):
        return 0
    if op == "$regex":
        return _STRING
    values = value if op == "$in" else [value]
    classes = {scalar[0] if scalar else None for scalar in map(_sql_scalar, values)}
    return classes.pop() if len(classes) == 1 else None


_PREFIX_RE = re.compile(r"\^([0-9A-Za-z_]+)")


def _key_prefix_range(regex: Any) -> tuple[str, str] | None:
    """``key`` column bounds every str key matched by an anchored regex lies within, or None.

    Only for ``^`` followed by letters, digits or ``_`` (a digest prefix, say), and no
    alternation: such characters are their own JSON encoding, so every matching key's
    column text starts with ``"`` and that literal prefix. A quantifier right after the
    literal makes its last character optional, so that one is left out of the range.

    Examples
    --------
    >>> _key_prefix_range("^3f2c")
    ('"3f2c', '"3f2d')
    >>> _key_prefix_range("^ab?"), _key_prefix_range("^a|b")
    (('"a', '"b'), None)
    """
    if not isinstance(regex, str) or "|" in regex:
        return None
    match = _PREFIX_RE.match(regex)
    if match is None:
        return None
    literal = match.group(1)
    if regex[match.end() : match.end() + 1] in ("*", "?", "{"):
        literal = literal[:-1]
    if not literal:
        return None
    return f'"{literal}', f'"{literal[:-1]}{chr(ord(literal[-1]) + 1)}'


# --------------------------------------------------------------------------- projection


_FIELD_NAME = re.compile(r"[A-Za-z0-9_@-]+")


def _top_level_fields(projection: tuple[dict, bool] | None) -> list[str] | None:
    """The fields of an inclusion projection of plain top-level names, else None.

    Such a projection is answered by SQLite's ``->`` (3.38+), which gives a field's JSON text,
    or NULL when the field is missing, so large documents are never decoded whole.
    """
    if projection is None or not projection[1] or sqlite3.sqlite_version_info < (3, 38):
        return None
    spec = projection[0]
    if not all(rule is True and _FIELD_NAME.fullmatch(name) for name, rule in spec.items()):
        return None
    return list(spec)


# --------------------------------------------------------------------------- errors


def _is_unavailable(err: sqlite3.Error) -> bool:
    """Whether a SQLite error means the store cannot be used (locked, unreadable...)."""
    code = getattr(err, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _UNAVAILABLE_CODES
    message = str(err).lower()
    return any(word in message for word in _UNAVAILABLE_WORDS)


class _Connection(sqlite3.Connection):
    """A SQLite connection that can be weakly referenced."""


class _IncrementSQL(NamedTuple):
    """The statements of an increment, for given field names (incremented, then set)."""

    paths: tuple[str, ...]
    depths: tuple[int, ...]  # number of components of each path
    increments: int  # the first this many paths are incremented, the others set
    select: str  # json_type of each path and its parents, then the current numbers
    update: str  # json_set of every path
    # one statement doing it all in SQL, when every path is top-level: only for integer
    # amounts and integer (or missing) fields, whose SQL sum is exact (None: no such statement)
    direct: str | None


#: Integers whose sums SQLite computes exactly (no overflow to REAL).
_EXACT_SUMS = 2**62


class _IncrementPlan(NamedTuple):
    """A checked :meth:`SQLiteStore.increment`: its row, values and SQL, ready to apply."""

    row_key: str
    amounts: list[int | float]
    set_texts: list[str]
    sql: _IncrementSQL
    arrays: set[str]


class _ProcessState:
    """The connections of one process: a locked writer and one reader per thread.

    Readers are held strongly only by their thread (and by open cursors), so a finished
    thread's connection is closed when nothing uses it any more.
    """

    def __init__(self, writer: sqlite3.Connection, key: str) -> None:
        self.pid = os.getpid()
        self.key = key
        self.writer = writer
        self.lock = threading.RLock()
        self.local = threading.local()
        self.readers: weakref.WeakSet[sqlite3.Connection] = weakref.WeakSet()
        self.writes = 0  # write transactions since the statistics were last checked
        self.known_arrays: set[str] = set()  # paths known to hold arrays in some document
        self.identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened

    def close(self) -> None:
        with self.lock:
            for conn in [self.writer, *self.readers]:
                try:
                    conn.close()
                except sqlite3.Error:  # pragma: no cover - closing is best effort
                    logger.debug("error closing a SQLite connection", exc_info=True)
            self.readers.clear()


# --------------------------------------------------------------------------- the store


class SQLiteStore(DocStore):
    """A maggma Store kept in one SQLite file: no server, safe across processes.

    The database runs in WAL mode, so readers never block the writer; every write is one
    ``BEGIN IMMEDIATE`` transaction that waits up to ``timeout`` seconds for the lock.
    Each process keeps one writer connection (shared by its threads under a lock) and
    one reader connection per thread, and reconnects by itself after ``fork()``.

    Queries take MongoDB criteria. Translated to SQL (indexable with
    :meth:`ensure_index`): equality (dotted paths, ``None`` = null or missing),
    ``$eq $ne $gt $gte $lt $lte $in $nin $exists $regex $not $and $or $nor``, with
    Mongo's type bracketing (``1`` never equals ``True``, strings never compare with
    numbers). Everything else (``$elemMatch``, ``$size``, ``$all``, ``$type``, ``$expr``,
    equality with a sub-document or list, numeric path components, ...) is matched by
    mongomock in Python inside the same statement: exact, just slower. Every write
    records the paths at which documents hold arrays; conditions on such a path also ask
    mongomock about documents with an array there, so ``{"tags": "red"}`` matches
    ``{"tags": ["red", "blue"]}`` as in MongoDB, while array-free paths stay pure SQL.

    Differences from MongoStore: documents have no ``_id``; one document per key value
    (the key must be a str or int); datetimes keep microseconds; sorting on a field that
    holds arrays or sub-documents orders them after scalars by their JSON text rather
    than by element; a unique index lets several documents lack the field. Planner
    statistics are refreshed (``ANALYZE``) whenever a table has doubled in size.

    As a JobStore's ``docs_store`` (``key: uuid``) it keeps, like maggma's ``JSONStore``
    once reloaded, one document per uuid: a job replaced at run time (``Response(replace=)``)
    keeps only its last ``index``. Use a ``MongoStore`` (or a ``MemoryStore``) where the
    earlier documents of replaced jobs matter.

    Parameters
    ----------
    path
        The SQLite file; ``~`` is expanded and missing parent folders are created.
    collection_name
        The table holding the documents; several collections may share a file.
    key
        The field identifying a document (a str or int in every document).
    last_updated_field
        The field holding each document's last update time.
    timeout
        Seconds a write waits for another process's write to finish.
    **kwargs
        Passed on to :class:`maggma.core.Store` (``last_updated_type``, ``validator``).

    Examples
    --------
    >>> import tempfile
    >>> from datetime import datetime
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     with SQLiteStore(f"{tmp}/cache.db", key="digest") as store:
    ...         store.update([{"digest": "a1", "hits": 0, "when": datetime(2024, 5, 1)}])
    ...         store.increment("a1", {"hits": 1})
    ...         store.query_one({"when": {"$gte": datetime(2024, 1, 1)}}, ["hits"])
    True
    {'hits': 1}
    """

    def __init__(
        self,
        path: str | Path,
        collection_name: str = "cache",
        key: str = "task_id",
        last_updated_field: str = "last_updated",
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> None:
        path = os.fspath(path)
        if not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError(f"SQLiteStore needs a file path, got {path!r}")
        if not isinstance(collection_name, str) or not collection_name:
            raise ValueError("collection_name must be a non-empty string")
        if collection_name.lower().startswith("sqlite_") or collection_name in (
            _META_TABLE,
            _ARRAYS_TABLE,
        ):
            raise ValueError(f"collection_name {collection_name!r} is reserved")
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        self.path = path
        # resolved once: a job that runs in its own folder must not open another file
        self._absolute = os.path.abspath(os.path.expanduser(path))
        self.collection_name = collection_name
        self.timeout = float(timeout)
        self.kwargs = kwargs
        self._state: _ProcessState | None = None
        # why the store cannot be used since its file was replaced mid-use (see _current_file)
        self._unusable: str | None = None
        self._increment_statements: dict[tuple[tuple[str, ...], ...], _IncrementSQL] = {}
        self._key_statements: dict[tuple[str, ...], str] = {}  # query_key's, by leave_out
        super().__init__(key=key, last_updated_field=last_updated_field, **kwargs)

    # ---------------------------------------------------------------- identity

    @property
    def _file(self) -> str:
        """The absolute path of the database file (a relative path is taken from the working
        directory at construction)."""
        return self._absolute

    @property
    def _table(self) -> str:
        return _quote_identifier(self.collection_name)

    @property
    def name(self) -> str:
        """A string naming this data source: ``sqlite://<absolute path>/<collection>``."""
        return f"sqlite://{self._file}/{self.collection_name}"

    def __eq__(self, other: object) -> bool:
        """Stores are equal when they use the same file, collection and key."""
        if not isinstance(other, SQLiteStore):
            return False
        return (self._file, self.collection_name, self.key) == (
            other._file,
            other.collection_name,
            other.key,
        )

    def __hash__(self) -> int:
        """Hash consistent with :meth:`__eq__`."""
        return hash((self._file, self.collection_name, self.key))

    def __repr__(self) -> str:
        """Show the file, collection and key."""
        return (
            f"SQLiteStore(path={self.path!r}, collection_name={self.collection_name!r}, "
            f"key={self.key!r})"
        )

    # ---------------------------------------------------------------- connections

    def connect(self, force_reset: bool = False) -> None:
        """Open the file (creating it, its folder and the table as needed).

        Parameters
        ----------
        force_reset
            Reopen the connections even if already connected.

        Raises
        ------
        StoreUnavailableError
            If the file cannot be opened or created, is not a SQLite database, or holds
            this collection under a different key field.
        """
        state = self._state
        if state is not None and state.pid == os.getpid() and not force_reset:
            return
        self._unusable = None
        if state is not None:
            if state.pid == os.getpid():
                state.close()
            else:
                _ABANDONED.append(state)
            self._state = None
        self._state = self._open()

    def close(self) -> None:
        """Close this process's connections; calling it twice is harmless."""
        state, self._state = self._state, None
        if state is None:
            return
        if state.pid == os.getpid():
            state.close()
        else:
            _ABANDONED.append(state)

    @property
    def _collection(self) -> sqlite3.Connection:
        """The calling thread's SQLite connection.

        Raises
        ------
        StoreError
            If the store is not connected.
        """
        return self._reader()

    def _open(self) -> _ProcessState:
        file = self._file
        try:
            Path(file).parent.mkdir(parents=True, exist_ok=True)
            writer = self._new_connection(file)
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
                logger.warning(
                    "%s: journal_mode is %s, not WAL; writers will block readers", file, mode
                )
            self._create_schema(writer)
            self._refresh_statistics(writer)
        except sqlite3.Error as err:
            writer.close()
            raise StoreUnavailableError(
                f"cannot use {file} as a SQLite store (is it a writable SQLite database?): {err}"
            ) from err
        except BaseException:
            writer.close()
            raise
        logger.debug("connected to %s", self.name)
        state = _ProcessState(writer, self.key)
        state.identity = identity(file)
        return state

    def _new_connection(self, file: str) -> sqlite3.Connection:
        conn = sqlite3.connect(
            file,
            timeout=self.timeout,
            isolation_level=None,
            check_same_thread=False,
            factory=_Connection,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.create_function("regexp", 2, _sql_regexp, deterministic=True)
            conn.create_function("jfc_match", 2, _sql_match)
            # a row holding bytes that are not UTF-8 (bit rot, a hand-edited table) reads as
            # an unreadable document instead of failing every statement that meets it
            conn.text_factory = decode_text
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_META_TABLE} (collection TEXT PRIMARY KEY, "
                "key_field TEXT NOT NULL, format INTEGER NOT NULL, "
                "analyzed_rows INTEGER NOT NULL DEFAULT 0)"
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {_ARRAYS_TABLE} (collection TEXT NOT NULL, "
                "path TEXT NOT NULL, PRIMARY KEY (collection, path)) WITHOUT ROWID"
            )
            conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._table} "
                "(key TEXT PRIMARY KEY, doc TEXT NOT NULL)"
            )
            self._side_tables(conn)  # claims and aliases, made once here, not on every write
            conn.execute(
                f"INSERT INTO {_META_TABLE} (collection, key_field, format) VALUES (?, ?, ?) "
                "ON CONFLICT (collection) DO NOTHING",
                (self.collection_name, self.key, _FORMAT_VERSION),
            )
            key_field, version = conn.execute(
                f"SELECT key_field, format FROM {_META_TABLE} WHERE collection = ?",
                (self.collection_name,),
            ).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if key_field != self.key or version != _FORMAT_VERSION:
            conn.close()
            raise StoreUnavailableError(
                f"collection {self.collection_name!r} in {self._file} uses key field "
                f"{key_field!r} (format {version}); this store was given key {self.key!r} "
                f"(format {_FORMAT_VERSION})"
            )

    def _state_or_raise(self) -> _ProcessState:
        state = self._state
        if state is None and self._unusable is not None:
            raise StoreUnavailableError(self._unusable)
        if state is None:
            raise StoreError("SQLiteStore is not connected: call connect() first")
        if state.pid != os.getpid():  # forked: never touch the parent's connections
            _ABANDONED.append(state)
            self._state = None
            state = self._state = self._open()
        if state.key != self.key:
            raise StoreError(
                f"the key field changed from {state.key!r} to {self.key!r} after connecting; "
                "call connect(force_reset=True)"
            )
        return state

    def _reader(self) -> sqlite3.Connection:
        state = self._state_or_raise()
        conn = getattr(state.local, "conn", None)
        if conn is None:
            try:
                conn = self._new_connection(self._file)
            except sqlite3.Error as err:
                raise StoreUnavailableError(f"cannot open {self._file}: {err}") from err
            state.local.conn = conn
            with state.lock:
                state.readers.add(conn)
        return conn

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn SQLite errors meaning "store unusable" into StoreUnavailableError."""
        try:
            yield
        except sqlite3.Error as err:
            if _is_unavailable(err):
                raise StoreUnavailableError(f"SQLite store {self.name}: {err}") from err
            raise

    def _current_file(self, state: _ProcessState) -> _ProcessState:
        """``state``, or new connections when the file at the path is no longer the one
        ``state`` opened (deleted, or replaced by another file, while in use).

        Writing on would put every later document into a file no one can open again
        (SQLite writes to an unlinked file without an error), so the store says so once
        and reopens the path: a deleted store is made again (the rest of the run is
        recorded there), a replaced one is used as it is (or, when it is no store, the
        error says so and the caller runs uncached). One ``stat`` per write transaction.
        """
        if state.identity is None or identity(self._file) == state.identity:
            return state
        with _REOPEN_LOCK:
            if self._state is not state:  # another thread reopened it meanwhile
                return self._state_or_raise()
            what = "deleted" if not os.path.exists(self._file) else "replaced by another file"
            # the old file's -wal and -shm are still at the path (SQLite leaves them when its
            # file has moved): a connection to the new file would take the old file's pages
            # from them. Removed once this process's connections are closed, unless another
            # process has already put fresh ones there (other inodes than the ones in use)
            stale = sidecars_in_use(self._file)
            self._state = None
            state.close()
            for sidecar in (f"{self._file}-wal", f"{self._file}-shm"):
                if identity(sidecar) in stale:
                    with contextlib.suppress(OSError):
                        os.unlink(sidecar)
            try:
                self._state = self._open()
            except StoreUnavailableError as err:
                self._unusable = (
                    f"the SQLite store {self._file} was {what} while in use, and what is "
                    f"there now cannot be used: {err}"
                )
                raise StoreUnavailableError(self._unusable) from err
        warn(
            f"jobflow-cache: the SQLite store {self._file} was {what} while in use; "
            "reopened it, so entries from here on go to the file now at that path (those "
            "written before went with the old file)",
            stacklevel=6,
        )
        return self._state

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` write transaction on the process's writer connection."""
        state = self._current_file(self._state_or_raise())
        with state.lock, self._errors():
            conn = state.writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            state.writes += 1
            if state.writes >= _STATS_CHECK_EVERY:
                state.writes = 0
                self._refresh_statistics(conn)

    def _refresh_statistics(self, conn: sqlite3.Connection, force: bool = False) -> None:
        """Run ANALYZE when the table has doubled since its statistics were gathered.

        Without statistics SQLite guesses, and e.g. answers a wide date range sorted on
        the same indexed field by sorting most of the table instead of walking the index.
        Exact statistics cost about 1 ms per 1,000 rows; doubling keeps that amortised.
        """
        table, name = self._table, self.collection_name
        try:
            size = conn.execute(f"SELECT ifnull(max(rowid), 0) FROM {table}").fetchone()[0]
            if size < _STATS_MIN_ROWS:
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                analyzed = conn.execute(
                    f"SELECT analyzed_rows FROM {_META_TABLE} WHERE collection = ?", (name,)
                ).fetchone()[0]
                if force or size >= 2 * analyzed:
                    conn.execute(f"ANALYZE {table}")
                    conn.execute(
                        f"UPDATE {_META_TABLE} SET analyzed_rows = ? WHERE collection = ?",
                        (size, name),
                    )
                    logger.debug("analyzed %s at %d rows", self.name, size)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:  # statistics only speed queries up: never fail on them
            logger.warning("could not update the query statistics of %s: %s", self.name, err)

    def _probe(self, conn: sqlite3.Connection) -> _ArrayProbe:
        return _ArrayProbe(conn, self.collection_name, self._state_or_raise().known_arrays)

    def _compile(
        self, criteria: Mapping[str, Any] | None, probe: Callable[[str], bool]
    ) -> _Compiled:
        return _Translator(self.key, probe).compile(criteria)

    def _record_arrays(self, conn: sqlite3.Connection, paths: set[str]) -> set[str]:
        """Record array paths in the current write transaction; return the new ones."""
        new = paths - self._state_or_raise().known_arrays
        if new:
            conn.executemany(
                f"INSERT INTO {_ARRAYS_TABLE} VALUES (?, ?) ON CONFLICT DO NOTHING",
                [(self.collection_name, path) for path in sorted(new)],
            )
        return new

    # ---------------------------------------------------------------- reading

    def _query(self, criteria: dict | None, page: _Page) -> Iterator[dict]:
        """:meth:`query` with its projection, sort, skip and limit parsed and checked."""
        projection, items, skip, limit = page
        if all(_split_path(field) is not None for field, _ in items):
            fields = _top_level_fields(projection)
            select = "key, " + (
                "doc"
                if fields is None
                else "substr(doc, 1, 1), " + ", ".join(f"doc -> {_json_path([f])}" for f in fields)
            )

            def build(probe: _ArrayProbe) -> _Plan:
                compiled = self._compile(criteria, probe)
                order = self._order_by(items, compiled.pinned)
                sql = (
                    f"SELECT {select} FROM {self._table} WHERE {compiled.where}{order} "
                    "LIMIT ? OFFSET ?"
                )
                return sql, [*compiled.params, limit or -1, skip], compiled

            if fields is not None:  # SQLite extracts the fields: no whole document decoded
                docs = self._stream_fields(self._read(build), fields, self.key)
            else:
                docs = self._stream(self._read(build), projection, self.key)
            return self._json_tolerant(docs, criteria, page)
        return self._python_sorted(criteria, page)

    def _json_tolerant(
        self, docs: Iterator[dict], criteria: dict | None, page: _Page
    ) -> Generator[dict, None, None]:
        """``docs``; if SQLite meets a row whose JSON it cannot parse (bit rot: its JSON
        functions then fail the statement), the rest of the page read in Python instead."""
        done = 0
        try:
            for doc in docs:
                yield doc
                done += 1
        except sqlite3.OperationalError as err:
            if "JSON" not in str(err):
                raise
            projection, items, skip, limit = page
            found = self._all_in_python(criteria, err)
            for field, direction in reversed(items):
                found.sort(key=_sort_key_function(field), reverse=direction < 0)
            for doc in found[skip : skip + limit if limit else None][done:]:
                yield doc if projection is None or UNREADABLE in doc else _project(doc, *projection)

    def _all_in_python(self, criteria: dict | None, err: Exception) -> list[dict]:
        """Every document matching ``criteria``, read whole and matched by mongomock: the
        way round a row whose JSON SQLite cannot parse (it comes as a stand-in)."""
        logger.warning("%s holds a damaged row (%s): read in Python", self.name, err)
        conn = self._reader()
        with self._errors():
            rows = conn.execute(f"SELECT key, doc FROM {self._table} ORDER BY rowid").fetchall()
        docs = self._stream(iter(rows), None, self.key)
        return [doc for doc in docs if not criteria or filter_applies(criteria, doc)]

    @staticmethod
    def _order_by(items: list[tuple[str, int]], pinned: Mapping[str, int] | None = None) -> str:
        """ORDER BY type class then value per field; ties in insertion order."""
        if not items:
            return ""
        terms = []
        for field, parts, word in _sql_sort_items(items):
            if not pinned or field not in pinned:
                terms.append(f"{_b(parts)} {word}")
            terms.append(f"{_x(parts)} {word}")
        return " ORDER BY " + ", ".join([*terms, "rowid ASC"])

    def _read(self, build: Callable[[_ArrayProbe], _Plan]) -> Generator[tuple, None, None]:
        """Plan a read now (so bad criteria raise at once) and stream its rows later."""
        conn = self._reader()
        probe = self._probe(conn)
        with self._errors():
            plan = build(probe)
        return self._rows(conn, build, probe, plan)

    def _rows(
        self,
        conn: sqlite3.Connection,
        build: Callable[[_ArrayProbe], _Plan],
        probe: _ArrayProbe,
        plan: _Plan,
    ) -> Generator[tuple, None, None]:
        """Run a planned statement on a reader connection and stream its rows.

        Once the statement has started, its snapshot is fixed; the array paths the plan
        relied on are re-checked in that snapshot and the plan rebuilt if another
        process has since stored an array where none was.
        """
        while True:
            sql, params, compiled = plan
            with self._errors():
                cursor = conn.execute(sql, params)
                stale = probe.stale()
            if not stale:
                break
            cursor.close()
            probe = self._probe(conn)
            with self._errors():
                plan = build(probe)
        try:
            while True:
                with self._errors():
                    rows = cursor.fetchmany(_FETCH_BATCH)
                compiled.check()
                if not rows:
                    return
                yield from rows
        finally:
            cursor.close()

    @staticmethod
    def _stream(
        rows: Iterator[tuple], projection: tuple[dict, bool] | None, key_field: str
    ) -> Generator[dict, None, None]:
        """Documents of ``(key, doc)`` rows; a row that cannot be read comes as a stand-in
        (see :func:`~jobflow_cache.docstore.unreadable_reason`), never as an exception."""
        for key, text in rows:
            doc = _row(text, key_field, _key_value(key))
            if projection is None or UNREADABLE in doc:
                yield doc
            else:
                yield _project(doc, *projection)

    @staticmethod
    def _stream_fields(
        rows: Iterator[tuple], fields: list[str], key_field: str
    ) -> Generator[dict, None, None]:
        for key, first, *texts in rows:
            if first != "{":  # not a JSON object: no fields to pick
                kind = _FIRST_CHARACTER.get(first, "number")
                yield {key_field: _key_value(key), UNREADABLE: f"the stored row is a JSON {kind}"}
                continue
            try:
                yield {
                    field: _loads(text) for field, text in zip(fields, texts) if text is not None
                }
            except (ValueError, TypeError) as err:  # invalid UTF-8 in a field
                first = str(err).splitlines()[0]
                if "surrogates not allowed" in first:
                    first = "invalid UTF-8"
                yield {key_field: _key_value(key), UNREADABLE: f"a field does not decode ({first})"}

    def _python_sorted(self, criteria: dict | None, page: _Page) -> Iterator[dict]:
        """Sort in Python (mongomock's sort keys) when a sort path is not SQL-addressable."""

        def build(probe: _ArrayProbe) -> _Plan:
            compiled = self._compile(criteria, probe)
            sql = f"SELECT key, doc FROM {self._table} WHERE {compiled.where} ORDER BY rowid"
            return sql, compiled.params, compiled

        rows = self._read(build)

        def sorted_docs() -> Iterator[dict]:
            yield from _sorted_page(list(self._stream(rows, None, self.key)), page)

        return sorted_docs()

    def count(self, criteria: dict | None = None, hint: dict | None = None) -> int:
        """Count the documents matching Mongo criteria (``hint`` is accepted and ignored)."""

        def build(probe: _ArrayProbe) -> _Plan:
            compiled = self._compile(criteria, probe)
            return (
                f"SELECT count(*) FROM {self._table} WHERE {compiled.where}",
                compiled.params,
                compiled,
            )

        rows = self._read(build)
        try:
            return int(next(rows)[0])
        except sqlite3.OperationalError as err:  # a row's JSON is damaged
            if "JSON" not in str(err):
                raise
            return len(self._all_in_python(criteria, err))
        finally:
            rows.close()

    def totals(
        self, terms: Mapping[str, Iterable[str]], criteria: dict | None = None
    ) -> dict[str, float]:
        """Sums over the matching documents, in one scan, of products of numeric fields.

        Parameters
        ----------
        terms
            Name -> fields: ``{"hits": ["hits"], "saved": ["hits", "duration"]}`` sums
            ``hits`` and ``hits * duration``; no fields counts the documents. A number is
            itself, ``true``/``false`` are 1/0; anything else (missing, null, a string, an
            array) makes the product 0.
        criteria
            MongoDB filter restricting the documents.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.update([{"task_id": i, "n": i, "x": 0.5, "ok": i > 1} for i in range(4)])
        ...     store.totals({"docs": [], "n": ["n"], "nx": ["n", "x"], "ok": ["ok"]})
        {'docs': 4.0, 'n': 6.0, 'nx': 3.0, 'ok': 2.0}
        """
        names = list(terms)
        products = []
        for name in names:
            factors = []
            for field in terms[name]:
                parts = _split_path(field)
                if parts is None:
                    raise ValueError(f"cannot total the field {field!r}")
                factors.append(
                    f"(CASE {_t(parts)} WHEN 'integer' THEN {_x(parts)} WHEN 'real' THEN "
                    f"{_x(parts)} WHEN 'true' THEN 1 ELSE 0 END)"
                )
            products.append(f"total({' * '.join(factors) or '1'})")

        def build(probe: _ArrayProbe) -> _Plan:
            compiled = self._compile(criteria, probe)
            sql = f"SELECT {', '.join(products) or '0'} FROM {self._table} WHERE {compiled.where}"
            return sql, compiled.params, compiled

        rows = self._read(build)
        try:
            return dict(zip(names, map(float, next(rows))))
        except sqlite3.OperationalError as err:  # a row's JSON is damaged
            if "JSON" not in str(err):
                raise
            sums = dict.fromkeys(names, 0.0)
            for doc in self._all_in_python(criteria, err):
                for name in names:
                    product = 1.0
                    for field in terms[name]:
                        value = get(doc, field)
                        ok = isinstance(value, int | float) and math.isfinite(value)
                        product *= float(value) if ok else 0.0
                    sums[name] += product
            return sums
        finally:
            rows.close()

    def value_counts(self, field: str, criteria: dict | None = None) -> list[tuple[Any, int]]:
        """How many matching documents hold each value of a field, most frequent first.

        Answered from the field's index (see :meth:`ensure_index`) when it has one. Unlike
        :meth:`distinct`, an array counts as one value (it is not unwound) and documents
        lacking the field count under ``None``.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.update([{"task_id": i, "f": "ab"[i % 3 == 0]} for i in range(5)])
        ...     store.value_counts("f")
        [('a', 3), ('b', 2)]
        """
        parts = _split_path(field)
        if parts is None:
            raise ValueError(f"cannot count the values of {field!r}")

        def build(probe: _ArrayProbe) -> _Plan:
            compiled = self._compile(criteria, probe)
            sql = (
                f"SELECT {_b(parts)}, {_x(parts)}, count(*) FROM {self._table} "
                f"WHERE {compiled.where} GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2"
            )
            return sql, compiled.params, compiled

        try:
            rows = list(self._read(build))
        except sqlite3.OperationalError as err:  # a row's JSON is damaged
            if "JSON" not in str(err):
                raise
            found: dict[str, list[Any]] = {}
            for doc in self._all_in_python(criteria, err):
                value = get(doc, field)
                slot = found.setdefault(_dumps(value), [value, 0])
                slot[1] += 1
            return sorted(((v, n) for v, n in found.values()), key=lambda vn: -vn[1])
        counts = []
        for type_class, raw, n in rows:
            if type_class == _NULL:
                value = None
            elif type_class == _BOOL:
                value = bool(raw)
            elif type_class in (_NUMBER, _STRING):
                value = _shown(raw)
            else:
                value = _loads_or_text(raw)
            counts.append((value, int(n)))
        return counts

    def distinct(self, field: str, criteria: dict | None = None, all_exist: bool = False) -> list:
        """Return the distinct values of a field, array values unwound, as MongoDB does.

        Parameters
        ----------
        field
            The (dotted) field.
        criteria
            MongoDB filter restricting the documents.
        all_exist
            Accepted for compatibility with :meth:`maggma.core.Store.distinct`; ignored.

        Returns
        -------
        list
            The values, ``None`` included when a document holds null; like MongoDB's,
            in no particular order (but 1 and 1.0 count once, True and 1 twice).
        """
        parts = _split_path(field)
        table = self._table

        def build(probe: _ArrayProbe) -> _Plan:
            compiled = self._compile(criteria, probe)
            where, params = compiled.where, compiled.params
            if field == self.key:
                sql = f"SELECT 0, 'key', key FROM {table} WHERE {where} ORDER BY rowid"
                return sql, params, compiled
            if parts is None:  # numeric components etc.: resolve every document in Python
                return f"SELECT 1, NULL, doc FROM {table} WHERE {where}", params, compiled
            in_sql = (
                f"SELECT 0, {_t(parts)}, {_x(parts)} FROM {table} WHERE ({where}) "
                f"AND {_t(parts)} IS NOT NULL"
            )
            depths = [d for d in range(1, len(parts)) if probe(".".join(parts[:d]))]
            if not depths:
                return f"{in_sql} GROUP BY 2, 3", params, compiled
            # documents with an array above the field: resolve them in Python
            arrays = " OR ".join(f"{_t(parts[:d])} IS 'array'" for d in depths)
            sql = (
                f"{in_sql} AND NOT ({arrays}) GROUP BY 2, 3 "
                f"UNION ALL SELECT 1, NULL, doc FROM {table} WHERE ({where}) AND ({arrays})"
            )
            return sql, [*params, *params], compiled

        seen: set[Any] = set()
        values: list[Any] = []
        for in_python, json_type, raw in self._read(build):
            if json_type == "key":
                values.append(_key_value(raw))
                continue
            if in_python:
                doc = _row(raw, self.key, None)
                found = [v for v in iter_key_candidates(field, doc) if v is not NOTHING]
            else:
                found = [
                    _shown(
                        _loads_or_text(raw)
                        if json_type in ("object", "array")
                        else _from_sql(json_type, raw)
                    )
                ]
            _add_distinct(values, seen, found)
        return values

    def query_key(self, value: str | int, leave_out: Iterable[str] = ()) -> dict | None:
        """The document whose key field is ``value``, or None: one primary-key read.

        The same document as ``query_one({key: value})``, without planning a query.
        ``leave_out`` names top-level fields not to read (they are dropped in SQL, so a
        large field costs neither reading nor decoding).

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.update({"task_id": "x", "big": [1, 2], "n": 1})
        ...     store.query_key("x", leave_out=["big"]), store.query_key("y")
        ({'task_id': 'x', 'n': 1}, None)
        """
        row_key = _key_literal(value)
        if row_key is None or not isinstance(value, str | int):
            return None
        leave_out = tuple(leave_out)
        select = self._key_statements.get(leave_out)
        if select is None:
            dropped = [_json_path([name]) for name in leave_out if _split_path(name) == [name]]
            column = f"json_remove(doc, {', '.join(dropped)})" if dropped else "doc"
            select = f"SELECT {column} FROM {self._table} WHERE key = ?"
            if len(self._key_statements) < 64:
                self._key_statements[leave_out] = select
        conn = self._reader()
        try:
            with self._errors():
                row = conn.execute(select, (row_key,)).fetchone()
        except sqlite3.OperationalError as err:  # the row's JSON is damaged: read it whole
            if "JSON" not in str(err):
                raise
            with self._errors():
                row = conn.execute(f"SELECT doc FROM {self._table} WHERE key = ?", (row_key,))
                row = row.fetchone()
        if row is None or row[0] is None or row[0] == "null":  # no entry: a plain miss
            return None
        return _row(row[0], self.key, value)

    # ---------------------------------------------------------------- writing

    def _row_key(self, doc: Mapping[str, Any]) -> str:
        if self.key not in doc:
            raise KeyError(f"document has no key field {self.key!r}")
        value = doc[self.key]
        literal = _key_literal(value)
        if literal is None or not isinstance(value, str | int):
            raise TypeError(f"the key field {self.key!r} must hold a str or an int, not {value!r}")
        return literal

    def _prepare(
        self, doc: Any, arrays: set[str], sanitized: bool = False
    ) -> tuple[str, str, dict] | None:
        """Sanitise and validate one document: ``(row key, JSON text, document)``.

        The paths at which it holds arrays are added to ``arrays``. Unless a validator
        needs to see it (or ``sanitized`` is asked for), the sanitised document is only
        built when the document holds something ``jsanitize`` would change.
        """
        if self.validator is None and not sanitized and type(doc) is dict:
            try:
                storable = _to_storable(doc, arrays, strict=True)
            except _NotPlainError:
                pass  # something to sanitise: take the full path
            else:  # jsanitize would return an equal document: skip it
                text = orjson.dumps(storable, default=_orjson_default).decode("utf-8")
                return self._row_key(doc), text, doc
        checked = self._checked(doc)
        if checked is None:
            return None
        return self._row_key(checked), _encode(checked, arrays), checked

    @contextmanager
    def _writing(self, arrays: set[str]) -> Iterator[sqlite3.Connection]:
        """A write transaction that also records the array paths of what it writes."""
        with self._transaction() as conn:
            new = self._record_arrays(conn, arrays)
            yield conn
        self._state_or_raise().known_arrays.update(new)  # only once committed

    def update(self, docs: list[dict] | dict, key: list | str | None = None) -> None:
        """Insert or replace documents, all in one transaction.

        Parameters
        ----------
        docs
            A document or a list of documents; each must hold the store's key field.
        key
            Field(s) identifying the document to replace, as in MongoStore. ``None`` or
            the store key: the document with the same key value. Other fields: the first
            document matching their values is replaced (and its row takes the new
            document's key value).

        Raises
        ------
        KeyError
            If a document lacks the store key or a ``key`` field.
        TypeError
            If a key value is not a str or an int.
        sqlite3.IntegrityError
            If a document breaks a unique index made by :meth:`ensure_index`.
        """
        if not isinstance(docs, list):
            docs = [docs]
        fields = list(key) if isinstance(key, list | tuple) else [key or self.key]
        simple = fields == [self.key]
        arrays: set[str] = set()
        prepared = [
            p for p in (self._prepare(d, arrays, not simple) for d in docs) if p is not None
        ]
        if not prepared:
            return
        upsert = (
            f"INSERT INTO {self._table} (key, doc) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
        )
        searches = [] if simple else [{f: d[f] for f in fields} for _, _, d in prepared]
        with self._writing(arrays) as conn:
            if simple:
                conn.executemany(upsert, [(row_key, text) for row_key, text, _ in prepared])
                return
            probe = self._probe(conn)  # inside the write lock: answers cannot go stale
            for (row_key, text, _), search in zip(prepared, searches):
                match = self._compile(search, probe)
                found = conn.execute(
                    f"SELECT rowid, key FROM {self._table} WHERE {match.where} "
                    "ORDER BY rowid LIMIT 1",
                    match.params,
                ).fetchone()
                match.check()
                if found is not None and found[1] != row_key:
                    conn.execute(f"DELETE FROM {self._table} WHERE rowid = ?", (found[0],))
                conn.execute(upsert, (row_key, text))

    def insert_if_absent(self, doc: dict) -> bool:
        """Insert a document only if no document has its key value, atomically.

        Parameters
        ----------
        doc
            The document; it must hold the store's key field.

        Returns
        -------
        bool
            True if inserted, False if the key was already taken (or the validator
            rejected the document).

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.insert_if_absent({"task_id": "x", "v": 1}), store.insert_if_absent(
        ...         {"task_id": "x", "v": 2}), store.query_one()["v"]
        (True, False, 1)
        """
        arrays: set[str] = set()
        prepared = self._prepare(doc, arrays)
        if prepared is None:
            return False
        row_key, text, _ = prepared
        with self._writing(arrays) as conn:
            cursor = conn.execute(
                f"INSERT INTO {self._table} (key, doc) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (row_key, text),
            )
            inserted = cursor.rowcount == 1
        return inserted

    def increment(
        self,
        key_value: str | int,
        fields: Mapping[str, int | float],
        set_fields: Mapping[str, Any] | None = None,
    ) -> bool:
        """Add to numeric fields (and set others) of one document, atomically.

        Only the named fields are rewritten, inside one write transaction, so
        concurrent increments from several processes all count. A missing field starts
        from 0; missing parent objects are created.

        Parameters
        ----------
        key_value
            The key value of the document.
        fields
            Dotted field -> amount to add (int or float).
        set_fields
            Dotted field -> value to store (e.g. a new ``last_updated``).

        Returns
        -------
        bool
            True if the document exists (and was updated), False otherwise.

        Raises
        ------
        TypeError
            If a field to increment holds a non-number, or a parent is not an object.
        ValueError
            If a path is invalid, repeated, or the store's key field.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.update({"task_id": "x"})
        ...     store.increment("x", {"stats.hits": 2}), store.increment("y", {"hits": 1})
        ...     store.query_one({"task_id": "x"})["stats"]
        (True, False)
        {'hits': 2}
        """
        plan = self._plan_increment(key_value, fields, set_fields)
        if plan is None:
            return self.count({self.key: key_value}) == 1
        with self._writing(plan.arrays) as conn:
            return self._apply_increment(conn, plan)

    def increment_many(
        self,
        updates: Iterable[tuple[str | int, Mapping[str, int | float], Mapping[str, Any] | None]],
    ) -> list[bool]:
        """Apply several :meth:`increment` calls in one write transaction.

        One commit for the whole batch instead of one per document (a commit costs a few
        tenths of a millisecond): this is how hit counters are written in bulk.

        Parameters
        ----------
        updates
            ``(key value, fields, set_fields)`` triples, as the arguments of
            :meth:`increment`.

        Returns
        -------
        list[bool]
            For each update, True if its document exists (and was updated).

        Raises
        ------
        TypeError, ValueError
            As :meth:`increment`; nothing of the batch is written then.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.update([{"task_id": "x"}, {"task_id": "y", "hits": 4}])
        ...     store.increment_many([("x", {"hits": 2}, None), ("y", {"hits": 1}, None),
        ...                           ("z", {"hits": 1}, None)])
        ...     [d.get("hits") for d in store.query(sort={"task_id": 1})]
        [True, True, False]
        [2, 5]
        """
        updates = list(updates)
        plans = [self._plan_increment(key, fields, extra) for key, fields, extra in updates]
        arrays: set[str] = set()
        for plan in plans:
            if plan is not None:
                arrays |= plan.arrays
        with self._writing(arrays) as conn:
            found: list[bool] = []
            for plan, (key, _, _) in zip(plans, updates):
                if plan is None:  # nothing to change: only whether the document exists
                    row_key = _key_literal(key)
                    exists = conn.execute(
                        f"SELECT 1 FROM {self._table} WHERE key = ?", (row_key,)
                    ).fetchone()
                    found.append(exists is not None)
                else:
                    found.append(self._apply_increment(conn, plan))
            return found

    def _plan_increment(
        self,
        key_value: str | int,
        fields: Mapping[str, int | float],
        set_fields: Mapping[str, Any] | None,
    ) -> _IncrementPlan | None:
        """Check the arguments of :meth:`increment` and build its SQL (None: no fields)."""
        set_fields = set_fields or {}
        row_key = _increment_key(key_value, fields)
        sql = self._increment_sql(tuple(fields), tuple(set_fields))
        if sql is None:
            return None
        arrays: set[str] = set()
        set_texts = [_dumps(value, arrays, path) for path, value in set_fields.items()]
        return _IncrementPlan(row_key, list(fields.values()), set_texts, sql, arrays)

    def _increment_sql(
        self, fields: tuple[str, ...], set_fields: tuple[str, ...]
    ) -> _IncrementSQL | None:
        """The statements of an increment of these fields (made once per field names)."""
        names = (fields, set_fields)
        cached = self._increment_statements.get(names)
        if cached is not None:
            return cached
        parsed = _increment_paths(self.key, fields, set_fields)
        paths = tuple(parsed)
        if not paths:
            return None
        checks: list[str] = []
        for parts in parsed.values():
            checks += [_t(parts[:depth]) for depth in range(1, len(parts))]
            checks.append(_t(parts))
        number_paths = [_json_path(parsed[path]) for path in fields]
        # with two or more paths json_extract returns a JSON array of the numbers' own
        # text, so floats are read back exactly (a REAL would be rounded to 15 digits)
        raw = (
            f"json_extract(doc, {', '.join([*number_paths, *number_paths])})" if fields else "'[]'"
        )
        assignments = ", ".join(f"{_json_path(parts)}, json(?)" for parts in parsed.values())
        direct = None
        if all(len(parts) == 1 for parts in parsed.values()):
            counts = [_json_path(parsed[path]) for path in fields]
            sums = [f"{p}, coalesce(json_extract(doc, {p}), 0) + ?" for p in counts]
            sets = [f"{_json_path(parsed[path])}, json(?)" for path in set_fields]
            guards = [
                f"coalesce(json_type(doc, {p}), 'integer') = 'integer' AND "
                f"abs(coalesce(json_extract(doc, {p}), 0)) < {_EXACT_SUMS}"
                for p in counts
            ]
            direct = (
                f"UPDATE {self._table} SET doc = json_set(doc, {', '.join([*sums, *sets])}) "
                f"WHERE {' AND '.join(['key = ?', *guards])}"
            )
        sql = _IncrementSQL(
            paths=tuple(paths),
            depths=tuple(len(parts) for parts in parsed.values()),
            increments=len(fields),
            select=f"SELECT {', '.join([*checks, raw])} FROM {self._table} WHERE key = ?",
            update=f"UPDATE {self._table} SET doc = json_set(doc, {assignments}) WHERE key = ?",
            direct=direct,
        )
        if len(self._increment_statements) < 64:
            self._increment_statements[names] = sql
        return sql

    @staticmethod
    def _apply_increment(conn: sqlite3.Connection, plan: _IncrementPlan) -> bool:
        """Run a planned increment inside the current write transaction."""
        sql = plan.sql
        if sql.direct is not None and all(
            type(amount) is int and abs(amount) < _EXACT_SUMS for amount in plan.amounts
        ):
            cursor = conn.execute(sql.direct, [*plan.amounts, *plan.set_texts, plan.row_key])
            if cursor.rowcount == 1:
                return True
            # no such document, or a field that is not an integer: the checks below decide
        row = conn.execute(sql.select, (plan.row_key,)).fetchone()
        if row is None:
            return False
        types = iter(row[:-1])
        for index, (path, depth) in enumerate(zip(sql.paths, sql.depths)):
            parents = [next(types) for _ in range(depth - 1)]
            if any(kind not in (None, "object") for kind in parents):
                raise TypeError(f"cannot set {path!r}: a parent is not an object")
            kind = next(types)
            if index < sql.increments and kind not in (None, "integer", "real"):
                raise TypeError(f"cannot increment {path!r}: it holds a {kind}, not a number")
        current = orjson.loads(row[-1])[: sql.increments]
        params: list[Any] = [
            orjson.dumps((old or 0) + amount).decode("utf-8")
            for amount, old in zip(plan.amounts, current)
        ]
        conn.execute(sql.update, [*params, *plan.set_texts, plan.row_key])
        return True

    def remove_docs(self, criteria: dict) -> None:
        """Delete every document matching Mongo criteria (``{}`` deletes all)."""
        with self._transaction() as conn:
            compiled = self._compile(criteria, self._probe(conn))
            conn.execute(f"DELETE FROM {self._table} WHERE {compiled.where}", compiled.params)
            compiled.check()

    def ensure_index(self, key: str, unique: bool = False) -> bool:
        """Create an index on a (dotted) field unless it exists.

        The index is on the field's ``(type class, json_extract value)``, the exact
        expressions queries and sorts use, plus small ``json_type`` indexes on its
        parent paths so array-aware conditions stay indexed. The store key needs none:
        its column is the primary key.

        Parameters
        ----------
        key
            The field.
        unique
            Reject two documents with the same value (documents lacking the field are
            exempt, unlike MongoDB).

        Returns
        -------
        bool
            True if the index exists or was created, False if it could not be (e.g. an
            unsupported path, or ``unique`` with duplicates already stored).
        """
        self._state_or_raise()
        if key == self.key:
            return True
        parts = _split_path(key)
        if parts is None:
            logger.warning("cannot index the field %r in SQLite", key)
            return False
        name = f"{self.collection_name}:{key}"
        reader = self._reader()
        with self._errors():
            exists = reader.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)
            ).fetchone()
        if exists:
            return True
        statement = (
            f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {_quote_identifier(name)} "
            f"ON {self._table} ({_b(parts)}, {_x(parts)})"
        )
        try:
            with self._transaction() as conn:
                conn.execute(statement)
        except sqlite3.Error as err:
            logger.warning("could not create the index on %r: %s", key, err)
            return False
        state = self._state_or_raise()
        with state.lock:
            self._refresh_statistics(state.writer, force=True)
        return True

    # -- coordination between workers: claims (in-flight dedup) and aliases ---------------------
    @property
    def _claims_table(self) -> str:
        return _quote_identifier(f"{self.collection_name}__claims")

    @property
    def _aliases_table(self) -> str:
        return _quote_identifier(f"{self.collection_name}__aliases")

    def _side_tables(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._claims_table} "
            "(name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)"
        )
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {self._aliases_table} "
            "(alias TEXT PRIMARY KEY, target TEXT NOT NULL, created REAL NOT NULL)"
        )

    def claim(self, name: str, owner: str, lease: float) -> str:
        """Take or renew the claim ``name`` for ``owner`` for ``lease`` seconds, atomically.

        The claim is taken when nobody holds it, its lease has expired, or ``owner`` already
        holds it (a renewal). Leases use this machine's clock (a SQLite file is only shared
        by processes of one machine).

        Returns
        -------
        str
            The holder after the call: ``owner`` if the claim is now ours.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.claim("d1", "me", 60), store.claim("d1", "you", 60)
        ...     store.release("d1", "me")
        ...     store.claim("d1", "you", 60)
        ('me', 'me')
        'you'
        """
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                f"INSERT INTO {self._claims_table} (name, owner, expires) VALUES (?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, "
                "expires = excluded.expires WHERE owner = excluded.owner OR expires < ?",
                (name, owner, now + lease, now),
            )
            row = conn.execute(
                f"SELECT owner FROM {self._claims_table} WHERE name = ?", (name,)
            ).fetchone()
        return str(row[0])

    def release(self, name: str, owner: str) -> None:
        """Drop the claim ``name`` if ``owner`` holds it."""
        with self._transaction() as conn:
            conn.execute(
                f"DELETE FROM {self._claims_table} WHERE name = ? AND owner = ?", (name, owner)
            )

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        """Record ``alias -> target`` pairs (last writer wins), in one transaction."""
        if not pairs:
            return
        now = time.time()
        with self._transaction() as conn:
            conn.executemany(
                f"INSERT INTO {self._aliases_table} (alias, target, created) VALUES (?, ?, ?) "
                "ON CONFLICT (alias) DO UPDATE SET target = excluded.target, "
                "created = excluded.created",
                [(alias, target, now) for alias, target in pairs.items()],
            )

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        """The targets of those of ``names`` that are recorded aliases.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.set_aliases({"/runs/a": "d1"})
        ...     store.get_aliases(["/runs/a", "/runs/b"])
        {'/runs/a': 'd1'}
        """
        if not names:
            return {}
        conn = self._reader()
        found: dict[str, str] = {}
        with self._errors():
            for start in range(0, len(names), 500):
                chunk = list(names[start : start + 500])
                marks = ", ".join("?" * len(chunk))
                found.update(
                    conn.execute(
                        f"SELECT alias, target FROM {self._aliases_table} WHERE alias IN ({marks})",
                        chunk,
                    ).fetchall()
                )
        return found


#: Serialises reopening a store whose file was deleted or replaced (see ``_current_file``).
_REOPEN_LOCK = threading.Lock()


#: The kind of a JSON text by its first character (digits and '-': a number).
_FIRST_CHARACTER = {"[": "array", '"': "string", "t": "boolean", "f": "boolean", "n": "null"}


def _key_value(text: Any) -> Any:
    """The key value of a ``key`` column text (None when it is damaged)."""
    try:
        return orjson.loads(text)
    except (ValueError, TypeError):
        return None


def _shown(value: Any) -> Any:
    """A value extracted by SQL, with bytes that were not UTF-8 shown as U+FFFD."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value


def _loads_or_text(raw: Any) -> Any:
    try:
        return _loads(raw)
    except (ValueError, TypeError):
        return _shown(raw)


def _from_sql(json_type: str, raw: Any) -> Any:
    """Rebuild a Python value from SQLite's ``json_type`` and ``json_extract`` results."""
    if json_type == "null":
        return None
    if json_type == "true":
        return True
    if json_type == "false":
        return False
    if json_type in ("object", "array"):
        return _loads(raw)
    return raw
