"""jobflow_cache.local: the manager loop and its indexed view of MemoryStore JobStores.

Drop-in fidelity (documents, responses, logs) is checked scenario by scenario, large flows
included, in ``tests/integration/test_dropin.py``. Here: that no job makes the MemoryStore scan
its documents (the cause of jobflow's O(n²)), that the index answers exactly as mongomock does,
and what ``cache=False`` / ``JOBFLOW_CACHE_DISABLE`` do.
"""

from __future__ import annotations

import gc
import re
import threading
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pytest
from jobflow import Flow, JobStore, job
from jobflow import run_locally as jobflow_run_locally
from maggma.core import Sort
from maggma.stores import JSONStore, MemoryStore

from jobflow_cache import CacheStore, run_locally
from jobflow_cache.execution.cache import META_KEY
from jobflow_cache.local import manager
from jobflow_cache.local.view import IndexedMemoryStore, indexed_view
from tests.integration import dropin_jobs as dj
from tests.support import jobs

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class CountingCollection:
    """A real mongomock collection whose reads and writes are counted (not a mock: every call
    goes to the collection itself)."""

    COUNTED = frozenset(
        {"find", "find_one", "bulk_write", "insert_one", "insert_many", "replace_one"}
    )

    def __init__(self, collection: Any) -> None:
        self.inner = collection
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self.COUNTED:
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


def counted(store: MemoryStore) -> CountingCollection:
    store.connect()
    counter = CountingCollection(store._collection)
    store._coll = counter
    return counter


def counted_job_store() -> tuple[JobStore, CountingCollection, CountingCollection]:
    docs, data = MemoryStore(), MemoryStore()
    return JobStore(docs, additional_stores={"data": data}), counted(docs), counted(data)


def chain(n: int) -> Flow:
    flow = [dj.append_end("c")]
    for _ in range(n - 1):
        flow.append(dj.append_end(flow[-1].output))
    return Flow(flow, flow[-1].output)


def fanout(n: int) -> Flow:
    source = dj.returns_dict()
    return Flow([source, *[dj.echo({"i": i, "v": source.output["nested"]}) for i in range(n)]])


def dynamic(n: int) -> Flow:
    fan = dj.fan_replace(n)
    return Flow([fan, dj.echo(fan.output)])


def data_store(n: int) -> Flow:
    made = [dj.big_list(i + 1) for i in range(n)]
    return Flow([*made, *[dj.echo(m.output) for m in made]])


SHAPES: dict[str, Callable[[int], Flow]] = {
    "chain": chain,
    "fanout": fanout,
    "dynamic": dynamic,
    "data_store": data_store,
}


# -- the root cause and its fix, counted ----------------------------------------------------------
def test_jobflow_scans_the_memory_store_for_every_job(run_dir):
    """jobflow's loop: an upsert per job and three queries per reference, each a full scan."""
    store, docs, _ = counted_job_store()
    jobflow_run_locally(chain(30), store=store, log=False, ensure_success=True)
    assert docs.calls["bulk_write"] == 30  # ReplaceOne(upsert=True): tests every document
    assert docs.calls["find"] >= 3 * 29  # latest index, output, latest index again


@pytest.mark.parametrize("shape", list(SHAPES))
def test_our_loop_never_scans_the_memory_store(shape, run_dir):
    """Each document is inserted once; every reference is resolved from the index."""
    store, docs, data = counted_job_store()
    flow = SHAPES[shape](30)
    run_locally(flow, store=store, log=False, cache=False, ensure_success=True)
    assert docs.calls == {"insert_one": store.count()}
    assert data.calls == ({"insert_one": 30} if shape == "data_store" else {})


def test_cached_runs_never_scan_the_memory_store(run_dir, cache_store, counts):
    for phase in ("cold", "warm"):
        store, docs, _ = counted_job_store()
        flow = dynamic(20)
        run_locally(flow, store=store, log=False, cache=cache_store, ensure_success=True)
        assert docs.calls == {"insert_one": store.count()}, phase
        assert store.count() == 23  # the fan, its 20 jobs, its replacement, the gatherer
    assert counts() == {"fan_replace": 1, "append_end": 20, "echo": 1}, "warm run: all hits"


@pytest.mark.parametrize("shape", ["chain", "dynamic"])
def test_same_documents_as_jobflow_on_a_store_with_history(shape, run_dir):
    """A store that already holds documents: the index loads it once, the documents match."""
    outcomes = {}
    for name, runner in (("jobflow", jobflow_run_locally), ("ours", run_locally)):
        store, docs, _ = counted_job_store()
        runner(SHAPES[shape](10), store=store, log=False)
        docs.calls.clear()
        runner(SHAPES[shape](10), store=store, log=False)
        if name == "ours":
            assert docs.calls["find"] == 1, "one scan to learn which uuids the store holds"
        outcomes[name] = comparable(store)
    assert outcomes["ours"] == outcomes["jobflow"]


def test_rerunning_the_same_flow_replaces_its_documents_like_jobflow(run_dir):
    """The same flow object run twice into one store: jobflow's upserts replace documents."""
    outcomes = {}
    for name, runner in (("jobflow", jobflow_run_locally), ("ours", run_locally)):
        store = JobStore(MemoryStore())
        flow = dynamic(5)
        runner(flow, store=store, log=False, ensure_success=True)
        runner(flow, store=store, log=False, ensure_success=True)
        outcomes[name] = comparable(store)
        assert store.count({"uuid": flow[0].uuid}) == 2, "index 1 and the replacement, once"
    assert outcomes["ours"] == outcomes["jobflow"]


def comparable(store: JobStore) -> list[Any]:
    """The store's documents in store order; uuids, ids, times and the cache's record left
    out (the drop-in suite compares runs in full)."""
    names: dict[str, str] = {}

    def strip(value: Any) -> Any:
        if isinstance(value, str):
            return UUID_RE.sub(lambda m: names.setdefault(m.group(0), f"u{len(names)}"), value)
        if isinstance(value, dict):
            skip = {"_id", "completed_at", META_KEY}
            return {k: strip(v) for k, v in value.items() if k not in skip}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return [strip(doc) for doc in store.query({})]


# -- cache=False and JOBFLOW_CACHE_DISABLE --------------------------------------------------------
@pytest.mark.parametrize("how", ["cache=False", "JOBFLOW_CACHE_DISABLE=1"])
def test_no_cache_hashes_nothing_opens_nothing_marks_nothing(
    how, counts, run_dir, isolated_cache, monkeypatch
):
    """Plain @job and @cached_job jobs alike run as under jobflow, every time."""
    kwargs: dict[str, Any] = {"cache": False} if how == "cache=False" else {}
    if not kwargs:
        monkeypatch.setenv("JOBFLOW_CACHE_DISABLE", "1")
    for _ in range(2):
        store = JobStore(MemoryStore())
        first = jobs.cached_add(1, 2)
        flow = Flow([first, jobs.add(first.output, 3), jobs.CachedMaker().make(first.output)])
        run_locally(flow, store=store, log=False, ensure_success=True, **kwargs)
        assert [store.get_output(j.uuid) for j in flow] == [3, 6, 9]
        assert not [d for d in store.query({}) if META_KEY in d["metadata"]]
    assert counts() == {"cached_add": 2, "add": 2, "cached maker": 2}
    assert not isolated_cache.exists(), "no cache store was opened"


def test_cache_false_leaves_cached_job_functions_intact(run_dir):
    """The stand-in is only there while the job runs; the Maker is still bound."""
    maker = jobs.CachedMaker(factor=5)
    made = maker.make(2)
    function = made.function
    store = JobStore(MemoryStore())
    run_locally(made, store=store, log=False, cache=False)
    assert made.function is function
    assert store.get_output(made.uuid) == 10


# -- the indexed view, query by query against mongomock -------------------------------------------
WHEN = datetime(2020, 1, 2, 3, 4, 5, 678901)


def documents() -> list[dict[str, Any]]:
    return [
        {"uuid": "a", "index": 1, "name": "one", "output": {"x": [1, (2, 3)], "t": WHEN}},
        {"uuid": "b", "index": 1, "name": "b", "output": None, "extra": {"deep": [{"k": 1}]}},
        {"uuid": "a", "index": 2, "name": "two", "output": [WHEN.replace(tzinfo=timezone.utc)]},
        {"uuid": "c", "index": 3, "name": "c3", "output": {"aware": WHEN.astimezone()}},
        {"uuid": "c", "index": 1, "name": "c1", "output": "x"},
    ]


QUERIES: list[dict[str, Any]] = [
    {"criteria": {"uuid": "a"}},
    {"criteria": {"uuid": "a"}, "properties": ["index"], "sort": {"index": -1}, "limit": 1},
    {"criteria": {"uuid": "a"}, "properties": ["output", "uuid", "index"], "sort": {"index": 1}},
    {"criteria": {"uuid": "a", "index": 2}, "properties": {"output": 1}},
    {"criteria": {"uuid": "c"}, "sort": {"index": Sort.Descending}, "skip": 1},
    {"criteria": {"uuid": "c", "index": {"$gt": 1}}, "properties": ["name"]},
    {"criteria": {"uuid": "c"}, "sort": {"name": 1, "index": -1}, "limit": 5},
    {"criteria": {"uuid": {"$in": ["c", "b", "a"]}}, "properties": ["name", "index"]},
    {"criteria": {"uuid": "b"}, "properties": []},
    {"criteria": {"uuid": "b"}, "properties": ["_id"]},
    {"criteria": {"uuid": "old"}, "properties": ["output"]},  # present before the run
    {"criteria": {"uuid": "d"}, "sort": {"index": -1}},  # one of its documents was replaced
]
#: uuids the index reloads with one query when next read (a document of theirs was replaced)
RELOADED = ["d"]
#: answered by the store itself (shapes the index leaves to mongomock, or uuids it does not know)
DELEGATED: list[dict[str, Any]] = [
    {"criteria": {}},
    {"criteria": {"name": "b"}},
    {"criteria": {"uuid": "b"}, "properties": ["extra.deep"]},
    {"criteria": {"uuid": {"$in": ["a", "nope"]}}},
    {"criteria": {"uuid": "a"}, "properties": {"output": 0}},
    {"criteria": {"uuid": "nope"}},
    {"criteria": {"uuid": "a"}, "sort": {"$natural": -1}},
]


def _normalised(collection: Any, docs: list[dict[str, Any]]) -> list[list[tuple[str, Any]]]:
    """Documents with their ``_id`` replaced by the document's position in the collection."""
    position = {d["_id"]: i for i, d in enumerate(collection.inner.find({}))}
    return [[(k, f"#{position[v]}" if k == "_id" else v) for k, v in doc.items()] for doc in docs]


def _twin_stores() -> tuple[MemoryStore, CountingCollection, IndexedMemoryStore, Any]:
    """A plain MemoryStore, and one seen through the index, holding the same documents."""
    plain, indexed = MemoryStore(), MemoryStore()
    plain_coll, indexed_coll = counted(plain), counted(indexed)
    for store in (plain, indexed):  # history from before the run
        store.update({"uuid": "old", "index": 1, "output": 0}, key=["uuid", "index"])
    view = IndexedMemoryStore(indexed, "uuid")
    key = ["uuid", "index"]
    for target in (plain, view):
        for doc in documents():
            target.update(doc, key=key)
        target.update([{"uuid": "d", "index": 1}, {"uuid": "d", "index": 2}], key=key)
        target.update({"uuid": "d", "index": 1, "name": "again", "output": 2}, key=key)
        target.update({"uuid": "old", "index": 2, "output": 1}, key=key)
        target.update({"uuid": "e", "output": 1}, key="uuid")
    assert plain_coll.calls["bulk_write"] == 10
    assert indexed_coll.calls["bulk_write"] == 2, "only the replacements are upserts"
    return plain, plain_coll, view, indexed_coll


def test_index_writes_what_the_upserts_write():
    _, plain_coll, _, indexed_coll = _twin_stores()
    assert _normalised(indexed_coll, list(indexed_coll.inner.find({}))) == _normalised(
        plain_coll, list(plain_coll.inner.find({}))
    )


@pytest.mark.parametrize("query", QUERIES + DELEGATED, ids=repr)
def test_index_answers_like_mongomock(query):
    plain, plain_coll, view, indexed_coll = _twin_stores()
    indexed_coll.calls.clear()
    expected = _normalised(plain_coll, list(plain.query(**query)))
    assert _normalised(indexed_coll, list(view.query(**query))) == expected
    scans = indexed_coll.calls["find"]
    if query in DELEGATED:
        assert scans == 1
    else:
        # "old" predates the index: it was loaded (one query) when the view wrote to it
        assert scans == (1 if query["criteria"]["uuid"] in RELOADED else 0)
        assert list(view.query(**query)) == list(view.query(**query))
        assert indexed_coll.calls["find"] == scans


def test_index_drops_itself_when_documents_are_removed():
    _, _, view, indexed_coll = _twin_stores()
    view.remove_docs({"uuid": "a"})
    indexed_coll.calls.clear()
    assert list(view.query({"uuid": "a"})) == []
    assert indexed_coll.calls["find"] == 1


def test_documents_written_by_others_are_read_from_the_store():
    store = MemoryStore()
    coll = counted(store)
    view = IndexedMemoryStore(store, "uuid")
    store.update({"uuid": "z", "index": 1}, key=["uuid", "index"])  # not through the view
    assert [d["index"] for d in view.query({"uuid": "z"})] == [1]
    assert coll.calls["find"] == 1


def test_view_only_for_plain_jobstores_on_memory_stores(tmp_path):
    plain = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    plain.connect()
    view = indexed_view(plain)
    assert view is not plain
    assert type(view) is JobStore
    assert view.docs_store.store is plain.docs_store
    assert view.additional_stores["data"].store is plain.additional_stores["data"]
    assert view.save is plain.save
    assert isinstance(view.docs_store, IndexedMemoryStore)
    assert isinstance(view.additional_stores["data"], IndexedMemoryStore)
    on_file = JobStore(JSONStore(str(tmp_path / "docs.json"), read_only=False))
    assert indexed_view(on_file) is on_file
    shared = MemoryStore()
    shared.connect()
    assert indexed_view(JobStore(shared, additional_stores={"data": shared})).docs_store is shared
    lazy = JobStore(MemoryStore(), additional_stores=defaultdict(MemoryStore))
    lazy.connect()
    assert indexed_view(lazy).additional_stores is lazy.additional_stores


def test_other_store_types_run_as_under_jobflow(tmp_path, run_dir):
    outcomes = {}
    for name, runner in (("jobflow", jobflow_run_locally), ("ours", run_locally)):
        store = JobStore(JSONStore(str(tmp_path / f"{name}.json"), read_only=False))
        runner(dynamic(5), store=store, log=False, ensure_success=True)
        outcomes[name] = comparable(store)
    assert outcomes["ours"] == outcomes["jobflow"]


def test_concurrent_runs_on_one_memory_store(run_dir, tmp_path):
    """Two runs at once in one store: each run's index holds its own documents."""
    store = JobStore(MemoryStore())
    store.connect()
    flows = [chain(40), dynamic(40)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(flow: Flow, i: int) -> None:
        try:
            barrier.wait()
            cache = CacheStore(MemoryStore(), objects_dir=str(tmp_path / f"objects{i}"))
            run_locally(flow, store=store, log=False, cache=cache, ensure_success=True)
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(f, i)) for i, f in enumerate(flows)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.get_output(flows[0][-1].uuid) == "c" + "_end" * 40
    assert store.get_output(flows[1][-1].uuid) == [f"f{i}_end" for i in range(40)]
    assert store.count() == 40 + 43


# -- the cyclic GC during a run ------------------------------------------------------------------
_FROZEN_SEEN: list[int] = []
_CYCLE_REFS: list[Any] = []


class _Cyclic:
    """An object in a reference cycle (only the cyclic collector frees it)."""

    def __init__(self) -> None:
        self.me = self


@job
def _frozen_count(x: int) -> int:
    _FROZEN_SEEN.append(gc.get_freeze_count())
    return x + 1


@job
def _cycle_survives_full_collection(x: int) -> int:
    cyclic = _Cyclic()
    _CYCLE_REFS.append(weakref.ref(cyclic))
    gc.collect()  # a full collection while it is alive: it is frozen with the survivors
    del cyclic
    return x + 1


@job
def _cycle_collected_yet(x: int) -> int:
    """Whether the cycles of the jobs before this one are freed by a collection now."""
    gc.collect()
    _CYCLES_FREED.append([ref() is None for ref in _CYCLE_REFS])
    return x + 1


_CYCLES_FREED: list[list[bool]] = []


@pytest.mark.parametrize("runner", ["jobflow", "uncached", "cached"])
def test_a_jobs_garbage_cycles_are_freed_during_the_run(run_dir, tmp_path, runner):
    """A job's working set that a full collection saw alive is not kept frozen after the
    job: its garbage cycles are freed before the run ends, as under plain jobflow (an
    earlier release kept them until the end of the run: memory that grew with every job)."""
    _CYCLE_REFS.clear()
    _CYCLES_FREED.clear()
    first = _cycle_survives_full_collection(1)
    second = _cycle_survives_full_collection(first.output)
    flow = Flow([first, second, _cycle_collected_yet(second.output)])
    if runner == "jobflow":
        responses = jobflow_run_locally(flow, log=False, ensure_success=True)
    else:
        cache = (
            CacheStore(MemoryStore(), objects_dir=str(tmp_path)) if runner == "cached" else False
        )
        responses = run_locally(flow, log=False, cache=cache, ensure_success=True)
    assert responses[flow[-1].uuid][1].output == 4
    assert len(_CYCLE_REFS) == 2
    assert _CYCLES_FREED == [[True, True]]


@pytest.mark.parametrize("cache", [True, False])
def test_run_freezes_older_objects_and_thaws_them(run_dir, tmp_path, cache):
    """The objects held before a run are out of the collector's scans during the run only."""
    _FROZEN_SEEN.clear()
    assert gc.get_freeze_count() == 0
    first = _frozen_count(1)
    flow = Flow([first, _frozen_count(first.output)])
    store = CacheStore(MemoryStore(), objects_dir=str(tmp_path)) if cache else False
    responses = run_locally(flow, log=False, cache=store, ensure_success=True)
    assert responses[flow[-1].uuid][1].output == 3
    assert len(_FROZEN_SEEN) == 2
    assert min(_FROZEN_SEEN) > 0
    assert gc.get_freeze_count() == 0
    assert not [cb for cb in gc.callbacks if getattr(cb, "__module__", "") == manager.__name__]


def test_run_keeps_a_freeze_made_by_someone_else(run_dir):
    _FROZEN_SEEN.clear()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        run_locally(_frozen_count(1), log=False, cache=False, ensure_success=True)
        # still frozen (a few frozen objects may have been freed meanwhile), never thawed
        assert gc.get_freeze_count() > frozen // 2
    finally:
        gc.unfreeze()


def test_garbage_cycles_of_a_run_are_collected_after_it(run_dir):
    """A cycle alive at a full collection during the run's last job is freed after it."""
    _CYCLE_REFS.clear()
    run_locally(_cycle_survives_full_collection(1), log=False, cache=False, ensure_success=True)
    assert len(_CYCLE_REFS) == 1
    gc.collect()
    assert _CYCLE_REFS[0]() is None
