"""PostgresStore against a real PostgreSQL server: the maggma Store contract checked against
MemoryStore (mongomock), real cache entries from real flows, claims and aliases under threads
and processes, the CLI, fork safety and an unreachable or restarting server."""

from __future__ import annotations

import copy
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jobflow import Flow, JobStore
from maggma.core import Sort, StoreError
from maggma.stores import MemoryStore

from jobflow_cache import (
    CacheEntry,
    CacheStore,
    CacheWarning,
    PostgresStore,
    StoreUnavailableError,
    run_locally,
    store_from_spec,
)
from jobflow_cache.backends.postgres import PostgresBackend
from jobflow_cache.cli import cli
from jobflow_cache.docstore import UNREADABLE
from jobflow_cache.entry import document_checksum
from jobflow_cache.postgres_store import _nor_for_not
from jobflow_cache.store import Outcome
from tests.conftest import ROOT
from tests.support import jobs
from tests.support.pgserver import PrivateCluster, drop_tables
from tests.test_sqlite_store import CRITERIA, DOCS, SORTS, T0, ids

pytestmark = pytest.mark.postgres

DAY = timedelta(days=1)


def clean(docs: Any) -> list[dict]:
    return [{k: v for k, v in d.items() if k != "_id"} for d in docs]


@pytest.fixture
def pair(make_pg_store, tmp_path):
    """A PostgresStore and a MemoryStore holding the same DOCS (key ``task_id``)."""
    pg = make_pg_store(key="task_id", last_updated_field="lu")
    mem = MemoryStore(
        collection_name=f"mem-{tmp_path.name}", key="task_id", last_updated_field="lu"
    )
    mem.connect()
    for store in (pg, mem):
        store.update(copy.deepcopy(DOCS))
    yield pg, mem
    mem.close()


# --------------------------------------------------------------------------- contract, parity


@pytest.mark.parametrize(("criteria", "expected"), CRITERIA, ids=[repr(c) for c, _ in CRITERIA])
def test_query_criteria_match_memory_store(pair, criteria: dict, expected: list) -> None:
    pg, mem = pair
    found = ids(pg.query(criteria=copy.deepcopy(criteria)))
    assert sorted(found, key=str) == sorted(expected, key=str)
    assert sorted(found, key=str) == sorted(ids(mem.query(copy.deepcopy(criteria))), key=str)
    assert pg.count(copy.deepcopy(criteria)) == len(expected)


@pytest.mark.parametrize(("sort", "expected"), SORTS, ids=[repr(s) for s, _ in SORTS])
def test_sort_matches_memory_store(pair, sort: dict, expected: list) -> None:
    pg, mem = pair
    assert ids(pg.query(sort=sort)) == expected == ids(mem.query(sort=sort))


def test_skip_limit_projection_distinct_groupby(pair) -> None:
    pg, mem = pair
    for store in (pg, mem):
        assert ids(store.query(sort={"n": 1}, skip=2, limit=2)) == ["c", "d"]
        assert ids(store.query(sort={"n": 1}, skip=4)) == ["e", 6]
        assert store.query_one({"n": {"$gt": 3}}, sort={"n": 1})["task_id"] == "d"
    for properties in (["s"], {"s": 1, "nested.v": 1}, ["items.k", "n"], ["opt", "x"], {"tags": 0}):
        assert clean(pg.query({"n": {"$lt": 4}}, properties, sort={"n": 1})) == clean(
            mem.query({"n": {"$lt": 4}}, properties, sort={"n": 1})
        ), properties
    # a top-level projection picked by the server keeps fields holding null
    assert list(pg.query({"task_id": "a"}, ["opt", "missing"])) == [{"opt": None}]
    for field, criteria in [
        ("s", None),
        ("tags", None),
        ("nested.w", None),
        ("items.k", None),
        ("opt", None),
        ("task_id", {"flag": True}),
        ("lu", {"n": {"$lte": 2}}),
        ("tags", {"tags": {"$size": 1}}),
    ]:
        assert sorted(pg.distinct(field, criteria), key=repr) == sorted(
            mem.distinct(field, criteria), key=repr
        ), field
    groups = [
        (key, ids(docs))
        for key, docs in pg.groupby(
            ["group", "sub"], properties=["task_id"], criteria={"n": {"$lt": 6}}
        )
    ]
    assert groups == [
        ({"group": "g1", "sub": 1}, ["a", "d"]),
        ({"group": "g1", "sub": 2}, ["b"]),
        ({"group": "g2", "sub": 1}, ["c", "e"]),
    ]


def test_update_with_key_list_and_remove_docs_match_memory_store(pair) -> None:
    for store in pair:
        store.update({"task_id": "z", "group": "g2", "sub": 1, "n": 100}, key=["group", "sub"])
        assert store.count() == 6
        assert store.query_one({"task_id": "z"})["n"] == 100
        assert store.count({"task_id": "c"}) == 0  # c was the first document with g2/1
        store.remove_docs({"tags": {"$size": 1}})  # checked in Python
        store.remove_docs({"n": {"$gte": 5}})  # SQL
    assert sorted(ids(pair[0].query()), key=str) == sorted(ids(pair[1].query()), key=str)


def test_last_updated_and_newer_in(pair) -> None:
    pg, mem = pair
    assert pg.last_updated == mem.last_updated == T0 + 5 * DAY + timedelta(milliseconds=123)
    assert pg.newer_in(mem) == []


# --------------------------------------------------------------------------- hypothesis parity

SCALARS = (
    st.integers(-3, 3)
    | st.sampled_from([0.5, -1.5, 2.0, 1e20])
    | st.sampled_from(["a", "ab", "B", "b", "", "Ab"])
    | st.none()
    | st.sampled_from([T0, T0 + DAY, T0 + timedelta(milliseconds=7)])
)
VALUES = SCALARS | st.lists(SCALARS, max_size=3)
SUBDOCS = st.dictionaries(st.sampled_from(["d", "e"]), VALUES, max_size=2)
DOC = st.fixed_dictionaries(
    {},
    optional={
        "a": VALUES,
        "b": VALUES,
        "c": SUBDOCS | st.lists(SUBDOCS | SCALARS, max_size=3) | SCALARS,
    },
)
FIELDS = st.sampled_from(["a", "b", "c.d", "c.e", "c"])
OPERATORS = st.sampled_from(["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"])
CONDITION = st.one_of(
    SCALARS,
    st.builds(lambda op, v: {op: v}, OPERATORS, SCALARS),
    st.builds(lambda v: {"$in": v}, st.lists(SCALARS, max_size=3)),
    st.builds(lambda v: {"$nin": v}, st.lists(SCALARS, max_size=3)),
    st.builds(lambda v: {"$exists": v}, st.booleans()),
    st.sampled_from([{"$regex": "^a"}, {"$regex": "b"}, {"$regex": "^A", "$options": "i"}]),
    st.builds(lambda lo, hi: {"$gt": lo, "$lte": hi}, SCALARS, SCALARS),
    st.builds(lambda v: {"$not": {"$gt": v}}, SCALARS),
    st.sampled_from([{"$size": 1}, {"$elemMatch": {"$gt": 0}}, {"$type": "string"}]),
)
LEAF = st.dictionaries(FIELDS, CONDITION, min_size=1, max_size=2)
CRITERIA_STRATEGY = st.recursive(
    LEAF,
    lambda children: st.builds(
        lambda op, subs: {op: subs},
        st.sampled_from(["$or", "$and", "$nor"]),
        st.lists(children, min_size=1, max_size=3),
    ),
    max_leaves=4,
)


@pytest.fixture
def scratch(make_pg_store) -> PostgresStore:
    """One store (key ``task_id``) that every example of a hypothesis test empties and refills."""
    return make_pg_store(key="task_id")


HYPOTHESIS = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(HYPOTHESIS, max_examples=150)
@given(docs=st.lists(DOC, max_size=6), criteria=CRITERIA_STRATEGY)
def test_random_criteria_match_memory_store(scratch, docs: list[dict], criteria: dict) -> None:
    """Random documents (arrays, sub-documents, mixed types, dates) and random criteria: the
    same documents match as in mongomock, in SQL or in the Python check."""
    store = scratch
    mem = MemoryStore(key="task_id")
    mem.connect()
    docs = [{"task_id": i, **doc} for i, doc in enumerate(docs)]
    store.remove_docs({})
    for target in (store, mem):
        if docs:
            target.update(copy.deepcopy(docs))
    # mongomock's $not is wrong on empty arrays and scalars above the field: ask for the $nor
    expected = sorted(ids(mem.query(_nor_for_not(copy.deepcopy(criteria)))))
    assert sorted(ids(store.query(copy.deepcopy(criteria)))) == expected, store._compile(criteria)
    assert store.count(copy.deepcopy(criteria)) == len(expected)


SORTABLE = (
    st.integers(-3, 3)
    | st.sampled_from([0.5, -1.5, 1e20, float("inf")])
    | st.sampled_from(["a", "ab", "B", "b", "", "é", "Z"])
    | st.none()
    | st.booleans()
    | st.sampled_from([T0, T0 + DAY])
)


@settings(HYPOTHESIS, max_examples=60)
@given(values=st.lists(SORTABLE, max_size=8), direction=st.sampled_from([1, -1]))
def test_random_sorts_follow_bson_order(scratch, values: list, direction: int) -> None:
    store = scratch
    mem = MemoryStore(key="task_id")
    mem.connect()
    docs = [{"task_id": i, "v": v} for i, v in enumerate(values)]
    docs.append({"task_id": len(values)})  # missing sorts with null
    store.remove_docs({})
    for target in (store, mem):
        target.update(copy.deepcopy(docs))
    # mongomock sorts booleans among numbers; MongoDB (and this store) after dates... keep
    # the comparison to the type classes they agree on
    if not any(isinstance(v, bool) for v in values):
        assert ids(store.query(sort={"v": direction})) == ids(mem.query(sort={"v": direction}))
    got = [d.get("v") for d in store.query(sort={"v": direction})]
    assert got == sorted(got, key=_bson_key, reverse=direction < 0)


def _bson_key(value: Any) -> tuple:
    if value is None:
        return (1, 0)
    if isinstance(value, bool):
        return (8, value)
    if isinstance(value, int | float):
        return (2, value)
    if isinstance(value, str):
        return (3, value.encode())
    return (9, value)


# --------------------------------------------------------------------------- values and types


def test_round_trip_of_values(pg_store: PostgresStore) -> None:
    import numpy as np

    doc = {
        "digest": "values",
        "unicode": 'Grüße, 世界 \u2603 "quoted" \\ back \n\t',
        "nul": "a\x00bé",
        "big": 2**62 + 1,
        "neg": -(2**63),
        "float": 0.1 + 0.2,
        "whole": 3.0,
        "huge": 1e300,
        "large": 1.5e16,
        "negzero": -0.0,
        "tiny": 5e-324,
        "nan": float("nan"),
        "inf": [float("inf"), float("-inf")],
        "bytes": b"\x00\xffraw",
        "tuple": (1, "two"),
        "array": np.arange(3),
        "nested": {"deep": {"deeper": [{"x": None}, [], {}]}},
        "bool": False,
        "none": None,
        "when": datetime(2024, 3, 1, 12, 30, 45, 123456),
        "aware": datetime(2024, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))),
        "7": "numeric field name",
        "$dollar.dot": 1,
    }
    pg_store.update(doc)
    back = pg_store.query_key("values")
    assert math.isnan(back.pop("nan"))
    assert back == {k: v for k, v in pg_store.query_one({"digest": "values"}).items() if k != "nan"}
    for key in ("unicode", "nul", "big", "neg", "float", "tiny", "bytes", "nested", "7", "when"):
        assert back[key] == doc[key], key
    for key in ("whole", "huge", "large", "negzero", "float"):
        assert (type(back[key]), back[key]) == (float, doc[key]), key
    assert math.copysign(1, back["negzero"]) == -1
    assert type(back["big"]) is int
    assert back["inf"] == [float("inf"), float("-inf")]
    assert back["tuple"] == [1, "two"]
    assert back["array"] == [0, 1, 2]
    assert back["bool"] is False
    assert back["none"] is None
    assert back["aware"] == datetime(2024, 3, 1, 12, 0)
    assert back["aware"].tzinfo is None
    assert back["$dollar.dot"] == 1
    # the tagged values still compare as what they are
    assert pg_store.count({"whole": 3}) == pg_store.count({"large": {"$gt": 1e16}}) == 1
    assert pg_store.count({"huge": {"$lt": float("inf")}}) == 1
    assert pg_store.count({"nan": float("nan")}) == 1
    assert pg_store.count({"nan": {"$lt": 0}}) == pg_store.count({"nan": {"$gt": 0}}) == 0
    assert pg_store.count({"negzero": 0}) == 1
    assert pg_store.count({"inf": float("-inf")}) == 1
    assert pg_store.count({"bytes": b"\x00\xffraw"}) == 1
    assert pg_store.count({"when": {"$gt": datetime(2024, 3, 1, 12, 30, 45, 123455)}}) == 1
    assert pg_store.count({"when": {"$gt": datetime(2024, 3, 1, 12, 30, 45, 123456)}}) == 0
    with pytest.raises(ValueError, match="reserved"):
        pg_store.update({"digest": "bad", "x": {"$date": "2024"}})
    with pytest.raises(TypeError, match="str or an int"):
        pg_store.update({"digest": 1.5})
    with pytest.raises(KeyError):
        pg_store.update({"other": 1})


def test_keys_keep_their_type_and_prefix_regex_is_a_key_range(make_pg_store) -> None:
    store = make_pg_store(key="task_id")
    store.update([{"task_id": 1, "v": "int"}, {"task_id": "1", "v": "str"}])
    assert store.query_one({"task_id": 1})["v"] == "int"
    assert store.query_one({"task_id": "1"})["v"] == "str"
    assert store.query_one({"task_id": 1.0})["v"] == "int"
    assert store.count({"task_id": True}) == 0
    store.update([{"task_id": f"{i:04x}ab", "i": i} for i in range(300)])
    where = store._compile({"task_id": {"$regex": "^00f"}})
    assert where.exact
    assert "key >= %s AND key < %s" in where.sql
    assert ids(store.query({"task_id": {"$regex": "^00f"}})) == [f"00f{i:x}ab" for i in range(16)]
    assert store.count({"task_id": {"$regex": "^00f[0-3]"}}) == 4  # range, then Python
    assert not store._compile({"task_id": {"$regex": "^00f[0-3]"}}).exact
    assert store.count({"task_id": {"$regex": "ab$"}}) == 300


def test_strings_sort_and_compare_by_code_point_whatever_the_collation(pg_store) -> None:
    """The private test cluster uses an ICU en-US collation where 'Elder' > 'apple'."""
    words = ["apple", "Elder", "éclair", "Zebra", "_x", "a b", "ab"]
    pg_store.update([{"digest": w, "w": w, "long": w * 60} for w in words])
    assert [d["w"] for d in pg_store.query(sort={"w": 1})] == sorted(words)
    assert [d["w"] for d in pg_store.query(sort={"long": -1})] == sorted(words, reverse=True)
    assert {d["w"] for d in pg_store.query({"w": {"$lt": "a"}})} == {"Elder", "Zebra", "_x"}
    assert {d["w"] for d in pg_store.query({"long": {"$gte": "ab" * 60}})} == {
        w for w in words if w * 60 >= "ab" * 60
    }
    assert pg_store.count({"long": "Zebra" * 60}) == 1
    assert pg_store.count({"long": {"$in": ["Zebra" * 60, "x"]}}) == 1


def test_increment(pg_store: PostgresStore) -> None:
    pg_store.update([{"digest": "x", "hits": 1}, {"digest": "y", "hits": 1.5, "s": "t"}])
    when = datetime(2024, 5, 1, 1, 2, 3, 456789)
    assert pg_store.increment("x", {"hits": 2}, {"last_hit": when}) is True
    assert pg_store.increment("missing", {"hits": 1}) is False
    assert pg_store.increment("y", {"hits": 1, "new.deep": 2}) is True  # Python path
    assert pg_store.increment("x", {"f": 0.1}) is True
    assert pg_store.increment("x", {"f": 0.2}) is True
    x, y = pg_store.query_key("x"), pg_store.query_key("y")
    assert (x["hits"], x["last_hit"], type(x["hits"])) == (3, when, int)
    assert x["f"] == 0.1 + 0.2  # float sums as MongoDB's, not decimal ones
    assert y["hits"] == 2.5
    assert y["new"] == {"deep": 2}
    with pytest.raises(TypeError, match="number"):
        pg_store.increment("y", {"s": 1})
    with pytest.raises(TypeError, match="parent"):
        pg_store.increment("y", {"s.deeper": 1})
    with pytest.raises(ValueError, match="overlap"):
        pg_store.increment("y", {"a": 1}, {"a.b": 2})
    with pytest.raises(ValueError):
        pg_store.increment("y", {"digest": 1})
    # a batch is written whole or not at all
    with pytest.raises(TypeError):
        pg_store.increment_many([("x", {"hits": 1}, None), ("y", {"s": 1}, None)])
    assert pg_store.query_key("x")["hits"] == 3
    assert pg_store.increment_many(
        [("x", {"hits": 1}, None), ("nope", {"hits": 1}, None), ("y", {"hits": 1}, None)]
    ) == [True, False, True]
    assert pg_store.totals({"n": [], "hits": ["hits"]}) == {"n": 2.0, "hits": 7.5}


def test_concurrent_increments_all_count(pg_store: PostgresStore) -> None:
    pg_store.update({"digest": "c", "hits": 0})

    def bump() -> None:
        for _ in range(25):
            pg_store.increment("c", {"hits": 1})

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pg_store.query_key("c")["hits"] == 200


def test_value_counts_totals_and_query_key(pg_store: PostgresStore) -> None:
    docs = [{"digest": f"d{i}", "f": "ab"[i % 3 == 0], "n": i, "ok": i > 1} for i in range(5)]
    docs.append({"digest": "d5", "f": None, "n": 1.0})
    docs.append({"digest": "d6", "big": list(range(5)), "n": "text"})
    pg_store.update(docs)
    assert pg_store.value_counts("f") == [("a", 3), (None, 2), ("b", 2)]
    assert pg_store.value_counts("n", {"f": "a"}) == [(1, 1), (2, 1), (4, 1)]
    assert pg_store.value_counts("f", {"big": {"$size": 5}}) == [(None, 1)]  # Python check
    totals = pg_store.totals({"docs": [], "n": ["n"], "ok": ["ok"], "n_ok": ["n", "ok"]})
    assert totals == {"docs": 7.0, "n": 11.0, "ok": 3.0, "n_ok": 9.0}
    assert pg_store.totals({"n": ["n"]}, {"big": {"$size": 5}}) == {"n": 0.0}
    assert pg_store.query_key("d6", leave_out=["big"]) == {"digest": "d6", "n": "text"}
    assert pg_store.query_key("nope") is None
    assert pg_store.query_key(1.5) is None


def test_ensure_index_is_used_by_queries_and_sorts(pg_store: PostgresStore) -> None:
    """Entries' listing queries read the expression indexes (plans from the server)."""
    created = datetime(2024, 1, 1)
    pg_store.update(
        [
            {
                "digest": f"{i:032x}",
                "function": f"m:f{i % 50}",
                "created": created + timedelta(minutes=i),
                "last_hit": None if i % 2 else created,
                "hits": i % 7,
            }
            for i in range(3000)
        ]
    )
    for field in ("function", "created", "last_hit", "hits"):
        assert pg_store.ensure_index(field)
    assert pg_store.ensure_index("created")  # known: nothing to do
    assert pg_store.ensure_index("digest", unique=True)
    state = pg_store._state_or_raise()
    with state.pool.connection() as conn:
        conn.execute(f'ANALYZE "{pg_store.table}"')

    def plan(criteria: dict, sort: dict | None = None, limit: int = 20) -> str:
        where = pg_store._compile(criteria)
        sql = (
            f'EXPLAIN SELECT doc FROM "{pg_store.table}" WHERE {where.sql}'
            f"{pg_store._order_by(list((sort or {}).items()))} LIMIT {limit}"
        )
        with state.pool.connection() as conn:
            return "\n".join(row[0] for row in conn.execute(sql, where.params))

    assert "_pkey" in plan({"digest": {"$regex": "^00000000000000000000000000000a"}})
    assert "Index Scan Backward" in plan({}, {"created": -1})
    assert "__created_" in plan({"created": {"$gte": created + timedelta(minutes=2990)}})
    assert "__function_" in plan({"function": "m:f7"}, limit=100)
    assert "__hits_" in plan({}, {"hits": -1})
    found = list(pg_store.query({}, ["digest", "created"], sort={"created": -1}, limit=3))
    assert [d["created"] for d in found] == [
        created + timedelta(minutes=m) for m in (2999, 2998, 2997)
    ]


def test_unique_index(pg_store: PostgresStore) -> None:
    pg_store.update([{"digest": "a", "u": 1}, {"digest": "b", "u": 2}, {"digest": "c"}])
    assert pg_store.ensure_index("u", unique=True)
    pg_store.update({"digest": "d"})  # missing: exempt
    with pytest.raises(Exception, match="duplicate key"):
        pg_store.update({"digest": "e", "u": 1.0})
    pg_store.update({"digest": "f", "v": 1})
    pg_store.update({"digest": "g", "v": 1})
    assert pg_store.ensure_index("v", unique=True) is False
    assert pg_store.ensure_index("a.0.b") is False  # numeric components cannot be indexed
    assert pg_store.ensure_index("x" * 100)  # a long name fits PostgreSQL's 63 bytes


def test_bad_criteria_raise_at_once(pg_store: PostgresStore) -> None:
    with pytest.raises(TypeError):
        pg_store.query(criteria=["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\$or"):
        pg_store.query({"$or": []})
    with pytest.raises(ValueError, match="skip"):
        pg_store.query(skip=-1)
    pg_store.update({"digest": "a", "v": 1})
    with pytest.raises(ValueError, match="cannot evaluate"):
        list(pg_store.query({"v": {"$bogus": 1}}))


# --------------------------------------------------------------------------- identity, spec


def test_as_dict_from_dict_specs_and_errors(postgres_uri: str, pg_table: str) -> None:
    store = PostgresStore(postgres_uri, table=pg_table, key="digest", pool_size=2, validator=None)
    again = PostgresStore.from_dict(store.as_dict())
    assert again == store
    assert hash(again) == hash(store)
    assert again.pool_size == 2
    assert (
        store_from_spec({"type": "PostgresStore", "uri": postgres_uri, "table": pg_table}) == store
    )
    assert store_from_spec(json.loads(json.dumps(store.as_dict()))) == store
    assert store != PostgresStore(postgres_uri, table=pg_table + "x")
    secret = PostgresStore("postgresql://u:s3cret@h:5/db")
    assert "s3cret" not in repr(secret)
    assert "s3cret" not in secret.name
    assert secret.name == "postgresql://u@h:5/db/jobflow_cache"
    with pytest.raises(StoreError, match="not connected"):
        store.count()
    for bad in ({"uri": ""}, {"uri": "x", "table": "t" * 49}, {"uri": "x", "pool_size": 0}):
        with pytest.raises(ValueError):
            PostgresStore(**bad)  # type: ignore[arg-type]
    store.connect()
    with pytest.raises(StoreUnavailableError, match="key 'other'"):
        PostgresStore(postgres_uri, table=pg_table, key="other").connect()
    store.close()
    store.close()


def test_a_table_not_made_by_the_store_is_refused(postgres_uri: str, pg_table: str) -> None:
    import psycopg

    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        for suffix in ("", "_claims", "_aliases"):
            conn.execute(f'CREATE TABLE "{pg_table}{suffix}" (x int)')
    with pytest.raises(StoreUnavailableError, match="not made by PostgresStore"):
        PostgresStore(postgres_uri, table=pg_table).connect()


def test_module_imports_without_psycopg(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['psycopg'] = None\n"
        "sys.modules['psycopg_pool'] = None\n"
        "import jobflow_cache\n"
        "store = jobflow_cache.PostgresStore('postgresql://u@127.0.0.1:1/db')\n"
        "try:\n"
        "    store.connect()\n"
        "except jobflow_cache.StoreUnavailableError as err:\n"
        "    print(err)\n"
    )
    out = _python(code)
    assert "pip install 'jobflow-cache[postgres]'" in out


# --------------------------------------------------------------------------- real cache entries


def chain() -> Flow:
    a = jobs.add(1, 2)
    b = jobs.mul(a.output, 10)
    big = jobs.add("x" * 100_000, "y")  # output over PACK_MIN: stored compressed
    return Flow([a, b, jobs.add(b.output, a.output), big, jobs.make_replace(40)])


def test_real_flows_round_trip_through_the_cache(
    pg_store: PostgresStore, counts, tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    cache = CacheStore(pg_store, tmp_path / "objects")
    store = JobStore(MemoryStore())
    first = Flow([chain(), jobs.write_files("pg", 3)])
    run_locally(first, store=store, cache=cache, log=False, create_folders=True, root_dir=root,
                ensure_success=True)  # fmt: skip
    cold = dict(counts())
    assert cold == {"add": 43, "mul": 1, "make_replace": 1, "write_files": 1}
    entries = list(cache.find())
    assert len(entries) == cache.count() == 46
    for doc in entries:  # stored exactly as sealed: the raw checksum matches
        assert document_checksum(doc) == doc["checksum"], doc["name"]
        entry = CacheEntry.from_document(doc)
        assert entry.to_document() == doc
        assert isinstance(doc["created"], datetime)
        assert cache.lookup(doc["digest"]).outcome is Outcome.HIT
    packed = [d for d in entries if "packed" in d]
    assert [d["name"] for d in packed] == ["add"]

    second = Flow([chain(), jobs.write_files("pg", 3)])  # all-new uuids
    run_locally(second, store=store, cache=cache, log=False, create_folders=True, root_dir=root,
                ensure_success=True)  # fmt: skip
    assert counts() == cold, "nothing may execute on the second run"
    responses = [store.get_output(j.uuid, which="last", load=True) for j in second[0]]
    assert responses[:4] == [3, 30, 33, "x" * 100_000 + "y"]
    assert sum(d["hits"] for d in cache.find()) == 46
    last_hits = [d["last_hit"] for d in cache.find({"last_hit": {"$ne": None}})]
    assert len(last_hits) == 46
    assert all(isinstance(t, datetime) for t in last_hits)


def test_cachetool_ls_show_stats_verify_on_postgres(
    make_pg_store, postgres_uri: str, counts, tmp_path: Path
) -> None:
    store = make_pg_store()
    objects = tmp_path / "objects"
    cache = CacheStore(store, objects)
    root = tmp_path / "runs"
    root.mkdir()
    for tag in ("one", "two"):
        run_locally(Flow([jobs.add(1, 2), jobs.write_files(tag, 2)]), store=JobStore(MemoryStore()),
                    cache=cache, log=False, create_folders=True, root_dir=root)  # fmt: skip
    assert counts() == {"add": 1, "write_files": 2}
    spec = json.dumps({"type": "PostgresStore", "uri": postgres_uri, "table": store.table})
    base = ["--store", spec, "--objects-dir", str(objects)]

    def run(*args: str) -> Any:
        result = CliRunner().invoke(cli, [*base, *args])
        assert result.exit_code == 0, (result.output, result.exception)
        return json.loads(result.stdout) if "--json" in args else result.stdout

    rows = run("ls", "--json")
    assert [r["name"] for r in rows] == ["write_files", "write_files", "add"]  # newest first
    assert [r["hits"] for r in rows] == [0, 0, 1]
    assert [r["name"] for r in run("ls", "--name", "write*", "--json")] == ["write_files"] * 2
    assert len(run("ls", "--limit", "1", "--json")) == 1
    digest = rows[2]["digest"]
    shown = run("show", digest[:8], "--json")
    assert (shown["digest"], shown["output"], shown["status"]) == (digest, "3", "served on a hit")
    stats = run("stats", "--json")
    assert (stats["entries"], stats["hits"], stats["invalid"]) == (3, 1, 0)
    assert stats["functions"] == {"tests.support.jobs:write_files": 2, "tests.support.jobs:add": 1}
    assert run("verify", "--json")["sound"] is True
    # the cache (and the CLI, from the spec) keep the entries in PostgresBackend's tables on
    # the store's table name (<table>__e, __p, ...; PostgresStore's table was migrated away)
    backend = PostgresBackend(postgres_uri, table=store.table)
    try:
        doc = backend.read(digest)
        assert doc is not None
        assert doc["output"] == "3"
        doc["output"] = "4"  # tampered: never served, reported
        backend.write([doc])
    finally:
        backend.close()
    result = CliRunner().invoke(cli, [*base, "verify", "--json"])
    assert result.exit_code == 1
    assert [p["kind"] for p in json.loads(result.stdout)["problems"]] == ["checksum"]


# --------------------------------------------------------------------------- claims and aliases


def test_claim_release_renew_and_expiry(pg_store: PostgresStore) -> None:
    assert pg_store.claim("job", "a", 30) == "a"
    assert pg_store.claim("job", "b", 30) == "a"
    assert pg_store.claim("job", "a", 30) == "a"  # the holder renews
    pg_store.release("job", "b")  # not the holder: nothing happens
    assert pg_store.claim("job", "b", 30) == "a"
    pg_store.release("job", "a")
    assert pg_store.claim("job", "b", 30) == "b"
    assert pg_store.claim("job", "c", 30) == "b"
    assert pg_store.claim("job", "b", 0) == "b"  # renewed with a lease that ends now
    assert pg_store.claim("job", "c", 1) == "c"  # an expired lease is taken over
    time.sleep(1.5)  # the lease runs out on the database's clock
    assert pg_store.claim("job", "d", 30) == "d"
    assert pg_store.claim("other", "b", 30) == "b"


def test_claims_under_threads_have_one_winner(make_pg_store) -> None:
    store = make_pg_store(pool_size=8)
    names = [f"n{i}" for i in range(30)]
    results: dict[str, list[str]] = {name: [] for name in names}
    barrier = threading.Barrier(8)

    def worker(me: str) -> None:
        barrier.wait()
        for name in names:
            results[name].append(store.claim(name, me, 30))

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, holders in results.items():
        assert len(set(holders)) == 1, (name, holders)  # everyone agrees on one winner


CLAIM_RACE = """
import json, os, sys, time
from jobflow_cache.postgres_store import PostgresStore
uri, table, me, go = sys.argv[1:5]
store = PostgresStore(uri, table=table)
store.connect()
while not os.path.exists(go):
    time.sleep(0.002)
print(json.dumps({f"n{i}": store.claim(f"n{i}", me, 30) for i in range(40)}))
"""


def spawn_together(code: str, args: list[list[str]], go: Path) -> list[str]:
    """Start one fresh Python process per argument list; release them at once; their stdouts."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *a],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for a in args
    ]
    time.sleep(0.5)
    go.touch()
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        outs.append(out)
    return outs


def test_claims_under_eight_processes_have_one_winner(
    postgres_uri: str, pg_store: PostgresStore, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    args = [[postgres_uri, pg_store.table, f"p{i}", str(go)] for i in range(8)]
    results = [json.loads(out) for out in spawn_together(CLAIM_RACE, args, go)]
    winners = Counter()
    for name in results[0]:
        holders = {r[name] for r in results}
        assert len(holders) == 1, (name, holders)
        winners[holders.pop()] += 1
    assert sum(winners.values()) == 40


def test_aliases(pg_store: PostgresStore) -> None:
    assert pg_store.get_aliases([]) == {}
    pg_store.set_aliases({"/runs/a": "d1", "/runs/b": "d2"})
    pg_store.set_aliases({"/runs/b": "d3"})  # last writer wins
    pg_store.set_aliases({})
    assert pg_store.get_aliases(["/runs/a", "/runs/b", "/runs/c"]) == {
        "/runs/a": "d1",
        "/runs/b": "d3",
    }


# --------------------------------------------------------------------------- processes, faults

WRITER = """
import json, sys
from maggma.stores import MemoryStore
from jobflow_cache import CacheEntry, CacheStore, PostgresStore
from jobflow_cache.hashing.canonical import SCHEME
from jobflow_cache.postgres_store import _nor_for_not
uri, table, me, go = sys.argv[1:5]
import os, time
cache = CacheStore(PostgresStore(uri, table=table), "/nonexistent-objects")
cache.connect()
while not os.path.exists(go):
    time.sleep(0.002)
shared = [f"{i:032x}" for i in range(40)]
own = [f"f{me}{i:029x}" for i in range(40)]
for start in range(0, 40, 10):
    cache.put_many([
        CacheEntry(digest=d, scheme=SCHEME, function="m:f", name=me, output=json.dumps([me] * 50))
        for d in shared[start : start + 10] + own[start : start + 10]
    ])
print("ok")
"""


def test_eight_writer_processes_lose_and_mix_nothing(
    postgres_uri: str, pg_store: PostgresStore, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    args = [[postgres_uri, pg_store.table, f"{i:02d}", str(go)] for i in range(8)]
    assert spawn_together(WRITER, args, go) == ["ok\n"] * 8
    cache = CacheStore(pg_store, tmp_path / "objects")
    docs = list(cache.find())
    assert len(docs) == len({d["digest"] for d in docs}) == 40 + 8 * 40
    for doc in docs:
        assert cache.lookup(doc["digest"]).outcome is Outcome.HIT  # whole, one writer each
        assert json.loads(doc["output"])[0] == doc["name"]


FORK = """
import os, sys
from jobflow_cache import PostgresStore
store = PostgresStore(sys.argv[1], table=sys.argv[2], pool_size=2)
store.connect()
store.update({"digest": "parent"})
pid = os.fork()
if pid == 0:  # the child opens its own pool, then exits normally (finalisers run)
    store.update({"digest": "child"})
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
store.update({"digest": "after"})  # the parent's connections still work
print(sorted(d["digest"] for d in store.query()))
"""


def test_fork_child_gets_its_own_connections(postgres_uri: str, pg_store: PostgresStore) -> None:
    out = _python(FORK, postgres_uri, pg_store.table)
    assert out.strip() == "['after', 'child', 'parent']"


def _python(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_raises_store_unavailable() -> None:
    store = PostgresStore(f"postgresql://u@127.0.0.1:{_closed_port()}/db", connect_timeout=2)
    with pytest.raises(StoreUnavailableError, match="cannot use the PostgreSQL store"):
        store.connect()
    with pytest.raises(StoreUnavailableError):
        CacheStore(store, "/tmp/unused-objects").connect()


def test_flow_runs_uncached_with_one_warning_when_the_server_is_unreachable(
    counts, tmp_path: Path
) -> None:
    store = PostgresStore(f"postgresql://u@127.0.0.1:{_closed_port()}/db", connect_timeout=2)
    flow = Flow([jobs.add(1, 2), jobs.add(3, 4)])
    job_store = JobStore(MemoryStore())
    with pytest.warns(CacheWarning, match="unavailable") as record:
        run_locally(flow, store=job_store, cache=CacheStore(store, tmp_path / "o"), log=False,
                    ensure_success=True)  # fmt: skip
    assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1
    assert [job_store.get_output(j.uuid, load=True) for j in flow] == [3, 7]
    assert counts() == {"add": 2}


def test_server_restart_and_outage(pg_cluster: PrivateCluster) -> None:
    store = PostgresStore(pg_cluster.uri, table="restart", pool_size=2, connect_timeout=2)
    store.connect()
    store.update({"digest": "a", "n": 1})
    pg_cluster.stop("immediate")  # every pooled connection breaks
    with pytest.raises(StoreUnavailableError):
        store.query_key("a")
    with pytest.raises(StoreUnavailableError):
        store.update({"digest": "b"})
    pg_cluster.start()
    deadline = time.monotonic() + 60
    while True:  # the pool reconnects by itself
        try:
            assert store.query_key("a") == {"digest": "a", "n": 1}
            break
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    store.update({"digest": "b"})
    assert store.count() == 2
    store.close()
    drop_tables(pg_cluster.uri, "restart")


def test_stale_connections_are_replaced_transparently(pg_cluster: PrivateCluster) -> None:
    store = PostgresStore(pg_cluster.uri, table="stale", pool_size=3)
    store.connect()
    store.update({"digest": "a"})
    pg_cluster.stop("fast")
    pg_cluster.start()
    assert store.query_key("a") == {"digest": "a"}  # retried on a fresh connection
    assert store.claim("x", "me", 10) == "me"
    store.close()


@pytest.mark.parametrize("criteria", [{"name": {"$regex": "^relax.*$"}}, {"created": {"$gte": T0}}])
def test_maintenance_criteria_are_exact_or_narrowed(pg_store, criteria: dict) -> None:
    """Glob filters narrow by their literal prefix (then Python decides); dates are SQL."""
    where = pg_store._compile(criteria)
    if "name" in criteria:
        assert not where.exact
        assert where.params[:2] == ["relax", "relay"]
    else:
        assert where.exact
    pg_store.update([{"digest": "1", "name": "relax2", "created": T0},
                     {"digest": "2", "name": "relaX", "created": T0 - DAY},
                     {"digest": "3", "name": "relax\n", "created": T0 + DAY}])  # fmt: skip
    expected = MemoryStore(key="digest")
    expected.connect()
    expected.update(list(pg_store.query()))
    assert sorted(ids_of(pg_store.query(criteria))) == sorted(ids_of(expected.query(criteria)))


def ids_of(docs: Any) -> list[str]:
    return [d["digest"] for d in docs]


def test_sort_directions_mixed_and_python_sorted(pair) -> None:
    pg, mem = pair
    for sort in ({"group": Sort.Ascending, "n": -1}, {"items.0.k": 1, "n": 1}):
        assert ids(pg.query(sort=sort)) == ids(mem.query(sort=sort))
    assert ids(pg.query({"tags": {"$size": 1}}, sort={"items.0.k": -1}, limit=1)) == ["b"]


def test_streaming_large_results_while_writing(pg_store: PostgresStore) -> None:
    pg_store.update([{"digest": f"{i:05d}", "i": i} for i in range(1500)])
    seen = 0
    for doc in pg_store.query(sort={"i": 1}):  # a server-side cursor, 256 rows at a time
        if seen % 500 == 0:
            pg_store.update({"digest": f"new{seen}", "i": -1})  # another pooled connection
        assert doc["i"] == seen
        seen += 1
    assert seen == 1500
    assert pg_store.count() == 1503


def test_regex_semantics_follow_python(pg_store: PostgresStore) -> None:
    words = ["relax", "relax2", "relaX", "a.b", "axb", "x\ny", "Relax"]
    pg_store.update([{"digest": str(i), "w": w} for i, w in enumerate(words)])
    for pattern, options in [("^rel", None), ("^relax.$", None), (r"a\.b", None), ("^x.y", None),
                             ("^RELAX$", "i"), ("y$", "m"), (re.compile("^R"), None)]:  # fmt: skip
        criteria: dict[str, Any] = {"w": {"$regex": pattern}}
        if options:
            criteria["w"]["$options"] = options
        flags = re.I if options == "i" else re.M if options == "m" else 0
        expected = {w for w in words if re.search(pattern, w, flags)}
        assert {d["w"] for d in pg_store.query(criteria)} == expected, criteria


def test_callable_fixture_names_are_stable(make_pg_store: Callable[..., PostgresStore]) -> None:
    """Other test modules import these fixtures: make_pg_store(table=..., connect=False)."""
    store = make_pg_store(table="jfc_named_table", connect=False)
    assert store._state is None
    assert store.table == "jfc_named_table"
    store.connect()
    assert store.count() == 0


def test_a_row_that_is_not_an_object_reads_back_as_a_stand_in(pg_store: PostgresStore) -> None:
    """A damaged row (JSON written by hand that is no object) never breaks the other rows: it
    reads back as a stand-in holding its key and why it is no document."""
    pg_store.update([{"digest": "a", "n": 1}, {"digest": "b", "n": 2}])
    with pg_store._state_or_raise().pool.connection() as conn:
        conn.execute(f'UPDATE "{pg_store.table}" SET doc = \'"text"\' WHERE key = \'"b"\'')
    stand_in = {"digest": "b", UNREADABLE: "the stored row is a JSON string"}
    assert pg_store.query_key("b", leave_out=["canonical_input"]) == stand_in
    assert list(pg_store.query({}, ["digest", "n"], sort={"n": 1})) == [
        stand_in,
        {"digest": "a", "n": 1},
    ]
    assert list(pg_store.query({}, sort={"n": 1})) == [stand_in, {"digest": "a", "n": 1}]
    assert pg_store.count({"n": {"$gte": 1}}) == 1
    with pytest.raises(TypeError, match="not a document"):
        pg_store.increment("b", {"n": 1})
