"""Faults under load: concurrent workers, random SIGKILLs while recording, a server stopped.

Standalone (never collected by pytest)::

    .venv/bin/python -m benchmarks.faults [--kills 120] [--workers 8] [--out FILE.json]

Prints one JSON document (machine-readable) and writes it to ``--out`` when given. Every phase
counts what must stay 0:

``lost``
    digests some worker computed and recorded without an error, with no entry at the end;
``duplicate``
    rows sharing a digest (the stores key on it) and entries recorded twice for one digest
    under DEDUP (a digest executed by two workers at once);
``partial``
    entries that are not a HIT or whose file objects fail ``verify`` (content re-hashed);
``served_wrong``
    outputs or run-folder files a worker got (computed or served) that differ from what the
    job computes.

Phases, for the embedded SQLite store and a private PostgreSQL server (started as the tests
start one; skipped with the reason when it cannot run):

``concurrency``
    ``--workers`` processes started together, each a flow of 30 jobs drawn from 40 digests
    (so they race on the same entries and file objects), with and without DEDUP.
``sigkill``
    ``--kills`` runs (split over the backends, 4 at a time), each of three new jobs that
    record an 8 MiB file each, SIGKILLed at a random moment: during its imports (one in six)
    or anywhere in its run (up to 1.2 times the length of a run measured first); then the
    store is checked (every entry a HIT, every object re-hashed: ``partial``), fresh runs of
    ten of the flows must give the right outputs and files, and no entry present after the
    kills may be gone after them (``lost``).
``server_stopped`` (PostgreSQL)
    4 workers run flows while the server is stopped (``immediate``) mid-run: every worker
    must finish with the right outputs (the rest of the run uncached, one warning each); once
    the server is back, the store is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash
from jobflow import Flow, JobStore, job
from maggma.stores import MemoryStore

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.support.pgserver: the private PostgreSQL server of the tests
    sys.path.insert(0, str(ROOT))

__all__ = ["main", "produce", "worker_main"]

#: Environment variable naming the file where a worker's jobs note each real execution.
EXECUTIONS_ENV = "JFC_BENCH_EXECUTIONS"


def content(x: int, size: int) -> bytes:
    """The bytes job ``produce(x, size)`` writes (deterministic in ``x``)."""
    return random.Random(x).randbytes(size)


@job
def produce(x: int, size: int, pause: float = 0.0) -> dict[str, Any]:
    """Write ``out_<x>.bin`` (``size`` bytes) in the run folder; return what was written."""
    path = os.environ.get(EXECUTIONS_ENV)
    if path:
        with open(path, "a") as fh:
            fh.write(f"{x}\n")
    if pause:
        time.sleep(pause)
    data = content(x, size)
    Path(f"out_{x}.bin").write_bytes(data)
    return {"x": x, "square": x * x, "xxh3": xxhash.xxh3_128_hexdigest(data), "dir": os.getcwd()}


def _check(outputs: dict[str, Any], xs: list[int], size: int) -> list[str]:
    """What a worker got wrong (outputs or files), one line per problem."""
    wrong = []
    for x in xs:
        out = outputs.get(str(x))
        want = xxhash.xxh3_128_hexdigest(content(x, size))
        if not isinstance(out, dict) or out.get("square") != x * x or out.get("xxh3") != want:
            wrong.append(f"output of {x}: {out!r}"[:200])
            continue
        try:
            got = xxhash.xxh3_128_hexdigest(Path(out["dir"], f"out_{x}.bin").read_bytes())
        except OSError as err:
            wrong.append(f"file of {x}: {err}")
            continue
        if got != want:
            wrong.append(f"file of {x}: content differs")
    return wrong


WORKER = "from benchmarks.faults import worker_main; worker_main()"


def worker_main() -> None:
    """A worker process: ``spec.json`` names xs, size, pause, root folder, ready and result
    files; runs the flow under jobflow_cache.run_locally and writes what it got."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    from jobflow_cache import CacheWarning, run_locally

    flow = Flow([produce(x, spec["size"], spec.get("pause", 0.0)) for x in spec["xs"]])
    Path(spec["ready"]).touch()
    go = spec.get("go")
    while go and not os.path.exists(go):
        time.sleep(0.005)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run_locally(
            flow,
            store=JobStore(MemoryStore()),
            log=False,
            create_folders=True,
            root_dir=spec["root"],
            ensure_success=True,
        )
    outputs = {str(x): out[j.uuid][1].output for x, j in zip(spec["xs"], flow.jobs)}
    result = {
        "wrong": _check(outputs, spec["xs"], spec["size"]),
        "warnings": [str(w.message) for w in seen if issubclass(w.category, CacheWarning)],
        "hits": sum(
            1 for j in flow.jobs if (j.metadata.get("jobflow_cache") or {}).get("outcome") == "hit"
        ),
    }
    tmp = spec["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, spec["result"])


# ------------------------------------------------------------------------------ the harness


class Bench:
    """One backend's cache: its environment, workers and checks."""

    def __init__(self, name: str, base: Path, spec: dict[str, Any] | None) -> None:
        self.name = name
        self.base = base
        self.spec = spec
        self.n = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBFLOW_CACHE_")}
        env.update(
            PYTHONPATH=str(ROOT),
            JOBFLOW_CACHE_DIR=str(self.base / "cache"),
            JOBFLOW_CACHE_CONFIG_FILE=os.devnull,
            JOBFLOW_CACHE_FILES="copy",
            **{EXECUTIONS_ENV: str(self.base / "executions.txt")},
            **extra,
        )
        if self.spec is not None:
            env["JOBFLOW_CACHE_STORE"] = json.dumps(self.spec)
        return env

    def start(
        self, xs: list[int], size: int, pause: float = 0.0, go: Path | None = None, **env: str
    ) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
        self.n += 1
        folder = self.base / f"w{self.n}"
        folder.mkdir(parents=True)
        spec = {
            "xs": xs,
            "size": size,
            "pause": pause,
            "root": str(folder / "runs"),
            "ready": str(folder / "ready"),
            "result": str(folder / "result.json"),
            "go": str(go) if go else None,
        }
        (folder / "spec.json").write_text(json.dumps(spec))
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(folder / "spec.json")],
            env=self.env(**env),
            cwd=folder,
            stdout=subprocess.DEVNULL,
            stderr=open(folder / "stderr.txt", "wb"),  # noqa: SIM115 - the child owns it
        )
        return proc, spec

    @contextmanager
    def opened(self) -> Iterator[Any]:
        saved = {k: v for k, v in os.environ.items() if k.startswith("JOBFLOW_CACHE_")}
        for k in saved:
            del os.environ[k]
        os.environ.update({k: v for k, v in self.env().items() if k.startswith("JOBFLOW_CACHE_")})
        from jobflow_cache import CacheStore

        try:
            with CacheStore.from_settings() as cache:
                yield cache
        finally:
            for k in [k for k in os.environ if k.startswith("JOBFLOW_CACHE_")]:
                del os.environ[k]
            os.environ.update(saved)

    def integrity(self) -> dict[str, Any]:
        """Rows per digest, entries not served whole, verify's problems, stale temporary
        files of killed ingests."""
        from jobflow_cache import Outcome
        from jobflow_cache.admin.verify import verify

        with self.opened() as cache:
            digests = [d.get("digest") for d in cache.find({}, properties=["digest"])]
            not_hit = 0
            for digest in digests:
                if cache.lookup(digest).outcome is not Outcome.HIT:
                    not_hit += 1
            problems = verify(cache)
            objects = Path(cache.objects_dir)
        rows = Counter(digests)
        stale = [e.name for e in os.scandir(objects)] if objects.is_dir() else []
        return {
            "entries": len(digests),
            "duplicate_rows": sum(n - 1 for n in rows.values()),
            "partial": not_hit + len({p.digest for p in problems if p.digest}),
            "verify_problems": [f"{p.kind.value}: {p.message}"[:160] for p in problems][:5],
            "stale_tmp_files": sum(1 for name in stale if name.startswith(".jfc-tmp-")),
            "digests": sorted(d for d in digests if isinstance(d, str)),
        }

    def executions(self) -> Counter[int]:
        path = self.base / "executions.txt"
        if not path.exists():
            return Counter()
        return Counter(int(line) for line in path.read_text().split())


def _results(specs: list[dict[str, str]]) -> list[dict[str, Any]]:
    found = []
    for spec in specs:
        path = Path(spec["result"])
        found.append(json.loads(path.read_text()) if path.exists() else {"missing": True})
    return found


def phase_concurrency(bench: Bench, workers: int, dedup: bool) -> dict[str, Any]:
    go = bench.base / "go"
    rng = random.Random(7)
    started = []
    extra = {"JOBFLOW_CACHE_DEDUP": "1" if dedup else "0", "JOBFLOW_CACHE_LEASE": "10"}
    for _ in range(workers):
        xs = rng.sample(range(40), 30)
        started.append((*bench.start(xs, 65536, pause=0.02, go=go, **extra), xs))
    while not all(Path(spec["ready"]).exists() for _, spec, _ in started):
        time.sleep(0.01)
    t0 = time.monotonic()
    go.touch()
    codes = [proc.wait(timeout=900) for proc, _, _ in started]
    span = time.monotonic() - t0
    results = _results([spec for _, spec, _ in started])
    computed = {x for _, _, xs in started for x in xs}
    state = bench.integrity()
    executions = bench.executions()
    return {
        "workers": workers,
        "dedup": dedup,
        "seconds": round(span, 2),
        "exit_codes_nonzero": sum(1 for c in codes if c != 0),
        "jobs": sum(len(xs) for _, _, xs in started),
        "digests": len(computed),
        "executions": sum(executions.values()),
        "digests_executed_more_than_once": sum(1 for n in executions.values() if n > 1),
        "hits": sum(r.get("hits", 0) for r in results),
        "lost": len(computed) - state["entries"],
        "duplicate": state["duplicate_rows"],
        "partial": state["partial"],
        "served_wrong": sum(len(r.get("wrong", [])) for r in results)
        + sum(1 for r in results if r.get("missing")),
        "warnings": sum(len(r.get("warnings", [])) for r in results),
        "verify_problems": state["verify_problems"],
    }


def phase_sigkill(bench: Bench, kills: int, parallel: int = 4) -> dict[str, Any]:
    rng = random.Random(11)
    size = 8 << 20
    # every run records three new digests (8 MiB each): a kill lands while it computes,
    # ingests files or writes its entries; one run first measures how long that takes
    flows = [[1000 + 3 * i, 1001 + 3 * i, 1002 + 3 * i] for i in range(kills + 1)]
    proc, spec = bench.start(flows[0], size)
    proc.wait(timeout=900)
    recording = time.time() - Path(spec["ready"]).stat().st_mtime
    running: list[tuple[subprocess.Popen[bytes], dict[str, str], float, float]] = []
    done = killed_before_ready = finished = 0
    moments = []
    started = 0
    while done < kills or running:
        while done + len(running) < kills and len(running) < parallel:
            started += 1
            proc, spec = bench.start(flows[started], size)
            # < 0: during the imports, |delay| s after the start (one run in six); else
            # after the imports, anywhere in the run (up to 1.2 times the measured one)
            delay = rng.uniform(-0.2 * recording, 1.2 * recording)
            running.append((proc, spec, time.monotonic(), delay))
        time.sleep(0.01)
        for item in list(running):
            proc, spec, since, delay = item
            if proc.poll() is not None:  # finished before its moment came
                shutil.rmtree(spec["root"], ignore_errors=True)
                running.remove(item)
                done += 1
                finished += 1
                continue
            ready = Path(spec["ready"])
            if not ready.exists():
                if delay < 0 and time.monotonic() - since >= -delay:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    running.remove(item)
                    done += 1
                    killed_before_ready += 1
                continue
            if delay < 0:
                delay = 0.0
            if time.time() - ready.stat().st_mtime >= delay:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                moments.append(delay)
                running.remove(item)
                done += 1
                shutil.rmtree(spec["root"], ignore_errors=True)  # 24 MiB of run folders
    state = bench.integrity()
    # fresh runs of 10 of the flows: the right outputs and files, served or computed
    checks = []
    for xs in [flows[0], *rng.sample(flows[1 : started + 1], min(9, started))]:
        proc, spec = bench.start(xs, size)
        proc.wait(timeout=900)
        checks.append(spec)
    results = _results(checks)
    after = bench.integrity()
    return {
        "kills": kills - finished,
        "finished_before_kill": finished,
        "killed_during_imports": killed_before_ready,
        "killed_after_imports": len(moments),
        "kill_moments_s": [round(min(moments), 2), round(max(moments), 2)] if moments else [],
        "file_bytes_per_job": size,
        "entries_after_kills": state["entries"],
        "duplicate": state["duplicate_rows"] + after["duplicate_rows"],
        "partial": state["partial"] + after["partial"],
        "verify_problems": state["verify_problems"] + after["verify_problems"],
        "stale_tmp_files_after_kills": state["stale_tmp_files"],
        "stale_tmp_files_after_next_runs": after["stale_tmp_files"],
        "recording_run_s": round(recording, 2),
        "lost": state["entries"] - len(set(state["digests"]) & set(after["digests"])),
        "served_wrong": sum(len(r.get("wrong", [])) for r in results)
        + sum(1 for r in results if r.get("missing")),
        "hits_in_fresh_runs": sum(r.get("hits", 0) for r in results),
    }


def phase_server_stopped(bench: Bench, cluster: Any, workers: int = 4) -> dict[str, Any]:
    go = bench.base / "go-stop"
    started = []
    for i in range(workers):
        xs = list(range(100 + 10 * i, 100 + 10 * i + 30))  # some digests shared
        started.append((*bench.start(xs, 4096, pause=0.05, go=go), xs))
    while not all(Path(spec["ready"]).exists() for _, spec, _ in started):
        time.sleep(0.01)
    go.touch()
    time.sleep(0.7)
    cluster.stop("immediate")
    stopped_at = time.monotonic()
    codes = [proc.wait(timeout=900) for proc, _, _ in started]
    results = _results([spec for _, spec, _ in started])
    down = time.monotonic() - stopped_at
    cluster.start()
    state = bench.integrity()
    return {
        "workers": workers,
        "server_down_s": round(down, 2),
        "exit_codes_nonzero": sum(1 for c in codes if c != 0),
        "served_wrong": sum(len(r.get("wrong", [])) for r in results)
        + sum(1 for r in results if r.get("missing")),
        "warnings_per_worker": [len(r.get("warnings", [])) for r in results],
        "entries_after": state["entries"],
        "duplicate": state["duplicate_rows"],
        "partial": state["partial"],
        "verify_problems": state["verify_problems"],
    }


def _postgres(base: Path) -> tuple[Any, str | None]:
    """A private PostgreSQL cluster (the tests' own helper), or why there is none."""
    try:
        from tests.support.pgserver import PrivateCluster, server_bindir

        bindir = server_bindir()
        if bindir is None:
            return None, "PostgreSQL server binaries not found"
        cluster = PrivateCluster(bindir)
        cluster.start()
        return cluster, None
    except Exception as err:  # report it, run the SQLite phases
        return None, f"{type(err).__name__}: {err}"


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the cluster is destroyed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=120)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--phases", default="concurrency,sigkill,server_stopped")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="jfc-faults-"))
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    backends = args.backends.split(",")
    cluster, why = (None, "not asked") if "postgres" not in backends else _postgres(base)
    if "postgres" in backends and cluster is None:
        report["postgres_skipped"] = why
    kills_each = max(1, args.kills // (2 if cluster is not None else 1))
    try:
        for name in backends:
            if name == "postgres" and cluster is None:
                continue
            for dedup in (False, True) if "concurrency" in args.phases else ():
                spec = None
                if name == "postgres":
                    table = f"jfc_bench_{os.getpid()}_{int(dedup)}"
                    spec = {"type": "PostgresBackend", "uri": cluster.uri, "table": table}
                bench = Bench(name, base / f"{name}-c{int(dedup)}", spec)
                key = f"{name}/concurrency/{'dedup' if dedup else 'no-dedup'}"
                report[key] = phase_concurrency(bench, args.workers, dedup)
                print(json.dumps({key: report[key]}), file=sys.stderr)
            spec = None
            if name == "postgres":
                spec = {"type": "PostgresBackend", "uri": cluster.uri, "table": "jfc_bench_kill"}
            bench = Bench(name, base / f"{name}-kill", spec)
            if "sigkill" in args.phases:
                report[f"{name}/sigkill"] = phase_sigkill(bench, kills_each)
                print(json.dumps({f"{name}/sigkill": report[f"{name}/sigkill"]}), file=sys.stderr)
            if name == "postgres" and "server_stopped" in args.phases:
                spec = {"type": "PostgresBackend", "uri": cluster.uri, "table": "jfc_bench_stop"}
                bench = Bench(name, base / f"{name}-stop", spec)
                report[f"{name}/server_stopped"] = phase_server_stopped(bench, cluster)
    finally:
        if cluster is not None:
            cluster.destroy()
        shutil.rmtree(base, ignore_errors=True)
    totals: Counter[str] = Counter()
    for value in report.values():
        if isinstance(value, dict):
            for field in ("lost", "duplicate", "partial", "served_wrong"):
                totals[field] += int(value.get(field, 0))
    report["totals"] = dict(totals)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if not any(totals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
