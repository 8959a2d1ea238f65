"""SQLiteBackend on real files: round trips (tampered documents too), projections, orders,
criteria (cross-checked against :func:`criteria.matches` on random documents), hit counts that
never touch the payloads, unreadable rows, fork, a file replaced mid-use, claims and aliases;
and, ported from 0.1.0's SQLiteStore, network file systems, unusable locations, streaming while
writing, and processes writing at once."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobflow_cache.backends import base, layout
from jobflow_cache.backends.base import UNREADABLE, Coordinator, EntryBackend, unreadable_reason
from jobflow_cache.backends.criteria import OPERATORS, Column, Compiler, matches
from jobflow_cache.backends.sqlite import FIELD_KINDS, PAYLOAD_FIELDS, SQLiteBackend
from jobflow_cache.backends.sqlite_file import file_system_type
from jobflow_cache.entry import CacheEntry
from jobflow_cache.errors import CacheWarning, StoreUnavailableError

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456)


def entry_doc(digest: str, **fields: Any) -> dict[str, Any]:
    """A real entry document (what CacheStore writes), with ``fields`` changed."""
    entry = CacheEntry(
        digest=digest,
        scheme="jfc1",
        function="pkg.mod:f",
        name="f",
        output='{"x": [1, 2.5, null]}',
        canonical_input={"a": 1},
        arg_digests={"a": "1" * 32},
        consumed=["u" * 32],
        created=T0,
        duration=1.5,
    )
    doc = entry.to_document()
    doc.update(fields)
    return doc


@pytest.fixture
def backend(tmp_path: Path):
    b = SQLiteBackend(tmp_path / "cache.sqlite")
    b.connect()
    yield b
    b.close()


def raw(b: SQLiteBackend) -> sqlite3.Connection:
    return sqlite3.connect(b.path, isolation_level=None)


def test_protocol_and_names(backend: SQLiteBackend, tmp_path: Path) -> None:
    assert isinstance(backend, EntryBackend)
    assert isinstance(backend.coordinator(), Coordinator)
    assert backend.name == f"sqlite://{tmp_path / 'cache.sqlite'}"
    assert backend.owned_paths() == [str(tmp_path / "cache.sqlite")]
    assert backend.thread_safe
    backend.connect()  # idempotent
    backend.close()
    backend.close()
    tables = {r[0] for r in raw(backend).execute("SELECT name FROM sqlite_master")}
    assert {"jfc_schema", "jfc_entries", "jfc_payloads", "jfc_consumed"} <= tables
    assert raw(backend).execute("SELECT version FROM jfc_schema").fetchall() == [(1,)]


def test_round_trip_of_a_real_entry(backend: SQLiteBackend) -> None:
    doc = entry_doc("a" * 32, hits=3, last_hit=T0 + timedelta(days=1))
    backend.write([doc])
    assert backend.read("a" * 32) == doc
    lean = backend.read("a" * 32, explain=False)
    assert lean == {k: v for k, v in doc.items() if k not in base.EXPLAIN_FIELDS}
    assert backend.read("b" * 32) is None
    # the large fields sit in the payload table, the selectable ones in columns
    conn = raw(backend)
    served = conn.execute("SELECT served FROM jfc_payloads").fetchone()[0]
    assert '"output"' in served
    small = conn.execute("SELECT doc, hits, valid, created FROM jfc_entries").fetchone()
    assert '"output"' not in small[0]
    assert small[1:] == (3, 1, "2024-05-01T12:00:00.123456Z")


@pytest.mark.parametrize(
    "tampered",
    [
        {"hits": "5", "valid": "yes", "created": "not a date", "maker": None},
        {"duration": 3, "files_size": True, "last_hit": 7, "name": ["x"]},
        {"hits": 2**70 // 2**7, "function": {"nested": 1}, "output": 5},
        {"valid": None, "hits": None, "invalid_reason": 0, "custom": {"a": [1, None]}},
    ],
)
def test_tampered_documents_round_trip(backend: SQLiteBackend, tampered: dict) -> None:
    doc = entry_doc("t" * 32, **tampered)
    backend.write([doc])
    assert backend.read("t" * 32) == doc
    for field in tampered:
        if field in FIELD_KINDS:  # a value not of its column's type counts as missing
            assert backend.count({field: None}) == 1, field


def test_absent_fields_stay_absent_and_hits_start_from_count(backend: SQLiteBackend) -> None:
    backend.write([{"digest": "d1", "function": "m:f"}, {"digest": "d2", "hits": "x"}])
    assert backend.read("d1") == {"digest": "d1", "function": "m:f"}
    backend.add_hits({"d1": (2, T0), "d2": (3, T0), "absent": (1, T0)})
    assert backend.read("d1") == {"digest": "d1", "function": "m:f", "hits": 2, "last_hit": T0}
    assert backend.read("d2") == {"digest": "d2", "hits": 3, "last_hit": T0}
    backend.add_hits({"d1": (1, T0 + timedelta(hours=1))})
    assert backend.read("d1")["hits"] == 3


def test_aware_datetimes_read_back_as_naive_utc(backend: SQLiteBackend) -> None:
    aware = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    backend.write([{"digest": "d", "created": aware}])
    assert backend.read("d") == {"digest": "d", "created": datetime(2024, 5, 1, 12, 0)}
    assert backend.count({"created": datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)}) == 1


@pytest.mark.parametrize(
    "bad",
    [{"when": T0}, {"data": b"x"}, {"x": float("nan")}, {"x": [float("inf")]}, {1: "int key"}],
)
def test_non_json_values_raise_type_error_and_write_nothing(
    backend: SQLiteBackend, bad: dict
) -> None:
    with pytest.raises(TypeError):
        backend.write([{"digest": "ok"}, {"digest": "bad", **bad}])
    assert backend.count() == 0


class _Float(float):
    pass


class _Dict(dict):
    pass


class _List(list):
    pass


def _non_finite_reference(obj: Any) -> bool:
    """The recursive form :func:`layout._non_finite` replaced (one call per value)."""
    if isinstance(obj, float):
        return obj != obj or obj in (float("inf"), float("-inf"))
    if isinstance(obj, dict):
        return any(_non_finite_reference(value) for value in obj.values())
    if isinstance(obj, list | tuple):
        return any(_non_finite_reference(value) for value in obj)
    return False


_FLOATS = st.floats(allow_nan=True, allow_infinity=True)
_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.text(max_size=4),
    _FLOATS,
    _FLOATS.map(_Float),
    st.binary(max_size=2),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.lists(inner, max_size=4).map(_List),
        st.dictionaries(st.text(max_size=3), inner, max_size=4),
        st.dictionaries(st.text(max_size=3), inner, max_size=4).map(_Dict),
    ),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(_VALUES)
def test_the_non_finite_check_is_the_recursive_one(value: Any) -> None:
    """The loop that tells a document holding NaN or an infinity (which orjson would write
    as null) answers as the recursive walk it replaced, on nested values of every kind."""
    assert layout._non_finite(value) is _non_finite_reference(value)
    assert layout._non_finite({"doc": value, "x": [1, "a", None]}) is _non_finite_reference(value)


def test_a_document_needs_a_str_digest(backend: SQLiteBackend) -> None:
    with pytest.raises(ValueError, match="digest"):
        backend.write([{"digest": 5}])
    with pytest.raises(ValueError, match="digest"):
        backend.write([{"function": "m:f"}])


def test_rewrite_replaces_the_whole_document(backend: SQLiteBackend) -> None:
    backend.write([entry_doc("a" * 32, consumed=["x", "y"])])
    backend.write([{"digest": "a" * 32, "name": "new", "consumed": ["z", 5, "z"]}])
    assert backend.read("a" * 32) == {"digest": "a" * 32, "name": "new", "consumed": ["z", 5, "z"]}
    assert list(backend.consumers()) == [("a" * 32, ["z"])]


def test_projection_joins_the_payloads_only_when_asked(backend: SQLiteBackend) -> None:
    doc = entry_doc("a" * 32, hits=4)
    backend.write([doc])
    statements: list[str] = []
    backend._reader().set_trace_callback(statements.append)
    assert list(backend.select(None, ["hits", "versions"])) == [
        {"digest": "a" * 32, "hits": 4, "versions": doc["versions"]}
    ]
    assert list(backend.select(None, ["digest"])) == [{"digest": "a" * 32}]
    assert not any("jfc_payloads" in s for s in statements)
    assert list(backend.select(None, ["output", "nothing"])) == [
        {"digest": "a" * 32, "output": doc["output"]}
    ]
    assert "jfc_payloads" in statements[-1]
    statements.clear()
    backend.read("a" * 32, explain=False)
    assert statements
    assert not any("explain" in s for s in statements)


def test_order_and_limit(backend: SQLiteBackend) -> None:
    backend.write(
        [
            {"digest": "a", "hits": 2, "created": T0},
            {"digest": "b", "hits": 5, "created": T0 - timedelta(days=1)},
            {"digest": "c", "created": T0 + timedelta(days=1)},
            {"digest": "d", "hits": 2, "created": T0 - timedelta(days=2)},
        ]
    )

    def digests(**kwargs: Any) -> list[str]:
        return [d["digest"] for d in backend.select(**kwargs)]

    assert digests(order={"hits": 1, "created": 1}) == ["c", "d", "a", "b"]  # missing first
    assert digests(order={"hits": -1, "created": -1}) == ["b", "a", "d", "c"]  # missing last
    assert digests(order={"created": 1}, limit=2) == ["d", "b"]
    assert digests(criteria={"hits": 2}, order={"digest": -1}) == ["d", "a"]
    with pytest.raises(ValueError, match="order"):
        digests(order={"hits": 2})
    with pytest.raises(ValueError, match="unknown field 'output'"):
        digests(order={"output": 1})


def test_criteria(backend: SQLiteBackend) -> None:
    backend.write(
        [
            {"digest": "3f2c01", "function": "m:relax", "valid": True, "hits": 1},
            {"digest": "3f2d02", "function": "m:static", "valid": False, "maker": "M"},
            {"digest": "a0", "function": "m:relax", "hits": 10, "last_hit": T0},
        ]
    )

    def digests(criteria: dict) -> list[str]:
        return sorted(d["digest"] for d in backend.select(criteria, ["digest"]))

    assert digests({"digest": {"$regex": "^3f2c"}}) == ["3f2c01"]
    assert digests({"function": {"$regex": "rel"}}) == ["3f2c01", "a0"]
    assert digests({"valid": {"$ne": False}}) == ["3f2c01", "a0"]
    assert digests({"maker": None}) == ["3f2c01", "a0"]
    assert digests({"hits": {"$gte": 1, "$lt": 10}}) == ["3f2c01"]
    assert digests({"hits": {"$gt": "1"}}) == []  # a string never compares with a number
    assert digests({"last_hit": {"$exists": True}}) == ["a0"]
    assert digests({"$or": [{"valid": False}, {"hits": {"$in": [10, None]}}]}) == [
        "3f2d02",
        "a0",
    ]
    assert digests({"function": {"$nin": ["m:static"]}, "digest": {"$ne": "a0"}}) == ["3f2c01"]
    assert backend.count({"last_hit": {"$lt": T0.replace(tzinfo=timezone.utc)}}) == 0
    # $nor counts a missing field as not matching (SQL's NULL must not make NOT unknown)
    assert backend.count({"$nor": [{"maker": "x"}]}) == backend.count()
    for bad, word in [
        ({"output": "x"}, "unknown field 'output'"),
        ({"hits": {"$size": 1}}, "unknown operator '\\$size'"),
        ({"$not": [{"hits": 1}]}, "unknown operator '\\$not'"),
        ({"name": {"$regex": "("}}, "bad \\$regex"),
        ({"hits": {"$in": 5}}, "takes a list"),
    ]:
        with pytest.raises(ValueError, match=word):
            backend.count(bad)


def test_a_digest_prefix_is_a_range() -> None:
    compiler = Compiler({"digest": Column("digest", "text")})
    assert compiler.where({"digest": {"$regex": "^3f2c"}}) == (
        "digest >= ? AND digest < ?",
        ["3f2c", "3f2d"],
    )
    assert compiler.where({"digest": {"$regex": "^3f.c"}})[0] == "regexp(?, digest)"
    pg = Compiler({"digest": ("digest", "text")}, param="%s", regexp="{value} ~ {pattern}")
    assert pg.where({"digest": {"$in": ["a", None]}}) == (
        "digest IN (%s) OR digest IS NULL",
        ["a"],
    )


# -- criteria against their Python semantics on random documents ------------------------------

KINDS = {name: FIELD_KINDS[name] for name in ("name", "maker", "hits", "duration", "valid")}
KINDS["created"] = "date"
COLUMNS = {name: (name, kind) for name, kind in {"digest": "text", **KINDS}.items()}
DATES = [
    datetime(2024, 1, 1),
    datetime(2024, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
    datetime(2024, 6, 1, 12, 30),
]
TYPED = {
    "text": st.text("abB\n", max_size=3),
    "int": st.integers(-3, 3),
    "real": st.sampled_from([-1.5, 0.0, 2.5, 3.0]),
    "bool": st.booleans(),
    "date": st.sampled_from(DATES),
}
# JSON values of every type (a datetime only where its column is a date: elsewhere it is no JSON)
JSON_VALUE = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.sampled_from([2.5, 3.0, -1.5]),
    st.booleans(),
    st.text("ab", max_size=3),
    st.just([1]),
)


def value_for(kind: str, operand: bool = False) -> st.SearchStrategy[Any]:
    other = st.one_of(JSON_VALUE, st.sampled_from(DATES)) if operand else JSON_VALUE
    return st.one_of(TYPED[kind], TYPED[kind], other)


@st.composite
def documents(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs = []
    for i in range(draw(st.integers(0, 8))):
        doc: dict[str, Any] = {"digest": draw(st.sampled_from(["a", "ab", "b", "ba"])) + str(i)}
        for field, kind in KINDS.items():
            if draw(st.booleans()):
                doc[field] = draw(value_for(kind))
        docs.append(doc)
    return docs


REGEXES = ["^a", "^ab", "b", "^", "a$", "^a.b", "^b\\d", "^a|b", "^A", "B$", "^[A-b]"]


@st.composite
def conditions(draw: st.DrawFn, field: str) -> Any:
    kind = COLUMNS[field][1]
    op = draw(st.sampled_from(["", *OPERATORS]))
    if op == "$regex":
        regex = {op: draw(st.sampled_from(REGEXES))}
        options = draw(st.sampled_from([None, "", "i", "m", "s", "ims"]))
        return regex if options is None else {**regex, "$options": options}
    if op == "$exists":
        return {op: draw(st.booleans())}
    if op in ("$in", "$nin"):
        return {op: draw(st.lists(value_for(kind, operand=True), max_size=3))}
    value = draw(value_for(kind, operand=True))
    return {op: value} if op else value


criteria_strategy = st.recursive(
    st.sampled_from(list(COLUMNS)).flatmap(
        lambda field: conditions(field).map(lambda cond: {field: cond})
    ),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda items: {"$and": items}),
        st.lists(inner, min_size=1, max_size=3).map(lambda items: {"$or": items}),
        st.lists(inner, min_size=1, max_size=3).map(lambda items: {"$nor": items}),
        st.tuples(inner, inner).map(lambda pair: {**pair[0], **pair[1]}),
    ),
    max_leaves=5,
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(docs=documents(), criteria=criteria_strategy)
def test_sql_agrees_with_matches(
    backend: SQLiteBackend, docs: list[dict[str, Any]], criteria: dict
) -> None:
    backend.remove([d["digest"] for d in backend.select(None, ["digest"])])
    backend.write(docs)
    expected = sorted(d["digest"] for d in docs if matches(d, criteria, COLUMNS))
    found = sorted(d["digest"] for d in backend.select(criteria, ["digest"]))
    assert found == expected, (criteria, docs)
    assert backend.count(criteria) == len(expected)


# -- hits, validity, removal ------------------------------------------------------------------


def test_add_hits_never_touches_the_payloads(backend: SQLiteBackend) -> None:
    backend.write([entry_doc("a" * 32, output="x" * 2_000_000)])
    conn = raw(backend)
    conn.execute("CREATE TABLE touched (what TEXT)")
    for event in ("INSERT", "UPDATE", "DELETE"):
        conn.execute(
            f"CREATE TRIGGER t_{event} AFTER {event} ON jfc_payloads "
            f"BEGIN INSERT INTO touched VALUES ('{event}'); END"
        )
    writer = backend._live().writer
    before = writer.total_changes
    backend.add_hits({"a" * 32: (1, T0)})
    backend.add_hits({"a" * 32: (2, T0 + timedelta(seconds=1))})
    assert writer.total_changes - before == 2  # one small row per hit
    assert conn.execute("SELECT count(*) FROM touched").fetchone()[0] == 0
    doc = backend.read("a" * 32)
    assert (doc["hits"], doc["last_hit"], len(doc["output"])) == (
        3,
        T0 + timedelta(seconds=1),
        2_000_000,
    )


def test_set_invalid_sets_two_fields_and_returns_existing(backend: SQLiteBackend) -> None:
    backend.write([entry_doc("a" * 32, hits=2), entry_doc("b" * 32), {"digest": "c", "valid": "?"}])
    found = backend.set_invalid(
        [("b" * 32, "bad"), ("zz", "gone"), ("a" * 32, "worse"), ("c", "x")]
    )
    assert found == ["b" * 32, "a" * 32, "c"]
    doc = backend.read("a" * 32)
    assert (doc["valid"], doc["invalid_reason"], doc["hits"]) == (False, "worse", 2)
    assert backend.read("c") == {"digest": "c", "valid": False, "invalid_reason": "x"}
    assert backend.count({"valid": False}) == 3


def test_set_invalid_keeps_a_concurrent_hit_count(backend: SQLiteBackend) -> None:
    digests = [f"{i:032d}" for i in range(20)]
    backend.write([entry_doc(d) for d in digests])

    def hit() -> None:
        for i in range(50):
            backend.add_hits({d: (1, T0 + timedelta(seconds=i)) for d in digests})

    thread = threading.Thread(target=hit)
    thread.start()
    for _ in range(20):
        backend.set_invalid([(d, "bad") for d in digests])
    thread.join()
    for doc in backend.select(None, ["hits", "valid"]):
        assert (doc["hits"], doc["valid"]) == (50, False)


def test_remove_clears_every_table(backend: SQLiteBackend) -> None:
    backend.write([entry_doc("a" * 32, consumed=["x"]), entry_doc("b" * 32, consumed=["a" * 32])])
    backend.remove(["a" * 32, "absent"])
    backend.remove([])
    conn = raw(backend)
    for table in ("jfc_entries", "jfc_payloads", "jfc_consumed"):
        assert conn.execute(f"SELECT digest FROM {table}").fetchall() == [("b" * 32,)]


def test_consumers_groups_by_digest(backend: SQLiteBackend) -> None:
    backend.write(
        [
            {"digest": "c", "consumed": ["b", "a", 3, "a"]},
            {"digest": "b", "consumed": ["a"]},
            {"digest": "a", "consumed": []},
            {"digest": "d", "consumed": "a"},
        ]
    )
    assert list(backend.consumers()) == [("b", ["a"]), ("c", ["a", "b"])]
    assert backend.read("c")["consumed"] == ["b", "a", 3, "a"]


def test_totals(backend: SQLiteBackend) -> None:
    assert backend.totals() == base.Totals()
    backend.write(
        [
            {"digest": "a", "function": "m:f", "hits": 2, "duration": 1.5, "created": T0},
            {
                "digest": "b",
                "function": "m:g",
                "valid": False,
                "files_size": 10,
                "created": T0 - timedelta(days=3),
            },
            {"digest": "c", "function": "m:f", "hits": 1, "duration": 4.0, "valid": True},
            {"digest": "d", "hits": "9", "function": 5},
        ]
    )
    totals = backend.totals()
    assert totals == base.Totals(
        entries=4,
        invalid=1,
        hits=3,
        time_saved=7.0,
        files_bytes=10,
        functions={"m:f": 2, "m:g": 1},
        oldest=(T0 - timedelta(days=3)).replace(tzinfo=timezone.utc),
        newest=T0.replace(tzinfo=timezone.utc),
    )
    assert backend.totals({"function": "m:g"}).functions == {"m:g": 1}


# -- damaged rows, processes, files -----------------------------------------------------------


def test_unreadable_rows_give_stand_ins(backend: SQLiteBackend) -> None:
    backend.write([entry_doc(f"{i}" * 32) for i in range(6)])
    conn = raw(backend)
    conn.execute("UPDATE jfc_entries SET doc = '{\"cut' WHERE digest = ?", ("0" * 32,))
    conn.execute("UPDATE jfc_entries SET doc = '[1, 2]' WHERE digest = ?", ("1" * 32,))
    conn.execute("UPDATE jfc_payloads SET served = 'garbage' WHERE digest = ?", ("2" * 32,))
    conn.execute(
        "UPDATE jfc_entries SET doc = CAST(x'7b2261223a2022ff227d' AS TEXT) WHERE digest = ?",
        ("3" * 32,),
    )
    conn.execute("UPDATE jfc_entries SET created = 'soon' WHERE digest = ?", ("4" * 32,))
    reasons = {
        "0" * 32: "the stored row does not decode",
        "1" * 32: "the stored row is a JSON array",
        "2" * 32: "the stored row does not decode",
        "3" * 32: "the stored row does not decode (invalid UTF-8)",
        "4" * 32: "a column does not decode",
    }
    for digest, reason in reasons.items():
        doc = backend.read(digest)
        assert doc is not None
        assert set(doc) == {"digest", UNREADABLE}
        assert unreadable_reason(doc).startswith(reason), (digest, doc)
    listed = {d["digest"]: d for d in backend.select({"created": {"$exists": True}})}
    assert len(listed) == 6
    assert UNREADABLE not in listed["5" * 32]
    assert all(UNREADABLE in listed[d] for d in reasons)
    assert [d["digest"] for d in backend.select({"hits": {"$exists": False}}, ["hits"])] == []
    backend.add_hits({d: (1, T0) for d in reasons})  # never fails on a damaged row
    backend.set_invalid([(d, "x") for d in reasons])
    backend.remove(list(reasons))
    assert backend.count() == 1


def _child_writes(backend: SQLiteBackend, queue: Any) -> None:
    try:
        backend.write([{"digest": "child", "hits": 1}])
        backend.add_hits({"parent": (1, T0)})
        queue.put(backend.read("parent")["hits"])
    except BaseException as err:  # pragma: no cover - reported to the parent
        queue.put(repr(err))


def test_a_forked_child_reconnects(backend: SQLiteBackend) -> None:
    backend.write([{"digest": "parent", "hits": 1}])
    assert backend.read("parent") is not None  # the parent's reader is open
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    process = ctx.Process(target=_child_writes, args=(backend, queue))
    process.start()
    result = queue.get(timeout=60)
    process.join(60)
    assert result == 2
    assert process.exitcode == 0
    assert backend.read("child") == {"digest": "child", "hits": 1}
    backend.write([{"digest": "after"}])
    assert backend.count() == 3


def test_a_file_deleted_mid_use_warns_once_then_is_made_again(
    backend: SQLiteBackend, tmp_path: Path
) -> None:
    backend.write([{"digest": "old"}])
    os.unlink(backend.path)
    with pytest.warns(CacheWarning, match="deleted while in use; reopened"):
        backend.write([{"digest": "new"}])
    backend.write([{"digest": "newer"}])  # no second warning (warnings are errors here)
    assert [d["digest"] for d in backend.select()] == ["new", "newer"]
    assert Path(backend.path).exists()


def test_a_file_replaced_mid_use_is_used_as_it_is(backend: SQLiteBackend, tmp_path: Path) -> None:
    backend.write([{"digest": "old"}])
    other = SQLiteBackend(tmp_path / "other.sqlite")
    other.write([{"digest": "theirs"}])
    other.close()
    os.replace(other.path, backend.path)
    with pytest.warns(CacheWarning, match="replaced by another file"):
        backend.add_hits({"old": (1, T0)})
    backend.write([{"digest": "mine"}])
    assert sorted(d["digest"] for d in backend.select()) == ["mine", "theirs"]


def test_a_file_replaced_by_a_non_database(backend: SQLiteBackend, tmp_path: Path) -> None:
    backend.write([{"digest": "old"}])
    Path(backend.path + ".tmp").write_bytes(b"not a database at all" * 100)
    os.replace(backend.path + ".tmp", backend.path)
    for _ in range(2):
        with pytest.raises(StoreUnavailableError, match="cannot be used"):
            backend.write([{"digest": "x"}])


def test_errors_opening(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"\x00garbage" * 512)
    with pytest.raises(StoreUnavailableError, match=r"junk\.sqlite"):
        SQLiteBackend(junk).connect()
    with pytest.raises(StoreUnavailableError, match="cannot open"):
        SQLiteBackend(tmp_path).connect()  # a folder
    newer = SQLiteBackend(tmp_path / "newer.sqlite")
    newer.connect()
    newer.close()
    sqlite3.connect(newer.path, isolation_level=None).execute("UPDATE jfc_schema SET version = 9")
    with pytest.raises(StoreUnavailableError, match="schema version 9"):
        newer.connect()
    with pytest.raises(ValueError, match="file path"):
        SQLiteBackend(":memory:")


def test_a_network_file_system_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("jobflow_cache.backends.sqlite.file_system_type", lambda path: "nfs")
    with pytest.warns(CacheWarning, match="on a nfs file system"):
        SQLiteBackend(tmp_path / "c.sqlite").connect()


def test_claims_and_aliases(backend: SQLiteBackend) -> None:
    assert backend.claim("d1", "me", 60) == "me"
    assert backend.claim("d1", "you", 60) == "me"
    assert backend.claim("d1", "me", 60) == "me"  # a renewal
    backend.release("d1", "you")  # not theirs: kept
    assert backend.claim("d1", "you", 60) == "me"
    backend.release("d1", "me")
    assert backend.claim("d1", "you", 60) == "you"
    assert backend.claim("d2", "me", -1) == "me"  # expired at once
    assert backend.claim("d2", "you", 60) == "you"
    backend.set_aliases({})
    backend.set_aliases({"/runs/a": "d1", "/runs/b": "d2"})
    backend.set_aliases({"/runs/a": "d3"})
    assert backend.get_aliases(["/runs/a", "/runs/b", "/runs/c"]) == {
        "/runs/a": "d3",
        "/runs/b": "d2",
    }
    assert backend.get_aliases([]) == {}
    assert backend.get_aliases([f"/r/{i}" for i in range(1200)]) == {}


def test_readers_in_threads_while_a_writer_writes(backend: SQLiteBackend) -> None:
    backend.write([{"digest": f"{i:04d}", "hits": 0} for i in range(300)])
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(5):
                assert len(list(backend.select(None, ["hits"]))) == 300
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for i in range(30):
        backend.add_hits({f"{i:04d}": (1, T0)})
    for thread in threads:
        thread.join()
    assert not errors
    assert backend.totals().hits == 30


def test_payload_fields_constant() -> None:
    assert set(PAYLOAD_FIELDS) == {"output", "response", "packed", "files", "blobs"}


# -- ported from the tests of 0.1.0's SQLiteStore: what the cache still relies on --------------


def test_file_system_type_picks_the_nearest_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        f"server:/export {tmp_path}/shared nfs4 rw 0 0\n"
        f"/dev/sdb1 {tmp_path}/shared/local ext4 rw 0 0\n"
    )
    (tmp_path / "shared" / "local").mkdir(parents=True)
    assert file_system_type(tmp_path / "shared/cache/x.db", str(mounts)) == "nfs4"
    assert file_system_type(tmp_path / "shared/local/x.db", str(mounts)) == "ext4"
    assert file_system_type(tmp_path / "sharedx/x.db", str(mounts)) == "ext4"


def test_a_file_on_a_network_file_system_warns_once_and_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a real mount table file naming tmp_path an NFS mount: NFS itself cannot be mounted here
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/export {tmp_path} nfs rw 0 0\n")
    monkeypatch.setattr("jobflow_cache.backends.sqlite_file.MOUNTS", str(mounts))
    backend = SQLiteBackend(tmp_path / "cache.sqlite")
    with pytest.warns(CacheWarning, match="nfs file system") as caught:
        backend.connect()
    assert len(caught) == 1
    assert "PostgreSQL or MongoDB" in str(caught[0].message)
    backend.write([entry_doc("a" * 32, hits=1)])
    backend.add_hits({"a" * 32: (1, T0)})
    assert backend.read("a" * 32)["hits"] == 2
    backend.close()


def test_unusable_locations_raise_store_unavailable(tmp_path: Path) -> None:
    nested = SQLiteBackend(tmp_path / "sub" / "dir" / "cache.sqlite")
    nested.connect()  # missing folders are made
    assert (tmp_path / "sub" / "dir" / "cache.sqlite").is_file()
    nested.close()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreUnavailableError, match="cannot open") as info:
        SQLiteBackend(blocker / "cache.sqlite").connect()
    assert isinstance(info.value.__cause__, OSError | sqlite3.Error)
    for bad in ("", ":memory:", "file:x.db?mode=ro"):
        with pytest.raises(ValueError, match="file path"):
            SQLiteBackend(bad)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_folder_raises_store_unavailable(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(StoreUnavailableError):
            SQLiteBackend(folder / "cache.sqlite").connect()
    finally:
        folder.chmod(0o700)


def test_a_file_that_is_no_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_text("this is a text file, not a database\n" * 100)
    with pytest.raises(StoreUnavailableError, match="SQLite") as info:
        SQLiteBackend(path).connect()
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)
    assert path.read_text() == "this is a text file, not a database\n" * 100


def test_select_streams_while_the_same_backend_writes(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "stream.sqlite")
    backend.write([entry_doc(f"{i:05d}", hits=0) for i in range(1500)])
    other = SQLiteBackend(tmp_path / "stream.sqlite")  # a second writer, as another process
    seen = 0
    for doc in backend.select(None, ["hits"], {"digest": 1}):
        other.write([entry_doc(f"new{seen:05d}")])
        backend.add_hits({doc["digest"]: (2, T0)})
        seen += 1
    assert seen == 1500  # the snapshot did not change under the cursor
    assert backend.count({"hits": 2}) == 1500
    assert backend.count() == 3000
    other.close()
    backend.close()


WORKER = """
import json, os, sys, time
from datetime import datetime
from jobflow_cache.backends.sqlite import SQLiteBackend
path, worker, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
backend = SQLiteBackend(path, timeout=60)
while not os.path.exists(go):
    time.sleep(0.005)
backend.connect()  # all workers create the file and its schema at the same time
claimed = backend.claim("shared", f"w{worker}", 600) == f"w{worker}"
for i in range(100):
    doc = {"digest": f"w{worker}-{i:03d}", "name": f"w{worker}", "hits": 0, "payload": "x" * i}
    backend.write([doc])
    if i % 4 == 0:
        backend.add_hits({"w0-000": (1, datetime(2024, 1, 1))})
backend.close()
print(json.dumps({"claimed": claimed}))
"""


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    """Eight processes create one file at once, then write, count hits and claim in it (the
    busy timeout makes each wait for the others' transactions)."""
    path = tmp_path / "deep" / "concurrent.sqlite"  # does not exist yet: creation races too
    go = tmp_path / "go"
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), str(worker), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for worker in range(8)
    ]
    go.touch()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert err == ""
    assert sum(json.loads(out)["claimed"] for out, _ in outputs) == 1
    backend = SQLiteBackend(path)
    assert backend.count() == 8 * 100
    for worker in range(8):
        docs = list(backend.select({"name": f"w{worker}"}, ["payload"], {"digest": 1}))
        assert [d["payload"] for d in docs] == ["x" * i for i in range(100)]
    # w0-000 exists once worker 0 wrote it: hits before that found nothing to count
    assert 0 < backend.read("w0-000")["hits"] <= 8 * 25
    check = sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0]
    assert check == "ok"
    backend.close()
