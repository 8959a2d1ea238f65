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

import base64
import itertools
import logging
import math
import os
import re
import sqlite3
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from maggma.core import Sort, Store, StoreError
from monty.json import jsanitize
from pydash import get, set_

from jobflow_cache.errors import StoreUnavailableError

try:  # maggma >= 0.72 depends on the mongomock-ng fork
    from mongomock_ng.filtering import (
        NOTHING,
        filter_applies,
        iter_key_candidates,
        resolve_sort_key,
    )
except ImportError:  # pragma: no cover - older maggma releases use mongomock
    from mongomock.filtering import (  # type: ignore[no-redef]
        NOTHING,
        filter_applies,
        iter_key_candidates,
        resolve_sort_key,
    )

__all__ = ["SQLiteStore"]

logger = logging.getLogger(__name__)

_META_TABLE = "jobflow_cache_collections"
_FORMAT_VERSION = 1

_DATE = "$date"
_BINARY = "$binary"
_DOUBLE = "$numberDouble"
_RESERVED_KEYS = frozenset({_DATE, _BINARY, _DOUBLE})

# BSON comparison order of the type classes (null < numbers < strings < objects < arrays
# < binary < booleans < dates), used for sorting and for type-bracketed comparisons.
_NULL, _NUMBER, _STRING, _OBJECT, _ARRAY, _BINDATA, _BOOL, _DATETIME = 1, 2, 3, 4, 5, 6, 8, 9

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

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FETCH_BATCH = 256
# Planner statistics: ANALYZE once a table reaches this many rows and again whenever it has
# doubled since; checked every _STATS_CHECK_EVERY write transactions of a process.
_STATS_MIN_ROWS = 1000
_STATS_CHECK_EVERY = 200

# Connections inherited over fork() are never used or closed in the child (SQLite forbids
# both); holding them here keeps their finalisers from running in the child.
_ABANDONED: list[Any] = []

_Fragment = tuple[str, list[Any]]


# --------------------------------------------------------------------------- encoding


def _format_datetime(value: datetime) -> str:
    """Return the fixed-width UTC ISO-8601 text stored for a datetime."""
    offset = value.utcoffset()
    if offset is not None:
        value = value.replace(tzinfo=None) - offset
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T{value.hour:02d}:"
        f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}Z"
    )


def _parse_datetime(text: str) -> datetime:
    """Return the naive UTC datetime for text written by :func:`_format_datetime`."""
    return datetime.fromisoformat(text[:-1] if text.endswith("Z") else text)


def _to_storable(obj: Any) -> Any:
    """Replace values JSON cannot hold by their tagged encodings (see module docstring)."""
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if key in _RESERVED_KEYS:
                raise ValueError(f"the key {key!r} is reserved by SQLiteStore's encoding")
            out[key] = _to_storable(value)
        return out
    if isinstance(obj, list | tuple):
        return [_to_storable(value) for value in obj]
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {_DOUBLE: "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, datetime):
        return {_DATE: _format_datetime(obj)}
    if isinstance(obj, bytes | bytearray):
        return {_BINARY: base64.b64encode(bytes(obj)).decode("ascii")}
    return obj


def _orjson_default(obj: Any) -> Any:
    """Serialise the BSON types jsanitize(allow_bson=True) leaves in place (ObjectId...)."""
    if type(obj).__name__ in {"ObjectId", "Decimal128", "Int64"}:
        return str(obj) if type(obj).__name__ == "ObjectId" else int(str(obj))
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _dumps(obj: Any) -> str:
    """Encode a sanitised document (or value) to the JSON text stored in SQLite."""
    return orjson.dumps(_to_storable(obj), default=_orjson_default).decode("utf-8")


def _from_storable(obj: Any) -> Any:
    """Inverse of :func:`_to_storable` on decoded JSON."""
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((key, value),) = obj.items()
            if key == _DATE:
                return _parse_datetime(value)
            if key == _BINARY:
                return base64.b64decode(value)
            if key == _DOUBLE:
                return float(value.lower().replace("infinity", "inf"))
        return {key: _from_storable(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_from_storable(value) for value in obj]
    return obj


def _loads(text: str) -> Any:
    """Decode stored JSON text, restoring datetimes, bytes and non-finite floats."""
    obj = orjson.loads(text)
    return _from_storable(obj) if '"$' in text else obj


def _sanitize(doc: Any) -> Any:
    """Sanitise a document exactly as maggma's MongoStore does before writing it."""
    return jsanitize(doc, allow_bson=True, recursive_msonable=True)


def _type_class(value: Any) -> int:
    """Return the BSON type class of a Python value (see ``_NULL`` ... ``_DATETIME``)."""
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int | float):
        return _NUMBER
    if isinstance(value, str):
        return _STRING
    if isinstance(value, datetime):
        return _DATETIME
    if isinstance(value, bytes | bytearray):
        return _BINDATA
    if isinstance(value, list | tuple):
        return _ARRAY
    return _OBJECT


# --------------------------------------------------------------------------- SQL helpers


def _quote_identifier(name: str) -> str:
    """Quote an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """Quote an SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _split_path(path: Any) -> list[str] | None:
    """Split a dotted field path, or return None if SQL cannot address it exactly.

    Numeric components (Mongo array indexes) and components holding a double quote or
    starting with ``$`` are left to the Python fallback.
    """
    if not isinstance(path, str) or not path:
        return None
    parts = path.split(".")
    for part in parts:
        if not part or '"' in part or part.isdigit() or part.startswith("$"):
            return None
    return parts


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
    if not fragments:
        return "1", []
    if len(fragments) == 1:
        return fragments[0]
    return "(" + " AND ".join(sql for sql, _ in fragments) + ")", [
        p for _, params in fragments for p in params
    ]


def _or(fragments: list[_Fragment]) -> _Fragment:
    """Join fragments with OR."""
    if not fragments:
        return "0", []
    if len(fragments) == 1:
        return fragments[0]
    return "(" + " OR ".join(sql for sql, _ in fragments) + ")", [
        p for _, params in fragments for p in params
    ]


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


def _regex_pattern(regex: Any, options: Any) -> str | None:
    """Return a Python pattern with inline flags for ``$regex``/``$options``, or None."""
    flags = ""
    if isinstance(regex, re.Pattern):
        pattern = regex.pattern
        if not isinstance(pattern, str):
            return None
        flags += "".join(
            letter
            for letter, flag in (("i", re.I), ("m", re.M), ("s", re.S), ("x", re.X))
            if regex.flags & flag
        )
    elif isinstance(regex, str):
        pattern = regex
    else:
        return None
    if options is not None:
        if not isinstance(options, str) or set(options) - set("imsx"):
            return None
        flags += options
    return f"(?{''.join(sorted(set(flags)))}){pattern}" if flags else pattern


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
        return int(bool(filter_applies(matcher.criteria, _loads(doc))))
    except Exception as err:  # reported by _Compiled.check once the statement stops
        matcher.error = err
        return 0


class _Compiled:
    """A translated WHERE clause, its parameters and the matchers it relies on."""

    def __init__(self, where: str, params: list[Any], matchers: list[_Matcher]) -> None:
        self.where = where
        self.params = params
        self.matchers = matchers  # strong references keep the tokens alive

    def check(self) -> None:
        """Raise the first error the Python fallback met while matching."""
        for matcher in self.matchers:
            if matcher.error is not None:
                raise ValueError(
                    f"cannot evaluate criteria {matcher.criteria!r}: {matcher.error}"
                ) from matcher.error


class _Translator:
    """Translate Mongo criteria to SQL over ``json_extract`` (see ``SQLiteStore.query``).

    A positive condition on path ``a.b`` becomes ``S OR (a is array AND m) OR (a.b is
    array AND m)`` where ``S`` is exact SQL for documents without arrays on the path and
    ``m`` mongomock's matcher: each term can use an expression index (SQLite's
    multi-index OR), and documents with arrays still get Mongo's array semantics.
    Negative operators are ``NOT`` of the exact positive form.
    """

    _COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}

    def __init__(self, key_field: str) -> None:
        self.key_field = key_field
        self.matchers: list[_Matcher] = []

    def compile(self, criteria: Mapping[str, Any] | None) -> _Compiled:
        """Translate criteria into a :class:`_Compiled` WHERE clause."""
        if criteria is None:
            criteria = {}
        if not isinstance(criteria, Mapping):
            raise TypeError(f"criteria must be a dict, not {type(criteria).__name__}")
        where, params = self._document(criteria)
        return _Compiled(where, params, self.matchers)

    def _python(self, criteria: dict[str, Any]) -> _Fragment:
        matcher = _Matcher(criteria)
        token = next(_MATCHER_IDS)
        _MATCHERS[token] = matcher
        self.matchers.append(matcher)
        return "jfc_match(doc, ?)", [token]

    def _document(self, criteria: Mapping[str, Any]) -> _Fragment:
        return _and([self._item(key, value) for key, value in criteria.items()])

    def _item(self, key: str, value: Any) -> _Fragment:
        if key in ("$and", "$or", "$nor"):
            if not isinstance(value, list | tuple) or not value:
                raise ValueError(f"{key} needs a non-empty list of criteria")
            if not all(isinstance(sub, Mapping) for sub in value):
                raise ValueError(f"every entry of {key} must be a dict")
            subs = [self._document(sub) for sub in value]
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
        if isinstance(value, re.Pattern):
            ops: dict[str, Any] = {"$regex": value}
        elif isinstance(value, Mapping) and value and all(str(op).startswith("$") for op in value):
            ops = dict(value)
        else:
            ops = {"$eq": value}
        if key == self.key_field:
            return self._key_field(key, parts, ops)
        return self._field(key, parts, ops)

    # -- the store key: the indexed ``key`` column answers equality exactly
    def _key_field(self, path: str, parts: list[str], ops: dict[str, Any]) -> _Fragment:
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
                rest[op] = value
        if rest:
            fragments.append(self._field(path, parts, rest))
        return _and(fragments)

    # -- any other field
    def _field(self, path: str, parts: list[str], ops: dict[str, Any]) -> _Fragment:
        fragments: list[_Fragment] = []
        scalars: list[_Fragment] = []
        positive: dict[str, Any] = {}
        python: dict[str, Any] = {}
        for op, value in ops.items():
            if op == "$options":
                if "$regex" not in ops:
                    python[op] = value
                continue
            negated = self._negation(op, value)
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
        if python:
            fragments.append(self._python({path: python}))
        return _and(fragments)

    @staticmethod
    def _negation(op: str, value: Any) -> dict[str, Any] | None:
        """Return the positive operators whose negation ``op`` is, or None."""
        if op == "$ne":
            return {"$eq": value}
        if op == "$nin":
            return {"$in": value}
        if op == "$exists" and not value:
            return {"$exists": True}
        if op == "$not":
            if isinstance(value, re.Pattern):
                return {"$regex": value}
            if isinstance(value, Mapping) and value and all(str(k).startswith("$") for k in value):
                return dict(value)
            return {"$not": value}  # invalid: the fallback reports mongomock's error
        return None

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
        sql, params = self._python({path: ops})
        token = params[0]
        terms = [_and(scalars)]
        for depth in range(1, len(parts)):
            terms.append((f"({_t(parts[:depth])} = 'array' AND {sql})", [token]))
        terms.append((f"({_b(parts)} = {_ARRAY} AND {sql})", [token]))
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
            prefixes = [f"{_t(parts[:depth])} IS 'array'" for depth in range(1, len(parts))]
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


def _key_literal(value: Any) -> str | None:
    """Return the ``key`` column text for a key value, or None if no row can hold it."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str) or (isinstance(value, int) and _INT64_MIN <= value <= _INT64_MAX):
        return orjson.dumps(value).decode("utf-8")
    return None


# --------------------------------------------------------------------------- projection


def _projection(properties: Mapping[str, Any] | list[str] | None) -> tuple[dict, bool] | None:
    """Parse a projection into a nested spec and whether it includes (True) or excludes."""
    if properties is None:
        return None
    if isinstance(properties, Mapping):
        fields = dict(properties)
    elif isinstance(properties, list | tuple):
        fields = dict.fromkeys(properties, 1)
    else:
        raise TypeError(f"properties must be a list or a dict, not {type(properties).__name__}")
    fields.pop("_id", None)  # SQLiteStore documents have no _id
    if not fields:
        return None
    modes = {bool(flag) for flag in fields.values()}
    if len(modes) > 1:
        raise ValueError("a projection cannot mix included and excluded fields")
    spec: dict[str, Any] = {}
    for path in fields:
        node = spec
        components = str(path).split(".")
        for depth, component in enumerate(components):
            child = node.get(component)
            last = depth == len(components) - 1
            if child is True or (last and child is not None):
                raise ValueError(f"path collision in projection at {path!r}")
            if last:
                node[component] = True
            else:
                node = node.setdefault(component, {})
    return spec, modes.pop()


def _project(doc: dict[str, Any], spec: dict[str, Any], include: bool) -> dict[str, Any]:
    """Apply a parsed projection as MongoDB does (arrays of sub-documents included)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        rule = spec.get(key)
        if rule is None:
            if not include:
                out[key] = value
        elif rule is True:
            if include:
                out[key] = value
        elif isinstance(value, dict):
            out[key] = _project(value, rule, include)
        elif isinstance(value, list):
            out[key] = [
                _project(item, rule, include) if isinstance(item, dict) else item
                for item in value
                if isinstance(item, dict) or not include
            ]
        elif not include:
            out[key] = value
    return out


def _sort_items(sort: Mapping[str, Sort | int] | None) -> list[tuple[str, int]]:
    """Normalise a maggma sort spec into ``[(field, 1 | -1), ...]``."""
    if not sort:
        return []
    return [
        (field, direction.value if isinstance(direction, Sort) else Sort(direction).value)
        for field, direction in sort.items()
    ]


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

    def close(self) -> None:
        with self.lock:
            for conn in [self.writer, *self.readers]:
                try:
                    conn.close()
                except sqlite3.Error:  # pragma: no cover - closing is best effort
                    logger.debug("error closing a SQLite connection", exc_info=True)
            self.readers.clear()


# --------------------------------------------------------------------------- the store


class SQLiteStore(Store):
    """A maggma Store kept in one SQLite file: no server, safe across processes.

    The database runs in WAL mode, so readers never block the writer; every write is one
    ``BEGIN IMMEDIATE`` transaction that waits up to ``timeout`` seconds for the lock.
    Each process keeps one writer connection (shared by its threads under a lock) and
    one reader connection per thread, and reconnects by itself after ``fork()``.

    Queries take MongoDB criteria. Translated to SQL (indexable with
    :meth:`ensure_index`): equality (dotted paths, ``None`` = null or missing),
    ``$eq $ne $gt $gte $lt $lte $in $nin $exists $regex $not $and $or $nor``, with
    Mongo's type bracketing (``1`` never equals ``True``). Everything else (``$elemMatch``,
    ``$size``, ``$all``, ``$type``, ``$expr``, equality with a sub-document, numeric path
    components, ...) and documents holding arrays along a queried path are matched by
    mongomock in Python inside the same statement: exact, just slower.

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
        if collection_name.lower().startswith("sqlite_") or collection_name == _META_TABLE:
            raise ValueError(f"collection_name {collection_name!r} is reserved")
        if timeout < 0:
            raise ValueError("timeout must be >= 0")
        self.path = path
        self.collection_name = collection_name
        self.timeout = float(timeout)
        self.kwargs = kwargs
        self._state: _ProcessState | None = None
        super().__init__(key=key, last_updated_field=last_updated_field, **kwargs)

    # ---------------------------------------------------------------- identity

    @property
    def _file(self) -> str:
        """The absolute path of the database file."""
        return os.path.abspath(os.path.expanduser(self.path))

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
        return _ProcessState(writer, self.key)

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
                f"CREATE TABLE IF NOT EXISTS {self._table} "
                "(key TEXT PRIMARY KEY, doc TEXT NOT NULL)"
            )
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

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` write transaction on the process's writer connection."""
        state = self._state_or_raise()
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

    def _compile(self, criteria: Mapping[str, Any] | None) -> _Compiled:
        return _Translator(self.key).compile(criteria)

    # ---------------------------------------------------------------- reading

    def query(
        self,
        criteria: dict | None = None,
        properties: dict | list | None = None,
        sort: dict[str, Sort | int] | None = None,
        skip: int = 0,
        limit: int = 0,
    ) -> Iterator[dict]:
        """Stream the documents matching Mongo criteria.

        Parameters
        ----------
        criteria
            MongoDB filter (see the class docstring for what runs as SQL).
        properties
            Fields to return, as a list or a Mongo projection dict (inclusion or
            exclusion; ``_id`` is ignored). ``None`` or empty returns whole documents.
        sort
            Field -> direction (``1``/``-1`` or :class:`maggma.core.Sort`), applied in
            order. Values sort in BSON type order (null/missing, numbers, strings,
            objects, arrays, binary, booleans, dates); ties keep insertion order.
            Arrays sort as whole values, not by their smallest element.
        skip
            Number of matching documents to skip.
        limit
            Maximum number of documents; ``0`` means no limit.

        Returns
        -------
        Iterator[dict]
            Documents read lazily from a cursor, a few hundred rows at a time.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.update([{"task_id": i, "n": i % 3} for i in range(6)])
        ...     [d["task_id"] for d in store.query({"n": {"$ne": 0}}, sort={"n": -1})]
        [2, 5, 1, 4]
        """
        compiled = self._compile(criteria)
        projection = _projection(properties)
        items = _sort_items(sort)
        if skip < 0 or limit < 0:
            raise ValueError("skip and limit must be >= 0")
        self._state_or_raise()
        if all(_split_path(field) is not None for field, _ in items):
            order = self._order_by(items)
            sql = f"SELECT doc FROM {self._table} WHERE {compiled.where}{order} LIMIT ? OFFSET ?"
            params = [*compiled.params, limit or -1, skip]
            return self._stream(sql, params, compiled, projection)
        return self._python_sorted(compiled, projection, items, skip, limit)

    def _order_by(self, items: list[tuple[str, int]]) -> str:
        if not items:
            return ""
        terms = []
        for field, direction in items:
            parts = _split_path(field)
            assert parts is not None
            word = "ASC" if direction > 0 else "DESC"
            terms += [f"{_b(parts)} {word}", f"{_x(parts)} {word}"]
        return " ORDER BY " + ", ".join([*terms, "rowid ASC"])

    def _rows(
        self, sql: str, params: list[Any], compiled: _Compiled
    ) -> Generator[tuple, None, None]:
        """Stream raw rows from the calling thread's reader connection."""
        conn = self._reader()
        with self._errors():
            cursor = conn.execute(sql, params)
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

    def _stream(
        self,
        sql: str,
        params: list[Any],
        compiled: _Compiled,
        projection: tuple[dict, bool] | None,
    ) -> Iterator[dict]:
        for (text,) in self._rows(sql, params, compiled):
            doc = _loads(text)
            yield doc if projection is None else _project(doc, *projection)

    def _python_sorted(
        self,
        compiled: _Compiled,
        projection: tuple[dict, bool] | None,
        items: list[tuple[str, int]],
        skip: int,
        limit: int,
    ) -> Iterator[dict]:
        """Sort in Python (mongomock's sort keys) when a sort path is not SQL-addressable."""
        sql = f"SELECT doc FROM {self._table} WHERE {compiled.where} ORDER BY rowid"
        docs = list(self._stream(sql, compiled.params, compiled, None))
        for field, direction in reversed(items):
            docs.sort(key=_sort_key_function(field), reverse=direction < 0)
        docs = docs[skip : skip + limit if limit else None]
        yield from (docs if projection is None else (_project(d, *projection) for d in docs))

    def count(self, criteria: dict | None = None, hint: dict | None = None) -> int:
        """Count the documents matching Mongo criteria (``hint`` is accepted and ignored)."""
        compiled = self._compile(criteria)
        sql = f"SELECT count(*) FROM {self._table} WHERE {compiled.where}"
        rows = self._rows(sql, compiled.params, compiled)
        try:
            return int(next(rows)[0])
        finally:
            rows.close()

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
            The values (``None`` included when a document holds null), first-seen order.
        """
        compiled = self._compile(criteria)
        parts = _split_path(field)
        seen: set[Any] = set()
        values: list[Any] = []

        def add(value: Any) -> None:
            for item in value if isinstance(value, list) else [value]:
                marker = _distinct_marker(item)
                if marker not in seen:
                    seen.add(marker)
                    values.append(item)

        if field == self.key:
            sql = f"SELECT key FROM {self._table} WHERE {compiled.where} ORDER BY rowid"
            return [orjson.loads(key) for (key,) in self._rows(sql, compiled.params, compiled)]
        if parts is None:
            prefix_arrays = "1"
        else:
            prefix_arrays = " OR ".join(
                [f"{_t(parts[:depth])} IS 'array'" for depth in range(1, len(parts))] or ["0"]
            )
            sql = (
                f"SELECT {_t(parts)}, {_x(parts)}, min(rowid) AS first FROM {self._table} "
                f"WHERE ({compiled.where}) AND {_t(parts)} IS NOT NULL "
                f"AND NOT ({prefix_arrays}) GROUP BY 1, 2 ORDER BY first"
            )
            for json_type, raw, _ in self._rows(sql, compiled.params, compiled):
                add(_from_sql(json_type, raw))
        sql = f"SELECT doc FROM {self._table} WHERE ({compiled.where}) AND ({prefix_arrays})"
        for (text,) in self._rows(sql, compiled.params, compiled):
            for value in iter_key_candidates(field, _loads(text)):
                if value is not NOTHING:
                    add(value)
        return values

    def groupby(
        self,
        keys: list[str] | str,
        criteria: dict | None = None,
        properties: dict | list | None = None,
        sort: dict[str, Sort | int] | None = None,
        skip: int = 0,
        limit: int = 0,
    ) -> Iterator[tuple[dict, list[dict]]]:
        """Group documents by the values of some fields, as maggma's MemoryStore does.

        Only documents holding every key field take part. Each group's documents carry
        the key fields plus ``properties`` (only the keys if ``properties`` is empty).

        Parameters
        ----------
        keys
            Field(s) to group by.
        criteria
            MongoDB filter restricting the documents.
        properties
            Extra fields to return in each document.
        sort
            Order of the documents inside each group (sorting on a key field also
            orders the groups, which otherwise come in ascending key order).
        skip
            Number of groups to skip.
        limit
            Maximum number of groups; ``0`` means no limit.

        Returns
        -------
        Iterator[tuple[dict, list[dict]]]
            ``(key document, documents)`` per group, streamed.
        """
        keys = [keys] if isinstance(keys, str) else list(keys)
        if properties is None:
            properties = []
        if isinstance(properties, Mapping):
            properties = list(properties.keys())
        conditions = [criteria] if criteria else []
        conditions += [{key: {"$exists": True}} for key in keys]
        order: dict[str, Sort | int] = dict.fromkeys(keys, 1)
        order.update(sort or {})
        docs = self.query(
            criteria={"$and": conditions}, properties=keys + list(properties), sort=order
        )

        def group_of(doc: dict) -> tuple:
            return tuple((_type_class(v), v) for v in (get(doc, key) for key in keys))

        groups = itertools.groupby(docs, key=group_of)
        stop = skip + limit if limit else None
        for group, members in itertools.islice(groups, skip, stop):
            id_doc: dict[str, Any] = {}
            for key, (_, value) in zip(keys, group):
                set_(id_doc, key, value)
            yield id_doc, list(members)

    # ---------------------------------------------------------------- writing

    def _validate(self, doc: dict) -> bool:
        if self.validator is None or self.validator.is_valid(doc):
            return True
        if getattr(self.validator, "strict", False):
            raise ValueError(self.validator.validation_errors(doc))
        logger.error(
            "document rejected by the validator: %s", self.validator.validation_errors(doc)
        )
        return False

    def _row_key(self, doc: Mapping[str, Any]) -> str:
        if self.key not in doc:
            raise KeyError(f"document has no key field {self.key!r}")
        value = doc[self.key]
        literal = _key_literal(value)
        if literal is None or not isinstance(value, str | int):
            raise TypeError(f"the key field {self.key!r} must hold a str or an int, not {value!r}")
        return literal

    def _prepare(self, doc: Any) -> tuple[str, str, dict] | None:
        """Sanitise and validate one document: ``(row key, JSON text, document)``."""
        doc = _sanitize(doc)
        if not isinstance(doc, dict):
            raise TypeError(f"documents must be dicts, not {type(doc).__name__}")
        if not self._validate(doc):
            return None
        return self._row_key(doc), _dumps(doc), doc

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
        prepared = [p for p in map(self._prepare, docs) if p is not None]
        if not prepared:
            return
        upsert = (
            f"INSERT INTO {self._table} (key, doc) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET doc = excluded.doc"
        )
        matches = (
            [] if simple else [self._compile({f: d[f] for f in fields}) for _, _, d in prepared]
        )
        with self._transaction() as conn:
            if simple:
                conn.executemany(upsert, [(row_key, text) for row_key, text, _ in prepared])
                return
            for (row_key, text, _), match in zip(prepared, matches):
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
        prepared = self._prepare(doc)
        if prepared is None:
            return False
        row_key, text, _ = prepared
        with self._transaction() as conn:
            cursor = conn.execute(
                f"INSERT INTO {self._table} (key, doc) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
                (row_key, text),
            )
            return cursor.rowcount == 1

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
        set_fields = dict(set_fields or {})
        row_key = _key_literal(key_value)
        if row_key is None or not isinstance(key_value, str | int):
            raise TypeError(f"key values are str or int, not {key_value!r}")
        for amount in fields.values():
            if isinstance(amount, bool) or not isinstance(amount, int | float):
                raise TypeError(f"increments must be numbers, not {amount!r}")
        paths = {**dict.fromkeys(fields), **dict.fromkeys(set_fields)}
        if len(paths) != len(fields) + len(set_fields):
            raise ValueError("a field cannot be both incremented and set")
        parsed: dict[str, list[str]] = {}
        for path in paths:
            parts = _split_path(path)
            if parts is None or parts[0] == self.key:
                raise ValueError(f"cannot increment or set the field {path!r}")
            parsed[path] = parts
        for path in paths:
            for other in paths:
                if other != path and other.startswith(path + "."):
                    raise ValueError(f"fields {path!r} and {other!r} overlap")
        if not paths:
            return self.count({self.key: key_value}) == 1
        set_texts = {path: _dumps(_sanitize(value)) for path, value in set_fields.items()}

        checks: list[str] = []
        for path in paths:
            parts = parsed[path]
            checks += [_t(parts[:depth]) for depth in range(1, len(parts))]
            checks.append(_t(parts))
        number_paths = [_json_path(parsed[path]) for path in fields]
        raw = f"json_extract(doc, {', '.join([*number_paths, *number_paths])})"
        select = f"SELECT {', '.join([*checks, raw])} FROM {self._table} WHERE key = ?"
        with self._transaction() as conn:
            row = conn.execute(select, (row_key,)).fetchone()
            if row is None:
                return False
            types = iter(row[:-1])
            for path in paths:
                depth = len(parsed[path])
                parents = [next(types) for _ in range(depth - 1)]
                if any(kind not in (None, "object") for kind in parents):
                    raise TypeError(f"cannot set {path!r}: a parent is not an object")
                kind = next(types)
                if path in fields and kind not in (None, "integer", "real"):
                    raise TypeError(f"cannot increment {path!r}: it holds a {kind}, not a number")
            current = orjson.loads(row[-1])[: len(fields)]
            assignments: list[str] = []
            params: list[Any] = []
            for (path, amount), old in zip(fields.items(), current):
                assignments.append(f"{_json_path(parsed[path])}, json(?)")
                params.append(orjson.dumps((old or 0) + amount).decode("utf-8"))
            for path, text in set_texts.items():
                assignments.append(f"{_json_path(parsed[path])}, json(?)")
                params.append(text)
            conn.execute(
                f"UPDATE {self._table} SET doc = json_set(doc, {', '.join(assignments)}) "
                "WHERE key = ?",
                [*params, row_key],
            )
            return True

    def remove_docs(self, criteria: dict) -> None:
        """Delete every document matching Mongo criteria (``{}`` deletes all)."""
        compiled = self._compile(criteria)
        with self._transaction() as conn:
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
        statements = [
            f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {_quote_identifier(name)} "
            f"ON {self._table} ({_b(parts)}, {_x(parts)})"
        ]
        for depth in range(1, len(parts)):
            parent = ".".join(parts[:depth])
            statements.append(
                f"CREATE INDEX IF NOT EXISTS "
                f"{_quote_identifier(f'{self.collection_name}:{parent}:type')} "
                f"ON {self._table} ({_t(parts[:depth])})"
            )
        try:
            with self._transaction() as conn:
                for statement in statements:
                    conn.execute(statement)
        except sqlite3.Error as err:
            logger.warning("could not create the index on %r: %s", key, err)
            return False
        state = self._state_or_raise()
        with state.lock:
            self._refresh_statistics(state.writer, force=True)
        return True


def _sort_key_function(field: str) -> Callable[[dict], Any]:
    """Return mongomock's sort key for one field (BSON order, arrays by first item)."""

    def sort_key(doc: dict) -> Any:
        return resolve_sort_key(field, doc)

    return sort_key


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


def _distinct_marker(value: Any) -> Any:
    """A hashable stand-in for a value: equal for Mongo-equal values (1 == 1.0 != True)."""
    if isinstance(value, dict | list):
        return _type_class(value), _dumps(value)
    if isinstance(value, float) and math.isnan(value):
        return _NUMBER, "NaN"
    return _type_class(value), value
