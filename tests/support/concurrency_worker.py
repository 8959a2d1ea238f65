"""Worker process of tests/execution/test_concurrency.py: runs one flow of ``@cached_job`` jobs.

Started as ``python -c "from tests.support.concurrency_worker import main; main()" SPEC.json`` (so
the
jobs below have the same import path, ``tests.support.concurrency_worker``, in every process). The
spec names the jobs of the flow, a barrier (the worker says it is ready, then waits for the
parent's go file, so all workers really start together) and where to write the result: every
job's uuid, digest, cache outcome and output as the JobStore holds them, plus the warnings
the run raised. The cache is whatever the ``JOBFLOW_CACHE_*`` environment configures.

Jobs count their executions in ``JFC_COUNTS_FILE`` (as tests/support/jobs.py does) and note their
start and end, with pid and time, in ``JFC_EVENTS_FILE``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from jobflow import CURRENT_JOB, Flow, Job, JobStore
from maggma.stores import MemoryStore

from jobflow_cache import cached_job, run_locally
from tests.support.jobs import executed

__all__ = ["combine", "gated", "main", "run", "square"]

logger = logging.getLogger(__name__)


def _event(kind: str, name: str) -> None:
    """Append ``kind pid time name`` to ``JFC_EVENTS_FILE`` (one short write: atomic)."""
    path = os.environ.get("JFC_EVENTS_FILE")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{kind} {os.getpid()} {time.time():.6f} {name}\n")


@cached_job
def square(i: int) -> dict[str, Any]:
    """A small job that writes one file into its run folder."""
    executed(f"square-{i}")
    Path(f"square-{i}.txt").write_text(f"{i}\n" * (1 + i % 7))
    return {"i": i, "square": i * i, "text": f"{i}-" * (1 + i % 5)}


@cached_job
def combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """A job downstream of two others: its digest depends on their outputs."""
    executed(f"combine-{a['i']}-{b['i']}")
    return {"pair": [a["i"], b["i"]], "sum": a["square"] + b["square"]}


@cached_job
def gated(tag: str) -> dict[str, Any]:
    """Notes its start, then waits while the file ``JFC_HOLD_FILE`` exists (the test holds it
    there, kills it or lets it go); fails when ``JFC_FAIL`` names ``gated-<tag>``.

    Writes ``who.txt`` naming the job that wrote it (the output is the same for all), so a
    cache entry's files can be matched to its source job.
    """
    name = f"gated-{tag}"
    _event("start", name)
    hold = os.environ.get("JFC_HOLD_FILE")
    while hold and os.path.exists(hold):
        time.sleep(0.01)
    Path("who.txt").write_text(f"{CURRENT_JOB.job.uuid}\n")
    _event("end", name)
    executed(name)  # raises when JFC_FAIL names it
    return {"tag": tag, "value": sum(map(ord, tag))}


def _build(spec: dict[str, Any]) -> list[tuple[str, Job]]:
    """The jobs of the spec as (key, job), in the spec's order shuffled by its seed."""
    squares: dict[int, Job] = {}

    def square_of(i: int) -> Job:
        if i not in squares:
            squares[i] = square(i)
        return squares[i]

    built: list[tuple[str, Job]] = []
    for kind, *args in spec["jobs"]:
        if kind == "square":
            built.append((f"square-{args[0]}", square_of(args[0])))
        elif kind == "combine":
            a, b = square_of(args[0]), square_of(args[1])
            built.append((f"combine-{args[0]}-{args[1]}", combine(a.output, b.output)))
        elif kind == "gated":
            built.append((f"gated-{args[0]}", gated(args[0])))
        else:
            raise ValueError(f"unknown job kind {kind!r}")
    keys = {id(job) for _, job in built}
    built += [(f"square-{i}", job) for i, job in squares.items() if id(job) not in keys]
    random.Random(spec.get("seed", 0)).shuffle(built)
    return built


def _barrier(spec: dict[str, Any]) -> float:
    """Say ready, wait for the go file; return the time the wait ended."""
    ready, go = spec.get("ready_file"), spec.get("go_file")
    if ready:
        Path(ready).touch()
    while go and not os.path.exists(go):
        time.sleep(0.002)
    return time.time()


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run the spec's flow through ``jobflow_cache.run_locally``; return what happened."""
    log_file = spec.get("log_file")
    if log_file:  # "Waiting - ...", "Served from cache - ..." and warnings, with times
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(created).6f %(levelname)s %(message)s"))
        for name, level in (("jobflow.cache", logging.DEBUG), ("jobflow_cache", logging.INFO)):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(level)
    built = _build(spec)
    store = JobStore(MemoryStore())
    started = _barrier(spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "Some jobs are not connected")  # jobflow's, expected
        responses = run_locally(Flow([job for _, job in built]), log=False, store=store)
    finished = time.time()
    jobs: dict[str, list[dict[str, Any]]] = {}
    store.connect()
    for key, job in built:
        doc = store.query_one({"uuid": job.uuid}, properties=["output", "metadata", "index"])
        meta = (doc or {}).get("metadata", {}).get("jobflow_cache", {})
        jobs.setdefault(key, []).append(
            {
                "uuid": job.uuid,
                "stored": doc is not None,
                "output": (doc or {}).get("output"),
                "outcome": meta.get("outcome"),
                "digest": meta.get("digest"),
                "source_uuid": meta.get("source_uuid"),
                "response": job.uuid in responses,
            }
        )
    return {
        "pid": os.getpid(),
        "started": started,
        "finished": finished,
        "jobs": jobs,
        "warnings": [str(w.message) for w in caught],
    }


def main(argv: list[str] | None = None) -> None:
    """Read the spec file named on the command line, run it, write the result file."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    result = run(spec)
    out = Path(spec["result_file"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)
