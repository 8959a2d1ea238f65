"""Exact JSON of job returns, and the rewriting of uuids and run-folder paths when served."""

from __future__ import annotations

import datetime
import enum
import json
import math

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
