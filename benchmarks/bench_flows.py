"""Flow shapes x executors: wall time, per-job cost, scaling, memory, the cache toggle.

Every measurement runs in a fresh worker process (full mode; the quick mode runs one process per
executor). Cold runs start from an empty cache directory of their own; the warm run of the same
shape and size then runs a fresh flow instance (fresh uuids) against the cache the cold run
filled, in another process, as a user's rerun would.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from benchmarks.common import Mode, fmt_ratio, fmt_seconds, run_worker, table
from benchmarks.flows import SHAPES

__all__ = [
    "EXECUTORS",
    "check_runs",
    "flow_tables",
    "plan_flows",
    "plan_memory",
    "plan_work",
    "run_tasks",
    "run_toggle",
]

logger = logging.getLogger(__name__)

#: Executors, in the order they run (warm needs cold's cache).
EXECUTORS = ("jobflow", "disabled", "uncached", "cold", "warm")
#: Shapes that also run at 5,000 jobs (the targets against jobflow are set there).
TARGET_SHAPES = ("chain", "replace")
#: Order of the shapes at each size (the later ones are the first the budget skips).
PRIORITY = ("chain", "replace", "fanout", "nested", "diamond", "addition", "detour")
#: Quick mode runs these executors in one process each group (warm after cold, as a rerun).
_QUICK_GROUP = {"jobflow": "plain", "disabled": "plain", "uncached": "plain"}
#: Seconds of work per job in the warm-vs-recompute case.
WORK = 0.01


def _task(shape: str, n: int, executor: str, mode: Mode, **extra: Any) -> dict[str, Any]:
    work = extra.pop("work", 0.0)
    repeats = extra.pop("repeats", _repeats(shape, n, executor, mode))
    limit = extra.pop("timeout", None) or _timeout(executor, n, mode)  # of one run
    task = {
        "kind": "flow",
        "shape": shape,
        "n": n,
        "executor": executor,
        "work": work,
        "repeats": repeats,
        "cache_dir": str(mode.tmp / "caches" / f"{shape}-{n}-{work:g}"),
        "timeout": limit * repeats,  # of the worker process
        "run_timeout": limit,  # a timeout is reported as "> run_timeout" per run
        "run": True,
    }
    task.update(extra)
    task["id"] = f"{shape}/{n}/{executor}/{work:g}"
    return task


def _repeats(shape: str, n: int, executor: str, mode: Mode) -> int:
    """Median of 3 where it is cheap or where a target compares two sizes; else one run."""
    if mode.quick or n == 5000:
        return 1
    if executor == "jobflow":
        return 3 if n <= 100 else 1
    if n <= 1000 or shape in TARGET_SHAPES:
        return 3
    return 1


def _timeout(executor: str, n: int, mode: Mode) -> float:
    if mode.quick:
        return 60.0
    if n <= 100:
        return 60.0
    if n <= 1000:
        return 120.0 if executor == "jobflow" else 90.0
    if executor == "jobflow":
        return 120.0  # the issue saw jobflow take > 150 s at 5,000 jobs: a lower bound will do
    return 150.0 if n <= 5000 else 300.0


def plan_flows(mode: Mode) -> list[dict[str, Any]]:
    """Every (shape, size, executor) run of the flow-shape benchmark."""
    tasks = []
    for shape in SHAPES:
        if mode.quick:
            sizes = [100, 300] if shape in TARGET_SHAPES else [100]
        else:
            sizes = [100, 1000, 5000, 10000] if shape in TARGET_SHAPES else [100, 1000, 10000]
        for n in sizes:
            for executor in EXECUTORS:
                run = True
                if not mode.quick and n == 5000 and executor in ("disabled", "warm"):
                    continue
                if not mode.quick and n == 10000:
                    if executor == "jobflow":
                        run = False  # > 120 s at 5,000 jobs: a lower bound is derived instead
                    if executor == "disabled" and shape not in TARGET_SHAPES:
                        continue
                tasks.append(_task(shape, n, executor, mode, run=run))
    return tasks


def plan_work(mode: Mode) -> list[dict[str, Any]]:
    """Warm run vs recomputing when every job does ``WORK`` seconds of work."""
    n = 50 if mode.quick else 1000
    return [
        _task("replace", n, executor, mode, work=WORK, timeout=n * WORK * 3 + 60, repeats=1)
        for executor in ("uncached", "cold", "warm")
    ]


def memory_size(mode: Mode) -> int:
    """Size of the dynamic flow whose peak memory is compared."""
    return 300 if mode.quick else 10000


def plan_memory(mode: Mode) -> list[dict[str, Any]]:
    """Peak memory of the largest dynamic flow, uncached, cold and warm (if not run already)."""
    n = memory_size(mode)
    return [_task("replace", n, executor, mode) for executor in ("uncached", "cold", "warm")]


def _key(task: dict[str, Any]) -> tuple[str, str, float]:
    return task["shape"], task["executor"], task["work"]


def run_tasks(tasks: list[dict[str, Any]], mode: Mode) -> list[dict[str, Any]]:
    """Run flow tasks (fresh process each in full mode); return them with their results."""
    done: list[dict[str, Any]] = []
    if mode.quick:  # one process per group: jobflow and uncached-like, cold, warm
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for task in tasks:
            if task["run"]:
                groups[_QUICK_GROUP.get(task["executor"], task["executor"])].append(task)
        for name in ("plain", "cold", "warm"):
            group = groups.get(name, [])
            if not group:
                continue
            group.sort(key=lambda t: EXECUTORS.index(t["executor"]))
            logger.info("flows: %s x %d", name, len(group))
            for i, task in enumerate(group):
                task["warm_up"] = i == 0 or task["executor"] != group[i - 1]["executor"]
            results = run_worker(
                [dict(t) for t in group], sum(t["timeout"] for t in group), mode.tmp
            )
            done += [_merge(task, result) for task, result in zip(group, results)]
        done += [_not_run(task, done) for task in tasks if not task["run"]]
        return done
    timed_out: dict[tuple[str, str, float], dict[str, Any]] = {}
    cold_ok: set[tuple[str, int, float]] = set()
    deadline = time.monotonic() + mode.flow_budget_s if mode.flow_budget_s else None
    for task in sorted(tasks, key=_order):
        key = _key(task)
        if not task["run"] or key in timed_out:
            done.append(_not_run(task, done))
            continue
        if deadline is not None and time.monotonic() > deadline:
            done.append({**task, "status": "skipped", "error": "time budget (--budget) used up"})
            continue
        if task["executor"] == "warm" and (task["shape"], task["n"], task["work"]) not in cold_ok:
            done.append({**task, "status": "skipped", "error": "the cold run did not finish"})
            continue
        logger.info("flows: %s", task["id"])
        result = _merge(task, run_worker([dict(task)], task["timeout"], mode.tmp)[0])
        done.append(result)
        if result["status"] == "timeout":
            timed_out[key] = result
        if result["status"] == "ok" and task["executor"] == "cold":
            cold_ok.add((task["shape"], task["n"], task["work"]))
    return done


def _order(task: dict[str, Any]) -> tuple[int, int, int]:
    """Runs the targets need first (chain, replace, the 10 ms case), then the other shapes;
    by size within each, so a smaller size that timed out can skip the larger ones."""
    phase = 0 if task["shape"] in TARGET_SHAPES or task["work"] else 1
    return phase, task["n"], PRIORITY.index(task["shape"])


def _merge(task: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    merged = {**task, **result}
    if result.get("status") == "timeout":  # the runs took more than this on average
        merged["seconds"] = task.get("run_timeout", task["timeout"])
        merged["lower_bound"] = True
    return merged


def _not_run(task: dict[str, Any], done: list[dict[str, Any]]) -> dict[str, Any]:
    """A task that was not run: a lower bound when a smaller size already timed out."""
    smaller = [
        d
        for d in done
        if _key(d) == _key(task) and d["n"] < task["n"] and d.get("status") == "timeout"
    ]
    if smaller:
        worst = max(smaller, key=lambda d: d["n"])
        return {
            **task,
            "status": "not run",
            "seconds": worst["seconds"],
            "lower_bound": True,
            "error": f"{worst['n']} jobs already took > {worst['seconds']:.0f} s",
        }
    return {**task, "status": "not run", "error": "not planned in this mode"}


def check_runs(results: list[dict[str, Any]]) -> list[str]:
    """Cross-check the runs of each shape and size; return problems (and mark them on runs).

    Every executor must produce the same number of responses and the same final output; a cold
    run must record misses only, a warm run must serve hits only.
    """
    problems = []
    groups: dict[tuple[str, int, float], list[dict[str, Any]]] = defaultdict(list)
    for run in results:
        if run.get("status") == "ok":
            groups[(run["shape"], run["n"], run["work"])].append(run)
    for (shape, n, work), runs in groups.items():
        reference = next((r for r in runs if r["executor"] == "jobflow"), runs[0])
        for run in runs:
            bad = []
            if run["responses"] != reference["responses"]:
                bad.append(
                    f"{run['responses']} responses, {reference['executor']} had "
                    f"{reference['responses']}"
                )
            if run["output"] != reference["output"]:
                bad.append(f"output {run['output']!r} != {reference['output']!r}")
            outcomes = run.get("outcomes", {})
            if run["executor"] == "cold" and outcomes.get("hit", 0):
                bad.append(f"cold run served {outcomes['hit']} hits")
            if run["executor"] == "warm":
                served = outcomes.get("hit", 0)
                others = {k: v for k, v in outcomes.items() if k not in ("hit", "none")}
                if not served or others:
                    bad.append(f"warm run outcomes {outcomes}")
            if run.get("warnings", {}).get("CacheWarning"):
                bad.append(f"{run['warnings']['CacheWarning']} CacheWarning(s)")
            if bad:
                run["check"] = "; ".join(bad)
                problems.append(f"{shape}/{n}/{run['executor']} (work={work:g}): {run['check']}")
    return problems


def find(
    results: Iterable[dict[str, Any]], shape: str, n: int, executor: str, work: float = 0.0
) -> dict[str, Any] | None:
    """The run of ``(shape, n, executor, work)`` with a time (ok or a lower bound), else None."""
    for run in results:
        if (run.get("shape"), run.get("n"), run.get("executor"), run.get("work")) == (
            shape,
            n,
            executor,
            work,
        ) and run.get("seconds") is not None:
            return run
    return None


def _cell(run: dict[str, Any] | None) -> str:
    if run is None:
        return "-"
    if run.get("status") not in ("ok", "timeout", "not run"):
        return run.get("status", "?")
    text = fmt_seconds(run["seconds"], run.get("lower_bound", False))
    return text + (" !" if run.get("check") else "")


def _ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> tuple[float | None, bool]:
    """a/b and whether it is only a lower bound (a is a lower bound and b is exact)."""
    if a is None or b is None or b.get("lower_bound"):
        return None, False
    return a["seconds"] / b["seconds"], bool(a.get("lower_bound"))


def flow_tables(results: list[dict[str, Any]], work: float = 0.0) -> list[str]:
    """Wall time, per-job cost and scaling tables of the flow-shape runs."""
    sizes: dict[str, list[int]] = defaultdict(list)
    for run in results:
        if run["work"] == work and run["n"] not in sizes[run["shape"]]:
            sizes[run["shape"]].append(run["n"])
    rows, per_job, scaling = [], [], []
    for shape in SHAPES:
        for n in sorted(sizes.get(shape, [])):
            runs = {ex: find(results, shape, n, ex, work) for ex in EXECUTORS}
            vs_jobflow, lb = _ratio(runs["jobflow"], runs["cold"])
            cold, _ = _ratio(runs["cold"], runs["uncached"])
            warm, _ = _ratio(runs["warm"], runs["uncached"])
            rows.append(
                [shape, n]
                + [_cell(runs[ex]) for ex in EXECUTORS]
                + [fmt_ratio(vs_jobflow, lb), fmt_ratio(cold), fmt_ratio(warm)]
            )
            per_job.append(
                [shape, n]
                + [_per_job(runs[ex], n) for ex in EXECUTORS]
                + [_overhead(runs["cold"], runs["uncached"], n)]
                + [_overhead(runs["warm"], runs["uncached"], n)]
            )
        ns = sorted(sizes.get(shape, []))
        pairs = set(itertools.pairwise(ns)) | {(a, b) for a in ns for b in ns if b == 10 * a}
        for small, big in sorted(pairs):
            cells = [
                _growth(find(results, shape, small, ex, work), find(results, shape, big, ex, work))
                for ex in EXECUTORS
            ]
            if any(cell != "-" for cell in cells):
                scaling.append([shape, f"{small} -> {big}", *cells])
    suffix = f" (each job sleeps {work * 1e3:g} ms)" if work else ""
    return [
        table(
            f"Flow shapes: wall time of one run{suffix} ('!' = failed a cross-check)",
            ["shape", "jobs", *EXECUTORS, "jobflow/cold", "cold/uncached", "warm/uncached"],
            rows,
        ),
        table(
            f"Per-job cost in ms{suffix} (cache overhead = (run - uncached) / jobs)",
            ["shape", "jobs", *EXECUTORS, "cold overhead", "warm overhead"],
            per_job,
        ),
        table(
            f"Scaling{suffix}: time(N2)/time(N1), and in brackets the exponent "
            "log(ratio)/log(N2/N1): 1 = linear, 2 = quadratic",
            ["shape", "N1 -> N2", *EXECUTORS],
            scaling,
        ),
    ]


def _growth(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    """``ratio (exponent)`` of two sizes' times; ``>=`` when the larger one only has a bound."""
    if a is None or b is None or a.get("lower_bound") or a.get("status") != "ok":
        return "-"
    if b.get("status") not in ("ok", "timeout", "not run"):
        return "-"
    ratio = b["seconds"] / a["seconds"]
    exponent = math.log(ratio) / math.log(b["n"] / a["n"])
    bound = ">= " if b.get("lower_bound") else ""
    return f"{bound}{ratio:.1f} ({exponent:.2f})"


def _per_job(run: dict[str, Any] | None, n: int) -> str:
    if run is None or run.get("status") not in ("ok", "timeout", "not run"):
        return "-"
    return ("> " if run.get("lower_bound") else "") + f"{run['seconds'] / n * 1e3:.3f}"


def _overhead(run: dict[str, Any] | None, base: dict[str, Any] | None, n: int) -> str:
    if run is None or base is None or run.get("lower_bound") or base.get("lower_bound"):
        return "-"
    return f"{(run['seconds'] - base['seconds']) / n * 1e3:+.3f}"


def memory_table(results: list[dict[str, Any]], n: int) -> str:
    """Peak RSS of the largest dynamic flow, uncached, cold and warm."""
    rows = []
    base = find(results, "replace", n, "uncached")
    for executor in ("jobflow", "uncached", "disabled", "cold", "warm"):
        run = find(results, "replace", n, executor)
        if run is None or run.get("status") != "ok":
            continue
        ratio = (
            run["rss_peak_mb"] / base["rss_peak_mb"]
            if base and base.get("status") == "ok"
            else None
        )
        rows.append(
            [
                executor,
                f"{run['rss_base_mb']:.0f}",
                f"{run['rss_peak_mb']:.0f}",
                f"{run['rss_peak_mb'] - run['rss_base_mb']:.0f}",
                fmt_ratio(ratio),
            ]
        )
    return table(
        f"Memory: peak RSS of a {n}-job dynamic flow (replace), MB",
        ["executor", "before run", "peak", "growth", "peak/uncached"],
        rows,
    )


def run_toggle(mode: Mode) -> dict[str, Any]:
    """``cache=False`` vs ``JOBFLOW_CACHE_DISABLE=1``, alternating in one process."""
    n, repeats = (200, 3) if mode.quick else (1000, 5)
    task = {
        "kind": "toggle",
        "shape": "chain",
        "n": n,
        "repeats": repeats,
        "cache_dir": str(mode.tmp / "caches" / "toggle"),
        "id": "toggle",
    }
    result = run_worker([task], 60 + 2 * repeats * (1 if mode.quick else 30), mode.tmp)[0]
    result.update(shape="chain", n=n, repeats=repeats)
    return result


def toggle_table(result: dict[str, Any]) -> str:
    """The toggle comparison as a table."""
    if result.get("status") != "ok":
        return table("Cache toggle", ["status"], [[result.get("status")]])
    rows = [
        [ex, fmt_seconds(result[ex]), " ".join(f"{t:.3f}" for t in result["times"][ex])]
        for ex in ("uncached", "disabled")
    ]
    rows.append(["disabled/uncached", fmt_ratio(result["disabled"] / result["uncached"]), ""])
    return table(
        f"Cache toggle: {result['n']}-job chain, cache=False vs JOBFLOW_CACHE_DISABLE=1, "
        f"alternating in one process (median of {result['repeats']})",
        ["run", "median", "all runs (s)"],
        rows,
    )
