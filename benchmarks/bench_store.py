"""Embedded store: lookup and insert latency as it grows, concurrent writers, cachetool speed.

The store grows in place (1e3 -> 1e4 -> ... entries) by bulk inserts of real, sealed
:class:`~jobflow_cache.CacheEntry` documents through the store's ``update``; at each size single
``CacheStore.lookup`` (hits and misses) and ``CacheStore.put`` calls are timed one by one.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Mode,
    collect_worker,
    fmt_ratio,
    fmt_seconds,
    percentile,
    spawn_worker,
    table,
)
from benchmarks.entries import cache_store, digest_of, document_batches, sealed_entry
from jobflow_cache import Outcome

__all__ = ["run_store", "store_tables"]

logger = logging.getLogger(__name__)

#: cachetool commands timed on the largest store, as argument lists ({prefix}: a digest prefix).
CACHETOOL = {
    "info": ["info"],
    "ls --limit 20": ["ls", "--limit", "20"],
    "show <prefix>": ["show", "{prefix}"],
    "stats": ["stats"],
}


def sizes(mode: Mode) -> list[int]:
    """Store sizes measured."""
    return [1000, 10_000] if mode.quick else [1000, 10_000, 100_000, 1_000_000]


def _lat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p95": percentile(values, 0.95)}


def _bulk(cache: Any, start: int, stop: int) -> float:
    t0 = time.perf_counter()
    gc_was = gc.isenabled()
    gc.disable()  # a million small dicts: the cyclic collector would dominate the build
    try:
        for batch in document_batches(start, stop, batch=10_000):
            cache.backend.write(batch)
    finally:
        if gc_was:
            gc.enable()
    return time.perf_counter() - t0


def run_store(mode: Mode) -> dict[str, Any]:
    """Grow the store and time lookups and inserts at every size; then writers and cachetool."""
    root = mode.tmp / "store"
    shutil.rmtree(root, ignore_errors=True)
    probes_n, puts_n = (200, 100) if mode.quick else (500, 200)
    rng = random.Random(0)
    levels: list[dict[str, Any]] = []
    built = 0
    with cache_store(root) as cache:
        for size in sizes(mode):
            build_s = _bulk(cache, built, size)
            built = size
            probes = [digest_of(f"entry-{rng.randrange(size)}") for _ in range(probes_n)]
            hits: list[float] = []
            misses: list[float] = []
            puts: list[float] = []
            outcomes: Counter[str] = Counter()
            for digest in probes:
                t0 = time.perf_counter()
                found = cache.lookup(digest)
                hits.append(time.perf_counter() - t0)
                outcomes[f"present: {found.outcome.value}"] += 1
            for i in range(probes_n):
                t0 = time.perf_counter()
                found = cache.lookup(digest_of(f"absent-{size}-{i}"))
                misses.append(time.perf_counter() - t0)
                outcomes[f"absent: {found.outcome.value}"] += 1
            entries = [sealed_entry(f"put-{size}-{i}") for i in range(puts_n)]
            for entry in entries:
                t0 = time.perf_counter()
                cache.put(entry)
                puts.append(time.perf_counter() - t0)
            count = cache.count()
            levels.append(
                {
                    "size": size,
                    "count": count,
                    "build_s": build_s,
                    "build_per_entry_us": build_s
                    / max(size - (levels[-1]["size"] if levels else 0), 1)
                    * 1e6,
                    "lookup_hit": _lat(hits),
                    "lookup_miss": _lat(misses),
                    "put": _lat(puts),
                    "outcomes": dict(outcomes),
                    "file_mb": _file_mb(root),
                }
            )
            logger.info("store: %d entries", size)
    writers = _concurrent_writers(mode, root)
    tool = _cachetool(mode, root)
    shutil.rmtree(root, ignore_errors=True)
    return {"levels": levels, "writers": writers, "cachetool": tool}


def _file_mb(root: Path) -> float:
    return round(sum(p.stat().st_size for p in root.glob("cache.sqlite*")) / 2**20, 1)


def _concurrent_writers(mode: Mode, root: Path) -> dict[str, Any]:
    """Two processes putting entries into the same (largest) store at the same time."""
    count = 100 if mode.quick else 500
    go = mode.tmp / "writers-go"
    go.unlink(missing_ok=True)
    tasks = [
        {
            "kind": "writer",
            "cache_dir": str(root),
            "count": count,
            "prefix": f"w{k}",
            "ready_file": str(mode.tmp / f"writer-{k}-ready"),
            "go_file": str(go),
        }
        for k in range(2)
    ]
    ready = [Path(str(task["ready_file"])) for task in tasks]
    for path in ready:
        path.unlink(missing_ok=True)
    procs = [spawn_worker([task], mode.tmp) for task in tasks]  # both run at once
    deadline = time.time() + 120
    while time.time() < deadline and not all(path.exists() for path in ready):
        if any(proc.poll() is not None for proc in procs):
            break  # a writer died before it was ready: collect its error below
        time.sleep(0.01)
    go.touch()
    results = [collect_worker(proc, [task], 300)[0] for proc, task in zip(procs, tasks)]
    if not all(r.get("ok") for r in results):
        return {"status": "error", "results": results}
    spans = [(r["started"], r["started"] + r["seconds"]) for r in results]
    overlap = max(0.0, min(b for _, b in spans) - max(a for a, _ in spans))
    union = max(b for _, b in spans) - min(a for a, _ in spans)
    latencies = [x for r in results for x in r["latencies"]]
    with cache_store(root) as cache:
        found = Counter(
            cache.lookup(digest_of(f"w{k}-{i}")).outcome.value
            for k in range(2)
            for i in range(count)
        )
        stored = cache.count({"digest": {"$in": [digest_of(f"w{k}-0") for k in range(2)]}})
    present = found.get(Outcome.HIT.value, 0)
    return {
        "status": "ok",
        "writers": 2,
        "entries_each": count,
        "wall_s": union,
        "overlap": overlap / union if union else 0.0,
        "put": _lat(latencies),
        "throughput_per_s": 2 * count / union if union else None,
        "present": present,
        "expected": 2 * count,
        "lookup_outcomes": dict(found),  # all "hit" unless an entry went missing
        "first_entries_counted": stored,
    }


def _cachetool(mode: Mode, root: Path) -> dict[str, Any]:
    """Time cachetool commands on the store (a fresh process each, as a user runs them)."""
    exe = Path(sys.executable).with_name("cachetool")
    base = (
        [str(exe)]
        if exe.exists()
        else [sys.executable, "-c", "from jobflow_cache.cli import main; main()"]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLOW_CACHE_")}
    env.update(JOBFLOW_CACHE_DIR=str(root), JOBFLOW_CACHE_CONFIG_FILE=os.devnull)
    prefix = digest_of("entry-0")[:8]
    repeats = 1 if mode.quick else 3
    found: dict[str, Any] = {}
    for label, args in CACHETOOL.items():
        argv = [a.format(prefix=prefix) for a in args]
        times: list[float] = []
        status, error = "ok", ""
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(
                    [*base, *argv], env=env, capture_output=True, text=True, timeout=300
                )
            except subprocess.TimeoutExpired:
                status, error = "timeout", "> 300 s"
                break
            elapsed = time.perf_counter() - t0
            if proc.returncode == 2 and "No such command" in proc.stderr:
                status, error = "not available", f"no 'cachetool {argv[0]}' command yet"
                break
            if proc.returncode != 0:
                status, error = "failed", (proc.stderr.strip() or proc.stdout.strip())[-300:]
                break
            times.append(elapsed)
        found[label] = {"status": status, "error": error, "times": times}
        if times:
            found[label]["seconds"] = statistics.median(times)
    return found


def _served(outcomes: dict[str, int]) -> str:
    """``hits/lookups`` of the probes of entries that are in the store."""
    present = sum(v for k, v in outcomes.items() if k.startswith("present"))
    return f"{outcomes.get('present: hit', 0)}/{present}"


def store_tables(result: dict[str, Any]) -> list[str]:
    """Latency per size, the concurrent writers and cachetool timings."""
    levels = result["levels"]
    rows = []
    for level in levels:
        rows.append(
            [
                f"{level['size']:,}",
                f"{level['file_mb']:.0f}",
                f"{level['build_per_entry_us']:.0f} us",
                fmt_seconds(level["lookup_hit"]["median"]),
                fmt_seconds(level["lookup_hit"]["p95"]),
                fmt_seconds(level["lookup_miss"]["median"]),
                fmt_seconds(level["put"]["median"]),
                fmt_seconds(level["put"]["p95"]),
                fmt_ratio(level["lookup_hit"]["median"] / levels[0]["lookup_hit"]["median"]),
                f"{math.log(level['size']) / math.log(levels[0]['size']):.2f}",
                _served(level["outcomes"]),
            ]
        )
    out = [
        table(
            "Store: embedded SQLite CacheStore, one call at a time",
            [
                "entries",
                "file MB",
                "bulk insert",
                "lookup hit",
                "hit p95",
                "lookup miss",
                "put",
                "put p95",
                "hit vs 1e3",
                "log n vs 1e3",
                "probes served",
            ],
            rows,
        )
    ]
    w = result.get("writers") or {}
    if w.get("status") == "ok":
        single = levels[-1]["put"]["median"]
        out.append(
            table(
                f"Store: 2 writer processes x {w['entries_each']} puts into the "
                f"{levels[-1]['size']:,}-entry store",
                [
                    "wall",
                    "overlap",
                    "put median",
                    "put p95",
                    "puts/s",
                    "1 writer puts/s",
                    "entries present",
                ],
                [
                    [
                        fmt_seconds(w["wall_s"]),
                        f"{w['overlap']:.0%}",
                        fmt_seconds(w["put"]["median"]),
                        fmt_seconds(w["put"]["p95"]),
                        f"{w['throughput_per_s']:.0f}",
                        f"{1 / single:.0f}",
                        f"{w['present']}/{w['expected']}",
                    ]
                ],
            )
        )
    else:
        out.append(table("Store: 2 concurrent writers", ["status"], [[w.get("status", "not run")]]))
    tool_rows = []
    for label, found in (result.get("cachetool") or {}).items():
        tool_rows.append(
            [
                f"cachetool {label}",
                fmt_seconds(found.get("seconds")),
                found["status"],
                found.get("error", "")[:70],
            ]
        )
    out.append(
        table(
            f"cachetool on the {levels[-1]['size']:,}-entry store (whole command, new process)",
            ["command", "median", "status", "note"],
            tool_rows,
        )
    )
    return out
