"""Tests for SQLiteStore: the maggma Store contract (checked against MemoryStore), the
encoding, persistence across processes, atomic helpers and concurrent writers."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import os
import pickle
import re
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maggma.core import Sort, StoreError
from maggma.stores import MemoryStore
from monty.json import MontyDecoder

from jobflow_cache import sqlite_store
from jobflow_cache.errors import StoreUnavailableError
from jobflow_cache.sqlite_store import SQLiteStore, _dumps, _encode, _loads, _sanitize

T0 = datetime(2024, 1, 1)
DAY = timedelta(days=1)
# millisecond-aligned datetimes: mongomock (MemoryStore) truncates to milliseconds
T_LAST = T0 + 5 * DAY + timedelta(milliseconds=123)

DOCS: list[dict[str, Any]] = [
    {
        "task_id": "a",
        "n": 1,
        "x": 1.5,
        "s": "apple",
        "flag": True,
        "lu": T0,
        "nested": {"v": 10, "w": "p"},
        "tags": ["red", "blue"],
        "items": [{"k": 1}, {"k": 2}],
        "opt": None,
        "group": "g1",
        "sub": 1,
    },
    {
        "task_id": "b",
        "n": 2,
        "x": -3.0,
        "s": "banana",
        "flag": False,
        "lu": T0 + DAY,
        "nested": {"v": 20, "w": "q"},
        "tags": ["green"],
        "items": [{"k": 3}],
        "group": "g1",
        "sub": 2,
    },
    {
        "task_id": "c",
        "n": 3,
        "s": "cherry",
        "lu": T0 + 2 * DAY,
        "nested": {"v": 30},
        "tags": [],
        "opt": 5,
        "group": "g2",
        "sub": 1,
    },
    {
        "task_id": "d",
        "n": 4,
        "x": 0.25,
        "s": "date",
        "flag": True,
        "lu": T0 + 3 * DAY,
        "nested": {"v": 40, "w": "p"},
        "tags": ["red"],
        "group": "g1",
        "sub": 1,
    },
    {"task_id": "e", "n": 5, "s": "Elder", "lu": T0 + 4 * DAY, "group": "g2", "sub": 1},
    {"task_id": 6, "n": 6, "s": "fig", "lu": T_LAST, "nested": {"v": None}},
]
ALL = ["a", "b", "c", "d", "e", 6]


def ids(docs: Any) -> list:
    """The task_ids of some documents, in order."""
    return [d["task_id"] for d in docs]


def clean(docs: Any) -> list[dict]:
    """Documents without MongoDB's ``_id`` (MemoryStore adds it, SQLiteStore does not)."""
    return [{k: v for k, v in d.items() if k != "_id"} for d in docs]


def new_store(path: Path, **kwargs: Any) -> SQLiteStore:
    store = SQLiteStore(path, **kwargs)
    store.connect()
    return store


@pytest.fixture
def store(tmp_path: Path):
    """A connected SQLiteStore holding DOCS."""
    s = new_store(tmp_path / "store.db", last_updated_field="lu")
    s.update(copy.deepcopy(DOCS))
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "memory"])
def both(request: pytest.FixtureRequest, tmp_path: Path):
    """SQLiteStore and maggma's MemoryStore holding the same DOCS."""
    if request.param == "sqlite":
        s: Any = SQLiteStore(tmp_path / "both.db", last_updated_field="lu")
    else:
        s = MemoryStore(collection_name=f"mem-{tmp_path.name}", last_updated_field="lu")
    s.connect()
    s.update(copy.deepcopy(DOCS))
    yield s
    s.close()


# --------------------------------------------------------------------------- contract, parity

CRITERIA = [
    ({}, ALL),
    ({"n": 3}, ["c"]),
    ({"s": "apple"}, ["a"]),
    ({"nested.v": 20}, ["b"]),
    ({"nested.w": "p"}, ["a", "d"]),
    ({"n": {"$eq": 2}}, ["b"]),
    ({"n": {"$gt": 2}}, ["c", "d", "e", 6]),
    ({"n": {"$gte": 2, "$lt": 4}}, ["b", "c"]),
    ({"x": {"$lte": 0.25}}, ["b", "d"]),
    ({"n": {"$ne": 3}}, ["a", "b", "d", "e", 6]),
    ({"n": {"$in": [1, 5, 99]}}, ["a", "e"]),
    ({"s": {"$nin": ["apple", "fig"]}}, ["b", "c", "d", "e"]),
    ({"x": {"$exists": True}}, ["a", "b", "d"]),
    ({"x": {"$exists": False}}, ["c", "e", 6]),
    ({"nested.w": {"$exists": True}}, ["a", "b", "d"]),
    ({"opt": None}, ["a", "b", "d", "e", 6]),
    ({"opt": {"$ne": None}}, ["c"]),
    ({"nested.v": None}, ["e", 6]),
    ({"opt": {"$in": [None, 5]}}, ALL),
    ({"$or": [{"n": 1}, {"s": "date"}]}, ["a", "d"]),
    ({"$and": [{"n": {"$gt": 1}}, {"n": {"$lt": 3}}]}, ["b"]),
    ({"$nor": [{"n": {"$gt": 1}}]}, ["a"]),
    ({"flag": True}, ["a", "d"]),
    ({"flag": {"$ne": True}}, ["b", "c", "e", 6]),
    ({"lu": {"$gt": T0 + DAY}}, ["c", "d", "e", 6]),
    ({"lu": {"$gte": T0 + DAY, "$lt": T0 + 3 * DAY}}, ["b", "c"]),
    ({"lu": T_LAST}, [6]),
    ({"lu": {"$in": [T0, T_LAST]}}, ["a", 6]),
    # arrays: Mongo matches any element
    ({"tags": "red"}, ["a", "d"]),
    ({"tags": {"$in": ["green", "blue"]}}, ["a", "b"]),
    ({"tags": {"$ne": "red"}}, ["b", "c", "e", 6]),
    ({"items.k": 3}, ["b"]),
    ({"items.k": {"$gt": 1}}, ["a", "b"]),
    ({"items.0.k": 1}, ["a"]),
    # operators left to the Python fallback
    ({"tags": {"$size": 0}}, ["c"]),
    ({"tags": {"$all": ["red", "blue"]}}, ["a"]),
    ({"items": {"$elemMatch": {"k": {"$gte": 2}}}}, ["a", "b"]),
    ({"x": {"$type": "double"}}, ["a", "b", "d"]),
    ({"nested": {"v": 10, "w": "p"}}, ["a"]),
    ({"n": {"$gt": 1}, "tags": {"$size": 1}}, ["b", "d"]),
    # regular expressions
    ({"s": {"$regex": "^[a-c]"}}, ["a", "b", "c"]),
    ({"s": {"$regex": "^e", "$options": "i"}}, ["e"]),
    ({"s": re.compile("an")}, ["b"]),
    ({"s": {"$not": {"$regex": "a"}}}, ["c", "e", 6]),
    ({"tags": {"$regex": "^gr"}}, ["b"]),
    # the store key
    ({"task_id": "c"}, ["c"]),
    ({"task_id": 6}, [6]),
    ({"task_id": "6"}, []),
    ({"task_id": {"$in": ["a", 6, "zz"]}}, ["a", 6]),
    ({"task_id": {"$nin": ["a", "b"]}}, ["c", "d", "e", 6]),
    ({"task_id": {"$gt": "c"}}, ["d", "e"]),
]


@pytest.mark.parametrize(("criteria", "expected"), CRITERIA, ids=[repr(c) for c, _ in CRITERIA])
def test_query_criteria_match_memory_store(both, criteria: dict, expected: list) -> None:
    found = ids(both.query(criteria=copy.deepcopy(criteria)))
    assert sorted(found, key=str) == sorted(expected, key=str)
    assert both.count(copy.deepcopy(criteria)) == len(expected)


SORTS = [
    ({"n": 1}, ["a", "b", "c", "d", "e", 6]),
    ({"n": -1}, [6, "e", "d", "c", "b", "a"]),
    ({"n": Sort.Descending}, [6, "e", "d", "c", "b", "a"]),
    ({"s": 1}, ["e", "a", "b", "c", "d", 6]),
    ({"lu": -1}, [6, "e", "d", "c", "b", "a"]),
    ({"x": 1}, ["c", "e", 6, "b", "d", "a"]),
    ({"flag": 1, "n": -1}, [6, "e", "c", "b", "d", "a"]),
    ({"group": Sort.Ascending, "sub": -1, "n": 1}, [6, "b", "a", "d", "c", "e"]),
    ({"nested.v": -1}, ["d", "c", "b", "a", "e", 6]),
    ({"items.0.k": -1}, ["b", "a", "c", "d", "e", 6]),
]


@pytest.mark.parametrize(("sort", "expected"), SORTS, ids=[repr(s) for s, _ in SORTS])
def test_sort_matches_memory_store(both, sort: dict, expected: list) -> None:
    assert ids(both.query(sort=sort)) == expected


def test_skip_and_limit(both) -> None:
    assert ids(both.query(sort={"n": 1}, skip=2, limit=2)) == ["c", "d"]
    assert ids(both.query(sort={"n": 1}, skip=4)) == ["e", 6]
    assert ids(both.query(sort={"n": -1}, limit=1)) == [6]
    assert both.query_one({"n": {"$gt": 3}}, sort={"n": 1})["task_id"] == "d"


@pytest.mark.parametrize(
    ("properties", "expected"),
    [
        (["s"], [{"s": "apple"}, {"s": "date"}]),
        (
            {"s": 1, "nested.v": 1},
            [{"s": "apple", "nested": {"v": 10}}, {"s": "date", "nested": {"v": 40}}],
        ),
        (["items.k", "n"], [{"n": 1, "items": [{"k": 1}, {"k": 2}]}, {"n": 4}]),
        (
            {"tags": 0, "items": 0, "lu": 0, "nested": 0, "_id": 0},
            [
                {
                    "task_id": "a",
                    "n": 1,
                    "x": 1.5,
                    "s": "apple",
                    "flag": True,
                    "opt": None,
                    "group": "g1",
                    "sub": 1,
                },
                {
                    "task_id": "d",
                    "n": 4,
                    "x": 0.25,
                    "s": "date",
                    "flag": True,
                    "group": "g1",
                    "sub": 1,
                },
            ],
        ),
        ([], [DOCS[0], DOCS[3]]),
    ],
)
def test_projection_matches_memory_store(both, properties: Any, expected: list) -> None:
    found = clean(both.query({"flag": True}, properties=properties, sort={"n": 1}))
    assert found == expected


def test_projection_cannot_mix_inclusion_and_exclusion(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="mix"):
        list(store.query(properties={"s": 1, "n": 0}))


@pytest.mark.parametrize(
    ("field", "criteria", "expected"),
    [
        ("s", None, ["Elder", "apple", "banana", "cherry", "date", "fig"]),
        ("tags", None, ["blue", "green", "red"]),
        ("nested.w", None, ["p", "q"]),
        ("items.k", None, [1, 2, 3]),
        ("opt", None, [None, 5]),
        ("n", {"n": {"$gt": 3}}, [4, 5, 6]),
        ("task_id", {"flag": True}, ["a", "d"]),
        ("lu", {"n": {"$lte": 2}}, [T0, T0 + DAY]),
    ],
)
def test_distinct_matches_memory_store(both, field: str, criteria: Any, expected: list) -> None:
    assert sorted(both.distinct(field, criteria), key=repr) == sorted(expected, key=repr)


def test_groupby_matches_memory_store(both) -> None:
    groups = [(key, clean(docs)) for key, docs in both.groupby("nested.w")]
    assert groups == [
        ({"nested": {"w": "p"}}, [{"nested": {"w": "p"}}, {"nested": {"w": "p"}}]),
        ({"nested": {"w": "q"}}, [{"nested": {"w": "q"}}]),
    ]
    groups = [
        (key, ids(docs))
        for key, docs in both.groupby(
            ["group", "sub"], properties=["task_id"], criteria={"n": {"$lt": 6}}
        )
    ]
    assert groups == [
        ({"group": "g1", "sub": 1}, ["a", "d"]),
        ({"group": "g1", "sub": 2}, ["b"]),
        ({"group": "g2", "sub": 1}, ["c", "e"]),
    ]


def test_groupby_skip_limit_and_sort_within_groups(store: SQLiteStore) -> None:
    groups = list(store.groupby("group", properties=["n"], sort={"n": -1}, skip=1, limit=1))
    assert groups == [({"group": "g2"}, [{"group": "g2", "n": 5}, {"group": "g2", "n": 3}])]


def test_update_with_key_list_matches_memory_store(both) -> None:
    both.update({"task_id": "z", "group": "g2", "sub": 1, "n": 100}, key=["group", "sub"])
    assert both.count() == 6
    assert both.query_one({"task_id": "z"})["n"] == 100
    assert both.count({"task_id": "c"}) == 0  # c was the first document with g2/1
    both.update({"task_id": "y", "group": "g3", "sub": 1}, key="group")
    assert both.count() == 7


def test_last_updated_and_newer_in(tmp_path: Path) -> None:
    old = new_store(tmp_path / "old.db", last_updated_field="lu")
    new = new_store(tmp_path / "new.db", last_updated_field="lu")
    old.update([{"task_id": i, "lu": T0} for i in range(3)])
    new.update([{"task_id": i, "lu": T0 + DAY * (i % 2)} for i in range(4)])
    assert old.last_updated == T0
    assert new.last_updated == T0 + DAY
    assert sorted(old.newer_in(new)) == [1, 3]
    assert sorted(old.newer_in(new, exhaustive=True)) == [1, 3]


# --------------------------------------------------------------------------- lifecycle


def test_connect_close_reconnect(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "sub" / "dir" / "s.db")
    with pytest.raises(StoreError):
        list(store.query())
    with pytest.raises(StoreError):
        store._collection  # noqa: B018
    store.connect()
    assert isinstance(store._collection, sqlite3.Connection)
    assert (tmp_path / "sub" / "dir" / "s.db").is_file()
    store.update({"task_id": 1, "v": "kept"})
    store.connect()  # already connected: a no-op
    store.connect(force_reset=True)
    assert store.query_one()["v"] == "kept"
    store.close()
    store.close()  # closing twice is harmless
    with pytest.raises(StoreError):
        store.count()
    with store:
        assert store.count() == 1
    with pytest.raises(StoreError):
        store.count()


def test_persistence_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"
    with SQLiteStore(path, collection_name="one") as store:
        store.update([{"task_id": i, "sq": i * i} for i in range(50)])
        assert store.ensure_index("sq")
    with SQLiteStore(str(path), collection_name="one") as again:
        assert again.count() == 50
        assert again.query_one({"sq": 49})["task_id"] == 7
    with SQLiteStore(path, collection_name="two") as other:  # same file, other table
        assert other.count() == 0


def test_name_equality_and_hash(tmp_path: Path) -> None:
    a = SQLiteStore(tmp_path / "x.db", collection_name="c")
    b = SQLiteStore(str(tmp_path / "x.db"), collection_name="c")
    assert a == b
    assert hash(a) == hash(b)
    assert a != SQLiteStore(tmp_path / "x.db", collection_name="d")
    assert a != SQLiteStore(tmp_path / "x.db", collection_name="c", key="digest")
    assert a != MemoryStore("c")
    assert a.name == f"sqlite://{tmp_path / 'x.db'}/c"


def test_as_dict_from_dict_and_dict_spec(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "spec.db", collection_name="entries", key="digest", timeout=5)
    spec = store.as_dict()
    assert spec["@module"] == "jobflow_cache.sqlite_store"
    assert spec["@class"] == "SQLiteStore"
    assert spec["path"] == str(tmp_path / "spec.db")
    assert SQLiteStore.from_dict(spec) == store
    assert SQLiteStore.from_dict(json.loads(json.dumps(spec))).timeout == 5

    decoded = MontyDecoder().process_decoded(
        {
            "@module": "jobflow_cache.sqlite_store",
            "@class": "SQLiteStore",
            "path": str(tmp_path / "spec.db"),
            "collection_name": "entries",
            "key": "digest",
            "last_updated_type": "isoformat",
        }
    )
    assert isinstance(decoded, SQLiteStore)
    assert decoded == store
    with decoded:
        decoded.update({"digest": "abc", "v": 1})
        assert decoded.query_one({"digest": "abc"})["v"] == 1
    assert SQLiteStore.from_dict(decoded.as_dict()).last_updated_type == decoded.last_updated_type

    clone = pickle.loads(pickle.dumps(store))
    assert clone == store
    with pytest.raises(StoreError):
        clone.count()  # unpickled stores start disconnected


def test_key_mismatch_on_existing_collection(tmp_path: Path) -> None:
    with SQLiteStore(tmp_path / "k.db", key="digest") as store:
        store.update({"digest": "x"})
    with pytest.raises(StoreUnavailableError, match="key field 'digest'"):
        SQLiteStore(tmp_path / "k.db", key="task_id").connect()


@pytest.mark.parametrize("bad", ["", ":memory:", "file:x.db?mode=ro"])
def test_invalid_paths(bad: str) -> None:
    with pytest.raises(ValueError):
        SQLiteStore(bad)


def test_unwritable_location_raises_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreUnavailableError, match="cannot open") as info:
        SQLiteStore(blocker / "cache.db").connect()
    assert isinstance(info.value.__cause__, OSError | sqlite3.Error)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder_raises_store_unavailable(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StoreUnavailableError):
            SQLiteStore(folder / "cache.db").connect()
    finally:
        folder.chmod(0o700)


def test_non_sqlite_file_raises_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("this is a text file, not a database\n" * 100)
    with pytest.raises(StoreUnavailableError, match="SQLite") as info:
        SQLiteStore(path).connect()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert path.read_text().startswith("this is a text file")  # left untouched


# --------------------------------------------------------------------------- encoding


def test_round_trip_of_values(store: SQLiteStore) -> None:
    import numpy as np

    doc = {
        "task_id": "values",
        "unicode": 'Grüße, 世界 \u2603 "quoted" \\ back',
        "big": 2**62 + 1,
        "neg": -(2**63),
        "float": 0.1 + 0.2,
        "tiny": 5e-324,
        "nan": float("nan"),
        "inf": [float("inf"), float("-inf")],
        "bytes": b"\x00\xffraw",
        "tuple": (1, "two"),
        "array": np.arange(3),
        "nested": {"deep": {"deeper": [{"x": None}, [], {}]}},
        "bool": False,
        "none": None,
        "7": "numeric field name",
    }
    store.update(doc)
    back = store.query_one({"task_id": "values"})
    assert back["unicode"] == doc["unicode"]
    assert back["big"] == 2**62 + 1
    assert back["neg"] == -(2**63)
    assert back["float"] == 0.1 + 0.2
    assert back["tiny"] == 5e-324
    assert math.isnan(back["nan"])
    assert back["inf"] == [float("inf"), float("-inf")]
    assert back["bytes"] == b"\x00\xffraw"
    assert back["tuple"] == [1, "two"]
    assert back["array"] == [0, 1, 2]
    assert back["nested"] == doc["nested"]
    assert back["bool"] is False
    assert back["none"] is None
    assert back["7"] == "numeric field name"


JSON_LIKE = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.datetimes(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.tuples(children, children)
        | st.dictionaries(
            st.text(max_size=5).filter(lambda k: not k.startswith("$")) | st.integers(0, 9),
            children,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(value=JSON_LIKE)
def test_encoding_skips_jsanitize_only_when_it_changes_nothing(value: Any) -> None:
    doc = {"task_id": "k", "value": value}
    arrays_fast: set[str] = set()
    arrays_slow: set[str] = set()
    assert _dumps(doc, arrays_fast) == _encode(_sanitize(doc), arrays_slow)
    assert arrays_fast == arrays_slow
    back = _loads(_dumps(doc))
    assert _dumps(back) == _dumps(doc)  # decoding then encoding is stable


def test_non_plain_values_are_sanitised_like_mongo_store(store: SQLiteStore) -> None:
    import numpy as np

    class Colour(Enum):
        RED = "red"

    doc = {
        "task_id": "odd",
        1: "int key",
        "np": np.float64(2.5),
        "path": Path("/x/y"),
        "colour": Colour.RED,
        "store": MemoryStore("inner"),
        "set": {3},
    }
    store.update(doc)
    back = store.query_one({"task_id": "odd"})
    assert back == {**_sanitize(doc), "task_id": "odd"}
    assert back["1"] == "int key"
    assert back["np"] == 2.5
    assert back["store"]["@class"] == "MemoryStore"


def test_validator(tmp_path: Path) -> None:
    from jsonschema import ValidationError
    from maggma.validators import JSONSchemaValidator

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    lenient = new_store(tmp_path / "v.db", validator=JSONSchemaValidator(schema))
    lenient.update([{"task_id": 1, "n": 1}, {"task_id": 2, "n": "not an int"}])
    assert ids(lenient.query()) == [1]
    assert not lenient.insert_if_absent({"task_id": 3})
    strict = new_store(tmp_path / "v.db", validator=JSONSchemaValidator(schema, strict=True))
    with pytest.raises(ValidationError):  # what a strict validator raises in MongoStore too
        strict.update({"task_id": 4, "n": 1.5})
    assert strict.count() == 1
    assert SQLiteStore.from_dict(strict.as_dict()).validator.strict
    lenient.close()
    strict.close()


def test_keys_keep_their_type(tmp_path: Path) -> None:
    store = new_store(tmp_path / "keys.db")
    store.update([{"task_id": 1, "v": "int"}, {"task_id": "1", "v": "str"}])
    assert store.count() == 2
    assert store.query_one({"task_id": 1})["v"] == "int"
    assert store.query_one({"task_id": "1"})["v"] == "str"
    assert store.query_one({"task_id": 1.0})["v"] == "int"
    assert sorted(store.distinct("task_id"), key=str) == [1, "1"]
    with pytest.raises(KeyError):
        store.update({"v": "no key"})
    for bad in (True, 1.5, None, ["list"]):
        with pytest.raises(TypeError):
            store.update({"task_id": bad})
    assert store.count() == 2


def test_reserved_keys_are_rejected(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="reserved"):
        store.update({"task_id": "r", "when": {"$date": "2024-01-01"}})
    assert store.count({"task_id": "r"}) == 0


def test_datetime_round_trip_encoding_and_ranges(tmp_path: Path) -> None:
    store = new_store(tmp_path / "dt.db")
    naive = datetime(2024, 3, 1, 12, 30, 45, 123456)
    aware = datetime(2024, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    early = datetime(1, 1, 1)
    store.update(
        [
            {"task_id": "naive", "t": naive},
            {"task_id": "aware", "t": aware},
            {"task_id": "early", "t": early},
            {"task_id": "text", "t": "2024-03-01T13:00:00"},
        ]
    )
    assert store.query_one({"task_id": "naive"})["t"] == naive  # microseconds kept
    back = store.query_one({"task_id": "aware"})["t"]
    assert back == datetime(2024, 3, 1, 12, 0)  # naive UTC, like pymongo
    assert back.tzinfo is None
    assert store.query_one({"task_id": "early"})["t"] == early

    raw = store._collection.execute(
        'SELECT doc FROM "cache" WHERE key = ?', ('"naive"',)
    ).fetchone()[0]
    assert '"t":{"$date":"2024-03-01T12:30:45.123456Z"}' in raw

    found = ids(store.query({"t": {"$gte": datetime(2024, 3, 1, 12), "$lt": datetime(2024, 3, 2)}}))
    assert sorted(found) == ["aware", "naive"]  # the string is never compared to dates
    utc_bound = datetime(2024, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=1)))
    assert ids(store.query({"t": {"$lte": utc_bound}}, sort={"t": 1})) == ["early", "aware"]
    assert ids(store.query({"t": aware})) == ["aware"]
    assert ids(store.query(sort={"t": -1})) == ["naive", "aware", "early", "text"]


def test_mongo_type_bracketing(store: SQLiteStore) -> None:
    # MongoDB never equates a boolean with a number (mongomock does: a known divergence)
    assert store.count({"flag": 1}) == 0
    assert store.count({"n": True}) == 0
    assert store.count({"n": 1.0}) == 1
    assert store.count({"s": {"$gt": 5}}) == 0
    assert store.count({"n": {"$gt": "a"}}) == 0
    store.update({"task_id": "text-array", "tags": '["red"]'})
    assert ids(store.query({"tags": '["red"]'})) == ["text-array"]


def test_field_names_needing_quotes(tmp_path: Path) -> None:
    store = new_store(tmp_path / "q.db", collection_name="we\"ird 'name'")
    store.update({"task_id": "q", "it's": 1, "sp ace": {"a-b": 2}, "dot": 3})
    assert store.count({"it's": 1}) == 1
    assert store.count({"sp ace.a-b": 2}) == 1
    assert store.ensure_index("it's")
    assert store.distinct("sp ace.a-b") == [2]
    assert ids(store.query({"it's": {"$gte": 1}}, sort={"it's": -1})) == ["q"]


# --------------------------------------------------------------------------- writes


def test_update_replaces_whole_document(store: SQLiteStore) -> None:
    store.update({"task_id": "a", "only": "this"})
    assert clean([store.query_one({"task_id": "a"})]) == [{"task_id": "a", "only": "this"}]
    assert store.count() == len(DOCS)


def test_remove_docs(store: SQLiteStore) -> None:
    store.remove_docs({"n": {"$gte": 5}})
    assert sorted(ids(store.query())) == ["a", "b", "c", "d"]
    store.remove_docs({"tags": {"$size": 1}})  # Python fallback inside DELETE
    assert sorted(ids(store.query())) == ["a", "c"]
    store.remove_docs({})
    assert store.count() == 0


def test_ensure_index_is_used_and_unique_is_enforced(store: SQLiteStore) -> None:
    assert store.ensure_index("task_id")  # the primary key
    assert store.ensure_index("nested.v")
    assert store.ensure_index("nested.v")  # already there
    assert store.ensure_index("lu")
    conn = store._collection
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"cache:nested.v", "cache:lu"} <= names

    assert "USING INDEX cache:nested.v (<expr>=? AND <expr>=?)" in plan(store, {"nested.v": 20})
    assert "USING INDEX cache:lu (<expr>=? AND <expr>>?)" in plan(store, {"lu": {"$gt": T0}})
    assert "USING INDEX cache:lu" in plan(store, sort={"lu": -1})
    assert "sqlite_autoindex_cache_1" in plan(store, {"task_id": "a"})
    assert store.query_one({"nested.v": 20})["task_id"] == "b"

    assert not store.ensure_index("group", unique=True)  # duplicates already stored
    assert store.ensure_index("s", unique=True)
    with pytest.raises(sqlite3.IntegrityError):
        store.update([{"task_id": "new", "s": "fresh"}, {"task_id": "dup", "s": "apple"}])
    assert store.count({"task_id": {"$in": ["new", "dup"]}}) == 0  # the batch rolled back
    assert not store.ensure_index("items.0.k")  # not addressable in SQL
    assert store.ensure_index("nested.v")  # already there (and statistics are kept)
    stat_tables = "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_stat1'"
    assert conn.execute(stat_tables).fetchone()[0] == 0  # too small to need statistics


def test_statistics_follow_the_table_size(tmp_path: Path) -> None:
    store = new_store(tmp_path / "stats.db")
    assert store.ensure_index("lu")
    store.update([{"task_id": i, "lu": T0 + i * DAY} for i in range(1200)])
    assert store.ensure_index("n")  # a new index on a big table: analyzed at once
    conn = store._collection
    stats = dict(conn.execute("SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'cache'"))
    assert stats["cache:lu"].split()[0] == "1200"
    assert "USING INDEX cache:lu" in plan(store, {"lu": {"$gte": T0}}, sort={"lu": 1})
    store.close()


def plan(store: SQLiteStore, criteria: dict | None = None, sort: dict | None = None) -> str:
    """SQLite's query plan for a query, as one line."""
    conn = store._collection
    compiled = store._compile(criteria, store._probe(conn))
    order = store._order_by(list((sort or {}).items()))
    sql = f'SELECT doc FROM "cache" WHERE {compiled.where}{order}'
    rows = conn.execute("EXPLAIN QUERY PLAN " + sql, compiled.params).fetchall()
    return " | ".join(row[-1] for row in rows)


def test_array_paths_are_recorded_and_honoured(tmp_path: Path) -> None:
    store = new_store(tmp_path / "arrays.db")
    store.update([{"task_id": i, "name": f"n{i}", "meta": {"kind": i % 3}} for i in range(20)])
    assert store.ensure_index("name")
    assert store.ensure_index("meta.kind")
    # no document ever held an array there: plain SQL, served by the index
    assert (
        plan(store, {"name": "n3"}) == "SEARCH cache USING INDEX cache:name (<expr>=? AND <expr>=?)"
    )
    store.update({"task_id": "list", "name": ["n3", "other"], "meta": [{"kind": 1}]})
    assert set(ids(store.query({"name": "n3"}))) == {3, "list"}
    assert set(ids(store.query({"meta.kind": 1}))) == {1, 4, 7, 10, 13, 16, 19, "list"}
    assert "MULTI-INDEX OR" in plan(store, {"name": "n3"})  # arrays: the matcher joins in
    store.remove_docs({"task_id": "list"})
    assert store.count({"name": "n3"}) == 1
    # recorded in the file: a fresh store (as in another process) sees them too
    with SQLiteStore(tmp_path / "arrays.db") as fresh:
        assert "MULTI-INDEX OR" in plan(fresh, {"name": "n3"})
        assert plan(fresh, {"task_id": 3}).startswith("SEARCH cache USING INDEX sqlite_autoindex")
    store.close()


def test_plan_is_rebuilt_when_another_writer_adds_arrays(tmp_path: Path) -> None:
    reader = new_store(tmp_path / "race.db")
    writer = new_store(tmp_path / "race.db")  # separate connections, as another process
    reader.update([{"task_id": i, "tag": "x" if i % 2 else "y"} for i in range(10)])
    pending = reader.query({"tag": "x"})  # planned now: no arrays anywhere yet
    counted = reader.count({"tag": "x"})
    writer.update({"task_id": "late", "tag": ["x", "z"]})  # commits before the read runs
    assert counted == 5
    assert set(ids(pending)) == {1, 3, 5, 7, 9, "late"}
    reader.close()
    writer.close()


def test_increment(store: SQLiteStore) -> None:
    assert store.increment("a", {"n": 10, "hits": 1})
    assert store.increment("a", {"hits": 2, "x": 0.1}, set_fields={"lu": T_LAST, "meta.by": "me"})
    doc = store.query_one({"task_id": "a"})
    assert doc["n"] == 11
    assert doc["hits"] == 3
    assert doc["x"] == 1.5 + 0.1  # exact binary float, not 15 digits
    assert doc["lu"] == T_LAST
    assert doc["meta"] == {"by": "me"}
    assert doc["tags"] == ["red", "blue"]  # the rest is untouched
    assert store.increment(6, {"stats.hits": 1})
    assert store.query_one({"task_id": 6})["stats"] == {"hits": 1}
    assert store.increment("b", {}, set_fields={"tags": ["new"], "note": "set only"})
    assert store.query_one({"tags": "new"})["note"] == "set only"
    assert not store.increment("missing", {"hits": 1})
    assert store.count({"task_id": "missing"}) == 0
    with pytest.raises(TypeError, match="not a number"):
        store.increment("a", {"s": 1})
    with pytest.raises(TypeError, match="not an object"):
        store.increment("a", {"n.deeper": 1})
    with pytest.raises(TypeError):
        store.increment("a", {"hits": True})
    with pytest.raises(ValueError):
        store.increment("a", {"task_id": 1})
    with pytest.raises(ValueError):
        store.increment("a", {"hits": 1}, set_fields={"hits": 0})
    assert store.query_one({"task_id": "a"})["hits"] == 3


def test_increment_many_is_one_transaction_of_increments(store: SQLiteStore) -> None:
    before = {d["task_id"]: d for d in store.query()}
    found = store.increment_many(
        [
            ("a", {"hits": 1}, {"lu": T_LAST}),
            ("a", {"hits": 2}, None),  # the same document twice: both count
            (6, {"stats.hits": 1}, None),
            ("missing", {"hits": 1}, None),
            ("b", {}, {"note": "set only"}),
            ("c", {}, None),  # nothing to change: only whether it exists
        ]
    )
    assert found == [True, True, True, False, True, True]
    assert store.query_one({"task_id": "a"})["hits"] == before["a"].get("hits", 0) + 3
    assert store.query_one({"task_id": "a"})["lu"] == T_LAST
    assert store.query_one({"task_id": 6})["stats"] == {"hits": 1}
    assert store.query_one({"task_id": "b"})["note"] == "set only"
    assert store.count({"task_id": "missing"}) == 0
    # one bad update: nothing of the batch is written
    with pytest.raises(TypeError, match="not a number"):
        store.increment_many([("a", {"hits": 1}, None), ("a", {"s": 1}, None)])
    assert store.query_one({"task_id": "a"})["hits"] == before["a"].get("hits", 0) + 3
    with pytest.raises(ValueError):
        store.increment_many([("a", {"task_id": 1}, None)])


def test_increment_in_sql_falls_back_to_exact_python_sums(store: SQLiteStore) -> None:
    """Integer amounts on integer fields are summed in SQL; anything else is read back and
    summed exactly in Python, with the same checks."""
    big = 2**62 - 1
    store.update({"task_id": "n", "i": 1, "r": 1.5, "s": "text", "big": big, "obj": {"k": 1}})
    assert store.increment_many([("n", {"i": 2}, None), ("n", {"r": 1}, None)]) == [True, True]
    assert store.increment("n", {"big": 2})
    assert store.increment("n", {"fresh": 3}, {"when": T_LAST})
    doc = store.query_key("n")
    assert (doc["i"], doc["r"], doc["big"], doc["fresh"]) == (3, 2.5, big + 2, 3)
    assert type(doc["i"]) is int
    assert type(doc["big"]) is int
    assert doc["when"] == T_LAST
    for field in ("s", "obj"):
        with pytest.raises(TypeError, match="not a number"):
            store.increment("n", {field: 1})
    assert store.query_key("n")["s"] == "text"


def test_increment_statements_are_reused_for_the_same_fields(store: SQLiteStore) -> None:
    for _ in range(3):
        store.increment("a", {"hits": 1}, {"lu": T_LAST})
    store.increment("a", {"n": 1})
    assert len(store._increment_statements) == 2
    assert store.query_one({"task_id": "a"})["hits"] == DOCS[0].get("hits", 0) + 3


def test_query_key_reads_one_document_by_key(store: SQLiteStore) -> None:
    for doc in store.query():
        assert store.query_key(doc["task_id"]) == doc
    full = store.query_one({"task_id": "a"})
    assert store.query_key("a", leave_out=["tags", "nested", "absent"]) == {
        k: v for k, v in full.items() if k not in ("tags", "nested")
    }
    assert store.query_key("missing") is None
    assert store.query_key("6") is None  # the int key 6 is not the str "6"
    exact = {"task_id": "x", "f": 0.1 + 0.2, "big": 2**62, "neg": -0.0, "s": "é\u2028"}
    store.update({**exact, "drop": {"deep": [1.5, float("nan")]}})
    got = store.query_key("x", leave_out=["drop"])
    assert got == exact
    assert math.copysign(1, got["neg"]) == -1
    assert math.isnan(store.query_key("x")["drop"]["deep"][1])


def test_insert_if_absent(store: SQLiteStore) -> None:
    assert store.insert_if_absent({"task_id": "new", "v": 1})
    assert not store.insert_if_absent({"task_id": "new", "v": 2})
    assert not store.insert_if_absent({"task_id": "a", "v": 3})
    assert store.query_one({"task_id": "new"})["v"] == 1
    assert store.query_one({"task_id": "a"})["s"] == "apple"


def test_fallback_errors_are_reported(store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="cannot evaluate"):
        list(store.query({"n": {"$bogus": 1}}))
    with pytest.raises(ValueError, match="non-empty"):
        store.count({"$or": []})
    with pytest.raises(ValueError, match="cannot evaluate"):
        store.count({"s": {"$regex": "(unclosed"}})
    with pytest.raises(TypeError):
        list(store.query(["not", "a", "dict"]))  # type: ignore[arg-type]


def test_query_streams_and_tolerates_writes_while_iterating(tmp_path: Path) -> None:
    store = new_store(tmp_path / "stream.db")
    store.update([{"task_id": i, "v": 0} for i in range(1500)])
    other = new_store(tmp_path / "stream.db")  # a second writer, as from another process
    cursor = store.query(sort={"task_id": 1})
    first = next(cursor)
    assert first["task_id"] == 0
    seen = 1
    for doc in cursor:
        other.update({"task_id": 10_000 + seen, "v": 1})
        store.update({"task_id": doc["task_id"], "v": 2})
        seen += 1
    assert seen == 1500  # the snapshot did not change under the cursor
    assert store.count({"v": 2}) == 1499
    assert store.count() == 1500 + 1499
    other.close()
    store.close()


# --------------------------------------------------------------------------- processes, threads

READER = """
import json, sys
from jobflow_cache.sqlite_store import SQLiteStore
with SQLiteStore(sys.argv[1], key="digest") as store:
    doc = store.query_one({"digest": sys.argv[2]})
    doc["when"] = doc["when"].isoformat()
    print(json.dumps(doc))
    store.update({"digest": "from-child", "when": doc["when"], "n": doc["n"] + 1})
"""


def test_fresh_process_reads_and_writes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    with SQLiteStore(path, key="digest") as store:
        store.update({"digest": "d1", "n": 41, "when": datetime(2024, 2, 3, 4, 5, 6, 7)})
    result = subprocess.run(
        [sys.executable, "-c", READER, str(path), "d1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(result.stdout) == {
        "digest": "d1",
        "n": 41,
        "when": "2024-02-03T04:05:06.000007",
    }
    with SQLiteStore(path, key="digest") as store:
        assert store.query_one({"digest": "from-child"})["n"] == 42


WORKER = """
import json, os, sys, time
from jobflow_cache.sqlite_store import SQLiteStore
path, worker, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
store = SQLiteStore(path)
while not os.path.exists(go):
    time.sleep(0.005)
store.connect()  # all workers create the file and its schema at the same time
inserted = store.insert_if_absent({"task_id": "shared", "hits": 0, "by": worker})
increments = 0
for i in range(200):
    store.update({"task_id": f"w{worker}-{i}", "worker": worker, "i": i, "payload": "x" * i})
    if i % 8 == 0:
        increments += store.increment("shared", {"hits": 1})
store.close()
print(json.dumps({"inserted": inserted, "increments": increments}))
"""


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "concurrent.db"  # does not exist yet: creation races too
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(worker), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(8)
    ]
    go.touch()
    outputs = [proc.communicate(timeout=180) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert err == ""
    results = [json.loads(out) for out, _ in outputs]
    assert sum(r["inserted"] for r in results) == 1
    assert all(r["increments"] == 25 for r in results)

    with SQLiteStore(path) as store:
        assert store.count() == 8 * 200 + 1
        assert store.query_one({"task_id": "shared"})["hits"] == 8 * 25
        for doc in store.query({"task_id": {"$ne": "shared"}}):
            worker, i = doc["worker"], doc["i"]
            assert doc == {
                "task_id": f"w{worker}-{i}",
                "worker": worker,
                "i": i,
                "payload": "x" * i,
            }
        assert sorted(store.distinct("worker")) == list(range(8))
        check = store._collection.execute("PRAGMA integrity_check").fetchone()[0]
        assert check == "ok"


def test_threads_share_a_store(tmp_path: Path) -> None:
    store = new_store(tmp_path / "threads.db")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(100):
                store.update({"task_id": f"{t}-{i}", "t": t})
                store.increment(f"{t}-0", {"hits": 1})
                assert store.count({"t": t}) == i + 1
                assert sum(1 for _ in store.query({"t": t}, properties=["t"])) == i + 1
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.count() == 800
    assert [store.query_one({"task_id": f"{t}-0"})["hits"] for t in range(8)] == [100] * 8
    store.close()


def _forked_child(store: SQLiteStore) -> None:
    # the inherited connections belong to the parent: the store must reconnect by itself
    store.update({"task_id": "child", "pid": os.getpid()})
    assert store.count() == 2
    os._exit(0)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="no fork")
def test_reconnects_after_fork(tmp_path: Path) -> None:
    store = new_store(tmp_path / "fork.db")
    store.update({"task_id": "parent"})
    process = multiprocessing.get_context("fork").Process(target=_forked_child, args=(store,))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    child = store.query_one({"task_id": "child"})
    assert child["pid"] == process.pid
    store.update({"task_id": "after"})
    assert store.count() == 3
    store.close()


# -- network file systems -------------------------------------------------------------------------
def test_file_system_type_picks_the_nearest_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/export {tmp_path}/shared nfs4 rw 0 0\n"
        f"/dev/sdb1 {tmp_path}/shared/local ext4 rw 0 0\n"
    )
    (tmp_path / "shared" / "local").mkdir(parents=True)
    assert sqlite_store.file_system_type(tmp_path / "shared/cache/x.db", str(mounts)) == "nfs4"
    assert sqlite_store.file_system_type(tmp_path / "shared/local/x.db", str(mounts)) == "ext4"
    assert sqlite_store.file_system_type(tmp_path / "sharedx/x.db", str(mounts)) == "ext4"


@pytest.mark.warnings_logged
def test_store_on_a_network_file_system_warns_and_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # a real mount table file naming tmp_path an NFS mount: NFS itself cannot be mounted here
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs rw 0 0\n")
    monkeypatch.setattr("jobflow_cache.backends.sqlite_file.MOUNTS", str(mounts))
    with SQLiteStore(tmp_path / "cache.db", key="digest") as store:
        store.update([{"digest": "a", "n": 1}])
        assert store.query_one({"digest": "a"})["n"] == 1
    warned = [r.getMessage() for r in caplog.records if "nfs file system" in r.getMessage()]
    assert len(warned) == 1
    assert "PostgreSQL or MongoDB" in warned[0]
