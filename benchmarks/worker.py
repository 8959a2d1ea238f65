"""Benchmark worker: runs measurement tasks in a fresh process and prints one JSON line each.

Run as ``python -m benchmarks.worker TASKS.json`` (or with the JSON list of tasks on stdin).
Each result is printed as soon as it is ready, on a line starting with ``common.MARK``, so a
parent that kills a worker at its time limit still gets the results of the tasks that finished.

Task kinds
----------
``flow``
    Run one flow shape with one executor ``repeats`` times (fresh flow instance each time).
``toggle``
    Alternate our executor with ``cache=False`` and with ``JOBFLOW_CACHE_DISABLE=1`` in one
    process, so the two are compared under identical conditions.
``writer``
    Put entries into a cache store from this process once the parent says go (two of these
    run at once to measure concurrent writers).
``output``
    One job with a large output: uncached, cold and warm runs side by side, then the cost of
    one hit-count write on the entry (:mod:`benchmarks.bench_outputs`).
``paired``
    One flow shape uncached, cold and warm, interleaved run by run at two sizes in one
    process, so that each ratio compares runs made under the same conditions
    (:mod:`benchmarks.bench_paired`).
``peers``
    The cache's own part of a warm job next to a joblib.Memory hit, and an AiiDA cached
    calcfunction when aiida-core is installed (:mod:`benchmarks.bench_outputs`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from typing import Any

import jobflow
from jobflow import JobStore
from maggma.stores import MemoryStore

import jobflow_cache
from benchmarks.common import MARK, time_call
from benchmarks.entries import cache_store, sealed_entry
from benchmarks.flows import big_output, build, final_output, memo_chain, payload, plain_step

__all__ = ["main"]

logger = logging.getLogger(__name__)

_CACHE_ENV = ("JOBFLOW_CACHE_DIR", "JOBFLOW_CACHE_DISABLE")
#: :func:`run_flow_once`'s shape of a chain whose jobs call a joblib.Memory-memoised function.
MEMO = "joblib-chain"
#: Parent folder of the run folders (set by :func:`main`; the system temp folder by default).
_RUNS_ROOT: str | None = None


# --------------------------------------------------------------------------- memory
def _status_kb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False if impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def rss_mb() -> float:
    """Current resident set size in MB."""
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def peak_rss_mb() -> float:
    """Peak resident set size in MB since the last :func:`reset_peak_rss` (or process start)."""
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# --------------------------------------------------------------------------- warnings
class _WarningCounter:
    """Counts warnings by category (and keeps the first few cache warnings' text)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.examples: list[str] = []

    def __call__(self, message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        self.counts[category.__name__] += 1
        if category.__name__ == "CacheWarning" and len(self.examples) < 3:
            self.examples.append(str(message)[:300])


# --------------------------------------------------------------------------- flows
def _set_env(executor: str, cache_dir: str | None) -> None:
    for name in _CACHE_ENV:
        os.environ.pop(name, None)
    if cache_dir:
        os.environ["JOBFLOW_CACHE_DIR"] = cache_dir
    if executor == "disabled":
        os.environ["JOBFLOW_CACHE_DISABLE"] = "1"


def _execute(executor: str, flow: Any, store: Any) -> Any:
    if executor == "jobflow":
        return jobflow.run_locally(flow, store=store, log=False)
    if executor == "uncached":
        return jobflow_cache.run_locally(flow, store=store, log=False, cache=False)
    # disabled (env set), cold and warm (default embedded store under JOBFLOW_CACHE_DIR)
    return jobflow_cache.run_locally(flow, store=store, log=False)


def _outcomes(store: Any) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for doc in store.query({}, properties=["metadata"]):
        info = (doc.get("metadata") or {}).get("jobflow_cache") or {}
        counts[str(info.get("outcome", "none"))] += 1
    return dict(counts)


def run_flow_once(shape: str, n: int, executor: str, work: float, cache_dir: str | None) -> dict:
    """Build a fresh flow, run it with ``executor``; time, memory and what happened."""
    memory = cache_dir
    if shape == MEMO:  # joblib.Memory inside each job, in cache_dir; the run is uncached
        executor, cache_dir = "uncached", None
    _set_env(executor, cache_dir)
    t0 = time.perf_counter()
    flow, last = memo_chain(n, str(memory)) if shape == MEMO else build(shape, n, work)
    build_s = time.perf_counter() - t0
    store = JobStore(MemoryStore())
    store.connect()
    # jobs run in the current folder (shared-folder mode): give each run an empty one, as a
    # user's project folder, not the scratch folder that holds every benchmark's caches
    run_dir = tempfile.mkdtemp(prefix="run-", dir=_RUNS_ROOT)
    gc.collect()
    base = rss_mb()
    peak_reset = reset_peak_rss()
    previous = os.getcwd()
    os.chdir(run_dir)  # (contextlib.chdir needs Python 3.11)
    try:
        t0 = time.perf_counter()
        responses = _execute(executor, flow, store)
        seconds = time.perf_counter() - t0
    finally:
        os.chdir(previous)
    peak = peak_rss_mb()
    shutil.rmtree(run_dir, ignore_errors=True)
    result = {
        "seconds": seconds,
        "build_s": build_s,
        "rss_base_mb": round(base, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_peak_reset": peak_reset,  # False: the peak is the whole process's (not Linux)
        "responses": sum(len(runs) for runs in responses.values()),
        "output": final_output(responses, last),
        "outcomes": _outcomes(store),
    }
    _set_env("", None)
    return result


def warm_up(executor: str, workdir: str) -> None:
    """Run a 5-job chain once (twice with a cache: miss then hit) on a scratch cache.

    The first run in a process pays one-off costs (lazy imports, first store connection);
    warming up keeps them out of the per-job numbers of the measured run.
    """
    scratch = os.path.join(workdir, f"warm-up-{os.getpid()}")
    passes = 2 if executor in ("cold", "warm") else 1
    for _ in range(passes):
        run_flow_once("chain", 5, executor, 0.0, scratch)


def task_flow(task: dict) -> dict:
    """Run a ``flow`` task: ``repeats`` fresh flow instances; the median time is reported."""
    if task.get("warm_up", True):
        warm_up(task["executor"], task["workdir"])
    runs = []
    for r in range(int(task.get("repeats", 1))):
        cache_dir = task.get("cache_dir")
        if cache_dir and task["executor"] == "cold" and r > 0:
            cache_dir = f"{cache_dir}-r{r}"  # every cold repeat starts from an empty cache
        runs.append(
            run_flow_once(task["shape"], task["n"], task["executor"], task["work"], cache_dir)
        )
    times = [run["seconds"] for run in runs]
    first = runs[0]
    return {
        **first,
        "seconds": statistics.median(times),
        "times": times,
        "rss_peak_mb": max(run["rss_peak_mb"] for run in runs),
    }


def task_toggle(task: dict) -> dict:
    """Alternate ``cache=False`` and ``JOBFLOW_CACHE_DISABLE=1`` runs of the same flow shape."""
    times: dict[str, list[float]] = {"uncached": [], "disabled": []}
    warm_up("uncached", task["workdir"])
    warm_up("disabled", task["workdir"])
    for _ in range(int(task["repeats"])):
        for executor in ("uncached", "disabled"):
            run = run_flow_once(task["shape"], task["n"], executor, 0.0, task.get("cache_dir"))
            times[executor].append(run["seconds"])
    return {
        "times": times,
        "uncached": statistics.median(times["uncached"]),
        "disabled": statistics.median(times["disabled"]),
    }


# --------------------------------------------------------------------------- writers
def task_writer(task: dict) -> dict:
    """Put ``count`` entries into the store under ``cache_dir`` once ``go_file`` exists.

    The worker connects and prepares its entries first, then creates ``ready_file``; the parent
    creates ``go_file`` when every writer is ready, so the writers start together.
    """
    with cache_store(task["cache_dir"]) as cache:
        entries = [sealed_entry(f"{task['prefix']}-{i}") for i in range(int(task["count"]))]
        if task.get("ready_file"):
            with open(task["ready_file"], "w"):
                pass
            deadline = time.time() + 120
            while not os.path.exists(task["go_file"]) and time.time() < deadline:
                time.sleep(0.001)
        started = time.time()
        latencies = []
        t_all = time.perf_counter()
        for entry in entries:
            t0 = time.perf_counter()
            cache.put(entry)
            latencies.append(time.perf_counter() - t0)
        total = time.perf_counter() - t_all
    return {"started": started, "seconds": total, "latencies": latencies}


# --------------------------------------------------------------------------- large outputs
def _run_big(nbytes: int, executor: str, tag: str, cache_dir: str | None) -> dict:
    """Run one ``big_output`` job with ``executor``; its time, outcome and digest."""
    _set_env(executor, cache_dir)
    one = big_output(nbytes, tag)
    store = JobStore(MemoryStore())
    store.connect()
    gc.collect()
    t0 = time.perf_counter()
    _execute(executor, one, store)
    seconds = time.perf_counter() - t0
    doc = store.query_one({"uuid": one.uuid}, properties=["metadata"]) or {}
    info = (doc.get("metadata") or {}).get("jobflow_cache") or {}
    _set_env("", None)
    return {
        "seconds": seconds,
        "outcome": info.get("outcome", "none"),
        "digest": info.get("digest"),
    }


def _timed(fn: Any, quick: bool) -> dict[str, float]:
    if quick:
        return time_call(fn, min_time=0.05, repeats=5, max_total=2.0)
    return time_call(fn, min_time=0.2, repeats=7, max_total=8.0)


def task_output(task: dict) -> dict:
    """Uncached, cold and warm runs of a one-job flow whose output is ``nbytes`` of JSON,
    interleaved ``repeats`` times (each cold run on a fresh cache folder, its warm run after
    it); then ``CacheStore.record_hit`` timed on the entry the last cold run recorded."""
    nbytes, root = int(task["nbytes"]), task["cache_dir"]
    json_bytes = len(json.dumps(payload(nbytes), separators=(",", ":")))  # also builds it once
    scratch = os.path.join(task["workdir"], f"warm-up-output-{os.getpid()}")
    for executor in ("uncached", "cold", "warm"):  # imports, first connection, first hit
        _run_big(1024, executor, "warm-up", scratch)
    times: dict[str, list[float]] = {"uncached": [], "cold": [], "warm": []}
    outcomes: Counter[str] = Counter()
    digest, cache_dir = None, root
    previous = os.getcwd()
    run_dir = tempfile.mkdtemp(prefix="run-", dir=_RUNS_ROOT)
    os.chdir(run_dir)
    try:
        for r in range(int(task["repeats"])):
            cache_dir = f"{root}-r{r}"
            for executor in ("uncached", "cold", "warm"):
                run = _run_big(nbytes, executor, f"out-{nbytes}", cache_dir)
                times[executor].append(run["seconds"])
                outcomes[f"{executor}: {run['outcome']}"] += 1
                digest = run["digest"] or digest
    finally:
        os.chdir(previous)
        shutil.rmtree(run_dir, ignore_errors=True)
    result: dict[str, Any] = {
        "nbytes": nbytes,
        "json_bytes": json_bytes,
        "times": times,
        "outcomes": dict(outcomes),
        **{executor: statistics.median(values) for executor, values in times.items()},
    }
    if digest is not None:
        settings = jobflow_cache.CacheSettings(DIR=cache_dir)
        with jobflow_cache.CacheStore.from_settings(settings) as cache:
            cache.record_hit(digest)  # first write (page cache, statement cache)
            result["record_hit"] = _timed(lambda: cache.record_hit(digest), task["quick"])
    return result


# --------------------------------------------------------------------------- paired
def task_paired(task: dict) -> dict:
    """Uncached, cold and warm runs of one shape, interleaved: ``repeats`` rounds, each
    running every size with every executor in turn (cold on an empty cache of its own, warm
    on the cache that cold run filled). A ratio is then taken within a round, where the runs
    shared the machine's conditions, and its median over the rounds reported."""
    shape, root = task["shape"], task["cache_dir"]
    warm_up("cold", task["workdir"])
    warm_up("uncached", task["workdir"])
    times: dict[str, dict[str, list[float]]] = {}
    outcomes: dict[str, Counter[str]] = {}
    outputs: dict[str, set[str]] = {}
    for r in range(int(task["repeats"])):
        for n in task["sizes"]:
            cache_dir = os.path.join(root, f"{n}-r{r}")
            for executor in ("uncached", "cold", "warm"):
                run = run_flow_once(
                    shape, n, executor, 0.0, None if executor == "uncached" else cache_dir
                )
                key = f"{n}/{executor}"
                times.setdefault(str(n), {}).setdefault(executor, []).append(run["seconds"])
                outcomes.setdefault(key, Counter()).update(run["outcomes"])
                outputs.setdefault(str(n), set()).add(repr(run["output"]))
            shutil.rmtree(cache_dir, ignore_errors=True)
    return {
        "times": times,
        "outcomes": {key: dict(counts) for key, counts in outcomes.items()},
        "outputs": {n: sorted(found) for n, found in outputs.items()},
    }


# --------------------------------------------------------------------------- peers
def task_peers(task: dict) -> dict:
    """The cache's own part of a warm job next to a joblib.Memory hit (and AiiDA's).

    Own part: ``(warm - uncached) / n`` of an ``n``-job chain of trivial jobs, the runs
    alternating ``repeats`` times in this process after one cold run filled the cache; the
    difference is taken within each round, and its median over the rounds reported.
    joblib, measured the same way: the same chain, uncached, whose jobs each call
    ``plain_step`` through a ``joblib.Memory`` filled by one run first; its own part is
    ``(joblib - uncached) / n``, a joblib hit among the same jobflow work (a job's
    bookkeeping evicts the processor caches a hit then reads again). The hot-loop joblib hit
    (the same call repeated, nothing around it) is reported too. The floor: xxh3 of the
    arguments' JSON plus one primary-key probe of the store.
    """
    n, root = int(task["n"]), task["cache_dir"]
    memory = os.path.join(task["workdir"], "joblib-in-flow")
    warm_up("cold", task["workdir"])
    warm_up("uncached", task["workdir"])
    cold = run_flow_once("chain", n, "cold", 0.0, root)
    run_flow_once(MEMO, n, "uncached", 0.0, memory)  # joblib's misses
    times: dict[str, list[float]] = {"uncached": [], "warm": [], "joblib": []}
    outcomes: Counter[str] = Counter()
    for _ in range(int(task["repeats"])):
        for executor in ("uncached", "warm", "joblib"):
            if executor == "joblib":
                run = run_flow_once(MEMO, n, "uncached", 0.0, memory)
            else:
                run = run_flow_once("chain", n, executor, 0.0, root)
            times[executor].append(run["seconds"])
            outcomes.update({f"{executor}: {k}": v for k, v in run["outcomes"].items()})
    uncached, warm = statistics.median(times["uncached"]), statistics.median(times["warm"])
    # within each round (the three runs one after the other), then the median over rounds:
    # a machine whose speed drifts between rounds moves both runs of a round alike
    own = statistics.median(w - u for w, u in zip(times["warm"], times["uncached"])) / n
    joblib_own = statistics.median(j - u for j, u in zip(times["joblib"], times["uncached"])) / n
    result: dict[str, Any] = {
        "n": n,
        "cold_outcomes": cold["outcomes"],
        "times": times,
        "outcomes": dict(outcomes),
        "uncached_per_job": uncached / n,
        "warm_per_job": warm / n,
        "own_part": own,
        "joblib_in_flow": {"status": "ok", "median": joblib_own},
        "joblib": _joblib_hit(task),
        "floor": _floor(root, task["quick"]),
        "aiida": _aiida_hit(task),
    }
    return result


def _joblib_hit(task: dict) -> dict[str, Any]:
    try:
        import joblib
    except ImportError:
        return {"status": "skipped", "reason": "joblib is not installed"}
    memory = joblib.Memory(os.path.join(task["workdir"], "joblib-memory"), verbose=0)
    cached = memory.cache(plain_step)
    cached(41, 7, 0.0)  # the miss that stores it
    timing = _timed(lambda: cached(41, 7, 0.0), task["quick"])
    return {"status": "ok", "version": joblib.__version__, **timing}


def _floor(cache_dir: str, quick: bool) -> dict[str, Any]:
    """xxh3 of the JSON of a job's arguments plus one primary-key probe (an absent digest)."""
    import orjson
    import xxhash

    arguments = {"x": 41, "tag": 7, "work": 0.0}
    with jobflow_cache.CacheStore.from_settings(jobflow_cache.CacheSettings(DIR=cache_dir)) as cs:

        def probe() -> Any:
            digest = xxhash.xxh3_128_hexdigest(orjson.dumps(arguments, option=orjson.OPT_SORT_KEYS))
            return cs.lookup(digest)

        return {"status": "ok", **_timed(probe, quick)}


def _aiida_hit(task: dict) -> dict[str, Any]:
    """Seconds per cached calcfunction call on AiiDA's loaded (or a temporary SQLite) profile."""
    try:
        import aiida
        from aiida import orm
        from aiida.engine import calcfunction
        from aiida.manage.caching import enable_caching
    except ImportError:
        return {"status": "skipped", "reason": "aiida-core is not installed"}
    try:
        try:
            aiida.load_profile()
        except Exception:  # no configured profile: a throw-away SQLite one
            from aiida.storage.sqlite_temp import SqliteTempBackend

            aiida.load_profile(SqliteTempBackend.create_profile("jfc-bench"), allow_switch=True)

        @calcfunction
        def add_one(x: Any, tag: Any) -> Any:
            return orm.Int(x.value + 1)

        with enable_caching():
            add_one(orm.Int(41), orm.Int(7))  # stored: the later calls are cached
            calls = 5 if task["quick"] else 20
            seconds = []
            for _ in range(calls):
                t0 = time.perf_counter()
                node = add_one.run_get_node(orm.Int(41), orm.Int(7)).node
                seconds.append(time.perf_counter() - t0)
            cached = node.base.caching.is_created_from_cache
    except Exception as err:
        return {"status": "error", "reason": f"{type(err).__name__}: {err}"[:300]}
    return {
        "status": "ok" if cached else "not cached",
        "version": aiida.__version__,
        "median": statistics.median(seconds),
        "min": min(seconds),
        "number": len(seconds),
    }


TASKS = {
    "flow": task_flow,
    "toggle": task_toggle,
    "writer": task_writer,
    "output": task_output,
    "peers": task_peers,
    "paired": task_paired,
}


def main() -> int:
    """Run the tasks of the JSON file named on the command line (or stdin), one result line each."""
    counter = _WarningCounter()
    warnings.simplefilter("default")
    warnings.showwarning = counter
    logging.getLogger("jobflow").setLevel(logging.WARNING)
    if len(sys.argv) > 1:
        with open(sys.argv[1]) as fh:
            tasks = json.load(fh)
    else:
        tasks = json.loads(sys.stdin.read())
    global _RUNS_ROOT
    os.chdir(tasks[0].get("workdir", os.getcwd()) if tasks else os.getcwd())
    _RUNS_ROOT = os.path.join(os.getcwd(), "runs")
    os.makedirs(_RUNS_ROOT, exist_ok=True)
    for task in tasks:
        counter.counts.clear()
        counter.examples.clear()
        try:
            result = TASKS[task["kind"]](task)
            result["ok"] = True
        except Exception as err:  # reported to the parent, which marks the benchmark crashed
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            result["traceback"] = traceback.format_exc()[-3000:]
        result["warnings"] = dict(counter.counts)
        if counter.examples:
            result["cache_warnings"] = list(counter.examples)
        result["id"] = task.get("id")
        print(MARK + json.dumps(result, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
