"""gc and purge are safe against running flows, and killed ingests leave nothing behind for
long (issue 14).

An object an entry being recorded will reference is pinned by its process before the
process looks whether the object exists; gc sets unreferenced objects aside, reads the pins
again and puts pinned ones back; objects stored within ``GC_GRACE`` are kept regardless.
The race is real: ``cachetool gc --yes`` loops in one process while flows record in
another, on SQLite and on PostgreSQL (tests/support/pgserver.py), with the grace period off so
that only the pins protect; afterwards no entry misses an object.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from jobflow import Flow, job

from jobflow_cache.admin.purge import collect_garbage
from jobflow_cache.files import FileRecord, ObjectArea, fsops, housekeeping, storage
from jobflow_cache.store import CacheStore
from tests.support.jobs import executed

ROOT = Path(__file__).resolve().parents[2]
JOBS = 40


@job
def write_pair(i: int, variant: str) -> int:
    """Write a file of its own and one every job of the flow writes alike (a reused object)."""
    executed("write_pair")
    Path(f"own_{i}.txt").write_text(f"{variant} {i}\n" * 50)
    Path(f"shared_{i}.txt").write_text(f"{variant} shared\n" * 50)
    return i


def _record(folder: str, variants: str) -> None:
    """Record flows of :data:`JOBS` jobs, one per variant, in ``folder``."""
    from jobflow_cache import run_locally

    if os.environ.get("JFC_TEST_NO_PINS"):  # to see the race bite without them (by hand)
        ObjectArea._pin = lambda self, xxh3: None  # type: ignore[method-assign]
    for variant in variants.split(","):
        flow = Flow([write_pair(i, variant) for i in range(JOBS)])
        (Path(folder) / variant).mkdir(parents=True, exist_ok=True)
        run_locally(flow, root_dir=str(Path(folder) / variant), ensure_success=True)


def _gc_loop(stop: str, report: str) -> None:
    """Run ``cachetool gc --yes --json`` until the file ``stop`` exists; write the number
    of rounds and of objects deleted to ``report``."""
    import contextlib
    import io

    from jobflow_cache.cli import cli

    rounds = deleted = 0
    while not os.path.exists(stop) or rounds == 0:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.main(["gc", "--yes", "--json"], standalone_mode=False)
        deleted += json.loads(out.getvalue())["objects"]
        rounds += 1
    Path(report).write_text(json.dumps({"rounds": rounds, "deleted": deleted}))


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def lost_objects(cache: CacheStore) -> tuple[int, int]:
    """(entries, entries whose file objects are not all there and sound)."""
    area = ObjectArea(cache.objects_dir)
    entries = lost = 0
    for doc in cache.find({}, properties=["digest", "files"]):
        entries += 1
        records = [FileRecord.model_validate(r) for r in doc.get("files") or []]
        if any(area.verify(r) is not None for r in records):
            lost += 1
    return entries, lost


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_gc_looping_while_flows_record_loses_no_object(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {"JOBFLOW_CACHE_GC_GRACE": "0"}  # only the pins protect
    if backend == "postgres":
        spec = request.getfixturevalue("pg_spec")
        env["JOBFLOW_CACHE_STORE"] = json.dumps(spec)
        monkeypatch.setenv("JOBFLOW_CACHE_STORE", env["JOBFLOW_CACHE_STORE"])
    stop = tmp_path / "stop"
    # the store exists before gc starts (no command creates one)
    first = python(
        "import sys; from tests.execution.test_gc_safety import _record; _record(*sys.argv[1:])",
        str(tmp_path / "runs"),
        "warmup",
        env=env,
    )
    assert first.wait(timeout=300) == 0, first.stderr.read() if first.stderr else ""
    report = tmp_path / "gc.json"
    gc = python(
        "import sys; from tests.execution.test_gc_safety import _gc_loop; _gc_loop(*sys.argv[1:])",
        str(stop),
        str(report),
        env=env,
    )
    try:
        recorder = python(
            "import sys; from tests.execution.test_gc_safety import _record; "
            "_record(*sys.argv[1:])",
            str(tmp_path / "runs"),
            "a,b,c",
            env=env,
        )
        _, err = recorder.communicate(timeout=600)
        assert recorder.returncode == 0, err[-3000:]
    finally:
        stop.touch()
        _, gc_err = gc.communicate(timeout=300)
    assert gc.returncode == 0, gc_err[-3000:]
    rounds = json.loads(report.read_text())["rounds"]
    print("gc rounds", rounds, "deleted", json.loads(report.read_text())["deleted"])
    assert rounds >= 2, "gc ran during the recording"
    with CacheStore.from_settings() as cache:
        entries, lost = lost_objects(cache)
    print("entries", entries, "lost", lost)
    assert entries == 4 * JOBS
    assert lost == 0
    assert "missing" not in err, "no job saw an object vanish"


def _ingest_and_hang(root: str, src: str, ready: str) -> None:
    """Ingest ``src`` into the area ``root`` and hang once its temporary copy is written
    (the point where a SIGKILL leaves a temporary file)."""

    def hang(*args: Any, **kwargs: Any) -> Any:
        Path(ready).touch()
        time.sleep(600)

    storage.hash_stream = hang  # type: ignore[assignment]
    ObjectArea(root).ingest(src)


def _ingest_and_wait(root: str, src: str, ready: str) -> None:
    """Ingest ``src`` (pinning its object) and stay alive, as a flow recording an entry."""
    ObjectArea(root).ingest(src)
    Path(ready).touch()
    time.sleep(600)


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)


def test_killed_ingest_temp_files_go_at_the_next_ingest(
    tmp_path: Path, isolated_cache: Path
) -> None:
    area = isolated_cache / "objects"
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(1 << 20))
    ready = tmp_path / "ready"
    child = python(
        "import sys; from tests.execution.test_gc_safety import _ingest_and_hang as f; "
        "f(*sys.argv[1:])",
        str(area),
        str(src),
        str(ready),
    )
    wait_for(ready, child)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    (stale,) = [p for p in area.iterdir() if p.name.startswith(".jfc-tmp-")]
    assert stale.name.startswith(f".jfc-tmp-{child.pid}-"), "names its process"
    # a temporary file of a live process (this one), as old: kept
    live = area / f".jfc-tmp-{os.getpid()}-{'0' * 32}-{fsops.host()}"
    live.write_bytes(b"being stored")
    old = time.time() - housekeeping.STALE_DEAD_AFTER - 5
    for path in (stale, live):
        os.utime(path, (old, old))  # a minute went by (the age is the last write)

    # the next ingest: a real flow recording a file, in a fresh process
    run = tmp_path / "run"
    run.mkdir()
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tests.execution.test_gc_safety import _record; "
            "_record(*sys.argv[1:])",
            str(run),
            "next",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not stale.exists(), "removed at the start of the next ingest"
    assert live.exists(), "its process is alive"
    live.unlink()


def test_pinned_objects_survive_gc_until_their_process_is_gone(
    tmp_path: Path, isolated_cache: Path
) -> None:
    src = tmp_path / "file.txt"
    src.write_text("recorded by a running flow\n")
    ready = tmp_path / "ready"
    with CacheStore.from_settings() as cache:
        area = ObjectArea(cache.objects_dir)
        child = python(
            "import sys; from tests.execution.test_gc_safety import _ingest_and_wait as f; "
            "f(*sys.argv[1:])",
            str(cache.objects_dir),
            str(src),
            str(ready),
        )
        try:
            wait_for(ready, child)
            ((digest, _),) = list(area.iter_objects())
            assert digest in area.pinned()
            assert collect_garbage(cache, grace=0).objects == 0, "pinned: its entry is coming"
            assert area.verify(FileRecord(path="x", xxh3=digest, size=src.stat().st_size)) is None
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        assert area.pinned() == set(), "a gone process's pins protect nothing"
        assert collect_garbage(cache, grace=0).objects == 1
        assert list(area.iter_objects()) == []


def test_recent_objects_are_kept_for_the_grace_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JOBFLOW_CACHE_GC_GRACE")  # the default: an hour
    src = tmp_path / "file.txt"
    src.write_text("an orphan\n")
    with CacheStore.from_settings() as cache:
        area = ObjectArea(cache.objects_dir)
        area.ingest(src)
        assert collect_garbage(cache).objects == 0, "stored just now"
        assert len(list(area.iter_objects())) == 1
        monkeypatch.setenv("JOBFLOW_CACHE_GC_GRACE", "0")
        assert collect_garbage(cache).objects == 1
        assert list(area.iter_objects()) == []


def test_gc_puts_back_an_object_pinned_while_it_was_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving the pins exist for: a recorder pins an object and finds it just
    before gc sets it aside; gc's second reading of the pins puts it back."""
    src = tmp_path / "file.txt"
    src.write_text("reused\n")
    with CacheStore.from_settings() as cache:
        area = ObjectArea(cache.objects_dir)
        digest = area.ingest(src)
        readings = iter([set(), {digest}])  # not pinned at the first reading, then pinned
        monkeypatch.setattr(ObjectArea, "pinned", lambda self, clean=True: next(readings))
        assert collect_garbage(cache, grace=0).objects == 0
        assert area.verify(FileRecord(path="x", xxh3=digest, size=7)) is None
        assert [
            p.name for p in Path(cache.objects_dir).iterdir() if p.name.startswith(".jfc-tmp")
        ] == []
