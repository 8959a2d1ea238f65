"""Claims and run-folder aliases (jobflow_cache.execution.claims) on each kind of store, in one
process.

Multi-process hammering is in test_concurrency.py; managers in other processes in
test_remote.py. The MongoDB variant runs on maggma's MemoryStore (mongomock): no MongoDB server
can run on these machines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jobflow import Flow
from maggma.stores import JSONStore, MemoryStore

from jobflow_cache import CacheStore, SQLiteBackend, run_locally
from jobflow_cache.execution.claims import Heartbeat, coordinator_of
from tests.support import jobs


@pytest.fixture(
    params=["sqlite", pytest.param("mongo-substitute", marks=pytest.mark.substitute)],
)
def shared_cache(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        store: Any = SQLiteBackend(tmp_path / "cache.sqlite")
    else:  # mongomock stands in for MongoDB: same pymongo calls, no server
        store = MemoryStore(collection_name="entries")
    cache = CacheStore(store, objects_dir=tmp_path / "objects")
    cache.connect()
    yield cache
    cache.close()


def test_claim_is_exclusive_until_released(shared_cache: CacheStore) -> None:
    claims = coordinator_of(shared_cache)
    assert claims is not None
    assert claims.claim("d1", "w1", 60) == "w1"
    assert claims.claim("d1", "w2", 60) == "w1"  # held
    assert claims.claim("d1", "w1", 60) == "w1"  # a renewal by its owner
    claims.release("d1", "w2")  # not the holder: nothing happens
    assert claims.claim("d1", "w2", 60) == "w1"
    claims.release("d1", "w1")
    assert claims.claim("d1", "w2", 60) == "w2"
    assert claims.claim("d2", "w1", 60) == "w1"  # claims are per name


def test_expired_claim_is_taken_over(shared_cache: CacheStore) -> None:
    claims = coordinator_of(shared_cache)
    assert claims is not None
    assert claims.claim("d1", "dead-worker", 0.2) == "dead-worker"
    assert claims.claim("d1", "w2", 60) == "dead-worker"
    time.sleep(0.3)
    assert claims.claim("d1", "w2", 60) == "w2"
    assert claims.claim("d1", "dead-worker", 60) == "w2"  # the late owner does not get it back


def test_heartbeat_keeps_a_claim_beyond_its_lease(shared_cache: CacheStore) -> None:
    claims = coordinator_of(shared_cache)
    assert claims is not None
    # renewals every 0.4 s keep a 1.6 s lease alive even if the thread is late by a second
    assert claims.claim("d1", "w1", 1.6) == "w1"
    with Heartbeat(claims, "d1", "w1", 1.6):
        for _ in range(8):  # 4 s: two and a half leases
            time.sleep(0.5)
            assert claims.claim("d1", "w2", 1.6) == "w1"
    time.sleep(1.8)  # no more renewals: it expires
    assert claims.claim("d1", "w2", 1.6) == "w2"


def test_aliases_last_writer_wins(shared_cache: CacheStore) -> None:
    claims = coordinator_of(shared_cache)
    assert claims is not None
    assert claims.get_aliases(["/runs/a"]) == {}
    claims.set_aliases({"/runs/a": "d1", "/runs/b": "d2"})
    claims.set_aliases({"/runs/a": "d3"})
    assert claims.get_aliases(["/runs/a", "/runs/b", "/runs/c"]) == {
        "/runs/a": "d3",
        "/runs/b": "d2",
    }


def test_store_without_claims_has_no_coordinator(tmp_path: Path) -> None:
    cache = CacheStore(JSONStore(str(tmp_path / "c.json"), read_only=False), tmp_path / "o")
    cache.connect()
    assert coordinator_of(cache) is None


@pytest.mark.warnings_logged
def test_dedup_on_a_store_without_claims_warns_once_and_still_caches(
    tmp_path: Path, counts, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("JOBFLOW_CACHE_DEDUP", "1")
    cache = CacheStore(JSONStore(str(tmp_path / "c.json"), read_only=False), tmp_path / "o")
    flows = [Flow([jobs.cached_add(1, 2), jobs.cached_add(3, 4)]) for _ in range(2)]
    first = run_locally(flows[0], cache=cache, ensure_success=True)
    second = run_locally(flows[1], cache=cache, ensure_success=True)
    assert counts()["cached_add"] == 2  # the second run was served from the cache
    assert sorted(r[1].output for r in first.values()) == [3, 7]
    assert sorted(r[1].output for r in second.values()) == [3, 7]
    warned = [r.getMessage() for r in caplog.records if "cannot hold claims" in r.getMessage()]
    assert len(warned) == 1, warned


def test_dedup_in_one_process_runs_and_serves_like_without(
    counts, monkeypatch: pytest.MonkeyPatch, cache_store: CacheStore
) -> None:
    monkeypatch.setenv("JOBFLOW_CACHE_DEDUP", "1")
    monkeypatch.setenv("JOBFLOW_CACHE_LEASE", "5")
    first = run_locally(Flow([jobs.cached_add(1, 2)]), cache=cache_store, ensure_success=True)
    second = run_locally(Flow([jobs.cached_add(1, 2)]), cache=cache_store, ensure_success=True)
    assert counts()["cached_add"] == 1
    assert [r[1].output for r in first.values()] == [r[1].output for r in second.values()] == [3]
    claims = coordinator_of(cache_store)
    assert claims is not None
    # every claim was released: anybody may take the digest's claim now
    digest = next(iter(cache_store.find({}, properties=["digest"])))["digest"]
    assert claims.claim(digest, "someone-else", 5) == "someone-else"


def test_dedup_waiter_serves_the_owners_result(
    counts, monkeypatch: pytest.MonkeyPatch, cache_store: CacheStore
) -> None:
    """A claim held by another worker: this run waits, then serves the entry the other
    stores (the other worker is this test, writing the entry of a run made elsewhere)."""
    import threading

    monkeypatch.setenv("JOBFLOW_CACHE_DEDUP", "1")
    monkeypatch.setenv("JOBFLOW_CACHE_LEASE", "30")
    donor = CacheStore(MemoryStore(), cache_store.objects_dir)
    run_locally(Flow([jobs.cached_add(5, 6)]), cache=donor, ensure_success=True)
    assert counts()["cached_add"] == 1
    entry = next(iter(donor.entries()))
    cache_store.connect()
    claims = coordinator_of(cache_store)
    assert claims is not None
    assert claims.claim(entry.digest, "other-worker", 30) == "other-worker"

    def finish_elsewhere() -> None:
        time.sleep(0.5)
        cache_store.put(entry)
        claims.release(entry.digest, "other-worker")

    helper = threading.Thread(target=finish_elsewhere)
    helper.start()
    started = time.monotonic()
    result = run_locally(Flow([jobs.cached_add(5, 6)]), cache=cache_store, ensure_success=True)
    waited = time.monotonic() - started
    helper.join()
    assert counts()["cached_add"] == 1  # not computed again
    assert [r[1].output for r in result.values()] == [11]
    assert waited >= 0.4  # it did wait for the other worker


# -- job uuids recognised across processes ----------------------------------------------
STEP = """
import json, sys
from jobflow import JobStore
from maggma.stores import JSONStore
from monty.json import MontyDecoder
from monty.serialization import dumpfn, loadfn

flow = loadfn("flow.json")
job = [j for j in flow if j.name == sys.argv[1]][0]
store = JobStore(JSONStore("outputs.json", read_only=False))
store.connect()
job.resolve_args(store=store)
response = job.run(store=store)
print(json.dumps(job.metadata["jobflow_cache"]["outcome"]))
"""


def _run_each_job_in_a_fresh_process(folder: Path, instance: int) -> list[str]:
    """Build the producer -> consumer flow anew (new uuids) and run each of its jobs in a fresh
    process, the upstream one first, sharing a file JobStore (as a remote manager does)."""
    from monty.serialization import dumpfn

    flow = Flow([p := jobs.cached_producer(7), jobs.cached_consumer(p.output)])
    work = folder / f"instance{instance}"
    work.mkdir()
    dumpfn(flow, work / "flow.json")
    (work / "step.py").write_text(STEP)
    outcomes = []
    for name in ("cached_producer", "cached_consumer"):
        proc = subprocess.run(
            [sys.executable, "step.py", name],
            cwd=work,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        outcomes.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    store = JSONStore(str(work / "outputs.json"), key="uuid")
    store.connect()
    consumer = store.query_one({"name": "cached_consumer"})
    assert consumer["output"] == {"from": p.uuid, "x2": 14}  # this instance's producer
    return outcomes


def test_an_upstream_uuid_in_inputs_hits_when_each_job_ran_in_its_own_process(
    tmp_path: Path, counts
) -> None:
    assert _run_each_job_in_a_fresh_process(tmp_path, 1) == ["miss", "miss"]
    # a new flow instance: new uuids; the consumer's input holds the new producer's uuid, which
    # the worker recognises through the store (recorded by the producer's own process)
    assert _run_each_job_in_a_fresh_process(tmp_path, 2) == ["hit", "hit"]
    assert counts() == {"cached_producer": 1, "cached_consumer": 1}
