"""Invalidation follows provenance (issue 11, class 4).

Each entry records the entries it consumed (``CacheEntry.consumed``: upstream jobs named by
uuid, run folders and files of known jobs). ``CacheStore.invalidate`` and ``purge`` cascade to
every entry that consumed a target, transitively; ``cascade=False`` opts out. The POTCAR story
runs real flows with ``create_folders=True`` in fresh processes.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from maggma.stores import MemoryStore

from jobflow_cache import CacheStore
from jobflow_cache.admin.purge import purge
from jobflow_cache.backends import MaggmaBackend, SQLiteBackend
from jobflow_cache.entry import CacheEntry
from jobflow_cache.hashing.canonical import SCHEME
from jobflow_cache.store import Outcome
from tests.conftest import run_python
from tests.support.provenance_jobs import POTCAR_ENV

RUN = """
import json
from jobflow import JobStore
from maggma.stores import MemoryStore
from jobflow_cache import run_locally
from tests.support.provenance_jobs import potcar_flow

flow = potcar_flow(2.0, with_uuid=True)
store = JobStore(MemoryStore())
run_locally(flow, store=store, log=False, create_folders=True, root_dir={root!r},
            ensure_success=True)
out = {{j.name: store.get_output(j.uuid) for j in flow.jobs}}
meta = {{j.name: j.metadata["jobflow_cache"]["outcome"] for j in flow.jobs}}
print(json.dumps({{"out": out, "meta": meta}}))
"""


@pytest.fixture
def potcar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "POTCAR"
    path.write_text("1.0")
    monkeypatch.setenv(POTCAR_ENV, str(path))
    return path


def run_flow(root: Path) -> dict:
    """The POTCAR flow in a fresh process (one folder per job under ``root``)."""
    return json.loads(run_python(RUN.format(root=str(root))).strip().splitlines()[-1])


def cache() -> CacheStore:
    """The cache the subprocesses use (JOBFLOW_CACHE_DIR of the test)."""
    store = CacheStore.from_settings()
    store.connect()
    return store


def digest_of(store: CacheStore, name: str) -> str:
    (doc,) = list(store.find({"name": name}, properties=["digest"]))
    return str(doc["digest"])


def test_entries_record_what_they_consumed(potcar, counts, tmp_path):
    run_flow(tmp_path / "run1")
    store = cache()
    relax, static, summarize = (digest_of(store, n) for n in ("relax", "static", "summarize"))
    consumed = {
        doc["name"]: doc["consumed"] for doc in store.find({}, properties=["name", "consumed"])
    }
    assert consumed == {
        "relax": [],
        "static": [relax],  # relax's run folder (prev_dir)
        "summarize": [static],  # static's run folder
        "by_uuid": [relax],  # relax's uuid
    }
    assert sorted(store.dependents([relax])) == sorted(
        [static, summarize, digest_of(store, "by_uuid")]
    )
    assert store.dependents([summarize]) == []


def test_invalidate_cascades_the_potcar_story(potcar, counts, tmp_path):
    """Fix the POTCAR, invalidate relax: relax recomputes, and so does every job that
    parsed its OUTCAR (directly or not); they are never served the bad energy again."""
    first = run_flow(tmp_path / "run1")
    assert first["out"]["static"]["energy"] == 2.5
    assert counts() == Counter(relax=1, static=1, summarize=1, by_uuid=1)

    potcar.write_text("2.0")  # the fixed pseudopotential: no input of relax names it
    store = cache()
    relax = digest_of(store, "relax")
    invalidated = store.invalidate(relax, "bad POTCAR")
    names = {d["digest"]: d["name"] for d in store.find({}, properties=["digest", "name"])}
    assert invalidated[0] == relax
    assert sorted(names[d] for d in invalidated) == ["by_uuid", "relax", "static", "summarize"]
    reasons = {
        doc["name"]: doc["invalid_reason"]
        for doc in store.find({}, properties=["name", "invalid_reason"])
    }
    assert reasons["relax"] == "bad POTCAR"
    assert reasons["summarize"].startswith("bad POTCAR (it consumed invalidated entry ")
    store.close()

    second = run_flow(tmp_path / "run2")
    assert counts() == Counter(relax=2, static=2, summarize=2, by_uuid=2)
    assert second["out"]["relax"]["energy"] == 4.0
    assert second["out"]["static"]["energy"] == 4.5, "never the energy of the bad OUTCAR"
    assert second["out"]["summarize"] == 45.0
    # relax and the job that names it by uuid find their entries invalidated; static and
    # summarize, whose folders' contents count in their digests, may also miss outright
    assert second["meta"]["relax"] == second["meta"]["by_uuid"] == "invalid"
    assert {second["meta"]["static"], second["meta"]["summarize"]} <= {"invalid", "miss"}

    third = run_flow(tmp_path / "run3")  # the recomputed entries are sound and served
    assert counts() == Counter(relax=2, static=2, summarize=2, by_uuid=2)
    assert set(third["meta"].values()) == {Outcome.HIT.value}
    assert third["out"]["summarize"] == 45.0


def test_no_cascade_leaves_consumers_served(potcar, counts, tmp_path):
    run_flow(tmp_path / "run1")
    store = cache()
    relax = digest_of(store, "relax")
    assert store.invalidate([relax], "just relax", cascade=False) == [relax]
    assert store.count({"valid": False}) == 1
    store.close()
    second = run_flow(tmp_path / "run2")
    assert counts() == Counter(relax=2, static=1, summarize=1, by_uuid=1)
    assert second["meta"] == {
        "relax": "invalid",
        "static": "hit",
        "summarize": "hit",
        "by_uuid": "hit",
    }
    assert second["out"]["summarize"] == 25.0


def test_purge_cascades_and_can_opt_out(potcar, counts, tmp_path):
    run_flow(tmp_path / "run1")
    store = cache()
    static = digest_of(store, "static")
    summarize = digest_of(store, "summarize")

    dry = purge(store, {"name": "static"}, dry_run=True)
    assert dry.cascaded == [summarize]
    assert dry.entries == 2
    assert sorted(dry.digests) == sorted([static, summarize])
    assert store.count() == 4, "a dry run removes nothing"

    alone = purge(store, {"name": "static"}, dry_run=True, cascade=False)
    assert (alone.entries, alone.cascaded) == (1, [])

    report = purge(store, {"name": "static"})
    assert report.cascaded == [summarize]
    assert report.gc.objects == dry.gc.objects >= 1, "static.out: referenced by no other entry"
    assert sorted(d["name"] for d in store.find({}, properties=["name"])) == ["by_uuid", "relax"]
    store.close()

    second = run_flow(tmp_path / "run2")
    assert counts() == Counter(relax=1, static=2, summarize=2, by_uuid=1)
    assert second["meta"]["static"] == second["meta"]["summarize"] == "miss"


def test_a_tampered_consumed_list_is_never_served(potcar, counts, tmp_path):
    """``consumed`` is sealed by the checksum: removing a link to hide an entry from a cascade
    makes the entry invalid, and its job runs."""
    run_flow(tmp_path / "run1")
    store = cache()
    doc = next(store.find({"name": "static"}))
    doc.pop("_id", None)
    doc["consumed"] = []
    store.backend.write([doc])
    assert store.lookup(doc["digest"]).outcome is Outcome.INVALID
    store.close()
    second = run_flow(tmp_path / "run2")
    assert second["meta"]["static"] == "invalid"
    assert counts()["static"] == 2


# -- the stores: array criteria and the cascade on every backend -------------------------------
def _chain(store: CacheStore) -> dict[str, str]:
    """a <- b <- c (c also consumed d), d <- e, f alone; returns name -> digest."""
    digests = {name: name * 32 for name in "abcdef"}
    links = {"b": "a", "c": "bd", "e": "d"}
    store.put_many(
        [
            CacheEntry(
                digest=digest,
                scheme=SCHEME,
                function="m:f",
                name=name,
                consumed=sorted(digests[u] for u in links.get(name, "")),
            )
            for name, digest in digests.items()
        ]
    )
    return digests


def _check_backend(store: CacheStore) -> None:
    store.connect()
    d = _chain(store)
    if isinstance(store.backend, MaggmaBackend):
        # Mongo criteria users may write on a maggma store: array membership
        found = {doc["name"] for doc in store.find({"consumed": {"$in": [d["a"], d["d"]]}})}
        assert found == {"b", "c", "e"}
        assert {doc["name"] for doc in store.find({"consumed": d["b"]})} == {"c"}
        assert store.count({"consumed": {"$in": [d["f"]]}}) == 0
    else:  # the fixed schemas select by their columns only, and say so
        with pytest.raises(ValueError, match="unknown field 'consumed'"):
            store.count({"consumed": d["b"]})
    assert store.dependents([d["a"]]) == [d["b"], d["c"]]
    assert store.dependents([d["d"]]) == [d["c"], d["e"]]
    assert store.invalidate([d["a"]], "wrong", cascade=True) == [d["a"], d["b"], d["c"]]
    valid = {doc["name"]: doc["valid"] for doc in store.find({}, properties=["name", "valid"])}
    assert valid == {"a": False, "b": False, "c": False, "d": True, "e": True, "f": True}
    assert store.lookup(d["c"]).outcome is Outcome.INVALID
    assert store.lookup(d["e"]).outcome is Outcome.HIT
    assert store.invalidate("0" * 32, "absent") == []
    report = purge(store, {"name": "d"})
    assert sorted(report.cascaded) == [d["c"], d["e"]]
    assert {doc["name"] for doc in store.find({}, properties=["name"])} == {"a", "b", "f"}


def test_cascade_on_the_embedded_backend(tmp_path):
    _check_backend(CacheStore(SQLiteBackend(tmp_path / "cache.sqlite"), tmp_path / "objects"))


def test_cascade_on_memory_store(tmp_path):
    _check_backend(CacheStore(MemoryStore(), tmp_path / "objects"))


@pytest.mark.postgres
def test_cascade_on_postgres(make_pg_backend, tmp_path):
    _check_backend(CacheStore(make_pg_backend(), tmp_path / "objects"))
