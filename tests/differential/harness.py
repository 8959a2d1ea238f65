"""The differential harness: one scenario, run in fresh processes by plain jobflow and by the cache.

A *scenario* is a program ``program(step, run)`` (a module-level function in an importable
module, or in a user module or ``__main__`` script the scenario writes) that builds its flow
from scratch (all-new uuids) and hands it to ``run``. It runs in two *worlds*, each a folder of
its own under ``tmp_path``::

    <world>/            the subprocesses' working directory
      run/              root_dir of every run (the shared folder, or where job folders go)
      data/             the user's own files (inputs outside the run folders)
      code/             the user's own modules and scripts (on PYTHONPATH)
      cache/            JOBFLOW_CACHE_DIR (cache world)
      config.yaml       JOBFLOW_CACHE_CONFIG_FILE (absent unless the scenario writes it)

``plain``
    jobflow's own ``run_locally`` with plain ``@job`` functions and ``JOBFLOW_CACHE_DISABLE=1``;
``local``
    ``jobflow_cache.run_locally`` with the same plain ``@job`` functions;
``deco``
    jobflow's own ``run_locally`` with the jobs decorated by ``@cached_job`` (job modules pick
    their decorator with :func:`tests.differential.jobs.task`, from ``JFC_DIFF_DECO``).

Each step of each world is one fresh ``python`` process (``tests.differential.step``); the plain
world and the cache world of a step run side by side. Between steps the scenario changes
something in each world (inputs through ``step``, files, code, settings, ``cachetool``).

After every step the harness has, per world: the JobStore documents (and those of the ``data``
store), the responses ``run_locally`` returned (outputs with their Python types), the jobs that
failed and how, the executions of every job (``JFC_COUNTS_FILE``), and every file, symlink and
empty folder under ``run/`` and ``data/`` (relative path, mode, bytes). Uuids become
``s<step>:<job name>#<n>`` (n counts jobs of that name in execution order), job folders
``<dir s<step>:<name>#<n>>``, the world's path ``<W>``; ``completed_at`` and the cache's own
``metadata["jobflow_cache"]`` are left out. Nothing else is normalised, so a stale value, a
stale uuid or a path into an old folder shows as a difference.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import fnmatch
import importlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import paths

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
JOB_DIR_RE = re.compile(r"job_[0-9]{4}(?:-[0-9]+)+")
ADDRESS_RE = re.compile(r" at 0x[0-9a-f]+")

#: The four ways a scenario can run: (shared folder | one folder per job) x (run_locally | deco)
VARIANTS = ("shared-local", "shared-deco", "folders-local", "folders-deco")
SHARED = ("shared-local", "shared-deco")
FOLDERS = ("folders-local", "folders-deco")
LOCAL = ("shared-local", "folders-local")
DECO = ("shared-deco", "folders-deco")


# == the subprocess side ==========================================================================
def typed(value: Any) -> Any:
    """A JSON-able picture of ``value`` that keeps its Python types (for the responses)."""
    if value is None or (isinstance(value, bool) and type(value) is bool):
        return value
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, enum.Enum):
        return [kind, repr(value)]
    if type(value) in (str, int, float):
        return value if not isinstance(value, float) else [kind, repr(value)]
    if isinstance(value, Mapping):
        return {"<type>": kind, "items": [[typed(k), typed(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [kind, [typed(v) for v in value]]
    if isinstance(value, (set, frozenset)):
        return [kind, sorted((typed(v) for v in value), key=repr)]
    module = type(value).__module__
    if module == "numpy":
        if hasattr(value, "dtype") and hasattr(value, "shape") and value.shape:
            return [kind, str(value.dtype), list(value.shape), value.tolist()]
        return [kind, repr(value)]
    if isinstance(value, (str, int, float)):  # subclasses
        return [kind, repr(value)]
    if hasattr(value, "as_dict"):
        with contextlib.suppress(Exception):
            return [kind, typed(value.as_dict())]
    if hasattr(value, "model_dump"):
        with contextlib.suppress(Exception):
            return [kind, typed(value.model_dump())]
    return [kind, ADDRESS_RE.sub(" at 0x?", repr(value))]


def _flow_names(flow: Any) -> Any:
    """Names of the jobs a Response's replace/addition/detour makes (None when absent)."""
    if flow is None:
        return None
    if isinstance(flow, (list, tuple)):
        return [_flow_names(f) for f in flow]
    jobs = getattr(flow, "jobs", None)
    if jobs is None:
        return getattr(flow, "name", repr(flow))
    return [_flow_names(j) if hasattr(j, "jobs") else j.name for j in jobs]


class _Failures(logging.Handler):
    """Collects jobflow's 'failed with exception' log lines: job name and the exception line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "failed with exception" in message:
            name = message.split(" failed with exception")[0]
            last = [line for line in message.strip().splitlines() if line.strip()][-1]
            self.failures.append(f"{name}: {last.strip()}")


class Runner:
    """What a scenario program is given as ``run``: runs flows the way its world does."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from jobflow import JobStore
        from maggma.stores import MemoryStore

        self.spec = spec
        self.step: int = spec["step"]
        self.world: str = spec["world"]  # plain | local | deco
        self.create_folders: bool = spec["create_folders"]
        self.run_dir = Path(spec["run_dir"])
        self.store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
        self.store.connect()
        self.runs: list[dict[str, Any]] = []
        self.names: dict[str, str] = {}
        self.order: list[str] = []
        self.job_dirs: dict[str, str] = {}
        self.error: str | None = None
        self.caught: list[str] = []
        self._cache_object: Any = None

    @property
    def cached(self) -> bool:
        return self.world != "plain"

    def cache_object(self) -> Any:
        """One ``jobflow_cache.Cache`` for the whole process (``local`` world), else None."""
        if self.world != "local":
            return None
        if self._cache_object is None:
            from jobflow_cache import Cache

            self._cache_object = Cache()
        return self._cache_object

    def __call__(
        self, flow: Any, create_folders: bool | None = None, cache_object: bool = False
    ) -> dict[str, Any]:
        """Run ``flow`` in this world into the step's JobStore; return the responses."""
        import jobflow

        folders = self.create_folders if create_folders is None else create_folders
        for job in _jobs_of(flow):
            self.names.setdefault(job.uuid, job.name)
        handler = _Failures()
        logger = logging.getLogger("jobflow")
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        responses: dict[str, Any] = {}
        exception = None
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                if self.world == "local":
                    import jobflow_cache

                    extra = {"cache": self.cache_object()} if cache_object else {}
                    responses = jobflow_cache.run_locally(
                        flow,
                        store=self.store,
                        create_folders=folders,
                        root_dir=self.run_dir,
                        log=False,
                        **extra,
                    )
                else:
                    responses = jobflow.run_locally(
                        flow,
                        store=self.store,
                        create_folders=folders,
                        root_dir=self.run_dir,
                        log=False,
                    )
        except Exception as exc:
            exception = f"{type(exc).__name__}: {exc}"
        finally:
            logger.removeHandler(handler)
            os.chdir(self.spec["world_dir"])
        self.caught += [f"{w.category.__name__}: {w.message}" for w in caught]
        described = []
        for uuid, by_index in (responses or {}).items():
            if uuid not in self.order:
                self.order.append(uuid)
            for index, response in by_index.items():
                if response.job_dir is not None and Path(response.job_dir) != self.run_dir:
                    self.job_dirs[uuid] = str(response.job_dir)
                described.append(
                    {
                        "uuid": uuid,
                        "index": index,
                        "output": typed(response.output),
                        "stored_data": typed(response.stored_data),
                        "stop_children": response.stop_children,
                        "stop_jobflow": response.stop_jobflow,
                        "replace": _flow_names(response.replace),
                        "addition": _flow_names(response.addition),
                        "detour": _flow_names(response.detour),
                        "job_dir": None if response.job_dir is None else str(response.job_dir),
                    }
                )
        self.runs.append(
            {"responses": described, "failures": handler.failures, "exception": exception}
        )
        return responses

    def finish(self) -> dict[str, Any]:
        docs = _documents(self.store.docs_store)
        data = _documents(self.store.additional_stores["data"])
        outcomes, digests = {}, {}
        for doc in docs:
            self.names.setdefault(doc["uuid"], doc.get("name", "?"))
            meta = (doc.get("metadata") or {}).pop("jobflow_cache", None)
            if isinstance(meta, dict):
                outcomes[doc["uuid"]] = meta.get("outcome")
                if meta.get("digest"):
                    digests[doc["uuid"]] = meta["digest"]
            doc.pop("completed_at", None)
        for uuid in self.names:  # jobs that never answered (failed, stopped) after the others
            if uuid not in self.order:
                self.order.append(uuid)
        position = {uuid: n for n, uuid in enumerate(self.order)}
        docs.sort(key=lambda d: (position.get(d["uuid"], 1 << 30), d.get("index", 0)))
        return {
            "runs": self.runs,
            "docs": docs,
            "data": sorted(data, key=lambda d: json.dumps(d, sort_keys=True, default=repr)),
            "names": self.names,
            "order": self.order,
            "job_dirs": self.job_dirs,
            "outcomes": outcomes,
            "digests": digests,
            "error": self.error,
            "warnings": self.caught,
        }


def _jobs_of(flow: Any) -> Iterable[Any]:
    if isinstance(flow, (list, tuple)):
        for item in flow:
            yield from _jobs_of(item)
    elif hasattr(flow, "jobs"):
        yield from _jobs_of(flow.jobs)
    else:
        yield flow


def _documents(store: Any) -> list[dict[str, Any]]:
    docs = []
    for doc in store.query({}):
        doc = dict(doc)
        doc.pop("_id", None)
        docs.append(json.loads(json.dumps(doc, default=repr)))
    return docs


def step_main(program: Callable[[int, Runner], Any] | None = None) -> None:
    """Run one step of one world: the spec is the JSON file named by ``JFC_DIFF_SPEC``."""
    spec = json.loads(Path(os.environ["JFC_DIFF_SPEC"]).read_text())
    if program is None:
        module, _, name = spec["program"].partition(":")
        program = getattr(importlib.import_module(module), name)
    runner = Runner(spec)
    try:
        program(spec["step"], runner)
    except Exception as exc:
        runner.error = f"{type(exc).__name__}: {exc}"
    Path(spec["out"]).write_text(json.dumps(runner.finish(), default=repr))


# == the test side ================================================================================
@dataclass
class World:
    """One world of a scenario: its folder, its environment, its results so far."""

    kind: str  # plain | local | deco
    path: Path
    create_folders: bool
    env: dict[str, str]
    results: list[dict[str, Any]] = field(default_factory=list)
    snapshots: list[dict[str, tuple]] = field(default_factory=list)
    counts: list[Counter[str]] = field(default_factory=list)

    @property
    def cached(self) -> bool:
        return self.kind != "plain"

    @property
    def run_dir(self) -> Path:
        return self.path / "run"

    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def code(self) -> Path:
        return self.path / "code"

    def digest_of(self, name: str, step: int = 1) -> str:
        """The cache digest of the job called ``name`` in ``step`` (first of that name)."""
        result = self.results[step - 1]
        for uuid in result["order"]:
            if result["names"].get(uuid) == name and uuid in result["digests"]:
                return result["digests"][uuid]
        raise AssertionError(f"no digest recorded for {name!r} in step {step}: {result}")

    def cachetool(self, *args: str, answer: str = "y\n") -> str:
        """Run the real ``cachetool`` CLI on this world's cache; return its output."""
        tool = Path(PYTHON).parent / "cachetool"
        proc = subprocess.run(
            [str(tool), *args],
            cwd=self.path,
            env=self.env,
            input=answer,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise AssertionError(f"cachetool {args} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def job_folders(self, step: int) -> list[Path]:
        return [Path(d) for d in self.results[step - 1]["job_dirs"].values()]


Hook = Callable[[World], None]
BetweenHook = Callable[[World, int], None]


@dataclass(frozen=True)
class Scenario:
    """One differential scenario (see the module docstring)."""

    program: str  # "module:function", imported in the step process
    doc: str = ""
    #: the program lives in a script run as __main__ (path relative to the world folder;
    #: ``{step}`` is replaced by the step number)
    script: str | None = None
    setup: Hook | None = None  # before step 1, in every world
    between: BetweenHook | None = None  # after step k (k < steps), in every world
    steps: int = 2
    variants: tuple[str, ...] = VARIANTS
    #: step -> job names the cache world must serve in that step (never executed)
    served: Mapping[int, Iterable[str]] = field(default_factory=dict)
    #: step -> job names the cache world must execute as often as the plain world does
    ran: Mapping[int, Iterable[str]] = field(default_factory=dict)
    #: the variants where ``served`` and ``ran`` are asserted (default: all)
    count_variants: tuple[str, ...] = VARIANTS
    #: environment of the cache world only (values may use {world})
    env: Mapping[str, str] = field(default_factory=dict)
    #: glob patterns (relative to the world folder) of files left out of the comparison
    exclude: tuple[str, ...] = ()
    drop_keys: frozenset[str] = frozenset()
    #: extra assertions on the worlds once every step ran
    check: Callable[[World, World], None] | None = None
    #: variant -> reason: the scenario fails there today (strict xfail)
    xfail: Mapping[str, str] = field(default_factory=dict)
    #: jobs may fail in plain jobflow (else any failure there is a broken scenario)
    failures_expected: bool = False
    slow: bool = False
    marks: tuple[Any, ...] = ()
    timeout: int = 300


def cases(scenarios: Mapping[str, Scenario]) -> list[Any]:
    """pytest parameters ``(name, variant)`` for every scenario and variant, with their marks."""
    import pytest  # not in the step processes

    params = []
    for name, scenario in scenarios.items():
        for variant in scenario.variants:
            marks = list(scenario.marks)
            if scenario.slow:
                marks.append(pytest.mark.slow)
            reason = scenario.xfail.get(variant) or scenario.xfail.get("*")
            if reason and not os.environ.get("JFC_DIFF_NO_XFAIL"):
                marks.append(pytest.mark.xfail(strict=True, reason=f"issue 11: {reason}"))
            params.append(pytest.param(name, variant, marks=marks, id=f"{name}-{variant}"))
    return params


def _base_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JOBFLOW_CACHE_", "JFC_", "MONGOMOCK", "PYTEST_", "PYTHONPATH"))
    }
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # an edit within the same second must be seen
    return env


def _make_world(kind: str, tmp_path: Path, variant: str, scenario: Scenario) -> World:
    path = tmp_path / kind
    for sub in ("run", "data", "code"):
        (path / sub).mkdir(parents=True)
    (path / "config.yaml").touch()  # an empty settings file: never the user's own
    env = _base_env()
    env.update(
        # JFC_DIFF_SRC: another checkout's src/ to test instead (a bisect, an old scheme)
        PYTHONPATH=paths.pythonpath(
            *[p for p in (os.environ.get("JFC_DIFF_SRC"), str(path / "code")) if p]
        ),
        JOBFLOW_CACHE_DIR=str(path / "cache"),
        JOBFLOW_CACHE_CONFIG_FILE=str(path / "config.yaml"),
        JFC_DIFF_DATA=str(path / "data"),
    )
    if kind == "plain":
        env["JOBFLOW_CACHE_DISABLE"] = "1"
    else:
        env.update({k: v.format(world=path) for k, v in scenario.env.items()})
    if kind == "deco":
        env["JFC_DIFF_DECO"] = "1"
    return World(kind, path, variant.startswith("folders"), env)


def _start(world: World, scenario: Scenario, step: int) -> tuple[subprocess.Popen, Any]:
    spec = {
        "program": scenario.program,
        "step": step,
        "world": world.kind,
        "create_folders": world.create_folders,
        "run_dir": str(world.run_dir),
        "world_dir": str(world.path),
        "out": str(world.path / f"out{step}.json"),
    }
    spec_file = world.path / f"spec{step}.json"
    spec_file.write_text(json.dumps(spec))
    env = {
        **world.env,
        "JFC_DIFF_SPEC": str(spec_file),
        "JFC_COUNTS_FILE": str(world.path / f"counts{step}.txt"),
        "JFC_DIFF_STEP": str(step),  # an environment that changes between the runs
    }
    command = (
        [PYTHON, str(world.path / scenario.script.format(step=step))]
        if scenario.script
        else [PYTHON, "-m", "tests.differential.step"]
    )
    log = open(world.path / f"log{step}.txt", "w")  # noqa: SIM115 (closed in _wait)
    proc = subprocess.Popen(command, cwd=world.path, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log


def _wait(world: World, proc: subprocess.Popen, log: Any, step: int, timeout: int) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    finally:
        log.close()
    out = world.path / f"out{step}.json"
    if proc.returncode != 0 or not out.exists():
        text = (world.path / f"log{step}.txt").read_text()[-4000:]
        raise AssertionError(f"{world.kind} step {step} failed ({proc.returncode}):\n{text}")
    world.results.append(json.loads(out.read_text()))
    counts_file = world.path / f"counts{step}.txt"
    lines = counts_file.read_text().split("\n")[:-1] if counts_file.exists() else []
    world.counts.append(Counter(lines))
    world.snapshots.append(snapshot(world))


def snapshot(world: World) -> dict[str, tuple]:
    """Every file, symlink and empty folder under run/ and data/: kind, mode, bytes/target."""
    found: dict[str, tuple] = {}
    for top in (world.run_dir, world.data):
        for dirpath, dirnames, filenames in os.walk(top):
            here = Path(dirpath)
            rel_dir = here.relative_to(world.path).as_posix()
            if not dirnames and not filenames and here != top:
                found[rel_dir + "/"] = ("dir", stat.S_IMODE(here.lstat().st_mode))
            for name in list(dirnames):
                if (here / name).is_symlink():  # os.walk lists links to folders as folders
                    dirnames.remove(name)
                    filenames.append(name)
            for name in filenames:
                path = here / name
                rel = f"{rel_dir}/{name}"
                info = path.lstat()
                if stat.S_ISLNK(info.st_mode):
                    found[rel] = ("link", os.readlink(path))
                else:
                    found[rel] = ("file", stat.S_IMODE(info.st_mode), path.read_bytes())
    return found


class Normaliser:
    """Maps one world's uuids, job folders and own path to labels that both worlds share."""

    def __init__(self, world: World) -> None:
        self.paths = sorted({str(world.path), os.path.realpath(world.path)}, key=len)[::-1]
        self.uuids: dict[str, str] = {}
        self.dirs: dict[str, str] = {}
        self.unknown: dict[str, str] = {}
        for step, result in enumerate(world.results, 1):
            per_name: Counter[str] = Counter()
            for uuid in result["order"]:
                name = result["names"].get(uuid, "?")
                self.uuids.setdefault(uuid, f"s{step}:{name}#{per_name[name]}")
                per_name[name] += 1
            for uuid, folder in result["job_dirs"].items():
                self.dirs.setdefault(Path(folder).name, f"<dir {self.uuids[uuid]}>")

    def _other(self, kind: str, text: str) -> str:
        if text not in self.unknown:
            self.unknown[text] = f"<{kind}?{len(self.unknown)}>"
        return self.unknown[text]

    def text(self, text: str) -> str:
        for path in self.paths:
            text = text.replace(path, "<W>")
        text = JOB_DIR_RE.sub(
            lambda m: self.dirs.get(m.group(0)) or self._other("dir", m.group(0)), text
        )
        return UUID_RE.sub(
            lambda m: f"<{self.uuids.get(m.group(0)) or self._other('uuid', m.group(0))}>", text
        )

    def tree(self, value: Any, drop: frozenset[str] = frozenset()) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.tree(v, drop) for v in value]
        if isinstance(value, dict):
            if "<type>" in value and drop:  # a typed() mapping: its items are [key, value]
                items = [i for i in value["items"] if not (isinstance(i[0], str) and i[0] in drop)]
                value = {**value, "items": items}
            return {self.text(k): self.tree(v, drop) for k, v in value.items() if k not in drop}
        return value

    def files(self, found: Mapping[str, tuple]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for rel, entry in found.items():
            key = self.text(rel)
            if entry[0] == "file":
                data = self.text(entry[2].decode("latin-1"))
                out[key] = ("file", oct(entry[1]), data)
            elif entry[0] == "link":
                out[key] = ("link", self.text(entry[1]))
            else:
                out[key] = ("dir", oct(entry[1]))
        return out


def _excluded(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(Path(rel).name, p) for p in patterns)


def _exact(value: Any) -> str:
    """JSON text keeping types (1, 1.0, true) and key order."""
    return json.dumps(value, default=repr)


def _diff(label: str, plain: Any, cached: Any) -> str:
    a = json.dumps(plain, indent=1, default=repr).splitlines()
    b = json.dumps(cached, indent=1, default=repr).splitlines()
    lines = list(difflib.unified_diff(a, b, "plain", "cache", n=2, lineterm=""))
    if len(lines) > 80:
        lines = [*lines[:80], f"... ({len(lines) - 80} more lines)"]
    return f"{label}:\n" + "\n".join(lines)


def compare(plain: World, cached: World, scenario: Scenario) -> list[str]:
    """Every difference between the worlds, step by step (empty when they agree)."""
    problems = []
    norm_plain, norm_cached = Normaliser(plain), Normaliser(cached)
    drop = scenario.drop_keys
    for step in range(1, len(plain.results) + 1):
        a, b = plain.results[step - 1], cached.results[step - 1]
        for part in ("runs", "docs", "data", "error"):
            pa, pb = norm_plain.tree(a[part], drop), norm_cached.tree(b[part], drop)
            if _exact(pa) != _exact(pb):  # not ==: 1, 1.0 and True must differ
                problems.append(_diff(f"step {step}: {part} differ", pa, pb))
        fa = {
            k: v
            for k, v in norm_plain.files(plain.snapshots[step - 1]).items()
            if not _excluded(k, scenario.exclude)
        }
        fb = {
            k: v
            for k, v in norm_cached.files(cached.snapshots[step - 1]).items()
            if not _excluded(k, scenario.exclude)
        }
        if _exact(sorted(fa.items())) != _exact(sorted(fb.items())):
            lines = [f"step {step}: files differ"]
            for key in sorted(set(fa) | set(fb)):
                if _exact(fa.get(key)) != _exact(fb.get(key)):
                    lines.append(f"  {key}:\n    plain: {_short(fa.get(key))}")
                    lines.append(f"    cache: {_short(fb.get(key))}")
            problems.append("\n".join(lines))
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 400 else text[:400] + "..."


def check_counts(plain: World, cached: World, scenario: Scenario, variant: str) -> list[str]:
    problems: list[str] = []
    if variant not in scenario.count_variants:
        return problems
    for step, names in scenario.served.items():
        counts = cached.counts[step - 1]
        for name in names:
            if counts[name]:
                problems.append(
                    f"step {step}: {name} should be served by the cache but executed "
                    f"{counts[name]} time(s); outcomes {_outcomes(cached, step)}"
                )
    for step, names in scenario.ran.items():
        for name in names:
            want, got = plain.counts[step - 1][name], cached.counts[step - 1][name]
            if want != got or not want:
                problems.append(
                    f"step {step}: {name} executed {got} time(s) in the cache world, "
                    f"{want} in plain jobflow"
                )
    return problems


def _outcomes(world: World, step: int) -> dict[str, Any]:
    result = world.results[step - 1]
    return {result["names"].get(u, u): o for u, o in result["outcomes"].items()}


def run_worlds(scenario: Scenario, variant: str, tmp_path: Path) -> tuple[World, World]:
    """Run every step of ``scenario`` in the plain world and the cache world of ``variant``."""
    kind = variant.split("-")[1]
    worlds = [_make_world(k, tmp_path, variant, scenario) for k in ("plain", kind)]
    if scenario.setup:
        for world in worlds:
            scenario.setup(world)
    for step in range(1, scenario.steps + 1):
        started = [(w, *_start(w, scenario, step)) for w in worlds]
        for world, proc, log in started:
            _wait(world, proc, log, step, scenario.timeout)
        if step < scenario.steps and scenario.between:
            for world in worlds:
                scenario.between(world, step)
    return worlds[0], worlds[1]


def check_scenario(scenario: Scenario, variant: str, tmp_path: Path) -> tuple[World, World]:
    """Run the scenario and assert the cache world equals the plain world (and serves)."""
    plain, cached = run_worlds(scenario, variant, tmp_path)
    if not scenario.failures_expected:  # a scenario whose jobs fail in jobflow tests nothing
        for step, result in enumerate(plain.results, 1):
            broken = [r["failures"] or r["exception"] for r in result["runs"]] + [result["error"]]
            assert not any(broken), f"plain jobflow failed in step {step}: {broken}"
    problems = compare(plain, cached, scenario) + check_counts(plain, cached, scenario, variant)
    if scenario.check and not problems:
        scenario.check(plain, cached)
    if problems:
        notes = [
            f"cache world outcomes, step {s}: {_outcomes(cached, s)}; "
            f"executions plain {dict(plain.counts[s - 1])} cache {dict(cached.counts[s - 1])}"
            for s in range(1, scenario.steps + 1)
        ]
        warned = [w for r in cached.results for w in r["warnings"]]
        raise AssertionError("\n".join([*problems, *notes, f"cache-world warnings: {warned[:5]}"]))
    return plain, cached


def write(path: Path, text: str) -> None:
    """Write ``text`` (a module or data file) with a fresh mtime, making its parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def remove_job_folders(world: World, step: int) -> None:
    for folder in world.job_folders(step):
        shutil.rmtree(folder)
