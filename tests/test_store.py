"""CacheStore over real maggma stores (MemoryStore and our SQLiteStore), and the entry schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from maggma.stores import MemoryStore
from monty.json import MontyDecoder

from jobflow_cache import (
    MISS,
    SCHEME,
    CacheEntry,
    CacheSettings,
    CacheStore,
    Outcome,
    SQLiteStore,
    StoreUnavailableError,
    store_from_spec,
)


def entry(digest: str = "a" * 32, output: str = '{"x": 1}', **kw) -> CacheEntry:
    return CacheEntry(digest=digest, scheme=SCHEME, function="m:f", output=output, **kw)


@pytest.fixture(params=["memory", "sqlite"])
def store(request, tmp_path: Path):
    inner = MemoryStore() if request.param == "memory" else SQLiteStore(tmp_path / "c.sqlite")
    with CacheStore(inner, objects_dir=tmp_path / "objects") as cache:
        yield cache


def test_put_then_lookup_round_trips(store):
    assert store.get("a" * 32) is MISS
    assert store.lookup("a" * 32).outcome is Outcome.MISS
    original = entry(arg_digests={"x": "1" * 32}, input_refs={"u": "d" * 32})
    store.put(original)
    found = store.lookup("a" * 32)
    assert found.outcome is Outcome.HIT
    assert found.entry is not None
    assert found.entry.output == '{"x": 1}'
    assert found.entry.arg_digests == {"x": "1" * 32}
    assert found.entry.checksum == original.checksum != ""
    assert "a" * 32 in store
    assert "b" * 32 not in store
    assert store.count() == 1


def test_miss_is_a_falsy_sentinel_not_none():
    assert MISS is not None
    assert not MISS
    assert repr(MISS) == "MISS"


def test_tampered_entry_is_invalid(store):
    store.put(entry())
    doc = store.store.query_one({"digest": "a" * 32})
    doc["output"] = '{"x": 2}'
    store.store.update(doc, key="digest")
    found = store.lookup("a" * 32)
    assert found.outcome is Outcome.INVALID
    assert "checksum" in found.reason
    assert store.get("a" * 32) is MISS


def test_old_scheme_and_invalid_flag_are_not_served(store):
    store.put(entry("b" * 32))
    doc = store.store.query_one({"digest": "b" * 32})
    doc["scheme"] = "jfc0"
    store.store.update(doc, key="digest")
    assert "scheme" in store.lookup("b" * 32).reason

    store.put(entry("c" * 32))
    assert store.invalidate("c" * 32, "bad pseudopotential")
    found = store.lookup("c" * 32)
    assert found.outcome is Outcome.INVALID
    assert "bad pseudopotential" in found.reason
    assert not store.invalidate("f" * 32, "absent")


def test_undecodable_document_is_invalid(store):
    store.store.update({"digest": "d" * 32, "output": 5}, key="digest")
    found = store.lookup("d" * 32)
    assert found.outcome is Outcome.INVALID
    assert "does not decode" in found.reason


def test_record_hit_counts(store):
    store.put(entry())
    store.record_hit("a" * 32)
    store.record_hit("a" * 32)
    found = store.lookup("a" * 32).entry
    assert found is not None
    assert found.hits == 2
    assert found.last_hit is not None
    assert store.lookup("a" * 32).outcome is Outcome.HIT, "hits are outside the checksum"


def test_remove_and_find(store):
    for i in range(3):
        store.put(entry(str(i) * 32))
    assert sorted(d["digest"] for d in store.find(properties=["digest"])) == [
        str(i) * 32 for i in range(3)
    ]
    store.remove(["0" * 32, "1" * 32])
    assert store.count() == 1
    assert [e.digest for e in store.entries()] == ["2" * 32]


def test_cache_store_is_msonable(tmp_path):
    cache = CacheStore(SQLiteStore(tmp_path / "x.sqlite"), objects_dir=tmp_path / "o")
    revived = MontyDecoder().process_decoded(json.loads(json.dumps(cache.as_dict())))
    assert isinstance(revived, CacheStore)
    assert revived.objects_dir == str(tmp_path / "o")
    assert revived.store.key == "digest"
    assert revived.store == cache.store


def test_from_settings_uses_the_embedded_default(tmp_path):
    settings = CacheSettings(DIR=tmp_path / "here")
    with CacheStore.from_settings(settings) as cache:
        cache.put(entry())
    assert (tmp_path / "here" / "cache.sqlite").exists()
    assert CacheStore.from_settings(settings).objects_dir == str(tmp_path / "here" / "objects")


def test_store_specs_like_jobflow(tmp_path):
    mem = store_from_spec({"type": "MemoryStore", "collection_name": "x"})
    assert isinstance(mem, MemoryStore)
    lite = store_from_spec({"type": "SQLiteStore", "path": str(tmp_path / "s.sqlite")})
    assert isinstance(lite, SQLiteStore)
    serialized = store_from_spec(lite.as_dict())
    assert serialized == lite
    with pytest.raises(StoreUnavailableError, match="unknown store type"):
        store_from_spec({"type": "NoSuchStore"})
    with pytest.raises(StoreUnavailableError, match="malformed"):
        store_from_spec({"type": "MemoryStore", "no_such_argument": 1})
    with pytest.raises(StoreUnavailableError):
        store_from_spec({"database": "x"})


def test_connect_failure_is_a_cache_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = CacheStore(SQLiteStore(blocker / "c.sqlite"), objects_dir=tmp_path)
    with pytest.raises(StoreUnavailableError):
        cache.connect()


def test_checksum_covers_served_fields_only():
    e = entry().seal()
    assert e.checksum == e.compute_checksum()
    for change in ({"output": "2"}, {"response": '{"stop_children":true}'}, {"source_dir": "/x"}):
        assert e.model_copy(update=change).compute_checksum() != e.checksum
    for change in ({"hits": 9}, {"valid": False}, {"name": "renamed"}):
        assert e.model_copy(update=change).compute_checksum() == e.checksum


def test_entry_document_round_trip():
    e = entry(files_size=3).seal()
    doc = e.to_document()
    assert CacheEntry.from_document({**doc, "_id": "x"}) == e


def test_store_spec_from_a_file(tmp_path):
    spec = tmp_path / "store.yaml"
    spec.write_text(f"type: SQLiteStore\npath: {tmp_path / 'f.sqlite'}\nkey: digest\n")
    store = store_from_spec(str(spec))
    assert isinstance(store, SQLiteStore)
    assert Path(store.path) == tmp_path / "f.sqlite"
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        store_from_spec(str(tmp_path / "missing.yaml"))
    with CacheStore.from_settings(CacheSettings(STORE=str(spec), DIR=tmp_path)) as cache:
        cache.put(entry())
    assert (tmp_path / "f.sqlite").exists()
