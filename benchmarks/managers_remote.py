"""What a cache hit costs under jobflow-remote and under our ``run_locally``: cold, served on
the worker, served ahead of submission.

``python -m benchmarks.managers_remote [--flow elastic|chain] [--delay S] [--repeats N]
[--out FILE]`` prints a table and writes every number to a JSON file (default
``benchmarks/results/managers_remote-<time>.json``).

jobflow-remote runs for real: its ``Runner`` (``run_all_jobs``, as in its own tests) in this
process and a local ``shell`` worker, so every submitted job is uploaded, started by the
worker's ``submit.sh`` as a ``jf execution run`` process, downloaded and completed. Its queue
database and JobStore are in-memory stand-ins (tests/managers/jr_project.py: no MongoDB can run
here), which makes the database part of its cost a lower bound. The runner's step delays are
``--delay`` seconds (jobflow-remote's own tests use 1 s; its default is 30 s, so a production
runner spends proportionally longer between the steps of a job).

Cases, each on a fresh flow (new uuids) built by the same code:

* ``cold``: the first run, the cache empty: every job computes (and is recorded).
* ``on worker``: ``cache_flow(flow)`` submitted as usual; every job is a hit, served inside its
  worker process, but still checked out, uploaded, submitted and completed.
* ``served ahead``: ``plan(flow).apply(job_store)`` (``manager="jobflow-remote"`` under
  jobflow-remote) writes the served jobs' outputs into the
  JobStore before submission; only what it leaves is submitted (nothing, for a fully cached
  flow). The time includes planning and applying.

The cache is the embedded SQLite store in a scratch folder, shared with the worker processes
through ``JOBFLOW_CACHE_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, fmt_seconds, machine_facts, table

__all__ = ["main", "measure_jobflow_remote", "measure_run_locally", "render"]

#: The rows of the table: (manager, case) in order.
CASES = ("cold", "on worker", "served ahead")


def build(kind: str) -> Callable[[], Any]:
    """The flow builder for ``kind``: a fresh flow (all new uuids) on every call."""
    if kind == "chain":
        from tests.managers.jr_jobs import chain

        return chain
    from tests.integration.a2_flows import SCENARIOS

    return SCENARIOS[kind].build


def outcomes(store: Any, flow: Any) -> Counter[str]:
    """How many of ``flow``'s stored jobs were hits, misses, or not touched (``none``)."""
    found: Counter[str] = Counter()
    for doc in store.query({"hosts": flow.uuid}, properties=["metadata", "name"]):
        if doc["name"] == "store_inputs":  # jobflow's book-keeping job of a replaced flow
            continue
        meta = (doc.get("metadata") or {}).get("jobflow_cache") or {}
        found[meta.get("outcome") or "none"] += 1
    return found


def n_jobs(flow: Any) -> int:
    """Jobs of ``flow``, nested flows included."""
    return sum(1 for _ in flow.iterflow()) if flow else 0  # an empty Flow has no graph


def planned(flow: Any, store: Any, manager: str = "local") -> tuple[Any, dict[str, Any]]:
    """``plan(flow, manager=manager).apply(store)`` and what the plan said of every job."""
    from jobflow_cache import plan

    result = plan(flow, manager=manager)
    remaining = result.apply(store)
    said = result.to_dict()
    # jobflow: an empty Flow has no graph to iterate
    left = [job.name for job, _ in remaining.iterflow()] if remaining else []
    return remaining, {"plan": said["counts"], "left": left, "plan_jobs": said["jobs"]}


def _row(manager: str, case: str, seconds: float, **extra: Any) -> dict[str, Any]:
    return {"manager": manager, "case": case, "seconds": round(seconds, 4), **extra}


def measure_jobflow_remote(
    kind: str, scratch: Path, delay: float, repeats: int
) -> list[dict[str, Any]]:
    """cold / on worker / served ahead under a real jobflow-remote Runner."""
    import pytest
    from tests.managers.jr_project import make_project

    from jobflow_cache import cache_flow

    rows: list[dict[str, Any]] = []
    builder = build(kind)
    with pytest.MonkeyPatch.context() as patch:
        jr = make_project(scratch / "jfr", patch, runner_delay=delay)
        controller = jr.controller()

        def submitted_run(flow: Any, **kwargs: Any) -> tuple[float, int, int]:
            before_jobs, before_dirs = controller.count_jobs(), len(jr.run_dirs())
            t0 = time.perf_counter()
            if n_jobs(flow):
                jr.submit(flow, **kwargs)
                jr.run_all(max_seconds=3600)
            seconds = time.perf_counter() - t0
            jobs = controller.count_jobs() - before_jobs
            return seconds, jobs, len(jr.run_dirs()) - before_dirs

        for case in CASES:
            for _ in range(1 if case == "cold" else repeats):
                flow = cache_flow(builder())
                t0 = time.perf_counter()
                remaining, said = (
                    planned(flow, jr.job_store, "jobflow-remote")
                    if case == "served ahead"
                    else (flow, {})
                )
                plan_s = time.perf_counter() - t0
                seconds, jobs, processes = submitted_run(
                    remaining, allow_external_references=case == "served ahead"
                )
                found = outcomes(jr.job_store, flow)
                rows.append(
                    _row(
                        "jobflow-remote",
                        case,
                        plan_s + seconds,
                        plan_s=round(plan_s, 4),
                        jobs=sum(found.values()),
                        outcomes=dict(found),
                        submitted=jobs,
                        worker_processes=processes,
                        runner_delay_s=delay,
                        **said,
                    )
                )
                print(f"  jobflow-remote {case:13} {fmt_seconds(rows[-1]['seconds'])}", flush=True)
    return rows


def measure_run_locally(kind: str, scratch: Path, repeats: int) -> list[dict[str, Any]]:
    """cold / on worker (our run_locally serves in its own loop) / served ahead, in-process."""
    from jobflow import JobStore
    from maggma.stores import MemoryStore

    from jobflow_cache import run_locally

    rows: list[dict[str, Any]] = []
    builder = build(kind)
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    store.connect()
    for case in CASES:
        for i in range(1 if case == "cold" else repeats):
            flow = builder()
            root = scratch / "local" / f"{case.replace(' ', '_')}{i}"
            root.mkdir(parents=True)
            t0 = time.perf_counter()
            remaining, said = planned(flow, store) if case == "served ahead" else (flow, {})
            plan_s = time.perf_counter() - t0
            jobs = n_jobs(remaining)
            if jobs:
                run_locally(
                    remaining,
                    store=store,
                    create_folders=True,
                    root_dir=root,
                    log=False,
                    allow_external_references=case == "served ahead",
                )
            seconds = time.perf_counter() - t0
            found = outcomes(store, flow)
            rows.append(
                _row(
                    "jobflow_cache.run_locally",
                    case,
                    seconds,
                    plan_s=round(plan_s, 4),
                    jobs=sum(found.values()),
                    outcomes=dict(found),
                    submitted=jobs,
                    **said,
                )
            )
            print(f"  run_locally    {case:13} {fmt_seconds(seconds)}", flush=True)
    return rows


def render(results: dict[str, Any]) -> str:
    """The table of a results dict (as written to the JSON file): median seconds per case."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results["rows"]:
        by.setdefault((row["manager"], row["case"]), []).append(row)
    lines = []
    managers = list(dict.fromkeys(row["manager"] for row in results["rows"]))
    for manager in managers:
        cells = [manager]
        for case in CASES:
            rows = by.get((manager, case), [])
            if not rows:
                cells.append("-")
                continue
            seconds = statistics.median(r["seconds"] for r in rows)
            submitted = rows[0].get("submitted")
            cells.append(f"{fmt_seconds(seconds)} ({submitted} submitted)")
        lines.append(cells)
    title = (
        f"{results['flow']} flow ({results['jobs']} jobs): seconds from submission to every "
        f"job in the JobStore (runner delay {results['runner_delay_s']} s)"
    )
    return table(title, ["manager", *CASES], lines)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.managers_remote")
    parser.add_argument("--flow", choices=["elastic", "phonon", "chain"], default="elastic")
    parser.add_argument("--delay", type=float, default=1.0, help="runner step delay (s)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each warm case")
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--skip-remote", action="store_true", help="only run_locally")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "benchmarks" / "results" / f"managers_remote-{stamp}.json"
    sys.path.insert(0, str(ROOT))  # tests.* (the flows, the jobflow-remote project)
    with tempfile.TemporaryDirectory(prefix="jfc-bench-managers-") as tmp:
        scratch = Path(tmp)
        config = scratch / "no-config.yaml"
        config.touch()
        for name in [n for n in os.environ if n.startswith("JOBFLOW_CACHE_")]:
            del os.environ[name]
        os.environ["JOBFLOW_CACHE_CONFIG_FILE"] = str(config)
        results: dict[str, Any] = {
            "benchmark": "managers_remote",
            "started": stamp,
            "machine": machine_facts(),
            "flow": args.flow,
            "runner_delay_s": args.delay,
            "repeats": args.repeats,
            "rows": [],
        }
        # each manager gets its own empty cache: its cold run computes everything
        os.environ["JOBFLOW_CACHE_DIR"] = str(scratch / "cache-local")
        results["rows"] += measure_run_locally(args.flow, scratch, args.repeats)
        if not args.skip_remote:
            os.environ["JOBFLOW_CACHE_DIR"] = str(scratch / "cache-remote")
            results["rows"] += measure_jobflow_remote(args.flow, scratch, args.delay, args.repeats)
    results["jobs"] = max(row["jobs"] for row in results["rows"])
    results["table"] = render(results)
    print(results["table"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
