"""CacheStore over a maggma store (MemoryStore) and the embedded backend, store specs (those of
earlier releases too), and the entry schema."""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from maggma.stores import JSONStore, MemoryStore
from monty.json import MontyDecoder

from jobflow_cache import (
    MISS,
    SCHEME,
    CacheEntry,
    CacheSettings,
    CacheStore,
    Outcome,
    PostgresBackend,
    SQLiteBackend,
    StoreUnavailableError,
    store_from_spec,
)
from jobflow_cache.store import WriteBehind


def entry(digest: str = "a" * 32, output: str = '{"x": 1}', **kw) -> CacheEntry:
    return CacheEntry(digest=digest, scheme=SCHEME, function="m:f", output=output, **kw)


@pytest.fixture(params=["memory", "embedded"])
def store(request, tmp_path: Path):
    inner = {
        "memory": MemoryStore,
        "embedded": lambda: SQLiteBackend(tmp_path / "cache.sqlite"),
    }[request.param]()
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
    doc = store.backend.read("a" * 32)
    doc["output"] = '{"x": 2}'
    store.backend.write([doc])
    found = store.lookup("a" * 32)
    assert found.outcome is Outcome.INVALID
    assert "checksum" in found.reason
    assert store.get("a" * 32) is MISS


def test_old_scheme_and_invalid_flag_are_not_served(store):
    store.put(entry("b" * 32))
    doc = store.backend.read("b" * 32)
    doc["scheme"] = "jfc0"
    store.backend.write([doc])
    assert "scheme" in store.lookup("b" * 32).reason

    store.put(entry("c" * 32))
    assert store.invalidate("c" * 32, "bad pseudopotential")
    found = store.lookup("c" * 32)
    assert found.outcome is Outcome.INVALID
    assert "bad pseudopotential" in found.reason
    assert not store.invalidate("f" * 32, "absent")


def test_undecodable_document_is_invalid(store):
    store.backend.write([{"digest": "d" * 32, "output": 5}])
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
    cache = CacheStore(JSONStore(str(tmp_path / "x.json"), read_only=False), tmp_path / "o")
    revived = MontyDecoder().process_decoded(json.loads(json.dumps(cache.as_dict())))
    assert isinstance(revived, CacheStore)
    assert revived.objects_dir == str(tmp_path / "o")
    assert revived.store.key == "digest"
    assert revived.store == cache.store


def test_cache_store_on_the_embedded_backend_is_msonable(tmp_path):
    cache = CacheStore(SQLiteBackend(tmp_path / "x.sqlite"), objects_dir=tmp_path / "o")
    revived = MontyDecoder().process_decoded(json.loads(json.dumps(cache.as_dict())))
    assert isinstance(revived.backend, SQLiteBackend)
    assert revived.backend.path == str(tmp_path / "x.sqlite")
    with revived:
        revived.put(entry())
    with cache:
        assert cache.get("a" * 32) != MISS


def test_from_settings_uses_the_embedded_default(tmp_path):
    settings = CacheSettings(DIR=tmp_path / "here")
    with CacheStore.from_settings(settings) as cache:
        cache.put(entry())
    assert (tmp_path / "here" / "cache.sqlite").exists()
    assert CacheStore.from_settings(settings).objects_dir == str(tmp_path / "here" / "objects")


def test_store_specs_like_jobflow(tmp_path):
    mem = store_from_spec({"type": "MemoryStore", "collection_name": "x"})
    assert isinstance(mem, MemoryStore)
    assert store_from_spec(mem.as_dict()) == mem
    lite = store_from_spec({"type": "SQLiteBackend", "path": str(tmp_path / "s.sqlite")})
    assert isinstance(lite, SQLiteBackend)
    serialized = store_from_spec(lite.as_dict())
    assert isinstance(serialized, SQLiteBackend)
    assert (serialized.path, serialized.timeout) == (lite.path, lite.timeout)
    pg = store_from_spec({"type": "PostgresBackend", "uri": "postgresql://u:pw@h/db", "table": "t"})
    assert isinstance(pg, PostgresBackend)
    assert store_from_spec(pg.as_dict()).name == "postgresql://u@h/db/t"
    with pytest.raises(StoreUnavailableError, match="unknown store type"):
        store_from_spec({"type": "NoSuchStore"})
    with pytest.raises(StoreUnavailableError, match="malformed"):
        store_from_spec({"type": "MemoryStore", "no_such_argument": 1})
    with pytest.raises(StoreUnavailableError, match="malformed"):
        store_from_spec({"type": "SQLiteBackend"})  # no path
    with pytest.raises(StoreUnavailableError):
        store_from_spec({"database": "x"})


# -- specs of the stores earlier releases kept the cache in ----------------------------------------
# 0.1.0 kept the cache in its own maggma stores, SQLiteStore and PostgresStore (removed since);
# users have their specs in settings files and JOBFLOW_CACHE_STORE. These are the spec forms
# 0.1.0 wrote or documented, as it wrote them.
OLD_SQLITE = {  # SQLiteStore(path, collection_name="entries", key="digest").as_dict() of 0.1.0
    "@module": "jobflow_cache.sqlite_store",
    "@class": "SQLiteStore",
    "@version": "0.1.0",
    "collection_name": "entries",
    "key": "digest",
    "last_updated_field": "last_updated",
    "timeout": 7.0,
}
OLD_POSTGRES = {  # PostgresStore(uri, table="shared").as_dict() of 0.1.0
    "@module": "jobflow_cache.postgres_store",
    "@class": "PostgresStore",
    "@version": "0.1.0",
    "uri": "postgresql://jfc:secret@db.example.org:5432/cache",
    "table": "shared",
    "key": "digest",
    "pool_size": 3,
    "connect_timeout": 4.0,
}


def _old_sqlite_specs(path: Path) -> list[dict]:
    return [
        {"type": "SQLiteStore", "path": str(path)},
        {"type": "SQLiteStore", "path": str(path), "collection_name": "entries", "timeout": 7},
        {"type": "SQLiteStore", "path": str(path), "key": "digest"},
        {"type": "SQLiteStore", "path": str(path), "collection_name": "cache"},
        {**OLD_SQLITE, "path": str(path)},
    ]


@pytest.mark.parametrize("form", range(5))
def test_an_old_sqlite_store_spec_opens_the_embedded_backend(tmp_path, form):
    path = tmp_path / "cache.sqlite"
    spec = _old_sqlite_specs(path)[form]
    backend = store_from_spec(spec)
    assert isinstance(backend, SQLiteBackend)
    assert backend.path == str(path)
    assert backend.timeout == (7.0 if "timeout" in spec else 30.0)
    with CacheStore.from_settings(CacheSettings(STORE=spec, DIR=tmp_path / "d")) as cache:
        assert cache.backend.path == str(path)
        cache.put(entry())
    with CacheStore(SQLiteBackend(path), tmp_path / "o") as cache:
        assert cache.get("a" * 32) is not MISS


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "PostgresStore", "uri": OLD_POSTGRES["uri"], "table": "shared"},
        {"type": "PostgresStore", "uri": OLD_POSTGRES["uri"], "table": "shared", "key": "digest",
         "pool_size": 3, "connect_timeout": 4, "validator": None},
        OLD_POSTGRES,
    ],
)  # fmt: skip
def test_an_old_postgres_store_spec_opens_postgres_backend(spec):
    backend = store_from_spec(spec)
    assert isinstance(backend, PostgresBackend)
    assert (backend.uri, backend.table) == (OLD_POSTGRES["uri"], "shared")
    if "pool_size" in spec:
        assert (backend.pool_size, backend.connect_timeout) == (3, 4.0)
    cache = CacheStore.from_settings(CacheSettings(STORE=spec))  # connects only when used
    assert cache.backend.name == "postgresql://jfc@db.example.org:5432/cache/shared"
    assert "secret" not in repr(cache.backend)


@pytest.mark.parametrize(
    ("spec", "instead"),
    [
        ({**OLD_SQLITE, "path": "x.sqlite", "collection_name": "outputs"}, "SQLiteBackend"),
        ({"type": "SQLiteStore", "path": "x.sqlite", "key": "uuid"}, "JSONStore"),
        ({"type": "SQLiteStore"}, "needs a 'path'"),
        ({"type": "PostgresStore", "uri": OLD_POSTGRES["uri"], "key": "uuid"}, "PostgresBackend"),
        ({**OLD_POSTGRES, "table": "t" * 49}, "PostgresBackend"),
    ],
)
def test_an_old_spec_that_cannot_be_honoured_says_what_to_use(spec, instead, tmp_path):
    with pytest.raises(StoreUnavailableError, match=instead):
        store_from_spec(spec)
    with pytest.raises(StoreUnavailableError, match=instead):  # a run: cache off, one warning
        CacheStore.from_settings(CacheSettings(STORE=spec, DIR=tmp_path))


def test_an_old_sqlite_store_spec_in_the_environment_runs_the_flow_cached(tmp_path, monkeypatch):
    from jobflow import Flow, JobStore

    from jobflow_cache import run_locally
    from tests.support import jobs

    path = tmp_path / "cache.sqlite"
    monkeypatch.setenv(
        "JOBFLOW_CACHE_STORE", json.dumps({"type": "SQLiteStore", "path": str(path)})
    )
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(tmp_path / "dir"))
    for _ in range(2):
        run_locally(Flow([jobs.add(1, 2)]), store=JobStore(MemoryStore()), log=False)
    with CacheStore(SQLiteBackend(path), tmp_path / "o") as cache:
        ((doc,),) = [list(cache.find())]
        assert doc["hits"] == 1


@pytest.mark.parametrize("which", ["sqlite", "postgres"])
def test_a_cache_store_serialized_by_an_earlier_release_loads(tmp_path, which):
    """``CacheStore.as_dict()`` of 0.1.0, with its SQLiteStore or PostgresStore inside (as a
    flow or a settings file may hold it): from_dict opens the same cache on the backend."""
    inner = (
        {**OLD_SQLITE, "path": str(tmp_path / "cache.sqlite")}
        if which == "sqlite"
        else OLD_POSTGRES
    )
    old = {
        "@module": "jobflow_cache.store",
        "@class": "CacheStore",
        "@version": "0.1.0",
        "store": inner,
        "objects_dir": str(tmp_path / "objects"),
        "blob_store": None,
        "blob_threshold": 8388608,
    }
    for revived in (
        CacheStore.from_dict(old),
        MontyDecoder().process_decoded(json.loads(json.dumps(old))),
    ):
        assert isinstance(revived, CacheStore)
        assert revived.objects_dir == str(tmp_path / "objects")
        if which == "postgres":
            assert isinstance(revived.backend, PostgresBackend)
            assert revived.backend.table == "shared"
            continue
        assert isinstance(revived.backend, SQLiteBackend)
        assert revived.backend.path == str(tmp_path / "cache.sqlite")
        with revived:
            revived.put(entry())
            assert revived.get("a" * 32) is not MISS
        # and it serializes as what it now is
        again = CacheStore.from_dict(revived.as_dict())
        assert isinstance(again.backend, SQLiteBackend)


def test_a_cache_store_serialized_with_an_unusable_old_store_says_so(tmp_path):
    old = {
        "@module": "jobflow_cache.store",
        "@class": "CacheStore",
        "store": {**OLD_SQLITE, "path": str(tmp_path / "x.sqlite"), "collection_name": "outputs"},
        "objects_dir": str(tmp_path / "objects"),
    }
    with pytest.raises(StoreUnavailableError, match="SQLiteStore was removed"):
        CacheStore.from_dict(old)


def test_a_backend_is_refused_where_a_maggma_store_must_go(tmp_path):
    spec = {"type": "SQLiteStore", "path": str(tmp_path / "blobs.sqlite")}
    settings = CacheSettings(DIR=tmp_path, BLOB_STORE=spec)
    cache = CacheStore.from_settings(settings)  # a bad blob store fails connect(), not this
    with pytest.raises(StoreUnavailableError, match="a blob store must be a maggma store"):
        cache.connect()


def test_connect_failure_is_a_cache_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = CacheStore(SQLiteBackend(blocker / "c.sqlite"), objects_dir=tmp_path)
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
    spec.write_text(f"type: SQLiteBackend\npath: {tmp_path / 'f.sqlite'}\n")
    store = store_from_spec(str(spec))
    assert isinstance(store, SQLiteBackend)
    assert Path(store.path) == tmp_path / "f.sqlite"
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        store_from_spec(str(tmp_path / "missing.yaml"))
    with CacheStore.from_settings(CacheSettings(STORE=str(spec), DIR=tmp_path)) as cache:
        cache.put(entry())
    assert (tmp_path / "f.sqlite").exists()


# -- reading an entry to serve it ------------------------------------------------------------------
def test_serving_lookup_leaves_out_what_only_explains_a_miss(store):
    store.put(entry(arg_digests={"x": "1" * 32}, canonical_input={"x": ["int", 1]}))
    served = store.lookup("a" * 32, serving=True)
    assert served.outcome is Outcome.HIT
    assert served.entry is not None
    assert served.entry.arg_digests == {}
    assert served.entry.canonical_input is None
    assert served.entry.output == '{"x": 1}'
    full = store.lookup("a" * 32)
    assert full.entry is not None
    assert full.entry.arg_digests == {"x": "1" * 32}
    assert full.entry.canonical_input == {"x": ["int", 1]}


@pytest.mark.parametrize("serving", [False, True])
def test_raw_checksum_never_serves_an_altered_entry(store, serving):
    """The checksum of the fields as stored decides only when it matches; any change to a
    served field (output, files, source) is still caught."""
    store.put(entry(input_refs={"u": "d" * 32}))
    for field, value in (
        ("output", '{"x": 2}'),
        ("source_dir", "/elsewhere"),
        ("input_refs", {"u": "e" * 32}),
        ("files", [{"path": "a", "size": 1, "xxh3": "0" * 32, "mode": 420}]),
    ):
        doc = store.backend.read("a" * 32)
        doc.pop("_id", None)
        kept = doc[field]
        doc[field] = value
        store.backend.write([doc])
        found = store.lookup("a" * 32, serving=serving)
        assert found.outcome is Outcome.INVALID, field
        assert "checksum" in found.reason
        doc[field] = kept
        store.backend.write([doc])
        assert store.lookup("a" * 32, serving=serving).outcome is Outcome.HIT


def test_entry_stored_in_another_number_form_is_still_checked_by_its_fields(tmp_path):
    """A backend may give 1.0 for 1: the raw checksum then differs, and the decoded entry's
    checksum decides, as before."""
    with CacheStore(MemoryStore(), objects_dir=tmp_path / "o") as cache:
        cache.put(entry(source_index=1))
        doc = cache.backend.read("a" * 32)
        doc.pop("_id", None)
        doc["source_index"] = 1.0
        cache.backend.write([doc])
        found = cache.lookup("a" * 32)
        assert found.outcome is Outcome.HIT
        assert found.entry is not None
        assert found.entry.source_index == 1


def test_sealed_document_checksum_is_compute_checksum():
    rich = entry(
        output='{"e": -1.5}',
        response='{"stop_children":true}',
        files=[{"path": "sub/OUTCAR", "size": 3, "xxh3": "f" * 32, "mode": 0o644}],
        source_uuid="u" * 36,
        source_index=2,
        source_dir="/run",
        input_refs={"x" * 36: "d" * 32},
        cache_version="2",
    )
    doc = rich.sealed_document()
    assert doc["checksum"] == rich.checksum == rich.compute_checksum()
    assert CacheEntry.from_document(doc).compute_checksum() == rich.checksum


def _document_reference(e: CacheEntry) -> dict:
    """The document as ``CacheEntry._document`` built it before it left ``canonical_input``
    out of ``model_dump``: the whole model dumped, then the fields stored otherwise."""
    doc = e.model_dump(mode="json")
    doc["created"] = e.created
    doc["last_hit"] = e.last_hit
    if e.canonical_input is not None:
        doc["canonical_input"] = orjson.dumps(e.canonical_input).decode()
    doc["files_skipped"] = [[path, size] for path, size in e.files_skipped.items()]
    return doc


_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
_MOMENTS = st.datetimes(timezones=st.just(timezone.utc))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    canonical=st.none() | st.dictionaries(st.text(max_size=4), _JSON, max_size=4),
    skipped=st.dictionaries(st.text(max_size=6), st.integers(0, 2**40), max_size=3),
    last_hit=st.none() | _MOMENTS,
    created=_MOMENTS,
    hits=st.integers(0, 10**6),
    files=st.booleans(),
    maker=st.none() | st.text(max_size=8),
)
def test_documents_keep_the_model_dump_form(
    canonical, skipped, last_hit, created, hits, files, maker
) -> None:
    """An entry's document, with ``canonical_input`` written apart from ``model_dump``, is the
    whole model's dump exactly: same keys in the same order, same values (and so the same
    checksum and the same stored texts)."""
    e = entry(
        canonical_input=canonical,
        files_skipped=skipped,
        last_hit=last_hit,
        created=created,
        hits=hits,
        maker=maker,
        arg_digests={"x": "1" * 32},
        versions={"python": "3"},
        files=[{"path": "OUTCAR", "size": 3, "xxh3": "f" * 32, "mode": 0o644}] if files else [],
    )
    expected = _document_reference(e)
    assert list(e.to_document().items()) == list(expected.items())
    sealed = e.model_copy().sealed_document()
    assert sealed["checksum"] == e.compute_checksum()
    assert {k: v for k, v in sealed.items() if k not in ("checksum", "signature")} == {
        k: v for k, v in expected.items() if k not in ("checksum", "signature")
    }
    assert CacheEntry.from_document(e.to_document()) == e


# -- writing in batches ----------------------------------------------------------------------------
def test_put_many_and_record_hits(store):
    entries = [entry(f"{i:032x}", output=str(i)) for i in range(5)]
    store.put_many(entries)
    assert store.count() == 5
    when = datetime(2024, 5, 1, tzinfo=timezone.utc)
    store.record_hits({f"{0:032x}": (3, when), f"{4:032x}": (1, when), "f" * 32: (1, when)})
    hits = {d["digest"]: d.get("hits") for d in store.find(properties=["digest", "hits"])}
    assert hits == {f"{i:032x}": {0: 3, 4: 1}.get(i, 0) for i in range(5)}
    found = store.get(f"{0:032x}")
    assert found.last_hit.replace(tzinfo=timezone.utc) == when
    assert all(store.lookup(e.digest).outcome is Outcome.HIT for e in entries)


def test_write_behind_queues_then_writes_on_flush(store):
    writer = WriteBehind(store, delay=3600)  # nothing is due: only flush writes
    writer.put(entry("b" * 32))
    writer.hit("b" * 32)  # counted on the queued entry itself
    store.put(entry("c" * 32))
    writer.hit("c" * 32)
    writer.hit("c" * 32)
    assert store.count() == 1
    assert writer.pending("b" * 32) is not None
    assert writer.pending("c" * 32) is None  # written: not this writer's
    writer.flush()
    assert writer.pending("b" * 32) is None
    assert store.get("b" * 32).hits == 1
    assert store.get("c" * 32).hits == 2
    writer.close()
    assert writer.take_errors() == []


def test_write_behind_writes_by_itself_when_due(store):
    writer = WriteBehind(store, delay=0.01)
    writer.put(entry("b" * 32))
    writer.put(entry("c" * 32))  # the caller writes once the oldest item is due ...
    deadline = time.monotonic() + 30
    while store.count() < 2 and time.monotonic() < deadline:
        time.sleep(0.01)  # ... else the watchdog does
    assert store.count() == 2
    writer.close()


def test_write_behind_lets_hit_counts_wait_longer_than_entries(store):
    """Hit counts alone are written once ``hit_delay`` old; an entry queued makes the queue
    due at ``delay`` (the job thread writes it on its next item)."""
    store.put(entry("c" * 32))
    writer = WriteBehind(store, delay=0.01, hit_delay=3600)
    writer.hit("c" * 32)
    time.sleep(0.05)  # older than delay, and than the watchdog's 2 * delay
    writer.hit("c" * 32)
    assert store.get("c" * 32).hits == 0  # hits only: not due
    writer.put(entry("b" * 32))  # an entry waits: due at delay, written by this call
    assert store.get("b" * 32) is not MISS
    assert store.get("c" * 32).hits == 2
    writer.close()


def test_write_behind_watchdog_writes_an_entry_queued_behind_hit_counts(store):
    """While only hit counts wait, the watchdog sleeps ``hit_delay``; an entry queued then
    wakes it, so it is still written at about ``2 * delay`` when the job thread is busy."""
    store.put(entry("c" * 32))
    writer = WriteBehind(store, delay=0.2, hit_delay=3600)
    writer.hit("c" * 32)  # starts the watchdog, which sleeps long
    time.sleep(0.1)
    writer.put(entry("b" * 32))  # not due yet for this thread, which then stays away
    deadline = time.monotonic() + 30

    def written() -> bool:  # a batch writes its entries, then its hit counts: wait for both
        return store.get("b" * 32) is not MISS and store.get("c" * 32).hits == 1

    while not written() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.get("b" * 32) is not MISS
    assert store.get("c" * 32).hits == 1
    writer.close()


def test_write_behind_writes_a_full_batch_at_once(store):
    writer = WriteBehind(store, delay=3600, max_batch=3)
    for i in range(3):
        writer.put(entry(f"{i:032x}"))
    assert store.count() == 3
    assert all(writer.pending(f"{i:032x}") is None for i in range(3))
    writer.close()


def test_write_behind_reports_entries_it_could_not_write(tmp_path):
    cache = CacheStore(SQLiteBackend(tmp_path / "c.sqlite"), objects_dir=tmp_path / "o")
    cache.connect()
    writer = WriteBehind(cache, delay=3600)
    writer.put(entry("b" * 32))
    bad = entry("c" * 32)
    bad.duration = float("nan")  # a value the backend refuses to store: JSON has no NaN
    writer.put(bad)
    writer.flush()
    errors = writer.take_errors()
    assert [digests for digests, _ in errors] == [["c" * 32]]
    assert "NaN" in str(errors[0][1])
    assert cache.get("b" * 32) is not MISS  # one bad entry does not lose the others
    assert writer.take_errors() == []
    writer.close()
    cache.close()


def test_write_behind_only_for_stores_safe_across_threads(tmp_path):
    assert WriteBehind.supports(CacheStore(SQLiteBackend(tmp_path / "c.sqlite"), tmp_path))
    assert WriteBehind.supports(CacheStore(MemoryStore(), tmp_path))
    assert not WriteBehind.supports(CacheStore(JSONStore(str(tmp_path / "s.json")), tmp_path))


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_entries_with_reserved_keys_round_trip_on_every_backend(backend, tmp_path):
    """Tagged canonical nodes have NUL-prefixed keys (BSON forbids them) and file names are
    arbitrary ("$date" was 0.1.0's SQLiteStore's datetime tag): neither may reach a store as a
    key."""
    import bson

    nan_node = {"\x00float": "nan"}
    original = entry(canonical_input={"x": nan_node, "y": {"$date": 1}}, arg_digests={"x": "1"})
    original.files_skipped = {"$date": 7, "a.b/c": 9}
    doc = original.to_document()
    bson.encode({k: v for k, v in doc.items() if k not in ("created", "last_hit")})
    raw = SQLiteBackend(tmp_path / "c.sqlite") if backend == "sqlite" else MemoryStore()
    with CacheStore(raw, objects_dir=tmp_path / "o") as cache:
        cache.put(original)
        (back,) = cache.entries()
    assert back.canonical_input == {"x": nan_node, "y": {"$date": 1}}
    assert back.files_skipped == {"$date": 7, "a.b/c": 9}
    assert back.checksum == original.checksum


@pytest.mark.parametrize(
    "spec",
    [
        {"docs_store": {"type": "SQLiteStore", "path": "jobs.sqlite", "key": "uuid"}},
        {"type": "SQLiteStore", "path": "jobs.sqlite", "collection_name": "outputs"},
        {"docs_store": {"type": "MemoryStore"}, "additional_stores": {"data": OLD_POSTGRES}},
    ],
)
def test_a_jobstore_spec_naming_a_removed_store_says_what_to_use(spec):
    """cachetool explain --jobstore with a jobstore.yaml of 0.1.0's walkthrough."""
    from jobflow_cache.admin.explain import open_job_store

    removed = r"was removed after jobflow-cache 0\.1\.0; keep"
    with pytest.raises(StoreUnavailableError, match=removed):
        open_job_store(spec)


def test_lookup_decodes_its_document_once_within_the_store_limit(store, monkeypatch):
    """A hit is unpacked once, bounded by the store's own MAX_DECODED_SIZE: the settings
    (every JOBFLOW_CACHE_* variable) are not read again per lookup."""
    import jobflow_cache.entry as entry_module

    store.put(entry("d" * 32, output="[" + "1," * 40000 + "1]"))  # a packed output
    calls = []
    real = entry_module.unpack_document

    def counted(doc, limit=None):
        calls.append(limit)
        return real(doc, limit)

    monkeypatch.setattr(entry_module, "unpack_document", counted)
    monkeypatch.setattr("jobflow_cache.store.unpack_document", counted)
    found = store.lookup("d" * 32, serving=True)
    assert found.outcome is Outcome.HIT
    assert found.entry.output.startswith("[1,1")
    assert calls == [store.max_decoded_size]
