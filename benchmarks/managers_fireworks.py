"""What a cache hit costs under FireWorks: an atomate2 flow (EMT) cold, served in the rockets,
and served ahead of submission.

Run from the repository root: ``python -m benchmarks.managers_fireworks [--kind elastic]
[--repeats 1] [--out FILE]``. Every phase is the real thing, as in ``tests/managers``: a fresh
flow built in a fresh process (``cache_flow``), ``flow_to_workflow``, added to a LaunchPad
(FireWorks' file-persisted mongomock: no MongoDB here), then ``rlaunch rapidfire`` in another
process, each rocket in its own launcher folder, writing to a JobStore of ``JSONStore`` files.

Phases, in this order, each against the cache the earlier ones filled:

``plain``
    the flow without ``cache_flow`` (no cache at all): the baseline.
``cold``
    marked, empty cache: every job computes and is recorded.
``worker``
    a fresh flow, fully cached: every firework is launched and served in its rocket.
``ahead``
    a fresh flow, fully cached: ``plan(flow).apply(store)`` serves it into the JobStore in
    the submitting process, nothing is added, and ``rlaunch rapidfire`` finds nothing.

Times are wall-clock seconds of whole processes (start-up and imports included, as a user
pays them): ``submit`` (build, plan/apply, convert, add), ``rockets`` (the ``rlaunch``
process), ``total``; plus ``rlaunch`` (inside the rocket process) and ``plan_apply``. Results
go to a JSON file (default ``benchmarks/results/managers_fireworks-<time>.json``) and a table
on stdout. Never asserted by tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, fmt_seconds, machine_facts, table

__all__ = ["PHASES", "main", "measure"]

logger = logging.getLogger(__name__)

PHASES = ("plain", "cold", "worker", "ahead")


def _clean_environment(tmp: Path) -> None:
    """This process and its workers use a cache of their own under ``tmp`` (never the
    user's), with no settings file; executions are not counted (the counter's profiler
    would slow served jobs down)."""
    for name in [n for n in os.environ if n.startswith("JOBFLOW_CACHE_")]:
        del os.environ[name]
    os.environ.pop("JFC_COUNTS_FILE", None)
    os.environ["JOBFLOW_CACHE_DIR"] = str(tmp / "cache")
    os.environ["JOBFLOW_CACHE_CONFIG_FILE"] = os.devnull
    os.environ["PYTHONHASHSEED"] = "0"


def _phase(site: Any, phase: str, kind: str, name: str) -> dict[str, Any]:
    run = site.submit(name, kind, plain=phase == "plain", ahead=phase == "ahead")
    launch = site.rapidfire(name)
    outcomes = site.outcomes(name)
    return {
        "phase": phase,
        "submit": run.wall,
        "rockets": launch.wall,
        "total": run.wall + launch.wall,
        "rlaunch": launch.seconds,
        "plan_apply": run.seconds.get("plan_apply"),
        "build": run.seconds.get("build"),
        "fireworks_added": len(run.fw_ids),
        "rockets_launched": launch.launched,
        "jobs_in_store": len(outcomes),
        "outcomes": {o or "none": list(outcomes.values()).count(o) for o in set(outcomes.values())},
        "remaining": run.remaining,
        "cache_warnings": run.cache_warnings,
    }


def measure(kind: str, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    """Every phase ``repeats`` times (cold and plain on a fresh cache each time)."""
    sys.path.insert(0, str(ROOT))
    from tests.managers.fw_site import FireWorksSite

    rows = []
    for rep in range(repeats):
        work = tmp / f"rep{rep}"
        _clean_environment(work)
        site = FireWorksSite(work / "fw")
        for phase in PHASES:
            started = time.perf_counter()
            row = _phase(site, phase, kind, phase)
            row["repeat"] = rep
            rows.append(row)
            logger.info("%s %s: %.1f s", kind, phase, time.perf_counter() - started)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median of every time per phase."""
    out = []
    for phase in PHASES:
        mine = [r for r in rows if r["phase"] == phase]
        summary: dict[str, Any] = {"phase": phase, "n": len(mine)}
        for key in ("submit", "rockets", "total", "rlaunch", "plan_apply"):
            values = [r[key] for r in mine if r[key] is not None]
            summary[key] = statistics.median(values) if values else None
        summary["rockets_launched"] = mine[-1]["rockets_launched"]
        summary["jobs_in_store"] = mine[-1]["jobs_in_store"]
        summary["outcomes"] = mine[-1]["outcomes"]
        out.append(summary)
    return out


def render(kind: str, summary: list[dict[str, Any]]) -> str:
    rows = [
        [
            s["phase"],
            s["rockets_launched"],
            s["jobs_in_store"],
            ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())),
            fmt_seconds(s["submit"]),
            fmt_seconds(s["plan_apply"]),
            fmt_seconds(s["rockets"]),
            fmt_seconds(s["rlaunch"]),
            fmt_seconds(s["total"]),
        ]
        for s in summary
    ]
    header = [
        "phase",
        "rockets",
        "jobs",
        "outcomes",
        "submit",
        "plan+apply",
        "rlaunch proc",
        "in rlaunch",
        "total",
    ]
    return table(f"FireWorks, atomate2 {kind} flow (EMT), wall seconds", header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="elastic", help="elastic or phonon")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, help="JSON results file")
    parser.add_argument("--tmp", type=Path, help="scratch folder (default: a new temp folder)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or ROOT / "benchmarks" / "results" / f"managers_fireworks-{stamp}.json"
    tmp = Path(tempfile.mkdtemp(prefix="jfc-bench-fw-", dir=args.tmp))
    saved = dict(os.environ)
    started = time.perf_counter()
    try:
        rows = measure(args.kind, args.repeats, tmp)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(rows)
    results = {
        "benchmark": "managers_fireworks",
        "started": stamp,
        "kind": args.kind,
        "repeats": args.repeats,
        "machine": machine_facts(),
        "runs": rows,
        "summary": summary,
        "duration_s": time.perf_counter() - started,
    }
    print(render(args.kind, summary))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
