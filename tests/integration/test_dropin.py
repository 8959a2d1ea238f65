"""Drop-in fidelity: ``jobflow_cache.run_locally`` behaves exactly like ``jobflow.run_locally``.

Every scenario (an equivalent of what jobflow's own ``tests/managers/test_local.py`` exercises)
is built three times, with all-new uuids each time, and run:

``ref``
    by ``jobflow.run_locally`` into a fresh JobStore;
``cold``
    by ``jobflow_cache.run_locally`` into a fresh JobStore with an empty cache;
``warm``
    by ``jobflow_cache.run_locally`` into a fresh JobStore with the cache the cold run filled
    (opened anew, as another process would).

The three runs must agree on the exception raised, the ``{uuid: {index: Response}}`` return value,
the JobStore documents (and those of its additional store), the loaded outputs, the jobflow log
and the run folders; uuids, timestamps and run-folder paths are normalised, and the cache's own
``metadata["jobflow_cache"]`` record is ignored. The warm run must execute nothing but the jobs
that failed, and serve every stored job from the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jobflow
import pytest
from jobflow import Flow, Job, JobConfig, JobOrder, JobStore, OnMissing, Response
from jobflow.core.reference import OutputReference
from maggma.stores import MemoryStore
from monty.json import MSONable
from pydantic import BaseModel

import jobflow_cache
from jobflow_cache import CacheStore, SQLiteBackend
from jobflow_cache.execution.cache import META_KEY
from tests.integration import dropin_jobs as dj

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
JOB_DIR_RE = re.compile(r"job_[0-9]{4}(?:-[0-9]+)+")
PHASES = ("ref", "cold", "warm")

#: Placeholder for ``root_dir`` in a scenario: replaced by ``<phase folder>/jobs``.
ROOT = object()

Runner = Callable[..., dict]
Build = Callable[[Callable[[Any], Any]], Any]


# -- scenarios ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scenario:
    """A flow builder and the ``run_locally`` arguments to run it with.

    ``build`` receives ``prior``: a function running a flow beforehand into the same store with
    the same runner (to create external references).
    """

    build: Build
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: jobs (as counted by ``executed``) that a warm run re-executes *by design*, with the reason
    warm_reruns: frozenset[str] = frozenset()
    #: jobs the cache never records (outcome ``uncacheable``), so every run executes them
    uncached: frozenset[str] = frozenset()


def _connected() -> Flow:
    first = dj.append_end("12345")
    second = dj.append_end(first.output)
    return Flow([first, second], second.output, "Connected Flow")


def _nested() -> Flow:
    flow1, flow2 = _connected(), _connected()
    flow2.jobs[0].function_args = (flow1.jobs[1].output,)
    return Flow([flow1, flow2], flow2.output)


def _linear(first: Job, message: str = "12345") -> Flow:
    simple = dj.append_end(message)
    return Flow([first, simple], simple.output, order=JobOrder.LINEAR)


def _simple_flow() -> Flow:
    simple = dj.append_end("12345")
    return Flow([simple], simple.output)


def _stop_children() -> Flow:
    stop = dj.stop_children_now()
    skipped = dj.append_end(stop.output)
    simple = dj.append_end("12345")
    return Flow([stop, skipped, simple], simple.output)


def _error_flow() -> Flow:
    error = dj.fail_now()
    child = dj.append_end(error.output)
    grandchild = dj.append_end(child.output)
    return Flow([error, child, grandchild])


def _partial_error_flow() -> Flow:
    error = dj.fail_now()
    child = dj.append_end(error.output)
    independent = dj.append_end("independent")
    after = dj.append_end(independent.output)
    return Flow([error, child, independent, after])


def _missing(on_missing: OnMissing, how: str) -> Flow:
    """A failing job whose child handles the missing reference with ``on_missing``."""
    error = dj.fail_now()
    child = dj.describe(error.output)
    grandchild = dj.echo(child.output)
    flow = Flow([error, child, grandchild])
    if how == "config":
        child.config = JobConfig(on_missing_references=on_missing)
    else:
        flow.update_config({"on_missing_references": on_missing}, name_filter="describe")
    return flow


def _missing_pass_echo() -> Flow:
    """With PASS the child gets the OutputReference itself, and returns it as its output."""
    error = dj.fail_now()
    child = dj.echo(error.output)
    child.update_config({"on_missing_references": OnMissing.PASS})
    return Flow([error, child])


def _external(prior: Callable[[Any], Any]) -> Flow:
    upstream = prior(dj.append_end("external"))
    return Flow([dj.append_end(upstream.output)])


def _files_flow() -> Flow:
    written = dj.write_here("a")
    read = dj.read_here(written.output)
    return Flow([written, read, dj.append_end("x")])


def _implicit_replace() -> Flow:
    replaced = dj.returns_job("m")
    return Flow([replaced, dj.append_end(replaced.output)])


def _implicit_replace_list() -> Flow:
    replaced = dj.returns_job_list(3)
    return Flow([replaced, dj.echo(replaced.output)])


def _dynamic_error(kind: Callable[[Any], Job]) -> Flow:
    dynamic = kind(1)
    return Flow([dynamic, dj.append_end("after")], order=JobOrder.LINEAR)


def _dynamic_error_child(kind: Callable[[Any], Job]) -> Flow:
    """A child of the dynamic job that fails: it runs or not as jobflow decides."""
    dynamic = kind(2)
    return Flow([dynamic, dj.echo(dynamic.output)])


def _values() -> Flow:
    return Flow([dj.returns_none(), dj.returns_dict(), dj.returns_list(), dj.own_uuid()])


def _schema_and_data() -> Flow:
    spec = dj.spectrum("s", 4)
    items = dj.echo(spec.output.items)
    label = dj.append_end(spec.output.label)
    converted = dj.spectrum_from_dict("d")
    big = dj.big_list(6)
    total = dj.echo(big.output)
    return Flow([spec, items, label, converted, big, total])


def _dynamic_updates() -> Flow:
    """Metadata and name updates on the flow reach the jobs a dynamic job creates."""
    flow = _linear(dj.sum_replace_and_detour(5, 6))
    flow.update_metadata({"campaign": "x"})
    flow.append_name(" (tagged)")
    return flow


def _maker() -> Flow:
    first = dj.ScaleMaker().make(2)
    other = dj.ScaleMaker(name="scale5", factor=5).make(2)  # same input, other Maker fields
    chained = dj.ScaleMaker(factor=4).make(first.output)
    return Flow([first, other, chained], chained.output)


def _chain(n: int) -> Flow:
    jobs = [dj.append_end("c")]
    for _ in range(n - 1):
        jobs.append(dj.append_end(jobs[-1].output))
    return Flow(jobs, jobs[-1].output)


def _fanout(n: int) -> Flow:
    source = dj.returns_dict()
    children = [dj.echo({"i": i, "v": source.output["nested"]}) for i in range(n)]
    return Flow([source, *children])


def _dynamic(fan: Job) -> Flow:
    """A dynamic job, and a job that gathers its outputs (through its replaced output)."""
    return Flow([fan, dj.echo(fan.output)])


def _datetimes(n: int) -> Flow:
    source = dj.precise_times()
    children = [dj.echo({"i": i, "t": source.output}) for i in range(n)]
    return Flow([source, *children, dj.echo(source.output["aware"])])


def _data_store(n: int) -> Flow:
    jobs = []
    for i in range(n):
        data = dj.big_list(i + 1)
        jobs += [data, dj.echo({"i": i, "data": data.output})]
    return Flow(jobs)


def _diversions(n: int) -> Flow:
    jobs = [dj.sum_with_addition(i, 1000) for i in range(n)]
    jobs += [dj.sum_with_detour(i, 5000) for i in range(n)]
    jobs += [dj.sum_replace_with_flow(i, 9000) for i in range(n)]
    return Flow(jobs)


def _external_many(prior: Callable[[Any], Any], n: int) -> Flow:
    upstream = prior(dj.returns_dict())
    return Flow([dj.echo({"i": i, "v": upstream.output["a"]}) for i in range(n)])


ENSURE = {"ensure_success": True}
RAISE = {"raise_immediately": True}

SCENARIOS: dict[str, Scenario] = {
    # jobflow's tests/managers/test_local.py equivalents
    "simple_job": Scenario(lambda _: dj.append_end("12345")),
    "job_list": Scenario(lambda _: [dj.append_end("a"), dj.append_end("b")]),
    "simple_flow": Scenario(lambda _: _simple_flow()),
    "connected_flow": Scenario(lambda _: _connected()),
    "nested_flow": Scenario(lambda _: _nested()),
    "addition_flow": Scenario(
        lambda _: (lambda j: Flow([j], j.output))(dj.sum_with_addition(5, 6))
    ),
    "addition_job": Scenario(lambda _: dj.sum_with_addition(5, 6)),
    "detour_flow": Scenario(lambda _: _linear(dj.sum_with_detour(5, 6))),
    "detour_job": Scenario(lambda _: dj.sum_with_detour(5, 6)),
    "replace_flow": Scenario(lambda _: _linear(dj.sum_with_replace(5, 6))),
    "replace_job": Scenario(lambda _: dj.sum_with_replace(5, 6)),
    "replace_job_with_flow": Scenario(lambda _: dj.sum_replace_with_flow(5, 6)),
    "replace_flow_nested": Scenario(lambda _: _linear(dj.sum_replace_with_flow(5, 6))),
    "replace_and_detour_flow": Scenario(lambda _: _linear(dj.sum_replace_and_detour(5, 6))),
    "implicit_replace": Scenario(lambda _: _implicit_replace()),
    "implicit_replace_list": Scenario(lambda _: _implicit_replace_list()),
    "stop_jobflow_flow": Scenario(lambda _: _linear(dj.stop_jobflow_now())),
    "stop_jobflow_job": Scenario(lambda _: dj.stop_jobflow_now()),
    "stop_jobflow_ensure_success": Scenario(lambda _: _linear(dj.stop_jobflow_now()), ENSURE),
    "stop_children_flow": Scenario(lambda _: _stop_children()),
    "stop_children_ensure_success": Scenario(lambda _: _stop_children(), ENSURE),
    "detour_stop_flow": Scenario(lambda _: _linear(dj.sum_detour_then_stop(5, 6))),
    "stored_data_flow": Scenario(lambda _: Flow([dj.stored_data_job("12345")])),
    # errors, ensure_success and raise_immediately
    "error_flow": Scenario(lambda _: _error_flow()),
    "error_flow_ensure_success": Scenario(lambda _: _error_flow(), ENSURE),
    "error_flow_raise_immediately": Scenario(lambda _: _error_flow(), RAISE),
    "error_flow_both": Scenario(lambda _: _error_flow(), {**ENSURE, **RAISE}),
    "partial_error_flow": Scenario(lambda _: _partial_error_flow()),
    "partial_error_raise_immediately": Scenario(lambda _: _partial_error_flow(), RAISE),
    "error_job_alone": Scenario(lambda _: dj.fail_now()),
    "replace_error": Scenario(lambda _: _dynamic_error(dj.replace_with_failing)),
    "replace_error_ensure_success": Scenario(
        lambda _: _dynamic_error(dj.replace_with_failing), ENSURE
    ),
    "replace_error_raise_immediately": Scenario(
        lambda _: _dynamic_error(dj.replace_with_failing), RAISE
    ),
    "replace_error_child": Scenario(lambda _: _dynamic_error_child(dj.replace_with_failing)),
    "detour_error": Scenario(lambda _: _dynamic_error(dj.detour_with_failing)),
    "detour_error_ensure_success": Scenario(
        lambda _: _dynamic_error(dj.detour_with_failing), ENSURE
    ),
    "detour_error_raise_immediately": Scenario(
        lambda _: _dynamic_error(dj.detour_with_failing), RAISE
    ),
    "detour_error_child": Scenario(lambda _: _dynamic_error_child(dj.detour_with_failing)),
    "addition_error": Scenario(lambda _: _dynamic_error(dj.addition_with_failing)),
    "addition_error_raise_immediately": Scenario(
        lambda _: _dynamic_error(dj.addition_with_failing), RAISE
    ),
    "addition_error_child": Scenario(lambda _: _dynamic_error_child(dj.addition_with_failing)),
    "schema_violation": Scenario(lambda _: Flow([dj.spectrum_wrong(), dj.append_end("x")])),
    "schema_violation_raise_immediately": Scenario(lambda _: dj.spectrum_wrong(), RAISE),
    "unserializable_output": Scenario(lambda _: Flow([dj.unserializable(), dj.append_end("x")])),
    "unserializable_raise_immediately": Scenario(lambda _: dj.unserializable(), RAISE),
    # on_missing_references of a child of a failing job
    "missing_error_default": Scenario(lambda _: _missing(OnMissing.ERROR, "config")),
    "missing_none_jobconfig": Scenario(lambda _: _missing(OnMissing.NONE, "config")),
    "missing_none_update_config": Scenario(lambda _: _missing(OnMissing.NONE, "update")),
    "missing_pass_jobconfig": Scenario(lambda _: _missing(OnMissing.PASS, "config")),
    "missing_pass_update_config": Scenario(lambda _: _missing(OnMissing.PASS, "update")),
    "missing_pass_echo": Scenario(lambda _: _missing_pass_echo()),
    # external references
    "external_allowed": Scenario(_external, {"allow_external_references": True}),
    "external_refused": Scenario(_external),
    # run folders
    "folders_root_dir": Scenario(
        lambda _: _files_flow(), {"create_folders": True, "root_dir": ROOT}
    ),
    "folders_cwd": Scenario(lambda _: _files_flow(), {"create_folders": True}),
    # read_here's input is the run folder's path; without create_folders it is not a job's own
    # folder, so it is hashed as it is, and each phase runs in another folder: a miss by design
    # (test_shared_root_dir_is_served covers the same flow run twice in one root_dir)
    "root_dir_only": Scenario(
        lambda _: _files_flow(), {"root_dir": ROOT}, warm_reruns=frozenset({"read_here"})
    ),
    "folders_dynamic": Scenario(
        lambda _: _linear(dj.sum_replace_and_detour(5, 6)),
        {"create_folders": True, "root_dir": ROOT},
    ),
    # return values, output schemas, additional stores, Makers
    "dynamic_updates": Scenario(lambda _: _dynamic_updates()),
    "values": Scenario(lambda _: _values()),
    "msonable_output": Scenario(lambda _: dj.returns_objects()),
    "tuple_output": Scenario(lambda _: dj.returns_tuple()),
    "int_keys_output": Scenario(lambda _: dj.returns_int_keys()),
    "schema_and_data": Scenario(lambda _: _schema_and_data()),
    "maker": Scenario(lambda _: _maker()),
    # large flows, compared document by document (jobflow_cache.local indexes the MemoryStore)
    "large_chain": Scenario(lambda _: _chain(300)),
    "large_fanout": Scenario(lambda _: _fanout(300)),
    "large_dynamic": Scenario(lambda _: _dynamic(dj.fan_replace(300))),
    "large_nested_dynamic": Scenario(lambda _: _dynamic(dj.nested_fan(10, 30))),
    "large_diversions": Scenario(lambda _: _diversions(40)),
    "large_datetimes": Scenario(lambda _: _datetimes(50)),
    "large_data_store": Scenario(lambda _: _data_store(50)),
    # a job that reads the JobStore is not cached unless opted in (issue 11): it runs every time
    "expose_store": Scenario(
        lambda _: (lambda s: Flow([s, dj.read_store(s.output, s.uuid)]))(dj.returns_dict()),
        warm_reruns=frozenset({"read_store"}),
        uncached=frozenset({"read_store"}),
    ),
    "large_external": Scenario(
        lambda prior: _external_many(prior, 100), {"allow_external_references": True}
    ),
}


# -- running one phase ----------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # jobflow's own records; the cache's "Served from cache" lines (logger jobflow.cache)
        # are checked by test_log_true_prints_like_jobflow
        if record.name != "jobflow.cache":
            self.records.append(record)


@dataclass
class Run:
    """Everything one phase produced."""

    root: Path
    flow: Any
    store: JobStore
    responses: dict[str, dict[int, Response]] | None
    error: BaseException | None
    logs: list[logging.LogRecord]
    executed: Counter[str]
    warnings: list[str]


def new_store() -> JobStore:
    return JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})


def execute(scenario: Scenario, runner: Runner, root: Path, counts: Any) -> Run:
    """Build the scenario's flow (fresh uuids) and run it in ``root`` with ``runner``."""
    root.mkdir(parents=True)
    store = new_store()
    kwargs = {"log": False, "store": store, **scenario.kwargs}
    if kwargs.get("root_dir") is ROOT:
        kwargs["root_dir"] = root / "jobs"
    handler = _Records()
    logger = logging.getLogger("jobflow")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    responses, error = None, None
    try:
        with contextlib.chdir(root), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")

            def prior(flow: Any) -> Any:
                runner(flow, store=store, log=False, ensure_success=True)
                return flow

            flow = scenario.build(prior)
            counts.reset()
            handler.records.clear()
            try:
                responses = runner(flow, **kwargs)
            except Exception as err:  # compared with jobflow's below
                error = err
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return Run(
        root=root,
        flow=flow,
        store=store,
        responses=responses,
        error=error,
        logs=handler.records,
        executed=counts(),
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
    )


def cache_at(folder: Path) -> CacheStore:
    """A cache on a SQLite file; a second call opens the same cache anew."""
    return CacheStore(SQLiteBackend(folder / "cache.sqlite"), folder / "objects")


def run_three(name: str, tmp_path: Path, counts: Any) -> dict[str, Run]:
    scenario = SCENARIOS[name]

    def cached(cache: CacheStore) -> Runner:
        return lambda flow, **kw: jobflow_cache.run_locally(flow, cache=cache, **kw)

    cache_dir = tmp_path / "cache"
    return {
        "ref": execute(scenario, jobflow.run_locally, tmp_path / "ref", counts),
        "cold": execute(scenario, cached(cache_at(cache_dir)), tmp_path / "cold", counts),
        "warm": execute(scenario, cached(cache_at(cache_dir)), tmp_path / "warm", counts),
    }


# -- normalising ----------------------------------------------------------------------------------
def uuid_names(run: Run) -> dict[str, str]:
    """uuid -> name of every job and flow of the run (a replaced job keeps its first name)."""
    names: dict[str, str] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, Flow):
            names.setdefault(obj.uuid, f"flow {obj.name}")
            for child in obj.jobs:
                walk(child)
        elif isinstance(obj, Job):
            names.setdefault(obj.uuid, obj.name)
        elif isinstance(obj, list | tuple):
            for child in obj:
                walk(child)

    walk(run.flow)
    for doc in sorted(run.store.query({}), key=lambda d: d["index"]):
        names.setdefault(doc["uuid"], doc["name"])
    for by_index in (run.responses or {}).values():
        for response in by_index.values():
            for part in (response.replace, response.detour, response.addition):
                walk(part)
    return names


class Normalizer:
    """Turns values into comparable structures: uuids become job names, paths become roots.

    Types are kept (a tuple never equals a list, an int key never equals a str key); a uuid not
    belonging to this run becomes ``<uuid>``, a path of another phase ``<other-root>``.
    """

    def __init__(self, run: Run, all_roots: list[Path]) -> None:
        self.names = uuid_names(run)
        self.root = str(run.root)
        self.others = [str(r) for r in all_roots if str(r) != self.root]

    def text(self, value: str) -> str:
        value = value.replace(self.root, "<root>")
        for other in self.others:
            value = value.replace(other, "<other-root>")
        value = JOB_DIR_RE.sub("job_<time>", value)
        return UUID_RE.sub(lambda m: f"<{self.names.get(m.group(0), 'uuid')}>", value)

    def __call__(self, value: Any) -> Any:
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Path):
            return ("Path", self.text(str(value)))
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if isinstance(value, OutputReference):
            # jobflow's own equality ignores whether attributes are tuples or lists (decoded)
            attributes = tuple(tuple(self(part) for part in a) for a in value.attributes)
            schema = getattr(value.output_schema, "__name__", None)
            return ("OutputReference", self(value.uuid), attributes, schema)
        if isinstance(value, Flow):
            return ("Flow", value.name, [self(j) for j in value.jobs], self(value.output))
        if isinstance(value, Job):
            metadata = {k: v for k, v in value.metadata.items() if k != META_KEY}
            # a deserialized Job holds the @job wrapper, a fresh one the raw function: jobflow
            # calls ``getattr(function, "original", function)``, so compare that
            function = getattr(value.function, "original", value.function)
            return (
                "Job",
                value.name,
                type(function).__name__,
                getattr(function, "__module__", None),
                getattr(function, "__qualname__", None),
                value.index,
                self(value.uuid),
                self(value.function_args),
                self(value.function_kwargs),
                self(metadata),
                self(value.hosts),
            )
        if isinstance(value, BaseModel):
            return (type(value).__name__, self(value.model_dump()))
        if isinstance(value, MSONable):
            return (type(value).__name__, self(value.as_dict()))
        return (type(value).__name__, self.text(repr(value)))

    def response(self, response: Response) -> dict[str, Any]:
        return {
            "class": type(response).__name__,
            "output": self(response.output),
            "output_type": type(response.output).__name__,
            "stop_children": response.stop_children,
            "stop_jobflow": response.stop_jobflow,
            "stored_data": self(response.stored_data),
            "replace": self(response.replace),
            "detour": self(response.detour),
            "addition": self(response.addition),
            "job_dir": self(response.job_dir),
        }


def _multiset(items: list[Any]) -> list[Any]:
    return sorted(items, key=repr)


def _condense(message: str) -> str:
    """A log message with its traceback reduced to the exception line."""
    if "Traceback" not in message:
        return message
    lines = [line for line in message.splitlines() if line.strip()]
    return f"{lines[0]} ... {lines[-1]}"


def summarize(run: Run, all_roots: list[Path]) -> dict[str, Any]:
    """What must be identical between jobflow's run and ours, normalised."""
    norm = Normalizer(run, all_roots)
    responses = run.responses
    summary: dict[str, Any] = {
        "error": None if run.error is None else (type(run.error), norm(str(run.error))),
        "returned_type": type(responses).__name__,
    }
    if responses is not None:
        summary["shape"] = sorted(tuple(sorted(by_index)) for by_index in responses.values())
        summary["named_shape"] = sorted(
            (norm.names.get(uuid, "?"), tuple(sorted(by_index)))
            for uuid, by_index in responses.items()
        )
        summary["index_types"] = sorted(
            {type(i).__name__ for by_index in responses.values() for i in by_index}
        )
        summary["responses"] = _multiset(
            [
                (norm.names.get(uuid, "?"), index, norm.response(response))
                for uuid, by_index in responses.items()
                for index, response in by_index.items()
            ]
        )
    docs = []
    for doc in run.store.query({}):
        doc = {k: v for k, v in doc.items() if k not in {"_id", "completed_at"}}
        doc["metadata"] = {k: v for k, v in (doc.get("metadata") or {}).items() if k != META_KEY}
        docs.append(norm(doc))
    summary["docs"] = _multiset(docs)
    summary["data_docs"] = _multiset(
        [
            norm({k: v for k, v in doc.items() if k != "_id"})
            for doc in run.store.additional_stores["data"].query({})
        ]
    )
    summary["loaded_outputs"] = _multiset(
        [
            (norm(doc["uuid"]), doc["index"], norm(loaded(run.store, doc["uuid"], doc["index"])))
            for doc in run.store.query({}, properties=["uuid", "index"])
        ]
    )
    summary["logs"] = [
        (record.name, record.levelname, norm(_condense(record.getMessage()))) for record in run.logs
    ]
    summary["folders"] = folder_listing(run.root)
    # run_locally resolves the jobs' arguments in place: the flow object afterwards must match too
    summary["flow_after"] = norm(run.flow)
    return summary


def loaded(store: JobStore, uuid: str, index: int) -> Any:
    """The output as ``JobStore.get_output`` returns it (additional stores loaded)."""
    try:
        return store.get_output(uuid, which=index, load=True, on_missing=OnMissing.PASS)
    except Exception as err:  # compared between phases like any value
        return ("error", type(err).__name__, str(err))


def folder_listing(root: Path) -> dict[str, Any]:
    """The job folders under ``root`` and the files in them (relative paths and contents)."""

    def files(folder: Path) -> tuple[tuple[str, str], ...]:
        return tuple(
            sorted(
                (str(p.relative_to(folder)), hashlib.sha256(p.read_bytes()).hexdigest()[:12])
                for p in folder.rglob("*")
                if p.is_file()
                and not any(part.startswith("job_") for part in p.relative_to(folder).parts[:-1])
            )
        )

    job_dirs = sorted(p for p in root.rglob("job_*") if p.is_dir())
    return {
        "job_dirs": sorted(str(p.parent.relative_to(root)) for p in job_dirs),
        "per_job_dir": _multiset([files(d) for d in job_dirs]),
        "outside_job_dirs": files(root),
    }


# -- the parametrized harness ---------------------------------------------------------------------
def compare(runs: dict[str, Run]) -> dict[str, dict[str, Any]]:
    roots = [run.root for run in runs.values()]
    summaries = {phase: summarize(run, roots) for phase, run in runs.items()}
    ref = summaries["ref"]
    for phase in ("cold", "warm"):
        ours = summaries[phase]
        assert ours.keys() == ref.keys(), f"{phase}: returned {ours['returned_type']}"
        for key in ref:
            assert ours[key] == ref[key], f"{phase} run differs from jobflow in {key!r}"
    return summaries


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_same_as_jobflow_cold_and_warm(name, tmp_path, counts):
    """Exception, return value, JobStore, additional store, log and folders all match jobflow."""
    runs = run_three(name, tmp_path, counts)
    compare(runs)
    # a cold run executes exactly what jobflow executes (no scenario repeats a call)
    assert runs["cold"].executed == runs["ref"].executed
    assert runs["ref"].executed or runs["ref"].error is not None, "the scenario runs something"


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_warm_run_serves_what_succeeded_cold(name, tmp_path, counts):
    """The warm run re-executes only the jobs that failed; every stored job is a cache hit."""
    scenario = SCENARIOS[name]
    runs = run_three(name, tmp_path, counts)
    cold, warm = runs["cold"], runs["warm"]
    for doc in cold.store.query({}):
        allowed = {"uncacheable"} if doc["name"] in scenario.uncached else {"miss", "disabled"}
        assert doc["metadata"][META_KEY]["outcome"] in allowed, doc["name"]
    failed = Counter({k: v for k, v in cold.executed.items() if k.startswith("fail")})
    rerun = Counter({k: v for k, v in warm.executed.items() if k in scenario.warm_reruns})
    assert warm.executed == failed + rerun, f"warm run executed {warm.executed - failed}"
    for doc in warm.store.query({}):
        record = doc["metadata"].get(META_KEY, {})
        expected = "uncacheable" if doc["name"] in scenario.uncached else "miss"
        rerun_by_design = record.get("outcome") == expected and any(
            doc["name"].startswith(n) for n in scenario.warm_reruns
        )
        # store_inputs (jobflow's helper gathering a replaced flow's outputs) is never cached
        if doc["name"] == "store_inputs" or rerun_by_design:
            continue
        assert record.get("outcome") == "hit", f"{doc['name']} {doc['index']}: {record}"


# -- targeted checks that the generic comparison does not spell out -------------------------------
def test_return_value_is_responses_by_uuid_and_index(tmp_path, counts):
    runs = run_three("replace_flow", tmp_path, counts)
    for phase in PHASES:
        run = runs[phase]
        replace, simple = run.flow.jobs
        assert isinstance(run.responses, dict)
        assert set(run.responses) == {replace.uuid, simple.uuid}, phase
        assert sorted(run.responses[replace.uuid]) == [1, 2]
        first, second = run.responses[replace.uuid][1], run.responses[replace.uuid][2]
        assert all(isinstance(r, Response) for r in (first, second))
        assert first.output == 11
        assert first.replace is not None
        assert second.output == "11_end"
        assert run.responses[simple.uuid][1].output == "12345_end"
        assert first.job_dir == run.root
        assert run.store.query_one({"uuid": replace.uuid, "index": 2})["output"] == "11_end"


def test_warm_run_serves_with_source_uuids(tmp_path, counts):
    runs = run_three("connected_flow", tmp_path, counts)
    cold_uuids = [j.uuid for j in runs["cold"].flow.jobs]
    warm_jobs = runs["warm"].flow.jobs
    for cold_uuid, warm_job in zip(cold_uuids, warm_jobs):
        doc = runs["warm"].store.query_one({"uuid": warm_job.uuid})
        assert doc["metadata"][META_KEY]["source_uuid"] == cold_uuid
        assert set(doc["metadata"][META_KEY]) == {"digest", "outcome", "scheme", "source_uuid"}


def test_replace_flow_nested_keeps_unresolved_references(tmp_path, counts):
    """Like jobflow's test_replace_flow_nested: index 2 stores references to the new jobs."""
    runs = run_three("replace_flow_nested", tmp_path, counts)
    for phase in PHASES:
        run = runs[phase]
        uuid = run.flow.jobs[0].uuid
        second = run.responses[uuid][2]
        assert isinstance(second.output["first"], OutputReference), phase
        new_uuids = {j.uuid for j in run.responses[uuid][1].replace.jobs}
        assert second.output["first"].uuid in new_uuids, f"{phase}: reference to a foreign job"
        stored = run.store.query_one({"uuid": uuid, "index": 2})["output"]
        assert stored["first"]["@class"] == "OutputReference"
        assert run.store.get_output(stored["second"]["uuid"]) == "11_end_end"


def test_create_folders_one_folder_per_job(tmp_path, counts):
    runs = run_three("folders_root_dir", tmp_path, counts)
    for phase in PHASES:
        run = runs[phase]
        folders = sorted((run.root / "jobs").glob("job_*"))
        assert len(folders) == 3, phase
        dirs = {r.job_dir for by_index in run.responses.values() for r in by_index.values()}
        assert dirs == set(folders), phase
        writer = run.store.query_one({"name": "write_here"})["output"]
        assert Path(writer["dir_name"]).parent == run.root / "jobs", phase
        assert (Path(writer["dir_name"]) / "a.txt").read_text() == "aaa", phase
        reader = run.store.query_one({"name": "read_here"})["output"]
        assert reader == "aaa"
    assert not list(runs["warm"].root.glob("*.txt")), "nothing is written outside the folders"


def test_shared_root_dir_is_served(tmp_path, counts):
    """The root_dir_only flow run twice into one root_dir: the second run executes nothing."""
    cache = tmp_path / "cache"
    for attempt in range(2):
        store = new_store()
        flow = _files_flow()
        with contextlib.chdir(tmp_path), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            jobflow_cache.run_locally(
                flow,
                log=False,
                store=store,
                root_dir=tmp_path / "jobs",
                ensure_success=True,
                cache=cache_at(cache),
            )
        if attempt == 0:
            assert counts() == {"write_here": 1, "read_here": 1, "append_end": 1}
            counts.reset()
    assert counts() == {}
    assert store.get_output(flow.jobs[1].uuid) == "aaa"


def test_constant_path_in_output_is_not_rewritten(tmp_path, counts):
    """A path that reaches the output from the job's *input* is not the run folder's path.

    The cold run happens in folder ``a`` and gets an absolute path inside ``a`` as input; the warm
    run (the same call, from folder ``b``) must return that same path, as jobflow does.
    """
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    constant = str(a / "input.txt")
    results = {}
    for phase, folder, runner in (
        ("ref", b, jobflow.run_locally),
        ("cold", a, lambda f, **kw: jobflow_cache.run_locally(f, cache=cache_at(tmp_path), **kw)),
        ("warm", b, lambda f, **kw: jobflow_cache.run_locally(f, cache=cache_at(tmp_path), **kw)),
    ):
        store = new_store()
        job = dj.echo({"path": constant})
        with contextlib.chdir(folder):
            responses = runner(job, log=False, store=store)
        results[phase] = (responses[job.uuid][1].output, store.get_output(job.uuid))
    assert counts() == {"echo": 2}, "jobflow and the cold run execute, the warm run is served"
    assert results["cold"] == results["ref"] == ({"path": constant}, {"path": constant})
    assert results["warm"] == results["ref"], "the served output points into the warm folder"


def test_external_reference_refused_like_jobflow(tmp_path, counts):
    runs = run_three("external_refused", tmp_path, counts)
    for phase in PHASES:
        assert type(runs[phase].error) is ValueError, phase
        assert "allow_external_references" in str(runs[phase].error)
        assert runs[phase].store.count() == 1, "only the prior run's output is stored"


def test_raise_immediately_propagates_the_original_exception(tmp_path, counts):
    runs = run_three("replace_error_raise_immediately", tmp_path, counts)
    for phase in PHASES:
        err = runs[phase].error
        assert type(err) is KeyError, f"{phase}: {err!r}"
        assert err.args == ("no such key: 1",)


def test_ensure_success_message(tmp_path, counts):
    runs = run_three("error_flow_ensure_success", tmp_path, counts)
    for phase in PHASES:
        err = runs[phase].error
        assert type(err) is RuntimeError
        assert str(err) == "Flow did not finish running successfully"


def test_stored_data_warning_is_logged(tmp_path, counts):
    runs = run_three("stored_data_flow", tmp_path, counts)
    for phase in PHASES:
        messages = [r.getMessage() for r in runs[phase].logs if r.levelno == logging.WARNING]
        assert messages == ["Response.stored_data is not supported with local manager."], phase


def test_failed_job_logged_like_jobflow(tmp_path, counts):
    runs = run_three("error_flow", tmp_path, counts)
    for phase in PHASES:
        failures = [
            r.getMessage() for r in runs[phase].logs if "failed with exception" in r.getMessage()
        ]
        assert len(failures) == 1, phase
        assert failures[0].startswith("fail_now failed with exception:\nTraceback")
        assert failures[0].rstrip().endswith("ValueError: errored")
        assert runs[phase].responses == {}


def test_cache_leaves_job_run_untouched_after_an_error(tmp_path, counts):
    """raise_immediately leaves run_locally by an exception: Job.run must be jobflow's again."""
    original = Job.run
    run_three("error_flow_raise_immediately", tmp_path, counts)
    assert Job.run is original


def test_log_true_prints_like_jobflow(tmp_path, counts, capsys):
    """log=True configures jobflow's logger and prints the same lines (times stripped)."""

    def printed(runner: Runner, folder: Path) -> list[str]:
        folder.mkdir()
        with contextlib.chdir(folder):
            runner(
                _linear(dj.sum_with_detour(5, 6)),
                store=new_store(),
                log="%(levelname)s %(message)s",
            )
        names: dict[str, str] = {}
        lines = []
        for line in capsys.readouterr().out.splitlines():
            lines.append(
                UUID_RE.sub(lambda m: names.setdefault(m.group(0), f"u{len(names)}"), line)
            )
        return lines

    cache = cache_at(tmp_path / "cache")
    logger = logging.getLogger("jobflow")
    handlers, level = list(logger.handlers), logger.level
    try:
        ref = printed(jobflow.run_locally, tmp_path / "ref")
        cold = printed(
            lambda f, **kw: jobflow_cache.run_locally(f, cache=cache, **kw), tmp_path / "cold"
        )
        warm = printed(
            lambda f, **kw: jobflow_cache.run_locally(f, cache=cache_at(tmp_path / "cache"), **kw),
            tmp_path / "warm",
        )
    finally:
        logger.handlers, logger.level = handlers, level
    assert ref[0] == "INFO Started executing jobs locally"
    assert ref[-1] == "INFO Finished executing jobs locally"
    # jobflow's own lines unchanged, then one line more: the cache's summary of the run
    assert cold[:-1] == ref
    assert (
        cold[-1] == "INFO Cache summary - 3 jobs: 0 served from cache, 3 executed; 0.0 s of "
        "compute saved"
    )
    # a warm run prints jobflow's own lines unchanged, plus one line for each served job
    served = [line for line in warm if line.startswith("INFO Served from cache - ")]
    assert warm[-1].startswith("INFO Cache summary - ")
    assert [line for line in warm[:-1] if line not in served] == ref
    finished = [
        line
        for line in ref
        if line.startswith("INFO Finished job - ") and "store_inputs" not in line
    ]
    assert len(served) == len(finished) > 0, "every job (but jobflow's store_inputs) is served"


def test_log_false_prints_nothing(tmp_path, counts, capsys):
    for phase, runner in (
        ("ref", jobflow.run_locally),
        ("cold", lambda f, **kw: jobflow_cache.run_locally(f, cache=cache_at(tmp_path), **kw)),
        ("warm", lambda f, **kw: jobflow_cache.run_locally(f, cache=cache_at(tmp_path), **kw)),
    ):
        folder = tmp_path / phase
        folder.mkdir()
        with contextlib.chdir(folder):
            responses = runner(_simple_flow(), store=new_store(), log=False)
        assert len(responses) == 1
        assert capsys.readouterr().out == "", phase


def test_no_store_uses_jobflow_default(tmp_path, counts, monkeypatch):
    """store=None: both use SETTINGS.JOB_STORE and return the same responses."""
    monkeypatch.chdir(tmp_path)
    cache = cache_at(tmp_path / "cache")
    for runner in (
        jobflow.run_locally,
        lambda f, **kw: jobflow_cache.run_locally(f, cache=cache, **kw),
        lambda f, **kw: jobflow_cache.run_locally(f, cache=cache, **kw),
    ):
        job = dj.append_end("12345")
        responses = runner(job, log=False)
        assert list(responses) == [job.uuid]
        assert responses[job.uuid][1].output == "12345_end"


def test_warnings_as_errors_do_not_change_the_job_error(tmp_path, counts, monkeypatch):
    """Under ``-W error`` (this project's own pytest setting) the job's exception stays jobflow's.

    jobflow rejects a non-MSONable output with a RuntimeError; the cache must not turn that into
    a different exception by warning about the result it could not record.
    """
    monkeypatch.chdir(tmp_path)
    errors = {}
    for phase, runner in (
        ("ref", jobflow.run_locally),
        ("cold", lambda f, **kw: jobflow_cache.run_locally(f, cache=cache_at(tmp_path), **kw)),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.simplefilter("ignore", FutureWarning)  # monty's cd, used by jobflow
            with pytest.raises(Exception) as info:  # the type is compared below
                runner(dj.unserializable(), store=new_store(), log=False, raise_immediately=True)
        errors[phase] = (type(info.value), str(info.value))
    assert errors["ref"][0] is RuntimeError
    assert errors["cold"] == errors["ref"]
