"""A real jobflow-remote project for the tests: its ``Runner`` driven in the test process (as
jobflow-remote's own tests do, ``Runner.run_all_jobs``) with a local ``shell`` worker, so every
job runs in a real ``jf execution run`` process started by the worker's ``submit.sh``.

No MongoDB server can exist here, and jobflow-remote's queue store must be a ``MongoStore``
subclass (it uses the collection's database for its flows, locks and auxiliary collections).
The stand-in is maggma's ``MemoryStore`` (mongomock): every ``Project.get_queue_store()`` and
``Project.get_jobstore()`` call returns ONE shared instance, whose ``close()`` keeps the
documents (a fresh ``MemoryStore`` would be empty, and its ``close`` drops the client). Tests
using it are marked ``substitute``.

The JobStore never has to be reached from the worker: jobflow-remote gives each job a
file-based JobStore in its run folder (``remote_job_data.json``), and the runner downloads it
and inserts its documents into the project's JobStore itself. So the runner (this process) is
the only user of the in-memory JobStore, as it is of a MongoDB one in production.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from maggma.stores import MemoryStore

from tests.support import paths

if TYPE_CHECKING:
    import pytest
    from jobflow import Flow, JobStore

ROOT = Path(__file__).resolve().parents[2]
WORKER = "local_shell"
#: jobflow-remote's files in a run folder missing from the cache's default FILES_EXCLUDE:
#: ``additional_store_<name>.json`` (the worker's file JobStore of each additional store, like
#: ``remote_job_data.json``) and ``stdout``/``stderr`` (qtoolkit's shell scheduler:
#: ``nohup bash submit.sh > stdout 2> stderr``).
WORKER_FILES = ("additional_store_*.json", "stdout", "stderr")


class SharedMemoryStore(MemoryStore):
    """A ``MemoryStore`` whose ``close`` keeps its documents (jobflow-remote closes its stores
    after every use and connects them again)."""

    def close(self) -> None:
        """Keep the in-memory collection: the next ``connect`` finds it as it was."""


@dataclass
class JrProject:
    """One jobflow-remote project: the shared stores and the worker's folder."""

    name: str
    folder: Path
    work_dir: Path
    queue_store: SharedMemoryStore
    job_store: JobStore

    def runner(self) -> Any:
        """A real jobflow-remote ``Runner`` of this project."""
        from jobflow_remote.jobs.runner import Runner

        return Runner(project_name=self.name)

    def controller(self) -> Any:
        from jobflow_remote.jobs.jobcontroller import JobController

        return JobController.from_project_name(self.name)

    def submit(self, flow: Flow | Any, **kwargs: Any) -> list[int]:
        """``submit_flow`` to the local worker."""
        from jobflow_remote import submit_flow

        kwargs.setdefault("worker", WORKER)
        return submit_flow(flow, project=self.name, **kwargs)

    def run_all(self, max_seconds: int = 600) -> float:
        """Run every job in the queue database with a real Runner; return the seconds taken."""
        t0 = time.perf_counter()
        self.runner().run_all_jobs(max_seconds=max_seconds)
        return time.perf_counter() - t0

    def states(self) -> dict[str, str]:
        """Every job of the queue database: ``uuid -> state``."""
        return {
            doc["uuid"]: doc["state"]
            for doc in self.controller().jobs.find({}, {"uuid": 1, "state": 1})
        }

    def run_dirs(self) -> list[Path]:
        """The run folders the runner created (one per job uploaded to the worker)."""
        return sorted(p.parent for p in self.work_dir.rglob("jfremote_in.json"))


def make_project(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    name: str | None = None,
    runner_delay: float = 1,
    exclude_worker_files: bool = True,
) -> JrProject:
    """Write a jobflow-remote project with a local shell worker under ``root`` and point
    jobflow-remote at it; the queue store and the JobStore are shared in-memory stores."""
    import jobflow_remote
    from jobflow import JobStore
    from jobflow_remote.config import Project
    from jobflow_remote.config.settings import JobflowRemoteSettings

    name = name or f"jfc_{secrets.token_hex(4)}"
    if exclude_worker_files:
        # Files the jobflow-remote worker writes in every run folder that the cache's default
        # FILES_EXCLUDE does not name: the file JobStores of additional stores and the shell
        # scheduler's nohup output. They count in the content of a folder named in a later
        # job's inputs (atomate2's prev_dir) on the worker, but a job served ahead has a folder
        # without them, so a later job would miss (see WORKER_FILES).
        from jobflow_cache.settings import DEFAULT_FILES_EXCLUDE

        excludes = [*DEFAULT_FILES_EXCLUDE, *WORKER_FILES]
        monkeypatch.setenv("JOBFLOW_CACHE_FILES_EXCLUDE", json.dumps(excludes))
    folder = root / "jfr_projects"
    folder.mkdir(parents=True, exist_ok=True)
    work_dir = root / "jfr_work"
    work_dir.mkdir(exist_ok=True)
    monkeypatch.setenv("JFREMOTE_PROJECTS_FOLDER", str(folder))
    monkeypatch.setenv("JFREMOTE_PROJECT", name)
    monkeypatch.setenv("JFREMOTE_CONFIG_FILE", str(root / "jfr_config.yaml"))
    # the worker's jobs import tests.* by path, and run jf from this environment
    bin_dir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", bin_dir + os.pathsep + os.environ.get("PATH", ""))
    pythonpath = os.environ.get("PYTHONPATH")
    monkeypatch.setenv(
        "PYTHONPATH", paths.pythonpath() + (os.pathsep + pythonpath if pythonpath else "")
    )
    # placeholders: never connected, the shared stores below are returned instead
    mongo = {"type": "MongoStore", "database": "jfc_never_used", "host": "127.0.0.1", "port": 1}
    project = Project(
        name=name,
        base_dir=str(folder / name),
        jobstore={"docs_store": {**mongo, "collection_name": "outputs"}},
        queue={"store": {**mongo, "collection_name": "jobs"}},
        workers={
            WORKER: {
                "type": "local",
                "scheduler_type": "shell",
                "work_dir": str(work_dir),
                "resources": {},
            }
        },
        runner={
            "delay_checkout": runner_delay,
            "delay_check_run_status": runner_delay,
            "delay_advance_status": runner_delay,
            "max_step_attempts": 3,
            "delta_retry": (1, 1, 1),
        },
    )
    (folder / f"{name}.json").write_text(project.model_dump_json(indent=2))
    monkeypatch.setattr(jobflow_remote, "SETTINGS", JobflowRemoteSettings())

    queue_store = SharedMemoryStore(collection_name="jobs")
    job_store = JobStore(
        SharedMemoryStore(collection_name="outputs"),
        additional_stores={"data": SharedMemoryStore(collection_name="data")},
    )
    queue_store.connect()
    job_store.connect()

    def get_queue_store(self: Project) -> SharedMemoryStore:
        return queue_store

    def get_jobstore(self: Project, name: str | None = None) -> JobStore:
        return job_store

    monkeypatch.setattr(Project, "get_queue_store", get_queue_store)
    monkeypatch.setattr(Project, "get_jobstore", get_jobstore)
    jr = JrProject(name, folder, work_dir, queue_store, job_store)
    assert jr.controller().reset(max_limit=0)
    return jr
