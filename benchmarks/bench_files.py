"""Run-folder files: the cost of recording a job's files and of serving them on a hit.

Recording (:meth:`jobflow_cache.files.ObjectArea.record_changes`, with the two snapshots)
stores each file the job wrote as a reflink where the file system has them and as a copy
elsewhere (hashing the bytes once); it never hard-links the user's file. Serving
(:meth:`~jobflow_cache.files.ObjectArea.materialize`) checks the folder, then places:

* ``copy`` (the default): an independent copy of each object (a reflink where possible,
  ``copy_file_range`` in the kernel otherwise);
* ``link`` (opt-in ``JOBFLOW_CACHE_FILES=link``): files of at least ``LINK_MIN_SIZE`` as
  read-only hard links to their object. As root the cache places copies instead; the
  benchmark times the links a non-root user gets.

``shutil.copytree`` of the original folder is the plain-copy reference, and ``check in
place`` the cost of serving into a folder that already holds the files, with the digest memo
cleared (every file is read and hashed once). Files are read from the page cache (just
written), so the copy times are lower bounds of a copy from a cold disk; dirty pages are
written back (``os.sync``) before each timed step.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any
from unittest import mock

from benchmarks.common import Mode, fmt_ratio, fmt_seconds, table
from jobflow_cache.files import ObjectArea, digests, materialize, snapshot

__all__ = [
    "files_table",
    "reflinks_available",
    "run_files",
    "run_verification",
    "verification_table",
]

logger = logging.getLogger(__name__)

_CHUNK = 16 * 2**20


def _write(path: Path, size: int) -> None:
    """A file of ``size`` random bytes (one random block, repeated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(size, _CHUNK))
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(block[:left])
            left -= min(left, len(block))


def reflinks_available(folder: Path) -> bool:
    """Whether the file system of ``folder`` clones files (ioctl FICLONE)."""
    folder.mkdir(parents=True, exist_ok=True)
    src, dst = folder / ".reflink-probe-src", folder / ".reflink-probe-dst"
    src.write_bytes(b"probe")
    try:
        with open(src, "rb") as a, open(dst, "wb") as b:
            fcntl.ioctl(b.fileno(), 0x40049409, a.fileno())
        return True
    except OSError:
        return False
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def _fs_type(folder: Path) -> str:
    try:
        out = subprocess.run(
            ["df", "-T", str(folder)], capture_output=True, text=True, check=True
        ).stdout
        return out.splitlines()[1].split()[1]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return "?"


def cases(mode: Mode) -> dict[str, list[tuple[str, int]]]:
    """Run folders as (relative path, size) lists: one file, 1,000 files, one big folder."""
    big = 64 * 2**20 if mode.quick else 2**30
    many = [(f"sub{i % 10}/out_{i:04d}.dat", 4096) for i in range(1000)]
    quarter = big // 4
    vasp = [("WAVECAR", quarter), ("CHGCAR", quarter), ("vasprun.xml", quarter)]
    vasp.append(("OUTCAR", big - 3 * quarter))
    label = f"{big / 2**30:g} GB" if big >= 2**30 else f"{big // 2**20} MB"
    return {
        "1 file (1 MB)": [("OUTCAR", 2**20)],
        "1000 files (4 kB each)": many,
        f"4 files, {label} (VASP-like)": vasp,
    }


def run_files(mode: Mode) -> list[dict[str, Any]]:
    """Record each case, then time serving it by copy, by link and by copytree."""
    rows = []
    for name, layout in cases(mode).items():
        root = mode.tmp / "files"
        shutil.rmtree(root, ignore_errors=True)
        try:
            rows.append(_one_case(mode, root, name, layout))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        logger.info("files: %s", name)
    return rows


def _one_case(mode: Mode, root: Path, name: str, layout: list[tuple[str, int]]) -> dict[str, Any]:
    run = root / "run"
    run.mkdir(parents=True)
    before = snapshot(run)
    for rel, size in layout:
        _write(run / rel, size)
    total = sum(size for _, size in layout)
    area = ObjectArea(root / "objects")
    os.sync()
    t0 = time.perf_counter()
    records = area.record_changes(run, before, snapshot(run))
    record_s = time.perf_counter() - t0
    big = total >= 2**26
    repeats = {"copy": 3 if big else 5, "link": 3, "copytree": 3 if big else 5, "check": 2}
    if mode.quick:
        repeats = {"copy": 1, "link": 2, "copytree": 1, "check": 1}
    times: dict[str, list[float]] = {}
    linked = False
    for how, count in repeats.items():
        times[how] = []
        for r in range(count):
            dest = root / f"dest-{how}-{r}"
            if how == "check":  # a folder already holding the files: each is hashed once
                area.materialize(records, dest)
                digests.MEMO.clear()
            os.sync()  # the previous step's dirty pages are written back before timing
            t0 = time.perf_counter()
            if how == "copytree":
                shutil.copytree(run, dest)
            elif how == "link":
                # the hard links a non-root user gets (as root, link mode places copies)
                with mock.patch.object(materialize, "_may_link", return_value=True):
                    area.materialize(records, dest, mode="link")
            else:
                area.materialize(records, dest)
            times[how].append(time.perf_counter() - t0)
            if how == "link" and r == 0:
                linked = all(
                    os.stat(dest / rel).st_nlink >= 2
                    for rel, size in layout
                    if size >= materialize.LINK_MIN_SIZE
                ) and any(size >= materialize.LINK_MIN_SIZE for _, size in layout)
            shutil.rmtree(dest)
    medians = {how: statistics.median(values) for how, values in times.items()}
    return {
        "case": name,
        "files": len(layout),
        "bytes": total,
        "fs": _fs_type(root),
        "reflinks": reflinks_available(root),
        "record_s": record_s,
        "record_link_s": record_s,  # the name older reports used
        "copy_s": medians["copy"],
        "link_s": medians["link"],
        "copytree_s": medians["copytree"],
        "check_s": medians["check"],
        "times": times,
        "hard_linked": linked,
        "copy_over_link": medians["copy"] / medians["link"],
    }


def files_table(rows: list[dict[str, Any]]) -> str:
    """Recording and serving each case."""
    fs = rows[0]["fs"] if rows else "?"
    reflinks = "reflinks" if rows and rows[0]["reflinks"] else "no reflinks"
    return table(
        f"Files: recording a job's files and serving a hit (median; {fs}, {reflinks})",
        [
            "run folder",
            "record",
            "serve: copy",
            "serve: link",
            "copytree",
            "check in place",
            "copy/link",
        ],
        [
            [
                row["case"],
                fmt_seconds(row["record_s"]),
                fmt_seconds(row["copy_s"]),
                fmt_seconds(row["link_s"]) + ("" if row["hard_linked"] else " (copied)"),
                fmt_seconds(row["copytree_s"]),
                fmt_seconds(row["check_s"]),
                fmt_ratio(row["copy_over_link"]),
            ]
            for row in rows
        ],
    )


def verification_cases(mode: Mode) -> dict[str, list[tuple[str, int]]]:
    """1 GB run folders (64 MB in quick mode) for the cost of verifying objects on a hit."""
    total = 64 * 2**20 if mode.quick else 2**30
    return {
        "8 files x 128 MiB": [(f"big_{i}.dat", total // 8) for i in range(8)],
        "1000 files x 1 MiB": [(f"sub{i % 10}/f_{i:04d}.dat", total // 1000) for i in range(1000)],
    }


def run_verification(mode: Mode, repeats: int = 3, hit_repeats: int = 1) -> list[dict[str, Any]]:
    """What checking a hit's objects by content costs (issue 14): for each folder, the
    verification alone (:meth:`ObjectArea._checked` of every object) and a whole hit
    (:meth:`ObjectArea.materialize`, copy mode), with the memo cold (first hit of a process
    on this host: every object read and hashed) and warm (a later hit: one ``fstat`` each),
    and a whole hit with verification skipped for reference. Objects are memoised once they
    are 2 s old (:data:`jobflow_cache.hashing.contents.RACY_NS`): the benchmark waits that long
    after recording. Times are medians of ``repeats`` (whole hits: of ``hit_repeats``);
    per GB figures are scaled."""
    from jobflow_cache.hashing import contents

    rows = []
    for name, layout in verification_cases(mode).items():
        root = mode.tmp / "verify"
        shutil.rmtree(root, ignore_errors=True)
        try:
            rows.append(_verify_case(root, name, layout, repeats, hit_repeats, contents))
        finally:
            shutil.rmtree(root, ignore_errors=True)
            contents.use_database(None)
        logger.info("verify: %s", name)
    return rows


def _verify_case(
    root: Path,
    name: str,
    layout: list[tuple[str, int]],
    repeats: int,
    hit_repeats: int,
    contents: Any,
) -> dict[str, Any]:
    run = root / "run"
    run.mkdir(parents=True)
    before = snapshot(run)
    for rel, size in layout:
        _write(run / rel, size)
    total = sum(size for _, size in layout)
    area = ObjectArea(root / "objects")
    records = area.record_changes(run, before, snapshot(run))
    time.sleep(2.1)  # objects are memoised once settled (contents.RACY_NS)
    times: dict[str, list[float]] = {k: [] for k in ("cold", "warm", "hit_cold", "hit_warm")}
    times["hit_unverified"] = []

    def forget() -> None:  # a new process: nothing memoised in it, nor on disk
        digests.MEMO.clear()
        contents.use_database(root / f"memo-{time.monotonic_ns()}.sqlite")
        contents.memo().clear()

    def check_all() -> None:
        for record in records:
            assert not isinstance(area._checked(record), str)

    for r in range(repeats):
        forget()
        t0 = time.perf_counter()
        check_all()
        times["cold"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        check_all()
        times["warm"].append(time.perf_counter() - t0)
        for how in ("hit_cold", "hit_warm", "hit_unverified") if r < hit_repeats else ():
            if how == "hit_cold":
                forget()
            dest = root / f"dest-{how}-{r}"
            os.sync()
            t0 = time.perf_counter()
            if how == "hit_unverified":
                with mock.patch.object(
                    ObjectArea,
                    "_checked",
                    lambda self, rec: materialize._Verified(
                        digests.memo_key(os.stat(self.path_of(rec.xxh3))), 0
                    ),
                ):
                    area.materialize(records, dest)
            else:
                area.materialize(records, dest)
            times[how].append(time.perf_counter() - t0)
            shutil.rmtree(dest)
    medians = {how: statistics.median(values) for how, values in times.items()}
    gb = total / 2**30
    return {
        "case": name,
        "files": len(layout),
        "bytes": total,
        "fs": _fs_type(root),
        **{f"{how}_s": value for how, value in medians.items()},
        **{f"{how}_s_per_gb": value / gb for how, value in medians.items()},
        "times": times,
    }


def verification_table(rows: list[dict[str, Any]]) -> str:
    """The cost of verifying a hit's objects by content, per GB."""
    return table(
        "Files: verifying a hit's objects by content (median, per GB of files)",
        [
            "run folder",
            "verify, cold memo",
            "verify, warm memo",
            "hit, cold",
            "hit, warm",
            "hit, unverified",
        ],
        [
            [
                row["case"],
                fmt_seconds(row["cold_s_per_gb"]),
                fmt_seconds(row["warm_s_per_gb"]),
                fmt_seconds(row["hit_cold_s_per_gb"]),
                fmt_seconds(row["hit_warm_s_per_gb"]),
                fmt_seconds(row["hit_unverified_s_per_gb"]),
            ]
            for row in rows
        ],
    )


if __name__ == "__main__":  # python -m benchmarks.bench_files [quick|full|verify[-quick]] [folder]
    import sys
    import tempfile

    which = sys.argv[1] if len(sys.argv) > 1 else "quick"
    base = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        if which.startswith("verify"):  # machine-readable: JSON on stdout, table on stderr
            import json

            found = run_verification(
                Mode("quick" if which.endswith("quick") else "full", Path(tmp))
            )
            print(verification_table(found), file=sys.stderr)
            print(json.dumps(found, indent=1))
        else:
            results = run_files(Mode(which, Path(tmp)))
            print(files_table(results))
