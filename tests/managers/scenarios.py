"""Scenarios shared by the manager tests (FireWorks, jobflow-remote): atomate2 flows with ASE's
EMT calculator, an independent count of job executions, and run-to-run comparison of JobStore
documents and run folders.

Kept at module level, importable by path, so the same code runs in the test process and in every
worker process (rockets, jobflow-remote's ``jf execution run``).

Counting executions
-------------------
:func:`count_executions` wraps ``jobflow.Job.run`` in a process so that every job whose *own
function* was entered appends its name to ``JFC_COUNTS_FILE`` (the format of the ``counts``
fixture of ``tests/conftest.py``; jobflow's ``store_inputs`` is not counted). It watches, with
``sys.setprofile``, for the code objects of the scenarios' job functions (:func:`job_codes`,
taken from a plain build of each flow); it does not ask the cache. A job served by the cache
never enters its function, so it is not counted, however the cache reports it. A job that
raises is counted (it ran).

Comparing runs
--------------
:func:`normalized_outputs` reads every document of a run's JobStore (blobs of the ``data`` store
put back in place) and writes each output as JSON text in which the run's own uuids read
``<job name>`` and its run folders ``<dir job name>``; ``clock=False`` leaves out the wall-clock
fields of ASE task documents (to compare a computed run with another computed run). Nothing else
is normalised, so a stale uuid or a path into an older run's folder shows as a difference.
:func:`folder_files` reads what a job left in its run folder, the manager's own files left out.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jobflow import Flow, job
from maggma.stores import JSONStore

from tests.integration.a2_flows import copper, elastic_flow, fail_job_named, phonon_flow

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import CodeType

__all__ = [
    "CLOCK_KEYS",
    "assert_same_outputs",
    "KINDS",
    "JobJSONStore",
    "SUMMARY",
    "expected_summary",
    "MANAGER_FILES",
    "Kind",
    "build",
    "copper",
    "count_executions",
    "drop_keys",
    "fail_job_named",
    "folder_files",
    "job_codes",
    "jobs_of",
    "load_docs",
    "normalized_outputs",
    "summary",
]

#: Wall-clock fields of ASE task documents: they differ between two computed runs (a served
#: output replays them, so served-vs-recorded comparisons keep them).
CLOCK_KEYS = frozenset({"last_updated", "completed_at", "elapsed_time", "run_stats"})

#: Files the managers write in a run folder themselves (never a job's, never cached).
MANAGER_FILES = frozenset(
    {
        "FW.json",
        "FW_offline.json",
        "FW_ping.json",
        "FW_submit.script",
        # jobflow-remote
        "jfremote_in.json",
        "jfremote_out.json",
        "remote_job_data.json",
        "submit.sh",
        "queue.out",
        "queue.err",
    }
)

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class JobJSONStore(JSONStore):
    """A maggma ``JSONStore`` for a JobStore's documents, shared by processes through its file.

    ``JobStore`` sets its documents store's key to ``uuid`` and writes with the key
    ``["uuid", "index"]``; a plain ``JSONStore`` reloads its file with its own key, so a
    process reconnecting to it kept one document per uuid and lost a replaced job's first
    document (jobflow stores both). Documents are reloaded by ``(uuid, index)`` here.
    """

    def update(self, docs: Any, key: list[str] | str | None = None) -> None:
        if key is None and self.key == "uuid":
            many = docs if isinstance(docs, list) else [docs]
            if all("index" in doc for doc in many):
                key = ["uuid", "index"]
        super().update(docs, key=key)


@job
def summary(value: Any) -> float:
    """A new job downstream of a cached flow (the half-cached flow's new part): one number of
    the flow's result (a list of numbers summed), rounded."""
    return round(sum(value) if isinstance(value, list) else value, 6)


@dataclass(frozen=True)
class Kind:
    """One scenario flow: how to build it, and the names that matter in the tests."""

    build: Callable[[], Flow]
    dynamic: str  #: the job that replaces itself with a sub-flow at run time
    children: tuple[str, ...]  #: the EMT jobs of that sub-flow
    final: str  #: the flow's last job
    failing: str  #: the job made to fail in the fail/fix/rebuild story (one of ``children``)
    result: tuple[str, ...]  #: where :func:`summary` reads its input in the final output
    #: whether the final job, its fizzled parent allowed (jobflow resolves the missing output to
    #: None), enters its function and raises there (else it fizzles before it starts)
    final_starts_after_failure: bool


@job
def scale_pair(pair: Any, factor: float) -> list[float]:
    """Given a tuple literal: a tuple in memory (our run_locally), a list in a FireWorks rocket
    or a jobflow-remote worker (the job travels through their serialization)."""
    return [round(x * factor, 6) for x in pair]


@job
def pair_total(values: list[float]) -> float:
    return round(sum(values), 6)


def tuple_flow() -> Flow:
    """scale_pair((1.5, 2.5), 2.0) -> pair_total: a job argument that is a tuple."""
    scaled = scale_pair((1.5, 2.5), 2.0)
    return Flow([scaled, pair_total(scaled.output)], name="tuples")


KINDS: dict[str, Kind] = {
    "elastic": Kind(
        build=elastic_flow,
        dynamic="run_elastic_deformations",
        children=tuple(f"EMT relaxation {i}/6" for i in range(1, 7)),
        final="fit_elastic_tensor",
        failing="EMT relaxation 3/6",
        result=("derived_properties", "k_vrh"),
        final_starts_after_failure=True,
    ),
    "phonon": Kind(
        build=phonon_flow,
        dynamic="run_phonon_displacements",
        children=tuple(f"EMT static {i}/6" for i in range(1, 7)),
        final="generate_frequencies_eigenvectors",
        failing="EMT static 3/6",
        result=("free_energies",),
        final_starts_after_failure=False,
    ),
    # no dynamic job, nothing made to fail: only for the inputs a manager hands a job
    "tuples": Kind(
        build=tuple_flow,
        dynamic="",
        children=(),
        final="pair_total",
        failing="",
        result=(),
        final_starts_after_failure=False,
    ),
}

#: ``"<kind>+summary"``: the flow of ``kind`` and a :func:`summary` job reading its result.
SUMMARY = "+summary"


def jobs_of(flow: Flow) -> list[Any]:
    """Every job of ``flow``, nested flows included (an empty flow has none)."""
    jobs: list[Any] = []
    for item in flow:
        jobs.extend(jobs_of(item) if isinstance(item, Flow) else [item])
    return jobs


def expected_summary(kind: str, final_output: dict[str, Any]) -> float:
    """What :func:`summary` returns for the final job output ``final_output`` of ``kind``."""
    value: Any = final_output
    for key in KINDS[kind].result:
        value = value[key]
    return float(summary.original(value))  # type: ignore[attr-defined]


def build(kind: str, cache: bool = True, **options: Any) -> Flow:
    """A fresh flow of ``kind`` (a key of :data:`KINDS`, optionally followed by
    :data:`SUMMARY`; all new uuids), marked with ``cache_flow(flow, **options)``
    unless ``cache`` is false (plain jobflow: the reference)."""
    base, _, extra = kind.partition("+")
    flow = KINDS[base].build()
    if extra:
        assert "+" + extra == SUMMARY, kind
        reference = flow.output
        for key in KINDS[base].result:  # attributes: the output is a document object
            reference = getattr(reference, key)
        flow = Flow([flow, summary(reference)], name=f"{flow.name} and summary")
    if not cache:
        return flow
    from jobflow_cache import cache_flow

    marked = cache_flow(flow, **options)
    return flow if marked is None else marked


# -- counting executions (see the module docstring) ----------------------------------------------
def _code_of(function: Any) -> CodeType | None:
    function = getattr(function, "original", function)
    function = getattr(function, "__func__", function)
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return getattr(function, "__code__", None)


def job_codes() -> dict[CodeType, str]:
    """Code object -> function name, for every job function of the scenarios (plain builds;
    the jobs dynamic jobs make run the same functions as the Makers' jobs).

    jobflow's ``store_inputs`` (the helper job gathering a replaced flow's outputs) is left
    out: it is book-keeping, which the cache lets run whether the replay is served or not."""
    functions: list[Any] = [summary]
    for kind in KINDS.values():
        functions.extend(j.function for j in jobs_of(kind.build()))
    codes = {}
    for function in functions:
        code = _code_of(function)
        if code is not None:
            codes[code] = code.co_name
    return codes


def count_executions(path: str | os.PathLike[str]) -> None:
    """From now on, in this process, append to ``path`` the name of every job whose function
    runs (see the module docstring)."""
    from jobflow import Job

    targets = job_codes()
    run = Job.run
    if getattr(run, "jfc_counting", False):
        return

    def counting_run(self: Job, *args: Any, **kwargs: Any) -> Any:
        entered: list[bool] = []

        def watch(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code in targets:
                entered.append(True)
                sys.setprofile(None)

        sys.setprofile(watch)
        try:
            return run(self, *args, **kwargs)
        finally:
            sys.setprofile(None)
            if entered:
                with open(path, "a") as fh:
                    fh.write(f"{self.name}\n")

    counting_run.jfc_counting = True  # type: ignore[attr-defined]
    Job.run = counting_run  # type: ignore[method-assign]


# -- comparing runs -------------------------------------------------------------------------------
def drop_keys(value: Any, keys: Iterable[str]) -> Any:
    """``value`` without the dict items named ``keys``, at any depth."""
    keys = frozenset(keys)
    if isinstance(value, dict):
        return {k: drop_keys(v, keys) for k, v in value.items() if k not in keys}
    if isinstance(value, list):
        return [drop_keys(v, keys) for v in value]
    return value


def _read_json_store(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    docs = json.loads(path.read_text() or "[]")
    return [{k: v for k, v in doc.items() if k != "_id"} for doc in docs]


def load_docs(outputs: Path, data: Path | None = None) -> list[dict[str, Any]]:
    """Every document of a JobStore kept in maggma ``JSONStore`` files, blobs of the ``data``
    store put back where the documents reference them."""
    docs = _read_json_store(outputs)
    blobs = {b["blob_uuid"]: b["data"] for b in _read_json_store(data)} if data else {}

    def resolve(value: Any) -> Any:
        if isinstance(value, dict):
            if "blob_uuid" in value and "store" in value:  # jobflow's reference to a blob
                return blobs.get(value["blob_uuid"], value)
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return [{**doc, "output": resolve(doc["output"])} for doc in docs]


def _folder_of(output: Any) -> str | None:
    dir_name = output.get("dir_name") if isinstance(output, dict) else None
    if not isinstance(dir_name, str) or not dir_name:
        return None
    return dir_name if dir_name.startswith("/") else dir_name.split(":", 1)[-1]


def job_folders(docs: Iterable[dict[str, Any]]) -> dict[str, Path]:
    """Job name -> run folder, for the jobs whose output names its folder (``dir_name``)."""
    folders = {}
    for doc in docs:
        folder = _folder_of(doc["output"])
        if folder is not None:
            folders[doc["name"]] = Path(folder)
    return folders


def normalized_outputs(
    docs: list[dict[str, Any]],
    root: Path | None = None,
    clock: bool = True,
    names: dict[str, str] | None = None,
    folders: dict[str, str] | None = None,
) -> dict[str, str]:
    """Job name -> the output's JSON text with this run's uuids read ``<name>``, its run folders
    ``<dir name>`` and ``root`` ``<root>``; without :data:`CLOCK_KEYS` unless ``clock``.
    ``names`` (uuid -> job name) names the run's jobs that have no document (a job that
    failed, as a reference to it reads), ``folders`` (path -> job name) the run folders of
    jobs whose output does not name its own (a manager's launch folders).

    Names must be unique within the run (a replaced job's second document is jobflow's
    ``store_inputs``): a repeated name fails here rather than hide a job that ran twice.
    """
    stored = [doc["name"] for doc in docs]
    repeated = sorted({n for n in stored if stored.count(n) > 1})
    assert not repeated, f"job names stored more than once: {repeated}"
    labels: dict[str, str] = dict(names or {})
    for doc in sorted(docs, key=lambda d: d["index"]):  # a uuid is named by its first job
        labels.setdefault(doc["uuid"], doc["name"])
    dirs = {path: f"<dir {name}>" for path, name in (folders or {}).items()}
    dirs.update({str(folder): f"<dir {name}>" for name, folder in job_folders(docs).items()})
    ordered = sorted(dirs, key=len, reverse=True)  # a folder inside another: its own label
    folder_re = re.compile("|".join(re.escape(f) for f in ordered)) if ordered else None
    out = {}
    for doc in docs:
        output = doc["output"] if clock else drop_keys(doc["output"], CLOCK_KEYS)
        text = json.dumps(output, sort_keys=True)
        if folder_re is not None:
            text = folder_re.sub(lambda m: dirs[m.group(0)], text)
        if root is not None:
            text = text.replace(str(root), "<root>")
        text = UUID.sub(lambda m: f"<{labels.get(m.group(0), 'unknown uuid')}>", text)
        out[doc["name"]] = text
    return out


def assert_same_outputs(got: dict[str, str], want: dict[str, str], what: str) -> None:
    """``got == want`` (normalized outputs by job name); else fail with the jobs that differ
    and the first lines of each difference."""
    if got == want:
        return
    lines = [f"{what}: jobs {sorted(set(got) ^ set(want))} are in one run only"]
    for name in sorted(set(got) & set(want)):
        if got[name] != want[name]:
            a = json.dumps(json.loads(want[name]), indent=1, sort_keys=True).splitlines()
            b = json.dumps(json.loads(got[name]), indent=1, sort_keys=True).splitlines()
            diff = list(difflib.unified_diff(a, b, "expected", "got", lineterm="", n=2))
            lines += [f"{what}: {name} differs:", *diff[:40]]
    raise AssertionError("\n".join(lines))


def folder_files(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every file under ``folder`` (symlinks as ``-> target``), the
    managers' own files (:data:`MANAGER_FILES`) left out."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.name in MANAGER_FILES:
            continue
        if path.is_symlink():
            files[rel] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            files[rel] = path.read_bytes()
    return files
