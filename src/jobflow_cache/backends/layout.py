"""The fixed layout both SQL backends share: which field goes where, and how its texts read.

An entry document is split (:func:`split`) into

* one value per column field (:data:`FIELD_KINDS`: the :data:`~.base.SELECTABLE` fields) when
  the value fits its column's kind, else the field stays in ``doc`` (the column is NULL), so a
  read gives back exactly what was written;
* ``doc``: JSON of the other small fields;
* ``served``: JSON of the large fields (:data:`PAYLOAD_FIELDS`), kept in a table of their own
  so a hit updates a small row;
* ``explain``: JSON of the :data:`~.base.EXPLAIN_FIELDS`;
* the ``(upstream, digest)`` pairs of its ``consumed`` list.

Stored JSON is read back by :func:`parse_object`, which raises :class:`UnreadableError` (the
backend then yields the stand-in ``{"digest": d, UNREADABLE: why}``). A row migrated from an
earlier release that this layout cannot hold is stored as its text behind :data:`UNMIGRATED`,
so it reads as unreadable (``cachetool verify --fix`` removes it).

The rows an earlier release wrote (its document stores, one JSON document per row) are read by
:func:`decode_old_row`: their JSON tagged the values JSON cannot hold, Mongo extended-JSON
style (``{"$date": "...Z"}``, ``{"$binary": base64}``, ``{"$numberDouble": "NaN"}``, and in
PostgreSQL ``{"$string": <JSON text>}`` for a string holding NUL).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from jobflow_cache.backends.base import (
    EXPLAIN_FIELDS,
    SELECTABLE,
    UNREADABLE,
    Criteria,
    json_kind,
    parse_datetime,
)
from jobflow_cache.backends.criteria import Compiler, column_value

__all__ = [
    "FIELD_KINDS",
    "PAYLOAD_FIELDS",
    "UNMIGRATED",
    "Split",
    "UnreadableError",
    "decode_old_row",
    "old_document",
    "parse_object",
    "select_statement",
    "selected",
    "split",
    "to_json",
]

#: The large fields of an entry, kept apart from its small row.
PAYLOAD_FIELDS = ("output", "response", "packed", "files", "blobs")

#: The kind of each column field (see :mod:`jobflow_cache.backends.criteria`).
FIELD_KINDS: dict[str, str] = {
    "digest": "text",
    "scheme": "text",
    "function": "text",
    "name": "text",
    "maker": "text",
    "cache_version": "text",
    "created": "date",
    "last_hit": "date",
    "hits": "int",
    "valid": "bool",
    "invalid_reason": "text",
    "source_uuid": "text",
    "files_size": "int",
    "duration": "real",
    "host": "text",
}
assert tuple(FIELD_KINDS) == SELECTABLE  # one column per selectable field

#: Prefix of the text of a migrated row this layout cannot hold.
UNMIGRATED = "jfc-unmigrated:"


class UnreadableError(Exception):
    """A stored text does not decode (its message says why)."""


class Split(NamedTuple):
    """A document split into the parts the tables hold (see the module docstring)."""

    digest: str
    columns: list[Any]  # the column fields after digest, in SELECTABLE order (None: in doc)
    in_doc: list[str]  # column fields whose value stayed in doc
    doc: str
    served: str | None
    explain: str | None
    consumed: list[tuple[str, str]]


def _refuse(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON")


_INFINITIES = (float("inf"), float("-inf"))


def _non_finite(obj: Any) -> bool:
    """Whether ``obj`` holds a NaN or an infinity (a float, or one inside its dicts, lists
    and tuples, subclasses included).

    One loop over a stack, the common leaves (str, int, bool, None) told apart by their
    exact type first: every document written goes through it, and a call per value (the
    recursive form) cost about as much as encoding the document."""
    stack = [obj]
    pop, push = stack.pop, stack.extend
    while stack:
        node = pop()
        kind = type(node)
        if kind is str or kind is int or kind is bool or node is None:
            continue
        if kind is dict:
            push(node.values())
        elif kind is list or kind is tuple:
            push(node)
        elif isinstance(node, float):
            if node != node or node in _INFINITIES:
                return True
        elif isinstance(node, dict):
            push(node.values())
        elif isinstance(node, list | tuple):
            push(node)
    return False


def to_json(obj: dict[str, Any]) -> str:
    """JSON text of a mapping of JSON values (``TypeError`` for anything else, NaN too)."""
    data = orjson.dumps(
        obj,
        default=_refuse,
        option=orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS,
    )
    if b"null" in data and _non_finite(obj):  # orjson writes NaN and infinities as null
        raise TypeError("NaN and infinity are not JSON")
    return data.decode("utf-8")


def split(
    doc: Mapping[str, Any],
    digest: Any = None,
    column: Callable[[str, Any], Any] = column_value,
    fits: Callable[[str], bool] = lambda text: True,
) -> Split:
    """The parts of ``doc`` filed under ``digest`` (default: its own).

    ``column(kind, value)`` is the value a column of that kind holds (None: the field stays
    in ``doc``); ``fits(text)`` whether the database can hold a text (a digest, a consumed
    digest). Raises ``ValueError`` without a str digest, ``TypeError`` for a value JSON
    cannot hold.
    """
    digest = doc.get("digest") if digest is None else digest
    if not isinstance(digest, str) or not fits(digest):
        raise ValueError(f"a document needs a str 'digest', got {digest!r}")
    columns = dict.fromkeys(SELECTABLE[1:])
    in_doc: list[str] = []
    rest: dict[str, Any] = {}
    served: dict[str, Any] = {}
    explain: dict[str, Any] = {}
    for key, value in doc.items():
        kind = FIELD_KINDS.get(key)
        if kind is not None:
            if key == "digest":
                if value != digest:  # filed under another key: read back as it says
                    rest[key] = value
                continue
            stored = column(kind, value)
            if stored is not None:
                columns[key] = stored
                continue
            in_doc.append(key)
        if key in PAYLOAD_FIELDS:
            served[key] = value
        elif key in EXPLAIN_FIELDS:
            explain[key] = value
        else:
            rest[key] = value
    consumed = doc.get("consumed")
    pairs = []
    if isinstance(consumed, list):
        pairs = [
            (upstream, digest)
            for upstream in dict.fromkeys(consumed)
            if isinstance(upstream, str) and fits(upstream)
        ]
    return Split(
        digest,
        list(columns.values()),
        in_doc,
        to_json(rest),
        to_json(served) if served else None,
        to_json(explain) if explain else None,
        pairs,
    )


def parse_object(text: Any) -> dict[str, Any]:
    """The JSON object a stored text holds (:class:`UnreadableError` otherwise)."""
    try:
        value = orjson.loads(text)
    except (ValueError, TypeError) as err:  # orjson.JSONDecodeError is a ValueError
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "surrogates not allowed" in first:
            first = "invalid UTF-8"
        elif isinstance(text, str) and text.startswith(UNMIGRATED):
            first = "a row of the old format holding values JSON cannot"
        raise UnreadableError(f"the stored row does not decode ({first})") from None
    if not isinstance(value, dict):
        raise UnreadableError(f"the stored row is a JSON {json_kind(value)}")
    return value


#: The tags of an earlier release's document stores (see the module docstring).
OLD_TAGS = ("$date", "$binary", "$numberDouble", "$string")


def _untagged(obj: Any, strings: bool) -> Any:
    """``obj`` with the tagged values of :data:`OLD_TAGS` restored (``$string`` only when
    ``strings``)."""
    if isinstance(obj, dict):
        if len(obj) == 1:
            ((key, value),) = obj.items()
            if key == "$date":
                return parse_datetime(value)
            if key == "$binary":
                return base64.b64decode(value)
            if key == "$numberDouble":
                return float(value.lower().replace("infinity", "inf"))
            if key == "$string" and strings:
                return orjson.loads(value)
        return {
            key: _untagged(value, strings) if type(value) is dict or type(value) is list else value
            for key, value in obj.items()
        }
    if isinstance(obj, list):
        return [
            _untagged(value, strings) if type(value) is dict or type(value) is list else value
            for value in obj
        ]
    return obj


def decode_old_row(text: str, *, postgres: bool = False) -> Any:
    """The value an earlier release's document store kept as ``text``, its tagged values
    restored (``postgres``: PostgresStore's JSONB text, which may also tag strings holding
    NUL; else SQLiteStore's JSON). Raises ``ValueError`` for text
    that is no JSON.

    Examples
    --------
    >>> decode_old_row('{"created": {"$date": "2024-01-02T03:04:05.000006Z"}, "n": 1}')
    {'created': datetime.datetime(2024, 1, 2, 3, 4, 5, 6), 'n': 1}
    >>> decode_old_row('{"b": {"$binary": "aGk="}, "x": {"$numberDouble": "-Infinity"}}')
    {'b': b'hi', 'x': -inf}
    """
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        if not postgres:
            raise
        obj = json.loads(text)  # what JSONB holds and orjson refuses, as PostgresStore read it
    return _untagged(obj, postgres) if '"$' in text else obj


def old_document(
    key: Any, text: Any, fits: Callable[[str], bool], *, postgres: bool = False
) -> tuple[str, Any, str]:
    """``(digest, document or None, raw text)`` of a row an earlier release's store wrote
    (``key`` the JSON of the digest, ``text`` the document as that store encoded it, decoded
    by :func:`decode_old_row`)."""
    try:
        digest = orjson.loads(key)
    except (ValueError, TypeError):
        digest = None
    if not isinstance(digest, str) or not fits(digest):
        digest = str(key)
    raw = text if isinstance(text, str) else str(text)
    try:
        doc = decode_old_row(raw, postgres=postgres)
    except (ValueError, TypeError):
        doc = None
    return digest, doc if isinstance(doc, dict) else None, raw


def select_statement(
    compiler: Compiler,
    row: str,
    tables: tuple[str, str],
    criteria: Criteria | None,
    fields: Sequence[str] | None,
    order: Mapping[str, int] | None,
    limit: int,
) -> tuple[str, list[Any], list[str] | None]:
    """The SQL of :meth:`.EntryBackend.select` on the tables ``(entries, payloads)``: the
    statement, its parameters, and the fields wanted (None: all). ``row`` selects the
    entry's digest, columns and ``doc``; the payload table is joined only when a payload or
    explain field is wanted. Raises ``ValueError`` for criteria or an order the compiler
    does not know, before any row is read."""
    where, params = compiler.where(criteria)
    order_by = compiler.order_by(order)
    wanted = None if fields is None else list(dict.fromkeys(["digest", *fields]))
    if wanted == ["digest"]:
        columns, join = "e.digest", ""
    else:
        served = wanted is None or any(f in PAYLOAD_FIELDS for f in wanted)
        explain = wanted is None or any(f in EXPLAIN_FIELDS for f in wanted)
        columns = ", ".join(
            [row, "p.served" if served else "NULL", "p.explain" if explain else "NULL"]
        )
        join = f" LEFT JOIN {tables[1]} p ON p.digest = e.digest" if served or explain else ""
    sql = f"SELECT {columns} FROM {tables[0]} e{join} WHERE {where}"
    sql += f" ORDER BY {order_by}" if order_by else ""
    sql += f" LIMIT {int(limit)}" if limit and limit > 0 else ""
    return sql, params, wanted


def selected(
    rows: Iterable[Sequence[Any]],
    wanted: list[str] | None,
    document: Callable[[Sequence[Any]], dict[str, Any]],
) -> Iterator[dict[str, Any]]:
    """The documents of the rows of a :func:`select_statement`, each read by ``document``
    and cut to the ``wanted`` fields (an unreadable row's stand-in is yielded whole)."""
    for row in rows:
        if wanted == ["digest"]:
            yield {"digest": row[0]}
            continue
        doc = document(row)
        if wanted is None or UNREADABLE in doc:
            yield doc
        else:
            yield {key: doc[key] for key in wanted if key in doc}
