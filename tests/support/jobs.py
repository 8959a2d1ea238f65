"""Jobs and Makers used by the tests, at module level so they import by path in any process.

Every job appends its name to the file named by ``JFC_COUNTS_FILE`` when it really executes,
so tests count executions across processes. ``JFC_FAIL`` names jobs that must raise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from jobflow import Flow, Maker, Response, job

from jobflow_cache import cached_job


def executed(name: str) -> None:
    """Count one real execution of ``name`` and fail when ``JFC_FAIL`` names it."""
    counts = os.environ.get("JFC_COUNTS_FILE")
    if counts:
        with open(counts, "a") as fh:
            fh.write(name + "\n")
    if name in os.environ.get("JFC_FAIL", "").split(","):
        raise RuntimeError(f"{name} failed on purpose")


# -- plain jobflow jobs (cached by jobflow_cache.run_locally) -------------------------------------
@job
def add(a, b=0):
    executed("add")
    return a + b


@job
def mul(a, b):
    executed("mul")
    return a * b


@job
def write_files(tag: str, size: int = 10):
    """Write two files in the run folder and return where they are."""
    executed("write_files")
    Path("result.txt").write_text(f"{tag}\n" * size)
    Path("sub").mkdir(exist_ok=True)
    Path("sub/data.bin").write_bytes(tag.encode() * size)
    return {"dir_name": os.getcwd(), "tag": tag, "file": str(Path.cwd() / "result.txt")}


@job
def read_back(info: dict):
    """Read the file an upstream job wrote (its path arrives through the resolved output)."""
    executed("read_back")
    return Path(info["file"]).read_text().count("\n")


@job
def make_addition(value):
    executed("make_addition")
    return Response(output=value, addition=Flow([add(value, 100)]))


@job
def make_detour(value):
    executed("make_detour")
    return Response(output=value, detour=Flow([add(value, 1000)]))


@job
def make_replace(n):
    """Replace itself with n add jobs gathered into a list."""
    executed("make_replace")
    jobs = [add(i, i) for i in range(n)]
    return Response(replace=Flow(jobs, output=[j.output for j in jobs]))


@job
def total(values):
    executed("total")
    return sum(values)


@job
def nested_replace(depth):
    """Replace itself with a replace one level shallower; depth 0 returns a value."""
    executed("nested_replace")
    if depth == 0:
        return 7
    return Response(replace=nested_replace(depth - 1))


@job
def stop_children_job(value):
    executed("stop_children_job")
    return Response(output=value, stop_children=True)


@job
def stop_jobflow_job(value):
    executed("stop_jobflow_job")
    return Response(output=value, stop_jobflow=True)


@job
def fail_job(value):
    executed("fail_job")
    raise ValueError("this job always fails")


@job
def uuid_consumer(uuid: str, value):
    """Takes an upstream job's uuid as a plain string (like atomate2's optimization_run_uuid)."""
    executed("uuid_consumer")
    return {"from": uuid, "value": value}


@job
def my_uuid():
    """Returns its own uuid, like a TaskDoc that records the job it came from."""
    from jobflow import CURRENT_JOB

    executed("my_uuid")
    return {"uuid": CURRENT_JOB.job.uuid, "value": 1}


@job
def open_handle_job(handle):
    executed("open_handle_job")
    return 1


# -- a Maker like atomate2's (the jobflow issue #873 scenario) ------------------------------------
@dataclass
class RelaxMaker(Maker):
    """Writes an 'OUTCAR' into its folder and 'relaxes' a value."""

    name: str = "relax"
    steps: int = 10
    settings: dict = field(default_factory=dict)

    @job
    def make(self, value):
        executed(f"{self.name}")
        Path("OUTCAR").write_text(f"steps={self.steps} value={value}\n")
        return {"value": value * 2, "steps": self.steps, "dir_name": os.getcwd()}


@dataclass
class DoubleRelaxMaker(Maker):
    name: str = "double relax"
    relax1: RelaxMaker = field(default_factory=lambda: RelaxMaker(name="relax1"))
    relax2: RelaxMaker = field(default_factory=lambda: RelaxMaker(name="relax2", steps=20))

    def make(self, value):
        r1 = self.relax1.make(value)
        r2 = self.relax2.make(r1.output["value"])
        return Flow([r1, r2], output=r2.output, name=self.name)


def issue_873_flow(value: float = 1.0) -> Flow:
    """DoubleRelax -> static -> two analyses, like the jobflow issue #873 report."""
    double = DoubleRelaxMaker().make(value)
    static = RelaxMaker(name="static", steps=1).make(double.output["value"])
    dos = add(static.output["value"], 1)
    dos.name = "dos"
    band = mul(static.output["value"], 3)
    band.name = "band"
    return Flow([double, static, dos, band], name="issue-873")


# -- @cached_job (caches under any manager) -------------------------------------------------------
@cached_job
def cached_add(a, b=0):
    executed("cached_add")
    return a + b


@cached_job(cache_version=2, ignore=["verbose"])
def cached_scale(x, factor=2, verbose=False):
    executed("cached_scale")
    return x * factor


@dataclass
class CachedMaker(Maker):
    name: str = "cached maker"
    factor: int = 3

    @cached_job
    def make(self, x):
        executed(self.name)
        return x * self.factor


@job
def producer():
    """Records its own uuid and folder in its output (like an atomate2 TaskDoc)."""
    from jobflow import CURRENT_JOB

    executed("producer")
    return {"uuid": CURRENT_JOB.job.uuid, "dir": os.getcwd()}


@job
def consumer(info: dict):
    executed("consumer")
    return dict(info)


@job
def relax_child(structure):
    executed("relax_child")
    return structure.volume


@job
def deform_parent(strain: float):
    """A dynamic job whose child gets a deformed pymatgen Structure (floats that are not
    bit-identical after a JSON round trip)."""
    from pymatgen.analysis.elasticity import Deformation
    from pymatgen.core import Lattice, Structure

    executed("deform_parent")
    lattice = Lattice([[3.1, 0.2, 0], [0.3, 2.9, 0.1], [0, 0.4, 3.3]])
    s = Structure(lattice, ["Cu"], [[0.1234567, 0.7654321, 0.1111111]])
    deformed = Deformation([[1 + strain, 0, 0], [0, 1, 0], [0, 0, 1]]).apply_to_structure(s)
    return Response(replace=relax_child(deformed))


@job
def takes_anything(value, n=1):
    executed("takes_anything")
    return n


@job
def write_then_fail(tag: str):
    """Writes a partial result, then fails."""
    Path("partial.txt").write_text(tag)
    executed("write_then_fail")
    return tag


@cached_job
def cached_producer(x):
    """Returns its own uuid (like atomate2 outputs that name the job they came from)."""
    from jobflow import CURRENT_JOB

    executed("cached_producer")
    return {"uuid": CURRENT_JOB.job.uuid, "x": x}


@cached_job
def cached_consumer(info: dict):
    executed("cached_consumer")
    return {"from": info["uuid"], "x2": info["x"] * 2}
