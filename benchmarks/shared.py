"""A shared cache under concurrency: 8 writer processes per backend, lookups, claims, leases.

For each backend (the embedded SQLite store; PostgreSQL when a server is reachable):

``writers``
    8 processes, started together (each waits at a go file once imported), put ``n`` sealed
    entries each, one transaction per entry (``CacheStore.put``); then ``n`` more each in
    batches of 25 (``put_many``, as the write-behind queue of a run writes them). Entries/s is
    all entries of a phase over its span, from the first start to the last end.
``readers``
    The same 8 processes then look up random entries written by all of them.
``claims``
    One process: latency of taking a free claim, renewing it, being refused it (held by
    another worker) and releasing it.
``served``
    A worker (a real ``run_locally`` under ``JOBFLOW_CACHE_DEDUP=1``, default lease) waits for
    another that computes the same job; the time from the owner's job returning to the waiter
    serving its entry (the waiter polls with a backoff from 0.02 s to 1 s).
``takeover``
    The owner is SIGKILLed inside the job; the time until the waiter starts the job itself,
    against the lease (expected between 3/4 and 5/4 of it: the claim was renewed at most a
    quarter lease before the kill, and the waiter polls at most every quarter lease).

PostgreSQL: the server named by ``JOBFLOW_CACHE_TEST_POSTGRES_URI`` (as in CI), else a private
one started like the tests do (full mode only); otherwise the backend is skipped with the
reason. Worker processes run ``benchmarks.shared.worker_main``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import zip_longest
from pathlib import Path
from typing import Any

from jobflow import Flow, JobStore
from maggma.stores import MemoryStore
from tests.support import pgserver

from benchmarks.common import MARK, ROOT, Mode, fmt_seconds, percentile, table
from benchmarks.entries import cache_store, digest_of, sealed_entry
from jobflow_cache import CacheStore, Outcome, cached_job, run_locally, store_from_spec
from jobflow_cache.execution.claims import coordinator_of

__all__ = ["held", "run_shared", "shared_tables", "worker_main"]

logger = logging.getLogger(__name__)

#: Writer processes started at once.
WRITERS = 8
#: Entries per ``put_many`` in the batched phase.
BATCH = 25
#: Seconds a worker may take before the benchmark gives up on it.
TIMEOUT = 300.0
#: Worker entry point (a module path, so the job below has one import path everywhere).
WORKER = "from benchmarks.shared import worker_main; worker_main()"


# --------------------------------------------------------------------------- worker side
def _event(kind: str) -> None:
    path = os.environ.get("JFC_BENCH_EVENTS")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{kind} {os.getpid()} {time.time():.6f}\n")


@cached_job
def held(tag: str) -> dict[str, str]:
    """A job that notes its start and end and waits while ``JFC_BENCH_HOLD`` names a file
    that exists."""
    _event("start")
    hold = os.environ.get("JFC_BENCH_HOLD")
    while hold and os.path.exists(hold):
        time.sleep(0.002)
    _event("end")
    return {"tag": tag}


def _barrier(folder: Path, phase: str, poll: float = 0.001) -> None:
    """Say ready for ``phase``, then wait for the parent's go file (beside ``folder``)."""
    (folder / f"ready-{phase}").touch()
    go = folder.parent / f"go-{phase}"
    while not go.exists():
        time.sleep(poll)


def _task_rw(task: dict[str, Any]) -> dict[str, Any]:
    """Put entries one by one, then in batches, then look up entries of all writers."""
    folder = Path(task["folder"])
    prefix, n = task["prefix"], task["n"]
    out: dict[str, Any] = {}
    with CacheStore.from_settings() as cache:
        singles = [sealed_entry(f"{prefix}-{i}") for i in range(n)]
        batches = [sealed_entry(f"{prefix}-b{i}") for i in range(n)]
        _barrier(folder, "put")
        latencies = []
        out["put_start"] = time.time()
        for entry in singles:
            t0 = time.perf_counter()
            cache.put(entry)
            latencies.append(time.perf_counter() - t0)
        out["put_end"] = time.time()
        out["put_latencies"] = latencies
        _barrier(folder, "batch")
        out["batch_start"] = time.time()
        for start in range(0, n, BATCH):
            cache.put_many(batches[start : start + BATCH])
        out["batch_end"] = time.time()
        rng = random.Random(prefix)
        tags = [f"{p}-{i}" for p in task["prefixes"] for i in range(n)]
        probes = [digest_of(rng.choice(tags)) for _ in range(task["lookups"])]
        _barrier(folder, "read")
        latencies, outcomes = [], Counter[str]()
        out["read_start"] = time.time()
        for digest in probes:
            t0 = time.perf_counter()
            found = cache.lookup(digest, serving=True)
            latencies.append(time.perf_counter() - t0)
            outcomes[found.outcome.value] += 1
        out["read_end"] = time.time()
        out["read_latencies"] = latencies
        out["outcomes"] = dict(outcomes)
    return out


def _task_dedup(task: dict[str, Any]) -> dict[str, Any]:
    """Run the held job through run_locally (as owner or waiter, with JOBFLOW_CACHE_DEDUP)."""
    folder = Path(task["folder"])
    handler = logging.FileHandler(folder / "log.txt")
    handler.setFormatter(logging.Formatter("%(created).6f %(message)s"))
    progress = logging.getLogger("jobflow.cache")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    job = held(task["tag"])
    store = JobStore(MemoryStore())
    _barrier(folder, task["role"], poll=0.005)  # idle meanwhile: it may wait a while
    run = folder / "run"  # not the worker's folder: the log file there grows during the job
    run.mkdir()
    os.chdir(run)
    run_locally(Flow([job]), store=store, log=False)
    return {"outcome": job.metadata.get("jobflow_cache", {}).get("outcome")}


def worker_main() -> None:
    """Run the task of the JSON file named on the command line; print its result line."""
    task = json.loads(Path(sys.argv[1]).read_text())
    kinds: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
        "rw": _task_rw,
        "dedup": _task_dedup,
    }
    result = kinds[task["kind"]](task)
    print(MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- parent side
def _spawn(folder: Path, task: dict[str, Any], env: dict[str, str]) -> subprocess.Popen[str]:
    """Start a worker on ``task`` with a clean cache environment plus ``env``."""
    folder.mkdir(parents=True, exist_ok=True)
    task = {**task, "folder": str(folder)}
    (folder / "task.json").write_text(json.dumps(task))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLOW_CACHE_")}
    full_env.update(
        PYTHONPATH=os.pathsep.join([str(ROOT), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JOBFLOW_CACHE_CONFIG_FILE=os.devnull,
        **env,
    )
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(folder / "task.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=folder,
        env=full_env,
    )


def _collect(proc: subprocess.Popen[str]) -> dict[str, Any]:
    """The result line of a worker (an error when it failed or hung)."""
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"a worker took more than {TIMEOUT:.0f} s") from None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            result: dict[str, Any] = json.loads(line[len(MARK) :])
            return result
    raise RuntimeError(f"worker failed ({proc.returncode}): {stderr.strip()[-1500:]}")


def _wait(condition: Callable[[], bool], procs: list[subprocess.Popen[str]], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if any(p.poll() is not None for p in procs) and not condition():
            errors = [p.communicate()[1][-1500:] for p in procs if p.poll() is not None]
            raise RuntimeError(f"a worker exited while waiting for {what}: {errors}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.002)


@contextmanager
def _reaping(procs: list[subprocess.Popen[str]]) -> Iterator[None]:
    """Kill the workers still running when the block is left (a crash, SIGTERM)."""
    try:
        yield
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _lat(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p95": percentile(values, 0.95)}


def _writers(root: Path, env: dict[str, str], mode: Mode) -> dict[str, Any]:
    """8 processes: puts, batched puts, then lookups, each phase started together."""
    n, lookups = (200, 500) if mode.quick else (1000, 4000)
    prefixes = [f"w{k}" for k in range(WRITERS)]
    folders = [root / "rw" / p for p in prefixes]
    procs: list[subprocess.Popen[str]] = []
    with _reaping(procs):
        for prefix, folder in zip(prefixes, folders):
            task = {"kind": "rw", "prefix": prefix, "n": n, "lookups": lookups}
            procs.append(_spawn(folder, {**task, "prefixes": prefixes}, env))
        for phase in ("put", "batch", "read"):
            logger.info("shared: writers %s", phase)
            _wait(
                lambda phase=phase: all((f / f"ready-{phase}").exists() for f in folders),
                procs,
                f"the writers to be ready ({phase})",
            )
            (root / "rw" / f"go-{phase}").touch()
        results = [_collect(p) for p in procs]
    out: dict[str, Any] = {"writers": WRITERS, "entries_each": n, "lookups_each": lookups}
    for phase, count in (("put", n), ("batch", n), ("read", lookups)):
        span = max(r[f"{phase}_end"] for r in results) - min(r[f"{phase}_start"] for r in results)
        out[f"{phase}_span_s"] = span
        out[f"{phase}_per_s"] = WRITERS * count / span if span > 0 else None
        overlap = min(r[f"{phase}_end"] for r in results) - max(
            r[f"{phase}_start"] for r in results
        )
        out[f"{phase}_overlap"] = max(0.0, overlap) / span if span > 0 else 0.0
    out["put"] = _lat([x for r in results for x in r["put_latencies"]])
    out["lookup"] = _lat([x for r in results for x in r["read_latencies"]])
    out["lookup_outcomes"] = dict(sum((Counter(r["outcomes"]) for r in results), Counter()))
    return out


def _claims(cache: CacheStore, mode: Mode) -> dict[str, Any]:
    """Latency of claim operations in one process (the store's own implementation)."""
    claims = coordinator_of(cache)
    if claims is None:
        return {"status": "unsupported"}
    count = 200 if mode.quick else 2000
    ops: dict[str, list[float]] = {"claim": [], "renew": [], "refused": [], "release": []}
    steps = (("claim", "me"), ("renew", "me"), ("refused", "other"))
    for i in range(count):
        name = f"bench-claim-{uuid.uuid4().hex}-{i}"
        for op, owner in steps:
            t0 = time.perf_counter()
            holder = claims.claim(name, owner, 60.0)
            ops[op].append(time.perf_counter() - t0)
            if holder != "me":
                raise RuntimeError(f"claim {name} ({op} by {owner}) is held by {holder!r}")
        t0 = time.perf_counter()
        claims.release(name, "me")
        ops["release"].append(time.perf_counter() - t0)
    return {"status": "ok", "count": count, **{op: _lat(v) for op, v in ops.items()}}


def _events(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    return [
        (kind, int(pid), float(when))
        for kind, pid, when in (line.split() for line in path.read_text().splitlines())
    ]


def _log_time(folder: Path, text: str) -> float | None:
    path = folder / "log.txt"
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if text in line:
            return float(line.split(" ", 1)[0])
    return None


class _Pair:
    """An owner and a waiter of one held job (a real ``run_locally`` each, under
    ``JOBFLOW_CACHE_DEDUP=1``). Both start at once and wait at a barrier once imported (so
    they may be started while something else runs); :meth:`arm` lets them go in turn."""

    def __init__(self, root: Path, env: dict[str, str], case: str, lease: float | None) -> None:
        tag = f"{case}-{uuid.uuid4().hex[:8]}"
        self.folder = root / tag
        self.hold, self.event_file = self.folder / "hold", self.folder / "events.txt"
        self.folder.mkdir(parents=True)
        self.hold.touch()
        base = {**env, "JOBFLOW_CACHE_DEDUP": "1", "JFC_BENCH_EVENTS": str(self.event_file)}
        if lease is not None:
            base["JOBFLOW_CACHE_LEASE"] = str(lease)
        task = {"kind": "dedup", "tag": tag}
        self.owner = _spawn(
            self.folder / "owner",
            {**task, "role": "owner"},
            {**base, "JFC_BENCH_HOLD": str(self.hold)},
        )
        self.waiter = _spawn(self.folder / "waiter", {**task, "role": "waiter"}, base)
        self.procs = [self.owner, self.waiter]

    def arm(self) -> None:
        """Let the owner go into the job, then the waiter wait for it."""
        for role in ("owner", "waiter"):
            ready = self.folder / role / f"ready-{role}"
            _wait(ready.exists, self.procs, f"the {role} to be ready")
            (self.folder / f"go-{role}").touch()
            if role == "owner":
                _wait(lambda: bool(_events(self.event_file)), self.procs, "the owner's job")
        _wait(lambda: self.logged("Waiting - ") is not None, self.procs, "the waiter to wait")

    def logged(self, text: str) -> float | None:
        """When the waiter logged a line containing ``text``."""
        return _log_time(self.folder / "waiter", text)

    def served(self, hold_s: float) -> dict[str, Any]:
        """The owner's job returns (``hold_s`` after :meth:`arm`); the waiter is served."""
        outcomes = [_collect(p)["outcome"] for p in self.procs]
        ended = [when for kind, _, when in _events(self.event_file) if kind == "end"]
        served, waited = self.logged("Served from cache - "), self.logged("Waiting - ")
        if served is None or waited is None or len(ended) != 1:
            raise RuntimeError(f"waiter not served once ({len(ended)} executions, {outcomes})")
        return {
            "hold_s": hold_s,
            "waiting_before_s": ended[0] - waited,  # the waiter's wait before the owner returned
            "served_after_s": served - ended[0],
            "outcomes": outcomes,
        }

    def taken_over(self, lease: float, killed: float) -> dict[str, Any]:
        """The owner was SIGKILLed at ``killed``; the waiter runs the job itself."""
        self.owner.communicate()
        outcome = _collect(self.waiter)["outcome"]
        starts = [(pid, when) for kind, pid, when in _events(self.event_file) if kind == "start"]
        if len(starts) != 2 or starts[1][0] != self.waiter.pid:
            raise RuntimeError(f"expected the owner then the waiter to start the job: {starts}")
        waited = self.logged("Waiting - ")
        return {
            "lease_s": lease,
            "waiting_before_s": killed - waited if waited is not None else None,
            "takeover_s": starts[1][1] - killed,
            "ratio": (starts[1][1] - killed) / lease,
            "outcome": outcome,
        }


def _pairs(
    root: Path, env: dict[str, str], hold_s: float | None, lease: float | None
) -> tuple[_Pair | None, _Pair | None]:
    """A pair for a waiter served (if ``hold_s``) and one for a takeover (if ``lease``)."""
    serve = _Pair(root, env, "served", None) if hold_s is not None else None
    take = _Pair(root, env, "takeover", lease) if lease is not None else None
    return serve, take


def _lease_plan(mode: Mode) -> list[tuple[float | None, float | None]]:
    """(hold, lease) rounds: a waiter served (owner holds the job for a time, default lease)
    and a waiter taking over from a killed owner (some leases), one of each at once."""
    repeats = 1 if mode.quick else 2
    holds = ([0.5] if mode.quick else [0.2, 1.0, 5.0]) * repeats
    leases = ([1.0] if mode.quick else [1.0, 4.0]) * repeats
    return list(zip_longest(holds, leases))


def _leases(
    root: Path,
    env: dict[str, str],
    mode: Mode,
    first: tuple[_Pair | None, _Pair | None],
) -> dict[str, list[dict[str, Any]]]:
    """Run the rounds of :func:`_lease_plan`; the pairs of the first are ``first``."""
    out: dict[str, list[dict[str, Any]]] = {"served": [], "takeover": []}
    for k, (hold_s, lease) in enumerate(_lease_plan(mode)):
        procs: list[subprocess.Popen[str]] = []
        with _reaping(procs):
            serve, take = first if k == 0 else _pairs(root, env, hold_s, lease)
            for pair in (serve, take):
                if pair is not None:
                    procs += pair.procs
                    pair.arm()
            killed = time.time()
            if take is not None:
                take.owner.send_signal(signal.SIGKILL)
            if serve is not None and hold_s is not None:
                time.sleep(hold_s)
                serve.hold.unlink()
                out["served"].append(serve.served(hold_s))
            if take is not None and lease is not None:
                out["takeover"].append(take.taken_over(lease, killed))
    return out


def _backend_runs(
    name: str, root: Path, env: dict[str, str], cache: CacheStore, mode: Mode
) -> dict[str, Any]:
    """Every measurement on one backend."""
    out: dict[str, Any] = {"status": "ok"}
    # the first lease round's workers start now: they import while the writers do, then idle
    first = _pairs(root, env, *_lease_plan(mode)[0])
    procs = [p for pair in first if pair is not None for p in pair.procs]
    with _reaping(procs):
        out["writers"] = _writers(root, env, mode)
        logger.info("shared: %s writers done", name)
        with cache:
            expected = WRITERS * 2 * out["writers"]["entries_each"]
            out["writers"]["stored"] = cache.count()
            out["writers"]["expected"] = expected
            out["claims"] = _claims(cache, mode)
        logger.info("shared: %s claims done", name)
        out.update(_leases(root, env, mode, first))
    logger.info("shared: %s leases done", name)
    return out


@contextmanager
def _postgres(mode: Mode) -> Iterator[tuple[str | None, str]]:
    """(uri, which server) of a PostgreSQL server, or (None, why not): the server named by
    ``JOBFLOW_CACHE_TEST_POSTGRES_URI``, else (full mode) a private one started as the tests
    do (tests/support/pgserver.py: fsync off, so writes look faster) and destroyed afterwards."""
    uri = os.environ.get(pgserver.ENV_URI)
    if uri:
        yield uri, pgserver.ENV_URI
        return
    if mode.quick:
        yield None, f"{pgserver.ENV_URI} is not set (quick mode starts no server)"
        return
    bindir = pgserver.server_bindir()
    if bindir is None:
        yield None, f"PostgreSQL server binaries not found ({pgserver.INSTALL})"
        return
    try:
        cluster = pgserver.PrivateCluster(bindir)
    except (pgserver.ClusterError, OSError, subprocess.SubprocessError) as err:
        yield None, f"cannot make a PostgreSQL cluster: {err}"
        return
    try:
        try:
            uri = cluster.start()
        except (pgserver.ClusterError, OSError, subprocess.SubprocessError) as err:
            yield None, f"cannot start a PostgreSQL server: {err}"
        else:
            yield uri, "a private cluster (fsync off)"
    finally:
        cluster.destroy()


def run_shared(mode: Mode) -> dict[str, Any]:
    """Measure every backend that is available; record why the others were skipped."""
    base = mode.tmp / "shared"
    shutil.rmtree(base, ignore_errors=True)
    results: dict[str, Any] = {}
    root = base / "sqlite"
    root.mkdir(parents=True)
    env = {"JOBFLOW_CACHE_DIR": str(root)}
    results["sqlite"] = _backend_runs("sqlite", root, env, cache_store(root), mode)
    with _postgres(mode) as (uri, server):
        if uri is None:
            results["postgres"] = {"status": "skipped", "reason": server}
        else:
            root = base / "postgres"
            root.mkdir(parents=True)
            spec = {"type": "PostgresBackend", "uri": uri, "table": pgserver.new_table_name()}
            env = {"JOBFLOW_CACHE_DIR": str(root), "JOBFLOW_CACHE_STORE": json.dumps(spec)}
            cache = CacheStore(store_from_spec(spec), objects_dir=root / "objects")
            try:
                results["postgres"] = _backend_runs("postgres", root, env, cache, mode)
                results["postgres"]["server"] = server
            finally:
                pgserver.drop_tables(uri, spec["table"])
    shutil.rmtree(base, ignore_errors=True)
    return results


# --------------------------------------------------------------------------- tables
def shared_tables(result: dict[str, Any]) -> list[str]:
    """Writers, readers, claims and lease timings per backend."""
    rows, claim_rows, lease_rows = [], [], []
    for name, found in result.items():
        if found.get("status") != "ok":
            rows.append([name, found.get("status", "-")] + [""] * 7 + [found.get("reason", "")])
            continue
        if "private" in found.get("server", ""):
            name += " (private server, fsync off)"
        w = found["writers"]
        rows.append(
            [
                name,
                f"{w['put_per_s']:.0f}",
                fmt_seconds(w["put"]["median"]),
                fmt_seconds(w["put"]["p95"]),
                f"{w['batch_per_s']:.0f}",
                f"{w['read_per_s']:.0f}",
                fmt_seconds(w["lookup"]["median"]),
                f"{w['put_overlap']:.0%}",
                f"{w['stored']}/{w['expected']}",
                f"{w['lookup_outcomes'].get(Outcome.HIT.value, 0)}/"
                f"{sum(w['lookup_outcomes'].values())}",
            ]
        )
        c = found["claims"]
        if c.get("status") == "ok":
            claim_rows.append(
                [name]
                + [fmt_seconds(c[op]["median"]) for op in ("claim", "renew", "refused", "release")]
            )
        for case, items in (("served", found["served"]), ("takeover", found["takeover"])):
            for item in items:
                lease = item.get("lease_s")
                lease_rows.append(
                    [
                        name,
                        case,
                        f"{lease:g} s" if lease else "60 s (default)",
                        fmt_seconds(item["waiting_before_s"]),
                        fmt_seconds(item.get("served_after_s", item.get("takeover_s"))),
                        f"{item['ratio']:.2f}" if "ratio" in item else "-",
                    ]
                )
    return [
        table(
            f"Shared store: {WRITERS} processes writing, then reading, at once",
            [
                "backend",
                "puts/s",
                "put median",
                "put p95",
                f"entries/s in batches of {BATCH}",
                "lookups/s",
                "lookup median",
                "overlap",
                "entries stored",
                "lookups served",
            ],
            rows,
        ),
        table(
            "Claims (one process): median latency",
            ["backend", "claim", "renew", "refused", "release"],
            claim_rows,
        ),
        table(
            "Leases: a waiter served once the owner's job returns (served), or running the job "
            "itself once the owner was SIGKILLed (takeover)",
            ["backend", "case", "lease", "waiting before", "served / ran after", "x lease"],
            lease_rows,
        ),
    ]
