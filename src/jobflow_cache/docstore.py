"""What SQLiteStore and PostgresStore share: the document encoding and Mongo semantics in Python.

Both stores keep documents as JSON with the same tagged encodings of values JSON cannot hold
(Mongo extended-JSON style, see :mod:`jobflow_cache.sqlite_store`; PostgresStore adds one for
strings holding NUL), follow MongoDB's BSON type bracketing when comparing and sorting, and
answer projections, sorts in Python, ``distinct``, ``groupby`` and increments with the same
rules. That logic lives here, once; everything that speaks an SQL dialect stays in the store
modules.
"""

from __future__ import annotations

import base64
import itertools
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from maggma.core import Sort, Store
from monty.json import jsanitize
from pydash import get, set_

from jobflow_cache.backends.base import (
    UNREADABLE,
    json_kind,
    unreadable_reason,
)
from jobflow_cache.backends.base import (
    format_datetime as _format_datetime,
)
from jobflow_cache.backends.base import (
    parse_datetime as _parse_datetime,
)

try:  # maggma >= 0.72 depends on the mongomock-ng fork
    from mongomock_ng.filtering import (
        NOTHING,
        filter_applies,
        iter_key_candidates,
        resolve_sort_key,
    )
except ImportError:  # pragma: no cover - older maggma releases use mongomock
    from mongomock.filtering import (  # type: ignore[no-redef,assignment,unused-ignore]
        NOTHING,
        filter_applies,
        iter_key_candidates,
        resolve_sort_key,
    )

# the mongomock matcher both stores fall back on, imported in one place
__all__ = [
    "NOTHING",
    "UNREADABLE",
    "DocStore",
    "filter_applies",
    "iter_key_candidates",
    "resolve_sort_key",
    "unreadable_reason",
]

logger = logging.getLogger(__name__)

_DATE = "$date"
_BINARY = "$binary"
_DOUBLE = "$numberDouble"
_RESERVED_KEYS = frozenset({_DATE, _BINARY, _DOUBLE})

# BSON comparison order of the type classes (null < numbers < strings < objects < arrays
# < binary < booleans < dates), used for sorting and for type-bracketed comparisons.
_NULL, _NUMBER, _STRING, _OBJECT, _ARRAY, _BINDATA, _BOOL, _DATETIME = 1, 2, 3, 4, 5, 6, 8, 9

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_Fragment = tuple[str, list[Any]]  # SQL text and its parameters


# --------------------------------------------------------------------------- encoding


class _NotPlainError(Exception):
    """Raised by the strict walk on a value jsanitize would have to convert."""


_PLAIN_SCALARS = (str, int, bool, type(None))


def _to_storable(
    obj: Any, arrays: set[str] | None = None, path: str = "", strict: bool = False
) -> Any:
    """Replace values JSON cannot hold by their tagged encodings (see module docstring).

    The dotted paths holding a list (list indexes left out) are added to ``arrays``.
    With ``strict``, raise :class:`_NotPlainError` on any value that is not of a type
    ``jsanitize(allow_bson=True)`` returns unchanged (exact dict with str keys, list,
    tuple, str, int, float, bool, None, datetime, bytes): such documents need no
    sanitising, which is most of the cost of a write.
    """
    kind = type(obj)
    if kind in _PLAIN_SCALARS:
        return obj
    # values that stay as they are (plain scalars, finite floats) are taken without a call:
    # this walk is most of the Python cost of a write
    if kind is dict or (not strict and isinstance(obj, dict)):
        out = {}
        for key, value in obj.items():
            if key in _RESERVED_KEYS:
                raise ValueError(f"the key {key!r} is reserved by SQLiteStore's encoding")
            if strict and type(key) is not str:
                raise _NotPlainError
            kind = type(value)
            if kind in _PLAIN_SCALARS or (kind is float and -math.inf < value < math.inf):
                out[key] = value
            else:
                child = f"{path}.{key}" if path else str(key)
                out[key] = _to_storable(value, arrays, child, strict)
        return out
    if kind is list or kind is tuple or (not strict and isinstance(obj, list | tuple)):
        if arrays is not None:
            arrays.add(path)
        return [
            value
            if type(value) in _PLAIN_SCALARS
            or (type(value) is float and -math.inf < value < math.inf)
            else _to_storable(value, arrays, path, strict)
            for value in obj
        ]
    if kind is float or (not strict and isinstance(obj, float)):
        if math.isfinite(obj):
            return obj
        return {_DOUBLE: "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if kind is datetime or (not strict and isinstance(obj, datetime)):
        return {_DATE: _format_datetime(obj)}
    if kind is bytes or (not strict and isinstance(obj, bytes | bytearray)):
        return {_BINARY: base64.b64encode(bytes(obj)).decode("ascii")}
    if strict:
        raise _NotPlainError
    return obj


def _orjson_default(obj: Any) -> Any:
    """Serialise the BSON types jsanitize(allow_bson=True) leaves in place (ObjectId...)."""
    name = type(obj).__name__
    if name == "ObjectId":
        return str(obj)
    if name == "Decimal128":
        return float(obj.to_decimal())
    raise TypeError(f"{name} is not JSON serialisable")


def _encode(obj: Any, arrays: set[str] | None = None, path: str = "") -> str:
    """Encode a sanitised document (or value at ``path``) to the JSON text stored."""
    return orjson.dumps(_to_storable(obj, arrays, path), default=_orjson_default).decode("utf-8")


def _dumps(obj: Any, arrays: set[str] | None = None, path: str = "") -> str:
    """Sanitise (as maggma's MongoStore does) and encode a document or value."""
    try:
        storable = _to_storable(obj, arrays, path, strict=True)
    except _NotPlainError:
        storable = _to_storable(_sanitize(obj), arrays, path)
    return orjson.dumps(storable, default=_orjson_default).decode("utf-8")


def _from_storable(obj: Any, string_tag: str | None = None) -> Any:
    """Inverse of :func:`_to_storable` on decoded JSON.

    With ``string_tag``, ``{string_tag: <JSON text>}`` is decoded too (PostgresStore's
    encoding of strings holding NUL characters).
    """
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((key, value),) = obj.items()
            if key == _DATE:
                return _parse_datetime(value)
            if key == _BINARY:
                return base64.b64decode(value)
            if key == _DOUBLE:
                return float(value.lower().replace("infinity", "inf"))
            if key == string_tag:
                return orjson.loads(value)
        # only containers can hold an encoded value: scalars are taken without a call
        return {
            key: _from_storable(value, string_tag)
            if type(value) is dict or type(value) is list
            else value
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [
            _from_storable(value, string_tag)
            if type(value) is dict or type(value) is list
            else value
            for value in obj
        ]
    return obj


def _loads(text: str) -> Any:
    """Decode stored JSON text, restoring datetimes, bytes and non-finite floats."""
    obj = orjson.loads(text)
    return _from_storable(obj) if '"$' in text else obj


def _unreadable(key_field: str, key: Any, reason: str) -> dict[str, Any]:
    doc: dict[str, Any] = {UNREADABLE: reason}
    if key is not None:
        doc[key_field] = key
    return doc


def _row(text: Any, key_field: str, key: Any) -> dict[str, Any]:
    """The document a stored row holds, or its stand-in (see :func:`unreadable_reason`)."""
    try:
        doc = _loads(text)
    except (ValueError, TypeError) as err:  # orjson.JSONDecodeError is a ValueError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if isinstance(text, str) and "surrogates not allowed" in first:
            first = "invalid UTF-8"
        return _unreadable(key_field, key, f"the stored row does not decode ({first})")
    if not isinstance(doc, dict):
        return _unreadable(key_field, key, f"the stored row is a JSON {json_kind(doc)}")
    return doc


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


# --------------------------------------------------------------------------- criteria


def _sub_criteria(key: str, value: Any) -> list[Mapping[str, Any]]:
    """The criteria of a ``$and``, ``$or`` or ``$nor``, checked as MongoDB checks them."""
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{key} needs a non-empty list of criteria")
    if not all(isinstance(sub, Mapping) for sub in value):
        raise ValueError(f"every entry of {key} must be a dict")
    return list(value)


def _field_operators(value: Any) -> dict[str, Any]:
    """The operators a field's criterion means: its own, ``$regex`` or ``$eq``.

    Examples
    --------
    >>> _field_operators({"$gt": 1}), _field_operators(3), _field_operators({"a": 1})
    ({'$gt': 1}, {'$eq': 3}, {'$eq': {'a': 1}})
    """
    if isinstance(value, re.Pattern):
        return {"$regex": value}
    if isinstance(value, Mapping) and value and all(str(op).startswith("$") for op in value):
        return dict(value)
    return {"$eq": value}


def _negation(op: str, value: Any, invalid: str) -> dict[str, Any] | None:
    """The positive operators whose negation ``op`` is, or None.

    An invalid ``$not`` gives ``{invalid: value}``, for the Python check (mongomock) to
    report as MongoDB would.

    Examples
    --------
    >>> _negation("$nin", [1], "$not"), _negation("$gt", 1, "$not")
    ({'$in': [1]}, None)
    """
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
        return {invalid: value}
    return None


def _joined(fragments: list[_Fragment], word: str, empty: str) -> _Fragment:
    """Join SQL fragments ``(sql, params)`` with AND or OR (``empty`` when there are none).

    Examples
    --------
    >>> _joined([("a = ?", [1]), ("b = ?", [2])], "OR", "0")
    ('(a = ? OR b = ?)', [1, 2])
    """
    if not fragments:
        return empty, []
    if len(fragments) == 1:
        return fragments[0]
    return "(" + f" {word} ".join(sql for sql, _ in fragments) + ")", [
        p for _, params in fragments for p in params
    ]


# --------------------------------------------------------------------------- paths and keys


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


def _sql_sort_items(items: list[tuple[str, int]]) -> Iterator[tuple[str, list[str], str]]:
    """``(field, its path components, "ASC" | "DESC")`` for SQL-addressable sort items."""
    for field, direction in items:
        parts = _split_path(field)
        assert parts is not None
        yield field, parts, "ASC" if direction > 0 else "DESC"


def _sort_key_function(field: str) -> Callable[[dict], Any]:
    """Return mongomock's sort key for one field (BSON order, arrays by first item)."""

    def sort_key(doc: dict) -> Any:
        return resolve_sort_key(field, doc)

    return sort_key


def _distinct_marker(value: Any) -> Any:
    """A hashable stand-in for a value: equal for Mongo-equal values (1 == 1.0 != True)."""
    if isinstance(value, dict | list):
        return _type_class(value), _dumps(value)
    if isinstance(value, float) and math.isnan(value):
        return _NUMBER, "NaN"
    return _type_class(value), value


def _add_distinct(values: list[Any], seen: set[Any], found: Iterable[Any]) -> None:
    """Append the values found (arrays unwound) not Mongo-equal to one seen before."""
    for value in found:
        for item in value if isinstance(value, list) else [value]:
            marker = _distinct_marker(item)
            if marker not in seen:
                seen.add(marker)
                values.append(item)


class _Page(NamedTuple):
    """What a query returns of its matches: which fields, in which order, which slice."""

    projection: tuple[dict, bool] | None
    items: list[tuple[str, int]]
    skip: int
    limit: int


def _sorted_page(docs: list[dict], page: _Page) -> Iterator[dict]:
    """Sort documents in Python (mongomock's sort keys), then skip, limit and project them.

    Examples
    --------
    >>> docs = [{"n": 2}, {"n": None}, {"n": "a"}, {"n": 1}]
    >>> list(_sorted_page(docs, _Page(None, [("n", -1)], 1, 2)))
    [{'n': 2}, {'n': 1}]
    """
    projection, items, skip, limit = page
    for field, direction in reversed(items):
        docs.sort(key=_sort_key_function(field), reverse=direction < 0)
    docs = docs[skip : skip + limit if limit else None]
    return iter(docs) if projection is None else (_project(d, *projection) for d in docs)


# --------------------------------------------------------------------------- increments


def _increment_key(key_value: Any, fields: Mapping[str, Any]) -> str:
    """Check the key value and amounts of an increment; return the key's row key."""
    row_key = _key_literal(key_value)
    if row_key is None or not isinstance(key_value, str | int):
        raise TypeError(f"key values are str or int, not {key_value!r}")
    for amount in fields.values():
        if isinstance(amount, bool) or not isinstance(amount, int | float):
            raise TypeError(f"increments must be numbers, not {amount!r}")
    return row_key


def _increment_paths(
    key: str, fields: Iterable[str], set_fields: Iterable[str]
) -> dict[str, list[str]]:
    """Check the paths an increment adds to and sets; return each one's components.

    Examples
    --------
    >>> _increment_paths("task_id", ["stats.hits"], ["last_used"])
    {'stats.hits': ['stats', 'hits'], 'last_used': ['last_used']}
    """
    paths = [*fields, *set_fields]
    if len(set(paths)) != len(paths):
        raise ValueError("a field cannot be both incremented and set")
    parsed = {}
    for path in paths:
        parts = _split_path(path)
        if parts is None or parts[0] == key:
            raise ValueError(f"cannot increment or set the field {path!r}")
        parsed[path] = parts
    for path in paths:
        for other in paths:
            if other != path and other.startswith(path + "."):
                raise ValueError(f"fields {path!r} and {other!r} overlap")
    return parsed


# --------------------------------------------------------------------------- the store


class DocStore(Store):
    """A maggma Store of JSON documents with MongoDB semantics: what its SQL backends share.

    Subclasses (:class:`~jobflow_cache.sqlite_store.SQLiteStore`,
    :class:`~jobflow_cache.postgres_store.PostgresStore`) provide the storage and ``query``.
    """

    def query(
        self,
        criteria: dict | None = None,
        properties: dict | list | None = None,
        sort: dict[str, Sort | int] | None = None,
        skip: int = 0,
        limit: int = 0,
    ) -> Iterator[dict]:
        """Stream the documents matching MongoDB criteria.

        Parameters
        ----------
        criteria
            MongoDB filter (see the store's class docstring for what runs as SQL).
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
            Documents read lazily, a few hundred rows at a time (bad criteria raise at
            once).

        Examples
        --------
        >>> import tempfile
        >>> from jobflow_cache.sqlite_store import SQLiteStore
        >>> with tempfile.TemporaryDirectory() as tmp, SQLiteStore(f"{tmp}/s.db") as store:
        ...     store.update([{"task_id": i, "n": i % 3} for i in range(6)])
        ...     [d["task_id"] for d in store.query({"n": {"$ne": 0}}, sort={"n": -1})]
        [2, 5, 1, 4]
        """
        projection = _projection(properties)
        items = _sort_items(sort)
        if skip < 0 or limit < 0:
            raise ValueError("skip and limit must be >= 0")
        return self._query(criteria, _Page(projection, items, skip, limit))

    def _query(self, criteria: dict | None, page: _Page) -> Iterator[dict]:
        """:meth:`query` with its projection, sort, skip and limit parsed and checked."""
        raise NotImplementedError

    def query_one(
        self,
        criteria: dict | None = None,
        properties: dict | list | None = None,
        sort: dict[str, Sort | int] | None = None,
    ) -> dict | None:
        """Return the first matching document, or None.

        Same result as :meth:`maggma.core.Store.query_one`, but asks the database for one
        row, so a sorted lookup reads one index entry instead of sorting every match.
        """
        docs = self.query(criteria=criteria, properties=properties, sort=sort, limit=1)
        try:
            return next(docs, None)
        finally:
            close = getattr(docs, "close", None)
            if close is not None:
                close()

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

    def _checked(self, doc: Any) -> dict | None:
        """Sanitise a document as MongoStore does and validate it (None: rejected)."""
        doc = _sanitize(doc)
        if not isinstance(doc, dict):
            raise TypeError(f"documents must be dicts, not {type(doc).__name__}")
        return doc if self._validate(doc) else None

    def _validate(self, doc: dict) -> bool:
        if self.validator is None or self.validator.is_valid(doc):
            return True
        if getattr(self.validator, "strict", False):
            raise ValueError(self.validator.validation_errors(doc))
        logger.error(
            "document rejected by the validator: %s", self.validator.validation_errors(doc)
        )
        return False
