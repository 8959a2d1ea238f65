"""Jobs for the fault-injection tests (tests/execution/test_faults.py), at module level so they
import by path in the subprocesses the tests kill or run with fewer privileges.

Every job counts its executions through :func:`tests.support.jobs.executed` (``JFC_COUNTS_FILE``).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import xxhash
from jobflow import Flow, job

from tests.support.jobs import executed

#: A job that finds this variable set writes the file it names just before it returns, so a
#: test can kill the process while the job's result is being recorded.
READY_ENV = "JFC_READY_FILE"


def content(tag: str, index: int, size: int) -> bytes:
    """The ``size`` bytes of file ``index`` written by :func:`write_large` for ``tag``."""
    pattern = f"{tag}:{index}:".encode()
    return (pattern * (size // len(pattern) + 1))[:size]


@job
def write_large(tag: str, files: int, size: int):
    """Write ``files`` files of ``size`` bytes each in the run folder and return their names."""
    executed("write_large")
    Path("big").mkdir(exist_ok=True)
    names = []
    for i in range(files):
        name = f"big/part{i}.bin"
        Path(name).write_bytes(content(tag, i, size))
        names.append(name)
    Path("summary.txt").write_text(f"{tag} {files} {size}\n")
    ready = os.environ.get(READY_ENV)
    if ready:
        Path(ready).write_text(os.getcwd())
    return {"tag": tag, "names": names, "dir_name": os.getcwd()}


@job
def measure(info: dict):
    """Read back the files an upstream :func:`write_large` wrote; return their sizes."""
    executed("measure")
    folder = Path(info["dir_name"])
    return sorted((folder / name).stat().st_size for name in info["names"])


@job
def write_text(name: str, text: str, after=None):
    """Write ``text`` to the file ``name`` in the run folder (rewriting it in place if it
    exists, as most programs do); ``after`` only orders it after another job."""
    executed("write_text")
    Path(name).write_text(text)
    return {"name": name, "length": len(text)}


@job
def side_effect_free(value):
    """Return ``value`` unchanged (the tests serve crafted cached outputs in its place)."""
    executed("side_effect_free")
    return value


@job
def hold(seconds: float = 60.0):
    """Keep the run busy (a long job) so a test can kill it while this job runs."""
    executed("hold")
    time.sleep(seconds)
    return seconds


def large_flow(tag: str = "k", files: int = 4, size: int = 16 << 20) -> Flow:
    """write_large -> measure: a job with large files and one that reads them back."""
    big = write_large(tag, files, size)
    return Flow([big, measure(big.output)], name="large")


@job
def write_unreadable(tag: str):
    """Write a file nobody may read (mode 000) and a normal one."""
    executed("write_unreadable")
    Path("normal.txt").write_text(tag)
    secret = Path("secret.txt")
    secret.write_text(tag * 100)
    secret.chmod(0)
    return {"tag": tag}


@job
def large_output(n: int):
    """Return ``n`` characters of text that does not compress well (hex of xxh3 digests)."""
    executed("large_output")
    return "".join(xxhash.xxh3_128_hexdigest(str(i).encode()) for i in range(n // 32 + 1))[:n]


def rewrite_flow(name: str = "OUTCAR") -> Flow:
    """Two jobs that write the same file one after the other (in a shared folder, the second
    rewrites the first one's file)."""
    first = write_text(name, "first\n")
    return Flow([first, write_text(name, "second", after=first.output)], name="rewrite")


def unreadable_flow(tag: str = "u") -> Flow:
    """A job that writes a file nobody may read, and an independent one."""
    return Flow([write_unreadable(tag), large_output(1000)], name="unreadable")


@job
def sabotage(how: str, target: str, value=None):
    """Damage the cache while a flow runs (between two of its jobs); return ``value``.

    ``how``: ``"delete"`` the file ``target`` (and its SQLite -wal/-shm), ``"garbage"``: write
    garbage over it in place, ``"replace"``: rename a garbage file over it, ``"read-only"``:
    make its folder and files read-only, ``"command"``: run the JSON argv ``target`` (stop a
    server), ``"terminate"``: end every other connection to the PostgreSQL server ``target``.
    """
    executed("sabotage")
    path = Path(target)
    files = [path, Path(f"{target}-wal"), Path(f"{target}-shm")]
    if how == "delete":
        for file in files:
            file.unlink(missing_ok=True)
    elif how == "garbage":
        for file in files:
            if file.exists():
                with open(file, "r+b") as fh:
                    fh.write(b"\xde\xad\xbe\xef" * (file.stat().st_size // 4 + 1))
    elif how == "replace":
        garbage = path.with_name(path.name + ".garbage")
        garbage.write_bytes(b"this is not a database" * 200)
        os.replace(garbage, path)
    elif how == "read-only":
        for file in files:
            if file.exists():
                file.chmod(0o444)
        path.parent.chmod(0o555)
    elif how == "command":
        subprocess.run(json.loads(target), check=True, capture_output=True, timeout=120)
    elif how == "terminate":
        import psycopg

        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
    else:
        raise ValueError(how)
    return value


def sabotaged_flow(how: str, target: str) -> Flow:
    """add -> mul -> sabotage -> add -> mul: two jobs before the fault, two after it."""
    a = add_one(1)
    b = times_ten(a.output)
    broken = sabotage(how, target, b.output)
    c = add_one(broken.output)
    return Flow([a, b, broken, c, times_ten(c.output)], name=f"sabotaged-{how}")


def chain_flow() -> Flow:
    """The jobs of :func:`sabotaged_flow` without the fault (same digests)."""
    a = add_one(1)
    b = times_ten(a.output)
    c = add_one(b.output)
    return Flow([a, b, c, times_ten(c.output)], name="chain")


@job
def add_one(x):
    executed("add_one")
    return x + 1


@job
def times_ten(x):
    executed("times_ten")
    return x * 10
