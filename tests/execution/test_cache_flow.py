"""``cache_flow``: a flow's jobs marked so that any manager serves or records them.

Real jobflow flows (and a real atomate2 EMT flow) run under jobflow's OWN ``run_locally`` in
fresh processes: the mark must survive the flow's JSON and work without our manager. Served
runs are compared with plain jobflow runs of the same flow (differential).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jobflow import Flow, JobStore, Response, job
from jobflow import run_locally as jobflow_run_locally
from monty.json import MontyDecoder, MontyEncoder, jsanitize

from jobflow_cache import cache_flow
from jobflow_cache import run_locally as jfc_run_locally
from jobflow_cache.marking import CachedFunction
from tests.conftest import Counts, run_python
from tests.support import jobs


# -- jobs of this module (importable by path in the subprocesses) ------------------------------
@job
def replace_with_marked(n: int):
    """A dynamic job whose replacement is already marked (its replay then holds the mark)."""
    jobs.executed("replace_with_marked")
    new = [jobs.add(i, 10) for i in range(n)]
    return Response(replace=cache_flow(Flow(new, output=[j.output for j in new])))


@job
def return_job_directly(x: int):
    """Returns a Job (jobflow makes it a replace)."""
    jobs.executed("return_job_directly")
    return jobs.mul(x, 3)


@job
def return_job_list(n: int):
    """Returns a list of Jobs (jobflow makes it a replace)."""
    jobs.executed("return_job_list")
    return [jobs.add(i, 7) for i in range(n)]


@job
def return_numbers(n: int):
    """Returns a plain list (an output, not new jobs)."""
    jobs.executed("return_numbers")
    return list(range(n))


def demo_flow() -> Flow:
    """Plain @job functions, a Maker flow nested two deep, and three kinds of dynamic job."""
    inner = jobs.issue_873_flow(1.5)  # DoubleRelax (nested Flow) -> static -> dos, band
    rep = jobs.make_replace(3)
    add_ = jobs.make_addition(inner.jobs[-1].output)
    det = jobs.make_detour(4)
    direct = return_job_directly(5)
    final = jobs.total([rep.output[0], rep.output[2], add_.output, det.output, direct.output])
    final.name = "final"
    return Flow([inner, rep, add_, det, direct, final], name="demo")


#: The program each fresh process runs: build, maybe mark, run under ``runner``, print outputs.
PROGRAM = """
import json, sys
from jobflow import JobStore
from maggma.stores import MemoryStore
from tests.execution.test_cache_flow import demo_flow, outputs_by_name
from jobflow_cache import cache_flow
mark, runner = {mark!r}, {runner!r}
flow = demo_flow()
if mark:
    cache_flow(flow, **{options!r})
store = JobStore(MemoryStore())
store.connect()
if runner == "jobflow":
    from jobflow import run_locally
    run_locally(flow, store=store, ensure_success=True, create_folders=True)
else:
    from jobflow_cache import run_locally
    run_locally(flow, store=store, ensure_success=True, log=False, create_folders=True)
print(json.dumps(outputs_by_name(store)))
"""


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def outputs_by_name(store: JobStore) -> dict[str, Any]:
    """``{name: [output, ...]}`` of every stored job (uuids left out), and the cache outcomes
    under ``"_outcomes"``."""
    found: dict[str, Any] = {}
    outcomes: dict[str, list[str | None]] = {}
    for doc in store.query({}, sort={"completed_at": 1}):
        output = doc["output"]
        if isinstance(output, dict) and "uuid" in output:
            output = {k: v for k, v in output.items() if k != "uuid"}
        if isinstance(output, dict) and "dir_name" in output:
            # the run folder differs; the files the job left there must not
            folder = Path(output["dir_name"])
            output = {k: v for k, v in output.items() if k != "dir_name"}
            output["_files"] = {p.name: p.read_text() for p in sorted(folder.iterdir())}
        text = UUID.sub("<uuid>", json.dumps(output, sort_keys=True))  # new in every run
        found.setdefault(doc["name"], []).append(text)
        meta = (doc.get("metadata") or {}).get("jobflow_cache") or {}
        outcomes.setdefault(doc["name"], []).append(meta.get("outcome"))
    result = {name: sorted(values) for name, values in found.items()}
    result["_outcomes"] = {name: sorted(map(str, v)) for name, v in outcomes.items()}
    return result


def run_fresh(mark: bool, runner: str = "jobflow", cwd: Path | None = None, **options: Any):
    code = PROGRAM.format(mark=mark, runner=runner, options=options)
    return json.loads(run_python(code, cwd=cwd).strip().splitlines()[-1])


def without_outcomes(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "_outcomes"}


def all_jobs(flow: Flow) -> list[Any]:
    return [j for j, _ in flow.iterflow()]


# -- marking itself ----------------------------------------------------------------------------
def test_marks_every_job_nested_and_maker_jobs_changing_nothing_else() -> None:
    flow = demo_flow()
    flow.jobs[1].update_metadata({"mine": 1})
    before = flow.as_dict()
    makers = {j.uuid: j.maker for j in all_jobs(flow)}
    assert any(m is not None for m in makers.values())  # the Maker jobs are there

    assert cache_flow(flow, cache_version=3) is flow
    marked = all_jobs(flow)
    assert len(marked) == 10
    assert all(isinstance(j.function, CachedFunction) for j in marked)
    assert all(j.function.options == {"cache_version": "3"} for j in marked)
    # the Maker is the same object (job.maker, and Job.run's binding, read it)
    assert {j.uuid: j.maker for j in marked} == makers
    assert all(makers[j.uuid] is j.maker for j in marked)

    after = flow.as_dict()

    def strip(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k != "function"}
        if isinstance(d, list):
            return [strip(v) for v in d]
        return d

    assert strip(after) == strip(before)  # names, uuids, metadata, config, hosts, references
    assert after != before  # the functions are marked


def test_marked_flow_survives_every_json_round_trip() -> None:
    flow = cache_flow(demo_flow(), ignore=["b"], env=["OMP_NUM_THREADS"], mode="refresh")
    reference = flow.as_dict()
    text = json.dumps(reference)
    copies = [
        Flow.from_dict(json.loads(text)),
        json.loads(json.dumps(flow, cls=MontyEncoder), cls=MontyDecoder),
        MontyDecoder().process_decoded(jsanitize(flow, strict=True, enum_values=True)),
    ]
    for copy in copies:
        assert isinstance(copy, Flow)
        # as JSON (jobflow's own round trip turns a reference's attributes () into [])
        assert json.loads(json.dumps(copy.as_dict())) == json.loads(text)
        for j in all_jobs(copy):
            assert isinstance(j.function, CachedFunction)
            assert j.function.options == {
                "ignore": ["b"],
                "env": ["OMP_NUM_THREADS"],
                "mode": "refresh",
            }
        makers = [j.maker for j in all_jobs(copy) if j.maker is not None]
        assert [type(m).__name__ for m in makers] == ["RelaxMaker"] * 3


def test_cache_flow_is_idempotent_and_updates_options() -> None:
    flow = demo_flow()
    cache_flow(flow, cache_version=1)
    once = flow.as_dict()
    cache_flow(flow, cache_version=1)
    assert flow.as_dict() == once  # never nested
    cache_flow(flow, mode="read_only")
    for j in all_jobs(flow):
        assert j.function.options == {"cache_version": "1", "mode": "read_only"}
        assert not isinstance(j.function.function, CachedFunction)
    with pytest.raises(TypeError, match="unknown options"):
        cache_flow(flow, cache_verison=2)
    with pytest.raises(ValueError, match="mode"):
        cache_flow(flow, mode="sometimes")


def test_filters_choose_the_jobs() -> None:
    flow = cache_flow(jobs.issue_873_flow(), class_filter=jobs.RelaxMaker)
    marked = {j.name for j in all_jobs(flow) if isinstance(j.function, CachedFunction)}
    assert marked == {"relax1", "relax2", "static"}
    flow = cache_flow(jobs.issue_873_flow(), name_filter="relax")
    marked = {j.name for j in all_jobs(flow) if isinstance(j.function, CachedFunction)}
    assert marked == {"relax1", "relax2"}


def test_jobflow_function_filters_still_see_the_function() -> None:
    flow = cache_flow(jobs.issue_873_flow())
    flow.update_metadata({"tag": "x"}, function_filter=jobs.add)
    tagged = {j.name for j in all_jobs(flow) if j.metadata.get("tag") == "x"}
    assert tagged == {"dos"}


# -- served under jobflow's own run_locally, in fresh processes -------------------------------
@pytest.mark.slow  # fresh processes
def test_jobflow_run_locally_records_then_serves_a_fresh_flow(counts: Counts) -> None:
    plain = run_fresh(mark=False)  # plain jobflow, no cache at all
    plain_runs = counts.total()
    counts.reset()
    first = run_fresh(mark=True)
    assert counts.total() == plain_runs  # run 1 computes every job once
    counts.reset()
    second = run_fresh(mark=True)
    assert counts() == {}, f"jobs executed on the warm run: {counts()}"
    assert without_outcomes(first) == without_outcomes(plain)
    assert without_outcomes(second) == without_outcomes(plain)
    served = {o for v in second["_outcomes"].values() for o in v}
    assert served <= {"hit", "None"}  # store_inputs (jobflow's book-keeping) keeps no outcome


@pytest.mark.slow  # fresh processes
def test_entries_are_shared_with_our_run_locally_both_ways(counts: Counts, tmp_path: Path) -> None:
    """The same digests and entries as run_locally makes for the unmarked jobs."""
    ours = run_fresh(mark=False, runner="jobflow_cache")
    computed = counts.total()
    counts.reset()
    theirs = run_fresh(mark=True, runner="jobflow")
    assert counts() == {}, f"a marked flow under jobflow missed run_locally's entries: {counts()}"
    assert without_outcomes(theirs) == without_outcomes(ours)

    # and the other way round, in a fresh cache
    import os

    os.environ["JOBFLOW_CACHE_DIR"] = str(tmp_path / "second-cache")
    try:
        counts.reset()
        run_fresh(mark=True, runner="jobflow")
        assert counts.total() == computed
        counts.reset()
        ours_again = run_fresh(mark=False, runner="jobflow_cache")
        assert counts() == {}, f"run_locally missed the marked flow's entries: {counts()}"
        assert without_outcomes(ours_again) == without_outcomes(ours)
    finally:
        os.environ["JOBFLOW_CACHE_DIR"] = str(tmp_path / "jfc-cache")


def test_dynamic_children_inherit_the_mark_on_misses_and_hits(
    counts: Counts, job_store: JobStore
) -> None:
    flow = cache_flow(Flow([jobs.make_replace(3)]), cache_version="v")
    responses = jobflow_run_locally(flow, store=job_store, ensure_success=True)
    assert counts() == {"make_replace": 1, "add": 3}
    # the children were marked with the parent's options (they recorded entries: see below)
    counts.reset()
    flow = cache_flow(Flow([jobs.make_replace(3)]), cache_version="v")
    again = jobflow_run_locally(flow, store=job_store, ensure_success=True)
    assert counts() == {}, counts()
    outputs = sorted(str(r[1].output) for r in responses.values() if 1 in r)
    assert sorted(str(r[1].output) for r in again.values() if 1 in r) == outputs


def test_children_marked_with_the_parents_options(job_store: JobStore) -> None:
    seen: list[Any] = []

    flow = cache_flow(Flow([jobs.make_addition(2)]), files="none", cache_version=7)
    job_ = flow.jobs[0]
    responses = jobflow_run_locally(flow, store=job_store, ensure_success=True)
    response = responses[job_.uuid][1]
    for new in response.addition.jobs:
        seen.append(new.function)
    assert seen
    assert all(isinstance(f, CachedFunction) for f in seen)
    assert all(f.options == {"files": "none", "cache_version": "7"} for f in seen)


@pytest.mark.slow  # fresh processes
def test_a_replay_holding_marked_jobs_is_served(counts: Counts) -> None:
    """A dynamic job whose new jobs are already marked: its entry holds the mark, which the
    trust check accepts when it is served in a fresh process."""
    program = (
        "from jobflow import Flow, run_locally\n"
        "from jobflow_cache import cache_flow\n"
        "from tests.execution.test_cache_flow import replace_with_marked\n"
        "r = run_locally(cache_flow(Flow([replace_with_marked(2)])), ensure_success=True)\n"
        "print(sorted(str(v[1].output) for v in r.values() if 1 in v))\n"
    )
    first = run_python(program).strip().splitlines()[-1]
    assert counts() == {"replace_with_marked": 1, "add": 2}
    counts.reset()
    second = run_python(program).strip().splitlines()[-1]
    assert counts() == {}
    assert first == second


@pytest.mark.slow  # fresh processes
def test_disabled_runs_plain_and_creates_no_store(
    counts: Counts, isolated_cache: Path, tmp_path: Path
) -> None:
    plain = run_fresh(mark=False)
    runs = counts.total()
    counts.reset()
    import os

    os.environ["JOBFLOW_CACHE_DISABLE"] = "1"
    try:
        marked = run_fresh(mark=True)
    finally:
        del os.environ["JOBFLOW_CACHE_DISABLE"]
    assert counts.total() == runs
    assert not isolated_cache.exists()  # nothing opened, nothing created
    assert without_outcomes(marked) == without_outcomes(plain)
    assert {o for v in marked["_outcomes"].values() for o in v} == {"None"}  # no metadata


def test_our_run_locally_uses_the_marks_options(counts: Counts, job_store: JobStore) -> None:
    """No double interception: the mark's options (here cache_version) are the ones used."""
    flow = cache_flow(Flow([jobs.add(1, 2)]), cache_version="mark-1")
    jfc_run_locally(flow, store=job_store, ensure_success=True, log=False)
    assert counts() == {"add": 1}
    doc = job_store.query_one({"uuid": flow.jobs[0].uuid})
    assert doc["metadata"]["jobflow_cache"]["outcome"] == "miss"
    counts.reset()
    # an unmarked job (no cache_version) has another digest: it runs
    jfc_run_locally(Flow([jobs.add(1, 2)]), store=job_store, ensure_success=True, log=False)
    assert counts() == {"add": 1}
    counts.reset()
    flow = cache_flow(Flow([jobs.add(1, 2)]), cache_version="mark-1")
    jfc_run_locally(flow, store=job_store, ensure_success=True, log=False)
    assert counts() == {}
    # cache=False: the plain function, no metadata
    flow = cache_flow(Flow([jobs.add(1, 2)]), cache_version="mark-1")
    jfc_run_locally(flow, store=job_store, ensure_success=True, log=False, cache=False)
    assert counts() == {"add": 1}
    assert "jobflow_cache" not in (
        job_store.query_one({"uuid": flow.jobs[0].uuid})["metadata"] or {}
    )


def test_cached_job_functions_keep_their_options(counts: Counts, job_store: JobStore) -> None:
    """``@cached_job`` functions marked too: their decorator's options stay the base."""
    flow = cache_flow(Flow([jobs.cached_scale(2, verbose=True)]))
    jobflow_run_locally(flow, store=job_store, ensure_success=True)
    assert counts() == {"cached_scale": 1}
    counts.reset()
    # unmarked, verbose differs (ignored by the decorator): the same entry is served
    jobflow_run_locally(Flow([jobs.cached_scale(2)]), store=job_store, ensure_success=True)
    assert counts() == {}


# -- a real atomate2 flow (EMT) under jobflow's own run_locally --------------------------------
A2_PROGRAM = """
import json
from jobflow import JobStore, run_locally
from maggma.stores import MemoryStore
from jobflow_cache import cache_flow
from tests.integration import a2_flows
scenario = a2_flows.SCENARIOS["elastic"]
flow = scenario.build()
if {mark!r}:
    cache_flow(flow)
store = JobStore(MemoryStore(), additional_stores={{"data": MemoryStore()}})
store.connect()
run_locally(flow, store=store, create_folders=True, root_dir={root!r}, ensure_success=True)
print(json.dumps(a2_flows.describe(store, scenario)))
"""


@pytest.mark.atomate2
@pytest.mark.slow
def test_atomate2_elastic_flow_marked_is_served_under_jobflow(tmp_path: Path) -> None:
    """atomate2's ElasticMaker (plain @job Maker jobs, a dynamic fan-out of relaxations) under
    jobflow's run_locally: run 1 computes, a fresh flow in a fresh process is served entirely,
    and both give plain jobflow's elastic tensor and files."""
    pytest.importorskip("atomate2")
    pytest.importorskip("ase")

    def run(mark: bool, name: str) -> dict[str, Any]:
        root = tmp_path / name
        code = A2_PROGRAM.format(mark=mark, root=str(root))
        return json.loads(run_python(code, cwd=tmp_path).strip().splitlines()[-1])

    plain = run(False, "plain")
    first = run(True, "first")
    second = run(True, "second")

    def outcomes(doc: dict[str, Any]) -> list[str | None]:
        return [j["outcome"] for j in doc["jobs"] if j["name"] != "store_inputs"]

    assert len(outcomes(plain)) == 10  # relax, deformations, 6 relaxations, 2 more
    assert set(outcomes(plain)) == {None}  # no cache at all
    assert set(outcomes(first)) == {"miss"}
    assert set(outcomes(second)) == {"hit"}, outcomes(second)  # nothing executed
    assert len(outcomes(second)) == len(outcomes(plain))
    for got in (first["result"], second["result"]):
        assert got is not None
        assert got["tensor"] == plain["result"]["tensor"]  # EMT is deterministic: exact
    # every EMT job's file is in its own folder of the served run, as jobflow wrote it
    texts = {j["name"]: j["text"] for j in plain["jobs"] if j["text"]}
    assert texts
    assert {j["name"]: j["text"] for j in second["jobs"] if j["text"]} == texts
    # the served outputs name the second run's own folders
    assert all(str(tmp_path / "second") in j["dir_name"] for j in second["jobs"] if j["dir_name"])


def test_update_maker_kwargs_drops_the_mark_so_cache_flow_comes_last() -> None:
    """jobflow's update_maker_kwargs (and atomate2's powerups built on it) replace a job's
    function with the Maker's method: the documented rule is to call cache_flow last."""
    flow = cache_flow(jobs.issue_873_flow())
    flow.update_maker_kwargs({"steps": 3}, class_filter=jobs.RelaxMaker)
    relax = [j for j in all_jobs(flow) if j.maker is not None]
    assert all(j.maker.steps == 3 for j in relax)
    assert not any(isinstance(j.function, CachedFunction) for j in relax)
    cache_flow(flow)
    assert all(isinstance(j.function, CachedFunction) for j in all_jobs(flow))
    assert all(j.maker.steps == 3 for j in relax)


def test_new_jobs_returned_as_a_list_inherit_and_plain_lists_stay_outputs(
    counts: Counts, job_store: JobStore
) -> None:
    def flow() -> Flow:
        return cache_flow(Flow([return_job_list(3), return_numbers(10_000)]))

    first = flow()
    responses = jobflow_run_locally(first, store=job_store, ensure_success=True)
    assert counts() == {"return_job_list": 1, "add": 3, "return_numbers": 1}
    replaced = responses[first.jobs[0].uuid][1].replace
    added = [j for j in replaced.jobs if j.name != "store_inputs"]  # jobflow's, added after
    assert [j.name for j in added] == ["add"] * 3
    assert all(isinstance(j.function, CachedFunction) for j in added)
    assert responses[first.jobs[1].uuid][1].output == list(range(10_000))
    counts.reset()
    again = jobflow_run_locally(flow(), store=job_store, ensure_success=True)
    assert counts() == {}
    assert sorted(r[1].output for r in again.values() if isinstance(r[1].output, int)) == [
        7,
        8,
        9,
    ]
