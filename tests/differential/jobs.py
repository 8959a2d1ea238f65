"""Jobs of the differential scenarios, at module level so every process imports them by path.

:func:`task` is ``@job`` in the plain and ``local`` worlds and ``@cached_job`` in the ``deco``
world (``JFC_DIFF_DECO=1``). Every job counts its executions with :func:`executed`.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import sqlite3
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from jobflow import CURRENT_JOB, Flow, JobConfig, Maker, Response, job


def task(*args: Any, **kwargs: Any) -> Any:
    """``@job`` or, in the deco world, ``@cached_job`` (same keywords)."""
    if os.environ.get("JFC_DIFF_DECO") == "1":
        from jobflow_cache import cached_job

        return cached_job(*args, **kwargs)
    return job(*args, **kwargs)


def executed(name: str) -> None:
    """Count one real execution of ``name`` (the file named by ``JFC_COUNTS_FILE``)."""
    counts = os.environ.get("JFC_COUNTS_FILE")
    if counts:
        with open(counts, "a") as fh:
            fh.write(name + "\n")


def data_dir() -> Path:
    """The user's data folder of this world (not a job input: the digest cannot see it)."""
    return Path(os.environ["JFC_DIFF_DATA"])


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


# -- 1. files named by inputs ---------------------------------------------------------------------
@task
def write_poscar(lattice: float, relative: bool = False):
    """Write POSCAR in the run folder; return its path (absolute, or the bare name)."""
    executed("write_poscar")
    Path("POSCAR").write_text(f"{lattice:.4f}\n0 0 0\n")
    return "POSCAR" if relative else str(Path.cwd() / "POSCAR")


@task
def read_poscar(path: str, after: Any = None):
    """Read the POSCAR a path names (``after`` only orders the job)."""
    executed("read_poscar")
    text = Path(path).read_text()
    return {"lattice": float(text.split()[0]) * 2, "text": text}


@task
def read_poscar_doc(doc: dict):
    """Read the POSCAR named inside an upstream output document."""
    executed("read_poscar_doc")
    return float(Path(doc["files"]["poscar"]).read_text().split()[0]) * 2


@task
def write_poscar_doc(lattice: float):
    executed("write_poscar_doc")
    Path("POSCAR").write_text(f"{lattice:.4f}\n")
    return {"files": {"poscar": str(Path.cwd() / "POSCAR")}, "kind": "structure"}


@task
def write_outcar(energy: float):
    """A 'relaxation': writes OUTCAR in its folder, returns the folder."""
    executed("write_outcar")
    Path("OUTCAR").write_text(f"energy = {energy}\n")
    return {"dir_name": os.getcwd()}


@task
def patch_outcar(dir_name: str, extra: str):
    """Patch another job's OUTCAR after it finished (returns the same value every time)."""
    executed("patch_outcar")
    with open(Path(dir_name) / "OUTCAR", "a") as fh:
        fh.write(f"{extra}\n")
    return "patched"


@task
def read_outcar(prev_dir: str, after: Any = None):
    """Parse the OUTCAR of a previous job's folder."""
    executed("read_outcar")
    return (Path(prev_dir) / "OUTCAR").read_text().splitlines()


@task
def read_file(path: Any):
    """Read a user's file named by its path (str or Path)."""
    executed("read_file")
    return Path(path).read_text()


@task
def read_folder(folder: str):
    """Summarise every file of a user's folder."""
    executed("read_folder")
    root = Path(folder)
    return {
        p.relative_to(root).as_posix(): p.read_text()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- 4. provenance --------------------------------------------------------------------------------
@task
def relax(x: float):
    """Reads the user's POTCAR (not an input: invisible to any digest), writes OUTCAR."""
    executed("relax")
    factor = float((data_dir() / "POTCAR").read_text().split()[1])
    Path("OUTCAR").write_text(f"energy = {x * factor}\n")
    return {"dir_name": os.getcwd(), "x": x}


@task
def static(prev_dir: str):
    """Parses the OUTCAR of the relaxation it continues, writes its own result file."""
    executed("static")
    energy = float((Path(prev_dir) / "OUTCAR").read_text().split("=")[1])
    Path("STATIC.out").write_text(f"static energy = {energy + 0.5}\n")
    return {"dir_name": os.getcwd(), "energy": energy + 0.5}


@task
def dos(prev_dir: str):
    """Reads the static job's result file."""
    executed("dos")
    return (Path(prev_dir) / "STATIC.out").read_text()


# -- 5. serving must not damage ------------------------------------------------------------------
@task
def append_energy(label: str, value: float):
    """Append one line to energies.csv in the run folder (shared by every job there)."""
    executed("append_energy")
    with open("energies.csv", "a") as fh:
        fh.write(f"{label},{value}\n")
    return value


@task
def make_wavecar(x: int):
    executed("make_wavecar")
    Path("WAVECAR").write_text(f"wavefunctions {x}\n")
    return x


@task
def delete_wavecar(after: Any):
    executed("delete_wavecar")
    if Path("WAVECAR").exists():
        Path("WAVECAR").unlink()
        return "deleted"
    return "absent"


@task
def check_wavecar(after: Any, tag: str):
    """A later job that restarts from WAVECAR when there is one."""
    executed("check_wavecar")
    path = Path("WAVECAR")
    return {"tag": tag, "restart": path.read_text() if path.exists() else None}


@task
def make_tree(x: int):
    """Leave a file, a symlink to it, a dangling symlink and empty folders."""
    executed("make_tree")
    Path("data.txt").write_text(f"data {x}\n")
    for link, target in (("link.txt", "data.txt"), ("dangling", "nowhere.txt")):
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(target, link)
    Path("empty").mkdir(exist_ok=True)
    Path("nested/inner").mkdir(parents=True, exist_ok=True)
    return x


@task
def write_log(x: int):
    executed("write_log")
    Path("log.txt").write_text(f"first line {x}\n")
    return {"dir_name": os.getcwd(), "file": str(Path.cwd() / "log.txt")}


@task
def append_log(path: str, line: str):
    """Append to a file another job wrote (a served job's file, in the cache world)."""
    executed("append_log")
    with open(path, "a") as fh:
        fh.write(line + "\n")
    return Path(path).read_text()


@task
def write_big(x: int):
    """Write a 4 kB file and a small one."""
    executed("write_big")
    Path("big.bin").write_bytes(bytes([x % 256]) * 4096)
    Path("small.txt").write_text(f"small {x}\n")
    return {"dir_name": os.getcwd(), "big": str(Path.cwd() / "big.bin")}


@task
def read_big(prev_dir: str):
    executed("read_big")
    out = {}
    for name in ("big.bin", "small.txt"):
        path = Path(prev_dir) / name
        out[name] = _digest(path.read_bytes()) if path.exists() else None
    return out


@task
def own_file(x: int):
    """Return the absolute path of a file it wrote (a served output must point to the new one)."""
    executed("own_file")
    Path("out.txt").write_text(f"{x}\n")
    return {"path": str(Path.cwd() / "out.txt"), "dir_name": os.getcwd()}


@task
def write_modes(x: int):
    executed("write_modes")
    Path("run.sh").write_text(f"#!/bin/sh\necho {x}\n")
    os.chmod("run.sh", 0o755)
    Path("private.txt").write_text("secret\n")
    os.chmod("private.txt", 0o600)
    return x


@task
def slow_work(x: int):
    """Works for a while in the shared folder while another process writes a live database."""
    executed("slow_work")
    time.sleep(0.6)
    Path("result.txt").write_text(f"result {x}\n")
    return x * 2


def db_writer(path: str, stop: str, step: int) -> None:
    """Another program's live SQLite database (WAL) in the shared folder, until ``stop`` exists."""
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA wal_autocheckpoint=0")  # keep the WAL live and growing
    con.execute("CREATE TABLE IF NOT EXISTS rows (n INTEGER PRIMARY KEY, step INTEGER)")
    Path(stop + ".started").write_text("")
    while not Path(stop).exists():
        con.execute("INSERT INTO rows (step) VALUES (?)", (step,))
        time.sleep(0.02)
    con.close()


# -- 3. values ------------------------------------------------------------------------------------
@task
def pick(index: Any):
    """Index a numpy array: a tuple picks one element, a list picks rows."""
    import numpy as np

    executed("pick")
    return np.arange(12).reshape(3, 4)[index].tolist()


@task
def third(x: Any):
    """Arithmetic in the argument's own type."""
    executed("third")
    return {"type": type(x).__name__, "third": repr(x / 3)}


@task
def later(when: Any):
    """Half a year later, in the argument's own time zone."""
    executed("later")
    return (when + timedelta(days=180)).isoformat()


@task
def describe(x: Any):
    executed("describe")
    return {"repr": repr(x), "type": type(x).__name__}


@task
def sign(x: float):
    executed("sign")
    return math.copysign(1.0, x)


@task
def scale_array(arr: Any):
    executed("scale_array")
    return (arr * (2**30)).tolist()


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Mode(str, enum.Enum):
    FAST = "fast"


# -- 6. bookkeeping -------------------------------------------------------------------------------
@task
def huge(x: int):
    """An output jobflow's store rejects (an int over 64 bits)."""
    executed("huge")
    return 2**70 + x


@task
def add(a: int, b: int = 0):
    executed("add")
    return a + b


@task(config=JobConfig(expose_store=True))
def count_docs(x: int):
    """Reads the JobStore it is given."""
    executed("count_docs")
    return {"docs": CURRENT_JOB.store.count(), "x": x}


@task
def who_am_i(x: int):
    """Returns its own uuid and folder, like a TaskDoc."""
    executed("who_am_i")
    Path("mine.txt").write_text(f"{x}\n")
    return {"uuid": CURRENT_JOB.job.uuid, "dir_name": os.getcwd(), "x": x}


@task
def collect(first: Any, second: Any):
    executed("collect")
    return [first, second]


@task
def typed_values(x: float):
    """Returns numpy scalars, an Enum, a tuple: a hit must give back the same types."""
    import numpy as np

    executed("typed_values")
    return {
        "f32": np.float32(x),
        "i64": np.int64(3),
        "color": Color.RED,
        "mode": Mode.FAST,
        "pair": (1, 2),
        "arr": np.arange(3, dtype=np.int32),
    }


@task(data="blob")
def with_blob(x: int):
    """Output partly stored in the JobStore's additional store."""
    executed("with_blob")
    return {"blob": list(range(x, x + 50)), "x": x}


@task
def add_one(x: int):
    executed("add_one")
    return x + 1


@task
def make_replace(n: int):
    executed("make_replace")
    jobs = [add_one(i) for i in range(n)]
    return Response(replace=Flow(jobs, output=[j.output for j in jobs]))


@task
def produce(x: int):
    """Writes OUTCAR, returns its folder and its uuid (atomate2 style)."""
    executed("produce")
    Path("OUTCAR").write_text(f"x = {x}\n")
    return {"dir_name": os.getcwd(), "uuid": CURRENT_JOB.job.uuid, "x": x}


@task
def consume(prev_dir: str, uuid: str):
    """Reads OUTCAR through prev_dir and records the upstream uuid."""
    executed("consume")
    return {"text": (Path(prev_dir) / "OUTCAR").read_text(), "from": uuid}


# -- 2. user code (the library side) ---------------------------------------------------------
@dataclass
class ScaleMaker(Maker):
    """A library Maker: ``make`` calls a helper that a user's subclass may override."""

    name: str = "scale"
    factor: int = 2

    def helper(self, x: int) -> int:
        return x * self.factor

    @task
    def make(self, x: int):
        executed(self.name)
        return self.helper(x)


@task
def apply(func: Any, x: int):
    """Calls a function it is given (a user's script function, say)."""
    executed("apply")
    return func(x)


# -- what no cache can see (the harness's own check) -----------------------------------------------
@task
def read_knob(x: int):
    """Reads a file it does not name in its inputs: invisible to any digest, by design."""
    executed("read_knob")
    return x * int((data_dir() / "knob.txt").read_text())


# -- more attacks: what a job can read besides bytes -------------------------------------------
@task
def read_named(path: str):
    """Its result depends on the file's name as well as its bytes."""
    executed("read_named")
    return {"name": Path(path).name, "where": path, "text": Path(path).read_text()}


@task
def list_folder(folder: str):
    """Its result names the folder it was given."""
    executed("list_folder")
    return {"folder": folder, "files": sorted(p.name for p in Path(folder).iterdir())}


@task
def read_env_knob(x: int):
    """Reads an environment variable (seen only through DIGEST_ENV)."""
    executed("read_env_knob")
    return {"x": x, "knob": os.environ.get("JFC_DIFF_STEP")}
