"""The criteria language of :mod:`jobflow_cache.backends.base`, compiled to SQL over fixed
columns, and matched in Python with the same semantics.

A fixed-schema backend keeps each :data:`~.base.SELECTABLE` field in a column of one *kind*:

========  ================================  ==========================================
kind      values the column holds           stored as
========  ================================  ==========================================
``text``  ``str``                           the text
``int``   ``int`` in the signed 64-bit range  the integer (never a ``bool``)
``real``  finite ``float``                  the float (never an ``int``)
``bool``  ``bool``                          0 or 1
``date``  ``datetime``                      fixed-width UTC text (``...ffffffZ``), so text
                                            order is time order
========  ================================  ==========================================

A value of another type (``hits: "5"`` in a tampered document) is kept elsewhere by the
backend and its column is NULL: **criteria see such a value as missing**, as they see
``None``. Otherwise the semantics are MongoDB's on scalar fields:

* equality with ``None`` (also ``$eq``, ``$in``, ``$gte``, ``$lte`` with ``None``) matches a
  null or missing field; ``$ne``/``$nin`` match a missing field unless ``None`` is excluded;
* an operand of another type than the field's (a string compared with a number, ``1`` with
  a ``bool``) matches nothing (``$ne``/``$nin``: everything), numbers compare across int and
  float, datetimes are aware or naive-UTC;
* ``$regex`` (a Python pattern, searched) matches text fields only; an anchored literal
  prefix (``"^" + re.escape(prefix)``) becomes a range condition an index serves;
* ``$options`` beside a ``$regex`` holds MongoDB's flags that Python's ``re`` reads alike
  (:data:`REGEX_OPTIONS`): ``i`` case-insensitive, ``m`` ``^``/``$`` at every line, ``s``
  ``.`` matches a newline too; the pattern is searched as ``re.search(pattern, text,
  flags)``, which is what MongoDB's own matcher in mongomock does (a pattern with options
  never takes the range of an anchored literal prefix);
* ``$exists`` asks whether the document holds the field at all (``None`` included).

Unknown fields and operators raise ``ValueError`` naming what is allowed.

Examples
--------
>>> compiler = Compiler({"digest": Column("digest", "text"), "hits": Column("hits", "int")})
>>> compiler.where({"digest": {"$regex": "^3f2c"}, "hits": {"$ne": 0}})
('(digest >= ? AND digest < ?) AND (hits IS NULL OR hits <> ?)', ['3f2c', '3f2d', 0])
>>> compiler.where({"digest": {"$regex": "^3F2C", "$options": "i"}})
('regexp(?, digest)', ['(?i)^3F2C'])
>>> compiler.order_by({"hits": -1})
'hits DESC NULLS LAST'
>>> matches({"digest": "3f2c01", "hits": "7"}, {"hits": None}, compiler.columns)
True
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

from jobflow_cache.backends.base import format_datetime as _format_datetime

__all__ = [
    "KINDS",
    "OPERATORS",
    "REGEX_OPTIONS",
    "Column",
    "Compiler",
    "column_value",
    "matches",
    "regexp",
]

#: The kinds of column values (see the module docstring).
KINDS = ("text", "int", "real", "bool", "date")

#: The operators of a field condition (``$options`` goes with ``$regex`` only).
OPERATORS = ("$eq", "$ne", "$in", "$nin", "$gt", "$gte", "$lt", "$lte", "$regex", "$exists")

#: The flags ``$options`` may hold: those MongoDB and Python's ``re`` share (``i``
#: ``re.IGNORECASE``, ``m`` ``re.MULTILINE``, ``s`` ``re.DOTALL``) and every SQL backend
#: searches with as Python does. MongoDB's ``x`` (verbose) and ``u`` are refused.
REGEX_OPTIONS = "ims"

_COMPARISONS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
_INT64 = 2**63
_META = frozenset(".^$*+?{}[]|()")


class Column(NamedTuple):
    """Where a field is kept: ``sql``, an SQL expression of its column; ``kind``, one of
    :data:`KINDS`; ``present``, an SQL expression true (never NULL) when the document holds
    the field although the column is NULL (its value ``None`` or of another type), for
    ``$exists`` (None: the column alone tells)."""

    sql: str
    kind: str
    present: str | None = None


class _NoFit:
    """An operand of another type than the field's: it matches nothing."""


_NOFIT = _NoFit()


def column_value(kind: str, value: Any) -> Any:
    """The value a column of ``kind`` holds for ``value``, None when it holds none (``None``
    or a value of another type).

    Examples
    --------
    >>> column_value("bool", True), column_value("int", True), column_value("real", 1)
    (1, None, None)
    >>> column_value("date", datetime(2024, 5, 1))
    '2024-05-01T00:00:00.000000Z'
    """
    kind_of = type(value)
    if kind == "text":
        return value if isinstance(value, str) else None
    if kind == "int":
        return value if kind_of is int and -_INT64 <= value < _INT64 else None
    if kind == "real":
        return value if kind_of is float and math.isfinite(value) else None
    if kind == "bool":
        return int(value) if kind_of is bool else None
    if kind == "date":
        return _format_datetime(value) if isinstance(value, datetime) else None
    raise ValueError(f"unknown column kind {kind!r} (one of {', '.join(KINDS)})")


def _operand(kind: str, value: Any) -> Any:
    """The SQL value an operand compares as against a column of ``kind`` (``_NOFIT``: none)."""
    if kind in ("int", "real"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _NOFIT
        if isinstance(value, float):
            return _NOFIT if math.isnan(value) else value
        return value if -_INT64 <= value < _INT64 else float(value)
    found = column_value(kind, value)
    return _NOFIT if found is None else found


@lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def regexp(pattern: str, value: Any) -> int:
    """SQLite's ``regexp(pattern, value)``: 1 when ``re.search`` finds ``pattern`` in a text
    ``value`` (patterns compiled once), else 0."""
    return int(isinstance(value, str) and _pattern(pattern).search(value) is not None)


def _literal_prefix(pattern: str) -> str | None:
    """The literal an anchored pattern ``^literal`` matches a prefix of, else None.

    Examples
    --------
    >>> _literal_prefix("^" + re.escape("3f-2c")), _literal_prefix("^ab."), _literal_prefix("ab")
    ('3f-2c', None, None)
    """
    if not pattern.startswith("^"):
        return None
    chars: list[str] = []
    rest = iter(pattern[1:])
    for char in rest:
        if char == "\\":
            char = next(rest, "")
            if not char or char.isalnum():  # \d, \A, \1 ...: not a literal
                return None
        elif char in _META:
            return None
        chars.append(char)
    return "".join(chars)


def _after(literal: str) -> str | None:
    """The least text greater than every text starting with ``literal`` (None: none)."""
    code = ord(literal[-1]) + 1
    if code == 0xD800:
        code = 0xE000
    return None if code > 0x10FFFF else literal[:-1] + chr(code)


def _flagged(field: str, pattern: str, options: Any) -> str:
    """``pattern`` with the flags of ``$options`` as a leading inline group (``(?i)...``),
    which Python reads as ``re.compile(pattern, flags)``; the pattern itself without
    options."""
    if not isinstance(options, str) or any(flag not in REGEX_OPTIONS for flag in options):
        raise ValueError(
            f"$options on field {field!r} takes a str of the flags {', '.join(REGEX_OPTIONS)} "
            f"(as MongoDB reads them), got {options!r}"
        )
    flags = "".join(sorted(set(options)))
    return f"(?{flags}){pattern}" if flags else pattern


def _operators(field: str, value: Any) -> dict[str, Any]:
    """The operators of a field condition (a scalar or sub-document: ``$eq``); a ``$regex``
    with ``$options`` becomes one ``$regex`` whose pattern carries the flags."""
    if isinstance(value, Mapping) and value:
        dollar = [str(key).startswith("$") for key in value]
        if all(dollar):
            unknown = [key for key in value if key not in OPERATORS and key != "$options"]
            if unknown:
                raise ValueError(
                    f"unknown operator {unknown[0]!r} on field {field!r}: criteria allow "
                    f"{', '.join(OPERATORS)} (and $options with $regex)"
                )
            if "$regex" in value and not isinstance(value["$regex"], str):
                raise ValueError(f"$regex on field {field!r} takes a str pattern")
            if "$options" in value and "$regex" not in value:
                raise ValueError(f"$options on field {field!r} needs a $regex beside it")
            ops = dict(value)
            if "$options" in ops:
                ops["$regex"] = _flagged(field, ops["$regex"], ops.pop("$options"))
            if "$regex" in ops:
                try:
                    _pattern(ops["$regex"])
                except re.error as err:
                    raise ValueError(f"bad $regex on field {field!r}: {err}") from err
            for op in ("$in", "$nin"):
                if op in value and not isinstance(value[op], list | tuple | set | frozenset):
                    raise ValueError(f"{op} on field {field!r} takes a list")
            return ops
        if any(dollar):
            raise ValueError(f"field {field!r} mixes operators and plain keys: {value!r}")
    return {"$eq": value}


def _logical(key: str, value: Any) -> list[Mapping[str, Any]]:
    if key not in ("$and", "$or", "$nor"):
        raise ValueError(f"unknown operator {key!r}: criteria allow $and, $or and $nor at the top")
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{key} takes a non-empty list of criteria")
    for item in value:
        if not isinstance(item, Mapping):
            raise ValueError(f"{key} takes a list of criteria (dicts), got {item!r}")
    return list(value)


def _unknown_field(field: str, columns: Mapping[str, Any]) -> ValueError:
    return ValueError(f"unknown field {field!r}: criteria may name only {', '.join(columns)}")


class Compiler:
    """Criteria and orders compiled to SQL over ``columns`` (field -> :class:`Column` or
    ``(sql, kind)``).

    Parameters
    ----------
    columns
        The fields criteria may name and where each is kept.
    param
        The parameter placeholder of the driver: ``"?"`` (sqlite3) or ``"%s"`` (psycopg).
    regexp
        SQL template of a regular-expression search, with ``{pattern}`` (a placeholder)
        and ``{value}`` (the column); SQLite's needs :func:`regexp` registered.
    operand
        ``operand(kind, value)``: the parameter the driver gets for a column value of
        ``kind`` (what :func:`column_value` gives), None when no column of that kind can hold
        it (it then matches nothing); None: the value itself.
    pattern
        ``pattern(regex)``: the pattern bound for ``{pattern}`` (raising ``ValueError`` for one
        the database cannot search with Python's semantics); None: the regex itself.
    """

    def __init__(
        self,
        columns: Mapping[str, Column | tuple[str, str]],
        *,
        param: str = "?",
        regexp: str = "regexp({pattern}, {value})",
        operand: Callable[[str, Any], Any] | None = None,
        pattern: Callable[[str], str] | None = None,
    ) -> None:
        self.columns = {name: Column(*spec) for name, spec in columns.items()}
        for name, column in self.columns.items():
            if column.kind not in KINDS:
                raise ValueError(f"field {name!r}: unknown kind {column.kind!r}")
        self.param = param
        self.regexp = regexp
        self.operand = operand
        self.pattern = pattern

    def where(self, criteria: Mapping[str, Any] | None) -> tuple[str, list[Any]]:
        """An SQL condition (``TRUE`` when ``criteria`` is empty) and its parameters."""
        params: list[Any] = []
        return self._criteria(criteria or {}, params), params

    def order_by(self, order: Mapping[str, int] | None) -> str:
        """The ``ORDER BY`` terms of ``order`` (field -> 1 or -1), '' when empty; missing
        values first ascending, last descending (MongoDB's)."""
        terms = []
        for field, direction in (order or {}).items():
            column = self.columns.get(field)
            if column is None:
                raise _unknown_field(field, self.columns)
            if direction not in (1, -1) or isinstance(direction, bool):
                raise ValueError(f"order of {field!r} must be 1 or -1, got {direction!r}")
            terms.append(
                f"{column.sql} ASC NULLS FIRST"
                if direction == 1
                else f"{column.sql} DESC NULLS LAST"
            )
        return ", ".join(terms)

    def _criteria(self, criteria: Mapping[str, Any], params: list[Any]) -> str:
        if not isinstance(criteria, Mapping):
            raise ValueError(f"criteria must be a dict, got {criteria!r}")
        parts = []
        for key, value in criteria.items():
            if isinstance(key, str) and key.startswith("$"):
                subs = [self._criteria(sub, params) for sub in _logical(key, value)]
                word = " AND " if key == "$and" else " OR "
                joined = word.join(f"({sub})" for sub in subs)
                # three-valued logic: a NULL (a field missing) must not make NOT unknown
                parts.append(f"NOT coalesce(({joined}), FALSE)" if key == "$nor" else joined)
                continue
            column = self.columns.get(key)
            if column is None:
                raise _unknown_field(str(key), self.columns)
            for op, arg in _operators(key, value).items():
                parts.append(self._condition(column, op, arg, params))
        if not parts:
            return "TRUE"
        return parts[0] if len(parts) == 1 else " AND ".join(f"({part})" for part in parts)

    def _operand(self, kind: str, value: Any) -> Any:
        found = _operand(kind, value)
        if found is _NOFIT or self.operand is None:
            return found
        adapted = self.operand(kind, found)
        return _NOFIT if adapted is None else adapted

    def _bind(self, params: list[Any], value: Any) -> str:
        params.append(value)
        return self.param

    def _condition(self, column: Column, op: str, arg: Any, params: list[Any]) -> str:
        col = column.sql
        if op in ("$eq", "$ne"):
            value = None if arg is None else self._operand(column.kind, arg)
            if op == "$eq":
                if value is None:
                    return f"{col} IS NULL"
                return "FALSE" if value is _NOFIT else f"{col} = {self._bind(params, value)}"
            if value is None:
                return f"{col} IS NOT NULL"
            if value is _NOFIT:
                return "TRUE"
            return f"{col} IS NULL OR {col} <> {self._bind(params, value)}"
        if op in ("$in", "$nin"):
            values = [self._operand(column.kind, item) for item in arg if item is not None]
            values = list(dict.fromkeys(v for v in values if v is not _NOFIT))
            has_none = any(item is None for item in arg)
            marks = ", ".join(self._bind(params, value) for value in values)
            if op == "$in":
                terms = [f"{col} IN ({marks})"] if values else []
                terms += [f"{col} IS NULL"] if has_none else []
                return " OR ".join(terms) or "FALSE"
            if has_none:
                return f"{col} IS NOT NULL" + (f" AND {col} NOT IN ({marks})" if values else "")
            return f"{col} IS NULL OR {col} NOT IN ({marks})" if values else "TRUE"
        if op in _COMPARISONS:
            if arg is None:
                return f"{col} IS NULL" if op in ("$gte", "$lte") else "FALSE"
            value = self._operand(column.kind, arg)
            if value is _NOFIT:
                return "FALSE"
            return f"{col} {_COMPARISONS[op]} {self._bind(params, value)}"
        if op == "$regex":
            if column.kind != "text":
                return "FALSE"
            literal = _literal_prefix(arg)
            if literal == "":
                return f"{col} IS NOT NULL"
            bound = None if literal is None else _after(literal)
            if literal is not None and bound is not None:
                low, high = self._operand("text", literal), self._operand("text", bound)
                if low is _NOFIT or high is _NOFIT:
                    return "FALSE"
                return f"{col} >= {self._bind(params, low)} AND {col} < {self._bind(params, high)}"
            searched = arg if self.pattern is None else self.pattern(arg)
            return self.regexp.format(pattern=self._bind(params, searched), value=col)
        # $exists
        present = f"{col} IS NOT NULL" + (f" OR {column.present}" if column.present else "")
        if arg:
            return present
        return f"{col} IS NULL" + (f" AND NOT ({column.present})" if column.present else "")


def matches(
    doc: Mapping[str, Any],
    criteria: Mapping[str, Any] | None,
    columns: Mapping[str, Column | tuple[str, str]],
) -> bool:
    """Whether ``doc`` matches ``criteria`` (the semantics :class:`Compiler` gives SQL).

    Examples
    --------
    >>> cols = {"name": ("name", "text"), "valid": ("valid", "bool")}
    >>> matches({"name": "relax", "valid": False}, {"$or": [{"valid": True},
    ...          {"name": {"$regex": "^rel"}}]}, cols)
    True
    >>> matches({"name": 5}, {"name": {"$exists": True, "$ne": 5}}, cols)
    True
    """
    kinds = {name: Column(*spec).kind for name, spec in columns.items()}
    return _matches(doc, criteria or {}, kinds)


def _matches(doc: Mapping[str, Any], criteria: Mapping[str, Any], kinds: dict[str, str]) -> bool:
    if not isinstance(criteria, Mapping):
        raise ValueError(f"criteria must be a dict, got {criteria!r}")
    result = True
    for key, value in criteria.items():  # every item is checked, so errors never depend on data
        if isinstance(key, str) and key.startswith("$"):
            subs = [_matches(doc, sub, kinds) for sub in _logical(key, value)]
            found = all(subs) if key == "$and" else any(subs)
            result = result and (not found if key == "$nor" else found)
            continue
        kind = kinds.get(key)
        if kind is None:
            raise _unknown_field(str(key), kinds)
        stored = column_value(kind, doc.get(key))
        for op, arg in _operators(key, value).items():
            result = _test(kind, stored, key in doc, op, arg) and result
    return result


def _equal(kind: str, stored: Any, arg: Any) -> bool:
    if arg is None:
        return stored is None
    value = _operand(kind, arg)
    return value is not _NOFIT and stored is not None and bool(stored == value)


def _test(kind: str, stored: Any, present: bool, op: str, arg: Any) -> bool:
    if op == "$eq":
        return _equal(kind, stored, arg)
    if op == "$ne":
        return not _equal(kind, stored, arg)
    if op in ("$in", "$nin"):
        found = any(_equal(kind, stored, item) for item in arg)
        return found if op == "$in" else not found
    if op in _COMPARISONS:
        if arg is None:
            return stored is None and op in ("$gte", "$lte")
        value = _operand(kind, arg)
        if value is _NOFIT or stored is None:
            return False
        if op == "$gt":
            return bool(stored > value)
        if op == "$gte":
            return bool(stored >= value)
        return bool(stored < value) if op == "$lt" else bool(stored <= value)
    if op == "$regex":
        return kind == "text" and bool(regexp(arg, stored))
    return present == bool(arg)  # $exists
