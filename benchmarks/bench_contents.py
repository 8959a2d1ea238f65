"""Content hashing of files and folders named in inputs (:mod:`jobflow_cache.hashing.contents`).

For each case: the first digest (every byte read and hashed; the file was just written, so it is
read from the page cache: a lower bound of a read from a cold disk), the memoised digest in the
same process (a ``stat`` per file), and the memoised digest in a fresh process through the
machine's SQLite memo (files of at least ``PERSIST_MIN`` bytes; smaller ones are read again).
Files are written with random bytes, then aged past the racy window (their mtime set back and
the ctime waited out), as files of an earlier job are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, Mode, fmt_seconds, table
from jobflow_cache.hashing import contents

__all__ = ["contents_table", "run_contents"]

logger = logging.getLogger(__name__)

_BLOCK = 16 * 2**20


def _write(path: Path, size: int, block: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        left = size
        while left > 0:
            fh.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def cases(mode: Mode) -> dict[str, list[tuple[str, int]]]:
    """Inputs as (relative path, size) lists; the 1 GB file only in full mode."""
    out = {
        "file, 1 MB": [("POSCAR", 2**20)],
        "folder, 10 files (100 kB)": [(f"f{i}.dat", 10_000) for i in range(10)],
        "folder, 10,000 files (4 kB)": [
            (f"sub{i % 100}/f{i:05d}.dat", 4096) for i in range(10_000)
        ],
    }
    if not mode.quick:
        out["file, 1 GB"] = [("WAVECAR", 2**30)]
    return out


def _digest(path: Path, single: bool) -> str:
    if single:
        return contents.file_digest(path)
    return contents.tree_digest(path).digest


def _fresh_process(path: Path, single: bool, db: Path) -> dict[str, Any]:
    """Digest once in a new process using the SQLite memo ``db``; its time and counters."""
    code = (
        "import json, time\n"
        "from pathlib import Path\n"
        "from jobflow_cache.hashing import contents\n"
        f"contents.use_database({str(db)!r})\n"
        "t0 = time.perf_counter()\n"
        f"p = Path({str(path)!r})\n"
        f"d = contents.file_digest(p) if {single!r} else contents.tree_digest(p).digest\n"
        "t = time.perf_counter() - t0\n"
        "print(json.dumps({'s': t, **contents.memo().stats}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def run_contents(mode: Mode) -> list[dict[str, Any]]:
    """Time first, memoised and other-process digests of each case."""
    rows = []
    block = os.urandom(_BLOCK)
    root = mode.tmp / "contents"
    db = root / "memo.sqlite"
    made: dict[str, Path] = {}
    try:
        old = time.time_ns() - 10 * contents.RACY_NS
        for name, layout in cases(mode).items():
            base = root / name.replace(" ", "_").replace(",", "")
            for rel, size in layout:
                _write(base / rel, size, block)
                os.utime(base / rel, ns=(old, old))
            made[name] = base
        time.sleep(contents.RACY_NS / 1e9 + 0.1)  # the ctimes settle (no call can set them)
        contents.use_database(db)
        warm = root / "warm-up"  # opens the SQLite memo before anything is timed
        _write(warm, contents.PERSIST_MIN, block)
        contents.file_digest(warm)
        for name, layout in cases(mode).items():
            base = made[name]
            single = len(layout) == 1
            target = base / layout[0][0] if single else base
            contents.memo().clear()
            stats = contents.memo().stats
            read0 = stats["bytes_read"]
            t0 = time.perf_counter()
            _digest(target, single)
            first = time.perf_counter() - t0
            read = stats["bytes_read"] - read0
            memo_times = []
            for _ in range(5):
                t0 = time.perf_counter()
                _digest(target, single)
                memo_times.append(time.perf_counter() - t0)
            other = _fresh_process(target, single, db)
            rows.append(
                {
                    "case": name,
                    "files": len(layout),
                    "bytes": sum(size for _, size in layout),
                    "first_s": first,
                    "first_bytes_read": read,
                    "memo_s": statistics.median(memo_times),
                    "memo_reread_bytes": stats["bytes_read"] - read0 - read,
                    "other_process_s": other["s"],
                    "other_process_bytes_read": other.get("bytes_read", 0),
                    "other_process_db_hits": other.get("db_hits", 0),
                }
            )
            logger.info("contents: %s", name)
    finally:
        contents.use_database(None)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def contents_table(rows: list[dict[str, Any]]) -> str:
    """Digest times of each case: first, memoised, in another process."""
    return table(
        "Content hashing of inputs: first digest, memoised (same process), another process",
        ["input", "first", "memoised", "bytes re-read", "other process", "its bytes read"],
        [
            [
                row["case"],
                fmt_seconds(row["first_s"]),
                fmt_seconds(row["memo_s"]),
                row["memo_reread_bytes"],
                fmt_seconds(row["other_process_s"]),
                row["other_process_bytes_read"],
            ]
            for row in rows
        ],
    )
