"""Jobs and flows of the tests of files and folders named in inputs (tests/hashing/test_inputs.py).

``python -m tests.support.input_jobs SCENARIO ROOT VARIANT ENGINE CREATE_FOLDERS`` runs one flow in
a fresh process and prints its outputs by job name as one JSON line (paths under ROOT written
``<root>/...``, jobflow's run-folder names ``job_*``). ENGINE: ``plain`` (jobflow's own
run_locally, plain ``@job``), ``cache`` (jobflow_cache.run_locally, plain ``@job``) or
``decorated`` (jobflow's own run_locally, ``@cached_job`` jobs). Executions are counted as in
tests/support/jobs.py.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from jobflow import Flow, Job, job

from jobflow_cache import cached_job
from tests.support.jobs import executed


# -- POSCAR: an upstream job writes a file and returns its path, a downstream job reads it -----
def _write_poscar(lattice: float, absolute: bool) -> str:
    executed("write_poscar")
    Path("POSCAR").write_text(f"Si\n{lattice}\n")
    return os.path.abspath("POSCAR") if absolute else "POSCAR"


def _read_lattice(path: str) -> float:
    executed("read_lattice")
    return float(Path(path).read_text().split()[1])


@job
def write_poscar(lattice: float, absolute: bool) -> str:
    return _write_poscar(lattice, absolute)


@job
def read_lattice(path: str) -> float:
    return _read_lattice(path)


@cached_job
def cached_write_poscar(lattice: float, absolute: bool) -> str:
    return _write_poscar(lattice, absolute)


@cached_job
def cached_read_lattice(path: str) -> float:
    return _read_lattice(path)


# -- prev_dir: a downstream job reads a file of its upstream job's run folder ------------------
def _relax(volume: float) -> dict[str, Any]:
    executed("relax")
    Path("OUTCAR").write_text(f"volume={volume * 0.98}\n")
    Path("sub").mkdir(exist_ok=True)
    Path("sub", "WAVECAR").write_bytes(b"\x00\x01" * 64)
    return {"dir_name": os.getcwd(), "volume": volume * 0.98}


def _read_outcar(prev_dir: str, after: Any = None) -> str:
    executed("read_outcar")
    return Path(prev_dir, "OUTCAR").read_text().strip()


def _patch_outcar(prev_dir: str, factor: float) -> float:
    """Another job changes a file in its upstream job's folder after that job finished."""
    executed("patch_outcar")
    path = Path(prev_dir, "OUTCAR")
    path.write_text(path.read_text() + f"corrected by {factor}\n")
    return factor


@job
def relax(volume: float) -> dict[str, Any]:
    return _relax(volume)


@job
def read_outcar(prev_dir: str, after: Any = None) -> str:
    return _read_outcar(prev_dir, after)


@job
def patch_outcar(prev_dir: str, factor: float) -> float:
    return _patch_outcar(prev_dir, factor)


@cached_job
def cached_relax(volume: float) -> dict[str, Any]:
    return _relax(volume)


@cached_job
def cached_read_outcar(prev_dir: str, after: Any = None) -> str:
    return _read_outcar(prev_dir, after)


@cached_job
def cached_patch_outcar(prev_dir: str, factor: float) -> float:
    return _patch_outcar(prev_dir, factor)


# -- folders and files outside run folders ---------------------------------------------------
@job
def summarize_folder(folder: str) -> list[list[str]]:
    """Names and contents of a folder's files (a job reading a data folder)."""
    executed("summarize_folder")
    found = []
    for dirpath, dirnames, filenames in sorted(os.walk(folder)):
        rel = os.path.relpath(dirpath, folder)
        found.append([rel, ",".join(sorted(dirnames))])
        found.extend(
            [os.path.join(rel, name), Path(dirpath, name).read_text()] for name in filenames
        )
    return sorted(found)


@job
def size_of(path: Path) -> int:
    """A job given a large file by a Path (it only needs its size)."""
    executed("size_of")
    return Path(path).stat().st_size


@job
def read_text(path: Path) -> str:
    executed("read_text")
    return Path(path).read_text()


# -- twins: two upstream jobs with one digest feeding one downstream job --------------------
@job
def own_folder() -> str:
    executed("own_folder")
    Path("marker").write_text("here\n")
    return os.getcwd()


@job
def own_uuid() -> str:
    from jobflow import CURRENT_JOB

    executed("own_uuid")
    return str(CURRENT_JOB.job.uuid)


@job
def pair(first: str, second: str) -> list[str]:
    executed("pair")
    return [first, second]


# -- flows -------------------------------------------------------------------------------------
def build(scenario: str, variant: str, decorated: bool = False, root: str = ".") -> Flow:
    """The flow of a scenario; ``variant`` is what changes between runs.

    ``poscar-A`` and ``poscar-B`` are the two jobs of ``poscar-abs`` as flows of their own,
    each run in a process of its own in one folder (FireWorks' ``rlaunch singleshot``)."""
    if scenario == "poscar-A":
        w = cached_write_poscar if decorated else write_poscar
        return Flow([w(float(variant), True)], name=scenario)
    if scenario == "poscar-B":
        r = cached_read_lattice if decorated else read_lattice
        return Flow([r(str(Path(root, "POSCAR").resolve()))], name=scenario)
    if scenario in ("poscar-abs", "poscar-rel"):
        w, r = (
            (cached_write_poscar, cached_read_lattice)
            if decorated
            else (write_poscar, read_lattice)
        )
        first = w(float(variant), scenario == "poscar-abs")
        return Flow([first, r(first.output)], name=scenario)
    up, read, patch = (
        (cached_relax, cached_read_outcar, cached_patch_outcar)
        if decorated
        else (relax, read_outcar, patch_outcar)
    )
    if scenario == "prev_dir":
        first = up(float(variant))
        return Flow([first, read(first.output["dir_name"])], name=scenario)
    if scenario == "patched":
        first = up(42.0)
        fix = patch(first.output["dir_name"], float(variant))
        return Flow([first, fix, read(first.output["dir_name"], fix.output)], name=scenario)
    raise ValueError(scenario)


def names(flow: Flow) -> dict[str, Job]:
    return {str(j.name): j for j in flow.jobs}


def anonymised(value: Any, root: str) -> Any:
    """``value`` with ROOT written ``<root>`` and jobflow's run-folder names ``job_*``."""
    text = json.dumps(value).replace(str(Path(root).resolve()), "<root>").replace(root, "<root>")
    return json.loads(re.sub(r"job_[0-9-]+", "job_*", text))


def run(scenario: str, root: str, variant: str, engine: str, create: bool) -> dict[str, Any]:
    """Run one flow; its outputs by job name (anonymised)."""
    flow = build(scenario, variant, decorated=engine == "decorated", root=root)
    Path(root).mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"root_dir": root, "create_folders": create, "ensure_success": True}
    if engine == "cache":
        import jobflow_cache

        responses = jobflow_cache.run_locally(flow, **kwargs)
    else:
        from jobflow import run_locally

        responses = run_locally(flow, **kwargs)
    outputs = {name: responses[j.uuid][1].output for name, j in names(flow).items()}
    return {str(k).removeprefix("cached_"): v for k, v in anonymised(outputs, root).items()}


def main(argv: list[str]) -> None:
    scenario, root, variant, engine, create = argv
    print(json.dumps(run(scenario, root, variant, engine, create == "1")))


if __name__ == "__main__":
    main(sys.argv[1:])


@job
def read_keyed(files: dict[str, str]) -> dict[str, str]:
    """Reads the files named by the keys of its input (dict keys never reach the hook)."""
    executed("read_keyed")
    return {name: Path(name).read_text() for name in files}
