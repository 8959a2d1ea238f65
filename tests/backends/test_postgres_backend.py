"""PostgresBackend on a real PostgreSQL server (tests/support/pgserver.py): its tables, round trips
(tampered documents too), hit counts that never touch the payload row, criteria (``$nor``,
date ranges, ``$regex`` searched as Python does, cross-checked against :func:`criteria.matches`),
claims and aliases, migration of a table 0.1.0's PostgresStore wrote (real cache entries, the
table made by that store's own SQL), two processes connecting first at once, fork, and an
unreachable server."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, assume, given, settings
from maggma.stores import MemoryStore

from jobflow_cache import SCHEME, CacheEntry, CacheStore, StoreUnavailableError
from jobflow_cache.backends.base import (
    EXPLAIN_FIELDS,
    UNREADABLE,
    Coordinator,
    EntryBackend,
    format_datetime,
    unreadable_reason,
)
from jobflow_cache.backends.criteria import matches
from jobflow_cache.backends.maggma import MaggmaBackend
from jobflow_cache.backends.postgres import PostgresBackend, postgres_pattern
from jobflow_cache.entry import PACK_MIN, PACKED_KEY
from jobflow_cache.store import Outcome
from tests.backends.conftest import drop_backend_tables
from tests.backends.test_sqlite_backend import COLUMNS, criteria_strategy, documents, entry_doc
from tests.conftest import pythonpath

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
    "pattern",
    [
        "\\d", "\\w+", "\\bx", "(?x)a", "(?a)a", "(?i:a)", "(?P<n>a)", "a*+", "(a)\\1",
        "[[:alpha:]]", "[\\s]", "(?i)\u00e9", "(?i)[\u00e0-\u00ff]",
    ],
)  # fmt: skip
def test_regex_python_and_postgres_read_differently_is_refused(pattern: str) -> None:
    re.compile(pattern)  # valid Python
    with pytest.raises(ValueError, match="PostgresBackend cannot search"):
        postgres_pattern(pattern)


#: Flags as ``$options`` gives them (a leading inline group), on texts that tell them apart,
#: with the non-ASCII letters Python's IGNORECASE takes for ASCII ones: the Kelvin sign (k),
#: the long s (s), the dotted and dotless i.
OPTION_TEXTS = [*TEXTS, "Relax", "RELAX\nb", "a\nRelax", "\u212a", "k", "\u017f", "S",
                "\u0130", "\u0131", "I", "\u00e9", "]", "-", "^"]  # fmt: skip
OPTION_PATTERNS = [
    "^relax", "relax$", "^RELAX$", "a.b", "^a.b$", "k", "^S$", "[i-k]", "[^a-z]", "[]k]",
    "[-s]", "[\\]-a]", "i", "^.$", "(?<=a)b", "[^\\n]", "\\Ab", "x\\-Y", "(?:RE|x)",
]  # fmt: skip
FLAGS = ["", "(?i)", "(?m)", "(?s)", "(?im)", "(?is)", "(?ms)", "(?ims)", "(?i)(?s)"]


def test_the_non_ascii_letters_ignorecase_takes_for_ascii_ones_are_known() -> None:
    """Every code point Python's IGNORECASE matches with an ASCII letter, found by searching
    them all, is in the translator's table, under that letter (both cases)."""
    from jobflow_cache.backends import postgres

    letter = re.compile("[a-zA-Z]", re.IGNORECASE)
    found: dict[str, str] = {}
    for code in range(128, 0x110000):
        char = chr(code)
        if letter.fullmatch(char):
            for ascii_letter in "abcdefghijklmnopqrstuvwxyz":
                if re.fullmatch(ascii_letter, char, re.IGNORECASE):
                    found[ascii_letter] = found.get(ascii_letter, "") + char
    assert found == postgres._CASE_EXTRAS
    for ascii_letter, extras in found.items():
        for char in extras:
            assert re.fullmatch(ascii_letter.upper(), char, re.IGNORECASE)


def test_flags_are_written_out_as_python_reads_them() -> None:
    """The translation, read as PostgreSQL reads it (``.`` matches a newline: Python's
    DOTALL), searches every text as Python searches with the flags: no server needed."""
    texts = [a + b for a in OPTION_TEXTS for b in ["", *OPTION_TEXTS[-10:]]]
    for flags in FLAGS:
        for pattern in OPTION_PATTERNS:
            translated = postgres_pattern(flags + pattern)
            for text in texts:
                expected = re.search(flags + pattern, text) is not None
                found = re.search(translated, text, re.DOTALL) is not None
                assert found == expected, (flags + pattern, translated, text)


@pytest.mark.parametrize("options", ["i", "m", "s", "ims"])
@pytest.mark.parametrize("pattern", OPTION_PATTERNS)
def test_regex_options_search_as_python_does(
    backend: PostgresBackend, pattern: str, options: str
) -> None:
    backend.write([{"digest": f"{i:02d}", "name": text} for i, text in enumerate(OPTION_TEXTS)])
    flagged = f"(?{options}){pattern}"
    expected = sorted(f"{i:02d}" for i, text in enumerate(OPTION_TEXTS) if re.search(flagged, text))
    criteria = {"name": {"$regex": pattern, "$options": options}}
    found = sorted(d["digest"] for d in backend.select(criteria))
    assert found == expected, postgres_pattern(flagged)


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


# --------------------------------------------------------------------------- migration


def make_old_tables(uri: str, table: str, key: str = "digest") -> None:
    """The tables 0.1.0's PostgresStore made for ``table`` (its own SQL): the documents, one
    JSONB per row under the JSON of their key, its comment naming the format and key, and the
    claims and aliases tables."""
    comment = "jobflow-cache PostgresStore " + json.dumps(
        {"format": 1, "key": key}, separators=(",", ":")
    )
    sql(uri, f'''CREATE TABLE "{table}" (key text COLLATE "C" PRIMARY KEY, '''
             "seq bigint GENERATED BY DEFAULT AS IDENTITY, doc jsonb NOT NULL)")  # fmt: skip
    sql(uri, f'''CREATE TABLE "{table}_claims" (name text COLLATE "C" PRIMARY KEY, '''
             "owner text NOT NULL, expires timestamptz NOT NULL)")  # fmt: skip
    sql(uri, f'''CREATE TABLE "{table}_aliases" (alias text COLLATE "C" PRIMARY KEY, '''
             "digest text NOT NULL)")  # fmt: skip
    sql(uri, f"""COMMENT ON TABLE "{table}" IS '{comment}'""")


def old_json(value: Any) -> str:
    """A value as 0.1.0's PostgresStore stored it: JSON, with datetimes, the floats JSONB
    would not give back (non-finite, -0.0, 1e16 and beyond) and strings holding NUL tagged."""

    def tag(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: tag(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [tag(v) for v in obj]
        if isinstance(obj, datetime):
            return {"$date": format_datetime(obj)}
        if isinstance(obj, float) and (
            not math.isfinite(obj) or abs(obj) >= 1e16 or (obj == 0 and math.copysign(1, obj) < 0)
        ):
            return {"$numberDouble": repr(obj).replace("inf", "Infinity").replace("nan", "NaN")}
        if isinstance(obj, str) and "\x00" in obj:
            return {"$string": json.dumps(obj)}
        return obj

    return json.dumps(tag(value))


def write_old_rows(uri: str, table: str, docs: list[Any], key: str = "digest") -> None:
    """Insert documents into 0.1.0's table as that store wrote them."""
    import psycopg

    with psycopg.connect(uri, autocommit=True) as conn:
        for doc in docs:
            conn.execute(
                f'''INSERT INTO "{table}" (key, doc) VALUES (%s, %s::jsonb)''',
                [json.dumps(doc[key]), old_json(doc)],
            )


def old_cache(uri: str, table: str, objects: Path) -> dict[str, dict[str, Any]]:
    """A cache in 0.1.0's PostgresStore table: real entries written through CacheStore (a
    packed output, files, hits, invalid ones with a cascade, consumed lists; kept in memory,
    then stored as that store stored them), claims and aliases, two damaged rows; the
    documents, by digest."""
    memory = MemoryStore(collection_name="old")
    cache = CacheStore(MaggmaBackend(memory), objects)
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
    expected = {}
    for doc in memory.query({}):
        doc.pop("_id")
        expected[doc["digest"]] = doc
    assert expected[digests[1]][PACKED_KEY]
    make_old_tables(uri, table)
    write_old_rows(uri, table, list(expected.values()))
    # damaged rows: a JSON string, and a date where this schema has no date column
    write_old_rows(uri, table, [{"digest": "s" * 32, "n": 1}, {"digest": "t" * 32, "seen": T0}])
    sql(uri, f"""UPDATE "{table}" SET doc = '"text"' WHERE key = %s""", [f'"{"s" * 32}"'])
    sql(uri, f'''INSERT INTO "{table}_claims" VALUES ('held', 'worker-1', now() + '600 s')''')
    sql(uri, f'''INSERT INTO "{table}_aliases" VALUES (%s, %s), (%s, %s)''',
        ["/runs/a", digests[0], "/runs/b", digests[1]])  # fmt: skip
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
    assert backend.count({"last_hit": {"$gt": T0 + timedelta(days=4)}}) == 1
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
    make_old_tables(postgres_uri, pg_table, key="uuid")
    write_old_rows(postgres_uri, pg_table, [{"uuid": "u1"}], key="uuid")
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
    env = {**os.environ, "PYTHONPATH": pythonpath()}
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
        env={**os.environ, "PYTHONPATH": pythonpath()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['after', 'child', 'parent']"


# --------------------------------------------------------------------------- ported from the
# tests of 0.1.0's PostgresStore: what the cache still relies on, now on PostgresBackend


def _python(code: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, "PYTHONPATH": pythonpath()},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_package_imports_without_psycopg() -> None:
    """psycopg is an optional extra: without it the package imports, and the backend says how
    to install it when it is used (the cache then runs uncached)."""
    code = (
        "import sys\n"
        "sys.modules['psycopg'] = None\n"
        "sys.modules['psycopg_pool'] = None\n"
        "import jobflow_cache\n"
        "backend = jobflow_cache.PostgresBackend('postgresql://u@127.0.0.1:1/db')\n"
        "try:\n"
        "    backend.connect()\n"
        "except jobflow_cache.StoreUnavailableError as err:\n"
        "    print(err)\n"
    )
    assert "pip install 'jobflow-cache[postgres]'" in _python(code)


def test_hits_from_threads_all_count(backend: PostgresBackend) -> None:
    backend.write([entry_doc("c" * 32, hits=0)])

    def bump() -> None:
        for _ in range(25):
            backend.add_hits({"c" * 32: (1, T0)})

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.read("c" * 32)["hits"] == 200


def test_claims_under_threads_have_one_winner(open_backend: Callable[..., PostgresBackend]) -> None:
    backend = open_backend(pool_size=8)
    names = [f"n{i}" for i in range(30)]
    results: dict[str, list[str]] = {name: [] for name in names}
    barrier = threading.Barrier(8)

    def worker(me: str) -> None:
        barrier.wait()
        for name in names:
            results[name].append(backend.claim(name, me, 30))

    threads = [threading.Thread(target=worker, args=(f"t{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, holders in results.items():
        assert len(set(holders)) == 1, (name, holders)  # everyone agrees on one winner


def spawn_together(code: str, args: list[list[str]], go: Path) -> list[str]:
    """Start one fresh Python process per argument list; release them at once; their stdouts."""
    env = {**os.environ, "PYTHONPATH": pythonpath()}
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


CLAIM_RACE = """
import json, os, sys, time
from jobflow_cache.backends.postgres import PostgresBackend
uri, table, me, go = sys.argv[1:5]
backend = PostgresBackend(uri, table=table)
backend.connect()
while not os.path.exists(go):
    time.sleep(0.002)
print(json.dumps({f"n{i}": backend.claim(f"n{i}", me, 30) for i in range(40)}))
"""


def test_claims_under_eight_processes_have_one_winner(
    postgres_uri: str, backend: PostgresBackend, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    args = [[postgres_uri, backend.table, f"p{i}", str(go)] for i in range(8)]
    results = [json.loads(out) for out in spawn_together(CLAIM_RACE, args, go)]
    winners: Counter[str] = Counter()
    for name in results[0]:
        holders = {r[name] for r in results}
        assert len(holders) == 1, (name, holders)
        winners[holders.pop()] += 1
    assert sum(winners.values()) == 40


WRITER = """
import json, os, sys, time
from jobflow_cache import CacheEntry, CacheStore, PostgresBackend
from jobflow_cache.hashing import SCHEME
uri, table, me, go = sys.argv[1:5]
cache = CacheStore(PostgresBackend(uri, table=table), "/nonexistent-objects")
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
    postgres_uri: str, backend: PostgresBackend, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    args = [[postgres_uri, backend.table, f"{i:02d}", str(go)] for i in range(8)]
    assert spawn_together(WRITER, args, go) == ["ok\n"] * 8
    cache = CacheStore(backend, tmp_path / "objects")
    docs = list(cache.find())
    assert len(docs) == len({d["digest"] for d in docs}) == 40 + 8 * 40
    for doc in docs:
        assert cache.lookup(doc["digest"]).outcome is Outcome.HIT  # whole, one writer each
        assert json.loads(doc["output"])[0] == doc["name"]


def test_select_streams_large_results_while_writing(backend: PostgresBackend) -> None:
    backend.write([entry_doc(f"{i:05d}", hits=i) for i in range(1500)])
    seen = 0
    for doc in backend.select(None, ["hits"], {"hits": 1}):  # a server-side cursor
        if seen % 500 == 0:
            backend.write([entry_doc(f"new{seen}", hits=-1)])  # another pooled connection
        assert doc["hits"] == seen
        seen += 1
    assert seen == 1500
    assert backend.count() == 1503


def test_texts_compare_by_code_point_whatever_the_collation(backend: PostgresBackend) -> None:
    names = ["b", "B", "a", "é", "Z", "aa", "a b", "_"]
    backend.write([entry_doc(f"{i:032x}", name=n) for i, n in enumerate(names)])
    ordered = [d["name"] for d in backend.select(None, ["name"], {"name": 1})]
    assert ordered == sorted(names)
    found = {d["name"] for d in backend.select({"name": {"$gte": "a", "$lt": "b"}}, ["name"])}
    assert found == {n for n in names if "a" <= n < "b"}


def chain() -> Any:
    from jobflow import Flow

    from tests.support import jobs

    a = jobs.add(1, 2)
    b = jobs.mul(a.output, 10)
    big = jobs.add("x" * 100_000, "y")  # output over PACK_MIN: stored compressed
    return Flow([a, b, jobs.add(b.output, a.output), big, jobs.make_replace(40)])


def test_real_flows_round_trip_through_the_cache(
    backend: PostgresBackend, counts: Any, tmp_path: Path
) -> None:
    from jobflow import Flow, JobStore

    from jobflow_cache import run_locally
    from jobflow_cache.entry import document_checksum
    from tests.support import jobs

    root = tmp_path / "runs"
    root.mkdir()
    cache = CacheStore(backend, tmp_path / "objects")
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
    assert [d["name"] for d in entries if "packed" in d] == ["add"]

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
    backend: PostgresBackend, postgres_uri: str, counts: Any, tmp_path: Path
) -> None:
    from click.testing import CliRunner
    from jobflow import Flow, JobStore

    from jobflow_cache import run_locally
    from jobflow_cache.cli import cli
    from tests.support import jobs

    objects = tmp_path / "objects"
    cache = CacheStore(backend, objects)
    root = tmp_path / "runs"
    root.mkdir()
    for tag in ("one", "two"):
        run_locally(Flow([jobs.add(1, 2), jobs.write_files(tag, 2)]), store=JobStore(MemoryStore()),
                    cache=cache, log=False, create_folders=True, root_dir=root)  # fmt: skip
    assert counts() == {"add": 1, "write_files": 2}
    spec = json.dumps({"type": "PostgresBackend", "uri": postgres_uri, "table": backend.table})
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
    doc = backend.read(digest)
    assert doc is not None
    doc["output"] = "4"  # tampered: never served, reported
    backend.write([doc])
    result = CliRunner().invoke(cli, [*base, "verify", "--json"])
    assert result.exit_code == 1
    assert [p["kind"] for p in json.loads(result.stdout)["problems"]] == ["checksum"]


def test_a_flow_runs_uncached_with_one_warning_when_the_server_is_unreachable(
    counts: Any, tmp_path: Path
) -> None:
    from jobflow import Flow, JobStore

    from jobflow_cache import CacheWarning, run_locally
    from tests.support import jobs

    backend = PostgresBackend(f"postgresql://u@127.0.0.1:{_closed_port()}/db", connect_timeout=2)
    flow = Flow([jobs.add(1, 2), jobs.add(3, 4)])
    job_store = JobStore(MemoryStore())
    with pytest.warns(CacheWarning, match="unavailable") as record:
        run_locally(flow, store=job_store, cache=CacheStore(backend, tmp_path / "o"), log=False,
                    ensure_success=True)  # fmt: skip
    assert len([w for w in record if issubclass(w.category, CacheWarning)]) == 1
    assert [job_store.get_output(j.uuid, load=True) for j in flow] == [3, 7]
    assert counts() == {"add": 2}


def test_a_server_restart_and_outage(pg_cluster: Any) -> None:
    backend = PostgresBackend(pg_cluster.uri, table="restart", pool_size=2, connect_timeout=2)
    backend.connect()
    backend.write([entry_doc("a" * 32, hits=1)])
    pg_cluster.stop("immediate")  # every pooled connection breaks
    with pytest.raises(StoreUnavailableError):
        backend.read("a" * 32)
    with pytest.raises(StoreUnavailableError):
        backend.write([entry_doc("b" * 32)])
    pg_cluster.start()
    deadline = time.monotonic() + 60
    while True:  # the pool reconnects by itself
        try:
            assert backend.read("a" * 32) == entry_doc("a" * 32, hits=1)
            break
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    backend.write([entry_doc("b" * 32)])
    assert backend.count() == 2
    backend.close()


def test_stale_connections_are_replaced_transparently(pg_cluster: Any) -> None:
    backend = PostgresBackend(pg_cluster.uri, table="stale", pool_size=3)
    backend.connect()
    backend.write([entry_doc("a" * 32)])
    pg_cluster.stop("fast")
    pg_cluster.start()
    assert backend.read("a" * 32) == entry_doc("a" * 32)  # retried on a fresh connection
    assert backend.claim("x", "me", 10) == "me"
    backend.close()
