"""jobflow-cache demo: a flow run twice, in two separate processes, on the embedded default store.

    python examples/demo.py

Run 1 computes every job (each "relaxation" sleeps to stand in for hours of DFT) and records it;
run 2 builds the flow again from scratch (fresh ``Maker.make()``, all-new UUIDs) in a new Python
process, and every job is served from the cache, run-folder files included.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from jobflow import Flow, JobStore, Maker, Response, job
from maggma.stores import MemoryStore

from jobflow_cache import Cache, run_locally

WORK = 0.4  # seconds of "compute" per relaxation


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


def run_once(label: str) -> None:
    """One run in this process: print a short report as JSON for the parent."""
    cache = Cache()
    store = JobStore(MemoryStore())
    flow = make_flow()
    started = time.perf_counter()
    run_locally(
        flow,
        store=store,
        cache=cache,
        log=False,
        create_folders=True,
        root_dir=Path(os.environ["DEMO_ROOT"]) / label,
        ensure_success=True,
    )
    report = cache.report
    print(
        json.dumps(
            {
                "executed": len(report.executed),
                "served": len(report.served),
                "seconds": time.perf_counter() - started,
                "saved": report.time_saved,
                "result": store.get_output(flow[2].uuid),
                "store": cache.store.name,
            }
        )
    )


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="jobflow-cache-demo-"))
    env = {**os.environ, "JOBFLOW_CACHE_DIR": str(root / "cache"), "DEMO_ROOT": str(root)}
    print(f"jobflow-cache demo: cache in {root / 'cache'}")
    results = []
    for label in ("run1", "run2"):
        print(f"  {label}: starting a fresh Python process ...", flush=True)
        out = subprocess.run(
            [sys.executable, __file__, "--run", label],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        results.append(r)
        print(
            f"  {label}: {r['executed']:2d} jobs executed, {r['served']:2d} served from cache "
            f"in {r['seconds']:.1f} s (compute saved: {r['saved']:.1f} s); "
            f"minimum at V={r['result']['volume']:.2f}"
        )
    first, second = results
    assert first["result"] == second["result"], "cached results must equal computed ones"
    if second["executed"] == 0:
        print(
            f"run 2: every job ({second['served']}) was served from the cache; "
            f"{first['seconds'] / max(second['seconds'], 1e-9):.0f}x faster, same result."
        )
    else:
        print(f"run 2 executed {second['executed']} jobs: the cache did not serve everything")
        sys.exit(1)
    print(f"store: {first['store']}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--run":
        run_once(sys.argv[2])
    else:
        main()
