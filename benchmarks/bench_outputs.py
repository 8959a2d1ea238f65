"""Hits on large outputs, and the cost of a hit next to joblib.Memory (and AiiDA, if installed).

``outputs``
    For each output size (1 kB, 1 MB and 16 MB of dict-heavy JSON; 4 MB at most in quick mode),
    one worker process runs a one-job flow (:func:`benchmarks.flows.big_output`, whose compute is
    trivial) ``repeats`` times with each executor, interleaved: ``uncached``
    (``run_locally(cache=False)``: compute + the JobStore write, the baseline), ``cold`` (a fresh
    cache folder, the miss is recorded) and ``warm`` (a fresh job with the same inputs: a hit).
    Each run has a fresh MemoryStore JobStore. Then ``CacheStore.record_hit`` is timed on the
    entry the last cold run recorded (:meth:`CacheStore.from_settings` on that folder): one
    hit-count write on an entry of that size.
``peers``
    The cache's own part of a warm job, ``(warm - uncached) / n`` on an ``n``-job chain of
    trivial jobs (the runs alternating in one process), next to a ``joblib.Memory`` hit of the
    same function measured two ways in the same process: inside the same jobflow run (the same
    chain, uncached, whose jobs call the memoised function: ``(joblib - uncached) / n``, like
    with like) and in a hot loop (one call repeated, nothing around it); the floor (xxh3 of the
    arguments' JSON + one primary-key probe); and an AiiDA cached ``calcfunction`` when
    aiida-core is installed (skipped otherwise).

Only the public API is used (``run_locally``, ``CacheStore``, ``CacheSettings``), so the
benchmark runs on any store backend.
"""

from __future__ import annotations

import logging
from typing import Any

from benchmarks.common import Mode, fmt_ratio, fmt_seconds, run_worker, table

__all__ = ["output_sizes", "outputs_table", "peers_table", "run_outputs", "run_peers"]

logger = logging.getLogger(__name__)

KB, MB = 1024, 1024**2


def output_sizes(mode: Mode) -> list[tuple[int, int]]:
    """(output size in bytes of JSON, repeats) measured."""
    if mode.quick:
        return [(KB, 3), (MB, 2), (4 * MB, 1)]
    return [(KB, 7), (MB, 5), (16 * MB, 3)]


def size_label(nbytes: int) -> str:
    """``1 kB``, ``16 MB``."""
    return f"{nbytes // MB} MB" if nbytes >= MB else f"{nbytes // KB} kB"


def run_outputs(mode: Mode) -> list[dict[str, Any]]:
    """One fresh worker process per output size; its result (or error) per size."""
    rows = []
    for nbytes, repeats in output_sizes(mode):
        task = {
            "kind": "output",
            "nbytes": nbytes,
            "repeats": repeats,
            "quick": mode.quick,
            "cache_dir": str(mode.tmp / "caches" / f"output-{nbytes}"),
            "id": f"output/{size_label(nbytes)}",
        }
        # a 16 MB uncached run takes about 4 s, a hit about twice that (issue 15)
        timeout = 60 + repeats * 3 * (nbytes / MB) * 1.5
        logger.info("outputs: %s x %d", size_label(nbytes), repeats)
        result = run_worker([task], timeout, mode.tmp)[0]
        result.update(nbytes=nbytes, repeats=repeats, label=size_label(nbytes))
        if result.get("status") == "ok":
            result["check"] = _check(result)
        rows.append(result)
    return rows


def _check(result: dict[str, Any]) -> str:
    """Every cold run must record a miss and every warm run serve a hit."""
    bad = {
        k: v
        for k, v in result["outcomes"].items()
        if not (k.startswith("uncached") or k == "cold: miss" or k == "warm: hit")
    }
    return f"outcomes {bad}" if bad else ""


def run_peers(mode: Mode) -> dict[str, Any]:
    """Own part of a warm job vs a joblib.Memory hit (and AiiDA), in one worker process."""
    n, repeats = (200, 3) if mode.quick else (1000, 9)
    task = {
        "kind": "peers",
        "n": n,
        "repeats": repeats,
        "quick": mode.quick,
        "cache_dir": str(mode.tmp / "caches" / "peers"),
        "id": "peers",
    }
    result = run_worker([task], 120 + repeats * (10 if mode.quick else 30), mode.tmp)[0]
    result.update(n=n, repeats=repeats)
    if result.get("status") == "ok":
        bad = {
            k: v
            for k, v in result["outcomes"].items()
            if not (k.startswith("uncached") or k in ("warm: hit", "joblib: none"))
        }
        result["check"] = f"outcomes {bad}" if bad else ""
    return result


def outputs_table(rows: list[dict[str, Any]]) -> str:
    """Uncached, cold and warm one-job runs per output size, and the hit-count write."""
    out = []
    for row in rows:
        if row.get("status") != "ok":
            out.append([row["label"], row.get("status", "?"), *["-"] * 7, row.get("error", "")])
            continue
        hit = row.get("record_hit") or {}
        out.append(
            [
                row["label"],
                f"{row['json_bytes'] / KB:,.0f}",
                fmt_seconds(row["uncached"]),
                fmt_seconds(row["cold"]),
                fmt_seconds(row["warm"]),
                fmt_ratio(row["cold"] / row["uncached"]),
                fmt_ratio(row["warm"] / row["uncached"]),
                fmt_seconds(row["warm"] - row["uncached"]),
                fmt_seconds(hit.get("median")),
                row.get("check", ""),
            ]
        )
    return table(
        "Large outputs: one-job flow, uncached vs cold (recorded) vs warm (hit), medians; "
        "hit count = one CacheStore.record_hit on that entry",
        [
            "output",
            "kB json",
            "uncached",
            "cold",
            "warm (hit)",
            "cold/uncached",
            "hit/uncached",
            "hit - uncached",
            "hit count",
            "check",
        ],
        out,
    )


def peers_table(result: dict[str, Any]) -> str:
    """Our warm job's own part next to a joblib.Memory hit, the floor and AiiDA."""
    if result.get("status") != "ok":
        return table("Cost of a hit vs joblib.Memory", ["status"], [[result.get("status")]])
    own = result["own_part"]
    rows = [
        [
            f"ours: own part of a warm job ({result['n']}-job chain, (warm - uncached) / n)",
            fmt_seconds(own),
            "1x",
            result.get("check", ""),
        ],
        [
            "ours: whole warm job (warm run / n)",
            fmt_seconds(result["warm_per_job"]),
            fmt_ratio(result["warm_per_job"] / own if own > 0 else None),
            "",
        ],
        [
            "ours: uncached job (cache=False run / n)",
            fmt_seconds(result["uncached_per_job"]),
            fmt_ratio(result["uncached_per_job"] / own if own > 0 else None),
            "",
        ],
    ]
    for label, key in (
        ("floor: xxh3 of the arguments + a primary-key probe", "floor"),
        ("joblib.Memory hit in the same flow ((joblib - uncached) / n)", "joblib_in_flow"),
        ("joblib.Memory hit in a hot loop, same function and arguments", "joblib"),
        ("AiiDA cached calcfunction", "aiida"),
    ):
        found = result.get(key) or {}
        seconds = found.get("median") if found.get("status") == "ok" else None
        rows.append(
            [
                label + (f" ({found['version']})" if found.get("version") else ""),
                fmt_seconds(seconds) if seconds else found.get("status", "-"),
                fmt_ratio(seconds / own if seconds and own > 0 else None),
                found.get("reason", ""),
            ]
        )
    return table(
        "Cost of a hit: the cache's own part of a warm job vs joblib.Memory (and AiiDA)",
        ["what", "per call", "vs own part", "note"],
        rows,
    )
