"""atomate2 flows marked with ``cache_flow`` under real FireWorks (issue 13).

The LaunchPad is FireWorks' own mongomock persisted in a file (``fireworks[mongomock]``: no
MongoDB server can run here), so every test is marked ``substitute``. Everything else is real:
flows are built by atomate2's ``ElasticMaker`` / ``PhononMaker`` with ASE's EMT calculator in a
fresh process each time (all-new uuids), converted by jobflow's ``flow_to_workflow``, added to the
LaunchPad in that process, and run by FireWorks' ``rlaunch rapidfire`` / ``rlaunch singleshot``
in later processes, each rocket in a launcher folder of its own, writing to a JobStore of maggma
``JSONStore`` files (:mod:`tests.managers.fw_site`).

Executions are counted in the rocket processes by watching the job functions themselves
(:func:`tests.managers.scenarios.count_executions`), not by asking the cache. Outputs are
compared document by document with this run's uuids and folders named by job
(:func:`tests.managers.scenarios.normalized_outputs`): against plain FireWorks (no
``cache_flow``) where a job computed, exactly (wall-clock fields included) against the run that
recorded an entry where a job was served.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING, Any

import pytest

from tests.managers import scenarios
from tests.managers.scenarios import assert_same_outputs as same

if TYPE_CHECKING:
    from tests.conftest import Counts
    from tests.managers.fw_site import FireWorksSite

for _module in ("atomate2", "ase", "phonopy", "seekpath"):
    pytest.importorskip(_module)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.atomate2,
    pytest.mark.substitute,  # the LaunchPad is mongomock persisted in a file (no MongoDB here)
]

#: jobflow's helper job gathering a replaced flow's outputs: the cache lets it run (book-keeping),
#: and the execution count leaves it out (scenarios.job_codes).
GATHER = "store_inputs"


def once(names: set[str] | list[str]) -> Counter[str]:
    return Counter(name for name in names if name != GATHER)


def computed(site: FireWorksSite, name: str) -> dict[str, str]:
    """Outputs of run ``name`` without wall-clock fields (to compare two computed runs)."""
    return site.outputs(name, clock=False)


def final_output(site: FireWorksSite, name: str, job: str) -> dict[str, Any]:
    """The stored output of the job called ``job`` in run ``name``."""
    [doc] = [doc for doc in site.docs(name) if doc["name"] == job]
    output: dict[str, Any] = doc["output"]
    return output


def assert_same_files(
    site: FireWorksSite, name: str, ref: str, jobs: set[str] | None = None
) -> None:
    """The jobs of run ``name`` left the files of run ``ref``'s same jobs in their folders."""
    got, want = site.files(name), site.files(ref)
    jobs = set(want) if jobs is None else jobs
    assert set(got) == jobs, "jobs whose output names a folder"
    for job in jobs:
        assert got[job], f"{job}: no file in its folder"
        assert got[job] == want[job], f"{job}: files differ from run {ref!r}"


@pytest.mark.parametrize(
    ("kind", "fix"),
    [
        pytest.param("phonon", "worker", id="phonon-fix-served-on-worker"),
        pytest.param("elastic", "ahead", id="elastic-fix-served-ahead"),
    ],
)
def test_fail_fix_rebuild_then_served_whole(
    kind: str, fix: str, fw_site: FireWorksSite, counts: Counts
) -> None:
    """The #873 story under FireWorks, then a fully cached rebuilt flow twice.

    plain:  the flow without ``cache_flow``: the reference (every job computes once).
    fail:   marked; one EMT job of the dynamic sub-flow raises: its firework fizzles, the final
            job does not complete; the others compute (as in plain) and are recorded, the
            sub-flow's jobs too (they inherit the mark on the worker).
    fix:    a fresh flow in a fresh process, nothing failing: only the failed job and the final
            job run. ``worker``: rapidfire serves the rest in the rockets. ``ahead``:
            ``plan(flow).apply(store)`` serves the jobs before the dynamic one into the JobStore
            first; the dynamic job (its replay is not all cached) and the final job are
            submitted, and the rockets serve the replay but the failed job.
    again:  a fresh flow, rapidfire: every firework completes, no job function runs, every
            output equals the recorded one.
    ahead:  a fresh flow, ``plan().apply()``: nothing left to submit, ``rlaunch singleshot``
            finds no firework, and the JobStore holds every job's output as in ``again``.
    half:   a fresh flow plus one new job reading its result: ``plan().apply()`` serves the
            whole flow (its dynamic job too: the replay is all cached), only the new job is
            submitted, and one ``rlaunch singleshot`` runs it with its input resolved from the
            JobStore.
    """
    spec = scenarios.KINDS[kind]
    site = fw_site

    # plain FireWorks, no cache: the reference
    site.submit("plain", kind, plain=True)
    site.rapidfire("plain")
    jobs = set(site.outcomes("plain"))  # every job, one document and one firework each
    assert {spec.dynamic, spec.final, spec.failing, *spec.children, GATHER} <= jobs
    assert set(site.states("plain")) == jobs
    assert set(site.states("plain").values()) == {"COMPLETED"}
    assert counts() == once(jobs)
    assert set(site.outcomes("plain").values()) == {None}, "plain jobs are not cached"
    reference = computed(site, "plain")
    counts.reset()

    # run 1: cached, one job of the dynamic sub-flow fails
    site.submit("fail", kind)
    site.rapidfire("fail", fail=spec.failing)
    states = site.states("fail")
    assert states[spec.failing] == "FIZZLED"
    assert states[spec.final] != "COMPLETED"  # waiting, or fizzled on its missing input
    completed = {job for job, state in states.items() if state == "COMPLETED"}
    assert completed >= jobs - {spec.failing, spec.final, GATHER}
    stored = set(site.outcomes("fail"))
    assert stored == completed
    ran = completed | {spec.failing}  # the failed job did run (and raise)
    if spec.final_starts_after_failure:
        ran.add(spec.final)
    assert counts() == once(ran)
    assert set(site.outcomes("fail").values()) == {"miss"}, "every job recorded, children too"
    outputs = computed(site, "fail")
    same(outputs, {job: reference[job] for job in stored}, "recorded run vs plain")
    assert_same_files(site, "fail", "plain", jobs=set(site.files("plain")) & stored)
    counts.reset()

    # run 2: the user fixed it and builds a fresh flow
    run = site.submit("fix", kind, ahead=fix == "ahead")
    if fix == "ahead":
        assert sorted(run.remaining) == sorted([spec.dynamic, spec.final])
    else:
        assert sorted(run.remaining) == sorted(run.built)
    site.rapidfire("fix")
    assert set(site.states("fix").values()) == {"COMPLETED"}
    assert counts() == once([spec.failing, spec.final]), "only the failed job and the rest run"
    outcomes = site.outcomes("fix")
    assert set(outcomes) == jobs
    expected = {job: "hit" for job in jobs - {GATHER}} | {spec.failing: "miss", spec.final: "miss"}
    assert {job: o for job, o in outcomes.items() if job != GATHER} == expected
    same(computed(site, "fix"), reference, "fixed run vs plain")
    assert_same_files(site, "fix", "plain")
    assert run.cache_warnings == 0
    counts.reset()

    # run 3: a fresh flow, everything served in the rockets
    run = site.submit("again", kind)
    launch = site.rapidfire("again")
    assert set(site.states("again")) == jobs
    assert launch.launched == len(jobs), "one rocket per firework"
    assert set(site.states("again").values()) == {"COMPLETED"}
    assert counts() == Counter(), "no job function runs"
    assert {o for job, o in site.outcomes("again").items() if job != GATHER} == {"hit"}
    same(site.outputs("again"), site.outputs("fix"), "served on the worker vs recorded")
    assert_same_files(site, "again", "fix")
    assert run.cache_warnings == 0

    # run 4: a fresh flow served ahead of submission: the rockets have nothing to run
    run = site.submit("ahead", kind, ahead=True)
    assert run.remaining == []
    assert run.fw_ids == [], "nothing submitted"
    [launch] = site.singleshots("ahead")
    assert launch.launched == 0
    assert counts() == Counter()
    assert set(site.outcomes("ahead")) == jobs
    assert {o for job, o in site.outcomes("ahead").items() if job != GATHER} == {"hit"}
    same(site.outputs("ahead"), site.outputs("fix"), "served ahead vs recorded")
    assert_same_files(site, "ahead", "fix")
    assert run.cache_warnings == 0

    # run 5: half-cached: a fresh flow and one new job reading its result through the JobStore
    run = site.submit("half", kind + scenarios.SUMMARY, ahead=True)
    assert run.remaining == ["summary"]
    assert sorted(run.built) == sorted([*site.runs["plain"].built, "summary"])
    launches = site.singleshots("half")
    assert [launch.launched for launch in launches] == [1, 0]
    assert counts() == Counter(summary=1)
    assert site.states("half") == {"summary": "COMPLETED"}
    outputs = site.outputs("half")
    assert outputs.pop("summary") == json.dumps(
        scenarios.expected_summary(kind, final_output(site, "fix", spec.final))
    )
    same(outputs, site.outputs("fix"), "served ahead vs recorded")
    assert_same_files(site, "half", "fix")
    assert site.outcomes("half")["summary"] == "miss"
    assert run.cache_warnings == 0


def test_planned_for_fireworks_a_rocket_s_inputs_are_served_ahead(
    fw_site: FireWorksSite, counts: Counts
) -> None:
    """A rocket gets a job's own arguments through its Firework: a tuple argument arrives as a
    list, so its digest is not the one of the job in memory (our run_locally). Recorded by
    rockets, a rebuilt flow planned for FireWorks (as ``fw_worker`` does) is served ahead
    whole; planned for run_locally, the job given a tuple is left to run (a miss, never a
    wrong hit), and so is the job after it."""
    from jobflow_cache import plan

    site = fw_site
    site.submit("first", "tuples")
    site.rapidfire("first")
    assert set(site.states("first").values()) == {"COMPLETED"}
    assert counts() == Counter(scale_pair=1, pair_total=1)
    assert set(site.outcomes("first").values()) == {"miss"}
    counts.reset()

    as_local = {j.name: j.status for j in plan(scenarios.build("tuples"))}
    assert as_local == {"scale_pair": "run", "pair_total": "unknown"}
    as_rocket = {j.name: j.status for j in plan(scenarios.build("tuples"), manager="fireworks")}
    assert as_rocket == {"scale_pair": "served", "pair_total": "served"}

    run = site.submit("ahead", "tuples", ahead=True)
    assert run.remaining == []
    assert run.fw_ids == [], "nothing submitted"
    assert counts() == Counter()
    assert set(site.outcomes("ahead").values()) == {"hit"}
    same(site.outputs("ahead"), site.outputs("first"), "served ahead vs recorded")
    assert run.cache_warnings == 0
