"""FireWorks processes of the manager tests: ``python -m tests.managers.fw_worker <command>``.

``add ROOT NAME KIND [--plain] [--ahead]``
    Build a fresh flow of ``KIND`` (:mod:`tests.managers.scenarios`; marked with ``cache_flow``
    unless ``--plain``), with ``--ahead`` serve what the cache can ahead of submission
    (``plan(flow, manager="fireworks").apply(job_store)``), convert what is left with
    jobflow's ``flow_to_workflow`` and add it to the LaunchPad (nothing is added when nothing
    is left). The run's JobStore is two maggma ``JSONStore`` files in ``ROOT``
    (``NAME-outputs.json``, ``NAME-data.json``).
``rlaunch ROOT MODE [ARGS...]``
    FireWorks' own ``rlaunch`` command line (``rlaunch rapidfire``, ``rlaunch singleshot``) in
    the working folder, in a process that counts job executions (``JFC_COUNTS_FILE``, see
    :func:`tests.managers.scenarios.count_executions`) and, when ``JFC_FW_FAIL`` names a job,
    makes that job's ASE relaxation raise (a helper the job calls: no digest changes).

Each prints one JSON report as its last stdout line. The LaunchPad is FireWorks' mongomock
persisted in the file named by ``MONGOMOCK_SERVERSTORE_FILE``, written when the process exits:
adding a workflow and launching rockets therefore happen in separate processes, one after the
other (``tests/support/remote_worker.py`` explains why that variable is never set in the test
process).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Sequence

    from jobflow import JobStore

#: A LaunchPad's file before its first ``reset`` (see :func:`_launchpad`).
EMPTY_LAUNCHPAD = "{}"


def job_store(root: Path, name: str) -> JobStore:
    """The JobStore of run ``name``: ``JSONStore`` files under ``root`` shared by processes."""
    from jobflow import JobStore
    from maggma.stores import JSONStore

    from tests.managers.scenarios import JobJSONStore

    return JobStore(
        JobJSONStore(str(root / f"{name}-outputs.json"), read_only=False),
        additional_stores={"data": JSONStore(str(root / f"{name}-data.json"), read_only=False)},
    )


def _launchpad() -> Any:
    from fireworks import LaunchPad

    launchpad = LaunchPad(strm_lvl="ERROR")
    file = Path(os.environ["MONGOMOCK_SERVERSTORE_FILE"])
    if file.read_text().strip() == EMPTY_LAUNCHPAD:  # a new LaunchPad: ``lpad reset``
        launchpad.reset("", require_password=False)
    return launchpad


def add(root: Path, name: str, kind: str, plain: bool, ahead: bool) -> dict[str, Any]:
    from jobflow import Flow
    from jobflow.managers.fireworks import flow_to_workflow

    from tests.managers import scenarios

    started = time.perf_counter()
    flow = scenarios.build(kind, cache=not plain)
    seconds = {"build": time.perf_counter() - started}
    store = job_store(root, name)
    built = [job.name for job in scenarios.jobs_of(flow)]
    remaining: Flow = flow
    served_dir = None
    if ahead:
        from jobflow_cache import plan

        started = time.perf_counter()
        store.connect()
        planned = plan(flow, manager="fireworks")  # the inputs as a rocket gets them
        remaining = planned.apply(store)
        seconds["plan_apply"] = time.perf_counter() - started
        served_dir = str(planned.served_dir())
    left = [job.name for job in scenarios.jobs_of(remaining)]
    started = time.perf_counter()
    fw_ids: list[int] = []
    launchpad = _launchpad()
    if left:
        workflow = flow_to_workflow(remaining, store=store, allow_external_references=ahead)
        fw_ids = sorted(launchpad.add_wf(workflow).values())
    seconds["add"] = time.perf_counter() - started
    return {
        "built": built,
        "remaining": left,
        "fw_ids": fw_ids,
        "served_dir": served_dir,
        "seconds": seconds,
    }


def fireworks_report(launchpad: Any) -> list[dict[str, Any]]:
    """Every firework: id, name, state, its job's uuid and index, its launch folders and its
    workflow (the workflow's first fw_id)."""
    workflow_of = {}
    for wf in launchpad.workflows.find({}, {"nodes": 1, "_id": 0}):
        for fw_id in wf["nodes"]:
            workflow_of[fw_id] = min(wf["nodes"])
    launch_dirs: dict[int, list[str]] = {}
    for launch in launchpad.launches.find({}, {"fw_id": 1, "launch_dir": 1, "_id": 0}):
        launch_dirs.setdefault(launch["fw_id"], []).append(launch["launch_dir"])
    report = []
    for fw in launchpad.fireworks.find({}, {"fw_id": 1, "name": 1, "state": 1, "spec": 1}):
        task = (fw["spec"].get("_tasks") or [{}])[0]
        job = task.get("job") or {}
        report.append(
            {
                "fw_id": fw["fw_id"],
                "name": fw["name"],
                "state": fw["state"],
                "uuid": job.get("uuid"),
                "index": job.get("index"),
                "launch_dirs": launch_dirs.get(fw["fw_id"], []),
                "workflow": workflow_of.get(fw["fw_id"]),
            }
        )
    return sorted(report, key=lambda fw: fw["fw_id"])


def rlaunch(args: Sequence[str]) -> dict[str, Any]:
    import fireworks.scripts.rlaunch_run as rlaunch_run

    from tests.managers import scenarios

    counts = os.environ.get("JFC_COUNTS_FILE")
    if counts:
        scenarios.count_executions(counts)
    fail = os.environ.get("JFC_FW_FAIL")
    if fail:
        scenarios.fail_job_named(fail)
    # The LaunchPad rlaunch makes is the one to report from: every LaunchPad object holds its
    # own copy of the persisted mongomock server and writes it back when the process exits (the
    # last one written wins), so this process must not make a second one.
    made: list[Any] = []
    launchpad_class = rlaunch_run.LaunchPad

    def recording_launchpad(*a: Any, **kw: Any) -> Any:
        made.append(launchpad_class(*a, **kw))
        return made[-1]

    rlaunch_run.LaunchPad = recording_launchpad
    here = os.path.realpath(os.getcwd())
    started = time.perf_counter()
    status = rlaunch_run.rlaunch(["--loglvl", "ERROR", *args])
    seconds = time.perf_counter() - started
    [launchpad] = made
    launched = sum(  # rockets of this process: launch folders in or under this folder
        os.path.realpath(launch["launch_dir"]) == here
        or os.path.realpath(launch["launch_dir"]).startswith(here + os.sep)
        for launch in launchpad.launches.find({}, {"launch_dir": 1, "_id": 0})
    )
    return {
        "status": status,
        "launched": launched,
        "seconds": seconds,
        "fireworks": fireworks_report(launchpad),
    }


def main(argv: Sequence[str]) -> None:
    # every CacheWarning is shown (not once per code location), so tests can count them
    warnings.simplefilter("always")
    command, *rest = argv
    if command == "add":
        root, name, kind, *flags = rest
        report = add(Path(root), name, kind, "--plain" in flags, "--ahead" in flags)
    elif command == "rlaunch":
        report = rlaunch(rest)
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
