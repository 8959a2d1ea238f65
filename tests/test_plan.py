"""``plan`` and ``Plan.apply``: serving jobs ahead of submission.

Differential: every scenario is also run under plain jobflow, and the JobStore documents
(modulo uuids, dates and run folders), additional-store data and run-folder files are compared;
executions are counted across the runs (tests/support/jobs.py's counter).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import jobflow
import pytest
from jobflow import Flow, JobOrder, JobStore, job
from maggma.stores import MemoryStore
from monty.json import MontyDecoder, MontyEncoder, MSONable

from jobflow_cache import Cache, CacheStore, PostgresBackend, SQLiteBackend, plan, run_locally
from jobflow_cache.codec import UUID_RE
from jobflow_cache.execution.cache import META_KEY
from jobflow_cache.execution.claims import coordinator_of
from jobflow_cache.marking import is_marked
from tests.support.jobs import (
    add,
    executed,
    issue_873_flow,
    make_detour,
    make_replace,
    mul,
    nested_replace,
    read_back,
    stop_children_job,
    total,
    write_files,
)


# -- jobs of these tests (module level: they import by path) ---------------------------------------
@job(data="table")
def tabulate(n):
    """Output with a part stored in the additional store ``data`` (``data=``)."""
    executed("tabulate")
    return {"n": n, "table": [[i, i * n] for i in range(5)]}


@job
def list_prev(prev_dir: str):
    """Reads a previous job's run folder (like atomate2's ``prev_dir``)."""
    executed("list_prev")
    names = sorted(p.relative_to(prev_dir).as_posix() for p in Path(prev_dir).rglob("*"))
    Path("listing.txt").write_text("\n".join(names))
    return {"names": names, "size": (Path(prev_dir) / "result.txt").stat().st_size}


def build(factor: int = 3) -> Flow:
    """Chain, fan-out in a nested flow, a dynamic replace, data= in an additional store, a
    job writing files and one reading that folder (prev_dir). ``factor`` changes mid-chain."""
    a = add(1, 2)
    b = mul(a.output, factor)
    fan = Flow([add(b.output, i) for i in range(3)], name="fan")
    r = make_replace(2)
    t = total(r.output)
    d = tabulate(b.output)
    w = write_files("x", size=5)
    p = list_prev(w.output["dir_name"])
    rb = read_back(w.output)
    return Flow([a, b, fan, Flow([r, t], name="dynamic"), d, w, p, rb], name="main")


def new_job_store() -> JobStore:
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    store.connect()
    return store


@pytest.fixture
def cache(tmp_path: Path) -> Cache:
    return Cache(CacheStore(SQLiteBackend(tmp_path / "c.sqlite"), tmp_path / "cache/objects"))


def record(flow: Flow, cache: Cache, root: Path) -> JobStore:
    """Run ``flow`` under our run_locally with folders of its own (the cache records it)."""
    root.mkdir(parents=True, exist_ok=True)
    store = new_job_store()
    run_locally(flow, store=store, create_folders=True, root_dir=root, cache=cache, log=False)
    return store


def plain(flow: Flow, root: Path) -> JobStore:
    root.mkdir(parents=True, exist_ok=True)
    store = new_job_store()
    jobflow.run_locally(flow, store=store, create_folders=True, root_dir=root, log=False)
    return store


# -- comparing JobStores -------------------------------------------------------------------------
_DIR_RE = re.compile(r"/[^\"'\s]*?/(job_[0-9-]+|[0-9a-f-]{36}(-\d+)?)")


def _normal(value: Any) -> Any:
    text = repr(value)
    text = _DIR_RE.sub("<dir>", text)
    return UUID_RE.sub("<uuid>", text)


def documents(store: JobStore) -> list[tuple[Any, ...]]:
    """Every document as jobflow wrote it, modulo uuids, dates, folders and our metadata."""
    docs = []
    for doc in store.docs_store.query({}):
        doc.pop("_id", None)
        assert set(doc) >= {"uuid", "index", "output", "completed_at", "metadata", "hosts", "name"}
        metadata = {k: v for k, v in doc["metadata"].items() if k != META_KEY}
        docs.append(
            (doc["name"], doc["index"], _normal(doc["output"]), repr(metadata), len(doc["hosts"]))
        )
    return sorted(docs)


def blobs(store: JobStore) -> list[tuple[Any, ...]]:
    found = []
    for doc in store.additional_stores["data"].query({}):
        found.append((doc["job_index"], _normal(doc["data"]), doc["@class"], doc["@module"]))
    return sorted(found)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def output_of(store: JobStore, name: str) -> Any:
    docs = [d for d in store.docs_store.query({"name": name})]
    return max(docs, key=lambda d: d["index"])["output"]


def statuses(p: Any) -> dict[str, str]:
    return {job.name: job.status for job in p}


# -- tests ---------------------------------------------------------------------------------------
def test_fully_cached_flow_is_served_whole_and_submits_nothing(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    reference = plain(build(), tmp_path / "plain")
    counts.reset()
    record(build(), cache, tmp_path / "rec")
    assert counts.total() == 13  # 11 jobs and the 2 adds of the replace
    counts.reset()

    flow = build()
    planned = plan(flow, cache=cache)
    assert counts.total() == 0
    assert set(statuses(planned).values()) == {"served"}, [j.to_dict() for j in planned]
    assert [j.uuid for j in planned] == [j.uuid for j, _ in flow.iterflow()]
    replace_row = next(j for j in planned if j.name == "make_replace")
    assert replace_row.new_jobs == 2  # the two adds (store_inputs keeps its uuid)
    assert all(j.digest and len(j.digest) == 32 for j in planned)

    store = new_job_store()
    served_dir = tmp_path / "shared/served"
    remaining = planned.apply(store, served_dir=served_dir)
    assert counts.total() == 0  # served jobs execute 0 times
    assert remaining.job_uuids == ()
    assert remaining.uuid == flow.uuid
    assert remaining.name == "main"
    # the documents jobflow writes, one per job and index, as plain jobflow wrote them
    assert documents(store) == documents(reference)
    assert blobs(store) == blobs(reference)
    for doc in store.docs_store.query({}):
        assert doc["metadata"][META_KEY]["outcome"] == "hit"
    # files of served jobs: in <served_dir>/<uuid>, as plain jobflow left them
    write_uuid = next(j.uuid for j in planned if j.name == "write_files")
    assert planned.applied[write_uuid] == (served_dir / write_uuid).resolve()
    plain_write = Path(output_of(reference, "write_files")["dir_name"])
    assert folder_files(served_dir / write_uuid) == folder_files(plain_write)
    assert output_of(store, "write_files")["dir_name"] == str((served_dir / write_uuid).resolve())
    list_uuid = next(j.uuid for j in planned if j.name == "list_prev")
    plain_list = next(
        Path(d) for d in (tmp_path / "plain").iterdir() if (d / "listing.txt").exists()
    )
    assert folder_files(served_dir / list_uuid) == folder_files(plain_list)
    # the flow itself is untouched by plan and apply
    assert all(not is_marked(j.function) for j, _ in flow.iterflow())
    assert all(META_KEY not in j.metadata for j, _ in flow.iterflow())
    # nothing to submit (jobflow's managers refuse an empty flow: check before submitting)
    assert not remaining
    assert len(remaining) == 0


@pytest.mark.parametrize("manager", ["jobflow", "jobflow_cache"])
def test_half_cached_flow_serves_upstream_and_runs_the_rest(
    cache: Cache, tmp_path: Path, counts: Any, manager: str
) -> None:
    record(build(), cache, tmp_path / "rec")
    reference = plain(build(factor=4), tmp_path / "plain")
    counts.reset()

    flow = build(factor=4)  # mul changes: it, the fan and tabulate run; the rest is served
    planned = plan(flow, cache=cache)
    got = statuses(planned)
    assert got["mul"] == "run"
    assert "not in the cache" in _row(planned, "mul").reason
    assert _row(planned, "mul").digest is not None
    assert got["tabulate"] == "unknown"
    assert "waits for mul (run)" in _row(planned, "tabulate").reason
    assert _row(planned, "tabulate").digest is None
    assert [j.status for j in planned if j.name == "add"].count("unknown") == 3
    for name in ("make_replace", "total", "write_files", "list_prev", "read_back"):
        assert got[name] == "served", name
    assert counts.total() == 0

    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    assert counts.total() == 0
    kept = sorted(j.name for j, _ in remaining.iterflow())
    assert kept == ["add", "add", "add", "mul", "tabulate"]
    # nested structure kept: the fan subflow is there, the dynamic one (all served) is gone
    assert [c.name for c in remaining.jobs] == ["mul", "fan", "tabulate"]
    assert all(is_marked(j.function) for j, _ in remaining.iterflow())
    root_add = next(j for j in planned if j.name == "add" and j.status == "served")
    assert root_add.uuid not in remaining.job_uuids

    if manager == "jobflow":
        jobflow.run_locally(
            remaining, store=store, allow_external_references=True, ensure_success=True, log=False
        )
    else:
        run_locally(
            remaining,
            store=store,
            allow_external_references=True,
            ensure_success=True,
            cache=cache,
            log=False,
        )
    assert sorted(counts().elements()) == ["add", "add", "add", "mul", "tabulate"]
    assert documents(store) == documents(reference)
    assert blobs(store) == blobs(reference)


def _swallowed(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if getattr(r, "jfc_swallowed_warning", False)]


def _row(planned: Any, name: str) -> Any:
    return next(j for j in planned if j.name == name)


def test_plan_agrees_with_the_worker(cache: Cache, tmp_path: Path) -> None:
    """The property: plan says served exactly for the jobs a worker serves, with its digest."""
    record(build(), cache, tmp_path / "rec")
    for factor in (3, 4, 5):
        flow = build(factor=factor)
        planned = {j.uuid: j for j in plan(flow, cache=cache)}
        store = record(flow, cache, tmp_path / f"run{factor}")  # the worker: ours, run whole
        for doc in store.docs_store.query({"index": 1}):
            row = planned.get(doc["uuid"])
            if row is None:  # a job the replay made
                continue
            meta = doc["metadata"][META_KEY]
            if row.status == "served" or row.served_on_worker:
                assert meta["outcome"] == "hit", (row, meta)
            else:
                assert meta["outcome"] != "hit", (row, meta)
            if row.digest is not None:
                assert meta["digest"] == row.digest, row


def test_plan_writes_nothing(cache: Cache, tmp_path: Path) -> None:
    record(build(), cache, tmp_path / "rec")
    store = cache.store
    before = sorted((d["digest"], d.get("hits"), str(d.get("last_hit"))) for d in store.find({}))
    objects = sorted(p.name for p in Path(store.objects_dir).rglob("*"))
    job_store = new_job_store()
    planned = plan(build(), cache=cache, job_store=job_store)
    assert planned.counts()["served"] == 11
    after = sorted((d["digest"], d.get("hits"), str(d.get("last_hit"))) for d in store.find({}))
    assert after == before
    assert sorted(p.name for p in Path(store.objects_dir).rglob("*")) == objects
    assert job_store.docs_store.count() == 0
    assert not (Path(store.objects_dir).parent / "served").exists()
    aliases = coordinator_of(store)
    assert aliases is not None
    uuids = [j.uuid for j in planned]
    assert aliases.get_aliases(uuids) == {}
    # apply counts the hits it serves, and records the served jobs' uuids and folders for
    # the workers that run their children (prev_dir)
    planned.apply(new_job_store(), served_dir=tmp_path / "served")
    hits = {d["digest"]: d.get("hits") for d in store.find({})}
    assert sum(hits.values()) > sum(h or 0 for _, h, _ in before)
    assert aliases.get_aliases(uuids) == {j.uuid: j.digest for j in planned}
    folder = str(planned.applied[uuids[0]])
    assert aliases.get_aliases([folder]) == {folder: planned.jobs[0].digest}


def test_served_dir_defaults_beside_the_object_area(cache: Cache, tmp_path: Path) -> None:
    record(Flow([write_files("y")]), cache, tmp_path / "rec")
    planned = plan(Flow([write_files("y")]), cache=cache)
    assert planned.served_dir() == tmp_path / "cache/served"
    planned.apply(new_job_store())
    (uuid,) = planned.applied
    assert (tmp_path / "cache/served" / uuid / "result.txt").exists()


def test_served_dir_setting(cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOBFLOW_CACHE_SERVED_DIR", str(tmp_path / "elsewhere"))
    settings_cache = Cache(cache.store)
    record(Flow([write_files("z")]), settings_cache, tmp_path / "rec")
    planned = plan(Flow([write_files("z")]), cache=settings_cache)
    assert planned.served_dir() == tmp_path / "elsewhere"


def test_job_after_a_running_job_is_unknown_and_external_upstream_counts(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    first = add(10, 1)
    record(Flow([first, mul(first.output, 2)]), cache, tmp_path / "rec")
    counts.reset()
    a = add(10, 2)  # new: runs
    planned = plan(Flow([a, mul(a.output, 2)]), cache=cache)
    assert statuses(planned) == {"add": "run", "mul": "unknown"}
    # once the upstream job is in the JobStore, its child is known (and here, a miss)
    store = new_job_store()
    a2 = add(10, 2)
    jobflow.run_locally(a2, store=store, log=False)
    again = plan(mul(a2.output, 2), cache=cache, job_store=store)
    assert statuses(again) == {"mul": "run"}
    # an upstream job already in the JobStore whose child is cached: served ahead
    c = add(10, 1)
    store2 = new_job_store()
    jobflow.run_locally(Flow([c]), store=store2, log=False)
    d = mul(c.output, 2)
    counts.reset()
    third = plan(Flow([d]), cache=cache, job_store=store2)
    assert statuses(third) == {"mul": "served"}
    remaining = third.apply(store2, served_dir=tmp_path / "served")
    assert remaining.job_uuids == ()
    assert counts.total() == 0
    assert output_of(store2, "mul") == 22


def test_detour_and_stop_children_are_served_on_the_worker(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    def build_dynamic() -> Flow:
        s = stop_children_job(1)
        child = add(s.output, 1)
        return Flow([make_detour(5), s, child])

    record(build_dynamic(), cache, tmp_path / "rec")
    counts.reset()
    flow = build_dynamic()
    planned = plan(flow, cache=cache)
    detour, stop, child = list(planned)
    assert detour.status == "run"
    assert detour.served_on_worker
    assert "detour" in detour.reason
    assert stop.status == "run"
    assert stop.served_on_worker
    assert "stops its children" in stop.reason
    assert child.status == "unknown"
    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    assert store.docs_store.count() == 0
    assert sorted(j.name for j, _ in remaining.iterflow()) == sorted(
        ["make_detour", "stop_children_job", "add"]
    )
    run_locally(remaining, store=store, allow_external_references=True, cache=cache, log=False)
    assert counts.total() == 0  # the worker serves them (and the detour's job)
    outcomes = {d["name"]: d["metadata"][META_KEY]["outcome"] for d in store.docs_store.query({})}
    assert outcomes == {"make_detour": "hit", "stop_children_job": "hit", "add": "hit"}


@pytest.mark.warnings_logged  # the worker warns of the invalid entry it does not serve
def test_replay_not_cached_whole_stays_in_the_flow(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    r = make_replace(2)
    record(Flow([r, total(r.output)]), cache, tmp_path / "rec")
    # one of the jobs the replay makes is no longer servable
    add_digests = [d["digest"] for d in cache.store.find({"name": "add"})]
    cache.store.invalidate(add_digests[:1], "test", cascade=False)
    counts.reset()
    r2 = make_replace(2)
    flow = Flow([r2, total(r2.output)])
    planned = plan(flow, cache=cache)
    row, child = list(planned)
    assert row.status == "run"
    assert row.served_on_worker
    assert "its replay makes add, which is" in row.reason
    assert child.status == "unknown"
    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    assert store.docs_store.count() == 0
    assert not any((tmp_path / "served").glob("*/*"))  # no folder left of the attempt
    run_locally(remaining, store=store, cache=cache, allow_external_references=True, log=False)
    assert sorted(counts().elements()) == ["add"]  # the worker serves the rest


@pytest.mark.warnings_logged
def test_missing_file_objects_at_apply_keep_the_job_and_its_children(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    def build_files() -> Flow:
        w = write_files("q")
        return Flow([add(1, 1), w, read_back(w.output)])

    record(build_files(), cache, tmp_path / "rec")
    planned = plan(build_files(), cache=cache)
    assert planned.counts() == {"served": 3, "run": 0, "unknown": 0}
    for path in Path(cache.store.objects_dir).rglob("*"):  # lost between plan and apply
        if path.is_file():
            path.chmod(0o644)
            path.unlink()
    store = new_job_store()
    counts.reset()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    assert sorted(j.name for j, _ in remaining.iterflow()) == ["read_back", "write_files"]
    assert [d["name"] for d in store.docs_store.query({})] == ["add"]
    assert not any((tmp_path / "served").glob("*/result.txt"))
    run_locally(remaining, store=store, cache=cache, allow_external_references=True, log=False)
    assert sorted(counts().elements()) == ["read_back", "write_files"]


def test_apply_never_touches_a_folder_it_did_not_create(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    """A second apply of one plan (after an error, say), or a folder already at
    ``<served_dir>/<uuid>``: served files go to a folder of their own, and nothing already
    there is changed or removed, the first apply's folders included."""

    def build_files() -> Flow:
        w = write_files("q")
        return Flow([w, read_back(w.output)])

    record(build_files(), cache, tmp_path / "rec")
    flow = build_files()
    planned = plan(flow, cache=cache)
    assert planned.counts() == {"served": 2, "run": 0, "unknown": 0}
    served_dir = tmp_path / "served"
    writer_uuid = next(j.uuid for j, _ in flow.iterflow() if j.name == "write_files")
    taken = served_dir / writer_uuid  # the user's, with a file the job also writes
    taken.mkdir(parents=True)
    (taken / "result.txt").write_text("the user's own\n")
    counts.reset()

    first = new_job_store()
    assert planned.apply(first, served_dir=served_dir).job_uuids == ()
    second = new_job_store()
    assert planned.apply(second, served_dir=served_dir).job_uuids == ()
    assert counts.total() == 0
    assert (taken / "result.txt").read_text() == "the user's own\n"
    assert sorted(p.name for p in taken.iterdir()) == ["result.txt"]
    for store in (first, second):  # each store's folders hold what a run left there
        writer = output_of(store, "write_files")
        assert Path(writer["dir_name"]).parent == served_dir.resolve()
        assert writer["dir_name"] != str(taken.resolve())
        assert Path(writer["file"]).read_text() == "q\n" * 10
        assert Path(writer["dir_name"], "sub", "data.bin").read_bytes() == b"q" * 10
    assert (
        output_of(first, "write_files")["dir_name"] != output_of(second, "write_files")["dir_name"]
    )


@pytest.mark.warnings_logged
def test_jobstore_failures_never_leave_half_documents(
    cache: Cache, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    record(build(), cache, tmp_path / "rec")
    planned = plan(build(), cache=cache)
    # no additional store "data": tabulate cannot be stored, nothing of it is written
    store = JobStore(MemoryStore())
    store.connect()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    assert [j.name for j, _ in remaining.iterflow()] == ["tabulate"]
    assert "tabulate" not in {d["name"] for d in store.docs_store.query({})}
    assert store.docs_store.count() == 13  # 14 documents in all (store_inputs: index 2)

    caplog_before = _swallowed(caplog)

    class Down(MemoryStore):
        def update(self, docs: Any, key: Any = None) -> None:
            raise ConnectionError("the database is down")

    down = JobStore(Down(), additional_stores={"data": MemoryStore()})
    down.connect()
    remaining = plan(build(), cache=cache).apply(down, served_dir=tmp_path / "served2")
    assert len(remaining.job_uuids) == 11  # everything is submitted
    assert not any((tmp_path / "served2").glob("*/*"))
    (warning,) = _swallowed(caplog)[len(caplog_before) :]  # one warning, not one per job
    assert "'add' and the jobs after it are not served ahead" in warning
    assert "the database is down" in warning
    assert down.additional_stores["data"].count() == 0


@pytest.mark.postgres
def test_postgres_cache_half_cached(make_pg_backend: Any, tmp_path: Path, counts: Any) -> None:
    pg_cache = Cache(CacheStore(make_pg_backend(), tmp_path / "pg/objects"))
    record(build(), pg_cache, tmp_path / "rec")
    reference = plain(build(factor=6), tmp_path / "plain")
    counts.reset()
    planned = plan(build(factor=6), cache=Cache(pg_cache.store))
    assert planned.counts() == {"served": 6, "run": 1, "unknown": 4}
    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    assert store.docs_store.count() == 9  # 6 jobs, the replaced one's index 2, its 2 new jobs
    run_locally(remaining, store=store, allow_external_references=True, cache=pg_cache, log=False)
    assert sorted(counts().elements()) == ["add", "add", "add", "mul", "tabulate"]
    assert documents(store) == documents(reference)
    assert blobs(store) == blobs(reference)


def test_disabled_cache_plans_nothing(
    cache: Cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record(Flow([add(1, 1)]), cache, tmp_path / "rec")
    monkeypatch.setenv("JOBFLOW_CACHE_DISABLE", "1")
    flow = Flow([add(1, 1)])
    planned = plan(flow, cache=cache)
    assert [j.status for j in planned] == ["run"]
    store = new_job_store()
    assert planned.apply(store).job_uuids == flow.job_uuids
    assert store.docs_store.count() == 0


def test_plan_options_count_like_cache_flow(cache: Cache, tmp_path: Path) -> None:
    record(Flow([add(2, 2)]), cache, tmp_path / "rec")
    assert [j.status for j in plan(Flow([add(2, 2)]), cache=cache)] == ["served"]
    # another cache_version: another digest, a miss
    planned = plan(Flow([add(2, 2)]), cache=cache, cache_version="2")
    assert [j.status for j in planned] == ["run"]
    remaining = planned.apply(new_job_store())
    (marked,) = [j for j, _ in remaining.iterflow()]
    assert marked.function.options == {"cache_version": "2"}
    assert os.fspath(planned.served_dir()).endswith("served")


def test_remaining_flow_survives_json_and_converts_to_fireworks(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    fireworks_manager = pytest.importorskip("jobflow.managers.fireworks")
    record(build(), cache, tmp_path / "rec")
    planned = plan(build(factor=7), cache=cache)
    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    # what a LaunchPad or jobflow-remote's queue database holds
    text = json.dumps(remaining.as_dict(), cls=MontyEncoder)
    again = MontyDecoder().process_decoded(json.loads(text))
    assert isinstance(again, Flow)
    assert again.job_uuids == remaining.job_uuids
    assert all(is_marked(j.function) for j, _ in again.iterflow())
    # references to the served jobs are external: FireWorks takes them with the flag
    workflow = fireworks_manager.flow_to_workflow(again, store, allow_external_references=True)
    assert len(workflow.fws) == 5
    parents = {fw.name: len(workflow.links.parent_links.get(fw.fw_id, [])) for fw in workflow.fws}
    assert parents["mul"] == 0
    assert parents["tabulate"] == 1
    counts.reset()
    jobflow.run_locally(again, store=store, allow_external_references=True, log=False)
    assert sorted(counts().elements()) == ["add", "add", "add", "mul", "tabulate"]
    assert output_of(store, "tabulate")["n"] == 21


def test_refresh_and_read_only_modes(cache: Cache, tmp_path: Path) -> None:
    record(Flow([add(3, 3)]), cache, tmp_path / "rec")
    (refresh,) = plan(Flow([add(3, 3)]), cache=cache, mode="refresh")
    assert refresh.status == "run"
    assert refresh.reason.startswith("refresh")
    (read_only,) = plan(Flow([add(3, 3)]), cache=cache, mode="read_only")
    assert read_only.status == "served"


@job
def list_prev_plus(prev_dir: str, extra):
    """A prev_dir job with a second input from a job that runs."""
    executed("list_prev_plus")
    return {"names": sorted(os.listdir(prev_dir)), "extra": extra}


def build_prev() -> Flow:
    w = write_files("p", size=3)
    a = add(1, 1)
    return Flow([w, a, list_prev_plus(w.output["dir_name"], a.output)])


@pytest.mark.warnings_logged  # the worker warns of the invalid entry of add it does not serve
@pytest.mark.parametrize("manager", ["jobflow", "jobflow_cache"])
def test_unknown_job_reading_a_served_folder_is_served_on_the_worker(
    tmp_path: Path, counts: Any, monkeypatch: pytest.MonkeyPatch, manager: str
) -> None:
    """A job waiting for a job that runs, with a served job's folder in its inputs (prev_dir):
    the worker finds that folder's owner in the cache (apply recorded it) and serves it."""
    if manager == "jobflow_cache":
        # our run_locally looks other processes' run folders up in the store only with
        # EXCLUSIVE_DIRS (a worker outside run_locally always does): without it, the job
        # runs (a missed hit, never a false one)
        monkeypatch.setenv("JOBFLOW_CACHE_EXCLUSIVE_DIRS", "1")
    (tmp_path / "rec").mkdir()
    run_locally(build_prev(), store=new_job_store(), create_folders=True, root_dir=tmp_path / "rec")
    default = Cache()
    assert default.connect()
    (add_digest,) = [d["digest"] for d in default.store.find({"name": "add"})]
    default.store.invalidate(add_digest, "runs again, with the same result", cascade=False)
    counts.reset()
    planned = plan(build_prev())
    assert [j.status for j in planned] == ["served", "run", "unknown"]
    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    (tmp_path / "work").mkdir()
    if manager == "jobflow":
        jobflow.run_locally(
            remaining,
            store=store,
            allow_external_references=True,
            create_folders=True,
            root_dir=tmp_path / "work",
            log=False,
        )
    else:
        run_locally(
            remaining,
            store=store,
            allow_external_references=True,
            create_folders=True,
            root_dir=tmp_path / "work",
            log=False,
        )
    assert sorted(counts().elements()) == ["add"]
    doc = store.query_one({"name": "list_prev_plus"})
    assert doc["metadata"][META_KEY]["outcome"] == "hit"
    assert doc["output"] == {"names": ["result.txt", "sub"], "extra": 2}


def test_issue_873_fail_fix_rebuild_serves_the_relaxations_ahead(
    cache: Cache, tmp_path: Path, counts: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jobflow #873 with a Maker's jobs: the static step fails, is fixed, the flow rebuilt;
    the two relaxations are served ahead (their nested flow is dropped), only the rest runs."""
    reference = plain(issue_873_flow(), tmp_path / "plain")
    monkeypatch.setenv("JFC_FAIL", "static")
    record(issue_873_flow(), cache, tmp_path / "rec")  # static fails: dos and band never run
    monkeypatch.delenv("JFC_FAIL")
    counts.reset()
    flow = issue_873_flow()
    planned = plan(flow, cache=cache)
    assert [(j.name, j.status) for j in planned] == [
        ("relax1", "served"),
        ("relax2", "served"),
        ("static", "run"),
        ("dos", "unknown"),
        ("band", "unknown"),
    ]
    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    assert [c.name for c in remaining.jobs] == ["static", "dos", "band"]  # "double relax" gone
    relax1 = planned.jobs[0].uuid
    assert (tmp_path / "served" / relax1 / "OUTCAR").read_text() == "steps=10 value=1.0\n"
    (tmp_path / "work").mkdir()
    jobflow.run_locally(
        remaining,
        store=store,
        allow_external_references=True,
        create_folders=True,
        root_dir=tmp_path / "work",
        log=False,
    )
    assert sorted(counts().elements()) == ["add", "mul", "static"]  # dos, band, static
    assert documents(store) == documents(reference)


def test_nested_replace_is_served_whole(cache: Cache, tmp_path: Path, counts: Any) -> None:
    def build_nested() -> Flow:
        n = nested_replace(2)
        return Flow([n, add(n.output, 1)])

    reference = plain(build_nested(), tmp_path / "plain")
    record(build_nested(), cache, tmp_path / "rec")
    counts.reset()
    planned = plan(build_nested(), cache=cache)
    assert [(j.status, j.new_jobs) for j in planned] == [("served", 2), ("served", 0)]
    assert planned.jobs[0].reason == "served from the cache with the 2 jobs its replay makes"
    store = new_job_store()
    assert not planned.apply(store, served_dir=tmp_path / "served")
    assert counts.total() == 0
    assert documents(store) == documents(reference)  # indexes 1 to 3 of the replaced job
    assert output_of(store, "add") == 8


@pytest.mark.atomate2
@pytest.mark.slow
# atomate2's and phonopy's own notices (as errors, they would fail the jobs)
@pytest.mark.filterwarnings("ignore:Initial magnetic moments:UserWarning")
@pytest.mark.filterwarnings(r"ignore:(?s).*phonopy v3:UserWarning")
def test_atomate2_phonon_flow_is_served_ahead_whole(cache: Cache, tmp_path: Path) -> None:
    """atomate2's PhononMaker (EMT): its dynamic jobs replay pymatgen structures and phonopy
    objects; a rebuilt flow is served entirely ahead, with the documents of the run."""
    for module in ("atomate2", "ase", "phonopy", "seekpath"):
        pytest.importorskip(module)
    from tests.integration.a2_flows import phonon_flow

    recorded = record(phonon_flow(), cache, tmp_path / "rec")
    planned = plan(phonon_flow(), cache=cache)
    rows = [(j.name, j.status, j.reason) for j in planned]
    assert planned.counts() == {"served": 5, "run": 0, "unknown": 0}, rows
    store = new_job_store()
    assert not planned.apply(store, served_dir=tmp_path / "served")
    assert documents(store) == documents(recorded)
    assert blobs(store) == blobs(recorded)


@pytest.mark.postgres
def test_cache_store_down_plans_everything_to_run(
    pg_cluster: Any, tmp_path: Path, counts: Any
) -> None:
    """A PostgreSQL cache that went down: plan says why and serves nothing, never raises."""
    store = CacheStore(PostgresBackend(pg_cluster.uri, table="plan_down"), tmp_path / "pg/objects")
    record(Flow([add(5, 5)]), Cache(store), tmp_path / "rec")
    store.close()
    pg_cluster.stop()
    down = CacheStore(PostgresBackend(pg_cluster.uri, table="plan_down"), tmp_path / "pg/objects")
    planned = plan(Flow([add(5, 5)]), cache=Cache(down))
    (row,) = planned
    assert row.status == "run"
    assert row.reason.startswith("the cache store is unavailable: the cache store postgresql")
    job_store = new_job_store()
    remaining = planned.apply(job_store)
    assert len(remaining.job_uuids) == 1
    assert job_store.docs_store.count() == 0


def test_child_of_a_served_replaced_job_reads_its_last_index(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    def build_child(n: int) -> Flow:
        r = make_replace(2)
        return Flow([r, mul(r.output, n)])  # a list times n

    record(build_child(1), cache, tmp_path / "rec")
    reference = plain(build_child(2), tmp_path / "plain")
    counts.reset()
    planned = plan(build_child(2), cache=cache)
    assert [j.status for j in planned] == ["served", "run"]
    store = new_job_store()
    remaining = planned.apply(store, served_dir=tmp_path / "served")
    jobflow.run_locally(remaining, store=store, allow_external_references=True, log=False)
    assert sorted(counts().elements()) == ["mul"]
    assert output_of(store, "mul") == [0, 2, 0, 2]
    assert documents(store) == documents(reference)


def test_linear_order_counts_as_a_dependency(cache: Cache, tmp_path: Path) -> None:
    """In a JobOrder.LINEAR flow a job waits for the one before it, reference or not."""
    record(Flow([add(1, 1), add(2, 2)], order=JobOrder.LINEAR), cache, tmp_path / "rec")
    flow = Flow([add(1, 5), add(2, 2)], order=JobOrder.LINEAR)  # the first one changed
    assert [(j.status, j.reason) for j in plan(flow, cache=cache)] == [
        ("run", "not in the cache"),
        ("unknown", "waits for add (run)"),
    ]
    auto = Flow([add(1, 5), add(2, 2)])
    assert [j.status for j in plan(auto, cache=cache)] == ["run", "served"]


@pytest.mark.postgres
def test_read_only_store_plans_and_applies(pg_cluster: Any, tmp_path: Path, counts: Any) -> None:
    """A group's cache read through a PostgreSQL role that may only SELECT: plan serves, and
    apply with mode="read_only" serves into the JobStore without writing to the cache."""
    import psycopg

    def build_ro() -> Flow:
        w = write_files("ro")
        return Flow([w, read_back(w.output)])

    writer = CacheStore(PostgresBackend(pg_cluster.uri, table="shared"), tmp_path / "objects")
    record(build_ro(), Cache(writer), tmp_path / "rec")
    writer.close()
    with psycopg.connect(pg_cluster.uri, autocommit=True) as conn:
        conn.execute("CREATE ROLE reader LOGIN")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
    reader_uri = pg_cluster.uri.replace("postgres@", "reader@")
    assert reader_uri != pg_cluster.uri
    reader = CacheStore(PostgresBackend(reader_uri, table="shared"), tmp_path / "objects")
    counts.reset()
    planned = plan(build_ro(), cache=Cache(reader), mode="read_only")
    assert [j.status for j in planned] == ["served", "served"]
    store = new_job_store()
    assert not planned.apply(store, served_dir=tmp_path / "served")
    assert counts.total() == 0
    assert output_of(store, "read_back") == 10


# -- warnings of a served job ------------------------------------------------------------------
class LoudOutput(MSONable):
    """An output whose decoding warns (as pymatgen and phonopy objects do on loading)."""

    def __init__(self, value: int) -> None:
        self.value = value

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoudOutput:
        warnings.warn(f"loading LoudOutput {d['value']}", UserWarning, stacklevel=2)
        return cls(d["value"])


@job
def loud(n: int) -> LoudOutput:
    executed("loud")
    return LoudOutput(n)


def test_a_warning_while_serving_ahead_reaches_the_caller_once(
    cache: Cache, tmp_path: Path, counts: Any
) -> None:
    """A warning (not the cache's) raised while a job is served ahead is passed on to the
    caller, once: it was passed on inside the block that records warnings, which recorded it
    again, and plan() looped without end, its memory growing (OOM in CI on an atomate2
    phonon flow)."""
    record(Flow([loud(1), loud(2)]), cache, tmp_path / "rec")
    counts.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        planned = plan(Flow([loud(1), loud(2)]), cache=cache)
    assert counts.total() == 0
    assert set(statuses(planned).values()) == {"served"}
    loading = sorted(str(w.message) for w in caught if "loading LoudOutput" in str(w.message))
    assert loading == sorted(set(loading))  # once each
    assert {"loading LoudOutput 1", "loading LoudOutput 2"} <= set(loading)
