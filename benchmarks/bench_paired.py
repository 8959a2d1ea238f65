"""Cold / uncached and time(10 n)/time(n), from runs interleaved in one process.

The flow-shape benchmark (:mod:`benchmarks.bench_flows`) runs each executor's repeats one
after the other, in a process of its own. On a shared machine the speed of a core drifts by
20% and more from one second to the next (a plain loop of 0.1 s measured 93 to 146 ms here),
so two executors timed minutes apart compare two machines: the same commit gave a cold 1,000-job
chain 1.65x and 2.34x its uncached run. Here one worker process per shape runs ``repeats``
rounds; each round runs both sizes uncached, cold (on an empty cache of its own) and warm (on
the cache that cold run filled), one after the other. A ratio is taken within each round, then
its median over the rounds is reported, with the spread:

* cold / uncached at each size (issue 15: chain <= 1.3, replace <= 1.5);
* warm - uncached per job at the large size (the cache's overhead on a hit);
* time(large) / time(small) for each executor (issue 15: <= 11 for 1,000 and 10,000 jobs).

Every run is cross-checked: each size gives one final output, cold runs serve nothing and warm
runs serve hits only.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from benchmarks.common import Mode, fmt_ratio, run_worker, table

__all__ = [
    "PAIRED_SHAPES",
    "overhead_per_job",
    "paired_sizes",
    "paired_table",
    "ratio",
    "run_paired",
    "scaling",
]

#: The shapes the targets are set on.
PAIRED_SHAPES = ("chain", "replace")


def paired_sizes(mode: Mode) -> tuple[int, int]:
    """(small, large) flow sizes."""
    return (100, 300) if mode.quick else (1000, 10000)


def run_paired(mode: Mode) -> list[dict[str, Any]]:
    """One worker process per shape; see the module docstring."""
    sizes = paired_sizes(mode)
    repeats = 2 if mode.quick else 5
    results = []
    for shape in PAIRED_SHAPES:
        task = {
            "kind": "paired",
            "shape": shape,
            "sizes": list(sizes),
            "repeats": repeats,
            "cache_dir": str(mode.tmp / "caches" / f"paired-{shape}"),
            "id": f"paired/{shape}",
        }
        # a round of the full mode takes ~25 s (10,000 jobs three times), at most ~120 s
        result = run_worker([task], 60 + repeats * (20 if mode.quick else 120), mode.tmp)[0]
        result.update(shape=shape, sizes=list(sizes), repeats=repeats)
        if result.get("status") == "ok":
            result["check"] = _check(result)
        results.append(result)
    return results


def _check(result: dict[str, Any]) -> str:
    bad = []
    for n, outputs in result["outputs"].items():
        if len(outputs) != 1:
            bad.append(f"{n} jobs: outputs differ {outputs}")
    for key, outcomes in result["outcomes"].items():
        executor = key.rpartition("/")[2]
        if executor == "cold" and outcomes.get("hit"):
            bad.append(f"{key} served {outcomes['hit']} hits")
        others = {k: v for k, v in outcomes.items() if k not in ("hit", "none")}
        if executor == "warm" and (not outcomes.get("hit") or others):
            bad.append(f"{key} outcomes {outcomes}")
    return "; ".join(bad)


def _rounds(result: dict[str, Any], n: int, executor: str) -> list[float]:
    return list(result["times"][str(n)][executor])


def ratio(result: dict[str, Any], top: tuple[int, str], bottom: tuple[int, str]) -> list[float]:
    """``top`` / ``bottom`` time, (size, executor) each, within each round."""
    return [a / b for a, b in zip(_rounds(result, *top), _rounds(result, *bottom)) if b > 0]


def scaling(result: dict[str, Any], executor: str) -> list[float]:
    """time(large) / time(small) of ``executor`` within each round."""
    small, large = result["sizes"]
    return ratio(result, (large, executor), (small, executor))


def overhead_per_job(result: dict[str, Any]) -> list[float]:
    """(warm - uncached) / n at the large size, seconds, within each round."""
    large = result["sizes"][1]
    warm, uncached = _rounds(result, large, "warm"), _rounds(result, large, "uncached")
    return [(w - u) / large for w, u in zip(warm, uncached)]


def spread(values: Sequence[float]) -> str:
    """``median (min-max)`` of ``values``."""
    if not values:
        return "-"
    return f"{fmt_ratio(statistics.median(values))} ({min(values):.2f}-{max(values):.2f})"


def paired_table(results: list[dict[str, Any]]) -> str:
    """Per shape: the ratios within rounds (median, and min-max over the rounds)."""
    rows = []
    for result in results:
        shape = result.get("shape", "?")
        if result.get("status") != "ok":
            rows.append([shape, result.get("status", "?"), "", "", "", "", ""])
            continue
        small, large = result["sizes"]
        rows.append(
            [
                shape,
                spread(ratio(result, (small, "cold"), (small, "uncached"))),
                spread(ratio(result, (large, "cold"), (large, "uncached"))),
                *(spread(scaling(result, ex)) for ex in ("uncached", "cold", "warm")),
                result.get("check", ""),
            ]
        )
    sizes = results[0].get("sizes", ["n", "10n"]) if results else ["n", "10n"]
    repeats = results[0].get("repeats", "?") if results else "?"
    return table(
        f"Interleaved runs, one process per shape ({repeats} rounds): median (min-max) of "
        "the ratio within each round",
        [
            "shape",
            f"cold/uncached {sizes[0]}",
            f"cold/uncached {sizes[1]}",
            f"uncached {sizes[1]}/{sizes[0]}",
            f"cold {sizes[1]}/{sizes[0]}",
            f"warm {sizes[1]}/{sizes[0]}",
            "check",
        ],
        rows,
    )
