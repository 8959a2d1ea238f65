"""PostgresStore: a maggma Store in a PostgreSQL table of JSONB documents, the shared cache backend.

One table per store: ``(key TEXT COLLATE "C" PRIMARY KEY, seq BIGINT, doc JSONB)``. ``key`` is
the JSON encoding of the document's key field (so ``1`` and ``"1"`` differ, and an anchored
prefix regex on a string key is a range of the primary key), ``seq`` the insertion order (ties
in sorts) and ``doc`` the whole document. Two more tables hold the coordination state of
shared caches: ``<table>_claims`` (in-flight claims with leases on the database clock) and
``<table>_aliases`` (alias -> digest, e.g. run folders).

Values JSONB cannot hold are tagged as in :mod:`jobflow_cache.docstore` (Mongo
extended-JSON style): datetimes ``{"$date": "YYYY-MM-DDTHH:MM:SS.ffffffZ"}`` (UTC, read back
naive), bytes ``{"$binary": base64}``, and ``{"$numberDouble": text}`` for NaN, infinities,
``-0.0`` and floats of magnitude >= 1e16 (whose JSON text has no fraction, so JSONB's numeric
would read them back as ints). Strings holding NUL characters, which PostgreSQL text cannot,
are stored as ``{"$string": <their JSON text>}``. Documents may therefore not use these keys.
JSONB keeps no key order: documents come back with equal contents, keys reordered.

Queries take MongoDB criteria, translated to SQL over three expressions per field (its BSON
type class, its numeric value and its text in code-point order), which :meth:`ensure_index`
indexes, so comparisons, ranges and sorts follow MongoDB's type bracketing and order whatever
the database's collation. Arrays on a path are matched element-wise in SQL as MongoDB does;
the few operators SQL cannot express are checked row by row in Python with mongomock's
matcher, on rows the SQL part narrowed down.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
import os
import re
import socket
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from decimal import Decimal
from importlib import import_module
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlsplit

import orjson
import xxhash
from maggma.core import StoreError
from pydash import get

from jobflow_cache.backends.base import json_kind
from jobflow_cache.docstore import (  # one encoding and Mongo semantics for both stores
    _ARRAY,
    _BINARY,
    _BINDATA,
    _BOOL,
    _DATE,
    _DATETIME,
    _DOUBLE,
    _NULL,
    _NUMBER,
    _OBJECT,
    NOTHING,
    DocStore,
    _add_distinct,
    _distinct_marker,
    _field_operators,
    _format_datetime,
    _Fragment,
    _from_storable,
    _increment_key,
    _increment_paths,
    _joined,
    _key_literal,
    _negation,
    _NotPlainError,
    _orjson_default,
    _Page,
    _project,
    _regex_pattern,
    _sanitize,
    _sorted_page,
    _split_path,
    _sql_sort_items,
    _sub_criteria,
    _unreadable,
    filter_applies,
    iter_key_candidates,
)
from jobflow_cache.docstore import _STRING as _STR  # the type class; _STRING is a tag here
from jobflow_cache.errors import StoreUnavailableError

if TYPE_CHECKING:
    from types import ModuleType

    from psycopg import Connection, Cursor
    from psycopg_pool import ConnectionPool

__all__ = ["PostgresStore"]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_COMMENT_TAG = "jobflow-cache PostgresStore "
_MIN_SERVER_VERSION = 140000  # numeric infinities (sorting +/-inf among numbers)
_INSTALL_HINT = "pip install 'jobflow-cache[postgres]'"

_STRING = "$string"
_RESERVED_KEYS = frozenset({_DATE, _BINARY, _DOUBLE, _STRING})

#: Characters of a field's text kept in its index: B-tree entries must stay small, and any
#: value longer than this is compared on its full text after the index narrowed it down.
_PREFIX_CHARS = 200
_FETCH_BATCH = 256
_MAX_TABLE_BYTES = 48  # "<table>_aliases" and index names must fit PostgreSQL's 63 bytes
#: Result sizes up to which a query is read in one round trip instead of through a cursor.
_SMALL_LIMIT = 1000
_LARGE_FLOAT = 1e16  # floats this large print without a fraction: JSONB would give an int

_Test = Callable[[str], _Fragment]

# Process states left behind in a forked child: never used, closed or freed there (their
# sockets belong to the parent; see _State.abandon).
_ABANDONED: list[Any] = []
_CURSOR_IDS = itertools.count(1)


# --------------------------------------------------------------------------- encoding


_PLAIN = frozenset({str, int, float, bool, type(None), dict, list, tuple, datetime, bytes})


def _to_storable(obj: Any, strict: bool = False) -> Any:
    """Replace values JSONB cannot hold by their tagged encodings (see the module docstring).

    With ``strict``, raise :class:`_NotPlainError` on anything ``jsanitize(allow_bson=True)``
    would change (other than a tuple, which both make a list): such documents need no
    sanitising, which is most of the cost of a write otherwise.
    """
    kind = type(obj)
    if strict and kind not in _PLAIN:
        raise _NotPlainError
    if kind is str:
        return {_STRING: orjson.dumps(obj).decode("utf-8")} if "\x00" in obj else obj
    if kind is int or kind is bool or obj is None:
        return obj
    if isinstance(obj, dict):
        out = {}
        for key, value in obj.items():
            if isinstance(key, str):
                if key in _RESERVED_KEYS:
                    raise ValueError(f"the key {key!r} is reserved by PostgresStore's encoding")
                if "\x00" in key:
                    raise ValueError(f"document keys cannot hold NUL characters: {key!r}")
            elif strict:
                raise _NotPlainError
            out[key] = (
                value
                if type(value) is str and "\x00" not in value
                else (_to_storable(value, strict))
            )
        return out
    if isinstance(obj, list | tuple):
        return [_to_storable(value, strict) for value in obj]
    if isinstance(obj, float):
        if math.isnan(obj):
            return {_DOUBLE: "NaN"}
        if math.isinf(obj):
            return {_DOUBLE: "Infinity" if obj > 0 else "-Infinity"}
        if abs(obj) >= _LARGE_FLOAT or (obj == 0 and math.copysign(1.0, obj) < 0):
            return {_DOUBLE: repr(obj)}
        return obj
    if isinstance(obj, str):
        return _to_storable(str(obj))
    if isinstance(obj, datetime):
        return {_DATE: _format_datetime(obj)}
    if isinstance(obj, bytes | bytearray):
        return {_BINARY: base64.b64encode(bytes(obj)).decode("ascii")}
    return obj


def _dumps(obj: Any) -> str:
    """Encode a sanitised document (or value) to the JSON text stored."""
    return orjson.dumps(_to_storable(obj), default=_orjson_default).decode("utf-8")


def _loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSONB text from the server, restoring the tagged values."""
    raw = bytes(data) if isinstance(data, bytearray | memoryview) else data
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:  # integers beyond 64 bits: orjson refuses them
        obj = json.loads(raw)
    marker = b'"$' if isinstance(raw, bytes) else '"$'
    return _from_storable(obj, _STRING) if marker in raw else obj  # type: ignore[operator]


def _naive_utc(obj: Any) -> Any:
    """Criteria with aware datetimes made naive UTC, as documents are read back."""
    if isinstance(obj, datetime):
        if obj.tzinfo is not None:
            return obj.astimezone(timezone.utc).replace(tzinfo=None)
        return obj
    if isinstance(obj, dict):
        return {key: _naive_utc(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_naive_utc(value) for value in obj)
    return obj


def _nor_for_not(criteria: Any) -> Any:
    """Criteria with each field's ``$not`` written as the ``$nor`` it means in MongoDB.

    mongomock answers ``{"a.b": {"$not": ...}}`` wrongly when ``a`` is an empty array or a
    scalar (MongoDB, ``$ne`` and ``$nor`` all match there; its ``$not`` does not).

    Examples
    --------
    >>> _nor_for_not({"a.b": {"$not": {"$gt": 0}, "$lt": 5}})
    {'$and': [{'a.b': {'$lt': 5}}, {'$nor': [{'a.b': {'$gt': 0}}]}]}
    """
    if not isinstance(criteria, Mapping):
        return criteria
    kept: dict[str, Any] = {}
    nors: list[dict[str, Any]] = []
    for key, value in criteria.items():
        if key in ("$and", "$or", "$nor") and isinstance(value, list | tuple):
            kept[key] = [_nor_for_not(sub) for sub in value]
        elif not str(key).startswith("$") and isinstance(value, Mapping) and "$not" in value:
            rest = {op: v for op, v in value.items() if op != "$not"}
            if rest:
                nors.append({key: rest})
            nors.append({"$nor": [{key: value["$not"]}]})
        else:
            kept[key] = value
    if not nors:
        return kept
    return {"$and": [kept, *nors]} if kept else {"$and": nors}


# --------------------------------------------------------------------------- SQL expressions


def _quote(name: str) -> str:
    """Quote an SQL identifier, as a parameter value (``to_regclass(%s)``)."""
    return '"' + name.replace('"', '""') + '"'


def _ident(name: str) -> str:
    """Quote an SQL identifier in a statement run with parameters."""
    return _quote(name).replace("%", "%%")


def _lit(text: str) -> str:
    """Quote an SQL string literal embedded in a statement run with parameters."""
    return "'" + text.replace("'", "''").replace("%", "%%") + "'"


def _path(parts: Sequence[str]) -> str:
    """The JSONB value at a path of a document (SQL NULL when missing)."""
    return "(doc" + "".join(f" -> {_lit(part)}" for part in parts) + ")"


def _jsonpath(parts: Sequence[str]) -> str:
    """The lax SQL/JSON path of a field: arrays on the way are unwrapped one level, as
    MongoDB does for a dotted field."""
    quoted = (part.replace("\\", "\\\\").replace('"', '\\"') for part in parts)
    return _lit("lax $" + "".join(f'."{part}"' for part in quoted))


def _is_array(e: str) -> str:
    """SQL: whether a JSONB value is an array (FALSE, never NULL, when it is missing)."""
    return f"coalesce(jsonb_typeof({e}) = 'array', FALSE)"


def _cls(e: str) -> str:
    """SQL: the BSON type class of a JSONB value (missing counts as null)."""
    return (
        f"(CASE jsonb_typeof({e}) WHEN 'number' THEN {_NUMBER} WHEN 'string' THEN {_STR} "
        f"WHEN 'boolean' THEN {_BOOL} WHEN 'array' THEN {_ARRAY} WHEN 'object' THEN "
        f"(CASE WHEN {e} ? '{_DATE}' THEN {_DATETIME} WHEN {e} ? '{_BINARY}' THEN {_BINDATA} "
        f"WHEN {e} ? '{_DOUBLE}' THEN {_NUMBER} WHEN {e} ? '{_STRING}' THEN {_STR} "
        f"ELSE {_OBJECT} END) ELSE {_NULL} END)"
    )


def _num(e: str) -> str:
    """SQL: the exact numeric value of a number (NaN as -Infinity, told apart by its text)."""
    return (
        f"(CASE jsonb_typeof({e}) WHEN 'number' THEN ({e})::numeric WHEN 'object' THEN "
        f"(CASE {e} ->> '{_DOUBLE}' WHEN 'NaN' THEN '-Infinity'::numeric "
        f"ELSE ({e} ->> '{_DOUBLE}')::numeric END) END)"
    )


def _txt(e: str) -> str:
    """SQL: the text of a value, compared in code-point order (MongoDB's string order).

    Strings, booleans (``false`` < ``true``), dates (fixed-width ISO text), binary (base64);
    ``'NaN'`` for NaN and NULL for other numbers; JSON text for objects and arrays.
    """
    return (
        f"((CASE jsonb_typeof({e}) WHEN 'string' THEN {e} #>> '{{}}' "
        f"WHEN 'boolean' THEN {e} #>> '{{}}' WHEN 'array' THEN ({e})::text "
        f"WHEN 'object' THEN (CASE WHEN {e} ? '{_DOUBLE}' THEN "
        f"(CASE {e} ->> '{_DOUBLE}' WHEN 'NaN' THEN 'NaN' END) "
        f"ELSE coalesce({e} ->> '{_DATE}', {e} ->> '{_BINARY}', {e} ->> '{_STRING}', "
        f'({e})::text) END) END) COLLATE "C")'
    )


def _pre(e: str) -> str:
    """SQL: the indexed prefix of :func:`_txt`."""
    return f"left({_txt(e)}, {_PREFIX_CHARS})"


def _sort_terms(e: str, word: str) -> list[str]:
    return [f"{_cls(e)} {word}", f"{_num(e)} {word}", f"{_pre(e)} {word}", f"{_txt(e)} {word}"]


def _and(fragments: list[_Fragment]) -> _Fragment:
    return _joined(fragments, "AND", "TRUE")


def _or(fragments: list[_Fragment]) -> _Fragment:
    return _joined(fragments, "OR", "FALSE")


def _decimal(value: int | float) -> Decimal:
    """A number as the exact decimal it is stored as (floats by their shortest repr)."""
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


class _Where(NamedTuple):
    """A translated condition: SQL, its parameters, and whether the SQL alone is exact (when
    not, it selects a superset and the criteria are checked again in Python)."""

    sql: str
    params: list[Any]
    exact: bool


_TRUE = _Where("TRUE", [], True)
_ANY = _Where("TRUE", [], False)  # "some rows": left to the Python check


def _all(parts: list[_Where]) -> _Where:
    sql, params = _and([(w.sql, w.params) for w in parts])
    return _Where(sql, params, all(w.exact for w in parts))


def _any(parts: list[_Where]) -> _Where:
    sql, params = _or([(w.sql, w.params) for w in parts])
    return _Where(sql, params, all(w.exact for w in parts))


def _negate(where: _Where) -> _Where:
    if not where.exact:
        return _ANY  # NOT of a superset is no superset
    return _Where(f"(NOT coalesce({where.sql}, FALSE))", where.params, True)


_LITERAL_CHAR = re.compile(r"[A-Za-z0-9_ !#%&',/:;<=>@`~-]")


def _regex_prefix(pattern: str) -> tuple[str, bool] | None:
    """The literal text every match of an anchored regex starts with, and whether the regex
    is nothing more (``^literal``). None when it has no such prefix.

    Only printable ASCII literal characters (escaped punctuation included) count; a
    quantifier after the last one makes it optional, so it is left out.

    Examples
    --------
    >>> _regex_prefix("^3f2c"), _regex_prefix(r"^relax\\-1.*$"), _regex_prefix("^ab?")
    (('3f2c', True), ('relax-1', False), ('a', False))
    >>> _regex_prefix("^a|b"), _regex_prefix("abc")
    (None, None)
    """
    if not pattern.startswith("^") or "|" in pattern:
        return None
    literal: list[str] = []
    i = 1
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern) and not pattern[i + 1].isalnum():
            escaped = pattern[i + 1]
            if not (" " <= escaped <= "~") or escaped in '"\\':
                break
            literal.append(escaped)
            i += 2
        elif _LITERAL_CHAR.fullmatch(char):
            literal.append(char)
            i += 1
        else:
            break
    rest = pattern[i:]
    if rest[:1] in ("*", "?", "{") and literal:
        literal.pop()
        rest = "?"  # not a pure prefix
    if not literal:
        return None
    return "".join(literal), rest == ""


def _successor(text: str) -> str:
    """The smallest string greater than every string starting with ``text`` (ASCII text)."""
    return text[:-1] + chr(ord(text[-1]) + 1)


class _Translator:
    """Translate MongoDB criteria to a :class:`_Where` over the document column ``doc``.

    A positive condition on a field is exact SQL for documents without arrays on its path,
    ORed with the same condition on every element MongoDB would look at when there are
    arrays (``jsonb_array_elements``, and a lax SQL/JSON path for dotted fields). Negations
    are ``NOT`` of the exact positive form. What cannot be written in SQL selects every row
    and leaves the decision to mongomock's matcher in Python.
    """

    _COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
    _LOOSE = {">": ">=", ">=": ">=", "<": "<=", "<=": "<="}

    def __init__(self, key_field: str) -> None:
        self.key_field = key_field

    def compile(self, criteria: Mapping[str, Any] | None) -> _Where:
        if criteria is None:
            return _TRUE
        if not isinstance(criteria, Mapping):
            raise TypeError(f"criteria must be a dict, not {type(criteria).__name__}")
        return self._document(criteria)

    def _document(self, criteria: Mapping[str, Any]) -> _Where:
        return _all([self._item(key, value) for key, value in criteria.items()])

    def _item(self, key: Any, value: Any) -> _Where:
        if key in ("$and", "$or", "$nor"):
            subs = [self._document(sub) for sub in _sub_criteria(key, value)]
            if key == "$and":
                return _all(subs)
            return _any(subs) if key == "$or" else _negate(_any(subs))
        if not isinstance(key, str):
            raise TypeError(f"field names must be strings, not {key!r}")
        parts = _split_path(key)
        if key.startswith("$") or parts is None:
            return _ANY
        ops = _field_operators(value)
        if key == self.key_field:
            return self._key_field(parts, ops)
        return self._field(parts, ops)

    # -- the store key: the primary key column answers it
    def _key_field(self, parts: list[str], ops: dict[str, Any]) -> _Where:
        wheres: list[_Where] = []
        rest: dict[str, Any] = {}
        for op, value in ops.items():
            if op in ("$eq", "$ne"):
                literal = _key_literal(value)
                if literal is None:  # no key holds it: nothing equal, everything different
                    wheres.append(_Where("FALSE" if op == "$eq" else "TRUE", [], True))
                else:
                    wheres.append(_Where(f"key {'=' if op == '$eq' else '<>'} %s", [literal], True))
            elif op in ("$in", "$nin") and isinstance(value, list | tuple):
                if any(isinstance(v, re.Pattern | dict) for v in value):
                    rest[op] = value
                    continue
                literals = [lit for lit in map(_key_literal, value) if lit is not None]
                where = _Where("key = ANY(%b::text[])", [literals], True)
                wheres.append(where if op == "$in" else _negate(where))
            elif op == "$exists":
                wheres.append(_Where("TRUE" if value else "FALSE", [], True))
            elif op == "$regex" and "$options" not in ops and isinstance(value, str):
                prefix = _regex_prefix(value)
                if prefix is None:
                    rest[op] = value
                    continue
                text, pure = prefix
                low = orjson.dumps(text).decode()[:-1]  # '"abc': the column's JSON text
                where = _Where("(key >= %s AND key < %s)", [low, _successor(low)], pure)
                wheres.append(where)
                if not pure:
                    rest[op] = value
            else:
                rest[op] = value
        if rest:
            wheres.append(self._field(parts, rest))
        return _all(wheres)

    # -- any other field
    def _field(self, parts: list[str], ops: dict[str, Any]) -> _Where:
        wheres: list[_Where] = []
        for op, value in ops.items():
            if op == "$options":
                if "$regex" not in ops:
                    wheres.append(_ANY)
                continue
            negated = _negation(op, value, "$unknown")  # invalid $not: the Python check reports it
            if negated is not None:
                wheres.append(_negate(self._positive(parts, negated)))
            else:
                wheres.append(self._positive(parts, {op: value, "$options": ops.get("$options")}))
        return _all(wheres)

    def _positive(self, parts: list[str], ops: dict[str, Any]) -> _Where:
        """The positive operators (``$options`` going with ``$regex``) on one field."""
        options = ops.get("$options")
        wheres = []
        for op, value in ops.items():
            if op == "$options":
                if value is not None and "$regex" not in ops:
                    wheres.append(_ANY)
                continue
            if op == "$exists":
                wheres.append(self._exists(parts) if value else _negate(self._exists(parts)))
                continue
            test = self._test(op, value, options)
            if test is None:
                wheres.append(_ANY)
                continue
            function, exact, null_like = test
            wheres.append(self._elementwise(parts, function, exact, null_like))
        return _all(wheres)

    def _exists(self, parts: list[str]) -> _Where:
        direct = f"({_path(parts)} IS NOT NULL)"
        if len(parts) == 1:
            return _Where(direct, [], True)
        guard = " OR ".join(_is_array(_path(parts[:depth])) for depth in range(1, len(parts)))
        return _Where(
            f"({direct} OR (({guard}) AND jsonb_path_exists(doc, {_jsonpath(parts)})))", [], True
        )

    def _elementwise(self, parts: list[str], test: _Test, exact: bool, null_like: bool) -> _Where:
        """A scalar test on a field, applied to every value MongoDB compares: the field
        itself, and the elements of arrays on its path."""
        e = _path(parts)
        direct_sql, direct_params = test(e)
        if len(parts) == 1:
            inner, inner_params = test("v")
            return _Where(
                f"({direct_sql} OR ({_cls(e)} = {_ARRAY} AND EXISTS (SELECT 1 FROM "
                f"jsonb_array_elements({e}) AS _a(v) WHERE {inner})))",
                [*direct_params, *inner_params],
                exact,
            )
        guard = " OR ".join(_is_array(_path(parts[:depth])) for depth in range(1, len(parts) + 1))
        if null_like:  # a missing field inside an array of objects: left to mongomock
            return _Where(
                f"(({direct_sql} AND NOT ({guard})) OR ({guard}))", list(direct_params), False
            )
        t1, p1 = test("v")
        t2, p2 = test("w")
        return _Where(
            f"({direct_sql} OR (({guard}) AND EXISTS (SELECT 1 FROM jsonb_path_query(doc, "
            f"{_jsonpath(parts)}) AS _p(v) WHERE {t1} OR ({_is_array('v')} AND EXISTS "
            f"(SELECT 1 FROM jsonb_array_elements(v) AS _q(w) WHERE {t2})))))",
            [*direct_params, *p1, *p2],
            exact,
        )

    def _test(self, op: str, value: Any, options: Any) -> tuple[_Test, bool, bool] | None:
        """``(test, exact, matches null)`` for one positive operator on scalars, or None."""
        if op == "$eq":
            test = self._equals(value)
            return None if test is None else (test, True, value is None)
        if op == "$in":
            if not isinstance(value, list | tuple):
                return None
            tests = [self._equals(v) for v in value]
            if any(t is None for t in tests):
                return None
            return self._in(list(value)), True, any(v is None for v in value)
        if op in self._COMPARISONS:
            return self._compare(self._COMPARISONS[op], value)
        if op == "$regex":
            return self._regex(value, options)
        return None

    @staticmethod
    def _equals(value: Any) -> _Test | None:
        if value is None:
            return lambda e: (f"({_cls(e)} = {_NULL})", [])
        if isinstance(value, bool):
            text = "true" if value else "false"
            return lambda e: (f"({_cls(e)} = {_BOOL} AND {_pre(e)} = %s)", [text])
        if isinstance(value, int | float):
            if isinstance(value, float) and math.isnan(value):
                return lambda e: (f"({_cls(e)} = {_NUMBER} AND {_pre(e)} = 'NaN')", [])
            number = _decimal(value)
            return lambda e: (
                f"({_cls(e)} = {_NUMBER} AND {_num(e)} = %s::numeric AND {_pre(e)} IS NULL)",
                [number],
            )
        text_class = _text_class(value)
        if text_class is None:
            return None
        cls, text = text_class
        if len(text) < _PREFIX_CHARS:
            return lambda e: (f"({_cls(e)} = {cls} AND {_pre(e)} = %s)", [text])
        head = text[:_PREFIX_CHARS]
        return lambda e: (
            f"({_cls(e)} = {cls} AND {_pre(e)} = %s AND {_txt(e)} = %s)",
            [head, text],
        )

    def _in(self, values: list[Any]) -> _Test:
        numbers = [_decimal(v) for v in values if _is_number(v) and not _is_nan(v)]
        texts: dict[int, list[str]] = {}
        singles = []
        for value in values:
            found = _text_class(value)
            if found is not None and len(found[1]) < _PREFIX_CHARS:
                texts.setdefault(found[0], []).append(found[1])
            elif found is not None or value is None or _is_nan(value):
                single = self._equals(value)
                assert single is not None
                singles.append(single)

        def test(e: str) -> _Fragment:
            fragments = [t(e) for t in singles]
            if numbers:
                fragments.append(
                    (
                        f"({_cls(e)} = {_NUMBER} AND {_num(e)} = ANY(%s::numeric[]) "
                        f"AND {_pre(e)} IS NULL)",
                        [numbers],
                    )
                )
            for cls, group in texts.items():
                fragments.append((f"({_cls(e)} = {cls} AND {_pre(e)} = ANY(%b::text[]))", [group]))
            return _or(fragments)

        return test

    def _compare(self, sign: str, value: Any) -> tuple[_Test, bool, bool] | None:
        if value is None or _is_nan(value) or isinstance(value, dict | list | tuple):
            return None
        if _is_number(value):
            number = _decimal(value)
            return (
                lambda e: (
                    f"({_cls(e)} = {_NUMBER} AND {_num(e)} {sign} %s::numeric "
                    f"AND {_pre(e)} IS NULL)",
                    [number],
                ),
                True,
                False,
            )
        text_class = _text_class(value)
        if text_class is None:
            return None
        cls, text = text_class
        if len(text) < _PREFIX_CHARS:
            return (lambda e: (f"({_cls(e)} = {cls} AND {_pre(e)} {sign} %s)", [text])), True, False
        loose = self._LOOSE[sign]
        head = text[:_PREFIX_CHARS]
        return (
            lambda e: (
                f"({_cls(e)} = {cls} AND {_pre(e)} {loose} %s AND {_txt(e)} {sign} %s)",
                [head, text],
            ),
            True,
            False,
        )

    @staticmethod
    def _regex(value: Any, options: Any) -> tuple[_Test, bool, bool]:
        pattern = _regex_pattern(value, options)
        prefix = None
        if pattern is not None and not pattern.startswith("(?"):
            prefix = _regex_prefix(pattern)
        if prefix is None or len(prefix[0]) >= _PREFIX_CHARS:
            return (lambda e: (f"({_cls(e)} = {_STR})", [])), False, False
        text, pure = prefix
        bounds = [text, _successor(text)]
        return (
            lambda e: (f"({_cls(e)} = {_STR} AND {_pre(e)} >= %s AND {_pre(e)} < %s)", bounds),
            pure,
            False,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _text_class(value: Any) -> tuple[int, str] | None:
    """``(type class, text)`` of a value compared by its text (see :func:`_txt`), or None."""
    if isinstance(value, bool):
        return _BOOL, "true" if value else "false"
    if isinstance(value, str):
        return (_STR, value) if "\x00" not in value else None
    if isinstance(value, datetime):
        return _DATETIME, _format_datetime(value)
    if isinstance(value, bytes | bytearray):
        return _BINDATA, base64.b64encode(bytes(value)).decode("ascii")
    return None


# --------------------------------------------------------------------------- connections


def _modules() -> tuple[ModuleType, ModuleType]:
    """psycopg and psycopg_pool, imported on first use (they are an optional dependency)."""
    try:
        return import_module("psycopg"), import_module("psycopg_pool")
    except ImportError as err:
        raise StoreUnavailableError(
            f"PostgresStore needs psycopg and psycopg-pool: {_INSTALL_HINT} ({err})"
        ) from err


class _State:
    """One process's connection pool, the connections it made and what is known to exist."""

    def __init__(self, pool: ConnectionPool, pg: ModuleType, pool_module: ModuleType) -> None:
        self.pid = os.getpid()
        self.pool = pool
        self.pg = pg
        self.pool_module = pool_module
        self.connections: weakref.WeakSet[Any] = weakref.WeakSet()
        self.indexes: set[str] = set()
        self.lock = threading.Lock()

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


_LIVE: weakref.WeakSet[_State] = weakref.WeakSet()
_OPEN_LOCK = threading.RLock()  # one pool per store and process, even if threads race


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
        split = urlsplit(uri)
        parts = {
            "host": split.hostname or "",
            "port": str(split.port or ""),
            "user": unquote(split.username or ""),
            "dbname": unquote(split.path.lstrip("/")),
        }
    else:
        parts = {k: v.strip("'") for k, v in _DSN_PAIR.findall(uri)}
    return {k: parts.get(k, "") for k in ("host", "port", "user", "dbname")}


def _redact(uri: str) -> str:
    """The URI with its password hidden."""
    if uri.startswith(("postgresql://", "postgres://")):
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", uri)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", uri)


# --------------------------------------------------------------------------- the store


class PostgresStore(DocStore):
    """A maggma Store in a PostgreSQL table of JSONB documents: one cache for many machines.

    Each process keeps a small connection pool (``psycopg_pool``), made again by itself after
    ``fork()``; the store may be used from several threads at once. Writes are single
    ``INSERT ... ON CONFLICT`` statements (a batch is one statement), so each document is
    written whole and concurrent writers never interleave inside one; the last writer wins.

    Queries take MongoDB criteria: equality (dotted paths, ``None`` = null or missing),
    ``$eq $ne $gt $gte $lt $lte $in $nin $exists $not $and $or $nor`` and anchored-prefix
    ``$regex`` run as SQL with MongoDB's type bracketing and array semantics; other
    regular expressions and operators (``$elemMatch``, ``$size``, ``$all``, ``$type``,
    equality with a sub-document, numeric path components, ...) are checked by mongomock on
    the rows the rest narrowed down. Sorts follow BSON order (null, numbers, strings,
    objects, arrays, binary, booleans, dates; strings by code point), ties in insertion
    order; arrays sort as whole values, not by their smallest element. Needs PostgreSQL 14
    or later and a UTF-8 database.

    Parameters
    ----------
    uri
        libpq connection URI or string, e.g. ``postgresql://user:pw@host:5432/db``.
    table
        The table of documents (created on :meth:`connect`, with ``<table>_claims`` and
        ``<table>_aliases``); at most 48 bytes.
    key
        The field identifying a document (a str or int in every document).
    pool_size
        Most connections this process keeps open.
    connect_timeout
        Seconds to wait for a connection (also how long a busy pool is waited for).
    **kwargs
        Passed on to :class:`maggma.core.Store` (``last_updated_field``, ``validator``...).

    Examples
    --------
    >>> store = PostgresStore("postgresql://cache@db.example.org/cache", table="entries")
    >>> store.name, store.key
    ('postgresql://cache@db.example.org/cache/entries', 'digest')
    >>> PostgresStore.from_dict(store.as_dict()) == store
    True
    """

    #: Safe to call from several threads at once (CacheStore's writer thread relies on it).
    thread_safe = True

    def __init__(
        self,
        uri: str,
        table: str = "jobflow_cache",
        key: str = "digest",
        pool_size: int = 4,
        connect_timeout: float = 5.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(uri, str) or not uri:
            raise ValueError("PostgresStore needs a connection URI")
        if not isinstance(table, str) or not table or "\x00" in table:
            raise ValueError("table must be a non-empty string")
        if len(table.encode("utf-8")) > _MAX_TABLE_BYTES:
            raise ValueError(f"table names are at most {_MAX_TABLE_BYTES} bytes: {table!r}")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        if connect_timeout <= 0:
            raise ValueError("connect_timeout must be > 0")
        self.uri = uri
        self.table = table
        self.pool_size = int(pool_size)
        self.connect_timeout = float(connect_timeout)
        self.kwargs = kwargs
        self._state: _State | None = None
        super().__init__(key=key, **kwargs)

    # ---------------------------------------------------------------- identity

    @property
    def name(self) -> str:
        """``postgresql://user@host:port/dbname/table`` (never the password)."""
        parts = _conninfo_parts(self.uri)
        user = f"{parts['user']}@" if parts["user"] else ""
        port = f":{parts['port']}" if parts["port"] else ""
        return f"postgresql://{user}{parts['host']}{port}/{parts['dbname']}/{self.table}"

    def __eq__(self, other: object) -> bool:
        """Stores are equal when they use the same server, database, table and key."""
        if not isinstance(other, PostgresStore):
            return False
        return (self.name, self.key) == (other.name, other.key)

    def __hash__(self) -> int:
        """Hash consistent with :meth:`__eq__`."""
        return hash((self.name, self.key))

    def __repr__(self) -> str:
        """Show the server (password hidden), table and key."""
        return f"PostgresStore(uri={_redact(self.uri)!r}, table={self.table!r}, key={self.key!r})"

    @property
    def collection_name(self) -> str:
        """The table of documents (named like MongoStore's collection, for tools that log it)."""
        return self.table

    @property
    def _t(self) -> str:
        return _ident(self.table)

    @property
    def _claims(self) -> str:
        return _ident(f"{self.table}_claims")

    @property
    def _aliases(self) -> str:
        return _ident(f"{self.table}_aliases")

    # ---------------------------------------------------------------- connections

    def connect(self, force_reset: bool = False) -> None:
        """Connect (creating the tables if needed) and open this process's pool.

        Parameters
        ----------
        force_reset
            Open a new pool even if connected.

        Raises
        ------
        StoreUnavailableError
            If psycopg is missing, the server cannot be reached within ``connect_timeout``,
            it is older than PostgreSQL 14 or not UTF-8, or the table exists with another key
            field or was not made by PostgresStore.
        """
        with _OPEN_LOCK:
            state = self._state
            if state is not None and state.pid == os.getpid() and not force_reset:
                return
            self._state = None
            if state is not None:
                _LIVE.discard(state)
                if state.pid == os.getpid():
                    state.close()
                else:
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

    @property
    def _collection(self) -> ConnectionPool:
        """This process's connection pool.

        Raises
        ------
        StoreError
            If the store is not connected.
        """
        return self._state_or_raise().pool

    def _connect_kwargs(self, pg: ModuleType) -> dict[str, Any]:
        given = pg.conninfo.conninfo_to_dict(self.uri)
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = max(2, math.ceil(self.connect_timeout))
        if "application_name" not in given:
            kwargs["application_name"] = "jobflow-cache"
        return kwargs

    def _open(self) -> _State:
        pg, pool_module = _modules()
        try:
            kwargs = self._connect_kwargs(pg)
        except pg.Error as err:
            raise StoreUnavailableError(f"bad PostgreSQL connection string: {err}") from err
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
            pg.types.json.set_json_loads(_loads, conn)
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
        _LIVE.add(state)
        logger.debug("connected to %s", self.name)
        return state

    def _check_server(self, conn: Connection[Any]) -> None:
        if conn.info.server_version < _MIN_SERVER_VERSION:
            raise StoreUnavailableError(
                f"PostgresStore needs PostgreSQL 14 or later; {self.name} runs "
                f"{conn.info.server_version}"
            )
        encoding = conn.execute("SHOW server_encoding").fetchone()
        if encoding is None or str(encoding[0]).upper() not in ("UTF8", "UTF-8"):
            raise StoreUnavailableError(
                f"PostgresStore needs a UTF-8 database; {self.name} uses {encoding}"
            )

    def _lock_id(self, what: str) -> int:
        """A 64-bit advisory lock id for creating this table's objects."""
        return xxhash.xxh64_intdigest(f"jobflow-cache:{self.table}:{what}".encode()) - 2**63

    def _create_schema(self, conn: Connection[Any]) -> None:
        comment = _COMMENT_TAG + orjson.dumps({"format": _FORMAT_VERSION, "key": self.key}).decode(
            "utf-8"
        )
        check = (
            "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL "
            "AND to_regclass(%s) IS NOT NULL, obj_description(to_regclass(%s), 'pg_class')"
        )
        table = _quote(self.table)
        names = [table, _quote(f"{self.table}_claims"), _quote(f"{self.table}_aliases"), table]
        row = conn.execute(check, names).fetchone()
        if row is None or not row[0]:
            with conn.transaction():
                # concurrent CREATE TABLE IF NOT EXISTS can fail on the catalog: serialise
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_id("schema")])
                conn.execute(
                    f'CREATE TABLE IF NOT EXISTS {self._t} (key text COLLATE "C" PRIMARY KEY, '
                    "seq bigint GENERATED BY DEFAULT AS IDENTITY, doc jsonb NOT NULL)",
                    [],
                )
                conn.execute(
                    f'CREATE TABLE IF NOT EXISTS {self._claims} (name text COLLATE "C" '
                    "PRIMARY KEY, owner text NOT NULL, expires timestamptz NOT NULL)",
                    [],
                )
                conn.execute(
                    f'CREATE TABLE IF NOT EXISTS {self._aliases} (alias text COLLATE "C" '
                    "PRIMARY KEY, digest text NOT NULL)",
                    [],
                )
                row = conn.execute(check, names).fetchone()
                if row is not None and row[1] is None:
                    conn.execute(f"COMMENT ON TABLE {self._t} IS {_lit(comment)}", [])
                    row = (True, comment)
        found = row[1] if row is not None else None
        if found != comment:
            described = "was not made by PostgresStore"
            if isinstance(found, str) and found.startswith(_COMMENT_TAG):
                described = f"is {found[len(_COMMENT_TAG) :]}"
            raise StoreUnavailableError(
                f"table {self.table!r} of {self.name} {described}; this store was given key "
                f"{self.key!r} (format {_FORMAT_VERSION})"
            )

    def _state_or_raise(self) -> _State:
        state = self._state
        if state is None:
            raise StoreError("PostgresStore is not connected: call connect() first")
        if state.pid != os.getpid():  # forked: never touch the parent's connections
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
        """Run ``work(conn)`` on a pooled connection.

        It runs again after a deadlock or a serialisation failure (the transaction was rolled
        back) and, with ``retry_broken``, on another connection when its connection broke
        under it (e.g. the server restarted since it was opened): only for work that is safe
        to repeat even if it was done.
        """
        state = self._state_or_raise()
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

    def _compile(self, criteria: Mapping[str, Any] | None) -> _Where:
        return _Translator(self.key).compile(criteria)

    @staticmethod
    def _matcher(criteria: Mapping[str, Any] | None) -> Callable[[dict], bool]:
        """mongomock's matcher for criteria SQL could not decide."""
        normal = _nor_for_not(_naive_utc(dict(criteria or {})))

        def matches(doc: dict) -> bool:
            try:
                return bool(filter_applies(normal, doc))
            except Exception as err:
                raise ValueError(f"cannot evaluate criteria {criteria!r}: {err}") from err

        return matches

    # ---------------------------------------------------------------- reading

    def _rows(
        self, sql: str, params: Sequence[Any], expected: int = 0
    ) -> Generator[tuple, None, None]:
        """Stream the rows of a query: one round trip if at most ``expected`` rows (>0)
        are wanted, else a server-side cursor read a few hundred rows at a time."""
        if 0 < expected <= _SMALL_LIMIT:

            def fetch(conn: Connection[Any]) -> list[tuple]:
                return conn.execute(sql, params).fetchall()

            yield from self._run(fetch)
            return
        state = self._state_or_raise()
        with self._errors(state), state.pool.connection() as conn, conn.transaction():
            cursor: Cursor[Any]
            with conn.cursor(name=f"jfc_{next(_CURSOR_IDS)}") as cursor:
                cursor.execute(sql, params)
                while True:
                    rows = cursor.fetchmany(_FETCH_BATCH)
                    if not rows:
                        return
                    yield from rows

    def _query(self, criteria: dict | None, page: _Page) -> Iterator[dict]:
        """:meth:`query` with its projection, sort, skip and limit parsed and checked."""
        projection, items, skip, limit = page
        where = self._compile(criteria)
        if not all(_split_path(field) is not None for field, _ in items):
            return self._python_sorted(where, criteria, page)
        order = self._order_by(items)
        if where.exact:
            fields = _top_level_fields(projection)
            params: list[Any] = []
            columns = "key, doc"
            if fields is not None:  # the server picks the fields: large ones are never sent
                columns = (
                    "key, (SELECT jsonb_object_agg(_f.k, _f.v) FROM jsonb_each(CASE WHEN "
                    "jsonb_typeof(doc) = 'object' THEN doc ELSE '{}' END) AS _f(k, v) "
                    "WHERE _f.k = ANY(%b::text[])), jsonb_typeof(doc)"
                )
                params.append(fields)
            sql = f"SELECT {columns} FROM {self._t} WHERE {where.sql}{order}"
            params += where.params
            if limit:
                sql += " LIMIT %s"
                params.append(limit)
            if skip:
                sql += " OFFSET %s"
                params.append(skip)
            rows = self._rows(sql, params, limit)
            if fields is not None:
                return _fields(rows, self.key)
            return _documents(rows, projection, self.key)
        sql = f"SELECT key, doc FROM {self._t} WHERE {where.sql}{order}"
        docs = filter(
            self._matcher(criteria), _documents(self._rows(sql, where.params), None, self.key)
        )
        stop = skip + limit if limit else None
        found = itertools.islice(docs, skip, stop)
        return found if projection is None else (_project(d, *projection) for d in found)

    @staticmethod
    def _order_by(items: list[tuple[str, int]]) -> str:
        """ORDER BY type class, number, text per field; ties in insertion order."""
        if not items:
            return ""
        terms = []
        for _, parts, word in _sql_sort_items(items):
            terms += _sort_terms(_path(parts), word)
        return " ORDER BY " + ", ".join([*terms, "seq ASC"])

    def _python_sorted(self, where: _Where, criteria: dict | None, page: _Page) -> Iterator[dict]:
        """Sort in Python (mongomock's sort keys) when a sort path is not SQL-addressable."""
        sql = f"SELECT key, doc FROM {self._t} WHERE {where.sql} ORDER BY seq"
        rows = self._rows(sql, where.params)
        matches = None if where.exact else self._matcher(criteria)

        def sorted_docs() -> Iterator[dict]:
            docs = list(_documents(rows, None, self.key))
            if matches is not None:
                docs = [d for d in docs if matches(d)]
            yield from _sorted_page(docs, page)

        return sorted_docs()

    def count(self, criteria: dict | None = None, hint: dict | None = None) -> int:
        """Count the documents matching MongoDB criteria (``hint`` is accepted and ignored)."""
        where = self._compile(criteria)
        if where.exact:
            sql = f"SELECT count(*) FROM {self._t} WHERE {where.sql}"
            rows = self._run(lambda conn: conn.execute(sql, where.params).fetchone())
            return int(rows[0])
        return sum(1 for _ in self.query(criteria))

    def query_key(self, value: str | int, leave_out: Iterable[str] = ()) -> dict | None:
        """The document whose key field is ``value``, or None: one primary-key read.

        ``leave_out`` names top-level fields not to read (dropped by the server, so a large
        field costs neither transfer nor decoding).
        """
        row_key = _key_literal(value)
        if row_key is None or not isinstance(value, str | int):
            return None
        dropped = [name for name in leave_out if isinstance(name, str)]
        if dropped:
            sql = (  # a damaged row holding a scalar comes back as it is
                "SELECT CASE WHEN jsonb_typeof(doc) = 'object' THEN doc - %b::text[] ELSE doc "
                f"END FROM {self._t} WHERE key = %s"
            )
            params: list[Any] = [dropped, row_key]
        else:
            sql = f"SELECT doc FROM {self._t} WHERE key = %s"
            params = [row_key]
        row = self._run(lambda conn: conn.execute(sql, params).fetchone())
        if row is None or row[0] is None:  # no row, or a JSON null: a plain miss
            return None
        doc = row[0]
        if not isinstance(doc, dict):  # a damaged row: a stand-in, never an exception
            return _unreadable(self.key, value, f"the stored row is a JSON {json_kind(doc)}")
        return doc

    def totals(
        self, terms: Mapping[str, Iterable[str]], criteria: dict | None = None
    ) -> dict[str, float]:
        """Sums over the matching documents, in one scan, of products of numeric fields.

        ``{"hits": ["hits"], "saved": ["hits", "duration"]}`` sums ``hits`` and
        ``hits * duration``; no fields counts the documents. A number is itself,
        ``true``/``false`` are 1/0; anything else (missing, null, a string, an array) makes
        the product 0.
        """
        names = list(terms)
        fields = {name: list(terms[name]) for name in names}
        parsed: dict[str, list[str]] = {}
        for field in itertools.chain.from_iterable(fields.values()):
            parts = _split_path(field)
            if parts is None:
                raise ValueError(f"cannot total the field {field!r}")
            parsed[field] = parts
        where = self._compile(criteria)
        if not where.exact:
            return self._python_totals(fields, criteria)
        products = []
        for name in names:
            factors = []
            for field in fields[name]:
                e = _path(parsed[field])
                factors.append(
                    f"(CASE jsonb_typeof({e}) WHEN 'number' THEN ({e})::numeric "
                    f"WHEN 'boolean' THEN (CASE WHEN {e} = 'true'::jsonb THEN 1 ELSE 0 END) "
                    "ELSE 0 END)"
                )
            products.append(f"coalesce(sum({' * '.join(factors) or '1'}), 0)")
        sql = f"SELECT {', '.join(products) or '0'} FROM {self._t} WHERE {where.sql}"
        row = self._run(lambda conn: conn.execute(sql, where.params).fetchone())
        return dict(zip(names, map(float, row)))

    def _python_totals(
        self, fields: dict[str, list[str]], criteria: dict | None
    ) -> dict[str, float]:
        sums = dict.fromkeys(fields, 0.0)
        for doc in self.query(criteria):
            for name, names in fields.items():
                product = 1.0
                for field in names:
                    value = get(doc, field)
                    if isinstance(value, bool):
                        value = int(value)
                    product *= value if _is_number(value) and math.isfinite(value) else 0
                sums[name] += product
        return sums

    def value_counts(self, field: str, criteria: dict | None = None) -> list[tuple[Any, int]]:
        """How many matching documents hold each value of a field, most frequent first.

        An array counts as one value (it is not unwound) and documents lacking the field
        count under ``None``; ties in BSON order of the values.
        """
        parts = _split_path(field)
        if parts is None:
            raise ValueError(f"cannot count the values of {field!r}")
        where = self._compile(criteria)
        if not where.exact:
            counts: dict[Any, list[Any]] = {}
            for doc in self.query(criteria, properties=[field]):
                value = get(doc, field)
                marker = _distinct_marker(value)
                counts.setdefault(marker, [value, 0])[1] += 1
            ordered = sorted(counts.values(), key=lambda vc: -vc[1])
            return [(value, n) for value, n in ordered]
        e = _path(parts)
        keys = f"{_cls(e)}, {_num(e)}, {_pre(e)}, {_txt(e)}"
        sql = (
            f"SELECT {_cls(e)}, (array_agg({e}))[1], count(*) FROM {self._t} WHERE {where.sql} "
            f"GROUP BY {keys} ORDER BY 3 DESC, {keys}"
        )
        rows = self._run(lambda conn: conn.execute(sql, where.params).fetchall())
        return [(None if cls == _NULL else value, int(n)) for cls, value, n in rows]

    def distinct(self, field: str, criteria: dict | None = None, all_exist: bool = False) -> list:
        """The distinct values of a field, array values unwound, as MongoDB does.

        ``None`` is included when a document holds null; in no particular order (1 and 1.0
        count once, True and 1 twice). ``all_exist`` is accepted and ignored.
        """
        parts = _split_path(field)
        where = self._compile(criteria)
        if field == self.key and where.exact:
            sql = f"SELECT key FROM {self._t} WHERE {where.sql} ORDER BY seq"
            return [orjson.loads(key) for (key,) in self._rows(sql, where.params)]
        found: Iterable[Any]
        if parts is None or not where.exact:
            matches = self._matcher(criteria)
            found = (
                value
                for doc in _documents(
                    self._rows(f"SELECT key, doc FROM {self._t} WHERE {where.sql}", where.params),
                    None,
                    self.key,
                )
                if matches(doc)
                for value in iter_key_candidates(field, doc)
                if value is not NOTHING
            )
        elif len(parts) == 1:
            e = _path(parts)
            sql = f"SELECT DISTINCT {e} FROM {self._t} WHERE ({where.sql}) AND {e} IS NOT NULL"
            found = (value for (value,) in self._rows(sql, where.params))
        else:
            sql = (
                f"SELECT DISTINCT _p.v FROM {self._t}, jsonb_path_query({self._t}.doc, "
                f"{_jsonpath(parts)}) AS _p(v) WHERE {where.sql}"
            )
            found = (value for (value,) in self._rows(sql, where.params))
        values: list[Any] = []
        _add_distinct(values, set(), found)
        return values

    # ---------------------------------------------------------------- writing

    def _prepare(self, doc: Any) -> tuple[str, str, dict] | None:
        """Sanitise (as MongoStore does), validate and encode: ``(row key, JSON, doc)``.

        Unless a validator needs to see it, a plain document (nothing ``jsanitize`` would
        change) is encoded in one walk, without being sanitised first.
        """
        if self.validator is None and type(doc) is dict:
            try:
                storable = _to_storable(doc, strict=True)
            except _NotPlainError:
                pass
            else:
                text = orjson.dumps(storable, default=_orjson_default).decode("utf-8")
                return self._row_key(doc), text, doc
        checked = self._checked(doc)
        if checked is None:
            return None
        return self._row_key(checked), _dumps(checked), checked

    def _row_key(self, doc: Mapping[str, Any]) -> str:
        if self.key not in doc:
            raise KeyError(f"document has no key field {self.key!r}")
        value = doc[self.key]
        literal = _key_literal(value)
        if literal is None or not isinstance(value, str | int) or "\x00" in literal:
            raise TypeError(f"the key field {self.key!r} must hold a str or an int, not {value!r}")
        return literal

    def update(self, docs: list[dict] | dict, key: list | str | None = None) -> None:
        """Insert or replace documents, all in one statement (one transaction).

        Parameters
        ----------
        docs
            A document or a list of documents; each must hold the store's key field.
            Several with one key value: the last one wins.
        key
            Field(s) identifying the document to replace, as in MongoStore. ``None`` or the
            store key: the document with the same key value. Other fields: the first
            document matching their values is replaced (its row takes the new key value).

        Raises
        ------
        KeyError
            If a document lacks the store key or a ``key`` field.
        TypeError
            If a key value is not a str or an int.
        """
        if not isinstance(docs, list):
            docs = [docs]
        fields = list(key) if isinstance(key, list | tuple) else [key or self.key]
        prepared = [p for p in map(self._prepare, docs) if p is not None]
        if not prepared:
            return
        if fields == [self.key]:
            latest = {row_key: text for row_key, text, _ in prepared}
            ordered = sorted(latest)  # one lock order for every writer: no deadlocks
            sql = (
                f"INSERT INTO {self._t} (key, doc) SELECT k, d::jsonb "
                "FROM unnest(%b::text[], %b::text[]) AS u(k, d) "
                "ON CONFLICT (key) DO UPDATE SET doc = EXCLUDED.doc"
            )
            params = [ordered, [latest[k] for k in ordered]]
            self._run(lambda conn: conn.execute(sql, params))
            return
        searches = [{f: d[f] for f in fields} for _, _, d in prepared]
        self._run(lambda conn: self._update_by_fields(conn, prepared, searches))

    def _update_by_fields(
        self, conn: Connection[Any], prepared: list[tuple[str, str, dict]], searches: list[dict]
    ) -> None:
        upsert = (
            f"INSERT INTO {self._t} (key, doc) VALUES (%s, %s::jsonb) "
            "ON CONFLICT (key) DO UPDATE SET doc = EXCLUDED.doc"
        )
        with conn.transaction():
            for (row_key, text, _), search in zip(prepared, searches):
                where = self._compile(search)
                matches = self._matcher(search)
                sql = f"SELECT key, doc FROM {self._t} WHERE {where.sql} ORDER BY seq"
                if where.exact:
                    sql += " LIMIT 1"
                found = None
                for other, doc in conn.execute(sql, where.params):
                    if where.exact or matches(doc):
                        found = other
                        break
                if found is not None and found != row_key:
                    conn.execute(f"DELETE FROM {self._t} WHERE key = %s", [found])
                conn.execute(upsert, [row_key, text])

    def insert_if_absent(self, doc: dict) -> bool:
        """Insert a document only if no document has its key value, atomically.

        Returns True if inserted, False if the key was taken (or the validator rejected it).
        """
        prepared = self._prepare(doc)
        if prepared is None:
            return False
        row_key, text, _ = prepared
        sql = (
            f"INSERT INTO {self._t} (key, doc) VALUES (%s, %s::jsonb) ON CONFLICT (key) DO NOTHING"
        )
        cursor = self._run(lambda conn: conn.execute(sql, [row_key, text]))
        return bool(cursor.rowcount == 1)

    def increment(
        self,
        key_value: str | int,
        fields: Mapping[str, int | float],
        set_fields: Mapping[str, Any] | None = None,
    ) -> bool:
        """Add to numeric fields (and set others) of one document, atomically.

        A missing field starts from 0; missing parent objects are created. Integer amounts
        on integer (or missing) top-level fields are one ``UPDATE``; anything else reads the
        row locked, adds in Python (float sums exactly as MongoDB's) and writes it back.

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
        """
        return self.increment_many([(key_value, fields, set_fields)])[0]

    def increment_many(
        self,
        updates: Iterable[tuple[str | int, Mapping[str, int | float], Mapping[str, Any] | None]],
    ) -> list[bool]:
        """Apply several :meth:`increment` calls in one transaction (nothing of the batch is
        written if one fails). Returns, for each, whether its document exists."""
        plans = [self._plan_increment(k, f, s) for k, f, s in updates]
        if not plans:
            return []
        found: list[bool] = self._run(
            lambda conn: self._apply_increments(conn, plans), retry_broken=False
        )
        return found

    def _plan_increment(
        self,
        key_value: str | int,
        fields: Mapping[str, int | float],
        set_fields: Mapping[str, Any] | None,
    ) -> _IncrementPlan:
        set_fields = dict(set_fields or {})
        row_key = _increment_key(key_value, fields)
        parsed = _increment_paths(self.key, fields, set_fields)
        direct = None
        if all(len(parts) == 1 for parts in parsed.values()) and all(
            type(amount) is int for amount in fields.values()
        ):
            expression, guards, params = "doc", [], list[Any]()
            for path, amount in fields.items():
                e = _path([path])
                expression = (
                    f"jsonb_set({expression}, ARRAY[{_lit(path)}], "
                    f"to_jsonb(coalesce(({e})::numeric, 0) + %s::numeric))"
                )
                params.append(amount)
                guards.append(
                    f"(CASE jsonb_typeof({e}) WHEN 'number' THEN scale(({e})::numeric) = 0 "
                    f"ELSE {e} IS NULL END)"
                )
            for path, value in set_fields.items():
                expression = f"jsonb_set({expression}, ARRAY[{_lit(path)}], %s::jsonb)"
                params.append(_dumps(_sanitize(value)))
            where = " AND ".join(["key = %s", "jsonb_typeof(doc) = 'object'", *guards])
            direct = (
                f"UPDATE {self._t} SET doc = {expression} WHERE {where} RETURNING 1",
                [*params, row_key],
            )
        return _IncrementPlan(row_key, dict(fields), set_fields, parsed, direct)

    def _apply_increments(self, conn: Connection[Any], plans: list[_IncrementPlan]) -> list[bool]:
        order = sorted(range(len(plans)), key=lambda i: plans[i].row_key)  # one lock order
        found = [False] * len(plans)
        with conn.transaction():
            cursor = conn.cursor()
            for index in order:
                plan = plans[index]
                if plan.direct is not None:
                    cursor.execute(*plan.direct)
                    if cursor.fetchone() is not None:
                        found[index] = True
                        continue
                found[index] = self._increment_in_python(conn, plan)
        return found

    def _increment_in_python(self, conn: Connection[Any], plan: _IncrementPlan) -> bool:
        row = conn.execute(
            f"SELECT doc FROM {self._t} WHERE key = %s FOR UPDATE", [plan.row_key]
        ).fetchone()
        if row is None:
            return False
        doc = row[0]
        if not isinstance(doc, dict):
            raise TypeError(f"the row of {plan.row_key} holds {type(doc).__name__}, not a document")
        for path, value in [*plan.fields.items(), *plan.set_fields.items()]:
            parts = plan.parsed[path]
            node = doc
            for part in parts[:-1]:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    raise TypeError(f"cannot set {path!r}: a parent is not an object")
                node = child
            if path in plan.fields:
                old = node.get(parts[-1], 0)
                if isinstance(old, bool) or not isinstance(old, int | float):
                    raise TypeError(f"cannot increment {path!r}: it holds {old!r}, not a number")
                node[parts[-1]] = old + value
            else:
                node[parts[-1]] = _sanitize(value)
        conn.execute(
            f"UPDATE {self._t} SET doc = %s::jsonb WHERE key = %s", [_dumps(doc), plan.row_key]
        )
        return True

    def remove_docs(self, criteria: dict) -> None:
        """Delete every document matching MongoDB criteria (``{}`` deletes all)."""
        where = self._compile(criteria)
        if where.exact:
            sql = f"DELETE FROM {self._t} WHERE {where.sql}"
            self._run(lambda conn: conn.execute(sql, where.params))
            return
        matches = self._matcher(criteria)
        select = f"SELECT key, doc FROM {self._t} WHERE {where.sql}"

        def remove(conn: Connection[Any]) -> None:
            with conn.transaction():
                keys = [key for key, doc in conn.execute(select, where.params) if matches(doc)]
                conn.execute(f"DELETE FROM {self._t} WHERE key = ANY(%b::text[])", [keys])

        self._run(remove)

    def ensure_index(self, key: str, unique: bool = False) -> bool:
        """Create an index on a (dotted) field unless it exists.

        The index is on the field's (type class, number, text prefix), the expressions
        queries and sorts use; with ``unique`` it is a unique index on the JSONB value
        (documents lacking the field are exempt, unlike MongoDB). The store key needs none:
        its column is the primary key.

        Returns
        -------
        bool
            True if the index exists or was created, False if it could not be (an
            unsupported path, or ``unique`` with duplicates already stored).
        """
        state = self._state_or_raise()
        if key == self.key:
            return True
        parts = _split_path(key)
        if parts is None:
            logger.warning("cannot index the field %r in PostgreSQL", key)
            return False
        digest = xxhash.xxh64_hexdigest(f"{self.table}\x00{key}\x00{unique}".encode())[:8]
        slug = re.sub(r"[^A-Za-z0-9_]", "_", key)
        name = f"{self.table}__{slug}"[:50] + f"_{digest}"
        if name in state.indexes:
            return True
        e = _path(parts)
        columns = f"(({e}))" if unique else f"(({_cls(e)}), ({_num(e)}), ({_pre(e)}))"
        statement = (
            f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {_ident(name)} "
            f"ON {self._t} {columns}"
        )
        pg = state.pg

        def create(conn: Connection[Any]) -> None:
            row = conn.execute("SELECT to_regclass(%s)", [_quote(name)]).fetchone()
            if row is not None and row[0] is not None:
                return
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [self._lock_id("index")])
                conn.execute(statement, [])

        try:
            self._run(create)
        except pg.errors.UniqueViolation as err:
            logger.warning("could not create the unique index on %r: %s", key, err)
            return False
        state.indexes.add(name)
        return True

    # ---------------------------------------------------------------- coordination

    def claim(self, name: str, owner: str, lease: float) -> str:
        """Claim ``name`` for ``owner`` for ``lease`` seconds, atomically; return the holder.

        The claim is taken when nobody holds it, when its lease has expired (on the
        database's clock, the same for every machine) or when ``owner`` holds it already
        (renewing the lease). Otherwise the current holder is returned, unchanged.

        Parameters
        ----------
        name
            What is claimed (e.g. a digest).
        owner
            Who claims it (unique per worker and job).
        lease
            Seconds until the claim expires unless renewed.

        Returns
        -------
        str
            ``owner`` if the claim is now held by ``owner``, else the other holder.
        """
        sql = (
            f"WITH c AS (INSERT INTO {self._claims} AS x (name, owner, expires) "
            "VALUES (%(name)s, %(owner)s, clock_timestamp() + make_interval(secs => %(lease)s)) "
            "ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires = EXCLUDED.expires "
            "WHERE x.expires <= clock_timestamp() OR x.owner = EXCLUDED.owner "
            "RETURNING x.owner) "
            f"SELECT owner FROM c UNION ALL SELECT owner FROM {self._claims} "
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
        """Drop the claim on ``name`` if ``owner`` holds it (otherwise do nothing)."""
        sql = f"DELETE FROM {self._claims} WHERE name = %s AND owner = %s"
        self._run(lambda conn: conn.execute(sql, [name, owner]))

    def set_aliases(self, pairs: Mapping[str, str]) -> None:
        """Record ``alias -> digest`` pairs (e.g. run folder -> digest); last writer wins."""
        if not pairs:
            return
        aliases = sorted(pairs)
        sql = (
            f"INSERT INTO {self._aliases} (alias, digest) SELECT * FROM "
            "unnest(%b::text[], %b::text[]) ON CONFLICT (alias) DO UPDATE SET digest = "
            "EXCLUDED.digest"
        )
        params = [aliases, [pairs[a] for a in aliases]]
        self._run(lambda conn: conn.execute(sql, params))

    def get_aliases(self, names: Sequence[str]) -> dict[str, str]:
        """The digests of the known aliases among ``names``."""
        names = list(names)
        if not names:
            return {}
        sql = f"SELECT alias, digest FROM {self._aliases} WHERE alias = ANY(%b::text[])"
        rows = self._run(lambda conn: conn.execute(sql, [names]).fetchall())
        return {alias: digest for alias, digest in rows}


class _IncrementPlan(NamedTuple):
    """A checked increment: its row, fields and, when it can be, its one-statement SQL."""

    row_key: str
    fields: dict[str, int | float]
    set_fields: dict[str, Any]
    parsed: dict[str, list[str]]
    direct: tuple[str, list[Any]] | None


def _top_level_fields(projection: tuple[dict, bool] | None) -> list[str] | None:
    """The fields of an inclusion projection of top-level names only, else None."""
    if projection is None or not projection[1]:
        return None
    spec = projection[0]
    if not all(rule is True for rule in spec.values()):
        return None
    return list(spec)


def _documents(
    rows: Iterator[tuple], projection: tuple[dict, bool] | None, key_field: str
) -> Generator[dict, None, None]:
    """Documents of ``(key, doc)`` rows; a row that is no JSON object comes as a stand-in
    (see :func:`~jobflow_cache.docstore.unreadable_reason`), never as an exception."""
    for key, doc in rows:
        if not isinstance(doc, dict):
            kind = json_kind(doc)
            yield _unreadable(key_field, _key_value(key), f"the stored row is a JSON {kind}")
        else:
            yield doc if projection is None else _project(doc, *projection)


def _fields(rows: Iterator[tuple], key_field: str) -> Generator[dict, None, None]:
    """Documents of ``(key, picked fields, jsonb_typeof(doc))`` rows (see ``_documents``)."""
    for key, doc, kind in rows:
        if kind != "object":
            reason = f"the stored row is a JSON {kind}"
            yield _unreadable(key_field, _key_value(key), reason)
        else:
            yield doc or {}


def _key_value(text: Any) -> Any:
    """The key value of a ``key`` column text (None when it is damaged)."""
    try:
        return orjson.loads(text)
    except (ValueError, TypeError):
        return None
