"""``cachetool plan FLOW``: the plan of a serialized flow, as a table and as JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from jobflow import Flow, JobStore
from monty.serialization import dumpfn

from jobflow_cache import plan, run_locally
from jobflow_cache.cli import cli
from tests.support import jobs
from tests.support.paths import pythonpath


def console_script() -> str:
    exe = shutil.which("cachetool") or os.path.join(os.path.dirname(sys.executable), "cachetool")
    if not os.path.exists(exe):
        pytest.skip("the cachetool console script is not installed in this environment")
    return exe


@pytest.fixture
def planned(isolated_cache: Path, tmp_path: Path, counts: Any) -> Any:
    """A cache holding add(1, 2) -> mul(., 3), a JobStore (a JSON file) holding that run, and a
    rebuilt flow whose first job is served, second runs (new factor), third waits."""
    docs = {"type": "JSONStore", "paths": str(tmp_path / "jobs.json"), "read_only": False}
    spec = {"docs_store": {**docs, "collection_name": "outputs", "key": "uuid"}}
    job_store = JobStore.from_dict_spec(spec)
    first = jobs.add(1, 2)
    run_locally(Flow([first, jobs.mul(first.output, 3)]), store=job_store, log=False)
    a = jobs.add(1, 2)
    b = jobs.mul(a.output, 5)
    flow = Flow([a, b, jobs.add(b.output, 1)])
    path = tmp_path / "flow.json"
    dumpfn(flow, path)
    counts.reset()
    return flow, path, json.dumps(spec), first


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result


def test_plan_json_agrees_with_the_python_plan(planned: Any, counts: Any) -> None:
    flow, path, _, _ = planned
    data = json.loads(invoke("plan", str(path), "--json").stdout)
    rows = data["jobs"]
    assert [r["uuid"] for r in rows] == [j.uuid for j, _ in flow.iterflow()]
    assert [r["status"] for r in rows] == ["served", "run", "unknown"]
    assert data["counts"] == {"served": 1, "run": 1, "unknown": 1}
    in_process = plan(flow)
    assert [r["digest"] for r in rows] == [j.digest for j in in_process]
    assert rows[1]["reason"] == "not in the cache"
    assert rows[2]["reason"] == "waits for mul (run)"
    assert counts.total() == 0  # nothing ran


def test_plan_table(planned: Any) -> None:
    flow, path, _, _ = planned
    out = invoke("plan", str(path)).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["status", "name", "digest", "reason", "uuid"]
    served = next(line for line in lines if line.startswith("served"))
    assert flow.jobs[0].uuid in served
    assert "served from the cache" in served
    assert plan(flow).jobs[0].digest[:12] in served  # type: ignore[index]
    assert lines[-1] == "3 jobs: 1 served ahead, 1 to run, 1 unknown until something runs"


def test_plan_with_a_jobstore(planned: Any) -> None:
    _, _, spec, first = planned
    child = jobs.mul(first.output, 3)  # its upstream job is in the JobStore
    path = Path(planned[1]).with_name("child.json")
    dumpfn(Flow([child]), path)
    with_store = json.loads(invoke("plan", str(path), "--jobstore", spec, "--json").stdout)
    assert [r["status"] for r in with_store["jobs"]] == ["served"]
    without = json.loads(invoke("plan", str(path), "--json").stdout)
    assert [r["status"] for r in without["jobs"]] == ["unknown"]
    assert "not in the JobStore" in without["jobs"][0]["reason"]


def test_plan_of_a_file_without_a_flow_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "not-a-flow.json"
    path.write_text(json.dumps({"a": 1}))
    result = CliRunner().invoke(cli, ["plan", str(path)])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {path} holds a dict, not a serialized Flow or Job"


def test_installed_script(planned: Any) -> None:
    flow, path, _, _ = planned
    proc = subprocess.run(
        [console_script(), "plan", str(path), "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": pythonpath()},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [r["status"] for r in data["jobs"]] == ["served", "run", "unknown"]
    assert data["jobs"][0]["digest"] == plan(flow).jobs[0].digest


def test_plan_on_a_fresh_machine_says_so(tmp_path: Path, counts: Any) -> None:
    path = tmp_path / "flow.json"
    a = jobs.add(1, 2)
    dumpfn(Flow([a, jobs.mul(a.output, 2)]), path)
    result = CliRunner().invoke(cli, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert "No cache at" in result.stderr
    assert [r["status"] for r in json.loads(result.stdout)["jobs"]] == ["run", "unknown"]
    assert not (tmp_path / "jfc-cache" / "cache.sqlite").exists()  # nothing was created


def test_plan_for_jobflow_remote_hands_inputs_as_its_worker_gets_them(
    isolated_cache: Path, tmp_path: Path
) -> None:
    """Recorded where references are resolved on the worker (our run_locally: a pydantic
    output's tuple field stays a tuple), the job reading that field is served ahead for
    jobflow's and FireWorks' workers, and left to run for jobflow-remote's, whose runner
    sends it the value as a list (another digest: a miss on that worker, never a wrong hit)."""
    pytest.importorskip("jobflow_remote")
    from tests.managers import jr_jobs

    first = jr_jobs.cell_chain()
    run_locally(first, log=False)
    path = tmp_path / "cells.json"
    dumpfn(jr_jobs.cell_chain(), path)
    statuses = {}
    for manager in ("local", "fireworks", "jobflow-remote"):
        rows = json.loads(invoke("plan", str(path), "--manager", manager, "--json").stdout)
        statuses[manager] = [r["status"] for r in rows["jobs"]]
    assert statuses == {
        "local": ["served", "served"],
        "fireworks": ["served", "served"],
        "jobflow-remote": ["served", "run"],
    }
    wrong = CliRunner().invoke(cli, ["plan", str(path), "--manager", "slurm"])
    assert wrong.exit_code == 2
    assert "'slurm' is not one of" in wrong.output
    with pytest.raises(ValueError, match="manager must be one of"):
        plan(jr_jobs.cell_chain(), manager="slurm")
