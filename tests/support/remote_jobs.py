"""``@cached_job`` jobs run by remote-style workers (FireWorks rockets, a jobflow-remote style
worker), at module level so that a fresh worker process imports them by path.

They count their real executions through :func:`tests.support.jobs.executed` (``JFC_COUNTS_FILE``),
so a test sees across processes which jobs ran and which were served from the cache.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from jobflow import Flow

from jobflow_cache import cached_job
from tests.support.jobs import executed


@cached_job
def relax(volume: float) -> dict[str, object]:
    """Write an ``OUTCAR`` and a binary file into the run folder; return the folder, as a path
    and as atomate2 writes a TaskDoc's ``dir_name``: ``"host:/path"``."""
    executed("relax")
    print(f"relaxing at volume {volume}", flush=True)  # a calculation's log on stdout
    Path("OUTCAR").write_text(f"volume={volume * 0.98}\n")
    Path("sub").mkdir(exist_ok=True)
    Path("sub/WAVECAR").write_bytes(b"\x00\x01wave" * 64)
    return {
        "volume": round(volume * 0.98, 4),
        "dir_name": os.getcwd(),
        "uri": f"{socket.gethostname()}:{os.getcwd()}",
    }


@cached_job
def static(volume: float) -> float:
    """A plain value in, a plain value out."""
    executed("static")
    return round((volume - 40.0) ** 2, 4)


@cached_job
def read_outcar(prev_dir: str) -> str:
    """Read a file from the upstream job's run folder (atomate2's ``prev_dir``)."""
    executed("read_outcar")
    return Path(prev_dir, "OUTCAR").read_text().strip()


@cached_job
def summarize(volume: float, energy: float) -> dict[str, float]:
    """Combine the outputs of two upstream jobs (plain values once resolved)."""
    executed("summarize")
    return {"volume": volume, "energy": energy}


def relax_flow(volume: float = 42.0) -> Flow:
    """relax -> (static, read_outcar(prev_dir)) -> summarize; new uuids on every call."""
    first = relax(volume)
    second = static(first.output["volume"])
    third = read_outcar(first.output["dir_name"])
    fourth = summarize(first.output["volume"], second.output)
    return Flow([first, second, third, fourth], name="remote")
