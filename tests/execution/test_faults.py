"""Fault injection: each test injects a real fault (a killed process, a full or read-only file
system, an unreachable or vanishing store, a tampered entry or file object, a crafted document)
and checks that nothing is lost and nothing is served wrong.

Faults are real: processes are killed with SIGKILL, file systems really fill up (a small tmpfs,
or a file size limit) or really deny writes (the process runs without the capabilities that
let root ignore permissions), stores are really unreachable. Nothing is mocked.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import json
import os
import pickle
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from jobflow import Flow, Job, JobStore
from maggma.stores import MemoryStore

from jobflow_cache import (
    CacheEntry,
    CacheStore,
    CacheWarning,
    ObjectArea,
    Outcome,
    codec,
    run_locally,
)
from jobflow_cache.admin.purge import collect_garbage
from jobflow_cache.admin.verify import verify
from jobflow_cache.cli import cli
from jobflow_cache.files import housekeeping
from tests.conftest import ROOT
from tests.support import fault_jobs, jobs

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

# -------------------------------------------------------------------------------- helpers


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: this one's (cache settings included), tests importable."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def verify_cli() -> dict:
    """``cachetool verify --json`` on the configured cache."""
    result = CliRunner().invoke(cli, ["verify", "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == (0 if report["sound"] else 1), result.output
    return report


def assert_entries_whole(cache: CacheStore) -> list[str]:
    """Every entry in the store is servable (a HIT) and all its file objects are present and
    verified by their hash; return the names of the entries found."""
    area = ObjectArea(cache.objects_dir)
    names = []
    for doc in cache.find():
        found = cache.lookup(doc["digest"])
        assert found.outcome is Outcome.HIT, found.reason
        assert found.entry is not None
        for record in found.entry.files:
            assert area.verify(record) is None, (record.path, area.verify(record))
        names.append(found.entry.name)
    return sorted(names)


def stale_tmp_files(area: Path) -> list[str]:
    """Temporary files left in the object area's top folder."""
    try:
        return [e.name for e in os.scandir(area) if e.name.startswith(".jfc-tmp-")]
    except FileNotFoundError:
        return []


def objects_in(area: Path) -> int:
    """Number of published objects (``<xx>/<rest>``) in the object area."""
    try:
        fanouts = [e.path for e in os.scandir(area) if len(e.name) == 2 and e.is_dir()]
    except FileNotFoundError:
        return 0
    total = 0
    for fanout in fanouts:
        try:
            total += sum(1 for _ in os.scandir(fanout))
        except FileNotFoundError:
            continue
    return total


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], after: float = 0.0) -> bool:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (then ``after`` seconds later); False
    when the process ended first."""
    while proc.poll() is None:
        if ready():
            if after:
                time.sleep(after)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return proc.returncode == -signal.SIGKILL
        time.sleep(0.0002)
    return False


def job_outputs(store: JobStore, flow: Flow) -> list:
    return [store.get_output(j.uuid, which="last", load=True) for j in flow]


def run_dir_files(folder: Path) -> dict[str, bytes]:
    """Relative path -> bytes of every regular file below ``folder``."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def run_large(root: Path, cache=None, *args) -> tuple[list, list[dict[str, bytes]]]:
    """Run :func:`fault_jobs.large_flow` (one folder per job under ``root``); return the
    outputs without run-folder paths, and the files of each job's folder."""
    store = JobStore(MemoryStore())
    flow = fault_jobs.large_flow(*args)
    run_locally(
        flow,
        store=store,
        cache=cache,
        log=False,
        create_folders=True,
        root_dir=root,
        ensure_success=True,
    )
    big, sizes = job_outputs(store, flow)
    folder = Path(big.pop("dir_name"))
    return [big, sizes], [run_dir_files(folder)]


# ---------------------------------------------------------------------------- backends


class Backend:
    """The cache store of a test: the embedded SQLite store, a MongoDB collection (maggma's
    MemoryStore, mongomock: no MongoDB server can run here) or a PostgreSQL table."""

    def __init__(self, name: str, objects: Path, spec: dict | None = None) -> None:
        self.name = name
        self.objects = objects
        self.spec = spec
        # SUBSTITUTE: mongomock stands in for a MongoDB server; it lives in this process
        self._memory = (
            CacheStore(MemoryStore(collection_name="entries"), objects)
            if name == "memory"
            else None
        )

    def has_entry(self) -> bool:
        """Whether the store holds an entry, read as another process would (never raises)."""
        if self.name == "sqlite":
            return _entry_rows(Path(os.environ["JOBFLOW_CACHE_DIR"]) / "cache.sqlite")()
        assert self.spec is not None
        psycopg = pytest.importorskip("psycopg")
        table = '"' + (self.spec["table"] + "__e").replace('"', '""') + '"'
        try:
            with psycopg.connect(self.spec["uri"], autocommit=True, connect_timeout=5) as conn:
                return conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None
        except psycopg.Error:  # not created yet
            return False

    def cache(self) -> CacheStore:
        """A CacheStore on the backend's entries (not connected)."""
        if self._memory is not None:
            return self._memory
        return CacheStore.from_settings()

    @contextlib.contextmanager
    def opened(self) -> Iterator[CacheStore]:
        """A connected CacheStore on the backend's entries (a MemoryStore is never closed: a
        closed one cannot be written to again)."""
        cache = self.cache()
        cache.connect()
        try:
            yield cache
        finally:
            if self._memory is None:
                cache.close()


def _backend(request, name: str, objects: Path, monkeypatch) -> Backend:
    if name != "postgres":
        return Backend(name, objects)
    try:
        spec = request.getfixturevalue("pg_spec")  # tests/support/pgserver.py, loaded by conftest
    except pytest.FixtureLookupError:
        pytest.skip("the PostgreSQL fixtures of tests/support/pgserver.py are not loaded")
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(spec))
    return Backend(name, objects, spec)


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("memory", marks=pytest.mark.substitute),
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
def backend(request, isolated_cache, monkeypatch) -> Backend:
    """The cache store, set in the environment subprocesses inherit (except ``memory``)."""
    return _backend(request, request.param, isolated_cache / "objects", monkeypatch)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def process_backend(request, isolated_cache, monkeypatch) -> Backend:
    """A cache store that several processes share, set in the environment they inherit."""
    return _backend(request, request.param, isolated_cache / "objects", monkeypatch)


# ------------------------------------------------------------------ 1. SIGKILL while recording

KILLED_CHILD = """
import sys
from jobflow_cache import run_locally
from jobflow import Flow
from tests.support import fault_jobs
flow = Flow([fault_jobs.large_flow(), fault_jobs.hold()])  # killed before hold ends
run_locally(flow, log=False, create_folders=True, root_dir=sys.argv[1],
            files=sys.argv[2], ensure_success=True)
"""


def _entry_rows(path: Path) -> Callable[[], bool]:
    """Whether the embedded store at ``path`` holds an entry (read as another process would)."""

    def ready() -> bool:
        if not path.exists():
            return False
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05)
            try:
                return conn.execute("SELECT 1 FROM jfc_entries LIMIT 1").fetchone() is not None
            finally:
                conn.close()
        except sqlite3.Error:  # not created yet
            return False

    return ready


KILL_POINTS = {
    # a file is being linked or copied into the object area under a temporary name
    "ingesting": lambda area, ready, store: lambda: bool(stale_tmp_files(area)),
    # some objects are published, the others not yet
    "published": lambda area, ready, store: lambda: objects_in(area) >= 1,
    # the job has returned: its files are being recorded, its entry built and queued
    "returned": lambda area, ready, store: ready.exists,
    # its entry is in the store; the next job runs
    "written": lambda area, ready, backend: backend.has_entry,
}


@pytest.fixture(scope="module")
def clean_large(tmp_path_factory) -> tuple[list, list[dict[str, bytes]]]:
    """Outputs and files of the large flow run without the cache."""
    return run_large(tmp_path_factory.mktemp("clean"), cache=False)


@pytest.mark.parametrize("files_mode", ["link", "copy"])
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_while_recording_leaves_no_entry_or_a_whole_one(
    point, files_mode, process_backend, clean_large, counts, isolated_cache, tmp_path, monkeypatch
):
    """Kill -9 a real run at a point of recording a job with 64 MB of files; a fresh process
    then finds no entry or a whole one, ``cachetool verify`` finds nothing wrong, and the
    next run gives the outputs and files of a clean run."""
    area = isolated_cache / "objects"
    ready = tmp_path / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(tmp_path / "killed"), files_mode],
        env=child_env(**{fault_jobs.READY_ENV: str(ready)}),
        cwd=tmp_path,
    )
    assert kill_when(proc, KILL_POINTS[point](area, ready, process_backend)), "killed there"
    assert counts()["write_large"] == 1
    stale = stale_tmp_files(area)
    if point == "ingesting":
        assert stale, "killed while a file was under its temporary name"

    with CacheStore.from_settings() as cache:
        survived = assert_entries_whole(cache)
        assert verify(cache) == []
    if point == "written":
        assert "write_large" in survived
    report = verify_cli()
    assert report["sound"]
    assert report["problems"] == []

    assert ObjectArea(area).remove_stale() == (0, 0), "may still be being stored"
    monkeypatch.setattr(housekeeping, "STALE_AFTER", -1.0)  # as if an hour had passed
    with CacheStore.from_settings() as cache:  # the killed run's orphans and temporary files
        assert collect_garbage(cache).objects >= len(stale)
        assert assert_entries_whole(cache) == survived
    assert stale_tmp_files(area) == []

    outputs, files_ = run_large(tmp_path / "rerun")
    assert (outputs, files_) == clean_large
    executed = 1 if "write_large" in survived else 2
    assert counts()["write_large"] == executed, "a whole entry is served, a missing one rerun"
    outputs, files_ = run_large(tmp_path / "served")
    assert (outputs, files_) == clean_large
    assert counts()["write_large"] == executed, "recorded by the run after the crash"
    with CacheStore.from_settings() as cache:
        assert assert_entries_whole(cache) == ["measure", "write_large"]


# ------------------------------------------------ 2. disk full / permission denied while storing

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_root_file_privileges() -> None:
    """In a child before exec: drop the capabilities that let root ignore file permissions
    (root then gets EACCES from read-only folders and unreadable files like any user).
    Runs as root without them rather than as ``nobody``: the interpreter lives under /root."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


CHILD_RUN = """
import json, sys, warnings
from jobflow import JobStore
from maggma.stores import MemoryStore
from jobflow_cache import CacheWarning, run_locally
from tests.support import fault_jobs

flow = getattr(fault_jobs, sys.argv[2])(*json.loads(sys.argv[3]))
store = JobStore(MemoryStore())
own = sys.argv[1] != "."  # else every job runs in the working folder
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    run_locally(flow, store=store, log=False, create_folders=own,
                root_dir=sys.argv[1] if own else None, ensure_success=True)
print(json.dumps({
    "outputs": [store.get_output(j.uuid, which="last") for j in flow],
    "warnings": [str(w.message) for w in caught if issubclass(w.category, CacheWarning)],
}))
"""


def run_child(
    root: Path | str,
    factory: str,
    args: list,
    *,
    unprivileged: bool = False,
    cwd: Path | None = None,
    **env: str,
) -> dict:
    """Run ``fault_jobs.<factory>(*args)`` in a fresh process (without root's file privileges
    when ``unprivileged``), each job in a folder of its own under ``root`` (``"."``: all in
    ``cwd``); return its job outputs and CacheWarnings."""
    proc = subprocess.run(
        [sys.executable, "-c", CHILD_RUN, str(root), factory, json.dumps(args)],
        env=child_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        preexec_fn=_drop_root_file_privileges if unprivileged and IS_ROOT else None,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def read_only(tmp_path) -> Iterator[Callable[[Path], Path]]:
    """Make folders read-only (mode 555) for an unprivileged child; restored afterwards.
    Skips when this process cannot make a child that permissions apply to."""
    made: list[Path] = []
    probe = tmp_path / "probe-ro"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", f"open({str(probe / 'x')!r}, 'w')"],
            capture_output=True,
            check=False,
            preexec_fn=_drop_root_file_privileges if IS_ROOT else None,
        )
    finally:
        probe.chmod(0o755)
    if b"PermissionError" not in proc.stderr:
        pytest.skip("cannot run a process that file permissions apply to here")

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o555)
        made.append(folder)
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


@pytest.fixture
def small_fs(tmp_path) -> Iterator[Callable[[str, int], Path]]:
    """Mount a small file system (tmpfs, else an ext4 image on a loop device) of ``kib`` KiB
    at ``tmp_path/name``; unmounted afterwards. Skips where mounting is not permitted."""
    mounted: list[Path] = []

    def mount(name: str, kib: int) -> Path:
        point = tmp_path / name
        point.mkdir()
        tried = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k,mode=755", "tmpfs", str(point)],
            capture_output=True,
            text=True,
            check=False,
        )
        if tried.returncode != 0:
            image = tmp_path / f"{name}.img"
            with open(image, "wb") as fh:
                fh.truncate(max(kib, 512) * 1024)
            steps = [
                ["mkfs.ext4", "-q", "-m", "0", str(image)],
                ["mount", "-o", "loop", str(image), str(point)],
            ]
            for step in steps:
                try:
                    tried = subprocess.run(step, capture_output=True, text=True, check=False)
                except FileNotFoundError as err:
                    pytest.skip(f"no small file system here: tmpfs: {tried.stderr}; {err}")
                if tried.returncode != 0:
                    pytest.skip(f"cannot mount a small file system here: {tried.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` until it refuses another byte; return the filler."""
    filler = folder / "filler"
    chunk = b"\0" * 65536
    errors = []
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    fh.write(chunk[:size])
            except OSError as err:
                errors.append(err.errno)
    assert errors == [errno.ENOSPC] * 4
    return filler


def entry_names() -> list[str]:
    with CacheStore.from_settings() as cache:
        return assert_entries_whole(cache)


@pytest.mark.parametrize("files_mode", ["link", "copy"])
def test_permission_denied_on_the_object_area_records_nothing(
    files_mode, read_only, counts, isolated_cache, tmp_path, monkeypatch
):
    """The object area is read-only for the worker: the job's outputs still reach the JobStore,
    its entry is not written, a warning says why, and once writable it records normally."""
    monkeypatch.setenv("JOBFLOW_CACHE_OBJECTS_DIR", str(tmp_path / "objects"))
    monkeypatch.setenv("JOBFLOW_CACHE_FILES", files_mode)
    area = read_only(tmp_path / "objects")
    result = run_child(tmp_path / "denied", "large_flow", ["d", 2, 100_000], unprivileged=True)
    big, sizes = result["outputs"]
    assert (big["names"], sizes) == (["big/part0.bin", "big/part1.bin"], [100_000, 100_000])
    (warning,) = result["warnings"]
    assert "'write_large' was not cached" in warning
    assert "Permission denied" in warning
    assert entry_names() == ["measure"], "the job without files is recorded"
    assert os.listdir(area) == []

    area.chmod(0o755)  # the fault is removed
    clean = run_large(tmp_path / "clean", False, "d", 2, 100_000)
    assert run_large(tmp_path / "again", None, "d", 2, 100_000) == clean
    assert entry_names() == ["measure", "write_large"]
    assert run_large(tmp_path / "served", None, "d", 2, 100_000) == clean
    assert counts()["write_large"] == 3, "denied, recorded, then served"


@pytest.mark.parametrize("files_mode", ["link", "copy"])
def test_a_file_the_cache_cannot_read_records_nothing(
    files_mode, read_only, counts, isolated_cache, tmp_path, monkeypatch
):
    """A job writes a file its worker may not read: the job succeeds, its entry is not
    written (an entry without that file would be served incomplete), a warning says why."""
    monkeypatch.setenv("JOBFLOW_CACHE_FILES", files_mode)
    result = run_child(tmp_path / "denied", "unreadable_flow", ["u"], unprivileged=True)
    assert result["outputs"][0] == {"tag": "u"}
    (warning,) = result["warnings"]
    assert "'write_unreadable' was not cached" in warning
    assert "secret.txt" in warning
    assert "Permission denied" in warning
    assert entry_names() == ["large_output"]
    assert stale_tmp_files(isolated_cache / "objects") == []
    if IS_ROOT:  # the fault is removed: root reads it
        run_child(tmp_path / "root", "unreadable_flow", ["u"])
        assert entry_names() == ["large_output", "write_unreadable"]


@pytest.mark.parametrize("files_mode", ["link", "copy"])
def test_a_full_object_area_records_nothing_and_leaves_no_partial_object(
    files_mode, small_fs, counts, isolated_cache, tmp_path, monkeypatch
):
    """The object area's file system fills up while a job's files are stored: the outputs
    reach the JobStore, no entry and no partial object is written, a warning says why; with
    space freed the next run records normally."""
    area = small_fs("objects", 4096)
    monkeypatch.setenv("JOBFLOW_CACHE_OBJECTS_DIR", str(area))
    monkeypatch.setenv("JOBFLOW_CACHE_FILES", files_mode)
    filler = fill(area)
    os.truncate(filler, filler.stat().st_size - (1536 << 10))  # 1.5 MiB free
    args = ("f", 2, 1 << 20)  # 2 MiB of files (on another file system: links are copies)
    store = JobStore(MemoryStore())
    flow = fault_jobs.large_flow(*args)
    with pytest.warns(CacheWarning, match="No space left on device") as caught:
        run_locally(flow, store=store, log=False, create_folders=True, root_dir=tmp_path / "a")
    assert len([w for w in caught if issubclass(w.category, CacheWarning)]) == 1
    assert job_outputs(store, flow)[1] == [1 << 20] * 2
    assert entry_names() == ["measure"]
    assert stale_tmp_files(area) == [], "the partial copy is removed"

    clean = run_large(tmp_path / "clean", False, *args)
    filler.unlink()  # space is freed
    assert run_large(tmp_path / "again", None, *args) == clean
    assert entry_names() == ["measure", "write_large"]
    assert counts()["write_large"] == 3


def test_a_full_store_file_system_records_nothing_and_damages_nothing(
    small_fs, counts, isolated_cache, tmp_path, monkeypatch
):
    """The embedded store's file cannot grow (ENOSPC): the job's output reaches the JobStore,
    its entry is not written, a warning says why, the entries already there are still served;
    once space is freed it records normally."""
    folder = small_fs("store", 1024)
    monkeypatch.setenv("JOBFLOW_CACHE_DIR", str(folder))
    monkeypatch.setenv("JOBFLOW_CACHE_OBJECTS_DIR", str(tmp_path / "objects"))
    store = JobStore(MemoryStore())
    run_locally(jobs.add(1, 2), store=store, log=False)
    filler = fill(folder)

    big = fault_jobs.large_output(300_000)
    with pytest.warns(CacheWarning, match="database or disk is full") as caught:
        run_locally(Flow([big, jobs.add(1, 2)]), store=store, log=False)
    assert len([w for w in caught if issubclass(w.category, CacheWarning)]) == 1
    assert len(store.get_output(big.uuid)) == 300_000
    assert counts() == {"add": 1, "large_output": 1}, "add(1, 2) was served while full"
    assert entry_names() == ["add"]

    filler.unlink()
    again = fault_jobs.large_output(300_000)
    run_locally(again, store=store, log=False)
    assert store.get_output(again.uuid) == store.get_output(big.uuid)
    assert entry_names() == ["add", "large_output"]
    assert counts()["large_output"] == 2


# --------------------------------------------------- 4. corrupted entries and tampered objects


def _tamper(path: Path, how: str) -> None:
    """Damage the file object at ``path`` (objects are read-only: made writable first)."""
    path.chmod(0o644)
    if how == "bytes changed":  # same size: only the content differs
        data = bytearray(path.read_bytes())
        data[0] ^= 0xFF
        with open(path, "r+b") as fh:
            fh.write(bytes(data))
    elif how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "directory":
        path.unlink()
        path.mkdir()
        (path / "x").write_text("not an object")
    elif how == "removed":
        path.unlink()
    else:
        raise ValueError(how)


TAMPER_KIND = {
    "bytes changed": ("file-corrupt", "xxh3 mismatch"),
    "truncated": ("file-corrupt", "size"),
    "directory": ("file-corrupt", "not a regular file"),
    "removed": ("file-missing", "missing"),
}


def run_writer(root: Path, tag: str = "t") -> tuple[str, dict[str, bytes]]:
    """Run ``jobs.write_files(tag)`` in a folder of its own under ``root``; return the
    folder's files."""
    store = JobStore(MemoryStore())
    job = jobs.write_files(tag)
    run_locally(job, store=store, log=False, create_folders=True, root_dir=root)
    folder = Path(store.get_output(job.uuid)["dir_name"])
    return store.get_output(job.uuid)["tag"], run_dir_files(folder)


@pytest.mark.parametrize("files_mode", ["link", "copy"])
@pytest.mark.parametrize("how", sorted(TAMPER_KIND))
def test_a_tampered_file_object_is_never_served(
    how, files_mode, counts, isolated_cache, tmp_path, monkeypatch
):
    """An object changed, truncated, replaced by a folder or removed: ``verify`` names the
    problem, the job runs (its files are the right ones) with a warning, and the entry it
    records is sound again and served."""
    monkeypatch.setenv("JOBFLOW_CACHE_FILES", files_mode)
    clean = run_writer(tmp_path / "first")
    with CacheStore.from_settings() as cache:
        (doc,) = cache.find()
        record = next(r for r in doc["files"] if r["path"] == "result.txt")
    area = ObjectArea(isolated_cache / "objects")
    _tamper(area.path_of(record["xxh3"]), how)

    kind, message = TAMPER_KIND[how]
    report = verify_cli()
    assert [(p["kind"], p["digest"], p["path"]) for p in report["problems"]] == [
        (kind, doc["digest"], "result.txt")
    ]
    assert message in report["problems"][0]["message"]

    with pytest.warns(CacheWarning, match="running the job|not used"):
        assert run_writer(tmp_path / "second") == clean
    assert counts()["write_files"] == 2, "the job ran"
    assert entry_names() == ["write_files"]
    assert verify_cli()["problems"] == []
    assert run_writer(tmp_path / "third") == clean
    assert counts()["write_files"] == 2, "the sound entry is served"


def test_a_cached_file_rewritten_in_place_changes_nothing_cached(counts, isolated_cache, tmp_path):
    """A job's files are recorded as copies (issue 11: never by hard link); a later job
    rewrites one of them in the recording job's folder, in place (as root too, whom read-only
    bits would not stop): neither the object nor what later flows are served changes."""
    store = JobStore(MemoryStore())
    first = fault_jobs.write_text("OUTCAR", "first\n")
    run_locally(first, store=store, log=False, create_folders=True, root_dir=tmp_path / "a")
    (folder,) = (tmp_path / "a").glob("job_*")
    area = ObjectArea(isolated_cache / "objects")
    with CacheStore.from_settings() as cache:
        (record,) = next(cache.entries()).files
    assert (folder / "OUTCAR").stat().st_ino != area.path_of(record.xxh3).stat().st_ino
    assert (folder / "OUTCAR").stat().st_nlink == 1
    fix = fault_jobs.write_text(str(folder / "OUTCAR"), "second")  # into the upstream folder
    run_locally(fix, store=store, log=False, create_folders=True, root_dir=tmp_path / "b")
    assert (folder / "OUTCAR").read_text() == "second"
    assert area.path_of(record.xxh3).read_text() == "first\n", "the object is untouched"

    again = fault_jobs.write_text("OUTCAR", "first\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_locally(again, store=store, log=False, create_folders=True, root_dir=tmp_path / "c")
    (placed,) = (tmp_path / "c").glob("job_*/OUTCAR")
    assert placed.read_text() == "first\n"
    assert counts()["write_text"] == 2, "served"
    assert [w for w in caught if issubclass(w.category, CacheWarning)] == []
    assert verify_cli()["problems"] == []


def test_a_later_job_may_rewrite_a_recorded_file_in_a_shared_folder(read_only, tmp_path):
    """Without root's privileges, two jobs of a shared folder that write the same file (two
    VASP jobs writing INCAR) succeed as they do without the cache."""
    shared = tmp_path / "shared"
    shared.mkdir()
    result = run_child(".", "rewrite_flow", ["OUTCAR"], unprivileged=True, cwd=shared)
    assert (shared / "OUTCAR").read_text() == "second"
    assert result["outputs"][1] == {"name": "OUTCAR", "length": 6}


def test_an_object_touched_but_unchanged_is_served_and_sealed_again(
    counts, isolated_cache, tmp_path
):
    """A new mtime alone (``touch``, a copy with ``-p`` lost) breaks an object's seal: the next
    use re-hashes it, serves it since it still matches, and seals it again."""
    clean = run_writer(tmp_path / "first")
    area = ObjectArea(isolated_cache / "objects")
    with CacheStore.from_settings() as cache:
        records = next(cache.entries()).files
    path = area.path_of(records[0].xxh3)
    sealed = path.stat().st_mtime_ns
    os.utime(path)  # now
    assert path.stat().st_mtime_ns != sealed
    assert run_writer(tmp_path / "second") == clean
    assert counts()["write_files"] == 1, "served"
    assert path.stat().st_mtime_ns % 10**9 == sealed % 10**9, "sealed again"


def _reseal(doc: dict, **fields) -> dict:
    """``doc`` with ``fields`` changed and its checksum made to match (as a writer that knows
    the format would leave it)."""
    entry = CacheEntry.from_document(dict(doc))
    return entry.model_copy(update=fields).sealed_document()


def _without(field: str) -> Callable[[dict], dict]:
    return lambda doc: {k: v for k, v in doc.items() if k != field}


CORRUPTIONS: dict[str, tuple[Callable[[dict], dict], str, str]] = {
    # name: (how the stored document is changed, lookup reason / warning, verify kind)
    "altered output": (lambda d: {**d, "output": "5"}, "checksum", "checksum"),
    "output not JSON": (lambda d: _reseal(d, output='{"a": '), "cannot be served", "output"),
    "output missing": (_without("output"), "checksum", "checksum"),
    "checksum missing": (_without("checksum"), "checksum", "checksum"),
    "scheme missing": (_without("scheme"), "decode", "undecodable"),
    "files not a list": (lambda d: {**d, "files": "x"}, "decode", "undecodable"),
    "packed garbage": (lambda d: {**d, "packed": {"output": "zlib:!"}}, "decode", "undecodable"),
    "other scheme": (lambda d: _reseal(d, scheme="jfc0"), "scheme", "scheme"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_entry_is_never_served_on_any_backend(
    corruption, backend, counts, tmp_path, run_dir
):
    """The stored document of an entry is damaged: the job runs (output right), one warning
    says why, ``verify`` reports the kind, and the sound entry recorded instead is served."""
    change, reason, kind = CORRUPTIONS[corruption]
    store = JobStore(MemoryStore())
    run_locally(jobs.add(2, 2), store=store, cache=backend.cache(), log=False)
    with backend.opened() as cache:
        (doc,) = cache.find()
        doc.pop("_id", None)
        cache.backend.remove([doc["digest"]])
        cache.backend.write([change(doc)])
        found = cache.lookup(doc["digest"])
        if kind != "output":
            assert found.outcome is Outcome.INVALID
            assert reason in found.reason
        problems = verify(cache)
    assert [(p.kind.value, p.digest) for p in problems] == [(kind, doc["digest"])]

    again = jobs.add(2, 2)
    with pytest.warns(CacheWarning) as caught:
        run_locally(again, store=store, cache=backend.cache(), log=False)
    (warning,) = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert reason in warning
    assert store.get_output(again.uuid) == 4
    assert counts() == {"add": 2}
    with backend.opened() as cache:
        assert verify(cache) == []
        assert cache.lookup(doc["digest"]).outcome is Outcome.HIT
    served = jobs.add(2, 2)
    run_locally(served, store=store, cache=backend.cache(), log=False)
    assert store.get_output(served.uuid) == 4
    assert counts() == {"add": 2}


def _overwrite_row(backend: Backend, digest: str, text: str) -> None:
    """Replace the stored document of ``digest`` (the JSON of its small fields, which every
    read parses) by the JSON ``text``, as a hand or bit rot would."""
    if backend.name == "sqlite":
        conn = sqlite3.connect(Path(os.environ["JOBFLOW_CACHE_DIR"]) / "cache.sqlite")
        with conn:
            sql = "UPDATE jfc_entries SET doc = ? WHERE digest = ?"
            assert conn.execute(sql, (text, digest)).rowcount == 1
        conn.close()
    else:
        psycopg = pytest.importorskip("psycopg")
        assert backend.spec is not None
        table = '"' + (backend.spec["table"] + "__e").replace('"', '""') + '"'
        with psycopg.connect(backend.spec["uri"], autocommit=True) as conn:
            sql = f"UPDATE {table} SET doc = %s WHERE digest = %s"
            assert conn.execute(sql, (text, digest)).rowcount == 1


@pytest.mark.parametrize("text", ["[1, 2]", '"a string"', "null"])
def test_a_stored_row_that_is_not_a_document_is_never_served(
    text, backend, counts, tmp_path, run_dir
):
    """The row of an entry holds JSON that is not an object (a damaged table): the job runs,
    with a warning (the row exists, so it is an invalid entry, a JSON null included), and a
    sound entry replaces it."""
    if backend.name == "memory":
        pytest.skip("a MongoDB collection holds only documents")
    store = JobStore(MemoryStore())
    run_locally(jobs.add(2, 2), store=store, cache=backend.cache(), log=False)
    with backend.opened() as cache:
        (digest,) = [doc["digest"] for doc in cache.find()]
    _overwrite_row(backend, digest, text)
    with backend.opened() as cache:
        found = cache.lookup(digest)
    assert found.outcome is Outcome.INVALID

    again = jobs.add(2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_locally(again, store=store, cache=backend.cache(), log=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert len(messages) == 1
    assert all("does not decode: not an entry document" in m for m in messages)
    assert store.get_output(again.uuid) == 4
    assert counts() == {"add": 2}
    with backend.opened() as cache:
        assert cache.lookup(digest).outcome is Outcome.HIT


def _damaged_cache(backend: Backend) -> None:
    """Two entries (one with files); the row of the other then holds a JSON array."""
    store = JobStore(MemoryStore())
    run_locally(jobs.write_files("v"), store=store, cache=backend.cache(), log=False)
    run_locally(jobs.add(2, 2), store=store, cache=backend.cache(), log=False)
    with backend.opened() as cache:
        digest = next(cache.find({"name": "add"}))["digest"]
    _overwrite_row(backend, digest, "[1, 2]")


def test_verify_reports_a_stored_row_that_is_not_a_document(backend, run_dir):
    if backend.name == "memory":
        pytest.skip("a MongoDB collection holds only documents")
    _damaged_cache(backend)
    with backend.opened() as cache:
        digest = next(d["digest"] for d in cache.find() if d.get("name") != "write_files")
        # the store names the damaged row by its key, so verify --fix can remove it
        assert [(p.kind.value, p.digest) for p in verify(cache)] == [("undecodable", digest)]
        assert [p.fixed for p in verify(cache, fix=True)] == ["removed"]
        assert verify(cache) == []


def test_gc_goes_past_a_stored_row_that_is_not_a_document(backend, run_dir):
    if backend.name == "memory":
        pytest.skip("a MongoDB collection holds only documents")
    _damaged_cache(backend)
    with backend.opened() as cache:
        assert collect_garbage(cache).objects == 0, "write_files' objects are still referenced"


# ------------------------------------------------- 3. the store unreachable, or lost mid-run

SABOTAGED = [2, 20, 20, 21, 210]  # outputs of fault_jobs.sabotaged_flow
CHAIN = [2, 20, 21, 210]  # outputs of fault_jobs.chain_flow (the same jobs without the fault)


def run_caught(flow: Flow, **kwargs) -> tuple[list, list[str]]:
    """Run ``flow`` in this process; return its outputs and the CacheWarnings it gave."""
    store = JobStore(MemoryStore())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_locally(flow, store=store, log=False, ensure_success=True, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    return job_outputs(store, flow), messages


def test_an_unreachable_mongodb_runs_the_flow_uncached_with_one_warning(
    counts, tmp_path, monkeypatch
):
    """A MongoStore (configured like jobflow's JOB_STORE) on a port nothing listens on."""
    with socket.socket() as sock:  # a free port, closed again: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = {
        "type": "MongoStore",
        "database": "jfc",
        "collection_name": "entries",
        "host": "127.0.0.1",
        "port": port,
        "mongoclient_kwargs": {"serverSelectionTimeoutMS": 300},
    }
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(spec))
    outputs, messages = run_caught(fault_jobs.chain_flow())
    assert outputs == CHAIN
    assert counts() == {"add_one": 2, "times_ten": 2}
    (message,) = messages
    assert "is unavailable" in message
    assert f"127.0.0.1:{port}" in message
    assert "jobs run uncached for the rest of this run" in message


@pytest.mark.parametrize("how", ["delete", "garbage", "replace"])
def test_the_sqlite_store_damaged_mid_run_never_fails_the_flow(
    how, counts, isolated_cache, tmp_path
):
    """Between two jobs of a run the store's file is deleted, overwritten with garbage, or
    replaced by a garbage file: the flow's outputs are those of a run without the cache, and a
    fresh process afterwards gets them too (its cache usable again, or skipped with one
    warning)."""
    path = isolated_cache / "cache.sqlite"
    run_locally(jobs.add(0, 0), log=False)  # the store exists, with one entry
    outputs, messages = run_caught(fault_jobs.sabotaged_flow(how, str(path)))
    assert outputs == SABOTAGED
    assert counts()["add_one"] == 2
    if how == "garbage":  # one warning, and today one more per entry queued before
        assert "is unavailable" in messages[0]
        assert all("were not cached" in m for m in messages[1:])
    else:  # noticed at the next write: one warning, never entries silently lost
        (message,) = messages
        if how == "delete":  # made again: the rest of the run is recorded there
            assert "was deleted while in use; reopened it" in message
        else:  # a garbage file now: the rest of the run runs uncached
            assert "was replaced by another file while in use" in message
            assert "file is not a database" in message

    result = run_child(tmp_path / "next", "chain_flow", [])
    assert result["outputs"] == CHAIN
    if how == "garbage":
        (message,) = result["warnings"]
        assert "is unavailable" in message
        assert "file is not a database" in message
    else:
        assert len(result["warnings"]) <= 1


@pytest.mark.slow
def test_the_store_folder_made_read_only_mid_run_never_fails_the_flow(
    read_only, counts, isolated_cache, tmp_path
):
    """Between two jobs the store's folder and files become read-only for the worker: that run
    and the next one give the outputs of a run without the cache, with at most one warning
    each, and the entries already there are intact."""
    path = isolated_cache / "cache.sqlite"
    run_child(tmp_path / "first", "chain_flow", [], unprivileged=True)
    assert counts()["add_one"] == 2
    try:
        result = run_child(
            tmp_path / "broken", "sabotaged_flow", ["read-only", str(path)], unprivileged=True
        )
        assert result["outputs"] == SABOTAGED
        assert len(result["warnings"]) <= 1, result["warnings"]
        after = run_child(tmp_path / "after", "chain_flow", [], unprivileged=True)
        assert after["outputs"] == CHAIN
    finally:
        isolated_cache.chmod(0o755)
        for file in isolated_cache.glob("cache.sqlite*"):
            file.chmod(0o644)
    if counts()["add_one"] == 2:  # the entries recorded before were served ...
        assert after["warnings"] == []
    else:  # ... or the store was skipped, saying so (today: SQLite opens it for writing)
        (message,) = after["warnings"]
        assert "is unavailable" in message
        assert "readonly database" in message
    before = counts()["add_one"]
    again = run_child(tmp_path / "again", "chain_flow", [])  # writable again: all served
    assert (again["outputs"], again["warnings"]) == (CHAIN, [])
    assert counts()["add_one"] == before


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("how", ["terminate", "stop"])
def test_postgresql_dropping_mid_run_never_fails_the_flow(
    how, request, counts, tmp_path, monkeypatch
):
    """Between two jobs every connection to the server is terminated, or the server stops:
    the flow's outputs are those of a run without the cache, with at most one warning, and
    the entries recorded before are intact and served once the server is back."""
    try:
        cluster = request.getfixturevalue(
            "pg_cluster"
        )  # tests/support/pgserver.py: a private server
    except pytest.FixtureLookupError:
        pytest.skip("the PostgreSQL fixtures of tests/support/pgserver.py are not loaded")
    spec = {"type": "PostgresBackend", "uri": cluster.uri, "table": "faults", "connect_timeout": 2}
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(spec))
    run_locally(jobs.add(0, 0), log=False)  # an entry from before
    if how == "terminate":
        target = cluster.uri
    else:
        pg_ctl = str(cluster.bindir / "pg_ctl")
        target = json.dumps([*cluster.prefix, pg_ctl, "-D", str(cluster.data), "-m", "immediate",
                             "stop"])  # fmt: skip
    outputs, messages = run_caught(fault_jobs.sabotaged_flow("command" if how == "stop" else how,
                                                             target))  # fmt: skip
    assert outputs == SABOTAGED
    if how == "stop":  # one warning, and today one more per entry queued before (see below)
        assert "is unavailable" in messages[0]
        assert all("were not cached" in m for m in messages[1:])
        cluster.running = False  # stopped behind its back
        cluster.start()
    else:  # the pool reconnects
        assert messages == []

    result = run_child(tmp_path / "next", "chain_flow", [])
    assert (result["outputs"], result["warnings"]) == (CHAIN, [])
    with CacheStore.from_settings() as cache:
        names = assert_entries_whole(cache)
    assert names.count("add") == 1, "the entry from before is intact"
    served = jobs.add(0, 0)
    run_locally(served, log=False)
    assert counts()["add"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("server", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_store_that_breaks_mid_run_gives_one_warning(
    server, request, isolated_cache, counts, monkeypatch
):
    if server == "sqlite":
        how, target = "garbage", str(isolated_cache / "cache.sqlite")
    else:
        try:
            cluster = request.getfixturevalue("pg_cluster")
        except pytest.FixtureLookupError:
            pytest.skip("the PostgreSQL fixtures of tests/support/pgserver.py are not loaded")
        spec = {"type": "PostgresBackend", "uri": cluster.uri, "table": "f", "connect_timeout": 2}
        monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(spec))
        stop = [str(cluster.bindir / "pg_ctl"), "-D", str(cluster.data), "-m", "immediate", "stop"]
        how, target = "command", json.dumps([*cluster.prefix, *stop])
    run_locally(jobs.add(0, 0), log=False)
    outputs, messages = run_caught(fault_jobs.sabotaged_flow(how, target))
    assert outputs == SABOTAGED
    assert len(messages) == 1, messages


# -------------------------------------------------------- 5. trust: decoding a shared cache

SOURCE = ROOT / "src" / "jobflow_cache"


def test_the_package_never_unpickles_or_evaluates():
    """No pickle, dill, marshal, shelve, eval, exec or unsafe YAML anywhere in the package."""
    dangerous = re.compile(
        r"\b(import\s+(c?pickle|dill|cloudpickle|jsonpickle|marshal|shelve)|"
        r"(pickle|dill|marshal)\.loads?\(|(?<![.\w])eval\(|(?<![.\w])exec\(|yaml\.load\(|"
        r"yaml\.unsafe_load|__import__\()"
    )
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(SOURCE.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if dangerous.search(line)
    ]
    assert found == []


class _Marker:
    """Unpickling this creates the file named by its argument."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _serve_crafted(
    backend: Backend, output: str | None = None, response: str | None = None
) -> tuple[object, list[str]]:
    """Record ``side_effect_free(1)``, replace its entry's output (or response, making it a
    dynamic entry) by crafted JSON text sealed with a valid checksum (anyone who can write
    to a shared store can seal), then run a fresh instance; return its output and warnings."""
    store = JobStore(MemoryStore())
    run_locally(fault_jobs.side_effect_free(1), store=store, cache=backend.cache(), log=False)
    with backend.opened() as cache:
        (doc,) = cache.find()
        entry = CacheEntry.from_document(dict(doc))
        if output is not None:
            entry.output = output
        if response is not None:
            entry.response, entry.dynamic = response, True
        cache.backend.write([entry.sealed_document()])
    again = fault_jobs.side_effect_free(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        responses = run_locally(again, store=store, cache=backend.cache(), log=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]
    assert store.get_output(again.uuid) is not None, "the job's output is stored"
    return responses[again.uuid][1].output, messages


def _payloads(marker: Path) -> dict[str, dict]:
    pickled = base64.b64encode(pickle.dumps(_Marker(str(marker)))).decode()
    return {
        "pickled blob": {"data": pickled, "@module": "pickle", "note": "inert text"},
        "os.system": {"@module": "os", "@class": "system", "command": f"touch {marker}"},
        "eval": {"@module": "builtins", "@class": "eval", "source": f"open({str(marker)!r})"},
        "pickle.loads": {"@module": "pickle", "@class": "loads", "data": pickled},
        "Popen": {"@module": "subprocess", "@class": "Popen", "args": ["touch", str(marker)]},
        "missing module": {"@module": "no_such_module_jfc", "@class": "X", "a": 1},
        "os.system as a value": {"@module": "os", "@callable": "system", "@bound": None},
        "a module that acts on import": {"@module": "jfc_acts_on_import", "@class": "X"},
    }


#: What serving each crafted output gives: "data" (served as the inert JSON it is) or
#: "invalid" (never served: the job runs, output 1, one warning).
PAYLOAD_OUTCOME = {
    "pickled blob": "data",
    "os.system": "invalid",
    "eval": "invalid",
    "pickle.loads": "invalid",
    "Popen": "data",
    "missing module": "data",
    "os.system as a value": "invalid",
    "a module that acts on import": "invalid",
}


@pytest.mark.parametrize("payload", sorted(PAYLOAD_OUTCOME))
def test_a_crafted_cached_output_runs_no_code(payload, backend, counts, tmp_path, monkeypatch):
    """A document in a shared store names a pickled blob, a function, a class with side
    effects or a module that acts when imported: nothing runs; the value is served as the
    plain data it is, or not at all."""
    marker = tmp_path / "pwned"
    module_dir = tmp_path / "on-sys-path"  # like a user's script folder, on sys.path
    module_dir.mkdir()
    (module_dir / "jfc_acts_on_import.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass X:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))
    monkeypatch.delitem(sys.modules, "jfc_acts_on_import", raising=False)  # and at teardown
    value = _payloads(marker)[payload]
    served, messages = _serve_crafted(backend, output=json.dumps(value))
    assert not marker.exists(), "code ran"
    assert "jfc_acts_on_import" not in sys.modules
    if PAYLOAD_OUTCOME[payload] == "data":
        assert served == value
        assert messages == []
        assert counts()["side_effect_free"] == 1
    else:
        assert served == 1
        (message,) = messages
        assert "cannot be served" in message
        assert counts()["side_effect_free"] == 2


def test_a_crafted_dynamic_entry_runs_no_foreign_function(backend, counts, tmp_path):
    """A dynamic entry whose new job calls ``subprocess.call`` (jobflow would run it) is
    never served: the job runs and its own response is used."""
    marker = tmp_path / "pwned"
    evil = Job(subprocess.call, function_args=(["touch", str(marker)],))
    response = codec.dumps({"addition": Flow([evil])})
    served, messages = _serve_crafted(backend, response=response)
    assert not marker.exists(), "code ran"
    assert served == 1
    (message,) = messages
    assert "cannot be served" in message
    assert counts()["side_effect_free"] == 2


def test_a_crafted_output_schema_is_never_applied(backend, counts, tmp_path):
    """A dynamic entry whose new job is a real job function, with ``subprocess.Popen`` as its
    output schema (jobflow calls ``schema(**output)``): never served."""
    marker = tmp_path / "pwned"
    evil = fault_jobs.side_effect_free({"args": ["touch", str(marker)]})
    evil.output_schema = subprocess.Popen
    response = codec.dumps({"addition": Flow([evil])})
    served, messages = _serve_crafted(backend, response=response)
    assert not marker.exists(), "code ran"
    assert served == 1
    (message,) = messages
    assert "cannot be served" in message


def test_trusted_modules_lift_the_checks(backend, counts, tmp_path, monkeypatch):
    """With ``JOBFLOW_CACHE_TRUSTED_MODULES`` naming it, a module that is neither imported nor
    installed may be imported to decode a cached value (its code runs: it is trusted)."""
    marker = tmp_path / "imported"
    module_dir = tmp_path / "on-sys-path"
    module_dir.mkdir()
    name = f"jfc_trusted_{uuid.uuid4().hex[:8]}"  # monty caches the classes it resolved
    (module_dir / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\n"
        "class Point:\n"
        "    def __init__(self, x):\n        self.x = x\n\n"
        "    @classmethod\n"
        "    def from_dict(cls, d):\n        return cls(d['x'])\n\n"
        "    def as_dict(self):\n"
        "        return {'@module': __name__, '@class': 'Point', 'x': self.x}\n"
    )
    monkeypatch.syspath_prepend(str(module_dir))
    value = json.dumps({"@module": name, "@class": "Point", "x": 3})
    _, messages = _serve_crafted(backend, output=value)
    assert not marker.exists(), "not trusted: not imported"
    assert len(messages) == 1
    assert "neither imported nor installed" in messages[0]

    monkeypatch.setenv("JOBFLOW_CACHE_TRUSTED_MODULES", f'["{name}"]')
    served, messages = _serve_crafted(backend, output=value)
    assert marker.exists()
    assert type(served).__name__ == "Point"
    assert served.x == 3
    assert messages == []
    assert counts()["side_effect_free"] == 2, "ran once, when refused"
    monkeypatch.delitem(sys.modules, name)
