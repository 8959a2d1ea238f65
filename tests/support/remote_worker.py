"""Remote-style execution for the tests: every job runs in a fresh Python process, in a run
folder of its own, as under jobflow-remote and FireWorks.

Two managers are reproduced with real processes:

* a jobflow-remote style runner and worker. The runner (the test process, like jobflow-remote's
  runner daemon) resolves a job's references from its JobStore, writes the job and a file-based
  JobStore (a maggma ``JSONStore``) to ``jfremote_in.json`` in a new run folder, and starts a
  worker; the worker (``python -m tests.support.remote_worker run <folder>``, like jobflow-remote's
  ``run_remote_job``) loads them, calls ``Job.run`` there and writes ``jfremote_out.json``; the
  runner then copies the worker's output documents into its JobStore.
* FireWorks: ``flow_to_workflow`` in the test process; the LaunchPad and the rockets in
  subprocesses (``fw-add``, ``fw-launch``: one firework in its own launcher folder, or
  ``fw-rapidfire``: FireWorks' own launcher folders, all rockets in one process).

No MongoDB server can run here, so the LaunchPad runs on mongomock persisted in a JSON file
(``MONGOMOCK_SERVERSTORE_FILE``, FireWorks' own ``fireworks[mongomock]`` option), shared by
processes that run one after the other. That variable is only ever set for the subprocesses:
in the test process it would make every maggma ``MemoryStore`` read and write that file.

A worker can be given another host name (``hostname=``): it then runs in a UTS namespace of its
own (``unshare --uts``, which needs root), where ``socket.gethostname()`` really returns that
name. Where namespaces are not available the worker patches ``socket.gethostname`` before
anything imports it (``JFC_TEST_HOSTNAME``): a stand-in, said so by :func:`uts_namespaces`.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from jobflow import Flow, Job, JobStore

ROOT = Path(__file__).resolve().parents[2]

IN_FILENAME = "jfremote_in.json"
OUT_FILENAME = "jfremote_out.json"
#: The worker's file-based JobStore (jobflow-remote writes its outputs to such a file too).
STORE_FILENAME = "remote_job_data.json"


@functools.cache
def uts_namespaces() -> bool:
    """True when a child process can get a host name of its own (``unshare --uts``)."""
    try:
        proc = subprocess.run(
            ["unshare", "--uts", "sh", "-c", "hostname jfc-probe && hostname"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0 and proc.stdout.strip() == "jfc-probe"


@functools.cache
def mount_namespaces() -> bool:
    """True when a child process can see a folder read-only (``unshare --mount``)."""
    try:
        proc = subprocess.run(
            [*_read_only_prefix([Path("/tmp")]), "sh", "-c", "! touch /tmp/.jfc-ro-probe"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _read_only_prefix(folders: Sequence[Path]) -> list[str]:
    mounts = " && ".join(
        f"mount --bind {f} {f} && mount -o remount,ro,bind {f} {f}"
        for f in (shlex.quote(str(folder)) for folder in folders)
    )
    return ["unshare", "--mount", "sh", "-c", f'{mounts} && exec "$@"', "sh"]


def command(
    args: Sequence[str], hostname: str | None = None, read_only: Sequence[Path] = ()
) -> list[str]:
    """``python -m tests.support.remote_worker <args>``, on host ``hostname`` when given, seeing the
    folders ``read_only`` on a read-only mount (needs :func:`mount_namespaces`)."""
    cmd = [sys.executable, "-m", "tests.support.remote_worker", *args]
    if hostname is not None and uts_namespaces():
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *cmd]
    if read_only:
        cmd = [*_read_only_prefix(read_only), *cmd]
    return cmd


def worker_env(env: Mapping[str, str] | None = None, hostname: str | None = None) -> dict[str, str]:
    """The environment of a worker: this one, the tests importable, plus ``env``."""
    from tests.support.paths import pythonpath  # (imports the package: not in the worker)

    full = {**os.environ, "PYTHONPATH": pythonpath(), **(env or {})}
    full.pop("JFC_TEST_HOSTNAME", None)
    if hostname is not None and not uts_namespaces():
        full["JFC_TEST_HOSTNAME"] = hostname  # stand-in: see the module docstring
    return full


@dataclass
class WorkerRun:
    """What one worker process did."""

    name: str
    uuid: str
    outcome: str  #: the cache's outcome of the job ("hit", "miss", "error", ...)
    folder: Path  #: the job's run folder
    host: str  #: the worker's host name
    seconds: float  #: ``Job.run`` inside the worker
    wall: float  #: the whole worker process (start-up and imports included)
    stderr: str

    @property
    def cache_warnings(self) -> int:
        """Number of CacheWarnings the worker issued (each one shown: filter "always")."""
        return self.stderr.count("CacheWarning: ")


def run_worker_process(
    cmd: Sequence[str], env: Mapping[str, str], cwd: Path | None = None
) -> tuple[str, str, float]:
    """Run a worker; return stdout, stderr and its wall time; raise when it fails."""
    started = time.perf_counter()
    proc = subprocess.run(
        list(cmd), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise AssertionError(
            f"worker {cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout, proc.stderr, wall


# -- a jobflow-remote style runner ----------------------------------------------------------------
def jobflow_remote_folder(job: Job) -> str:
    """jobflow-remote's run folder of a job: ``aa/bb/cc/<uuid>_<index>``, from the uuid's hex."""
    hexed = job.uuid.replace("-", "")
    return os.path.join(hexed[0:2], hexed[2:4], hexed[4:6], f"{job.uuid}_{job.index}")


def run_remote(
    flow: Flow,
    base_dir: Path,
    store: JobStore,
    env: Mapping[str, str] | None = None,
    hostname: str | None = None,
    read_only: Sequence[Path] = (),
    folder_name: Callable[[Job], str] | None = None,
    queue_files: bool = False,
) -> dict[str, WorkerRun]:
    """Run ``flow`` job by job, each in a fresh worker process in a folder of its own under
    ``base_dir``; outputs end up in ``store``. Returns the worker runs by job name.

    A folder is named ``<job name>-<random hex>`` (as docs/howto/remote.md's runner does), or
    by ``folder_name`` (e.g. :func:`jobflow_remote_folder`). With ``queue_files`` the worker
    runs as a batch scheduler runs jobflow-remote's jobs: ``bash submit.sh`` in the folder,
    its output going to ``queue.out`` and ``queue.err`` there while the job runs.
    """
    from jobflow import JobStore
    from maggma.stores import JSONStore
    from monty.serialization import dumpfn, loadfn

    full_env = worker_env(env, hostname)
    runs: dict[str, WorkerRun] = {}
    for job, _parents in flow.iterflow():  # dependency order
        job.resolve_args(store=store)  # the runner resolves references, as jobflow-remote's
        name = folder_name(job) if folder_name else f"{job.name}-{secrets.token_hex(4)}"
        folder = base_dir / name
        folder.mkdir(parents=True)
        worker_store = JobStore(JSONStore(str(folder / STORE_FILENAME), read_only=False))
        dumpfn({"job": job, "store": worker_store}, folder / IN_FILENAME)
        cmd = command(["run", str(folder)], hostname, read_only)
        if queue_files:
            err, wall = run_in_queue(cmd, full_env, folder)
        else:
            _, err, wall = run_worker_process(cmd, full_env)
        report = loadfn(folder / OUT_FILENAME)["report"]
        outputs = JSONStore(str(folder / STORE_FILENAME), key="uuid")
        outputs.connect()
        docs = [{k: v for k, v in doc.items() if k != "_id"} for doc in outputs.query({})]
        store.docs_store.update(docs, key=["uuid", "index"])
        runs[job.name] = WorkerRun(
            name=job.name,
            uuid=job.uuid,
            outcome=report["outcome"],
            folder=folder,
            host=report["host"],
            seconds=report["seconds"],
            wall=wall,
            stderr=err,
        )
    return runs


#: What a batch scheduler leaves in a jobflow-remote run folder (its default names).
SUBMIT_SCRIPT, QUEUE_OUT, QUEUE_ERR = "submit.sh", "queue.out", "queue.err"


def run_in_queue(cmd: Sequence[str], env: Mapping[str, str], folder: Path) -> tuple[str, float]:
    """Run ``cmd`` from ``submit.sh`` in ``folder``, output to ``queue.out``/``queue.err``
    there; return what ``queue.err`` holds afterwards and the wall time."""
    script = folder / SUBMIT_SCRIPT
    script.write_text("#!/bin/bash\nexec " + shlex.join(cmd) + "\n")
    started = time.perf_counter()
    with open(folder / QUEUE_OUT, "w") as out, open(folder / QUEUE_ERR, "w") as err:
        proc = subprocess.run(
            ["bash", SUBMIT_SCRIPT],
            cwd=folder,
            env=dict(env),
            stdout=out,
            stderr=err,
            timeout=600,
            check=False,
        )
    wall = time.perf_counter() - started
    logs = (folder / QUEUE_ERR).read_text()
    if proc.returncode != 0:
        raise AssertionError(f"queued worker in {folder} failed ({proc.returncode}):\n{logs}")
    return logs, wall


def work(folder: Path) -> dict[str, Any]:
    """The worker: run the job of ``folder/jfremote_in.json`` there (jobflow-remote's
    ``run_remote_job``), write ``jfremote_out.json``; return a report."""
    from jobflow import initialize_logger
    from monty.serialization import dumpfn, loadfn

    os.chdir(folder)
    data = loadfn(IN_FILENAME)
    job, store = data["job"], data["store"]
    store.connect()
    initialize_logger()
    started = time.perf_counter()
    response = job.run(store=store)
    seconds = time.perf_counter() - started
    response.output = None  # already in the store, as jobflow-remote does
    record = job.metadata.get("jobflow_cache", {})
    report = {
        "name": job.name,
        "outcome": record.get("outcome"),
        "host": socket.gethostname(),
        "seconds": seconds,
    }
    dumpfn({"response": response, "error": None, "report": report}, OUT_FILENAME)
    return report


# -- FireWorks ------------------------------------------------------------------------------------
def fireworks_env(launchpad_file: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of FireWorks processes sharing the mongomock LaunchPad in ``launchpad_file``."""
    if not launchpad_file.exists():
        launchpad_file.write_text("{}")
    return worker_env({"MONGOMOCK_SERVERSTORE_FILE": str(launchpad_file), **(env or {})})


def fw_reset() -> dict[str, Any]:
    """Initialise an empty LaunchPad (``lpad reset``)."""
    from fireworks import LaunchPad

    LaunchPad().reset("", require_password=False)
    return {"reset": True}


def fw_add(workflow_file: Path) -> dict[str, Any]:
    """Add the workflow serialized in ``workflow_file`` to the LaunchPad."""
    from fireworks import LaunchPad, Workflow

    launchpad = LaunchPad()
    ids = launchpad.add_wf(Workflow.from_file(str(workflow_file)))
    return {"fw_ids": sorted(ids.values())}


def fw_launch(folder: Path) -> dict[str, Any]:
    """Run one READY firework in ``folder`` (a launcher folder of its own); report whether
    there was one."""
    from fireworks import FWorker, LaunchPad
    from fireworks.core.rocket_launcher import launch_rocket

    os.chdir(folder)
    launched = launch_rocket(LaunchPad(), FWorker(), strm_lvl="ERROR")
    return {"launched": bool(launched), "host": socket.gethostname()}


def fw_rapidfire(folder: Path) -> dict[str, Any]:
    """Run every READY firework in one process, each in a launcher folder FireWorks makes."""
    from fireworks import FWorker, LaunchPad
    from fireworks.core.rocket_launcher import rapidfire

    rapidfire(LaunchPad(), FWorker(), m_dir=str(folder), strm_lvl="ERROR")
    return {"launchers": sorted(p.name for p in folder.iterdir())}


def fw_states() -> dict[str, Any]:
    """State of every firework, by name."""
    from fireworks import LaunchPad

    launchpad = LaunchPad()
    return {
        fw["name"]: fw["state"]
        for fw in launchpad.fireworks.find({}, {"name": 1, "state": 1, "_id": 0})
    }


def main(argv: Sequence[str]) -> None:
    """Commands ``run <folder>``, ``fw-reset``, ``fw-add <file>``, ``fw-launch <folder>``,
    ``fw-rapidfire <folder>``, ``fw-states``; prints a JSON report as the last line."""
    # every CacheWarning is shown (not once per code location), so tests can count them
    warnings.simplefilter("always")
    commands = {
        "run": lambda: work(Path(argv[1])),
        "fw-reset": fw_reset,
        "fw-add": lambda: fw_add(Path(argv[1])),
        "fw-launch": lambda: fw_launch(Path(argv[1])),
        "fw-rapidfire": lambda: fw_rapidfire(Path(argv[1])),
        "fw-states": fw_states,
    }
    report = commands[argv[0]]()
    print(json.dumps(report))


if __name__ == "__main__":
    stand_in = os.environ.get("JFC_TEST_HOSTNAME", "")
    if stand_in:  # another host where UTS namespaces are not available (module docstring)
        socket.gethostname = lambda: stand_in
    main(sys.argv[1:])
