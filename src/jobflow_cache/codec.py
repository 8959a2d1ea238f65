"""How a job's return value is kept in an entry, and how it is adapted when served to a new job.

Values are JSON text written with monty's encoder (so MSON objects, datetimes, Enums and NaN are
exact on every backend), plus tags for the Python containers JSON cannot hold (tuples, sets,
dicts with non-str keys), so a served ``Response.output`` has the types a computed one has.
Serving rewrites, in the text, the job uuids and run-folder paths of the run that recorded the
entry into those of the run it is served to.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from monty.json import MontyDecoder, MontyEncoder

from jobflow_cache.errors import CorruptEntryError

__all__ = [
    "UUID_RE",
    "DirRewrite",
    "created_uuids",
    "dumps",
    "job_uuids",
    "loads",
    "referenced_uuids",
    "rewrite_text",
]

logger = logging.getLogger(__name__)

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TAG = "@jfc"
_CONTAINERS = {"tuple": tuple, "set": set, "frozenset": frozenset}
# stateless (the encoder keeps state only with allow_unserializable_objects): one of each for
# all calls, as json.dumps(obj, cls=MontyEncoder, ...) would build; building one costs ~5-15 us
_ENCODER = MontyEncoder(separators=(",", ":"), allow_nan=True)
_DECODER = MontyDecoder()


def _tag(obj: Any) -> Any:
    kind = type(obj)
    if kind is dict:
        if TAG not in obj and all(type(k) is str for k in obj):
            return {k: _tag(v) for k, v in obj.items()}
        return {TAG: "dict", "items": [[_tag(k), _tag(v)] for k, v in obj.items()]}
    if kind is list:
        return [_tag(v) for v in obj]
    if kind is tuple or kind is set or kind is frozenset:
        return {TAG: kind.__name__, "items": [_tag(v) for v in obj]}
    return obj  # scalars and objects: monty's encoder


def _untag(obj: Any) -> Any:
    if type(obj) is list:
        return [_untag(v) for v in obj]
    if type(obj) is dict:
        kind = obj.get(TAG)
        if kind is None:
            return {k: _untag(v) for k, v in obj.items()}
        items = [_untag(v) for v in obj["items"]]
        if kind == "dict":
            return {_freeze(k): v for k, v in items}
        return _CONTAINERS[kind](items)
    return obj


def _freeze(key: Any) -> Any:
    return tuple(key) if type(key) is list else key


def dumps(obj: Any) -> str:
    """Exact JSON text of a job's return value (raises TypeError when not serializable).

    Examples
    --------
    >>> loads(dumps({"a": (1, 2.5), 3: {"x"}, "n": float("nan")}))
    {'a': (1, 2.5), 3: {'x'}, 'n': nan}
    """
    return _ENCODER.encode(_tag(obj))


class _Unparsed:
    """Type of the default of :func:`loads`'s ``tree``: the text has not been parsed."""


_UNPARSED = _Unparsed()


def loads(text: str, tree: Any = _UNPARSED) -> Any:
    """Decode :func:`dumps` text (MSON objects are rebuilt like jobflow does when it resolves
    references: monty's decoder imports the classes named in the document; nothing is
    unpickled).

    ``tree`` is ``json.loads(text)`` when the caller has parsed the text already; it is then
    not parsed again (unless bson's object hook must see it), and it is consumed: the value
    returned may share its parts.

    Examples
    --------
    >>> text = dumps({"a": (1, 2)})
    >>> loads(text, json.loads(text)) == loads(text) == {"a": (1, 2)}
    True
    """
    try:
        parsed = tree if not isinstance(tree, _Unparsed) else None
        if "{" not in text:
            # no JSON object: nothing for monty's decoder (or bson's object hook) to rebuild,
            # and no tag; json.loads gives the same value without building a decoder
            return json.loads(text) if parsed is None else parsed
        if '"$' in text or '"\\u0024' in text:
            value = _DECODER.decode(text)
        else:
            # monty parses with bson's json_util when bson is installed, whose object hook
            # only rebuilds objects with a "$..." key; with none (no key starts with "$",
            # escaped or not) that is json.loads, without a Python call per object
            value = _DECODER.process_decoded(json.loads(text) if parsed is None else parsed)
        return _untag(value) if TAG in text else value
    except (ValueError, TypeError, KeyError, AttributeError, ImportError, IndexError) as err:
        raise CorruptEntryError(f"cached value does not decode: {err}") from err


class DirRewrite(NamedTuple):
    """Where an old run folder's paths go, and which of them (None: all of them).

    ``hosts`` is (old host, new host): atomate2 writes ``dir_name`` as ``"host:/path"``, and a
    served path names the host the files are on now.
    """

    new: str
    only: frozenset[str] | None = None
    hosts: tuple[str, str] | None = None


def _in_json(path: str) -> str:
    """How the folder ``path`` appears inside JSON text."""
    return json.dumps(path.rstrip("/") or path)[1:-1]


@functools.lru_cache(maxsize=1024)
def _dir_pattern(old: str) -> re.Pattern[str]:
    """``old`` as a whole path inside JSON text (optionally behind ``host:``), with what
    follows it inside the same path."""
    escaped = re.escape(_in_json(old))
    return re.compile(
        rf"(?<![\w.\-/:])(?:(?P<host>[\w.\-]+):)?{escaped}(?P<rest>(?:/[^\"\s]*)?)(?![\w.\-])"
    )


def rewrite_text(text: str, uuids: Mapping[str, str], dirs: Mapping[str, DirRewrite]) -> str:
    """Replace job uuids and run-folder paths in JSON ``text``.

    A path is rewritten when it is the old folder itself, or lies below it and its relative
    path is in ``only`` (the files the job wrote, and their folders), or ``only`` is None.

    Examples
    --------
    >>> moved = {"/a/b": DirRewrite("/n", frozenset({"x"}), hosts=("h", "k"))}
    >>> rewrite_text('["h:/a/b/x", "/a/bc", "/a/b/in.txt"]', {}, moved)
    '["k:/n/x", "/a/bc", "/a/b/in.txt"]'
    """
    # folders first: a folder named after its job's uuid (jobflow-remote's ``.../<uuid>_1``)
    # must still be recognised as the old folder; the new path holds the new uuid already
    for old, move in dirs.items():
        if not old or old == move.new or _in_json(old) not in text:  # nothing to rewrite
            continue
        text = _dir_pattern(old).sub(functools.partial(_new_path, move), text)
    if uuids:

        def new_uuid(match: re.Match[str]) -> str:
            return uuids.get(match.group(0), match.group(0))

        text = UUID_RE.sub(new_uuid, text)
    return text


def _new_path(move: DirRewrite, match: re.Match[str]) -> str:
    rest, host = match.group("rest"), match.group("host")
    if move.only is not None and rest.strip("/") and rest.strip("/") not in move.only:
        return match.group(0)  # a path in the old folder that is not the job's: untouched
    if host is not None and move.hosts is not None and host == move.hosts[0]:
        host = move.hosts[1]
    prefix = f"{host}:" if host is not None else ""
    return prefix + json.dumps(move.new.rstrip("/") or move.new)[1:-1] + rest


_CREATED = frozenset({"Job", "Flow"})
_REFERENCED = frozenset({"OutputReference"})


def _walk(node: Any, found: dict[str, set[str]]) -> None:
    if type(node) is dict:
        kind = node.get("@class")
        if type(kind) is str and kind in found and isinstance(node.get("uuid"), str):
            found[kind].add(node["uuid"])
        for value in node.values():
            if type(value) is dict or type(value) is list:  # scalars need no call
                _walk(value, found)
    elif type(node) is list:
        for value in node:
            if type(value) is dict or type(value) is list:
                _walk(value, found)


def _uuids_of(tree: Any, classes: frozenset[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {kind: set() for kind in classes}
    _walk(tree, found)
    return found


def job_uuids(tree: Any) -> tuple[set[str], set[str]]:
    """:func:`created_uuids` and :func:`referenced_uuids` of ``tree``, in one walk.

    Examples
    --------
    >>> ref = {"@class": "OutputReference", "uuid": "u"}
    >>> job_uuids([{"@class": "Job", "uuid": "j", "output": ref}])
    ({'j'}, {'u'})
    """
    found = _uuids_of(tree, _CREATED | _REFERENCED)
    created = set().union(*(found[kind] for kind in _CREATED))
    return created, found["OutputReference"]


def created_uuids(tree: Any) -> set[str]:
    """uuids of the Jobs and Flows serialized inside a decoded JSON ``tree``."""
    return set().union(*_uuids_of(tree, _CREATED).values())


def referenced_uuids(tree: Any) -> set[str]:
    """uuids of the OutputReferences serialized inside a decoded JSON ``tree``."""
    return _uuids_of(tree, _REFERENCED)["OutputReference"]
