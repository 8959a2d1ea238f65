"""Exact JSON of job returns, and the rewriting of uuids and run-folder paths when served."""

from __future__ import annotations

import datetime
import enum
import json
import math
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from monty.json import MontyDecoder, MontyEncoder

from jobflow_cache.codec import (
    DirRewrite,
    _tag,
    _untag,
    created_uuids,
    dumps,
    job_uuids,
    loads,
    referenced_uuids,
    rewrite_text,
)
from jobflow_cache.errors import CorruptEntryError


class Color(enum.Enum):
    RED = "red"


# -- dumps / loads ------------------------------------------------------------------------------
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)
hashables = st.recursive(scalars, lambda inner: st.tuples(inner, inner), max_leaves=4)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.frozensets(hashables, max_size=3),
        st.dictionaries(st.text(max_size=5), inner, max_size=4),
        st.dictionaries(st.integers(), inner, max_size=3),
        st.dictionaries(hashables, inner, max_size=3),
    ),
    max_leaves=12,
)


def same(a, b) -> bool:
    """Equal, with the same container types all the way down."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@given(values)
def test_round_trip_keeps_python_types(value):
    assert same(loads(dumps(value)), value)


def test_round_trip_of_special_values():
    value = {
        "nan": float("nan"),
        "inf": -math.inf,
        "when": datetime.datetime(2026, 1, 2, 3, 4, 5, 678),
        "color": Color.RED,
        "@jfc": "a user key that looks like our tag",
        (1, 2): {3, 4},
    }
    back = loads(dumps(value))
    assert math.isnan(back["nan"])
    assert back["inf"] == -math.inf
    assert back["when"] == value["when"]
    assert back["color"] is Color.RED
    assert back["@jfc"] == value["@jfc"]
    assert back[(1, 2)] == {3, 4}


def test_msonable_objects_are_rebuilt():
    pytest.importorskip("pymatgen")
    from pymatgen.core import Lattice, Structure

    s = Structure(Lattice.cubic(3.6), ["Cu"], [[0, 0, 0]])
    assert loads(dumps({"s": s}))["s"] == s


def test_garbage_is_a_corrupt_entry():
    with pytest.raises(CorruptEntryError):
        loads('{"unclosed": ')
    with pytest.raises(CorruptEntryError):
        loads('{"@jfc": "tuple"}')  # a tag without its items


# -- rewriting --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "old", "new", "expected"),
    [
        ("/a/b", "/a/b", "/x/y", "/x/y"),
        ("/a/b/c/OUTCAR", "/a/b", "/x", "/x/c/OUTCAR"),
        ("/a/b/", "/a/b", "/x", "/x/"),
        ("/a/b/c", "/a/b/", "/x/", "/x/c"),
        ("host:/a/b", "/a/b", "/x", "host:/x"),  # another host than the recording one: kept
        ("rec:/a/b/c", "/a/b", "/x", "now:/x/c"),  # the recording host becomes this host
        ("node01.cluster.org:/a/b/c", "/a/b", "/x", "node01.cluster.org:/x/c"),
        ("/a/bc", "/a/b", "/x", "/a/bc"),
        ("/a/bc/d", "/a/b", "/x", "/a/bc/d"),
        ("host:/a/bc", "/a/b", "/x", "host:/a/bc"),
        ("/z/a/b", "/a/b", "/x", "/z/a/b"),
        ("see /a/b/OUTCAR", "/a/b", "/x", "see /x/OUTCAR"),
        ("http://a/b", "/a/b", "/x", "http://a/b"),
        ("a/b", "/a/b", "/x", "a/b"),
        ("", "/a/b", "/x", ""),
        ("/a/b", "", "/x", "/a/b"),
    ],
)
def test_path_boundaries(value, old, new, expected):
    moved = {old: DirRewrite(new, None, ("rec", "now"))}
    assert json.loads(rewrite_text(json.dumps([value]), {}, moved)) == [expected]


def test_only_the_jobs_files_move():
    text = json.dumps(["/r/OUTCAR", "/r/sub/x", "/r/sub", "/r/input.txt", "/r"])
    moved = {"/r": DirRewrite("/n", frozenset({"OUTCAR", "sub", "sub/x"}))}
    assert json.loads(rewrite_text(text, {}, moved)) == [
        "/n/OUTCAR",
        "/n/sub/x",
        "/n/sub",
        "/r/input.txt",
        "/n",
    ]


def test_paths_needing_json_escapes():
    old, new = '/a/"quoted" dir', "/b/ünïcode"
    text = json.dumps({"p": old + "/f"})
    assert json.loads(rewrite_text(text, {}, {old: DirRewrite(new)})) == {"p": new + "/f"}


def test_uuids_are_replaced_everywhere_and_only_when_mapped():
    u1, u2, other = (f"{i}" * 8 + "-aaaa-bbbb-cccc-" + "d" * 12 for i in (1, 2, 3))
    text = json.dumps({"uuid": u1, "refs": [u1, other], "note": f"made by {u1}"})
    out = json.loads(rewrite_text(text, {u1: u2}, {}))
    assert out == {"uuid": u2, "refs": [u2, other], "note": f"made by {u2}"}


def test_created_uuids_are_jobs_and_flows_only():
    tree = {
        "@class": "Flow",
        "uuid": "f",
        "jobs": [{"@class": "Job", "uuid": "j"}, {"@class": "OutputReference", "uuid": "r"}],
    }
    assert created_uuids(tree) == {"f", "j"}
    assert job_uuids(tree) == ({"f", "j"}, {"r"}) == (created_uuids(tree), referenced_uuids(tree))


@given(values)
def test_loads_of_a_parsed_tree_is_loads_of_the_text(value) -> None:
    text = dumps(value)
    assert same(loads(text, json.loads(text)), loads(text))


@pytest.mark.parametrize(
    "text", ["1", "-0.0", "NaN", "Infinity", "null", "true", '"x"', '[1, [2.5, "a"], []]', "[]"]
)
def test_loads_without_objects_is_monty_s_decode(text: str) -> None:
    """Text without a JSON object skips monty's decoder: the same value comes out."""
    got, expected = loads(text), MontyDecoder().decode(text)
    assert json.dumps(got) == json.dumps(expected)
    assert type(got) is type(expected)


@given(values)
def test_dumps_is_json_dumps_with_montys_encoder(value) -> None:
    expected = json.dumps(_tag(value), cls=MontyEncoder, separators=(",", ":"), allow_nan=True)
    assert dumps(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        {"a": [1, {"b": None}], "c": "x{y}"},
        {"when": datetime.datetime(2024, 5, 1, 12, 0, 0, 123456)},
        {"color": Color.RED, "n": float("nan")},
        {"$date": "2020-01-01T00:00:00Z"},  # a key bson's object hook rebuilds
        {"k": {"$oid": "5f1d7c2b9d1e8a3b4c5d6e7f"}},
        {"k": '"$date"'},  # only text that looks like one: still the same value
        {"\u0024numberLong": "5"},
    ],
)
def test_loads_of_objects_is_monty_s_decode(value) -> None:
    """Text whose objects have no "$..." key skips bson's object hook; any other text goes
    through monty's decoder: both give what monty's decoder gives."""
    text = dumps(value)
    escaped = text.replace('"$', '"\\u0024')  # the same document, "$" escaped
    for variant in (text, escaped):
        expected = MontyDecoder().decode(variant)
        for got in (loads(variant), loads(variant, json.loads(variant))):  # parsed already
            assert repr(got) == repr(_untag(expected) if "@jfc" in variant else expected)


# -- Python types survive: a hit hands back what a computed run returns ----------------------


class Phase(str, enum.Enum):
    SOLID = "solid"


class Spin(enum.IntEnum):
    UP = 1


TYPED = [
    np.float32(0.1),
    np.float64(1 / 3),
    np.float16(-0.0),
    np.float32("nan"),
    np.float64("-inf"),
    np.int64(-(2**63)),
    np.int32(7),
    np.uint64(2**64 - 1),
    np.uint8(255),
    np.bool_(True),
    np.bool_(False),
    np.complex128(1 - 2j),
    np.complex64(0.5j),
    np.str_("ab\x00c"),
    np.str_(""),
    np.bytes_(b"a\x00"),
    np.datetime64("2020-01-02T03:04", "m"),
    np.timedelta64(5, "s"),
    np.longdouble(1) / 3,
    np.arange(4, dtype=np.float32).reshape(2, 2),
    np.array([1, 2], dtype=np.int8),
    np.array([True, False]),
    np.array([1 + 2j], dtype=np.complex64),
    np.array(2.5, dtype=np.float32),
    Color.RED,
    Phase.SOLID,
    Spin.UP,
    (1, "a", None),
    (),
    {1, "x"},
    frozenset({2.5}),
    {"k": (np.float32(1.5), [np.int64(2)])},
    [Phase.SOLID, (Spin.UP,), {np.int64(1): "int key", Phase.SOLID: "str-mixin key"}],
]


def same_typed(a, b) -> bool:
    """Same type (numpy dtype included) and value all the way down; NaN is NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, np.generic):
        if a.dtype != b.dtype:
            return False
        if isinstance(a, np.bytes_):
            return bytes(a) == bytes(b)
        if isinstance(a, np.floating) and np.isnan(a):
            return bool(np.isnan(b))
        return bool(a == b) and (not isinstance(a, np.floating) or np.signbit(a) == np.signbit(b))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            any(same_typed(ka, kb) and same_typed(va, b[kb]) for kb in b) for ka, va in a.items()
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_typed(x, y) for x, y in zip(a, b))
    if isinstance(a, (set, frozenset)):
        return len(a) == len(b) and all(any(same_typed(x, y) for y in b) for x in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


@pytest.mark.parametrize("value", TYPED, ids=lambda v: type(v).__name__)
def test_loads_of_dumps_keeps_type_and_value(value) -> None:
    back = loads(dumps(value))
    assert type(back) is type(value)
    assert same_typed(back, value)
    text = dumps(value)  # and from a parsed tree, as the stores hand it over
    assert same_typed(loads(text, json.loads(text)), value)


numpy_scalars = st.one_of(
    st.floats(width=32).map(np.float32),
    st.floats().map(np.float64),
    st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.integers(0, 2**64 - 1).map(np.uint64),
    st.booleans().map(np.bool_),
    st.text(max_size=3).map(np.str_),
    st.sampled_from([Color.RED, Phase.SOLID, Spin.UP]),
)
typed_values = st.recursive(
    st.one_of(scalars, numpy_scalars),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=3), inner, max_size=3),
        st.dictionaries(numpy_scalars.filter(lambda x: x == x), inner, max_size=3),
        st.frozensets(numpy_scalars.filter(lambda x: x == x), max_size=3),
    ),
    max_leaves=10,
)


@given(typed_values)
def test_round_trip_keeps_numpy_and_enum_types(value) -> None:
    assert same_typed(loads(dumps(value)), value)


@pytest.mark.parametrize(
    "tag",
    [
        {"dtype": "O", "value": 1},  # object: could hold anything
        {"dtype": "|V8", "hex": "00" * 8},  # void / structured
        {"dtype": "i4,f8", "hex": "00" * 12},
        {"dtype": "<f8", "value": "1.0"},  # a str for a float
        {"dtype": "<i8", "value": 1.5},
        {"dtype": "|b1", "value": 1},
        {"dtype": "<i1", "value": 300},  # does not fit
        {"dtype": "<f8", "hex": "00"},  # wrong length
        {"dtype": "os.system", "value": 1},
        {"dtype": ["<f8"], "value": 1.0},
        {"dtype": "<f8"},
    ],
)
def test_a_numpy_tag_only_ever_makes_a_numpy_scalar(tag) -> None:
    before = set(sys.modules)
    with pytest.raises(CorruptEntryError):
        loads(json.dumps({"@jfc": "numpy", **tag}))
    assert set(sys.modules) == before  # nothing imported


E2E = """
import json, sys
import numpy as np
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore
from jobflow_cache import run_locally
from tests.support import value_jobs as vj

def describe(value):
    if isinstance(value, np.ndarray):
        return ["ndarray", str(value.dtype), value.tolist()]
    if isinstance(value, np.generic):
        return [type(value).__name__, str(value.dtype), repr(value)]
    if isinstance(value, dict):
        return ["dict", sorted([describe(k), describe(v)] for k, v in value.items())]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [describe(v) for v in value]]
    if isinstance(value, (set, frozenset)):
        return [type(value).__name__, sorted(describe(v) for v in value)]
    return [type(value).__qualname__, repr(value)]

typed = vj.typed_values(0.1)
scalar = vj.scalar_f32(0.25)
echo = vj.echo_types(typed.output)
flow = Flow([typed, scalar, echo])
responses = run_locally(flow, store=JobStore(MemoryStore()), log=False, ensure_success=True)
out = {}
for job in (typed, scalar, echo):
    response = responses[job.uuid][1]
    out[job.name] = describe(response.output)
    out[job.name + ":is"] = [type(response.output).__name__]
print(json.dumps(out))
"""


def test_hits_hand_back_the_types_of_a_computed_run(counts, tmp_path) -> None:
    """Cold run, then a warm run (all hits) in fresh processes: the responses hold the same
    Python types (np.float32, np.int64, arrays with their dtype, Enums, tuples)."""
    from tests.conftest import run_python

    work = tmp_path / "work"
    work.mkdir()
    cold = json.loads(run_python(E2E, cwd=work))
    ran = counts()
    assert ran == {"typed_values": 1, "scalar_f32": 1, "echo_types": 1}
    warm = json.loads(run_python(E2E, cwd=work))
    assert counts() == ran, "the warm run must be served entirely from the cache"
    assert warm == cold
    typed = dict((json.dumps(k), v) for k, v in cold["typed_values"][1])
    assert typed[json.dumps(["str", "'f32'"])][:2] == ["float32", "float32"]
    assert typed[json.dumps(["str", "'i64'"])][:2] == ["int64", "int64"]
    assert typed[json.dumps(["str", "'array'"])][:2] == ["ndarray", "float32"]
    assert typed[json.dumps(["str", "'phase'"])][0] == "Phase"
    assert typed[json.dumps(["str", "'spin'"])][0] == "Spin"
    assert typed[json.dumps(["str", "'pair'"])][0] == "tuple"
    assert typed[json.dumps(["Spin", "<Spin.UP: 1>"])][0] == "str"
    assert cold["scalar_f32"][:2] == ["float32", "float32"]


MONTY_DICTS = """
import json
from jobflow import Flow, JobStore
from jobflow.managers.local import run_locally as jobflow_run_locally
from maggma.stores import MemoryStore
from jobflow_cache import run_locally
from tests.support import value_jobs as vj
import os
job = vj.monty_dicts(5.43)
store = JobStore(MemoryStore())
if os.environ["JFC_TEST_RUN"] == "plain":
    jobflow_run_locally(Flow([job]), store=store, log=False, ensure_success=True)
else:
    run_locally(Flow([job]), store=store, log=False, ensure_success=True)
store.connect()
print(json.dumps(store.query_one({}, load=False)["output"], sort_keys=True))
"""


def test_a_returned_monty_dict_is_served_as_the_dict_jobflow_stores(counts, tmp_path) -> None:
    """A job returning ``structure.as_dict()``-like dicts (and ``$``-keyed ones): plain
    jobflow, then a cold and a warm cached run, in fresh processes, store the same output
    document. Before the fix, a hit handed jobflow the Structure the dict names, whose
    ``as_dict`` has no ``energies`` and a ``charge``: a wrong document, served."""
    from tests.conftest import run_python

    work = tmp_path / "work"
    work.mkdir()
    plain = run_python(MONTY_DICTS, {"JFC_TEST_RUN": "plain"}, cwd=work)
    assert counts() == {"monty_dicts": 1}
    cold = run_python(MONTY_DICTS, {"JFC_TEST_RUN": "cache"}, cwd=work)
    warm = run_python(MONTY_DICTS, {"JFC_TEST_RUN": "cache"}, cwd=work)
    assert counts() == {"monty_dicts": 2}, "the warm run must be a hit"
    assert cold == plain
    assert warm == plain
    assert "energies" in json.loads(warm)["structure"]


@pytest.mark.parametrize(
    "value",
    [
        {"@module": "pymatgen.core.structure", "@class": "Structure", "sites": []},
        {"@module": "datetime", "@class": "datetime", "string": "2024-01-01 00:00:00"},
        {"$date": "2024-05-01T00:00:00Z"},
        {"$oid": "0123456789ab0123456789ab"},
        {"a": [{"@module": "numpy", "@class": "array", "dtype": "float64", "data": [1.0]}]},
    ],
)
def test_dicts_a_decoder_would_rebuild_come_back_as_dicts(value) -> None:
    assert loads(dumps(value)) == value
    assert type(loads(dumps(value))) is dict


# -- fast paths of loads and rewrite_text: the same result as the full walk and scan ---------
TAG_TEXT = '"@jfc"'
tag_like = st.sampled_from(
    ["@jfc", TAG_TEXT, f"x{TAG_TEXT}", f"{TAG_TEXT}:", "@jfc:", '{"@jfc": "tuple"}', "items"]
)
tag_values = st.recursive(
    st.one_of(scalars, tag_like),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.frozensets(st.one_of(hashables, tag_like), max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=5), tag_like), inner, max_size=4),
        st.dictionaries(st.sampled_from(["@module", "@class", "$date", "@jfc"]), inner, max_size=3),
        st.dictionaries(hashables, inner, max_size=3),
    ),
    max_leaves=16,
)


@given(tag_values)
def test_loads_stopping_at_the_last_tag_is_the_full_untag(value) -> None:
    """The walk that stops once the text's count of "@jfc" strings is used up gives what the
    whole walk gives, whatever strings (the tag's text among them) the value holds."""
    text = dumps(value)
    full = _untag(json.loads(text)) if "@module" not in text else None
    for got in (loads(text), loads(text, json.loads(text))):
        assert same(got, value)
        if full is not None:
            assert same(got, full)


def test_untag_stops_once_every_tag_was_found() -> None:
    tree = [{"@jfc": "tuple", "items": [1]}, [{"@jfc": "set", "items": [2]}]]
    assert _untag(tree, [1]) == [(1,), [{"@jfc": "set", "items": [2]}]]  # bound: 1 tag
    assert _untag(tree, [2]) == _untag(tree) == [(1,), [{2}]]


def test_a_returned_monty_dict_is_not_walked_below_its_tag() -> None:
    """Its one tag is the top-level node: the parts below come back as parsed, unwalked."""
    value = {"@module": "m", "@class": "C", "sites": [{"a": [1, 2.5]}] * 3, "x": "@jfc!"}
    text = dumps(value)
    tree = json.loads(text)
    sites = next(v for k, v in tree["items"] if k == "sites")
    got = loads(text, tree)
    assert got == value
    assert type(got) is dict
    assert got["sites"] is sites


def test_a_tag_key_written_with_escapes_is_still_decoded() -> None:
    """Another writer may escape the tag's key: the whole tree is then walked."""
    text = '[[1], {"\\u0040jfc": "tuple", "items": [1, 2]}, {"@jfc": "set", "items": [3]}]'
    assert text.count(TAG_TEXT) == 1
    assert loads(text) == [[1], (1, 2), {3}]


def _collections_inside(names: set[str]) -> list[bool]:
    """A list that gets, for every collection started from now on, whether it ran inside a
    call of one of the functions ``names`` (remove the callback with ``_stop_watching``)."""
    import gc

    seen: list[bool] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            frame = sys._getframe(1)
            inside = False
            while frame is not None:
                inside = inside or frame.f_code.co_name in names
                frame = frame.f_back
            seen.append(inside)

    gc.callbacks.append(callback)
    _WATCHERS.append(callback)
    return seen


_WATCHERS: list = []


def _stop_watching() -> None:
    import gc

    while _WATCHERS:
        gc.callbacks.remove(_WATCHERS.pop())


def test_parse_pauses_the_collector_only_while_it_parses() -> None:
    import gc

    from jobflow_cache import codec

    big = json.dumps([[i, {"k": [i]}] for i in range(codec.PAUSE_GC_MIN // 10)])
    assert len(big) >= codec.PAUSE_GC_MIN
    expected = json.loads(big)
    seen = _collections_inside({"raw_decode"})
    try:
        assert gc.isenabled()
        assert codec.parse(big) == expected
        assert gc.isenabled()
        with pytest.raises(ValueError):
            codec.parse(big[:-1])  # an error: enabled again all the same
        assert gc.isenabled()
        assert True not in seen  # no collection while a tree was built
        gc.disable()
        try:
            codec.parse(big)
            assert not gc.isenabled()  # left as the caller had it
        finally:
            gc.enable()
        json.loads(big)  # the check itself: it sees collections without the pause
        assert True in seen
    finally:
        _stop_watching()


UUIDS = [f"{i}" * 8 + "-aaaa-bbbb-cccc-" + "d" * 12 for i in (1, 2, 3)]
uuid_parts = st.sampled_from([*UUIDS, "0", "f", "-", " ", '"', "aaaa-", "dddddd"])


@given(
    st.lists(uuid_parts, max_size=12).map("".join),
    st.lists(uuid_parts.filter(lambda p: len(p) == 36), max_size=3, unique=True),
    st.integers(0, 12),
)
def test_uuid_rewrite_is_the_pattern_s_substitution(text, keys, extra) -> None:
    """Searching the text for a few uuids first changes nothing: the result is the pattern's
    substitution of the mapped uuids, with few keys and with many."""
    from jobflow_cache.codec import UUID_RE

    uuids = {k: f"{i:08x}-0000-0000-0000-{i:012x}" for i, k in enumerate(keys)}
    uuids.update({f"{i:08x}-ffff-ffff-ffff-{i:012x}": "x" for i in range(extra)})
    expected = UUID_RE.sub(lambda m: uuids.get(m.group(0), m.group(0)), text)
    assert rewrite_text(text, uuids, {}) == expected


def test_loads_of_a_long_text_runs_no_collection() -> None:
    import gc

    from jobflow_cache import codec

    text = dumps([(1,), *[Color.RED] * 40_000])
    assert len(text) >= codec.PAUSE_GC_MIN
    seen = _collections_inside({"_loads"})
    try:
        got = loads(text)
    finally:
        _stop_watching()
    assert True not in seen
    assert gc.isenabled()
    assert got[0] == (1,)
    assert got[1:] == [Color.RED] * 40_000
