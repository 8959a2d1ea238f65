"""Run-folder files: recording into the object area and materialising a hit, link vs copy.

A hit places the recorded files into the new run folder with
:meth:`jobflow_cache.files.ObjectArea.materialize`: ``link`` hard-links each object (read-only),
``copy`` copies it and checks its digest on the way. ``shutil.copytree`` of the original folder
is shown as the plain-copy reference. Files are read from the page cache (just written), so the
copy times are lower bounds of a copy from a cold disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Mode, fmt_ratio, fmt_seconds, table
from jobflow_cache import ObjectArea

__all__ = ["files_table", "run_files"]

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


def cases(mode: Mode) -> dict[str, list[tuple[str, int]]]:
    """Run folders as (relative path, size) lists: one file, 1,000 files, one big folder."""
    big = 64 * 2**20 if mode.quick else 2**30
    many = [(f"sub{i % 10}/out_{i:04d}.dat", 4096) for i in range(1000)]
    vasp = [
        ("WAVECAR", big // 2),
        ("CHGCAR", big // 4),
        ("vasprun.xml", big // 8),
        ("OUTCAR", big - big // 2 - big // 4 - big // 8),
    ]
    label = f"{big / 2**30:g} GB" if big >= 2**30 else f"{big // 2**20} MB"
    return {
        "1 file (1 MB)": [("OUTCAR", 2**20)],
        "1000 files (4 kB each)": many,
        f"4 files, {label} (VASP-like)": vasp,
    }


def run_files(mode: Mode) -> list[dict[str, Any]]:
    """Record each case, then time materialising it by hard link and by copy."""
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
    for rel, size in layout:
        _write(run / rel, size)
    total = sum(size for _, size in layout)
    area = ObjectArea(root / "objects")
    t0 = time.perf_counter()
    records = area.record(run, [rel for rel, _ in layout], mode="link")
    record_s = time.perf_counter() - t0
    big = total >= 2**26
    repeats = {"link": 5, "copy": 2 if big else 5, "copytree": 2 if big else 5}
    if mode.quick:
        repeats = {"link": 3, "copy": 1, "copytree": 1}
    times: dict[str, list[float]] = {}
    linked = False
    for how, count in repeats.items():
        times[how] = []
        for r in range(count):
            dest = root / f"dest-{how}-{r}"
            t0 = time.perf_counter()
            if how == "copytree":
                shutil.copytree(run, dest)
            else:
                area.materialize(records, dest, mode=how)  # type: ignore[arg-type]
            times[how].append(time.perf_counter() - t0)
            if how == "link" and r == 0:
                links = [os.stat(dest / rel).st_nlink for rel, _ in layout]
                linked = all(n >= 2 for n in links)
            shutil.rmtree(dest)
    medians = {how: statistics.median(values) for how, values in times.items()}
    return {
        "case": name,
        "files": len(layout),
        "bytes": total,
        "record_link_s": record_s,
        "link_s": medians["link"],
        "copy_s": medians["copy"],
        "copytree_s": medians["copytree"],
        "times": times,
        "hard_linked": linked,
        "copy_over_link": medians["copy"] / medians["link"],
    }


def files_table(rows: list[dict[str, Any]]) -> str:
    """Materialising each case by link and by copy."""
    return table(
        "Files: materialising a hit's run folder (median)",
        ["run folder", "record (link)", "link", "copy", "copytree", "copy/link", "hard-linked"],
        [
            [
                row["case"],
                fmt_seconds(row["record_link_s"]),
                fmt_seconds(row["link_s"]),
                fmt_seconds(row["copy_s"]),
                fmt_seconds(row["copytree_s"]),
                fmt_ratio(row["copy_over_link"]),
                "yes" if row["hard_linked"] else "NO (copied)",
            ]
            for row in rows
        ],
    )
