"""``@cached_job`` flows under remote managers: FireWorks rockets and a jobflow-remote style
worker, every job in a fresh process and a run folder of its own (tests/support/remote_worker.py);
workers that cannot reach the cache; run folders recorded on another host.

The jobs (tests/support/remote_jobs.py) count their real executions across processes (``counts``):
``relax`` writes files into its folder and returns the folder, ``read_outcar`` takes that folder
as its input (atomate2's ``prev_dir``), ``static`` and ``summarize`` take plain values.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from jobflow import Flow, Job, JobStore
from jobflow.managers.fireworks import flow_to_workflow
from maggma.stores import JSONStore

from jobflow_cache import CacheStore
from jobflow_cache.entry import CacheEntry
from jobflow_cache.files import ObjectArea
from tests.support import remote_worker as rw
from tests.support.remote_jobs import read_outcar, relax, relax_flow

pytestmark = pytest.mark.slow

ALL_ONCE = Counter(relax=1, static=1, read_outcar=1, summarize=1)


def expected(volume: float = 42.0) -> dict[str, Any]:
    """Outputs of ``relax_flow(volume)`` that do not name a folder."""
    relaxed = round(volume * 0.98, 4)
    energy = round((relaxed - 40.0) ** 2, 4)
    return {
        "relax": relaxed,
        "static": energy,
        "read_outcar": f"volume={volume * 0.98}",
        "summarize": {"volume": relaxed, "energy": energy},
    }


def plain_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """``outputs`` by job name with relax's folder left out (it differs in every run)."""
    return {name: out["volume"] if name == "relax" else out for name, out in outputs.items()}


def entry_of(name: str) -> CacheEntry:
    """The one cache entry of the job called ``name`` (read in this process)."""
    with CacheStore.from_settings() as store:
        entries = list(store.entries({"name": name}))
    assert len(entries) == 1, [e.source_dir for e in entries]
    return entries[0]


def assert_restored(
    new_folder: Path, old_folder: Path | None, objects: Path, *, linked: bool = False
) -> None:
    """relax's files are in ``new_folder`` with their content, as copies of their own (issue
    11: also with ``linked``, workers set to JOBFLOW_CACHE_EXCLUSIVE_DIRS=1, files are never
    hard links to the object area, and the recording folder's files were never linked into
    it), so a later job may rewrite them without touching the cache or another folder."""
    del linked
    area = ObjectArea(objects)
    files = {record.path: record for record in entry_of("relax").files}
    assert sorted(files) == ["OUTCAR", "sub/WAVECAR"]
    assert (new_folder / "sub" / "WAVECAR").read_bytes() == b"\x00\x01wave" * 64
    for relpath, record in files.items():
        placed = new_folder / relpath
        stored = area.path_of(record.xxh3)
        assert placed.read_bytes() == stored.read_bytes(), relpath
        assert not placed.samefile(stored), relpath
        assert placed.stat().st_nlink == 1
        assert placed.stat().st_mode & stat.S_IWUSR
        if old_folder is not None:
            assert not (old_folder / relpath).samefile(stored)
            assert (old_folder / relpath).stat().st_nlink == 1


# -- where the cache is: what a worker needs to reach it ------------------------------------------
@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_cache(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """The cache every worker uses, set in the environment workers inherit; returns its object
    area, which every worker must be able to read and write.

    ``sqlite``: the embedded store under ``JOBFLOW_CACHE_DIR`` (set for this test by the
    ``isolated_cache`` fixture): a file system shared by all workers.
    ``postgres``: a PostgreSQL server named by ``JOBFLOW_CACHE_STORE`` (a JSON store spec), and
    ``JOBFLOW_CACHE_OBJECTS_DIR`` for the files.
    """
    if request.param == "sqlite":
        return Path(os.environ["JOBFLOW_CACHE_DIR"]) / "objects"
    try:
        spec = request.getfixturevalue("pg_spec")  # tests/support/pgserver.py, loaded by conftest
    except pytest.FixtureLookupError:
        pytest.skip("the PostgreSQL fixtures of tests/support/pgserver.py are not loaded")
    objects = tmp_path / "shared-objects"
    monkeypatch.setenv("JOBFLOW_CACHE_STORE", json.dumps(spec))
    monkeypatch.setenv("JOBFLOW_CACHE_OBJECTS_DIR", str(objects))
    return objects


# -- FireWorks ------------------------------------------------------------------------------------
class FireWorksSite:
    """A FireWorks LaunchPad (mongomock persisted in a file: no MongoDB server can run here) and
    a file-based JobStore (maggma ``JSONStore``); rockets run in subprocesses."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = rw.fireworks_env(root / "launchpad.json", env)
        self.store_file = root / "outputs.json"
        rw.run_worker_process(rw.command(["fw-reset"]), self.env)

    def launch(self, flow: Flow, name: str, *, rapidfire: bool = False) -> list[str]:
        """Add ``flow`` as a workflow and run it; return the rockets' stderr.

        One process per firework, each in a launcher folder of its own, or (``rapidfire``)
        all fireworks in one process, in launcher folders FireWorks makes.
        """
        store = JobStore(JSONStore(str(self.store_file), read_only=False))
        workflow_file = self.root / f"{name}.json"
        flow_to_workflow(flow, store=store).to_file(str(workflow_file))
        rw.run_worker_process(rw.command(["fw-add", str(workflow_file)]), self.env)
        folder = self.root / name
        folder.mkdir()
        if rapidfire:
            _, err, _ = rw.run_worker_process(rw.command(["fw-rapidfire", str(folder)]), self.env)
            return [err]
        stderr: list[str] = []
        for i in range(100):
            launcher = folder / f"launcher_{i}"
            launcher.mkdir()
            out, err, _ = rw.run_worker_process(rw.command(["fw-launch", str(launcher)]), self.env)
            if not json.loads(out.splitlines()[-1])["launched"]:
                launcher.rmdir()
                return stderr
            stderr.append(err)
        raise AssertionError("more rockets than fireworks")

    def results(self, flow: Flow) -> tuple[dict[str, Any], dict[str, str]]:
        """Outputs and cache outcomes of ``flow``'s jobs, by name, from the JobStore."""
        store = JobStore(JSONStore(str(self.store_file)))
        store.connect()
        docs: dict[str, dict[str, Any]] = {}
        for job in flow:
            doc = store.query_one({"uuid": job.uuid})
            assert doc is not None, f"firework {job.name} completed"
            docs[job.name] = doc
        outputs = {name: doc["output"] for name, doc in docs.items()}
        outcomes = {name: doc["metadata"]["jobflow_cache"]["outcome"] for name, doc in docs.items()}
        return outputs, outcomes

    def states(self) -> dict[str, str]:
        out, _, _ = rw.run_worker_process(rw.command(["fw-states"]), self.env)
        states: dict[str, str] = json.loads(out.splitlines()[-1])
        return states


@pytest.mark.substitute  # the LaunchPad is mongomock persisted in a file (no MongoDB here)
def test_fireworks_second_flow_instance_hits(shared_cache, counts, tmp_path):
    """A rebuilt flow (new uuids) launched again: its jobs are served by the cache in other
    processes, with relax's files copied into the new launcher folder; read_outcar, whose input
    is relax's folder, hits too: that folder is a known job's and holds what it held in the
    first flow (inputs naming folders count by content)."""
    site = FireWorksSite(tmp_path / "fw")
    first = relax_flow()
    site.launch(first, "first")  # one rocket per process
    outputs1, outcomes1 = site.results(first)
    assert counts() == ALL_ONCE
    assert set(outcomes1.values()) == {"miss"}
    assert plain_outputs(outputs1) == expected()
    folder1 = Path(outputs1["relax"]["dir_name"])
    assert folder1.parent == tmp_path / "fw" / "first"

    second = relax_flow()
    site.launch(second, "second", rapidfire=True)  # rlaunch rapidfire: one process
    outputs2, outcomes2 = site.results(second)
    assert set(site.states().values()) == {"COMPLETED"}
    assert counts() == ALL_ONCE
    assert outcomes2 == {"relax": "hit", "static": "hit", "read_outcar": "hit", "summarize": "hit"}
    assert plain_outputs(outputs2) == plain_outputs(outputs1)
    folder2 = Path(outputs2["relax"]["dir_name"])
    assert folder2.parent == tmp_path / "fw" / "second"
    assert folder2.name.startswith("launcher_")
    assert outputs2["relax"]["uri"] == f"{socket.gethostname()}:{folder2}"
    assert_restored(folder2, folder1, shared_cache)


@pytest.mark.substitute  # the LaunchPad is mongomock persisted in a file (no MongoDB here)
def test_fireworks_prev_dir_hits_with_exclusive_dirs(counts, tmp_path, monkeypatch):
    """With JOBFLOW_CACHE_EXCLUSIVE_DIRS=1 every rocket records its launcher folder in the
    store, so read_outcar(prev_dir) of a rebuilt flow hits too: nothing runs twice."""
    monkeypatch.setenv("JOBFLOW_CACHE_EXCLUSIVE_DIRS", "1")
    site = FireWorksSite(tmp_path / "fw")
    first, second = relax_flow(), relax_flow()
    site.launch(first, "first")
    site.launch(second, "second")
    outputs1, _ = site.results(first)
    outputs2, outcomes2 = site.results(second)
    assert counts() == ALL_ONCE
    assert set(outcomes2.values()) == {"hit"}
    assert plain_outputs(outputs2) == plain_outputs(outputs1) == expected()
    folder1, folder2 = (Path(out["relax"]["dir_name"]) for out in (outputs1, outputs2))
    objects = Path(os.environ["JOBFLOW_CACHE_DIR"]) / "objects"
    assert_restored(folder2, folder1, objects, linked=True)


# -- a jobflow-remote style worker ----------------------------------------------------------------
def outputs_of(runs: dict[str, rw.WorkerRun], store: JobStore) -> dict[str, Any]:
    return {name: store.get_output(run.uuid) for name, run in runs.items()}


def outcomes_of(runs: dict[str, rw.WorkerRun]) -> dict[str, str]:
    return {name: run.outcome for name, run in runs.items()}


def test_remote_worker_second_flow_instance_hits(shared_cache, counts, tmp_path, job_store):
    """Each job serialized to JSON and run by a fresh worker process in its own folder with a
    file-based JobStore: a rebuilt flow is served whole, the job whose input is an upstream
    job's folder included: that folder is hashed by its content, which the served upstream job
    restored (issue 11; this job used to run again without EXCLUSIVE_DIRS)."""
    first = relax_flow()
    runs1 = rw.run_remote(first, tmp_path / "runs1", job_store)
    assert counts() == ALL_ONCE
    assert set(outcomes_of(runs1).values()) == {"miss"}
    outputs1 = outputs_of(runs1, job_store)
    assert plain_outputs(outputs1) == expected()

    second = relax_flow()
    runs2 = rw.run_remote(second, tmp_path / "runs2", job_store)
    assert counts() == ALL_ONCE
    assert outcomes_of(runs2) == {
        "relax": "hit",
        "static": "hit",
        "read_outcar": "hit",
        "summarize": "hit",
    }
    outputs2 = outputs_of(runs2, job_store)
    assert plain_outputs(outputs2) == plain_outputs(outputs1)
    assert outputs2["relax"]["dir_name"] == str(runs2["relax"].folder)
    assert_restored(runs2["relax"].folder, runs1["relax"].folder, shared_cache)
    assert all(run.cache_warnings == 0 for run in [*runs1.values(), *runs2.values()])
    # the worker's own files are never cached
    assert {r.path for r in entry_of("relax").files}.isdisjoint({rw.IN_FILENAME, rw.STORE_FILENAME})


def test_remote_worker_in_jobflow_remote_folders(counts, tmp_path, job_store):
    """jobflow-remote names a run folder by the job's uuid (``aa/bb/cc/<uuid>_<index>``): a
    served relax must name its new folder, where its files are, and read_outcar must read them."""
    layout = rw.jobflow_remote_folder
    runs1 = rw.run_remote(relax_flow(), tmp_path / "work", job_store, folder_name=layout)
    runs2 = rw.run_remote(relax_flow(), tmp_path / "work", job_store, folder_name=layout)
    assert outcomes_of(runs2)["relax"] == "hit"
    folder = runs2["relax"].folder
    assert job_store.get_output(runs2["relax"].uuid)["dir_name"] == str(folder)
    assert (folder / "OUTCAR").is_file()
    assert plain_outputs(outputs_of(runs2, job_store)) == plain_outputs(
        outputs_of(runs1, job_store)
    )
    assert counts() == ALL_ONCE  # read_outcar: relax's folder holds what it held in run 1


def test_remote_worker_prev_dir_hits_with_exclusive_dirs(
    shared_cache, counts, tmp_path, job_store, monkeypatch
):
    """With JOBFLOW_CACHE_EXCLUSIVE_DIRS=1 the worker of read_outcar learns from the store that
    its prev_dir is the folder of a relax job it knows: the rebuilt flow runs nothing. A relax
    with another input makes read_outcar run again (never a false hit)."""
    monkeypatch.setenv("JOBFLOW_CACHE_EXCLUSIVE_DIRS", "1")
    runs1 = rw.run_remote(relax_flow(), tmp_path / "runs1", job_store)
    runs2 = rw.run_remote(relax_flow(), tmp_path / "runs2", job_store)
    assert counts() == ALL_ONCE
    assert set(outcomes_of(runs2).values()) == {"hit"}
    assert (
        outputs_of(runs2, job_store)["read_outcar"] == outputs_of(runs1, job_store)["read_outcar"]
    )
    assert_restored(runs2["relax"].folder, runs1["relax"].folder, shared_cache, linked=True)

    runs3 = rw.run_remote(relax_flow(43.0), tmp_path / "runs3", job_store)
    assert outcomes_of(runs3) == {name: "miss" for name in ALL_ONCE}
    assert plain_outputs(outputs_of(runs3, job_store)) == expected(43.0)
    assert counts() == ALL_ONCE + ALL_ONCE


def test_remote_worker_reused_folder_is_never_a_false_hit(counts, tmp_path, job_store, monkeypatch):
    """A folder path used again by another relax (after the first was deleted): read_outcar of
    that path must read the new OUTCAR. With exclusive folders the path stands for the job that
    last ran there; it is never taken for the earlier job's folder."""
    monkeypatch.setenv("JOBFLOW_CACHE_EXCLUSIVE_DIRS", "1")

    def two_jobs(volume: float) -> Flow:
        upstream = relax(volume)
        return Flow([upstream, read_outcar(upstream.output["dir_name"])])

    def by_name(job: Job) -> str:
        return str(job.name)

    runs1 = rw.run_remote(two_jobs(42.0), tmp_path / "runs", job_store, folder_name=by_name)
    shutil.rmtree(tmp_path / "runs")
    runs2 = rw.run_remote(two_jobs(43.0), tmp_path / "runs", job_store, folder_name=by_name)
    assert runs2["relax"].folder == runs1["relax"].folder
    assert outcomes_of(runs2) == {"relax": "miss", "read_outcar": "miss"}
    assert job_store.get_output(runs2["read_outcar"].uuid) == f"volume={43.0 * 0.98}"
    assert counts() == Counter(relax=2, read_outcar=2)


# -- a worker that cannot reach the cache ---------------------------------------------------------
def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_mongodb(tmp_path: Path) -> dict[str, str]:
    spec = {
        "type": "MongoStore",
        "database": "jfc",
        "collection_name": "cache",
        "host": "127.0.0.1",
        "port": free_port(),
        # pymongo waits 30 s for a server by default, in every worker
        "mongoclient_kwargs": {"serverSelectionTimeoutMS": 300},
    }
    return {"JOBFLOW_CACHE_STORE": json.dumps(spec)}


def dead_postgres(tmp_path: Path) -> dict[str, str]:
    uri = f"postgresql://jfc@127.0.0.1:{free_port()}/postgres"
    spec = {"type": "PostgresBackend", "uri": uri, "connect_timeout": 2}
    return {"JOBFLOW_CACHE_STORE": json.dumps(spec)}


def cache_dir_under_a_file(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    return {"JOBFLOW_CACHE_DIR": str(blocker / "cache")}


UNREACHABLE = {
    "mongodb-dead-port": dead_mongodb,
    "postgres-dead-port": dead_postgres,
    "dir-under-a-file": cache_dir_under_a_file,
}


@pytest.mark.parametrize("where", sorted(UNREACHABLE))
def test_worker_without_cache_runs_uncached(where, counts, tmp_path, job_store):
    """Every job runs uncached with exactly one CacheWarning in its worker; outputs are those of
    a run with the cache."""
    env = UNREACHABLE[where](tmp_path)
    runs = rw.run_remote(relax_flow(), tmp_path / "runs", job_store, env=env)
    assert counts() == ALL_ONCE
    assert set(outcomes_of(runs).values()) == {"error"}
    assert [run.cache_warnings for run in runs.values()] == [1, 1, 1, 1]
    assert all("jobs run uncached" in run.stderr for run in runs.values())
    assert plain_outputs(outputs_of(runs, job_store)) == expected()
    assert (runs["relax"].folder / "OUTCAR").stat().st_nlink == 1, "no object area was used"


def test_worker_with_read_only_cache_dir_is_served_and_writes_nothing(counts, tmp_path, job_store):
    """A worker that sees a populated embedded cache on a read-only mount is served what the
    cache holds (the fixed-schema store opens read-only), and what it cannot serve runs
    uncached with one warning each: here read_outcar, whose input names the relaxation's run
    folder, which this worker cannot record as the served job's (an alias is a write). The
    outputs are those of the warm run."""
    if not rw.mount_namespaces():
        pytest.skip("needs mount namespaces (unshare --mount, as root) for a read-only mount")
    warm = rw.run_remote(relax_flow(), tmp_path / "warm", job_store)
    assert counts() == ALL_ONCE
    cache_dir = Path(os.environ["JOBFLOW_CACHE_DIR"])
    before = (cache_dir / "cache.sqlite").read_bytes()
    runs = rw.run_remote(relax_flow(), tmp_path / "runs", job_store, read_only=[cache_dir])
    assert counts() == ALL_ONCE + Counter(read_outcar=1)
    assert outcomes_of(runs) == {
        "relax": "hit",
        "static": "hit",
        "read_outcar": "miss",
        "summarize": "hit",
    }
    assert [run.cache_warnings for run in runs.values()] == [0, 0, 1, 0]
    assert plain_outputs(outputs_of(runs, job_store)) == plain_outputs(outputs_of(warm, job_store))
    assert (cache_dir / "cache.sqlite").read_bytes() == before


@pytest.mark.substitute  # the LaunchPad is mongomock persisted in a file (no MongoDB here)
def test_fireworks_rapidfire_without_cache_warns_once(counts, tmp_path):
    """rlaunch rapidfire runs the four jobs in one process: one CacheWarning in all."""
    site = FireWorksSite(tmp_path / "fw", env=dead_mongodb(tmp_path))
    flow = relax_flow()
    [stderr] = site.launch(flow, "run", rapidfire=True)
    outputs, outcomes = site.results(flow)
    assert counts() == ALL_ONCE
    assert set(outcomes.values()) == {"error"}
    assert stderr.count("CacheWarning: ") == 1
    assert plain_outputs(outputs) == expected()


UNUSABLE_SPECS = {
    "unknown-store-type": {"type": "NoSuchStore", "uri": "postgresql://jfc@127.0.0.1:1/x"},
    "missing-spec-file": "/nonexistent/jobflow-cache-store.yaml",
}


@pytest.mark.parametrize("spec", sorted(UNUSABLE_SPECS))
def test_worker_with_unusable_store_spec_runs_uncached(spec, counts, tmp_path, job_store):
    """A spec the worker cannot build (a store class it cannot import: a missing extra, a typo;
    a spec file that is not there) never fails the job: it runs uncached with one warning."""
    value = UNUSABLE_SPECS[spec]
    env = {"JOBFLOW_CACHE_STORE": value if isinstance(value, str) else json.dumps(value)}
    runs = rw.run_remote(Flow([relax(42.0)]), tmp_path / "runs", job_store, env=env)
    assert counts() == Counter(relax=1)
    assert runs["relax"].outcome == "error"
    assert runs["relax"].cache_warnings == 1
    assert "JOBFLOW_CACHE_STORE" in runs["relax"].stderr
    assert job_store.get_output(runs["relax"].uuid)["volume"] == 41.16


# -- run folders on another host ------------------------------------------------------------------
# Each worker below runs under a host name of its own: in a UTS namespace (unshare --uts, as
# root), where socket.gethostname() really returns that name. Without namespaces the worker
# patches socket.gethostname (a stand-in; see tests/support/remote_worker.py).
def two_hosts_flow(volume: float = 42.0) -> Flow:
    upstream = relax(volume)
    return Flow([upstream, read_outcar(upstream.output["dir_name"])])


@pytest.mark.parametrize(
    ("source_dir_exists", "exclusive_dirs"),
    [(True, False), (False, True)],
    ids=["source-kept", "source-gone-exclusive-dirs"],
)
def test_other_host_restores_files_from_shared_object_area(
    source_dir_exists, exclusive_dirs, shared_cache, counts, tmp_path, job_store, monkeypatch
):
    """An entry records the host and folder it came from. Another host sharing the object area
    is served: the files come from the object area (the recording folder may not exist there:
    copies, or with JOBFLOW_CACHE_EXCLUSIVE_DIRS=1 hard links), and the paths in the output,
    ``host:/path`` included, name the new folder and host."""
    if exclusive_dirs:
        monkeypatch.setenv("JOBFLOW_CACHE_EXCLUSIVE_DIRS", "1")
    runs_a = rw.run_remote(two_hosts_flow(), tmp_path / "node-a", job_store, hostname="node-a")
    assert runs_a["relax"].host == "node-a"
    entry = entry_of("relax")
    assert entry.host.rpartition("@")[2] == "node-a"
    assert entry.source_dir == str(runs_a["relax"].folder)
    if not source_dir_exists:
        shutil.rmtree(tmp_path / "node-a")

    runs_b = rw.run_remote(two_hosts_flow(), tmp_path / "node-b", job_store, hostname="node-b")
    assert runs_b["relax"].host == "node-b"
    # read_outcar's prev_dir (node-b's folder) is known to the store, and holds what node-a's
    # held: the folder counts by content
    assert outcomes_of(runs_b) == {"relax": "hit", "read_outcar": "hit"}
    assert counts() == Counter(relax=1, read_outcar=1)
    folder = runs_b["relax"].folder
    output = job_store.get_output(runs_b["relax"].uuid)
    assert output == {"volume": 41.16, "dir_name": str(folder), "uri": f"node-b:{folder}"}
    assert job_store.get_output(runs_b["read_outcar"].uuid) == f"volume={42.0 * 0.98}"
    old = runs_a["relax"].folder if source_dir_exists else None
    assert_restored(folder, old, shared_cache, linked=exclusive_dirs)


def test_other_host_without_the_object_area_reruns(shared_cache, counts, tmp_path, job_store):
    """A host whose object area does not hold the entry's files (another OBJECTS_DIR) runs the
    job again, with one warning, and never leaves a folder without its files."""
    env_a = {"JOBFLOW_CACHE_OBJECTS_DIR": str(tmp_path / "objects-a")}
    env_b = {"JOBFLOW_CACHE_OBJECTS_DIR": str(tmp_path / "objects-b")}
    runs_a = rw.run_remote(
        two_hosts_flow(), tmp_path / "node-a", job_store, env=env_a, hostname="node-a"
    )
    assert outcomes_of(runs_a) == {"relax": "miss", "read_outcar": "miss"}

    runs_b = rw.run_remote(
        two_hosts_flow(), tmp_path / "node-b", job_store, env=env_b, hostname="node-b"
    )
    # relax reruns and writes the same files: read_outcar, which reads them, is served
    assert outcomes_of(runs_b) == {"relax": "invalid", "read_outcar": "hit"}
    assert counts() == Counter(relax=2, read_outcar=1)
    assert runs_b["relax"].cache_warnings == 1
    assert "missing" in runs_b["relax"].stderr
    folder = runs_b["relax"].folder
    assert (folder / "OUTCAR").read_text() == f"volume={42.0 * 0.98}\n"
    assert (folder / "sub" / "WAVECAR").read_bytes() == b"\x00\x01wave" * 64
    assert job_store.get_output(runs_b["read_outcar"].uuid) == f"volume={42.0 * 0.98}"
    entry = entry_of("relax")  # host B's run replaced the entry it could not use
    assert entry.host.rpartition("@")[2] == "node-b"
    assert ObjectArea(tmp_path / "objects-b").has_all(entry.files)

    # host A again: the same content is in its own object area, so it is served
    runs_a2 = rw.run_remote(
        two_hosts_flow(), tmp_path / "node-a2", job_store, env=env_a, hostname="node-a"
    )
    assert runs_a2["relax"].outcome == "hit"
    assert counts() == Counter(relax=2, read_outcar=1)
    assert_restored(runs_a2["relax"].folder, None, tmp_path / "objects-a")


def test_worker_with_files_none_never_gets_a_folder_without_its_files(counts, tmp_path, job_store):
    """A worker set to JOBFLOW_CACHE_FILES=none, served an entry recorded with files elsewhere,
    must either put the files in place or run the job: relax's output names its folder, and
    read_outcar reads OUTCAR there."""
    rw.run_remote(two_hosts_flow(), tmp_path / "linked", job_store)
    runs = rw.run_remote(
        two_hosts_flow(), tmp_path / "none", job_store, env={"JOBFLOW_CACHE_FILES": "none"}
    )
    assert (runs["relax"].folder / "OUTCAR").read_text() == f"volume={42.0 * 0.98}\n"
    assert job_store.get_output(runs["read_outcar"].uuid) == f"volume={42.0 * 0.98}"


def test_remote_worker_scheduler_files_are_not_cached(counts, tmp_path, job_store):
    """Under a batch scheduler a jobflow-remote run folder also holds ``submit.sh`` and the
    job's ``queue.out``/``queue.err``, written while the job runs. They are the manager's, not
    the job's: never recorded, never replaced on a hit, so each run keeps its own log."""
    runs1 = rw.run_remote(relax_flow(), tmp_path / "runs1", job_store, queue_files=True)
    assert {r.path for r in entry_of("relax").files} == {"OUTCAR", "sub/WAVECAR"}
    runs2 = rw.run_remote(relax_flow(), tmp_path / "runs2", job_store, queue_files=True)
    assert outcomes_of(runs2)["relax"] == "hit"
    assert counts() == ALL_ONCE  # queue.out is left out of read_outcar's input folder too
    for runs in (runs1, runs2):
        log = runs["relax"].folder / rw.QUEUE_OUT
        assert log.stat().st_nlink == 1
        assert log.stat().st_mode & stat.S_IWUSR
        assert f"relax ({runs['relax'].uuid})" in log.read_text()  # this run's own log
    assert "relaxing" in (runs1["relax"].folder / rw.QUEUE_OUT).read_text()
    assert "relaxing" not in (runs2["relax"].folder / rw.QUEUE_OUT).read_text()
