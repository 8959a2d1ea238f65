"""SQLiteBackend migrates a cache written by SQLiteStore (jobflow-cache 0.1.0's embedded store):
tests/data/cache-v0.1.0.sqlite, with the documents that store returned in the sidecar
cache-v0.1.0.expected.json (see tests/data/README-cache-fixture.md)."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from jobflow_cache.backends.base import UNREADABLE
from jobflow_cache.backends.sqlite import SQLiteBackend

DATA = Path(__file__).resolve().parents[1] / "data"
FIXTURE = DATA / "cache-v0.1.0.sqlite"


def _dates(obj: dict[str, Any]) -> Any:
    return datetime.fromisoformat(obj["$date"]) if list(obj) == ["$date"] else obj


EXPECTED = json.loads((DATA / "cache-v0.1.0.expected.json").read_text(), object_hook=_dates)


@pytest.fixture
def old_file(tmp_path: Path) -> Path:
    copy = tmp_path / "cache.sqlite"
    shutil.copyfile(FIXTURE, copy)
    return copy


def test_migration_keeps_every_document(old_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = SQLiteBackend(old_file)
    with caplog.at_level(logging.INFO, logger="jobflow_cache.backends.sqlite"):
        backend.connect()
    assert [r.getMessage() for r in caplog.records if "migrated" in r.getMessage()] == [
        f"migrated 7 entries of {old_file} to the fixed schema"
    ]
    documents = EXPECTED["documents"]
    assert len(documents) == 5
    for digest, doc in documents.items():
        assert backend.read(digest) == doc, digest
    # what the new schema answers from its columns and tables
    assert backend.read("b" * 32)["packed"]["output"].startswith("zlib:")
    assert backend.count({"valid": False}) == 1
    assert backend.read("d" * 32)["hits"] == 3
    assert dict(backend.consumers()) == {"e" * 32: ["a" * 32, "b" * 32]}
    assert backend.totals().hits == 3
    for digest in EXPECTED["unreadable"]:
        doc = backend.read(digest)
        assert set(doc) == {"digest", UNREADABLE}, doc
    assert backend.count() == 7
    backend.close()


def test_a_cache_kept_in_sqlitestores_default_table_is_migrated_too(
    old_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """0.1.0's SQLiteStore named its collection ``cache`` when a spec named none
    (``{"type": "SQLiteStore", "path": p}``): that table is migrated like ``entries``, so the
    entries a hand-written spec kept are still served, not silently recomputed."""
    with sqlite3.connect(old_file) as db:
        db.execute("ALTER TABLE entries RENAME TO cache")
        for table in ("jobflow_cache_collections", "jobflow_cache_array_paths"):
            db.execute(f"UPDATE {table} SET collection = 'cache' WHERE collection = 'entries'")
    backend = SQLiteBackend(old_file)
    with caplog.at_level(logging.INFO, logger="jobflow_cache.backends.sqlite"):
        backend.connect()
    assert [r.getMessage() for r in caplog.records if "migrated" in r.getMessage()] == [
        f"migrated 7 entries of {old_file} (table cache) to the fixed schema"
    ]
    for digest, doc in EXPECTED["documents"].items():
        assert backend.read(digest) == doc, digest
    assert backend.count() == 7
    backend.close()
    with sqlite3.connect(old_file) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "cache" not in tables
    assert "jfc_entries" in tables


def test_migration_keeps_claims_and_aliases(old_file: Path) -> None:
    backend = SQLiteBackend(old_file)
    assert backend.get_aliases(list(EXPECTED["aliases"])) == EXPECTED["aliases"]
    for name, owner in EXPECTED["claims"].items():
        assert backend.claim(name, "someone else", 60) == owner
    backend.close()


def test_the_old_tables_are_gone_and_a_second_connect_does_nothing(
    old_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    SQLiteBackend(old_file).connect()
    conn = sqlite3.connect(old_file)
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "entries" not in tables
    assert conn.execute("SELECT count(*) FROM jobflow_cache_collections").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM jobflow_cache_array_paths").fetchone() == (0,)
    assert conn.execute("SELECT version FROM jfc_schema").fetchall() == [(1,)]
    conn.close()
    again = SQLiteBackend(old_file)
    with caplog.at_level(logging.INFO, logger="jobflow_cache.backends.sqlite"):
        again.connect()
    assert not [r for r in caplog.records if "migrated" in r.getMessage()]
    assert again.count() == 7


def test_other_collections_are_left_alone(old_file: Path) -> None:
    conn = sqlite3.connect(old_file, isolation_level=None)
    conn.execute("CREATE TABLE other (key TEXT PRIMARY KEY, doc TEXT NOT NULL)")
    conn.execute(
        "INSERT INTO jobflow_cache_collections (collection, key_field, format) "
        "VALUES ('other', 'uuid', 1)"
    )
    conn.close()
    SQLiteBackend(old_file).connect()
    conn = sqlite3.connect(old_file)
    assert conn.execute("SELECT collection FROM jobflow_cache_collections").fetchall() == [
        ("other",)
    ]
    assert conn.execute("SELECT count(*) FROM other").fetchone() == (0,)


def test_a_collection_with_another_key_is_not_migrated(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(
        "CREATE TABLE jobflow_cache_collections (collection TEXT PRIMARY KEY, key_field TEXT "
        "NOT NULL, format INTEGER NOT NULL, analyzed_rows INTEGER NOT NULL DEFAULT 0)"
    )
    conn.execute("INSERT INTO jobflow_cache_collections VALUES ('entries', 'uuid', 1, 0)")
    conn.execute("CREATE TABLE entries (key TEXT PRIMARY KEY, doc TEXT NOT NULL)")
    conn.execute("""INSERT INTO entries VALUES ('"u1"', '{"uuid": "u1"}')""")
    conn.close()
    backend = SQLiteBackend(path)
    assert backend.count() == 0
    backend.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM entries").fetchone() == (1,)


def test_two_processes_opening_at_once_migrate_once(
    old_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backends = [SQLiteBackend(old_file) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="jobflow_cache.backends.sqlite"):
        threads = [threading.Thread(target=b.connect) for b in backends]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len([r for r in caplog.records if "migrated" in r.getMessage()]) == 1
    assert [b.count() for b in backends] == [7, 7, 7]


def test_an_old_row_this_schema_cannot_hold_reads_as_unreadable(old_file: Path) -> None:
    conn = sqlite3.connect(old_file, isolation_level=None)
    conn.execute(
        "INSERT INTO entries (key, doc) VALUES (?, ?)",
        ('"77"', '{"digest": "77", "seen": {"$date": "2024-01-01T00:00:00.000000Z"}}'),
    )
    conn.close()
    doc = SQLiteBackend(old_file).read("77")
    assert doc is not None
    assert "old format" in doc[UNREADABLE]
