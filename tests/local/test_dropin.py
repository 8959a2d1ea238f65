"""``@cached_job`` is a drop-in for ``@job``: lambdas, and functions and Maker classes defined
inside functions (notebooks, tests) are accepted at decoration, cached when what identifies
them can be hashed, and never share an entry with another function of the same name.

Every scenario runs as real scripts in fresh processes (``python script.py``) on one cache
folder, the way a notebook is re-run or a test session starts again: what a fresh process
hits is what the cache can really recognise, not what one process remembers. Each script
prints its jobs' cache outcomes and outputs; warnings are shown every time they are issued
(filter "always"), so a count of them is a count of emissions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# every scenario but the last starts fresh Python processes (2-4 s each)
slow = pytest.mark.slow

HEADER = """
import json, sys, warnings
warnings.simplefilter("always")
from jobflow import Flow, Maker
from jobflow_cache import cached_job, run_locally

def report(*jobs, manager="cache"):
    if manager == "jobflow":
        from jobflow import run_locally as jobflow_run_locally
        responses = jobflow_run_locally(Flow(list(jobs)), log=False, ensure_success=True)
    else:
        responses = run_locally(Flow(list(jobs)), log=False, ensure_success=True)
    rows = [
        {
            "name": j.name,
            "outcome": (j.metadata.get("jobflow_cache") or {}).get("outcome"),
            "output": responses[j.uuid][1].output,
        }
        for j in jobs
    ]
    print("RESULT " + json.dumps(rows))
"""


def run_script(tmp_path: Path, body: str, name: str = "script.py") -> tuple[list[dict], str]:
    """Run ``body`` (after HEADER) as a script in a fresh process on the cache in tmp_path."""
    script = tmp_path / name
    script.write_text(HEADER + textwrap.dedent(body))
    env = {**os.environ, "JOBFLOW_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("JOBFLOW_CACHE_DISABLE", None)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout + proc.stderr[-2000:]
    return json.loads(lines[0][len("RESULT ") :]), proc.stderr


def outcomes(rows: list[dict[str, Any]]) -> list[str]:
    return [row["outcome"] for row in rows]


def outputs(rows: list[dict[str, Any]]) -> list[Any]:
    return [row["output"] for row in rows]


CLOSURE = """
def build(k):
    @cached_job
    def add(a):
        return a + k
    return add

report(build(K)(1), build(K)(2))
"""


@slow
def test_local_function_hits_in_a_fresh_process_and_its_closure_counts(tmp_path: Path) -> None:
    """Same code, same captured value: a fresh process hits (no silent miss); another
    captured value is another function (no false hit); decoration never raises."""
    first, _ = run_script(tmp_path, CLOSURE.replace("K", "10"))
    assert outcomes(first) == ["miss", "miss"]
    assert outputs(first) == [11, 12]

    again, _ = run_script(tmp_path, CLOSURE.replace("K", "10"))
    assert outcomes(again) == ["hit", "hit"]
    assert outputs(again) == [11, 12]

    other, _ = run_script(tmp_path, CLOSURE.replace("K", "20"))
    assert outcomes(other) == ["miss", "miss"]
    assert outputs(other) == [21, 22]


SAME_NAME = """
def build(kind):
    if kind == "plus":
        @cached_job
        def f(a):
            return a + 1
    else:
        @cached_job
        def f(a):
            return a * 100
    return f

report(build("plus")(5), build("times")(5), build("plus")(6), build("times")(6))
"""


@slow
def test_two_local_functions_of_one_name_never_share_an_entry(tmp_path: Path) -> None:
    """``build.<locals>.f`` names two functions with different code, side by side in one
    process and in the next one: each is served its own results."""
    first, _ = run_script(tmp_path, SAME_NAME)
    assert outputs(first) == [6, 500, 7, 600]
    assert outcomes(first) == ["miss"] * 4

    again, _ = run_script(tmp_path, SAME_NAME)
    assert outputs(again) == [6, 500, 7, 600]
    assert outcomes(again) == ["hit"] * 4


EDITED = """
def build():
    def helper(a):
        return a + OFFSET

    @cached_job
    def f(a):
        return helper(a) * FACTOR
    return f

report(build()(3))
"""


@slow
def test_an_edit_of_a_local_function_or_a_local_helper_misses(tmp_path: Path) -> None:
    """An edit of the job's own code, or of a local helper it captures, makes a new function."""
    base, _ = run_script(tmp_path, EDITED.replace("OFFSET", "1").replace("FACTOR", "2"))
    assert (outcomes(base), outputs(base)) == (["miss"], [8])
    same, _ = run_script(tmp_path, EDITED.replace("OFFSET", "1").replace("FACTOR", "2"))
    assert (outcomes(same), outputs(same)) == (["hit"], [8])
    own, _ = run_script(tmp_path, EDITED.replace("OFFSET", "1").replace("FACTOR", "3"))
    assert (outcomes(own), outputs(own)) == (["miss"], [12])
    helper, _ = run_script(tmp_path, EDITED.replace("OFFSET", "2").replace("FACTOR", "2"))
    assert (outcomes(helper), outputs(helper)) == (["miss"], [10])


LAMBDAS = """
double, triple = cached_job(lambda x: x * 2), cached_job(lambda x: x * 3)  # one line

def make(n):
    return cached_job(lambda x: x + n)

report(double(5), triple(5), make(1)(5), make(2)(5))
"""


@slow
def test_lambdas_on_one_line_and_lambdas_with_closures(tmp_path: Path) -> None:
    """Two lambdas on one source line (one source text, two code objects) and lambdas that
    capture other values are four functions; a fresh process hits all four."""
    first, _ = run_script(tmp_path, LAMBDAS)
    assert outputs(first) == [10, 15, 6, 7]
    assert outcomes(first) == ["miss"] * 4
    again, _ = run_script(tmp_path, LAMBDAS)
    assert outputs(again) == [10, 15, 6, 7]
    assert outcomes(again) == ["hit"] * 4


MAKER = """
from dataclasses import dataclass

def build():
    @dataclass
    class ScaleMaker(Maker):
        name: str = "scale"
        factor: int = 2

        def helper(self, x):
            return x * self.factor + SHIFT

        @cached_job
        def make(self, x):
            return self.helper(x)

    return ScaleMaker

ScaleMaker = build()
report(ScaleMaker().make(5), ScaleMaker(factor=3).make(5), manager=MANAGER)
"""


@slow
@pytest.mark.parametrize("manager", ["cache", "jobflow"])
def test_local_maker_class(tmp_path: Path, manager: str) -> None:
    """A Maker class defined inside a function: its fields and its methods' code count (an edit
    of a helper method misses), a fresh process hits; under jobflow_cache's run_locally and
    under jobflow's own (where @cached_job intercepts itself)."""
    body = MAKER.replace("MANAGER", repr(manager))
    first, _ = run_script(tmp_path, body.replace("SHIFT", "0"))
    assert (outcomes(first), outputs(first)) == (["miss", "miss"], [10, 15])
    again, _ = run_script(tmp_path, body.replace("SHIFT", "0"))
    assert (outcomes(again), outputs(again)) == (["hit", "hit"], [10, 15])
    edited, _ = run_script(tmp_path, body.replace("SHIFT", "1"))
    assert (outcomes(edited), outputs(edited)) == (["miss", "miss"], [11, 16])


UNHASHABLE = """
import threading

def build():
    lock = threading.Lock()

    @cached_job
    def guarded(a):
        with lock:
            return a + 1
    return guarded

report(build()(1), build()(2), build()(3))
"""


@slow
def test_a_closure_that_cannot_be_hashed_runs_uncached_with_one_warning(tmp_path: Path) -> None:
    """A captured lock cannot be hashed: the jobs run (uncached, each time) and one warning is
    issued for the definition, not one per call nor per call of the enclosing function."""
    for _ in range(2):
        rows, stderr = run_script(tmp_path, UNHASHABLE)
        assert outputs(rows) == [2, 3, 4]
        assert outcomes(rows) == ["uncacheable"] * 3
        assert stderr.count("CacheWarning") == 1, stderr
        assert "closure variable lock" in stderr
        assert "build.<locals>.guarded" in stderr


MUTATED = """
def build(settings):
    @cached_job
    def scaled(a):
        return a * settings["factor"]
    return scaled

settings = {"factor": 2}
job = build(settings)
first = job(5)
report(first)
settings["factor"] = 3
report(job(5))
"""


@slow
def test_a_mutated_captured_value_is_seen_in_one_process(tmp_path: Path) -> None:
    """Captured values are hashed on every call: a dict mutated between two runs of the same
    function object in one process is a miss, never the stale entry."""
    script = tmp_path / "script.py"
    script.write_text(HEADER + textwrap.dedent(MUTATED))
    env = {**os.environ, "JOBFLOW_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line[:7] == "RESULT "]
    assert [outputs(r) for r in rows] == [[10], [15]]
    assert [outcomes(r) for r in rows] == [["miss"], ["miss"]]


LOCAL_ARGUMENT = """
from dataclasses import dataclass
from monty.json import MSONable

def build():
    @dataclass
    class Params(MSONable):
        a: int

        def value(self):
            return self.a * FACTOR

    return Params

@cached_job
def use(params):
    return params.value()

ALIAS = build()
report(use(ALIAS(2)))
"""


@slow
def test_an_argument_of_a_local_class_is_not_identified_by_its_name(tmp_path: Path) -> None:
    """monty names an object of a local class by ``__name__`` alone. When that name resolves
    to no class, the class's code cannot count: the job runs uncached (with a warning) rather
    than be served after the class's code changed. When it resolves (the script keeps the
    class under its own name), its code counts: an edit misses."""
    hidden = LOCAL_ARGUMENT.replace("ALIAS", "P")
    first, stderr = run_script(tmp_path, hidden.replace("FACTOR", "10"))
    assert (outcomes(first), outputs(first)) == (["uncacheable"], [20])
    assert "__main__:Params, which is not found under that name" in stderr
    edited, _ = run_script(tmp_path, hidden.replace("FACTOR", "100"))
    assert (outcomes(edited), outputs(edited)) == (["uncacheable"], [200])

    named = LOCAL_ARGUMENT.replace("ALIAS", "Params")
    first, _ = run_script(tmp_path, named.replace("FACTOR", "10"))
    assert (outcomes(first), outputs(first)) == (["miss"], [20])
    again, _ = run_script(tmp_path, named.replace("FACTOR", "10"))
    assert (outcomes(again), outputs(again)) == (["hit"], [20])
    edited, _ = run_script(tmp_path, named.replace("FACTOR", "100"))
    assert (outcomes(edited), outputs(edited)) == (["miss"], [200])


DIFFERENTIAL = """
import jobflow

def build(n):
    def helper(a):
        return [a] * n

    @DECORATOR
    def repeat(a):
        return helper(a)

    class Holder:
        @DECORATOR
        def twice(self, a):
            return 2 * a
    return repeat, Holder

repeat, Holder = build(3)
report(repeat("x"), repeat(1), manager="jobflow")
"""


@slow
def test_same_outputs_as_plain_job(tmp_path: Path) -> None:
    """Differential: the same local functions under ``@job`` and ``@cached_job`` (cold and
    served) give the same outputs under jobflow's run_locally."""
    plain, _ = run_script(tmp_path, DIFFERENTIAL.replace("DECORATOR", "jobflow.job"), "plain.py")
    cold, _ = run_script(tmp_path, DIFFERENTIAL.replace("DECORATOR", "cached_job"), "cached.py")
    warm, _ = run_script(tmp_path, DIFFERENTIAL.replace("DECORATOR", "cached_job"), "cached.py")
    assert outputs(plain) == outputs(cold) == outputs(warm) == [["x"] * 3, [1] * 3]
    assert outcomes(plain) == [None, None]
    assert (outcomes(cold), outcomes(warm)) == (["miss", "miss"], ["hit", "hit"])


def test_decoration_never_raises_and_jobs_compare_as_under_job() -> None:
    """In process: decorating lambdas, local functions, builtins and local methods raises
    nothing, and ``Job.function`` compares equal to the function as written (jobflow's
    ``function_filter`` relies on it)."""
    from jobflow_cache import cached_job

    def local(a: int) -> int:
        return a

    class Local:
        @cached_job
        def make(self, a: int) -> int:
            return a

    for func in (local, lambda a: a, print):
        decorated = cached_job(func)
        assert decorated(1).function == func
        assert cached_job(name="named")(func)(1).name == "named"
    job = Local().make(1)
    assert job.function.__self__.__class__ is Local
    job.update_metadata({"tag": 1}, function_filter=Local.make)
    assert job.metadata["tag"] == 1
