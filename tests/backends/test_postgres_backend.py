"""PostgresBackend on a real PostgreSQL server (tests/support/pgserver.py): its tables, round trips
(tampered documents too), hit counts that never touch the payload row, criteria (``$nor``,
date ranges, ``$regex`` searched as Python does, cross-checked against :func:`criteria.matches`),
claims and aliases shared with PostgresStore, migration of a table PostgresStore wrote (real
cache entries), two processes connecting first at once, fork, and an unreachable server."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, assume, given, settings

from jobflow_cache import SCHEME, CacheEntry, CacheStore, PostgresStore, StoreUnavailableError
from jobflow_cache.backends.base import (
    EXPLAIN_FIELDS,
    UNREADABLE,
    Coordinator,
    EntryBackend,
    unreadable_reason,
)
from jobflow_cache.backends.criteria import matches
from jobflow_cache.backends.maggma import MaggmaBackend
from jobflow_cache.backends.postgres import PostgresBackend, postgres_pattern
from jobflow_cache.entry import PACK_MIN, PACKED_KEY
from jobflow_cache.store import Outcome
from tests.backends.conftest import drop_backend_tables
from tests.backends.test_sqlite_backend import COLUMNS, criteria_strategy, documents, entry_doc
from tests.conftest import ROOT

pytestmark = pytest.mark.postgres

T0 = datetime(2024, 5, 1, 12, 0, 0, 123456)
UTC = timezone.utc


@pytest.fixture
def open_backend(postgres_uri: str, pg_table: str) -> Iterator[Callable[..., PostgresBackend]]:
    """Factory of connected backends on the test's table; closed (tables dropped) after."""
    made: list[PostgresBackend] = []

    def make(**kwargs: Any) -> PostgresBackend:
        backend = PostgresBackend(postgres_uri, table=pg_table, **kwargs)
        made.append(backend)
        backend.connect()
        return backend

    yield make
    for backend in made:
        backend.close()
    drop_backend_tables(postgres_uri, pg_table)


@pytest.fixture
def backend(open_backend: Callable[..., PostgresBackend]) -> PostgresBackend:
    return open_backend()


def sql(uri: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Run one statement on a connection of its own; its rows (none: [])."""
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


# --------------------------------------------------------------------------- identity, schema


def test_protocol_names_and_tables(backend: PostgresBackend, postgres_uri: str) -> None:
    assert isinstance(backend, EntryBackend)
    assert isinstance(backend.coordinator(), Coordinator)
    assert backend.owned_paths() == []
    assert backend.thread_safe
    assert backend.name.endswith(f"/{backend.table}")
    parts = urlsplit(postgres_uri)  # the private test server's, or CI's (with a password)
    assert backend.name.startswith(f"postgresql://{parts.username}@{parts.hostname}:")
    assert parts.password is None or f":{parts.password}@" not in backend.name
    backend.connect()  # idempotent
    t = backend.table
    tables = {
        row[0]
        for row in sql(
            postgres_uri, "SELECT tablename FROM pg_tables WHERE tablename LIKE %s", [f"{t}%"]
        )
    }
    assert tables == {f"{t}__v", f"{t}__e", f"{t}__p", f"{t}__c", f"{t}_claims", f"{t}_aliases"}
    assert sql(postgres_uri, f'SELECT version FROM "{t}__v"') == [(1,)]
    types = dict(
        sql(
            postgres_uri,
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s",
            [f"{t}__e"],
        )
    )
    assert types["created"] == types["last_hit"] == "timestamp with time zone"
    assert (types["valid"], types["hits"], types["files_size"]) == ("boolean", "bigint", "bigint")
    assert (types["duration"], types["doc"], types["in_doc"]) == (
        "double precision",
        "text",
        "ARRAY",
    )
    backend.close()
    backend.close()


def test_a_password_never_shows_and_specs_pass_straight(postgres_uri: str, pg_table: str) -> None:
    backend = PostgresBackend("postgresql://u:secret@db.example.org:5433/cache", table="t")
    assert backend.name == "postgresql://u@db.example.org:5433/cache/t"
    assert "secret" not in repr(backend)
    spec = {"type": "PostgresStore", "uri": postgres_uri, "table": pg_table, "key": "digest"}
    spec |= {"pool_size": 2, "connect_timeout": 3, "validator": None}
    made = PostgresBackend(**{k: v for k, v in spec.items() if k != "type"})
    assert (made.pool_size, made.connect_timeout) == (2, 3.0)
    again = PostgresBackend.from_dict(made.as_dict())
    assert (again.uri, again.table, again.pool_size) == (postgres_uri, pg_table, 2)
    with pytest.raises(ValueError, match="48 bytes"):
        PostgresBackend(postgres_uri, table="x" * 49)
    with pytest.raises(ValueError, match="digest"):
        PostgresBackend(postgres_uri, key="uuid")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unreachable_server_raises_store_unavailable() -> None:
    backend = PostgresBackend(f"postgresql://u@127.0.0.1:{_closed_port()}/db", connect_timeout=2)
    with pytest.raises(StoreUnavailableError, match="cannot use the PostgreSQL store"):
        backend.connect()
    with pytest.raises(StoreUnavailableError):
        backend.read("a" * 32)  # connects on first use


def test_a_newer_schema_is_refused(backend: PostgresBackend, postgres_uri: str) -> None:
    sql(postgres_uri, f'UPDATE "{backend.table}__v" SET version = 2')
    with pytest.raises(StoreUnavailableError, match="schema version 2"):
        PostgresBackend(postgres_uri, table=backend.table).connect()


@pytest.fixture
def select_only_role(postgres_uri: str, pg_table: str) -> Iterator[str]:
    """A login role that may only SELECT, and whose sessions are read-only (any DDL or write
    errors, even a CREATE TABLE IF NOT EXISTS of a table that exists): its URI."""
    import psycopg

    role = f"ro_{pg_table}"
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{role}'")
        conn.execute(f'ALTER ROLE "{role}" SET default_transaction_read_only = on')
        conn.execute(f'GRANT USAGE ON SCHEMA public TO "{role}"')
    params = psycopg.conninfo.conninfo_to_dict(postgres_uri) | {"user": role, "password": role}
    yield psycopg.conninfo.make_conninfo(**params)
    with psycopg.connect(postgres_uri, autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{role}"')
        conn.execute(f'DROP ROLE "{role}"')


def test_a_select_only_role_connects_without_ddl_and_reads(
    backend: PostgresBackend, postgres_uri: str, select_only_role: str
) -> None:
    """A cache whose schema exists and is current opens with reads only (the version row is
    read first): a role that may only SELECT serves entries; a write is refused."""
    doc = entry_doc("a" * 32, hits=2)
    backend.write([doc])
    backend.set_aliases({"alias": "a" * 32})
    t = backend.table
    for suffix in ("__v", "__e", "__p", "__c", "_claims", "_aliases"):
        sql(postgres_uri, f'GRANT SELECT ON "{t}{suffix}" TO "ro_{t}"')
    reader = PostgresBackend(select_only_role, table=t)
    try:
        reader.connect()
        assert reader.read("a" * 32) == doc
        assert [d["digest"] for d in reader.select({"hits": {"$gte": 1}}, ["hits"])] == ["a" * 32]
        assert (reader.count(), reader.totals().hits) == (1, 2)
        assert list(reader.consumers()) == list(backend.consumers()) != []
        assert reader.get_aliases(["alias", "other"]) == {"alias": "a" * 32}
        import psycopg

        with pytest.raises(psycopg.Error, match="read-only transaction"):
            reader.write([entry_doc("b" * 32)])
    finally:
        reader.close()
    assert backend.count() == 1


def test_a_select_only_role_cannot_create_the_schema(
    postgres_uri: str, pg_table: str, select_only_role: str
) -> None:
    """Where no schema exists yet, such a role gets StoreUnavailableError (nothing made)."""
    with pytest.raises(StoreUnavailableError, match="cannot use the PostgreSQL store"):
        PostgresBackend(select_only_role, table=pg_table).connect()
    assert sql(postgres_uri, "SELECT to_regclass(%s)", [f'"{pg_table}__e"']) == [(None,)]


# --------------------------------------------------------------------------- round trips


def test_round_trip_of_a_real_entry(backend: PostgresBackend, postgres_uri: str) -> None:
    doc = entry_doc("a" * 32, hits=3, last_hit=T0 + timedelta(days=1))
    backend.write([doc])
    got = backend.read("a" * 32)
    assert got == doc
    assert list(got["versions"]) == list(doc["versions"])  # text keeps key order (jsonb does not)
    lean = backend.read("a" * 32, explain=False)
    assert lean == {k: v for k, v in doc.items() if k not in EXPLAIN_FIELDS}
    assert backend.read("b" * 32) is None
    t = backend.table
    [(served,)] = sql(postgres_uri, f'SELECT served FROM "{t}__p"')
    assert '"output"' in served
    [(small, hits, valid, created)] = sql(
        postgres_uri, f'SELECT doc, hits, valid, created FROM "{t}__e"'
    )
    assert '"output"' not in small
    assert (hits, valid, created) == (3, True, T0.replace(tzinfo=UTC))


@pytest.mark.parametrize(
    "tampered",
    [
        {"hits": "5", "valid": "yes", "created": "not a date", "maker": None},
        {"duration": 3, "files_size": True, "last_hit": 7, "name": ["x"]},
        {"hits": 2**70 // 2**7, "function": {"nested": 1}, "output": 5},
        {"valid": None, "hits": None, "invalid_reason": 0, "custom": {"a": [1, None]}},
        # what PostgreSQL text or jsonb cannot hold as they are
        {"name": "nul\x00inside", "host": "\x00", "custom": {"big": 1e16, "negzero": -0.0}},
    ],
)
def test_tampered_documents_round_trip(backend: PostgresBackend, tampered: dict) -> None:
    doc = entry_doc("t" * 32, **tampered)
    backend.write([doc])
    got = backend.read("t" * 32)
    assert got == doc
    assert repr(got.get("custom")) == repr(doc.get("custom"))  # 1e16 a float, -0.0 signed
    for field in tampered:
        if field in COLUMNS or field in ("host", "function", "files_size", "last_hit"):
            # a value not of its column's type counts as missing, and exists
            assert backend.count({field: None}) == 1, field
            assert backend.count({field: {"$exists": True}}) == 1, field


def test_hits_on_tampered_fields_start_from_the_count(backend: PostgresBackend) -> None:
    backend.write([{"digest": "d1", "function": "m:f"}, {"digest": "d2", "hits": "x"}])
    backend.add_hits({"d1": (2, T0), "d2": (3, T0), "absent": (1, T0)})
    assert backend.read("d1") == {"digest": "d1", "function": "m:f", "hits": 2, "last_hit": T0}
    assert backend.read("d2") == {"digest": "d2", "hits": 3, "last_hit": T0}
    assert backend.count({"hits": 3}) == 1
    backend.set_invalid([("d2", "bad\x00reason")])
    assert backend.read("d2")["invalid_reason"] == "bad\ufffdreason"


def test_non_json_values_raise_type_error_and_write_nothing(backend: PostgresBackend) -> None:
    for bad in ({"when": T0}, {"data": b"x"}, {"x": float("nan")}):
        with pytest.raises(TypeError):
            backend.write([{"digest": "ok"}, {"digest": "bad", **bad}])
    assert backend.count() == 0


def test_unreadable_rows_give_stand_ins(backend: PostgresBackend, postgres_uri: str) -> None:
    backend.write([entry_doc(f"{i}" * 32) for i in range(4)])
    t = backend.table
    sql(postgres_uri, f"""UPDATE "{t}__e" SET doc = '{{"cut' WHERE digest = %s""", ["0" * 32])
    sql(postgres_uri, f"""UPDATE "{t}__e" SET doc = '[1, 2]' WHERE digest = %s""", ["1" * 32])
    sql(postgres_uri, f"""UPDATE "{t}__p" SET served = 'garbage' WHERE digest = %s""", ["2" * 32])
    reasons = {
        "0" * 32: "the stored row does not decode",
        "1" * 32: "the stored row is a JSON array",
        "2" * 32: "the stored row does not decode",
    }
    for digest, reason in reasons.items():
        doc = backend.read(digest)
        assert doc is not None
        assert set(doc) == {"digest", UNREADABLE}
        assert unreadable_reason(doc).startswith(reason), (digest, doc)
    listed = {d["digest"]: d for d in backend.select({"created": {"$exists": True}})}
    assert len(listed) == 4
    assert listed["3" * 32] == entry_doc("3" * 32)


# --------------------------------------------------------------------------- hits


def test_a_hit_never_rewrites_the_payload_row(backend: PostgresBackend, postgres_uri: str) -> None:
    digest = "a" * 32
    backend.write([entry_doc(digest, output="x" * 2_000_000)])
    t = backend.table
    sql(postgres_uri, f'CREATE TABLE "{t}_touched" (what text)')
    sql(
        postgres_uri,
        f'CREATE FUNCTION "{t}_note"() RETURNS trigger AS $$ BEGIN INSERT INTO "{t}_touched" '
        "VALUES (TG_OP); RETURN NULL; END $$ LANGUAGE plpgsql",
    )
    sql(
        postgres_uri,
        f'CREATE TRIGGER note AFTER INSERT OR UPDATE OR DELETE ON "{t}__p" '
        f'FOR EACH ROW EXECUTE FUNCTION "{t}_note"()',
    )
    row = f'SELECT xmin::text, ctid::text FROM "{t}__{{}}" WHERE digest = %s'
    payload = sql(postgres_uri, row.format("p"), [digest])
    entry = sql(postgres_uri, row.format("e"), [digest])
    backend.add_hits({digest: (1, T0)})
    backend.add_hits({digest: (2, T0 + timedelta(seconds=1))})
    assert sql(postgres_uri, row.format("p"), [digest]) == payload  # the same row version
    assert sql(postgres_uri, row.format("e"), [digest]) != entry  # the small row is the new one
    assert sql(postgres_uri, f'SELECT count(*) FROM "{t}_touched"') == [(0,)]
    doc = backend.read(digest)
    assert (doc["hits"], doc["last_hit"], len(doc["output"])) == (
        3,
        T0 + timedelta(seconds=1),
        2_000_000,
    )
    sql(postgres_uri, f'DROP TABLE "{t}_touched"; DROP FUNCTION "{t}_note"() CASCADE')


# --------------------------------------------------------------------------- criteria


def test_criteria_nor_and_date_ranges(backend: PostgresBackend) -> None:
    backend.write(
        [
            {"digest": "3f2c01", "function": "m:relax", "valid": True, "hits": 1, "created": T0},
            {
                "digest": "3f2d02",
                "function": "m:static",
                "valid": False,
                "maker": "M",
                "created": T0 + timedelta(days=1),
            },
            {"digest": "a0", "function": "m:relax", "hits": 10, "last_hit": T0},
        ]
    )

    def digests(criteria: dict) -> list[str]:
        found = sorted(d["digest"] for d in backend.select(criteria, ["digest"]))
        assert backend.count(criteria) == len(found)
        return found

    assert digests({"digest": {"$regex": "^3f2c"}}) == ["3f2c01"]
    assert digests({"function": {"$regex": "rel"}}) == ["3f2c01", "a0"]
    assert digests({"valid": {"$ne": False}}) == ["3f2c01", "a0"]
    assert digests({"valid": False}) == ["3f2d02"]
    assert digests({"maker": None}) == ["3f2c01", "a0"]
    assert digests({"hits": {"$gte": 1, "$lt": 10}}) == ["3f2c01"]
    assert digests({"hits": {"$gt": "1"}}) == []
    # $nor: a missing field does not match (SQL's NULL must not make NOT unknown)
    assert digests({"$nor": [{"maker": "M"}]}) == ["3f2c01", "a0"]
    assert digests({"$nor": [{"valid": False}, {"hits": 10}]}) == ["3f2c01"]
    # date ranges: naive UTC and aware in any zone are the same instants
    plus2 = timezone(timedelta(hours=2))
    assert digests({"created": {"$gte": T0, "$lt": T0 + timedelta(days=1)}}) == ["3f2c01"]
    assert digests({"created": {"$gt": (T0 + timedelta(hours=14)).astimezone(plus2)}}) == ["3f2d02"]
    assert digests({"created": {"$lte": T0.replace(tzinfo=UTC)}}) == ["3f2c01"]
    assert digests({"created": None}) == ["a0"]
    assert digests({"last_hit": {"$exists": True}}) == ["a0"]
    assert digests({"$or": [{"valid": False}, {"hits": {"$in": [10, None]}}]}) == ["3f2d02", "a0"]
    # text NUL cannot be in a column: equal to nothing, different from everything
    assert digests({"function": "m:\x00"}) == []
    assert digests({"function": {"$ne": "m:\x00"}}) == ["3f2c01", "3f2d02", "a0"]
    assert digests({"digest": {"$regex": "^3f\x00"}}) == []
    for bad, word in [
        ({"output": "x"}, "unknown field 'output'"),
        ({"hits": {"$size": 1}}, "unknown operator '\\$size'"),
        ({"name": {"$regex": "\\d"}}, "cannot search with the escape"),
    ]:
        with pytest.raises(ValueError, match=word):
            backend.count(bad)
        with pytest.raises(ValueError, match=word):
            backend.select(bad)


def test_order_and_limit(backend: PostgresBackend) -> None:
    backend.write(
        [
            {"digest": "a", "hits": 2, "created": T0, "name": "Zeta"},
            {"digest": "b", "hits": 5, "created": T0 - timedelta(days=1), "name": "apple"},
            {"digest": "c", "created": T0 + timedelta(days=1), "name": "Elder"},
            {"digest": "d", "hits": 2, "created": T0 - timedelta(days=2), "name": "éclair"},
        ]
    )

    def digests(**kwargs: Any) -> list[str]:
        return [d["digest"] for d in backend.select(**kwargs)]

    assert digests(order={"hits": 1, "created": 1}) == ["c", "d", "a", "b"]  # missing first
    assert digests(order={"hits": -1, "created": -1}) == ["b", "a", "d", "c"]  # missing last
    assert digests(order={"created": 1}, limit=2) == ["d", "b"]
    assert digests(order={"name": 1}) == ["c", "a", "b", "d"]  # code points, not the collation


TEXTS = [
    "relax",
    "relax\n",
    "a.b",
    "axb",
    "a\nb",
    "Si\u2014\u03b1",
    "x-y",
    "ab]c",
    "",
    "t\tz",
    "{a}",
    "aab",
]
PATTERNS = [
    "^relax.*$", "^relax$", "relax$", "a.b", "^a\\.b$", "x\\-y", "[\\]]", "[^a]b", "\u03b1$",
    "^(?:re|x)", "b$|^S", "(?<=a)b", "(?<!a)b", "a{2}", "a{", "}", "re(?!l)", "t\\tz", "\\A\\{",
    "a\\Z", "[.]", "^$", "a+?b", "", "\u2014",
]  # fmt: skip


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_searches_as_python_does(backend: PostgresBackend, pattern: str) -> None:
    backend.write([{"digest": f"{i:02d}", "name": text} for i, text in enumerate(TEXTS)])
    expected = sorted(f"{i:02d}" for i, text in enumerate(TEXTS) if re.search(pattern, text))
    found = sorted(d["digest"] for d in backend.select({"name": {"$regex": pattern}}))
    assert found == expected, postgres_pattern(pattern)


@pytest.mark.parametrize(
    "pattern", ["\\d", "\\w+", "\\bx", "(?i)a", "(?P<n>a)", "a*+", "(a)\\1", "[[:alpha:]]", "[\\s]"]
)
def test_regex_python_and_postgres_read_differently_is_refused(pattern: str) -> None:
    re.compile(pattern)  # valid Python
    with pytest.raises(ValueError, match="PostgresBackend cannot search"):
        postgres_pattern(pattern)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(docs=documents(), criteria=criteria_strategy)
def test_sql_agrees_with_matches(
    backend: PostgresBackend, docs: list[dict[str, Any]], criteria: dict
) -> None:
    backend.remove([d["digest"] for d in backend.select(None, ["digest"])])
    backend.write(docs)
    expected = sorted(d["digest"] for d in docs if matches(d, criteria, COLUMNS))
    try:
        found = sorted(d["digest"] for d in backend.select(criteria, ["digest"]))
    except ValueError as err:  # a regex the two dialects read differently (\d)
        assume("cannot search" not in str(err))
        raise
    assert found == expected, (criteria, docs)
    assert backend.count(criteria) == len(expected)


# --------------------------------------------------------------------------- claims, aliases


def test_claims_and_aliases_are_postgres_stores_own(
    backend: PostgresBackend, make_pg_store: Callable[..., PostgresStore]
) -> None:
    store = make_pg_store(table=backend.table)  # the same tables, made by either
    assert backend.claim("job", "a", 30) == "a"
    assert store.claim("job", "b", 30) == "a"
    store.release("job", "a")
    assert backend.claim("job", "b", 0) == "b"  # a lease that ends now, on the database clock
    assert store.claim("job", "c", 30) == "c"
    store.set_aliases({"/runs/x": "d1"})
    backend.set_aliases({"/runs/y": "d2", "/runs/x": "d3"})
    assert store.get_aliases(["/runs/x", "/runs/y"]) == {"/runs/x": "d3", "/runs/y": "d2"}
    assert backend.get_aliases(["/runs/x", "/runs/z"]) == {"/runs/x": "d3"}


# --------------------------------------------------------------------------- migration


def old_cache(uri: str, table: str, objects: Path) -> dict[str, dict[str, Any]]:
    """A PostgresStore table written through CacheStore (real entries: a packed output,
    files, hits, invalid ones with a cascade, consumed lists), claims and aliases, two damaged
    rows; the documents PostgresStore gives back, by digest."""
    store = PostgresStore(uri, table=table)
    # through the maggma adapter: CacheStore(store) would keep them in PostgresBackend's tables
    cache = CacheStore(MaggmaBackend(store), objects)
    cache.connect()
    big = json.dumps([i * 0.5 for i in range(20_000)])
    assert len(big) > PACK_MIN
    digests = [f"{c}" * 32 for c in "abcde"]
    entries = [
        CacheEntry(digest=digests[0], scheme=SCHEME, function="m:relax", name="relax",
                   output='{"energy": -1.5}', duration=2.0, created=T0,
                   canonical_input={"x": 1}, arg_digests={"x": "1" * 32}),
        CacheEntry(digest=digests[1], scheme=SCHEME, function="m:static", name="static",
                   output=big, created=T0 + timedelta(days=1), consumed=[digests[0]]),
        CacheEntry(digest=digests[2], scheme=SCHEME, function="m:relax", name="r2",
                   output="[1, 2]", created=T0 + timedelta(days=2), consumed=[digests[1]]),
        CacheEntry(digest=digests[3], scheme=SCHEME, function="m:band", name="band",
                   output="null", created=T0 + timedelta(days=3), versions={"a": "1", "b": "2"}),
        CacheEntry(digest=digests[4], scheme=SCHEME, function="m:f", name="f", output="3"),
    ]  # fmt: skip
    cache.put_many(entries)
    cache.record_hits({digests[0]: (3, T0 + timedelta(days=5)), digests[1]: (1, T0)})
    assert cache.invalidate(digests[1], "by hand") == [digests[1], digests[2]]
    store.claim("held", "worker-1", 600)
    store.set_aliases({"/runs/a": digests[0], "/runs/b": digests[1]})
    expected = {d: store.query_key(d) for d in digests}
    assert expected[digests[1]][PACKED_KEY]
    # damaged rows: a JSON string, and a date where this schema has no date column
    store.update([{"digest": "s" * 32, "n": 1}, {"digest": "t" * 32, "seen": T0}])
    with store._state_or_raise().pool.connection() as conn:
        conn.execute(f"""UPDATE "{table}" SET doc = '"text"' WHERE key = %s""", [f'"{"s" * 32}"'])
    store.close()
    return expected


def migrated(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if "migrated" in r.getMessage()]


def test_migration_of_a_postgres_store_table(
    postgres_uri: str,
    pg_table: str,
    open_backend: Callable[..., PostgresBackend],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = old_cache(postgres_uri, pg_table, tmp_path / "objects")
    with caplog.at_level(logging.INFO, logger="jobflow_cache.backends.postgres"):
        backend = open_backend()
    assert migrated(caplog.records) == [f"migrated 7 entries of {backend.name} to the fixed schema"]
    assert backend.name.endswith(f"/{pg_table}")
    for digest, doc in expected.items():
        assert backend.read(digest) == doc, digest
    a, b, c = ("a" * 32, "b" * 32, "c" * 32)
    assert backend.read(a)["hits"] == 3
    assert backend.read(b)[PACKED_KEY]["output"] == expected[b][PACKED_KEY]["output"]
    assert backend.count({"valid": False}) == 2
    assert backend.count({"last_hit": {"$gte": T0 + timedelta(days=5)}}) == 1
    assert dict(backend.consumers()) == {b: [a], c: [b]}
    assert backend.totals().hits == 4
    stand_in = backend.read("s" * 32)
    assert stand_in == {"digest": "s" * 32, UNREADABLE: "the stored row is a JSON string"}
    assert "old format" in backend.read("t" * 32)[UNREADABLE]
    assert backend.count() == 7
    # claims and aliases stay where they were
    assert backend.claim("held", "worker-2", 60) == "worker-1"
    assert backend.get_aliases(["/runs/a", "/runs/b"]) == {"/runs/a": a, "/runs/b": b}
    # the old table is gone, and a second connect migrates nothing
    assert sql(postgres_uri, "SELECT to_regclass(%s)", [f'"{pg_table}"']) == [(None,)]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jobflow_cache.backends.postgres"):
        again = open_backend()
    assert migrated(caplog.records) == []
    assert again.count() == 7
    # the cache serves the migrated entries
    cache = CacheStore(again, tmp_path / "objects")
    cache.connect()
    assert cache.lookup(a).outcome is Outcome.HIT
    assert cache.lookup(b).outcome is Outcome.INVALID
    assert cache.get("d" * 32).output == "null"


def test_a_postgres_store_table_of_another_key_is_left_alone(
    postgres_uri: str, pg_table: str, open_backend: Callable[..., PostgresBackend]
) -> None:
    store = PostgresStore(postgres_uri, table=pg_table, key="uuid")
    store.connect()
    store.update([{"uuid": "u1"}])
    store.close()
    assert open_backend().count() == 0
    assert sql(postgres_uri, f'SELECT count(*) FROM "{pg_table}"') == [(1,)]


FIRST_CONNECT = """
import logging, os, sys, time
from jobflow_cache.backends.postgres import PostgresBackend
uri, table, go = sys.argv[1:4]
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
backend = PostgresBackend(uri, table=table)
while not os.path.exists(go):
    time.sleep(0.002)
backend.connect()
print("count", backend.count())
backend.close()
"""


def test_two_processes_connecting_first_at_once_migrate_once(
    postgres_uri: str,
    pg_table: str,
    open_backend: Callable[..., PostgresBackend],
    tmp_path: Path,
) -> None:
    expected = old_cache(postgres_uri, pg_table, tmp_path / "objects")
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_CONNECT, postgres_uri, pg_table, str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    time.sleep(1.0)
    go.touch()
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outs.append(out)
    assert [out.splitlines()[-1] for out in outs] == ["count 7", "count 7"]
    assert sum("migrated 7 entries" in out for out in outs) == 1
    backend = open_backend()
    for digest, doc in expected.items():
        assert backend.read(digest) == doc


# --------------------------------------------------------------------------- processes

FORK = """
import os, sys
from jobflow_cache.backends.postgres import PostgresBackend
backend = PostgresBackend(sys.argv[1], table=sys.argv[2], pool_size=2)
backend.connect()
backend.write([{"digest": "parent"}])
pid = os.fork()
if pid == 0:  # the child opens its own pool, then exits normally (finalisers run)
    backend.write([{"digest": "child"}])
    sys.exit(0)
_, status = os.waitpid(pid, 0)
assert status == 0, status
backend.write([{"digest": "after"}])  # the parent's connections still work
print(sorted(d["digest"] for d in backend.select()))
"""


def test_fork_child_gets_its_own_connections(backend: PostgresBackend, postgres_uri: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FORK, postgres_uri, backend.table],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['after', 'child', 'parent']"
