"""Jobs of tests/execution/test_provenance.py and tests/execution/test_bookkeeping.py (importable
in any process).

Executions are counted with :func:`tests.support.jobs.executed` (``JFC_COUNTS_FILE``).
"""

from __future__ import annotations

import os
from pathlib import Path

from jobflow import CURRENT_JOB, Flow, JobConfig, job

from jobflow_cache import cached_job
from tests.support.jobs import executed

#: Environment variable naming the "POTCAR" file relax reads without naming it in its inputs
#: (as VASP reads the pseudopotentials a POTCAR library provides).
POTCAR_ENV = "JFC_POTCAR"


@job
def relax(lattice: float):
    """Write an OUTCAR whose energy depends on the POTCAR, which no input names."""
    executed("relax")
    scale = float(Path(os.environ[POTCAR_ENV]).read_text())
    energy = lattice * scale
    Path("OUTCAR").write_text(f"energy = {energy}\n")
    return {"dir_name": os.getcwd(), "energy": energy}


@job
def static(prev_dir: str):
    """Parse the OUTCAR of the previous job through its folder (atomate2's prev_dir)."""
    executed("static")
    energy = float((Path(prev_dir) / "OUTCAR").read_text().split("=")[1]) + 0.5
    Path("static.out").write_text(f"{energy}\n")
    return {"dir_name": os.getcwd(), "energy": energy}


@job
def summarize(prev_dir: str):
    """Read what static wrote in its folder: a consumer of a consumer."""
    executed("summarize")
    return float((Path(prev_dir) / "static.out").read_text()) * 10


@job
def by_uuid(run_uuid: str):
    """Name an upstream job by its uuid (atomate2's optimization_run_uuid)."""
    executed("by_uuid")
    return len(run_uuid)


def potcar_flow(lattice: float = 2.0, with_uuid: bool = False) -> Flow:
    """relax -> static (prev_dir) -> summarize (prev_dir); optionally a job given relax's uuid."""
    r = relax(lattice)
    s = static(r.output["dir_name"])
    m = summarize(s.output["dir_name"])
    jobs = [r, s, m]
    if with_uuid:
        jobs.append(by_uuid(r.uuid))
    return Flow(jobs, name="potcar")


# -- bookkeeping ------------------------------------------------------------------------------
@job
def huge(n: int):
    """An output no JobStore on MongoDB or mongomock accepts: an int over 64 bits."""
    executed("huge")
    return 2**70 + n


@cached_job
def huge_cached(n: int):
    executed("huge_cached")
    return 2**70 + n


@job(config=JobConfig(expose_store=True))
def reads_store(n: int):
    """Reads the JobStore (``JobConfig(expose_store=True)``): what it finds there is no input."""
    executed("reads_store")
    return n + CURRENT_JOB.store.count()


@job
def plain(n: int):
    executed("plain")
    return n * 3


@cached_job
def plain_cached(n: int):
    executed("plain_cached")
    return n * 5


@cached_job
def write_here(tag: str):
    """Write a file in the run folder (a @cached_job, for jobflow's own manager)."""
    executed("write_here")
    Path("here.txt").write_text(tag)
    return {"dir_name": os.getcwd(), "tag": tag}


@job
def folder_knowledge(tag: str):
    """What the running cache knows of this job's folder (``tag`` keeps each call distinct)."""
    from jobflow_cache.execution.cache import current_cache

    executed("folder_knowledge")
    cache = current_cache()
    return {"tag": tag, "exclusive": cache.exclusive_dirs, "shared": cache.shared_dirs}
