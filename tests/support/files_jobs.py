"""Jobs and flows of the run-folder tests (tests/files/test_files.py), importable in any process.

``python -m tests.support.files_jobs SCENARIO ROOT VARIANT ENGINE CREATE_FOLDERS`` runs one flow in
a fresh process: ENGINE ``plain`` (jobflow's own run_locally) or ``cache``
(jobflow_cache.run_locally). Executions are counted as in tests/support/jobs.py.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path

from jobflow import Flow, job

from tests.support.jobs import executed


@job
def append_energy(name: str, value: float):
    """Append one line to the shared energies.csv (each job of a flow adds its own)."""
    executed("append_energy")
    with open("energies.csv", "a") as fh:
        fh.write(f"{name},{value}\n")
    return value


@job
def write_wavecar(tag: str):
    executed("write_wavecar")
    Path("WAVECAR").write_text(f"wavefunctions {tag}\n" * 50)
    Path("OUTCAR").write_text(f"energy {tag}\n")
    return tag


@job
def delete_wavecar(tag: str):
    """Restart from WAVECAR, then delete it (as a VASP job with LWAVE=False cleans up)."""
    executed("delete_wavecar")
    found = Path("WAVECAR").read_text().count("\n")
    Path("WAVECAR").unlink()
    Path("OUTCAR.2").write_text(f"energy {tag} from {found} lines\n")
    return found


@job
def links_and_dirs(tag: str):
    """Leave relative and absolute symlinks, a dangling one and empty folders behind."""
    executed("links_and_dirs")
    Path("OUTCAR").write_text(f"energy {tag}\n")
    os.symlink("OUTCAR", "latest")
    os.symlink("/nonexistent/jfc/target", "absolute")
    Path("scratch/empty").mkdir(parents=True)
    Path("tmp").mkdir()
    os.symlink("../OUTCAR", "scratch/up")
    return tag


@job
def write_out(tag: str):
    executed("write_out")
    Path("OUTCAR").write_text(f"energy {tag}\n")
    return {"file": str(Path.cwd() / "OUTCAR")}


@job
def append_line(info: dict, line: str):
    """A downstream job appending to a file an upstream job wrote (prev_dir style)."""
    executed("append_line")
    with open(info["file"], "a") as fh:
        fh.write(line + "\n")
    return Path(info["file"]).read_text()


@job
def big_file(tag: str, size: int = 4096):
    executed("big_file")
    Path("big.bin").write_bytes(tag.encode()[:1] * size)
    Path("small.txt").write_text(tag)
    return str(Path.cwd() / "big.bin")


@job
def poke_database(db: str, tag: str):
    """Write into a database that another connection holds open in WAL mode, and a file."""
    executed("poke_database")
    con = sqlite3.connect(db)
    with con:
        con.execute("INSERT INTO t VALUES (?)", (tag,))
    con.close()
    Path("result.txt").write_text(tag)
    return tag


def build(scenario: str, variant: str) -> Flow:
    """The flow of a scenario; ``variant`` is what changes between runs."""
    if scenario == "energies":
        return Flow([append_energy("first", float(variant)), append_energy("second", 2.0)])
    if scenario == "wavecar":
        w = write_wavecar("x")
        return Flow([w, delete_wavecar(w.output)])
    if scenario == "links":
        return Flow([links_and_dirs("x")])
    if scenario == "downstream":
        w = write_out("x")
        return Flow([w, append_line(w.output, f"appended {variant}")])
    if scenario == "big":
        return Flow([big_file("x")])
    raise ValueError(scenario)


def main(argv: list[str]) -> None:
    scenario, root, variant, engine, create = argv
    flow = build(scenario, variant)
    Path(root).mkdir(parents=True, exist_ok=True)
    kwargs = {"root_dir": root, "create_folders": create == "1", "ensure_success": True}
    if engine == "plain":
        from jobflow import run_locally

        run_locally(flow, **kwargs)
    else:
        import jobflow_cache

        jobflow_cache.run_locally(flow, **kwargs)


if __name__ == "__main__":
    main(sys.argv[1:])
