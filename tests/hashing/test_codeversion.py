"""User code is part of the digest: real scripts and modules, edited between fresh processes.

Each scenario writes a script (and modules beside it, or a fake installed/editable package in a
``site-packages`` folder) into ``tmp_path``, runs it with the project's Python in a new process
against the test's cache folder, edits a file, runs it again, and compares executions (counted in
``JFC_COUNTS_FILE``) and outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from jobflow_cache.hashing import code as codeversion
from jobflow_cache.hashing.code import (
    JobCode,
    cache_version_slot,
    code_differences,
    code_digest,
    env_names,
    is_user_file,
    job_code,
    version_differences,
)

PYTHON = sys.executable

# -- running scripts ------------------------------------------------------------------------------

RUNNER = """
import json, os, sys
{prelude}
from jobflow import Flow
{imports}

{body}

def _count(name):
    with open(os.environ["JFC_COUNTS_FILE"], "a") as fh:
        fh.write(name + "\\n")

if __name__ == "__main__":
    flow = Flow([FLOW_JOB])
    if os.environ.get("MANAGER") == "jobflow":
        from jobflow import run_locally
    else:
        from jobflow_cache import run_locally
    responses = run_locally(flow, ensure_success=True, log=False)
    print("RESULT " + json.dumps(responses[FLOW_JOB.uuid][1].output))
"""


class Project:
    """A folder with a script and modules, run in fresh processes."""

    def __init__(self, root: Path, counts_file: Path) -> None:
        self.root = root
        self.counts_file = counts_file
        root.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
        for cached in path.parent.glob("__pycache__"):  # mtimes within one second: no stale .pyc
            for pyc in cached.glob(path.stem + ".*.pyc"):
                pyc.unlink()
        return path

    def edit(self, name: str, old: str, new: str) -> None:
        path = self.root / name
        text = path.read_text()
        assert old in text, f"{old!r} not in {name}"
        self.write(name, text.replace(old, new))

    def script(self, name: str, body: str, imports: str = "", prelude: str = "") -> None:
        self.write(
            name,
            RUNNER.format(
                body=textwrap.dedent(body), imports=textwrap.dedent(imports), prelude=prelude
            ),
        )

    def run(self, name: str = "main.py", **env: str) -> tuple[object, Counter[str], str]:
        """Run a script; returns (its output, executions so far, stderr)."""
        environ = {**os.environ, "JFC_COUNTS_FILE": str(self.counts_file), **env}
        environ.pop("PYTHONPATH", None)
        proc = subprocess.run(
            [PYTHON, "-B", name],
            cwd=self.root,
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert lines, proc.stdout + proc.stderr
        counts = Counter(
            self.counts_file.read_text().split("\n")[:-1] if self.counts_file.exists() else []
        )
        return json.loads(lines[-1][len("RESULT ") :]), counts, proc.stderr


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path / "project", tmp_path / "executions.txt")


def _no_warning(stderr: str) -> None:
    assert "CacheWarning" not in stderr, stderr


# -- a module beside the script -------------------------------------------------------------------

HELPERS = """
SCALE = 2

def scale(x):
    return x * SCALE

def unrelated():
    return "unrelated 1"

@job
def compute(x):
    _count("compute")
    return scale(x) + 1
"""


def _module_project(project: Project, manager: str = "") -> None:
    project.write("userjobs.py", "from jobflow import job\nfrom counting import _count\n" + HELPERS)
    project.write(
        "counting.py",
        """
        import os
        def _count(name):
            with open(os.environ["JFC_COUNTS_FILE"], "a") as fh:
                fh.write(name + "\\n")
        """,
    )
    project.script("main.py", "FLOW_JOB = userjobs.compute(5)", imports="import userjobs")


@pytest.mark.parametrize("manager", ["jobflow_cache", "jobflow"])
def test_editing_a_job_function_in_a_user_module_reruns_it(project: Project, manager: str) -> None:
    _module_project(project)
    if manager == "jobflow":  # @cached_job under jobflow's own run_locally
        project.edit("userjobs.py", "@job\ndef compute", "@cached_job\ndef compute")
        project.edit(
            "userjobs.py", "from jobflow import job", "from jobflow_cache import cached_job"
        )
    env = {"MANAGER": manager}
    assert project.run(**env)[:2] == (11, {"compute": 1})
    assert project.run(**env)[:2] == (11, {"compute": 1}), "unchanged code is served"
    project.edit("userjobs.py", "return scale(x) + 1", "return scale(x) + 2")
    output, counts, stderr = project.run(**env)
    assert (output, counts) == (12, {"compute": 2}), "the fixed function runs again"
    _no_warning(stderr)


def test_editing_a_helper_or_a_constant_reruns_an_unrelated_edit_does_not(
    project: Project,
) -> None:
    _module_project(project)
    assert project.run()[:2] == (11, {"compute": 1})
    project.edit("userjobs.py", "return x * SCALE", "return x * SCALE * 10")
    assert project.run()[:2] == (101, {"compute": 2}), "edited helper"
    project.edit("userjobs.py", "SCALE = 2", "SCALE = 3")
    assert project.run()[:2] == (151, {"compute": 3}), "edited module-level constant"
    project.edit("userjobs.py", '"unrelated 1"', '"unrelated 2"')
    project.write("userjobs.py", (project.root / "userjobs.py").read_text() + "\nEXTRA = 1\n")
    assert project.run()[:2] == (151, {"compute": 3}), "unrelated edits in the file: served"
    project.edit("userjobs.py", "return x * SCALE * 10", "return  x*SCALE*10  # a comment")
    output, counts, stderr = project.run()
    assert (output, counts) == (151, {"compute": 3}), "comment and whitespace edits: served"
    _no_warning(stderr)


def test_a_helper_module_reached_through_an_attribute_chain(project: Project) -> None:
    project.write("lib/__init__.py", "")
    project.write("lib/maths.py", "OFFSET = 1\ndef shift(x):\n    return x + OFFSET\n")
    project.script(
        "main.py",
        """
        from jobflow import job
        import lib.maths

        @job
        def compute(x):
            _count("compute")
            return lib.maths.shift(x)

        FLOW_JOB = compute(1)
        """,
    )
    assert project.run()[:2] == (2, {"compute": 1})
    assert project.run()[:2] == (2, {"compute": 1})
    project.edit("lib/maths.py", "OFFSET = 1", "OFFSET = 5")
    assert project.run()[:2] == (6, {"compute": 2})


# -- scripts --------------------------------------------------------------------------------------

SCRIPT = """
from jobflow import job

FACTOR = 3

def helper(x):
    return x + 1

def unrelated():
    return 0

@job
def compute(x):
    _count("compute")
    return helper(x) * FACTOR

FLOW_JOB = compute(1)
"""


def test_script_helper_constant_and_unrelated_edits(project: Project) -> None:
    project.script("main.py", SCRIPT)
    assert project.run()[:2] == (6, {"compute": 1})
    project.edit("main.py", "return 0", "return 1")
    assert project.run()[:2] == (6, {"compute": 1}), "unrelated function edited: served"
    project.edit("main.py", "return x + 1", "return x + 2")
    assert project.run()[:2] == (9, {"compute": 2}), "edited helper"
    project.edit("main.py", "FACTOR = 3", "FACTOR = 4")
    assert project.run()[:2] == (12, {"compute": 3}), "edited constant"


def test_cache_version_replaces_the_own_source_but_not_the_helpers(project: Project) -> None:
    project.script("main.py", SCRIPT.replace("@job\n", "@cached_job(cache_version=1)\n"))
    project.edit("main.py", "from jobflow import job", "from jobflow_cache import cached_job")
    assert project.run()[:2] == (6, {"compute": 1})
    project.edit("main.py", "return helper(x) * FACTOR", "return helper(x) * FACTOR * 100")
    assert project.run()[:2] == (6, {"compute": 1}), "own source edited under cache_version"
    project.edit("main.py", "cache_version=1", "cache_version=2")
    assert project.run()[:2] == (600, {"compute": 2}), "a bumped version reruns"
    project.edit("main.py", "return x + 1", "return x + 2")
    assert project.run()[:2] == (900, {"compute": 3}), "helpers still count"


def test_a_script_function_passed_as_an_argument(project: Project) -> None:
    project.script(
        "main.py",
        """
        from jobflow import job

        def square(x):
            return x * x

        @job
        def apply(f, x):
            _count("apply")
            return f(x)

        FLOW_JOB = apply(square, 3)
        """,
    )
    assert project.run()[:2] == (9, {"apply": 1})
    assert project.run()[:2] == (9, {"apply": 1})
    project.edit("main.py", "return x * x", "return x * x * x")
    output, counts, stderr = project.run()
    assert (output, counts) == (27, {"apply": 2}), "the edited argument function reruns"
    _no_warning(stderr)


# -- installed and editable packages --------------------------------------------------------------


def _site(project: Project) -> Path:
    """A fake site-packages with an installed library and an editable install."""
    site = project.root.parent / "fake-env" / "site-packages"
    (site / "libmakers").mkdir(parents=True)
    (site / "libmakers" / "__init__.py").write_text(
        textwrap.dedent(
            """
            import os
            from dataclasses import dataclass
            from jobflow import Maker, job

            def _count(name):
                with open(os.environ["JFC_COUNTS_FILE"], "a") as fh:
                    fh.write(name + "\\n")

            @dataclass
            class BaseMaker(Maker):
                name: str = "base"
                factor: int = 2

                def helper(self, x):
                    return x * self.factor

                @job
                def make(self, x):
                    _count("make")
                    return self.helper(x) + LIB_OFFSET

            LIB_OFFSET = 0

            @job
            def lib_job(x):
                _count("lib_job")
                return x + LIB_OFFSET
            """
        )
    )
    dist = site / "libmakers-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: libmakers\nVersion: 1.0\n")
    (dist / "top_level.txt").write_text("libmakers\n")
    source = project.root.parent / "edsrc"
    (source / "edpkg").mkdir(parents=True)
    (source / "edpkg" / "__init__.py").write_text("def bump(x):\n    return x + 1\n")
    (site / "__editable__.edpkg-0.1.pth").write_text(str(source) + "\n")
    dist = site / "edpkg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: edpkg\nVersion: 0.1\n")
    url = {"url": source.as_uri(), "dir_info": {"editable": True}}
    (dist / "direct_url.json").write_text(json.dumps(url))
    return site


def _prelude(site: Path) -> str:
    return f"import site; site.addsitedir({str(site)!r})"


MAKER_SCRIPT = """
from dataclasses import dataclass
from libmakers import BaseMaker

@dataclass
class MyMaker(BaseMaker):
    name: str = "mine"

    def helper(self, x):
        return x * self.factor + 100

FLOW_JOB = MyMaker().make(1)
"""


def test_a_script_maker_subclass_counts_with_its_own_source(project: Project) -> None:
    prelude = _prelude(_site(project))
    project.script("one.py", MAKER_SCRIPT, prelude=prelude)
    project.script("two.py", MAKER_SCRIPT.replace("+ 100", "+ 200"), prelude=prelude)
    assert project.run("one.py")[:2] == (102, {"make": 1})
    assert project.run("one.py")[:2] == (102, {"make": 1}), "same script: served"
    output, counts, stderr = project.run("two.py")
    assert (output, counts) == (202, {"make": 2}), "another script's MyMaker is not shared"
    _no_warning(stderr)


def _entries(function: str) -> list[dict]:
    from jobflow_cache import CacheStore

    store = CacheStore()
    store.connect()
    return list(store.find({"function": function}))


def test_installed_code_is_not_hashed_but_its_version_is_recorded(project: Project) -> None:
    site = _site(project)
    project.script(
        "main.py",
        """
        from libmakers import lib_job
        FLOW_JOB = lib_job(1)
        """,
        prelude=_prelude(site),
    )
    assert project.run()[:2] == (1, {"lib_job": 1})
    (entry,) = _entries("libmakers:lib_job")
    assert entry["versions"]["libmakers"] == "1.0"
    assert entry.get("cache_version") is None, "installed code: nothing in the code slot"
    init = site / "libmakers" / "__init__.py"
    init.write_text(init.read_text().replace("LIB_OFFSET = 0", "LIB_OFFSET = 1000"))
    output, counts, _ = project.run()
    assert (output, counts) == (1, {"lib_job": 1}), "an installed package's code is not hashed"


def test_a_maker_records_its_class_package_version(project: Project) -> None:
    project.script("one.py", MAKER_SCRIPT, prelude=_prelude(_site(project)))
    project.run("one.py")
    (entry,) = _entries("libmakers:BaseMaker.make")
    assert entry["versions"]["libmakers"] == "1.0"
    assert entry["cache_version"].startswith("uses:"), "the script's subclass counts"


def test_editable_install_is_user_code(project: Project) -> None:
    site = _site(project)
    project.write(
        "probe.py",
        _prelude(site)
        + """
import json, libmakers, edpkg, jobflow
from jobflow_cache.hashing import code as cv
print("RESULT " + json.dumps([
    cv.is_user_module("libmakers"), cv.is_user_module("edpkg"), cv.is_user_module("jobflow"),
    cv.is_user_module("json"), cv.is_user_module("__main__"), cv.is_user_module("jobflow_cache"),
    sorted(cv.editable_distributions()),
    cv.code_digest(libmakers.lib_job) is None, cv.code_digest(edpkg.bump) is None,
]))
""",
    )
    result, _, _ = project.run("probe.py")
    assert result[:6] == [False, True, False, False, True, False]
    assert "edpkg" in result[6]
    assert result[7:] == [True, False]


# -- environment variables ------------------------------------------------------------------------


def test_named_environment_variables_enter_the_digest(project: Project) -> None:
    project.script(
        "main.py",
        """
        from jobflow_cache import cached_job

        @cached_job(env=["MY_MODE"])
        def compute(x):
            _count("compute")
            return [x, os.environ.get("MY_MODE"), os.environ.get("OTHER")]

        FLOW_JOB = compute(1)
        """,
    )
    assert project.run(MY_MODE="a")[:2] == ([1, "a", None], {"compute": 1})
    assert project.run(MY_MODE="a")[:2] == ([1, "a", None], {"compute": 1})
    assert project.run(MY_MODE="b")[:2] == ([1, "b", None], {"compute": 2})
    assert project.run(MY_MODE="b", OTHER="x")[:2] == ([1, "b", None], {"compute": 2})
    setting = {"MY_MODE": "b", "OTHER": "x", "JOBFLOW_CACHE_DIGEST_ENV": "OTHER"}
    assert project.run(**setting)[:2] == ([1, "b", "x"], {"compute": 3})


# -- in-process units -----------------------------------------------------------------------------


def test_is_user_file_by_location() -> None:
    roots = ["/venv/lib/python3.11", "/venv/lib/python3.11/site-packages"]
    assert not is_user_file("/venv/lib/python3.11/site-packages/atomate2/jobs.py", roots)
    assert not is_user_file("/venv/lib/python3.11/json/__init__.py", roots)
    assert is_user_file("/home/me/project/src/mypkg/jobs.py", roots)
    assert is_user_file("/venv/lib/python3.11-extra/mod.py", roots), "a prefix is not a folder"


def test_installed_functions_are_not_hashed_by_code() -> None:
    import jobflow

    assert code_digest(jobflow.job) is None
    assert code_digest(json.dumps) is None
    code = job_code(jobflow.Flow.add_jobs)
    assert (code.own, code.uses) == (None, None)
    assert "jobflow" in code.packages


def test_tests_folder_is_user_code_and_memoised() -> None:
    from tests.support import jobs

    assert codeversion.is_user_module("tests.support.jobs")
    first = job_code(jobs.add.original)
    assert first.own is not None
    assert first.uses is not None, "add uses executed()"
    assert job_code(jobs.add.original) is first
    versioned = job_code(jobs.add.original, versioned=True)
    assert versioned.own is None, "an explicit cache_version replaces the own source"
    assert versioned.uses == first.uses


def test_cache_version_slot_round_trips_through_code_differences() -> None:
    old = cache_version_slot("1", JobCode(None, "bb"), env="X:01")
    assert old == "uses:bb|env:X:01|version:1"
    assert cache_version_slot(None, JobCode("aa", None)) == "code:aa"
    assert cache_version_slot(None, JobCode(None, None)) is None
    new = cache_version_slot("2", JobCode(None, "cc"), env="X,Y:02")
    notes = code_differences(old, new)
    assert notes == [
        "the user code it uses (functions, classes, module-level constants) changed",
        "the environment variables in the digest changed: X -> X,Y",
        "cache_version '1' -> '2'",
    ]
    assert code_differences("code:aa", "code:ab") == ["the job function's own source changed"]
    assert code_differences("1", "1") == []


def test_version_differences_and_env_names() -> None:
    assert version_differences({"atomate2": "0.1", "pymatgen": "1"}, {"atomate2": "0.2"}) == [
        "atomate2 0.1 -> 0.2",
        "pymatgen 1 -> not installed",
    ]
    assert version_differences({"a": "1"}, {"a": "1", "b": "2"}) == []
    assert env_names(" A,B ", ("B", "C"), None) == ("A", "B", "C")


def _cell(path: Path, text: str, module: object) -> None:
    """Run a notebook cell (its own file, as IPython gives each cell) in ``module``."""
    path.write_text(text)
    exec(compile(text, str(path), "exec"), vars(module))


def test_a_redefined_helper_is_seen_in_the_same_process(tmp_path: Path) -> None:
    """A notebook re-runs the cell of a helper, not the job's: the memo must not hide it."""
    import types

    source = tmp_path / "cell.py"
    source.write_text("def helper(x):\n    return x + 1\n\ndef job(x):\n    return helper(x)\n")
    module = types.ModuleType("jfc_test_cells")
    module.__file__ = str(source)
    sys.modules[module.__name__] = module
    try:
        exec(compile(source.read_text(), str(source), "exec"), module.__dict__)
        first = job_code(module.job)
        assert job_code(module.job) is first, "memoised"
        _cell(tmp_path / "cell2.py", "def helper(x):\n    return x + 2\n", module)
        second = job_code(module.job)
        assert second.uses != first.uses, "the new helper counts"
        assert second.own == first.own
        named = {"f": b'{"@bound":null,"@callable":"helper","@module":"jfc_test_cells"}'}
        before = codeversion.argument_code(named, {"f": "d1"})
        _cell(tmp_path / "cell3.py", "def helper(x):\n    return x + 3\n", module)
        assert before is not None
        assert codeversion.argument_code(named, {"f": "d1"}) != before
    finally:
        del sys.modules[module.__name__]


def test_explain_says_what_code_and_which_versions_differ() -> None:
    import jobflow

    from jobflow_cache.admin.explain import Inputs, compare, served_version_notes

    cached = Inputs("m:f", "code:aa|uses:bb", {"a": "1"}, versions={"jobflow": "0.0.1"})
    now = Inputs("m:f", "code:aa|uses:cc", {"a": "1"}, versions={"jobflow": jobflow.__version__})
    result = compare(now, cached)
    assert result.code_notes == [
        "the user code it uses (functions, classes, module-level constants) changed"
    ]
    assert result.version_notes == [f"jobflow 0.0.1 -> {jobflow.__version__}"]

    class Store:  # what served_version_notes reads of a CacheStore
        def find(self, criteria, properties=None, limit=0):
            return iter([{"digest": criteria["digest"], "versions": {"jobflow": "0.0.1"}}])

    (line,) = served_version_notes(Store(), "x")  # type: ignore[arg-type]
    assert f"jobflow 0.0.1 -> {jobflow.__version__}" in line


def test_code_without_a_source_file_counts_by_its_bytecode(project: Project) -> None:
    """``python -c``: no file to read, the compiled code tells two versions apart."""
    code = textwrap.dedent(
        """
        import json, os
        from jobflow import Flow, job
        from jobflow_cache import run_locally

        @job
        def compute(x):
            with open(os.environ["JFC_COUNTS_FILE"], "a") as fh:
                fh.write("compute\\n")
            return x + 1

        j = compute(1)
        print("RESULT " + json.dumps(run_locally(Flow([j]), log=False)[j.uuid][1].output))
        """
    )
    environ = {**os.environ, "JFC_COUNTS_FILE": str(project.counts_file)}

    def run(text: str) -> tuple[object, int]:
        proc = subprocess.run(
            [PYTHON, "-c", text], cwd=project.root, env=environ, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        return json.loads(line[7:]), project.counts_file.read_text().count("compute")

    assert run(code) == (2, 1)
    assert run(code + "\n# a comment\n") == (2, 1), "same code: served"
    assert run(code.replace("x + 1", "x + 2")) == (3, 2), "changed code: runs"
