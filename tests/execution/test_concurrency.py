"""Many worker processes sharing one cache at once, on the embedded SQLite store and on a
PostgreSQL server: nothing lost, duplicated, corrupted or deadlocked; executions counted;
in-flight deduplication (``JOBFLOW_CACHE_DEDUP``) with claims whose lease expires.

Every worker is a real process (tests/support/concurrency_worker.py) running a flow through
``jobflow_cache.run_locally``. Workers wait at a barrier (a go file) so they really overlap;
jobs that must be in flight at a given moment wait on a hold file the test removes.

MongoDB is not covered here: no MongoDB server can run on this machine, and maggma's
MemoryStore (mongomock) lives inside one process, so it cannot be shared between processes.
Its claims (``jobflow_cache.execution.claims``) are exercised in-process by the shared-store tests.

No test asserts a duration: a worker still running after :data:`DEADLOCK_GUARD` seconds is
reported as stuck. Measured waiting times are printed (``pytest -s``) and recorded as test
properties; the benchmarks (``benchmarks/shared.py``) measure them properly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from jobflow_cache import CacheStore, ObjectArea, Outcome
from jobflow_cache.admin.verify import verify
from jobflow_cache.cli import cli
from jobflow_cache.codec import loads

ROOT = Path(__file__).resolve().parents[2]
WORKER = "from tests.support.concurrency_worker import main; main()"
#: Worker processes started at once.
WORKERS = 8
#: Seconds after which a worker that has not finished is stuck (a deadlock, not slowness).
DEADLOCK_GUARD = 300.0

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- backends
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cache every worker (and the test) uses: the embedded SQLite default under the
    test's JOBFLOW_CACHE_DIR, or a table of its own on the test PostgreSQL server."""
    if request.param == "postgres":
        spec = request.getfixturevalue("pg_spec")  # a table of its own (tests/support/pgserver.py)
        monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(spec))
    return str(request.param)


@pytest.fixture
def cache(backend: str) -> Iterator[CacheStore]:
    """The test's own connection to the workers' cache."""
    with CacheStore.from_settings() as store:
        yield store


# --------------------------------------------------------------------------- workers
@dataclass
class Worker:
    """One worker process and its files."""

    name: str
    proc: subprocess.Popen[bytes]
    folder: Path

    @property
    def log(self) -> str:
        path = self.folder / "log.txt"
        return path.read_text() if path.exists() else ""

    @property
    def ready(self) -> bool:
        return (self.folder / "ready").exists()

    def stderr(self) -> str:
        return (self.folder / "stderr.txt").read_text()[-4000:]

    def result(self) -> dict[str, Any]:
        assert self.proc.returncode == 0, f"worker {self.name} failed:\n{self.stderr()}"
        result: dict[str, Any] = json.loads((self.folder / "result.json").read_text())
        return result


def spawn(
    tmp_path: Path,
    name: str,
    jobs: list[list[Any]],
    env: dict[str, str] | None = None,
    seed: int = 0,
    barrier: bool = True,
) -> Worker:
    """Start a worker running a flow of ``jobs`` (see tests/support/concurrency_worker.py) in a run
    folder of its own; with ``barrier`` it waits for :func:`release`."""
    folder = tmp_path / name
    (folder / "run").mkdir(parents=True)
    spec = {
        "jobs": jobs,
        "seed": seed,
        "result_file": str(folder / "result.json"),
        "log_file": str(folder / "log.txt"),
        "ready_file": str(folder / "ready"),
        "go_file": str(tmp_path / "go") if barrier else None,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    with open(folder / "stdout.txt", "wb") as out, open(folder / "stderr.txt", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(folder / "spec.json")],
            cwd=folder / "run",
            env=full_env,
            stdout=out,
            stderr=err,
        )
    return Worker(name, proc, folder)


def wait_for(condition: Callable[[], bool], what: str, workers: list[Worker]) -> None:
    """Poll ``condition``; fail when a worker died meanwhile or it takes implausibly long."""
    deadline = time.monotonic() + DEADLOCK_GUARD
    while not condition():
        for worker in workers:
            if worker.proc.poll() is not None and not condition():
                pytest.fail(
                    f"worker {worker.name} exited while waiting for {what}:\n{worker.stderr()}"
                )
        if time.monotonic() > deadline:
            pytest.fail(f"stuck waiting for {what}")
        time.sleep(0.01)


def release(tmp_path: Path, workers: list[Worker]) -> None:
    """Start the workers together: once all are ready, create the go file."""
    wait_for(lambda: all(w.ready for w in workers), "all workers to be ready", workers)
    (tmp_path / "go").touch()


def finish(workers: list[Worker]) -> list[dict[str, Any]]:
    """Wait for the workers (killing all if one is stuck); their results."""
    deadline = time.monotonic() + DEADLOCK_GUARD
    for worker in workers:
        try:
            worker.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in workers:
                other.proc.kill()
                other.proc.wait()
            pytest.fail(f"deadlock: worker {worker.name} still running after {DEADLOCK_GUARD} s")
    return [worker.result() for worker in workers]


@pytest.fixture
def reaper() -> Iterator[list[Worker]]:
    """Workers a test starts; any still running when it ends are killed."""
    started: list[Worker] = []
    yield started
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


def events(path: Path) -> list[tuple[str, int, float, str]]:
    """(kind, pid, time, job) lines written by the gated job."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        kind, pid, when, name = line.split(" ", 3)
        found.append((kind, int(pid), float(when), name))
    return found


# --------------------------------------------------------------------------- checks
def expected_output(key: str) -> dict[str, Any]:
    """What the job ``key`` of tests/support/concurrency_worker.py returns."""
    kind, *args = key.split("-")
    if kind == "square":
        i = int(args[0])
        return {"i": i, "square": i * i, "text": f"{i}-" * (1 + i % 5)}
    if kind == "combine":
        a, b = int(args[0]), int(args[1])
        return {"pair": [a, b], "sum": a * a + b * b}
    tag = "-".join(args)
    return {"tag": tag, "value": sum(map(ord, tag))}


def by_key(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Every job run under each key, over all workers."""
    found: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        for key, runs in result["jobs"].items():
            found.setdefault(key, []).extend(runs)
    return found


def check_jobs(results: list[dict[str, Any]]) -> dict[str, str]:
    """Every job of every worker is in its JobStore with the right output and a cache
    outcome; jobs of one key share one digest. Returns key -> digest."""
    digests: dict[str, str] = {}
    for result in results:
        assert result["warnings"] == [], result["warnings"]
    for key, runs in by_key(results).items():
        for run in runs:
            assert run["stored"], (key, run)
            assert run["output"] == expected_output(key), (key, run)
            assert run["outcome"] in (Outcome.HIT.value, Outcome.MISS.value), (key, run)
        assert len({run["digest"] for run in runs}) == 1, (key, runs)
        digests[key] = runs[0]["digest"]
    assert len(set(digests.values())) == len(digests)  # one digest per distinct call
    return digests


def check_store(cache: CacheStore, digests: dict[str, str], results: list[dict[str, Any]]) -> None:
    """One whole, servable entry per digest, made by a job that really ran, and nothing
    else; ``verify`` (in process and ``cachetool verify``) finds no problem."""
    runs = by_key(results)
    assert cache.count() == len(digests)
    for key, digest in digests.items():
        assert cache.count({"digest": digest}) == 1, key
        found = cache.lookup(digest)
        assert found.outcome is Outcome.HIT, (key, found.reason)
        assert found.entry is not None
        assert loads(found.entry.output) == expected_output(key)
        ran = {run["uuid"] for run in runs[key] if run["outcome"] == Outcome.MISS.value}
        assert found.entry.source_uuid in ran, key
    assert verify(cache) == []
    result = CliRunner().invoke(cli, ["verify", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["sound"]
    assert report["checked"] == len(digests)


def check_executions(counts: Counter[str], results: list[dict[str, Any]]) -> None:
    """Each key ran as often as its jobs report a miss (the others were served)."""
    for key, runs in by_key(results).items():
        misses = sum(run["outcome"] == Outcome.MISS.value for run in runs)
        assert counts[key] == misses, (key, counts[key], misses)
        assert misses >= 1, key


def overlapped(results: list[dict[str, Any]]) -> bool:
    """Whether all the workers' runs were in progress at one moment."""
    return max(r["started"] for r in results) < min(r["finished"] for r in results)


# --------------------------------------------------------------------------- hammer
SHARED = 200  #: square jobs every worker runs (in its own shuffled order)
OWN = 50  #: square jobs only one worker runs
PAIRS = 20  #: combine jobs downstream of two shared squares, in every worker


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_hammer(backend, cache, dedup, counts, tmp_path, reaper):
    """8 workers start together, each running 200 shared small jobs in its own order, 20
    downstream ones and 50 of its own: every digest ends up with exactly one whole entry, every
    output is right, and each job ran once per reported miss (once in all with DEDUP)."""
    shared: list[list[Any]] = [["square", i] for i in range(SHARED)]
    shared += [["combine", i, i + 1] for i in range(PAIRS)]
    env = {"JOBFLOW_CACHE_DEDUP": "1" if dedup else "0"}
    for k in range(WORKERS):
        own = [["square", 100_000 * (k + 1) + j] for j in range(OWN)]
        reaper.append(spawn(tmp_path, f"w{k}", shared + own, env, seed=k))
    release(tmp_path, reaper)
    results = finish(reaper)
    assert overlapped(results)

    digests = check_jobs(results)
    assert len(digests) == SHARED + PAIRS + WORKERS * OWN
    check_store(cache, digests, results)
    executions = counts()
    check_executions(executions, results)
    for key in digests:
        if dedup or int(key.split("-")[1]) >= 100_000:
            assert executions[key] == 1, key
        else:
            assert 1 <= executions[key] <= WORKERS, key
    for worker in reaper:  # every square job's file is in the run folder, run or served
        for key in worker.result()["jobs"]:
            if key.startswith("square-"):
                i = int(key.split("-")[1])
                path = worker.folder / "run" / f"{key}.txt"
                assert path.read_text() == f"{i}\n" * (1 + i % 7), (worker.name, key)
    print(
        f"\n{backend}, dedup={dedup}: {sum(executions.values())} executions of "
        f"{len(digests)} digests by {WORKERS} workers"
    )


# --------------------------------------------------------------------------- one digest
def _same_job_everywhere(tmp_path: Path, env: dict[str, str], reaper: list[Worker]) -> Path:
    """8 workers start together on the same gated job (held until the test lets it go)."""
    hold = tmp_path / "hold"
    hold.touch()
    event_file = tmp_path / "events.txt"
    env = {**env, "JFC_HOLD_FILE": str(hold), "JFC_EVENTS_FILE": str(event_file)}
    for k in range(WORKERS):
        reaper.append(spawn(tmp_path, f"w{k}", [["gated", "same"]], env))
    release(tmp_path, reaper)
    return event_file


def test_same_digest_without_dedup_all_run_one_whole_entry_survives(
    backend, cache, counts, tmp_path, reaper
):
    """Without DEDUP, 8 workers computing one digest at the same moment all run it; exactly one
    entry survives, and it is whole: its files are those of the job it names as its source."""
    event_file = _same_job_everywhere(tmp_path, {"JOBFLOW_CACHE_DEDUP": "0"}, reaper)
    # all eight are inside the job at once before any may finish
    wait_for(lambda: len(events(event_file)) == WORKERS, "8 jobs to start", reaper)
    (tmp_path / "hold").unlink()
    results = finish(reaper)

    digests = check_jobs(results)
    check_store(cache, digests, results)
    check_executions(counts(), results)
    assert counts()["gated-same"] == WORKERS
    entry = cache.get(digests["gated-same"])
    uuids = {run["uuid"] for run in by_key(results)["gated-same"]}
    assert entry.source_uuid in uuids
    who = [record for record in entry.files if record.path == "who.txt"]
    assert len(who) == 1
    area = ObjectArea(cache.objects_dir)
    assert area.path_of(who[0].xxh3).read_text() == f"{entry.source_uuid}\n"
    for worker in reaper:  # each worker's own file: its own job wrote it
        (run,) = worker.result()["jobs"]["gated-same"]
        assert (worker.folder / "run" / "who.txt").read_text() == f"{run['uuid']}\n"


def test_same_digest_with_dedup_runs_once_and_serves_seven(
    backend, cache, counts, tmp_path, reaper
):
    """With DEDUP, 8 workers reaching one digest at once: one runs it while the other seven
    wait for it, then serve its result (and its files)."""
    event_file = _same_job_everywhere(tmp_path, {"JOBFLOW_CACHE_DEDUP": "1"}, reaper)

    def settled() -> bool:  # each worker is running the job or waiting for it
        running = {pid for _, pid, _, _ in events(event_file)}
        waiting = {w.proc.pid for w in reaper if "Waiting - " in w.log}
        return len(running | waiting) == WORKERS

    wait_for(settled, "one worker to run the job and the others to wait", reaper)
    (tmp_path / "hold").unlink()
    results = finish(reaper)

    digests = check_jobs(results)
    check_store(cache, digests, results)
    check_executions(counts(), results)
    assert counts()["gated-same"] == 1
    assert len(events(event_file)) == 2  # one start, one end
    runs = by_key(results)["gated-same"]
    owner = [run for run in runs if run["outcome"] == Outcome.MISS.value]
    served = [run for run in runs if run["outcome"] == Outcome.HIT.value]
    assert len(owner) == 1
    assert len(served) == WORKERS - 1
    assert {run["source_uuid"] for run in served} == {owner[0]["uuid"]}
    waited = [w for w in reaper if "Waiting - " in w.log]
    assert len(waited) == WORKERS - 1
    for worker in waited:  # the owner's file, linked back into each waiter's run folder
        assert (worker.folder / "run" / "who.txt").read_text() == f"{owner[0]['uuid']}\n"
        assert "Served from cache - " in worker.log


# --------------------------------------------------------------------------- leases
def _owner_and_waiters(
    tmp_path: Path,
    reaper: list[Worker],
    lease: float,
    waiters: int = 1,
    owner_env: dict[str, str] | None = None,
) -> tuple[Worker, list[Worker], Path]:
    """An owner inside the gated job (held), then ``waiters`` workers waiting for it."""
    hold = tmp_path / "hold"
    hold.touch()
    event_file = tmp_path / "events.txt"
    env = {
        "JOBFLOW_CACHE_DEDUP": "1",
        "JOBFLOW_CACHE_LEASE": str(lease),
        "JFC_EVENTS_FILE": str(event_file),
    }
    owner = spawn(
        tmp_path,
        "owner",
        [["gated", "lease"]],
        {**env, "JFC_HOLD_FILE": str(hold), **(owner_env or {})},
        barrier=False,
    )
    reaper.append(owner)
    wait_for(lambda: len(events(event_file)) == 1, "the owner to start its job", reaper)
    waiting = []
    for k in range(waiters):  # their jobs are not held: they run at once if they run
        env_k = {**env, "JFC_HOLD_FILE": str(tmp_path / "never")}
        waiting.append(spawn(tmp_path, f"waiter{k}", [["gated", "lease"]], env_k, barrier=False))
    reaper += waiting
    wait_for(lambda: all("Waiting - " in w.log for w in waiting), "the waiters", reaper)
    return owner, waiting, event_file


def test_crashed_owner_is_taken_over_once_its_lease_expires(
    backend, cache, counts, tmp_path, reaper, record_property
):
    """A worker SIGKILLed while it holds the claim blocks the others only until its lease
    expires: the waiter then runs the job itself, once, after the owner died."""
    lease = 2.0
    owner, (waiter,), event_file = _owner_and_waiters(tmp_path, reaper, lease)
    killed = time.time()
    owner.proc.kill()
    owner.proc.wait()
    (result,) = finish([waiter])

    digests = check_jobs([result])
    check_store(cache, digests, [result])
    assert counts()["gated-lease"] == 1  # the owner never got to count its execution
    (run,) = result["jobs"]["gated-lease"]
    assert run["outcome"] == Outcome.MISS.value
    starts = [(pid, when) for kind, pid, when, _ in events(event_file) if kind == "start"]
    assert [pid for pid, _ in starts] == [owner.proc.pid, waiter.proc.pid]
    took_over = starts[1][1] - killed
    assert took_over > 0  # the waiter ran only after the owner died
    record_property("takeover_after_kill_s", round(took_over, 3))
    print(f"\n{backend}: waiter ran {took_over:.2f} s after the owner was killed (lease {lease} s)")


def test_failing_owner_lets_the_waiters_run(backend, cache, counts, tmp_path, reaper):
    """A job that fails while its worker holds the claim releases it: one waiter runs the
    job, the others are served its result (nobody waits for the hour-long lease)."""
    owner, waiters, _ = _owner_and_waiters(
        tmp_path, reaper, lease=3600.0, waiters=3, owner_env={"JFC_FAIL": "gated-lease"}
    )
    (tmp_path / "hold").unlink()
    (failed,) = finish([owner])
    results = finish(waiters)

    (owner_run,) = failed["jobs"]["gated-lease"]
    assert not owner_run["stored"]  # the job failed: no output in the JobStore
    digests = check_jobs(results)
    check_store(cache, digests, results)
    check_executions(counts() - Counter({"gated-lease": 1}), results)  # minus the failure
    assert counts()["gated-lease"] == 2
    runs = by_key(results)["gated-lease"]
    assert sorted(run["outcome"] for run in runs) == ["hit", "hit", "miss"]


def test_long_job_keeps_its_claim(backend, cache, counts, tmp_path, reaper, record_property):
    """A job running three times longer than the lease is not taken over: the heartbeat
    renews its claim, and the waiters are served its result."""
    lease = 2.0
    owner, waiters, event_file = _owner_and_waiters(tmp_path, reaper, lease, waiters=2)
    started = events(event_file)[0][2]
    time.sleep(max(0.0, started + 3 * lease - time.time()))
    (tmp_path / "hold").unlink()
    results = finish([owner, *waiters])

    digests = check_jobs(results)
    check_store(cache, digests, results)
    check_executions(counts(), results)
    assert counts()["gated-lease"] == 1
    (owner_run,) = results[0]["jobs"]["gated-lease"]
    assert owner_run["outcome"] == Outcome.MISS.value
    for result in results[1:]:
        (run,) = result["jobs"]["gated-lease"]
        assert run["outcome"] == Outcome.HIT.value
        assert run["source_uuid"] == owner_run["uuid"]
    ran_for = events(event_file)[1][2] - started
    assert ran_for >= 3 * lease
    assert "taken over" not in owner.log
    record_property("owner_job_s", round(ran_for, 3))
