"""The issue's performance targets, each judged PASS / FAIL from this run's measurements.

``INCONCLUSIVE`` means only a lower bound is known and it is below the target (a baseline hit
its time limit). ``NOT MEASURED`` means the benchmark it needs did not run or crashed. In quick
mode the flow targets are judged at the quick sizes and are only indicative.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any, TypeGuard

from benchmarks import bench_paired
from benchmarks.bench_flows import find, memory_size
from benchmarks.common import Mode, table

__all__ = ["evaluate", "targets_table"]

logger = logging.getLogger(__name__)

#: Largest time(10 n)/time(n) of a flow shape (issue 15: 11; issue 4 had 12).
SCALING = 11
#: Largest cold (all misses recorded) / uncached time per shape (issue 15).
COLD_OVER_UNCACHED = {"chain": 1.3, "replace": 1.5}
#: Hit-count write: largest median per call (seconds), and largest largest/smallest-size ratio.
HIT_COUNT_S, HIT_COUNT_GROWTH = 1e-4, 2.0
#: Largest warm (hit) / uncached one-job run at the largest output size.
LARGE_HIT_OVER_UNCACHED = 1.15
#: Smallest AiiDA cached calcfunction / our warm job (issue 15 measured 160-180x).
AIIDA_OVER_OURS = 100


def _target(
    name: str,
    value: float | None,
    limit: float,
    *,
    higher_is_better: bool,
    lower_bound: bool = False,
    unit: str = "x",
    detail: str = "",
    invalid: str = "",
) -> dict[str, Any]:
    if value is None:
        status = "NOT MEASURED"
    elif invalid:
        status = "INVALID"
    else:
        ok = value >= limit if higher_is_better else value <= limit
        status = "PASS" if ok else ("INCONCLUSIVE" if lower_bound else "FAIL")
    return {
        "target": name,
        "value": value,
        "lower_bound": lower_bound,
        "limit": limit,
        "op": ">=" if higher_is_better else "<=",
        "unit": unit,
        "status": status,
        "detail": invalid or detail,
    }


def _ok(run: dict[str, Any] | None) -> TypeGuard[dict[str, Any]]:
    return run is not None and run.get("status") == "ok"


def _checked(*runs: dict[str, Any] | None) -> str:
    return "; ".join(f"{r['executor']}: {r['check']}" for r in runs if r and r.get("check"))


def _paired_of(paired: list[dict[str, Any]], shape: str) -> dict[str, Any] | None:
    """The interleaved runs of ``shape`` when they ran and cross-checked."""
    for result in paired:
        if result.get("shape") == shape and result.get("status") == "ok":
            return result
    return None


def _from_rounds(
    interleaved: dict[str, Any], values: list[float], suffix: str = ""
) -> tuple[float | None, str, str]:
    """(value, detail, invalid) of a target judged on ``values``, one per interleaved round:
    their median, their spread, and the cross-check of the runs they came from."""
    invalid = interleaved.get("check", "")
    if not values:
        return None, "", invalid
    detail = f"median of {len(values)} interleaved rounds ({min(values):.2f}-{max(values):.2f})"
    return statistics.median(values), detail + suffix, invalid


def _flow_targets(
    flows: list[dict[str, Any]], paired: list[dict[str, Any]], mode: Mode
) -> list[dict[str, Any]]:
    """The flow targets; a ratio of two executors or sizes is taken from the interleaved
    runs (:mod:`benchmarks.bench_paired`) when they ran, else from the flow-shape runs."""
    out = []
    big = 300 if mode.quick else 5000
    small, large = bench_paired.paired_sizes(mode)  # the flow-shape runs have them too
    for shape, label in (("chain", "chain"), ("replace", "dynamic fan-out (replace)")):
        base = find(flows, shape, big, "jobflow")
        for executor in ("cold", "uncached") if flows else ():  # jobflow's runs are in flows
            ours = find(flows, shape, big, executor)
            value = None
            if _ok(ours) and base is not None:
                value = base["seconds"] / ours["seconds"]
            cache = "cache on, all misses" if executor == "cold" else "cache=False"
            out.append(
                _target(
                    f"{big}-job {label}: jobflow.run_locally / ours ({cache})",
                    value,
                    10,
                    higher_is_better=True,
                    lower_bound=bool(base and base.get("lower_bound")),
                    detail=f"jobflow {base['seconds']:.1f} s" if base else "",
                    invalid=_checked(base, ours),
                )
            )
        limit = SCALING if not mode.quick else (large / small) ** math.log10(SCALING)
        interleaved = _paired_of(paired, shape)
        for executor in ("uncached", "cold", "warm"):
            if interleaved is not None:
                value, detail, invalid = _from_rounds(
                    interleaved, bench_paired.scaling(interleaved, executor)
                )
            else:
                a, b = find(flows, shape, small, executor), find(flows, shape, large, executor)
                value = b["seconds"] / a["seconds"] if _ok(a) and _ok(b) else None
                detail = "" if _ok(b) else f"{large} jobs: {b.get('status') if b else 'not run'}"
                invalid = _checked(a, b)
            out.append(
                _target(
                    f"{label}, ours {executor}: time({large})/time({small})",
                    value,
                    round(limit, 2),
                    higher_is_better=False,
                    invalid=invalid,
                    detail=detail,
                )
            )
    labels = (("chain", "chain"), ("replace", "dynamic fan-out (replace)"))
    for shape, label in labels if flows else ():
        # issue 15: >= 14x jobflow's run_locally at 1,000 jobs, cache on
        base, ours = find(flows, shape, small, "jobflow"), find(flows, shape, small, "cold")
        value = base["seconds"] / ours["seconds"] if _ok(ours) and base is not None else None
        out.append(
            _target(
                f"{small}-job {label}: jobflow.run_locally / ours (cache on, all misses)",
                value,
                14,
                higher_is_better=True,
                lower_bound=bool(base and base.get("lower_bound")),
                detail=f"jobflow {base['seconds']:.2f} s" if base else "",
                invalid=_checked(base, ours),
            )
        )
    for n in (small, large):  # issue 15: at 1,000 and 10,000 jobs
        for shape in ("chain", "replace"):
            interleaved = _paired_of(paired, shape)
            if interleaved is not None:
                rounds = bench_paired.ratio(interleaved, (n, "cold"), (n, "uncached"))
                value, detail, invalid = _from_rounds(interleaved, rounds)
            else:
                uncached, cold = find(flows, shape, n, "uncached"), find(flows, shape, n, "cold")
                value = None
                if _ok(cold) and _ok(uncached):
                    value = cold["seconds"] / uncached["seconds"]
                detail, invalid = "", _checked(uncached, cold)
            out.append(
                _target(
                    f"{n}-job {shape}: cold (all misses recorded) / uncached",
                    value,
                    COLD_OVER_UNCACHED[shape],
                    higher_is_better=False,
                    invalid=invalid,
                    detail=detail,
                )
            )
    interleaved = _paired_of(paired, "replace")
    if interleaved is not None:
        per_job = [s * 1e3 for s in bench_paired.overhead_per_job(interleaved)]
        value, detail, invalid = _from_rounds(interleaved, per_job, "; (warm - uncached) / jobs")
    else:
        uncached, warm = (
            find(flows, "replace", large, "uncached"),
            find(flows, "replace", large, "warm"),
        )
        value = None
        if _ok(uncached) and _ok(warm):
            value = (warm["seconds"] - uncached["seconds"]) / large * 1e3
        detail, invalid = "(warm - uncached) / jobs", _checked(uncached, warm)
    out.append(
        _target(
            f"{large}-job dynamic flow, warm (all hits): cache overhead per job",
            value,
            0.5,
            higher_is_better=False,
            unit=" ms",
            detail=detail,
            invalid=invalid,
        )
    )
    return out


def evaluate(results: dict[str, Any], mode: Mode) -> list[dict[str, Any]]:
    """All targets that this run's measurements can judge."""
    out: list[dict[str, Any]] = []
    flows = results.get("flows") or []
    if flows or results.get("paired"):
        out += _flow_targets(flows, results.get("paired") or [], mode)
    toggle = results.get("toggle")
    if toggle:
        value = toggle["disabled"] / toggle["uncached"] if toggle.get("status") == "ok" else None
        out.append(
            _target(
                f"JOBFLOW_CACHE_DISABLE=1 / cache=False, {toggle['n']}-job chain (medians)",
                value,
                1.05,
                higher_is_better=False,
            )
        )
    work = results.get("work") or []
    if work:
        n = work[0]["n"]
        recompute, warm = (
            find(work, "replace", n, "uncached", 0.01),
            find(work, "replace", n, "warm", 0.01),
        )
        value = recompute["seconds"] / warm["seconds"] if _ok(recompute) and _ok(warm) else None
        out.append(
            _target(
                f"{n}-job dynamic flow, 10 ms jobs: recompute (uncached) / warm",
                value,
                20,
                higher_is_better=True,
                invalid=_checked(recompute, warm),
            )
        )
    hashing = results.get("hashing") or []
    if hashing:
        out += _hashing_targets(hashing)
    files = results.get("files") or []
    big = [row for row in files if row["bytes"] >= 2**26]
    if big:
        row = big[-1]
        out.append(
            _target(
                f"hard-linked hit of a {row['bytes'] / 2**30:.2g} GB run folder: copy / link",
                row["copy_over_link"],
                50,
                higher_is_better=True,
                detail="" if row["bytes"] >= 2**30 else "(quick: smaller folder)",
                invalid="" if row["hard_linked"] else "files were copied, not linked",
            )
        )
    memory = results.get("memory") or flows
    if memory:
        n = memory_size(mode)
        uncached, warm = find(memory, "replace", n, "uncached"), find(memory, "replace", n, "warm")
        value = None
        if _ok(uncached) and _ok(warm):
            value = warm["rss_peak_mb"] / uncached["rss_peak_mb"]
        out.append(
            _target(
                f"{n}-job dynamic flow: peak RSS warm / uncached",
                value,
                1.5,
                higher_is_better=False,
            )
        )
    if results.get("outputs"):
        out += _output_targets(results["outputs"])
    if results.get("peers"):
        out += _peer_targets(results["peers"])
    store = results.get("store")
    if store and store.get("levels"):
        levels = store["levels"]
        first, last = levels[0], levels[-1]
        value = last["lookup_hit"]["median"] / first["lookup_hit"]["median"]
        limit = math.log(last["size"]) / math.log(first["size"])
        out.append(
            _target(
                f"store lookup at {last['size']:,} / at {first['size']:,} entries (<= log n ratio)",
                value,
                round(limit, 2),
                higher_is_better=False,
            )
        )
    return out


def _output_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15: a hit-count write costs < 0.1 ms at every output size and the same at any size;
    a hit on the largest output is within 1.15x of the uncached run."""
    out = []
    ok = [row for row in rows if row.get("status") == "ok"]
    for row in rows:
        hit = (row.get("record_hit") or {}).get("median") if row.get("status") == "ok" else None
        out.append(
            _target(
                f"hit-count write on an entry with a {row['label']} output (record_hit)",
                hit * 1e3 if hit is not None else None,
                HIT_COUNT_S * 1e3,
                higher_is_better=False,
                unit=" ms",
                detail="median" if hit is not None else row.get("status", ""),
            )
        )
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    a = (first.get("record_hit") or {}).get("median") if first in ok else None
    b = (last.get("record_hit") or {}).get("median") if last in ok else None
    out.append(
        _target(
            f"hit-count write: {last.get('label', '?')} / {first.get('label', '?')} output",
            b / a if a and b else None,
            HIT_COUNT_GROWTH,
            higher_is_better=False,
        )
    )
    warm, uncached = (last.get("warm"), last.get("uncached")) if last in ok else (None, None)
    out.append(
        _target(
            f"one job with a {last.get('label', '?')} output: hit (warm) / uncached run",
            warm / uncached if warm and uncached else None,
            LARGE_HIT_OVER_UNCACHED,
            higher_is_better=False,
            detail="uncached = compute + JobStore write",
            invalid=last.get("check", "") if last in ok else "",
        )
    )
    return out


def _peer_targets(peers: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 15: the cache's own part of a warm job is no more than a joblib.Memory hit, in
    the same flow (like with like) and against the hot-loop hit (the issue's first measure);
    AiiDA's cached calcfunction stays far behind (when aiida-core is installed)."""
    ok = peers.get("status") == "ok"
    own = peers.get("own_part") if ok else None
    out = []
    for label, key in (
        ("own part of a warm job / a joblib.Memory hit in the same flow", "joblib_in_flow"),
        ("own part of a warm job / a joblib.Memory hit in a hot loop", "joblib"),
    ):
        joblib = (peers.get(key) or {}) if ok else {}
        hit = joblib.get("median") if joblib.get("status") == "ok" else None
        out.append(
            _target(
                label,
                own / hit if own is not None and hit and hit > 0 else None,
                1.0,
                higher_is_better=False,
                detail=(
                    f"ours {own * 1e3:.3f} ms, joblib {hit * 1e3:.3f} ms"
                    if own is not None and hit
                    else joblib.get("reason", "")
                ),
                invalid=peers.get("check", "") if ok else "",
            )
        )
    aiida = (peers.get("aiida") or {}) if ok else {}
    seconds = aiida.get("median") if aiida.get("status") == "ok" else None
    warm = peers.get("warm_per_job") if ok else None
    out.append(
        _target(
            "AiiDA cached calcfunction / our warm job (per cached call)",
            seconds / warm if seconds and warm else None,
            AIIDA_OVER_OURS,
            higher_is_better=True,
            detail=f"skipped: {aiida['reason']}"
            if aiida.get("status") == "skipped"
            else aiida.get("reason", ""),
        )
    )
    return out


def _hashing_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def median(name: str, method: str) -> float | None:
        for row in rows:
            if row["input"] == name and row["method"] == method and "median" in row:
                return float(row["median"])
        return None

    out = []
    name = "Structure 100 sites (dict)"
    ours, joblib, floor = median(name, "ours"), median(name, "joblib"), median(name, "orjson+xxh3")
    out.append(
        _target(
            "hash a 100-site Structure dict: joblib.hash / ours",
            joblib / ours if joblib and ours else None,
            20,
            higher_is_better=True,
        )
    )
    out.append(
        _target(
            "hash a 100-site Structure dict: ours / (sorted orjson + xxh3)",
            ours / floor if ours and floor else None,
            3,
            higher_is_better=False,
        )
    )
    name = "float64 array, 1e6 elements"
    ours, raw = median(name, "ours"), median(name, "xxh3 raw")
    out.append(
        _target(
            "hash a 1e6-element float64 array: ours / xxh3 of its bytes",
            ours / raw if ours and raw else None,
            2,
            higher_is_better=False,
        )
    )
    return out


def targets_table(targets: list[dict[str, Any]], quick: bool = False) -> str:
    """Targets with their measured value and verdict."""
    rows = []
    for t in targets:
        value = (
            "-"
            if t["value"] is None
            else f"{'>= ' if t['lower_bound'] else ''}{t['value']:.3g}{t['unit']}"
        )
        rows.append(
            [
                t["status"],
                t["target"],
                value,
                f"{t['op']} {t['limit']:g}{t['unit']}",
                t["detail"][:60],
            ]
        )
    title = "Targets" + (" (quick mode: small sizes, so only indicative)" if quick else "")
    return table(title, ["status", "target", "measured", "limit", "note"], rows)
