"""Real atomate2 flows (ASE's EMT calculator) and the per-process scenario the tests run.

Each test process calls :func:`main`, which builds the flow with a fresh ``maker.make()`` (all
new uuids), runs it in a fresh ``JobStore(MemoryStore())`` and prints one JSON document: every
stored job (name, uuid, cache outcome, run folder, inode of the file it wrote) and the result
of the flow's final job (``None`` when it did not run).

Kept at module level, importable by path, so the same code runs in every process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from jobflow import Flow, JobStore
    from pymatgen.core import Structure

#: What every EMT job (relaxation or static) leaves in its run folder.
ATOMS_FILE = "final_atoms_object.xyz"


def copper() -> Structure:
    """The 1-atom primitive cell of fcc Cu, close to its EMT lattice constant (3.5898 Å)."""
    from pymatgen.core import Lattice, Structure

    fcc = [[0, 0, 0], [0, 0.5, 0.5], [0.5, 0, 0.5], [0.5, 0.5, 0]]
    return Structure(Lattice.cubic(3.59), ["Cu"] * 4, fcc).get_primitive_structure()


def elastic_flow() -> Flow:
    """bulk relax -> 6 deformations -> 6 fixed-cell relaxations -> elastic tensor fit."""
    from atomate2.ase.jobs import EmtRelaxMaker
    from atomate2.forcefields.flows.elastic import ElasticMaker

    maker = ElasticMaker(
        bulk_relax_maker=EmtRelaxMaker(relax_cell=True, relax_kwargs={"fmax": 1e-4}),
        elastic_relax_maker=EmtRelaxMaker(relax_cell=False, relax_kwargs={"fmax": 1e-4}),
        max_failed_deformations=0,  # a failed deformation fails the fit: the flow cannot finish
    )
    return maker.make(copper())


def phonon_flow() -> Flow:
    """bulk relax -> supercell -> 6 displacements -> 6 EMT statics -> phonopy."""
    from atomate2.ase.jobs import EmtRelaxMaker
    from atomate2.forcefields.flows.phonons import PhononMaker

    maker = PhononMaker(
        bulk_relax_maker=EmtRelaxMaker(relax_cell=True, relax_kwargs={"fmax": 1e-4}),
        static_energy_maker=None,
        born_maker=None,
        phonon_displacement_maker=EmtRelaxMaker(name="EMT static", steps=1, relax_cell=False),
        min_length=6.0,
        sym_reduce=False,  # 6 displacements (+-x, +-y, +-z) instead of 1
    )
    return maker.make(copper())


def elastic_result(output: dict[str, Any]) -> dict[str, Any]:
    return {
        "tensor": output["elastic_tensor"]["raw"],
        "uuids": output["fitting_data"]["uuids"],
        "dirs": output["fitting_data"]["job_dirs"],
    }


def phonon_result(output: dict[str, Any]) -> dict[str, Any]:
    return {
        "free_energies": output["free_energies"],
        "uuids": output["uuids"]["displacements_uuids"]
        + [output["uuids"]["optimization_run_uuid"]],
        "dirs": output["jobdirs"]["displacements_job_dirs"]
        + [output["jobdirs"]["optimization_run_job_dir"]],
    }


@dataclass(frozen=True)
class Scenario:
    """One atomate2 flow, the job made to fail in run 1 and the jobs that depend on it."""

    build: Callable[[], Flow]
    final: str  # name of the flow's last job, whose output is the result
    result: Callable[[dict[str, Any]], dict[str, Any]]
    failing: str  # the job made to fail in run 1
    emt_jobs: tuple[str, ...]  # every EMT job (they write ATOMS_FILE)
    referenced: tuple[str, ...]  # the jobs whose uuid and folder the final document records


SCENARIOS = {
    "elastic": Scenario(
        build=elastic_flow,
        final="fit_elastic_tensor",
        result=elastic_result,
        failing="EMT relaxation 3/6",
        emt_jobs=("EMT relaxation", *(f"EMT relaxation {i}/6" for i in range(1, 7))),
        referenced=tuple(f"EMT relaxation {i}/6" for i in range(1, 7)),
    ),
    "phonon": Scenario(
        build=phonon_flow,
        final="generate_frequencies_eigenvectors",
        result=phonon_result,
        failing="EMT static 3/6",
        emt_jobs=("EMT relaxation", *(f"EMT static {i}/6" for i in range(1, 7))),
        referenced=("EMT relaxation", *(f"EMT static {i}/6" for i in range(1, 7))),
    ),
}


def fail_job_named(name: str) -> None:
    """Make the ASE relaxation of the job called ``name`` raise, in this process only.

    Patches :meth:`atomate2.ase.utils.AseRelaxer.relax` (a helper the job calls, not the job
    function): the jobs' function paths and inputs, hence their digests, are unchanged.
    """
    from atomate2.ase.utils import AseRelaxer
    from jobflow import CURRENT_JOB

    relax = AseRelaxer.relax

    def failing_relax(self: AseRelaxer, *args: Any, **kwargs: Any) -> Any:
        if CURRENT_JOB.job is not None and CURRENT_JOB.job.name == name:
            raise RuntimeError(f"{name} failed on purpose")
        return relax(self, *args, **kwargs)

    AseRelaxer.relax = failing_relax  # type: ignore[method-assign]


def describe(store: JobStore, scenario: Scenario) -> dict[str, Any]:
    """Every stored job and the flow's result, as JSON-able data."""
    jobs = []
    result = None
    for doc in store.query({}, sort={"completed_at": 1}):
        output = doc["output"]
        dir_name = output.get("dir_name") if isinstance(output, dict) else None
        atoms_file = Path(dir_name) / ATOMS_FILE if dir_name else None
        jobs.append(
            {
                "name": doc["name"],
                "uuid": doc["uuid"],
                "index": doc["index"],
                "outcome": (doc.get("metadata") or {}).get("jobflow_cache", {}).get("outcome"),
                "dir_name": dir_name,
                "files": sorted(os.listdir(dir_name)) if dir_name else None,
                "inode": atoms_file.stat().st_ino if atoms_file and atoms_file.exists() else None,
                "text": atoms_file.read_text() if atoms_file and atoms_file.exists() else None,
            }
        )
        if doc["name"] == scenario.final:
            result = scenario.result(output)
    return {"jobs": jobs, "result": result}


def main(kind: str, runner: str, root_dir: str, fail: str | None = None) -> None:
    """Build ``kind`` afresh, run it with ``runner`` (``jobflow``/``jobflow_cache``), print JSON."""
    from jobflow import JobStore
    from maggma.stores import MemoryStore

    scenario = SCENARIOS[kind]
    if fail:
        fail_job_named(fail)
    if runner == "jobflow":
        from jobflow import run_locally
    else:
        from jobflow_cache import run_locally  # type: ignore[assignment]
    store = JobStore(MemoryStore(), additional_stores={"data": MemoryStore()})
    store.connect()
    Path(root_dir).mkdir(parents=True, exist_ok=True)
    run_locally(
        scenario.build(),
        store=store,
        create_folders=True,
        root_dir=root_dir,
        ensure_success=not fail,
        log=False,
    )
    print(json.dumps(describe(store, scenario)))
