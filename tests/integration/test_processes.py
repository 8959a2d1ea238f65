"""Several real processes on one embedded cache; jobs defined in scripts (``__main__``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from jobflow_cache import CacheStore
from tests.conftest import pythonpath, run_python

FLOW = """
import json, sys
from jobflow import Flow, JobStore
from maggma.stores import MemoryStore
from jobflow_cache import run_locally
from tests.support import jobs

a = jobs.add(1, 2)
b = jobs.mul(a.output, 10)
w = jobs.write_files("shared", size=5)
flow = Flow([a, b, jobs.add(b.output, a.output), w])
store = JobStore(MemoryStore())
run_locally(flow, store=store, log=False, ensure_success=True, create_folders=True,
            root_dir=sys.argv[1])
print(json.dumps(sorted(str(store.get_output(j.uuid)) for j in flow if j.name != "write_files")))
"""


def test_eight_processes_share_one_embedded_cache(counts, tmp_path):
    """8 processes run the same flow at once: all succeed with the right outputs, the cache
    holds exactly one sound entry per digest, and a later run executes nothing."""
    env = {**os.environ, "PYTHONPATH": pythonpath()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FLOW, str(tmp_path / f"r{i}")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(8)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert json.loads(out) == ["3", "30", "33"]
    executed = counts.total()
    assert 4 <= executed <= 8 * 4, "every job ran at least once, at most once per process"

    with CacheStore.from_settings() as store:
        entries = list(store.entries())
        assert len(entries) == 4, "one entry per digest, never a duplicate"
        assert all(store.check_entry(e).outcome.value == "hit" for e in entries)

    counts.reset()
    assert json.loads(run_python(FLOW.replace("sys.argv[1]", repr(str(tmp_path / "late"))))) == [
        "3",
        "30",
        "33",
    ]
    assert counts.total() == 0, "the cache is complete and sound after the concurrent runs"
    late = next((tmp_path / "late").glob("*/result.txt"))
    assert late.read_text() == "shared\n" * 5


SCRIPT = """
import json
from jobflow import job, JobStore
from maggma.stores import MemoryStore
from jobflow_cache import run_locally

@job
def compute(x):
    return x BODY

j = compute(10)
store = JobStore(MemoryStore())
run_locally(j, store=store, log=False)
doc = store.query_one({"uuid": j.uuid})
print(json.dumps([doc["output"], doc["metadata"]["jobflow_cache"]["outcome"]]))
"""


def test_script_functions_are_told_apart_by_their_source(tmp_path: Path):
    """Two scripts with a job named ``compute`` (``__main__:compute``) never share results."""

    def run(body: str) -> list:
        path = tmp_path / "script.py"
        path.write_text(SCRIPT.replace("BODY", body))
        return json.loads(run_python(path.read_text(), cwd=tmp_path))

    assert run("+ 1") == [11, "miss"]
    assert run("+ 1") == [11, "hit"]
    assert run("* 2") == [20, "miss"], "another function body is another function"
    assert run("* 2") == [20, "hit"]
    assert run("+ 2") == [12, "miss"], "a constant changed (python -c has no source file)"
    assert run("+ (lambda: 3)()") == [13, "miss"]
    assert run("+ (lambda: 4)()") == [14, "miss"], "constants of nested code count too"
