"""jobflow-cache demo: a flow run twice, in two separate processes, on the embedded default store.

    python examples/demo.py

Run 1 computes every job (each "relaxation" sleeps to stand in for hours of DFT) and records it;
run 2 builds the flow again from scratch (fresh ``Maker.make()``, all-new UUIDs, new run folders)
in a new Python process, and every job is served from the cache, run-folder files included.
The demo then reports what each run did, the time saved, and where the cache lives.

Progress goes to stderr while a run is going: a counter updated in place on a terminal, one
line every ``PROGRESS_EVERY`` jobs otherwise. The report goes to stdout. The exit code is 1 when
the second run executed anything or its result differs from the first run's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from jobflow import Flow, JobStore, Maker, Response, job
from maggma.stores import MemoryStore

from jobflow_cache import Cache, CacheReport, run_locally

WORK = 0.4  # seconds of "compute" per relaxation
PROGRESS_EVERY = 25  # without a terminal: one progress line per this many jobs


@dataclass
class RelaxMaker(Maker):
    """Stands in for an atomate2 relaxation: writes an OUTCAR and returns an energy."""

    name: str = "relax"
    force_tol: float = 0.01

    @job
    def make(self, volume: float):
        time.sleep(WORK)
        energy = round((volume - 40.0) ** 2 / 10 - 5.0, 6)
        Path("OUTCAR").write_text(f"volume={volume} energy={energy}\n")
        return {"volume": volume, "energy": energy, "dir_name": os.getcwd()}


@job
def deform(volume: float, strains: list[float]):
    """A dynamic job: replaces itself with one relaxation per strain (like atomate2's EOS)."""
    relaxes = [RelaxMaker(name=f"relax {s:+.2f}").make(volume * (1 + s)) for s in strains]
    return Response(replace=Flow(relaxes, output=[r.output for r in relaxes]))


@job
def fit_minimum(points: list[dict]):
    best = min(points, key=lambda p: p["energy"])
    return {"volume": best["volume"], "energy": best["energy"]}


def make_flow() -> Flow:
    start = RelaxMaker(name="relax start").make(42.0)
    eos = deform(start.output["volume"], [-0.06, -0.04, -0.02, 0.0, 0.02, 0.04])
    fit = fit_minimum(eos.output)
    return Flow([start, eos, fit], name="demo EOS")


class Progress(logging.Handler):
    """Counts the jobs the cache handles (one ``jobflow.cache`` record per served or recorded
    job) and shows the count on stderr."""

    def __init__(self, label: str, report: CacheReport) -> None:
        super().__init__(logging.DEBUG)
        self.label, self.report = label, report
        self.tty = sys.stderr.isatty()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        served, executed = len(self.report.served), len(self.report.executed)
        jobs = "job" if self.count == 1 else "jobs"
        line = f"  {self.label}: {self.count} {jobs} done ({served} served, {executed} executed)"
        if self.tty:
            sys.stderr.write(f"\r{line}\x1b[K")
            sys.stderr.flush()
        elif self.count % PROGRESS_EVERY == 0:
            print(line, file=sys.stderr, flush=True)

    def finish(self) -> None:
        if self.tty and self.count:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def run_once(label: str) -> None:
    """One run in this process; the last line of stdout is a JSON summary for the parent."""
    # jobflow's own deprecation notices (monty's ``cd``) are not the demo's business
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"jobflow\.")
    cache = Cache()
    progress = Progress(label.replace("run", "run "), cache.report)
    cache_log = logging.getLogger("jobflow.cache")
    cache_log.setLevel(logging.DEBUG)
    cache_log.addHandler(progress)
    store = JobStore(MemoryStore())
    flow = make_flow()
    started = time.perf_counter()
    try:
        run_locally(
            flow,
            store=store,
            cache=cache,
            log=False,
            create_folders=True,
            root_dir=Path(os.environ["DEMO_ROOT"]) / label,
            ensure_success=True,
        )
    finally:
        progress.finish()
    seconds = time.perf_counter() - started
    report = cache.report
    print(
        json.dumps(
            {
                "executed": len(report.executed),
                "served": len(report.served),
                "seconds": seconds,
                "saved": report.time_saved,
                "result": store.get_output(flow[2].uuid),
                "store": cache.store.name,
                "objects_dir": str(cache.store.objects_dir),
                "entries": cache.store.count(),
            }
        )
    )


def size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="jobflow-cache-demo-"))
    cache_dir = root / "cache"
    env = {**os.environ, "JOBFLOW_CACHE_DIR": str(cache_dir), "DEMO_ROOT": str(root)}
    env.pop("JOBFLOW_CACHE_STORE", None)  # always the embedded default store
    env.pop("JOBFLOW_CACHE_OBJECTS_DIR", None)
    print("jobflow-cache demo: an equation-of-state flow of 9 jobs (a relaxation, a dynamic job")
    print("that makes 6 strained relaxations, and a fit) run twice, each time in a new Python")
    print(f"process. Each relaxation sleeps {WORK} s in place of hours of DFT.\n", flush=True)
    results = []
    for label in ("run1", "run2"):
        (root / label).mkdir()
        out = subprocess.run(
            [sys.executable, __file__, "--run", label],
            env=env,
            check=True,
            stdout=subprocess.PIPE,  # stderr (progress, warnings) goes straight to the user
            text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    first, second = results

    print(f"         {'jobs':>4}  {'executed':>8}  {'served':>6}  {'wall time':>9}  compute saved")
    for label, r in zip(("run 1", "run 2"), results):
        jobs = r["executed"] + r["served"]
        print(
            f"{label:7}  {jobs:4d}  {r['executed']:8d}  {r['served']:6d}  "
            f"{r['seconds']:7.1f} s  {r['saved']:11.1f} s"
        )
    print()
    same = first["result"] == second["result"]
    result = second["result"]
    print(
        f"result: minimum at V={result['volume']:.2f}, E={result['energy']:.3f} "
        f"({'the same in both runs' if same else 'DIFFERENT from run 1'})"
    )
    outcars = sorted((root / "run2").glob("job_*/OUTCAR"))
    objects = [p for p in Path(second["objects_dir"]).rglob("*") if p.is_file()]
    inodes = {p.stat().st_ino for p in objects}
    linked = sum(p.stat().st_ino in inodes for p in outcars)
    if second["executed"] == 0:
        print(
            f"run 2 rebuilt the flow (new UUIDs, new run folders) and executed none of its jobs: "
            f"{first['seconds'] / max(second['seconds'], 1e-9):.0f}x faster."
        )
    stored = {p.read_bytes() for p in objects}
    restored = sum(p.read_bytes() in stored for p in outcars)
    how = f"{linked} of them hard links" if linked else "copies: editing one leaves the cache"
    print(f"run 2's {len(outcars)} OUTCAR files: {restored} restored from the cache ({how}).")
    print("\nwhere the cache lives")
    print(f"  store    {second['store']}  ({second['entries']} entries)")
    print(
        f"  objects  {second['objects_dir']}  ({len(objects)} files, "
        f"{size(sum(p.stat().st_size for p in objects))})"
    )
    print(f"  runs     {root / 'run1'}, {root / 'run2'}")
    print(f"look inside: JOBFLOW_CACHE_DIR={cache_dir} {cachetool()} ls")
    if second["executed"] or not same:
        print(f"run 2 executed {second['executed']} jobs: the cache did not serve everything")
        sys.exit(1)


def cachetool() -> str:
    """How to call the cachetool installed beside this Python (``.venv/bin/cachetool`` when
    the venv is not activated), so the hint works as printed."""
    tool = Path(sys.executable).parent / "cachetool"
    found = shutil.which("cachetool")
    if found and Path(found).resolve() == tool.resolve():
        return "cachetool"
    relative = os.path.relpath(tool)
    return relative if not relative.startswith("..") else str(tool)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        run_once(sys.argv[2])
    else:
        main()
