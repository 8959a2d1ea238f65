"""How a job's return value is kept in an entry, and how it is adapted when served to a new job.

Values are JSON text written with monty's encoder (so MSON objects, datetimes, Enums and NaN are
exact on every backend), plus tags for what JSON cannot hold (tuples, sets, frozensets, dicts with
non-str keys, numpy scalars with their dtype, and dicts a decoder would take for something else:
a monty dict such as ``structure.as_dict()`` returned as a dict stays a dict) and Enum members
written as monty's dict even when they mix in str or int (JSON would write their bare value),
so a served ``Response.output`` has the types a computed one has (numpy arrays keep their dtype
through monty's own array dict).
Serving rewrites, in the text, the job uuids and run-folder paths of the run that recorded the
entry into those of the run it is served to.

A cache shared by a group is written by others, so what a cached value may name is checked
before monty's decoder sees it, by :func:`jobflow_cache.trust.check_trusted` (the rule is
written down in :mod:`jobflow_cache.trust`): nothing is ever unpickled or evaluated, no
module is imported that is neither imported already nor installed, no class is rebuilt whose
decoding reads files, the environment or further data, and a function given as a value
(``"@callable"``) must be a jobflow job. ``JOBFLOW_CACHE_TRUSTED_MODULES`` lifts the checks
for the modules it names.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import importlib
import json
import logging
import re
import sys
from collections.abc import Iterator, Mapping
from enum import Enum
from typing import Any, NamedTuple

from monty.json import MontyDecoder, MontyEncoder

from jobflow_cache.errors import CorruptEntryError, UntrustedValueError
from jobflow_cache.trust import check_trusted

__all__ = [
    "UUID_RE",
    "DirRewrite",
    "UntrustedValueError",
    "check_trusted",
    "created_uuids",
    "dumps",
    "gc_paused",
    "job_uuids",
    "loads",
    "parse",
    "referenced_uuids",
    "rewrite_text",
]

logger = logging.getLogger(__name__)

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TAG = "@jfc"
_CONTAINERS = {"tuple": tuple, "set": set, "frozenset": frozenset}
_PLAIN = frozenset({str, int, float, bool, type(None)})
# numpy scalar kinds a tag may hold: bool, ints, floats, complex, bytes, str, datetime64 and
# timedelta64 (never object "O" or structured "V": decoding a tag only ever makes such a scalar)
_NUMPY_KINDS = frozenset("biufcSUmM")
# stateless (the encoder keeps state only with allow_unserializable_objects): one of each for
# all calls, as json.dumps(obj, cls=MontyEncoder, ...) would build; building one costs ~5-15 us
_ENCODER = MontyEncoder(separators=(",", ":"), allow_nan=True)
# a key (a JSON string followed by a colon) naming a class, or starting with "$"
_MONTY_KEY = re.compile(r'"@module"\s*:')
_DOLLAR_KEY = re.compile(r'"\$[^"\\]*"\s*:')
_DECODER = MontyDecoder()


def _plain_dict(obj: dict[Any, Any]) -> bool:
    """Whether a dict goes through JSON and back as itself: str keys, none of which our tag or
    a decoder would take for its own (monty rebuilds a dict holding ``"@module"`` as the
    object it names, bson one with a ``"$..."`` key as a date, an ObjectId, ...)."""
    if TAG in obj or "@module" in obj:
        return False
    return all(type(key) is str and key[:1] != "$" for key in obj)


def _tag(obj: Any) -> Any:
    kind = type(obj)
    if kind is dict:
        if _plain_dict(obj):
            return {k: _tag(v) for k, v in obj.items()}
        # a job that returns a monty dict (``structure.as_dict()``) gets that dict back on a
        # hit, as jobflow stores it, never the object it names
        return {TAG: "dict", "items": [[_tag(k), _tag(v)] for k, v in obj.items()]}
    if kind is list:
        return [_tag(v) for v in obj]
    if kind is tuple or kind is set or kind is frozenset:
        return {TAG: kind.__name__, "items": [_tag(v) for v in obj]}
    if kind in _PLAIN:
        return obj
    if isinstance(obj, Enum):  # JSON would write a str/int mixin as its bare value
        return _ENCODER.default(obj)
    np = sys.modules.get("numpy")  # a numpy scalar exists only if numpy is imported
    if np is not None and isinstance(obj, np.generic) and obj.dtype.kind in _NUMPY_KINDS:
        return _numpy_tag(obj)
    return obj  # objects: monty's encoder


def _numpy_tag(obj: Any) -> dict[str, Any]:
    """A numpy scalar with its dtype: its Python value when JSON holds that exactly (bool, int,
    float up to 64 bits, str), else its raw bytes (a bytes_ keeps its trailing NULs)."""
    dtype = obj.dtype
    if dtype.kind in "biu" or (dtype.kind == "f" and dtype.itemsize <= 8):
        return {TAG: "numpy", "dtype": dtype.str, "value": obj.item()}
    if dtype.kind == "U":
        return {TAG: "numpy", "dtype": dtype.str, "value": str.__str__(obj)}
    data = bytes(obj) if dtype.kind == "S" else obj.tobytes()
    return {TAG: "numpy", "dtype": dtype.str, "hex": data.hex()}


def _numpy_scalar(node: dict[str, Any]) -> Any:
    """The numpy scalar of a :func:`_numpy_tag` node; ValueError for anything else (a tag only
    ever makes a numpy scalar of a plain kind, and imports nothing but numpy)."""
    np = sys.modules.get("numpy") or importlib.import_module("numpy")
    spec = node["dtype"]
    if not isinstance(spec, str) or len(spec) > 32:
        raise ValueError(f"bad numpy dtype in a cached value: {spec!r}")
    dtype = np.dtype(spec)
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"numpy dtype {spec!r} is not a scalar kind a cached value may hold")
    try:
        if "hex" in node:
            data = bytes.fromhex(node["hex"])
            if len(data) != dtype.itemsize:
                raise ValueError(f"{len(data)} bytes for numpy dtype {spec!r}")
            # bytes_ from its bytes: an array item would drop trailing NULs
            value = np.bytes_(data) if dtype.kind == "S" else np.frombuffer(data, dtype=dtype)[0]
        else:
            raw = node["value"]
            kind = dtype.kind
            expected = (
                bool if kind == "b" else int if kind in "iu" else str if kind == "U" else float
            )
            if type(raw) is not expected and not (expected is float and type(raw) is int):
                raise ValueError(f"a {type(raw).__name__} for numpy dtype {spec!r}")
            value = dtype.type(raw)
    except OverflowError as err:
        raise ValueError(str(err)) from err
    if not isinstance(value, np.generic):
        raise ValueError(f"numpy dtype {spec!r} made no numpy scalar")
    return value


def _untag(obj: Any, left: list[int] | None = None) -> Any:
    """The value of a tagged JSON tree: every tag node rebuilt into what it stands for.

    ``left`` holds one number, at least the count of tag nodes (dicts with a ``"@jfc"`` key)
    in ``obj`` that are yet to be found; it is counted down as they are found, and once it
    is 0 the rest of the tree holds none and is returned as it is, unwalked (the parts of a
    freshly parsed tree are not shared, so nothing is aliased that would not be). None: no
    bound, the whole tree is walked.
    """
    return _untag_node(obj, [sys.maxsize] if left is None else left)


def _untag_node(obj: Any, left: list[int]) -> Any:
    if not left[0]:  # every tag node has been found: nothing below needs rebuilding
        return obj
    if type(obj) is list:
        return [_untag_node(v, left) if type(v) is list or type(v) is dict else v for v in obj]
    if type(obj) is dict:
        kind = obj.get(TAG)
        if kind is None:
            return {
                k: _untag_node(v, left) if type(v) is list or type(v) is dict else v
                for k, v in obj.items()
            }
        left[0] -= 1
        if kind == "numpy":
            return _numpy_scalar(obj)
        items = [_untag_node(v, left) for v in obj["items"]]
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


#: The tag key as :func:`dumps` writes it (monty's encoder escapes no character of it).
_TAG_JSON = json.dumps(TAG)
#: Texts from this length on are decoded with the cyclic garbage collector paused (see
#: :func:`gc_paused`).
PAUSE_GC_MIN = 256 * 1024


@contextlib.contextmanager
def gc_paused(pause: bool = True) -> Iterator[None]:
    """Pause the cyclic garbage collector inside the block (when ``pause`` and it is enabled),
    and enable it again afterwards, whatever happens.

    Decoding a large value builds one container per JSON array and object (and one object
    per job of a dynamic response), and the collector, triggered by those allocations, walks
    the growing heap again and again: for 16 MB of JSON it costs three times the parse
    itself, for a response of 10,000 jobs several times the decode. Collection only frees
    reference cycles, so pausing it changes no result: it defers the work to the first
    collection after the block.
    """
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def parse(text: str) -> Any:
    """``json.loads(text)``, with the collector paused for a long text (:func:`gc_paused`)."""
    with gc_paused(len(text) >= PAUSE_GC_MIN):
        return json.loads(text)


class _Unparsed:
    """Type of the default of :func:`loads`'s ``tree``: the text has not been parsed."""


_UNPARSED = _Unparsed()


def loads(text: str, tree: Any = _UNPARSED) -> Any:
    """Decode :func:`dumps` text (MSON objects are rebuilt like jobflow does when it resolves
    references: monty's decoder imports the classes named in the document, after
    :func:`check_trusted` has checked them; nothing is unpickled). Raises
    :class:`.CorruptEntryError` (:class:`UntrustedValueError` for a value it may not decode).

    ``tree`` is ``json.loads(text)`` when the caller has parsed the text already; it is then
    not parsed again (unless bson's object hook must see it), and it is consumed: the value
    returned may share its parts.

    Examples
    --------
    >>> text = dumps({"a": (1, 2)})
    >>> loads(text, json.loads(text)) == loads(text) == {"a": (1, 2)}
    True
    """
    with gc_paused(len(text) >= PAUSE_GC_MIN):  # the one pause of every parse below
        return _loads(text, tree)


def _loads(text: str, tree: Any) -> Any:
    try:
        parsed = tree if not isinstance(tree, _Unparsed) else None
        if "{" not in text:
            # no JSON object: nothing for monty's decoder (or bson's object hook) to rebuild,
            # and no tag; json.loads gives the same value without building a decoder
            return json.loads(text) if parsed is None else parsed
        escaped = "\\u" in text  # a key may be written with escapes: decoded as named
        monty = escaped or _MONTY_KEY.search(text) is not None
        if monty:  # a module may be named
            if parsed is None:
                parsed = json.loads(text)
            check_trusted(parsed)
        if escaped or _DOLLAR_KEY.search(text) is not None:
            value = _DECODER.decode(text)
        elif not monty:
            # no dict names a class (a returned monty dict is tagged: its "@module" is no
            # key), none has a "$..." key: nothing for monty's or bson's decoder to rebuild
            value = json.loads(text) if parsed is None else parsed
        else:
            # monty parses with bson's json_util when bson is installed, whose object hook
            # only rebuilds objects with a "$..." key; with none (no key starts with "$",
            # escaped or not) that is json.loads, without a Python call per object
            value = _DECODER.process_decoded(json.loads(text) if parsed is None else parsed)
        if TAG not in text:
            return value
        # a tag node's key is the JSON string "@jfc", written as such by dumps: the text
        # holds that string at least once per tag node (more when a value or a longer string
        # holds it), so the walk stops once that many were found; a key written with
        # escapes (another writer) could spell it otherwise: then the whole tree is walked
        return _untag(value, None if escaped else [text.count(_TAG_JSON)])
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


#: Up to this many uuids to replace, the text is first searched for each of them.
_FEW_UUIDS = 8


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
    # a uuid is replaced only when it is a key of ``uuids``: when none of a few keys is in
    # the text (one substring search each, ~15x faster than the pattern's scan), nothing is
    if uuids and (len(uuids) > _FEW_UUIDS or any(old in text for old in uuids)):

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
