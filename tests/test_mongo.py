"""The MongoDB path of the cache: CacheStore over maggma's MongoStore, and large outputs in a
blob store.

Every test of the Mongo code path runs against a real MongoDB server when
``JOBFLOW_CACHE_TEST_MONGODB_URI`` is set (a maggma ``MongoURIStore`` configured like jobflow's
``JOB_STORE``, a fresh collection per test, dropped afterwards; blobs in the default
``GridFSStore``). Otherwise it runs on a substitute, named in the test id and marked
``@pytest.mark.substitute``: no MongoDB server can exist on this machine, so maggma's
``MemoryStore`` (mongomock, a ``MongoStore`` subclass: same ``update``/``query``/projection/
``$inc``/index code in maggma and in ``CacheStore``) stands in for the server, with a second
``MemoryStore`` as the blob store (GridFS cannot run on mongomock with this pymongo). A
``MemoryStore`` lives in one process, so the command-line tests use maggma's ``JSONStore``
(mongomock loaded from and saved to a JSON file) as their substitute.
"""

from __future__ import annotations

import json
import os
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bson
import pytest
from click.testing import CliRunner
from jobflow import Flow, JobStore, job
from jobflow.managers.local import run_locally as jobflow_run_locally
from maggma.core import Store
from maggma.stores import GridFSStore, JSONStore, MemoryStore, MongoStore, MongoURIStore
from monty.json import MontyDecoder
from monty.serialization import dumpfn

from jobflow_cache import (
    SCHEME,
    CacheEntry,
    CacheSettings,
    CacheStore,
    Outcome,
    SQLiteBackend,
    run_locally,
    store_from_spec,
)
from jobflow_cache.admin.purge import collect_garbage, purge
from jobflow_cache.admin.verify import ProblemKind, verify
from jobflow_cache.backends.maggma import INDEXED_FIELDS
from jobflow_cache.cli import cli
from jobflow_cache.store import BLOBS_KEY, WriteBehind, default_blob_store
from tests.support import jobs
from tests.support.jobs import executed

MONGODB_URI = os.environ.get("JOBFLOW_CACHE_TEST_MONGODB_URI", "")
REAL = bool(MONGODB_URI)

if REAL:
    BACKENDS = [pytest.param("mongodb", id="mongodb")]
else:
    # SUBSTITUTE: mongomock (maggma MemoryStore) for a MongoDB server, which cannot run here
    BACKENDS = [pytest.param("mongomock", id="substitute-mongomock", marks=pytest.mark.substitute)]

needs_server = pytest.mark.skipif(
    not REAL, reason="needs a MongoDB server: set JOBFLOW_CACHE_TEST_MONGODB_URI"
)


def _database() -> str:
    from pymongo import uri_parser

    return uri_parser.parse_uri(MONGODB_URI).get("database") or "jobflow_cache_test"


def _drop(collection: str) -> None:
    """Drop a test's collections (entries, GridFS blobs) from the real server."""
    from pymongo import MongoClient

    client: Any = MongoClient(MONGODB_URI, serverSelectionTimeoutMS=5000)
    try:
        db = client[_database()]
        for name in db.list_collection_names():
            if name == collection or name.startswith(collection + "_"):
                db.drop_collection(name)
    finally:
        client.close()


class Backend:
    """Stores of one test on the real server or the substitute."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.collection = f"jfc_{uuid.uuid4().hex[:12]}"

    def entries_spec(self) -> dict[str, Any]:
        """The entry store as jobflow's JOB_STORE would name it."""
        if self.kind == "mongodb":
            return {
                "type": "MongoURIStore",
                "uri": MONGODB_URI,
                "database": _database(),
                "collection_name": self.collection,
            }
        return {"type": "MemoryStore", "collection_name": self.collection}

    def cache(self, objects_dir: Path, **kwargs: Any) -> CacheStore:
        store = store_from_spec(self.entries_spec())
        if self.kind == "mongomock" and "blob_store" not in kwargs:
            kwargs["blob_store"] = MemoryStore(collection_name=self.collection + "_blobs")
        # on the server: the default blob store, GridFS in the same database
        return CacheStore(store, objects_dir=objects_dir, **kwargs)

    def cleanup(self) -> None:
        if self.kind == "mongodb":
            _drop(self.collection)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    made = Backend(request.param)
    yield made
    made.cleanup()


@pytest.fixture
def mongo(backend: Backend, tmp_path: Path) -> Iterator[CacheStore]:
    with backend.cache(tmp_path / "objects") as cache:
        yield cache


def entry(digest: str = "a" * 32, output: str = '{"x": 1}', **kw: Any) -> CacheEntry:
    return CacheEntry(digest=digest, scheme=SCHEME, function="m:f", output=output, **kw)


@job
def big_floats(n: int, seed: int = 0):
    """A large output: ``n`` random floats (about 20 bytes of JSON each, ~2x compressible)."""
    executed("big_floats")
    rng = random.Random(seed)
    return [rng.random() for _ in range(n)]


def all_jobs(flow: Flow) -> list:
    return [j for j, _ in flow.iterflow()]


def bson_size(doc: dict[str, Any]) -> int:
    return len(bson.encode({k: v for k, v in doc.items() if k != "_id"}))


# -- the store: indexes, projection, writes, hit counts ---------------------------------------
def test_connect_creates_a_unique_digest_index_that_rejects_duplicates(mongo: CacheStore):
    from pymongo.errors import DuplicateKeyError

    collection = mongo.store._collection
    indexes = collection.index_information()
    by_field = {tuple(k for k, _ in info["key"]): info for info in indexes.values()}
    assert by_field[("digest",)].get("unique") is True
    for field in INDEXED_FIELDS:
        assert (field,) in by_field, f"no index on {field}"
    mongo.put(entry())
    with pytest.raises(DuplicateKeyError):
        collection.insert_one({"digest": "a" * 32, "output": "other"})
    assert mongo.count() == 1
    mongo.connect()  # connecting again keeps the indexes and the entry
    assert mongo.count() == 1
    assert mongo.lookup("a" * 32).outcome is Outcome.HIT


def test_serving_lookup_uses_a_projection(mongo: CacheStore):
    mongo.put(entry(arg_digests={"x": "1" * 32}, canonical_input={"x": ["int", 1]}))
    served = mongo.lookup("a" * 32, serving=True)
    assert served.outcome is Outcome.HIT
    assert served.entry is not None
    assert (served.entry.arg_digests, served.entry.canonical_input) == ({}, None)
    full = mongo.lookup("a" * 32)
    assert full.entry is not None
    assert full.entry.canonical_input == {"x": ["int", 1]}
    raw = mongo.store.query_one({"digest": "a" * 32}, properties={"canonical_input": 0})
    assert "canonical_input" not in raw
    assert "output" in raw


def test_put_many_record_hit_invalidate_remove(mongo: CacheStore):
    mongo.put_many([entry(f"{i:032x}", output=str(i)) for i in range(5)])
    assert mongo.count() == 5
    assert [mongo.get(f"{i:032x}").output for i in range(5)] == [str(i) for i in range(5)]

    def hit_many() -> None:  # $inc is atomic: no hit is lost between threads
        for _ in range(25):
            mongo.record_hit("0" * 32)

    threads = [threading.Thread(target=hit_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    served = mongo.get("0" * 32)
    assert served.hits == 100
    assert served.last_hit is not None
    assert served.checksum == served.compute_checksum()  # book-keeping is not covered

    mongo.record_hits({f"{1:032x}": (3, served.last_hit), f"{2:032x}": (4, served.last_hit)})
    assert (mongo.get(f"{1:032x}").hits, mongo.get(f"{2:032x}").hits) == (3, 4)

    assert mongo.invalidate(f"{3:032x}", "bad pseudopotential")
    found = mongo.lookup(f"{3:032x}")
    assert found.outcome is Outcome.INVALID
    assert "bad pseudopotential" in found.reason
    assert not mongo.invalidate("f" * 32, "no such entry")

    mongo.remove([f"{3:032x}", f"{4:032x}"])
    assert mongo.count() == 3
    assert mongo.lookup(f"{4:032x}").outcome is Outcome.MISS


def test_write_behind_on_a_mongo_store(mongo: CacheStore):
    assert WriteBehind.supports(mongo)
    writer = WriteBehind(mongo, delay=3600)
    writer.put(entry("b" * 32))
    writer.hit("b" * 32)
    assert mongo.count() == 0
    writer.close()
    assert mongo.get("b" * 32).hits == 1


# -- real flows -------------------------------------------------------------------------------
def test_second_run_of_a_flow_serves_every_job(mongo: CacheStore, tmp_path: Path, counts):
    first_store = JobStore(MemoryStore())
    flow = jobs.issue_873_flow(1.5)
    first = run_locally(
        flow, log=False, store=first_store, cache=mongo, create_folders=True, root_dir=tmp_path
    )
    ran = counts.total()
    assert ran == 5
    assert mongo.count() == 5

    second_store = JobStore(MemoryStore())
    again = jobs.issue_873_flow(1.5)
    second = run_locally(
        again, log=False, store=second_store, cache=mongo, create_folders=True, root_dir=tmp_path
    )
    assert counts.total() == ran  # nothing ran again
    outcomes = [j.metadata["jobflow_cache"]["outcome"] for j in all_jobs(again)]
    assert outcomes == ["hit"] * 5

    def outputs(flow: Flow, responses: dict) -> list:
        return [responses[j.uuid][1].output for j in all_jobs(flow)]

    def strip_dirs(values: list) -> list:
        return [
            {k: v for k, v in value.items() if k != "dir_name"}
            if isinstance(value, dict)
            else value
            for value in values
        ]

    assert strip_dirs(outputs(again, second)) == strip_dirs(outputs(flow, first))
    static = next(j for j in all_jobs(again) if j.name == "static")
    folder = Path(second[static.uuid][1].output["dir_name"])
    assert (folder / "OUTCAR").read_text().startswith("steps=1 ")  # files linked back
    assert {d["digest"] for d in mongo.find({}, ["digest", "hits"])} == {
        j.metadata["jobflow_cache"]["digest"] for j in all_jobs(again)
    }
    assert sum(d["hits"] for d in mongo.find({}, ["hits"])) == 5


def test_cached_job_under_jobflow_manager_with_store_spec(
    backend: Backend, tmp_path: Path, counts, monkeypatch: pytest.MonkeyPatch
):
    """STORE given as a JSON spec, like jobflow's JOB_STORE; jobflow's own run_locally.

    With the substitute, the spec builds a fresh MemoryStore in each process; both runs use
    this process's default cache (one store) as a worker would use one server.
    """
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(backend.entries_spec()))
    monkeypatch.setenv("JOBFLOW_CACHE_OBJECTS_DIR", str(tmp_path / "objects"))

    def flow() -> Flow:
        a = jobs.cached_add(1, 2)
        b = jobs.cached_scale(a.output, factor=4)
        return Flow([a, b])

    f1 = flow()
    r1 = jobflow_run_locally(f1, log=False, store=JobStore(MemoryStore()))
    assert counts() == {"cached_add": 1, "cached_scale": 1}
    f2 = flow()
    r2 = jobflow_run_locally(f2, log=False, store=JobStore(MemoryStore()))
    assert counts() == {"cached_add": 1, "cached_scale": 1}
    assert r2[f2.jobs[1].uuid][1].output == r1[f1.jobs[1].uuid][1].output == 12
    assert f2.jobs[1].metadata["jobflow_cache"]["outcome"] == "hit"


# -- large outputs in the blob store ------------------------------------------------------------
@pytest.mark.slow
def test_output_over_16_mb_goes_to_the_blob_store(mongo: CacheStore, tmp_path: Path, counts):
    n = 1_000_000  # ~19 MB of JSON; ~9 MB compressed: over the 8 MiB threshold
    first = big_floats(n, seed=5)
    consumer = jobs.add(first.output[7], 1)  # a downstream job resolves the served output
    r1 = run_locally(Flow([first, consumer]), log=False, store=JobStore(MemoryStore()), cache=mongo)
    assert counts() == {"big_floats": 1, "add": 1}
    digest = first.metadata["jobflow_cache"]["digest"]
    raw = mongo.store.query_one({"digest": digest})
    size = bson_size(raw)
    assert size < mongo.blob_threshold < 16 * 1024 * 1024
    assert sorted(raw[BLOBS_KEY]) == ["output"]
    assert raw["output"] == ""
    assert "packed" not in raw
    assert mongo.blob_store is not None
    assert mongo.blob_store.count({"digest": digest}) == 1
    served_entry = mongo.get(digest)
    assert len(served_entry.output) > 16 * 1024 * 1024
    assert bson_size(served_entry.to_document()) > mongo.blob_threshold

    again = big_floats(n, seed=5)
    consumer2 = jobs.add(again.output[7], 1)
    r2 = run_locally(
        Flow([again, consumer2]), log=False, store=JobStore(MemoryStore()), cache=mongo
    )
    assert counts() == {"big_floats": 1, "add": 1}
    assert again.metadata["jobflow_cache"]["outcome"] == "hit"
    assert r2[again.uuid][1].output == r1[first.uuid][1].output
    assert r2[consumer2.uuid][1].output == r1[consumer.uuid][1].output


def test_small_outputs_stay_in_the_entry(mongo: CacheStore):
    mongo.put(entry("c" * 32, output="[" + "1.5, " * 30_000 + "1]"))  # packed, small
    raw = mongo.store.query_one({"digest": "c" * 32})
    assert "packed" in raw
    assert BLOBS_KEY not in raw
    assert mongo.blob_store is not None
    assert mongo.blob_store.count() == 0


def _big_entry(digest: str = "d" * 32, n: int = 60_000) -> CacheEntry:
    rng = random.Random(1)
    return entry(digest, output=json.dumps([rng.random() for _ in range(n)]))


@pytest.fixture
def small_threshold(backend: Backend, tmp_path: Path) -> Iterator[CacheStore]:
    """Moves every compressed output (> 64 KiB of text) to the blob store."""
    with backend.cache(tmp_path / "objects", blob_threshold=0) as cache:
        yield cache


def _delete_blob(cache: CacheStore, digest: str) -> None:
    assert cache.blob_store is not None
    cache.blob_store.remove_docs({"digest": digest})


def _alter_blob(cache: CacheStore, digest: str, other: CacheEntry) -> None:
    """Replace the blob of ``digest`` with the blob of another, valid output."""
    assert cache.blob_store is not None
    _, blob = cache._split(other.sealed_document())
    assert blob is not None
    cache.blob_store.update({**blob, "digest": digest}, key="digest")


@pytest.mark.parametrize("fault", ["missing", "altered"])
def test_a_missing_or_altered_blob_is_never_served(small_threshold: CacheStore, fault: str):
    cache = small_threshold
    cache.put(_big_entry())
    assert cache.lookup("d" * 32).outcome is Outcome.HIT
    if fault == "missing":
        _delete_blob(cache, "d" * 32)
    else:
        _alter_blob(cache, "d" * 32, _big_entry("e" * 32, n=61_000))
    for serving in (False, True):
        found = cache.lookup("d" * 32, serving=serving)
        assert found.outcome is Outcome.INVALID
        assert f"blob {fault}" in found.reason
    # (the synthetic entry's digest is not that of any inputs: verify says so too)
    problems = [p for p in verify(cache) if p.kind is not ProblemKind.INPUTS]
    assert [(p.kind, p.digest) for p in problems] == [(ProblemKind.BLOB, "d" * 32)]
    assert f"blob {fault}" in problems[0].message
    fixed = verify(cache, fix=True)
    assert fixed[0].fixed == "invalidated"
    assert cache.lookup("d" * 32).outcome is Outcome.INVALID
    assert verify(cache) == []  # invalid entries are not checked again


@pytest.mark.warnings_logged
def test_a_job_whose_blob_is_gone_runs_again_and_records_a_sound_entry(
    small_threshold: CacheStore, counts
):
    cache = small_threshold
    first = big_floats(10_000, seed=2)
    r1 = run_locally(first, log=False, store=JobStore(MemoryStore()), cache=cache)
    digest = first.metadata["jobflow_cache"]["digest"]
    assert BLOBS_KEY in cache.store.query_one({"digest": digest})
    _delete_blob(cache, digest)
    again = big_floats(10_000, seed=2)
    r2 = run_locally(again, log=False, store=JobStore(MemoryStore()), cache=cache)
    assert counts() == {"big_floats": 2}
    assert again.metadata["jobflow_cache"]["outcome"] == "invalid"
    assert r2[again.uuid][1].output == r1[first.uuid][1].output
    third = big_floats(10_000, seed=2)
    r3 = run_locally(third, log=False, store=JobStore(MemoryStore()), cache=cache)
    assert counts() == {"big_floats": 2}
    assert third.metadata["jobflow_cache"]["outcome"] == "hit"
    assert r3[third.uuid][1].output == r1[first.uuid][1].output


def test_removing_entries_removes_their_blobs_and_gc_the_orphans(small_threshold: CacheStore):
    cache = small_threshold
    blobs = cache.blob_store
    assert blobs is not None
    cache.put_many([_big_entry(d * 32, n=20_000) for d in "0123"])
    assert blobs.count() == 4
    cache.remove(["0" * 32])
    assert blobs.count() == 3
    report = purge(cache, {"digest": {"$in": ["1" * 32]}})
    assert report.entries == 1
    assert blobs.count() == 2
    assert blobs.count({"digest": "1" * 32}) == 0
    # orphans: an entry replaced by a small one, and a blob whose entry was never written
    cache.put(entry("2" * 32, output="2"))
    _, blob = cache._split(_big_entry("9" * 32, n=20_000).sealed_document())
    assert blob is not None
    blobs.update(blob, key="digest")
    assert cache.orphan_blobs() == ["2" * 32, "9" * 32]
    dry = collect_garbage(cache, dry_run=True)
    assert (dry.blobs, blobs.count()) == (2, 3)
    assert collect_garbage(cache).blobs == 2
    assert sorted(blobs.distinct("digest")) == ["3" * 32]
    assert cache.lookup("3" * 32).outcome is Outcome.HIT


def test_blobs_are_written_before_their_entries(small_threshold: CacheStore):
    """put_many (the WriteBehind batch) writes every blob first: an entry that is stored
    always finds its blob; a failing blob write leaves no entry."""
    cache = small_threshold
    order: list[str] = []
    blobs, store = cache.blob_store, cache.store
    assert blobs is not None
    real_blob_update, real_update = blobs.update, store.update

    def blob_update(docs: Any, key: Any = None) -> None:
        order.append("blobs")
        real_blob_update(docs, key=key)

    def entry_update(docs: Any, key: Any = None) -> None:
        order.append("entries")
        real_update(docs, key=key)

    blobs.update = blob_update  # type: ignore[method-assign]  # spies: record the order only
    store.update = entry_update  # type: ignore[method-assign]
    writer = WriteBehind(cache, delay=3600)
    writer.put(_big_entry("5" * 32, n=20_000))
    writer.put(_big_entry("6" * 32, n=20_000))
    writer.put(entry("7" * 32))
    writer.close()
    assert order == ["blobs", "entries"]
    assert all(cache.lookup(d * 32).outcome is Outcome.HIT for d in "567")

    def failing(docs: Any, key: Any = None) -> None:
        raise OSError("blob store full")

    blobs.update = failing  # type: ignore[method-assign]
    writer.put(_big_entry("8" * 32, n=20_000))
    writer.close()
    errors = writer.take_errors()
    assert [digests for digests, _ in errors] == [["8" * 32]]
    assert cache.lookup("8" * 32).outcome is Outcome.MISS


def test_blob_entry_shows_and_lists_like_any_other(small_threshold: CacheStore):
    cache = small_threshold
    big = _big_entry()
    cache.put(big)
    (doc,) = cache.find({"digest": "d" * 32})
    assert CacheEntry.from_document(doc).output == big.output
    (row,) = cache.find({}, properties=["digest", "name"])
    assert BLOBS_KEY not in row
    assert [e.output for e in cache.entries()] == [big.output]
    (stored,) = cache.find({}, blobs=False)
    assert stored["output"] == ""
    assert BLOBS_KEY in stored


@needs_server
def test_without_a_blob_store_a_document_over_16_mb_is_refused(backend: Backend, tmp_path):
    """What the blob store is for: the server refuses the document (the job keeps its result,
    the entry is not written)."""
    from pymongo.errors import DocumentTooLarge

    with backend.cache(tmp_path / "o", blob_threshold=1 << 40) as cache:
        rng = random.Random(3)
        huge = entry(output=json.dumps([rng.random() for _ in range(2_000_000)]))
        with pytest.raises(DocumentTooLarge):
            cache.put(huge)
        assert cache.count() == 0


@needs_server
def test_default_blob_store_is_gridfs_on_the_server(backend: Backend, tmp_path):
    with backend.cache(tmp_path / "o", blob_threshold=0) as cache:
        assert isinstance(cache.blob_store, GridFSStore)
        cache.put(_big_entry())
        files = cache.blob_store._files_collection
        assert files.count_documents({"metadata.digest": "d" * 32}) == 1
        assert cache.get("d" * 32).output == _big_entry().output
        cache.remove(["d" * 32])
        assert files.count_documents({}) == 0


# -- SQLite: nothing moves unless a blob store is configured ----------------------------------
def test_sqlite_moves_nothing_without_a_blob_store(tmp_path: Path):
    with CacheStore(SQLiteBackend(tmp_path / "c.sqlite"), tmp_path / "o", blob_threshold=0) as c:
        assert c.blob_store is None
        c.put(_big_entry())
        assert BLOBS_KEY not in c.backend.read("d" * 32)
        assert c.get("d" * 32).output == _big_entry().output


def test_sqlite_with_a_blob_store_from_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blob_file = tmp_path / "blobs.json"
    monkeypatch.setenv(
        "JOBFLOW_CACHE_BLOB_STORE",
        json.dumps({"type": "JSONStore", "paths": str(blob_file), "read_only": False}),
    )
    monkeypatch.setenv("JOBFLOW_CACHE_BLOB_THRESHOLD", "100000")
    with CacheStore.from_settings() as cache:
        assert isinstance(cache.blob_store, JSONStore)
        assert cache.blob_threshold == 100_000
        cache.put(_big_entry(n=4_000))  # 81 KB of text, 52 KB compressed: stays
        cache.put(_big_entry("e" * 32, n=30_000))  # 384 KB compressed: moves
        assert BLOBS_KEY not in cache.backend.read("d" * 32)
        assert BLOBS_KEY in cache.backend.read("e" * 32)
        assert cache.blob_store.count() == 1
        assert cache.get("e" * 32).output == _big_entry("e" * 32, n=30_000).output


@pytest.mark.warnings_logged
def test_an_unreachable_blob_server_leaves_the_flow_uncached(tmp_path: Path, counts):
    """A real GridFSStore pointed at a port where no server listens."""
    blobs = GridFSStore(
        "jfc",
        "blobs",
        host="127.0.0.1",
        port=1,
        mongoclient_kwargs={"serverSelectionTimeoutMS": 200},
    )
    cache = CacheStore(MemoryStore(), tmp_path / "o", blob_store=blobs)
    flow = Flow([jobs.add(1, 2), jobs.add(3, 4)])
    out = run_locally(flow, log=False, store=JobStore(MemoryStore()), cache=cache)
    assert [out[j.uuid][1].output for j in flow.jobs] == [3, 7]
    assert [j.metadata["jobflow_cache"]["outcome"] for j in flow.jobs] == ["error", "error"]
    assert counts() == {"add": 2}


@pytest.mark.warnings_logged
def test_a_bad_blob_store_spec_leaves_the_flow_uncached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counts
):
    monkeypatch.setenv("JOBFLOW_CACHE_BLOB_STORE", json.dumps({"type": "NoSuchStore"}))
    cache = CacheStore(SQLiteBackend(tmp_path / "c.sqlite"), tmp_path / "o")  # does not raise
    for given in (cache, None):  # None: CacheStore.from_settings
        flow = jobs.add(1, 2)
        out = run_locally(flow, log=False, store=JobStore(MemoryStore()), cache=given)
        assert out[flow.uuid][1].output == 3
        assert flow.metadata["jobflow_cache"]["outcome"] == "error"
    assert counts() == {"add": 2}


# -- store specs, as jobflow's JOB_STORE takes them (no connection needed) -------------------
def test_store_specs_like_jobflows_job_store(tmp_path: Path):
    spec = {
        "type": "MongoStore",
        "database": "jobflow",
        "collection_name": "cache",
        "host": "db.example.org",
        "port": 27018,
        "username": "me",
        "password": "secret",
    }
    store = store_from_spec(spec)
    assert type(store) is MongoStore
    assert (store.database, store.collection_name, store.host, store.port) == (
        "jobflow",
        "cache",
        "db.example.org",
        27018,
    )
    assert store_from_spec(store.as_dict()) == store  # the serialized @class form
    uri = store_from_spec(
        {
            "type": "MongoURIStore",
            "uri": "mongodb+srv://me:secret@cluster0.example.net/",
            "database": "jobflow",
            "collection_name": "cache",
        }
    )
    assert isinstance(uri, MongoURIStore)
    blobs = default_blob_store(uri)
    assert isinstance(blobs, GridFSStore)
    assert (blobs.uri, blobs.database, blobs.collection_name) == (
        "mongodb+srv://me:secret@cluster0.example.net/",
        "jobflow",
        "cache_blobs",
    )
    yaml_file = tmp_path / "cache_store.yaml"
    dumpfn(spec, yaml_file)
    from_yaml = store_from_spec(str(yaml_file))
    assert from_yaml == store
    assert from_yaml.username == "me"


def test_settings_build_a_mongo_cache_with_gridfs_blobs(tmp_path: Path):
    config = tmp_path / "jobflow-cache.yaml"
    config.write_text(
        "STORE:\n  type: MongoStore\n  database: jobflow\n  collection_name: cache\n"
        "  host: db.example.org\n  port: 27018\n  username: me\n  password: secret\n"
        "BLOB_THRESHOLD: 1000000\n"
    )
    cache = CacheStore.from_settings(CacheSettings(CONFIG_FILE=str(config), DIR=tmp_path))
    assert type(cache.store) is MongoStore
    assert cache.store.key == "digest"
    blobs = cache.blob_store
    assert isinstance(blobs, GridFSStore)
    assert (blobs.host, blobs.port, blobs.database, blobs.collection_name) == (
        "db.example.org",
        27018,
        "jobflow",
        "cache_blobs",
    )
    assert (blobs.username, blobs.password, blobs.key) == ("me", "secret", "digest")
    assert cache.blob_threshold == 1_000_000
    assert WriteBehind.supports(cache)
    revived = MontyDecoder().process_decoded(json.loads(json.dumps(cache.as_dict())))
    assert revived.store == cache.store
    assert revived.blob_store == blobs
    assert revived.blob_threshold == 1_000_000

    other = CacheSettings(
        CONFIG_FILE=str(config),
        DIR=tmp_path,
        BLOB_STORE={"type": "GridFSStore", "database": "big", "collection_name": "outputs"},
    )
    chosen = CacheStore.from_settings(other).blob_store
    assert isinstance(chosen, GridFSStore)
    assert (chosen.database, chosen.collection_name) == ("big", "outputs")


def test_in_memory_and_sqlite_stores_get_no_default_blob_store(tmp_path: Path):
    assert default_blob_store(MemoryStore()) is None
    assert default_blob_store(SQLiteBackend(tmp_path / "x.sqlite")) is None
    assert CacheStore(MemoryStore(), tmp_path).blob_store is None


# -- cachetool against a shared store ---------------------------------------------------------
if REAL:
    CLI_BACKENDS = [pytest.param("mongodb", id="mongodb")]
else:
    # SUBSTITUTE: JSONStore (mongomock saved to a JSON file) for a MongoDB server: cachetool
    # runs build their store from the spec, and a MemoryStore would start empty
    CLI_BACKENDS = [
        pytest.param("jsonstore", id="substitute-mongomock-jsonstore", marks=pytest.mark.substitute)
    ]


@pytest.fixture(params=CLI_BACKENDS)
def cli_specs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[dict, dict | None]]:
    """(entries spec, blob store spec or None for the default) of a shared store."""
    if request.param == "mongodb":
        made = Backend("mongodb")
        yield made.entries_spec(), None
        made.cleanup()
        return
    entries = {"type": "JSONStore", "paths": str(tmp_path / "entries.json"), "read_only": False}
    blobs = {"type": "JSONStore", "paths": str(tmp_path / "blobs.json"), "read_only": False}
    yield entries, blobs


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code in (0, 1), result.output
    return result


def test_cachetool_on_a_shared_store_with_blobs(
    cli_specs: tuple[dict, dict | None], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counts
):
    entries_spec, blob_spec = cli_specs
    monkeypatch.setenv("JOBFLOW_CACHE_BLOB_THRESHOLD", "0")
    if blob_spec is not None:
        monkeypatch.setenv("JOBFLOW_CACHE_BLOB_STORE", json.dumps(blob_spec))
    cache = CacheStore(store_from_spec(entries_spec), tmp_path / "objects")
    big, small = big_floats(20_000, seed=9), jobs.add(1, 2)
    out = run_locally(Flow([big, small]), log=False, store=JobStore(MemoryStore()), cache=cache)
    cache.close()
    digest = big.metadata["jobflow_cache"]["digest"]
    spec = json.dumps(entries_spec)

    listed = json.loads(_cli("--store", spec, "ls", "--json").stdout)
    assert sorted(row["digest"] for row in listed) == sorted(
        [digest, small.metadata["jobflow_cache"]["digest"]]
    )
    shown = json.loads(_cli("--store", spec, "show", digest[:10], "--json").stdout)
    assert shown["status"] == "served on a hit"
    assert json.loads(shown["output"]) == out[big.uuid][1].output
    result = _cli("--store", spec, "verify", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["problems"] == []

    blob_store = store_from_spec(blob_spec) if blob_spec else None
    with CacheStore(store_from_spec(entries_spec), tmp_path / "objects", blob_store) as c:
        _delete_blob(c, digest)
    result = _cli("--store", spec, "verify", "--json")
    assert result.exit_code == 1
    problems = json.loads(result.stdout)["problems"]
    assert [(p["kind"], p["digest"]) for p in problems] == [("blob", digest)]
    shown = json.loads(_cli("--store", spec, "show", digest[:10], "--json").stdout)
    assert shown["status"].startswith("not served")

    result = _cli("--store", spec, "purge", "--all", "--yes", "--json")
    assert json.loads(result.stdout)["entries"] == 2
    assert json.loads(_cli("--store", spec, "ls", "--json").stdout) == []


def test_blob_store_accepts_any_maggma_store(tmp_path: Path):
    blob: Store = JSONStore(str(tmp_path / "b.json"), read_only=False)
    with CacheStore(MemoryStore(), tmp_path / "o", blob_store=blob, blob_threshold=0) as cache:
        cache.put(_big_entry())
    again = JSONStore(str(tmp_path / "b.json"), read_only=False)
    with CacheStore(MemoryStore(), tmp_path / "o", blob_store=again) as cache:
        assert again.count({"digest": "d" * 32}) == 1
        assert cache.lookup("d" * 32).outcome is Outcome.MISS  # entries were in memory
