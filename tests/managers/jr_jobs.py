"""Plain ``@job`` functions (not ``@cached_job``) for the jobflow-remote tests: ``cache_flow``
marks them. At module level, so the worker's ``jf execution run`` process imports them by path.

Each counts its real executions through :func:`tests.support.jobs.executed` (``JFC_COUNTS_FILE``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from jobflow import Flow, job
from pydantic import BaseModel

from tests.support.jobs import executed


@job
def relax(volume: float) -> dict[str, object]:
    """Write an ``OUTCAR`` into the run folder; return the folder (atomate2's ``dir_name``)."""
    executed("relax")
    Path("OUTCAR").write_text(f"volume={volume * 0.98}\n")
    return {"volume": round(volume * 0.98, 4), "dir_name": os.getcwd()}


@job
def static(volume: float) -> float:
    executed("static")
    return round((volume - 40.0) ** 2, 4)


@job
def read_outcar(prev_dir: str) -> str:
    """Read the upstream job's file from its run folder (atomate2's ``prev_dir``)."""
    executed("read_outcar")
    return Path(prev_dir, "OUTCAR").read_text().strip()


@job
def summarize(volume: float, energy: float, text: str) -> dict[str, object]:
    executed("summarize")
    return {"volume": volume, "energy": energy, "text": text}


@job
def rescale(energy: float) -> float:
    executed("rescale")
    return round(energy * 2.5, 4)


@job
def slow_square(x: float, seconds: float) -> float:
    """Sleep ``seconds`` (long enough for two workers to overlap), then square ``x``."""
    executed("slow_square")
    time.sleep(seconds)
    return x * x


def chain(volume: float = 42.0) -> Flow:
    """relax -> static (a plain value) and read_outcar (relax's folder) -> summarize."""
    first = relax(volume)
    energy = static(first.output["volume"])
    text = read_outcar(first.output["dir_name"])
    last = summarize(first.output["volume"], energy.output, text.output)
    return Flow([first, energy, text, last], name="chain")


def chain_extended(volume: float = 42.0) -> Flow:
    """:func:`chain` and one more job: rebuilt after ``chain`` ran, it is half cached."""
    flow = chain(volume)
    extra = rescale(flow.jobs[-1].output["energy"])
    flow.add_jobs(extra)
    return flow


# -- inputs that a manager hands over differently ------------------------------------------
class Cell(BaseModel):
    """An output with a field typed as a tuple, as emmet's ``Matrix3D`` (a TaskDoc's stress)."""

    lengths: tuple[float, float, float]


@job
def make_cell(a: float) -> Cell:
    executed("make_cell")
    return Cell(lengths=(a, a, round(a * 1.5, 4)))


@job
def cell_volume(lengths: Any) -> dict[str, object]:
    """Gets ``lengths`` as a tuple where references are resolved on the worker, as a list
    under jobflow-remote (its runner resolves them and sends them as JSON)."""
    executed("cell_volume")
    return {
        "volume": round(lengths[0] * lengths[1] * lengths[2], 6),
        "kind": type(lengths).__name__,
    }


def cell_chain(a: float = 3.0) -> Flow:
    """make_cell -> cell_volume(make_cell.output.lengths)."""
    cell = make_cell(a)
    return Flow([cell, cell_volume(cell.output.lengths)], name="cells")
