"""Canonical encoding and digests: golden values, stability, injectivity, argument binding."""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import functools
import io
import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import threading
import uuid
import zoneinfo
from typing import Any, NamedTuple

import numpy as np
import orjson
import pydantic
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from monty.json import MontyDecoder, MontyEncoder, MSONable, jsanitize
from pymatgen.core import Lattice, Structure

from jobflow_cache.errors import UnhashableInputError
from jobflow_cache.hashing.canonical import (
    MAX_DEPTH,
    SCHEME,
    CallDigest,
    bind_arguments,
    canonicalize,
    digest_bytes,
    digest_call,
    digest_value,
    encode,
    function_path,
)

# -- module-level types (importable by path, so MontyDecoder can rebuild them) -------------------


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


class Mode(str, enum.Enum):
    FAST = "fast"


class Level(enum.IntEnum):
    ONE = 1


@dataclasses.dataclass
class Settings:
    cutoff: float
    tags: tuple[str, ...] = ()


class Params(pydantic.BaseModel):
    cutoff: float
    kpoints: list[int] = [1, 1, 1]


class Box(MSONable):
    def __init__(self, size: Any, label: str = "box", extra: Any = None) -> None:
        self.size = size
        self.label = label
        self.extra = extra


@dataclasses.dataclass
class AddMaker:
    offset: int = 0

    def make(self, x: int, y: int = 1) -> int:
        return x + y + self.offset


class Unhashable:
    """A callable whose instances cannot be dict keys (no __hash__)."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unhashable)

    def __call__(self, a: int, b: int = 2) -> int:
        return a + b


Pair = collections.namedtuple("Pair", "x y")


def relax(structure: Any, steps: int = 10, *extra: Any, fmax: float = 0.01, **opts: Any) -> None:
    """A module-level job function."""


def optimizer(x: float) -> float:
    return x


def nacl(a: float = 5.64) -> Structure:
    return Structure(Lattice.cubic(a), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def roundtrip(value: Any) -> Any:
    """What a remote worker gets: monty JSON out and back."""
    return json.loads(json.dumps(value, cls=MontyEncoder), cls=MontyDecoder)


def as_plain_json(value: Any) -> Any:
    """The serialised form without decoding (plain dicts with @module/@class)."""
    return json.loads(json.dumps(value, cls=MontyEncoder))


# -- golden digests ----------------------------------------------------------------------------
# Classes whose digest is pinned get a fixed __module__, so the pins do not depend on how pytest
# imports this file.


class GoldenColor(enum.Enum):
    RED = 1


@dataclasses.dataclass
class GoldenSettings:
    cutoff: float
    tags: tuple[str, ...] = ()


class GoldenParams(pydantic.BaseModel):
    cutoff: float
    kpoints: list[int] = [1, 1, 1]


GoldenPair = collections.namedtuple("GoldenPair", "x y")

for _cls in (GoldenColor, GoldenSettings, GoldenParams, GoldenPair):
    _cls.__module__ = "golden"
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
PLUS_ONE = datetime.timezone(datetime.timedelta(hours=1))


def _golden_call() -> str:
    return digest_call(
        "pkg.mod:relax", {"structure": nacl(), "steps": 10, "fmax": 0.01}, cache_version="1"
    ).digest


# CHANGING ANY OF THESE DIGESTS IS A SCHEME CHANGE: every existing cache entry would silently
# miss. If a change is intended, bump SCHEME in jobflow_cache/hashing.py and re-pin them all.
# (The Structure pin also depends on pymatgen's as_dict format.)
GOLDEN: list[tuple[str, Any, str]] = [
    ("none", lambda: None, "dc32537e27486e2c652e7b35ccc22eda"),
    ("true", lambda: True, "f41296b9e2d38ac855a9a1372b7155c1"),
    ("int", lambda: 1, "df3ce784d856334d65cd25028f98f158"),
    ("float", lambda: 1.0, "2630a41b503a9f4bed84d7031aa12bce"),
    ("negative_zero", lambda: -0.0, "913bd907887eb28e57d7ca0a5d84ccb0"),
    ("nan", lambda: math.nan, "e615c8cce01895c542a4150c6c03e2b7"),
    ("negative_inf", lambda: -math.inf, "b28df6fd97c2331be0725826ac3eb429"),
    ("big_int", lambda: 2**100 + 7, "e654b73977b6c62a64e8cb0a403592c4"),
    ("unicode", lambda: "héllo wörld", "06a327e48335496dbd54c6023cdbe887"),
    ("bytes", lambda: b"\x00\xffab", "16fb169cd7cdd1c1285af304d313c2b6"),
    ("tuple", lambda: (1, "a", None), "105c5ba88ee346e53babfb2e2cdf58f7"),
    ("set", lambda: {3, 1, "b", 2.5}, "0bf65f670bacbad5423c4719604856fb"),
    (
        "nested_dict",
        lambda: {"b": [1, 2.5, {"c": None}], "a": {"x": True, "\x00tag": "y"}},
        "5b565b356cd95754cdc54f53d529b602",
    ),
    ("int_keys", lambda: {1: "a", (2, 3): "b", "1": "c"}, "fbcbdb1c5a9fd2d69b1ded631b52bfff"),
    (
        "ndarray_float64",
        lambda: np.arange(6, dtype=np.float64).reshape(2, 3),
        "56ee41b7240eb413db3120044c27d95b",
    ),
    (
        "ndarray_int32",
        lambda: np.array([1, 2, 3], dtype=np.int32),
        "43e639d9a88a37b57ace8c970f322363",
    ),
    ("structure", nacl, "981b8df8fa66ef550b297ba82a50cdea"),
    ("enum", lambda: GoldenColor.RED, "05fc380d2c7783cd5a16f508d1567973"),
    ("path", lambda: pathlib.Path("runs/relax"), "c59590e1e53bcd860ee814801ca8758d"),
    (
        "datetime",
        lambda: datetime.datetime(2024, 1, 2, 3, 4, 5, 678901),
        "61311f28deb7905497e17709db56f8af",
    ),
    ("uuid", lambda: uuid.UUID(int=42), "59624d657fc86b4cb4425a35c40b557c"),
    (
        "dataclass",
        lambda: GoldenSettings(cutoff=520.0, tags=("a",)),
        "14afb114955156982eb4ab6ac249c765",
    ),
    ("pydantic", lambda: GoldenParams(cutoff=1e-5), "908497c6f67a34d7662bf2cf249852ea"),
    ("function", lambda: json.dumps, "e877ad5265cf7d266f4b0874b8eeb623"),
    # new in jfc2
    ("list", lambda: [1, "a", None], "40d23554ec04006f75d6e6ab272e4679"),
    ("frozenset", lambda: frozenset({3, 1, "b", 2.5}), "74eb9a97db19c1e0af6b9569c0fc8fd7"),
    ("bytearray", lambda: bytearray(b"\x00\xffab"), "06991f4a3fdd8682826316f1930f7358"),
    ("namedtuple", lambda: GoldenPair(1, (2,)), "1678a7e73dbfb74379e34d973f5fe0d2"),
    ("float32", lambda: np.float32(0.1), "a1774af349fbf485cc51b4437db51833"),
    ("int64", lambda: np.int64(1), "6a7e40ca8a6af4e6d77ca806e4dbd4db"),
    ("bool_", lambda: np.bool_(True), "370d062c212948a27dfec68b5d55bc7b"),
    ("str_", lambda: np.str_("ab"), "80778589935816a3dc1098d8951f0e7c"),
    (
        "datetime_paris",
        lambda: datetime.datetime(2024, 1, 2, 3, tzinfo=PARIS),
        "a1eef383fb3bb0f1b6f10f8b05da479b",
    ),
    (
        "datetime_offset",
        lambda: datetime.datetime(2024, 1, 2, 3, tzinfo=PLUS_ONE),
        "c9081d263e62cde73432d6f09650240a",
    ),
    ("date", lambda: datetime.date(2024, 1, 2), "ae0249324e2215777ed064170f4d59ec"),
    (
        "timedelta",
        lambda: datetime.timedelta(days=1, seconds=2, microseconds=3),
        "5ee4c49ceffeb0dcc60509dc2ccdfc34",
    ),
    (
        "dataclass_with_numpy",
        lambda: GoldenSettings(np.float32(1.5), (1, 2)),
        "7a759c866e6babc118d57cab1fc7d6af",
    ),
]


@pytest.mark.skipif(sys.platform == "win32", reason="pinned Path digest uses '/' separators")
@pytest.mark.parametrize(("name", "make", "expected"), GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_digests(name: str, make: Any, expected: str) -> None:
    assert digest_value(make()) == expected


def test_golden_call_digest() -> None:
    assert SCHEME == "jfc2"
    assert _golden_call() == "48a5b2880ce278cccfd756ed58d35e4a"


def test_golden_encoding_shows_the_tag_format() -> None:
    value = {"s": {2, 1}, 1: b"a", "f": [math.nan, -0.0, 2**64], "\x00k": (1,)}
    # a non-str key makes the dict a pair list (keys are canonical values, so not escaped here)
    assert encode(canonicalize(value)) == (
        b'{"\\u0000dict":[["\\u0000k",{"\\u0000tuple":[1]}],'
        b'["f",[{"\\u0000float":"nan"},-0.0,{"\\u0000int":"0x10000000000000000"}]],'
        b'["s",{"\\u0000set":[1,2]}],[1,{"\\u0000bytes":"61"}]]}'
    )


# -- stability across processes ----------------------------------------------------------------

VALUE_CODE = """
import datetime, enum, pathlib, zoneinfo
import numpy as np
value = {
    "set": {f"s{i}" for i in range(64)},
    "frozen": frozenset(range(40)) | frozenset(f"k{i}" for i in range(40)),
    "dict": {f"key{i}": [i, str(i)] for i in range(300)},
    "int_keys": {i: f"v{i}" for i in range(50)} | {f"{i}": i for i in range(50)},
    "nested": [{"a": {"x", "y", "z"}}, ("t", 1.5, -0.0, float("nan"))],
    "path": pathlib.Path("runs/relax"),
    "when": datetime.datetime(2020, 1, 1),
    "array": np.arange(10.0),
    "jfc2": [(1, (2.5,)), frozenset({"a", 3}), {frozenset({1}), (2,)}, np.float32(0.1),
             np.int64(7), np.bool_(True), bytearray(b"x"), datetime.date(2020, 1, 2),
             datetime.datetime(2020, 6, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))],
}
"""


def _digest_in_subprocess(seed: str) -> str:
    code = (
        VALUE_CODE
        + "from jobflow_cache.hashing.canonical import digest_value\nprint(digest_value(value))"
    )
    env = dict(os.environ, PYTHONHASHSEED=seed)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_digest_stable_across_processes_and_hash_seeds() -> None:
    namespace: dict[str, Any] = {}
    exec(VALUE_CODE, namespace)
    expected = digest_value(namespace["value"])
    seen = {seed: _digest_in_subprocess(seed) for seed in ("0", "1", "12345")}
    assert seen == dict.fromkeys(seen, expected)


# -- encoding rules ----------------------------------------------------------------------------


def test_bool_int_float_are_distinct() -> None:
    assert len({digest_value(v) for v in (True, 1, 1.0, "1", None, 0, False, 0.0)}) == 8


def test_negative_zero_is_kept_and_all_nans_are_one() -> None:
    assert digest_value(-0.0) != digest_value(0.0)
    negative_nan = -math.nan
    payload_nan = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000123))[0]
    assert math.isnan(payload_nan)
    nans = {digest_value(x) for x in (math.nan, float("nan"), negative_nan, payload_nan, np.nan)}
    assert len(nans) == 1
    special = {digest_value(x) for x in (math.nan, math.inf, -math.inf, None, "nan", "inf")}
    assert len(special) == 6


def test_nonfinite_floats_never_encode_to_null() -> None:
    for value in (math.nan, math.inf, -math.inf, [1.0] * 20 + [math.nan]):
        assert b"null" not in encode(canonicalize(value))


def test_big_ints() -> None:
    assert canonicalize(2**63 - 1) == 2**63 - 1
    assert digest_value(2**63) != digest_value(2**63 + 1)
    assert digest_value(-(2**64)) != digest_value(2**64)
    assert digest_value(2**64) != digest_value(str(2**64))
    huge = 10**5000  # beyond the int -> decimal str conversion limit
    assert digest_value(huge) != digest_value(huge + 1)
    assert digest_value([2**70] * 20) == digest_value([2**70] * 20)


def test_list_tuple_namedtuple_set_frozenset_all_differ() -> None:
    assert digest_value([1, 2]) != digest_value((1, 2))
    assert digest_value((0, 1)) != digest_value([0, 1])  # numpy indexing tells them apart
    assert digest_value({"a": (1, (2,))}) != digest_value({"a": (1, [2])})
    assert digest_value({"a": (1, (2,))}) == digest_value({"a": (1, (2,))})
    assert digest_value(()) != digest_value([])
    assert digest_value({1, 2}) != digest_value([1, 2])
    assert digest_value({1, 2}) != digest_value(frozenset({2, 1}))  # == says equal, type not
    assert digest_value(frozenset({1, 2})) == digest_value(frozenset({2, 1}))
    assert digest_value(Pair(1, 2)) != digest_value((1, 2))
    assert digest_value(Pair(1, 2)) != digest_value([1, 2])
    assert digest_value(Pair(1, 2)) == digest_value(Pair(x=1, y=2))

    class Local(NamedTuple):
        x: int

    with pytest.raises(UnhashableInputError, match="inside a function"):
        digest_value(Local(1))  # defined here: it cannot be named, so not told apart
    # tuples in an object's JSON form are what JSON holds: lists (see "Deliberate equivalences")
    assert digest_value(Settings(1.0, ("a",))) == digest_value(Settings(1.0, ["a"]))  # type: ignore[arg-type]
    assert digest_value(Box((1, 2))) == digest_value(Box([1, 2]))
    # but a tuple argument is not the list a worker's JSON makes of it: a miss, never a false hit
    assert digest_value(roundtrip((1, 2))) != digest_value((1, 2))


def test_str_bytes_and_bytearray_differ() -> None:
    assert digest_value("ab") != digest_value(b"ab")
    assert digest_value(b"ab") != digest_value(bytearray(b"ab"))
    assert digest_value(bytearray(b"ab")) == digest_value(bytearray(b"ab"))
    assert digest_value(b"ab".hex()) != digest_value(b"ab")


def test_non_str_keys_never_collide_with_str_keys() -> None:
    assert digest_value({1: "a"}) != digest_value({"1": "a"})
    assert digest_value({True: "a"}) != digest_value({1: "a"})
    assert digest_value({1.0: "a"}) != digest_value({1: "a"})
    assert digest_value({None: "a"}) != digest_value({"null": "a"})
    assert digest_value({(1, 2): "a"}) != digest_value({"[1,2]": "a"})
    assert digest_value({1: "a", "1": "b"}) == digest_value({"1": "b", 1: "a"})


def test_user_dicts_cannot_forge_tags() -> None:
    assert digest_value({"\x00set": [1]}) != digest_value({1})
    assert digest_value({"\x00float": "nan"}) != digest_value(math.nan)
    assert digest_value({"\x00dict": [[1, "a"]]}) != digest_value({1: "a"})
    assert digest_value({"\x00bytes": "6162"}) != digest_value(b"ab")
    assert digest_value({"\x00set": 1}) != digest_value({"\x00\x00set": 1})
    assert canonicalize({"\x00set": 1}) == {"\x00\x00set": 1}


def test_lone_surrogates_are_hashable_and_distinct() -> None:
    assert digest_value("\ud800") != digest_value("\ud801")
    assert digest_value({"\udc80": 1}) != digest_value({"\udc81": 1})
    assert digest_value("\ud800") != digest_value("\\ud800")


def test_version_is_dropped_only_from_monty_dicts() -> None:
    mson = {"@module": "m", "@class": "C", "x": 1}
    assert digest_value({**mson, "@version": "1.0"}) == digest_value({**mson, "@version": "2.0"})
    assert digest_value({"x": 1, "@version": "1.0"}) != digest_value({"x": 1, "@version": "2.0"})


def test_datetimes_keep_their_zone() -> None:
    paris = datetime.datetime(2024, 1, 1, 12, tzinfo=PARIS)
    fixed = datetime.datetime(2024, 1, 1, 12, tzinfo=PLUS_ONE)
    naive = datetime.datetime(2024, 1, 1, 12)
    utc = datetime.datetime(2024, 1, 1, 11, tzinfo=datetime.timezone.utc)
    assert paris == fixed == utc  # one instant: Python's == says equal, the zones differ
    assert len({digest_value(v) for v in (paris, fixed, naive, utc)}) == 4
    # the same instant in the same zone is one value, however it was made
    assert digest_value(utc.astimezone(PARIS)) == digest_value(paris)
    assert digest_value(fixed.astimezone(PLUS_ONE)) == digest_value(fixed)
    assert digest_value(
        datetime.datetime(2024, 1, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    ) == digest_value(paris)
    assert digest_value(paris + datetime.timedelta(hours=1)) != digest_value(paris)
    # ambiguous wall time at the end of summer time: fold picks the instant, which is kept
    first = datetime.datetime(2024, 10, 27, 2, 30, tzinfo=PARIS)
    assert digest_value(first) != digest_value(first.replace(fold=1))
    # a named fixed offset is another zone name
    cet = datetime.timezone(datetime.timedelta(hours=1), "CET")
    assert digest_value(naive.replace(tzinfo=cet)) != digest_value(fixed)
    assert digest_value(datetime.date(2024, 1, 1)) != digest_value(datetime.datetime(2024, 1, 1))
    assert digest_value(datetime.timedelta(1)) != digest_value(datetime.timedelta(0, 1))
    assert digest_value(datetime.time(1, tzinfo=PLUS_ONE)) != digest_value(datetime.time(1))
    # monty's dict of a datetime is what monty's decoder makes of it: the fixed offset
    assert digest_value(as_plain_json(paris)) == digest_value(fixed)
    assert digest_value(roundtrip(paris)) == digest_value(fixed)
    assert (
        digest_value(as_plain_json(naive)) == digest_value(roundtrip(naive)) == digest_value(naive)
    )
    # in an object's JSON form a datetime's zone is the fixed offset JSON keeps
    assert (
        digest_value(Box(paris)) == digest_value(Box(fixed)) == digest_value(roundtrip(Box(paris)))
    )
    assert digest_value(Box(paris)) != digest_value(Box(naive))


def test_subclasses_of_json_types() -> None:
    assert digest_value(collections.OrderedDict(a=1)) == digest_value({"a": 1})
    assert digest_value(collections.defaultdict(list, a=[1])) == digest_value({"a": [1]})
    # enum members are type-strict, even str/int mixins
    assert digest_value(Mode.FAST) != digest_value("fast")
    assert digest_value(Level.ONE) != digest_value(1)
    assert digest_value(Color.RED) != digest_value(Color.GREEN)


def test_complex() -> None:
    assert digest_value(1 + 2j) != digest_value(2 + 1j)
    assert digest_value(1 + 0j) != digest_value(1.0)
    assert digest_value(np.complex128(1 + 2j)) != digest_value(1 + 2j)
    assert digest_value(np.complex64(1 + 2j)) != digest_value(np.complex128(1 + 2j))


# -- numpy -------------------------------------------------------------------------------------


def test_numpy_scalars_keep_their_dtype() -> None:
    x = 0.1
    ones = [np.float32(x), np.float64(x), x, np.float16(x), np.int64(1), np.int32(1), 1]
    ones += [np.uint8(1), np.bool_(True), True, np.str_("a"), "a", np.bytes_(b"a"), b"a"]
    assert len({digest_value(v) for v in ones}) == len(ones)
    assert digest_value(np.float64(1.5)) == digest_value(np.float64(1.5))
    assert digest_value(np.float32(0.1)) != digest_value(np.float32(0.2))
    assert digest_value(np.uint64(2**64 - 1)) != digest_value(np.uint64(2**64 - 2))
    assert digest_value({np.str_("a"): 1}) != digest_value({"a": 1})
    assert digest_value(np.float64("nan")) == digest_value(-np.float64("nan"))
    assert digest_value(np.float64("nan")) != digest_value(math.nan)
    assert digest_value(np.float64(-0.0)) != digest_value(np.float64(0.0))
    assert digest_value(np.bytes_(b"a\x00")) != digest_value(np.bytes_(b"a"))
    # in an object's JSON form a numpy scalar is the Python scalar monty writes
    assert digest_value(Box(np.float32(0.5))) == digest_value(Box(0.5))
    assert digest_value(as_plain_json(Box(np.int64(2)))) == digest_value(Box(np.int64(2)))
    assert digest_value(np.longdouble(1) / 3) != digest_value(np.longdouble(1) / 7)
    day = np.datetime64("2020-01-01")
    assert digest_value(day) != digest_value(day + 1)


def test_numpy_arrays() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert digest_value(a) == digest_value(a.copy())
    assert digest_value(a) != digest_value(a.astype(np.float32))
    assert digest_value(a) != digest_value(a.reshape(3, 2))
    assert digest_value(a) != digest_value(a.tolist())
    assert digest_value(np.arange(3, dtype=np.int32)) != digest_value(np.arange(3, dtype=np.int64))
    # memory layout and byte order are not values
    assert digest_value(np.asfortranarray(a)) == digest_value(a)
    assert digest_value(a.T) == digest_value(np.ascontiguousarray(a.T))
    assert digest_value(a.astype(">f8")) == digest_value(a)
    # NaN bit patterns are not values; the sign of zero is
    assert digest_value(np.array([np.nan, -np.nan])) == digest_value(np.array([np.nan, np.nan]))
    assert digest_value(np.array([0.0])) != digest_value(np.array([-0.0]))
    changed = a.copy()
    changed[1, 2] = np.nextafter(changed[1, 2], 10)
    assert digest_value(changed) != digest_value(a)


def test_numpy_arrays_without_a_value_buffer() -> None:
    objects = np.array([1, "a", None], dtype=object)
    assert digest_value(objects) == digest_value(np.array([1, "a", None], dtype=object))
    assert digest_value(objects) != digest_value(np.array([1, "b", None], dtype=object))
    record = np.dtype([("a", "<i4"), ("b", "<f8")])
    rows = np.array([(1, 2.0)], dtype=record)
    assert digest_value(rows) != digest_value(np.array([(1, 3.0)], dtype=record))
    other_names = np.dtype([("c", "<i4"), ("d", "<f8")])
    assert digest_value(rows) != digest_value(rows.astype(other_names))
    masked = np.ma.array([1, 2], mask=[0, 1])
    assert digest_value(masked) != digest_value(np.array([1, 2]))
    assert digest_value(masked) != digest_value(np.ma.array([1, 2], mask=[1, 0]))
    with pytest.raises(UnhashableInputError) as err:
        canonicalize(np.array([threading.Lock()], dtype=object), path="arr")
    assert err.value.path == "arr.flat[0]"


def _arrays(dtype: str) -> st.SearchStrategy[np.ndarray]:
    # monty's decoder computes re + im * 1j, which turns a non-finite imaginary part into NaN and
    # a -0.0 real part into 0.0: it changes those values, so their digests rightly change too.
    finite = st.complex_numbers(allow_nan=False, allow_infinity=False, max_magnitude=1e300)
    elements = (
        finite.map(lambda z: complex(z.real + 0.0, z.imag + 0.0)) if dtype == "<c16" else None
    )
    shape = hnp.array_shapes(max_dims=2, min_side=1, max_side=4)
    return hnp.arrays(dtype=dtype, shape=shape, elements=elements)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["<f8", "<f4", "<i4", "<i8", "|b1", "<c16", "<U3"]).flatmap(_arrays))
def test_numpy_array_survives_monty_round_trip(array: np.ndarray) -> None:
    expected = digest_value(array)
    assert digest_value(roundtrip(array)) == expected
    assert digest_value(as_plain_json(array)) == expected


# -- objects -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        nacl(),
        nacl().lattice,
        Color.GREEN,
        Settings(cutoff=1.5, tags=("a", "b")),
        Params(cutoff=0.5),
        pathlib.Path("runs/a"),
        datetime.datetime(2021, 5, 6, 7, 8, 9, 10),
        uuid.UUID(int=7),
        Box(size=[1, 2], extra={"t": (1, 2), "s": Color.RED}),
        AddMaker(offset=3),
        optimizer,
        AddMaker(offset=2).make,
        Structure,
        {"nested": [nacl(), np.arange(3.0)]},
    ],
    ids=lambda value: type(value).__name__,
)
def test_objects_survive_monty_round_trip(value: Any) -> None:
    expected = digest_value(value)
    assert digest_value(roundtrip(value)) == expected
    assert digest_value(as_plain_json(value)) == expected


def test_objects_are_distinguished_by_content_and_class() -> None:
    assert digest_value(nacl(5.64)) != digest_value(nacl(5.65))
    assert digest_value(Settings(1.0)) != digest_value(Settings(2.0))
    assert digest_value(Params(cutoff=1.0)) != digest_value(Params(cutoff=2.0))
    assert digest_value(Box(1)) != digest_value(Box(1, label="other"))
    assert digest_value(pathlib.Path("a")) != digest_value("a")
    assert digest_value(uuid.UUID(int=7)) != digest_value(str(uuid.UUID(int=7)))
    assert digest_value(AddMaker(1).make) != digest_value(AddMaker(2).make)
    assert digest_value(AddMaker(1).make) != digest_value(AddMaker.make)


def test_callables_and_classes() -> None:
    assert canonicalize(optimizer) == {
        "@module": __name__,
        "@callable": "optimizer",
        "@bound": None,
    }
    assert digest_value(optimizer) != digest_value(relax)
    assert digest_value(Structure) != digest_value(Lattice)
    assert digest_value(len) != digest_value(sum)
    assert digest_value("abc".upper) != digest_value("xyz".upper)
    partial = functools.partial(relax, steps=3)
    assert digest_value(partial) != digest_value(functools.partial(relax, steps=4))
    assert digest_value(partial) != digest_value(relax)


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(2.5, 8.0),
    coords=st.lists(st.tuples(*[st.floats(0, 1, exclude_max=True)] * 3), min_size=1, max_size=4),
    species=st.sampled_from(["Na", "Cl", "Fe", "O"]),
)
def test_structures_survive_monty_round_trip(a: float, coords: list, species: str) -> None:
    structure = Structure(Lattice.cubic(a), [species] * len(coords), coords)
    expected = digest_value(structure)
    assert digest_value(roundtrip(structure)) == expected
    assert digest_value(as_plain_json(structure)) == expected
    assert digest_value(Structure.from_dict(structure.as_dict())) == expected


# -- hypothesis: injectivity and invariances ---------------------------------------------------

SPECIAL_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, math.inf, -math.inf, 1e300, 5e-324]
hashable_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.integers(),
    st.integers(2**62, 2**66),
    st.sampled_from(SPECIAL_FLOATS),
    st.floats(allow_nan=False),
    st.text(alphabet="ab\x00@é1", max_size=3),
    st.binary(max_size=2),
)
numpy_leaves = st.one_of(
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
    st.floats(width=16).map(np.float16),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(-3, 3).map(np.int32),
    st.integers(0, 255).map(np.uint8),
    st.booleans().map(np.bool_),
    st.text(alphabet="ab", max_size=2).map(np.str_),
)
ZONES = [None, PARIS, PLUS_ONE, datetime.timezone.utc, zoneinfo.ZoneInfo("America/New_York")]
time_leaves = st.one_of(
    st.datetimes(
        min_value=datetime.datetime(2024, 3, 30),
        max_value=datetime.datetime(2024, 4, 1),
        timezones=st.sampled_from(ZONES),
        allow_imaginary=False,
    ),
    st.sampled_from(
        [datetime.datetime(2024, 10, 27, 2, 30, fold=f, tzinfo=PARIS) for f in (0, 1)]
        + [datetime.date(2024, 3, 31), datetime.timedelta(1), datetime.timedelta(0, 86400)]
    ),
)
hashable_leaves = st.one_of(hashable_leaves, numpy_leaves.filter(lambda x: x == x), time_leaves)
leaves = st.one_of(hashable_leaves, st.just(math.nan), st.floats(), numpy_leaves)
hashables = st.recursive(
    hashable_leaves,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=4,
)
values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner),
        st.tuples(inner, inner).map(lambda t: Pair(*t)),
        st.dictionaries(st.text(alphabet="ab\x00@", max_size=2), inner, max_size=3),
        st.dictionaries(hashables, inner, max_size=3),
        st.frozensets(hashables, max_size=3),
        st.sets(hashable_leaves, max_size=3),
    ),
    max_leaves=10,
)


def _zone(value: Any) -> Any:
    tz = value.tzinfo
    if tz is None:
        return None
    if isinstance(tz, zoneinfo.ZoneInfo):
        return ("zoneinfo", tz.key)
    return (type(tz), tz.tzname(None))


def same_value(a: Any, b: Any) -> bool:
    """The oracle of the jfc2 rule: ``==`` and the same type, recursively, where a float's sign
    of zero counts and all NaNs are one value; a datetime's zone (its name) and UTC offset
    count; dict and set order does not."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (float, np.floating)):
        if a != a or b != b:
            return a != a and b != b
        return bool(a == b) and np.signbit(a) == np.signbit(b)
    if isinstance(a, datetime.datetime):
        naive = a.replace(tzinfo=None, fold=0) == b.replace(tzinfo=None, fold=0)
        return naive and a.utcoffset() == b.utcoffset() and _zone(a) == _zone(b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):  # elements are pairwise distinct (no nan in sets)
        return len(a) == len(b) and all(any(same_value(x, y) for y in b) for x in a)
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            any(same_value(ka, kb) and same_value(va, b[kb]) for kb in b) for ka, va in a.items()
        )
    return bool(a == b)


def variant(value: Any, flip: bool) -> Any:
    """A value equal under same_value (dict and set order changed, containers rebuilt) or,
    with flip, a near-miss (a sign of zero, a bool for an int, a tuple for a list, a numpy
    scalar for its Python scalar, a zone for an offset, ... changed somewhere)."""
    if isinstance(value, np.generic):
        return value.item() if flip else value
    if isinstance(value, bool):
        return int(value) if flip else value
    if isinstance(value, int):
        return float(value) if flip and abs(value) < 2**53 else value
    if isinstance(value, float):
        if flip:
            return np.float64(value) if value != 0.0 else -value
        return value
    if isinstance(value, datetime.datetime):
        if flip:
            if value.tzinfo is None:
                return value.date()
            return value.replace(tzinfo=datetime.timezone(value.utcoffset()))
        return value.astimezone(value.tzinfo) if value.tzinfo is not None else value
    if type(value) is tuple:
        items = [variant(v, flip) for v in value]
        return items if flip else tuple(items)
    if isinstance(value, tuple):  # a namedtuple
        return tuple(value) if flip else type(value)(*(variant(v, flip) for v in value))
    if isinstance(value, list):
        items = [variant(v, flip) for v in value]
        return tuple(items) if flip else items
    if isinstance(value, (set, frozenset)):
        if flip:
            return set(value) if isinstance(value, frozenset) else frozenset(value)
        return type(value)(reversed(list(value)))
    if isinstance(value, bytes):
        return bytearray(value) if flip else value
    if isinstance(value, dict):
        return {k: variant(v, flip) for k, v in reversed(value.items())}
    return value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_digests_equal_exactly_when_values_are_the_same(data: st.DataObject) -> None:
    """digest(a) == digest(b) iff a == b and their types agree, recursively (see same_value)."""
    a = data.draw(values)
    how = data.draw(st.sampled_from(["independent", "same", "near"]))
    b = data.draw(values) if how == "independent" else variant(a, flip=how == "near")
    assert (digest_value(a) == digest_value(b)) == same_value(a, b), (a, b)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(values, min_size=2, max_size=6))
def test_digests_of_many_values_collide_only_when_the_same(group: list[Any]) -> None:
    digests = [digest_value(v) for v in group]
    for i, a in enumerate(group):
        for j in range(i + 1, len(group)):
            assert (digests[i] == digests[j]) == same_value(a, group[j]), (a, group[j])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(hashables, values), max_size=6, unique_by=lambda kv: kv[0]))
def test_dict_insertion_order_is_irrelevant(pairs: list[tuple[Any, Any]]) -> None:
    assert digest_value(dict(pairs)) == digest_value(dict(reversed(pairs)))
    str_pairs = [(repr(k), v) for k, v in pairs]
    assert digest_value(dict(str_pairs)) == digest_value(dict(reversed(str_pairs)))


json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=4),
    st.sampled_from(["\ud800", "\x00x", "@module"]),
)
plain_json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(plain_json_values)
def test_json_values_survive_monty_round_trip(value: Any) -> None:
    expected = digest_value(value)
    assert digest_value(roundtrip(value)) == expected
    assert digest_value(jsanitize(value, strict=True)) == expected


def _has_tuple(value: Any) -> bool:
    if isinstance(value, tuple):
        return True
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_has_tuple(v) for v in items)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_a_worker_run_hits_a_worker_run_and_never_falsely_a_local_one(value: Any) -> None:
    """A worker gets its arguments from JSON on every run: tuples come back as lists each time,
    so worker runs hit each other; against a local run (tuples kept) they miss, exactly where a
    tuple was."""
    worker = roundtrip(value)
    assert digest_value(roundtrip(worker)) == digest_value(worker)
    assert (digest_value(worker) == digest_value(value)) == (not _has_tuple(value))


@settings(max_examples=60, deadline=None)
@given(size=json_values, label=st.text(max_size=5), extra=json_values)
def test_msonable_objects_survive_monty_round_trip(size: Any, label: str, extra: Any) -> None:
    box = Box(size=size, label=label, extra=extra)
    expected = digest_value(box)
    assert digest_value(roundtrip(box)) == expected
    assert digest_value(as_plain_json(box)) == expected
    assert digest_value(Box(size=size, label=label + "!", extra=extra)) != expected


@settings(max_examples=100, deadline=None)
@given(values)
def test_canonical_tree_is_json_native_and_stable(value: Any) -> None:
    canon = canonicalize(value)
    encoded = encode(canon)
    assert orjson.loads(encoded) == json.loads(json.dumps(canon))  # plain JSON, no NaN
    assert encode(canonicalize(value)) == encoded


# -- cross product: no collisions among ~200 distinct small values -----------------------------


def cross_product_values() -> list[Any]:
    atoms: list[Any] = [
        None, True, False, 0, 1, -1, 2, 2**63 - 1, 2**63, -(2**63) - 1, 2**64,
        0.0, -0.0, 1.0, -1.0, 0.5, 1e16, math.nan, math.inf, -math.inf,
        "", "0", "1", "a", "null", "true", "nan", "\x00", "\x00set", "é",
        b"", b"a", b"0", 1 + 0j,
    ]  # fmt: skip
    hashable = [x for x in atoms if not (isinstance(x, float) and math.isnan(x))]
    out: list[Any] = list(atoms)
    out += [[x] for x in atoms]
    out += [{"k": x} for x in atoms]
    out += [{x: "v"} for x in hashable if not isinstance(x, str)]
    out += [{x} for x in hashable]
    out += [[x, x] for x in atoms[:20]]
    out += [
        [], {}, set(), [[]], [{}], [set()], {"": []}, {"": {}}, [[None]], [None, [None]],
        {"\x00set": []}, {"\x00\x00set": []}, {"a": None, "b": None}, {"a": {"b": None}},
        np.array([1, 2]), np.array([1, 2], dtype=np.int32), np.array([1.0, 2.0]),
        np.array([[1, 2]]), np.array([1, 2], dtype=np.uint8), np.array(1.0), np.array([]),
        np.array([1, 2], dtype=object), Color.RED, Color.GREEN, Mode.FAST, Level.ONE,
        pathlib.Path("a"), optimizer, relax, Box(1), Settings(1.0), Params(cutoff=1.0),
    ]  # fmt: skip
    # jfc2: values == one another (or == an item above) whose types differ
    noon = datetime.datetime(2024, 1, 1, 12)
    typed: list[Any] = [
        (), (1,), (1, 2), [1, 2], ((),), ([],), (None,), Pair(1, 2), Pair(2, 1),
        frozenset(), frozenset({1}), {frozenset({1})}, frozenset({frozenset({1})}),
        bytearray(), bytearray(b"a"), np.float32(1), np.float64(1), np.float16(1), np.int64(1),
        np.int32(1), np.uint8(1), np.bool_(True), np.bool_(False), np.float64(0.0),
        np.float64(-0.0), np.float32(math.nan), np.float64(math.nan), np.str_("a"),
        np.str_(""), np.bytes_(b"a"), np.complex128(1), np.datetime64(1, "D"),
        noon, noon.replace(tzinfo=PARIS), noon.replace(tzinfo=PLUS_ONE),
        noon.replace(tzinfo=datetime.timezone.utc), noon.date(), noon.time(),
        noon.replace(tzinfo=PLUS_ONE).timetz(), datetime.timedelta(0), datetime.timedelta(1),
        {"t": (1,)}, {"t": [1]}, {(1,): "v"}, {frozenset({1}): "v"}, {np.int64(1): "v"},
        {"\x00tuple": [1]}, {"\x00frozenset": [1]}, {"\x00npscalar": ["<i8", 1]},
        {"\x00datetime": ["2024-01-01T12:00:00", None, None]},
    ]  # fmt: skip
    return out + typed + [[x] for x in typed]


def test_cross_product_has_no_collisions() -> None:
    candidates = cross_product_values()
    assert len(candidates) >= 200
    digests = [digest_value(v) for v in candidates]
    collisions = {
        d: [repr(v) for v, e in zip(candidates, digests) if e == d]
        for d in digests
        if digests.count(d) > 1
    }
    assert not collisions


# -- bind_arguments ----------------------------------------------------------------------------


def test_bind_positional_keyword_and_default_are_one_call() -> None:
    expected = {"structure": "s", "steps": 10, "extra": [], "fmax": 0.01, "opts": {}}
    assert bind_arguments(relax, ("s",), {}) == expected
    assert bind_arguments(relax, ("s", 10), {}) == expected
    assert bind_arguments(relax, (), {"structure": "s", "steps": 10, "fmax": 0.01}) == expected
    assert list(bind_arguments(relax, (), {"fmax": 0.01, "structure": "s"})) == list(expected)


def test_bind_var_args_and_kwargs() -> None:
    bound = bind_arguments(relax, ("s", 3, "x", "y"), {"z": 1, "fmax": 0.1})
    assert bound == {
        "structure": "s",
        "steps": 3,
        "extra": ["x", "y"],
        "fmax": 0.1,
        "opts": {"z": 1},
    }
    assert type(bound["extra"]) is list
    assert type(bound["opts"]) is dict


def test_bind_ignore() -> None:
    assert bind_arguments(relax, ("s",), {"fmax": 1.0}, ignore=["fmax", "opts"]) == {
        "structure": "s",
        "steps": 10,
        "extra": [],
    }
    with pytest.raises(ValueError, match="not_a_param"):
        bind_arguments(relax, ("s",), {}, ignore=["not_a_param"])


def test_bind_rejects_a_bad_call() -> None:
    with pytest.raises(TypeError):
        bind_arguments(relax, (), {})
    with pytest.raises(TypeError):
        bind_arguments(optimizer, (1, 2), {})


def test_bind_bound_method_includes_the_instance() -> None:
    maker = AddMaker(offset=3)
    bound = bind_arguments(maker.make, (5,), {})
    assert bound == {"self": maker, "x": 5, "y": 1}
    assert bind_arguments(AddMaker.make, (maker, 5), {"y": 1}) == bound
    one = digest_call("m:AddMaker.make", bind_arguments(AddMaker(1).make, (5,), {}))
    two = digest_call("m:AddMaker.make", bind_arguments(AddMaker(2).make, (5,), {}))
    assert one.digest != two.digest
    assert one.arg_digests["x"] == two.arg_digests["x"]
    assert one.arg_digests["self"] != two.arg_digests["self"]


def test_bind_unhashable_callable_and_positional_only() -> None:
    assert bind_arguments(Unhashable(), (1,), {}) == {"a": 1, "b": 2}

    def pos_only(a: int, /, b: int = 0) -> None: ...

    assert bind_arguments(pos_only, (1,), {"b": 0}) == bind_arguments(pos_only, (1, 0), {})


# -- digest_call -------------------------------------------------------------------------------


def test_digest_call_fields() -> None:
    arguments = {"structure": nacl(), "steps": 10, "flags": {"a", "b"}}
    call = digest_call("pkg:relax", arguments, cache_version="2")
    assert isinstance(call, CallDigest)
    assert (call.scheme, call.function, call.cache_version) == (SCHEME, "pkg:relax", "2")
    assert len(call.digest) == 32
    assert int(call.digest, 16) >= 0
    assert call.arg_digests == {k: digest_value(v) for k, v in arguments.items()}
    assert call.canonical == {k: canonicalize(v) for k, v in arguments.items()}
    assert json.loads(json.dumps(call.canonical)) == call.canonical
    pairs = [[k, call.arg_digests[k]] for k in sorted(arguments)]
    assert call.digest == digest_bytes(encode(["call", SCHEME, "pkg:relax", "2", pairs]))
    reordered = dict(reversed(arguments.items()))
    assert digest_call("pkg:relax", reordered, cache_version="2").digest == call.digest


def test_digest_call_one_argument_changes_one_sub_digest() -> None:
    base = digest_call("pkg:relax", {"structure": nacl(), "steps": 10, "fmax": 0.01})
    changed = digest_call("pkg:relax", {"structure": nacl(), "steps": 11, "fmax": 0.01})
    assert changed.digest != base.digest
    different = {k for k in base.arg_digests if base.arg_digests[k] != changed.arg_digests[k]}
    assert different == {"steps"}


def test_digest_call_version_and_function_and_names_matter() -> None:
    arguments = {"x": 1}
    base = digest_call("pkg:f", arguments).digest
    assert digest_call("pkg:f", arguments, cache_version="1").digest != base
    assert digest_call("pkg:f", arguments, cache_version="1").digest != (
        digest_call("pkg:f", arguments, cache_version="2").digest
    )
    assert digest_call("pkg:g", arguments).digest != base
    assert digest_call("pkg:f", {"y": 1}).digest != base
    assert digest_call("pkg:f", {}).digest != base
    assert digest_call("pkg:f", arguments).digest == base


def test_digest_call_of_bound_arguments_is_call_style_independent() -> None:
    digests = {
        digest_call(function_path(relax), bind_arguments(relax, args, kwargs)).digest
        for args, kwargs in [(("s",), {}), (("s", 10), {}), ((), {"structure": "s", "steps": 10})]
    }
    assert len(digests) == 1


def test_function_path() -> None:
    assert function_path(relax) == f"{__name__}:relax"
    assert function_path(AddMaker.make) == f"{__name__}:AddMaker.make"
    assert function_path(Structure) == "pymatgen.core.structure:Structure"

    def local() -> None: ...

    # a local function has a path (its identity is its code, see test_dropin); as a value
    # passed to a job it stays unhashable
    assert function_path(local) == f"{__name__}:test_function_path.<locals>.local"
    with pytest.raises(UnhashableInputError, match="lambda or is defined inside"):
        canonicalize(local)


# -- normalize_str -----------------------------------------------------------------------------

UUID_A = "0b5e7f43-3b27-4d6f-9d7c-0f2f7e8f1a11"
UUID_B = "9a1c2d3e-4f50-4a6b-8c7d-112233445566"


def job_hook(value: str) -> tuple[str, Any] | None:
    return ("job", "abc") if value in (UUID_A, UUID_B) else None


def test_normalize_str_maps_uuids_to_one_token() -> None:
    a = {"ref": {"uuid": UUID_A, "attributes": [["a", "energy"]]}}
    b = {"ref": {"uuid": UUID_B, "attributes": [["a", "energy"]]}}
    assert digest_value(a, normalize_str=job_hook) == digest_value(b, normalize_str=job_hook)
    assert digest_value(a) != digest_value(b)
    assert digest_value(a, normalize_str=job_hook) != digest_value(a)
    # the token cannot be forged by plain data
    assert digest_value(UUID_A, normalize_str=job_hook) != digest_value(["job", "abc"])
    assert digest_value(UUID_A, normalize_str=job_hook) != digest_value(
        {"\x00hook": ["job", "abc"]}
    )
    # it reaches strings inside objects (a UUID's monty form holds its string)
    one = digest_value(uuid.UUID(UUID_A), normalize_str=job_hook)
    assert one == digest_value(uuid.UUID(UUID_B), normalize_str=job_hook)


def test_normalize_str_tags_and_payloads_matter_and_keys_are_untouched() -> None:
    def dir_hook(value: str) -> tuple[str, Any] | None:
        if value.startswith("/scratch/run1/"):
            return ("dir", ["d1", value.removeprefix("/scratch/run1/")])
        return None

    assert digest_value("/scratch/run1/CONTCAR", normalize_str=dir_hook) != digest_value(
        "/scratch/run1/POSCAR", normalize_str=dir_hook
    )
    assert canonicalize("/scratch/run1/CONTCAR", normalize_str=dir_hook) == {
        "\x00hook": ["dir", ["d1", "CONTCAR"]]
    }
    assert canonicalize({UUID_A: UUID_A}, normalize_str=job_hook) == {
        UUID_A: {"\x00hook": ["job", "abc"]}
    }
    with pytest.raises(UnhashableInputError, match="normalize_str"):
        canonicalize("x", normalize_str=lambda s: "not a pair")  # type: ignore[arg-type,return-value]


# -- unhashable inputs -------------------------------------------------------------------------


def test_open_file_names_the_argument(tmp_path: pathlib.Path) -> None:
    with open(tmp_path / "f.txt", "w") as handle:
        with pytest.raises(UnhashableInputError) as err:
            digest_call("pkg:f", {"x": 1, "handle": handle})
        assert err.value.path == "handle"
        with pytest.raises(UnhashableInputError) as err:
            digest_call("pkg:f", {"kwargs": {"handle": handle}})
        assert err.value.path == "kwargs.handle"
        assert "handle" in str(err.value)


def test_lambda_and_lock_name_where_they_are() -> None:
    with pytest.raises(UnhashableInputError) as err:
        digest_call("pkg:f", {"optimizer": lambda x: x})
    assert err.value.path == "optimizer"
    with pytest.raises(UnhashableInputError) as err:
        canonicalize({"locks": [1, threading.Lock()]}, path="opts")
    assert err.value.path == "opts.locks[1]"
    box = Box(1, extra={"sites": [1, 2, 3, threading.Lock()]})
    with pytest.raises(UnhashableInputError) as err:
        canonicalize(box, path="box")
    assert err.value.path == "box.extra.sites[3]"
    with pytest.raises(UnhashableInputError) as err:
        canonicalize({1: {"a": io.StringIO()}}, path="m")
    assert err.value.path == "m[1].a"


@pytest.mark.parametrize(
    "value",
    [(x for x in range(3)), object(), threading.Event(), sys, {"s": {threading.Lock()}}],
    ids=["generator", "object", "event", "module", "lock_in_set"],
)
def test_objects_without_a_json_form_are_unhashable(value: Any) -> None:
    with pytest.raises(UnhashableInputError):
        digest_value(value)


def test_self_referencing_structures_are_unhashable_not_recursion_errors() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(UnhashableInputError, match="self-referencing") as err:
        canonicalize(loop, path="r")
    assert err.value.path.startswith("r[1][1]")
    mapping: dict[str, Any] = {}
    mapping["self"] = mapping
    with pytest.raises(UnhashableInputError, match="self-referencing"):
        digest_call("pkg:f", {"m": mapping})
    box = Box(1)
    box.extra = box
    with pytest.raises(UnhashableInputError):
        digest_value(box)


def test_deep_but_finite_nesting_is_fine() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH):
        deep = [deep]
    assert digest_value(deep) != digest_value(deep[0])
    with pytest.raises(UnhashableInputError):
        digest_value([deep])
