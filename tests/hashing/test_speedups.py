"""The C accelerator of hashing gives exactly the encodings of the pure-Python reference path.

The reference is the same module with ``hashing._speedups`` set to None (what an install without
a C compiler, or ``JOBFLOW_CACHE_SPEEDUPS=0``, runs). Every comparison is of encoded bytes, or of
the error (type, message and path) when a value is unhashable, and of the strings the hook
replaced.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import enum
import inspect
import math
import os
import pathlib
import subprocess
import sys
import threading
import uuid
import zoneinfo
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monty.json import MSONable

from jobflow_cache.errors import UnhashableInputError
from jobflow_cache.hashing import canonical as hashing
from jobflow_cache.hashing.canonical import (
    MAX_DEPTH,
    Normalizer,
    bind_arguments,
    canonicalize,
    digest_call,
    digest_value,
    encode,
)

SPEEDUPS = hashing._speedups
# read at collection, like hashing reads it at import (the autouse fixture clears the variable)
TURNED_OFF = os.environ.get("JOBFLOW_CACHE_SPEEDUPS", "").strip() == "0"


@contextmanager
def pure_python() -> Iterator[None]:
    """Run the block on the reference path (no accelerator)."""
    saved = hashing._speedups
    hashing._speedups = None
    try:
        yield
    finally:
        hashing._speedups = saved


def outcome(value: Any, hook: Any = None) -> tuple[str, Any]:
    """The encoding of a value, or its error; with the strings the hook replaced."""
    replaced: list[str] = []
    if hook is not None:
        inner = hook.func if isinstance(hook, Normalizer) else hook

        def recording(s: str) -> tuple[str, Any] | None:
            result = inner(s)
            if result is not None:
                replaced.append(s)
            return result

        hook = (
            Normalizer(recording, exact=hook.exact, markers=hook.markers)
            if isinstance(hook, Normalizer)
            else recording
        )
    try:
        result: Any = ("ok", hashing._encode_value(value, hook, "arg"))
    except UnhashableInputError as err:
        result = ("error", (str(err), err.path))
    # the same string may be replaced once per occurrence: compare as sets
    return result[0], (result[1], sorted(set(replaced)))


def assert_same(value: Any, hook: Any = None) -> None:
    fast = outcome(value, hook)
    with pure_python():
        reference = outcome(value, hook)
    assert fast == reference, value


needs_speedups = pytest.mark.skipif(SPEEDUPS is None, reason="the C accelerator is not built")

# -- tricky values -----------------------------------------------------------------------------


class Color(enum.Enum):
    RED = 1


class Mode(str, enum.Enum):
    FAST = "fast"


class Level(enum.IntEnum):
    ONE = 1


class MyStr(str):
    pass


class MyInt(int):
    pass


class MyFloat(float):
    pass


class MyDict(dict):  # type: ignore[type-arg]
    pass


class MyList(list):  # type: ignore[type-arg]
    pass


Pair = collections.namedtuple("Pair", "x y")
PARIS_NOON = datetime.datetime(2024, 1, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
PLUS_ONE = datetime.timezone(datetime.timedelta(hours=1))


@dataclasses.dataclass
class Settings:
    cutoff: float
    tags: tuple[str, ...] = ()


class Box(MSONable):
    def __init__(self, size: Any, label: str = "box") -> None:
        self.size = size
        self.label = label


UUIDS = ["0b5e7f43-3b27-4d6f-9d7c-0f2f7e8f1a11", "9a1c2d3e-4f50-4a6b-8c7d-112233445566"]


def job_dir_hook(value: str) -> tuple[str, Any] | None:
    """Replaces two uuids and paths under /run/; None for every other string."""
    if value in UUIDS:
        return ("job", UUIDS.index(value))
    if value.startswith("/run/"):
        return ("dir", value.removeprefix("/run/"))
    return None


SCREENED = Normalizer(job_dir_hook, exact=frozenset(UUIDS), markers=("/run/",))
LIVE_DICT = Normalizer(job_dir_hook, exact=dict.fromkeys(UUIDS, 1), markers=("/run/",))

strings = st.one_of(
    st.text(alphabet="ab\x00@é/\ud800\U0001f600", max_size=4),
    st.sampled_from(
        [*UUIDS, "/run/a/POSCAR", "/run/", "/other/x", "@version", "@module", "@class", "array"]
    ),
    st.sampled_from(["\ud800", "\udfff", "a\ud800b", "\U0001f600\udc00", "\x00", "\x00set"]),
)
ints = st.one_of(
    st.integers(-3, 3),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**60, 2**64, -(2**100), 10**30]),
    st.integers(),
)
floats = st.one_of(
    st.floats(),
    st.sampled_from([math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 5e-324, 1e308]),
)
objects = st.one_of(
    st.sampled_from([Color.RED, Mode.FAST, Level.ONE, uuid.UUID(int=7), uuid.UUID(UUIDS[0])]),
    st.sampled_from([datetime.datetime(2024, 1, 2, 3, 4, 5), pathlib.Path("/run/a")]),
    st.sampled_from([PARIS_NOON, PARIS_NOON.replace(tzinfo=PLUS_ONE), datetime.date(2024, 1, 1)]),
    st.sampled_from([datetime.time(1, 2, tzinfo=PLUS_ONE), datetime.timedelta(days=1, seconds=2)]),
    st.sampled_from([np.float32(1.5), np.int32(3), np.bool_(False), np.bytes_(b"a\x00")]),
    st.sampled_from([np.complex64(1 + 2j), np.uint8(255), np.float16(-0.0), np.datetime64(1, "D")]),
    strings.map(MyStr),
    ints.map(MyInt),
    floats.map(MyFloat),
    st.sampled_from([np.float64(1.5), np.float64("nan"), np.int64(3), np.bool_(True)]),
    st.sampled_from([np.str_("a"), np.str_(UUIDS[1]), np.float32(0.1), np.uint64(2**64 - 1)]),
    st.sampled_from([np.arange(3.0), np.array([np.nan, -0.0]), np.array(["a", "b"])]),
    st.sampled_from([b"ab", bytearray(b"\x00"), 1 + 2j, Settings(1.0, ("a",))]),
    st.sampled_from([np.array([UUIDS[0], 1], dtype=object)]),
)
leaves = st.one_of(st.none(), st.booleans(), ints, floats, strings, objects)
str_keys = st.one_of(
    st.sampled_from(
        ["\x00", "\x00set", "@version", "@class", "", "a", "é", "\ud800", "\U0001f600"]
    ),
    strings,
)
keys = st.one_of(str_keys, st.sampled_from([1, 2.5, None, True, (1, 2), Mode.FAST, np.str_("k")]))


def monty_dicts(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    base = st.fixed_dictionaries(
        {"@module": st.sampled_from(["m", "numpy", UUIDS[0]]), "@class": st.sampled_from(["C"])},
        optional={"@version": st.one_of(strings, inner), "x": inner},
    )
    array = st.fixed_dictionaries(
        {
            "@module": st.just("numpy"),
            "@class": st.just("array"),
            "dtype": st.sampled_from(["float64", "int64", "bogus"]),
            "data": st.sampled_from([[1.0, 2.0], [[1, 2]], "x", [math.nan]]),
        },
        optional={"@version": st.just("1.0")},
    )
    when = st.fixed_dictionaries(
        {
            "@module": st.just("datetime"),
            "@class": st.just("datetime"),
            "string": st.sampled_from(
                [
                    str(PARIS_NOON),
                    "2024-01-01 12:00:00",
                    "2024-01-01 12:00:00.5+00:00",
                    "x",
                    UUIDS[0],
                ]
            ),
        },
        optional={"@version": st.just("1.0")},
    )
    return st.one_of(base, array, when)


values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, min_size=17, max_size=20),  # the reference's long-list fast paths
        st.lists(st.one_of(floats, ints, strings), min_size=17, max_size=20),
        st.tuples(inner, inner),
        st.dictionaries(str_keys, inner, max_size=4),
        st.dictionaries(str_keys, st.one_of(leaves, st.lists(leaves, max_size=3)), max_size=4),
        st.dictionaries(keys, inner, max_size=3),
        st.frozensets(st.one_of(ints, strings, st.tuples(ints)), max_size=3),
        st.sets(st.one_of(ints, strings, st.tuples(ints), st.frozensets(ints)), max_size=3),
        monty_dicts(inner),
        inner.map(lambda v: Pair(v, [v])),
        inner.map(lambda v: MyDict(a=v)),
        inner.map(lambda v: MyList([v])),
        inner.map(lambda v: collections.OrderedDict(b=v)),
        inner.map(lambda v: Box(v, label=UUIDS[1])),
        inner.map(lambda v: Box((v, Pair(v, (v,))), label="t")),  # tuples in a JSON form
        inner.map(lambda v: Settings(1.0, (v,))),
    ),
    max_leaves=14,
)
hooks = st.sampled_from([None, SCREENED, LIVE_DICT, job_dir_hook])
# mostly JSON-like values (the accelerator's own ground) with the tricky keys and leaves
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, floats, strings),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(str_keys, inner, max_size=4),
        monty_dicts(inner),
    ),
    max_leaves=20,
)


@needs_speedups
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values, hooks)
def test_fast_path_encodes_like_the_reference(value: Any, hook: Any) -> None:
    assert_same(value, hook)


@needs_speedups
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_like, hooks)
def test_fast_path_encodes_json_like_values_like_the_reference(value: Any, hook: Any) -> None:
    assert_same(value, hook)


def nest(value: Any, depth: int, kind: str) -> Any:
    for i in range(depth):
        value = {"k": value} if kind == "dict" else [value] if kind == "list" else (i, value)
    return value


@needs_speedups
@settings(max_examples=80, deadline=None)
@given(
    values,
    st.integers(MAX_DEPTH - 3, MAX_DEPTH + 2),
    st.sampled_from(["dict", "list", "tuple"]),
    hooks,
)
def test_deep_nesting_like_the_reference(value: Any, depth: int, kind: str, hook: Any) -> None:
    assert_same(nest(value, depth, kind), hook)
    assert_same([Box(nest(value, depth - 3, kind))], hook)


@needs_speedups
@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, threading.Lock()]},
        {"ok": 1, "b": {"c d": [0, 1, {2: [threading.Lock()]}]}},
        [[[lambda: None]]],
        {"box": Box([1, threading.Lock()])},
        {"s": {threading.Lock()}},
        {"\x00k": [threading.Lock()]},
        {"@module": "m", "@class": "C", "@version": threading.Lock()},
    ],
    ids=["list", "nested", "lambda", "object", "set", "nul_key", "version"],
)
def test_errors_name_the_same_place(value: Any) -> None:
    assert_same(value)
    assert outcome(value)[0] == "error"


@needs_speedups
def test_self_reference_and_runaway_as_dict_like_the_reference() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    mapping: dict[str, Any] = {}
    mapping["self"] = (mapping,)
    box = Box(1)
    box.size = box
    for value in (loop, mapping, box):
        assert_same(value)
        assert outcome(value)[0] == "error"


@needs_speedups
def test_plain_values_are_not_copied_and_impure_parts_are() -> None:
    plain = {"a": [1, 2.5, "x", None, True], "b": [{"c": "d"}]}
    assert SPEEDUPS.tree(plain, 0, MAX_DEPTH, hashing._canon, None, None, None) is plain
    # a tuple is wrapped in its tag, its items kept as they are; in a JSON form it is a list
    items = ({"c": "d"}, 1)
    tagged = SPEEDUPS.tree({"b": items}, 0, MAX_DEPTH, hashing._canon, None, None, None)
    assert tagged == {"b": {"\x00tuple": items}}
    assert tagged["b"]["\x00tuple"] is items
    assert SPEEDUPS.tree(items, 0, MAX_DEPTH, hashing._canon, None, None, None, False) is items
    mixed = {"a": [1, 2.5], "b": [math.nan], "@module": "m", "@class": "C", "@version": "1"}
    tree = SPEEDUPS.tree(mixed, 0, MAX_DEPTH, hashing._canon, None, None, None)
    assert tree == {"a": [1, 2.5], "b": [{"\x00float": "nan"}], "@module": "m", "@class": "C"}
    assert tree["a"] is mixed["a"]
    assert mixed["@version"] == "1"  # the input is never changed
    assert encode(tree) == encode(canonicalize(mixed))


@needs_speedups
def test_hook_sees_only_candidates_with_a_normalizer_and_every_str_without() -> None:
    seen: list[str] = []

    def hook(value: str) -> tuple[str, Any] | None:
        seen.append(value)
        return job_dir_hook(value)

    value = {"k": ["x", UUIDS[0], "/run/a", "/other", "y"], UUIDS[1]: "z"}
    screened = digest_value(value, normalize_str=Normalizer(hook, exact=UUIDS, markers=["/run"]))
    assert seen == [UUIDS[0], "/run/a"]
    seen.clear()
    assert digest_value(value, normalize_str=hook) == screened
    assert sorted(seen) == sorted(["x", UUIDS[0], "/run/a", "/other", "y", "z"])


def test_normalizer_checks_its_markers() -> None:
    with pytest.raises(TypeError):
        Normalizer(job_dir_hook, markers=[""])
    with pytest.raises(TypeError):
        Normalizer(job_dir_hook, markers=[1])  # type: ignore[list-item]
    assert Normalizer(job_dir_hook)("/run/x") == ("dir", "x")


@needs_speedups
def test_bad_arguments_to_the_extension_raise() -> None:
    with pytest.raises(TypeError):
        SPEEDUPS.tree([], 0, MAX_DEPTH, hashing._canon, job_dir_hook, None, ["/"])
    with pytest.raises(TypeError):
        SPEEDUPS.tree([], 0, MAX_DEPTH, None, None, None, None)
    with pytest.raises(ValueError):
        SPEEDUPS.tree([], 0, 10**6, hashing._canon, None, None, None)


# -- public results are the same in both modes ------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_canonicalize_returns_a_fresh_json_tree_in_both_modes(value: Any) -> None:
    try:
        fast = canonicalize(value)
    except UnhashableInputError:
        return
    with pure_python():
        reference = canonicalize(value)
    assert fast == reference
    assert encode(fast) == encode(reference)
    assert orjson.loads(orjson.dumps(fast)) == fast  # lists, str keys, no tuples
    assert not isinstance(fast, tuple)


def test_canonicalize_does_not_alias_the_input() -> None:
    value = {"a": [1, 2], "b": {"c": "d"}}
    canon = canonicalize(value)
    assert canon == value
    value["a"].append(3)
    value["b"]["c"] = "e"
    assert canon == {"a": [1, 2], "b": {"c": "d"}}


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_canonical_floats_survive_decoding(x: float) -> None:
    # CallDigest.canonical is decoded from the encodings: floats must come back bit for bit.
    back = orjson.loads(orjson.dumps([x]))[0]
    assert math.copysign(1, back) == math.copysign(1, x)
    assert back == x


def test_call_digest_canonical_is_decoded_from_its_encodings() -> None:
    arguments = {"a": (1, [2.5, -0.0]), "b": {"x": {1, 2}}, "c": np.arange(2.0), "d": math.nan}
    call = digest_call("m:f", arguments)
    assert call.canonical == {name: canonicalize(v) for name, v in arguments.items()}
    assert {n: encode(c) for n, c in call.canonical.items()} == call.encodings
    with pure_python():
        reference = digest_call("m:f", arguments)
    assert reference == call


# -- numpy arrays ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["<f2", "<f4", "<f8", ">f8", "<c8", "<c16"])
def test_array_nans_are_one_value_in_every_float_width(dtype: str) -> None:
    base = np.array([1.0, np.nan, -0.0, np.inf], dtype=dtype)
    other = base.copy()
    # a NaN with another payload and sign bit
    raw = other.view(f"u{other.dtype.itemsize // (2 if other.dtype.kind == 'c' else 1)}")
    raw[1 * (2 if other.dtype.kind == "c" else 1)] |= 1
    if other.dtype.byteorder != ">":
        assert not np.array_equal(base.view("u1"), other.view("u1"))
    assert digest_value(base) == digest_value(other)
    assert digest_value(base) != digest_value(np.array([1.0, 2.0, -0.0, np.inf], dtype=dtype))
    assert digest_value(np.zeros(0, dtype=dtype)) != digest_value(np.zeros(1, dtype=dtype))
    with pure_python():
        assert digest_value(other) == digest_value(base)


# -- bind_arguments: the fast binder agrees with Signature.bind ----------------------------------

KINDS = [
    inspect.Parameter.POSITIONAL_ONLY,
    inspect.Parameter.POSITIONAL_OR_KEYWORD,
    inspect.Parameter.VAR_POSITIONAL,
    inspect.Parameter.KEYWORD_ONLY,
    inspect.Parameter.VAR_KEYWORD,
]


@st.composite
def signatures(draw: st.DrawFn) -> inspect.Signature:
    params = []
    names = iter("abcdefghijkl")
    defaults_started = False
    for kind in KINDS:
        many = 1 if kind in (KINDS[2], KINDS[4]) else 3
        for _ in range(draw(st.integers(0, many))):
            default: Any = inspect.Parameter.empty
            if kind in (KINDS[0], KINDS[1]):
                defaults_started = defaults_started or draw(st.booleans())
                default = 0 if defaults_started else default
            elif kind is KINDS[3] and draw(st.booleans()):
                default = 0
            params.append(inspect.Parameter(next(names), kind, default=default))
    return inspect.Signature(params)


def slow_bind(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return TypeError
    bound.apply_defaults()
    out = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        out[name] = list(value) if kind is KINDS[2] else dict(value) if kind is KINDS[4] else value
    return list(out.items())


@settings(max_examples=500, deadline=None)
@given(
    signatures(),
    st.integers(0, 5),
    st.dictionaries(st.sampled_from("abcdefghijklz"), st.integers(1, 9), max_size=5),
)
def test_fast_binder_agrees_with_signature_bind(
    signature: inspect.Signature, n_args: int, kwargs: dict[str, Any]
) -> None:
    args = tuple(range(10, 10 + n_args))
    try:
        fast: Any = list(hashing._bind(signature, args, kwargs).items())
    except TypeError:
        fast = TypeError
    assert fast == slow_bind(signature, args, kwargs)


def test_bind_arguments_of_a_method_and_with_ignore() -> None:
    @dataclasses.dataclass
    class Maker:
        n: int = 1

        def make(self, x: int, *rest: int, flag: bool = False, **extra: Any) -> None: ...

    maker = Maker()
    assert bind_arguments(maker.make, (1, 2), {"flag": True, "z": 3}, ignore=["flag"]) == {
        "self": maker,
        "x": 1,
        "rest": [2],
        "extra": {"z": 3},
    }
    with pytest.raises(TypeError):
        bind_arguments(maker.make, (), {"y": 1})


# -- the extension is built, and the package works without it ---------------------------------


def test_the_extension_is_built() -> None:
    # `pip install -e .` compiles it wherever gcc and the Python headers exist (CI has both);
    # JOBFLOW_CACHE_SPEEDUPS=0 turns it off on purpose.
    if SPEEDUPS is None:
        assert TURNED_OFF, (
            "jobflow_cache._speedups is not compiled (hashing works, about 10x slower): "
            "reinstall with gcc and the Python headers, or set JOBFLOW_CACHE_SPEEDUPS=0"
        )
    else:
        assert SPEEDUPS.__file__.endswith((".so", ".pyd"))
        # built from the current source (jfc2 tags tuples), not a stale build of an older one
        fresh = SPEEDUPS.tree((1,), 0, MAX_DEPTH, hashing._canon, None, None, None)
        assert fresh == {"\x00tuple": (1,)}, "stale _speedups build: `pip install -e .` again"


BLOCK_EXTENSION = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "jobflow_cache._speedups":
            raise ImportError("blocked for the test")
        return None
sys.meta_path.insert(0, Block())
"""
DIGEST = """
import math
from jobflow_cache.hashing import canonical as hashing
assert hashing._speedups is None
print(hashing.digest_value({"a": [1, 2.5, math.nan, (3,)], "b": {1: "x"}, "c": "\\ud800"}))
"""


@pytest.mark.parametrize("how", ["missing", "disabled"])
def test_the_package_works_without_the_extension(how: str) -> None:
    code = BLOCK_EXTENSION + DIGEST if how == "missing" else DIGEST
    env = dict(os.environ, JOBFLOW_CACHE_SPEEDUPS="0" if how == "disabled" else "1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    expected = digest_value({"a": [1, 2.5, math.nan, (3,)], "b": {1: "x"}, "c": "\ud800"})
    assert result.stdout.strip() == expected
