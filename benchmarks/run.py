"""Entry point of the benchmark suite: ``python -m benchmarks [--quick] [--only NAME ...]``.

Runs the selected benchmarks one after the other, prints their tables and the targets with
PASS/FAIL, and writes every number to a JSON file (default ``benchmarks/results/<time>.json``).
The exit status is 1 only if a benchmark crashed: slow results never fail the run.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import (
    bench_contents,
    bench_files,
    bench_flows,
    bench_hashing,
    bench_outputs,
    bench_paired,
    bench_store,
)
from benchmarks import shared as bench_shared
from benchmarks.common import ROOT, Mode, machine_facts, table
from benchmarks.targets import evaluate, targets_table

__all__ = ["BENCHMARKS", "main"]

logger = logging.getLogger("benchmarks")

#: name -> what it measures (in the order they run).
BENCHMARKS = {
    "flows": "flow shapes x executors: time, per-job cost, scaling",
    "paired": "cold/uncached and time(10k)/time(1k), from runs interleaved in one process",
    "toggle": "JOBFLOW_CACHE_DISABLE=1 vs cache=False",
    "work": "warm run vs recomputing 10 ms jobs",
    "memory": "peak RSS of the largest dynamic flow (from 'flows' when it ran)",
    "hashing": "digest time of structures, input sets, arrays vs joblib/json/orjson/xxh3",
    "store": "store lookup/insert latency by size, concurrent writers, cachetool",
    "files": "materialising run folders by hard link vs copy",
    "contents": "content digests of files/folders named in inputs: first, memoised, other process",
    "shared": "8 writer processes per backend (SQLite, PostgreSQL), lookups, claims, leases",
    "outputs": "hit on a 1 kB / 1 MB / 16 MB output vs uncached run; one hit-count write per size",
    "peers": "own part of a warm job vs a joblib.Memory hit (and AiiDA's when installed)",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="jobflow-cache benchmark suite (see docs/performance.md).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes for a CI smoke run (< 1 min)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help="run only these benchmarks: " + ", ".join(BENCHMARKS),
    )
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument(
        "--budget",
        type=float,
        default=17.0,
        metavar="MIN",
        help="minutes the flow-shape runs may take in full mode; the largest, lowest-priority "
        "runs are skipped (and reported) beyond it; 0 = no limit (default 17)",
    )
    parser.add_argument("--tmp", type=Path, help="scratch folder (default: a new temp folder)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return the exit status (1 if a benchmark crashed)."""
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)  # still remove the scratch folder when killed
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    selected = args.only or list(BENCHMARKS)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = (
        args.out
        or ROOT / "benchmarks" / "results" / f"{stamp}{'-quick' if args.quick else ''}.json"
    )
    tmp = Path(tempfile.mkdtemp(prefix="jfc-bench-", dir=args.tmp))
    budget = None if args.quick or not args.budget else args.budget * 60
    mode = Mode("quick" if args.quick else "full", tmp, flow_budget_s=budget)
    results: dict[str, Any] = {
        "mode": mode.name,
        "started": stamp,
        "machine": machine_facts(),
        "selected": selected,
        "errors": {},
    }
    facts = results["machine"]
    print(
        f"jobflow-cache benchmarks, {mode.name} mode, commit {facts['git_commit'][:12]}"
        f"{' (dirty)' if facts['git_dirty'] else ''}, "
        f"{facts['cpu_count']} CPUs, load {facts['load_average']}",
        flush=True,
    )
    t_start = time.perf_counter()
    try:
        _run_all(selected, mode, results)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["targets"] = evaluate(results, mode)
    results["duration_s"] = time.perf_counter() - t_start
    for text in render(results):
        print(text + "\n", flush=True)
    for name, error in results["errors"].items():
        print(f"CRASHED: {name}: {error['error']}\n{error['traceback']}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"{len(selected)} benchmarks in {results['duration_s']:.0f} s; results: {out}")
    return 1 if results["errors"] else 0


def _note_failed(results: dict[str, Any], key: str, row: dict[str, Any]) -> None:
    """Record a worker's result that is not ``ok`` among the run's errors."""
    if row.get("status") != "ok":
        results["errors"][key] = {
            "error": f"{row.get('status')}: {row.get('error', '')}",
            "traceback": row.get("traceback", ""),
        }


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def render(results: dict[str, Any]) -> list[str]:
    """Every table of a results dict (as written to the JSON file), in the suite's order."""
    sections: list[str] = []
    if results.get("flows"):
        sections += bench_flows.flow_tables(results["flows"])
    if results.get("paired"):
        sections.append(bench_paired.paired_table(results["paired"]))
    if results.get("toggle"):
        sections.append(bench_flows.toggle_table(results["toggle"]))
    if results.get("work"):
        sections += bench_flows.flow_tables(results["work"], work=bench_flows.WORK)[:2]
    if results.get("memory"):
        n = bench_flows.memory_size(Mode(results["mode"], Path()))
        sections.append(bench_flows.memory_table(results["memory"], n))
    if results.get("hashing"):
        sections.append(bench_hashing.hashing_table(results["hashing"]))
    if results.get("store"):
        sections += bench_store.store_tables(results["store"])
    if results.get("files"):
        sections.append(bench_files.files_table(results["files"]))
    if results.get("contents"):
        sections.append(bench_contents.contents_table(results["contents"]))
    if results.get("shared"):
        sections += bench_shared.shared_tables(results["shared"])
    if results.get("outputs"):
        sections.append(bench_outputs.outputs_table(results["outputs"]))
    if results.get("peers"):
        sections.append(bench_outputs.peers_table(results["peers"]))
    if results.get("targets"):
        sections.append(targets_table(results["targets"], quick=results["mode"] == "quick"))
    if results.get("checks"):
        sections.append(
            table(
                "Cross-check problems (results of these runs are suspect)",
                ["problem"],
                [[p] for p in results["checks"]],
            )
        )
    skipped = [
        f"{run['id']}: {run['status']} ({run.get('error', '')})"
        for name in ("flows", "work", "memory")
        for run in results.get(name) or []
        if run.get("status") in ("skipped", "error")
    ]
    if skipped:
        sections.append(table("Flow runs skipped or failed", ["run"], [[x] for x in skipped]))
    return sections


def _guard(name: str, results: dict[str, Any], fn: Callable[[], Any]) -> Any:
    """Run one benchmark; record a crash instead of stopping the suite."""
    t0 = time.perf_counter()
    logger.info("== %s", name)
    try:
        return fn()
    except Exception as err:
        results["errors"][name] = {
            "error": f"{type(err).__name__}: {err}",
            "traceback": traceback.format_exc(),
        }
        return None
    finally:
        results.setdefault("timings", {})[name] = round(time.perf_counter() - t0, 1)


def _run_all(selected: list[str], mode: Mode, results: dict[str, Any]) -> None:
    """Run the selected benchmarks, filling ``results`` (crashes go to ``results["errors"]``)."""
    flows: list[dict[str, Any]] = []
    extra_runs: list[dict[str, Any]] = []
    plans: list[dict[str, Any]] = []
    if "flows" in selected:
        plans += bench_flows.plan_flows(mode)
    if "work" in selected:
        plans += bench_flows.plan_work(mode)
    if plans:  # one call, so the quick mode runs them in a few shared processes
        runs = _guard("flows", results, lambda: bench_flows.run_tasks(plans, mode)) or []
        flows = [r for r in runs if not r["work"]]
        work = [r for r in runs if r["work"]]
        if "flows" in selected:
            results["flows"] = flows
        if work:
            results["work"] = work
    if "paired" in selected:
        paired = _guard("paired", results, lambda: bench_paired.run_paired(mode))
        if paired:
            results["paired"] = paired
            for row in paired:
                _note_failed(results, f"paired:{row['shape']}", row)
    if "toggle" in selected:
        toggle = _guard("toggle", results, lambda: bench_flows.run_toggle(mode))
        if toggle:
            results["toggle"] = toggle
    if "memory" in selected:
        n = bench_flows.memory_size(mode)
        memory = [r for r in flows if r["shape"] == "replace" and r["n"] == n]
        if not any(r["executor"] == "warm" and r.get("status") == "ok" for r in memory):
            memory = (
                _guard(
                    "memory",
                    results,
                    lambda: bench_flows.run_tasks(bench_flows.plan_memory(mode), mode),
                )
                or []
            )
            extra_runs += memory
        results["memory"] = memory
    results["checks"] = bench_flows.check_runs(flows + results.get("work", []) + extra_runs)
    if "hashing" in selected:
        hashing = _guard("hashing", results, lambda: bench_hashing.run_hashing(mode))
        if hashing:
            results["hashing"] = hashing
            for row in hashing:
                if "error" in row:
                    key = f"hashing:{row['input']}:{row['method']}"
                    results["errors"][key] = {"error": row["error"], "traceback": ""}
    if "store" in selected:
        store = _guard("store", results, lambda: bench_store.run_store(mode))
        if store:
            results["store"] = store
    if "files" in selected:
        files = _guard("files", results, lambda: bench_files.run_files(mode))
        if files:
            results["files"] = files
    if "contents" in selected:
        found = _guard("contents", results, lambda: bench_contents.run_contents(mode))
        if found:
            results["contents"] = found
    if "shared" in selected:
        shared = _guard("shared", results, lambda: bench_shared.run_shared(mode))
        if shared:
            results["shared"] = shared
    if "outputs" in selected:
        outputs = _guard("outputs", results, lambda: bench_outputs.run_outputs(mode))
        if outputs:
            results["outputs"] = outputs
            for row in outputs:
                _note_failed(results, f"outputs:{row['label']}", row)
    if "peers" in selected:
        peers = _guard("peers", results, lambda: bench_outputs.run_peers(mode))
        if peers:
            results["peers"] = peers
            _note_failed(results, "peers", peers)
    for name in ("flows", "work", "memory"):
        for run in results.get(name) or []:
            if run.get("status") == "error":
                results["errors"][f"{name}:{run['id']}"] = {
                    "error": run.get("error", ""),
                    "traceback": run.get("traceback", ""),
                }
