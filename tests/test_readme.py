"""The README's Python examples run as written (in a fresh process, on the embedded store)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import ROOT, run_python

BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)

REPORT = """
import json
from jobflow import SETTINGS
print(json.dumps([d["metadata"].get("jobflow_cache", {}).get("outcome")
                  for d in SETTINGS.JOB_STORE.query({}) if d["name"] != "store_inputs"]))
"""


def test_readme_has_the_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.atomate2
def test_readme_atomate2_example_serves_the_second_run(tmp_path):
    pytest.importorskip("atomate2")
    example = next(b for b in BLOCKS if "ElasticMaker" in b)
    printed = run_python(example + REPORT, cwd=tmp_path)  # ASE prints optimizer steps too
    outcomes = Counter(json.loads(printed.strip().splitlines()[-1]))
    assert outcomes["miss"] > 5, "the first run computes every job"
    assert outcomes == {"miss": outcomes["miss"], "hit": outcomes["miss"]}, (
        "the rebuilt flow is served entirely from the cache"
    )


def test_readme_decorator_example_defines_a_cached_job(tmp_path):
    example = next(b for b in BLOCKS if "@cached_job" in b)
    code = example.replace("...", "return {'steps': steps}") + (
        "\nprint(relax.cache_digest('Si', ncores=8).digest == relax.cache_digest('Si').digest)"
    )
    assert run_python(code, cwd=tmp_path).strip() == "True", "ncores is ignored by the digest"


@pytest.mark.slow
def test_readme_demo_reports_a_second_run_served_from_the_cache(tmp_path):
    """The set-up command's demo: run 2 executes nothing, and the report says so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLOW_CACHE_")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        env={**env, "TMPDIR": str(tmp_path)},  # the demo's cache and run folders
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = dict(re.findall(r"^(run \d)\s+(\d+\s+\d+\s+\d+)\s", proc.stdout, re.M))
    assert {run: counts.split() for run, counts in rows.items()} == {
        "run 1": ["9", "9", "0"],  # jobs, executed, served
        "run 2": ["9", "0", "9"],
    }
    assert "the same in both runs" in proc.stdout
    assert "7 OUTCAR files: 7 restored from the cache" in proc.stdout
    assert re.search(r"store +sqlite:///.*cache\.sqlite +\(9 entries\)", proc.stdout)
    cache_dirs = list(tmp_path.glob("jobflow-cache-demo-*/cache"))
    assert len(cache_dirs) == 1
    assert (cache_dirs[0] / "cache.sqlite").is_file(), "the embedded default store"
