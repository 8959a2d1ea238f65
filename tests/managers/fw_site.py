"""A FireWorks site for the manager tests and benchmarks: one LaunchPad (FireWorks' own
file-persisted mongomock: no MongoDB server can run here), a JobStore per run (maggma
``JSONStore`` files), rockets launched by ``rlaunch`` in subprocesses, each in a launcher folder
of its own (:mod:`tests.managers.fw_worker` runs the processes).

Every process inherits this process's environment (the cache settings, ``JFC_COUNTS_FILE``) plus
``MONGOMOCK_SERVERSTORE_FILE``, which is only ever set for the subprocesses.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.managers import scenarios
from tests.support import remote_worker as rw


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.managers.fw_worker", *args]


@dataclass
class Launch:
    """What the rockets of one ``rlaunch`` process did."""

    status: int  #: ``rlaunch``'s return value
    launched: int  #: rockets launched (0: no firework was ready)
    seconds: float  #: ``rlaunch`` inside the process
    wall: float  #: the whole process, start-up and imports included
    fireworks: list[dict[str, Any]]  #: every firework of the LaunchPad afterwards
    stderr: str

    @property
    def cache_warnings(self) -> int:
        return self.stderr.count("CacheWarning: ")


@dataclass
class Submission:
    """What one ``add`` process did: the flow it built and what it added to the LaunchPad."""

    name: str
    built: list[str]  #: names of the built flow's jobs
    remaining: list[str]  #: names of the jobs left to run after ``plan().apply()``
    fw_ids: list[int]  #: fireworks added (none when nothing was left)
    served_dir: str | None  #: where ``plan().apply()`` put served jobs' folders (``<uuid>``)
    seconds: dict[str, float]
    wall: float
    stderr: str
    launches: list[Launch] = field(default_factory=list)

    @property
    def cache_warnings(self) -> int:
        """CacheWarnings of every process of this run (each one shown)."""
        return self.stderr.count("CacheWarning: ") + sum(
            launch.cache_warnings for launch in self.launches
        )

    @property
    def wall_total(self) -> float:
        """Seconds of every process of this run: the submission and its rockets."""
        return self.wall + sum(launch.wall for launch in self.launches)


class FireWorksSite:
    """One LaunchPad under ``root``; each run ``name`` has its JobStore files in ``root`` and
    its launcher folders under ``root/name``."""

    def __init__(self, root: Path, env: dict[str, str] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.launchpad_file = root / "launchpad.json"
        self.env = rw.fireworks_env(self.launchpad_file, env)
        self.runs: dict[str, Submission] = {}

    def submit(
        self, name: str, kind: str, *, plain: bool = False, ahead: bool = False
    ) -> Submission:
        """Build a fresh ``kind`` flow in a new process and add it to the LaunchPad (``plain``:
        without ``cache_flow``; ``ahead``: ``plan(flow).apply(store)`` first)."""
        args = ["add", str(self.root), name, kind]
        args += ["--plain"] * plain + ["--ahead"] * ahead
        out, err, wall = rw.run_worker_process(_command(*args), self.env)
        report = json.loads(out.splitlines()[-1])
        run = Submission(name=name, wall=wall, stderr=err, **report)
        self.runs[name] = run
        (self.root / name).mkdir()
        return run

    def _rlaunch(self, name: str, cwd: Path, args: list[str], fail: str | None) -> Launch:
        env = {**self.env, "JFC_FW_FAIL": fail} if fail else self.env
        out, err, wall = rw.run_worker_process(_command("rlaunch", *args), env, cwd=cwd)
        launch = Launch(wall=wall, stderr=err, **json.loads(out.splitlines()[-1]))
        self.runs[name].launches.append(launch)
        return launch

    def rapidfire(self, name: str, fail: str | None = None) -> Launch:
        """``rlaunch rapidfire`` in ``root/name``: every ready firework in one process, each
        in a ``launcher_*`` folder FireWorks makes; ``fail`` names a job that raises."""
        return self._rlaunch(name, self.root / name, ["rapidfire"], fail)

    def singleshots(self, name: str, fail: str | None = None) -> list[Launch]:
        """``rlaunch singleshot``, one process per rocket, each in a launcher folder of its
        own under ``root/name``, until one finds no ready firework (returned last)."""
        launches = []
        for i in range(100):
            folder = self.root / name / f"launcher_{i}"
            folder.mkdir()
            launch = self._rlaunch(name, folder, ["singleshot"], fail)
            launches.append(launch)
            if not launch.launched:
                folder.rmdir()
                return launches
        raise AssertionError("more rockets than fireworks")

    # -- what a run left ------------------------------------------------------------------------
    def docs(self, name: str) -> list[dict[str, Any]]:
        """Every JobStore document of run ``name``, blobs in place."""
        return scenarios.load_docs(
            self.root / f"{name}-outputs.json", self.root / f"{name}-data.json"
        )

    def outputs(self, name: str, clock: bool = True) -> dict[str, str]:
        """Job name -> normalized output (:func:`tests.managers.scenarios.normalized_outputs`)."""
        docs = self.docs(name)
        folders = {
            folder: fw["name"] for fw in self._fireworks(name) for folder in fw["launch_dirs"]
        }
        served_dir = self.runs[name].served_dir
        if served_dir:  # plan().apply() ran each served job in <served_dir>/<uuid>
            by_index = sorted(docs, key=lambda d: -d["index"])  # a uuid's first job names it
            folders.update({str(Path(served_dir, d["uuid"])): d["name"] for d in by_index})
        return scenarios.normalized_outputs(
            docs, self.root / name, clock=clock, names=self.job_names(name), folders=folders
        )

    def outcomes(self, name: str) -> dict[str, str | None]:
        """Job name -> the cache's outcome recorded in the job's metadata (None: not cached)."""
        return {
            doc["name"]: ((doc.get("metadata") or {}).get("jobflow_cache") or {}).get("outcome")
            for doc in self.docs(name)
        }

    def files(self, name: str) -> dict[str, dict[str, bytes]]:
        """Job name -> the files it left in its run folder (jobs whose output names it)."""
        folders = scenarios.job_folders(self.docs(name))
        return {job: scenarios.folder_files(folder) for job, folder in folders.items()}

    def _fireworks(self, name: str) -> list[dict[str, Any]]:
        run = self.runs[name]
        if not run.fw_ids or not run.launches:
            return []
        return [fw for fw in run.launches[-1].fireworks if fw["workflow"] == run.fw_ids[0]]

    def job_names(self, name: str) -> dict[str, str]:
        """Job uuid -> name, for the jobs of run ``name``'s fireworks."""
        return {fw["uuid"]: fw["name"] for fw in self._fireworks(name) if fw["uuid"]}

    def states(self, name: str) -> dict[str, str]:
        """Firework name -> state, for the fireworks of run ``name``'s workflow (those a
        dynamic job added included), as the run's last ``rlaunch`` process left them."""
        return {fw["name"]: fw["state"] for fw in self._fireworks(name)}
