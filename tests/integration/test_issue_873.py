"""Acceptance 1: the jobflow issue #873 story, in fresh processes.

A flow made with Makers (DoubleRelax -> static -> dos + band) whose second relaxation fails on
the first run. The user fixes the cause and rebuilds the flow from scratch (fresh ``make()``, all
new uuids) in a new process: only the failed job and its descendants execute, the outputs equal a
clean run, and the cached job's new folder holds hard links to the files it wrote the first time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_python

SCRIPT = """
import json, sys
from jobflow import JobStore, run_locally as jobflow_run_locally
from maggma.stores import MemoryStore
from jobflow_cache import run_locally
from tests.support.jobs import issue_873_flow

mode, root = sys.argv[1], sys.argv[2]
flow = issue_873_flow(1.5)
store = JobStore(MemoryStore())
runner = jobflow_run_locally if mode == "plain" else run_locally
runner(flow, store=store, log=False, create_folders=True, root_dir=root)
result = {}
for doc in store.query({}):
    meta = doc["metadata"].get("jobflow_cache", {})
    result[doc["name"]] = {"output": doc["output"], "outcome": meta.get("outcome")}
print(json.dumps(result))
"""


def run(mode: str, root: Path, fail: str = "") -> dict:
    code = SCRIPT.replace("sys.argv[1], sys.argv[2]", f"{mode!r}, {str(root)!r}")
    return json.loads(run_python(code, env={"JFC_FAIL": fail}, cwd=root.parent))


def strip_dirs(result: dict) -> dict:
    """Outputs without the run-folder paths, which differ between any two runs."""
    return {
        name: {k: v for k, v in r["output"].items() if k != "dir_name"}
        if isinstance(r["output"], dict)
        else r["output"]
        for name, r in result.items()
    }


@pytest.mark.slow
def test_issue_873_resume_after_failure(counts, tmp_path):
    for folder in ("clean", "run1", "run2"):
        (tmp_path / folder).mkdir()
    clean = run("plain", tmp_path / "clean")
    assert sorted(clean) == ["band", "dos", "relax1", "relax2", "static"]
    counts.reset()

    first = run("cached", tmp_path / "run1", fail="relax2")
    assert counts() == {"relax1": 1, "relax2": 1}, "relax2 fails, its descendants never start"
    assert sorted(first) == ["relax1"]
    assert first["relax1"]["outcome"] == "miss"

    second = run("cached", tmp_path / "run2")
    assert counts() == {"relax1": 1, "relax2": 2, "static": 1, "add": 1, "mul": 1}, (
        "only the failed job and its descendants may execute on the rerun"
    )
    assert {n: r["outcome"] for n, r in second.items()} == {
        "relax1": "hit",
        "relax2": "miss",
        "static": "miss",
        "dos": "miss",
        "band": "miss",
    }
    assert strip_dirs(second) == strip_dirs(clean), "outputs equal a clean uncached run"

    old_dir = Path(first["relax1"]["output"]["dir_name"])
    new_dir = Path(second["relax1"]["output"]["dir_name"])
    assert old_dir.parent == tmp_path / "run1"
    assert new_dir.parent == tmp_path / "run2", "the served output points at the new folder"
    old, new = old_dir / "OUTCAR", new_dir / "OUTCAR"
    assert new.read_text() == old.read_text() == "steps=10 value=1.5\n"
    # a copy of its own (issue 11): a later job writing it leaves the cache and run1 alone
    assert new.stat().st_ino != old.stat().st_ino
    assert new.stat().st_nlink == old.stat().st_nlink == 1

    counts.reset()
    third = run("cached", tmp_path / "run2")
    assert counts() == {}, "a third run of the whole flow executes nothing"
    assert {r["outcome"] for r in third.values()} == {"hit"}
    assert strip_dirs(third) == strip_dirs(clean)
