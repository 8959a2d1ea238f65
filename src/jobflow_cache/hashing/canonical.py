"""Pure functions that turn a job call into a stable, versioned digest.

A job call (function path + bound arguments) is first turned into a *canonical tree*: a
JSON-native value (dicts with str keys, lists, str, int, finite float, bool, None) in which every
non-JSON type is replaced by a *tagged node*. The tree is encoded to bytes with orjson (sorted
keys) and hashed with xxh3-128. The encoding is identified by :data:`SCHEME`, which every cache
entry records; any change to the rules below changes digests and needs a new scheme id (the
golden tests in ``tests/hashing/test_hashing.py`` pin them).

The rule is Python's own: two values have one digest when they are ``==`` *and* of the same
type, recursively (``(0, 1)`` and ``[0, 1]``, ``np.float32(x)`` and ``float(x)``, ``{1}`` and
``frozenset({1})`` all differ), with the few deliberate equivalences listed at the end. Digests
are stable across processes, machines, ``PYTHONHASHSEED`` and dict insertion order.

Tag format
----------
A tagged node is a dict with exactly one key, ``"\\x00<name>"`` (a NUL byte followed by an
ASCII letter), whose value is the payload. User dict keys that start with NUL are escaped by
prefixing one more NUL, so a user dict can never contain a key of the form
``"\\x00<letter>..."`` and can never forge a tag. The tags are:

* ``{"\\x00float": "nan"}``: every NaN (one node, whatever its sign or payload bits);
  ``{"\\x00float": "inf"}`` and ``"-inf"``: infinities (orjson would write ``null`` for them).
* ``{"\\x00int": "-0x1f..."}``: an int outside the signed 64-bit range, as ``hex(n)`` (decimal
  conversion of huge ints is capped by ``sys.set_int_max_str_digits``).
* ``{"\\x00bytes": "<hex>"}``: bytes; ``{"\\x00bytearray": "<hex>"}``: bytearray.
* ``{"\\x00str": "<hex>"}``: a str holding lone surrogates (no UTF-8 form), as the hex of its
  ``surrogatepass`` UTF-8 encoding.
* ``{"\\x00complex": [re, im]}``: a complex number.
* ``{"\\x00tuple": [...]}``: a tuple (a list is a JSON array).
* ``{"\\x00tuple_sub": ["module:qualname", [...]]}``: a namedtuple, or any other tuple subclass
  without ``as_dict``, by its class path (``Point(1, 2) == (1, 2)`` in Python, but the type
  differs and the job reads ``.x``); one defined inside a function cannot be named: unhashable.
* ``{"\\x00set": [...]}``: a set; ``{"\\x00frozenset": [...]}``: a frozenset; elements sorted by
  their encoded bytes. Python says ``{1} == frozenset({1})``, but the types differ (one is
  mutable and hashable only as the other), so by the rule they differ.
* ``{"\\x00npscalar": [dtype, value]}``: a numpy scalar (number, bool_, str_, bytes_) with its
  little-endian dtype string (``"<f4"``, ``"|b1"``, ``"<U3"``) and its Python value canonicalized.
* ``{"\\x00datetime": [wall time, utc offset, zone]}``: a ``datetime.datetime`` (exact type):
  its naive ISO wall time, its UTC offset in microseconds (None when naive) and its zone:
  None (naive), ``["timezone", tzname]`` (a fixed offset), ``["zoneinfo:ZoneInfo", key]``, or
  ``[tzinfo class path, str(tzinfo)]`` (pytz, dateutil). ``{"\\x00time": [...]}`` likewise for
  ``datetime.time``; ``{"\\x00date": "YYYY-MM-DD"}``; ``{"\\x00timedelta": [d, s, us]}``.
* ``{"\\x00dict": [[key, value], ...]}``: a dict with at least one key that is not a str; pairs
  of canonical key and value, sorted by encoded bytes.
* ``{"\\x00ndarray": [dtype, shape, digest]}``: a numpy array whose buffer is its value: the
  little-endian dtype string, the shape, and the xxh3-128 of its C-contiguous buffer.
* ``{"\\x00ndarray_items": [dtype, shape, items]}``: a numpy array whose buffer holds pointers,
  padding or platform-specific long doubles (object, structured, variable-width string, long
  double dtypes): its items in C order, canonicalized (long doubles as their exact ``str``).
* ``{"\\x00ndarray_sub": [class path, array node, mask node]}``: an ndarray subclass (matrix,
  masked array, ...); ``np.memmap`` is just its array.
* ``{"\\x00partial": [func, args, keywords]}``: a ``functools.partial``.
* ``{"\\x00hook": [tag, payload]}``: a str replaced by the ``normalize_str`` hook.

Rules
-----
* str, bool, None, finite float and 64-bit int are themselves. Every str value (not dict keys) is
  first passed to the ``normalize_str`` hook (which must be a pure function of the str; a
  :class:`Normalizer` is only asked about the strings it names). orjson writes every float with a
  ``.`` or an exponent, so ``1``, ``1.0`` and ``true`` are three different encodings; ``bool`` is
  tested before ``int``.
* ``-0.0`` is kept distinct from ``0.0`` (different bits; results such as ``atan2`` can differ).
  All NaNs are one value; infinities are tagged.
* list and tuple differ (a tuple is tagged); a namedtuple is tagged with its class.
* dict: key order is irrelevant, as in ``==`` (orjson sorts keys: ``{"a": 1, "b": 2}`` and
  ``{"b": 2, "a": 1}`` are one value). A dict whose keys are all str is a JSON object;
  any other dict is a tagged pair list, so ``{1: "a"}`` and ``{"1": "a"}`` differ. Note that JSON
  turns int keys into str keys, so such dicts miss (never falsely hit) after a JSON round trip.
* set and frozenset differ (two tags), as do bytes and bytearray.
* numpy: arrays hash their raw buffer once (byte order normalised to little-endian and all NaNs
  normalised to one bit pattern, so the digest does not depend on the machine). Numpy scalars
  keep their dtype: ``np.float32(1)``, ``np.float64(1)``, ``1.0``, ``np.int64(1)``, ``1``,
  ``np.bool_(True)`` and ``True`` are seven values (monty writes numpy scalars as Python
  scalars, see "Deliberate equivalences"). The monty dict of an array (``{"@module": "numpy",
  "@class": "array", "dtype", "data"}``) is decoded back to the array, so an array and its
  serialised dict have one digest.
* datetime: the zone is part of the value. ``12:00 Europe/Paris``, ``12:00+01:00`` (a fixed
  offset) and naive ``12:00`` differ although the first two are ``==``; the same instant in the
  same zone is one value; ``date(2024, 1, 1)`` and ``datetime(2024, 1, 1)`` differ. monty's dict
  of a datetime (``{"@module": "datetime", "@class": "datetime", "string"}``) is decoded as
  monty's decoder does (``fromisoformat``: a fixed offset), then tagged.
* Callables (functions, bound methods, builtins, classes) become monty's callable dict
  ``{"@module", "@callable", "@bound"}``; lambdas and functions or classes defined inside functions
  are unhashable (they cannot be named, so they cannot be told apart).
* Enums, MSONable objects (anything with ``as_dict``), dataclasses, pydantic models, Path,
  datetime subclasses (pandas Timestamp), UUID, bson ObjectId, ...: ``MontyEncoder().default(obj)``
  gives their dict form, which is then canonicalized (as a JSON form, see "Deliberate
  equivalences"), so an object and ``json.loads(json.dumps(obj, cls=MontyEncoder))`` have the same
  digest. In a dict that has both ``"@module"`` and ``"@class"``, the ``"@version"`` key is dropped,
  so a library upgrade does not invalidate every entry.
* Subclasses of dict, list, str, int and float that have no ``as_dict`` are their base value, which
  is what JSON writes for them (tuple subclasses are tagged with their class, see above). Enum
  members are always encoded as enums (type-strict), even ``str``/``int`` mixins; plain
  ``json.dumps`` collapses those to their value, so they miss (never falsely hit) after such a round
  trip, while ``jsanitize`` keeps them.
* Anything else (open files, sockets, locks, generators, plain classes without ``as_dict``), and
  structures nested deeper than :data:`MAX_DEPTH` (e.g. self-referencing ones) raise
  :class:`~jobflow_cache.errors.UnhashableInputError` naming where the value sits, e.g.
  ``"structure.sites[3]"``.

Deliberate equivalences
-----------------------
Everything else is kept apart. Kept (``==`` values of different type, or values ``==`` cannot
compare, that share a digest on purpose):

* dict key order (``==`` ignores it too); set element order; a dict subclass (OrderedDict,
  defaultdict), list, str, int or float subclass without ``as_dict`` and its base value (JSON
  writes the base value; they are rare as job inputs);
* an object (MSONable, dataclass, pydantic model, Enum, Path, ...) and its monty dict, an array
  and its monty dict, a datetime and its monty dict as monty decodes it: jobflow sends a flow to
  a FireWorks or jobflow-remote worker as monty JSON, and the objects must still hit there;
* hence, inside an object's JSON form (what ``as_dict``, a dataclass's fields or a pydantic dump
  give), values are hashed as monty's JSON holds them: tuples and namedtuples as lists, numpy
  scalars as the Python scalars monty writes, datetimes with the fixed offset monty's decoder
  gives back. An object is identified by its JSON form, which is all a worker receives (and
  ``from_dict`` rebuilds it from): ``Settings(tags=("a",))`` and ``Settings(tags=["a"])`` are one
  value, and a Maker with a tuple field hits on a worker. Values given directly as arguments,
  or in lists, tuples, dicts and sets of them, keep every ``jfc2`` distinction;
* the ``"@version"`` of a monty dict (a library upgrade must not invalidate every entry);
* all NaNs (one value, as for the float NaN tag); an array's memory layout, byte order and NaN
  bit patterns; a ``np.memmap`` and its array.

Removed in ``jfc2`` (they shared a digest in ``jfc1``): list and tuple, set and frozenset, bytes
and bytearray, a numpy scalar and its Python scalar, a namedtuple and its tuple, datetimes whose
time zones differ in name only. JSON cannot hold them apart, so a flow's JSON round trip loses
them: on a FireWorks/jobflow-remote worker the arguments come back from JSON (tuples as lists,
numpy scalars as Python scalars, zones as fixed offsets) on *every* run, consistently, so a worker
run still hits a previous worker run. A local run and a worker run of the same flow may miss each
other where such values sit in the arguments: a miss, never a false hit.

The hook sees str values only (not dict keys, not the items of numpy string arrays; it does see
the str objects in object arrays and the value of a ``np.str_``).

The call digest is the digest of ``["call", SCHEME, function, cache_version, [[name, sub_digest],
...]]`` with the pairs sorted by name, where each ``sub_digest`` is the digest of one argument's
canonical encoding.

Accelerator
-----------
Most inputs are already canonical: exact str (with a UTF-8 form), finite float, int in the signed
64-bit range, bool, None, and lists, tuples and str-keyed dicts of them. Their canonical tree is the
value itself (a tuple wrapped in its one-key tag dict), so walking them in Python, about 10x the
cost of orjson's own encoding, buys nothing. The optional C extension ``jobflow_cache._speedups``
(``_speedups.c``, built by ``setup.py`` with ``optional=True``) walks a value once, keeps every part
that is already canonical as it is, wraps exact tuples in their tag, drops the ``"@version"`` of
monty dicts, and hands every other node (subclasses, namedtuples, enums, numpy scalars and arrays,
sets, datetimes, NaN and infinities, big ints, lone surrogates, dicts with non-str or NUL-prefixed
keys, monty numpy and datetime dicts, nesting beyond :data:`MAX_DEPTH`, str values the hook may
replace) to the pure-Python rules above, whose result takes the node's place in a copy of its
containers. Inside an object's JSON form it walks tuples as lists and its fallback is the form's
(``_canon_in_form``). The bytes hashed are therefore the same either way; the Python path is the
reference, ``tests/hashing/test_speedups.py`` checks that both give identical encodings, errors and
hook calls. Without a C compiler the package installs and runs without the extension; setting
``JOBFLOW_CACHE_SPEEDUPS=0`` (read at import) turns it off.

A hook called for every str value would cost a Python call each; a :class:`Normalizer` names the
strings it may replace (an exact set and substrings), and only those reach it.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib
import inspect
import logging
import math
import os
import sys
import types
from collections.abc import Callable, Collection, Iterable, Mapping
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeAlias

import orjson
import xxhash

from jobflow_cache.errors import UnhashableInputError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from monty.json import MontyEncoder

__all__ = [
    "MAX_DEPTH",
    "SCHEME",
    "CallDigest",
    "NormalizeStr",
    "Normalizer",
    "bind_arguments",
    "canonicalize",
    "digest_bytes",
    "digest_call",
    "digest_value",
    "encode",
    "function_path",
]

logger = logging.getLogger(__name__)

SCHEME: str = "jfc2"
"""Identifier of the canonical encoding; recorded in every cache entry. Bump on any change."""

MAX_DEPTH: int = 100
"""Deepest container nesting accepted; deeper (e.g. self-referencing) inputs are unhashable."""

NormalizeStr: TypeAlias = Callable[[str], tuple[str, Any] | None]
"""Hook called for every str value (not dict keys): ``None`` keeps the string, ``(tag, payload)``
replaces it by the node ``{"\\x00hook": [tag, canonicalize(payload)]}``."""

# Tag keys. Each is NUL + an ASCII letter; escaped user keys start with two NULs (see module doc).
_T_FLOAT = "\x00float"
_T_INT = "\x00int"
_T_BYTES = "\x00bytes"
_T_STR = "\x00str"
_T_COMPLEX = "\x00complex"
_T_SET = "\x00set"
_T_FROZENSET = "\x00frozenset"
_T_TUPLE = "\x00tuple"
_T_TUPLE_SUB = "\x00tuple_sub"
_T_BYTEARRAY = "\x00bytearray"
_T_NPSCALAR = "\x00npscalar"
_T_DATETIME = "\x00datetime"
_T_DATE = "\x00date"
_T_TIME = "\x00time"
_T_TIMEDELTA = "\x00timedelta"
_T_DICT = "\x00dict"
_T_NDARRAY = "\x00ndarray"
_T_NDARRAY_ITEMS = "\x00ndarray_items"
_T_NDARRAY_SUB = "\x00ndarray_sub"
_T_PARTIAL = "\x00partial"
_T_HOOK = "\x00hook"

_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
_MAX_PATH_SEGMENTS = 16

# orjson natively serialises dataclasses, datetimes and str/int/dict/list subclasses; a canonical
# tree never holds them, so route them to ``_reject`` rather than encode them silently.
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)

# Numpy kinds whose raw buffer *is* the value (no pointers, no padding).
_RAW_KINDS = frozenset("biufcmMSUV")

# The optional C accelerator (see "Accelerator" in the module docstring); None: pure Python.
_speedups: types.ModuleType | None
try:
    from jobflow_cache import _speedups
except ImportError:  # not compiled (no compiler at install time): the pure-Python path
    _speedups = None
if os.environ.get("JOBFLOW_CACHE_SPEEDUPS", "1").strip() == "0":
    _speedups = None


class _UnhashableError(Exception):
    """Internal error; path segments are collected while unwinding, innermost first.

    Building the path only on failure keeps the hot path free of string formatting.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.segments: list[str] = []


if _speedups is not None:
    _speedups.configure(_UnhashableError)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


class Normalizer:
    """A ``normalize_str`` hook that names the strings it may replace.

    ``func`` must return None for every str that is not in ``exact`` and contains none of
    ``markers``. Hashing then calls it only for the strings that are (a set lookup and a
    substring search per str value instead of a Python call), which gives the same digests.
    A plain callable hook is called for every str value.

    Parameters
    ----------
    func
        The hook, see :data:`NormalizeStr`.
    exact
        Strings ``func`` may replace (any container; a live dict may grow between calls).
    markers
        Substrings: a str containing one of them may be replaced.

    Examples
    --------
    >>> hook = Normalizer(lambda s: ("job", 1) if s == "u1" else None, exact={"u1"})
    >>> digest_value(["u1", "x"], normalize_str=hook) == digest_value(
    ...     ["u1", "x"], normalize_str=lambda s: ("job", 1) if s == "u1" else None
    ... )
    True
    """

    __slots__ = ("exact", "func", "markers")

    def __init__(
        self,
        func: NormalizeStr,
        *,
        exact: Collection[str] = (),
        markers: Iterable[str] = (),
    ) -> None:
        self.func = func
        self.exact = exact
        self.markers = tuple(markers)
        if not all(type(m) is str and m for m in self.markers):
            raise TypeError(f"markers must be non-empty str, not {self.markers!r}")

    def __call__(self, value: str) -> tuple[str, Any] | None:
        return self.func(value)

    def __repr__(self) -> str:
        return f"Normalizer({self.func!r}, markers={self.markers!r})"


def canonicalize(obj: Any, *, normalize_str: NormalizeStr | None = None, path: str = "") -> Any:
    """Return the canonical, type-tagged, JSON-native tree of a value.

    Parameters
    ----------
    obj
        Any value: JSON-like data, numpy arrays, MSONable objects, dataclasses, ...
    normalize_str
        Optional hook called for every str value met (not dict keys); see :data:`NormalizeStr`.
    path
        Where ``obj`` sits, used as the prefix of error paths (e.g. the argument name).

    Returns
    -------
    Any
        A tree of dicts with str keys, lists, str, int, finite float, bool and None (the order
        of dict keys is unspecified: :func:`encode` sorts them).

    Raises
    ------
    UnhashableInputError
        If some part of ``obj`` has no canonical encoding; ``.path`` says where.

    Examples
    --------
    >>> canonicalize({"a": {3}, "b": (1, 2.0)})
    {'a': {'\\x00set': [3]}, 'b': {'\\x00tuple': [1, 2.0]}}
    >>> canonicalize(float("nan"))
    {'\\x00float': 'nan'}
    >>> canonicalize({1: "x"})
    {'\\x00dict': [[1, 'x']]}
    """
    tree = _encodable(obj, normalize_str, path)
    if _speedups is None:
        return tree
    # The accelerated tree may hold tuples and share parts with obj: return a fresh copy.
    return orjson.loads(encode(tree))


def encode(canon: Any) -> bytes:
    """Return the canonical bytes of a canonical tree (orjson, sorted keys).

    Parameters
    ----------
    canon
        A tree returned by :func:`canonicalize` (or built from such trees with lists).

    Returns
    -------
    bytes
        Compact JSON, object keys sorted.

    Examples
    --------
    >>> encode({"b": [1, 2.0], "a": None})
    b'{"a":null,"b":[1,2.0]}'
    """
    try:
        return orjson.dumps(canon, option=_ORJSON_OPTIONS, default=_reject)
    except orjson.JSONEncodeError as err:
        raise UnhashableInputError(f"not a canonical tree: {err}") from err


def digest_bytes(data: bytes) -> str:
    """Return the xxh3-128 hex digest (32 characters) of some bytes.

    Examples
    --------
    >>> digest_bytes(b"")
    '99aa06d3014798d86001c324468d497f'
    """
    return xxhash.xxh3_128_hexdigest(data)


def digest_value(obj: Any, *, normalize_str: NormalizeStr | None = None) -> str:
    """Return the digest of one value's canonical encoding.

    Examples
    --------
    >>> digest_value({"a": 1, "b": 2}) == digest_value({"b": 2, "a": 1})
    True
    >>> len({digest_value(True), digest_value(1), digest_value(1.0)})
    3
    """
    return xxhash.xxh3_128_hexdigest(_encode_value(obj, normalize_str, ""))


def function_path(func: Callable[..., Any]) -> str:
    """Return ``"module:qualname"`` of a function (or class, or bound method).

    A lambda or a function or class defined inside a function gets its path too
    (``"tests.test_x:test_a.<locals>.add"``), but that path does not identify it: another call
    of the enclosing function makes another function of the same name, with other closure
    values, and an edit may keep the name. A job digest therefore always holds its code as
    well (:func:`jobflow_cache.hashing.code.job_code`, which for such functions always counts
    their compiled code, closure values and defaults). As *values* (arguments), such
    functions and classes stay unhashable (see :func:`canonicalize`).

    Parameters
    ----------
    func
        The real function; unwrapping decorators is the caller's job.

    Raises
    ------
    UnhashableInputError
        For objects with no ``__module__``/``__qualname__``.

    Examples
    --------
    >>> import json
    >>> function_path(json.dumps)
    'json:dumps'
    >>> def outer():
    ...     return lambda x: x
    >>> function_path(outer())
    'jobflow_cache.hashing.canonical:outer.<locals>.<lambda>'
    """
    try:
        module, qualname = _qualified_name(func, local=True)
    except _UnhashableError as err:
        raise UnhashableInputError(err.message) from None
    return f"{module}:{qualname}"


def bind_arguments(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    ignore: Iterable[str] = (),
) -> dict[str, Any]:
    """Bind a call's arguments to parameter names, defaults applied.

    ``f(1, b=2)``, ``f(1, 2)`` and ``f(1)`` with default ``b=2`` give the same dict. For a bound
    method the object it is bound to is returned under the name of its first parameter (usually
    ``self``), so the call digest covers it; ``Cls.method`` called with the object as first argument
    gives the same dict.

    Parameters
    ----------
    func
        The function called.
    args, kwargs
        The positional and keyword arguments of the call.
    ignore
        Parameter names to leave out (e.g. a ``verbose`` flag that cannot change the result).

    Returns
    -------
    dict[str, Any]
        ``{parameter name: value}`` in signature order; ``*args`` is collected as a list under its
        name, ``**kwargs`` as a dict under its name.

    Raises
    ------
    ValueError
        If a name in ``ignore`` is not a parameter of ``func``.
    TypeError
        If the arguments do not match the signature.

    Examples
    --------
    >>> def f(a, b=2, *rest, **extra):
    ...     pass
    >>> bind_arguments(f, (1,), {})
    {'a': 1, 'b': 2, 'rest': [], 'extra': {}}
    >>> bind_arguments(f, (1, 2, 3), {"z": 4}, ignore=["b"])
    {'a': 1, 'rest': [3], 'extra': {'z': 4}}
    """
    if isinstance(func, types.MethodType):
        signature = _signature(func.__func__)
        args = (func.__self__, *args)
    else:
        signature = _signature(func)
    result = _bind(signature, args, kwargs)

    if ignore:
        ignored = set(ignore)
        unknown = ignored.difference(signature.parameters)
        if unknown:
            raise ValueError(f"ignored names {sorted(unknown)} are not parameters of {func!r}")
        for name in ignored:
            del result[name]
    return result


@dataclasses.dataclass(frozen=True)
class CallDigest:
    """The digest of one job call, with what it was computed from.

    Attributes
    ----------
    digest
        The call digest (32 hex characters).
    scheme
        :data:`SCHEME` at the time of hashing.
    function
        The function path, ``"module:qualname"``.
    cache_version
        The user's cache version of the function, if any.
    arg_digests
        Per-argument sub-digest, to explain a miss.
    encodings
        Per-argument canonical encoding (the bytes each sub-digest is the digest of).
    """

    digest: str
    scheme: str
    function: str
    cache_version: str | None
    arg_digests: dict[str, str]
    encodings: dict[str, bytes]

    @functools.cached_property
    def canonical(self) -> dict[str, Any]:
        """Per-argument canonical tree (JSON-native), decoded from :attr:`encodings` when read."""
        return {name: orjson.loads(data) for name, data in self.encodings.items()}


def digest_call(
    function: str,
    arguments: Mapping[str, Any],
    *,
    cache_version: str | None = None,
    normalize_str: NormalizeStr | None = None,
) -> CallDigest:
    """Digest a job call.

    Each argument is canonicalized once; its sub-digest is the digest of its encoding; the call
    digest is the digest of ``["call", SCHEME, function, cache_version, [[name, sub_digest], ...]]``
    with the pairs sorted by name. An argument named ``self`` (a bound Maker) is just an argument.

    Parameters
    ----------
    function
        The function path, see :func:`function_path`.
    arguments
        The bound arguments, see :func:`bind_arguments`.
    cache_version
        Bumped by the user to invalidate the entries of a function whose code changed.
    normalize_str
        Optional hook applied to every str value, see :data:`NormalizeStr`.

    Raises
    ------
    UnhashableInputError
        If an argument cannot be canonicalized; ``.path`` starts with the argument name.

    Examples
    --------
    >>> call = digest_call("mod:f", {"a": 1, "b": [2, 3]})
    >>> call.canonical
    {'a': 1, 'b': [2, 3]}
    >>> call.digest != digest_call("mod:f", {"a": 1, "b": [2, 3]}, cache_version="2").digest
    True
    """
    if type(function) is not str:
        raise TypeError(f"function must be a str path, not {type(function).__name__}")
    if cache_version is not None and type(cache_version) is not str:
        raise TypeError(f"cache_version must be a str or None, not {type(cache_version).__name__}")
    encodings: dict[str, bytes] = {}
    arg_digests: dict[str, str] = {}
    for name, value in arguments.items():
        if type(name) is not str:
            raise TypeError(f"argument names must be str, not {name!r}")
        data = _encode_value(value, normalize_str, name)
        encodings[name] = data
        arg_digests[name] = xxhash.xxh3_128_hexdigest(data)
    pairs = [[name, arg_digests[name]] for name in sorted(arg_digests)]
    digest = digest_bytes(encode(["call", SCHEME, function, cache_version, pairs]))
    logger.debug("digest %s for %s (version %r)", digest, function, cache_version)
    return CallDigest(
        digest=digest,
        scheme=SCHEME,
        function=function,
        cache_version=cache_version,
        arg_digests=arg_digests,
        encodings=encodings,
    )


# --------------------------------------------------------------------------------------------------
# canonical encoding
# --------------------------------------------------------------------------------------------------
#
# Why the encoding is injective (two different values never share a tree, except for the
# deliberate equivalences listed in the module docstring): every node can be decoded back by its
# JSON type alone -- null, bool, int and float are distinct JSON tokens (orjson writes every float
# with "." or an exponent), str is a JSON string, list a JSON array -- and a JSON object is either
# a tag (exactly one key, NUL + letter) or a user dict with str keys, whose keys never look like a
# tag because keys starting with NUL are escaped by one more NUL (an injective renaming). Each
# tag's payload is in turn an injective encoding of its type. Sets and non-str-keyed dicts are
# sorted by encoded bytes, which depend only on the value, never on hashing or insertion order.


def _encodable(obj: Any, hook: NormalizeStr | None, path: str) -> Any:
    # A tree whose encoding is the canonical encoding of obj (with the accelerator it may hold
    # tuples and share parts with obj, see _tree), errors reported as UnhashableInputError.
    try:
        return _tree(obj, hook, 0)
    except _UnhashableError as err:
        raise UnhashableInputError(err.message, _join_path(path, err.segments)) from err.__cause__
    except RecursionError as err:  # an as_dict() or a hook recursing without end
        raise UnhashableInputError("value is nested too deeply to canonicalize", path) from err


def _encode_value(obj: Any, hook: NormalizeStr | None, path: str) -> bytes:
    # encode(_encodable(obj, hook, path)) with the common case (accelerator, no hook) inlined:
    # it is the whole cost of hashing small values.
    speedups = _speedups
    if speedups is None or hook is not None:
        return encode(_encodable(obj, hook, path))
    try:
        tree = speedups.tree(obj, 0, MAX_DEPTH, _canon, None, None, None)
    except _UnhashableError as err:
        raise UnhashableInputError(err.message, _join_path(path, err.segments)) from err.__cause__
    except RecursionError as err:
        raise UnhashableInputError("value is nested too deeply to canonicalize", path) from err
    try:
        return orjson.dumps(tree, option=_ORJSON_OPTIONS, default=_reject)
    except orjson.JSONEncodeError:
        return encode(tree)  # raises


def _tree(obj: Any, hook: NormalizeStr | None, depth: int) -> Any:
    # _canon(obj, hook, depth), or the accelerator's equivalent: the parts of obj that are already
    # canonical are kept as they are (tuples included, which encode like lists), the rest is
    # handed to _canon. Only the encoding of the result is the same: use it only to encode.
    speedups = _speedups
    if speedups is None:
        return _canon(obj, hook, depth)
    fallback, tuples = _canon, 1
    if type(hook) is _InForm:  # an object's JSON form: tuples as lists, the fallback in form
        hook, fallback, tuples = hook.hook, _canon_in_form, 0
    if hook is None:
        return speedups.tree(obj, depth, MAX_DEPTH, fallback, None, None, None, tuples)
    if type(hook) is Normalizer:
        return speedups.tree(
            obj, depth, MAX_DEPTH, fallback, hook, hook.exact, hook.markers, tuples
        )
    return speedups.tree(obj, depth, MAX_DEPTH, fallback, hook, None, None, tuples)


class _InForm:
    """The hook while canonicalizing an object's JSON form (see "Deliberate equivalences"):
    there, values are what JSON holds (tuples as lists, numpy scalars as Python scalars,
    datetimes with a fixed offset), so an object and its monty dict are one value."""

    __slots__ = ("hook",)

    def __init__(self, hook: NormalizeStr | None) -> None:
        self.hook = hook

    def __call__(self, value: str) -> tuple[str, Any] | None:
        return None if self.hook is None else self.hook(value)


def _canon_in_form(obj: Any, hook: NormalizeStr | None, depth: int) -> Any:
    # The accelerator's fallback inside a JSON form: it passes the hook unwrapped.
    return _canon(obj, _InForm(hook), depth)


def _tuple_node(items: list[Any], hook: NormalizeStr | None) -> Any:
    return items if type(hook) is _InForm else {_T_TUPLE: items}


def _canon(obj: Any, hook: NormalizeStr | None, depth: int) -> Any:
    # Leaves first, by exact type (bool is not int here: type(True) is bool).
    t = type(obj)
    if t is str:
        return obj if hook is None and obj.isascii() else _canon_str(obj, hook)
    if t is float:
        return obj if obj - obj == 0.0 else _nonfinite(obj)  # x - x is nan for nan and inf
    if t is int:
        return obj if _INT_MIN <= obj <= _INT_MAX else {_T_INT: hex(obj)}
    if obj is None or t is bool:
        return obj
    if t is list:
        return _canon_seq(obj, hook, depth)
    if t is tuple:
        return _tuple_node(_canon_seq(obj, hook, depth), hook)
    if t is dict:
        return _canon_dict(obj, hook, depth)
    return _canon_other(obj, hook, depth)


def _too_deep() -> _UnhashableError:
    return _UnhashableError(
        f"nesting deeper than {MAX_DEPTH} levels (is the structure self-referencing?)"
    )


def _nonfinite(value: float) -> dict[str, str]:
    if value != value:
        return {_T_FLOAT: "nan"}
    return {_T_FLOAT: "inf" if value > 0 else "-inf"}


def _canon_str(value: str, hook: NormalizeStr | None) -> Any:
    if hook is not None:
        replaced = hook(value)
        if replaced is not None:
            return _hook_node(replaced)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return {_T_STR: value.encode("utf-8", "surrogatepass").hex()}
    return value


def _hook_node(replaced: Any) -> dict[str, Any]:
    if not (isinstance(replaced, tuple) and len(replaced) == 2 and type(replaced[0]) is str):
        raise _UnhashableError(
            f"normalize_str must return None or a (str, payload) pair, not {replaced!r}"
        )
    tag, payload = replaced
    try:
        return {_T_HOOK: [tag, _canon(payload, None, 0)]}
    except _UnhashableError as err:
        raise _UnhashableError(
            f"normalize_str returned an unhashable payload: {err.message}"
        ) from err


def _canon_seq(seq: Sequence[Any], hook: NormalizeStr | None, depth: int) -> list[Any]:
    if depth >= MAX_DEPTH:
        raise _too_deep()
    depth += 1
    # Fast paths for long homogeneous lists of floats, ints or ASCII strs (already canonical).
    if len(seq) > 16:
        kinds = set(map(type, seq))
        if len(kinds) == 1:
            kind = kinds.pop()
            if kind is float:
                if math.isfinite(sum(seq)):  # a finite sum proves every element finite
                    return list(seq)
            elif kind is int:
                if min(seq) >= _INT_MIN and max(seq) <= _INT_MAX:
                    return list(seq)
            elif kind is str and hook is None and all(map(str.isascii, seq)):
                return list(seq)
    out: list[Any] = []
    append = out.append
    item: Any = None
    try:
        for item in seq:
            t = type(item)
            if (t is float and item - item == 0.0) or (t is int and _INT_MIN <= item <= _INT_MAX):
                append(item)  # leaves and common containers inlined: fewer calls per node
            elif t is str:
                append(item if hook is None and item.isascii() else _canon_str(item, hook))
            elif t is list:
                append(_canon_seq(item, hook, depth))
            elif t is tuple:
                append(_tuple_node(_canon_seq(item, hook, depth), hook))
            elif t is dict:
                append(_canon_dict(item, hook, depth))
            else:
                append(_canon(item, hook, depth))
    except _UnhashableError as err:
        # The first element identical to the failing one is where it failed.
        index = next(i for i, other in enumerate(seq) if other is item)
        err.segments.append(f"[{index}]")
        raise
    return out


def _key_segment(key: Any) -> str:
    if type(key) is str and key.isidentifier():
        return f".{key}"
    return f"[{key!r}]"


def _canon_dict(d: Mapping[Any, Any], hook: NormalizeStr | None, depth: int) -> Any:
    if depth >= MAX_DEPTH:
        raise _too_deep()
    depth += 1
    cls, module = d.get("@class"), d.get("@module")
    # isinstance first: `==` of an array (or any odd object) with a str may raise
    if isinstance(cls, str) and isinstance(module, str):
        if cls == "array" and module == "numpy":
            array = _decode_numpy_dict(d)
            if array is not None:
                return _canon_ndarray(array, hook, depth)
        elif cls == "datetime" and module == "datetime":
            when = _decode_datetime_dict(d)
            if when is not None:
                return _canon_datetime(when)
    out: dict[str, Any] = {}
    str_keys = True
    key: Any = None
    try:
        for key, value in d.items():
            if type(key) is not str or (not key.isascii() and _canon_str(key, None) is not key):
                # A non-str key, or one holding lone surrogates (no UTF-8 form): pair form.
                str_keys = False
                break
            t = type(value)
            if t is str:
                canon = value if hook is None and value.isascii() else _canon_str(value, hook)
            elif (
                (t is float and value - value == 0.0)
                or (t is int and _INT_MIN <= value <= _INT_MAX)
                or value is None
                or t is bool
            ):
                canon = value  # leaves and common containers inlined: fewer calls per node
            elif t is list:
                canon = _canon_seq(value, hook, depth)
            elif t is tuple:
                canon = _tuple_node(_canon_seq(value, hook, depth), hook)
            elif t is dict:
                canon = _canon_dict(value, hook, depth)
            else:
                canon = _canon(value, hook, depth)
            out["\x00" + key if key[:1] == "\x00" else key] = canon
    except _UnhashableError as err:
        err.segments.append(_key_segment(key))
        raise
    if not str_keys:
        return _canon_dict_pairs(d, hook, depth)
    return _drop_version(out) if "@version" in out else out


def _drop_version(out: dict[str, Any]) -> dict[str, Any]:
    # monty's "@version" is the library version: not part of the value (see module docstring).
    if "@version" in out and "@module" in out and "@class" in out:
        del out["@version"]
    return out


def _canon_dict_pairs(d: Mapping[Any, Any], hook: NormalizeStr | None, depth: int) -> Any:
    pairs: list[list[Any]] = []
    for key, value in d.items():
        try:
            canon_key = _canon(key, None, depth)  # the hook never applies to keys
            canon_value = _canon(value, hook, depth)
        except _UnhashableError as err:
            err.segments.append(_key_segment(key))
            raise
        pairs.append([canon_key, canon_value])
    if all(type(k) is str for k, _ in pairs):
        # Every key is canonically a plain str (e.g. str subclass keys): the form of a str dict.
        plain = {"\x00" + k if k[:1] == "\x00" else k: v for k, v in pairs}
        if len(plain) == len(pairs):
            return _drop_version(plain)
    pairs.sort(key=encode)
    return {_T_DICT: pairs}


def _canon_set(
    s: Iterable[Any], hook: NormalizeStr | None, depth: int, tag: str = _T_SET
) -> dict[str, Any]:
    if depth >= MAX_DEPTH:
        raise _too_deep()
    depth += 1
    items: list[Any] = []
    for item in s:
        try:
            items.append(_canon(item, hook, depth))
        except _UnhashableError as err:
            err.segments.append("{*}")
            raise
    items.sort(key=encode)
    return {tag: items}


def _canon_other(obj: Any, hook: NormalizeStr | None, depth: int) -> Any:
    # Order matters: Enum before the str/int mixins, numpy before float (np.float64 is a float),
    # classes and callables before as_dict (an MSONable *class* has an as_dict attribute).
    if depth >= MAX_DEPTH:
        raise _too_deep()
    depth += 1
    if isinstance(obj, Enum):
        return _canon_via_monty(obj, hook, depth)
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(obj, np.ndarray):
            return _canon_ndarray(obj, hook, depth)
        if isinstance(obj, np.generic):
            return _canon_numpy_scalar(obj, np, hook, depth)
    if isinstance(obj, frozenset):
        return _canon_set(obj, hook, depth, _T_FROZENSET)
    if isinstance(obj, set):
        return _canon_set(obj, hook, depth)
    if isinstance(obj, bytearray):
        return {_T_BYTEARRAY: obj.hex()}
    if isinstance(obj, bytes):
        return {_T_BYTES: obj.hex()}
    encode_time = _TIME_TYPES.get(type(obj))  # exact types: subclasses (pandas) go to monty
    if encode_time is not None:
        if type(hook) is _InForm and type(obj) is datetime.datetime:
            obj = _as_monty_decodes(obj)
        return encode_time(obj)
    if isinstance(obj, functools.partial):
        return _canon_partial(obj, hook, depth)
    if isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        return _canon_callable(obj, hook, depth)
    if hasattr(obj, "as_dict"):
        return _canon_via_monty(obj, hook, depth)
    # Subclasses of JSON types without as_dict: their base value, as JSON writes them.
    if isinstance(obj, str):
        return _canon(str.__str__(obj), hook, depth)
    if isinstance(obj, int):
        return _canon(int.__int__(obj), hook, depth)
    if isinstance(obj, float):
        return _canon(float.__float__(obj), hook, depth)
    if isinstance(obj, complex):
        return {_T_COMPLEX: [_canon(obj.real, None, depth), _canon(obj.imag, None, depth)]}
    if isinstance(obj, Mapping):
        return _canon_dict(obj if isinstance(obj, dict) else dict(obj), hook, depth)
    if isinstance(obj, tuple):  # a namedtuple, or another tuple subclass: its class matters
        if type(hook) is _InForm:
            return _canon_seq(obj, hook, depth)
        module, qualname = _qualified_name(type(obj))
        return {_T_TUPLE_SUB: [f"{module}:{qualname}", _canon_seq(obj, hook, depth)]}
    if isinstance(obj, list):
        return _canon_seq(obj, hook, depth)
    return _canon_via_monty(obj, hook, depth)


@functools.cache
def _monty_encoder() -> MontyEncoder:
    # Imported on first use: monty.json imports numpy, which plain JSON-like inputs never need.
    from monty.json import MontyEncoder

    return MontyEncoder()


def _canon_via_monty(obj: Any, hook: NormalizeStr | None, depth: int) -> Any:
    try:
        form = _monty_encoder().default(obj)
    except Exception as err:
        cls = type(obj)
        raise _UnhashableError(
            f"{cls.__module__}.{cls.__qualname__} object has no JSON form "
            f"(no as_dict, not a dataclass, pydantic model or monty-known type): {err}"
        ) from err
    if form is obj:
        raise _UnhashableError(f"{type(obj).__qualname__} object encodes to itself")
    return _tree(form, hook if type(hook) is _InForm else _InForm(hook), depth)


def _qualified_name(obj: Any, *, local: bool = False) -> tuple[str, str]:
    # local: a lambda or a function or class defined inside a function gets its path too
    # (only function_path asks: the job's code digest identifies it, see there)
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str):
        raise _UnhashableError(f"{obj!r} has no __qualname__, so it cannot be named")
    if not isinstance(module, str):
        bound = getattr(obj, "__self__", None)
        module = None if bound is None else type(bound).__module__
        if not isinstance(module, str):
            raise _UnhashableError(f"{obj!r} has no __module__, so it cannot be named")
    if "<" in qualname and not local:  # <lambda>, <locals>, <genexpr>, ...
        raise _UnhashableError(
            f"{module}:{qualname} is a lambda or is defined inside a function; "
            "only module-level functions and classes can be hashed (they are identified by name)"
        )
    return module, qualname


def _canon_callable(obj: Any, hook: NormalizeStr | None, depth: int) -> Any:
    # monty's JSON form of a callable, so a function and its serialised dict share a digest.
    module, qualname = _qualified_name(obj)
    bound = getattr(obj, "__self__", None)
    if isinstance(obj, type) or isinstance(bound, types.ModuleType):
        bound = None  # classes, and builtins whose __self__ is their module
    form = {"@module": module, "@callable": qualname, "@bound": bound}
    return _canon_dict(form, hook, depth)


def _canon_partial(obj: functools.partial[Any], hook: NormalizeStr | None, depth: int) -> Any:
    try:
        func = _canon(obj.func, hook, depth)
    except _UnhashableError as err:
        err.segments.append(".func")
        raise
    try:
        args = _canon_seq(obj.args, hook, depth)
    except _UnhashableError as err:
        err.segments.append(".args")
        raise
    try:
        keywords = _canon_dict(obj.keywords, hook, depth)
    except _UnhashableError as err:
        err.segments.append(".keywords")
        raise
    return {_T_PARTIAL: [func, args, keywords]}


# --------------------------------------------------------------------------------------------------
# numpy (never imported here: an array or numpy scalar exists only if numpy is already imported)
# --------------------------------------------------------------------------------------------------


def _canon_numpy_scalar(obj: Any, np: Any, hook: NormalizeStr | None, depth: int) -> Any:
    # The dtype is kept: np.float32(x), np.float64(x) and float(x) differ (see the module doc).
    value: Any = None
    if isinstance(obj, np.str_):
        value = str.__str__(obj)  # .item() would drop trailing NULs
    elif isinstance(obj, np.bytes_):
        value = bytes(obj)
    elif isinstance(obj, (np.number, np.bool_)):
        value = obj.item()
        if isinstance(value, np.generic):  # long double stays a numpy scalar
            value = None
    if value is not None:
        if type(hook) is _InForm:  # in a JSON form: the Python scalar monty writes
            return _canon(value, hook, depth)
        return {_T_NPSCALAR: [_dtype_key(obj.dtype), _canon(value, hook, depth)]}
    # datetime64, timedelta64, void, long double: as a 0-d array, which keeps the dtype.
    return _canon_ndarray(np.asarray(obj), hook, depth)


def _dtype_key(dtype: Any) -> Any:
    if dtype.fields is not None:
        descr = dtype.newbyteorder("<").descr
        return _canon(descr, None, 0)
    if dtype.byteorder in "=>":
        dtype = dtype.newbyteorder("<")
    return dtype.str


def _canon_ndarray(arr: Any, hook: NormalizeStr | None, depth: int) -> Any:
    np = sys.modules["numpy"]
    if type(arr) is not np.ndarray:
        return _canon_ndarray_subclass(arr, np, hook, depth)
    dtype = arr.dtype
    shape = list(arr.shape)
    kind = dtype.kind
    component_size = dtype.itemsize // 2 if kind == "c" else dtype.itemsize
    if (
        kind in _RAW_KINDS
        and dtype.fields is None
        and not (kind in "fc" and component_size not in (2, 4, 8))
    ):
        data = np.ascontiguousarray(arr)
        if dtype.byteorder == ">" or (dtype.byteorder == "=" and sys.byteorder == "big"):
            data = data.astype(dtype.newbyteorder("<"))
        if kind in "fc":
            floats = data.reshape(-1).view(f"<f{component_size}")
            # min() propagates NaN without allocating: a cheap test before the exact one.
            if floats.size and np.isnan(floats.min()):
                nans = np.isnan(floats)  # one bit pattern for every NaN, as for Python floats
                floats = floats.copy()
                floats[nans] = np.nan
                data = floats
        return {_T_NDARRAY: [_dtype_key(dtype), shape, xxhash.xxh3_128_hexdigest(data)]}
    # The buffer holds pointers, padding or platform-specific long doubles: hash the items.
    if kind in "fc":
        items: Any = [str(x) for x in arr.reshape(-1)]  # str() is the shortest exact repr
    else:
        # The hook sees the objects of object arrays but, as for fixed-width "U" arrays, not
        # the items of variable-width string arrays.
        item_hook = None if kind == "T" else hook
        try:
            items = _canon_seq(arr.reshape(-1).tolist(), item_hook, depth)
        except _UnhashableError as err:
            if err.segments:  # else the array itself is nested too deeply
                err.segments[-1] = f".flat{err.segments[-1]}"
            raise
    return {_T_NDARRAY_ITEMS: [_dtype_key(dtype), shape, items]}


def _canon_ndarray_subclass(arr: Any, np: Any, hook: NormalizeStr | None, depth: int) -> Any:
    base = _canon_ndarray(np.asarray(arr), hook, depth)
    if isinstance(arr, np.memmap):
        return base  # a memory-mapped array is just its values
    cls = type(arr)
    mask = None
    if isinstance(arr, np.ma.MaskedArray):
        mask = _canon_ndarray(np.ma.getmaskarray(arr), hook, depth)
    return {_T_NDARRAY_SUB: [f"{cls.__module__}:{cls.__qualname__}", base, mask]}


# --------------------------------------------------------------------------------------------------
# datetime, date, time, timedelta (exact types)
# --------------------------------------------------------------------------------------------------


def _tz_key(tz: Any) -> Any:
    # Which time zone, by name: Europe/Paris (zoneinfo), a fixed offset (timezone) and a naive
    # value (None) differ even where their offsets agree.
    if tz is None:
        return None
    if type(tz) is datetime.timezone:
        return ["timezone", tz.tzname(None)]
    cls = type(tz)
    key = getattr(tz, "key", None) if cls.__module__ == "zoneinfo" else None
    name = key if isinstance(key, str) else str(tz)  # pytz, dateutil: their str names the zone
    return [f"{cls.__module__}:{cls.__qualname__}", name]


def _offset(delta: datetime.timedelta | None) -> int | None:
    return None if delta is None else delta // datetime.timedelta(microseconds=1)


def _canon_datetime(obj: datetime.datetime) -> dict[str, Any]:
    # The wall time, its UTC offset and the zone: the same instant in the same zone is one value
    # (fold only matters where it changes the offset, which is then part of the node).
    try:
        offset = _offset(obj.utcoffset())
        zone = _tz_key(obj.tzinfo)
    except Exception as err:
        raise _UnhashableError(f"datetime with an unusable tzinfo {obj.tzinfo!r}: {err}") from err
    wall = obj.replace(tzinfo=None, fold=0).isoformat()
    return {_T_DATETIME: [wall, offset, zone]}


def _canon_time(obj: datetime.time) -> dict[str, Any]:
    try:
        offset = _offset(obj.utcoffset())
        zone = _tz_key(obj.tzinfo)
    except Exception as err:
        raise _UnhashableError(f"time with an unusable tzinfo {obj.tzinfo!r}: {err}") from err
    return {_T_TIME: [obj.replace(tzinfo=None, fold=0).isoformat(), offset, zone]}


_TIME_TYPES: dict[type, Callable[[Any], Any]] = {
    datetime.datetime: _canon_datetime,
    datetime.date: lambda obj: {_T_DATE: obj.isoformat()},
    datetime.time: _canon_time,
    datetime.timedelta: lambda obj: {_T_TIMEDELTA: [obj.days, obj.seconds, obj.microseconds]},
}


def _as_monty_decodes(obj: datetime.datetime) -> datetime.datetime:
    """The datetime monty's decoder makes of monty's dict of ``obj`` (a fixed-offset zone)."""
    back = _decode_datetime_dict({"@module": "datetime", "@class": "datetime", "string": str(obj)})
    return obj if back is None else back


def _decode_datetime_dict(d: Mapping[Any, Any]) -> datetime.datetime | None:
    """The datetime of monty's ``{"@module": "datetime", "@class": "datetime"}`` dict, or None.

    As monty's decoder reads it (``fromisoformat``; its legacy fallback is not followed): a
    datetime and its monty dict are one value, the dict's zone being a fixed offset.
    """
    if set(d).difference(("@version",)) != {"@module", "@class", "string"}:
        return None
    text = d["string"]
    if not isinstance(text, str):
        return None
    try:
        return datetime.datetime.fromisoformat(text)
    except ValueError:
        return None


def _decode_numpy_dict(d: Mapping[Any, Any]) -> Any:
    """Return the array of monty's ``{"@module": "numpy", "@class": "array"}`` dict, or None."""
    if set(d).difference(("@version",)) != {"@module", "@class", "dtype", "data"}:
        return None
    dtype, data = d["dtype"], d["data"]
    if not isinstance(dtype, str):
        return None
    np = sys.modules.get("numpy") or importlib.import_module("numpy")
    try:
        with np.errstate(all="ignore"):
            if dtype.startswith("complex"):  # exactly as monty's NumpyHandler.decode
                array = np.array(
                    [np.array(r) + np.array(i) * 1j for r, i in zip(*data, strict=True)],
                    dtype=dtype,
                )
            else:
                array = np.array(data, dtype=dtype)
    except Exception:  # not a valid array form: it stays a plain dict
        return None
    return None if array.dtype.hasobject else array


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _reject(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__qualname__} is not part of a canonical tree")


def _join_path(prefix: str, segments: list[str]) -> str:
    parts = segments[::-1]
    if len(parts) > _MAX_PATH_SEGMENTS:
        parts = [*parts[:_MAX_PATH_SEGMENTS], "..."]
    rest = "".join(parts)
    if not prefix and rest.startswith("."):
        return rest[1:]
    return prefix + rest


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_EMPTY = inspect.Parameter.empty


def _bind(
    signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    # Signature.bind + apply_defaults, without their cost (~10 us a call) in the common case:
    # any call this loop does not bind cleanly goes to Signature.bind, which raises the TypeError.
    result: dict[str, Any] = {}
    consumed = 0  # kwargs bound to named parameters
    var_keyword = None
    n_args = len(args)
    i = 0
    for param in signature.parameters.values():
        name, kind = param.name, param.kind
        if kind in _POSITIONAL:
            from_keyword = kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and name in kwargs
            if i < n_args:
                if from_keyword:
                    break  # multiple values
                result[name] = args[i]
                i += 1
                continue
            if from_keyword:
                result[name] = kwargs[name]
                consumed += 1
            elif param.default is not _EMPTY:
                result[name] = param.default
            else:
                break  # missing
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            result[name] = list(args[i:])
            i = n_args
        elif kind is inspect.Parameter.KEYWORD_ONLY:
            if name in kwargs:
                result[name] = kwargs[name]
                consumed += 1
            elif param.default is not _EMPTY:
                result[name] = param.default
            else:
                break  # missing
        else:
            var_keyword = name
            result[name] = {}  # filled below, keeps its place in signature order
    else:
        if i == n_args:
            if consumed == len(kwargs):
                return result
            if var_keyword is not None:
                params = signature.parameters
                extra = {key: value for key, value in kwargs.items() if key not in params}
                if consumed + len(extra) == len(kwargs):
                    result[var_keyword] = extra
                    return result
                # else a keyword named like a positional-only or var parameter: rare, slow
    return _slow_bind(signature, args, kwargs)


def _slow_bind(
    signature: inspect.Signature, args: Sequence[Any], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    result: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            value = list(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            value = dict(value)
        result[name] = value
    return result


@functools.lru_cache(maxsize=4096)
def _cached_signature(func: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(func)


def _signature(func: Callable[..., Any]) -> inspect.Signature:
    try:
        return _cached_signature(func)
    except TypeError:  # an unhashable callable object: no caching
        return inspect.signature(func)
