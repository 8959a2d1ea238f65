"""Real atomate2 workflows (ASE's EMT calculator) resume after a failure, in fresh processes.

The acceptance test of the issue: run 1 fails one job of an atomate2 ``ElasticMaker`` /
``PhononMaker`` flow (without editing atomate2); run 2 rebuilds the flow with a fresh ``make()``
in a new process (all-new uuids) and executes only the failed job and what depends on it; its
final result equals a clean, uncached jobflow run; cached jobs get their run-folder files back.

Every run happens in a fresh process (``tests/integration/a2_flows.py:main``) sharing the
``JOBFLOW_CACHE_DIR`` of the autouse ``isolated_cache`` fixture.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import run_python
from tests.integration.a2_flows import ATOMS_FILE, SCENARIOS

for _module in ("atomate2", "ase", "phonopy", "seekpath"):
    pytest.importorskip(_module)

pytestmark = [pytest.mark.atomate2, pytest.mark.slow]

#: jobflow's helper job that gathers a replaced flow's outputs: book-keeping, not a calculation
#: (jobflow_cache runs it transparently; its stored metadata is the replaced job's), so the
#: outcome checks below leave it out.
GATHER = "store_inputs"


@pytest.fixture(autouse=True)
def default_file_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run folders are restored by hard links (the default), which the inode checks rely on."""
    monkeypatch.delenv("JOBFLOW_CACHE_FILES", raising=False)


def run(kind: str, runner: str, root: Path, fail: str | None = None) -> dict[str, Any]:
    """Run scenario ``kind`` in a fresh process; the JSON it prints (see ``a2_flows.main``)."""
    code = (
        "from tests.integration import a2_flows\n"
        f"a2_flows.main({kind!r}, {runner!r}, {str(root)!r}, fail={fail!r})\n"
    )
    stdout = run_python(code, cwd=root.parent)
    return json.loads(stdout.strip().splitlines()[-1])


def outcomes(run_doc: dict[str, Any]) -> dict[str, str | None]:
    """``{job name: cache outcome}`` of the stored jobs but ``GATHER`` (names are unique)."""
    names = Counter(job["name"] for job in run_doc["jobs"])
    assert max(names.values()) == 1, f"a job ran twice: {names}"
    return {job["name"]: job["outcome"] for job in run_doc["jobs"] if job["name"] != GATHER}


def by_name(run_doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {job["name"]: job for job in run_doc["jobs"]}


def assert_same_result(kind: str, got: dict[str, Any] | None, ref: dict[str, Any]) -> None:
    """The physics equals the clean run's *exactly* (EMT is deterministic, hits replay floats)."""
    assert got is not None, "the flow did not finish"
    key = "tensor" if kind == "elastic" else "free_energies"
    assert np.asarray(got[key]).shape == np.asarray(ref[key]).shape
    assert np.array_equal(np.asarray(got[key]), np.asarray(ref[key])), (
        f"{key} differs from the clean run; max abs diff "
        f"{np.max(np.abs(np.asarray(got[key]) - np.asarray(ref[key])))}"
    )


def assert_result_points_at_this_run(kind: str, run_doc: dict[str, Any], root: Path) -> None:
    """The final document records the uuids and folders of *this* run's jobs, not an old run's
    (served outputs have their uuids and run-folder paths rewritten)."""
    jobs = by_name(run_doc)
    referenced = [jobs[name] for name in SCENARIOS[kind].referenced]
    got = run_doc["result"]  # (the elastic fit repeats them for symmetry-equivalent strains)
    assert set(got["uuids"]) == {job["uuid"] for job in referenced}
    assert set(got["dirs"]) == {job["dir_name"] for job in referenced}
    assert {Path(d).parent for d in got["dirs"]} == {root}


def reference(kind: str, tmp_path: Path) -> dict[str, Any]:
    """The clean run: plain ``jobflow.run_locally``, no cache involved."""
    ref = run(kind, "jobflow", tmp_path / "reference")
    scenario = SCENARIOS[kind]
    assert set(outcomes(ref).values()) == {None}, "plain jobflow must not be touched"
    assert ref["result"] is not None
    names = set(outcomes(ref))
    assert set(scenario.emt_jobs) <= names
    assert scenario.final in names
    for name in scenario.emt_jobs:
        assert by_name(ref)[name]["files"] == [ATOMS_FILE]
    return ref


@pytest.mark.parametrize("kind", sorted(SCENARIOS))
def test_rerun_after_failure_executes_only_the_failed_job_and_its_descendants(kind, tmp_path):
    """The issue's acceptance test. Results are compared for exact equality: every served
    output replays the same floats and the re-executed EMT jobs are deterministic."""
    scenario = SCENARIOS[kind]
    ref = reference(kind, tmp_path)
    all_jobs = set(outcomes(ref))

    # run 1: one EMT job fails; nothing downstream of it can finish
    first = run(kind, "jobflow_cache", tmp_path / "run1", fail=scenario.failing)
    first_outcomes = outcomes(first)
    assert first["result"] is None, "the final job must not succeed in run 1"
    assert set(first_outcomes) == all_jobs - {scenario.failing, scenario.final}
    assert first_outcomes == dict.fromkeys(first_outcomes, "miss")

    # run 2: a fresh make() in a new process, no failure injected
    second = run(kind, "jobflow_cache", tmp_path / "run2")
    executed = sorted(name for name, outcome in outcomes(second).items() if outcome != "hit")
    assert executed == sorted([scenario.failing, scenario.final])
    expected = dict.fromkeys(all_jobs, "hit")
    expected.update({scenario.failing: "miss", scenario.final: "miss"})
    assert outcomes(second) == expected
    assert not {j["uuid"] for j in second["jobs"]} & {j["uuid"] for j in first["jobs"]}

    assert_same_result(kind, second["result"], ref["result"])
    assert_result_points_at_this_run(kind, second, tmp_path / "run2")

    # run folders: hits get copies of run 1's files (never run 1's own inodes: writing to a
    # served file must not change run 1's folder); the failed job wrote a fresh file
    jobs2, jobs_ref = by_name(second), by_name(ref)
    inodes1 = {j["inode"] for j in first["jobs"]}
    for name in scenario.emt_jobs:
        job = jobs2[name]
        assert Path(job["dir_name"]).parent == tmp_path / "run2", "dir_name not rewritten"
        assert job["files"] == [ATOMS_FILE]
        assert job["text"] == jobs_ref[name]["text"], f"{name}: file differs from the clean run"
        assert job["inode"] not in inodes1, f"{name}: shares an inode with run 1's folder"


@pytest.mark.parametrize("kind", sorted(SCENARIOS))
def test_warm_rerun_serves_every_job(kind, tmp_path):
    """A complete run, then a fresh make() in a new process: nothing executes, even the final
    job whose inputs carry upstream uuids and run-folder paths."""
    cold = run(kind, "jobflow_cache", tmp_path / "cold")
    cold_outcomes = outcomes(cold)
    assert cold_outcomes == dict.fromkeys(cold_outcomes, "miss")
    assert SCENARIOS[kind].final in cold_outcomes
    warm = run(kind, "jobflow_cache", tmp_path / "warm")
    assert outcomes(warm) == dict.fromkeys(cold_outcomes, "hit")
    assert_same_result(kind, warm["result"], cold["result"])
    assert_result_points_at_this_run(kind, warm, tmp_path / "warm")
