"""Dynamic jobs (replace, addition, detour, nested replace, stop_*) replay from the cache."""

from __future__ import annotations

import json
import re

import pytest
from jobflow import Flow, JobStore, Response, job
from maggma.stores import MemoryStore
from monty.json import MSONable

from jobflow_cache import CacheStore, CacheWarning, run_locally
from jobflow_cache.admin.verify import verify
from jobflow_cache.backends import SQLiteBackend
from jobflow_cache.entry import PACK_MIN, CacheEntry, document_checksum, unpack_document
from jobflow_cache.store import Outcome
from tests.conftest import run_python
from tests.support import jobs


def shape(responses: dict) -> list[tuple[int, ...]]:
    """The structure of a run_locally return value, independent of uuids."""
    return sorted(tuple(sorted(by_index)) for by_index in responses.values())


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def all_outputs(store: JobStore) -> list:
    """Every stored output; uuids inside (references gathered by a replace) made comparable."""
    return sorted(
        UUID.sub("<uuid>", json.dumps(d["output"], sort_keys=True)) for d in store.query({})
    )


FLOWS = {
    "replace": lambda: (lambda r: Flow([r, jobs.total(r.output)]))(jobs.make_replace(4)),
    "addition": lambda: Flow([jobs.make_addition(3)]),
    "detour": lambda: (lambda d: Flow([d, jobs.add(d.output, 1)]))(jobs.make_detour(2)),
    "nested_replace": lambda: (lambda n: Flow([n, jobs.add(n.output, 1)]))(jobs.nested_replace(3)),
}


@pytest.mark.parametrize("kind", sorted(FLOWS))
def test_dynamic_flow_warm_run_executes_nothing(kind, counts, cache_store, run_dir):
    cold_store, warm_store = JobStore(MemoryStore()), JobStore(MemoryStore())
    cold = run_locally(
        FLOWS[kind](), store=cold_store, cache=cache_store, log=False, ensure_success=True
    )
    executed = counts.total()
    assert executed > 0
    warm = run_locally(
        FLOWS[kind](), store=warm_store, cache=cache_store, log=False, ensure_success=True
    )
    assert counts.total() == executed, f"warm {kind} run executed jobs"
    assert shape(warm) == shape(cold)
    assert all_outputs(warm_store) == all_outputs(cold_store)
    assert warm_store.count() == cold_store.count()


def test_replaced_jobs_get_fresh_uuids(counts, cache_store, run_dir):
    store = JobStore(MemoryStore())
    run_locally(jobs.make_replace(2), store=store, cache=cache_store, log=False)
    first_uuids = set(store.distinct("uuid"))
    run_locally(jobs.make_replace(2), store=store, cache=cache_store, log=False)
    assert len(set(store.distinct("uuid"))) == 2 * len(first_uuids), "no uuid reused"


def test_stop_children_replays(counts, cache_store, run_dir):
    def flow():
        s = jobs.stop_children_job(1)
        return Flow([s, jobs.add(s.output, 1)])

    store = JobStore(MemoryStore())
    cold = run_locally(flow(), store=store, cache=cache_store, log=False)
    warm = run_locally(flow(), store=store, cache=cache_store, log=False)
    assert counts() == {"stop_children_job": 1}, "the child never runs, warm or cold"
    assert shape(cold) == shape(warm) == [(1,)]


def test_stop_jobflow_replays(counts, cache_store, run_dir):
    def flow():
        s = jobs.stop_jobflow_job(1)
        return Flow([s, jobs.add(5, 5)])

    store = JobStore(MemoryStore())
    cold = run_locally(flow(), store=store, cache=cache_store, log=False)
    warm = run_locally(flow(), store=store, cache=cache_store, log=False)
    assert counts() == {"stop_jobflow_job": 1}
    assert len(cold) == len(warm) == 1


SCRIPT = """
import json
import re
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore
from jobflow_cache import run_locally
from tests.support import jobs

r = jobs.make_replace(3)
t = jobs.total(r.output)
a = jobs.make_addition(t.output)
d = jobs.make_detour(2)
n = jobs.nested_replace(2)
flow = Flow([r, t, a, d, jobs.add(d.output, 1), n, jobs.add(n.output, 2)])
store = JobStore(MemoryStore())
responses = run_locally(flow, store=store, log=False, ensure_success=True)
print(json.dumps({
    "outputs": sorted(re.sub(r"[0-9a-f-]{36}", "<uuid>", json.dumps(x["output"], sort_keys=True))
                      for x in store.query({})),
    "shape": sorted(tuple(sorted(v)) for v in responses.values()),
}))
"""


def test_dynamic_flow_in_two_fresh_processes(counts, tmp_path):
    """Acceptance 2: the second process executes nothing and its outputs are identical."""
    work = tmp_path / "work"  # the run folder, apart from the execution counter
    work.mkdir()
    first = json.loads(run_python(SCRIPT, cwd=work))
    executed = counts()
    assert executed["make_replace"] == 1
    assert executed["nested_replace"] == 3
    second = json.loads(run_python(SCRIPT, cwd=work))
    assert counts() == executed, "the second process must execute nothing"
    assert second == first


def test_new_jobs_of_a_dynamic_miss_hit_on_the_next_run(counts, cache_store, run_dir):
    """The children a dynamic job makes are hashed as they will be replayed (decoded), so the
    second run serves them (a live pymatgen Structure is not bit-identical to its replay)."""
    pytest.importorskip("pymatgen")
    outcomes = []
    for _ in range(2):
        store = JobStore(MemoryStore())
        run_locally(
            jobs.deform_parent(0.01), store=store, cache=cache_store, log=False, ensure_success=True
        )
        outcomes.append(
            sorted((d["name"], d["metadata"]["jobflow_cache"]["outcome"]) for d in store.query({}))
        )
    assert outcomes[1] == [("deform_parent", "hit"), ("relax_child", "hit")]
    assert counts() == {"deform_parent": 1, "relax_child": 1}


def test_large_replace_records_and_counts_every_generated_job(counts, cache_store, run_dir):
    """Entries of the generated jobs are written behind during the run and all on disk after
    it; the warm run serves every one of them and counts its hit."""
    n = 60
    cold_store, warm_store = JobStore(MemoryStore()), JobStore(MemoryStore())
    run_locally(jobs.make_replace(n), store=cold_store, cache=cache_store, log=False)
    assert counts() == {"make_replace": 1, "add": n}
    on_disk = CacheStore(SQLiteBackend(cache_store.backend.owned_paths()[0]), run_dir / "objects")
    with on_disk:
        assert on_disk.count() == n + 1  # the dynamic job and its n new jobs
    run_locally(jobs.make_replace(n), store=warm_store, cache=cache_store, log=False)
    assert counts() == {"make_replace": 1, "add": n}
    assert all_outputs(warm_store) == all_outputs(cold_store)
    with on_disk:
        assert sorted(e.hits for e in on_disk.entries()) == [1] * (n + 1)


def _dynamic_document(cache_store: CacheStore) -> dict:
    cache_store.connect()
    (doc,) = [doc for doc in cache_store.find() if doc.get("dynamic")]  # not a selectable field
    return doc


def test_a_large_response_is_stored_compressed_and_replays(counts, cache_store, run_dir):
    """A response longer than PACK_MIN is stored compressed (the SQLite store indexes every
    document it writes, hit counts included); it is served exactly and its hits counted."""
    n = 100  # ~800 characters of JSON per generated job
    cold_store, warm_store = JobStore(MemoryStore()), JobStore(MemoryStore())
    run_locally(jobs.make_replace(n), store=cold_store, cache=cache_store, log=False)
    doc = _dynamic_document(cache_store)
    assert doc["response"] == ""
    assert sorted(doc["packed"]) == ["response"]
    entry = CacheEntry.from_document(doc)
    assert len(entry.response) > PACK_MIN
    assert entry.checksum == entry.compute_checksum() == document_checksum(doc)
    run_locally(jobs.make_replace(n), store=warm_store, cache=cache_store, log=False)
    assert counts() == {"make_replace": 1, "add": n}
    assert all_outputs(warm_store) == all_outputs(cold_store)
    assert _dynamic_document(cache_store)["hits"] == 1
    assert verify(cache_store) == []  # cachetool verify reads it like any entry


def test_a_reader_that_ignores_packed_fields_never_serves_them(counts, cache_store, run_dir):
    """An older jobflow-cache sees the empty fields of a compressed entry: their checksum
    fails, so it runs the job instead of replaying an empty response."""
    run_locally(jobs.make_replace(100), store=JobStore(MemoryStore()), cache=cache_store, log=False)
    doc = _dynamic_document(cache_store)
    old_reader = CacheEntry.model_validate({k: v for k, v in doc.items() if k != "_id"})
    assert old_reader.response == ""
    assert CacheStore.check_entry(old_reader).outcome is Outcome.INVALID


def test_a_compressed_response_that_does_not_decompress_is_not_served(counts, cache_store, run_dir):
    run_locally(jobs.make_replace(100), store=JobStore(MemoryStore()), cache=cache_store, log=False)
    doc = _dynamic_document(cache_store)
    blob = doc["packed"]["response"]
    doc["packed"] = {"response": blob[:-40] + "A" * 40}  # damaged in the store
    cache_store.backend.write([doc])
    warm_store = JobStore(MemoryStore())
    with pytest.warns(CacheWarning, match="does not decode"):
        run_locally(jobs.make_replace(100), store=warm_store, cache=cache_store, log=False)
    assert counts()["make_replace"] == 2
    assert warm_store.count() == 102  # the job ran: its 100 new jobs and the gathering job
    # the bad entry was replaced by a sound one
    run_locally(jobs.make_replace(100), store=JobStore(MemoryStore()), cache=cache_store, log=False)
    assert counts()["make_replace"] == 2


def test_a_large_response_stored_plain_is_still_served(counts, cache_store, run_dir):
    """Entries written before responses were compressed (the text in the field) are served."""
    cold_store, warm_store = JobStore(MemoryStore()), JobStore(MemoryStore())
    run_locally(jobs.make_replace(100), store=cold_store, cache=cache_store, log=False)
    doc = _dynamic_document(cache_store)
    plain = unpack_document(doc)
    plain.pop("_id", None)
    cache_store.backend.write([plain])
    assert "packed" not in _dynamic_document(cache_store)
    run_locally(jobs.make_replace(100), store=warm_store, cache=cache_store, log=False)
    assert counts() == {"make_replace": 1, "add": 100}
    assert all_outputs(warm_store) == all_outputs(cold_store)


class NoRoundTrip(MSONable):
    """Serialises, but cannot be rebuilt from its JSON: a dynamic job making a job that takes
    one cannot be replayed."""

    def __init__(self, x: int) -> None:
        self.x = x

    def as_dict(self) -> dict:
        return {"@module": __name__, "@class": "NoRoundTrip", "x": self.x}

    @classmethod
    def from_dict(cls, d: dict) -> NoRoundTrip:
        raise ValueError("NoRoundTrip cannot be rebuilt")


@job
def value_of(obj: NoRoundTrip) -> int:
    return obj.x


@job
def replace_with_unrebuildable(x: int) -> Response:
    return Response(replace=Flow([value_of(NoRoundTrip(x))], output=None))


def test_a_response_that_cannot_be_replayed_runs_live_and_is_not_cached(cache_store, run_dir):
    """Plain jobflow runs the live new jobs; the cache cannot replay them, so it records
    nothing for the dynamic job, and the run succeeds as it would without the cache."""
    store = JobStore(MemoryStore())
    with pytest.warns(CacheWarning, match="not cached: .*cannot be rebuilt"):
        run_locally(
            replace_with_unrebuildable(7),
            store=store,
            cache=cache_store,
            log=False,
            ensure_success=True,
        )
    assert sorted(d["output"] for d in store.query({}) if d["name"] == "value_of") == [7]
    cache_store.connect()
    assert not [doc for doc in cache_store.find() if doc.get("dynamic")]


def test_recording_a_dynamic_job_pauses_the_collector_and_enables_it_again(cache_store, run_dir):
    """The response is encoded and decoded with the cyclic collector paused (no collection
    meanwhile), and the collector is enabled again after, also when the replay fails."""
    import gc

    from jobflow_cache.execution import recording

    paused: list[bool] = []
    decode = recording.loads

    def watched_loads(*args, **kwargs):
        paused.append(gc.isenabled())
        return decode(*args, **kwargs)

    recording.loads = watched_loads  # type: ignore[assignment]
    try:
        run_locally(jobs.make_replace(3), store=JobStore(MemoryStore()), cache=cache_store)
        assert gc.isenabled()
        with pytest.warns(CacheWarning, match="cannot be rebuilt"):
            run_locally(
                replace_with_unrebuildable(7), store=JobStore(MemoryStore()), cache=cache_store
            )
        assert gc.isenabled()
    finally:
        recording.loads = decode  # type: ignore[assignment]
    assert paused == [False, False]  # two dynamic responses decoded, the collector paused
